//! Stage 1: accept connections. Takes a bound listener and a shutdown future (so tests pass
//! `127.0.0.1:0` and production passes SIGTERM/ctrl-c), serves HTTP/1.1 and h2c through
//! hyper-util's auto builder with the timeouts and limits hyper leaves to us, admits or sheds
//! connections ([`crate::shed`]: a new connection never waits in the kernel's queue), writes
//! an access line for what hyper refuses before the pipeline sees it, and drains in-flight
//! requests on shutdown within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::error::ProxyError;
use crate::forward::ConnUpstream;
use crate::framing::{FramingFlags, FramingWatch};
use crate::gate::WakeGate;
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Proxy, ProxyBody};
use crate::shed::{Admission, ConnTrack, PressureLimits, Refused, Stop};

/// How often the pressure rules are applied to open connections.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Refused connections being answered at once, at most; more are closed without an answer.
const MAX_REFUSING: usize = 256;
/// How long a refused connection is given to send its first bytes (to tell HTTP/2 from
/// HTTP/1.1) before it is answered.
const REFUSE_PEEK: Duration = Duration::from_millis(250);
/// The most hyper reads from a sender's connection at once. Its read buffer is also its head
/// limit, so `max_header_bytes` (64 KiB by default) is checked by the pipeline instead
/// (`proxy::admit`), and bodies are read in up to 384 KiB. A connection holds at most this
/// much of a head it has not finished reading.
///
/// 1 MiB POSTs, proxy CPU per request, three alternated runs of each: 128 KiB 529-634 µs,
/// 256 KiB 472-513, 512 KiB 437-473. But 512 KiB reads put the trim route's peak RSS (8
/// concurrent 5 MiB payloads) at 42.4 and 46.6 MiB in two runs (target 40; 24.0 with 256 KiB,
/// 32.0 with 128 KiB), and its CPU at 1.47-1.60x forwarding (target 1.5x). The 200 MiB upload's
/// peak RSS: 11.4-12.6 MiB with 128 KiB, 11.3-12.6 with 256 KiB (target 16). Reads of 256 KiB
/// had put it at 20 MiB in an earlier round, before `crate::alloc` and the cross-crate
/// optimized build; that is why this was 128 KiB.
///
/// 384 KiB, against 256 in the same hour (`benches/load/run.py --quick`, alternated): 1 MiB
/// proxy CPU 412-458 µs against 445-467; the trim route's peak RSS 26.7-34.3 MiB against
/// 31.4-32.4; the upload's 12.7-14.0 MiB against 12.8-13.2; 1 MiB POSTs' peak RSS (32
/// connections) 61-63 MiB against 52-54. 512 KiB failed the trim route's memory again
/// (37.2-43.1 MiB in three runs), likely because from 512 KiB on a read buffer is larger
/// than mimalloc's largest "large" object and gets pages of its own, and hyper allocates a
/// new one on most reads while the last chunk is still in use.
pub const READ_BUFFER_BYTES: usize = 384 * 1024;

// hyper's built-in header limit, which the server relies on (see `connection_builder`).
const _: () = assert!(crate::config::MAX_HEADERS == 100);

/// How often the allocator is given a chance to return freed memory (see [`allocator_tick`]).
const ALLOCATOR_TICK: Duration = Duration::from_secs(1);
/// The size of the allocation that gives it that chance: larger than mimalloc's largest
/// "large" object, so it takes and frees a page of its own.
const ALLOCATOR_TICK_BYTES: usize = 8 * 1024 * 1024;
/// How long a refused connection is drained after the answer, so the sender reads the answer
/// rather than a reset.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

type HandlerFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// Bodies up to this size usually arrive with their head or in one more read: their handler is
/// not gated (see [`may_stream_in_blocks`]).
const UNGATED_BODY_BYTES: u64 = 64 * 1024;

/// Whether `req`'s body may arrive in many blocks (over [`UNGATED_BODY_BYTES`], or of unknown
/// length), so that its handler is worth gating ([`WakeGate`]).
fn may_stream_in_blocks(req: &Request<Incoming>) -> bool {
    match http_body::Body::size_hint(req.body()).exact() {
        Some(len) => len > UNGATED_BODY_BYTES,
        None => true,
    }
}

