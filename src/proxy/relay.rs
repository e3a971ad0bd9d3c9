//! Relaying the receiver's answer: learning from 413s, the trim retry, sniffing bodies.

use super::*;

/// Relays the receiver's response; on a 413, fingerprints it, learns from it, records the
/// incident, and (with `retry_on_413`) trims below the learned bound and tries once more.
pub(super) async fn relay(
    ctx: &Ctx<'_>,
    response: Response<Incoming>,
    size: Option<u64>,
    complete: bool,
    facts: &BodyFacts,
    retry: Option<(RetryState<'_>, Target)>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let status = response.status().as_u16();
    exchange.upstream_status = Some(status);
    exchange.forwarded_bytes = size;
    exchange.upstream_secs = Some(ctx.upstream_nanos.load(Ordering::Relaxed) as f64 / 1e9);
    if response.status().is_success()
        && complete
        && let Some(size) = size
    {
        ctx.shared.learner.record_accepted(&cfg.name, size);
    }
    if status != 413 {
        return Ok(convert_response(response));
    }
    // Boxed: the 413 path (sniff, incident, trimmed retry) is rare and its state is large.
    Box::pin(refused(ctx, response, size, facts, retry, exchange)).await
}

/// The receiver answered 413: fingerprint it, learn from it, record the incident, and (with
/// `retry_on_413`) trim below the learned bound and try once more.
async fn refused(
    ctx: &Ctx<'_>,
    response: Response<Incoming>,
    size: Option<u64>,
    facts: &BodyFacts,
    retry: Option<(RetryState<'_>, Target)>,
    exchange: &mut Exchange,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cfg = ctx.cfg;
    let status = response.status().as_u16();
    // Read the start of its answer to name who refused.
    let (mut parts, body) = response.into_parts();
    let (prefix, rest) = sniff(body.map_err(BodyError::new).boxed_unsync(), SNIFF_BYTES).await;
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let rejector = incident::fingerprint(status, &headers, &prefix);
    let bracket = match size {
        Some(size) => ctx.shared.learner.record_rejected(&cfg.name, size),
        None => ctx.shared.learner.bracket(&cfg.name),
    };
    tracing::warn!(route = %cfg.name, rejector = rejector.as_str(), bytes = size, "receiver answered 413");
    let mut inc = ctx.incident(Kind::Upstream413);
    inc.body_bytes = size;
    inc.upstream_status = Some(status);
    inc.rejector = Some(rejector);
    inc.upstream_snippet = Some(incident::snippet(&prefix));
    inc.learned = Some(bracket);
    facts.fill(&mut inc);

    if let Some((state, target)) = retry
        && let Some(tc) = cfg.trim.as_ref()
        && let Some(bound) = incident::effective_limit(cfg.upstream_limit_bytes, &bracket)
        && size.is_some_and(|sent| bound < sent)
        && !tc.dry_run
    {
        match payload::shrink(state.wire, state.doc, state.encoding, tc, bound) {
            Ok(shrunk) if shrunk.fits && shrunk.changed() => {
                let mut again = target;
                mark_trimmed(ctx, &mut again.headers, &shrunk);
                let len = shrunk.body.len() as u64;
                let trimmed = removed(&shrunk);
                tracing::info!(route = %cfg.name, bound, bytes = len, "retrying the refused payload trimmed below the learned limit");
                let stats = BodyStats::default();
                stats.record_complete(len);
                let again = again.with_content_length(len);
                match send(ctx, again, full_body(Bytes::from(shrunk.body)), &stats).await {
                    Ok(second) => {
                        let second_status = second.status().as_u16();
                        inc.retry = Some(Retry {
                            attempted: true,
                            status: Some(second_status),
                            bytes: Some(len),
                        });
                        inc.trimmed = trimmed;
                        inc.bytes_after = Some(len);
                        exchange.upstream_status = Some(second_status);
                        if second.status().is_success() {
                            ctx.shared.learner.record_accepted(&cfg.name, len);
                        } else if second_status == 413 {
                            inc.learned = Some(ctx.shared.learner.record_rejected(&cfg.name, len));
                        }
                        ctx.record(inc);
                        return Ok(convert_response(second));
                    }
                    Err(_) => {
                        inc.retry = Some(Retry {
                            attempted: true,
                            status: None,
                            bytes: Some(len),
                        });
                    }
                }
            }
            _ => {
                inc.retry = Some(Retry {
                    attempted: false,
                    status: None,
                    bytes: None,
                });
                inc.reason = Some(format!(
                    "trim rules cannot reach the learned limit of {bound} bytes"
                ));
            }
        }
    }
    ctx.record(inc);
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(parts, prefixed_body(prefix, rest)))
}

pub(super) fn convert_response(response: Response<Incoming>) -> Response<UpstreamBody> {
    let (mut parts, body) = response.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body.map_err(BodyError::new).boxed_unsync())
}

/// Reads up to `max` bytes of a body, returning them and the rest of the body.
pub(super) async fn sniff(mut body: UpstreamBody, max: usize) -> (Bytes, Option<UpstreamBody>) {
    let mut prefix = Vec::new();
    loop {
        if prefix.len() >= max {
            return (Bytes::from(prefix), Some(body));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                tracing::debug!(error = %err, "receiver's body ended early");
                return (Bytes::from(prefix), None);
            }
            None => return (Bytes::from(prefix), None),
        }
    }
}

/// A body that yields `prefix`, then the rest of the original body.
pub(super) fn prefixed_body(prefix: Bytes, rest: Option<UpstreamBody>) -> UpstreamBody {
    Prefixed {
        prefix: (!prefix.is_empty()).then_some(prefix),
        rest,
    }
    .boxed_unsync()
}

pub(super) struct Prefixed {
    prefix: Option<Bytes>,
    rest: Option<UpstreamBody>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        match self.rest.as_mut() {
            None => std::task::Poll::Ready(None),
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}
