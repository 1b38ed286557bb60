// Huge pages for tests that need them (SPDK uses only DMA memory its own mapping sees 2 MiB
// aligned): `reserveHugePages(n)` adds n to /proc/sys/vm/nr_hugepages and the returned
// function takes them back, so the count ends where it started whatever the order tests in
// other processes do the same. Each read-modify-write holds a lock (a directory made with
// mkdir, which only one process can make) for the microseconds it takes.
import { mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const SYSCTL = '/proc/sys/vm/nr_hugepages'
const LOCK = join(tmpdir(), 'vfio-user-hugepages.lock')
const pause = new Int32Array(new SharedArrayBuffer(4))

function locked<T>(f: () => T): T {
  for (;;) {
    try {
      mkdirSync(LOCK)
      break
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e
      // Another process holds it for a read and a write: wait a millisecond, then again.
      Atomics.wait(pause, 0, 0, 1)
    }
  }
  try {
    return f()
  } finally {
    rmdirSync(LOCK)
  }
}

/** Pages reserved and free now. */
export function hugePages(): { total: number; free: number } {
  const info = readFileSync('/proc/meminfo', 'utf8')
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(info)?.[1] ?? 0)
  return { total: field('HugePages_Total'), free: field('HugePages_Free') }
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
