//! What the console shows, gathered from the running proxy: one serde type per page, served as
//! JSON under `/api/…` and rendered to HTML by [`super::html`]. Blocking reads (the incident
//! log, the spool) happen here; callers run these functions in `spawn_blocking`.
//!
//! Nothing here carries a payload body or a request header: the spool listing has sizes,
//! attempts and answers only. [`record`] (an operator opening one record) is the exception.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::histogram::{self, Bin, Line};
use crate::incident::diagnose::{self, RouteInfo};
use crate::incident::{Bracket, Incident, Kind, effective_limit};
use crate::metrics::RouteCounts;
use crate::proxy::Proxy;
use crate::spool::{Entry, RecordId, SpoolError, State};

/// How many incidents the console keeps from the end of the log.
pub const INCIDENTS_SHOWN: usize = 200;

/// How many records of each spool state the console lists.
pub const RECORDS_SHOWN: usize = 200;

/// How many bytes of a body an opened record shows in the page.
pub const BODY_SHOWN_BYTES: usize = 64 * 1024;

/// `GET /api/routes`.
#[derive(Debug, Serialize)]
pub struct RoutesView {
    /// One entry per configured route, in configuration order.
    pub routes: Vec<RouteView>,
}

/// One route's numbers and limits.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// The route's name.
    pub name: String,
    /// Its path prefix.
    pub path_prefix: String,
    /// Its receiver (scheme, host, port and path only).
    pub upstream: String,
    /// `max_body` in bytes.
    pub max_body: u64,
    /// The configured `upstream_limit` in bytes.
    pub upstream_limit: Option<u64>,
    /// What the receiver is known to accept and refuse.
    pub learned: Bracket,
    /// The limit the proxy enforces now (configured, or learned when tighter).
    pub effective_limit: Option<u64>,
    /// Counters since start-up.
    pub counts: RouteCounts,
    /// Recent request sizes.
    pub sizes: SizesView,
}

/// Recent request sizes of a route (the last [`crate::sizes::SIZES_PER_ROUTE`]).
#[derive(Debug, Serialize)]
pub struct SizesView {
    /// Sizes in the ring.
    pub samples: usize,
    /// Median size in bytes.
    pub p50: Option<u64>,
    /// 95th percentile in bytes.
    pub p95: Option<u64>,
    /// Largest size in bytes.
    pub max: Option<u64>,
    /// Log-scaled bins.
    pub bins: Vec<Bin>,
    /// The raw sizes, oldest first (for the SVG; not serialized).
    #[serde(skip)]
    pub recent: Vec<u64>,
    /// The lines drawn on the histogram (not serialized: the limits are fields above).
    #[serde(skip)]
    pub lines: Vec<Line>,
}

/// The limits drawn on a route's histogram: `upstream_limit`, the learned limit when it differs,
/// and `max_body`.
fn lines(route: &RouteView) -> Vec<Line> {
    let mut lines = Vec::new();
    if let Some(limit) = route.upstream_limit {
        lines.push(Line {
            name: "upstream_limit",
            bytes: limit,
        });
    }
    if let Some(limit) = route.effective_limit
        && route.effective_limit != route.upstream_limit
    {
        lines.push(Line {
            name: "learned",
            bytes: limit,
        });
    }
    lines.push(Line {
        name: "max_body",
        bytes: route.max_body,
    });
    lines
}

/// A receiver's URL without user information or query, which may carry credentials.
pub fn display_upstream(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or("");
    let port = uri.port_u16().map_or_else(String::new, |p| format!(":{p}"));
    format!("{scheme}://{host}{port}{}", uri.path())
}

/// Every configured route with its counters, limits and recent sizes.
pub fn routes(proxy: &Proxy) -> RoutesView {
    let runtime = proxy.current();
    let shared = proxy.shared();
    let routes = runtime
        .config
        .routes
        .iter()
        .map(|cfg| {
            let learned = super::actions::learned_bracket(shared, &cfg.name);
            let recent = shared.metrics.sizes().recent(&cfg.name);
            let mut route = RouteView {
                name: cfg.name.clone(),
                path_prefix: cfg.path_prefix.clone(),
                upstream: display_upstream(&cfg.upstream),
                max_body: cfg.max_body_bytes,
                upstream_limit: cfg.upstream_limit_bytes,
                learned,
                effective_limit: effective_limit(cfg.upstream_limit_bytes, &learned),
                counts: shared.metrics.route_counts(&cfg.name),
                sizes: SizesView {
                    samples: 0,
                    p50: None,
                    p95: None,
                    max: None,
                    bins: Vec::new(),
                    recent: Vec::new(),
                    lines: Vec::new(),
                },
            };
            let lines = lines(&route);
            let stats = diagnose::size_stats(&recent);
            route.sizes = SizesView {
                samples: recent.len(),
                p50: stats.map(|s| s.p50),
                p95: stats.map(|s| s.p95),
                max: stats.map(|s| s.max),
                bins: histogram::bins(&recent, &lines),
                recent,
                lines,
            };
            route
        })
        .collect();
    RoutesView { routes }
}

