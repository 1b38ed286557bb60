import { EventEmitter } from 'node:events'
import type { Readable, Writable } from 'node:stream'
import { watchAbort } from './abort'
import { checkFds, checkInteger, checkPayload, checkTimeout, invalidArg, outOfRange, rejecting } from './args'
import { type Capabilities, toCapabilities } from './capabilities'
import type { CallOptions, Channel, IrqSink } from './channel'
import { Command } from './command'
import { type DeviceInfo, deviceInfo, reset } from './device'
import {
  type DmaMapping,
  type DmaRange,
  dmaMap,
  dmaMapMany,
  dmaMapSync,
  dmaUnmap,
  dmaUnmapAll,
  dmaUnmapSync,
} from './dma'
import { aborted, fromNative, VfioUserError } from './errors'
import { closeAll } from './fds'
import {
  dirtyPages,
  type MigrationFlags,
  type MigrationState,
  migrationFlags,
  migrationState,
  probeFeature,
  setMigrationState,
  startDirtyLogging,
  stopDirtyLogging,
} from './feature'
import {
  type EnableIrqsOptions,
  enableIrqs,
  type Interrupts,
  type IrqInfo,
  irqInfo,
  type SetIrqsOptions,
  setIrqs,
} from './irq'
import { holdLoop, LoopRef } from './liveness'
import { loadState, type StateStreamOptions, saveState } from './migration'
import {
  type NativeClient,
  type NativeError,
  type NativeEvent,
  type NativeReply,
  type NativeVersion,
  native,
} from './native'
import {
  type MapRegionOptions,
  mapRegion,
  type RegionInfo,
  type RegionIoFds,
  type RegionMap,
  type RegionReadOptions,
  type RegionWriteOptions,
  Registers,
  regionInfo,
  regionIoFds,
  regionRead,
  regionReadSync,
  regionWrite,
  regionWriteSync,
} from './region'
import type { Reply } from './reply'
import { traceStart, traceSync } from './tracing'

export type { Reply } from './reply'

/** Options for {@link connect}. */
export interface ConnectOptions {
  /** Default time to wait for any reply, in ms (default 5000). Also bounds connecting. */
  timeoutMs?: number
  /**
   * Never write from the calling thread: every message goes through the outgoing queue and
   * the I/O thread (QEMU's `x-send-queued`). Slower; for tests and special callers.
   */
  sendQueued?: boolean
  /**
   * Most memory, in bytes, held for messages the server has not read yet (our requests, and
   * our replies to its requests), counted with each entry's bookkeeping, not just its wire
   * bytes. Past it, new requests fail with `'ENOBUFS'`, and a server that floods requests
   * without reading our replies is disconnected. Default 256 MiB; at least 64 KiB.
   */
  maxQueuedBytes?: number
}

/** Per-request options. */
export interface SendOptions {
  /** File descriptors to pass with the request (SCM_RIGHTS). They stay yours: duplicates are sent. */
  fds?: number[]
  /** Overrides the client's timeout for this request, in ms. */
  timeoutMs?: number
  /** Rejects the promise with an `AbortError` when aborted (the request itself may still complete on the wire). */
  signal?: AbortSignal
}

/** The events of a {@link VfioUserClient}, and their arguments (`on('closed', …)` does not compile). */
export interface VfioUserClientEvents {
  /** The connection ended, for the reason given; emitted once. */
  close: [reason: VfioUserError]
  /** A DMA request of the server's was answered. */
  dma: [event: DmaEvent]
  /** EventEmitter's own: a listener is about to be added. */
  newListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
  /** EventEmitter's own: a listener was removed. */
  removeListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
}

/** A DMA request of the server's, as the `'dma'` event reports it once it has been answered. */
export interface DmaEvent {
  command: 'DMA_READ' | 'DMA_WRITE'
  address: bigint
  count: number
  /** Set when it was refused: the errno name it was answered with (`'EFAULT'`…). */
  code?: string
  /**
   * Requests served but not reported before this one: reports stop queueing while 4096
   * wait for JavaScript (a busy loop and a server flooding DMA requests).
   */
  missed?: number
}

/** The result of version negotiation. */
export interface VersionInfo {
  major: number
  minor: number
  /** The server's capabilities, spec defaults filled in. */
  capabilities: Capabilities
  /** Accepted oddities: unknown capabilities, clamped values. */
  warnings: string[]
}

interface Waiter {
  /** The request's command (a plain reply arrives without it). */
  command: number
  resolve(r: Reply): void
  reject(e: unknown): void
  /** Stops watching the request's AbortSignal. */
  unwatch?: () => void
}

function toReply(r: NativeReply): Reply {
  return { id: r.id, command: r.command, flags: r.flags, payload: r.payload, fds: r.fds }
}

function toVersion(v: NativeVersion): VersionInfo {
  return { major: v.major, minor: v.minor, capabilities: toCapabilities(v.capabilities), warnings: v.warnings }
}

/** @internal How the per-command modules reach a client's channel. */
export const CHANNEL: unique symbol = Symbol('vfio-user channel')

/**
 * What native code passes with a batch of completions (see `src/batch.rs`): the values of
 * the entries it could not share (a Buffer, null or an event, in entry order), then the
 * events past the shared words' room, flat: `token, id, payload` (null: empty) or
 * `token, 0, event`. Null when there are none.
 */
