//! The per-request pipeline, top to bottom: refuse what is not a webhook request, match the
//! route, pre-check the declared length, then either stream the body through [`LimitedBody`]
//! to the receiver or — only when the payload may need trimming — buffer it under the global
//! budget, trim it, and send it with a `Content-Length`. The receiver's response is relayed;
//! every size incident on the way is recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::buffer::{self, BufferBudget, CollectError, Reservation};
use crate::config::{Config, OnOversize, OnTrimFailure, RouteConfig, TrimConfig};
use crate::deliver::{self, SpoolState};
use crate::error::ProxyError;
use crate::forward::{
    self, ConnUpstream, ForwardedFor, UpstreamBody, UpstreamClient, UpstreamError,
};
use crate::incident::{
    self, Action, FieldBytes, Incident, IncidentLog, Kind, LimitLearner, Removed, Retry,
};
use crate::limit::{self, BodyError, BodyFailure, BodyLimits, BodyStats, LimitedBody};
use crate::metrics::Metrics;
use crate::observe::{Exchange, ObservedBody};
use crate::route::RouteTable;
use crate::trim::payload::{self, Encoding, ShrinkError, Shrunk};

mod buffered;
mod relay;
mod spooling;

use buffered::*;
use relay::*;
use spooling::*;

/// The response body type of the proxy.
pub type ProxyBody = ObservedBody<UpstreamBody>;

/// Default capacity of the incident queue.
pub const INCIDENT_QUEUE: usize = 1024;

/// How many bytes of a receiver's 413 body are read for its fingerprint and snippet.
const SNIFF_BYTES: usize = 4096;

/// Facts about the connection a request arrived on.
#[derive(Clone)]
pub struct ConnInfo {
    /// The sender's address.
    pub peer: SocketAddr,
    /// The listener's own address.
    pub local: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The request carried both `Content-Length` and `Transfer-Encoding` (see [`crate::framing`]).
    pub framing_conflict: bool,
    /// The connection's own upstream connection (HTTP/1 senders only; see [`ConnUpstream`]).
    pub upstream: Option<Arc<ConnUpstream>>,
}

/// One route, ready to serve: its configuration and its pooled upstream client (used for HTTPS
/// receivers, HTTP/2 senders and redelivery; see [`ConnUpstream`] for the rest).
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

impl Runtime {
    /// The route with this name.
    pub fn route_by_name(&self, name: &str) -> Option<&RouteRuntime> {
        self.routes.iter().find(|r| r.config.name == name)
    }
}

impl RouteRuntime {
    /// The route's pooled upstream client.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }
}

/// State that outlives a configuration reload: the buffer budget, the incident log and what
/// was learned about receivers' limits.
pub struct Shared {
    /// Memory all buffered bodies share.
    pub budget: Arc<BufferBudget>,
    /// The incident log.
    pub incidents: IncidentLog,
    /// Learned receiver limits, per route.
    pub learner: Arc<LimitLearner>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Connections open right now (public listener).
    pub open_connections: Arc<AtomicU64>,
    /// The spool, when a route uses it.
    pub spool: Option<SpoolState>,
}

impl Shared {
    /// Budget from `[server] buffer_budget`, the incident log at `[incidents] path` (its writer
    /// task starts on the current tokio runtime), and limits learned from that log.
    pub fn for_config(config: &Config) -> Result<Shared, ProxyError> {
        let spool = if config.spool.used {
            Some(SpoolState::open(&config.spool).map_err(|e| {
                ProxyError::Internal(format!(
                    "cannot open the spool at {}: {e}",
                    config.spool.dir.display()
                ))
            })?)
        } else {
            None
        };
        let path = config.incidents.path.clone();
        let metrics = Metrics::new();
        for route in &config.routes {
            metrics.init_route(&route.name);
        }
        Ok(Shared {
            budget: BufferBudget::new(config.server.buffer_budget_bytes),
            learner: Arc::new(incident::learn::rebuild_from_log(&path)),
            incidents: IncidentLog::start(path, INCIDENT_QUEUE),
            metrics,
            open_connections: Arc::new(AtomicU64::new(0)),
            spool,
        })
    }

