//! Stage 3: body-size limits in two steps. [`precheck`] looks at the headers before any body byte
//! is read (a `Content-Length` over the limit is refused at once); [`LimitedBody`] then counts the
//! body while it streams, so chunked or unknown-length bodies are held to the same limit, and
//! enforces the idle and total body timeouts that hyper leaves to us.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::shed::{BodyKill, BodyProgress};

/// A boxed, thread-safe error, as hyper's bodies use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error type of every body the proxy passes on. A concrete type rather than [`BoxError`]:
/// a boxed trait object as a body error trips a higher-ranked lifetime limitation of the
/// compiler when hyper's connection futures are spawned (axum uses a newtype for the same reason).
#[derive(Debug)]
pub struct BodyError(BoxError);

impl BodyError {
    /// Wraps any error.
    pub fn new(err: impl Into<BoxError>) -> BodyError {
        BodyError(err.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// How long a refused sender's remaining body is still read and discarded (lingering close), so
/// that it reads our error response instead of a connection reset.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How many bytes a refused sender's remaining body may still send while we linger.
pub const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// The declared body length, after refusing ambiguous framing and bodies declared over `max_body`.
pub fn precheck(headers: &HeaderMap, max_body_bytes: u64) -> Result<Option<u64>, ProxyError> {
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    let mut declared: Option<u64> = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        if has_te {
            return Err(ProxyError::AmbiguousLength);
        }
        // Searched byte by byte: a value is a few digits, and this runs on every request.
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(ProxyError::BadContentLength);
            }
            // All ASCII digits, so UTF-8.
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|digits| digits.parse().ok())
                .ok_or(ProxyError::BadContentLength)?;
            if declared.is_some_and(|d| d != n) {
                return Err(ProxyError::BadContentLength);
            }
            declared = Some(n);
        }
    }
    match declared {
        Some(n) if n > max_body_bytes => Err(ProxyError::BodyTooLarge {
            limit: max_body_bytes,
        }),
        other => Ok(other),
    }
}

/// Why a streamed body was cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFailure {
    /// More bytes than the limit.
    TooLarge,
    /// No bytes for the idle timeout.
    Idle(Duration),
    /// Not complete within the total body timeout.
    Deadline(Duration),
    /// The sender's chunked framing broke.
    Framing(String),
    /// The sender went away before the body was complete.
    Aborted,
    /// Stopped by the shedding logic (see [`crate::shed`]): too slow under pressure, or
    /// evicted to make room for a new connection.
    TooSlow,
    /// The body could not be read for another reason.
    Read(String),
}

impl From<BodyKill> for BodyFailure {
    /// What the shedding logic's verdict on a body means for it.
    fn from(kill: BodyKill) -> Self {
        match kill {
            BodyKill::TooSlow => BodyFailure::TooSlow,
            BodyKill::Idle(d) => BodyFailure::Idle(d),
        }
    }
}

/// What the pipeline learns about a request body while it streams (shared with the body).
#[derive(Debug, Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    over_soft_limit: AtomicBool,
    complete: AtomicBool,
    failure: Mutex<Option<BodyFailure>>,
    /// Whether `failure` is set, read without its lock.
    failed: AtomicBool,
    /// The waker of the one task waiting in [`BodyStats::finished`]. An `AtomicWaker`, not a
    /// `Notify`: a registered `Notified` takes the notifier's lock each time it is polled.
    finished: AtomicWaker,
    /// The body's first bytes when it samples its head (see [`LimitedBody::sampling_head`]):
    /// the frames' own buffers, shared by reference count, not copied.
    head: Mutex<HeadFrames>,
}

/// The frames of a body's sampled head: usually one, held without a `Vec`.
#[derive(Debug, Default)]
struct HeadFrames {
    first: Option<Bytes>,
    more: Vec<Bytes>,
}

impl BodyStats {
    /// Body bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the body passed the soft limit (the receiver's `upstream_limit`).
    pub fn over_soft_limit(&self) -> bool {
        self.over_soft_limit.load(Ordering::Relaxed)
    }

    /// Whether the whole body was received.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Why the body was cut off, if it was.
    pub fn failure(&self) -> Option<BodyFailure> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// Whether the body was cut off (see [`BodyStats::failure`] for why).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Waits until the body completed or failed. One task at a time may wait on it.
    pub fn finished(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before the flags are read: a flag set after this reading wakes the
            // waker registered here.
            self.finished.register(cx.waker());
            if self.is_complete() || self.has_failed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn fail(&self, failure: BodyFailure) {
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(failure);
        }
        self.failed.store(true, Ordering::Release);
        self.finished.wake();
    }

    fn complete(&self) {
        self.complete.store(true, Ordering::Release);
        self.finished.wake();
    }

