//! The trim stage: when a JSON body is over a receiver's byte limit, rewrite byte spans of the
//! original body by the route's rules, in order, until it fits.
//!
//! Nothing is ever re-serialised: the body is scanned once into a tape of byte spans
//! (`scan.rs`), rule paths select nodes on that tape (`path.rs`), and the rewriter
//! (`rewrite.rs`) splices the original bytes around the edited values; `fields.rs` answers
//! read-only questions (largest fields, the `call_id`). Every byte outside a trimmed value —
//! key order, whitespace, number spelling such as `1.0`, `1e3` or 20-digit integers, string
//! escapes — goes out exactly as the sender wrote it.
//!
//! # Path grammar
//!
//! A path is a list of segments separated by `.`:
//!
//! | segment | matches |
//! | --- | --- |
//! | `call` | the object key `call` |
//! | `*_feedback`, `extract_*`, `a*b` | object keys matching the glob; `*` stays inside one segment |
//! | `*` (a whole segment) | every key of an object and every element of an array |
//! | `[*]` (after a segment, no dot) | every element of an array |
//! | `"a.b"`, `"x\"y"`, `"*"` | the literal key; needed for keys containing `.`, `*`, `[`, `]` or `"`; inside quotes only `\"` and `\\` are escapes |
//!
//! Examples: `call.transcript`, `analysis.*_feedback`, `executed_actions.*.parameters_hard_coded`,
//! `call.turns[*].text`, `"meta.data".size`, `[*].id` (elements of a top-level array).
//! Keys are matched as decoded JSON strings: a key written `"caf\u00e9"` matches the path `café`.
//! There are no numeric indices in rule paths; concrete paths in reports print them as `[3]`.
//!
//! # Example
//!
//! ```
//! use payload_guard::trim::{trim, ActionSpec, RuleSet, RuleSpec};
//!
//! let rules = RuleSet::compile(
//!     &[RuleSpec { path: "analysis.*_feedback".into(), action: ActionSpec::Drop }],
//!     &["call.call_id".to_owned()],
//! )
//! .unwrap();
//! let body = br#"{"call":{"call_id":"c1"},"analysis":{"a":1,"a_feedback":"long text"}}"#;
//! let out = trim(body, &rules, 60).unwrap();
//! assert_eq!(out.body, br#"{"call":{"call_id":"c1"},"analysis":{"a":1}}"#);
//! assert!(out.fits);
//! assert_eq!(out.applied[0].path, "analysis.a_feedback");
//! ```

mod fields;
mod path;
pub mod payload;
mod rewrite;
mod scan;
#[cfg(target_arch = "x86_64")]
mod string_scan;
#[doc(hidden)]
pub mod testdata;

#[cfg(test)]
mod proptests;

use std::fmt;

pub use self::fields::{FieldSize, HEAD_SAMPLE_BYTES, string_at, top_fields, top_fields_of_head};
pub use self::rewrite::trim;
pub use self::scan::MAX_DEPTH;

use self::path::Pattern;

/// A scanned JSON body: scan once, then trim it, report its largest fields and read its id
/// without scanning again (the proxy needs all three for one oversized payload).
pub struct Document<'a> {
    tape: scan::Tape<'a>,
}

impl<'a> Document<'a> {
    /// Scans and validates `body` (the same errors as [`trim`]). As there, the UTF-8 of string
    /// content is checked on what a trim keeps: [`Document::trim`] reports invalid UTF-8 it
    /// would send on.
    pub fn parse(body: &'a [u8]) -> Result<Document<'a>, TrimError> {
        Self::parse_within(body, u64::MAX)
    }

    /// [`Document::parse`] within a memory cap: the scan's tape (one
    /// [`Document::BYTES_PER_VALUE`]-byte node per JSON value) may take at most `max_bytes`;
    /// a body of more values fails with [`TrimError::TooManyValues`] before it does.
    pub fn parse_within(body: &'a [u8], max_bytes: u64) -> Result<Document<'a>, TrimError> {
        let max_values = usize::try_from(max_bytes / Self::BYTES_PER_VALUE).unwrap_or(usize::MAX);
        Ok(Document {
            tape: scan::Tape::parse_structure_within(body, max_values)?,
        })
    }

    /// Memory per JSON value of the scan.
    pub const BYTES_PER_VALUE: u64 = std::mem::size_of::<scan::Node>() as u64;

    /// Memory the scan holds (its tape), in bytes.
    pub fn memory(&self) -> u64 {
        self.tape.nodes.capacity() as u64 * Self::BYTES_PER_VALUE
    }

    /// The bytes scanned.
    pub fn body(&self) -> &'a [u8] {
        self.tape.body
    }

    /// [`trim`] of this body.
    pub fn trim(&self, rules: &RuleSet, target: usize) -> Result<TrimOutcome, TrimError> {
        rewrite::trim_tape(&self.tape, rules, target)
    }

    /// [`top_fields`] of this body.
    pub fn top_fields(&self, n: usize) -> Vec<FieldSize> {
        fields::top_fields_of(&self.tape, n)
    }

    /// [`string_at`] in this body.
    pub fn string_at(&self, path: &str) -> Option<String> {
        fields::string_at_of(&self.tape, path)
    }
}

/// The protect list used when a route names none: the value Synthflow signs.
pub const DEFAULT_PROTECT: &[&str] = &["call.call_id"];

/// The marker used when a rule names none; `{removed}` becomes the number of raw bytes removed.
pub const DEFAULT_MARKER: &str = "\n[... {removed} bytes removed by payload-guard ...]\n";

/// One `[[routes.trim]]` entry as written by the user, before compilation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Path of the values to act on, in the grammar of the [module docs](self).
    pub path: String,
    /// What to do with each matched value.
    pub action: ActionSpec,
}

