//! Sender presets and their signature schemes end to end: a real proxy between a signing
//! sender and a receiver on loopback. Good signatures are forwarded byte-identical; wrong,
//! missing, stale and future ones get 401; one valid signature among rotated ones passes;
//! trimmed payloads on `resign = "same"` routes verify with the senders' official libraries
//! (`stripe`, `standardwebhooks`, `retell-sdk` from PyPI, in a venv under the target folder),
//! and with the documented algorithm for the others.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request};
use payload_guard::config::presets::{self, PRESETS, Preset};
use payload_guard::verify::{Scheme, Secret, Signed, Verifier};

use crate::support::*;

/// The secret every test sender shares with the proxy (Standard Webhooks: as `whsec_`).
const SECRET: &str = "it-sender-secret-7d1c0e5f";
/// Another secret: signatures made with it are wrong.
const OTHER_SECRET: &str = "it-someone-else-3b9a2c11";
/// The Twilio route's public URL: not the proxy's own address, as behind another proxy.
const TWILIO_PUBLIC_URL: &str = "https://guard.example.com/hooks/twilio";
/// How far a stale or future signature is from now (the tolerance is 5 minutes).
const SKEW: Duration = Duration::from_secs(10 * 60);

fn secret_for(preset: &Preset, secret: &str) -> String {
    if preset.scheme == "standard-webhooks" {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(secret)
        )
    } else {
        secret.to_owned()
    }
}

fn verifier(preset: &Preset, secret: &str) -> Verifier {
    let scheme = Scheme::from_config(preset.scheme, None).unwrap();
    Verifier::new(scheme, None, Secret::new(secret_for(preset, secret))).unwrap()
}

/// The headers `preset`'s sender sends with `body` at `at`, signed with `secret`.
fn sign(preset: &Preset, secret: &str, body: &[u8], at: SystemTime) -> HeaderMap {
    let call_id = preset
        .id_path
        .and_then(|p| payload_guard::trim::string_at(body, p));
    let url = (preset.scheme == "twilio").then(|| format!("{TWILIO_PUBLIC_URL}?source=it"));
    verifier(preset, secret)
        .sign_request(
            &Signed {
                headers: &HeaderMap::new(),
                body,
                call_id: call_id.as_deref(),
                url: url.as_deref(),
                now: at,
            },
            None,
        )
        .unwrap()
}

/// One route per sender, `/hooks/<sender>`, all to the same receiver. `route_keys` is added to
/// each route; `verify_keys` to each body-signing route's `[routes.verify]`.
fn senders_config(route_keys: &str, verify_keys: &str) -> String {
    let mut text = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    for p in PRESETS {
        text.push_str(&format!(
            "\n[[routes]]\nname = \"{0}\"\npath_prefix = \"/hooks/{0}\"\nupstream = \"http://{{upstream}}/webhook\"\nsender = \"{0}\"\n{route_keys}\n[routes.verify]\nsecret_env = \"SECRET_{1}\"\n",
            p.sender,
            p.sender.replace('-', "_").to_uppercase()
        ));
        match p.scheme {
            "twilio" => text.push_str(&format!("public_url = \"{TWILIO_PUBLIC_URL}\"\n")),
            "synthflow" => {}
            _ => text.push_str(verify_keys),
        }
    }
    text
}

fn senders_env() -> Vec<(String, String)> {
    PRESETS
        .iter()
        .map(|p| {
            (
                format!("SECRET_{}", p.sender.replace('-', "_").to_uppercase()),
                secret_for(p, SECRET),
            )
        })
        .collect()
}

/// The config with the senders' secrets, its incident log and state files in `state` (so no
/// learned limit crosses from another test).
fn load(
    text: &str,
    upstream: std::net::SocketAddr,
    state: &tempfile::TempDir,
) -> payload_guard::config::Config {
    let env = senders_env();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut config = config_with_env(text, upstream, &pairs);
    config.incidents.path = state.path().join("incidents.jsonl");
    config
}

