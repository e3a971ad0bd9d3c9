//! One spool test suite, run against both backends: the disk spool in a temporary directory
//! and PostgreSQL (a database per test on the shared test server). Each case takes a
//! [`Backend`] that makes stores; `both!` generates `disk::<case>` and `postgres::<case>`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use payload_guard::db::Database;
use payload_guard::spool::pg::{CHUNK_BYTES, PgSpoolConfig, PgStore};
use payload_guard::spool::{
    DiskStore, Meta, RecordId, Spool, SpoolConfig, SpoolError, SpoolStore, State, Store,
};

use crate::pg;

const T0: u64 = 1_718_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn meta(route: &str, received_secs: u64) -> Meta {
    let mut meta = Meta::new(route, at(received_secs), "req-1", "POST", "/hook?a=1", 0);
    meta.headers = vec![
        ("content-type".into(), "application/json".into()),
        ("x-signature".into(), "sha256=abc".into()),
    ];
    meta
}

/// Makes stores of one backend; stores made by one `Backend` share their records.
pub enum Backend {
    Disk(tempfile::TempDir),
    Postgres {
        url: String,
        staging: tempfile::TempDir,
    },
}

impl Backend {
    fn disk() -> Backend {
        Backend::Disk(tempfile::tempdir().unwrap())
    }

    fn postgres(test: &str) -> Option<Backend> {
        let server = pg::shared()?;
        Some(Backend::Postgres {
            url: server.database(test),
            staging: tempfile::tempdir().unwrap(),
        })
    }

    /// A store holding at most `max_bytes` (the owner, for the disk spool).
    fn store(&self, max_bytes: u64) -> Store {
        self.store_with_lease(max_bytes, Duration::from_secs(60))
    }

    fn store_with_lease(&self, max_bytes: u64, lease_for: Duration) -> Store {
        match self {
            Backend::Disk(dir) => {
                let cfg = SpoolConfig {
                    dir: dir.path().join("spool"),
                    max_bytes,
                    min_free: 0,
                };
                let spool = match Spool::open(cfg.clone()) {
                    Ok((spool, _)) => spool,
                    // A second handle on the same directory attaches beside the owner.
                    Err(SpoolError::Locked { .. }) => Spool::attach(cfg).unwrap(),
                    Err(e) => panic!("{e}"),
                };
                Arc::new(DiskStore::new(spool))
            }
            Backend::Postgres { url, staging } => {
                let db = Database::from_url("test", url, 8).unwrap();
                Arc::new(
                    PgStore::new(
                        db,
                        PgSpoolConfig {
                            max_bytes,
                            lease_for,
                            staging_dir: staging.path().join("staging"),
                        },
                    )
                    .unwrap(),
                )
            }
        }
    }
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod disk {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Backend::disk()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = super::Backend::postgres(stringify!($case)) else {
                        return;
                    };
                    super::$case(backend).await;
                }
            )*
        }
    };
}

both!(
    commit_reads_back_and_is_found,
    a_claim_is_exclusive_and_a_dropped_claim_goes_back,
    concurrent_claimers_each_get_distinct_records,
    release_records_the_attempt_and_keeps_the_body,
    bury_moves_to_dead_with_status_and_snippet,
    over_max_bytes_is_refused_and_leaves_nothing,
    staged_bodies_commit_identically_or_vanish,
    purge_removes_only_old_records,
    list_is_in_arrival_order_per_route,
    claim_next_keeps_each_routes_arrival_order,
    dead_records_revive_and_archives_read_back,
);

