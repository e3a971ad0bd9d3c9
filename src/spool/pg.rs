//! The spool in PostgreSQL, shared by every replica that points at the same database.
//!
//! # Tables (see `db::migrations`)
//! - `payload_guard_spool`: one row per record: `id` (a [`RecordId`]), `route`, `state`
//!   (`ready`, `dead`, `archive`), `received_at`, `next_attempt_at`, the lease (`claimed_by`,
//!   `claim_token`, `lease_until`), `body_len`, `bytes` (counted against `max_bytes`) and the
//!   metadata as JSON (the same document the disk format stores).
//! - `payload_guard_spool_chunks`: the body as `bytea` chunks of at most [`CHUNK_BYTES`], so a
//!   large body never needs to fit in one statement.
//! - `payload_guard_spool_usage`: the bytes of all records, as [`USAGE_SHARDS`] rows (their
//!   sum), charged in the same transaction as every insert and delete, so `max_bytes` counts
//!   the table across replicas. Commits charge a random row, so they do not queue behind one
//!   row lock; the cost: commits at the same moment do not see each other's bytes, so the
//!   table can go over `max_bytes` by what they store together.
//!
//! # Promises
//! A commit is one transaction (record row, chunks, usage) and returns only after `COMMIT`
//! succeeded: the sender is acknowledged only for committed rows. Claiming sets a lease
//! (`lease_until` = database time + `lease_for`) on the route's oldest ready row, locked with
//! `FOR UPDATE SKIP LOCKED`; a replica that dies simply stops renewing nothing: its leases
//! expire and any replica continues with the same record. Settling an attempt (delete,
//! release, bury) only touches the row while the claim's token is still on it.

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use tokio_postgres::Row;

use super::store::{ClaimedRecord, SpoolStore, StagedBody};
use super::{Entry, LAST_ERROR_MAX_BYTES, Meta, RecordId, SNIPPET_MAX_BYTES, SpoolError, State};
use crate::db::{Database, OPERATION_TIMEOUT};

/// Rows the usage counter is spread over (see the module docs).
pub const USAGE_SHARDS: u128 = 16;

/// Total bytes charged, over every usage row.
const USAGE_SUM: &str = "SELECT coalesce(sum(bytes), 0)::bigint FROM payload_guard_spool_usage";

fn usage_shard() -> i32 {
    (uuid::Uuid::new_v4().as_u128() % USAGE_SHARDS) as i32
}

/// Bodies are stored in chunks of at most this many bytes.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// How long `/readyz` waits for the database to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The settings the PostgreSQL spool needs.
#[derive(Debug, Clone)]
pub struct PgSpoolConfig {
    /// Cap on the bytes of all records in the table.
    pub max_bytes: u64,
    /// How long a claim holds a record before another replica may take it.
    pub lease_for: Duration,
    /// Where bodies being streamed (staged) are kept until they are committed: a local
    /// directory of this replica.
    pub staging_dir: PathBuf,
}

/// The PostgreSQL spool; clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    cfg: PgSpoolConfig,
    replica: String,
    usage: AtomicU64,
    depth: [AtomicUsize; 3],
    /// Ready records per route at the last refresh: (route, records, oldest received).
    ready_by_route: std::sync::Mutex<Vec<(String, u64, SystemTime)>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.inner.db.display())
            .field("replica", &self.inner.replica)
            .finish_non_exhaustive()
    }
}

fn db_err(db: &Database, e: &tokio_postgres::Error) -> SpoolError {
    SpoolError::Database(db.error(e))
}

impl PgStore {
    /// A store on `db` (connects lazily; see [`Database`]).
    pub fn new(db: Database, cfg: PgSpoolConfig) -> Result<PgStore, SpoolError> {
        Ok(PgStore {
            inner: Arc::new(Inner {
                db,
                cfg,
                replica: replica_name(),
                usage: AtomicU64::new(0),
                depth: Default::default(),
                ready_by_route: Default::default(),
            }),
        })
    }

