// DEVICE_GET_IRQ_INFO as a typed call (protocol.md 3.6). The bytes are encoded and decoded by
// the proto crate's irq.rs, through the binding's irq.rs.
import { EventEmitter } from 'node:events'
import { checkInteger, checkTimeout } from './args'
import type { CallOptions, Channel, IrqSink } from './channel'
import { Command } from './command'
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
  /** Vectors (default 1). */
  count?: number
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

/**
 * Vectors wired to eventfds. Emits `'irq'` ({@link IrqEvent}) as the device signals them,
 * and `'end'` once they are disabled or the connection ends; `for await` yields the same
 * events until then. Holding it does not keep Node running.
 */
export class Interrupts extends EventEmitter {
  readonly index: number
  readonly start: number
  readonly count: number
  /** The eventfds, one per vector from `start` (for a caller who hands them to KVM). Closed by `disable()`. */
  readonly fds: readonly number[]
  #ch: Channel
  #group: number
  #ended = false

  /** @internal Built by {@link enableIrqs}. */
  constructor(ch: Channel, group: number, index: number, start: number, fds: number[]) {
    super()
    this.#ch = ch
    this.#group = group
    this.index = index
    this.start = start
    this.count = fds.length
    this.fds = Object.freeze([...fds])
  }

  /** @internal The sink the client routes this group's events to. */
  get sink(): IrqSink {
    return {
      fire: (vector, count) => this.emit('irq', { index: this.index, vector, count } satisfies IrqEvent),
      end: () => this.#end(),
    }
  }

  #end(): void {
    if (this.#ended) return
    this.#ended = true
    this.#ch.irqGroups.delete(this.#group)
    this.emit('end')
  }

  /** True once disabled or the connection has ended. */
  get ended(): boolean {
    return this.#ended
  }

  /**
   * Stops delivery at once (the eventfds are closed) and unwires the vectors on the device.
   * Idempotent.
   */
  disable(options: CallOptions = {}): Promise<void> {
    if (this.#ended) return Promise.resolve()
    const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
    this.#end()
    return this.#ch
      .call(Command.DEVICE_SET_IRQS, (token) => this.#ch.native.disableIrqs(token, this.#group, timeoutMs), options)
      .then(() => {})
  }

  /** The `'irq'` events from now until the end. */
  async *[Symbol.asyncIterator](): AsyncGenerator<IrqEvent> {
    const queue: IrqEvent[] = []
    let wake: (() => void) | undefined
    const onIrq = (e: IrqEvent) => {
      queue.push(e)
      wake?.()
    }
    const onEnd = () => wake?.()
    this.on('irq', onIrq)
    this.on('end', onEnd)
    try {
      for (;;) {
        const next = queue.shift()
        if (next) {
          yield next
          continue
        }
        if (this.#ended) return
        await new Promise<void>((resolve) => {
          wake = resolve
        })
        wake = undefined
      }
    } finally {
      this.off('irq', onIrq)
      this.off('end', onEnd)
    }
  }
}

/** Wires vectors of irq `index` to eventfds made natively; see {@link Interrupts}. */
export function enableIrqs(ch: Channel, index: number, options: EnableIrqsOptions = {}): Promise<Interrupts> {
  checkInteger('index', index, 0, 0xffff_ffff)
  const start = checkInteger('start', options.start ?? 0, 0, 0x7fff_fffe)
  const count = checkInteger('count', options.count ?? 1, 1, 2048)
  if (start + count > 0x7fff_ffff) throw new RangeError(`vectors ${start}+${count} run past 2^31`)
  const timeoutMs = checkTimeout('timeoutMs', options.timeoutMs)
  let made: Interrupts | undefined
  return ch
    .call(
      Command.DEVICE_SET_IRQS,
      (token) => {
        const g = ch.native.enableIrqs(token, index, start, count, timeoutMs)
        if ('errno' in g) return g
        made = new Interrupts(ch, g.group, index, start, g.fds)
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
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object')
  const action = ACTIONS[options.action]
  if (action === undefined) throw new RangeError(`action must be 'mask', 'unmask' or 'trigger'`)
  const start = checkInteger('start', options.start ?? 0, 0, 0xffff_ffff)
  const data = options.data
  if (data !== undefined && (!Array.isArray(data) || data.some((d) => typeof d !== 'boolean'))) {
    throw new TypeError('data must be an array of booleans')
  }
  const count = checkInteger('count', options.count ?? data?.length ?? 1, 0, 0xffff_ffff)
  if (data && data.length !== count) throw new RangeError(`data has ${data.length} values for ${count} vectors`)
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
