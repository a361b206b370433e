//! The one internal error type: a kind that front ends map to their wire errors, plus a message
//! that is safe to show a client (internal details are logged, never sent).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named thing does not exist: a miss, never a failure (invariant 4).
    NotFound,
    /// The request is malformed; `what` says which part.
    InvalidArgument(What),
    /// Bytes received do not hash to the digest the client named.
    DigestMismatch,
    /// Bytes received do not add up to the size the client named.
    SizeMismatch,
    /// The request conflicts with current state (e.g. an upload offset that does not follow on).
    Conflict,
    /// Removing this would leave something pointing at nothing (invariant 1): another stored
    /// item still references it. The message names the holder.
    InUse,
    /// A resource limit: the store is full, or a body is over its cap.
    Exhausted,
    /// A dependency (disk, S3) cannot be reached right now; retrying may help.
    Unavailable,
    /// A bug or an unexpected I/O failure.
    Internal,
}

/// Which part of a request was invalid, so front ends can pick the precise wire code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Digest,
    Name,
    Reference,
    Manifest,
    Range,
    Parameter,
}

#[derive(Clone, Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }
    pub fn invalid(what: What, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument(what), message)
    }
    pub fn invalid_digest(message: impl Into<String>) -> Error {
        Error::invalid(What::Digest, message)
    }
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
    }
    pub fn in_use(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InUse, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Exhausted, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// Wraps an I/O error with what was being done (`context` names the file). A full disk is a
    /// limit the client can act on, not an internal failure. Kinds whose message reaches clients
    /// (full, missing) keep paths out of it: those go to the log.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        match err.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                tracing::warn!(%context, error = %err, "storage is full");
                Error::exhausted("storage is full: free space or lower max_size")
            }
            std::io::ErrorKind::NotFound => {
                tracing::warn!(%context, error = %err, "stored file missing");
                Error::not_found("stored data is missing (the hoard log names the file)")
            }
            _ => Error::internal(format!("{context}: {err}")),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

/// An error with its sources, `: `-joined (library errors often say little at the top: hyper's
/// "client error (Connect)").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}
