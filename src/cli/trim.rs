//! `payload-guard trim`: run a route's trim stage on a payload file (or stdin) and write the
//! exact bytes the proxy would forward to stdout, with a report on stderr.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::config::units::human_bytes;
use crate::trim::payload::{self, Encoding};

use super::{EXIT_DATAERR, EXIT_NOINPUT, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE};

/// Trims `file` (stdin when `None`) by `route`'s rules.
pub(super) fn trim(config: &Path, route: &str, file: Option<&Path>) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    match run(&config, route, file) {
        Ok(true) => EXIT_OK,
        Ok(false) => EXIT_PROBLEMS,
        Err((code, err)) => {
            eprintln!("payload-guard trim: {err:#}");
            code
        }
    }
}

/// `Ok(fits)`, or the exit code and why: 64 for a route that cannot trim, 66 for an unreadable
/// payload, 65 for one that is not JSON.
fn run(
    config: &Config,
    route_name: &str,
    file: Option<&Path>,
) -> Result<bool, (u8, anyhow::Error)> {
    let usage = |e: anyhow::Error| (EXIT_USAGE, e);
    let (route, tc, units, limit) = route_for(config, route_name).map_err(usage)?;
    let body = match file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(|e| (EXIT_NOINPUT, e))?,
        None => read_stdin()
            .context("cannot read stdin")
            .map_err(|e| (EXIT_NOINPUT, e))?,
    };
    let _ = route;
    let body = bytes::Bytes::from(body);
    let policy = crate::prepare::Policy {
        rules: &tc.rules,
        units,
        dry_run: false,
        resign: None,
        stamp: None,
    };
    let prepared = crate::trim::Document::parse(&body)
        .map_err(payload::ShrinkError::from)
        .and_then(|doc| {
            crate::prepare::prepare(&policy, &body, &doc, Encoding::Identity, limit, units)
        })
        .with_context(|| {
            format!(
                "cannot trim {}",
                file.map_or("stdin".into(), |p| p.display().to_string())
            )
        })
        .map_err(|e| (EXIT_DATAERR, e))?;
    let Some(mut shrunk) = prepared.shrunk else {
        return Err((
            EXIT_DATAERR,
            anyhow::anyhow!("the trim rules did not run on the payload"),
        ));
    };
    // The bytes to write are the prepared body (the report does not keep a copy).
    shrunk.body = prepared.body.to_vec();
    report(route_name, tc, &body, &shrunk, limit).map_err(|e| (EXIT_NOINPUT, e))?;
    Ok(shrunk.fits)
}

/// All of stdin. Redirected from a file (`< payload.json`), it is read like one: into a buffer
/// of exactly the file's size, in one go, rather than one that doubles as it fills.
fn read_stdin() -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        if file.metadata().is_ok_and(|m| m.is_file()) {
            // `File::read_to_end` reserves the bytes left in the file before reading.
            (&file).read_to_end(&mut body)?;
            return Ok(body);
        }
    }
    std::io::stdin().lock().read_to_end(&mut body)?;
    Ok(body)
}

/// The route, its trim settings, the units its limit counts and the limit to trim to.
fn route_for<'a>(
    config: &'a Config,
    route_name: &str,
) -> anyhow::Result<(
    &'a crate::config::RouteConfig,
    &'a crate::config::TrimConfig,
    payload::Units,
    u64,
)> {
    let Some(route) = config.route(route_name) else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        bail!(
            "no route named {route_name:?} in {} (routes: {})",
            config.source.display(),
            names.join(", ")
        );
    };
    let Some(tc) = route.trim.as_ref() else {
        bail!("route {route_name:?} has no trim rules: add [[routes.trim]] tables to it");
    };
    let units = tc.limit_counts.units();
    let learned = crate::state::LearnedLimits::open(crate::state::limits_path(config));
    let Some(limit) = learned.limit(route_name, units, route.upstream_limit_bytes) else {
        bail!(
            "route {route_name:?} has no upstream_limit (and none was learned yet): nothing to trim to"
        );
    };
    Ok((route, tc, units, limit))
}

/// Writes the trimmed bytes to stdout and the report to stderr.
fn report(
    route_name: &str,
    tc: &crate::config::TrimConfig,
    body: &[u8],
    shrunk: &payload::Shrunk,
    limit: u64,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&shrunk.body)
        .context("cannot write stdout")?;
    stdout.flush().context("cannot write stdout")?;

    let mut report = format!(
        "route {route_name}: {} -> {} (target {}, {} bytes)\n",
        human_bytes(body.len() as u64),
        human_bytes(shrunk.body.len() as u64),
        human_bytes(limit),
        limit
    );
    if shrunk.applied.is_empty() {
        report.push_str("  nothing removed: the payload already fits\n");
    }
    for a in &shrunk.applied {
        let rule = &tc.specs[a.rule];
        let what = match a.marked {
            // The marker's number is what was cut; the body shrank by that less the marker.
            Some(cut) => format!(
                "{cut} bytes removed (as its marker says), the body {} bytes smaller",
                a.removed
            ),
            None => format!("{} bytes removed", a.removed),
        };
        report.push_str(&format!(
            "  rule {} ({} {}): {}: {what}\n",
            a.rule,
            rule.path,
            super::check::describe_action(&rule.action),
            a.path,
        ));
    }
    report.push_str(if shrunk.fits {
        "fits: yes\n"
    } else {
        "fits: no (the smallest result was written; the rules cannot reach the target)\n"
    });
    eprint!("{report}");
    Ok(())
}
