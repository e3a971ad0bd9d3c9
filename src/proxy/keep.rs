//! Phase 5, keep: on spool routes nothing is lost. What the receiver could not take is committed
//! to the spool (durably, before the sender gets 202) and redelivered later; what it refused for
//! good becomes a dead letter. Large bodies of plain spool routes are staged on disk as they
//! arrive and forwarded from there, so memory stays bounded.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::context::RequestCtx;
use super::{full_body, stream};
use crate::config::{OnOversize, OnSpoolResponse};
use crate::deliver::{self, Answered, Delivered, SpoolState};
use crate::error::{Culprit, ProxyError};
use crate::forward::UpstreamBody;
use crate::incident::{self, Kind};
use crate::judge::{self, Verdict};
use crate::limit::{BodyError, BodyFailure, BodyStats, LimitedBody};
use crate::spool::{Meta, SpoolError, StagedBody, State};
use crate::trim::payload::Encoding;

/// How much of a staged body is written to the staging file at a time.
const STAGE_CHUNK: usize = 256 * 1024;

/// `Payload-Guard-Spool-Id: <record id>` on the answer to a spooled payload.
const SPOOL_ID_HEADER: HeaderName = HeaderName::from_static("payload-guard-spool-id");

/// A body kept until the receiver has taken it: in memory, or staged in a local file.
enum Kept {
    Memory(Bytes),
    Staged(Box<dyn StagedBody>),
}

impl Kept {
    fn len(&self) -> u64 {
        match self {
            Kept::Memory(bytes) => bytes.len() as u64,
            Kept::Staged(staging) => staging.body_len(),
        }
    }

    /// Makes the body a durable record.
    async fn commit(
        self,
        state: &SpoolState,
        to: State,
        meta: Meta,
    ) -> Result<crate::spool::RecordId, SpoolError> {
        match self {
            Kept::Memory(bytes) => deliver::commit(&state.spool, to, meta, bytes).await,
            Kept::Staged(staging) => staging.commit(to, &meta).await,
        }
    }
}

