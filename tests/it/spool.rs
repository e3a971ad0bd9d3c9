//! Nothing lost: spool routes keep what the receiver could not take and deliver it later,
//! across restarts (even SIGKILL), with backoff; dead letters; archived originals; replay.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use http::Request;
use payload_guard::config::Config;
use payload_guard::deliver::{self, RoundReport};
use payload_guard::trim::testdata::synthflow_payload;

use crate::support::*;

/// Writes a config with a spool route to `upstream` into `dir`; returns its path.
fn spool_config(
    dir: &Path,
    upstream: std::net::SocketAddr,
    route_keys: &str,
    spool_keys: &str,
) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[spool]
dir = "spool"
min_free = 0
{spool_keys}
[[routes]]
name = "test"
path_prefix = "/hooks/test"
upstream = "http://{upstream}/webhook"
spool = true
{route_keys}
"#
        ),
    )
    .unwrap();
    path
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

async fn round(proxy: &ProxyHandle, now: SystemTime) -> RoundReport {
    deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), now).await
}

/// The running proxy's spool records in `state`.
async fn listed(
    proxy: &ProxyHandle,
    state: payload_guard::spool::State,
) -> Vec<payload_guard::spool::Entry> {
    proxy
        .proxy
        .shared()
        .spool
        .as_ref()
        .expect("the route spools")
        .spool
        .list(state, None)
        .await
        .unwrap()
}

