//! Stage 6: the upstream side. Builds one pooled client per route (HTTP/1.1, and HTTP/2 when
//! TLS ALPN offers it), keeps a dedicated upstream connection per downstream HTTP/1 connection
//! for plain-HTTP receivers ([`ConnUpstream`]), rewrites the request's URI and headers for the
//! receiver, and turns upstream failures into [`ProxyError`]s.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;

use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::limit::BodyError;

/// The body type sent upstream: a streamed [`crate::limit::LimitedBody`] or a buffered one.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BodyError>;

/// A route's pooled upstream client.
pub type UpstreamClient = Client<HttpsConnector<TolerantConnector>, UpstreamBody>;

/// How long an idle pooled upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Root certificates: the Mozilla set (webpki-roots) plus the system's, loaded once.
pub(crate) fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        let _ = roots.add_parsable_certificates(native.certs);
        roots
    })
}

/// Builds the pooled client for one route.
pub fn build_client(route: &RouteConfig) -> Result<UpstreamClient, ProxyError> {
    let mut roots = base_roots().clone();
    for cert in &route.ca_certs {
        roots
            .add(cert.clone())
            .map_err(|e| ProxyError::Internal(format!("ca_file certificate rejected: {e}")))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ProxyError::Internal(format!("tls setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(route.connect_timeout));
    let http = TolerantConnector(http);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // Only requests that were never written to a (stale) pooled connection are retried.
        .retry_canceled_requests(true)
        .set_host(true)
        .build(https))
}

/// Where a request goes: method, upstream URI and the headers as rewritten for the receiver.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The request method.
    pub method: http::Method,
    /// The receiver's URI (absolute).
    pub uri: Uri,
    /// The headers for the receiver (hop-by-hop removed, `X-Forwarded-*` set).
    pub headers: HeaderMap,
}

impl Target {
    /// The same request with a body of exactly `len` bytes: `Content-Length` set, no
    /// `Transfer-Encoding` (some receivers silently truncate chunked bodies over their limit).
    pub fn with_content_length(mut self, len: u64) -> Target {
        self.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        self.headers.remove(header::TRANSFER_ENCODING);
        self
    }

    /// The HTTP/1.1 request with `body`.
    pub fn into_request(self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        *req.version_mut() = http::Version::HTTP_11;
        req
    }
}

/// Sends `req` over `upstream` (a sender connection's own upstream connection) when given,
/// else through the route's pooled client.
pub async fn send(
    pooled: &UpstreamClient,
    upstream: Option<&ConnUpstream>,
    req: Request<UpstreamBody>,
    connect_timeout: Duration,
) -> Result<Response<Incoming>, UpstreamError> {
    match upstream {
        Some(upstream) => upstream.request(pooled, req, connect_timeout).await,
        None => pooled.request(req).await.map_err(UpstreamError::Pooled),
    }
}

/// Why an upstream exchange failed, from either the pooled client or a [`ConnUpstream`].
#[derive(Debug)]
pub enum UpstreamError {
    /// The pooled client failed.
    Pooled(hyper_util::client::legacy::Error),
    /// Connecting a dedicated connection failed.
    Connect(std::io::Error),
    /// Connecting a dedicated connection took longer than `connect_timeout`.
    ConnectTimeout,
    /// The exchange on a dedicated connection failed.
    Exchange(hyper::Error),
}

/// The upstream connection of one downstream HTTP/1 connection, for plain-HTTP receivers.
///
/// A downstream HTTP/1 connection carries one request at a time, so its requests can all go
/// over one upstream connection of their own, like nginx's and HAProxy's keep-alive to the
/// backend. That skips the pooled client's per-request work (pool lock and checkout, and a
/// task spawned per request to return the connection to the pool). The connection closes
/// when the downstream connection does. Anything else (HTTPS receivers, HTTP/2 senders, a
/// request while the connection is busy) goes through the route's pooled client.
#[derive(Default)]
pub struct ConnUpstream {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// A request holds the connection (it is then `None` here).
    busy: bool,
    dedicated: Option<Dedicated>,
}

struct Dedicated {
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
    /// Set when a write to the receiver failed: the connection is never reused.
    write_failed: Arc<AtomicBool>,
}

/// Holds the connection for one request; hands it back (or frees the slot) when dropped,
/// also when the request is cancelled.
struct Lease<'a> {
    owner: &'a ConnUpstream,
    dedicated: Option<Dedicated>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut slot = lock(&self.owner.slot);
        slot.busy = false;
        slot.dedicated = self
            .dedicated
            .take()
            .filter(|d| !d.sender.is_closed() && !d.write_failed.load(Ordering::Acquire));
    }
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConnUpstream {
    /// Sends `req` (absolute URI) to the receiver: over this downstream connection's own
    /// upstream connection when the receiver is plain HTTP, else through `pooled`.
    pub async fn request(
        &self,
        pooled: &UpstreamClient,
        mut req: Request<UpstreamBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let authority = match req.uri().authority() {
            Some(a) if req.uri().scheme() == Some(&Scheme::HTTP) => a.clone(),
            _ => return pooled.request(req).await.map_err(UpstreamError::Pooled),
        };
        let Some(mut lease) = self.lease(&authority) else {
            return pooled.request(req).await.map_err(UpstreamError::Pooled);
        };
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        // HTTP/1 to the receiver itself: origin-form.
        let origin = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin);

        if let Some(dedicated) = lease.dedicated.as_mut() {
            if dedicated.sender.ready().await.is_ok() {
                match dedicated.sender.try_send_request(req).await {
                    Ok(response) => return Ok(response),
                    Err(mut err) => match err.take_message() {
                        // Never written (the receiver had closed the idle connection):
                        // safe to send on a new one, as the pooled client does.
                        Some(unsent) => req = unsent,
                        None => {
                            lease.dedicated = None;
                            return Err(UpstreamError::Exchange(err.into_error()));
                        }
                    },
                }
            }
            lease.dedicated = None;
        }
        // Boxed: connecting happens once per sender connection, its state need not be inline.
        let (mut sender, write_failed) = Box::pin(connect(&authority, connect_timeout)).await?;
        let response = sender.send_request(req).await;
        lease.dedicated = Some(Dedicated {
            authority,
            sender,
            write_failed,
        });
        response.map_err(UpstreamError::Exchange)
    }
}

