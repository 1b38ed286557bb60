// `npm run bench`: round trips of DEVICE_GET_INFO to the test device, for sendWaitSync,
// serial sendWait and sendWait with 64 in flight, each beside a floor measured in the same
// run by minimal Rust clients (crates/test-device/src/bin/bench_floor.rs) doing the same
// exchange with the same server over the same kind of socket: one request at a time (the
// floor), and 64 in flight (the device's ceiling).
//
// Every mode reports wall time and the CPU of its process per request (user and system, all
// threads: process.cpuUsage() here, getrusage in the floor), since a slow machine hides
// what a client adds to the wall time but not to its CPU. Rounds alternate floor and ours so
// drift on a shared VM hits both; every round is printed, then the medians.
import { execFileSync, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { allocateDmaMemory, Command, connect } from '../dist/index.js'
import { startTestDevice } from '../dist/testing.js'
import { migrationBench } from './migration.mjs'

const root = resolve(import.meta.dirname, '..')

// BENCH_PIN=1: run everything (this process, its threads, the device, the floors) on one CPU.
// A wakeup on the same CPU costs a context switch, not an inter-processor interrupt to a
// halted vCPU, so round trips take ~10 µs instead of ~40 here: how a machine with cheap
// wakeups behaves, which exposes what the client itself adds.
if (process.env.BENCH_PIN && !process.env.BENCH_PINNED) {
  const cpu = process.env.BENCH_PIN === '1' ? '0' : process.env.BENCH_PIN
  const r = spawnSync('taskset', ['-c', cpu, process.execPath, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, BENCH_PINNED: cpu },
  })
  if (r.error) throw new Error(`BENCH_PIN needs taskset (util-linux): ${r.error.message}`)
  process.exit(r.status ?? 1)
}
const COUNT = Number(process.env.BENCH_COUNT ?? 20000)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 7)
const DEPTH = 64
/** The floor's loop with sendmsg/recvmsg: what the calls that can pass fds cost by themselves. */
const MSG_FLOOR = 'floor, sendmsg/recvmsg'

function binary(name) {
  for (const profile of ['release', 'debug']) {
    const p = join(root, 'target', profile, name)
    if (existsSync(p)) return p
  }
  throw new Error(`${name} is not built: run npm run build:device`)
}

const payload = Buffer.alloc(16)
payload.writeUInt32LE(16, 0)

/**
 * The leanest addon possible (crates/bench-addon, built here on first use): sendmsg, recvmsg
 * into a fixed buffer, the payload handed to JS as a new Buffer, returned (`roundTrip`) or
 * resolving a promise from a poll handle on Node's loop (`send`). What any Node client pays
 * before doing anything of its own; the goals' ratios are set against the floor, below it.
 */
function minimalAddon() {
  execFileSync('cargo', ['build', '--release', '--quiet', '-p', 'bench-addon'], { cwd: root, stdio: 'inherit' })
  const m = { exports: {} }
  process.dlopen(m, join(root, 'target', 'release', 'libbench_addon.so'))
  return m.exports
}
const { MinimalClient, MinimalStream } = minimalAddon()
/** DEVICE_GET_INFO with its header, as the minimal addon sends it whole. */
const request = Buffer.alloc(32)
request.writeUInt16LE(4, 2)
request.writeUInt32LE(32, 4)
request.writeUInt32LE(16, 16)

/** Wall time and this process's CPU per request of COUNT requests made by `fn`. */
async function perRequest(fn) {
  const cpu0 = process.cpuUsage()
  const start = process.hrtime.bigint()
  await fn()
  const us = Number(process.hrtime.bigint() - start) / 1e3 / COUNT
  const cpu = process.cpuUsage(cpu0)
  return { us, user: cpu.user / COUNT, sys: cpu.system / COUNT }
}

/** Requests each mode makes untimed first, through the same calls it is timed on. */
const WARM = 2000

async function withMinimal(socketPath, fn) {
  const m = new MinimalClient(socketPath)
  try {
    // Warm up the path measured (JIT, page faults), not another one.
    await fn(m, WARM)
    return await perRequest(() => fn(m, COUNT))
  } finally {
    m.close()
  }
}

