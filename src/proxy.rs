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
use crate::forward::{self, ForwardedFor, UpstreamBody, UpstreamClient};
use crate::incident::{
    self, Action, FieldBytes, Incident, IncidentLog, Kind, LimitLearner, Removed, Retry,
};
use crate::limit::{self, BodyError, BodyFailure, BodyLimits, BodyStats, LimitedBody};
use crate::metrics::Metrics;
use crate::observe::{Exchange, ObservedBody};
use crate::route::RouteTable;
use crate::trim::payload::{self, Encoding, ShrinkError, Shrunk};

/// The response body type of the proxy.
pub type ProxyBody = ObservedBody<UpstreamBody>;

/// Default capacity of the incident queue.
pub const INCIDENT_QUEUE: usize = 1024;

/// How many bytes of a receiver's 413 body are read for its fingerprint and snippet.
const SNIFF_BYTES: usize = 4096;

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The sender's address.
    pub peer: SocketAddr,
    /// The listener's own address.
    pub local: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The request carried both `Content-Length` and `Transfer-Encoding` (see [`crate::framing`]).
    pub framing_conflict: bool,
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
    fn read(json: &[u8], id_path: &str) -> BodyFacts {
        BodyFacts {
            call_id: crate::trim::string_at(json, id_path),
            top_fields: crate::trim::top_fields(json, incident::TOP_FIELDS)
                .map(|fields| {
                    fields
                        .into_iter()
                        .map(|f| FieldBytes {
                            path: f.path,
                            bytes: f.bytes as u64,
                        })
                        .collect()
                })
                .unwrap_or_default(),
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
        tracing::debug!(route = %cfg.name, limit = ?ctx.limit, "using the receiver limit learned from its 413s");
    }

    let declared = match limit::precheck(&parts.headers, cfg.max_body_bytes) {
        Ok(declared) => declared,
        Err(err) => {
            if let ProxyError::BodyTooLarge { limit } = err {
                tracing::warn!(route = %cfg.name, limit, declared = ?parts.headers.get(header::CONTENT_LENGTH), "body over max_body");
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
            tracing::warn!(route = %cfg.name, limit, size, reason = ?untrimmable, "body over upstream_limit, rejected");
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
        Plan::Buffer { encoding } => buffered(&ctx, target, body, encoding, exchange).await,
    }
}

/// Where the request goes: method, upstream URI, rewritten headers.
#[derive(Clone)]
struct Target {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
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
    target: &Target,
    body: UpstreamBody,
    stats: &BodyStats,
) -> Result<Response<Incoming>, SendError> {
    let mut req = Request::new(body);
    *req.method_mut() = target.method.clone();
    *req.uri_mut() = target.uri.clone();
    *req.headers_mut() = target.headers.clone();
    *req.version_mut() = Version::HTTP_11;
    let started = tokio::time::Instant::now();
    let sent = ctx.client.request(req);
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
            let err = forward::classify_error(&err, ctx.cfg);
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
        tracing::warn!(route = %cfg.name, limit = ?ctx.limit, size = ?ctx.declared, reason = ?untrimmable, "body over upstream_limit, forwarded as is");
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
    let response = match send(ctx, &target, limited.boxed_unsync(), &stats).await {
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

/// How much of a staged body is written to the staging file at a time.
const STAGE_CHUNK: usize = 256 * 1024;

/// A spool route's large body: written to `spool/tmp/` as it arrives (memory stays bounded),
/// forwarded from the file with its `Content-Length`, then committed to the spool or removed.
async fn staged(
    ctx: &Ctx<'_>,
    state: &SpoolState,
    target: Target,
    body: Incoming,
    encoding: Option<Encoding>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let refused = |err: crate::spool::SpoolError, bytes: u64| {
        tracing::error!(route = %cfg.name, error = %err, "cannot stage the payload");
        let mut inc = ctx.incident(Kind::SpoolRefused);
        inc.body_bytes = Some(bytes);
        inc.reason = Some(err.to_string());
        ctx.record(inc);
        ProxyError::SpoolUnavailable(err.to_string())
    };
    let spool = state.spool.clone();
    let received_at = ctx.received_at;
    let staging = tokio::task::spawn_blocking(move || spool.stage(received_at)).await;
    let mut staging = match staging {
        Ok(Ok(staging)) => staging,
        Ok(Err(err)) => {
            limit::linger(body);
            return Err(refused(err, 0));
        }
        Err(join) => return Err(ProxyError::Internal(join.to_string())),
    };
    let stats = Arc::new(BodyStats::default());
    exchange.body = Some(stats.clone());
    let mut limited = LimitedBody::new(body, ctx.limits(cfg.max_body_bytes), stats.clone());
    let mut chunk = Vec::with_capacity(STAGE_CHUNK);
    loop {
        let frame = limited.frame().await;
        let done = frame.is_none();
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    chunk.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => {
                let failure = stats
                    .failure()
                    .unwrap_or(BodyFailure::Read("body failed".into()));
                drop(staging);
                return Err(body_error(
                    ctx,
                    failure,
                    cfg.max_body_bytes,
                    stats.bytes(),
                    None,
                ));
            }
            None => {}
        }
        if chunk.len() >= STAGE_CHUNK || (done && !chunk.is_empty()) {
            let data = std::mem::replace(&mut chunk, Vec::with_capacity(STAGE_CHUNK));
            let written =
                tokio::task::spawn_blocking(move || staging.write_all(&data).map(|()| staging))
                    .await;
            staging = match written {
                Ok(Ok(staging)) => staging,
                Ok(Err(err)) => return Err(refused(err, stats.bytes())),
                Err(join) => return Err(ProxyError::Internal(join.to_string())),
            };
        }
        if done {
            break;
        }
    }
    let (path, offset, len) = staging
        .body_file()
        .map_err(|err| refused(err, stats.bytes()))?;
    let mut headers = target.headers.clone();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.remove(header::TRANSFER_ENCODING);
    let sending = Target {
        headers,
        ..target.clone()
    };
    let result = match file_body(&path, offset, len).await {
        Ok(body) => match send(ctx, &sending, body, &stats).await {
            Ok(response) => {
                relay(
                    ctx,
                    response,
                    Some(len),
                    true,
                    &BodyFacts::default(),
                    None,
                    exchange,
                )
                .await
            }
            Err(SendError::Body(failure)) => {
                Err(limit::failure_to_error(failure, cfg.max_body_bytes))
            }
            Err(SendError::Proxy(err) | SendError::Upstream(err)) => Err(err),
        },
        Err(err) => Err(ProxyError::Internal(format!(
            "cannot read the staged body: {err}"
        ))),
    };
    spool_outcome(
        ctx,
        result,
        &target,
        Kept::Staged(staging),
        encoding,
        exchange,
    )
    .await
}

/// A body that reads `len` bytes at `offset` of a file, in 64 KiB frames.
async fn file_body(path: &std::path::Path, offset: u64, len: u64) -> std::io::Result<UpstreamBody> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let frames = futures_util::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; left.min(64 * 1024) as usize];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(BodyError::new(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "staged body is shorter than written",
                ))),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok(http_body::Frame::data(Bytes::from(buf))),
                    (file, left - n as u64),
                ))
            }
            Err(err) => Some((Err(BodyError::new(err)), (file, 0))),
        }
    });
    Ok(http_body_util::StreamBody::new(frames).boxed_unsync())
}

