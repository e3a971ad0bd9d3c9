//! A redelivery attempt's hold on one record: the record sits in `inflight/` until the attempt
//! ends with [`Claim::complete`] (delivered: delete), [`Claim::release`] (retry later: back to
//! `ready/` with the attempt recorded) or [`Claim::bury`] (final: to `dead/`). A claim dropped
//! without one of these puts the record back in `ready/` unchanged; a claim held by a process
//! that dies is put back at the next start-up.

use std::fs;
use std::io::Write;
use std::time::SystemTime;

use super::durable;
use super::error::SpoolError;
use super::id::RecordId;
use super::meta::Meta;
use super::record::{self, Header, RecordFile, RecordWriter};
use super::{INFLIGHT, Spool, State, TMP};

/// A claimed record. Send + 'static: it can move into `spawn_blocking`.
#[derive(Debug)]
pub struct Claim {
    spool: Spool,
    id: RecordId,
    meta: Meta,
    header: Header,
    /// Set once the record has left `inflight/` (or must not be put back).
    done: bool,
}

impl Claim {
    pub(crate) fn new(spool: Spool, id: RecordId, meta: Meta, header: Header) -> Claim {
        Claim {
            spool,
            id,
            meta,
            header,
            done: false,
        }
    }

    /// The record's id.
    pub fn id(&self) -> &RecordId {
        &self.id
    }

    /// The record's metadata as claimed.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Bytes of the body.
    pub fn body_len(&self) -> u64 {
        self.header.body_len
    }

    fn path(&self) -> std::path::PathBuf {
        self.spool.sub_dir(INFLIGHT).join(self.id.as_str())
    }

    /// Reads the body, checking its checksum. A corrupt record is moved to `quarantine/` (the
    /// claim is then spent: it will not be put back).
    pub fn body(&mut self) -> Result<Vec<u8>, SpoolError> {
        let mut body = Vec::new();
        self.copy_body(&mut body)?;
        Ok(body)
    }

    /// Reads the body on a blocking thread (for async callers), checking its checksum; a
    /// corrupt record is quarantined, as with [`Claim::body`].
    pub async fn read_body(&mut self) -> Result<Vec<u8>, SpoolError> {
        let path = self.path();
        let read = tokio::task::spawn_blocking(move || {
            let mut body = Vec::new();
            RecordFile::open(&path)
                .and_then(|mut f| f.copy_body(&mut body))
                .map(|_| body)
        })
        .await
        .unwrap_or_else(|join| {
            Err(SpoolError::io(
                "read",
                self.path(),
                std::io::Error::other(join.to_string()),
            ))
        });
        read.map_err(|e| self.quarantine_if_corrupt(e))
    }

    /// Streams the body to `out`, checking its checksum at the end (see [`Spool::copy_body`]).
    /// A corrupt record is quarantined, as with [`Claim::body`].
    pub fn copy_body(&mut self, out: &mut dyn Write) -> Result<u64, SpoolError> {
        RecordFile::open(&self.path())
            .and_then(|mut f| f.copy_body(out))
            .map_err(|e| self.quarantine_if_corrupt(e))
    }

    /// Moves the record to `quarantine/` if `e` says it is corrupt (spending the claim).
    fn quarantine_if_corrupt(&mut self, e: SpoolError) -> SpoolError {
        if matches!(e, SpoolError::Corrupt { .. }) {
            self.spool
                .quarantine_claimed(&self.id, self.header.record_len(), &e.to_string());
            self.done = true;
        }
        e
    }

    /// Delivered: deletes the record and fsyncs `inflight/`.
    pub fn complete(mut self) -> Result<(), SpoolError> {
        let path = self.path();
        self.done = true;
        match durable::remove_if_exists(&path) {
            Ok(_) => {}
            Err(e) => {
                self.done = false;
                return Err(SpoolError::io("remove", &path, e));
            }
        }
        self.spool.inner.space.forget(self.header.record_len());
        self.spool.uncount(State::Ready, 1);
        durable::fsync_dir(&self.spool.sub_dir(INFLIGHT))
    }

    /// Not delivered, retry later: `attempts + 1`, `last_error` and `next_attempt_at` are
    /// recorded (an atomic rewrite: new file in `tmp/`, fsync, rename over the claimed one),
    /// and the record goes back to `ready/`, keeping its id and place in arrival order.
    pub fn release(
        mut self,
        last_error: &str,
        next_attempt_at: SystemTime,
    ) -> Result<(), SpoolError> {
        let mut meta = self.meta.clone();
        meta.attempts = meta.attempts.saturating_add(1);
        meta.last_error = Some(last_error.to_owned());
        meta.next_attempt_at = Some(next_attempt_at);
        self.rewrite_to(meta, State::Ready)
    }

    /// Delivery failed for good (a final 4xx, or past `retry_for`): `attempts + 1`, the
    /// receiver's `status` (if it answered), a `snippet` of its response and `last_error` are
    /// recorded, and the record moves to `dead/`.
    pub fn bury(
        mut self,
        status: Option<u16>,
        snippet: &str,
        last_error: &str,
    ) -> Result<(), SpoolError> {
        let mut meta = self.meta.clone();
        meta.attempts = meta.attempts.saturating_add(1);
        meta.status = status;
        meta.snippet = Some(snippet.to_owned());
        meta.last_error = Some(last_error.to_owned());
        meta.next_attempt_at = None;
        self.rewrite_to(meta, State::Dead)
    }

    fn rewrite_to(&mut self, meta: Meta, state: State) -> Result<(), SpoolError> {
        let claimed = self.path();
        let meta_json = record::encode_meta(&super::bounded(&meta));
        let new_len = record::record_len(self.header.body_len, meta_json.len());
        let space = &self.spool.inner.space;
        let reservation = space.reserve_unchecked(new_len);
        let mut source = match RecordFile::open(&claimed) {
            Ok(source) => source,
            Err(e) => return Err(self.quarantine_if_corrupt(e)),
        };
        let tmp = self.spool.sub_dir(TMP).join(format!("{}.rewrite", self.id));
        // A leftover from an earlier failed rewrite in this process would block create_new.
        let _ = durable::remove_if_exists(&tmp);
        let mut writer = RecordWriter::create(tmp)?;
        if let Err(e) = writer.copy_body_from(&mut source) {
            return Err(self.quarantine_if_corrupt(e));
        }
        drop(source);
        let file_len = writer.finish(&meta_json, &claimed, false)?;
        space.forget(self.header.record_len());
        reservation.keep(file_len);
        self.header.meta_len = meta_json.len() as u32;
        self.meta = meta;

        let dest = self.spool.state_dir(state).join(self.id.as_str());
        fs::rename(&claimed, &dest).map_err(|e| SpoolError::io("rename", &claimed, e))?;
        self.done = true;
        if state != State::Ready {
            self.spool.uncount(State::Ready, 1);
            self.spool.count(state, 1);
        }
        durable::fsync_dir(&self.spool.state_dir(state))?;
        durable::fsync_dir(&self.spool.sub_dir(INFLIGHT))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let from = self.path();
        let to = self.spool.state_dir(State::Ready).join(self.id.as_str());
        if let Err(e) = fs::rename(&from, &to) {
            tracing::warn!(id = %self.id, error = %e, "could not put back an unfinished spool claim; it is recovered at the next start-up");
        }
    }
}
