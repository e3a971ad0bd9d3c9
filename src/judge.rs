//! Judging a receiver's answer, the one way every caller does it: the live path, each retry
//! after a 413, redelivery and `payload-guard replay` all ask [`judge`] what an answer means.
//!
//! An answer is only `Delivered` when it is a 2xx that was read to its end: a receiver that
//! breaks off mid-answer may have crashed before it stored the payload.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

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
///
/// Generic over the body, so the common answer (small, one frame) is read without boxing the
/// body, and its frame becomes the prefix without a copy.
pub async fn read_body<B>(mut body: B, max: usize) -> Result<(Bytes, Option<B>), (Bytes, String)>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let mut prefix = Prefix::Empty;
    loop {
        if prefix.len() >= max {
            return Ok((prefix.into_bytes(), Some(body)));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.push(data);
                }
            }
            Some(Err(err)) => {
                return Err((prefix.into_bytes(), crate::forward::error_chain(&err)));
            }
            None => return Ok((prefix.into_bytes(), None)),
        }
    }
}

/// What [`read_body`] has read: nothing, one frame as it came, or several frames copied
/// together.
enum Prefix {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Prefix {
    fn len(&self) -> usize {
        match self {
            Prefix::Empty => 0,
            Prefix::One(b) => b.len(),
            Prefix::Many(b) => b.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Prefix::Empty) {
            Prefix::Empty => Prefix::One(data),
            Prefix::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + data.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                Prefix::Many(all)
            }
            Prefix::Many(mut all) => {
                all.extend_from_slice(&data);
                Prefix::Many(all)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Prefix::Empty => Bytes::new(),
            Prefix::One(b) => b,
            Prefix::Many(b) => b.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `frames`, then `error` if given.
    fn frames(
        frames: &[&'static [u8]],
        error: Option<&'static str>,
    ) -> impl http_body::Body<Data = Bytes, Error = std::io::Error> + Unpin + use<> {
        let mut items: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = frames
            .iter()
            .map(|f| Ok(http_body::Frame::data(Bytes::from_static(f))))
            .collect();
        if let Some(e) = error {
            items.push(Err(std::io::Error::other(e)));
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(items))
    }

    #[tokio::test]
    async fn read_body_keeps_a_single_frame_as_it_came() {
        static ANSWER: &[u8] = br#"{"ok":true}"#;
        let (prefix, rest) = read_body(frames(&[ANSWER], None), 1024).await.unwrap();
        assert_eq!(prefix, ANSWER);
        assert_eq!(prefix.as_ptr(), ANSWER.as_ptr(), "the frame was copied");
        assert!(rest.is_none());
    }

    #[tokio::test]
    async fn read_body_joins_frames_and_stops_at_max() {
        let (prefix, rest) = read_body(frames(&[b"ab", b"", b"cd", b"ef"], None), 1024)
            .await
            .unwrap();
        assert_eq!(prefix, "abcdef");
        assert!(rest.is_none());

        let (prefix, rest) = read_body(frames(&[b"ab", b"cd", b"ef"], None), 3)
            .await
            .unwrap();
        assert_eq!(prefix, "abcd", "reads whole frames until `max` is reached");
        let rest = rest.expect("the rest of a body over `max` is kept");
        let tail = rest.collect().await.unwrap().to_bytes();
        assert_eq!(tail, "ef");

        let (prefix, rest) = read_body(frames(&[], None), 3).await.unwrap();
        assert!(prefix.is_empty() && rest.is_none());
    }

    #[tokio::test]
    async fn read_body_returns_what_came_before_an_error() {
        let Err((prefix, why)) = read_body(frames(&[b"ab", b"cd"], Some("reset")), 1024).await
        else {
            panic!("an error mid-body must be reported");
        };
        assert_eq!(prefix, "abcd");
        assert_eq!(why, "reset");
    }

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
