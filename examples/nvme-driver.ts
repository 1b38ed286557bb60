// A small NVMe driver on vfio-user's public API (NVMe 2.0's controller registers, admin and
// I/O queues, PRPs), for SPDK's NVMe-oF target with the vfio-user transport or any vfio-user
// NVMe controller. An example of driving a real device from Node, not part of the library:
// examples/nvme.ts runs it, and the SPDK tests use it.
//
// Everything lives in one 2 MiB huge page of DMA memory (SPDK uses only memory its own
// mapping sees 2 MiB aligned), laid out in 4 KiB pages: the admin queues, one I/O queue pair,
// a page for Identify data, a PRP list and up to 64 KiB of blocks.
import type { DmaMemory, Interrupts, RegionMap, Registers, VfioUserClient } from 'vfio-user'

/** Where the device sees the memory: 2 MiB aligned. */
export const IOVA = 0x4000_0000n
/** The memory's size: one huge page. */
export const MEMORY_SIZE = 2 << 20
const ADMIN_SQ = 0
const ADMIN_CQ = 0x1000
const IO_SQ = 0x2000
const IO_CQ = 0x3000
const IDENTIFY = 0x4000
const PRP_LIST = 0xf000
const DATA = 0x10000
/** The most bytes one read or write moves (the PRP list's room). */
export const MAX_TRANSFER = 0x10000
/** Where {@link Nvme.readMany} reads into: a 4 KiB page per command in flight. */
const SLOTS = 0x40000
const ENTRIES = 64
/** The most reads {@link Nvme.readMany} keeps in flight (a queue of 64 holds 63). */
export const MAX_DEPTH = 32

/** How the driver rings doorbells and waits for completions. */
export interface NvmeOptions {
  /** BAR0 mapped (`mapRegion`): doorbells are stores to it; else posted REGION_WRITEs. */
  doorbells?: RegionMap
  /** MSI-X interrupts (vector 0 admin, 1 I/O): completions are awaited on them; else the queue is polled. */
  irqs?: Interrupts
  /**
   * Turn MSI-X on (default: when `irqs` is given). On without `irqs`: the eventfds are wired
   * elsewhere (`enableIrqs({ fds })`), and completions are polled here.
   */
  msix?: boolean
  /** How long to wait for one completion or a state change, in ms (default 5000). */
  timeoutMs?: number
}

/** One submission and completion queue pair. */
class Queue {
  tail = 0
  head = 0
  phase = 1
  cid = 0
  constructor(
    readonly qid: number,
    readonly sq: number,
    readonly cq: number,
  ) {}
}

/** What Identify Controller says. */
export interface ControllerIdentity {
  vendorId: number
  serial: string
  model: string
  firmware: string
}

/** What Identify Namespace says. */
export interface NamespaceIdentity {
  blocks: bigint
  blockSize: number
}

/** An NVMe controller driven through a vfio-user client, its queues in `memory` mapped at {@link IOVA}. */
export class Nvme {
  readonly bar0: Registers
  /** The controller's capabilities register (CAP). */
  cap = 0n
  /** Interrupts that woke a wait for a completion. */
  interrupts = 0
  #stride = 4
  #admin = new Queue(0, ADMIN_SQ, ADMIN_CQ)
  #io: Queue | undefined
  #namespace: NamespaceIdentity | undefined
  readonly #mem: Buffer
  readonly #timeoutMs: number

  constructor(
    readonly client: VfioUserClient,
    readonly memory: DmaMemory,
    readonly options: NvmeOptions = {},
  ) {
    this.bar0 = client.registers(0)
    this.#mem = memory.buffer
    this.#timeoutMs = options.timeoutMs ?? 5000
  }

  /** The memory's bytes at `offset` (a page of it). */
  data(offset = DATA, length = MAX_TRANSFER): Buffer {
    return this.#mem.subarray(offset, offset + length)
  }

  /**
   * Bus mastering and memory decoding on, INTx off; MSI-X on (every vector unmasked) when the
   * driver waits on interrupts, else off. SPDK signals a completion whenever INTx is not
   * disabled or MSI-X is enabled, and fails the controller ("no fd for interrupt 0") when no
   * eventfd is wired for the vector: a polling driver must turn both off.
   */
  async enablePci(): Promise<void> {
    const config = this.client.registers(7)
    await config.write16(0x04, 0x0406)
    const pci = await this.client.regionRead(7, 0, 256)
    let cap = pci[0x34]
    while (cap !== 0 && pci[cap] !== 0x11) cap = pci[cap + 1]
    if (cap === 0) throw new Error('no MSI-X capability')
    const control = pci.readUInt16LE(cap + 2) & ~0xc000
    const on = this.options.msix ?? this.options.irqs !== undefined
    await config.write16(cap + 2, on ? control | 0x8000 : control)
  }

