// Runs a test's connection through `vfio-user tap` when $VFIO_USER_THROUGH_TAP is set (npm
// test runs the typed suites a second time that way): the tap is a process of its own, so
// the test's fd and thread counts see only the client, as without it. It must change
// nothing: every suite passes through it as it does directly.
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** The compiled `vfio-user` command. */
export const cli = join(__dirname, '..', 'dist', 'cli.js')

/** Whether this run goes through a tap. */
export const throughTap = process.env.VFIO_USER_THROUGH_TAP === '1'

/** A tap process in front of `upstream`: the path to connect to instead, and how to end it. */
export interface TapProcess {
  readonly path: string
  readonly process: ChildProcess
  /** Everything it printed (its lines, the summary). */
  output(): string
  /** Ends it (SIGINT: it prints its summary) and waits for it. */
  close(): Promise<number | null>
}

/** Starts `vfio-user tap` in front of `upstream` and resolves once it listens. */
export async function startTap(upstream: string, args: string[] = []): Promise<TapProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-tap-'))
  const path = join(dir, 'tap.sock')
  const child = spawn(process.execPath, [cli, 'tap', path, upstream, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    err += d
  })
  const exited = new Promise<number | null>((done) => child.once('close', (code) => done(code)))
  await new Promise<void>((ready, fail) => {
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d
      // Its first line, in either form, says it listens.
      if (out.includes('listening')) ready()
    })
    void exited.then((code) => fail(new Error(`the tap exited (${code}) before listening: ${err}`)))
  })
  return {
    path,
    process: child,
    output: () => out,
    async close() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT')
      const code = await exited
      rmSync(dir, { recursive: true, force: true })
      return code
    },
  }
}
