// What the `vfio-user` commands share: the usage error (exit code 2, the usage printed), the
// package's version, and the parsing of a numeric option, so each command says which option
// was wrong in its own words.
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

/**
 * A command line that cannot be run: printed with the usage, exit code 2. Without a usage
 * (an argument that is well formed but names what cannot be used, such as an --out path in
 * a missing folder) only the message is printed: one line.
 */
export class UsageError extends Error {
  /** What to print after the message (empty: nothing). */
  readonly usage: string

  /** `message` says what was wrong; `usage` how the command is called. */
  constructor(message: string, usage = '') {
    super(message)
    this.name = 'UsageError'
    this.usage = usage
  }
}

/** The value of option `name` (the next argument): a whole number of `unit` from `min`. */
export function wholeNumber(name: string, value: string | undefined, unit: string, usage: string, min = 0): number {
  const n = Number(value)
  if (value === undefined || value === '' || !Number.isSafeInteger(n) || n < min) {
    throw new UsageError(
      `${name} needs a whole number of ${unit}${min > 0 ? ` (at least ${min})` : ''}, got ${value ?? 'nothing'}`,
      usage,
    )
  }
  return n
}

/** This package's version, from its package.json (one level above dist/). */
export function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(join(__dirname, '..', 'package.json'), 'utf8')) as { version: string }
  return manifest.version
}
