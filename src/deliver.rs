//! Stage 8, for spool routes: nothing lost. Decides whether a receiver's answer means
//! delivered, retry later, or refused for good ([`disposition`], pure); commits undeliverable
//! payloads to the spool durably before the sender is acknowledged; and redelivers spooled
//! payloads with backoff ([`redeliver_due`]), the same way `payload-guard replay` does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::{BodyExt, Full};

use crate::config::{OnOversize, SpoolSettings};
use crate::forward;
use crate::incident::{self, LimitLearner};
use crate::limit::BodyError;
use crate::metrics::{AttemptOutcome, DeadLetterReason, Metrics};
use crate::proxy::Runtime;
use crate::spool::{Claim, Meta, RecordId, RetryPolicy, Spool, SpoolConfig, SpoolError, State};
use crate::trim::payload::{self, Encoding};

/// What a receiver's status means for a spooled or spool-route payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// 2xx: done.
    Delivered,
    /// Refused, overloaded or failing (408, 413 after the trim retry, 429, 5xx): try again.
    Retry(String),
    /// Any other answer (3xx, 4xx): final, passed on to the sender.
    Final(u16),
}

/// Classifies a receiver's status (pure).
pub fn disposition(status: u16) -> Disposition {
    match status {
        200..=299 => Disposition::Delivered,
        408 | 413 | 429 | 500..=599 => Disposition::Retry(format!("receiver answered {status}")),
        other => Disposition::Final(other),
    }
}

/// The spool and how it is drained, shared by the proxy's routes.
#[derive(Clone)]
pub struct SpoolState {
    /// The spool directory.
    pub spool: Spool,
    /// Backoff and give-up policy.
    pub policy: RetryPolicy,
    /// The `[spool]` settings.
    pub settings: SpoolSettings,
}

impl SpoolState {
    /// Opens (and recovers) the spool directory as its owner.
    pub fn open(settings: &SpoolSettings) -> Result<SpoolState, SpoolError> {
        // Recovery logs what it found ("spool opened").
        let (spool, _report) = Spool::open(spool_config(settings))?;
        Ok(SpoolState {
            spool,
            policy: policy(settings),
            settings: settings.clone(),
        })
    }
}

/// The spool configuration from `[spool]`.
pub fn spool_config(settings: &SpoolSettings) -> SpoolConfig {
    SpoolConfig {
        dir: settings.dir.clone(),
        max_bytes: settings.max_bytes,
        min_free: settings.min_free,
    }
}

/// The retry policy from `[spool]`.
pub fn policy(settings: &SpoolSettings) -> RetryPolicy {
    RetryPolicy {
        retry_initial: settings.retry_initial,
        retry_max: settings.retry_max,
        retry_for: settings.retry_for,
    }
}

/// Commits a record durably (on a blocking thread: it writes and fsyncs).
pub async fn commit(
    spool: &Spool,
    state: State,
    meta: Meta,
    body: Bytes,
) -> Result<RecordId, SpoolError> {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || spool.commit(state, &meta, &body))
        .await
        .unwrap_or_else(|join| {
            Err(SpoolError::Io {
                op: "commit",
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(join.to_string()),
            })
        })
}

/// Headers stored with a record: the request as forwarded, minus its framing.
pub fn stored_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| **name != header::CONTENT_LENGTH && **name != header::HOST)
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect()
}

/// The outcome of one delivery attempt of a stored payload.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// What went wrong, when it did.
    pub error: Option<String>,
    /// The start of the receiver's answer.
    pub snippet: String,
    /// Bytes sent.
    pub bytes: u64,
}

impl Attempt {
    /// What the attempt means.
    pub fn disposition(&self) -> Disposition {
        match (self.status, &self.error) {
            (Some(status), _) => disposition(status),
            (None, Some(err)) => Disposition::Retry(err.clone()),
            (None, None) => Disposition::Retry("no answer".to_string()),
        }
    }
}

