//! The metadata stored with every record: where the payload came from, how delivery went.
//! Stored as one JSON object (times as RFC 3339 with milliseconds, UTC); unknown fields are
//! ignored and missing optional fields default, so a newer writer's records stay readable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// At most this many bytes of a receiver's response body are kept as a dead record's snippet.
pub const SNIPPET_MAX_BYTES: usize = 1024;
/// At most this many bytes of an error message are kept as `last_error`.
pub const LAST_ERROR_MAX_BYTES: usize = 1024;

/// Everything the spool keeps about a payload besides its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The route's name.
    pub route: String,
    /// When the proxy received the request.
    #[serde(with = "rfc3339")]
    pub received_at: SystemTime,
    /// The proxy's request id (the one in the access log and incidents).
    pub request_id: String,
    /// The sender's call id, when the route extracts one.
    #[serde(default)]
    pub call_id: Option<String>,
    /// The request method.
    pub method: String,
    /// The request's path and query, as received.
    pub path_and_query: String,
    /// The request's headers in order, hop-by-hop headers already removed by the caller.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body's length as received (the stored body is always the untrimmed original).
    pub original_len: u64,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the record is due for redelivery; `None` means now.
    #[serde(default, with = "rfc3339_opt")]
    pub next_attempt_at: Option<SystemTime>,
    /// The receiver's final status, for dead records.
    #[serde(default)]
    pub status: Option<u16>,
    /// The start of the receiver's response body, for dead records.
    #[serde(default)]
    pub snippet: Option<String>,
    /// Whether the proxy forwarded a trimmed version of this payload.
    #[serde(default)]
    pub trimmed: bool,
}

impl Meta {
    /// Metadata for a fresh payload, with no attempts and no delivery outcome yet.
    pub fn new(
        route: impl Into<String>,
        received_at: SystemTime,
        request_id: impl Into<String>,
        method: impl Into<String>,
        path_and_query: impl Into<String>,
        original_len: u64,
    ) -> Meta {
        Meta {
            route: route.into(),
            received_at,
            request_id: request_id.into(),
            call_id: None,
            method: method.into(),
            path_and_query: path_and_query.into(),
            headers: Vec::new(),
            original_len,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            status: None,
            snippet: None,
            trimmed: false,
        }
    }
}

/// Cuts `text` to at most `max_bytes` on a char boundary.
pub(crate) fn truncate_utf8(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The latest instant RFC 3339 can write (9999-12-31T23:59:59Z).
const MAX_RFC3339_SECS: u64 = 253_402_300_799;

/// Formats a time as RFC 3339 with milliseconds, clamped to what the format can hold.
pub(crate) fn format_time(time: SystemTime) -> String {
    let max = UNIX_EPOCH + Duration::from_secs(MAX_RFC3339_SECS);
    let clamped = time.clamp(UNIX_EPOCH, max);
    humantime::format_rfc3339_millis(clamped).to_string()
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(*time))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text)
            .map_err(|e| de::Error::custom(format!("invalid RFC 3339 time {text:?}: {e}")))
    }
}

mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(
        time: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => s.serialize_some(&super::format_time(*time)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => humantime::parse_rfc3339_weak(&text)
                .map(Some)
                .map_err(|e| de::Error::custom(format!("invalid RFC 3339 time {text:?}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_through_json_with_readable_times() {
        let mut meta = Meta::new(
            "github",
            UNIX_EPOCH + Duration::from_millis(1_718_000_000_123),
            "req-1",
            "POST",
            "/hooks?x=1",
            42,
        );
        meta.next_attempt_at = Some(UNIX_EPOCH + Duration::from_secs(1_718_000_100));
        meta.headers
            .push(("content-type".into(), "application/json".into()));
        let json = serde_json::to_string(&meta).unwrap();
        assert!(json.contains("\"2024-06-10T06:13:20.123Z\""), "{json}");
        assert!(json.contains("\"2024-06-10T06:15:00.000Z\""), "{json}");
        let back: Meta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, meta);
        // Older writers may leave out optional fields; newer ones may add fields.
        let minimal = r#"{"route":"r","received_at":"2024-06-10T06:13:20Z","request_id":"x",
            "method":"POST","path_and_query":"/","original_len":1,"future_field":true}"#;
        let parsed: Meta = serde_json::from_str(minimal).unwrap();
        assert_eq!(parsed.attempts, 0);
        assert_eq!(parsed.next_attempt_at, None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    #[test]
    fn times_out_of_range_are_clamped_not_panicking() {
        assert_eq!(
            format_time(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
