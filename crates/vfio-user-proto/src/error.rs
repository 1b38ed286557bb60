use std::fmt;

/// A peer sent something the protocol does not allow. Surfaces to users as `EPROTO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl ProtoError {
    pub fn new(what: impl Into<String>) -> Self {
        ProtoError(what.into())
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtoError {}
