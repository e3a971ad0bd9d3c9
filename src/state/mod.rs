//! What the proxy remembers between requests and across restarts, apart from the spool:
//! receivers' learned limits ([`limits`]) and the ids of delivered payloads ([`dedupe`]).
//!
//! Both live in memory behind small APIs and are persisted as small JSON state files, written
//! atomically (temporary file, fsync, rename) by a background task shortly after each change
//! ([`file::StateFile`]). The incident log stays an audit trail; nothing here is rebuilt from it.
//!
//! The files live in the spool directory when a route uses the spool, else next to the
//! incident log ([`state_dir`]).

pub mod dedupe;
pub mod file;
pub mod limits;

use std::path::PathBuf;

use crate::config::Config;

pub use self::dedupe::{DedupeMemory, Repeat};
pub use self::file::Persisted;
pub use self::limits::{Evidence, LearnedLimits, RouteLearned};

/// Where the state files of `config` live: the spool directory when the spool is used, else
/// the incident log's folder.
pub fn state_dir(config: &Config) -> PathBuf {
    if config.spool.used {
        return config.spool.dir.clone();
    }
    config
        .incidents
        .path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The learned-limits file of `config`.
pub fn limits_path(config: &Config) -> PathBuf {
    state_dir(config).join(limits::FILE_NAME)
}

/// The dedupe file of `config`.
pub fn dedupe_path(config: &Config) -> PathBuf {
    state_dir(config).join(dedupe::FILE_NAME)
}