async fn post(proxy: &ProxyHandle, preset: &Preset, body: &Bytes, headers: HeaderMap) -> Got {
    let path = if preset.scheme == "twilio" {
        format!("/hooks/{}?source=it", preset.sender)
    } else {
        format!("/hooks/{}", preset.sender)
    };
    let mut req = Request::post(proxy.url(&path))
        .header("content-type", preset.content_type)
        .body(full(body.clone()))
        .unwrap();
    req.headers_mut().extend(headers);
    send(proxy.addr, req).await
}

#[tokio::test]
async fn every_sender_good_is_forwarded_and_wrong_missing_stale_future_get_401() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let state = tempfile::tempdir().unwrap();
    let proxy = start_proxy(load(&senders_config("", ""), receiver.addr, &state)).await;
    let now = SystemTime::now;
    for p in PRESETS {
        let body = Bytes::from_static(p.fixture);
        // Good: forwarded byte-identical, with the sender's own headers.
        let headers = sign(p, SECRET, &body, now());
        let got = post(&proxy, p, &body, headers.clone()).await;
        assert_eq!(got.status, 200, "{}: {:?}", p.sender, got.body);
        let seen = receiver.next().await;
        assert_eq!(seen.body.unwrap(), body, "{}", p.sender);
        for (name, value) in &headers {
            assert_eq!(seen.headers.get(name), Some(value), "{}: {name}", p.sender);
        }
        assert!(seen.headers.get("payload-guard-trimmed").is_none());

        // Wrong and missing.
        let mut refusals = vec![
            (
                "wrong",
                sign(p, OTHER_SECRET, &body, now()),
                "signature_refused",
            ),
            ("missing", HeaderMap::new(), "signature_refused"),
        ];
        if Scheme::from_config(p.scheme, None).unwrap().has_timestamp() {
            refusals.push((
                "stale",
                sign(p, SECRET, &body, now() - SKEW),
                "signature_expired",
            ));
            refusals.push((
                "future",
                sign(p, SECRET, &body, now() + SKEW),
                "signature_expired",
            ));
        }
        for (what, headers, code) in refusals {
            let got = post(&proxy, p, &body, headers).await;
            assert_eq!(got.status, 401, "{} {what}: {:?}", p.sender, got.body);
            assert_eq!(got.json()["error"], code, "{} {what}", p.sender);
            let text = String::from_utf8_lossy(&got.body);
            assert!(
                !text.contains(SECRET) && !text.contains(OTHER_SECRET),
                "{text}"
            );
        }
        assert!(
            receiver.try_next().is_none(),
            "{}: a refused request was forwarded",
            p.sender
        );
    }
    // Twilio: the signature covers the public URL, not the proxy's own.
    let twilio = presets::find("twilio").unwrap();
    let body = Bytes::from_static(twilio.fixture);
    let url = proxy.url("/hooks/twilio?source=it");
    let own_url = verifier(twilio, SECRET)
        .sign_request(
            &Signed {
                headers: &HeaderMap::new(),
                body: &body,
                call_id: None,
                url: Some(&url),
                now: now(),
            },
            None,
        )
        .unwrap();
    assert_eq!(post(&proxy, twilio, &body, own_url).await.status, 401);
    assert!(
        proxy.incidents().await.is_empty(),
        "signature refusals are not size incidents"
    );
}

#[tokio::test]
async fn one_valid_signature_among_rotated_ones_is_forwarded() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let state = tempfile::tempdir().unwrap();
    let proxy = start_proxy(load(&senders_config("", ""), receiver.addr, &state)).await;
    let zeros = "0".repeat(64);
    let b64_zeros = format!("v1,{}=", "A".repeat(43));
    let cases = [
        ("stripe", "stripe-signature"),
        ("elevenlabs", "elevenlabs-signature"),
        ("standard-webhooks", "webhook-signature"),
    ];
    for (sender, header) in cases {
        let p = presets::find(sender).unwrap();
        let body = Bytes::from_static(p.fixture);
        let mut headers = sign(p, SECRET, &body, SystemTime::now());
        let valid = headers[header].to_str().unwrap().to_owned();
        // The old secret's signature first, then the new one's (as senders send while a
        // secret is rolled).
        let (rotated, only_old) = match sender {
            "standard-webhooks" => (format!("{b64_zeros} {valid}"), b64_zeros.clone()),
            _ => {
                let (t, sig) = valid.split_once(',').unwrap();
                let key = sig.split_once('=').unwrap().0;
                (
                    format!("{t},{key}={zeros},{sig}"),
                    format!("{t},{key}={zeros}"),
                )
            }
        };
        headers.insert(HeaderName::from_static(header), rotated.parse().unwrap());
        let got = post(&proxy, p, &body, headers.clone()).await;
        assert_eq!(got.status, 200, "{sender}: {:?}", got.body);
        assert_eq!(receiver.next().await.body.unwrap(), body);
        headers.insert(HeaderName::from_static(header), only_old.parse().unwrap());
        assert_eq!(
            post(&proxy, p, &body, headers).await.status,
            401,
            "{sender}"
        );
        assert!(receiver.try_next().is_none());
    }
}

