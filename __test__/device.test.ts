// The public API end to end against the real rust-vmm server (crates/test-device).
import { execFileSync, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import {
  chmodSync,
  closeSync,
  cpSync,
  existsSync,
  fstatSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
} from 'node:fs'
import { createConnection, createServer, type Socket } from 'node:net'
import { constants, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { AbortError, Command, commandName, connect, parseCapabilities, type VfioUserError } from '../ts/index'
import { startMigrationDevice, startScriptedPeer, startTestDevice, type TestDevice } from '../ts/testing'
import { refusal, refusedArg, rejection } from './rejection'
import { openFds } from './session'
import { getInfoPayload, regionAccess, regionInfoPayload } from './wire'

let device: TestDevice

beforeAll(async () => {
  device = await startTestDevice()
})

afterAll(async () => {
  await device.close()
})

describe('against the test device', () => {
  it('negotiates the version and capabilities', async () => {
    await using client = await connect(device.socketPath, { timeoutMs: 5000 })
    const version = await client.validateVersion()
    expect(version).toEqual({
      major: 0,
      minor: 0,
      capabilities: {
        maxMsgFds: 1,
        maxDataXferSize: 1048576,
        maxDmaMaps: 65535,
        pgsizes: 4096,
        writeMultiple: false,
        migration: { pgsize: 4096, maxBitmapSize: 268435456 },
      },
      warnings: [],
    })
    expect(client.validateVersion()).toBe(client.validateVersion())
    expect(client.version).toEqual(version)
  })

  it('sends DEVICE_GET_INFO with sendWait and sendWaitSync', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const reply = await client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { fds: [], timeoutMs: 1000 })
    expect(reply.command).toBe(Command.DEVICE_GET_INFO)
    expect(reply.payload.length).toBe(16)
    expect(reply.payload.readUInt32LE(8)).toBe(9) // regions
    expect(reply.payload.readUInt32LE(12)).toBe(5) // irqs
    const same = client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(same.payload).toEqual(reply.payload)
    expect(same.fds).toEqual([])
  })

  it('keeps many requests in flight', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const replies = await Promise.all(
      Array.from({ length: 1000 }, () => client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())),
    )
    expect(replies.every((r) => r.payload.readUInt32LE(8) === 9)).toBe(true)
    expect(new Set(replies.map((r) => r.id)).size).toBe(1000)
    expect(client.inFlight).toBe(0)
  })

  it('sends from reply reactions, async and sync, in order (requests sent there are corked)', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    // Each chain sends its next request from the reaction to its last reply: those sends are
    // written together when the batch of replies has been handed out. A sendWaitSync made
    // there must not wait behind them, and writes must land in the order they were made.
    const chains = Array.from({ length: 32 }, async (_, chain) => {
      for (let step = 0; step < 20; step++) {
        const data = Buffer.alloc(4)
        data.writeUInt32LE(chain * 1000 + step)
        await client.sendWait(Command.REGION_WRITE, regionAccess(0, chain * 4, 4, data))
        if (step % 5 === 4) {
          const r = client.sendWaitSync(Command.REGION_READ, regionAccess(0, chain * 4, 4))
          expect(r.payload.readUInt32LE(16)).toBe(chain * 1000 + step)
        }
      }
    })
    await Promise.all(chains)
    for (let chain = 0; chain < 32; chain++) {
      const r = await client.sendWait(Command.REGION_READ, regionAccess(0, chain * 4, 4))
      expect(r.payload.readUInt32LE(16)).toBe(chain * 1000 + 19)
    }
  })

  it('writes and reads BAR0 through the socket', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const data = Buffer.from('vfio-user from node!')
    await client.sendWait(Command.REGION_WRITE, regionAccess(0, 64, data.length, data))
    const r = await client.sendWait(Command.REGION_READ, regionAccess(0, 64, data.length))
    expect(r.payload.subarray(16)).toEqual(data)
    const config = client.sendWaitSync(Command.REGION_READ, regionAccess(7, 0, 4))
    expect(config.payload.readUInt16LE(16)).toBe(0x1b36)
    expect(config.payload.readUInt16LE(18)).toBe(0x0005)
  })

  it('receives the BAR0 fd once argsz covers the sparse-mmap capability', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const first = await client.sendWait(Command.DEVICE_GET_REGION_INFO, regionInfoPayload(0, 32))
    expect(first.fds).toEqual([])
    const needed = first.payload.readUInt32LE(0)
    expect(needed).toBeGreaterThan(32)
    const second = await client.sendWait(Command.DEVICE_GET_REGION_INFO, regionInfoPayload(0, needed))
    expect(second.fds.length).toBe(1)
    const fd = second.fds[0] as number
    expect(fstatSync(fd).size).toBe(4096)
    closeSync(fd)
    // The same through sendWaitSync, whose reply comes back through a scratch array.
    const sync = client.sendWaitSync(Command.DEVICE_GET_REGION_INFO, regionInfoPayload(0, needed))
    expect(sync).toMatchObject({ command: Command.DEVICE_GET_REGION_INFO, flags: 1 })
    expect(sync.payload.equals(second.payload)).toBe(true)
    expect(sync.fds.length).toBe(1)
    expect(fstatSync(sync.fds[0] as number).size).toBe(4096)
    closeSync(sync.fds[0] as number)
    expect(client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload()).fds).toEqual([])
  })

  it('turns error replies into VfioUserError with code and errno', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const bad = await rejection(client.sendWait(Command.REGION_READ, regionAccess(99, 0, 4)))
    expect(bad.code).toBe('EINVAL')
    expect(bad.errno).toBe(-constants.errno.EINVAL)
    expect(bad.command).toBe(Command.REGION_READ)
    expect(bad.commandName).toBe('REGION_READ')
    expect(bad.message).toContain(device.socketPath)
    // The crate's backend errors carry errno 0: that is a failure (EIO), never success.
    const eio = await rejection(client.sendWait(Command.REGION_READ, regionAccess(0, 8192, 4)))
    expect(eio.code).toBe('EIO')
    expect(() => client.sendWaitSync(Command.REGION_READ, regionAccess(0, 8192, 4))).toThrow(
      expect.objectContaining({ code: 'EIO', errno: -constants.errno.EIO }),
    )
    // The stream is still in sync.
    expect((await client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())).payload.length).toBe(16)
  })

  it('refuses requests before validateVersion and sends nothing', async () => {
    await using client = await connect(device.socketPath)
    const e = await rejection(client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    expect(e.code).toBe('ENOTCONN')
    expect(() => client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())).toThrow(/version negotiation/)
    // The server would reject anything but VERSION first: negotiation still succeeds.
    await client.validateVersion()
    await client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
  })

  it('refuses bad arguments with TypeError and RangeError (Node codes) before sending', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const p = getInfoPayload()
    const bad = client as unknown as {
      sendWait(...a: unknown[]): Promise<unknown>
      sendWaitSync(...a: unknown[]): unknown
    }
    await refusedArg(() => bad.sendWait('4', p), TypeError)
    await refusedArg(() => bad.sendWait(0, p), RangeError)
    await refusedArg(() => bad.sendWait(70000, p), RangeError)
    await refusedArg(() => bad.sendWait(1.5, p), RangeError)
    await refusedArg(() => bad.sendWait(Command.VERSION, p), RangeError)
    await refusedArg(() => bad.sendWait(Command.DMA_READ, p), RangeError)
    await refusedArg(() => bad.sendWait(4, 'payload'), TypeError)
    await refusedArg(() => bad.sendWait(4, p, { fds: 3 }), TypeError)
    await refusedArg(() => bad.sendWait(4, p, { fds: [-1] }), RangeError)
    await refusedArg(() => bad.sendWait(4, p, { timeoutMs: 0 }), RangeError)
    await refusedArg(() => bad.sendWait(4, p, { signal: {} }), TypeError)
    expect(() => bad.sendWaitSync(4, p, { timeoutMs: -5 })).toThrow(
      expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }),
    )
    expect(client.inFlight).toBe(0)
    // A Uint8Array that is not a Buffer is fine.
    const r = await client.sendWait(4, new Uint8Array(p))
    expect(r.payload.length).toBe(16)
  })

  it("rejects an abort as Node's APIs do: an AbortError, code 'ABORT_ERR', the signal's reason as cause", async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const reason = new Error('stop')
    const ac = new AbortController()
    ac.abort(reason)
    const before = await client.sendWait(4, getInfoPayload(), { signal: ac.signal }).catch((e: unknown) => e)
    expect(before).toBeInstanceOf(AbortError)
    expect(before).toMatchObject({ name: 'AbortError', code: 'ABORT_ERR', cause: reason })
    const later = new AbortController()
    const pending = client.sendWait(4, getInfoPayload(), { signal: later.signal }).catch((e: unknown) => e)
    later.abort()
    expect(await pending).toMatchObject({ name: 'AbortError', code: 'ABORT_ERR', cause: later.signal.reason })
  })

  it('closes with await using, failing in-flight requests and emitting close', async () => {
    // A server that reads every request and answers none: nothing in flight can resolve, so
    // a close that waited for replies instead of failing them would hang here.
    await using hold = await startScriptedPeer('hold')
    const client = await connect(hold.socketPath)
    await client.validateVersion()
    const closed = new Promise((resolve) => client.once('close', resolve))
    const inFlight = Array.from({ length: 3 }, () =>
      client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 60_000 }).then(
        () => 'resolved',
        (e: VfioUserError) => e.code,
      ),
    )
    {
      await using _ = client
    }
    expect(await Promise.all(inFlight)).toEqual(['ECONNABORTED', 'ECONNABORTED', 'ECONNABORTED'])
    const reason = (await closed) as VfioUserError
    expect(reason.code).toBe('ECONNABORTED')
    expect(client.closed).toBe(true)
    const after = await rejection(client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    expect(after.code).toBe('ECONNABORTED')
    await client.close()
  })

  it('reports connect failures with code and path', async () => {
    const missing = await rejection(connect('/nonexistent/vfio-user.sock'))
    expect(missing.code).toBe('ENOENT')
    expect(missing.message).toContain('/nonexistent/vfio-user.sock')
    // A socket file whose server is gone: ECONNREFUSED.
    const gone = await startTestDevice()
    process.kill(gone.pid, 'SIGKILL')
    expect((await gone.exited).signal).toBe('SIGKILL')
    const refused = await rejection(connect(gone.socketPath))
    expect(refused.code).toBe('ECONNREFUSED')
    await gone.close()
    await expect(connect('')).rejects.toThrow(RangeError)
  })

  it('reports EACCES for a socket the caller may not open', async () => {
    if (process.getuid?.() === 0) {
      // Root bypasses permission checks: connect from an unprivileged child instead.
      // The device's socket sits in a 0700 directory that only root may search.
      // The checkout may sit where nobody cannot read (under /root): the child loads a copy
      // of the built package from a folder it can.
      const root = join(__dirname, '..')
      const copy = mkdtempSync(join(tmpdir(), 'vfio-user-nobody-'))
      try {
        chmodSync(copy, 0o755)
        cpSync(join(root, 'dist'), join(copy, 'dist'), { recursive: true })
        for (const f of readdirSync(root).filter(
          (f) => f === 'index.js' || f === 'package.json' || f.endsWith('.node'),
        )) {
          cpSync(join(root, f), join(copy, f))
        }
        const dist = join(copy, 'dist', 'index.js')
        const nobody = { uid: 65534, gid: 65534, encoding: 'utf8' as const }
        const script = `require(${JSON.stringify(dist)}).connect(${JSON.stringify(device.socketPath)}).then(() => console.log('connected'), (e) => console.log(e.code + ' ' + e.message))`
        const out = execFileSync(process.execPath, ['-e', script], nobody)
        expect(out).toMatch(/^EACCES .*device\.sock/)
      } finally {
        rmSync(copy, { recursive: true, force: true })
      }
    } else {
      const denied = await startTestDevice()
      try {
        chmodSync(denied.socketPath, 0)
        const e = await rejection(connect(denied.socketPath))
        expect(e.code).toBe('EACCES')
        expect(e.message).toContain(denied.socketPath)
      } finally {
        await denied.close()
      }
    }
    await expect(connect(42 as unknown as string)).rejects.toThrow(TypeError)
  })
})

