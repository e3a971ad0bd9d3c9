//! A real Flask/Werkzeug receiver with `MAX_CONTENT_LENGTH`: its 413 reaches the sender and is
//! fingerprinted as `werkzeug` (`.ci/run` installs Werkzeug with pip when it is missing).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::support::*;

/// The receiver: Werkzeug's dev server with a 1 MiB request limit, as Flask sets it.
const APP: &str = r#"
import sys
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

class LimitedRequest(Request):
    max_content_length = 1024 * 1024  # Flask's MAX_CONTENT_LENGTH

@LimitedRequest.application
def app(request):
    data = request.get_data()  # raises RequestEntityTooLarge over the limit
    return Response('{"received": %d}' % len(data), content_type="application/json")

server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"#;

struct Werkzeug {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Werkzeug {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the receiver; `None` (the test skips) when Werkzeug is not installed and CI is not set.
fn start_werkzeug() -> Option<Werkzeug> {
    let python = require_component(
        "Werkzeug",
        "pip install werkzeug (or apt-get install -y python3-werkzeug)",
        python_with_module("werkzeug"),
    )?;
    let mut child = Command::new(python)
        .args(["-c", APP])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start python3");
    // Ready signal: the server prints its port once it listens.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Werkzeug did not start (pip install werkzeug): {line:?}"));
    Some(Werkzeug {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child,
    })
}

#[tokio::test]
async fn werkzeug_413_is_relayed_and_fingerprinted() {
    let Some(werkzeug) = start_werkzeug() else {
        return;
    };
    let proxy = start_proxy(config(&one_route("", ""), werkzeug.addr)).await;
    let small = proxy.post_json(payload(1000)).await;
    assert_eq!(small.status, 200, "{:?}", small.body);
    assert_eq!(small.json()["received"], 1000);
    for attempt in 0..5 {
        let got = proxy.post_json(payload(2 * 1024 * 1024)).await;
        assert_eq!(got.status, 413, "attempt {attempt}: {:?}", got.body);
        assert!(String::from_utf8_lossy(&got.body).contains("Request Entity Too Large"));
    }
    let incidents = proxy.incidents().await;
    let u413: Vec<_> = incidents
        .iter()
        .filter(|i| i["kind"] == "upstream_413")
        .collect();
    assert_eq!(u413.len(), 5);
    assert!(
        u413.iter().all(|i| i["rejector"] == "werkzeug"),
        "{u413:#?}"
    );
}
