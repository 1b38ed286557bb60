// DEVICE_GET_IRQ_INFO as a typed call (protocol.md 3.6). The bytes are encoded and decoded by
// the proto crate's irq.rs, through the binding's irq.rs.
import { checkInteger } from './args'
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { native } from './native'

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
