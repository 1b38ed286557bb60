// Interop with libvfio-user's `server` sample (the C library behind SPDK's vfio-user target),
// through the public API only. Each test starts its own server (it serves one client and exits
// when it leaves: 0 when all went well, 1 when its DMA check failed), reads its stderr for
// failed commands, and checks that fds and threads are back where they started.
import { spawn, spawnSync } from 'node:child_process'
import diagnosticsChannel from 'node:diagnostics_channel'
import { readlinkSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { allocateDmaMemory, migrate, type VfioUserClient } from '../ts/index'
import {
  connectRetrying,
  expectCountsBack,
  failures,
  librarySamples,
  relayOneSession,
  type Sample,
  startSample,
  threadCount,
  warmUp,
} from './peers'
import { refusal, rejection } from './rejection'
import { openFds } from './session'
import { startTap, type TapProcess, throughTap } from './through-tap'

const BAR0 = 0
const BAR1 = 1
const CONFIG = 7
const BAR1_SIZE = 0x4000
const PAGE = 4096
const cli = join(__dirname, '..', 'dist', 'cli.js')

/** A client of `server`, the server, and the tap between them when the run uses one. */
interface Peer {
  server: Sample
  client: VfioUserClient
  relay?: TapProcess
}

let peers: Peer[] = []
let fdBase = 0
let threadBase = 0

beforeAll(async () => {
  librarySamples()
  // Warm up what the process starts lazily (libuv's threadpool, the module) with one whole
  // session, so that the baselines below count only what a test leaves behind.
  await warmUp()
  const p = await start()
  await p.client.close()
  await p.server.waitExit()
  // Its tap (through-tap runs) ends with it: none outlives the run.
  await p.relay?.close()
  peers = []
})

beforeEach(() => {
  fdBase = openFds()
  threadBase = threadCount()
})

/** Per test: every server exits 0 once its client left, and logged no failed command. */
afterEach(async () => {
  for (const p of peers.splice(0)) {
    await p.client.close()
    await p.server.waitExit()
    await p.relay?.close()
  }
})

/** Starts a server and connects to it (negotiated), through a tap when the run says so. */
async function start(args: string[] = []): Promise<Peer> {
  const server = await startSample('server', args)
  const relay = throughTap ? await startTap(server.socketPath) : undefined
  const client = await connectRetrying(relay?.path ?? server.socketPath)
  await client.validateVersion()
  const p = { server, client, relay }
  peers.push(p)
  return p
}

/** Ends a test's sessions and checks what they left: exit 0, no failed command, no fd or thread. */
async function finish(expected: RegExp[] = []): Promise<void> {
  for (const p of peers.splice(0)) {
    await p.client.close()
    const exit = await p.server.waitExit()
    expect(failures(p.server.stderr(), expected)).toEqual([])
    expect(exit).toEqual({ code: 0, signal: null, killed: false })
    // Through a tap, everything that passed was decoded.
    await p.relay?.close()
    expect(p.relay?.output() ?? '').not.toContain('undecodable')
  }
  await expectCountsBack(fdBase, threadBase)
}

/** Byte i of BAR1 contents `seed`. */
function pattern(seed: number, size = BAR1_SIZE): Buffer {
  const b = Buffer.alloc(size)
  for (let i = 0; i < size; i++) b[i] = (i * 13 + seed + (i >> 8)) & 0xff
  return b
}

/** BAR0 holds a time; a write of a future time arms the server's one-shot timer (RUNNING only). */
function time(t: number): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigInt64LE(BigInt(t))
  return b
}

const now = () => Math.floor(Date.now() / 1000)

/**
 * The time BAR0 holds: a read returns the server's `time(NULL)` minus it, so it lies in
 * [before - r, after - r] for the clock read around the read.
 */
async function bar0Time(c: VfioUserClient): Promise<{ low: number; high: number }> {
  const before = now()
  const r = Number((await c.regionRead(BAR0, 0, 8)).readBigInt64LE(0))
  const after = now()
  return { low: before - r, high: after - r }
}

