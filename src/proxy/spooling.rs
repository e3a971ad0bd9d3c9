//! Spool routes in the pipeline: large bodies staged on disk while forwarded, undeliverable
//! payloads committed before the sender gets 202, dead letters, archived originals.

use super::*;

/// How much of a staged body is written to the staging file at a time.
pub(super) const STAGE_CHUNK: usize = 256 * 1024;

/// A spool route's large body: written to `spool/tmp/` as it arrives (memory stays bounded),
/// forwarded from the file with its `Content-Length`, then committed to the spool or removed.
pub(super) async fn staged(
    ctx: &Ctx<'_>,
    state: &SpoolState,
    target: Target,
    body: Incoming,
    encoding: Option<Encoding>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let refused = |err: crate::spool::SpoolError, bytes: u64| {
        tracing::error!(route = %cfg.name, error = %err, "cannot stage the payload");
        let mut inc = ctx.incident(Kind::SpoolRefused);
        inc.body_bytes = Some(bytes);
        inc.reason = Some(err.to_string());
        ctx.record(inc);
        ProxyError::SpoolUnavailable(err.to_string())
    };
    let spool = state.spool.clone();
    let received_at = ctx.received_at;
    let staging = tokio::task::spawn_blocking(move || spool.stage(received_at)).await;
    let mut staging = match staging {
        Ok(Ok(staging)) => staging,
        Ok(Err(err)) => {
            limit::linger(body);
            return Err(refused(err, 0));
        }
        Err(join) => return Err(ProxyError::Internal(join.to_string())),
    };
    let stats = Arc::new(BodyStats::default());
    exchange.body = Some(stats.clone());
    let hard_limit = match (cfg.on_oversize, ctx.limit) {
        (OnOversize::Reject, Some(limit)) => limit.min(cfg.max_body_bytes),
        _ => cfg.max_body_bytes,
    };
    let mut limited = LimitedBody::new(body, ctx.limits(hard_limit), stats.clone());
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
                return Err(body_error(ctx, failure, hard_limit, stats.bytes(), None));
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
                Ok(Err(err)) => return Err(refused(err, stats.bytes())),
                Err(join) => return Err(ProxyError::Internal(join.to_string())),
            };
        }
        if done {
            break;
        }
    }
    let (path, offset, len) = staging
        .body_file()
        .map_err(|err| refused(err, stats.bytes()))?;
    let result = match file_body(&path, offset, len).await {
        Ok(body) => match send(ctx, target.clone().with_content_length(len), body, &stats).await {
            Ok(response) => {
                relay(
                    ctx,
                    response,
                    Some(len),
                    true,
                    &BodyFacts::default(),
                    None,
                    exchange,
                )
                .await
            }
            Err(SendError::Body(failure)) => {
                Err(limit::failure_to_error(failure, cfg.max_body_bytes))
            }
            Err(SendError::Proxy(err) | SendError::Upstream(err)) => Err(err),
        },
        Err(err) => Err(ProxyError::Internal(format!(
            "cannot read the staged body: {err}"
        ))),
    };
    spool_outcome(
        ctx,
        result,
        &target,
        Kept::Staged(staging),
        encoding,
        exchange,
    )
    .await
}

