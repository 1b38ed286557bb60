// A hostile server must never crash the VMM (issue 24): each attack that once killed Node
// (SIGBUS through memory the server shrank, SIGSEGV or heap corruption past 4 GiB) is played
// in a child process of its own by __test__/hostile-child.mjs against
// vfio-user-hostile-peer, a real process on a real socket; the child must exit 0, and report
// its fds back where they were.
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { Command, connect } from '../ts/index'
import { startScriptedPeer, type TestDevice } from '../ts/testing'
import { rejection } from './rejection'
import { cli } from './through-tap'
import { getInfoPayload } from './wire'

const root = resolve(__dirname, '..')
const child = join(__dirname, 'hostile-child.mjs')
const scratch = mkdtempSync(join(tmpdir(), 'vfio-user-hostile-'))
afterAll(() => rmSync(scratch, { recursive: true, force: true }))

/** vfio-user-hostile-peer, beside the scripted peer this run uses. */
function hostileBinary(): string {
  const scripted = process.env.VFIO_USER_SCRIPTED_PEER ?? join(root, 'target', 'release', 'vfio-user-scripted-peer')
  return process.env.VFIO_USER_HOSTILE_PEER ?? join(dirname(scripted), 'vfio-user-hostile-peer')
}

/** Runs one scenario of the child (under `prefix`, e.g. prlimit) and returns what it printed. */
function play(args: string[], prefix: string[] = []): Record<string, unknown> {
  const command = [...prefix, process.execPath, '--expose-gc', child, ...args]
  const r = spawnSync(command[0], command.slice(1), { encoding: 'utf8', cwd: root, timeout: 120_000 })
  // The crash this guards against shows here: a signal (SIGBUS, SIGSEGV, SIGABRT) or exit 134/135/139.
  expect({ status: r.status, signal: r.signal, stderr: r.stderr }).toEqual({ status: 0, signal: null, stderr: '' })
  const seen = JSON.parse(r.stdout) as Record<string, unknown> & { fds: { before: number; after: number } }
  expect(seen.fds.after).toBe(seen.fds.before)
  return seen
}

async function withPeer<T>(scenario: string, f: (peer: TestDevice) => T): Promise<T> {
  const peer = await startScriptedPeer(scenario, { binary: hostileBinary() })
  try {
    return f(peer)
  } finally {
    await peer.close()
  }
}

describe('a server that shrinks the memory it was given', () => {
  it('cannot shrink DMA memory allocated here: it is sealed, and its DMA is served', async () => {
    const seen = await withPeer('shrink-dma', (peer) => play(['dma-sealed', peer.socketPath]))
    // ftruncate fails with EPERM (the seals), the DMA_WRITE and DMA_READ are served.
    expect(seen.report).toEqual({ truncate: 1, write: 0, read: 0, data: 'vfio' })
    expect(seen.buffer).toBe('vfio')
  })

  it("a caller's shrinkable fd is refused unless accepted; then its DMA and reads into it fail with EFAULT, not SIGBUS", async () => {
    const file = join(scratch, 'guest-ram')
    const seen = await withPeer('shrink-dma', (peer) => play(['dma-shrinkable', peer.socketPath, file]))
    expect(seen.refused).toBe('EPERM')
    // The server did shrink it (0); both accesses were refused with EFAULT (14).
    expect(seen.report).toEqual({ truncate: 0, write: 14, read: 14, data: '\0\0\0\0' })
    expect(seen.readInto).toBe('EFAULT')
  })
})

describe('a server whose region fds lie', () => {
  it('a region fd shorter than the area, or shrinkable, is refused; an 8 GiB BAR is seen through windows', async () => {
    const seen = await withPeer('regions', (peer) => play(['regions', peer.socketPath]))
    expect(seen).toMatchObject({
      empty: 'EINVAL',
      unsealed: 'EPERM',
      accepted: 4096,
      bigSize: String(8 * 2 ** 30),
      bigBuffer: 'ERR_BUFFER_TOO_LARGE',
      bigByte: 0x5a,
      bigTooLong: 'ERR_BUFFER_TOO_LARGE',
      bigPastEnd: 'ERR_OUT_OF_RANGE',
      afterUnmap: 0,
      sealed: 4096,
      closedLength: 0,
    })
  })
})

describe('memory larger than one Buffer', () => {
  it('DMA memory past 4 GiB is seen through windows, refuses one Buffer over all of it, and survives collection', () => {
    const seen = play(['big-memory', '', join(scratch, 'big-ram')])
    for (const size of [2 ** 32 + 4096, 2 ** 33]) {
      expect(seen[size]).toEqual({
        buffer: 'ERR_BUFFER_TOO_LARGE',
        across: 'st4GiB',
        tooLong: 'ERR_BUFFER_TOO_LARGE',
        closed: 0,
      })
    }
    // 64 TiB: made (no page is touched) and refused as one Buffer, or refused by the kernel.
    expect(['ERR_BUFFER_TOO_LARGE', 'ENOMEM', 'EFBIG']).toContain(seen.huge)
    expect(seen.fromFd).toBe('ERR_BUFFER_TOO_LARGE')
  })
})

describe('a server that sends more fds than the client may hold', () => {
  it('253 fds to a client limited to 80: the connection ends ECONNRESET and every fd that came is closed', async () => {
    const seen = await withPeer('fds:253', (peer) => play(['fds', peer.socketPath], ['prlimit', '--nofile=80']))
    expect(seen).toMatchObject({ call: 'ECONNRESET', close: 'ECONNRESET' })
  })
})

describe('a server that sends more fds than the tap may hold', () => {
  it('vfio-user tap limited to 64 fds relays a reply with 253: the session ends, and every fd that came is closed', async () => {
    await using peer = await startScriptedPeer('fds:253', { binary: hostileBinary() })
    const listen = join(scratch, 'tap.sock')
    const tapProcess = spawn(
      'prlimit',
      ['--nofile=64', process.execPath, cli, 'tap', listen, peer.socketPath, '--json'],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    )
    const exited = once(tapProcess, 'close')
    try {
      let out = ''
      const seen = (what: string) =>
        new Promise<void>((resolve) => {
          const look = () => (out.includes(what) ? resolve() : tapProcess.stdout.once('data', look))
          look()
        })
      tapProcess.stdout.setEncoding('utf8').on('data', (d: string) => {
        out += d
      })
      await seen('"type":"listening"')
      const fds = () => readdirSync(`/proc/${tapProcess.pid}/fd`).length
      const before = fds()
      await using client = await connect(listen)
      await client.validateVersion()
      expect((await rejection(client.sendWait(Command.DEVICE_GET_INFO, getInfoPayload()))).code).toBe('ECONNRESET')
      await seen('"type":"close"')
      expect(out).toMatch(/"reason":"reading from the server: No buffer space available"/)
      expect(fds()).toBe(before)
    } finally {
      tapProcess.kill('SIGINT')
      await exited
    }
  })
})
