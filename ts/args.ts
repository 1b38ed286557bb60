// Argument checks shared by the public calls: bad arguments throw before anything is sent.

/** Checks an integer option in [min, max]. */
export function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number') throw invalidArg(`${name} must be a number, got ${typeof value}`)
  if (!Number.isInteger(value) || value < min || value > max) {
    throw outOfRange(`${name} must be an integer from ${min} to ${max}, got ${value}`)
  }
  return value
}

/**
 * Accepts any Uint8Array (Buffer included) that is not a view of a detached ArrayBuffer, and
 * views it as a Buffer without copying. `name` is the argument's, for the message.
 */
export function checkPayload(value: unknown, name = 'payload'): Buffer {
  if (!(value instanceof Uint8Array)) {
    throw invalidArg(`${name} must be a Buffer or Uint8Array, got ${describe(value)}`)
  }
  // A view of a detached (transferred) buffer reads as empty: a Buffer would go out as an
  // empty payload, any other view would make Buffer.from throw a TypeError without a code.
  // Only an empty view can be one, so the check costs nothing on the way of real data.
  if (value.byteLength === 0 && isDetached(value.buffer)) {
    throw invalidArg(`${name} is a view of a detached ArrayBuffer`)
  }
  if (value.byteLength > 0xffff_ffff - 16) {
    throw outOfRange(`payload of ${value.byteLength} bytes does not fit a vfio-user message`)
  }
  return Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength)
}

/** Checks a list of file descriptors; undefined when there are none (nothing to convert). */
export function checkFds(value: unknown): number[] | undefined {
  if (value === undefined) return undefined
  if (!Array.isArray(value)) throw invalidArg(`fds must be an array of file descriptors, got ${describe(value)}`)
  const fds: number[] = []
  // An index loop, not map(): map skips the holes of a sparse array, which would then reach
  // the binding as a non-number.
  for (let i = 0; i < value.length; i++) {
    const fd: unknown = value[i]
    if (typeof fd !== 'number' || !Number.isInteger(fd)) {
      throw invalidArg(`fds[${i}] must be a file descriptor (an integer), got ${i in value ? describe(fd) : 'a hole'}`)
    }
    fds.push(checkInteger(`fds[${i}]`, fd, 0, 0x7fff_ffff))
  }
  return fds.length === 0 ? undefined : fds
}

/** Checks an optional timeout in milliseconds. */
export function checkTimeout(name: string, value: unknown): number | undefined {
  if (value === undefined) return undefined
  return checkInteger(name, value, 1, 0xffff_ffff)
}

function describe(value: unknown): string {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'number') return String(value)
  return typeof value
}

const TWO_POW_32 = 0x1_0000_0000
/** 2^64, made once: a BigInt shift allocates each time it runs. */
export const TWO_POW_64 = 1n << 64n

/** An offset within a region: a safe non-negative integer or a bigint below 2^64, as two u32 halves. */
export function checkOffset(name: string, value: unknown): { hi: number; lo: number; value: bigint } {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw outOfRange(`${name} must be a non-negative safe integer or a bigint, got ${value}`)
    }
    return { hi: Math.floor(value / TWO_POW_32), lo: value % TWO_POW_32, value: BigInt(value) }
  }
  if (typeof value === 'bigint') {
    if (value < 0n || value >= TWO_POW_64) throw outOfRange(`${name} must be from 0 to 2^64 - 1, got ${value}`)
    return { hi: Number(value >> 32n), lo: Number(value & 0xffff_ffffn), value }
  }
  throw invalidArg(`${name} must be a number or a bigint, got ${describe(value)}`)
}

/** Data to write: a Uint8Array (Buffer included) that is not detached, as a Buffer view. */
export function checkData(value: unknown): Buffer {
  const data = checkPayload(value, 'data')
  if (data.byteLength === 0) throw outOfRange('data must not be empty')
  return data
}

/** A RangeError with Node's `code` for a value out of range (`ERR_OUT_OF_RANGE`). */
export function outOfRange(message: string): RangeError & { code: 'ERR_OUT_OF_RANGE' } {
  const e = new RangeError(message) as RangeError & { code: 'ERR_OUT_OF_RANGE' }
  e.code = 'ERR_OUT_OF_RANGE'
  return e
}

/** A TypeError with Node's `code` for an argument of the wrong type (`ERR_INVALID_ARG_TYPE`). */
export function invalidArg(message: string): TypeError & { code: 'ERR_INVALID_ARG_TYPE' } {
  const e = new TypeError(message) as TypeError & { code: 'ERR_INVALID_ARG_TYPE' }
  e.code = 'ERR_INVALID_ARG_TYPE'
  return e
}

/**
 * Runs `start`, turning an exception it throws (a bad argument, found before anything is
 * sent) into a rejection, as `fs/promises` does: a promise-returning call never throws.
 */
export function rejecting<T>(start: () => Promise<T>): Promise<T> {
  try {
    return start()
  } catch (e) {
    return Promise.reject(e)
  }
}

/**
 * Whether `buffer` was detached (transferred): its length reads 0 and no view of it can be
 * made. Node 20 has no `ArrayBuffer.prototype.detached`: a new view of a detached buffer
 * throws, of an empty one does not.
 */
export function isDetached(buffer: ArrayBufferLike): boolean {
  const known = (buffer as ArrayBuffer & { detached?: boolean }).detached
  if (known !== undefined) return known
  if (buffer.byteLength !== 0) return false
  try {
    new Uint8Array(buffer)
    return false
  } catch {
    return true
  }
}

/**
 * Checks a size or length given as a number or a bigint (as `RegionInfo.size` is), an integer
 * in [min, max], and returns it as a number.
 */
export function checkSize(name: string, value: unknown, min: number, max: number): number {
  if (typeof value === 'bigint') {
    if (value < BigInt(min) || value > BigInt(max)) {
      throw outOfRange(`${name} must be an integer from ${min} to ${max}, got ${value}`)
    }
    return Number(value)
  }
  if (typeof value !== 'number') throw invalidArg(`${name} must be a number or a bigint, got ${typeof value}`)
  return checkInteger(name, value, min, max)
}
