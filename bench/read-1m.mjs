// `node bench/read-1m.mjs [into|new] [count]`: COUNT (3000) awaited 1 MiB regionReads of the
// test device's BAR2, into one Buffer (`into`) or a new Buffer each (`new`), printing the wall
// time and this process's CPU per MiB. A quick loop for comparing two builds of the addon
// run by run, alternating (ABBA), where `npm run bench` is too slow; it judges nothing.
import { existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { connect } from '../dist/index.js'
import { startTestDevice } from '../dist/testing.js'

const MIB = 1 << 20
const mode = process.argv[2] ?? 'into'
const count = Number(process.argv[3] ?? 3000)
if (mode !== 'into' && mode !== 'new') throw new TypeError('mode must be into or new')
const root = resolve(import.meta.dirname, '..')
const binary = ['release', 'debug']
  .map((p) => join(root, 'target', p, 'vfio-user-test-device'))
  .find((p) => existsSync(p))
if (!binary) throw new Error('vfio-user-test-device is not built: run npm run build:device')

const device = await startTestDevice({ binary })
const client = await connect(device.socketPath)
try {
  await client.validateVersion()
  const options = mode === 'into' ? { into: Buffer.alloc(MIB) } : {}
  const cpu0 = process.cpuUsage()
  const start = process.hrtime.bigint()
  for (let i = 0; i < count; i++) await client.regionRead(2, 0, MIB, options)
  const us = Number(process.hrtime.bigint() - start) / 1e3 / count
  const cpu = process.cpuUsage(cpu0)
  console.log(`${mode}: ${us.toFixed(0)} µs per MiB, ${((cpu.user + cpu.system) / count).toFixed(0)} µs CPU per MiB`)
} finally {
  await client.close()
  await device.close()
}
