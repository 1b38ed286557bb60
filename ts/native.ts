// The generated napi-rs loader at the package root picks the right prebuilt binary.
// Only this file touches it; everything else goes through the typed facade.
import type * as Native from '../index'
import { libc, PREBUILT_PLATFORMS, platformPackage, platformTriple } from './platform'

function load(): typeof Native {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require('../index.js')
  } catch (cause) {
    const triple = platformTriple()
    throw new Error(
      `vfio-user: no native binding loaded for ${process.platform} ${process.arch} (libc: ${libc() ?? 'none'}). ` +
        `Tried vfio-user.${triple}.node beside the package and the package ${platformPackage()}. ` +
        `Prebuilt packages exist for ${PREBUILT_PLATFORMS.join(', ')}; npm installs the one that fits ` +
        'unless optional dependencies were omitted (--omit=optional, --no-optional). ' +
        'Elsewhere, build from source: see "Building from source" in the README. The loader said: ' +
        (cause instanceof Error ? cause.message : String(cause)),
      { cause },
    )
  }
}

export const native: typeof Native = load()
export type {
  NativeCapabilities,
  NativeClient,
  NativeDmaMemory,
  NativeError,
  NativeEvent,
  NativeRegionMapping,
  NativeReply,
  NativeTap,
  NativeVersion,
} from '../index'
