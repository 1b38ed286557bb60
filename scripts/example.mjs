// `node scripts/example.mjs NAME [ARGS...]`: runs examples/NAME.ts as a user of the package
// would, against this checkout's build: every examples/*.ts is compiled to an ES module
// (TypeScript's transpiler) in a temporary folder, 'vfio-user' pointed at dist/, local imports
// at their compiled twins; then NAME runs with ARGS, and its exit status is this one's.
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import ts from 'typescript'

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
const [name, ...args] = process.argv.slice(2)
if (!name) {
  console.error('usage: node scripts/example.mjs NAME [ARGS...]  (examples/NAME.ts)')
  process.exit(2)
}
const out = mkdtempSync(join(tmpdir(), 'vfio-user-example-'))
try {
  const dist = pathToFileURL(join(root, 'dist', 'index.mjs')).href
  for (const file of readdirSync(join(root, 'examples')).filter((f) => f.endsWith('.ts'))) {
    const js = ts.transpileModule(readFileSync(join(root, 'examples', file), 'utf8'), {
      compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    }).outputText
    const linked = js
      .replaceAll(`from 'vfio-user'`, `from '${dist}'`)
      .replace(/from '\.\/([\w-]+)'/g, `from './$1.mjs'`)
    writeFileSync(join(out, file.replace(/\.ts$/, '.mjs')), linked)
  }
  const r = spawnSync(process.execPath, [join(out, `${name}.mjs`), ...args], { stdio: 'inherit' })
  process.exitCode = r.status ?? 1
} finally {
  rmSync(out, { recursive: true, force: true })
}
