// Migration against the migration-capable device (crates/test-device, migration_device):
// real state saved from one device process and loaded into another, pre-copy rounds that
// resend only what changed, dirty logging of the pages the device really wrote.
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { afterEach, describe, expect, it } from 'vitest'
import { allocateDmaMemory, connect, MigrationError, migrate, type VfioUserClient, VfioUserError } from '../ts/index'
import { startMigrationDevice, startScriptedPeer, type TestDevice } from '../ts/testing'
import { refusedArg, rejection } from './rejection'
import { openFds } from './session'

const STATE = 0
const CTRL = 1
const PAGE = 4096
const RECORD_HEAD = 16

interface Running {
  device: TestDevice
  client: VfioUserClient
}

const opened: Running[] = []
afterEach(async () => {
  for (const r of opened.splice(0)) {
    await r.client.close()
    await r.device.close()
  }
})

async function start(stateMib = 1, writeMultiple = true, padReads = false): Promise<Running> {
  const device = await startMigrationDevice({ stateMib, writeMultiple, padReads })
  const client = await connect(device.socketPath)
  await client.validateVersion()
  const r = { device, client }
  opened.push(r)
  return r
}

/** Byte i of the pattern `seed` fills a state of `size` bytes. */
function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size)
  for (let i = 0; i < size; i++) b[i] = (i * 7 + seed + (i >> 12)) & 0xff
  return b
}

async function fill(c: VfioUserClient, data: Buffer): Promise<void> {
  const step = 1 << 20
  for (let at = 0; at < data.length; at += step) await c.regionWrite(STATE, at, data.subarray(at, at + step))
}

async function readState(c: VfioUserClient, size: number): Promise<Buffer> {
  const parts: Buffer[] = []
  const step = 1 << 20
  for (let at = 0; at < size; at += step) parts.push(await c.regionRead(STATE, at, Math.min(step, size - at)))
  return Buffer.concat(parts)
}

/** Tells the device to rewrite `count` pages of its state, every `stride`-th from `first`. */
async function work(c: VfioUserClient, first: number, stride: number, count: number): Promise<void> {
  const regs = Buffer.alloc(12)
  regs.writeUInt32LE(first, 0)
  regs.writeUInt32LE(stride, 4)
  regs.writeUInt32LE(count, 8)
  await c.regionWrite(CTRL, 0x18, regs)
}

/** One pass of saveState, drained: the bytes it carried. */
async function drain(c: VfioUserClient): Promise<number> {
  let n = 0
  await pipeline(
    c.saveState(),
    new Writable({
      write(chunk: Buffer, _e, done) {
        n += chunk.length
        done()
      },
    }),
  )
  return n
}

