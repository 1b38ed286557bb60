// `npm run pack:check`: the published packages, proven end to end on this machine.
//
// Builds the release binaries for this machine, packs the root package and this machine's
// platform package (`npm/linux-x64-gnu`) the way a release does, checks that each tarball
// holds exactly what it should, installs both into an empty project with no Rust toolchain
// on PATH, and there: probes the bundled test device with `npx vfio-user probe`, uses the API
// through `import` and `require` (one native instance), type-checks a consumer under node16,
// nodenext and bundler resolution, and checks the error when no binary fits. Prints the
// tarball sizes, the install time and what `require('vfio-user')` costs, then `N passed,
// N failed`. PACK_CHECK_NO_BUILD=1 skips the build (CI has just built everything).
import { spawnSync } from 'node:child_process'
import {
  copyFileSync,
  cpSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, delimiter, dirname, join, resolve } from 'node:path'

const root = resolve(import.meta.dirname, '..')
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const PLATFORM = 'linux-x64-gnu'
const PLATFORM_PACKAGE = `${pkg.name}-${PLATFORM}`
const NODE_FILE = `${pkg.napi.binaryName}.${PLATFORM}.node`
const DEVICE = 'vfio-user-test-device'
const MIGRATION_DEVICE = 'vfio-user-migration-device'
const DEVICES = [DEVICE, MIGRATION_DEVICE]

let passed = 0
let failed = 0

