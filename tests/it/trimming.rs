//! The trim stage through the proxy: oversized Synthflow payloads arrive trimmed, valid and
//! under the receiver's limit, with everything but the trimmed values byte-identical.

use std::io::Write;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use payload_guard::trim::testdata::synthflow_payload;
use serde_json::Value;

use crate::support::*;

const MIB: usize = 1024 * 1024;

/// A trim route in front of a receiver that refuses bodies over 1 MiB (as body parsers do).
fn trim_route(extra: &str) -> String {
    one_route(
        &format!(
            r#"upstream_limit = "1MiB"
max_body = "32MiB"
{extra}
[[routes.trim]]
path = "analysis.*_feedback"
action = "drop"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"
"#
        ),
        "",
    )
}

/// The document without the values the rules may touch.
fn without_trimmed(mut v: Value) -> Value {
    v["call"]["transcript"] = Value::Null;
    v["analysis"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.ends_with("_feedback"));
    v
}

#[tokio::test]
async fn five_mib_synthflow_payload_arrives_trimmed_under_one_mib() {
    let mut receiver = Receiver::start(Behavior::LimitEarly(MIB as u64)).await;
    let proxy = start_proxy(config(&trim_route(""), receiver.addr)).await;
    let original = synthflow_payload(5 * MIB, 42);
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .header("synthflow-signature", "sig")
            .body(full(original.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = receiver.next().await;
    let body = seen.body.unwrap();
    assert!(body.len() <= MIB, "{} bytes arrived", body.len());
    assert_eq!(seen.headers["content-length"], body.len().to_string());
    assert!(!seen.headers.contains_key("transfer-encoding"));
    assert_eq!(
        seen.headers["payload-guard-original-length"],
        original.len().to_string()
    );
    let trimmed_header = seen.headers["payload-guard-trimmed"].to_str().unwrap();
    assert!(
        trimmed_header.contains("call.transcript="),
        "{trimmed_header}"
    );
    assert_eq!(seen.headers["synthflow-signature"], "sig");

    let before: Value = serde_json::from_slice(&original).unwrap();
    let after: Value = serde_json::from_slice(&body).expect("trimmed body is valid JSON");
    assert_eq!(after["call"]["call_id"], before["call"]["call_id"]);
    assert_eq!(
        without_trimmed(after.clone()),
        without_trimmed(before.clone())
    );
    let transcript = after["call"]["transcript"].as_str().unwrap();
    let full_transcript = before["call"]["transcript"].as_str().unwrap();
    assert!(transcript.contains("bytes removed by payload-guard"));
    assert!(full_transcript.starts_with(&transcript[..200]), "head kept");

    let incidents = proxy.incidents().await;
    let inc = incidents
        .iter()
        .find(|i| i["kind"] == "over_upstream_limit")
        .expect("incident recorded");
    assert_eq!(inc["action"], "trimmed");
    assert_eq!(inc["body_bytes"], original.len());
    assert_eq!(inc["bytes_after"], body.len());
    assert_eq!(inc["call_id"], before["call"]["call_id"]);
    assert_eq!(inc["top_fields"][0]["path"], "call.transcript");
}

#[tokio::test]
async fn small_payloads_pass_byte_identical_and_chunked_ones_get_a_content_length() {
    let mut receiver = Receiver::start(Behavior::LimitEarly(MIB as u64)).await;
    let proxy = start_proxy(config(&trim_route(""), receiver.addr)).await;
    let small = synthflow_payload(300_000, 1);
    let got = proxy.post_json(small.clone()).await;
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), small);

    // Chunked and over the limit: buffered, trimmed, sent with Content-Length.
    let big = synthflow_payload(3 * MIB, 2);
    let (tx, body) = channel_body();
    let addr = proxy.addr;
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = tokio::spawn(async move { send(addr, req).await });
    for chunk in big.chunks(64 * 1024) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(client.await.unwrap().status, 200);
    let seen = receiver.next().await;
    let body = seen.body.unwrap();
    assert!(body.len() <= MIB);
    assert_eq!(seen.headers["content-length"], body.len().to_string());
    serde_json::from_slice::<Value>(&body).unwrap();
}

