//! The built binary: `check` output and exit codes, `run` serving and stopping on SIGTERM.

use std::process::Command;

fn bin() -> Command {
    Command::new(crate::support::binary())
}

/// Starts `payload-guard --config <path>` (the proxy) with its stderr piped for the test to read.
fn spawn_proxy(path: &std::path::Path) -> crate::support::ChildGuard {
    crate::support::ChildGuard(
        bin()
            .arg("--config")
            .arg(path)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Runs the binary with `args` followed by `paths` (config, input files) and waits for it.
fn run(args: &[&str], paths: &[&std::path::Path]) -> std::process::Output {
    bin().args(args).args(paths).output().unwrap()
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = bin()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("synthflow  /hooks/synthflow  http://127.0.0.1:3000/webhook"),
        "{text}"
    );
}

#[test]
fn check_reports_every_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:1/\"\nmax_body = \"1KiB\"\nupstream_limit = \"2KiB\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/b\"\nupstream = \"nope\"\n",
    )
    .unwrap();
    let out = run(&["check", "--config"], &[&path]);
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:6:18: routes[0].upstream_limit: 2 KiB (2,048 bytes) is larger than max_body"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:8:8: routes[1].name: duplicate route name")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:10:12: routes[1].upstream")),
        "{err}"
    );
}

/// The exit-code table of README.md ("Exit codes"), one row at a time.
#[test]
fn exit_codes_follow_one_table() {
    let code = |args: &[&str]| {
        let out = bin().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    // 0: help and version.
    assert_eq!(code(&["--help"]).0, Some(0));
    let out = bin().arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("payload-guard "));
    // 64: bad command line (clap's own default would be 2), and demo with --config.
    for args in [
        &["--no-such-flag"][..],
        &["check", "extra"],
        &["diagnose", "--since", "soon"],
        &["spool", "purge", "--state", "dead"],
        &["demo", "--config", "proxy.toml"],
    ] {
        let (got, stderr) = code(args);
        assert_eq!(got, Some(64), "{args:?}: {stderr}");
    }
    // 66: no config file, for every command that reads one.
    let missing = "/nonexistent/proxy.toml";
    for args in [
        &["--config", missing][..],
        &["check", "--config", missing],
        &["diagnose", "--config", missing],
        &["trim", "--route", "a", "--config", missing],
        &["spool", "list", "--config", missing],
        &["replay", "--config", missing],
    ] {
        let (got, stderr) = code(args);
        assert_eq!(got, Some(66), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot read config file /nonexistent/proxy.toml: no such file")
                && !stderr.contains("os error"),
            "{args:?}: {stderr}"
        );
    }
    // 65: a config with mistakes, for every command that reads one.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nmax_connections = \"many\"\n").unwrap();
    let bad = bad.to_str().unwrap();
    for args in [
        &["--config", bad][..],
        &["check", "--config", bad],
        &["diagnose", "--config", bad],
        &["spool", "list", "--config", bad],
    ] {
        let (got, stderr) = code(args);
        assert_eq!(got, Some(65), "{args:?}: {stderr}");
        assert!(
            stderr.contains("server.max_connections: expected a whole number"),
            "{stderr}"
        );
    }
    // 69: the listener's address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{}\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:9/\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let (got, stderr) = code(&["--config", config.to_str().unwrap()]);
    assert_eq!(got, Some(69), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

/// A config with a trim route whose receiver limit is 100 KiB.
fn trim_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        r#"
[[routes]]
name = "synthflow"
path_prefix = "/hooks/synthflow"
upstream = "http://127.0.0.1:3000/webhook"
upstream_limit = "100KiB"
[[routes.trim]]
path = "analysis.*_feedback"
action = "drop"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
"#,
    )
    .unwrap();
    path
}

/// Writes `payload` to `name` in `dir` and runs `trim` on it with the synthflow route.
fn trim_file(
    dir: &std::path::Path,
    config: &std::path::Path,
    name: &str,
    payload: &[u8],
) -> (std::path::PathBuf, std::process::Output) {
    let file = dir.join(name);
    std::fs::write(&file, payload).unwrap();
    let out = run(
        &["trim", "--route", "synthflow", "--config"],
        &[config, &file],
    );
    (file, out)
}

