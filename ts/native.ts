// The generated napi-rs loader at the package root picks the right prebuilt binary.
// Only this file touches it; everything else goes through the typed facade.
import type * as Native from '../index'

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const native: typeof Native = require('../index.js')
export type {
  NativeCapabilities,
  NativeClient,
  NativeError,
  NativeEvent,
  NativeReply,
  NativeVersion,
} from '../index'
