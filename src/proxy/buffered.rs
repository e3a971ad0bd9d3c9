//! Phase 4, the buffered path: collect the body under the buffer budget, verify the sender,
//! dedupe, prepare the payload for the receiver's limit, and deliver it with the 413 ladder.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::Incoming;

use super::context::RequestCtx;
use super::{full_body, keep, stream};
use crate::buffer::{self, CollectError, Reservation, Slot, SlotClaim};
use crate::config::{OnOversize, OnTrimFailure};
use crate::deliver::{self, Destination, Whole};
use crate::error::ProxyError;
use crate::forward::UpstreamBody;
use crate::incident::{self, Action, FieldBytes, Kind};
use crate::limit::{BodyFailure, BodyStats, LimitedBody};
use crate::prepare::{self, Policy, Prepared};
use crate::state::Repeat;
use crate::state::dedupe::body_hash;
use crate::trim::payload::{self, Encoding, ShrinkError, Units};
use crate::trim::{Document, TrimError};

/// `Payload-Guard-Duplicate: <first request id>` on the proxy's answer to an exact repeat.
pub(super) const DUPLICATE_HEADER: HeaderName = HeaderName::from_static("payload-guard-duplicate");

/// Collects the body, then verifies, dedupes, prepares and delivers it.
pub(super) async fn buffered(
    ctx: &mut RequestCtx<'_>,
    body: Incoming,
    encoding: Option<Encoding>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    // A body declared large waits for a slot before it is read (and before it reserves).
    // Not over HTTP/2: while a stream waits, its connection buffers up to a flow-control
    // window of its body (1 MiB) outside the budget, so waiting saves little and under a
    // burst holds more (benches/overload: 103 MiB peak for 40 uploads, 51 MiB without).
    let declared_large = ctx.declared.is_some_and(|d| d > buffer::LARGE_BODY_BYTES);
    let slot = match declared_large && ctx.is_h1 {
        true => ctx.shared.slots.acquire(buffer::SLOT_WAIT).await,
        false => None,
    };
    let asked = declared_large || !ctx.is_h1;
    let claim = SlotClaim::new(ctx.shared.slots.clone(), slot, asked);
    let mut reservation = match ctx.shared.budget.reserve(ctx.declared.unwrap_or(0)) {
        Ok(r) => r,
        Err(_) => {
            crate::limit::linger(body);
            return Err(ctx.budget_exhausted(0));
        }
    };
    let (wire, slot) = collect(ctx, body, &mut reservation, claim).await?;
    let cfg = ctx.cfg;
    let policy = Policy::of(cfg);
    let json = payload::is_json(ctx.content_type());

    // Decode (within the budget) what verification, trimming, dedupe and the spool look at.
    let decoded = match encoding {
        Some(enc) if json => Some(decode_within_budget(ctx, &wire, enc, &mut reservation)?),
        _ => None,
    };
    let decoded_ok = decoded.as_ref().and_then(|d| d.as_ref().ok());

    // Scan once: on trim routes the scan serves the payload's id, the incident's facts, the
    // trim and every resend; elsewhere the id is read with a scan of its own, once.
    let parsed = match (&policy, decoded_ok) {
        (Some(_), Some(decoded)) => {
            Some(parse_within_budget(ctx, &wire, decoded, &mut reservation)?)
        }
        _ => None,
    };
    let doc = parsed.as_ref().and_then(|p| p.as_ref().ok());
    ctx.call_id = match &parsed {
        Some(Ok(doc)) => doc.string_at(&cfg.id_path),
        // Not JSON: another scan would fail the same way.
        Some(Err(_)) => None,
        None => decoded_ok.and_then(|d| crate::trim::string_at(d, &cfg.id_path)),
    };

    let mut verified = None;
    if let Some(v) = &cfg.verify {
        let call_id = match (decoded_ok, v.verifier.scheme().needs_call_id()) {
            (Some(_), true) => ctx.call_id.as_deref(),
            _ => None,
        };
        let url = v.sender_url(&cfg.path_prefix, &ctx.path_and_query);
        let signed = crate::verify::Signed {
            headers: &ctx.target.headers,
            body: &wire,
            call_id,
            url: url.as_deref(),
            now: SystemTime::now(),
        };
        match v.verifier.verify(&signed) {
            Ok(ok) => verified = Some(ok),
            Err(err) => return Err(ProxyError::Unauthorized(err.as_str())),
        }
    }
    // `resign = "same"` re-signs a trimmed body with the sender's id and timestamp.
    let policy = policy.map(|p| p.stamped(verified.as_ref()));

    // Dedupe: an exact repeat of a delivered payload is answered here.
    let hash = cfg.dedupe.map(|_| body_hash(&wire));
    if let (Some(window), Some(id), Some(hash)) = (cfg.dedupe, ctx.call_id.clone(), &hash) {
        match ctx
            .shared
            .dedupe
            .check(&cfg.name, &id, hash, window, SystemTime::now())
        {
            Repeat::Duplicate { first_request_id } => {
                return Ok(duplicate_response(ctx, &first_request_id));
            }
            Repeat::Conflict { first_request_id } => {
                let mut inc = ctx.incident(Kind::DuplicateConflict);
                inc.body_bytes = Some(wire.len() as u64);
                inc.reason = Some(format!(
                    "payload id {id:?} was delivered before by request {first_request_id} with a different body; this one is forwarded too"
                ));
                ctx.incidents.push(inc);
            }
            Repeat::New => {}
        }
    }
    ctx.set_idempotency_key();

    if let Some(doc) = doc {
        ctx.top_fields = doc
            .top_fields(incident::TOP_FIELDS)
            .into_iter()
            .map(|f| FieldBytes {
                path: f.path,
                bytes: f.bytes as u64,
            })
            .collect();
    }
    let decoded_len = decoded_ok.map_or(wire.len(), Bytes::len) as u64;
    let untrimmable = if !json {
        Some(format!(
            "not JSON (content-type {})",
            ctx.content_type().unwrap_or("missing")
        ))
    } else if encoding.is_none() {
        Some(format!(
            "unsupported content-encoding {}",
            ctx.content_encoding().unwrap_or("")
        ))
    } else {
        match (decoded.as_ref(), parsed.as_ref()) {
            (Some(Err(err)), _) => Some(err.to_string()),
            (_, Some(Err(err))) => Some(err.to_string()),
            _ => None,
        }
    };
    let first = first_send(ctx, &policy, &wire, doc, decoded_len, encoding, untrimmable)?;

    let whole = Whole {
        wire: &wire,
        encoding,
        decoded_len,
        doc,
    };
    let base = ctx.incident(Kind::Upstream413);
    let started = tokio::time::Instant::now();
    let dest = Destination {
        route: ctx.route,
        upstream: ctx.upstream,
        services: ctx.shared.services(),
        target: &ctx.target,
        base: &base,
    };
    let delivered = hold_slot_while(slot, deliver::deliver_whole(&dest, &whole, first)).await;
    ctx.upstream_secs = Some(started.elapsed().as_secs_f64());
    ctx.incidents.extend(delivered.incidents.iter().cloned());
    ctx.forwarded_bytes = Some(delivered.sent_bytes);
    ctx.upstream_status = delivered.answered.as_ref().and_then(|a| a.answer.status);
    let remember = |ctx: &RequestCtx<'_>| {
        if let (Some(id), Some(hash)) = (ctx.call_id.as_deref(), hash.as_deref()) {
            ctx.shared
                .dedupe
                .remember(&ctx.cfg.name, id, hash, &ctx.request_id, SystemTime::now());
        }
    };
    keep::settle_whole(ctx, delivered, wire, remember).await
}

