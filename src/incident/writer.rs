//! The incident log writer: requests hand incidents to a bounded queue without waiting, and one
//! task appends them to the JSONL file, one `write_all` and one flush per line.
//!
//! The request path never blocks and never fails because of the log: when the queue is full,
//! or the file cannot be opened or written, the incident goes to the tracing log (WARN, with the
//! whole JSON line) and the `dropped` counter goes up. A file that could not be opened is tried
//! again on the next incident, so a log directory that appears later is picked up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::Incident;

/// Work for the writer task, in queue order.
#[derive(Debug)]
enum Message {
    /// Append this incident.
    Write(Box<Incident>),
    /// Everything queued before this is written (or dropped): tell the waiter.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
}

/// A handle to the incident log; clones share one queue and one writer task.
#[derive(Debug, Clone)]
pub struct IncidentLog {
    /// `None` for a disabled log (no `[incidents] path`, or tests).
    tx: Option<mpsc::Sender<Message>>,
    counters: Arc<Counters>,
}

impl IncidentLog {
    /// Starts the writer task for `path` on the current tokio runtime, with a queue of
    /// `capacity` incidents (at least 1). The file is opened on the first incident, in
    /// append mode, creating it and its parent directories.
    ///
    /// # Panics
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn start(path: PathBuf, capacity: usize) -> IncidentLog {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        tokio::spawn(run_writer(path, rx, Arc::clone(&counters)));
        IncidentLog {
            tx: Some(tx),
            counters,
        }
    }

    /// A log that writes no file: incidents only go to tracing, and nothing is counted.
    pub fn disabled() -> IncidentLog {
        IncidentLog {
            tx: None,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Records an incident: a line in the file soon (its log line is the caller's, once:
    /// see `proxy::log_incident`). Never waits; on a full queue the incident is logged
    /// through tracing in full and counted as dropped.
    pub fn record(&self, incident: Incident) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(Message::Write(Box::new(incident))) {
            let (reason, incident) = match e {
                mpsc::error::TrySendError::Full(Message::Write(i)) => ("queue full", i),
                mpsc::error::TrySendError::Closed(Message::Write(i)) => ("writer task stopped", i),
                // Only `Write` messages are sent here.
                _ => return,
            };
            self.drop_incident(&incident, reason);
        }
    }

    /// Waits until every incident recorded before this call is written or dropped. For tests
    /// and shutdown; returns at once for a disabled log or a stopped writer.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Incidents written to the file so far.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Incidents that could not be written (queue full, file unwritable) and went only to the
    /// tracing log.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    fn drop_incident(&self, incident: &Incident, reason: &str) {
        drop_incident(&self.counters, incident, reason, None);
    }
}

/// Counts an incident as dropped and puts the whole record in the tracing log, so that it is
/// not lost.
fn drop_incident(counters: &Counters, incident: &Incident, reason: &str, error: Option<&str>) {
    counters.dropped.fetch_add(1, Ordering::Relaxed);
    let line = incident.to_line();
    tracing::warn!(
        reason,
        error,
        incident = line.trim_end(),
        "incident not written to the incident log"
    );
}

async fn run_writer(path: PathBuf, mut rx: mpsc::Receiver<Message>, counters: Arc<Counters>) {
    let mut file: Option<File> = None;
    while let Some(message) = rx.recv().await {
        match message {
            Message::Flush(done) => {
                let _ = done.send(());
            }
            Message::Write(incident) => {
                let line = incident.to_line();
                match write_line(&path, &mut file, line.as_bytes()).await {
                    Ok(()) => {
                        counters.written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // Reopen on the next incident: the disk may have been freed, the
                        // directory created or the file rotated away.
                        file = None;
                        let error = format!("{}: {e}", path.display());
                        drop_incident(&counters, &incident, "write failed", Some(&error));
                    }
                }
            }
        }
    }
}

async fn write_line(path: &Path, file: &mut Option<File>, line: &[u8]) -> std::io::Result<()> {
    let f = match file {
        Some(f) => f,
        None => file.insert(open_append(path).await?),
    };
    // One write_all of the whole line: with O_APPEND, other processes appending to the same
    // file never split it. The flush pushes tokio's buffer to the kernel before the next line.
    f.write_all(line).await?;
    f.flush().await
}

async fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::super::Kind;
    use super::*;

    fn incident(i: usize) -> Incident {
        let mut inc = Incident::new(Kind::OverUpstreamLimit, "synthflow", format!("req-{i}"));
        inc.body_bytes = Some(1_000_000 + i as u64);
        inc.upstream_snippet = Some("x".repeat(200));
        inc
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_make_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/incidents.jsonl");
        let log = IncidentLog::start(path.clone(), 256);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(incident(i)) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.flush().await;
        assert_eq!(log.written(), 100);
        assert_eq!(log.dropped(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let ids: HashSet<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Incident>(l).unwrap().request_id)
            .collect();
        assert_eq!(text.lines().count(), 100);
        assert_eq!(ids.len(), 100);
    }

    #[tokio::test]
    async fn appends_to_an_existing_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.jsonl");
        std::fs::write(&path, incident(0).to_line()).unwrap();
        let log = IncidentLog::start(path.clone(), 4);
        log.record(incident(1));
        log.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[tokio::test]
    async fn unwritable_path_drops_without_panicking_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "a regular file").unwrap();
        let path = blocker.join("incidents.jsonl");
        let log = IncidentLog::start(path.clone(), 16);
        for i in 0..5 {
            log.record(incident(i));
        }
        log.flush().await;
        assert_eq!(log.dropped(), 5);
        assert_eq!(log.written(), 0);
        // The parent becomes a directory: the next incident opens the file.
        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir(&blocker).unwrap();
        log.record(incident(5));
        log.flush().await;
        assert_eq!(log.written(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_queue_drops_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let log = IncidentLog::start(dir.path().join("incidents.jsonl"), 2);
        // On a current-thread runtime the writer cannot run until this task yields, so the
        // queue holds exactly 2 and the rest are dropped on the spot.
        for i in 0..10 {
            log.record(incident(i));
        }
        assert_eq!(log.dropped(), 8);
        log.flush().await;
        assert_eq!(log.written(), 2);
    }

    #[tokio::test]
    async fn disabled_log_writes_nothing() {
        let log = IncidentLog::disabled();
        log.record(incident(0));
        log.flush().await;
        assert_eq!((log.written(), log.dropped()), (0, 0));
    }
}
