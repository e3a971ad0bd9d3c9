//! The rewriter: applies rule actions to tape nodes as span edits, keeps a running total of the
//! output size (so "does it fit yet?" costs nothing), and finally renders the body by copying
//! untouched spans of the original bytes into one preallocated buffer.
//!
//! Cut points inside strings are chosen on raw JSON bytes and never split an escape sequence,
//! a surrogate pair written as two `\u` escapes, or a multi-byte UTF-8 character.

use std::borrow::Cow;
use std::collections::HashMap;

use memchr::{memchr, memrchr};

use super::path::concrete_path;
use super::scan::{Kind, Tape};
use super::{Action, Applied, Keep, RuleSet, TrimError, TrimOutcome};

/// Trims `body` by `rules` until it is at most `target` bytes.
///
/// The body is always validated first (invalid JSON is an error even when it already fits),
/// except that UTF-8 is checked on what the trim keeps: invalid UTF-8 anywhere in the result
/// is an error, but bytes a rule removes are not validated (they are gone). A body that
/// already fits comes back byte-identical with nothing applied. Otherwise rules run in order
/// and the size is checked before each rule and after each edit; `fits` tells whether the
/// target was reached, and `body` is the smallest result either way.
pub fn trim(body: &[u8], rules: &RuleSet, target: usize) -> Result<TrimOutcome, TrimError> {
    trim_tape(
        &Tape::parse_structure_within(body, usize::MAX)?,
        rules,
        target,
    )
}

/// [`trim`] on an already scanned body.
pub(crate) fn trim_tape(
    tape: &Tape<'_>,
    rules: &RuleSet,
    target: usize,
) -> Result<TrimOutcome, TrimError> {
    let out = trim_structure(tape, rules, target);
    if !tape.utf8_checked && simdutf8::basic::from_utf8(&out.body).is_err() {
        return Err(kept_invalid_utf8(tape.body, &out.body));
    }
    Ok(out)
}

/// The error for a trim whose output is not UTF-8: the first invalid UTF-8 of the body (the
/// output is made of the body's bytes cut at character boundaries, plus valid markers).
#[cold]
fn kept_invalid_utf8(body: &[u8], out: &[u8]) -> TrimError {
    super::scan::utf8_error(body).unwrap_or_else(|| {
        debug_assert!(false, "a cut split a character of valid UTF-8");
        TrimError::InvalidJson {
            offset: simdutf8::compat::from_utf8(out)
                .err()
                .map_or(0, |e| e.valid_up_to()),
            reason: super::JsonErrorKind::InvalidUtf8,
        }
    })
}

/// The trim itself, on a tape whose UTF-8 may not be checked yet.
fn trim_structure(tape: &Tape<'_>, rules: &RuleSet, target: usize) -> TrimOutcome {
    let body = tape.body;
    if body.len() <= target {
        return TrimOutcome {
            body: body.to_vec(),
            original_len: body.len(),
            fits: true,
            applied: Vec::new(),
        };
    }
    let mut editor = Editor::new(tape);
    let mut applied = Vec::new();
    'rules: for (rule_index, rule) in rules.rules.iter().enumerate() {
        if editor.total <= target {
            break;
        }
        let matches = rule.pattern.find_all(tape, &|n| editor.is_removed(n));
        for node in matches {
            if editor.total <= target {
                break 'rules;
            }
            let before = editor.total;
            editor.last_marked = None;
            let changed = match &rule.action {
                Action::Truncate {
                    keep,
                    max_bytes,
                    marker,
                } => editor.truncate(node, *keep, *max_bytes, marker, target),
                Action::Drop => editor.drop_node(node),
                Action::KeepItems { head, tail } => editor.keep_items(node, *head, *tail),
                Action::KeepLines { head, tail, marker } => {
                    editor.keep_lines(node, *head, *tail, marker)
                }
            };
            if changed {
                applied.push(Applied {
                    path: concrete_path(tape, node),
                    rule: rule_index,
                    removed: before - editor.total,
                    marked: editor.last_marked.take(),
                });
            }
        }
    }
    let out = if applied.is_empty() {
        body.to_vec()
    } else {
        editor.render()
    };
    debug_assert_eq!(out.len(), editor.total);
    TrimOutcome {
        fits: out.len() <= target,
        body: out,
        original_len: body.len(),
        applied,
    }
}

/// A pre-escaped marker template split around its `{removed}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marker {
    parts: Vec<Vec<u8>>,
}

impl Marker {
    const PLACEHOLDER: &'static str = "{removed}";

    /// Splits and JSON-escapes the decoded marker text.
    pub(crate) fn new(text: &str) -> Self {
        Marker {
            parts: text
                .split(Self::PLACEHOLDER)
                .map(|part| escape_json(part.as_bytes()))
                .collect(),
        }
    }

