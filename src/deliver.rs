//! Delivering a whole payload, the one way every caller does it: the live buffered path, each
//! resend after a receiver's 413, redelivery of spooled payloads and `payload-guard replay`.
//!
//! [`deliver_whole`] sends a prepared payload, reads the receiver's answer (bounded), asks
//! [`judge`] what it means, and on a 413 walks down the ladder of common receiver limits
//! ([`crate::prepare::ladder_step`]), trimming the original lower and resending, up to the
//! route's `max_413_retries`; every refusal is learned ([`LearnedLimits`]) and becomes an
//! `upstream_413` incident. For spool routes it also commits undeliverable payloads durably
//! ([`commit`]) and redelivers them per route in arrival order with backoff
//! ([`redeliver_due`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::forward::{self, ConnUpstream, Target, UpstreamBody};
use crate::incident::IncidentLog;
use crate::incident::{self, Incident, Kind, Retry};
use crate::judge::{self, Answer, Verdict};
use crate::limit::BodyError;
use crate::metrics::{AttemptOutcome, DeadLetterReason, Metrics};
use crate::prepare::{self, Policy, Prepared};
use crate::runtime::{RouteRuntime, Runtime, Shared};
pub use crate::spool::state::{SpoolState, policy, spool_config};
use crate::spool::{ClaimedRecord, Meta, RecordId, SpoolError, State, Store};
use crate::state::LearnedLimits;
use crate::trim::Document;
use crate::trim::payload::{self, Encoding, Units};

/// How much of a receiver's answer is read before it is judged and relayed (answers to
/// webhooks are small; a larger one is relayed as it streams, judged on its status).
pub const ANSWER_BYTES: usize = 1024 * 1024;

/// `Idempotency-Key`, the same on every attempt of a payload.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Commits a record durably; returns once it is (fsynced, or its transaction committed).
pub async fn commit(
    spool: &Store,
    state: State,
    meta: Meta,
    body: Bytes,
) -> Result<RecordId, SpoolError> {
    spool.commit(state, &meta, body).await
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

/// Sets `Idempotency-Key` to `key` unless the sender set one (theirs is kept: it is what their
/// receiver already deduplicates on).
pub fn set_idempotency_key(headers: &mut HeaderMap, key: HeaderValue) {
    // One lookup: the name is hashed once whether or not the sender set it.
    if let http::header::Entry::Vacant(slot) = headers.entry(IDEMPOTENCY_KEY) {
        slot.insert(key);
    }
}

/// The receiver's answer, read up to [`ANSWER_BYTES`].
pub struct Answered {
    /// Status and headers.
    pub parts: http::response::Parts,
    /// The start of the body (all of it when `rest` is `None`).
    pub prefix: Bytes,
    /// The rest of a large body, still streaming.
    pub rest: Option<UpstreamBody>,
    /// What the judge looks at.
    pub answer: Answer,
}

impl Answered {
    /// Reads `response`'s answer (bounded) for judging. An answer larger than
    /// [`ANSWER_BYTES`] counts as complete: it is relayed as it streams.
    pub async fn read(response: Response<Incoming>, sent: Option<u64>) -> Answered {
        let (parts, body) = response.into_parts();
        let (prefix, rest, complete, error) = match judge::read_body(body, ANSWER_BYTES).await {
            Ok((prefix, rest)) => (
                prefix,
                rest.map(|rest| rest.map_err(BodyError::new).boxed_unsync()),
                true,
                None,
            ),
            Err((prefix, why)) => (prefix, None, false, Some(why)),
        };
        Answered {
            answer: Answer {
                status: Some(parts.status.as_u16()),
                complete,
                retry_after: parts.headers.contains_key(header::RETRY_AFTER),
                error,
                sent,
            },
            parts,
            prefix,
            rest,
        }
    }

    /// The answer for the sender: relayed (hop-by-hop headers removed) when it came whole;
    /// a 502 when it broke off before its end (nothing of it was sent on yet, so the sender
    /// gets a clear error instead of a truncated body).
    pub fn relay(self) -> Result<Response<UpstreamBody>, ProxyError> {
        if !self.answer.complete {
            return Err(ProxyError::UpstreamBroken(format!(
                "the receiver's answer ({}) broke off after {} bytes: {}",
                self.parts.status.as_u16(),
                self.prefix.len(),
                self.answer.error.as_deref().unwrap_or("connection closed")
            )));
        }
        Ok(self.into_response())
    }

    /// The answer as a response for the sender (hop-by-hop headers removed).
    pub fn into_response(self) -> Response<UpstreamBody> {
        let mut parts = self.parts;
        forward::strip_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        Response::from_parts(parts, forward::prefixed_body(self.prefix, self.rest))
    }

    /// Fills an `upstream_413` incident from the answer: who refused, the snippet.
    pub fn describe_refusal(&self, inc: &mut Incident) {
        let status = self.parts.status.as_u16();
        let headers: Vec<(String, String)> = self
            .parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let head = &self.prefix[..self.prefix.len().min(4096)];
        inc.upstream_status = Some(status);
        inc.rejector = Some(incident::fingerprint(status, &headers, head));
        inc.upstream_snippet = Some(incident::snippet(head));
    }
}

/// Sends a whole body with its exact `Content-Length`, over `upstream` (a sender connection's
/// own) when given, else the route's pooled client, within `response_timeout`.
pub async fn send_whole(
    route: &RouteRuntime,
    upstream: Option<&ConnUpstream>,
    target: Target,
    body: Bytes,
) -> Result<Response<Incoming>, ProxyError> {
    let cfg = &route.config;
    let len = body.len() as u64;
    let req = target.with_content_length(len).into_request(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let sent = forward::send(route.client(), upstream, req, cfg.connect_timeout);
    match tokio::time::timeout(cfg.response_timeout, sent).await {
        Err(_) => Err(ProxyError::UpstreamResponseTimeout(cfg.response_timeout)),
        Ok(Err(err)) => Err(forward::classify(&err, cfg)),
        Ok(Ok(response)) => Ok(response),
    }
}

/// A whole payload on its way to the receiver.
pub struct Whole<'a> {
    /// The bytes as received.
    pub wire: &'a Bytes,
    /// Its `Content-Encoding`, when the proxy can decode it.
    pub encoding: Option<Encoding>,
    /// Its decoded size.
    pub decoded_len: u64,
    /// Its decoded JSON, parsed (on trim routes, when it is JSON and parsed).
    pub doc: Option<&'a Document<'a>>,
}

impl Whole<'_> {
    fn compressed(&self) -> bool {
        self.encoding.is_some_and(|e| e != Encoding::Identity)
    }
}

