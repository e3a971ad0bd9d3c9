//! Test support: real receivers and the proxy on 127.0.0.1 with ephemeral ports, real clients.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use payload_guard::config::Config;
use payload_guard::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What a receiver saw of one request.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    /// The whole body, or why it could not be read completely.
    pub body: Result<Bytes, String>,
}

/// How a test receiver answers.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Read the body, answer 200 with `{"received": N}`.
    Ok,
    /// Read the body, answer with this status.
    Status(u16),
    /// Answer 413 at once, without reading the body, when Content-Length is over the limit
    /// (as body parsers do); otherwise like `Ok`.
    LimitEarly(u64),
    /// Read the body and never answer.
    Hang,
    /// Answer the first `n` requests with `status`, then like `Ok`.
    FailFirst(usize, u16),
    /// Like `Ok`, with `Connection: close`: every connection carries one request.
    CloseEach,
    /// Read the body, then take this long to answer like `Ok` (a slow receiver).
    Slow(std::time::Duration),
}

/// A real hyper receiver on 127.0.0.1:0 that reports every request it sees.
pub struct Receiver {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    pub started: Arc<AtomicUsize>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Receiver {
    pub async fn start(behavior: Behavior) -> Receiver {
        Receiver::start_at("127.0.0.1:0".parse().unwrap(), behavior).await
    }

    /// A receiver on a given address (e.g. one a config already points at).
    pub async fn start_at(addr: SocketAddr, behavior: Behavior) -> Receiver {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let started = Arc::new(AtomicUsize::new(0));
        let count = started.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = &mut stopped => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                let behavior = behavior.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        let seen_before = count.fetch_add(1, Ordering::SeqCst);
                        let behavior = match behavior.clone() {
                            Behavior::FailFirst(n, status) if seen_before < n => {
                                Behavior::Status(status)
                            }
                            Behavior::FailFirst(..) => Behavior::Ok,
                            other => other,
                        };
                        async move { Ok::<_, Infallible>(receive(req, behavior, tx).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            seen,
            started,
            connections,
            _stop: stop,
        }
    }

    /// The next request the receiver saw (waits for it).
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(20), self.seen.recv())
            .await
            .expect("receiver saw no request within 20s")
            .expect("receiver stopped")
    }

    /// Whether any request was seen, without waiting.
    pub fn try_next(&mut self) -> Option<Seen> {
        self.seen.try_recv().ok()
    }
}

async fn receive(
    req: Request<Incoming>,
    behavior: Behavior,
    tx: mpsc::UnboundedSender<Seen>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if let Behavior::LimitEarly(limit) = behavior {
        let declared = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|d| d > limit) {
            // Answer at once without using the body, and discard the rest of it in the
            // background as Node's http server and nginx do (no reset under the sender).
            tokio::spawn(async move {
                let _ = body.collect().await;
            });
            let _ = tx.send(Seen {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body: Err("not read: over limit".into()),
            });
            let mut resp = Response::new(Full::new(Bytes::from_static(
                b"PayloadTooLargeError: request entity too large",
            )));
            *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            resp.headers_mut()
                .insert("connection", "close".parse().unwrap());
            return resp;
        }
    }
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    let len = body.as_ref().map(|b| b.len()).unwrap_or(0);
    let _ = tx.send(Seen {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    });
    let status = match behavior {
        Behavior::Ok | Behavior::LimitEarly(_) | Behavior::FailFirst(..) | Behavior::CloseEach => {
            200
        }
        Behavior::Slow(answer_after) => {
            tokio::time::sleep(answer_after).await;
            200
        }
        Behavior::Status(s) => s,
        Behavior::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"received\":{len}}}"))));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("x-receiver-hop", "secret".parse().unwrap());
    let connection = if matches!(behavior, Behavior::CloseEach) {
        "close, x-receiver-hop"
    } else {
        "x-receiver-hop"
    };
    resp.headers_mut()
        .insert("connection", connection.parse().unwrap());
    resp
}

/// A running proxy, stopped (gracefully) when dropped or by `shutdown`.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    /// The incident log (a temp file unless the config names one).
    pub incidents: std::path::PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl ProxyHandle {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs `body` to `/hooks/test` on a new connection and reads the whole response.
    pub async fn post(&self, body: impl Into<Bytes>) -> Got {
        let req = Request::post(self.url("/hooks/test"))
            .body(full(body))
            .unwrap();
        send(self.addr, req).await
    }

    /// Like [`ProxyHandle::post`], as `application/json`.
    pub async fn post_json(&self, body: impl Into<Bytes>) -> Got {
        let req = Request::post(self.url("/hooks/test"))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap();
        send(self.addr, req).await
    }

    /// Every incident written so far (waits for the writer to catch up).
    pub async fn incidents(&self) -> Vec<serde_json::Value> {
        self.proxy.shared().incidents.flush().await;
        std::fs::read_to_string(&self.incidents)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad incident line ({e}): {l}"))
            })
            .collect()
    }

    /// Signals shutdown (in-flight requests may finish within the grace).
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown();
        if self.incidents.starts_with(std::env::temp_dir())
            && let Some(dir) = self.incidents.parent()
            && dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pg-it-"))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Parses the config text (with `{upstream}` replaced by the receiver's address).
