// `npm test`: every suite (cargo test for the crates, vitest for the public API), then one
// closing line `N passed, N failed, N skipped` summing them all. Exits non-zero if anything
// failed, or if a test was skipped that is not allowed to be on this machine.
//
// Before the suites, libvfio-user's samples (the second real peer, ../shared/peers) are built
// once here, outside any test's timeout, and handed to the tests in
// $VFIO_USER_LIBVFIO_SAMPLES. Where that script does not exist and the variable is not set,
// the interop tests fail: a peer that cannot be had is never a skip.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
let passed = 0
let failed = 0
let skipped = 0
let broken = false

function run(cmd, args, env = process.env) {
  const r = spawnSync(cmd, args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 28,
    cwd: root,
    env,
  })
  process.stdout.write(r.stdout ?? '')
  if (r.status !== 0) broken = true
  return r.stdout ?? ''
}

const peers = resolve(root, '../shared/peers/build-libvfio-user')
if (!process.env.VFIO_USER_LIBVFIO_SAMPLES && existsSync(peers)) {
  console.log(`building libvfio-user's samples (${peers})`)
  const r = spawnSync(peers, [], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  const dir = (r.stdout ?? '').trim().split('\n').pop() ?? ''
  if (r.status === 0 && existsSync(join(dir, 'server'))) {
    process.env.VFIO_USER_LIBVFIO_SAMPLES = dir
    console.log(`libvfio-user's samples: ${dir}`)
  } else {
    console.log(`building libvfio-user's samples failed (exit ${r.status}): the interop tests will fail`)
    broken = true
  }
}

// SPDK's nvmf_tgt (the production vfio-user server) the same way: 10-15 minutes the first
// time, cached after; its suite fails, never skips, without it (`VFIO_USER_SPDK=none` skips it,
// which fails the run unless $VFIO_USER_ALLOWED_SKIPS names it).
const spdkScript = resolve(root, '../shared/peers/build-spdk')
if (!process.env.VFIO_USER_SPDK && existsSync(spdkScript)) {
  console.log(`building SPDK's nvmf_tgt (${spdkScript}; 10-15 minutes the first time)`)
  const r = spawnSync(spdkScript, [], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
  const dir = (r.stdout ?? '').trim().split('\n').pop() ?? ''
  if (r.status === 0 && existsSync(join(dir, 'build/bin/nvmf_tgt'))) {
    process.env.VFIO_USER_SPDK = dir
    console.log(`SPDK: ${dir}`)
  } else {
    console.log(`building SPDK failed (exit ${r.status}): the SPDK tests will fail`)
    broken = true
  }
}

// cargo test: one "test result: ok. N passed; M failed; K ignored; ..." line per test binary.
// --no-fail-fast: a failing binary must not hide the ones after it.
const cargo = run('cargo', ['test', '--workspace', '--no-fail-fast', '--color', 'never'])
for (const m of cargo.matchAll(/^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored/gm)) {
  passed += Number(m[1])
  failed += Number(m[2])
  skipped += Number(m[3])
}

// vitest runs what was just built, and says which: the release module, test devices and dist/
// (the CLI tests run dist/, the others ts/), rebuilt here if the sources changed (cargo and
// tsc only redo what changed), and the devices named explicitly, so that the debug builds
// cargo test just made are never picked up instead.
run('npm', ['run', '--silent', 'build'])
for (const [env, name] of [
  ['VFIO_USER_TEST_DEVICE', 'vfio-user-test-device'],
  ['VFIO_USER_SCRIPTED_PEER', 'vfio-user-scripted-peer'],
  ['VFIO_USER_HOSTILE_PEER', 'vfio-user-hostile-peer'],
  ['VFIO_USER_MIGRATION_DEVICE', 'vfio-user-migration-device'],
]) {
  process.env[env] ??= join(root, 'target', 'release', name)
  console.log(`${env}=${process.env[env]}`)
}

// vitest: read its JSON report rather than scraping the console. Run twice: every suite as
// it is, then the typed suites again with each connection going through `vfio-user tap`
// (which must change nothing: __test__/through-tap.ts).
const skips = []
function vitest(label, files, env) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-test-'))
  const report = join(dir, 'vitest.json')
  console.log(`vitest: ${label}`)
  run('npx', ['vitest', 'run', '--reporter=default', '--reporter=json', `--outputFile.json=${report}`, ...files], {
    ...process.env,
    ...env,
  })
  try {
    const r = JSON.parse(readFileSync(report, 'utf8'))
    passed += r.numPassedTests
    failed += r.numFailedTests
    skipped += r.numPendingTests + r.numTodoTests
    if (r.numFailedTestSuites > 0 && r.numFailedTests === 0) failed += r.numFailedTestSuites
    for (const file of r.testResults)
      for (const t of file.assertionResults)
        if (t.status === 'pending' || t.status === 'skipped' || t.status === 'todo')
          skips.push(`${label}: ${t.fullName}`)
  } catch {
    broken = true
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}
vitest('every suite', [], {})
vitest(
  'the typed suites through vfio-user tap',
  [
    '__test__/typed.test.ts',
    '__test__/dma.test.ts',
    '__test__/irq.test.ts',
    '__test__/read-into.test.ts',
    '__test__/tracing.test.ts',
    '__test__/lvu-server.test.ts',
  ],
  { VFIO_USER_THROUGH_TAP: '1' },
)

// A skip hides a test that did not run: none is expected anywhere, unless the machine says so
// by name in $VFIO_USER_ALLOWED_SKIPS (substrings of test names, separated by '|').
const allowed = (process.env.VFIO_USER_ALLOWED_SKIPS ?? '').split('|').filter(Boolean)
const unexpected = skips.filter((name) => !allowed.some((a) => name.includes(a)))
for (const name of skips) console.log(`skipped: ${name}${unexpected.includes(name) ? ' (not allowed here)' : ''}`)
if (unexpected.length > 0 || (skipped > skips.length && allowed.length === 0)) broken = true

if (broken && failed === 0) failed = 1
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exitCode = failed > 0 || broken ? 1 : 0
