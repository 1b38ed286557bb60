// DMA_MAP and DMA_UNMAP as typed calls, and DMA memory (protocol.md 3.1, 3.2, 3.11). The
// checks against the server's page size and map count, the DMA table and the serving of the
// server's DMA_READ/DMA_WRITE live in the client crate's dma.rs; this shapes the API.
import {
  checkInteger,
  checkOffset,
  checkSize,
  checkTimeout,
  invalidArg,
  isDetached,
  outOfRange,
  TWO_POW_64,
} from './args'
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { fromNative, VfioUserError } from './errors'
import { type NativeDmaMemory, native } from './native'
import type { Reply } from './reply'
import { MAX_WINDOW, tooLarge, Windows } from './view'

/**
 * Memory to offer a device for DMA: a memfd mapped into this process, sealed so that the
 * server it is given to cannot shrink it. `buffer` is a view of the very pages the server maps
 * (its fd goes with DMA_MAP), so what the device writes shows there and what you write the
 * device reads. `close()` closes the fd; the memory stays valid while a map uses it.
 */
export class DmaMemory {
  /** Its size in bytes. */
  readonly size: number
  /** @internal */
  readonly native: NativeDmaMemory
  readonly #windows: Windows
  readonly #buffer: Buffer | undefined

  /** Reads into its memory in flight: `close()` waits for them (native code writes there). */
  #uses = 0
  #closing = false

  /** @internal Use {@link allocateDmaMemory}. */
  constructor(memory: NativeDmaMemory) {
    this.native = memory
    this.size = memory.size
    this.#windows = new Windows(memory, this.size, 'DMA memory')
    if (this.size <= MAX_WINDOW) this.#buffer = this.window(0, this.size)
  }