/// `GET /api/incidents`: filters from the query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncidentFilter {
    /// Only this route.
    pub route: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
}

/// The latest incidents, newest first, with the `diagnose` advice of their routes.
#[derive(Debug, Serialize)]
pub struct IncidentsView {
    /// The incident log file.
    pub log: String,
    /// Incident lines in the log (all routes and kinds).
    pub total: usize,
    /// Lines of the log that could not be read, one message each.
    pub warnings: Vec<String>,
    /// The latest [`INCIDENTS_SHOWN`] incidents that match the filters, newest first.
    pub incidents: Vec<Incident>,
    /// `diagnose`'s findings for each route of the shown incidents.
    pub advice: BTreeMap<String, RouteAdvice>,
    /// Route names for the filter (configured ones, then any others in the log).
    #[serde(skip)]
    pub routes: Vec<String>,
}

/// What `payload-guard diagnose` says about one route.
#[derive(Debug, Serialize)]
pub struct RouteAdvice {
    /// One sentence per identified receiver component, with the setting to paste.
    pub remediation: Vec<String>,
    /// The trim rule that would have saved the most requests, as TOML.
    pub trim: Option<String>,
}

/// Reads the incident log (blocking) and keeps the latest matching incidents.
pub fn incidents(proxy: &Proxy, filter: &IncidentFilter) -> Result<IncidentsView, String> {
    let runtime = proxy.current();
    let path = &runtime.config.incidents.path;
    let read = diagnose::read_log(path, None, None).map_err(|e| e.to_string())?;
    let infos: Vec<RouteInfo> = runtime.config.routes.iter().map(RouteInfo::of).collect();
    let mut routes: Vec<String> = infos.iter().map(|r| r.name.clone()).collect();
    for incident in &read.incidents {
        if !routes.contains(&incident.route) {
            routes.push(incident.route.clone());
        }
    }
    let shown: Vec<Incident> = read
        .incidents
        .iter()
        .rev()
        .filter(|i| filter.route.as_ref().is_none_or(|r| *r == i.route))
        .filter(|i| filter.kind.is_none_or(|k| k == i.kind))
        .take(INCIDENTS_SHOWN)
        .cloned()
        .collect();
    let mut advice = BTreeMap::new();
    for incident in &shown {
        if advice.contains_key(&incident.route) {
            continue;
        }
        let of_route: Vec<Incident> = read
            .incidents
            .iter()
            .filter(|i| i.route == incident.route)
            .cloned()
            .collect();
        let report = diagnose::diagnose(&of_route, &infos);
        if let Some(route) = report.routes.into_iter().next() {
            advice.insert(
                incident.route.clone(),
                RouteAdvice {
                    remediation: route
                        .remediation
                        .iter()
                        .map(|r| match &r.setting {
                            Some(setting) => format!("{} Setting: {setting}", r.advice),
                            None => r.advice.clone(),
                        })
                        .collect(),
                    trim: route.trim.map(|t| t.toml),
                },
            );
        }
    }
    Ok(IncidentsView {
        log: path.display().to_string(),
        total: read.lines,
        warnings: read.warnings,
        incidents: shown,
        advice,
        routes,
    })
}

/// `GET /api/spool`.
#[derive(Debug, Serialize)]
pub struct SpoolView {
    /// Whether any route spools (false: nothing below).
    pub enabled: bool,
    /// The spool directory.
    pub dir: Option<String>,
    /// One entry per route with records, by name.
    pub routes: Vec<SpoolRoute>,
    /// Ready records (oldest first), then dead ones, at most [`RECORDS_SHOWN`] of each.
    pub records: Vec<RecordView>,
    /// Records not listed because of [`RECORDS_SHOWN`].
    pub not_shown: usize,
}

/// One route's spool.
#[derive(Debug, Default, Serialize)]
pub struct SpoolRoute {
    /// The route's name.
    pub route: String,
    /// Records waiting for redelivery.
    pub ready: usize,
    /// Dead records.
    pub dead: usize,
    /// Seconds since the oldest ready record was received.
    pub oldest_age_secs: Option<u64>,
    /// The earliest next attempt of a ready record (RFC 3339); `None` with ready records
    /// means due now.
    pub next_attempt_at: Option<String>,
}

