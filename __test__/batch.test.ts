// Many replies in one read: the batches native code hands JavaScript (src/batch.rs), with
// their entries and small payloads in memory shared with the client, the payloads too big to
// share, and the events past the shared words' room, against a scripted peer that answers N
// requests in one write (so they arrive, and are delivered, together). Every reply's payload
// is derived from a nonce its request alone carried: a reply settled on the wrong request, or
// cut from the wrong place of the shared bytes, shows.
import { describe, expect, it } from 'vitest'
import { Command, connect } from '../ts/index'
import { startScriptedPeer } from '../ts/testing'

/** The request `burst:N` answers with `length` bytes, byte i being `(nonce + i) & 0xff`. */
function request(length: number, nonce: number): Buffer {
  const p = Buffer.alloc(8)
  p.writeUInt32LE(length, 0)
  p.writeUInt32LE(nonce, 4)
  return p
}

function expected(length: number, nonce: number): Buffer {
  return Buffer.from(Array.from({ length }, (_, i) => (nonce + i) & 0xff))
}

/** Sends one request per length, all at once, to a peer that answers them in one write. */
async function burst(lengths: number[]) {
  await using server = await startScriptedPeer(`burst:${lengths.length}`)
  const client = await connect(server.socketPath)
  try {
    await client.validateVersion()
    const nonce = (i: number) => (i * 7 + 3) >>> 0
    const replies = await Promise.all(
      lengths.map((length, i) => client.sendWait(Command.DEVICE_GET_INFO, request(length, nonce(i)))),
    )
    const wrong = replies.flatMap((r, i) =>
      r.payload.equals(expected(lengths[i], nonce(i))) && r.flags === 1 && r.fds.length === 0 ? [] : [i],
    )
    expect(wrong).toEqual([])
    return replies
  } finally {
    await client.close()
  }
}

describe('replies delivered many at a time', () => {
  it('1500 small replies in one read: shared entries, shared bytes running out, then the rest', async () => {
    // 40 bytes each: the shared bytes (8 KiB) hold 204 payloads, the shared words 256
    // entries; past those, payloads come as values and then whole events do.
    const replies = await burst(Array.from({ length: 1500 }, () => 40))
    expect(new Set(replies.map((r) => r.id)).size).toBe(1500)
  })

  it('payloads empty, small, at the shared limit, past it and past the copy limit, mixed', async () => {
    const sizes = [0, 1, 16, 2048, 2049, 4096, 70_000, 0, 2048, 3]
    const replies = await burst([...sizes, ...sizes, ...sizes])
    expect(replies.map((r) => r.payload.length)).toEqual([...sizes, ...sizes, ...sizes])
  })

  it('a payload kept by the caller is not overwritten by the next batch', async () => {
    await using server = await startScriptedPeer('burst:2')
    const client = await connect(server.socketPath)
    try {
      await client.validateVersion()
      const first = await Promise.all([1, 2].map((n) => client.sendWait(Command.DEVICE_GET_INFO, request(64, n))))
      const second = await Promise.all([9, 10].map((n) => client.sendWait(Command.DEVICE_GET_INFO, request(64, n))))
      expect(first.map((r, i) => r.payload.equals(expected(64, 1 + i)))).toEqual([true, true])
      expect(second.map((r, i) => r.payload.equals(expected(64, 9 + i)))).toEqual([true, true])
    } finally {
      await client.close()
    }
  })
})