/// The buffered body's way to the receiver: verify the sender, trim, send.
#[allow(clippy::too_many_arguments)]
async fn process_buffered(
    ctx: &Ctx<'_>,
    mut target: Target,
    wire: Bytes,
    encoding: Option<Encoding>,
    stats: &Arc<BodyStats>,
    reservation: &mut Reservation,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let limit = ctx.limit.unwrap_or(cfg.max_body_bytes);
    let stats = stats.clone();
    let original_len = wire.len() as u64;
    let trim = cfg
        .trim
        .as_ref()
        .filter(|_| cfg.on_oversize == OnOversize::Trim && ctx.limit.is_some());

    // Decode (within the budget), verify the sender, then trim.
    let decoded = match encoding {
        None => Ok(wire.clone()),
        Some(enc) => match decode_within_budget(&wire, enc, cfg, reservation) {
            Ok(decoded) => Ok(decoded),
            Err(DecodeFailure::Budget) => return Err(ctx.budget_exhausted(original_len)),
            Err(DecodeFailure::Shrink(err)) => Err(err),
        },
    };
    if let Some(v) = &cfg.verify {
        let call_id = match (&decoded, v.verifier.scheme().needs_call_id()) {
            (Ok(json), true) => crate::trim::string_at(json, &cfg.id_path),
            _ => None,
        };
        if let Err(err) = v
            .verifier
            .verify(&target.headers, call_id.as_deref(), &wire)
        {
            tracing::warn!(route = %cfg.name, scheme = v.verifier.scheme().as_str(), reason = err.as_str(), "sender signature refused");
            return Err(ProxyError::Unauthorized(err.as_str()));
        }
    }
    let Some(tc) = trim else {
        return send_buffered(ctx, &target, wire, &stats, None, None, exchange).await;
    };
    let not_trimmable = if !payload::is_json(ctx.facts.content_type.as_deref()) {
        Some(format!(
            "not JSON (content-type {})",
            ctx.facts.content_type.as_deref().unwrap_or("missing")
        ))
    } else {
        encoding.is_none().then(|| {
            format!(
                "unsupported content-encoding {}",
                ctx.facts.content_encoding.as_deref().unwrap_or("")
            )
        })
    };
    if let Some(reason) = not_trimmable {
        let err = ShrinkError::NotTrimmable(reason);
        return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await;
    }
    let encoding = encoding.unwrap_or(Encoding::Identity);
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(err) => {
            return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await;
        }
    };
    let measured = match (encoding, tc.limit_counts) {
        (Encoding::Identity, _) | (_, crate::config::LimitCounts::Wire) => wire.len(),
        (_, crate::config::LimitCounts::Decoded) => decoded.len(),
    } as u64;
    if measured <= limit && !cfg.retry_on_413 {
        // Fits as it is: forward byte-identical.
        return send_buffered(ctx, &target, wire, &stats, None, None, exchange).await;
    }
    if reservation
        .ensure(original_len + crate::trim::memory_estimate(&decoded))
        .is_err()
    {
        return Err(ctx.budget_exhausted(original_len));
    }
    let facts = BodyFacts::read(&decoded, &cfg.id_path);
    if measured <= limit {
        // retry_on_413 buffers every payload so it can be trimmed if the receiver refuses it.
        let retry = RetryState {
            decoded: &decoded,
            encoding,
            wire: &wire,
        };
        return send_buffered(
            ctx,
            &target,
            wire.clone(),
            &stats,
            Some(&facts),
            Some(retry),
            exchange,
        )
        .await;
    }
    let shrunk = match payload::shrink(&wire, &decoded, encoding, tc, limit) {
        Ok(shrunk) => shrunk,
        Err(err) => return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await,
    };
    let mut inc = ctx.incident(Kind::OverUpstreamLimit);
    inc.body_bytes = Some(original_len);
    inc.bytes_after = Some(shrunk.body.len() as u64);
    inc.trimmed = removed(&shrunk);
    inc.dry_run = tc.dry_run;
    facts.fill(&mut inc);
    if shrunk.fits {
        inc.action = Some(if tc.dry_run {
            Action::Forwarded
        } else {
            Action::Trimmed
        });
        tracing::info!(route = %cfg.name, before = original_len, after = shrunk.body.len(), limit, dry_run = tc.dry_run, trimmed = %shrunk.trimmed_header(), "payload trimmed");
        ctx.record(inc);
        if tc.dry_run {
            return send_buffered(ctx, &target, wire, &stats, Some(&facts), None, exchange).await;
        }
        archive_original(ctx, &mut target.headers, &wire, &facts).await?;
        mark_trimmed(ctx, &mut target.headers, &shrunk);
        let body = Bytes::from(shrunk.body);
        return send_buffered(ctx, &target, body, &stats, Some(&facts), None, exchange).await;
    }
    inc.action = Some(Action::TrimFailed);
    inc.reason = Some(format!(
        "the rules could only reach {} bytes",
        shrunk.measured_after
    ));
    tracing::warn!(route = %cfg.name, before = original_len, smallest = shrunk.body.len(), limit, on_trim_failure = ?tc.on_failure, "trim rules cannot bring the payload under the limit");
    ctx.record(inc);
    if tc.dry_run {
        return send_buffered(ctx, &target, wire, &stats, Some(&facts), None, exchange).await;
    }
    match tc.on_failure {
        OnTrimFailure::Reject => Err(ProxyError::TrimFailed {
            size: original_len,
            limit,
            reason: format!(
                "the trim rules could only reach {} bytes",
                shrunk.measured_after
            ),
        }),
        OnTrimFailure::Forward => {
            archive_original(ctx, &mut target.headers, &wire, &facts).await?;
            mark_trimmed(ctx, &mut target.headers, &shrunk);
            let body = Bytes::from(shrunk.body);
            send_buffered(ctx, &target, body, &stats, Some(&facts), None, exchange).await
        }
    }
}

