//! Routing and forwarding: bodies byte-identical, paths and queries, forwarded headers.

use std::sync::atomic::Ordering;

use http::Request;

use crate::support::*;

#[tokio::test]
async fn forwards_body_path_query_and_headers() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let body = payload(200_000);
    let req = Request::post(proxy.url("/hooks/test/extra/path?a=1&b=%20x"))
        .header("content-type", "application/json")
        .header("host", "guard.example")
        .header("x-request-id", "req-123")
        .header("http_synthflow_signature", "c2lnbmF0dXJl")
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "must-not-pass")
        .body(full(body.clone()))
        .unwrap();
    let got = send(proxy.addr, req).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["received"], body.len());
    assert_eq!(got.headers["x-request-id"], "req-123");
    assert!(
        !got.headers.contains_key("x-receiver-hop"),
        "hop-by-hop header named by the receiver's Connection leaked"
    );

    let seen = receiver.next().await;
    assert_eq!(seen.uri.path(), "/webhook/extra/path");
    assert_eq!(seen.uri.query(), Some("a=1&b=%20x"));
    assert_eq!(seen.body.unwrap(), body, "body must pass byte-identical");
    let h = &seen.headers;
    assert_eq!(h["host"], receiver.addr.to_string());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "guard.example");
    assert_eq!(h["x-request-id"], "req-123");
    assert_eq!(h["http_synthflow_signature"], "c2lnbmF0dXJl");
    assert!(!h.contains_key("x-hop-secret"));
    assert_eq!(h["content-length"], body.len().to_string());
    // A streamed body is not read for its id: the request id is the Idempotency-Key.
    assert_eq!(h["idempotency-key"], "req-123");

    // The sender's own Idempotency-Key is passed on as it is.
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .header("x-request-id", "req-124")
        .header("idempotency-key", "sender-key-1")
        .body(full("{}"))
        .unwrap();
    assert_eq!(send(proxy.addr, req).await.status, 200);
    let seen = receiver.next().await;
    assert_eq!(seen.headers["idempotency-key"], "sender-key-1");
    assert_eq!(seen.headers.get_all("idempotency-key").iter().count(), 1);
}

#[tokio::test]
async fn generates_request_id_and_preserves_host_when_asked() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("preserve_host = true", ""),
        receiver.addr,
    ))
    .await;
    let req = Request::post(proxy.url("/hooks/test"))
        .header("host", "guard.example")
        .body(full("{}"))
        .unwrap();
    let got = send(proxy.addr, req).await;
    assert_eq!(got.status, 200);
    let id = got.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let seen = receiver.next().await;
    assert_eq!(seen.uri.path(), "/webhook");
    assert_eq!(seen.headers["host"], "guard.example");
    assert_eq!(seen.headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn longest_prefix_wins_on_segment_boundaries_and_unknown_paths_get_404() {
    let mut a = Receiver::start(Behavior::Ok).await;
    let mut b = Receiver::start(Behavior::Ok).await;
    let text = format!(
        r#"
[[routes]]
name = "a"
path_prefix = "/hooks/a"
upstream = "http://{}/a"
[[routes]]
name = "ab"
path_prefix = "/hooks/a/b"
upstream = "http://{}/ab"
"#,
        a.addr, b.addr
    );
    let proxy = start_proxy(config(&text, a.addr)).await;
    let go = |path: &str| Request::post(proxy.url(path)).body(full("{}")).unwrap();
    assert_eq!(send(proxy.addr, go("/hooks/a/b/c")).await.status, 200);
    assert_eq!(b.next().await.uri.path(), "/ab/c");
    assert_eq!(send(proxy.addr, go("/hooks/a/bc")).await.status, 200);
    assert_eq!(a.next().await.uri.path(), "/a/bc");
    let got = send(proxy.addr, go("/hooks/ab")).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.json()["error"], "no_route");
    assert_eq!(got.headers["content-type"], "application/json");
    assert!(a.try_next().is_none() && b.try_next().is_none());
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let body = payload(50_000);
    let req = Request::post(proxy.url("/hooks/test/h2"))
        .version(http::Version::HTTP_2)
        .body(full(body.clone()))
        .unwrap();
    let got = send_h2(proxy.addr, req).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = receiver.next().await;
    assert_eq!(seen.uri.path(), "/webhook/h2");
    // HTTP/2 carries no Host header: the :authority the sender used is forwarded instead.
    assert_eq!(seen.headers["x-forwarded-host"], proxy.addr.to_string());
    assert_eq!(seen.headers["host"], receiver.addr.to_string());
    assert_eq!(seen.body.unwrap(), body);
}

#[tokio::test]
async fn receiver_status_and_body_are_relayed() {
    let mut receiver = Receiver::start(Behavior::Status(422)).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 422);
    assert_eq!(got.json()["received"], 2);
    receiver.next().await;
}

/// Sends `n` POSTs one after another over one keep-alive connection to the proxy.
async fn posts_on_one_connection(proxy: &ProxyHandle, n: usize) -> Vec<Got> {
    let mut sender = http1_sender(proxy.addr).await;
    let mut got = Vec::new();
    for i in 0..n {
        got.push(post_on(&mut sender, proxy, format!("{{\"n\":{i}}}")).await);
    }
    got
}

#[tokio::test]
async fn a_sender_connection_keeps_one_upstream_connection() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    for got in posts_on_one_connection(&proxy, 5).await {
        assert_eq!(got.status, 200, "{:?}", got.body);
    }
    for i in 0..5 {
        assert_eq!(
            receiver.next().await.body.unwrap(),
            format!("{{\"n\":{i}}}")
        );
    }
    assert_eq!(
        receiver.connections.load(Ordering::SeqCst),
        1,
        "five requests on one sender connection should reuse one upstream connection"
    );
    // A second sender connection gets an upstream connection of its own.
    for got in posts_on_one_connection(&proxy, 2).await {
        assert_eq!(got.status, 200, "{:?}", got.body);
    }
    assert_eq!(receiver.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_receiver_that_closes_each_connection_still_gets_every_request() {
    let mut receiver = Receiver::start(Behavior::CloseEach).await;
    let proxy = start_proxy(config(&one_route("", ""), receiver.addr)).await;
    for got in posts_on_one_connection(&proxy, 4).await {
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(got.json()["received"], 7);
    }
    for i in 0..4 {
        assert_eq!(
            receiver.next().await.body.unwrap(),
            format!("{{\"n\":{i}}}")
        );
    }
    assert_eq!(receiver.connections.load(Ordering::SeqCst), 4);
}
