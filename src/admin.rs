//! The admin listener: `GET /healthz` (process up), `GET /readyz` (config loaded, listener
//! bound), `GET /metrics` (Prometheus text), `POST /reload` (re-read `proxy.toml`). When
//! `[server] admin_token_env` is set, every request must carry `Authorization: Bearer <token>`
//! (the console also takes its session cookie). Every other path is the operator's console
//! ([`crate::console`]). Also home of [`reload`], shared by SIGHUP and `POST /reload`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::console::{self, Console};
use crate::proxy::{Proxy, Runtime};

/// What the admin endpoints serve.
#[derive(Clone)]
pub struct Admin {
    /// The proxy whose metrics and configuration are served.
    pub proxy: Proxy,
    /// The configuration file `POST /reload` re-reads.
    pub config_path: PathBuf,
    /// Set once the public listener is bound.
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    tracing::info!(listen = %listener.local_addr()?, "admin listening");
    let console = Arc::new(Console::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::error!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let admin = admin.clone();
        let console = console.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            let console = console.clone();
            async move { Ok::<_, Infallible>(handle(&admin, &console, req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// How an admin request was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No token is configured (the admin listener is on loopback).
    Open,
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// The console's session cookie holding the token.
    Cookie,
}

/// Who is calling, or `None` when a token is configured and the request does not carry it.
pub fn caller(admin: &Admin, headers: &http::HeaderMap) -> Option<Caller> {
    let runtime = admin.proxy.current();
    let Some(token) = runtime.config.server.admin_token.as_ref() else {
        return Some(Caller::Open);
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(given) = bearer {
        return token.matches(given.as_bytes()).then_some(Caller::Bearer);
    }
    console::cookie_token(headers)
        .filter(|given| token.matches(given.as_bytes()))
        .map(|_| Caller::Cookie)
}

async fn handle(
    admin: &Admin,
    console: &Console,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if console::serves(req.uri().path()) {
        return console::handle(admin, console, req, peer).await;
    }
    // The console's cookie is for the console: these endpoints keep to the bearer token
    // (`POST /reload` has no CSRF token to check).
    if !matches!(
        caller(admin, req.headers()),
        Some(Caller::Open | Caller::Bearer)
    ) {
        let mut response = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "unauthorized", "message": "admin requests need Authorization: Bearer <token>"}),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(admin).await,
        (&Method::GET, "/metrics") => {
            let shared = admin.proxy.shared();
            let text = shared.metrics.encode(&shared.snapshot());
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        (&Method::GET, "/limits") => limits(admin),
        (&Method::POST, "/limits/reset") => reset_limits(admin, req.uri().query()),
        (&Method::POST, "/reload") => match reload(&admin.proxy, &admin.config_path) {
            Ok(()) => json(StatusCode::OK, serde_json::json!({"status": "reloaded"})),
            Err(message) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "reload_failed", "message": message}),
            ),
        },
        (&Method::GET, path) if path.starts_with("/originals/") => {
            original(admin, &path["/originals/".len()..]).await
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/reload" | "/limits" | "/limits/reset") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        ),
    }
}

/// `GET /readyz`: 200 once the listener is bound and, when a route spools, while the spool can
/// take new records (below `max_bytes`, disk above `min_free`, writable, or its database
/// reachable); else 503 with why.
async fn readyz(admin: &Admin) -> Response<Full<Bytes>> {
    if !admin.ready.load(Ordering::Acquire) {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "starting"}),
        );
    }
    if let Some(state) = admin.proxy.shared().spool.clone()
        && let Err(err) = state.spool.can_accept().await
    {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "spool_unavailable", "reason": err.to_string()}),
        );
    }
    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
}

/// `GET /limits`: what each route has learned about its receiver's limit, with the evidence.
fn limits(admin: &Admin) -> Response<Full<Bytes>> {
    let runtime = admin.proxy.current();
    let learned = &admin.proxy.shared().learned;
    let routes: Vec<serde_json::Value> = runtime
        .config
        .routes
        .iter()
        .map(|route| {
            let units = crate::prepare::Policy::of(route)
                .map_or(crate::trim::payload::Units::Wire, |p| p.units);
            let state = learned.route(&route.name).unwrap_or_default();
            serde_json::json!({
                "route": route.name,
                "configured": route.upstream_limit_bytes,
                "units": units.as_str(),
                "in_force": learned.limit(&route.name, units, route.upstream_limit_bytes),
                "wire": state.wire,
                "decoded": state.decoded,
                "evidence": state.evidence,
            })
        })
        .collect();
    json(StatusCode::OK, serde_json::json!({ "routes": routes }))
}

/// `POST /limits/reset?route=NAME`: forgets what was learned for a route.
fn reset_limits(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
    let route = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "route")
        .map(|(_, v)| v.into_owned());
    let Some(route) = route.as_deref().filter(|r| !r.is_empty()) else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad_request", "message": "name the route: POST /limits/reset?route=NAME"}),
        );
    };
    if admin.proxy.current().route_by_name(route).is_none() {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no_route", "message": format!("no route named {route:?}")}),
        );
    }
    let had = admin.proxy.shared().learned.reset(route);
    tracing::info!(route, "learned limit reset through the admin listener");
    json(
        StatusCode::OK,
        serde_json::json!({"status": "reset", "route": route, "had_evidence": had}),
    )
}