/// What a delivery uses besides the route: what was learned, where incidents and metrics go,
/// and the spool (for archived originals). The proxy's [`Shared`] state lends it; the CLI
/// builds its own.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    /// Learned receiver limits.
    pub learned: &'a LearnedLimits,
    /// Where trims and incidents are counted.
    pub metrics: &'a Metrics,
    /// The incident log (`None`: incidents are only logged).
    pub incidents: Option<&'a IncidentLog>,
    /// The spool, for archived originals.
    pub spool: Option<&'a SpoolState>,
}

impl Services<'_> {
    /// Records an incident: counted, written to the log, and said once in the proxy's log.
    pub fn record(&self, incident: Incident) {
        incident::log_line(&incident);
        self.metrics.incident(&incident.route, incident.kind);
        if let Some(log) = self.incidents {
            log.record(incident);
        }
    }
}

impl Shared {
    /// The services a delivery uses, lent from the proxy's shared state.
    pub fn services(&self) -> Services<'_> {
        Services {
            learned: &self.learned,
            metrics: &self.metrics,
            incidents: Some(&self.incidents),
            spool: self.spool.as_ref(),
        }
    }
}

/// Where a payload goes and what the attempt may use.
pub struct Destination<'a> {
    /// The route.
    pub route: &'a RouteRuntime,
    /// The sender connection's own upstream connection (live HTTP/1 requests).
    pub upstream: Option<&'a ConnUpstream>,
    /// Learned limits, metrics, incidents, spool.
    pub services: Services<'a>,
    /// The request (method, URI, headers) without its framing.
    pub target: &'a Target,
    /// An incident with the request's facts filled in, to copy for each incident.
    pub base: &'a Incident,
}

/// How a whole delivery ended.
pub struct Delivered {
    /// What the last answer meant.
    pub verdict: Verdict,
    /// The last answer, when the receiver answered.
    pub answered: Option<Answered>,
    /// Why there was no answer.
    pub error: Option<ProxyError>,
    /// Incidents to record (the receiver's 413s).
    pub incidents: Vec<Incident>,
    /// Bytes of the last body sent.
    pub sent_bytes: u64,
    /// The last body sent was trimmed.
    pub trimmed: bool,
    /// After a 413: trimming could still go lower (the retries ran out), so trying again
    /// later may succeed; `false` means the rules can go no lower.
    pub can_go_lower: bool,
}

