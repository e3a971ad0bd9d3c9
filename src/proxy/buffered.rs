//! The buffered path: verify the sender, trim the payload, send it with a `Content-Length`.

use super::*;

/// The buffered body's way to the receiver: verify the sender, trim, send.
#[allow(clippy::too_many_arguments)]
pub(super) async fn process_buffered(
    ctx: &Ctx<'_>,
    mut target: Target,
    wire: Bytes,
    encoding: Option<Encoding>,
    stats: &Arc<BodyStats>,
    reservation: &mut Reservation,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let limit = ctx.limit.unwrap_or(cfg.max_body_bytes);
    let stats = stats.clone();
    let original_len = wire.len() as u64;
    let trim = cfg
        .trim
        .as_ref()
        .filter(|_| cfg.on_oversize == OnOversize::Trim && ctx.limit.is_some());

    // Decode (within the budget), verify the sender, then trim.
    let decoded = match encoding {
        None => Ok(wire.clone()),
        Some(enc) => match decode_within_budget(&wire, enc, cfg, reservation) {
            Ok(decoded) => Ok(decoded),
            Err(DecodeFailure::Budget) => return Err(ctx.budget_exhausted(original_len)),
            Err(DecodeFailure::Shrink(err)) => Err(err),
        },
    };
    if let Some(v) = &cfg.verify {
        let call_id = match (&decoded, v.verifier.scheme().needs_call_id()) {
            (Ok(json), true) => crate::trim::string_at(json, &cfg.id_path),
            _ => None,
        };
        if let Err(err) = v
            .verifier
            .verify(&target.headers, call_id.as_deref(), &wire)
        {
            tracing::warn!(route = %cfg.name, scheme = v.verifier.scheme().as_str(), reason = err.as_str(), "sender signature refused");
            return Err(ProxyError::Unauthorized(err.as_str()));
        }
    }
    let Some(tc) = trim else {
        // Buffered for verification or the spool on a `reject` route: the limit still holds.
        if cfg.on_oversize == OnOversize::Reject
            && let Some(limit) = ctx.limit
            && original_len > limit
        {
            tracing::warn!(route = %cfg.name, limit, size = original_len, "body over upstream_limit, rejected");
            let mut inc = ctx.incident(Kind::OverUpstreamLimit);
            inc.action = Some(Action::Rejected);
            inc.body_bytes = Some(original_len);
            ctx.record(inc);
            return Err(ProxyError::OverUpstreamLimit {
                size: original_len,
                limit,
            });
        }
        return send_buffered(ctx, &target, wire, &stats, None, None, exchange).await;
    };
    let not_trimmable = if !payload::is_json(ctx.facts.content_type.as_deref()) {
        Some(format!(
            "not JSON (content-type {})",
            ctx.facts.content_type.as_deref().unwrap_or("missing")
        ))
    } else {
        encoding.is_none().then(|| {
            format!(
                "unsupported content-encoding {}",
                ctx.facts.content_encoding.as_deref().unwrap_or("")
            )
        })
    };
    if let Some(reason) = not_trimmable {
        let err = ShrinkError::NotTrimmable(reason);
        return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await;
    }
    let encoding = encoding.unwrap_or(Encoding::Identity);
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(err) => {
            return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await;
        }
    };
    let measured = match (encoding, tc.limit_counts) {
        (Encoding::Identity, _) | (_, crate::config::LimitCounts::Wire) => wire.len(),
        (_, crate::config::LimitCounts::Decoded) => decoded.len(),
    } as u64;
    if measured <= limit && !cfg.retry_on_413 {
        // Fits as it is: forward byte-identical.
        return send_buffered(ctx, &target, wire, &stats, None, None, exchange).await;
    }
    // The output is at most the decoded size; the scan's tape grows within what the budget has
    // left and is then reserved for what it took.
    let output = original_len + decoded.len() as u64;
    if reservation.ensure(output).is_err() {
        return Err(ctx.budget_exhausted(original_len));
    }
    let spare = ctx
        .shared
        .budget
        .limit()
        .saturating_sub(ctx.shared.budget.in_use());
    // One scan serves the incident's facts, the trim and the retry.
    let doc = match crate::trim::Document::parse_within(&decoded, spare) {
        Ok(doc) => doc,
        Err(crate::trim::TrimError::TooManyValues { .. }) => {
            return Err(ctx.budget_exhausted(original_len));
        }
        Err(err) => {
            let err = ShrinkError::Trim(err);
            return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await;
        }
    };
    if reservation.ensure(output + doc.memory()).is_err() {
        return Err(ctx.budget_exhausted(original_len));
    }
    let facts = BodyFacts::read(&doc, &cfg.id_path);
    if measured <= limit {
        // retry_on_413 buffers every payload so it can be trimmed if the receiver refuses it.
        let retry = RetryState {
            doc: &doc,
            encoding,
            wire: &wire,
        };
        return send_buffered(
            ctx,
            &target,
            wire.clone(),
            &stats,
            Some(&facts),
            Some(retry),
            exchange,
        )
        .await;
    }
    let shrunk = match payload::shrink(&wire, &doc, encoding, tc, limit) {
        Ok(shrunk) => shrunk,
        Err(err) => return untrimmable(ctx, tc, target, wire, limit, err, exchange, &stats).await,
    };
    let mut inc = ctx.incident(Kind::OverUpstreamLimit);
    inc.body_bytes = Some(original_len);
    inc.bytes_after = Some(shrunk.body.len() as u64);
    inc.trimmed = removed(&shrunk);
    inc.dry_run = tc.dry_run;
    facts.fill(&mut inc);
    if shrunk.fits {
        inc.action = Some(if tc.dry_run {
            Action::Forwarded
        } else {
            Action::Trimmed
        });
        tracing::info!(route = %cfg.name, before = original_len, after = shrunk.body.len(), limit, dry_run = tc.dry_run, trimmed = %shrunk.trimmed_header(), "payload trimmed");
        ctx.record(inc);
        if tc.dry_run {
            return send_buffered(ctx, &target, wire, &stats, Some(&facts), None, exchange).await;
        }
        archive_original(ctx, &mut target.headers, &wire, &facts).await?;
        mark_trimmed(ctx, &mut target.headers, &shrunk);
        let body = Bytes::from(shrunk.body);
        return send_buffered(ctx, &target, body, &stats, Some(&facts), None, exchange).await;
    }
    inc.action = Some(Action::TrimFailed);
    inc.reason = Some(format!(
        "the rules could only reach {} bytes",
        shrunk.measured_after
    ));
    tracing::warn!(route = %cfg.name, before = original_len, smallest = shrunk.body.len(), limit, on_trim_failure = tc.on_failure.as_str(), "trim rules cannot bring the payload under the limit");
    ctx.record(inc);
    if tc.dry_run {
        return send_buffered(ctx, &target, wire, &stats, Some(&facts), None, exchange).await;
    }
    match tc.on_failure {
        OnTrimFailure::Reject => Err(ProxyError::TrimFailed {
            size: original_len,
            limit,
            reason: format!(
                "the trim rules could only reach {} bytes",
                shrunk.measured_after
            ),
        }),
        OnTrimFailure::Forward => {
            archive_original(ctx, &mut target.headers, &wire, &facts).await?;
            mark_trimmed(ctx, &mut target.headers, &shrunk);
            let body = Bytes::from(shrunk.body);
            send_buffered(ctx, &target, body, &stats, Some(&facts), None, exchange).await
        }
    }
}