/// Runs `trim` with the synthflow route with its stdin redirected from `file`.
fn trim_redirected(config: &std::path::Path, file: &std::path::Path) -> std::process::Output {
    bin()
        .args(["trim", "--route", "synthflow", "--config"])
        .arg(config)
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap()
}

/// Runs `trim` with the synthflow route on `payload` written to its stdin through a pipe.
fn trim_piped(config: &std::path::Path, payload: Vec<u8>) -> std::process::Output {
    let mut child = bin()
        .args(["trim", "--route", "synthflow", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Written on a thread of its own: the output may fill its pipe before the input is read.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&payload).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Checks a `trim` that succeeded: its output under the route's 100 KiB, the signed id intact.
fn assert_trimmed(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.len() <= 100 * 1024);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["call"]["call_id"], "1732630000000x222222222222222222");
}

#[test]
fn trim_writes_the_forwarded_bytes_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let config = trim_config(dir.path());
    let payload = payload_guard::trim::testdata::synthflow_payload(500_000, 8);
    let (file, out) = trim_file(dir.path(), &config, "payload.json", &payload);
    assert_trimmed(&out);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("rule 1 (call.transcript truncate (keep head_tail"),
        "{report}"
    );
    assert!(report.contains("fits: yes"), "{report}");
    // The report's count is the marker's number.
    let body = String::from_utf8_lossy(&out.stdout);
    let marked = body
        .split("[... ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("a marker in the trimmed transcript");
    assert!(
        report.contains(&format!(
            "call.transcript: {marked} bytes removed (as its marker says)"
        )),
        "{report}"
    );
    assert!(
        !report.contains("Truncate {") && !report.contains("Some("),
        "{report}"
    );

    // Same through stdin; small payloads come back byte-identical.
    let small = payload_guard::trim::testdata::synthflow_payload(20_000, 8);
    let out = trim_piped(&config, small.clone());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, small);

    // Stdin redirected from a file (read in one go at its size): the same bytes as the file.
    let trimmed = run(
        &["trim", "--route", "synthflow", "--config"],
        &[&config, &file],
    )
    .stdout;
    let redirected = trim_redirected(&config, &file);
    assert_eq!(redirected.status.code(), Some(0));
    assert_eq!(redirected.stdout, trimmed);
}

/// Payloads of 4 MiB and more are read into a buffer of their own kind (huge pages where the
/// kernel offers them): the bytes written are the same whichever way the payload comes in.
#[test]
fn trim_reads_a_large_payload_the_same_from_a_file_a_redirect_and_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let config = trim_config(dir.path());
    let payload = payload_guard::trim::testdata::synthflow_payload(5 * 1024 * 1024, 9);
    let (file, from_file) = trim_file(dir.path(), &config, "large.json", &payload);
    assert_trimmed(&from_file);
    assert!(
        String::from_utf8_lossy(&from_file.stderr).contains("route synthflow: 5 MiB -> "),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );

    let redirected = trim_redirected(&config, &file);
    assert_eq!(redirected.status.code(), Some(0));
    assert_eq!(redirected.stdout, from_file.stdout);

    // A pipe has no size to go by: read as it comes.
    let piped = trim_piped(&config, payload);
    assert_eq!(piped.status.code(), Some(0));
    assert_eq!(piped.stdout, from_file.stdout);
}

#[test]
fn trim_exit_codes_for_unfit_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let config = trim_config(dir.path());
    // Only non-trimmable bulk: the rules cannot reach 100 KiB -> exit 1, smallest result written.
    let mut doc = String::from(r#"{"call":{"call_id":"c1","transcript":"short"},"blob":""#);
    doc.push_str(&"x".repeat(300_000));
    doc.push_str("\"}");
    let file = dir.path().join("unfit.json");
    std::fs::write(&file, &doc).unwrap();
    let out = run(
        &["trim", "--route", "synthflow", "--config"],
        &[&config, &file],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fits: no"));
    // Invalid JSON -> 65, a missing payload file -> 66, an unknown route -> 64.
    std::fs::write(&file, "{\"call\": ").unwrap();
    let out = run(
        &["trim", "--route", "synthflow", "--config"],
        &[&config, &file],
    );
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid JSON"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["trim", "--route", "synthflow", "--config"],
        &[&config, &dir.path().join("absent.json")],
    );
    assert_eq!(out.status.code(), Some(66));
    let out = run(&["trim", "--route", "nope", "--config"], &[&config, &file]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route named \"nope\""));
}

