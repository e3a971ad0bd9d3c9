//! Text for the `payload-guard spool` commands: the `list` table and the `show` page. Pure
//! functions of the entries (and `now`), so the output is testable without a spool. Every
//! value a sender or receiver controls has its control characters escaped, so a payload cannot
//! drive the operator's terminal.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::Entry;
use super::meta::format_time;

/// `last_error` is cut to this many characters in the list table.
const LIST_ERROR_CHARS: usize = 60;
/// Headers whose values `render_show` does not print.
const REDACTED_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

pub use crate::config::units::human_bytes;

/// A coarse age: `45s`, `3m`, `2h`, `4d` (whole units, rounded down).
pub fn human_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Escapes control characters (`\n`, `\t`, ESC, …) so the text stays on one line.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn cut(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn age_of(entry: &Entry, now: SystemTime) -> String {
    human_age(
        now.duration_since(entry.meta.received_at)
            .unwrap_or(Duration::ZERO),
    )
}

/// The `spool list` table: one row per entry in the given order, columns aligned, sizes and
/// ages for humans, the last error cut to one short line. A header row even when empty.
pub fn render_list(entries: &[Entry], now: SystemTime) -> String {
    const HEADINGS: [&str; 7] = [
        "ID",
        "ROUTE",
        "CALL ID",
        "SIZE",
        "ATTEMPTS",
        "AGE",
        "LAST ERROR",
    ];
    /// Columns aligned to the right (numbers).
    const RIGHT: [bool; 7] = [false, false, false, true, true, true, false];
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            [
                e.id.to_string(),
                clean(&e.meta.route),
                e.meta.call_id.as_deref().map_or_else(|| "-".into(), clean),
                human_bytes(e.body_len),
                e.meta.attempts.to_string(),
                age_of(e, now),
                e.meta
                    .last_error
                    .as_deref()
                    .map_or_else(|| "-".into(), |s| cut(&clean(s), LIST_ERROR_CHARS)),
            ]
        })
        .collect();
    let mut widths = HEADINGS.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headings = HEADINGS.map(String::from);
    for row in std::iter::once(&headings).chain(&rows) {
        let mut line = String::new();
        for (col, cell) in row.iter().enumerate() {
            let pad = widths[col].saturating_sub(cell.chars().count());
            if col > 0 {
                line.push_str("  ");
            }
            if RIGHT[col] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if col + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `spool show` page: every metadata field on its own `name: value` line, then the
/// headers (values of `authorization`, `proxy-authorization` and `cookie` withheld).
pub fn render_show(entry: &Entry) -> String {
    let meta = &entry.meta;
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let state = if entry.claimed {
        format!("{} (claimed by a delivery attempt)", entry.state)
    } else {
        entry.state.to_string()
    };
    let fields: Vec<(&str, String)> = vec![
        ("id", entry.id.to_string()),
        ("state", state),
        ("route", clean(&meta.route)),
        ("received_at", format_time(meta.received_at)),
        ("request_id", clean(&meta.request_id)),
        ("call_id", or_dash(meta.call_id.as_deref().map(clean))),
        ("method", clean(&meta.method)),
        ("path", clean(&meta.path_and_query)),
        (
            "body",
            format!("{} ({} bytes)", human_bytes(entry.body_len), entry.body_len),
        ),
        ("original_len", format!("{} bytes", meta.original_len)),
        ("trimmed", if meta.trimmed { "yes" } else { "no" }.into()),
        ("attempts", meta.attempts.to_string()),
        (
            "next_attempt_at",
            or_dash(meta.next_attempt_at.map(format_time)),
        ),
        ("last_error", or_dash(meta.last_error.as_deref().map(clean))),
        ("status", or_dash(meta.status.map(|s| s.to_string()))),
        ("snippet", or_dash(meta.snippet.as_deref().map(clean))),
        ("file", entry.path.display().to_string()),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (name, value) in fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{name}:"));
    }
    let _ = writeln!(out, "headers:");
    if meta.headers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (name, value) in &meta.headers {
        let shown = if REDACTED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            format!("<withheld, {} bytes>", value.len())
        } else {
            clean(value)
        };
        let _ = writeln!(out, "  {}: {shown}", clean(name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 * 1024 * 1024 * 1024), "10 GiB");
        assert_eq!(human_age(Duration::from_secs(45)), "45s");
        assert_eq!(human_age(Duration::from_secs(200)), "3m");
        assert_eq!(human_age(Duration::from_secs(2 * 3600 + 5)), "2h");
        assert_eq!(human_age(Duration::from_secs(4 * 86_400 + 7)), "4d");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
