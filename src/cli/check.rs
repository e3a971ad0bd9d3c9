//! `payload-guard check`: validate the configuration and print the effective routes.

use std::path::Path;

use crate::config::units::both_forms;
use crate::config::{Config, OnOversize, OnTrimFailure};
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
        let Some(tc) = &r.trim else { continue };
        out.push_str(&format!(
            "trim rules of {} (protect: {}; on_trim_failure: {}{}):\n",
            r.name,
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