    /// This replica's name in `claimed_by`: host name and process id.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SpoolError> {
        Ok(self.inner.db.client().await?)
    }

    fn err(&self, e: &tokio_postgres::Error) -> SpoolError {
        db_err(&self.inner.db, e)
    }

    /// Runs `op` with the operation timeout; a timeout is a database error.
    async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, SpoolError>>,
    ) -> Result<T, SpoolError> {
        match tokio::time::timeout(OPERATION_TIMEOUT, op).await {
            Ok(result) => result,
            Err(_) => {
                Err(SpoolError::Database(self.inner.db.unavailable(&format!(
                    "no answer within {OPERATION_TIMEOUT:?}"
                ))))
            }
        }
    }

    fn count(&self, state: State, delta: isize) {
        let slot = &self.inner.depth[state.index()];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
            Some(d.saturating_add_signed(delta))
        });
    }

    /// Inserts a record row and its chunks and charges `max_bytes`, in one transaction.
    async fn insert(
        &self,
        id: &RecordId,
        state: State,
        meta: &Meta,
        body: BodySource,
    ) -> Result<(), SpoolError> {
        let meta_json = encode_meta(meta)?;
        let body_len = body.len();
        let bytes = (body_len + meta_json.len() as u64) as i64;
        let max = i64::try_from(self.inner.cfg.max_bytes).unwrap_or(i64::MAX);
        if bytes > max {
            return Err(SpoolError::Full {
                used: bytes as u64,
                max: max as u64,
            });
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(&e))?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO payload_guard_spool
                    (id, route, state, received_at, next_attempt_at, body_len, bytes, meta)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await
            .map_err(|e| self.err(&e))?;
        tx.execute(
            &insert,
            &[
                &id.as_str(),
                &meta.route,
                &state.as_str(),
                &millis(meta.received_at),
                &meta.next_attempt_at.map(millis),
                &(body_len as i64),
                &bytes,
                &meta_json,
            ],
        )
        .await
        .map_err(|e| self.err(&e))?;
        let chunk = tx
            .prepare_cached(
                "INSERT INTO payload_guard_spool_chunks (record_id, seq, data) VALUES ($1, $2, $3)",
            )
            .await
            .map_err(|e| self.err(&e))?;
        let mut seq: i32 = 0;
        let mut written = 0u64;
        match body {
            BodySource::Memory(body) => {
                for data in body.chunks(CHUNK_BYTES) {
                    tx.execute(&chunk, &[&id.as_str(), &seq, &data])
                        .await
                        .map_err(|e| self.err(&e))?;
                    seq += 1;
                }
            }
            BodySource::File { path, len } => {
                let mut file = std::fs::File::open(&path)
                    .map_err(|e| SpoolError::io("open", path.clone(), e))?;
                while written < len {
                    let want = (len - written).min(CHUNK_BYTES as u64) as usize;
                    let (back, data) = tokio::task::spawn_blocking(move || {
                        let mut data = vec![0u8; want];
                        let read = file.read_exact(&mut data);
                        (file, read.map(|()| data))
                    })
                    .await
                    .map_err(|e| SpoolError::io("read", path.clone(), std::io::Error::other(e)))?;
                    file = back;
                    let data = data.map_err(|e| SpoolError::io("read", path.clone(), e))?;
                    tx.execute(&chunk, &[&id.as_str(), &seq, &data.as_slice()])
                        .await
                        .map_err(|e| self.err(&e))?;
                    seq += 1;
                    written += data.len() as u64;
                }
            }
        }
        // Last, so the usage row is locked only for the commit itself.
        let shard = usage_shard();
        let used: i64 = tx
            .query_one(
                "WITH charged AS (
                     UPDATE payload_guard_spool_usage SET bytes = bytes + $1
                     WHERE shard = $2 RETURNING bytes
                 )
                 SELECT ((SELECT coalesce(sum(bytes), 0) FROM payload_guard_spool_usage
                          WHERE shard <> $2)
                         + (SELECT bytes FROM charged))::bigint",
                &[&bytes, &shard],
            )
            .await
            .map_err(|e| self.err(&e))?
            .get(0);
        if used > max {
            // Dropping the transaction rolls it back: nothing of the record is kept.
            self.inner
                .usage
                .store((used - bytes).max(0) as u64, Ordering::Release);
            return Err(SpoolError::Full {
                used: used as u64,
                max: max as u64,
            });
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        self.inner.usage.store(used as u64, Ordering::Release);
        self.count(state, 1);
        Ok(())
    }

    /// Reads a body's chunks in order, one query per chunk (memory stays at one chunk plus
    /// what `out` keeps).
    async fn copy_chunks(
        &self,
        client: &deadpool_postgres::Object,
        id: &RecordId,
        body_len: u64,
        out: &mut (dyn Write + Send),
    ) -> Result<u64, SpoolError> {
        let stmt = client
            .prepare_cached(
                "SELECT data FROM payload_guard_spool_chunks WHERE record_id = $1 AND seq = $2",
            )
            .await
            .map_err(|e| self.err(&e))?;
        let mut written = 0u64;
        let mut seq: i32 = 0;
        while let Some(row) = client
            .query_opt(&stmt, &[&id.as_str(), &seq])
            .await
            .map_err(|e| self.err(&e))?
        {
            let data: &[u8] = row.get(0);
            out.write_all(data)
                .map_err(|e| SpoolError::io("write", PathBuf::from("-"), e))?;
            written += data.len() as u64;
            seq += 1;
        }
        if written != body_len {
            return Err(SpoolError::Corrupt {
                path: PathBuf::from(format!("{}#{id}", self.inner.db.display())),
                reason: format!("body has {written} bytes in the database, {body_len} expected"),
            });
        }
        Ok(written)
    }

    /// Claims the row `id` if `sql` (which must set the lease from `$2`, `$3`, `$4`) matches.
    async fn claim_where(
        &self,
        sql: &str,
        first: &(dyn tokio_postgres::types::ToSql + Sync),
        now: Option<SystemTime>,
    ) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError> {
        let client = self.client().await?;
        let token = uuid::Uuid::new_v4().to_string();
        let lease_ms = self.inner.cfg.lease_for.as_millis() as i64;
        let row = match now {
            Some(now) => {
                client
                    .query_opt(
                        sql,
                        &[first, &self.inner.replica, &token, &lease_ms, &millis(now)],
                    )
                    .await
            }
            None => {
                client
                    .query_opt(sql, &[first, &self.inner.replica, &token, &lease_ms])
                    .await
            }
        }
        .map_err(|e| self.err(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id = RecordId::parse(row.get(0))?;
        let meta = decode_meta(&id, row.get(1))?;
        let body_len: i64 = row.get(2);
        Ok(Some(Box::new(PgClaim {
            store: self.clone(),
            id,
            meta,
            body_len: body_len as u64,
            token,
            done: false,
        })))
    }

    async fn entries(&self, rows: Vec<Row>) -> Result<Vec<Entry>, SpoolError> {
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            match self.entry(&row) {
                Ok(entry) => entries.push(entry),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable spool record"),
            }
        }
        Ok(entries)
    }

    fn entry(&self, row: &Row) -> Result<Entry, SpoolError> {
        let id = RecordId::parse(row.get("id"))?;
        let state: &str = row.get("state");
        let state: State = state.parse().map_err(|reason| SpoolError::Corrupt {
            path: PathBuf::from(format!("{}#{id}", self.inner.db.display())),
            reason,
        })?;
        let meta = decode_meta(&id, row.get("meta"))?;
        let body_len: i64 = row.get("body_len");
        let bytes: i64 = row.get("bytes");
        let claimed: bool = row.get("claimed");
        Ok(Entry {
            path: PathBuf::from(format!("{}#{id}", self.inner.db.display())),
            id,
            state,
            claimed,
            meta,
            body_len: body_len as u64,
            file_len: bytes as u64,
        })
    }

    /// Deletes rows matched by `sql` (returning their `bytes`) and uncharges them.
    async fn delete_where(
        &self,
        state: State,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<usize, SpoolError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(&e))?;
        let rows = tx.query(sql, params).await.map_err(|e| self.err(&e))?;
        let freed: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
        if freed > 0 {
            tx.execute(
                "UPDATE payload_guard_spool_usage SET bytes = bytes - $1 WHERE shard = $2",
                &[&freed, &usage_shard()],
            )
            .await
            .map_err(|e| self.err(&e))?;
        }
        tx.commit().await.map_err(|e| self.err(&e))?;
        let _ = self
            .inner
            .usage
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(freed as u64))
            });
        self.count(state, -(rows.len() as isize));
        Ok(rows.len())
    }
}

