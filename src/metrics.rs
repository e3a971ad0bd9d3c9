//! The Prometheus exposition: counters and histograms that the pipeline stages update as
//! requests pass, plus the readings owned elsewhere (buffer budget, open connections, dropped
//! incidents, spool depth) that are taken at scrape time as a [`Snapshot`].
//!
//! Label values come only from the configuration (route names) and from fixed sets (status
//! class, incident kind, reload result, spool state), never from request data, so the number of
//! series is bounded by the configuration. Unknown incident kinds are counted under `other`
//! rather than creating a new series per spelling.
//!
//! The output is the Prometheus text format 0.0.4 ([`CONTENT_TYPE`]), which every scraper and a
//! plain `curl` read, in a stable order: families as registered, series sorted by their labels
//! (the registry keeps series in hash maps, whose order changes from one process to the next).
//!
//! Redelivery is counted where an attempt is settled (`deliver::count_redelivery`, after
//! `deliver::settle`): [`Metrics::redelivery_attempt`] and [`Metrics::dead_lettered`]. The per-route spool gauges
//! come from the scrape-time [`Snapshot`] ([`spool_route_readings`]).

use std::sync::Arc;
use std::time::SystemTime;

use crate::incident::Kind;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sizes::SizeRing;

/// The `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `route` label of a request that matched no route.
pub const UNMATCHED_ROUTE: &str = "-";

/// Upper bounds of the body-size histograms: 1 KiB, 4 KiB, ... 64 MiB (x4).
const BODY_BYTES_BUCKETS: (f64, f64, u16) = (1024.0, 4.0, 9);

/// Upper bounds of the upstream-duration histogram, in seconds: 5 ms to 60 s.
const UPSTREAM_SECONDS_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The incident kinds: the same vocabulary as the incident log ([`Kind::ALL`]).
const INCIDENT_KINDS: [Kind; Kind::ALL.len()] = Kind::ALL;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IncidentLabels {
    route: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    route: String,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    route: String,
    reason: &'static str,
}

/// How one redelivery attempt of a spooled payload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx: the record is deleted.
    Delivered,
    /// No answer, or one worth retrying (408, 413, 429, 5xx): retried later, or dead-lettered
    /// once `retry_for` is over.
    Failed,
    /// A final answer (another 4xx): dead-lettered.
    Refused,
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 3] = [Self::Delivered, Self::Failed, Self::Refused];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

/// Why a spooled payload moved to `dead/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The receiver refused it for good.
    Refused,
    /// `retry_for` ran out.
    Expired,
}

impl DeadLetterReason {
    const ALL: [DeadLetterReason; 2] = [Self::Refused, Self::Expired];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Expired => "expired",
        }
    }
}

/// One route's waiting spooled payloads, read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolRouteReading {
    /// The route's name.
    pub route: String,
    /// Records in `ready/` (waiting for redelivery, including those being delivered now).
    pub records: u64,
    /// Age of the oldest of them, from when it was received, in seconds.
    pub oldest_age_seconds: f64,
}

