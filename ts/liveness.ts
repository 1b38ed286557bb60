// Keeping Node's event loop alive while something of ours is awaited. Native completions and
// the socket's poll handle never hold the loop by themselves (an idle client must not keep
// `node` running), so whatever must keep it alive takes a hold here: one referenced timer for
// the whole module, referenced while any hold is taken.

const timer = setInterval(() => {}, 0x7fff_ffff)
timer.unref()
let holds = 0

/** Keeps the event loop alive until the returned function is called (once; later calls do nothing). */
export function holdLoop(): () => void {
  if (holds++ === 0) timer.ref()
  let held = true
  return () => {
    if (!held) return
    held = false
    if (--holds === 0) timer.unref()
  }
}

/** One hold that `ref()` takes and `unref()` gives back, for objects that offer both. */
export class LoopRef {
  #release?: () => void

  /** Takes the hold, if not taken. */
  ref(): void {
    this.#release ??= holdLoop()
  }

  /** Gives the hold back, if taken. */
  unref(): void {
    this.#release?.()
    this.#release = undefined
  }
}
