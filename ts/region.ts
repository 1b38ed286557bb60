// DEVICE_GET_REGION_INFO, REGION_READ and REGION_WRITE as typed calls (protocol.md 3.4,
// 3.8). Region info is encoded and decoded by the proto crate's region.rs; reads and writes
// are split, pipelined and checked by the client crate's region.rs.
import { closeSync } from 'node:fs'
import {
  checkData,
  checkInteger,
  checkOffset,
  checkSize,
  checkTimeout,
  invalidArg,
  isDetached,
  outOfRange,
  rejecting,
  TWO_POW_64,
} from './args'
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { dmaMemoryOf } from './dma'
import { VfioUserError } from './errors'
import { closeAll } from './fds'
import { type NativeError, type NativeRegionMapping, native } from './native'
import { MAX_WINDOW, tooLarge, Windows } from './view'

/** The most bytes of region info (fixed part and capabilities) a server may ask us to accept. */
const MAX_REGION_INFO = 64 * 1024
const FIXED_REGION_INFO = 32

/** An area of a region that may be mmapped, relative to the region's mmap offset. */
export interface SparseArea {
  offset: bigint
  size: bigint
}

/**
 * What DEVICE_GET_REGION_INFO reports about one region. When the server sent the region's fd
 * (mmappable regions) this object owns it: `close()` (or `using`) closes it, `takeFd()` hands
 * it over to you.
 */
export class RegionInfo {
  /** The region index (PCI: 0-5 BARs, 6 ROM, 7 config space, 8 VGA). */
  readonly index: number
  /** The raw flags. */
  readonly flags: number
  readonly read: boolean
  readonly write: boolean
  /** The region may be mmapped from its fd. */
  readonly mmap: boolean
  /** Size in bytes. */
  readonly size: bigint
  /** The offset to mmap the region's fd at; sparse areas are relative to it. */
  readonly offset: bigint
  /** The SPARSE_MMAP capability's areas, when the server sent one. */
  readonly sparse?: SparseArea[]
  /** The TYPE capability, for device-specific regions. */
  readonly type?: { type: number; subtype: number }
  /** Accepted oddities (unknown capabilities skipped, an fd that came without MMAP). */
  readonly warnings: string[]
  #fd?: number

  /** @internal Built by {@link regionInfo}. */
  constructor(fields: Omit<RegionInfo, 'fd' | 'takeFd' | 'close' | typeof Symbol.dispose>, fd: number | undefined) {
    this.index = fields.index
    this.flags = fields.flags
    this.read = fields.read
    this.write = fields.write
    this.mmap = fields.mmap
    this.size = fields.size
    this.offset = fields.offset
    if (fields.sparse) this.sparse = fields.sparse
    if (fields.type) this.type = fields.type
    this.warnings = fields.warnings
    this.#fd = fd
  }

  /** The region's fd while this object owns it. */
  get fd(): number | undefined {
    return this.#fd
  }

  /** Hands the fd over: it is yours to close; this object forgets it. */
  takeFd(): number | undefined {
    const fd = this.#fd
    this.#fd = undefined
    return fd
  }

  /** Closes the fd if this object still owns it. Idempotent. */
  close(): void {
    const fd = this.takeFd()
    if (fd !== undefined) closeSync(fd)
  }