impl ConnUpstream {
    /// Holds the connection for one request, or `None` when another request holds it.
    fn lease(&self, authority: &Authority) -> Option<Lease<'_>> {
        let mut slot = lock(&self.slot);
        if slot.busy {
            return None;
        }
        slot.busy = true;
        Some(Lease {
            owner: self,
            dedicated: slot.dedicated.take().filter(|d| {
                // Byte equality, not `Authority`'s case-insensitive comparison: both come
                // from the route's configured upstream.
                d.authority.as_str() == authority.as_str()
                    && !d.sender.is_closed()
                    && !d.write_failed.load(Ordering::Acquire)
            }),
        })
    }
}

/// Opens a plain HTTP/1 connection to `authority` and starts its connection task.
async fn connect(
    authority: &Authority,
    connect_timeout: Duration,
) -> Result<(http1::SendRequest<UpstreamBody>, Arc<AtomicBool>), UpstreamError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = match tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(UpstreamError::Connect(err)),
        Err(_) => return Err(UpstreamError::ConnectTimeout),
    };
    let _ = stream.set_nodelay(true);
    let io = ResetTolerant::new(TokioIo::new(stream));
    let write_failed = io.write_failed.clone();
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(UpstreamError::Exchange)?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, "upstream connection closed with error");
        }
    });
    Ok((sender, write_failed))
}

/// Upstream I/O that keeps reading after the receiver reset the connection.
///
/// A receiver that answers early (413 from the `Content-Length`) and closes without reading
/// the rest of the body makes its kernel reset the connection; the proxy's next write fails
/// with `ECONNRESET` or `EPIPE`. The receiver's answer is still in the socket's receive queue,
/// but hyper ends the exchange on the write error before reading it. This wrapper turns a
/// reset on write into "written" (the bytes are discarded, as a lingering close would), so
/// hyper goes on to read the answer and relay it; when there is none, the read fails and the
/// exchange ends as a reset. The sender's body keeps being drained meanwhile.
pub struct ResetTolerant<T> {
    inner: T,
    write_failed: Arc<AtomicBool>,
}

impl<T> ResetTolerant<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> ResetTolerant<T> {
        ResetTolerant {
            inner,
            write_failed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn failed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
    }

