//! Learned limits and the dedupe memory shared by replicas through PostgreSQL: what one
//! replica learns, another knows shortly after (the same API, each replica's memory linked to
//! the shared tables by `state::shared`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use payload_guard::db::Database;
use payload_guard::state::dedupe::body_hash;
use payload_guard::state::{DedupeMemory, LearnedLimits, Repeat};

use crate::pg;

/// A replica's state, linked to the database at `url`.
fn replica(url: &str) -> (Arc<LearnedLimits>, Arc<DedupeMemory>) {
    let learned = Arc::new(LearnedLimits::in_memory());
    let dedupe = Arc::new(DedupeMemory::in_memory(1000));
    let db = Database::from_url("test", url, 2).unwrap();
    payload_guard::state::shared::spawn(db, learned.clone(), dedupe.clone());
    (learned, dedupe)
}

/// Waits (bounded) until `check` holds: replicas sync every half second.
async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_learns_the_others_know() {
    let Some(server) = pg::shared() else {
        return;
    };
    let url = server.database("shared_state");
    let (learned_a, dedupe_a) = replica(&url);
    let (learned_b, dedupe_b) = replica(&url);

    // A receiver refuses 2 MB on replica A, accepts 500 KB on replica B: both know both.
    learned_a.refused("hooks", 2_000_000, None, "req-a");
    learned_b.accepted("hooks", 500_000, None, "req-b");
    let both = |l: &LearnedLimits| {
        l.route("hooks").is_some_and(|r| {
            r.wire.smallest_rejected == Some(2_000_000) && r.wire.largest_accepted == Some(500_000)
        })
    };
    eventually("both replicas hold both pieces of evidence", || {
        both(&learned_a) && both(&learned_b)
    })
    .await;
    let evidence = learned_b.route("hooks").unwrap().evidence;
    assert!(
        evidence.iter().any(|e| e.request_id == "req-a"),
        "{evidence:?}"
    );

    // A reset on B (POST /limits/reset there) resets A too.
    assert!(learned_b.reset("hooks"));
    eventually("the reset reached replica A", || {
        learned_a
            .route("hooks")
            .is_some_and(|r| r.wire.is_empty() && r.evidence.is_empty())
    })
    .await;

    // An id delivered through A is a duplicate on B; a different body is a conflict.
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let hash = body_hash(b"{\"call\":{\"call_id\":\"c-1\"}}");
    assert_eq!(dedupe_b.check("hooks", "c-1", &hash, day, now), Repeat::New);
    dedupe_a.remember("hooks", "c-1", &hash, "req-1", now);
    eventually("replica B remembers c-1", || {
        dedupe_b.check("hooks", "c-1", &hash, day, now)
            == Repeat::Duplicate {
                first_request_id: "req-1".into(),
            }
    })
    .await;
    assert_eq!(
        dedupe_b.check("hooks", "c-1", &body_hash(b"other"), day, now),
        Repeat::Conflict {
            first_request_id: "req-1".into()
        }
    );
    let rows: i64 = pg::client(&url)
        .await
        .query_one("SELECT count(*) FROM payload_guard_dedupe", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
