//! Interrupts as calls (protocol.md 3.7): eventfds made here, one per vector, wired to the
//! device with DEVICE_SET_IRQS in chunks of the server's `max_msg_fds`, and watched by the I/O
//! thread (see `irq_table.rs`); unwired and closed by [`Client::disable_irqs`] or when the
//! connection ends.

use crate::irq_table::{token, Group, IrqHook};
use crate::join::Join;
use crate::pending::{Completion, Reply};
use crate::{Client, Error, Request};
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;
use vfio_user_proto::irq::{set_irqs_request, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};
use vfio_user_proto::Command;

/// Where the eventfds of [`Client::enable_irqs_with`] come from.
pub enum IrqFds<'a> {
    /// Made here; read by the I/O thread (and reported to the irq hook) when `watch`.
    Make { watch: bool },
    /// The caller's, one per vector: duplicated, never read here.
    Given(&'a [BorrowedFd<'a>]),
}

/// A duplicate of the caller's `fd`, checked to be an eventfd.
fn adopt_eventfd(fd: BorrowedFd<'_>) -> Result<EventFd, Error> {
    let n = fd.as_raw_fd();
    let owned = fd.try_clone_to_owned().map_err(|e| {
        Error::new(
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            format!("fd {n} cannot be duplicated: {e}"),
        )
    })?;
    let what = std::fs::read_link(format!("/proc/self/fd/{}", owned.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if what != "anon_inode:[eventfd]" {
        return Err(Error::new(
            Errno::EINVAL,
            format!("fd {n} is not an eventfd ({what})"),
        ));
    }
    // SAFETY: checked just above to be an eventfd, and the duplicate is ours alone.
    Ok(unsafe { EventFd::from_owned_fd(owned) })
}

/// What [`Client::enable_irqs`] made: the group's id (as the hook reports it) and the
/// eventfds, borrowed (the client closes them).
pub struct Enabled {
    pub group: u32,
    pub fds: Vec<RawFd>,
}

fn set_irqs<'a>(
    payload: &'a [u8],
    fds: &'a [BorrowedFd<'a>],
    timeout: Option<Duration>,
) -> Request<'a> {
    Request {
        command: Command::DeviceSetIrqs as u16,
        payload,
        fds,
        timeout,
    }
}

impl Client {
    /// Sets the function the I/O thread calls with (group, vector, count) when a vector fires.
    pub fn on_irq(&self, hook: IrqHook) {
        self.irq_table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hook = Some(hook);
    }

    /// Makes an eventfd for each of vectors [start, start + count) of irq `index`, watches
    /// them, and wires them to the device (DATA_EVENTFD | ACTION_TRIGGER, in chunks of the
    /// server's `max_msg_fds`); `done` gets the last chunk's reply or the first failure. If
    /// this returns an error nothing was sent and `done` is not called.
    pub fn enable_irqs(
        &self,
        index: u32,
        start: u32,
        count: u32,
        timeout: Option<Duration>,
        done: Completion,
    ) -> Result<Enabled, Error> {
        self.enable_irqs_with(
            index,
            start,
            count,
            IrqFds::Make { watch: true },
            timeout,
            done,
        )
    }

