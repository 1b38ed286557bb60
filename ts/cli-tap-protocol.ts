// What `vfio-user tap`'s two threads say to each other (cli-tap.ts, the main thread, writes the
// output; cli-tap-worker.ts runs the tap). Kept apart so that neither loads the other.
import type { TapRecord } from './tap'

/** What the main thread gives the tap's thread. */
export interface TapWorkerData {
  listen: string
  connect: string
  bytes: number
  /** How long a session lingers once a side has hung up (the tap's default when undefined). */
  lingerMs: number | undefined
  /**
   * Shared counters, indexed by {@link HELD} and {@link STOP}: the main thread's side of the
   * back-pressure, read by the tap's thread without a message (it may be blocked on them).
   */
  shared: Int32Array
}

/** Index of the records handed to the main thread that its output has not taken yet. */
export const HELD = 0
/** Index of the flag the main thread sets once the tap is to close: nothing waits any more. */
export const STOP = 1
/**
 * Records the main thread may hold before the tap's thread stops taking more (as the binding
 * holds at most 4096 lines for JavaScript): past it the binding's queue fills and the relay
 * waits, so a slow output slows the VMM and its device instead of growing memory.
 */
export const MAX_HELD = 4096

/** What the tap's thread tells the main thread. */
export type FromTapWorker =
  | { type: 'listening' }
  | { type: 'failed'; code: string; errno: number; message: string }
  | { type: 'records'; records: TapRecord[] }
  /** The first time it stopped taking records because the output fell behind. */
  | { type: 'behind' }
  /** The tap has closed: every record has been handed over, nothing follows. */
  | { type: 'ended' }

/** What the main thread tells the tap's thread. */
export type ToTapWorker = { type: 'stop' }
