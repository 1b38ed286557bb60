// `vfio-user probe` as a user runs it (the compiled bin that `npm install` builds).
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { startTestDevice } from '../ts/testing'

const cli = join(__dirname, '..', 'dist', 'cli.js')

function probe(...args: string[]) {
  return spawnSync(process.execPath, [cli, 'probe', ...args], { encoding: 'utf8', timeout: 20_000 })
}

describe('vfio-user probe', () => {
  it('starts the test device and prints the version and every capability', () => {
    const r = probe()
    expect(r.status).toBe(0)
    for (const line of [
      /^version +0\.0$/m,
      /^max_msg_fds +1$/m,
      /^max_data_xfer_size +1048576$/m,
      /^max_dma_maps +65535$/m,
      /^pgsizes +0x1000$/m,
      /^write_multiple +false$/m,
      /^migration +pgsize 4096/m,
      /^twin_socket +absent$/m,
      /^device +9 regions, 5 irq indexes, flags PCI reset$/m,
      /^region 0 +BAR0 +rwm size 0x1000 mmap offset 0x0 sparse 0x0\+0x1000 fd$/m,
      /^region 7 +CONFIG +rw- size 0x100$/m,
      /^irq 1 +MSI +4 vector\(s\), eventfd$/m,
      /^pci +vendor 0x1b36 device 0x0005 /m,
    ]) {
      expect(r.stdout).toMatch(line)
    }
  })

  it('probes a given socket as JSON', async () => {
    await using device = await startTestDevice()
    const r = probe(device.socketPath, '--json')
    expect(r.status).toBe(0)
    const out = JSON.parse(r.stdout)
    expect(out.socket).toBe(device.socketPath)
    expect(out.capabilities.maxMsgFds).toBe(1)
    expect(out.warnings).toEqual([])
    expect(out.device).toMatchObject({ numRegions: 9, numIrqs: 5, reset: true })
    expect(out.regions[0]).toMatchObject({
      index: 0,
      size: '4096',
      hasFd: true,
      sparse: [{ offset: '0', size: '4096' }],
    })
    expect(out.irqs.map((i: { count: number }) => i.count)).toEqual([1, 4, 0, 0, 0])
    expect(out.pci).toMatchObject({ vendorId: 0x1b36, deviceId: 0x0005, capabilities: [] })
    expect(out.errors).toEqual([])
  })

  it('fails with the errno name and the path', () => {
    const r = probe('/nonexistent/device.sock')
    expect(r.status).toBe(1)
    expect(r.stderr).toMatch(/ENOENT: .*\/nonexistent\/device\.sock/)
  })
})
