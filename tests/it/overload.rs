//! Shedding, not queueing: slow senders filling the connection cap do not lock out a
//! legitimate sender. Loopback aliases (127.0.0.2, 127.0.0.3, ...) stand for distinct clients;
//! everything stays on loopback and is bounded in count and time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::refusals::{Logs, metric};
use crate::support::*;

/// Slow connections in each attack.
const SLOW: usize = 350;
/// The acceptance bound for each legitimate request (the figures are in benches/overload/).
const LEGIT_BOUND: Duration = Duration::from_millis(500);

async fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    socket.connect(to).await
}

/// One slow sender: declares 1000 bytes, sends one byte at once and one every 2 s. Reports
/// once its second byte is out (or the proxy refused or closed it), then trickles on until
/// the proxy closes the connection or the test ends.
async fn slow_sender(ip: Ipv4Addr, to: SocketAddr, ready: mpsc::Sender<()>) {
    let Ok(mut stream) = connect_from(ip, to).await else {
        let _ = ready.send(()).await;
        return;
    };
    let head = b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{";
    let mut sent = 0;
    let mut reported = false;
    let mut buf = [0u8; 1024];
    if stream.write_all(head).await.is_ok() {
        sent = 1;
    }
    while sent > 0 && sent < 1000 {
        tokio::select! {
            read = stream.read(&mut buf) => {
                // Any answer (503, 408) or a close ends this sender.
                let _ = read;
                break;
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                if stream.write_all(b" ").await.is_err() {
                    break;
                }
                sent += 1;
                if !reported {
                    reported = true;
                    let _ = ready.send(()).await;
                }
            }
        }
    }
    if !reported {
        let _ = ready.send(()).await;
    }
}

/// Runs the attack from `addresses`, then 20 legitimate requests from 127.0.0.1 on new
/// connections; returns the proxy for the counters.
async fn attack_then_legit(addresses: &[Ipv4Addr], logs: &Logs) -> ProxyHandle {
    let receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(
        &one_route("", "max_connections = 300\nbody_timeout = \"10s\""),
        receiver.addr,
    ))
    .await;
    let (ready_tx, mut ready) = mpsc::channel(SLOW);
    let attackers: Vec<_> = (0..SLOW)
        .map(|i| {
            tokio::spawn(slow_sender(
                addresses[i % addresses.len()],
                proxy.addr,
                ready_tx.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    // The attack is established once every slow sender sent its second byte (or was refused).
    for _ in 0..SLOW {
        tokio::time::timeout(Duration::from_secs(30), ready.recv())
            .await
            .expect("the slow senders did not get going")
            .expect("a slow sender vanished");
    }
    for i in 0..20 {
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(15), proxy.post_json("{\"ok\":1}"))
            .await
            .unwrap_or_else(|_| panic!("legitimate request {i} was not answered"));
        let took = started.elapsed();
        assert_eq!(
            got.status,
            200,
            "legitimate request {i}: {:?}; log:\n{:?}",
            got.body,
            logs.access_with_error("over_capacity").len()
        );
        assert!(
            took < LEGIT_BOUND,
            "legitimate request {i} took {took:?} (bound {LEGIT_BOUND:?})"
        );
    }
    for attacker in attackers {
        attacker.abort();
    }
    proxy
}

#[tokio::test]
async fn slow_senders_from_one_address_are_held_to_the_per_ip_cap() {
    let (logs, _guard) = Logs::capture();
    let proxy = attack_then_legit(&[Ipv4Addr::new(127, 0, 0, 2)], &logs).await;
    let per_ip = metric(
        &proxy,
        "payload_guard_connections_shed_total",
        &[("reason", "per_ip_limit")],
    );
    assert_eq!(per_ip, (SLOW - 64) as f64, "all but 64 refused at once");
    let line = logs.wait_for_access("per_ip_limit").await;
    assert_eq!(line["fields"]["status"], 503, "{line}");
    assert_eq!(line["fields"]["peer"], "127.0.0.2", "{line}");
}

#[tokio::test]
async fn slow_senders_over_ten_addresses_are_evicted_to_make_room() {
    let (logs, _guard) = Logs::capture();
    let addresses: Vec<Ipv4Addr> = (2..12).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let proxy = attack_then_legit(&addresses, &logs).await;
    let shed = |reason| {
        metric(
            &proxy,
            "payload_guard_connections_shed_total",
            &[("reason", reason)],
        )
    };
    eprintln!(
        "{}",
        [
            "over_capacity",
            "evict_slow_body",
            "evict_slow_head",
            "evict_idle",
            "below_min_rate",
            "pressure_timeout"
        ]
        .map(|r| format!("{r}={}", shed(r)))
        .join(" ")
    );
    // The 50 past the cap were refused, or made room by evicting a slow body once the bodies
    // fell behind; the legitimate sender made room at least once.
    assert!(
        shed("evict_slow_body") >= 1.0,
        "a slow body made room for the legitimate sender"
    );
    assert!(shed("over_capacity") + shed("evict_slow_body") + shed("evict_slow_head") >= 51.0);
    assert_eq!(shed("per_ip_limit"), 0.0);
    // The evicted senders got 408 body_too_slow.
    let line = logs.wait_for_access("body_too_slow").await;
    assert_eq!(line["fields"]["status"], 408, "{line}");
    assert!(
        metric(
            &proxy,
            "payload_guard_errors_total",
            &[("route", "test"), ("error", "body_too_slow")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn at_the_cap_a_busy_healthy_connection_means_503_at_once() {
    let (logs, _guard) = Logs::capture();
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let proxy = start_proxy(config(&one_route("", "max_connections = 1"), receiver.addr)).await;
    // One request whose receiver has not answered yet... the receiver answers at once, so
    // hold the connection busy with a body that keeps up instead.
    let (tx, body) = channel_body();
    let req = http::Request::post(proxy.url("/hooks/test"))
        .body(body)
        .unwrap();
    let addr = proxy.addr;
    let busy = tokio::spawn(async move { send(addr, req).await });
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"{\"a\":",
    ))))
    .await
    .unwrap();
    while receiver.started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let response = raw_exchange(
        proxy.addr,
        b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("retry-after: 1"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert!(response.contains("over_capacity"), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    // An HTTP/2 (prior knowledge) sender gets the server preface and a GOAWAY instead.
    let mut h2 = TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut frames = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), h2.read_to_end(&mut frames)).await;
    assert_eq!(frames.get(3), Some(&0x4), "SETTINGS first: {frames:?}");
    assert_eq!(frames.get(9 + 3), Some(&0x7), "then GOAWAY: {frames:?}");
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"1}"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(busy.await.unwrap().status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), "{\"a\":1}");
    let line = logs.wait_for_access("over_capacity").await;
    assert_eq!(line["fields"]["status"], 503, "{line}");
}

#[tokio::test]
async fn under_pressure_idle_connections_go_at_a_fifth_of_the_header_timeout() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    // 4 open connections are over 80% of 4: pressure. header_read_timeout 10s shrinks to 2s.
    let proxy = start_proxy(config(
        &one_route("", "max_connections = 4\nheader_read_timeout = \"10s\""),
        receiver.addr,
    ))
    .await;
    let request = b"POST /hooks/test HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        receiver.next().await;
        idle.push(stream);
    }
    // The keep-alive connections idle longest are closed by the pressure rule (well before
    // hyper's own 10 s header timeout), until the proxy is out of pressure.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(8), idle[0].read(&mut buf))
        .await
        .expect("an idle connection under pressure was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        metric(
            &proxy,
            "payload_guard_connections_shed_total",
            &[("reason", "pressure_timeout")]
        ) >= 1.0
    );
}
