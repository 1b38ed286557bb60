// One attack of vfio-user-hostile-peer (or on memory past one Buffer) played in a process of
// its own: each of them once killed Node (SIGBUS, SIGSEGV, heap corruption). The parent test
// runs it with --expose-gc and asserts the exit code is 0 and what is printed on stdout: one
// JSON object of what was seen, fd counts before and after included.
//
// node --expose-gc __test__/hostile-child.mjs SCENARIO [SOCKET] [FILE]
import { closeSync, ftruncateSync, openSync, readdirSync } from 'node:fs'
import { setImmediate as turn } from 'node:timers/promises'
import { allocateDmaMemory, Command, connect, dmaMemoryFromFd } from '../dist/index.js'

const [scenario, socket, file] = process.argv.slice(2)
const fds = () => readdirSync('/proc/self/fd').length
const getInfo = () => {
  const p = Buffer.alloc(16)
  p.writeUInt32LE(16, 0)
  return p
}
/** The error's code and message, or 'resolved'. */
const outcome = (f) => {
  try {
    f()
    return 'resolved'
  } catch (e) {
    return e.code ?? String(e)
  }
}
const settled = (p) =>
  p.then(
    () => 'resolved',
    (e) => e.code ?? String(e),
  )
/** Collects garbage over a few turns: finalizers of external buffers run then. */
async function collect() {
  for (let i = 0; i < 5; i++) {
    globalThis.gc()
    await turn()
  }
}
/** The 16-byte report shrink-dma answers a request with. */
async function report(client) {
  const r = (await client.sendWait(Command.DEVICE_GET_INFO, getInfo())).payload
  return {
    truncate: r.readUInt32LE(0),
    write: r.readUInt32LE(4),
    read: r.readUInt32LE(8),
    data: r.toString('latin1', 12, 16),
  }
}

const before = fds()
const seen = {}
switch (scenario) {
  case 'dma-sealed': {
    const client = await connect(socket)
    await client.validateVersion()
    const memory = allocateDmaMemory(4096)
    await client.dmaMap({ iova: 0x10000n, size: 4096, memory })
    seen.report = await report(client)
    seen.buffer = memory.buffer.toString('latin1', 0, 4)
    await client.close()
    memory.close()
    break
  }
  case 'dma-shrinkable': {
    const fd = openSync(file, 'w+')
    ftruncateSync(fd, 4096)
    seen.refused = outcome(() => dmaMemoryFromFd(fd, { size: 4096 }))
    const memory = dmaMemoryFromFd(fd, { size: 4096, allowShrinkable: true })
    closeSync(fd)
    const client = await connect(socket)
    await client.validateVersion()
    await client.dmaMap({ iova: 0x10000n, size: 4096, memory })
    // The server truncates the file, then asks for DMA into it: refused, not a crash.
    seen.report = await report(client)
    // A read into the memory from here is refused too, and the connection ends cleanly.
    const into = memory.window(0, 4)
    seen.readInto = await settled(client.regionRead(0, 0, 4, { into }))
    await client.close()
    memory.close()
    break
  }
  case 'regions': {
    const client = await connect(socket)
    await client.validateVersion()
    seen.empty = await settled(client.mapRegion(0))
    seen.unsealed = await settled(client.mapRegion(1))
    const accepted = await client.mapRegion(1, { allowShrinkable: true })
    seen.accepted = accepted.areas[0].buffer.length
    accepted.unmap()
    const big = await client.mapRegion(2)
    seen.bigSize = String(big.areas[0].size)
    seen.bigBuffer = outcome(() => big.areas[0].buffer)
    const w = big.window(2 ** 32, 4096)
    seen.bigByte = w[5]
    seen.bigTooLong = outcome(() => big.window(0, 2 ** 32 + 1))
    seen.bigPastEnd = outcome(() => big.window(8 * 2 ** 30 - 2, 4))
    big.unmap()
    seen.afterUnmap = w.length
    const sealed = await client.mapRegion(3)
    seen.sealed = sealed.areas[0].buffer.length
    await client.close()
    seen.closedLength = sealed.areas[0].buffer.length
    break
  }
  case 'big-memory': {
    for (const size of [2 ** 32 + 4096, 2 ** 33]) {
      const memory = allocateDmaMemory(size)
      const w = memory.window(2 ** 32 - 2, 8)
      w.write('past4GiB')
      const again = memory.window(2 ** 32, 6)
      seen[size] = {
        buffer: outcome(() => memory.buffer),
        across: again.toString('latin1'),
        tooLong: outcome(() => memory.window(0, 2 ** 32 + 1)),
      }
      memory.close()
      seen[size].closed = w.length
      await collect()
    }
    try {
      const huge = allocateDmaMemory(2 ** 46)
      seen.huge = outcome(() => huge.buffer)
      huge.close()
    } catch (e) {
      seen.huge = e.code
    }
    const fd = openSync(file, 'w+')
    ftruncateSync(fd, 8 * 2 ** 30)
    const fromFd = dmaMemoryFromFd(fd, { size: 8 * 2 ** 30, allowShrinkable: true })
    closeSync(fd)
    seen.fromFd = outcome(() => fromFd.buffer)
    fromFd.window(8 * 2 ** 30 - 4096, 4096).write('end')
    fromFd.close()
    break
  }
  case 'fds': {
    const client = await connect(socket)
    await client.validateVersion()
    const closed = new Promise((done) => client.once('close', (e) => done(e?.code)))
    seen.call = await settled(client.sendWait(Command.DEVICE_GET_INFO, getInfo()))
    seen.close = await closed
    await client.close()
    break
  }
  default:
    throw new Error(`unknown scenario ${scenario}`)
}
await collect()
seen.fds = { before, after: fds() }
process.stdout.write(`${JSON.stringify(seen)}\n`)