  /** Same as {@link RegionInfo.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close()
  }
}

/**
 * Sends DEVICE_GET_REGION_INFO for `index`. A server that needs more room than the fixed 32
 * bytes (for capabilities, and then the fd) says so in its reply; the request is then sent
 * once more with that much room.
 */
export function regionInfo(ch: Channel, index: number, options: CallOptions = {}): Promise<RegionInfo> {
  checkInteger('index', index, 0, 0xffff_ffff)
  return askRegionInfo(ch, index, options)
}

async function askRegionInfo(ch: Channel, index: number, options: CallOptions): Promise<RegionInfo> {
  let argsz = FIXED_REGION_INFO
  for (let attempt = 0; ; attempt++) {
    const reply = await ch.send(Command.DEVICE_GET_REGION_INFO, native.regionInfoRequest(index, argsz), options)
    const d = native.decodeRegionInfo(reply.payload, index)
    if ('errno' in d) {
      closeAll(reply.fds)
      throw ch.error(d)
    }
    if (d.argsz > argsz && attempt === 0 && d.argsz <= MAX_REGION_INFO) {
      closeAll(reply.fds)
      argsz = d.argsz
      continue
    }
    const warnings = [...d.warnings]
    // Accesses past its end are refused from now on, before they are sent.
    ch.regions.sizes.set(index, d.size)
    if (d.argsz > argsz) warnings.push(`the server needs ${d.argsz} bytes of region info; ${argsz} were accepted`)
    const mmap = (d.flags & 4) !== 0
    let fd: number | undefined
    if (reply.fds.length > 0 && mmap) fd = reply.fds[0]
    else if (reply.fds.length > 0) warnings.push('an fd came with a region that is not mmappable; it was closed')
    closeAll(reply.fds.slice(fd === undefined ? 0 : 1))
    const sparse = d.sparse
      ? Array.from({ length: d.sparse.length / 2 }, (_, i) => ({
          offset: d.sparse?.[2 * i] as bigint,
          size: d.sparse?.[2 * i + 1] as bigint,
        }))
      : undefined
    const type =
      d.regionType === undefined || d.regionType === null
        ? undefined
        : { type: d.regionType, subtype: d.regionSubtype ?? 0 }
    return new RegionInfo(
      {
        index: d.index,
        flags: d.flags,
        read: (d.flags & 1) !== 0,
        write: (d.flags & 2) !== 0,
        mmap,
        size: d.size,
        offset: d.offset,
        sparse,
        type,
        warnings,
      },
      fd,
    )
  }
}

/** Options of {@link regionWrite}. */
export interface RegionWriteOptions extends CallOptions {
  /** Send as posted writes (No_reply): ordered with everything else, answered by nothing. */
  posted?: boolean
}

/** The checked offset (as u32 halves and a bigint) and length (a number) of an access. */
function checkAccess(index: number, offset: unknown, size: unknown) {
  checkInteger('index', index, 0, 0xffff_ffff)
  const at = checkOffset('offset', offset)
  const length = checkSize('length', size, 1, 0xffff_ffff)
  if (at.value + BigInt(length) > TWO_POW_64) throw outOfRange(`${length} bytes at offset ${at.value} pass 2^64`)
  return { ...at, length }
}

/**
 * The error for an access the server has already told us it would refuse: a region index at
 * or past the count `deviceInfo()` reported, or bytes past the size `regionInfo()` reported.
 * Such a request is never sent (the server would only log and refuse it).
 */
function outOfBounds(ch: Channel, index: number, offset: bigint, length: number): RangeError | undefined {
  const count = ch.regions.count
  if (count !== undefined && index >= count) {
    return outOfRange(`region ${index} does not exist: the device reported ${count} regions (0 to ${count - 1})`)
  }
  const size = ch.regions.sizes.get(index)
  if (size !== undefined && offset + BigInt(length) > size) {
    return outOfRange(
      `${length} bytes at offset 0x${offset.toString(16)} of region ${index} pass its end (${size} bytes, 0x${size.toString(16)})`,
    )
  }
  return undefined
}

/** Options of {@link regionRead}. */
export interface RegionReadOptions extends CallOptions {
  /**
   * Memory to read into instead of a new Buffer. Its first `length` bytes receive the data
   * straight from the socket (no copy, nothing allocated per read), and the result is a
   * Buffer over them. Until the call settles, the bytes are being written: do not read them
   * yet, and do not transfer or detach its ArrayBuffer. If the read fails, what they hold is
   * unspecified; once it has settled (an abort included), nothing is written there again.
   */
  into?: Uint8Array
}

/**
 * From this many bytes on, a read without `into` still lands straight in the Buffer it
 * returns (allocated first): a large body is then written once, by the kernel, into memory
 * V8 manages, instead of into memory handed to V8 afterwards. Below it, the bytes arrive
 * with the reply and are handed over as they are.
 */
const DIRECT_READ = 64 * 1024

/** Where a read of `length` bytes lands: a Buffer over `into`, a new Buffer, or (small reads) the reply's own. */
function readTarget(into: unknown, length: number): Buffer | undefined {
  if (into === undefined) return length >= DIRECT_READ ? Buffer.allocUnsafeSlow(length) : undefined
  if (!(into instanceof Uint8Array)) {
    throw invalidArg(`into must be a Buffer or Uint8Array, got ${into === null ? 'null' : typeof into}`)
  }
  if (isDetached(into.buffer)) {
    throw invalidArg('into is a view of a detached ArrayBuffer')
  }
  if (into.byteLength < length) {
    throw outOfRange(`into holds ${into.byteLength} bytes, fewer than the ${length} to read`)
  }
  return Buffer.from(into.buffer, into.byteOffset, length)
}

/**
 * `e` with the access it failed in its message (`REGION_READ of 4 bytes at 0xffe of region
 * 0: …`), so that a server's bare refusal still says what was refused. Anything but a
 * `VfioUserError` (an abort) is passed through.
 */
function about(e: unknown, command: number, length: number, offset: bigint, index: number): unknown {
  if (!(e instanceof VfioUserError)) return e
  const what = `${command === Command.REGION_READ ? 'REGION_READ' : 'REGION_WRITE'} of ${length} bytes at 0x${offset.toString(16)} of region ${index}`
  const out = new VfioUserError(e.code, Math.abs(e.errno), `${what}: ${e.message}`, e.command, e.path)
  out.cause = e
  return out
}

/** Reads `length` bytes at `offset` of region `index`. */
export function regionRead(
  ch: Channel,
  index: number,
  offset: number | bigint,
  size: number | bigint,
  options: RegionReadOptions = {},
): Promise<Buffer> {
  const at = checkAccess(index, offset, size)
  const length = at.length
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  const target = readTarget(options.into, length)
  const refused = outOfBounds(ch, index, at.value, length)
  if (refused) return Promise.reject(refused)
  if (target) {
    const start = (token: number) => {
      // Memory of a DmaMemory is not unmapped by its close() while this read writes into
      // it: held from here (a call refused before, an aborted signal say, holds nothing).
      const owner = options.into ? dmaMemoryOf(target)?.memory : undefined
      const release = owner?.retain()
      let refused: NativeError | null
      try {
        refused = ch.native.regionReadInto(token, index, at.hi, at.lo, target, owner?.shrinkable ?? false, timeoutMs)
      } catch (e) {
        release?.()
        throw e
      }
      // The native side writes it until the read's event arrives, whatever the promise does.
      if (!refused) ch.hold(token, target, release)
      else release?.()
      return refused
    }
    return ch.call(Command.REGION_READ, start, options).then(
      () => target,
      (e: unknown) => {
        throw about(e, Command.REGION_READ, length, at.value, index)
      },
    )
  }
  return ch
    .call(Command.REGION_READ, (token) => ch.native.regionRead(token, index, at.hi, at.lo, length, timeoutMs), options)
    .then(
      (reply) => reply.payload,
      (e: unknown) => {
        throw about(e, Command.REGION_READ, length, at.value, index)
      },
    )
}

/** {@link regionRead}, blocking the JavaScript thread. */
export function regionReadSync(
  ch: Channel,
  index: number,
  offset: number | bigint,
  size: number | bigint,
  options: Omit<RegionReadOptions, 'signal'> = {},
): Buffer {
  const at = checkAccess(index, offset, size)
  const length = at.length
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  const target = readTarget(options.into, length)
  const refused = outOfBounds(ch, index, at.value, length)
  if (refused) throw refused
  const failed = () => about(ch.lastError(), Command.REGION_READ, length, at.value, index)
  return ch.traceSync(Command.REGION_READ, () => {
    if (target) {
      // A blocking read settles before it returns: nothing can close its memory meanwhile.
      const shrinkable = dmaMemoryOf(target)?.memory.shrinkable ?? false
      if (!ch.native.regionReadIntoSync(index, at.hi, at.lo, target, shrinkable, timeoutMs)) throw failed()
      return target
    }
    const data = ch.native.regionReadSync(index, at.hi, at.lo, length, timeoutMs)
    if (data === null) throw failed()
    return data
  })
}

/** Writes `data` at `offset` of region `index`. */
export function regionWrite(
  ch: Channel,
  index: number,
  offset: number | bigint,
  data: Uint8Array,
  options: RegionWriteOptions = {},
): Promise<void> {
  const bytes = checkData(data)
  const at = checkAccess(index, offset, bytes.byteLength)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  if (options.posted !== undefined && typeof options.posted !== 'boolean') {
    throw invalidArg('posted must be a boolean')
  }
  const refused = outOfBounds(ch, index, at.value, bytes.byteLength)
  if (refused) return Promise.reject(refused)
  if (options.posted && ch.regionMaps.size > 0) {
    // A store through a mapping could overtake a posted write still in the socket.
    return Promise.reject(
      new VfioUserError('EBUSY', 16, 'posted writes are refused while a region is mapped', Command.REGION_WRITE),
    )
  }
  if (options.posted) {
    const refused = ch.native.regionWritePosted(index, at.hi, at.lo, bytes)
    if (refused) return Promise.reject(ch.error(refused))
    ch.tracePosted(Command.REGION_WRITE)
    // The first write of a job goes out at once; those that follow it in the same job are
    // corked until the job ends, share a sendmsg, and coalesce when the server allows.
    if (bytes.byteLength <= 8) ch.corkTick()
    return Promise.resolve()
  }
  return ch
    .call(Command.REGION_WRITE, (token) => ch.native.regionWrite(token, index, at.hi, at.lo, bytes, timeoutMs), options)
    .then(
      () => undefined,
      (e: unknown) => {
        throw about(e, Command.REGION_WRITE, bytes.byteLength, at.value, index)
      },
    )
}

/** {@link regionWrite} (not posted), blocking the JavaScript thread. */
export function regionWriteSync(
  ch: Channel,
  index: number,
  offset: number | bigint,
  data: Uint8Array,
  options: Omit<CallOptions, 'signal'> = {},
): void {
  const bytes = checkData(data)
  const at = checkAccess(index, offset, bytes.byteLength)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  const refused = outOfBounds(ch, index, at.value, bytes.byteLength)
  if (refused) throw refused
  ch.traceSync(Command.REGION_WRITE, () => {
    if (!ch.native.regionWriteSync(index, at.hi, at.lo, bytes, timeoutMs)) {
      throw about(ch.lastError(), Command.REGION_WRITE, bytes.byteLength, at.value, index)
    }
  })
}

/** One mapped area: where it starts in the region, and the memory. */
export interface MappedArea {
  /** Offset of the area within the region. */
  readonly offset: bigint
  /** Its size in bytes. */
  readonly size: bigint
  /**
   * The device memory (reads as empty once unmapped).
   * @throws {RangeError} `ERR_BUFFER_TOO_LARGE` for an area larger than one Buffer holds
   *   (`buffer.constants.MAX_LENGTH`, 4 GiB on Node 20): see it through {@link RegionMap.window}.
   */
  readonly buffer: Buffer
}

/** Options of `VfioUserClient.mapRegion`. */
export interface MapRegionOptions extends CallOptions {
  /**
   * Map a region whose fd is a file the server could still shrink (a regular file or memfd
   * without `F_SEAL_SHRINK`, as libvfio-user's and SPDK's servers send), which is otherwise
   * refused with `'EPERM'`. If the server truncates it, your next read or write of the lost
   * pages through the area's Buffer kills this process with SIGBUS. Only for a server you
   * trust with that. Default false.
   */
  allowShrinkable?: boolean
}

/** One area as mapped: its mapping, and the windows over it. */
interface Part {
  offset: bigint
  size: number
  mapping: NativeRegionMapping
  windows: Windows
  /** The whole area as one Buffer, when it fits one. */
  buffer: Buffer | undefined
}

/** A region mapped into this process; see `VfioUserClient.mapRegion`. */
export class RegionMap {
  readonly index: number
  readonly areas: readonly MappedArea[]
  #parts: Part[]
  #ch: Channel

