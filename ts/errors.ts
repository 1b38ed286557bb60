import { constants } from 'node:os'
import { commandName } from './command'
import type { NativeError } from './native'

/**
 * Every failure of a request or of the connection. Like Node's own system errors it has a
 * `code` (`'ETIMEDOUT'`, `'ECONNRESET'`, `'EPROTO'`, or the errno name the server replied
 * with) and a negative `errno`.
 */
export class VfioUserError extends Error {
  /** The errno name, such as `'ETIMEDOUT'`. */
  readonly code: string
  /** The negated errno value, as in Node's system errors (`-110` for ETIMEDOUT). */
  readonly errno: number
  /** The command number the error concerns, when there is one. */
  readonly command?: number
  /** The command's name, when there is one. */
  readonly commandName?: string
  /** The socket path of the connection, when there is one. */
  readonly path?: string

  /** Builds an error; `errno` is the positive value (the property holds it negated). */
  constructor(code: string, errno: number, message: string, command?: number, path?: string) {
    super(message)
    this.name = 'VfioUserError'
    this.code = code
    this.errno = -Math.abs(errno)
    if (command !== undefined) {
      this.command = command
      this.commandName = commandName(command)
    }
    if (path !== undefined) this.path = path
  }
}

/** Turns the binding's error record into a `VfioUserError`. */
export function fromNative(e: NativeError, path?: string): VfioUserError {
  const errno = e.errno || (constants.errno as Record<string, number>)[e.code] || constants.errno.EIO
  // Native messages never name the socket; it is named here, once.
  const where = path === undefined ? '' : ` (${path})`
  return new VfioUserError(e.code, errno, `${e.message}${where}`, e.command ?? undefined, path)
}

/**
 * What a call rejects with when its `signal` aborts, as Node's own APIs do: `name`
 * `'AbortError'`, `code` `'ABORT_ERR'`, and the signal's reason as `cause`.
 */
export class AbortError extends Error {
  /** Always `'ABORT_ERR'`, as Node's. */
  readonly code = 'ABORT_ERR'

  /** Builds one whose `cause` is `reason` (the signal's). */
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'AbortError'
  }
}

/** The error for a call that `signal` aborted. */
export function aborted(signal: AbortSignal): AbortError {
  return new AbortError(undefined, { cause: signal.reason })
}
