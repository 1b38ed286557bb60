// Huge pages for tests that need them (SPDK uses only DMA memory its own mapping sees 2 MiB
// aligned): `reserveHugePages(n)` adds n to /proc/sys/vm/nr_hugepages and the returned
// function takes them back, so the count ends where it started whatever the order tests in
// other processes do the same. Each read-modify-write holds a lock (a directory made with
// mkdir, which only one process can make) for the microseconds it takes.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const SYSCTL = '/proc/sys/vm/nr_hugepages'
const LOCK = join(tmpdir(), 'vfio-user-hugepages.lock')
const pause = new Int32Array(new SharedArrayBuffer(4))

function locked<T>(f: () => T): T {
  const deadline = Date.now() + 10_000
  for (;;) {
    try {
      mkdirSync(LOCK)
      writeFileSync(join(LOCK, 'pid'), String(process.pid))
      break
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e
      // A holder that died (a killed worker) leaves its lock: broken once its pid is gone.
      if (!alive(Number(readFileOr(join(LOCK, 'pid'))))) rmSync(LOCK, { recursive: true, force: true })
      else if (Date.now() > deadline) throw new Error(`${LOCK} is held by a live process for more than 10 s`)
      // Held for a read and a write: wait a millisecond, then again.
      else Atomics.wait(pause, 0, 0, 1)
    }
  }
  try {
    return f()
  } finally {
    rmSync(LOCK, { recursive: true, force: true })
  }
}

function readFileOr(path: string): string {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return ''
  }
}

/** Whether process `pid` exists (a lock just made may have no pid yet: taken as alive). */
function alive(pid: number): boolean {
  if (!pid) return true
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH'
  }
}

/** Huge-page memory this process maps now, in kB (`/proc/self/smaps_rollup`). */
export function hugePagesMapped(): number {
  const rollup = readFileSync('/proc/self/smaps_rollup', 'utf8')
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(rollup)?.[1] ?? 0)
  return field('Shared_Hugetlb') + field('Private_Hugetlb')
}

/**
 * Reserves `n` more huge pages (as root), checks the kernel granted them, and returns the
 * function that gives them back.
 */
export function reserveHugePages(n: number): () => void {
  const granted = locked(() => {
    const before = Number(readFileSync(SYSCTL, 'utf8'))
    writeFileSync(SYSCTL, String(before + n))
    const now = Number(readFileSync(SYSCTL, 'utf8'))
    if (now < before + n) writeFileSync(SYSCTL, String(before))
    return now - before
  })
  if (granted < n) throw new Error(`the kernel granted ${granted} of ${n} huge pages (${SYSCTL})`)
  let held = true
  return () => {
    if (!held) return
    held = false
    locked(() => writeFileSync(SYSCTL, String(Math.max(0, Number(readFileSync(SYSCTL, 'utf8')) - n))))
  }
}
