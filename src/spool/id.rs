//! Record ids: `<unix millis, 13 digits>-<sequence, 4 hex>-<random, 16 hex>`, e.g.
//! `1718000000000-0001-0123456789abcdef`.
//!
//! Ids sort by arrival (the millisecond the request was received, then a per-process sequence),
//! are safe as file names, and are hard to guess (64 random bits, 62 of them from the OS RNG via
//! uuid v4) since `GET /originals/<id>` serves a payload by id. [`RecordId::parse`] accepts only
//! this exact shape, so an id from a URL or the command line can never name another path.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::SpoolError;

const MILLIS_DIGITS: usize = 13;
const SEQ_DIGITS: usize = 4;
const RANDOM_DIGITS: usize = 16;
/// Length of every id's text.
const ID_LEN: usize = MILLIS_DIGITS + 1 + SEQ_DIGITS + 1 + RANDOM_DIGITS;

static SEQUENCE: AtomicU16 = AtomicU16::new(0);

/// The id of one spool record; also its file name in every state directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(String);

impl RecordId {
    /// A fresh id for a request received at `received_at`.
    pub fn generate(received_at: SystemTime) -> RecordId {
        let millis = received_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
            .min(9_999_999_999_999);
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        let random = high ^ low.rotate_left(32);
        RecordId(format!("{millis:013}-{seq:04x}-{random:016x}"))
    }

    /// Parses an id from user input (URL path, command line, file name), accepting only the
    /// exact shape this module writes.
    pub fn parse(text: &str) -> Result<RecordId, SpoolError> {
        if is_valid(text) {
            Ok(RecordId(text.to_owned()))
        } else {
            Err(SpoolError::InvalidId(text.chars().take(80).collect()))
        }
    }

    /// The id's text (also its file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The arrival millisecond encoded in the id.
    pub fn unix_millis(&self) -> u64 {
        self.0[..MILLIS_DIGITS].parse().unwrap_or(0)
    }
}

fn is_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() != ID_LEN {
        return false;
    }
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    let (millis, rest) = bytes.split_at(MILLIS_DIGITS);
    let (dash1, rest) = rest.split_at(1);
    let (seq, rest) = rest.split_at(SEQ_DIGITS);
    let (dash2, random) = rest.split_at(1);
    millis.iter().all(u8::is_ascii_digit)
        && dash1 == b"-"
        && seq.iter().all(hex)
        && dash2 == b"-"
        && random.iter().all(hex)
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RecordId {
    type Err = SpoolError;
    fn from_str(text: &str) -> Result<RecordId, SpoolError> {
        RecordId::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn generated_ids_parse_and_sort_by_arrival() {
        let t = UNIX_EPOCH + Duration::from_millis(1_718_000_000_123);
        let a = RecordId::generate(t);
        let b = RecordId::generate(t + Duration::from_millis(1));
        assert!(a.as_str().starts_with("1718000000123-"), "{a}");
        assert_eq!(RecordId::parse(a.as_str()).unwrap(), a);
        assert!(a < b);
        assert_eq!(a.unix_millis(), 1_718_000_000_123);
        let c = RecordId::generate(t);
        assert_ne!(a, c);
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "1718000000000-0001-0123456789abcde",
            "1718000000000-0001-0123456789abcdef0",
            "1718000000000-0001-0123456789ABCDEF",
            "1718000000000-0001/0123456789abcdef",
            "171800000000x-0001-0123456789abcdef",
            "1718000000000_0001-0123456789abcdef",
            "1718000000000-0001-../../../../../x",
            "1718000000000-0001-0123456789abcdef\n",
            "1718000000000-0001-0123456789abcdéf",
        ] {
            assert!(
                matches!(RecordId::parse(bad), Err(SpoolError::InvalidId(_))),
                "{bad:?}"
            );
        }
        assert!(RecordId::parse("1718000000000-0001-0123456789abcdef").is_ok());
    }
}
