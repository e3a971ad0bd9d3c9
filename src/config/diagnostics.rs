//! Every mistake in `proxy.toml` in one run, in plain words, with the key and a caret.
//!
//! serde stops at the first error, so [`parse_all`] recovers: each failing entry is reported,
//! blanked out of a working copy of the text (its bytes replaced by spaces, so every later
//! offset, line and column stays put) and the copy parsed again, until it parses. Syntax errors
//! blank their line; a key with a wrong type, an unknown key or an unknown value blanks its
//! `key = value`; a table missing a required key blanks the table. The key at fault is found
//! from the error's byte span in the parsed document, so every key of the serde mirror
//! ([`super::raw`]) gets located, plain-worded messages and did-you-mean suggestions without a
//! list per key: the known keys and values come from serde's own error.
//!
//! [`render`] prints each mistake as `file:line:col: key: message` with the offending line and
//! a caret under it (`annotate-snippets`, the renderer rustc and cargo use).

use std::ops::Range;

use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
use toml_edit::{ImDocument, Item, Table, Value};

use super::ConfigError;
use super::raw::RawConfig;

/// Syntax and type errors beyond this many stop the recovery (a file that is not TOML at all).
const MAX_PARSE_ERRORS: usize = 50;

/// One mistake found while parsing, before it is turned into a [`ConfigError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Located {
    /// Bytes at fault in the text.
    pub span: Range<usize>,
    /// Dotted key path (`routes[0].trim[1].action`), empty when none applies.
    pub key: String,
    /// What is wrong, in plain words.
    pub message: String,
}

