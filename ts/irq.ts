// DEVICE_GET_IRQ_INFO as a typed call (protocol.md 3.6). The bytes are encoded and decoded by
// the proto crate's irq.rs, through the binding's irq.rs.
import { EventEmitter } from 'node:events'
import { watchAbort } from './abort'
import { checkFds, checkInteger, checkTimeout, invalidArg, outOfRange, rejecting } from './args'
import type { CallOptions, Channel, IrqSink } from './channel'
import { Command } from './command'
import { aborted, fromNative, VfioUserError } from './errors'
import { untilEnd } from './iterate'
import { holdLoop, LoopRef } from './liveness'
import { native } from './native'

/** One `'irq'` event: vector `vector` of irq `index` fired `count` times since the last event. */
export interface IrqEvent {
  index: number
  vector: number
  count: number
}

/** Options of {@link enableIrqs}. */
export interface EnableIrqsOptions extends CallOptions {
  /** First vector (default 0). */
  start?: number
  /** Vectors (default 1; with `fds`, their number). */
  count?: number
  /**
   * Read the eventfds here and emit `'irq'` events (default true). With false the library
   * makes them and wires them but never reads them, so they can go to KVM as irqfds with no
   * second reader racing it.
   */
  watch?: boolean
  /**
   * Your own eventfds, one per vector from `start`: wired as they are (duplicates are sent
   * and kept), never read here; they stay yours to close.
   */
  fds?: number[]
}

/** Options of {@link setIrqs}. */
export interface SetIrqsOptions extends CallOptions {
  action: 'mask' | 'unmask' | 'trigger'
  start?: number
  count?: number
  /** One value per vector (DATA_BOOL); without it, DATA_NONE. */
  data?: boolean[]
}

const DATA_NONE = 1
const DATA_BOOL = 2
const ACTIONS = { mask: 0x08, unmask: 0x10, trigger: 0x20 } as const

/** The events of {@link Interrupts}, and their arguments (`on('irqq', …)` does not compile). */
export interface InterruptsEvents {
  /** A vector fired, `count` times since it was last taken. */
  irq: [event: IrqEvent]
  /** Disabled, or the connection ended; emitted once. */
  end: []
  /** EventEmitter's own: a listener is about to be added. */
  newListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
  /** EventEmitter's own: a listener was removed. */
  removeListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
}

/** Options of {@link Interrupts.wait}. */
export interface WaitIrqOptions {
  /** Only this vector (default: any of the group's). */
  vector?: number
  /** Reject with `'ETIMEDOUT'` after this many ms (default: wait as long as it takes). */
  timeoutMs?: number
  /** Reject with an `AbortError` when aborted. */
  signal?: AbortSignal
}

/** A {@link Interrupts.wait} in progress. */
interface Waiter {
  vector: number | undefined
  resolve: (e: IrqEvent) => void
  reject: (e: Error) => void
}

/**
 * Vectors wired to eventfds. Emits `'irq'` ({@link IrqEvent}) as the device signals them,
 * and `'end'` once they are disabled or the connection ends; `for await` yields the same
 * events until then, and {@link Interrupts.wait} takes the next one.
 *
 * Nothing is lost while nobody listens: as an eventfd keeps its count until it is read, each
 * vector's signals are counted (coalesced) until an `'irq'` listener, an iterator or a `wait`
 * takes them, and handed to the first of those to come. Holding it does not keep Node running
 * unless {@link Interrupts.ref} was called; a pending `wait` always does.
 */
export class Interrupts extends EventEmitter<InterruptsEvents> {
  /** The irq index (PCI: 0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ). */
  readonly index: number
  /** The first vector wired. */
  readonly start: number
  /** How many vectors are wired, from `start`. */
  readonly count: number
  /**
   * The eventfds, one per vector from `start` (for a caller who hands them to KVM). Those the
   * library made are closed by `disable()`; your own (`fds` given) stay yours.
   */
  readonly fds: readonly number[]
  /** Whether the library reads the eventfds (false with `watch: false` or your own `fds`): no events, no `wait`. */
  readonly watched: boolean
  #ch: Channel
  #group: number
  #ended = false
  /** Signals counted per vector while nobody took them. */
  readonly #kept = new Map<number, number>()
  readonly #waiters = new Set<Waiter>()
  /** The event loop hold `ref()` takes. */
  readonly #loop = new LoopRef()