describe("libvfio-user's server sample", () => {
  it('version: 0.0 with its capabilities, migration included though we did not offer it', async () => {
    const { client } = await start()
    const v = await client.validateVersion()
    expect(v).toMatchObject({ major: 0, minor: 0, warnings: [] })
    // It says nothing of pgsizes, max_dma_maps or write_multiple: the spec's defaults hold.
    expect(v.capabilities).toMatchObject({
      maxMsgFds: 8,
      maxDataXferSize: 1048576,
      pgsizes: 4096,
      maxDmaMaps: 65535,
      writeMultiple: false,
    })
    // Sent whenever the device has migration callbacks (protocol.md 7): accepted, reported.
    expect(v.capabilities.migration).toMatchObject({ pgsize: 4096 })
    await finish()
  })

  it('vfio-user probe: its regions (BAR1 with its sparse areas and fd), irqs and PCI ids', async () => {
    const server = await startSample('server')
    const r = spawnSync(process.execPath, [cli, 'probe', server.socketPath, '--json'], {
      encoding: 'utf8',
      timeout: 20_000,
    })
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' })
    const p = JSON.parse(r.stdout)
    expect(p.device).toMatchObject({ numRegions: 9, numIrqs: 5, reset: true })
    expect(p.regions.find((x: { index: number }) => x.index === BAR1)).toMatchObject({
      size: String(BAR1_SIZE),
      mmap: true,
      hasFd: true,
      sparse: [
        { offset: '0', size: '4096' },
        { offset: '8192', size: '4096' },
      ],
    })
    expect(p.irqs.map((x: { count: number }) => x.count)).toEqual([1, 0, 0, 1, 1])
    expect(p.pci).toMatchObject({ vendorId: 0xdead, deviceId: 0xbeef, subsystemVendorId: 0xcafe, subsystemId: 0xbabe })
    expect(p.errors).toEqual([])
    const exit = await server.waitExit()
    expect(failures(server.stderr())).toEqual([])
    expect(exit).toEqual({ code: 0, signal: null, killed: false })
    expect(openFds()).toBe(fdBase)
  })

  it('deviceInfo: PCI with reset, 9 regions, 5 irq indexes', async () => {
    const { client } = await start()
    expect(await client.deviceInfo()).toEqual({ flags: 3, reset: true, pci: true, numRegions: 9, numIrqs: 5 })
    await finish()
  })

  it('regionInfo: BAR1 judged from the reply to the retry (caps and fd come only then), BAR0, config space', async () => {
    const { client } = await start()
    const asked: number[] = []
    const onRequest = (m: unknown) => asked.push((m as { command: number }).command)
    diagnosticsChannel.subscribe('vfio-user:request', onRequest)
    try {
      // The first reply for BAR1 says MMAP with no CAPS and no fd, and asks for 80 bytes.
      using bar1 = await client.regionInfo(BAR1)
      expect(asked).toEqual([5, 5])
      expect(bar1).toMatchObject({ index: 1, read: true, write: true, mmap: true, size: 0x4000n, offset: 0n })
      expect(bar1.sparse).toEqual([
        { offset: 0n, size: 0x1000n },
        { offset: 0x2000n, size: 0x1000n },
      ])
      expect(bar1.warnings).toEqual([])
      expect(readlinkSync(`/proc/self/fd/${bar1.fd}`)).toMatch(/^\/tmp\/libvfio-user\.\w+ \(deleted\)$/)
      asked.length = 0
      using bar0 = await client.regionInfo(BAR0)
      expect(asked).toEqual([5])
      expect(bar0).toMatchObject({ size: 8n, mmap: false, read: true, write: true, fd: undefined, sparse: undefined })
      using config = await client.regionInfo(CONFIG)
      expect(config).toMatchObject({ size: 256n, mmap: false, fd: undefined })
    } finally {
      diagnosticsChannel.unsubscribe('vfio-user:request', onRequest)
    }
    await finish()
  })

  it('regionRead and regionWrite of all of BAR1, async and sync, and mapRegion shows what was written', async () => {
    const { client } = await start()
    const one = pattern(1)
    await client.regionWrite(BAR1, 0, one)
    expect((await client.regionRead(BAR1, 0, BAR1_SIZE)).equals(one)).toBe(true)
    const two = pattern(2)
    client.regionWriteSync(BAR1, 0, two)
    expect(client.regionReadSync(BAR1, 0, BAR1_SIZE).equals(two)).toBe(true)
    const into = Buffer.alloc(BAR1_SIZE)
    await client.regionRead(BAR1, 0, BAR1_SIZE, { into })
    expect(into.equals(two)).toBe(true)
    // The sparse areas, mapped from the region's fd: the same bytes, and a store through the
    // mapping reaches the device.
    // Its fd is an unlinked temporary file, which the server could shrink: mapped only once
    // that risk is accepted.
    expect((await rejection(client.mapRegion(BAR1))).code).toBe('EPERM')
    using bar1 = await client.mapRegion(BAR1, { allowShrinkable: true })
    expect(bar1.areas.map((a) => a.offset)).toEqual([0n, 0x2000n])
    expect(bar1.areas[0].buffer.equals(two.subarray(0, 0x1000))).toBe(true)
    expect(bar1.areas[1].buffer.equals(two.subarray(0x2000, 0x3000))).toBe(true)
    bar1.areas[0].buffer.write('mapped', 0)
    expect((await client.regionRead(BAR1, 0, 6)).toString()).toBe('mapped')
    // BAR0 holds a time: the written one comes back, as the server's clock minus it.
    const t = now() + 3600
    await client.regionWrite(BAR0, 0, time(t))
    const held = await bar0Time(client)
    expect(held.low).toBeLessThanOrEqual(t)
    expect(held.high).toBeGreaterThanOrEqual(t)
    await finish()
  })

  it('accesses it would refuse are refused before sending: nothing reaches its log', async () => {
    const { client } = await start()
    await client.deviceInfo()
    expect(await refusal(client.regionRead(99, 0, 4))).toMatchObject({ code: 'ERR_OUT_OF_RANGE' })
    ;(await client.regionInfo(BAR1)).close()
    expect(await refusal(client.regionWrite(BAR1, BAR1_SIZE - 2, Buffer.alloc(4)))).toMatchObject({
      code: 'ERR_OUT_OF_RANGE',
    })
    // finish() fails on "bad region index" or "out of bounds region access" in its stderr.
    await finish()
  })

  it('irqInfo of every index', async () => {
    const { client } = await start()
    const infos = []
    for (let i = 0; i < 5; i++) infos.push(await client.irqInfo(i))
    expect(infos.map((x) => [x.index, x.count, x.eventfd])).toEqual([
      [0, 1, true],
      [1, 0, true],
      [2, 0, true],
      [3, 1, true],
      [4, 1, true],
    ])
    await finish()
  })

  it('its timer test: INTx through our eventfd, DMA into DmaMemory by mmap and into a Buffer by DMA_WRITE/DMA_READ served natively, the pages it wrote reported dirty', async () => {
    const { client, server } = await start()
    // Slot 0 is the first map (a Buffer: no fd, reached by messages), slot 1 the second (a
    // memfd it mmaps). It writes 1 KiB each of 'A'..'D' into both, reads them back and checks
    // a CRC of what it read: it exits 1 if any byte came back wrong.
    const messages = Buffer.alloc(PAGE)
    const memory = allocateDmaMemory(PAGE)
    await client.dmaMap({ iova: 0x10_0000n, size: PAGE, memory: messages })
    await client.dmaMap({ iova: 0x20_0000n, size: PAGE, memory })
    expect((await client.startDirtyLogging({ pageSize: PAGE })).pageSize).toBe(BigInt(PAGE))
    const irqs = await client.enableIrqs(0, { start: 0, count: 1 })
    const served: string[] = []
    // It reads the next message on the socket as the reply to its DMA request (protocol.md
    // 7): nothing may be sent until all six are served, so wait for them before anything else.
    const done = new Promise<void>((resolve) => {
      client.on('dma', (e) => {
        served.push(`${e.command} ${e.address.toString(16)} ${e.count}${e.code ? ` ${e.code}` : ''}`)
        if (served.length === 6) resolve()
      })
    })
    const fired = new Promise<{ index: number; vector: number; count: number }>((resolve) => irqs.once('irq', resolve))
    // Two seconds from now (its timer counts whole seconds; one could round down to none).
    await client.regionWrite(BAR0, 0, time(now() + 2))
    expect(await fired).toEqual({ index: 0, vector: 0, count: 1 })
    await done
    expect(served).toEqual([
      'DMA_WRITE 100000 1024',
      'DMA_WRITE 100400 1024',
      'DMA_WRITE 100800 1024',
      'DMA_WRITE 100c00 1024',
      'DMA_READ 100000 2048',
      'DMA_READ 100800 2048',
    ])
    const expected = Buffer.concat(['A', 'B', 'C', 'D'].map((c) => Buffer.alloc(1024, c)))
    expect(messages.equals(expected)).toBe(true)
    expect(memory.buffer.equals(expected)).toBe(true)
    // It marks the page it wrote through its mapping, once; the report clears it.
    expect(await client.dirtyPages({ iova: 0x20_0000n, length: PAGE, pageSize: PAGE })).toEqual([
      { iova: 0x20_0000n, length: BigInt(PAGE) },
    ])
    expect(await client.dirtyPages({ iova: 0x20_0000n, length: PAGE, pageSize: PAGE })).toEqual([])
    await client.stopDirtyLogging()
    await irqs.disable()
    await client.dmaUnmap({ iova: 0x10_0000n, size: PAGE })
    await client.dmaUnmap({ iova: 0x20_0000n, size: PAGE })
    memory.close()
    // Exit 0 (checked by finish) means its CRC of what it read back matched what it wrote.
    await finish()
    expect(server.stdout()).toContain('doing dma io')
  })

  it('reset: accepted, and the device keeps its state', async () => {
    const { client } = await start()
    const data = pattern(5)
    await client.regionWrite(BAR1, 0, data)
    await client.reset()
    expect((await client.regionRead(BAR1, 0, BAR1_SIZE)).equals(data)).toBe(true)
    await finish()
  })
})