    /// A reset on write: remember it, report the bytes as written.
    fn swallow(&self, err: &std::io::Error) -> bool {
        let reset = matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        );
        if reset && !self.write_failed.swap(true, Ordering::AcqRel) {
            tracing::debug!(error = %err, "the receiver reset the connection while the body was sent: reading its answer");
        }
        reset
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for ResetTolerant<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for ResetTolerant<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.failed() {
            return Poll::Ready(Ok(buf.len()));
        }
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Err(err)) if this.swallow(&err) => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        let total = bufs.iter().map(|b| b.len()).sum();
        if this.failed() {
            return Poll::Ready(Ok(total));
        }
        match std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(err)) if this.swallow(&err) => Poll::Ready(Ok(total)),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.failed() {
            return Poll::Ready(Ok(()));
        }
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(err)) if this.swallow(&err) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.failed() {
            return Poll::Ready(Ok(()));
        }
        match std::pin::Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Err(err)) if this.swallow(&err) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<T: Connection> Connection for ResetTolerant<T> {
    fn connected(&self) -> Connected {
        // A connection whose writes failed is not reused: the receiver reset it, so its read
        // side fails right after the answer, and hyper closes it before the pool hands it out.
        self.inner.connected()
    }
}

/// The pooled client's TCP connector, with [`ResetTolerant`] connections.
#[derive(Clone)]
pub struct TolerantConnector(HttpConnector);

impl tower_service::Service<Uri> for TolerantConnector {
    type Response = ResetTolerant<TokioIo<tokio::net::TcpStream>>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(ResetTolerant::new) })
    }
}

/// The upstream URI: the route's upstream path joined with the rest of the request path after
/// the route prefix, plus the sender's query string.
pub fn upstream_uri(base: &Uri, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    // The common case, a sender posting to the route's prefix itself: the route's own URI,
    // shared, not rebuilt (when it has a path and no query of its own to drop).
    if rest.is_empty()
        && query.is_none()
        && base
            .path_and_query()
            .is_some_and(|pq| pq.query().is_none() && !pq.as_str().is_empty())
    {
        return Ok(base.clone());
    }
    let base_path = base.path();
    let mut path = String::with_capacity(base_path.len() + rest.len() + 1);
    if rest.is_empty() {
        path.push_str(base_path);
    } else {
        path.push_str(base_path.trim_end_matches('/'));
        path.push_str(rest);
    }
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    let pq = PathAndQuery::try_from(path)
        .map_err(|e| ProxyError::Internal(format!("cannot build upstream path: {e}")))?;
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts)
        .map_err(|e| ProxyError::Internal(format!("cannot build upstream URI: {e}")))
}

/// Headers that describe one connection, never the message: removed in both directions.
///
/// A `static`, not a `const`: a `const` array is built and dropped again at every use, once per
/// header name on every request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names, and any
/// `Proxy-*` header.
///
/// One pass over the names finds what is there; only those are removed (each removal hashes
/// the name, and most requests carry one hop-by-hop header, `Connection`, or none).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present: Vec<HeaderName> = Vec::new();
    let mut connection = false;
    for name in headers.keys() {
        if *name == header::CONNECTION {
            connection = true;
            present.push(name.clone());
        } else if HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-") {
            present.push(name.clone());
        }
    }
    if connection {
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',') {
                if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes())
                    && headers.contains_key(&name)
                {
                    present.push(name);
                }
            }
        }
    }
    for name in present {
        headers.remove(name);
    }
}

/// The `Host` for a plain-HTTP upstream (see [`ForwardedFor::upstream_host`]).
pub fn plain_http_host(upstream: &Uri) -> Option<HeaderValue> {
    if upstream.scheme() != Some(&Scheme::HTTP) {
        return None;
    }
    HeaderValue::from_str(upstream.authority()?.as_str()).ok()
}

/// Facts about the inbound request that the forwarded headers carry.
#[derive(Debug, Clone)]
pub struct ForwardedFor<'a> {
    /// The sender's IP.
    pub peer: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The `Host` (or `:authority`) the sender used.
    pub host: Option<&'a str>,
    /// The request id (`None`: not a valid header value, not sent).
    pub request_id: Option<&'a HeaderValue>,
    /// Keep the sender's `Host`.
    pub preserve_host: bool,
    /// The `Host` the receiver gets when the sender's is not kept: the upstream's authority
    /// for a plain-HTTP upstream, put in place of the sender's with one header operation.
    /// `None` (HTTPS, HTTP/2) leaves it to the client, which sets it from the URI.
    pub upstream_host: Option<&'a HeaderValue>,
}

