//! The incident stage: every size incident is recorded as one JSON line, explained, and turned
//! into a concrete fix.
//!
//! - [`Incident`] is the record (this file), one per size problem on one request.
//! - [`writer`]: [`IncidentLog`], a bounded queue to a writer task that appends JSONL lines and
//!   never blocks or fails the request path.
//! - [`fingerprint`](mod@fingerprint): names the component that answered a receiver's 413 (pure).
//! - [`learn`]: per route, the bracket of body sizes the receiver accepted and rejected, and the
//!   effective limit derived from it.
//! - [`table`]: with `[incidents] backend = "postgres"`, the same lines in a table every
//!   replica writes to.
//! - [`diagnose`]: reads the log back and builds the per-route report behind
//!   `payload-guard diagnose` (pure, apart from reading the file).
//!
//! # The JSONL record
//!
//! One JSON object per line, appended to the configured path. Field names are stable.
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `ts` | string | when the incident happened, RFC 3339 UTC with milliseconds (`2026-11-26T19:45:34.123Z`) |
//! | `kind` | string | `over_max_body` (the proxy refused a body over the route's `max_body`), `over_upstream_limit` (the payload was over the route's receiver limit; see `action`), `upstream_413` (the receiver answered 413), `buffer_budget_exhausted` (the proxy answered 503: no buffer memory left), `spool_refused` (a spool route could not store an undeliverable payload: spool full or disk low; 503) |
//! | `route` | string | the route's `name` |
//! | `request_id` | string | the proxy's id for the request; several incidents of one request share it |
//! | `call_id` | string | the sender's call id (Synthflow `call.call_id`), when one was read |
//! | `method` | string | request method |
//! | `path` | string | request path, without the query string |
//! | `peer` | string | the sender's IP address |
//! | `user_agent` | string | the sender's `User-Agent` |
//! | `content_type` | string | the request's `Content-Type` |
//! | `content_encoding` | string | the request's `Content-Encoding` (`gzip`, `deflate`), when it had one |
//! | `content_length` | integer | the request's `Content-Length` header, when it had one |
//! | `body_bytes` | integer | body bytes the proxy saw (for `over_max_body` cut off early, this is what was read before the cut) |
//! | `max_body` | integer | the route's `max_body` in bytes |
//! | `upstream_limit` | integer | the receiver limit in force for this request (configured or learned) |
//! | `action` | string | for `over_upstream_limit`: `forwarded`, `rejected`, `trimmed` or `trim_failed` |
//! | `bytes_after` | integer | body size after trimming (`trimmed`, `trim_failed`) |
//! | `trimmed` | array | what the trim rules removed: `[{"path": "call.transcript", "removed": 812345}]` |
//! | `top_fields` | array | the 5 largest JSON leaf paths by raw bytes: `[{"path": "call.turns[*].text", "bytes": 90210}]` |
//! | `upstream_status` | integer | the receiver's status code |
//! | `rejector` | string | for `upstream_413`: who answered it, see [`fingerprint::Rejector`] |
//! | `upstream_snippet` | string | the first 256 bytes of the receiver's 413 body, lossy UTF-8, control characters escaped (see [`snippet`]) |
//! | `learned` | object | the route's learned bracket after this incident: `{"largest_accepted": 900000, "smallest_rejected": 1200000}` (either key may be absent) |
//! | `reason` | string | why a payload could not be trimmed (`not JSON (text/plain)`, `invalid JSON at byte 17: …`), or what else went wrong |
//! | `dry_run` | boolean | `true` when the route has `trim_dry_run = true`: `trimmed`/`bytes_after` say what the rules would have done, the original was forwarded (absent otherwise) |
//! | `retry` | object | whether the proxy retried after the receiver's 413 (e.g. trimmed and resent): `{"attempted": true, "status": 200, "bytes": 640000}` |
//!
//! **Absent values:** a value that is unknown or does not apply is left out — the key is
//! omitted, never written as `null`, and empty lists (`trimmed`, `top_fields`) are omitted too.
//! Readers treat a missing key as "unknown", and accept `null` as the same thing. `ts`, `kind`,
//! `route` and `request_id` are always present.
//!
//! **Never written:** request or response bodies (beyond the 256-byte `upstream_snippet` of the
//! receiver's 413 answer), and header values other than `User-Agent`, `Content-Type` and
//! `Content-Length` — no `Authorization`, `Cookie` or signature headers.