describe("migration between two of libvfio-user's server processes", () => {
  /**
   * A source with BAR1 written and BAR0 holding a time an hour away (the destination arms its
   * timer with it when it runs, and refuses a time in the past), and a destination.
   */
  async function pair(seed: number) {
    const src = await start()
    const dst = await start()
    const data = pattern(seed)
    await src.client.regionWrite(BAR1, 0, data)
    const t = now() + 3600 + seed
    await src.client.regionWrite(BAR0, 0, time(t))
    return { src, dst, data, t }
  }

  /** BAR1 and BAR0 of the destination are the source's. */
  async function same(c: VfioUserClient, data: Buffer, t: number) {
    expect((await c.regionRead(BAR1, 0, BAR1_SIZE)).equals(data)).toBe(true)
    const held = await bar0Time(c)
    expect(held.low).toBeLessThanOrEqual(t)
    expect(held.high).toBeGreaterThanOrEqual(t)
  }

  /** Drains one pass of saveState: the bytes it carried. */
  async function drain(c: VfioUserClient): Promise<Buffer> {
    const parts: Buffer[] = []
    await pipeline(
      c.saveState(),
      new Writable({
        write(chunk: Buffer, _e, done) {
          parts.push(chunk)
          done()
        },
      }),
    )
    return Buffer.concat(parts)
  }

  it('a pre-copy pass reads BAR1, its replies padded to the size asked; the state saved in STOP_COPY, piped into loadState, runs on the destination', async () => {
    const { src, dst, data, t } = await pair(3)
    expect(await src.client.migrationFlags()).toEqual({ stopCopy: true, p2p: false, preCopy: true, flags: 5 })
    await src.client.setMigrationState('preCopy')
    // One read of 1 MiB: 16 KiB of data in a reply of 1 MiB + 8 (protocol.md 7), then the end.
    expect((await drain(src.client)).equals(data)).toBe(true)
    // Its stop-copy stream is whole (BAR1, then BAR0): what libvfio-user's own client loads.
    await src.client.setMigrationState('stopCopy')
    await dst.client.setMigrationState('resuming')
    let moved = 0
    const save = src.client.saveState({ chunkSize: 4096 })
    save.on('data', (chunk: Buffer) => {
      moved += chunk.length
    })
    await pipeline(save, dst.client.loadState())
    expect(moved).toBe(BAR1_SIZE + 8)
    await src.client.setMigrationState('stop')
    // Entering RUNNING, it asserts that exactly BAR1 and BAR0 arrived (SIGABRT otherwise).
    await dst.client.setMigrationState('running')
    expect(await dst.client.migrationState()).toBe('running')
    await same(dst.client, data, t)
    await finish()
  })

  it('migrate() moves the state natively: the destination runs with BAR0 and BAR1 of the source', async () => {
    const { src, dst, data, t } = await pair(4)
    // Its pre-copy data is BAR1 again in STOP_COPY: a destination given both refuses the rest,
    // so this sample migrates without pre-copy rounds (see the README's interop table).
    const summary = await migrate(src.client, dst.client, { maxPreCopyRounds: 0, chunkSize: 4096 })
    expect(summary).toMatchObject({ rounds: 0, preCopyBytes: 0, stopCopyBytes: BAR1_SIZE + 8 })
    expect(await src.client.migrationState()).toBe('stop')
    expect(await dst.client.migrationState()).toBe('running')
    await same(dst.client, data, t)
    // The same migration again (run twice by mistake): refused, the source not restarted.
    const again = await rejection(migrate(src.client, dst.client, { maxPreCopyRounds: 0 }))
    expect(again).toMatchObject({ code: 'EBUSY', phase: 'prepare', sourceState: 'stop', destinationState: 'running' })
    expect(await src.client.migrationState()).toBe('stop')
    expect(await dst.client.migrationState()).toBe('running')
    await same(dst.client, data, t)
    await finish()
  })

  it('npx vfio-user migrate between two server processes: the destination runs with BAR0 and BAR1 of the source', async () => {
    // Each server takes one client in its life. The relays let the test set the source's state
    // and look at the destination's, on the same sessions the CLI uses (the CLI's VERSION is
    // answered with the server's first reply; everything else passes untouched).
    const src = await startSample('server')
    const dst = await startSample('server')
    const srcRelay = await relayOneSession(src.socketPath)
    const dstRelay = await relayOneSession(dst.socketPath)
    try {
      const data = pattern(6)
      const t = now() + 3600
      {
        await using c = await connectRetrying(srcRelay.path)
        await c.validateVersion()
        await c.regionWrite(BAR1, 0, data)
        await c.regionWrite(BAR0, 0, time(t))
      }
      const run = spawn(
        process.execPath,
        [cli, 'migrate', srcRelay.path, dstRelay.path, '--max-rounds', '0', '--json'],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      )
      let out = ''
      let err = ''
      run.stdout.setEncoding('utf8').on('data', (d: string) => {
        out += d
      })
      run.stderr.setEncoding('utf8').on('data', (d: string) => {
        err += d
      })
      const code = await new Promise<number | null>((r) => run.once('exit', r))
      expect({ code, err }).toEqual({ code: 0, err: '' })
      expect(JSON.parse(out)).toMatchObject({ bytes: BAR1_SIZE + 8, rounds: 0 })
      {
        await using c = await connectRetrying(dstRelay.path)
        await c.validateVersion()
        expect(await c.migrationState()).toBe('running')
        await same(c, data, t)
      }
    } finally {
      await srcRelay.close()
      await dstRelay.close()
    }
    for (const s of [src, dst]) {
      const exit = await s.waitExit()
      expect(failures(s.stderr())).toEqual([])
      expect(exit).toEqual({ code: 0, signal: null, killed: false })
    }
    expect(openFds()).toBe(fdBase)
  })
})