/// Builds the connection builder with the header timeout, header limits and HTTP/2 settings.
pub fn connection_builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes.max(READ_BUFFER_BYTES))
        // Not `.max_headers(MAX_HEADERS)`: hyper's own limit is the same 100 (tests send 101),
        // kept in arrays on the stack, while an explicit limit makes it allocate and fill two
        // arrays for every request it parses.
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
    let admission = Admission::new(
        server.max_connections,
        server.max_connections_per_ip,
        server.body_min_rate_bytes,
    );
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let metrics = proxy.shared().metrics.clone();
    let sweeper = tokio::spawn(sweep(admission.clone(), proxy.clone()));
    let warn_flusher = tokio::spawn(crate::warn_limit::flush_task());
    let allocator = tokio::spawn(allocator_tick());
    let tls_at_start = server.tls.is_some();
    tokio::pin!(shutdown);
    tracing::info!(listen = %local, tls = tls_at_start, "payload-guard listening");
    loop {
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
        let limits = &runtime.config.server;
        admission.set_limits(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.body_min_rate_bytes,
        );
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                metrics.shed(refused.reason());
                match refusing.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let metrics = metrics.clone();
                        tokio::spawn(async move {
                            refuse(stream, peer, refused, tls_at_start, &metrics).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let err = refusal_error(refused);
                        crate::observe::connection_refused(peer, &err, false, Some(&metrics));
                    }
                }
                continue;
            }
        };
        if let Some(reason) = admitted.evicted {
            metrics.shed(reason);
        }
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
                track: Some(admitted.track.clone()),
            },
            track: admitted.track.clone(),
        };
        let open = OpenConnection::new(proxy.shared().open_connections.clone());
        let handshake_timeout = runtime.config.server.header_read_timeout;
        tokio::spawn(async move {
            let _open = open;
            let _admitted = admitted;
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
        });
    }
    drop(listener);
    sweeper.abort();
    warn_flusher.abort();
    allocator.abort();
    tracing::info!(grace = %humantime::format_duration(server.shutdown_grace), "shutting down: draining in-flight requests");
    admission.drain_all();
    tokio::select! {
        () = admission.all_closed() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(server.shutdown_grace) => {
            tracing::warn!(grace = %humantime::format_duration(server.shutdown_grace), "shutdown grace elapsed, closing remaining connections");
        }
    }
    Ok(())
}

/// Applies the pressure rules to open connections every [`SWEEP_EVERY`], with the timeouts of
/// the configuration in force, and counts what was shed.
async fn sweep(admission: Arc<Admission>, proxy: Proxy) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let server = &proxy.current().config.server;
        let limits = PressureLimits::new(
            server.header_read_timeout,
            server.body_idle_timeout,
            server.body_min_rate_bytes,
        );
        for reason in admission.sweep(&limits) {
            proxy.shared().metrics.shed(reason);
        }
    }
}

/// Lets the allocator return freed memory to the system when the proxy goes idle.
///
/// mimalloc (the binary's allocator) returns freed pages to the OS only after a purge delay
/// (1 s), and only when a later page is freed: once a load stops, nothing is freed any more and
/// the pages it used stay resident. Allocating and freeing one untouched block of a page of its
/// own every second is such a later free. The block is never written, so it costs no
/// resident memory; with another allocator it is an mmap and an munmap.
async fn allocator_tick() {
    let mut tick = tokio::time::interval(ALLOCATOR_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        drop(std::hint::black_box(Vec::<u8>::with_capacity(
            ALLOCATOR_TICK_BYTES,
        )));
    }
}

fn refusal_error(refused: Refused) -> ProxyError {
    match refused {
        Refused::PerIp => ProxyError::PerIpLimit,
        Refused::Full => ProxyError::OverCapacity,
    }
}

