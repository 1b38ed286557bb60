// The smaller defects found under attack (issue 5), each as a user meets it: bad fds arrays,
// every id held by late replies, one AbortSignal shared by many requests, error messages
// that name the socket once, transfers larger than the server accepts, bytes in a buffer
// that was transferred away.
import { getEventListeners, once } from 'node:events'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Command, connect, tap, type VfioUserClient, type VfioUserError } from '../ts/index'
import { startScriptedPeer, startTestDevice, type TestDevice } from '../ts/testing'
import { refusedArg, rejection } from './rejection'
import { getInfoPayload, regionAccess } from './wire'

let hold: TestDevice
let serve: TestDevice

beforeAll(async () => {
  hold = await startScriptedPeer('hold')
  serve = await startScriptedPeer('serve')
})

afterAll(async () => {
  await hold?.close()
  await serve?.close()
})

async function client(server: TestDevice, timeoutMs = 5000): Promise<VfioUserClient> {
  const c = await connect(server.socketPath, { timeoutMs })
  await c.validateVersion()
  return c
}

describe('bad fds arrays throw before anything is sent', () => {
  it.each([
    [
      'a sparse array',
      Object.assign(new Array<number>(2), { 1: 3 }),
      TypeError,
      'fds[0] must be a file descriptor (an integer), got a hole',
    ],
    ['a fraction', [1.5], TypeError, 'fds[0] must be a file descriptor (an integer), got 1.5'],
    ['a string', ['3'] as unknown as number[], TypeError, 'got string'],
    ['a negative number', [-1], RangeError, 'fds[0] must be an integer from 0'],
  ])('%s', async (_, fds, type, message) => {
    await using c = await client(serve)
    await refusedArg(() => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { fds }), type, message)
    expect(() => c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload(), { fds })).toThrow(type)
    expect(() => c.post(Command.DEVICE_GET_INFO, getInfoPayload(), { fds })).toThrow(type)
    // Nothing went out: the next request is answered as the first.
    expect((await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())).payload.length).toBe(16)
  })
})

describe('late replies and the 16-bit ids', () => {
  it('refuses with EAGAIN once every id waits for a late reply, and stays usable', async () => {
    await using c = await client(hold)
    // Requests that time out on the wire keep their ids until their (never coming) reply;
    // ones that timed out before being written free theirs. Keep going until all are held.
    let refused: string | undefined
    for (let round = 0; round < 64 && !refused; round++) {
      const results = await Promise.allSettled(
        Array.from({ length: 8192 }, () => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 1 })),
      )
      for (const r of results) {
        expect(r.status).toBe('rejected')
        const code = (r as PromiseRejectedResult).reason.code
        expect(['ETIMEDOUT', 'EAGAIN']).toContain(code)
        if (code === 'EAGAIN') refused = (r as PromiseRejectedResult).reason.message
      }
    }
    // Most are held for late replies; the last requests of a burst may still be pending.
    expect(refused).toMatch(/^all 65536 message ids are held \(\d+ waiting for the late reply/)
    const e = await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    expect(e.code).toBe('EAGAIN')
    expect(e.errno).toBe(-11)
    expect(() => c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())).toThrow(
      expect.objectContaining({ code: 'EAGAIN' }),
    )
    expect(c.closed).toBe(false)
  })
})

describe('AbortSignal', () => {
  it('one signal shared by 100 requests: one listener, no warning, all abort', async () => {
    await using c = await client(hold)
    const warnings: Error[] = []
    const onWarning = (w: Error) => warnings.push(w)
    process.on('warning', onWarning)
    try {
      const ac = new AbortController()
      const pending = Array.from({ length: 100 }, () =>
        c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { signal: ac.signal }),
      )
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(1)
      ac.abort()
      for (const p of pending) await expect(p).rejects.toMatchObject({ name: 'AbortError' })
      expect(c.inFlight).toBe(0)
      expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0)
      // Node reports the warning on a later tick.
      await new Promise((resolve) => setImmediate(resolve))
      expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([])
    } finally {
      process.off('warning', onWarning)
    }
  })

  it('the listener goes once every request using the signal has settled', async () => {
    await using c = await client(serve)
    const ac = new AbortController()
    await Promise.all(
      Array.from({ length: 20 }, () => c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { signal: ac.signal })),
    )
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0)
  })
})

describe('error messages name the socket once', () => {
  const once = (message: string, path: string) => message.split(path).length - 1

  it('timeout, close, and calls after close', async () => {
    const c = await client(hold)
    const timedOut = await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 5 }))
    const inFlight = c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    await c.close()
    const aborted = await rejection(inFlight)
    const after = await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    let sync: unknown
    try {
      c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    } catch (e) {
      sync = e
    }
    for (const e of [timedOut, aborted, after, sync as Error]) {
      expect(once(e.message, hold.socketPath), e.message).toBe(1)
    }
    expect([aborted.code, after.code, (sync as { code: string }).code]).toEqual([
      'ECONNABORTED',
      'ECONNABORTED',
      'ECONNABORTED',
    ])
  })
})

describe('transfers larger than the server accepts', () => {
  it('a REGION_WRITE past max_data_xfer_size is E2BIG and nothing is sent', async () => {
    await using device = await startTestDevice()
    await using c = await client(device)
    const max = c.version?.capabilities.maxDataXferSize ?? 0
    expect(max).toBe(1 << 20)
    const big = Buffer.alloc(max + 1)
    const e = await rejection(c.sendWait(Command.REGION_WRITE, regionAccess(0, 0, big.length, big)))
    expect(e.code).toBe('E2BIG')
    expect(e.commandName).toBe('REGION_WRITE')
    expect(e.message).toContain('max_data_xfer_size of 1048576')
    expect(() => c.sendWaitSync(Command.REGION_READ, regionAccess(0, 0, max + 1))).toThrow(
      expect.objectContaining({ code: 'E2BIG' }),
    )
    expect((await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())).payload.length).toBe(16)
  })
})

