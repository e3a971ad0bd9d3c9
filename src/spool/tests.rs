//! Spool behaviour on real files in temporary directories.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

const T0: u64 = 1_718_000_000;

fn cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.join("spool"),
        max_bytes: 1 << 30,
        min_free: 0,
    }
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn meta(route: &str, received_secs: u64) -> Meta {
    let mut meta = Meta::new(route, at(received_secs), "req-1", "POST", "/hook?a=1", 0);
    meta.headers = vec![
        ("content-type".into(), "application/json".into()),
        ("x-signature".into(), "sha256=abc".into()),
    ];
    meta
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn commit_is_a_private_file_in_ready_that_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, report) = Spool::open(cfg(tmp.path())).unwrap();
    assert_eq!(report, RecoveryReport::default());
    let body = br#"{"event":"push"}"#;
    let mut m = meta("github", T0);
    m.original_len = body.len() as u64;
    m.call_id = Some("call-7".into());
    let id = spool.commit(State::Ready, &m, body).unwrap();

    let root = spool.dir();
    let file = root.join("ready").join(id.as_str());
    assert_eq!(mode(&file), 0o600);
    for dir in [
        "",
        "tmp",
        "ready",
        "inflight",
        "dead",
        "archive",
        "quarantine",
    ] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir:?}");
    }
    assert!(names(&root.join("tmp")).is_empty());
    assert!(id.as_str().starts_with(&format!("{}000-", T0)));

    let (back, back_body) = spool.read(State::Ready, &id).unwrap();
    assert_eq!(back, m);
    assert_eq!(back_body, body);
    assert_eq!(spool.depth(State::Ready), 1);
    assert_eq!(spool.usage(), fs::metadata(&file).unwrap().len());

    let found = spool.find(&id).unwrap().unwrap();
    assert_eq!(
        (found.state, found.claimed, found.body_len),
        (State::Ready, false, body.len() as u64)
    );
    assert!(matches!(
        spool.read(State::Dead, &id),
        Err(SpoolError::NotFound(_))
    ));
    let mut out = Vec::new();
    let (_, n) = spool.copy_body(State::Ready, &id, &mut out).unwrap();
    assert_eq!((n, out.as_slice()), (body.len() as u64, &body[..]));
}

#[test]
fn open_removes_torn_writes_in_tmp() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let root = spool.dir().to_owned();
    drop(spool);
    // What a crash leaves: a commit torn before its header was written (zeroed header, part
    // of the body), and a stray file.
    let torn = RecordId::generate(at(T0));
    let mut bytes = vec![0u8; record::HEADER_LEN as usize];
    bytes.extend_from_slice(b"half a body");
    fs::write(root.join("tmp").join(torn.as_str()), &bytes).unwrap();
    fs::write(root.join("tmp").join("junk"), b"\0\0\0").unwrap();

    let (spool, report) = Spool::open(cfg(tmp.path())).unwrap();
    assert_eq!(report.tmp_removed, 2);
    assert!(names(&root.join("tmp")).is_empty());
    assert_eq!(spool.depth(State::Ready), 0);
}

#[test]
fn corrupt_records_are_quarantined_and_open_still_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let good = spool
        .commit(State::Ready, &meta("r", T0), b"good body")
        .unwrap();
    let bad = spool
        .commit(State::Ready, &meta("r", T0 + 1), b"bad body")
        .unwrap();
    let dead = spool
        .commit(State::Dead, &meta("r", T0 + 2), b"short")
        .unwrap();
    let root = spool.dir().to_owned();
    drop(spool);

    let bad_path = root.join("ready").join(bad.as_str());
    let mut bytes = fs::read(&bad_path).unwrap();
    bytes[42] ^= 0x01; // inside the body
    fs::write(&bad_path, &bytes).unwrap();
    let dead_path = root.join("dead").join(dead.as_str());
    let len = fs::metadata(&dead_path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&dead_path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    fs::write(root.join("archive").join("notes.txt"), b"stray").unwrap();

    let (spool, report) = Spool::open(cfg(tmp.path())).unwrap();
    assert_eq!(report.quarantined.len(), 3, "{report:?}");
    let reasons: Vec<&str> = report
        .quarantined
        .iter()
        .map(|q| q.reason.as_str())
        .collect();
    assert!(reasons.contains(&"body checksum mismatch"), "{reasons:?}");
    assert!(report.quarantined.iter().all(|q| q.to.is_some()));
    assert_eq!((report.ready, report.dead, report.archive), (1, 0, 0));
    assert_eq!(
        names(&root.join("quarantine")),
        vec![
            "archive-notes.txt".to_owned(),
            format!("dead-{dead}"),
            format!("ready-{bad}"),
        ]
    );
    assert_eq!(names(&root.join("ready")), vec![good.to_string()]);
    assert_eq!(spool.depth(State::Ready), 1);
    assert_eq!(spool.read(State::Ready, &good).unwrap().1, b"good body");
}