    /// The values the metrics endpoint reads at scrape time.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            incidents_dropped: self.incidents.dropped(),
            buffer_in_use_bytes: self.budget.in_use(),
            buffer_budget_bytes: self.budget.limit(),
            open_connections: self.open_connections.load(Ordering::Relaxed),
            spool_depth: self.spool.as_ref().map_or_else(Vec::new, |s| {
                crate::spool::State::ALL
                    .iter()
                    .map(|state| (state.as_str().to_string(), s.spool.depth(*state) as u64))
                    .collect()
            }),
            spool_routes: self.spool.as_ref().map_or_else(Vec::new, |s| {
                crate::metrics::spool_route_readings(&s.spool, std::time::SystemTime::now())
            }),
        }
    }
}

/// The proxy service: the current [`Runtime`] behind a lock, swapped atomically on reload.
#[derive(Clone)]
pub struct Proxy {
    runtime: Arc<RwLock<Arc<Runtime>>>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy serving `runtime` with `shared` state.
    pub fn new(runtime: Runtime, shared: Shared) -> Proxy {
        Proxy {
            runtime: Arc::new(RwLock::new(Arc::new(runtime))),
            shared: Arc::new(shared),
        }
    }

    /// Builds the runtime and the shared state for `config` (inside a tokio runtime).
    pub fn start(config: Config) -> Result<Proxy, ProxyError> {
        let shared = Shared::for_config(&config)?;
        Ok(Proxy::new(Runtime::new(config)?, shared))
    }