type NativeBatch = Array<number | Buffer | NativeEvent | null> | null

/**
 * Entries of a batch the shared words hold at most: 3 words each after 2 of head. 64 in
 * flight make batches of up to 64; more come after them as values. Small, since every client
 * has its own and V8 counts them when it decides to collect.
 */
const BATCH_ENTRIES = 256
/** Bytes of small reply payloads a batch shares (each at most 2 KiB; see `src/batch.rs`). */
const BATCH_DATA_BYTES = 8 * 1024
/** A lone payload up to this size is copied out in a loop: no view of the shared bytes made. */
const SMALL_PAYLOAD = 64
/** An entry's length that says its value is the next one of the batch's array. */
const SPECIAL = 0xffff_ffff

/** The payload of every empty plain reply: zero bytes, so sharing it is safe. */
const EMPTY = Buffer.alloc(0)

/**
 * `length` bytes of `from` at `at`, in a pooled Buffer of their own. Up to SMALL_PAYLOAD bytes
 * are copied in a loop: `Buffer#copy` would make a view of the source first, which costs
 * more than copying a few bytes.
 */
function copyOut(from: Uint8Array, at: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length)
  if (length > SMALL_PAYLOAD) {
    out.set(from.subarray(at, at + length))
    return out
  }
  for (let i = 0; i < length; i++) out[i] = from[at + i]
  return out
}

/** Words of the scratch array `sendSync` fills: id, command, flags, fd count, 16 fds. */
const SCRATCH_WORDS = 20
/** Reply payloads up to this size come back from `sendSync` through a reused array. */
const DATA_BYTES = 4096

/**
 * How the native callback reaches its client: weakly while the client is idle, so a client
 * nobody references is garbage-collected (and with it the native connection, its I/O thread
 * and fds); strongly while requests are in flight, so their promises always settle.
 */
interface Link {
  strong?: VfioUserClient
  readonly weak: WeakRef<VfioUserClient>
}

/**
 * A connection to a vfio-user server. Emits `'close'` (with the `VfioUserError` that ended it)
 * once, when the connection ends for any reason; by then everything native it held (socket,
 * I/O thread, eventfd, epoll) has been released. Its order is fixed: the requests the end
 * failed are rejected in the same turn, `'close'` listeners run first, then the rejection
 * handlers (promise reactions), so a listener registered before the requests has always run
 * by the time `Promise.allSettled` of them resolves. Emits `'dma'` ({@link DmaEvent}) after each
 * DMA request of the server's has been answered (natively: a listener only observes).
 */
export class VfioUserClient extends EventEmitter<VfioUserClientEvents> {
  readonly #native: NativeClient
  readonly #path: string
  readonly #waiters = new Map<number, Waiter>()
  /** Memory native code writes into until the event for its token (see `Channel.hold`). */
  readonly #holds = new Map<number, { memory: Uint8Array; release?: () => void }>()
  readonly #link: Link
  /** Where native code lists a batch's entries: count, bytes used, then token, id, length each. */
  readonly #batchWords = new Uint32Array(2 + 3 * BATCH_ENTRIES)
  /** Where it copies their payloads, back to back. */
  readonly #batchData = new Uint8Array(BATCH_DATA_BYTES)
  /** Inside `#deliver`: a nested delivery must not read the shared words (they are not its). */
  #delivering = false
  /** Where the native `sendSync` leaves a reply's id, command, flags, fd count and fds. */
  readonly #scratch = new Uint32Array(SCRATCH_WORDS)
  /** Where it copies a small reply payload, which is then copied into a pooled Buffer. */
  readonly #data = Buffer.alloc(DATA_BYTES)
  #nextToken = 1
  #channel?: Channel
  #deviceInfo?: DeviceInfo
  readonly #irqGroups = new Map<number, IrqSink>()
  readonly #regionMaps = new Set<{ unmap(): void }>()
  readonly #dmaBuffers = new Map<bigint, Uint8Array>()
  #version?: Promise<VersionInfo>
  #versionInfo?: VersionInfo
  #closed?: VfioUserError
  /** Releases the event loop's hold taken while something is awaited (see #updateHold). */
  #busy?: () => void
  /** The event loop hold `ref()` takes. */
  readonly #loop = new LoopRef()
  #closing = false
  #closeEmitted = false
  readonly #closedPromise: Promise<void>
  #onClosed!: () => void

