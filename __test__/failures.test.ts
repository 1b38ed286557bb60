// A broken or hostile server (crates/test-device/src/bin/scripted_peer.rs, built on our
// proto crate) over a real UNIX socket: every failure is a typed error, nothing hangs.
import { once } from 'node:events'
import { readdirSync } from 'node:fs'
import { constants } from 'node:os'
import { Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { describe, expect, it } from 'vitest'
import { allocateDmaMemory, Command, connect, type DmaEvent, type VfioUserError } from '../ts/index'
import { startScriptedPeer, startTestDevice } from '../ts/testing'
import { rejection } from './rejection'
import { getInfoPayload } from './wire'

async function peer(scenario: string, timeoutMs = 5000) {
  const server = await startScriptedPeer(scenario)
  const client = await connect(server.socketPath, { timeoutMs })
  return {
    server,
    client,
    async [Symbol.asyncDispose]() {
      await client.close()
      await server.close()
    },
  }
}

describe('VERSION reply validation', () => {
  it.each([
    ['major', 'EPROTO', 'major version 1'],
    ['minor', 'EPROTO', 'minor version 7'],
    ['no-nul', 'EPROTO', 'not NUL-terminated'],
    ['short', 'EPROTO', 'shorter than the 20'],
    ['bad-caps', 'EPROTO', 'max_msg_fds must be an unsigned integer'],
    ['wrong-command', 'EPROTO', 'carries command DEVICE_GET_INFO'],
    ['error0', 'EIO', 'without a valid errno'],
    ['enotsup', 'EOPNOTSUPP', 'VERSION'],
  ])('version:%s fails with %s', async (kind, code, what) => {
    await using p = await peer(`version:${kind}`)
    const e = await rejection(p.client.validateVersion())
    expect(e.code).toBe(code)
    expect(e.errno).toBe(-(constants.errno as Record<string, number>)[code])
    expect(e.command).toBe(Command.VERSION)
    expect(e.message).toContain(what)
    // Nothing else may be sent after a failed negotiation.
    expect((await rejection(p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))).code).toBe('ENOTCONN')
  })

  it('times out when the server never answers', async () => {
    await using p = await peer('version:silent', 100)
    expect((await rejection(p.client.validateVersion())).code).toBe('ETIMEDOUT')
  })

  it('fails with ECONNRESET and emits close when the server hangs up', async () => {
    await using p = await peer('version:eof')
    const closed = new Promise<VfioUserError>((resolve) => p.client.once('close', resolve))
    expect((await rejection(p.client.validateVersion())).code).toBe('ECONNRESET')
    expect((await closed).code).toBe('ECONNRESET')
    expect(p.client.closed).toBe(true)
  })

  it('accepts unknown capabilities and reports them as warnings', async () => {
    await using p = await peer('version:warnings')
    const v = await p.client.validateVersion()
    expect(v.capabilities.maxMsgFds).toBe(4)
    expect(v.capabilities.pgsizes).toBe(2097152)
    expect(v.warnings).toEqual([
      "unknown capability 'frobnicate' ignored",
      'pgsizes 0x200000 does not include 4 KiB pages',
    ])
  })
})

