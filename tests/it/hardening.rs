//! What hyper leaves to us: header and body timeouts, ambiguous framing, header limits,
//! refused methods and targets, connection caps (see also `overload`), graceful shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn slow_headers_are_disconnected_after_header_read_timeout() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("", "header_read_timeout = \"300ms\""),
        receiver.addr,
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let rest = read_until_close(&mut stream).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "connection was not closed"
    );
    assert!(!rest.contains("200 OK"), "{rest}");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_chunked_framing_is_refused() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    if receiver.started.load(Ordering::SeqCst) > 0 {
        assert!(
            receiver.next().await.body.is_err(),
            "nothing complete may be forwarded"
        );
    }
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("", "max_header_bytes = \"16KiB\""),
        receiver.addr,
    ))
    .await;
    let big = format!(
        "POST /hooks/test HTTP/1.1\r\nhost: x\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let response = raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    let mut many = String::from("POST /hooks/test HTTP/1.1\r\nhost: x\r\n");
    for i in 0..120 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-length: 0\r\n\r\n");
    let response = raw_exchange(proxy.addr, many.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_default_header_limit_holds_although_bodies_are_read_in_larger_blocks() {
    // hyper reads up to 384 KiB at once; the 64 KiB default limit is checked by the proxy (past
    // 384 KiB, hyper refuses the head itself).
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let head = |kib: usize| {
        format!(
            "POST /hooks/test HTTP/1.1\r\nhost: x\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(kib * 1024)
        )
    };
    let response = raw_exchange(proxy.addr, head(60).as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for kib in [70, 300, 600] {
        let response = raw_exchange(proxy.addr, head(kib).as_bytes()).await;
        assert!(
            response.starts_with("HTTP/1.1 431"),
            "{kib} KiB: {response}"
        );
    }
    assert_eq!(receiver.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connect_absolute_form_and_upgrade_are_refused() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let response = raw_exchange(
        proxy.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    let response = raw_exchange(
        proxy.addr,
        b"POST http://example.com/hooks/test HTTP/1.1\r\nhost: example.com\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("foreign_target"), "{response}");
    let own = format!(
        "POST http://{}/hooks/test HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}",
        proxy.addr, proxy.addr
    );
    let response = raw_exchange(proxy.addr, own.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "absolute form naming us is fine: {response}"
    );
    let response = raw_exchange(
        proxy.addr,
        b"GET /hooks/test HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("upgrade_refused"), "{response}");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn at_max_connections_an_idle_connection_makes_room() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", "max_connections = 1"), receiver.addr)).await;
    let request = b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    receiver.next().await;
    // The first connection is idle (keep-alive): a second one does not wait for it, the idle
    // one is closed to make room.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), second.read(&mut buf))
        .await
        .expect("second connection never served")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let closed = tokio::time::timeout(Duration::from_secs(20), first.read(&mut buf))
        .await
        .expect("the idle connection was not closed");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "a plain close, no answer: {closed:?}"
    );
}

/// On shutdown an idle keep-alive connection is closed at once (hyper's graceful close), not
/// left open until `shutdown_grace` runs out: the server stops well within the grace.
/// (Checked to fail, after 20 s, with the graceful close taken out.)
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let mut proxy = start_proxy(config(
        // Neither the grace nor the header timeout (which also ends idle keep-alive
        // connections) can close it within the test's bound.
        &one_route(
            "",
            "shutdown_grace = \"60s\"\nheader_read_timeout = \"60s\"",
        ),
        receiver.addr,
    ))
    .await;
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"POST /hooks/test HTTP/1.1\r\nHost: guard.example\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    // Read the whole answer (its head says how long its body is), and keep the connection.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |a: &[u8]| {
        let text = String::from_utf8_lossy(a);
        let Some(end) = text.find("\r\n\r\n") else {
            return false;
        };
        let length = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .expect("a content-length");
        a.len() >= end + 4 + length
    };
    while !complete(&answer) {
        let n = idle.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(receiver.next().await.body.unwrap(), "{}");

    proxy.shutdown();
    let done = proxy.done.take().unwrap();
    // Well within the 60 s grace: only a graceful close of the idle connection does that.
    tokio::time::timeout(Duration::from_secs(20), done)
        .await
        .expect("the server waited for the idle connection instead of closing it")
        .unwrap()
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(20), idle.read(&mut buf))
        .await
        .expect("the idle connection was left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing more is sent on it: {:?}", &buf[..n]);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let mut proxy = start_proxy(config(
        &one_route("", "shutdown_grace = \"10s\""),
        receiver.addr,
    ))
    .await;
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
    let addr = proxy.addr;
    let client = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"{\"a\":",
    ))))
    .await
    .unwrap();
    while receiver.started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    proxy.shutdown();
    // New connections are refused once the listener is closed...
    let done = proxy.done.take().unwrap();
    // ...while the in-flight request completes.
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"1}"))))
        .await
        .unwrap();
    drop(tx);
    let got = client.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), "{\"a\":1}");
    tokio::time::timeout(Duration::from_secs(20), done)
        .await
        .expect("server did not stop after the in-flight request")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open after shutdown"
    );
}