pub mod diagnose;
pub mod fingerprint;
pub mod learn;
pub mod table;
pub mod writer;

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use self::fingerprint::{Rejector, fingerprint};
pub use self::learn::{Bracket, LimitLearner, effective_limit};
pub use self::writer::IncidentLog;

/// The one log line of an incident: INFO for a payload trimmed to fit, WARN otherwise.
pub fn log_line(inc: &Incident) {
    let size = inc.payload_bytes();
    let action = inc.action.map_or("-", Action::as_str);
    let reason = inc.reason.as_deref().unwrap_or("");
    if inc.kind == Kind::OverUpstreamLimit && inc.action == Some(Action::Trimmed) {
        tracing::info!(route = %inc.route, request_id = %inc.request_id, call_id = inc.call_id.as_deref().unwrap_or(""), kind = inc.kind.as_str(), bytes = size.unwrap_or(0), after = inc.bytes_after.unwrap_or(0), limit = inc.upstream_limit.unwrap_or(0), "payload trimmed");
        return;
    }
    let message = match inc.kind {
        Kind::OverMaxBody => "body over max_body",
        Kind::OverUpstreamLimit => "payload over the receiver's limit",
        Kind::Upstream413 => "receiver answered 413",
        Kind::BufferBudgetExhausted => "buffer budget exhausted",
        Kind::SpoolRefused => "the spool could not take the payload",
        Kind::DuplicateConflict => "payload id seen before with a different body",
    };
    let rejector = inc.rejector.as_ref().map_or("", |r| r.as_str());
    let call_id = inc.call_id.as_deref().unwrap_or("");
    let upstream_status = inc.upstream_status.unwrap_or(0);
    // Repeats of the same kind on the same route are counted and summarised (see warn_limit).
    if !crate::warn_limit::warnings().admit(message, &inc.route) {
        return;
    }
    tracing::warn!(route = %inc.route, request_id = %inc.request_id, call_id, kind = inc.kind.as_str(), action, bytes = size.unwrap_or(0), limit = inc.upstream_limit.unwrap_or(0), upstream_status, rejector, reason, "{message}");
}

/// How many bytes of the receiver's 413 body go into `upstream_snippet`.
pub const SNIPPET_BYTES: usize = 256;

/// How many of a body's largest fields go into `top_fields`.
pub const TOP_FIELDS: usize = 5;

/// What kind of size incident happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// The proxy refused a body over the route's `max_body` (413 to the sender).
    #[serde(rename = "over_max_body")]
    OverMaxBody,
    /// The payload was over the receiver's limit; [`Action`] says what the proxy did.
    #[serde(rename = "over_upstream_limit")]
    OverUpstreamLimit,
    /// The receiver answered 413.
    #[serde(rename = "upstream_413")]
    Upstream413,
    /// The proxy's buffer budget was full and it answered 503.
    #[serde(rename = "buffer_budget_exhausted")]
    BufferBudgetExhausted,
    /// A spool route could not store an undeliverable payload (spool full or disk low) and
    /// answered 503.
    #[serde(rename = "spool_refused")]
    SpoolRefused,
    /// A payload id (`dedupe`) was delivered before with a different body; this one was
    /// forwarded too.
    #[serde(rename = "duplicate_conflict")]
    DuplicateConflict,
}

impl Kind {
    /// Every kind, in the order reports list them.
    pub const ALL: [Kind; 6] = [
        Kind::OverMaxBody,
        Kind::OverUpstreamLimit,
        Kind::Upstream413,
        Kind::BufferBudgetExhausted,
        Kind::SpoolRefused,
        Kind::DuplicateConflict,
    ];

