//! The per-request pipeline, top to bottom: refuse what is not a webhook request, match the
//! route, pre-check the declared length, stream the body through [`LimitedBody`] to the
//! receiver, and relay the receiver's response (or answer with the proxy's own error).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::{Config, OnOversize, RouteConfig};
use crate::error::ProxyError;
use crate::forward::{self, ForwardedFor, UpstreamBody, UpstreamClient};
use crate::limit::{self, BodyError, BodyFailure, BodyLimits, BodyStats, LimitedBody};
use crate::observe::{Exchange, ObservedBody};
use crate::route::RouteTable;

/// The response body type of the proxy.
pub type ProxyBody = ObservedBody<UpstreamBody>;

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The sender's address.
    pub peer: SocketAddr,
    /// The listener's own address.
    pub local: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// One route, ready to serve: its configuration and its pooled upstream client.
pub struct RouteRuntime {
    /// The route's configuration.
    pub config: RouteConfig,
    client: UpstreamClient,
}

/// Everything a request needs, built from one [`Config`]; replaced whole on reload.
pub struct Runtime {
    /// The configuration this runtime was built from.
    pub config: Arc<Config>,
    table: RouteTable,
    routes: Vec<RouteRuntime>,
}

impl Runtime {
    /// Builds the route table and one upstream client per route.
    pub fn new(config: Config) -> Result<Runtime, ProxyError> {
        let table = RouteTable::new(config.routes.iter().map(|r| r.path_prefix.as_str()));
        let routes = config
            .routes
            .iter()
            .map(|r| {
                Ok(RouteRuntime {
                    config: r.clone(),
                    client: forward::build_client(r)?,
                })
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        Ok(Runtime {
            config: Arc::new(config),
            table,
            routes,
        })
    }
}

/// The proxy service: the current [`Runtime`] behind a lock, swapped atomically on reload.
#[derive(Clone)]
pub struct Proxy {
    runtime: Arc<RwLock<Arc<Runtime>>>,
}

impl Proxy {
    /// A proxy serving `runtime`.
    pub fn new(runtime: Runtime) -> Proxy {
        Proxy {
            runtime: Arc::new(RwLock::new(Arc::new(runtime))),
        }
    }

    /// The runtime new requests use.
    pub fn current(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(rt) => rt.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the runtime for new requests; in-flight requests keep theirs.
    pub fn replace(&self, runtime: Runtime) {
        let new = Arc::new(runtime);
        match self.runtime.write() {
            Ok(mut rt) => *rt = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Serves one request.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let rt = self.current();
        let request_id = request_id(req.headers());
        let mut exchange = Exchange::new(
            request_id.clone(),
            req.method().clone(),
            req.uri().path().to_string(),
            conn.peer,
        );
        let is_h1 = req.version() < Version::HTTP_2;
        let mut response = match pipeline(&rt, req, &conn, &mut exchange).await {
            Ok(response) => response,
            Err(err) => error_response(&err, &request_id, is_h1, &mut exchange),
        };
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", id);
        }
        exchange.status = Some(response.status().as_u16());
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, ObservedBody::new(body, exchange))
    }
}

/// The request id: the sender's `X-Request-Id` when it is sane, else a new UUID.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The proxy's own answer: the status from [`ProxyError::status`], a short JSON body, and
/// `Connection: close` when the request body may be unread.
pub fn error_response(
    err: &ProxyError,
    request_id: &str,
    is_h1: bool,
    exchange: &mut Exchange,
) -> Response<UpstreamBody> {
    exchange.set_error(err);
    if err.culprit() == crate::error::Culprit::Sender {
        tracing::debug!(request_id, error = %err, "refused request");
    } else {
        tracing::warn!(request_id, error = %err, "request failed");
    }
    let body = Full::new(Bytes::from(err.json_body(request_id)))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = err.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if is_h1 && err.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = err.retry_after_secs() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if err.status() == http::StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    response
}

/// Whether an absolute-form target names this listener (the only absolute form we accept).
fn targets_us(authority: &http::uri::Authority, local: SocketAddr) -> bool {
    let port = authority.port_u16().unwrap_or(80);
    if port != local.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == local.ip())
}

async fn pipeline(
    rt: &Runtime,
    req: Request<Incoming>,
    conn: &ConnInfo,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let refuse = |body: Incoming, err: ProxyError| {
        limit::linger(body);
        Err(err)
    };
    if parts.method == Method::CONNECT {
        return refuse(body, ProxyError::ConnectRefused);
    }
    if parts.version < Version::HTTP_2
        && let Some(authority) = parts.uri.authority()
        && !targets_us(authority, conn.local)
    {
        return refuse(body, ProxyError::ForeignTarget);
    }
    if parts.headers.contains_key(header::UPGRADE) {
        return refuse(body, ProxyError::UpgradeRefused);
    }
    let Some(found) = rt.table.find(parts.uri.path()) else {
        return refuse(body, ProxyError::NoRoute);
    };
    let route = &rt.routes[found.index];
    let cfg = &route.config;
    exchange.route = Some(cfg.name.clone());

    let declared = match limit::precheck(&parts.headers, cfg.max_body_bytes) {
        Ok(declared) => declared,
        Err(err) => {
            if let ProxyError::BodyTooLarge { limit } = err {
                tracing::warn!(route = %cfg.name, limit, declared = ?parts.headers.get(header::CONTENT_LENGTH), "body over max_body");
            }
            return refuse(body, err);
        }
    };
    let reject_over_limit = cfg.on_oversize == OnOversize::Reject;
    if let (true, Some(limit), Some(size)) = (reject_over_limit, cfg.upstream_limit_bytes, declared)
        && size > limit
    {
        tracing::warn!(route = %cfg.name, limit, size, "body over upstream_limit, rejected");
        return refuse(body, ProxyError::OverUpstreamLimit { size, limit });
    }
    if let (Some(limit), Some(size)) = (cfg.upstream_limit_bytes, declared)
        && size > limit
    {
        tracing::warn!(route = %cfg.name, limit, size, "body over upstream_limit, forwarded as is");
    }

    let server = &rt.config.server;
    let hard_limit = match (reject_over_limit, cfg.upstream_limit_bytes) {
        (true, Some(limit)) => limit.min(cfg.max_body_bytes),
        _ => cfg.max_body_bytes,
    };
    let stats = Arc::new(BodyStats::default());
    exchange.body = Some(stats.clone());
    let limited = LimitedBody::new(
        body,
        BodyLimits {
            max_bytes: hard_limit,
            soft_bytes: cfg.upstream_limit_bytes,
            idle_timeout: server.body_idle_timeout,
            total_timeout: server.body_timeout,
        },
        stats.clone(),
    );

    let uri = forward::upstream_uri(&cfg.upstream, found.rest, parts.uri.query())?;
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    forward::prepare_request_headers(
        &mut parts.headers,
        &ForwardedFor {
            peer: conn.peer.ip(),
            proto: conn.proto,
            host: host.as_deref(),
            request_id: &exchange.request_id,
            preserve_host: cfg.preserve_host,
        },
    );
    let mut upstream_req = Request::new(limited.boxed_unsync());
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = uri;
    *upstream_req.headers_mut() = parts.headers;
    *upstream_req.version_mut() = Version::HTTP_11;

    let sent = route.client.request(upstream_req);
    let result = tokio::select! {
        result = sent => result,
        err = deadline(&stats, cfg.response_timeout, server.body_timeout) => return Err(err),
    };
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            if let Some(failure) = stats.failure() {
                return Err(body_error(failure, cfg, hard_limit, stats.bytes()));
            }
            let err = forward::classify_error(&err, cfg);
            tracing::warn!(route = %cfg.name, error = %err, "upstream request failed");
            return Err(err);
        }
    };
    exchange.upstream_status = Some(response.status().as_u16());
    if !stats.is_complete() {
        tracing::debug!(route = %cfg.name, status = response.status().as_u16(), "receiver answered before the body was complete");
    }
    let (mut parts, body) = response.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        body.map_err(BodyError::new).boxed_unsync(),
    ))
}

