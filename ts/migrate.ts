// Moving a device's state from one server to another (protocol.md 3.12, 3.13): pre-copy
// rounds while the source runs (when it offers them), then STOP_COPY on the source piped into
// RESUMING on the destination, then RUNNING on the destination. Built only on the typed
// calls (feature.ts, migration.ts); this file decides the order and reports progress.
import { checkInteger, checkTimeout, invalidArg, rejecting } from './args'
import type { CallOptions } from './channel'
import { CHANNEL, type VfioUserClient } from './client'
import { Command } from './command'
import { aborted, VfioUserError } from './errors'
import type { MigrationState } from './feature'
import { pumpState } from './migration'

/** Options of {@link migrate}. */
export interface MigrateOptions extends CallOptions {
  /** Most pre-copy rounds (default 8); 0 skips pre-copy even when the source offers it. */
  maxPreCopyRounds?: number
  /**
   * Pre-copy stops once a round moves at most this many bytes (default 1 MiB): what is left
   * is small enough to move with both devices stopped.
   */
  convergedBytes?: number
  /** Most bytes one MIG_DATA message moves (default: the smaller `maxDataXferSize`). */
  chunkSize?: number
  /**
   * The bytes move natively, out of JavaScript's reach, in slices of at least this many
   * (default 64 MiB); `onProgress` is called between slices. An abort through `signal`
   * settles at once (a slice in progress then fails at its next step, the source restarted).
   */
  progressBytes?: number
  /** Called as bytes move: after every slice, and at the end of each round and phase. */
  onProgress?: (progress: MigrateProgress) => void
  /**
   * Migrate a source that is stopped (STOP), stop-copy only, and leave it stopped. Without it
   * a source that is not running is refused with nothing changed: a stopped source has most
   * likely been migrated already (the same command run twice), and starting it again would
   * run two copies of the device.
   */
  fromStopped?: boolean
}

/** Where a migration is: passed to {@link MigrateOptions.onProgress}. */
export interface MigrateProgress {
  /** `'preCopy'` while the source runs, `'stopCopy'` once it is stopped. */
  phase: 'preCopy' | 'stopCopy'
  /** The pre-copy round (1-based); in stop-copy, the number of pre-copy rounds done. */
  round: number
  /** Bytes moved so far, all phases. */
  bytes: number
  /** Bytes moved in this round or phase. */
  phaseBytes: number
  /** Milliseconds since the migration began. */
  elapsedMs: number
  /** Bytes per second so far. */
  rate: number
}

/** What {@link migrate} did. */
export interface MigrateSummary {
  /** Every byte of device state moved. */
  bytes: number
  /** Bytes moved while the source ran. */
  preCopyBytes: number
  /** Bytes moved with the source stopped. */
  stopCopyBytes: number
  /** Pre-copy rounds done (0 when the source does not offer pre-copy, or it was skipped). */
  rounds: number
  /** Milliseconds from start to the source stopped, after the destination runs. */
  elapsedMs: number
  /** Milliseconds with the device stopped (source stopped to destination running). */
  downtimeMs: number
  /** Bytes per second over the whole migration. */
  rate: number
}

/**
 * A migration that failed: the `code` and `errno` of what failed, which phase it was in, and
 * where it left both devices (`undefined` when a device could not be asked).
 */
export class MigrationError extends VfioUserError {
  /** What was being done: `'prepare'`, `'preCopy'`, `'stopCopy'` or `'finish'`. */
  readonly phase: string
  /** The source's state afterwards: `'running'` again whenever it could be restarted. */
  readonly sourceState: MigrationState | undefined
  /** The destination's state afterwards, typically `'resuming'`: it holds a partial state. */
  readonly destinationState: MigrationState | undefined
  /**
   * Which device failed, when the cause came from one (its `path` is that device's socket):
   * `'source'` or `'destination'`; undefined for an abort or a refusal before anything moved.
   */
  readonly side: 'source' | 'destination' | undefined