describe('parseCapabilities', () => {
  it('fills spec defaults and lists unknown keys', () => {
    expect(parseCapabilities('{}').capabilities.maxMsgFds).toBe(1)
    const p = parseCapabilities('{"capabilities":{"max_msg_fds":8,"write_multiple":true,"shiny":1}}')
    expect(p.capabilities.maxMsgFds).toBe(8)
    expect(p.capabilities.writeMultiple).toBe(true)
    expect(p.warnings).toEqual(["unknown capability 'shiny' ignored"])
  })

  it('throws EPROTO naming the problem', () => {
    for (const [json, what] of [
      ['[]', 'must be an object'],
      ['{"capabilities":1}', "'capabilities' must be an object"],
      ['{"capabilities":{"max_msg_fds":-1}}', 'max_msg_fds'],
      ['{"capabilities":{"pgsizes":0}}', 'pgsizes'],
      ['{"capabilities":{"write_multiple":"yes"}}', 'write_multiple'],
      ['{"capabilities":{"max_msg_fds":1,"max_msg_fds":2}}', 'duplicate'],
    ] as const) {
      expect(() => parseCapabilities(json)).toThrow(
        expect.objectContaining({ code: 'EPROTO', message: expect.stringContaining(what) }),
      )
    }
    expect(() => parseCapabilities(3 as unknown as string)).toThrow(TypeError)
  })
})

