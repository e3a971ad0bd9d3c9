//! Sender presets: `sender = "retell"` on a route sets the signature scheme (its default header
//! comes with it), `id_path`, `protect` and trim rules for that sender's bulky fields. Any key
//! the route (or `[defaults]`) sets explicitly wins over the preset.
//!
//! Rules are ordered so the least useful bytes go first (per-word timings, metrics, duplicate
//! message formats, tool-call logs), then the middle of message arrays (keeping the start and
//! the end of the call), and only then the transcript text. Rules stop as soon as the payload
//! fits, so a payload slightly over the limit loses only the first of them.
//!
//! Field names follow each sender's payload documentation; the fixtures in `tests/fixtures/`
//! are written from it.

use crate::trim::{ActionSpec, Keep, RuleSpec};

/// One sender's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The `sender` value.
    pub sender: &'static str,
    /// The `[routes.verify] scheme` it implies.
    pub scheme: &'static str,
    /// Where the payload's id is, when the body has one (else the id is a header, and
    /// `id_path` keeps its default).
    pub id_path: Option<&'static str>,
    /// Trim rules, as `(path, action)` with the action written as in the README.
    pub rules: &'static [(&'static str, PresetAction)],
    /// Where this sender's payloads grow with the length of a call (plain paths to strings and
    /// arrays), for sample payloads of any size.
    pub grows: &'static [&'static str],
    /// A realistic payload of the documented shape (`tests/fixtures/`).
    pub fixture: &'static [u8],
    /// The fixture's content type.
    pub content_type: &'static str,
}

/// A preset rule's action (the subset of [`ActionSpec`] the presets use, as constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetAction {
    /// `action = "drop"`.
    Drop,
    /// `action = "keep_items"` with `head` and `tail`.
    KeepItems(usize, usize),
    /// `action = "truncate"`, `keep = "head_tail"`, as much as needed.
    Truncate,
}

