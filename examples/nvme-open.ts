// What both NVMe examples do first: connect, map one huge page of DMA memory at the driver's
// IOVA, wire MSI-X vectors 0 and 1 (unless polling), map BAR0's doorbells (with --mmap), and
// enable the controller. Disposing of the result undoes it all; so does a failure on the way.
import { allocateDmaMemory, connect } from 'vfio-user'
import { IOVA, MEMORY_SIZE, Nvme } from './nvme-driver'

/** An enabled controller on a connection of its own; `await using` ends it. */
export async function openNvme(socket: string, how: { poll: boolean; mmap: boolean }) {
  const client = await connect(socket)
  // closing the client unwires the interrupts, unmaps BAR0 and forgets the DMA map.
  const memory = allocateDmaMemory(MEMORY_SIZE, { hugePages: true })
  const end = async () => {
    await client.close()
    memory.close()
  }
  try {
    await client.validateVersion()
    await client.dmaMap({ iova: IOVA, size: MEMORY_SIZE, memory })
    const irqs = how.poll ? undefined : await client.enableIrqs(2, { start: 0, count: 2 })
    // SPDK's BAR0 is a file it could shrink: mapped only because we trust this server.
    const doorbells = how.mmap ? await client.mapRegion(0, { allowShrinkable: true }) : undefined
    const nvme = new Nvme(client, memory, { irqs, doorbells })
    await nvme.enablePci()
    await nvme.enable()
    return { nvme, irqs, [Symbol.asyncDispose]: end }
  } catch (e) {
    await end()
    throw e
  }
}
