// `vfio-user probe` as a user runs it (the compiled bin that `npm install` builds).
import { spawn, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { createReadStream, existsSync, mkdtempSync, readFileSync, rmSync, watch } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it, onTestFinished } from 'vitest'
import { Command, connect, type VfioUserClient } from '../ts/index'
import { startMigrationDevice, startScriptedPeer, startTestDevice } from '../ts/testing'
import { connectRetrying } from './peers'
import { rejection } from './rejection'
import { getInfoPayload } from './wire'

const cli = join(__dirname, '..', 'dist', 'cli.js')

function probe(...args: string[]) {
  return spawnSync(process.execPath, [cli, 'probe', ...args], { encoding: 'utf8', timeout: 20_000 })
}

/** Sends requests through a tap until it ends the session (ECONNRESET), then closes. */
async function untilReset(c: VfioUserClient): Promise<void> {
  const gone = await rejection(
    (async () => {
      for (;;) await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    })(),
  )
  expect(gone.code).toBe('ECONNRESET')
  await c.close()
}

describe('vfio-user probe', () => {
  it('starts the test device and prints the version and every capability', () => {
    const r = probe()
    expect(r.status).toBe(0)
    for (const line of [
      /^version +0\.0$/m,
      /^max_msg_fds +1$/m,
      /^max_data_xfer_size +1048576$/m,
      /^max_dma_maps +65535$/m,
      /^pgsizes +0x1000$/m,
      /^write_multiple +false$/m,
      /^migration +pgsize 4096/m,
      /^twin_socket +absent$/m,
      /^device +9 regions, 5 irq indexes, flags PCI reset$/m,
      /^region 0 +BAR0 +rwm size 0x1000 mmap offset 0x0 sparse 0x0\+0x1000 fd$/m,
      /^region 7 +CONFIG +rw- size 0x100$/m,
      /^irq 1 +MSI +4 vector\(s\), eventfd$/m,
      /^pci +vendor 0x1b36 device 0x0005 /m,
    ]) {
      expect(r.stdout).toMatch(line)
    }
  })

  it('probes a given socket as JSON', async () => {
    await using device = await startTestDevice()
    const r = probe(device.socketPath, '--json')
    expect(r.status).toBe(0)
    const out = JSON.parse(r.stdout)
    expect(out.socket).toBe(device.socketPath)
    // Each key once: the negotiated version under `version`, nowhere else.
    expect(Object.keys(out).sort()).toEqual([
      'device',
      'dumps',
      'errors',
      'irqs',
      'pci',
      'regions',
      'socket',
      'version',
    ])
    expect(out.version).toMatchObject({ major: 0, minor: 0, warnings: [] })
    expect(out.version.capabilities.maxMsgFds).toBe(1)
    expect(out.device).toMatchObject({ numRegions: 9, numIrqs: 5, reset: true })
    expect(out.regions[0]).toMatchObject({
      index: 0,
      size: '4096',
      hasFd: true,
      sparse: [{ offset: '0', size: '4096' }],
    })
    expect(out.irqs.map((i: { count: number }) => i.count)).toEqual([1, 4, 0, 0, 0])
    expect(out.pci).toMatchObject({ vendorId: 0x1b36, deviceId: 0x0005, capabilities: [] })
    expect(out.errors).toEqual([])
  })

  it('shows each BAR with its size and dumps regions with --dump REGION[:OFFSET[:LENGTH]]', async () => {
    await using device = await startTestDevice()
    {
      await using c = await connect(device.socketPath)
      await c.validateVersion()
      await c.regionWrite(0, 0x100, Buffer.from('vfio-user probe!'))
    }
    const r = probe(device.socketPath, '--dump', '0:0x100:16', '--dump', '7:0:4')
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' })
    expect(r.stdout).toContain('  BAR0              memory, 32-bit at 0x0, size 0x1000')
    expect(r.stdout).toContain('  BAR2              memory, 32-bit at 0x0, size 0x100000')
    expect(r.stdout).toContain('dump                region 0, 16 bytes at 0x100')
    expect(r.stdout).toContain('  00000100  76 66 69 6f 2d 75 73 65 72 20 70 72 6f 62 65 21  |vfio-user probe!|')
    expect(r.stdout).toContain('  00000000  36 1b 05 00')
    const j = probe(device.socketPath, '--json', '--dump', '0:0x100:16')
    const out = JSON.parse(j.stdout)
    expect(out.dumps).toEqual([
      {
        region: 0,
        offset: 256,
        length: 16,
        lines: ['00000100  76 66 69 6f 2d 75 73 65 72 20 70 72 6f 62 65 21  |vfio-user probe!|'],
      },
    ])
    expect(out.pci.decodedBars[0]).toEqual({ index: 0, kind: 'memory32', prefetchable: false, address: '0' })
    // 1 MiB of BAR2 asked: 64 KiB read, and said; its equal rows as one `*`, as hexdump does.
    const big = probe(device.socketPath, '--dump', '2:0:0x100000')
    expect(big.stdout).toContain(
      'dump                region 2, 65536 bytes at 0x0 (of 1048576 asked: at most 65536 per --dump)',
    )
    const rows = big.stdout.split('\n').filter((l) => /^ {2}[0-9a-f]{8} |^ {2}\*$/.test(l))
    expect(rows.length).toBeLessThan(4096)
    expect(rows).toContain('  *')
    expect(rows.at(-1)).toMatch(/^ {2}0000fff0 /)
    const bad = probe(device.socketPath, '--dump', 'x:1')
    expect(bad.status).toBe(2)
    expect(bad.stderr).toContain('--dump needs REGION[:OFFSET[:LENGTH]], got x:1')
  })

  it('fails with the errno name and the path', () => {
    const r = probe('/nonexistent/device.sock')
    expect(r.status).toBe(1)
    expect(r.stderr).toMatch(/ENOENT: .*\/nonexistent\/device\.sock/)
  })
})

