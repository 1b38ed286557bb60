// `vfio-user tap` and tap(): a real client and a real server that are not ours (libvfio-user's
// `client` and `server` samples) through the tap, the API's records, and sessions ended every
// way with fds and threads back where they were.
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { createReadStream, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createConnection } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { Command, connect, type TapMessage, type TapRecord, tap } from '../ts/index'
import { native } from '../ts/native'
import { startScriptedPeer } from '../ts/testing'
import { librarySamples, startSample, threadCount, warmUp } from './peers'
import { rejection } from './rejection'
import { openFds } from './session'
import { cli, startTap } from './through-tap'
import { getInfoPayload } from './wire'

let dir: string
beforeAll(async () => {
  await warmUp()
  dir = mkdtempSync(join(tmpdir(), 'vfio-user-tap-test-'))
})
afterAll(() => rmSync(dir, { recursive: true, force: true }))

let n = 0
const socketPath = () => join(dir, `tap-${++n}.sock`)

/** Every request (not No_reply) has exactly one reply or error, same session and id, from the other side, after it. */
function pairUp(messages: TapMessage[]): string[] {
  const problems: string[] = []
  const open = new Map<string, TapMessage>()
  for (const m of messages) {
    const key = `${m.session}:${m.from === 'client' ? 'c' : 's'}:${m.id}`
    const answers = `${m.session}:${m.from === 'client' ? 's' : 'c'}:${m.id}`
    if (m.kind === 'request') {
      if (m.noReply) continue
      if (open.has(key)) problems.push(`request ${key} ${m.command} while one with its id waits`)
      open.set(key, m)
    } else {
      const q = open.get(answers)
      if (!q) problems.push(`${m.kind} ${answers} ${m.command} answers nothing`)
      else if (q.command !== m.command) problems.push(`${m.command} answers ${q.command}`)
      open.delete(answers)
    }
  }
  for (const [k, q] of open) problems.push(`request ${k} ${q.command} never answered`)
  return problems
}

