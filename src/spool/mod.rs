//! The durable spool: payloads that a spool route could not deliver are kept on disk, the
//! sender is acknowledged (202 with the record id) only once the record is durable, and the
//! redelivery task drains them. Also holds dead letters (final 4xx) and the archive of
//! untrimmed originals. Synchronous and blocking: async callers use `spawn_blocking`.
//!
//! # Directory layout
//! ```text
//! <dir>/lock         flock held by the owning proxy process (see `Spool::open`)
//! <dir>/tmp/         records being written (`<id>`, `<id>.rewrite`); wiped at start-up
//! <dir>/ready/       waiting for redelivery
//! <dir>/inflight/    claimed by a redelivery attempt; moved back to ready/ at start-up
//! <dir>/dead/        final failures, with the receiver's status and a snippet
//! <dir>/archive/     untrimmed originals of trimmed payloads
//! <dir>/quarantine/  records that failed their checksum (`<state>-<id>`); never read again
//! ```
//! Directories are created 0700 and files 0600. Every record is one file named by its
//! [`RecordId`], in the format described in `record.rs` (header, body, metadata JSON, CRC-32
//! of each). A record moves between states only by `rename`, so it is always in exactly one
//! directory, and a concurrent reader sees either the old or the new version.
//!
//! # Durability
//! Commit: write `tmp/<id>` (create_new, 0600), fsync it, rename into the state directory,
//! fsync that directory. An fsync error is never retried on the same file: the file is removed
//! and the commit fails, so the sender is not acknowledged. Rewrites (release, bury) write a
//! new file in `tmp/`, fsync it and rename it over the claimed one.
//!
//! # Sharing with the CLI
//! One process owns a spool ([`Spool::open`] takes an exclusive `flock` and runs start-up
//! recovery); others ([`Spool::attach`], the `payload-guard spool` commands) never recover and
//! touch records only through atomic renames and unlinks: claiming is `rename ready/ →
//! inflight/`, which only one process can win, so a record is never both purged and delivered.
//!
//! # Space
//! `max_bytes` bounds the bytes of ready, inflight, dead and archive records (and writes in
//! progress); `min_free` is checked with `statvfs` before each write. Both refusals
//! ([`SpoolError::is_refusal`]) leave nothing behind.

pub mod backoff;
mod claim;
mod durable;
mod error;
mod id;
mod meta;
pub mod pg;
mod record;
mod recover;
mod render;
mod space;
mod staging;
pub mod state;
pub mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

pub use self::backoff::{
    DEFAULT_RETRY_FOR, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX, RetryPolicy, next_delay,
};
pub use self::claim::Claim;
pub use self::error::SpoolError;
pub use self::id::RecordId;
pub use self::meta::{LAST_ERROR_MAX_BYTES, Meta, SNIPPET_MAX_BYTES};
pub use self::record::FORMAT_VERSION;
pub use self::recover::{Quarantined, RecoveryReport};
pub use self::render::{human_age, human_bytes, render_list, render_show};
pub use self::staging::Staging;
pub use self::store::{ClaimedRecord, DiskStore, SpoolStore, StagedBody, Store};

use self::meta::truncate_utf8;
use self::record::{RecordFile, RecordWriter};
use self::space::Space;

/// Default `spool_memory_threshold`: bodies larger than this are teed to a [`Staging`] file.
pub const DEFAULT_MEMORY_THRESHOLD: u64 = 1024 * 1024;

const TMP: &str = "tmp";
const INFLIGHT: &str = "inflight";
const QUARANTINE: &str = "quarantine";

/// The `[spool]` settings the store needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The spool directory.
    pub dir: PathBuf,
    /// Cap on the bytes of ready, inflight, dead and archive records.
    pub max_bytes: u64,
    /// Refuse to write when the disk has less than this free.
    pub min_free: u64,
}

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Waiting for redelivery (or claimed by an attempt right now).
    Ready,
    /// Delivery failed for good.
    Dead,
    /// An untrimmed original, kept for `archive_for`.
    Archive,
}