    /// The body's sampled head (empty unless it was sampled, see
    /// [`LimitedBody::sampling_head`]).
    pub fn head_sample(&self) -> Vec<u8> {
        let frames = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        let mut head = Vec::new();
        for frame in frames.first.iter().chain(&frames.more) {
            head.extend_from_slice(frame);
        }
        head
    }

    fn keep_head(&self, frame: Bytes) {
        let mut frames = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        if frames.first.is_none() {
            frames.first = Some(frame);
        } else {
            frames.more.push(frame);
        }
    }

    /// Records a body that was read elsewhere (e.g. buffered) as complete.
    pub fn record_complete(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.complete();
    }
}

/// The error a [`LimitedBody`] yields; the pipeline reads the reason from [`BodyStats`].
#[derive(Debug, thiserror::Error)]
#[error("request body cut off: {0:?}")]
pub struct BodyCutOff(pub BodyFailure);

/// Limits for a streamed body.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Hard limit: more fails the body.
    pub max_bytes: u64,
    /// Soft limit: more is only noted in the stats.
    pub soft_bytes: Option<u64>,
    /// Longest gap between body bytes.
    pub idle_timeout: Duration,
    /// Longest time for the whole body.
    pub total_timeout: Duration,
}

/// A boxed timer (the body is `Unpin`, so timers live on the heap).
type Timer = Pin<Box<Sleep>>;

/// A request body that counts its bytes, fails past the limit, and fails when the sender stalls.
///
/// On failure the upstream request it feeds is aborted by hyper (the receiver never sees a
/// complete request); a body cut off for size is drained for a short while in the background so
/// the sender can read the 413 instead of a reset.
pub struct LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    inner: Option<B>,
    limits: BodyLimits,
    seen: u64,
    started: Instant,
    last_data: Instant,
    /// The idle and total timers, armed the first time the body has to wait: a body that
    /// arrives in one go (most webhooks) never touches the timer wheel.
    timers: Option<(Timer, Timer)>,
    stats: Arc<BodyStats>,
    ended: bool,
    /// This body's progress as the connection's shedding logic sees it, registered the first
    /// time the body waits for the sender (a body that arrives in one go is never slow).
    progress: Option<Arc<BodyProgress>>,
    /// The connection to register with, until then.
    conn: Option<Arc<crate::shed::ConnTrack>>,
    /// How many more of the first bytes go to [`BodyStats::head_sample`].
    sample_room: usize,
}

