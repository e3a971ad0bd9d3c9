//! The span scanner: one validating pass over the raw bytes that records every value as a
//! [`Node`] on a flat tape (byte offsets only, nothing decoded).
//!
//! The rewriter and the field reports work on this tape instead of a DOM so that every byte
//! outside an edited span can be copied through untouched. Strings, which make up almost all of
//! a large webhook body, are scanned 64 bytes a step as bit masks on x86_64
//! (`string_scan.rs`, AVX-512BW or AVX2 where the CPU has it, else SSE2) and 8 bytes a step
//! elsewhere.
//! [`Tape::parse`] validates UTF-8 in chunks just ahead of the scan (SIMD, `simdutf8`, see
//! [`Utf8Prefix`]); [`Tape::parse_structure_within`] leaves it to the trim, which validates
//! what it keeps.

#[cfg(target_arch = "x86_64")]
use super::string_scan;
use super::{JsonErrorKind, TrimError};

/// Deepest nesting of objects and arrays accepted; deeper documents are rejected with
/// [`TrimError::TooDeep`] instead of risking the stack.
pub const MAX_DEPTH: usize = 128;

/// What kind of JSON value a [`Node`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

/// One value on the tape. Offsets are `u32` to keep the tape small (a body over 4 GiB is
/// rejected up front); children of a container follow it directly, and `next` jumps over the
/// whole subtree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    /// Start of the member: the key's opening quote for object members, else the value start.
    pub(crate) start: u32,
    /// Object members: offset of the key's closing quote. Array elements: the element index.
    pub(crate) key_end_or_index: u32,
    /// First byte of the value (the opening quote of a string).
    pub(crate) value_start: u32,
    /// One past the last byte of the value.
    pub(crate) end: u32,
    /// Tape index just past this node's subtree (its next sibling, if any).
    pub(crate) next: u32,
    /// Tape index of the enclosing container; the root points at itself.
    pub(crate) parent: u32,
    pub(crate) kind: Kind,
    /// Whether the member key contains a backslash (and so needs decoding to compare).
    pub(crate) key_escaped: bool,
}

/// Role of a node inside its parent, derived from the parent's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot<'a> {
    Root,
    Key { raw: &'a [u8], escaped: bool },
    Index(u32),
}

/// A parsed document: the original bytes plus the tape. Index 0 is the root value.
#[derive(Debug)]
pub(crate) struct Tape<'a> {
    pub(crate) body: &'a [u8],
    pub(crate) nodes: Vec<Node>,
    /// Whether the whole body was validated as UTF-8 ([`Tape::parse_within`]), or only its
    /// structure ([`Tape::parse_structure_within`]: the trim validates what it keeps).
    pub(crate) utf8_checked: bool,
}

impl<'a> Tape<'a> {
    /// Validates `body` as one JSON value (with optional surrounding whitespace) and records
    /// every value.
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, TrimError> {
        Self::parse_within(body, usize::MAX)
    }

    /// [`Tape::parse`], holding at most `max_values` nodes: a body of more values fails with
    /// [`TrimError::TooManyValues`] before the tape grows past that.
    pub(crate) fn parse_within(body: &'a [u8], max_values: usize) -> Result<Self, TrimError> {
        Self::scan(body, max_values, Utf8Prefix::default())
    }

    /// [`Tape::parse_within`] without validating the content of strings as UTF-8 (everything
    /// else is checked the same). The trim's output is validated instead, so invalid UTF-8 is
    /// still an error wherever it would reach the receiver, and a body is not read twice for
    /// bytes the rules remove: on a 5 MiB transcript cut to 1 MiB, validation moves from the
    /// whole body to the 1 MiB kept.
    pub(crate) fn parse_structure_within(
        body: &'a [u8],
        max_values: usize,
    ) -> Result<Self, TrimError> {
        Self::scan(body, max_values, Utf8Prefix::unchecked())
    }

    fn scan(body: &'a [u8], max_values: usize, utf8: Utf8Prefix) -> Result<Self, TrimError> {
        if u32::try_from(body.len()).is_err() {
            return Err(TrimError::TooLarge { len: body.len() });
        }
        let utf8_checked = !utf8.is_unchecked();
        let mut parser = Parser {
            body,
            pos: 0,
            nodes: Vec::new(),
            max_values,
            utf8,
        };
        match parser.document() {
            Ok(()) => Ok(Tape {
                body,
                nodes: parser.nodes,
                utf8_checked,
            }),
            // Invalid UTF-8 is reported first, wherever it is, as when the whole body was
            // validated before the scan.
            Err(err) => Err(utf8_error(body).unwrap_or(err)),
        }
    }

