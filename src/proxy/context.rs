//! The one request context the phases pass along `&mut`: what the request is (route, sender,
//! headers, declared size, the receiver limit in force), where it goes ([`Target`]), and what
//! happened to it (body statistics, incidents, the receiver's status), from which
//! [`super::settle`] writes the incidents and the access log fills in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use http::header::{self, HeaderMap, HeaderName};
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
    /// The request came over HTTP/1 (not HTTP/2).
    pub(super) is_h1: bool,
    pub(super) request_id: Arc<str>,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) path_and_query: String,
    pub(super) peer: SocketAddr,
    proto: &'static str,
    /// The `Host` (or `:authority`) the sender used.
    host: Option<String>,
    pub(super) received_at: SystemTime,
    /// The request headers as received (moved into `target` by [`RequestCtx::target_for`]).
    pub(super) headers: HeaderMap,
    pub(super) user_agent: Option<String>,
    pub(super) content_type: Option<String>,
    pub(super) content_encoding: Option<String>,
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
    /// The first bytes of a streamed JSON body, as the frames that carried them (for
    /// incidents' `top_fields`).
    pub(super) head: Option<Arc<std::sync::Mutex<Vec<bytes::Bytes>>>>,
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
    ) -> RequestCtx<'a> {
        let cfg = &route.config;
        let get = |name: HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let units = Policy::of(cfg).map_or(Units::Wire, |p| p.units);
        let limit = shared
            .learned
            .limit(&cfg.name, units, cfg.upstream_limit_bytes);
        if limit != cfg.upstream_limit_bytes {
            tracing::debug!(route = %cfg.name, limit = limit, "using the receiver limit learned from its 413s");
        }
        let is_h1 = parts.version < http::Version::HTTP_2;
        let host = get(header::HOST).or_else(|| parts.uri.authority().map(|a| a.to_string()));
        RequestCtx {
            shared,
            route,
            cfg,
            upstream: conn.upstream.as_deref().filter(|_| is_h1),
            is_h1,
            path: parts.uri.path().to_string(),
            path_and_query: parts.uri.path_and_query().map_or_else(
                || parts.uri.path().to_string(),
                |pq| pq.as_str().to_string(),
            ),
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
            stats: None,
            head: None,
            call_id: None,
            top_fields: Vec::new(),
            incidents: Vec::new(),
            upstream_status: None,
            forwarded_bytes: None,
            upstream_secs: None,
        }
    }

    /// Builds the upstream request: the receiver's URI for the path after the route prefix,
    /// and the headers rewritten for it (hop-by-hop removed, `X-Forwarded-*`, `X-Request-Id`).
    pub(super) fn target_for(&mut self, rest: &str) -> Result<(), ProxyError> {
        let query = self
            .path_and_query
            .split_once('?')
            .map(|(_, q)| q.to_string());
        self.target.uri = forward::upstream_uri(&self.cfg.upstream, rest, query.as_deref())?;
        let mut headers = std::mem::take(&mut self.headers);
        forward::prepare_request_headers(
            &mut headers,
            &ForwardedFor {
                peer: self.peer.ip(),
                proto: self.proto,
                host: self.host.as_deref(),
                request_id: &self.request_id,
                preserve_host: self.cfg.preserve_host,
            },
        );
        self.target.headers = headers;
        Ok(())
    }

    /// The `Idempotency-Key` every attempt of this payload carries: its id from `id_path`
    /// when the body was read, else the request id.
    pub(super) fn idempotency_key(&self) -> String {
        self.call_id
            .clone()
            .unwrap_or_else(|| self.request_id.to_string())
    }

    /// An incident with everything known about the request filled in.
    pub(super) fn incident(&self, kind: Kind) -> Incident {
        let mut inc = Incident::new(kind, self.cfg.name.clone(), self.request_id.to_string());
        inc.method = Some(self.method.to_string());
        inc.path = Some(self.path.clone());
        inc.peer = Some(self.peer.ip());
        inc.user_agent.clone_from(&self.user_agent);
        inc.content_type.clone_from(&self.content_type);
        inc.content_encoding.clone_from(&self.content_encoding);
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
