//! Phase 1, admit: refuse what is not a webhook request before anything is read or sent,
//! match the route, and pre-check the declared length against `max_body`.

use std::net::SocketAddr;

use http::Method;
use http::header;
use http::request::Parts;

use super::context::RequestCtx;
use super::{ConnInfo, Runtime};
use crate::error::ProxyError;
use crate::incident::Kind;

/// A request that may go on, and where.
pub(super) struct Admitted {
    /// The matched route's index in the runtime.
    pub(super) route_index: usize,
    /// The request path after the route's prefix.
    pub(super) rest: String,
}

/// Refuses ambiguous framing, CONNECT, absolute targets for other hosts and upgrades, then
/// matches the route.
pub(super) fn admit(rt: &Runtime, parts: &Parts, conn: &ConnInfo) -> Result<Admitted, ProxyError> {
    if conn.framing_conflict {
        return Err(ProxyError::AmbiguousLength);
    }
    if parts.version < http::Version::HTTP_2
        && head_bytes(parts) > rt.config.server.max_header_bytes
    {
        return Err(ProxyError::HeaderTooLarge);
    }
    if parts.method == Method::CONNECT {
        return Err(ProxyError::ConnectRefused);
    }
    if parts.version < http::Version::HTTP_2
        && let Some(authority) = parts.uri.authority()
        && !targets_us(authority, conn.local)
    {
        return Err(ProxyError::ForeignTarget);
    }
    if parts.headers.contains_key(header::UPGRADE) {
        return Err(ProxyError::UpgradeRefused);
    }
    let found = rt.table.find(parts.uri.path()).ok_or(ProxyError::NoRoute)?;
    Ok(Admitted {
        route_index: found.index,
        rest: found.rest.to_string(),
    })
}

/// The declared length against `max_body`: over it is refused before any body byte is read
/// (an `over_max_body` incident).
pub(super) fn precheck(ctx: &mut RequestCtx<'_>) -> Result<(), ProxyError> {
    match crate::limit::precheck(&ctx.headers, ctx.cfg.max_body_bytes) {
        Ok(declared) => {
            ctx.declared = declared;
            Ok(())
        }
        Err(err) => {
            if let ProxyError::BodyTooLarge { .. } = err {
                let mut inc = ctx.incident(Kind::OverMaxBody);
                inc.content_length = ctx
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok());
                inc.body_bytes = Some(0);
                ctx.incidents.push(inc);
            }
            Err(err)
        }
    }
}

/// The size of an HTTP/1 request head as sent: request line, header lines, blank line.
///
/// hyper refuses heads past its read buffer, which is larger than `max_header_bytes` (see
/// `server::READ_BUFFER_BYTES`), so the configured limit is checked here.
fn head_bytes(parts: &Parts) -> usize {
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path().len(), |pq| pq.as_str().len());
    let line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + fields + 2
}

/// Whether an absolute-form target names this listener (the only absolute form we accept).
fn targets_us(authority: &http::uri::Authority, local: SocketAddr) -> bool {
    let port = authority.port_u16().unwrap_or(80);
    if port != local.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == local.ip())
}