    fn none() -> Self {
        Marker {
            parts: vec![Vec::new()],
        }
    }

    /// Raw length of the marker once `{removed}` is replaced by a number of that many digits.
    pub(crate) fn len(&self, digits: usize) -> usize {
        let literal: usize = self.parts.iter().map(Vec::len).sum();
        literal + (self.parts.len() - 1) * digits
    }

    /// Whether the marker shows the count (`{removed}`).
    fn has_placeholder(&self) -> bool {
        self.parts.len() > 1
    }

    fn render(&self, removed: usize) -> Vec<u8> {
        let number = removed.to_string();
        let mut out = Vec::with_capacity(self.len(number.len()));
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(number.as_bytes());
            }
            out.extend_from_slice(part);
        }
        out
    }
}

/// JSON-escapes decoded text for insertion inside a string literal.
fn escape_json(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

fn digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Piece of a rewritten string's raw content.
#[derive(Debug, Clone)]
enum Piece {
    /// Bytes of the original body.
    Original(usize, usize),
    /// New bytes (a marker, or content copied from an earlier rewrite).
    Owned(Vec<u8>),
}

/// A planned cut of a string's raw content: keep `[..head_end]` and `[tail_start..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    head_end: usize,
    tail_start: usize,
}

impl Cut {
    fn removed(self) -> usize {
        self.tail_start - self.head_end
    }
}

/// Drop bookkeeping for a container that lost children.
#[derive(Debug)]
struct ContainerState {
    children: Vec<u32>,
    kept: Vec<bool>,
    kept_count: usize,
    /// Position (in `children`) of the last kept child; only moves backwards.
    last_kept: usize,
}

const REMOVED: u8 = 1;
/// The node's subtree differs from the original bytes.
const DIRTY: u8 = 2;

struct Editor<'t, 'a> {
    tape: &'t Tape<'a>,
    flags: Vec<u8>,
    /// Size change of each dirty node's member span.
    delta: HashMap<u32, isize>,
    strings: HashMap<u32, Vec<Piece>>,
    containers: HashMap<u32, ContainerState>,
    /// Current output size.
    total: usize,
    /// The count the last marker inserted shows (for [`Applied::marked`]).
    last_marked: Option<usize>,
}

impl<'t, 'a> Editor<'t, 'a> {
    fn new(tape: &'t Tape<'a>) -> Self {
        Editor {
            tape,
            flags: vec![0; tape.nodes.len()],
            delta: HashMap::new(),
            strings: HashMap::new(),
            containers: HashMap::new(),
            total: tape.body.len(),
            last_marked: None,
        }
    }

    fn is_removed(&self, node: u32) -> bool {
        self.flags[node as usize] & REMOVED != 0
    }

    /// Current size of a node's member span (key included).
    fn current_size(&self, node: u32) -> usize {
        let n = &self.tape.nodes[node as usize];
        let original = (n.end - n.start) as usize;
        original.saturating_add_signed(self.delta.get(&node).copied().unwrap_or(0))
    }

    /// Records a size change at `node`, marking it and its ancestors dirty.
    fn add_delta(&mut self, node: u32, change: isize) {
        let mut cur = node;
        loop {
            *self.delta.entry(cur).or_insert(0) += change;
            self.flags[cur as usize] |= DIRTY;
            if cur == 0 {
                break;
            }
            cur = self.tape.nodes[cur as usize].parent;
        }
        self.total = self.total.saturating_add_signed(change);
    }

