//! Read-only reports on a body: which leaf paths take the most bytes (for `diagnose` and
//! incident records, to suggest trim rules) and the decoded string at a plain path (the
//! `call_id` used in logs and for the signature).

use std::collections::HashMap;

use super::TrimError;
use super::path::{Pattern, Segment, Step, decode_key, push_step};
use super::scan::{Kind, Slot, Tape};

/// Raw byte size of all values at one leaf path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSize {
    /// Leaf path with array indices normalised to `[*]`, e.g. `call.turns[*].text`.
    pub path: String,
    /// Sum of the raw JSON sizes of the values at that path (quotes and escapes included).
    pub bytes: usize,
}

/// The `n` largest leaf paths of `body` by raw value size, largest first (ties by path).
///
/// Array indices are normalised to `[*]` and summed, so `call.turns[*].text` aggregates every
/// turn. Objects and arrays are not leaves themselves; their scalar leaves are (an empty `{}`
/// or `[]` counts for nothing). A scalar body is one leaf with the empty path.
pub fn top_fields(body: &[u8], n: usize) -> Result<Vec<FieldSize>, TrimError> {
    Ok(top_fields_of(&Tape::parse(body)?, n))
}

/// [`top_fields`] of an already scanned body.
pub(crate) fn top_fields_of(tape: &Tape<'_>, n: usize) -> Vec<FieldSize> {
    let mut sizes: HashMap<String, usize> = HashMap::new();
    let mut path = String::new();
    let mut scratch = Vec::new();
    collect_leaves(tape, 0, &mut path, &mut scratch, &mut sizes);
    let mut fields: Vec<FieldSize> = sizes
        .into_iter()
        .map(|(path, bytes)| FieldSize { path, bytes })
        .collect();
    fields.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path)));
    fields.truncate(n);
    fields
}

/// Depth-first walk keeping one path buffer, so a leaf costs a lookup, not an allocation
/// (a new path is allocated once, the first time it is seen).
fn collect_leaves(
    tape: &Tape<'_>,
    node: u32,
    path: &mut String,
    scratch: &mut Vec<u8>,
    sizes: &mut HashMap<String, usize>,
) {
    let n = &tape.nodes[node as usize];
    match n.kind {
        Kind::Object | Kind::Array => {
            for child in tape.children(node) {
                let len = path.len();
                match tape.slot(child) {
                    Slot::Key { raw, escaped } => {
                        scratch.clear();
                        if escaped {
                            decode_key(raw, scratch);
                        } else {
                            scratch.extend_from_slice(raw);
                        }
                        push_step(path, Step::Key(&String::from_utf8_lossy(scratch)));
                    }
                    Slot::Index(_) => push_step(path, Step::AnyIndex),
                    Slot::Root => {}
                }
                collect_leaves(tape, child, path, scratch, sizes);
                path.truncate(len);
            }
        }
        _ => {
            let bytes = (n.end - n.value_start) as usize;
            match sizes.get_mut(path.as_str()) {
                Some(total) => *total += bytes,
                None => {
                    sizes.insert(path.clone(), bytes);
                }
            }
        }
    }
}

/// The decoded string at a plain dotted path such as `call.call_id` (quoted keys allowed, no
/// wildcards). `None` if the path is invalid or has wildcards, the body is not valid JSON, or
/// the value is absent or not a string. With duplicate keys the last one wins, as in most
/// JSON parsers a receiver would use.
pub fn string_at(body: &[u8], path: &str) -> Option<String> {
    string_at_of(&Tape::parse(body).ok()?, path)
}

