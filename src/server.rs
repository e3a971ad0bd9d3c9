//! Stage 1: accept connections. Takes a bound listener and a shutdown future (so tests pass
//! `127.0.0.1:0` and production passes SIGTERM/ctrl-c), serves HTTP/1.1 and h2c through
//! hyper-util's auto builder with the timeouts and limits hyper leaves to us, caps open
//! connections, and drains in-flight requests on shutdown within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::{MAX_HEADERS, ServerConfig};
use crate::forward::ConnUpstream;
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
/// in-flight requests `server.shutdown_grace` to finish. With `[server.tls]` every connection
/// is TLS (HTTP/1.1 or HTTP/2 by ALPN); the certificate in force is re-read on reload.
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
    let tls_at_start = server.tls.is_some();
    tokio::pin!(shutdown);
    tracing::info!(listen = %local, tls = tls_at_start, "payload-guard listening");
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
        let runtime = proxy.current();
        // The certificate of the config in force (re-read on reload); TLS on/off is fixed at start.
        let tls = runtime
            .config
            .server
            .tls
            .as_ref()
            .filter(|_| tls_at_start)
            .map(|tls| tokio_rustls::TlsAcceptor::from(tls.server_config.clone()));
        let conn = Conn {
            builder: builder.clone(),
            proxy: proxy.clone(),
            info: ConnInfo {
                peer,
                local,
                proto: if tls_at_start { "https" } else { "http" },
                framing_conflict: false,
                upstream: None,
            },
            watcher: graceful.watcher(),
        };
        let open = OpenConnection::new(proxy.shared().open_connections.clone());
        let handshake_timeout = runtime.config.server.header_read_timeout;
        tokio::spawn(async move {
            let _open = open;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => conn.serve(tls_stream).await,
                        Ok(Err(err)) => {
                            tracing::debug!(peer = %peer, error = %err, "tls handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "tls handshake timed out"),
                    }
                }
                None if tls_at_start => {
                    tracing::error!(peer = %peer, "[server.tls] was removed by a reload: TLS connections are refused until a restart");
                }
                None => conn.serve(stream).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(grace = %humantime::format_duration(server.shutdown_grace), "shutting down: draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(server.shutdown_grace) => {
            tracing::warn!(grace = %humantime::format_duration(server.shutdown_grace), "shutdown grace elapsed, closing remaining connections");
        }
    }
    Ok(())
}

/// Counts an open connection while alive.
struct OpenConnection(Arc<AtomicU64>);

impl OpenConnection {
    fn new(counter: Arc<AtomicU64>) -> OpenConnection {
        counter.fetch_add(1, Ordering::Relaxed);
        OpenConnection(counter)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One accepted connection, ready to be served over any transport.
struct Conn {
    builder: Arc<Builder<TokioExecutor>>,
    proxy: Proxy,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Conn {
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            builder,
            proxy,
            info,
            watcher,
        } = self;
        let peer = info.peer;
        let flags = Arc::new(FramingFlags::default());
        let io = FramingWatch::new(io, flags.clone());
        let upstream = Arc::new(ConnUpstream::default());
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let is_h1 = req.version() < http::Version::HTTP_2;
            let info = ConnInfo {
                framing_conflict: is_h1 && flags.next_request_conflicts(),
                upstream: is_h1.then(|| upstream.clone()),
                ..info.clone()
            };
            // Boxed so the compiler checks `Send` on concrete types (works around a
            // higher-ranked lifetime limitation with boxed error types in async fns).
            let fut: HandlerFuture = Box::pin(async move { Ok(proxy.handle(req, info).await) });
            fut
        });
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        if let Err(err) = watcher.watch(conn).await {
            tracing::debug!(peer = %peer, error = %err, "connection closed with error");
        }
    }
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
