// `vfio-user tap LISTEN SERVER [--json] [--out FILE] [--bytes N]`: a transparent relay
// between a VMM and its device (tap.ts) printing every message that passes, decoded, one line
// each (or NDJSON with --json; --out FILE writes the NDJSON to a file while the terminal gets
// the lines), and a summary (count per command, errors per errno, p50/p99 latency per
// command) each time the last client leaves, and on Ctrl-C, which then ends it. While an
// output is behind, the tap is paused (tap.ts), so a slow output slows the relay instead of
// growing memory.
import { Output, openOut, reason } from './cli-output'
import { UsageError, wholeNumber } from './cli-usage'
import { type Tap, type TapMessage, type TapRecord, tap } from './tap'

/** How `vfio-user tap` is called. */
export const tapUsage = 'usage: vfio-user tap LISTEN SERVER [--json] [--out FILE] [--bytes N] [--linger MS]'

function parse(args: string[]) {
  let json = false
  let out: string | undefined
  let bytes = 16
  let lingerMs: number | undefined
  const positional: string[] = []
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string
    if (a === '--help' || a === '-h') return undefined
    if (a === '--json') json = true
    else if (a === '--out') {
      out = args[++i]
      if (out === undefined || out === '') throw new UsageError('--out needs a file', tapUsage)
    } else if (a === '--bytes') {
      bytes = wholeNumber(a, args[++i], 'bytes', tapUsage)
      // As tap() refuses more: shown data is a prefix kept per message.
      if (bytes > 4096) throw new UsageError(`--bytes is at most 4096, got ${bytes}`, tapUsage)
    } else if (a === '--linger') lingerMs = wholeNumber(a, args[++i], 'milliseconds', tapUsage)
    else if (a.startsWith('-')) throw new UsageError(`unknown option ${a}`, tapUsage)
    else positional.push(a)
  }
  const [listen, server] = positional
  if (positional.length !== 2 || listen === undefined || server === undefined) {
    throw new UsageError(`LISTEN and SERVER are needed, got ${positional.length} path(s)`, tapUsage)
  }
  return { json, out, bytes, lingerMs, listen, server }
}

const pad2 = (n: number) => String(n).padStart(2, '0')

/** `HH:MM:SS.uuuuuu` of a time in ms since the epoch (local time). */
function clock(ms: number): string {
  const d = new Date(ms)
  const micros = Math.floor((ms % 1000) * 1000)
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}.${String(micros).padStart(6, '0')}`
}

function fieldText(fields: Record<string, unknown>): string {
  return Object.entries(fields)
    .map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : String(v)}`)
    .join(' ')
}

/** One message as a terminal line. */
export function messageLine(m: TapMessage): string {
  const arrow = m.from === 'client' ? 'client→server' : 'server→client'
  const what = m.kind === 'error' ? `error ${m.errnoName} (${m.errno})` : `${m.kind}${m.noReply ? ' (no reply)' : ''}`
  const parts = [`${clock(m.time)}  #${m.session} ${arrow}  id ${m.id}  ${m.command} ${what}`]
  if (m.latencyUs !== undefined) parts.push(`${m.latencyUs.toFixed(1)}µs`)
  const f = fieldText(m.fields)
  if (f) parts.push(f)
  if (m.fds > 0) parts.push(`fds=${m.fds}`)
  if (m.data) {
    const head = m.data.head.match(/../g)?.join(' ') ?? ''
    parts.push(`data ${m.data.length} B${head ? ` ${head}${m.data.length * 2 > m.data.head.length ? ' …' : ''}` : ''}`)
  }
  if (m.undecodable) parts.push(`undecodable: ${m.undecodable}`)
  return parts.join('  ')
}

/** Latencies kept per command for the percentiles: past this many, a uniform sample of them. */
const LATENCY_SAMPLE = 1 << 16

/**
 * Keeps `us` in `c`'s latencies: every one up to LATENCY_SAMPLE, then a reservoir sample, so
 * a tap that runs for days holds a bounded amount.
 */
