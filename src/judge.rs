//! Judging a receiver's answer, the one way every caller does it: the live path, each retry
//! after a 413, redelivery and `payload-guard replay` all ask [`judge`] what an answer means.
//!
//! An answer is only `Delivered` when it is a 2xx that was read to its end: a receiver that
//! breaks off mid-answer may have crashed before it stored the payload.

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::forward::UpstreamBody;

/// What a receiver's answer means for the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx, read to its end: done.
    Delivered,
    /// 413: too large for the receiver (`bytes`: the size that was refused, when known).
    TooLarge {
        /// The refused size (wire bytes).
        bytes: Option<u64>,
    },
    /// Worth trying again later: 5xx, 408, 429 with `Retry-After`, no answer (connect
    /// failure, reset, timeout), or an answer that broke off.
    Retryable(String),
    /// Refused for good (any other 4xx, 3xx, 429 without `Retry-After`).
    Final(u16),
}

impl Verdict {
    /// A stable name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Delivered => "delivered",
            Verdict::TooLarge { .. } => "too_large",
            Verdict::Retryable(_) => "retryable",
            Verdict::Final(_) => "final",
        }
    }
}

/// What the proxy saw of one attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// Whether the answer's body was read to its end (only meaningful with a status).
    pub complete: bool,
    /// Whether the answer carried `Retry-After`.
    pub retry_after: bool,
    /// What went wrong when there was no (complete) answer.
    pub error: Option<String>,
    /// The body size that was sent.
    pub sent: Option<u64>,
}

/// What an answer means (pure).
pub fn judge(answer: &Answer) -> Verdict {
    let Some(status) = answer.status else {
        return Verdict::Retryable(
            answer
                .error
                .clone()
                .unwrap_or_else(|| "no answer".to_string()),
        );
    };
    match status {
        200..=299 if answer.complete => Verdict::Delivered,
        200..=299 => Verdict::Retryable(format!(
            "the receiver's answer ({status}) broke off{}",
            answer
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        413 => Verdict::TooLarge { bytes: answer.sent },
        408 | 500..=599 => Verdict::Retryable(format!("receiver answered {status}")),
        429 if answer.retry_after => Verdict::Retryable(format!("receiver answered {status}")),
        other => Verdict::Final(other),
    }
}

/// Reads an answer's body up to `max` bytes. `Ok((prefix, rest))`: `rest` is `None` when the
/// body ended within `max`; `Err` carries what was read before it broke off, and why.
pub async fn read_body(
    mut body: UpstreamBody,
    max: usize,
) -> Result<(Bytes, Option<UpstreamBody>), (Bytes, String)> {
    let mut prefix = Vec::new();
    loop {
        if prefix.len() >= max {
            return Ok((Bytes::from(prefix), Some(body)));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                return Err((Bytes::from(prefix), crate::forward::error_chain(&err)));
            }
            None => return Ok((Bytes::from(prefix), None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: Option<u16>, complete: bool, retry_after: bool) -> Answer {
        Answer {
            status,
            complete,
            retry_after,
            error: None,
            sent: Some(10),
        }
    }

    #[test]
    fn every_kind_of_answer() {
        let table: &[(Option<u16>, bool, bool, &str)] = &[
            (Some(200), true, false, "delivered"),
            (Some(204), true, false, "delivered"),
            (Some(200), false, false, "retryable"),
            (Some(413), true, false, "too_large"),
            (Some(408), true, false, "retryable"),
            (Some(500), true, false, "retryable"),
            (Some(503), false, true, "retryable"),
            (Some(429), true, true, "retryable"),
            (Some(429), true, false, "final"),
            (Some(400), true, false, "final"),
            (Some(401), true, false, "final"),
            (Some(422), true, false, "final"),
            (Some(301), true, false, "final"),
            (None, false, false, "retryable"),
        ];
        for &(status, complete, retry_after, want) in table {
            let got = judge(&answer(status, complete, retry_after));
            assert_eq!(
                got.as_str(),
                want,
                "status {status:?} complete {complete} retry-after {retry_after}"
            );
        }
        assert_eq!(
            judge(&answer(Some(413), true, false)),
            Verdict::TooLarge { bytes: Some(10) }
        );
        assert_eq!(judge(&answer(Some(418), true, false)), Verdict::Final(418));
    }
}
