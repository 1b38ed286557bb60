use nix::errno::Errno;
use std::fmt;
use vfio_user_proto::command_name;

/// Every failure a caller can see: an errno (what JS turns into `code`), a message that says
/// what happened, and the command it concerns when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub errno: Errno,
    pub message: String,
    pub command: Option<u16>,
}

impl Error {
    pub fn new(errno: Errno, message: impl Into<String>) -> Error {
        Error {
            errno,
            message: message.into(),
            command: None,
        }
    }

    pub fn with_command(mut self, command: u16) -> Error {
        self.command = Some(command);
        self
    }

    /// A peer broke the protocol.
    pub fn proto(message: impl Into<String>) -> Error {
        Error::new(Errno::EPROTO, message)
    }

    /// An error reply from the server. Errno 0 (or nonsense above 4096) is still a failure:
    /// it becomes EIO, never success.
    pub fn from_error_reply(raw: u32, command: u16) -> Error {
        let name = command_name(command);
        if raw == 0 || raw > 4096 {
            return Error::new(
                Errno::EIO,
                format!("server failed {name} without a valid errno (error field {raw})"),
            )
            .with_command(command);
        }
        let errno = Errno::from_raw(raw as i32);
        if errno == Errno::UnknownErrno {
            return Error::new(
                Errno::EIO,
                format!("server failed {name} with errno {raw}, unknown on this system"),
            )
            .with_command(command);
        }
        Error::new(errno, format!("server failed {name}: {}", errno.desc())).with_command(command)
    }

    pub fn code(&self) -> String {
        format!("{:?}", self.errno)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_errno() {
        assert_eq!(Error::from_error_reply(2, 5).errno, Errno::ENOENT);
        assert_eq!(Error::from_error_reply(0, 5).errno, Errno::EIO);
        assert_eq!(Error::from_error_reply(5000, 5).errno, Errno::EIO);
        let unknown = Error::from_error_reply(600, 5);
        assert_eq!(unknown.errno, Errno::EIO);
        assert!(unknown.message.contains("600"));
        let e = Error::from_error_reply(22, 9);
        assert_eq!(e.command, Some(9));
        assert_eq!(e.code(), "EINVAL");
        assert!(e.message.contains("REGION_READ"));
    }
}
