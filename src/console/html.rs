//! The console's pages, rendered on the server from the [`super::view`] types: semantic HTML
//! (landmarks, headings, tables with headers, native `<details>` and forms), every value
//! escaped, no inline script or style (the page's Content-Security-Policy forbids them).

use std::fmt::Write;
use std::time::Duration;

use super::histogram;
use super::view::{
    IncidentFilter, IncidentsView, LearnedView, RecordDetail, RecordView, RoutesView, SpoolView,
};
use crate::config::units::human_bytes;
use crate::incident::{Incident, Kind};
use crate::spool::human_age;

/// Escapes text for HTML content and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a value for a query string.
fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// What every page needs besides its content.
#[derive(Debug, Clone)]
pub struct PageCtx<'a> {
    /// The CSRF token for the page's forms.
    pub csrf: &'a str,
    /// Whether a log-out button is shown (a token is configured).
    pub logout: bool,
}

/// A message at the top of a page after an action.
#[derive(Debug, Clone)]
pub struct Notice {
    /// It worked.
    pub ok: bool,
    /// What happened.
    pub text: String,
}

const NAV: [(&str, &str); 4] = [
    ("/", "Routes"),
    ("/incidents", "Incidents"),
    ("/spool", "Spool"),
    ("/learned", "Learned limits"),
];

fn layout(
    title: &str,
    current: &str,
    ctx: &PageCtx,
    notice: Option<&Notice>,
    main: &str,
) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    let _ = write!(
        out,
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><meta name="csrf-token" content="{csrf}"><title>{title} · payload-guard</title><link rel="icon" href="/assets/favicon.svg" type="image/svg+xml"><link rel="stylesheet" href="/assets/console.css"><script src="/assets/console.js" defer></script></head><body><a class="skip" href="#main">Skip to content</a><header><p class="brand">payload-guard</p><nav aria-label="Console"><ul>"##,
        csrf = escape(ctx.csrf),
        title = escape(title),
    );
    for (href, label) in NAV {
        let aria = if href == current {
            r#" aria-current="page""#
        } else {
            ""
        };
        let _ = write!(out, r#"<li><a href="{href}"{aria}>{label}</a></li>"#);
    }
    out.push_str("</ul></nav>");
    if ctx.logout {
        let _ = write!(
            out,
            r#"<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="{}"><button type="submit">Log out</button></form>"#,
            escape(ctx.csrf)
        );
    }
    let _ = write!(
        out,
        r#"</header><main id="main" tabindex="-1"><h1>{}</h1>"#,
        escape(title)
    );
    if let Some(notice) = notice {
        let (class, label) = if notice.ok {
            ("ok", "Done:")
        } else {
            ("error", "Not done:")
        };
        let _ = write!(
            out,
            r#"<p class="notice {class}" role="status"><strong>{label}</strong> {}</p>"#,
            escape(&notice.text)
        );
    }
    out.push_str(main);
    out.push_str("</main></body></html>");
    out
}

fn bytes(value: Option<u64>) -> String {
    value.map_or_else(|| "—".to_string(), |b| escape(&human_bytes(b)))
}

fn csrf_input(ctx: &PageCtx) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        escape(ctx.csrf)
    )
}

