//! The one request context the phases pass along `&mut`: what the request is (route, sender,
//! headers, declared size, the receiver limit in force), where it goes ([`Target`]), and what
//! happened to it (body statistics, incidents, the receiver's status), from which
//! [`super::settle`] writes the incidents and the access log fills in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use super::{ConnInfo, RouteRuntime, Runtime, Shared};
use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::forward::{self, ConnUpstream, ForwardedFor, Target};
use crate::incident::{Action, FieldBytes, Incident, Kind};
use crate::limit::{BodyLimits, BodyStats};
use crate::prepare::Policy;
use crate::trim::payload::Units;

/// One request on its way through the phases.
pub(super) struct RequestCtx<'a> {
    pub(super) shared: &'a Shared,
    pub(super) route: &'a RouteRuntime,
    pub(super) cfg: &'a RouteConfig,
    /// The sender connection's own upstream connection (HTTP/1 senders).
    pub(super) upstream: Option<&'a ConnUpstream>,
    /// The sender's connection as the shedding logic sees it (see [`crate::shed`]).
    pub(super) conn_track: Option<&'a Arc<crate::shed::ConnTrack>>,
    /// The request came over HTTP/1 (not HTTP/2).
    pub(super) is_h1: bool,
    pub(super) request_id: Arc<str>,
    /// The request id as a header value, built once: the receiver's `X-Request-Id` and
    /// `Idempotency-Key` and the sender's `X-Request-Id` share it.
    pub(super) request_id_header: Option<HeaderValue>,
    pub(super) method: Method,
    /// The path and query as received; the path is its first `path_len` bytes.
    pub(super) path_and_query: String,
    path_len: usize,
    pub(super) peer: SocketAddr,
    proto: &'static str,
    /// The `:authority` the sender used when it sent no `Host` header (HTTP/2); a `Host`
    /// header is read from `headers` where it is needed.
    host: Option<String>,
    pub(super) received_at: SystemTime,
    /// The request headers as received (moved into `target` by [`RequestCtx::target_for`]).
    pub(super) headers: HeaderMap,
    /// Shared with the request's headers, not copied (read as text where they are used).
    user_agent: Option<HeaderValue>,
    content_type: Option<HeaderValue>,
    content_encoding: Option<HeaderValue>,
    /// The declared `Content-Length`.
    pub(super) declared: Option<u64>,
    /// The receiver limit in force (configured, or learned from its 413s), in `units`.
    pub(super) limit: Option<u64>,
    /// What `limit` counts.
    pub(super) units: Units,
    pub(super) body_timeout: Duration,
    pub(super) idle_timeout: Duration,
    /// Where the request goes, with headers rewritten for the receiver.
    pub(super) target: Target,
    // What happened.
    pub(super) stats: Option<Arc<BodyStats>>,
    /// Whether the streamed body keeps its first bytes in `stats` (a JSON body's head, for
    /// incidents' `top_fields`).
    pub(super) head_sampled: bool,
    pub(super) call_id: Option<String>,
    pub(super) top_fields: Vec<FieldBytes>,
    pub(super) incidents: Vec<Incident>,
    pub(super) upstream_status: Option<u16>,
    pub(super) forwarded_bytes: Option<u64>,
    pub(super) upstream_secs: Option<f64>,
}