const ENTRY_COLUMNS: &str = "id, state, meta, body_len, bytes,
    coalesce(lease_until > now(), false) AS claimed";

#[async_trait]
impl SpoolStore for PgStore {
    fn location(&self) -> String {
        format!("{} (table payload_guard_spool)", self.inner.db.display())
    }

    async fn commit(&self, state: State, meta: &Meta, body: Bytes) -> Result<RecordId, SpoolError> {
        let id = RecordId::generate(meta.received_at);
        self.timed(self.insert(&id, state, meta, BodySource::Memory(body)))
            .await?;
        tracing::debug!(route = %meta.route, id = %id, state = %state, "spool record committed to the database");
        Ok(id)
    }

    async fn stage(&self, received_at: SystemTime) -> Result<Box<dyn StagedBody>, SpoolError> {
        let id = RecordId::generate(received_at);
        super::durable::create_private_dir(&self.inner.cfg.staging_dir)?;
        let path = self.inner.cfg.staging_dir.join(format!("{id}.pg"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| SpoolError::io("create", path.clone(), e))?;
        Ok(Box::new(PgStaging {
            store: self.clone(),
            id,
            file: Some(std::io::BufWriter::new(file)),
            path,
            len: 0,
        }))
    }

    async fn claim(&self, id: &RecordId) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError> {
        let id = id.as_str().to_owned();
        self.timed(self.claim_where(
            "UPDATE payload_guard_spool
             SET claimed_by = $2, claim_token = $3,
                 lease_until = now() + $4::bigint * interval '1 millisecond'
             WHERE id = (SELECT id FROM payload_guard_spool
                         WHERE id = $1 AND state = 'ready'
                           AND (lease_until IS NULL OR lease_until < now())
                         FOR UPDATE SKIP LOCKED)
             RETURNING id, meta, body_len",
            &id,
            None,
        ))
        .await
    }

    async fn claim_next(
        &self,
        route: &str,
        now: SystemTime,
    ) -> Result<Option<Box<dyn ClaimedRecord>>, SpoolError> {
        let route = route.to_owned();
        // The route's oldest ready row, leased or not: when another attempt holds it, or it is
        // not due, nothing is claimed (later rows wait their turn). SKIP LOCKED: when another
        // replica is claiming it this very moment, it wins and this one moves on.
        self.timed(self.claim_where(
            "WITH head AS (
                 SELECT id FROM payload_guard_spool
                 WHERE state = 'ready' AND route = $1
                 ORDER BY received_at, id LIMIT 1
             ), free AS (
                 SELECT s.id FROM payload_guard_spool s JOIN head USING (id)
                 WHERE (s.lease_until IS NULL OR s.lease_until < now())
                   AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= $5)
                 FOR UPDATE OF s SKIP LOCKED
             )
             UPDATE payload_guard_spool s
             SET claimed_by = $2, claim_token = $3,
                 lease_until = now() + $4::bigint * interval '1 millisecond'
             FROM free WHERE s.id = free.id
             RETURNING s.id, s.meta, s.body_len",
            &route,
            Some(now),
        ))
        .await
    }

    async fn ready_routes(&self) -> Result<Vec<String>, SpoolError> {
        self.timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT DISTINCT route FROM payload_guard_spool WHERE state = 'ready' ORDER BY route",
                    &[],
                )
                .await
                .map_err(|e| self.err(&e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    async fn list(&self, state: State, route: Option<&str>) -> Result<Vec<Entry>, SpoolError> {
        let route = route.map(str::to_owned);
        self.timed(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {ENTRY_COLUMNS} FROM payload_guard_spool
                         WHERE state = $1 AND ($2::text IS NULL OR route = $2)
                           AND NOT coalesce(lease_until > now(), false)
                         ORDER BY received_at, id"
                    ),
                    &[&state.as_str(), &route],
                )
                .await
                .map_err(|e| self.err(&e))?;
            self.entries(rows).await
        })
        .await
    }

    async fn find(&self, id: &RecordId) -> Result<Option<Entry>, SpoolError> {
        self.timed(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {ENTRY_COLUMNS} FROM payload_guard_spool WHERE id = $1"),
                    &[&id.as_str()],
                )
                .await
                .map_err(|e| self.err(&e))?;
            row.map(|row| self.entry(&row)).transpose()
        })
        .await
    }

    async fn read(&self, state: State, id: &RecordId) -> Result<(Meta, Vec<u8>), SpoolError> {
        let mut body = Vec::new();
        let (meta, _) = self.copy_body(state, id, &mut body).await?;
        Ok((meta, body))
    }

    async fn copy_body(
        &self,
        state: State,
        id: &RecordId,
        out: &mut (dyn Write + Send),
    ) -> Result<(Meta, u64), SpoolError> {
        self.timed(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT meta, body_len FROM payload_guard_spool WHERE id = $1 AND state = $2",
                    &[&id.as_str(), &state.as_str()],
                )
                .await
                .map_err(|e| self.err(&e))?
                .ok_or_else(|| SpoolError::NotFound(id.clone()))?;
            let meta = decode_meta(id, row.get(0))?;
            let body_len: i64 = row.get(1);
            let len = self.copy_chunks(&client, id, body_len as u64, out).await?;
            Ok((meta, len))
        })
        .await
    }

    async fn revive(&self, id: &RecordId) -> Result<bool, SpoolError> {
        let revived = self
            .timed(async {
                let client = self.client().await?;
                client
                    .execute(
                        "UPDATE payload_guard_spool SET state = 'ready', next_attempt_at = NULL
                         WHERE id = $1 AND state = 'dead'",
                        &[&id.as_str()],
                    )
                    .await
                    .map_err(|e| self.err(&e))
            })
            .await?;
        if revived > 0 {
            self.count(State::Dead, -1);
            self.count(State::Ready, 1);
        }
        Ok(revived > 0)
    }

    async fn remove(&self, state: State, id: &RecordId) -> Result<bool, SpoolError> {
        let removed = self
            .timed(self.delete_where(
                state,
                "DELETE FROM payload_guard_spool
                 WHERE id = $1 AND state = $2
                   AND (lease_until IS NULL OR lease_until < now())
                 RETURNING bytes",
                &[&id.as_str(), &state.as_str()],
            ))
            .await?;
        Ok(removed > 0)
    }

    async fn purge(&self, state: State, older_than: Duration) -> Result<usize, SpoolError> {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(UNIX_EPOCH);
        let removed = self
            .timed(self.delete_where(
                state,
                "DELETE FROM payload_guard_spool
                 WHERE state = $1 AND received_at < $2
                   AND (lease_until IS NULL OR lease_until < now())
                 RETURNING bytes",
                &[&state.as_str(), &millis(cutoff)],
            ))
            .await?;
        if removed > 0 {
            tracing::info!(state = %state, removed, "purged spool records");
        }
        Ok(removed)
    }

    async fn prepare(&self) -> Result<(), SpoolError> {
        self.inner.db.migrate().await?;
        self.refresh().await;
        Ok(())
    }

    async fn can_accept(&self) -> Result<(), SpoolError> {
        if !self.inner.db.ping(PROBE_TIMEOUT).await {
            return Err(SpoolError::Database(
                self.inner
                    .db
                    .unavailable(&format!("no answer within {PROBE_TIMEOUT:?}")),
            ));
        }
        let (used, max) = (self.usage(), self.inner.cfg.max_bytes);
        if max > 0 && used >= max {
            return Err(SpoolError::Full { used, max });
        }
        Ok(())
    }

    async fn refresh(&self) {
        let counted = self
            .timed(async {
                let client = self.client().await?;
                let rows = client
                    .query(
                        "SELECT state, count(*) FROM payload_guard_spool GROUP BY state",
                        &[],
                    )
                    .await
                    .map_err(|e| self.err(&e))?;
                let used: i64 = client
                    .query_one(USAGE_SUM, &[])
                    .await
                    .map_err(|e| self.err(&e))?
                    .get(0);
                let routes = client
                    .query(
                        "SELECT route, count(*), min(received_at) FROM payload_guard_spool
                         WHERE state = 'ready' GROUP BY route ORDER BY route",
                        &[],
                    )
                    .await
                    .map_err(|e| self.err(&e))?;
                Ok((rows, used, routes))
            })
            .await;
        let Ok((rows, used, routes)) = counted else {
            return;
        };
        *self
            .inner
            .ready_by_route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = routes
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2)))
            .collect();
        let mut depth = [0usize; 3];
        for row in rows {
            if let Ok(state) = row.get::<_, &str>(0).parse::<State>() {
                depth[state.index()] = row.get::<_, i64>(1) as usize;
            }
        }
        for (slot, value) in self.inner.depth.iter().zip(depth) {
            slot.store(value, Ordering::Release);
        }
        self.inner.usage.store(used as u64, Ordering::Release);
    }

    fn ready_by_route(&self) -> Vec<(String, u64, SystemTime)> {
        self.inner
            .ready_by_route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn usage(&self) -> u64 {
        self.inner.usage.load(Ordering::Acquire)
    }

    fn depth(&self, state: State) -> usize {
        self.inner.depth[state.index()].load(Ordering::Acquire)
    }
}

