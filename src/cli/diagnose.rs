//! `payload-guard diagnose`: read the incident log and explain each route's 413s, with the
//! setting to change or the trim rule that would have saved the most.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::Config;
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
    let path = &config.incidents.path;
    let read = match diagnose::read_log(path, since, route) {
        Ok(read) => read,
        Err(err) => {
            eprintln!("payload-guard diagnose: {err}");
            return EXIT_NOINPUT;
        }
    };
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
