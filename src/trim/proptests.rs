//! Property tests of the trim stage on random documents (non-ASCII text, `\uXXXX` escapes,
//! surrogate pairs, odd number spellings, random whitespace) and random rules: output is valid
//! JSON, values no rule addresses come out byte-identical, protected values are untouched, and
//! the target is reached whenever a rule can reach it. Plus: validity agrees with serde_json,
//! invalid UTF-8 is an error exactly when the trim would send it on, and nothing panics on
//! arbitrary bytes.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use proptest::sample::select;

use super::path::{Step, concrete_path, decode_key, push_step};
use super::scan::{Kind, Slot, Tape};
use super::{ActionSpec, Keep, RuleSet, RuleSpec, string_at, top_fields, trim};

#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(&'static str),
    /// Raw (already escaped) string content.
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(&'static str, J)>),
}

/// Keys as written in the document (raw); `caf\u00e9` must match the rule path `café`.
const KEYS: &[&str] = &[
    "a",
    "b",
    "text",
    "items",
    "x_feedback",
    "y_feedback",
    "caf\\u00e9",
    "a.b",
    "n",
];

const PROTECTED_RAW: &str = "ID-\\u00e9\\uD83D\\uDE00-123";

fn raw_string() -> impl Strategy<Value = String> {
    let tokens = vec![
        "a",
        "b",
        "z",
        " ",
        "line",
        "\\n",
        "\\n",
        "\\\"",
        "\\\\",
        "\\u00e9",
        "\\uD83D\\uDE00",
        "é",
        "😀",
        "—",
        "\\t",
        "\\/",
        "\\u2028",
    ];
    prop::collection::vec(select(tokens), 0..40).prop_map(|v| v.concat())
}

fn members(inner: impl Strategy<Value = J>) -> impl Strategy<Value = Vec<(&'static str, J)>> {
    prop::collection::vec((select(KEYS), inner), 0..6).prop_map(|mut members| {
        let mut seen = HashSet::new();
        members.retain(|(k, _)| seen.insert(*k));
        members
    })
}

fn json() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        select(vec!["0", "1.0", "1e3", "-12.5E-2", "12345678901234567890"]).prop_map(J::Num),
        raw_string().prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            members(inner).prop_map(J::Obj),
        ]
    })
}

/// A root object with the protected `id` member somewhere among random members.
fn document() -> impl Strategy<Value = (J, u64)> {
    (members(json()), any::<u64>()).prop_map(|(mut members, seed)| {
        let at = (seed % (members.len() as u64 + 1)) as usize;
        members.insert(at, ("id", J::Str(PROTECTED_RAW.to_owned())));
        (J::Obj(members), seed)
    })
}

struct Writer {
    out: String,
    rng: u64,
}

impl Writer {
    fn ws(&mut self) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.out
            .push_str(["", "", " ", "\n", "\n  ", "\t"][(self.rng % 6) as usize]);
    }

    fn value(&mut self, j: &J) {
        match j {
            J::Null => self.out.push_str("null"),
            J::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => self.out.push_str(n),
            J::Str(s) => {
                self.out.push('"');
                self.out.push_str(s);
                self.out.push('"');
            }
            J::Arr(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.value(item);
                    self.ws();
                }
                self.out.push(']');
            }
            J::Obj(members) => {
                self.out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.out.push('"');
                    self.out.push_str(k);
                    self.out.push('"');
                    self.ws();
                    self.out.push(':');
                    self.ws();
                    self.value(v);
                    self.ws();
                }
                self.out.push('}');
            }
        }
    }
}

fn render(doc: &J, seed: u64) -> String {
    let mut w = Writer {
        out: String::new(),
        rng: seed | 1,
    };
    w.ws();
    w.value(doc);
    w.ws();
    w.out
}

fn action() -> impl Strategy<Value = ActionSpec> {
    let marker = prop_oneof![
        Just(None),
        select(vec!["", "~", "[{removed}]", "\n\"{removed}\"\n"]).prop_map(|m| Some(m.to_owned())),
    ];
    let keep = select(vec![Keep::Head, Keep::Tail, Keep::HeadTail]);
    let action = prop_oneof![
        Just(ActionSpec::Drop),
        (keep.clone(), prop::option::of(60u64..120), marker.clone()).prop_map(
            |(keep, max_bytes, marker)| {
                ActionSpec::Truncate {
                    keep,
                    max_bytes,
                    marker,
                }
            }
        ),
        (keep, prop::option::of(1u64..12)).prop_map(|(keep, max_bytes)| ActionSpec::Truncate {
            keep,
            max_bytes,
            marker: Some(String::new()),
        }),
        (0usize..3, 0usize..3).prop_map(|(head, tail)| ActionSpec::KeepItems { head, tail }),
        (0usize..3, 0usize..3, marker).prop_map(|(head, tail, marker)| ActionSpec::KeepLines {
            head,
            tail,
            marker
        }),
    ];
    action
}

