// Interop with libvfio-user's `gpio-pci-idio-16` sample (a PCI GPIO card), through the public
// API. One process serves the file's clients one after another; each test connects anew and
// checks the card's stderr, and that fds and threads are back where they started. Its
// migration is not tested: it asserts that every MIG_DATA_READ asks for exactly its 64-byte
// state, which no generic client does.
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { allocateDmaMemory, decodePciConfig, type VfioUserClient } from '../ts/index'
import { connectRetrying, expectCountsBack, failures, type Sample, startSample, threadCount, warmUp } from './peers'
import { openFds } from './session'

const BAR2 = 2
const CONFIG = 7
const cli = join(__dirname, '..', 'dist', 'cli.js')

let card: Sample | undefined
let fdBase = 0
let threadBase = 0

beforeAll(async () => {
  card = await startSample('gpio-pci-idio-16')
  // Warm up the lazily started parts of the process (libuv's threadpool, the module).
  await warmUp()
  const c = await open()
  await c.close()
})

afterAll(async () => {
  const exit = await card?.close()
  // Killed by us, never exited by itself (a failed client makes it exit 1).
  expect(exit).toEqual({ code: null, signal: 'SIGTERM', killed: false })
})

beforeEach(() => {
  fdBase = openFds()
  threadBase = threadCount()
})

function device(): Sample {
  if (!card) throw new Error('the card has not started')
  return card
}

async function open(): Promise<VfioUserClient> {
  const c = await connectRetrying(device().socketPath)
  await c.validateVersion()
  return c
}

/** Closes the test's client; no failed command in the card's log, no fd or thread left. */
async function finish(c: VfioUserClient): Promise<void> {
  await c.close()
  expect(failures(device().stderr())).toEqual([])
  await expectCountsBack(fdBase, threadBase)
}

describe("libvfio-user's gpio-pci-idio-16 sample", () => {
  it('vfio-user probe shows the card: its version, regions, irqs and PCI header', () => {
    const r = spawnSync(process.execPath, [cli, 'probe', device().socketPath, '--json'], {
      encoding: 'utf8',
      timeout: 20_000,
    })
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' })
    const p = JSON.parse(r.stdout)
    expect(p.version).toMatchObject({ major: 0, minor: 0 })
    // Offered although the client did not ask (protocol.md 7).
    expect(p.version.capabilities.migration).toMatchObject({ pgsize: 4096 })
    expect(p.device).toMatchObject({ numRegions: 9, numIrqs: 5, pci: true })
    expect(p.regions.find((x: { index: number }) => x.index === BAR2)).toMatchObject({ size: '256', hasFd: false })
    expect(p.pci).toMatchObject({ vendorId: 0x494f, deviceId: 0x0dc8 })
    expect(p.errors).toEqual([])
    expect(failures(device().stderr())).toEqual([])
  })

  it('config space through decodePciConfig: its ids, its interrupt pin, BAR2 an I/O BAR', async () => {
    const c = await open()
    const config = decodePciConfig(await c.regionRead(CONFIG, 0, 256))
    expect(config).toMatchObject({ vendorId: 0x494f, deviceId: 0x0dc8, interruptPin: 1, warnings: [] })
    expect(config.bars[BAR2] & 1).toBe(1)
    expect(c.regionReadSync(CONFIG, 0, 4).readUInt32LE(0)).toBe(0x0dc8494f)
    await finish(c)
  })

  it('BAR2: writes count pins up, reads report which pins are a multiple of 3, async and sync', async () => {
    const c = await open()
    using info = await c.regionInfo(BAR2)
    expect(info).toMatchObject({ size: 0x100n, read: true, write: true, mmap: false, fd: undefined })
    // Pins keep their counts across clients: start from what they read now.
    const low = (await c.regionRead(BAR2, 1, 1))[0]
    // Pin 0 counts up by one per write of bit 0 at offset 0; its bit (offset 1, bit 0) is set
    // when its count is a multiple of 3: after three writes it is back where it was.
    const seen: number[] = []
    for (let i = 0; i < 3; i++) {
      await c.regionWrite(BAR2, 0, Buffer.from([0x01]))
      seen.push(c.regionReadSync(BAR2, 1, 1)[0] & 1)
    }
    expect(seen.filter((b) => b === 1)).toHaveLength(1)
    expect(seen[2]).toBe(low & 1)
    // Pins 8 to 15: written at offset 4, read at offset 5.
    const high = (await c.regionRead(BAR2, 5, 1))[0]
    c.regionWriteSync(BAR2, 4, Buffer.from([0x80]))
    expect(((await c.regionRead(BAR2, 5, 1))[0] ^ high) & 0x80).toBe(0x80)
    for (let i = 0; i < 2; i++) await c.regionWrite(BAR2, 4, Buffer.from([0x80]))
    expect((await c.regionRead(BAR2, 5, 1))[0]).toBe(high)
    await finish(c)
  })

  it('interrupts: INTx wired to an eventfd fires when the library triggers it (SET_IRQS trigger)', async () => {
    const c = await open()
    const info = await c.irqInfo(0)
    expect(info).toMatchObject({ index: 0, count: 1, eventfd: true })
    const irqs = await c.enableIrqs(0, { start: 0, count: 1 })
    const fired = new Promise((resolve) => irqs.once('irq', resolve))
    // libvfio-user answers a trigger with DATA_NONE by writing the eventfd it was given.
    await c.setIrqs(0, { action: 'trigger', start: 0, count: 1 })
    expect(await fired).toEqual({ index: 0, vector: 0, count: 1 })
    await irqs.disable()
    await finish(c)
  })

  it('DMA maps of DmaMemory and of a Buffer are accepted and unmapped', async () => {
    const c = await open()
    const memory = allocateDmaMemory(2 * 4096)
    await c.dmaMap({ iova: 0x10_0000n, size: 2 * 4096, memory })
    await c.dmaMap({ iova: 0x20_0000n, size: 4096, memory: Buffer.alloc(4096) })
    expect(c.dmaMaps).toBe(2)
    await c.dmaUnmap({ iova: 0x10_0000n, size: 2 * 4096 })
    await c.dmaUnmapAll()
    expect(c.dmaMaps).toBe(0)
    memory.close()
    await finish(c)
  })

  it('dmaMapMany of 32 pages with a Buffer among them is accepted, and each page unmaps', async () => {
    const c = await open()
    const memory = allocateDmaMemory(32 * 4096)
    const maps = Array.from({ length: 32 }, (_, i) =>
      i === 16
        ? { iova: 0x100_0000n + BigInt(i * 4096), size: 4096, memory: Buffer.alloc(4096) }
        : { iova: 0x100_0000n + BigInt(i * 4096), size: 4096, memory, offset: i * 4096 },
    )
    await c.dmaMapMany(maps)
    expect(c.dmaMaps).toBe(32)
    for (const m of maps) await c.dmaUnmap(m)
    expect(c.dmaMaps).toBe(0)
    memory.close()
    await finish(c)
  })
})