  /** Wraps `cause`, the error that stopped the migration. */
  constructor(
    cause: unknown,
    phase: string,
    sourceState: MigrationState | undefined,
    destinationState: MigrationState | undefined,
    side?: 'source' | 'destination',
  ) {
    const e = cause instanceof VfioUserError ? cause : undefined
    const what = cause instanceof Error ? cause.message : String(cause)
    const states = `source ${sourceState ?? 'unknown'}, destination ${destinationState ?? 'unknown'}`
    const at = side === undefined ? '' : `, at the ${side}`
    super(
      e?.code ?? (cause instanceof Error && cause.name === 'AbortError' ? 'ECANCELED' : 'EIO'),
      e ? -e.errno : cause instanceof Error && cause.name === 'AbortError' ? 125 : 5,
      `migration failed in ${phase}${at}: ${what} (${states})`,
      e?.command ?? Command.MIG_DATA_READ,
      e?.path,
    )
    this.name = 'MigrationError'
    this.cause = cause
    this.phase = phase
    this.sourceState = sourceState
    this.destinationState = destinationState
    this.side = side
  }
}

function checkOptions(o: MigrateOptions): { rounds: number; converged: number } {
  if (o === null || typeof o !== 'object') throw invalidArg('options must be an object')
  if (o.chunkSize !== undefined) checkInteger('chunkSize', o.chunkSize, 1, 0xffff_fff0)
  checkTimeout('timeoutMs', o.timeoutMs)
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw invalidArg('signal must be an AbortSignal')
  const rounds = o.maxPreCopyRounds ?? 8
  const converged = o.convergedBytes ?? 1 << 20
  checkInteger('maxPreCopyRounds', rounds, 0, 1 << 20)
  checkInteger('convergedBytes', converged, 0, Number.MAX_SAFE_INTEGER)
  checkInteger('progressBytes', o.progressBytes ?? 1, 1, Number.MAX_SAFE_INTEGER)
  if (o.onProgress !== undefined && typeof o.onProgress !== 'function') {
    throw invalidArg('onProgress must be a function')
  }
  if (o.fromStopped !== undefined && typeof o.fromStopped !== 'boolean') {
    throw invalidArg('fromStopped must be a boolean')
  }
  return { rounds, converged }
}

/**
 * Moves the device state of `source` into `dest` (another server process of the same
 * device): `dest` goes to RESUMING; while the source runs, pre-copy rounds (when it offers
 * PRE_COPY) move its state and then only what changed, until a round moves at most
 * `convergedBytes` or `maxPreCopyRounds` are done; then the source stops (STOP_COPY), the rest
 * moves, the destination runs and the source is left stopped. Both clients stay open.
 *
 * Both states are read first: a source that is not running (or stopped, with `fromStopped`),
 * or a destination that is neither running nor stopped, is refused with `'EBUSY'` and nothing
 * is changed.
 *
 * @throws {MigrationError} (rejection) when a device refuses or fails, a stream breaks, or
 *   `signal` aborts: the source is put back to the state it was found in (never further)
 *   where it can be, and the error says where both devices were left.
 * @throws {TypeError | RangeError} (rejection, with Node's `ERR_*` code) for bad options or
 *   the same client twice, before anything is sent.
 */
export function migrate(
  source: VfioUserClient,
  dest: VfioUserClient,
  options: MigrateOptions = {},
): Promise<MigrateSummary> {
  return rejecting(() => {
    if (source === dest) throw invalidArg('source and dest must be two connections')
    const { rounds, converged } = checkOptions(options)
    return run(source, dest, options, rounds, converged)
  })
}