/// A trimmed payload as the receiver got it.
struct Trimmed {
    preset: &'static Preset,
    body: Bytes,
    headers: HeaderMap,
}

#[tokio::test]
async fn trimmed_payloads_are_resigned_in_the_senders_scheme_and_verify_with_official_libraries() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let state = tempfile::tempdir().unwrap();
    let text = senders_config("upstream_limit = \"100KiB\"\n", "resign = \"same\"\n");
    let proxy = start_proxy(load(&text, receiver.addr, &state)).await;
    let mut trimmed = Vec::new();
    for p in PRESETS.iter().filter(|p| !p.grows.is_empty()) {
        let large = Bytes::from(p.sample(400 * 1024));
        let sent = sign(p, SECRET, &large, SystemTime::now());
        let got = post(&proxy, p, &large, sent.clone()).await;
        let seen = receiver.next().await;
        if p.rules.is_empty() {
            // Standard Webhooks has no preset rules: the payload is not trimmed, and its
            // untrimmed body keeps the sender's signature byte for byte.
            assert_eq!(got.status, 200, "{}", p.sender);
            assert_eq!(seen.body.unwrap(), large);
            assert_eq!(seen.headers["webhook-signature"], sent["webhook-signature"]);
            continue;
        }
        assert_eq!(got.status, 200, "{}: {:?}", p.sender, got.body);
        let body = seen.body.unwrap();
        assert!(
            body.len() <= 100 * 1024 && body.len() < large.len(),
            "{}",
            p.sender
        );
        assert!(
            seen.headers.contains_key("payload-guard-trimmed"),
            "{}",
            p.sender
        );
        // The documented algorithm, with the sender's secret, accepts the trimmed body...
        let v = verifier(p, SECRET);
        let call_id = p
            .id_path
            .and_then(|id| payload_guard::trim::string_at(&body, id));
        let verified = v
            .verify(&Signed {
                headers: &seen.headers,
                body: &body,
                call_id: call_id.as_deref(),
                url: None,
                now: SystemTime::now(),
            })
            .unwrap_or_else(|e| panic!("{}: {e}", p.sender));
        // ...with the sender's own id and timestamp, and not the original signature.
        let original = v
            .verify(&Signed {
                headers: &sent,
                body: &large,
                call_id: call_id.as_deref(),
                url: None,
                now: SystemTime::now(),
            })
            .unwrap();
        assert_eq!(verified.timestamp, original.timestamp, "{}", p.sender);
        assert_eq!(verified.id, original.id, "{}", p.sender);
        let header = &v.header_names()[0];
        if p.scheme == "synthflow" {
            assert_eq!(seen.headers[header], sent[header]);
        } else {
            assert_ne!(seen.headers[header], sent[header], "{}", p.sender);
        }
        trimmed.push(Trimmed {
            preset: p,
            body,
            headers: seen.headers,
        });
    }
    // Standard Webhooks with a rule of its own: trimmed and re-signed too.
    let sw = presets::find("standard-webhooks").unwrap();
    let text = format!(
        "{}\n[[routes.trim]]\npath = \"data.transcript\"\naction = \"truncate\"\n",
        one_route(
            "upstream_limit = \"100KiB\"\nsender = \"standard-webhooks\"\n[routes.verify]\nsecret_env = \"SECRET_STANDARD_WEBHOOKS\"\nresign = \"same\"",
            ""
        )
    );
    let proxy = start_proxy(load(&text, receiver.addr, &state)).await;
    let large = Bytes::from(sw.sample(400 * 1024));
    let mut req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(full(large.clone()))
        .unwrap();
    req.headers_mut()
        .extend(sign(sw, SECRET, &large, SystemTime::now()));
    assert_eq!(send(proxy.addr, req).await.status, 200);
    let seen = receiver.next().await;
    let body = seen.body.unwrap();
    assert!(body.len() <= 100 * 1024);
    trimmed.push(Trimmed {
        preset: sw,
        body,
        headers: seen.headers,
    });

    official_libraries_accept(&trimmed);
}

