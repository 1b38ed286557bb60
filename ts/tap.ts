// The tap as an API (the binding's tap.rs, the client crate's relay): a transparent relay
// between a VMM and its device that says what passes. Bytes and fds never enter JavaScript;
// JavaScript sees decoded records, built only while someone listens for them.
import { EventEmitter } from 'node:events'
import { checkInteger, invalidArg, outOfRange, rejecting } from './args'
import { fromNative } from './errors'
import { untilEnd } from './iterate'
import { LoopRef } from './liveness'
import { type NativeTap, native } from './native'

/** One message that passed through the tap, decoded (one NDJSON line of `vfio-user tap --json`). */
export interface TapMessage {
  type: 'message'
  /** The session (one client and its own connection to the server), numbered from 1. */
  session: number
  /** When it passed, in ms since the Unix epoch (fractional). */
  time: number
  /** Who sent it. */
  from: 'client' | 'server'
  id: number
  /** The command's name (`'DMA_MAP'`), or `'command N'` for an unknown one. */
  command: string
  commandNumber: number
  kind: 'request' | 'reply' | 'error'
  /** Payload bytes (the message less its 16-byte header). */
  size: number
  /** Fds that came with it (forwarded with it). */
  fds: number
  /** The decoded fields: region/offset/count, iova/size/flags, index/start/count/action, states, capabilities… */
  fields: Record<string, unknown>
  /** Set when the message said No_reply. */
  noReply?: true
  /** An error reply's errno, and its name. */
  errno?: number
  errnoName?: string
  /** A reply's time since its request passed, in µs. */
  latencyUs?: number
  /** The data it carries (region, DMA or migration data): its length and first bytes as hex. */
  data?: { length: number; head: string }
  /** Why it could not be decoded (it was relayed all the same). */
  undecodable?: string
}

/** A session opened or ended. */
export interface TapSession {
  type: 'open' | 'close'
  session: number
  /** Why it ended, when not by a clean EOF. */
  reason?: string | null
}

/** A client connected and was closed at once: the server could not be reached, or the tap was full. */
export interface TapRefused {
  type: 'refused'
  reason: string
  /** The tap already had as many sessions open as it takes (256); else the server could not be reached. */
  full: boolean
}

/** Anything a tap reports, as its iterator yields it. */
export type TapRecord = TapMessage | TapSession | TapRefused

/** The events of a {@link Tap} and their arguments. */
export interface TapEvents {
  /** A message passed, decoded (only while someone listens for these). */
  message: [message: TapMessage]
  /** A client connected and the tap connected it to the server. */
  open: [event: TapSession]
  /** A session ended (both sockets closed), with why when it failed. */
  close: [event: TapSession]
  /** A client was closed without a session: the server could not be reached, or too many are open. */
  refused: [event: TapRefused]
  /** The tap was closed. */
  end: []
  /** EventEmitter's own: a listener is being added. */
  newListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
  /** EventEmitter's own: a listener was removed. */
  removeListener: [eventName: string | symbol, listener: (...args: unknown[]) => void]
}

/** Records a `for await` over a tap may have waiting before the tap pauses for it. */
const ITERATOR_HIGH_WATER = 1024

/** Options of {@link tap}. */
export interface TapOptions {
  /** The socket path to listen on (it must not exist). */
  listen: string
  /** The server's socket path, connected to once per client. */
  connect: string
  /** Data bytes shown per message (default 16, at most 4096). */
  bytes?: number
  /**
   * How long a session stays open once one of its sides has hung up (its EOF, or its socket
   * closed) while the other neither closes nor moves data, in ms (default 5000): a server that
   * never reads, or keeps its socket after EOF, holds a session (two threads, two fds) no
   * longer than this.
   */
  lingerMs?: number
  /**
   * Describe every message from the first, even while no `'message'` listener or iterator is
   * there (default: only while one is, so a listener added after `tap()` resolves misses what
   * passed before it). `vfio-user tap` sets it.
   */
  everyMessage?: boolean
}

/**
 * A running tap: emits `'message'` ({@link TapMessage}) for each message that passes while a
 * listener (or an iterator) is there, `'open'`/`'close'` per session, `'refused'` for a client
 * whose server could not be reached, and `'end'` once closed. It keeps Node running while
 * open unless {@link Tap.unref} is called.
 */
export class Tap extends EventEmitter<TapEvents> {
  /** Where it listens. */
  readonly listen: string
  /** Where it connects. */
  readonly connect: string
  readonly #native: NativeTap
  #iterators = 0
  /** Describe every message, listened to or not (`everyMessage`). */
  #everyMessage = false
  /** Pauses in force ({@link Tap.pause} and iterators that are behind): records are held natively while any is. */
  #pauses = 0
  #ended = false
  readonly #loop = new LoopRef()
  #closed?: Promise<void>
  /** Resolves `close()` once the end has been delivered. */
  #onEnd?: () => void

