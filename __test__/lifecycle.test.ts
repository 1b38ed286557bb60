// Hundreds of connections, ended every way: closed, ended by the server, killed with requests
// in flight, closed while the server dies, or dropped and garbage-collected without close().
// After each way, the process's open fds and threads are back where they started.
import { readdirSync, readFileSync } from 'node:fs'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { allocateDmaMemory, Command, connect, MigrationError, migrate, type VfioUserClient } from '../ts/index'
import { startMigrationDevice, startScriptedPeer, startTestDevice, type TestDevice } from '../ts/testing'
import { rejection } from './rejection'
import { getInfoPayload } from './wire'

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

const openFds = () => readdirSync('/proc/self/fd').length
/**
 * Our I/O threads (named vfio-user-io). Node starts threads of its own when it likes (V8's
 * GC helpers under load); counting every task made these tests fail now and then on a busy
 * machine without anything of ours outliving its connection.
 */
const threads = () =>
  readdirSync('/proc/self/task').filter((t) => {
    try {
      return readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim() === 'vfio-user-io'
    } catch {
      return false // the thread ended while we looked
    }
  }).length
const turn = () => new Promise<void>((resolve) => setImmediate(resolve))

interface Counts {
  fds: number
  threads: number
}
const counts = (): Counts => ({ fds: openFds(), threads: threads() })

/**
 * The counts once the kernel has reaped the I/O threads already joined: `close()` resolves
 * after the join, but a thread that has exited can stay listed in /proc/self/task a moment
 * longer (the join returns when it clears its tid, before it is released), and no event says
 * when it is gone. So look again, yielding the CPU a millisecond at a time, for at most 5 s:
 * a bound in time, not in event-loop turns (which a slow machine can run through before the
 * kernel gets round to it); anything really left behind stays and fails the test.
 */
async function settled(base: Counts): Promise<Counts> {
  const deadline = Date.now() + 5000
  for (;;) {
    const now = counts()
    if ((now.fds === base.fds && now.threads === base.threads) || Date.now() > deadline) return now
    await new Promise((resolve) => setTimeout(resolve, 1))
  }
}

/** Collects garbage until the counts are back to `base` (or gives up after many rounds). */
async function collectUntil(base: Counts): Promise<Counts> {
  for (let i = 0; i < 200; i++) {
    gc()
    await turn()
    const now = counts()
    if (now.fds <= base.fds && now.threads <= base.threads) return now
  }
  return counts()
}

let serving: TestDevice
let holding: TestDevice
let base: Counts

beforeAll(async () => {
  serving = await startScriptedPeer('serve')
  holding = await startScriptedPeer('hold')
  // Warm up what is created once per process (libuv's threadpool, used by connect).
  const c = await connect(serving.socketPath)
  await c.validateVersion()
  await c.close()
  base = counts()
})

afterAll(async () => {
  await serving?.close()
  await holding?.close()
})