/// Sends `first` (the payload as prepared for the limit in force), and answers each 413 by
/// trimming the original lower and resending, up to `max_413_retries` times.
pub async fn deliver_whole(
    dest: &Destination<'_>,
    whole: &Whole<'_>,
    first: Prepared,
) -> Delivered {
    let cfg = &dest.route.config;
    let learned = dest.services.learned;
    // A resend re-signs with the sender's stamp, as the first send did (`resign = "same"`).
    let stamp = cfg
        .verify
        .as_ref()
        .and_then(|v| v.verifier.stamp(&dest.target.headers));
    let policy = Policy::of(cfg)
        .filter(|p| !p.dry_run && cfg.retry_on_413)
        .map(|p| p.stamped(stamp.as_ref()));
    let route_units = policy.map_or(Units::Wire, |p| p.units);
    let mut current = first;
    let mut incidents: Vec<Incident> = Vec::new();
    let mut archived: Option<Vec<(HeaderName, HeaderValue)>> = None;
    let mut retries = 0;
    let mut counted_trim = false;
    loop {
        if current.trimmed() && archived.is_none() {
            match archive_original(dest, whole).await {
                Ok(headers) => archived = Some(headers),
                Err(err) => {
                    return Delivered {
                        verdict: Verdict::Retryable(err.to_string()),
                        answered: None,
                        error: Some(err),
                        incidents,
                        sent_bytes: 0,
                        trimmed: false,
                        can_go_lower: false,
                    };
                }
            }
        }
        if current.trimmed() && !counted_trim {
            counted_trim = true;
            dest.services
                .metrics
                .trimmed(&cfg.name, current.removed_bytes());
        }
        let mut target = dest.target.clone();
        for (name, value) in current
            .headers
            .iter()
            .chain(archived.iter().flatten().filter(|_| current.trimmed()))
        {
            target.headers.insert(name.clone(), value.clone());
        }
        let sent_bytes = current.body.len() as u64;
        let response = send_whole(dest.route, dest.upstream, target, current.body.clone()).await;
        let answered = match response {
            Ok(response) => Answered::read(response, Some(sent_bytes)).await,
            Err(err) => {
                if let Some(last) = incidents.last_mut()
                    && let Some(retry) = last.retry.as_mut()
                {
                    retry.status = None;
                }
                return Delivered {
                    verdict: Verdict::Retryable(err.to_string()),
                    answered: None,
                    error: Some(err),
                    incidents,
                    sent_bytes,
                    trimmed: current.trimmed(),
                    can_go_lower: false,
                };
            }
        };
        let verdict = judge::judge(&answered.answer);
        if let Some(last) = incidents.last_mut()
            && let Some(retry) = last.retry.as_mut()
        {
            retry.status = answered.answer.status;
        }
        let decoded = whole.compressed().then_some(current.decoded_len);
        if verdict
            != (Verdict::TooLarge {
                bytes: Some(sent_bytes),
            })
        {
            if verdict == Verdict::Delivered {
                learned.accepted(&cfg.name, sent_bytes, decoded, &dest.base.request_id);
            }
            return Delivered {
                verdict,
                answered: Some(answered),
                error: None,
                incidents,
                sent_bytes,
                trimmed: current.trimmed(),
                can_go_lower: false,
            };
        }
        // The receiver refused it as too large: learn, record, and go lower if possible.
        let bracket = learned.refused(&cfg.name, sent_bytes, decoded, &dest.base.request_id);
        let mut inc = dest.base.clone();
        inc.kind = Kind::Upstream413;
        inc.ts = incident::format_ts(SystemTime::now());
        inc.body_bytes = Some(sent_bytes);
        inc.learned = Some(bracket);
        inc.trimmed = current.removed();
        if current.trimmed() {
            inc.bytes_after = Some(sent_bytes);
        }
        answered.describe_refusal(&mut inc);
        // A refused compressed body says something about its decoded size.
        let units = if whole.compressed() {
            Units::Decoded
        } else {
            route_units
        };
        if whole.compressed() && route_units == Units::Wire && policy.is_some() {
            inc.reason = Some(format!(
                "this receiver refused a {sent_bytes}-byte {} body ({} bytes decoded): it counts decoded bytes; set limit_counts = \"decoded\" on route {:?}",
                encoding_name(whole.encoding),
                current.decoded_len,
                cfg.name
            ));
        }
        let refused = current.size(units);
        let exhausted = retries >= cfg.max_413_retries;
        let lower = match (policy.as_ref(), whole.doc, whole.encoding) {
            (Some(p), Some(doc), Some(encoding)) => {
                let floor = if units == Units::Decoded {
                    bracket.largest_accepted
                } else {
                    learned.bracket(&cfg.name, Units::Wire).largest_accepted
                };
                prepare::ladder_step(refused, floor)
                    .and_then(|step| {
                        prepare::prepare(p, whole.wire, doc, encoding, step, units).ok()
                    })
                    .filter(|next| next.trimmed() && next.size(units) < refused)
            }
            _ => None,
        };
        let can_go_lower = lower.is_some();
        match lower {
            Some(next) if !exhausted => {
                inc.retry = Some(Retry {
                    attempted: true,
                    status: None,
                    bytes: Some(next.body.len() as u64),
                });
                tracing::info!(route = %cfg.name, refused = sent_bytes, next = next.body.len(), "receiver answered 413: resending the payload trimmed lower");
                incidents.push(inc);
                retries += 1;
                current = next;
            }
            _ => {
                inc.retry = Some(Retry {
                    attempted: false,
                    status: None,
                    bytes: None,
                });
                if inc.reason.is_none() {
                    inc.reason = Some(if policy.is_none() {
                        "the route does not trim: nothing to resend".to_string()
                    } else if whole.doc.is_none() {
                        "the payload cannot be trimmed (not JSON, or not decodable)".to_string()
                    } else if can_go_lower {
                        format!("max_413_retries ({}) reached", cfg.max_413_retries)
                    } else {
                        "the trim rules can go no lower".to_string()
                    });
                }
                incidents.push(inc);
                return Delivered {
                    verdict,
                    answered: Some(answered),
                    error: None,
                    incidents,
                    sent_bytes,
                    trimmed: current.trimmed(),
                    can_go_lower,
                };
            }
        }
    }
}

