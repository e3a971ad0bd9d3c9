//! Every refusal is a line and a number: each request the proxy answers itself or abandons,
//! including what hyper refuses before the pipeline sees it, gets one access-log line with a
//! stable `error` code and a count in `payload_guard_errors_total{route,error}`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// The JSON log lines written while the guard lives (the test's runtime is single-threaded,
/// so every task of the test logs through it).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures INFO and above as JSON lines until the guard is dropped.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line ({e}): {l}")))
            .collect()
    }

    /// The access-log lines (target `access`) with this `error` code.
    pub fn access_with_error(&self, code: &str) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["target"] == "access" && l["fields"]["error"] == code)
            .collect()
    }

    /// Waits (bounded) until an access line with `code` was written, and returns it.
    pub async fn wait_for_access(&self, code: &str) -> serde_json::Value {
        for _ in 0..400 {
            if let Some(line) = self.access_with_error(code).into_iter().next() {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "no access line with error {code} in:\n{}",
            self.lines()
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// One sample of the proxy's metrics (0 when the series does not exist).
pub fn metric(proxy: &ProxyHandle, name: &str, labels: &[(&str, &str)]) -> f64 {
    let shared = proxy.proxy.shared();
    let text = shared.metrics.encode(&shared.snapshot());
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map_or(0.0, |(_, v)| v.parse().unwrap())
}

fn errors(proxy: &ProxyHandle, route: &str, code: &str) -> f64 {
    metric(
        proxy,
        "payload_guard_errors_total",
        &[("route", route), ("error", code)],
    )
}

/// Asserts the line (status and code) and the counter of one refusal.
async fn assert_refusal(logs: &Logs, proxy: &ProxyHandle, route: &str, code: &str, status: u64) {
    let line = logs.wait_for_access(code).await;
    assert_eq!(line["fields"]["status"], status, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(
        errors(proxy, route, code),
        1.0,
        "payload_guard_errors_total{{route={route},error={code}}}"
    );
}

#[tokio::test]
async fn refusals_by_hyper_before_the_pipeline_are_logged_and_counted() {
    let (logs, _guard) = Logs::capture();
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route(
            "",
            "max_header_bytes = \"16KiB\"\nheader_read_timeout = \"300ms\"",
        ),
        receiver.addr,
    ))
    .await;

    let big = format!(
        "POST /hooks/test HTTP/1.1\r\nhost: x\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let response = raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_refusal(&logs, &proxy, "-", "header_too_large", 431).await;

    // A NUL byte in a header value: hyper answers 400 itself.
    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\nx-a: a\0b\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_refusal(&logs, &proxy, "-", "bad_request", 400).await;

    // A head that never completes: closed after header_read_timeout.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let rest = read_until_close(&mut stream).await;
    assert!(!rest.contains("200"), "{rest}");
    assert_refusal(&logs, &proxy, "-", "header_timeout", 408).await;

    // An idle keep-alive connection that times out is not a refusal.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let answered = read_until_close(&mut idle).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    // The proxy's side of the connection is gone once it no longer counts it.
    while proxy.proxy.shared().open_connections.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(errors(&proxy, "-", "header_timeout"), 1.0);
}

#[tokio::test]
async fn refusals_in_the_pipeline_are_logged_and_counted() {
    let (logs, _guard) = Logs::capture();
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("", "body_idle_timeout = \"5s\"\nbody_timeout = \"300ms\""),
        receiver.addr,
    ))
    .await;

    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    // Refused before routing: the framing of the connection cannot be trusted.
    assert_refusal(&logs, &proxy, "-", "ambiguous_length", 400).await;

    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_refusal(&logs, &proxy, "test", "bad_framing", 400).await;

    // Part of the body, then nothing: body_timeout (408).
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let response = read_until_close(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_refusal(&logs, &proxy, "test", "body_timeout", 408).await;

    // The sender leaves mid-body: client_abort, logged as 499 (not 400 body_read_failed).
    let before = receiver.started.load(Ordering::SeqCst);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    // The proxy has the request once the receiver sees it start.
    while receiver.started.load(Ordering::SeqCst) == before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stream);
    assert_refusal(&logs, &proxy, "test", "client_abort", 499).await;
    assert_eq!(errors(&proxy, "test", "body_read_failed"), 0.0);
}

#[tokio::test]
async fn a_receiver_outage_is_one_warn_line_and_one_access_line_per_request() {
    let (logs, _guard) = Logs::capture();
    // Nothing listens there: every request fails with 502. A route name of its own: the WARN
    // limiter is process-wide, shared with other tests.
    let text = one_route("", "").replace("name = \"test\"", "name = \"warn-flood\"");
    let proxy = start_proxy(config(&text, free_addr())).await;
    let mut sender = http1_sender(proxy.addr).await;
    for _ in 0..200 {
        let req = http::Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .body(full("{}"))
            .unwrap();
        let got = read(sender.send_request(req).await.unwrap()).await;
        assert_eq!(got.status, 502);
    }
    let access = logs.access_with_error("upstream_connect_failed");
    assert_eq!(access.len(), 200, "one access line per request");
    assert!(access.iter().all(|l| l["level"] == "INFO"));
    let warns: Vec<_> = logs
        .lines()
        .into_iter()
        .filter(|l| l["level"] == "WARN")
        .collect();
    assert_eq!(
        warns
            .iter()
            .filter(|l| l["fields"]["message"] == "request failed")
            .count(),
        1,
        "{warns:#?}"
    );
    // The other 199 are summarised once the interval ends.
    let limiter = payload_guard::warn_limit::warnings();
    let due = limiter.due_at(tokio::time::Instant::now() + limiter.interval());
    let summary = due
        .iter()
        .find(|s| s.kind == "request failed" && s.route == "warn-flood")
        .unwrap_or_else(|| panic!("no summary in {due:?}"));
    assert_eq!(summary.count, 199);
    assert_eq!(
        metric(
            &proxy,
            "payload_guard_errors_total",
            &[
                ("route", "warn-flood"),
                ("error", "upstream_connect_failed")
            ]
        ),
        200.0
    );
}

#[tokio::test]
async fn an_http2_sender_that_resets_its_stream_mid_body_is_a_client_abort() {
    let (logs, _guard) = Logs::capture();
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, body) = channel_body();
    let req = http::Request::post(proxy.url("/hooks/test"))
        .body(body)
        .unwrap();
    let pending = tokio::spawn(async move { sender.send_request(req).await.map(|_| ()) });
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"{\"a\":",
    ))))
    .await
    .unwrap();
    while receiver.started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Dropping the request resets the stream (RST_STREAM CANCEL).
    pending.abort();
    drop(tx);
    let line = logs.wait_for_access("client_abort").await;
    assert_eq!(line["fields"]["status"], 499, "{line}");
    assert_eq!(errors(&proxy, "test", "client_abort"), 1.0);
}