#[test]
fn diagnose_explains_a_known_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let log = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/incident/fixtures/incidents.jsonl"
    );
    std::fs::write(
        &config,
        format!(
            "[incidents]\npath = \"{log}\"\n[[routes]]\nname = \"synthflow\"\npath_prefix = \"/hooks/synthflow\"\nupstream = \"http://127.0.0.1:3000/\"\nupstream_limit = \"1MiB\"\n[[routes]]\nname = \"retell\"\npath_prefix = \"/hooks/retell\"\nupstream = \"http://127.0.0.1:3001/\"\n"
        ),
    )
    .unwrap();
    let out = run(&["diagnose", "--config"], &[&config]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "14 incidents on 2 routes",
        "rejected by    nginx 3",
        "client_max_body_size 4m;",
        "express.json({ limit: '1mb' })",
        "trim: truncate call.transcript would have saved 3 of 4 requests over the limit",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 6: skipped"));

    let out = run(
        &[
            "diagnose", "--format", "json", "--route", "retell", "--config",
        ],
        &[&config],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["routes"].as_array().unwrap().len(), 1);
    assert_eq!(report["routes"][0]["by_kind"]["upstream_413"], 4);

    // A missing log is a clear message and exit 0.
    std::fs::write(&config, "[incidents]\npath = \"none.jsonl\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:1/\"\n").unwrap();
    let out = run(&["diagnose", "--config"], &[&config]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no size incidents recorded yet"));
}

/// `payload-guard run` of the config at `path`, with `env` set, started and ready: its proxy
/// listener's address (from the `payload-guard listening` line) and the rest of its stderr.
/// With `admin`, also waits for the admin listener's line.
async fn start_run(
    path: &std::path::Path,
    env: &[(&str, &str)],
    admin: bool,
) -> (
    crate::support::ChildGuard,
    std::net::SocketAddr,
    std::thread::JoinHandle<()>,
) {
    use std::io::{BufRead, BufReader};
    let mut command = bin();
    command.arg("--config").arg(path).env("RUST_LOG", "info");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = crate::support::ChildGuard(
        command
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    let (addr, lines) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let (mut proxy, mut admin_up) = (None, !admin);
        while proxy.is_none() || !admin_up {
            let line = lines.next().expect("proxy exited").unwrap();
            admin_up |= line.contains("admin listening");
            if line.contains("payload-guard listening")
                && let Some(pos) = line.find("listen=")
            {
                let rest = &line[pos + 7..];
                let addr: std::net::SocketAddr = rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse()
                    .unwrap();
                proxy = Some(addr);
            }
        }
        (proxy.unwrap(), lines)
    })
    .await
    .unwrap();
    // Read to its end, so the proxy never blocks on a full pipe.
    let drain = std::thread::spawn(move || for _ in lines {});
    (child, addr, drain)
}

/// Stops `child` with SIGTERM and returns its exit code.
async fn stop_run(
    child: crate::support::ChildGuard,
    drain: std::thread::JoinHandle<()>,
) -> Option<i32> {
    let status = crate::support::sigterm_and_wait(child).await;
    drain.join().unwrap();
    status.code()
}

