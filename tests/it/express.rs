//! A real Express receiver (`express.json({ limit })`, body-parser's 413s), installed with npm
//! into a folder the tests own and started on 127.0.0.1:0. It reports every request it saw
//! (status, the bytes body-parser counted, their SHA-256, the call id, the idempotency key).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;

/// What the Express receiver saw of one request.
#[derive(Debug, Clone, Deserialize)]
pub struct Seen {
    /// The status it answered.
    pub status: u16,
    /// Decoded body bytes (what body-parser counts), for accepted requests.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// SHA-256 (hex) of the decoded body, for accepted requests.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `call.call_id` of the parsed JSON.
    #[serde(default)]
    pub call_id: Option<String>,
    /// The `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// `Content-Encoding`.
    #[serde(default)]
    pub encoding: Option<String>,
    /// `Payload-Guard-Trimmed`, when the proxy trimmed the payload.
    #[serde(default)]
    pub trimmed: Option<String>,
    /// `Host`, as Express received it.
    #[serde(default)]
    pub host: Option<String>,
    /// `X-Forwarded-Host`.
    #[serde(default)]
    pub forwarded_host: Option<String>,
    /// `X-Forwarded-For`.
    #[serde(default)]
    pub forwarded_for: Option<String>,
}

const SERVER_JS: &str = r#"
const express = require(require('path').join(process.env.EXPRESS_DIR, 'node_modules', 'express'));
const crypto = require('crypto');
const app = express();
const report = (o) => process.stdout.write('SEEN ' + JSON.stringify(o) + '\n');
const common = (req) => ({
  encoding: req.headers['content-encoding'] || null,
  idempotency_key: req.headers['idempotency-key'] || null,
  trimmed: req.headers['payload-guard-trimmed'] || null,
  host: req.headers['host'] || null,
  forwarded_host: req.headers['x-forwarded-host'] || null,
  forwarded_for: req.headers['x-forwarded-for'] || null,
});
app.post('*', express.json({ limit: process.env.LIMIT, verify: (req, res, buf) => { req.raw = buf; } }), (req, res) => {
  const call = req.body && req.body.call;
  report(Object.assign({ status: 200, bytes: req.raw.length,
    sha256: crypto.createHash('sha256').update(req.raw).digest('hex'),
    call_id: call ? call.call_id : null }, common(req)));
  res.json({ ok: true });
});
app.use((err, req, res, next) => {
  const status = err.status || 500;
  report(Object.assign({ status }, common(req)));
  res.status(status).json({ error: err.type || 'error', message: err.message });
});
const server = app.listen(0, '127.0.0.1', () => {
  process.stdout.write('LISTENING ' + server.address().port + '\n');
});
"#;

/// A running Express receiver, stopped on drop.
pub struct Express {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    child: Child,
}

impl Drop for Express {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The folder the tests install Express into.
fn express_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("express")
}

static INSTALL: Mutex<()> = Mutex::new(());

/// Installs express@4 into the tests' folder once; `Err` says what is missing.
fn install() -> Result<PathBuf, String> {
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = express_dir();
    if dir.join("node_modules/express/package.json").exists() {
        return Ok(dir);
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node not installed; apt-get install -y nodejs npm".into());
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&dir)
        .arg("express@4")
        .output()
        .map_err(|e| format!("npm not installed ({e}); apt-get install -y npm"))?;
    if !out.status.success() {
        return Err(format!(
            "npm install express@4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir)
}

impl Express {
    /// Starts Express with `express.json({ limit })` (e.g. `"100kb"`, its default), or `None`
    /// with one line saying what to install when node or npm is missing outside CI.
    pub async fn start(limit: &str) -> Option<Express> {
        let dir = match install() {
            Ok(dir) => dir,
            Err(why) => {
                assert!(std::env::var_os("CI").is_none(), "{why}");
                crate::support::print_skip(&format!("skipped: {why}"));
                return None;
            }
        };
        let script = dir.join("server.js");
        std::fs::write(&script, SERVER_JS).unwrap();
        let mut child = Command::new("node")
            .arg(&script)
            .env("EXPRESS_DIR", &dir)
            .env("LIMIT", limit)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start node");
        let stdout = child.stdout.take().unwrap();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (tx, seen) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = port_tx.send(port.trim().parse::<u16>().unwrap());
                } else if let Some(json) = line.strip_prefix("SEEN ") {
                    let _ = tx.send(serde_json::from_str::<Seen>(json).unwrap());
                }
            }
        });
        // Ready signal: the LISTENING line.
        let port =
            tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .expect("express did not start");
        Some(Express {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            seen,
            child,
        })
    }

    /// The next request Express saw (waits for it).
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(20), self.seen.recv())
            .await
            .expect("express saw no request within 20s")
            .expect("express stopped")
    }

    /// Whether Express saw another request, without waiting.
    pub fn try_next(&mut self) -> Option<Seen> {
        self.seen.try_recv().ok()
    }
}