#[test]
fn claims_left_by_a_crashed_process_are_ready_again_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let id = spool
        .commit(State::Ready, &meta("r", T0), b"payload")
        .unwrap();
    let root = spool.dir().to_owned();
    drop(spool);
    // What a process that crashed while delivering leaves: the record in inflight/.
    fs::rename(
        root.join("ready").join(id.as_str()),
        root.join("inflight").join(id.as_str()),
    )
    .unwrap();

    let (spool, report) = Spool::open(cfg(tmp.path())).unwrap();
    assert_eq!(report.claims_recovered, 1);
    assert!(names(&root.join("inflight")).is_empty());
    assert_eq!(spool.list_ids(State::Ready).unwrap(), vec![id.clone()]);
    assert!(spool.claim(&id).unwrap().is_some());
}

#[test]
fn a_claim_is_exclusive_and_a_dropped_claim_goes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let id = spool.commit(State::Ready, &meta("r", T0), b"x").unwrap();
    let first = spool.claim(&id).unwrap().unwrap();
    assert!(spool.claim(&id).unwrap().is_none());
    assert!(spool.list(State::Ready, None).unwrap().is_empty());
    let found = spool.find(&id).unwrap().unwrap();
    assert!(found.claimed);
    drop(first);
    assert!(spool.claim(&id).unwrap().is_some());
}

#[test]
fn concurrent_claimers_each_get_distinct_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let ids: Vec<RecordId> = (0..40)
        .map(|i| {
            spool
                .commit(State::Ready, &meta("r", T0 + i), b"b")
                .unwrap()
        })
        .collect();
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let spool = spool.clone();
            let ids = ids.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut won = Vec::new();
                for id in &ids {
                    if let Some(claim) = spool.claim(id).unwrap() {
                        won.push(claim.id().clone());
                        claim.complete().unwrap();
                    }
                }
                won
            })
        })
        .collect();
    let won: Vec<RecordId> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unique: HashSet<&RecordId> = won.iter().collect();
    assert_eq!(won.len(), ids.len(), "every record claimed exactly once");
    assert_eq!(unique.len(), ids.len());
    assert_eq!(spool.depth(State::Ready), 0);
    assert_eq!(spool.usage(), 0);
}

#[test]
fn release_records_the_attempt_and_keeps_the_body() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let id = spool.commit(State::Ready, &meta("r", T0), &body).unwrap();
    let next = at(T0 + 60);
    for attempt in 1..=3u32 {
        let mut claim = spool.claim(&id).unwrap().unwrap();
        assert_eq!(claim.meta().attempts, attempt - 1);
        assert_eq!(claim.body().unwrap(), body);
        claim
            .release(&format!("upstream 503 #{attempt}"), next)
            .unwrap();
    }
    let (m, back) = spool.read(State::Ready, &id).unwrap();
    assert_eq!(back, body);
    assert_eq!(m.attempts, 3);
    assert_eq!(m.last_error.as_deref(), Some("upstream 503 #3"));
    assert_eq!(m.next_attempt_at, Some(next));
    assert_eq!(m.received_at, at(T0));
    let root = spool.dir();
    assert!(names(&root.join("tmp")).is_empty());
    assert!(names(&root.join("inflight")).is_empty());
    assert_eq!(spool.depth(State::Ready), 1);
    let file_len = fs::metadata(root.join("ready").join(id.as_str()))
        .unwrap()
        .len();
    assert_eq!(spool.usage(), file_len);
}

