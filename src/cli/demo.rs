//! `payload-guard demo`: shows on loopback what the proxy is for, with nothing to configure.
//!
//! A sample receiver refuses bodies over 100 KiB with 413, as an Express app using
//! `express.json()` does by default. It gets a small and a large Synthflow-shaped payload, first
//! straight and then through payload-guard with a trim route in front of it. The report on stdout
//! says what happened to each payload.
//!
//! The proxy is the production one: a [`Config`] parsed from TOML text, [`Proxy::start`] and
//! [`server::serve`] on a listener bound to `127.0.0.1:0`, with its incident log in a temporary
//! directory that is removed at the end. The proxy's own log still goes to stderr
//! (`RUST_LOG=warn` quiets it). The exit code is 0 when every step behaved as expected, 1 when
//! a step did not, and 2 when the demo could not be set up.
//!
//! With `--sender NAME` the payloads are that sender's (its fixture, grown for the large one),
//! signed as the sender signs them; the route uses `sender = NAME`, verifies the signature and
//! re-signs the trimmed payload with `resign = "same"`, and the receiver checks the signature
//! of what it got with the sender's secret, as its unchanged code would.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::config::presets::{self, Preset};
use crate::config::units::human_bytes;
use crate::proxy::Proxy;
use crate::server;
use crate::trim::testdata::synthflow_payload;
use crate::verify::{Secret, Signed, Verifier};

use super::{EXIT_OK, EXIT_PROBLEMS, EXIT_SOFTWARE, EXIT_UNAVAILABLE, EXIT_USAGE, emit};

/// What the sample receiver accepts: body-parser's default `limit: "100kb"`, which counts
/// 1024-byte kilobytes.
const RECEIVER_LIMIT_BYTES: u64 = 100 * 1024;
/// The small payload: a short call, well under the limit.
const SMALL_PAYLOAD_BYTES: usize = 3_200;
/// The large payload: a long call whose transcript alone is almost four times the limit.
const LARGE_PAYLOAD_BYTES: usize = 400_000;
/// Seed of the generated payloads, so every run shows the same numbers.
const PAYLOAD_SEED: u64 = 2026;
/// What the sample receiver accepts in a `--sender` demo: room for every sender's fixture
/// (a ten-minute call) as the small payload.
const SENDER_RECEIVER_LIMIT_BYTES: u64 = 256 * 1024;
/// The large payload of a `--sender` demo: the fixture grown to at least this.
const SENDER_LARGE_PAYLOAD_BYTES: usize = 1024 * 1024;
/// The secret the demo's sender and receiver share (the proxy reads it from its config's
/// environment lookup, never from the process environment).
const DEMO_SECRET: &str = "demo-secret-shared-by-sender-and-receiver";
/// The path the sample receiver serves.
const RECEIVER_PATH: &str = "/webhook";
/// The proxy route's path prefix.
const ROUTE_PATH: &str = "/hooks/synthflow";
/// The field Synthflow signs, which no trim rule may touch.
const CALL_ID_PATH: &str = "call.call_id";
/// A request header naming the step, so a receiver's record is matched to its step even when an
/// earlier step went wrong halfway.
const STEP_HEADER: &str = "payload-guard-demo-step";
/// How long one request may take before its step fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the receiver's record of a request that got an answer.
const SEEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the proxy and the receiver get to shut down.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bytes quoted when a step gets an unexpected status.
const QUOTE_BYTES: usize = 200;

/// The body Express sends for body-parser's `PayloadTooLargeError` (finalhandler's HTML page).
const EXPRESS_413_BODY: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Error</title>\n</head>\n<body>\n<pre>PayloadTooLargeError: request entity too large</pre>\n</body>\n</html>\n";

/// What one run of the demo sends, and how the route is set up.
struct Scenario {
    /// The sender preset (`--sender`), if any.
    preset: Option<&'static Preset>,
    /// What the sample receiver accepts.
    receiver_limit: u64,
    /// The route's path prefix.
    route_path: String,
    /// The id the trim must leave alone (absent for senders with no id in the body).
    id_path: Option<&'static str>,
    content_type: &'static str,
    small: Bytes,
    large: Bytes,
    /// Signs the requests as the sender does, and checks what the receiver got.
    signer: Option<Verifier>,
}