/// What a rule does to the values its path matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionSpec {
    /// Cut a string value (non-strings are skipped), leaving a marker in the gap.
    Truncate {
        /// Which part of the string survives.
        keep: Keep,
        /// Cap on the raw content (kept bytes plus marker); without it the string is cut
        /// exactly as much as needed to reach the target.
        max_bytes: Option<u64>,
        /// Marker text (decoded, e.g. real newlines); [`DEFAULT_MARKER`] when `None`.
        marker: Option<String>,
    },
    /// Remove the object member (key and value) or array element.
    Drop,
    /// Keep the first `head` and last `tail` elements of an array (non-arrays are skipped).
    KeepItems {
        /// Elements kept from the start.
        head: usize,
        /// Elements kept from the end.
        tail: usize,
    },
    /// Keep the first `head` and last `tail` lines of a string whose lines are separated by
    /// the escape `\n`, with a marker between them (non-strings are skipped).
    KeepLines {
        /// Lines kept from the start.
        head: usize,
        /// Lines kept from the end.
        tail: usize,
        /// Marker text (decoded); [`DEFAULT_MARKER`] when `None`.
        marker: Option<String>,
    },
}

/// Which part of a truncated string survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// The beginning.
    Head,
    /// The end.
    Tail,
    /// Both ends, half each (the head gets the odd byte).
    #[default]
    HeadTail,
}

/// Compiled rules of one route plus its protected paths. Build with [`RuleSet::compile`].
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub(crate) pattern: Pattern,
    pub(crate) action: Action,
}

/// A rule action with its marker pre-escaped.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Truncate {
        keep: Keep,
        max_bytes: Option<usize>,
        marker: rewrite::Marker,
    },
    Drop,
    KeepItems {
        head: usize,
        tail: usize,
    },
    KeepLines {
        head: usize,
        tail: usize,
        marker: rewrite::Marker,
    },
}

/// Where a [`RuleError`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOrigin {
    /// The rule at this 0-based index of the `rules` slice.
    Rule(usize),
    /// The protect path at this 0-based index of the `protect` slice.
    Protect(usize),
}