pub(super) enum DecodeFailure {
    Budget,
    Shrink(ShrinkError),
}

pub(super) fn decode_within_budget(
    wire: &Bytes,
    encoding: Encoding,
    cfg: &RouteConfig,
    reservation: &mut Reservation,
) -> Result<Bytes, DecodeFailure> {
    if encoding == Encoding::Identity {
        return Ok(wire.clone());
    }
    let cap = payload::decoded_cap(wire.len(), cfg.max_body_bytes);
    reservation
        .ensure(wire.len() as u64 + cap)
        .map_err(|_| DecodeFailure::Budget)?;
    payload::decode(wire, encoding, cfg.max_body_bytes)
        .map(Bytes::from)
        .map_err(DecodeFailure::Shrink)
}

/// The payload cannot go through the trim stage (invalid JSON, bad encoding, a bomb).
#[allow(clippy::too_many_arguments)]
pub(super) async fn untrimmable(
    ctx: &Ctx<'_>,
    tc: &TrimConfig,
    target: Target,
    wire: Bytes,
    limit: u64,
    err: ShrinkError,
    exchange: &mut Exchange,
    stats: &BodyStats,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let size = wire.len() as u64;
    if let ShrinkError::Bomb { limit: cap } = err {
        tracing::warn!(route = %cfg.name, cap, "compressed body decodes past the cap: refused");
        let mut inc = ctx.incident(Kind::OverMaxBody);
        inc.body_bytes = Some(size);
        inc.reason = Some(err.to_string());
        ctx.record(inc);
        return Err(ProxyError::DecompressionBomb { limit: cap });
    }
    let over = size > limit;
    if !over {
        // Under the limit and not ours to judge: pass it on untouched.
        return send_buffered(ctx, &target, wire, stats, None, None, exchange).await;
    }
    tracing::warn!(route = %cfg.name, reason = %err, on_trim_failure = tc.on_failure.as_str(), "payload over upstream_limit cannot be trimmed");
    let mut inc = ctx.incident(Kind::OverUpstreamLimit);
    inc.action = Some(Action::TrimFailed);
    inc.body_bytes = Some(size);
    inc.reason = Some(err.to_string());
    inc.dry_run = tc.dry_run;
    ctx.record(inc);
    if tc.on_failure == OnTrimFailure::Reject && !tc.dry_run {
        return Err(ProxyError::TrimFailed {
            size,
            limit,
            reason: err.to_string(),
        });
    }
    send_buffered(ctx, &target, wire, stats, None, None, exchange).await
}