describe('Command', () => {
  it('names every command number of the spec', () => {
    expect(Object.values(Command).sort((a, b) => a - b)).toEqual(Array.from({ length: 18 }, (_, i) => i + 1))
    expect(commandName(15)).toBe('REGION_WRITE_MULTI')
    expect(commandName(99)).toBe('command 99')
  })
})

describe('send paths', () => {
  it('posts a write (No_reply) that is ordered before the next read', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const data = Buffer.from('posted!!')
    client.post(Command.REGION_WRITE, regionAccess(0, 256, data.length, data))
    const r = await client.sendWait(Command.REGION_READ, regionAccess(0, 256, data.length))
    expect(r.payload.subarray(16)).toEqual(data)
  })

  it('works with every send forced through the queue (sendQueued)', async () => {
    await using client = await connect(device.socketPath, { sendQueued: true })
    await client.validateVersion()
    const replies = await Promise.all(
      Array.from({ length: 100 }, () => client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())),
    )
    expect(replies.every((r) => r.payload.length === 16)).toBe(true)
    expect(client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload()).payload.length).toBe(16)
  })

  it('mixes sync and async requests on one connection', async () => {
    await using client = await connect(device.socketPath)
    await client.validateVersion()
    const pending = Array.from({ length: 50 }, () => client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))
    // The sync call may read replies meant for the promises; they must still settle.
    const sync = client.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    expect(sync.payload.length).toBe(16)
    expect((await Promise.all(pending)).length).toBe(50)
  })
})