async function check(name, fn) {
  try {
    await fn()
    passed++
    console.log(`ok    ${name}`)
  } catch (e) {
    failed++
    console.log(`FAIL  ${name}\n      ${String(e instanceof Error ? e.message : e).replaceAll('\n', '\n      ')}`)
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(message)
}

/** Runs a command; throws with its output unless it exits 0 (or `expectFailure`). */
function run(cmd, args, options = {}) {
  const { expectFailure = false, ...rest } = options
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26, ...rest })
  if (r.error) throw r.error
  const ok = r.status === 0
  if (ok === expectFailure) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status ?? r.signal}\n${r.stdout}${r.stderr}`)
  }
  return r
}

if (process.platform !== 'linux' || process.arch !== 'x64' || !process.report.getReport().header.glibcVersionRuntime) {
  console.error(`pack:check packs the ${PLATFORM} package, so it runs on ${PLATFORM} only`)
  process.exit(1)
}

// 1. Build what a release of this platform ships.
if (!process.env.PACK_CHECK_NO_BUILD) {
  const inherit = { cwd: root, stdio: 'inherit' }
  run('npx', ['napi', 'build', '--platform', '--release', '--js', 'index.js', '--dts', 'index.d.ts'], inherit)
  run('cargo', ['build', '--release', '-p', 'test-device'], inherit)
  run('npm', ['run', 'build:ts'], inherit)
}

const work = mkdtempSync(join(tmpdir(), 'vfio-user-pack-'))
const out = join(work, 'tarballs')
mkdirSync(out)

try {
  await check('the committed loader and declarations are what napi generates', () => {
    const r = spawnSync('git', ['diff', '--stat', '--exit-code', '--', 'index.js', 'index.d.ts'], {
      cwd: root,
      encoding: 'utf8',
    })
    // Not a git checkout (an unpacked tarball): nothing to compare with.
    if (r.error || r.status === 128) return
    assert(r.status === 0, `napi build changed them; commit the result:\n${r.stdout}`)
  })

  // 2. Stage and pack the root package as a release does: `napi pre-publish` adds one
  // optional dependency per declared platform, at the root's version.
  const stageRoot = join(work, 'root')
  const listed = JSON.parse(run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root }).stdout)[0]
  for (const f of listed.files) {
    mkdirSync(dirname(join(stageRoot, f.path)), { recursive: true })
    copyFileSync(join(root, f.path), join(stageRoot, f.path))
  }
  const released = { ...pkg, optionalDependencies: {} }
  for (const target of pkg.napi.targets) released.optionalDependencies[`${pkg.name}-${triple(target)}`] = pkg.version
  writeFileSync(join(stageRoot, 'package.json'), `${JSON.stringify(released, null, 2)}\n`)
  const rootTarball = pack(stageRoot)

  // 3. Stage and pack this machine's platform package with its two binaries.
  const stagePlatform = join(work, PLATFORM)
  cpSync(join(root, 'npm', PLATFORM), stagePlatform, { recursive: true })
  copyFileSync(join(root, 'LICENSE'), join(stagePlatform, 'LICENSE'))
  copyFileSync(join(root, NODE_FILE), join(stagePlatform, NODE_FILE))
  for (const d of DEVICES) copyFileSync(join(root, 'target', 'release', d), join(stagePlatform, d))
  const platformTarball = pack(stagePlatform)

  // 4. Exactly what each tarball should hold.
  await check('the root tarball holds exactly the loader, the build, docs and licence', () => {
    const modules = readdirTs().flatMap((m) => [`dist/${m}.js`, `dist/${m}.d.ts`])
    const esm = ['index', 'testing'].flatMap((m) => [`dist/${m}.mjs`, `dist/${m}.d.mts`])
    const expected = [
      'package.json',
      'README.md',
      'LICENSE',
      'CHANGELOG.md',
      'index.js',
      'index.d.ts',
      ...modules,
      ...esm,
    ]
    sameFiles(tarFiles(rootTarball), expected)
  })
  await check(`the ${PLATFORM} tarball holds exactly its binaries, docs and licence`, () => {
    const files = tarFiles(platformTarball)
    sameFiles(files, ['package.json', 'README.md', 'LICENSE', NODE_FILE, ...DEVICES])
    const listing = run('tar', ['tvzf', platformTarball]).stdout
    for (const d of DEVICES) {
      const line = listing.split('\n').find((l) => l.endsWith(`package/${d}`)) ?? ''
      assert(/^-rwx/.test(line), `${d} is not executable in the tarball: ${line}`)
    }
  })
  await check('the root manifest: one optional dependency per platform, no install scripts, engines', () => {
    const m = tarJson(rootTarball, 'package/package.json')
    const want = pkg.napi.targets.map((t) => `${pkg.name}-${triple(t)}`).sort()
    assert(
      JSON.stringify(Object.keys(m.optionalDependencies ?? {}).sort()) === JSON.stringify(want),
      `optionalDependencies: ${JSON.stringify(m.optionalDependencies)}`,
    )
    for (const [name, v] of Object.entries(m.optionalDependencies)) assert(v === m.version, `${name} is at ${v}`)
    for (const s of ['preinstall', 'install', 'postinstall']) assert(!m.scripts?.[s], `an ${s} script ships`)
    assert(m.engines?.node === '>=20', `engines: ${JSON.stringify(m.engines)}`)
    for (const entry of ['.', './testing']) {
      const e = m.exports[entry]
      assert(e.import?.types && e.import?.default && e.require?.types && e.require?.default && e.default, entry)
    }
  })
  await check('every platform manifest names its os, cpu and libc', () => {
    for (const target of pkg.napi.targets) {
      const t = triple(target)
      const m = JSON.parse(readFileSync(join(root, 'npm', t, 'package.json'), 'utf8'))
      const [os, cpu, abi] = t.split('-')
      const libc = abi === 'gnu' ? 'glibc' : 'musl'
      assert(m.name === `${pkg.name}-${t}` && m.version === pkg.version, `${t}: ${m.name}@${m.version}`)
      assert(m.os?.[0] === os && m.cpu?.[0] === cpu && m.libc?.[0] === libc, `${t}: ${m.os} ${m.cpu} ${m.libc}`)
      assert(
        m.files?.includes(`${pkg.napi.binaryName}.${t}.node`) && DEVICES.every((d) => m.files?.includes(d)),
        `${t}: ${m.files}`,
      )
    }
  })

  // 5. Install into an empty project with no Rust toolchain to be found.
  const app = join(work, 'app')
  mkdirSync(app)
  writeFileSync(join(app, 'package.json'), '{ "name": "consumer", "version": "1.0.0", "private": true }\n')
  const env = withoutRust()
  let installMs = 0
  await check('installs from the tarballs with cargo and rustc absent', () => {
    for (const tool of ['cargo', 'rustc']) {
      assert(spawnSync(tool, ['--version'], { env }).error, `${tool} is still on PATH`)
    }
    const start = process.hrtime.bigint()
    run('npm', ['install', '--no-audit', '--no-fund', rootTarball, platformTarball], { cwd: app, env })
    installMs = Number(process.hrtime.bigint() - start) / 1e6
  })

  const node = (args, options = {}) => run(process.execPath, args, { cwd: app, env, ...options })
  await check('npx vfio-user probe starts the bundled test device and probes it', () => {
    const r = run('npx', ['--no-install', 'vfio-user', 'probe'], { cwd: app, env })
    assert(/max_data_xfer_size\s+1048576/.test(r.stdout), r.stdout)
    const where = node(['-e', "console.log(require('vfio-user/testing').testDeviceBinary())"]).stdout.trim()
    assert(where.includes(join('node_modules', PLATFORM_PACKAGE, DEVICE)), `the device came from ${where}`)
    const migration = node(['-e', "console.log(require('vfio-user/testing').migrationDeviceBinary())"]).stdout.trim()
    assert(
      migration.includes(join('node_modules', PLATFORM_PACKAGE, MIGRATION_DEVICE)),
      `the migration device came from ${migration}`,
    )
  })
  await check('import: the API, the testing helpers, one native instance shared with require', () => {
    writeFileSync(
      join(app, 'check.mjs'),
      `import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import vfio, { Command, connect, VfioUserClient } from 'vfio-user'
