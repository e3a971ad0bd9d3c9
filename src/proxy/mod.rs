//! The per-request pipeline, as named phases over one request context ([`context`]):
//!
//! 1. **admit** ([`admit`]): refuse what is not a webhook request (CONNECT, foreign targets,
//!    upgrades, ambiguous framing), match the route, pre-check the declared length.
//! 2. **plan** ([`plan`], pure): stream, buffer, stage on disk, or refuse at once.
//! 3. either **stream** ([`stream`]): the body goes through [`LimitedBody`](crate::limit) to the
//!    receiver, never held whole;
//! 4. or **collect → verify → prepare → send → judge** ([`buffered`]): the body is collected
//!    under the buffer budget, the sender's signature checked, the payload prepared for the
//!    receiver's limit ([`crate::prepare`]), sent, and the answer judged ([`crate::judge`]),
//!    with the 413 ladder ([`crate::deliver::deliver_whole`]);
//! 5. **keep** ([`keep`]): on spool routes, what the receiver could not take is committed to
//!    the spool before the sender gets 202, and what it refused for good becomes a dead letter;
//! 6. **settle** ([`settle`]): the incidents, their log lines and the error response come from
//!    the outcome, in one place; the access-log line and the request metrics are written when
//!    the response body is done ([`crate::observe`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::buffer::BufferBudget;
use crate::config::Config;
use crate::deliver::SpoolState;
use crate::error::ProxyError;
use crate::forward::{self, ConnUpstream, UpstreamBody, UpstreamClient};
use crate::incident::{Incident, IncidentLog};
use crate::limit::BodyError;
use crate::metrics::Metrics;
use crate::observe::{Exchange, ObservedBody};
use crate::route::RouteTable;
use crate::state::{DedupeMemory, LearnedLimits, Persisted, dedupe, limits};

mod admit;
mod buffered;
mod context;
mod keep;
pub mod plan;
mod settle;
mod stream;

use self::context::RequestCtx;
pub use self::plan::{Plan, plan};
pub use self::settle::{error_response, log_incident};

/// The response body type of the proxy.
pub type ProxyBody = ObservedBody<UpstreamBody>;

/// Default capacity of the incident queue.
pub const INCIDENT_QUEUE: usize = 1024;

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
    pub config: crate::config::RouteConfig,
    client: UpstreamClient,
}

impl RouteRuntime {
    /// The route's pooled upstream client.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }
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

    /// The route with this name.
    pub fn route_by_name(&self, name: &str) -> Option<&RouteRuntime> {
        self.routes.iter().find(|r| r.config.name == name)
    }
}

/// State that outlives a configuration reload: the buffer budget, the incident log, what was
/// learned about receivers' limits, the dedupe memory and the spool.
pub struct Shared {
    /// Memory all buffered bodies share.
    pub budget: Arc<BufferBudget>,
    /// The incident log.
    pub incidents: IncidentLog,
    /// Learned receiver limits, per route.
    pub learned: Arc<LearnedLimits>,
    /// Delivered payload ids, for routes with `dedupe`.
    pub dedupe: Arc<DedupeMemory>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Connections open right now (public listener).
    pub open_connections: Arc<AtomicU64>,
    /// The spool, when a route uses it.
    pub spool: Option<SpoolState>,
}

