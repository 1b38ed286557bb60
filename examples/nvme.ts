// A small NVMe driver at work (examples/nvme-driver.ts), on vfio-user's public API: it enables
// an NVMe controller served over vfio-user (SPDK's NVMe-oF target), identifies it and its
// namespace, creates an I/O queue pair on its own MSI-X vector, writes blocks and reads them
// back waiting on interrupts, and shuts the controller down.
//
//   npm run example:nvme -- SOCKET [--mmap] [--poll] [--blocks N]
//
// --mmap rings doorbells through BAR0 mapped into this process (a polling target's doorbells
// are a sparse mmap area), not posted REGION_WRITEs; --poll waits for completions by reading
// the completion queue, not on interrupts. Needs huge pages reserved (as root:
// echo 64 > /proc/sys/vm/nr_hugepages).
import { openNvme } from './nvme-open'

const args = process.argv.slice(2)
const socket = args.find((a) => !a.startsWith('--') && !/^\d+$/.test(a))
if (!socket) throw new Error('usage: nvme SOCKET [--mmap] [--poll] [--blocks N]')
const blocks = args.includes('--blocks') ? Number(args[args.indexOf('--blocks') + 1]) : 8

await using opened = await openNvme(socket, { poll: args.includes('--poll'), mmap: args.includes('--mmap') })
const { nvme, irqs } = opened
const vs = await nvme.bar0.read32(0x08)
console.log(`NVMe ${vs >>> 16}.${(vs >>> 8) & 0xff}, up to ${Number(nvme.cap & 0xffffn) + 1} queue entries`)
const id = await nvme.identifyController()
console.log(`controller: ${id.model}, firmware ${id.firmware}, serial ${id.serial}`)
const ns = await nvme.identifyNamespace(1)
console.log(`namespace 1: ${ns.blocks} blocks of ${ns.blockSize} bytes`)
await nvme.createIoQueues()
const pattern = Buffer.alloc(blocks * ns.blockSize, 'vfio-user from Node ')
pattern.copy(nvme.data())
await nvme.write(16n, blocks)
nvme.data().fill(0)
await nvme.read(16n, blocks)
const same = nvme.data().subarray(0, pattern.length).equals(pattern)
console.log(`wrote ${blocks} blocks at LBA 16, read them back: ${same ? 'the same' : 'DIFFERENT'}`)
if (!same) process.exitCode = 1
await nvme.deleteIoQueues()
await nvme.shutdown()
const waited = irqs
  ? `on ${nvme.interrupts} MSI-X interrupt${nvme.interrupts === 1 ? '' : 's'}`
  : 'by polling the completion queues'
console.log(`shut down; completions awaited ${waited}`)
