//! Path grammar for rule and protect paths: parsing (with char positions for errors), matching
//! against tape nodes, overlap checks between patterns, and printing concrete paths.
//!
//! Keys are compared as decoded JSON strings, but a key without a backslash is compared on its
//! raw bytes so the common case allocates nothing.

use std::fmt;

use super::scan::{Slot, Tape};

/// One segment of a compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A key pattern: literal text with `*` wildcards inside one segment (never from a quoted
    /// key, where `*` is literal).
    Key(Glob),
    /// A whole-segment `*`: any key of an object or any element of an array.
    Any,
    /// `[*]`: any element of an array.
    Elements,
}

/// A key pattern split on its `*` wildcards: `parts.len() == stars + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob {
    /// Literal pieces between wildcards; a single piece means no wildcard.
    parts: Vec<String>,
}

impl Glob {
    fn literal(text: String) -> Self {
        Glob { parts: vec![text] }
    }

    /// Whether the pattern has no wildcard.
    pub(crate) fn is_literal(&self) -> bool {
        self.parts.len() == 1
    }

    /// Whether `key` (decoded bytes) matches this pattern.
    pub(crate) fn matches(&self, key: &[u8]) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return key.is_empty(),
        };
        if rest.is_empty() {
            return key == first.as_bytes();
        }
        let Some(mut key) = key.strip_prefix(first.as_bytes()) else {
            return false;
        };
        let (last, middle) = rest.split_last().unwrap_or((first, &[]));
        for part in middle {
            // Leftmost match of each middle piece is optimal for `*`-only globs.
            match find(key, part.as_bytes()) {
                Some(at) => key = &key[at + part.len()..],
                None => return false,
            }
        }
        key.len() >= last.len() && key.ends_with(last.as_bytes())
    }

    /// The pattern as a char sequence with `None` for `*`, for the overlap check.
    fn tokens(&self) -> Vec<Option<char>> {
        let mut out = Vec::new();
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push(None);
            }
            out.extend(part.chars().map(Some));
        }
        out
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    pub(crate) segments: Vec<Segment>,
}

/// Why a path failed to parse: the 0-based char position of the mistake and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathSyntaxError {
    pub(crate) position: usize,
    pub(crate) message: String,
}