pub(super) fn removed(shrunk: &Shrunk) -> Vec<Removed> {
    shrunk
        .applied
        .iter()
        .map(|a| Removed {
            path: a.path.clone(),
            removed: a.removed as u64,
        })
        .collect()
}

/// Adds `Payload-Guard-Trimmed` and `Payload-Guard-Original-Length`, re-signs the trimmed body
/// when the route asks for it, and counts the trim.
pub(super) fn mark_trimmed(ctx: &Ctx<'_>, headers: &mut HeaderMap, shrunk: &Shrunk) {
    ctx.shared.metrics.trimmed(
        &ctx.cfg.name,
        shrunk.applied.iter().map(|a| a.removed as u64).sum(),
    );
    if let Some(resign) = ctx.cfg.verify.as_ref().and_then(|v| v.resign.as_ref()) {
        match resign.sign(None, &shrunk.body) {
            Ok((name, value)) => {
                headers.insert(name, value);
            }
            Err(err) => {
                tracing::warn!(route = %ctx.cfg.name, error = %err, "cannot re-sign the trimmed body");
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&shrunk.trimmed_header()) {
        headers.insert(HeaderName::from_static("payload-guard-trimmed"), v);
    }
    headers.insert(
        HeaderName::from_static("payload-guard-original-length"),
        HeaderValue::from(shrunk.original_len as u64),
    );
}

/// What a retry after a receiver's 413 needs.
#[derive(Clone, Copy)]
pub(super) struct RetryState<'a> {
    pub(super) doc: &'a crate::trim::Document<'a>,
    pub(super) encoding: Encoding,
    pub(super) wire: &'a Bytes,
}

/// Sends a buffered body with its exact `Content-Length`.
pub(super) async fn send_buffered(
    ctx: &Ctx<'_>,
    target: &Target,
    body: Bytes,
    stats: &BodyStats,
    facts: Option<&BodyFacts>,
    retry: Option<RetryState<'_>>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let sent = body.len() as u64;
    let sending = target.clone().with_content_length(sent);
    // The trimmed retry after a 413 resends to the same target.
    let retry = retry.map(|r| (r, sending.clone()));
    let response = match send(ctx, sending, full_body(body), stats).await {
        Ok(response) => response,
        Err(SendError::Body(failure)) => {
            return Err(limit::failure_to_error(failure, ctx.cfg.max_body_bytes));
        }
        Err(SendError::Proxy(err) | SendError::Upstream(err)) => return Err(err),
    };
    let facts = facts.cloned().unwrap_or_default();
    relay(ctx, response, Some(sent), true, &facts, retry, exchange).await
}