/// A claim on one row: the lease (`claim_token`) is what settling checks.
struct PgClaim {
    store: PgStore,
    id: RecordId,
    meta: Meta,
    body_len: u64,
    token: String,
    done: bool,
}

impl fmt::Debug for PgClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgClaim")
            .field("id", &self.id)
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

impl PgClaim {
    /// Rewrites the claimed row's metadata and state and drops the lease, if the lease is
    /// still ours (else another replica took the record after our lease ran out: `LeaseLost`).
    async fn rewrite(&mut self, meta: Meta, state: State) -> Result<(), SpoolError> {
        let store = self.store.clone();
        let meta_json = encode_meta(&meta)?;
        let updated = store
            .timed(async {
                let client = store.client().await?;
                client
                    .execute(
                        "UPDATE payload_guard_spool
                         SET state = $3, meta = $4, next_attempt_at = $5,
                             claimed_by = NULL, claim_token = NULL, lease_until = NULL
                         WHERE id = $1 AND claim_token = $2",
                        &[
                            &self.id.as_str(),
                            &self.token,
                            &state.as_str(),
                            &meta_json,
                            &meta.next_attempt_at.map(millis),
                        ],
                    )
                    .await
                    .map_err(|e| store.err(&e))
            })
            .await?;
        self.done = true;
        if updated == 0 {
            return Err(SpoolError::LeaseLost(self.id.clone()));
        }
        if state != State::Ready {
            store.count(State::Ready, -1);
            store.count(state, 1);
        }
        Ok(())
    }
}