describe('test devices (vfio-user/testing)', () => {
  /** Whether process `pid` is gone (reaped, or a zombie not yet reaped by its new parent). */
  const gone = (pid: number) => {
    try {
      return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z') === true
    } catch {
      return true
    }
  }

  it('die with the process that started them, and take their socket and folder along', async () => {
    // A script that starts a device and then crashes without closing it.
    const testing = join(__dirname, '..', 'dist', 'testing.js')
    const script = `require(${JSON.stringify(testing)}).startTestDevice().then((d) => {
      console.log(JSON.stringify({ pid: d.pid, socket: d.socketPath }))
      process.exit(3)
    })`
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 20_000 })
    expect(r.status).toBe(3)
    const { pid, socket } = JSON.parse(r.stdout) as { pid: number; socket: string }
    // No event tells us when an unrelated process is gone: look, for at most 10 s.
    const deadline = Date.now() + 10_000
    while (!gone(pid) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
    expect(gone(pid)).toBe(true)
    expect(existsSync(socket)).toBe(false)
    expect(existsSync(dirname(socket))).toBe(false)
  })

  it('close() ends a stopped device too, and its stderr stays readable', async () => {
    const d = await startTestDevice()
    process.kill(d.pid, 'SIGSTOP')
    await d.close()
    expect(await d.exited).toEqual({ code: 0, signal: null })
    expect(d.stderr()).toBe('')
    expect(existsSync(dirname(d.socketPath))).toBe(false)
  })
})

