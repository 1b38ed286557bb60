// `vfio-user probe [SOCKET] [--json]`: connect, negotiate, and show what the device is, as
// `lspci -vv` would: version and capabilities, device info, every region and irq index, and
// the PCI config header. Without SOCKET it starts the bundled test device and probes that.

import { UsageError, wholeNumber } from './cli-usage'
import {
  connect,
  type DeviceInfo,
  decodePciConfig,
  type IrqInfo,
  type PciConfig,
  type RegionInfo,
  type VersionInfo,
  type VfioUserClient,
} from './index'
import { startTestDevice, type TestDevice } from './testing'

/** How `vfio-user probe` is called. */
export const probeUsage = 'usage: vfio-user probe [SOCKET] [--json] [--timeout MS] [--dump REGION[:OFFSET[:LENGTH]]]...'

/** What the inspector found. A part the server refused is reported, not fatal. */
interface Inspection {
  socket: string
  version: VersionInfo
  device?: DeviceInfo
  regions: Array<Omit<RegionInfo, 'fd' | 'takeFd' | 'close' | typeof Symbol.dispose> & { hasFd: boolean }>
  irqs: IrqInfo[]
  pci?: PciConfig
  /** The regions asked for with `--dump`, as hex lines (`asked`: the length asked, when more than was read). */
  dumps: Array<{ region: number; offset: number; length: number; asked?: number; lines: string[] }>
  errors: string[]
}

/** A `--dump REGION[:OFF[:LEN]]`. */
interface Dump {
  region: number
  offset: number
  length?: number
}

/** Parses `REGION[:OFF[:LEN]]` (numbers in decimal or 0x hex). */
function dumpSpec(spec: string | undefined): Dump {
  const parts = (spec ?? '').split(':')
  const num = (v: string | undefined) => (v !== undefined && /^(0x[0-9a-f]+|\d+)$/i.test(v) ? Number(v) : Number.NaN)
  const [region, offset, length] = [
    num(parts[0]),
    parts[1] === undefined ? 0 : num(parts[1]),
    parts[2] === undefined ? undefined : num(parts[2]),
  ]
  if (
    parts.length > 3 ||
    !Number.isSafeInteger(region) ||
    !Number.isSafeInteger(offset) ||
    (length !== undefined && !(Number.isSafeInteger(length) && length > 0))
  ) {
    throw new UsageError(`--dump needs REGION[:OFFSET[:LENGTH]], got ${spec ?? 'nothing'}`, probeUsage)
  }
  return length === undefined ? { region, offset } : { region, offset, length }
}

/** Reads a `--dump` (at most 64 KiB; by default up to 256 bytes of the region from `offset`). */
async function dump(client: VfioUserClient, d: Dump, found: Inspection) {
  const size = found.regions.find((r) => r.index === d.region)?.size
  const left = size === undefined ? 256 : Math.max(0, Number(size) - d.offset)
  const wanted = d.length ?? Math.min(256, left)
  const length = Math.min(wanted, MAX_DUMP)
  const bytes = await client.regionRead(d.region, d.offset, length)
  const cut = wanted > length ? { asked: wanted } : {}
  return { region: d.region, offset: d.offset, length, ...cut, lines: hexdump(bytes, d.offset) }
}

/** The most one `--dump` reads. */
const MAX_DUMP = 1 << 16

function failedDump(d: Dump, e: unknown) {
  return {
    region: d.region,
    offset: d.offset,
    length: d.length ?? 0,
    lines: [`error: ${e instanceof Error ? e.message : String(e)}`],
  }
}

/**
 * `bytes` as `offset: 16 hex bytes  |ascii|` lines; a run of lines equal to the one before is
 * one `*`, as `hexdump` prints it, and the last line is always shown.
 */
