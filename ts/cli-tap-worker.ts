// `vfio-user tap`'s tap, on a thread of its own (cli-tap.ts starts it). It takes the relay's
// records and hands them to the main thread in batches. While the main thread holds more than
// MAX_HELD records its output has not taken, this thread blocks: it takes no more lines, so the
// binding's queue fills and the relay threads wait for room. That is the back-pressure a slow
// 'message' listener gives (tap.ts), applied where blocking costs nothing: the main thread
// stays free to see its output's 'drain', and Ctrl-C.
import { parentPort, workerData } from 'node:worker_threads'
import { type FromTapWorker, HELD, MAX_HELD, STOP, type TapWorkerData, type ToTapWorker } from './cli-tap-protocol'
import { VfioUserError } from './errors'
import { type Tap, type TapRecord, tap } from './tap'

const port = parentPort
if (!port) throw new Error('cli-tap-worker runs as a worker thread of vfio-user tap')
const { listen, connect, bytes, lingerMs, shared } = workerData as TapWorkerData
const post = (m: FromTapWorker) => port.postMessage(m)

let batch: TapRecord[] = []
let scheduled = false
let saidBehind = false

/** Hands the batch over, then waits while the main thread holds too many. */
function hand(): void {
  scheduled = false
  if (batch.length > 0) {
    // Counted before it is posted: the main thread may take it off at once.
    Atomics.add(shared, HELD, batch.length)
    post({ type: 'records', records: batch })
    batch = []
  }
  for (;;) {
    const held = Atomics.load(shared, HELD)
    if (held <= MAX_HELD || Atomics.load(shared, STOP) !== 0) return
    if (!saidBehind) {
      saidBehind = true
      post({ type: 'behind' })
    }
    Atomics.wait(shared, HELD, held)
  }
}

/** Takes one record: handed over with the rest of its turn's, or at once past a native batch's worth. */
function take(r: TapRecord): void {
  batch.push(r)
  if (batch.length >= MAX_HELD) hand()
  else if (!scheduled) {
    scheduled = true
    setImmediate(hand)
  }
}

let stopping = false
let running: Tap | undefined

async function stop(t: Tap): Promise<void> {
  await t.close()
  hand()
  post({ type: 'ended' })
  // Nothing more to say or hear: the thread ends once the port no longer holds it.
  port?.close()
}

port.on('message', (m: ToTapWorker) => {
  if (m.type !== 'stop' || stopping) return
  stopping = true
  if (running) void stop(running)
})

tap({ listen, connect, bytes, lingerMs }).then(
  (t) => {
    running = t
    t.on('message', take)
    t.on('open', take)
    t.on('close', take)
    t.on('refused', take)
    post({ type: 'listening' })
    if (stopping) void stop(t)
  },
  (e: unknown) => {
    const err = e instanceof VfioUserError ? e : undefined
    post({
      type: 'failed',
      code: err?.code ?? 'EIO',
      errno: err ? -err.errno : 0,
      message: e instanceof Error ? e.message : String(e),
    })
    port.close()
  },
)