#[async_trait]
impl ClaimedRecord for PgClaim {
    fn id(&self) -> &RecordId {
        &self.id
    }

    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn body_len(&self) -> u64 {
        self.body_len
    }

    async fn body(&mut self) -> Result<Vec<u8>, SpoolError> {
        let store = self.store.clone();
        let mut body = Vec::with_capacity(self.body_len as usize);
        store
            .timed(async {
                let client = store.client().await?;
                store
                    .copy_chunks(&client, &self.id, self.body_len, &mut body)
                    .await
            })
            .await?;
        Ok(body)
    }

    async fn complete(mut self: Box<Self>) -> Result<(), SpoolError> {
        let store = self.store.clone();
        let removed = store
            .timed(store.delete_where(
                State::Ready,
                "DELETE FROM payload_guard_spool WHERE id = $1 AND claim_token = $2 RETURNING bytes",
                &[&self.id.as_str(), &self.token],
            ))
            .await?;
        self.done = true;
        if removed == 0 {
            return Err(SpoolError::LeaseLost(self.id.clone()));
        }
        Ok(())
    }

    async fn release(
        mut self: Box<Self>,
        last_error: &str,
        next_attempt_at: SystemTime,
    ) -> Result<(), SpoolError> {
        let mut meta = self.meta.clone();
        meta.attempts = meta.attempts.saturating_add(1);
        meta.last_error = Some(last_error.to_owned());
        meta.next_attempt_at = Some(next_attempt_at);
        self.rewrite(meta, State::Ready).await
    }