impl<'a> RequestCtx<'a> {
    pub(super) fn new(
        rt: &'a Runtime,
        shared: &'a Shared,
        route: &'a RouteRuntime,
        parts: Parts,
        conn: &'a ConnInfo,
        request_id: Arc<str>,
        request_id_header: Option<HeaderValue>,
    ) -> RequestCtx<'a> {
        let cfg = &route.config;
        let get = |name: HeaderName| parts.headers.get(name).cloned();
        let units = Policy::of(cfg).map_or(Units::Wire, |p| p.units);
        let limit = shared
            .learned
            .limit(&cfg.name, units, cfg.upstream_limit_bytes);
        if limit != cfg.upstream_limit_bytes {
            tracing::debug!(route = %cfg.name, limit = limit, "using the receiver limit learned from its 413s");
        }
        let is_h1 = parts.version < http::Version::HTTP_2;
        let host = if parts.headers.contains_key(header::HOST) {
            None
        } else {
            parts.uri.authority().map(|a| a.to_string())
        };
        let path_and_query = parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        );
        RequestCtx {
            shared,
            route,
            cfg,
            upstream: conn.upstream.as_deref().filter(|_| is_h1),
            conn_track: conn.track.as_ref(),
            is_h1,
            path_len: parts.uri.path().len(),
            path_and_query,
            peer: conn.peer,
            proto: conn.proto,
            host,
            received_at: SystemTime::now(),
            user_agent: get(header::USER_AGENT),
            content_type: get(header::CONTENT_TYPE),
            content_encoding: get(header::CONTENT_ENCODING),
            declared: None,
            limit,
            units,
            body_timeout: rt.config.server.body_timeout,
            idle_timeout: rt.config.server.body_idle_timeout,
            target: Target {
                method: parts.method.clone(),
                uri: cfg.upstream.clone(),
                headers: HeaderMap::new(),
            },
            method: parts.method,
            headers: parts.headers,
            request_id,
            request_id_header,
            stats: None,
            head_sampled: false,
            call_id: None,
            top_fields: Vec::new(),
            incidents: Vec::new(),
            upstream_status: None,
            forwarded_bytes: None,
            upstream_secs: None,
        }
    }

    /// The request's path (without its query).
    pub(super) fn path(&self) -> &str {
        &self.path_and_query[..self.path_len]
    }

    /// The `Content-Type` as received (when it is text).
    pub(super) fn content_type(&self) -> Option<&str> {
        text(&self.content_type)
    }

    /// The `Content-Encoding` as received (when it is text).
    pub(super) fn content_encoding(&self) -> Option<&str> {
        text(&self.content_encoding)
    }

    /// Builds the upstream request: the receiver's URI for the path after the route prefix,
    /// and the headers rewritten for it (hop-by-hop removed, `X-Forwarded-*`, `X-Request-Id`).
    pub(super) fn target_for(&mut self, rest: &str) -> Result<(), ProxyError> {
        // Borrowed, not copied; searched byte by byte (`?` is ASCII, so the split is on a
        // char boundary).
        let pq = self.path_and_query.as_str();
        let query = pq.bytes().position(|b| b == b'?').map(|at| &pq[at + 1..]);
        self.target.uri = forward::upstream_uri(&self.cfg.upstream, rest, query)?;
        let mut headers = std::mem::take(&mut self.headers);
        forward::prepare_request_headers(
            &mut headers,
            &ForwardedFor {
                peer: self.peer.ip(),
                proto: self.proto,
                host: self.host.as_deref(),
                request_id: self.request_id_header.as_ref(),
                preserve_host: self.cfg.preserve_host,
                upstream_host: self.route.upstream_host(),
            },
        );
        self.target.headers = headers;
        Ok(())
    }

    /// Sets the `Idempotency-Key` every attempt of this payload carries on the upstream
    /// request (unless the sender set one): its id from `id_path` when the body was read,
    /// else the request id.
    pub(super) fn set_idempotency_key(&mut self) {
        let key = match &self.call_id {
            Some(id) => HeaderValue::from_str(id).ok(),
            None => self.request_id_header.clone(),
        };
        if let Some(key) = key {
            crate::deliver::set_idempotency_key(&mut self.target.headers, key);
        }
    }

    /// An incident with everything known about the request filled in.
    pub(super) fn incident(&self, kind: Kind) -> Incident {
        let mut inc = Incident::new(kind, self.cfg.name.clone(), self.request_id.to_string());
        inc.method = Some(self.method.to_string());
        inc.path = Some(self.path().to_string());
        inc.peer = Some(self.peer.ip());
        inc.user_agent = text(&self.user_agent).map(str::to_string);
        inc.content_type = self.content_type().map(str::to_string);
        inc.content_encoding = self.content_encoding().map(str::to_string);
        inc.content_length = self.declared;
        inc.max_body = Some(self.cfg.max_body_bytes);
        inc.upstream_limit = self.limit;
        inc.call_id.clone_from(&self.call_id);
        inc.top_fields.clone_from(&self.top_fields);
        inc
    }

    /// The payload is over the receiver's limit and is refused without contacting it.
    pub(super) fn over_limit_refused(&mut self, size: u64, untrimmable: Option<String>) {
        let mut inc = self.incident(Kind::OverUpstreamLimit);
        inc.action = Some(if untrimmable.is_some() {
            Action::TrimFailed
        } else {
            Action::Rejected
        });
        if self.declared != Some(size) {
            inc.body_bytes = Some(size);
        }
        inc.reason = untrimmable;
        self.incidents.push(inc);
    }

    /// Records a `buffer_budget_exhausted` incident and names the error (503).
    pub(super) fn budget_exhausted(&mut self, bytes: u64) -> ProxyError {
        let mut inc = self.incident(Kind::BufferBudgetExhausted);
        inc.body_bytes = Some(bytes);
        inc.reason = Some(format!(
            "{} of {} bytes in use",
            self.shared.budget.in_use(),
            self.shared.budget.limit()
        ));
        self.incidents.push(inc);
        ProxyError::BufferBudgetExhausted
    }

    /// The body limits for a body cut off past `hard_limit`.
    pub(super) fn limits(&self, hard_limit: u64) -> BodyLimits {
        BodyLimits {
            max_bytes: hard_limit,
            soft_bytes: self.limit,
            idle_timeout: self.idle_timeout,
            total_timeout: self.body_timeout,
        }
    }
}

/// A header value as text, when it is (visible ASCII).
fn text(value: &Option<HeaderValue>) -> Option<&str> {
    value.as_ref().and_then(|v| v.to_str().ok())
}