  /** Disables the controller, sets up the admin queues and enables it (CC.EN, then CSTS.RDY). */
  async enable(): Promise<void> {
    this.cap = await this.bar0.read64(0x00)
    this.#stride = 4 << Number((this.cap >> 32n) & 0xfn)
    await this.disable()
    this.#admin = new Queue(0, ADMIN_SQ, ADMIN_CQ)
    this.#mem.fill(0, ADMIN_SQ, IDENTIFY)
    await this.bar0.write32(0x24, ((ENTRIES - 1) << 16) | (ENTRIES - 1))
    await this.bar0.write64(0x28, IOVA + BigInt(ADMIN_SQ))
    await this.bar0.write64(0x30, IOVA + BigInt(ADMIN_CQ))
    await this.bar0.write32(0x14, (4 << 20) | (6 << 16) | 1) // 16-byte CQEs, 64-byte SQEs, EN
    await this.#until(async () => ((await this.bar0.read32(0x1c)) & 1) === 1, 'CSTS.RDY to become 1')
  }

  /** Clears CC.EN and waits for CSTS.RDY to clear. */
  async disable(): Promise<void> {
    await this.bar0.write32(0x14, 0)
    await this.#until(async () => ((await this.bar0.read32(0x1c)) & 1) === 0, 'CSTS.RDY to become 0')
    this.#io = undefined
  }

  /** Identify Controller. */
  async identifyController(): Promise<ControllerIdentity> {
    await this.admin(0x06, (c) => {
      c.writeBigUInt64LE(IOVA + BigInt(IDENTIFY), 24)
      c.writeUInt32LE(1, 40)
    })
    const text = (from: number, to: number) => this.#mem.toString('latin1', IDENTIFY + from, IDENTIFY + to).trim()
    return {
      vendorId: this.#mem.readUInt16LE(IDENTIFY),
      serial: text(4, 24),
      model: text(24, 64),
      firmware: text(64, 72),
    }
  }