describe('vfio-user tap', () => {
  it("libvfio-user's own client drives its server through the tap: exit 0, every message decoded and paired, every fd through", async () => {
    const samples = librarySamples()
    await using server = await startSample('server')
    const out = join(dir, 'client-server.ndjson')
    const relay = await startTap(server.socketPath, ['--out', out, '--bytes', '8'])
    try {
      // Its destination server for the migration part is started by the client beside its
      // socket; the client itself talks to the tap.
      const client = spawn(join(samples, 'client'), [relay.path], { stdio: ['ignore', 'pipe', 'pipe'] })
      let stdout = ''
      client.stdout.setEncoding('utf8').on('data', (d: string) => {
        stdout += d
      })
      const [code] = (await once(client, 'exit')) as [number | null]
      expect(code).toBe(0)
      expect(stdout.match(/INTx triggered!/g)?.length).toBeGreaterThanOrEqual(1)
      const exit = await server.waitExit()
      expect(exit).toEqual({ code: 0, signal: null, killed: false })
    } finally {
      expect(await relay.close()).toBe(0)
    }
    const records = readFileSync(out, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as TapRecord | { type: 'summary' })
    const messages = records.filter((r): r is TapMessage => r.type === 'message')
    expect(messages.length).toBeGreaterThan(100)
    expect(messages.filter((m) => m.undecodable !== undefined)).toEqual([])
    expect(pairUp(messages)).toEqual([])
    // Its 16 DMA maps each carried the file behind them, and the eventfd for INTx went with
    // SET_IRQS: the server's direct DMA into them (its CRC check, exit 0) used them.
    const maps = messages.filter((m) => m.command === 'DMA_MAP' && m.kind === 'request')
    expect(maps.length).toBe(16)
    expect(maps.every((m) => m.fds === 1)).toBe(true)
    expect(messages.find((m) => m.command === 'DEVICE_SET_IRQS' && m.kind === 'request')?.fds).toBe(1)
    // The server's DMA went through the tap too, with its data shown.
    const dmaWrite = messages.find((m) => m.command === 'DMA_WRITE' && m.from === 'server')
    expect(dmaWrite?.data).toEqual({ length: 1024, head: '4141414141414141' })
    // The region info retry: MMAP without CAPS first, then the caps and the fd.
    const bar1 = messages.filter(
      (m) => m.command === 'DEVICE_GET_REGION_INFO' && m.kind === 'reply' && m.fields.index === 1,
    )
    expect(bar1.map((m) => [m.fields.flags, m.fds])).toEqual([
      [7, 0],
      [15, 1],
    ])
    const summary = records.at(-1) as { type: string; commands: Record<string, { requests: number }> }
    expect(summary.type).toBe('summary')
    expect(summary.commands.DMA_MAP?.requests).toBe(16)
  }, 60_000)

  it('prints a line per message, and the summary when the last client leaves', async () => {
    await using device = await startScriptedPeer('serve')
    const relay = await startTap(device.socketPath)
    try {
      await using c = await connect(relay.path)
      await c.validateVersion()
      await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
      await c.close()
      // The summary follows the session's end: wait for it in the output, bounded.
      const deadline = Date.now() + 10_000
      while (!relay.output().includes('summary:') && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 10))
      }
      // Printed because the last client left: close() below would print one too.
      expect(relay.output()).toContain('summary:')
    } finally {
      await relay.close()
    }
    const text = relay.output()
    expect(text).toMatch(/#1 client→server {2}id \d+ {2}VERSION request {2}json=\{"capabilities":/)
    expect(text).toMatch(/#1 server→client {2}id \d+ {2}DEVICE_GET_INFO reply {2}[\d.]+µs {2}flags=/)
    expect(text).toContain('session #1 closed')
    expect(text).toMatch(
      /summary: 1 session\(s\), 4 message\(s\)\n {2}command +requests +errors +p50 µs +p99 µs\n {2}DEVICE_GET_INFO +1 +0/,
    )
  })
})

/** A process's resident memory in MiB, from /proc. */
function rssMiB(pid: number): number {
  const kib = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]
  return Number(kib) / 1024
}