impl Scenario {
    fn synthflow() -> Scenario {
        Scenario {
            preset: None,
            receiver_limit: RECEIVER_LIMIT_BYTES,
            route_path: ROUTE_PATH.to_owned(),
            id_path: Some(CALL_ID_PATH),
            content_type: "application/json",
            small: Bytes::from(synthflow_payload(SMALL_PAYLOAD_BYTES, PAYLOAD_SEED)),
            large: Bytes::from(synthflow_payload(LARGE_PAYLOAD_BYTES, PAYLOAD_SEED)),
            signer: None,
        }
    }

    fn sender(name: &str) -> Result<Scenario, String> {
        let preset = presets::find(name).ok_or_else(|| {
            format!(
                "unknown sender {name:?}: expected one of {}",
                presets::names()
            )
        })?;
        if preset.content_type != "application/json" {
            return Err(format!(
                "{name}'s webhooks are form-encoded, not JSON the proxy trims: try another sender ({})",
                presets::names()
            ));
        }
        let scheme =
            crate::verify::Scheme::from_config(preset.scheme, None).map_err(|e| e.to_string())?;
        let signer = Verifier::new(scheme, None, Secret::new(demo_secret(preset)))
            .map_err(|e| e.to_string())?;
        Ok(Scenario {
            preset: Some(preset),
            receiver_limit: SENDER_RECEIVER_LIMIT_BYTES,
            route_path: format!("/hooks/{}", preset.sender),
            id_path: preset.id_path,
            content_type: preset.content_type,
            small: Bytes::from_static(preset.fixture),
            large: Bytes::from(preset.sample(SENDER_LARGE_PAYLOAD_BYTES)),
            signer: Some(signer),
        })
    }

    /// How long a detail line may be: senders' trims name hundreds of array elements, so their
    /// report lines are cut; the default demo prints them whole.
    fn detail_chars(&self) -> Option<usize> {
        self.preset.map(|_| 240)
    }

    /// The headers the sender sends with `body` now.
    fn sign(&self, body: &Bytes) -> Result<HeaderMap, String> {
        let Some(signer) = &self.signer else {
            return Ok(HeaderMap::new());
        };
        let call_id = self.id_path.and_then(|p| crate::trim::string_at(body, p));
        signer
            .sign_request(
                &Signed {
                    headers: &HeaderMap::new(),
                    body,
                    call_id: call_id.as_deref(),
                    url: None,
                    now: std::time::SystemTime::now(),
                },
                None,
            )
            .map_err(|e| format!("cannot sign the payload: {e}"))
    }
}

/// The demo secret as the preset's scheme expects it (`whsec_<base64>` for Standard Webhooks).
fn demo_secret(preset: &Preset) -> String {
    use base64::Engine as _;
    if preset.scheme == "standard-webhooks" {
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(DEMO_SECRET)
        )
    } else {
        DEMO_SECRET.to_owned()
    }
}