    /// The state shared across reloads.
    pub fn shared(&self) -> &Shared {
        &self.shared
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
        exchange.metrics = Some(self.shared.metrics.clone());
        let is_h1 = req.version() < Version::HTTP_2;
        let mut response = match pipeline(&rt, &self.shared, req, &conn, &mut exchange).await {
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
pub fn request_id(headers: &HeaderMap) -> String {
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
    let mut response = Response::new(full_body(Bytes::from(err.json_body(request_id))));
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

fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
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

/// The request headers the pipeline and incidents look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `User-Agent`
    pub user_agent: Option<String>,
    /// `Content-Type`
    pub content_type: Option<String>,
    /// `Content-Encoding`
    pub content_encoding: Option<String>,
}

impl Facts {
    fn from_headers(headers: &HeaderMap) -> Facts {
        let get = |name: HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Facts {
            user_agent: get(header::USER_AGENT),
            content_type: get(header::CONTENT_TYPE),
            content_encoding: get(header::CONTENT_ENCODING),
        }
    }
}

/// How one request's body will be handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Refuse now: the declared length is over the receiver's limit and the route rejects.
    Reject {
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
        /// Why a trim route cannot trim this payload, if that is the reason.
        untrimmable: Option<String>,
    },
    /// Stream it, cut off past `hard_limit`.
    Stream {
        /// The limit that fails the body (`max_body`, or the receiver's limit when rejecting).
        hard_limit: u64,
        /// Why a trim route streams instead of trimming (not JSON, unknown encoding), if so.
        untrimmable: Option<String>,
    },
    /// Buffer it (within `max_body` and the budget), verify the sender's signature and run
    /// the trim stage, as the route asks.
    Buffer {
        /// The body's `Content-Encoding` (`None`: one the proxy cannot decode).
        encoding: Option<Encoding>,
    },
}

/// Decides how to handle a body (pure): stream unless the route trims and the payload may be
/// over the receiver's `limit` (unknown length, declared over, or compressed with the limit
/// counting decoded bytes); never buffer on a route that does not trim.
pub fn plan(cfg: &RouteConfig, facts: &Facts, declared: Option<u64>, limit: Option<u64>) -> Plan {
    if cfg.on_oversize == OnOversize::Reject
        && let (Some(size), Some(l)) = (declared, limit)
        && size > l
    {
        return Plan::Reject {
            size,
            limit: l,
            untrimmable: None,
        };
    }
    if cfg.verify.is_some() || cfg.spool || cfg.dead_letter {
        // The signature must be checked before anything is forwarded; a spool route keeps
        // the body until the receiver has taken it.
        return Plan::Buffer {
            encoding: payload::encoding(facts.content_encoding.as_deref()).ok(),
        };
    }
    let over = |size: Option<u64>| matches!((size, limit), (Some(s), Some(l)) if s > l);
    let trim = cfg
        .trim
        .as_ref()
        .filter(|_| cfg.on_oversize == OnOversize::Trim);
    let (reject, untrimmable) = match (trim, limit) {
        (Some(tc), Some(_)) => {
            let problem = if !payload::is_json(facts.content_type.as_deref()) {
                Some(format!(
                    "not JSON (content-type {})",
                    facts.content_type.as_deref().unwrap_or("missing")
                ))
            } else {
                match payload::encoding(facts.content_encoding.as_deref()) {
                    Err(enc) => Some(format!("unsupported content-encoding {enc}")),
                    Ok(encoding) => {
                        let counts_decoded = tc.limit_counts == crate::config::LimitCounts::Decoded;
                        if declared.is_none()
                            || over(declared)
                            || (encoding != Encoding::Identity && counts_decoded)
                            || cfg.retry_on_413
                        {
                            return Plan::Buffer {
                                encoding: Some(encoding),
                            };
                        }
                        None
                    }
                }
            };
            let reject = problem.is_some() && tc.on_failure == OnTrimFailure::Reject && !tc.dry_run;
            (reject, problem)
        }
        _ => (cfg.on_oversize == OnOversize::Reject, None),
    };
    match (reject, limit) {
        (true, Some(l)) if over(declared) => Plan::Reject {
            size: declared.unwrap_or(0),
            limit: l,
            untrimmable,
        },
        (true, Some(l)) => Plan::Stream {
            hard_limit: l.min(cfg.max_body_bytes),
            untrimmable,
        },
        _ => Plan::Stream {
            hard_limit: cfg.max_body_bytes,
            untrimmable,
        },
    }
}

/// What the pipeline knows about one request, for incidents and decisions.
struct Ctx<'a> {
    shared: &'a Shared,
    cfg: &'a RouteConfig,
    client: &'a UpstreamClient,
    /// The downstream connection's own upstream connection, if it has one.
    upstream: Option<&'a ConnUpstream>,
    request_id: String,
    method: Method,
    path: String,
    peer: SocketAddr,
    facts: Facts,
    declared: Option<u64>,
    /// The receiver limit in force: configured, or learned from its 413s.
    limit: Option<u64>,
    body_timeout: Duration,
    idle_timeout: Duration,
    /// Time to the receiver's response headers, of the last attempt (nanoseconds).
    upstream_nanos: AtomicU64,
    /// When the request arrived.
    received_at: SystemTime,
    /// The request's path and query, as received.
    path_and_query: String,
    /// HTTP/1 (errors may close the connection).
    is_h1: bool,
}

impl Ctx<'_> {
    /// An incident with everything known about the request filled in.
    fn incident(&self, kind: Kind) -> Incident {
        let mut inc = Incident::new(kind, self.cfg.name.clone(), self.request_id.clone());
        inc.method = Some(self.method.to_string());
        inc.path = Some(self.path.clone());
        inc.peer = Some(self.peer.ip());
        inc.user_agent = self.facts.user_agent.clone();
        inc.content_type = self.facts.content_type.clone();
        inc.content_encoding = self.facts.content_encoding.clone();
        inc.content_length = self.declared;
        inc.max_body = Some(self.cfg.max_body_bytes);
        inc.upstream_limit = self.limit;
        inc
    }

    fn record(&self, incident: Incident) {
        self.shared
            .metrics
            .incident(&self.cfg.name, incident.kind.as_str());
        self.shared.incidents.record(incident);
    }

    /// Records a `buffer_budget_exhausted` incident and names the error (503).
    fn budget_exhausted(&self, bytes: u64) -> ProxyError {
        tracing::warn!(route = %self.cfg.name, in_use = self.shared.budget.in_use(), budget = self.shared.budget.limit(), "buffer budget exhausted");
        let mut inc = self.incident(Kind::BufferBudgetExhausted);
        inc.body_bytes = Some(bytes);
        self.record(inc);
        ProxyError::BufferBudgetExhausted
    }