/** One run of the floor binary: wall and CPU microseconds per round trip. */
function floor(socketPath, mode = 'raw') {
  const out = execFileSync(binary('vfio-user-bench-floor'), [socketPath, String(COUNT), mode, String(DEPTH)], {
    encoding: 'utf8',
  })
  const r = JSON.parse(out)
  return { us: (r.seconds / r.roundTrips) * 1e6, user: r.userUs, sys: r.sysUs }
}

async function withClient(socketPath, fn) {
  const client = await connect(socketPath)
  await client.validateVersion()
  try {
    // Warm up the path measured (JIT, page faults) outside the timed part, not another one:
    // warming the promise modes with sync calls left their JIT work inside the timed part.
    await fn(client, WARM)
    return await perRequest(() => fn(client, COUNT))
  } finally {
    await client.close()
  }
}

/** Reference rows, measured in the same rounds: the least any addon can do. */
const MINIMAL_SYNC = 'minimal addon, returning a Buffer'
const MINIMAL_PROMISE = 'minimal addon, resolving a promise'
const references = {
  [MINIMAL_SYNC]: (c) =>
    withMinimal(c, async (m, n) => {
      for (let i = 0; i < n; i++) m.roundTrip(request)
    }),
  [MINIMAL_PROMISE]: (c) =>
    withMinimal(c, async (m, n) => {
      for (let i = 0; i < n; i++) await m.send(request)
    }),
}

const modes = {
  'Rust Client::send_wait': (c) => Promise.resolve(floor(c, 'client')),
  sendWaitSync: (c) =>
    withClient(c, async (client, n) => {
      for (let i = 0; i < n; i++) client.sendWaitSync(Command.DEVICE_GET_INFO, payload)
    }),
  'sendWait serial': (c) =>
    withClient(c, async (client, n) => {
      for (let i = 0; i < n; i++) await client.sendWait(Command.DEVICE_GET_INFO, payload)
    }),
  [`sendWait x${DEPTH} in flight`]: (c) =>
    withClient(c, async (client, n) => {
      let next = 0
      const worker = async () => {
        while (next < n) {
          next++
          await client.sendWait(Command.DEVICE_GET_INFO, payload)
        }
      }
      await Promise.all(Array.from({ length: DEPTH }, worker))
    }),
}

// Goals (issue 20), each a ratio paired within a round against the reference measured
// beside it: `against` names the reference row, `time` bounds the ratio of wall times and
// `userOver` the user CPU above the reference's.
const goals = {
  'Rust Client::send_wait': { against: 'floor', time: 1.1 },
  sendWaitSync: { against: MINIMAL_SYNC, time: 1.05 },
  'sendWait serial': { against: MINIMAL_PROMISE, time: 1.1, userOver: 2 },
  [`sendWait x${DEPTH} in flight`]: { against: 'ceiling', time: 1.15 },
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const fmt = (x) => x.toFixed(1)
const medianOf = (runs) => ({
  us: median(runs.map((r) => r.us)),
  user: median(runs.map((r) => r.user)),
  sys: median(runs.map((r) => r.sys)),
})

function table(rows) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  for (const r of rows) console.log(r.map((c, i) => c.padEnd(widths[i])).join('  '))
}

/**
 * The typed calls: `regionReadSync` of 4 bytes against `sendWaitSync` of the same REGION_READ
 * (issue 8); 1 MiB `regionRead`s into memory against the device's own ceiling (`read1m`,
 * blocking reads into a fixed buffer), and into a new Buffer each against the same bytes read
 * from a socketpair through the minimal addon into a new Buffer each MiB (what that memory
 * costs by itself here); `dmaMapMany` against the least a client can do to keep 256 maps in
 * flight (issue 20). Beside them, for reference: the socketpair by itself, a Rust client
 * reading as an event loop does (`client1m-callback`), each map awaited. Rounds alternate
 * the order of each comparison; ratios are paired within a round. Returns the goals missed.
 */
