// A test device and a negotiated client of its own for every test (so that a test that fails
// leaves nothing behind for the next: no map, reset or mapping carries over), and the fd
// count the files compare against.
import { readdirSync } from 'node:fs'
import { afterEach, beforeEach, expect } from 'vitest'
import { connect, type VfioUserClient } from '../ts/index'
import { startTestDevice, type TestDevice } from '../ts/testing'
import { startTap, type TapProcess, throughTap } from './through-tap'

/** Starts a test device and connects to it before each test of the file; closes both after it. */
export function deviceSession(): { readonly device: TestDevice; readonly client: VfioUserClient } {
  let device: TestDevice | undefined
  let client: VfioUserClient | undefined
  let relay: TapProcess | undefined
  beforeEach(async () => {
    device = await startTestDevice()
    relay = throughTap ? await startTap(device.socketPath) : undefined
    client = await connect(relay?.path ?? device.socketPath)
    await client.validateVersion()
  })
  afterEach(async () => {
    await client?.close()
    // Through a tap, the tap itself is checked too: it ended cleanly and decoded everything.
    const tapped = relay
    const tapExit = await tapped?.close()
    await device?.close()
    client = undefined
    relay = undefined
    device = undefined
    if (tapped) {
      expect(tapExit).toBe(0)
      expect(tapped.output()).not.toContain('undecodable')
    }
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