/// Runs the demo and returns the exit code; `--config` plays no part.
pub(super) fn demo(sender: Option<&str>) -> u8 {
    let scenario = match sender {
        None => Scenario::synthflow(),
        Some(name) => match Scenario::sender(name) {
            Ok(scenario) => scenario,
            Err(why) => {
                eprintln!("payload-guard demo: {why}");
                return EXIT_USAGE;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("payload-guard demo: cannot start the async runtime: {err}");
            return EXIT_SOFTWARE;
        }
    };
    match runtime.block_on(run(&scenario)) {
        Ok(true) => EXIT_OK,
        Ok(false) => EXIT_PROBLEMS,
        Err(err) => {
            eprintln!("payload-guard demo: {err:#}");
            EXIT_UNAVAILABLE
        }
    }
}

/// Sets everything up, runs the four steps, reports, and shuts down. `Ok(false)` when a step
/// misbehaved; `Err` when the demo could not be set up.
async fn run(sc: &Scenario) -> anyhow::Result<bool> {
    // Declared first so that it is removed last, after the proxy has stopped writing to it.
    let scratch = ScratchDir::create().context("cannot create a temporary directory")?;
    let incidents_path = scratch.path().join("incidents.jsonl");

    let mut receiver = SampleReceiver::start(sc.receiver_limit)
        .await
        .context("cannot start the sample receiver on 127.0.0.1")?;
    let secret = sc.preset.map(demo_secret);
    let config = Config::from_str_with_env(
        &demo_config(sc, receiver.addr, &incidents_path),
        Path::new("payload-guard-demo.toml"),
        &|name| {
            (name == "DEMO_SENDER_SECRET")
                .then(|| secret.clone())
                .flatten()
        },
    )
    .context("the demo's built-in configuration is invalid")?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1 for the proxy")?;
    let proxy_addr = listener
        .local_addr()
        .context("cannot read the proxy's address")?;
    let proxy = Proxy::start(config).context("cannot set up the proxy's route")?;
    let (stop_proxy, proxy_stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(listener, proxy.clone(), async move {
        let _ = proxy_stopped.await;
    }));

    let (small, large) = (&sc.small, &sc.large);
    let labels = [
        format!(
            "1. small payload ({}) straight to the receiver",
            human_bytes(small.len() as u64)
        ),
        format!(
            "2. large payload ({}) straight to the receiver",
            human_bytes(large.len() as u64)
        ),
        "3. small payload through payload-guard".to_owned(),
        "4. large payload through payload-guard".to_owned(),
    ];
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    emit(&format!(
        "payload-guard demo: a receiver that refuses bodies over {} (like express.json()), and payload-guard in front of it{}\n\n",
        human_bytes(sc.receiver_limit),
        match sc.preset {
            Some(p) => format!(
                "\n{} payloads, signed with scheme {}; the route has sender = \"{}\"{}",
                p.sender,
                p.scheme,
                p.sender,
                if resigns(p) {
                    " and resign = \"same\""
                } else {
                    ""
                }
            ),
            None => String::new(),
        }
    ));

    let straight = Target {
        addr: receiver.addr,
        path: RECEIVER_PATH,
    };
    let through = Target {
        addr: proxy_addr,
        path: &sc.route_path,
    };
    let [label1, label2, label3, label4] = labels;
    let mut steps = Vec::with_capacity(4);

    let mut step = Step::new(label1);
    let sent = send(sc, straight, 1, small).await;
    let seen = receiver.seen(1, sent.is_ok()).await;
    check_small_straight(&mut step, sent, seen, small);
    step.print(width, sc.detail_chars());
    steps.push(step);

    let mut step = Step::new(label2);
    let sent = send(sc, straight, 2, large).await;
    let seen = receiver.seen(2, sent.is_ok()).await;
    check_large_straight(&mut step, sent, seen);
    step.print(width, sc.detail_chars());
    steps.push(step);

    let mut step = Step::new(label3);
    let signed = sc.sign(small);
    let sent = send_signed(sc, through, 3, small, signed.clone()).await;
    let seen = receiver.seen(3, sent.is_ok()).await;
    check_signature(sc, &mut step, seen.as_ref(), signed.as_ref().ok(), false);
    check_small_through(&mut step, sent, seen, small);
    step.print(width, sc.detail_chars());
    steps.push(step);

    let mut step = Step::new(label4);
    let signed = sc.sign(large);
    let sent = send_signed(sc, through, 4, large, signed.clone()).await;
    let seen = receiver.seen(4, sent.is_ok()).await;
    check_signature(sc, &mut step, seen.as_ref(), signed.as_ref().ok(), true);
    let request_id = sent.as_ref().ok().and_then(|reply| {
        reply
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    check_large_through(sc, &mut step, sent, seen, large);
    proxy.shared().incidents.flush().await;
    check_incident(&mut step, &incidents_path, request_id.as_deref()).await;
    step.print(width, sc.detail_chars());
    steps.push(step);

    // Shut down: the proxy drains its connections, then the receiver stops accepting.
    let _ = stop_proxy.send(());
    let mut shutdown_problems = Vec::new();
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, served).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => {
            shutdown_problems.push(format!("the proxy stopped with an error: {err}"))
        }
        Ok(Err(err)) => shutdown_problems.push(format!("the proxy's task failed: {err}")),
        Err(_) => shutdown_problems.push(format!(
            "the proxy did not stop within {}s",
            SHUTDOWN_TIMEOUT.as_secs()
        )),
    }
    drop(proxy);
    if let Err(problem) = receiver.stop().await {
        shutdown_problems.push(problem);
    }

    let failed: Vec<String> = steps
        .iter()
        .enumerate()
        .filter(|(_, step)| !step.problems.is_empty())
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    let mut verdict = String::from("\n");
    for problem in &shutdown_problems {
        verdict.push_str(&format!("shutdown: {problem}\n"));
    }
    if failed.is_empty() && shutdown_problems.is_empty() {
        verdict.push_str("every step behaved as expected\n");
    } else if !failed.is_empty() {
        verdict.push_str(&format!(
            "{} of {} steps did not behave as expected (step {})\n",
            failed.len(),
            steps.len(),
            failed.join(", ")
        ));
    } else {
        verdict
            .push_str("every step behaved as expected, but the demo did not shut down cleanly\n");
    }
    emit(&verdict);
    Ok(failed.is_empty() && shutdown_problems.is_empty())
}

/// Whether the route re-signs trimmed payloads (every body-signing scheme).
fn resigns(preset: &Preset) -> bool {
    crate::verify::Scheme::from_config(preset.scheme, None)
        .is_ok_and(|s| s.signs_body() && s.can_resign())
}

/// The proxy's configuration: one trim route to the sample receiver, told its limit. A
/// `--sender` route takes the sender's preset, verifies and re-signs.
fn demo_config(sc: &Scenario, receiver: SocketAddr, incidents: &Path) -> String {
    // A TOML basic string, escaped by the toml crate (backslashes in Windows paths).
    let incidents = toml::Value::String(incidents.display().to_string());
    let Some(preset) = sc.preset else {
        return synthflow_config(receiver, &incidents);
    };
    let limit = sc.receiver_limit;
    let mut text = format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"

[incidents]
path = {incidents}

[[routes]]
name = "{name}"
path_prefix = "{path}"
upstream = "http://{receiver}{RECEIVER_PATH}"
upstream_limit = {limit}
sender = "{name}"
on_trim_failure = "reject"

[routes.verify]
secret_env = "DEMO_SENDER_SECRET"
"#,
        name = preset.sender,
        path = sc.route_path,
    );
    if resigns(preset) {
        text.push_str("resign = \"same\"\n");
    }
    if preset.rules.is_empty() {
        // The sender has no preset rules (its envelope is generic): the demo's payload is a
        // call transcript.
        for path in preset.grows {
            text.push_str(&format!(
                "\n[[routes.trim]]\npath = \"{path}\"\naction = \"truncate\"\n"
            ));
        }
    }
    text
}

