//! Feeds arbitrary bytes to the trim stage with a fixed set of rules (every action, wildcards,
//! quoted keys) and checks that it never panics and that any output it produces is valid.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use payload_guard::trim::{ActionSpec, Keep, RuleSet, RuleSpec, string_at, top_fields, trim};

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let rule = |path: &str, action| RuleSpec {
            path: path.to_owned(),
            action,
        };
        let specs = [
            rule(
                "call.transcript",
                ActionSpec::KeepLines {
                    head: 2,
                    tail: 3,
                    marker: None,
                },
            ),
            rule(
                "call.transcript",
                ActionSpec::Truncate {
                    keep: Keep::HeadTail,
                    max_bytes: Some(64),
                    marker: None,
                },
            ),
            rule("analysis.*_feedback", ActionSpec::Drop),
            rule("*.turns", ActionSpec::KeepItems { head: 1, tail: 1 }),
            rule("[*]", ActionSpec::Drop),
            rule(
                "*[*].text",
                ActionSpec::Truncate {
                    keep: Keep::Tail,
                    max_bytes: None,
                    marker: Some("~{removed}".to_owned()),
                },
            ),
            rule("\"a.b\"", ActionSpec::Drop),
        ];
        RuleSet::compile(&specs, &["call.call_id".to_owned()]).expect("fuzz rules compile")
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the target so small and large cuts are both explored.
    let target = data.first().map_or(0, |&b| usize::from(b) * 4);
    if let Ok(out) = trim(data, rules(), target) {
        assert!(out.body.len() <= data.len());
        assert_eq!(out.fits, out.body.len() <= target);
        if out.applied.is_empty() {
            assert_eq!(out.body, data);
        } else {
            // Re-trimming the output must succeed: it is valid JSON by construction.
            trim(&out.body, rules(), usize::MAX).expect("trim output is valid json");
        }
    }
    let _ = top_fields(data, 5);
    let _ = string_at(data, "call.call_id");
});
