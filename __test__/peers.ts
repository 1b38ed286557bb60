// libvfio-user's sample servers as test peers: the other vfio-user implementation users run
// (the C library behind SPDK's target), written by people who did not read the spec our way.
// Built from ../shared/peers (or found through $VFIO_USER_LIBVFIO_SAMPLES); a peer that cannot
// be had fails the test that needs it, it never skips.
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, watch } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { connect, type VfioUserClient } from '../ts/index'

let samplesDir: string | undefined

/**
 * The folder holding libvfio-user's sample binaries: `$VFIO_USER_LIBVFIO_SAMPLES`, else what
 * `../shared/peers/build-libvfio-user` builds (about 10 s the first time, reused after).
 * @throws when neither is there, or the build fails: interop cannot be skipped.
 */
export function librarySamples(): string {
  if (samplesDir) return samplesDir
  const given = process.env.VFIO_USER_LIBVFIO_SAMPLES
  if (given) {
    if (!existsSync(join(given, 'server'))) throw new Error(`$VFIO_USER_LIBVFIO_SAMPLES=${given} holds no 'server'`)
    samplesDir = given
    return given
  }
  const script = resolve(__dirname, '../../shared/peers/build-libvfio-user')
  if (!existsSync(script)) {
    throw new Error(
      `libvfio-user's samples are needed: neither $VFIO_USER_LIBVFIO_SAMPLES nor ${script} exists ` +
        '(build libvfio-user and its samples, then point $VFIO_USER_LIBVFIO_SAMPLES at build/samples)',
    )
  }
  const r = spawnSync(script, [], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
  const out = r.stdout.trim().split('\n').pop() ?? ''
  if (r.status !== 0 || !existsSync(join(out, 'server'))) {
    throw new Error(`building libvfio-user failed (exit ${r.status}):\n${r.stderr.slice(-4000)}`)
  }
  samplesDir = out
  return out
}

/** How a sample process ended. */
export interface Exit {
  code: number | null
  signal: NodeJS.Signals | null
}

/** A running libvfio-user sample on a socket of its own. */
export interface Sample {
  readonly socketPath: string
  readonly process: ChildProcess
  /** Everything it wrote to stderr so far. */
  stderr(): string
  /** Everything it wrote to stdout so far. */
  stdout(): string
  /** Settles when it exits. */
  readonly exited: Promise<Exit>
  /**
   * Waits for it to exit by itself (`server` does once its client leaves), at most `ms`; then
   * kills it and says so. Removes its folder.
   */
  waitExit(ms?: number): Promise<Exit & { killed: boolean }>
  /** Ends it (SIGTERM, then SIGKILL if it does not go) and removes its folder. */
  close(): Promise<Exit>
  [Symbol.asyncDispose](): Promise<void>
}

/**
 * Starts sample `name` with `args` and its socket path last, and resolves once the socket
 * exists (an inotify watch on its folder, not a poll). stdin is a pipe kept open (`null`
 * exits at EOF on stdin).
 */
export async function startSample(name: string, args: string[] = []): Promise<Sample> {
  const dir = mkdtempSync(join(tmpdir(), `lvu-${name}-`))
  const socketPath = join(dir, 'sock')
  const binary = join(librarySamples(), name)
  let err = ''
  let out = ''
  const watcher = watch(dir)
  const child = spawn(binary, [...args, socketPath], { stdio: ['pipe', 'pipe', 'pipe'] })
  child.stderr?.setEncoding('utf8').on('data', (d: string) => {
    err += d
  })
  child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    out += d
  })
  // 'close', not 'exit': by then its stdio pipes are closed too, so no fd of ours is left.
  const exited = new Promise<Exit>((done) => child.once('close', (code, signal) => done({ code, signal })))
  try {
    await new Promise<void>((ready, fail) => {
      const timer = setTimeout(() => fail(new Error(`${name} did not create its socket in 10 s: ${err}`)), 10_000)
      const finish = (e?: Error) => {
        clearTimeout(timer)
        if (e) fail(e)
        else ready()
      }
      watcher.on('change', (_kind, file) => {
        if (file === 'sock') finish()
      })
      void exited.then((x) => finish(new Error(`${name} exited (${x.code ?? x.signal}) before listening: ${err}`)))
      child.once('error', finish)
      if (existsSync(socketPath)) finish()
    })
  } catch (e) {
    child.kill('SIGKILL')
    await exited
    rmSync(dir, { recursive: true, force: true })
    throw e
  } finally {
    watcher.close()
  }
  const stop = async (ms: number, signal: NodeJS.Signals | undefined) => {
    let killed = false
    if (child.exitCode === null && child.signalCode === null) {
      if (signal) child.kill(signal)
      const timer = setTimeout(() => {
        killed = true
        child.kill('SIGKILL')
      }, ms)
      await exited
      clearTimeout(timer)
    }
    rmSync(dir, { recursive: true, force: true })
    return { ...(await exited), killed }
  }
  return {
    socketPath,
    process: child,
    stderr: () => err,
    stdout: () => out,
    exited,
    waitExit: (ms = 10_000) => stop(ms, undefined),
    close: () => stop(5_000, 'SIGTERM'),
    async [Symbol.asyncDispose]() {
      await stop(5_000, 'SIGTERM')
    },
  }
}

/**
 * The lines of a sample's stderr that report a failure (a failed command, a refused request,
 * a bad access), less the benign one `server` logs each time its timer interrupts a read and
 * those matching `expected` (what a test provoked on purpose).
 */
export function failures(stderr: string, expected: RegExp[] = []): string[] {
  return (
    stderr
      // `null` logs every debug line with no newline: split before each of its prefixes.
      .split(/\n|(?=null: )/)
      .filter((l) => /failed|bad |refus|invalid|cannot|assert|mismatch|error/i.test(l))
      .filter((l) => !BENIGN.some((re) => re.test(l)))
      .filter((l) => !expected.some((re) => re.test(l)))
  )
}

