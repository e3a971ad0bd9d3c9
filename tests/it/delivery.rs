//! The one delivery path, end to end: nothing lost, nothing duplicated, always within the
//! receiver's limit. One test per problem the first version had, against a real Express
//! receiver where the units matter, and hyper receivers elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use payload_guard::config::Config;
use payload_guard::deliver::{self, RoundReport};
use payload_guard::spool::State;
use payload_guard::trim::payload::{Encoding, encode};
use payload_guard::trim::testdata::synthflow_payload;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::express::Express;
use crate::support::*;

const CALL_ID: &str = "1732630000000x222222222222222222";

/// A Synthflow payload of about `size` bytes whose call id is `id` (same length as the
/// generator's own, so sizes stay as asked).
fn payload_with_id(size: usize, seed: u64, id: &str) -> Vec<u8> {
    assert_eq!(id.len(), CALL_ID.len());
    let text = String::from_utf8(synthflow_payload(size, seed)).unwrap();
    text.replacen(CALL_ID, id, 1).into_bytes()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

const TRIM_RULES: &str = r#"
on_oversize = "trim"
[[routes.trim]]
path = "analysis.*_feedback"
action = "drop"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"
"#;

/// A config file in `dir` for one route to `upstream` (incidents and state in `dir`).
fn config_file(
    dir: &Path,
    upstream: std::net::SocketAddr,
    route_keys: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[incidents]
path = "incidents.jsonl"
{extra}
[[routes]]
name = "test"
path_prefix = "/hooks/test"
upstream = "http://{upstream}/webhook"
{route_keys}
"#
        ),
    )
    .unwrap();
    path
}

async fn post(proxy: &ProxyHandle, body: impl Into<Bytes>, gzip: bool) -> Got {
    let mut req =
        Request::post(proxy.url("/hooks/test")).header("content-type", "application/json");
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    send(proxy.addr, req.body(full(body)).unwrap()).await
}

