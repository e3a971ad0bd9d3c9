//! Start-up recovery for the owning process: clear `tmp/`, hand claims left by a crashed
//! process back to `ready/`, verify every record and quarantine the bad ones. Nothing found on
//! disk makes recovery fail; only the spool directories themselves being unusable does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::durable;
use super::error::SpoolError;
use super::id::RecordId;
use super::record::RecordFile;
use super::{INFLIGHT, QUARANTINE, State, TMP};

/// What start-up recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Unfinished writes removed from `tmp/` (torn commits, abandoned staging files).
    pub tmp_removed: usize,
    /// Claims left in `inflight/` by a process that stopped, moved back to `ready/`.
    pub claims_recovered: usize,
    /// Records (or stray files) moved to `quarantine/`.
    pub quarantined: Vec<Quarantined>,
    /// Valid records in `ready/`.
    pub ready: usize,
    /// Valid records in `dead/`.
    pub dead: usize,
    /// Valid records in `archive/`.
    pub archive: usize,
    /// Bytes of all valid records.
    pub bytes: u64,
}

/// One file moved to `quarantine/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now; `None` when it could not be moved (it stays, and is skipped).
    pub to: Option<PathBuf>,
    /// Why.
    pub reason: String,
}

pub(crate) fn recover(root: &Path) -> Result<RecoveryReport, SpoolError> {
    let mut report = RecoveryReport::default();
    clear_tmp(root, &mut report)?;
    recover_claims(root, &mut report)?;
    for state in State::ALL {
        verify_state(root, state, &mut report)?;
    }
    if !report.quarantined.is_empty() {
        durable::fsync_dir(&root.join(QUARANTINE))?;
    }
    tracing::info!(
        dir = %root.display(),
        ready = report.ready,
        dead = report.dead,
        archive = report.archive,
        bytes = report.bytes,
        tmp_removed = report.tmp_removed,
        claims_recovered = report.claims_recovered,
        quarantined = report.quarantined.len(),
        "spool opened"
    );
    Ok(report)
}

fn read_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, SpoolError> {
    let entries = fs::read_dir(dir).map_err(|e| SpoolError::io("read directory", dir, e))?;
    let mut names: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    names.sort();
    Ok(names)
}

fn clear_tmp(root: &Path, report: &mut RecoveryReport) -> Result<(), SpoolError> {
    let tmp = root.join(TMP);
    for (_, path) in read_dir(&tmp)? {
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => report.tmp_removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove leftover spool tmp file")
            }
        }
    }
    if report.tmp_removed > 0 {
        tracing::info!(
            removed = report.tmp_removed,
            "removed unfinished spool writes"
        );
        durable::fsync_dir(&tmp)?;
    }
    Ok(())
}

fn recover_claims(root: &Path, report: &mut RecoveryReport) -> Result<(), SpoolError> {
    let inflight = root.join(INFLIGHT);
    let ready = root.join(State::Ready.as_str());
    for (name, path) in read_dir(&inflight)? {
        if RecordId::parse(&name).is_err() {
            push_quarantine(
                root,
                State::Ready,
                &path,
                "file name is not a record id",
                report,
            );
            continue;
        }
        let target = ready.join(&name);
        let result = if target.exists() {
            // Cannot happen with this module's rename order; the ready copy is the newer one.
            fs::remove_file(&path)
        } else {
            fs::rename(&path, &target)
        };
        match result {
            Ok(()) => report.claims_recovered += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not recover spool claim")
            }
        }
    }
    if report.claims_recovered > 0 {
        tracing::info!(
            recovered = report.claims_recovered,
            "spool claims left by a stopped process are ready again"
        );
        durable::fsync_dir(&ready)?;
        durable::fsync_dir(&inflight)?;
    }
    Ok(())
}

fn verify_state(root: &Path, state: State, report: &mut RecoveryReport) -> Result<(), SpoolError> {
    let dir = root.join(state.as_str());
    let mut moved = false;
    for (name, path) in read_dir(&dir)? {
        if RecordId::parse(&name).is_err() || !path.is_file() {
            push_quarantine(root, state, &path, "not a spool record file", report);
            moved = true;
            continue;
        }
        let checked = RecordFile::open(&path).and_then(|mut file| {
            file.verify()?;
            Ok(file.header.record_len())
        });
        match checked {
            Ok(len) => {
                report.bytes += len;
                match state {
                    State::Ready => report.ready += 1,
                    State::Dead => report.dead += 1,
                    State::Archive => report.archive += 1,
                }
            }
            Err(e) => {
                let reason = match e {
                    SpoolError::Corrupt { reason, .. } => reason,
                    other => other.to_string(),
                };
                push_quarantine(root, state, &path, &reason, report);
                moved = true;
            }
        }
    }
    if moved {
        durable::fsync_dir(&dir)?;
    }
    Ok(())
}

fn push_quarantine(
    root: &Path,
    state: State,
    path: &Path,
    reason: &str,
    report: &mut RecoveryReport,
) {
    let to = match quarantine(root, state, path, reason) {
        Ok(to) => Some(to),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "could not quarantine bad spool record; it stays and is skipped");
            None
        }
    };
    report.quarantined.push(Quarantined {
        from: path.to_owned(),
        to,
        reason: reason.to_owned(),
    });
}

/// Moves `path` to `quarantine/<state>-<name>` (with a numeric suffix if taken), logging why.
pub(crate) fn quarantine(
    root: &Path,
    state: State,
    path: &Path,
    reason: &str,
) -> Result<PathBuf, SpoolError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = root.join(QUARANTINE);
    let mut to = dir.join(format!("{state}-{name}"));
    let mut suffix = 1;
    while to.exists() {
        to = dir.join(format!("{state}-{name}.{suffix}"));
        suffix += 1;
    }
    fs::rename(path, &to).map_err(|e| SpoolError::io("rename", path, e))?;
    tracing::warn!(
        from = %path.display(),
        to = %to.display(),
        reason,
        "spool record quarantined"
    );
    Ok(to)
}