/// A body that reads `len` bytes at `offset` of a file, in 64 KiB frames.
pub(super) async fn file_body(
    path: &std::path::Path,
    offset: u64,
    len: u64,
) -> std::io::Result<UpstreamBody> {
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

/// Keeps the untrimmed original in `spool/archive/` (`archive_originals = true`) and points
/// the receiver at it: `Payload-Guard-Original: <id>`, plus `Payload-Guard-Original-Url` with
/// `claim_check_url`. Trimming never destroys data: when the archive cannot store it, the
/// payload is not trimmed and the sender gets 503.
pub(super) async fn archive_original(
    ctx: &Ctx<'_>,
    headers: &mut HeaderMap,
    wire: &Bytes,
    facts: &BodyFacts,
) -> Result<(), ProxyError> {
    let cfg = ctx.cfg;
    if !cfg.archive_originals {
        return Ok(());
    }
    let Some(state) = ctx.shared.spool.as_ref() else {
        return Ok(());
    };
    let mut meta = spool_meta(ctx, headers, wire.len() as u64, facts.call_id.clone());
    meta.trimmed = true;
    match deliver::commit(
        &state.spool,
        crate::spool::State::Archive,
        meta,
        wire.clone(),
    )
    .await
    {
        Ok(id) => {
            if let Ok(v) = HeaderValue::from_str(id.as_str()) {
                headers.insert(HeaderName::from_static("payload-guard-original"), v);
            }
            if let Some(url) = &cfg.claim_check_url
                && let Ok(v) = HeaderValue::from_str(&format!("{url}/{id}"))
            {
                headers.insert(HeaderName::from_static("payload-guard-original-url"), v);
            }
            Ok(())
        }
        Err(err) => {
            tracing::error!(route = %cfg.name, error = %err, "cannot archive the original: not trimming it");
            let mut inc = ctx.incident(Kind::SpoolRefused);
            inc.body_bytes = Some(wire.len() as u64);
            inc.reason = Some(format!("archive: {err}"));
            ctx.record(inc);
            Err(ProxyError::SpoolUnavailable(err.to_string()))
        }
    }
}

/// Metadata for a spool record of this request.
pub(super) fn spool_meta(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    len: u64,
    call_id: Option<String>,
) -> crate::spool::Meta {
    let mut meta = crate::spool::Meta::new(
        ctx.cfg.name.clone(),
        ctx.received_at,
        ctx.request_id.clone(),
        ctx.method.to_string(),
        ctx.path_and_query.clone(),
        len,
    );
    meta.call_id = call_id;
    meta.headers = deliver::stored_headers(headers);
    meta
}

/// For spool routes: keeps what the receiver could not take (spool, 202), and what it refused
/// for good (dead letters), and passes everything else on.
pub(super) async fn spool_outcome(
    ctx: &Ctx<'_>,
    result: Result<Response<UpstreamBody>, ProxyError>,
    target: &Target,
    kept: Kept,
    encoding: Option<Encoding>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let mut result = result;
    if cfg.spool
        && let Ok(response) = &result
        && deliver::disposition(response.status().as_u16()) == deliver::Disposition::Delivered
    {
        // A receiver that breaks off mid-answer may not have taken the payload: read its
        // (small) answer whole before acknowledging, and spool the payload if it broke.
        let Ok(response) = result else {
            unreachable!("matched Ok above")
        };
        let (parts, body) = response.into_parts();
        result = match read_answer(body, ANSWER_BYTES).await {
            Ok((prefix, rest)) => {
                return Ok(Response::from_parts(parts, prefixed_body(prefix, rest)));
            }
            Err(why) => Err(ProxyError::UpstreamBroken(format!(
                "the receiver's answer ({}) broke off: {why}",
                parts.status.as_u16()
            ))),
        };
    }
    let reason = match &result {
        Ok(response) => match deliver::disposition(response.status().as_u16()) {
            deliver::Disposition::Delivered => return result,
            deliver::Disposition::Retry(reason) if cfg.spool => reason,
            deliver::Disposition::Final(status) if cfg.dead_letter && status >= 400 => {
                let Ok(response) = result else {
                    unreachable!("matched Ok above")
                };
                return dead_letter(ctx, response, target, kept, encoding).await;
            }
            _ => return result,
        },
        Err(err) if cfg.spool && err.culprit() == crate::error::Culprit::Upstream => {
            err.to_string()
        }
        Err(_) => return result,
    };
    let Some(state) = ctx.shared.spool.as_ref() else {
        return result;
    };
    let len = kept.len();
    let call_id = kept.call_id(ctx, encoding).await;
    let mut meta = spool_meta(ctx, &target.headers, len, call_id);
    meta.last_error = Some(reason.clone());
    match kept.commit(state, crate::spool::State::Ready, meta).await {
        Ok(id) => {
            crate::warn_limited!(cfg.name, "payload spooled for redelivery", id = %id, reason = %reason);
            let id_header = HeaderValue::from_str(id.as_str()).ok();
            let mut response = match (cfg.on_spool_response, result) {
                (crate::config::OnSpoolResponse::Passthrough, Ok(response)) => response,
                (crate::config::OnSpoolResponse::Passthrough, Err(err)) => {
                    error_response(&err, &ctx.request_id, ctx.is_h1, exchange)
                }
                (crate::config::OnSpoolResponse::Accepted, _) => {
                    exchange.error = None;
                    let body = serde_json::json!({
                        "status": "accepted",
                        "spool_id": id.as_str(),
                        "request_id": ctx.request_id,
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
            if let Some(id) = id_header {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static("payload-guard-spool-id"), id);
            }
            Ok(response)
        }
        Err(err) => {
            tracing::error!(route = %cfg.name, error = %err, "cannot spool an undeliverable payload");
            let mut inc = ctx.incident(Kind::SpoolRefused);
            inc.body_bytes = Some(len);
            inc.reason = Some(err.to_string());
            ctx.record(inc);
            Err(ProxyError::SpoolUnavailable(err.to_string()))
        }
    }
}

/// How much of a spool route's 2xx answer is read before it is relayed (answers to webhooks
/// are small; a larger one is relayed as it streams, without the partial-answer check).
const ANSWER_BYTES: usize = 1024 * 1024;

/// Reads up to `max` bytes of an answer; `Err` if it broke off before its end.
async fn read_answer(
    mut body: UpstreamBody,
    max: usize,
) -> Result<(Bytes, Option<UpstreamBody>), String> {
    let mut prefix = Vec::new();
    loop {
        if prefix.len() >= max {
            return Ok((Bytes::from(prefix), Some(body)));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => return Err(crate::forward::error_chain(&err)),
            None => return Ok((Bytes::from(prefix), None)),
        }
    }
}

/// A body kept until the receiver has taken it: in memory, or staged in `spool/tmp/`.
pub(super) enum Kept {
    Memory(Bytes),
    Staged(crate::spool::Staging),
}

impl Kept {
    fn len(&self) -> u64 {
        match self {
            Kept::Memory(bytes) => bytes.len() as u64,
            Kept::Staged(staging) => staging.body_len(),
        }
    }

    async fn call_id(&self, ctx: &Ctx<'_>, encoding: Option<Encoding>) -> Option<String> {
        match self {
            Kept::Memory(wire) => call_id_of(ctx, wire, encoding),
            Kept::Staged(_) => None,
        }
    }

    /// Makes the body a durable record (on a blocking thread: it writes and fsyncs).
    async fn commit(
        self,
        state: &SpoolState,
        to: crate::spool::State,
        meta: crate::spool::Meta,
    ) -> Result<crate::spool::RecordId, crate::spool::SpoolError> {
        match self {
            Kept::Memory(bytes) => deliver::commit(&state.spool, to, meta, bytes).await,
            Kept::Staged(staging) => tokio::task::spawn_blocking(move || staging.commit(to, &meta))
                .await
                .unwrap_or_else(|join| {
                    Err(crate::spool::SpoolError::Io {
                        op: "commit",
                        path: std::path::PathBuf::new(),
                        source: std::io::Error::other(join.to_string()),
                    })
                }),
        }
    }
}

pub(super) fn call_id_of(
    ctx: &Ctx<'_>,
    wire: &Bytes,
    encoding: Option<Encoding>,
) -> Option<String> {
    if !payload::is_json(ctx.facts.content_type.as_deref()) {
        return None;
    }
    match encoding {
        Some(Encoding::Identity) => crate::trim::string_at(wire, &ctx.cfg.id_path),
        Some(enc) => payload::decode(wire, enc, ctx.cfg.max_body_bytes)
            .ok()
            .and_then(|d| crate::trim::string_at(&d, &ctx.cfg.id_path)),
        None => None,
    }
}

/// Keeps a payload the receiver refused for good in `spool/dead/`, and relays its answer.
pub(super) async fn dead_letter(
    ctx: &Ctx<'_>,
    response: Response<UpstreamBody>,
    target: &Target,
    kept: Kept,
    encoding: Option<Encoding>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let (prefix, rest) = sniff(body, incident::SNIPPET_BYTES).await;
    if let Some(state) = ctx.shared.spool.as_ref() {
        let call_id = kept.call_id(ctx, encoding).await;
        let mut meta = spool_meta(ctx, &target.headers, kept.len(), call_id);
        meta.status = Some(status);
        meta.snippet = Some(incident::snippet(&prefix));
        meta.last_error = Some(format!("receiver refused it: {status}"));
        match kept.commit(state, crate::spool::State::Dead, meta).await {
            Ok(id) => {
                crate::warn_limited!(ctx.cfg.name, "refused payload kept as a dead letter", id = %id, status)
            }
            Err(err) => {
                tracing::error!(route = %ctx.cfg.name, error = %err, status, "cannot keep the dead letter")
            }
        }
    }
    Ok(Response::from_parts(parts, prefixed_body(prefix, rest)))
}