describe('requests against a misbehaving server', () => {
  it('drops the late reply of a timed-out request and the next request works', async () => {
    // The peer echoes each request's payload: each carries its own nonce, so the late reply
    // to the first, delivered to the second, would show.
    const nonced = (n: number) => {
      const b = getInfoPayload()
      b.writeUInt32LE(n, 8)
      return b
    }
    await using p = await peer('late')
    await p.client.validateVersion()
    const first = await rejection(p.client.sendWait(Command.DEVICE_GET_INFO, nonced(0x1111), { timeoutMs: 50 }))
    expect(first.code).toBe('ETIMEDOUT')
    expect(first.commandName).toBe('DEVICE_GET_INFO')
    const second = await p.client.sendWait(Command.DEVICE_GET_INFO, nonced(0x2222))
    expect(second.payload.readUInt32LE(8)).toBe(0x2222)
    const third = p.client.sendWaitSync(Command.DEVICE_GET_INFO, nonced(0x3333))
    expect(third.payload.readUInt32LE(8)).toBe(0x3333)
  })

  it('fails every pending request at once when the server closes', async () => {
    // With a 10-minute timeout, anything not failed by the EOF would hang the test.
    await using p = await peer('eof-pending', 600_000)
    await p.client.validateVersion()
    const closed = new Promise<VfioUserError>((resolve) => p.client.once('close', resolve))
    const results = await Promise.allSettled(
      Array.from({ length: 5 }, () => p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())),
    )
    for (const r of results) {
      expect(r.status).toBe('rejected')
      expect((r as PromiseRejectedResult).reason).toMatchObject({ code: 'ECONNRESET' })
    }
    expect((await closed).code).toBe('ECONNRESET')
    expect(p.client.inFlight).toBe(0)
  })

  it("emits 'close' no later than the turn in which the requests it ended reject, every time", async () => {
    // The order is documented: rejections of what was in flight, then 'close', in one turn.
    // Checked right after the rejections settle, with no turn in between, 40 connections over.
    await using p = await peer('eof-pending', 600_000)
    for (let round = 0; round < 40; round++) {
      await using c = await connect(p.server.socketPath)
      await c.validateVersion()
      const seen: string[] = []
      c.once('close', (e: VfioUserError) => seen.push(`close ${e.code}`))
      const pending = Array.from({ length: 3 }, () =>
        c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()).catch((e: VfioUserError) => {
          seen.push(`reject ${e.code}`)
        }),
      )
      await Promise.allSettled(pending)
      expect(seen).toEqual(['close ECONNRESET', 'reject ECONNRESET', 'reject ECONNRESET', 'reject ECONNRESET'])
    }
  })

  it('treats an error reply with errno 0 as EIO', async () => {
    await using p = await peer('errno0')
    await p.client.validateVersion()
    const e = await rejection(p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    expect(e.code).toBe('EIO')
    expect(e.errno).toBe(-constants.errno.EIO)
    expect(() => p.client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())).toThrow(
      expect.objectContaining({ code: 'EIO' }),
    )
  })

  it('dmaMapMany settles once every map it sent was answered, with the first failure', async () => {
    await using p = await peer('hold', 300)
    await p.client.validateVersion()
    using memory = allocateDmaMemory(4 * 4096)
    const page = (i: number) => ({ iova: 0x10_0000n + BigInt(i * 4096), size: 4096, memory, offset: i * 4096 })
    // The third overlaps the first: refused before it is sent, after two were (never answered).
    const e = await rejection(p.client.dmaMapMany([page(0), page(1), page(0)]))
    expect(e.code).toBe('EEXIST')
    // Settled only once the two sent had timed out, which forgot them: none is left mapped.
    expect(p.client.dmaMaps).toBe(0)
    expect(p.client.inFlight).toBe(0)
  })

  it('answers a server DMA request to an unmapped address with EFAULT while its own request is outstanding', async () => {
    await using p = await peer('dma-request')
    await p.client.validateVersion()
    const r = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    // The peer reports the errno our client answered its DMA_READ with.
    expect(r.payload.readUInt32LE(0)).toBe(constants.errno.EFAULT)
  })

  it('serves the server DMA_READs from mapped DmaMemory, async and while blocked in a sync call', async () => {
    await using p = await peer('dma-request')
    await p.client.validateVersion()
    using memory = allocateDmaMemory(4096)
    memory.buffer.write('dma!', 0)
    // The peer sends a DMA_READ of 8 bytes at 0 before it answers the map itself: the range
    // is served from the moment the map is sent.
    await p.client.dmaMap({ iova: 0, size: 4096, memory })
    const async = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(async.payload.readUInt32LE(0)).toBe(0)
    // JS is blocked here: the caller reading its own reply serves the DMA_READ on the way.
    const sync = p.client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(sync.payload.readUInt32LE(0)).toBe(0)
    await p.client.dmaUnmap({ iova: 0, size: 4096 })
    const unmapped = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(unmapped.payload.readUInt32LE(0)).toBe(constants.errno.EFAULT)
    // A plain Buffer: no fd goes with the map, and the DMA_READ is served from the Buffer.
    const plain = Buffer.alloc(8192)
    await p.client.dmaMap({ iova: 0, size: 4096, memory: plain, offset: 4096 })
    expect(p.client.dmaMaps).toBe(1)
    const fromBuffer = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(fromBuffer.payload.readUInt32LE(0)).toBe(0)
    await p.client.dmaUnmapAll()
    expect(p.client.dmaMaps).toBe(0)
  })

  it('a server that lies in typed replies gets EPROTO, and the stream stays in sync', async () => {
    await using p = await peer('liar')
    await p.client.validateVersion()
    // Each watched at once: they may settle in any order.
    const lies = [
      [rejection(p.client.regionInfo(0)), /a loop/],
      [rejection(p.client.regionInfo(1)), /past region 1/],
      [rejection(p.client.regionInfo(2)), /runs past/],
      [rejection(p.client.regionRead(0, 64, 4)), /echoes/],
      [rejection(p.client.regionWrite(0, 64, Buffer.from([1, 2, 3, 4]))), /access header/],
      [rejection(p.client.irqInfo(1)), /irq index 2, not 1/],
    ] as const
    for (const [call, message] of lies) {
      const e = await call
      expect(e.code).toBe('EPROTO')
      expect(e.message).toMatch(message)
    }
    // A DMA_READ of 4 GiB is refused (E2BIG) and our own request still gets its answer.
    const r = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(r.payload.readUInt32LE(0)).toBe(constants.errno.E2BIG)
  })

  it('DMA reports stop queueing while JS is busy, and the next one says how many were missed', async () => {
    await using p = await peer('dma-flood')
    await p.client.validateVersion()
    let reported = 0
    let missed = 0
    p.client.on('dma', (e: DmaEvent) => {
      reported++
      missed += e.missed ?? 0
    })
    // JS is blocked: the caller reading its reply serves all 5000 requests, whose reports wait.
    const first = once(p.client, 'dma')
    p.client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    // They reach JS in one batch once the loop runs again.
    await first
    expect(reported).toBe(4096)
    // The next burst, the same way: again 4096 reports, the first of which carries the count
    // of the first burst's that could not be queued.
    const next = once(p.client, 'dma')
    p.client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    await next
    expect(reported).toBe(2 * 4096)
    expect(missed).toBe(5000 - 4096)
  })

  it("the server's DMA_WRITE lands in a mapped plain Buffer and DMA_READ returns it", async () => {
    await using p = await peer('dma-write')
    await p.client.validateVersion()
    const plain = Buffer.alloc(4096)
    await p.client.dmaMap({ iova: 0, size: 4096, memory: plain })
    const seen: DmaEvent[] = []
    const observe = (e: DmaEvent) => seen.push(e)
    p.client.on('dma', observe)
    const r = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    // Observed in order, after they were answered.
    expect(seen).toEqual([
      { command: 'DMA_WRITE', address: 16n, count: 4 },
      { command: 'DMA_READ', address: 16n, count: 4 },
    ])
    expect(r.payload.readUInt32LE(4)).toBe(0)
    expect(r.payload.subarray(0, 4).toString()).toBe('vfio')
    expect(plain.subarray(16, 20).toString()).toBe('vfio')
    // Read-only for the device: its write is refused, its read still served.
    await p.client.dmaUnmap({ iova: 0, size: 4096 })
    await p.client.dmaMap({ iova: 0, size: 4096, memory: Buffer.from(plain), write: false })
    const ro = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(ro.payload.readUInt32LE(4)).toBe(constants.errno.EACCES)
    expect(ro.payload.subarray(0, 4).toString()).toBe('vfio')
    // (The peer asks before every answer, the unmap's and the map's too.)
    expect(seen.slice(-2)).toEqual([
      { command: 'DMA_WRITE', address: 16n, count: 4, code: 'EACCES' },
      { command: 'DMA_READ', address: 16n, count: 4 },
    ])
    p.client.off('dma', observe)
    const observed = seen.length
    await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(seen).toHaveLength(observed)
  })

  it('regionIoFds decodes both record layouts, owns the fds, and refuses lies', async () => {
    await using p = await peer('io-fds')
    await p.client.validateVersion()
    const fds = () => readdirSync('/proc/self/fd').length
    const before = fds()
    const lib = await p.client.regionIoFds(0)
    expect(lib.stride).toBe(48)
    expect(lib.records.map((r) => [r.offset, r.size, r.type, r.datamatch])).toEqual([
      [0n, 4n, 'ioeventfd', 0xabn],
      [8n, 4n, 'ioeventfd', 0xcdn],
    ])
    expect(lib.fds).toHaveLength(2)
    expect(lib.records.map((r) => r.fd)).toEqual(lib.fds)
    expect(fds()).toBe(before + 2)
    lib.close()
    expect(fds()).toBe(before)
    using spec = await p.client.regionIoFds(1)
    expect(spec.stride).toBe(40)
    expect(spec.records[0]).toMatchObject({ offset: 16n, size: 8n, type: 'ioregionfd', datamatch: 0x77n })
    const [past, odd] = [rejection(p.client.regionIoFds(2)), rejection(p.client.regionIoFds(3))]
    expect((await past).message).toMatch(/outside region 2/)
    expect((await odd).message).toMatch(/do not divide/)
    spec.close()
    expect(fds()).toBe(before)
  })

  it('migration v2: flags, probes, and state changes along allowed arcs only', async () => {
    await using p = await peer('migration')
    await p.client.validateVersion()
    expect(await p.client.migrationFlags()).toEqual({ stopCopy: true, p2p: false, preCopy: true, flags: 5 })
    expect(await p.client.deviceFeature.probe(2, { get: true, set: true })).toBe(true)
    expect(await p.client.deviceFeature.probe(6, { set: true })).toBe(false)
    expect(await p.client.migrationState()).toBe('running')
    // RUNNING to STOP_COPY goes through STOP; the peer refuses anything but a direct arc.
    expect(await p.client.setMigrationState('stopCopy')).toBe('stopCopy')
    expect(await p.client.migrationState()).toBe('stopCopy')
    await expect(p.client.setMigrationState('preCopy')).rejects.toThrow(RangeError)
    expect(await p.client.migrationState()).toBe('stopCopy')
    // STOP_COPY to RESUMING: STOP, then RESUMING.
    expect(await p.client.setMigrationState('resuming')).toBe('resuming')
    expect(await p.client.setMigrationState('running')).toBe('running')
  })

  it('device state streams: saveState in STOP_COPY piped into loadState in RESUMING', async () => {
    await using p = await peer('migration')
    await p.client.validateVersion()
    // Read where it is not valid: the stream fails with the server's errno.
    await expect(pipeline(p.client.saveState(), new Writable({ write: (_c, _e, cb) => cb() }))).rejects.toMatchObject({
      code: 'EINVAL',
    })
    await p.client.setMigrationState('stopCopy')
    const chunks: Buffer[] = []
    await pipeline(
      p.client.saveState({ chunkSize: 3000 }),
      new Writable({
        write(c: Buffer, _e, cb) {
          chunks.push(c)
          cb()
        },
      }),
    )
    const state = Buffer.concat(chunks)
    expect(state.length).toBe(10_000)
    expect(state.every((b, i) => b === i % 251)).toBe(true)
    expect(chunks.every((c) => c.length <= 3000)).toBe(true)
    await p.client.setMigrationState('resuming')
    await pipeline(
      Readable.from([state.subarray(0, 4000), state.subarray(4000)]),
      p.client.loadState({ chunkSize: 1500 }),
    )
    const summary = await p.client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(summary.payload.readUInt32LE(0)).toBe(10_000)
    expect(summary.payload.readUInt32LE(4)).toBe(state.reduce((a, b) => a + b, 0))
    // Aborted: the stream ends with an AbortError.
    const ac = new AbortController()
    const aborted = p.client.saveState({ signal: ac.signal })
    ac.abort()
    await expect(pipeline(aborted, new Writable({ write: (_c, _e, cb) => cb() }))).rejects.toMatchObject({
      name: 'AbortError',
    })
  })

  it('dirty-page tracking: the page size the device settles on, and the dirty pages as ranges', async () => {
    await using p = await peer('migration')
    await p.client.validateVersion()
    expect(
      await p.client.startDirtyLogging({ pageSize: 1024, ranges: [{ iova: 0x10000n, length: 0x20000n }] }),
    ).toEqual({
      pageSize: 4096n,
    })
    // Pages 1, 2 and 5 of the range are dirty: two ranges once adjacent pages merge.
    expect(await p.client.dirtyPages({ iova: 0x10000n, length: 0x20000n, pageSize: 4096 })).toEqual([
      { iova: 0x11000n, length: 0x2000n },
      { iova: 0x15000n, length: 0x1000n },
    ])
    await p.client.stopDirtyLogging()
    await expect(p.client.dirtyPages({ iova: 1, length: 4096, pageSize: 4096 })).rejects.toThrow(RangeError)
    await expect(p.client.startDirtyLogging({ pageSize: 3000 })).rejects.toThrow(RangeError)
  })

  it('a device that lands in another state than asked is EPROTO, with the state it is in', async () => {
    await using p = await peer('migration-liar')
    await p.client.validateVersion()
    const e = (await rejection(p.client.setMigrationState('resuming'))) as VfioUserError & { state?: string }
    expect(e.code).toBe('EPROTO')
    expect(e.state).toBe('stop')
    expect(await p.client.migrationState()).toBe('stop')
    // And a bitmap that marks a page past the range asked for.
    const lie = await rejection(p.client.dirtyPages({ iova: 0, length: 8 * 4096, pageSize: 4096 }))
    expect(lie.message).toMatch(/past the 8 asked for/)
    // A state stream that returns more than asked: the Readable errors, and so does a pump.
    await p.client.setMigrationState('stopCopy')
    const more = await rejection(
      pipeline(p.client.saveState({ chunkSize: 1000 }), new Writable({ write: (_c, _e, cb) => cb() })),
    )
    expect(more.code).toBe('EPROTO')
    // Refused by the reply size bound of the request, before the body is stored.
    expect(more.message).toMatch(/reply to MIG_DATA_READ is 1025 bytes/)
  })

  it('reset is refused, and nothing sent, when the device did not report reset support', async () => {
    // The 'serve' peer's device info has flags 0: no reset.
    await using p = await peer('serve')
    await p.client.validateVersion()
    expect((await p.client.deviceInfo()).reset).toBe(false)
    const e = await rejection(p.client.reset())
    expect(e.code).toBe('ENOTSUP')
    expect(p.client.inFlight).toBe(0)
  })

  it('a device without migration: migrationFlags, migrationState and setMigrationState are ENOTSUP; a garbled feature reply is EPROTO', async () => {
    await using none = await peer('no-migration')
    await none.client.validateVersion()
    expect((await rejection(none.client.migrationFlags())).code).toBe('ENOTSUP')
    expect((await rejection(none.client.migrationState())).code).toBe('ENOTSUP')
    expect((await rejection(none.client.setMigrationState('stop'))).code).toBe('ENOTSUP')
    expect(await none.client.deviceFeature.probe(1, { get: true })).toBe(false)
    // The bundled test device refuses DEVICE_FEATURE with errno 0 (read as EIO): the same.
    await using device = await startTestDevice()
    await using plain = await connect(device.socketPath)
    await plain.validateVersion()
    expect((await rejection(plain.migrationState())).code).toBe('ENOTSUP')
    expect((await rejection(plain.setMigrationState('stop'))).code).toBe('ENOTSUP')
    await using p = await peer('serve')
    await p.client.validateVersion()
    // The 'serve' peer answers everything with a device-info payload: not a feature reply.
    expect((await rejection(p.client.migrationFlags())).code).toBe('EPROTO')
  })
})