#[tokio::test]
async fn gzip_bodies_are_decoded_trimmed_and_reencoded() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &trim_route("limit_counts = \"decoded\""),
        receiver.addr,
    ))
    .await;
    let gzip = |bytes: &[u8], level| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    };
    let post_gzip = |wire: Vec<u8>| {
        send(
            proxy.addr,
            Request::post(proxy.url("/hooks/test"))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(full(wire))
                .unwrap(),
        )
    };
    let original = synthflow_payload(3 * MIB, 9);
    let got = post_gzip(gzip(&original, flate2::Compression::default())).await;
    assert_eq!(got.status, 200);
    let seen = receiver.next().await;
    assert_eq!(seen.headers["content-encoding"], "gzip");
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&seen.body.unwrap()[..]),
        &mut decoded,
    )
    .unwrap();
    assert!(decoded.len() <= MIB, "decoded {} bytes", decoded.len());
    let after: Value = serde_json::from_slice(&decoded).unwrap();
    let before: Value = serde_json::from_slice(&original).unwrap();
    assert_eq!(after["call"]["call_id"], before["call"]["call_id"]);

    // A decompression bomb: 413, nothing forwarded.
    let bomb = gzip(&vec![b' '; 40 * MIB], flate2::Compression::best());
    let got = post_gzip(bomb).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "decompression_bomb");
    assert!(receiver.try_next().is_none());
}

#[tokio::test]
async fn untrimmable_payloads_follow_on_trim_failure() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&trim_route(""), receiver.addr)).await;
    let big_text = vec![b'a'; 2 * MIB];
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "text/plain")
            .body(full(big_text.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 413, "not JSON and on_trim_failure = reject");
    assert_eq!(got.json()["error"], "over_upstream_limit");
    let mut broken = synthflow_payload(2 * MIB, 3);
    broken.truncate(broken.len() - 10);
    let got = proxy.post_json(broken.clone()).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "trim_failed");
    assert!(receiver.try_next().is_none());
    let incidents = proxy.incidents().await;
    let failed: Vec<_> = incidents
        .iter()
        .filter(|i| i["action"] == "trim_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{incidents:#?}");
    assert!(failed[0]["reason"].as_str().unwrap().contains("not JSON"));
    assert!(
        failed[1]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("invalid json"),
        "{}",
        failed[1]["reason"]
    );

    // With on_trim_failure = "forward" both pass unchanged.
    let proxy = start_proxy(config(
        &trim_route("on_trim_failure = \"forward\""),
        receiver.addr,
    ))
    .await;
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "text/plain")
            .body(full(big_text.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), big_text);
}

/// The offset of a plain letter (not an escape's) in `body` at or after `from`.
fn letter_at_or_after(body: &[u8], from: usize) -> usize {
    (from..body.len())
        .find(|&i| body[i].is_ascii_lowercase() && body[i - 1].is_ascii_lowercase())
        .expect("a letter")
}

#[tokio::test]
async fn invalid_utf8_is_refused_where_it_would_be_sent_and_goes_with_what_is_cut() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&trim_route(""), receiver.addr)).await;
    let original = synthflow_payload(2 * MIB, 11);
    let transcript = original
        .windows(15)
        .position(|w| w == b"\"transcript\": \"")
        .expect("a transcript")
        + 15;

    // In the middle of the transcript, which head_tail cuts away: delivered, valid.
    let mut middle = original.clone();
    middle[letter_at_or_after(&original, original.len() / 2)] = 0xFF;
    let got = proxy.post_json(middle).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let body = receiver.next().await.body.unwrap();
    assert!(body.len() <= MIB);
    let doc: Value = serde_json::from_slice(&body).expect("valid JSON, valid UTF-8");
    assert_eq!(
        without_trimmed(doc),
        without_trimmed(serde_json::from_slice(&original).unwrap())
    );

    // At its head, which is kept: refused as invalid, never sent on.
    let mut head = original.clone();
    let at = letter_at_or_after(&original, transcript + 100);
    head[at] = 0xFF;
    let got = proxy.post_json(head).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "trim_failed");
    assert!(receiver.try_next().is_none());
    let incidents = proxy.incidents().await;
    let reason = incidents
        .iter()
        .find(|i| i["action"] == "trim_failed")
        .and_then(|i| i["reason"].as_str())
        .expect("a trim_failed incident")
        .to_lowercase();
    assert!(
        reason.contains("utf-8") && reason.contains(&format!("byte {at}")),
        "{reason}"
    );
}