describe('a server that floods requests and never reads our replies', () => {
  it('is disconnected once what we hold for it passes maxQueuedBytes', async () => {
    await using flood = await startScriptedPeer('flood')
    const c = await connect(flood.socketPath, { maxQueuedBytes: 4 << 20 })
    const closed = new Promise<VfioUserError>((resolve) => c.once('close', resolve))
    await c.validateVersion()
    const e = await closed
    expect(e.code).toBe('ECONNRESET')
    expect(e.message).toContain('floods requests without reading our replies')
    expect(c.closed).toBe(true)
  })

  it('maxQueuedBytes is checked', async () => {
    await expect(connect(serve.socketPath, { maxQueuedBytes: 1000 })).rejects.toThrow(RangeError)
    await expect(connect(serve.socketPath, { maxQueuedBytes: '1' as unknown as number })).rejects.toThrow(TypeError)
  })
})

describe('replies of every size', () => {
  it.each(['sendWaitSync', 'sendWait'])(
    '%s: small payloads (copied) and large ones (handed over) are intact and owned',
    async (how) => {
      await using echo = await startScriptedPeer('echo')
      await using c = await client(echo)
      const sizes = [0, 1, 4064, 4080, 4081, 65_520, 65_521, 70_000, 300_000]
      const replies = await Promise.all(
        sizes.map(async (count, i) => {
          const payload = regionAccess(0, i * 1000 + 7, count)
          const r =
            how === 'sendWait'
              ? await c.sendWait(Command.REGION_READ, payload)
              : c.sendWaitSync(Command.REGION_READ, payload)
          return { count, offset: BigInt(i * 1000 + 7), r }
        }),
      )
      // Checked after all calls: no reply's bytes were overwritten by a later one.
      for (const { count, offset, r } of replies) {
        expect(r.payload.length).toBe(16 + count)
        expect(r.payload.readBigUInt64LE(0)).toBe(offset)
        const data = r.payload.subarray(16)
        for (const at of [0, count >> 1, count - 1].filter((n) => n >= 0 && n < count)) {
          expect(data[at]).toBe(Number((offset + BigInt(at)) & 0xffn))
        }
      }
    },
  )
})

describe('bytes in an ArrayBuffer that was transferred away (detached)', () => {
  /** A view over a buffer detached once the view is made, of each kind a caller may hold. */
  const views: Array<[string, () => Uint8Array]> = [
    ['a Uint8Array', () => detach((ab) => new Uint8Array(ab))],
    ['a Buffer', () => detach((ab) => Buffer.from(ab))],
    ['a view of part of it', () => detach((ab) => new Uint8Array(ab, 4, 8))],
  ]
  function detach(view: (ab: ArrayBuffer) => Uint8Array): Uint8Array {
    const ab = new ArrayBuffer(4096)
    const v = view(ab)
    structuredClone(ab, { transfer: [ab] })
    return v
  }
  /** What `call` throws, which it must. */
  function thrown(call: () => unknown): unknown {
    try {
      call()
    } catch (e) {
      return e
    }
    throw new Error('nothing was thrown')
  }

  it.each(views)(
    '%s: every call that takes bytes refuses it, TypeError ERR_INVALID_ARG_TYPE, and sends nothing',
    async (kind, view) => {
      // Through a tap, to see what the client sends.
      await using t = await tap({
        listen: `${serve.socketPath}.${kind.replaceAll(' ', '-')}`,
        connect: serve.socketPath,
      })
      const sent: string[] = []
      t.on('message', (m) => {
        if (m.from === 'client') sent.push(m.command)
      })
      await using c = await connect(t.listen)
      await c.validateVersion()
      const why = /is a view of a detached ArrayBuffer/
      await refusedArg(() => c.sendWait(Command.DEVICE_GET_INFO, view()), TypeError, why)
      await refusedArg(() => c.regionWrite(0, 0, view()), TypeError, why)
      await refusedArg(() => c.regionWrite(0, 0, view(), { posted: true }), TypeError, why)
      await refusedArg(() => c.regionRead(0, 0, 4, { into: view() }), TypeError, why)
      await refusedArg(() => c.dmaMap({ iova: 0, size: 4096, memory: view() }), TypeError, why)
      await refusedArg(() => c.dmaMapMany([{ iova: 0, size: 4096, memory: view() }]), TypeError, why)
      for (const call of [
        () => c.sendWaitSync(Command.DEVICE_GET_INFO, view()),
        () => c.post(Command.DEVICE_RESET, view()),
        () => c.regionWriteSync(0, 0, view()),
        () => c.regionReadSync(0, 0, 4, { into: view() }),
        () => c.dmaMapSync({ iova: 0, size: 4096, memory: view() }),
      ]) {
        const e = thrown(call)
        expect(e).toBeInstanceOf(TypeError)
        expect(e).toMatchObject({ code: 'ERR_INVALID_ARG_TYPE', message: expect.stringMatching(why) })
      }
      // Nothing went out: after VERSION, the next request is the first.
      await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
      const ended = once(t, 'close')
      await c.close()
      await ended
      expect(sent).toEqual(['VERSION', 'DEVICE_GET_INFO'])
    },
  )
})