describe('connections ended every way release every fd and thread', () => {
  it('close(): 300 connections, one after another and 50 at once', async () => {
    for (let i = 0; i < 250; i++) {
      const c = await connect(serving.socketPath)
      await c.validateVersion()
      await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
      await c.close()
      expect(await settled(base)).toEqual(base)
    }
    const many = await Promise.all(Array.from({ length: 50 }, () => connect(serving.socketPath)))
    await Promise.all(many.map((c) => c.validateVersion()))
    expect(openFds()).toBeGreaterThanOrEqual(base.fds + 50 * 3)
    // One I/O thread each: what the thread counts below must find gone.
    expect(threads()).toBe(base.threads + 50)
    await Promise.all(many.map((c) => c.close()))
    expect(await settled(base)).toEqual(base)
  })

  it('server EOF with requests pending: 100 connections', async () => {
    await using peer = await startScriptedPeer('eof-pending')
    // The peer process's own pipes are ours too while it runs.
    const withPeer = counts()
    for (let i = 0; i < 100; i++) {
      const c = await connect(peer.socketPath, { timeoutMs: 600_000 })
      await c.validateVersion()
      const closed = new Promise((resolve) => c.once('close', resolve))
      const results = await Promise.allSettled(
        Array.from({ length: 5 }, () => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())),
      )
      expect(results.map((r) => r.status === 'rejected' && r.reason.code)).toEqual(Array(5).fill('ECONNRESET'))
      await closed
      // Released when 'close' was emitted, without close() being called.
      expect(c.closed).toBe(true)
      expect(await settled(withPeer)).toEqual(withPeer)
    }
  })

  it('the server killed with requests in flight, and close() racing its death', async () => {
    for (let i = 0; i < 20; i++) {
      await using device = await startTestDevice()
      const c = await connect(device.socketPath, { timeoutMs: 600_000 })
      await c.validateVersion()
      // Stopped first, so the requests are surely in flight when it dies.
      process.kill(device.pid, 'SIGSTOP')
      const closed = new Promise((resolve) => c.once('close', resolve))
      // Each watched at once: they may settle in different turns, in any order.
      const pending = Array.from({ length: 10 }, () => rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())))
      process.kill(device.pid, 'SIGKILL')
      if (i % 2 === 1) void c.close()
      for (const e of await Promise.all(pending)) expect(['ECONNRESET', 'ECONNABORTED']).toContain(e.code)
      await closed
      await device.close()
      expect(await settled(base)).toEqual(base)
    }
  })

  it('large reads into memory in flight as 40 connections end (closed or the server killed, some aborted)', async () => {
    for (let i = 0; i < 40; i++) {
      await using device = await startTestDevice()
      const c = await connect(device.socketPath, { timeoutMs: 600_000 })
      await c.validateVersion()
      process.kill(device.pid, 'SIGSTOP')
      const closed = new Promise((resolve) => c.once('close', resolve))
      const abort = new AbortController()
      const reads = Array.from({ length: 4 }, (_, k) =>
        c
          .regionRead(2, 0, 1 << 20, { into: Buffer.alloc(1 << 20), signal: k % 2 === 1 ? abort.signal : undefined })
          .then(
            () => 'read',
            (e) => (e.name === 'AbortError' ? e.name : e.code),
          ),
      )
      abort.abort()
      if (i % 2 === 1) void c.close()
      else process.kill(device.pid, 'SIGKILL')
      const outcomes = await Promise.all(reads)
      expect(outcomes.filter((_, k) => k % 2 === 1)).toEqual(['AbortError', 'AbortError'])
      for (const o of outcomes.filter((_, k) => k % 2 === 0)) expect(['ECONNRESET', 'ECONNABORTED']).toContain(o)
      await closed
      // The device closed on is still stopped.
      if (i % 2 === 1) process.kill(device.pid, 'SIGKILL')
      await device.close()
      expect(await settled(base)).toEqual(base)
    }
  })

  it('dropped without close(): 200 idle clients are garbage-collected with their thread and fds', async () => {
    async function openAndForget(n: number) {
      // Kept reachable until the count: a collection during the loop (when exactly is V8's
      // choice) must not make the fds look as if they were never held.
      const clients: VfioUserClient[] = []
      for (let i = 0; i < n; i++) {
        const c = await connect(serving.socketPath)
        await c.validateVersion()
        await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
        clients.push(c)
      }
      expect(openFds()).toBeGreaterThan(base.fds + n)
    }
    await openAndForget(200)
    expect(await collectUntil(base)).toEqual(base)
  })

  it('DMA memory, mapped regions and interrupts leave no fd or mapping behind', async () => {
    const mappings = () =>
      readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .filter((l) => l.includes('memfd:vfio-user')).length
    const before = mappings()
    async function useAndDrop() {
      await using device = await startTestDevice()
      const c = await connect(device.socketPath)
      await c.validateVersion()
      for (let i = 0; i < 10; i++) {
        using m = allocateDmaMemory(8192)
        await c.dmaMap({ iova: 0x10000, size: 8192, memory: m })
        m.buffer.fill(i)
        await c.dmaUnmap({ iova: 0x10000, size: 8192 })
      }
      // Left mapped and enabled: close() unmaps the region and closes the eventfds.
      const bar = await c.mapRegion(0)
      bar.areas[0]?.buffer.fill(1)
      const irqs = await c.enableIrqs(1, { count: 4 })
      expect(irqs.fds).toHaveLength(4)
      expect(mappings()).toBeGreaterThan(before)
      await c.close()
    }
    await useAndDrop()
    // DMA memory is unmapped by its close() (`using`), once unmapped for DMA; the region's
    // mapping by the connection's close: nothing waits for the garbage collector.
    expect(mappings()).toBe(before)
    expect(await collectUntil(base)).toEqual(base)
  })

  it('a client with a request in flight is not collected: its promise settles', async () => {
    // In a function, so nothing here keeps the client (or the error, whose unformatted stack
    // refers to it) once the code is known.
    async function inFlightWhileCollecting(): Promise<string> {
      const pending = (async () => {
        const c = await connect(holding.socketPath)
        await c.validateVersion()
        return c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 200 })
      })()
      for (let i = 0; i < 5; i++) {
        gc()
        await turn()
      }
      return (await rejection(pending)).code
    }
    expect(await inFlightWhileCollecting()).toBe('ETIMEDOUT')
    expect(await collectUntil(base)).toEqual(base)
  })

  it('100 migrations on fresh connections, one in five aborted mid-stream, leave no fd or thread behind', async () => {
    await using a = await startMigrationDevice()
    await using b = await startMigrationDevice()
    const before = counts()
    let [from, to] = [a.socketPath, b.socketPath]
    for (let i = 0; i < 100; i++) {
      const source = await connect(from)
      const dest = await connect(to)
      await Promise.all([source.validateVersion(), dest.validateVersion()])
      // One in five is aborted once the native pump has moved its first slice.
      const ac = new AbortController()
      const abort = i % 5 === 4
      const moved = await migrate(source, dest, {
        signal: ac.signal,
        progressBytes: 256 << 10,
        onProgress: () => {
          if (abort) ac.abort()
        },
      }).then(
        (s) => s.bytes,
        (e: unknown) => (e instanceof MigrationError ? e.code : e),
      )
      if (abort) {
        expect(moved).toBe('ECANCELED')
        // Left resuming with part of a state: only a reset brings it back.
        expect(await dest.migrationState()).toBe('resuming')
        await dest.reset()
      } else {
        expect(moved).toBeGreaterThan(1 << 20)
        ;[from, to] = [to, from]
      }
      await Promise.all([source.close(), dest.close()])
    }
    expect(await settled(before)).toEqual(before)
  })
})