enum DecodeFailure {
    Budget,
    Shrink(ShrinkError),
}

fn decode_within_budget(
    wire: &Bytes,
    encoding: Encoding,
    cfg: &RouteConfig,
    reservation: &mut Reservation,
) -> Result<Bytes, DecodeFailure> {
    if encoding == Encoding::Identity {
        return Ok(wire.clone());
    }
    let cap = payload::decoded_cap(wire.len(), cfg.max_body_bytes);
    reservation
        .ensure(wire.len() as u64 + cap)
        .map_err(|_| DecodeFailure::Budget)?;
    payload::decode(wire, encoding, cfg.max_body_bytes)
        .map(Bytes::from)
        .map_err(DecodeFailure::Shrink)
}

/// The payload cannot go through the trim stage (invalid JSON, bad encoding, a bomb).
#[allow(clippy::too_many_arguments)]
async fn untrimmable(
    ctx: &Ctx<'_>,
    tc: &TrimConfig,
    target: Target,
    wire: Bytes,
    limit: u64,
    err: ShrinkError,
    exchange: &mut Exchange,
    stats: &BodyStats,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let size = wire.len() as u64;
    if let ShrinkError::Bomb { limit: cap } = err {
        tracing::warn!(route = %cfg.name, cap, "compressed body decodes past the cap: refused");
        let mut inc = ctx.incident(Kind::OverMaxBody);
        inc.body_bytes = Some(size);
        inc.reason = Some(err.to_string());
        ctx.record(inc);
        return Err(ProxyError::DecompressionBomb { limit: cap });
    }
    let over = size > limit;
    if !over {
        // Under the limit and not ours to judge: pass it on untouched.
        return send_buffered(ctx, &target, wire, stats, None, None, exchange).await;
    }
    tracing::warn!(route = %cfg.name, reason = %err, on_trim_failure = ?tc.on_failure, "payload over upstream_limit cannot be trimmed");
    let mut inc = ctx.incident(Kind::OverUpstreamLimit);
    inc.action = Some(Action::TrimFailed);
    inc.body_bytes = Some(size);
    inc.reason = Some(err.to_string());
    inc.dry_run = tc.dry_run;
    ctx.record(inc);
    if tc.on_failure == OnTrimFailure::Reject && !tc.dry_run {
        return Err(ProxyError::TrimFailed {
            size,
            limit,
            reason: err.to_string(),
        });
    }
    send_buffered(ctx, &target, wire, stats, None, None, exchange).await
}

