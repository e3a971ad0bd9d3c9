//! Preparing a payload for its receiver, the one way every caller does it: the live path, each
//! resend after a receiver's 413, redelivery, `payload-guard replay` and `payload-guard trim`
//! all call [`prepare`]. It decodes nothing itself (the caller holds the decoded, parsed
//! [`Document`] so one scan serves every attempt), trims to a target counted in wire or
//! decoded bytes, re-encodes with the sender's encoding, re-signs the result when the route
//! asks for it and names the headers that mark it trimmed. Archiving the untrimmed original
//! is the caller's (it needs the spool: see `deliver::archive_original`).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

use crate::config::Resign;
use crate::config::{OnOversize, RouteConfig};
use crate::incident::Removed;
use crate::trim::payload::{self, Encoding, ShrinkError, Shrunk, Units};
use crate::trim::{Document, RuleSet};
use crate::verify::{Verified, Verifier};

/// `Payload-Guard-Trimmed: <path>=<bytes removed>, …`
pub const TRIMMED_HEADER: HeaderName = HeaderName::from_static("payload-guard-trimmed");
/// `Payload-Guard-Original-Length: <wire bytes of the original>`
pub const ORIGINAL_LENGTH_HEADER: HeaderName =
    HeaderName::from_static("payload-guard-original-length");

/// How a route trims: its rules, what its limit counts, and how it re-signs.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    /// The compiled rules.
    pub rules: &'a RuleSet,
    /// What the route's `upstream_limit` counts.
    pub units: Units,
    /// Compute the trim but send the original (`trim_dry_run`).
    pub dry_run: bool,
    /// Re-signs a trimmed body for the receiver: the route's verifier, and how.
    pub resign: Option<(&'a Verifier, &'a Resign)>,
    /// What the sender's signature said (id, timestamp), for `resign = "same"`.
    pub stamp: Option<&'a Verified>,
}