impl Pattern {
    /// Parses the rule path grammar (see the module docs of `trim`).
    pub(crate) fn parse(path: &str) -> Result<Self, PathSyntaxError> {
        let chars: Vec<char> = path.chars().collect();
        let err = |position: usize, message: &str| PathSyntaxError {
            position,
            message: message.to_owned(),
        };
        if chars.is_empty() {
            return Err(err(0, "path is empty: name a key, e.g. call.transcript"));
        }
        let mut segments = Vec::new();
        let mut i = 0;
        // Whether a segment is required next (start of path or after a dot).
        let mut need_segment = true;
        while i < chars.len() {
            match chars[i] {
                '[' => {
                    if chars.get(i + 1) != Some(&'*') || chars.get(i + 2) != Some(&']') {
                        return Err(err(
                            i,
                            "'[' must be followed by '*]' (only [*] is supported); quote keys containing '['",
                        ));
                    }
                    if need_segment && !segments.is_empty() {
                        return Err(err(i, "empty segment before '[*]': remove the dot"));
                    }
                    segments.push(Segment::Elements);
                    i += 3;
                    need_segment = false;
                }
                '.' if need_segment => {
                    return Err(err(
                        i,
                        "empty segment: remove the extra dot or quote a key containing '.'",
                    ));
                }
                '.' => {
                    i += 1;
                    need_segment = true;
                    if i == chars.len() {
                        return Err(err(i, "path ends with a dot: remove it or add a key"));
                    }
                }
                _ if !need_segment => {
                    return Err(err(
                        i,
                        "expected '.' or '[*]' after a segment; quote keys containing '\"' or ']'",
                    ));
                }
                '"' => {
                    let open = i;
                    let mut key = String::new();
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => {
                                return Err(err(open, "unterminated quote: add the closing '\"'"));
                            }
                            Some('"') => break,
                            Some('\\') => match chars.get(i + 1) {
                                Some(&c @ ('"' | '\\')) => {
                                    key.push(c);
                                    i += 2;
                                }
                                _ => {
                                    return Err(err(
                                        i,
                                        "invalid escape in quoted key: only \\\" and \\\\ are allowed",
                                    ));
                                }
                            },
                            Some(&c) => {
                                key.push(c);
                                i += 1;
                            }
                        }
                    }
                    i += 1;
                    segments.push(Segment::Key(Glob::literal(key)));
                    need_segment = false;
                }
                _ => {
                    let begin = i;
                    while i < chars.len() && !matches!(chars[i], '.' | '[' | '"' | ']') {
                        i += 1;
                    }
                    if chars.get(i) == Some(&']') {
                        return Err(err(i, "unexpected ']': quote keys containing ']'"));
                    }
                    if chars.get(i) == Some(&'"') {
                        return Err(err(
                            i,
                            "quote inside a key: quote the whole key, e.g. \"a\\\"b\"",
                        ));
                    }
                    let text: String = chars[begin..i].iter().collect();
                    segments.push(if text == "*" {
                        Segment::Any
                    } else {
                        Segment::Key(Glob {
                            parts: text.split('*').map(str::to_owned).collect(),
                        })
                    });
                    need_segment = false;
                }
            }
        }
        Ok(Pattern { segments })
    }

    /// Whether some concrete path could be matched by both patterns up to the shorter one's
    /// length, i.e. one pattern can match a node equal to, inside, or containing a node the
    /// other matches.
    pub(crate) fn overlaps(&self, other: &Pattern) -> bool {
        self.segments
            .iter()
            .zip(&other.segments)
            .all(|(a, b)| segments_intersect(a, b))
    }

    /// All nodes of `tape` matched by this pattern, in document order, skipping subtrees for
    /// which `skip` says so (nodes already removed by an earlier edit).
    pub(crate) fn find_all(&self, tape: &Tape<'_>, skip: &dyn Fn(u32) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        self.walk(tape, 0, 0, skip, &mut out, &mut scratch);
        out
    }

    fn walk(
        &self,
        tape: &Tape<'_>,
        node: u32,
        depth: usize,
        skip: &dyn Fn(u32) -> bool,
        out: &mut Vec<u32>,
        scratch: &mut Vec<u8>,
    ) {
        let Some(segment) = self.segments.get(depth) else {
            out.push(node);
            return;
        };
        for child in tape.children(node) {
            if skip(child) {
                continue;
            }
            let hit = match (segment, tape.slot(child)) {
                (Segment::Any, _) => true,
                (Segment::Elements, Slot::Index(_)) => true,
                (Segment::Key(glob), Slot::Key { raw, escaped }) => {
                    if escaped {
                        scratch.clear();
                        decode_key(raw, scratch);
                        glob.matches(scratch)
                    } else {
                        glob.matches(raw)
                    }
                }
                _ => false,
            };
            if hit {
                self.walk(tape, child, depth + 1, skip, out, scratch);
            }
        }
    }
}

fn segments_intersect(a: &Segment, b: &Segment) -> bool {
    match (a, b) {
        (Segment::Any, _) | (_, Segment::Any) => true,
        (Segment::Elements, Segment::Elements) => true,
        (Segment::Elements, Segment::Key(_)) | (Segment::Key(_), Segment::Elements) => false,
        (Segment::Key(x), Segment::Key(y)) => globs_intersect(&x.tokens(), &y.tokens()),
    }
}