async function typedCalls(socketPath) {
  const MIB = 1 << 20
  const BIG = Number(process.env.BENCH_MIB ?? 200)
  const access = Buffer.alloc(16)
  access.writeUInt32LE(4, 12)
  const runs = {
    regionReadSync: [],
    sendWaitSync: [],
    regionRead: [],
    regionReadInto: [],
    regionReadCpu: [],
    regionReadIntoCpu: [],
    stream: [],
    device: [],
    rustEvents: [],
    nodeStream: [],
    nodeStreamNew: [],
    mapOne: [],
    mapMany: [],
    mapCeiling: [],
  }
  const into = Buffer.alloc(MIB)
  const MAPS = 256
  const MAP_REPEAT = 10
  const memory = allocateDmaMemory(MAPS * 4096)
  const maps = Array.from({ length: MAPS }, (_, i) => ({
    iova: (1n << 32n) + BigInt(i * 4096),
    size: 4096,
    memory,
    offset: i * 4096,
  }))
  const client = await connect(socketPath)
  // The test device serves one connection at a time: its ceiling is measured on another.
  const other = await startTestDevice({ binary: binary('vfio-user-test-device') })
  try {
    await client.validateVersion()
    // Warm up the paths (JIT, first allocations) outside the timed part, as the modes above do.
    for (let i = 0; i < 1000; i++) client.regionReadSync(0, 0, 4)
    for (let i = 0; i < 2; i++) {
      await client.dmaMapMany(maps)
      await Promise.all(maps.map((m) => client.dmaUnmap(m)))
    }
    const timed = (fn, n) => {
      const start = process.hrtime.bigint()
      fn()
      return Number(process.hrtime.bigint() - start) / 1e3 / n
    }
    const timedAsync = async (fn, n) => {
      const start = process.hrtime.bigint()
      await fn()
      return Number(process.hrtime.bigint() - start) / 1e3 / n
    }
    for (let round = 0; round < ROUNDS; round++) {
      // The pair runs in turn order, alternating by round: the second of two back-to-back
      // runs is measurably slower on this VM.
      const pair = [
        () =>
          runs.sendWaitSync.push(
            timed(() => {
              for (let i = 0; i < COUNT; i++) client.sendWaitSync(Command.REGION_READ, access)
            }, COUNT),
          ),
        () =>
          runs.regionReadSync.push(
            timed(() => {
              for (let i = 0; i < COUNT; i++) client.regionReadSync(0, 0, 4)
            }, COUNT),
          ),
      ]
      if (round % 2) pair.reverse()
      for (const run of pair) run()
      runs.mapOne.push(
        await timedAsync(async () => {
          for (const m of maps) await client.dmaMap(m)
        }, MAPS),
      )
      await Promise.all(maps.map((m) => client.dmaUnmap(m)))
      // dmaMapMany beside the least a client can do (the ceiling binary: MAPS DMA_MAPs with
      // their fds in flight), each MAP_REPEAT times, maps timed and unmaps not, in an order
      // reversed every other round.
      const mapPair = [
        async () => {
          let us = 0
          for (let r = 0; r < MAP_REPEAT; r++) {
            us += await timedAsync(() => client.dmaMapMany(maps), MAPS)
            await Promise.all(maps.map((m) => client.dmaUnmap(m)))
          }
          runs.mapMany.push(us / MAP_REPEAT)
        },
        async () => {
          const r = JSON.parse(
            execFileSync(binary('vfio-user-bench-dma-floor'), [other.socketPath, String(MAP_REPEAT), String(MAPS)], {
              encoding: 'utf8',
            }),
          )
          runs.mapCeiling.push((r.seconds / r.maps) * 1e6)
        },
      ]
      if (round % 2) mapPair.reverse()
      for (const run of mapPair) await run()
      // The 1 MiB modes, in an order reversed every other round (see the pair above).
      const big = []
      // CPU per MiB of this process (all threads), beside the wall time.
      for (const [name, options] of [
        ['regionRead', {}],
        ['regionReadInto', { into }],
      ]) {
        big.push(async () => {
          const cpu0 = process.cpuUsage()
          runs[name].push(
            await timedAsync(async () => {
              for (let i = 0; i < BIG; i++) await client.regionRead(2, 0, MIB, options)
            }, BIG),
          )
          const cpu = process.cpuUsage(cpu0)
          runs[`${name}Cpu`].push((cpu.user + cpu.system) / BIG)
        })
      }
      // The socketpair read from JavaScript through the minimal addon, into one Buffer and
      // into a new Buffer each MiB: what that memory costs before any protocol.
      for (const [name, next] of [
        ['nodeStream', () => into],
        ['nodeStreamNew', () => Buffer.allocUnsafeSlow(MIB)],
      ]) {
        big.push(() => {
          const stream = new MinimalStream(BIG)
          try {
            runs[name].push(
              timed(() => {
                for (let i = 0; i < BIG; i++) stream.read(next())
              }, BIG),
            )
          } finally {
            stream.close()
          }
        })
      }
      for (const [mode, name, path] of [
        ['stream', 'stream', '-'],
        ['read1m', 'device', other.socketPath],
        ['client1m-callback', 'rustEvents', other.socketPath],
      ]) {
        big.push(() => {
          const r = JSON.parse(
            execFileSync(binary('vfio-user-bench-floor'), [path, String(BIG), mode], { encoding: 'utf8' }),
          )
          runs[name].push((r.seconds / BIG) * 1e6)
        })
      }
      if (round % 2) big.reverse()
      for (const run of big) await run()
    }
  } finally {
    await client.close()
    await other.close()
    memory.close()
  }
  const m = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, median(v)]))
  /** The median over rounds of `a[i] / b[i]`: a ratio paired within each round. */
  const paired = (a, b) => median(runs[a].map((x, i) => x / runs[b][i]))
  const mbs = (usPerMib) => (1e6 / usPerMib).toFixed(0)
  const ratio = (x) => `${x.toFixed(2)}x`
  /** A goal's cell, counting it when missed. */
  let missed = 0
  const goal = (x, op, bound) => {
    const met = op === '<=' ? x <= bound : x >= bound
    if (!met) missed++
    return `${op} ${bound}x ${met ? 'met' : 'MISSED'}`
  }
  const readRatio = paired('regionReadSync', 'sendWaitSync')
  const intoVsDevice = paired('device', 'regionReadInto')
  const newVsNode = paired('nodeStreamNew', 'regionRead')
  const mapVsCeiling = paired('mapCeiling', 'mapMany')
  const rows = [
    ['typed calls (medians; ratios paired by round)', 'per call', 'vs', 'goal'],
    ['sendWaitSync REGION_READ 4 B', `${fmt(m.sendWaitSync)} µs`, '1.00x', ''],
    ['regionReadSync 4 B', `${fmt(m.regionReadSync)} µs`, ratio(readRatio), goal(readRatio, '<=', 1.1)],
    ['socketpair, 1 MiB (two threads, no protocol)', `${mbs(m.stream)} MB/s`, '', 'for reference'],
    ['device ceiling, 1 MiB reads (blocking, fixed buffer)', `${mbs(m.device)} MB/s`, '1.00x', ''],
    [
      'Rust client, read as events (epoll) into memory',
      `${mbs(m.rustEvents)} MB/s`,
      ratio(paired('device', 'rustEvents')),
      'for reference',
    ],
    [
      'regionRead 1 MiB { into } (rate vs the device ceiling)',
      `${mbs(m.regionReadInto)} MB/s, ${m.regionReadIntoCpu.toFixed(0)} µs CPU/MiB`,
      ratio(intoVsDevice),
      goal(intoVsDevice, '>=', 0.9),
    ],
    ['socketpair read from Node, into one Buffer', `${mbs(m.nodeStream)} MB/s`, '', 'for reference'],
    ['socketpair read from Node, a new Buffer each', `${mbs(m.nodeStreamNew)} MB/s`, '1.00x', ''],
    [
      'regionRead 1 MiB, a new Buffer each (rate vs the line above)',
      `${mbs(m.regionRead)} MB/s, ${m.regionReadCpu.toFixed(0)} µs CPU/MiB`,
      ratio(newVsNode),
      goal(newVsNode, '>=', 0.95),
    ],
    [`ceiling: ${MAPS} DMA_MAPs with fds in flight`, `${fmt(m.mapCeiling)} µs`, '1.00x', ''],
    [
      `dmaMapMany of ${MAPS} (rate vs the ceiling)`,
      `${fmt(m.mapMany)} µs`,
      ratio(mapVsCeiling),
      goal(mapVsCeiling, '>=', 0.8),
    ],
    [
      `dmaMap x${MAPS}, each awaited (rate vs dmaMapMany)`,
      `${fmt(m.mapOne)} µs`,
      ratio(paired('mapMany', 'mapOne')),
      'for reference',
    ],
  ]
  console.log('')
  table(rows)
  return missed
}

