//! Learned limits and the dedupe memory shared by replicas through PostgreSQL
//! (`[spool] backend = "postgres"`).
//!
//! The request path keeps using the in-memory [`LearnedLimits`] and [`DedupeMemory`] (it never
//! waits for the database); a task per replica links them to two tables:
//!
//! - `payload_guard_learned_limits`: one row per route, its [`RouteLearned`] as JSON. What this
//!   replica learns ([`LimitEvent`]s) is applied to the row in a transaction (`FOR UPDATE`),
//!   by the same rules as in memory, so every replica's evidence lands in one history; then
//!   every row is read back and replaces the local state of routes with the same configured
//!   `upstream_limit`.
//! - `payload_guard_dedupe`: one row per (route, payload id); what this replica remembers is
//!   upserted, and rows other replicas wrote since the last look are learned.
//!
//! Both happen every [`SYNC_INTERVAL`], so a replica sees what another learned within about
//! that long. While the database is unreachable, events wait (up to [`PENDING_MAX`]) and are
//! sent when it is back; the local state keeps working alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::dedupe::{DEFAULT_CAPACITY, Remembered};
use super::limits::{LimitEvent, RouteLearned};
use super::{DedupeMemory, LearnedLimits};
use crate::db::{Database, DbError, OPERATION_TIMEOUT};

/// How often a replica sends what it learned and reads what others did.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// Events kept while the database is unreachable; older ones are dropped beyond this.
pub const PENDING_MAX: usize = 10_000;

/// Starts the task that shares `learned` and `dedupe` through `db` (on the current tokio
/// runtime).
pub fn spawn(db: Database, learned: Arc<LearnedLimits>, dedupe: Arc<DedupeMemory>) {
    let limit_events = learned.subscribe();
    let dedupe_events = dedupe.subscribe();
    tokio::spawn(run(db, learned, dedupe, limit_events, dedupe_events));
}

async fn run(
    db: Database,
    learned: Arc<LearnedLimits>,
    dedupe: Arc<DedupeMemory>,
    mut limit_events: mpsc::UnboundedReceiver<LimitEvent>,
    mut dedupe_events: mpsc::UnboundedReceiver<Remembered>,
) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync = Sync {
        db,
        learned,
        dedupe,
        limits: Vec::new(),
        remembered: Vec::new(),
        last_seq: 0,
        rounds: 0,
        failing: false,
    };
    loop {
        tick.tick().await;
        while let Ok(event) = limit_events.try_recv() {
            sync.limits.push(event);
        }
        while let Ok(seen) = dedupe_events.try_recv() {
            sync.remembered.push(seen);
        }
        let result = tokio::time::timeout(OPERATION_TIMEOUT, sync.round())
            .await
            .unwrap_or_else(|_| Err(sync.db.unavailable("no answer")));
        match result {
            Ok(()) if sync.failing => {
                sync.failing = false;
                tracing::info!("learned limits and dedupe are shared again");
            }
            Ok(()) => {}
            Err(err) => {
                if !sync.failing {
                    tracing::warn!(error = %err, "cannot share learned limits and dedupe: this replica goes on alone until the database is back");
                }
                sync.failing = true;
                sync.trim_pending();
            }
        }
    }
}

struct Sync {
    db: Database,
    learned: Arc<LearnedLimits>,
    dedupe: Arc<DedupeMemory>,
    /// Events not yet in the table.
    limits: Vec<LimitEvent>,
    remembered: Vec<Remembered>,
    /// The highest dedupe `seq` read so far.
    last_seq: i64,
    rounds: u64,
    failing: bool,
}

impl Sync {
    async fn round(&mut self) -> Result<(), DbError> {
        self.push_limits().await?;
        self.pull_limits().await?;
        self.push_dedupe().await?;
        self.pull_dedupe().await?;
        self.rounds += 1;
        if self.rounds.is_multiple_of(120) {
            self.forget_old_ids().await?;
        }
        Ok(())
    }

    fn trim_pending(&mut self) {
        for (name, len) in [
            ("learned limits", self.limits.len()),
            ("dedupe ids", self.remembered.len()),
        ] {
            if len > PENDING_MAX {
                tracing::warn!(
                    what = name,
                    dropped = len - PENDING_MAX,
                    "database unreachable for long: oldest unshared changes dropped"
                );
            }
        }
        if self.limits.len() > PENDING_MAX {
            self.limits.drain(..self.limits.len() - PENDING_MAX);
        }
        if self.remembered.len() > PENDING_MAX {
            self.remembered.drain(..self.remembered.len() - PENDING_MAX);
        }
    }