    /// The node's position in its parent.
    pub(crate) fn slot(&self, idx: u32) -> Slot<'a> {
        let node = &self.nodes[idx as usize];
        if idx == 0 {
            return Slot::Root;
        }
        match self.nodes[node.parent as usize].kind {
            Kind::Object => Slot::Key {
                raw: &self.body[node.start as usize + 1..node.key_end_or_index as usize],
                escaped: node.key_escaped,
            },
            _ => Slot::Index(node.key_end_or_index),
        }
    }

    /// Iterates the direct children of a container, in document order.
    pub(crate) fn children(&self, idx: u32) -> Children<'_, 'a> {
        let node = &self.nodes[idx as usize];
        let is_container = matches!(node.kind, Kind::Object | Kind::Array);
        Children {
            tape: self,
            cur: idx + 1,
            end: if is_container { node.next } else { idx + 1 },
        }
    }

    /// Raw content of a string node, between its quotes.
    pub(crate) fn string_raw(&self, idx: u32) -> &'a [u8] {
        let node = &self.nodes[idx as usize];
        &self.body[node.value_start as usize + 1..node.end as usize - 1]
    }
}

/// Iterator over a container's direct children.
pub(crate) struct Children<'t, 'a> {
    tape: &'t Tape<'a>,
    cur: u32,
    end: u32,
}

impl Iterator for Children<'_, '_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.cur >= self.end {
            return None;
        }
        let idx = self.cur;
        self.cur = self.tape.nodes[idx as usize].next;
        Some(idx)
    }
}

/// The first invalid UTF-8 in `body`, as the error a scan reports.
#[cold]
pub(super) fn utf8_error(body: &[u8]) -> Option<TrimError> {
    simdutf8::basic::from_utf8(body).err()?;
    let offset = simdutf8::compat::from_utf8(body)
        .err()
        .map_or(0, |e| e.valid_up_to());
    Some(TrimError::InvalidJson {
        offset,
        reason: JsonErrorKind::InvalidUtf8,
    })
}

/// How much of the body is validated as UTF-8 ahead of the string scan (SIMD, `simdutf8`).
///
/// Only strings may hold non-ASCII bytes (anywhere else they are a syntax error), so each
/// string makes sure its bytes are in the validated prefix, which grows in chunks just ahead
/// of the scan: a chunk is validated while it is in cache and scanned right after, one trip
/// from memory instead of two for a large body.
#[derive(Debug, Default)]
pub(super) struct Utf8Prefix {
    /// `body[..valid_to]` is valid UTF-8 and ends on a character boundary.
    valid_to: usize,
}

impl Utf8Prefix {
    /// Bytes validated at a time, at least: well within L2.
    const CHUNK: usize = 64 * 1024;

    /// A prefix that covers everything: the scan checks structure only.
    fn unchecked() -> Self {
        Utf8Prefix {
            valid_to: usize::MAX,
        }
    }

    fn is_unchecked(&self) -> bool {
        self.valid_to == usize::MAX
    }

    /// Whether `body[..at]` is valid UTF-8.
    #[inline]
    pub(super) fn covers(&mut self, body: &[u8], at: usize) -> bool {
        at <= self.valid_to || self.extend(body, at)
    }

    #[inline(never)]
    fn extend(&mut self, body: &[u8], at: usize) -> bool {
        let mut end = at.max(self.valid_to + Self::CHUNK).min(body.len());
        // End on a character boundary: a character has at most 3 continuation bytes.
        for _ in 0..3 {
            if body.get(end).is_some_and(|&b| b & 0xC0 == 0x80) {
                end += 1;
            }
        }
        if simdutf8::basic::from_utf8(&body[self.valid_to..end]).is_err() {
            return false;
        }
        self.valid_to = end;
        true
    }
}

struct Parser<'a> {
    body: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    max_values: usize,
    utf8: Utf8Prefix,
}

/// Offsets fit in `u32`: `Tape::parse` rejects longer bodies before any node is built.
fn off(pos: usize) -> u32 {
    pos as u32
}

