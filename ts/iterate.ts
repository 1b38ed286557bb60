// An emitter's events as an async iterator, until its 'end': what `for await` over an
// Interrupts or a Tap yields. Listeners come off when the loop stops, however it stops.
import type { EventEmitter } from 'node:events'
import { holdLoop } from './liveness'

/**
 * How a source that can be paused keeps an iterator's queue bounded: paused once `high`
 * values wait for the loop, resumed once it has taken half of them.
 */
export interface Flow {
  high: number
  pause(): void
  resume(): void
}

/**
 * Yields every `names` event of `source` from now on, in order, until `ended()` once its
 * 'end' was emitted and nothing is left. With `keepAlive`, waiting for the next one keeps
 * Node running. With `flow`, a loop that falls behind pauses the source (a source that emits
 * in batches may still add one batch past `high`).
 */
export async function* untilEnd<T>(
  source: EventEmitter,
  names: readonly string[],
  ended: () => boolean,
  keepAlive: boolean,
  flow?: Flow,
): AsyncGenerator<T> {
  // A ring of values read from `head` (Array#shift moves every value left, each time).
  let queue: T[] = []
  let head = 0
  let paused = false
  let wake: (() => void) | undefined
  const push = (value: T) => {
    queue.push(value)
    if (flow && !paused && queue.length - head >= flow.high) {
      paused = true
      flow.pause()
    }
    wake?.()
  }
  const end = () => wake?.()
  for (const n of names) source.on(n, push)
  source.on('end', end)
  try {
    for (;;) {
      if (head < queue.length) {
        const next = queue[head] as T
        queue[head++] = undefined as T
        if (head === queue.length) {
          queue = []
          head = 0
        }
        if (flow && paused && queue.length - head <= flow.high / 2) {
          paused = false
          flow.resume()
        }
        yield next
        continue
      }
      if (ended()) return
      const release = keepAlive ? holdLoop() : undefined
      try {
        await new Promise<void>((resolve) => {
          wake = resolve
        })
      } finally {
        release?.()
      }
      wake = undefined
    }
  } finally {
    for (const n of names) source.off(n, push)
    source.off('end', end)
    if (paused) flow?.resume()
  }
}
