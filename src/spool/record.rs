//! The on-disk record format, version 1. One file per record, named by its id:
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"PGSPOOL\0"
//!      8     4  format version, u32 little-endian (1)
//!     12     4  meta_len, u32 LE: bytes of the metadata JSON
//!     16     8  body_len, u64 LE: bytes of the body
//!     24     4  body_crc, u32 LE: CRC-32 (IEEE) of the body
//!     28     4  meta_crc, u32 LE: CRC-32 of the metadata JSON
//!     32     4  header_crc, u32 LE: CRC-32 of bytes 0..32
//!     36     4  reserved, zero
//!     40     …  body (body_len bytes, exactly as received)
//!      …     …  metadata (meta_len bytes, one JSON object, see `Meta`)
//! ```
//!
//! The body comes before the metadata so a streamed (teed) body is written once, in order,
//! and the metadata is appended when the outcome is known. The header is written as zeros
//! first (an invalid magic, so a torn file is never mistaken for a record) and overwritten in
//! place just before the fsync; the file is only renamed out of `tmp/` after that fsync.
//! A record is valid only if the magic, version and all three CRCs match and the file is
//! exactly `40 + body_len + meta_len` bytes long. Listing reads only the header and the
//! metadata; reading the body, and start-up, check the body CRC too.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::durable;
use super::error::SpoolError;
use super::meta::Meta;

/// Bytes of the fixed header.
pub(crate) const HEADER_LEN: u64 = 40;
/// The record format this module writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"PGSPOOL\0";
/// Metadata larger than this is treated as corruption (headers are capped well below it).
const MAX_META_BYTES: u32 = 16 * 1024 * 1024;
/// Buffer for streaming bodies in and out.
const IO_CHUNK: usize = 64 * 1024;

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) meta_len: u32,
    pub(crate) body_len: u64,
    pub(crate) body_crc: u32,
    pub(crate) meta_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut out = [0u8; HEADER_LEN as usize];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.meta_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.body_crc.to_le_bytes());
        out[28..32].copy_from_slice(&self.meta_crc.to_le_bytes());
        let header_crc = crc32fast::hash(&out[0..32]);
        out[32..36].copy_from_slice(&header_crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER_LEN as usize]) -> Result<Header, String> {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        if bytes[0..8] != MAGIC {
            return Err("bad magic: not a spool record, or torn before its header".into());
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {FORMAT_VERSION}: written by another payload-guard version"
            ));
        }
        if crc32fast::hash(&bytes[0..32]) != u32_at(32) {
            return Err("header checksum mismatch".into());
        }
        let meta_len = u32_at(12);
        if meta_len > MAX_META_BYTES {
            return Err(format!("metadata length {meta_len} is implausible"));
        }
        Ok(Header {
            meta_len,
            body_len: u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8])),
            body_crc: u32_at(24),
            meta_crc: u32_at(28),
        })
    }

    /// The whole file's length.
    pub(crate) fn record_len(&self) -> u64 {
        HEADER_LEN + self.body_len + u64::from(self.meta_len)
    }
}

/// The file length of a record with this body and metadata.
pub(crate) fn record_len(body_len: u64, meta_len: usize) -> u64 {
    HEADER_LEN + body_len + meta_len as u64
}

/// Serializes metadata for a record.
pub(crate) fn encode_meta(meta: &Meta) -> Vec<u8> {
    // A struct of strings, numbers and a Vec cannot fail to serialize.
    serde_json::to_vec(meta).unwrap_or_else(|_| b"{}".to_vec())
}

/// A record being written in `tmp/`. Dropped before [`RecordWriter::finish`], it removes its
/// file.
#[derive(Debug)]
pub(crate) struct RecordWriter {
    out: Option<BufWriter<File>>,
    tmp_path: PathBuf,
    body_len: u64,
    body_crc: crc32fast::Hasher,
}

/// The error for a writer that an earlier write error already closed.
fn failed_writer(op: &'static str, path: &Path) -> SpoolError {
    SpoolError::io(op, path, io::Error::other("writer already failed"))
}

impl RecordWriter {
    /// Creates `tmp_path` (exclusive, 0600) with a zeroed header.
    pub(crate) fn create(tmp_path: PathBuf) -> Result<RecordWriter, SpoolError> {
        let file = durable::create_private_file(&tmp_path)
            .map_err(|e| SpoolError::io("create", &tmp_path, e))?;
        let mut writer = RecordWriter {
            out: Some(BufWriter::with_capacity(IO_CHUNK, file)),
            tmp_path,
            body_len: 0,
            body_crc: crc32fast::Hasher::new(),
        };
        writer.write_raw(&[0u8; HEADER_LEN as usize])?;
        Ok(writer)
    }