/// One record as listed: no headers, no body.
#[derive(Debug, Serialize)]
pub struct RecordView {
    /// The record id.
    pub id: String,
    /// `ready` or `dead`.
    pub state: &'static str,
    /// A redelivery attempt holds it right now.
    pub claimed: bool,
    /// The route.
    pub route: String,
    /// When the proxy received it (RFC 3339).
    pub received_at: String,
    /// Seconds since then.
    pub age_secs: u64,
    /// Body bytes.
    pub body_bytes: u64,
    /// A trimmed version was forwarded.
    pub trimmed: bool,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The receiver's final status (dead records).
    pub status: Option<u16>,
    /// When it is due (RFC 3339); `None`: now.
    pub next_attempt_at: Option<String>,
}

fn age(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).unwrap_or(Duration::ZERO).as_secs()
}

fn record_view(entry: &Entry, now: SystemTime) -> RecordView {
    let meta = &entry.meta;
    RecordView {
        id: entry.id.as_str().to_string(),
        state: entry.state.as_str(),
        claimed: entry.claimed,
        route: meta.route.clone(),
        received_at: crate::incident::format_ts(meta.received_at),
        age_secs: age(now, meta.received_at),
        body_bytes: entry.body_len,
        trimmed: meta.trimmed,
        attempts: meta.attempts,
        last_error: meta.last_error.clone(),
        status: meta.status,
        next_attempt_at: meta.next_attempt_at.map(crate::incident::format_ts),
    }
}

/// Lists the spool (reads every record's metadata).
pub async fn spool(proxy: &Proxy) -> Result<SpoolView, SpoolError> {
    let Some(state) = proxy.shared().spool.as_ref() else {
        return Ok(SpoolView {
            enabled: false,
            dir: None,
            routes: Vec::new(),
            records: Vec::new(),
            not_shown: 0,
        });
    };
    let now = SystemTime::now();
    let ready = state.spool.list(State::Ready, None).await?;
    let dead = state.spool.list(State::Dead, None).await?;
    let mut routes: BTreeMap<&str, SpoolRoute> = BTreeMap::new();
    for entry in &ready {
        let route = routes.entry(&entry.meta.route).or_default();
        route.ready += 1;
        let oldest = age(now, entry.meta.received_at);
        route.oldest_age_secs = Some(route.oldest_age_secs.map_or(oldest, |a| a.max(oldest)));
        if let Some(at) = entry.meta.next_attempt_at {
            let at = crate::incident::format_ts(at);
            // RFC 3339 UTC strings of one format sort as times.
            if route.next_attempt_at.as_ref().is_none_or(|n| at < *n) {
                route.next_attempt_at = Some(at);
            }
        }
    }
    // A ready record without a next attempt is due now: the route's next attempt is "now".
    for entry in ready.iter().filter(|e| e.meta.next_attempt_at.is_none()) {
        if let Some(route) = routes.get_mut(entry.meta.route.as_str()) {
            route.next_attempt_at = None;
        }
    }
    for entry in &dead {
        routes.entry(&entry.meta.route).or_default().dead += 1;
    }
    let routes = routes
        .into_iter()
        .map(|(name, mut route)| {
            route.route = name.to_string();
            route
        })
        .collect();
    let not_shown =
        ready.len().saturating_sub(RECORDS_SHOWN) + dead.len().saturating_sub(RECORDS_SHOWN);
    let records = ready
        .iter()
        .take(RECORDS_SHOWN)
        .chain(dead.iter().take(RECORDS_SHOWN))
        .map(|e| record_view(e, now))
        .collect();
    Ok(SpoolView {
        enabled: true,
        dir: Some(state.spool.location()),
        routes,
        records,
        not_shown,
    })
}

/// `GET /api/spool/<id>`: one record opened by the operator.
#[derive(Debug, Serialize)]
pub struct RecordDetail {
    /// What the listing shows.
    #[serde(flatten)]
    pub record: RecordView,
    /// The request id.
    pub request_id: String,
    /// The sender's call id.
    pub call_id: Option<String>,
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers in order; values of credentials and signatures replaced by `[redacted]`.
    pub headers: Vec<(String, String)>,
    /// The start of the receiver's answer (dead records).
    pub snippet: Option<String>,
    /// The body as text (lossy UTF-8), at most [`BODY_SHOWN_BYTES`]; the whole exact bytes are
    /// at `/api/spool/<id>/body`.
    pub body_preview: String,
    /// The body was longer than the preview.
    pub body_cut: bool,
}

/// Whether a header carries a credential or a signature, whose value is never shown.
pub fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "signature",
        "token",
        "secret",
        "api-key",
        "apikey",
        "password",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// Reads one record with its body; `None` when it is not in the spool.
