// DEVICE_FEATURE and the migration v2 state machine as typed calls (protocol.md 3.12). The
// bytes and the paths between states are the proto crate's feature.rs; this shapes the calls.
import { checkInteger, checkOffset, invalidArg, outOfRange } from './args'
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { VfioUserError } from './errors'
import { native } from './native'

const GET = 1 << 16
const SET = 1 << 17
const PROBE = 1 << 18
const MIGRATION = 1
const MIG_DEVICE_STATE = 2

/** Migration v2 device states, by name. */
export type MigrationState = 'error' | 'stop' | 'running' | 'stopCopy' | 'resuming' | 'preCopy'

const STATES: Record<MigrationState, number> = { error: 0, stop: 1, running: 2, stopCopy: 3, resuming: 4, preCopy: 6 }
const NAMES = new Map<number, MigrationState>(Object.entries(STATES).map(([k, v]) => [v, k as MigrationState]))

/** What the MIGRATION feature reports. */
export interface MigrationFlags {
  stopCopy: boolean
  p2p: boolean
  preCopy: boolean
  /** The raw flags. */
  flags: number
}

/** A state reported by the device that has no name here (a P2P state). */
function nameOf(state: number): MigrationState {
  const name = NAMES.get(state)
  if (!name)
    throw new VfioUserError(
      'EPROTO',
      71,
      `the device reports migration state ${state}, which is not used`,
      Command.DEVICE_FEATURE,
    )
  return name
}

/**
 * True for the server refusing a feature (an error reply), false for anything that says
 * nothing about the feature: a broken reply, a timeout, the connection ending.
 */
function isRefusal(e: unknown): e is VfioUserError {
  return e instanceof VfioUserError && e.code !== 'EPROTO' && e.code !== 'ETIMEDOUT' && !e.code.startsWith('ECONN')
}

/** Sends DEVICE_FEATURE and returns the reply's data. */
async function feature(
  ch: Channel,
  index: number,
  ops: number,
  data: Uint8Array,
  options: CallOptions,
  argsz = 64,
): Promise<Buffer> {
  const request = native.featureRequest(index, ops, argsz, Buffer.from(data))
  if ('errno' in request) throw outOfRange(request.message)
  const reply = await ch.send(Command.DEVICE_FEATURE, request, options)
  const d = native.featureReplyData(reply.payload, index | ops)
  if ('errno' in d) throw ch.error(d)
  return d
}

/**
 * PROBE of feature `index` for the methods asked: true when the device supports every one,
 * false when it refuses. GET and SET may be probed together.
 */
export function probeFeature(
  ch: Channel,
  index: number,
  methods: { get?: boolean; set?: boolean },
  options: CallOptions = {},
): Promise<boolean> {
  checkInteger('index', index, 0, 0xffff)
  const ops = PROBE | (methods.get ? GET : 0) | (methods.set ? SET : 0)
  return feature(ch, index, ops, new Uint8Array(0), options).then(
    () => true,
    (e: unknown) => {
      if (isRefusal(e)) return false
      throw e
    },
  )
}

/**
 * The MIGRATION feature's flags.
 * @throws {VfioUserError} `'ENOTSUP'` when the device has no migration.
 */
export async function migrationFlags(ch: Channel, options: CallOptions = {}): Promise<MigrationFlags> {
  const data = await migrationFeature(ch, MIGRATION, options)
  const flags = native.decodeMigrationFlags(data)
  if (typeof flags !== 'number') throw ch.error(flags)
  return { stopCopy: (flags & 1) !== 0, p2p: (flags & 2) !== 0, preCopy: (flags & 4) !== 0, flags }
}

/**
 * GET of a migration feature; a device that refuses it has no migration: `'ENOTSUP'`, whatever
 * errno it refused with (rust-vmm's server says 0, read as `'EIO'`).
 */
async function migrationFeature(ch: Channel, index: number, options: CallOptions): Promise<Buffer> {
  try {
    return await feature(ch, index, GET, new Uint8Array(0), options)
  } catch (e) {
    if (isRefusal(e)) {
      const message = `the device has no migration (${e.code})`
      throw ch.error({ errno: 95, code: 'ENOTSUP', message, command: Command.DEVICE_FEATURE })
    }
    throw e
  }
}

/**
 * The device's migration state (MIG_DEVICE_STATE, GET).
 * @throws {VfioUserError} `'ENOTSUP'` when the device has no migration.
 */
