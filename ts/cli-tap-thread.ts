// `vfio-user tap`'s tap as the main thread sees it: started on a thread of its own
// (cli-tap-worker.ts), handing over records that the main thread gives back once its output
// has taken them. Until then that thread takes no more, and the relay waits: the main thread
// stays free for its output's 'drain' and for Ctrl-C, whatever the tap's thread waits for.
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import { type FromTapWorker, HELD, STOP, type TapWorkerData, type ToTapWorker } from './cli-tap-protocol'
import { VfioUserError } from './errors'
import type { TapRecord } from './tap'

/** What a {@link TapThread} reports. */
export interface TapThreadHandlers {
  /** Records, in the order they passed; they count as held until {@link TapThread.release}. */
  records(records: TapRecord[]): void
  /** The first time the tap waited for the main thread to give records back. */
  behind(): void
}

/** The tap, running on a thread of its own. */
export class TapThread {
  /** Resolves once the tap listens; rejects with why it could not (`'EADDRINUSE'`…). */
  readonly listening: Promise<void>
  /** Resolves once the tap has closed and every record was handed over; rejects if the thread failed. */
  readonly ended: Promise<void>
  /** Resolves once the thread has gone. */
  readonly exited: Promise<void>
  readonly #worker: Worker
  /** Indexed by HELD and STOP: read by the other thread without a message, as it may be blocked. */
  readonly #shared = new Int32Array(new SharedArrayBuffer(2 * Int32Array.BYTES_PER_ELEMENT))
  #held = 0
  #stopping = false

  /** Starts the tap of `vfio-user tap LISTEN SERVER --bytes N`. */
  constructor(
    options: { listen: string; connect: string; bytes: number; lingerMs: number | undefined },
    on: TapThreadHandlers,
  ) {
    this.#worker = new Worker(join(__dirname, 'cli-tap-worker.js'), {
      workerData: { ...options, shared: this.#shared } satisfies TapWorkerData,
    })
    const worker = this.#worker
    this.exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()))
    let listening = false
    this.listening = new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromTapWorker) => {
        if (m.type === 'listening') {
          listening = true
          resolve()
        } else if (m.type === 'failed') reject(new VfioUserError(m.code, m.errno, m.message))
      })
      worker.once('error', reject)
      void this.exited.then(() => reject(new Error('the tap ended before listening')))
    })
    this.ended = new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromTapWorker) => {
        if (m.type === 'records') {
          this.#held += m.records.length
          on.records(m.records)
        } else if (m.type === 'behind') on.behind()
        else if (m.type === 'ended') resolve()
      })
      // Before it listens, a failure is the listening promise's to report.
      worker.once('error', (e) => (listening ? reject(e) : resolve()))
      void this.exited.then(() => resolve())
    })
  }

  /** Gives back every record handed over so far: the output has taken them, the tap may take more. */
  release(): void {
    if (this.#held === 0) return
    Atomics.sub(this.#shared, HELD, this.#held)
    this.#held = 0
    Atomics.notify(this.#shared, HELD)
  }

  /**
   * Closes the tap (its sessions end, LISTEN is removed); the records it still had come
   * before {@link TapThread.ended}, whether or not they are given back. Idempotent.
   */
  stop(): void {
    if (this.#stopping) return
    this.#stopping = true
    Atomics.store(this.#shared, STOP, 1)
    Atomics.notify(this.#shared, HELD)
    this.#worker.postMessage({ type: 'stop' } satisfies ToTapWorker)
  }
}