pub fn config(text: &str, upstream: SocketAddr) -> Config {
    let text = text.replace("{upstream}", &upstream.to_string());
    Config::from_str(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`config`], with environment variables (secrets) from `env` instead of the process's.
pub fn config_with_env(text: &str, upstream: SocketAddr, env: &[(&str, &str)]) -> Config {
    let text = text.replace("{upstream}", &upstream.to_string());
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    Config::from_str_with_env(&text, Path::new("test.toml"), &lookup)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the admin listener for a running proxy on 127.0.0.1:0.
pub async fn start_admin(proxy: &ProxyHandle, config_path: &Path) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = payload_guard::admin::Admin {
        proxy: proxy.proxy.clone(),
        config_path: config_path.to_path_buf(),
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    tokio::spawn(payload_guard::admin::serve_admin(
        listener,
        admin,
        std::future::pending(),
    ));
    addr
}

/// A simple request to the admin listener.
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    send(addr, req.body(full(Bytes::new())).unwrap()).await
}

/// Starts the proxy in-process on 127.0.0.1:0.
pub async fn start_proxy(mut config: Config) -> ProxyHandle {
    if config.incidents.path == std::path::Path::new("incidents.jsonl") {
        // Keep test incident logs (and the state files beside them) out of the work tree,
        // one folder per proxy so tests never share learned limits.
        let dir = std::env::temp_dir().join(format!("pg-it-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        config.incidents.path = dir.join("incidents.jsonl");
    }
    let incidents = config.incidents.path.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::start(config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = proxy.clone();
    let done = tokio::spawn(payload_guard::server::serve(listener, served, async move {
        let _ = stopped.await;
    }));
    ProxyHandle {
        addr,
        proxy,
        incidents,
        stop: Some(stop),
        done: Some(done),
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A loopback address nothing listens on (yet).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A config with one route `/hooks/test` to the receiver, plus extra route keys.
pub fn one_route(extra_route_keys: &str, server_keys: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server_keys}

[[routes]]
name = "test"
path_prefix = "/hooks/test"
upstream = "http://{{upstream}}/webhook"
{extra_route_keys}
"#
    )
}

/// The body type tests send.
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A streamed request body fed through a channel.
pub fn channel_body() -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, TestBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, StreamBody::new(ReceiverStream(rx)).boxed())
}

struct ReceiverStream<T>(mpsc::Receiver<T>);
impl<T> futures_util::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one request on a new HTTP/1.1 connection and reads the whole response.
pub async fn send(addr: SocketAddr, req: Request<TestBody>) -> Got {
    let mut sender = http1_sender(addr).await;
    let resp = sender.send_request(req).await.expect("request failed");
    read(resp).await
}

/// An HTTP/1.1 connection to `addr`, for tests that send several requests over one connection.
pub async fn http1_sender(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// POSTs `body` to `/hooks/test` on `sender`'s connection (waiting until it is ready) and
/// reads the whole response.
pub async fn post_on(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    proxy: &ProxyHandle,
    body: impl Into<Bytes>,
) -> Got {
    sender
        .ready()
        .await
        .expect("the proxy closed the sender's connection");
    let req = Request::post(proxy.url("/hooks/test"))
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap();
    read(sender.send_request(req).await.expect("request failed")).await
}

/// Sends one request over HTTP/2 prior knowledge (h2c).
pub async fn send_h2(addr: SocketAddr, req: Request<TestBody>) -> Got {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("h2 request failed");
    read(resp).await
}

pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Writes raw bytes on a new connection and reads until the proxy closes it (or 20 s pass).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_close(&mut stream).await
}

pub async fn read_until_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON payload of about `size` bytes, Synthflow-shaped (call.transcript carries the bulk).
pub fn payload(size: usize) -> Vec<u8> {
    let head = br#"{"status":"completed","call":{"call_id":"1732630000000x222222222222222222","transcript":""#;
    let tail = br#""},"analysis":{"call_flow":"partial"}}"#;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head);
    let line = "\\nbot: Thanks for calling, caf\\u00e9 hours are 9 to 5 \u{2014} anything else?\\nhuman: No, that's all.";
    while out.len() + line.len() + tail.len() < size {
        out.extend_from_slice(line.as_bytes());
    }
    while out.len() + tail.len() < size {
        out.push(b'x');
    }
    out.extend_from_slice(tail);
    out
}

/// Whether the tests run under CI (`CI=true`, as GitHub Actions, GitLab and `.ci/run` set it):
/// a missing real component is then a failure instead of a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// What to do about a real component a test needs (nginx, Werkzeug, Express, PostgreSQL,
/// Chromium): the component when `found`; else, outside CI, `None` after one line on stderr
/// (`skipped: nginx not installed; apt-get install -y nginx-light`) so the test returns early
/// and passes; under `CI=true`, a panic with the same words.
///
/// ```ignore
/// let Some(nginx) = require_component("nginx", "apt-get install -y nginx-light",
///     find_program(&["nginx", "/usr/sbin/nginx"])) else { return };
/// ```
#[track_caller]
pub fn require_component<T>(what: &str, install: &str, found: Option<T>) -> Option<T> {
    match missing_component(in_ci(), what, install, found.is_some()) {
        ComponentVerdict::Run => found,
        ComponentVerdict::Skip(line) => {
            print_skip(&line);
            None
        }
        ComponentVerdict::Fail(line) => panic!("{line} (CI=true: a missing component fails)"),
    }
}

/// Prints a skip line (`skipped: ...`) where the person running `cargo test` sees it: straight
/// to the process's stderr, because libtest captures `println!`/`eprintln!` of passing tests
/// and a skip nobody sees is a silent drop. The test's name comes first.
pub fn print_skip(line: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "{test}: {line}");
}

/// The decision of [`require_component`], pure so both outcomes are tested.
#[derive(Debug, PartialEq, Eq)]
pub enum ComponentVerdict {
    Run,
    Skip(String),
    Fail(String),
}

pub fn missing_component(ci: bool, what: &str, install: &str, found: bool) -> ComponentVerdict {
    let line = format!("skipped: {what} not installed; {install}");
    match (found, ci) {
        (true, _) => ComponentVerdict::Run,
        (false, false) => ComponentVerdict::Skip(line),
        (false, true) => ComponentVerdict::Fail(line),
    }
}

/// The first of `candidates` that is an executable: an absolute path as is, a bare name
/// looked up on `PATH`.
pub fn find_program(candidates: &[&str]) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates.iter().find_map(|c| {
        let c = Path::new(c);
        if c.is_absolute() {
            return executable(c).then(|| c.to_path_buf());
        }
        std::env::split_paths(&path)
            .map(|dir| dir.join(c))
            .find(|p| executable(p))
    })
}