#[tokio::test]
async fn run_with_one_worker_thread_serves_and_stops_on_sigterm() {
    let mut receiver = crate::support::Receiver::start(crate::support::Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworker_threads = 1\n[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://{}/\"\n",
            receiver.addr
        ),
    )
    .unwrap();
    let (child, addr, drain) = start_run(&path, &[], false).await;
    let got = crate::support::send(
        addr,
        http::Request::post(format!("http://{addr}/a"))
            .body(crate::support::full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(receiver.next().await.body.unwrap(), "{}");
    // SIGTERM: graceful stop, exit 0.
    assert_eq!(stop_run(child, drain).await, Some(0));
}

/// Compares `got` with the golden file `tests/it/golden/<name>` (`UPDATE_GOLDEN=1` rewrites it).
fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    if want != got {
        let first = want
            .lines()
            .zip(got.lines())
            .position(|(w, g)| w != g)
            .unwrap_or(want.lines().count().min(got.lines().count()));
        panic!(
            "{name} differs from line {}:\n--- want\n{want}\n--- got\n{got}\n(UPDATE_GOLDEN=1 rewrites the file)",
            first + 1
        );
    }
}

/// `check` run in the golden folder on one of its files: (exit code, stdout, stderr).
fn check_golden(file: &str) -> (Option<i32>, String, String) {
    let out = bin()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/golden"))
        .args(["check", "--config", file])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_one_mistake_of_each_class_in_file_order() {
    let (code, stdout, stderr) = check_golden("check_every_class.toml");
    assert_eq!(code, Some(65), "{stderr}");
    assert_eq!(stdout, "");
    golden("check_every_class.txt", &stderr);
    // Each mistake is one `file:line:col: key: message` line followed by its caret.
    let heads: Vec<(usize, usize)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("check_every_class.toml:"))
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect();
    assert!(heads.len() >= 12, "{stderr}");
    assert!(heads.is_sorted(), "not in file order: {heads:?}");
    for needle in [
        "did you mean \"upstream_limit\"?",
        "did you mean \"truncate\"?",
        "expected a whole number",
        "expected true or false",
        "expected a size like \"32MiB\"",
        "invalid TOML",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?}:\n{stderr}");
    }
    assert!(
        !stderr.contains("i64") && !stderr.contains("invalid type"),
        "{stderr}"
    );
}

#[test]
fn check_shows_sizes_in_both_forms_and_warns_on_decimal_units() {
    let (code, stdout, stderr) = check_golden("check_warning.toml");
    assert_eq!(code, Some(0), "{stderr}");
    golden("check_warning.stdout.txt", &stdout);
    golden("check_warning.stderr.txt", &stderr);
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Every configuration the documentation shows passes `check`, run as a user would: the
/// shipped proxy.toml, the ```toml blocks of README.md and deploy/README.md (fragments such
/// as one `[[routes.trim]]` table go into a minimal route), and deploy/*.toml.
#[test]
fn every_config_in_the_docs_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let mut configs: Vec<(String, String)> = vec![(
        "proxy.toml".into(),
        std::fs::read_to_string(root.join("proxy.toml")).unwrap(),
    )];
    for doc in ["README.md", "deploy/README.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let blocks = toml_blocks(&text);
        assert!(!blocks.is_empty(), "{doc} shows no ```toml block");
        for (i, block) in blocks.into_iter().enumerate() {
            let whole = block.contains("[[routes]]") || block.contains("[server]");
            let config = if whole {
                block
            } else {
                format!(
                    "[[routes]]\nname = \"doc\"\npath_prefix = \"/doc\"\nupstream = \"http://127.0.0.1:3000/\"\nupstream_limit = \"1MiB\"\n{block}"
                )
            };
            configs.push((format!("{doc} block {}", i + 1), config));
        }
    }
    for entry in std::fs::read_dir(root.join("deploy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            configs.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    for (name, config) in configs {
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, &config).unwrap();
        let out = bin()
            .args(["check", "--config"])
            .arg(&path)
            .env("SYNTHFLOW_WEBHOOK_SECRET", "a-webhook-secret")
            .env("GUARD_RESIGN_SECRET", "a-resign-secret")
            .env(
                "PAYLOAD_GUARD_ADMIN_TOKEN",
                "0123456789abcdef0123456789abcdef",
            )
            .env(
                "PAYLOAD_GUARD_DATABASE_URL",
                "postgres://payload_guard:a-password@db.internal/payload_guard",
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}:\n{config}\n{stderr}");
        assert!(!stderr.contains("warning"), "{name}: {stderr}");
    }
}

