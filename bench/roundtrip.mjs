// `npm run bench`: round trips per second of DEVICE_GET_INFO to the test device, for
// sendWaitSync, serial sendWait and sendWait with 64 in flight, each beside a floor measured
// in the same run: a minimal blocking Rust client (crates/test-device/src/bin/bench_floor.rs)
// doing the same exchange with the same server over the same kind of socket.
//
// Rounds alternate floor and ours so drift on a shared VM hits both; medians are reported.
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { Command, connect } from '../dist/index.js'
import { startTestDevice } from '../dist/testing.js'

const root = resolve(import.meta.dirname, '..')
const COUNT = Number(process.env.BENCH_COUNT ?? 20000)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5)
const DEPTH = 64

function binary(name) {
  for (const profile of ['release', 'debug']) {
    const p = join(root, 'target', profile, name)
    if (existsSync(p)) return p
  }
  throw new Error(`${name} is not built: run npm run build:device`)
}

const payload = Buffer.alloc(16)
payload.writeUInt32LE(16, 0)

function floor(socketPath, mode = 'raw') {
  const out = execFileSync(binary('vfio-user-bench-floor'), [socketPath, String(COUNT), mode], { encoding: 'utf8' })
  const r = JSON.parse(out)
  return r.seconds / r.roundTrips
}

async function withClient(socketPath, fn) {
  const client = await connect(socketPath)
  await client.validateVersion()
  // Warm up the path (JIT, page faults) outside the timed part.
  for (let i = 0; i < 1000; i++) client.sendWaitSync(Command.DEVICE_GET_INFO, payload)
  try {
    const start = process.hrtime.bigint()
    await fn(client)
    return Number(process.hrtime.bigint() - start) / 1e9 / COUNT
  } finally {
    await client.close()
  }
}

const modes = {
  // Not a goal: our Rust client's blocking send_wait, to tell transport cost from JS cost.
  'Rust Client::send_wait': (c) => Promise.resolve(floor(c, 'client')),
  sendWaitSync: (c) =>
    withClient(c, async (client) => {
      for (let i = 0; i < COUNT; i++) client.sendWaitSync(Command.DEVICE_GET_INFO, payload)
    }),
  'sendWait serial': (c) =>
    withClient(c, async (client) => {
      for (let i = 0; i < COUNT; i++) await client.sendWait(Command.DEVICE_GET_INFO, payload)
    }),
  [`sendWait x${DEPTH} in flight`]: (c) =>
    withClient(c, async (client) => {
      let next = 0
      const worker = async () => {
        while (next < COUNT) {
          next++
          await client.sendWait(Command.DEVICE_GET_INFO, payload)
        }
      }
      await Promise.all(Array.from({ length: DEPTH }, worker))
    }),
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const device = await startTestDevice({ binary: binary('vfio-user-test-device') })
try {
  const floors = []
  const ours = Object.fromEntries(Object.keys(modes).map((k) => [k, []]))
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, run] of Object.entries(modes)) {
      floors.push(floor(device.socketPath))
      ours[name].push(await run(device.socketPath))
    }
  }
  const f = median(floors)
  const goals = {
    'Rust Client::send_wait': { kind: 'time', goal: null },
    sendWaitSync: { kind: 'time', goal: 1.1 },
    'sendWait serial': { kind: 'time', goal: 1.35 },
    [`sendWait x${DEPTH} in flight`]: { kind: 'rate', goal: 2.5 },
  }
  const rows = [
    ['mode', 'µs/round trip', 'round trips/s', 'vs floor', 'goal'],
    ['floor (blocking Rust)', (f * 1e6).toFixed(1), Math.round(1 / f).toString(), '1.00x', ''],
  ]
  const results = {}
  for (const name of Object.keys(modes)) {
    const t = median(ours[name])
    const g = goals[name]
    const ratio = g.kind === 'time' ? t / f : f / t
    results[name] = { usPerRoundTrip: t * 1e6, ratio, goal: g.goal, kind: g.kind }
    const met = g.kind === 'time' ? ratio <= g.goal : ratio >= g.goal
    rows.push([
      name,
      (t * 1e6).toFixed(1),
      Math.round(1 / t).toString(),
      `${ratio.toFixed(2)}x ${g.kind === 'time' ? 'time' : 'rate'}`,
      g.goal === null ? '(reference)' : `${g.kind === 'time' ? '<=' : '>='} ${g.goal}x ${met ? 'met' : 'MISSED'}`,
    ])
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  for (const r of rows) console.log(r.map((c, i) => c.padEnd(widths[i])).join('  '))
  console.log(`\n${COUNT} round trips x ${ROUNDS} rounds, medians; floor median of ${floors.length} runs`)
  if (process.env.BENCH_JSON) console.log(JSON.stringify({ floorUs: f * 1e6, results }))
} finally {
  await device.close()
}
