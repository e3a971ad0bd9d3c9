//! Incidents end to end: every kind recorded against real receivers, concurrency, an
//! unwritable log, learning the receiver's limit, and the retry after a receiver's 413.

use std::sync::atomic::Ordering;

use http::Request;
use payload_guard::trim::testdata::synthflow_payload;

use crate::nginx::Nginx;
use crate::support::*;

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn every_kind_is_recorded() {
    // over_max_body (by Content-Length) and over_upstream_limit (rejected).
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route(
            "max_body = \"2MiB\"\nupstream_limit = \"1MiB\"\non_oversize = \"reject\"",
            "",
        ),
        receiver.addr,
    ))
    .await;
    let post = |n: usize| {
        Request::post(proxy.url("/hooks/test/x?secret=1"))
            .header("content-type", "application/json")
            .header("user-agent", "Synthflow/1.0")
            .header("authorization", "Bearer do-not-log")
            .body(full(payload(n)))
            .unwrap()
    };
    assert_eq!(send(proxy.addr, post(3 * MIB)).await.status, 413);
    assert_eq!(send(proxy.addr, post(MIB + 10)).await.status, 413);
    let incidents = proxy.incidents().await;
    assert_eq!(incidents.len(), 2, "{incidents:#?}");
    let max = &incidents[0];
    assert_eq!(max["kind"], "over_max_body");
    assert_eq!(max["route"], "test");
    assert_eq!(max["content_length"], 3 * MIB);
    assert_eq!(max["max_body"], 2 * MIB);
    assert_eq!(max["path"], "/hooks/test/x");
    assert_eq!(max["peer"], "127.0.0.1");
    assert_eq!(max["user_agent"], "Synthflow/1.0");
    assert_eq!(max["content_type"], "application/json");
    assert!(max["ts"].as_str().unwrap().ends_with('Z'));
    assert!(!max["request_id"].as_str().unwrap().is_empty());
    let over = &incidents[1];
    assert_eq!(over["kind"], "over_upstream_limit");
    assert_eq!(over["action"], "rejected");
    assert_eq!(over["upstream_limit"], MIB);
    let raw = std::fs::read_to_string(&proxy.incidents).unwrap();
    assert!(
        !raw.contains("do-not-log") && !raw.contains("secret=1"),
        "secrets leaked: {raw}"
    );

    // over_upstream_limit (forwarded) and upstream_413 from a real nginx.
    let backend = Receiver::start(Behavior::Ok).await;
    let Some(nginx) = Nginx::start(backend.addr, "").await else {
        return;
    };
    let proxy = start_proxy(config(
        &one_route("upstream_limit = \"1MiB\"", ""),
        nginx.addr,
    ))
    .await;
    let got = proxy.post_json(payload(2 * MIB)).await;
    assert_eq!(got.status, 413);
    let incidents = proxy.incidents().await;
    let kinds: Vec<&str> = incidents
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["over_upstream_limit", "upstream_413"]);
    assert_eq!(incidents[0]["action"], "forwarded");
    let u413 = &incidents[1];
    assert_eq!(u413["rejector"], "nginx");
    assert_eq!(u413["upstream_status"], 413);
    assert!(
        u413["upstream_snippet"]
            .as_str()
            .unwrap()
            .contains("413 Request Entity Too Large")
    );
    assert_eq!(u413["learned"]["smallest_rejected"], 2 * MIB);
    assert_eq!(backend.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn hundred_parallel_oversize_requests_make_exactly_hundred_lines() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        // 100 connections at once from one address: over the default per-address cap.
        &one_route(
            "upstream_limit = 1000\non_oversize = \"reject\"",
            "max_connections_per_ip = 128",
        ),
        receiver.addr,
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let addr = proxy.addr;
        let url = proxy.url("/hooks/test");
        tasks.push(tokio::spawn(async move {
            send(addr, Request::post(url).body(full(payload(5000))).unwrap())
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 413);
    }
    let incidents = proxy.incidents().await;
    assert_eq!(incidents.len(), 100);
    let mut ids: Vec<&str> = incidents
        .iter()
        .map(|i| i["request_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "one line per request");
}

#[tokio::test]
async fn an_unwritable_log_does_not_break_proxying() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "file").unwrap();
    let text = format!(
        "{}\n[incidents]\npath = \"{}/incidents.jsonl\"\n",
        one_route("upstream_limit = 1000", ""),
        blocker.display()
    );
    let proxy = start_proxy(config(&text, receiver.addr)).await;
    for _ in 0..3 {
        let got = proxy.post(payload(5000)).await;
        assert_eq!(got.status, 200);
        receiver.next().await;
    }
    proxy.proxy.shared().incidents.flush().await;
    assert_eq!(proxy.proxy.shared().incidents.dropped(), 3);
}

/// A trim route without a configured limit, in front of a receiver that refuses > 100 KB.
fn learning_route(extra: &str) -> String {
    one_route(
        &format!(
            "{extra}\non_oversize = \"trim\"\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\n"
        ),
        "",
    )
}

#[tokio::test]
async fn the_receivers_limit_is_learned_from_its_413() {
    // body-parser's default limit, 100kb.
    let mut receiver = Receiver::start(Behavior::LimitEarly(100 * 1024)).await;
    let proxy = start_proxy(config(&learning_route(""), receiver.addr)).await;
    let big = synthflow_payload(200_000, 11);
    let req = || {
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .body(full(big.clone()))
            .unwrap()
    };
    // Unknown limit: the first payload is refused, then trimmed lower and resent at once,
    // within the same request.
    assert_eq!(send(proxy.addr, req()).await.status, 200);
    assert!(receiver.next().await.body.is_err(), "first attempt refused");
    let resent = receiver.next().await.body.unwrap();
    assert!(resent.len() <= 100 * 1024, "{}", resent.len());
    // The next one is trimmed below the learned bound before the receiver sees it.
    assert_eq!(send(proxy.addr, req()).await.status, 200);
    let body = receiver.next().await.body.unwrap();
    assert!(body.len() <= 100 * 1024, "{}", body.len());
    assert!(receiver.try_next().is_none(), "no second refusal");
    let incidents = proxy.incidents().await;
    let kinds: Vec<&str> = incidents
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["upstream_413", "over_upstream_limit"],
        "{incidents:#?}"
    );
    assert_eq!(incidents[0]["retry"]["attempted"], true);
    assert_eq!(incidents[0]["retry"]["status"], 200);
    assert_eq!(incidents[1]["action"], "trimmed");
    let limit = incidents[1]["upstream_limit"].as_u64().unwrap();
    assert!((90_000..=100 * 1024).contains(&limit), "{limit}");

    // What was learned is kept in the state file beside the incident log, not rebuilt
    // from the log.
    let state = proxy
        .incidents
        .parent()
        .unwrap()
        .join("learned-limits.json");
    proxy.proxy.shared().flush_state();
    let learned = payload_guard::state::LearnedLimits::open(state);
    let wire = learned
        .route("test")
        .unwrap()
        .bracket(payload_guard::trim::payload::Units::Wire);
    assert_eq!(wire.smallest_rejected, Some(big.len() as u64));
    assert_eq!(
        wire.largest_accepted,
        Some(resent.len().max(body.len()) as u64)
    );
}

