// Buffers over native mappings (DMA memory, a mapped region), as windows: one ArrayBuffer
// reaches at most `buffer.constants.MAX_LENGTH` bytes (4 GiB on Node 20), and asking Node for
// a longer one over external memory made it free the mapping's hold and then fail, which
// corrupted the heap. So a longer mapping is seen through windows, each checked here first,
// and every window still alive is detached before the mapping goes.
import { constants } from 'node:buffer'
import { checkSize, outOfRange } from './args'
import { native } from './native'

/** The most bytes one Buffer over a mapping can hold (`buffer.constants.MAX_LENGTH`). */
export const MAX_WINDOW: number = constants.MAX_LENGTH

/** What native code offers for a mapping: views of a range of it. */
interface ViewSource {
  arrayBuffer(offset: number, length: number): ArrayBuffer
}

/** A RangeError with Node's code for a Buffer longer than one can be. */
export function tooLarge(what: string, length: number): RangeError & { code: 'ERR_BUFFER_TOO_LARGE' } {
  const e = new RangeError(
    `${what} is ${length} bytes, more than one Buffer holds (${MAX_WINDOW}, buffer.constants.MAX_LENGTH): use window(offset, length)`,
  ) as RangeError & { code: 'ERR_BUFFER_TOO_LARGE' }
  e.code = 'ERR_BUFFER_TOO_LARGE'
  return e
}

/** The windows made over one mapping of `size` bytes, detached together by {@link Windows.detachAll}. */
export class Windows {
  readonly #source: ViewSource
  readonly #size: number
  readonly #what: string
  /** Weak: a window nobody holds is collected, and its finalizer lets go of its hold. */
  #made: WeakRef<ArrayBuffer>[] = []
  #sweepAt = 64

  constructor(source: ViewSource, size: number, what: string) {
    this.#source = source
    this.#size = size
    this.#what = what
  }

  /**
   * An ArrayBuffer over `length` bytes from `offset` (numbers or bigints).
   * @throws {RangeError} `ERR_OUT_OF_RANGE` past the end, `ERR_BUFFER_TOO_LARGE` past {@link MAX_WINDOW}.
   */
  make(offset: unknown, length: unknown): { view: ArrayBuffer; offset: number } {
    const at = checkSize('offset', offset, 0, Number.MAX_SAFE_INTEGER)
    const bytes = checkSize('length', length, 0, Number.MAX_SAFE_INTEGER)
    if (at + bytes > this.#size) {
      throw outOfRange(`${bytes} bytes at offset ${at} pass the end of the ${this.#size}-byte ${this.#what}`)
    }
    if (bytes > MAX_WINDOW) throw tooLarge(`a window of the ${this.#what}`, bytes)
    const view = this.#source.arrayBuffer(at, bytes)
    if (this.#made.length >= this.#sweepAt) {
      this.#made = this.#made.filter((w) => w.deref() !== undefined)
      this.#sweepAt = Math.max(64, 2 * this.#made.length)
    }
    this.#made.push(new WeakRef(view))
    return { view, offset: at }
  }

  /** Detaches every window still alive: each Buffer over one reads as empty from now on. */
  detachAll(): void {
    for (const w of this.#made) {
      const view = w.deref()
      if (view) native.detachView(view)
    }
    this.#made = []
  }
}
