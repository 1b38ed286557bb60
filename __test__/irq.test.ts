// Interrupts against the real rust-vmm server (crates/test-device): a write of v to its
// doorbell (BAR0 0xffc) signals MSI vector v through the eventfd wired to it.
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { closeSync, fstatSync, openSync, readlinkSync, readSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { connect, createEventFd, type IrqEvent } from '../ts/index'
import { startTestDevice } from '../ts/testing'
import { refusedArg, rejection } from './rejection'
import { deviceSession, openFds } from './session'

const session = deviceSession()

function ring(vector: number) {
  const v = Buffer.alloc(4)
  v.writeUInt32LE(vector)
  return session.client.regionWrite(0, 0xffc, v)
}

/**
 * Runs `body` in a child Node with `c` a client of the device at `socketPath` (argv[2] on
 * are `args`); once it prints 'ready', a line goes to its stdin. Its exit code and output.
 */
async function childSession(socketPath: string, args: string[], body: string) {
  const script = `
    const { connect } = require(${JSON.stringify(join(__dirname, '..', 'dist', 'index.js'))})
    ;(async () => {
      const c = await connect(process.argv[1])
      await c.validateVersion()
      ${body}
    })()
  `
  const child = spawn(process.execPath, ['-e', script, socketPath, ...args], { stdio: ['pipe', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    out += d
    if (out === 'ready\n') child.stdin.write('go\n')
  })
  const [code] = (await once(child, 'exit')) as [number | null]
  return { code, out }
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
    const ended = new Promise<void>((resolve) => irqs.once('end', () => resolve()))
    await irqs.disable()
    await ended
    expect(irqs.ended).toBe(true)
    expect(openFds()).toBe(before)
    await irqs.disable()
  })

  it('a disable() refused before sending (an aborted signal) leaves the group wired; the next one ends it', async () => {
    const before = openFds()
    const irqs = await session.client.enableIrqs(1, { start: 0, count: 2 })
    const ac = new AbortController()
    ac.abort()
    await expect(irqs.disable({ signal: ac.signal })).rejects.toMatchObject({ code: 'ABORT_ERR' })
    expect(irqs.ended).toBe(false)
    expect(openFds()).toBe(before + 2)
    const fired = once(irqs, 'irq')
    await ring(1)
    expect((await fired)[0]).toEqual({ index: 1, vector: 1, count: 1 })
    await irqs.disable()
    expect(irqs.ended).toBe(true)
    expect(openFds()).toBe(before)
  })

  it('a device signalling while JavaScript is busy is reported as one event a vector, with the sum', async () => {
    const irqs = await session.client.enableIrqs(1, { start: 0, count: 4 })
    const seen: IrqEvent[] = []
    const RINGS = 2000
    const all = new Promise<void>((resolve) => {
      irqs.on('irq', (e: IrqEvent) => {
        seen.push(e)
        if (seen.reduce((n, x) => n + x.count, 0) >= RINGS) resolve()
      })
    })
    const v = Buffer.alloc(4)
    v.writeUInt32LE(2)
    // Rung without yielding: JavaScript takes no event meanwhile, so the reports wait natively.
    for (let i = 0; i < RINGS; i++) session.client.regionWriteSync(0, 0xffc, v)
    await all
    expect(seen.reduce((n, x) => n + x.count, 0)).toBe(RINGS)
    expect(seen.every((e) => e.vector === 2)).toBe(true)
    // One report while JavaScript was busy, and at most a few for signals read after it.
    expect(seen.length).toBeLessThan(10)
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
    const ended = new Promise<void>((resolve) => irqs.once('end', () => resolve()))
    await c.close()
    await ended
    expect(openFds()).toBe(before)
  })

  it('bad arguments are refused before anything is sent; raw setIrqs actions', async () => {
    await refusedArg(() => session.client.enableIrqs(-1), RangeError)
    await refusedArg(() => session.client.enableIrqs(1, { count: 0 }), RangeError)
    await refusedArg(() => session.client.setIrqs(1, { action: 'poke' as 'mask' }), RangeError)
    await refusedArg(() => session.client.setIrqs(1, { action: 'trigger', data: [true], count: 2 }), RangeError)
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

  it('signals raised before anyone listens are kept, coalesced per vector, for the first to take them', async () => {
    const c = session.client
    const irqs = await c.enableIrqs(1, { start: 0, count: 4 })
    // Rung with nobody listening, and other awaits in between.
    await ring(2)
    await ring(2)
    await ring(3)
    await c.deviceInfo()
    // The signals reach JS off the socket's order: wait for each vector, which takes what was kept.
    const two = await irqs.wait({ vector: 2, timeoutMs: 10_000 })
    const three = await irqs.wait({ vector: 3, timeoutMs: 10_000 })
    expect([two, three]).toEqual([
      { index: 1, vector: 2, count: 2 },
      { index: 1, vector: 3, count: 1 },
    ])
    // Nothing else is kept: a later listener and iterator get only what comes after them.
    await ring(1)
    for await (const e of irqs) {
      expect(e).toEqual({ index: 1, vector: 1, count: 1 })
      break
    }
    await ring(0)
    const [late] = (await once(irqs, 'irq')) as [IrqEvent]
    expect(late).toEqual({ index: 1, vector: 0, count: 1 })
    await irqs.disable()
  })

  it('wait(): times out, aborts, refuses a vector outside the group, and fails once the group ends', async () => {
    const irqs = await session.client.enableIrqs(1, { start: 1, count: 2 })
    expect((await rejection(irqs.wait({ timeoutMs: 20 }))).code).toBe('ETIMEDOUT')
    const ac = new AbortController()
    const aborted = irqs.wait({ signal: ac.signal })
    ac.abort()
    await expect(aborted).rejects.toMatchObject({ name: 'AbortError' })
    await expect(irqs.wait({ vector: 0 })).rejects.toMatchObject({ name: 'RangeError' })
    const waiting = rejection(irqs.wait())
    await irqs.disable()
    expect((await waiting).code).toBe('ECANCELED')
    expect((await rejection(irqs.wait())).code).toBe('ECANCELED')
  })

  it('vectors past the count irqInfo reported are refused before anything is sent', async () => {
    const c = session.client
    expect((await c.irqInfo(1)).count).toBe(4)
    const before = openFds()
    for (const refused of [
      c.enableIrqs(1, { count: 5 }),
      c.enableIrqs(1, { start: 3, count: 2 }),
      c.setIrqs(1, { action: 'trigger', start: 3, count: 2 }),
    ]) {
      const e = await refused.then(
        () => undefined,
        (err: unknown) => err as RangeError & { code?: string },
      )
      expect(e).toBeInstanceOf(RangeError)
      expect(e?.code).toBe('ERR_OUT_OF_RANGE')
    }
    expect(openFds()).toBe(before)
    expect((await c.irqInfo(0)).count).toBe(1)
    const e = await c.enableIrqs(0, { count: 2 }).catch((err: unknown) => err as Error)
    expect((e as Error).message).toBe('vectors 0 to 1 of irq 0: it has 1 (0 to 0)')
  })

  it('a pending wait() keeps Node running (an awaited interrupt from a device started elsewhere)', async () => {
    // The child waits for an interrupt with nothing else to keep it alive (its stdin unref'd):
    // without the hold a pending wait takes, Node would exit at once with code 13.
    await using device = await startTestDevice()
    const ended = await childSession(
      device.socketPath,
      [],
      `
        const irqs = await c.enableIrqs(1, { start: 0, count: 4 })
        process.stdin.on('data', () => {
          const v = Buffer.alloc(4)
          v.writeUInt32LE(2)
          c.regionWriteSync(0, 0xffc, v)
        })
        process.stdin.unref()
        console.log('ready')
        const e = await irqs.wait()
        console.log(JSON.stringify(e))
        await c.close()
        process.exit(0)
      `,
    )
    expect(ended).toEqual({ code: 0, out: 'ready\n{"index":1,"vector":2,"count":1}\n' })
  })

  it('watch: false wires eventfds the library never reads: the count waits in them for their reader (KVM)', async () => {
    const c = session.client
    const irqs = await c.enableIrqs(1, { start: 0, count: 4, watch: false })
    expect(irqs.watched).toBe(false)
    await ring(2)
    await ring(2)
    // Both signals are still in the eventfd: nobody here read them.
    const count = Buffer.alloc(8)
    expect(readSync(irqs.fds[2] as number, count, 0, 8, null)).toBe(8)
    expect(count.readBigUInt64LE(0)).toBe(2n)
    expect((await rejection(irqs.wait())).code).toBe('EINVAL')
    // Iterating them fails at once too, rather than waiting (and holding Node) forever.
    const iterated = await (async () => {
      for await (const e of irqs) return e
    })().catch((e: unknown) => e)
    expect(iterated).toMatchObject({ code: 'EINVAL' })
    await irqs.disable()
  })

  it('your own eventfds are wired as they are, never read here, and stay yours after disable()', async () => {
    const c = session.client
    // An eventfd of our own, for the test: one the library made and does not read.
    const own = await c.enableIrqs(1, { start: 0, count: 1, watch: false })
    const fd = own.fds[0] as number
    const intx = await c.enableIrqs(0, { fds: [fd] })
    expect(intx.fds).toEqual([fd])
    expect(intx.watched).toBe(false)
    // The doorbell for a vector with no MSI eventfd signals INTx: our eventfd counts it.
    await ring(3)
    const count = Buffer.alloc(8)
    expect(readSync(fd, count, 0, 8, null)).toBe(8)
    expect(count.readBigUInt64LE(0)).toBe(1n)
    await intx.disable()
    // Still open: only the library's duplicate was closed.
    expect(fstatSync(fd).isFile()).toBe(false)
    await own.disable()
    // Refused before sending: not an eventfd, a count that does not match, watch: true.
    const file = openSync(__filename, 'r')
    try {
      const e = await rejection(c.enableIrqs(0, { fds: [file] }))
      expect(e).toMatchObject({ code: 'EINVAL', commandName: 'DEVICE_SET_IRQS' })
      expect(e.message).toContain('is not an eventfd')
    } finally {
      closeSync(file)
    }
    await refusedArg(() => c.enableIrqs(1, { fds: [fd, fd], count: 3 }), RangeError)
    await refusedArg(() => c.enableIrqs(1, { fds: [fd], watch: true }), RangeError)
  })

  it('createEventFd() makes an eventfd of your own to wire; await using disables a group', async () => {
    const c = session.client
    const before = openFds()
    const fd = createEventFd()
    try {
      expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe('anon_inode:[eventfd]')
      {
        await using intx = await c.enableIrqs(0, { fds: [fd] })
        expect(intx.fds).toEqual([fd])
        await ring(3)
        const count = Buffer.alloc(8)
        expect(readSync(fd, count, 0, 8, null)).toBe(8)
        expect(count.readBigUInt64LE(0)).toBe(1n)
      }
      // Disposed: the library's duplicate is closed, ours is not.
      expect(openFds()).toBe(before + 1)
    } finally {
      closeSync(fd)
    }
    expect(openFds()).toBe(before)
  })

  it('events are typed: a misspelt event or a wrong listener does not compile (tsc over the tests)', async () => {
    const irqs = await session.client.enableIrqs(1, { start: 0, count: 1 })
    const never = () => {
      // @ts-expect-error 'irqq' is not an event of Interrupts
      irqs.on('irqq', () => {})
      // @ts-expect-error an 'irq' listener gets an IrqEvent, not a string
      irqs.on('irq', (e: string) => e)
      // @ts-expect-error 'closed' is not an event of the client
      session.client.on('closed', () => {})
    }
    expect(typeof never).toBe('function')
    irqs.on('irq', (e) => expect(e.vector).toBeTypeOf('number'))
    await irqs.disable()
  })

  it.each(['client', 'interrupts'])(
    '%s.ref() keeps Node running while idle; unref, disable or close lets it end',
    async (which) => {
      // Nothing else keeps the child alive (its stdin unref'd): without the ref it would exit
      // right after 'ready', and never print 'go'.
      await using device = await startTestDevice()
      const ended = await childSession(
        device.socketPath,
        [which],
        `
          const irqs = await c.enableIrqs(1, { start: 0, count: 1 })
          if (process.argv[2] === 'client') c.ref()
          else irqs.ref()
          process.stdin.on('data', async () => {
            console.log('go')
            await irqs.disable()
            await c.close()
          })
          process.stdin.unref()
          console.log('ready')
        `,
      )
      expect(ended).toEqual({ code: 0, out: 'ready\ngo\n' })
    },
  )
})