/** Runs the CLI without blocking this process's event loop; resolves with its exit and output. */
function run(...args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((done) => {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => {
      stdout += d
    })
    child.stderr.on('data', (d: Buffer) => {
      stderr += d
    })
    child.on('close', (status) => done({ status, stdout, stderr }))
  })
}

describe('vfio-user migrate', () => {
  const MIB = 1 << 20

  /** The digest of a device's whole state (BAR0), read a MiB at a time. */
  async function digest(socket: string, mib: number): Promise<string> {
    const c = await connect(socket)
    try {
      await c.validateVersion()
      const h = createHash('sha256')
      for (let i = 0; i < mib; i++) h.update(await c.regionRead(0, i * MIB, MIB))
      return h.digest('hex')
    } finally {
      await c.close()
    }
  }

  it('moves 64 MiB of device state from one server process to another', async () => {
    await using source = await startMigrationDevice({ stateMib: 64 })
    await using dest = await startMigrationDevice({ stateMib: 64 })
    const c = await connect(source.socketPath)
    await c.validateVersion()
    const chunk = Buffer.alloc(MIB)
    for (let i = 0; i < 64; i++) {
      for (let j = 0; j < MIB; j += 4) chunk.writeUInt32LE((i * MIB + j) ^ 0x5a5a5a5a, j)
      await c.regionWrite(0, i * MIB, chunk)
    }
    await c.close()
    const want = await digest(source.socketPath, 64)
    expect(await digest(dest.socketPath, 64)).not.toBe(want)

    const r = await run('migrate', source.socketPath, dest.socketPath, '--json')
    expect(r.stderr).toBe('')
    expect(r.status).toBe(0)
    const summary = JSON.parse(r.stdout)
    expect(summary).toMatchObject({ source: source.socketPath, destination: dest.socketPath, rounds: 2 })
    // 64 MiB in records of 1 MiB (16-byte heads), and the end record in stop-copy.
    expect(summary.preCopyBytes).toBe(64 * MIB + 64 * 16)
    expect(summary.stopCopyBytes).toBe(16)
    expect(summary.rate).toBeGreaterThan(0)
    expect(await digest(dest.socketPath, 64)).toBe(want)

    const plain = await run('migrate', dest.socketPath, source.socketPath, '--max-rounds', '0')
    expect(plain.status).toBe(0)
    expect(plain.stdout).toMatch(/^migrated 64\.0 MiB in \d+ ms \(.* MiB\/s\): 0 pre-copy round\(s\)/)
  })

  // util-linux `script` runs a command on a pseudo-terminal and copies what it printed. It is
  // required, never skipped: Debian ships it (bsdutils), Alpine's CI jobs install util-linux.
  it('shows a progress line (phase, round, bytes, rate) on a terminal', async () => {
    expect(spawnSync('script', ['--version']).status, 'util-linux `script` must be installed').toBe(0)
    await using source = await startMigrationDevice({ stateMib: 8 })
    await using dest = await startMigrationDevice({ stateMib: 8 })
    const quote = (a: string) => `'${a.replaceAll("'", "'\\''")}'`
    const command = [process.execPath, cli, 'migrate', source.socketPath, dest.socketPath].map(quote).join(' ')
    const r = await new Promise<{ status: number | null; out: string }>((done) => {
      const child = spawn('script', ['-q', '-e', '-c', command, '/dev/null'], { stdio: ['ignore', 'pipe', 'pipe'] })
      // A watchdog, so a hung child cannot outlive the test.
      const watchdog = setTimeout(() => child.kill('SIGKILL'), 20_000)
      let out = ''
      child.stdout.on('data', (d: Buffer) => {
        out += d
      })
      child.on('close', (status) => {
        clearTimeout(watchdog)
        done({ status, out })
      })
    })
    expect(r.status).toBe(0)
    // Drawn over itself (carriage return, erase line), then erased for the summary.
    const redraw = '\r\u001b[K'
    expect(r.out).toContain(`${redraw}pre-copy round 1: 8.0 MiB moved, `)
    expect(r.out).toMatch(/pre-copy round 1: 8\.0 MiB moved, [\d.]+ MiB\/s/)
    expect(r.out).toContain(`${redraw}migrated 8.0 MiB in `)
  })

  it('fails with the error code when a device cannot migrate, and on usage errors', async () => {
    await using plain = await startTestDevice()
    await using dest = await startMigrationDevice()
    const r = await run('migrate', plain.socketPath, dest.socketPath)
    expect(r.status).toBe(1)
    expect(r.stderr).toMatch(
      /^vfio-user: ENOTSUP: migration failed in prepare, at the source: the device has no migration/,
    )
    expect(r.stderr).toMatch(/destination running/)
    const usage = await run('migrate', plain.socketPath)
    expect(usage.status).toBe(2)
    expect(usage.stderr).toMatch(
      /^vfio-user: SOURCE and DEST are needed, got 1 socket\(s\)\nusage: vfio-user migrate SOURCE DEST/,
    )
  })

  it('tap --bytes past 4096 is a usage error, as tap() refuses it', async () => {
    const r = await run('tap', '/tmp/never-bound.sock', '/tmp/never-there.sock', '--bytes', '4097')
    expect(r.status).toBe(2)
    expect(r.stderr).toMatch(/^vfio-user: --bytes is at most 4096, got 4097\nusage: vfio-user tap/)
  })

  it('refuses the same socket as SOURCE and DEST before connecting: the device is left as it was', async () => {
    await using device = await startMigrationDevice()
    const r = await run('migrate', device.socketPath, device.socketPath)
    expect(r.status).toBe(2)
    expect(r.stderr).toContain('SOURCE and DEST are the same socket')
    // Also through another path to the same file.
    const again = await run('migrate', device.socketPath, `${device.socketPath.replace(/\/([^/]+)$/, '/./$1')}`)
    expect(again.status).toBe(2)
    await using c = await connect(device.socketPath)
    await c.validateVersion()
    expect(await c.migrationState()).toBe('running')
  })
})