describe('a process with an idle client exits; one with a request in flight waits for it', () => {
  // Run as a separate node process on the compiled package (dist/), as a user would.
  async function runChild(script: string, socketPath: string) {
    const { spawnSync } = await import('node:child_process')
    const { join } = await import('node:path')
    const dist = join(__dirname, '..', 'dist', 'index.js')
    return spawnSync(process.execPath, ['-e', script, dist, socketPath], { encoding: 'utf8', timeout: 20_000 })
  }

  it('an idle, unclosed client does not keep node alive', async () => {
    const r = await runChild(
      `const { connect } = require(process.argv[1]);
       connect(process.argv[2]).then((c) => c.validateVersion()).then(() => console.log('negotiated'))`,
      serving.socketPath,
    )
    expect(r.stdout.trim()).toBe('negotiated')
    expect(r.status).toBe(0)
  })

  it('a pending request keeps node alive until it settles', async () => {
    const r = await runChild(
      `const { connect } = require(process.argv[1]);
       connect(process.argv[2]).then(async (c) => {
         await c.validateVersion()
         const p = Buffer.alloc(16); p.writeUInt32LE(16, 0)
         c.sendWait(4, p, { timeoutMs: 300 }).catch((e) => console.log('settled', e.code))
       })`,
      holding.socketPath,
    )
    expect(r.stdout.trim()).toBe('settled ETIMEDOUT')
    expect(r.status).toBe(0)
  })
})