  /** @internal Built by {@link mapRegion}. */
  constructor(ch: Channel, index: number, parts: Part[]) {
    this.#ch = ch
    this.index = index
    this.#parts = parts
    this.areas = Object.freeze(
      parts.map((p) =>
        Object.freeze({
          offset: p.offset,
          size: BigInt(p.size),
          get buffer(): Buffer {
            if (p.buffer === undefined) throw tooLarge(`the area at ${p.offset} of region ${index}`, p.size)
            return p.buffer
          },
        }),
      ),
    )
    ch.regionMaps.add(this)
  }

  /** True while mapped. */
  get mapped(): boolean {
    return this.#parts.length > 0
  }

  /**
   * A Buffer over `length` bytes of the region from `offset` (region offsets, inside one
   * mapped area), for areas of any size: a window is at most `buffer.constants.MAX_LENGTH`
   * bytes. It reads as empty once unmapped.
   * @throws {RangeError} `ERR_OUT_OF_RANGE` outside every area, `ERR_BUFFER_TOO_LARGE` past one Buffer.
   * @throws {VfioUserError} `'EBADF'` once unmapped.
   */
  window(offset: number | bigint, length: number | bigint): Buffer {
    if (!this.mapped) throw new VfioUserError('EBADF', 9, `region ${this.index} is unmapped`)
    const at = checkOffset('offset', offset).value
    const part = this.#parts.find((p) => at >= p.offset && at < p.offset + BigInt(p.size))
    if (!part) throw outOfRange(`offset ${at} is in no mapped area of region ${this.index}`)
    return Buffer.from(part.windows.make(at - part.offset, length).view)
  }

