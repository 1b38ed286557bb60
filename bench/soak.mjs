// `npm run soak [-- --requests N --warmup N]`: one million requests (by default) through the
// public API after a warm-up with the same mix, and the process's RSS, open fds and threads
// before the warm-up, at the start and at the end; start and end must be flat.
//
// The mix, per connection (reconnecting every CONNECTION_REQUESTS requests, alternating ways
// of ending: close(), the server killed under it, the client dropped without close()):
// - DEVICE_GET_INFO and REGION_READ/REGION_WRITE of 1 B to 4 KiB against the real test device
//   (rust-vmm's vfio_user Server), 64 in flight;
// - REGION_READ of 0 B to 64 KiB against the scripted `echo` peer, whose reply bytes derive
//   from the request's offset, so every reply proves it answered its own request;
// - requests carrying an fd (an eventfd-like pipe end), sent to the echo peer;
// - requests that time out (the peer answers 5 ms late, the request allows 1 ms): their late
//   replies arrive while newer requests are in flight and must be dropped.
// Exits non-zero if a reply reaches the wrong request, or RSS, fds or threads are not flat.
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { Command, connect } from '../dist/index.js'
import { startScriptedPeer, startTestDevice } from '../dist/testing.js'

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc')

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? Number(process.argv[i + 1]) : fallback
}
const TOTAL = arg('requests', 1_000_000)
const CONNECTION_REQUESTS = arg('per-connection', 20_000)
const WARMUP = arg('warmup', Math.round(TOTAL / 2))
const DEPTH = 64

const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? 0) * 1024
const fds = () => readdirSync('/proc/self/fd').length
const threads = () => readdirSync('/proc/self/task').length
const turn = () => new Promise((resolve) => setImmediate(resolve))
const mib = (n) => +(n / 2 ** 20).toFixed(1)
const snapshot = () => {
  const m = process.memoryUsage()
  return {
    rssMiB: mib(rss()),
    heapUsedMiB: mib(m.heapUsed),
    heapTotalMiB: mib(m.heapTotal),
    externalMiB: mib(m.external),
    fds: fds(),
    threads: threads(),
  }
}

let wrong = 0
let timedOut = 0
let answered = 0
let nonce = 0

function access(offset, region, count, data) {
  const p = Buffer.alloc(16 + (data?.length ?? 0))
  p.writeBigUInt64LE(BigInt(offset), 0)
  p.writeUInt32LE(region, 8)
  p.writeUInt32LE(count, 12)
  data?.copy(p, 16)
  return p
}

function info() {
  const p = Buffer.alloc(16)
  p.writeUInt32LE(16, 0)
  return p
}

/** One request of the mix; resolves when it has settled and been checked. */
async function one(device, echo, i, fd) {
  const kind = i % 16
  try {
    if (kind < 6) {
      const r = await device.sendWait(Command.DEVICE_GET_INFO, info())
      if (r.payload.readUInt32LE(8) < 9) wrong++
    } else if (kind < 9) {
      const size = 1 + (i % 4096)
      if (kind === 8) {
        await device.sendWait(Command.REGION_WRITE, access(0, 0, size, Buffer.alloc(size, i & 0xff)))
      } else {
        const r = await device.sendWait(Command.REGION_READ, access(0, 0, size))
        if (r.payload.length !== 16 + size) wrong++
      }
    } else if (kind < 15) {
      const offset = ++nonce
      const size = kind === 14 ? (i * 7919) % (64 << 10) : i % 512
      const late = kind === 13 && i % 256 === 13
      const options = late ? { timeoutMs: 1 } : kind === 12 ? { fds: [fd] } : {}
      const r = await echo.sendWait(Command.REGION_READ, access(offset, late ? 5 : 0, size), options)
      const data = r.payload.subarray(16)
      if (r.payload.readBigUInt64LE(0) !== BigInt(offset) || data.length !== size) wrong++
      else if (size > 0 && (data[0] !== (offset & 0xff) || data[size - 1] !== ((offset + size - 1) & 0xff))) wrong++
    } else {
      const r = echo.sendWaitSync(Command.DEVICE_GET_INFO, info())
      if (r.payload.length !== 16) wrong++
    }
    answered++
  } catch (e) {
    if (e.code !== 'ETIMEDOUT') throw e
    timedOut++
  }
}

