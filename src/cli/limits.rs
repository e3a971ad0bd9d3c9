//! `payload-guard limits`: what each route has learned about its receiver's limit, with the
//! evidence (sizes, times, request ids), and `--reset ROUTE` to forget it. With a running
//! proxy the reset goes through its admin listener (`POST /limits/reset`), so the proxy's
//! memory and the state file agree; without one, the state file is edited.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::config::units::human_bytes;
use crate::prepare::Policy;
use crate::state::limits::{RouteLearned, read_file, reset_in_file};
use crate::trim::payload::Units;

use super::{EXIT_DATAERR, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, OutputFormat, emit};

/// Runs `payload-guard limits`.
pub(super) fn limits(config_path: &Path, reset: Option<&str>, format: OutputFormat) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    let path = crate::state::limits_path(&config);
    if let Some(route) = reset {
        if config.route(route).is_none() {
            let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
            eprintln!(
                "payload-guard limits: no route named {route:?} in {} (routes: {})",
                config.source.display(),
                names.join(", ")
            );
            return EXIT_USAGE;
        }
        match reset_running(&config, route) {
            Ok(true) => {
                emit(&format!(
                    "{route}: learned limit reset in the running proxy (admin listener)\n"
                ));
                return EXIT_OK;
            }
            Ok(false) => {}
            Err(err) => {
                eprintln!("payload-guard limits: {err}");
                return EXIT_UNAVAILABLE;
            }
        }
        return match reset_in_file(&path, route) {
            Ok(true) => {
                emit(&format!(
                    "{route}: learned limit reset in {}\n",
                    path.display()
                ));
                EXIT_OK
            }
            Ok(false) => {
                emit(&format!("{route}: nothing was learned; nothing to reset\n"));
                EXIT_OK
            }
            Err(err) => {
                eprintln!("payload-guard limits: {err}");
                EXIT_UNAVAILABLE
            }
        };
    }
    let learned = match read_file(&path) {
        Ok(learned) => learned,
        Err(err) => {
            eprintln!("payload-guard limits: {err}");
            return EXIT_DATAERR;
        }
    };
    let find = |name: &str| {
        learned
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    };
    match format {
        OutputFormat::Json => {
            let routes: Vec<serde_json::Value> = config
                .routes
                .iter()
                .map(|r| {
                    let units = Policy::of(r).map_or(Units::Wire, |p| p.units);
                    let l = find(&r.name);
                    serde_json::json!({
                        "route": r.name,
                        "configured": r.upstream_limit_bytes,
                        "units": units.as_str(),
                        "in_force": crate::incident::effective_limit(r.upstream_limit_bytes, &l.bracket(units)),
                        "wire": l.wire,
                        "decoded": l.decoded,
                        "evidence": l.evidence,
                    })
                })
                .collect();
            emit(&format!(
                "{}\n",
                serde_json::json!({ "file": path.display().to_string(), "routes": routes })
            ));
        }
        OutputFormat::Text => {
            let mut out = format!("learned limits ({})\n", path.display());
            for r in &config.routes {
                let units = Policy::of(r).map_or(Units::Wire, |p| p.units);
                out.push_str(&render(
                    &r.name,
                    r.upstream_limit_bytes,
                    units,
                    &find(&r.name),
                ));
            }
            emit(&out);
        }
    }
    EXIT_OK
}

fn size(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "unknown".to_string(),
        |b| format!("{} ({b} bytes)", human_bytes(b)),
    )
}

/// One route's block of the text report.
fn render(name: &str, configured: Option<u64>, units: Units, l: &RouteLearned) -> String {
    let bracket = l.bracket(units);
    let in_force = crate::incident::effective_limit(configured, &bracket);
    let mut out = format!(
        "\nroute {name}\n  configured upstream_limit: {}\n  in force: {} ({} bytes counted)\n",
        size(configured),
        size(in_force),
        units.as_str()
    );
    for (label, b) in [("wire", l.wire), ("decoded", l.decoded)] {
        if b.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "  {label}: largest accepted {}, smallest refused {}\n",
            size(b.largest_accepted),
            size(b.smallest_rejected)
        ));
    }
    if l.evidence.is_empty() {
        out.push_str("  nothing learned\n");
    }
    for e in &l.evidence {
        out.push_str(&format!(
            "  {}  {:<8} {} {} bytes (request {})\n",
            e.at,
            e.verdict,
            e.bytes,
            e.units.as_str(),
            e.request_id
        ));
    }
    out
}

/// Asks a running proxy to reset `route` through its admin listener. `Ok(false)` when no proxy
/// listens there (then the file is edited instead).
fn reset_running(config: &Config, route: &str) -> Result<bool, String> {
    let Some(addr) = config.server.admin_listen else {
        return Ok(false);
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Ok(false);
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    // The token comes from the same environment variable the proxy reads.
    let auth = config
        .server
        .admin_token_env
        .as_deref()
        .and_then(|name| std::env::var(name).ok())
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let query: String = form_urlencoded::byte_serialize(route.as_bytes()).collect();
    let request = format!(
        "POST /limits/reset?route={query} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot talk to the admin listener at {addr}: {e}"))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(true)
    } else {
        Err(format!(
            "the admin listener at {addr} refused the reset ({}): {}",
            if status.is_empty() {
                "no answer"
            } else {
                status
            },
            answer.lines().last().unwrap_or("")
        ))
    }
}
