import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { invalidArg, outOfRange, rejecting } from './args'
import { platformPackage } from './platform'

/** A running server process: the test device (rust-vmm's vfio_user Server) or the scripted peer. */
export interface TestDevice {
  /** The UNIX socket it listens on. */
  readonly socketPath: string
  /** Its process id. */
  readonly pid: number
  /** Settles once the process has exited (for any reason) and its pipes are closed. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  /** The last 64 KiB it wrote to stderr. */
  stderr(): string
  /**
   * Stops the process (SIGTERM, and SIGCONT in case it was stopped; SIGKILL if it has not
   * exited 2 s later) and removes its temporary directory. Idempotent; never waits forever.
   */
  close(): Promise<void>
  /** Same as {@link TestDevice.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>
}

/** Options for {@link startTestDevice} and {@link startScriptedPeer}. */
export interface TestDeviceOptions {
  /** Path of the binary; default: see {@link testDeviceBinary} (the scripted peer: `$VFIO_USER_SCRIPTED_PEER` or the newest cargo build). */
  binary?: string
  /** How long to wait for it to start listening, in ms (default 10000). */
  startTimeoutMs?: number
}

/** `name` as shipped in this machine's platform package (`vfio-user-linux-x64-gnu`…), if installed. */
function fromPlatformPackage(name: string): string | undefined {
  let dir: string
  try {
    dir = dirname(require.resolve(`${platformPackage()}/package.json`))
  } catch {
    return undefined
  }
  const p = join(dir, name)
  return existsSync(p) ? p : undefined
}

/** Finds a binary of `crates/test-device` built by `npm install` (release) or `cargo build` (debug). */
function fromCargoBuild(name: string): string | undefined {
  const root = resolve(__dirname, '..')
  const candidates = ['release', 'debug']
    .map((profile) => join(root, 'target', profile, name))
    .filter((p) => existsSync(p))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs)
  return candidates[0]
}

function findBinary(name: string, envVar: string, shipped: boolean): string {
  const found = process.env[envVar] || (shipped ? fromPlatformPackage(name) : undefined) || fromCargoBuild(name)
  if (found) return found
  const where = shipped ? `not in ${platformPackage()} and ` : ''
  throw new Error(`${name} is ${where}not built: run \`npm run build:device\` (or \`cargo build -p test-device\`)`)
}

/**
 * The test device binary: `$VFIO_USER_TEST_DEVICE`, else the one shipped in this machine's
 * platform package (so an installed `vfio-user` needs no Rust toolchain), else the newest
 * cargo build of a source checkout.
 */
export function testDeviceBinary(): string {
  return findBinary('vfio-user-test-device', 'VFIO_USER_TEST_DEVICE', true)
}

/**
 * Starts the test device (rust-vmm's `vfio_user` server, `crates/test-device`) on a socket in
 * a fresh temporary directory, and resolves once it is listening. It serves clients one after
 * another, and is a PCI device with:
 *
 * - region 7, config space (256 bytes): vendor 0x1b36, device 0x0005; writable except the ids;
 * - region 0, BAR0 (4 KiB, mmappable: one sparse area covering it, its fd on the second
 *   `regionInfo` pass), memory except for its registers: `0xffc` doorbell (a 4-byte write of
 *   `v` signals MSI vector `v` if an eventfd is wired to it, else INTx); `0xfe0` DMA source
 *   iova and `0xfe8` DMA destination iova (u64 each), `0xff0` DMA go (a 4-byte length: the
 *   device copies that many bytes through the memory behind its DMA maps);
 * - region 2, BAR2 (1 MiB) of memory, over the socket only;
 * - irqs: INTx (1 vector), MSI (4 vectors); MSI-X, ERR and REQ have none;
 * - DEVICE_RESET clears BAR0 and BAR2 and restores config space.
 */
export function startTestDevice(options: TestDeviceOptions = {}): Promise<TestDevice> {
  return rejecting(() => startListening(options.binary ?? testDeviceBinary(), [], options.startTimeoutMs))
}

/**
 * The migration-capable device binary: `$VFIO_USER_MIGRATION_DEVICE`, else the one shipped in
 * this machine's platform package, else the newest cargo build of a source checkout.
 */
export function migrationDeviceBinary(): string {
  return findBinary('vfio-user-migration-device', 'VFIO_USER_MIGRATION_DEVICE', true)
}