impl<B> LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Wraps `inner`; the clocks start now. `conn` is the connection the body arrives on,
    /// which the body reports its progress to once it has to wait (see `crate::shed`).
    pub fn new(
        inner: B,
        limits: BodyLimits,
        stats: Arc<BodyStats>,
        conn: Option<&Arc<crate::shed::ConnTrack>>,
    ) -> Self {
        let now = Instant::now();
        let ended = inner.is_end_stream();
        if ended {
            stats.complete();
        }
        LimitedBody {
            inner: Some(inner),
            limits,
            seen: 0,
            started: now,
            last_data: now,
            timers: None,
            stats,
            ended,
            progress: None,
            conn: if ended { None } else { conn.cloned() },
            sample_room: 0,
        }
    }

    /// Keeps the body's first `bytes` in its stats as they pass (see
    /// [`BodyStats::head_sample`]), so its incidents can name the fields that dominate it
    /// without the body ever being held whole.
    pub fn sampling_head(mut self, bytes: usize) -> Self {
        self.sample_room = bytes;
        self
    }

    fn cut_off(&mut self, failure: BodyFailure) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        if let Some(inner) = self.inner.take()
            && failure == BodyFailure::TooLarge
        {
            linger(inner);
        }
        self.stats.fail(failure.clone());
        Poll::Ready(Some(Err(BodyError::new(BodyCutOff(failure)))))
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(kill) = this.progress.as_ref().and_then(|p| p.killed(cx.waker())) {
            return this.cut_off(kill.into());
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.stats.bytes.store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limits.max_bytes {
                        return this.cut_off(BodyFailure::TooLarge);
                    }
                    if this.limits.soft_bytes.is_some_and(|soft| this.seen > soft) {
                        this.stats.over_soft_limit.store(true, Ordering::Relaxed);
                    }
                    if this.sample_room > 0 && !data.is_empty() {
                        let kept = data.slice(..data.len().min(this.sample_room));
                        this.sample_room -= kept.len();
                        this.stats.keep_head(kept);
                    }
                    // Before the body first waits, nothing reads the time of its last data
                    // (the timers and the shedding logic start then): no clock read.
                    if !data.is_empty()
                        && let Some((idle, _)) = this.timers.as_mut()
                    {
                        this.last_data = Instant::now();
                        if let Some(progress) = &this.progress {
                            progress.data(this.seen, this.last_data);
                        }
                        idle.as_mut()
                            .reset(this.last_data + this.limits.idle_timeout);
                    }
                }
                // A length-delimited body may never be polled for its end: note it here.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.ended = true;
                    this.stats.complete();
                    if let Some(progress) = &this.progress {
                        progress.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                let err: BoxError = err.into();
                this.cut_off(read_failure(&*err))
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.ended = true;
                this.stats.complete();
                if let Some(progress) = &this.progress {
                    progress.finish();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timers.is_none() {
                    // The first wait for the sender: the idle clock starts now, and the
                    // shedding logic learns of the body (with its bytes so far).
                    let now = Instant::now();
                    this.last_data = now;
                    if let Some(conn) = this.conn.take() {
                        let progress = conn.body_started(this.started);
                        progress.data(this.seen, now);
                        // Registers this task's waker: an eviction from now on wakes it.
                        if let Some(kill) = progress.killed(cx.waker()) {
                            this.progress = Some(progress);
                            return this.cut_off(kill.into());
                        }
                        this.progress = Some(progress);
                    }
                }
                let (started, last_data, limits) = (this.started, this.last_data, this.limits);
                let (idle, deadline) = this.timers.get_or_insert_with(|| {
                    (
                        Box::pin(tokio::time::sleep_until(last_data + limits.idle_timeout)),
                        Box::pin(tokio::time::sleep_until(started + limits.total_timeout)),
                    )
                });
                if deadline.as_mut().poll(cx).is_ready() {
                    return this.cut_off(BodyFailure::Deadline(this.limits.total_timeout));
                }
                if idle.as_mut().poll(cx).is_ready() {
                    return this.cut_off(BodyFailure::Idle(this.limits.idle_timeout));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl<B> Drop for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        if let Some(progress) = &self.progress {
            progress.finish();
        }
        // Dropped before its end: the receiver answered early (e.g. its own 413) or the upstream
        // request failed. Drain the rest so the sender reads our response, not a reset.
        if let Some(inner) = self.inner.take()
            && !self.ended
        {
            linger(inner);
        }
    }
}

/// Reads and discards what is left of a refused request body, for at most [`LINGER_TIME`] and
/// [`LINGER_BYTES`], so the sender can read the response before the connection closes (what
/// nginx calls lingering close). Dropping the body afterwards closes the connection.
pub fn linger<B>(body: B)
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    if body.is_end_stream() {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let mut body = body;
        let mut drained = 0u64;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while drained < LINGER_BYTES {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    Some(Ok(frame)) => {
                        drained += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    _ => break,
                }
            }
        })
        .await;
    });
}

/// Names why reading a sender's body failed: the sender went away (an unexpected end, a reset),
/// its chunked framing was malformed, or something else.
pub fn read_failure(err: &(dyn std::error::Error + 'static)) -> BodyFailure {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            match io.kind() {
                ErrorKind::UnexpectedEof
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => return BodyFailure::Aborted,
                ErrorKind::InvalidInput | ErrorKind::InvalidData => {
                    return BodyFailure::Framing(io.to_string());
                }
                _ => {}
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return BodyFailure::Aborted;
        }
        // An HTTP/2 sender that resets its stream (RST_STREAM) or the connection mid-body
        // (h2's error, which hyper wraps, says so only in its text).
        let text = e.to_string();
        if text.contains("stream error received") || text.contains("connection error received") {
            return BodyFailure::Aborted;
        }
        current = e.source();
    }
    BodyFailure::Read(err.to_string())
}

