//! Interop with a real nginx in front of a receiver (`client_max_body_size 1m`, nginx's
//! default): bodies pass byte-identical, and nginx's own early 413 reaches the sender unchanged,
//! every time (nginx answers 413 while the body is still being sent; the proxy must relay that
//! response instead of reporting the interrupted upload as an upstream failure).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use tokio::net::TcpStream;

use crate::support::*;

/// A real nginx, stopped on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx's path, where installed.
pub fn nginx_binary() -> Option<std::path::PathBuf> {
    find_program(&[
        "nginx",
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ])
}

impl Nginx {
    /// Starts nginx on a free loopback port proxying to `backend`, with `extra` in the server
    /// block; `None` (the test skips) when nginx is not installed and CI is not set.
    pub async fn start(backend: SocketAddr, extra: &str) -> Option<Nginx> {
        let bin = require_component("nginx", "apt-get install -y nginx-light", nginx_binary())?;
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        {extra}
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Ready signal: nginx accepts connections (bounded wait).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(Nginx {
            addr,
            child,
            _dir: dir,
        })
    }
}

#[tokio::test]
async fn bodies_pass_byte_identical_through_nginx() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let Some(nginx) = Nginx::start(receiver.addr, "").await else {
        return;
    };
    let proxy = start_proxy(config(&one_route("", ""), nginx.addr)).await;
    for size in [10, 300_000, 1024 * 1024 - 100] {
        let body = payload(size);
        let got = proxy.post_json(body.clone()).await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(receiver.next().await.body.unwrap(), body);
    }
}

#[tokio::test]
async fn nginx_early_413_reaches_the_sender_every_time() {
    let receiver = Receiver::start(Behavior::Ok).await;
    let Some(nginx) = Nginx::start(receiver.addr, "").await else {
        return;
    };
    let proxy = start_proxy(config(&one_route("", ""), nginx.addr)).await;
    let big = Bytes::from(payload(5 * 1024 * 1024));
    for attempt in 0..20 {
        let got = proxy.post_json(big.clone()).await;
        assert_eq!(got.status, 413, "attempt {attempt}: {:?}", got.body);
        let body = String::from_utf8_lossy(&got.body);
        assert!(
            body.contains("413 Request Entity Too Large") && body.contains("nginx"),
            "attempt {attempt}: nginx's own body expected, got {body}"
        );
        assert!(got.headers["server"].to_str().unwrap().starts_with("nginx"));
    }
    // Chunked: nginx counts while reading and answers 413 mid-body.
    for attempt in 0..5 {
        let (tx, body) = channel_body();
        let addr = proxy.addr;
        let req = Request::post(proxy.url("/hooks/test")).body(body).unwrap();
        let client = tokio::spawn(async move { send(addr, req).await });
        let feeder = tokio::spawn(async move {
            for _ in 0..80 {
                if tx
                    .send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let got = client.await.unwrap();
        assert_eq!(got.status, 413, "chunked attempt {attempt}: {:?}", got.body);
        assert!(String::from_utf8_lossy(&got.body).contains("nginx"));
        feeder.abort();
    }
    assert_eq!(
        receiver.started.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