    /// The temporary file's path.
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Body bytes written so far.
    pub(crate) fn body_len(&self) -> u64 {
        self.body_len
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| failed_writer("write", &self.tmp_path))?;
        if let Err(e) = out.write_all(bytes) {
            // A failed write leaves the buffer in an unknown state: no more writes.
            self.out = None;
            return Err(SpoolError::io("write", &self.tmp_path, e));
        }
        Ok(())
    }

    /// Pushes buffered bytes to the file (so the body can be read back while staging).
    pub(crate) fn flush(&mut self) -> Result<(), SpoolError> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| failed_writer("flush", &self.tmp_path))?;
        out.flush()
            .map_err(|e| SpoolError::io("flush", &self.tmp_path, e))
    }

    /// Appends body bytes.
    pub(crate) fn write_body(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        self.write_raw(chunk)?;
        self.body_crc.update(chunk);
        self.body_len += chunk.len() as u64;
        Ok(())
    }

    /// Appends the body of an existing record, checking its CRC on the way.
    pub(crate) fn copy_body_from(&mut self, source: &mut RecordFile) -> Result<(), SpoolError> {
        let mut buf = vec![0u8; IO_CHUNK];
        let path = source.path.clone();
        let mut reader = source.body_reader()?;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| SpoolError::io("read", &path, e))?;
            if n == 0 {
                break;
            }
            self.write_body(&buf[..n])?;
        }
        if self.body_len != source.header.body_len
            || self.body_crc.clone().finalize() != source.header.body_crc
        {
            return Err(source.corrupt("body checksum mismatch"));
        }
        Ok(())
    }

    /// Appends `meta_json`, writes the header, fsyncs, renames to `dest` and fsyncs `dest`'s
    /// directory. Returns the file's length. On any failure nothing is left at the temporary
    /// path; fsync is never retried on the same file (its dirty pages may already have been
    /// dropped). When the directory fsync fails after the rename, `dest` is removed if
    /// `new_record` (it was never acknowledged), and kept otherwise (it replaced an older
    /// version of a record already in the spool, whose content is now durable).
    pub(crate) fn finish(
        mut self,
        meta_json: &[u8],
        dest: &Path,
        new_record: bool,
    ) -> Result<u64, SpoolError> {
        let meta_len = u32::try_from(meta_json.len())
            .ok()
            .filter(|&n| n <= MAX_META_BYTES)
            .ok_or_else(|| {
                SpoolError::io(
                    "write",
                    &self.tmp_path,
                    io::Error::other("metadata over 16 MiB: too many or too large headers"),
                )
            })?;
        self.write_raw(meta_json)?;
        let out = self
            .out
            .take()
            .ok_or_else(|| failed_writer("write", &self.tmp_path))?;
        let file = out
            .into_inner()
            .map_err(|e| SpoolError::io("write", &self.tmp_path, e.into_error()))?;
        let header = Header {
            meta_len,
            body_len: self.body_len,
            body_crc: self.body_crc.clone().finalize(),
            meta_crc: crc32fast::hash(meta_json),
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(|e| SpoolError::io("write", &self.tmp_path, e))?;
        file.sync_all()
            .map_err(|e| SpoolError::io("fsync", &self.tmp_path, e))?;
        drop(file);
        fs::rename(&self.tmp_path, dest).map_err(|e| SpoolError::io("rename", dest, e))?;
        // From here the temporary path is gone; Drop must not look for it.
        self.tmp_path = PathBuf::new();
        let dir = dest.parent().unwrap_or(Path::new("."));
        if let Err(e) = durable::fsync_dir(dir) {
            if new_record {
                // Not durable, so not acknowledged: take the record back out.
                let _ = durable::remove_if_exists(dest);
            }
            return Err(e);
        }
        Ok(header.record_len())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if self.tmp_path.as_os_str().is_empty() {
            return;
        }
        self.out = None;
        if let Err(e) = durable::remove_if_exists(&self.tmp_path) {
            tracing::warn!(path = %self.tmp_path.display(), error = %e, "could not remove unfinished spool file");
        }
    }
}

/// An open record whose header has been checked.
#[derive(Debug)]
pub(crate) struct RecordFile {
    file: File,
    pub(crate) path: PathBuf,
    pub(crate) header: Header,
}