fn post_json(proxy: &ProxyHandle, body: Vec<u8>) -> Request<TestBody> {
    Request::post(proxy.url("/hooks/test/x?y=1"))
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

#[tokio::test]
async fn receiver_down_gets_202_then_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = free_addr();
    let path = spool_config(dir.path(), upstream, "", "");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = synthflow_payload(20_000, 1);
    let got = send(proxy.addr, post_json(&proxy, body.clone())).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    let id = got.json()["spool_id"].as_str().unwrap().to_string();
    assert_eq!(got.headers["payload-guard-spool-id"], id.as_str());
    let record = dir.path().join("spool/ready").join(&id);
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(dir.path().join("spool/ready"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    // Still down: the attempt fails and the record waits.
    let now = SystemTime::now();
    assert_eq!(
        round(&proxy, now).await,
        RoundReport {
            retried: 1,
            ..Default::default()
        }
    );
    // Up: delivered once, with the same body and the idempotency key.
    let mut receiver = Receiver::start_at(upstream, Behavior::Ok).await;
    let later = now + Duration::from_secs(3600);
    assert_eq!(
        round(&proxy, later).await,
        RoundReport {
            delivered: 1,
            ..Default::default()
        }
    );
    let seen = receiver.next().await;
    assert_eq!(seen.body.unwrap(), body);
    assert_eq!(seen.uri.path(), "/webhook/x");
    assert_eq!(seen.uri.query(), Some("y=1"));
    assert_eq!(
        seen.headers["idempotency-key"],
        "1732630000000x222222222222222222"
    );
    assert!(!record.exists());
    assert_eq!(round(&proxy, later).await, RoundReport::default());
    assert!(receiver.try_next().is_none(), "delivered exactly once");
}

#[tokio::test]
async fn a_500_then_200_is_delivered_on_retry_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Behavior::FailFirst(2, 500)).await;
    let path = spool_config(dir.path(), receiver.addr, "", "retry_initial = \"10s\"");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let got = send(proxy.addr, post_json(&proxy, b"{\"a\":1}".to_vec())).await;
    assert_eq!(got.status, 202);
    receiver.next().await; // the live attempt: 500
    let now = SystemTime::now();
    assert_eq!(round(&proxy, now).await.retried, 1); // 500 again
    receiver.next().await;
    let entries = listed(&proxy, payload_guard::spool::State::Ready).await;
    let next = entries[0].meta.next_attempt_at.unwrap();
    let wait = next.duration_since(now).unwrap();
    assert!(
        wait >= Duration::from_secs(5) && wait <= Duration::from_secs(20),
        "backoff {wait:?}"
    );
    assert_eq!(entries[0].meta.attempts, 1);
    let shared = proxy.proxy.shared();
    let waiting = shared.metrics.encode(&shared.snapshot());
    assert!(
        waiting
            .lines()
            .any(|l| l == "payload_guard_spool_route_depth{route=\"test\"} 1"),
        "{waiting}"
    );
    // Not due yet: nothing is sent.
    assert_eq!(
        round(&proxy, now + Duration::from_secs(1)).await,
        RoundReport::default()
    );
    assert!(receiver.try_next().is_none());
    assert_eq!(round(&proxy, next).await.delivered, 1);
    assert_eq!(receiver.next().await.body.unwrap(), "{\"a\":1}");
    // The redelivery counters and the per-route spool gauges saw it.
    let shared = proxy.proxy.shared();
    let text = shared.metrics.encode(&shared.snapshot());
    for line in [
        "payload_guard_redelivery_attempts_total{route=\"test\",outcome=\"failed\"} 1",
        "payload_guard_redelivery_attempts_total{route=\"test\",outcome=\"delivered\"} 1",
        "payload_guard_redelivered_total{route=\"test\"} 1",
        "payload_guard_dead_lettered_total{route=\"test\",reason=\"expired\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(!text.contains("payload_guard_spool_route_depth{"), "{text}");
}

#[tokio::test]
async fn a_final_400_is_passed_through_and_kept_as_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Behavior::Status(400)).await;
    let path = spool_config(dir.path(), receiver.addr, "dead_letter = true", "");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let got = send(proxy.addr, post_json(&proxy, b"{\"bad\":true}".to_vec())).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["received"], 12, "the receiver's own body");
    receiver.next().await;
    let dead = listed(&proxy, payload_guard::spool::State::Dead).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].meta.status, Some(400));
    assert!(
        dead[0]
            .meta
            .snippet
            .as_deref()
            .unwrap()
            .contains("received")
    );
    assert!(files(&dir.path().join("spool/ready")).is_empty());

    // `spool purge --dry-run` lists what it would remove and removes nothing.
    let purge = |extra: &[&str]| {
        std::process::Command::new(crate::support::binary())
            .args(["spool", "purge", "--state", "dead", "--older-than", "0s"])
            .args(extra)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = purge(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&dead[0].id.to_string()), "{stdout}");
    assert!(
        stdout.contains("would remove 1 dead record older than 0s (dry run: nothing removed)"),
        "{stdout}"
    );
    assert_eq!(
        listed(&proxy, payload_guard::spool::State::Dead)
            .await
            .len(),
        1
    );
    let out = purge(&[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 dead record"));
    assert!(
        listed(&proxy, payload_guard::spool::State::Dead)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_413_after_the_trim_retry_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Behavior::LimitEarly(50)).await;
    let path = spool_config(
        dir.path(),
        receiver.addr,
        "upstream_limit = \"1MiB\"\nretry_on_413 = true\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"",
        "",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let original = synthflow_payload(20_000, 3);
    let original_len = original.len() as u64;
    let got = send(proxy.addr, post_json(&proxy, original)).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    let ready = listed(&proxy, payload_guard::spool::State::Ready).await;
    assert_eq!(ready.len(), 1);
    assert!(ready[0].meta.last_error.as_deref().unwrap().contains("413"));
    assert_eq!(
        ready[0].body_len, original_len,
        "the original is kept, untrimmed"
    );
    let incidents = proxy.incidents().await;
    let u413 = incidents
        .iter()
        .find(|i| i["kind"] == "upstream_413")
        .unwrap();
    assert_eq!(u413["retry"]["attempted"], true);
}

#[tokio::test]
async fn a_full_spool_gets_503_and_keeps_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = spool_config(dir.path(), free_addr(), "", "max_bytes = 1000");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let got = send(proxy.addr, post_json(&proxy, synthflow_payload(5000, 2))).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.headers["retry-after"], "30");
    assert_eq!(got.json()["error"], "spool_unavailable");
    assert!(files(&dir.path().join("spool/tmp")).is_empty());
    assert!(files(&dir.path().join("spool/ready")).is_empty());
    let incidents = proxy.incidents().await;
    assert_eq!(incidents[0]["kind"], "spool_refused");
}

