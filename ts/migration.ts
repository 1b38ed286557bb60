// The device-state stream (MIG_DATA_READ / MIG_DATA_WRITE, protocol.md 3.13) as Node streams.
// The bytes are the proto crate's migration.rs; this shapes them into a Readable and a
// Writable with backpressure, sized reads, abort and typed errors.
import { Readable, Writable } from 'node:stream'
import { checkTimeout, invalidArg, outOfRange } from './args'
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { VfioUserError } from './errors'
import { native } from './native'

/** Options of {@link saveState} and {@link loadState}. */
export interface StateStreamOptions extends CallOptions {
  /** Most bytes one MIG_DATA message moves (default and ceiling: the server's `maxDataXferSize`). */
  chunkSize?: number
}

/** The chunk size for `options` (checked with the rest of them, before anything is sent). */
function chunk(ch: Channel, options: StateStreamOptions): number {
  checkTimeout('timeoutMs', options.timeoutMs)
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw invalidArg('signal must be an AbortSignal')
  }
  const max = ch.maxDataXferSize()
  const asked = options.chunkSize ?? max
  if (!Number.isInteger(asked) || asked < 1) throw outOfRange(`chunkSize must be a positive integer, got ${asked}`)
  return Math.min(asked, max, 0xffff_fff0)
}

/**
 * The device's state as a Readable: MIG_DATA_READ in chunks, each read when the consumer wants
 * more (backpressure); it ends when a read returns less than asked. Valid in PRE_COPY and
 * STOP_COPY. A server error mid-stream destroys it with that `VfioUserError`; an aborted
 * `signal` destroys it with an AbortError.
 */
export function saveState(ch: Channel, options: StateStreamOptions = {}): Readable {
  const size = chunk(ch, options)
  const { signal, timeoutMs } = options
  const stream = new Readable({
    highWaterMark: size,
    read() {
      ch.send(Command.MIG_DATA_READ, native.migDataReadRequest(size), { timeoutMs }).then(
        (reply) => {
          const range = native.migDataReadData(reply.payload, size)
          if ('errno' in range) {
            stream.destroy(ch.error(range))
            return
          }
          const data = reply.payload.subarray(range.start, range.end)
          if (data.length > 0) stream.push(data)
          if (data.length < size) stream.push(null)
        },
        (e: unknown) => stream.destroy(e as Error),
      )
    },
    signal,
  })
  return stream
}

/** What {@link pumpState} moved. */
export interface Pumped {
  /** Bytes of device state moved. */
  bytes: number
  /** The source's stream ended (a short read): the round, or the whole state, is through. */
  ended: boolean
}

/**
 * Moves `source`'s device-state stream into `dest`'s natively (the binding's pump): each
 * MIG_DATA_READ reply is sent on as a MIG_DATA_WRITE request with no copy, never entering
 * JavaScript. Stops when the stream ends or once `limit` bytes (default: no limit) moved, and
 * resolves when every write is acknowledged. `source` must be in PRE_COPY or STOP_COPY, `dest`
 * in RESUMING.
 */
export async function pumpState(
  source: Channel,
  dest: Channel,
  options: StateStreamOptions & { limit?: number } = {},
): Promise<Pumped> {
  const size = Math.min(chunk(source, options), dest.maxDataXferSize())
  const { limit = 0, timeoutMs } = options
  const reply = await source
    .call(
      Command.MIG_DATA_READ,
      (token) => source.native.pumpStateTo(token, dest.native, size, limit, timeoutMs),
      options,
    )
    .catch((e: unknown) => {
      throw blamed(e, dest)
    })
  return native.decodePumped(reply.payload)
}

/**
 * The pump's failure, naming the side that failed: it settles on the source's connection, but a
 * MIG_DATA_WRITE the destination refused, or failed, is the destination's.
 */
function blamed(e: unknown, dest: Channel): unknown {
  if (!(e instanceof VfioUserError) || e.command !== Command.MIG_DATA_WRITE) return e
  const own = e.path === undefined ? e.message : e.message.replace(` (${e.path})`, '')
  return dest.error({ errno: Math.abs(e.errno), code: e.code, message: own, command: e.command })
}

/** MIG_DATA_WRITE messages a {@link loadState} keeps in flight. */
const WRITES_IN_FLIGHT = 4

/**
 * A Writable that loads the device's state with MIG_DATA_WRITE (valid in RESUMING), each
 * chunk split to the server's `maxDataXferSize`. Up to four messages are in flight (the
 * socket keeps them in order); a chunk is taken once fewer are (backpressure), and the stream
 * finishes when every one is acknowledged. A server error fails the stream with that
 * `VfioUserError`.
 */
export function loadState(ch: Channel, options: StateStreamOptions = {}): Writable {
  const size = chunk(ch, options)
  const { signal, timeoutMs } = options
  const inFlight = new Set<Promise<unknown>>()
  let failure: Error | undefined
  /** Calls `done` once fewer than `limit` writes are in flight, or with the first failure. */
  const settle = async (limit: number, done: (e?: Error | null) => void) => {
    while (!failure && inFlight.size >= limit) await Promise.race(inFlight)
    done(failure ?? null)
  }
  const stream: Writable = new Writable({
    highWaterMark: size,
    write(data: Buffer, _encoding, done) {
      const stopped = () => failure !== undefined || stream.destroyed || signal?.aborted === true
      void (async () => {
        for (let at = 0; at < data.length; at += size) {
          // Never more than WRITES_IN_FLIGHT, however large the chunk.
          while (!stopped() && inFlight.size >= WRITES_IN_FLIGHT) await Promise.race(inFlight)
          if (stopped()) break
          const p: Promise<unknown> = ch
            .send(Command.MIG_DATA_WRITE, native.migDataWriteRequest(data.subarray(at, at + size)), { timeoutMs })
            .then(
              () => inFlight.delete(p),
              (e: unknown) => {
                inFlight.delete(p)
                failure ??= e as Error
              },
            )
          inFlight.add(p)
        }
        await settle(WRITES_IN_FLIGHT, done)
      })().catch((e: unknown) => {
        // Thrown before a write went out: the stream fails with it, once.
        failure ??= e as Error
        done(failure)
      })
    },
    final(done) {
      void settle(1, done)
    },
    signal,
  })
  return stream
}
