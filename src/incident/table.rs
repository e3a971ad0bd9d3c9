//! `[incidents] backend = "postgres"`: every incident also goes to the shared table
//! `payload_guard_incidents` (one row per JSONL line, with the replica that wrote it), so
//! `payload-guard diagnose` sees the incidents of every replica. The JSONL file stays the
//! primary record: the table is fed by its own task with its own bounded queue, so an
//! unreachable database never delays or drops a line of the file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::db::{Database, DbError, OPERATION_TIMEOUT};

/// Incidents waiting for the table beyond this are not written to it (the file has them).
const TABLE_QUEUE: usize = 1024;

/// A handle to the incident table's writer task.
#[derive(Debug, Clone)]
pub struct IncidentTable {
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

impl IncidentTable {
    /// Starts the task that inserts lines into `db`'s incident table (on the current tokio
    /// runtime).
    pub fn start(db: Database) -> IncidentTable {
        let (tx, rx) = mpsc::channel(TABLE_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(db, rx, dropped.clone()));
        IncidentTable { tx, dropped }
    }

    /// Queues one JSON line (without its newline); never waits.
    pub fn insert(&self, line: &str) {
        if self.tx.try_send(line.to_owned()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                reason = "queue full",
                "incident not written to the incident table (it is in the incident file)"
            );
        }
    }

    /// Lines that could not be written to the table.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn run(db: Database, mut rx: mpsc::Receiver<String>, dropped: Arc<AtomicU64>) {
    let replica = crate::spool::pg::replica_name();
    while let Some(line) = rx.recv().await {
        let insert = async {
            let client = db.client().await?;
            client
                .execute(
                    "INSERT INTO payload_guard_incidents (replica, incident) VALUES ($1, $2)",
                    &[&replica, &line],
                )
                .await
                .map_err(|e| db.error(&e))
        };
        let result = match tokio::time::timeout(OPERATION_TIMEOUT, insert).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(db.unavailable("no answer")),
        };
        if let Err(e) = result {
            dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "incident not written to the incident table (it is in the incident file)");
        }
    }
}

/// Every incident line in the table, oldest first (for `diagnose`).
pub async fn read_lines(db: &Database) -> Result<Vec<String>, DbError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT incident FROM payload_guard_incidents ORDER BY seq",
            &[],
        )
        .await
        .map_err(|e| db.error(&e))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
