//! A real PostgreSQL server for the tests: `initdb` + `pg_ctl` in a temporary directory on a
//! free loopback port, run as the `postgres` system user when the tests run as root (initdb
//! refuses root). One server is shared by the whole test binary ([`shared`]), with a database
//! per test; tests that restart the server start their own ([`PgServer::start`]).
//!
//! A watchdog shell (as the server's user) stops the server and removes its directory once
//! this test process is gone, so nothing outlives `cargo test`.
//!
//! `benches/spool.rs` includes this file too (for a durable server), hence unused items here.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running PostgreSQL server.
pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    top: PathBuf,
    data: PathBuf,
    owned: bool,
    /// `fsync` on (benchmarks); tests turn it off: they crash the server, never the machine.
    durable: bool,
    /// More `postgres` options (`-c ssl=on …`).
    options: String,
}

/// Where the Debian `postgresql` package puts initdb and pg_ctl (newest version first).
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether PostgreSQL tests can run here; under `CI=true` a missing server is a failure,
/// otherwise one line says what to install and the caller skips.
pub fn available() -> bool {
    let ok = pg_bin().is_some()
        && (!running_as_root()
            || (Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists())
                && Command::new("id")
                    .args(["-u", "postgres"])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()));
    if !ok {
        let line = "skipped: PostgreSQL not installed; apt-get install -y postgresql";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{line} (under CI=true a missing component fails; .ci/run installs it)");
        }
        // Straight to stderr, as `support::print_skip` does: libtest captures eprintln!.
        use std::io::Write;
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let _ = writeln!(std::io::stderr(), "{test}: {line}");
    }
    ok
}

/// A command run as the `postgres` user when this process is root, else as itself.
fn as_pg_user(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    /// Starts a server of its own (stopped and removed on drop). `None`: skipped.
    pub fn start() -> Option<PgServer> {
        if !available() {
            return None;
        }
        Some(PgServer::launch(true, false, None))
    }

    /// A server of its own that offers TLS with this certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<PgServer> {
        if !available() {
            return None;
        }
        Some(PgServer::launch(true, false, Some((cert_pem, key_pem))))
    }

    /// Like [`PgServer::start`], with `fsync` on, as in production (for benchmarks).
    pub fn start_durable() -> Option<PgServer> {
        if !available() {
            return None;
        }
        Some(PgServer::launch(true, true, None))
    }

    fn launch(owned: bool, durable: bool, tls: Option<(&str, &str)>) -> PgServer {
        let bin = pg_bin().expect("checked by available()");
        let top = tempfile::Builder::new()
            .prefix("payload-guard-pg-")
            .tempdir()
            .unwrap()
            .keep();
        if running_as_root() {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&top),
                "chown",
            );
        }
        let data = top.join("data");
        run(
            as_pg_user(&bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        let mut options = String::new();
        if let Some((cert, key)) = tls {
            // The server reads its key only when the key is its own and private.
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                if running_as_root() {
                    run(
                        Command::new("chown").arg("postgres:postgres").arg(&path),
                        "chown",
                    );
                }
            }
            options.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let port = free_port();
        let server = PgServer {
            port,
            bin,
            top,
            data,
            owned,
            durable,
            options,
        };
        server.pg_ctl_start();
        // The watchdog: once this test process is gone, stop the server and remove its files.
        let mut watchdog = as_pg_user(Path::new("/bin/sh"));
        watchdog
            .arg("-c")
            .arg(
                r#"while [ -d "/proc/$1" ]; do sleep 1; done
"$2/pg_ctl" -D "$3" -m immediate stop >/dev/null 2>&1
rm -rf "$4""#,
            )
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(&server.bin)
            .arg(&server.data)
            .arg(&server.top)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut watchdog = watchdog.spawn().expect("cannot start the watchdog");
        // It outlives this process on purpose; reap it if it ever ends before.
        std::thread::spawn(move || watchdog.wait());
        server
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    pub fn pg_ctl_start(&self) {
        run(
            as_pg_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.top.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=200{}",
                    self.port,
                    self.top.display(),
                    if self.durable { "on" } else { "off" },
                    self.options
                ))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        );
    }

    /// `pg_ctl stop -m immediate`: the server stops at once, as if it crashed.
    pub fn pg_ctl_stop(&self) {
        run(
            as_pg_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    /// A fresh database; returns its URL (with a password the server ignores: trust auth, so
    /// tests can check it is never printed).
    pub fn database(&self, name: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let db = format!(
            "t_{}_{}",
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .take(40)
                .collect::<String>(),
            N.fetch_add(1, Ordering::Relaxed)
        )
        .to_lowercase();
        run(
            Command::new(self.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(self.port.to_string())
                .arg(&db),
            "createdb",
        );
        self.url(&db)
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}?sslmode=prefer",
            SECRET_PASSWORD, self.port
        )
    }
}

/// The password in test URLs; it must never appear in logs or errors.
pub const SECRET_PASSWORD: &str = "hunter2-never-logged";

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.owned {
            let _ = as_pg_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .output();
            let _ = std::fs::remove_dir_all(&self.top);
        }
    }
}

/// The server shared by this test binary (started on first use). `None`: skipped.
pub fn shared() -> Option<&'static PgServer> {
    static SHARED: OnceLock<Option<PgServer>> = OnceLock::new();
    SHARED
        .get_or_init(|| available().then(|| PgServer::launch(false, false, None)))
        .as_ref()
}

/// A query on database `url` (for assertions on the tables themselves).
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}