impl<'a> Policy<'a> {
    /// The policy of a route that trims (`on_oversize = "trim"` with rules), else `None`.
    pub fn of(route: &'a RouteConfig) -> Option<Policy<'a>> {
        let tc = route.trim.as_ref()?;
        if route.on_oversize != OnOversize::Trim {
            return None;
        }
        Some(Policy {
            rules: &tc.rules,
            units: tc.limit_counts.units(),
            dry_run: tc.dry_run,
            resign: route
                .verify
                .as_ref()
                .and_then(|v| Some((&v.verifier, v.resign.as_ref()?))),
            stamp: None,
        })
    }

    /// The policy with the sender's verified signature, which `resign = "same"` re-signs
    /// with (from [`Verifier::verify`], or [`Verifier::stamp`] of the stored headers).
    pub fn stamped(self, stamp: Option<&'a Verified>) -> Policy<'a> {
        Policy { stamp, ..self }
    }
}

/// A payload made ready for the receiver.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The bytes to send (encoded as received).
    pub body: Bytes,
    /// Its decoded size.
    pub decoded_len: u64,
    /// The trim report, when the rules ran (its `body` is empty: the bytes are in `body`).
    pub shrunk: Option<Shrunk>,
    /// Headers to set on the request: the trim marks and a fresh signature.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Prepared {
    /// The payload as received: nothing to change.
    pub fn original(wire: &Bytes, decoded_len: u64) -> Prepared {
        Prepared {
            body: wire.clone(),
            decoded_len,
            shrunk: None,
            headers: Vec::new(),
        }
    }

    /// Whether the rules removed anything.
    pub fn trimmed(&self) -> bool {
        self.shrunk.as_ref().is_some_and(Shrunk::changed)
    }

    /// Whether the result is within the target it was prepared for (true when untouched).
    pub fn fits(&self) -> bool {
        self.shrunk.as_ref().is_none_or(|s| s.fits)
    }

    /// Its size in `units`.
    pub fn size(&self, units: Units) -> u64 {
        match units {
            Units::Wire => self.body.len() as u64,
            Units::Decoded => self.decoded_len,
        }
    }

    /// What each rule removed, for incidents.
    pub fn removed(&self) -> Vec<Removed> {
        self.shrunk.as_ref().map_or_else(Vec::new, |s| {
            s.applied
                .iter()
                .map(|a| Removed {
                    path: a.path.clone(),
                    removed: a.removed as u64,
                })
                .collect()
        })
    }

    /// Bytes the rules removed (decoded).
    pub fn removed_bytes(&self) -> u64 {
        self.shrunk
            .as_ref()
            .map_or(0, |s| s.applied.iter().map(|a| a.removed as u64).sum())
    }
}

/// Trims `wire` (encoded as `encoding`; `doc` is its decoded form, parsed) to at most `target`
/// bytes counted in `units`, re-encodes, and names the headers the receiver gets: the trim
/// marks and, on routes that re-sign, a signature of the new body. A payload the rules leave
/// unchanged comes back as it was, without marks.
pub fn prepare(
    policy: &Policy<'_>,
    wire: &Bytes,
    doc: &Document<'_>,
    encoding: Encoding,
    target: u64,
    units: Units,
) -> Result<Prepared, ShrinkError> {
    let mut shrunk = payload::shrink(wire, doc, encoding, policy.rules, units, target)?;
    if !shrunk.changed() {
        // Nothing removed: the original goes out, the report's copy of it is not kept.
        shrunk.body = Vec::new();
        return Ok(Prepared {
            body: wire.clone(),
            decoded_len: doc.body().len() as u64,
            shrunk: Some(shrunk),
            headers: Vec::new(),
        });
    }
    let mut headers = Vec::with_capacity(3);
    if let Ok(v) = HeaderValue::from_str(&shrunk.trimmed_header()) {
        headers.push((TRIMMED_HEADER, v));
    }
    headers.push((
        ORIGINAL_LENGTH_HEADER,
        HeaderValue::from(shrunk.original_len as u64),
    ));
    let signed = match policy.resign {
        None => Ok(()),
        Some((_, Resign::Header(resigner))) => resigner
            .sign(None, &shrunk.body)
            .map(|(name, value)| headers.push((name, value))),
        // The sender's own scheme, secret, id and timestamp.
        Some((verifier, Resign::Same)) => match stamp_or_missing(policy.stamp) {
            Ok(stamp) => {
                let mut signed = http::HeaderMap::new();
                verifier
                    .resign(stamp, &shrunk.body, &mut signed)
                    .map(|()| headers.extend(signed.iter().map(|(n, v)| (n.clone(), v.clone()))))
            }
            Err(err) => Err(err),
        },
    };
    if let Err(err) = signed {
        tracing::warn!(error = %err, "cannot re-sign the trimmed body");
    }
    // The bytes move into `body` (no copy); the report keeps the rest.
    let body = Bytes::from(std::mem::take(&mut shrunk.body));
    Ok(Prepared {
        decoded_len: shrunk.decoded_len as u64,
        body,
        shrunk: Some(shrunk),
        headers,
    })
}

/// The sender's stamp, or why a `resign = "same"` route cannot re-sign without it.
fn stamp_or_missing(stamp: Option<&Verified>) -> Result<&Verified, crate::verify::VerifyError> {
    stamp.ok_or(crate::verify::VerifyError::Missing)
}

/// The next size to try after a receiver refused `refused` bytes: the largest common receiver
/// limit below it (and above `floor`, the largest size it accepted, when that is lower), else
/// half of it. `None` when there is nowhere lower worth going (under 1 KiB, or not above
/// `floor`).
pub fn ladder_step(refused: u64, floor: Option<u64>) -> Option<u64> {
    let floor = floor.filter(|&f| f < refused);
    let above_floor = |l: u64| floor.is_none_or(|f| l > f);
    let step = crate::incident::learn::COMMON_LIMITS
        .iter()
        .chain(SMALL_STEPS)
        .copied()
        .filter(|&l| l < refused && above_floor(l))
        .max();
    match step {
        Some(step) => Some(step),
        None => {
            let half = refused / 2;
            (half >= 1024 && above_floor(half))
                .then_some(half)
                .or(floor.filter(|&f| f >= 1024))
        }
    }
}

/// Steps below the smallest common limit (64 KiB).
const SMALL_STEPS: &[u64] = &[32 * 1024, 16 * 1024, 8 * 1024, 4 * 1024, 2 * 1024, 1024];

/// The decoded form of a payload whose `Content-Encoding` is `encoding` (the bytes themselves
/// when it is identity), refusing more than `max_decoded` bytes.
pub fn decode(wire: &Bytes, encoding: Encoding, max_decoded: u64) -> Result<Bytes, ShrinkError> {
    match encoding {
        Encoding::Identity => Ok(wire.clone()),
        other => payload::decode(wire, other, max_decoded).map(Bytes::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_walks_down_common_limits() {
        // Express's 100kb after a 300 KB refusal: 256 KiB first, then 100 KiB.
        assert_eq!(ladder_step(300_000, None), Some(256 * 1024));
        assert_eq!(ladder_step(256 * 1024, None), Some(100 * 1024));
        assert_eq!(ladder_step(102_400, None), Some(100_000));
        // Below 64 KiB: powers of two.
        assert_eq!(ladder_step(51_000, None), Some(32 * 1024));
        assert_eq!(ladder_step(8 * 1024, None), Some(4 * 1024));
        // Never at or below what the receiver accepted.
        assert_eq!(ladder_step(300_000, Some(200_000)), Some(256 * 1024));
        assert_eq!(ladder_step(262_144, Some(200_000)), Some(200_000));
        assert_eq!(ladder_step(1_000, None), None);
        assert_eq!(ladder_step(20 * 1024 * 1024, None), Some(16 * 1024 * 1024));
    }
}
