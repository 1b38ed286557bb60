/**
 * Every vfio-user command number (protocol spec 0.9.2, plus the obsolete 14).
 * `DMA_READ` and `DMA_WRITE` travel from server to client and cannot be sent.
 */
export const Command = {
  VERSION: 1,
  DMA_MAP: 2,
  DMA_UNMAP: 3,
  DEVICE_GET_INFO: 4,
  DEVICE_GET_REGION_INFO: 5,
  DEVICE_GET_REGION_IO_FDS: 6,
  DEVICE_GET_IRQ_INFO: 7,
  DEVICE_SET_IRQS: 8,
  REGION_READ: 9,
  REGION_WRITE: 10,
  DMA_READ: 11,
  DMA_WRITE: 12,
  DEVICE_RESET: 13,
  /** Obsolete (migration v1); removed from the current spec. */
  DIRTY_PAGES: 14,
  REGION_WRITE_MULTI: 15,
  DEVICE_FEATURE: 16,
  MIG_DATA_READ: 17,
  MIG_DATA_WRITE: 18,
} as const

/** A command name, such as `'DEVICE_GET_INFO'`. */
export type CommandName = keyof typeof Command
/** A command number from {@link Command}. */
export type CommandNumber = (typeof Command)[CommandName]

const names = new Map<number, CommandName>(Object.entries(Command).map(([name, n]) => [n, name as CommandName]))

/** The name of a command number, or `command N` for one the spec does not define. */
export function commandName(command: number): string {
  return names.get(command) ?? `command ${command}`
}