  /** Unmaps every area; the Buffers read as empty from then on. Idempotent. */
  unmap(): void {
    for (const p of this.#parts) release(p)
    this.#parts = []
    this.#ch.regionMaps.delete(this)
  }

  /** Same as {@link RegionMap.unmap}, for `using`. */
  [Symbol.dispose](): void {
    this.unmap()
  }
}

/** Detaches every view of an area, then unmaps it. */
function release(p: Part): void {
  p.windows.detachAll()
  p.mapping.unmap()
}

/** Maps region `index`; see `VfioUserClient.mapRegion`. */
export function mapRegion(ch: Channel, index: number, options: MapRegionOptions = {}): Promise<RegionMap> {
  checkInteger('index', index, 0, 0xffff_ffff)
  if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
  const allow = options.allowShrinkable ?? false
  if (typeof allow !== 'boolean') throw invalidArg('allowShrinkable must be a boolean')
  return askRegionInfo(ch, index, options).then((info) => {
    try {
      const fd = info.fd
      if (!info.mmap || fd === undefined) {
        throw new VfioUserError(
          'ENODEV',
          19,
          `region ${index} cannot be mmapped (${info.mmap ? 'no fd came with it' : 'no MMAP flag'})`,
          Command.DEVICE_GET_REGION_INFO,
        )
      }
      const areas = (info.sparse ?? [{ offset: 0n, size: info.size }]).filter((a) => a.size > 0n)
      const parts: Part[] = []
      try {
        for (const a of areas) {
          if (a.size > BigInt(Number.MAX_SAFE_INTEGER)) {
            throw new VfioUserError(
              'EFBIG',
              27,
              `region ${index}'s area at ${a.offset} is ${a.size} bytes: too large to map`,
            )
          }
          const m = native.mapRegion(fd, info.offset + a.offset, a.size, info.write, allow)
          if ('errno' in m) throw ch.error(m)
          const size = Number(a.size)
          const windows = new Windows(m, size, `area at ${a.offset} of region ${index}`)
          const part: Part = { offset: a.offset, size, mapping: m, windows, buffer: undefined }
          parts.push(part)
          if (size <= MAX_WINDOW) part.buffer = Buffer.from(windows.make(0, size).view)
        }
      } catch (e) {
        for (const p of parts) release(p)
        throw e
      }
      return new RegionMap(ch, index, parts)
    } finally {
      // The mappings keep the memory; the fd is not needed any more.
      info.close()
    }
  })
}

/** One sub-region of a region served by an fd (DEVICE_GET_REGION_IO_FDS). */
export interface IoFdRecord {
  /** Offset within the region. */
  offset: bigint
  /** Size in bytes (0: any size). */
  size: bigint
  /** The fd (one of {@link RegionIoFds.fds}). */
  fd: number
  /** `'ioeventfd'`, `'ioregionfd'`, or libvfio-user's `'shadow'` ioeventfd. */
  type: 'ioeventfd' | 'ioregionfd' | 'shadow'
  /** Raw flags (ioeventfd: 1 DATAMATCH, 2 PIO…). */
  flags: number
  /** ioeventfd datamatch, or ioregionfd user data. */
  datamatch: bigint
  /** A shadow ioeventfd's memory: its fd and the offset in it. */
  shadow?: { fd: number; offset: bigint }
}

const IO_FD_TYPES = ['ioeventfd', 'ioregionfd', 'shadow'] as const

/**
 * What DEVICE_GET_REGION_IO_FDS reports: the records, in either layout servers use, and the
 * fds they refer to, owned by this object (`close()`, `using`, or `takeFds()`).
 */
export class RegionIoFds {
  readonly index: number
  readonly records: readonly IoFdRecord[]
  /** The layout the server used: 40 (the spec's) or 48 bytes (libvfio-user's). */
  readonly stride: number
  #fds: number[]

