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

/**
 * Calls `call`, which returns a promise for a bad argument instead of throwing (as
 * `fs/promises` does), and checks the rejection: an instance of `type` with Node's code for
 * it (`ERR_INVALID_ARG_TYPE` for a TypeError, `ERR_OUT_OF_RANGE` for a RangeError), and
 * `message` when given.
 */
export async function refusedArg(
  call: () => unknown,
  type: typeof TypeError | typeof RangeError | typeof Error,
  message?: string | RegExp,
): Promise<void> {
  let p: unknown
  expect(() => {
    p = call()
  }).not.toThrow()
  expect(p).toBeInstanceOf(Promise)
  const e = await (p as Promise<unknown>).then(
    () => undefined,
    (err: unknown) => err,
  )
  expect(e).toBeInstanceOf(type)
  const code = (e as { code?: string }).code
  if (e instanceof TypeError) expect(code).toBe('ERR_INVALID_ARG_TYPE')
  else expect(code).toBe('ERR_OUT_OF_RANGE')
  if (message !== undefined) expect((e as Error).message).toMatch(message)
}
