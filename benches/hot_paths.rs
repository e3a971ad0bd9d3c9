//! Micro-benchmarks for the per-request pure functions, each next to a baseline measured in the
//! same run:
//!
//! - route matching over 100 routes, and over one (`route::RouteTable::find`: a hash lookup of
//!   the path cut at each `/` from the right) against the naive scan that tests every prefix
//!   and keeps the longest;
//! - header filtering (`forward::prepare_request_headers`: hop-by-hop removal, `X-Forwarded-*`,
//!   `X-Request-Id`, `Host`) on a Synthflow webhook's headers, against cloning the same
//!   `HeaderMap` (what forwarding costs at the least);
//! - the global allocator (`alloc::Mimalloc`) against the `mimalloc` crate's `MiMalloc`, which
//!   makes every call in mimalloc's aligned form: one allocation and free of each size a 2 KiB
//!   request allocates often (a small struct, a header value, a 2 KiB body, a boxed request
//!   future, hyper's 8 KiB read buffer).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use payload_guard::forward::{ForwardedFor, prepare_request_headers};
use payload_guard::route::RouteTable;

/// 100 prefixes: 20 tenants × 5 hooks, some nested, like a multi-tenant webhook gateway.
fn prefixes() -> Vec<String> {
    let mut out = Vec::new();
    for tenant in 0..20 {
        out.push(format!("/t{tenant}"));
        out.push(format!("/t{tenant}/hooks"));
        out.push(format!("/t{tenant}/hooks/synthflow"));
        out.push(format!("/t{tenant}/hooks/synthflow/post-call"));
        out.push(format!("/t{tenant}/calls"));
    }
    out
}

/// What the table replaces: test every prefix, keep the longest on a segment boundary.
fn naive_find<'a>(prefixes: &[String], path: &'a str) -> Option<(usize, &'a str)> {
    let mut best: Option<(usize, usize, &'a str)> = None;
    for (i, p) in prefixes.iter().enumerate() {
        if let Some(rest) = path.strip_prefix(p.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
            && best.is_none_or(|(len, _, _)| p.len() > len)
        {
            best = Some((p.len(), i, rest));
        }
    }
    best.map(|(_, i, rest)| (i, rest))
}

fn bench_routes(c: &mut Criterion) {
    let prefixes = prefixes();
    let table = RouteTable::new(prefixes.iter().map(String::as_str));
    // A deep hit, a shallow hit, a miss.
    let paths = [
        ("deep_hit", "/t17/hooks/synthflow/post-call/abc"),
        ("shallow_hit", "/t3/other"),
        ("miss", "/unknown/path"),
    ];
    for (name, path) in paths {
        let table_found = table.find(path).map(|m| (m.index, m.rest));
        assert_eq!(table_found, naive_find(&prefixes, path), "{path}");
        let mut group = c.benchmark_group(format!("route_100/{name}"));
        group.bench_function("table", |b| b.iter(|| table.find(black_box(path))));
        group.bench_function("naive_scan", |b| {
            b.iter(|| naive_find(&prefixes, black_box(path)))
        });
        group.finish();
    }
    // The common deployment: one route.
    let one = vec!["/hooks/synthflow".to_string()];
    let table = RouteTable::new(one.iter().map(String::as_str));
    let path = "/hooks/synthflow";
    let mut group = c.benchmark_group("route_1/hit");
    group.bench_function("table", |b| b.iter(|| table.find(black_box(path))));
    group.bench_function("naive_scan", |b| {
        b.iter(|| naive_find(&one, black_box(path)))
    });
    group.finish();
}

/// The headers of a Synthflow post-call webhook as they reach the proxy.
fn webhook_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "hooks.example.com"),
        ("user-agent", "python-requests/2.31.0"),
        ("accept-encoding", "gzip, deflate"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
        ("content-length", "1048576"),
        (
            "http_synthflow_signature",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        ),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-request-id", "4b0c9a52-5f7e-4d8e-9c1a-0f3a1e2b7c64"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn bench_headers(c: &mut Criterion) {
    let headers = webhook_headers();
    let request_id = HeaderValue::from_static("4b0c9a52-5f7e-4d8e-9c1a-0f3a1e2b7c64");
    let fwd = ForwardedFor {
        peer: "198.51.100.23".parse().expect("ip"),
        proto: "https",
        host: Some("hooks.example.com"),
        request_id: Some(&request_id),
        preserve_host: false,
        upstream_host: None,
    };
    let mut group = c.benchmark_group("headers/synthflow_webhook");
    group.bench_function("prepare_request_headers", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                prepare_request_headers(&mut h, black_box(&fwd));
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("clone_baseline", |b| b.iter(|| black_box(&headers).clone()));
    group.finish();
}

/// Sizes and alignments a 2 KiB request allocates, in a request's proportions.
const REQUEST_LAYOUTS: [(usize, usize); 6] = [
    (48, 8),
    (96, 8),
    (64, 1),
    (2_048, 1),
    (1_536, 8),
    (8_192, 1),
];

/// Allocates and frees each of [`REQUEST_LAYOUTS`] once, eight blocks alive at a time.
fn alloc_round(alloc: &impl std::alloc::GlobalAlloc) {
    let mut live = [std::ptr::null_mut::<u8>(); 8];
    for (round, slot) in live.iter_mut().enumerate() {
        let (size, align) = REQUEST_LAYOUTS[round % REQUEST_LAYOUTS.len()];
        let layout = std::alloc::Layout::from_size_align(size, align).expect("layout");
        // SAFETY: the layout's size is non-zero.
        let p = unsafe { alloc.alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` points to at least one writable byte.
        unsafe { p.write(round as u8) };
        *slot = black_box(p);
    }
    for (round, p) in live.into_iter().enumerate() {
        let (size, align) = REQUEST_LAYOUTS[round % REQUEST_LAYOUTS.len()];
        let layout = std::alloc::Layout::from_size_align(size, align).expect("layout");
        // SAFETY: `p` came from `alloc.alloc(layout)` above.
        unsafe { alloc.dealloc(p, layout) };
    }
}

fn bench_alloc(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc/request_sizes");
    group.bench_function("payload_guard_mimalloc", |b| {
        b.iter(|| alloc_round(&payload_guard::alloc::Mimalloc))
    });
    group.bench_function("mimalloc_crate_baseline", |b| {
        b.iter(|| alloc_round(&mimalloc::MiMalloc))
    });
    group.finish();
}

criterion_group!(benches, bench_routes, bench_headers, bench_alloc);
criterion_main!(benches);
