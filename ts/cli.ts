#!/usr/bin/env node
// The `vfio-user` command: `probe` (cli-probe.ts) and `migrate` (cli-migrate.ts). Errors are
// printed as `vfio-user: CODE: message`, with exit code 1; an unknown command prints the usages and exits 2.
import { migrateCommand, migrateUsage } from './cli-migrate'
import { probe, probeUsage } from './cli-probe'
import { VfioUserError } from './index'

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv
  if (cmd === 'probe') return probe(rest)
  if (cmd === 'migrate') return migrateCommand(rest)
  process.stderr.write(`${probeUsage}\n${migrateUsage}\n`)
  return 2
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (e: unknown) => {
    const msg = e instanceof VfioUserError ? `${e.code}: ${e.message}` : e instanceof Error ? e.message : String(e)
    process.stderr.write(`vfio-user: ${msg}\n`)
    process.exitCode = 1
  },
)
