//! The one place that maps what went wrong to an HTTP status, an incident kind and a culprit.

use std::time::Duration;

use http::StatusCode;

/// nginx's "client closed request": logged when the sender went away before its request was
/// complete (no response can reach it).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Who caused a failed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    /// The sender of the request (bad request, too large, too slow, went away).
    Sender,
    /// The receiver behind the proxy (refused, reset, too slow).
    Upstream,
    /// The proxy itself (capacity, internal error).
    Proxy,
}

impl Culprit {
    /// Stable lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Culprit::Sender => "sender",
            Culprit::Upstream => "upstream",
            Culprit::Proxy => "proxy",
        }
    }
}

/// Everything the proxy answers with an error of its own.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route's prefix matches the path.
    #[error("no route matches this path")]
    NoRoute,
    /// `CONNECT` is never proxied.
    #[error("CONNECT is not supported: this is not a forward proxy")]
    ConnectRefused,
    /// An absolute-form request target naming another host.
    #[error("absolute-form request targets for other hosts are refused: this is not an open proxy")]
    ForeignTarget,
    /// `Upgrade` (WebSocket, h2c upgrade) on a webhook route.
    #[error("protocol upgrades are not supported on webhook routes")]
    UpgradeRefused,
    /// Both `Content-Length` and `Transfer-Encoding`: a request-smuggling vector.
    #[error("request has both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    /// `Content-Length` that is not one number.
    #[error("invalid Content-Length header")]
    BadContentLength,
    /// The body is over the route's `max_body`.
    #[error("request body is larger than this route's max_body of {limit} bytes")]
    BodyTooLarge {
        /// The route's `max_body`.
        limit: u64,
    },
    /// The payload is over the receiver's `upstream_limit` and the route rejects such payloads.
    #[error("request body of {size} bytes is larger than the receiver's limit of {limit} bytes")]
    OverUpstreamLimit {
        /// The body size.
        size: u64,
        /// The route's effective upstream limit.
        limit: u64,
    },
    /// The payload is over the receiver's limit and the trim rules could not bring it under.
    #[error(
        "request body of {size} bytes is over the receiver's limit of {limit} bytes and could not be trimmed: {reason}"
    )]
    TrimFailed {
        /// The body size.
        size: u64,
        /// The effective upstream limit.
        limit: u64,
        /// Why trimming failed.
        reason: String,
    },
    /// A compressed body decodes to more than `max_body` or past the ratio guard.
    #[error("compressed request body decodes to more than {limit} bytes")]
    DecompressionBomb {
        /// The decoded-size cap that was hit.
        limit: u64,
    },
    /// The sender's signature is missing or wrong (`[routes.verify]`).
    #[error("request signature refused: {0}")]
    Unauthorized(&'static str),
    /// No body bytes for `body_idle_timeout`.
    #[error("no request body bytes received for {0:?}")]
    BodyIdleTimeout(Duration),
    /// The body did not complete within `body_timeout`.
    #[error("request body not complete within {0:?}")]
    BodyTimeout(Duration),
    /// The sender's body framing was broken, or the sender went away mid-body.
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    /// The body arrived slower than `body_min_rate` while the proxy was under pressure, or
    /// the connection was closed to make room for a new one.
    #[error("request body too slow while the proxy is short of connections (body_min_rate)")]
    BodyTooSlow,
    /// The chunked framing of the body was malformed.
    #[error("malformed request body framing: {0}")]
    BadFraming(String),
    /// The sender closed the connection before the request was complete (logged as nginx's
    /// 499; no response can reach the sender).
    #[error("the sender closed the connection before the request was complete")]
    ClientAbort,
    /// The request head is over `max_header_bytes` or has too many fields (refused by hyper).
    #[error("request header section too large")]
    HeaderTooLarge,
    /// The request head could not be parsed (refused by hyper: obs-fold, NUL in a value, ...).
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// The request head was not complete within `header_read_timeout`.
    #[error("request headers not complete within the header timeout")]
    HeaderTimeout,
    /// Every connection slot is taken by a healthy connection: the new one is refused.
    #[error("the proxy is at its connection limit: retry later")]
    OverCapacity,
    /// The sender's address already has `max_connections_per_ip` connections open.
    #[error("too many connections from this address: retry later")]
    PerIpLimit,
    /// The upstream refused the connection, or the TLS handshake failed.
    #[error("upstream connection failed: {0}")]
    UpstreamConnect(String),
    /// The upstream connection broke before a complete response.
    #[error("upstream failed: {0}")]
    UpstreamBroken(String),
    /// The receiver reset the connection and no answer could be read from it.
    #[error("the receiver reset the connection without an answer: {0}")]
    UpstreamReset(String),
    /// No upstream connection within `connect_timeout`.
    #[error("upstream connect timed out after {0:?}")]
    UpstreamConnectTimeout(Duration),
    /// No upstream response headers within `response_timeout`.
    #[error("upstream response timed out after {0:?}")]
    UpstreamResponseTimeout(Duration),
    /// A spool route could not store an undeliverable payload (spool full, disk low, I/O).
    #[error("the payload could not be delivered nor stored: {0}; retry later")]
    SpoolUnavailable(String),
    /// The global buffer budget is full.
    #[error("the proxy's buffer budget is full: retry later")]
    BufferBudgetExhausted,
    /// A bug or resource failure in the proxy.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The status the sender gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::ConnectRefused => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::ForeignTarget
            | ProxyError::UpgradeRefused
            | ProxyError::AmbiguousLength
            | ProxyError::BadContentLength
            | ProxyError::BodyRead(_)
            | ProxyError::BadFraming(_)
            | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientAbort => CLIENT_CLOSED_REQUEST,
            ProxyError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge { .. }
            | ProxyError::OverUpstreamLimit { .. }
            | ProxyError::TrimFailed { .. }
            | ProxyError::DecompressionBomb { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyIdleTimeout(_)
            | ProxyError::BodyTimeout(_)
            | ProxyError::BodyTooSlow
            | ProxyError::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamBroken(_)
            | ProxyError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamConnectTimeout(_) | ProxyError::UpstreamResponseTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::BufferBudgetExhausted
            | ProxyError::SpoolUnavailable(_)
            | ProxyError::OverCapacity
            | ProxyError::PerIpLimit => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code for the JSON error body and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::ConnectRefused => "connect_refused",
            ProxyError::Unauthorized("expired") => "signature_expired",
            ProxyError::Unauthorized(_) => "signature_refused",
            ProxyError::ForeignTarget => "foreign_target",
            ProxyError::UpgradeRefused => "upgrade_refused",
            ProxyError::AmbiguousLength => "ambiguous_length",
            ProxyError::BadContentLength => "bad_content_length",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::OverUpstreamLimit { .. } => "over_upstream_limit",
            ProxyError::TrimFailed { .. } => "trim_failed",
            ProxyError::DecompressionBomb { .. } => "decompression_bomb",
            ProxyError::BodyIdleTimeout(_) => "body_idle_timeout",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::BodyRead(_) => "body_read_failed",
            ProxyError::BodyTooSlow => "body_too_slow",
            ProxyError::BadFraming(_) => "bad_framing",
            ProxyError::ClientAbort => "client_abort",
            ProxyError::HeaderTooLarge => "header_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HeaderTimeout => "header_timeout",
            ProxyError::OverCapacity => "over_capacity",
            ProxyError::PerIpLimit => "per_ip_limit",
            ProxyError::UpstreamConnect(_) => "upstream_connect_failed",
            ProxyError::UpstreamBroken(_) => "upstream_failed",
            ProxyError::UpstreamReset(_) => "upstream_reset",
            ProxyError::UpstreamConnectTimeout(_) => "upstream_connect_timeout",
            ProxyError::UpstreamResponseTimeout(_) => "upstream_response_timeout",
            ProxyError::BufferBudgetExhausted => "buffer_budget_exhausted",
            ProxyError::SpoolUnavailable(_) => "spool_unavailable",
            ProxyError::Internal(_) => "internal_error",
        }
    }

    /// Who caused it.
    pub fn culprit(&self) -> Culprit {
        match self {
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamBroken(_)
            | ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamConnectTimeout(_)
            | ProxyError::UpstreamResponseTimeout(_) => Culprit::Upstream,
            ProxyError::BufferBudgetExhausted
            | ProxyError::SpoolUnavailable(_)
            | ProxyError::OverCapacity
            | ProxyError::Internal(_) => Culprit::Proxy,
            _ => Culprit::Sender,
        }
    }

    /// The 413 incident kind this error records, if it is a size incident.
    pub fn incident_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::BodyTooLarge { .. } => Some("over_max_body"),
            ProxyError::OverUpstreamLimit { .. } | ProxyError::TrimFailed { .. } => {
                Some("over_upstream_limit")
            }
            ProxyError::DecompressionBomb { .. } => Some("over_max_body"),
            ProxyError::BufferBudgetExhausted => Some("buffer_budget_exhausted"),
            _ => None,
        }
    }

    /// Whether the connection must be closed after the response (the request body may be
    /// unread, or the framing cannot be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::AmbiguousLength
                | ProxyError::BadContentLength
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::OverUpstreamLimit { .. }
                | ProxyError::DecompressionBomb { .. }
                | ProxyError::BodyIdleTimeout(_)
                | ProxyError::BodyTimeout(_)
                | ProxyError::BodyRead(_)
                | ProxyError::UpgradeRefused
                | ProxyError::ForeignTarget
                | ProxyError::BufferBudgetExhausted
                | ProxyError::BodyTooSlow
                | ProxyError::BadFraming(_)
                | ProxyError::ClientAbort
                | ProxyError::HeaderTooLarge
                | ProxyError::BadRequest(_)
                | ProxyError::HeaderTimeout
                | ProxyError::OverCapacity
                | ProxyError::PerIpLimit
        )
    }

    /// `Retry-After` seconds to suggest, for errors that are worth retrying.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ProxyError::BufferBudgetExhausted
            | ProxyError::OverCapacity
            | ProxyError::PerIpLimit => Some(1),
            ProxyError::SpoolUnavailable(_) => Some(30),
            _ => None,
        }
    }

    /// The short JSON body the sender gets.
    pub fn json_body(&self, request_id: &str) -> String {
        serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        })
        .to_string()
    }
}