impl State {
    /// Every state, in display order.
    pub const ALL: [State; 3] = [State::Ready, State::Dead, State::Archive];

    /// The state's name, also its directory name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Dead => "dead",
            State::Archive => "archive",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            State::Ready => 0,
            State::Dead => 1,
            State::Archive => 2,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(text: &str) -> Result<State, String> {
        State::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| format!("invalid spool state {text:?}: use ready, dead or archive"))
    }
}

/// One record as listed: its metadata, without the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The record's id.
    pub id: RecordId,
    /// Its state.
    pub state: State,
    /// Whether a redelivery attempt holds it right now (it is in `inflight/`).
    pub claimed: bool,
    /// Its metadata.
    pub meta: Meta,
    /// Bytes of the stored body.
    pub body_len: u64,
    /// Bytes of the record file.
    pub file_len: u64,
    /// The record file.
    pub path: PathBuf,
}

/// A handle to a spool directory; clones share one state. Thread-safe.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    space: Arc<Space>,
    /// Records per state (ready counts claimed ones too).
    depth: [AtomicUsize; 3],
    /// The owner lock, held for the handle's life; `None` for attached handles.
    _owner_lock: Option<File>,
}

impl Spool {
    /// Opens the spool as its owner (the proxy): creates the directories (0700), takes the
    /// owner lock (`Locked` if another process holds it), then recovers: removes leftovers in
    /// `tmp/`, moves claims left in `inflight/` back to `ready/`, and verifies every record's
    /// checksums, moving bad ones to `quarantine/` with a WARN line. A bad record never makes
    /// this fail. Reads every record in full, so start-up time grows with the spool's size.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, RecoveryReport), SpoolError> {
        durable::create_private_dir(&cfg.dir)?;
        for name in [TMP, INFLIGHT, QUARANTINE]
            .into_iter()
            .chain(State::ALL.map(State::as_str))
        {
            durable::create_private_dir(&cfg.dir.join(name))?;
        }
        // The new directories' entries must be durable before any record relies on them.
        durable::fsync_dir(&cfg.dir)?;
        let lock = durable::lock_owner(&cfg.dir)?;
        let report = recover::recover(&cfg.dir)?;
        let depth = [report.ready, report.dead, report.archive];
        let spool = Spool::build(cfg, Some(lock), report.bytes, depth);
        Ok((spool, report))
    }

    /// Opens an existing spool alongside its owner (the CLI while the proxy runs): no lock, no
    /// recovery, no checksum pass; counts come from file sizes and names.
    pub fn attach(cfg: SpoolConfig) -> Result<Spool, SpoolError> {
        for name in [TMP, INFLIGHT]
            .into_iter()
            .chain(State::ALL.map(State::as_str))
        {
            let dir = cfg.dir.join(name);
            if !dir.is_dir() {
                return Err(SpoolError::io(
                    "open",
                    dir,
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "not a spool directory: check [spool] dir, or start the proxy once to create it",
                    ),
                ));
            }
        }
        let mut bytes = 0;
        let mut depth = [0; 3];
        for state in State::ALL {
            let dir = cfg.dir.join(state.as_str());
            bytes += space::dir_bytes(&dir);
            depth[state.index()] = list_ids_in(&dir)?.len();
        }
        let inflight = cfg.dir.join(INFLIGHT);
        bytes += space::dir_bytes(&inflight);
        depth[State::Ready.index()] += list_ids_in(&inflight)?.len();
        Ok(Spool::build(cfg, None, bytes, depth))
    }

    fn build(cfg: SpoolConfig, lock: Option<File>, bytes: u64, depth: [usize; 3]) -> Spool {
        let counted = [INFLIGHT]
            .into_iter()
            .chain(State::ALL.map(State::as_str))
            .map(|name| cfg.dir.join(name))
            .collect();
        Spool {
            inner: Arc::new(Inner {
                space: Space::new(cfg.dir.clone(), counted, cfg.max_bytes, cfg.min_free, bytes),
                root: cfg.dir,
                depth: depth.map(AtomicUsize::new),
                _owner_lock: lock,
            }),
        }
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    fn state_dir(&self, state: State) -> PathBuf {
        self.inner.root.join(state.as_str())
    }

    fn sub_dir(&self, name: &str) -> PathBuf {
        self.inner.root.join(name)
    }

    /// Durably stores a payload (`body` exactly as received) in `state`; returns only once the
    /// record and its directory entry are fsynced. `Full`/`LowDisk` when there is no room; on
    /// any error nothing is left behind and the sender must not be acknowledged.
    pub fn commit(&self, state: State, meta: &Meta, body: &[u8]) -> Result<RecordId, SpoolError> {
        let meta_json = record::encode_meta(&bounded(meta));
        let total = record::record_len(body.len() as u64, meta_json.len());
        let reservation = self.inner.space.reserve(total)?;
        self.inner.space.check_free(total)?;
        let (id, mut writer) = self.create_tmp(meta.received_at)?;
        writer.write_body(body)?;
        let file_len = writer.finish(&meta_json, &self.state_dir(state).join(id.as_str()), true)?;
        reservation.keep(file_len);
        self.count(state, 1);
        tracing::debug!(route = %meta.route, id = %id, state = %state, bytes = file_len, "spool record committed");
        Ok(id)
    }

    /// Starts a staging file in `tmp/` for a body that is streamed while it is forwarded (the
    /// tee for bodies over `spool_memory_threshold`). `received_at` sets the id's position in
    /// arrival order. See [`Staging`].
    pub fn stage(&self, received_at: SystemTime) -> Result<Staging, SpoolError> {
        let reservation = self.inner.space.reserve(record::HEADER_LEN)?;
        self.inner.space.check_free(0)?;
        let (id, writer) = self.create_tmp(received_at)?;
        Ok(Staging::new(self.clone(), id, writer, reservation))
    }

    fn create_tmp(&self, received_at: SystemTime) -> Result<(RecordId, RecordWriter), SpoolError> {
        let mut attempt = 0;
        loop {
            let id = RecordId::generate(received_at);
            match RecordWriter::create(self.sub_dir(TMP).join(id.as_str())) {
                Ok(writer) => return Ok((id, writer)),
                Err(SpoolError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists && attempt < 3 =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn count(&self, state: State, added: usize) {
        self.inner.depth[state.index()].fetch_add(added, Ordering::AcqRel);
    }

    fn uncount(&self, state: State, removed: usize) {
        let _ = self.inner.depth[state.index()].fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |d| Some(d.saturating_sub(removed)),
        );
    }

    /// Ids in `state` in arrival order, without opening the records (cheap: one `readdir`).
    /// Claimed records are not included.
    pub fn list_ids(&self, state: State) -> Result<Vec<RecordId>, SpoolError> {
        list_ids_in(&self.state_dir(state))
    }

    /// Records in `state` (claimed ones excluded), optionally of one route, oldest
    /// `received_at` first. Reads each header and metadata; records that vanish meanwhile are
    /// skipped, and unreadable ones are skipped with a WARN line.
    pub fn list(&self, state: State, route: Option<&str>) -> Result<Vec<Entry>, SpoolError> {
        let mut entries = Vec::new();
        for id in self.list_ids(state)? {
            match self.entry_at(state, false, &id) {
                Ok(Some(entry)) if route.is_none_or(|r| entry.meta.route == r) => {
                    entries.push(entry)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(id = %id, state = %state, error = %e, "skipping unreadable spool record")
                }
            }
        }
        entries.sort_by(|a, b| (a.meta.received_at, &a.id).cmp(&(b.meta.received_at, &b.id)));
        Ok(entries)
    }

    /// Reads one record's entry; `None` when it is not there.
    fn entry_at(
        &self,
        state: State,
        claimed: bool,
        id: &RecordId,
    ) -> Result<Option<Entry>, SpoolError> {
        let dir = if claimed {
            self.sub_dir(INFLIGHT)
        } else {
            self.state_dir(state)
        };
        let path = dir.join(id.as_str());
        let mut file = match RecordFile::open(&path) {
            Ok(file) => file,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = match file.meta() {
            Ok(meta) => meta,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(Entry {
            id: id.clone(),
            state,
            claimed,
            meta,
            body_len: file.header.body_len,
            file_len: file.header.record_len(),
            path,
        }))
    }

    /// The record `id` wherever it is (ready, claimed, dead, archive).
    pub fn find(&self, id: &RecordId) -> Result<Option<Entry>, SpoolError> {
        // In the order records move (ready → inflight → ready or dead), so a record moving
        // while we look is still found.
        for (state, claimed) in [
            (State::Ready, false),
            (State::Ready, true),
            (State::Ready, false),
            (State::Dead, false),
            (State::Archive, false),
        ] {
            if let Some(entry) = self.entry_at(state, claimed, id)? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Reads a record's metadata and body, checking every checksum.
    pub fn read(&self, state: State, id: &RecordId) -> Result<(Meta, Vec<u8>), SpoolError> {
        let mut file = self.open_record(state, id)?;
        let meta = file.meta()?;
        let body = file.body()?;
        Ok((meta, body))
    }

    /// Moves a dead record back to `ready/` (for `payload-guard replay --state dead`), with an
    /// atomic rename; `false` if it is not in `dead/` (anymore).
    pub fn revive(&self, id: &RecordId) -> Result<bool, SpoolError> {
        let from = self.state_dir(State::Dead).join(id.as_str());
        let to = self.state_dir(State::Ready).join(id.as_str());
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                self.uncount(State::Dead, 1);
                self.count(State::Ready, 1);
                durable::fsync_dir(&self.state_dir(State::Ready))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SpoolError::io("rename", &from, e)),
        }
    }

    /// Whether the spool can take a new record right now (for `/readyz`): below
    /// `max_bytes`, the disk above `min_free`, and a file can be created. Blocking I/O.
    pub fn can_accept(&self) -> Result<(), SpoolError> {
        let space = &self.inner.space;
        if space.max_bytes > 0 && space.used() >= space.max_bytes {
            return Err(SpoolError::Full {
                used: space.used(),
                max: space.max_bytes,
            });
        }
        space.check_free(0)?;
        let probe = self
            .sub_dir("tmp")
            .join(format!(".probe-{}", std::process::id()));
        let created = File::create(&probe);
        let _ = std::fs::remove_file(&probe);
        created
            .map(drop)
            .map_err(|e| SpoolError::io("create", &probe, e))
    }

    /// Whether a file can be created in the spool right now (for `/readyz`).
    pub fn writable(&self) -> bool {
        let probe = self
            .sub_dir("tmp")
            .join(format!(".probe-{}", std::process::id()));
        let ok = File::create(&probe).is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }

    /// Streams a record's body to `out` (for `GET /originals/<id>` and `spool show --body`)
    /// and returns its metadata and length. The body checksum is checked as it streams; on a
    /// mismatch the error comes after the bytes were written, so `out` must treat an error as
    /// "discard what you got" (a server aborts the response).
    pub fn copy_body(
        &self,
        state: State,
        id: &RecordId,
        out: &mut dyn Write,
    ) -> Result<(Meta, u64), SpoolError> {
        let mut file = self.open_record(state, id)?;
        let meta = file.meta()?;
        let len = file.copy_body(out)?;
        Ok((meta, len))
    }

    fn open_record(&self, state: State, id: &RecordId) -> Result<RecordFile, SpoolError> {
        match RecordFile::open(&self.state_dir(state).join(id.as_str())) {
            Err(e) if is_not_found(&e) => Err(SpoolError::NotFound(id.clone())),
            other => other,
        }
    }

    /// Claims a ready record for a delivery attempt by renaming it into `inflight/`. `None`
    /// when it is not in `ready/` (another claimer, in this or another process, has it, or it
    /// was purged). A record whose metadata fails its checksum is quarantined and reported as
    /// `Corrupt`.
    pub fn claim(&self, id: &RecordId) -> Result<Option<Claim>, SpoolError> {
        let from = self.state_dir(State::Ready).join(id.as_str());
        let to = self.sub_dir(INFLIGHT).join(id.as_str());
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("rename", &from, e)),
        }
        let opened = RecordFile::open(&to).and_then(|mut file| {
            let meta = file.meta()?;
            Ok((meta, file.header))
        });
        match opened {
            Ok((meta, header)) => Ok(Some(Claim::new(self.clone(), id.clone(), meta, header))),
            Err(e @ SpoolError::Corrupt { .. }) => {
                let file_len = std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
                self.quarantine_claimed(id, file_len, &e.to_string());
                Err(e)
            }
            Err(e) => {
                // Put it back for a later attempt.
                let _ = std::fs::rename(&to, &from);
                Err(e)
            }
        }
    }

    /// Claims the oldest ready record of `route` if it is due at `now`; `None` when the route
    /// has none, its oldest is not due yet, or an attempt holds one of its records (a later
    /// record never overtakes an earlier one). Reads the metadata of ready records in arrival
    /// order until it meets the route's oldest.
    pub fn claim_next(&self, route: &str, now: SystemTime) -> Result<Option<Claim>, SpoolError> {
        for id in list_ids_in(&self.sub_dir(INFLIGHT))? {
            if let Ok(Some(entry)) = self.entry_at(State::Ready, true, &id)
                && entry.meta.route == route
            {
                return Ok(None);
            }
        }
        for id in self.list_ids(State::Ready)? {
            match self.entry_at(State::Ready, false, &id) {
                Ok(Some(entry)) if entry.meta.route == route => {
                    if entry.meta.next_attempt_at.is_some_and(|at| at > now) {
                        return Ok(None);
                    }
                    return self.claim(&id);
                }
                Ok(_) => {}
                Err(e) => {
                    // Claiming quarantines a record whose metadata fails its checksum.
                    tracing::warn!(id = %id, error = %e, "skipping unreadable spool record");
                    if let Ok(Some(claim)) = self.claim(&id) {
                        drop(claim);
                    }
                }
            }
        }
        Ok(None)
    }

    /// The routes with ready (or claimed) records, sorted.
    pub fn ready_routes(&self) -> Result<Vec<String>, SpoolError> {
        let mut routes = std::collections::BTreeSet::new();
        for (claimed, dir) in [
            (false, self.state_dir(State::Ready)),
            (true, self.sub_dir(INFLIGHT)),
        ] {
            for id in list_ids_in(&dir)? {
                if let Ok(Some(entry)) = self.entry_at(State::Ready, claimed, &id) {
                    routes.insert(entry.meta.route);
                }
            }
        }
        Ok(routes.into_iter().collect())
    }

    /// Moves a claimed record that failed its checksum to `quarantine/`.
    fn quarantine_claimed(&self, id: &RecordId, file_len: u64, reason: &str) {
        let from = self.sub_dir(INFLIGHT).join(id.as_str());
        match recover::quarantine(&self.inner.root, State::Ready, &from, reason) {
            Ok(_) => {
                self.inner.space.forget(file_len);
                self.uncount(State::Ready, 1);
            }
            Err(e) => {
                tracing::error!(id = %id, error = %e, "could not quarantine corrupt spool record")
            }
        }
    }

    /// Removes records in `state` received more than `older_than` ago; returns how many.
    /// Ready records are claimed first, so one being delivered right now is skipped.
    pub fn purge(&self, state: State, older_than: Duration) -> Result<usize, SpoolError> {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.purge_received_before(state, cutoff)
    }

    /// Removes archived originals older than `older_than` (`archive_for`).
    pub fn purge_archive(&self, older_than: Duration) -> Result<usize, SpoolError> {
        self.purge(State::Archive, older_than)
    }

    /// Removes records in `state` whose `received_at` is before `cutoff`; returns how many.
    pub fn purge_received_before(
        &self,
        state: State,
        cutoff: SystemTime,
    ) -> Result<usize, SpoolError> {
        let mut removed = 0;
        for id in self.list_ids(state)? {
            let entry = match self.entry_at(state, false, &id) {
                Ok(Some(entry)) => entry,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(id = %id, state = %state, error = %e, "not purging unreadable spool record");
                    continue;
                }
            };
            if entry.meta.received_at >= cutoff {
                continue;
            }
            if state == State::Ready {
                if let Some(claim) = self.claim(&id)? {
                    claim.complete()?;
                    removed += 1;
                }
                continue;
            }
            match durable::remove_if_exists(&entry.path) {
                Ok(true) => {
                    self.inner.space.forget(entry.file_len);
                    self.uncount(state, 1);
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => return Err(SpoolError::io("remove", &entry.path, e)),
            }
        }
        if removed > 0 && state != State::Ready {
            durable::fsync_dir(&self.state_dir(state))?;
        }
        if removed > 0 {
            tracing::info!(state = %state, removed, "purged spool records");
        }
        Ok(removed)
    }

    /// Removes one record from `state` (for the console's purge button); `false` when it is not
    /// there. A ready record is claimed first, so one being delivered right now is not removed.
    pub fn remove(&self, state: State, id: &RecordId) -> Result<bool, SpoolError> {
        if state == State::Ready {
            return match self.claim(id)? {
                Some(claim) => claim.complete().map(|()| true),
                None => Ok(false),
            };
        }
        let Some(entry) = self.entry_at(state, false, id)? else {
            return Ok(false);
        };
        match durable::remove_if_exists(&entry.path) {
            Ok(true) => {
                self.inner.space.forget(entry.file_len);
                self.uncount(state, 1);
                durable::fsync_dir(&self.state_dir(state))?;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(SpoolError::io("remove", &entry.path, e)),
        }
    }

    /// Bytes held by records (ready, inflight, dead, archive) and writes in progress, as this
    /// handle counts them.
    pub fn usage(&self) -> u64 {
        self.inner.space.used()
    }

    /// Records in `state`, as this handle counts them (ready includes claimed ones).
    pub fn depth(&self, state: State) -> usize {
        self.inner.depth[state.index()].load(Ordering::Acquire)
    }

    /// Recounts usage from the files on disk (after another process purged records).
    pub fn rescan(&self) {
        self.inner.space.rescan();
    }
}

/// The metadata with `last_error` and `snippet` cut to their caps.
fn bounded(meta: &Meta) -> Meta {
    let mut meta = meta.clone();
    meta.last_error = meta
        .last_error
        .map(|e| truncate_utf8(&e, LAST_ERROR_MAX_BYTES));
    meta.snippet = meta.snippet.map(|s| truncate_utf8(&s, SNIPPET_MAX_BYTES));
    meta
}

fn is_not_found(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
}

/// Valid record ids among the names in `dir`, sorted (arrival order).
fn list_ids_in(dir: &Path) -> Result<Vec<RecordId>, SpoolError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SpoolError::io("read directory", dir, e))?;
    let mut ids: Vec<RecordId> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| RecordId::parse(n).ok()))
        .collect();
    ids.sort();
    Ok(ids)
}
