//! The trim stage for one request payload: checks that it is JSON, decodes `Content-Encoding`
//! (gzip, deflate) with caps, trims to the target, and re-encodes with the same encoding. Pure:
//! bytes and settings in, bytes and a report out, so the proxy and `payload-guard trim` share it.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::{Applied, Document, RuleSet, TrimError};

/// Decoded bodies may be at most this many times larger than on the wire (when over 1 MiB).
pub const MAX_DECOMPRESSION_RATIO: u64 = 100;

/// A `Content-Encoding` the trim stage can undo and redo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No encoding.
    Identity,
    /// `gzip`
    Gzip,
    /// `deflate` (zlib framing, or raw deflate as some senders send it)
    Deflate,
}

/// What a size limit counts: the bytes on the wire (what nginx counts) or the bytes after
/// decoding `Content-Encoding` (what Express's body-parser counts). For an uncompressed body
/// the two are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Units {
    /// Bytes on the wire.
    Wire,
    /// Decoded bytes.
    Decoded,
}

impl Units {
    /// The stable name (`wire`, `decoded`).
    pub fn as_str(self) -> &'static str {
        match self {
            Units::Wire => "wire",
            Units::Decoded => "decoded",
        }
    }
}

/// Whether a `Content-Type` is JSON: `application/json` or any `*/*+json`.
pub fn is_json(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    // Compared without a lowercase copy, and searched byte by byte: this runs on every
    // request, on a value a few bytes long.
    let ct = ct.as_bytes();
    let essence = ct
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let Some(slash) = essence.iter().position(|&b| b == b'/') else {
        return false;
    };
    let subtype = &essence[slash + 1..];
    subtype.eq_ignore_ascii_case(b"json")
        || subtype.len() >= 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json")
}

/// Parses `Content-Encoding`; `Err` names an encoding the stage cannot handle.
pub fn encoding(content_encoding: Option<&str>) -> Result<Encoding, String> {
    let Some(name) = content_encoding.map(str::trim) else {
        return Ok(Encoding::Identity);
    };
    let is = |known: &str| name.eq_ignore_ascii_case(known);
    if name.is_empty() || is("identity") {
        Ok(Encoding::Identity)
    } else if is("gzip") || is("x-gzip") {
        Ok(Encoding::Gzip)
    } else if is("deflate") {
        Ok(Encoding::Deflate)
    } else {
        Err(name.to_ascii_lowercase())
    }
}

/// The result of the trim stage.
#[derive(Debug, Clone)]
pub struct Shrunk {
    /// The bytes to forward (encoded as received).
    pub body: Vec<u8>,
    /// Wire size of the original.
    pub original_len: usize,
    /// Whether the result is within the limit.
    pub fits: bool,
    /// What each rule removed (decoded bytes).
    pub applied: Vec<Applied>,
    /// Size the limit was checked against, before.
    pub measured_before: usize,
    /// Size the limit was checked against, after.
    pub measured_after: usize,
    /// Decoded size of the result.
    pub decoded_len: usize,
}

impl Shrunk {
    /// Whether anything was removed.
    pub fn changed(&self) -> bool {
        !self.applied.is_empty()
    }

    /// The `Payload-Guard-Trimmed` header value: `path=bytes, ...` (capped at 4 KiB).
    pub fn trimmed_header(&self) -> String {
        let mut out = String::new();
        for (i, a) in self.applied.iter().enumerate() {
            let item = format!("{}={}", a.path, a.removed);
            if out.len() + item.len() + 2 > 4096 {
                out.push_str(&format!(", ...={}", self.applied.len() - i));
                break;
            }
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&item);
        }
        out
    }
}

/// Why the payload could not go through the trim stage.
#[derive(Debug, thiserror::Error)]
pub enum ShrinkError {
    /// The body could not be decoded.
    #[error("cannot decode {encoding:?} body: {reason}")]
    Decode {
        /// The encoding.
        encoding: Encoding,
        /// The decoder's error.
        reason: String,
    },
    /// The decoded body is over `max_body` or the decompression ratio guard.
    #[error(
        "decoded body exceeds {limit} bytes or the {MAX_DECOMPRESSION_RATIO}:1 ratio guard (decompression bomb)"
    )]
    Bomb {
        /// The cap that was hit.
        limit: u64,
    },
    /// The JSON could not be trimmed (invalid, too deep, too large).
    #[error(transparent)]
    Trim(#[from] TrimError),
    /// The payload is not something the trim stage handles (not JSON, unknown encoding).
    #[error("{0}")]
    NotTrimmable(String),
}