    /// Applies this replica's events to the shared rows, one transaction per route.
    async fn push_limits(&mut self) -> Result<(), DbError> {
        if self.limits.is_empty() {
            return Ok(());
        }
        let mut by_route: BTreeMap<String, Vec<LimitEvent>> = BTreeMap::new();
        for event in &self.limits {
            by_route
                .entry(event.route().to_string())
                .or_default()
                .push(event.clone());
        }
        let mut client = self.db.client().await?;
        for (route, events) in by_route {
            let tx = client.transaction().await.map_err(|e| self.db.error(&e))?;
            // The row exists before it is locked, so two replicas learning about a new route
            // at once queue on its lock instead of each inserting its own version.
            tx.execute(
                "INSERT INTO payload_guard_learned_limits (route, state) VALUES ($1, '{}')
                 ON CONFLICT (route) DO NOTHING",
                &[&route],
            )
            .await
            .map_err(|e| self.db.error(&e))?;
            let row = tx
                .query_opt(
                    "SELECT state FROM payload_guard_learned_limits WHERE route = $1 FOR UPDATE",
                    &[&route],
                )
                .await
                .map_err(|e| self.db.error(&e))?;
            let mut state: RouteLearned = row
                .and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
                .unwrap_or_default();
            for event in &events {
                // Evidence gathered under another configured limit is not mixed in.
                let configured_elsewhere = !matches!(event, LimitEvent::Configured { .. })
                    && self
                        .learned
                        .route(&route)
                        .is_some_and(|local| local.configured != state.configured);
                if !configured_elsewhere {
                    state.apply(event);
                }
            }
            let json = serde_json::to_string(&state).unwrap_or_default();
            tx.execute(
                "UPDATE payload_guard_learned_limits SET state = $2, updated_at = now()
                 WHERE route = $1",
                &[&route, &json],
            )
            .await
            .map_err(|e| self.db.error(&e))?;
            tx.commit().await.map_err(|e| self.db.error(&e))?;
            self.limits.retain(|e| e.route() != route);
        }
        Ok(())
    }

    /// Takes every route's shared state (where the configured limit agrees).
    async fn pull_limits(&mut self) -> Result<(), DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query("SELECT route, state FROM payload_guard_learned_limits", &[])
            .await
            .map_err(|e| self.db.error(&e))?;
        for row in rows {
            let route: &str = row.get(0);
            let Ok(shared) = serde_json::from_str::<RouteLearned>(row.get(1)) else {
                continue;
            };
            // Local events not sent yet would be undone: they are applied after the next push.
            if self.limits.iter().any(|e| e.route() == route) {
                continue;
            }
            match self.learned.route(route) {
                Some(local) if local.configured != shared.configured => {}
                _ => self.learned.replace_route(route, shared),
            }
        }
        Ok(())
    }

    async fn push_dedupe(&mut self) -> Result<(), DbError> {
        if self.remembered.is_empty() {
            return Ok(());
        }
        let client = self.db.client().await?;
        let upsert = client
            .prepare_cached(
                "INSERT INTO payload_guard_dedupe (route, id, hash, first_request_id, at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (route, id) DO UPDATE
                 SET hash = EXCLUDED.hash, first_request_id = EXCLUDED.first_request_id,
                     at = EXCLUDED.at, seq = nextval('payload_guard_dedupe_seq')
                 WHERE payload_guard_dedupe.hash <> EXCLUDED.hash",
            )
            .await
            .map_err(|e| self.db.error(&e))?;
        while let Some(seen) = self.remembered.first() {
            client
                .execute(
                    &upsert,
                    &[
                        &seen.route,
                        &seen.id,
                        &seen.hash,
                        &seen.request_id,
                        &(seen.at as i64),
                    ],
                )
                .await
                .map_err(|e| self.db.error(&e))?;
            self.remembered.remove(0);
        }
        Ok(())
    }

    async fn pull_dedupe(&mut self) -> Result<(), DbError> {
        let client = self.db.client().await?;
        let rows = client
            .query(
                "SELECT route, id, hash, first_request_id, at, seq FROM payload_guard_dedupe
                 WHERE seq > $1 ORDER BY seq LIMIT 10000",
                &[&self.last_seq],
            )
            .await
            .map_err(|e| self.db.error(&e))?;
        for row in rows {
            self.dedupe.learn(&Remembered {
                route: row.get(0),
                id: row.get(1),
                hash: row.get(2),
                request_id: row.get(3),
                at: row.get::<_, i64>(4).max(0) as u64,
            });
            self.last_seq = self.last_seq.max(row.get(5));
        }
        Ok(())
    }

    /// Keeps the table to the memory's capacity (the newest ids).
    async fn forget_old_ids(&self) -> Result<(), DbError> {
        let client = self.db.client().await?;
        client
            .execute(
                "DELETE FROM payload_guard_dedupe
                 WHERE seq < (SELECT max(seq) FROM payload_guard_dedupe) - $1",
                &[&(DEFAULT_CAPACITY as i64)],
            )
            .await
            .map_err(|e| self.db.error(&e))?;
        Ok(())
    }
}
