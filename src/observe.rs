//! Stage 7: observe the exchange. One access-log line per request, emitted when the response
//! body has been sent or dropped (so it carries the real duration and bytes out, and is written
//! even when the sender disconnects mid-way).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::forward::UpstreamBody;
use crate::limit::{BodyError, BodyStats};
use crate::metrics::Metrics;

/// The sender's IP as the access line and `X-Forwarded-For` show it (the same text as
/// `IpAddr`'s `Display`). IPv4 is written with `itoa` into a stack buffer: through `fmt`, its
/// four numbers cost about 1,000 instructions, each time (1.5% of a small request).
pub(crate) struct PeerIp(pub(crate) std::net::IpAddr);

impl PeerIp {
    /// Appends the address to `out`, as [`Display`](std::fmt::Display) writes it.
    pub(crate) fn push_to(&self, out: &mut String) {
        match self.0 {
            std::net::IpAddr::V4(v4) => out.push_str(v4_text(v4, &mut [0; 15])),
            ip => {
                use std::fmt::Write;
                // Writing to a String cannot fail.
                let _ = write!(out, "{ip}");
            }
        }
    }
}

/// An IPv4 address as text, in `buf`: four `itoa` numbers and their dots, no `fmt`.
fn v4_text(v4: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        let mut number = itoa::Buffer::new();
        let digits = number.format(octet).as_bytes();
        buf[len..len + digits.len()].copy_from_slice(digits);
        len += digits.len();
    }
    // Digits and dots only: always UTF-8.
    std::str::from_utf8(&buf[..len]).unwrap_or_default()
}

impl std::fmt::Display for PeerIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            std::net::IpAddr::V4(v4) => f.write_str(v4_text(v4, &mut [0; 15])),
            ip => ip.fmt(f),
        }
    }
}

/// What the access log says about one request; logs itself when dropped.
#[derive(Debug)]
pub struct Exchange {
    started: Instant,
    /// The request id (propagated or generated).
    pub request_id: Arc<str>,
    /// Matched route name.
    pub route: Option<String>,
    /// Request method.
    pub method: Method,
    /// Request path (no query: queries may carry secrets).
    pub path: String,
    /// The sender's address.
    pub peer: SocketAddr,
    /// Status sent to the sender (`None`: no response was sent).
    pub status: Option<u16>,
    /// The receiver's status, when it answered.
    pub upstream_status: Option<u16>,
    /// Request body statistics.
    pub body: Option<Arc<BodyStats>>,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Why the proxy answered itself, if it did.
    pub error: Option<(&'static str, &'static str, String)>,
    /// Whether the response body finished.
    pub response_complete: bool,
    /// Bytes of the body sent to the receiver (after trimming), when known.
    pub forwarded_bytes: Option<u64>,
    /// Time to the receiver's response headers.
    pub upstream_secs: Option<f64>,
    /// Where the exchange is counted.
    pub metrics: Option<Metrics>,
}

impl Exchange {
    /// Starts observing a request.
    pub fn new(request_id: Arc<str>, method: Method, path: String, peer: SocketAddr) -> Exchange {
        Exchange {
            started: Instant::now(),
            request_id,
            route: None,
            method,
            path,
            peer,
            status: None,
            upstream_status: None,
            body: None,
            bytes_out: 0,
            error: None,
            response_complete: false,
            forwarded_bytes: None,
            upstream_secs: None,
            metrics: None,
        }
    }

    /// Notes that the proxy answered with an error of its own.
    pub fn set_error(&mut self, err: &ProxyError) {
        self.error = Some((err.code(), err.culprit().as_str(), err.to_string()));
    }
}