function hexdump(bytes: Buffer, base: number): string[] {
  const lines: string[] = []
  let starred = false
  for (let at = 0; at < bytes.length; at += 16) {
    const row = bytes.subarray(at, at + 16)
    const last = at + 16 >= bytes.length
    if (at > 0 && !last && row.length === 16 && row.equals(bytes.subarray(at - 16, at))) {
      if (!starred) lines.push('*')
      starred = true
      continue
    }
    starred = false
    const hexes = [...row].map((b) => b.toString(16).padStart(2, '0')).join(' ')
    const ascii = [...row].map((b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('')
    lines.push(`${(base + at).toString(16).padStart(8, '0')}  ${hexes.padEnd(47)}  |${ascii}|`)
  }
  return lines
}

const REGION_NAMES = ['BAR0', 'BAR1', 'BAR2', 'BAR3', 'BAR4', 'BAR5', 'ROM', 'CONFIG', 'VGA']
const IRQ_NAMES = ['INTx', 'MSI', 'MSI-X', 'ERR', 'REQ']
const CONFIG_REGION = 7

async function inspect(client: VfioUserClient, socket: string, version: VersionInfo): Promise<Inspection> {
  const out: Inspection = { socket, version, regions: [], irqs: [], dumps: [], errors: [] }
  const note = (what: string) => (e: unknown) => {
    out.errors.push(`${what}: ${e instanceof Error ? e.message : String(e)}`)
  }
  out.device = await client.deviceInfo().catch((e) => {
    note('DEVICE_GET_INFO')(e)
    return undefined
  })
  for (let i = 0; i < (out.device?.numRegions ?? 0); i++) {
    await client.regionInfo(i).then(
      (r) => {
        const { fd, ...fields } = { ...r, fd: r.fd }
        out.regions.push({ ...fields, hasFd: fd !== undefined })
        r.close()
      },
      note(`region ${i}`),
    )
  }
  for (let i = 0; i < (out.device?.numIrqs ?? 0); i++) {
    await client.irqInfo(i).then((irq) => out.irqs.push(irq), note(`irq index ${i}`))
  }
  const config = out.regions.find((r) => r.index === CONFIG_REGION)
  if (config?.read && config.size >= 64n) {
    // All of it up to 4 KiB: a PCI Express device's extended capabilities start at 0x100.
    const length = Number(config.size < 4096n ? config.size : 4096n)
    await client.regionRead(CONFIG_REGION, 0, length).then((b) => {
      out.pci = decodePciConfig(b)
    }, note('config space'))
  }
  return out
}

const hex = (n: number | bigint, width = 0) => `0x${n.toString(16).padStart(width, '0')}`

function format(x: Inspection): string {
  const v = x.version
  const c = v.capabilities
  const lines = [
    `socket              ${x.socket}`,
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
  if (x.device) {
    const d = x.device
    const flags = [d.pci ? 'PCI' : '', d.reset ? 'reset' : ''].filter(Boolean).join(' ') || 'none'
    lines.push(`device              ${d.numRegions} regions, ${d.numIrqs} irq indexes, flags ${flags}`)
  }
  for (const r of x.regions) {
    const access = `${r.read ? 'r' : '-'}${r.write ? 'w' : '-'}${r.mmap ? 'm' : '-'}`
    const name = REGION_NAMES[r.index] ?? `region ${r.index}`
    const sparse = r.sparse?.map((a) => `${hex(a.offset)}+${hex(a.size)}`).join(' ')
    lines.push(
      `region ${String(r.index).padEnd(3)} ${name.padEnd(7)} ${access} size ${hex(r.size)}` +
        (r.mmap ? ` mmap offset ${hex(r.offset)}` : '') +
        (sparse ? ` sparse ${sparse}` : '') +
        (r.type ? ` type ${r.type.type}/${r.type.subtype}` : '') +
        (r.hasFd ? ' fd' : ''),
    )
    for (const w of r.warnings) lines.push(`  warning           ${w}`)
  }
  for (const i of x.irqs) {
    const flags = ['eventfd', 'maskable', 'automasked', 'noresize'].filter((f) => i[f as keyof IrqInfo] === true)
    lines.push(
      `irq ${i.index}  ${(IRQ_NAMES[i.index] ?? '').padEnd(6)}   ${i.count} vector(s)${flags.length ? `, ${flags.join(' ')}` : ''}`,
    )
  }
  if (x.pci) {
    const p = x.pci
    lines.push(
      `pci                 vendor ${hex(p.vendorId, 4)} device ${hex(p.deviceId, 4)} rev ${hex(p.revision, 2)} class ${hex(p.classCode, 6)}`,
      `  subsystem         ${hex(p.subsystemVendorId, 4)}:${hex(p.subsystemId, 4)}`,
      `  command           ${hex(p.command, 4)}  status ${hex(p.status, 4)}  header type ${hex(p.headerType, 2)}`,
      `  interrupt         pin ${p.interruptPin ? String.fromCharCode(64 + p.interruptPin) : 'none'}, line ${p.interruptLine}`,
    )
    for (const bar of p.decodedBars) {
      // Its size is the region's: config space holds only the address.
      const size = x.regions.find((r) => r.index === bar.index)?.size ?? 0n
      if (bar.address === 0n && size === 0n) continue
      const kind =
        bar.kind === 'io'
          ? 'I/O'
          : `memory, ${bar.kind === 'memory64' ? '64' : '32'}-bit${bar.prefetchable ? ', prefetchable' : ''}`
      lines.push(`  BAR${bar.index}              ${kind} at ${hex(bar.address)}, size ${hex(size)}`)
    }
    for (const cap of p.capabilities) lines.push(`  capability        [${hex(cap.offset, 2)}] ${cap.name}`)
    if (p.msi) {
      const m = p.msi
      lines.push(
        `  MSI               ${m.enabled ? 'enabled' : 'disabled'}, ${m.enabledVectors}/${m.vectors} vectors${m.address64 ? ', 64-bit' : ''}${m.perVectorMasking ? ', maskable' : ''}`,
      )
    }
    if (p.msix) {
      const m = p.msix
      lines.push(
        `  MSI-X             ${m.enabled ? 'enabled' : 'disabled'}${m.functionMask ? ' (masked)' : ''}, ${m.tableSize} vectors, table BAR${m.tableBir}+${hex(m.tableOffset)}, PBA BAR${m.pbaBir}+${hex(m.pbaOffset)}`,
      )
    }
    for (const cap of p.extendedCapabilities) lines.push(`  extended          [${hex(cap.offset, 3)}] ${cap.name}`)
    for (const w of p.warnings) lines.push(`  warning           ${w}`)
  }
  for (const d of x.dumps) {
    const cut = d.asked === undefined ? '' : ` (of ${d.asked} asked: at most ${MAX_DUMP} per --dump)`
    lines.push(`dump                region ${d.region}, ${d.length} bytes at ${hex(d.offset)}${cut}`)
    for (const l of d.lines) lines.push(`  ${l}`)
  }
  for (const e of x.errors) lines.push(`error               ${e}`)
  return lines.join('\n')
}

/** Runs `vfio-user probe` with its arguments; resolves with the exit code. */
export async function probe(args: string[]): Promise<number> {
  let json = false
  let timeoutMs = 5000
  const dumps: Dump[] = []
  const positional: string[] = []
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string
    if (a === '--help' || a === '-h') {
      process.stdout.write(`${probeUsage}\n`)
      return 0
    }
    if (a === '--json') json = true
    else if (a === '--timeout') timeoutMs = wholeNumber(a, args[++i], 'milliseconds', probeUsage, 1)
    else if (a === '--dump') dumps.push(dumpSpec(args[++i]))
    else if (a.startsWith('-')) throw new UsageError(`unknown option ${a}`, probeUsage)
    else positional.push(a)
  }
  if (positional.length > 1) throw new UsageError(`one socket at most, got ${positional.length}`, probeUsage)
  const device: TestDevice | undefined = positional[0] === undefined ? await startTestDevice() : undefined
  const path = positional[0] ?? (device as TestDevice).socketPath
  try {
    const client = await connect(path, { timeoutMs })
    try {
      const v = await client.validateVersion()
      const found = await inspect(client, path, v)
      for (const d of dumps) found.dumps.push(await dump(client, d, found).catch((e: unknown) => failedDump(d, e)))
      // Each key once: the version under `version`, as in the inspection.
      const asJson = () =>
        JSON.stringify(found, (_, value) => (typeof value === 'bigint' ? value.toString() : value), 2)
      process.stdout.write(`${json ? asJson() : format(found)}\n`)
    } finally {
      await client.close()
    }
  } finally {
    await device?.close()
  }
  return 0
}