    /// Current raw content of a string node.
    fn string_content(&self, node: u32) -> Cow<'a, [u8]> {
        match self.strings.get(&node) {
            None => Cow::Borrowed(self.tape.string_raw(node)),
            Some(pieces) => {
                let mut out = Vec::new();
                for piece in pieces {
                    match piece {
                        Piece::Original(from, to) => {
                            out.extend_from_slice(&self.tape.body[*from..*to]);
                        }
                        Piece::Owned(bytes) => out.extend_from_slice(bytes),
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// Replaces a string's content by `content[..head_end] + marker + content[tail_start..]`
    /// if that makes it smaller. Returns whether anything changed.
    fn apply_cut(&mut self, node: u32, content: Cow<'a, [u8]>, cut: Cut, marker: &Marker) -> bool {
        let old_len = content.len();
        let rendered = marker.render(cut.removed());
        let new_len = cut.head_end + rendered.len() + (old_len - cut.tail_start);
        if new_len >= old_len {
            return false;
        }
        let pieces = match content {
            Cow::Borrowed(_) => {
                let base = self.tape.nodes[node as usize].value_start as usize + 1;
                vec![
                    Piece::Original(base, base + cut.head_end),
                    Piece::Owned(rendered),
                    Piece::Original(base + cut.tail_start, base + old_len),
                ]
            }
            Cow::Owned(bytes) => vec![
                Piece::Owned(bytes[..cut.head_end].to_vec()),
                Piece::Owned(rendered),
                Piece::Owned(bytes[cut.tail_start..].to_vec()),
            ],
        };
        self.strings.insert(node, pieces);
        self.add_delta(node, new_len as isize - old_len as isize);
        if marker.has_placeholder() {
            self.last_marked = Some(cut.removed());
        }
        true
    }

    fn truncate(
        &mut self,
        node: u32,
        keep: Keep,
        max_bytes: Option<usize>,
        marker: &Marker,
        target: usize,
    ) -> bool {
        if self.tape.nodes[node as usize].kind != Kind::String {
            return false;
        }
        let content = self.string_content(node);
        let len = content.len();
        let plan = match max_bytes {
            Some(max) if len <= max => return false,
            Some(max) => match plan_truncate(&content, keep, max, marker) {
                Some(cut) => Some((cut, marker.clone())),
                // The marker with a long count no longer fits the cap: keep the cap strict.
                None => {
                    plan_truncate(&content, keep, max, &Marker::none()).map(|c| (c, Marker::none()))
                }
            },
            None => {
                let excess = self.total.saturating_sub(target);
                let budget = len.saturating_sub(excess);
                let cut = plan_truncate(&content, keep, budget, marker).unwrap_or(Cut {
                    // Even the bare marker is too long to reach the target: cut to the marker
                    // and let later matches and rules do the rest.
                    head_end: 0,
                    tail_start: len,
                });
                Some((cut, marker.clone()))
            }
        };
        match plan {
            Some((cut, marker)) => self.apply_cut(node, content, cut, &marker),
            None => false,
        }
    }

    fn keep_lines(&mut self, node: u32, head: usize, tail: usize, marker: &Marker) -> bool {
        if self.tape.nodes[node as usize].kind != Kind::String {
            return false;
        }
        let content = self.string_content(node);
        let cut = plan_keep_lines(&content, head, tail);
        match cut {
            Some(cut) => self.apply_cut(node, content, cut, marker),
            None => false,
        }
    }

    fn keep_items(&mut self, node: u32, head: usize, tail: usize) -> bool {
        if self.tape.nodes[node as usize].kind != Kind::Array {
            return false;
        }
        let kept: Vec<u32> = self
            .tape
            .children(node)
            .filter(|&c| !self.is_removed(c))
            .collect();
        if kept.len() <= head.saturating_add(tail) {
            return false;
        }
        for &child in &kept[head..kept.len() - tail] {
            self.drop_node(child);
        }
        true
    }

    /// Removes a member or element, fixing the separators. Returns whether anything changed.
    fn drop_node(&mut self, node: u32) -> bool {
        if node == 0 || self.is_removed(node) {
            return false;
        }
        let tape = self.tape;
        let parent = tape.nodes[node as usize].parent;
        let state = self.containers.entry(parent).or_insert_with(|| {
            let children: Vec<u32> = tape.children(parent).collect();
            let count = children.len();
            ContainerState {
                kept: vec![true; count],
                kept_count: count,
                last_kept: count - 1,
                children,
            }
        });
        let Ok(pos) = state.children.binary_search(&node) else {
            return false;
        };
        let start_of = |i: u32| tape.nodes[i as usize].start as usize;
        let end_of = |i: u32| tape.nodes[i as usize].end as usize;
        // Emission keeps the gap after every kept child except the last kept one, plus the
        // leading gap when anything is kept; see `render_container`.
        let gap_after = |p: usize, state: &ContainerState| {
            start_of(state.children[p + 1]) - end_of(state.children[p])
        };
        let separator = if state.kept_count == 1 {
            let open = tape.nodes[parent as usize].value_start as usize + 1;
            start_of(state.children[0]) - open
        } else if pos != state.last_kept {
            gap_after(pos, state)
        } else {
            let mut prev = pos;
            while prev > 0 {
                prev -= 1;
                if state.kept[prev] {
                    break;
                }
            }
            state.last_kept = prev;
            gap_after(prev, state)
        };
        state.kept[pos] = false;
        state.kept_count -= 1;
        self.flags[node as usize] |= REMOVED;
        let size = self.current_size(node);
        self.add_delta(parent, -((size + separator) as isize));
        true
    }

    fn render(&self) -> Vec<u8> {
        let body = self.tape.body;
        let root = &self.tape.nodes[0];
        let mut out = Vec::with_capacity(self.total);
        out.extend_from_slice(&body[..root.start as usize]);
        self.render_node(0, &mut out);
        out.extend_from_slice(&body[root.end as usize..]);
        out
    }

    fn render_node(&self, node: u32, out: &mut Vec<u8>) {
        let body = self.tape.body;
        let n = &self.tape.nodes[node as usize];
        let (start, value_start, end) = (n.start as usize, n.value_start as usize, n.end as usize);
        if self.flags[node as usize] & DIRTY == 0 {
            out.extend_from_slice(&body[start..end]);
            return;
        }
        match n.kind {
            Kind::String => {
                out.extend_from_slice(&body[start..=value_start]);
                for piece in self.strings.get(&node).into_iter().flatten() {
                    match piece {
                        Piece::Original(from, to) => out.extend_from_slice(&body[*from..*to]),
                        Piece::Owned(bytes) => out.extend_from_slice(bytes),
                    }
                }
                out.push(b'"');
            }
            Kind::Object | Kind::Array => self.render_container(node, out),
            _ => out.extend_from_slice(&body[start..end]),
        }
    }

    /// `open lead kept₁ gap₁ kept₂ … keptₙ trailing close`, where each gap is the original one
    /// after that kept child (so it holds exactly one comma) and `lead`/`trailing` are the
    /// original whitespace inside the brackets. With nothing kept: `open trailing close`.
    fn render_container(&self, node: u32, out: &mut Vec<u8>) {
        let body = self.tape.body;
        let n = &self.tape.nodes[node as usize];
        let (start, value_start, end) = (n.start as usize, n.value_start as usize, n.end as usize);
        out.extend_from_slice(&body[start..=value_start]);
        let children: Vec<u32> = self.tape.children(node).collect();
        let (Some(&first), Some(&last)) = (children.first(), children.last()) else {
            out.extend_from_slice(&body[value_start + 1..end]);
            return;
        };
        let trailing = &body[self.tape.nodes[last as usize].end as usize..end];
        let mut kept = children
            .iter()
            .copied()
            .filter(|&c| !self.is_removed(c))
            .peekable();
        if kept.peek().is_some() {
            out.extend_from_slice(
                &body[value_start + 1..self.tape.nodes[first as usize].start as usize],
            );
        }
        while let Some(child) = kept.next() {
            self.render_node(child, out);
            if kept.peek().is_some() {
                let c = &self.tape.nodes[child as usize];
                let next_start = self.tape.nodes[c.next as usize].start as usize;
                out.extend_from_slice(&body[c.end as usize..next_start]);
            }
        }
        out.extend_from_slice(trailing);
    }
}

/// Plans the biggest cut-point-safe keep of `content` whose kept bytes plus marker fit in
/// `budget`, or `None` when the marker alone does not fit. The marker's length depends on the
/// digits of the removed count, which grows as the keep shrinks, so iterate to the fixed point
/// (the digit count only ever increases, so this ends within 20 rounds).
fn plan_truncate(content: &[u8], keep: Keep, budget: usize, marker: &Marker) -> Option<Cut> {
    let len = content.len();
    let mut width = 1;
    loop {
        let room = budget.checked_sub(marker.len(width))?;
        let room = room.min(len);
        let cut = match keep {
            Keep::Head => Cut {
                head_end: head_cut(content, room),
                tail_start: len,
            },
            Keep::Tail => Cut {
                head_end: 0,
                tail_start: tail_cut(content, len - room),
            },
            Keep::HeadTail => {
                let tail_room = room / 2;
                let head_end = head_cut(content, room - tail_room);
                let tail_start = tail_cut(content, len - tail_room).max(head_end);
                Cut {
                    head_end,
                    tail_start,
                }
            }
        };
        let needed = digits(cut.removed());
        if needed <= width {
            return Some(cut);
        }
        width = needed;
    }
}

/// Plans a `keep_lines` cut: up to the end of line `head - 1` and from the start of line
/// `lines - tail`, lines being separated by the escape `\n`. `None` if there are not more than
/// `head + tail` lines.
fn plan_keep_lines(content: &[u8], head: usize, tail: usize) -> Option<Cut> {
    // Forward: an escape-aware walk from the start, where every backslash found starts an
    // escape, to the `head`-th separator (the end of line `head - 1`).
    let mut head_end = 0;
    if head > 0 {
        let mut found = 0;
        let mut pos = 0;
        loop {
            let at = pos + memchr(b'\\', &content[pos..])?;
            if content.get(at + 1) == Some(&b'n') {
                found += 1;
                if found == head {
                    head_end = at;
                    break;
                }
            }
            pos = escape_end(content, at);
        }
    }
    // Backward: the `tail`-th separator from the end must lie after the head separator, else
    // there are not more than `head + tail` lines.
    let floor = if head > 0 { head_end + 2 } else { 0 };
    let mut tail_start = content.len();
    if tail > 0 {
        let mut found = 0;
        let mut end = content.len();
        loop {
            let at = memrchr(b'\\', &content[..end])?;
            if at < floor {
                return None;
            }
            if content.get(at + 1) == Some(&b'n') && is_escape_start(content, at) {
                found += 1;
                if found == tail {
                    tail_start = at + 2;
                    break;
                }
            }
            end = at;
        }
    }
    Some(Cut {
        head_end,
        tail_start,
    })
}

/// Offset just past the escape whose backslash is at `at` (content is validated).
fn escape_end(content: &[u8], at: usize) -> usize {
    if content.get(at + 1) == Some(&b'u') {
        at + 6
    } else {
        at + 2
    }
}

/// Whether the backslash at `at` starts an escape: true iff the run of backslashes ending at
/// `at` has odd length (a run begins at an escape boundary and pairs off as `\\`).
fn is_escape_start(content: &[u8], at: usize) -> bool {
    let run = content[..=at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    run % 2 == 1
}

fn hex_unit(content: &[u8], at: usize) -> Option<u32> {
    let hex = content.get(at..at + 4)?;
    u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Length of the token starting at the escape `at`: 12 for a `\uD8xx\uDCxx` pair, so a cut
/// never separates the halves.
fn escape_token_len(content: &[u8], at: usize) -> usize {
    if content.get(at + 1) != Some(&b'u') {
        return 2;
    }
    let high = hex_unit(content, at + 2).is_some_and(|u| (0xD800..0xDC00).contains(&u));
    let low_follows = content.get(at + 6) == Some(&b'\\')
        && content.get(at + 7) == Some(&b'u')
        && hex_unit(content, at + 8).is_some_and(|u| (0xDC00..0xE000).contains(&u));
    if high && low_follows { 12 } else { 6 }
}

/// The escape token that strictly contains position `pos` (a position is a gap between bytes),
/// as `(start, end)`. A token is at most 12 bytes, so only the 11 bytes before can start one.
fn enclosing_escape(content: &[u8], pos: usize) -> Option<(usize, usize)> {
    (pos.saturating_sub(11)..pos).find_map(|j| {
        if content[j] == b'\\' && is_escape_start(content, j) {
            let end = j + escape_token_len(content, j);
            (end > pos).then_some((j, end))
        } else {
            None
        }
    })
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// Largest safe cut position `<= pos` (keep `content[..result]`).
fn head_cut(content: &[u8], pos: usize) -> usize {
    let mut pos = pos.min(content.len());
    if let Some((start, _)) = enclosing_escape(content, pos) {
        pos = start;
    }
    while pos > 0 && pos < content.len() && is_continuation(content[pos]) {
        pos -= 1;
    }
    pos
}

/// Smallest safe cut position `>= pos` (keep `content[result..]`).
fn tail_cut(content: &[u8], pos: usize) -> usize {
    let mut pos = pos.min(content.len());
    if let Some((_, end)) = enclosing_escape(content, pos) {
        pos = end;
    }
    while pos < content.len() && is_continuation(content[pos]) {
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::super::{ActionSpec, RuleSpec};
    use super::*;

    fn rules(specs: &[(&str, ActionSpec)]) -> RuleSet {
        let specs: Vec<RuleSpec> = specs
            .iter()
            .map(|(p, a)| RuleSpec {
                path: (*p).to_owned(),
                action: a.clone(),
            })
            .collect();
        RuleSet::compile(&specs, &[]).unwrap()
    }

    fn run(body: &str, specs: &[(&str, ActionSpec)], target: usize) -> (String, TrimOutcome) {
        let out = trim(body.as_bytes(), &rules(specs), target).unwrap();
        let text = String::from_utf8(out.body.clone()).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("output is not json ({e}): {text}"));
        assert_eq!(out.fits, out.body.len() <= target);
        (text, out)
    }

    fn truncate(keep: Keep, max_bytes: Option<u64>, marker: &str) -> ActionSpec {
        ActionSpec::Truncate {
            keep,
            max_bytes,
            marker: Some(marker.to_owned()),
        }
    }

    #[test]
    fn fitting_body_is_returned_identical() {
        let body = r#"{ "a" : 1.0, "b": [1e3, 12345678901234567890] }"#;
        let (text, out) = run(body, &[("a", ActionSpec::Drop)], body.len());
        assert_eq!(text, body);
        assert!(out.applied.is_empty() && out.fits);
    }

    #[test]
    fn drop_first_middle_last_and_all_members() {
        let body = r#"{"a":1,"b":2,"c":3}"#;
        assert_eq!(
            run(body, &[("a", ActionSpec::Drop)], 0).0,
            r#"{"b":2,"c":3}"#
        );
        let d = |p| (p, ActionSpec::Drop);
        // Targets just low enough to need exactly the listed drops.
        assert_eq!(run(body, &[d("b")], 15).0, r#"{"a":1,"c":3}"#);
        assert_eq!(run(body, &[d("c")], 15).0, r#"{"a":1,"b":2}"#);
        assert_eq!(run(body, &[d("*")], 0).0, "{}");
        assert_eq!(run(body, &[d("c"), d("b")], 7).0, r#"{"a":1}"#);
        assert_eq!(run(body, &[d("b"), d("c")], 7).0, r#"{"a":1}"#);
        assert_eq!(run(body, &[d("a"), d("c")], 7).0, r#"{"b":2}"#);
        assert_eq!(run(body, &[d("c"), d("a")], 7).0, r#"{"b":2}"#);
    }

    #[test]
    fn drop_in_pretty_printed_documents_stays_tidy() {
        let body = "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2\n  ],\n  \"c\": 3\n}\n";
        let d = |p| (p, ActionSpec::Drop);
        assert_eq!(run(body, &[d("b")], 0).0, "{\n  \"a\": 1,\n  \"c\": 3\n}\n");
        assert_eq!(
            run(body, &[d("c")], 0).0,
            "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2\n  ]\n}\n"
        );
        assert_eq!(
            run(body, &[d("b[*]")], 0).0,
            "{\n  \"a\": 1,\n  \"b\": [\n  ],\n  \"c\": 3\n}\n"
        );
        assert_eq!(run(body, &[d("*")], 0).0, "{\n}\n");
    }

    #[test]
    fn drop_array_elements_and_report_concrete_paths() {
        let body = r#"{"t":[{"x":1,"k":"a"},{"x":2,"k":"b"},{"x":3,"k":"c"}]}"#;
        let (text, out) = run(body, &[("t[*].k", ActionSpec::Drop)], 0);
        assert_eq!(text, r#"{"t":[{"x":1},{"x":2},{"x":3}]}"#);
        let paths: Vec<_> = out.applied.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(paths, ["t[0].k", "t[1].k", "t[2].k"]);
        assert_eq!(out.applied[0].removed, 8);
        // Stops as soon as it fits.
        let (text, out) = run(body, &[("t.*", ActionSpec::Drop)], 40);
        assert_eq!(text, r#"{"t":[{"x":2,"k":"b"},{"x":3,"k":"c"}]}"#);
        assert_eq!(out.applied.len(), 1);
    }

    #[test]
    fn drop_wildcard_feedback_in_fixture() {
        let body = include_str!("synthflow-post-call.json");
        let (text, out) = run(body, &[("analysis.*_feedback", ActionSpec::Drop)], 0);
        assert_eq!(out.applied.len(), 4);
        assert!(!text.contains("_feedback"));
        assert!(text.contains("\"hallucination\": false\n  },"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["call"]["call_id"], "1732630000000x222222222222222222");
    }

    #[test]
    fn truncate_head_tail_cuts_exactly_to_target() {
        let content = "0123456789".repeat(10);
        let body = format!(r#"{{"id":1,"s":"{content}"}}"#);
        let target = body.len() - 40;
        let (text, out) = run(
            &body,
            &[("s", truncate(Keep::HeadTail, None, "[{removed}]"))],
            target,
        );
        assert_eq!(text.len(), target);
        // 100 bytes, 40 to save, marker "[NN]" is 4: keep 56 = 28 + 28, removed 44.
        let expect = format!(
            r#"{{"id":1,"s":"{}[44]{}"}}"#,
            &content[..28],
            &content[72..]
        );
        assert_eq!(text, expect);
        assert_eq!(out.applied[0].removed, 40);
        // The report's count and the marker's agree: 44 cut, 40 net of the 4-byte marker.
        assert_eq!(out.applied[0].marked, Some(44));
    }

    #[test]
    fn truncate_head_and_tail_and_odd_byte() {
        let body = r#"{"s":"abcdefghij"}"#;
        let m = |k| ("s", truncate(k, Some(5), "~"));
        assert_eq!(run(body, &[m(Keep::Head)], 0).0, r#"{"s":"abcd~"}"#);
        assert_eq!(run(body, &[m(Keep::Tail)], 0).0, r#"{"s":"~ghij"}"#);
        assert_eq!(run(body, &[m(Keep::HeadTail)], 0).0, r#"{"s":"ab~ij"}"#);
        let m6 = ("s", truncate(Keep::HeadTail, Some(6), "~"));
        assert_eq!(run(body, &[m6], 0).0, r#"{"s":"abc~ij"}"#);
    }

    #[test]
    fn marker_digits_are_solved_exactly() {
        // 1000 bytes; cap 100 with marker "<{removed}>": removed 905 (3 digits) leaves 95 kept.
        let body = format!(r#"{{"s":"{}"}}"#, "x".repeat(1000));
        let (text, _) = run(
            &body,
            &[("s", truncate(Keep::Head, Some(100), "<{removed}>"))],
            0,
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let s = v["s"].as_str().unwrap();
        assert_eq!(s.len(), 100);
        assert_eq!(s, format!("{}<905>", "x".repeat(95)));
    }

    #[test]
    fn default_marker_is_escaped_and_counts_raw_bytes() {
        let body = format!(r#"{{"s":"{}"}}"#, "a\\n".repeat(100));
        let rules = rules(&[(
            "s",
            ActionSpec::Truncate {
                keep: Keep::Head,
                max_bytes: Some(60),
                marker: None,
            },
        )]);
        let out = trim(body.as_bytes(), &rules, 0).unwrap();
        let text = String::from_utf8(out.body).unwrap();
        assert!(
            text.contains(r"\n[... 288 bytes removed by payload-guard ...]\n"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["s"].as_str().unwrap().ends_with("...]\n"));
    }

    #[test]
    fn cuts_never_split_escapes_surrogates_or_utf8() {
        let raw = r#"ab\"cd\\ef\u00e9\uD83D\uDE00é😀\n"#;
        let body = format!(r#"{{"s":"{raw}"}}"#);
        for max in 1..raw.len() as u64 {
            for keep in [Keep::Head, Keep::Tail, Keep::HeadTail] {
                let (text, _) = run(&body, &[("s", truncate(keep, Some(max), ""))], 0);
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let s = v["s"].as_str().unwrap();
                assert!(!s.contains('\u{FFFD}'));
                let kept_raw = &text[6..text.len() - 2];
                assert!(kept_raw.len() <= max as usize, "{keep:?} {max}: {kept_raw}");
            }
        }
        // Escape exactly at the cut point: the kept part shrinks rather than split it.
        let (text, _) = run(
            r#"{"s":"abc\u00e9xyz"}"#,
            &[("s", truncate(Keep::Head, Some(5), ""))],
            0,
        );
        assert_eq!(text, r#"{"s":"abc"}"#);
        let (text, _) = run(
            r#"{"s":"abc\\\\xyz"}"#,
            &[("s", truncate(Keep::Head, Some(4), ""))],
            0,
        );
        assert_eq!(text, r#"{"s":"abc"}"#);
        let (text, _) = run(
            r#"{"s":"xyz\uD83D\uDE00a"}"#,
            &[("s", truncate(Keep::Tail, Some(8), ""))],
            0,
        );
        assert_eq!(text, r#"{"s":"a"}"#);
        let (text, _) = run(
            r#"{"s":"ab€cd"}"#,
            &[("s", truncate(Keep::Head, Some(4), ""))],
            0,
        );
        assert_eq!(text, r#"{"s":"ab"}"#);
    }

    #[test]
    fn escaped_backslash_before_u_is_not_an_escape_start() {
        // `\\u0041` is an escaped backslash then the text "u0041".
        let raw = r"\\u0041";
        assert!(is_escape_start(raw.as_bytes(), 0));
        assert!(!is_escape_start(raw.as_bytes(), 1));
        assert_eq!(enclosing_escape(raw.as_bytes(), 3), None);
        assert_eq!(enclosing_escape(raw.as_bytes(), 1), Some((0, 2)));
        assert_eq!(head_cut(raw.as_bytes(), 4), 4);
    }

    #[test]
    fn truncate_without_cap_cuts_to_marker_and_goes_on() {
        let body = r#"{"a":"aaaaaaaaaaaaaaaaaaaa","b":"bbbbbbbbbbbbbbbbbbbb"}"#;
        let rule = ("*", truncate(Keep::Head, None, "~"));
        let (text, out) = run(body, std::slice::from_ref(&rule), 30);
        assert_eq!(text, r#"{"a":"~","b":"bbbbbbbbbbbbb~"}"#);
        assert_eq!(text.len(), 30);
        assert_eq!(out.applied.len(), 2);
        // Unreachable target: both cut to the marker, result is the smallest reached.
        let (text, out) = run(body, &[rule], 1);
        assert_eq!(text, r#"{"a":"~","b":"~"}"#);
        assert!(!out.fits);
    }

    #[test]
    fn non_strings_missing_paths_and_empty_strings_are_skipped() {
        let body = r#"{"a":[1,2],"b":"","c":{"d":1}}"#;
        let specs = [
            ("a", truncate(Keep::Head, None, "")),
            ("b", truncate(Keep::Head, None, "")),
            ("zzz", ActionSpec::Drop),
            ("c.d.e", ActionSpec::Drop),
            ("c", ActionSpec::KeepItems { head: 0, tail: 0 }),
            (
                "a",
                ActionSpec::KeepLines {
                    head: 0,
                    tail: 0,
                    marker: None,
                },
            ),
        ];
        let (text, out) = run(body, &specs, 0);
        assert_eq!(text, body);
        assert!(out.applied.is_empty());
    }

    #[test]
    fn keep_items_removes_the_middle() {
        let body = r#"{"t": [0, 1, 2, 3, 4, 5], "u": [[1,2,3],[4]]}"#;
        let (text, out) = run(
            body,
            &[("t", ActionSpec::KeepItems { head: 2, tail: 1 })],
            0,
        );
        assert_eq!(text, r#"{"t": [0, 1, 5], "u": [[1,2,3],[4]]}"#);
        assert_eq!(out.applied.len(), 1);
        assert_eq!(out.applied[0].removed, 9);
        let (text, _) = run(
            body,
            &[("u[*]", ActionSpec::KeepItems { head: 0, tail: 1 })],
            0,
        );
        assert_eq!(text, r#"{"t": [0, 1, 2, 3, 4, 5], "u": [[3],[4]]}"#);
        let (text, _) = run(
            body,
            &[("t", ActionSpec::KeepItems { head: 0, tail: 0 })],
            0,
        );
        assert_eq!(text, r#"{"t": [], "u": [[1,2,3],[4]]}"#);
    }

    #[test]
    fn keep_lines_keeps_head_and_tail_lines() {
        let body = r#"{"t":"\nbot: a\nhuman: b\nbot: c\nhuman: d\nbot: e"}"#;
        let lines = |head, tail| {
            (
                "t",
                ActionSpec::KeepLines {
                    head,
                    tail,
                    marker: Some("\n[{removed}]\n".to_owned()),
                },
            )
        };
        assert_eq!(
            run(body, &[lines(2, 1)], 0).0,
            r#"{"t":"\nbot: a\n[30]\nbot: e"}"#
        );
        assert_eq!(
            run(body, &[lines(0, 2)], 0).0,
            r#"{"t":"\n[28]\nhuman: d\nbot: e"}"#
        );
        assert_eq!(
            run(body, &[lines(3, 0)], 0).0,
            r#"{"t":"\nbot: a\nhuman: b\n[26]\n"}"#
        );
        assert_eq!(
            run(body, &[lines(3, 2)], 0).0,
            r#"{"t":"\nbot: a\nhuman: b\n[10]\nhuman: d\nbot: e"}"#
        );
        // Six lines, head + tail >= 6: nothing to remove.
        assert_eq!(run(body, &[lines(3, 3)], 0).0, body);
        assert_eq!(run(body, &[lines(6, 0)], 0).0, body);
        // An escaped backslash followed by n is not a line break.
        let tricky = r#"{"t":"a\\nb\nccccccccc\nd"}"#;
        assert_eq!(
            run(tricky, &[lines(1, 1)], 0).0,
            r#"{"t":"a\\nb\n[13]\nd"}"#
        );
    }

    #[test]
    fn rules_compose_on_the_same_string() {
        let body = format!(r#"{{"t":"{}"}}"#, "\\nline".repeat(50));
        let specs = [
            (
                "t",
                ActionSpec::KeepLines {
                    head: 3,
                    tail: 3,
                    marker: Some("~".to_owned()),
                },
            ),
            ("t", truncate(Keep::Head, None, "#")),
        ];
        let (text, out) = run(&body, &specs, 20);
        assert_eq!(out.applied.len(), 2);
        assert_eq!(text.len(), 20);
        assert_eq!(text, r#"{"t":"\nline\nlin#"}"#);
    }

    #[test]
    fn drop_after_truncate_inside_counts_current_size() {
        let body = format!(r#"{{"a":{{"s":"{}","n":1}},"b":2}}"#, "x".repeat(100));
        let specs = [
            ("a.s", truncate(Keep::Head, Some(10), "")),
            ("a", ActionSpec::Drop),
        ];
        let (text, out) = run(&body, &specs, 10);
        assert_eq!(text, r#"{"b":2}"#);
        assert_eq!(out.applied.len(), 2);
    }

    #[test]
    fn escaped_and_quoted_keys_match_decoded() {
        let body = r#"{"caf\u00e9":"x","a.b":{"c":"yyyyyyyy"}}"#;
        let (text, out) = run(
            body,
            &[("café", ActionSpec::Drop), ("\"a.b\".c", ActionSpec::Drop)],
            0,
        );
        assert_eq!(text, r#"{"a.b":{}}"#);
        assert_eq!(out.applied[1].path, r#""a.b".c"#);
    }
}
