// DEVICE_GET_INFO and DEVICE_RESET as typed calls (protocol.md 3.3, 3.10). The bytes are
// encoded and decoded by the proto crate's device.rs, through the binding's device.rs.
import type { CallOptions, Channel } from './channel'
import { Command } from './command'
import { VfioUserError } from './errors'
import { native } from './native'

/** What DEVICE_GET_INFO reports. */
export interface DeviceInfo {
  /** The raw flags. */
  flags: number
  /** DEVICE_RESET is supported. */
  reset: boolean
  /** A PCI device. */
  pci: boolean
  /** Regions (PCI: at least 9; at most 100 are accepted). */
  numRegions: number
  /** Irq indexes (PCI: 5; at most 50 are accepted). */
  numIrqs: number
}

/** Sends DEVICE_GET_INFO and decodes the reply. */
export async function deviceInfo(ch: Channel, options: CallOptions = {}): Promise<DeviceInfo> {
  const reply = await ch.send(Command.DEVICE_GET_INFO, native.deviceInfoRequest(), options)
  const d = native.decodeDeviceInfo(reply.payload)
  if ('errno' in d) throw ch.error(d)
  // Accesses to regions past this count are refused from now on, before they are sent.
  ch.regions.count = d.numRegions
  return {
    flags: d.flags,
    reset: (d.flags & 1) !== 0,
    pci: (d.flags & 2) !== 0,
    numRegions: d.numRegions,
    numIrqs: d.numIrqs,
  }
}

/** Sends DEVICE_RESET, after checking that the device reported reset support. */
export async function reset(ch: Channel, info: DeviceInfo, options: CallOptions = {}): Promise<void> {
  if (!info.reset) {
    throw new VfioUserError(
      'ENOTSUP',
      95,
      'the device did not report reset support (VFIO_DEVICE_FLAGS_RESET) in DEVICE_GET_INFO',
      Command.DEVICE_RESET,
    )
  }
  await ch.send(Command.DEVICE_RESET, Buffer.alloc(0), options)
}
