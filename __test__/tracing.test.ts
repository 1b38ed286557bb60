// Per-request tracing through node:diagnostics_channel: a message as each request is sent and
// one as it settles, for every kind of call, and nothing once nobody subscribes.
import diagnosticsChannel from 'node:diagnostics_channel'
import { afterEach, describe, expect, it } from 'vitest'
import { Command, connect, type RequestMessage, type SettleMessage, VfioUserError } from '../ts/index'
import { startScriptedPeer } from '../ts/testing'
import { rejection } from './rejection'
import { deviceSession } from './session'
import { getInfoPayload } from './wire'

const session = deviceSession()
const sent: RequestMessage[] = []
const settled: SettleMessage[] = []
const onSent = (m: unknown) => sent.push(m as RequestMessage)
const onSettled = (m: unknown) => settled.push(m as SettleMessage)

function subscribe() {
  diagnosticsChannel.subscribe('vfio-user:request', onSent)
  diagnosticsChannel.subscribe('vfio-user:settle', onSettled)
}

afterEach(() => {
  diagnosticsChannel.unsubscribe('vfio-user:request', onSent)
  diagnosticsChannel.unsubscribe('vfio-user:settle', onSettled)
  sent.length = 0
  settled.length = 0
})

describe('tracing', () => {
  it('publishes each request as it is sent and as it settles, async and sync', async () => {
    const c = session.client
    subscribe()
    const reply = await c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload())
    c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload())
    await c.regionRead(0, 0, 4)
    c.regionReadSync(0, 0, 4)
    c.regionWriteSync(0, 0x100, Buffer.from([1]))
    await c.regionWrite(0, 0x104, Buffer.from([2]), { posted: true })
    const names = ['DEVICE_GET_INFO', 'DEVICE_GET_INFO', 'REGION_READ', 'REGION_READ', 'REGION_WRITE']
    expect(sent.map((m) => [m.commandName, m.posted])).toEqual([
      ...names.map((n) => [n, false]),
      // Posted: sent, never settled.
      ['REGION_WRITE', true],
    ])
    expect(settled.map((m) => m.commandName)).toEqual(names)
    expect(sent.every((m) => m.path === session.client.path)).toBe(true)
    expect(settled[0]?.reply).toBe(reply)
    expect(settled.every((m) => Number.isFinite(m.durationMs) && m.durationMs >= 0 && m.error === undefined)).toBe(true)
  })

  it('a failure is published with its error; nothing is published once unsubscribed', async () => {
    await using peer = await startScriptedPeer('hold')
    const c = await connect(peer.socketPath)
    try {
      await c.validateVersion()
      subscribe()
      const e = await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 20 }))
      expect(settled).toHaveLength(1)
      expect(settled[0]?.error).toBe(e)
      expect(e).toBeInstanceOf(VfioUserError)
      // A blocking call that fails, and an aborted one: each settles once, with its error.
      const sync = (() => {
        try {
          c.sendWaitSync(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 20 })
        } catch (e) {
          return e
        }
      })()
      const ac = new AbortController()
      const aborted = c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { signal: ac.signal })
      ac.abort()
      const reason = await aborted.catch((e: unknown) => e)
      expect(sent).toHaveLength(3)
      expect(settled.map((m) => m.error)).toEqual([e, sync, reason])
      expect((sync as VfioUserError).code).toBe('ETIMEDOUT')
      diagnosticsChannel.unsubscribe('vfio-user:request', onSent)
      diagnosticsChannel.unsubscribe('vfio-user:settle', onSettled)
      // The hold peer answers nothing: this one times out, and nobody hears of it.
      expect((await rejection(c.sendWait(Command.DEVICE_GET_INFO, getInfoPayload(), { timeoutMs: 20 }))).code).toBe(
        'ETIMEDOUT',
      )
      expect(sent).toHaveLength(3)
      expect(settled).toHaveLength(3)
    } finally {
      await c.close()
    }
  })
})