    /// The stable name used in the log and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OverMaxBody => "over_max_body",
            Kind::OverUpstreamLimit => "over_upstream_limit",
            Kind::Upstream413 => "upstream_413",
            Kind::BufferBudgetExhausted => "buffer_budget_exhausted",
            Kind::SpoolRefused => "spool_refused",
            Kind::DuplicateConflict => "duplicate_conflict",
        }
    }
}

/// What the proxy did with a payload over the receiver's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Sent on unchanged (`on_oversize = "forward"`).
    Forwarded,
    /// Answered 413 without contacting the receiver (`on_oversize = "reject"`).
    Rejected,
    /// Trimmed under the limit and sent on.
    Trimmed,
    /// The trim rules could not bring it under the limit.
    TrimFailed,
}

impl Action {
    /// The stable name used in the log and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Forwarded => "forwarded",
            Action::Rejected => "rejected",
            Action::Trimmed => "trimmed",
            Action::TrimFailed => "trim_failed",
        }
    }
}

/// One of a body's largest leaf paths (`top_fields`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldBytes {
    /// Leaf path with array indices as `[*]`, e.g. `call.turns[*].text`.
    pub path: String,
    /// Raw JSON bytes of all values at that path.
    pub bytes: u64,
}

/// What one trim rule removed (`trimmed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The concrete path that was cut.
    pub path: String,
    /// Bytes removed there.
    pub removed: u64,
}

/// Whether the proxy retried after the receiver's 413, and how that went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Retry {
    /// A retry was sent.
    pub attempted: bool,
    /// The receiver's status for the retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Body bytes of the retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// One size incident: one line of the incident log. See the [module docs](self) for every
/// field's meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// RFC 3339 UTC with milliseconds.
    pub ts: String,
    /// What happened.
    pub kind: Kind,
    /// The route's name.
    pub route: String,
    /// The proxy's request id.
    pub request_id: String,
    /// The sender's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request path without query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Sender IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<IpAddr>,
    /// Sender `User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Request `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Request `Content-Encoding` (so `diagnose` can tell compressed bodies apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// Request `Content-Length` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    /// Body bytes seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_bytes: Option<u64>,
    /// The route's `max_body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    /// The receiver limit in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_limit: Option<u64>,
    /// What the proxy did (for `over_upstream_limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Body size after trimming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_after: Option<u64>,
    /// What trimming removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trimmed: Vec<Removed>,
    /// The largest leaf paths of the body.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_fields: Vec<FieldBytes>,
    /// The receiver's status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Who answered the receiver's 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejector: Option<Rejector>,
    /// The start of the receiver's 413 body, escaped (see [`snippet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_snippet: Option<String>,
    /// The route's learned size bracket after this incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<Bracket>,
    /// The retry after a receiver's 413, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Why the payload could not be trimmed (`trim_failed`), or other detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The trim was computed but not applied (`trim_dry_run = true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl Incident {
    /// A new incident stamped now; every optional field empty.
    pub fn new(kind: Kind, route: impl Into<String>, request_id: impl Into<String>) -> Incident {
        Incident {
            ts: format_ts(SystemTime::now()),
            kind,
            route: route.into(),
            request_id: request_id.into(),
            call_id: None,
            method: None,
            path: None,
            peer: None,
            user_agent: None,
            content_type: None,
            content_encoding: None,
            content_length: None,
            body_bytes: None,
            max_body: None,
            upstream_limit: None,
            action: None,
            bytes_after: None,
            trimmed: Vec::new(),
            top_fields: Vec::new(),
            upstream_status: None,
            rejector: None,
            upstream_snippet: None,
            learned: None,
            retry: None,
            reason: None,
            dry_run: false,
        }
    }

    /// The payload's size as best known: the larger of the bytes seen and the declared
    /// `Content-Length` (a body refused on its `Content-Length` alone was never read).
    pub fn payload_bytes(&self) -> Option<u64> {
        match (self.body_bytes, self.content_length) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The incident as one JSONL line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing this struct cannot fail: every field is a string, number, list or map
        // with string keys. The fallback keeps the signature infallible all the same.
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({
                "ts": self.ts, "kind": self.kind.as_str(), "route": self.route,
                "request_id": self.request_id, "error": e.to_string(),
            })
            .to_string()
        });
        line.push('\n');
        line
    }
}