/// `X-Request-Id`, on the forwarded request and on the proxy's answer. A `HeaderName`, not a
/// `&str`: a string is parsed into a name on every lookup or insert.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Rewrites the request headers for the receiver: hop-by-hop removed, `X-Forwarded-*` and
/// `X-Request-Id` set, `Host` replaced by the upstream authority unless `preserve_host`.
pub fn prepare_request_headers(headers: &mut HeaderMap, fwd: &ForwardedFor<'_>) {
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    strip_hop_by_hop(headers);
    // Each header below is looked up once (an entry, or an insert that returns the old value):
    // a custom name's hash is most of a header operation's cost.
    let forwarded_for = |prior: Option<&HeaderValue>| {
        let mut value = String::with_capacity(64);
        if let Some(prior) = prior.and_then(|v| v.to_str().ok())
            && !prior.trim().is_empty()
        {
            value.push_str(prior);
            value.push_str(", ");
        }
        crate::observe::PeerIp(fwd.peer).push_to(&mut value);
        HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
    };
    match headers.entry(X_FORWARDED_FOR) {
        Entry::Occupied(mut entry) => {
            // The first value, as `get` gives it; `insert` replaces them all.
            if let Some(v) = forwarded_for(Some(entry.get())) {
                entry.insert(v);
            }
        }
        Entry::Vacant(entry) => {
            if let Some(v) = forwarded_for(None) {
                entry.insert(v);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    // The sender's `Host` value itself when it has one (no copy); else the authority it used.
    let sender_host = if fwd.preserve_host {
        headers.get(header::HOST).cloned()
    } else if let Some(upstream) = fwd.upstream_host {
        headers.insert(header::HOST, upstream.clone())
    } else {
        // The client sets Host from the upstream URI when it is absent.
        headers.remove(header::HOST)
    };
    let forwarded_host =
        sender_host.or_else(|| fwd.host.and_then(|h| HeaderValue::from_str(h).ok()));
    if fwd.preserve_host
        && !headers.contains_key(header::HOST)
        && let Some(host) = &forwarded_host
    {
        headers.insert(header::HOST, host.clone());
    }
    if let Some(host) = forwarded_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    match (headers.entry(X_REQUEST_ID), fwd.request_id) {
        (_, None) => {}
        (Entry::Occupied(entry), Some(id)) if entry.get() == id => {}
        (Entry::Occupied(mut entry), Some(id)) => {
            entry.insert(id.clone());
        }
        (Entry::Vacant(entry), Some(id)) => {
            entry.insert(id.clone());
        }
    }
}

/// Classifies a failed upstream exchange (the request body's own failures are handled by the
/// caller, which knows them from [`crate::limit::BodyStats`]).
pub fn classify(err: &UpstreamError, route: &RouteConfig) -> ProxyError {
    match err {
        UpstreamError::Pooled(err) => classify_error(err, route),
        UpstreamError::ConnectTimeout => ProxyError::UpstreamConnectTimeout(route.connect_timeout),
        UpstreamError::Connect(err) if err.kind() == std::io::ErrorKind::TimedOut => {
            ProxyError::UpstreamConnectTimeout(route.connect_timeout)
        }
        UpstreamError::Connect(err) => ProxyError::UpstreamConnect(connect_failure(route, err)),
        UpstreamError::Exchange(err) => broken(err),
    }
}

/// A failed exchange after connecting: a reset without an answer, or another failure.
fn broken(err: &(dyn StdError + 'static)) -> ProxyError {
    let reset = has_io_kind(err, std::io::ErrorKind::ConnectionReset)
        || has_io_kind(err, std::io::ErrorKind::BrokenPipe)
        || is_incomplete(err);
    if reset {
        ProxyError::UpstreamReset(error_chain(err))
    } else {
        ProxyError::UpstreamBroken(error_chain(err))
    }
}

/// hyper's "connection closed before message completed".
fn is_incomplete(err: &(dyn StdError + 'static)) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Classifies a failed exchange of the pooled client.
pub fn classify_error(err: &hyper_util::client::legacy::Error, route: &RouteConfig) -> ProxyError {
    let chain = error_chain(err);
    if err.is_connect() {
        if has_io_kind(err, std::io::ErrorKind::TimedOut) || chain.contains("timed out") {
            return ProxyError::UpstreamConnectTimeout(route.connect_timeout);
        }
        return ProxyError::UpstreamConnect(connect_failure(route, err));
    }
    broken(err)
}

/// `a: b: c` from an error and its sources, for logs and error bodies.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// "cannot connect to the receiver at HOST:PORT: connection refused", in plain words.
fn connect_failure(route: &RouteConfig, err: &(dyn StdError + 'static)) -> String {
    let authority = route
        .upstream
        .authority()
        .map_or_else(|| route.upstream.to_string(), |a| a.to_string());
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    let mut io = None;
    while let Some(s) = source {
        if let Some(e) = s.downcast_ref::<std::io::Error>() {
            io = Some(e);
        }
        source = s.source();
    }
    let why = match io {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is the receiver running?)".to_string()
        }
        Some(e) => {
            let text = e.to_string();
            text.split(" (os error")
                .next()
                .unwrap_or(&text)
                .to_lowercase()
        }
        None => error_chain(err),
    };
    format!("cannot connect to the receiver at {authority}: {why}")
}

fn has_io_kind(err: &(dyn StdError + 'static), kind: std::io::ErrorKind) -> bool {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == kind)
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// A body that yields `prefix`, then the rest of the original body.
pub fn prefixed_body(prefix: Bytes, rest: Option<UpstreamBody>) -> UpstreamBody {
    match rest {
        None => Full::new(prefix)
            .map_err(|never| match never {})
            .boxed_unsync(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_paths_and_keeps_query() {
        let base: Uri = "http://127.0.0.1:3000/webhook".parse().unwrap();
        let u = |rest, q| upstream_uri(&base, rest, q).unwrap().to_string();
        assert_eq!(u("", None), "http://127.0.0.1:3000/webhook");
        assert_eq!(
            u("/x/y", Some("a=1&b=2")),
            "http://127.0.0.1:3000/webhook/x/y?a=1&b=2"
        );
        let root: Uri = "http://h:1".parse().unwrap();
        assert_eq!(
            upstream_uri(&root, "", None).unwrap().to_string(),
            "http://h:1/"
        );
        assert_eq!(
            upstream_uri(&root, "/z", Some("q")).unwrap().to_string(),
            "http://h:1/z?q"
        );
        // The route's own URI as is, or rebuilt without a query of its own (as with a rest).
        assert_eq!(u("", None), base.to_string());
        let with_query: Uri = "http://h/hook?token=1".parse().unwrap();
        assert_eq!(
            upstream_uri(&with_query, "", None).unwrap().to_string(),
            "http://h/hook"
        );
        assert_eq!(
            upstream_uri(&with_query, "", Some("a=1"))
                .unwrap()
                .to_string(),
            "http://h/hook?a=1"
        );
        let slash: Uri = "https://h/hook/".parse().unwrap();
        assert_eq!(
            upstream_uri(&slash, "/z", None).unwrap().to_string(),
            "https://h/hook/z"
        );
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("http_synthflow_signature", "sig"),
            ("content-type", "application/json"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "http_synthflow_signature"]);
    }

    #[test]
    fn preserved_host_comes_from_the_authority_when_the_sender_sent_none() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        let receiver = HeaderValue::from_static("receiver.internal:3000");
        let fwd = ForwardedFor {
            peer: "::1".parse().unwrap(),
            proto: "https",
            host: Some("guard.example:8443"),
            request_id: Some(&HeaderValue::from_static("abc")),
            preserve_host: true,
            upstream_host: Some(&receiver),
        };
        prepare_request_headers(&mut h, &fwd);
        assert_eq!(h["host"], "guard.example:8443");
        assert_eq!(h["x-forwarded-host"], "guard.example:8443");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-request-id"], "abc");
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "host",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn forwarded_headers_are_added() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("host", HeaderValue::from_static("guard.example"));
        let fwd = ForwardedFor {
            peer: "127.0.0.1".parse().unwrap(),
            proto: "http",
            host: Some("guard.example"),
            request_id: Some(&HeaderValue::from_static("abc")),
            preserve_host: false,
            upstream_host: None,
        };
        prepare_request_headers(&mut h, &fwd);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "guard.example");
        assert_eq!(h["x-request-id"], "abc");
        assert!(!h.contains_key("host"));
    }

    #[test]
    fn a_plain_http_upstream_gets_its_host_in_place_of_the_senders() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert("host", HeaderValue::from_static("guard.example"));
        h.append("x-request-id", HeaderValue::from_static("other"));
        h.append("x-request-id", HeaderValue::from_static("abc"));
        let receiver = plain_http_host(&"http://receiver.internal:3000/hook".parse().unwrap());
        let fwd = ForwardedFor {
            peer: "127.0.0.1".parse().unwrap(),
            proto: "http",
            host: None,
            request_id: Some(&HeaderValue::from_static("abc")),
            preserve_host: false,
            upstream_host: receiver.as_ref(),
        };
        prepare_request_headers(&mut h, &fwd);
        assert_eq!(h["host"], "receiver.internal:3000");
        assert_eq!(h.get_all("host").iter().count(), 1);
        assert_eq!(h["x-forwarded-host"], "guard.example");
        // The first value carries on, and one value replaces them all.
        let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["10.0.0.1, 127.0.0.1"]);
        let ids: Vec<_> = h.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["abc"]);
        assert_eq!(
            plain_http_host(&"https://receiver.internal/hook".parse().unwrap()),
            None
        );
    }
}