impl Shared {
    /// Budget from `[server] buffer_budget`, the incident log at `[incidents] path` (its writer
    /// task starts on the current tokio runtime), the learned limits and dedupe memory from
    /// their state files (see [`crate::state`]), and the spool when a route uses it.
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
        let metrics = Metrics::new();
        for route in &config.routes {
            metrics.init_route(&route.name);
        }
        let learned = Arc::new(LearnedLimits::open(crate::state::limits_path(config)));
        learned.reconcile(config.routes.iter().map(|r| limits::Configured {
            route: &r.name,
            upstream_limit: r.upstream_limit_bytes,
        }));
        learned.spawn_writer();
        let dedupe = Arc::new(DedupeMemory::open(
            crate::state::dedupe_path(config),
            dedupe::DEFAULT_CAPACITY,
        ));
        dedupe.spawn_writer();
        if let crate::config::StoreBackend::Postgres { url_env } = &config.spool.backend {
            let db = crate::db::Database::from_env(url_env, 2)
                .map_err(|e| ProxyError::Internal(format!("[spool] backend: {e}")))?;
            crate::state::shared::spawn(db, learned.clone(), dedupe.clone());
        }
        let mut incidents = IncidentLog::start(config.incidents.path.clone(), INCIDENT_QUEUE);
        if let crate::config::StoreBackend::Postgres { url_env } = &config.incidents.backend {
            let db = crate::db::Database::from_env(url_env, 2)
                .map_err(|e| ProxyError::Internal(format!("[incidents] backend: {e}")))?;
            incidents = incidents.with_table(crate::incident::table::IncidentTable::start(db));
        }
        Ok(Shared {
            budget: BufferBudget::new(config.server.buffer_budget_bytes),
            incidents,
            learned,
            dedupe,
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
            resident_bytes: crate::server::resident_bytes(),
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

    /// Writes the state files now (at shutdown; blocking I/O).
    pub fn flush_state(&self) {
        if let Err(err) = self.learned.flush() {
            tracing::error!(error = %err, "cannot write the learned limits file");
        }
        if let Err(err) = self.dedupe.flush() {
            tracing::error!(error = %err, "cannot write the dedupe file");
        }
    }
}

/// Records an incident: counted in the metrics, written to the log, and said once in the
/// proxy's own log (WARN; INFO for a payload that was trimmed and delivered).
pub fn record_incident(shared: &Shared, incident: Incident) {
    shared.services().record(incident);
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

    /// The state shared across reloads, for tasks that outlive a borrow.
    pub fn shared_arc(&self) -> Arc<Shared> {
        self.shared.clone()
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
        let result = pipeline(&rt, &self.shared, req, &conn, &mut exchange).await;
        let mut response = match result {
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

/// The phases, top to bottom. Refusals before a route is known are settled by the caller
/// (they have no incident); from the route on, [`settle`] records what happened, once.
async fn pipeline(
    rt: &Runtime,
    shared: &Shared,
    req: Request<Incoming>,
    conn: &ConnInfo,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let (parts, body) = req.into_parts();
    let admitted = match admit::admit(rt, &parts, conn) {
        Ok(admitted) => admitted,
        Err(err) => {
            crate::limit::linger(body);
            return Err(err);
        }
    };
    let route = &rt.routes[admitted.route_index];
    exchange.route = Some(route.config.name.clone());
    let mut ctx = RequestCtx::new(rt, shared, route, parts, conn, exchange.request_id.clone());
    let result = run(&mut ctx, body, admitted.rest).await;
    ctx.settle(&result, exchange);
    result
}

/// From the matched route to the receiver's answer.
async fn run(
    ctx: &mut RequestCtx<'_>,
    body: Incoming,
    rest: String,
) -> Result<Response<UpstreamBody>, ProxyError> {
    if let Err(err) = admit::precheck(ctx) {
        crate::limit::linger(body);
        return Err(err);
    }
    if let Err(err) = ctx.target_for(&rest) {
        crate::limit::linger(body);
        return Err(err);
    }
    let plan = plan::plan(
        ctx.cfg,
        &plan::Facts {
            content_type: ctx.content_type.as_deref(),
            content_encoding: ctx.content_encoding.as_deref(),
            declared: ctx.declared,
            limit: ctx.limit,
            spool_ready: ctx.shared.spool.is_some(),
        },
    );
    match plan {
        Plan::Reject {
            size,
            limit,
            untrimmable,
        } => {
            ctx.over_limit_refused(size, untrimmable);
            crate::limit::linger(body);
            Err(ProxyError::OverUpstreamLimit { size, limit })
        }
        Plan::Stream {
            hard_limit,
            untrimmable,
        } => stream::stream(ctx, body, hard_limit, untrimmable).await,
        // Boxed: the buffered path's state is large, and most requests stream; inline, it
        // would make every request's future (allocated and moved per request) as large.
        Plan::Buffer { encoding } => Box::pin(buffered::buffered(ctx, body, encoding)).await,
        Plan::Stage { encoding } => Box::pin(keep::staged(ctx, body, encoding)).await,
    }
}

/// A full body of `bytes`.
fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body that yields `prefix`, then the rest of the original body.
pub fn prefixed_body(prefix: Bytes, rest: Option<UpstreamBody>) -> UpstreamBody {
    match rest {
        None => full_body(prefix),
        Some(rest) if prefix.is_empty() => rest,
        Some(rest) => {
            let head = http_body_util::Full::new(prefix).map_err(|never| match never {});
            StreamThen {
                head: Some(head.boxed_unsync()),
                rest,
            }
            .boxed_unsync()
        }
    }
}

/// `head`, then `rest`.
struct StreamThen {
    head: Option<UpstreamBody>,
    rest: UpstreamBody,
}

impl http_body::Body for StreamThen {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(head) = self.head.as_mut() {
            match std::pin::Pin::new(head).poll_frame(cx) {
                std::task::Poll::Ready(None) => self.head = None,
                other => return other,
            }
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }
}