import { startTestDevice } from 'vfio-user/testing'
const require = createRequire(import.meta.url)
assert.equal(require('vfio-user').connect, connect)
assert.equal(require('vfio-user').VfioUserClient, VfioUserClient)
assert.equal(vfio.connect, connect)
const device = await startTestDevice()
const client = await connect(device.socketPath)
await client.validateVersion()
const p = Buffer.alloc(16)
p.writeUInt32LE(16)
const r = await client.sendWait(Command.DEVICE_GET_INFO, p)
assert.equal(r.payload.readUInt32LE(8), 9)
assert.ok(client instanceof require('vfio-user').VfioUserClient)
await client.close()
await device.close()
console.log('ok')
`,
    )
    assert(node(['check.mjs']).stdout.trim() === 'ok', 'check.mjs')
  })
  await check('require: the API and the testing helpers', () => {
    writeFileSync(
      join(app, 'check.cjs'),
      `const assert = require('node:assert/strict')
const { Command, connect } = require('vfio-user')
const { startTestDevice } = require('vfio-user/testing')
;(async () => {
  const device = await startTestDevice()
  const client = await connect(device.socketPath)
  await client.validateVersion()
  const p = Buffer.alloc(16)
  p.writeUInt32LE(16)
  assert.equal(client.sendWaitSync(Command.DEVICE_GET_INFO, p).payload.readUInt32LE(8), 9)
  await client.close()
  await device.close()
  console.log('ok')
})()
`,
    )
    assert(node(['check.cjs']).stdout.trim() === 'ok', 'check.cjs')
  })

  // Types, as a consumer's compiler sees them.
  writeFileSync(
    join(app, 'consumer.mts'),
    `import { type Reply, type VersionInfo, Command, connect, VfioUserError } from 'vfio-user'
import { startTestDevice, type TestDevice } from 'vfio-user/testing'
export async function probe(): Promise<VersionInfo> {
  const device: TestDevice = await startTestDevice()
  const client = await connect(device.socketPath, { timeoutMs: 1000 })
  const v = await client.validateVersion()
  const r: Reply = client.sendWaitSync(Command.DEVICE_GET_INFO, new Uint8Array(16))
  const n: number = r.payload.length
  const e: VfioUserError | undefined = n < 0 ? new VfioUserError('EIO', 5, 'x') : undefined
  void e
  await client.close()
  await device.close()
  return v
}
`,
  )
  writeFileSync(
    join(app, 'consumer.cts'),
    `import vfio = require('vfio-user')