/// `GET /`: one row per route, with its histogram.
pub fn routes_page(view: &RoutesView, ctx: &PageCtx) -> String {
    let mut main = String::new();
    main.push_str(r#"<p class="lead">Request sizes against each receiver's limits. Counters since start-up; sizes of the latest requests (up to 1024 per route).</p>"#);
    if view.routes.is_empty() {
        main.push_str("<p>No routes are configured.</p>");
        return layout("Routes", "/", ctx, None, &main);
    }
    main.push_str(r#"<div class="table-wrap"><table class="routes"><caption class="sr-only">Routes</caption><thead><tr><th scope="col">Route</th><th scope="col">Requests</th><th scope="col">Incidents</th><th scope="col">Limits</th><th scope="col">Recent sizes</th></tr></thead><tbody>"#);
    for (index, route) in view.routes.iter().enumerate() {
        let c = &route.counts;
        let total = c.requests_2xx + c.requests_3xx + c.requests_4xx + c.requests_5xx;
        let mut incidents = String::new();
        for (kind, count) in c.incidents.iter().filter(|(_, n)| **n > 0) {
            let _ = write!(
                incidents,
                r#"<li><a href="/incidents?route={r}&amp;kind={kind}">{kind}</a>: {count}</li>"#,
                r = escape(&query_value(&route.name)),
            );
        }
        if incidents.is_empty() {
            incidents.push_str("<li>none</li>");
        }
        let learned = match (
            route.learned.largest_accepted,
            route.learned.smallest_rejected,
        ) {
            (None, None) => "<dt>learned</dt><dd>nothing yet</dd>".to_string(),
            (a, r) => format!(
                "<dt>accepted</dt><dd>up to {}</dd><dt>refused</dt><dd>from {}</dd>",
                bytes(a),
                bytes(r)
            ),
        };
        let _ = write!(
            main,
            r#"<tr><th scope="row"><span class="route-name">{name}</span><br><code>{prefix}</code><br><span class="upstream">→ {upstream}</span></th><td><span class="total">{total}</span><dl class="counts"><dt>2xx</dt><dd>{ok}</dd><dt>4xx</dt><dd>{c4}</dd><dt>5xx</dt><dd>{c5}</dd><dt>trimmed</dt><dd>{trims}</dd></dl></td><td><ul class="plain">{incidents}</ul></td><td><dl class="limits"><dt>upstream_limit</dt><dd>{ul}</dd><dt>max_body</dt><dd>{mb}</dd><dt>enforced</dt><dd>{eff}</dd>{learned}</dl></td><td>{svg}<p class="stats">p50 {p50} · p95 {p95} · max {max}</p></td></tr>"#,
            name = escape(&route.name),
            prefix = escape(&route.path_prefix),
            upstream = escape(&route.upstream),
            ok = c.requests_2xx,
            c4 = c.requests_4xx,
            c5 = c.requests_5xx,
            trims = c.trims,
            ul = bytes(route.upstream_limit),
            mb = bytes(Some(route.max_body)),
            eff = bytes(route.effective_limit),
            svg = histogram::svg(
                &format!("hist-{index}"),
                &route.name,
                &route.sizes.recent,
                &route.sizes.lines
            ),
            p50 = bytes(route.sizes.p50),
            p95 = bytes(route.sizes.p95),
            max = bytes(route.sizes.max),
        );
    }
    main.push_str("</tbody></table></div>");
    layout("Routes", "/", ctx, None, &main)
}

fn option(value: &str, label: &str, selected: bool) -> String {
    format!(
        r#"<option value="{}"{}>{}</option>"#,
        escape(value),
        if selected { " selected" } else { "" },
        escape(label)
    )
}

/// `GET /incidents`: the latest incidents, filterable, each expandable.
pub fn incidents_page(view: &IncidentsView, filter: &IncidentFilter, ctx: &PageCtx) -> String {
    let mut main = String::new();
    main.push_str(r#"<form method="get" action="/incidents" class="filters" role="search"><label for="f-route">Route</label><select id="f-route" name="route" data-autosubmit>"#);
    main.push_str(&option("", "all routes", filter.route.is_none()));
    for route in &view.routes {
        main.push_str(&option(
            route,
            route,
            filter.route.as_deref() == Some(route),
        ));
    }
    main.push_str(r#"</select><label for="f-kind">Kind</label><select id="f-kind" name="kind" data-autosubmit>"#);
    main.push_str(&option("", "all kinds", filter.kind.is_none()));
    for kind in Kind::ALL {
        main.push_str(&option(
            kind.as_str(),
            kind.as_str(),
            filter.kind == Some(kind),
        ));
    }
    main.push_str(r#"</select><button type="submit">Filter</button></form>"#);
    let _ = write!(
        main,
        r#"<p class="lead">{shown} shown (newest first, at most {max}) of {total} in <code>{log}</code>.</p>"#,
        shown = view.incidents.len(),
        max = super::view::INCIDENTS_SHOWN,
        total = view.total,
        log = escape(&view.log),
    );
    for warning in &view.warnings {
        let _ = write!(main, r#"<p class="notice error">{}</p>"#, escape(warning));
    }
    if view.incidents.is_empty() {
        main.push_str("<p>No incidents match.</p>");
    }
    main.push_str(r#"<ol class="incidents">"#);
    for incident in &view.incidents {
        main.push_str("<li>");
        incident_details(&mut main, incident, view);
        main.push_str("</li>");
    }
    main.push_str("</ol>");
    layout("Incidents", "/incidents", ctx, None, &main)
}

fn incident_details(out: &mut String, i: &Incident, view: &IncidentsView) {
    let size = i.payload_bytes();
    let _ = write!(
        out,
        r#"<details class="incident"><summary><time>{ts}</time> <span class="kind">{kind}</span> on <strong>{route}</strong>{size}{action}</summary><dl class="fields">"#,
        ts = escape(&i.ts),
        kind = i.kind.as_str(),
        route = escape(&i.route),
        size = size.map_or_else(String::new, |s| format!(" · {}", escape(&human_bytes(s)))),
        action = i
            .action
            .map_or_else(String::new, |a| format!(" · {}", a.as_str())),
    );
    let mut field = |name: &str, value: String| {
        let _ = write!(out, "<dt>{name}</dt><dd>{value}</dd>");
    };
    field(
        "request_id",
        format!("<code>{}</code>", escape(&i.request_id)),
    );
    if let Some(call) = &i.call_id {
        field("call_id", format!("<code>{}</code>", escape(call)));
    }
    if let Some(path) = &i.path {
        field(
            "request",
            format!(
                "{} <code>{}</code>",
                escape(i.method.as_deref().unwrap_or("")),
                escape(path)
            ),
        );
    }
    if let Some(cl) = i.content_length {
        field("content_length", bytes(Some(cl)));
    }
    if let Some(b) = i.body_bytes {
        field("body_bytes", bytes(Some(b)));
    }
    if let Some(b) = i.bytes_after {
        field("bytes_after", bytes(Some(b)));
    }
    field(
        "limits",
        format!(
            "upstream_limit {} · max_body {}",
            bytes(i.upstream_limit),
            bytes(i.max_body)
        ),
    );
    if !i.top_fields.is_empty() {
        let list: String = i
            .top_fields
            .iter()
            .map(|f| {
                format!(
                    "<li><code>{}</code> {}</li>",
                    escape(&f.path),
                    bytes(Some(f.bytes))
                )
            })
            .collect();
        field("top fields", format!(r#"<ul class="plain">{list}</ul>"#));
    }
    if !i.trimmed.is_empty() {
        let list: String = i
            .trimmed
            .iter()
            .map(|f| {
                format!(
                    "<li><code>{}</code> −{}</li>",
                    escape(&f.path),
                    bytes(Some(f.removed))
                )
            })
            .collect();
        field("trimmed", format!(r#"<ul class="plain">{list}</ul>"#));
    }
    if let Some(status) = i.upstream_status {
        field("upstream_status", status.to_string());
    }
    if let Some(rejector) = i.rejector {
        field("rejector", escape(rejector.as_str()));
    }
    if let Some(snippet) = &i.upstream_snippet {
        field(
            "receiver said",
            format!("<pre class=\"snippet\">{}</pre>", escape(snippet)),
        );
    }
    if let Some(reason) = &i.reason {
        field("reason", escape(reason));
    }
    out.push_str("</dl>");
    if let Some(advice) = view.advice.get(&i.route) {
        let _ = write!(
            out,
            r#"<section class="advice"><h2>Diagnosis for route {}</h2>"#,
            escape(&i.route)
        );
        if advice.remediation.is_empty() && advice.trim.is_none() {
            out.push_str("<p>No receiver-side change identified yet.</p>");
        }
        if !advice.remediation.is_empty() {
            out.push_str("<ul>");
            for line in &advice.remediation {
                let _ = write!(out, "<li>{}</li>", escape(line));
            }
            out.push_str("</ul>");
        }
        if let Some(toml) = &advice.trim {
            let _ = write!(
                out,
                "<p>A trim rule that would have saved the most requests:</p><pre>{}</pre>",
                escape(toml)
            );
        }
        out.push_str("</section>");
    }
    out.push_str("</details>");
}

fn age(secs: u64) -> String {
    human_age(Duration::from_secs(secs))
}

fn record_buttons(out: &mut String, r: &RecordView, ctx: &PageCtx) {
    let id = escape(&r.id);
    let csrf = csrf_input(ctx);
    let _ = write!(
        out,
        r#"<form method="post" action="/spool/{id}/replay"><button type="submit" aria-label="Replay {id} now">Replay now</button>{csrf}</form>"#
    );
    if r.state == "ready" {
        let _ = write!(
            out,
            r#"<form method="post" action="/spool/{id}/dead"><button type="submit" data-confirm="Move record {id} to dead? It will not be redelivered." aria-label="Move {id} to dead">Move to dead</button>{csrf}</form>"#
        );
    }
    let _ = write!(
        out,
        r#"<form method="post" action="/spool/{id}/purge"><button type="submit" class="danger" data-confirm="Delete record {id}? This cannot be undone." aria-label="Purge {id}">Purge</button>{csrf}</form>"#
    );
}

/// `GET /spool` (and the answer to a button): depth per route, then the records.
pub fn spool_page(view: &SpoolView, notice: Option<&Notice>, ctx: &PageCtx) -> String {
    let mut main = String::new();
    if !view.enabled {
        main.push_str("<p>No route spools: set <code>spool = true</code> on a route to keep what its receiver cannot take.</p>");
        return layout("Spool", "/spool", ctx, notice, &main);
    }
    let _ = write!(
        main,
        r#"<p class="lead">Spool directory <code>{}</code>. Bodies and headers are shown only when you open a record.</p>"#,
        escape(view.dir.as_deref().unwrap_or(""))
    );
    main.push_str(r#"<h2 id="by-route">By route</h2>"#);
    if view.routes.is_empty() {
        main.push_str("<p>The spool is empty.</p>");
    } else {
        main.push_str(r#"<table aria-labelledby="by-route"><thead><tr><th scope="col">Route</th><th scope="col">Ready</th><th scope="col">Dead</th><th scope="col">Oldest ready</th><th scope="col">Next attempt</th></tr></thead><tbody>"#);
        for route in &view.routes {
            let next = match (&route.next_attempt_at, route.ready) {
                (_, 0) => "—".to_string(),
                (None, _) => "due now".to_string(),
                (Some(at), _) => format!("<time>{}</time>", escape(at)),
            };
            let _ = write!(
                main,
                r#"<tr><th scope="row">{}</th><td class="num">{}</td><td class="num">{}</td><td>{}</td><td>{next}</td></tr>"#,
                escape(&route.route),
                route.ready,
                route.dead,
                route.oldest_age_secs.map_or_else(|| "—".to_string(), age),
            );
        }
        main.push_str("</tbody></table>");
    }
    main.push_str(r#"<h2 id="records">Records</h2>"#);
    if view.records.is_empty() {
        main.push_str("<p>No records.</p>");
    } else {
        main.push_str(r#"<div class="table-wrap"><table aria-labelledby="records" class="records"><thead><tr><th scope="col">Record</th><th scope="col">State</th><th scope="col">Route</th><th scope="col">Age</th><th scope="col">Size</th><th scope="col">Attempts</th><th scope="col">Last answer</th><th scope="col">Next attempt</th><th scope="col">Actions</th></tr></thead><tbody>"#);
        for r in &view.records {
            let state = if r.claimed {
                format!("{} (delivering)", r.state)
            } else {
                r.state.to_string()
            };
            let answer = match (&r.status, &r.last_error) {
                (Some(s), Some(e)) => format!("{s}: {}", escape(e)),
                (None, Some(e)) => escape(e),
                (Some(s), None) => s.to_string(),
                (None, None) => "—".to_string(),
            };
            let next = match (&r.next_attempt_at, r.state) {
                (_, "dead") => "—".to_string(),
                (None, _) => "due now".to_string(),
                (Some(at), _) => format!("<time>{}</time>", escape(at)),
            };
            let _ = write!(
                main,
                r#"<tr><th scope="row"><a href="/spool/{id}" class="record-link">{id}</a></th><td>{state}</td><td>{route}</td><td>{age}</td><td class="num">{size}</td><td class="num">{attempts}</td><td class="answer">{answer}</td><td>{next}</td><td class="actions">"#,
                id = escape(&r.id),
                route = escape(&r.route),
                age = age(r.age_secs),
                size = bytes(Some(r.body_bytes)),
                attempts = r.attempts,
            );
            record_buttons(&mut main, r, ctx);
            main.push_str("</td></tr>");
        }
        main.push_str("</tbody></table></div>");
        if view.not_shown > 0 {
            let _ = write!(
                main,
                "<p>{} more records not listed (see <code>payload-guard spool list</code>).</p>",
                view.not_shown
            );
        }
    }
    layout("Spool", "/spool", ctx, notice, &main)
}

/// `GET /spool/<id>`: one record opened, with its headers (credentials redacted) and body.
pub fn record_page(detail: &RecordDetail, ctx: &PageCtx) -> String {
    let r = &detail.record;
    let mut main = String::new();
    main.push_str(r#"<p><a href="/spool">← Back to the spool</a></p><dl class="fields">"#);
    let rows = [
        ("state", escape(r.state)),
        ("route", escape(&r.route)),
        ("received_at", escape(&r.received_at)),
        (
            "request_id",
            format!("<code>{}</code>", escape(&detail.request_id)),
        ),
        (
            "call_id",
            detail.call_id.as_deref().map_or_else(
                || "—".to_string(),
                |c| format!("<code>{}</code>", escape(c)),
            ),
        ),
        (
            "request",
            format!(
                "{} <code>{}</code>",
                escape(&detail.method),
                escape(&detail.path_and_query)
            ),
        ),
        ("size", bytes(Some(r.body_bytes))),
        ("attempts", r.attempts.to_string()),
        (
            "last answer",
            escape(r.last_error.as_deref().unwrap_or("—")),
        ),
    ];
    for (name, value) in rows {
        let _ = write!(main, "<dt>{name}</dt><dd>{value}</dd>");
    }
    if let Some(snippet) = &detail.snippet {
        let _ = write!(
            main,
            r#"<dt>receiver said</dt><dd><pre class="snippet">{}</pre></dd>"#,
            escape(snippet)
        );
    }
    main.push_str(r#"</dl><div class="actions">"#);
    record_buttons(&mut main, r, ctx);
    main.push_str(r#"</div><h2>Headers</h2><table class="headers"><thead><tr><th scope="col">Name</th><th scope="col">Value</th></tr></thead><tbody>"#);
    for (name, value) in &detail.headers {
        let _ = write!(
            main,
            "<tr><th scope=\"row\"><code>{}</code></th><td><code>{}</code></td></tr>",
            escape(name),
            escape(value)
        );
    }
    let _ = write!(
        main,
        r#"</tbody></table><h2>Body</h2><p>{cut}<a href="/api/spool/{id}/body">Exact bytes</a></p><pre class="body">{body}</pre>"#,
        cut = if detail.body_cut {
            "The first 64 KiB, as text. "
        } else {
            ""
        },
        id = escape(&r.id),
        body = escape(&detail.body_preview),
    );
    layout(&format!("Record {}", r.id), "/spool", ctx, None, &main)
}

/// `GET /learned`: each route's bracket, the refusals behind it and a reset button.
pub fn learned_page(view: &LearnedView, notice: Option<&Notice>, ctx: &PageCtx) -> String {
    let mut main = String::new();
    main.push_str(r#"<p class="lead">When a receiver refuses a payload with 413, the proxy learns its real limit and enforces it when it is tighter than the configured <code>upstream_limit</code>. Reset forgets what was learned about a route: the proxy learns again from the receiver's next answers (a restart rebuilds it from the incident log).</p>"#);
    for route in &view.routes {
        let l = &route.learned;
        let _ = write!(
            main,
            r#"<section class="learned" aria-labelledby="l-{slug}"><h2 id="l-{slug}">{name}</h2><dl class="limits"><dt>configured upstream_limit</dt><dd>{conf}</dd><dt>largest accepted</dt><dd>{acc}</dd><dt>smallest refused</dt><dd>{rej}</dd><dt>enforced</dt><dd>{eff}</dd></dl>"#,
            slug = escape(&query_value(&route.route)),
            name = escape(&route.route),
            conf = bytes(route.configured_limit),
            acc = bytes(l.largest_accepted),
            rej = bytes(l.smallest_rejected),
            eff = bytes(route.effective_limit),
        );
        if route.evidence.is_empty() {
            main.push_str("<p>No refusal by the receiver in the incident log.</p>");
        } else {
            main.push_str(r#"<table><caption>Latest refusals (upstream_413)</caption><thead><tr><th scope="col">When</th><th scope="col">Size</th><th scope="col">Status</th><th scope="col">Rejector</th><th scope="col">Request</th></tr></thead><tbody>"#);
            for e in &route.evidence {
                let _ = write!(
                    main,
                    "<tr><td><time>{}</time></td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                    escape(&e.ts),
                    bytes(e.body_bytes),
                    e.upstream_status
                        .map_or_else(|| "—".into(), |s| s.to_string()),
                    escape(e.rejector.as_deref().unwrap_or("—")),
                    escape(&e.request_id),
                );
            }
            main.push_str("</tbody></table>");
        }
        if !l.is_empty() {
            let _ = write!(
                main,
                r#"<form method="post" action="/learned/reset"><input type="hidden" name="route" value="{name}">{csrf}<button type="submit" data-confirm="Forget the learned limit of route {name}?">Reset learned limit of {name}</button></form>"#,
                name = escape(&route.route),
                csrf = csrf_input(ctx),
            );
        }
        main.push_str("</section>");
    }
    layout("Learned limits", "/learned", ctx, notice, &main)
}

/// The page answered with 401: a form to enter the admin token once.
pub fn login_page(message: Option<&str>) -> String {
    let mut out = String::from(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in · payload-guard</title><link rel="icon" href="/assets/favicon.svg" type="image/svg+xml"><link rel="stylesheet" href="/assets/console.css"></head><body><main id="main" class="login"><h1>payload-guard console</h1>"#,
    );
    if let Some(message) = message {
        let _ = write!(
            out,
            r#"<p class="notice error" role="alert">{}</p>"#,
            escape(message)
        );
    }
    out.push_str(r#"<form method="post" action="/login"><p><label for="token">Admin token</label><input id="token" name="token" type="password" autocomplete="current-password" required autofocus></p><p class="hint">The value of the environment variable named by <code>[server] admin_token_env</code>. It is kept in a cookie for this browser session only.</p><p><button type="submit">Sign in</button></p></form></main></body></html>"#);
    out
}

/// A plain page for an error (bad id, nothing found).
pub fn error_page(title: &str, message: &str, ctx: &PageCtx) -> String {
    layout(
        title,
        "",
        ctx,
        None,
        &format!(
            "<p>{}</p><p><a href=\"/\">Back to the routes</a></p>",
            escape(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn login_page_has_a_labelled_password_field() {
        let page = login_page(Some("wrong <token>"));
        assert!(page.contains(r#"<label for="token">"#));
        assert!(page.contains(r#"type="password""#));
        assert!(page.contains("wrong &lt;token&gt;"));
    }
}