/// Milliseconds with at most three decimals (microsecond resolution): `0.641`, not
/// `0.6405150000000001`. A number, so JSON logs keep it numeric.
fn millis_3(elapsed: std::time::Duration) -> f64 {
    (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let bytes_in = self.body.as_ref().map_or(0, |b| b.bytes());
        let duration_ms = millis_3(self.started.elapsed());
        let route = self.route.as_deref().unwrap_or("-");
        // No response was sent: nginx's 499 ("client closed request"), a 4xx, not a 5xx.
        let status = self.status.unwrap_or(499);
        let upstream_status = self.upstream_status.unwrap_or(0);
        if let Some(metrics) = &self.metrics {
            metrics.request(
                self.route
                    .as_deref()
                    .unwrap_or(crate::metrics::UNMATCHED_ROUTE),
                status,
                bytes_in,
                self.forwarded_bytes,
                self.upstream_secs,
            );
        }
        if self.status.is_none() && self.error.is_none() {
            // Abandoned: the sender went away before the response could be sent.
            let err = ProxyError::ClientAbort;
            self.error = Some((err.code(), err.culprit().as_str(), err.to_string()));
        }
        if let (Some(metrics), Some((code, _, _))) = (&self.metrics, &self.error) {
            metrics.error(
                self.route
                    .as_deref()
                    .unwrap_or(crate::metrics::UNMATCHED_ROUTE),
                code,
            );
        }
        let outcome = if self.status.is_none() {
            "sender_disconnected"
        } else if !self.response_complete {
            "response_incomplete"
        } else {
            "complete"
        };
        match &self.error {
            Some((code, culprit, message)) => tracing::info!(
                target: "access",
                route,
                method = %self.method,
                path = %self.path,
                peer = %PeerIp(self.peer.ip()),
                status,
                bytes_in,
                bytes_out = self.bytes_out,
                upstream_status,
                duration_ms,
                request_id = %self.request_id,
                outcome,
                error = code,
                culprit,
                reason = %message,
                "request"
            ),
            None => crate::logging::access_line(&crate::logging::AccessLine {
                route,
                method: self.method.as_str(),
                path: &self.path,
                peer: self.peer.ip(),
                status,
                bytes_in,
                bytes_out: self.bytes_out,
                upstream_status,
                duration_ms,
                request_id: &self.request_id,
                outcome,
            }),
        }
    }
}

/// Writes the access-log line and counts the error of a connection refused before any request
/// reached the pipeline: a head hyper refused (`header_too_large`, `bad_request`), timed out
/// (`header_timeout`) or that the sender abandoned (`client_abort`), or a connection shed at
/// accept (`over_capacity`, `per_ip_limit`). `responded`: whether an answer was written.
pub fn connection_refused(
    peer: SocketAddr,
    err: &ProxyError,
    responded: bool,
    metrics: Option<&Metrics>,
) {
    if let Some(metrics) = metrics {
        metrics.error(crate::metrics::UNMATCHED_ROUTE, err.code());
    }
    let status = if responded {
        err.status().as_u16()
    } else {
        // No answer reached the sender: nginx's 499 when it left, else the status we meant.
        match err {
            ProxyError::ClientAbort => 499,
            _ => err.status().as_u16(),
        }
    };
    tracing::info!(
        target: "access",
        route = "-",
        method = "-",
        path = "-",
        peer = %PeerIp(peer.ip()),
        status,
        bytes_in = 0u64,
        bytes_out = 0u64,
        upstream_status = 0u16,
        duration_ms = 0.0f64,
        request_id = "-",
        outcome = if responded { "refused" } else { "closed" },
        error = err.code(),
        culprit = err.culprit().as_str(),
        reason = %err,
        "request"
    );
}

/// A response body that counts the bytes sent and owns the [`Exchange`], so the access-log line
/// is written once the body is done or dropped.
///
/// The exchange is boxed: the response is moved through every layer of futures between the
/// handler and hyper, and a few pointer-sized fields move cheaper than the whole record.
pub struct ObservedBody<B> {
    inner: B,
    exchange: Box<Exchange>,
    empty_at_start: bool,
}

impl<B> ObservedBody<B> {
    /// Wraps a response body.
    pub fn new(inner: B, exchange: Box<Exchange>) -> Self
    where
        B: Body,
    {
        let empty_at_start = inner.is_end_stream();
        ObservedBody {
            inner,
            exchange,
            empty_at_start,
        }
    }
}

impl Body for ObservedBody<UpstreamBody> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.exchange.bytes_out += data.len() as u64;
                }
                // hyper stops polling a length-delimited body once it reports its end.
                if this.inner.is_end_stream() {
                    this.exchange.response_complete = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::warn!(request_id = %this.exchange.request_id, error = %err, "response body failed mid-way");
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.exchange.response_complete = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // hyper does not poll a body that reports its end up front (an empty response).
        if self.exchange.bytes_out == 0 && self.exchange.status.is_some() && self.empty_at_start {
            self.exchange.response_complete = true;
        }
    }
}

#[cfg(test)]
mod duration_tests {
    use std::time::Duration;

    #[test]
    fn durations_have_three_decimals() {
        assert_eq!(
            super::millis_3(Duration::from_nanos(640_515)).to_string(),
            "0.641"
        );
        assert_eq!(
            super::millis_3(Duration::from_micros(12_000)).to_string(),
            "12"
        );
        assert_eq!(
            super::millis_3(Duration::from_nanos(1_443_824)).to_string(),
            "1.444"
        );
    }
}

#[cfg(test)]
mod peer_tests {
    use std::net::IpAddr;

    #[test]
    fn peer_ips_read_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "192.168.100.9",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(super::PeerIp(ip).to_string(), ip.to_string());
            let mut pushed = String::from("x, ");
            super::PeerIp(ip).push_to(&mut pushed);
            assert_eq!(pushed, format!("x, {ip}"));
        }
    }
}