/// README.md's set-up promises: the install command, and what the shipped proxy.toml does
/// without a receiver on its upstream (502 with `upstream_connect_failed`).
#[tokio::test]
async fn the_readme_set_up_holds_without_a_receiver() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let set_up = &readme[readme.find("## Set up").unwrap()..readme.find("## Quickstart").unwrap()];
    for command in [
        "cargo install --locked --path .",
        "cargo test",
        "payload-guard --config proxy.toml",
        "skipped: nginx not installed; apt-get install -y nginx-light",
    ] {
        assert!(set_up.contains(command), "Set up lacks {command:?}");
    }
    // The shipped file, on ephemeral ports, with nothing listening where its receiver would be.
    let nobody = crate::support::free_addr();
    let shipped = std::fs::read_to_string(root.join("proxy.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:3000", &nobody.to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, shipped).unwrap();
    let mut child = spawn_proxy(&path);
    let stderr = child.stderr.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            let line = lines.next().expect("proxy exited").unwrap();
            if let Some(pos) = line.find("payload-guard listening listen=") {
                let rest = &line[pos + "payload-guard listening listen=".len()..];
                let addr: std::net::SocketAddr = rest[..rest.find(' ').unwrap_or(rest.len())]
                    .parse()
                    .unwrap();
                // Keep draining so the proxy never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return addr;
            }
        }
    })
    .await
    .unwrap();
    let got = crate::support::send(
        addr,
        http::Request::post(format!("http://{addr}/hooks/synthflow"))
            .header("content-type", "application/json")
            .body(crate::support::full("{\"call\":{\"call_id\":\"c1\"}}"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"], "upstream_connect_failed");
    let _ = child.kill();
    let _ = child.wait();
}

/// The `check` output README.md shows ("Configuration") is what `check` prints for such a file.
#[test]
fn the_readme_check_example_is_real_output() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let from = readme
        .find("each as `file:line:col: key: message`")
        .unwrap();
    let block = &readme[from..];
    let block = &block[block.find("```\n").unwrap() + 4..];
    let shown = &block[..block.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        "[server]\nlisten = \"127.0.0.1:8080\"\nheader_read_timeout = \"10s\"\nbody_timeout = \"5m\"\nmax_connections = \"many\"\n\n[[routes]]\nname = \"synthflow\"\npath_prefix = \"/hooks/synthflow\"\nupstream = \"http://127.0.0.1:3000/webhook\"\nmax_body = \"32MiB\"\nconnect_timeout = \"5s\"\nresponse_timeout = \"60s\"\npreserve_host = false\nupstream_limt = \"1MiB\"\non_oversize = \"shrink\"\n",
    )
    .unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["check", "--config", "proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(String::from_utf8_lossy(&out.stderr), shown);
}

/// What a user reads (logs of a refused, a forwarded-and-refused, a trimmed and a failed
/// request, and the shutdown) shows values, never Rust's `Some(..)`, `None` or enum names.
#[tokio::test]
async fn logs_show_values_not_rust_debug_forms() {
    use crate::support::{Behavior, Receiver, free_addr, full, send};
    use std::io::BufRead;
    let receiver = Receiver::start(Behavior::LimitEarly(2000)).await;
    let nobody = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "http://{r}/"
max_body = "4KiB"
upstream_limit = "3KiB"
[[routes]]
name = "b"
path_prefix = "/b"
upstream = "http://{r}/"
upstream_limit = "1KiB"
[[routes.trim]]
path = "x"
action = "truncate"
[[routes]]
name = "c"
path_prefix = "/c"
upstream = "http://{nobody}/"
"#,
            r = receiver.addr
        ),
    )
    .unwrap();
    let mut child = spawn_proxy(&path);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = rx.recv().await.expect("proxy exited");
        let found = line
            .split("payload-guard listening listen=")
            .nth(1)
            .map(|rest| rest.split(' ').next().unwrap().parse().unwrap());
        lines.push(line);
        if let Some(addr) = found {
            break addr;
        }
    };
    let post = |path: &str, body: Vec<u8>| {
        http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap()
    };
    let json = |n: usize| format!("{{\"x\":\"{}\"}}", "a".repeat(n)).into_bytes();
    assert_eq!(send(addr, post("/a", json(5000))).await.status, 413);
    assert_eq!(send(addr, post("/a", json(3500))).await.status, 413);
    assert_eq!(send(addr, post("/b", json(3000))).await.status, 200);
    assert_eq!(send(addr, post("/c", json(10))).await.status, 502);
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    while let Some(line) = rx.recv().await {
        lines.push(line);
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = lines.join("\n");
    for needle in [
        "body over max_body",
        "receiver answered 413",
        "payload trimmed",
        "status=502",
        "grace=30s",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    for debug in [
        "Some(",
        "None",
        "=Reject",
        "=Forward",
        "{ keep",
        "Truncate {",
    ] {
        assert!(!text.contains(debug), "{debug:?} in:\n{text}");
    }
}

/// deploy/payload-guard.service: its `check` commands are valid command lines for this binary,
/// and it keeps the configuration exit codes from restart-looping.
#[test]
fn the_systemd_unit_checks_with_valid_commands() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/payload-guard.service"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:3000/\"\n",
    )
    .unwrap();
    let checks: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.split_once('=').filter(|(k, _)| k.starts_with("Exec")))
        .map(|(_, command)| command)
        .filter(|c| c.ends_with(" check"))
        .collect();
    assert_eq!(checks.len(), 2, "{unit}");
    for command in checks {
        let args: Vec<String> = command
            .split_whitespace()
            .skip(1)
            .map(|a| a.replace("/etc/payload-guard/proxy.toml", config.to_str().unwrap()))
            .collect();
        let out = bin().args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let prevent = unit
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .unwrap();
    for code in ["64", "65", "66"] {
        assert!(prevent.split_whitespace().any(|c| c == code), "{prevent}");
    }
}

