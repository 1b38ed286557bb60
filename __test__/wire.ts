// Payload builders for the tests (the facade deliberately has no per-command helpers yet).

export function getInfoPayload(): Buffer {
  const p = Buffer.alloc(16)
  p.writeUInt32LE(16, 0)
  return p
}

export function regionAccess(region: number, offset: number, count: number, data?: Buffer): Buffer {
  const p = Buffer.alloc(16 + (data?.length ?? 0))
  p.writeBigUInt64LE(BigInt(offset), 0)
  p.writeUInt32LE(region, 8)
  p.writeUInt32LE(count, 12)
  data?.copy(p, 16)
  return p
}

export function regionInfoPayload(index: number, argsz: number): Buffer {
  const p = Buffer.alloc(argsz)
  p.writeUInt32LE(argsz, 0)
  p.writeUInt32LE(index, 8)
  return p
}
