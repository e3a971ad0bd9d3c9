//! Measures `payload-guard trim --config F --route r` as a whole process (start to exit) on a
//! 20 MiB seeded Synthflow-shaped payload, against a small program that does the same job
//! through a DOM: read the file, parse it into a `serde_json::Value`, drop the
//! `analysis.*_feedback` fields, cut the middle of `call.transcript` to fit, serialize, write.
//! Both run alternately, `RUNS` times each; the bench prints the medians and their ratio.
//!
//! The baseline program is this bench binary itself, started with `VALUE_TRIM_BASELINE` set,
//! so it costs a process start like the real binary does. Run with
//! `cargo bench --bench trim_cli` (outside `--bench` mode, as under `cargo test`, it does
//! nothing). The payload is generated into a temporary directory, never committed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use payload_guard::trim::testdata::synthflow_payload;

const MIB: usize = 1024 * 1024;
/// Whole-process runs of each program.
const RUNS: usize = 30;
/// The route's `upstream_limit` (and the baseline's target).
const LIMIT: usize = MIB;
const BASELINE_ENV: &str = "VALUE_TRIM_BASELINE";

const CONFIG: &str = r#"
[[routes]]
name = "synthflow"
path_prefix = "/hooks/synthflow"
upstream = "http://127.0.0.1:3000/webhook"
max_body = "32MiB"
upstream_limit = "1MiB"
on_oversize = "trim"
protect = ["call.call_id"]

[[routes.trim]]
path = "analysis.*_feedback"
action = "drop"

[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"
"#;

fn main() {
    if let Some(file) = std::env::var_os(BASELINE_ENV) {
        value_trim(Path::new(&file), LIMIT);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("trim_cli: measured only under `cargo bench --bench trim_cli`");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let payload = dir.path().join("synthflow-20MiB.json");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&payload, synthflow_payload(20 * MIB, 42)).expect("write payload");
    std::fs::write(&config, CONFIG).expect("write config");

    let engine = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_payload-guard"));
        cmd.arg("trim")
            .arg("--config")
            .arg(&config)
            .args(["--route", "synthflow"])
            .arg(&payload);
        cmd
    };
    let baseline = || {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.env(BASELINE_ENV, &payload);
        cmd
    };
    // The outputs agree on size class (both at most the limit) before anything is timed.
    for (name, mut cmd) in [("payload-guard", engine()), ("baseline", baseline())] {
        let out = cmd.stderr(Stdio::null()).output().expect("run");
        assert!(out.status.success(), "{name} failed: {:?}", out.status);
        assert!(
            out.stdout.len() <= LIMIT,
            "{name} wrote {} bytes",
            out.stdout.len()
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("output is JSON");
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ours.push(time(engine()));
        theirs.push(time(baseline()));
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        "trim_cli/20MiB: payload-guard trim {:.1} ms, serde_json::Value program {:.1} ms: {:.1}x (medians of {RUNS} whole-process runs)",
        ms(ours),
        ms(theirs),
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}

/// Wall time of one run, start to exit, output discarded.
fn time(mut cmd: Command) -> Duration {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let start = Instant::now();
    let status = cmd.status().expect("run");
    let elapsed = start.elapsed();
    assert!(status.success());
    elapsed
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The baseline: the same cut through a DOM. Drops `analysis.*_feedback`, then keeps the head
/// and tail of `call.transcript` (half each, whole characters) with a marker so the serialized
/// document fits `limit`, and writes it to stdout.
fn value_trim(file: &Path, limit: usize) {
    let bytes = std::fs::read(file).expect("read payload");
    let mut doc: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
    if let Some(analysis) = doc.get_mut("analysis").and_then(|a| a.as_object_mut()) {
        analysis.retain(|key, _| !key.ends_with("_feedback"));
    }
    let transcript = doc["call"]["transcript"].take();
    let text = transcript.as_str().unwrap_or_default();
    // The document without the transcript's content, then what the transcript may take.
    let rest = serde_json::to_vec(&doc).expect("serialisable").len();
    let marker = "\n[... bytes removed ...]\n";
    let budget = limit.saturating_sub(rest + escaped_len(marker));
    // Half the budget to the head (whole characters), the rest to the tail.
    let mut head_end = 0;
    let mut used = 0;
    for (i, c) in text.char_indices() {
        let len = escaped_len(c.encode_utf8(&mut [0; 4]));
        if used + len > budget.div_ceil(2) {
            break;
        }
        used += len;
        head_end = i + c.len_utf8();
    }
    let mut tail_start = text.len();
    for (i, c) in text[head_end..].char_indices().rev() {
        let len = escaped_len(c.encode_utf8(&mut [0; 4]));
        if used + len > budget {
            break;
        }
        used += len;
        tail_start = head_end + i;
    }
    let cut = format!("{}{marker}{}", &text[..head_end], &text[tail_start..]);
    doc["call"]["transcript"] = serde_json::Value::String(cut);
    let out = serde_json::to_vec(&doc).expect("serialisable");
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out).expect("write stdout");
}

/// Length of `text` as serde_json writes it inside a string.
fn escaped_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0C => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}
