// `npm run fuzz -- [--seconds N] [--grow] [--sanitizer S] [target...]`: runs the cargo-fuzz
// (libFuzzer) targets in fuzz/ for N seconds each (default 60), all of them unless targets
// are named, and prints one summary line per target. Needs the nightly toolchain; installs
// cargo-fuzz from crates.io if `cargo fuzz` is missing.
//
// fuzz/corpus/<target>/ is a read-only seed: new inputs libFuzzer finds go to a temporary
// directory, unless --grow is given, in which case they are added to the committed corpus.
// A crash leaves its input in fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/
// so `cargo test -p vfio-user-proto` replays it from then on. Exits non-zero on any crash.
import { spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const fuzzDir = join(root, 'fuzz')
const ALL = readdirSync(join(fuzzDir, 'fuzz_targets'))
  .filter((f) => f.endsWith('.rs'))
  .map((f) => f.slice(0, -3))
  .sort()

function usage(msg) {
  if (msg) console.error(`fuzz: ${msg}`)
  console.error(`usage: npm run fuzz -- [--seconds N] [--grow] [--sanitizer S] [${ALL.join('|')}...]`)
  process.exit(2)
}

let seconds = 60
let grow = false
let sanitizer = null
const targets = []
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const [flag, inline] = argv[i].split(/=(.*)/s)
  const value = () => inline ?? argv[++i] ?? usage(`${flag} needs a value`)
  if (flag === '--seconds') {
    seconds = Number(value())
    if (!Number.isInteger(seconds) || seconds < 1) usage('--seconds must be a positive integer')
  } else if (flag === '--grow') grow = true
  else if (flag === '--sanitizer') sanitizer = value()
  else if (flag === '--help' || flag === '-h') usage()
  else if (flag.startsWith('-')) usage(`unknown option ${flag}`)
  else if (ALL.includes(flag)) targets.push(flag)
  else usage(`unknown target ${flag}`)
}
if (targets.length === 0) targets.push(...ALL)

function sh(cmd, args, opts = {}) {
  console.log(`$ ${cmd} ${args.join(' ')}`)
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root, ...opts })
  if (r.error) throw r.error
  return r.status
}

if (spawnSync('cargo', ['fuzz', '--version'], { stdio: 'ignore' }).status !== 0) {
  console.log('cargo-fuzz is missing: installing it')
  if (sh('cargo', ['install', 'cargo-fuzz', '--locked']) !== 0) {
    console.error('fuzz: could not install cargo-fuzz')
    process.exit(1)
  }
}

const san = sanitizer ? ['--sanitizer', sanitizer] : []
// Build every target first so that each one's seconds are spent fuzzing, not compiling.
if (sh('cargo', ['+nightly', 'fuzz', 'build', ...san]) !== 0) {
  console.error('fuzz: build failed (is the nightly toolchain installed? `rustup toolchain install nightly`)')
  process.exit(1)
}

// Runs one target, echoing libFuzzer's output and keeping it for the summary.
function fuzz(target) {
  const seed = join(fuzzDir, 'corpus', target)
  const scratch = grow ? null : mkdtempSync(join(tmpdir(), `vfio-user-fuzz-${target}-`))
  const corpora = grow ? [seed] : [scratch, seed]
  const args = ['+nightly', 'fuzz', 'run', ...san, target, ...corpora, '--']
  args.push(`-max_total_time=${seconds}`, '-print_final_stats=1')
  console.log(`\n$ cargo ${args.join(' ')}`)
  const started = Date.now()
  return new Promise((done) => {
    const child = spawn('cargo', args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    const keep = (chunk, sink) => {
      const s = chunk.toString()
      out += s
      if (out.length > 1 << 22) out = out.slice(-(1 << 21))
      sink.write(s)
    }
    child.stdout.on('data', (c) => keep(c, process.stdout))
    child.stderr.on('data', (c) => keep(c, process.stderr))
    child.on('close', (code, signal) => {
      const found = scratch ? readdirSync(scratch).length : null
      if (scratch) rmSync(scratch, { recursive: true, force: true })
      done({ target, code, signal, out, found, wall: (Date.now() - started) / 1000 })
    })
  })
}

function summarize({ target, code, signal, out, found, wall }) {
  const last = (re) => [...out.matchAll(re)].at(-1)
  const units = last(/stat::number_of_executed_units:\s*(\d+)/g)
  const done = last(/Done (\d+) runs in (\d+) second/g)
  const cov = last(/^#\d+\s+(?:DONE|pulse|NEW|REDUCE)\s+cov: (\d+) ft: (\d+)/gm)
  const execs = units?.[1] ?? done?.[1] ?? last(/^#(\d+)\s+DONE/gm)?.[1] ?? '?'
  const secs = done?.[2] ?? '?'
  const artifacts = [...out.matchAll(/Test unit written to (\S+)/g)].map((m) => m[1])
  const panic = last(/panicked at ([^\n]+)\n([^\n]*)/g)
  const ok = code === 0 && artifacts.length === 0
  let line = `${target.padEnd(14)} ${ok ? 'ok   ' : 'CRASH'} ${execs} execs in ${secs}s fuzzing`
  line += ` (${wall.toFixed(0)}s wall)`
  if (cov) line += `, cov ${cov[1]} ft ${cov[2]}`
  if (found !== null) line += `, ${found} new inputs (discarded)`
  if (!ok) {
    line += `; exit ${code ?? signal}`
    if (artifacts.length) line += `; input: ${artifacts.join(', ')}`
    if (panic) line += `; panicked at ${panic[1]} ${panic[2].trim()}`
  }
  return { ok, line }
}

const results = []
for (const t of targets) results.push(summarize(await fuzz(t)))
console.log(`\nfuzz summary (${seconds}s per target${grow ? ', corpus grown in place' : ''}):`)
for (const r of results) console.log(r.line)
const crashed = results.filter((r) => !r.ok).length
if (crashed) {
  console.log(`${crashed} target(s) crashed: copy each input to fuzz/regressions/<target>/ and fix the bug`)
}
process.exitCode = crashed ? 1 : 0
