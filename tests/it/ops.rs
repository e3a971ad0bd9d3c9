//! Operating it: metrics after real traffic, hot reload with in-flight requests, the TLS
//! listener, sender signatures, the admin token.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use payload_guard::config::Config;

use crate::support::*;

/// `name{labels} value` lines of a Prometheus text exposition, as (series, value).
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(metrics: &[(String, f64)], series: &str) -> f64 {
    metrics
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no series {series} in {metrics:#?}"))
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let text = one_route(
        "upstream_limit = 1000\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\n",
        "",
    );
    let proxy = start_proxy(config(&text, receiver.addr)).await;
    let admin = start_admin(&proxy, std::path::Path::new("unused.toml")).await;
    for _ in 0..3 {
        let got = proxy.post_json("{}").await;
        assert_eq!(got.status, 200);
        receiver.next().await;
    }
    let got = proxy.post_json(payload(5000)).await;
    assert_eq!(got.status, 200);
    let trimmed = receiver.next().await.body.unwrap();
    assert!(trimmed.len() <= 1000);
    assert_eq!(
        send(
            proxy.addr,
            Request::post(proxy.url("/nowhere"))
                .body(full("{}"))
                .unwrap()
        )
        .await
        .status,
        404
    );

    let got = admin_request(admin, "GET", "/metrics", None).await;
    assert_eq!(got.status, 200);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    let m = parse_metrics(&text);
    assert_eq!(
        metric(
            &m,
            r#"payload_guard_requests_total{route="test",status_class="2xx"}"#
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &m,
            r#"payload_guard_requests_total{route="-",status_class="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&m, r#"payload_guard_trims_total{route="test"}"#),
        1.0
    );
    assert!(metric(&m, r#"payload_guard_trimmed_bytes_total{route="test"}"#) >= 4000.0);
    assert_eq!(
        metric(
            &m,
            r#"payload_guard_incidents_total{route="test",kind="over_upstream_limit"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"payload_guard_request_body_bytes_count{route="test"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(&m, r#"payload_guard_request_body_bytes_sum{route="test"}"#),
        (3 * 2 + 5000) as f64
    );
    assert_eq!(
        metric(
            &m,
            r#"payload_guard_upstream_duration_seconds_count{route="test"}"#
        ),
        4.0
    );
    assert_eq!(metric(&m, "payload_guard_buffer_in_use_bytes"), 0.0);
    assert_eq!(metric(&m, "payload_guard_incidents_dropped_total"), 0.0);
    assert!(
        !text.contains("/hooks/test"),
        "label values come from config only"
    );
    assert_eq!(
        admin_request(admin, "GET", "/healthz", None).await.status,
        200
    );
    assert_eq!(
        admin_request(admin, "GET", "/readyz", None).await.status,
        200
    );
}

#[tokio::test]
async fn reload_swaps_config_for_new_requests_only_and_refuses_bad_files() {
    let mut a = Receiver::start(Behavior::Ok).await;
    let mut b = Receiver::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let write = |upstream: std::net::SocketAddr| {
        std::fs::write(
            &path,
            one_route("", "").replace("{upstream}", &upstream.to_string()),
        )
        .unwrap();
    };
    write(a.addr);
    let proxy = start_proxy(Config::load(&path).unwrap()).await;
    let admin = start_admin(&proxy, &path).await;

    // A request in flight on the old config...
    let (tx, body) = channel_body();
    let addr = proxy.addr;
    let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
    let in_flight = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(Frame::data(Bytes::from_static(b"{\"old\":"))))
        .await
        .unwrap();
    while a.started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // ...while the file now points at receiver B.
    write(b.addr);
    let got = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    tx.send(Ok(Frame::data(Bytes::from_static(b"true}"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(in_flight.await.unwrap().status, 200);
    assert_eq!(a.next().await.body.unwrap(), "{\"old\":true}");
    assert_eq!(proxy.post("{}").await.status, 200);
    assert_eq!(b.next().await.body.unwrap(), "{}");

    // An invalid file is refused with check's message; B stays in force.
    std::fs::write(
        &path,
        "[[routes]]\nname = \"x\"\npath_prefix = \"/hooks/test\"\nupstream = \"ftp://nope\"\n",
    )
    .unwrap();
    let got = admin_request(admin, "POST", "/reload", None).await;
    assert_eq!(got.status, 422);
    let message = got.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("proxy.toml:4:12: routes[0].upstream: unsupported scheme"),
        "{message}"
    );
    assert_eq!(proxy.post("{}").await.status, 200);
    assert_eq!(b.next().await.body.unwrap(), "{}");
    let m = parse_metrics(&String::from_utf8_lossy(
        &admin_request(admin, "GET", "/metrics", None).await.body,
    ));
    assert_eq!(
        metric(&m, r#"payload_guard_config_reloads_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"payload_guard_config_reloads_total{result="failed"}"#),
        1.0
    );
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2_by_alpn() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();

    let mut receiver = Receiver::start(Behavior::Ok).await;
    let text = one_route("", "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\n[server.tls]\ncert = \"{}/cert.pem\"\nkey = \"{}/key.pem\"",
            dir.path().display(),
            dir.path().display()
        ),
    );
    let proxy = start_proxy(config(&text, receiver.addr)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    for (alpn, version) in [
        (b"http/1.1".to_vec(), http::Version::HTTP_11),
        (b"h2".to_vec(), http::Version::HTTP_2),
    ] {
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        client.alpn_protocols = vec![alpn];
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .expect("TLS handshake with the proxy");
        let req = Request::post(format!(
            "https://localhost:{}/hooks/test",
            proxy.addr.port()
        ))
        .version(version)
        .body(full("{\"tls\":true}"))
        .unwrap();
        let resp = if version == http::Version::HTTP_2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        let _ = resp.into_body().collect().await;
        let seen = receiver.next().await;
        assert_eq!(seen.body.unwrap(), "{\"tls\":true}");
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
    }

    // Bad certificate files are a clear error at load.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let err = Config::from_str(
        &text.replace("{upstream}", "127.0.0.1:1"),
        std::path::Path::new("t.toml"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("server.tls.key"), "{err}");
}

// Known vector, computed independently with OpenSSL (see src/verify.rs):
//   printf '%s' "$CID" | openssl dgst -sha256 -hmac "$K" -binary | base64
const KEY: &str = "whsec_7d1c0e5f2b9a";
const BODY: &str = r#"{"status":"completed","call":{"call_id":"c6f1e2a0-5b7d-4e1a-9f3c-2d8e4b6a1f09","transcript":"bot: hi\nhuman: hello"}}"#;
const SIGNATURE: &str = "e18aq8yMFD0vgtBJMEojDvxmQviKWm9It+9147VAicY=";

#[tokio::test]
async fn synthflow_signatures_are_checked() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let text = one_route(
        "[routes.verify]\nscheme = \"synthflow\"\nsecret_env = \"SYNTHFLOW_WEBHOOK_SECRET\"\n",
        "",
    );
    let proxy = start_proxy(config_with_env(
        &text,
        receiver.addr,
        &[("SYNTHFLOW_WEBHOOK_SECRET", KEY)],
    ))
    .await;
    let post = |header: Option<(&str, &str)>| {
        let mut req =
            Request::post(proxy.url("/hooks/test")).header("content-type", "application/json");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        req.body(full(BODY)).unwrap()
    };
    // Accepted, with either spelling of the header; the header is forwarded unchanged.
    for name in ["Synthflow-Signature", "HTTP_SYNTHFLOW_SIGNATURE"] {
        let got = send(proxy.addr, post(Some((name, SIGNATURE)))).await;
        assert_eq!(got.status, 200, "{name}: {:?}", got.body);
        let seen = receiver.next().await;
        assert_eq!(seen.body.unwrap(), BODY);
        assert_eq!(seen.headers[name.to_ascii_lowercase().as_str()], SIGNATURE);
    }
    // Wrong or missing: 401, nothing forwarded, no incident.
    let tampered = SIGNATURE.replace('e', "f");
    let got = send(proxy.addr, post(Some(("Synthflow-Signature", &tampered)))).await;
    assert_eq!(got.status, 401);
    assert_eq!(got.json()["error"], "signature_refused");
    let got = send(proxy.addr, post(None)).await;
    assert_eq!(got.status, 401);
    assert!(receiver.try_next().is_none());
    assert!(proxy.incidents().await.is_empty());
}

#[tokio::test]
async fn body_signatures_are_checked_and_trimmed_bodies_re_signed() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let text = one_route(
        "upstream_limit = 2000\n[routes.verify]\nscheme = \"hmac-sha256-body\"\nheader = \"X-Signature\"\nencoding = \"hex\"\nsecret_env = \"SENDER_SECRET\"\nresign = { header = \"X-Guard-Signature\", secret_env = \"GUARD_SECRET\" }\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\n",
        "",
    );
    let env = [
        ("SENDER_SECRET", "sender-key"),
        ("GUARD_SECRET", "guard-key"),
    ];
    let proxy = start_proxy(config_with_env(&text, receiver.addr, &env)).await;
    let body = payload(10_000);
    let sign = |key: &str, data: &[u8]| {
        payload_guard::verify::sign(
            payload_guard::verify::Scheme::HmacSha256Body {
                encoding: payload_guard::verify::Encoding::Hex,
            },
            &payload_guard::verify::Secret::new(key.as_bytes().to_vec()),
            data,
        )
    };
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .header("x-signature", sign("sender-key", &body))
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = receiver.next().await;
    let trimmed = seen.body.unwrap();
    assert!(trimmed.len() <= 2000);
    assert_eq!(
        seen.headers["x-guard-signature"],
        sign("guard-key", &trimmed).as_str()
    );
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .header("x-signature", sign("wrong-key", &body))
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 401);
}

#[tokio::test]
async fn admin_token_is_required_when_configured() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let token = "0123456789abcdef-token";
    let text = one_route(
        "",
        "admin_listen = \"127.0.0.1:0\"\nadmin_token_env = \"PG_ADMIN_TOKEN\"",
    );
    let proxy = start_proxy(config_with_env(
        &text,
        receiver.addr,
        &[("PG_ADMIN_TOKEN", token)],
    ))
    .await;
    let admin = start_admin(&proxy, std::path::Path::new("unused.toml")).await;
    assert_eq!(
        admin_request(admin, "GET", "/metrics", None).await.status,
        401
    );
    assert_eq!(
        admin_request(admin, "GET", "/healthz", Some("wrong-token-wrong-token"))
            .await
            .status,
        401
    );
    assert_eq!(
        admin_request(admin, "GET", "/healthz", Some(token))
            .await
            .status,
        200
    );
    assert_eq!(
        admin_request(admin, "GET", "/metrics", Some(token))
            .await
            .status,
        200
    );
}

/// A verifying route collects the body before it checks the signature: while the buffer
/// budget is full, a request with a wrong signature gets 503 (try again later), not 401; once
/// the budget has room, the same request gets its 401.
#[tokio::test]
async fn while_the_budget_is_full_a_bad_signature_gets_503_before_its_401() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let text = one_route(
        "[routes.verify]\nscheme = \"hmac-sha256-body\"\nheader = \"X-Signature\"\nencoding = \"hex\"\nsecret_env = \"SENDER_SECRET\"\n",
        "buffer_budget = \"1MiB\"\n",
    );
    let proxy = start_proxy(config_with_env(
        &text,
        receiver.addr,
        &[("SENDER_SECRET", "k")],
    ))
    .await;
    let bad = || {
        Request::post(proxy.url("/hooks/test"))
            .header("content-type", "application/json")
            .header("x-signature", "00".repeat(32))
            .body(full(payload(10_000)))
            .unwrap()
    };

    // A sender declares 1,045,000 bytes (under 1 MiB: no body slot), sends most of them and
    // stalls: what is left of the budget is less than the next request's body.
    let (tx, body) = channel_body();
    let stalled = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .header("content-length", 1_045_000)
        .body(body)
        .unwrap();
    let addr = proxy.addr;
    let stalled = tokio::spawn(async move { send(addr, stalled).await });
    for _ in 0..15 {
        tx.send(Ok(Frame::data(Bytes::from(vec![b' '; 64 * 1024]))))
            .await
            .unwrap();
    }
    let budget = &proxy.proxy.shared().budget;
    until(
        || budget.in_use() + 20_000 > budget.limit(),
        "the stalled body fills the budget",
    )
    .await;

    let got = send(proxy.addr, bad()).await;
    assert_eq!(got.status, 503, "{:?}", got.body);
    assert_eq!(got.json()["error"], "buffer_budget_exhausted");

    // The stalled sender goes away; its reservation with it.
    drop(tx);
    stalled.abort();
    let _ = stalled.await;
    until(
        || budget.in_use() == 0,
        "the stalled body's reservation is released",
    )
    .await;
    let got = send(proxy.addr, bad()).await;
    assert_eq!(got.status, 401, "{:?}", got.body);
    assert_eq!(got.json()["error"], "signature_refused");
    assert_eq!(
        receiver.started.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// Waits until `done` holds, letting the proxy's tasks run; fails after 10 s.
async fn until(done: impl Fn() -> bool, what: &str) {
    let wait = async {
        while !done() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("not within 10 s: {what}"));
}
