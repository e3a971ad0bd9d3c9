//! A minimal webhook receiver for the load benchmark (`benches/load/`): reads the whole request
//! body, counts it, and answers `200`. Optionally refuses large bodies with `413` the way real
//! receivers do.
//!
//! ```text
//! bench_receiver --listen 127.0.0.1:PORT [--limit BYTES] [--early-close] [--linger-ms MS]
//!                [--mode MODE] [--threads N]
//! ```
//!
//! - `--listen ADDR`: the address to bind (default `127.0.0.1:0`). `listening ADDR` is printed on
//!   stdout once the socket is bound.
//! - `--limit BYTES`: bodies over this get `413`. A `Content-Length` over the limit is answered at
//!   once, before any body byte is read; a chunked body is answered as soon as the bytes read
//!   pass the limit. The rest of the body is then read and discarded in the background so the
//!   connection stays usable (a polite receiver).
//! - `--early-close`: like nginx's `client_max_body_size`: the `413` carries
//!   `Connection: close`, the body is not read, and once the response is written the write side
//!   is shut down and whatever the sender still sends is discarded for up to `--linger-ms`
//!   without data (nginx's `lingering_timeout`, default 5000; `0` closes at once, which makes
//!   the kernel answer the unread bytes with a reset). Implies nothing without `--limit`.
//! - `--mode reset-413`: a receiver that refuses from the request head alone and resets (the
//!   "receiver (a)" of issue #17; many frameworks behave like this). The request head is read
//!   on the raw socket; a body that is chunked or whose `Content-Length` is over `--limit`
//!   (every body without `--limit`) is answered at once with `HTTP/1.1 413`, a small JSON body
//!   (`{"error":"payload_too_large","limit":N,"receiver":"reset-413"}`) and
//!   `Connection: close`, and the socket is closed right after the write: no body byte is read
//!   on purpose (at most what arrived with the head), no shutdown, no lingering, so the kernel
//!   answers the unread bytes with a reset. Bodies within the limit are read and answered `200`
//!   as usual. `--early-close` and `--linger-ms` do not apply. The default mode is `normal`
//!   (hyper, as described above).
//! - `--threads N`: worker threads (default: a single-threaded runtime).
//!
//! Response bodies are a few bytes of JSON; `200` answers report the bytes read.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
struct Opts {
    listen: SocketAddr,
    limit: Option<u64>,
    early_close: bool,
    linger: Duration,
    mode: Mode,
    threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// hyper's HTTP/1 server: `--limit`, `--early-close`, `--linger-ms` as documented.
    Normal,
    /// Refuse from the request head with 413 and close at once, body unread (a reset).
    Reset413,
}

const USAGE: &str = "usage: bench_receiver [--listen 127.0.0.1:PORT] [--limit BYTES] \
                     [--early-close] [--linger-ms MS] [--mode normal|reset-413] [--threads N]";

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts {
        listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        limit: None,
        early_close: false,
        linger: Duration::from_millis(5000),
        mode: Mode::Normal,
        threads: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                opts.listen = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
            }
            "--limit" => {
                let v = value("--limit")?;
                opts.limit =
                    Some(parse_bytes(&v).ok_or_else(|| format!("--limit {v}: not a size"))?);
            }
            "--early-close" => opts.early_close = true,
            "--linger-ms" => {
                let v = value("--linger-ms")?;
                let ms: u64 = v.parse().map_err(|e| format!("--linger-ms {v}: {e}"))?;
                opts.linger = Duration::from_millis(ms);
            }
            "--mode" => {
                let v = value("--mode")?;
                opts.mode = match v.as_str() {
                    "normal" => Mode::Normal,
                    "reset-413" => Mode::Reset413,
                    _ => return Err(format!("--mode {v}: expected normal or reset-413")),
                };
            }
            "--threads" => {
                let v = value("--threads")?;
                opts.threads = v.parse().map_err(|e| format!("--threads {v}: {e}"))?;
                if opts.threads == 0 {
                    return Err("--threads must be at least 1".into());
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// `1048576`, `1MiB`, `1M`, `512KiB`, `512k`.
fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn main() {
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(err) => {
            eprintln!("bench_receiver: {err}");
            std::process::exit(64);
        }
    };
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bench_receiver: cannot start the runtime: {err}");
            std::process::exit(2);
        }
    };
    if let Err(err) = runtime.block_on(serve(opts)) {
        eprintln!("bench_receiver: {err}");
        std::process::exit(2);
    }
}

