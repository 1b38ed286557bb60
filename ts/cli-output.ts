// Where `vfio-user tap` writes (stdout, and the --out file): streams whose write() may say
// "wait for 'drain'". An Output remembers that, so the tap can stop taking records until every
// output has caught up, and turns the stream's 'error' (EPIPE from `| head`, ENOSPC…) into one
// call instead of an unhandled event that kills the process with LISTEN left behind.
import { open } from 'node:fs/promises'
import type { Writable } from 'node:stream'
import { getSystemErrorMap } from 'node:util'
import { UsageError } from './cli-usage'

/** One stream the tap writes to. */
export class Output {
  /** How messages name it: `stdout`, or `--out FILE`. */
  readonly name: string
  readonly #stream: Writable
  #waiting = false
  #failed = false

  /**
   * `onDrain` runs when it has caught up after a write that said to wait; `onError` once, on
   * its first failure, after which writes are dropped (nobody can read them).
   */
  constructor(name: string, stream: Writable, onDrain: () => void, onError: (e: NodeJS.ErrnoException) => void) {
    this.name = name
    this.#stream = stream
    stream.on('drain', () => {
      this.#waiting = false
      onDrain()
    })
    stream.on('error', (e: NodeJS.ErrnoException) => {
      if (this.#failed) return
      this.#failed = true
      this.#waiting = false
      onError(e)
    })
  }

  /** True from a write that filled its buffer until its 'drain'. */
  get waiting(): boolean {
    return this.#waiting
  }

  /** Writes `text` (dropped once the stream failed). */
  write(text: string): void {
    if (this.#failed) return
    if (!this.#stream.write(text)) this.#waiting = true
  }

  /** Ends a file: resolves once what was written is in it and its fd is closed (at once if it failed). */
  end(): Promise<void> {
    if (this.#failed) return Promise.resolve()
    return new Promise<void>((resolve) => {
      this.#stream.once('close', resolve)
      this.#stream.end()
    })
  }
}

/** `CODE: description` of a system error (`EPIPE: broken pipe`), else its message. */
export function reason(e: unknown): string {
  const err = e as Partial<NodeJS.ErrnoException> | undefined
  const known = typeof err?.errno === 'number' ? getSystemErrorMap().get(err.errno) : undefined
  if (known) return `${known[0]}: ${known[1]}`
  return err?.message ?? String(e)
}

/**
 * Opens (creates or truncates) the --out file before anything listens, so a path that cannot
 * be written is a command-line error (one line, exit code 2) and no LISTEN socket is made. A
 * FIFO's open waits for its reader, as a shell's `> FIFO` does.
 * @throws {UsageError} naming the path and why (`ENOENT: no such file or directory`, `EISDIR`…).
 */
export async function openOut(path: string): Promise<Writable> {
  try {
    const handle = await open(path, 'w')
    return handle.createWriteStream()
  } catch (e) {
    throw new UsageError(`--out ${path}: ${reason(e)}`)
  }
}
