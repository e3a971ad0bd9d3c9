//! Phase 6, settle: what happened to a request is written down once, from its outcome, here.
//! Each incident is recorded (log file, metrics) with one line in the proxy's own log; a
//! failure of the receiver or of the proxy gets one WARN line (repeats of a kind on a route
//! collapsed by [`crate::warn_limit`]); the access log is filled in
//! (it is written when the response body is done, with the request metrics).

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};

use super::context::RequestCtx;
use super::full_body;
use crate::error::{Culprit, ProxyError};
use crate::forward::UpstreamBody;
use crate::observe::Exchange;

impl RequestCtx<'_> {
    /// Records the incidents, says what failed, and fills in the access-log line.
    pub(super) fn settle(
        &mut self,
        result: &Result<Response<UpstreamBody>, ProxyError>,
        exchange: &mut Exchange,
    ) {
        let head_fields = self
            .stats
            .as_ref()
            .filter(|_| self.head_sampled)
            .filter(|_| self.incidents.iter().any(|i| i.top_fields.is_empty()))
            .map(|stats| {
                let head = stats.head_sample();
                crate::trim::top_fields_of_head(&head, crate::incident::TOP_FIELDS)
                    .into_iter()
                    .map(|f| crate::incident::FieldBytes {
                        path: f.path,
                        bytes: f.bytes as u64,
                    })
                    .collect::<Vec<_>>()
            });
        for mut incident in std::mem::take(&mut self.incidents) {
            // A streamed body's incidents name the fields of its head (sampled as it passed).
            if incident.top_fields.is_empty()
                && let Some(fields) = &head_fields
            {
                incident.top_fields.clone_from(fields);
            }
            super::record_incident(self.shared, incident);
        }
        if let Err(err) = result
            && err.culprit() != Culprit::Sender
        {
            crate::warn_limited!(self.cfg.name, "request failed", request_id = %self.request_id, error = err.code(), reason = %err);
        }
        // The console's size histograms: the payload's size as sent, also when it was refused
        // on its Content-Length before a byte was read (a request without either has none).
        let read = self.stats.as_ref().map_or(0, |s| s.bytes());
        let size = self.declared.unwrap_or(0).max(read);
        if size > 0 {
            self.shared.metrics.sizes().record(&self.cfg.name, size);
        }
        exchange.body = self.stats.clone();
        exchange.upstream_status = self.upstream_status;
        exchange.forwarded_bytes = self.forwarded_bytes;
        exchange.upstream_secs = self.upstream_secs;
    }
}

/// The proxy's own answer: the status from [`ProxyError::status`], a short JSON body, and
/// `Connection: close` when the request body may be unread.
pub fn error_response(
    err: &ProxyError,
    request_id: &str,
    is_h1: bool,
    exchange: &mut Exchange,
) -> Response<UpstreamBody> {
    exchange.set_error(err);
    let mut response = Response::new(full_body(Bytes::from(err.json_body(request_id))));
    *response.status_mut() = err.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if is_h1 && err.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = err.retry_after_secs() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if err.status() == http::StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    response
}