#[tokio::test]
async fn retry_on_413_trims_and_resends_once() {
    let mut receiver = Receiver::start(Behavior::LimitEarly(100 * 1024)).await;
    let proxy = start_proxy(config(
        &learning_route("upstream_limit = \"1MiB\"\nretry_on_413 = true"),
        receiver.addr,
    ))
    .await;
    let big = synthflow_payload(200_000, 12);
    let got = proxy.post_json(big.clone()).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert!(receiver.next().await.body.is_err(), "first attempt refused");
    let second = receiver.next().await.body.unwrap();
    assert!(second.len() < big.len());
    let incidents = proxy.incidents().await;
    let u413 = incidents
        .iter()
        .find(|i| i["kind"] == "upstream_413")
        .unwrap();
    assert_eq!(u413["retry"]["attempted"], true);
    assert_eq!(u413["retry"]["status"], 200);
    assert_eq!(u413["retry"]["bytes"], second.len());
}

/// A streamed payload (a route without trim rules) is never held whole, but its incidents
/// still name the fields that dominate it, from the head of the body sampled as it passed.
#[tokio::test]
async fn streamed_payloads_incidents_name_their_largest_fields() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("upstream_limit = \"10KiB\"", ""),
        receiver.addr,
    ))
    .await;
    let body = synthflow_payload(50_000, 3);
    let size = body.len();
    let got = proxy.post_json(body.clone()).await;
    assert_eq!(got.status, 200);
    receiver.next().await;
    let incidents = proxy.incidents().await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0]["action"], "forwarded");
    assert_eq!(
        incidents[0]["top_fields"][0]["path"], "call.transcript",
        "{:#}",
        incidents[0]
    );
    assert!(incidents[0]["top_fields"].as_array().unwrap().len() > 1);

    // The same payload in 700-byte chunks: the head is sampled across many frames, and the
    // fields it names are exactly those of the payload sent in one piece.
    let (tx, chunked) = channel_body();
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(chunked)
        .unwrap();
    let feed = tokio::spawn(async move {
        for piece in body.chunks(700) {
            let frame = http_body::Frame::data(bytes::Bytes::copy_from_slice(piece));
            tx.send(Ok(frame)).await.expect("proxy reads the body");
        }
    });
    let got = send(proxy.addr, req).await;
    feed.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap().len(), size);
    let incidents = proxy.incidents().await;
    assert_eq!(incidents.len(), 2, "{incidents:#?}");
    assert_eq!(incidents[1]["content_length"], serde_json::Value::Null);
    assert_eq!(incidents[1]["top_fields"], incidents[0]["top_fields"]);
}