function keep(c: { latencies: number[]; seen: number }, us: number): void {
  c.seen++
  if (c.latencies.length < LATENCY_SAMPLE) c.latencies.push(us)
  else {
    const i = Math.floor(Math.random() * c.seen)
    if (i < LATENCY_SAMPLE) c.latencies[i] = us
  }
}

/** What the summary counts. */
class Summary {
  sessions = 0
  messages = 0
  readonly perCommand = new Map<string, { count: number; errors: number; latencies: number[]; seen: number }>()
  readonly perErrno = new Map<string, number>()

  add(m: TapMessage): void {
    this.messages++
    const c = this.perCommand.get(m.command) ?? { count: 0, errors: 0, latencies: [], seen: 0 }
    this.perCommand.set(m.command, c)
    if (m.kind === 'request') c.count++
    if (m.kind === 'error') {
      c.errors++
      const name = m.errnoName ?? String(m.errno)
      this.perErrno.set(name, (this.perErrno.get(name) ?? 0) + 1)
    }
    if (m.latencyUs !== undefined) keep(c, m.latencyUs)
  }

  /** The nearest-rank percentile `q` of `xs`, sorted. */
  static percentile(xs: number[], q: number): number | undefined {
    if (xs.length === 0) return undefined
    const sorted = [...xs].sort((a, b) => a - b)
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]
  }

  toJson() {
    return {
      type: 'summary',
      sessions: this.sessions,
      messages: this.messages,
      commands: Object.fromEntries(
        [...this.perCommand].map(([name, c]) => [
          name,
          {
            requests: c.count,
            errors: c.errors,
            p50Us: Summary.percentile(c.latencies, 0.5) ?? null,
            p99Us: Summary.percentile(c.latencies, 0.99) ?? null,
          },
        ]),
      ),
      errors: Object.fromEntries(this.perErrno),
    }
  }

  toText(): string {
    const lines = [`summary: ${this.sessions} session(s), ${this.messages} message(s)`]
    lines.push(
      `  ${'command'.padEnd(26)}${'requests'.padStart(9)}${'errors'.padStart(8)}${'p50 µs'.padStart(10)}${'p99 µs'.padStart(10)}`,
    )
    for (const [name, c] of [...this.perCommand].sort((a, b) => a[0].localeCompare(b[0]))) {
      const p = (q: number) => Summary.percentile(c.latencies, q)?.toFixed(1) ?? '-'
      lines.push(
        `  ${name.padEnd(26)}${String(c.count).padStart(9)}${String(c.errors).padStart(8)}${p(0.5).padStart(10)}${p(0.99).padStart(10)}`,
      )
    }
    const errors = [...this.perErrno].map(([n, k]) => `${n} ${k}`).join(', ')
    lines.push(`errors: ${errors || 'none'}`)
    return lines.join('\n')
  }
}

/**
 * Runs `vfio-user tap` with its arguments; resolves with the exit code once ended: 0 on Ctrl-C
 * (SIGINT) or SIGTERM, 141 (128 + SIGPIPE, as a shell reports a command SIGPIPE ended) once
 * stdout's reader has gone (`| head`), 1 when writing the --out file failed. However it ends,
 * the tap is closed first: its sessions end and LISTEN is removed.
 * @throws {UsageError} for a bad command line, or an --out file that cannot be opened.
 * @throws {VfioUserError} when LISTEN cannot be bound (`'EADDRINUSE'` if it exists).
 */
