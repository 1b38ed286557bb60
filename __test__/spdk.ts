// SPDK's NVMe-oF target with the vfio-user transport (`nvmf_tgt`) as a test peer: the
// vfio-user server deployments run, an emulated NVMe controller on libvfio-user. Built by
// ../shared/peers/build-spdk (or found through $VFIO_USER_SPDK); a target that cannot be had
// fails the test that needs it, it never skips. Each target is a process of its own with a
// 64 MiB malloc bdev as namespace 1, configured with SPDK's rpc.py (Debian's python3).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

let spdkDir: string | undefined

/**
 * The SPDK folder (build/bin/nvmf_tgt, scripts/rpc.py): `$VFIO_USER_SPDK`, else what
 * `../shared/peers/build-spdk` builds (10-15 minutes the first time, reused after).
 * @throws when neither is there, or the build fails.
 */
export function spdk(): string {
  if (spdkDir) return spdkDir
  const given = process.env.VFIO_USER_SPDK
  if (given) {
    if (!existsSync(join(given, 'build/bin/nvmf_tgt')))
      throw new Error(`$VFIO_USER_SPDK=${given} holds no build/bin/nvmf_tgt`)
    spdkDir = given
    return given
  }
  const script = resolve(__dirname, '../../shared/peers/build-spdk')
  if (!existsSync(script)) {
    throw new Error(`SPDK's nvmf_tgt is needed: neither $VFIO_USER_SPDK nor ${script} exists (see the README)`)
  }
  // The build's long log goes to our stderr, not into a buffer that could overflow.
  const r = spawnSync(script, [], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  const out = r.stdout.trim().split('\n').pop() ?? ''
  if (r.status !== 0 || !existsSync(join(out, 'build/bin/nvmf_tgt'))) {
    throw new Error(`building SPDK failed (exit ${r.status}); its log is above`)
  }
  spdkDir = out
  return out
}

/** How a target is run. */
export interface TargetOptions {
  /**
   * Interrupt mode (`--interrupt-mode`, transport `-M`: BAR0 not mmappable, doorbells by
   * REGION_WRITE), or polling (BAR0's doorbells a sparse mmap area; one core at 100%).
   */
  interrupt: boolean
}

/** A running nvmf_tgt with one vfio-user controller. */
export interface Target {
  /** The controller's socket. */
  readonly socketPath: string
  readonly process: ChildProcess
  /** What it logged so far. */
  log(): string
  /** Its `*ERROR*` lines, less those matching `expected` (what a test provoked). */
  errors(expected?: RegExp[]): string[]
  /** Runs rpc.py commands, one per line, against it; resolves with their output. */
  rpc(commands: string[]): string
  /** Ends it (SIGTERM, then SIGKILL) and removes its folder. */
  close(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

/** The NQN of the one subsystem each target serves. */
export const NQN = 'nqn.2019-07.io.spdk:cnode0'

/**
 * Targets running now: killed when this process exits, however it exits (nvmf_tgt does not
 * die with its parent as the test devices do, and a polling one spins a core).
 */
const running = new Set<ChildProcess>()
process.on('exit', () => {
  for (const t of running) t.kill('SIGKILL')
})

/** Starts a target and its controller; resolves once the controller's socket listens. */
export async function startTarget(options: TargetOptions): Promise<Target> {
  const root = spdk()
  const dir = mkdtempSync(join(tmpdir(), 'spdk-'))
  const rpcSock = join(dir, 'rpc.sock')
  const args = ['-m', '0x1', '--no-huge', '-s', '512', '--disable-cpumask-locks', '-r', rpcSock]
  if (options.interrupt) args.push('--interrupt-mode')
  let log = ''
  // Its own folder as cwd: a core it might dump goes with the folder, not into the checkout.
  const child = spawn(join(root, 'build/bin/nvmf_tgt'), args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
  child.stdout?.on('data', (d: Buffer) => {
    log += d.toString()
  })
  child.stderr?.on('data', (d: Buffer) => {
    log += d.toString()
  })
  running.add(child)
  const exited = new Promise<void>((done) =>
    child.once('close', () => {
      running.delete(child)
      done()
    }),
  )
  const rpc = (commands: string[]) => {
    // -r: rpc.py waits (retries every 0.2 s) until the target listens.
    const r = spawnSync('/usr/bin/python3', [join(root, 'scripts/rpc.py'), '-r', '150', '-s', rpcSock], {
      input: `${commands.join('\n')}\n`,
      encoding: 'utf8',
      timeout: 60_000,
    })
    if (r.status !== 0)
      throw new Error(`rpc.py failed (${r.status}): ${r.stderr}\n${commands.join('\n')}\nlog:\n${log}`)
    return r.stdout
  }
  const close = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      const killer = setTimeout(() => child.kill('SIGKILL'), 5000)
      await exited
      clearTimeout(killer)
    }
    rmSync(dir, { recursive: true, force: true })
  }
  try {
    rpc([
      'framework_wait_init',
      `nvmf_create_transport -t VFIOUSER${options.interrupt ? ' -M' : ''}`,
      'bdev_malloc_create 64 512 -b Malloc0',
      `nvmf_create_subsystem ${NQN} -a -s SPDK0`,
      `nvmf_subsystem_add_ns ${NQN} Malloc0`,
      `nvmf_subsystem_add_listener ${NQN} -t VFIOUSER -a ${dir} -s 0`,
    ])
  } catch (e) {
    await close()
    throw e
  }
  return {
    socketPath: join(dir, 'cntrl'),
    process: child,
    log: () => log,
    errors: (expected = []) =>
      log.split('\n').filter((l) => l.includes('*ERROR*') && !expected.some((re) => re.test(l))),
    rpc,
    close,
    [Symbol.asyncDispose]: close,
  }
}
