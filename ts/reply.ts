/** A reply from the server. */
export interface Reply {
  /** The message id it answered. */
  id: number
  command: number
  /** Header flags (type bits, No_reply, Error). */
  flags: number
  /** The payload after the 16-byte header. */
  payload: Buffer
  /** File descriptors that came with the reply. They are yours: close them (`fs.closeSync`). */
  fds: number[]
}