/// The README's promise for `limits --reset` with the proxy running: it goes through the admin
/// listener, with the token from `admin_token_env`, so the proxy's memory (`GET /limits`) and
/// the file agree. A wrong token is refused with the listener's status and changes nothing.
#[tokio::test]
async fn limits_reset_with_the_proxy_running_goes_through_its_admin_listener() {
    use crate::support::{Behavior, Receiver, admin_request, free_addr, send};
    const TOKEN_ENV: &str = "PG_TEST_RESET_TOKEN";
    const TOKEN: &str = "reset-token-0123456789";
    let receiver = Receiver::start(Behavior::LimitEarly(10_000)).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
admin_listen = "{admin}"
admin_token_env = "{TOKEN_ENV}"
[incidents]
path = "{}"
[[routes]]
name = "hooks"
path_prefix = "/hooks"
upstream = "http://{}/"
on_oversize = "trim"
[[routes.trim]]
path = "call.transcript"
action = "truncate"
keep = "head_tail"
"#,
            dir.path().join("incidents.jsonl").display(),
            receiver.addr
        ),
    )
    .unwrap();
    let (child, addr, drain) = start_run(&path, &[(TOKEN_ENV, TOKEN)], true).await;

    // The receiver refuses 20 KB with 413: the proxy learns from it.
    let body = payload_guard::trim::testdata::synthflow_payload(20_000, 7);
    let got = send(
        addr,
        http::Request::post(format!("http://{addr}/hooks"))
            .header("content-type", "application/json")
            .body(crate::support::full(body))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let learned = |got: crate::support::Got| {
        let routes = got.json()["routes"].clone();
        assert_eq!(routes[0]["route"], "hooks", "{routes}");
        routes[0]["evidence"].as_array().unwrap().len()
    };
    assert!(learned(admin_request(admin, "GET", "/limits", Some(TOKEN)).await) > 0);
    let limits = |token: &str, args: &[&str]| {
        bin()
            .arg("limits")
            .args(args)
            .arg("--config")
            .arg(&path)
            .env(TOKEN_ENV, token)
            .output()
            .unwrap()
    };
    // The file catches up with the proxy's memory.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&limits(TOKEN, &[]).stdout).contains("refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "the file never showed the 413"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A wrong token: refused by the listener, nothing forgotten anywhere.
    let out = limits("wrong-token-0123456789", &["--reset", "hooks"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "the admin listener at {admin} refused the reset (401)"
        )),
        "{err}"
    );
    assert!(learned(admin_request(admin, "GET", "/limits", Some(TOKEN)).await) > 0);
    assert!(String::from_utf8_lossy(&limits(TOKEN, &[]).stdout).contains("refused"));

    // The right token: the running proxy forgets, and the file follows.
    let out = limits(TOKEN, &["--reset", "hooks"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hooks: learned limit reset in the running proxy (admin listener)\n"
    );
    assert_eq!(
        learned(admin_request(admin, "GET", "/limits", Some(TOKEN)).await),
        0
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&limits(TOKEN, &[]).stdout).into_owned();
        if text.contains("nothing learned") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file kept the evidence: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    assert_eq!(stop_run(child, drain).await, Some(0));
}