/// `GET /originals/<id>`: the exact untrimmed bytes of an archived original.
async fn original(admin: &Admin, id: &str) -> Response<Full<Bytes>> {
    let Some(state) = admin.proxy.shared().spool.as_ref() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "no route archives originals"}),
        );
    };
    let Ok(id) = id.parse::<crate::spool::RecordId>() else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad_id", "message": "not a spool record id"}),
        );
    };
    match state.spool.read(crate::spool::State::Archive, &id).await {
        Ok((meta, body)) => {
            let content_type = meta
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map_or("application/octet-stream".to_string(), |(_, v)| v.clone());
            let encoding = meta
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-encoding"))
                .map(|(_, v)| v.clone());
            let mut response = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = header::HeaderValue::from_str(&content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if let Some(v) = encoding.and_then(|e| header::HeaderValue::from_str(&e).ok()) {
                response.headers_mut().insert(header::CONTENT_ENCODING, v);
            }
            response
        }
        Err(crate::spool::SpoolError::NotFound(_)) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "no archived original with this id (expired or never stored)"}),
        ),
        Err(err) => {
            tracing::error!(id = %id, error = %err, "cannot read archived original");
            json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": "read_failed"}),
            )
        }
    }
}

/// A reload cannot open, close or move the spool while payloads may be in it: a `[spool]`
/// change, or a route that starts spooling when no spool is open, is refused with the reason.
fn spool_change(old: &Config, new: &Config, spool_open: bool) -> Result<(), String> {
    let needs_spool = new.spool.used;
    if needs_spool && !spool_open {
        let route = new
            .routes
            .iter()
            .find(|r| r.spool || r.dead_letter || r.archive_originals)
            .map_or("a route", |r| r.name.as_str());
        return Err(format!(
            "route {route:?} now uses the spool (spool, dead_letter or archive_originals), but no spool is open: restart payload-guard to open it"
        ));
    }
    let (o, n) = (&old.spool, &new.spool);
    let changed = [
        ("dir", o.dir != n.dir),
        ("max_bytes", o.max_bytes != n.max_bytes),
        ("min_free", o.min_free != n.min_free),
        ("retry_initial", o.retry_initial != n.retry_initial),
        ("retry_max", o.retry_max != n.retry_max),
        ("retry_for", o.retry_for != n.retry_for),
        (
            "redeliver_concurrency",
            o.redeliver_concurrency != n.redeliver_concurrency,
        ),
        (
            "redeliver_interval",
            o.redeliver_interval != n.redeliver_interval,
        ),
        ("archive_for", o.archive_for != n.archive_for),
    ];
    if spool_open && let Some((key, _)) = changed.iter().find(|(_, c)| *c) {
        return Err(format!(
            "[spool] {key} changed: the spool's settings take effect only at start-up; restart payload-guard (or put the old value back to reload the rest)"
        ));
    }
    Ok(())
}

/// Re-reads the configuration. A valid one replaces the running one for new requests
/// (in-flight requests finish with theirs); an invalid one is refused with the same message
/// `check` prints, and the old one stays in force. Settings bound at start-up (listeners,
/// worker threads, buffer budget, incident log, TLS on/off) need a restart: said in the log.
pub fn reload(proxy: &Proxy, path: &Path) -> Result<(), String> {
    let metrics = &proxy.shared().metrics;
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            metrics.reload(false);
            tracing::error!(config = %path.display(), error = %err, "reload refused: the old configuration stays in force");
            return Err(err.to_string());
        }
    };
    let old = proxy.current();
    let (o, n) = (&old.config.server, &config.server);
    for (key, changed) in [
        ("server.listen", o.listen != n.listen),
        ("server.admin_listen", o.admin_listen != n.admin_listen),
        (
            "server.worker_threads",
            o.worker_threads != n.worker_threads,
        ),
        (
            "server.buffer_budget",
            o.buffer_budget_bytes != n.buffer_budget_bytes,
        ),
        (
            "server.max_connections",
            o.max_connections != n.max_connections,
        ),
        ("server.tls (on/off)", o.tls.is_some() != n.tls.is_some()),
        (
            "incidents.path",
            old.config.incidents.path != config.incidents.path,
        ),
    ] {
        if changed {
            tracing::warn!(
                key,
                "changed in the config file, but takes effect only after a restart"
            );
        }
    }
    if let Err(why) = spool_change(&old.config, &config, proxy.shared().spool.is_some()) {
        metrics.reload(false);
        tracing::error!(config = %path.display(), reason = %why, "reload refused: the old configuration stays in force");
        return Err(why);
    }
    for route in &config.routes {
        metrics.init_route(&route.name);
    }
    let learned = &proxy.shared().learned;
    // `payload-guard limits --reset` edits the file; a changed upstream_limit forgets a route.
    learned.reread();
    learned.reconcile(
        config
            .routes
            .iter()
            .map(|r| crate::state::limits::Configured {
                route: &r.name,
                upstream_limit: r.upstream_limit_bytes,
            }),
    );
    match Runtime::new(config) {
        Ok(runtime) => {
            proxy.replace(runtime);
            metrics.reload(true);
            tracing::info!(config = %path.display(), "configuration reloaded");
            Ok(())
        }
        Err(err) => {
            metrics.reload(false);
            tracing::error!(error = %err, "reload refused: the old configuration stays in force");
            Err(err.to_string())
        }
    }
}