#[tokio::test]
async fn torn_and_corrupt_records_are_cleaned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = spool_config(dir.path(), free_addr(), "", "");
    let config = Config::load(&path).unwrap();
    {
        let (spool, _) =
            payload_guard::spool::Spool::open(deliver::spool_config(&config.spool)).unwrap();
        let meta = payload_guard::spool::Meta::new(
            "test",
            SystemTime::now(),
            "r1",
            "POST",
            "/hooks/test",
            5,
        );
        let id = spool
            .commit(payload_guard::spool::State::Ready, &meta, b"hello")
            .unwrap();
        let record = dir.path().join("spool/ready").join(id.as_str());
        let mut bytes = std::fs::read(&record).unwrap();
        bytes[41] ^= 0xff; // inside the body
        std::fs::write(&record, bytes).unwrap();
        std::fs::write(dir.path().join("spool/tmp/torn"), b"half a record").unwrap();
    }
    let proxy = start_proxy(config).await;
    assert!(
        files(&dir.path().join("spool/tmp")).is_empty(),
        "torn record removed"
    );
    assert!(files(&dir.path().join("spool/ready")).is_empty());
    assert_eq!(
        files(&dir.path().join("spool/quarantine")).len(),
        1,
        "corrupt record quarantined"
    );
    // And the proxy works: the receiver is down, so the payload is spooled.
    assert_eq!(
        send(proxy.addr, post_json(&proxy, b"{}".to_vec()))
            .await
            .status,
        202
    );
}

