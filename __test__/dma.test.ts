import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { allocateDmaMemory, connect, dmaMemoryFromFd, type VfioUserClient } from '../ts/index'
import { startTestDevice } from '../ts/testing'
import { reserveHugePages } from './hugepages'
import { rejection } from './rejection'
import { deviceSession, openFds } from './session'

const session = deviceSession()
const PAGE = 4096

/** Has the device copy `len` bytes from iova `src` to iova `dst` (its DMA engine in BAR0). */
function deviceCopy(src: bigint, dst: bigint, len: number) {
  return deviceCopy2(session.client, src, dst, len)
}

/** {@link deviceCopy} on a connection of its own. */
async function deviceCopy2(c: VfioUserClient, src: bigint, dst: bigint, len: number) {
  const regs = Buffer.alloc(16)
  regs.writeBigUInt64LE(src, 0)
  regs.writeBigUInt64LE(dst, 8)
  await c.regionWrite(0, 0xfe0, regs)
  const go = Buffer.alloc(4)
  go.writeUInt32LE(len)
  await c.regionWrite(0, 0xff0, go)
}

describe('DMA against the test device', () => {
  it('the device copies between two maps of DmaMemory, seen in memory.buffer', async () => {
    using memory = allocateDmaMemory(4 * PAGE)
    memory.buffer.write('hello, device', 0)
    await session.client.dmaMap({ iova: 0x10_0000n, size: 2 * PAGE, memory })
    await session.client.dmaMap({ iova: 0x20_0000, size: 2 * PAGE, memory, offset: 2 * PAGE })
    expect(session.client.dmaMaps).toBe(2)
    await deviceCopy(0x10_0000n, 0x20_0010n, 13)
    expect(memory.buffer.toString('utf8', 2 * PAGE + 0x10, 2 * PAGE + 0x10 + 13)).toBe('hello, device')
    await session.client.dmaUnmap({ iova: 0x10_0000n, size: 2 * PAGE })
    session.client.dmaUnmapSync({ iova: 0x20_0000, size: 2 * PAGE })
    expect(session.client.dmaMaps).toBe(0)
    // Unmapped: the device has nothing there any more.
    expect(await rejection(deviceCopy(0x10_0000n, 0x20_0000n, 4))).toMatchObject({ command: 10, code: 'EIO' })
  })

  it('close() unmaps DmaMemory from this process at once, or with the last DMA map that uses it', async () => {
    // Mappings of our memfds, as the kernel lists them (not as the garbage collector sees them).
    const mapped = () =>
      readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .filter((l) => l.includes('memfd:vfio-user-dma')).length
    await using device = await startTestDevice()
    await using c = await connect(device.socketPath)
    await c.validateVersion()
    const base = mapped()
    const idle = allocateDmaMemory(2 * PAGE)
    const used = allocateDmaMemory(2 * PAGE)
    const view = idle.buffer.subarray(PAGE)
    expect(mapped()).toBe(base + 2)
    // Not mapped for DMA: gone at close, its Buffer and every view of it empty.
    idle.close()
    expect(mapped()).toBe(base + 1)
    expect(idle.buffer.length).toBe(0)
    expect(view.length).toBe(0)
    expect(idle.fd).toBeUndefined()
    idle.close()
    // Mapped for DMA: the Buffer goes at close, the pages stay while the device may use them.
    used.buffer.write('still there', 0)
    await c.dmaMap({ iova: 0x10_0000n, size: 2 * PAGE, memory: used })
    used.close()
    expect(used.buffer.length).toBe(0)
    expect(mapped()).toBe(base + 1)
    await deviceCopy2(c, 0x10_0000n, 0x10_1000n, 11)
    await c.dmaUnmap({ iova: 0x10_0000n, size: 2 * PAGE })
    expect(mapped()).toBe(base)
    // A closed memory cannot be mapped again.
    const again = await rejection(c.dmaMap({ iova: 0x20_0000n, size: PAGE, memory: used }))
    expect(again.code).toBe('EBADF')
    // Disposed by `using`: the same.
    {
      using scoped = allocateDmaMemory(PAGE)
      expect(mapped()).toBe(base + 1)
      scoped.buffer[0] = 1
    }
    expect(mapped()).toBe(base)
  })

  it('a view of DmaMemory maps as that memory, and close() waits for a read into it and for its maps', async () => {
    const mapped = () =>
      readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .filter((l) => l.includes('memfd:vfio-user-dma')).length
    const c = session.client
    const base = mapped()
    const memory = allocateDmaMemory(2 * PAGE)
    memory.buffer.write('through a view', PAGE)
    // The second page, given as a Buffer view: its fd goes with the map (the device's DMA
    // engine works only through fds), at the view's offset.
    await c.dmaMap({ iova: 0x50_0000n, size: PAGE, memory: memory.buffer.subarray(PAGE) })
    await c.dmaMap({ iova: 0x60_0000n, size: PAGE, memory })
    await deviceCopy(0x50_0000n, 0x60_0000n, 14)
    expect(memory.buffer.toString('utf8', 0, 14)).toBe('through a view')
    await c.dmaUnmap({ iova: 0x50_0000n, size: PAGE })
    await c.dmaUnmap({ iova: 0x60_0000n, size: PAGE })
    // A read into it in flight: close() waits for it to settle before unmapping.
    const big = allocateDmaMemory(1 << 20)
    const reading = c.regionRead(2, 0, 1 << 20, { into: big.buffer })
    big.close()
    expect(mapped()).toBe(base + 2)
    await reading
    expect(mapped()).toBe(base + 1)
    // A read refused before it is sent (an aborted signal) holds nothing: close() unmaps now.
    const idle = allocateDmaMemory(PAGE)
    const ac = new AbortController()
    ac.abort()
    const refused = c.regionRead(2, 0, PAGE, { into: idle.buffer, signal: ac.signal })
    await expect(refused).rejects.toMatchObject({ code: 'ABORT_ERR' })
    expect(mapped()).toBe(base + 2)
    idle.close()
    expect(mapped()).toBe(base + 1)
    memory.close()
    expect(mapped()).toBe(base)
  })

  it('dmaMapMany pipelines many maps; dmaMapSync maps one', async () => {
    using memory = allocateDmaMemory(64 * PAGE)
    const maps = Array.from({ length: 63 }, (_, i) => ({
      iova: (1n << 32n) + BigInt(i * PAGE),
      size: PAGE,
      memory,
      offset: i * PAGE,
    }))
    await session.client.dmaMapMany(maps)
    session.client.dmaMapSync({ iova: 1n << 40n, size: PAGE, memory, offset: 63 * PAGE })
    expect(session.client.dmaMaps).toBe(64)
    for (const m of maps) await session.client.dmaUnmap(m)
    session.client.dmaUnmapSync({ iova: 1n << 40n, size: PAGE })
    expect(session.client.dmaMaps).toBe(0)
  })

  it('dmaMapMany maps runs of one memory, Buffers and other memory between them, in order', async () => {
    using a = allocateDmaMemory(8 * PAGE)
    using b = allocateDmaMemory(2 * PAGE)
    const at = (i: number) => (1n << 32n) + BigInt(i * PAGE)
    const maps = [
      ...[0, 1, 2].map((i) => ({ iova: at(i), size: PAGE, memory: a, offset: i * PAGE })),
      { iova: at(3), size: PAGE, memory: Buffer.alloc(PAGE) },
      ...[4, 5].map((i) => ({ iova: at(i), size: PAGE, memory: a, offset: i * PAGE, write: false })),
      ...[6, 7].map((i) => ({ iova: at(i), size: PAGE, memory: b, offset: (i - 6) * PAGE })),
    ]
    await session.client.dmaMapMany(maps)
    expect(session.client.dmaMaps).toBe(8)
    // Each run went with its own memory and offsets: the device copies a's page 2 to b's page 1.
    a.buffer.write('run of a', 2 * PAGE)
    await deviceCopy(at(2), at(7), 8)
    expect(b.buffer.toString('utf8', PAGE, PAGE + 8)).toBe('run of a')
    // Each is mapped exactly as given: unmapping each range succeeds, and nothing is left.
    for (const m of maps) await session.client.dmaUnmap(m)
    expect(session.client.dmaMaps).toBe(0)
    await session.client.dmaMapMany([])
    expect(session.client.dmaMaps).toBe(0)
  })

  it('refuses bad maps before anything is sent', async () => {
    using memory = allocateDmaMemory(2 * PAGE)
    await session.client.dmaMap({ iova: 0x30_0000, size: PAGE, memory })
    const refused = (m: Parameters<VfioUserClient['dmaMap']>[0]) => {
      try {
        session.client.dmaMapSync(m)
      } catch (e) {
        return e as Error & { code?: string }
      }
      throw new Error('not refused')
    }
    expect(refused({ iova: 0x40_0001, size: PAGE, memory }).code).toBe('EINVAL')
    expect(refused({ iova: 0x40_0000, size: 100, memory }).code).toBe('EINVAL')
    expect(refused({ iova: 0x30_0000, size: PAGE, memory, offset: PAGE }).code).toBe('EEXIST')
    expect(refused({ iova: 0x40_0000, size: 4 * PAGE, memory })).toBeInstanceOf(RangeError)
    expect(refused({ iova: -1, size: PAGE, memory })).toBeInstanceOf(RangeError)
    expect(refused({ iova: 0, size: PAGE, memory: 'memory' as never })).toBeInstanceOf(TypeError)
    expect(refused({ iova: 0, size: 0, memory })).toBeInstanceOf(RangeError)
    expect(() => session.client.dmaUnmapSync({ iova: 0x30_0000, size: 2 * PAGE })).toThrow(
      expect.objectContaining({ code: 'EINVAL' }),
    )
    await session.client.dmaUnmap({ iova: 0x30_0000, size: PAGE })
  })

  it('a plain Buffer maps with no fd, async and sync', async () => {
    const plain = Buffer.alloc(2 * PAGE)
    await session.client.dmaMap({ iova: 0x60_0000, size: PAGE, memory: plain })
    session.client.dmaMapSync({ iova: 0x61_0000, size: PAGE, memory: plain, offset: PAGE })
    expect(session.client.dmaMaps).toBe(2)
    // The device's engine needs an fd behind the range: it has none here.
    expect(await rejection(deviceCopy(0x60_0000n, 0x61_0000n, 4))).toMatchObject({ command: 10, code: 'EIO' })
    session.client.dmaUnmapSync({ iova: 0x60_0000, size: PAGE })
    await session.client.dmaUnmap({ iova: 0x61_0000, size: PAGE })
    expect(session.client.dmaMaps).toBe(0)
  })

  it('no fd is left behind by 20 maps of fresh memory', async () => {
    // Warm up what the first use allocates for good (V8, the loader).
    {
      using m = allocateDmaMemory(PAGE)
      await session.client.dmaMap({ iova: 0x50_0000, size: PAGE, memory: m })
      await session.client.dmaUnmap({ iova: 0x50_0000, size: PAGE })
    }
    const fds = openFds()
    for (let i = 0; i < 20; i++) {
      using m = allocateDmaMemory(PAGE)
      await session.client.dmaMap({ iova: 0x50_0000, size: PAGE, memory: m })
      await session.client.dmaUnmap({ iova: 0x50_0000, size: PAGE })
    }
    expect(openFds()).toBe(fds)
  })
})