/// Every preset, in documentation order.
pub const PRESETS: &[Preset] = &[
    Preset {
        sender: "synthflow",
        scheme: "synthflow",
        id_path: Some("call.call_id"),
        rules: &[
            ("analysis.*_feedback", PresetAction::Drop),
            ("call.transcript", PresetAction::Truncate),
        ],
        grows: &["call.transcript"],
        fixture: include_bytes!("../../tests/fixtures/synthflow-post-call.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "retell",
        scheme: "retell",
        id_path: Some("call.call_id"),
        rules: &[
            ("call.transcript_object[*].words", PresetAction::Drop),
            (
                "call.transcript_with_tool_calls[*].words",
                PresetAction::Drop,
            ),
            (
                "call.transcript_with_tool_calls",
                PresetAction::KeepItems(5, 50),
            ),
            ("call.transcript_object", PresetAction::KeepItems(5, 50)),
            ("call.transcript", PresetAction::Truncate),
        ],
        grows: &[
            "call.transcript",
            "call.transcript_object",
            "call.transcript_with_tool_calls",
        ],
        fixture: include_bytes!("../../tests/fixtures/retell-call-analyzed.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "elevenlabs",
        scheme: "elevenlabs",
        id_path: Some("data.conversation_id"),
        rules: &[
            (
                "data.transcript[*].conversation_turn_metrics",
                PresetAction::Drop,
            ),
            ("data.transcript[*].rag_retrieval_info", PresetAction::Drop),
            ("data.transcript[*].tool_results", PresetAction::Drop),
            ("data.transcript", PresetAction::KeepItems(5, 50)),
        ],
        grows: &["data.transcript"],
        fixture: include_bytes!("../../tests/fixtures/elevenlabs-post-call-transcription.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "vapi",
        scheme: "vapi",
        id_path: Some("message.call.id"),
        rules: &[
            (
                "message.artifact.messagesOpenAIFormatted",
                PresetAction::Drop,
            ),
            ("message.messagesOpenAIFormatted", PresetAction::Drop),
            ("message.artifact.messages", PresetAction::KeepItems(5, 50)),
            ("message.messages", PresetAction::KeepItems(5, 50)),
            ("message.artifact.transcript", PresetAction::Truncate),
            ("message.transcript", PresetAction::Truncate),
        ],
        grows: &[
            "message.artifact.messages",
            "message.artifact.messagesOpenAIFormatted",
            "message.artifact.transcript",
            "message.messages",
            "message.transcript",
        ],
        fixture: include_bytes!("../../tests/fixtures/vapi-end-of-call-report.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "stripe",
        scheme: "stripe",
        id_path: Some("id"),
        rules: &[("data.object.lines.data", PresetAction::KeepItems(10, 10))],
        grows: &["data.object.lines.data"],
        fixture: include_bytes!("../../tests/fixtures/stripe-invoice-paid.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "github",
        scheme: "github",
        id_path: None,
        rules: &[
            ("commits[*].modified", PresetAction::KeepItems(20, 0)),
            ("commits[*].added", PresetAction::KeepItems(20, 0)),
            ("commits[*].removed", PresetAction::KeepItems(20, 0)),
            ("commits", PresetAction::KeepItems(2, 5)),
        ],
        grows: &["commits"],
        fixture: include_bytes!("../../tests/fixtures/github-push.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "standard-webhooks",
        scheme: "standard-webhooks",
        id_path: None,
        rules: &[],
        grows: &["data.transcript"],
        fixture: include_bytes!("../../tests/fixtures/standard-webhooks-call-ended.json"),
        content_type: "application/json",
    },
    Preset {
        sender: "twilio",
        scheme: "twilio",
        id_path: None,
        rules: &[],
        grows: &[],
        fixture: include_bytes!("../../tests/fixtures/twilio-status-callback.form"),
        content_type: "application/x-www-form-urlencoded",
    },
];

/// The preset named `sender`.
pub fn find(sender: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.sender == sender)
}

/// Every sender name, comma-separated (for messages).
pub fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.sender)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Preset {
    /// The fixture grown to at least `min_bytes` by doubling the strings and arrays at
    /// [`Preset::grows`] (compact JSON, keys in sorted order); the fixture itself when the sender
    /// has nothing to grow or the fixture is not JSON.
    pub fn sample(&self, min_bytes: usize) -> Vec<u8> {
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(self.fixture) else {
            return self.fixture.to_vec();
        };
        if self.grows.is_empty() {
            return self.fixture.to_vec();
        }
        loop {
            let bytes = serde_json::to_vec(&doc).unwrap_or_default();
            if bytes.len() >= min_bytes {
                return bytes;
            }
            for path in self.grows {
                let target = path.split('.').try_fold(&mut doc, |v, key| v.get_mut(key));
                match target {
                    Some(serde_json::Value::String(s)) => *s = s.repeat(2),
                    Some(serde_json::Value::Array(items)) => items.extend(items.clone()),
                    _ => {}
                }
            }
        }
    }

    /// The preset's trim rules as specs.
    pub fn rule_specs(&self) -> Vec<RuleSpec> {
        self.rules
            .iter()
            .map(|(path, action)| RuleSpec {
                path: (*path).to_owned(),
                action: match *action {
                    PresetAction::Drop => ActionSpec::Drop,
                    PresetAction::KeepItems(head, tail) => ActionSpec::KeepItems { head, tail },
                    PresetAction::Truncate => ActionSpec::Truncate {
                        keep: Keep::HeadTail,
                        max_bytes: None,
                        marker: None,
                    },
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trim::RuleSet;
    use crate::verify::{SCHEME_NAMES, Scheme};

    #[test]
    fn every_preset_compiles_with_its_id_protected() {
        for p in PRESETS {
            assert!(Scheme::from_config(p.scheme, None).is_ok(), "{}", p.sender);
            let protect: Vec<String> = p.id_path.iter().map(|s| s.to_string()).collect();
            RuleSet::compile(&p.rule_specs(), &protect)
                .unwrap_or_else(|e| panic!("{}: {e:?}", p.sender));
        }
        // One preset per sender scheme (all but the generic one).
        assert_eq!(PRESETS.len(), SCHEME_NAMES.len() - 1);
        assert_eq!(find("retell").unwrap().id_path, Some("call.call_id"));
        assert!(find("Retell").is_none());
    }

    #[test]
    fn fixtures_parse_and_samples_grow() {
        for p in PRESETS {
            assert!(p.fixture.len() < 200 * 1024, "{}", p.sender);
            if p.content_type == "application/json" {
                let doc: serde_json::Value = serde_json::from_slice(p.fixture).unwrap();
                if let Some(id) = p.id_path {
                    assert!(
                        crate::trim::string_at(p.fixture, id).is_some(),
                        "{}: {id}",
                        p.sender
                    );
                }
                for path in p.grows {
                    let found = path.split('.').try_fold(&doc, |v, k| v.get(k));
                    assert!(found.is_some(), "{}: {path}", p.sender);
                }
            }
            if !p.grows.is_empty() {
                let sample = p.sample(600 * 1024);
                assert!(sample.len() >= 600 * 1024, "{}", p.sender);
                assert!(sample.len() < 2 * 1024 * 1024, "{}", p.sender);
            }
        }
    }
}
