#!/usr/bin/env node
// `vfio-user probe [SOCKET] [--json]`: connect, negotiate, print the version, every capability
// and any warnings. Without SOCKET it starts the bundled test device and probes that.
import { connect, type VersionInfo, VfioUserError } from './index'
import { startTestDevice, type TestDevice } from './testing'

const usage = 'usage: vfio-user probe [SOCKET] [--json] [--timeout MS]'

function format(path: string, v: VersionInfo): string {
  const c = v.capabilities
  const lines = [
    `socket              ${path}`,
    `version             ${v.major}.${v.minor}`,
    `max_msg_fds         ${c.maxMsgFds}`,
    `max_data_xfer_size  ${c.maxDataXferSize}`,
    `max_dma_maps        ${c.maxDmaMaps}`,
    `pgsizes             0x${c.pgsizes.toString(16)}`,
    `write_multiple      ${c.writeMultiple}`,
    `migration           ${c.migration ? `pgsize ${c.migration.pgsize}, max_bitmap_size ${c.migration.maxBitmapSize}` : 'absent'}`,
    `twin_socket         ${c.twinSocket ? JSON.stringify(c.twinSocket) : 'absent'}`,
  ]
  for (const w of v.warnings) lines.push(`warning             ${w}`)
  return lines.join('\n')
}

async function probe(args: string[]): Promise<number> {
  const json = args.includes('--json')
  let timeoutMs = 5000
  const positional: string[] = []
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string
    if (a === '--json') continue
    if (a === '--timeout') {
      timeoutMs = Number(args[++i])
      continue
    }
    if (a.startsWith('-')) throw new RangeError(`unknown option ${a}\n${usage}`)
    positional.push(a)
  }
  if (positional.length > 1) throw new RangeError(usage)
  const device: TestDevice | undefined = positional[0] === undefined ? await startTestDevice() : undefined
  const path = positional[0] ?? (device as TestDevice).socketPath
  try {
    const client = await connect(path, { timeoutMs })
    try {
      const v = await client.validateVersion()
      process.stdout.write(`${json ? JSON.stringify({ socket: path, ...v }, null, 2) : format(path, v)}\n`)
    } finally {
      await client.close()
    }
  } finally {
    await device?.close()
  }
  return 0
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv
  if (cmd === 'probe') return probe(rest)
  process.stderr.write(`${usage}\n`)
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
