// Posted writes coalesced into REGION_WRITE_MULTI, against the migration device, which
// offers `write_multiple` (or not, with --no-write-multiple) and counts what it received.
import { afterEach, describe, expect, it } from 'vitest'
import { connect, type VfioUserClient } from '../ts/index'
import { startMigrationDevice, type TestDevice } from '../ts/testing'

const CTRL = 1
const SCRATCH = 0x100

const opened: Array<{ device: TestDevice; client: VfioUserClient }> = []
afterEach(async () => {
  for (const r of opened.splice(0)) {
    await r.client.close()
    await r.device.close()
  }
})

async function start(writeMultiple: boolean): Promise<VfioUserClient> {
  const device = await startMigrationDevice({ writeMultiple })
  const client = await connect(device.socketPath)
  const v = await client.validateVersion()
  expect(v.capabilities.writeMultiple).toBe(writeMultiple)
  opened.push({ device, client })
  return client
}

/** What the device received: REGION_WRITE messages, REGION_WRITE_MULTI messages, entries. */
async function received(c: VfioUserClient): Promise<{ writes: number; multi: number; entries: number }> {
  const b = await c.regionRead(CTRL, 0x28, 24)
  return {
    writes: Number(b.readBigUInt64LE(0)),
    multi: Number(b.readBigUInt64LE(8)),
    entries: Number(b.readBigUInt64LE(16)),
  }
}

/**
 * A fresh job on the event loop: code that runs as a promise reaction to a reply runs while
 * the loop hands over its batch of replies, when sends are corked anyway.
 */
const freshJob = () => new Promise<void>((resolve) => setImmediate(resolve))

const word = (v: number) => {
  const b = Buffer.alloc(4)
  b.writeUInt32LE(v)
  return b
}

describe('REGION_WRITE_MULTI', () => {
  it('posted writes made in one go travel 200 to a message, in order', async () => {
    const c = await start(true)
    await freshJob()
    const writes: Array<Promise<void>> = []
    // 1000 writes over 250 words: each word is written 4 times, the last value must win.
    for (let i = 0; i < 1000; i++) writes.push(c.regionWrite(CTRL, SCRATCH + 4 * (i % 250), word(i), { posted: true }))
    await Promise.all(writes)
    // Every write arrived once, as a REGION_WRITE (the first of the job goes at once) or as an
    // entry of a REGION_WRITE_MULTI, at most 200 to a message. How many went each way depends
    // on when the socket took them, not on the test's timing, so only the sums are exact.
    const got = await received(c)
    expect(got.writes + got.entries).toBe(1000)
    expect(got.entries).toBeGreaterThan(0)
    expect(got.multi).toBeGreaterThanOrEqual(Math.ceil(got.entries / 200))
    expect(got.multi).toBeLessThanOrEqual(got.entries)
    const back = await c.regionRead(CTRL, SCRATCH, 1000)
    for (let w = 0; w < 250; w++) expect(back.readUInt32LE(4 * w)).toBe(750 + w)
  })

  it('another request between posted writes keeps its place: the writes after it start a new message', async () => {
    const c = await start(true)
    await freshJob()
    void c.regionWrite(CTRL, SCRATCH, word(1), { posted: true })
    void c.regionWrite(CTRL, SCRATCH + 4, word(2), { posted: true })
    const read = c.regionRead(CTRL, SCRATCH, 8)
    void c.regionWrite(CTRL, SCRATCH, word(3), { posted: true })
    // The read saw the first two writes and not the third.
    const seen = await read
    expect([seen.readUInt32LE(0), seen.readUInt32LE(4)]).toEqual([1, 2])
    expect((await c.regionRead(CTRL, SCRATCH, 4)).readUInt32LE(0)).toBe(3)
    // Each write arrived once (the values above show the order held across the read).
    const got = await received(c)
    expect(got.writes + got.entries).toBe(3)
    expect(got.multi).toBeLessThanOrEqual(got.entries)
  })

  it('a write nothing waits behind goes at once, as REGION_WRITE; larger ones never coalesce', async () => {
    const c = await start(true)
    await freshJob()
    for (let i = 0; i < 10; i++) await c.regionWrite(CTRL, SCRATCH, word(i), { posted: true })
    await c.regionWrite(CTRL, SCRATCH, Buffer.alloc(16, 7), { posted: true })
    await c.regionWrite(CTRL, SCRATCH + 16, Buffer.alloc(9, 8), { posted: true })
    // Each write is the first of its job: it goes out at once, as REGION_WRITE.
    expect(await received(c)).toEqual({ writes: 12, multi: 0, entries: 0 })
    expect(
      (await c.regionRead(CTRL, SCRATCH, 25)).equals(Buffer.concat([Buffer.alloc(16, 7), Buffer.alloc(9, 8)])),
    ).toBe(true)
  })

  it('a server that did not offer write_multiple gets REGION_WRITE only', async () => {
    const c = await start(false)
    const writes: Array<Promise<void>> = []
    for (let i = 0; i < 300; i++) writes.push(c.regionWrite(CTRL, SCRATCH + 4 * i, word(i), { posted: true }))
    await Promise.all(writes)
    expect(await received(c)).toEqual({ writes: 300, multi: 0, entries: 0 })
    expect((await c.regionRead(CTRL, SCRATCH + 4 * 299, 4)).readUInt32LE(0)).toBe(299)
  })

  it('a long burst is not held whole by the cork: 100000 posted writes in one job all arrive', async () => {
    const c = await start(true)
    await freshJob()
    for (let i = 0; i < 100_000; i++) void c.regionWrite(CTRL, SCRATCH + 4 * (i % 900), word(i), { posted: true })
    const counts = await received(c)
    expect(counts).toMatchObject({ writes: 1, entries: 99_999 })
    // At most 200 a message; a message the socket took in part is closed to new entries.
    expect(counts.multi).toBeGreaterThanOrEqual(500)
    expect(counts.multi).toBeLessThan(99_999)
    expect((await c.regionRead(CTRL, SCRATCH + 4 * (99_999 % 900), 4)).readUInt32LE(0)).toBe(99_999)
  })
})