/// The default demo's route: Synthflow trim rules, no signatures.
fn synthflow_config(receiver: SocketAddr, incidents: &toml::Value) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"

[incidents]
path = {incidents}

[[routes]]
name = "synthflow"
path_prefix = "{ROUTE_PATH}"
upstream = "http://{receiver}{RECEIVER_PATH}"
upstream_limit = "100KiB"
on_oversize = "trim"
on_trim_failure = "reject"
protect = ["{CALL_ID_PATH}"]

[[routes.trim]]
path = "analysis.*_feedback"
action = "drop"

[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"
"#
    )
}

/// One step's lines in the report, and what went wrong in it, if anything.
struct Step {
    /// What is sent where, e.g. `3. small payload through payload-guard`.
    label: String,
    /// What came back, e.g. `200 OK  (passed byte-identical)`.
    outcome: String,
    /// Indented lines under the step (what was trimmed, the incident line).
    details: Vec<String>,
    /// What did not behave as expected; empty when the step passed.
    problems: Vec<String>,
}

impl Step {
    fn new(label: String) -> Step {
        Step {
            label,
            outcome: String::new(),
            details: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Writes the step to stdout, the outcome column starting at `width`, each detail cut to
    /// `detail_chars` when given.
    fn print(&self, width: usize, detail_chars: Option<usize>) {
        let mut out = format!("  {:<width$}  {}", self.label, self.outcome);
        out.truncate(out.trim_end().len());
        out.push('\n');
        for detail in &self.details {
            match detail_chars {
                Some(max) if detail.chars().count() > max => {
                    let cut: String = detail.chars().take(max).collect();
                    out.push_str(&format!("     {cut}…\n"));
                }
                _ => out.push_str(&format!("     {detail}\n")),
            }
        }
        for problem in &self.problems {
            out.push_str(&format!("     NOT AS EXPECTED: {problem}\n"));
        }
        emit(&out);
    }
}

/// Step 1: the receiver takes a small payload whole.
fn check_small_straight(
    step: &mut Step,
    sent: Result<Reply, String>,
    seen: Option<Received>,
    small: &Bytes,
) {
    if expect_status(step, sent, StatusCode::OK, "200 from the receiver").is_none() {
        return;
    }
    match seen.and_then(|s| s.body) {
        Some(body) if body == *small => {}
        Some(body) => step.problems.push(format!(
            "the receiver read {} instead of the {} sent",
            human_bytes(body.len() as u64),
            human_bytes(small.len() as u64)
        )),
        None => step
            .problems
            .push("the receiver did not read the payload".to_owned()),
    }
}

/// Step 2: the receiver refuses the large payload with 413, as body-parser does.
fn check_large_straight(step: &mut Step, sent: Result<Reply, String>, seen: Option<Received>) {
    let Some(reply) = reply_or_fail(step, sent) else {
        return;
    };
    step.outcome = status_text(reply.status);
    if reply.status == StatusCode::PAYLOAD_TOO_LARGE {
        step.outcome.push_str("   <- the call data would be lost");
    } else {
        step.problems
            .push(unexpected_status("413 from the receiver", &reply));
    }
    if seen.is_none() {
        step.problems
            .push("the receiver did not see the request".to_owned());
    }
}

/// Step 3: a payload under the limit passes through the proxy untouched.
fn check_small_through(
    step: &mut Step,
    sent: Result<Reply, String>,
    seen: Option<Received>,
    small: &Bytes,
) {
    if expect_status(step, sent, StatusCode::OK, "200 relayed from the receiver").is_none() {
        return;
    }
    let Some(seen) = seen else {
        step.problems
            .push("the request did not reach the receiver".to_owned());
        return;
    };
    match &seen.body {
        Some(body) if body == small => {
            if step.problems.is_empty() {
                step.outcome.push_str("  (passed byte-identical)");
            }
        }
        Some(body) => step.problems.push(format!(
            "the receiver got {} that differ from the {} sent",
            human_bytes(body.len() as u64),
            human_bytes(small.len() as u64)
        )),
        None => step
            .problems
            .push("the receiver refused the payload unread".to_owned()),
    }
    if let Some(trimmed) = trimmed_header(&seen.headers) {
        step.problems.push(format!(
            "the proxy trimmed a payload under the limit: {trimmed}"
        ));
    }
}

/// Step 4: the proxy trims the large payload under the limit and the receiver takes it.
fn check_large_through(
    sc: &Scenario,
    step: &mut Step,
    sent: Result<Reply, String>,
    seen: Option<Received>,
    large: &Bytes,
) {
    if expect_status(step, sent, StatusCode::OK, "200 relayed from the receiver").is_none() {
        return;
    }
    let Some(seen) = seen else {
        step.problems
            .push("the request did not reach the receiver".to_owned());
        return;
    };
    let Some(body) = &seen.body else {
        step.problems
            .push("the receiver refused the payload unread".to_owned());
        return;
    };
    let arrived = body.len() as u64;
    if step.problems.is_empty() {
        step.outcome.push_str(&format!(
            "  ({} -> {})",
            human_bytes(large.len() as u64),
            human_bytes(arrived)
        ));
    }
    if arrived > sc.receiver_limit {
        step.problems.push(format!(
            "{} arrived, over the receiver's {}",
            human_bytes(arrived),
            human_bytes(sc.receiver_limit)
        ));
    }
    match trimmed_header(&seen.headers) {
        Some(trimmed) => step.details.push(format!("trimmed: {trimmed}")),
        None => step
            .problems
            .push("the receiver got no Payload-Guard-Trimmed header".to_owned()),
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        step.problems
            .push("the receiver got a payload that is not valid JSON".to_owned());
    }
    let Some(id_path) = sc.id_path else { return };
    let original = crate::trim::string_at(large, id_path);
    let received = crate::trim::string_at(body, id_path);
    match (original, received) {
        (Some(original), Some(received)) if original == received => step
            .details
            .push(format!("{id_path} unchanged: {received}")),
        (original, received) => step.problems.push(format!(
            "{id_path} changed: sent {original:?}, received {received:?}"
        )),
    }
}

/// Steps 3 and 4 of a `--sender` demo: the receiver checks the signature of what it got with
/// the sender's secret. Untrimmed, the sender's own headers arrive unchanged; trimmed, the proxy
/// re-signed the body in the sender's scheme, keeping its timestamp and id.
fn check_signature(
    sc: &Scenario,
    step: &mut Step,
    seen: Option<&Received>,
    sent: Option<&HeaderMap>,
    trimmed: bool,
) {
    let (Some(signer), Some(seen), Some(sent)) = (&sc.signer, seen, sent) else {
        return;
    };
    let Some(body) = &seen.body else { return };
    let call_id = sc.id_path.and_then(|p| crate::trim::string_at(body, p));
    let verdict = signer.verify(&Signed {
        headers: &seen.headers,
        body,
        call_id: call_id.as_deref(),
        url: None,
        now: std::time::SystemTime::now(),
    });
    let header = signer.header_names()[0].clone();
    let unchanged = sent.get(&header) == seen.headers.get(&header);
    match verdict {
        Err(err) => step.problems.push(format!(
            "the receiver cannot verify the {} signature of what it got: {err}",
            signer.scheme().as_str()
        )),
        Ok(verified) if trimmed => {
            let mut detail = format!(
                "signature: {} re-signed by the proxy, valid for the receiver",
                header
            );
            if let Some(ts) = &verified.timestamp {
                detail.push_str(&format!(" (sender's timestamp {ts} kept)"));
            }
            if unchanged && signer.scheme().signs_body() {
                step.problems
                    .push("the trimmed payload kept the sender's original signature".to_owned());
            }
            if !signer.scheme().signs_body() {
                detail = format!(
                    "signature: {header} unchanged (it covers the call id), valid for the receiver"
                );
            }
            step.details.push(detail);
        }
        Ok(_) => {
            if !unchanged {
                step.problems
                    .push("the untrimmed payload's signature header was changed".to_owned());
            }
            step.details.push(format!(
                "signature: {header} passed unchanged, valid for the receiver"
            ));
        }
    }
}

/// Step 4, continued: the proxy recorded the trim as an incident line.
async fn check_incident(step: &mut Step, path: &Path, request_id: Option<&str>) {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(err) => {
            step.problems.push(format!(
                "cannot read the incident log {}: {err}",
                path.display()
            ));
            return;
        }
    };
    let line = text.lines().find(|line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|incident| {
            incident["kind"] == "over_upstream_limit"
                && request_id.is_none_or(|id| incident["request_id"] == id)
        })
    });
    let Some(line) = line else {
        step.problems
            .push("the incident log has no over_upstream_limit line for the request".to_owned());
        return;
    };
    step.details.push(format!("incident: {line}"));
    let action = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|incident| incident["action"].as_str().map(str::to_owned));
    if action.as_deref() != Some("trimmed") {
        step.problems.push(format!(
            "the incident's action is {action:?}, not \"trimmed\""
        ));
    }
}