/// Parses `text` into the serde mirror, collecting every syntax and type error (see the module
/// doc). The mirror is `None` only when the recovery gave up.
pub(super) fn parse_all(text: &str) -> (Option<RawConfig>, Vec<Located>) {
    let mut work = text.as_bytes().to_vec();
    let mut found: Vec<Located> = Vec::new();
    for _ in 0..MAX_PARSE_ERRORS {
        // Blanking only ever writes ASCII spaces over whole entries or lines.
        let Ok(current) = std::str::from_utf8(&work) else {
            break;
        };
        let err = match toml::from_str::<RawConfig>(current) {
            Ok(raw) => return (Some(raw), found),
            Err(err) => err,
        };
        let at = err.span().unwrap_or(0..0);
        let (located, blank) = match ImDocument::parse(current) {
            Err(syntax) => {
                let at = syntax.span().unwrap_or(at);
                let line = line_range(current, at.start);
                let located = Located {
                    span: caret_span(current, at),
                    key: key_on_line(current, line.start),
                    message: syntax_message(syntax.message()),
                };
                (located, line)
            }
            Ok(doc) => {
                let nodes = nodes(&doc);
                let node = nodes
                    .iter()
                    .filter(|n| {
                        n.span.start <= at.start && at.start < n.span.end.max(n.span.start + 1)
                    })
                    .min_by_key(|n| n.span.len());
                let (key, blank) = match node {
                    Some(n) => (n.path.clone(), n.blank.clone()),
                    None => (String::new(), line_range(current, at.start)),
                };
                let located = Located {
                    span: caret_span(current, at),
                    message: plain_message(err.message()),
                    key,
                };
                (located, blank)
            }
        };
        let before = work.clone();
        for b in &mut work[blank] {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
        let stuck = work == before;
        // A required key blanked for its own mistake is not reported again as missing.
        let cascade = err
            .message()
            .strip_prefix("missing field ")
            .map(|field| join(&located.key, field.trim_matches('`')))
            .is_some_and(|key| found.iter().any(|f| f.key == key));
        if !cascade {
            found.push(located);
        }
        if stuck {
            break;
        }
    }
    (None, found)
}

/// A key or table of the parsed document with its place in the text.
#[derive(Debug)]
struct Node {
    path: String,
    /// From the key (or table header) to the end of the value (or table).
    span: Range<usize>,
    /// What to blank when this node is at fault: the whole `key = value` of its table, even
    /// for a node inside an inline table or array (blanking less would break the syntax).
    blank: Range<usize>,
}

fn nodes(doc: &ImDocument<&str>) -> Vec<Node> {
    let mut out = Vec::new();
    walk_table(doc.as_table(), "", None, &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// `outer_start`: where the dotted key (`a.b.c = 1`) this table belongs to starts.
fn walk_table(table: &Table, prefix: &str, outer_start: Option<usize>, out: &mut Vec<Node>) {
    for (name, item) in table.iter() {
        let path = join(prefix, name);
        let key_start = table
            .get_key_value(name)
            .and_then(|(k, _)| k.span())
            .map(|s| s.start);
        match item {
            Item::Table(t) if t.is_dotted() => {
                walk_table(t, &path, outer_start.or(key_start), out);
            }
            Item::Table(t) => {
                if let Some(span) = t.span() {
                    out.push(Node {
                        path: path.clone(),
                        span: span.clone(),
                        blank: span,
                    });
                }
                walk_table(t, &path, None, out);
            }
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if let Some(span) = t.span() {
                        out.push(Node {
                            path: path.clone(),
                            span: span.clone(),
                            blank: span,
                        });
                    }
                    walk_table(t, &path, None, out);
                }
            }
            Item::Value(value) => {
                let (Some(start), Some(end)) =
                    (outer_start.or(key_start), value.span().map(|s| s.end))
                else {
                    continue;
                };
                out.push(Node {
                    path: path.clone(),
                    span: start..end,
                    blank: start..end,
                });
                walk_value(value, &path, &(start..end), out);
            }
            Item::None => {}
        }
    }
}

fn walk_value(value: &Value, path: &str, blank: &Range<usize>, out: &mut Vec<Node>) {
    match value {
        Value::InlineTable(t) => {
            for (name, v) in t.iter() {
                let path = join(path, name);
                let start = t.key(name).and_then(|k| k.span()).or_else(|| v.span());
                if let (Some(start), Some(end)) = (start, v.span()) {
                    out.push(Node {
                        path: path.clone(),
                        span: start.start..end.end,
                        blank: blank.clone(),
                    });
                }
                walk_value(v, &path, blank, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                if let Some(span) = v.span() {
                    out.push(Node {
                        path: path.clone(),
                        span,
                        blank: blank.clone(),
                    });
                }
                walk_value(v, &path, blank, out);
            }
        }
        _ => {}
    }
}

/// The bytes of the line holding `offset` (without its newline).
fn line_range(text: &str, offset: usize) -> Range<usize> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    start..end
}

/// The span to put a caret under: on one line, at least one character when the line has one.
fn caret_span(text: &str, span: Range<usize>) -> Range<usize> {
    let line = line_range(text, span.start);
    let start = span.start.min(line.end);
    let end = span.end.clamp(start, line.end);
    if start == end && start > line.start {
        // At the end of a line (an unterminated string): point at its last character.
        let prev = text[..start]
            .char_indices()
            .next_back()
            .map_or(start, |(i, _)| i);
        return prev..start;
    }
    start..end
}

/// The dotted key a syntax error's line sets (`routes[1].max_body`), from the table headers
/// above it; the table itself for a header line; empty when the line sets none.
fn key_on_line(text: &str, line_start: usize) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut table = String::new();
    let path_of = |header: &str, array: bool, counts: &mut Vec<(String, usize)>| {
        if array {
            match counts.iter_mut().find(|(h, _)| h == header) {
                Some((_, n)) => *n += 1,
                None => counts.push((header.to_string(), 0)),
            }
            let nested = format!("{header}.");
            counts.retain(|(h, _)| !h.starts_with(&nested));
        }
        let mut path = String::new();
        let mut so_far = String::new();
        for segment in header.split('.').map(str::trim) {
            so_far = join(&so_far, segment);
            path = join(&path, segment);
            if let Some((_, n)) = counts.iter().find(|(h, _)| *h == so_far) {
                path.push_str(&format!("[{n}]"));
            }
        }
        path
    };
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        let header = trimmed
            .strip_prefix("[[")
            .and_then(|h| h.split("]]").next())
            .map(|h| (h.trim(), true))
            .or_else(|| {
                trimmed
                    .strip_prefix('[')
                    .and_then(|h| h.split(']').next())
                    .map(|h| (h.trim(), false))
            });
        if let Some((name, array)) = header {
            table = path_of(name, array, &mut counts);
            if offset == line_start {
                return table;
            }
        } else if offset == line_start {
            let key = trimmed.split('=').next().unwrap_or("").trim();
            let bare = !key.is_empty()
                && trimmed.contains('=')
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            return if bare { join(&table, key) } else { table };
        }
        offset += line.len();
    }
    table
}