describe('connect({ fd })', () => {
  /** A socket connected to `path` by Node itself, paused (it must not read), and its fd. */
  async function nodeSocket(path: string): Promise<{ socket: Socket; fd: number }> {
    const socket = createConnection(path)
    await once(socket, 'connect')
    socket.pause()
    const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd
    return { socket, fd }
  }

  it('takes over a socket connected elsewhere; the fd stays the caller’s', async () => {
    await using device = await startTestDevice()
    const { socket, fd } = await nodeSocket(device.socketPath)
    const before = openFds()
    const c = await connect({ fd })
    expect(c.path).toBe(`fd:${fd}`)
    // The caller's socket can go: the client works on its own duplicate.
    socket.destroy()
    await once(socket, 'close')
    await c.validateVersion()
    expect((await c.deviceInfo()).numRegions).toBe(9)
    await c.close()
    expect(openFds()).toBe(before - 1)
  })

  it('refuses what is not a connected AF_UNIX stream, typed, naming the fd', async () => {
    const file = openSync(__filename, 'r')
    try {
      const e = await rejection(connect({ fd: file }))
      expect(e.code).toBe('ENOTSOCK')
      expect(e.message).toContain(`fd ${file}`)
    } finally {
      closeSync(file)
    }
    const tcp = createServer()
    tcp.listen(0, '127.0.0.1')
    await once(tcp, 'listening')
    const { port } = tcp.address() as { port: number }
    const client = createConnection(port, '127.0.0.1')
    await once(client, 'connect')
    client.pause()
    const fd = (client as unknown as { _handle: { fd: number } })._handle.fd
    expect((await rejection(connect({ fd }))).code).toBe('EAFNOSUPPORT')
    client.destroy()
    tcp.close()
    expect((await rejection(connect({ fd: 999_999 }))).code).toBe('EBADF')
    await refusedArg(() => connect({ fd: -1 }), RangeError)
    await refusedArg(() => connect(null as unknown as string), TypeError)
  })
})

describe('the testing helpers', () => {
  it('reject, never throw, on bad arguments', async () => {
    await refusedArg(() => startMigrationDevice({ stateMib: -1 }), RangeError, /stateMib/)
    await refusedArg(() => startScriptedPeer(7 as unknown as string), TypeError, /scenario/)
  })

  it('startScriptedPeer refuses a scenario the peer does not play (it would behave like serve)', async () => {
    const e = await refusal(startScriptedPeer('no-such-scenario'))
    expect(e.message).toMatch(/unknown scenario no-such-scenario/)
  })
})