/// The reply, with the step's outcome set to its status and a problem noted when that is not
/// `expected` (`what` names it); `None` when there is no reply.
fn expect_status(
    step: &mut Step,
    sent: Result<Reply, String>,
    expected: StatusCode,
    what: &str,
) -> Option<Reply> {
    let reply = reply_or_fail(step, sent)?;
    step.outcome = status_text(reply.status);
    if reply.status != expected {
        step.problems.push(unexpected_status(what, &reply));
    }
    Some(reply)
}

/// The reply, or the step fails with the reason there is none.
fn reply_or_fail(step: &mut Step, sent: Result<Reply, String>) -> Option<Reply> {
    match sent {
        Ok(reply) => Some(reply),
        Err(reason) => {
            step.outcome = "no answer".to_owned();
            step.problems.push(reason);
            None
        }
    }
}

/// `expected ..., got 502 Bad Gateway: {"error": ...}`.
fn unexpected_status(expected: &str, reply: &Reply) -> String {
    // One line, however the body is laid out (Express's 413 page is HTML).
    let body = String::from_utf8_lossy(&reply.body[..reply.body.len().min(QUOTE_BYTES)])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if body.is_empty() {
        format!("expected {expected}, got {}", status_text(reply.status))
    } else {
        format!(
            "expected {expected}, got {}: {body}",
            status_text(reply.status)
        )
    }
}