/// [`string_at`] in an already scanned body.
pub(crate) fn string_at_of(tape: &Tape<'_>, path: &str) -> Option<String> {
    let pattern = Pattern::parse(path).ok()?;
    let mut node = 0;
    let mut scratch = Vec::new();
    for segment in &pattern.segments {
        let Segment::Key(glob) = segment else {
            return None;
        };
        if !glob.is_literal() || tape.nodes[node as usize].kind != Kind::Object {
            return None;
        }
        node = tape
            .children(node)
            .filter(|&child| match tape.slot(child) {
                Slot::Key {
                    raw,
                    escaped: false,
                } => glob.matches(raw),
                Slot::Key { raw, escaped: true } => {
                    scratch.clear();
                    decode_key(raw, &mut scratch);
                    glob.matches(&scratch)
                }
                _ => false,
            })
            .last()?;
    }
    if tape.nodes[node as usize].kind != Kind::String {
        return None;
    }
    let mut out = Vec::new();
    decode_key(tape.string_raw(node), &mut out);
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("synthflow-post-call.json");

    #[test]
    fn top_fields_aggregates_array_elements() {
        let body = br#"{"t":[{"text":"abcd","n":1},{"text":"ef","n":22}],"x":"q","e":{},"z":[]}"#;
        let fields = top_fields(body, 10).unwrap();
        let got: Vec<(&str, usize)> = fields.iter().map(|f| (f.path.as_str(), f.bytes)).collect();
        assert_eq!(got, vec![("t[*].text", 10), ("t[*].n", 3), ("x", 3)]);
        assert_eq!(top_fields(body, 1).unwrap().len(), 1);
    }

    #[test]
    fn top_fields_on_fixture_and_odd_bodies() {
        let fields = top_fields(FIXTURE.as_bytes(), 3).unwrap();
        assert_eq!(fields[0].path, "call.transcript");
        assert_eq!(
            top_fields(b" 12 ", 5).unwrap(),
            vec![FieldSize {
                path: String::new(),
                bytes: 2
            }]
        );
        let quoted = top_fields(br#"{"a.b":{"":[["x"]]}}"#, 5).unwrap();
        assert_eq!(quoted[0].path, r#""a.b".""[*][*]"#);
        assert!(matches!(
            top_fields(b"{", 1),
            Err(TrimError::InvalidJson { offset: 1, .. })
        ));
    }

    #[test]
    fn string_at_decodes_plain_paths() {
        assert_eq!(
            string_at(FIXTURE.as_bytes(), "call.call_id").as_deref(),
            Some("1732630000000x222222222222222222")
        );
        let body = br#"{"a":{"caf\u00e9":"x\"\u00e9\n","n":1},"a.b":"q","d":"1","d":"2"}"#;
        assert_eq!(string_at(body, "a.café").as_deref(), Some("x\"é\n"));
        assert_eq!(string_at(body, "\"a.b\"").as_deref(), Some("q"));
        assert_eq!(string_at(body, "d").as_deref(), Some("2"));
        assert_eq!(string_at(body, "a.n"), None);
        assert_eq!(string_at(body, "a.missing"), None);
        assert_eq!(string_at(body, "a.*"), None);
        assert_eq!(string_at(body, "a.n.x"), None);
        assert_eq!(string_at(body, "a..b"), None);
        assert_eq!(
            string_at(br#"{"call":{"call_id":"x"}} ,"#, "call.call_id"),
            None
        );
    }
}

/// Bytes of a streamed body's head that [`top_fields_of_head`] is meant to see: streamed
/// bodies are never held whole, so their incidents sample this much of the start.
pub const HEAD_SAMPLE_BYTES: usize = 64 * 1024;

/// Like [`top_fields`], for the first bytes of a JSON body that may be cut anywhere (a
/// streamed body's head, at most [`HEAD_SAMPLE_BYTES`]): every leaf seen so far counts with the
/// bytes seen, a value cut off counts with what arrived. Never fails: a head that stops being
/// JSON ends the walk there.
pub fn top_fields_of_head(head: &[u8], n: usize) -> Vec<FieldSize> {
    /// One open container: an object (with the key its next value goes under) or an array.
    enum Open {
        Object { key: Option<String> },
        Array,
    }
    let path_of = |stack: &[Open]| {
        let mut path = String::new();
        for open in stack {
            match open {
                Open::Object { key: Some(key) } => push_step(&mut path, Step::Key(key)),
                Open::Object { key: None } => {}
                Open::Array => push_step(&mut path, Step::AnyIndex),
            }
        }
        path
    };
    let mut sizes: HashMap<String, usize> = HashMap::new();
    let mut stack: Vec<Open> = Vec::new();
    // In an object, whether the next string is a key.
    let mut want_key = false;
    let mut i = 0;
    while i < head.len() {
        let b = head[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => i += 1,
            b',' => {
                want_key = matches!(stack.last(), Some(Open::Object { .. }));
                i += 1;
            }
            b'{' => {
                if stack.len() >= super::MAX_DEPTH {
                    break;
                }
                stack.push(Open::Object { key: None });
                want_key = true;
                i += 1;
            }
            b'[' => {
                if stack.len() >= super::MAX_DEPTH {
                    break;
                }
                stack.push(Open::Array);
                want_key = false;
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                want_key = false;
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < head.len() && head[i] != b'"' {
                    i += if head[i] == b'\\' { 2 } else { 1 };
                }
                let end = (i + 1).min(head.len());
                if want_key && i < head.len() {
                    let mut key = Vec::new();
                    decode_key(&head[start + 1..i], &mut key);
                    if let Some(Open::Object { key: slot }) = stack.last_mut() {
                        *slot = Some(String::from_utf8_lossy(&key).into_owned());
                    }
                    want_key = false;
                } else if !want_key {
                    *sizes.entry(path_of(&stack)).or_default() += end - start;
                }
                i = end;
            }
            _ => {
                // A number, true, false or null: up to the next delimiter.
                let start = i;
                while i < head.len()
                    && !matches!(head[i], b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                {
                    i += 1;
                }
                if want_key {
                    break; // not JSON any more
                }
                *sizes.entry(path_of(&stack)).or_default() += i - start;
            }
        }
    }
    let mut fields: Vec<FieldSize> = sizes
        .into_iter()
        .map(|(path, bytes)| FieldSize { path, bytes })
        .collect();
    fields.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path)));
    fields.truncate(n);
    fields
}

#[cfg(test)]
mod head_tests {
    use super::*;

    #[test]
    fn a_whole_body_gives_the_same_fields_as_top_fields() {
        let body = br#"{"call":{"call_id":"c1","transcript":"hello world","turns":[{"text":"a"},{"text":"bcd"}]},"n":12,"ok":true,"x":null,"a.b":"q"}"#;
        let mut want = top_fields(body, 10).unwrap();
        let mut got = top_fields_of_head(body, 10);
        want.sort_by(|a, b| a.path.cmp(&b.path));
        got.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(got, want);
    }

    #[test]
    fn a_cut_head_counts_what_arrived() {
        let body = br#"{"call":{"call_id":"c1","transcript":"0123456789"#;
        let got = top_fields_of_head(body, 5);
        assert_eq!(got[0].path, "call.transcript");
        assert_eq!(got[0].bytes, 11); // the opening quote and ten digits
        assert_eq!(
            got[1],
            FieldSize {
                path: "call.call_id".into(),
                bytes: 4
            }
        );
        // Cut inside a key, an escape or a number: no panic, what came before stands.
        for cut in 0..body.len() {
            let _ = top_fields_of_head(&body[..cut], 5);
        }
        assert!(top_fields_of_head(b"", 5).is_empty());
        assert!(top_fields_of_head(b"not json", 5).len() <= 1);
    }
}
