//! `payload-guard check`: validate the configuration and print the effective routes.

use std::path::Path;

use crate::config::units::both_forms;
use crate::config::{Config, OnOversize, OnTrimFailure, Resign, RouteConfig};
use crate::trim::{ActionSpec, Keep};

use super::EXIT_OK;

/// Validates `path`; prints the routes and any warnings (exit 0) or every mistake (exit 65;
/// 66 when the file cannot be read).
pub(super) fn check(path: &Path) -> u8 {
    match Config::load(path) {
        Ok(config) => {
            if !config.warnings.is_empty() {
                eprint!("{}", config.warnings.render());
            }
            super::emit(&describe(&config));
            EXIT_OK
        }
        Err(err) => super::config_failed(&err),
    }
}

/// The effective configuration as an aligned table.
pub(super) fn describe(config: &Config) -> String {
    let mut out = format!("{}: ok\n", config.source.display());
    out.push_str(&format!("listen {}", config.server.listen));
    if let Some(admin) = config.server.admin_listen {
        out.push_str(&format!(", admin {admin}"));
    }
    out.push('\n');
    out.push_str(&format!(
        "buffer_budget {}, max_header_bytes {}",
        both_forms(config.server.buffer_budget_bytes),
        both_forms(config.server.max_header_bytes as u64)
    ));
    if config.spool.used {
        out.push_str(&format!(
            ", spool max_bytes {}, min_free {}",
            both_forms(config.spool.max_bytes),
            both_forms(config.spool.min_free)
        ));
    }
    out.push('\n');
    let mut rows = vec![[
        "route".to_string(),
        "path_prefix".to_string(),
        "upstream".to_string(),
        "max_body".to_string(),
        "upstream_limit".to_string(),
        "on_oversize".to_string(),
    ]];
    for r in &config.routes {
        rows.push([
            r.name.clone(),
            r.path_prefix.clone(),
            r.upstream.to_string(),
            both_forms(r.max_body_bytes),
            r.upstream_limit_bytes
                .map_or_else(|| "unknown (learned)".to_string(), both_forms),
            match r.on_oversize {
                OnOversize::Forward => "forward",
                OnOversize::Reject => "reject",
                OnOversize::Trim => "trim",
            }
            .to_string(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for r in &config.routes {
        if let Some(line) = describe_sender(r) {
            out.push_str(&line);
        }
    }
    for r in &config.routes {
        let Some(tc) = &r.trim else { continue };
        out.push_str(&format!(
            "trim rules of {}{} (protect: {}; on_trim_failure: {}{}):\n",
            r.name,
            match (r.sender, r.trim.as_ref()) {
                (Some(p), Some(tc)) if tc.specs == p.rule_specs() => {
                    format!(", from sender {}", p.sender)
                }
                _ => String::new(),
            },
            tc.protect.join(", "),
            match tc.on_failure {
                OnTrimFailure::Reject => "reject",
                OnTrimFailure::Forward => "forward",
            },
            if tc.dry_run { "; dry run" } else { "" }
        ));
        for (i, spec) in tc.specs.iter().enumerate() {
            out.push_str(&format!(
                "  {i}. {} {}\n",
                spec.path,
                describe_action(&spec.action)
            ));
        }
    }
    out
}

/// The route's sender and signature settings in effect (preset values included), one line.
fn describe_sender(r: &RouteConfig) -> Option<String> {
    if r.sender.is_none() && r.verify.is_none() {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(p) = r.sender {
        parts.push(format!("sender {}", p.sender));
    }
    parts.push(format!("id_path {}", r.id_path));
    match &r.verify {
        None => parts.push("not verified (no [routes.verify])".to_string()),
        Some(v) => {
            let scheme = v.verifier.scheme();
            parts.push(format!("scheme {}", scheme.as_str()));
            let headers: Vec<&str> = v
                .verifier
                .header_names()
                .iter()
                .map(|h| h.as_str())
                .collect();
            parts.push(format!("header {}", headers.join(" | ")));
            parts.push(format!("secret_env {}", v.secret_env));
            if scheme.has_timestamp() {
                parts.push(format!(
                    "tolerance {}",
                    humantime::format_duration(v.verifier.tolerance())
                ));
            }
            if let Some(url) = &v.public_url {
                parts.push(format!("public_url {url}"));
            }
            parts.push(match &v.resign {
                None => "resign off".to_string(),
                Some(Resign::Same) => "resign same".to_string(),
                Some(Resign::Header(h)) => format!(
                    "resign into {}",
                    h.header_names().first().map_or("", |n| n.as_str())
                ),
            });
        }
    }
    Some(format!("signatures of {}: {}\n", r.name, parts.join("; ")))
}

/// A rule's action in words (`truncate (keep head_tail, as much as fits)`).
pub(super) fn describe_action(action: &ActionSpec) -> String {
    match action {
        ActionSpec::Truncate {
            keep, max_bytes, ..
        } => {
            let keep = match keep {
                Keep::Head => "head",
                Keep::Tail => "tail",
                Keep::HeadTail => "head_tail",
            };
            match max_bytes {
                Some(max) => format!("truncate (keep {keep}, at most {})", both_forms(*max)),
                None => format!("truncate (keep {keep}, as much as fits)"),
            }
        }
        ActionSpec::Drop => "drop".to_string(),
        ActionSpec::KeepItems { head, tail } => format!("keep_items (first {head}, last {tail})"),
        ActionSpec::KeepLines { head, tail, .. } => {
            format!("keep_lines (first {head}, last {tail})")
        }
    }
}