/// One problem found while compiling rules; [`RuleSet::compile`] reports all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Which rule or protect entry is at fault.
    pub origin: RuleOrigin,
    /// The field at fault: `path`, `protect`, `max_bytes`, `marker`.
    pub field: &'static str,
    /// What is wrong and how to fix it (lowercase, no trailing period).
    pub message: String,
    /// 0-based char position in the path, for syntax errors.
    pub position: Option<usize>,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.origin {
            RuleOrigin::Rule(i) => write!(f, "trim rule {i}: {}", self.field)?,
            RuleOrigin::Protect(i) => write!(f, "protect entry {i}")?,
        }
        if let Some(pos) = self.position {
            write!(f, " at char {pos}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RuleError {}

impl RuleSet {
    /// Compiles `rules` against `protect`, collecting every error instead of stopping at the
    /// first. A rule whose path can match a protected path, an ancestor or a descendant of one
    /// is an error, whatever its action.
    pub fn compile(rules: &[RuleSpec], protect: &[String]) -> Result<RuleSet, Vec<RuleError>> {
        let mut errors = Vec::new();
        let mut protected = Vec::new();
        for (i, text) in protect.iter().enumerate() {
            match Pattern::parse(text) {
                Ok(p) => protected.push((i, text, p)),
                Err(e) => errors.push(RuleError {
                    origin: RuleOrigin::Protect(i),
                    field: "protect",
                    message: e.message,
                    position: Some(e.position),
                }),
            }
        }
        let mut compiled = Vec::new();
        for (i, spec) in rules.iter().enumerate() {
            let origin = RuleOrigin::Rule(i);
            let mut error = |field, message: String, position| {
                errors.push(RuleError {
                    origin,
                    field,
                    message,
                    position,
                })
            };
            let pattern = match Pattern::parse(&spec.path) {
                Ok(p) => Some(p),
                Err(e) => {
                    error("path", e.message, Some(e.position));
                    None
                }
            };
            if let Some(pattern) = &pattern {
                for (pi, text, p) in &protected {
                    if pattern.overlaps(p) {
                        error(
                            "path",
                            format!(
                                "path `{}` can match protected path `{text}` (protect entry {pi}) or one of its parents or children: narrow the path or change protect",
                                spec.path
                            ),
                            None,
                        );
                    }
                }
            }
            let action = match &spec.action {
                ActionSpec::Truncate {
                    keep,
                    max_bytes,
                    marker,
                } => {
                    let marker = rewrite::Marker::new(marker.as_deref().unwrap_or(DEFAULT_MARKER));
                    let max_bytes = max_bytes.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
                    match max_bytes {
                        Some(0) => error(
                            "max_bytes",
                            "max_bytes must be at least 1: use action = \"drop\" to remove the value".into(),
                            None,
                        ),
                        Some(max) if marker.len(1) > max => error(
                            "marker",
                            format!(
                                "marker takes {} bytes, more than max_bytes = {max}: shorten the marker or raise max_bytes",
                                marker.len(1)
                            ),
                            None,
                        ),
                        _ => {}
                    }
                    Action::Truncate {
                        keep: *keep,
                        max_bytes,
                        marker,
                    }
                }
                ActionSpec::Drop => Action::Drop,
                &ActionSpec::KeepItems { head, tail } => Action::KeepItems { head, tail },
                ActionSpec::KeepLines { head, tail, marker } => Action::KeepLines {
                    head: *head,
                    tail: *tail,
                    marker: rewrite::Marker::new(marker.as_deref().unwrap_or(DEFAULT_MARKER)),
                },
            };
            if let Some(pattern) = pattern {
                compiled.push(CompiledRule { pattern, action });
            }
        }
        if errors.is_empty() {
            Ok(RuleSet { rules: compiled })
        } else {
            Err(errors)
        }
    }

    /// Number of compiled rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (trimming can then only validate).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Result of [`trim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrimOutcome {
    /// The smallest body reached; byte-identical to the input when nothing was applied.
    pub body: Vec<u8>,
    /// Length of the input body.
    pub original_len: usize,
    /// Whether `body.len() <= target`.
    pub fits: bool,
    /// Every edit made, in order.
    pub applied: Vec<Applied>,
}

/// One edit made by [`trim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Concrete path of the edited value, e.g. `analysis.call_flow_feedback` or `call.turns[3]`.
    pub path: String,
    /// 0-based index of the rule (in the slice given to [`RuleSet::compile`]).
    pub rule: usize,
    /// Bytes the edit took off the body (net of any marker inserted).
    pub removed: usize,
    /// The number a marker inserted by the edit shows: the raw bytes cut from the string
    /// (`removed` plus the marker's own length). `None` when the edit inserted no marker.
    pub marked: Option<usize>,
}

/// Why a body could not be trimmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrimError {
    /// The body is not valid JSON; `offset` is the byte offset of the mistake.
    #[error("invalid JSON at byte {offset}: {reason}")]
    InvalidJson {
        /// Byte offset of the first bad byte (the body length for a truncated body).
        offset: usize,
        /// What is wrong there.
        reason: JsonErrorKind,
    },
    /// Objects and arrays nest deeper than [`MAX_DEPTH`].
    #[error(
        "json nests deeper than {max_depth} levels at byte {offset}: the sender must flatten it"
    )]
    TooDeep {
        /// Byte offset of the bracket that went too deep.
        offset: usize,
        /// The limit.
        max_depth: usize,
    },
    /// The scan would need more memory than it may take (see [`Document::parse_within`]).
    #[error("more than {max_values} JSON values: the scan would go over the buffer budget")]
    TooManyValues {
        /// How many values fit.
        max_values: usize,
    },
    /// The body is larger than the engine's 4 GiB offset space.
    #[error("body of {len} bytes is too large to trim: lower the route's buffer limit below 4 GiB")]
    TooLarge {
        /// Body length in bytes.
        len: usize,
    },
}