#[test]
fn bury_moves_to_dead_with_status_and_snippet() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let id = spool
        .commit(State::Ready, &meta("r", T0), b"payload")
        .unwrap();
    let claim = spool.claim(&id).unwrap().unwrap();
    let long_snippet = "x".repeat(5000);
    claim
        .bury(Some(422), &long_snippet, "receiver rejected")
        .unwrap();
    assert_eq!(spool.depth(State::Ready), 0);
    assert_eq!(spool.depth(State::Dead), 1);
    let (m, body) = spool.read(State::Dead, &id).unwrap();
    assert_eq!(body, b"payload");
    assert_eq!(m.status, Some(422));
    assert_eq!(m.snippet.map(|s| s.len()), Some(SNIPPET_MAX_BYTES));
    assert_eq!(m.attempts, 1);
    assert!(
        spool.claim(&id).unwrap().is_none(),
        "dead records are not claimable"
    );
}

#[test]
fn over_max_bytes_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = cfg(tmp.path());
    config.max_bytes = 4096;
    let (spool, _) = Spool::open(config).unwrap();
    spool
        .commit(State::Ready, &meta("r", T0), &[1u8; 2000])
        .unwrap();
    let used = spool.usage();
    let err = spool
        .commit(State::Ready, &meta("r", T0), &[2u8; 3000])
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full { max: 4096, .. }), "{err}");
    assert!(err.is_refusal());
    assert!(err.to_string().contains("max_bytes"), "{err}");
    assert!(names(&spool.dir().join("tmp")).is_empty());
    assert_eq!(spool.usage(), used);
    assert_eq!(spool.depth(State::Ready), 1);

    // A streamed body hits the limit while it is written, and leaves nothing either.
    let mut staging = spool.stage(at(T0)).unwrap();
    staging.write_all(&[0u8; 1000]).unwrap();
    assert!(matches!(
        staging.write_all(&[0u8; 1500]),
        Err(SpoolError::Full { .. })
    ));
    drop(staging);
    assert!(names(&spool.dir().join("tmp")).is_empty());
    assert_eq!(spool.usage(), used);
}

#[test]
fn low_disk_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = cfg(tmp.path());
    config.min_free = u64::MAX;
    let (spool, _) = Spool::open(config).unwrap();
    let err = spool
        .commit(State::Ready, &meta("r", T0), b"x")
        .unwrap_err();
    assert!(
        matches!(err, SpoolError::LowDisk { min: u64::MAX, .. }),
        "{err}"
    );
    assert!(matches!(
        spool.stage(at(T0)),
        Err(SpoolError::LowDisk { .. })
    ));
    assert!(names(&spool.dir().join("tmp")).is_empty());
    assert!(names(&spool.dir().join("ready")).is_empty());
    assert_eq!(spool.usage(), 0);
}

#[test]
fn staged_bodies_commit_identically_or_vanish() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut staging = spool.stage(at(T0)).unwrap();
    let staged_id = staging.id().clone();
    for chunk in body.chunks(16 * 1024 + 3) {
        staging.write_all(chunk).unwrap();
    }
    assert_eq!(staging.body_len(), body.len() as u64);
    assert_eq!(names(&spool.dir().join("tmp")), vec![staged_id.to_string()]);
    let mut m = meta("big", T0);
    m.original_len = body.len() as u64;
    let id = staging.commit(State::Ready, &m).unwrap();
    assert_eq!(id, staged_id);
    let (back_meta, back) = spool.read(State::Ready, &id).unwrap();
    assert_eq!(back_meta, m);
    assert!(back == body, "staged body differs");
    assert!(names(&spool.dir().join("tmp")).is_empty());
    let file = spool.dir().join("ready").join(id.as_str());
    assert_eq!(mode(&file), 0o600);
    assert_eq!(spool.usage(), fs::metadata(&file).unwrap().len());

    let mut discarded = spool.stage(at(T0)).unwrap();
    discarded.write_all(b"never mind").unwrap();
    discarded.discard();
    let mut dropped = spool.stage(at(T0)).unwrap();
    dropped.write_all(b"gone too").unwrap();
    drop(dropped);
    assert!(names(&spool.dir().join("tmp")).is_empty());
    assert_eq!(spool.depth(State::Ready), 1);
    assert_eq!(spool.usage(), fs::metadata(&file).unwrap().len());
}

