//! The log a user gets from the binary: the INFO access line of each request is written while
//! the proxy runs (lines are gathered for at most 100 ms, not until exit), WARN lines at once,
//! and nothing is lost when the proxy stops.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::*;

/// Waits (bounded) for the next stderr line that contains `needle`.
fn line_with(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line with {needle:?}: {e}"),
        }
    }
}

/// POSTs `{}` to `path`.
async fn post_empty(addr: std::net::SocketAddr, path: &str) -> Got {
    send(
        addr,
        http::Request::post(format!("http://{addr}{path}"))
            .body(full(bytes::Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn access_lines_are_written_while_the_proxy_runs_and_none_is_lost_at_exit() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    // The second route's receiver is not running: a 502 and its WARN line.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"hook\"\npath_prefix = \"/hook\"\nupstream = \"http://{}/in\"\n\n[[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"http://{}/in\"\n",
        receiver.addr,
        free_addr()
    );
    let (child, lines, addr) = start_binary(&config, dir.path(), None, &[]);

    for n in 0..3 {
        let got = send(
            addr,
            http::Request::post(format!("http://{addr}/hook/{n}"))
                .header("content-type", "application/json")
                .body(full(bytes::Bytes::from(format!("{{\"n\":{n}}}"))))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200);
        assert_eq!(receiver.next().await.uri.path(), format!("/in/{n}"));
        // The line arrives while the proxy still runs.
        let line = line_with(&lines, "INFO access: request");
        assert!(
            line.contains(&format!("path=/hook/{n} "))
                && line.contains("status=200")
                && line.contains("outcome=\"complete\""),
            "{line}"
        );
        assert!(
            !line.contains('\x1b'),
            "no terminal colours in a file: {line}"
        );
    }

    let got = post_empty(addr, "/down/x").await;
    assert_eq!(got.status, 502);
    let warn = line_with(&lines, " WARN ");
    assert!(warn.contains("down"), "{warn}");

    // A last request, then SIGTERM: its access line is written before the process ends.
    let got = post_empty(addr, "/hook/last").await;
    assert_eq!(got.status, 200);
    // Stopped as a user would: `kill -TERM`.
    let rest = stop(child, lines).await;
    assert!(
        rest.iter()
            .any(|l| l.contains("INFO access: request") && l.contains("path=/hook/last ")),
        "the last access line is missing after exit:\n{}",
        rest.join("\n")
    );
}

/// A config with one route, `/hook` to `receiver`'s `/in`.
fn one_hook(receiver: std::net::SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"hook\"\npath_prefix = \"/hook\"\nupstream = \"http://{receiver}/in\"\n"
    )
}

/// Starts the binary on `config` with `RUST_LOG` = `rust_log` (unset: `None`) and the extra
/// arguments; its stderr lines and its address.
fn start_binary(
    config: &str,
    dir: &std::path::Path,
    rust_log: Option<&str>,
    args: &[&str],
) -> (
    crate::support::ChildGuard,
    mpsc::Receiver<String>,
    std::net::SocketAddr,
) {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(crate::support::binary());
    command.arg("--config").arg(&path).args(args);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = crate::support::ChildGuard(command.stderr(Stdio::piped()).spawn().unwrap());
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = line_with(&lines, "listen");
    let at = ready.find("127.0.0.1:").expect("the listen address");
    let addr = ready[at..]
        .split([' ', '"', ','])
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (child, lines, addr)
}

/// Stops the binary and returns the lines it wrote that were not read yet.
async fn stop(child: crate::support::ChildGuard, lines: mpsc::Receiver<String>) -> Vec<String> {
    let exit = crate::support::sigterm_and_wait(child).await;
    assert!(exit.success(), "{exit:?}");
    lines.iter().collect()
}

#[tokio::test]
async fn rust_log_filters_the_access_line_and_json_logs_carry_it_as_json() {
    let mut receiver = Receiver::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();

    // `access=off` silences the access line and nothing else.
    let (child, lines, addr) = start_binary(
        &one_hook(receiver.addr),
        dir.path(),
        Some("info,access=off"),
        &[],
    );
    assert_eq!(post_empty(addr, "/hook/quiet").await.status, 200);
    receiver.next().await;
    let rest = stop(child, lines).await;
    assert!(
        !rest.iter().any(|l| l.contains("access")),
        "access=off, yet:\n{}",
        rest.join("\n")
    );

    // JSON: one object per line, the access line's numbers as numbers.
    let (child, lines, addr) = start_binary(
        &one_hook(receiver.addr),
        dir.path(),
        Some("info"),
        &["--log-format", "json"],
    );
    assert_eq!(post_empty(addr, "/hook/json").await.status, 200);
    receiver.next().await;
    let line = line_with(&lines, "\"access\"");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["path"], "/hook/json");
    assert_eq!(v["status"], 200);
    assert_eq!(v["outcome"], "complete");
    assert!(v["duration_ms"].is_f64(), "{line}");
    stop(child, lines).await;
}