impl RecordFile {
    /// Opens `path` and checks its header and length. `Io` with `NotFound` when it is gone.
    pub(crate) fn open(path: &Path) -> Result<RecordFile, SpoolError> {
        let mut file = File::open(path).map_err(|e| SpoolError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| SpoolError::io("stat", path, e))?
            .len();
        let corrupt = |reason: String| SpoolError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if len < HEADER_LEN {
            return Err(corrupt(format!("{len} bytes, shorter than a header")));
        }
        let mut bytes = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut bytes)
            .map_err(|e| SpoolError::io("read", path, e))?;
        let header = Header::decode(&bytes).map_err(corrupt)?;
        if header.record_len() != len {
            return Err(corrupt(format!(
                "file is {len} bytes, header says {}",
                header.record_len()
            )));
        }
        Ok(RecordFile {
            file,
            path: path.to_owned(),
            header,
        })
    }

    fn corrupt(&self, reason: &str) -> SpoolError {
        SpoolError::Corrupt {
            path: self.path.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Reads and checks the metadata.
    pub(crate) fn meta(&mut self) -> Result<Meta, SpoolError> {
        let mut json = vec![0u8; self.header.meta_len as usize];
        self.file
            .read_exact_at(&mut json, HEADER_LEN + self.header.body_len)
            .map_err(|e| SpoolError::io("read", &self.path, e))?;
        if crc32fast::hash(&json) != self.header.meta_crc {
            return Err(self.corrupt("metadata checksum mismatch"));
        }
        serde_json::from_slice(&json)
            .map_err(|e| self.corrupt(&format!("metadata is not valid: {e}")))
    }

    /// A reader over exactly the body bytes (unchecked: callers check the CRC).
    fn body_reader(&mut self) -> Result<io::Take<&mut File>, SpoolError> {
        self.file
            .seek(SeekFrom::Start(HEADER_LEN))
            .map_err(|e| SpoolError::io("seek", &self.path, e))?;
        Ok((&mut self.file).take(self.header.body_len))
    }

    /// Streams the body to `out`, checking its CRC; a mismatch is reported after the bytes
    /// were written, so `out` must treat an error as "discard what you got".
    pub(crate) fn copy_body(&mut self, out: &mut dyn Write) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let expected = (self.header.body_len, self.header.body_crc);
        let mut crc = crc32fast::Hasher::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; IO_CHUNK];
        let mut reader = self.body_reader()?;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| SpoolError::io("read", &path, e))?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            total += n as u64;
            out.write_all(&buf[..n])
                .map_err(|e| SpoolError::io("write body", &path, e))?;
        }
        if (total, crc.finalize()) != expected {
            return Err(self.corrupt("body checksum mismatch"));
        }
        Ok(total)
    }

    /// Reads the whole body, checking its CRC.
    pub(crate) fn body(&mut self) -> Result<Vec<u8>, SpoolError> {
        let mut body = Vec::with_capacity(usize::try_from(self.header.body_len).unwrap_or(0));
        self.copy_body(&mut body)?;
        Ok(body)
    }

    /// Checks everything: header (on open), metadata and body CRC.
    pub(crate) fn verify(&mut self) -> Result<Meta, SpoolError> {
        let meta = self.meta()?;
        self.copy_body(&mut io::sink())?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn meta() -> Meta {
        Meta::new(
            "r",
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            "req",
            "POST",
            "/",
            5,
        )
    }

    #[test]
    fn written_records_read_back_and_every_byte_is_covered() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp-rec");
        let dest = dir.path().join("rec");
        let mut w = RecordWriter::create(tmp.clone()).unwrap();
        w.write_body(b"hel").unwrap();
        w.write_body(b"lo").unwrap();
        let json = encode_meta(&meta());
        let len = w.finish(&json, &dest, true).unwrap();
        assert!(!tmp.exists());
        let bytes = fs::read(&dest).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(&bytes[40..45], b"hello");

        let mut rec = RecordFile::open(&dest).unwrap();
        assert_eq!(rec.verify().unwrap(), meta());
        assert_eq!(rec.body().unwrap(), b"hello");

        // Flipping any single byte (except the reserved word) is caught.
        for at in (0..bytes.len()).filter(|at| !(36..40).contains(at)) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            fs::write(&dest, &bad).unwrap();
            let result = RecordFile::open(&dest).and_then(|mut r| r.verify());
            assert!(
                matches!(result, Err(SpoolError::Corrupt { .. })),
                "flip at {at}: {result:?}"
            );
        }
        // Truncated or extended files too.
        fs::write(&dest, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(
            RecordFile::open(&dest),
            Err(SpoolError::Corrupt { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        fs::write(&dest, &longer).unwrap();
        assert!(matches!(
            RecordFile::open(&dest),
            Err(SpoolError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("t");
        let mut w = RecordWriter::create(tmp.clone()).unwrap();
        w.write_body(b"partial").unwrap();
        assert!(tmp.exists());
        drop(w);
        assert!(!tmp.exists());
    }
}