#[test]
fn purge_removes_only_old_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let old = spool.commit(State::Dead, &meta("r", T0), b"old").unwrap();
    let new = spool
        .commit(State::Dead, &meta("r", T0 + 100), b"new")
        .unwrap();
    let cutoff = at(T0 + 50);
    assert_eq!(spool.purge_received_before(State::Dead, cutoff).unwrap(), 1);
    assert_eq!(spool.list_ids(State::Dead).unwrap(), vec![new.clone()]);
    assert!(spool.find(&old).unwrap().is_none());
    assert_eq!(spool.depth(State::Dead), 1);

    // Relative to now: everything received in 2024 is older than a day.
    assert_eq!(
        spool
            .purge(State::Dead, Duration::from_secs(86_400))
            .unwrap(),
        1
    );
    let fresh = spool
        .commit(State::Archive, &meta("r", 0).with_now(), b"o")
        .unwrap();
    assert_eq!(spool.purge_archive(Duration::from_secs(86_400)).unwrap(), 0);
    assert_eq!(spool.list_ids(State::Archive).unwrap(), vec![fresh]);

    // Ready records being delivered right now are not purged.
    let busy = spool.commit(State::Ready, &meta("r", T0), b"busy").unwrap();
    let idle = spool.commit(State::Ready, &meta("r", T0), b"idle").unwrap();
    let claim = spool.claim(&busy).unwrap().unwrap();
    assert_eq!(
        spool.purge_received_before(State::Ready, cutoff).unwrap(),
        1
    );
    assert!(spool.find(&idle).unwrap().is_none());
    claim.complete().unwrap();
    assert_eq!(spool.depth(State::Ready), 0);
}

impl Meta {
    fn with_now(mut self) -> Meta {
        self.received_at = SystemTime::now();
        self
    }
}

#[test]
fn list_is_in_arrival_order_per_route() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    // Committed out of arrival order (a slow request committed last).
    let b = spool
        .commit(State::Ready, &meta("a", T0 + 20), b"2")
        .unwrap();
    let c = spool
        .commit(State::Ready, &meta("b", T0 + 30), b"3")
        .unwrap();
    let a = spool
        .commit(State::Ready, &meta("a", T0 + 10), b"1")
        .unwrap();
    let all: Vec<RecordId> = spool
        .list(State::Ready, None)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(all, vec![a.clone(), b.clone(), c.clone()]);
    let route_a: Vec<RecordId> = spool
        .list(State::Ready, Some("a"))
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(route_a, vec![a.clone(), b]);
    assert_eq!(spool.list_ids(State::Ready).unwrap()[0], a);
    assert!(spool.list(State::Dead, None).unwrap().is_empty());
}

#[test]
fn list_and_show_render_for_humans() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let mut m1 = meta("github", T0);
    m1.call_id = Some("evt-1".into());
    m1.attempts = 3;
    m1.last_error = Some("upstream connection refused\nsecond line".into());
    spool.commit(State::Ready, &m1, &vec![0u8; 1536]).unwrap();
    let mut m2 = meta("stripe-payments", T0 + 3600);
    m2.headers
        .push(("Authorization".into(), "Bearer secret".into()));
    spool.commit(State::Ready, &m2, b"{}").unwrap();
    let entries = spool.list(State::Ready, None).unwrap();
    let now = at(T0 + 4 * 86_400 + 3600);
    let table = render_list(&entries, now);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID  "), "{table}");
    for heading in ["ROUTE", "CALL ID", "SIZE", "ATTEMPTS", "AGE", "LAST ERROR"] {
        assert!(lines[0].contains(heading), "{table}");
    }
    // Columns line up: every row has ROUTE where the heading has it.
    let route_col = lines[0].find("ROUTE").unwrap();
    assert_eq!(&lines[1][route_col..route_col + 6], "github");
    assert_eq!(&lines[2][route_col..route_col + 15], "stripe-payments");
    let size_end = lines[0].find("SIZE").unwrap() + 4;
    assert!(lines[1][..size_end].ends_with("1.5 KiB"), "{table}");
    assert!(lines[2][..size_end].ends_with("2 B"), "{table}");
    assert!(lines[1].contains("  4d  "), "{table}");
    assert!(lines[2].contains("  4d  "), "{table}");
    assert!(lines[1].contains("evt-1"));
    assert!(
        lines[1].ends_with("upstream connection refused\\nsecond line"),
        "{table}"
    );
    assert!(lines[2].ends_with(" -"), "{table}");

    let show = render_show(&entries[1]);
    assert!(
        show.contains("route:           stripe-payments\n"),
        "{show}"
    );
    assert!(
        show.contains("received_at:     2024-06-10T07:13:20.000Z\n"),
        "{show}"
    );
    assert!(
        show.contains("  content-type: application/json\n"),
        "{show}"
    );
    assert!(
        show.contains("  Authorization: <withheld, 13 bytes>\n"),
        "{show}"
    );
    assert!(!show.contains("secret"), "{show}");

    assert_eq!(render_list(&[], now).lines().count(), 1);
}