/** What the samples log when nothing went wrong. */
const BENIGN = [
  // `server`, each time its own timer interrupts its read of the next request.
  /failed to receive request: Interrupted system call/,
  // The client left (ENOMSG is how the library reads EOF); logged by `null`, or with -v.
  /failed to receive request header: No message of desired type/,
  /vfu_reset_ctx: No message of desired type/,
]

/** How many of this library's threads this process has (`/proc/self/task`). */
export function threadCount(): number {
  // Only the library's own threads (its I/O threads, a tap's relay threads): Node starts and
  // parks threads of its own (libuv's pool, V8's) whenever it likes.
  return readdirSync('/proc/self/task').filter((t) => {
    try {
      return readFileSync(`/proc/self/task/${t}/comm`, 'utf8').startsWith('vfio-user')
    } catch {
      return false // gone while we looked
    }
  }).length
}

/**
 * A relay for a server that takes one client in its life (`server`), so that several clients
 * can use that one session in turn: say a test setting up the device's state, then a CLI run,
 * then the test again to look at the result. Bytes pass untouched both ways, except the
 * VERSION of every client after the first, which the relay answers itself with the server's
 * reply to the first (a VERSION mid-session is not the server's to answer). The session with
 * the server ends at `close()`. No fds pass: only for commands that carry none.
 */
export async function relayOneSession(upstream: string): Promise<{ path: string; close(): Promise<void> }> {
  const { createConnection, createServer } = await import('node:net')
  const dir = mkdtempSync(join(tmpdir(), 'lvu-relay-'))
  const path = join(dir, 'sock')
  // The socket file exists from bind(), a moment before listen(): a refusal then is retried.
  const connectOnce = () =>
    new Promise<import('node:net').Socket>((ok, fail) => {
      const s = createConnection(upstream)
      s.once('connect', () => ok(s)).once('error', fail)
    })
  let up: import('node:net').Socket | undefined
  for (let i = 0; !up; i++) {
    try {
      up = await connectOnce()
    } catch (e) {
      if ((e as { code?: string }).code !== 'ECONNREFUSED' || i === 100) throw e
      await new Promise((r) => setImmediate(r))
    }
  }
  let versionReply: Buffer | undefined
  let clients = 0
  let current: import('node:net').Socket | undefined
  let fromServer = Buffer.alloc(0)
  up.on('data', (d: Buffer) => {
    if (versionReply === undefined) {
      fromServer = Buffer.concat([fromServer, d])
      // The header's size counts the header too.
      if (fromServer.length >= 16 && fromServer.length >= fromServer.readUInt32LE(4)) {
        versionReply = fromServer.subarray(0, fromServer.readUInt32LE(4))
      }
    }
    current?.write(d)
  })
  const server = createServer((sock) => {
    clients++
    current = sock
    const first = clients === 1
    let pending = Buffer.alloc(0)
    let answered = first
    sock.on('data', (d: Buffer) => {
      if (answered) {
        up.write(d)
        return
      }
      // A later client's VERSION: answer it with the first reply, its id rewritten.
      pending = Buffer.concat([pending, d])
      if (pending.length < 16 || pending.length < pending.readUInt32LE(4)) return
      const size = pending.readUInt32LE(4)
      const reply = Buffer.from(versionReply ?? Buffer.alloc(0))
      reply.writeUInt16LE(pending.readUInt16LE(0), 0)
      sock.write(reply)
      answered = true
      if (pending.length > size) up.write(pending.subarray(size))
    })
    sock.on('close', () => {
      if (current === sock) current = undefined
    })
    sock.on('error', () => {})
  })
  await new Promise<void>((ok) => server.listen(path, ok))
  return {
    path,
    async close() {
      up.destroy()
      await new Promise<void>((ok) => server.close(() => ok()))
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

/**
 * Connects to a sample. Its socket file exists from bind(), a moment before listen(): a
 * refusal in that window is retried (never a connect-and-close probe, which `server` and
 * `gpio-pci-idio-16` take as a failed client and exit 1).
 */
export async function connectRetrying(path: string): Promise<VfioUserClient> {
  for (let i = 0; ; i++) {
    try {
      return await connect(path)
    } catch (e) {
      if ((e as { code?: string }).code !== 'ECONNREFUSED' || i === 100) throw e
      await new Promise((r) => setImmediate(r))
    }
  }
}

/**
 * Starts what a process opens once and keeps (libuv's threadpool, the SIGCHLD pipe of its
 * first child, the native module), so that fd and thread baselines taken after it count only
 * what a test leaves behind.
 */
export async function warmUp(): Promise<void> {
  const { readFile } = await import('node:fs/promises')
  await readFile(__filename)
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' })
  await new Promise((r) => child.once('exit', r))
  watch(tmpdir()).close()
  await import('../ts/index')
}

/**
 * Expects this process's fd and thread counts to be back at `fds` and `threads`. A thread
 * that has been joined can stay listed in /proc/self/task a moment longer (the join returns
 * when it clears its tid, before the kernel releases it), and no event says when it is gone:
 * look again, a millisecond at a time, for at most 5 s. Anything really left behind stays
 * and fails.
 */
export async function expectCountsBack(fds: number, threads: number): Promise<void> {
  const { expect } = await import('vitest')
  const { readdirSync } = await import('node:fs')
  const open = () => readdirSync('/proc/self/fd').length
  const deadline = Date.now() + 5000
  while ((open() !== fds || threadCount() !== threads) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 1))
  }
  expect({ fds: open(), threads: threadCount() }).toEqual({ fds, threads })
}
