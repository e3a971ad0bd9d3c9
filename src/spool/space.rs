//! Space accounting: `max_bytes` over the records kept (ready, inflight, dead, archive) and
//! `min_free` on the disk. Bytes are reserved before they are written, so concurrent commits
//! cannot together pass the limit; a reservation that is not kept is given back on drop.
//!
//! The count lives in memory. Another process (the CLI purging) changes the disk behind it,
//! so before refusing with `Full` the spool recounts the files on disk, at most once a second.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::durable;
use super::error::SpoolError;

/// How often a `Full` refusal may trigger a recount of the disk.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Space {
    root: PathBuf,
    counted_dirs: Vec<PathBuf>,
    pub(crate) max_bytes: u64,
    min_free: u64,
    /// Bytes of record files on disk in the counted directories.
    committed: AtomicU64,
    /// Bytes reserved by writes in progress.
    reserved: AtomicU64,
    last_rescan: Mutex<Option<Instant>>,
}

impl Space {
    pub(crate) fn new(
        root: PathBuf,
        counted_dirs: Vec<PathBuf>,
        max_bytes: u64,
        min_free: u64,
        committed: u64,
    ) -> Arc<Space> {
        Arc::new(Space {
            root,
            counted_dirs,
            max_bytes,
            min_free,
            committed: AtomicU64::new(committed),
            reserved: AtomicU64::new(0),
            last_rescan: Mutex::new(None),
        })
    }

    /// Committed plus reserved bytes.
    pub(crate) fn used(&self) -> u64 {
        self.committed
            .load(Ordering::Acquire)
            .saturating_add(self.reserved.load(Ordering::Acquire))
    }

    /// A reservation of `bytes`, or `Full`.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, SpoolError> {
        let mut reservation = Reservation {
            space: Arc::clone(self),
            bytes: 0,
        };
        reservation.grow(bytes)?;
        Ok(reservation)
    }

    /// A reservation that ignores `max_bytes`: rewriting a record already in the spool must not
    /// fail because the spool filled up meanwhile.
    pub(crate) fn reserve_unchecked(self: &Arc<Self>, bytes: u64) -> Reservation {
        self.reserved.fetch_add(bytes, Ordering::AcqRel);
        Reservation {
            space: Arc::clone(self),
            bytes,
        }
    }

    /// `LowDisk` when writing `more_bytes` would leave less than `min_free` on the disk.
    pub(crate) fn check_free(&self, more_bytes: u64) -> Result<(), SpoolError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = durable::free_bytes(&self.root)?;
        if free.saturating_sub(more_bytes) < self.min_free {
            return Err(SpoolError::LowDisk {
                free,
                min: self.min_free,
            });
        }
        Ok(())
    }

    /// A record of `bytes` left the counted directories.
    pub(crate) fn forget(&self, bytes: u64) {
        let _ = self
            .committed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(bytes))
            });
    }

    fn try_take(&self, bytes: u64) -> Result<(), u64> {
        let committed = self.committed.load(Ordering::Acquire);
        let mut reserved = self.reserved.load(Ordering::Acquire);
        loop {
            let used = committed.saturating_add(reserved).saturating_add(bytes);
            if used > self.max_bytes {
                return Err(used);
            }
            match self.reserved.compare_exchange_weak(
                reserved,
                reserved + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => reserved = actual,
            }
        }
    }

    fn take(&self, bytes: u64) -> Result<(), SpoolError> {
        match self.try_take(bytes) {
            Ok(()) => Ok(()),
            Err(used) => {
                if self.rescan_due() {
                    self.rescan();
                    if self.try_take(bytes).is_ok() {
                        return Ok(());
                    }
                }
                Err(SpoolError::Full {
                    used,
                    max: self.max_bytes,
                })
            }
        }
    }

    fn rescan_due(&self) -> bool {
        let mut last = self.last_rescan.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Recounts the record files on disk (another process may have removed some).
    pub(crate) fn rescan(&self) {
        let total = self.counted_dirs.iter().map(|d| dir_bytes(d)).sum::<u64>();
        self.committed.store(total, Ordering::Release);
    }
}

/// Bytes of the regular files directly in `dir`; unreadable entries count as 0.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Bytes reserved for a write in progress.
#[derive(Debug)]
pub(crate) struct Reservation {
    space: Arc<Space>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `more` bytes on top, or `Full`.
    pub(crate) fn grow(&mut self, more: u64) -> Result<(), SpoolError> {
        self.space.take(more)?;
        self.bytes += more;
        Ok(())
    }

    /// The write landed as a record of `file_len` bytes in a counted directory.
    pub(crate) fn keep(mut self, file_len: u64) {
        self.space.committed.fetch_add(file_len, Ordering::AcqRel);
        self.give_back();
    }

    fn give_back(&mut self) {
        self.space.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_kept_or_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path().into(), vec![dir.path().into()], 100, 0, 0);
        let mut a = space.reserve(60).unwrap();
        assert!(matches!(
            space.reserve(50),
            Err(SpoolError::Full {
                used: 110,
                max: 100
            })
        ));
        a.grow(40).unwrap();
        assert!(a.grow(1).is_err());
        a.keep(90);
        assert_eq!(space.used(), 90);
        let b = space.reserve(10).unwrap();
        drop(b);
        assert_eq!(space.used(), 90);
        space.forget(90);
        assert_eq!(space.used(), 0);
    }

    #[test]
    fn full_recounts_the_disk_before_refusing() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path().into(), vec![dir.path().into()], 100, 0, 100);
        // The in-memory count says full, the disk holds 10 bytes.
        std::fs::write(dir.path().join("x"), [0u8; 10]).unwrap();
        space.reserve(50).unwrap().keep(50);
        assert_eq!(space.used(), 60);
    }
}
