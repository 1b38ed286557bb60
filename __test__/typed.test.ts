// The typed device, region and irq calls against the real rust-vmm server (crates/test-device).
import diagnosticsChannel from 'node:diagnostics_channel'
import { closeSync, fstatSync, readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { allocateDmaMemory, Command, connect } from '../ts/index'
import { startTestDevice } from '../ts/testing'
import { refusal, refusedArg, rejection } from './rejection'
import { deviceSession, openFds } from './session'
import { regionAccess } from './wire'

const session = deviceSession()

describe('typed calls against the test device', () => {
  it('deviceInfo: a PCI device with 9 regions and 5 irq indexes', async () => {
    expect(await session.client.deviceInfo()).toEqual({ flags: 3, reset: true, pci: true, numRegions: 9, numIrqs: 5 })
  })

  it('accesses the server already said it would refuse are refused before they are sent', async () => {
    await using device = await startTestDevice()
    await using c = await connect(device.socketPath)
    await c.validateVersion()
    const sent: string[] = []
    const onRequest = (m: unknown) => sent.push((m as { commandName: string }).commandName)
    diagnosticsChannel.subscribe('vfio-user:request', onRequest)
    try {
      // Before deviceInfo the client knows nothing: the server refuses region 99 itself.
      const fromServer = await rejection(c.regionRead(99, 0, 4))
      expect(fromServer).toMatchObject({ code: 'EINVAL', commandName: 'REGION_READ' })
      expect(sent).toEqual(['REGION_READ'])
      expect((await c.deviceInfo()).numRegions).toBe(9)
      sent.length = 0
      const refused = [
        await refusal(c.regionRead(99, 0, 4)),
        await refusal(c.regionWrite(9, 0, Buffer.from([1]))),
        await refusal(c.regionWrite(9, 0, Buffer.from([1]), { posted: true })),
      ]
      for (const e of refused) {
        expect(e).toBeInstanceOf(RangeError)
        expect(e).toMatchObject({ code: 'ERR_OUT_OF_RANGE' })
      }
      expect(refused[0].message).toContain('region 99 does not exist: the device reported 9 regions')
      expect(() => c.regionReadSync(9, 0, 4)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }))
      // Once its size is known, nothing past a region's end goes out either.
      expect((await c.regionInfo(0)).size).toBe(4096n)
      const past = await refusal(c.regionRead(0, 4094, 4))
      expect(past).toMatchObject({ code: 'ERR_OUT_OF_RANGE' })
      expect(past.message).toBe('4 bytes at offset 0xffe of region 0 pass its end (4096 bytes, 0x1000)')
      expect(() => c.regionWriteSync(0, 4096n, Buffer.from([1]))).toThrow(
        expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }),
      )
      // regionInfo asks twice (the second time with room for the sparse area); nothing else went.
      expect(sent).toEqual(['DEVICE_GET_REGION_INFO', 'DEVICE_GET_REGION_INFO'])
      // The last bytes of the region are still read.
      expect((await c.regionRead(0, 4092, 4)).length).toBe(4)
    } finally {
      diagnosticsChannel.unsubscribe('vfio-user:request', onRequest)
    }
  })

  it('reset: sent once deviceInfo said it is supported; the device clears BAR0 and BAR2', async () => {
    const c = session.client
    await c.regionWrite(0, 0x100, Buffer.from('before reset'))
    await c.regionWrite(2, 0, Buffer.from([0xaa, 0xbb, 0xcc, 0xdd]))
    expect((await c.regionRead(0, 0x100, 12)).toString()).toBe('before reset')
    await c.reset()
    expect((await c.regionRead(0, 0x100, 12)).equals(Buffer.alloc(12))).toBe(true)
    expect((await c.regionRead(2, 0, 4)).equals(Buffer.alloc(4))).toBe(true)
  })

  it('regionInfo: BAR0 after asking again with room for its sparse area, with its fd', async () => {
    const before = openFds()
    const bar0 = await session.client.regionInfo(0)
    expect(bar0).toMatchObject({ index: 0, read: true, write: true, mmap: true, size: 4096n, offset: 0n })
    expect(bar0.sparse).toEqual([{ offset: 0n, size: 4096n }])
    expect(bar0.warnings).toEqual([])
    const fd = bar0.fd as number
    expect(fstatSync(fd).size).toBeGreaterThanOrEqual(4096)
    expect(openFds()).toBe(before + 1)
    bar0.close()
    bar0.close()
    expect(bar0.fd).toBeUndefined()
    expect(openFds()).toBe(before)
    // Handed over: the caller owns it from then on.
    using again = await session.client.regionInfo(0)
    const taken = again.takeFd() as number
    expect(again.fd).toBeUndefined()
    expect(fstatSync(taken).isFile()).toBe(true)
    closeSync(taken)
  })

  it('regionInfo: config space has no fd and no capabilities', async () => {
    using config = await session.client.regionInfo(7)
    expect(config).toMatchObject({ index: 7, read: true, write: true, mmap: false, size: 256n })
    expect(config.fd).toBeUndefined()
    expect(config.sparse).toBeUndefined()
  })

  it('regionRead and regionWrite, async and sync, agree with a raw REGION_READ', async () => {
    const data = Buffer.from('typed calls!')
    await session.client.regionWrite(0, 100, data)
    expect(await session.client.regionRead(0, 100, data.length)).toEqual(data)
    expect(session.client.regionReadSync(0, 100n, data.length)).toEqual(data)
    session.client.regionWriteSync(0, 200, Buffer.from([1, 2, 3, 4]))
    const raw = session.client.sendWaitSync(Command.REGION_READ, regionAccess(0, 200, 4))
    expect(raw.payload.subarray(16)).toEqual(Buffer.from([1, 2, 3, 4]))
    // Posted writes are ordered: the read behind them sees them.
    await session.client.regionWrite(0, 300, Buffer.from([9, 9]), { posted: true })
    expect(await session.client.regionRead(0, 300, 2)).toEqual(Buffer.from([9, 9]))
    // PCI config space: QEMU's test device ids.
    const ids = session.client.regionReadSync(7, 0, 4)
    expect([ids.readUInt16LE(0), ids.readUInt16LE(2)]).toEqual([0x1b36, 0x0005])
  })

  it('a whole BAR in one call, and many calls in flight', async () => {
    const pattern = Buffer.alloc(4096)
    for (let i = 0; i < pattern.length - 4; i++) pattern[i] = (i * 7) & 0xff
    await session.client.regionWrite(0, 0, pattern.subarray(0, 4092))
    const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => session.client.regionRead(0, i * 16, 16)))
    expect(Buffer.concat(reads)).toEqual(pattern.subarray(0, 1024))
    expect((await session.client.regionRead(0, 0, 4092)).equals(pattern.subarray(0, 4092))).toBe(true)
  })

  it('mapRegion: BAR0 as a Buffer over device memory, unmapped and detached after', async () => {
    const bar0Maps = () =>
      readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .filter((l) => l.includes('vfio-user-test-bar0')).length
    const fds = openFds()
    const before = bar0Maps()
    const map = await session.client.mapRegion(0)
    expect(map.areas).toHaveLength(1)
    const { offset, buffer } = map.areas[0] as { offset: bigint; buffer: Buffer }
    expect([offset, buffer.length]).toEqual([0n, 4096])
    expect(bar0Maps()).toBe(before + 1)
    expect(openFds()).toBe(fds)
    // Written through the mapping, read by the device over the socket; and back.
    buffer.write('mapped', 0x200)
    expect((await session.client.regionRead(0, 0x200, 6)).toString()).toBe('mapped')
    await session.client.regionWrite(0, 0x300, Buffer.from('socket'))
    expect(buffer.toString('utf8', 0x300, 0x306)).toBe('socket')
    // Posted writes could overtake stores through the mapping: refused while it exists.
    expect((await rejection(session.client.regionWrite(0, 0, Buffer.from([1]), { posted: true }))).code).toBe('EBUSY')
    map.unmap()
    map.unmap()
    expect(buffer.length).toBe(0)
    expect(map.mapped).toBe(false)
    expect(bar0Maps()).toBe(before)
    await session.client.regionWrite(0, 0, Buffer.from([1]), { posted: true })
    // Config space has no fd to map.
    expect((await rejection(session.client.mapRegion(7))).code).toBe('ENODEV')
    expect(openFds()).toBe(fds)
  })

  it('irqInfo: INTx has one vector, MSI four', async () => {
    expect(await session.client.irqInfo(0)).toMatchObject({ index: 0, count: 1, eventfd: true })
    expect(await session.client.irqInfo(1)).toMatchObject({ index: 1, count: 4, eventfd: true, maskable: false })
  })

  it("the server's errors: an access past a region, an unreadable region", async () => {
    // A connection that has not read the region's size: the request goes, the server refuses.
    await using device = await startTestDevice()
    await using c = await connect(device.socketPath)
    await c.validateVersion()
    const past = await rejection(c.regionRead(0, 4094, 4))
    expect(past).toMatchObject({ command: Command.REGION_READ, code: 'EIO' })
    // The server's bare refusal (errno 0) still says what was refused.
    expect(past.message).toMatch(/^REGION_READ of 4 bytes at 0xffe of region 0: /)
    expect(() => c.regionWriteSync(0, 4094, Buffer.alloc(4))).toThrow(/^REGION_WRITE of 4 bytes at 0xffe of region 0: /)
    const unreadable = await rejection(c.regionRead(1, 0, 4))
    expect(unreadable).toMatchObject({ commandName: 'REGION_READ', code: 'EIO' })
    // The connection is still in sync.
    expect((await c.regionRead(7, 0, 2)).readUInt16LE(0)).toBe(0x1b36)
  })

  it('sizes and lengths are taken as bigints too: RegionInfo.size reads a whole region', async () => {
    const c = session.client
    using bar0 = await c.regionInfo(0)
    expect(typeof bar0.size).toBe('bigint')
    await c.regionWrite(0, 0, Buffer.alloc(4096, 0x5a))
    expect((await c.regionRead(0, 0, bar0.size)).equals(Buffer.alloc(4096, 0x5a))).toBe(true)
    expect(c.regionReadSync(0, 0n, 16n).equals(Buffer.alloc(16, 0x5a))).toBe(true)
    using memory = allocateDmaMemory(4096n)
    expect(memory.size).toBe(4096)
    await refusedArg(() => c.regionRead(0, 0, 1n << 32n), RangeError)
    expect(() => allocateDmaMemory(0n)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }))
  })

  it('registers(): little-endian reads and writes of 8, 16, 32 and 64 bits, async and sync', async () => {
    const c = session.client
    const bar0 = c.registers(0)
    await bar0.write32(0x100, 0xdeadbeef)
    expect(c.regionReadSync(0, 0x100, 4)).toEqual(Buffer.from([0xef, 0xbe, 0xad, 0xde]))
    expect(await bar0.read32(0x100)).toBe(0xdeadbeef)
    expect(bar0.read16Sync(0x102)).toBe(0xdead)
    expect(await bar0.read8(0x103)).toBe(0xde)
    bar0.write64Sync(0x108, 0x0123_4567_89ab_cdefn)
    expect(await bar0.read64(0x108)).toBe(0x0123_4567_89ab_cdefn)
    expect(bar0.read32Sync(0x10c)).toBe(0x0123_4567)
    await bar0.write16(0x110, 0xbeef)
    bar0.write8Sync(0x112, 0x7f)
    await bar0.write64(0x118, 2 ** 40)
    expect(c.regionReadSync(0, 0x110, 3)).toEqual(Buffer.from([0xef, 0xbe, 0x7f]))
    expect(bar0.read64Sync(0x118)).toBe(1n << 40n)
    await bar0.write32(0x120, 7, { posted: true })
    expect(bar0.read32Sync(0x120)).toBe(7)
    // The doorbell, as a register: rings MSI vector 3.
    const irqs = await c.enableIrqs(1, { start: 0, count: 4 })
    await bar0.write32(0xffc, 3)
    expect(await irqs.wait({ vector: 3, timeoutMs: 10_000 })).toEqual({ index: 1, vector: 3, count: 1 })
    await irqs.disable()
    // Values that do not fit, and bounds, are refused before sending.
    await refusedArg(() => bar0.write8(0, 256), RangeError)
    await refusedArg(() => bar0.write32(0, -1), RangeError)
    await refusedArg(() => bar0.write64(0, 1n << 64n), RangeError)
    await refusedArg(() => bar0.write16(0, '1' as unknown as number), TypeError)
    expect(() => bar0.write32Sync(0, 2 ** 32)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }))
    ;(await c.regionInfo(0)).close()
    await refusedArg(() => bar0.read64(4092), RangeError)
  })

  it('bad arguments are refused before anything is sent: rejections for promises, throws for Sync calls, with Node codes', async () => {
    const c = session.client as unknown as Record<string, (...a: unknown[]) => unknown>
    const call =
      (name: string, ...args: unknown[]) =>
      () =>
        c[name]?.apply(session.client, args)
    await refusedArg(call('regionRead', -1, 0, 4), RangeError)
    await refusedArg(call('regionRead', 2 ** 32, 0, 4), RangeError)
    await refusedArg(call('regionRead', 0, -1, 4), RangeError)
    await refusedArg(call('regionRead', 0, 1.5, 4), RangeError)
    await refusedArg(call('regionRead', 0, 2 ** 64 * 2, 4), RangeError)
    await refusedArg(call('regionRead', 0, 1n << 64n, 4), RangeError)
    await refusedArg(call('regionRead', 0, (1n << 64n) - 2n, 4), RangeError)
    await refusedArg(call('regionRead', 0, '0', 4), TypeError)
    await refusedArg(call('regionRead', 0, 0, 0), RangeError)
    await refusedArg(call('regionRead', 0, 0, 2 ** 32), RangeError)
    // A bad option rejects too: `.catch()` sees it, nothing is thrown past it.
    await refusedArg(call('regionRead', 0, 0, 4, { timeoutMs: 0 }), RangeError)
    expect(call('regionReadSync', 0, 0, 2 ** 32)).toThrow(RangeError)
    await refusedArg(call('regionWrite', 0, 0, Buffer.alloc(0)), RangeError)
    await refusedArg(call('regionWrite', 0, 0, 'data'), TypeError)
    await refusedArg(call('regionWrite', 0, 0, Buffer.alloc(1), { posted: 1 }), TypeError)
    expect(call('regionWriteSync', 0, 0, [1, 2])).toThrow(TypeError)
    await refusedArg(call('regionInfo', -1), RangeError)
    await refusedArg(call('irqInfo', 0.5), RangeError)
    const detached = new Uint8Array(new ArrayBuffer(8))
    structuredClone(detached.buffer, { transfer: [detached.buffer] })
    await refusedArg(call('regionWrite', 0, 0, detached), TypeError)
  })

  it('an fd number that is not open fails only its request, with EBADF', async () => {
    const e = await rejection(session.client.sendWait(Command.DEVICE_GET_INFO, Buffer.alloc(16), { fds: [999_999] }))
    expect(e.code).toBe('EBADF')
    expect((await session.client.deviceInfo()).numRegions).toBe(9)
  })

  it('calls after close fail with ECONNABORTED', async () => {
    // The test device serves one connection at a time: this one needs its own.
    await using own = await startTestDevice()
    const c = await connect(own.socketPath)
    await c.validateVersion()
    await c.close()
    expect(await rejection(c.regionRead(0, 0, 4))).toMatchObject({ code: 'ECONNABORTED', commandName: 'REGION_READ' })
    expect(await rejection(c.deviceInfo())).toMatchObject({ code: 'ECONNABORTED', commandName: 'DEVICE_GET_INFO' })
    expect(() => c.regionReadSync(0, 0, 4)).toThrow(expect.objectContaining({ code: 'ECONNABORTED' }))
  })
})
