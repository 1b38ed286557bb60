/**
 * vfio-user client for Node.js: drive a PCI device served by another process over a UNIX
 * socket. See the README for the layers behind this API.
 * @packageDocumentation
 */
export {
  type Capabilities,
  type MigrationCapability,
  type ParsedCapabilities,
  parseCapabilities,
  type TwinSocketCapability,
} from './capabilities'
export type { CallOptions } from './channel'
export {
  type ConnectedSocket,
  type ConnectOptions,
  connect,
  type DmaEvent,
  type Reply,
  type SendOptions,
  type VersionInfo,
  VfioUserClient,
  type VfioUserClientEvents,
} from './client'
export { Command, type CommandName, type CommandNumber, commandName } from './command'
export type { DeviceInfo } from './device'
export {
  type AllocateDmaMemoryOptions,
  allocateDmaMemory,
  type DmaMapping,
  DmaMemory,
  type DmaMemoryFromFdOptions,
  type DmaRange,
  dmaMemoryFromFd,
} from './dma'
export { AbortError, VfioUserError } from './errors'
export type { MigrationFlags, MigrationState } from './feature'
export {
  createEventFd,
  type EnableIrqsOptions,
  Interrupts,
  type InterruptsEvents,
  type IrqEvent,
  type IrqInfo,
  type SetIrqsOptions,
  type WaitIrqOptions,
} from './irq'
export {
  type MigrateOptions,
  type MigrateProgress,
  type MigrateSummary,
  MigrationError,
  migrate,
} from './migrate'
export type { StateStreamOptions } from './migration'
export {
  decodePciConfig,
  type PciBar,
  type PciCapability,
  type PciConfig,
  type PciMsi,
  type PciMsix,
} from './pci'
export {
  type IoFdRecord,
  type MappedArea,
  type MapRegionOptions,
  RegionInfo,
  RegionIoFds,
  RegionMap,
  type RegionReadOptions,
  type RegionWriteOptions,
  Registers,
  type RegisterWriteOptions,
  type SparseArea,
} from './region'
export {
  Tap,
  type TapEvents,
  type TapMessage,
  type TapOptions,
  type TapRecord,
  type TapRefused,
  type TapSession,
  tap,
} from './tap'
export { type RequestMessage, requestChannel, type SettleMessage, settleChannel } from './tracing'
