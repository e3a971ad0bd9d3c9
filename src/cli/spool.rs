//! `payload-guard spool list|show|purge`: look at and tidy the spool, also while the proxy
//! runs (the CLI attaches without taking the owner's lock; records move only by atomic rename).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::deliver::spool_config;
use crate::spool::{self, RecordId, Spool, State};

use super::{EXIT_NOINPUT, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, emit};

fn attach(config: &Path) -> Result<(Config, Spool), u8> {
    let config = Config::load(config).map_err(|err| super::config_failed(&err))?;
    let spool = Spool::attach(spool_config(&config.spool)).map_err(|err| {
        eprintln!("payload-guard spool: {err}");
        EXIT_UNAVAILABLE
    })?;
    Ok((config, spool))
}

/// `spool list`: an aligned table of the records in `state`.
pub(super) fn list(config: &Path, route: Option<&str>, state: State) -> u8 {
    let (_, spool) = match attach(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
    match spool.list(state, route) {
        Ok(entries) if entries.is_empty() => {
            emit(&format!(
                "no {state} records in {}\n",
                spool.dir().display()
            ));
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
    let entry = match spool.find(&id) {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            eprintln!(
                "payload-guard spool show: no record {id} in {}",
                spool.dir().display()
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
    let mut out = std::io::stdout().lock();
    match spool.copy_body(entry.state, &id, &mut out) {
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
        return match spool.list(state, None) {
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
    match spool.purge(state, older_than) {
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