/// A rule path that matches `node`, with the steps whose bit is set in `wild` generalised to
/// `*` (keys and elements) and the other elements written `[*]`.
fn path_to(tape: &Tape<'_>, node: u32, wild: u8) -> String {
    let mut chain = Vec::new();
    let mut cur = node;
    while cur != 0 {
        chain.push(cur);
        cur = tape.nodes[cur as usize].parent;
    }
    let mut out = String::new();
    for (depth, &idx) in chain.iter().rev().enumerate() {
        // Root-level wildcards always hit the protected `id`: make them rarer.
        let wildcard = match depth {
            0 => wild & 0b111 == 0b111,
            d => wild & (1 << ((d + 2) % 8)) != 0,
        };
        match tape.slot(idx) {
            _ if wildcard => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('*');
            }
            Slot::Key { raw, escaped } => {
                let mut key = Vec::new();
                if escaped {
                    decode_key(raw, &mut key);
                } else {
                    key.extend_from_slice(raw);
                }
                push_step(&mut out, Step::Key(&String::from_utf8_lossy(&key)));
            }
            _ => push_step(&mut out, Step::AnyIndex),
        }
    }
    out
}

/// Raw value bytes of every scalar leaf, by concrete path.
fn leaves(body: &[u8]) -> HashMap<String, Vec<u8>> {
    let tape = Tape::parse(body).expect("valid json");
    let mut out = HashMap::new();
    for (i, node) in tape.nodes.iter().enumerate() {
        if !matches!(node.kind, Kind::Object | Kind::Array) {
            let raw = body[node.value_start as usize..node.end as usize].to_vec();
            out.insert(concrete_path(&tape, i as u32), raw);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn trims_are_valid_and_faithful(
        (doc, seed) in document(),
        picks in prop::collection::vec((any::<u32>(), any::<u8>(), action()), 1..4),
        target_permille in 0usize..1100,
    ) {
        let body = render(&doc, seed);
        let bytes = body.as_bytes();
        let tape = Tape::parse(bytes).unwrap();
        let specs: Vec<RuleSpec> = picks
            .into_iter()
            .map(|(pick, wild, action)| {
                let mut node = 1 + pick % (tape.nodes.len() as u32 - 1);
                if concrete_path(&tape, node) == "id" {
                    node = 1 + node % (tape.nodes.len() as u32 - 1);
                }
                RuleSpec { path: path_to(&tape, node, wild), action }
            })
            .collect();
        let rules = match RuleSet::compile(&specs, &["id".to_owned()]) {
            Ok(rules) => rules,
            Err(errors) => {
                // Only protection conflicts are possible with these specs.
                for e in errors {
                    prop_assert!(e.message.contains("protected path"), "{e}");
                }
                return Ok(());
            }
        };
        let target = body.len() * target_permille / 1000;
        let out = trim(bytes, &rules, target).unwrap();
        let text = std::str::from_utf8(&out.body).unwrap();
        let parsed = serde_json::from_str::<serde_json::Value>(text);
        prop_assert!(parsed.is_ok(), "invalid output {:?}\nfrom {}", parsed, body);
        prop_assert_eq!(out.original_len, body.len());
        prop_assert_eq!(out.fits, out.body.len() <= target);
        prop_assert!(out.body.len() <= body.len());
        if body.len() <= target {
            prop_assert_eq!(&out.body[..], bytes);
            prop_assert!(out.applied.is_empty());
        }
        if out.applied.is_empty() {
            prop_assert_eq!(&out.body[..], bytes);
        }
        let saved: usize = out.applied.iter().map(|a| a.removed).sum();
        prop_assert_eq!(saved, body.len() - out.body.len());

        // Leaves under no node any rule matches keep their path and their exact bytes.
        let addressed: HashSet<u32> = rules
            .rules
            .iter()
            .flat_map(|r| r.pattern.find_all(&tape, &|_| false))
            .collect();
        let after = leaves(&out.body);
        for (i, node) in tape.nodes.iter().enumerate() {
            if matches!(node.kind, Kind::Object | Kind::Array) {
                continue;
            }
            let mut cur = i as u32;
            let mut touched = false;
            loop {
                touched |= addressed.contains(&cur);
                if cur == 0 { break; }
                cur = tape.nodes[cur as usize].parent;
            }
            if touched {
                continue;
            }
            let path = concrete_path(&tape, i as u32);
            let raw = &bytes[node.value_start as usize..node.end as usize];
            prop_assert_eq!(
                after.get(&path).map(Vec::as_slice),
                Some(raw),
                "leaf {} changed\nbody {}\nout {}",
                path,
                body,
                text
            );
        }
        let id = format!("\"{PROTECTED_RAW}\"");
        prop_assert_eq!(after.get("id").map(Vec::as_slice), Some(id.as_bytes()));
    }

    #[test]
    fn truncate_without_cap_reaches_any_reachable_target(
        (doc, seed) in document(),
        big in raw_string(),
        repeat in 1usize..40,
        keep in select(vec![Keep::Head, Keep::Tail, Keep::HeadTail]),
        marker in prop::option::of(select(vec!["", "~", "<{removed}>"])),
        slack in 0usize..100,
    ) {
        let J::Obj(mut members) = doc else { unreachable!() };
        members.retain(|(k, _)| *k != "text");
        members.push(("text", J::Str(big.repeat(repeat))));
        let body = render(&J::Obj(members), seed);
        let specs = [RuleSpec {
            path: "text".into(),
            action: ActionSpec::Truncate { keep, max_bytes: None, marker: marker.map(str::to_owned) },
        }];
        let rules = RuleSet::compile(&specs, &["id".to_owned()]).unwrap();
        let content = big.len() * repeat;
        // The longest marker the rule can write: the default one with a 7-digit count.
        let floor = body.len() - content + 64;
        let target = floor + slack;
        let out = trim(body.as_bytes(), &rules, target).unwrap();
        prop_assert!(out.fits, "{} > {} for {}", out.body.len(), target, body);
        prop_assert!(serde_json::from_slice::<serde_json::Value>(&out.body).is_ok());
        // Cut exactly as much as needed: at most a few bytes of slack lost to cut points.
        if out.body.len() < body.len() {
            prop_assert!(out.body.len() + 24 >= target.min(body.len()), "{} vs {}", out.body.len(), target);
        }
    }

    #[test]
    fn validity_agrees_with_serde_json(input in prop::collection::vec(select(vec![
        "{", "}", "[", "]", "\"", ",", ":", "0", "1", "-", ".", "e", "+", " ", "\n",
        "true", "false", "null", "nul", "a", "\\", "\\n", "\\\"", "é", "\t", "\u{1}", "01",
    ]), 0..24)) {
        let input = input.concat();
        let ours = trim(input.as_bytes(), &RuleSet::compile(&[], &[]).unwrap(), 0).is_ok();
        let theirs = serde_json::from_str::<serde_json::Value>(&input).is_ok();
        prop_assert_eq!(ours, theirs, "{:?}", input);
    }

    #[test]
    fn invalid_utf8_is_an_error_exactly_when_it_would_be_sent(
        words in prop::collection::vec(select(vec!["bot:", "human:", "yes", "café", "日本", "🙂", "\\n", " "]), 1..400),
        at_permille in 0usize..1000,
        // No continuation bytes (10xxxxxx): cuts step over those to keep characters whole, so
        // the same-length clean body would be cut elsewhere.
        bad in select(vec![&b"\xff"[..], b"\xc0", b"\xe0", b"\xf5\xfe", b"\xf4"]),
        target_permille in 0usize..1100,
    ) {
        // `~` is nowhere else in the body: where it lands in the output, the bad bytes would.
        let text = words.concat();
        // Between two words, never inside an escape.
        let at = words[..at_permille * words.len() / 1000].iter().map(|w| w.len()).sum::<usize>();
        let body = |insert: &[u8]| [br#"{"id":"k","t":""#, &text.as_bytes()[..at], insert, &text.as_bytes()[at..], br#"","n":1}"#].concat();
        let (bad_body, good_body) = (body(bad), body(&vec![b'~'; bad.len()]));
        let rules = RuleSet::compile(
            &[RuleSpec { path: "t".into(), action: ActionSpec::Truncate { keep: Keep::HeadTail, max_bytes: None, marker: None } }],
            &["id".to_owned()],
        ).unwrap();
        let target = bad_body.len() * target_permille / 1000;
        let good = trim(&good_body, &rules, target).unwrap();
        let kept = good.body.contains(&b'~');
        match trim(&bad_body, &rules, target) {
            Ok(out) => {
                prop_assert!(!kept, "bad bytes at {} were kept yet accepted", 15 + at);
                prop_assert_eq!(out.body, good.body);
            }
            Err(err) => {
                prop_assert!(kept, "{err} though the bytes at {} were cut", 15 + at);
                prop_assert_eq!(err, super::TrimError::InvalidJson { offset: 15 + at, reason: super::JsonErrorKind::InvalidUtf8 });
            }
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..200), n in 0usize..5) {
        let rules = RuleSet::compile(
            &[
                RuleSpec { path: "*".into(), action: ActionSpec::KeepLines { head: 1, tail: 1, marker: None } },
                RuleSpec { path: "*".into(), action: ActionSpec::Truncate { keep: Keep::HeadTail, max_bytes: None, marker: None } },
                RuleSpec { path: "[*]".into(), action: ActionSpec::Drop },
            ],
            &[],
        ).unwrap();
        let _ = trim(&input, &rules, n);
        let _ = top_fields(&input, n);
        let _ = string_at(&input, "a.b");
    }
}
