// The PCI configuration header (type 0) and its capability list, decoded from the bytes of a
// device's config region (region 7) by the proto crate's pci.rs, as `lspci -vv` shows them.

import { invalidArg, outOfRange } from './args'
import { native } from './native'

/** One entry of the capability list. */
export interface PciCapability {
  /** Offset in config space. */
  offset: number
  /** Capability id (0x01 power management, 0x05 MSI, 0x10 PCI Express, 0x11 MSI-X…). */
  id: number
  /** Its name, when known. */
  name: string
}

/** The decoded configuration header. */
export interface PciConfig {
  vendorId: number
  deviceId: number
  command: number
  status: number
  revision: number
  /** Class code, subclass and programming interface, as one 24-bit number. */
  classCode: number
  headerType: number
  /** The six base address registers, raw (a 64-bit BAR spans two). */
  bars: number[]
  subsystemVendorId: number
  subsystemId: number
  interruptLine: number
  interruptPin: number
  capabilities: PciCapability[]
  /** The BARs decoded: one entry per BAR, a 64-bit one taking its register and the next. */
  decodedBars: PciBar[]
  /** The MSI capability, when the list has one. */
  msi?: PciMsi
  /** The MSI-X capability, when the list has one. */
  msix?: PciMsix
  /** The PCI Express extended capabilities (from 0x100), when more than 256 bytes were given. */
  extendedCapabilities: PciCapability[]
  /** What the walk refused (a loop, a pointer outside the bytes read). */
  warnings: string[]
}

/** One base address register, decoded. */
export interface PciBar {
  /** Its index (a 64-bit BAR also uses the register after it). */
  index: number
  /** An I/O BAR, or memory decoded with 32 or 64 address bits. */
  kind: 'io' | 'memory32' | 'memory64'
  /** Memory the device lets the CPU prefetch from (reads have no side effects). */
  prefetchable: boolean
  /** The address programmed in it (0 until the guest or firmware assigns one). */
  address: bigint
}

/** The MSI capability's message control. */
export interface PciMsi {
  /** Offset in config space. */
  offset: number
  /** MSI is enabled. */
  enabled: boolean
  /** Vectors the function can request (1 to 32). */
  vectors: number
  /** Vectors enabled now. */
  enabledVectors: number
  /** 64-bit message addresses. */
  address64: boolean
  /** Each vector can be masked on its own. */
  perVectorMasking: boolean
}

/** The MSI-X capability: where its vector table and pending-bit array live (a BAR and an offset). */
export interface PciMsix {
  /** Offset in config space. */
  offset: number
  /** MSI-X is enabled. */
  enabled: boolean
  /** Every vector is masked (the function mask bit). */
  functionMask: boolean
  /** Vectors in the table (1 to 2048). */
  tableSize: number
  /** The BAR (region index) holding the table. */
  tableBir: number
  /** Where the table starts in that BAR. */
  tableOffset: number
  /** The BAR (region index) holding the pending-bit array. */
  pbaBir: number
  /** Where the pending-bit array starts in that BAR. */
  pbaOffset: number
}

const BAR_KINDS = ['io', 'memory32', 'memory64'] as const

/**
 * Decodes a type-0 configuration header; `config` must hold at least its first 64 bytes.
 * Give it all of a PCI Express device's 4096 bytes to have the extended capabilities.
 */
export function decodePciConfig(config: Uint8Array): PciConfig {
  if (!(config instanceof Uint8Array)) throw invalidArg('config must be a Uint8Array')
  if (config.byteLength < 64) throw outOfRange(`a PCI config header is 64 bytes; got ${config.byteLength}`)
  const p = native.decodePciConfig(Buffer.from(config.buffer, config.byteOffset, config.byteLength))
  if ('errno' in p) throw outOfRange(p.message)
  const { msi, msix, decodedBars, ...rest } = p
  const out: PciConfig = {
    ...rest,
    decodedBars: decodedBars.map((b) => ({ ...b, kind: BAR_KINDS[b.kind] ?? 'memory32' })),
  }
  if (msi) out.msi = msi
  if (msix) out.msix = msix
  return out
}
