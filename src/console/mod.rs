//! The operator's console on the admin listener: server-rendered pages at `/`, `/incidents`,
//! `/spool` and `/learned`, the same data as JSON under `/api/…`, and buttons that act on the
//! spool and on learned limits. Its CSS and script are compiled into the binary (no CDN, works
//! offline).
//!
//! # Security
//! - Authentication is the admin listener's: with `[server] admin_token_env` set, every page and
//!   API call needs the bearer token, or the `pg_admin` cookie that the sign-in form sets
//!   (`HttpOnly; SameSite=Strict`, for the browser session). Without a token the admin listener
//!   is on loopback, and the console only answers requests addressed to an IP or `localhost`
//!   (a page on another site cannot reach it through DNS rebinding).
//! - Every POST carries the process's CSRF token (form field `csrf` or header `X-CSRF-Token`),
//!   unless it is authenticated by an `Authorization` header, which a browser never adds to a
//!   cross-site request. Every action is logged with who did it.
//! - Lists never show a payload body or request headers: only opening one record does, with
//!   credential and signature headers redacted.

pub mod actions;
pub mod histogram;
pub mod html;
pub mod view;

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Serialize;

pub use self::actions::{ActionError, SpoolAction, reset_learned, spool_action};
use self::html::{Notice, PageCtx};
use self::view::IncidentFilter;
use crate::admin::{Admin, Caller};
use crate::incident::Kind;
use crate::spool::RecordId;

/// The cookie that keeps the admin token in the browser.
pub const COOKIE: &str = "pg_admin";

/// The header that carries the CSRF token on API calls from scripts in the page.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The largest form or JSON body the console reads.
const FORM_MAX_BYTES: usize = 16 * 1024;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/favicon.svg");

/// The console's per-process state.
#[derive(Debug)]
pub struct Console {
    csrf: String,
}

impl Default for Console {
    fn default() -> Self {
        Console::new()
    }
}

impl Console {
    /// A console with a fresh random CSRF token.
    pub fn new() -> Console {
        let csrf = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        Console { csrf }
    }

    fn csrf_ok(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes()))
    }
}

/// Whether `path` belongs to the console (the other admin endpoints are `admin`'s).
pub fn serves(path: &str) -> bool {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    path == "/"
        || [
            "/incidents",
            "/spool",
            "/learned",
            "/login",
            "/logout",
            "/assets",
            "/api",
        ]
        .into_iter()
        .any(under)
}

/// The admin token from the `pg_admin` cookie, if the request carries one.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| percent_decode_str(value).decode_utf8().ok())
        .map(|v| v.into_owned())
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    response
}

fn page(status: StatusCode, body: String) -> Answer {
    respond(status, "text/html; charset=utf-8", body)
}

