import { expect } from 'vitest'
import { VfioUserError } from '../ts/index'

/** Awaits a promise that must reject with a VfioUserError, and returns that error. */
export async function rejection(p: Promise<unknown>): Promise<VfioUserError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  )
  expect(e).toBeInstanceOf(VfioUserError)
  return e as VfioUserError
}

/** Awaits a promise that must reject with any Error (a RangeError, say), and returns it. */
export async function refusal(p: Promise<unknown>): Promise<Error & { code?: string }> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  )
  expect(e).toBeInstanceOf(Error)
  return e as Error & { code?: string }
}