#[tokio::test]
async fn rules_that_cannot_reach_the_limit_reject_or_forward_the_smallest() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let only_feedback = |extra: &str| {
        one_route(
            &format!(
                "upstream_limit = \"1MiB\"\n{extra}\n[[routes.trim]]\npath = \"analysis.*_feedback\"\naction = \"drop\"\n"
            ),
            "",
        )
    };
    let proxy = start_proxy(config(&only_feedback(""), receiver.addr)).await;
    let big = synthflow_payload(2 * MIB, 4);
    let req = || {
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .body(full(big.clone()))
            .unwrap()
    };
    let got = send(proxy.addr, req()).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "trim_failed");
    assert!(receiver.try_next().is_none());

    let proxy2 = start_proxy(config(
        &only_feedback("on_trim_failure = \"forward\""),
        receiver.addr,
    ))
    .await;
    let got = proxy2.post_json(big.clone()).await;
    assert_eq!(got.status, 200);
    let seen = receiver.next().await;
    let body = seen.body.unwrap();
    assert!(
        body.len() < big.len() && body.len() > MIB,
        "smallest result forwarded"
    );
    assert!(
        seen.headers["payload-guard-trimmed"]
            .to_str()
            .unwrap()
            .contains("_feedback=")
    );
}

#[tokio::test]
async fn dry_run_forwards_the_original_and_records_what_would_happen() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&trim_route("trim_dry_run = true"), receiver.addr)).await;
    let big = synthflow_payload(2 * MIB, 5);
    let got = proxy.post_json(big.clone()).await;
    assert_eq!(got.status, 200);
    let seen = receiver.next().await;
    assert_eq!(seen.body.unwrap(), big);
    assert!(!seen.headers.contains_key("payload-guard-trimmed"));
    let incidents = proxy.incidents().await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    assert_eq!(incidents[0]["dry_run"], true);
    assert_eq!(incidents[0]["action"], "forwarded");
    assert!(incidents[0]["bytes_after"].as_u64().unwrap() <= MIB as u64);
}

#[tokio::test]
async fn a_payload_of_too_many_values_for_the_budget_gets_503_and_a_normal_one_is_trimmed() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let text = trim_route("").replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        "[server]\nlisten = \"127.0.0.1:0\"\nbuffer_budget = \"4MiB\"\n",
    );
    let proxy = start_proxy(config(&text, receiver.addr)).await;
    // 1.5 MiB of tiny values: the body and its output fit the 4 MiB budget, the scan's
    // 28 bytes per value (about 21 MiB) do not.
    let mut numbers = String::from(r#"{"call":{"call_id":"c1","transcript":"x"},"n":[0"#);
    while numbers.len() < 3 * MIB / 2 {
        numbers.push_str(",0");
    }
    numbers.push_str("]}");
    let got = proxy.post_json(numbers).await;
    assert_eq!(got.status, 503, "{:?}", got.body);
    assert_eq!(got.json()["error"], "buffer_budget_exhausted");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);
    assert_eq!(
        proxy.proxy.shared().budget.in_use(),
        0,
        "reservations are released"
    );

    // A Synthflow payload of the same size is trimmed within the same budget.
    let payload = synthflow_payload(3 * MIB / 2, 7);
    let got = proxy.post_json(payload).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert!(receiver.next().await.body.unwrap().len() <= MIB);
    assert_eq!(proxy.proxy.shared().budget.in_use(), 0);
}

#[tokio::test]
async fn buffer_budget_exhaustion_gets_503_with_retry_after() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let text = trim_route("").replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        "[server]\nlisten = \"127.0.0.1:0\"\nbuffer_budget = \"1MiB\"\n",
    );
    let proxy = start_proxy(config(&text, receiver.addr)).await;
    let big = synthflow_payload(2 * MIB, 6);
    let got = proxy.post_json(big).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.headers["retry-after"], "1");
    assert_eq!(got.json()["error"], "buffer_budget_exhausted");
    assert_eq!(receiver.started.load(Ordering::SeqCst), 0);
    assert_eq!(
        proxy.proxy.shared().budget.in_use(),
        0,
        "reservations are released"
    );
    let incidents = proxy.incidents().await;
    assert_eq!(incidents[0]["kind"], "buffer_budget_exhausted");
}

