//! Phase 3, stream: the body goes to the receiver as it arrives, through [`LimitedBody`], and is
//! never held whole. The receiver's answer is read (bounded), judged and relayed.

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::context::RequestCtx;
use crate::deliver::Answered;
use crate::error::ProxyError;
use crate::forward::{self, UpstreamBody};
use crate::incident::{Action, Kind};
use crate::judge::{self, Verdict};
use crate::limit::{self, BodyFailure, BodyStats, LimitedBody};
use crate::trim::HEAD_SAMPLE_BYTES;
use crate::trim::payload::{self, Encoding};

/// Streams the body to the receiver, never holding it whole.
pub(super) async fn stream(
    ctx: &mut RequestCtx<'_>,
    body: Incoming,
    hard_limit: u64,
    untrimmable: Option<String>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let over_known = matches!((ctx.declared, ctx.limit), (Some(s), Some(l)) if s > l);
    if over_known {
        // Forwarded as is (forward mode, or a trim route that cannot trim this payload).
        let mut inc = ctx.incident(Kind::OverUpstreamLimit);
        inc.action = Some(if untrimmable.is_some() {
            Action::TrimFailed
        } else {
            Action::Forwarded
        });
        inc.reason.clone_from(&untrimmable);
        ctx.incidents.push(inc);
    }
    let stats = Arc::new(BodyStats::default());
    ctx.stats = Some(stats.clone());
    let limited = LimitedBody::new(body, ctx.limits(hard_limit), stats.clone(), ctx.conn_track);
    ctx.set_idempotency_key();
    // An uncompressed JSON body keeps a copy of its head, so its incidents can name the
    // fields that dominate it without the body ever being held whole.
    // Compressed (or in an encoding the proxy cannot read): its decoded size is unknown here.
    let compressed = payload::encoding(ctx.content_encoding())
        .ok()
        .is_none_or(|e| e != Encoding::Identity);
    let sampled = payload::is_json(ctx.content_type()) && !compressed;
    let body = if sampled {
        ctx.head_sampled = true;
        limited.sampling_head(HEAD_SAMPLE_BYTES).boxed_unsync()
    } else {
        limited.boxed_unsync()
    };
    // Taken, not cloned: a streamed body is sent once.
    let req = std::mem::take(&mut ctx.target).into_request(body);
    let started = tokio::time::Instant::now();
    let sent = forward::send(
        ctx.route.client(),
        ctx.upstream,
        req,
        ctx.cfg.connect_timeout,
    );
    let result = tokio::select! {
        result = sent => result,
        err = deadline(&stats, ctx.cfg.response_timeout, ctx.body_timeout) => return Err(err),
    };
    ctx.upstream_secs = Some(started.elapsed().as_secs_f64());
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            if let Some(failure) = stats.failure() {
                return Err(body_error(
                    ctx,
                    failure,
                    hard_limit,
                    stats.bytes(),
                    untrimmable,
                ));
            }
            return Err(forward::classify(&err, ctx.cfg));
        }
    };
    if !over_known && ctx.declared.is_none() && stats.over_soft_limit() {
        let mut inc = ctx.incident(Kind::OverUpstreamLimit);
        inc.action = Some(if untrimmable.is_some() {
            Action::TrimFailed
        } else {
            Action::Forwarded
        });
        inc.body_bytes = Some(stats.bytes());
        inc.reason = untrimmable;
        ctx.incidents.push(inc);
    }
    // The receiver may answer before the whole body arrived (an early 413): the payload's
    // size is then its declared length.
    let complete = stats.is_complete();
    let size = ctx.declared.or(complete.then(|| stats.bytes()));
    ctx.forwarded_bytes = size;
    let answered = Answered::read(response, size).await;
    ctx.upstream_status = answered.answer.status;
    match judge::judge(&answered.answer) {
        Verdict::Delivered if complete => {
            if let Some(size) = size
                && !compressed
            {
                ctx.shared
                    .learned
                    .accepted(&ctx.cfg.name, size, None, &ctx.request_id);
            }
        }
        Verdict::TooLarge { bytes } => {
            // Streamed: nothing to resend. Learn (uncompressed sizes only: a compressed
            // body's decoded size is unknown here), record, relay the receiver's answer.
            let mut inc = ctx.incident(Kind::Upstream413);
            inc.body_bytes = bytes;
            if let Some(bytes) = bytes
                && !compressed
            {
                inc.learned = Some(ctx.shared.learned.refused(
                    &ctx.cfg.name,
                    bytes,
                    None,
                    &ctx.request_id,
                ));
            }
            answered.describe_refusal(&mut inc);
            inc.reason = Some(if ctx.cfg.trim.is_some() {
                "streamed (its size fit the configured upstream_limit): nothing buffered to trim and resend; later payloads are buffered and trimmed below what was learned".to_string()
            } else {
                "streamed: the route has no trim rules".to_string()
            });
            ctx.incidents.push(inc);
        }
        _ => {}
    }
    answered.relay()
}

/// Resolves with an error when the body stalls past `body_timeout`, or when the receiver sends
/// no response headers within `response_timeout` after the body is complete.
async fn deadline(
    stats: &BodyStats,
    response_timeout: Duration,
    body_timeout: Duration,
) -> ProxyError {
    // One timer, moved from the body's deadline to the answer's: one timer entry a request
    // instead of two.
    let timer = tokio::time::sleep(body_timeout);
    tokio::pin!(timer);
    if !stats.is_complete() {
        tokio::select! {
            biased;
            () = stats.finished() => {}
            () = timer.as_mut() => return ProxyError::BodyTimeout(body_timeout),
        }
    }
    if stats.has_failed() {
        // The upstream request fails on its own and reports why.
        std::future::pending::<()>().await;
    }
    timer
        .as_mut()
        .reset(tokio::time::Instant::now() + response_timeout);
    timer.await;
    ProxyError::UpstreamResponseTimeout(response_timeout)
}

/// Records the incident for a body cut off mid-stream and names the error.
pub(super) fn body_error(
    ctx: &mut RequestCtx<'_>,
    failure: BodyFailure,
    hard_limit: u64,
    seen: u64,
    reason: Option<String>,
) -> ProxyError {
    let max_body = ctx.cfg.max_body_bytes;
    match failure {
        BodyFailure::TooLarge if hard_limit < max_body => {
            let mut inc = ctx.incident(Kind::OverUpstreamLimit);
            inc.action = Some(if reason.is_some() {
                Action::TrimFailed
            } else {
                Action::Rejected
            });
            inc.body_bytes = Some(seen);
            inc.reason = reason;
            ctx.incidents.push(inc);
            ProxyError::OverUpstreamLimit {
                size: seen,
                limit: hard_limit,
            }
        }
        BodyFailure::TooLarge => {
            let mut inc = ctx.incident(Kind::OverMaxBody);
            inc.body_bytes = Some(seen);
            ctx.incidents.push(inc);
            limit::failure_to_error(failure, max_body)
        }
        other => limit::failure_to_error(other, max_body),
    }
}