/// TOML syntax errors in plain words.
fn syntax_message(message: &str) -> String {
    let message = message.trim().replace('\n', " ");
    let plain = match message.as_str() {
        "invalid basic string" | "invalid literal string" => {
            "unterminated string: close the quote on the same line (or use \"\"\" for text over several lines)".to_string()
        }
        m if m.starts_with("invalid key") => {
            "invalid key: write `key = value`, with letters, digits, '_' or '-' in the key"
                .to_string()
        }
        m if m.starts_with("duplicate key") => {
            format!("{m}: a key may be set once per table")
        }
        _ => message,
    };
    format!("invalid TOML: {plain}")
}

/// serde's wording (`invalid type: string "many", expected i64`) in plain words (`expected a
/// whole number, found "many"`), with did-you-mean for unknown keys and values.
pub(super) fn plain_message(message: &str) -> String {
    let message = message.trim().replace('\n', " ");
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (name, known) = split_expected(rest);
        return unknown("key", &name, &known);
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (name, known) = split_expected(rest);
        return unknown("value", &name, &known);
    }
    if message == "invalid socket address syntax" {
        return "expected an address like \"127.0.0.1:8080\" (an IP address and a port)".into();
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing required key {}", quoted(rest.trim_matches('`')));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.rsplit_once(", expected ")
        {
            return format!(
                "expected {}, found {}",
                expected_words(expected),
                found_words(found)
            );
        }
    }
    message
}

/// `` `shrink`, expected one of `a`, `b` `` → ("shrink", [a, b]).
fn split_expected(rest: &str) -> (String, Vec<String>) {
    let (name, expected) = rest
        .split_once(", expected ")
        .or_else(|| rest.split_once(", there are no "))
        .unwrap_or((rest, ""));
    let name = name.trim().trim_matches('`').to_string();
    let known = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    (name, known)
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

fn unknown(what: &str, name: &str, known: &[String]) -> String {
    let list = known
        .iter()
        .map(|k| quoted(k))
        .collect::<Vec<_>>()
        .join(", ");
    match did_you_mean(name, known) {
        Some(best) => format!(
            "unknown {what} {}: did you mean {}?",
            quoted(name),
            quoted(best)
        ),
        None if known.is_empty() => {
            format!("unknown {what} {}: this table takes none", quoted(name))
        }
        None => format!("unknown {what} {}: expected one of {list}", quoted(name)),
    }
}

/// The known name closest to `name`, when it is close enough to be a typo.
pub(crate) fn did_you_mean<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (k, strsim::jaro_winkler(&lower, k)))
        .filter(|(k, score)| {
            *score >= 0.85 || strsim::damerau_levenshtein(&lower, k) <= (k.len() / 4).max(1)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k.as_str())
}

fn expected_words(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize"
        | "an integer" => "a whole number".into(),
        "a boolean" => "true or false".into(),
        "a string" => "a string in quotes".into(),
        "a sequence" => "a list, like [\"a\", \"b\"]".into(),
        "a map" => "a table".into(),
        "socket address" => "an address like \"127.0.0.1:8080\"".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e if e.starts_with("enum ") => "one of the listed values in quotes".into(),
        e => e.to_string(),
    }
}

fn found_words(found: &str) -> String {
    let value = |s: &str| s.trim_matches('`').to_string();
    if let Some(s) = found.strip_prefix("string ") {
        s.to_string()
    } else if let Some(v) = found
        .strip_prefix("integer ")
        .or_else(|| found.strip_prefix("floating point "))
        .or_else(|| found.strip_prefix("boolean "))
    {
        value(v)
    } else {
        match found {
            "sequence" => "a list".into(),
            "map" => "a table".into(),
            other => other.to_string(),
        }
    }
}