describe('migration-capable device', () => {
  it('reports its migration flags and which features it has', async () => {
    const { client } = await start(1)
    expect(await client.migrationFlags()).toEqual({ stopCopy: true, p2p: false, preCopy: true, flags: 5 })
    expect(await client.deviceFeature.probe(1, { get: true })).toBe(true)
    expect(await client.deviceFeature.probe(2, { get: true, set: true })).toBe(true)
    expect(await client.deviceFeature.probe(6, { set: true })).toBe(true)
    expect(await client.deviceFeature.probe(8, { get: true })).toBe(true)
    // MIGRATION cannot be SET; feature 3 does not exist here.
    expect(await client.deviceFeature.probe(1, { set: true })).toBe(false)
    expect(await client.deviceFeature.probe(3, { get: true })).toBe(false)
    expect(client.version?.capabilities.writeMultiple).toBe(true)
  })

  // Padded: every MIG_DATA_READ reply carries the size asked, as libvfio-user's do.
  it.each([
    ['', false],
    [', its replies padded to the size asked', true],
  ])('pre-copy rounds send the whole state, then only the pages written since%s', async (_, pad) => {
    const { client } = await start(4, true, pad)
    await fill(client, pattern(4 << 20, 1))
    await client.setMigrationState('preCopy')
    // 1024 pages in records of at most 256 pages.
    expect(await drain(client)).toBe((4 << 20) + 4 * RECORD_HEAD)
    await work(client, 3, 100, 3)
    expect(await drain(client)).toBe(3 * (PAGE + RECORD_HEAD))
    expect(await drain(client)).toBe(0)
    // A page the client writes counts as well; STOP_COPY sends it and the end record.
    await client.regionWrite(STATE, 5 * PAGE + 10, Buffer.from('dirty'))
    await client.setMigrationState('stopCopy')
    expect(await drain(client)).toBe(PAGE + 2 * RECORD_HEAD)
    await client.setMigrationState('running')
  })

  it.each([
    ['', false],
    [', its replies padded to the size asked', true],
  ])('state saved from one process loads into a fresh one: the same contents%s', async (_, pad) => {
    const size = 2 << 20
    const src = await start(2, true, pad)
    const dst = await start(2)
    const data = pattern(size, 9)
    await fill(src.client, data)
    expect((await readState(dst.client, size)).equals(Buffer.alloc(size))).toBe(true)
    const phases = new Set<string>()
    const summary = await migrate(src.client, dst.client, { onProgress: (p) => phases.add(`${p.phase}`) })
    // Round 1 moves everything (over convergedBytes), round 2 nothing: converged.
    expect(summary.rounds).toBe(2)
    expect(summary.preCopyBytes).toBe(size + 2 * RECORD_HEAD)
    expect(summary.stopCopyBytes).toBe(RECORD_HEAD)
    expect(summary.bytes).toBe(summary.preCopyBytes + summary.stopCopyBytes)
    expect([...phases]).toEqual(['preCopy', 'stopCopy'])
    expect(await dst.client.migrationState()).toBe('running')
    expect(await src.client.migrationState()).toBe('stop')
    expect((await readState(dst.client, size)).equals(data)).toBe(true)
    // The destination runs: its state changes again.
    await dst.client.regionWrite(STATE, 0, Buffer.from([0xee]))
    expect((await dst.client.regionRead(STATE, 0, 1))[0]).toBe(0xee)
  })

  it.each([
    ['', false],
    [', its replies padded to the size asked', true],
  ])('without pre-copy the whole state moves in STOP_COPY%s', async (_, pad) => {
    const src = await start(1, true, pad)
    const dst = await start(1)
    const data = pattern(1 << 20, 4)
    await fill(src.client, data)
    const summary = await migrate(src.client, dst.client, { maxPreCopyRounds: 0 })
    expect(summary).toMatchObject({ rounds: 0, preCopyBytes: 0, stopCopyBytes: (1 << 20) + 2 * RECORD_HEAD })
    expect((await readState(dst.client, 1 << 20)).equals(data)).toBe(true)
  })

  it('saveState piped into loadState from a source that pads its replies: the data, never the padding', async () => {
    const size = 1 << 20
    const src = await start(1, true, true)
    const dst = await start(1)
    const data = pattern(size, 6)
    await fill(src.client, data)
    await src.client.setMigrationState('stopCopy')
    await dst.client.setMigrationState('resuming')
    let carried = 0
    // 64 KiB reads: the last is short, so its reply carries zeros past its data.
    const save = src.client.saveState({ chunkSize: 64 << 10 })
    save.on('data', (chunk: Buffer) => {
      carried += chunk.length
    })
    await pipeline(save, dst.client.loadState())
    expect(carried).toBe(size + 2 * RECORD_HEAD)
    await dst.client.setMigrationState('running')
    expect((await readState(dst.client, size)).equals(data)).toBe(true)
  })

  it('the stream is refused outside PRE_COPY and STOP_COPY, and a broken one leaves the device in ERROR', async () => {
    const { client } = await start(1)
    const e = await rejection(drain(client))
    expect(e).toBeInstanceOf(VfioUserError)
    expect(e.code).toBe('EINVAL')
    await client.setMigrationState('resuming')
    // A record that claims bytes past the state.
    const bad = Buffer.alloc(RECORD_HEAD)
    bad.writeBigUInt64LE(1n << 30n, 0)
    bad.writeUInt32LE(PAGE, 8)
    const w = client.loadState()
    await expect(
      pipeline(async function* () {
        yield bad
      }, w),
    ).rejects.toMatchObject({ code: 'EINVAL' })
    expect(await client.migrationState()).toBe('error')
    await expect(client.setMigrationState('running')).rejects.toThrow(RangeError)
    await client.reset()
    expect(await client.migrationState()).toBe('running')
  })

  it('leaving RESUMING with an incomplete stream fails; the destination says it is in ERROR', async () => {
    const { client } = await start(1)
    await client.setMigrationState('resuming')
    await pipeline(async function* () {
      yield Buffer.alloc(8)
    }, client.loadState())
    expect((await rejection(client.setMigrationState('running'))).code).toBe('EINVAL')
    expect(await client.migrationState()).toBe('error')
  })

  it('dirty logging reports the pages the device wrote into mapped memory, once', async () => {
    const { client } = await start(1)
    using memory = allocateDmaMemory(16 * PAGE)
    const iova = 0x100000n
    await client.dmaMap({ iova, size: 16 * PAGE, memory, read: true, write: true })
    expect(await client.startDirtyLogging({ pageSize: 4096 })).toEqual({ pageSize: 4096n })
    const dma = Buffer.alloc(20)
    dma.writeBigUInt64LE(iova + 0x1800n, 0)
    dma.writeBigUInt64LE(0x2000n, 8)
    dma.writeUInt32LE(0xab, 16)
    await client.regionWrite(CTRL, 0, dma)
    // The device really wrote the memory: bytes 0x1800..0x3800 of the map.
    expect(memory.buffer.subarray(0x1800, 0x3800).every((b) => b === 0xab)).toBe(true)
    expect(memory.buffer[0x17ff]).toBe(0)
    const range = { iova, length: 16n * 4096n, pageSize: 4096 }
    // Pages 1, 2 and 3 are touched by 0x1800..0x3800.
    expect(await client.dirtyPages(range)).toEqual([{ iova: iova + 0x1000n, length: 0x3000n }])
    expect(await client.dirtyPages(range)).toEqual([])
    await client.stopDirtyLogging()
    // Logging only the last 8 pages: a write to the first ones is not reported.
    await client.startDirtyLogging({ pageSize: 8192, ranges: [{ iova: iova + 0x8000n, length: 0x8000n }] })
    await client.regionWrite(CTRL, 0, dma)
    dma.writeBigUInt64LE(iova + 0xa000n, 0)
    dma.writeBigUInt64LE(0x10n, 8)
    await client.regionWrite(CTRL, 0, dma)
    expect(await client.dirtyPages({ ...range, pageSize: 8192 })).toEqual([{ iova: iova + 0xa000n, length: 0x2000n }])
    await client.stopDirtyLogging()
    await client.dmaUnmap({ iova, size: 16 * PAGE })
    // Unmapped: the device's DMA fails.
    expect((await rejection(client.regionWrite(CTRL, 0, dma))).code).toBe('EFAULT')
  })

  it('a source killed mid-stream: MigrationError, the destination is left in RESUMING, no fd left', async () => {
    const before = openFds()
    const src = await start(16)
    const dst = await start(16)
    await fill(src.client, pattern(16 << 20, 2))
    let killed = false
    const e = await rejection(
      migrate(src.client, dst.client, {
        chunkSize: 256 << 10,
        progressBytes: 1 << 20,
        onProgress: (p) => {
          if (!killed && p.bytes > 1 << 20) {
            killed = true
            process.kill(src.device.pid, 'SIGKILL')
          }
        },
      }),
    )
    expect(e).toBeInstanceOf(MigrationError)
    const m = e as MigrationError
    expect(m.phase).toBe('preCopy')
    expect(m.sourceState).toBeUndefined()
    expect(m.destinationState).toBe('resuming')
    expect(m.message).toMatch(/destination resuming/)
    await src.client.close()
    await src.device.close()
    await dst.client.close()
    await dst.device.close()
    opened.splice(0)
    expect(openFds()).toBe(before)
  })

  it('saveState errors, typed, when the device is killed mid-stream; the destination says it is resuming', async () => {
    const src = await start(16)
    const dst = await start(16)
    await src.client.setMigrationState('stopCopy')
    await dst.client.setMigrationState('resuming')
    const save = src.client.saveState({ chunkSize: 64 << 10 })
    let first = true
    const e = await rejection(
      pipeline(
        save,
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const c of chunks) {
            if (first) {
              first = false
              process.kill(src.device.pid, 'SIGKILL')
            }
            yield c
          }
        },
        dst.client.loadState(),
      ),
    )
    expect(e.code).toMatch(/^ECONN/)
    expect(save.destroyed).toBe(true)
    expect(await dst.client.migrationState()).toBe('resuming')
  })

  it('bad options and the same client twice are refused before anything is sent', async () => {
    const src = await start(1)
    const dst = await start(1)
    await refusedArg(() => migrate(src.client, src.client), TypeError)
    await refusedArg(() => migrate(src.client, dst.client, { chunkSize: 0 }), RangeError)
    await refusedArg(() => migrate(src.client, dst.client, { maxPreCopyRounds: -1 }), RangeError)
    await refusedArg(() => migrate(src.client, dst.client, { progressBytes: 0.5 }), RangeError)
    expect(await src.client.migrationState()).toBe('running')
    expect(await dst.client.migrationState()).toBe('running')
  })

  it("a destination's failure names the destination: its socket, its command, side 'destination'", async () => {
    const src = await start(2)
    const dst = await start(1)
    // 2 MiB of state into a device that holds 1 MiB: the destination refuses a MIG_DATA_WRITE.
    const e = await rejection(migrate(src.client, dst.client, { maxPreCopyRounds: 0 }))
    expect(e).toBeInstanceOf(MigrationError)
    expect(e).toMatchObject({ side: 'destination', path: dst.device.socketPath, commandName: 'MIG_DATA_WRITE' })
    expect(e.message).toContain('migration failed in stopCopy, at the destination: ')
    expect(e.message).toContain(dst.device.socketPath)
    expect(e.message).not.toContain(src.device.socketPath)
    expect(await src.client.migrationState()).toBe('running')
  })

  it('a stopped source is refused with nothing changed (never two running copies); fromStopped migrates it stop-copy only and leaves it stopped', async () => {
    const src = await start(1)
    const dst = await start(1)
    const data = pattern(1 << 20, 11)
    await fill(src.client, data)
    await src.client.setMigrationState('stop')
    // The same migration run twice, say: the source was left stopped by the first.
    const e = await rejection(migrate(src.client, dst.client, { maxPreCopyRounds: 2 }))
    expect(e).toBeInstanceOf(MigrationError)
    expect(e).toMatchObject({ code: 'EBUSY', phase: 'prepare', sourceState: 'stop', destinationState: 'running' })
    expect(e.message).toMatch(/the source is stop, not running/)
    expect(await src.client.migrationState()).toBe('stop')
    expect(await dst.client.migrationState()).toBe('running')
    // Asked for: moved with the source stopped all along, which stays stopped.
    const summary = await migrate(src.client, dst.client, { maxPreCopyRounds: 2, fromStopped: true })
    expect(summary).toMatchObject({ rounds: 0, preCopyBytes: 0 })
    expect(summary.bytes).toBeGreaterThanOrEqual(1 << 20)
    expect(await src.client.migrationState()).toBe('stop')
    expect(await dst.client.migrationState()).toBe('running')
    expect((await readState(dst.client, 1 << 20)).equals(data)).toBe(true)
  })

  it('a destination that cannot resume is refused with nothing changed; a failed migration leaves a stopped source stopped', async () => {
    const src = await start(1)
    const dst = await start(1)
    await dst.client.setMigrationState('resuming')
    const e = await rejection(migrate(src.client, dst.client))
    expect(e).toMatchObject({ code: 'EBUSY', phase: 'prepare', sourceState: 'running', destinationState: 'resuming' })
    expect(await src.client.migrationState()).toBe('running')
    // A destination without migration: refused, and the stopped source is not restarted.
    await using plain = await startScriptedPeer('no-migration')
    const other = await connect(plain.socketPath)
    try {
      await other.validateVersion()
      await src.client.setMigrationState('stop')
      const f = await rejection(migrate(src.client, other, { fromStopped: true }))
      expect(f).toMatchObject({ code: 'ENOTSUP', phase: 'prepare' })
      expect(await src.client.migrationState()).toBe('stop')
    } finally {
      await other.close()
    }
  })

  it('an aborted migration puts the source back to running and leaves the destination resuming', async () => {
    const src = await start(4)
    const dst = await start(4)
    const data = pattern(4 << 20, 5)
    await fill(src.client, data)
    const ac = new AbortController()
    const e = await rejection(
      migrate(src.client, dst.client, {
        progressBytes: 1 << 20,
        onProgress: () => ac.abort(),
        signal: ac.signal,
      }),
    )
    expect(e).toBeInstanceOf(MigrationError)
    expect(e.code).toBe('ECANCELED')
    expect((e as MigrationError).sourceState).toBe('running')
    expect((e as MigrationError).destinationState).toBe('resuming')
    expect(await src.client.migrationState()).toBe('running')
    // The source still has its state, and runs on.
    expect((await readState(src.client, 4 << 20)).equals(data)).toBe(true)
  })

  it('a destination that stops answering mid-stream: the migration times out and the source runs again', async () => {
    const src = await start(4)
    await using stall = await startScriptedPeer('migration-stall')
    const dst = await connect(stall.socketPath, { timeoutMs: 200 })
    try {
      await dst.validateVersion()
      const before = src.client.inFlight
      // Each connection's own timeout applies: 200 ms to the destination, 5 s to the source.
      const e = await rejection(migrate(src.client, dst))
      expect(e).toBeInstanceOf(MigrationError)
      expect(e.code).toBe('ETIMEDOUT')
      const m = e as MigrationError
      expect(m.phase).toBe('preCopy')
      // The destination cannot be asked; the source was put back to running.
      expect(m.destinationState).toBeUndefined()
      expect(m.sourceState).toBe('running')
      expect(await src.client.migrationState()).toBe('running')
      expect(src.client.inFlight).toBe(before)
    } finally {
      await dst.close()
    }
  })

  it('loadState aborted through its signal fails with an AbortError and stops writing', async () => {
    const { client } = await start(8)
    await client.setMigrationState('resuming')
    const ac = new AbortController()
    const load = client.loadState({ chunkSize: 64 << 10, signal: ac.signal })
    const fed = pipeline(async function* () {
      yield Buffer.alloc(8 << 20)
      ac.abort()
      yield Buffer.alloc(8 << 20)
    }, load)
    await expect(fed).rejects.toMatchObject({ name: 'AbortError' })
    expect(load.destroyed).toBe(true)
    // The connection is still in step: a request after the abort is answered.
    expect(await client.migrationState()).toBe('resuming')
  })
})