#[test]
fn one_owner_at_a_time_and_the_cli_attaches_alongside() {
    let tmp = tempfile::tempdir().unwrap();
    let config = cfg(tmp.path());
    assert!(Spool::attach(config.clone()).is_err(), "no spool yet");
    let (owner, _) = Spool::open(config.clone()).unwrap();
    let err = Spool::open(config.clone()).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");

    let ready = owner.commit(State::Ready, &meta("r", T0), b"r").unwrap();
    let dead = owner.commit(State::Dead, &meta("r", T0), b"d").unwrap();
    let staging = owner.stage(at(T0)).unwrap();
    let cli = Spool::attach(config.clone()).unwrap();
    assert_eq!(cli.depth(State::Ready), 1);
    assert_eq!(cli.depth(State::Dead), 1);
    assert_eq!(cli.usage(), owner.usage() - record::HEADER_LEN);

    // The CLI's claim races the owner's like any other claimer.
    let owner_claim = owner.claim(&ready).unwrap().unwrap();
    assert!(cli.claim(&ready).unwrap().is_none());
    assert!(cli.find(&ready).unwrap().unwrap().claimed);
    owner_claim.release("503", at(T0 + 5)).unwrap();
    assert_eq!(cli.read(State::Ready, &ready).unwrap().0.attempts, 1);

    // Attaching never recovered anything: the owner's staging file is still there.
    assert_eq!(staging.body_len(), 0);
    assert_eq!(names(&owner.dir().join("tmp")).len(), 1);
    drop(staging);

    assert_eq!(
        cli.purge_received_before(State::Dead, at(T0 + 1)).unwrap(),
        1
    );
    assert!(owner.find(&dead).unwrap().is_none());
    drop(owner);
    assert!(Spool::open(config).is_ok(), "the lock goes with the owner");
}

#[test]
fn a_full_owner_notices_space_freed_by_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = cfg(tmp.path());
    config.max_bytes = 3000;
    let (owner, _) = Spool::open(config.clone()).unwrap();
    owner
        .commit(State::Dead, &meta("r", T0), &[0u8; 2000])
        .unwrap();
    let cli = Spool::attach(config).unwrap();
    assert_eq!(cli.purge(State::Dead, Duration::ZERO).unwrap(), 1);
    // The owner's count is stale, but it recounts the disk before refusing.
    owner
        .commit(State::Ready, &meta("r", T0), &[0u8; 2000])
        .unwrap();
    assert_eq!(owner.depth(State::Ready), 1);
}

#[test]
fn a_body_corrupted_after_start_up_is_quarantined_on_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(cfg(tmp.path())).unwrap();
    let id = spool
        .commit(State::Ready, &meta("r", T0), b"fragile body")
        .unwrap();
    let path = spool.dir().join("ready").join(id.as_str());
    let mut bytes = fs::read(&path).unwrap();
    bytes[45] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let mut claim = spool.claim(&id).unwrap().unwrap();
    assert!(matches!(claim.body(), Err(SpoolError::Corrupt { .. })));
    drop(claim);
    assert!(spool.list_ids(State::Ready).unwrap().is_empty());
    assert_eq!(
        names(&spool.dir().join("quarantine")),
        vec![format!("ready-{id}")]
    );
    assert_eq!(spool.depth(State::Ready), 0);
    assert_eq!(spool.usage(), 0);
}

#[test]
fn states_parse_from_the_command_line() {
    assert_eq!("dead".parse::<State>(), Ok(State::Dead));
    assert!(
        "inflight"
            .parse::<State>()
            .unwrap_err()
            .contains("ready, dead or archive")
    );
}

#[test]
fn handles_move_between_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync::<Spool>();
    send::<Claim>();
    send::<Staging>();
    send_sync::<SpoolError>();
}