    async fn bury(
        mut self: Box<Self>,
        status: Option<u16>,
        snippet: &str,
        last_error: &str,
    ) -> Result<(), SpoolError> {
        let mut meta = self.meta.clone();
        meta.attempts = meta.attempts.saturating_add(1);
        meta.status = status;
        meta.snippet = Some(snippet.to_owned());
        meta.last_error = Some(last_error.to_owned());
        meta.next_attempt_at = None;
        self.rewrite(meta, State::Dead).await
    }
}

impl Drop for PgClaim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Give the record back now rather than when the lease runs out.
        let (store, id, token) = (self.store.clone(), self.id.clone(), self.token.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = store
                    .timed(async {
                        let client = store.client().await?;
                        client
                            .execute(
                                "UPDATE payload_guard_spool
                                 SET claimed_by = NULL, claim_token = NULL, lease_until = NULL
                                 WHERE id = $1 AND claim_token = $2",
                                &[&id.as_str(), &token],
                            )
                            .await
                            .map_err(|e| store.err(&e))
                    })
                    .await;
            });
        }
    }
}

/// A streamed body kept in a local file of this replica until it is committed (in chunks).
struct PgStaging {
    store: PgStore,
    id: RecordId,
    file: Option<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
    len: u64,
}

impl fmt::Debug for PgStaging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStaging")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl StagedBody for PgStaging {
    fn body_len(&self) -> u64 {
        self.len
    }

    fn write_all(&mut self, chunk: &[u8]) -> Result<(), SpoolError> {
        let grown = self.len + chunk.len() as u64;
        let used = self.store.usage();
        if used + grown > self.store.inner.cfg.max_bytes {
            return Err(SpoolError::Full {
                used: used + grown,
                max: self.store.inner.cfg.max_bytes,
            });
        }
        let file = self.file.as_mut().ok_or_else(|| {
            SpoolError::io(
                "write",
                self.path.clone(),
                std::io::Error::other("staging already closed"),
            )
        })?;
        file.write_all(chunk)
            .map_err(|e| SpoolError::io("write", self.path.clone(), e))?;
        self.len = grown;
        Ok(())
    }

    fn body_file(&mut self) -> Result<(PathBuf, u64, u64), SpoolError> {
        if let Some(file) = self.file.as_mut() {
            file.flush()
                .map_err(|e| SpoolError::io("flush", self.path.clone(), e))?;
        }
        Ok((self.path.clone(), 0, self.len))
    }

    async fn commit(
        mut self: Box<Self>,
        state: State,
        meta: &Meta,
    ) -> Result<RecordId, SpoolError> {
        self.body_file()?;
        self.file = None;
        let source = BodySource::File {
            path: self.path.clone(),
            len: self.len,
        };
        let store = self.store.clone();
        store
            .timed(store.insert(&self.id, state, meta, source))
            .await?;
        tracing::debug!(route = %meta.route, id = %self.id, state = %state, "staged spool record committed to the database");
        Ok(self.id.clone())
    }
}

