// `npm run bench:tap`: what the tap costs. Round trips (blocking DEVICE_GET_INFO) to the test
// device made directly, through the tap (relay only: nobody listens, so nothing is decoded),
// through `vfio-user tap --json` writing every message to /dev/null, and through the least a
// proxy can do (bench/relay.c: recvmsg, sendmsg with the fds; the floor for any proxy), in
// rounds whose order alternates; then 1 MiB region reads directly and through the tap. Each
// relay runs as a process of its own, so its CPU per relayed message is read from /proc.
// Medians of BENCH_ROUNDS (5) rounds; run it alone on the machine.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { connect } from '../dist/index.js'
import { startTestDevice } from '../dist/testing.js'

const root = resolve(import.meta.dirname, '..')
const rounds = Number(process.env.BENCH_ROUNDS ?? 5)
const trips = Number(process.env.BENCH_TRIPS ?? 20000)
const reads = Number(process.env.BENCH_READS ?? 300)
const MIB = 1 << 20
const dir = mkdtempSync(join(tmpdir(), 'vfio-user-bench-tap-'))
const binary = join(root, 'target', 'release', 'vfio-user-test-device')
if (!existsSync(binary)) throw new Error('run npm run build first (the release test device)')

const relayBin = join(dir, 'relay')
execFileSync(process.env.CC ?? 'cc', ['-O2', '-pthread', '-o', relayBin, join(root, 'bench', 'relay.c')])

const ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim())
/** User and system CPU of process `pid` so far, in µs. */
function cpuOf(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return ((Number(f[11]) + Number(f[12])) / ticks) * 1e6
}

/** Starts a relay process and resolves once it says it listens. */
async function relayProcess(name, cmd, args) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] })
  await new Promise((ready, fail) => {
    let out = ''
    child.stdout.on('data', (d) => {
      out += d
      if (out.includes('listening')) ready()
    })
    child.once('exit', (code) => fail(new Error(`${name} exited (${code})`)))
  })
  child.stdout.resume()
  return child
}

const device = await startTestDevice({ binary })
const tapSock = join(dir, 'tap.sock')
const cliSock = join(dir, 'cli.sock')
const cSock = join(dir, 'c.sock')
const relayOnly = await relayProcess('tap()', process.execPath, [
  '--input-type=module',
  '-e',
  `import { tap } from ${JSON.stringify(join(root, 'dist', 'index.mjs'))}
   await tap({ listen: ${JSON.stringify(tapSock)}, connect: ${JSON.stringify(device.socketPath)} })
   console.log('listening')`,
])
// The CLI's lines go to /dev/null (draining them here would count against the client's CPU):
// it listens once a connection to it succeeds.
const cli = spawn(process.execPath, [join(root, 'dist', 'cli.js'), 'tap', cliSock, device.socketPath, '--json'], {
  stdio: ['ignore', openSync('/dev/null', 'w'), 'inherit'],
})
for (let i = 0; ; i++) {
  try {
    await (await connect(cliSock)).close()
    break
  } catch (e) {
    if (i === 1000) throw e
    await new Promise((r) => setTimeout(r, 5))
  }
}
const floor = await relayProcess('relay.c', relayBin, [cSock, device.socketPath])

const payload = Buffer.alloc(16)
payload.writeUInt32LE(16, 0)

/** Round trips through `path`: µs each, our CPU µs each, the relay's CPU µs per message. */
async function roundTrips(path, relay) {
  const c = await connect(path)
  try {
    await c.validateVersion()
    for (let i = 0; i < 1000; i++) c.sendWaitSync(4, payload)
    const relayCpu = relay ? cpuOf(relay.pid) : 0
    const cpu = process.cpuUsage()
    const t = process.hrtime.bigint()
    for (let i = 0; i < trips; i++) c.sendWaitSync(4, payload)
    const us = Number(process.hrtime.bigint() - t) / 1e3 / trips
    const u = process.cpuUsage(cpu)
    return {
      us,
      cpu: (u.user + u.system) / trips,
      relayCpu: relay ? (cpuOf(relay.pid) - relayCpu) / (2 * trips) : 0,
    }
  } finally {
    await c.close()
  }
}

/** 1 MiB reads through `path`, into one Buffer: MiB/s. */
async function megabytes(path) {
  const c = await connect(path)
  try {
    await c.validateVersion()
    const into = Buffer.alloc(MIB)
    for (let i = 0; i < 20; i++) await c.regionRead(2, 0, MIB, { into })
    const t = process.hrtime.bigint()
    for (let i = 0; i < reads; i++) await c.regionRead(2, 0, MIB, { into })
    return reads / (Number(process.hrtime.bigint() - t) / 1e9)
  } finally {
    await c.close()
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const rows = { direct: [], relay: [], tap: [], cli: [] }
const rates = { direct: [], relay: [], tap: [] }
const order = [
  ['direct', device.socketPath, undefined],
  ['relay', cSock, floor],
  ['tap', tapSock, relayOnly],
  ['cli', cliSock, cli],
]
try {
  for (let r = 0; r < rounds; r++) {
    for (const [name, path, proc] of r % 2 ? [...order].reverse() : order) rows[name].push(await roundTrips(path, proc))
    const paths = [
      ['direct', device.socketPath],
      ['relay', cSock],
      ['tap', tapSock],
    ]
    for (const [name, path] of r % 2 ? paths.reverse() : paths) rates[name].push(await megabytes(path))
  }
} finally {
  for (const p of [relayOnly, cli, floor]) p.kill('SIGINT')
  await device.close()
  rmSync(dir, { recursive: true, force: true })
}

const m = (name, key) => median(rows[name].map((x) => x[key]))
const line = (label, name) =>
  `${label.padEnd(40)}${m(name, 'us').toFixed(1).padStart(8)} µs${(m(name, 'us') / m('relay', 'us')).toFixed(2).padStart(8)}x${m(name, 'cpu').toFixed(1).padStart(9)} µs${name === 'direct' ? '        -' : m(name, 'relayCpu').toFixed(2).padStart(9)} µs`
console.log(`round trips (blocking DEVICE_GET_INFO), medians of ${rounds} rounds of ${trips}`)
console.log(
  `${''.padEnd(40)}${'time'.padStart(11)}${'vs relay.c'.padStart(11)}${'client CPU'.padStart(12)}${'relay CPU/msg'.padStart(14)}`,
)
console.log(line('direct', 'direct'))
console.log(line('relay.c (recvmsg, sendmsg with fds)', 'relay'))
console.log(line('tap() (relay only, nobody listens)', 'tap'))
console.log(line('vfio-user tap --json > /dev/null', 'cli'))
const goal = m('tap', 'us') / m('relay', 'us')
console.log(`tap vs relay.c: ${goal.toFixed(2)}x (goal <= 1.15x: ${goal <= 1.15 ? 'met' : 'MISSED'})`)
const rd = median(rates.direct)
const rc = median(rates.relay)
const rt = median(rates.tap)
console.log(
  `1 MiB regionRead into one Buffer: direct ${rd.toFixed(0)} MiB/s; through relay.c ${rc.toFixed(0)} MiB/s (${(rc / rd).toFixed(2)}x); ` +
    `through the tap ${rt.toFixed(0)} MiB/s: ${(rt / rd).toFixed(2)}x (goal >= 0.8x: ${rt / rd >= 0.8 ? 'met' : 'MISSED'}), ${(rt / rc).toFixed(2)}x relay.c`,
)