fn json(status: StatusCode, value: &impl Serialize) -> Answer {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => error_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

fn error_json(status: StatusCode, error: &str, message: &str) -> Answer {
    let body = serde_json::json!({"error": error, "message": message}).to_string();
    respond(status, "application/json", body)
}

fn redirect(to: &'static str) -> Answer {
    let mut response = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

/// Whether the request is addressed to an IP literal or `localhost` (not a DNS name that could
/// be rebound to the loopback address by another site).
fn addressed_to_ip(req: &Request<Incoming>) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
    let Some(host) = host else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// The fields of a query string or an `application/x-www-form-urlencoded` body.
fn fields(text: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(text).into_owned().collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Serves one console request (the admin listener calls it for every path [`serves`]).
pub async fn handle(
    admin: &Admin,
    console: &Console,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Answer {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(asset) = path.strip_prefix("/assets/") {
        return match (method, asset) {
            (Method::GET, "console.css") => respond(StatusCode::OK, "text/css; charset=utf-8", CSS),
            (Method::GET, "console.js") => {
                respond(StatusCode::OK, "text/javascript; charset=utf-8", JS)
            }
            (Method::GET, "favicon.svg") => respond(StatusCode::OK, "image/svg+xml", ICON),
            _ => error_json(StatusCode::NOT_FOUND, "not_found", "no such asset"),
        };
    }
    let token_env = admin.proxy.current().config.server.admin_token_env.clone();
    let api = path.starts_with("/api/");
    if token_env.is_none() && !addressed_to_ip(&req) {
        let message = "the console answers only requests addressed to an IP address or localhost; set [server] admin_token_env to use a host name";
        return error_json(StatusCode::MISDIRECTED_REQUEST, "misdirected", message);
    }
    let query = fields(req.uri().query().unwrap_or("").as_bytes());
    let caller = crate::admin::caller(admin, req.headers());
    // Read a POST's form before deciding, so the sign-in form and the CSRF field are at hand.
    let (parts, body) = req.into_parts();
    let form = if method == Method::POST {
        match Limited::new(body, FORM_MAX_BYTES).collect().await {
            Ok(collected) => fields(&collected.to_bytes()),
            Err(_) => {
                return error_json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "form_too_large",
                    "console forms are at most 16 KiB",
                );
            }
        }
    } else {
        Vec::new()
    };
    if (&method, path.as_str()) == (&Method::POST, "/login") {
        return login(admin, &form, peer);
    }
    let Some(caller) = caller else {
        if api {
            let mut response = error_json(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin requests need Authorization: Bearer <token>",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        return page(StatusCode::UNAUTHORIZED, html::login_page(None));
    };
    let who = match (&caller, &token_env) {
        (Caller::Open, _) | (_, None) => format!("peer {}", peer.ip()),
        (_, Some(env)) => format!("token {env}"),
    };
    if method == Method::POST && caller != Caller::Bearer {
        let given = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .or_else(|| field(&form, "csrf"))
            .unwrap_or("");
        if !console.csrf_ok(given) {
            tracing::warn!(path = %path, peer = %peer.ip(), "console POST refused: missing or wrong CSRF token");
            return error_json(
                StatusCode::FORBIDDEN,
                "csrf",
                "this form is stale or came from another site: reload the console and try again",
            );
        }
    }
    let ctx = PageCtx {
        csrf: &console.csrf,
        logout: token_env.is_some(),
    };
    let request = Req {
        admin,
        ctx: &ctx,
        who: &who,
        peer,
        query: &query,
        form: &form,
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET, [""]) => request.routes(false).await,
        (Method::GET, ["api", "routes"]) => request.routes(true).await,
        (Method::GET, ["incidents"]) => request.incidents(false).await,
        (Method::GET, ["api", "incidents"]) => request.incidents(true).await,
        (Method::GET, ["spool"]) => request.spool(None, false).await,
        (Method::GET, ["api", "spool"]) => request.spool(None, true).await,
        (Method::GET, ["spool", id]) => request.record(id, false, false).await,
        (Method::GET, ["api", "spool", id]) => request.record(id, true, false).await,
        (Method::GET, ["api", "spool", id, "body"]) => request.record(id, true, true).await,
        (Method::POST, ["spool", id, action]) => request.spool_action(id, action, false).await,
        (Method::POST, ["api", "spool", id, action]) => {
            request.spool_action(id, action, true).await
        }
        (Method::GET, ["learned"]) => request.learned(None, false).await,
        (Method::GET, ["api", "learned"]) => request.learned(None, true).await,
        (Method::POST, ["learned", "reset"]) => request.reset(false).await,
        (Method::POST, ["api", "learned", "reset"]) => request.reset(true).await,
        (Method::GET, ["api", "csrf"]) => json(
            StatusCode::OK,
            &serde_json::json!({"csrf": console.csrf, "header": CSRF_HEADER}),
        ),
        (Method::POST, ["logout"]) => {
            let mut response = redirect("/");
            let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
            if let Ok(v) = HeaderValue::from_str(&clear) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        _ => error_json(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such console page or API call",
        ),
    }
}

/// `POST /login`: checks the token and keeps it in the session cookie.
fn login(admin: &Admin, form: &[(String, String)], peer: SocketAddr) -> Answer {
    let runtime = admin.proxy.current();
    let Some(token) = runtime.config.server.admin_token.as_ref() else {
        return redirect("/");
    };
    let given = field(form, "token").unwrap_or("");
    if !token.matches(given.as_bytes()) {
        tracing::warn!(peer = %peer.ip(), "console sign-in refused: wrong admin token");
        return page(
            StatusCode::UNAUTHORIZED,
            html::login_page(Some("That is not the admin token.")),
        );
    }
    tracing::info!(peer = %peer.ip(), "console sign-in");
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        utf8_percent_encode(given, NON_ALPHANUMERIC)
    );
    let mut response = redirect("/");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// One authorised console request.
struct Req<'a> {
    admin: &'a Admin,
    ctx: &'a PageCtx<'a>,
    who: &'a str,
    peer: SocketAddr,
    query: &'a [(String, String)],
    form: &'a [(String, String)],
}

/// Runs a blocking read off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

impl Req<'_> {
    fn failed(&self, api: bool, status: StatusCode, error: &str, message: &str) -> Answer {
        if api {
            error_json(status, error, message)
        } else {
            page(status, html::error_page("Not available", message, self.ctx))
        }
    }

    async fn routes(&self, api: bool) -> Answer {
        let view = view::routes(&self.admin.proxy);
        if api {
            json(StatusCode::OK, &view)
        } else {
            page(StatusCode::OK, html::routes_page(&view, self.ctx))
        }
    }

    async fn incidents(&self, api: bool) -> Answer {
        let kind = match field(self.query, "kind") {
            None => None,
            Some(name) => match Kind::ALL.into_iter().find(|k| k.as_str() == name) {
                Some(kind) => Some(kind),
                None => {
                    let message = format!(
                        "unknown incident kind {name:?}: use one of {}",
                        Kind::ALL.map(Kind::as_str).join(", ")
                    );
                    return self.failed(api, StatusCode::BAD_REQUEST, "bad_kind", &message);
                }
            },
        };
        let filter = IncidentFilter {
            route: field(self.query, "route").map(str::to_string),
            kind,
        };
        let proxy = self.admin.proxy.clone();
        let for_read = filter.clone();
        match blocking(move || view::incidents(&proxy, &for_read)).await {
            Some(Ok(view)) if api => json(StatusCode::OK, &view),
            Some(Ok(view)) => page(
                StatusCode::OK,
                html::incidents_page(&view, &filter, self.ctx),
            ),
            Some(Err(message)) => {
                tracing::error!(error = %message, "console cannot read the incident log");
                self.failed(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "read_failed",
                    &message,
                )
            }
            None => self.failed(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "read_failed",
                "reading the incident log failed",
            ),
        }
    }

    async fn spool(&self, notice: Option<Notice>, api: bool) -> Answer {
        let proxy = self.admin.proxy.clone();
        match blocking(move || view::spool(&proxy)).await {
            Some(Ok(view)) if api => json(StatusCode::OK, &view),
            Some(Ok(view)) => page(
                StatusCode::OK,
                html::spool_page(&view, notice.as_ref(), self.ctx),
            ),
            Some(Err(e)) => {
                tracing::error!(error = %e, "console cannot list the spool");
                self.failed(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "read_failed",
                    &e.to_string(),
                )
            }
            None => self.failed(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "read_failed",
                "listing the spool failed",
            ),
        }
    }

    async fn record(&self, id: &str, api: bool, body: bool) -> Answer {
        let Ok(id) = id.parse::<RecordId>() else {
            return self.failed(
                api,
                StatusCode::BAD_REQUEST,
                "bad_id",
                "not a spool record id",
            );
        };
        let proxy = self.admin.proxy.clone();
        let read_id = id.clone();
        let found = blocking(move || view::record(&proxy, &read_id)).await;
        let (detail, bytes) = match found {
            Some(Ok(Some(found))) => found,
            Some(Ok(None)) => {
                let message = format!("no spool record {id} (delivered or purged?)");
                return self.failed(api, StatusCode::NOT_FOUND, "not_found", &message);
            }
            Some(Err(e)) => {
                return self.failed(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "read_failed",
                    &e.to_string(),
                );
            }
            None => {
                return self.failed(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "read_failed",
                    "reading the record failed",
                );
            }
        };
        tracing::info!(id = %id, who = %self.who, peer = %self.peer.ip(), body, "console opened a spool record");
        if body {
            return respond(StatusCode::OK, "application/octet-stream", bytes);
        }
        if api {
            json(StatusCode::OK, &detail)
        } else {
            page(StatusCode::OK, html::record_page(&detail, self.ctx))
        }
    }

    async fn spool_action(&self, id: &str, action: &str, api: bool) -> Answer {
        let Some(action) = SpoolAction::parse(action) else {
            return self.failed(
                api,
                StatusCode::NOT_FOUND,
                "not_found",
                "spool actions are replay, dead and purge",
            );
        };
        let Ok(id) = id.parse::<RecordId>() else {
            return self.failed(
                api,
                StatusCode::BAD_REQUEST,
                "bad_id",
                "not a spool record id",
            );
        };
        let result = spool_action(&self.admin.proxy, action, &id, self.who).await;
        let (status, outcome) = match &result {
            Ok(message) => (StatusCode::OK, message.clone()),
            Err(ActionError::NotFound(_) | ActionError::NoSpool) => {
                (StatusCode::NOT_FOUND, result_text(&result))
            }
            Err(ActionError::Conflict(_)) => (StatusCode::CONFLICT, result_text(&result)),
            Err(ActionError::Spool(_)) => (StatusCode::INTERNAL_SERVER_ERROR, result_text(&result)),
        };
        tracing::info!(action = action.as_str(), id = %id, who = %self.who, peer = %self.peer.ip(), ok = result.is_ok(), outcome = %outcome, "console action");
        if api {
            return match result {
                Ok(_) => json(
                    status,
                    &serde_json::json!({"id": id.as_str(), "action": action.as_str(), "outcome": outcome}),
                ),
                Err(_) => error_json(status, "action_failed", &outcome),
            };
        }
        let notice = Notice {
            ok: result.is_ok(),
            text: outcome,
        };
        self.spool(Some(notice), false).await
    }

    async fn learned(&self, notice: Option<Notice>, api: bool) -> Answer {
        let proxy = self.admin.proxy.clone();
        match blocking(move || view::learned(&proxy)).await {
            Some(view) if api => json(StatusCode::OK, &view),
            Some(view) => page(
                StatusCode::OK,
                html::learned_page(&view, notice.as_ref(), self.ctx),
            ),
            None => self.failed(
                api,
                StatusCode::INTERNAL_SERVER_ERROR,
                "read_failed",
                "reading the learned limits failed",
            ),
        }
    }

    async fn reset(&self, api: bool) -> Answer {
        let route = field(self.form, "route").or_else(|| field(self.query, "route"));
        let Some(route) = route else {
            return self.failed(
                api,
                StatusCode::BAD_REQUEST,
                "bad_route",
                "name the route to reset: route=<name>",
            );
        };
        let before = reset_learned(self.admin.proxy.shared(), route);
        tracing::info!(action = "reset_learned", route, who = %self.who, peer = %self.peer.ip(), largest_accepted = ?before.largest_accepted, smallest_rejected = ?before.smallest_rejected, "console action");
        let outcome = format!("forgot what was learned about route {route}");
        if api {
            return json(
                StatusCode::OK,
                &serde_json::json!({"route": route, "action": "reset", "before": before, "outcome": outcome}),
            );
        }
        let notice = Notice {
            ok: true,
            text: outcome,
        };
        self.learned(Some(notice), false).await
    }
}

fn result_text(result: &Result<String, ActionError>) -> String {
    match result {
        Ok(message) => message.clone(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_paths() {
        for path in [
            "/",
            "/incidents",
            "/spool",
            "/spool/x/replay",
            "/api/routes",
            "/assets/console.js",
            "/login",
        ] {
            assert!(serves(path), "{path}");
        }
        for path in [
            "/healthz",
            "/metrics",
            "/reload",
            "/originals/x",
            "/spooled",
            "/apix",
        ] {
            assert!(!serves(path), "{path}");
        }
    }

    #[test]
    fn cookie_token_is_found_and_decoded() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=b; pg_admin=s%3Bcr%20t; c=d"),
        );
        assert_eq!(cookie_token(&headers).as_deref(), Some("s;cr t"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }

    #[test]
    fn assets_are_small() {
        assert!(CSS.len() + JS.len() + ICON.len() < 100 * 1024);
    }
}
