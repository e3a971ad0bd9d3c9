//! `payload-guard demo` as the built binary: every step behaves as the report says, with no
//! configuration file and nothing left in the working directory.

use std::process::Command;

/// The report line that starts (after its indent) with `prefix`.
fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in the report:\n{report}"))
}

#[test]
fn demo_shows_the_413_straight_and_the_trim_through_the_proxy() {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(crate::support::binary())
        // The demo needs no configuration: none in the folder it runs in.
        .args(["demo"])
        .current_dir(cwd.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{report}\nstderr:\n{stderr}"
    );

    let small_straight = line(&report, "1. small payload");
    assert!(small_straight.ends_with("200 OK"), "{small_straight}");
    let large_straight = line(&report, "2. large payload");
    assert!(
        large_straight.contains("straight to the receiver")
            && large_straight.contains("413 Payload Too Large"),
        "{large_straight}"
    );
    let small_through = line(&report, "3. small payload through payload-guard");
    assert!(
        small_through.contains("200 OK  (passed byte-identical)"),
        "{small_through}"
    );
    let large_through = line(&report, "4. large payload through payload-guard");
    assert!(
        large_through.contains("200 OK  (") && large_through.contains(" KiB -> "),
        "{large_through}"
    );
    assert!(
        line(&report, "trimmed: ").contains("call.transcript="),
        "{report}"
    );
    assert_eq!(
        line(&report, "call.call_id unchanged: "),
        "call.call_id unchanged: 1732630000000x222222222222222222"
    );
    let incident = line(&report, "incident: ")
        .strip_prefix("incident: ")
        .unwrap();
    let incident: serde_json::Value = serde_json::from_str(incident)
        .unwrap_or_else(|e| panic!("the incident line is not JSON ({e}): {incident}"));
    assert_eq!(incident["kind"], "over_upstream_limit", "{incident}");
    assert_eq!(incident["action"], "trimmed", "{incident}");
    assert_eq!(incident["route"], "synthflow", "{incident}");
    assert!(
        incident["bytes_after"].as_u64().unwrap() <= 100 * 1024,
        "{incident}"
    );
    assert!(
        report
            .trim_end()
            .ends_with("every step behaved as expected"),
        "{report}"
    );
    assert!(!report.contains("NOT AS EXPECTED"), "{report}");

    // The incident log went to a temporary directory, not the working directory.
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);
}