/// (1) One gzip 413 must not poison a `wire` route: the refusal is evidence about the decoded
/// size, the refused payload is trimmed (in decoded bytes) and delivered at once, and plain
/// payloads that fit keep passing byte-identical, also after a restart. `payload-guard
/// limits` shows the evidence; `--reset` clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_413_on_a_wire_route_does_not_poison_it() {
    let Some(mut express) = Express::start("100kb").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(
        dir.path(),
        express.addr,
        &format!("upstream_limit = \"100KiB\"\n{TRIM_RULES}"),
        "",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let json = synthflow_payload(409_000, 1);
    let gz = encode(&json, Encoding::Gzip);
    assert!(gz.len() < 20_000, "a small body on the wire: {}", gz.len());
    let got = post(&proxy, gz, true).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let mut refused = 0;
    let delivered = loop {
        let seen = express.next().await;
        if seen.status == 413 {
            refused += 1;
            continue;
        }
        break seen;
    };
    assert!(refused >= 1);
    assert_eq!(delivered.status, 200);
    assert!(delivered.bytes.unwrap() <= 102_400, "{delivered:?}");
    assert_eq!(delivered.call_id.as_deref(), Some(CALL_ID));
    assert_eq!(delivered.encoding.as_deref(), Some("gzip"));
    let incidents = proxy.incidents().await;
    let first = incidents
        .iter()
        .find(|i| i["kind"] == "upstream_413")
        .unwrap();
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("limit_counts = \"decoded\""),
        "{first}"
    );

    // Twenty plain 20 KB payloads: all delivered byte-identical, untrimmed.
    for seed in 0..20 {
        let body = synthflow_payload(20_000, 100 + seed);
        assert_eq!(post(&proxy, body.clone(), false).await.status, 200);
        let seen = express.next().await;
        assert_eq!(seen.status, 200);
        assert_eq!(seen.sha256.as_deref(), Some(sha256(&body).as_str()));
        assert_eq!(seen.trimmed, None);
    }
    let learned = proxy.proxy.shared().learned.route("test").unwrap();
    assert!(learned.wire.smallest_rejected.is_none(), "{learned:?}");
    assert!(learned.decoded.smallest_rejected.is_some(), "{learned:?}");

    // Restart: what was learned is read back, and plain payloads still pass untouched.
    let mut proxy = proxy;
    proxy.proxy.shared().flush_state();
    proxy.shutdown();
    drop(proxy);
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = synthflow_payload(20_000, 999);
    assert_eq!(post(&proxy, body.clone(), false).await.status, 200);
    let seen = express.next().await;
    assert_eq!(seen.sha256.as_deref(), Some(sha256(&body).as_str()));
    assert!(
        proxy
            .proxy
            .shared()
            .learned
            .route("test")
            .unwrap()
            .decoded
            .smallest_rejected
            .is_some(),
        "the evidence survived the restart"
    );
    let mut proxy = proxy;
    proxy.proxy.shared().flush_state();
    proxy.shutdown();
    drop(proxy);

    // The CLI shows the evidence, and --reset clears it.
    let cli = |args: &[&str]| {
        std::process::Command::new(crate::support::binary())
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = cli(&["limits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("refused") && text.contains("decoded"),
        "{text}"
    );
    let out = cli(&["limits", "--reset", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&cli(&["limits"]).stdout).into_owned();
    assert!(text.contains("nothing learned"), "{text}");
}

/// (2) Unknown limit, Express's 100kb: five oversize payloads, all delivered (trimmed to
/// within 102,400 bytes, valid JSON, call id intact), the first within one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_limit_five_oversize_payloads_are_all_delivered() {
    let Some(mut express) = Express::start("100kb").await else {
        return;
    };
    let proxy = start_proxy(config(&one_route(TRIM_RULES, ""), express.addr)).await;
    for (i, size) in [150_000, 300_000, 600_000, 1_000_000, 2_000_000]
        .into_iter()
        .enumerate()
    {
        let id = format!("1732630000000x2222222222222222{i:02}");
        let body = payload_with_id(size, i as u64, &id);
        let got = post(&proxy, body, false).await;
        assert_eq!(got.status, 200, "payload {i}: {:?}", got.body);
        let delivered = loop {
            let seen = express.next().await;
            if seen.status == 200 {
                break seen;
            }
            assert_eq!(seen.status, 413);
        };
        assert!(
            delivered.bytes.unwrap() <= 102_400,
            "payload {i}: {delivered:?}"
        );
        assert_eq!(delivered.call_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            delivered.idempotency_key.as_deref(),
            Some(id.as_str()),
            "the payload's id on every attempt"
        );
    }
    assert!(
        express.try_next().is_none(),
        "no attempt after the delivered one"
    );
}

/// (3) A spool route whose receiver takes 8,000 bytes: a 51 KB payload is trimmed lower on
/// every 413 (live, then on redelivery) until it is delivered, never resent unchanged.
#[tokio::test]
async fn a_413_on_a_spool_route_is_trimmed_lower_never_resent_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Behavior::LimitEarly(8_000)).await;
    let path = config_file(
        dir.path(),
        receiver.addr,
        &format!("spool = true\ndead_letter = true\n{TRIM_RULES}"),
        "[spool]\ndir = \"spool\"\nmin_free = 0\nretry_initial = \"1s\"",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = synthflow_payload(51_000, 5);
    let got = post(&proxy, body.clone(), false).await;
    assert!(matches!(got.status.as_u16(), 200 | 202), "{:?}", got.body);
    let mut now = SystemTime::now();
    for _ in 0..5 {
        if listed_len(&proxy, State::Ready).await == 0 {
            break;
        }
        now += Duration::from_secs(3600);
        deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), now).await;
    }
    let mut sizes = Vec::new();
    let mut delivered = false;
    while let Some(seen) = receiver.try_next() {
        sizes.push(
            seen.headers["content-length"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
        delivered |= seen.body.is_ok();
    }
    assert!(
        sizes.windows(2).all(|w| w[1] < w[0]),
        "always lower: {sizes:?}"
    );
    assert_eq!(sizes[0], body.len() as u64);
    assert_eq!(listed_len(&proxy, State::Ready).await, 0, "{sizes:?}");
    let dead = listed_len(&proxy, State::Dead).await;
    assert!(delivered || dead == 1, "delivered or dead: {sizes:?}");
}

async fn listed_len(proxy: &ProxyHandle, state: State) -> usize {
    let spool = &proxy.proxy.shared().spool.as_ref().unwrap().spool;
    spool.list(state, None).await.unwrap().len()
}

/// A raw receiver for (4): answers the first `broken` requests with a 2xx that breaks off
/// (Content-Length 100, 10 bytes, close), then 200; reports each request's body and
/// `Idempotency-Key`.
async fn breaking_receiver(
    listener: TcpListener,
    broken: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Option<String>)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (tx, count) = (tx.clone(), count.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let head_end = loop {
                        if let Some(i) = seen.windows(4).position(|w: &[u8]| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                            .map(|v| v.trim().to_string())
                    };
                    let len: usize = header("content-length").unwrap().parse().unwrap();
                    while seen.len() < head_end + len {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body =
                        String::from_utf8_lossy(&seen[head_end..head_end + len]).into_owned();
                    seen.drain(..head_end + len);
                    let _ = tx.send((body, header("idempotency-key")));
                    if count.fetch_add(1, Ordering::SeqCst) < broken {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                            .await;
                        return;
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    rx
}

/// (4) and (6): a 2xx that breaks off is not "delivered": the payload is spooled and retried,
/// with the same `Idempotency-Key` on every attempt; payloads spooled while the receiver is
/// down arrive in arrival order, also when the oldest one failed again in between.
#[tokio::test]
async fn broken_answers_are_retried_in_order_with_one_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let path = config_file(
        dir.path(),
        addr,
        "spool = true",
        "[spool]\ndir = \"spool\"\nmin_free = 0\nretry_initial = \"10s\"",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let mut seen = breaking_receiver(listener, 1).await;
    let first = payload_with_id(3_000, 1, "1732630000000x000000000000000001");
    let got = post(&proxy, first.clone(), false).await;
    assert_eq!(
        got.status, 202,
        "a broken 2xx is not delivered: {:?}",
        got.body
    );
    let (body, key) = seen.recv().await.unwrap();
    assert_eq!(body.as_bytes(), &first[..]);
    assert_eq!(key.as_deref(), Some("1732630000000x000000000000000001"));
    let now = SystemTime::now();
    assert_eq!(
        deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), now)
            .await
            .delivered,
        1
    );
    let (body, again) = seen.recv().await.unwrap();
    assert_eq!(body.as_bytes(), &first[..]);
    assert_eq!(again, key, "the same Idempotency-Key on every attempt");
    drop(proxy);

    // Order: the receiver is down; payload 1 fails on redelivery (so it waits for its
    // backoff), payloads 2..10 arrive meanwhile; all ten are delivered 1, 2, ..., 10.
    let dir = tempfile::tempdir().unwrap();
    let down = free_addr();
    let path = config_file(
        dir.path(),
        down,
        "spool = true",
        "[spool]\ndir = \"spool\"\nmin_free = 0\nretry_initial = \"10s\"",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let body = |n: usize| format!("{{\"n\":{n}}}");
    assert_eq!(post(&proxy, body(1), false).await.status, 202);
    let t0 = SystemTime::now();
    let report = deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), t0).await;
    assert_eq!(report.retried, 1);
    for n in 2..=10 {
        assert_eq!(post(&proxy, body(n), false).await.status, 202);
    }
    let mut receiver = Receiver::start_at(down, Behavior::Ok).await;
    let soon = t0 + Duration::from_secs(1);
    assert_eq!(
        deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), soon).await,
        RoundReport::default(),
        "nothing overtakes the oldest payload while it waits"
    );
    let later = t0 + Duration::from_secs(3600);
    let report =
        deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), later).await;
    assert_eq!(report.delivered, 10);
    for n in 1..=10 {
        assert_eq!(receiver.next().await.body.unwrap(), body(n).as_bytes());
    }
}

