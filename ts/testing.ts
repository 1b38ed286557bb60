import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'

/** A running test device: rust-vmm's vfio_user Server in its own process. */
export interface TestDevice {
  /** The UNIX socket it listens on. */
  readonly socketPath: string
  /** Its process id. */
  readonly pid: number
  /** Stops the process and removes its temporary directory. Idempotent. */
  close(): Promise<void>
  /** Same as {@link TestDevice.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>
}

/** Options for {@link startTestDevice}. */
export interface TestDeviceOptions {
  /** Path of the `vfio-user-test-device` binary; default: `$VFIO_USER_TEST_DEVICE` or the newest cargo build. */
  binary?: string
  /** How long to wait for it to start listening, in ms (default 10000). */
  startTimeoutMs?: number
}

/** Finds the test device binary built by `npm install` (release) or `cargo build` (debug). */
export function testDeviceBinary(): string {
  const fromEnv = process.env.VFIO_USER_TEST_DEVICE
  if (fromEnv) return fromEnv
  const root = resolve(__dirname, '..')
  const candidates = ['release', 'debug']
    .map((profile) => join(root, 'target', profile, 'vfio-user-test-device'))
    .filter((p) => existsSync(p))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs)
  if (candidates.length === 0) {
    throw new Error('vfio-user-test-device is not built: run `npm run build:device` (or `cargo build -p test-device`)')
  }
  return candidates[0] as string
}

/**
 * Starts the test device (a small PCI device: config space, a 4 KiB BAR0, INTx and MSI) on a
 * socket in a fresh temporary directory, and resolves once it is listening.
 */
export async function startTestDevice(options: TestDeviceOptions = {}): Promise<TestDevice> {
  const binary = options.binary ?? testDeviceBinary()
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-'))
  const socketPath = join(dir, 'device.sock')
  const child = spawn(binary, [socketPath], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr?.setEncoding('utf8')
  child.stderr?.on('data', (d: string) => {
    stderr = (stderr + d).slice(-4096)
  })
  const cleanup = () => rmSync(dir, { recursive: true, force: true })
  try {
    await waitListening(child, options.startTimeoutMs ?? 10_000, () => stderr)
  } catch (e) {
    child.kill('SIGKILL')
    cleanup()
    throw e
  }
  let closing: Promise<void> | undefined
  const close = () => {
    closing ??= new Promise<void>((done) => {
      if (child.exitCode !== null || child.signalCode !== null) return done()
      child.once('exit', () => done())
      child.kill('SIGTERM')
    }).then(cleanup)
    return closing
  }
  return { socketPath, pid: child.pid ?? -1, close, [Symbol.asyncDispose]: close }
}

function waitListening(child: ChildProcess, timeoutMs: number, stderr: () => string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream })
    const timer = setTimeout(() => fail(new Error(`test device did not start within ${timeoutMs} ms`)), timeoutMs)
    const fail = (e: Error) => {
      clearTimeout(timer)
      lines.close()
      reject(e)
    }
    child.once('error', fail)
    child.once('exit', (code, signal) =>
      fail(new Error(`test device exited (${signal ?? code}) before listening: ${stderr()}`)),
    )
    lines.on('line', (line) => {
      if (!line.startsWith('listening ')) return
      clearTimeout(timer)
      child.removeAllListeners('exit')
      child.removeAllListeners('error')
      lines.close()
      resolvePromise()
    })
  })
}
