//! The upstream side: refused and slow receivers, and an https receiver behind a private CA.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::support::*;

#[tokio::test]
async fn refused_upstream_gets_502() {
    // A port that was just free: nothing listens there.
    let free = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(config(&one_route("", ""), free)).await;
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 502, "{:?}", got.body);
    assert_eq!(got.json()["error"], "upstream_connect_failed");
    assert_eq!(
        got.json()["message"],
        format!(
            "upstream connection failed: cannot connect to the receiver at {free}: connection refused (is the receiver running?)"
        ),
        "plain words, no client internals"
    );
}

#[tokio::test]
async fn connect_timeout_gets_504() {
    // A listener with a full accept backlog that never accepts: further SYNs are dropped, so
    // a connect hangs (on loopback) until the proxy's connect_timeout.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = start_proxy(config(&one_route("connect_timeout = \"300ms\"", ""), addr)).await;
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 504, "{:?}", got.body);
    assert_eq!(got.json()["error"], "upstream_connect_timeout");
    drop(listener);
}

#[tokio::test]
async fn response_timeout_gets_504() {
    let mut receiver = Receiver::start(Behavior::Hang).await;
    let proxy = start_proxy(config(
        &one_route("response_timeout = \"300ms\"", ""),
        receiver.addr,
    ))
    .await;
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"], "upstream_response_timeout");
    assert_eq!(receiver.next().await.body.unwrap(), "{}");
}

/// The answer's deadline starts when the body is complete: a receiver that takes longer than
/// `body_timeout` to answer, but less than `response_timeout`, is waited for.
#[tokio::test]
async fn the_answer_may_take_longer_than_the_body_timeout() {
    let mut receiver = Receiver::start(Behavior::Slow(Duration::from_millis(700))).await;
    let proxy = start_proxy(config(
        &one_route("response_timeout = \"10s\"", "body_timeout = \"300ms\""),
        receiver.addr,
    ))
    .await;
    let got = proxy.post_json("{\"a\":1}").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(receiver.next().await.body.unwrap(), "{\"a\":1}");
}

#[tokio::test]
async fn receiver_that_resets_mid_response_gets_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                .await;
            drop(stream);
        }
    });
    let proxy = start_proxy(config(&one_route("", ""), addr)).await;
    // Headers arrived, but the answer broke off before its end: the proxy read it whole
    // before relaying, so the sender gets a clear 502 instead of a truncated 200.
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"], "upstream_failed");
    assert!(
        got.json()["message"]
            .as_str()
            .unwrap()
            .contains("broke off after 7 bytes"),
        "{:?}",
        got.json()
    );

    // A receiver that closes before any response: 502.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            drop(stream);
        }
    });
    let proxy = start_proxy(config(&one_route("", ""), addr)).await;
    let got = proxy.post("{}").await;
    assert_eq!(got.status, 502);
    assert_eq!(
        got.json()["error"],
        "upstream_reset",
        "closed without an answer"
    );
}

#[tokio::test]
async fn a_kept_alive_upstream_connection_the_receiver_closed_is_replaced() {
    // A receiver that answers one request per connection without `Connection: close` and then
    // closes the connection, as idle timeouts on real receivers do.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel::<usize>();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            n += 1;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers plus the 2-byte body.
            let complete = |got: &[u8]| {
                got.windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_some_and(|end| got.len() >= end + 4 + 2)
            };
            while !complete(&got) {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = stream.shutdown().await;
            drop(stream);
            let _ = closed_tx.send(n);
        }
    });
    let proxy = start_proxy(config(&one_route("", ""), addr)).await;
    let mut sender = http1_sender(proxy.addr).await;
    for round in 1..=3 {
        let got = post_on(&mut sender, &proxy, "{}").await;
        assert_eq!(got.status, 200, "round {round}: {:?}", got.body);
        assert_eq!(got.body, "ok");
        // The receiver has closed that connection before the next request is sent.
        assert_eq!(closed.recv().await, Some(round));
    }
}

/// A private CA and a certificate for 127.0.0.1 signed by it.
fn private_ca() -> (
    String,
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "payload-guard test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (
        ca.pem(),
        leaf.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
}

#[tokio::test]
async fn https_upstream_with_private_ca_and_h2_by_alpn() {
    let (ca_pem, cert, key) = private_ca();
    let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    server_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let version = req.version();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send((version, body));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"secure"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let text = format!(
        r#"
[[routes]]
name = "tls"
path_prefix = "/hooks/tls"
upstream = "https://{addr}/secure"
ca_file = "{}"
"#,
        ca_file.display()
    );
    let proxy = start_proxy(config(&text, addr)).await;
    let body = payload(100_000);
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/tls"))
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.body, "secure");
    let (version, seen) = rx.recv().await.unwrap();
    assert_eq!(
        version,
        http::Version::HTTP_2,
        "ALPN offered h2, so the upstream leg uses it"
    );
    assert_eq!(seen, body);

    // Without the CA the certificate is not trusted: 502, nothing forwarded.
    let untrusted = text.replace(&format!("ca_file = \"{}\"", ca_file.display()), "");
    let proxy = start_proxy(config(&untrusted, addr)).await;
    let got = send(
        proxy.addr,
        Request::post(proxy.url("/hooks/tls"))
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 502);
    assert!(rx.try_recv().is_err());
}