/// The per-route readings of a spool's ready records (see
/// [`crate::spool::SpoolStore::ready_by_route`]: the disk spool reads each record's metadata,
/// the PostgreSQL spool answers with its last count).
pub fn spool_route_readings(
    spool: &crate::spool::Store,
    now: SystemTime,
) -> Vec<SpoolRouteReading> {
    spool
        .ready_by_route()
        .into_iter()
        .map(|(route, records, oldest)| SpoolRouteReading {
            route,
            records,
            oldest_age_seconds: now.duration_since(oldest).map_or(0.0, |d| d.as_secs_f64()),
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpoolLabels {
    state: String,
}

type RouteHistograms = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Readings owned by other parts of the proxy, taken right before each scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Incidents the writer dropped because its queue was full (a counter: never decreases).
    pub incidents_dropped: u64,
    /// Bytes of the global buffer budget currently reserved.
    pub buffer_in_use_bytes: u64,
    /// The global buffer budget.
    pub buffer_budget_bytes: u64,
    /// Client connections currently open.
    pub open_connections: u64,
    /// The process's resident memory (RSS) in bytes, when the platform tells.
    pub resident_bytes: Option<u64>,
    /// Spooled items per state (e.g. `("pending", 3)`); states are a fixed set chosen by the
    /// spool, not request data.
    pub spool_depth: Vec<(String, u64)>,
    /// Waiting spooled payloads per route (see [`spool_route_readings`]).
    pub spool_routes: Vec<SpoolRouteReading>,
}

/// One route's counters, as [`Metrics::route_counts`] reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RouteCounts {
    /// Requests answered 2xx.
    pub requests_2xx: u64,
    /// Requests answered 3xx.
    pub requests_3xx: u64,
    /// Requests answered 4xx (the proxy's own refusals included).
    pub requests_4xx: u64,
    /// Requests answered 5xx.
    pub requests_5xx: u64,
    /// Bodies trimmed.
    pub trims: u64,
    /// Bytes removed by trimming.
    pub trimmed_bytes: u64,
    /// Incidents by kind name, every counted kind listed.
    pub incidents: std::collections::BTreeMap<&'static str, u64>,
}

/// The proxy's metrics. Cheap to clone: clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_body_bytes: RouteHistograms,
    forwarded_body_bytes: RouteHistograms,
    upstream_duration_seconds: RouteHistograms,
    trims: Family<RouteLabels, Counter>,
    trimmed_bytes: Family<RouteLabels, Counter>,
    incidents: Family<IncidentLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    connections_shed: Family<ShedLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    redelivery_attempts: Family<AttemptLabels, Counter>,
    redelivered: Family<RouteLabels, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    /// Recent body sizes per route, for the console (not exported to Prometheus).
    sizes: SizeRing,
    /// Each route's per-request series, resolved once (see [`Metrics::request`]).
    /// Keyed by the configured route names, which senders cannot choose: hashed with Fx, not
    /// the default SipHash (a lookup on every request).
    route_series: std::sync::RwLock<rustc_hash::FxHashMap<String, Arc<RouteSeries>>>,
}

/// The series [`Metrics::request`] updates for one route, each created on first use (a series
/// appears in `/metrics` when it first counts something, as before).
#[derive(Debug, Default)]
struct RouteSeries {
    /// By status class, `1xx` to `5xx`.
    requests: [std::sync::OnceLock<Counter>; 5],
    request_body_bytes: std::sync::OnceLock<Histogram>,
    forwarded_body_bytes: std::sync::OnceLock<Histogram>,
    upstream_duration_seconds: std::sync::OnceLock<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the registry with every family registered (and no series yet).
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_body_bytes: RouteHistograms = Family::new_with_constructor(body_histogram);
        let forwarded_body_bytes: RouteHistograms = Family::new_with_constructor(body_histogram);
        let upstream_duration_seconds: RouteHistograms =
            Family::new_with_constructor(upstream_histogram);
        let trims = Family::<RouteLabels, Counter>::default();
        let trimmed_bytes = Family::<RouteLabels, Counter>::default();
        let incidents = Family::<IncidentLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let connections_shed = Family::<ShedLabels, Counter>::default();
        let redelivery_attempts = Family::<AttemptLabels, Counter>::default();
        let redelivered = Family::<RouteLabels, Counter>::default();
        let dead_lettered = Family::<DeadLetterLabels, Counter>::default();

        // Counters get their `_total` suffix from the encoder.
        let mut registry = Registry::default();
        registry.register(
            "payload_guard_requests",
            "Requests answered, by route and status class of the response to the sender",
            requests.clone(),
        );
        registry.register(
            "payload_guard_request_body_bytes",
            "Size of request bodies as received from the sender",
            request_body_bytes.clone(),
        );
        registry.register(
            "payload_guard_forwarded_body_bytes",
            "Size of request bodies as forwarded to the receiver (after trimming)",
            forwarded_body_bytes.clone(),
        );
        registry.register(
            "payload_guard_upstream_duration_seconds",
            "Time from sending the request upstream to the receiver's response head",
            upstream_duration_seconds.clone(),
        );
        registry.register(
            "payload_guard_trims",
            "Request bodies trimmed to fit the receiver's limit",
            trims.clone(),
        );
        registry.register(
            "payload_guard_trimmed_bytes",
            "Bytes removed from request bodies by trimming",
            trimmed_bytes.clone(),
        );
        registry.register(
            "payload_guard_incidents",
            "Size incidents recorded, by route and kind",
            incidents.clone(),
        );
        registry.register(
            "payload_guard_errors",
            "Requests the proxy answered itself or that were abandoned, by route and error code \
             (the access log's `error`; route `-` for refusals before routing)",
            errors.clone(),
        );
        registry.register(
            "payload_guard_connections_shed",
            "Connections refused or closed to keep room for senders, by reason",
            connections_shed.clone(),
        );
        registry.register(
            "payload_guard_config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        registry.register(
            "payload_guard_redelivery_attempts",
            "Redelivery attempts of spooled payloads, by route and outcome (delivered, failed, refused)",
            redelivery_attempts.clone(),
        );
        registry.register(
            "payload_guard_redelivered",
            "Spooled payloads delivered by redelivery, by route",
            redelivered.clone(),
        );
        registry.register(
            "payload_guard_dead_lettered",
            "Spooled payloads moved to dead/, by route and reason (refused, expired)",
            dead_lettered.clone(),
        );