/// The verification script: one JSON case per line on stdin, `ok <sender>` per case on stdout.
const PY_VERIFY: &str = r#"
import json, sys
import stripe, standardwebhooks
from retell.lib.webhook_auth import verify as retell_verify
for line in sys.stdin:
    case = json.loads(line)
    body, headers, secret = case["body"], case["headers"], case["secret"]
    if case["sender"] == "stripe":
        stripe.Webhook.construct_event(body, headers["stripe-signature"], secret)
    elif case["sender"] == "standard-webhooks":
        standardwebhooks.Webhook(secret).verify(body, headers)
    elif case["sender"] == "retell":
        assert retell_verify(body, secret, headers["x-retell-signature"]), "retell refused"
    print("ok", case["sender"], flush=True)
"#;

/// Runs the senders' official verification code on the trimmed payloads.
fn official_libraries_accept(trimmed: &[Trimmed]) {
    let Some(python) = official_venv() else {
        return;
    };
    let mut child = Command::new(&python)
        .args(["-c", PY_VERIFY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut expected = Vec::new();
    {
        let mut stdin = child.stdin.take().unwrap();
        for t in trimmed {
            if !["stripe", "standard-webhooks", "retell"].contains(&t.preset.sender) {
                continue;
            }
            let headers: BTreeMap<&str, &str> = t
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
                .collect();
            let case = serde_json::json!({
                "sender": t.preset.sender,
                "body": std::str::from_utf8(&t.body).unwrap(),
                "headers": headers,
                "secret": secret_for(t.preset, SECRET),
            });
            writeln!(stdin, "{case}").unwrap();
            expected.push(format!("ok {}", t.preset.sender));
        }
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the official libraries refused a re-signed payload:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);
}

/// The venv with the senders' libraries (created by `.ci/run`, or here on first use). `None`
/// (with one line) when it cannot be made and `CI` is unset; under `CI=true` that fails.
fn official_venv() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("senders-venv");
    let python = dir.join("bin").join("python");
    let check = |python: &Path| {
        Command::new(python)
            .args(["-c", "import stripe, standardwebhooks, retell"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if check(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "stripe",
                "standardwebhooks",
                "retell-sdk",
            ])
            .status()
            .is_ok_and(|s| s.success())
        && check(&python);
    if made {
        return Some(python);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "cannot install stripe, standardwebhooks and retell-sdk into {}",
            dir.display()
        );
    }
    println!(
        "skipped: official sender libraries not installed; pip install stripe standardwebhooks retell-sdk (into {})",
        dir.display()
    );
    None
}

#[test]
fn preset_and_resign_mistakes_are_config_errors() {
    let load_err = |route_keys: &str| {
        let text = one_route(route_keys, "").replace("{upstream}", "127.0.0.1:1");
        payload_guard::config::Config::from_str_with_env(&text, Path::new("t.toml"), &|_| {
            Some(SECRET.to_owned())
        })
        .unwrap_err()
        .to_string()
    };
    let err = load_err("sender = \"retel\"");
    assert!(
        err.contains("routes[0].sender") && err.contains("retell, elevenlabs"),
        "{err}"
    );
    let err = load_err("sender = \"twilio\"\n[routes.verify]\nsecret_env = \"S\"");
    assert!(err.contains("routes[0].verify.public_url"), "{err}");
    let err = load_err(&format!(
        "sender = \"twilio\"\n[routes.verify]\nsecret_env = \"S\"\npublic_url = \"{TWILIO_PUBLIC_URL}\"\nresign = \"same\""
    ));
    assert!(err.contains("routes[0].verify.resign"), "{err}");
    let err = load_err("[routes.verify]\nsecret_env = \"S\"");
    assert!(
        err.contains("routes[0].verify.scheme") && err.contains("sender"),
        "{err}"
    );
    let err =
        load_err("[routes.verify]\nscheme = \"stripe\"\nsecret_env = \"S\"\nresign = \"other\"");
    assert!(err.contains("is not a resign mode"), "{err}");
    let err =
        load_err("[routes.verify]\nscheme = \"github\"\nsecret_env = \"S\"\ntolerance = \"1m\"");
    assert!(err.contains("signs no timestamp"), "{err}");
    let err = load_err("[routes.verify]\nscheme = \"standard-webhooks\"\nsecret_env = \"S\"");
    assert!(err.contains("whsec_"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
}

fn bin() -> Command {
    Command::new(crate::support::binary())
}

/// A config file with a Stripe route (preset values) and a Retell route with explicit keys
/// overriding its preset.
fn write_cli_config(dir: &Path, upstream: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"

[[routes]]
name = "stripe"
path_prefix = "/hooks/stripe"
upstream = "http://{upstream}/webhook"
upstream_limit = "100KiB"
sender = "stripe"
[routes.verify]
secret_env = "STRIPE_WEBHOOK_SECRET"
resign = "same"

[[routes]]
name = "retell"
path_prefix = "/hooks/retell"
upstream = "http://{upstream}/webhook"
upstream_limit = "100KiB"
sender = "retell"
id_path = "call.agent_id"
[routes.verify]
secret_env = "RETELL_API_KEY"
tolerance = "2m"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_prints_effective_values_and_sign_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_cli_config(dir.path(), "127.0.0.1:9");
    let run = |args: &[&str]| {
        bin()
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("STRIPE_WEBHOOK_SECRET", SECRET)
            .env("RETELL_API_KEY", SECRET)
            .output()
            .unwrap()
    };
    let out = run(&["check"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains("signatures of stripe: sender stripe; id_path id; scheme stripe; header stripe-signature; secret_env STRIPE_WEBHOOK_SECRET; tolerance 5m; resign same"),
        "{report}"
    );
    // Explicit keys override the preset.
    assert!(
        report.contains("signatures of retell: sender retell; id_path call.agent_id; scheme retell; header x-retell-signature; secret_env RETELL_API_KEY; tolerance 2m; resign off"),
        "{report}"
    );
    assert!(
        report.contains("trim rules of stripe, from sender stripe (protect: id;"),
        "{report}"
    );
    assert!(
        report.contains("trim rules of retell (protect: call.agent_id;"),
        "{report}"
    );
    assert!(!report.contains(SECRET));

    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe-invoice-paid.json");
    let fixture = fixture.to_str().unwrap();
    let out = run(&[
        "sign",
        "--route",
        "stripe",
        "--timestamp",
        "1718000000",
        fixture,
    ]);
    let signed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(out.status.code(), Some(0), "{signed}");
    assert!(
        signed.starts_with("Stripe-Signature: t=1718000000,v1="),
        "{signed}"
    );
    // The documented algorithm: hex HMAC-SHA256 of "<t>.<body>".
    let body = std::fs::read(fixture).unwrap();
    let expected = payload_guard::verify::sign(
        Scheme::HmacSha256Body {
            encoding: payload_guard::verify::Encoding::Hex,
        },
        &Secret::new(SECRET),
        &[b"1718000000.".as_slice(), &body].concat(),
    );
    assert!(signed.ends_with(&expected), "{signed}");

    // verify: valid now, refused when stale (exit 1), with a reason and no secret.
    let out = run(&["sign", "--route", "stripe", fixture]);
    let fresh = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out = run(&["verify", "--route", "stripe", "-H", &fresh, fixture]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("valid: stripe signature in Stripe-Signature")
    );
    let out = run(&["verify", "--route", "stripe", "-H", &signed, fixture]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused (expired)") && !err.contains(SECRET),
        "{err}"
    );
    let other = dir.path().join("other.json");
    std::fs::write(&other, b"{\"id\":\"evt_other\"}").unwrap();
    let out = run(&[
        "verify",
        "--route",
        "stripe",
        "-H",
        &fresh,
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (mismatch)"));
}

#[tokio::test]
async fn the_binary_never_logs_a_secret_while_refusing_and_resigning() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_cli_config(dir.path(), &receiver.addr.to_string());
    let mut child = crate::support::ChildGuard(
        bin()
            .arg("--config")
            .arg(&config)
            .env("STRIPE_WEBHOOK_SECRET", SECRET)
            .env("RETELL_API_KEY", SECRET)
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    let (addr, lines) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        loop {
            let line = lines.next().expect("proxy exited").unwrap();
            if let Some(pos) = line.find("listen=") {
                let rest = &line[pos + 7..];
                let addr: std::net::SocketAddr = rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse()
                    .unwrap();
                seen.push(line);
                return (addr, (lines, seen));
            }
            seen.push(line);
        }
    })
    .await
    .unwrap();
    let stripe = presets::find("stripe").unwrap();
    let large = Bytes::from(stripe.sample(300 * 1024));
    let post = |headers: HeaderMap| {
        let mut req = Request::post(format!("http://{addr}/hooks/stripe"))
            .header("content-type", "application/json")
            .body(full(large.clone()))
            .unwrap();
        req.headers_mut().extend(headers);
        req
    };
    let now = SystemTime::now();
    let got = send(addr, post(sign(stripe, SECRET, &large, now))).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = receiver.next().await;
    assert!(seen.body.unwrap().len() <= 100 * 1024);
    for headers in [
        sign(stripe, OTHER_SECRET, &large, now),
        sign(stripe, SECRET, &large, now - SKEW),
        HeaderMap::new(),
    ] {
        assert_eq!(send(addr, post(headers)).await.status, 401);
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let (lines, mut seen) = lines;
        seen.extend(lines.map_while(Result::ok));
        (child.wait().unwrap(), seen.join("\n"))
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(log.matches("status=401").count(), 3, "{log}");
    assert!(log.contains("signature_expired"), "{log}");
    assert!(
        !log.contains(SECRET) && !log.contains(OTHER_SECRET),
        "{log}"
    );
}

#[test]
fn demo_runs_for_every_json_sender() {
    for p in PRESETS {
        let out = bin()
            .args(["demo", "--sender", p.sender])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        if p.content_type != "application/json" {
            assert_eq!(out.status.code(), Some(64), "{}", p.sender);
            assert!(String::from_utf8_lossy(&out.stderr).contains("form-encoded"));
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{report}\n{}",
            p.sender,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            report.contains("every step behaved as expected"),
            "{report}"
        );
        let step4 = report
            .lines()
            .skip_while(|l| !l.contains("4. large payload through payload-guard"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            step4.contains("valid for the receiver"),
            "{}: {step4}",
            p.sender
        );
    }
    let out = bin().args(["demo", "--sender", "nobody"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn a_resend_after_the_receivers_413_is_resigned_with_the_senders_stamp() {
    // No upstream_limit: the first send goes out whole, the receiver refuses it, and the
    // trimmed resend must carry a valid signature with the sender's timestamp.
    let mut receiver = Receiver::start(Behavior::LimitEarly(100 * 1024)).await;
    let state = tempfile::tempdir().unwrap();
    let text = one_route(
        "sender = \"retell\"\nretry_on_413 = true\n[routes.verify]\nsecret_env = \"SECRET_RETELL\"\nresign = \"same\"",
        "",
    );
    let proxy = start_proxy(load(&text, receiver.addr, &state)).await;
    let retell = presets::find("retell").unwrap();
    let large = Bytes::from(retell.sample(300 * 1024));
    let sent = sign(retell, SECRET, &large, SystemTime::now());
    let mut req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(full(large.clone()))
        .unwrap();
    req.headers_mut().extend(sent.clone());
    let got = send(proxy.addr, req).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let refused = receiver.next().await;
    assert!(
        refused.body.is_err(),
        "the first send is refused unread: {:?} {:?}",
        refused.headers,
        refused.body.as_ref().map(Bytes::len)
    );
    assert_eq!(
        refused.headers["x-retell-signature"],
        sent["x-retell-signature"]
    );
    // The ladder may step down more than once; the accepted resend is the one to check.
    let (resent, body) = loop {
        let seen = receiver.next().await;
        if let Ok(body) = seen.body.clone() {
            break (seen, body);
        }
    };
    assert!(body.len() <= 100 * 1024);
    let verified = verifier(retell, SECRET)
        .verify(&Signed {
            headers: &resent.headers,
            body: &body,
            call_id: None,
            url: None,
            now: SystemTime::now(),
        })
        .unwrap();
    let original = sent["x-retell-signature"].to_str().unwrap();
    assert!(original.starts_with(&format!("v={},", verified.timestamp.unwrap())));
}

#[tokio::test]
async fn a_redelivery_from_the_spool_is_resigned_with_the_senders_stamp() {
    let mut receiver = Receiver::start(Behavior::FailFirst(1, 503)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[spool]\ndir = \"spool\"\nmin_free = 0\nretry_initial = \"100ms\"\n[[routes]]\nname = \"stripe\"\npath_prefix = \"/hooks/stripe\"\nupstream = \"http://{}/webhook\"\nupstream_limit = \"100KiB\"\nspool = true\nsender = \"stripe\"\n[routes.verify]\nsecret_env = \"SECRET_STRIPE\"\nresign = \"same\"\n",
        receiver.addr
    );
    let config = payload_guard::config::Config::from_str_with_env(
        &text,
        &dir.path().join("proxy.toml"),
        &|name| (name == "SECRET_STRIPE").then(|| SECRET.to_owned()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let proxy = start_proxy(config).await;
    let stripe = presets::find("stripe").unwrap();
    let large = Bytes::from(stripe.sample(300 * 1024));
    let sent = sign(stripe, SECRET, &large, SystemTime::now());
    let mut req = Request::post(proxy.url("/hooks/stripe"))
        .header("content-type", "application/json")
        .body(full(large.clone()))
        .unwrap();
    req.headers_mut().extend(sent.clone());
    let got = send(proxy.addr, req).await;
    assert_eq!(got.status, 202, "{:?}", got.body);
    let refused = receiver.next().await;
    assert!(refused.body.is_ok());
    // Redeliver now (as the background task would once the backoff is due).
    payload_guard::deliver::redeliver_due(
        proxy.proxy.current(),
        proxy.proxy.shared_arc(),
        SystemTime::now() + Duration::from_secs(60),
    )
    .await;
    let redelivered = receiver.next().await;
    let body = redelivered.body.unwrap();
    assert!(body.len() <= 100 * 1024 && body.len() < large.len());
    let verified = verifier(stripe, SECRET)
        .verify(&Signed {
            headers: &redelivered.headers,
            body: &body,
            call_id: None,
            url: None,
            now: SystemTime::now(),
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", redelivered.headers));
    let original = sent["stripe-signature"].to_str().unwrap();
    assert!(original.starts_with(&format!("t={},", verified.timestamp.unwrap())));
}

#[test]
fn the_url_twilio_signed_is_public_url_plus_the_rest_of_the_request_target() {
    let text = one_route(
        &format!(
            "sender = \"twilio\"\n[routes.verify]\nsecret_env = \"S\"\npublic_url = \"{TWILIO_PUBLIC_URL}/\""
        ),
        "",
    )
    .replace("{upstream}", "127.0.0.1:1");
    let config =
        payload_guard::config::Config::from_str_with_env(&text, Path::new("t.toml"), &|_| {
            Some(SECRET.to_owned())
        })
        .unwrap();
    let route = config.route("test").unwrap();
    let v = route.verify.as_ref().unwrap();
    let url = |target: &str| v.sender_url(&route.path_prefix, target);
    assert_eq!(url("/hooks/test").as_deref(), Some(TWILIO_PUBLIC_URL));
    assert_eq!(
        url("/hooks/test?a=1&b=2").as_deref(),
        Some(format!("{TWILIO_PUBLIC_URL}?a=1&b=2").as_str())
    );
    assert_eq!(
        url("/hooks/test/status?x=1").as_deref(),
        Some(format!("{TWILIO_PUBLIC_URL}/status?x=1").as_str())
    );
}