  /**
   * The memory, as a Buffer over the mapping (no copy). Valid until {@link DmaMemory.close}:
   * from then on it, and every view made of it, reads as empty (its ArrayBuffer is detached).
   * @throws {RangeError} `ERR_BUFFER_TOO_LARGE` for memory larger than one Buffer holds
   *   (`buffer.constants.MAX_LENGTH`, 4 GiB on Node 20): see it through {@link DmaMemory.window}.
   */
  get buffer(): Buffer {
    if (this.#buffer === undefined) throw tooLarge('this DMA memory', this.size)
    return this.#buffer
  }

  /**
   * A Buffer over `length` bytes of the memory from `offset` (no copy), for memory of any
   * size: a window is at most `buffer.constants.MAX_LENGTH` bytes. It can be mapped, or read
   * into, as the memory itself, and reads as empty once the memory is closed.
   * @throws {RangeError} `ERR_OUT_OF_RANGE` past the end, `ERR_BUFFER_TOO_LARGE` past one Buffer.
   * @throws {VfioUserError} `'EBADF'` once closed.
   */
  window(offset: number | bigint, length: number | bigint): Buffer {
    if (this.#closing) throw new VfioUserError('EBADF', 9, 'the DMA memory was closed')
    const { view, offset: base } = this.#windows.make(offset, length)
    owners.set(view, { memory: this, base })
    return Buffer.from(view)
  }

  /**
   * True for memory over a caller's fd that the server could shrink (mapped with
   * `allowShrinkable`): native code copies it only through the kernel, but your own touches of
   * pages the server cut off are SIGBUS.
   */
  get shrinkable(): boolean {
    return this.native.shrinkable
  }

  /** @internal Native code writes into this memory until the returned function is called. */
  retain(): () => void {
    this.#uses++
    let held = true
    return () => {
      if (!held) return
      held = false
      if (--this.#uses === 0 && this.#closing) this.#release()
    }
  }

  /** The memfd while it is open (owned by this object: do not close it yourself). */
  get fd(): number | undefined {
    return this.native.fd ?? undefined
  }

  /**
   * Releases the memory now, not at garbage collection: detaches {@link DmaMemory.buffer} and
   * every window (they read as empty from here on), closes the fd, and unmaps the pages from
   * this process at once, or, when a DMA map still uses them, once the last such map is
   * unmapped (or its connection ends): until then the device may still reach them. A
   * `regionRead` into it still in flight delays all of this until it settles. New maps of it
   * fail with `'EBADF'`. Idempotent.
   */
  close(): void {
    // A read into this memory still in flight is written by native code: the release waits
    // for it to settle.
    this.#closing = true
    if (this.#uses === 0) this.#release()
  }

  #release(): void {
    this.#windows.detachAll()
    this.native.close()
  }

  /** Same as {@link DmaMemory.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close()
  }
}

/** Each DmaMemory window's ArrayBuffer, and where it starts in the memory, to recognise a view of one. */
const owners = new WeakMap<ArrayBufferLike, { memory: DmaMemory; base: number }>()

/** @internal The DmaMemory `view` is a view of, and where its ArrayBuffer starts in it. */
export function dmaMemoryOf(view: Uint8Array): { memory: DmaMemory; base: number } | undefined {
  return owners.get(view.buffer)
}

/** Options of {@link allocateDmaMemory}. */
export interface AllocateDmaMemoryOptions {
  /**
   * Back it with huge pages (`MFD_HUGETLB`, the system's default huge page size, which `size`
   * must be a multiple of), taken from those reserved in `/proc/sys/vm/nr_hugepages`.
   */
  hugePages?: boolean
}

/**
 * Allocates `size` bytes of DMA memory (a memfd, zero-filled, mapped shared).
 * @throws {RangeError} for a size that is not a positive safe integer (a number or a bigint).
 * @throws {VfioUserError} when the memfd cannot be made or mapped (`'ENOMEM'`, `'EMFILE'`…;
 *   with `hugePages`, `'EINVAL'` for a size that is not a multiple of the huge page size,
 *   `'ENOMEM'` when not enough huge pages are reserved).
 */
export function allocateDmaMemory(size: number | bigint, options: AllocateDmaMemoryOptions = {}): DmaMemory {
  const bytes = checkSize('size', size, 1, Number.MAX_SAFE_INTEGER)
  if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
  if (options.hugePages !== undefined && typeof options.hugePages !== 'boolean') {
    throw invalidArg('hugePages must be a boolean')
  }
  const m = native.allocateDmaMemory(bytes, options.hugePages ?? false)
  if ('errno' in m) throw fromNative(m)
  return new DmaMemory(m)
}

/** Options of {@link dmaMemoryFromFd}. */
export interface DmaMemoryFromFdOptions {
  /** How many bytes to map. */
  size: number | bigint
  /** Where they start in the file (page-aligned; default 0). */
  offset?: number | bigint
  /**
   * Map a file the server could shrink (no `F_SEAL_SHRINK`: a hugetlbfs or tmpfs file, an
   * unsealed memfd), which is otherwise refused with `'EPERM'`. The server gets the fd with
   * every DMA map; if it truncates the file, native code serving its DMA or reading into the
   * memory gets EFAULT (it copies through the kernel, and the request or read fails), but
   * your own reads and writes of the lost pages through `buffer` kill this process with
   * SIGBUS. Only for a server you trust with that. Default false.
   */
  allowShrinkable?: boolean
}

/**
 * DMA memory the VMM already has: `size` bytes of `fd` (guest RAM in a memfd, a hugetlbfs
 * file, opened read-write) from `offset`, mapped shared into this process. A DMA map of it
 * sends that fd, with the offset of the range in the file. `fd` stays yours (this works on a
 * duplicate, closed by `close()`).
 * @throws {TypeError|RangeError} for bad arguments.
 * @throws {VfioUserError} `'EBADF'`, `'EINVAL'` (an offset that is not page-aligned, or a
 *   range past the end of the file), `'EACCES'` (not opened read-write), `'EPERM'` (a file the
 *   server could shrink, without `allowShrinkable`), naming the fd.
 */
export function dmaMemoryFromFd(fd: number, options: DmaMemoryFromFdOptions): DmaMemory {
  checkInteger('fd', fd, 0, 0x7fff_ffff)
  if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
  const bytes = checkSize('size', options.size, 1, Number.MAX_SAFE_INTEGER)
  const offset = checkOffset('offset', options.offset ?? 0).value
  const allow = options.allowShrinkable ?? false
  if (typeof allow !== 'boolean') throw invalidArg('allowShrinkable must be a boolean')
  const m = native.dmaMemoryFromFd(fd, offset, bytes, allow)
  if ('errno' in m) throw fromNative(m)
  return new DmaMemory(m)
}

/** A range of guest memory to offer the device. */
export interface DmaMapping {
  /** The I/O virtual address the device uses (aligned to the server's smallest page size). */
  iova: number | bigint
  /** Bytes (a multiple of that page size). */
  size: number | bigint
  /**
   * The memory behind the range: {@link DmaMemory} (its fd goes with the map, the server
   * mmaps it), or a plain Buffer/Uint8Array (no fd: the device's DMA arrives as DMA_READ and
   * DMA_WRITE requests, served from it natively; it is kept alive until unmapped, and must not
   * be transferred meanwhile).
   */
  memory: DmaMemory | Uint8Array
  /** Where the range starts in `memory` (default 0; page-aligned). */
  offset?: number | bigint
  /** The device may read the range (default true). */
  read?: boolean
  /** The device may write the range (default true). */
  write?: boolean
}

/** A range mapped earlier, to unmap. */
export interface DmaRange {
  iova: number | bigint
  size: number | bigint
}

function checkBool(name: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback
  if (typeof value !== 'boolean') throw invalidArg(`${name} must be a boolean`)
  return value
}

function mapArgs(m: DmaMapping, options: Omit<CallOptions, 'signal'>) {
  if (m === null || typeof m !== 'object') throw invalidArg('a DMA mapping must be an object')
  if (!(m.memory instanceof DmaMemory) && !(m.memory instanceof Uint8Array)) {
    throw invalidArg('memory must be a DmaMemory (see allocateDmaMemory) or a Buffer')
  }
  // Else it would read as 0 bytes of memory, refused as a range it does not hold.
  if (m.memory instanceof Uint8Array && m.memory.byteLength === 0 && isDetached(m.memory.buffer)) {
    throw invalidArg('memory is a view of a detached ArrayBuffer')
  }
  const iova = checkOffset('iova', m.iova).value
  const size = checkOffset('size', m.size).value
  let offset = checkOffset('offset', m.offset ?? 0).value
  // A view of a DmaMemory's buffer maps as that memory (its fd goes with the map, and the
  // map keeps the pages until unmapped, whatever close() says meanwhile).
  const owner = m.memory instanceof Uint8Array ? dmaMemoryOf(m.memory) : undefined
  if (owner && m.memory instanceof Uint8Array) {
    if (offset + size > BigInt(m.memory.byteLength)) {
      throw outOfRange(`${size} bytes at offset ${offset} pass the end of the ${m.memory.byteLength}-byte view`)
    }
    offset += BigInt(owner.base + m.memory.byteOffset)
  }
  const memory: DmaMemory | Uint8Array = owner?.memory ?? m.memory
  if (size === 0n) throw outOfRange('size must not be 0')
  const available = memory instanceof DmaMemory ? memory.size : memory.byteLength
  if (offset + size > BigInt(available)) {
    throw outOfRange(`${size} bytes at offset ${offset} pass the end of the ${available}-byte DMA memory`)
  }
  if (iova + size > TWO_POW_64) throw outOfRange(`${size} bytes at iova ${iova} pass 2^64`)
  return {
    memory,
    args: {
      iova,
      size,
      offset,
      read: checkBool('read', m.read, true),
      write: checkBool('write', m.write, true),
      timeoutMs: checkTimeout('timeoutMs', options.timeoutMs),
    },
  }
}

function rangeArgs(r: DmaRange) {
  if (r === null || typeof r !== 'object') throw invalidArg('a DMA range must be an object')
  return { iova: checkOffset('iova', r.iova).value, size: checkOffset('size', r.size).value }
}

type MapArgs = ReturnType<typeof mapArgs>

/** Sends one DMA_MAP (checked into `m`); a Buffer behind it is kept until unmapped. */
function sendMap(ch: Channel, m: MapArgs, options: CallOptions): Promise<void> {
  const { memory, args } = m
  if (memory instanceof DmaMemory) {
    return ch.call(Command.DMA_MAP, (token) => ch.native.dmaMap(token, args, memory.native), options).then(() => {})
  }
  const bytes = Buffer.from(memory.buffer, memory.byteOffset, memory.byteLength)
  return ch
    .call(
      Command.DMA_MAP,
      (token) => {
        const refused = ch.native.dmaMapBuffer(token, args, bytes)
        // From the moment it is sent the range is served from `memory`: keep it reachable.
        if (!refused) ch.dmaBuffers.set(args.iova, memory)
        return refused
      },
      options,
    )
    .then(
      () => {},
      (e: unknown) => {
        if (ch.dmaBuffers.get(args.iova) === memory) ch.dmaBuffers.delete(args.iova)
        throw e
      },
    )
}

/** DMA_MAP of `m`, settled when the server answers. */
export function dmaMap(ch: Channel, m: DmaMapping, options: CallOptions = {}): Promise<void> {
  return sendMap(ch, mapArgs(m, options), options)
}

/** {@link dmaMap}, blocking the JavaScript thread. */
export function dmaMapSync(ch: Channel, m: DmaMapping, options: Omit<CallOptions, 'signal'> = {}): void {
  const { memory, args } = mapArgs(m, options)
  if (memory instanceof DmaMemory) {
    ch.traceSync(Command.DMA_MAP, () => {
      if (!ch.native.dmaMapSync(args, memory.native)) throw ch.lastError()
    })
    return
  }
  const bytes = Buffer.from(memory.buffer, memory.byteOffset, memory.byteLength)
  // Kept reachable from before the map is sent: the range is served from it from then on.
  ch.dmaBuffers.set(args.iova, memory)
  ch.traceSync(Command.DMA_MAP, () => {
    if (!ch.native.dmaMapBufferSync(args, bytes)) {
      ch.dmaBuffers.delete(args.iova)
      throw ch.lastError()
    }
  })
}

/**
 * Every mapping of `maps` sent at once (pipelined), in order; settles once every map sent has
 * been answered, rejecting with the first failure. Consecutive maps of the same DmaMemory go
 * to native code as one call settled by one event, so a long list costs one promise, not one
 * per map.
 */
export function dmaMapMany(ch: Channel, maps: DmaMapping[], options: CallOptions = {}): Promise<void> {
  if (!Array.isArray(maps)) throw invalidArg('maps must be an array')
  const checked = maps.map((m) => mapArgs(m, options))
  const calls: Promise<unknown>[] = []
  for (let i = 0; i < checked.length; ) {
    const { memory } = checked[i]
    if (!(memory instanceof DmaMemory)) {
      calls.push(sendMap(ch, checked[i++], options))
      continue
    }
    let end = i + 1
    while (end < checked.length && checked[end].memory === memory) end++
    calls.push(sendRun(ch, memory, checked.slice(i, end), options))
    i = end
  }
  // allSettled first: the call settles once every map was answered, as one native call does.
  return Promise.allSettled(calls).then((results) => {
    for (const r of results) if (r.status === 'rejected') throw r.reason
  })
}

/** Maps of one DmaMemory as one native call: iova, size and offset, then the access bits. */
function sendRun(ch: Channel, memory: DmaMemory, run: MapArgs[], options: CallOptions): Promise<Reply> {
  const ranges = new BigUint64Array(3 * run.length)
  const access = new Uint8Array(run.length)
  for (let k = 0; k < run.length; k++) {
    const a = run[k].args
    ranges[3 * k] = a.iova
    ranges[3 * k + 1] = a.size
    ranges[3 * k + 2] = a.offset
    access[k] = (a.read ? 1 : 0) | (a.write ? 2 : 0)
  }
  const timeoutMs = run[0].args.timeoutMs
  return ch.call(
    Command.DMA_MAP,
    (token) => ch.native.dmaMapMany(token, memory.native, ranges, access, timeoutMs),
    options,
  )
}

/** DMA_UNMAP of a range mapped earlier (exactly), settled when the server answers. */
export function dmaUnmap(ch: Channel, r: DmaRange, options: CallOptions = {}): Promise<void> {
  const { iova, size } = rangeArgs(r)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  return ch.call(Command.DMA_UNMAP, (token) => ch.native.dmaUnmap(token, iova, size, timeoutMs), options).then(() => {})
}

/** {@link dmaUnmap}, blocking the JavaScript thread. */
export function dmaUnmapSync(ch: Channel, r: DmaRange, options: Omit<CallOptions, 'signal'> = {}): void {
  const { iova, size } = rangeArgs(r)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  ch.traceSync(Command.DMA_UNMAP, () => {
    if (!ch.native.dmaUnmapSync(iova, size, timeoutMs)) throw ch.lastError()
  })
  ch.dmaBuffers.delete(iova)
}

/** DMA_UNMAP of everything (the ALL flag). */
export function dmaUnmapAll(ch: Channel, options: CallOptions = {}): Promise<void> {
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  return ch
    .call(Command.DMA_UNMAP, (token) => ch.native.dmaUnmapAll(token, timeoutMs), options)
    .then(() => ch.dmaBuffers.clear())
}
