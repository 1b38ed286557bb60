// `vfio-user migrate SOURCE DEST`: moves a device's state from the server at SOURCE to the one
// at DEST with migrate() (migrate.ts), showing a progress line (bytes, rate, round) on a
// terminal and a summary at the end, or the summary as JSON with --json.
import { statSync } from 'node:fs'
import { resolve } from 'node:path'
import { UsageError, wholeNumber } from './cli-usage'
import { connect, type MigrateProgress, type MigrateSummary, migrate, type VfioUserClient } from './index'

/** How `vfio-user migrate` is called. */
export const migrateUsage =
  'usage: vfio-user migrate SOURCE DEST [--json] [--timeout MS] [--max-rounds N] [--converged BYTES] [--from-stopped]'

const mib = (n: number) => `${(n / (1 << 20)).toFixed(1)} MiB`

function progressLine(p: MigrateProgress): string {
  const what = p.phase === 'preCopy' ? `pre-copy round ${p.round}` : 'stop-copy'
  return `${what}: ${mib(p.bytes)} moved, ${mib(p.rate)}/s`
}

function summaryLine(s: MigrateSummary): string {
  return (
    `migrated ${mib(s.bytes)} in ${s.elapsedMs.toFixed(0)} ms (${mib(s.rate)}/s): ` +
    `${s.rounds} pre-copy round(s) moved ${mib(s.preCopyBytes)}, stop-copy ${s.stopCopyBytes} bytes, ` +
    `downtime ${s.downtimeMs.toFixed(1)} ms`
  )
}

function parse(args: string[]) {
  let json = false
  let help = false
  let timeoutMs = 5000
  let maxPreCopyRounds: number | undefined
  let convergedBytes: number | undefined
  let fromStopped = false
  const positional: string[] = []
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string
    if (a === '--help' || a === '-h') help = true
    else if (a === '--json') json = true
    else if (a === '--timeout') timeoutMs = wholeNumber(a, args[++i], 'milliseconds', migrateUsage, 1)
    else if (a === '--max-rounds') maxPreCopyRounds = wholeNumber(a, args[++i], 'rounds', migrateUsage)
    else if (a === '--converged') convergedBytes = wholeNumber(a, args[++i], 'bytes', migrateUsage)
    else if (a === '--from-stopped') fromStopped = true
    else if (a.startsWith('-')) throw new UsageError(`unknown option ${a}`, migrateUsage)
    else positional.push(a)
  }
  // --help: nothing else is looked at.
  if (help) return undefined
  const [source, dest] = positional
  if (positional.length !== 2 || source === undefined || dest === undefined) {
    throw new UsageError(`SOURCE and DEST are needed, got ${positional.length} socket(s)`, migrateUsage)
  }
  if (sameSocket(source, dest)) {
    throw new UsageError(
      `SOURCE and DEST are the same socket (${source}): a device cannot migrate into itself`,
      migrateUsage,
    )
  }
  return { json, timeoutMs, maxPreCopyRounds, convergedBytes, fromStopped, source, dest }
}

/** Whether two paths name the same socket: the same file once resolved (or the same path). */
function sameSocket(a: string, b: string): boolean {
  const id = (p: string) => {
    try {
      const s = statSync(p)
      return `${s.dev}:${s.ino}`
    } catch {
      return resolve(p)
    }
  }
  return id(a) === id(b)
}

/** Runs `vfio-user migrate` with its arguments; resolves with the exit code. */
export async function migrateCommand(args: string[]): Promise<number> {
  const o = parse(args)
  if (!o) {
    process.stdout.write(`${migrateUsage}\n`)
    return 0
  }
  const tty = process.stderr.isTTY === true && !o.json
  let shown = Number.NEGATIVE_INFINITY
  const onProgress = (p: MigrateProgress) => {
    // A terminal redraws at most ten times a second.
    const now = performance.now()
    if (!tty || now - shown < 100) return
    shown = now
    process.stderr.write(`\r\x1b[K${progressLine(p)}`)
  }
  const clients: VfioUserClient[] = []
  // Ctrl-C aborts: migrate() then puts the source back to running and says where both are.
  // Further ones are ignored meanwhile, so the source is never left stopped by a second one.
  const abort = new AbortController()
  const onInterrupt = () => {
    if (!abort.signal.aborted) process.stderr.write('\ninterrupted: stopping, the source is being restored\n')
    abort.abort()
  }
  process.on('SIGINT', onInterrupt)
  try {
    for (const path of [o.source, o.dest]) {
      const c = await connect(path, { timeoutMs: o.timeoutMs })
      clients.push(c)
      await c.validateVersion()
      abort.signal.throwIfAborted()
    }
    const [source, dest] = clients as [VfioUserClient, VfioUserClient]
    const summary = await migrate(source, dest, {
      timeoutMs: o.timeoutMs,
      maxPreCopyRounds: o.maxPreCopyRounds,
      fromStopped: o.fromStopped,
      convergedBytes: o.convergedBytes,
      onProgress,
      signal: abort.signal,
    })
    if (tty) process.stderr.write('\r\x1b[K')
    const out = o.json ? JSON.stringify({ source: o.source, destination: o.dest, ...summary }) : summaryLine(summary)
    process.stdout.write(`${out}\n`)
    return 0
  } finally {
    process.removeListener('SIGINT', onInterrupt)
    if (tty) process.stderr.write('\r\x1b[K')
    await Promise.all(clients.map((c) => c.close()))
  }
}
