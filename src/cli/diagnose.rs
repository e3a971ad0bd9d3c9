//! `payload-guard diagnose`: read the incident log and explain each route's 413s, with the
//! setting to change or the trim rule that would have saved the most.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::{Config, StoreBackend};
use crate::incident::diagnose::{self, RouteInfo};

use super::{EXIT_NOINPUT, EXIT_OK, EXIT_SOFTWARE, OutputFormat, emit};

/// Prints the diagnosis of the incident log named by `config`.
pub(super) fn diagnose(
    config: &Path,
    since: Option<Duration>,
    route: Option<&str>,
    format: OutputFormat,
) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    let since = since.map(|d| SystemTime::now() - d);
    let (read, source) = match &config.incidents.backend {
        StoreBackend::Disk => {
            let path = &config.incidents.path;
            match diagnose::read_log(path, since, route) {
                Ok(read) => (read, path.clone()),
                Err(err) => {
                    eprintln!("payload-guard diagnose: {err}");
                    return EXIT_NOINPUT;
                }
            }
        }
        StoreBackend::Postgres { url_env } => match read_table(url_env) {
            Ok((lines, source)) => (diagnose::read_lines(&lines, since, route), source),
            Err(err) => {
                eprintln!("payload-guard diagnose: {err}");
                return super::EXIT_UNAVAILABLE;
            }
        },
    };
    let path = &source;
    for warning in &read.warnings {
        eprintln!("warning: {}: {warning}", path.display());
    }
    if let Some(message) = read.nothing_to_diagnose(path) {
        match format {
            OutputFormat::Text => emit(&format!("{message}\n")),
            OutputFormat::Json => emit(&format!(
                "{}\n",
                serde_json::json!({"incidents": 0, "routes": [], "message": message})
            )),
        }
        return EXIT_OK;
    }
    let routes: Vec<RouteInfo> = config.routes.iter().map(RouteInfo::of).collect();
    let report = diagnose::diagnose(&read.incidents, &routes);
    match format {
        OutputFormat::Text => emit(&diagnose::render_text(&report)),
        OutputFormat::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => emit(&format!("{json}\n")),
            Err(err) => {
                eprintln!("payload-guard diagnose: cannot encode the report: {err}");
                return EXIT_SOFTWARE;
            }
        },
    }
    EXIT_OK
}

/// Every replica's incident lines from the shared table, and how to name it in messages.
fn read_table(url_env: &str) -> Result<(Vec<String>, std::path::PathBuf), crate::db::DbError> {
    let db = crate::db::Database::from_env(url_env, 1)?;
    let source =
        std::path::PathBuf::from(format!("{} (table payload_guard_incidents)", db.display()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| db.unavailable(&format!("cannot start the async runtime: {e}")))?;
    let lines = runtime.block_on(crate::incident::table::read_lines(&db))?;
    Ok((lines, source))
}
