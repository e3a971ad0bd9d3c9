//! Scale-out with the PostgreSQL spool, as a user runs it: several replicas of the built
//! binary share one database. A replica killed while redelivering loses only its leases (the
//! others deliver its records); a database restart under load acknowledges nothing that was
//! not committed, loses nothing, and delivery resumes by itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::pg;
use crate::support::*;

const ROUTES: [&str; 3] = ["a", "b", "c"];

/// A replica: the built binary with the database URL in its environment.
struct Replica {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    /// Starts the binary with `config` and waits for its "listening" lines.
    fn start(config: &Path, url: &str) -> Replica {
        Replica::start_with(Command::new(crate::support::binary()), config, url)
    }

    /// Like [`Replica::start`], from a prepared command (extra environment).
    fn start_with(mut command: Command, config: &Path, url: &str) -> Replica {
        let mut child = command
            .arg("--config")
            .arg(config)
            .env("PAYLOAD_GUARD_DATABASE_URL", url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = lines.next().expect("replica exited").unwrap();
            let listen = line.find("listen=").map(|pos| {
                let rest = &line[pos + 7..];
                rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse::<SocketAddr>()
                    .unwrap()
            });
            if line.contains("admin listening") {
                admin = listen;
            } else if line.contains("payload-guard listening") {
                addr = listen;
            }
            log.lock().unwrap().push(line);
        }
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Replica {
            child,
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, name: &str, receiver: SocketAddr, plain: Option<SocketAddr>) -> PathBuf {
    let mut routes = String::new();
    for route in ROUTES {
        routes.push_str(&format!(
            r#"
[[routes]]
name = "{route}"
path_prefix = "/hooks/{route}"
upstream = "http://{receiver}/webhook/{route}"
spool = true
response_timeout = "1s"
"#
        ));
    }
    if let Some(plain) = plain {
        routes.push_str(&format!(
            r#"
[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "http://{plain}/webhook"
"#
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[incidents]
path = "{name}-incidents.jsonl"
[spool]
backend = "postgres"
dir = "{name}-spool"
retry_initial = "100ms"
retry_max = "200ms"
redeliver_interval = "50ms"
lease_for = "2s"
{routes}"#
        ),
    )
    .unwrap();
    path
}

/// What the receiver saw: `(route, origin replica, seq)` in arrival order.
type Seen = Arc<Mutex<Vec<(String, usize, usize)>>>;

/// A receiver that takes each payload on receipt and answers 200, 150 ms later while `slow`
/// is set (so a replica can be killed while it holds a lease), at once otherwise.
async fn receiver(addr: SocketAddr, slow: Arc<AtomicBool>) -> (Seen, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (log, slow) = (log.clone(), slow.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (log, slow) = (log.clone(), slow.clone());
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let Ok(body) = body
                            && let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body)
                        {
                            let route = doc["route"].as_str().unwrap_or("").to_owned();
                            let replica = doc["replica"].as_u64().unwrap_or(99) as usize;
                            let seq = doc["seq"].as_u64().unwrap_or(0) as usize;
                            // Taken on receipt, as a receiver that acts before it answers.
                            log.lock().unwrap().push((route, replica, seq));
                            if slow.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(150)).await;
                            }
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (seen, task)
}

fn payload(route: &str, replica: usize, seq: usize) -> Vec<u8> {
    serde_json::json!({
        "route": route,
        "replica": replica,
        "seq": seq,
        "filler": "x".repeat(1500),
    })
    .to_string()
    .into_bytes()
}

async fn post(addr: SocketAddr, route: &str, body: Vec<u8>) -> Got {
    send(
        addr,
        Request::post(format!("http://{addr}/hooks/{route}/event"))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap(),
    )
    .await
}

async fn wait_for<F: FnMut() -> bool>(what: &str, limit: Duration, mut done: F) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_spool_and_survive_a_sigkill() {
    let Some(server) = pg::shared() else {
        return;
    };
    let url = server.database("replicas");
    let dir = tempfile::tempdir().unwrap();
    let receiver_addr = free_addr();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let path = config(dir.path(), &format!("r{i}"), receiver_addr, None);
        let url = url.clone();
        replicas.push(
            tokio::task::spawn_blocking(move || Replica::start(&path, &url))
                .await
                .unwrap(),
        );
    }

    // The receiver is down: 300 payloads across replicas and routes, all acknowledged.
    let mut posts = tokio::task::JoinSet::new();
    for (r, replica) in replicas.iter().enumerate() {
        let addr = replica.addr;
        posts.spawn(async move {
            for seq in 0..100 {
                let route = ROUTES[seq % ROUTES.len()];
                let got = post(addr, route, payload(route, r, seq)).await;
                assert_eq!(got.status, 202, "replica {r} seq {seq}: {:?}", got.body);
            }
        });
    }
    while let Some(done) = posts.join_next().await {
        done.unwrap();
    }
    let db = pg::client(&url).await;
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM payload_guard_spool WHERE state = 'ready'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored, 300,
        "every acknowledged payload has a committed row"
    );

    // The receiver comes back, slow: kill replica 0 while it holds a lease.
    let slow = Arc::new(AtomicBool::new(true));
    let (seen, _receiver) = receiver(receiver_addr, slow.clone()).await;
    let victim = format!("{}/{}", host(), replicas[0].pid());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held: i64 = db
            .query_one(
                "SELECT count(*) FROM payload_guard_spool WHERE claimed_by = $1 AND lease_until > now()",
                &[&victim],
            )
            .await
            .unwrap()
            .get(0);
        if held > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica 0 never took a lease"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replicas[0].child.kill().unwrap(); // SIGKILL
    replicas[0].child.wait().unwrap();
    // What the killed replica held when it died (its leases can only expire now).
    let leased: HashSet<(usize, usize)> = db
        .query(
            "SELECT c.data FROM payload_guard_spool s
             JOIN payload_guard_spool_chunks c ON c.record_id = s.id
             WHERE s.claimed_by = $1",
            &[&victim],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let doc: serde_json::Value = serde_json::from_slice(row.get::<_, &[u8]>(0)).unwrap();
            (
                doc["replica"].as_u64().unwrap() as usize,
                doc["seq"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    slow.store(false, Ordering::SeqCst);

    wait_for(
        "all 300 payloads delivered",
        Duration::from_secs(90),
        || {
            let seen = seen.lock().unwrap();
            seen.iter()
                .map(|(_, r, s)| (*r, *s))
                .collect::<HashSet<_>>()
                .len()
                == 300
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = db
            .query_one("SELECT count(*) FROM payload_guard_spool", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} rows left after delivery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let seen = seen.lock().unwrap().clone();
    let mut times: HashMap<(usize, usize), usize> = HashMap::new();
    for (_, r, s) in &seen {
        *times.entry((*r, *s)).or_default() += 1;
    }
    let duplicates: Vec<(usize, usize)> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| *k)
        .collect();
    eprintln!(
        "replicas: 300 delivered, {} duplicate(s) {duplicates:?}, the killed replica held {} lease(s)",
        duplicates.len(),
        leased.len()
    );
    for dup in &duplicates {
        assert!(
            leased.contains(dup),
            "{dup:?} was delivered twice but the killed replica did not hold it"
        );
    }
    // Arrival order per route for each replica's own records (first deliveries).
    let mut firsts: BTreeMap<(String, usize), Vec<usize>> = BTreeMap::new();
    let mut counted = HashSet::new();
    for (route, r, s) in &seen {
        if counted.insert((*r, *s)) {
            firsts.entry((route.clone(), *r)).or_default().push(*s);
        }
    }
    for ((route, r), seqs) in &firsts {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "route {route}, replica {r}: delivered out of order: {seqs:?}"
        );
    }
    for replica in &replicas {
        assert!(!replica.log_text().contains(pg::SECRET_PASSWORD));
    }
}

/// Payloads the replica logged as spooled so far.
fn spooled(replica: &Replica) -> usize {
    replica
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("payload spooled for redelivery"))
        .count()
}

/// Waits until the replica logged `n` spooled payloads.
async fn wait_for_posts(replica: &Replica, n: usize) {
    wait_for("payloads spooled", Duration::from_secs(30), || {
        spooled(replica) >= n
    })
    .await;
}

async fn readyz(admin: SocketAddr) -> u16 {
    let got = send(
        admin,
        Request::get(format!("http://{admin}/readyz"))
            .body(full(Vec::new()))
            .unwrap(),
    )
    .await;
    got.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_under_load_acknowledges_only_committed_rows() {
    let Some(server) = pg::PgServer::start() else {
        return;
    };
    let url = server.database("restart");
    let dir = tempfile::tempdir().unwrap();
    let receiver_addr = free_addr();
    let plain = Receiver::start(Behavior::Ok).await;
    let path = config(dir.path(), "r0", receiver_addr, Some(plain.addr));
    let replica = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Replica::start(&path, &url))
            .await
            .unwrap()
    };
    assert_eq!(readyz(replica.admin).await, 200);

    // Load: posts one after another while the database stops and starts again.
    let addr = replica.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let running = stop.clone();
    let load = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        let mut seq = 0;
        while !running.load(Ordering::SeqCst) {
            let got = post(addr, "a", payload("a", 0, seq)).await;
            outcomes.push((seq, got));
            seq += 1;
        }
        outcomes
    });
    // Stop the database once some payloads went through before it.
    wait_for_posts(&replica, 10).await;
    tokio::task::block_in_place(|| server.pg_ctl_stop());
    // While it is down: readiness says so, spool routes refuse, other routes work.
    assert_eq!(readyz(replica.admin).await, 503);
    let refused = post(addr, "b", payload("b", 0, 10_000)).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    let through = send(
        addr,
        Request::post(format!("http://{addr}/plain/x"))
            .body(full(b"{}".to_vec()))
            .unwrap(),
    )
    .await;
    assert_eq!(through.status, 200);
    tokio::task::block_in_place(|| server.pg_ctl_start());
    // Writes resume by themselves once the database is back.
    let before = spooled(&replica);
    wait_for_posts(&replica, before + 10).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = load.await.unwrap();

    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for (seq, got) in &outcomes {
        match got.status.as_u16() {
            202 => {
                let id = got.headers["payload-guard-spool-id"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                acknowledged.push((*seq, id));
            }
            503 => {
                assert!(got.headers.contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("seq {seq}: unexpected {other}: {:?}", got.body),
        }
    }
    // No 2xx without a committed row.
    let db = pg::client(&url).await;
    let rows: HashSet<String> = db
        .query("SELECT id FROM payload_guard_spool", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (seq, id) in &acknowledged {
        assert!(rows.contains(id), "seq {seq} got 202 ({id}) but has no row");
    }
    eprintln!(
        "database restart: {} acknowledged, {refused} refused with 503",
        acknowledged.len()
    );

    // Nothing lost, and delivery resumes by itself once the receiver is up.
    let (seen, _receiver) = receiver(receiver_addr, Arc::new(AtomicBool::new(false))).await;
    let want: HashSet<usize> = acknowledged.iter().map(|(seq, _)| *seq).collect();
    wait_for(
        "every acknowledged payload delivered",
        Duration::from_secs(60),
        || {
            let seen = seen.lock().unwrap();
            let got: HashSet<usize> = seen.iter().map(|(_, _, s)| *s).collect();
            want.is_subset(&got)
        },
    )
    .await;
    assert_eq!(readyz(replica.admin).await, 200);
    assert!(!replica.log_text().contains(pg::SECRET_PASSWORD));
}

/// Runs the CLI with the database URL in its environment.
fn cli(url: &str, args: &[&str], config: &Path) -> std::process::Output {
    Command::new(crate::support::binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .env("PAYLOAD_GUARD_DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_and_the_spool_commands_see_every_replica() {
    let Some(server) = pg::shared() else {
        return;
    };
    let url = server.database("incidents");
    let dir = tempfile::tempdir().unwrap();
    let plain = Receiver::start(Behavior::Ok).await;
    let down = free_addr();
    let mut replicas = Vec::new();
    for i in 0..2 {
        let path = dir.path().join(format!("r{i}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[incidents]
path = "r{i}-incidents.jsonl"
backend = "postgres"
[spool]
backend = "postgres"
dir = "r{i}-spool"
redeliver_interval = "1h"
[[routes]]
name = "small"
path_prefix = "/small"
upstream = "http://{}/webhook"
max_body = "1KiB"
[[routes]]
name = "a"
path_prefix = "/hooks/a"
upstream = "http://{down}/webhook"
spool = true
"#,
                plain.addr
            ),
        )
        .unwrap();
        let url = url.clone();
        replicas.push((
            path.clone(),
            tokio::task::spawn_blocking(move || Replica::start(&path, &url))
                .await
                .unwrap(),
        ));
    }
    // One size incident on each replica, and a spooled payload on the second.
    for (_, replica) in &replicas {
        let addr = replica.addr;
        let got = send(
            addr,
            Request::post(format!("http://{addr}/small/x"))
                .header("content-type", "application/json")
                .body(full(payload("small", 0, 1)))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 413);
    }
    let spooled = post(replicas[1].1.addr, "a", payload("a", 1, 7)).await;
    assert_eq!(spooled.status, 202);
    let id = spooled.headers["payload-guard-spool-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let db = pg::client(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows: i64 = db
            .query_one(
                "SELECT count(DISTINCT replica) FROM payload_guard_incidents",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if rows == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "incidents of both replicas in the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Any replica's config reads everyone's incidents.
    let config = replicas[0].0.clone();
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.clone());
        move || cli(&url, &["diagnose", "--format", "json"], &config)
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["incidents"], 2, "{report}");
    assert_eq!(report["routes"][0]["route"], "small", "{report}");

    // The spool commands on the first replica's config see the second replica's record.
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.clone());
        move || cli(&url, &["spool", "list"], &config)
    })
    .await
    .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{listing}");
    assert!(listing.contains(&id), "{listing}");
    let out = tokio::task::spawn_blocking({
        let (url, config, id) = (url.clone(), config.clone(), id.clone());
        move || cli(&url, &["spool", "show", &id, "--body"], &config)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, payload("a", 1, 7));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains(pg::SECRET_PASSWORD), "{text}");

    // An archived original stored by any replica is served by every replica's claim-check URL.
    let archived = {
        let db = payload_guard::db::Database::from_url("test", &url, 1).unwrap();
        let store = payload_guard::spool::pg::PgStore::new(
            db,
            payload_guard::spool::pg::PgSpoolConfig {
                max_bytes: 1 << 30,
                lease_for: Duration::from_secs(60),
                staging_dir: dir.path().join("staging"),
            },
        )
        .unwrap();
        let mut meta = payload_guard::spool::Meta::new(
            "a",
            std::time::SystemTime::now(),
            "req-archived",
            "POST",
            "/hooks/a",
            12,
        );
        meta.headers = vec![("content-type".into(), "application/json".into())];
        meta.trimmed = true;
        payload_guard::spool::SpoolStore::commit(
            &store,
            payload_guard::spool::State::Archive,
            &meta,
            Bytes::from_static(b"{\"big\":true}"),
        )
        .await
        .unwrap()
    };
    for (_, replica) in &replicas {
        let admin = replica.admin;
        let got = send(
            admin,
            Request::get(format!("http://{admin}/originals/{archived}"))
                .body(full(Vec::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, &b"{\"big\":true}"[..]);
        assert_eq!(got.headers["content-type"], "application/json");
    }

    // `replay` from the first replica's config delivers the second replica's record, and
    // `spool purge` tidies the table.
    let mut elsewhere = Receiver::start(Behavior::Ok).await;
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.clone());
        let to = format!("http://{}/elsewhere", elsewhere.addr);
        move || cli(&url, &["replay", "--to", &to], &config)
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("replayed 1: 1 delivered, 0 failed"), "{text}");
    assert_eq!(elsewhere.next().await.body.unwrap(), payload("a", 1, 7));
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.clone());
        move || {
            cli(
                &url,
                &["spool", "purge", "--state", "archive", "--older-than", "0s"],
                &config,
            )
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("removed 1 archive record"), "{text}");
    let left: i64 = db
        .query_one("SELECT count(*) FROM payload_guard_spool", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "replayed and purged");

    // Without the URL in the environment the CLI names the variable to set.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(crate::support::binary())
            .args(["spool", "list", "--config"])
            .arg(&config)
            .env_remove("PAYLOAD_GUARD_DATABASE_URL")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{text}");
    assert!(
        text.contains("PAYLOAD_GUARD_DATABASE_URL is not set"),
        "{text}"
    );
}

/// A private CA and a server certificate for `localhost` signed by it, as PEM.
fn private_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "payload-guard test database CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_is_tls_verified_against_the_system_roots() {
    let (ca, cert, key) = private_ca();
    let Some(server) = pg::PgServer::start_tls(&cert, &key) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let plain = server.database("tls");
    let db = plain.rsplit('/').next().unwrap().split('?').next().unwrap();
    let url = format!(
        "postgres://postgres:{}@localhost:{}/{db}?sslmode=require",
        pg::SECRET_PASSWORD,
        server.port
    );
    let path = config(dir.path(), "r0", free_addr(), None);
    // Trusted (the CA in SSL_CERT_FILE, as an operator adds a private CA to the system roots):
    // the spool commits over TLS.
    let replica = {
        let (path, url, ca_file) = (path.clone(), url.clone(), ca_file.clone());
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(crate::support::binary());
            child.env("SSL_CERT_FILE", &ca_file);
            Replica::start_with(child, &path, &url)
        })
        .await
        .unwrap()
    };
    let got = post(replica.addr, "a", payload("a", 0, 1)).await;
    assert_eq!(got.status, 202, "{:?}\n{}", got.body, replica.log_text());
    let client = pg::client(&plain).await;
    let tls: bool = client
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'payload-guard'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tls, "every payload-guard connection uses TLS");
    drop(replica);

    // Not trusted: no connection, so nothing is acknowledged.
    let untrusted = {
        let (path, url) = (path.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(crate::support::binary());
            child.env("SSL_CERT_FILE", "/nonexistent/ca.pem");
            Replica::start_with(child, &path, &url)
        })
        .await
        .unwrap()
    };
    let refused = post(untrusted.addr, "a", payload("a", 0, 2)).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(readyz(untrusted.admin).await, 503);
    assert!(!untrusted.log_text().contains(pg::SECRET_PASSWORD));
}