describe('vfio-user tap: its output fails', () => {
  /** A folder of its own for one test, removed after. */
  async function inFolder(test: (dir: string) => Promise<void>): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), 'vfio-user-cli-tap-'))
    try {
      await test(dir)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  }

  it.each([
    [
      'in a folder that does not exist',
      (dir: string) => join(dir, 'missing', 'out.ndjson'),
      'ENOENT: no such file or directory',
    ],
    ['that is a folder', (dir: string) => dir, 'EISDIR: illegal operation on a directory'],
  ])('an --out path %s: one line naming it and why, exit 2, no LISTEN left behind', (_, outPath, why) =>
    inFolder(async (dir) => {
      const listen = join(dir, 'tap.sock')
      const out = outPath(dir)
      const r = await run('tap', listen, join(dir, 'server.sock'), '--out', out)
      expect(r).toEqual({ status: 2, stdout: '', stderr: `vfio-user: --out ${out}: ${why}\n` })
      expect(existsSync(listen)).toBe(false)
    }),
  )

  it('`tap --json | head -3`: once head has gone the tap ends quietly with 141, as SIGPIPE ends a command, its session closed and LISTEN removed', () =>
    inFolder(async (dir) => {
      await using server = await startScriptedPeer('serve')
      const listen = join(dir, 'tap.sock')
      const head = spawn('head', ['-3'], { stdio: ['pipe', 'pipe', 'ignore'] })
      let lines = ''
      head.stdout.setEncoding('utf8').on('data', (d: string) => {
        lines += d
      })
      const headDone = once(head, 'close')
      // The socket appears once the tap listens (head holds the first line until it exits).
      const watcher = watch(dir)
      const listening = new Promise<void>((resolve) => {
        watcher.on('change', () => {
          if (existsSync(listen)) resolve()
        })
      })
      const child = spawn(process.execPath, [cli, 'tap', listen, server.socketPath, '--json'], {
        stdio: ['ignore', head.stdin, 'pipe'],
      })
      // However the test ends (a timeout included), neither outlives it.
      onTestFinished(() => {
        child.kill('SIGKILL')
        head.kill('SIGKILL')
      })
      // Only the tap writes into head's stdin now: head's leaving is the tap's EPIPE.
      head.stdin.destroy()
      let stderr = ''
      child.stderr.setEncoding('utf8').on('data', (d: string) => {
        stderr += d
      })
      const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
        child.once('close', (status, signal) => resolve([status, signal])),
      )
      try {
        await listening
      } finally {
        watcher.close()
      }
      // The file exists from bind(), a moment before listen().
      const c = await connectRetrying(listen)
      await c.validateVersion()
      // Requests go on through the tap, a line each, until it finds head gone and ends,
      // closing the session.
      await untilReset(c)
      const [status, signal] = await exited
      expect({ status, signal, stderr }).toEqual({ status: 141, signal: null, stderr: '' })
      expect(existsSync(listen)).toBe(false)
      await headDone
      expect(
        lines
          .trim()
          .split('\n')
          .map(
            (l) =>
              (JSON.parse(l) as { type: string; command?: string }).command ?? (JSON.parse(l) as { type: string }).type,
          ),
      ).toEqual(['listening', 'open', 'VERSION'])
    }))

  it("the --out file's reader leaves mid-run (a FIFO): one line naming it and why, exit 1, its session closed and LISTEN removed", () =>
    inFolder(async (dir) => {
      await using server = await startScriptedPeer('serve')
      const listen = join(dir, 'tap.sock')
      const fifo = join(dir, 'out.fifo')
      expect(spawnSync('mkfifo', [fifo]).status).toBe(0)
      // Opened first: the tap opens its --out before it listens. It reads once, then leaves.
      const reader = createReadStream(fifo)
      reader.once('data', () => reader.destroy())
      const child = spawn(process.execPath, [cli, 'tap', listen, server.socketPath, '--out', fifo], {
        stdio: ['ignore', 'pipe', 'pipe'],
      })
      onTestFinished(() => {
        child.kill('SIGKILL')
      })
      let stderr = ''
      child.stderr.setEncoding('utf8').on('data', (d: string) => {
        stderr += d
      })
      const exited = new Promise<number | null>((resolve) => child.once('close', (status) => resolve(status)))
      await new Promise<void>((resolve) => {
        child.stdout.setEncoding('utf8').on('data', (d: string) => {
          if (d.includes('listening')) resolve()
        })
      })
      const c = await connect(listen)
      await c.validateVersion()
      await untilReset(c)
      expect({ status: await exited, stderr }).toEqual({
        status: 1,
        stderr: `vfio-user: --out ${fifo}: EPIPE: broken pipe\n`,
      })
      expect(existsSync(listen)).toBe(false)
    }))
})

