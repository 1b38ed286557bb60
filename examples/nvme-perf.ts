// 4 KiB random reads through the example NVMe driver (examples/nvme-driver.ts), as
// spdk_nvme_perf does them: `depth` reads kept in flight for `seconds`, one block each, LBAs
// chosen at random over the first 64 MiB of namespace 1. Prints one JSON object: reads,
// seconds, IOPS, mean latency (µs) and this process's CPU per read (µs, user + system).
//
//   npm run --silent example:nvme-perf -- SOCKET [--depth N] [--seconds S] [--mmap] [--poll]
//
// --mmap rings doorbells through the mapped BAR0 (a polling target), else posted
// REGION_WRITEs; --poll reads the completion queue, else waits on MSI-X. npm run bench:nvme
// runs it beside spdk_nvme_perf.
import { openNvme } from './nvme-open'

const args = process.argv.slice(2)
const socket = args.find((a, i) => !a.startsWith('--') && !args[i - 1]?.match(/^--(depth|seconds)$/))
if (!socket) throw new Error('usage: nvme-perf SOCKET [--depth N] [--seconds S] [--mmap] [--poll]')
const value = (name: string, fallback: number) =>
  args.includes(name) ? Number(args[args.indexOf(name) + 1]) : fallback
const depth = value('--depth', 1)
const seconds = value('--seconds', 3)

await using opened = await openNvme(socket, { poll: args.includes('--poll'), mmap: args.includes('--mmap') })
const { nvme, irqs } = opened
const ns = await nvme.identifyNamespace(1)
await nvme.createIoQueues()
const blocksPer4k = 4096 / ns.blockSize
const span = Math.min(Number(ns.blocks), (64 << 20) / ns.blockSize) / blocksPer4k
const lba = () => Math.floor(Math.random() * span) * blocksPer4k
// 4 KiB reads: the namespace's blocks are 512 bytes, so a read is 8 of them.
const read = (total: number) => nvme.readMany(total, depth, lba, blocksPer4k)
await read(2000) // warm up: the JIT, the target's queues
let reads = 0
const cpu = process.cpuUsage()
const start = process.hrtime.bigint()
const end = start + BigInt(Math.round(seconds * 1e9))
while (process.hrtime.bigint() < end) {
  await read(1000)
  reads += 1000
}
const elapsed = Number(process.hrtime.bigint() - start) / 1e9
const used = process.cpuUsage(cpu)
console.log(
  JSON.stringify({
    depth,
    doorbells: args.includes('--mmap') ? 'mmap' : 'posted REGION_WRITE',
    completions: irqs ? 'MSI-X' : 'polled',
    reads,
    seconds: elapsed,
    iops: reads / elapsed,
    latencyUs: (elapsed * 1e6 * depth) / reads,
    cpuUsPerRead: (used.user + used.system) / reads,
  }),
)
await nvme.deleteIoQueues()
await nvme.disable()
