//! Body limits while streaming: Content-Length pre-check, counted chunked bodies, timeouts,
//! senders that go away. In each refusal the receiver never sees a complete request.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn content_length_over_max_body_is_refused_before_reading() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("max_body = 1000", ""), receiver.addr)).await;
    // Headers only: the proxy must answer without waiting for the (never sent) body.
    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert!(
        response.contains("\"error\":\"body_too_large\""),
        "{response}"
    );
    assert_eq!(
        receiver.started.load(Ordering::SeqCst),
        0,
        "receiver must not be contacted"
    );
}

#[tokio::test]
async fn chunked_body_over_max_body_aborts_the_upstream_request() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("max_body = 1000", ""), receiver.addr)).await;
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
    let addr = proxy.addr;
    let client = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![b'a'; 600]))))
        .await
        .unwrap();
    // Wait until the receiver has the upstream request open, then push past the limit.
    while receiver.started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    tx.send(Ok(Frame::data(Bytes::from(vec![b'b'; 600]))))
        .await
        .unwrap();
    let seen = receiver.next().await;
    assert!(
        seen.body.is_err(),
        "receiver must never see a complete request: {:?}",
        seen.body.map(|b| b.len())
    );
    let got = client.await.unwrap();
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "body_too_large");
    drop(tx);
}

#[tokio::test]
async fn stalled_body_gets_408_and_the_upstream_request_is_aborted() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("", "body_idle_timeout = \"300ms\""),
        receiver.addr,
    ))
    .await;
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
    let addr = proxy.addr;
    let client = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"{\"partial\":"))))
        .await
        .unwrap();
    let got = client.await.unwrap();
    assert_eq!(got.status, 408);
    assert_eq!(got.json()["error"], "body_idle_timeout");
    assert!(receiver.next().await.body.is_err());
    drop(tx);
}

#[tokio::test]
async fn sender_disconnect_mid_upload_aborts_the_upstream_request() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
        .await
        .unwrap();
    while receiver.started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    drop(stream);
    let seen = receiver.next().await;
    assert!(
        seen.body.is_err(),
        "the receiver must see an aborted request"
    );
    // The proxy is still healthy.
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn reject_mode_refuses_payloads_over_upstream_limit() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("upstream_limit = 1000\non_oversize = \"reject\"", ""),
        receiver.addr,
    ))
    .await;
    let got = proxy.post(payload(5000)).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "over_upstream_limit");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);

    // Chunked: refused mid-stream, the receiver never gets a complete request.
    let (tx, body) = channel_body();
    let addr = proxy.addr;
    let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
    let client = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![b'a'; 800]))))
        .await
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from(vec![b'a'; 800]))))
        .await
        .unwrap();
    let got = client.await.unwrap();
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "over_upstream_limit");
    if receiver.started.load(Ordering::SeqCst) > 0 {
        assert!(receiver.next().await.body.is_err());
    }
    // Under the limit passes.
    let got = proxy.post(payload(900)).await;
    assert_eq!(got.status, 200);
    drop(tx);
}

#[tokio::test]
async fn forward_mode_sends_payloads_over_upstream_limit_as_is() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("upstream_limit = 1000", ""),
        receiver.addr,
    ))
    .await;
    let body = payload(5000);
    let got = proxy.post(body.clone()).await;
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), body);
}