/// (5) `dedupe`: an exact repeat is answered without forwarding; a repeat with a different
/// body is forwarded and recorded as a conflict.
#[tokio::test]
async fn dedupe_drops_the_exact_repeat_and_records_a_conflict() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("dedupe = \"24h\"", ""), receiver.addr)).await;
    let a = payload_with_id(3_000, 1, "1732630000000x000000000000000042");
    let b = payload_with_id(3_000, 2, "1732630000000x000000000000000042");
    let first = post(&proxy, a.clone(), false).await;
    assert_eq!(first.status, 200);
    let seen = receiver.next().await;
    assert_eq!(
        seen.headers["idempotency-key"],
        "1732630000000x000000000000000042"
    );
    let first_id = first.headers["x-request-id"].to_str().unwrap().to_string();
    let again = post(&proxy, a, false).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["payload-guard-duplicate"], first_id.as_str());
    let conflict = post(&proxy, b.clone(), false).await;
    assert_eq!(conflict.status, 200);
    assert_eq!(
        receiver.next().await.body.unwrap(),
        b,
        "the different body is forwarded"
    );
    assert!(receiver.try_next().is_none(), "the exact repeat was not");
    let incidents = proxy.incidents().await;
    let kinds: Vec<&str> = incidents
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["duplicate_conflict"]);
}

