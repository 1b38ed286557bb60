// An emitter's events as an async iterator, until its 'end': what `for await` over an
// Interrupts or a Tap yields. Listeners come off when the loop stops, however it stops.
import type { EventEmitter } from 'node:events'
import { holdLoop } from './liveness'

/**
 * Yields every `names` event of `source` from now on, in order, until `ended()` once its
 * 'end' was emitted and nothing is left. With `keepAlive`, waiting for the next one keeps
 * Node running.
 */
export async function* untilEnd<T>(
  source: EventEmitter,
  names: readonly string[],
  ended: () => boolean,
  keepAlive: boolean,
): AsyncGenerator<T> {
  const queue: T[] = []
  let wake: (() => void) | undefined
  const push = (value: T) => {
    queue.push(value)
    wake?.()
  }
  const end = () => wake?.()
  for (const n of names) source.on(n, push)
  source.on('end', end)
  try {
    for (;;) {
      const next = queue.shift()
      if (next !== undefined) {
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
  }
}