describe('DMA memory the VMM already has, and huge pages', () => {
  it('dmaMemoryFromFd maps part of a file; a DMA map sends its fd with the range offset in the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vfio-user-guest-'))
    const path = join(dir, 'guest-ram')
    const fd = openSync(path, 'w+')
    try {
      ftruncateSync(fd, 4 * PAGE)
      writeSync(fd, 'guest ram', PAGE)
      // A plain file can be shrunk by the server it is given to: refused unless accepted.
      expect(() => dmaMemoryFromFd(fd, { offset: PAGE, size: 2 * PAGE })).toThrow(
        expect.objectContaining({ code: 'EPERM', errno: -1 }),
      )
      // Pages 1 and 2 of the file: its byte 4096 is the memory's byte 0.
      using memory = dmaMemoryFromFd(fd, { offset: PAGE, size: 2 * PAGE, allowShrinkable: true })
      expect(memory.shrinkable).toBe(true)
      expect(memory.buffer.toString('utf8', 0, 9)).toBe('guest ram')
      memory.buffer.write('from js', 100)
      const back = Buffer.alloc(7)
      readSync(fd, back, 0, 7, PAGE + 100)
      expect(back.toString()).toBe('from js')
      // The device copies through its own mapping of the fd: from the memory's page 0 (file
      // page 1) to its page 1 (file page 2), which only works if the offset went with the fd.
      await session.client.dmaMap({ iova: 0x40_0000n, size: 2 * PAGE, memory })
      await deviceCopy(0x40_0000n, 0x40_1000n, 9)
      const copied = Buffer.alloc(9)
      readSync(fd, copied, 0, 9, 2 * PAGE)
      expect(copied.toString()).toBe('guest ram')
      expect(memory.buffer.toString('utf8', PAGE, PAGE + 9)).toBe('guest ram')
      await session.client.dmaUnmap({ iova: 0x40_0000n, size: 2 * PAGE })
      // Refused: an offset that is not page-aligned, a file opened read-only.
      expect(() => dmaMemoryFromFd(fd, { offset: 100, size: PAGE, allowShrinkable: true })).toThrow(
        expect.objectContaining({ code: 'EINVAL' }),
      )
      const readOnly = openSync(path, 'r')
      try {
        expect(() => dmaMemoryFromFd(readOnly, { size: PAGE, allowShrinkable: true })).toThrow(
          expect.objectContaining({ code: 'EACCES' }),
        )
      } finally {
        closeSync(readOnly)
      }
    } finally {
      // Still ours after the memory closed: this close would fail (EBADF) otherwise.
      closeSync(fd)
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it('allocateDmaMemory({ hugePages }) is backed by huge pages the device maps too', async () => {
    const HUGE = 2 << 20
    // Reserved for this test (root only), and given back after.
    const giveBack = reserveHugePages(1)
    try {
      using memory = allocateDmaMemory(HUGE, { hugePages: true })
      const maps = readFileSync('/proc/self/smaps', 'utf8').split(/\n(?=[0-9a-f]+-)/)
      const ours = maps.find((m) => m.includes('memfd:vfio-user-dma') && /KernelPageSize:\s+2048 kB/.test(m))
      expect(ours).toMatch(/KernelPageSize:\s+2048 kB/)
      memory.buffer.write('huge', 0)
      await session.client.dmaMap({ iova: 0x80_0000n, size: HUGE, memory })
      await deviceCopy(0x80_0000n, 0x80_0000n + BigInt(HUGE / 2), 4)
      expect(memory.buffer.toString('utf8', HUGE / 2, HUGE / 2 + 4)).toBe('huge')
      await session.client.dmaUnmap({ iova: 0x80_0000n, size: HUGE })
      expect(() => allocateDmaMemory(PAGE, { hugePages: true })).toThrow(expect.objectContaining({ code: 'EINVAL' }))
    } finally {
      giveBack()
    }
  })
})