    fn limits(&self, hard_limit: u64) -> BodyLimits {
        BodyLimits {
            max_bytes: hard_limit,
            soft_bytes: self.limit,
            idle_timeout: self.idle_timeout,
            total_timeout: self.body_timeout,
        }
    }
}

/// What the JSON body says, for incidents (only when the body was read).
#[derive(Debug, Default, Clone)]
struct BodyFacts {
    call_id: Option<String>,
    top_fields: Vec<FieldBytes>,
}

impl BodyFacts {
    fn read(doc: &crate::trim::Document<'_>, id_path: &str) -> BodyFacts {
        BodyFacts {
            call_id: doc.string_at(id_path),
            top_fields: doc
                .top_fields(incident::TOP_FIELDS)
                .into_iter()
                .map(|f| FieldBytes {
                    path: f.path,
                    bytes: f.bytes as u64,
                })
                .collect(),
        }
    }

    fn fill(&self, inc: &mut Incident) {
        inc.call_id.clone_from(&self.call_id);
        inc.top_fields.clone_from(&self.top_fields);
    }
}

async fn pipeline(
    rt: &Runtime,
    shared: &Shared,
    req: Request<Incoming>,
    conn: &ConnInfo,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let refuse = |body: Incoming, err: ProxyError| {
        limit::linger(body);
        Err(err)
    };
    if conn.framing_conflict {
        return refuse(body, ProxyError::AmbiguousLength);
    }
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
    let learned = shared.learner.bracket(&cfg.name);
    let mut ctx = Ctx {
        shared,
        cfg,
        client: &route.client,
        upstream: conn
            .upstream
            .as_deref()
            .filter(|_| parts.version < Version::HTTP_2),
        request_id: exchange.request_id.clone(),
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        peer: conn.peer,
        facts: Facts::from_headers(&parts.headers),
        declared: None,
        limit: incident::effective_limit(cfg.upstream_limit_bytes, &learned),
        body_timeout: rt.config.server.body_timeout,
        idle_timeout: rt.config.server.body_idle_timeout,
        upstream_nanos: AtomicU64::new(0),
        received_at: SystemTime::now(),
        path_and_query: parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        ),
        is_h1: parts.version < Version::HTTP_2,
    };
    if ctx.limit != cfg.upstream_limit_bytes {
        tracing::debug!(route = %cfg.name, limit = ctx.limit, "using the receiver limit learned from its 413s");
    }

    let declared = match limit::precheck(&parts.headers, cfg.max_body_bytes) {
        Ok(declared) => declared,
        Err(err) => {
            if let ProxyError::BodyTooLarge { limit } = err {
                tracing::warn!(route = %cfg.name, limit, declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()), "body over max_body");
                let mut inc = ctx.incident(Kind::OverMaxBody);
                inc.content_length = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                inc.body_bytes = Some(0);
                ctx.record(inc);
            }
            return refuse(body, err);
        }
    };
    ctx.declared = declared;

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
    let target = Target {
        method: parts.method,
        uri,
        headers: parts.headers,
    };

    match plan(cfg, &ctx.facts, declared, ctx.limit) {
        Plan::Reject {
            size,
            limit,
            untrimmable,
        } => {
            tracing::warn!(route = %cfg.name, limit, size, reason = untrimmable.as_deref(), "body over upstream_limit, rejected");
            let mut inc = ctx.incident(Kind::OverUpstreamLimit);
            inc.action = Some(if untrimmable.is_some() {
                Action::TrimFailed
            } else {
                Action::Rejected
            });
            inc.reason = untrimmable;
            ctx.record(inc);
            refuse(body, ProxyError::OverUpstreamLimit { size, limit })
        }
        Plan::Stream {
            hard_limit,
            untrimmable,
        } => stream(&ctx, target, body, hard_limit, untrimmable, exchange).await,
        // Boxed: the buffered path's state is large, and most requests stream; inline, it
        // would make every request's future (allocated and moved per request) as large.
        Plan::Buffer { encoding } => {
            Box::pin(buffered(&ctx, target, body, encoding, exchange)).await
        }
    }
}