describe('vfio-user tap: an output that cannot keep up', () => {
  // Requests a client keeps going through the tap, 256 at a time: 2 records each. Without
  // back-pressure they all went through while the output was paused, held for it (80,000 of
  // them: RSS +104 MiB with stdout, +153 MiB with --out).
  const requests = 60_000
  // What the tap may grow by while its output is paused: its bounded queue (4096 lines in the
  // binding), one batch of records written to the output's buffer, and the garbage of getting
  // there. Measured: +2 MiB (stdout), +11 MiB (--out).
  const boundMiB = 40

  it.each([
    ['stdout (--json into a pipe nobody reads)', false],
    ['--out FILE (a FIFO nobody reads)', true],
  ])(
    '%s: the relay waits for it, memory stays bounded, and once it reads again nothing is lost',
    async (_, viaFile) => {
      await using peer = await startScriptedPeer('serve')
      const listen = socketPath()
      const fifo = join(dir, `out-${n}.fifo`)
      if (viaFile) expect(spawnSync('mkfifo', [fifo]).status).toBe(0)
      const args = viaFile ? ['--out', fifo] : ['--json']
      const child = spawn(process.execPath, [cli, 'tap', listen, peer.socketPath, ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
      })
      const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)))
      // However the test ends (a timeout included), the tap does not outlive it.
      onTestFinished(() => {
        child.kill('SIGKILL')
      })
      let stderr = ''
      const behind = new Promise<'behind'>((resolve) => {
        child.stderr.setEncoding('utf8').on('data', (d: string) => {
          stderr += d
          if (stderr.includes('not keeping up')) resolve('behind')
        })
      })
      // The FIFO is opened for reading first: the tap opens its --out before it listens.
      const slow = viaFile ? createReadStream(fifo, { encoding: 'utf8' }).pause() : child.stdout
      // The terminal's lines are read as they come (with --json they are the slow output, and
      // are not read past the listening line until resumed).
      child.stdout.setEncoding('utf8')
      await new Promise<void>((ready) => {
        let first = ''
        const onData = (d: string) => {
          first += d
          if (!first.includes('listening')) return
          child.stdout.off('data', onData)
          if (viaFile) child.stdout.resume()
          else child.stdout.pause()
          ready()
        }
        child.stdout.on('data', onData)
      })
      let text = ''
      let summarised = false
      const startMiB = rssMiB(child.pid as number)
      let maxMiB = startMiB

      const c = await connect(listen, { timeoutMs: 120_000 })
      await c.validateVersion()
      let sent = 0
      let done = 0
      let paused = true
      const one = async () => {
        while (sent < requests) {
          sent++
          await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
          done++
          if (paused && done % 64 === 0) maxMiB = Math.max(maxMiB, rssMiB(child.pid as number))
        }
      }
      const all = Promise.all(Array.from({ length: 256 }, one))
      // Without back-pressure the tap takes every record and holds it for the output: all the
      // requests go through. With it, the relay waits for the output, and the tap says so.
      const first = await Promise.race([all.then(() => 'every request went through' as const), behind])
      maxMiB = Math.max(maxMiB, rssMiB(child.pid as number))
      expect(maxMiB - startMiB).toBeLessThan(boundMiB)
      expect({ first, held: done < requests }).toEqual({ first: 'behind', held: true })

      // The output reads again: the relay goes on, and every message is there, in order.
      paused = false
      slow.on('data', (d: string) => {
        text += d
        summarised ||= text.includes('"type":"summary"', Math.max(0, text.length - d.length - 32))
      })
      slow.resume()
      await all
      expect(done).toBe(requests)
      await c.close()
      // The session's end prints a summary: then every record is out.
      while (!summarised) await once(slow, 'data')
      child.kill('SIGINT')
      expect(await exited).toBe(0)
      if (viaFile && !slow.readableEnded) await once(slow, 'end')
      const records = text
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as TapRecord | { type: 'listening' | 'summary' })
      const messages = records.filter((r): r is TapMessage => r.type === 'message')
      expect(messages.length).toBe(2 * requests + 2)
      expect(pairUp(messages)).toEqual([])
      const infos = messages.filter((m) => m.command === 'DEVICE_GET_INFO')
      expect(infos.filter((m) => m.kind === 'request').length).toBe(requests)
      expect(infos.filter((m) => m.kind === 'reply').length).toBe(requests)
      // In the order they passed: this client numbers its requests one after another (ids
      // wrap at 2^16), and each reply comes after its request (pairUp).
      const ids = messages.filter((m) => m.from === 'client').map((m) => m.id)
      expect(ids.filter((id, i) => i > 0 && id !== (((ids[i - 1] as number) + 1) & 0xffff))).toEqual([])
      expect(stderr.trim().split('\n')).toEqual([
        'vfio-user: tap: the output is not keeping up; the relay waits for it, which slows the VMM and its device',
      ])
    },
    120_000,
  )
})

/** A server that accepts, keeps its end open after EOF, and never reads or writes. */
async function silentServer() {
  const { createServer } = await import('node:net')
  const kept: import('node:net').Socket[] = []
  const server = createServer({ allowHalfOpen: true }, (s) => kept.push(s.pause()))
  const upstream = socketPath()
  await new Promise<void>((resolve) => server.listen(upstream, resolve))
  return {
    upstream,
    kept,
    async close() {
      for (const s of kept) s.destroy()
      await new Promise((resolve) => server.close(resolve))
    },
  }
}

