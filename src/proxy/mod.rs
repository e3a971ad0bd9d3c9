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
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{ConnUpstream, UpstreamBody};
use crate::observe::{Exchange, ObservedBody};

mod admit;
mod buffered;
mod context;
mod keep;
pub mod plan;
mod settle;
mod stream;

use self::context::RequestCtx;
pub use self::plan::{Plan, plan};
pub use self::settle::error_response;
pub use crate::forward::prefixed_body;
pub use crate::incident::log_line as log_incident;
pub use crate::runtime::{INCIDENT_QUEUE, RouteRuntime, Runtime, Shared, record_incident};

/// The response body type of the proxy.
pub type ProxyBody = ObservedBody<UpstreamBody>;

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
    /// The connection as the shedding logic sees it: request bodies report their progress to
    /// it (see [`crate::shed`]). `None` outside a served connection.
    pub track: Option<Arc<crate::shed::ConnTrack>>,
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
        let mut exchange = Box::new(Exchange::new(
            request_id.clone(),
            req.method().clone(),
            req.uri().path().to_string(),
            conn.peer,
        ));
        exchange.metrics = Some(self.shared.metrics.clone());
        let is_h1 = req.version() < Version::HTTP_2;
        // Built once, shared by the receiver's `X-Request-Id` and `Idempotency-Key` and the
        // sender's `X-Request-Id`.
        let id_header = HeaderValue::from_str(&request_id).ok();
        // Boxed where it starts: the pipeline's state is the bulk of the request's future, and
        // the service future is moved several times before it is first polled (into the
        // connection-tracking scope, then onto the heap); boxed here, it is written once.
        let result = boxed(|| {
            pipeline(
                &rt,
                &self.shared,
                req,
                &conn,
                id_header.clone(),
                &mut exchange,
            )
        })
        .await;
        let mut response = match result {
            Ok(response) => response,
            Err(err) => error_response(&err, &request_id, is_h1, &mut exchange),
        };
        if let Some(id) = id_header {
            response
                .headers_mut()
                .insert(crate::forward::X_REQUEST_ID, id);
        }
        exchange.status = Some(response.status().as_u16());
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, ObservedBody::new(body, exchange))
    }
}

/// The future `make` builds, in a heap slot allocated first so that the future can be built
/// in place: `Box::pin(make())` builds it on the stack and then copies all of it (an async
/// fn's future is as large as its largest state, here kilobytes) into the heap.
pub(crate) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// The request id: the sender's `X-Request-Id` when it is sane, else a new UUID. Shared, not
/// copied, by the access line and the request's context.
pub fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(crate::forward::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(|| {
            Arc::from(
                &*uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            )
        })
}

/// The phases, top to bottom. Refusals before a route is known are settled by the caller
/// (they have no incident); from the route on, [`settle`] records what happened, once.
async fn pipeline(
    rt: &Runtime,
    shared: &Shared,
    req: Request<Incoming>,
    conn: &ConnInfo,
    request_id_header: Option<HeaderValue>,
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
    let mut ctx = RequestCtx::new(
        rt,
        shared,
        route,
        parts,
        conn,
        exchange.request_id.clone(),
        request_id_header,
    );
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
            content_type: ctx.content_type(),
            content_encoding: ctx.content_encoding(),
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
        // Built in their heap slots: `Box::pin(f())` builds `f()` on the handler's stack
        // first, and those slots had made its poll frame 13.8 KiB (5.7 KiB without).
        Plan::Buffer { encoding } => boxed(|| buffered::buffered(ctx, body, encoding)).await,
        Plan::Stage { encoding } => boxed(|| keep::staged(ctx, body, encoding)).await,
    }
}

/// A full body of `bytes`.
fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}
