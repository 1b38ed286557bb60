// Per-request tracing through `node:diagnostics_channel`: a message as each request is handed
// to the native side to be sent, and one as it settles (a request refused there settles at
// once, with the error; one aborted before that publishes nothing). Posted requests publish
// only once accepted, and never settle. Nothing is built unless someone subscribes, so the
// requests of a client nobody traces pay two property reads each. A subscriber that throws
// does not disturb the client: diagnostics_channel rethrows on the next tick, as an uncaught
// exception.
import diagnosticsChannel from 'node:diagnostics_channel'
import { commandName } from './command'
import type { Reply } from './reply'

/** What `vfio-user:request` publishes as a request is sent. */
export interface RequestMessage {
  /** The connection's socket path. */
  path: string
  command: number
  commandName: string
  /** A posted request (`No_reply`): no `vfio-user:settle` message follows. */
  posted: boolean
}

/** What `vfio-user:settle` publishes as a request settles. */
export interface SettleMessage {
  path: string
  command: number
  commandName: string
  /** From the request being sent to it settling. */
  durationMs: number
  /**
   * The reply, for a call answered by one reply: `sendWait`, `sendWaitSync`, and the async
   * typed calls made of one request. Blocking typed calls and split transfers report none.
   */
  reply?: Reply
  /** The failure, when it failed. */
  error?: unknown
}

/** Published once per request as it is sent (also for posted requests). */
export const requestChannel: diagnosticsChannel.Channel = diagnosticsChannel.channel('vfio-user:request')
/** Published once per request (not posted) as it settles: resolved, rejected or aborted. */
export const settleChannel: diagnosticsChannel.Channel = diagnosticsChannel.channel('vfio-user:settle')

/** Ends one traced request. */
export type TraceEnd = (reply: Reply | undefined, error?: unknown) => void

/**
 * Publishes that `command` is being sent on `path`, and returns what publishes its end; or
 * undefined, at the cost of two property reads, when nobody listens.
 */
export function traceStart(path: string, command: number, posted = false): TraceEnd | undefined {
  if (!requestChannel.hasSubscribers && !settleChannel.hasSubscribers) return undefined
  const name = commandName(command)
  if (requestChannel.hasSubscribers) {
    requestChannel.publish({ path, command, commandName: name, posted } satisfies RequestMessage)
  }
  const start = performance.now()
  return (reply, error) => {
    if (!settleChannel.hasSubscribers) return
    const message: SettleMessage = { path, command, commandName: name, durationMs: performance.now() - start }
    if (reply !== undefined) message.reply = reply
    if (error !== undefined) message.error = error
    settleChannel.publish(message)
  }
}

/** Runs a blocking call traced as `command`: its result, or its error rethrown. */
export function traceSync<T>(path: string, command: number, call: () => T): T {
  const end = traceStart(path, command)
  if (!end) return call()
  try {
    const r = call()
    end(undefined)
    return r
  } catch (e) {
    end(undefined, e)
    throw e
  }
}
