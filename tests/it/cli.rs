//! The built binary: `check` output and exit codes, `run` serving and stopping on SIGTERM.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_payload-guard"))
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
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:6:18: routes[0].upstream_limit: 2 KiB is larger than max_body"
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

#[test]
fn run_with_a_bad_config_exits_64_and_version_works() {
    let out = bin()
        .args(["--config", "/nonexistent/proxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/proxy.toml")
    );
    let out = bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("payload-guard "));
}
