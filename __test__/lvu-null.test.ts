// Interop with libvfio-user's `null` sample: a PCI device that does nothing, with no BARs, no
// DMA controller and no migration. It serves one client in its life, so each test starts one.
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { beforeAll, describe, expect, it } from 'vitest'
import { connectRetrying, expectCountsBack, failures, startSample, threadCount, warmUp } from './peers'
import { openFds } from './session'

const cli = join(__dirname, '..', 'dist', 'cli.js')

beforeAll(warmUp)

describe("libvfio-user's null sample", () => {
  it('vfio-user probe: version without migration, 9 empty regions but config space', async () => {
    const before = openFds()
    const threads = threadCount()
    await using device = await startSample('null')
    const r = spawnSync(process.execPath, [cli, 'probe', device.socketPath, '--json'], {
      encoding: 'utf8',
      timeout: 20_000,
    })
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' })
    const p = JSON.parse(r.stdout)
    expect(p.version).toMatchObject({ major: 0, minor: 0 })
    expect(p.version.capabilities).toMatchObject({ maxMsgFds: 8, maxDataXferSize: 1048576 })
    expect(p.version.capabilities.migration).toBeUndefined()
    expect(p.device).toMatchObject({ numRegions: 9, numIrqs: 5 })
    // Its config space is all zeros: no ids.
    expect(p.pci).toMatchObject({ vendorId: 0, deviceId: 0 })
    expect(p.errors).toEqual([])
    await device.close()
    expect(failures(device.stderr())).toEqual([])
    await expectCountsBack(before, threads)
  })

  it('deviceInfo, and the region and irq counts it implies', async () => {
    const before = openFds()
    const threads = threadCount()
    await using device = await startSample('null')
    {
      await using c = await connectRetrying(device.socketPath)
      await c.validateVersion()
      const info = await c.deviceInfo()
      expect(info).toMatchObject({ pci: true, numRegions: 9, numIrqs: 5 })
      using bar0 = await c.regionInfo(0)
      expect(bar0).toMatchObject({ size: 0n, flags: 0, read: false, write: false, mmap: false })
      using config = await c.regionInfo(7)
      expect(config.size).toBe(256n)
      expect((await c.irqInfo(0)).count).toBe(0)
      expect((await c.irqInfo(3)).count).toBe(1)
    }
    await device.close()
    expect(failures(device.stderr())).toEqual([])
    await expectCountsBack(before, threads)
  })
})