  /** @internal Built by {@link enableIrqs}. */
  constructor(ch: Channel, group: number, index: number, start: number, fds: number[], watched: boolean) {
    super()
    this.watched = watched
    this.#ch = ch
    this.#group = group
    this.index = index
    this.start = start
    this.count = fds.length
    this.fds = Object.freeze([...fds])
    // A listener that comes later takes what was kept, once it is in place.
    this.on('newListener', (name) => {
      if (name === 'irq') queueMicrotask(() => this.#flush())
    })
  }

  /** @internal The sink the client routes this group's events to. */
  get sink(): IrqSink {
    return {
      fire: (vector, count) => this.#fire(vector, count),
      end: () => this.#end(),
    }
  }

  /** Hands `count` signals of `vector` to whoever takes them, or keeps them. */
  #fire(vector: number, count: number): void {
    const total = (this.#kept.get(vector) ?? 0) + count
    this.#kept.delete(vector)
    const event: IrqEvent = { index: this.index, vector, count: total }
    let taken = false
    for (const w of this.#waiters) {
      if (w.vector !== undefined && w.vector !== vector) continue
      this.#waiters.delete(w)
      w.resolve(event)
      taken = true
      break
    }
    if (this.listenerCount('irq') > 0) {
      this.emit('irq', event)
      taken = true
    }
    if (!taken) this.#kept.set(vector, total)
  }

  /** Hands what was kept to the listeners, if there are any now. */
  #flush(): void {
    if (this.listenerCount('irq') === 0) return
    for (const [vector, count] of [...this.#kept]) {
      this.#kept.delete(vector)
      this.emit('irq', { index: this.index, vector, count })
    }
  }

  #end(): void {
    if (this.#ended) return
    this.#ended = true
    this.#ch.irqGroups.delete(this.#group)
    this.unref()
    const ended = new VfioUserError('ECANCELED', 125, 'the interrupts were disabled or their connection ended')
    for (const w of this.#waiters) w.reject(ended)
    this.#waiters.clear()
    this.emit('end')
  }

  /** True once disabled or the connection has ended. */
  get ended(): boolean {
    return this.#ended
  }

  /**
   * The next signal of `vector` (default: of any vector), with everything it counted since
   * it was last taken; at once if one was kept while nobody listened. Keeps Node running
   * while it waits.
   * @throws {VfioUserError} (rejection) `'ETIMEDOUT'` after `timeoutMs`, `'ECANCELED'` once
   *   disabled or the connection ended.
   * @throws {RangeError|TypeError} (rejection) for a vector outside the group or bad options.
   */
  wait(options: WaitIrqOptions = {}): Promise<IrqEvent> {
    try {
      if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
      const { vector, signal } = options
      if (vector !== undefined) checkInteger('vector', vector, this.start, this.start + this.count - 1)
      const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
      if (signal !== undefined && !(signal instanceof AbortSignal)) throw invalidArg('signal must be an AbortSignal')
      for (const [v, count] of this.#kept) {
        if (vector !== undefined && v !== vector) continue
        this.#kept.delete(v)
        return Promise.resolve({ index: this.index, vector: v, count })
      }
      if (this.#ended) {
        return Promise.reject(
          new VfioUserError('ECANCELED', 125, 'the interrupts were disabled or their connection ended'),
        )
      }
      if (!this.watched) {
        return Promise.reject(
          new VfioUserError('EINVAL', 22, 'these eventfds are not read by the library (watch: false, or your own fds)'),
        )
      }
      if (signal?.aborted) return Promise.reject(aborted(signal))
      return new Promise<IrqEvent>((resolve, reject) => {
        const release = holdLoop()
        let timer: NodeJS.Timeout | undefined
        let unwatch: (() => void) | undefined
        const done = () => {
          this.#waiters.delete(w)
          release()
          if (timer) clearTimeout(timer)
          unwatch?.()
        }
        const w: Waiter = {
          vector,
          resolve: (e) => {
            done()
            resolve(e)
          },
          reject: (e) => {
            done()
            reject(e)
          },
        }
        this.#waiters.add(w)
        if (timeoutMs !== undefined) {
          timer = setTimeout(
            () => w.reject(new VfioUserError('ETIMEDOUT', 110, `no interrupt of irq ${this.index} in ${timeoutMs} ms`)),
            timeoutMs,
          )
        }
        if (signal) unwatch = watchAbort(signal, () => w.reject(aborted(signal)))
      })
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /**
   * Keeps Node running until {@link unref}, {@link disable} or the connection's end: for a
   * daemon that only waits for interrupts. Returns this.
   */
  ref(): this {
    if (!this.#ended) this.#loop.ref()
    return this
  }

  /** Undoes {@link ref}. Returns this. */
  unref(): this {
    this.#loop.unref()
    return this
  }

  /**
   * Stops delivery at once (the eventfds are closed) and unwires the vectors on the device.
   * Idempotent.
   */
  disable(options: CallOptions = {}): Promise<void> {
    return rejecting(() => this.#disable(options))
  }

  #disable(options: CallOptions): Promise<void> {
    if (this.#ended) return Promise.resolve()
    const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
    // Ended only once the request is being sent: a call refused before that (an aborted or
    // bad signal) leaves the group as it was, for a later disable() to end.
    const start = (token: number) => {
      this.#end()
      return this.#ch.native.disableIrqs(token, this.#group, timeoutMs)
    }
    return this.#ch.call(Command.DEVICE_SET_IRQS, start, options).then(() => {})
  }

  /** Same as {@link Interrupts.disable}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.disable()
  }

  /** The `'irq'` events from now until the end (and those kept until now, first). */
  [Symbol.asyncIterator](): AsyncGenerator<IrqEvent> {
    if (!this.watched) return unwatched()
    // Awaiting the next interrupt keeps Node running, as a pending wait() does.
    return untilEnd<IrqEvent>(this as unknown as EventEmitter, ['irq'], () => this.#ended, true)
  }
}

/**
 * A new eventfd (close-on-exec, nonblocking), which Node cannot make: for `enableIrqs({ fds })`,
 * or anything else that takes one. The number is yours: close it with `fs.closeSync`.
 * @throws {VfioUserError} `'EMFILE'` and the like when the kernel cannot make one.
 */
export function createEventFd(): number {
  const fd = native.createEventFd()
  if (typeof fd !== 'number') throw fromNative(fd)
  return fd
}

/**
 * The error for vectors the server has already said it does not have: past the count an
 * `irqInfo()` of that index reported on this connection. Such a request is never sent.
 */
function pastVectors(ch: Channel, index: number, start: number, count: number): RangeError | undefined {
  const has = ch.irqCounts.get(index)
  if (has === undefined || start + count <= has) return undefined
  return outOfRange(
    `vectors ${start} to ${start + count - 1} of irq ${index}: it has ${has} (${has === 0 ? 'none' : `0 to ${has - 1}`})`,
  )
}

/** The iterator of vectors nobody here reads: it fails at once, as `wait()` does. */
// biome-ignore lint/correctness/useYield: it only throws.
async function* unwatched(): AsyncGenerator<IrqEvent> {
  throw new VfioUserError('EINVAL', 22, 'these eventfds are not read by the library (watch: false, or your own fds)')
}

/** Wires vectors of irq `index` to eventfds made natively; see {@link Interrupts}. */
export function enableIrqs(ch: Channel, index: number, options: EnableIrqsOptions = {}): Promise<Interrupts> {
  checkInteger('index', index, 0, 0xffff_ffff)
  const start = checkInteger('start', options.start ?? 0, 0, 0x7fff_fffe)
  const given = checkFds(options.fds)
  if (options.fds !== undefined && given === undefined) throw outOfRange('fds must not be empty')
  const count = checkInteger('count', options.count ?? given?.length ?? 1, 1, 2048)
  if (given && given.length !== count) throw outOfRange(`${given.length} fds for ${count} vectors`)
  if (options.watch !== undefined && typeof options.watch !== 'boolean') throw invalidArg('watch must be a boolean')
  if (given && options.watch === true) throw outOfRange('your own eventfds are never read here: watch must not be true')
  const watch = given ? false : (options.watch ?? true)
  if (start + count > 0x7fff_ffff) throw outOfRange(`vectors ${start}+${count} run past 2^31`)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  const refused = pastVectors(ch, index, start, count)
  if (refused) return Promise.reject(refused)
  let made: Interrupts | undefined
  return ch
    .call(
      Command.DEVICE_SET_IRQS,
      (token) => {
        const g = ch.native.enableIrqs(token, index, start, count, timeoutMs, watch, given)
        if ('errno' in g) return g
        made = new Interrupts(ch, g.group, index, start, g.fds, watch)
        ch.irqGroups.set(g.group, made.sink)
        return null
      },
      options,
    )
    .then(
      () => made as Interrupts,
      async (e: unknown) => {
        // Refused (or aborted): nothing stays wired, no eventfd stays open.
        await made?.disable().catch(() => {})
        throw e
      },
    )
}

/** DEVICE_SET_IRQS with a raw action and DATA_NONE or DATA_BOOL. */
export function setIrqs(ch: Channel, index: number, options: SetIrqsOptions): Promise<void> {
  checkInteger('index', index, 0, 0xffff_ffff)
  if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
  const action = ACTIONS[options.action]
  if (action === undefined) throw outOfRange(`action must be 'mask', 'unmask' or 'trigger'`)
  const start = checkInteger('start', options.start ?? 0, 0, 0xffff_ffff)
  const data = options.data
  if (data !== undefined && (!Array.isArray(data) || data.some((d) => typeof d !== 'boolean'))) {
    throw invalidArg('data must be an array of booleans')
  }
  const count = checkInteger('count', options.count ?? data?.length ?? 1, 0, 0xffff_ffff)
  if (data && data.length !== count) throw outOfRange(`data has ${data.length} values for ${count} vectors`)
  const refused = pastVectors(ch, index, start, count)
  if (refused) return Promise.reject(refused)
  const bytes = Buffer.from((data ?? []).map((d) => (d ? 1 : 0)))
  const payload = native.setIrqsRequest((data ? DATA_BOOL : DATA_NONE) | action, index, start, count, bytes)
  return ch.send(Command.DEVICE_SET_IRQS, payload, options).then(() => {})
}

/** What DEVICE_GET_IRQ_INFO reports for one irq index. */
export interface IrqInfo {
  index: number
  /** Vectors in this index. */
  count: number
  /** The raw flags. */
  flags: number
  /** Vectors can be wired to eventfds. */
  eventfd: boolean
  maskable: boolean
  automasked: boolean
  /** The vector count cannot change once set. */
  noresize: boolean
}

/** Sends DEVICE_GET_IRQ_INFO for `index` and decodes the reply (its index must match). */
export function irqInfo(ch: Channel, index: number, options: CallOptions = {}): Promise<IrqInfo> {
  checkInteger('index', index, 0, 0xffff_ffff)
  return ch
    .send(Command.DEVICE_GET_IRQ_INFO, native.irqInfoRequest(index), options)
    .then((reply) => decode(ch, reply.payload, index))
}

function decode(ch: Channel, payload: Buffer, index: number): IrqInfo {
  const i = native.decodeIrqInfo(payload, index)
  if ('errno' in i) throw ch.error(i)
  // Vectors past this count are refused from now on, before anything is sent.
  ch.irqCounts.set(index, i.count)
  return {
    index: i.index,
    count: i.count,
    flags: i.flags,
    eventfd: (i.flags & 1) !== 0,
    maskable: (i.flags & 2) !== 0,
    automasked: (i.flags & 4) !== 0,
    noresize: (i.flags & 8) !== 0,
  }
}
