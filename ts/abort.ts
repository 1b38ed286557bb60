// One 'abort' listener per AbortSignal, however many requests share it: a signal shared by
// thousands of requests neither triggers Node's MaxListenersExceededWarning nor costs a
// listener per request. Node's own APIs avoid the warning the same way.

interface Watch {
  readonly callbacks: Set<() => void>
  readonly listener: () => void
}

const watches = new WeakMap<AbortSignal, Watch>()

/**
 * Calls `callback` once when `signal` aborts. Returns a function that stops watching (call it
 * when the operation settles); the listener is removed with the last watcher.
 */
export function watchAbort(signal: AbortSignal, callback: () => void): () => void {
  let watch = watches.get(signal)
  if (!watch) {
    const callbacks = new Set<() => void>()
    const listener = () => {
      watches.delete(signal)
      for (const cb of callbacks) cb()
      callbacks.clear()
    }
    watch = { callbacks, listener }
    watches.set(signal, watch)
    signal.addEventListener('abort', listener, { once: true })
  }
  const w = watch
  w.callbacks.add(callback)
  return () => {
    if (!w.callbacks.delete(callback) || w.callbacks.size > 0) return
    if (watches.get(signal) === w) watches.delete(signal)
    signal.removeEventListener('abort', w.listener)
  }
}