/// The kind of JSON syntax error in [`TrimError::InvalidJson`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonErrorKind {
    /// The body ends in the middle of a value.
    #[error("unexpected end of input")]
    UnexpectedEnd,
    /// A value was expected.
    #[error("expected a value")]
    ExpectedValue,
    /// An object key (a string) was expected.
    #[error("expected an object key string")]
    ExpectedKey,
    /// `:` was expected after an object key.
    #[error("expected ':' after the key")]
    ExpectedColon,
    /// `,` or the closing bracket was expected.
    #[error("expected ',' or a closing bracket")]
    ExpectedCommaOrEnd,
    /// Misspelt `true`, `false` or `null`.
    #[error("invalid literal")]
    InvalidLiteral,
    /// Malformed number.
    #[error("invalid number")]
    InvalidNumber,
    /// Unknown escape or bad `\u` hex digits.
    #[error("invalid escape sequence in string")]
    InvalidEscape,
    /// A raw control character (below 0x20) inside a string.
    #[error("unescaped control character in string")]
    ControlCharInString,
    /// Invalid UTF-8 inside a string.
    #[error("invalid utf-8 in string")]
    InvalidUtf8,
    /// A string without its closing quote.
    #[error("unterminated string")]
    UnterminatedString,
    /// Bytes after the top-level value.
    #[error("trailing data after the json value")]
    TrailingData,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protect() -> Vec<String> {
        DEFAULT_PROTECT.iter().map(|s| (*s).to_owned()).collect()
    }

    fn rule(path: &str, action: ActionSpec) -> RuleSpec {
        RuleSpec {
            path: path.to_owned(),
            action,
        }
    }

    #[test]
    fn compile_rejects_rules_touching_protected_paths() {
        let rules = [
            rule("call.*", ActionSpec::Drop),
            rule("*.call_id", ActionSpec::Drop),
            rule("call", ActionSpec::Drop),
            rule("call.transcript", ActionSpec::Drop),
            rule("call.call_id", ActionSpec::KeepItems { head: 1, tail: 1 }),
        ];
        let errors = RuleSet::compile(&rules, &protect()).unwrap_err();
        let origins: Vec<_> = errors.iter().map(|e| e.origin).collect();
        assert_eq!(
            origins,
            vec![
                RuleOrigin::Rule(0),
                RuleOrigin::Rule(1),
                RuleOrigin::Rule(2),
                RuleOrigin::Rule(4)
            ]
        );
        assert_eq!(
            errors[0].to_string(),
            "trim rule 0: path: path `call.*` can match protected path `call.call_id` (protect entry 0) or one of its parents or children: narrow the path or change protect"
        );
    }

    #[test]
    fn compile_collects_every_error_with_positions() {
        let rules = [
            rule("a..b", ActionSpec::Drop),
            rule(
                "x",
                ActionSpec::Truncate {
                    keep: Keep::Head,
                    max_bytes: Some(0),
                    marker: None,
                },
            ),
            rule(
                "y",
                ActionSpec::Truncate {
                    keep: Keep::Head,
                    max_bytes: Some(10),
                    marker: None,
                },
            ),
        ];
        let errors = RuleSet::compile(&rules, &["ok".into(), "bad[".into()]).unwrap_err();
        assert_eq!(errors.len(), 4);
        assert_eq!(errors[0].origin, RuleOrigin::Protect(1));
        assert_eq!(errors[0].position, Some(3));
        assert_eq!(
            errors[1].to_string(),
            "trim rule 0: path at char 2: empty segment: remove the extra dot or quote a key containing '.'"
        );
        assert_eq!(errors[2].field, "max_bytes");
        assert_eq!(errors[3].field, "marker");
        for e in &errors {
            let text = e.to_string();
            assert!(!text.ends_with('.'), "{text}");
            assert_eq!(text, text.to_lowercase(), "lowercase: {text}");
        }
    }

    #[test]
    fn default_rules_compile() {
        let rules = [
            rule(
                "call.transcript",
                ActionSpec::Truncate {
                    keep: Keep::HeadTail,
                    max_bytes: Some(204_800),
                    marker: None,
                },
            ),
            rule("analysis.*_feedback", ActionSpec::Drop),
            rule(
                "call.transcript_object",
                ActionSpec::KeepItems { head: 2, tail: 50 },
            ),
            rule(
                "call.transcript",
                ActionSpec::KeepLines {
                    head: 5,
                    tail: 200,
                    marker: None,
                },
            ),
        ];
        let set = RuleSet::compile(&rules, &protect()).unwrap();
        assert_eq!(set.len(), 4);
        assert!(!set.is_empty());
    }
}
