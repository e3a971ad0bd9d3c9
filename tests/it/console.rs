//! The console on the admin listener, against a running proxy with incidents and spooled
//! records: authentication, CSRF, what is never shown, the JSON API, and (in headless Chromium,
//! `.ci/run` installs Debian's `chromium`) the pages themselves, with screenshots under
//! `target/console-screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;

use crate::support::*;

const TOKEN: &str = "console-test-token";
const MARKER: &str = "PAYLOAD-MARKER-7f3a";
const SIGNATURE: &str = "sig-value-never-shown";

struct Setup {
    proxy: ProxyHandle,
    admin: SocketAddr,
    calls: Receiver,
    billing: Receiver,
    /// Spooled record ids, oldest first.
    spooled: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A proxy with two routes: `calls` (its receiver refuses bodies over 150 KB: upstream 413s and
/// a learned limit) and `billing` (spooled: its receiver fails the first three requests).
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let calls = Receiver::start(Behavior::LimitEarly(150_000)).await;
    let billing = Receiver::start(Behavior::FailFirst(3, 503)).await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_token_env = "PG_CONSOLE_TOKEN"
[spool]
dir = "{spool}"
min_free = 0
[[routes]]
name = "calls"
path_prefix = "/hooks/calls"
upstream = "http://{{upstream}}/webhook"
upstream_limit = "200KB"
max_body = "1MiB"
[[routes]]
name = "billing"
path_prefix = "/hooks/billing"
upstream = "http://{billing}/webhook"
upstream_limit = "64KiB"
spool = true
"#,
        spool = dir.path().join("spool").display(),
        billing = billing.addr,
    );
    let config = config_with_env(&text, calls.addr, &[("PG_CONSOLE_TOKEN", TOKEN)]);
    let proxy = start_proxy(config).await;
    let admin = start_admin(&proxy, &dir.path().join("proxy.toml")).await;
    let post = |path: &str, body: Vec<u8>| {
        Request::post(proxy.url(path))
            .header("content-type", "application/json")
            .header("x-signature", SIGNATURE)
            .body(full(body))
            .unwrap()
    };
    for size in [
        1_500, 3_000, 4_000, 6_000, 8_000, 9_000, 12_000, 14_000, 16_000, 20_000, 22_000, 24_000,
        30_000, 40_000, 45_000, 50_000, 64_000, 80_000, 100_000, 120_000, 140_000, 160_000,
        170_000,
    ] {
        send(proxy.addr, post("/hooks/calls", payload(size))).await;
    }
    let over = send(proxy.addr, post("/hooks/calls", payload(1_200_000))).await;
    assert_eq!(over.status, 413, "over max_body");
    let mut spooled = Vec::new();
    for i in 0..3 {
        let body = format!(
            r#"{{"invoice":{i},"note":"{MARKER}","pad":"{}"}}"#,
            "x".repeat(20_000)
        );
        let got = send(proxy.addr, post("/hooks/billing", body.into_bytes())).await;
        assert_eq!(got.status, 202, "{:?}", got.body);
        spooled.push(got.json()["spool_id"].as_str().unwrap().to_string());
    }
    proxy.incidents().await;
    Setup {
        proxy,
        admin,
        calls,
        billing,
        spooled,
        _dir: dir,
    }
}

/// One request to the admin listener with the given headers and form body.
async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if method == "POST" {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    send(addr, req.body(full(Bytes::from(body.to_string()))).unwrap()).await
}

fn text(got: &Got) -> String {
    String::from_utf8_lossy(&got.body).into_owned()
}

async fn ready_ids(setup: &Setup) -> Vec<String> {
    let spool = &setup.proxy.proxy.shared().spool.as_ref().unwrap().spool;
    spool
        .list(payload_guard::spool::State::Ready, None)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.as_str().to_string())
        .collect()
}