/// (7) Disk trouble: when a record cannot be updated after a failed attempt, redelivery holds
/// the route for the backoff delay instead of hitting the receiver every round, `/readyz`
/// answers 503 while the spool cannot take records, and both recover by themselves.
#[tokio::test]
async fn a_broken_spool_disk_holds_backoff_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(Behavior::FailFirst(2, 503)).await;
    let path = config_file(
        dir.path(),
        receiver.addr,
        "spool = true",
        "[spool]\ndir = \"spool\"\nmin_free = 0\nretry_initial = \"10s\"",
    );
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let admin = start_admin(&proxy, &path).await;
    assert_eq!(post(&proxy, "{\"a\":1}", false).await.status, 202);
    receiver.next().await;
    assert_eq!(
        admin_request(admin, "GET", "/readyz", None).await.status,
        200
    );

    // The spool's tmp/ stops being usable (as a full or broken disk would): every rewrite
    // of a record fails.
    let tmp = dir.path().join("spool/tmp");
    std::fs::rename(&tmp, dir.path().join("spool/tmp.off")).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let ready = admin_request(admin, "GET", "/readyz", None).await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(ready.json()["status"], "spool_unavailable");

    let now = SystemTime::now();
    let round = |at| deliver::redeliver_due(proxy.proxy.current(), proxy.proxy.shared_arc(), at);
    round(now).await;
    receiver.next().await; // 503 again; the record could not be updated
    let before = receiver.started.load(Ordering::SeqCst);
    for s in 1..=5 {
        round(now + Duration::from_secs(s)).await;
    }
    assert_eq!(
        receiver.started.load(Ordering::SeqCst),
        before,
        "the receiver is not hit again before the backoff"
    );

    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(dir.path().join("spool/tmp.off"), &tmp).unwrap();
    assert_eq!(
        admin_request(admin, "GET", "/readyz", None).await.status,
        200
    );
    let report = round(now + Duration::from_secs(3600)).await;
    assert_eq!(report.delivered, 1);
    assert_eq!(receiver.next().await.body.unwrap(), "{\"a\":1}");
}

/// (8) A reload that turns spooling on without an open spool is refused with the reason,
/// and every incident kind has a zeroed series in the metrics.
#[tokio::test]
async fn a_reload_that_needs_the_spool_is_refused_and_kinds_are_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Behavior::Ok).await;
    let path = config_file(dir.path(), receiver.addr, "", "");
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let admin = start_admin(&proxy, &path).await;
    let metrics = admin_request(admin, "GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    for kind in ["spool_refused", "duplicate_conflict", "upstream_413"] {
        assert!(
            text.contains(&format!(
                "payload_guard_incidents_total{{route=\"test\",kind=\"{kind}\"}} 0"
            )),
            "{kind}: {text}"
        );
    }
    config_file(dir.path(), receiver.addr, "spool = true", "");
    let reload = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(reload.status, 422);
    assert!(
        reload.json()["message"]
            .as_str()
            .unwrap()
            .contains("restart payload-guard"),
        "{:?}",
        reload.body
    );
    assert!(
        !proxy.proxy.current().config.routes[0].spool,
        "the old config stays"
    );
}

