// `npm run bench:nvme`: 4 KiB random reads from SPDK's NVMe controller (nvmf_tgt, a malloc
// bdev) through the example driver (examples/nvme-perf.ts on examples/nvme-driver.ts) and
// through SPDK's own initiator (spdk_nvme_perf), in one run, paired by round: QD1 latency and
// QD32 IOPS; our doorbells through the mapped BAR0 (a polling target, as spdk_nvme_perf's)
// and as posted REGION_WRITEs (an interrupt-mode target, `-M`, made for doorbells by message:
// a polling target reads its socket only every millisecond or so); completions by MSI-X and
// by polling; CPU per read. The target runs on core 0, every initiator on core 1. Needs root (huge pages, hugetlbfs at /dev/hugepages for
// spdk_nvme_perf) and SPDK (`$VFIO_USER_SPDK`, or ../shared/peers/build-spdk). Run it alone.
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
const rounds = Number(process.env.BENCH_ROUNDS ?? 3)
const seconds = Number(process.env.BENCH_SECONDS ?? 3)
const NQN = 'nqn.2019-07.io.spdk:cnode0'

function spdkDir() {
  if (process.env.VFIO_USER_SPDK) return process.env.VFIO_USER_SPDK
  const script = resolve(root, '../shared/peers/build-spdk')
  if (!existsSync(script)) throw new Error('set $VFIO_USER_SPDK to an SPDK build (build/bin/nvmf_tgt)')
  return execFileSync(script, [], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
    .trim()
    .split('\n')
    .pop()
}
const spdk = spdkDir()

// Huge pages for both initiators (given back at the end), hugetlbfs for spdk_nvme_perf.
const sysctl = '/proc/sys/vm/nr_hugepages'
const pagesBefore = Number(readFileSync(sysctl, 'utf8'))
writeFileSync(sysctl, String(pagesBefore + 512))
const mounted = spawnSync('mountpoint', ['-q', '/dev/hugepages']).status === 0
if (!mounted) {
  mkdirSync('/dev/hugepages', { recursive: true })
  execFileSync('mount', ['-t', 'hugetlbfs', 'nodev', '/dev/hugepages'])
}

/** Starts a target (polling, or interrupt mode with `-M`) with one controller. */
function startTarget(interrupt) {
  const dir = mkdtempSync(join(tmpdir(), 'vfio-user-bench-nvme-'))
  const rpcSock = join(dir, 'rpc.sock')
  const args = ['-m', '0x1', '--no-huge', '-s', '512', '--disable-cpumask-locks', '-r', rpcSock]
  if (interrupt) args.push('--interrupt-mode')
  const child = spawn(join(spdk, 'build/bin/nvmf_tgt'), args, { cwd: dir, stdio: 'ignore' })
  const closed = new Promise((r) => child.once('close', r))
  execFileSync('/usr/bin/python3', [join(spdk, 'scripts/rpc.py'), '-r', '150', '-s', rpcSock], {
    input: `${[
      'framework_wait_init',
      `nvmf_create_transport -t VFIOUSER${interrupt ? ' -M' : ''}`,
      'bdev_malloc_create 64 512 -b Malloc0',
      `nvmf_create_subsystem ${NQN} -a -s SPDK0`,
      `nvmf_subsystem_add_ns ${NQN} Malloc0`,
      `nvmf_subsystem_add_listener ${NQN} -t VFIOUSER -a ${dir} -s 0`,
    ].join('\n')}\n`,
  })
  return {
    dir,
    socket: join(dir, 'cntrl'),
    async stop() {
      child.kill('SIGTERM')
      await closed
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** Runs `cmd` on core 1 under /usr/bin/time; its output and its CPU in µs. */
function onCore1(cmd, args) {
  const r = spawnSync('taskset', ['-c', '1', '/usr/bin/time', '-f', 'cpu %U %S', cmd, ...args], {
    encoding: 'utf8',
    cwd: root,
  })
  if (r.status !== 0) throw new Error(`${cmd} failed (${r.status}): ${r.stderr}`)
  const [, user, system] = /cpu ([\d.]+) ([\d.]+)/.exec(r.stderr) ?? []
  return { out: r.stdout, cpuUs: (Number(user) + Number(system)) * 1e6 }
}

/** spdk_nvme_perf at queue depth `qd`: IOPS, mean latency and CPU per read. */
function perf(target, qd) {
  const trid = `trtype:VFIOUSER traddr:${target.dir} subnqn:${NQN}`
  const r = onCore1(join(spdk, 'build/bin/spdk_nvme_perf'), [
    '-r',
    trid,
    '-q',
    String(qd),
    '-o',
    '4096',
    '-w',
    'randread',
    '-t',
    String(seconds),
    '-c',
    '0x2',
  ])
  const total = /^Total\s+:\s+([\d.]+)\s+[\d.]+\s+([\d.]+)/m.exec(r.out)
  if (!total) throw new Error(`no Total line from spdk_nvme_perf:\n${r.out}`)
  const iops = Number(total[1])
  // It polls its core the whole run: its CPU per read is its core's time over its reads.
  return { iops, latencyUs: Number(total[2]), cpuUsPerRead: 1e6 / iops }
}

/** The example driver at queue depth `qd`. */
function ours(target, qd, flags) {
  const r = onCore1(process.execPath, [
    'scripts/example.mjs',
    'nvme-perf',
    target.socket,
    '--depth',
    String(qd),
    '--seconds',
    String(seconds),
    ...flags,
  ])
  return JSON.parse(r.out.trim().split('\n').pop())
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const runs = new Map()
const keep = (name, v) => runs.set(name, [...(runs.get(name) ?? []), v])

try {
  const ourKinds = [
    ['mmap doorbells, MSI-X', ['--mmap'], false],
    ['mmap doorbells, polled', ['--mmap', '--poll'], false],
    ['posted REGION_WRITE doorbells (-M target), MSI-X', [], true],
    ['posted REGION_WRITE doorbells (-M target), polled', ['--poll'], true],
  ]
  for (let round = 0; round < rounds; round++) {
    for (const interrupt of [false, true]) {
      const target = startTarget(interrupt)
      try {
        for (const qd of [1, 32]) {
          if (!interrupt) keep(`spdk_nvme_perf QD${qd}`, perf(target, qd))
          for (const [name, flags, wants] of ourKinds)
            if (wants === interrupt) keep(`${name} QD${qd}`, ours(target, qd, flags))
        }
      } finally {
        await target.stop()
      }
    }
    console.error(`round ${round + 1} of ${rounds} done`)
  }
  console.log(`4 KiB random reads, ${rounds} rounds of ${seconds} s each, medians; target polling on core 0`)
  console.log('| initiator | QD | IOPS | mean latency | CPU per read | vs spdk_nvme_perf |')
  console.log('|---|---|---|---|---|---|')
  for (const qd of [1, 32]) {
    const ref = runs.get(`spdk_nvme_perf QD${qd}`)
    for (const [name, list] of runs) {
      if (!name.endsWith(`QD${qd}`)) continue
      const iops = median(list.map((r) => r.iops))
      const lat = median(list.map((r) => r.latencyUs))
      const cpu = median(list.map((r) => r.cpuUsPerRead))
      // Paired by round: each run against the reference of its own round.
      const ratio =
        qd === 1
          ? `${median(list.map((r, i) => r.latencyUs / ref[i].latencyUs)).toFixed(2)}x latency`
          : `${median(list.map((r, i) => r.iops / ref[i].iops)).toFixed(2)}x IOPS`
      const label = name.replace(` QD${qd}`, '')
      console.log(
        `| ${label} | ${qd} | ${Math.round(iops)} | ${lat.toFixed(1)} µs | ${cpu.toFixed(1)} µs | ${label.startsWith('spdk') ? '1.00x' : ratio} |`,
      )
    }
  }
} finally {
  if (!mounted) spawnSync('umount', ['/dev/hugepages'])
  writeFileSync(sysctl, String(pagesBefore))
}