        let metrics = Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                request_body_bytes,
                forwarded_body_bytes,
                upstream_duration_seconds,
                trims,
                trimmed_bytes,
                incidents,
                errors,
                connections_shed,
                config_reloads,
                redelivery_attempts,
                redelivered,
                dead_lettered,
                sizes: SizeRing::new(),
                route_series: Default::default(),
            }),
        };
        // Both results exist from the start, so a first failed reload is an increase from 0.
        metrics.reload_counter("ok");
        metrics.reload_counter("failed");
        for reason in crate::shed::ShedReason::ALL {
            let _ = metrics.inner.connections_shed.get_or_create(&ShedLabels {
                reason: reason.as_str(),
            });
        }
        metrics
    }

    /// Records one request the proxy answered itself (or that was abandoned), by its stable
    /// error code (`ProxyError::code`); `route` is [`UNMATCHED_ROUTE`] before routing.
    pub fn error(&self, route: &str, code: &'static str) {
        self.inner
            .errors
            .get_or_create(&ErrorLabels {
                route: route.to_owned(),
                error: code,
            })
            .inc();
    }

    /// Records one connection shed (refused or closed) by the admission logic.
    pub fn shed(&self, reason: crate::shed::ShedReason) {
        self.inner
            .connections_shed
            .get_or_create(&ShedLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    fn reload_counter(&self, result: &'static str) -> Counter {
        self.inner
            .config_reloads
            .get_or_create_owned(&ReloadLabels { result })
    }

    /// Records one answered request: the status sent to the sender, the body size received,
    /// and, when the body went upstream, the size forwarded and the upstream time.
    ///
    /// `route` is the matched route's configured name, or [`UNMATCHED_ROUTE`].
    pub fn request(
        &self,
        route: &str,
        status: u16,
        body_bytes: u64,
        forwarded_bytes: Option<u64>,
        upstream_secs: Option<f64>,
    ) {
        let inner = &*self.inner;
        let series = self.route_series(route);
        let index = status_class_index(status);
        let class = STATUS_CLASSES[index];
        series.requests[index]
            .get_or_init(|| {
                inner.requests.get_or_create_owned(&RequestLabels {
                    route: route.to_owned(),
                    status_class: class,
                })
            })
            .inc();
        let labels = || RouteLabels {
            route: route.to_owned(),
        };
        series
            .request_body_bytes
            .get_or_init(|| inner.request_body_bytes.get_or_create_owned(&labels()))
            .observe(body_bytes as f64);
        if let Some(forwarded) = forwarded_bytes {
            series
                .forwarded_body_bytes
                .get_or_init(|| inner.forwarded_body_bytes.get_or_create_owned(&labels()))
                .observe(forwarded as f64);
        }
        if let Some(secs) = upstream_secs {
            series
                .upstream_duration_seconds
                .get_or_init(|| {
                    inner
                        .upstream_duration_seconds
                        .get_or_create_owned(&labels())
                })
                .observe(secs);
        }
    }

    /// `route`'s per-request series: one map lookup per request instead of a label set built
    /// (two strings allocated) and hashed for each of four families.
    fn route_series(&self, route: &str) -> Arc<RouteSeries> {
        let map = &self.inner.route_series;
        if let Some(series) = map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(route)
        {
            return series.clone();
        }
        map.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(route.to_owned())
            .or_default()
            .clone()
    }

    /// Records one trimmed body and how many bytes trimming removed.
    pub fn trimmed(&self, route: &str, bytes_removed: u64) {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        self.inner.trims.get_or_create(&labels).inc();
        self.inner
            .trimmed_bytes
            .get_or_create(&labels)
            .inc_by(bytes_removed);
    }

    /// Records one incident of `kind` (every kind has a series from the start, at zero).
    pub fn incident(&self, route: &str, kind: Kind) {
        let kind = kind.as_str();
        self.inner
            .incidents
            .get_or_create(&IncidentLabels {
                route: route.to_owned(),
                kind,
            })
            .inc();
    }

    /// Records one redelivery attempt of a spooled payload of `route` (a delivered one also
    /// counts in `payload_guard_redelivered_total`).
    pub fn redelivery_attempt(&self, route: &str, outcome: AttemptOutcome) {
        let inner = &*self.inner;
        inner
            .redelivery_attempts
            .get_or_create(&AttemptLabels {
                route: route.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        if outcome == AttemptOutcome::Delivered {
            inner
                .redelivered
                .get_or_create(&RouteLabels {
                    route: route.to_owned(),
                })
                .inc();
        }
    }

    /// Records one spooled payload of `route` moved to `dead/`.
    pub fn dead_lettered(&self, route: &str, reason: DeadLetterReason) {
        self.inner
            .dead_lettered
            .get_or_create(&DeadLetterLabels {
                route: route.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Recent request body sizes per route (see [`SizeRing`]).
    pub fn sizes(&self) -> &SizeRing {
        &self.inner.sizes
    }

    /// What has been counted for `route` since start-up.
    pub fn route_counts(&self, route: &str) -> RouteCounts {
        let inner = &*self.inner;
        let requests = |status_class| {
            inner
                .requests
                .get_or_create(&RequestLabels {
                    route: route.to_owned(),
                    status_class,
                })
                .get()
        };
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        RouteCounts {
            requests_2xx: requests("2xx"),
            requests_3xx: requests("3xx"),
            requests_4xx: requests("4xx"),
            requests_5xx: requests("5xx"),
            trims: inner.trims.get_or_create(&labels).get(),
            trimmed_bytes: inner.trimmed_bytes.get_or_create(&labels).get(),
            incidents: INCIDENT_KINDS
                .iter()
                .map(|&kind| {
                    let count = inner
                        .incidents
                        .get_or_create(&IncidentLabels {
                            route: route.to_owned(),
                            kind: kind.as_str(),
                        })
                        .get();
                    (kind.as_str(), count)
                })
                .collect(),
        }
    }

    /// Records one configuration reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reload_counter(if ok { "ok" } else { "failed" }).inc();
    }

    /// Renders every series, with the scrape-time readings of `snapshot`, in the Prometheus
    /// text format ([`CONTENT_TYPE`]).
    pub fn encode(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail, and the encoder's own errors only come from the
        // writer.
        let _ = prometheus_text::encode(&mut out, &self.inner.registry);
        let _ = prometheus_text::encode(&mut out, &snapshot_registry(snapshot));
        stable_order(&out)
    }

    /// Creates the zero series of a configured route (requests by status class, trims,
    /// incidents by kind), so that `rate()` and `increase()` see a 0 before the first event and
    /// alerts on a first incident fire. Call it for each route at startup and after a reload;
    /// calling it again is harmless. Histograms are left to appear on first use.
    pub fn init_route(&self, route: &str) {
        let inner = &*self.inner;
        for status_class in ["2xx", "3xx", "4xx", "5xx"] {
            let _ = inner.requests.get_or_create(&RequestLabels {
                route: route.to_owned(),
                status_class,
            });
        }
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        let _ = inner.trims.get_or_create(&labels);
        let _ = inner.trimmed_bytes.get_or_create(&labels);
        for kind in INCIDENT_KINDS {
            let _ = inner.incidents.get_or_create(&IncidentLabels {
                route: route.to_owned(),
                kind: kind.as_str(),
            });
        }
        for outcome in AttemptOutcome::ALL {
            let _ = inner.redelivery_attempts.get_or_create(&AttemptLabels {
                route: route.to_owned(),
                outcome: outcome.as_str(),
            });
        }
        let _ = inner.redelivered.get_or_create(&labels);
        for reason in DeadLetterReason::ALL {
            let _ = inner.dead_lettered.get_or_create(&DeadLetterLabels {
                route: route.to_owned(),
                reason: reason.as_str(),
            });
        }
    }
}

/// The exposition with each family's series sorted by their labels (`le` aside, so a
/// histogram's buckets keep their order) and families left in registration order.
fn stable_order(text: &str) -> String {
    fn series_key(line: &str) -> String {
        let Some((_, rest)) = line.split_once('{') else {
            return String::new();
        };
        let labels = rest.rsplit_once('}').map_or(rest, |(labels, _)| labels);
        labels
            .split(',')
            .filter(|pair| !pair.starts_with("le="))
            .collect::<Vec<_>>()
            .join(",")
    }
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        // Stable: the lines of one series (sum, count, buckets) keep their relative order.
        samples.sort_by_cached_key(|line| series_key(line));
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            out.push_str(line);
            out.push('\n');
        } else if !line.is_empty() {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

/// A registry built per scrape from the readings owned elsewhere, so no shared state has to be
/// set (and raced) before encoding.
fn snapshot_registry(snapshot: &Snapshot) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "payload_guard_incidents_dropped",
        "Incidents dropped because the incident writer's queue was full",
        ConstCounter::new(snapshot.incidents_dropped),
    );
    registry.register(
        "payload_guard_buffer_in_use_bytes",
        "Bytes of the global buffer budget currently reserved",
        ConstGauge::new(gauge_value(snapshot.buffer_in_use_bytes)),
    );
    registry.register(
        "payload_guard_buffer_budget_bytes",
        "The global buffer budget",
        ConstGauge::new(gauge_value(snapshot.buffer_budget_bytes)),
    );
    registry.register(
        "payload_guard_open_connections",
        "Client connections currently open",
        ConstGauge::new(gauge_value(snapshot.open_connections)),
    );
    if let Some(rss) = snapshot.resident_bytes {
        registry.register(
            "payload_guard_process_resident_bytes",
            "Resident memory of the proxy process (RSS), including what the allocator keeps",
            ConstGauge::new(gauge_value(rss)),
        );
    }
    let spool = Family::<SpoolLabels, Gauge>::default();
    for (state, depth) in &snapshot.spool_depth {
        spool
            .get_or_create(&SpoolLabels {
                state: state.clone(),
            })
            .set(gauge_value(*depth));
    }
    registry.register(
        "payload_guard_spool_depth",
        "Spooled items, by state",
        spool,
    );
    let route_records = Family::<RouteLabels, Gauge>::default();
    let route_oldest = Family::<RouteLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for reading in &snapshot.spool_routes {
        let labels = RouteLabels {
            route: reading.route.clone(),
        };
        route_records
            .get_or_create(&labels)
            .set(gauge_value(reading.records));
        route_oldest
            .get_or_create(&labels)
            .set(reading.oldest_age_seconds);
    }
    registry.register(
        "payload_guard_spool_route_depth",
        "Spooled payloads waiting for redelivery (ready/), by route",
        route_records,
    );
    registry.register(
        "payload_guard_spool_oldest_age_seconds",
        "Age of the oldest spooled payload waiting for redelivery, by route",
        route_oldest,
    );
    registry
}

fn body_histogram() -> Histogram {
    let (start, factor, count) = BODY_BYTES_BUCKETS;
    Histogram::new(exponential_buckets(start, factor, count))
}

fn upstream_histogram() -> Histogram {
    Histogram::new(UPSTREAM_SECONDS_BUCKETS)
}

/// The `status_class` label; codes outside 100..=599 (which `http` allows up to 999) count as
/// server errors.
/// The status classes, in [`RouteSeries::requests`] order.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `status`'s place in [`STATUS_CLASSES`] (anything outside 1xx-4xx counts as 5xx).
fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Gauges are `i64`; a reading past `i64::MAX` is clamped rather than wrapped.
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The process's resident set size in bytes (Linux: `VmRSS` of `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// One sample line of the text format.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses `name{k="v",...} value` lines; comments and blank lines are skipped. Label values
    /// written by the encoder never contain `"` or `,` here (route names are plain words).
    fn parse(text: &str) -> Vec<Sample> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                    let labels = rest
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .unwrap_or_else(|| panic!("unquoted label in {line:?}"));
                            (k.to_owned(), v.to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        samples
    }

    /// The value of the one sample named `name` with exactly `labels`; `le` is compared as a
    /// number, since the encoder writes bounds like `1.048576e+06`.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let same_label = |k: &str, want: &str, have: &str| {
            if k == "le" && want != "+Inf" {
                want.parse::<f64>().ok() == have.parse::<f64>().ok()
            } else {
                want == have
            }
        };
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, want)| {
                        s.labels
                            .get(*k)
                            .is_some_and(|have| same_label(k, want, have))
                    })
            })
            .collect();
        match found.as_slice() {
            [one] => one.value,
            [] => panic!(
                "no sample {name} {labels:?}; samples named {name}: {:#?}",
                samples
                    .iter()
                    .filter(|s| s.name == name)
                    .collect::<Vec<_>>()
            ),
            many => panic!("{} samples match {name} {labels:?}", many.len()),
        }
    }

    fn has(samples: &[Sample], name: &str) -> bool {
        samples.iter().any(|s| s.name == name)
    }

    fn traffic() -> Metrics {
        let m = Metrics::new();
        m.request("a", 200, 1000, Some(1000), Some(0.02));
        m.request("a", 202, 5000, Some(3000), Some(0.2));
        m.request("a", 204, 100, Some(100), Some(3.0));
        m.request("a", 413, 40 << 20, None, None);
        m.request("b", 502, 2048, Some(2048), Some(0.001));
        m.request(UNMATCHED_ROUTE, 404, 0, None, None);
        m.error("a", "body_too_large");
        m.error(UNMATCHED_ROUTE, "header_too_large");
        m.shed(crate::shed::ShedReason::EvictSlowBody);
        m.trimmed("a", 2000);
        m.trimmed("a", 500);
        m.incident("a", Kind::OverMaxBody);
        m.incident("a", Kind::OverUpstreamLimit);
        m.incident("a", Kind::OverUpstreamLimit);
        m.incident("b", Kind::Upstream413);
        m.incident("b", Kind::DuplicateConflict);
        m.reload(true);
        m.reload(true);
        m.reload(false);
        m
    }

    #[test]
    fn counters_by_route_and_class() {
        let s = parse(&traffic().encode(&Snapshot::default()));
        let requests = |route, class| {
            value(
                &s,
                "payload_guard_requests_total",
                &[("route", route), ("status_class", class)],
            )
        };
        assert_eq!(requests("a", "2xx"), 3.0);
        assert_eq!(requests("a", "4xx"), 1.0);
        assert_eq!(requests("b", "5xx"), 1.0);
        assert_eq!(requests("-", "4xx"), 1.0);
        let route_a = [("route", "a")];
        assert_eq!(value(&s, "payload_guard_trims_total", &route_a), 2.0);
        assert_eq!(
            value(&s, "payload_guard_trimmed_bytes_total", &route_a),
            2500.0
        );
        let reloads = |result| {
            value(
                &s,
                "payload_guard_config_reloads_total",
                &[("result", result)],
            )
        };
        assert_eq!(reloads("ok"), 2.0);
        assert_eq!(reloads("failed"), 1.0);
    }

    #[test]
    fn incidents_by_kind() {
        let s = parse(&traffic().encode(&Snapshot::default()));
        let incidents = |route, kind| {
            value(
                &s,
                "payload_guard_incidents_total",
                &[("route", route), ("kind", kind)],
            )
        };
        assert_eq!(incidents("a", "over_max_body"), 1.0);
        assert_eq!(incidents("a", "over_upstream_limit"), 2.0);
        assert_eq!(incidents("b", "upstream_413"), 1.0);
        assert_eq!(incidents("b", "duplicate_conflict"), 1.0);
        assert!(!s.iter().any(|x| x.labels.values().any(|v| v == "other")));
    }

    #[test]
    fn histograms_count_sum_and_buckets() {
        let s = parse(&traffic().encode(&Snapshot::default()));
        let a = [("route", "a")];
        let body = |suffix: &str, labels: &[(&str, &str)]| {
            value(
                &s,
                &format!("payload_guard_request_body_bytes_{suffix}"),
                labels,
            )
        };
        assert_eq!(body("count", &a), 4.0);
        assert_eq!(body("sum", &a), (1000 + 5000 + 100 + (40 << 20)) as f64);
        // Buckets are cumulative: 100 and 1000 fit 1 KiB, 5000 fits 16 KiB, 40 MiB fits 64 MiB.
        for (le, count) in [
            ("1024", 2.0),
            ("4096", 2.0),
            ("16384", 3.0),
            ("16777216", 3.0),
            ("67108864", 4.0),
            ("+Inf", 4.0),
        ] {
            assert_eq!(
                body("bucket", &[("route", "a"), ("le", le)]),
                count,
                "le={le}"
            );
        }
        let buckets = s
            .iter()
            .filter(|x| {
                x.name == "payload_guard_request_body_bytes_bucket" && x.labels["route"] == "a"
            })
            .count();
        assert_eq!(buckets, 10, "1 KiB..64 MiB x4 is 9 bounds, plus +Inf");

        // The 413 was not forwarded: three forwarded bodies, three upstream timings.
        let fwd = "payload_guard_forwarded_body_bytes";
        assert_eq!(value(&s, &format!("{fwd}_count"), &a), 3.0);
        assert_eq!(value(&s, &format!("{fwd}_sum"), &a), 4100.0);
        let up = "payload_guard_upstream_duration_seconds";
        assert_eq!(value(&s, &format!("{up}_count"), &a), 3.0);
        assert!((value(&s, &format!("{up}_sum"), &a) - 3.22).abs() < 1e-9);
        let up_bucket =
            |route, le| value(&s, &format!("{up}_bucket"), &[("route", route), ("le", le)]);
        assert_eq!(up_bucket("b", "0.005"), 1.0);
        assert_eq!(up_bucket("a", "0.01"), 0.0);
        assert_eq!(up_bucket("a", "0.025"), 1.0);
        assert_eq!(up_bucket("a", "2.5"), 2.0);
        assert_eq!(up_bucket("a", "5"), 3.0);
        assert_eq!(up_bucket("a", "60"), 3.0);
        assert!(
            !s.iter()
                .any(|x| x.name.starts_with(up) && x.labels.get("route").is_some_and(|r| r == "-"))
        );
    }

    #[test]
    fn snapshot_readings_at_scrape_time() {
        let m = Metrics::new();
        let snapshot = Snapshot {
            incidents_dropped: 7,
            buffer_in_use_bytes: 3 << 20,
            buffer_budget_bytes: 256 << 20,
            open_connections: 12,
            resident_bytes: Some(40 << 20),
            spool_depth: vec![("pending".into(), 4), ("failed".into(), 1)],
            spool_routes: vec![SpoolRouteReading {
                route: "synthflow".into(),
                records: 3,
                oldest_age_seconds: 42.5,
            }],
        };
        let s = parse(&m.encode(&snapshot));
        assert_eq!(value(&s, "payload_guard_incidents_dropped_total", &[]), 7.0);
        assert_eq!(
            value(&s, "payload_guard_buffer_in_use_bytes", &[]),
            (3u64 << 20) as f64
        );
        assert_eq!(
            value(&s, "payload_guard_buffer_budget_bytes", &[]),
            (256u64 << 20) as f64
        );
        assert_eq!(value(&s, "payload_guard_open_connections", &[]), 12.0);
        assert_eq!(
            value(&s, "payload_guard_process_resident_bytes", &[]),
            (40u64 << 20) as f64
        );
        let spool =
            |s: &[Sample], state| value(s, "payload_guard_spool_depth", &[("state", state)]);
        assert_eq!(spool(&s, "pending"), 4.0);
        assert_eq!(spool(&s, "failed"), 1.0);
        let route = [("route", "synthflow")];
        assert_eq!(value(&s, "payload_guard_spool_route_depth", &route), 3.0);
        assert_eq!(
            value(&s, "payload_guard_spool_oldest_age_seconds", &route),
            42.5
        );

        // The next scrape shows the next readings, not a sum; a state no longer reported is gone.
        let s = parse(&m.encode(&Snapshot {
            incidents_dropped: 9,
            ..Snapshot::default()
        }));
        assert_eq!(value(&s, "payload_guard_incidents_dropped_total", &[]), 9.0);
        assert_eq!(value(&s, "payload_guard_open_connections", &[]), 0.0);
        assert!(!has(&s, "payload_guard_spool_depth"));
    }

    #[test]
    fn fresh_metrics_have_zero_reloads_and_init_route_zeroes() {
        let m = Metrics::new();
        let s = parse(&m.encode(&Snapshot::default()));
        assert_eq!(
            value(
                &s,
                "payload_guard_config_reloads_total",
                &[("result", "ok")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &s,
                "payload_guard_config_reloads_total",
                &[("result", "failed")]
            ),
            0.0
        );
        assert!(!has(&s, "payload_guard_requests_total"));

        m.init_route("synthflow");
        m.init_route("synthflow");
        let s = parse(&m.encode(&Snapshot::default()));
        for class in ["2xx", "3xx", "4xx", "5xx"] {
            let labels = [("route", "synthflow"), ("status_class", class)];
            assert_eq!(value(&s, "payload_guard_requests_total", &labels), 0.0);
        }
        for kind in INCIDENT_KINDS {
            let labels = [("route", "synthflow"), ("kind", kind.as_str())];
            assert_eq!(value(&s, "payload_guard_incidents_total", &labels), 0.0);
        }
        assert_eq!(
            value(&s, "payload_guard_trims_total", &[("route", "synthflow")]),
            0.0
        );
        assert!(!has(&s, "payload_guard_request_body_bytes_count"));
    }

    #[test]
    fn every_family_is_typed_once() {
        let m = traffic();
        m.redelivery_attempt("a", AttemptOutcome::Delivered);
        m.dead_lettered("a", DeadLetterReason::Expired);
        let text = m.encode(&Snapshot {
            spool_depth: vec![("pending".into(), 1)],
            spool_routes: vec![SpoolRouteReading {
                route: "a".into(),
                records: 1,
                oldest_age_seconds: 1.0,
            }],
            ..Snapshot::default()
        });
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let expected = [
            "payload_guard_requests_total counter",
            "payload_guard_request_body_bytes histogram",
            "payload_guard_forwarded_body_bytes histogram",
            "payload_guard_upstream_duration_seconds histogram",
            "payload_guard_trims_total counter",
            "payload_guard_trimmed_bytes_total counter",
            "payload_guard_incidents_total counter",
            "payload_guard_errors_total counter",
            "payload_guard_connections_shed_total counter",
            "payload_guard_config_reloads_total counter",
            "payload_guard_redelivery_attempts_total counter",
            "payload_guard_redelivered_total counter",
            "payload_guard_dead_lettered_total counter",
            "payload_guard_incidents_dropped_total counter",
            "payload_guard_buffer_in_use_bytes gauge",
            "payload_guard_buffer_budget_bytes gauge",
            "payload_guard_open_connections gauge",
            "payload_guard_spool_depth gauge",
            "payload_guard_spool_route_depth gauge",
            "payload_guard_spool_oldest_age_seconds gauge",
        ];
        assert_eq!(types, expected);
        assert!(
            !text.contains("# EOF"),
            "the 0.0.4 text format has no EOF marker"
        );
    }

    #[test]
    fn output_order_is_stable_and_sorted() {
        let routes = ["zeta", "alpha", "mid", "beta", "omega", "gamma"];
        let build = |order: &[&str]| {
            let m = Metrics::new();
            for r in order {
                m.init_route(r);
                m.request(r, 200, 10, Some(10), Some(0.01));
                m.incident(r, Kind::Upstream413);
            }
            m.encode(&Snapshot::default())
        };
        let forward = build(&routes);
        let mut reversed = routes;
        reversed.reverse();
        assert_eq!(forward, build(&reversed));
        let seen: Vec<&str> = forward
            .lines()
            .filter(|l| l.starts_with("payload_guard_trims_total{"))
            .collect();
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), routes.len());
        // A histogram's buckets stay in ascending order within their series.
        let les: Vec<&str> = forward
            .lines()
            .filter(|l| {
                l.starts_with("payload_guard_request_body_bytes_bucket{")
                    && l.contains("route=\"mid\"")
            })
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(les.first(), Some(&"1024"), "{les:?}");
        assert_eq!(les.last(), Some(&"+Inf"), "{les:?}");
    }

    #[test]
    fn redelivery_is_counted_by_outcome() {
        let m = Metrics::new();
        m.init_route("a");
        m.redelivery_attempt("a", AttemptOutcome::Failed);
        m.redelivery_attempt("a", AttemptOutcome::Failed);
        m.redelivery_attempt("a", AttemptOutcome::Delivered);
        m.redelivery_attempt("a", AttemptOutcome::Refused);
        m.dead_lettered("a", DeadLetterReason::Refused);
        let s = parse(&m.encode(&Snapshot::default()));
        let attempts = |outcome| {
            value(
                &s,
                "payload_guard_redelivery_attempts_total",
                &[("route", "a"), ("outcome", outcome)],
            )
        };
        assert_eq!(attempts("failed"), 2.0);
        assert_eq!(attempts("delivered"), 1.0);
        assert_eq!(attempts("refused"), 1.0);
        assert_eq!(
            value(&s, "payload_guard_redelivered_total", &[("route", "a")]),
            1.0
        );
        let dead = |reason| {
            value(
                &s,
                "payload_guard_dead_lettered_total",
                &[("route", "a"), ("reason", reason)],
            )
        };
        assert_eq!(dead("refused"), 1.0);
        assert_eq!(dead("expired"), 0.0);
    }

    #[test]
    fn clones_share_series() {
        let m = Metrics::new();
        m.clone().request("a", 200, 1, None, None);
        let s = parse(&m.encode(&Snapshot::default()));
        let labels = [("route", "a"), ("status_class", "2xx")];
        assert_eq!(value(&s, "payload_guard_requests_total", &labels), 1.0);
    }

    #[test]
    fn status_classes() {
        assert_eq!(STATUS_CLASSES[status_class_index(101)], "1xx");
        assert_eq!(STATUS_CLASSES[status_class_index(200)], "2xx");
        assert_eq!(STATUS_CLASSES[status_class_index(308)], "3xx");
        assert_eq!(STATUS_CLASSES[status_class_index(499)], "4xx");
        assert_eq!(STATUS_CLASSES[status_class_index(599)], "5xx");
        assert_eq!(STATUS_CLASSES[status_class_index(999)], "5xx");
    }
}
