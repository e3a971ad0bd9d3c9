//! What can go wrong in the spool, with messages that name the setting or file at fault.

use std::io;
use std::path::PathBuf;

use super::id::RecordId;

/// Everything the spool can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Committing would take the spool over `max_bytes` (ready + inflight + dead + archive).
    #[error(
        "spool is full: {used} of max_bytes {max} bytes in use; raise [spool] max_bytes or purge dead and archived records"
    )]
    Full {
        /// Bytes in use, including this record.
        used: u64,
        /// The configured `max_bytes`.
        max: u64,
    },
    /// The disk holding the spool has less than `min_free` bytes free.
    #[error(
        "disk under the spool has {free} bytes free, less than min_free {min}; free disk space or lower [spool] min_free"
    )]
    LowDisk {
        /// Bytes free for unprivileged users.
        free: u64,
        /// The configured `min_free`.
        min: u64,
    },
    /// Another process owns this spool directory (holds its lock file).
    #[error(
        "spool directory {path} is in use by another payload-guard process: stop it, or point [spool] dir elsewhere"
    )]
    Locked {
        /// The spool directory.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("spool {op} failed for {path}: {source}")]
    Io {
        /// What was being done (`"fsync"`, `"rename"`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A record failed its checksum or could not be parsed; it has been (or should be)
    /// moved to `quarantine/`.
    #[error("spool record {path} is corrupt: {reason}")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// No record with this id in the asked-for state.
    #[error("no spool record {0}: check the id with `payload-guard spool list`")]
    NotFound(RecordId),
    /// The spool database could not be reached or refused the operation: nothing was
    /// stored or changed.
    #[error("spool database unavailable: {0}")]
    Database(#[from] crate::db::DbError),
    /// A claim's lease ran out before its attempt was settled, and another attempt took the
    /// record (PostgreSQL spool): the late outcome is not applied.
    #[error(
        "the lease on spool record {0} ran out and another attempt took it: raise [spool] lease_for above the receiver's response time"
    )]
    LeaseLost(RecordId),
    /// A record id from user input is not of the form the spool writes.
    #[error("invalid spool record id {0:?}: ids look like 1718000000000-0001-0123456789abcdef")]
    InvalidId(String),
}

impl SpoolError {
    /// Whether the spool refused for lack of room (`Full`, `LowDisk`): the proxy answers 503
    /// with `Retry-After`.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SpoolError::Full { .. } | SpoolError::LowDisk { .. })
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> SpoolError {
        SpoolError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