fn removed(shrunk: &Shrunk) -> Vec<Removed> {
    shrunk
        .applied
        .iter()
        .map(|a| Removed {
            path: a.path.clone(),
            removed: a.removed as u64,
        })
        .collect()
}

/// Adds `Payload-Guard-Trimmed` and `Payload-Guard-Original-Length`, re-signs the trimmed body
/// when the route asks for it, and counts the trim.
fn mark_trimmed(ctx: &Ctx<'_>, headers: &mut HeaderMap, shrunk: &Shrunk) {
    ctx.shared.metrics.trimmed(
        &ctx.cfg.name,
        shrunk.applied.iter().map(|a| a.removed as u64).sum(),
    );
    if let Some(resign) = ctx.cfg.verify.as_ref().and_then(|v| v.resign.as_ref()) {
        match resign.sign(None, &shrunk.body) {
            Ok((name, value)) => {
                headers.insert(name, value);
            }
            Err(err) => {
                tracing::warn!(route = %ctx.cfg.name, error = %err, "cannot re-sign the trimmed body");
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&shrunk.trimmed_header()) {
        headers.insert(HeaderName::from_static("payload-guard-trimmed"), v);
    }
    headers.insert(
        HeaderName::from_static("payload-guard-original-length"),
        HeaderValue::from(shrunk.original_len as u64),
    );
}

/// What a retry after a receiver's 413 needs.
#[derive(Clone, Copy)]
struct RetryState<'a> {
    decoded: &'a Bytes,
    encoding: Encoding,
    wire: &'a Bytes,
}

/// Sends a buffered body with its exact `Content-Length`.
async fn send_buffered(
    ctx: &Ctx<'_>,
    target: &Target,
    body: Bytes,
    stats: &BodyStats,
    facts: Option<&BodyFacts>,
    retry: Option<RetryState<'_>>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let mut target_headers = target.headers.clone();
    target_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
    target_headers.remove(header::TRANSFER_ENCODING);
    let sending = Target {
        method: target.method.clone(),
        uri: target.uri.clone(),
        headers: target_headers,
    };
    let sent = body.len() as u64;
    let response = match send(ctx, &sending, full_body(body), stats).await {
        Ok(response) => response,
        Err(SendError::Body(failure)) => {
            return Err(limit::failure_to_error(failure, ctx.cfg.max_body_bytes));
        }
        Err(SendError::Proxy(err) | SendError::Upstream(err)) => return Err(err),
    };
    let facts = facts.cloned().unwrap_or_default();
    let retry = retry.map(|r| (r, sending));
    relay(ctx, response, Some(sent), true, &facts, retry, exchange).await
}

/// Relays the receiver's response; on a 413, fingerprints it, learns from it, records the
/// incident, and (with `retry_on_413`) trims below the learned bound and tries once more.
async fn relay(
    ctx: &Ctx<'_>,
    response: Response<Incoming>,
    size: Option<u64>,
    complete: bool,
    facts: &BodyFacts,
    retry: Option<(RetryState<'_>, Target)>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let status = response.status().as_u16();
    exchange.upstream_status = Some(status);
    exchange.forwarded_bytes = size;
    exchange.upstream_secs = Some(ctx.upstream_nanos.load(Ordering::Relaxed) as f64 / 1e9);
    if response.status().is_success()
        && complete
        && let Some(size) = size
    {
        ctx.shared.learner.record_accepted(&cfg.name, size);
    }
    if status != 413 {
        return Ok(convert_response(response));
    }
    // The receiver refused the size: read the start of its answer to name who refused.
    let (mut parts, body) = response.into_parts();
    let (prefix, rest) = sniff(body.map_err(BodyError::new).boxed_unsync(), SNIFF_BYTES).await;
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let rejector = incident::fingerprint(status, &headers, &prefix);
    let bracket = match size {
        Some(size) => ctx.shared.learner.record_rejected(&cfg.name, size),
        None => ctx.shared.learner.bracket(&cfg.name),
    };
    tracing::warn!(route = %cfg.name, rejector = rejector.as_str(), bytes = ?size, "receiver answered 413");
    let mut inc = ctx.incident(Kind::Upstream413);
    inc.body_bytes = size;
    inc.upstream_status = Some(status);
    inc.rejector = Some(rejector);
    inc.upstream_snippet = Some(incident::snippet(&prefix));
    inc.learned = Some(bracket);
    facts.fill(&mut inc);

    if let Some((state, target)) = retry
        && let Some(tc) = cfg.trim.as_ref()
        && let Some(bound) = incident::effective_limit(cfg.upstream_limit_bytes, &bracket)
        && size.is_some_and(|sent| bound < sent)
        && !tc.dry_run
    {
        match payload::shrink(state.wire, state.decoded, state.encoding, tc, bound) {
            Ok(shrunk) if shrunk.fits && shrunk.changed() => {
                let mut headers = target.headers.clone();
                mark_trimmed(ctx, &mut headers, &shrunk);
                let again = Target {
                    method: target.method.clone(),
                    uri: target.uri.clone(),
                    headers,
                };
                let len = shrunk.body.len() as u64;
                let trimmed = removed(&shrunk);
                tracing::info!(route = %cfg.name, bound, bytes = len, "retrying the refused payload trimmed below the learned limit");
                let stats = BodyStats::default();
                stats.record_complete(len);
                let mut again_headers = again.headers;
                again_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                let again = Target {
                    headers: again_headers,
                    ..again
                };
                match send(ctx, &again, full_body(Bytes::from(shrunk.body)), &stats).await {
                    Ok(second) => {
                        let second_status = second.status().as_u16();
                        inc.retry = Some(Retry {
                            attempted: true,
                            status: Some(second_status),
                            bytes: Some(len),
                        });
                        inc.trimmed = trimmed;
                        inc.bytes_after = Some(len);
                        exchange.upstream_status = Some(second_status);
                        if second.status().is_success() {
                            ctx.shared.learner.record_accepted(&cfg.name, len);
                        } else if second_status == 413 {
                            inc.learned = Some(ctx.shared.learner.record_rejected(&cfg.name, len));
                        }
                        ctx.record(inc);
                        return Ok(convert_response(second));
                    }
                    Err(_) => {
                        inc.retry = Some(Retry {
                            attempted: true,
                            status: None,
                            bytes: Some(len),
                        });
                    }
                }
            }
            _ => {
                inc.retry = Some(Retry {
                    attempted: false,
                    status: None,
                    bytes: None,
                });
                inc.reason = Some(format!(
                    "trim rules cannot reach the learned limit of {bound} bytes"
                ));
            }
        }
    }
    ctx.record(inc);
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, prefixed_body(prefix, rest)))
}

