// Every TypeScript block of the README runs as written: each is compiled as its own module
// (TypeScript's transpiler, imports of 'vfio-user' and 'vfio-user/testing' pointed at this
// checkout's dist/), run by Node in a process of its own, and must exit 0 with nothing on
// stderr. The shell blocks are what CI itself does (npm install, npm test), and
// `npm run pack:check` installs the packed package and runs `npx vfio-user probe`.
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import ts from 'typescript'
import { afterAll, describe, expect, it } from 'vitest'

const root = join(__dirname, '..')
const readme = readFileSync(join(root, 'README.md'), 'utf8')
const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((m) => ({
  code: m[1] as string,
  line: readme.slice(0, m.index).split('\n').length + 1,
}))
const dir = mkdtempSync(join(tmpdir(), 'vfio-user-readme-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

/** The block as an ES module that imports this checkout's build. */
function compile(code: string): string {
  const js = ts.transpileModule(code, {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
  }).outputText
  const dist = (f: string) => pathToFileURL(join(root, 'dist', f)).href
  return js
    .replaceAll(`from 'vfio-user/testing'`, `from '${dist('testing.mjs')}'`)
    .replaceAll(`from 'vfio-user'`, `from '${dist('index.mjs')}'`)
}

describe('README', () => {
  it('has TypeScript examples', () => {
    expect(blocks.length).toBeGreaterThanOrEqual(5)
  })

  for (const [i, b] of blocks.entries()) {
    it(`the example at README.md:${b.line} runs as written`, () => {
      const file = join(dir, `example-${i}.mjs`)
      writeFileSync(file, compile(b.code))
      // A bound for a hang (an example that waits for something that never comes), not a
      // measure: they take well under a second.
      const r = spawnSync(process.execPath, [file], { encoding: 'utf8', timeout: 60_000 })
      expect({ status: r.status, signal: r.signal, stderr: r.stderr }).toEqual({ status: 0, signal: null, stderr: '' })
    })
  }
})
