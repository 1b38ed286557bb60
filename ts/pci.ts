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
  /** What the walk refused (a loop, a pointer outside the bytes read). */
  warnings: string[]
}

/** Decodes a type-0 configuration header; `config` must hold at least its first 64 bytes. */
export function decodePciConfig(config: Uint8Array): PciConfig {
  if (!(config instanceof Uint8Array)) throw invalidArg('config must be a Uint8Array')
  if (config.byteLength < 64) throw outOfRange(`a PCI config header is 64 bytes; got ${config.byteLength}`)
  const p = native.decodePciConfig(Buffer.from(config.buffer, config.byteOffset, config.byteLength))
  if ('errno' in p) throw outOfRange(p.message)
  return p
}