/// The README's promise, as a user runs it: the built binary with the shipped `proxy.toml`
/// (its route says the receiver takes 1 MiB) in front of a real Express whose
/// `express.json()` takes 100kb. A 300 KB payload is refused, trimmed lower and resent within
/// the same request; a 2 MB one is trimmed below what was learned before Express sees it;
/// a small one passes byte-identical. Every call id arrives. Invalid UTF-8 the trim cuts away
/// is delivered, and invalid UTF-8 it would keep is refused. Then eight 2 MB payloads at once
/// (they wait for body slots) all arrive trimmed, and heads of 70 and 600 KiB get 431. Every
/// attempt carries the payload's call id as its `Idempotency-Key`; the log (text to a pipe, no
/// `RUST_LOG`, as a user gets it) has the access line of each delivered payload; SIGTERM
/// drains the connections and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_with_the_shipped_config_delivers_every_payload_to_express() {
    use std::io::{BufRead, BufReader};
    let Some(mut express) = Express::start("100kb").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:3000", &express.addr.to_string());
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, shipped).unwrap();
    let mut child = crate::support::ChildGuard(
        std::process::Command::new(crate::support::binary())
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    // Ready signal: the "listening" line names the bound address.
    let (addr, log) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().expect("proxy exited").unwrap();
            if let Some(pos) = line.find("payload-guard listening listen=") {
                let rest = &line[pos + "payload-guard listening listen=".len()..];
                break rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse::<std::net::SocketAddr>()
                    .unwrap();
            }
        };
        // Keep reading so the proxy never blocks on a full pipe; the lines are checked below.
        let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
        (addr, log)
    })
    .await
    .unwrap();
    let post_to = |body: Vec<u8>| {
        send(
            addr,
            Request::post(format!("http://{addr}/hooks/synthflow"))
                .header("host", "hooks.example")
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap(),
        )
    };
    let express_host = express.addr.to_string();
    for (i, size) in [300_000usize, 2_000_000, 20_000].into_iter().enumerate() {
        let id = format!("1732630000000x2222222222222222{i:02}");
        let body = payload_with_id(size, 40 + i as u64, &id);
        let got = post_to(body.clone()).await;
        assert_eq!(got.status, 200, "payload {i}: {:?}", got.body);
        let delivered = loop {
            let seen = express.next().await;
            // The refused attempt and the delivered one carry the same key.
            assert_eq!(
                seen.idempotency_key.as_deref(),
                Some(id.as_str()),
                "{seen:?}"
            );
            // Every attempt: the receiver's own Host, the sender's as X-Forwarded-Host.
            assert_eq!(
                seen.host.as_deref(),
                Some(express_host.as_str()),
                "{seen:?}"
            );
            assert_eq!(seen.forwarded_host.as_deref(), Some("hooks.example"));
            assert_eq!(seen.forwarded_for.as_deref(), Some("127.0.0.1"));
            if seen.status == 200 {
                break seen;
            }
            assert_eq!(seen.status, 413, "payload {i}");
            assert_eq!(i, 0, "only the first payload meets a 413");
        };
        assert!(
            delivered.bytes.unwrap() <= 102_400,
            "payload {i}: {delivered:?}"
        );
        assert_eq!(delivered.call_id.as_deref(), Some(id.as_str()));
        if size < 100_000 {
            assert_eq!(delivered.sha256.as_deref(), Some(sha256(&body).as_str()));
            assert_eq!(delivered.trimmed, None);
        } else {
            assert!(delivered.trimmed.is_some(), "payload {i} was trimmed");
        }
    }
    // Invalid UTF-8 in the middle of the transcript, which the trim cuts away: delivered,
    // valid. At the head of the transcript, which is kept: refused, nothing reaches Express.
    let bad_at = |body: &mut Vec<u8>, from: usize| {
        let at = (from..body.len())
            .find(|&i| body[i].is_ascii_lowercase() && body[i - 1].is_ascii_lowercase())
            .unwrap();
        body[at] = 0xFF;
    };
    let id = "1732630000000x444444444444444401";
    let mut middle = payload_with_id(2_000_000, 70, id);
    bad_at(&mut middle, 1_000_000);
    let got = post_to(middle).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = express.next().await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.call_id.as_deref(), Some(id));
    assert!(
        seen.trimmed.is_some() && seen.bytes.unwrap() <= 102_400,
        "{seen:?}"
    );
    let mut head = payload_with_id(2_000_000, 71, "1732630000000x444444444444444402");
    let transcript = head
        .windows(15)
        .position(|w| w == b"\"transcript\": \"")
        .unwrap();
    bad_at(&mut head, transcript + 100);
    let got = post_to(head).await;
    assert_eq!(got.status, 413, "{:?}", got.body);
    assert_eq!(got.json()["error"], "trim_failed");
    assert!(
        express.try_next().is_none(),
        "nothing invalid reaches Express"
    );

    // Eight large payloads at once (body slots: read one per worker thread at a time): every
    // one is answered 200 and arrives trimmed, each call id once.
    let sends: Vec<_> = (0..8u64)
        .map(|k| {
            let id = format!("1732630000000x33333333333333330{k}");
            let body = payload_with_id(2_000_000, 60 + k, &id);
            let req = Request::post(format!("http://{addr}/hooks/synthflow"))
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap();
            (id, tokio::spawn(send(addr, req)))
        })
        .collect();
    let mut expected = std::collections::BTreeSet::new();
    for (id, sent) in sends {
        let got = sent.await.unwrap();
        assert_eq!(got.status, 200, "{id}: {:?}", got.body);
        expected.insert(id);
    }
    let mut arrived = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let seen = express.next().await;
        assert_eq!(seen.status, 200, "{seen:?}");
        assert!(
            seen.trimmed.is_some() && seen.bytes.unwrap() <= 102_400,
            "{seen:?}"
        );
        assert!(
            arrived.insert(seen.call_id.clone().unwrap()),
            "twice: {seen:?}"
        );
    }
    assert_eq!(arrived, expected);

    // max_header_bytes (64 KiB by default) holds although bodies are read in larger blocks;
    // a head larger than one read (384 KiB) is refused as well.
    for kib in [70, 600] {
        let big_head = format!(
            "POST /hooks/synthflow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(kib * 1024)
        );
        let answer = crate::support::raw_exchange(addr, big_head.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "{kib} KiB head: {answer}"
        );
        assert!(
            express.try_next().is_none(),
            "nothing past the head limit reaches Express ({kib} KiB head)"
        );
    }

    // SIGTERM: the connections drain and the process exits 0, its log complete.
    let status = crate::support::sigterm_and_wait(child).await;
    let log = log.join().unwrap();
    assert_eq!(status.code(), Some(0), "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("all connections closed")),
        "{log:#?}"
    );
    // The access line of the small payload, delivered untouched (written by the proxy itself
    // here: text to a pipe), and one for each of the eight delivered at once.
    let access = |l: &&String| {
        l.contains(" INFO access: request route=\"synthflow\" method=POST path=/hooks/synthflow peer=127.0.0.1 status=200 ")
    };
    let small = payload_with_id(20_000, 42, "1732630000000x222222222222222202").len();
    assert!(
        log.iter()
            .filter(access)
            .any(|l| l.contains(&format!(" bytes_in={small} "))
                && l.contains(" upstream_status=200 ")
                && l.ends_with(" outcome=\"complete\"")),
        "{log:#?}"
    );
    assert!(log.iter().filter(access).count() >= 12, "{log:#?}");
}
