//! The seam between the spool's callers (the proxy, redelivery, the admin listener, the CLI)
//! and where records live: [`SpoolStore`], implemented by the disk spool ([`DiskStore`], one
//! machine) and by PostgreSQL ([`super::pg::PgStore`], shared by replicas).
//!
//! Both keep the same promises: [`SpoolStore::commit`] returns only once the record is durable
//! (fsynced, or its transaction committed), so the sender may be acknowledged; a claimed record
//! is held by one attempt at a time; [`SpoolStore::claim_next`] hands out a route's records in
//! arrival order and never a later one while an earlier one is claimed or not yet due.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::pg::{PgSpoolConfig, PgStore};
use super::{Claim, Entry, Meta, RecordId, Spool, SpoolConfig, SpoolError, Staging, State};
use crate::config::{SpoolSettings, StoreBackend};
use crate::db::Database;

/// A spool backend. Cheap to share (`Arc<dyn SpoolStore>`, see [`Store`]).
#[async_trait]
pub trait SpoolStore: Send + Sync + fmt::Debug {
    /// Where the records are, for messages: the directory, or the database (no password).
    fn location(&self) -> String;

    /// Durably stores a payload (`body` exactly as received) in `state`; returns once it is
    /// durable. `Full`/`LowDisk` when there is no room, `Unavailable` when the database cannot
    /// be reached: on any error nothing is kept and the sender must not be acknowledged.
    async fn commit(&self, state: State, meta: &Meta, body: Bytes) -> Result<RecordId, SpoolError>;

    /// Starts a body that is streamed while it is forwarded (see [`StagedBody`]).
    async fn stage(&self, received_at: SystemTime) -> Result<Box<dyn StagedBody>, SpoolError>;

    /// Claims the ready record `id` for a delivery attempt; `None` when it is not ready or is
    /// claimed by another attempt (in this or another process).
    async fn claim(&self, id: &RecordId) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError>;

    /// Claims the oldest ready record of `route` if it is due at `now` and nobody holds it;
    /// `None` otherwise (a later record is never handed out before an earlier one is
    /// delivered or dead).
    async fn claim_next(
        &self,
        route: &str,
        now: SystemTime,
    ) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError>;

    /// The routes that have ready records.
    async fn ready_routes(&self) -> Result<Vec<String>, SpoolError>;

    /// Records in `state` (claimed ones excluded), optionally of one route, oldest first.
    async fn list(&self, state: State, route: Option<&str>) -> Result<Vec<Entry>, SpoolError>;

    /// The record `id` wherever it is (ready, claimed, dead, archive).
    async fn find(&self, id: &RecordId) -> Result<Option<Entry>, SpoolError>;

    /// A record's metadata and body (`NotFound` when it is not in `state`).
    async fn read(&self, state: State, id: &RecordId) -> Result<(Meta, Vec<u8>), SpoolError>;

    /// Streams a record's body to `out`; an error after bytes were written means "discard
    /// what you got". Writes to `out` on the calling thread (the CLI's stdout).
    async fn copy_body(
        &self,
        state: State,
        id: &RecordId,
        out: &mut (dyn Write + Send),
    ) -> Result<(Meta, u64), SpoolError>;

    /// Moves a dead record back to ready; `false` if it is not dead (anymore).
    async fn revive(&self, id: &RecordId) -> Result<bool, SpoolError>;

    /// Removes one record from `state` (the console's purge button); `false` when it is not
    /// there or (ready) an attempt holds it.
    async fn remove(&self, state: State, id: &RecordId) -> Result<bool, SpoolError>;

    /// Removes records in `state` received more than `older_than` ago (claimed ready records
    /// are skipped); returns how many.
    async fn purge(&self, state: State, older_than: Duration) -> Result<usize, SpoolError>;

    /// Gets the store ready at start-up (PostgreSQL: connect and migrate the schema). An
    /// error is worth a log line, not an exit: every later call tries again.
    async fn prepare(&self) -> Result<(), SpoolError> {
        Ok(())
    }

    /// Whether a new record could be stored right now (for `/readyz`): below `max_bytes`,
    /// and the disk writable above `min_free` or the database reachable; else why not.
    async fn can_accept(&self) -> Result<(), SpoolError>;

    /// Recounts depth and usage from the store (after other processes changed it).
    async fn refresh(&self);

    /// Per route: ready records and when the oldest was received (for `/metrics`, which is
    /// answered without waiting: the disk spool reads the records' metadata, the PostgreSQL
    /// spool answers with its count from the last [`refresh`](SpoolStore::refresh)).
    fn ready_by_route(&self) -> Vec<(String, u64, SystemTime)>;

    /// Bytes held by records, as last counted.
    fn usage(&self) -> u64;

    /// Records in `state`, as last counted (ready includes claimed ones).
    fn depth(&self, state: State) -> usize;
}

/// The spool as its callers hold it.
pub type Store = std::sync::Arc<dyn SpoolStore>;

