import { invalidArg } from './args'
import { fromNative } from './errors'
import { type NativeCapabilities, native } from './native'

/** Legacy migration v1 parameters. */
export interface MigrationCapability {
  /** Dirty-page granularity in bytes. */
  pgsize: number
  /** Largest dirty bitmap in bytes (default 256 MiB). */
  maxBitmapSize: number
}

/** The `twin_socket` capability. */
export interface TwinSocketCapability {
  supported: boolean
  /** Index of the passed socket in the VERSION reply's fds. */
  fdIndex?: number
}

/** One side's capabilities, with spec defaults filled in for anything absent. */
export interface Capabilities {
  /** Most fds the peer accepts in one message (spec default 1). */
  maxMsgFds: number
  /** Largest data count the peer accepts in one READ/WRITE (default 1 MiB). */
  maxDataXferSize: number
  /** Most DMA windows at once (default 65535). */
  maxDmaMaps: number
  /** Bitmask of supported DMA page sizes (default 4096). */
  pgsizes: number
  /** Present when the peer sent the legacy `migration` object. */
  migration?: MigrationCapability
  /** The peer accepts REGION_WRITE_MULTI. */
  writeMultiple: boolean
  /** Present when the peer sent `twin_socket`. */
  twinSocket?: TwinSocketCapability
}

/** Capabilities plus what was accepted but is worth telling (unknown keys, clamped values). */
export interface ParsedCapabilities {
  capabilities: Capabilities
  warnings: string[]
}

/** Converts the binding's record to the public shape (drops absent optional fields). */
export function toCapabilities(c: NativeCapabilities): Capabilities {
  const out: Capabilities = {
    maxMsgFds: c.maxMsgFds,
    maxDataXferSize: c.maxDataXferSize,
    maxDmaMaps: c.maxDmaMaps,
    pgsizes: c.pgsizes,
    writeMultiple: c.writeMultiple,
  }
  if (c.migration) out.migration = { pgsize: c.migration.pgsize, maxBitmapSize: c.migration.maxBitmapSize }
  if (c.twinSocket) {
    out.twinSocket = { supported: c.twinSocket.supported }
    if (c.twinSocket.fdIndex != null) out.twinSocket.fdIndex = c.twinSocket.fdIndex
  }
  return out
}

/**
 * Parses a vfio-user capability JSON text (without the NUL) with the same rules as a VERSION
 * reply: known capabilities are type- and range-checked, absent ones take the spec defaults,
 * unknown ones are listed in `warnings`.
 * @throws {TypeError} if `json` is not a string.
 * @throws {VfioUserError} with code `'EPROTO'` naming what is wrong.
 */
export function parseCapabilities(json: string): ParsedCapabilities {
  if (typeof json !== 'string') throw invalidArg(`json must be a string, got ${typeof json}`)
  const r = native.parseCapabilities(json)
  if (r.error || !r.capabilities) {
    throw fromNative(r.error ?? { errno: 0, code: 'EPROTO', message: 'capabilities missing' })
  }
  return { capabilities: toCapabilities(r.capabilities), warnings: r.warnings }
}