fn encoding_name(encoding: Option<Encoding>) -> &'static str {
    match encoding {
        Some(Encoding::Gzip) => "gzip",
        Some(Encoding::Deflate) => "deflate",
        _ => "identity",
    }
}

/// Keeps the untrimmed original in `spool/archive/` (`archive_originals = true`) and names the
/// headers that point the receiver at it: `Payload-Guard-Original: <id>`, plus
/// `Payload-Guard-Original-Url` with `claim_check_url`. Trimming never destroys data: when the
/// archive cannot store it, the payload is not trimmed and the sender gets 503.
pub async fn archive_original(
    dest: &Destination<'_>,
    whole: &Whole<'_>,
) -> Result<Vec<(HeaderName, HeaderValue)>, ProxyError> {
    let cfg = &dest.route.config;
    if !cfg.archive_originals {
        return Ok(Vec::new());
    }
    let Some(state) = dest.services.spool else {
        return Ok(Vec::new());
    };
    let base = dest.base;
    let mut meta = Meta::new(
        cfg.name.clone(),
        SystemTime::now(),
        base.request_id.clone(),
        base.method.clone().unwrap_or_else(|| "POST".into()),
        dest.target
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
        whole.wire.len() as u64,
    );
    meta.call_id.clone_from(&base.call_id);
    meta.headers = stored_headers(&dest.target.headers);
    meta.trimmed = true;
    match commit(&state.spool, State::Archive, meta, whole.wire.clone()).await {
        Ok(id) => {
            let mut headers = Vec::new();
            if let Ok(v) = HeaderValue::from_str(id.as_str()) {
                headers.push((HeaderName::from_static("payload-guard-original"), v));
            }
            if let Some(url) = &cfg.claim_check_url
                && let Ok(v) = HeaderValue::from_str(&format!("{url}/{id}"))
            {
                headers.push((HeaderName::from_static("payload-guard-original-url"), v));
            }
            Ok(headers)
        }
        Err(err) => Err(ProxyError::SpoolUnavailable(format!(
            "cannot archive the original, so it is not trimmed: {err}"
        ))),
    }
}

