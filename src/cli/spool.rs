//! `payload-guard spool list|show|purge`: look at and tidy the spool, also while the proxy
//! runs (the CLI attaches without taking the owner's lock; disk records move only by atomic
//! rename, database rows only in transactions), on either backend.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::spool::{self, RecordId, State, Store};

use super::{EXIT_NOINPUT, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE, emit};

/// Loads the config and attaches to its spool (without the owner's lock or recovery).
fn attach(config: &Path) -> Result<(Config, Store), u8> {
    let config = Config::load(config).map_err(|err| super::config_failed(&err))?;
    let spool = spool::store::open(&config.spool, false).map_err(|err| {
        eprintln!("payload-guard spool: {err}");
        EXIT_UNAVAILABLE
    })?;
    Ok((config, spool))
}

/// Runs one spool call to completion on a current-thread runtime.
fn block_on<T>(future: impl Future<Output = T>) -> Result<T, u8> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Ok(rt.block_on(future)),
        Err(err) => {
            eprintln!("payload-guard spool: cannot start the async runtime: {err}");
            Err(EXIT_SOFTWARE)
        }
    }
}

/// `spool list`: an aligned table of the records in `state`.
pub(super) fn list(config: &Path, route: Option<&str>, state: State) -> u8 {
    let (_, spool) = match attach(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let listed = match block_on(spool.list(state, route)) {
        Ok(listed) => listed,
        Err(code) => return code,
    };
    match listed {
        Ok(entries) if entries.is_empty() => {
            emit(&format!("no {state} records in {}\n", spool.location()));
            EXIT_OK
        }
        Ok(entries) => {
            emit(&spool::render_list(&entries, SystemTime::now()));
            EXIT_OK
        }
        Err(err) => {
            eprintln!("payload-guard spool list: {err}");
            EXIT_UNAVAILABLE
        }
    }
}

/// `spool show ID [--body]`: a record's metadata, or its exact body bytes.
pub(super) fn show(config: &Path, id: &str, body: bool) -> u8 {
    let (_, spool) = match attach(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let id: RecordId = match id.parse() {
        Ok(id) => id,
        Err(err) => {
            eprintln!("payload-guard spool show: {err}");
            return EXIT_USAGE;
        }
    };
    let found = match block_on(spool.find(&id)) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let entry = match found {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            eprintln!(
                "payload-guard spool show: no record {id} in {}",
                spool.location()
            );
            return EXIT_NOINPUT;
        }
        Err(err) => {
            eprintln!("payload-guard spool show: {err}");
            return EXIT_UNAVAILABLE;
        }
    };
    if !body {
        emit(&spool::render_show(&entry));
        return EXIT_OK;
    }
    let mut out = std::io::stdout();
    let copied = match block_on(spool.copy_body(entry.state, &id, &mut out)) {
        Ok(copied) => copied,
        Err(code) => return code,
    };
    match copied {
        Ok(_) => {
            let _ = out.flush();
            EXIT_OK
        }
        Err(err) => {
            eprintln!("payload-guard spool show: {err}");
            EXIT_UNAVAILABLE
        }
    }
}

/// `spool purge --state S --older-than D`: removes records received before now - D.
pub(super) fn purge(config: &Path, state: State, older_than: Duration, dry_run: bool) -> u8 {
    let (_, spool) = match attach(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if dry_run {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let listed = match block_on(spool.list(state, None)) {
            Ok(listed) => listed,
            Err(code) => return code,
        };
        return match listed {
            Ok(entries) => {
                let old: Vec<_> = entries
                    .into_iter()
                    .filter(|e| e.meta.received_at < cutoff)
                    .collect();
                let mut out = String::new();
                if !old.is_empty() {
                    out.push_str(&spool::render_list(&old, SystemTime::now()));
                }
                out.push_str(&format!(
                    "would remove {} {state} record{} older than {} (dry run: nothing removed)\n",
                    old.len(),
                    if old.len() == 1 { "" } else { "s" },
                    humantime::format_duration(older_than)
                ));
                emit(&out);
                EXIT_OK
            }
            Err(err) => {
                eprintln!("payload-guard spool purge: {err}");
                EXIT_UNAVAILABLE
            }
        };
    }
    let purged = match block_on(spool.purge(state, older_than)) {
        Ok(purged) => purged,
        Err(code) => return code,
    };
    match purged {
        Ok(n) => {
            emit(&format!(
                "removed {n} {state} record{} older than {}\n",
                if n == 1 { "" } else { "s" },
                humantime::format_duration(older_than)
            ));
            EXIT_OK
        }
        Err(err) => {
            eprintln!("payload-guard spool purge: {err}");
            EXIT_UNAVAILABLE
        }
    }
}