/// Runs `work` keeping `slot` until it is done or the slot's deadline has passed, whichever
/// comes first: a slow receiver does not keep the next large body waiting.
async fn hold_slot_while<T>(slot: Option<Slot>, work: impl Future<Output = T>) -> T {
    let Some(slot) = slot else {
        return work.await;
    };
    tokio::pin!(work);
    tokio::select! {
        biased;
        done = &mut work => done,
        () = tokio::time::sleep_until(slot.deadline) => {
            drop(slot);
            work.await
        }
    }
}

/// Reads the whole body under the budget (a large one in a slot, see [`buffer::BodySlots`]).
async fn collect(
    ctx: &mut RequestCtx<'_>,
    body: Incoming,
    reservation: &mut Reservation,
    claim: SlotClaim,
) -> Result<(Bytes, Option<Slot>), ProxyError> {
    let stats = Arc::new(BodyStats::default());
    ctx.stats = Some(stats.clone());
    let limited = LimitedBody::new(
        body,
        ctx.limits(ctx.cfg.max_body_bytes),
        stats.clone(),
        ctx.conn_track,
    );
    let capacity = ctx.declared.unwrap_or(0) as usize;
    match buffer::collect_slotted(limited, capacity, reservation, claim).await {
        Ok(collected) => Ok(collected),
        Err(CollectError::Budget(_)) => Err(ctx.budget_exhausted(stats.bytes())),
        Err(CollectError::Body(_)) => {
            let failure = stats
                .failure()
                .unwrap_or(BodyFailure::Read("body failed".into()));
            let max = ctx.cfg.max_body_bytes;
            Err(stream::body_error(ctx, failure, max, stats.bytes(), None))
        }
    }
}