fn convert_response(response: Response<Incoming>) -> Response<UpstreamBody> {
    let (mut parts, body) = response.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body.map_err(BodyError::new).boxed_unsync())
}

/// Reads up to `max` bytes of a body, returning them and the rest of the body.
async fn sniff(mut body: UpstreamBody, max: usize) -> (Bytes, Option<UpstreamBody>) {
    let mut prefix = Vec::new();
    loop {
        if prefix.len() >= max {
            return (Bytes::from(prefix), Some(body));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "receiver's body ended early");
                return (Bytes::from(prefix), None);
            }
            None => return (Bytes::from(prefix), None),
        }
    }
}

/// A body that yields `prefix`, then the rest of the original body.
fn prefixed_body(prefix: Bytes, rest: Option<UpstreamBody>) -> UpstreamBody {
    Prefixed {
        prefix: (!prefix.is_empty()).then_some(prefix),
        rest,
    }
    .boxed_unsync()
}

struct Prefixed {
    prefix: Option<Bytes>,
    rest: Option<UpstreamBody>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        match self.rest.as_mut() {
            None => std::task::Poll::Ready(None),
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// Keeps the untrimmed original in `spool/archive/` (`archive_originals = true`) and points
/// the receiver at it: `Payload-Guard-Original: <id>`, plus `Payload-Guard-Original-Url` with
/// `claim_check_url`. Trimming never destroys data: when the archive cannot store it, the
/// payload is not trimmed and the sender gets 503.
async fn archive_original(
    ctx: &Ctx<'_>,
    headers: &mut HeaderMap,
    wire: &Bytes,
    facts: &BodyFacts,
) -> Result<(), ProxyError> {
    let cfg = ctx.cfg;
    if !cfg.archive_originals {
        return Ok(());
    }
    let Some(state) = ctx.shared.spool.as_ref() else {
        return Ok(());
    };
    let mut meta = spool_meta(ctx, headers, wire.len() as u64, facts.call_id.clone());
    meta.trimmed = true;
    match deliver::commit(
        &state.spool,
        crate::spool::State::Archive,
        meta,
        wire.clone(),
    )
    .await
    {
        Ok(id) => {
            if let Ok(v) = HeaderValue::from_str(id.as_str()) {
                headers.insert(HeaderName::from_static("payload-guard-original"), v);
            }
            if let Some(url) = &cfg.claim_check_url
                && let Ok(v) = HeaderValue::from_str(&format!("{url}/{id}"))
            {
                headers.insert(HeaderName::from_static("payload-guard-original-url"), v);
            }
            Ok(())
        }
        Err(err) => {
            tracing::error!(route = %cfg.name, error = %err, "cannot archive the original: not trimming it");
            let mut inc = ctx.incident(Kind::SpoolRefused);
            inc.body_bytes = Some(wire.len() as u64);
            inc.reason = Some(format!("archive: {err}"));
            ctx.record(inc);
            Err(ProxyError::SpoolUnavailable(err.to_string()))
        }
    }
}

/// Metadata for a spool record of this request.
fn spool_meta(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    len: u64,
    call_id: Option<String>,
) -> crate::spool::Meta {
    let mut meta = crate::spool::Meta::new(
        ctx.cfg.name.clone(),
        ctx.received_at,
        ctx.request_id.clone(),
        ctx.method.to_string(),
        ctx.path_and_query.clone(),
        len,
    );
    meta.call_id = call_id;
    meta.headers = deliver::stored_headers(headers);
    meta
}

/// For spool routes: keeps what the receiver could not take (spool, 202), and what it refused
/// for good (dead letters), and passes everything else on.
async fn spool_outcome(
    ctx: &Ctx<'_>,
    result: Result<Response<UpstreamBody>, ProxyError>,
    target: &Target,
    kept: Kept,
    encoding: Option<Encoding>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let reason = match &result {
        Ok(response) => match deliver::disposition(response.status().as_u16()) {
            deliver::Disposition::Delivered => return result,
            deliver::Disposition::Retry(reason) if cfg.spool => reason,
            deliver::Disposition::Final(status) if cfg.dead_letter && status >= 400 => {
                let Ok(response) = result else {
                    unreachable!("matched Ok above")
                };
                return dead_letter(ctx, response, target, kept, encoding).await;
            }
            _ => return result,
        },
        Err(err) if cfg.spool && err.culprit() == crate::error::Culprit::Upstream => {
            err.to_string()
        }
        Err(_) => return result,
    };
    let Some(state) = ctx.shared.spool.as_ref() else {
        return result;
    };
    let len = kept.len();
    let call_id = kept.call_id(ctx, encoding).await;
    let mut meta = spool_meta(ctx, &target.headers, len, call_id);
    meta.last_error = Some(reason.clone());
    match kept.commit(state, crate::spool::State::Ready, meta).await {
        Ok(id) => {
            tracing::warn!(route = %cfg.name, id = %id, reason = %reason, "payload spooled for redelivery");
            let id_header = HeaderValue::from_str(id.as_str()).ok();
            let mut response = match (cfg.on_spool_response, result) {
                (crate::config::OnSpoolResponse::Passthrough, Ok(response)) => response,
                (crate::config::OnSpoolResponse::Passthrough, Err(err)) => {
                    error_response(&err, &ctx.request_id, ctx.is_h1, exchange)
                }
                (crate::config::OnSpoolResponse::Accepted, _) => {
                    exchange.error = None;
                    let body = serde_json::json!({
                        "status": "accepted",
                        "spool_id": id.as_str(),
                        "request_id": ctx.request_id,
                        "message": format!("the receiver could not take the payload ({reason}); payload-guard stored it and will redeliver it"),
                    });
                    let mut response = Response::new(full_body(Bytes::from(body.to_string())));
                    *response.status_mut() = http::StatusCode::ACCEPTED;
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    response
                }
            };
            if let Some(id) = id_header {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static("payload-guard-spool-id"), id);
            }
            Ok(response)
        }
        Err(err) => {
            tracing::error!(route = %cfg.name, error = %err, "cannot spool an undeliverable payload");
            let mut inc = ctx.incident(Kind::SpoolRefused);
            inc.body_bytes = Some(len);
            inc.reason = Some(err.to_string());
            ctx.record(inc);
            Err(ProxyError::SpoolUnavailable(err.to_string()))
        }
    }
}

/// A body kept until the receiver has taken it: in memory, or staged in `spool/tmp/`.
enum Kept {
    Memory(Bytes),
    Staged(crate::spool::Staging),
}

impl Kept {
    fn len(&self) -> u64 {
        match self {
            Kept::Memory(bytes) => bytes.len() as u64,
            Kept::Staged(staging) => staging.body_len(),
        }
    }

