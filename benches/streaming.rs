//! Streaming throughput and peak memory of the proxy binary.
//!
//! - `streaming/direct` vs `streaming/proxied`: a 64 MiB POST streamed to a receiver that
//!   discards it, straight and through `payload-guard` (release binary, child process), in the
//!   same run, so the ratio is meaningful on a noisy machine.
//! - `peak_rss`: a 1 GiB chunked upload through a route with `max_body = "2GiB"`; prints the
//!   proxy's peak RSS (VmHWM from /proc) — the budget is 64 MiB.
//!
//! Run: `cargo bench --bench streaming`.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

/// A receiver that reads and discards every body.
async fn discard_receiver() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut body = req.into_body();
                    let mut n = 0usize;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.map(|f| f.into_data()) {
                            n += data.map(|d| d.len()).unwrap_or(0);
                        } else {
                            break;
                        }
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(n.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Streams `total` bytes (chunked) to `addr` and returns the response status.
async fn upload(addr: SocketAddr, path: &str, total: usize) -> u16 {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let frames = (0..total.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(total - i * CHUNK);
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("http://{addr}{path}"))
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// The release proxy binary as a child process, with its listen address.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(upstream: SocketAddr, max_body: &str) -> ProxyProcess {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nname = \"bench\"\npath_prefix = \"/up\"\nupstream = \"http://{upstream}/\"\nmax_body = \"{max_body}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_payload-guard"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn,payload_guard::server=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("proxy exited").unwrap();
        if let Some(pos) = line.find("listen=") {
            let rest = &line[pos + 7..];
            let end = rest.find(' ').unwrap_or(rest.len());
            break rest[..end].parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    ProxyProcess {
        child,
        addr,
        _dir: dir,
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = rt.block_on(discard_receiver());
    let proxy = start_proxy(receiver, "2GiB");

    let mut c = Criterion::default().configure_from_args();
    let total = 64 * 1024 * 1024;
    let mut group = c.benchmark_group("streaming");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("direct", |b| {
        b.iter(|| assert_eq!(rt.block_on(upload(receiver, "/", total)), 200))
    });
    group.bench_function("proxied", |b| {
        b.iter(|| assert_eq!(rt.block_on(upload(proxy.addr, "/up", total)), 200))
    });
    group.finish();

    // Peak memory for a 1 GiB streamed upload, in a fresh proxy process.
    let fresh = start_proxy(receiver, "2GiB");
    let gib = 1024 * 1024 * 1024;
    let started = std::time::Instant::now();
    assert_eq!(rt.block_on(upload(fresh.addr, "/up", gib)), 200);
    let elapsed = started.elapsed();
    let hwm = vm_hwm_kib(fresh.child.id());
    println!(
        "peak_rss: 1 GiB streamed upload through the proxy in {:.2}s ({:.0} MiB/s); proxy VmHWM = {:.1} MiB (budget 64 MiB)",
        elapsed.as_secs_f64(),
        1024.0 / elapsed.as_secs_f64(),
        hwm as f64 / 1024.0
    );
    assert!(
        hwm < 64 * 1024,
        "peak RSS {hwm} KiB is over the 64 MiB budget"
    );
    c.final_summary();
}