  /** @internal Built by {@link regionIoFds}. */
  constructor(index: number, records: IoFdRecord[], stride: number, fds: number[]) {
    this.index = index
    this.records = Object.freeze(records)
    this.stride = stride
    this.#fds = fds
  }

  /** The fds while this object owns them. */
  get fds(): readonly number[] {
    return this.#fds
  }

  /** Hands the fds over: they are yours to close. */
  takeFds(): number[] {
    const fds = this.#fds
    this.#fds = []
    return fds
  }

  /** Closes the fds this object still owns. Idempotent. */
  close(): void {
    closeAll(this.takeFds())
  }

  /** Same as {@link RegionIoFds.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close()
  }
}

/**
 * DEVICE_GET_REGION_IO_FDS for region `index` (asked once more with the room the server
 * needs). Each record is checked against the region's size (asked first with regionInfo) and
 * the fds that came.
 */
export function regionIoFds(ch: Channel, index: number, options: CallOptions = {}): Promise<RegionIoFds> {
  checkInteger('index', index, 0, 0xffff_ffff)
  return askRegionInfo(ch, index, options).then(async (info) => {
    info.close()
    let argsz = 16
    for (let attempt = 0; ; attempt++) {
      const reply = await ch.send(Command.DEVICE_GET_REGION_IO_FDS, native.regionIoFdsRequest(index, argsz), options)
      const d = native.decodeRegionIoFds(reply.payload, index, info.size, reply.fds.length)
      if ('errno' in d) {
        closeAll(reply.fds)
        throw ch.error(d)
      }
      if (d.argsz > argsz && d.count > 0 && attempt === 0 && d.argsz <= 1 << 20) {
        closeAll(reply.fds)
        argsz = d.argsz
        continue
      }
      const records = d.records.map((r) => {
        const rec: IoFdRecord = {
          offset: r.offset,
          size: r.size,
          fd: reply.fds[r.fdIndex] as number,
          type: IO_FD_TYPES[r.kind] ?? 'ioeventfd',
          flags: r.flags,
          datamatch: r.datamatch,
        }
        if (r.shadowFdIndex !== undefined && r.shadowFdIndex !== null) {
          rec.shadow = { fd: reply.fds[r.shadowFdIndex] as number, offset: r.shadowOffset ?? 0n }
        }
        return rec
      })
      return new RegionIoFds(index, records, d.stride, reply.fds)
    }
  })
}

/** Options of the register writes of {@link Registers}. */
export interface RegisterWriteOptions extends CallOptions {
  /** Send as a posted write (No_reply), as {@link RegionWriteOptions.posted}. */
  posted?: boolean
}

/** Register widths in bytes, and the largest value each holds. */
const WIDTH = { 8: 1, 16: 2, 32: 4 } as const

/**
 * Little-endian (PCI) register access to one region: `read32(offset)` is a 4-byte
 * REGION_READ decoded, `write64(offset, value)` an 8-byte REGION_WRITE encoded, each with a
 * `*Sync` twin that blocks the JavaScript thread. Bounds, errors and tracing are those of
 * `regionRead`/`regionWrite`. Made by `VfioUserClient.registers(index)`.
 */
export class Registers {
  /** The region's index. */
  readonly index: number
  readonly #ch: Channel