async fn serve(opts: Opts) -> std::io::Result<()> {
    let listener = TcpListener::bind(opts.listen).await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let opts = Arc::new(opts);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("bench_receiver: accept: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match opts.mode {
            Mode::Normal => tokio::spawn(connection(stream, opts.clone())),
            Mode::Reset413 => tokio::spawn(reset_413(stream, opts.clone())),
        };
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

async fn connection(stream: TcpStream, opts: Arc<Opts>) {
    let svc_opts = opts.clone();
    let service = service_fn(move |req: Request<Incoming>| -> Answer {
        Box::pin(handle(req, svc_opts.clone()))
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .without_shutdown();
    let Ok(parts) = conn.await else {
        return;
    };
    let mut stream = parts.io.into_inner();
    if opts.early_close && !opts.linger.is_zero() {
        // nginx's lingering close: stop writing, then read and discard what the sender still
        // sends until it stops or pauses for `linger`, so that the response is not destroyed
        // by a reset answering unread bytes.
        let _ = stream.shutdown().await;
        let mut sink = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let read = tokio::time::timeout(opts.linger, stream.read(&mut sink));
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Ok(Ok(n))) if n > 0 => continue,
                _ => break,
            }
        }
    }
    // Dropping the stream closes it (with a reset if unread bytes remain).
}

fn answer(status: StatusCode, body: String, close: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if close {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

fn too_large(limit: u64, body: Incoming, opts: &Opts) -> Response<Full<Bytes>> {
    let text = format!("{{\"error\":\"payload_too_large\",\"limit\":{limit}}}\n");
    if opts.early_close {
        // Not read: hyper gives up on the body and closes after the response.
        drop(body);
        answer(StatusCode::PAYLOAD_TOO_LARGE, text, true)
    } else {
        // Keep the connection: read the rest and throw it away while the answer goes out.
        tokio::spawn(async move {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        });
        answer(StatusCode::PAYLOAD_TOO_LARGE, text, false)
    }
}

async fn handle(
    req: Request<Incoming>,
    opts: Arc<Opts>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body = req.into_body();
    if let (Some(limit), Some(size)) = (opts.limit, declared)
        && size > limit
    {
        return Ok(too_large(limit, body, &opts));
    }
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                    if let Some(limit) = opts.limit
                        && read > limit
                    {
                        return Ok(too_large(limit, body, &opts));
                    }
                }
            }
            Err(_) => {
                return Ok(answer(
                    StatusCode::BAD_REQUEST,
                    "{\"error\":\"body\"}\n".into(),
                    true,
                ));
            }
        }
    }
    Ok(answer(
        StatusCode::OK,
        format!("{{\"ok\":true,\"bytes\":{read}}}\n"),
        false,
    ))
}

/// The largest request head `--mode reset-413` accepts.
const MAX_HEAD: usize = 64 * 1024;

/// `--mode reset-413`: one connection on the raw socket. Requests whose body fits are read and
/// answered `200` (keep-alive); the first one that does not is answered `413` from its head and
/// the socket is dropped with the body unread, so the kernel resets the connection.
async fn reset_413(mut stream: TcpStream, opts: Arc<Opts>) {
    let limit = opts.limit.unwrap_or(0);
    // Small reads: besides the head, at most this much body is taken off the socket.
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen: Vec<u8> = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if seen.len() > MAX_HEAD {
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
        let mut length: Option<u64> = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                match name.trim() {
                    "content-length" => length = value.trim().parse().ok(),
                    "transfer-encoding" => chunked |= value.contains("chunked"),
                    _ => {}
                }
            }
        }
        let length = length.unwrap_or(0);
        if chunked || length > limit {
            let text = format!(
                "{{\"error\":\"payload_too_large\",\"limit\":{limit},\"receiver\":\"reset-413\"}}\n"
            );
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            // Dropped at once with the body unread: the kernel answers with a reset.
            return;
        }
        // A body within the limit: read it all, answer 200, keep the connection.
        let want = head_end as u64 + length;
        while (seen.len() as u64) < want {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        seen.drain(..want as usize);
        let text = format!("{{\"ok\":true,\"bytes\":{length}}}\n");
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