/** {@link migrate}, its arguments checked. */
async function run(
  source: VfioUserClient,
  dest: VfioUserClient,
  options: MigrateOptions,
  maxRounds: number,
  converged: number,
): Promise<MigrateSummary> {
  const { signal, timeoutMs, chunkSize, onProgress, progressBytes = 64 << 20 } = options
  const call: CallOptions = { signal, timeoutMs }
  const start = performance.now()
  let bytes = 0
  let preCopyBytes = 0
  let round = 0
  let phase = 'prepare'
  let stoppedAt = 0
  let destRunning = false
  let runningAt = 0

  const report = (p: 'preCopy' | 'stopCopy', phaseBytes: number) => {
    const elapsedMs = performance.now() - start
    onProgress?.({
      phase: p,
      round,
      bytes,
      phaseBytes,
      elapsedMs,
      rate: elapsedMs > 0 ? (bytes * 1000) / elapsedMs : 0,
    })
  }
  // One pass of the source's stream into the destination (a round, or the rest of the
  // state), moved natively in slices of `progressBytes` so progress and `signal` are seen
  // between them; resolves with the bytes moved.
  const copy = async (p: 'preCopy' | 'stopCopy'): Promise<number> => {
    let moved = 0
    for (;;) {
      if (signal?.aborted) throw aborted(signal)
      const r = await pumpState(source[CHANNEL], dest[CHANNEL], { chunkSize, timeoutMs, signal, limit: progressBytes })
      moved += r.bytes
      bytes += r.bytes
      report(p, moved)
      if (r.ended) return moved
    }
  }

  // The state the source is found in: restored on failure, never more (untouched before it is known).
  let found: MigrationState | undefined
  try {
    const [from, to] = await Promise.all([source.migrationFlags(call), dest.migrationFlags(call)])
    if (!to.stopCopy) throw new VfioUserError('ENOTSUP', 95, 'the destination cannot load a device state')
    const [sourceState, destState] = await Promise.all([source.migrationState(call), dest.migrationState(call)])
    found = sourceState
    const fromStopped = options.fromStopped === true && sourceState === 'stop'
    if (sourceState !== 'running' && !fromStopped) {
      const hint = sourceState === 'stop' ? ' (it may have been migrated already; fromStopped migrates it stopped)' : ''
      return refuse(`the source is ${sourceState}, not running${hint}`, sourceState, destState)
    }
    if (destState !== 'running' && destState !== 'stop') {
      return refuse(`the destination is ${destState}: it cannot be made to resume a state`, sourceState, destState)
    }
    await dest.setMigrationState('resuming', call)
    if (from.preCopy && maxRounds > 0 && !fromStopped) {
      phase = 'preCopy'
      await source.setMigrationState('preCopy', call)
      while (round < maxRounds) {
        round++
        const moved = await copy('preCopy')
        preCopyBytes += moved
        if (moved <= converged) break
      }
    }
    phase = 'stopCopy'
    stoppedAt = performance.now()
    await source.setMigrationState('stopCopy', call)
    await copy('stopCopy')
    phase = 'finish'
    await dest.setMigrationState('running', call)
    destRunning = true
    runningAt = performance.now()
    await source.setMigrationState('stop', call)
  } catch (e) {
    throw await failed(e, phase, source, dest, destRunning, timeoutMs, found)
  }
  const end = performance.now()
  const elapsedMs = end - start
  return {
    bytes,
    preCopyBytes,
    stopCopyBytes: bytes - preCopyBytes,
    rounds: round,
    elapsedMs,
    downtimeMs: runningAt - stoppedAt,
    rate: elapsedMs > 0 ? (bytes * 1000) / elapsedMs : 0,
  }
}

/** A migration refused before anything changed: `'EBUSY'`, both states as found. */
function refuse(why: string, from: MigrationState, to: MigrationState): never {
  throw new MigrationError(new VfioUserError('EBUSY', 16, why), 'prepare', from, to)
}

/**
 * Says where both devices are, after putting the source back to the state it was found in
 * (best effort; running, or stopped) when the destination does not run: one device must run
 * the guest, never two. Once the destination
 * was asked to run, one that cannot be asked might run (its step may have taken effect before
 * its reply was lost), so the source is then left as it is.
 */
async function failed(
  cause: unknown,
  phase: string,
  source: VfioUserClient,
  dest: VfioUserClient,
  destRunning: boolean,
  timeoutMs: number | undefined,
  found: MigrationState | undefined,
): Promise<MigrationError> {
  if (cause instanceof MigrationError) return cause
  const path = cause instanceof VfioUserError ? cause.path : undefined
  const side =
    path === undefined ? undefined : path === dest.path ? 'destination' : path === source.path ? 'source' : undefined
  const ask = (c: VfioUserClient) => c.migrationState({ timeoutMs }).catch(() => undefined)
  const restartSource = async () => {
    const from = await ask(source)
    if (found === undefined || from === undefined || from === found || from === 'error') return from
    return source.setMigrationState(found, { timeoutMs }).catch(() => ask(source))
  }
  if (phase !== 'finish' && !destRunning) {
    // The destination was never asked to run: restart the source at once, not after a
    // stalled destination has timed out.
    const [from, to] = await Promise.all([restartSource(), ask(dest)])
    return new MigrationError(cause, phase, from, to, side)
  }
  // Once it was asked to run, the destination must say it does not before the source runs.
  const to = await ask(dest)
  const from = !destRunning && to !== undefined && to !== 'running' ? await restartSource() : await ask(source)
  return new MigrationError(cause, phase, from, to, side)
}
