//! The tee target for bodies too large to keep in memory while they are forwarded: chunks are
//! appended to `tmp/<id>` as they stream, and once the outcome is known the file becomes a
//! record (the metadata is appended after the body and the header is written last, see
//! `record.rs`) or is removed.

use super::error::SpoolError;
use super::id::RecordId;
use super::meta::Meta;
use super::record::{self, RecordWriter};
use super::space::Reservation;
use super::{Spool, State};

/// A body being written to `tmp/`. Dropping it without [`Staging::commit`] removes the file
/// (same as [`Staging::discard`]).
#[derive(Debug)]
pub struct Staging {
    spool: Spool,
    id: RecordId,
    writer: RecordWriter,
    reservation: Reservation,
}

impl Staging {
    pub(crate) fn new(
        spool: Spool,
        id: RecordId,
        writer: RecordWriter,
        reservation: Reservation,
    ) -> Staging {
        Staging {
            spool,
            id,
            writer,
            reservation,
        }
    }

    /// The id the record will have once committed.
    pub fn id(&self) -> &RecordId {
        &self.id
    }

    /// Body bytes written so far.
    pub fn body_len(&self) -> u64 {
        self.writer.body_len()
    }

    /// Appends a chunk of the body. Space is reserved as the body grows, so this fails with
    /// `Full` as soon as the spool could not hold it; after any error, drop or discard.
    pub fn write_all(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.reservation.grow(chunk.len() as u64)?;
        self.writer.write_body(chunk)
    }

    /// Flushes the body written so far and says where to read it back: the file, the offset of
    /// the body in it, and its length (the proxy forwards a staged body from the file).
    pub fn body_file(&mut self) -> Result<(std::path::PathBuf, u64, u64), SpoolError> {
        self.writer.flush()?;
        Ok((
            self.writer.tmp_path().to_path_buf(),
            record::HEADER_LEN,
            self.writer.body_len(),
        ))
    }

    /// Makes the staged body a durable record in `state` with `meta`; returns once it is
    /// fsynced and renamed into place (same guarantees as [`Spool::commit`]).
    pub fn commit(mut self, state: State, meta: &Meta) -> Result<RecordId, SpoolError> {
        let meta_json = record::encode_meta(&super::bounded(meta));
        self.reservation.grow(meta_json.len() as u64)?;
        self.spool.inner.space.check_free(meta_json.len() as u64)?;
        let dest = self.spool.state_dir(state).join(self.id.as_str());
        let Staging {
            spool,
            id,
            writer,
            reservation,
        } = self;
        let file_len = writer.finish(&meta_json, &dest, true)?;
        reservation.keep(file_len);
        spool.count(state, 1);
        tracing::debug!(route = %meta.route, id = %id, state = %state, bytes = file_len, "staged spool record committed");
        Ok(id)
    }

    /// Removes the staging file.
    pub fn discard(self) {
        tracing::trace!(path = %self.writer.tmp_path().display(), "staged body discarded");
    }
}