/// Sends a stored payload once: to its route's receiver (or `to`), with the route's trim rules
/// applied as for a live request and `Idempotency-Key: <call_id or request_id>`.
pub async fn attempt(
    runtime: &Runtime,
    learner: &LimitLearner,
    meta: &Meta,
    body: Bytes,
    to: Option<&Uri>,
) -> Attempt {
    let failed = |error: String| Attempt {
        status: None,
        error: Some(error),
        snippet: String::new(),
        bytes: 0,
    };
    let Some(route) = runtime.route_by_name(&meta.route) else {
        return failed(format!("route {:?} is no longer configured", meta.route));
    };
    let cfg = &route.config;
    let (path, query) = match meta.path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (meta.path_and_query.as_str(), None),
    };
    let rest = path.strip_prefix(cfg.path_prefix.as_str()).unwrap_or("");
    let rest = if cfg.path_prefix == "/" { path } else { rest };
    let uri = match to {
        Some(to) => forward::upstream_uri(to, rest, query),
        None => forward::upstream_uri(&cfg.upstream, rest, query),
    };
    let uri = match uri {
        Ok(uri) => uri,
        Err(err) => return failed(err.to_string()),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &meta.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    // Trim again: the receiver's limit may have changed since the payload was stored.
    let mut body = body;
    let limit = incident::effective_limit(cfg.upstream_limit_bytes, &learner.bracket(&cfg.name));
    if let (Some(tc), Some(limit), OnOversize::Trim) = (cfg.trim.as_ref(), limit, cfg.on_oversize)
        && body.len() as u64 > limit
        && !tc.dry_run
    {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let encoding = payload::encoding(
            headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        );
        if payload::is_json(content_type)
            && let Ok(encoding) = encoding
        {
            let decoded = match encoding {
                Encoding::Identity => Ok(body.to_vec()),
                enc => payload::decode(&body, enc, cfg.max_body_bytes),
            };
            if let Ok(decoded) = decoded
                && let Ok(doc) = crate::trim::Document::parse(&decoded)
                && let Ok(shrunk) = payload::shrink(&body, &doc, encoding, tc, limit)
                && shrunk.changed()
            {
                if let Ok(v) = HeaderValue::from_str(&shrunk.trimmed_header()) {
                    headers.insert(HeaderName::from_static("payload-guard-trimmed"), v);
                }
                headers.insert(
                    HeaderName::from_static("payload-guard-original-length"),
                    HeaderValue::from(body.len() as u64),
                );
                body = Bytes::from(shrunk.body);
            }
        }
    }
    let key = meta.call_id.as_deref().unwrap_or(&meta.request_id);
    if let Ok(key) = HeaderValue::from_str(key) {
        headers.insert(HeaderName::from_static("idempotency-key"), key);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
    let bytes = body.len() as u64;
    let mut req = Request::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *req.method_mut() = meta.method.parse().unwrap_or(Method::POST);
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = Version::HTTP_11;
    let response =
        match tokio::time::timeout(cfg.response_timeout, route.client().request(req)).await {
            Err(_) => return failed(format!("no response within {:?}", cfg.response_timeout)),
            Ok(Err(err)) => return failed(forward::classify_error(&err, cfg).to_string()),
            Ok(Ok(response)) => response,
        };
    let status = response.status().as_u16();
    let mut snippet = Vec::new();
    let mut body = response.into_body().map_err(BodyError::new);
    while snippet.len() < incident::SNIPPET_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    snippet.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    // Drain (bounded) so the connection can be reused.
    let _ = tokio::time::timeout(Duration::from_secs(5), body.collect()).await;
    Attempt {
        status: Some(status),
        error: None,
        snippet: incident::snippet(&snippet),
        bytes,
    }
}

/// What one redelivery round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Records delivered (and deleted).
    pub delivered: usize,
    /// Records that failed again and wait for their next attempt.
    pub retried: usize,
    /// Records moved to `dead/` (final answer, or past `retry_for`).
    pub buried: usize,
}

/// Redelivers every ready record due at `now`: per route in order of arrival (a route stops at
/// its first failure, so later payloads never overtake an earlier one), routes in parallel up
/// to `redeliver_concurrency`. A record is deleted only after a 2xx.
pub async fn redeliver_due(
    runtime: Arc<Runtime>,
    learner: Arc<LimitLearner>,
    state: &SpoolState,
    now: SystemTime,
    metrics: &Metrics,
) -> RoundReport {
    let spool = state.spool.clone();
    let entries = match tokio::task::spawn_blocking(move || spool.list(State::Ready, None)).await {
        Ok(Ok(entries)) => entries,
        Ok(Err(err)) => {
            tracing::error!(error = %err, "cannot list the spool");
            return RoundReport::default();
        }
        Err(_) => return RoundReport::default(),
    };
    let mut by_route: BTreeMap<String, Vec<RecordId>> = BTreeMap::new();
    for entry in entries {
        if entry.claimed || entry.meta.next_attempt_at.is_some_and(|at| at > now) {
            continue;
        }
        by_route
            .entry(entry.meta.route.clone())
            .or_default()
            .push(entry.id);
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(
        state.settings.redeliver_concurrency,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for (route, ids) in by_route {
        let (runtime, learner, state, limit, metrics) = (
            runtime.clone(),
            learner.clone(),
            state.clone(),
            limit.clone(),
            metrics.clone(),
        );
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut report = RoundReport::default();
            for id in ids {
                match redeliver_one(&runtime, &learner, &state, &id, now, &metrics).await {
                    Some(Disposition::Delivered) => report.delivered += 1,
                    Some(Disposition::Final(_)) => report.buried += 1,
                    Some(Disposition::Retry(_)) => {
                        report.retried += 1;
                        tracing::debug!(route = %route, "redelivery paused for this route until its oldest payload goes through");
                        break;
                    }
                    None => {}
                }
            }
            report
        });
    }
    let mut total = RoundReport::default();
    while let Some(result) = tasks.join_next().await {
        if let Ok(r) = result {
            total.delivered += r.delivered;
            total.retried += r.retried;
            total.buried += r.buried;
        }
    }
    total
}

