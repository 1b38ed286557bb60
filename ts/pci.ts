// The PCI configuration header (type 0) and its capability list, decoded from the bytes of a
// device's config region (region 7), as `lspci -vv` shows them. What a device put there is
// untrusted: the capability walk is bounded and stops at a loop.

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

const CAPABILITY_NAMES: Record<number, string> = {
  1: 'Power Management',
  5: 'MSI',
  9: 'Vendor Specific',
  16: 'Express',
  17: 'MSI-X',
  18: 'SATA',
  19: 'Advanced Features',
}

/** Decodes a type-0 configuration header; `config` must hold at least its first 64 bytes. */
export function decodePciConfig(config: Uint8Array): PciConfig {
  if (config.byteLength < 64) throw new RangeError(`a PCI config header is 64 bytes; got ${config.byteLength}`)
  const b = Buffer.from(config.buffer, config.byteOffset, config.byteLength)
  const warnings: string[] = []
  const capabilities: PciCapability[] = []
  const status = b.readUInt16LE(0x06)
  if (status & 0x10) {
    const seen = new Set<number>()
    let at = b.readUInt8(0x34) & 0xfc
    while (at !== 0) {
      if (at < 0x40 || at + 2 > b.byteLength) {
        warnings.push(`capability pointer 0x${at.toString(16)} lies outside the ${b.byteLength} bytes read`)
        break
      }
      if (seen.has(at)) {
        warnings.push(`the capability list loops back to 0x${at.toString(16)}`)
        break
      }
      seen.add(at)
      const id = b.readUInt8(at)
      capabilities.push({ offset: at, id, name: CAPABILITY_NAMES[id] ?? `id 0x${id.toString(16)}` })
      at = b.readUInt8(at + 1) & 0xfc
    }
  }
  return {
    vendorId: b.readUInt16LE(0x00),
    deviceId: b.readUInt16LE(0x02),
    command: b.readUInt16LE(0x04),
    status,
    revision: b.readUInt8(0x08),
    classCode: b.readUIntLE(0x09, 3),
    headerType: b.readUInt8(0x0e),
    bars: Array.from({ length: 6 }, (_, i) => b.readUInt32LE(0x10 + 4 * i)),
    subsystemVendorId: b.readUInt16LE(0x2c),
    subsystemId: b.readUInt16LE(0x2e),
    interruptLine: b.readUInt8(0x3c),
    interruptPin: b.readUInt8(0x3d),
    capabilities,
    warnings,
  }
}
