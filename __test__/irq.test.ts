// Interrupts against the real rust-vmm server (crates/test-device): a write of v to its
// doorbell (BAR0 0xffc) signals MSI vector v through the eventfd wired to it.
import { once } from 'node:events'
import { describe, expect, it } from 'vitest'
import { connect, type IrqEvent } from '../ts/index'
import { startTestDevice } from '../ts/testing'
import { rejection } from './rejection'
import { deviceSession, openFds } from './session'

const session = deviceSession()

function ring(vector: number) {
  const v = Buffer.alloc(4)
  v.writeUInt32LE(vector)
  return session.client.regionWrite(0, 0xffc, v)
}

describe('interrupts against the test device', () => {
  it('MSI vectors wired one fd per message (max_msg_fds 1) fire as irq events', async () => {
    const before = openFds()
    const irqs = await session.client.enableIrqs(1, { start: 0, count: 4 })
    expect(irqs.fds).toHaveLength(4)
    expect(openFds()).toBe(before + 4)
    const seen: IrqEvent[] = []
    const three = new Promise<void>((resolve) => {
      irqs.on('irq', (e: IrqEvent) => {
        seen.push(e)
        // At least three: one too many must show in the counts below, not hang here.
        if (seen.reduce((n, x) => n + x.count, 0) >= 3) resolve()
      })
    })
    await ring(2)
    await ring(2)
    await ring(3)
    await three
    const byVector = new Map<number, number>()
    for (const e of seen) {
      expect(e.index).toBe(1)
      byVector.set(e.vector, (byVector.get(e.vector) ?? 0) + e.count)
    }
    expect(Object.fromEntries(byVector)).toEqual({ 2: 2, 3: 1 })
    const ended = new Promise((resolve) => irqs.once('end', resolve))
    await irqs.disable()
    await ended
    expect(irqs.ended).toBe(true)
    expect(openFds()).toBe(before)
    await irqs.disable()
  })

  it('an async iterator yields the events until disable', async () => {
    const irqs = await session.client.enableIrqs(1, { start: 1, count: 1 })
    const got: IrqEvent[] = []
    const reading = (async () => {
      for await (const e of irqs) got.push(e)
    })()
    const first = once(irqs, 'irq')
    await ring(1)
    await first
    await irqs.disable()
    await reading
    expect(got[0]).toEqual({ index: 1, vector: 1, count: 1 })
  })

  it('closing the client ends every group and closes its eventfds', async () => {
    await using own = await startTestDevice()
    // Counted before connecting: after close() every fd of the connection must be gone, the
    // eventfds with the socket, eventfd and epoll.
    const before = openFds()
    const c = await connect(own.socketPath)
    await c.validateVersion()
    const connected = openFds()
    const irqs = await c.enableIrqs(1, { count: 4 })
    expect(openFds()).toBe(connected + 4)
    const ended = new Promise((resolve) => irqs.once('end', resolve))
    await c.close()
    await ended
    expect(openFds()).toBe(before)
  })

  it('bad arguments throw before anything is sent; raw setIrqs actions', async () => {
    expect(() => session.client.enableIrqs(-1)).toThrow(RangeError)
    expect(() => session.client.enableIrqs(1, { count: 0 })).toThrow(RangeError)
    expect(() => session.client.setIrqs(1, { action: 'poke' as 'mask' })).toThrow(RangeError)
    expect(() => session.client.setIrqs(1, { action: 'trigger', data: [true], count: 2 })).toThrow(RangeError)
    // The test device accepts actions without data (and ignores them); rust-vmm's server
    // refuses DATA_BOOL, whose layout the proto crate's tests check.
    await session.client.setIrqs(0, { action: 'mask' })
    await session.client.setIrqs(1, { action: 'unmask', start: 1, count: 2 })
    await session.client.setIrqs(1, { action: 'trigger', start: 0, count: 4 })
    expect(await rejection(session.client.setIrqs(1, { action: 'trigger', start: 3, count: 2 }))).toMatchObject({
      command: 8,
      // The rust-vmm server reports its backend's refusal with errno 0: EIO.
      code: 'EIO',
    })
  })
})
