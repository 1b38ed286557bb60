#!/usr/bin/env node
// The `vfio-user` command: `probe` (cli-probe.ts), `migrate` (cli-migrate.ts) and `tap` (cli-tap.ts). `--help`
// prints the usage (exit 0), `--version` the package's version. A command line that cannot
// run prints what was wrong and the usage, exit code 2 (an argument naming what cannot be
// used, such as an --out file in a missing folder, prints one line); a failure while running
// prints `vfio-user: CODE: message`, exit code 1. `tap` whose stdout's reader has gone
// (`| head`) ends quietly with 141, as a command SIGPIPE ended.
import { migrateCommand, migrateUsage } from './cli-migrate'
import { probe, probeUsage } from './cli-probe'
import { tapCommand, tapUsage } from './cli-tap'
import { packageVersion, UsageError } from './cli-usage'
import { VfioUserError } from './index'

const usage = `${probeUsage}\n${migrateUsage}\n${tapUsage}\n       vfio-user --version`

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv
  if (cmd === 'probe') return probe(rest)
  if (cmd === 'migrate') return migrateCommand(rest)
  if (cmd === 'tap') return tapCommand(rest)
  if (cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(`${usage}\n`)
    return 0
  }
  if (cmd === '--version' || cmd === '-v') {
    process.stdout.write(`${packageVersion()}\n`)
    return 0
  }
  throw new UsageError(cmd === undefined ? 'no command given' : `unknown command ${cmd}`, usage)
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (e: unknown) => {
    if (e instanceof UsageError) {
      process.stderr.write(`vfio-user: ${e.message}\n${e.usage ? `${e.usage}\n` : ''}`)
      process.exitCode = 2
      return
    }
    const msg = e instanceof VfioUserError ? `${e.code}: ${e.message}` : e instanceof Error ? e.message : String(e)
    process.stderr.write(`vfio-user: ${msg}\n`)
    process.exitCode = 1
  },
)
