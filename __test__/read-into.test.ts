// Region reads into the caller's memory (`{ into }`), and large reads, which land straight in
// the Buffer they return, against the real rust-vmm server (crates/test-device, BAR2: 1 MiB).
import { describe, expect, it } from 'vitest'
import { refusedArg, rejection } from './rejection'
import { deviceSession } from './session'

const session = deviceSession()
const MIB = 1 << 20
const BAR2 = 2

/** Fills BAR2 with a pattern (byte i is i * 7 mod 256) and returns it. */
async function fillBar2(): Promise<Buffer> {
  const pattern = Buffer.alloc(MIB)
  for (let i = 0; i < MIB; i++) pattern[i] = (i * 7) & 0xff
  await session.client.regionWrite(BAR2, 0, pattern)
  return pattern
}

describe('regionRead into memory', () => {
  it('lands in the memory given, async and sync, and returns a Buffer over it', async () => {
    const pattern = await fillBar2()
    const memory = Buffer.alloc(300 << 10, 0xee)
    const got = await session.client.regionRead(BAR2, 4096, 256 << 10, { into: memory })
    expect(got.buffer).toBe(memory.buffer)
    expect(got.byteOffset).toBe(memory.byteOffset)
    expect(got.length).toBe(256 << 10)
    expect(got.equals(pattern.subarray(4096, 4096 + (256 << 10)))).toBe(true)
    // Nothing past `length` is touched.
    expect(memory.subarray(256 << 10).every((b) => b === 0xee)).toBe(true)

    // A plain Uint8Array view at an offset of its ArrayBuffer, blocking.
    const backing = new Uint8Array(64 + MIB).fill(0xee)
    const view = backing.subarray(64)
    const sync = session.client.regionReadSync(BAR2, 0, MIB, { into: view })
    expect(sync.buffer).toBe(backing.buffer)
    expect(sync.byteOffset).toBe(64)
    expect(sync.equals(pattern)).toBe(true)
    expect(backing.subarray(0, 64).every((b) => b === 0xee)).toBe(true)

    // Small reads into memory too.
    const small = Buffer.alloc(8)
    expect(await session.client.regionRead(BAR2, 8, 8, { into: small })).toEqual(pattern.subarray(8, 16))
    expect(small).toEqual(pattern.subarray(8, 16))
  })

  it('large reads without into agree with small ones, and each gets a Buffer of its own', async () => {
    const pattern = await fillBar2()
    const pieces = await Promise.all(
      Array.from({ length: 16 }, (_, i) => session.client.regionRead(BAR2, i * (MIB / 16), MIB / 16)),
    )
    expect(Buffer.concat(pieces).equals(pattern)).toBe(true)
    const [a, b] = await Promise.all([session.client.regionRead(BAR2, 0, MIB), session.client.regionRead(BAR2, 0, MIB)])
    expect(a.equals(pattern) && b.equals(pattern)).toBe(true)
    expect(a.buffer).not.toBe(b.buffer)
    expect(session.client.regionReadSync(BAR2, 0, MIB).equals(pattern)).toBe(true)
  })

  it('many reads into one Buffer, pipelined and one after another, keep the connection in step', async () => {
    const pattern = await fillBar2()
    const memory = Buffer.alloc(MIB)
    for (let round = 0; round < 50; round++) {
      const at = (round * 4096) % (MIB / 2)
      const got = await session.client.regionRead(BAR2, at, MIB / 2, { into: memory })
      expect(got.equals(pattern.subarray(at, at + MIB / 2))).toBe(true)
    }
    // Eight in flight, each into its own eighth.
    await Promise.all(
      Array.from({ length: 8 }, (_, i) =>
        session.client.regionRead(BAR2, i * (MIB / 8), MIB / 8, { into: memory.subarray(i * (MIB / 8)) }),
      ),
    )
    expect(memory.equals(pattern)).toBe(true)
    expect(session.client.inFlight).toBe(0)
  })

  it('refuses bad memory before anything is sent', async () => {
    const c = session.client
    const call =
      (into: unknown, length = 16) =>
      () =>
        c.regionRead(BAR2, 0, length, { into } as { into: Uint8Array })
    await refusedArg(call('not memory'), TypeError)
    await refusedArg(call(null), TypeError)
    await refusedArg(call([1, 2, 3]), TypeError)
    await refusedArg(call(Buffer.alloc(8)), RangeError)
    expect(() => c.regionReadSync(BAR2, 0, 16, { into: new Uint8Array(15) })).toThrow(RangeError)
    const gone = new ArrayBuffer(32)
    const view = new Uint8Array(gone)
    structuredClone(gone, { transfer: [gone] })
    // Node 20 cannot tell a detached view from an empty one: either way it is refused.
    await refusedArg(call(view), Error, /detached|fewer than the 16/)
    expect(c.inFlight).toBe(0)
    expect((await c.regionRead(BAR2, 0, 4)).length).toBe(4)
  })

  it('an aborted read rejects at once; the connection goes on', async () => {
    const pattern = await fillBar2()
    const memory = Buffer.alloc(MIB)
    const abort = new AbortController()
    const read = session.client.regionRead(BAR2, 0, MIB, { into: memory, signal: abort.signal })
    abort.abort()
    await expect(read).rejects.toMatchObject({ name: 'AbortError' })
    // Once it has rejected, nothing more lands in its memory: the pieces still in flight are
    // read and dropped. A read into other memory comes after all of them on the socket.
    const snapshot = Buffer.from(memory)
    const other = Buffer.alloc(MIB)
    const again = await session.client.regionRead(BAR2, 0, MIB, { into: other })
    expect(again.equals(pattern)).toBe(true)
    expect(memory.equals(snapshot)).toBe(true)
  })

  it('a read past the region fails typed and leaves the memory as it was', async () => {
    const memory = Buffer.alloc(8192, 0xee)
    const e = await rejection(session.client.regionRead(BAR2, MIB - 4096, 8192, { into: memory }))
    expect(e).toMatchObject({ code: 'EIO', commandName: 'REGION_READ' })
    expect(memory.every((b) => b === 0xee)).toBe(true)
    expect((await session.client.regionRead(BAR2, 0, 4)).length).toBe(4)
  })
})
