//! The floor under payload-guard's CPU per request in the load benchmark (`benches/load/`): the
//! least a reverse proxy built on hyper can do, and nothing more.
//!
//! ```text
//! bare_hyper_proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
//! ```
//!
//! One thread (a current-thread tokio runtime, like payload-guard with `worker_threads = 1`),
//! the same allocator as the proxy (mimalloc), hyper's HTTP/1 server on the sender's side and
//! hyper's HTTP/1 client on the receiver's, one upstream connection per sender connection (as
//! payload-guard keeps them), request and response bodies streamed through untouched. It adds
//! no header, checks nothing, logs nothing, counts nothing and has no timeouts: what it costs is
//! what hyper and tokio cost. `listening ADDR` is printed on stdout once the socket is bound.
//!
//! Not a product: a failed upstream exchange is answered `502` with an empty body, and the
//! connection to the receiver is not reopened after it fails.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: payload_guard::alloc::Mimalloc = payload_guard::alloc::Mimalloc;

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let mut upstream: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage("bad --listen")),
            "--upstream" => {
                upstream = Some(value.parse().unwrap_or_else(|_| usage("bad --upstream")))
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let upstream = upstream.unwrap_or_else(|| usage("--upstream is required"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(listen, upstream));
}

fn usage(problem: &str) -> ! {
    eprintln!("bare_hyper_proxy: {problem}\nusage: bare_hyper_proxy --listen ADDR --upstream ADDR");
    std::process::exit(64);
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    println!(
        "listening {}",
        listener.local_addr().expect("local address")
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // The connection to the receiver, opened with the first request.
            let sender: Arc<Mutex<Option<Upstream>>> = Arc::new(Mutex::new(None));
            let service = service_fn(move |req: Request<Incoming>| {
                let sender = sender.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(&sender, upstream, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    sender: &Mutex<Option<Upstream>>,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut slot = sender.lock().await;
    if slot.is_none() {
        *slot = connect(upstream).await;
    }
    let Some(send) = slot.as_mut() else {
        return bad_gateway();
    };
    if send.ready().await.is_err() {
        *slot = None;
        return bad_gateway();
    }
    let answer = send.send_request(req);
    drop(slot);
    match answer.await {
        Ok(response) => response.map(|body| body.boxed()),
        Err(_) => bad_gateway(),
    }
}

async fn connect(upstream: SocketAddr) -> Option<Upstream> {
    let stream = TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