/// The outcome of one redelivery attempt of a stored payload.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// What went wrong, when it did.
    pub error: Option<String>,
    /// The start of the receiver's answer.
    pub snippet: String,
    /// Bytes sent (last attempt).
    pub bytes: u64,
    /// What it means.
    pub verdict: Verdict,
    /// After a 413: the rules could still go lower.
    pub can_go_lower: bool,
}

impl Attempt {
    fn failed(error: String) -> Attempt {
        Attempt {
            status: None,
            snippet: String::new(),
            bytes: 0,
            verdict: Verdict::Retryable(error.clone()),
            error: Some(error),
            can_go_lower: false,
        }
    }
}

/// Delivers a stored payload once, as the live path would: to its route's receiver (or `to`),
/// prepared for the limit in force, with the 413 ladder, the same `Idempotency-Key` as every
/// other attempt, and the receiver's answer judged by [`judge`]. Incidents are recorded.
pub async fn attempt(
    runtime: &Runtime,
    services: Services<'_>,
    meta: &Meta,
    body: Bytes,
    to: Option<&Uri>,
) -> Attempt {
    let Some(route) = runtime.route_by_name(&meta.route) else {
        return Attempt::failed(format!("route {:?} is no longer configured", meta.route));
    };
    let cfg = &route.config;
    let (path, query) = match meta.path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (meta.path_and_query.as_str(), None),
    };
    let rest = if cfg.path_prefix == "/" {
        path
    } else {
        path.strip_prefix(cfg.path_prefix.as_str()).unwrap_or("")
    };
    let uri = match forward::upstream_uri(to.unwrap_or(&cfg.upstream), rest, query) {
        Ok(uri) => uri,
        Err(err) => return Attempt::failed(err.to_string()),
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
    // Marks of an earlier trim are recomputed from the original.
    headers.remove(prepare::TRIMMED_HEADER);
    headers.remove(prepare::ORIGINAL_LENGTH_HEADER);
    if let Ok(key) = HeaderValue::from_str(meta.call_id.as_deref().unwrap_or(&meta.request_id)) {
        set_idempotency_key(&mut headers, key);
    }
    let target = Target {
        method: meta.method.parse().unwrap_or(Method::POST),
        uri,
        headers,
    };
    let encoding = payload::encoding(
        target
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    )
    .ok();
    let is_json = payload::is_json(
        target
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    // The stored headers are the sender's, verified when the payload arrived.
    let stamp = cfg
        .verify
        .as_ref()
        .and_then(|v| v.verifier.stamp(&target.headers));
    let policy = Policy::of(cfg).map(|p| p.stamped(stamp.as_ref()));
    let decoded = match (policy.as_ref(), encoding) {
        (Some(_), Some(enc)) if is_json => prepare::decode(&body, enc, cfg.max_body_bytes).ok(),
        _ => None,
    };
    let doc = decoded.as_ref().and_then(|d| Document::parse(d).ok());
    let whole = Whole {
        wire: &body,
        encoding,
        decoded_len: decoded.as_ref().map_or(body.len(), Bytes::len) as u64,
        doc: doc.as_ref(),
    };
    let mut base = Incident::new(Kind::Upstream413, cfg.name.clone(), meta.request_id.clone());
    base.call_id.clone_from(&meta.call_id);
    base.method = Some(meta.method.clone());
    base.path = Some(path.to_string());
    base.content_length = Some(body.len() as u64);
    base.max_body = Some(cfg.max_body_bytes);
    base.reason = None;
    // Prepare for the limit in force now (it may have changed since the payload was stored).
    let first = match (policy.as_ref(), whole.doc, encoding) {
        (Some(p), Some(doc), Some(enc)) if !p.dry_run => {
            let limit = services
                .learned
                .limit(&cfg.name, p.units, cfg.upstream_limit_bytes);
            let size = if p.units == Units::Decoded {
                whole.decoded_len
            } else {
                body.len() as u64
            };
            match limit {
                Some(limit) if size > limit => prepare::prepare(p, &body, doc, enc, limit, p.units)
                    .unwrap_or_else(|_| Prepared::original(&body, whole.decoded_len)),
                _ => Prepared::original(&body, whole.decoded_len),
            }
        }
        _ => Prepared::original(&body, whole.decoded_len),
    };
    base.upstream_limit = services.learned.limit(
        &cfg.name,
        policy.map_or(Units::Wire, |p| p.units),
        cfg.upstream_limit_bytes,
    );
    let dest = Destination {
        route,
        upstream: None,
        services,
        target: &target,
        base: &base,
    };
    let delivered = deliver_whole(&dest, &whole, first).await;
    for inc in delivered.incidents {
        services.record(inc);
    }
    let answered = delivered.answered;
    let status = answered.as_ref().map(|a| a.parts.status.as_u16());
    let snippet = answered
        .as_ref()
        .map(|a| incident::snippet(&a.prefix[..a.prefix.len().min(incident::SNIPPET_BYTES)]))
        .unwrap_or_default();
    let error = delivered
        .error
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| answered.as_ref().and_then(|a| a.answer.error.clone()));
    // Drain a large answer (bounded) so the connection can be reused.
    if let Some(rest) = answered.and_then(|a| a.rest) {
        let _ = tokio::time::timeout(Duration::from_secs(5), rest.collect()).await;
    }
    Attempt {
        status,
        error,
        snippet,
        bytes: delivered.sent_bytes,
        verdict: delivered.verdict,
        can_go_lower: delivered.can_go_lower,
    }
}

