// What the per-command modules (device.ts, region.ts, irq.ts) need from a connection: the
// native client and the ways to send through it. A client hands its own to them; they
// shape arguments and results and never see its other internals.
import type { VfioUserError } from './errors'
import type { NativeClient, NativeError } from './native'
import type { Reply } from './reply'

/** Options every typed asynchronous call accepts. */
export interface CallOptions {
  /** Overrides the client's timeout for this call, in ms. */
  timeoutMs?: number
  /** Rejects the promise with an `AbortError` when aborted (what was sent may still complete). */
  signal?: AbortSignal
}

/** @internal A connection as the per-command modules use it. */
export interface Channel {
  readonly native: NativeClient
  /** Sends `command` with `payload` and resolves with the reply (`sendWait`). */
  send(command: number, payload: Uint8Array, options?: CallOptions): Promise<Reply>
  /**
   * Starts a native call that completes with a reply event for `token`; `start` returns the
   * error when nothing was sent. Resolves with the reply, or rejects with the error.
   */
  call(command: number, start: (token: number) => NativeError | null, options?: CallOptions): Promise<Reply>
  /**
   * Keeps `memory` reachable until the native event for `token` is delivered (or the
   * connection has ended), whatever happens to the promise: native code writes into it until
   * then. `release` is called then too.
   */
  hold(token: number, memory: Uint8Array, release?: () => void): void
  /** The error of the last native sync call that failed, as a `VfioUserError`. */
  lastError(): VfioUserError
  /** A native error record as a `VfioUserError` naming this connection. */
  error(e: NativeError): VfioUserError
  /** Where irq events for each enabled group go, by group id. */
  readonly irqGroups: Map<number, IrqSink>
  /** Buffers behind DMA ranges that have no fd, kept reachable until unmapped, by iova. */
  readonly dmaBuffers: Map<bigint, Uint8Array>
  /** The server's `maxDataXferSize` (the spec's default before negotiation). */
  maxDataXferSize(): number
  /** What the server has said about its regions, to refuse accesses it would refuse. */
  readonly regions: RegionLimits
  /** Each irq index's vector count, once its DEVICE_GET_IRQ_INFO has been read. */
  readonly irqCounts: Map<number, number>
  /** The regions mapped into this process (unmapped with the connection). */
  readonly regionMaps: Set<{ unmap(): void }>
  /**
   * Corks sends until the current JavaScript job ends (a microtask), as Node's
   * `writable.cork()` with `process.nextTick(uncork)`: requests made meanwhile go out together,
   * and small posted writes as REGION_WRITE_MULTI entries.
   */
  corkTick(): void
  /** Runs a blocking native call, traced as `command` (see tracing.ts). */
  traceSync<T>(command: number, call: () => T): T
  /** Traces a posted request of `command` as sent. */
  tracePosted(command: number): void
}

/** @internal What a connection knows of its regions' bounds, from the server's own replies. */
export interface RegionLimits {
  /** How many regions DEVICE_GET_INFO reported, once it has been asked. */
  count?: number
  /** Each region's size, once its DEVICE_GET_REGION_INFO has been read. */
  readonly sizes: Map<number, bigint>
}

/** @internal What receives a group's irq events, and the end of the connection. */
export interface IrqSink {
  fire(vector: number, count: number): void
  end(): void
}