/// Converts a failure of the body into the error the sender gets.
pub fn failure_to_error(failure: BodyFailure, max_body_bytes: u64) -> ProxyError {
    match failure {
        BodyFailure::TooLarge => ProxyError::BodyTooLarge {
            limit: max_body_bytes,
        },
        BodyFailure::Idle(d) => ProxyError::BodyIdleTimeout(d),
        BodyFailure::Deadline(d) => ProxyError::BodyTimeout(d),
        BodyFailure::Framing(why) => ProxyError::BadFraming(why),
        BodyFailure::Aborted => ProxyError::ClientAbort,
        BodyFailure::TooSlow => ProxyError::BodyTooSlow,
        BodyFailure::Read(why) => ProxyError::BodyRead(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::{BodyExt, StreamBody};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn precheck_reads_content_length() {
        assert_eq!(
            precheck(&headers(&[("content-length", "10")]), 10).unwrap(),
            Some(10)
        );
        assert_eq!(precheck(&headers(&[]), 10).unwrap(), None);
        assert!(matches!(
            precheck(&headers(&[("content-length", "11")]), 10),
            Err(ProxyError::BodyTooLarge { limit: 10 })
        ));
        assert!(matches!(
            precheck(
                &headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
                10
            ),
            Err(ProxyError::AmbiguousLength)
        ));
        assert!(matches!(
            precheck(&headers(&[("content-length", "5, 6")]), 10),
            Err(ProxyError::BadContentLength)
        ));
        assert!(matches!(
            precheck(&headers(&[("content-length", "+5")]), 10),
            Err(ProxyError::BadContentLength)
        ));
    }

    type Chunks = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

    type ChannelBody =
        StreamBody<tokio_stream_shim::ReceiverStream<Result<Frame<Bytes>, std::io::Error>>>;

    fn channel_body() -> (Chunks, ChannelBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (tx, StreamBody::new(tokio_stream_shim::ReceiverStream(rx)))
    }

    /// A minimal `Stream` over an mpsc receiver, to drive bodies in tests without extra crates.
    mod tokio_stream_shim {
        use std::pin::Pin;
        use std::task::{Context, Poll};
        pub(super) struct ReceiverStream<T>(pub(super) tokio::sync::mpsc::Receiver<T>);
        impl<T> futures_util::Stream for ReceiverStream<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }

    fn limits(max: u64) -> BodyLimits {
        BodyLimits {
            max_bytes: max,
            soft_bytes: Some(4),
            idle_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(300),
        }
    }

    #[tokio::test]
    async fn counts_and_cuts_off_past_the_limit() {
        let (tx, body) = channel_body();
        let stats = Arc::new(BodyStats::default());
        let mut limited = LimitedBody::new(body, limits(10), stats.clone(), None);
        tx.send(Ok(Frame::data(Bytes::from_static(b"123456"))))
            .await
            .unwrap();
        let frame = limited.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "123456");
        assert!(stats.over_soft_limit());
        tx.send(Ok(Frame::data(Bytes::from_static(b"78901"))))
            .await
            .unwrap();
        assert!(limited.frame().await.unwrap().is_err());
        assert_eq!(stats.failure(), Some(BodyFailure::TooLarge));
        assert_eq!(stats.bytes(), 11);
    }

    #[tokio::test]
    async fn the_shedding_logic_sees_a_body_once_it_waits_for_the_sender() {
        let admission = crate::shed::Admission::new(10, 10, 1024);
        let conn = admission.admit("127.0.0.2".parse().unwrap()).unwrap();
        let _request = conn.track.request_started();
        let (tx, body) = channel_body();
        let stats = Arc::new(BodyStats::default());
        let mut limited = LimitedBody::new(body, limits(100), stats, Some(&conn.track));
        tx.send(Ok(Frame::data(Bytes::from_static(b"123"))))
            .await
            .unwrap();
        assert!(limited.frame().await.unwrap().is_ok());
        // Its bytes so far came without a wait: not a body in progress yet.
        assert!(conn.track.body_bytes().is_empty());
        let waited = std::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut limited).poll_frame(cx).is_pending())
        })
        .await;
        assert!(waited);
        assert_eq!(
            conn.track.body_bytes(),
            vec![3],
            "registered with its bytes so far"
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"45"))))
            .await
            .unwrap();
        assert!(limited.frame().await.unwrap().is_ok());
        assert_eq!(conn.track.body_bytes(), vec![5]);
        drop(tx);
        assert!(limited.frame().await.is_none());
        assert!(
            conn.track.body_bytes().is_empty(),
            "a finished body is not in progress"
        );
    }

    #[tokio::test]
    async fn completes_within_the_limit() {
        let (tx, body) = channel_body();
        let stats = Arc::new(BodyStats::default());
        let limited = LimitedBody::new(body, limits(10), stats.clone(), None);
        tx.send(Ok(Frame::data(Bytes::from_static(b"1234567890"))))
            .await
            .unwrap();
        drop(tx);
        let all = limited.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 10);
        assert!(stats.is_complete());
        assert_eq!(stats.failure(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sender_times_out() {
        let (tx, body) = channel_body();
        let stats = Arc::new(BodyStats::default());
        let mut lim = limits(100);
        lim.idle_timeout = Duration::from_secs(5);
        let mut limited = LimitedBody::new(body, lim, stats.clone(), None);
        tx.send(Ok(Frame::data(Bytes::from_static(b"12"))))
            .await
            .unwrap();
        assert!(limited.frame().await.unwrap().is_ok());
        let started = Instant::now();
        assert!(limited.frame().await.unwrap().is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(
            stats.failure(),
            Some(BodyFailure::Idle(Duration::from_secs(5)))
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn trickling_sender_hits_the_total_deadline() {
        let (tx, body) = channel_body();
        let stats = Arc::new(BodyStats::default());
        let mut lim = limits(1000);
        lim.idle_timeout = Duration::from_secs(5);
        lim.total_timeout = Duration::from_secs(12);
        let limited = LimitedBody::new(body, lim, stats.clone(), None);
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        assert!(limited.collect().await.is_err());
        assert_eq!(
            stats.failure(),
            Some(BodyFailure::Deadline(Duration::from_secs(12)))
        );
    }
}