/// `t` as RFC 3339 UTC with milliseconds, the format of `ts`.
pub fn format_ts(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The first [`SNIPPET_BYTES`] bytes of a receiver's body, safe for a log line and a terminal:
/// lossy UTF-8 (a character cut at the end becomes U+FFFD), `\n`, `\r`, `\t` written as those
/// two-character escapes and every other control character (C0, DEL, C1) as `\u00XX`.
pub fn snippet(body: &[u8]) -> String {
    let head = &body[..body.len().min(SNIPPET_BYTES)];
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_values_are_omitted_and_names_are_exact() {
        let mut inc = Incident::new(Kind::Upstream413, "synthflow", "r1");
        inc.body_bytes = Some(10);
        inc.rejector = Some(Rejector::AwsApiGateway);
        inc.action = Some(Action::TrimFailed);
        let line = inc.to_line();
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        // Field order in the line is the struct's: `ts` first, as in the module docs.
        assert!(line.starts_with("{\"ts\":\""), "{line}");
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "action",
                "body_bytes",
                "kind",
                "rejector",
                "request_id",
                "route",
                "ts"
            ]
        );
        assert_eq!(v["kind"], "upstream_413");
        assert_eq!(v["rejector"], "aws-api-gateway");
        assert_eq!(v["action"], "trim_failed");
        assert!(!line.contains("null"));
        let back: Incident = serde_json::from_str(&line).unwrap();
        assert_eq!(back, inc);
    }

    #[test]
    fn nulls_read_as_absent() {
        let inc: Incident = serde_json::from_str(
            r#"{"ts":"2026-01-01T00:00:00.000Z","kind":"over_max_body","route":"a",
                "request_id":"r","body_bytes":null,"peer":"::1","top_fields":[]}"#,
        )
        .unwrap();
        assert_eq!(inc.body_bytes, None);
        assert_eq!(inc.peer, Some("::1".parse().unwrap()));
    }

    #[test]
    fn ts_is_rfc3339_utc_millis() {
        let ts = Incident::new(Kind::OverMaxBody, "a", "r").ts;
        assert_eq!(ts.len(), "2026-11-26T19:45:34.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        assert!(humantime::parse_rfc3339(&ts).is_ok());
    }

    #[test]
    fn payload_bytes_prefers_the_larger() {
        let mut inc = Incident::new(Kind::OverMaxBody, "a", "r");
        assert_eq!(inc.payload_bytes(), None);
        inc.content_length = Some(5000);
        inc.body_bytes = Some(0);
        assert_eq!(inc.payload_bytes(), Some(5000));
        inc.content_length = None;
        assert_eq!(inc.payload_bytes(), Some(0));
    }

    #[test]
    fn snippet_escapes_controls_and_caps_length() {
        assert_eq!(
            snippet(b"a\nb\r\tc\x00\x1b[31m\x7f"),
            "a\\nb\\r\\tc\\u0000\\u001b[31m\\u007f"
        );
        assert_eq!(snippet("\u{85}é".as_bytes()), "\\u0085é");
        let long = vec![b'x'; 1000];
        assert_eq!(snippet(&long).len(), SNIPPET_BYTES);
        // A two-byte character cut in half at byte 256 becomes one replacement character.
        let mut cut = vec![b'x'; SNIPPET_BYTES - 1];
        cut.extend_from_slice("é".as_bytes());
        assert!(snippet(&cut).ends_with('\u{fffd}'));
        assert_eq!(snippet(b"\xff"), "\u{fffd}");
    }
}
