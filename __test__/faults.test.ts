// Faults of the real test device (rust-vmm's vfio_user Server) with requests in flight:
// stopped and continued, stopped past a timeout, killed. (Connections ended every way, fd
// and thread counts, and the event loop's liveness are in lifecycle.test.ts.)
import { describe, expect, it } from 'vitest'
import { Command, connect } from '../ts/index'
import { startTestDevice } from '../ts/testing'
import { rejection } from './rejection'
import { getInfoPayload, regionAccess } from './wire'

describe('the server stopped and continued (SIGSTOP/SIGCONT)', () => {
  it('requests sent while it is stopped are answered once it runs again', async () => {
    await using device = await startTestDevice()
    await using c = await connect(device.socketPath, { timeoutMs: 600_000 })
    await c.validateVersion()
    process.kill(device.pid, 'SIGSTOP')
    const pending = Array.from({ length: 200 }, () => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    // The stopped server cannot answer; these are all still in flight.
    expect(c.inFlight).toBe(200)
    process.kill(device.pid, 'SIGCONT')
    for (const r of await Promise.all(pending)) expect(r.payload.readUInt32LE(8)).toBeGreaterThanOrEqual(9)
  })

  it('requests that time out while it is stopped: late replies are dropped and the stream stays in sync', async () => {
    await using device = await startTestDevice()
    await using c = await connect(device.socketPath)
    await c.validateVersion()
    // A write the server will apply late, then reads that time out.
    const marker = Buffer.from([0xa5, 0x5a, 0xc3, 0x3c])
    process.kill(device.pid, 'SIGSTOP')
    // Each watched at once: they may settle in different turns, in any order.
    const timedOut = [
      c.sendWait(Command.REGION_WRITE, regionAccess(0, 0, 4, marker), { timeoutMs: 50 }),
      ...Array.from({ length: 20 }, () => c.sendWait(Command.REGION_READ, regionAccess(0, 0, 4), { timeoutMs: 50 })),
    ].map(rejection)
    for (const e of await Promise.all(timedOut)) expect(e.code).toBe('ETIMEDOUT')
    process.kill(device.pid, 'SIGCONT')
    // The server answers everything in order: the late replies come first and are dropped;
    // this read's reply is its own and sees the late write.
    const r = await c.sendWait(Command.REGION_READ, regionAccess(0, 0, 4))
    expect(r.payload.subarray(16)).toEqual(marker)
    expect(c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload()).payload.length).toBe(16)
  })
})

describe('the server killed (SIGKILL)', () => {
  it('every request in flight fails at once with ECONNRESET, and later calls fail the same way', async () => {
    await using device = await startTestDevice()
    const c = await connect(device.socketPath, { timeoutMs: 600_000 })
    await c.validateVersion()
    const closed = new Promise((resolve) => c.once('close', resolve))
    process.kill(device.pid, 'SIGSTOP')
    const pending = Array.from({ length: 1000 }, () => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    process.kill(device.pid, 'SIGKILL')
    const results = await Promise.allSettled(pending)
    expect(new Set(results.map((r) => r.status === 'rejected' && r.reason.code))).toEqual(new Set(['ECONNRESET']))
    expect(await closed).toMatchObject({ code: 'ECONNRESET' })
    expect((await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))).code).toBe('ECONNRESET')
    expect(() => c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())).toThrow(
      expect.objectContaining({ code: 'ECONNRESET' }),
    )
    await c.close()
  })
})