/// `413 Payload Too Large`.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The `Payload-Guard-Trimmed` header the proxy adds to a trimmed request.
fn trimmed_header(headers: &HeaderMap) -> Option<String> {
    headers
        .get("payload-guard-trimmed")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|v| !v.is_empty())
}

/// Where a step sends its payload.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    addr: SocketAddr,
    path: &'a str,
}

/// A response, read whole.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// POSTs `body` as JSON on a new HTTP/1.1 connection, as a webhook sender does, and reads the
/// whole response; any failure or a timeout is the step's problem.
async fn send(sc: &Scenario, target: Target<'_>, step: u8, body: &Bytes) -> Result<Reply, String> {
    send_signed(sc, target, step, body, sc.sign(body)).await
}

/// Like [`send`], with the signature headers already made (so the step can compare them with
/// what the receiver got).
async fn send_signed(
    sc: &Scenario,
    target: Target<'_>,
    step: u8,
    body: &Bytes,
    signed: Result<HeaderMap, String>,
) -> Result<Reply, String> {
    let signed = signed?;
    let request = exchange(target, step, body.clone(), sc.content_type, signed);
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer from {} within {}s",
            target.addr,
            REQUEST_TIMEOUT.as_secs()
        )),
    }
}

async fn exchange(
    target: Target<'_>,
    step: u8,
    body: Bytes,
    content_type: &str,
    signed: HeaderMap,
) -> Result<Reply, String> {
    let addr = target.addr;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake with {addr} failed: {}", chain(&err)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::post(target.path)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, content_type)
        .header(header::USER_AGENT, "payload-guard-demo")
        .header(STEP_HEADER, step.to_string())
        .body(Full::new(body))
        .map_err(|err| format!("cannot build the request: {err}"))?;
    request.headers_mut().extend(signed);
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("request to {addr} failed: {}", chain(&err)))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|err| format!("reading the response from {addr} failed: {}", chain(&err)))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// An error with its sources: hyper's own messages are terse (`connection closed before
/// message completed`), the cause is in the chain.
fn chain(err: &hyper::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// What the sample receiver saw of one request.
struct Received {
    /// The step, from [`STEP_HEADER`].
    step: Option<u8>,
    /// The request headers (the proxy's `Payload-Guard-Trimmed` among them).
    headers: HeaderMap,
    /// The body as read, or `None` when it was refused unread.
    body: Option<Bytes>,
}

/// The sample receiver: a hyper server on loopback that answers like an Express app with
/// `express.json()`, and tells the demo what it saw.
struct SampleReceiver {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Received>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl SampleReceiver {
    /// Binds `127.0.0.1:0` and starts accepting.
    async fn start(limit: u64) -> std::io::Result<SampleReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, seen) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(err) => {
                            tracing::warn!(error = %err, "demo receiver: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = &mut stopped => return,
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| receive(req, tx.clone(), limit));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(SampleReceiver {
            addr,
            seen,
            stop,
            task,
        })
    }

    /// What the receiver saw of `step`'s request; waits briefly when the request got an answer
    /// (the record is sent before the answer), not at all otherwise.
    async fn seen(&mut self, step: u8, answered: bool) -> Option<Received> {
        let wait = if answered {
            SEEN_TIMEOUT
        } else {
            Duration::ZERO
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(received)) if received.step == Some(step) => return Some(received),
                // A record of an earlier step that went wrong halfway.
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Stops accepting; open connections end with the runtime.
    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("the sample receiver's task failed: {err}")),
            Err(_) => Err(format!(
                "the sample receiver did not stop within {}s",
                SHUTDOWN_TIMEOUT.as_secs()
            )),
        }
    }
}

