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
})