export async function migrationState(ch: Channel, options: CallOptions = {}): Promise<MigrationState> {
  const data = await migrationFeature(ch, MIG_DEVICE_STATE, options)
  const s = native.decodeDeviceState(data)
  if (typeof s !== 'number') throw ch.error(s)
  return nameOf(s)
}

/**
 * Moves the device to `target` along the shortest path of direct arcs that passes through no
 * saving state, checking after each step that the device is where it was asked to go.
 * @throws {RangeError} for a transition that is not allowed (leaving `'error'` but by reset,
 *   `'stopCopy'` to `'preCopy'`), before anything is set.
 * @throws {VfioUserError} `'EPROTO'` when the device lands elsewhere; its `state` says where.
 */
export async function setMigrationState(
  ch: Channel,
  target: MigrationState,
  options: CallOptions = {},
): Promise<MigrationState> {
  if (!(target in STATES)) throw invalidArg(`unknown migration state ${String(target)}`)
  const from = await migrationState(ch, options)
  const path = native.migrationPath(STATES[from], STATES[target])
  if (!Array.isArray(path)) throw outOfRange(`${from} to ${target}: ${path.message}`)
  for (const step of path) {
    await feature(ch, MIG_DEVICE_STATE, SET, native.deviceStateData(step), options)
    const now = await migrationState(ch, options)
    if (STATES[now] !== step) {
      const e = new VfioUserError(
        'EPROTO',
        71,
        `asked for ${nameOf(step)}, the device is in ${now}`,
        Command.DEVICE_FEATURE,
      )
      throw Object.assign(e, { state: now })
    }
  }
  return target
}

const DMA_LOGGING_START = 6
const DMA_LOGGING_STOP = 7
const DMA_LOGGING_REPORT = 8

function checkPage(pageSize: unknown): bigint {
  const p = checkOffset('pageSize', pageSize).value
  if (p === 0n || (p & (p - 1n)) !== 0n) throw outOfRange(`pageSize must be a power of two, got ${p}`)
  return p
}

/**
 * Starts dirty-page tracking of `ranges` (none: everything mapped) in pages of `pageSize`;
 * resolves with the page size the device settled on (it may choose another).
 */
export async function startDirtyLogging(
  ch: Channel,
  options: CallOptions & {
    pageSize: number | bigint
    ranges?: Array<{ iova: number | bigint; length: number | bigint }>
  },
): Promise<{ pageSize: bigint }> {
  const page = checkPage(options.pageSize)
  const ranges = (options.ranges ?? []).flatMap((r) => [
    checkOffset('iova', r.iova).value,
    checkOffset('length', r.length).value,
  ])
  const data = await feature(
    ch,
    DMA_LOGGING_START,
    SET,
    native.loggingStartData(page, ranges),
    options,
    64 + 8 * ranges.length,
  )
  const settled = native.loggingStartPageSize(data)
  if (typeof settled !== 'bigint') throw ch.error(settled)
  return { pageSize: settled }
}

/**
 * The dirty pages of [iova, iova + length) since the last report, as merged ranges, decoded
 * from the device's bitmap (bit i is page i; a bit past the range is `EPROTO`).
 */
export async function dirtyPages(
  ch: Channel,
  options: CallOptions & { iova: number | bigint; length: number | bigint; pageSize: number | bigint },
): Promise<Array<{ iova: bigint; length: bigint }>> {
  const iova = checkOffset('iova', options.iova).value
  const length = checkOffset('length', options.length).value
  const page = checkPage(options.pageSize)
  if (length === 0n || iova % page !== 0n || length % page !== 0n) {
    throw outOfRange('iova and length must be non-zero multiples of pageSize')
  }
  const req = native.loggingReportRequest(iova, length, page)
  if ('errno' in req) throw outOfRange(req.message)
  const data = await feature(ch, DMA_LOGGING_REPORT, GET, req.data, options, req.argsz)
  const flat = native.decodeDirtyBitmap(data, iova, length, page)
  if (!Array.isArray(flat)) throw ch.error(flat)
  return Array.from({ length: flat.length / 2 }, (_, i) => ({
    iova: flat[2 * i] as bigint,
    length: flat[2 * i + 1] as bigint,
  }))
}

/** Stops dirty-page tracking. */
export async function stopDirtyLogging(ch: Channel, options: CallOptions = {}): Promise<void> {
  await feature(ch, DMA_LOGGING_STOP, SET, new Uint8Array(0), options)
}