  /** Identify Namespace `nsid`. */
  async identifyNamespace(nsid = 1): Promise<NamespaceIdentity> {
    await this.admin(0x06, (c) => {
      c.writeUInt32LE(nsid, 4)
      c.writeBigUInt64LE(IOVA + BigInt(IDENTIFY), 24)
    })
    const format = this.#mem[IDENTIFY + 26] & 0xf
    this.#namespace = {
      blocks: this.#mem.readBigUInt64LE(IDENTIFY),
      blockSize: 1 << this.#mem[IDENTIFY + 128 + 4 * format + 2],
    }
    return this.#namespace
  }

  /** Creates I/O queue pair 1; its completions signal MSI-X vector 1. */
  async createIoQueues(): Promise<void> {
    await this.admin(0x05, (c) => {
      c.writeBigUInt64LE(IOVA + BigInt(IO_CQ), 24)
      c.writeUInt32LE(((ENTRIES - 1) << 16) | 1, 40)
      c.writeUInt32LE((1 << 16) | 0b11, 44) // vector 1, interrupts enabled, contiguous
    })
    await this.admin(0x01, (c) => {
      c.writeBigUInt64LE(IOVA + BigInt(IO_SQ), 24)
      c.writeUInt32LE(((ENTRIES - 1) << 16) | 1, 40)
      c.writeUInt32LE((1 << 16) | 1, 44) // completion queue 1, contiguous
    })
    this.#mem.fill(0, IO_SQ, IDENTIFY)
    this.#io = new Queue(1, IO_SQ, IO_CQ)
  }

  /** Deletes I/O queue pair 1. */
  async deleteIoQueues(): Promise<void> {
    await this.admin(0x00, (c) => c.writeUInt32LE(1, 40))
    await this.admin(0x04, (c) => c.writeUInt32LE(1, 40))
    this.#io = undefined
  }

  /** Writes `count` blocks at `lba` of namespace 1 from {@link Nvme.data}. */
  write(lba: bigint, count: number): Promise<number> {
    return this.#rw(0x01, lba, count)
  }

  /** Reads `count` blocks at `lba` of namespace 1 into {@link Nvme.data}. */
  read(lba: bigint, count: number): Promise<number> {
    return this.#rw(0x02, lba, count)
  }

  /**
   * Reads `total` times `blocks` blocks (at most 4 KiB), one command each, at the LBAs `lba()`
   * picks (safe integers), keeping `depth` commands in flight on I/O queue 1 (each into its own 4 KiB page):
   * the benchmark's loop. Doorbells
   * are rung once per batch of submissions and of completions; waits are on MSI-X vector 1, or
   * polls without `irqs`.
   */
  async readMany(total: number, depth: number, lba: () => number, blocks = 1): Promise<void> {
    const q = this.#io
    if (!q || !this.#namespace) throw new Error('create the I/O queues and identify the namespace first')
    if (depth < 1 || depth > MAX_DEPTH) throw new RangeError(`depth must be from 1 to ${MAX_DEPTH}`)
    if (blocks * this.#namespace.blockSize > 0x1000) throw new RangeError(`${blocks} blocks pass a 4 KiB page`)
    const mem = this.#mem
    const sqDoorbell = 0x1000 + 2 * q.qid * this.#stride
    const cqDoorbell = 0x1000 + (2 * q.qid + 1) * this.#stride
    // Doorbells as stores to the mapped BAR0 need no event loop: polling then spins here, as
    // SPDK's own initiator does, and yields to the loop only now and then.
    const store = this.#doorbellStore()
    const spin = store !== undefined && !this.options.irqs
    let submitted = 0
    let done = 0
    // Every read's command differs only in its id, its page and its LBA: the queue's entries
    // are cleared once, and each read writes those (as 32-bit halves: no BigInt per read).
    mem.fill(0, q.sq, q.sq + ENTRIES * 64)
    const page = (slot: number) => Number(IOVA) + SLOTS + slot * 0x1000
    const put = (slot: number) => {
      const at = q.sq + q.tail * 64
      mem[at] = 0x02
      mem.writeUInt16LE(slot, at + 2)
      mem.writeUInt32LE(1, at + 4)
      const prp = page(slot)
      mem.writeUInt32LE(prp % 0x1_0000_0000, at + 24)
      mem.writeUInt32LE(Math.floor(prp / 0x1_0000_0000), at + 28)
      const to = lba()
      mem.writeUInt32LE(to % 0x1_0000_0000, at + 40)
      mem.writeUInt32LE(Math.floor(to / 0x1_0000_0000), at + 44)
      mem.writeUInt32LE(blocks - 1, at + 48)
      q.tail = (q.tail + 1) % ENTRIES
      submitted++
    }
    const ring = (offset: number, value: number) => (store ? store(offset, value) : this.#ring(offset, value))
    for (let slot = 0; slot < depth && submitted < total; slot++) put(slot)
    await ring(sqDoorbell, q.tail)
    let idle = 0
    while (done < total) {
      let reaped = 0
      let refilled = false
      for (;;) {
        const at = q.cq + q.head * 16
        const status = mem.readUInt16LE(at + 14)
        if ((status & 1) !== q.phase) break
        if (status >> 1 !== 0) throw new Error(`a read failed: status 0x${(status >> 1).toString(16)}`)
        q.head = (q.head + 1) % ENTRIES
        if (q.head === 0) q.phase ^= 1
        reaped++
        done++
        if (submitted < total) {
          put(mem.readUInt16LE(at + 12))
          refilled = true
        }
      }
      if (reaped > 0) {
        idle = 0
        const rung = ring(cqDoorbell, q.head)
        if (!store) await rung
        if (refilled) {
          const again = ring(sqDoorbell, q.tail)
          if (!store) await again
        }
      } else if (this.options.irqs) {
        await this.options.irqs.wait({ vector: 1, timeoutMs: this.#timeoutMs })
        this.interrupts++
      } else if (!spin || ++idle % 4096 === 0) {
        await new Promise((r) => setImmediate(r))
      }
    }
  }

  /** A synchronous doorbell write through the mapped BAR0, when it is mapped. */
  #doorbellStore(): ((offset: number, value: number) => void) | undefined {
    const area = this.options.doorbells?.areas.find((a) => a.offset <= 0x1000n && a.offset + a.size > 0x1000n)
    if (!area) return undefined
    const base = Number(area.offset)
    const buffer = area.buffer
    return (offset, value) => {
      buffer.writeUInt32LE(value, offset - base)
    }
  }

  /** A normal shutdown: CC.SHN, then CSTS.SHST complete. */
  async shutdown(): Promise<void> {
    await this.bar0.write32(0x14, (await this.bar0.read32(0x14)) | (1 << 14))
    await this.#until(async () => (((await this.bar0.read32(0x1c)) >> 2) & 3) === 2, 'CSTS.SHST to say complete')
  }

  /** Submits admin command `opcode` (its other fields set by `fill`); resolves with dword 0 of its completion. */
  admin(opcode: number, fill: (sqe: Buffer) => void): Promise<number> {
    return this.#submit(this.#admin, 0, opcode, fill)
  }

  #rw(opcode: number, lba: bigint, count: number): Promise<number> {
    const io = this.#io
    const ns = this.#namespace
    if (!io || !ns) throw new Error('create the I/O queues and identify the namespace first')
    const bytes = count * ns.blockSize
    if (bytes > MAX_TRANSFER || count < 1) throw new RangeError(`${count} blocks do not fit ${MAX_TRANSFER} bytes`)
    return this.#submit(io, 1, opcode, (c) => {
      c.writeUInt32LE(1, 4)
      c.writeBigUInt64LE(IOVA + BigInt(DATA), 24)
      if (bytes > 0x2000) {
        for (let p = 1; p * 0x1000 < bytes; p++) {
          this.#mem.writeBigUInt64LE(IOVA + BigInt(DATA + p * 0x1000), PRP_LIST + 8 * (p - 1))
        }
        c.writeBigUInt64LE(IOVA + BigInt(PRP_LIST), 32)
      } else if (bytes > 0x1000) {
        c.writeBigUInt64LE(IOVA + BigInt(DATA + 0x1000), 32)
      }
      c.writeBigUInt64LE(lba, 40)
      c.writeUInt32LE(count - 1, 48)
    })
  }

  async #submit(q: Queue, vector: number, opcode: number, fill: (sqe: Buffer) => void): Promise<number> {
    const at = q.sq + q.tail * 64
    const sqe = this.#mem.subarray(at, at + 64)
    sqe.fill(0)
    sqe[0] = opcode
    fill(sqe)
    const cid = q.cid++ & 0xffff
    sqe.writeUInt16LE(cid, 2)
    q.tail = (q.tail + 1) % ENTRIES
    await this.#ring(0x1000 + 2 * q.qid * this.#stride, q.tail)
    const deadline = Date.now() + this.#timeoutMs
    for (;;) {
      const cqe = this.#mem.subarray(q.cq + q.head * 16, q.cq + q.head * 16 + 16)
      const status = cqe.readUInt16LE(14)
      if ((status & 1) === q.phase) {
        q.head = (q.head + 1) % ENTRIES
        if (q.head === 0) q.phase ^= 1
        await this.#ring(0x1000 + (2 * q.qid + 1) * this.#stride, q.head)
        if (cqe.readUInt16LE(12) !== cid)
          throw new Error(`a completion for command ${cqe.readUInt16LE(12)}, not ${cid}`)
        if (status >> 1 !== 0)
          throw new Error(`opcode 0x${opcode.toString(16)} failed: status 0x${(status >> 1).toString(16)}`)
        return cqe.readUInt32LE(0)
      }
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`no completion for opcode 0x${opcode.toString(16)} on queue ${q.qid}`)
      if (this.options.irqs) {
        await this.options.irqs.wait({ vector, timeoutMs: left })
        this.interrupts++
      } else await new Promise((r) => setImmediate(r))
    }
  }

  /** Writes a doorbell: a store to the mapped BAR0, or a posted REGION_WRITE. */
  async #ring(offset: number, value: number): Promise<void> {
    const map = this.options.doorbells
    if (!map) return this.bar0.write32(offset, value, { posted: true })
    const area = map.areas.find((a) => BigInt(offset) >= a.offset && BigInt(offset) < a.offset + a.size)
    if (!area) throw new Error(`doorbell 0x${offset.toString(16)} is in no mapped area of BAR0`)
    area.buffer.writeUInt32LE(value, offset - Number(area.offset))
  }

  /** Polls `done` (a register) until it holds, within CAP.TO (at least the driver's timeout). */
  async #until(done: () => Promise<boolean>, what: string): Promise<void> {
    const limit = Math.max(this.#timeoutMs, Number((this.cap >> 24n) & 0xffn) * 500)
    const deadline = Date.now() + limit
    while (!(await done())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
      await new Promise((r) => setTimeout(r, 1))
    }
  }
}
