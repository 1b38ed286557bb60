// `npm test`: every suite (cargo test for the crates, vitest for the public API), then one
// closing line `N passed, N failed` summing them all. Exits non-zero if anything failed.
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

let passed = 0
let failed = 0
let broken = false

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 28 })
  process.stdout.write(r.stdout ?? '')
  if (r.status !== 0) broken = true
  return r.stdout ?? ''
}

// cargo test: one "test result: ok. N passed; M failed; ..." line per test binary.
const cargo = run('cargo', ['test', '--workspace', '--color', 'never'])
for (const m of cargo.matchAll(/^test result: \w+\. (\d+) passed; (\d+) failed/gm)) {
  passed += Number(m[1])
  failed += Number(m[2])
}

// vitest: read its JSON report rather than scraping the console.
const dir = mkdtempSync(join(tmpdir(), 'vfio-user-test-'))
const report = join(dir, 'vitest.json')
run('npx', ['vitest', 'run', '--reporter=default', '--reporter=json', `--outputFile.json=${report}`])
try {
  const r = JSON.parse(readFileSync(report, 'utf8'))
  passed += r.numPassedTests
  failed += r.numFailedTests
  if (r.numFailedTestSuites > 0 && r.numFailedTests === 0) failed += r.numFailedTestSuites
} catch {
  broken = true
} finally {
  rmSync(dir, { recursive: true, force: true })
}

if (broken && failed === 0) failed = 1
console.log(`${passed} passed, ${failed} failed`)
process.exitCode = failed > 0 || broken ? 1 : 0