/// Each mistake as `file:line:col: key: message` (warnings: `file:line:col: warning: key:
/// message`) with the offending line and a caret under it.
pub(super) fn render(text: &str, errors: &[ConfigError]) -> String {
    let renderer = Renderer::plain();
    let mut out = String::new();
    for err in errors {
        let title = err.to_string();
        match &err.span {
            Some(span) if err.line > 0 && span.end <= text.len() => {
                let report = &[Level::ERROR.no_name().primary_title(title).element(
                    Snippet::source(text)
                        .line_start(1)
                        .annotation(AnnotationKind::Primary.span(span.clone())),
                )];
                out.push_str(&renderer.render(report));
            }
            _ => out.push_str(&title),
        }
        out.push('\n');
    }
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let warnings = errors.iter().filter(|e| e.warning).count();
    let mistakes = errors.len() - warnings;
    if let Some(first) = errors.first() {
        let summary = match (mistakes, warnings) {
            (0, w) => count(w, "warning"),
            (m, 0) => count(m, "mistake"),
            (m, w) => format!("{}, {}", count(m, "mistake"), count(w, "warning")),
        };
        out.push_str(&format!("{}: {summary}\n", first.file));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_wording_becomes_plain() {
        for (serde, plain) in [
            (
                "invalid type: string \"many\", expected i64",
                "expected a whole number, found \"many\"",
            ),
            (
                "invalid type: string \"no\", expected a boolean",
                "expected true or false, found \"no\"",
            ),
            (
                "invalid type: integer `1`, expected a string",
                "expected a string in quotes, found 1",
            ),
            (
                "unknown variant `shrink`, expected one of `forward`, `reject`, `trim`",
                "unknown value \"shrink\": expected one of \"forward\", \"reject\", \"trim\"",
            ),
            (
                "unknown variant `trimm`, expected one of `forward`, `reject`, `trim`",
                "unknown value \"trimm\": did you mean \"trim\"?",
            ),
            (
                "unknown field `upstream_limt`, expected one of `name`, `upstream`, `upstream_limit`",
                "unknown key \"upstream_limt\": did you mean \"upstream_limit\"?",
            ),
            (
                "unknown field `x`, there are no fields",
                "unknown key \"x\": this table takes none",
            ),
            ("missing field `action`", "missing required key \"action\""),
        ] {
            assert_eq!(plain_message(serde), plain, "{serde}");
        }
    }

    #[test]
    fn suggestions_only_for_likely_typos() {
        let known: Vec<String> = ["listen", "max_connections", "upstream_limit"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            did_you_mean("max_conections", &known),
            Some("max_connections")
        );
        assert_eq!(did_you_mean("Listen", &known), Some("listen"));
        assert_eq!(did_you_mean("colour", &known), None);
    }

    #[test]
    fn syntax_error_lines_name_their_key() {
        let text = "[server]\nlisten = \"x\"\n[[routes]]\nname = 1\n[[routes]]\n[[routes.trim]]\npath = \"a\n[[routes.trim]]\n";
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(key_on_line(text, at("listen")), "server.listen");
        assert_eq!(key_on_line(text, at("name")), "routes[0].name");
        assert_eq!(key_on_line(text, at("path")), "routes[1].trim[0].path");
    }

    #[test]
    fn every_error_is_found_with_offsets_intact() {
        let text = "[server]\nmax_connections = \"many\"\nlisten = \"nowhere\"\n[[routes]]\nname = \"a\nupstream_limt = 3\n";
        let (raw, found) = parse_all(text);
        assert!(raw.is_some());
        let keys: Vec<_> = found.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys.len(), 4, "{found:#?}");
        for key in [
            "server.max_connections",
            "server.listen",
            "routes[0].name",
            "routes[0].upstream_limt",
        ] {
            assert!(keys.contains(&key), "{key} missing from {found:#?}");
        }
        for f in &found {
            assert!(!text[f.span.clone()].contains('\n'), "{f:?}");
        }
    }
}