  /** @internal Use {@link tap}. */
  constructor(
    t: NativeTap,
    listen: string,
    connect: string,
    feed: (deliver: (lines: string[]) => void) => void,
    everyMessage = false,
  ) {
    super()
    this.#native = t
    this.#everyMessage = everyMessage
    this.listen = listen
    this.connect = connect
    this.#loop.ref()
    feed((lines) => this.#deliver(lines))
    // On at once when a listener comes (it is added right after this event), off once none
    // is left.
    this.on('newListener', (name) => {
      if (name === 'message' && !this.#ended) this.#native.observe(true)
    })
    this.on('removeListener', (name) => {
      if (name === 'message') this.#observe()
    })
  }

  #observe(): void {
    const wanted = this.#everyMessage || this.listenerCount('message') > 0 || this.#iterators > 0
    if (!this.#ended) this.#native.observe(wanted)
  }

  #deliver(lines: string[]): void {
    for (const line of lines) {
      const r = JSON.parse(line) as TapRecord | { type: 'end' }
      switch (r.type) {
        case 'end':
          // The native side's last line: every relay thread has ended, nothing follows.
          this.#ended = true
          this.#loop.unref()
          this.emit('end')
          this.#onEnd?.()
          break
        case 'message':
          this.emit('message', r)
          break
        case 'refused':
          this.emit('refused', r)
          break
        default:
          this.emit(r.type, r)
      }
    }
  }

  /**
   * Stops delivering records until {@link Tap.resume}: they wait natively, and once 4096 do,
   * the relay waits for room, which slows the VMM and its device (as a pipe would) instead of
   * growing memory; nothing is dropped. For a consumer that cannot keep up (`for await` pauses
   * by itself once 1024 records wait for its loop). Pauses count: each needs its resume.
   */
  pause(): void {
    if (this.#pauses++ === 0 && !this.#ended) this.#native.hold(true)
  }

  /** Ends one {@link Tap.pause}: records flow again once none is left. */
  resume(): void {
    if (this.#pauses === 0) return
    if (--this.#pauses === 0 && !this.#ended) this.#native.hold(false)
  }

  /** Relay directions waiting now for records to be taken (the consumer is behind). */
  get stalled(): number {
    return this.#ended ? 0 : this.#native.stalled
  }

  /** Sessions open now. */
  get sessions(): number {
    return this.#ended ? 0 : this.#native.sessions
  }

  /** Keeps Node running while the tap is open (the default). Returns this. */
  ref(): this {
    if (!this.#ended) this.#loop.ref()
    return this
  }

  /** Lets Node exit while the tap is open. Returns this. */
  unref(): this {
    this.#loop.unref()
    return this
  }

  /**
   * Stops listening and ends every session (both sides' sockets shut down, every fd closed);
   * resolves once every relay thread has finished and the events they left are delivered.
   * Idempotent.
   */
  close(): Promise<void> {
    this.#closed ??= new Promise<void>((resolve) => {
      this.#onEnd = resolve
      // Keep Node running until the last records (and the end) have been handed over.
      this.#loop.ref()
      this.#native.close()
    })
    return this.#closed
  }

  /** Same as {@link Tap.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }

  /** Every record from now until the tap is closed (messages, sessions, refusals). */
  async *[Symbol.asyncIterator](): AsyncGenerator<TapRecord> {
    this.#iterators++
    this.#observe()
    try {
      yield* untilEnd<TapRecord>(
        this as unknown as EventEmitter,
        ['message', 'open', 'close', 'refused'],
        () => this.#ended,
        false,
        { high: ITERATOR_HIGH_WATER, pause: () => this.pause(), resume: () => this.resume() },
      )
    } finally {
      this.#iterators--
      this.#observe()
    }
  }
}

/**
 * Starts a tap: listens on `listen`, and for each client that connects, connects to
 * `connect` and relays both ways byte for byte (fds forwarded with the bytes they came
 * with), natively. See {@link Tap} for what it reports.
 * @throws {TypeError|RangeError} (rejection) for bad options.
 * @throws {VfioUserError} (rejection) `'EADDRINUSE'` when `listen` exists, or another errno
 *   of binding it.
 */
export function tap(options: TapOptions): Promise<Tap> {
  return rejecting(async () => {
    if (options === null || typeof options !== 'object') throw invalidArg('options must be an object')
    if (typeof options.listen !== 'string' || typeof options.connect !== 'string') {
      throw invalidArg('listen and connect must be socket paths (strings)')
    }
    if (options.listen.length === 0 || options.connect.length === 0) throw outOfRange('socket paths must not be empty')
    const everyMessage = options.everyMessage ?? false
    if (typeof everyMessage !== 'boolean') throw invalidArg('everyMessage must be a boolean')
    const bytes = checkInteger('bytes', options.bytes ?? 16, 0, 4096)
    const lingerMs =
      options.lingerMs === undefined ? undefined : checkInteger('lingerMs', options.lingerMs, 0, 0xffff_ffff)
    // The callback runs on the event loop, so never before the Tap below is made.
    let deliver: (lines: string[]) => void = () => {}
    const t = native.startTap(options.listen, options.connect, bytes, (lines) => deliver(lines))
    if ('errno' in t) throw fromNative(t, options.listen)
    if (lingerMs !== undefined) t.setLinger(lingerMs)
    // At once, in the call that bound LISTEN: no client has had time to send anything.
    if (everyMessage) t.observe(true)
    return new Tap(
      t,
      options.listen,
      options.connect,
      (d) => {
        deliver = d
      },
      everyMessage,
    )
  })
}