/// One request at the sample receiver. Like body-parser, it refuses a declared length over the
/// limit at once without reading the body, and a body that turns out longer while reading.
async fn receive(
    req: Request<Incoming>,
    seen: mpsc::UnboundedSender<Received>,
    limit: u64,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let step = parts
        .headers
        .get(STEP_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        // Node discards the unread rest of the body in the background, so the sender finishes
        // its upload and reads the 413 instead of being reset.
        tokio::spawn(async move {
            let _ = body.collect().await;
        });
        let _ = seen.send(Received {
            step,
            headers: parts.headers,
            body: None,
        });
        return Ok(payload_too_large());
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            let length = body.len();
            let _ = seen.send(Received {
                step,
                headers: parts.headers,
                body: Some(body),
            });
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "{{\"ok\":true,\"received\":{length}}}"
            ))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            Ok(response)
        }
        Err(err) => {
            let _ = seen.send(Received {
                step,
                headers: parts.headers,
                body: None,
            });
            if err.is::<LengthLimitError>() {
                Ok(payload_too_large())
            } else {
                let mut response = Response::new(Full::new(Bytes::from_static(
                    b"BadRequestError: request aborted",
                )));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                Ok(response)
            }
        }
    }
}

/// Express's answer to body-parser's `PayloadTooLargeError`, headers as a real capture has them.
fn payload_too_large() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(EXPRESS_413_BODY.as_bytes())));
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-powered-by"),
        HeaderValue::from_static("Express"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A fresh directory under the system temp directory, removed with its contents when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> std::io::Result<ScratchDir> {
        let path =
            std::env::temp_dir().join(format!("payload-guard-demo-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_config_is_valid_and_trims_to_the_receiver_limit() {
        let addr: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let text = demo_config(
            &Scenario::synthflow(),
            addr,
            Path::new("/tmp/x \"y\"\\z/incidents.jsonl"),
        );
        let config =
            Config::from_str(&text, Path::new("demo.toml")).unwrap_or_else(|e| panic!("{e}"));
        let route = config.route("synthflow").unwrap();
        assert_eq!(route.upstream_limit_bytes, Some(RECEIVER_LIMIT_BYTES));
        assert_eq!(route.upstream.to_string(), "http://127.0.0.1:3000/webhook");
        assert!(route.trim.is_some());
        assert_eq!(
            config.incidents.path,
            Path::new("/tmp/x \"y\"\\z/incidents.jsonl")
        );
    }

    #[test]
    fn every_json_sender_has_a_valid_demo_that_straddles_the_limit() {
        let addr: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        for preset in presets::PRESETS {
            let Ok(sc) = Scenario::sender(preset.sender) else {
                assert_eq!(preset.sender, "twilio");
                continue;
            };
            let secret = demo_secret(preset);
            let config = Config::from_str_with_env(
                &demo_config(&sc, addr, Path::new("/tmp/incidents.jsonl")),
                Path::new("demo.toml"),
                &|_| Some(secret.clone()),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", preset.sender));
            let route = config.route(preset.sender).unwrap();
            assert!(
                route.trim.is_some() && route.verify.is_some(),
                "{}",
                preset.sender
            );
            assert!(
                (sc.small.len() as u64) < sc.receiver_limit,
                "{}",
                preset.sender
            );
            assert!(
                (sc.large.len() as u64) > 3 * sc.receiver_limit,
                "{}",
                preset.sender
            );
        }
        assert!(Scenario::sender("nobody").is_err());
    }

    #[test]
    fn the_payloads_straddle_the_limit() {
        let small = synthflow_payload(SMALL_PAYLOAD_BYTES, PAYLOAD_SEED).len() as u64;
        let large = synthflow_payload(LARGE_PAYLOAD_BYTES, PAYLOAD_SEED).len() as u64;
        assert!(small < RECEIVER_LIMIT_BYTES && large > 3 * RECEIVER_LIMIT_BYTES);
    }

    #[test]
    fn statuses_read_like_http() {
        assert_eq!(
            status_text(StatusCode::PAYLOAD_TOO_LARGE),
            "413 Payload Too Large"
        );
        assert_eq!(status_text(StatusCode::from_u16(599).unwrap()), "599");
    }
}