/// Waits (bounded) until `check` passes: for a dropped PostgreSQL claim, which is given back
/// by a task.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn commit_reads_back_and_is_found(backend: Backend) {
    let store = backend.store(1 << 30);
    let body = br#"{"event":"push"}"#;
    let mut m = meta("github", T0);
    m.original_len = body.len() as u64;
    m.call_id = Some("call-7".into());
    let id = store
        .commit(State::Ready, &m, Bytes::from_static(body))
        .await
        .unwrap();
    assert!(id.as_str().starts_with(&format!("{T0}000-")), "{id}");
    let (back, back_body) = store.read(State::Ready, &id).await.unwrap();
    assert_eq!(back, m);
    assert_eq!(back_body, body);
    assert_eq!(store.depth(State::Ready), 1);
    assert!(store.usage() >= body.len() as u64);

    let found = store.find(&id).await.unwrap().unwrap();
    assert_eq!(
        (found.state, found.claimed, found.body_len),
        (State::Ready, false, body.len() as u64)
    );
    assert!(matches!(
        store.read(State::Dead, &id).await,
        Err(SpoolError::NotFound(_))
    ));
    let mut out = Vec::new();
    let (_, n) = store.copy_body(State::Ready, &id, &mut out).await.unwrap();
    assert_eq!((n, out.as_slice()), (body.len() as u64, &body[..]));
    let missing = RecordId::generate(at(T0));
    assert!(store.find(&missing).await.unwrap().is_none());
    store.can_accept().await.unwrap();
}

async fn a_claim_is_exclusive_and_a_dropped_claim_goes_back(backend: Backend) {
    let store = backend.store(1 << 30);
    let id = store
        .commit(State::Ready, &meta("r", T0), Bytes::from_static(b"x"))
        .await
        .unwrap();
    let first = store.claim(&id).await.unwrap().unwrap();
    assert_eq!(first.id(), &id);
    assert!(store.claim(&id).await.unwrap().is_none());
    // Another handle (another process, another replica) cannot take it either.
    let other = backend.store(1 << 30);
    assert!(other.claim(&id).await.unwrap().is_none());
    assert!(store.list(State::Ready, None).await.unwrap().is_empty());
    assert!(store.find(&id).await.unwrap().unwrap().claimed);
    drop(first);
    eventually("the dropped claim is back", || async {
        match store.claim(&id).await.unwrap() {
            Some(claim) => {
                drop(claim);
                true
            }
            None => false,
        }
    })
    .await;
}

async fn concurrent_claimers_each_get_distinct_records(backend: Backend) {
    let store = backend.store(1 << 30);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            store
                .commit(State::Ready, &meta("r", T0 + i), Bytes::from_static(b"b"))
                .await
                .unwrap(),
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = backend.store(1 << 30);
        let ids = ids.clone();
        tasks.spawn(async move {
            let mut won = Vec::new();
            for id in &ids {
                if let Some(claim) = store.claim(id).await.unwrap() {
                    won.push(claim.id().clone());
                    claim.complete().await.unwrap();
                }
            }
            won
        });
    }
    let mut won: Vec<RecordId> = Vec::new();
    while let Some(result) = tasks.join_next().await {
        won.extend(result.unwrap());
    }
    let unique: HashSet<&RecordId> = won.iter().collect();
    assert_eq!(won.len(), ids.len(), "every record claimed exactly once");
    assert_eq!(unique.len(), ids.len());
    assert!(store.list(State::Ready, None).await.unwrap().is_empty());
    let fresh = backend.store(1 << 30);
    fresh.refresh().await;
    assert_eq!(fresh.usage(), 0);
}

async fn release_records_the_attempt_and_keeps_the_body(backend: Backend) {
    let store = backend.store(1 << 30);
    // Over two chunks in the database.
    let body: Vec<u8> = (0..(2 * CHUNK_BYTES + 12_345) as u32)
        .map(|i| (i % 251) as u8)
        .collect();
    let id = store
        .commit(State::Ready, &meta("r", T0), Bytes::from(body.clone()))
        .await
        .unwrap();
    let next = at(T0 + 60);
    for attempt in 1..=3u32 {
        let mut claim = store.claim(&id).await.unwrap().unwrap();
        assert_eq!(claim.meta().attempts, attempt - 1);
        assert_eq!(claim.body_len(), body.len() as u64);
        assert_eq!(claim.body().await.unwrap(), body);
        claim
            .release(&format!("upstream 503 #{attempt}"), next)
            .await
            .unwrap();
    }
    let (m, back) = store.read(State::Ready, &id).await.unwrap();
    assert_eq!(m.attempts, 3);
    assert_eq!(m.last_error.as_deref(), Some("upstream 503 #3"));
    assert_eq!(m.next_attempt_at, Some(next));
    assert_eq!(back, body);
    assert_eq!(store.list(State::Ready, None).await.unwrap()[0].id, id);
}