  /** @internal Use `VfioUserClient.registers`. */
  constructor(ch: Channel, index: number) {
    this.#ch = ch
    this.index = checkInteger('index', index, 0, 0xffff_ffff)
  }

  /** The byte at `offset`. */
  read8(offset: number | bigint, options: CallOptions = {}): Promise<number> {
    return this.#read(offset, 8, options)
  }
  /** The 16-bit register at `offset`. */
  read16(offset: number | bigint, options: CallOptions = {}): Promise<number> {
    return this.#read(offset, 16, options)
  }
  /** The 32-bit register at `offset`. */
  read32(offset: number | bigint, options: CallOptions = {}): Promise<number> {
    return this.#read(offset, 32, options)
  }
  /** The 64-bit register at `offset`, as a bigint. */
  read64(offset: number | bigint, options: CallOptions = {}): Promise<bigint> {
    return rejecting(() => regionRead(this.#ch, this.index, offset, 8, options)).then((b) => b.readBigUInt64LE(0))
  }
  /** {@link read8}, blocking. */
  read8Sync(offset: number | bigint, options: Omit<CallOptions, 'signal'> = {}): number {
    return regionReadSync(this.#ch, this.index, offset, 1, options).readUInt8(0)
  }
  /** {@link read16}, blocking. */
  read16Sync(offset: number | bigint, options: Omit<CallOptions, 'signal'> = {}): number {
    return regionReadSync(this.#ch, this.index, offset, 2, options).readUInt16LE(0)
  }
  /** {@link read32}, blocking. */
  read32Sync(offset: number | bigint, options: Omit<CallOptions, 'signal'> = {}): number {
    return regionReadSync(this.#ch, this.index, offset, 4, options).readUInt32LE(0)
  }
  /** {@link read64}, blocking. */
  read64Sync(offset: number | bigint, options: Omit<CallOptions, 'signal'> = {}): bigint {
    return regionReadSync(this.#ch, this.index, offset, 8, options).readBigUInt64LE(0)
  }

  /** Writes the byte `value` at `offset`. */
  write8(offset: number | bigint, value: number, options: RegisterWriteOptions = {}): Promise<void> {
    return rejecting(() => regionWrite(this.#ch, this.index, offset, encode(value, 8), options))
  }
  /** Writes the 16-bit `value` at `offset`. */
  write16(offset: number | bigint, value: number, options: RegisterWriteOptions = {}): Promise<void> {
    return rejecting(() => regionWrite(this.#ch, this.index, offset, encode(value, 16), options))
  }
  /** Writes the 32-bit `value` at `offset`. */
  write32(offset: number | bigint, value: number, options: RegisterWriteOptions = {}): Promise<void> {
    return rejecting(() => regionWrite(this.#ch, this.index, offset, encode(value, 32), options))
  }
  /** Writes the 64-bit `value` (a bigint, or a safe integer) at `offset`. */
  write64(offset: number | bigint, value: number | bigint, options: RegisterWriteOptions = {}): Promise<void> {
    return rejecting(() => regionWrite(this.#ch, this.index, offset, encode64(value), options))
  }
  /** {@link write8}, blocking. */
  write8Sync(offset: number | bigint, value: number, options: Omit<CallOptions, 'signal'> = {}): void {
    regionWriteSync(this.#ch, this.index, offset, encode(value, 8), options)
  }
  /** {@link write16}, blocking. */
  write16Sync(offset: number | bigint, value: number, options: Omit<CallOptions, 'signal'> = {}): void {
    regionWriteSync(this.#ch, this.index, offset, encode(value, 16), options)
  }
  /** {@link write32}, blocking. */
  write32Sync(offset: number | bigint, value: number, options: Omit<CallOptions, 'signal'> = {}): void {
    regionWriteSync(this.#ch, this.index, offset, encode(value, 32), options)
  }
  /** {@link write64}, blocking. */
  write64Sync(offset: number | bigint, value: number | bigint, options: Omit<CallOptions, 'signal'> = {}): void {
    regionWriteSync(this.#ch, this.index, offset, encode64(value), options)
  }

  #read(offset: number | bigint, bits: 8 | 16 | 32, options: CallOptions): Promise<number> {
    const bytes = WIDTH[bits]
    return rejecting(() => regionRead(this.#ch, this.index, offset, bytes, options)).then((b) => b.readUIntLE(0, bytes))
  }
}

/** `value` as a little-endian register of `bits` bits. */
function encode(value: number, bits: 8 | 16 | 32): Buffer {
  const bytes = WIDTH[bits]
  checkInteger('value', value, 0, 2 ** bits - 1)
  const b = Buffer.alloc(bytes)
  b.writeUIntLE(value, 0, bytes)
  return b
}

/** `value` as a little-endian 64-bit register. */
function encode64(value: number | bigint): Buffer {
  const v = typeof value === 'number' ? BigInt(checkInteger('value', value, 0, Number.MAX_SAFE_INTEGER)) : value
  if (typeof v !== 'bigint') throw invalidArg(`value must be a number or a bigint, got ${typeof value}`)
  if (v < 0n || v >= TWO_POW_64) throw outOfRange(`value must be from 0 to 2^64 - 1, got ${v}`)
  const b = Buffer.alloc(8)
  b.writeBigUInt64LE(v)
  return b
}
