//! A receiver's early 413 reaches the sender every time, also when the receiver answers and
//! closes at once, leaving the rest of the body unread (its kernel then resets the
//! connection): (a) a receiver that answers 413 from the `Content-Length` without reading the
//! body, (b) one that reads 1 MiB and then answers 413, (c) nginx, which drains the body in a
//! lingering close. 40 MiB bodies, with `Content-Length` and chunked, from HTTP/1.1 and h2c
//! senders: the receiver's own 413 (status and body) is relayed on every try, and each try
//! leaves an `upstream_413` incident naming who refused.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::nginx::Nginx;
use crate::support::*;

const BODY_BYTES: usize = 40 * 1024 * 1024;
const TRIES: usize = 20;

/// What receivers (a) and (b) answer.
const REFUSAL: &str = r#"{"error":"request entity too large","limit":"1mb"}"#;

/// A raw receiver that answers 413 after reading `read_first` body bytes, then closes with the
/// rest of the body unread (the kernel resets the connection).
async fn resetting_receiver(read_first: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_resetting(listener, read_first);
    addr
}

/// Serves [`resetting_receiver`]'s answers on `listener`.
fn serve_resetting(listener: TcpListener, read_first: usize) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                // The request head, then `read_first` bytes after it.
                let head_end = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                while seen.len() - head_end < read_first {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{REFUSAL}",
                    REFUSAL.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                // Dropped with unread body bytes: the kernel answers with a reset.
            });
        }
    });
}

fn body(chunked: bool) -> TestBody {
    let data = Bytes::from(vec![b'x'; BODY_BYTES]);
    if !chunked {
        return full(data);
    }
    // No size hint: sent chunked (HTTP/1.1) or without a length (h2).
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..40)
        .map(|i| {
            Ok(Frame::data(
                data.slice(i * 1024 * 1024..(i + 1) * 1024 * 1024),
            ))
        })
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Sends 40 MiB bodies every way, `TRIES` times each, and checks that the receiver's own 413
/// comes back every time, each with its `upstream_413` incident.
async fn every_try_relays_the_refusal(upstream: SocketAddr, expected_body: Option<&str>) {
    let proxy = start_proxy(config(&one_route("max_body = \"64MiB\"", ""), upstream)).await;
    let mut sent = 0;
    for h2 in [false, true] {
        for chunked in [false, true] {
            for attempt in 0..TRIES {
                let req = Request::post(proxy.url("/hooks/test"))
                    .header("content-type", "application/json")
                    .body(body(chunked))
                    .unwrap();
                let got = if h2 {
                    send_h2(proxy.addr, req).await
                } else {
                    send(proxy.addr, req).await
                };
                let how = format!("h2 {h2}, chunked {chunked}, try {attempt}");
                assert_eq!(got.status, 413, "{how}: {:?}", got.body);
                // The receiver's own answer, not one of the proxy's.
                match expected_body {
                    Some(expected) => assert_eq!(got.body, expected.as_bytes(), "{how}"),
                    None => assert!(
                        String::from_utf8_lossy(&got.body).contains("nginx"),
                        "{how}: {:?}",
                        got.body
                    ),
                }
                sent += 1;
            }
        }
    }
    let incidents = proxy.incidents().await;
    let refusals: Vec<_> = incidents
        .iter()
        .filter(|i| i["kind"] == "upstream_413")
        .collect();
    assert_eq!(refusals.len(), sent, "one upstream_413 incident per try");
    for inc in refusals {
        assert_eq!(inc["upstream_status"], 413);
        assert!(inc["rejector"].is_string(), "{inc}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_answering_from_content_length_and_resetting() {
    let upstream = resetting_receiver(0).await;
    every_try_relays_the_refusal(upstream, Some(REFUSAL)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_reading_one_mib_then_resetting() {
    let upstream = resetting_receiver(1024 * 1024).await;
    every_try_relays_the_refusal(upstream, Some(REFUSAL)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_lingering_close() {
    let Some(receiver) = require_nginx().await else {
        return;
    };
    let Some(nginx) = Nginx::start(receiver.addr, "").await else {
        return;
    };
    every_try_relays_the_refusal(nginx.addr, None).await;
}

/// A receiver behind nginx, or `None` (with the skip line) where nginx is missing outside CI.
async fn require_nginx() -> Option<Receiver> {
    require_component(
        "nginx",
        "apt-get install -y nginx-light",
        crate::nginx::nginx_binary(),
    )?;
    Some(Receiver::start(Behavior::Ok).await)
}

/// Redelivery to a receiver that answers 413 early and resets: the spooled payload is judged
/// "too large" from the receiver's own answer (here it is not JSON, so it cannot be trimmed,
/// and it moves to dead/ with that 413), not retried as "no answer" until `retry_for`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_reads_the_413_of_a_resetting_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let down = free_addr();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[incidents]
path = "incidents.jsonl"
[spool]
dir = "spool"
min_free = 0
[[routes]]
name = "test"
path_prefix = "/hooks/test"
upstream = "http://{down}/webhook"
max_body = "64MiB"
spool = true
dead_letter = true
"#
        ),
    )
    .unwrap();
    let proxy = start_proxy(payload_guard::config::Config::load(&path).unwrap()).await;
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/octet-stream")
        .body(full(vec![b'x'; BODY_BYTES]))
        .unwrap();
    assert_eq!(
        send(proxy.addr, req).await.status,
        202,
        "spooled: receiver down"
    );
    // The receiver comes up at that address: it answers 413 from the Content-Length and resets.
    let listener = TcpListener::bind(down).await.unwrap();
    serve_resetting(listener, 0);
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let report = payload_guard::deliver::redeliver_due(
        proxy.proxy.current(),
        proxy.proxy.shared_arc(),
        later,
    )
    .await;
    assert_eq!(report.buried, 1, "{report:?}");
    let spool = &proxy.proxy.shared().spool.as_ref().unwrap().spool;
    let dead = spool
        .list(payload_guard::spool::State::Dead, None)
        .await
        .unwrap();
    assert_eq!(dead[0].meta.status, Some(413));
    assert!(
        dead[0]
            .meta
            .snippet
            .as_deref()
            .unwrap()
            .contains("too large")
    );
}