/// One claimed record: the attempt ends with [`complete`](ClaimedRecord::complete),
/// [`release`](ClaimedRecord::release) or [`bury`](ClaimedRecord::bury). Dropped without
/// one of these, the record goes back to ready unchanged (at once, or when its lease ends).
#[async_trait]
pub trait ClaimedRecord: Send + Sync + fmt::Debug {
    /// The record's id.
    fn id(&self) -> &RecordId;
    /// Its metadata as claimed.
    fn meta(&self) -> &Meta;
    /// Bytes of its body.
    fn body_len(&self) -> u64;
    /// Reads the body.
    async fn body(&mut self) -> Result<Vec<u8>, SpoolError>;
    /// Delivered: deletes the record.
    async fn complete(self: Box<Self>) -> Result<(), SpoolError>;
    /// Retry later: `attempts + 1`, `last_error` and `next_attempt_at` recorded, back to ready
    /// in its place in arrival order.
    async fn release(
        self: Box<Self>,
        last_error: &str,
        next_attempt_at: SystemTime,
    ) -> Result<(), SpoolError>;
    /// Failed for good: `attempts + 1`, the receiver's status, a snippet and `last_error`
    /// recorded, moved to dead.
    async fn bury(
        self: Box<Self>,
        status: Option<u16>,
        snippet: &str,
        last_error: &str,
    ) -> Result<(), SpoolError>;
}

/// A body written while it is forwarded (spool routes' large bodies), kept in a local file
/// and made a record with [`commit`](StagedBody::commit), or removed when dropped.
#[async_trait]
pub trait StagedBody: Send + Sync + fmt::Debug {
    /// Body bytes written so far.
    fn body_len(&self) -> u64;
    /// Appends a chunk (blocking: call on a blocking thread). `Full` as soon as the spool
    /// could not hold the body.
    fn write_all(&mut self, chunk: &[u8]) -> Result<(), SpoolError>;
    /// Flushes and says where to read the body back: file, offset, length.
    fn body_file(&mut self) -> Result<(PathBuf, u64, u64), SpoolError>;
    /// Makes the staged body a durable record in `state` (same promise as `commit`).
    async fn commit(self: Box<Self>, state: State, meta: &Meta) -> Result<RecordId, SpoolError>;
}

/// Opens the spool `[spool]` configures: as its owner (the proxy: the disk spool is locked and
/// recovered) or attached alongside it (the CLI). A PostgreSQL store connects lazily.
pub fn open(settings: &SpoolSettings, owner: bool) -> Result<Store, SpoolError> {
    match &settings.backend {
        StoreBackend::Disk => {
            let cfg = SpoolConfig {
                dir: settings.dir.clone(),
                max_bytes: settings.max_bytes,
                min_free: settings.min_free,
            };
            let spool = if owner {
                // Recovery logs what it found ("spool opened").
                Spool::open(cfg)?.0
            } else {
                Spool::attach(cfg)?
            };
            Ok(std::sync::Arc::new(DiskStore::new(spool)))
        }
        StoreBackend::Postgres { url_env } => {
            let connections = if owner {
                settings.redeliver_concurrency + 8
            } else {
                2
            };
            let db = Database::from_env(url_env, connections)?;
            let store = PgStore::new(
                db,
                PgSpoolConfig {
                    max_bytes: settings.max_bytes,
                    lease_for: settings.lease_for,
                    staging_dir: settings.dir.join("staging"),
                },
            )?;
            Ok(std::sync::Arc::new(store))
        }
    }
}

/// Runs a blocking spool call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|join| {
        Err(SpoolError::Io {
            op,
            path: PathBuf::new(),
            source: std::io::Error::other(join.to_string()),
        })
    })
}

/// The disk spool ([`Spool`]) as a [`SpoolStore`]: each call runs on a blocking thread.
#[derive(Debug, Clone)]
pub struct DiskStore {
    spool: Spool,
}

impl DiskStore {
    /// Wraps an opened (or attached) disk spool.
    pub fn new(spool: Spool) -> DiskStore {
        DiskStore { spool }
    }

    /// The disk spool itself.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }
}

#[async_trait]
impl SpoolStore for DiskStore {
    fn location(&self) -> String {
        self.spool.dir().display().to_string()
    }

    async fn commit(&self, state: State, meta: &Meta, body: Bytes) -> Result<RecordId, SpoolError> {
        let (spool, meta) = (self.spool.clone(), meta.clone());
        blocking("commit", move || spool.commit(state, &meta, &body)).await
    }

    async fn stage(&self, received_at: SystemTime) -> Result<Box<dyn StagedBody>, SpoolError> {
        let spool = self.spool.clone();
        let staging = blocking("stage", move || spool.stage(received_at)).await?;
        Ok(Box::new(staging))
    }

    async fn claim(&self, id: &RecordId) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError> {
        let (spool, id) = (self.spool.clone(), id.clone());
        let claim = blocking("claim", move || spool.claim(&id)).await?;
        Ok(claim.map(|c| Box::new(c) as Box<dyn ClaimedRecord>))
    }

