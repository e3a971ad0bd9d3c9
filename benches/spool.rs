//! Spool throughput, disk and PostgreSQL side by side in one run: payloads per second
//! accepted (committed durably, as a spool route does before its 202) and drained (claimed in
//! arrival order, read, deleted, as redelivery does after a 2xx), with 20 KB bodies.
//!
//! - accepted: `PAYLOADS` commits from `WRITERS` concurrent tasks (concurrent requests);
//! - drained: one task per route (`ROUTES`), each claiming its route's oldest record until
//!   none is left (per-route order allows no more parallelism than that).
//!
//! The disk spool fsyncs every record; PostgreSQL runs with `fsync = on` (a server the bench
//! starts itself, like the tests: `initdb` + `pg_ctl` as the `postgres` user; skipped with a
//! line when PostgreSQL is not installed). Both on the same disk.
//!
//! Run: `cargo bench --bench spool`.

#[path = "../tests/it/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use payload_guard::db::Database;
use payload_guard::spool::pg::{PgSpoolConfig, PgStore};
use payload_guard::spool::{DiskStore, Meta, Spool, SpoolConfig, State, Store};

const PAYLOADS: usize = 2000;
const BODY_BYTES: usize = 20 * 1024;
const WRITERS: usize = 16;
const ROUTES: usize = 8;

struct Rates {
    accepted: f64,
    drained: f64,
}

async fn measure(store: Store) -> Rates {
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (store, body) = (store.clone(), body.clone());
        tasks.spawn(async move {
            for i in (w..PAYLOADS).step_by(WRITERS) {
                let route = format!("route-{}", i % ROUTES);
                let meta = Meta::new(
                    route,
                    SystemTime::now(),
                    "bench",
                    "POST",
                    "/hook",
                    BODY_BYTES as u64,
                );
                store
                    .commit(State::Ready, &meta, body.clone())
                    .await
                    .expect("commit");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer");
    }
    let accepted = PAYLOADS as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..ROUTES {
        let store = store.clone();
        tasks.spawn(async move {
            let route = format!("route-{r}");
            let mut drained = 0;
            while let Some(mut claim) = store
                .claim_next(&route, SystemTime::now())
                .await
                .expect("claim")
            {
                let body = claim.body().await.expect("body");
                assert_eq!(body.len(), BODY_BYTES);
                claim.complete().await.expect("complete");
                drained += 1;
            }
            drained
        });
    }
    let mut drained = 0;
    while let Some(done) = tasks.join_next().await {
        drained += done.expect("drainer");
    }
    assert_eq!(drained, PAYLOADS, "every record drained");
    Rates {
        accepted,
        drained: PAYLOADS as f64 / started.elapsed().as_secs_f64(),
    }
}

fn print(name: &str, rates: &Rates) {
    println!(
        "spool/{name:<9} accepted {:>7.0} payloads/s   drained {:>7.0} payloads/s",
        rates.accepted, rates.drained
    );
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{PAYLOADS} payloads of {} KB, {WRITERS} writers, {ROUTES} routes",
        BODY_BYTES / 1024
    );
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(SpoolConfig {
        dir: dir.path().join("spool"),
        max_bytes: 1 << 34,
        min_free: 0,
    })
    .unwrap();
    let disk: Store = Arc::new(DiskStore::new(spool));
    print("disk", &runtime.block_on(measure(disk)));

    let Some(server) = pg::PgServer::start_durable() else {
        return;
    };
    let url = server.database("bench");
    let db = Database::from_url("bench", &url, WRITERS + ROUTES).unwrap();
    let staging = tempfile::tempdir().unwrap();
    let postgres: Store = Arc::new(
        PgStore::new(
            db,
            PgSpoolConfig {
                max_bytes: 1 << 34,
                lease_for: Duration::from_secs(60),
                staging_dir: staging.path().to_path_buf(),
            },
        )
        .unwrap(),
    );
    print("postgres", &runtime.block_on(measure(postgres)));
}