#[tokio::test]
async fn archived_originals_are_served_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[spool]\ndir = \"spool\"\nmin_free = 0\n[[routes]]\nname = \"test\"\npath_prefix = \"/hooks/test\"\nupstream = \"http://{}/webhook\"\nupstream_limit = \"50KiB\"\narchive_originals = true\nclaim_check_url = \"https://guard.example.com/originals\"\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\n",
            receiver.addr
        ),
    )
    .unwrap();
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let admin = start_admin(&proxy, &path).await;
    let original = synthflow_payload(200_000, 4);
    let got = send(proxy.addr, post_json(&proxy, original.clone())).await;
    assert_eq!(got.status, 200);
    let seen = receiver.next().await;
    assert!(seen.body.unwrap().len() <= 50 * 1024);
    let id = seen.headers["payload-guard-original"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        seen.headers["payload-guard-original-url"],
        format!("https://guard.example.com/originals/{id}").as_str()
    );
    let fetched = admin_request(admin, "GET", &format!("/originals/{id}"), None).await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.body, original);
    assert_eq!(fetched.headers["content-type"], "application/json");
    assert_eq!(
        admin_request(admin, "GET", "/originals/not-an-id", None)
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn replay_cli_delivers_to_a_real_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let path = spool_config(dir.path(), free_addr(), "", "");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = synthflow_payload(10_000, 5);
    assert_eq!(
        send(proxy.addr, post_json(&proxy, body.clone()))
            .await
            .status,
        202
    );
    let bin = crate::support::binary();
    let out = Command::new(&bin)
        .args(["spool", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("1732630000000x222222222222222222"),
        "{listing}"
    );
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let to = format!("http://{}/elsewhere", receiver.addr);
    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            Command::new(&bin)
                .args(["replay", "--to", &to, "--config"])
                .arg(&path)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1: 1 delivered, 0 failed"));
    let seen = receiver.next().await;
    assert_eq!(seen.uri.path(), "/elsewhere/x");
    assert_eq!(seen.body.unwrap(), body);
    assert!(files(&dir.path().join("spool/ready")).is_empty());
    drop(proxy);
}

#[tokio::test]
async fn a_payload_acknowledged_before_sigkill_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = free_addr();
    let path = spool_config(
        dir.path(),
        upstream,
        "",
        "retry_initial = \"100ms\"\nredeliver_interval = \"100ms\"",
    );
    let start = move || {
        let mut child = crate::support::ChildGuard(
            Command::new(crate::support::binary())
                .args(["--config"])
                .arg(&path)
                .env("RUST_LOG", "info")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr: std::net::SocketAddr = loop {
            let line = lines.next().expect("proxy exited").unwrap();
            if let Some(pos) = line.find("listen=") {
                let rest = &line[pos + 7..];
                break rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse()
                    .unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        (child, addr)
    };
    let (mut child, addr) = tokio::task::spawn_blocking(start.clone()).await.unwrap();
    let body = synthflow_payload(10_000, 6);
    let got = send(
        addr,
        Request::post(format!("http://{addr}/hooks/test"))
            .header("content-type", "application/json")
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 202);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut receiver = Receiver::start_at(upstream, Behavior::Ok).await;
    let (mut child, _) = tokio::task::spawn_blocking(start).await.unwrap();
    let seen = receiver.next().await;
    assert_eq!(seen.body.unwrap(), body);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn large_bodies_are_staged_on_disk_not_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = free_addr();
    let path = spool_config(
        dir.path(),
        upstream,
        "spool_memory_threshold = \"1KiB\"",
        "",
    );
    // A buffer budget smaller than the body: it must not be buffered in memory.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[server]\n", "[server]\nbuffer_budget = \"4KiB\"\n");
    std::fs::write(&path, text).unwrap();
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = synthflow_payload(200_000, 7);
    let got = send(proxy.addr, post_json(&proxy, body.clone())).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    assert!(files(&dir.path().join("spool/tmp")).is_empty());
    let id: payload_guard::spool::RecordId =
        got.json()["spool_id"].as_str().unwrap().parse().unwrap();
    let (_, stored) = proxy
        .proxy
        .shared()
        .spool
        .as_ref()
        .unwrap()
        .spool
        .read(payload_guard::spool::State::Ready, &id)
        .await
        .unwrap();
    assert_eq!(stored, body);

    // Receiver up: a staged body is forwarded from the file, and the file removed.
    let mut receiver = Receiver::start_at(upstream, Behavior::Ok).await;
    let later = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(round(&proxy, later).await.delivered, 1);
    assert_eq!(receiver.next().await.body.unwrap(), body);
    let got = send(proxy.addr, post_json(&proxy, body.clone())).await;
    assert_eq!(got.status, 200);
    let seen = receiver.next().await;
    assert_eq!(seen.headers["content-length"], body.len().to_string());
    assert_eq!(seen.body.unwrap(), body);
    assert!(
        files(&dir.path().join("spool/tmp")).is_empty(),
        "staging file removed after delivery"
    );
    assert!(files(&dir.path().join("spool/ready")).is_empty());
}

#[tokio::test]
async fn a_receiver_that_breaks_off_mid_answer_gets_the_payload_spooled() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                .await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = spool_config(dir.path(), upstream, "", "");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let got = send(proxy.addr, post_json(&proxy, b"{\"a\":1}".to_vec())).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    let ready = listed(&proxy, payload_guard::spool::State::Ready).await;
    assert_eq!(ready.len(), 1);
    assert!(
        ready[0]
            .meta
            .last_error
            .as_deref()
            .unwrap()
            .contains("broke off"),
        "{:?}",
        ready[0].meta.last_error
    );
}

#[tokio::test]
async fn reject_routes_still_reject_when_they_spool() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Behavior::Ok).await;
    let path = spool_config(
        dir.path(),
        receiver.addr,
        "upstream_limit = 1000\non_oversize = \"reject\"\nspool_memory_threshold = 100",
        "",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    // Declared length over the limit.
    let got = send(proxy.addr, post_json(&proxy, synthflow_payload(5000, 8))).await;
    assert_eq!(got.status, 413);
    // Chunked, staged on disk while it streams: cut off at the limit.
    let (tx, body) = channel_body();
    let addr = proxy.addr;
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(vec![
        b' ';
        3000
    ]))))
    .await
    .unwrap();
    drop(tx);
    assert_eq!(client.await.unwrap().status, 413);
    assert_eq!(
        receiver.started.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(files(&dir.path().join("spool/ready")).is_empty());
    assert!(files(&dir.path().join("spool/tmp")).is_empty());
}
