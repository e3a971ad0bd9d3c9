//! The spool as the running proxy holds it: the store, the retry policy from `[spool]`, and
//! the per-route holds that keep redelivery from retrying faster than the backoff allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::config::SpoolSettings;

use super::{RetryPolicy, SpoolConfig, SpoolError, Store};

/// The spool and how it is drained, shared by the proxy's routes.
#[derive(Clone)]
pub struct SpoolState {
    /// The spool (a directory, or PostgreSQL shared by replicas).
    pub spool: Store,
    /// Backoff and give-up policy.
    pub policy: RetryPolicy,
    /// The `[spool]` settings.
    pub settings: SpoolSettings,
    /// Routes whose redelivery is held until a time (after any failure: the receiver, the
    /// disk, a metadata update), so nothing is retried faster than the backoff allows.
    held: Arc<Mutex<HashMap<String, SystemTime>>>,
}

impl SpoolState {
    /// Opens the spool as its owner (a spool directory is locked and recovered; recovery logs
    /// what it found).
    pub fn open(settings: &SpoolSettings) -> Result<SpoolState, SpoolError> {
        let spool = super::store::open(settings, true)?;
        Ok(SpoolState {
            spool,
            policy: policy(settings),
            settings: settings.clone(),
            held: Arc::default(),
        })
    }

    /// A spool another process owns (for `payload-guard replay` while the proxy runs).
    pub fn attached(spool: Store, settings: &SpoolSettings) -> SpoolState {
        SpoolState {
            spool,
            policy: policy(settings),
            settings: settings.clone(),
            held: Arc::default(),
        }
    }

    pub(crate) fn held_until(&self, route: &str) -> Option<SystemTime> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .copied()
    }

    pub(crate) fn hold(&self, route: &str, until: SystemTime) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let at = held.entry(route.to_string()).or_insert(until);
        *at = (*at).max(until);
    }

    pub(crate) fn release_hold(&self, route: &str) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(route);
    }
}

/// The spool configuration from `[spool]`.
pub fn spool_config(settings: &SpoolSettings) -> SpoolConfig {
    SpoolConfig {
        dir: settings.dir.clone(),
        max_bytes: settings.max_bytes,
        min_free: settings.min_free,
    }
}

/// The retry policy from `[spool]`.
pub fn policy(settings: &SpoolSettings) -> RetryPolicy {
    RetryPolicy {
        retry_initial: settings.retry_initial,
        retry_max: settings.retry_max,
        retry_for: settings.retry_for,
    }
}