/// `python3`'s path when it can import `module` (e.g. `werkzeug`).
pub fn python_with_module(module: &str) -> Option<std::path::PathBuf> {
    let python = find_program(&["python3"])?;
    let imports = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    imports.then_some(python)
}

/// The `payload-guard` binary the tests start: the one `cargo test` built, or the one named by
/// `PAYLOAD_GUARD_BIN` (`.ci/run` points it at the release build, the binary users run, and
/// runs the binary's tests again).
pub fn binary() -> std::path::PathBuf {
    std::env::var_os("PAYLOAD_GUARD_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_payload-guard").into())
}

/// A binary a test started and runs until it stops it. If the test ends first (a failed
/// assertion), the binary is killed and reaped on drop: left running, it would keep the test
/// process's inherited stdout open, and whatever reads that to its end (CI's log) would wait
/// for it. Derefs to the [`std::process::Child`].
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Both are no-ops for a child already waited for (std keeps its status).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM to a running binary (the signal must be delivered) and waits for it to exit,
/// off the async runtime.
pub async fn sigterm_and_wait(mut child: ChildGuard) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {}: {sent:?}", child.id());
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

#[cfg(test)]
mod component_tests {
    use super::*;

    #[test]
    fn a_missing_component_skips_outside_ci_and_fails_under_ci() {
        let skip = "skipped: nginx not installed; apt-get install -y nginx-light".to_string();
        let cases = [
            (false, true, ComponentVerdict::Run),
            (true, true, ComponentVerdict::Run),
            (false, false, ComponentVerdict::Skip(skip.clone())),
            (true, false, ComponentVerdict::Fail(skip)),
        ];
        for (ci, found, want) in cases {
            let got = missing_component(ci, "nginx", "apt-get install -y nginx-light", found);
            assert_eq!(got, want, "ci={ci} found={found}");
        }
    }

    /// Run only as a child of the test below (`--ignored`), with or without `CI`.
    #[test]
    #[ignore = "run by a_missing_component_prints_one_line_or_fails_the_run"]
    fn needs_a_component_that_is_never_installed() {
        let Some(()) =
            require_component("frobnicator", "apt-get install -y frobnicator", None::<()>)
        else {
            return;
        };
        unreachable!("the component is never found");
    }

    #[test]
    fn a_missing_component_prints_one_line_or_fails_the_run() {
        let run = |ci: Option<&str>| {
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--ignored",
                "--exact",
                "support::component_tests::needs_a_component_that_is_never_installed",
            ]);
            match ci {
                Some(v) => cmd.env("CI", v),
                None => cmd.env_remove("CI"),
            };
            cmd.output().unwrap()
        };
        let line = "skipped: frobnicator not installed; apt-get install -y frobnicator";
        let skipped = run(None);
        let stderr = String::from_utf8_lossy(&skipped.stderr);
        assert!(skipped.status.success(), "{stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.contains(line)).count(),
            1,
            "one skip line expected: {stderr}"
        );
        let failed = run(Some("true"));
        let out = String::from_utf8_lossy(&failed.stdout);
        assert!(!failed.status.success(), "{out}");
        assert!(out.contains(line) && out.contains("CI=true"), "{out}");
    }
}