/** Options for {@link startMigrationDevice}. */
export interface MigrationDeviceOptions extends TestDeviceOptions {
  /** Size of the device's state (BAR0), in MiB (default 1, at most 4096). */
  stateMib?: number
  /** Offer REGION_WRITE_MULTI (default true). */
  writeMultiple?: boolean
  /**
   * Pad every MIG_DATA_READ reply with zeros to the size asked, its `size` field giving the
   * real count, as libvfio-user does (default false).
   */
  padReads?: boolean
}

/**
 * Starts the migration-capable device (`vfio-user-migration-device`, written on the proto
 * crate since rust-vmm's server has no migration): migration v2 with STOP_COPY and PRE_COPY
 * over a state of `stateMib` MiB in BAR0, DMA maps mmapped from their fds, dirty logging of
 * the pages the device writes into them, and REGION_WRITE_MULTI. Its registers are listed in
 * `crates/test-device/src/bin/migration_device/regions.rs`.
 */
export function startMigrationDevice(options: MigrationDeviceOptions = {}): Promise<TestDevice> {
  return rejecting(() => startMigration(options))
}

function startMigration(options: MigrationDeviceOptions): Promise<TestDevice> {
  const { stateMib = 1, writeMultiple = true, padReads = false } = options
  if (!Number.isInteger(stateMib) || stateMib < 0 || stateMib > 4096)
    throw outOfRange(`stateMib must be an integer from 0 to 4096, got ${stateMib}`)
  const args = [
    '--state-mib',
    String(stateMib),
    ...(writeMultiple ? [] : ['--no-write-multiple']),
    ...(padReads ? ['--pad-reads'] : []),
  ]
  return startListening(options.binary ?? migrationDeviceBinary(), args, options.startTimeoutMs)
}

/**
 * Starts the scripted misbehaving server (`vfio-user-scripted-peer`) with one of its
 * scenarios, for testing how your code handles a broken or hostile server. It plays the
 * scenario to every client that connects, until closed. The scenarios are listed in `crates/test-device/src/bin/scripted_peer.rs`.
 */
export function startScriptedPeer(scenario: string, options: TestDeviceOptions = {}): Promise<TestDevice> {
  return rejecting(() => {
    if (typeof scenario !== 'string') throw invalidArg('scenario must be a string')
    const binary = options.binary ?? findBinary('vfio-user-scripted-peer', 'VFIO_USER_SCRIPTED_PEER', false)
    return startListening(binary, [scenario], options.startTimeoutMs)
  })
}

/** How long `close()` waits after SIGTERM before SIGKILL. */
const CLOSE_GRACE_MS = 2000

async function startListening(binary: string, args: string[], startTimeoutMs = 10_000): Promise<TestDevice> {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-'))
  const socketPath = join(dir, 'device.sock')
  const child = spawn(binary, [socketPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) =>
    // 'close', not 'exit': by then its stdio pipes are closed too, so no fd of ours is left.
    child.once('close', (code, signal) => done({ code, signal })),
  )
  let stderr = ''
  child.stderr?.setEncoding('utf8')
  child.stderr?.on('data', (d: string) => {
    stderr = (stderr + d).slice(-65536)
  })
  const cleanup = () => rmSync(dir, { recursive: true, force: true })
  try {
    await waitListening(child, startTimeoutMs, () => stderr)
  } catch (e) {
    child.kill('SIGKILL')
    cleanup()
    throw e
  }
  // Nothing more is read from stdout; keep it flowing so its end (and 'close') comes.
  child.stdout?.resume()
  let closing: Promise<void> | undefined
  const close = () => {
    closing ??= new Promise<void>((done) => {
      void exited.then(() => done())
      if (child.exitCode !== null || child.signalCode !== null) return
      child.kill('SIGTERM')
      // A stopped process (SIGSTOP, a debugger) takes SIGTERM only once continued.
      child.kill('SIGCONT')
      const force = setTimeout(() => child.kill('SIGKILL'), CLOSE_GRACE_MS)
      void exited.then(() => clearTimeout(force))
    }).then(cleanup)
    return closing
  }
  return {
    socketPath,
    pid: child.pid ?? -1,
    exited,
    stderr: () => stderr,
    close,
    [Symbol.asyncDispose]: close,
  }
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