/// Where the request goes: method, upstream URI, rewritten headers.
#[derive(Clone)]
struct Target {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Target {
    /// The same request with a body of exactly `len` bytes: `Content-Length` set, no
    /// `Transfer-Encoding` (some receivers silently truncate chunked bodies over their limit).
    fn with_content_length(mut self, len: u64) -> Target {
        self.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        self.headers.remove(header::TRANSFER_ENCODING);
        self
    }
}

/// Why sending upstream failed.
enum SendError {
    /// The request body failed (size, timeouts, sender).
    Body(BodyFailure),
    /// The proxy gave up (response or body deadline).
    Proxy(ProxyError),
    /// The upstream failed.
    Upstream(ProxyError),
}

async fn send(
    ctx: &Ctx<'_>,
    target: Target,
    body: UpstreamBody,
    stats: &BodyStats,
) -> Result<Response<Incoming>, SendError> {
    let mut req = Request::new(body);
    *req.method_mut() = target.method;
    *req.uri_mut() = target.uri;
    *req.headers_mut() = target.headers;
    *req.version_mut() = Version::HTTP_11;
    let started = tokio::time::Instant::now();
    let sent = async {
        match ctx.upstream {
            Some(upstream) => {
                upstream
                    .request(ctx.client, req, ctx.cfg.connect_timeout)
                    .await
            }
            None => ctx.client.request(req).await.map_err(UpstreamError::Pooled),
        }
    };
    let result = tokio::select! {
        result = sent => result,
        err = deadline(stats, ctx.cfg.response_timeout, ctx.body_timeout) => return Err(SendError::Proxy(err)),
    };
    ctx.upstream_nanos
        .store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    match result {
        Ok(response) => Ok(response),
        Err(err) => {
            if let Some(failure) = stats.failure() {
                return Err(SendError::Body(failure));
            }
            let err = forward::classify(&err, ctx.cfg);
            tracing::warn!(route = %ctx.cfg.name, error = %err, "upstream request failed");
            Err(SendError::Upstream(err))
        }
    }
}

/// Resolves with an error when the body stalls past `body_timeout`, or when the receiver sends
/// no response headers within `response_timeout` after the body is complete.
async fn deadline(
    stats: &BodyStats,
    response_timeout: Duration,
    body_timeout: Duration,
) -> ProxyError {
    if !stats.is_complete()
        && tokio::time::timeout(body_timeout, stats.finished())
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

/// Streams the body to the receiver, never holding it whole.
async fn stream(
    ctx: &Ctx<'_>,
    target: Target,
    body: Incoming,
    hard_limit: u64,
    untrimmable: Option<String>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let over_known = matches!((ctx.declared, ctx.limit), (Some(s), Some(l)) if s > l);
    if over_known {
        // Forwarded as is (forward mode, or a trim route that cannot trim this payload).
        tracing::warn!(route = %cfg.name, limit = ctx.limit, size = ctx.declared, reason = untrimmable.as_deref(), "body over upstream_limit, forwarded as is");
        let mut inc = ctx.incident(Kind::OverUpstreamLimit);
        inc.action = Some(if untrimmable.is_some() {
            Action::TrimFailed
        } else {
            Action::Forwarded
        });
        inc.reason.clone_from(&untrimmable);
        ctx.record(inc);
    }
    let stats = Arc::new(BodyStats::default());
    exchange.body = Some(stats.clone());
    let limited = LimitedBody::new(body, ctx.limits(hard_limit), stats.clone());
    let response = match send(ctx, target, limited.boxed_unsync(), &stats).await {
        Ok(response) => response,
        Err(SendError::Body(failure)) => {
            return Err(body_error(
                ctx,
                failure,
                hard_limit,
                stats.bytes(),
                untrimmable,
            ));
        }
        Err(SendError::Proxy(err) | SendError::Upstream(err)) => return Err(err),
    };
    if !over_known && ctx.declared.is_none() && stats.over_soft_limit() {
        let mut inc = ctx.incident(Kind::OverUpstreamLimit);
        inc.action = Some(if untrimmable.is_some() {
            Action::TrimFailed
        } else {
            Action::Forwarded
        });
        inc.body_bytes = Some(stats.bytes());
        inc.reason = untrimmable;
        ctx.record(inc);
    }
    // The receiver may answer before the whole body arrived (an early 413): the payload's
    // size is then its declared length.
    let complete = stats.is_complete();
    let size = ctx.declared.or(complete.then(|| stats.bytes()));
    relay(
        ctx,
        response,
        size,
        complete,
        &BodyFacts::default(),
        None,
        exchange,
    )
    .await
}

/// Records the incident for a body cut off mid-stream and names the error.
fn body_error(
    ctx: &Ctx<'_>,
    failure: BodyFailure,
    hard_limit: u64,
    seen: u64,
    reason: Option<String>,
) -> ProxyError {
    let cfg = ctx.cfg;
    match failure {
        BodyFailure::TooLarge if hard_limit < cfg.max_body_bytes => {
            tracing::warn!(route = %cfg.name, limit = hard_limit, received = seen, "body over upstream_limit, rejected mid-stream");
            let mut inc = ctx.incident(Kind::OverUpstreamLimit);
            inc.action = Some(if reason.is_some() {
                Action::TrimFailed
            } else {
                Action::Rejected
            });
            inc.body_bytes = Some(seen);
            inc.reason = reason;
            ctx.record(inc);
            ProxyError::OverUpstreamLimit {
                size: seen,
                limit: hard_limit,
            }
        }
        BodyFailure::TooLarge => {
            tracing::warn!(route = %cfg.name, limit = cfg.max_body_bytes, received = seen, "body over max_body mid-stream, upstream request aborted");
            let mut inc = ctx.incident(Kind::OverMaxBody);
            inc.body_bytes = Some(seen);
            ctx.record(inc);
            limit::failure_to_error(failure, cfg.max_body_bytes)
        }
        other => limit::failure_to_error(other, cfg.max_body_bytes),
    }
}

/// Buffers the body under the budget, runs the trim stage, and sends the result with a
/// `Content-Length` (some receivers silently truncate chunked bodies over their limit).
async fn buffered(
    ctx: &Ctx<'_>,
    target: Target,
    body: Incoming,
    encoding: Option<Encoding>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let trims = cfg.trim.is_some() && cfg.on_oversize == OnOversize::Trim;
    if cfg.spool
        && cfg.verify.is_none()
        && !trims
        && ctx
            .declared
            .is_none_or(|len| len > cfg.spool_memory_threshold)
        && let Some(state) = ctx.shared.spool.as_ref()
    {
        // Too big (or of unknown size) to keep in memory while it is forwarded: tee it to a
        // staging file instead, and forward it from there.
        return staged(ctx, state, target, body, encoding, exchange).await;
    }
    let mut reservation = match ctx.shared.budget.reserve(ctx.declared.unwrap_or(0)) {
        Ok(r) => r,
        Err(_) => {
            limit::linger(body);
            return Err(ctx.budget_exhausted(0));
        }
    };
    let stats = Arc::new(BodyStats::default());
    exchange.body = Some(stats.clone());
    let limited = LimitedBody::new(body, ctx.limits(cfg.max_body_bytes), stats.clone());
    let capacity = ctx.declared.unwrap_or(0) as usize;
    let wire = match buffer::collect(limited, capacity, &mut reservation).await {
        Ok(wire) => wire,
        Err(CollectError::Budget(_)) => return Err(ctx.budget_exhausted(stats.bytes())),
        Err(CollectError::Body(_)) => {
            let failure = stats
                .failure()
                .unwrap_or(BodyFailure::Read("body failed".into()));
            return Err(body_error(
                ctx,
                failure,
                cfg.max_body_bytes,
                stats.bytes(),
                None,
            ));
        }
    };
    if cfg.spool || cfg.dead_letter {
        let result = process_buffered(
            ctx,
            target.clone(),
            wire.clone(),
            encoding,
            &stats,
            &mut reservation,
            exchange,
        )
        .await;
        return spool_outcome(ctx, result, &target, Kept::Memory(wire), encoding, exchange).await;
    }
    process_buffered(
        ctx,
        target,
        wire,
        encoding,
        &stats,
        &mut reservation,
        exchange,
    )
    .await
}