/// Whether two `*`-globs share a matching string: reachability in their product automaton.
fn globs_intersect(a: &[Option<char>], b: &[Option<char>]) -> bool {
    let width = b.len() + 1;
    let mut seen = vec![false; (a.len() + 1) * width];
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        if std::mem::replace(&mut seen[i * width + j], true) {
            continue;
        }
        if i == a.len() && j == b.len() {
            return true;
        }
        let (ta, tb) = (a.get(i).copied(), b.get(j).copied());
        // A star may match nothing.
        if ta == Some(None) {
            stack.push((i + 1, j));
        }
        if tb == Some(None) {
            stack.push((i, j + 1));
        }
        // Consume one common char: a star stays put, a literal advances.
        let step = |t: Option<Option<char>>, k: usize| match t {
            Some(None) => Some(k),
            Some(Some(_)) => Some(k + 1),
            None => None,
        };
        let compatible = match (ta, tb) {
            (Some(Some(x)), Some(Some(y))) => x == y,
            (Some(_), Some(_)) => true,
            _ => false,
        };
        if compatible && let (Some(ni), Some(nj)) = (step(ta, i), step(tb, j)) {
            // Two stars both staying put would loop forever without progress.
            if (ni, nj) != (i, j) {
                stack.push((ni, nj));
            }
        }
    }
    false
}

/// Decodes a raw JSON string (no quotes, already validated) into UTF-8 bytes. Lone surrogates
/// become U+FFFD: they cannot be named in a rule path anyway.
pub(crate) fn decode_key(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = raw.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        let simple = match esc {
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'u' => None,
            other => Some(other),
        };
        if let Some(byte) = simple {
            out.push(byte);
            continue;
        }
        let unit = hex4(raw, i);
        i += 4;
        let ch = if (0xD800..0xDC00).contains(&unit)
            && raw.get(i) == Some(&b'\\')
            && raw.get(i + 1) == Some(&b'u')
            && (0xDC00..0xE000).contains(&hex4(raw, i + 2))
        {
            let low = hex4(raw, i + 2);
            i += 6;
            char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
        } else {
            char::from_u32(unit)
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(
            ch.unwrap_or(char::REPLACEMENT_CHARACTER)
                .encode_utf8(&mut buf)
                .as_bytes(),
        );
    }
}

fn hex4(raw: &[u8], at: usize) -> u32 {
    raw.get(at..at + 4)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0xFFFD)
}

/// One step of a concrete path, for printing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step<'a> {
    /// An object key, decoded.
    Key(&'a str),
    /// An array index.
    Index(u32),
    /// Any array index (used by `top_fields`, which sums over elements).
    AnyIndex,
}

