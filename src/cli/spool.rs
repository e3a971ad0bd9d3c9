//! `payload-guard spool list|show|purge`: look at and tidy the spool, also while the proxy
//! runs (the CLI attaches without taking the owner's lock; records move only by atomic rename).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::deliver::spool_config;
use crate::spool::{self, RecordId, Spool, State};

use super::{EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, emit};

fn attach(config: &Path) -> Result<(Config, Spool), u8> {
    let config = Config::load(config).map_err(|err| {
        eprintln!("{err}");
        EXIT_USAGE
    })?;
    let spool = Spool::attach(spool_config(&config.spool)).map_err(|err| {
        eprintln!("payload-guard spool: {err}");
        EXIT_ERROR
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
            EXIT_ERROR
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
            return EXIT_PROBLEMS;
        }
        Err(err) => {
            eprintln!("payload-guard spool show: {err}");
            return EXIT_ERROR;
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
            EXIT_ERROR
        }
    }
}

/// `spool purge --state S --older-than D`: removes records received before now - D.
pub(super) fn purge(config: &Path, state: State, older_than: Duration) -> u8 {
    let (_, spool) = match attach(config) {
        Ok(v) => v,
        Err(code) => return code,
    };
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
            EXIT_ERROR
        }
    }
}