/// What one redelivery round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Records delivered (and deleted).
    pub delivered: usize,
    /// Records that failed again and wait for their next attempt.
    pub retried: usize,
    /// Records moved to `dead/` (final answer, too large for good, or past `retry_for`).
    pub buried: usize,
}

/// Redelivers the ready records due at `now`, per route in order of arrival: a route stops at
/// its first record that is not due, held by another delivery, or fails again, so a later
/// payload never overtakes an earlier one. Routes run in parallel up to
/// `redeliver_concurrency`. A record is deleted only after a 2xx read to its end.
pub async fn redeliver_due(
    runtime: Arc<Runtime>,
    shared: Arc<Shared>,
    now: SystemTime,
) -> RoundReport {
    let Some(state) = shared.spool.clone() else {
        return RoundReport::default();
    };
    let routes = match state.spool.ready_routes().await {
        Ok(routes) => routes,
        Err(err) => {
            tracing::error!(error = %err, "cannot list the spool");
            return RoundReport::default();
        }
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(
        state.settings.redeliver_concurrency.max(1),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for route in routes {
        if state.held_until(&route).is_some_and(|until| until > now) {
            continue;
        }
        let (runtime, shared, state, limit) = (
            runtime.clone(),
            shared.clone(),
            state.clone(),
            limit.clone(),
        );
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let mut report = RoundReport::default();
            // Each step claims the route's oldest record; none when it is not due (the later
            // ones wait behind it) or another delivery holds it.
            loop {
                match redeliver_next(&runtime, &shared, &state, &route, now).await {
                    Some(Settled::Delivered) => report.delivered += 1,
                    Some(Settled::Buried) => report.buried += 1,
                    Some(Settled::Retry) => {
                        report.retried += 1;
                        tracing::debug!(route = %route, "redelivery paused for this route until its oldest payload goes through");
                        break;
                    }
                    None => break,
                }
            }
            if report.retried == 0 {
                state.release_hold(&route);
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

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Delivered and deleted.
    Delivered,
    /// Back to ready, for a later attempt (or its update failed: held all the same).
    Retry,
    /// Moved to `dead/`.
    Buried,
}

/// Claims and delivers the oldest due record of `route`; `None` when there is none, another
/// delivery holds it, or it cannot be read.
async fn redeliver_next(
    runtime: &Runtime,
    shared: &Shared,
    state: &SpoolState,
    route: &str,
    now: SystemTime,
) -> Option<Settled> {
    let mut claim = match state.spool.claim_next(route, now).await {
        Ok(Some(claim)) => claim,
        Ok(None) => return None,
        Err(err) => {
            tracing::error!(route = %route, error = %err, "cannot claim a spooled payload");
            return None;
        }
    };
    let body = match claim.body().await {
        Ok(body) => body,
        Err(err) => {
            tracing::error!(id = %claim.id(), error = %err, "cannot read a spooled payload");
            return None;
        }
    };
    let meta = claim.meta().clone();
    let result = attempt(runtime, shared.services(), &meta, Bytes::from(body), None).await;
    let seed = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(meta.attempts);
    let settled = settle(claim, &result, state, now, seed).await;
    count_redelivery(&shared.metrics, &meta.route, &result.verdict, settled);
    Some(settled)
}

/// Counts one settled redelivery attempt in the metrics: its outcome, and whether it went to
/// `dead/`.
fn count_redelivery(metrics: &Metrics, route: &str, verdict: &Verdict, settled: Settled) {
    let outcome = match (verdict, settled) {
        (Verdict::Delivered, Settled::Delivered) => AttemptOutcome::Delivered,
        (Verdict::Final(_), _) => AttemptOutcome::Refused,
        (Verdict::TooLarge { .. }, Settled::Buried) => AttemptOutcome::Refused,
        _ => AttemptOutcome::Failed,
    };
    metrics.redelivery_attempt(route, outcome);
    if settled == Settled::Buried {
        let reason = match outcome {
            AttemptOutcome::Refused => DeadLetterReason::Refused,
            _ => DeadLetterReason::Expired,
        };
        metrics.dead_lettered(route, reason);
    }
}

/// Applies an attempt's outcome to its claim: delete, back to ready, or dead. Whatever fails
/// (the receiver, or the update of the record itself, e.g. a full disk) holds the route's
/// redelivery for the backoff delay, so nothing is retried faster than the policy allows.
pub async fn settle(
    claim: Box<dyn ClaimedRecord>,
    result: &Attempt,
    state: &SpoolState,
    now: SystemTime,
    seed: u64,
) -> Settled {
    let id = claim.id().clone();
    let route = claim.meta().route.clone();
    let policy = state.policy;
    let next = policy.next_attempt_at(claim.meta(), now, seed);
    let backoff = now
        + crate::spool::backoff::next_delay(
            claim.meta().attempts,
            policy.retry_initial,
            policy.retry_max,
            seed,
        );
    let result = result.clone();
    let status = result.status;
    let settled = match &result.verdict {
        Verdict::Delivered => Settled::Delivered,
        Verdict::Final(_) => Settled::Buried,
        Verdict::TooLarge { .. } if !result.can_go_lower => Settled::Buried,
        _ if next.is_none() => Settled::Buried,
        _ => Settled::Retry,
    };
    let outcome = match &result.verdict {
        Verdict::Delivered => claim.complete().await.map(|()| "delivered"),
        Verdict::Final(status) => claim
            .bury(
                Some(*status),
                &result.snippet,
                &format!("receiver refused it: {status}"),
            )
            .await
            .map(|()| "dead (final answer)"),
        Verdict::TooLarge { .. } if !result.can_go_lower => claim
            .bury(
                result.status,
                &result.snippet,
                "receiver answered 413 and the trim rules can go no lower",
            )
            .await
            .map(|()| "dead (too large for the receiver)"),
        other => {
            let err = match other {
                Verdict::Retryable(why) => why.clone(),
                _ => format!("receiver answered {}", result.status.unwrap_or(0)),
            };
            match next {
                Some(at) => claim.release(&err, at).await.map(|()| "retry later"),
                None => claim
                    .bury(
                        result.status,
                        &result.snippet,
                        &format!("gave up after retry_for: {err}"),
                    )
                    .await
                    .map(|()| "dead (retry_for exceeded)"),
            }
        }
    };
    match outcome {
        Ok(what) => {
            // A record back in ready carries its next attempt time: it holds the route.
            tracing::info!(route = %route, id = %id, status = status.unwrap_or(0), outcome = what, "redelivery attempt");
            settled
        }
        Err(err) => {
            tracing::error!(route = %route, id = %id, error = %err, "cannot update spooled payload: holding this route's redelivery for the backoff delay");
            state.hold(&route, backoff);
            Settled::Retry
        }
    }
}

/// Runs redelivery rounds every `redeliver_interval` until the process ends, and purges
/// archived originals older than `archive_for` once an hour.
/// `current` gives the runtime in force (it changes on reload).
pub fn spawn_redelivery<F>(current: F, shared: Arc<Shared>, state: SpoolState)
where
    F: Fn() -> Arc<Runtime> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.settings.redeliver_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let report = redeliver_due(current(), shared.clone(), SystemTime::now()).await;
            if report != RoundReport::default() {
                tracing::info!(
                    delivered = report.delivered,
                    retried = report.retried,
                    buried = report.buried,
                    "redelivery round"
                );
            }
            state.spool.refresh().await;
            if last_purge.elapsed() >= Duration::from_secs(3600) {
                last_purge = tokio::time::Instant::now();
                let _ = state
                    .spool
                    .purge(State::Archive, state.settings.archive_for)
                    .await;
            }
        }
    });
}
