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
        (&Method::GET, "/readyz") => {
            let spool_ok = admin
                .proxy
                .shared()
                .spool
                .as_ref()
                .is_none_or(|s| s.spool.writable());
            if admin.ready.load(Ordering::Acquire) && spool_ok {
                json(StatusCode::OK, serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "starting"}),
                )
            }
        }
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
        (&Method::POST, "/reload") => match reload(&admin.proxy, &admin.config_path) {
            Ok(()) => json(StatusCode::OK, serde_json::json!({"status": "reloaded"})),
            Err(message) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "reload_failed", "message": message}),
            ),
        },
        (&Method::GET, path) if path.starts_with("/originals/") => {
            original(admin, &path["/originals/".len()..])
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/reload") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        ),
    }
}

/// `GET /originals/<id>`: the exact untrimmed bytes of an archived original.
fn original(admin: &Admin, id: &str) -> Response<Full<Bytes>> {
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
    match state.spool.read(crate::spool::State::Archive, &id) {
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
    for route in &config.routes {
        metrics.init_route(&route.name);
    }
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
