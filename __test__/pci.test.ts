// decodePciConfig on config headers a device might present, honest or not.
import { describe, expect, it } from 'vitest'
import { decodePciConfig } from '../ts/index'

function header(caps: Array<[number, number, number]>, first: number): Buffer {
  const b = Buffer.alloc(256)
  b.writeUInt16LE(0x8086, 0)
  b.writeUInt16LE(0x1234, 2)
  b.writeUInt16LE(0x0006, 4)
  b.writeUInt16LE(0x0010, 6) // capability list present
  b.writeUIntLE(0x010802, 9, 3) // NVMe
  b.writeUInt32LE(0xfebf0004, 0x10)
  b.writeUInt8(first, 0x34)
  b.writeUInt8(1, 0x3d)
  for (const [at, id, next] of caps) {
    b.writeUInt8(id, at)
    b.writeUInt8(next, at + 1)
  }
  return b
}

describe('decodePciConfig', () => {
  it('decodes the header and walks the capability list', () => {
    const p = decodePciConfig(
      header(
        [
          [0x40, 0x01, 0x50],
          [0x50, 0x05, 0x70],
          [0x70, 0x10, 0],
        ],
        0x40,
      ),
    )
    expect(p).toMatchObject({ vendorId: 0x8086, deviceId: 0x1234, classCode: 0x010802, interruptPin: 1 })
    expect(p.bars[0]).toBe(0xfebf0004)
    expect(p.capabilities.map((c) => c.name)).toEqual(['Power Management', 'MSI', 'Express'])
    expect(p.warnings).toEqual([])
  })

  it('stops at a loop and at a pointer outside what was read', () => {
    const looped = decodePciConfig(
      header(
        [
          [0x40, 0x01, 0x50],
          [0x50, 0x05, 0x40],
        ],
        0x40,
      ),
    )
    expect(looped.capabilities).toHaveLength(2)
    expect(looped.warnings[0]).toMatch(/loops/)
    const outside = decodePciConfig(header([[0x40, 0x01, 0x20]], 0x40))
    expect(outside.capabilities).toHaveLength(1)
    expect(outside.warnings[0]).toMatch(/outside/)
    expect(() => decodePciConfig(Buffer.alloc(63))).toThrow(RangeError)
  })

  it('pairs 64-bit BARs, decodes MSI and MSI-X, and walks the extended capabilities of 4 KiB', () => {
    const c = Buffer.alloc(4096)
    header([], 0).copy(c)
    c.writeUInt32LE(0x0000_000c, 0x10) // BAR0: 64-bit prefetchable memory at 0x2_0000_0000
    c.writeUInt32LE(0x2, 0x14)
    c.writeUInt8(0x40, 0x34)
    c.writeUInt8(0x11, 0x40) // MSI-X, last in the list
    c.writeUInt16LE(0x8000 | 7, 0x42) // enabled, 8 vectors
    c.writeUInt32LE(0x3000 | 0, 0x44) // table in BAR0 at 0x3000
    c.writeUInt32LE(0x3800 | 0, 0x48) // PBA in BAR0 at 0x3800
    c.writeUInt32LE(0x0001 | (1 << 16) | (0x148 << 20), 0x100) // AER, then 0x148
    c.writeUInt32LE(0x0010 | (1 << 16), 0x148) // SR-IOV, last
    const p = decodePciConfig(c)
    expect(p.decodedBars[0]).toEqual({ index: 0, kind: 'memory64', prefetchable: true, address: 0x2_0000_0000n })
    expect(p.decodedBars[1]?.index).toBe(2)
    expect(p.msi).toBeUndefined()
    expect(p.msix).toEqual({
      offset: 0x40,
      enabled: true,
      functionMask: false,
      tableSize: 8,
      tableBir: 0,
      tableOffset: 0x3000,
      pbaBir: 0,
      pbaOffset: 0x3800,
    })
    expect(p.extendedCapabilities.map((x) => [x.offset, x.name])).toEqual([
      [0x100, 'Advanced Error Reporting'],
      [0x148, 'SR-IOV'],
    ])
    expect(p.warnings).toEqual([])
  })
})