/// Shrinks `wire` (encoded as `encoding`; `doc` is its decoded form, from [`decode`], or
/// `wire` itself for identity, already scanned) below `limit`, counted in `units`, by `rules`.
pub fn shrink(
    wire: &[u8],
    doc: &Document<'_>,
    encoding: Encoding,
    rules: &RuleSet,
    units: Units,
    limit: u64,
) -> Result<Shrunk, ShrinkError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let decoded = doc.body();
    if encoding == Encoding::Identity {
        let out = doc.trim(rules, limit)?;
        return Ok(Shrunk {
            measured_after: out.body.len(),
            decoded_len: out.body.len(),
            fits: out.fits,
            measured_before: wire.len(),
            original_len: wire.len(),
            applied: out.applied,
            body: out.body,
        });
    }
    let measure_wire = units == Units::Wire;
    let before = if measure_wire {
        wire.len()
    } else {
        decoded.len()
    };
    if before <= limit {
        return Ok(Shrunk {
            body: wire.to_vec(),
            original_len: wire.len(),
            fits: true,
            applied: Vec::new(),
            measured_before: before,
            measured_after: before,
            decoded_len: decoded.len(),
        });
    }
    if !measure_wire {
        let out = doc.trim(rules, limit)?;
        let body = encode(&out.body, encoding);
        return Ok(Shrunk {
            decoded_len: out.body.len(),
            body,
            original_len: wire.len(),
            fits: out.fits,
            applied: out.applied,
            measured_before: before,
            measured_after: out.body.len(),
        });
    }
    // The limit counts compressed bytes: guess a decoded target from the compression ratio,
    // then tighten it until the re-encoded body fits (or the rules run out).
    let mut target = (decoded.len() as u128 * limit as u128 / wire.len().max(1) as u128) as usize;
    let mut best: Option<Shrunk> = None;
    for _ in 0..8 {
        let out = doc.trim(rules, target)?;
        let body = encode(&out.body, encoding);
        let fits = body.len() <= limit;
        let reached_target = out.fits;
        let len = body.len();
        let candidate = Shrunk {
            measured_after: len,
            decoded_len: out.body.len(),
            body,
            original_len: wire.len(),
            fits,
            applied: out.applied,
            measured_before: before,
        };
        if best.as_ref().is_none_or(|b| len < b.body.len()) {
            best = Some(candidate);
        }
        if fits || !reached_target || target == 0 {
            break;
        }
        target = (target as u128 * limit as u128 * 97 / (len as u128 * 100)) as usize;
    }
    Ok(best.expect("at least one attempt"))
}

/// The most bytes [`decode`] may produce for a body of `wire_len` bytes: `max_decoded`, or
/// [`MAX_DECOMPRESSION_RATIO`] times the wire size (at least 1 MiB), whichever is smaller.
pub fn decoded_cap(wire_len: usize, max_decoded: u64) -> u64 {
    let ratio_cap = (wire_len as u64)
        .saturating_mul(MAX_DECOMPRESSION_RATIO)
        .max(1024 * 1024);
    max_decoded.min(ratio_cap)
}

/// Decodes a `gzip` or `deflate` body, refusing more than [`decoded_cap`] bytes.
pub fn decode(wire: &[u8], encoding: Encoding, max_decoded: u64) -> Result<Vec<u8>, ShrinkError> {
    let cap = decoded_cap(wire.len(), max_decoded);
    let mut out = Vec::new();
    let read = |reader: &mut dyn Read, out: &mut Vec<u8>| -> std::io::Result<u64> {
        reader.take(cap + 1).read_to_end(out).map(|n| n as u64)
    };
    let result = match encoding {
        Encoding::Identity => return Ok(wire.to_vec()),
        Encoding::Gzip => read(&mut flate2::read::MultiGzDecoder::new(wire), &mut out),
        Encoding::Deflate => {
            let zlib = read(&mut flate2::read::ZlibDecoder::new(wire), &mut out);
            if zlib.is_err() {
                out.clear();
                read(&mut flate2::read::DeflateDecoder::new(wire), &mut out)
            } else {
                zlib
            }
        }
    };
    match result {
        Ok(n) if n > cap => Err(ShrinkError::Bomb { limit: cap }),
        Ok(_) => Ok(out),
        Err(e) => Err(ShrinkError::Decode {
            encoding,
            reason: e.to_string(),
        }),
    }
}