async fn bury_moves_to_dead_with_status_and_snippet(backend: Backend) {
    let store = backend.store(1 << 30);
    let id = store
        .commit(State::Ready, &meta("r", T0), Bytes::from_static(b"payload"))
        .await
        .unwrap();
    let claim = store.claim(&id).await.unwrap().unwrap();
    let long_snippet = "é".repeat(2000);
    claim
        .bury(Some(422), &long_snippet, "receiver refused it: 422")
        .await
        .unwrap();
    assert!(store.list(State::Ready, None).await.unwrap().is_empty());
    let dead = store.list(State::Dead, None).await.unwrap();
    assert_eq!(dead.len(), 1);
    let m = &dead[0].meta;
    assert_eq!((m.status, m.attempts), (Some(422), 1));
    assert!(m.snippet.as_ref().unwrap().len() <= payload_guard::spool::SNIPPET_MAX_BYTES);
    assert_eq!(m.next_attempt_at, None);
    let (_, body) = store.read(State::Dead, &id).await.unwrap();
    assert_eq!(body, b"payload");
    assert_eq!(store.depth(State::Dead), 1);
}

async fn over_max_bytes_is_refused_and_leaves_nothing(backend: Backend) {
    let store = backend.store(1000);
    let err = store
        .commit(State::Ready, &meta("r", T0), Bytes::from(vec![b'x'; 2000]))
        .await
        .unwrap_err();
    assert!(err.is_refusal(), "{err}");
    assert!(matches!(err, SpoolError::Full { max: 1000, .. }), "{err}");
    assert!(store.list(State::Ready, None).await.unwrap().is_empty());
    assert_eq!(store.usage(), 0);
    // Room for a small one; then the next one that does not fit is refused.
    store
        .commit(State::Ready, &meta("r", T0), Bytes::from(vec![b'x'; 300]))
        .await
        .unwrap();
    let err = store
        .commit(State::Ready, &meta("r", T0), Bytes::from(vec![b'x'; 600]))
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(store.list(State::Ready, None).await.unwrap().len(), 1);
    // The cap counts what every handle (every replica) stored.
    let other = backend.store(1000);
    let err = other
        .commit(State::Ready, &meta("r", T0), Bytes::from(vec![b'x'; 600]))
        .await
        .unwrap_err();
    assert!(err.is_refusal(), "{err}");
}

async fn staged_bodies_commit_identically_or_vanish(backend: Backend) {
    let store = backend.store(1 << 30);
    let chunk: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut staging = store.stage(at(T0)).await.unwrap();
    for _ in 0..5 {
        staging.write_all(&chunk).unwrap();
    }
    let (path, offset, len) = staging.body_file().unwrap();
    assert_eq!(len, 5 * chunk.len() as u64);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[offset as usize..][..chunk.len()], &chunk[..]);
    let id = staging.commit(State::Ready, &meta("r", T0)).await.unwrap();
    let (_, body) = store.read(State::Ready, &id).await.unwrap();
    assert_eq!(body.len(), 5 * chunk.len());
    assert!(body.chunks(chunk.len()).all(|c| c == &chunk[..]));

    let mut dropped = store.stage(at(T0 + 1)).await.unwrap();
    dropped.write_all(&chunk).unwrap();
    let (dropped_path, _, _) = dropped.body_file().unwrap();
    drop(dropped);
    assert!(!dropped_path.exists(), "a dropped staging file is removed");
    assert_eq!(store.list(State::Ready, None).await.unwrap().len(), 1);

    // A spool without room refuses as soon as it knows: when staging starts, or while the
    // body streams in.
    let small = backend.store(100_000);
    let refused = match small.stage(at(T0 + 2)).await {
        Err(e) => Some(e),
        Ok(mut too_big) => (0..10).find_map(|_| too_big.write_all(&chunk).err()),
    };
    assert!(refused.is_some_and(|e| e.is_refusal()));
}