/// Decodes `gzip`/`deflate` within the budget; a decompression bomb is refused (413).
fn decode_within_budget(
    ctx: &mut RequestCtx<'_>,
    wire: &Bytes,
    encoding: Encoding,
    reservation: &mut Reservation,
) -> Result<Result<Bytes, ShrinkError>, ProxyError> {
    if encoding == Encoding::Identity {
        return Ok(Ok(wire.clone()));
    }
    let max = ctx.cfg.max_body_bytes;
    let cap = payload::decoded_cap(wire.len(), max);
    if reservation.ensure(wire.len() as u64 + cap).is_err() {
        return Err(ctx.budget_exhausted(wire.len() as u64));
    }
    match prepare::decode(wire, encoding, max) {
        Err(ShrinkError::Bomb { limit }) => {
            let mut inc = ctx.incident(Kind::OverMaxBody);
            inc.body_bytes = Some(wire.len() as u64);
            inc.reason = Some(ShrinkError::Bomb { limit }.to_string());
            ctx.incidents.push(inc);
            Err(ProxyError::DecompressionBomb { limit })
        }
        other => Ok(other),
    }
}

/// Scans the decoded JSON within what the budget has left; the scan's tape is then reserved.
fn parse_within_budget<'d>(
    ctx: &mut RequestCtx<'_>,
    wire: &Bytes,
    decoded: &'d Bytes,
    reservation: &mut Reservation,
) -> Result<Result<Document<'d>, ShrinkError>, ProxyError> {
    // The output of a trim is at most the decoded size.
    let output = wire.len() as u64 + decoded.len() as u64;
    if reservation.ensure(output).is_err() {
        return Err(ctx.budget_exhausted(wire.len() as u64));
    }
    let spare = ctx
        .shared
        .budget
        .limit()
        .saturating_sub(ctx.shared.budget.in_use());
    match Document::parse_within(decoded, spare) {
        Ok(doc) => {
            if reservation.ensure(output + doc.memory()).is_err() {
                return Err(ctx.budget_exhausted(wire.len() as u64));
            }
            Ok(Ok(doc))
        }
        Err(TrimError::TooManyValues { .. }) => Err(ctx.budget_exhausted(wire.len() as u64)),
        Err(err) => Ok(Err(ShrinkError::Trim(err))),
    }
}

