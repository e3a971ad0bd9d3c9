//! Stage 1: accept connections. Takes a bound listener and a shutdown future (so tests pass
//! `127.0.0.1:0` and production passes SIGTERM/ctrl-c), serves HTTP/1.1 and h2c through
//! hyper-util's auto builder with the timeouts and limits hyper leaves to us, caps open
//! connections, and drains in-flight requests on shutdown within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{MAX_HEADERS, ServerConfig};
use crate::framing::{FramingFlags, FramingWatch};
use crate::proxy::{ConnInfo, Proxy, ProxyBody};

type HandlerFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// Builds the connection builder with the header timeout, header limits and HTTP/2 settings.
pub fn connection_builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes.max(8192))
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.max_concurrent_streams)
        .max_header_list_size(server.max_header_bytes as u32);
    builder
}

/// Serves the proxy on `listener` until `shutdown` resolves, then stops accepting and gives
/// in-flight requests `server.shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let server = proxy.current().config.server.clone();
    let local = listener.local_addr()?;
    let builder = Arc::new(connection_builder(&server));
    let limit = Arc::new(Semaphore::new(server.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    tracing::info!(listen = %local, "payload-guard listening");
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::error!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            peer,
            local,
            proto: "http",
            framing_conflict: false,
        };
        let flags = Arc::new(FramingFlags::default());
        let stream = FramingWatch::new(stream, flags.clone());
        let proxy = proxy.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let info = ConnInfo {
                framing_conflict: req.version() < http::Version::HTTP_2
                    && flags.next_request_conflicts(),
                ..info
            };
            // Boxed so the compiler checks `Send` on concrete types (works around a
            // higher-ranked lifetime limitation with boxed error types in async fns).
            let fut: HandlerFuture = Box::pin(async move { Ok(proxy.handle(req, info).await) });
            fut
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(peer = %peer, error = %err, "connection closed with error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(grace = ?server.shutdown_grace, "shutting down: draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(server.shutdown_grace) => {
            tracing::warn!(grace = ?server.shutdown_grace, "shutdown grace elapsed, closing remaining connections");
        }
    }
    Ok(())
}

/// Serves the admin endpoints (`/healthz`) on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    tracing::info!(listen = %listener.local_addr()?, "admin listening");
    loop {
        let (stream, _) = tokio::select! {
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
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(admin))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn admin(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (200, r#"{"status":"ok"}"#),
        _ => (404, r#"{"error":"not_found"}"#),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Resolves on SIGTERM or SIGINT (ctrl-c).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// The addresses a running instance is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The public listener.
    pub listen: SocketAddr,
    /// The admin listener, if any.
    pub admin: Option<SocketAddr>,
}
