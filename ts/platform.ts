// Which prebuilt binaries fit this machine: the napi-rs platform packages (`npm/` in the
// repository), named `vfio-user-<platform>-<arch>-<libc>`.

/** The platforms a prebuilt package is published for. */
export const PREBUILT_PLATFORMS = ['linux-x64-gnu', 'linux-arm64-gnu', 'linux-x64-musl', 'linux-arm64-musl'] as const

/** The C library Node runs on: `'glibc'`, `'musl'`, or `undefined` off Linux. */
export function libc(): 'glibc' | 'musl' | undefined {
  if (process.platform !== 'linux') return undefined
  // glibc's version is in the report header; musl builds of Node have none.
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return report?.header?.glibcVersionRuntime ? 'glibc' : 'musl'
}

/** This machine's platform triple as the packages name it, e.g. `linux-x64-gnu`. */
export function platformTriple(): string {
  const c = libc()
  return `${process.platform}-${process.arch}${c === undefined ? '' : c === 'glibc' ? '-gnu' : '-musl'}`
}

/** The platform package for this machine, e.g. `vfio-user-linux-x64-gnu`. */
export function platformPackage(): string {
  return `vfio-user-${platformTriple()}`
}
