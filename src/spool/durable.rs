//! File-system steps the spool's guarantees rest on: private directories and files, directory
//! fsync, the owner lock, and the free-space check. Linux semantics (rename is atomic within
//! one file system, fsync of a directory opened read-only persists its entries).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::error::SpoolError;

/// Mode of every directory the spool creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every record file.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700. An existing directory keeps its mode:
/// an operator may have widened it on purpose.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SpoolError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| SpoolError::io("create directory", dir, e))
}

/// Creates a new file for writing, failing if it exists, with mode 0600.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Persists the entries of `dir` (a rename or unlink inside it).
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io("fsync directory", dir, e))
}

/// Bytes free on the file system holding `dir`, for unprivileged users.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64, SpoolError> {
    let stat =
        rustix::fs::statvfs(dir).map_err(|e| SpoolError::io("statvfs", dir, io::Error::from(e)))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// How long [`lock_owner`] waits for a previous owner to let go (a restarting proxy's old
/// process may still be exiting, and a just-forked child holds the lock until it execs).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the exclusive owner lock on `<dir>/lock`, waiting up to [`LOCK_WAIT`]; the lock lasts
/// as long as the returned file is open (it is released when a crashed process's descriptors
/// close).
pub(crate) fn lock_owner(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| SpoolError::io("open lock file", &path, e))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(SpoolError::Locked {
                    path: dir.to_owned(),
                });
            }
            Err(e) => return Err(SpoolError::io("lock", &path, io::Error::from(e))),
        }
    }
}

/// Removes a file, treating "already gone" as done.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