pub async fn record(
    proxy: &Proxy,
    id: &RecordId,
) -> Result<Option<(RecordDetail, Vec<u8>)>, SpoolError> {
    let Some(state) = proxy.shared().spool.as_ref() else {
        return Ok(None);
    };
    let Some(entry) = state.spool.find(id).await? else {
        return Ok(None);
    };
    let body = if entry.claimed {
        Vec::new()
    } else {
        match state.spool.read(entry.state, id).await {
            Ok((_, body)) => body,
            Err(SpoolError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    let meta = &entry.meta;
    let preview = &body[..body.len().min(BODY_SHOWN_BYTES)];
    let detail = RecordDetail {
        record: record_view(&entry, SystemTime::now()),
        request_id: meta.request_id.clone(),
        call_id: meta.call_id.clone(),
        method: meta.method.clone(),
        path_and_query: meta.path_and_query.clone(),
        headers: meta
            .headers
            .iter()
            .map(|(k, v)| {
                let v = if is_sensitive_header(k) {
                    "[redacted]".to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect(),
        snippet: meta.snippet.clone(),
        body_preview: String::from_utf8_lossy(preview).into_owned(),
        body_cut: body.len() > BODY_SHOWN_BYTES,
    };
    Ok(Some((detail, body)))
}

/// `GET /api/learned`.
#[derive(Debug, Serialize)]
pub struct LearnedView {
    /// One entry per configured route (and any route with something learned), by name.
    pub routes: Vec<LearnedRoute>,
}

/// What was learned about one route's receiver.
#[derive(Debug, Serialize)]
pub struct LearnedRoute {
    /// The route.
    pub route: String,
    /// The configured `upstream_limit`.
    pub configured_limit: Option<u64>,
    /// The bracket.
    pub learned: Bracket,
    /// The limit enforced now.
    pub effective_limit: Option<u64>,
    /// The latest refusals behind the bracket, newest first.
    pub evidence: Vec<Evidence>,
}

/// One refusal by the receiver.
#[derive(Debug, Serialize)]
pub struct Evidence {
    /// When (RFC 3339).
    pub ts: String,
    /// The refused body size.
    pub body_bytes: Option<u64>,
    /// The receiver's status.
    pub upstream_status: Option<u16>,
    /// Who answered it.
    pub rejector: Option<String>,
    /// The request id.
    pub request_id: String,
}

/// How many refusals are shown as evidence per route.
pub const EVIDENCE_SHOWN: usize = 5;

/// The learned limits with the refusals from the incident log (blocking).
pub fn learned(proxy: &Proxy) -> LearnedView {
    let runtime = proxy.current();
    let shared = proxy.shared();
    let read = diagnose::read_log(&runtime.config.incidents.path, None, None).unwrap_or_default();
    let mut names: Vec<(String, Option<u64>)> = runtime
        .config
        .routes
        .iter()
        .map(|r| (r.name.clone(), r.upstream_limit_bytes))
        .collect();
    for (name, _) in super::actions::learned_brackets(shared) {
        if !names.iter().any(|(n, _)| *n == name) {
            names.push((name, None));
        }
    }
    let routes = names
        .into_iter()
        .map(|(route, configured)| {
            let learned = super::actions::learned_bracket(shared, &route);
            let evidence = read
                .incidents
                .iter()
                .rev()
                .filter(|i| i.route == route && i.kind == Kind::Upstream413)
                .take(EVIDENCE_SHOWN)
                .map(|i| Evidence {
                    ts: i.ts.clone(),
                    body_bytes: i.body_bytes,
                    upstream_status: i.upstream_status,
                    rejector: i.rejector.map(|r| r.as_str().to_string()),
                    request_id: i.request_id.clone(),
                })
                .collect();
            LearnedRoute {
                effective_limit: effective_limit(configured, &learned),
                route,
                configured_limit: configured,
                learned,
                evidence,
            }
        })
        .collect();
    LearnedView { routes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_shown_without_credentials() {
        let uri: http::Uri = "https://user:pw@example.com:8443/hook?key=secret"
            .parse()
            .unwrap();
        assert_eq!(display_upstream(&uri), "https://example.com:8443/hook");
        let uri: http::Uri = "http://127.0.0.1/".parse().unwrap();
        assert_eq!(display_upstream(&uri), "http://127.0.0.1/");
    }

    #[test]
    fn credential_headers_are_recognised() {
        for name in [
            "Authorization",
            "cookie",
            "X-Signature",
            "Synthflow-Signature",
            "x-api-key",
            "X-Auth-Token",
        ] {
            assert!(is_sensitive_header(name), "{name}");
        }
        for name in ["content-type", "x-request-id", "user-agent"] {
            assert!(!is_sensitive_header(name), "{name}");
        }
    }
}