  /** @internal Use {@link connect}. */
  constructor(nativeClient: NativeClient, path: string) {
    super()
    this.#native = nativeClient
    this.#path = path
    this.#closedPromise = new Promise((resolve) => {
      this.#onClosed = resolve
    })
    this.#link = { weak: new WeakRef(this) }
    this.#native.start(VfioUserClient.#router(this.#link), this.#batchWords, this.#batchData, this.#scratch, this.#data)
    // Served DMA requests are reported only while someone listens.
    this.on('newListener', (name) => {
      if (name === 'dma' && this.listenerCount('dma') === 0 && !this.#closeEmitted) this.#native.observeDma(true)
    })
    this.on('removeListener', (name) => {
      if (name === 'dma' && this.listenerCount('dma') === 0 && !this.#closeEmitted) this.#native.observeDma(false)
    })
  }

  /**
   * The native callback. Made in a static method so that it captures only `link`, never the
   * client (a closure made in the constructor would share its context, `this` included).
   */
  static #router(link: Link): (batch: NativeBatch) => void {
    return (events) => {
      const client = link.strong ?? link.weak.deref()
      if (client) client.#deliver(events)
    }
  }

  /** The socket path this client is connected to. */
  get path(): string {
    return this.#path
  }

  /** True once the connection has ended. */
  get closed(): boolean {
    return this.#closed !== undefined || this.#native.closed
  }

  /** Requests sent whose promise has not settled yet. */
  get inFlight(): number {
    return this.#waiters.size
  }

  /**
   * Negotiates the protocol version (VERSION must come first; no other request is sent
   * until this succeeds). Calling it again returns the same promise.
   * @throws {VfioUserError} `'EPROTO'` naming the broken rule, or the errno the server replied with.
   */
  validateVersion(): Promise<VersionInfo> {
    this.#version ??= new Promise<Reply>((resolve, reject) => {
      const token = this.#token()
      const refused = this.#native.negotiate(token)
      if (refused) return reject(fromNative(refused, this.#path))
      this.#track(token, { command: Command.VERSION, resolve, reject })
    }).then(() => {
      // Kept at the close when the connection ended in the same batch as the reply (a server
      // that floods right after negotiating): the native side is gone by now.
      if (this.#versionInfo) return this.#versionInfo
      const v = this.#native.version()
      if (!v) throw new VfioUserError('EPROTO', 71, 'VERSION reply was not recorded', Command.VERSION, this.#path)
      this.#versionInfo = toVersion(v)
      return this.#versionInfo
    })
    return this.#version
  }

  /** The negotiated version, once {@link validateVersion} has succeeded. */
  get version(): VersionInfo | undefined {
    if (this.#versionInfo) return this.#versionInfo
    const v = this.#native.version()
    if (v) this.#versionInfo = toVersion(v)
    return this.#versionInfo
  }

  /**
   * Sends a request and resolves with its reply. Many may be in flight at once.
   * @param command a {@link Command} number
   * @param payload the bytes after the 16-byte header
   * @throws {TypeError|RangeError} (rejection, Node's `ERR_*` code) for bad arguments; nothing is sent.
   * @throws {VfioUserError} (rejection) `'ETIMEDOUT'`, `'ECONNRESET'` when the connection ends,
   *   `'EPROTO'` for a malformed reply, `'EAGAIN'` when every message id waits for a reply,
   *   `'E2BIG'` for a transfer larger than the server accepts, or the server's errno
   *   (`'EIO'` when it gave none).
   */
  sendWait(command: number, payload: Uint8Array, options: SendOptions = {}): Promise<Reply> {
    return rejecting(() => this.#sendWait(command, payload, options))
  }

  #sendWait(command: number, payload: Uint8Array, options: SendOptions): Promise<Reply> {
    const args = this.#check(command, payload, options)
    return this.#call(
      command,
      (token) => this.#native.send(token, command, args.payload, args.fds, args.timeoutMs),
      options,
    )
  }

  /**
   * Starts a native call whose completion is a reply event for its token, and settles one
   * promise with the reply in its final shape.
   */
  #call(command: number, start: (token: number) => NativeError | null, options: CallOptions): Promise<Reply> {
    const { signal } = options
    if (signal !== undefined && !(signal instanceof AbortSignal)) {
      throw invalidArg('signal must be an AbortSignal')
    }
    if (signal?.aborted) return Promise.reject(aborted(signal))
    return new Promise<Reply>((resolve, reject) => {
      const token = this.#token()
      const end = traceStart(this.#path, command)
      let refused: NativeError | null
      try {
        refused = start(token)
      } catch (e) {
        end?.(undefined, e)
        throw e
      }
      if (refused) {
        // Refused before sending (a closed connection, a bad fd): still the call's command.
        const e = fromNative({ ...refused, command: refused.command ?? command }, this.#path)
        end?.(undefined, e)
        return reject(e)
      }
      const waiter: Waiter = end
        ? {
            command,
            resolve: (r) => {
              end(r)
              resolve(r)
            },
            reject: (e) => {
              end(undefined, e)
              reject(e)
            },
          }
        : { command, resolve, reject }
      if (signal) {
        // The request itself may still complete on the wire; its reply is then dropped
        // (and any fds it carried closed).
        waiter.unwatch = watchAbort(signal, () => {
          // A read into the caller's memory stops writing into it before the caller hears of
          // the abort (its event still comes, and releases the memory's hold).
          if (this.#holds.has(token)) this.#native.cancelRead(token)
          if (this.#waiters.delete(token)) this.#settled()
          waiter.reject(aborted(signal))
        })
      }
      this.#track(token, waiter)
    })
  }

  /** Sends are corked until the current JavaScript job ends (see `Channel.corkTick`). */
  #corked = false

  /** @internal The connection as device.ts, region.ts and irq.ts use it. */
  get [CHANNEL](): Channel {
    this.#channel ??= {
      native: this.#native,
      send: (command, payload, options) => this.sendWait(command, payload, options),
      call: (command, start, options = {}) => this.#call(command, start, options),
      hold: (token, memory, release) => {
        this.#holds.set(token, { memory, release })
        if (this.#holds.size === 1) this.#updateHold()
      },
      lastError: () =>
        fromNative(this.#native.takeError() ?? { errno: 0, code: 'EIO', message: 'no reply' }, this.#path),
      error: (e) => fromNative(e, this.#path),
      irqGroups: this.#irqGroups,
      regions: { sizes: new Map() },
      irqCounts: new Map(),
      regionMaps: this.#regionMaps,
      dmaBuffers: this.#dmaBuffers,
      maxDataXferSize: () => this.version?.capabilities.maxDataXferSize ?? 1048576,
      traceSync: (command, call) => traceSync(this.#path, command, call),
      tracePosted: (command) => {
        traceStart(this.#path, command, true)
      },
      corkTick: () => {
        if (this.#corked) return
        this.#corked = true
        this.#native.cork()
        queueMicrotask(() => {
          this.#corked = false
          this.#native.uncork()
        })
      },
    }
    return this.#channel
  }

  /**
   * Sends a request and blocks the JavaScript thread until its reply (a timed wait in Rust).
   * The lowest-latency call; use it where blocking the event loop is acceptable.
   * @throws {TypeError|RangeError} for bad arguments; nothing is sent.
   * @throws {VfioUserError} as {@link sendWait} rejects.
   */
  sendWaitSync(command: number, payload: Uint8Array, options: Omit<SendOptions, 'signal'> = {}): Reply {
    const args = this.#check(command, payload, options)
    const end = traceStart(this.#path, command)
    if (!end) return this.#sendSync(command, args)
    try {
      const reply = this.#sendSync(command, args)
      end(reply)
      return reply
    } catch (e) {
      end(undefined, e)
      throw e
    }
  }

  #sendSync(
    command: number,
    args: { payload: Buffer; fds: number[] | undefined; timeoutMs: number | undefined },
  ): Reply {
    const r = this.#native.sendSync(command, args.payload, args.fds, args.timeoutMs)
    if (r == null) {
      throw fromNative(this.#native.takeError() ?? { errno: 0, code: 'EIO', message: 'no reply' }, this.#path)
    }
    let body: Buffer
    if (typeof r === 'number') {
      body = copyOut(this.#data, 0, r)
    } else {
      body = r
    }
    const s = this.#scratch
    const fds = s[3] === 0 ? [] : Array.from(s.subarray(4, 4 + (s[3] as number)))
    return { id: s[0] as number, command: s[1] as number, flags: s[2] as number, payload: body, fds }
  }

  /**
   * Sends a posted request (the `No_reply` flag): the server processes it in order but sends
   * no reply, so a later request's reply proves it was done. QEMU uses this for posted
   * writes; it is only safe while no region is mmapped.
   * @throws {TypeError|RangeError} for bad arguments; nothing is sent.
   * @throws {VfioUserError} if it could not be sent (`'ENOTCONN'` before validateVersion, `'ECONNRESET'`…).
   */
  post(command: number, payload: Uint8Array, options: Pick<SendOptions, 'fds'> = {}): void {
    const args = this.#check(command, payload, options)
    const refused = this.#native.post(command, args.payload, args.fds)
    if (refused) throw fromNative(refused, this.#path)
    traceStart(this.#path, command, true)
  }

  /**
   * DEVICE_GET_INFO: the device's flags (reset support, PCI), region and irq counts.
   * @throws {VfioUserError} (rejection) `'EPROTO'` for a reply that breaks the protocol or
   *   claims more than 100 regions or 50 irq indexes; otherwise as {@link sendWait}.
   */
  deviceInfo(options: CallOptions = {}): Promise<DeviceInfo> {
    return rejecting(() => deviceInfo(this[CHANNEL], options)).then((info) => {
      this.#deviceInfo = info
      return info
    })
  }

  /**
   * DEVICE_RESET. Asks {@link deviceInfo} first unless it has been asked already.
   * @throws {VfioUserError} (rejection) `'ENOTSUP'` when the device did not report reset
   *   support; otherwise as {@link sendWait}.
   */
  async reset(options: CallOptions = {}): Promise<void> {
    const info = this.#deviceInfo ?? (await this.deviceInfo(options))
    await reset(this[CHANNEL], info, options)
  }

  /**
   * DEVICE_GET_REGION_INFO for region `index`: flags, size, mmap offset, sparse areas, type,
   * and the region's fd when the server sent one (owned by the result: close it with
   * `close()`, or take it with `takeFd()`). Asks again with more room when the server needs it.
   * @throws {RangeError} (rejection, `'ERR_OUT_OF_RANGE'`) for a bad index, before anything is sent.
   * @throws {VfioUserError} (rejection) `'EPROTO'` for a capability chain that loops, overlaps
   *   or points outside the reply, or a sparse area past the region; otherwise as {@link sendWait}.
   */
  regionInfo(index: number, options: CallOptions = {}): Promise<RegionInfo> {
    return rejecting(() => regionInfo(this[CHANNEL], index, options))
  }

  /**
   * REGION_READ of `length` bytes at `offset` of region `index`, split into pieces of the
   * server's `maxDataXferSize` sent pipelined; every echoed offset, region and count is checked.
   * With `into`, the data lands straight in that memory and the result is a Buffer over it:
   * repeated large reads then allocate nothing.
   * @throws {TypeError|RangeError} (rejection; thrown by the Sync call) for bad arguments (a length of 0 or over 2^32 - 1, an offset
   *   past 2^64, an `into` smaller than `length` or detached), before anything is sent.
   * @throws {RangeError} (rejection, `code` `'ERR_OUT_OF_RANGE'`) for what the server already
   *   said it would refuse, before anything is sent: an `index` at or past the `numRegions` of
   *   a {@link deviceInfo} read on this connection, or bytes past the `size` of a
   *   {@link regionInfo} read of that region. The `*Sync` calls throw it.
   * @throws {VfioUserError} (rejection) `'EPROTO'` for a short or mismatched echo; otherwise as
   *   {@link sendWait}.
   */
  regionRead(
    index: number,
    offset: number | bigint,
    length: number | bigint,
    options: RegionReadOptions = {},
  ): Promise<Buffer> {
    return rejecting(() => regionRead(this[CHANNEL], index, offset, length, options))
  }

  /** {@link regionRead}, blocking the JavaScript thread (the fastest way to read a register). */
  regionReadSync(
    index: number,
    offset: number | bigint,
    length: number | bigint,
    options: Omit<RegionReadOptions, 'signal'> = {},
  ): Buffer {
    return regionReadSync(this[CHANNEL], index, offset, length, options)
  }

  /**
   * REGION_WRITE of `data` at `offset` of region `index`, split and checked like
   * {@link regionRead}. With `posted`, sent as posted writes (No_reply) and resolved once sent.
   * @throws {TypeError|RangeError} (rejection; thrown by the Sync call) for bad arguments (empty or detached data), before anything is sent.
   * @throws {RangeError} (rejection, `'ERR_OUT_OF_RANGE'`) past the known regions or a region's
   *   end, as {@link regionRead}.
   * @throws {VfioUserError} (rejection) as {@link regionRead}.
   */
  regionWrite(
    index: number,
    offset: number | bigint,
    data: Uint8Array,
    options: RegionWriteOptions = {},
  ): Promise<void> {
    return rejecting(() => regionWrite(this[CHANNEL], index, offset, data, options))
  }

  /**
   * Little-endian register access to region `index`: `read32(offset)`, `write64(offset,
   * value)`, … and their `*Sync` twins, each one REGION_READ or REGION_WRITE of that width.
   * @throws {RangeError} for a bad index.
   */
  registers(index: number): Registers {
    return new Registers(this[CHANNEL], index)
  }

  /** {@link regionWrite} (not posted), blocking the JavaScript thread. */
  regionWriteSync(
    index: number,
    offset: number | bigint,
    data: Uint8Array,
    options: Omit<CallOptions, 'signal'> = {},
  ): void {
    regionWriteSync(this[CHANNEL], index, offset, data, options)
  }

  /**
   * DMA_MAP: offers the device a range of {@link DmaMemory} at `iova` (its fd goes with the
   * map, so the server can mmap it; the server's DMA_READ/DMA_WRITE to the range are served
   * from the same memory, on the native side, with no JavaScript involved).
   * @throws {TypeError|RangeError} (rejection; thrown by the Sync call) for bad arguments, before anything is sent.
   * @throws {VfioUserError} `'EINVAL'` (not aligned to the server's page size), `'EEXIST'`
   *   (overlaps a map), `'ENOSPC'` (the server's `maxDmaMaps` reached), all before sending;
   *   (rejection) the server's errno.
   */
  dmaMap(mapping: DmaMapping, options: CallOptions = {}): Promise<void> {
    return rejecting(() => dmaMap(this[CHANNEL], mapping, options))
  }

  /** {@link dmaMap}, blocking the JavaScript thread. */
  dmaMapSync(mapping: DmaMapping, options: Omit<CallOptions, 'signal'> = {}): void {
    dmaMapSync(this[CHANNEL], mapping, options)
  }

  /** Sends every mapping at once (pipelined) and settles when the last reply arrives. */
  dmaMapMany(mappings: DmaMapping[], options: CallOptions = {}): Promise<void> {
    return rejecting(() => dmaMapMany(this[CHANNEL], mappings, options))
  }

  /**
   * DMA_UNMAP of a range mapped earlier: `iova` and `size` must match a map exactly.
   * @throws {VfioUserError} `'EINVAL'` before sending when no map matches.
   */
  dmaUnmap(range: DmaRange, options: CallOptions = {}): Promise<void> {
    return rejecting(() => dmaUnmap(this[CHANNEL], range, options))
  }

  /** {@link dmaUnmap}, blocking the JavaScript thread. */
  dmaUnmapSync(range: DmaRange, options: Omit<CallOptions, 'signal'> = {}): void {
    dmaUnmapSync(this[CHANNEL], range, options)
  }

  /** DMA_UNMAP of every range (the ALL flag). */
  dmaUnmapAll(options: CallOptions = {}): Promise<void> {
    return rejecting(() => dmaUnmapAll(this[CHANNEL], options))
  }

  /** How many DMA ranges are mapped (or being mapped) now. */
  get dmaMaps(): number {
    return this.#native.dmaMaps
  }

  /**
   * DEVICE_GET_REGION_IO_FDS for region `index`: the sub-regions served by ioeventfds or
   * ioregionfds, decoded from the spec's 40-byte records or libvfio-user's 48-byte ones, each
   * checked against the region and the fds that came (owned by the result).
   * @throws {VfioUserError} (rejection) `'EPROTO'` for records that do not divide evenly, lie
   *   outside the region or name an fd that did not come.
   */
  regionIoFds(index: number, options: CallOptions = {}): Promise<RegionIoFds> {
    return rejecting(() => regionIoFds(this[CHANNEL], index, options))
  }

  /**
   * Maps region `index` into this process from the fd its region info carries: its sparse
   * areas (or the whole region) as Buffers over device memory, so reads and writes through
   * them send no message. Unmapped by `unmap()`, `using`, or `close()`; the Buffers then read
   * as empty. While a region is mapped, posted writes are refused (QEMU's ordering rule).
   * An fd that is a regular file must hold every area (else `'EINVAL'`: touching the rest
   * would be SIGBUS), and be sealed against shrinking unless `allowShrinkable` (else `'EPERM'`).
   * @throws {VfioUserError} (rejection) `'ENODEV'` when the region cannot be mmapped or no fd
   *   came, `'EINVAL'`, `'EPERM'` as above.
   */
  mapRegion(index: number, options: MapRegionOptions = {}): Promise<RegionMap> {
    return rejecting(() => mapRegion(this[CHANNEL], index, options))
  }

  /** DEVICE_FEATURE calls: `probe(index, { get, set })` says whether the device supports them. */
  get deviceFeature(): {
    probe(index: number, methods: { get?: boolean; set?: boolean }, options?: CallOptions): Promise<boolean>
  } {
    const ch = this[CHANNEL]
    return { probe: (index, methods, options) => rejecting(() => probeFeature(ch, index, methods, options)) }
  }

  /**
   * The MIGRATION feature's flags: `{ stopCopy, p2p, preCopy, flags }`.
   * @throws {VfioUserError} (rejection) `'ENOTSUP'` when the device has no migration.
   */
  migrationFlags(options: CallOptions = {}): Promise<MigrationFlags> {
    return rejecting(() => migrationFlags(this[CHANNEL], options))
  }

  /** The device's migration state. */
  migrationState(options: CallOptions = {}): Promise<MigrationState> {
    return rejecting(() => migrationState(this[CHANNEL], options))
  }

  /**
   * Moves the device to migration state `target` by the shortest path of allowed arcs that
   * passes through no saving state, checking each step.
   * @throws {VfioUserError} (rejection) `'EPROTO'` when the device lands elsewhere (its
   *   `state` says where); a RangeError for a forbidden transition, before anything is set.
   */
  setMigrationState(target: MigrationState, options: CallOptions = {}): Promise<MigrationState> {
    return rejecting(() => setMigrationState(this[CHANNEL], target, options))
  }

  /**
   * The device's state as a Readable of MIG_DATA_READ chunks (PRE_COPY or STOP_COPY); it ends
   * when the device returns less than asked. Works with `stream.pipeline` and `signal`.
   */
  saveState(options: StateStreamOptions = {}): Readable {
    return saveState(this[CHANNEL], options)
  }

  /** A Writable that loads the device's state with MIG_DATA_WRITE (RESUMING). */
  loadState(options: StateStreamOptions = {}): Writable {
    return loadState(this[CHANNEL], options)
  }

  /**
   * Starts dirty-page tracking (DMA_LOGGING_START) of `ranges` (none: everything) in pages of
   * `pageSize`; resolves with the page size the device chose.
   */
  startDirtyLogging(
    options: CallOptions & {
      pageSize: number | bigint
      ranges?: Array<{ iova: number | bigint; length: number | bigint }>
    },
  ): Promise<{ pageSize: bigint }> {
    return rejecting(() => startDirtyLogging(this[CHANNEL], options))
  }

  /**
   * The pages written since the last report in [iova, iova + length), as merged ranges
   * (DMA_LOGGING_REPORT; bit i of word i/64 is page i, a bit past the range is `EPROTO`).
   */
  dirtyPages(
    options: CallOptions & { iova: number | bigint; length: number | bigint; pageSize: number | bigint },
  ): Promise<Array<{ iova: bigint; length: bigint }>> {
    return rejecting(() => dirtyPages(this[CHANNEL], options))
  }

  /** Stops dirty-page tracking (DMA_LOGGING_STOP). */
  stopDirtyLogging(options: CallOptions = {}): Promise<void> {
    return rejecting(() => stopDirtyLogging(this[CHANNEL], options))
  }

  /**
   * DEVICE_GET_IRQ_INFO for irq index `index` (PCI: 0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ).
   * @throws {VfioUserError} (rejection) `'EPROTO'` when the reply is for another index.
   */
  irqInfo(index: number, options: CallOptions = {}): Promise<IrqInfo> {
    return rejecting(() => irqInfo(this[CHANNEL], index, options))
  }

  /**
   * Wires vectors [start, start + count) of irq `index` to eventfds made natively (sent in
   * chunks of the server's `maxMsgFds`) and resolves with an {@link Interrupts}: an
   * EventEmitter of `'irq'` events `{ index, vector, count }` (signals coalesced, read off the
   * JS thread, kept per vector until a listener, an iterator or `wait()` takes them), an
   * async iterator of the same, `wait()`, `ref()`/`unref()`, the eventfds, and `disable()`.
   * @throws {RangeError} (rejection) for a bad index or range, before anything is sent.
   * @throws {RangeError} (rejection, `'ERR_OUT_OF_RANGE'`) for vectors past the count an
   *   {@link irqInfo} of that index reported on this connection, before anything is sent.
   */
  enableIrqs(index: number, options: EnableIrqsOptions = {}): Promise<Interrupts> {
    return rejecting(() => enableIrqs(this[CHANNEL], index, options))
  }

  /** DEVICE_SET_IRQS with a raw action: mask, unmask or trigger, with no data or a bool per vector. */
  setIrqs(index: number, options: SetIrqsOptions): Promise<void> {
    return rejecting(() => setIrqs(this[CHANNEL], index, options))
  }

  /**
   * Closes the connection. Requests still in flight reject with `'ECONNABORTED'`; resolves
   * once every promise has settled and `'close'` has been emitted. Idempotent.
   */
  close(): Promise<void> {
    if (!this.#closeEmitted) {
      // Keep the loop alive, and this client reachable, until the close event arrives.
      this.#closing = true
      this.#updateHold()
      this.#native.close()
    }
    return this.#closedPromise
  }

  /**
   * Keeps Node running while this connection is open, as a socket does: for a daemon that
   * serves a device's DMA or waits for its interrupts with nothing else pending. By default
   * an idle client does not keep Node running (a request in flight always does). Undone by
   * {@link unref} or the connection's end. Returns the client.
   */
  ref(): this {
    if (!this.#closeEmitted) this.#loop.ref()
    return this
  }

  /** Undoes {@link ref}: an idle client no longer keeps Node running. Returns the client. */
  unref(): this {
    this.#loop.unref()
    return this
  }

  /** Closes the connection (for `await using`). */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }

  #check(command: number, payload: Uint8Array, options: Omit<SendOptions, 'signal'>) {
    checkInteger('command', command, 1, 0xffff)
    if (command === Command.VERSION) throw outOfRange('VERSION is sent by validateVersion()')
    if (command === Command.DMA_READ || command === Command.DMA_WRITE) {
      throw outOfRange(`command ${command} travels from server to client and cannot be sent`)
    }
    if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
    return {
      payload: checkPayload(payload),
      fds: checkFds(options.fds),
      timeoutMs: checkTimeout('timeoutMs', options.timeoutMs),
    }
  }

  #token(): number {
    const t = this.#nextToken
    this.#nextToken = t >= 0xffff_fffe ? 1 : t + 1
    return t
  }

  #track(token: number, w: Waiter): void {
    this.#waiters.set(token, w)
    if (this.#waiters.size === 1) this.#updateHold()
  }

  #settled(): void {
    if (this.#waiters.size === 0 && this.#holds.size === 0) this.#updateHold()
  }

  /** Holds the event loop and a strong link while anything is awaited from native code. */
  #updateHold(): void {
    // Held memory keeps the client reachable too: native code may still write into it.
    const want = !this.#closeEmitted && (this.#waiters.size > 0 || this.#holds.size > 0 || this.#closing)
    if (want === (this.#link.strong !== undefined)) return
    if (want) {
      // The event loop stays alive while any request is in flight or any close is under way
      // (liveness.ts): an idle client does not hold `node` open.
      this.#link.strong = this
      this.#busy = holdLoop()
    } else {
      this.#link.strong = undefined
      this.#busy?.()
      this.#busy = undefined
    }
  }

  /** Resolves the waiter of `token`, if any, with a plain reply: flags 1, no fds. */
  #settlePlain(token: number, id: number, payload: Buffer): void {
    if (this.#holds.size > 0) this.#release(token)
    const w = this.#waiters.get(token)
    if (!w) return
    this.#waiters.delete(token)
    w.unwatch?.()
    w.resolve({ id, command: w.command, flags: 1, payload, fds: [] })
  }

  /** Native code no longer writes into the memory held for `token`. */
  #release(token: number): void {
    this.#holds.get(token)?.release?.()
    this.#holds.delete(token)
  }

  /** Settles one event that came as a value: a plain reply's payload (null: empty), or an event. */
  #settle(token: number, id: number, value: Buffer | NativeEvent | null): void {
    if (value === null || value instanceof Uint8Array) {
      this.#settlePlain(token, id, value === null ? EMPTY : value)
      return
    }
    if (this.#holds.size > 0) this.#release(token)
    const e = value
    if (e.dma) {
      const d = e.dma
      const event: DmaEvent = { command: d.write ? 'DMA_WRITE' : 'DMA_READ', address: d.address, count: d.count }
      if (d.code) event.code = d.code
      if (d.missed > 0) event.missed = d.missed
      this.emit('dma', event)
      return
    }
    if (e.irq) {
      this.#irqGroups.get(e.irq.group)?.fire(e.irq.vector, e.irq.count)
      return
    }
    if (e.closed) {
      this.#closed = fromNative(e.closed, this.#path)
      return
    }
    const w = this.#waiters.get(e.token)
    if (!w) {
      // Aborted by the caller: nobody wants it, but fds received are still ours to close.
      closeAll(e.reply?.fds ?? [])
      return
    }
    this.#waiters.delete(e.token)
    w.unwatch?.()
    if (e.reply) w.resolve(toReply(e.reply))
    else w.reject(fromNative(e.error ?? { errno: 0, code: 'EIO', message: 'request failed' }, this.#path))
  }

  /** Settles what a batch from native code says: see `src/batch.rs` for its layout. */
  #deliver(values: NativeBatch): void {
    const w = this.#batchWords
    // A batch converted while this runs (from a listener) leaves the words alone.
    const entries = this.#delivering ? 0 : w[0]
    let v = 0
    if (entries > 0) {
      this.#delivering = true
      try {
        // A lone small payload is copied out byte by byte into a pooled Buffer; otherwise one
        // pooled copy of every shared payload is made, and each reply views its part.
        const used = w[1]
        const data = this.#batchData
        const bytes = used > SMALL_PAYLOAD || entries > 1 ? Buffer.from(data.subarray(0, used)) : undefined
        let at = 0
        for (let k = 2, end = 2 + 3 * entries; k < end; k += 3) {
          const length = w[k + 2]
          if (length === SPECIAL) {
            this.#settle(w[k], w[k + 1], (values as NonNullable<NativeBatch>)[v++] as Buffer | NativeEvent | null)
            continue
          }
          let payload: Buffer = EMPTY
          if (length > 0 && bytes) payload = Buffer.from(bytes.buffer, bytes.byteOffset + at, length)
          else if (length > 0) payload = copyOut(data, at, length)
          at += length
          this.#settlePlain(w[k], w[k + 1], payload)
        }
      } finally {
        w[0] = 0
        this.#delivering = false
      }
    }
    if (values !== null) {
      for (let i = v; i < values.length; i += 3) {
        this.#settle(values[i] as number, values[i + 1] as number, values[i + 2] as Buffer | NativeEvent | null)
      }
    }
    if (this.#closed) {
      // The native side fails everything before it reports the close; this only guards
      // against a promise that could otherwise never settle.
      for (const w of this.#waiters.values()) {
        w.unwatch?.()
        w.reject(this.#closed)
      }
      this.#waiters.clear()
    }
    if (this.#closed && !this.#closeEmitted) {
      // Kept: the negotiated version outlives the native side.
      if (!this.#versionInfo && this.#version) this.#versionInfo = this.version
      // Nothing more can come: let go of the socket, eventfd, epoll and I/O thread now.
      this.#native.release()
      for (const g of this.#irqGroups.values()) g.end()
      this.#irqGroups.clear()
      for (const m of [...this.#regionMaps]) m.unmap()
      // Nothing is served any more: the Buffers behind fd-less DMA ranges may go, and every
      // read was settled (its memory revoked) before the close was reported.
      this.#dmaBuffers.clear()
      for (const h of this.#holds.values()) h.release?.()
      this.#holds.clear()
      this.#closeEmitted = true
      this.#updateHold()
      this.unref()
      this.emit('close', this.#closed)
      this.#onClosed()
      return
    }
    this.#settled()
  }
}

/** A socket already connected to a vfio-user server, for {@link connect}. */
export interface ConnectedSocket {
  /**
   * Its file descriptor: an AF_UNIX stream socket, connected (QEMU's `socket.fd=`, socket
   * activation, a socketpair you made). It stays yours: the client works on a duplicate, so
   * close yours when you no longer need it, and stop using it: the duplicate shares the
   * socket (and its status flags), which the client makes blocking, and every byte read
   * through yours is lost to the client.
   */
  fd: number
}

/**
 * Connects to a vfio-user server's UNIX socket at `path`, or takes over one already connected
 * (`{ fd }`).
 * @throws {TypeError|RangeError} (rejection) for bad arguments.
 * @throws {VfioUserError} (rejection) `'ENOENT'`, `'ECONNREFUSED'`, `'EACCES'`… with the path in
 *   the message; for `{ fd }`, `'EBADF'`, `'ENOTSOCK'`, `'EPROTOTYPE'` (not a stream),
 *   `'EAFNOSUPPORT'` (not AF_UNIX) or `'ENOTCONN'`, naming the fd.
 */
export async function connect(path: string | ConnectedSocket, options: ConnectOptions = {}): Promise<VfioUserClient> {
  if (path === null || (typeof path !== 'string' && typeof path !== 'object')) {
    throw invalidArg(`path must be a string or { fd }, got ${path === null ? 'null' : typeof path}`)
  }
  if (typeof path === 'string' && path.length === 0) throw outOfRange('path must not be empty')
  if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs) ?? 5000
  if (options.sendQueued !== undefined && typeof options.sendQueued !== 'boolean') {
    throw invalidArg('sendQueued must be a boolean')
  }
  const maxQueuedBytes =
    options.maxQueuedBytes === undefined
      ? undefined
      : checkInteger('maxQueuedBytes', options.maxQueuedBytes, 64 * 1024, Number.MAX_SAFE_INTEGER)
  const settings = { timeoutMs, sendQueued: options.sendQueued ?? false, maxQueuedBytes }
  if (typeof path === 'object') {
    const fd = checkInteger('fd', path.fd, 0, 0x7fff_ffff)
    const r = native.connectFd(fd, settings)
    if ('errno' in r) throw fromNative(r, `fd:${fd}`)
    return new VfioUserClient(r, `fd:${fd}`)
  }
  const r = await native.connect(path, settings)
  if ('errno' in r) throw fromNative(r)
  return new VfioUserClient(r, path)
}
