//! A small JSON state file, rewritten whole and atomically: a temporary file beside it,
//! fsynced, renamed over the old one, and the folder fsynced. Changes mark it dirty; a
//! background task (or [`StateFile::flush`]) writes the latest contents.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// One state file and its dirty flag.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    dirty: AtomicBool,
    changed: Notify,
    /// One writer at a time; the state is serialized under it, so the last write is the
    /// latest state.
    writing: Mutex<()>,
}

impl StateFile {
    /// A state file at `path` (not read or written yet).
    pub fn new(path: PathBuf) -> StateFile {
        StateFile {
            path,
            dirty: AtomicBool::new(false),
            changed: Notify::new(),
            writing: Mutex::new(()),
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses the file: `T::default()` when it does not exist, and also (with a
    /// WARN line naming `what`) when it cannot be read or parsed: start-up never fails
    /// because of a state file.
    pub fn load<T: serde::de::DeserializeOwned + Default>(&self, what: &str) -> T {
        match self.read() {
            Ok(None) => T::default(),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::warn!(path = %self.path.display(), error = %err, "{what} file is corrupt: starting without it");
                T::default()
            }),
            Err(err) => {
                tracing::warn!(path = %self.path.display(), error = %err, "cannot read the {what} file: starting without it");
                T::default()
            }
        }
    }

    /// Reads the file; `Ok(None)` when it does not exist.
    pub fn read(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Notes a change: the background writer (if any) writes soon.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Writes `contents` atomically if the file is dirty (blocking I/O).
    pub fn flush_with(&self, contents: impl FnOnce() -> Vec<u8>) -> std::io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let result = write_atomically(&self.path, &contents());
        if result.is_err() {
            // Keep it dirty: the next change (or flush) tries again.
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    /// Runs a task that writes the file after each change until the process ends. `contents`
    /// serializes the current state; it runs on a blocking thread.
    pub fn spawn_writer<F>(self: &Arc<Self>, contents: F)
    where
        F: Fn() -> Vec<u8> + Send + Sync + 'static,
    {
        let file = self.clone();
        let contents = Arc::new(contents);
        tokio::spawn(async move {
            loop {
                file.changed.notified().await;
                let (f, c) = (file.clone(), contents.clone());
                let written = tokio::task::spawn_blocking(move || f.flush_with(|| c())).await;
                if let Ok(Err(err)) = written {
                    tracing::error!(path = %file.path.display(), error = %err, "cannot write state file; will retry on the next change");
                }
            }
        });
    }
}

/// State kept in memory and persisted to a [`StateFile`].
pub trait Persisted: Send + Sync + 'static {
    /// The file, when the state is persisted.
    fn file(&self) -> Option<&Arc<StateFile>>;

    /// The state as the file's contents.
    fn serialize(&self) -> Vec<u8>;

    /// Starts the background writer (inside a tokio runtime).
    fn spawn_writer(self: &Arc<Self>)
    where
        Self: Sized,
    {
        if let Some(file) = self.file() {
            let me = Arc::downgrade(self);
            file.spawn_writer(move || me.upgrade().map(|m| m.serialize()).unwrap_or_default());
        }
    }

    /// Writes the file now if anything changed (blocking I/O; for shutdown and the CLI).
    fn flush(&self) -> std::io::Result<()> {
        match self.file() {
            Some(file) => file.flush_with(|| self.serialize()),
            None => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_when_dirty_and_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("s.json"));
        file.flush_with(|| b"never".to_vec()).unwrap();
        assert!(file.read().unwrap().is_none());
        file.mark_dirty();
        file.flush_with(|| b"one".to_vec()).unwrap();
        assert_eq!(file.read().unwrap().unwrap(), b"one");
        file.flush_with(|| b"two".to_vec()).unwrap();
        assert_eq!(file.read().unwrap().unwrap(), b"one");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
