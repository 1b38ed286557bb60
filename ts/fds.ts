// Closing fds the library owns (received with a reply nobody takes), whatever state they are in.
import { closeSync } from 'node:fs'

/** Closes each fd; one already closed is skipped (there is nothing left to release). */
export function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd)
    } catch {
      // Already closed: nothing to release.
    }
  }
}