/// Answers a connection that is not admitted, at once: `503` with `Retry-After` and
/// `Connection: close` for HTTP/1.1, `GOAWAY` for HTTP/2 (a TLS connection is closed without
/// an answer: no handshake is spent on it). Then writes its access line.
async fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    refused: Refused,
    tls: bool,
    metrics: &Metrics,
) {
    let err = refusal_error(refused);
    let mut responded = false;
    if !tls {
        let mut first = [0u8; 64];
        let n = match tokio::time::timeout(REFUSE_PEEK, stream.read(&mut first)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        let answer = if first[..n].starts_with(b"PRI * HTTP/2.0") {
            h2_goaway()
        } else {
            http1_refusal(&err)
        };
        responded = stream.write_all(&answer).await.is_ok();
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(REFUSE_LINGER, async {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    crate::observe::connection_refused(peer, &err, responded, Some(metrics));
}

/// `503` with the error's JSON body, `Retry-After` and `Connection: close`.
fn http1_refusal(err: &ProxyError) -> Vec<u8> {
    let body = err.json_body(&uuid::Uuid::new_v4().to_string());
    let status = err.status();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        err.retry_after_secs().unwrap_or(1),
        body.len(),
        body
    )
    .into_bytes()
}

/// The server preface (an empty SETTINGS frame) and a GOAWAY with last stream 0 and
/// NO_ERROR: no stream was processed, so the sender may retry elsewhere or later.
fn h2_goaway() -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    out.extend_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    out
}

pub use crate::metrics::resident_bytes;

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
    track: Arc<ConnTrack>,
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
            track,
        } = self;
        let peer = info.peer;
        let metrics = proxy.shared().metrics.clone();
        let flags = Arc::new(FramingFlags::default());
        let io = FramingWatch::new(TrackedIo::new(io, track.clone()), flags.clone());
        let upstream = Arc::new(ConnUpstream::default());
        let conn_track = track.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let in_flight = conn_track.request_started();
            let is_h1 = req.version() < http::Version::HTTP_2;
            let info = ConnInfo {
                framing_conflict: is_h1 && flags.next_request_conflicts(),
                upstream: is_h1.then(|| upstream.clone()),
                ..info.clone()
            };
            // A body that does not come with its head makes hyper poll the handler again for
            // every block the connection reads; gated, the handler is polled when it was woken.
            let gated = is_h1 && may_stream_in_blocks(&req);
            // Boxed so the compiler checks `Send` on concrete types (works around a
            // higher-ranked lifetime limitation with boxed error types in async fns).
            let fut: HandlerFuture = crate::proxy::boxed(|| async move {
                let response = proxy.handle(req, info).await;
                drop(in_flight);
                Ok(response)
            });
            if gated {
                Box::pin(WakeGate::new(fut))
            } else {
                fut
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        tokio::pin!(conn);
        // Shedding and shutdown reach the connection through its tracker.
        let mut draining = false;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                stop = track.stopped(draining) => match stop {
                    Stop::Shed => {
                        tracing::debug!(peer = %peer, "connection shed");
                        return;
                    }
                    Stop::Drain => {
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                },
            }
        };
        if let Err(err) = result {
            tracing::debug!(peer = %peer, error = %err, "connection closed with error");
            let refusal =
                crate::error::connection_refusal(&*err as &(dyn std::error::Error + 'static));
            match refusal {
                // hyper's header timeout also ends idle keep-alive connections: only a head
                // that had begun is a refusal.
                Some(ProxyError::HeaderTimeout | ProxyError::ClientAbort)
                    if !track.inside_head() => {}
                Some(err) => {
                    let responded =
                        matches!(err, ProxyError::HeaderTooLarge | ProxyError::BadRequest(_));
                    crate::observe::connection_refused(peer, &err, responded, Some(&metrics));
                }
                None => {}
            }
        }
    }
}

/// Reports a connection's reads and writes to its [`ConnTrack`] (what the shedding logic
/// judges idleness and request heads by).
struct TrackedIo<T> {
    inner: T,
    track: Arc<ConnTrack>,
}

impl<T> TrackedIo<T> {
    fn new(inner: T, track: Arc<ConnTrack>) -> Self {
        TrackedIo { inner, track }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.track.on_read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.track.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.track.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