#[tokio::test]
async fn console_needs_the_token_refuses_cross_site_posts_and_hides_bodies() {
    let s = setup().await;
    let id = s.spooled[0].clone();
    let bearer = format!("Bearer {TOKEN}");
    let gets = [
        "/".to_string(),
        "/incidents".into(),
        "/spool".into(),
        format!("/spool/{id}"),
        "/learned".into(),
        "/api/routes".into(),
        "/api/incidents".into(),
        "/api/spool".into(),
        format!("/api/spool/{id}"),
        format!("/api/spool/{id}/body"),
        "/api/learned".into(),
        "/api/csrf".into(),
    ];
    let posts = [
        format!("/spool/{id}/replay"),
        format!("/spool/{id}/purge"),
        format!("/api/spool/{id}/dead"),
        "/learned/reset".into(),
        "/api/learned/reset?route=calls".into(),
        "/logout".into(),
    ];
    // Without the token (or with a wrong one, as bearer or cookie): 401 everywhere.
    for creds in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("cookie", "pg_admin=wrong")],
    ] {
        for path in &gets {
            let got = admin(s.admin, "GET", path, &creds, "").await;
            assert_eq!(got.status, 401, "GET {path} with {creds:?}");
            assert!(!text(&got).contains(MARKER));
        }
        for path in &posts {
            let got = admin(s.admin, "POST", path, &creds, "route=calls").await;
            assert_eq!(got.status, 401, "POST {path} with {creds:?}");
        }
    }
    let page = admin(s.admin, "GET", "/spool", &[], "").await;
    assert!(text(&page).contains(r#"<form method="post" action="/login">"#));
    assert_eq!(ready_ids(&s).await.len(), 3, "nothing was acted on");

    // Signing in sets the session cookie.
    let wrong = admin(s.admin, "POST", "/login", &[], "token=nope").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.headers.get("set-cookie").is_none());
    let login = admin(s.admin, "POST", "/login", &[], &format!("token={TOKEN}")).await;
    assert_eq!(login.status, 303);
    let set_cookie = login.headers["set-cookie"].to_str().unwrap();
    assert!(set_cookie.starts_with("pg_admin="), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = [("cookie", cookie.as_str())];
    // The cookie is for the console; the other admin endpoints keep to the bearer token.
    for (method, path) in [("GET", "/metrics"), ("POST", "/reload")] {
        let got = admin(s.admin, method, path, &with_cookie, "").await;
        assert_eq!(got.status, 401, "{method} {path}");
    }

    // The pages: no payload body, no signature, no token in any listing.
    for path in [
        "/",
        "/incidents",
        "/spool",
        "/learned",
        "/api/routes",
        "/api/incidents",
        "/api/spool",
        "/api/learned",
    ] {
        let got = admin(s.admin, "GET", path, &with_cookie, "").await;
        assert_eq!(got.status, 200, "GET {path}: {}", text(&got));
        let body = text(&got);
        for secret in [MARKER, SIGNATURE, TOKEN] {
            assert!(!body.contains(secret), "{path} shows {secret}");
        }
    }
    let page = text(&admin(s.admin, "GET", "/", &with_cookie, "").await);
    assert_eq!(page.matches(r#"<svg class="histogram""#).count(), 2);
    assert!(page.contains(">upstream_limit 195.3 KiB</text>"), "{page}");
    assert!(page.contains(">max_body 1 MiB</text>"));
    assert!(page.contains(">learned "), "the learned limit is drawn");
    // Opening a record shows its body, never the signature.
    let opened = text(&admin(s.admin, "GET", &format!("/spool/{id}"), &with_cookie, "").await);
    assert!(opened.contains(MARKER));
    assert!(!opened.contains(SIGNATURE));
    assert!(opened.contains("[redacted]"));
    let raw = admin(
        s.admin,
        "GET",
        &format!("/api/spool/{id}/body"),
        &with_cookie,
        "",
    )
    .await;
    assert!(text(&raw).starts_with(r#"{"invoice":0"#));

    // A cross-site POST carries the cookie (were it not SameSite) but not the CSRF token.
    let cross_site = [
        ("cookie", cookie.as_str()),
        ("origin", "http://evil.example"),
    ];
    for path in [
        format!("/spool/{id}/purge"),
        format!("/api/spool/{id}/purge"),
        "/learned/reset".into(),
    ] {
        let got = admin(s.admin, "POST", &path, &cross_site, "route=calls").await;
        assert_eq!(got.status, 403, "POST {path}: {}", text(&got));
        assert_eq!(got.json()["error"], "csrf");
        let forged = admin(
            s.admin,
            "POST",
            &path,
            &cross_site,
            "route=calls&csrf=guess",
        )
        .await;
        assert_eq!(forged.status, 403);
    }
    assert_eq!(ready_ids(&s).await.len(), 3, "nothing was purged");
    assert!(
        !s.proxy
            .proxy
            .shared()
            .learned
            .route("calls")
            .unwrap_or_default()
            .wire
            .is_empty()
    );

    // With the page's CSRF token the same POST works.
    let csrf = admin(
        s.admin,
        "GET",
        "/api/csrf",
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let dead = admin(
        s.admin,
        "POST",
        &format!("/api/spool/{id}/dead"),
        &[("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str())],
        "",
    )
    .await;
    assert_eq!(dead.status, 200, "{}", text(&dead));
    assert_eq!(ready_ids(&s).await.len(), 2);
    let again = admin(
        s.admin,
        "POST",
        &format!("/api/spool/{id}/dead"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(again.status, 409, "already dead: {}", text(&again));
    let spool = admin(
        s.admin,
        "GET",
        "/api/spool",
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json();
    let dead_record = spool["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(dead_record["state"], "dead");
    assert!(
        dead_record["last_error"]
            .as_str()
            .unwrap()
            .contains("by token PG_CONSOLE_TOKEN")
    );
    // A script with the bearer token needs no CSRF token.
    let purge = admin(
        s.admin,
        "POST",
        &format!("/api/spool/{id}/purge"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(purge.status, 200, "{}", text(&purge));
    let gone = admin(
        s.admin,
        "GET",
        &format!("/api/spool/{id}"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(gone.status, 404);

    // The JSON API.
    let routes = admin(
        s.admin,
        "GET",
        "/api/routes",
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json();
    let calls = &routes["routes"][0];
    assert_eq!(calls["name"], "calls");
    assert_eq!(calls["upstream_limit"], 200_000);
    assert_eq!(calls["max_body"], 1024 * 1024);
    // Bodies refused on their Content-Length (the 1.2 MB one) have no size in the ring.
    let samples = calls["sizes"]["samples"].as_u64().unwrap();
    assert!((20..=23).contains(&samples), "{samples}");
    let binned: u64 = calls["sizes"]["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(binned, samples);
    assert_eq!(calls["learned"]["smallest_rejected"], 160_000);
    assert_eq!(calls["learned"]["largest_accepted"], 140_000);
    assert_eq!(calls["effective_limit"], 140_000);
    assert_eq!(calls["counts"]["incidents"]["over_max_body"], 1);
    let refusals = calls["counts"]["incidents"]["upstream_413"]
        .as_u64()
        .unwrap();
    assert!(refusals >= 1);
    let incidents = admin(
        s.admin,
        "GET",
        "/api/incidents?kind=upstream_413",
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json();
    let listed = incidents["incidents"].as_array().unwrap();
    assert_eq!(listed.len() as u64, refusals);
    assert!(listed.iter().all(|i| i["kind"] == "upstream_413"));
    assert!(incidents["advice"]["calls"].is_object());
    let bad = admin(
        s.admin,
        "GET",
        "/api/incidents?kind=huge",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("over_max_body")
    );
    let reset = admin(
        s.admin,
        "POST",
        "/api/learned/reset?route=calls",
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(reset.status, 200, "{}", text(&reset));
    assert_eq!(reset.json()["before"]["smallest_rejected"], 160_000);
    assert!(
        s.proxy
            .proxy
            .shared()
            .learned
            .route("calls")
            .unwrap_or_default()
            .wire
            .is_empty()
    );
    drop((s.calls, s.billing));
}

/// Where Chromium is, or why the browser test cannot run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let chromium = PathBuf::from("/usr/bin/chromium");
    if !chromium.exists() {
        return Err("chromium not installed; apt-get install -y chromium".into());
    }
    for tool in ["node", "npm"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!(
                "{tool} not installed; apt-get install -y nodejs npm"
            ));
        }
    }
    // playwright-core (no bundled browser) in a folder the test owns.
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-browser");
    if !folder
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&folder)
            .arg("playwright-core@1.65.1")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "playwright-core could not be installed with npm: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok((chromium, folder))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium_draws_limits_and_replays_by_click() {
    let (chromium, folder) = match browser() {
        Ok(found) => found,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("the console browser test needs {why}")
        }
        Err(why) => {
            crate::support::print_skip(&format!("skipped: {why}"));
            return;
        }
    };
    let mut s = setup().await;
    for _ in 0..3 {
        s.billing.next().await; // the three live attempts, answered 503
    }
    let script = folder.join("console_browser.mjs");
    std::fs::write(&script, include_str!("console_browser.mjs")).unwrap();
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let replayed = s.spooled[1].clone();
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("CONSOLE_URL", format!("http://{}", s.admin))
        .env("CONSOLE_TOKEN", TOKEN)
        .env("RECORD_ID", &replayed)
        .env("PAYLOAD_MARKER", MARKER)
        .env("SCREENSHOT_DIR", &shots)
        .env("USER_DATA_DIR", profile.path())
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser script finished within 3 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(seen["unauthenticated_status"], 401);
    assert_eq!(
        seen["unauthorized"],
        serde_json::json!(["/"]),
        "only the page: its CSS and icon load"
    );
    assert_eq!(seen["routes_title"], "Routes · payload-guard");
    assert_eq!(seen["histograms"], 2, "{seen}");
    assert!(seen["bars"].as_u64().unwrap() >= 8, "{seen}");
    let labels: Vec<&str> = seen["limit_labels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(labels.contains(&"upstream_limit 195.3 KiB"), "{labels:?}");
    assert!(labels.contains(&"max_body 1 MiB"), "{labels:?}");
    assert!(
        labels.iter().any(|l| l.starts_with("learned ")),
        "{labels:?}"
    );
    assert_eq!(seen["limit_lines"], labels.len());
    assert_eq!(
        seen["histogram_title"],
        "Recent request sizes of route calls"
    );
    assert_eq!(seen["first_tab"], "Skip to content");
    assert!(
        seen["incident_kinds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k == "upstream_413")
    );
    assert_eq!(seen["incident_open"], true);
    assert_eq!(seen["advice"], "Diagnosis for route calls");
    assert_eq!(
        seen["marker_in_list"], false,
        "no payload body in the spool list"
    );
    assert_eq!(seen["records_before"], 3);
    let notice = seen["notice"].as_str().unwrap();
    assert!(
        notice.contains(&format!("replayed record {replayed}: delivered")),
        "{notice}"
    );
    assert_eq!(seen["records_after"], 2);
    assert_eq!(seen["marker_in_record"], true);
    assert!(
        seen["learned_text"]
            .as_str()
            .unwrap()
            .contains("smallest refused")
    );
    // calls learned from its 413s; billing learned the size its receiver accepted on replay.
    assert_eq!(seen["reset_buttons"], 2);
    assert_eq!(
        seen["errors"],
        serde_json::json!([]),
        "no script or CSP errors"
    );
    // The receiver got the replayed payload, and it left the spool.
    let delivered = s.billing.next().await;
    assert!(String::from_utf8_lossy(&delivered.body.unwrap()).starts_with(r#"{"invoice":1"#));
    assert!(!ready_ids(&s).await.contains(&replayed));
    for shot in [
        "routes.png",
        "incidents.png",
        "spool.png",
        "spool-replayed.png",
        "record.png",
        "learned.png",
    ] {
        assert!(shots.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
    drop(s.calls);
}

#[tokio::test]
async fn without_a_token_the_console_is_for_loopback_addresses_and_still_needs_the_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let down = free_addr();
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[spool]
dir = "{spool}"
min_free = 0
[[routes]]
name = "test"
path_prefix = "/hooks/test"
upstream = "http://{{upstream}}/webhook"
spool = true
"#,
        spool = dir.path().join("spool").display(),
    );
    let proxy = start_proxy(config(&toml, down)).await;
    let addr = start_admin(&proxy, &dir.path().join("proxy.toml")).await;
    let got = proxy.post_json(payload(2_000)).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    let id = got.json()["spool_id"].as_str().unwrap().to_string();

    // A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) is refused.
    let rebound = admin(
        addr,
        "GET",
        "/api/spool",
        &[("host", "attacker.example:9090")],
        "",
    )
    .await;
    assert_eq!(rebound.status, 421);
    for host in [addr.to_string(), format!("localhost:{}", addr.port())] {
        let got = admin(addr, "GET", "/", &[("host", host.as_str())], "").await;
        assert_eq!(got.status, 200, "Host {host}");
        assert!(
            !text(&got).contains("action=\"/logout\""),
            "no log-out without a token"
        );
    }
    // A cross-site form POST (no CSRF token) is refused even without a token to steal.
    let forged = admin(
        addr,
        "POST",
        &format!("/spool/{id}/purge"),
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(forged.status, 403);
    let csrf = admin(addr, "GET", "/api/csrf", &[], "").await.json()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let form = format!("csrf={csrf}");
    let dead = admin(addr, "POST", &format!("/spool/{id}/dead"), &[], &form).await;
    assert_eq!(dead.status, 200);
    assert!(text(&dead).contains(&format!("moved record {id} to dead")));
    let record = admin(addr, "GET", &format!("/api/spool/{id}"), &[], "")
        .await
        .json();
    assert_eq!(record["state"], "dead");
    assert_eq!(
        record["last_error"],
        "moved to dead from the console by peer 127.0.0.1"
    );
    // Replaying a dead record revives it; the receiver is still down, so it waits again.
    let replay = admin(
        addr,
        "POST",
        &format!("/api/spool/{id}/replay"),
        &[("x-csrf-token", csrf.as_str())],
        "",
    )
    .await;
    assert_eq!(replay.status, 200, "{}", text(&replay));
    assert!(
        replay.json()["outcome"]
            .as_str()
            .unwrap()
            .contains("not delivered")
    );
    let record = admin(addr, "GET", &format!("/api/spool/{id}"), &[], "")
        .await
        .json();
    assert_eq!(record["state"], "ready");
    let purge = admin(addr, "POST", &format!("/spool/{id}/purge"), &[], &form).await;
    assert!(text(&purge).contains(&format!("purged ready record {id}")));
    let missing = admin(
        addr,
        "POST",
        &format!("/api/spool/{id}/purge"),
        &[("x-csrf-token", csrf.as_str())],
        "",
    )
    .await;
    assert_eq!(missing.status, 404);
    let bad = admin(addr, "GET", "/api/spool/not-an-id", &[], "").await;
    assert_eq!(bad.status, 400);
}