/**
 * The round trips (issue 20's goals): every round printed, then the medians, and each goal's
 * ratio paired within each round (ours over the reference run in the same round), the median
 * of those. Runs alternate their order by round: the second of two back-to-back runs is
 * measurably slower on this VM. Returns the goals missed.
 */
async function roundTrips(socketPath) {
  const names = ['floor', MSG_FLOOR, 'ceiling', ...Object.keys(references), ...Object.keys(modes)]
  const runs = Object.fromEntries(names.map((k) => [k, []]))
  const extraFloors = []
  for (let round = 1; round <= ROUNDS; round++) {
    const row = [['round', 'mode', 'µs/request', 'user µs', 'sys µs']]
    const record = (name, r) => {
      runs[name].push(r)
      row.push([String(round), name, fmt(r.us), fmt(r.user), fmt(r.sys)])
    }
    const steps = [
      async () => record('floor', floor(socketPath, 'raw')),
      async () => record(MSG_FLOOR, floor(socketPath, 'msg')),
      async () => record('ceiling', floor(socketPath, 'pipelined')),
      ...Object.entries(references).map(
        ([name, run]) =>
          async () =>
            record(name, await run(socketPath)),
      ),
      ...Object.entries(modes).map(
        ([name, run]) =>
          async () =>
            record(name, await run(socketPath)),
      ),
    ]
    if (round % 2 === 0) steps.reverse()
    for (const step of steps) await step()
    // A second floor at the round's end: drift within a round shows as two different floors.
    const last = floor(socketPath, 'raw')
    extraFloors.push(last)
    row.push([String(round), 'floor (again)', fmt(last.us), fmt(last.user), fmt(last.sys)])
    table(row)
    console.log('')
  }
  const f = medianOf(runs.floor)
  const rows = [['mode (medians)', 'µs/request', 'user µs', 'sys µs', 'vs floor', 'CPU']]
  for (const name of names) {
    const m = medianOf(runs[name])
    rows.push([name, fmt(m.us), fmt(m.user), fmt(m.sys), `${(m.us / f.us).toFixed(2)}x`, fmt(m.user + m.sys)])
  }
  table(rows)
  const results = {}
  let missed = 0
  const paired = [['goal (ratios paired by round, medians)', 'time', 'user CPU over the reference', 'goal']]
  for (const [name, g] of Object.entries(goals)) {
    const ratio = median(runs[name].map((r, i) => r.us / runs[g.against][i].us))
    const over = median(runs[name].map((r, i) => r.user - runs[g.against][i].user))
    const met = ratio <= g.time && (g.userOver === undefined || over <= g.userOver)
    if (!met) missed++
    results[name] = { ...medianOf(runs[name]), ratio, userOver: over, met }
    paired.push([
      `${name} / ${g.against}`,
      `${ratio.toFixed(2)}x`,
      `${over >= 0 ? '+' : ''}${fmt(over)} µs`,
      `<= ${g.time}x${g.userOver === undefined ? '' : `, user <= +${g.userOver} µs`} ${met ? 'met' : 'MISSED'}`,
    ])
  }
  console.log('')
  table(paired)
  console.log(`\n${COUNT} requests x ${ROUNDS} rounds; CPU is user + sys µs per request of the client's process`)
  if (process.env.BENCH_PINNED) console.log(`everything pinned to CPU ${process.env.BENCH_PINNED} (BENCH_PIN)`)
  if (process.env.BENCH_JSON) console.log(JSON.stringify({ floor: f, extraFloors, results }))
  return missed
}

// BENCH_ONLY=typed or BENCH_ONLY=roundtrip: only those figures (a quicker loop while working on them).
const only = process.env.BENCH_ONLY
const device = await startTestDevice({ binary: binary('vfio-user-test-device') })
try {
  let missed = only === 'typed' ? 0 : await roundTrips(device.socketPath)
  if (only !== 'roundtrip') missed += await typedCalls(device.socketPath)
  if (!only) missed += await migrationBench({ binary, rounds: ROUNDS, table, median })
  if (missed > 0) console.log(`${missed} goal(s) missed`)
} finally {
  await device.close()
}