async function connection(deviceSocket, echoSocket, fd, count) {
  const device = await connect(deviceSocket)
  const echo = await connect(echoSocket)
  await device.validateVersion()
  await echo.validateVersion()
  let next = 0
  const worker = async () => {
    while (next < count) await one(device, echo, next++, fd)
  }
  await Promise.all(Array.from({ length: DEPTH }, worker))
  return { device, echo }
}

/** Runs `total` requests over connections ended three ways; returns the rounds run. */
async function soak(total, servers) {
  let sent = 0
  let round = 0
  while (sent < total) {
    const count = Math.min(CONNECTION_REQUESTS, total - sent)
    const { device: d, echo } = await connection(servers.device.socketPath, servers.echo.socketPath, servers.fd, count)
    sent += count
    round++
    // End the connection one of three ways.
    const way = round % 3
    if (way === 0) {
      await d.close()
    } else if (way === 1) {
      const closed = new Promise((resolve) => d.once('close', resolve))
      await servers.device.close() // the server goes away under the client
      await closed
    } // way 2: dropped without close(): the GC or the server's end releases it
    await echo.close()
    if (way !== 0) {
      if (way === 2) await servers.device.close()
      servers.device = await startTestDevice()
    }
    if (round % 10 === 0) {
      gc()
      await turn()
      console.log(`${String(sent).padStart(8)} requests  ${JSON.stringify(snapshot())}`)
    }
  }
  return round
}

async function settled() {
  for (let i = 0; i < 50; i++) {
    gc()
    await turn()
  }
  return snapshot()
}

async function main() {
  // The test device serves one connection at a time, so each connection whose server is
  // killed (or whose client is dropped) gets a fresh one.
  const servers = {
    device: await startTestDevice(),
    echo: await startScriptedPeer('echo'),
    fd: openSync('/dev/null', 'r'),
  }
  const before = await settled()
  console.log(`before warm-up  ${JSON.stringify(before)}`)
  // Warm up (JIT, V8's heap sizing, malloc's per-thread arenas, libuv's threadpool) with
  // the same mix, so the measured run starts from a steady state.
  await soak(WARMUP, servers)
  answered = 0
  timedOut = 0
  const start = await settled()
  const t0 = process.hrtime.bigint()
  const cpu0 = process.cpuUsage()
  console.log(`start           ${JSON.stringify(start)}  (after ${WARMUP} warm-up requests)`)
  const rounds = await soak(TOTAL, servers)
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9
  const cpu = process.cpuUsage(cpu0)
  const end = await settled()
  console.log(`end             ${JSON.stringify(end)}`)
  await servers.device.close()
  await servers.echo.close()
  closeSync(servers.fd)
  console.log(
    `${TOTAL} requests over ${rounds} connections in ${seconds.toFixed(1)} s (${((seconds / TOTAL) * 1e6).toFixed(1)} µs each; ` +
      `CPU ${(cpu.user / TOTAL).toFixed(2)} µs user + ${(cpu.system / TOTAL).toFixed(2)} µs sys per request)`,
  )
  console.log(`answered ${answered}, timed out ${timedOut} (late replies dropped), misdelivered ${wrong}`)
  // fds and threads exactly as at the start; live JS heap within 1 MiB; RSS within 10%. (RSS
  // climbs during the warm-up while V8 grows its young generation, heapTotal 21 -> 37 MiB
  // with heapUsed flat; the warm-up is long enough to reach that plateau.)
  const flat =
    end.fds === start.fds &&
    end.threads === start.threads &&
    end.heapUsedMiB <= start.heapUsedMiB + 1 &&
    end.rssMiB <= start.rssMiB * 1.1
  console.log(flat && wrong === 0 ? 'flat: yes' : 'flat: NO')
  process.exitCode = flat && wrong === 0 ? 0 : 1
}

await main()