/// Claims and delivers one record; `None` if someone else holds it or it is unreadable.
async fn redeliver_one(
    runtime: &Runtime,
    learner: &LimitLearner,
    state: &SpoolState,
    id: &RecordId,
    now: SystemTime,
    metrics: &Metrics,
) -> Option<Disposition> {
    let spool = state.spool.clone();
    let claim_id = id.clone();
    let claimed = tokio::task::spawn_blocking(move || {
        let mut claim = spool.claim(&claim_id)?;
        let body = match claim.as_mut() {
            Some(c) => Some(c.body()?),
            None => None,
        };
        Ok::<_, SpoolError>(claim.zip(body))
    })
    .await
    .ok()?;
    let (claim, body) = match claimed {
        Ok(Some(pair)) => pair,
        Ok(None) => return None,
        Err(err) => {
            tracing::error!(id = %id, error = %err, "cannot claim spooled payload");
            return None;
        }
    };
    let meta = claim.meta().clone();
    let result = attempt(runtime, learner, &meta, Bytes::from(body), None).await;
    let disposition = result.disposition();
    let seed = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(meta.attempts);
    settle(
        claim,
        &disposition,
        &result,
        &state.policy,
        now,
        seed,
        Some(metrics),
    )
    .await;
    Some(disposition)
}

/// Applies an attempt's outcome to its claim: delete, back to ready, or dead; counts it in
/// `metrics` (the live redelivery's; `replay` passes none).
pub async fn settle(
    claim: Claim,
    disposition: &Disposition,
    result: &Attempt,
    policy: &RetryPolicy,
    now: SystemTime,
    seed: u64,
    metrics: Option<&Metrics>,
) {
    let id = claim.id().clone();
    let route = claim.meta().route.clone();
    let next = policy.next_attempt_at(claim.meta(), now, seed);
    let (disposition, result) = (disposition.clone(), result.clone());
    let outcome = tokio::task::spawn_blocking(move || match disposition {
        Disposition::Delivered => claim
            .complete()
            .map(|()| ("delivered", AttemptOutcome::Delivered, None)),
        Disposition::Retry(err) => match next {
            Some(at) => claim
                .release(&err, at)
                .map(|()| ("retry later", AttemptOutcome::Failed, None)),
            None => claim
                .bury(
                    result.status,
                    &result.snippet,
                    &format!("gave up after retry_for: {err}"),
                )
                .map(|()| {
                    let dead = Some(DeadLetterReason::Expired);
                    ("dead (retry_for exceeded)", AttemptOutcome::Failed, dead)
                }),
        },
        Disposition::Final(status) => claim
            .bury(
                Some(status),
                &result.snippet,
                &format!("receiver refused it: {status}"),
            )
            .map(|()| {
                let dead = Some(DeadLetterReason::Refused);
                ("dead (final answer)", AttemptOutcome::Refused, dead)
            }),
    })
    .await;
    match outcome {
        Ok(Ok((what, attempt, dead))) => {
            if let Some(metrics) = metrics {
                metrics.redelivery_attempt(&route, attempt);
                if let Some(reason) = dead {
                    metrics.dead_lettered(&route, reason);
                }
            }
            let status = result
                .status
                .map_or_else(|| "none".to_string(), |s| s.to_string());
            let error = result.error.as_deref().unwrap_or("none");
            tracing::info!(route = %route, id = %id, status = %status, error = %error, outcome = what, "redelivery attempt")
        }
        Ok(Err(err)) => {
            tracing::error!(route = %route, id = %id, error = %err, "cannot update spooled payload")
        }
        Err(err) => {
            tracing::error!(route = %route, id = %id, error = %err, "redelivery task failed")
        }
    }
}

/// Runs redelivery rounds every `redeliver_interval` until the process ends, and purges
/// archived originals older than `archive_for` once an hour.
pub fn spawn_redelivery(proxy: crate::proxy::Proxy, state: SpoolState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.settings.redeliver_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let report = redeliver_due(
                proxy.current(),
                proxy.shared().learner.clone(),
                &state,
                SystemTime::now(),
                &proxy.shared().metrics,
            )
            .await;
            if report != RoundReport::default() {
                tracing::info!(
                    delivered = report.delivered,
                    retried = report.retried,
                    buried = report.buried,
                    "redelivery round"
                );
            }
            if last_purge.elapsed() >= Duration::from_secs(3600) {
                last_purge = tokio::time::Instant::now();
                let spool = state.spool.clone();
                let keep = state.settings.archive_for;
                let _ = tokio::task::spawn_blocking(move || spool.purge_archive(keep)).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        assert_eq!(disposition(200), Disposition::Delivered);
        assert_eq!(disposition(204), Disposition::Delivered);
        assert!(matches!(disposition(500), Disposition::Retry(_)));
        assert!(matches!(disposition(503), Disposition::Retry(_)));
        assert!(matches!(disposition(408), Disposition::Retry(_)));
        assert!(matches!(disposition(429), Disposition::Retry(_)));
        assert!(matches!(disposition(413), Disposition::Retry(_)));
        assert_eq!(disposition(400), Disposition::Final(400));
        assert_eq!(disposition(401), Disposition::Final(401));
        assert_eq!(disposition(422), Disposition::Final(422));
        assert_eq!(disposition(301), Disposition::Final(301));
    }
}