    async fn call_id(&self, ctx: &Ctx<'_>, encoding: Option<Encoding>) -> Option<String> {
        match self {
            Kept::Memory(wire) => call_id_of(ctx, wire, encoding),
            Kept::Staged(_) => None,
        }
    }

    /// Makes the body a durable record (on a blocking thread: it writes and fsyncs).
    async fn commit(
        self,
        state: &SpoolState,
        to: crate::spool::State,
        meta: crate::spool::Meta,
    ) -> Result<crate::spool::RecordId, crate::spool::SpoolError> {
        match self {
            Kept::Memory(bytes) => deliver::commit(&state.spool, to, meta, bytes).await,
            Kept::Staged(staging) => tokio::task::spawn_blocking(move || staging.commit(to, &meta))
                .await
                .unwrap_or_else(|join| {
                    Err(crate::spool::SpoolError::Io {
                        op: "commit",
                        path: std::path::PathBuf::new(),
                        source: std::io::Error::other(join.to_string()),
                    })
                }),
        }
    }
}

fn call_id_of(ctx: &Ctx<'_>, wire: &Bytes, encoding: Option<Encoding>) -> Option<String> {
    if !payload::is_json(ctx.facts.content_type.as_deref()) {
        return None;
    }
    match encoding {
        Some(Encoding::Identity) => crate::trim::string_at(wire, &ctx.cfg.id_path),
        Some(enc) => payload::decode(wire, enc, ctx.cfg.max_body_bytes)
            .ok()
            .and_then(|d| crate::trim::string_at(&d, &ctx.cfg.id_path)),
        None => None,
    }
}

/// Keeps a payload the receiver refused for good in `spool/dead/`, and relays its answer.
async fn dead_letter(
    ctx: &Ctx<'_>,
    response: Response<UpstreamBody>,
    target: &Target,
    kept: Kept,
    encoding: Option<Encoding>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let (prefix, rest) = sniff(body, incident::SNIPPET_BYTES).await;
    if let Some(state) = ctx.shared.spool.as_ref() {
        let call_id = kept.call_id(ctx, encoding).await;
        let mut meta = spool_meta(ctx, &target.headers, kept.len(), call_id);
        meta.status = Some(status);
        meta.snippet = Some(incident::snippet(&prefix));
        meta.last_error = Some(format!("receiver refused it: {status}"));
        match kept.commit(state, crate::spool::State::Dead, meta).await {
            Ok(id) => {
                tracing::warn!(route = %ctx.cfg.name, id = %id, status, "refused payload kept as a dead letter")
            }
            Err(err) => {
                tracing::error!(route = %ctx.cfg.name, error = %err, status, "cannot keep the dead letter")
            }
        }
    }
    Ok(Response::from_parts(parts, prefixed_body(prefix, rest)))
}