impl Parser<'_> {
    /// One JSON value with optional surrounding whitespace.
    fn document(&mut self) -> Result<(), TrimError> {
        self.skip_ws();
        self.value(0, 0, 0, None)?;
        self.skip_ws();
        if self.pos != self.body.len() {
            return Err(self.err(JsonErrorKind::TrailingData));
        }
        Ok(())
    }

    /// Room for more nodes, never past `max_values` (the tape doubles, capped there).
    #[cold]
    fn grow(&mut self) -> Result<(), TrimError> {
        let len = self.nodes.len();
        if len >= self.max_values {
            return Err(TrimError::TooManyValues {
                max_values: self.max_values,
            });
        }
        let want = len.saturating_mul(2).max(64).min(self.max_values);
        self.nodes.reserve_exact(want - len);
        Ok(())
    }

    fn err(&self, kind: JsonErrorKind) -> TrimError {
        TrimError::InvalidJson {
            offset: self.pos,
            reason: kind,
        }
    }

    fn err_at(&self, offset: usize, kind: JsonErrorKind) -> TrimError {
        TrimError::InvalidJson {
            offset,
            reason: kind,
        }
    }

    fn skip_ws(&mut self) {
        while let Some(&b) = self.body.get(self.pos) {
            if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.body.get(self.pos).copied()
    }

    /// Parses one value at `self.pos` (whitespace already skipped) and pushes its node(s).
    /// `member_start` / `key_end` describe the key for object members.
    fn value(
        &mut self,
        depth: usize,
        parent: u32,
        key_end_or_index: u32,
        member: Option<(usize, bool)>,
    ) -> Result<(), TrimError> {
        let value_start = self.pos;
        let (start, key_escaped) = member.unwrap_or((value_start, false));
        let idx = self.nodes.len();
        let Some(b) = self.peek() else {
            return Err(self.err(JsonErrorKind::UnexpectedEnd));
        };
        let kind = match b {
            b'{' => Kind::Object,
            b'[' => Kind::Array,
            b'"' => Kind::String,
            b't' | b'f' => Kind::Bool,
            b'n' => Kind::Null,
            b'-' | b'0'..=b'9' => Kind::Number,
            _ => return Err(self.err(JsonErrorKind::ExpectedValue)),
        };
        if self.nodes.len() == self.nodes.capacity() {
            self.grow()?;
        }
        self.nodes.push(Node {
            start: off(start),
            key_end_or_index,
            value_start: off(value_start),
            end: 0,
            next: 0,
            parent,
            kind,
            key_escaped,
        });
        match kind {
            Kind::Object => self.object(depth + 1, off(idx))?,
            Kind::Array => self.array(depth + 1, off(idx))?,
            Kind::String => {
                self.string()?;
            }
            Kind::Bool if b == b't' => self.literal(b"true")?,
            Kind::Bool => self.literal(b"false")?,
            Kind::Null => self.literal(b"null")?,
            Kind::Number => self.number()?,
        }
        let next = off(self.nodes.len());
        let node = &mut self.nodes[idx];
        node.end = off(self.pos);
        node.next = next;
        Ok(())
    }

    /// Steps over the opening bracket of a container at `depth`; `true` when the container is
    /// empty (its `close` bracket consumed too).
    fn open(&mut self, depth: usize, close: u8) -> Result<bool, TrimError> {
        if depth > MAX_DEPTH {
            return Err(TrimError::TooDeep {
                offset: self.pos,
                max_depth: MAX_DEPTH,
            });
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    fn object(&mut self, depth: usize, idx: u32) -> Result<(), TrimError> {
        if self.open(depth, b'}')? {
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.missing(JsonErrorKind::ExpectedKey));
            }
            let member_start = self.pos;
            let escaped = self.string()?;
            let key_end = self.pos - 1;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.missing(JsonErrorKind::ExpectedColon));
            }
            self.pos += 1;
            self.skip_ws();
            self.value(depth, idx, off(key_end), Some((member_start, escaped)))?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.missing(JsonErrorKind::ExpectedCommaOrEnd)),
            }
        }
    }

    fn array(&mut self, depth: usize, idx: u32) -> Result<(), TrimError> {
        if self.open(depth, b']')? {
            return Ok(());
        }
        let mut index = 0u32;
        loop {
            self.value(depth, idx, index, None)?;
            index += 1;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.missing(JsonErrorKind::ExpectedCommaOrEnd)),
            }
        }
    }

    /// An expected token is absent: at the end of input that is the more useful reason.
    fn missing(&self, kind: JsonErrorKind) -> TrimError {
        if self.pos >= self.body.len() {
            self.err(JsonErrorKind::UnexpectedEnd)
        } else {
            self.err(kind)
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), TrimError> {
        for &want in word {
            match self.peek() {
                Some(b) if b == want => self.pos += 1,
                None => return Err(self.err(JsonErrorKind::UnexpectedEnd)),
                Some(_) => return Err(self.err(JsonErrorKind::InvalidLiteral)),
            }
        }
        Ok(())
    }

    fn number(&mut self) -> Result<(), TrimError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.missing(JsonErrorKind::InvalidNumber)),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.missing(JsonErrorKind::InvalidNumber));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.missing(JsonErrorKind::InvalidNumber));
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }

    /// Scans a string starting at its opening quote; leaves `pos` after the closing quote and
    /// returns whether it contains any escape.
    ///
    /// This is the hot loop: a large body is mostly one long transcript with an escape (`\n`)
    /// every few dozen bytes, so a `memchr2` call per escape would dominate (measured: slower
    /// than byte-wise SWAR). On x86_64 the block scanner of `string_scan.rs` answers, and the
    /// exact loop only names the error of an invalid string.
    fn string(&mut self) -> Result<bool, TrimError> {
        #[cfg(target_arch = "x86_64")]
        if let Some((close, escaped)) =
            string_scan::closing_quote(self.body, self.pos + 1, &mut self.utf8)
        {
            self.pos = close + 1;
            return Ok(escaped);
        }
        let escaped = self.string_exact()?;
        if !self.utf8.covers(self.body, self.pos) {
            // The caller reports the exact offset.
            return Err(self.err(JsonErrorKind::InvalidUtf8));
        }
        Ok(escaped)
    }

    /// The exact string scan (8 bytes a step, SWAR, for a quote, a backslash or a control
    /// byte; UTF-8 is checked by the caller): on x86_64, run only when the fast path finds the
    /// string invalid, to name the error and its offset.
    #[cfg_attr(target_arch = "x86_64", cold)]
    fn string_exact(&mut self) -> Result<bool, TrimError> {
        let body = self.body;
        let mut pos = self.pos + 1;
        let mut escaped = false;
        loop {
            let stop = loop {
                if let Some(chunk) = body.get(pos..pos + 32) {
                    // Test word by word: the first hit ends the search, no re-scan.
                    let found = special(word(&chunk[..8]));
                    if found != 0 {
                        break pos + first_flagged(found);
                    }
                    let found = special(word(&chunk[8..16]));
                    if found != 0 {
                        break pos + 8 + first_flagged(found);
                    }
                    let found = special(word(&chunk[16..24]));
                    if found != 0 {
                        break pos + 16 + first_flagged(found);
                    }
                    let found = special(word(&chunk[24..]));
                    if found != 0 {
                        break pos + 24 + first_flagged(found);
                    }
                    pos += 32;
                } else {
                    let rest = &body[pos..];
                    break pos
                        + rest
                            .iter()
                            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                            .unwrap_or(rest.len());
                }
            };
            match body.get(stop) {
                Some(b'\\') => {
                    escaped = true;
                    // Two-byte escapes (`\n` above all) are the common case: no call.
                    pos = match body.get(stop + 1) {
                        Some(b'n' | b'"' | b'\\' | b'/' | b't' | b'r' | b'b' | b'f') => stop + 2,
                        _ => escape_end(body, stop)?,
                    };
                }
                Some(b'"') => {
                    self.pos = stop + 1;
                    return Ok(escaped);
                }
                Some(&b) if b >= 0x80 => {
                    pos = stop;
                    // Non-ASCII text comes in runs (words): stay here for the whole run.
                    while let Some(&lead) = body.get(pos) {
                        let len = match lead {
                            0..0x80 => break,
                            // Two-byte characters (Latin, Cyrillic, ...) are the common case.
                            0xC2..=0xDF if body.get(pos + 1).is_some_and(|&b| b & 0xC0 == 0x80) => {
                                2
                            }
                            _ => utf8_char_len(body, pos).ok_or(TrimError::InvalidJson {
                                offset: pos,
                                reason: JsonErrorKind::InvalidUtf8,
                            })?,
                        };
                        pos += len;
                    }
                }
                Some(_) => return Err(self.err_at(stop, JsonErrorKind::ControlCharInString)),
                None => return Err(self.err_at(stop, JsonErrorKind::UnterminatedString)),
            }
        }
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Offset of the first flagged byte; borrows only run upwards, so the lowest flag is a true
/// hit.
fn first_flagged(found: u64) -> usize {
    (found.trailing_zeros() / 8) as usize
}

fn word(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(bytes);
    u64::from_le_bytes(buf)
}

/// High bit set in each byte of `w` that is `"`, `\` or below 0x20 (plus possibly some bytes
/// above the lowest such byte, from borrows). Non-ASCII bytes need no stop: the whole body's
/// UTF-8 was validated up front.
fn special(w: u64) -> u64 {
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero_quote = quote.wrapping_sub(ONES) & !quote;
    let zero_backslash = backslash.wrapping_sub(ONES) & !backslash;
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (zero_quote | zero_backslash | control) & HIGH_BITS
}

/// Length of the valid UTF-8 character starting at `pos` (a non-ASCII lead byte), following
/// the Unicode table of well-formed sequences (no overlongs, surrogates or values past
/// U+10FFFF), or `None` if it is malformed.
fn utf8_char_len(body: &[u8], pos: usize) -> Option<usize> {
    let cont = |i: usize| body.get(pos + i).is_some_and(|&b| b & 0xC0 == 0x80);
    let second_in = |lo: u8, hi: u8| body.get(pos + 1).is_some_and(|&b| (lo..=hi).contains(&b));
    let (ok, len) = match body[pos] {
        0xC2..=0xDF => (cont(1), 2),
        0xE0 => (second_in(0xA0, 0xBF) && cont(2), 3),
        0xE1..=0xEC | 0xEE..=0xEF => (cont(1) && cont(2), 3),
        0xED => (second_in(0x80, 0x9F) && cont(2), 3),
        0xF0 => (second_in(0x90, 0xBF) && cont(2) && cont(3), 4),
        0xF1..=0xF3 => (cont(1) && cont(2) && cont(3), 4),
        0xF4 => (second_in(0x80, 0x8F) && cont(2) && cont(3), 4),
        _ => (false, 1),
    };
    ok.then_some(len)
}

/// Validates the escape starting with the backslash at `pos` and returns the offset after it.
fn escape_end(body: &[u8], pos: usize) -> Result<usize, TrimError> {
    let bad = |offset| TrimError::InvalidJson {
        offset,
        reason: JsonErrorKind::InvalidEscape,
    };
    match body.get(pos + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(pos + 2),
        Some(b'u') => {
            let hex = body.get(pos + 2..pos + 6).ok_or(TrimError::InvalidJson {
                offset: body.len(),
                reason: JsonErrorKind::UnexpectedEnd,
            })?;
            match hex.iter().position(|b| !b.is_ascii_hexdigit()) {
                Some(i) => Err(bad(pos + 2 + i)),
                None => Ok(pos + 6),
            }
        }
        Some(_) => Err(bad(pos)),
        None => Err(TrimError::InvalidJson {
            offset: body.len(),
            reason: JsonErrorKind::UnexpectedEnd,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(input: &str) -> (usize, JsonErrorKind) {
        match Tape::parse(input.as_bytes()) {
            Err(TrimError::InvalidJson { offset, reason }) => (offset, reason),
            other => panic!("expected invalid json for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn parse_within_caps_the_tape() {
        let body = br#"{"a":[1,2,3],"b":"x"}"#; // 6 values
        assert_eq!(Tape::parse_within(body, 6).unwrap().nodes.len(), 6);
        assert!(Tape::parse_within(body, 6).unwrap().nodes.capacity() <= 6);
        assert!(matches!(
            Tape::parse_within(body, 5),
            Err(TrimError::TooManyValues { max_values: 5 })
        ));
        // A long array grows the tape in steps, never past the cap.
        let many = format!("[{}0]", "0,".repeat(9_999));
        let tape = Tape::parse_within(many.as_bytes(), 10_001).unwrap();
        assert_eq!(tape.nodes.len(), 10_001);
        assert!(tape.nodes.capacity() <= 10_001);
        assert!(Tape::parse_within(many.as_bytes(), 10_000).is_err());
    }

    #[test]
    fn tape_records_members_and_elements() {
        let body = br#" {"a": [1, "x"], "b\n": {}} "#;
        let tape = Tape::parse(body).unwrap();
        assert_eq!(tape.nodes.len(), 5);
        let kids: Vec<u32> = tape.children(0).collect();
        assert_eq!(kids, vec![1, 4]);
        assert_eq!(
            tape.slot(1),
            Slot::Key {
                raw: b"a",
                escaped: false
            }
        );
        assert_eq!(
            tape.slot(4),
            Slot::Key {
                raw: b"b\\n",
                escaped: true
            }
        );
        assert_eq!(tape.slot(3), Slot::Index(1));
        assert_eq!(tape.string_raw(3), b"x");
        let root = tape.nodes[0];
        assert_eq!((root.start, root.end), (1, body.len() as u32 - 1));
    }

    #[test]
    fn accepts_number_spellings_and_lone_surrogates() {
        for ok in [
            "1.0",
            "1e3",
            "-0.5E-7",
            "12345678901234567890",
            r#""\uDE00 lone low""#,
            r#""\uD83D\uDE00""#,
            "[]",
            " {} ",
        ] {
            Tape::parse(ok.as_bytes()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_invalid_json_with_offsets() {
        assert_eq!(err_of("{} x"), (3, JsonErrorKind::TrailingData));
        assert_eq!(err_of(r#"{"a":"b"#), (7, JsonErrorKind::UnterminatedString));
        assert_eq!(err_of(r#""a\x""#), (2, JsonErrorKind::InvalidEscape));
        assert_eq!(err_of(r#""\u12g4""#), (5, JsonErrorKind::InvalidEscape));
        assert_eq!(
            err_of("\"a\u{1}\""),
            (2, JsonErrorKind::ControlCharInString)
        );
        assert_eq!(err_of("01"), (1, JsonErrorKind::TrailingData));
        assert_eq!(err_of("1."), (2, JsonErrorKind::UnexpectedEnd));
        assert_eq!(err_of("[1,]"), (3, JsonErrorKind::ExpectedValue));
        assert_eq!(err_of(r#"{"a" 1}"#), (5, JsonErrorKind::ExpectedColon));
        assert_eq!(err_of("{1:2}"), (1, JsonErrorKind::ExpectedKey));
        assert_eq!(err_of("[1 2]"), (3, JsonErrorKind::ExpectedCommaOrEnd));
        assert_eq!(err_of("tru"), (3, JsonErrorKind::UnexpectedEnd));
        assert_eq!(err_of("nul!"), (3, JsonErrorKind::InvalidLiteral));
        assert_eq!(err_of(""), (0, JsonErrorKind::UnexpectedEnd));
        let bad_utf8 = [b'"', b'a', 0xff, b'"'];
        assert!(matches!(
            Tape::parse(&bad_utf8),
            Err(TrimError::InvalidJson {
                offset: 2,
                reason: JsonErrorKind::InvalidUtf8
            })
        ));
    }

    #[test]
    fn invalid_utf8_is_found_anywhere_and_reported_first() {
        // Past the first validated chunk, in a long string, in a key, and outside strings;
        // before a syntax error that comes earlier in the body, as when UTF-8 was validated
        // for the whole body before the scan.
        let long = "é".repeat(100_000);
        let cases: [(Vec<u8>, usize); 4] = [
            (
                [br#"{"t":""#, long.as_bytes(), b"\xff\"}"].concat(),
                6 + long.len(),
            ),
            (
                [br#"{"t":""#, long.as_bytes(), b"\xC3\"}"].concat(),
                6 + long.len(),
            ),
            (b"{\"a\xe2\x82\":1}".to_vec(), 3),
            (
                [br#"[x, "#.as_slice(), long.as_bytes(), b"\xff"].concat(),
                4 + long.len(),
            ),
        ];
        for (body, offset) in cases {
            assert_eq!(
                Tape::parse(&body).unwrap_err(),
                TrimError::InvalidJson {
                    offset,
                    reason: JsonErrorKind::InvalidUtf8
                }
            );
        }
        // Characters of 2, 3 and 4 bytes across every chunk boundary are accepted.
        for ch in ["é", "€", "😀"] {
            for shift in 0..4 {
                let text = format!("{}{}", "a".repeat(shift), ch.repeat(70_000));
                let body = format!(r#"{{"t":"{text}","u":"{text}"}}"#);
                let tape = Tape::parse(body.as_bytes()).unwrap();
                assert_eq!(tape.string_raw(1), text.as_bytes());
            }
        }
    }

    #[test]
    fn depth_limit_is_an_error_not_a_crash() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        Tape::parse(ok.as_bytes()).unwrap();
        let deep = "[".repeat(100_000);
        assert!(matches!(
            Tape::parse(deep.as_bytes()),
            Err(TrimError::TooDeep { .. })
        ));
    }
}