/// Encodes `body` with `encoding` (the sender's, so the receiver decodes it as before).
pub fn encode(body: &[u8], encoding: Encoding) -> Vec<u8> {
    let level = flate2::Compression::default();
    let result = match encoding {
        Encoding::Identity => return body.to_vec(),
        Encoding::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
            enc.write_all(body).and_then(|()| enc.finish())
        }
        Encoding::Deflate => {
            let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), level);
            enc.write_all(body).and_then(|()| enc.finish())
        }
    };
    // Writing into a Vec cannot fail.
    result.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::trim::{ActionSpec, Keep, RuleSet, RuleSpec, testdata::synthflow_payload};

    fn rules() -> Arc<RuleSet> {
        let specs = vec![RuleSpec {
            path: "call.transcript".into(),
            action: ActionSpec::Truncate {
                keep: Keep::HeadTail,
                max_bytes: None,
                marker: None,
            },
        }];
        Arc::new(RuleSet::compile(&specs, &["call.call_id".to_string()]).unwrap())
    }

    #[test]
    fn content_types() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(is_json(Some("application/vnd.api+json")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(Some("application/jsonp")));
        assert!(is_json(Some(" application/Problem+JSON ;q=1")));
        assert!(!is_json(Some("application/json+xml")));
        assert!(!is_json(Some("application/ü+jso")));
        assert!(!is_json(Some("json")));
        assert_eq!(encoding(Some(" GZIP ")), Ok(Encoding::Gzip));
        assert_eq!(encoding(Some("X-Gzip")), Ok(Encoding::Gzip));
        assert_eq!(encoding(Some("Deflate")), Ok(Encoding::Deflate));
        assert_eq!(encoding(Some("")), Ok(Encoding::Identity));
        assert_eq!(encoding(Some("Identity")), Ok(Encoding::Identity));
        assert_eq!(encoding(Some(" Br ")), Err("br".to_string()));
        assert!(!is_json(None));
        assert_eq!(encoding(Some("GZIP")), Ok(Encoding::Gzip));
        assert_eq!(encoding(Some("br")), Err("br".into()));
    }

    #[test]
    fn gzip_decoded_limit_is_met_and_reencoded() {
        let json = synthflow_payload(300_000, 7);
        let wire = encode(&json, Encoding::Gzip);
        let decoded = decode(&wire, Encoding::Gzip, 1 << 30).unwrap();
        let out = shrink(
            &wire,
            &Document::parse(&decoded).unwrap(),
            Encoding::Gzip,
            &rules(),
            Units::Decoded,
            100_000,
        )
        .unwrap();
        assert!(out.fits);
        let back = decode(&out.body, Encoding::Gzip, 1 << 30).unwrap();
        assert!(back.len() <= 100_000);
        serde_json::from_slice::<serde_json::Value>(&back).unwrap();
    }

    #[test]
    fn gzip_wire_limit_is_met() {
        let json = synthflow_payload(2_000_000, 3);
        let wire = encode(&json, Encoding::Gzip);
        let limit = (wire.len() / 4) as u64;
        let decoded = decode(&wire, Encoding::Gzip, 1 << 30).unwrap();
        let out = shrink(
            &wire,
            &Document::parse(&decoded).unwrap(),
            Encoding::Gzip,
            &rules(),
            Units::Wire,
            limit,
        )
        .unwrap();
        assert!(out.fits, "{} > {limit}", out.body.len());
        assert!(out.body.len() as u64 <= limit);
        let back = decode(&out.body, Encoding::Gzip, 1 << 30).unwrap();
        serde_json::from_slice::<serde_json::Value>(&back).unwrap();
    }

    #[test]
    fn deflate_round_trips_and_bombs_are_refused() {
        let json = synthflow_payload(50_000, 1);
        let wire = encode(&json, Encoding::Deflate);
        assert_eq!(decode(&wire, Encoding::Deflate, 1 << 30).unwrap(), json);
        let zeros = encode(&vec![b' '; 50 * 1024 * 1024], Encoding::Gzip);
        assert!(matches!(
            decode(&zeros, Encoding::Gzip, 1 << 30),
            Err(ShrinkError::Bomb { .. })
        ));
        assert!(matches!(
            decode(b"not gzip", Encoding::Gzip, 1 << 30),
            Err(ShrinkError::Decode { .. })
        ));
    }
}