/// What hyper refused on a connection before any request reached the service (an oversized
/// or malformed head, a head that timed out, a sender gone mid-head), as the error the access
/// log and the metrics name. `None`: nothing was refused (a clean close, an I/O error after
/// the last response, a shutdown).
pub fn connection_refusal(err: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Some(ProxyError::HeaderTooLarge);
            }
            if h.is_parse() || h.is_parse_status() {
                return Some(ProxyError::BadRequest(h.to_string()));
            }
            if h.is_timeout() {
                return Some(ProxyError::HeaderTimeout);
            }
            if h.is_incomplete_message() {
                return Some(ProxyError::ClientAbort);
            }
            return None;
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_culprits() {
        assert_eq!(ProxyError::NoRoute.status(), 404);
        assert_eq!(ProxyError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(
            ProxyError::BodyTooLarge { limit: 1 }.incident_kind(),
            Some("over_max_body")
        );
        assert_eq!(ProxyError::UpstreamConnect("x".into()).status(), 502);
        assert_eq!(
            ProxyError::UpstreamConnect("x".into()).culprit(),
            Culprit::Upstream
        );
        assert_eq!(
            ProxyError::UpstreamResponseTimeout(Duration::ZERO).status(),
            504
        );
        assert_eq!(ProxyError::BodyIdleTimeout(Duration::ZERO).status(), 408);
        assert_eq!(ProxyError::ConnectRefused.status(), 405);
        let body: serde_json::Value =
            serde_json::from_str(&ProxyError::NoRoute.json_body("rid")).unwrap();
        assert_eq!(body["error"], "no_route");
        assert_eq!(body["request_id"], "rid");
    }
}