/// Resolves with an error when the body stalls past `body_timeout`, or when the receiver sends
/// no response headers within `response_timeout` after the body is complete.
async fn deadline(
    stats: &BodyStats,
    response_timeout: Duration,
    body_timeout: Duration,
) -> ProxyError {
    if tokio::time::timeout(body_timeout, stats.finished())
        .await
        .is_err()
    {
        return ProxyError::BodyTimeout(body_timeout);
    }
    if stats.failure().is_some() {
        // The upstream request fails on its own and reports why.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(response_timeout).await;
    ProxyError::UpstreamResponseTimeout(response_timeout)
}

fn body_error(failure: BodyFailure, cfg: &RouteConfig, hard_limit: u64, seen: u64) -> ProxyError {
    match failure {
        BodyFailure::TooLarge if hard_limit < cfg.max_body_bytes => {
            tracing::warn!(route = %cfg.name, limit = hard_limit, received = seen, "body over upstream_limit, rejected mid-stream");
            ProxyError::OverUpstreamLimit {
                size: seen,
                limit: hard_limit,
            }
        }
        BodyFailure::TooLarge => {
            tracing::warn!(route = %cfg.name, limit = cfg.max_body_bytes, received = seen, "body over max_body mid-stream, upstream request aborted");
            limit::failure_to_error(failure, cfg.max_body_bytes)
        }
        other => limit::failure_to_error(other, cfg.max_body_bytes),
    }
}