async fn purge_removes_only_old_records(backend: Backend) {
    let store = backend.store(1 << 30);
    let now = SystemTime::now();
    let old = meta("r", T0);
    let mut fresh = meta("r", T0);
    fresh.received_at = now;
    for state in [State::Ready, State::Dead, State::Archive] {
        store
            .commit(state, &old, Bytes::from_static(b"old"))
            .await
            .unwrap();
        store
            .commit(state, &fresh, Bytes::from_static(b"new"))
            .await
            .unwrap();
    }
    let held_id = store
        .commit(State::Ready, &old, Bytes::from_static(b"held"))
        .await
        .unwrap();
    let held = store.claim(&held_id).await.unwrap().unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(store.purge(State::Dead, day).await.unwrap(), 1);
    assert_eq!(store.purge(State::Archive, day).await.unwrap(), 1);
    // The claimed one is being delivered: not purged.
    assert_eq!(store.purge(State::Ready, day).await.unwrap(), 1);
    for state in [State::Ready, State::Dead, State::Archive] {
        let left = store.list(state, None).await.unwrap();
        assert_eq!(left.len(), 1, "{state}");
        assert_eq!(store.read(state, &left[0].id).await.unwrap().1, b"new");
    }
    held.complete().await.unwrap();
}

async fn list_is_in_arrival_order_per_route(backend: Backend) {
    let store = backend.store(1 << 30);
    let mut expected_a = Vec::new();
    for (route, secs) in [("a", 5), ("b", 1), ("a", 2), ("a", 9), ("b", 3)] {
        let id = store
            .commit(
                State::Ready,
                &meta(route, T0 + secs),
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        if route == "a" {
            expected_a.push((secs, id));
        }
    }
    expected_a.sort();
    let listed: Vec<RecordId> = store
        .list(State::Ready, Some("a"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        listed,
        expected_a.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
    );
    let all = store.list(State::Ready, None).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2)
            .all(|w| w[0].meta.received_at <= w[1].meta.received_at)
    );
    assert_eq!(store.ready_routes().await.unwrap(), vec!["a", "b"]);
}

async fn claim_next_keeps_each_routes_arrival_order(backend: Backend) {
    let store = backend.store(1 << 30);
    let a1 = store
        .commit(State::Ready, &meta("a", T0 + 1), Bytes::from_static(b"a1"))
        .await
        .unwrap();
    let a2 = store
        .commit(State::Ready, &meta("a", T0 + 2), Bytes::from_static(b"a2"))
        .await
        .unwrap();
    let b1 = store
        .commit(State::Ready, &meta("b", T0 + 3), Bytes::from_static(b"b1"))
        .await
        .unwrap();
    let now = at(T0 + 100);
    let first = store.claim_next("a", now).await.unwrap().unwrap();
    assert_eq!(first.id(), &a1);
    // While a1 is held, a2 waits; route b is independent.
    assert!(store.claim_next("a", now).await.unwrap().is_none());
    let other = backend.store(1 << 30);
    assert!(other.claim_next("a", now).await.unwrap().is_none());
    let b = store.claim_next("b", now).await.unwrap().unwrap();
    assert_eq!(b.id(), &b1);
    b.complete().await.unwrap();
    // a1 failed: not due until +60s, and a2 still waits behind it.
    first
        .release("receiver answered 503", at(T0 + 160))
        .await
        .unwrap();
    assert!(store.claim_next("a", now).await.unwrap().is_none());
    let again = store.claim_next("a", at(T0 + 161)).await.unwrap().unwrap();
    assert_eq!(again.id(), &a1);
    assert_eq!(again.meta().attempts, 1);
    again.complete().await.unwrap();
    let next = store.claim_next("a", now).await.unwrap().unwrap();
    assert_eq!(next.id(), &a2);
    next.bury(Some(400), "bad", "receiver refused it: 400")
        .await
        .unwrap();
    assert!(store.claim_next("a", now).await.unwrap().is_none());
    assert!(store.ready_routes().await.unwrap().is_empty());
}