describe('the vfio-user command line', () => {
  it('--help prints the usage and exits 0, for the command and for each subcommand', async () => {
    for (const args of [['--help'], ['probe', '--help'], ['migrate', '--help'], ['migrate', 'a', 'b', '--help']]) {
      const r = await run(...args)
      expect({ args, status: r.status, stderr: r.stderr }).toEqual({ args, status: 0, stderr: '' })
      expect(r.stdout).toMatch(/^usage: vfio-user /)
    }
  })

  it('--version prints the package version and exits 0', async () => {
    const r = await run('--version')
    const { version } = JSON.parse(readFileSync(join(__dirname, '..', 'package.json'), 'utf8')) as { version: string }
    expect(r).toEqual({ status: 0, stdout: `${version}\n`, stderr: '' })
  })

  it('usage errors name the option as typed, exit 2, and print the usage', async () => {
    for (const [args, message] of [
      [['probe', '--timeout', 'x'], '--timeout needs a whole number of milliseconds (at least 1), got x'],
      [['probe', '--frobnicate'], 'unknown option --frobnicate'],
      [['migrate', 'a', 'b', '--max-rounds', '-1'], '--max-rounds needs a whole number of rounds, got -1'],
      [['nonsense'], 'unknown command nonsense'],
      [[], 'no command given'],
    ] as const) {
      const r = await run(...args)
      expect(r.status).toBe(2)
      expect(r.stderr.split('\n')[0]).toBe(`vfio-user: ${message}`)
      expect(r.stderr).toContain('usage: vfio-user ')
      expect(r.stderr).not.toContain('timeoutMs')
    }
  })
})
