//! Measures the trim stage on seeded Synthflow-shaped payloads (1 MiB and 20 MiB, size mostly in
//! `call.transcript`) against the DOM round trip it replaces (`serde_json::from_slice::<Value>`
//! then `to_vec`), in the same run, as throughput over the input size.
//!
//! Engine rules: a `head_tail` truncate of `call.transcript` (no cap, cut to the target) plus a
//! drop of `analysis.*_feedback`. Targets: 1 MiB for the 20 MiB payload, 512 KiB for the 1 MiB
//! payload (which would otherwise already fit).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use payload_guard::trim::testdata::synthflow_payload;
use payload_guard::trim::{ActionSpec, Keep, RuleSet, RuleSpec, trim};

const MIB: usize = 1024 * 1024;

fn rules() -> RuleSet {
    let specs = [
        RuleSpec {
            path: "call.transcript".into(),
            action: ActionSpec::Truncate {
                keep: Keep::HeadTail,
                max_bytes: None,
                marker: None,
            },
        },
        RuleSpec {
            path: "analysis.*_feedback".into(),
            action: ActionSpec::Drop,
        },
    ];
    RuleSet::compile(&specs, &["call.call_id".to_owned()]).expect("bench rules compile")
}

fn bench_trim(c: &mut Criterion) {
    let rules = rules();
    for (name, size, target) in [("1MiB", MIB, MIB / 2), ("20MiB", 20 * MIB, MIB)] {
        let body = synthflow_payload(size, 42);
        let mut group = c.benchmark_group(format!("trim/{name}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.sample_size(if size > MIB { 20 } else { 50 });
        group.bench_function("engine", |b| {
            b.iter(|| {
                let out = trim(black_box(&body), &rules, target).expect("valid payload");
                assert!(out.fits);
                out
            })
        });
        group.bench_function("serde_value_roundtrip", |b| {
            b.iter(|| {
                let value: serde_json::Value =
                    serde_json::from_slice(black_box(&body)).expect("valid payload");
                serde_json::to_vec(&value).expect("serialisable")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_trim);
criterion_main!(benches);