async fn dead_records_revive_and_archives_read_back(backend: Backend) {
    let store = backend.store(1 << 30);
    let dead = store
        .commit(State::Dead, &meta("r", T0), Bytes::from_static(b"dead"))
        .await
        .unwrap();
    assert!(store.revive(&dead).await.unwrap());
    assert!(!store.revive(&dead).await.unwrap(), "already revived");
    assert_eq!(
        store.find(&dead).await.unwrap().unwrap().state,
        State::Ready
    );
    let mut original = meta("r", T0);
    original.trimmed = true;
    let archived = store
        .commit(
            State::Archive,
            &original,
            Bytes::from_static(b"{\"big\":true}"),
        )
        .await
        .unwrap();
    let (m, body) = store.read(State::Archive, &archived).await.unwrap();
    assert!(m.trimmed);
    assert_eq!(body, b"{\"big\":true}");
    assert!(
        store.claim(&archived).await.unwrap().is_none(),
        "archives are not delivered"
    );
}

// PostgreSQL only: leases, chunks, migrations, an unreachable database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_dead_replicas_lease_expires_and_another_takes_over() {
    let Some(backend) = Backend::postgres("lease") else {
        return;
    };
    let short = Duration::from_millis(300);
    let replica_a = backend.store_with_lease(1 << 30, short);
    let replica_b = backend.store_with_lease(1 << 30, short);
    let id = replica_a
        .commit(State::Ready, &meta("r", T0), Bytes::from_static(b"x"))
        .await
        .unwrap();
    let now = SystemTime::now();
    let held = replica_a.claim_next("r", now).await.unwrap().unwrap();
    assert!(replica_b.claim_next("r", now).await.unwrap().is_none());
    // Replica A stalls past its lease (as a killed replica would); B takes over.
    let taken = loop {
        if let Some(claim) = replica_b.claim_next("r", SystemTime::now()).await.unwrap() {
            break claim;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(taken.id(), &id);
    // A's late outcome must not touch B's claim.
    let err = held.complete().await.unwrap_err();
    assert!(err.to_string().contains("lease"), "{err}");
    taken.complete().await.unwrap();
    assert!(replica_a.find(&id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bodies_are_chunks_of_at_most_one_mib() {
    let Some(backend) = Backend::postgres("chunks") else {
        return;
    };
    let Backend::Postgres { url, .. } = &backend else {
        unreachable!()
    };
    let store = backend.store(1 << 30);
    let body = vec![7u8; 3 * CHUNK_BYTES + 5];
    let id = store
        .commit(State::Ready, &meta("r", T0), Bytes::from(body.clone()))
        .await
        .unwrap();
    let client = pg::client(url).await;
    let row = client
        .query_one(
            "SELECT count(*), max(octet_length(data)), sum(octet_length(data))::bigint
             FROM payload_guard_spool_chunks WHERE record_id = $1",
            &[&id.as_str()],
        )
        .await
        .unwrap();
    let (count, max, sum): (i64, i32, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(count, 4);
    assert!(max as usize <= CHUNK_BYTES);
    assert_eq!(sum as usize, body.len());
    let usage: i64 = client
        .query_one(
            "SELECT sum(bytes)::bigint FROM payload_guard_spool_usage",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(usage as usize > body.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_idempotent_when_replicas_start_together() {
    let Some(server) = pg::shared() else {
        return;
    };
    let url = server.database("migrations");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let db = Database::from_url("test", &url, 2).unwrap();
        tasks.spawn(async move { db.migrate().await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    let again = Database::from_url("test", &url, 2).unwrap();
    again.migrate().await.unwrap();
    let client = pg::client(&url).await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM payload_guard_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: Vec<i32> = payload_guard::db::migrations::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(versions, known);
}

#[tokio::test]
async fn postgres_unreachable_refuses_commits_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "postgres://guard:{}@127.0.0.1:{port}/nowhere?connect_timeout=2",
        pg::SECRET_PASSWORD
    );
    let db = Database::from_url("TEST_URL", &url, 2).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let store = PgStore::new(
        db,
        PgSpoolConfig {
            max_bytes: 1 << 20,
            lease_for: Duration::from_secs(5),
            staging_dir: staging.path().to_path_buf(),
        },
    )
    .unwrap();
    let err = store
        .commit(State::Ready, &meta("r", T0), Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::Database(_)), "{err}");
    let text = format!("{err} {err:?} {store:?}");
    assert!(!text.contains(pg::SECRET_PASSWORD), "{text}");
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(store.can_accept().await.is_err());
}