/// What became of a whole payload: relayed, spooled (202), or kept as a dead letter.
pub(super) async fn settle_whole(
    ctx: &mut RequestCtx<'_>,
    delivered: Delivered,
    wire: Bytes,
    remember: impl Fn(&RequestCtx<'_>),
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    match &delivered.verdict {
        Verdict::Delivered => {
            remember(ctx);
            relay(delivered)
        }
        Verdict::Retryable(reason)
            if cfg.spool
                && (delivered.answered.is_some()
                    || delivered
                        .error
                        .as_ref()
                        .is_some_and(|e| e.culprit() == Culprit::Upstream)) =>
        {
            let reason = reason.clone();
            let kept = spool(ctx, Kept::Memory(wire), &reason, delivered).await;
            if kept.is_ok() {
                remember(ctx);
            }
            kept
        }
        Verdict::TooLarge { .. } if cfg.spool && delivered.can_go_lower => {
            // The ladder ran out of retries for now: redelivery goes on down it.
            let reason = "receiver answered 413; redelivery trims it lower".to_string();
            let kept = spool(ctx, Kept::Memory(wire), &reason, delivered).await;
            if kept.is_ok() {
                remember(ctx);
            }
            kept
        }
        Verdict::TooLarge { .. } | Verdict::Final(_) if cfg.dead_letter => {
            let status = delivered.answered.as_ref().map(|a| a.parts.status.as_u16());
            match status {
                Some(status) if status >= 400 => {
                    dead_letter(ctx, Kept::Memory(wire), delivered.answered).await
                }
                _ => relay(delivered),
            }
        }
        _ => relay(delivered),
    }
}

/// The receiver's last answer, or the error that left none.
fn relay(delivered: Delivered) -> Result<Response<UpstreamBody>, ProxyError> {
    match (delivered.answered, delivered.error) {
        (Some(answered), _) => answered.relay(),
        (None, Some(err)) => Err(err),
        (None, None) => Err(ProxyError::Internal("no answer and no error".into())),
    }
}

/// Metadata for a spool record of this request.
fn spool_meta(ctx: &RequestCtx<'_>, len: u64) -> Meta {
    let mut meta = Meta::new(
        ctx.cfg.name.clone(),
        ctx.received_at,
        ctx.request_id.to_string(),
        ctx.method.to_string(),
        ctx.path_and_query.clone(),
        len,
    );
    meta.call_id.clone_from(&ctx.call_id);
    meta.headers = deliver::stored_headers(&ctx.target.headers);
    meta
}

/// Commits the payload to the spool for redelivery and answers the sender (202, or the
/// receiver's answer with `on_spool_response = "passthrough"`). Nothing is acknowledged that is
/// not committed: when the spool cannot take it, the sender gets 503.
async fn spool(
    ctx: &mut RequestCtx<'_>,
    kept: Kept,
    reason: &str,
    delivered: Delivered,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let Some(state) = ctx.shared.spool.as_ref() else {
        return relay(delivered);
    };
    let len = kept.len();
    let mut meta = spool_meta(ctx, len);
    meta.last_error = Some(reason.to_string());
    let id = match kept.commit(state, State::Ready, meta).await {
        Ok(id) => id,
        Err(err) => return Err(spool_refused(ctx, len, &err)),
    };
    tracing::info!(route = %ctx.cfg.name, id = %id, reason, "payload spooled for redelivery");
    let mut response = match ctx.cfg.on_spool_response {
        OnSpoolResponse::Passthrough => relay(delivered)?,
        OnSpoolResponse::Accepted => {
            let body = serde_json::json!({
                "status": "accepted",
                "spool_id": id.as_str(),
                "request_id": &*ctx.request_id,
                "message": format!("the receiver could not take the payload ({reason}); payload-guard stored it and will redeliver it"),
            });
            let mut response = Response::new(full_body(Bytes::from(body.to_string())));
            *response.status_mut() = http::StatusCode::ACCEPTED;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    };
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(SPOOL_ID_HEADER, v);
    }
    Ok(response)
}

/// The spool could not take the payload: a `spool_refused` incident and 503.
fn spool_refused(ctx: &mut RequestCtx<'_>, len: u64, err: &SpoolError) -> ProxyError {
    let mut inc = ctx.incident(Kind::SpoolRefused);
    inc.body_bytes = Some(len);
    inc.reason = Some(err.to_string());
    ctx.incidents.push(inc);
    ProxyError::SpoolUnavailable(err.to_string())
}

/// Keeps a payload the receiver refused for good in `spool/dead/`, and relays its answer.
async fn dead_letter(
    ctx: &mut RequestCtx<'_>,
    kept: Kept,
    answered: Option<Answered>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let Some(answered) = answered else {
        return Err(ProxyError::Internal("dead letter without an answer".into()));
    };
    if let Some(state) = ctx.shared.spool.as_ref() {
        let status = answered.parts.status.as_u16();
        let mut meta = spool_meta(ctx, kept.len());
        let snippet_len = answered.prefix.len().min(incident::SNIPPET_BYTES);
        meta.status = Some(status);
        meta.snippet = Some(incident::snippet(&answered.prefix[..snippet_len]));
        meta.last_error = Some(format!("receiver refused it: {status}"));
        match kept.commit(state, State::Dead, meta).await {
            Ok(id) => {
                crate::warn_limited!(ctx.cfg.name, "refused payload kept as a dead letter", id = %id, status)
            }
            Err(err) => {
                tracing::error!(route = %ctx.cfg.name, error = %err, status, "cannot keep the dead letter")
            }
        }
    }
    answered.relay()
}

/// A spool route's large body: written to `spool/tmp/` as it arrives (memory stays bounded),
/// forwarded from the file with its `Content-Length`, then committed to the spool or removed.
pub(super) async fn staged(
    ctx: &mut RequestCtx<'_>,
    body: Incoming,
    _encoding: Option<Encoding>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let Some(state) = ctx.shared.spool.clone() else {
        return Err(ProxyError::Internal("spool route without a spool".into()));
    };
    let mut staging = match state.spool.stage(ctx.received_at).await {
        Ok(staging) => staging,
        Err(err) => {
            crate::limit::linger(body);
            return Err(spool_refused(ctx, 0, &err));
        }
    };
    let stats = Arc::new(BodyStats::default());
    ctx.stats = Some(stats.clone());
    let hard_limit = match (ctx.cfg.on_oversize, ctx.limit) {
        (OnOversize::Reject, Some(limit)) => limit.min(ctx.cfg.max_body_bytes),
        _ => ctx.cfg.max_body_bytes,
    };
    let mut limited = LimitedBody::new(body, ctx.limits(hard_limit), stats.clone(), ctx.conn_track);
    let mut chunk = Vec::with_capacity(STAGE_CHUNK);
    loop {
        let frame = limited.frame().await;
        let done = frame.is_none();
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    chunk.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => {
                let failure = stats
                    .failure()
                    .unwrap_or(BodyFailure::Read("body failed".into()));
                drop(staging);
                return Err(stream::body_error(
                    ctx,
                    failure,
                    hard_limit,
                    stats.bytes(),
                    None,
                ));
            }
            None => {}
        }
        if chunk.len() >= STAGE_CHUNK || (done && !chunk.is_empty()) {
            let data = std::mem::replace(&mut chunk, Vec::with_capacity(STAGE_CHUNK));
            let written =
                tokio::task::spawn_blocking(move || staging.write_all(&data).map(|()| staging))
                    .await;
            staging = match written {
                Ok(Ok(staging)) => staging,
                Ok(Err(err)) => return Err(spool_refused(ctx, stats.bytes(), &err)),
                Err(join) => return Err(ProxyError::Internal(join.to_string())),
            };
        }
        if done {
            break;
        }
    }
    let (path, offset, len) = match staging.body_file() {
        Ok(file) => file,
        Err(err) => return Err(spool_refused(ctx, stats.bytes(), &err)),
    };
    ctx.set_idempotency_key();
    let body = match file_body(&path, offset, len).await {
        Ok(body) => body,
        Err(err) => {
            return Err(ProxyError::Internal(format!(
                "cannot read the staged body: {err}"
            )));
        }
    };
    ctx.forwarded_bytes = Some(len);
    let req = ctx
        .target
        .clone()
        .with_content_length(len)
        .into_request(body);
    let started = tokio::time::Instant::now();
    let sent = crate::forward::send(
        ctx.route.client(),
        ctx.upstream,
        req,
        ctx.cfg.connect_timeout,
    );
    let answered = match tokio::time::timeout(ctx.cfg.response_timeout, sent).await {
        Ok(Ok(response)) => Ok(Answered::read(response, Some(len)).await),
        Ok(Err(err)) => Err(crate::forward::classify(&err, ctx.cfg)),
        Err(_) => Err(ProxyError::UpstreamResponseTimeout(
            ctx.cfg.response_timeout,
        )),
    };
    ctx.upstream_secs = Some(started.elapsed().as_secs_f64());
    let (verdict, answered, error) = match answered {
        Ok(answered) => {
            ctx.upstream_status = answered.answer.status;
            (judge::judge(&answered.answer), Some(answered), None)
        }
        Err(err) => (Verdict::Retryable(err.to_string()), None, Some(err)),
    };
    if let (Verdict::TooLarge { bytes }, Some(answered)) = (&verdict, answered.as_ref()) {
        let mut inc = ctx.incident(Kind::Upstream413);
        inc.body_bytes = *bytes;
        inc.learned = Some(
            ctx.shared
                .learned
                .refused(&ctx.cfg.name, len, None, &ctx.request_id),
        );
        answered.describe_refusal(&mut inc);
        inc.reason = Some("staged on disk (no trim rules): nothing to trim".into());
        ctx.incidents.push(inc);
    }
    if verdict == Verdict::Delivered {
        ctx.shared
            .learned
            .accepted(&ctx.cfg.name, len, None, &ctx.request_id);
    }
    let delivered = Delivered {
        verdict: verdict.clone(),
        answered,
        error,
        incidents: Vec::new(),
        sent_bytes: len,
        trimmed: false,
        can_go_lower: false,
    };
    let upstream_failed = delivered
        .error
        .as_ref()
        .is_some_and(|e| e.culprit() == Culprit::Upstream);
    match verdict {
        Verdict::Delivered => relay(delivered),
        Verdict::Retryable(reason) if upstream_failed || delivered.answered.is_some() => {
            spool(ctx, Kept::Staged(staging), &reason, delivered).await
        }
        Verdict::TooLarge { .. } | Verdict::Final(_) if ctx.cfg.dead_letter => {
            dead_letter(ctx, Kept::Staged(staging), delivered.answered).await
        }
        _ => relay(delivered),
    }
}

/// A body that reads `len` bytes at `offset` of a file, in 64 KiB frames.
async fn file_body(path: &std::path::Path, offset: u64, len: u64) -> std::io::Result<UpstreamBody> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let frames = futures_util::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; left.min(64 * 1024) as usize];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(BodyError::new(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "staged body is shorter than written",
                ))),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok(http_body::Frame::data(Bytes::from(buf))),
                    (file, left - n as u64),
                ))
            }
            Err(err) => Some((Err(BodyError::new(err)), (file, 0))),
        }
    });
    Ok(http_body_util::StreamBody::new(frames).boxed_unsync())
}