/// The payload as it is first sent: byte-identical when it fits the limit in force (or the
/// limit is unknown), else trimmed to it; a payload that cannot be brought under is refused
/// or forwarded as the route says. Records the `over_upstream_limit` incident.
fn first_send(
    ctx: &mut RequestCtx<'_>,
    policy: &Option<Policy<'_>>,
    wire: &Bytes,
    doc: Option<&Document<'_>>,
    decoded_len: u64,
    encoding: Option<Encoding>,
    untrimmable: Option<String>,
) -> Result<Prepared, ProxyError> {
    let cfg = ctx.cfg;
    let original = Prepared::original(wire, decoded_len);
    let Some(limit) = ctx.limit else {
        return Ok(original);
    };
    let compressed = encoding.is_some_and(|e| e != Encoding::Identity);
    let size = wire.len() as u64;
    let measured = if ctx.units == Units::Decoded && compressed {
        decoded_len
    } else {
        size
    };
    if measured <= limit {
        return Ok(original);
    }
    let mut inc = ctx.incident(Kind::OverUpstreamLimit);
    inc.body_bytes = Some(size);
    let Some(p) = policy else {
        // Buffered to verify, dedupe or spool, on a route that does not trim.
        if cfg.on_oversize == OnOversize::Reject {
            inc.action = Some(Action::Rejected);
            ctx.incidents.push(inc);
            return Err(ProxyError::OverUpstreamLimit { size, limit });
        }
        inc.action = Some(Action::Forwarded);
        ctx.incidents.push(inc);
        return Ok(original);
    };
    let on_failure = cfg
        .trim
        .as_ref()
        .map_or(OnTrimFailure::Reject, |tc| tc.on_failure);
    let prepared = match (doc, encoding, untrimmable) {
        (Some(doc), Some(enc), None) => {
            prepare::prepare(p, wire, doc, enc, limit, ctx.units).map_err(|e| e.to_string())
        }
        (_, _, Some(why)) => Err(why),
        _ => Err("the payload could not be read as JSON".to_string()),
    };
    inc.dry_run = p.dry_run;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(why) => {
            inc.action = Some(Action::TrimFailed);
            inc.reason = Some(why.clone());
            ctx.incidents.push(inc);
            if on_failure == OnTrimFailure::Reject && !p.dry_run {
                return Err(ProxyError::TrimFailed {
                    size,
                    limit,
                    reason: why,
                });
            }
            return Ok(original);
        }
    };
    inc.bytes_after = Some(prepared.body.len() as u64);
    inc.trimmed = prepared.removed();
    if prepared.fits() {
        inc.action = Some(if p.dry_run {
            Action::Forwarded
        } else {
            Action::Trimmed
        });
        ctx.incidents.push(inc);
        return Ok(if p.dry_run { original } else { prepared });
    }
    let reached = prepared.size(ctx.units);
    inc.action = Some(Action::TrimFailed);
    inc.reason = Some(format!("the rules could only reach {reached} bytes"));
    ctx.incidents.push(inc);
    if p.dry_run {
        return Ok(original);
    }
    match on_failure {
        OnTrimFailure::Reject => Err(ProxyError::TrimFailed {
            size,
            limit,
            reason: format!("the trim rules could only reach {reached} bytes"),
        }),
        OnTrimFailure::Forward => Ok(prepared),
    }
}

/// The proxy's own answer to an exact repeat of a delivered payload (`dedupe`).
fn duplicate_response(ctx: &RequestCtx<'_>, first_request_id: &str) -> Response<UpstreamBody> {
    tracing::info!(route = %ctx.cfg.name, request_id = %ctx.request_id, first_request_id, "duplicate payload answered without forwarding it");
    let body = serde_json::json!({
        "status": "duplicate",
        "message": "this payload was delivered before; it was not forwarded again",
        "first_request_id": first_request_id,
        "request_id": &*ctx.request_id,
    });
    let mut response = Response::new(full_body(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(first_request_id) {
        response.headers_mut().insert(DUPLICATE_HEADER, v);
    }
    response
}