    async fn claim_next(
        &self,
        route: &str,
        now: SystemTime,
    ) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError> {
        let (spool, route) = (self.spool.clone(), route.to_owned());
        let claim = blocking("claim", move || spool.claim_next(&route, now)).await?;
        Ok(claim.map(|c| Box::new(c) as Box<dyn ClaimedRecord>))
    }

    async fn ready_routes(&self) -> Result<Vec<String>, SpoolError> {
        let spool = self.spool.clone();
        blocking("list", move || spool.ready_routes()).await
    }

    async fn list(&self, state: State, route: Option<&str>) -> Result<Vec<Entry>, SpoolError> {
        let (spool, route) = (self.spool.clone(), route.map(str::to_owned));
        blocking("list", move || spool.list(state, route.as_deref())).await
    }

    async fn find(&self, id: &RecordId) -> Result<Option<Entry>, SpoolError> {
        let (spool, id) = (self.spool.clone(), id.clone());
        blocking("find", move || spool.find(&id)).await
    }

    async fn read(&self, state: State, id: &RecordId) -> Result<(Meta, Vec<u8>), SpoolError> {
        let (spool, id) = (self.spool.clone(), id.clone());
        blocking("read", move || spool.read(state, &id)).await
    }

    async fn copy_body(
        &self,
        state: State,
        id: &RecordId,
        out: &mut (dyn Write + Send),
    ) -> Result<(Meta, u64), SpoolError> {
        self.spool.copy_body(state, id, out)
    }

    async fn revive(&self, id: &RecordId) -> Result<bool, SpoolError> {
        let (spool, id) = (self.spool.clone(), id.clone());
        blocking("rename", move || spool.revive(&id)).await
    }

    async fn remove(&self, state: State, id: &RecordId) -> Result<bool, SpoolError> {
        let (spool, id) = (self.spool.clone(), id.clone());
        blocking("remove", move || spool.remove(state, &id)).await
    }

    async fn purge(&self, state: State, older_than: Duration) -> Result<usize, SpoolError> {
        let spool = self.spool.clone();
        blocking("purge", move || spool.purge(state, older_than)).await
    }

    async fn can_accept(&self) -> Result<(), SpoolError> {
        let spool = self.spool.clone();
        blocking("create", move || spool.can_accept()).await
    }

    async fn refresh(&self) {
        // The disk spool counts as it goes, and rescans by itself when it finds itself full.
    }

    fn ready_by_route(&self) -> Vec<(String, u64, SystemTime)> {
        let entries = match self.spool.list(State::Ready, None) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the spool for its metrics");
                return Vec::new();
            }
        };
        let mut by_route: Vec<(String, u64, SystemTime)> = Vec::new();
        for entry in entries {
            match by_route.iter_mut().find(|r| r.0 == entry.meta.route) {
                Some(r) => {
                    r.1 += 1;
                    r.2 = r.2.min(entry.meta.received_at);
                }
                None => by_route.push((entry.meta.route, 1, entry.meta.received_at)),
            }
        }
        by_route
    }

    fn usage(&self) -> u64 {
        self.spool.usage()
    }

    fn depth(&self, state: State) -> usize {
        self.spool.depth(state)
    }
}

#[async_trait]
impl ClaimedRecord for Claim {
    fn id(&self) -> &RecordId {
        Claim::id(self)
    }

    fn meta(&self) -> &Meta {
        Claim::meta(self)
    }

    fn body_len(&self) -> u64 {
        Claim::body_len(self)
    }

    async fn body(&mut self) -> Result<Vec<u8>, SpoolError> {
        self.read_body().await
    }

    async fn complete(self: Box<Self>) -> Result<(), SpoolError> {
        blocking("remove", move || Claim::complete(*self)).await
    }

    async fn release(
        self: Box<Self>,
        last_error: &str,
        next_attempt_at: SystemTime,
    ) -> Result<(), SpoolError> {
        let last_error = last_error.to_owned();
        blocking("rewrite", move || {
            Claim::release(*self, &last_error, next_attempt_at)
        })
        .await
    }

    async fn bury(
        self: Box<Self>,
        status: Option<u16>,
        snippet: &str,
        last_error: &str,
    ) -> Result<(), SpoolError> {
        let (snippet, last_error) = (snippet.to_owned(), last_error.to_owned());
        blocking("rewrite", move || {
            Claim::bury(*self, status, &snippet, &last_error)
        })
        .await
    }
}

#[async_trait]
impl StagedBody for Staging {
    fn body_len(&self) -> u64 {
        Staging::body_len(self)
    }

    fn write_all(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        Staging::write_all(self, chunk)
    }

    fn body_file(&mut self) -> Result<(PathBuf, u64, u64), SpoolError> {
        Staging::body_file(self)
    }

    async fn commit(self: Box<Self>, state: State, meta: &Meta) -> Result<RecordId, SpoolError> {
        let meta = meta.clone();
        blocking("commit", move || Staging::commit(*self, state, &meta)).await
    }
}