impl Drop for PgStaging {
    fn drop(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a body to insert comes from.
enum BodySource {
    Memory(Bytes),
    File { path: PathBuf, len: u64 },
}

impl BodySource {
    fn len(&self) -> u64 {
        match self {
            BodySource::Memory(body) => body.len() as u64,
            BodySource::File { len, .. } => *len,
        }
    }
}

/// A time cut to the millisecond (what the metadata JSON keeps), so the column and the
/// metadata agree.
fn millis(time: SystemTime) -> SystemTime {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn encode_meta(meta: &Meta) -> Result<String, SpoolError> {
    let mut meta = meta.clone();
    meta.last_error = meta
        .last_error
        .map(|e| super::meta::truncate_utf8(&e, LAST_ERROR_MAX_BYTES));
    meta.snippet = meta
        .snippet
        .map(|s| super::meta::truncate_utf8(&s, SNIPPET_MAX_BYTES));
    serde_json::to_string(&meta).map_err(|e| SpoolError::Corrupt {
        path: PathBuf::from(meta.route.clone()),
        reason: format!("metadata cannot be encoded: {e}"),
    })
}

fn decode_meta(id: &RecordId, json: &str) -> Result<Meta, SpoolError> {
    serde_json::from_str(json).map_err(|e| SpoolError::Corrupt {
        path: PathBuf::from(id.as_str()),
        reason: format!("metadata is not valid: {e}"),
    })
}

/// `host/pid`: which replica holds a lease or wrote an incident (for operators reading the
/// tables).
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}/{}", std::process::id())
}