/// Appends one step to a printed path in the rule grammar.
pub(crate) fn push_step(out: &mut String, step: Step<'_>) {
    use fmt::Write as _;
    match step {
        Step::Key(key) => {
            if !out.is_empty() {
                out.push('.');
            }
            if needs_quotes(key) {
                out.push('"');
                for c in key.chars() {
                    if matches!(c, '"' | '\\') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            } else {
                out.push_str(key);
            }
        }
        Step::Index(i) => {
            let _ = write!(out, "[{i}]");
        }
        Step::AnyIndex => out.push_str("[*]"),
    }
}

/// Keys that would not parse back as themselves unquoted.
fn needs_quotes(key: &str) -> bool {
    key.is_empty()
        || key.chars().any(|c| {
            matches!(c, '.' | '*' | '[' | ']' | '"' | '\\') || c.is_whitespace() || c.is_control()
        })
}

/// The concrete path of a tape node, e.g. `call.turns[3].text`.
pub(crate) fn concrete_path(tape: &Tape<'_>, node: u32) -> String {
    let mut chain = Vec::new();
    let mut cur = node;
    while cur != 0 {
        chain.push(cur);
        cur = tape.nodes[cur as usize].parent;
    }
    let mut out = String::new();
    let mut scratch = Vec::new();
    for &idx in chain.iter().rev() {
        match tape.slot(idx) {
            Slot::Key { raw, escaped } => {
                scratch.clear();
                if escaped {
                    decode_key(raw, &mut scratch);
                } else {
                    scratch.extend_from_slice(raw);
                }
                push_step(&mut out, Step::Key(&String::from_utf8_lossy(&scratch)));
            }
            Slot::Index(i) => push_step(&mut out, Step::Index(i)),
            Slot::Root => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<Segment> {
        Pattern::parse(path).unwrap().segments
    }

    fn key(s: &str) -> Segment {
        Segment::Key(Glob::literal(s.to_owned()))
    }

    fn err_pos(path: &str) -> usize {
        Pattern::parse(path).unwrap_err().position
    }

    #[test]
    fn parses_keys_wildcards_and_quotes() {
        assert_eq!(
            segs("call.transcript"),
            vec![key("call"), key("transcript")]
        );
        assert_eq!(
            segs("call.turns[*].text"),
            vec![key("call"), key("turns"), Segment::Elements, key("text")]
        );
        assert_eq!(
            segs(r#""a.b"."x\"y\\"[*].*"#),
            vec![key("a.b"), key("x\"y\\"), Segment::Elements, Segment::Any]
        );
        assert_eq!(segs(r#""*""#), vec![key("*")]);
        assert_eq!(segs("[*][*]"), vec![Segment::Elements, Segment::Elements]);
        assert_eq!(segs("café.x"), vec![key("café"), key("x")]);
    }

    #[test]
    fn invalid_paths_report_char_positions() {
        assert_eq!(err_pos(""), 0);
        assert_eq!(err_pos("a..b"), 2);
        assert_eq!(err_pos(".a"), 0);
        assert_eq!(err_pos("a."), 2);
        assert_eq!(err_pos("é.\"abc"), 2);
        assert_eq!(err_pos("a[0]"), 1);
        assert_eq!(err_pos("a[*"), 1);
        assert_eq!(err_pos("a.[*]"), 2);
        assert_eq!(err_pos(r#""a"b"#), 3);
        assert_eq!(err_pos(r#"ab"c""#), 2);
        assert_eq!(err_pos(r#""a\x""#), 2);
        assert_eq!(err_pos("a]"), 1);
        assert!(Pattern::parse("a[").unwrap_err().message.contains("[*]"));
    }

    #[test]
    fn globs_match_within_a_segment() {
        let glob = |p: &str| match &segs(p)[0] {
            Segment::Key(g) => g.clone(),
            other => panic!("{other:?}"),
        };
        assert!(glob("*_feedback").matches(b"call_flow_feedback"));
        assert!(glob("*_feedback").matches(b"_feedback"));
        assert!(!glob("*_feedback").matches(b"call_flow"));
        assert!(glob("extract_*").matches(b"extract_info_1"));
        assert!(glob("a*b*c").matches(b"aXbYbc"));
        assert!(!glob("a*b*c").matches(b"acb"));
        assert!(!glob("ab*ba").matches(b"aba"));
        assert!(glob("x").matches(b"x"));
        assert!(!glob("x").matches(b"xy"));
    }

    #[test]
    fn overlap_detects_ancestors_descendants_and_wildcards() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        let protect = p("call.call_id");
        for rule in [
            "call.*",
            "*.call_id",
            "call",
            "call.call_id.x",
            "*",
            "call.call_*",
            "*.*_id",
        ] {
            assert!(p(rule).overlaps(&protect), "{rule}");
        }
        for rule in [
            "call.transcript",
            "analysis.*_feedback",
            "call[*]",
            "lead.call_id",
            "call.x*",
        ] {
            assert!(!p(rule).overlaps(&protect), "{rule}");
        }
        assert!(p("a*").overlaps(&p("*b")));
        assert!(!p("a*a").overlaps(&p("b*")));
        assert!(p("items.*").overlaps(&p("items[*].id")));
    }

    #[test]
    fn decodes_escaped_keys() {
        let mut out = Vec::new();
        decode_key(br"caf\u00e9 \uD83D\uDE00 \n\/ \uDE00", &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "café 😀 \n/ \u{FFFD}");
    }

    #[test]
    fn prints_paths_in_the_grammar() {
        let mut out = String::new();
        for step in [
            Step::Key("call"),
            Step::Key("a.b"),
            Step::Index(3),
            Step::Key("q\"x"),
            Step::AnyIndex,
            Step::Key(""),
        ] {
            push_step(&mut out, step);
        }
        assert_eq!(out, r##"call."a.b"[3]."q\"x"[*]."""##);
        let printed = r##"call."a.b"[*]."q\"x"[*]."""##;
        assert_eq!(printed, out.replace("[3]", "[*]"));
        assert_eq!(Pattern::parse(printed).unwrap().segments.len(), 6);
    }
}