export async function tapCommand(args: string[]): Promise<number> {
  const o = parse(args)
  if (!o) {
    process.stdout.write(`${tapUsage}\n`)
    return 0
  }
  const fileStream = o.out === undefined ? undefined : await openOut(o.out)
  let t: Tap
  try {
    t = await tap({ listen: o.listen, connect: o.server, bytes: o.bytes, lingerMs: o.lingerMs, everyMessage: true })
  } catch (e) {
    fileStream?.destroy()
    throw e
  }
  const summary = new Summary()
  // Sessions open, as the records said: the summary comes when the last one ends.
  let open = 0
  // While an output is behind the tap is paused: records wait natively, and the relay waits
  // once 4096 do, so a slow output slows the relay (as a pipe would) instead of growing memory.
  let paused = false
  let saidBehind = false
  // Said once, when the relay really waits (not for an output that is merely slow to take a
  // burst, or gone: its error ends the tap first): looked at a few times a second while paused.
  let watching: NodeJS.Timeout | undefined
  const watch = () => {
    watching ??= setInterval(() => {
      if (saidBehind || t.stalled === 0) return
      saidBehind = true
      clearInterval(watching)
      process.stderr.write(
        'vfio-user: tap: the output is not keeping up; the relay waits for it, which slows the VMM and its device\n',
      )
    }, 100).unref()
  }
  const behind = () => {
    if (paused || !outputs.some((out) => out.waiting)) return
    paused = true
    t.pause()
    if (!saidBehind) watch()
  }
  const caughtUp = () => {
    if (!paused || outputs.some((out) => out.waiting)) return
    paused = false
    t.resume()
  }
  const take = (r: TapRecord) => {
    switch (r.type) {
      case 'message':
        summary.add(r)
        if (record(r)) show(messageLine(r))
        break
      case 'open':
        open++
        summary.sessions++
        if (record(r)) show(`session #${r.session} opened`)
        break
      case 'close':
        if (record(r)) show(`session #${r.session} closed${r.reason ? `: ${r.reason}` : ''}`)
        if (--open === 0) printSummary()
        break
      case 'refused':
        if (record(r)) {
          show(
            `a client came and was closed: ${r.full ? 'the tap is full' : 'the server could not be reached'}: ${r.reason}`,
          )
        }
        break
    }
    behind()
  }

  // From here every way of ending closes the tap first, so no LISTEN is left behind.
  let code: number | undefined
  const ended = new Promise<void>((resolve) => t.once('end', () => resolve()))
  const stop = (exitCode: number) => {
    // The first reason to end gives the exit code, unless output is lost after it: then 1.
    if (code === undefined || exitCode === 1) code = exitCode
    clearInterval(watching)
    void t.close()
  }
  const signalled = () => stop(0)
  process.on('SIGINT', signalled)
  process.on('SIGTERM', signalled)
  const stdout = new Output('stdout', process.stdout, caughtUp, (e) => {
    // `| head` has read what it wanted: end as SIGPIPE would end us, quietly (but with the tap
    // closed). Any other failure is said, once.
    if (e.code === 'EPIPE') return stop(141)
    process.stderr.write(`vfio-user: stdout: ${reason(e)}\n`)
    stop(1)
  })
  const outputs = [stdout]
  let file: Output | undefined
  if (fileStream) {
    const name = `--out ${o.out}`
    file = new Output(name, fileStream, caughtUp, (e) => {
      process.stderr.write(`vfio-user: ${name}: ${reason(e)}\n`)
      stop(1)
    })
    outputs.push(file)
  }
  const show = (line: string) => stdout.write(`${line}\n`)
  const record = (r: TapRecord) => {
    const ndjson = JSON.stringify(r)
    file?.write(`${ndjson}\n`)
    if (o.json) show(ndjson)
    return !o.json
  }
  const printSummary = () => {
    if (o.json) show(JSON.stringify(summary.toJson()))
    else show(summary.toText())
    file?.write(`${JSON.stringify(summary.toJson())}\n`)
  }

  try {
    for (const name of ['message', 'open', 'close', 'refused'] as const) t.on(name, take)
    const listening = JSON.stringify({ type: 'listening', listen: o.listen, connect: o.server })
    file?.write(`${listening}\n`)
    if (o.json) show(listening)
    else show(`tap: listening on ${o.listen}, relaying to ${o.server}`)
    await ended
    printSummary()
  } finally {
    // The tap is closed: a second Ctrl-C may now end a process still waiting for its output.
    process.off('SIGINT', signalled)
    process.off('SIGTERM', signalled)
    await file?.end()
  }
  return code ?? 0
}