import testing = require('vfio-user/testing')
export const start: typeof testing.startTestDevice = testing.startTestDevice
export const get: number = vfio.Command.DEVICE_GET_INFO
`,
  )
  copyFileSync(join(app, 'consumer.mts'), join(app, 'consumer.ts'))
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  const types = ['--types', 'node', '--typeRoots', join(root, 'node_modules', '@types')]
  const common = ['--noEmit', '--strict', '--target', 'es2022', '--lib', 'es2022,esnext.disposable', ...types]
  for (const [resolution, module, files] of [
    ['node16', 'node16', ['consumer.mts', 'consumer.cts']],
    ['nodenext', 'nodenext', ['consumer.mts', 'consumer.cts']],
    ['bundler', 'esnext', ['consumer.ts']],
  ]) {
    await check(`types resolve under moduleResolution ${resolution}`, () => {
      node([tsc, ...common, '--module', module, '--moduleResolution', resolution, ...files])
    })
  }

  await check('with no binary for the platform, the error names the platform, libc and packages tried', () => {
    const installed = join(app, 'node_modules', PLATFORM_PACKAGE)
    renameSync(installed, `${installed}.hidden`)
    try {
      const r = node(['-e', "require('vfio-user')"], { expectFailure: true })
      for (const word of ['linux', 'x64', 'glibc', PLATFORM_PACKAGE, `${pkg.napi.binaryName}.${PLATFORM}.node`]) {
        assert(r.stderr.includes(word), `the error does not say ${word}:\n${r.stderr}`)
      }
    } finally {
      renameSync(`${installed}.hidden`, installed)
    }
  })

  // Figures for the release notes (printed, not judged: timings vary between machines).
  const loadMs = (code) => {
    const times = []
    for (let i = 0; i < 9; i++) {
      const start = process.hrtime.bigint()
      node(['-e', code])
      times.push(Number(process.hrtime.bigint() - start) / 1e6)
    }
    return times.sort((a, b) => a - b)[4]
  }
  const bare = loadMs('0')
  const loaded = loadMs("require('vfio-user')")
  console.log('')
  console.log(`${basename(rootTarball)}  ${kb(rootTarball)}`)
  console.log(`${basename(platformTarball)}  ${kb(platformTarball)}`)
  console.log(`install of both into an empty project: ${installMs.toFixed(0)} ms`)
  console.log(
    `node -e "require('vfio-user')" ${loaded.toFixed(1)} ms, node -e "0" ${bare.toFixed(1)} ms: +${(loaded - bare).toFixed(1)} ms (medians of 9)`,
  )
} finally {
  rmSync(work, { recursive: true, force: true })
}

console.log(`${passed} passed, ${failed} failed`)
process.exitCode = failed > 0 ? 1 : 0

/** `x86_64-unknown-linux-gnu` → `linux-x64-gnu`, napi-rs's platform naming. */
function triple(target) {
  const [arch, , os, abi] = target.split('-')
  const cpu = { x86_64: 'x64', aarch64: 'arm64' }[arch]
  if (!cpu || os !== 'linux') throw new Error(`unexpected target ${target}`)
  return `${os}-${cpu}-${abi}`
}

function pack(dir) {
  const r = run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', out], { cwd: dir })
  return join(out, JSON.parse(r.stdout)[0].filename)
}

function tarFiles(tarball) {
  return run('tar', ['tzf', tarball])
    .stdout.split('\n')
    .filter((l) => l && !l.endsWith('/'))
    .map((l) => l.replace(/^package\//, ''))
}

function tarJson(tarball, path) {
  return JSON.parse(run('tar', ['xzOf', tarball, path]).stdout)
}

function sameFiles(actual, expected) {
  const extra = actual.filter((f) => !expected.includes(f))
  const missing = expected.filter((f) => !actual.includes(f))
  assert(
    extra.length === 0 && missing.length === 0,
    `extra: ${extra.join(', ') || '-'}; missing: ${missing.join(', ') || '-'}`,
  )
}

/** The facade's modules (ts/*.ts), each of which becomes dist/X.js and dist/X.d.ts. */
function readdirTs() {
  return readdirSync(join(root, 'ts'))
    .filter((f) => f.endsWith('.ts'))
    .map((f) => f.slice(0, -3))
}

/**
 * The environment with cargo and rustc gone from PATH: a directory that holds them is
 * replaced by one with links to everything else in it (so a system directory that also
 * holds node, npm and tar stays usable).
 */
function withoutRust() {
  const rust = /^(cargo|rustc|rustup|rustdoc|rust-.*|cargo-.*)$/
  const shims = join(work, 'path')
  const dirs = (process.env.PATH ?? '').split(delimiter).map((d, i) => {
    let names
    try {
      names = readdirSync(d)
    } catch {
      return d
    }
    if (!names.some((n) => rust.test(n))) return d
    const shim = join(shims, String(i))
    mkdirSync(shim, { recursive: true })
    for (const n of names) if (!rust.test(n)) symlinkSync(join(d, n), join(shim, n))
    return shim
  })
  const env = { ...process.env, PATH: dirs.join(delimiter) }
  delete env.CARGO_HOME
  delete env.RUSTUP_HOME
  delete env.RUSTUP_TOOLCHAIN
  return env
}

function kb(file) {
  return `${(statSync(file).size / 1024).toFixed(1)} kB`
}
