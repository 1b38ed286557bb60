// One test device and one negotiated client for a whole test file, and the fd count the
// files compare against.
import { readdirSync } from 'node:fs'
import { afterAll, beforeAll } from 'vitest'
import { connect, type VfioUserClient } from '../ts/index'
import { startTestDevice, type TestDevice } from '../ts/testing'

/** Starts a test device and connects to it before the file's tests; closes both after. */
export function deviceSession(): { readonly device: TestDevice; readonly client: VfioUserClient } {
  let device: TestDevice | undefined
  let client: VfioUserClient | undefined
  beforeAll(async () => {
    device = await startTestDevice()
    client = await connect(device.socketPath)
    await client.validateVersion()
  })
  afterAll(async () => {
    await client?.close()
    await device?.close()
  })
  return {
    get device() {
      if (!device) throw new Error('the device session has not started')
      return device
    },
    get client() {
      if (!client) throw new Error('the device session has not started')
      return client
    },
  }
}

/** How many fds this process has open. */
export const openFds = (): number => readdirSync('/proc/self/fd').length