/// `trim_route` with one worker thread: one large body is held in memory at a time.
fn one_slot_trim_route() -> String {
    trim_route("").replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        "[server]\nlisten = \"127.0.0.1:0\"\nworker_threads = 1\n",
    )
}

/// A large JSON POST to `/hooks/test` with its `Content-Length`, fed through a channel.
fn large_post(
    proxy: &ProxyHandle,
    len: usize,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    Request<TestBody>,
) {
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(body)
        .unwrap();
    (tx, req)
}

#[tokio::test]
async fn a_sender_stalled_in_the_only_body_slot_holds_up_no_one_and_nothing_is_lost() {
    let mut receiver = Receiver::start(Behavior::LimitEarly(MIB as u64)).await;
    let proxy = start_proxy(config(&one_slot_trim_route(), receiver.addr)).await;
    let slots = proxy.proxy.shared().slots.clone();
    assert_eq!(slots.slots(), 1);

    // A slow sender takes the only slot, sends 2 of its 3 MiB and stalls.
    let slow = synthflow_payload(3 * MIB, 100);
    let (tx, req) = large_post(&proxy, slow.len());
    let addr = proxy.addr;
    let slow_client = tokio::spawn(async move { send(addr, req).await });
    for chunk in slow[..2 * MIB].chunks(64 * 1024) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .await
            .unwrap();
    }
    while slots.available() > 0 {
        tokio::task::yield_now().await;
    }

    // Eight large payloads at once meanwhile: every one arrives, trimmed.
    let fast: Vec<_> = (0..8)
        .map(|seed| {
            let payload = synthflow_payload(2 * MIB, seed);
            let req = Request::post(proxy.url("/hooks/test"))
                .header("content-type", "application/json")
                .header("x-payload", seed)
                .body(full(payload))
                .unwrap();
            tokio::spawn(async move { send(addr, req).await })
        })
        .collect();
    for client in fast {
        let got = client.await.unwrap();
        assert_eq!(got.status, 200, "{:?}", got.body);
    }
    assert!(!slow_client.is_finished());

    // The slow sender finishes: its payload arrives too.
    for chunk in slow[2 * MIB..].chunks(64 * 1024) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(slow_client.await.unwrap().status, 200);

    let mut arrived = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let seen = receiver.next().await;
        let body = seen.body.unwrap();
        assert!(body.len() <= MIB, "{} bytes arrived", body.len());
        serde_json::from_slice::<Value>(&body).expect("valid JSON");
        let which = seen
            .headers
            .get("x-payload")
            .map_or("slow", |v| v.to_str().unwrap());
        arrived.insert(which.to_string());
    }
    assert_eq!(
        arrived.len(),
        9,
        "nine distinct payloads arrived: {arrived:?}"
    );
    assert_eq!(slots.available(), 1, "the slot is free again");
    assert_eq!(proxy.proxy.shared().budget.in_use(), 0, "nothing held");
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_keeps_no_body_slot() {
    let hanging = Receiver::start(Behavior::Hang).await;
    let mut receiver = Receiver::start(Behavior::LimitEarly(MIB as u64)).await;
    // Two routes, one worker thread: `/hooks/slow` to a receiver that never answers.
    let slow_route = trim_route("")
        .replace("[[routes]]", "[[routes]]\nresponse_timeout = \"60s\"")
        .replace("name = \"test\"", "name = \"slow\"")
        .replace("/hooks/test", "/hooks/slow")
        .replace("{upstream}", &hanging.addr.to_string());
    let text = one_slot_trim_route() + &slow_route[slow_route.find("[[routes]]").unwrap()..];
    let proxy = start_proxy(config(&text, receiver.addr)).await;
    let slots = proxy.proxy.shared().slots.clone();

    let addr = proxy.addr;
    let req = Request::post(proxy.url("/hooks/slow"))
        .header("content-type", "application/json")
        .body(full(synthflow_payload(2 * MIB, 1)))
        .unwrap();
    let stuck = tokio::spawn(async move { send(addr, req).await });
    while hanging.started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }

    let got = proxy.post_json(synthflow_payload(2 * MIB, 2)).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert!(receiver.next().await.body.unwrap().len() <= MIB);
    assert!(!stuck.is_finished());
    assert_eq!(
        slots.available(),
        1,
        "the payload waiting on the silent receiver gave its slot up"
    );
}