    /// [`Client::enable_irqs`] with the eventfds chosen: made here and watched or not (an
    /// eventfd nobody here reads can go to KVM as an irqfd with no second reader racing it),
    /// or the caller's own, one per vector (duplicated; never read here, the caller keeps
    /// theirs). `Enabled::fds` are then the caller's numbers.
    pub fn enable_irqs_with(
        &self,
        index: u32,
        start: u32,
        count: u32,
        source: IrqFds<'_>,
        timeout: Option<Duration>,
        done: Completion,
    ) -> Result<Enabled, Error> {
        let chunk = self
            .with_server_caps(|c| c.max_msg_fds.max(1) as usize)
            .ok_or_else(|| {
                Error::new(
                    Errno::ENOTCONN,
                    "cannot wire interrupts before version negotiation",
                )
                .with_command(Command::DeviceSetIrqs as u16)
            })?;
        if count == 0 || start.checked_add(count).is_none() {
            return Err(Error::new(
                Errno::EINVAL,
                format!("{count} vectors from {start} of irq index {index}"),
            ));
        }
        let (fds, raw, watched) = match source {
            IrqFds::Make { watch } => {
                let fds = (0..count)
                    .map(|_| {
                        EventFd::from_value_and_flags(
                            0,
                            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::new(e, format!("cannot make an eventfd: {}", e.desc())))?;
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
                (fds, raw, watch)
            }
            IrqFds::Given(given) => {
                if given.len() != count as usize {
                    return Err(Error::new(
                        Errno::EINVAL,
                        format!("{} eventfds for {count} vectors", given.len()),
                    ));
                }
                let fds = given
                    .iter()
                    .map(|fd| adopt_eventfd(*fd))
                    .collect::<Result<Vec<_>, _>>()?;
                (fds, given.iter().map(AsRawFd::as_raw_fd).collect(), false)
            }
        };
        let group = {
            let mut table = self.irq_table().lock().unwrap_or_else(|p| p.into_inner());
            let id = table.add(Group { index, start, fds });
            let watch = table.get(id).filter(|_| watched).map_or(Ok(()), |g| {
                g.fds.iter().enumerate().try_for_each(|(i, fd)| {
                    let ev = EpollEvent::new(EpollFlags::EPOLLIN, token(id, start + i as u32));
                    self.io_epoll().add(fd, ev)
                })
            });
            if let Err(e) = watch {
                drop(table);
                self.drop_irq_group(id);
                return Err(Error::new(
                    e,
                    format!("cannot watch an eventfd: {}", e.desc()),
                ));
            }
            id
        };
        let chunks: Vec<(usize, usize)> = (0..count as usize)
            .step_by(chunk)
            .map(|at| (at, (count as usize - at).min(chunk)))
            .collect();
        // The last chunk's reply, or the first failure, settles the call.
        let join = Join::new(
            None::<Reply>,
            chunks.len(),
            Box::new(move |r: Result<Option<Reply>, Error>| {
                done(r.and_then(|last| last.ok_or_else(|| Error::proto("no reply to SET_IRQS"))))
            }),
        );
        let sent = Join::send_parts(&join, chunks.len(), |k| {
            let (at, n) = &chunks[k];
            let payload = set_irqs_request(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                index,
                start + *at as u32,
                *n as u32,
                &[],
            );
            // Our own duplicates, so the table's lock is not held while sending (a failed send
            // ends the connection, which empties the table).
            let owned: Vec<OwnedFd> = {
                let table = self.irq_table().lock().unwrap_or_else(|p| p.into_inner());
                table
                    .get(group)
                    .map(|g| {
                        g.fds[*at..*at + *n]
                            .iter()
                            .filter_map(|f| f.as_fd().try_clone_to_owned().ok())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let fds: Vec<BorrowedFd<'_>> = owned.iter().map(AsFd::as_fd).collect();
            let j = join.clone();
            let on_reply = Box::new(move |r: Result<Reply, Error>| {
                Join::settle(&j, |last| r.map(|reply| *last = Some(reply)));
            });
            self.send_callback(set_irqs(&payload, &fds, timeout), on_reply)
        });
        if let Err(e) = sent {
            // Nothing was sent: the group goes as if never enabled.
            self.drop_irq_group(group);
            return Err(e);
        }
        Ok(Enabled { group, fds: raw })
    }

    /// Stops delivery of group `group` at once (its eventfds are unwatched and closed) and
    /// unwires its vectors on the device (DATA_EVENTFD with no fds); `done` gets the reply.
    pub fn disable_irqs(
        &self,
        group: u32,
        timeout: Option<Duration>,
        done: Completion,
    ) -> Result<(), Error> {
        let Some(g) = self.drop_irq_group(group) else {
            return Err(Error::new(
                Errno::EINVAL,
                "these interrupts are already disabled",
            ));
        };
        let payload = set_irqs_request(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            g.index,
            g.start,
            g.fds.len() as u32,
            &[],
        );
        self.send_callback(set_irqs(&payload, &[], timeout), done)
    }

    /// Takes group `id` out of the table and the I/O thread's epoll set, closing its eventfds.
    fn drop_irq_group(&self, id: u32) -> Option<Group> {
        let g = self
            .irq_table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)?;
        for fd in &g.fds {
            let _ = self.io_epoll().delete(fd);
        }
        Some(g)
    }
}