describe('tap()', () => {
  it('a for await that falls behind pauses the tap: the relay waits, and once it takes again nothing is lost, in order', async () => {
    await using peer = await startScriptedPeer('serve')
    await using t = await tap({ listen: socketPath(), connect: peer.socketPath })
    const records = t[Symbol.asyncIterator]()
    // Its first next() starts it: from then on it takes every record.
    const first = records.next()
    await using c = await connect(t.listen, { timeoutMs: 120_000 })
    await c.validateVersion()
    // A client keeps 256 requests in flight; the loop takes one record and then none.
    const requests = 40_000
    let sent = 0
    let done = 0
    const one = async () => {
      while (sent < requests) {
        sent++
        await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
        done++
      }
    }
    const all = Promise.all(Array.from({ length: 256 }, one))
    expect((await first).value).toMatchObject({ type: 'open' })
    // Without the pause every record is taken into the loop's queue and every request goes
    // through; with it the relay waits. (Bounded: a hang fails at the test's timeout.)
    // The look stops once the race is settled, either way.
    let finished = false
    const stalled = new Promise<'stalled'>((resolve) => {
      const look = () => {
        if (t.stalled > 0) resolve('stalled')
        else if (!finished) setImmediate(look)
      }
      look()
    })
    const winner = await Promise.race([all.then(() => 'every request went through'), stalled])
    finished = true
    expect(winner).toBe('stalled')
    expect(done).toBeLessThan(requests)
    // The loop takes again: every request completes, and every record comes, in order.
    const messages: TapMessage[] = []
    const taking = (async () => {
      for (;;) {
        const r = await records.next()
        if (r.done) return
        if (r.value.type === 'message') messages.push(r.value)
        if (messages.length === 2 * requests + 2) return
      }
    })()
    await all
    await taking
    expect(pairUp(messages)).toEqual([])
    const ids = messages.filter((m) => m.from === 'client').map((m) => m.id)
    expect(ids.filter((id, i) => i > 0 && id !== (((ids[i - 1] as number) + 1) & 0xffff))).toEqual([])
    await records.return(undefined)
    expect(t.stalled).toBe(0)
  }, 120_000)

  it('lingerMs: a server that never reads nor closes holds a session no longer than that once the client has gone', async () => {
    const { upstream, close } = await silentServer()
    try {
      await using t = await tap({ listen: socketPath(), connect: upstream, lingerMs: 100 })
      const closed = once(t, 'close')
      const client = createConnection(t.listen)
      await once(client, 'connect')
      client.end()
      const [event] = await closed
      expect(event.reason).toBe("a side hung up and the other kept the session open past the tap's linger (100 ms)")
      expect(t.sessions).toBe(0)
      client.destroy()
    } finally {
      await close()
    }
  })

  it('emits decoded records while someone listens; garbage from the server is relayed and said undecodable', async () => {
    await using peer = await startScriptedPeer('serve')
    await using t = await tap({ listen: socketPath(), connect: peer.socketPath, bytes: 4 })
    const seen: TapMessage[] = []
    const onMessage = (m: TapMessage) => seen.push(m)
    t.on('message', onMessage)
    const c = await connect(t.listen)
    await c.validateVersion()
    const reply = await c.sendWait(Command.REGION_WRITE, Buffer.concat([Buffer.alloc(16), Buffer.from('data')]))
    expect(reply.payload.length).toBe(16)
    // Every message of a session is reported before its end.
    const ended = once(t, 'close')
    await c.close()
    await ended
    expect(seen.map((m) => `${m.from} ${m.command} ${m.kind}`)).toEqual([
      'client VERSION request',
      'server VERSION reply',
      'client REGION_WRITE request',
      'server REGION_WRITE reply',
    ])
    expect(seen[2]?.data).toEqual({ length: 4, head: Buffer.from('data').toString('hex') })
    expect(seen[3]?.latencyUs).toBeGreaterThan(0)
    t.off('message', onMessage)
    // A server that floods requests of an unknown command: relayed, said undecodable.
    await using flood = await startScriptedPeer('flood')
    await using t2 = await tap({ listen: socketPath(), connect: flood.socketPath })
    const garbage = new Promise<TapMessage>((resolve) => {
      t2.on('message', (m) => {
        if (m.undecodable) resolve(m)
      })
    })
    const c2 = await connect(t2.listen)
    await c2.validateVersion()
    expect(await garbage).toMatchObject({
      from: 'server',
      command: 'command 99',
      undecodable: 'unknown command command 99',
    })
    await c2.close()
  })

  it('a server flooding faster than JavaScript reads waits for room: the queue stops at its bound, nothing is dropped', async () => {
    await using flood = await startScriptedPeer('flood')
    const lines: string[] = []
    let onBatch = () => {}
    const listen = socketPath()
    const max = native.TAP_MAX_QUEUED_LINES
    const nt = native.startTap(listen, flood.socketPath, 0, (batch) => {
      lines.push(...batch)
      onBatch()
    })
    if ('errno' in nt) throw new Error(nt.message)
    const batch = () => new Promise<void>((resolve) => (onBatch = resolve))
    nt.observe(true)
    const c = await connect(listen)
    await c.validateVersion()
    // JavaScript takes no lines while this loop runs. Every read of the flood holds thousands
    // of messages, so the queue reaches its bound; past it a relay thread must wait for room
    // (stalled), not queue more. Without the bound the loop ends on queued > the bound.
    // Bounded by wall time: a relay that neither stalls nor ends must fail, not hang.
    const spinUntil = Date.now() + 30_000
    while (nt.stalled === 0 && nt.queued <= max && nt.sessions > 0 && Date.now() < spinUntil) {}
    expect({ stalled: nt.stalled > 0, queued: nt.queued }).toEqual({ stalled: true, queued: max })
    // Once JavaScript takes them the relay goes on: more lines come after the first batch.
    await batch()
    const taken = lines.length
    await batch()
    expect(lines.length).toBeGreaterThan(taken)
    await c.close()
    nt.close()
    while (lines.at(-1) !== '{"type":"end"}') await batch()
    const messages = lines.map((l) => JSON.parse(l) as TapRecord).filter((r) => r.type === 'message')
    expect(messages.length).toBeGreaterThan(max)
    expect(messages).toContainEqual(expect.objectContaining({ from: 'server', command: 'command 99' }))
  })

  it('close() while a relay thread waits for room returns, and every line queued before it is still delivered', async () => {
    await using flood = await startScriptedPeer('flood')
    const lines: string[] = []
    let onBatch = () => {}
    const listen = socketPath()
    const nt = native.startTap(listen, flood.socketPath, 0, (batch) => {
      lines.push(...batch)
      onBatch()
    })
    if ('errno' in nt) throw new Error(nt.message)
    nt.observe(true)
    const c = await connect(listen)
    await c.validateVersion()
    const max = native.TAP_MAX_QUEUED_LINES
    // Bounded by wall time: a relay that neither stalls nor ends must fail, not hang.
    const spinUntil = Date.now() + 30_000
    while (nt.stalled === 0 && nt.queued <= max && nt.sessions > 0 && Date.now() < spinUntil) {}
    expect(nt.stalled).toBeGreaterThan(0)
    // close() joins the relay threads on this thread, which cannot take lines meanwhile:
    // without releasing the waiting ones first it would never return.
    nt.close()
    expect(nt.stalled).toBe(0)
    while (lines.at(-1) !== '{"type":"end"}') await new Promise<void>((resolve) => (onBatch = resolve))
    expect(lines.length).toBeGreaterThan(max)
    // The session ended with the tap: the client's connection is gone (reset, as the flood
    // left bytes it had not read).
    expect(['ECONNRESET', 'ENOTCONN']).toContain(
      (await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))).code,
    )
    await c.close()
  })

  it('256 clients that send and close to a server that never reads nor closes: every session ends by the linger, threads and fds back, and the tap takes clients again', async () => {
    const { upstream, kept, close } = await silentServer()
    try {
      const fds = openFds()
      const threads = threadCount()
      const t = await tap({ listen: socketPath(), connect: upstream, lingerMs: 50 })
      // Each client ends as a session closed, or (should the tap refuse it) as a refusal, which
      // fails the test below with its reason rather than leaving it waiting.
      let ended = 0
      const turnedAway: unknown[] = []
      const allEnded = new Promise<void>((resolve) => {
        const one = () => {
          if (++ended === 256) resolve()
        }
        t.on('close', one)
        t.on('refused', (r) => {
          turnedAway.push(r)
          one()
        })
      })
      const clients = []
      for (let i = 0; i < 256; i++) {
        // One at a time, each taken into a session before the next comes: this is about
        // sessions ending, not about outrunning the tap's accept (seen to hang under load).
        const opened = once(t, 'open')
        const s = createConnection(t.listen)
        await once(s, 'connect')
        await opened
        s.end(Buffer.alloc(64, i))
        clients.push(s)
      }
      await allEnded
      for (const c of clients) c.destroy()
      expect(turnedAway).toEqual([])
      expect(t.sessions).toBe(0)
      // The tap takes a client again (none refused as full).
      const refused: unknown[] = []
      t.on('refused', (r) => refused.push(r))
      const again = createConnection(t.listen)
      await once(again, 'connect')
      await once(t, 'open')
      again.destroy()
      expect(refused).toEqual([])
      await t.close()
      for (const s of kept) s.destroy()
      const deadline = Date.now() + 10_000
      while ((openFds() !== fds || threadCount() !== threads) && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 10))
      }
      expect({ fds: openFds(), threads: threadCount() }).toEqual({ fds, threads })
    } finally {
      await close()
    }
  }, 120_000)

  it('100 sessions opened and ended every way: fds and threads back where they were', async () => {
    // `echo` answers like `serve`, and a REGION_READ after sleeping its region field in ms.
    await using peer = await startScriptedPeer('echo')
    const fds = openFds()
    const threads = threadCount()
    const t = await tap({ listen: socketPath(), connect: peer.socketPath })
    const closes: Array<Promise<unknown>> = []
    const left: Array<{ close(): Promise<void> }> = []
    for (let i = 0; i < 100; i++) {
      const way = i % 4
      if (way === 0) {
        // A client that does its work and closes.
        const c = await connect(t.listen)
        await c.validateVersion()
        await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
        closes.push(once(t, 'close'))
        await c.close()
      } else if (way === 1) {
        // A client gone mid-message: half a header, then killed.
        const s = createConnection(t.listen)
        await once(s, 'connect')
        s.write(Buffer.alloc(7))
        s.destroy()
      } else if (way === 2) {
        // A client whose request times out (answered 200 ms late), then closes.
        const c = await connect(t.listen, { timeoutMs: 50 })
        await c.validateVersion()
        const late = Buffer.alloc(16)
        late.writeUInt32LE(200, 8)
        late.writeUInt32LE(4, 12)
        expect((await rejection(c.sendWait(Command.REGION_READ, late))).code).toBe('ETIMEDOUT')
        await c.close()
      } else {
        // Still open when the tap closes.
        const c = await connect(t.listen)
        await c.validateVersion()
        left.push(c)
      }
    }
    await Promise.all(closes)
    await t.close()
    for (const c of left) await c.close()
    // A relay thread that saw its session end exits on its own: wait for it, bounded.
    const deadline = Date.now() + 10_000
    while ((openFds() !== fds || threadCount() !== threads) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    expect({ fds: openFds(), threads: threadCount() }).toEqual({ fds, threads })
    expect(t.sessions).toBe(0)
  })

  it('refuses a listen path that exists, typed, and a client whose server is gone is closed', async () => {
    const path = socketPath()
    await using first = await tap({ listen: path, connect: join(dir, 'nobody.sock') })
    expect((await rejection(tap({ listen: path, connect: 'x' }))).code).toBe('EADDRINUSE')
    const refused = once(first, 'refused')
    const s = createConnection(path)
    const [e] = (await refused) as [{ reason: string }]
    expect(e.reason).toContain('nobody.sock')
    await once(s, 'close')
  })
})
