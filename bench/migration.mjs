// Issue 9's figures, part of `npm run bench`: `migrate()` between two migration devices
// against the same bytes moved raw from one thread's memory through a relay into another's
// over two socketpairs (the floor binary's `relay` mode: what a migration moves, with no
// protocol), and the rate of small posted writes with REGION_WRITE_MULTI and without it.
// Rounds alternate the two sides of each comparison; medians are reported, with the CPU of
// this process (user + system, all threads) per MiB or per write.
import { execFileSync } from 'node:child_process'
import { connect, migrate } from '../dist/index.js'
import { startMigrationDevice } from '../dist/testing.js'

const MIB = 1 << 20

async function connected(device) {
  const c = await connect(device.socketPath)
  await c.validateVersion()
  return c
}

/** CPU (user + system) µs of this process spent in `fn`, beside its wall time in µs. */
async function measured(fn) {
  const cpu0 = process.cpuUsage()
  const t0 = process.hrtime.bigint()
  await fn()
  const us = Number(process.hrtime.bigint() - t0) / 1e3
  const cpu = process.cpuUsage(cpu0)
  return { us, cpu: cpu.user + cpu.system }
}

/**
 * Runs both comparisons for `rounds` rounds; prints their table with `table` and returns the
 * number of goals missed.
 */
export async function migrationBench({ binary, rounds, table, median }) {
  const STATE_MIB = Number(process.env.BENCH_STATE_MIB ?? 64)
  const WRITES = Number(process.env.BENCH_WRITES ?? 100000)
  const device = (options) => startMigrationDevice({ binary: binary('vfio-user-migration-device'), ...options })
  const a = await device({ stateMib: STATE_MIB })
  const b = await device({ stateMib: STATE_MIB })
  const multi = await device({ writeMultiple: true })
  const single = await device({ writeMultiple: false })
  const clients = await Promise.all([a, b, multi, single].map(connected))
  const [ca, cb, cMulti, cSingle] = clients
  const runs = { migrate: [], relay: [], multi: [], single: [] }
  let bytes = 0
  try {
    const chunk = Buffer.alloc(MIB, 0x3c)
    for (let i = 0; i < STATE_MIB; i++) await ca.regionWrite(0, i * MIB, chunk)
    const word = Buffer.alloc(4)
    const burst = async (c) => {
      for (let i = 0; i < WRITES; i++) void c.regionWrite(1, 0x100 + 4 * (i % 900), word, { posted: true })
      // Ordered behind every write: its reply proves they all arrived.
      await c.regionRead(1, 0x100, 4)
    }
    await burst(cMulti)
    await burst(cSingle)
    let [src, dst] = [ca, cb]
    for (let round = 0; round < rounds; round++) {
      const m = await measured(async () => {
        bytes = (await migrate(src, dst)).bytes
      })
      runs.migrate.push(m)
      ;[src, dst] = [dst, src]
      const r = JSON.parse(
        execFileSync(binary('vfio-user-bench-floor'), ['-', String(STATE_MIB), 'relay'], { encoding: 'utf8' }),
      )
      runs.relay.push({ us: r.seconds * 1e6, cpu: (r.userUs + r.sysUs) * STATE_MIB })
      for (const [name, c] of [
        ['multi', cMulti],
        ['single', cSingle],
      ]) {
        const w = await measured(() => burst(c))
        runs[name].push({ us: w.us / WRITES, cpu: w.cpu / WRITES })
      }
    }
  } finally {
    await Promise.all(clients.map((c) => c.close()))
    await Promise.all([a, b, multi, single].map((d) => d.close()))
  }
  const mibs = (us) => ((bytes / MIB) * 1e6) / us
  const pick = (xs, k) => median(xs.map((x) => x[k]))
  const mig = pick(runs.migrate, 'us')
  const relay = pick(runs.relay, 'us')
  const ratio = relay / mig
  const perMib = (xs) => `${(pick(xs, 'cpu') / (bytes / MIB)).toFixed(0)} µs CPU/MiB`
  const multiUs = pick(runs.multi, 'us')
  const singleUs = pick(runs.single, 'us')
  const rows = [
    ['migration (medians)', 'result', 'vs', 'goal'],
    [
      `raw relay, memory to memory, 2 socket hops`,
      `${mibs(relay).toFixed(0)} MiB/s (${perMib(runs.relay)}, 3 threads)`,
      '1.00x',
      '',
    ],
    [
      `migrate(), ${STATE_MIB} MiB of state`,
      `${mibs(mig).toFixed(0)} MiB/s (${perMib(runs.migrate)})`,
      `${ratio.toFixed(2)}x`,
      `>= 0.7x ${ratio >= 0.7 ? 'met' : 'MISSED'}`,
    ],
    [
      'posted 4 B writes, REGION_WRITE',
      `${(1e6 / singleUs / 1e3).toFixed(0)} k/s (${pick(runs.single, 'cpu').toFixed(2)} µs CPU)`,
      '1.00x',
      '',
    ],
    [
      'posted 4 B writes, REGION_WRITE_MULTI',
      `${(1e6 / multiUs / 1e3).toFixed(0)} k/s (${pick(runs.multi, 'cpu').toFixed(2)} µs CPU)`,
      `${(singleUs / multiUs).toFixed(2)}x rate`,
      'for reference',
    ],
  ]
  console.log('')
  table(rows)
  return ratio >= 0.7 ? 0 : 1
}
