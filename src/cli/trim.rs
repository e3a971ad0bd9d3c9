//! `payload-guard trim`: run a route's trim stage on a payload file (or stdin) and write the
//! exact bytes the proxy would forward to stdout, with a report on stderr.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;

use crate::config::Config;
use crate::config::units::human_bytes;
use crate::trim::payload::{self, Encoding};

use super::{EXIT_DATAERR, EXIT_NOINPUT, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE};

/// Trims `file` (stdin when `None`) by `route`'s rules.
pub(super) fn trim(config: &Path, route: &str, file: Option<&Path>) -> u8 {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(err) => return super::config_failed(&err),
    };
    match run(&config, route, file) {
        Ok(true) => EXIT_OK,
        Ok(false) => EXIT_PROBLEMS,
        Err((code, err)) => {
            eprintln!("payload-guard trim: {err:#}");
            code
        }
    }
}

/// `Ok(fits)`, or the exit code and why: 64 for a route that cannot trim, 66 for an unreadable
/// payload, 65 for one that is not JSON.
fn run(
    config: &Config,
    route_name: &str,
    file: Option<&Path>,
) -> Result<bool, (u8, anyhow::Error)> {
    let usage = |e: anyhow::Error| (EXIT_USAGE, e);
    let (route, tc, units, limit) = route_for(config, route_name).map_err(usage)?;
    let body = match file {
        Some(path) => std::fs::File::open(path)
            .and_then(read_file)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(|e| (EXIT_NOINPUT, e))?,
        None => read_stdin()
            .context("cannot read stdin")
            .map_err(|e| (EXIT_NOINPUT, e))?,
    };
    let _ = route;
    let policy = crate::prepare::Policy {
        rules: &tc.rules,
        units,
        dry_run: false,
        resign: None,
        stamp: None,
    };
    let prepared = crate::trim::Document::parse(&body)
        .map_err(payload::ShrinkError::from)
        .and_then(|doc| {
            crate::prepare::prepare(&policy, &body, &doc, Encoding::Identity, limit, units)
        })
        .with_context(|| {
            format!(
                "cannot trim {}",
                file.map_or("stdin".into(), |p| p.display().to_string())
            )
        })
        .map_err(|e| (EXIT_DATAERR, e))?;
    let Some(shrunk) = prepared.shrunk.as_ref() else {
        return Err((
            EXIT_DATAERR,
            anyhow::anyhow!("the trim rules did not run on the payload"),
        ));
    };
    // The bytes to write are the prepared body (the report does not keep a copy).
    report(route_name, tc, &body, &prepared.body, shrunk, limit).map_err(|e| (EXIT_NOINPUT, e))?;
    Ok(shrunk.fits)
}

/// All of stdin. Redirected from a file (`< payload.json`), it is read like one (see
/// [`read_file`]) rather than into a buffer that doubles as it fills.
fn read_stdin() -> std::io::Result<Bytes> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        if file.metadata().is_ok_and(|m| m.is_file()) {
            return read_file(file);
        }
    }
    let mut body = Vec::new();
    std::io::stdin().lock().read_to_end(&mut body)?;
    Ok(Bytes::from(body))
}

/// Inputs of at least this many bytes are read into memory backed by transparent huge pages
/// where the kernel offers them (see [`huge::read`]).
const HUGE_INPUT: u64 = 4 * 1024 * 1024;

/// All of `file` from its current position, in one go into a buffer of the size left in it.
fn read_file(file: std::fs::File) -> std::io::Result<Bytes> {
    use std::io::Seek;
    let at = (&file).stream_position().unwrap_or(0);
    let left = file.metadata().map_or(0, |m| {
        if m.is_file() {
            m.len().saturating_sub(at)
        } else {
            0
        }
    });
    #[cfg(target_os = "linux")]
    if left >= HUGE_INPUT
        && let Some(body) = huge::read(&file, at, left)?
    {
        return Ok(body);
    }
    // `File::read_to_end` reserves the bytes left in the file before reading.
    let mut body = Vec::new();
    (&file).read_to_end(&mut body)?;
    Ok(Bytes::from(body))
}

/// A large input read into anonymous memory the kernel may back with 2 MiB pages, by two
/// threads.
///
/// Read into a fresh `Vec`, a 20 MiB payload costs 5,120 page faults (each charging and zeroing
/// 4 KiB) and as many pages to free at exit: about a third of the whole command's time. With
/// THP in `madvise` mode (a common default), memory only gets huge pages when asked for them,
/// and the allocator never asks (the `no_thp` build keeps the proxy's RSS low). So the `trim`
/// command reads a large input into a 2 MiB-aligned anonymous mapping of its own, advised
/// `MADV_HUGEPAGE`, which faults in about ten huge pages instead. Where THP is unavailable,
/// `never`, or disabled for the process, the advice fails or does nothing and the same bytes
/// land in 4 KiB pages. The file itself is never mapped (it could change under the mapping).
///
/// Even so, the kernel's part (zeroing the new pages, copying the file's bytes out of the page
/// cache) is about 60% of the command's time, and it is the same work for any two halves of the
/// buffer: so the second half is read by a second thread (`pread` at its offset) while this one
/// reads the first. Where no thread can be started, this one reads both.
#[cfg(target_os = "linux")]
mod huge {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::FileExt;

    use bytes::Bytes;
    use memmap2::{Advice, MmapOptions};

    /// The PMD size on x86-64 and 4 KiB-page arm64 (elsewhere the advice just finds fewer).
    const HUGE_PAGE: usize = 2 * 1024 * 1024;

    /// All of `file` from its current position `at` (`left` bytes expected), or `None` when no
    /// anonymous mapping could be made (the caller reads into a `Vec`). The file's position
    /// ends after the bytes read, as with a plain read.
    pub(super) fn read(file: &std::fs::File, at: u64, left: u64) -> std::io::Result<Option<Bytes>> {
        // One byte past the expected end, to see the end without a second buffer.
        let Some(want) = usize::try_from(left).ok().and_then(|n| n.checked_add(1)) else {
            return Ok(None);
        };
        // Whole huge pages, and one more so that a 2 MiB boundary can start the buffer
        // wherever the kernel places the mapping (pages never touched cost nothing).
        let Some(len) = want
            .checked_next_multiple_of(HUGE_PAGE)
            .and_then(|n| n.checked_add(HUGE_PAGE))
        else {
            return Ok(None);
        };
        let Ok(mut map) = MmapOptions::new().len(len).map_anon() else {
            return Ok(None);
        };
        let start = map.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // Advice only: it changes no byte and fails harmlessly where THP is not built in.
        let _ = map.advise(Advice::HugePage);
        let mut file = file;
        let n = fill_in_halves(file, at, &mut map[start..start + want])?;
        file.seek(SeekFrom::Start(at + n as u64))?;
        if n < want {
            return Ok(Some(Bytes::from_owner(map).slice(start..start + n)));
        }
        // The file grew since its size was read: the rest goes into a `Vec`.
        let mut body = map[start..start + n].to_vec();
        file.read_to_end(&mut body)?;
        Ok(Some(Bytes::from(body)))
    }

    /// Reads the bytes at `at..` of `file` into `buf` until it is full or the file ends, the
    /// half from the first huge-page boundary past its middle on a second thread; the bytes
    /// read. A first half that comes back short means the file ended there (what the second
    /// thread saw of a file changing meanwhile is then ignored).
    fn fill_in_halves(file: &std::fs::File, at: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let mid = (buf.len() / 2).next_multiple_of(HUGE_PAGE).min(buf.len());
        let (head, tail) = buf.split_at_mut(mid);
        let tail_at = at + mid as u64;
        // Both halves start once the second thread runs: starting a thread maps its stack,
        // which waits behind the huge-page faults of a read already under way (measured: the
        // second thread then only starts when the first half is done).
        let started = std::sync::Barrier::new(2);
        let (head_read, second) = std::thread::scope(|scope| {
            let second = std::thread::Builder::new()
                .name("trim-read".into())
                .spawn_scoped(scope, || {
                    started.wait();
                    fill_at(file, tail_at, tail)
                });
            if second.is_ok() {
                started.wait();
            }
            let head_read = fill_at(file, at, head);
            let second = second.map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the reading thread failed")))
            });
            (head_read, second)
        });
        // No thread could be started: this one reads the second half too.
        let tail_read = second.unwrap_or_else(|_| fill_at(file, tail_at, tail));
        let head_read = head_read?;
        if head_read < mid {
            return Ok(head_read);
        }
        Ok(mid + tail_read?)
    }

    /// Reads the bytes at `at..` of `file` into `buf` until it is full or the file ends; the
    /// bytes read.
    fn fill_at(file: &std::fs::File, at: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], at + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// The route, its trim settings, the units its limit counts and the limit to trim to.
fn route_for<'a>(
    config: &'a Config,
    route_name: &str,
) -> anyhow::Result<(
    &'a crate::config::RouteConfig,
    &'a crate::config::TrimConfig,
    payload::Units,
    u64,
)> {
    let Some(route) = config.route(route_name) else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        bail!(
            "no route named {route_name:?} in {} (routes: {})",
            config.source.display(),
            names.join(", ")
        );
    };
    let Some(tc) = route.trim.as_ref() else {
        bail!("route {route_name:?} has no trim rules: add [[routes.trim]] tables to it");
    };
    let units = tc.limit_counts.units();
    let learned = crate::state::LearnedLimits::open(crate::state::limits_path(config));
    let Some(limit) = learned.limit(route_name, units, route.upstream_limit_bytes) else {
        bail!(
            "route {route_name:?} has no upstream_limit (and none was learned yet): nothing to trim to"
        );
    };
    Ok((route, tc, units, limit))
}

/// Writes the trimmed bytes to stdout and the report to stderr.
fn report(
    route_name: &str,
    tc: &crate::config::TrimConfig,
    body: &[u8],
    out: &[u8],
    shrunk: &payload::Shrunk,
    limit: u64,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out).context("cannot write stdout")?;
    stdout.flush().context("cannot write stdout")?;

    let mut report = format!(
        "route {route_name}: {} -> {} (target {}, {} bytes)\n",
        human_bytes(body.len() as u64),
        human_bytes(out.len() as u64),
        human_bytes(limit),
        limit
    );
    if shrunk.applied.is_empty() {
        report.push_str("  nothing removed: the payload already fits\n");
    }
    for a in &shrunk.applied {
        let rule = &tc.specs[a.rule];
        let what = match a.marked {
            // The marker's number is what was cut; the body shrank by that less the marker.
            Some(cut) => format!(
                "{cut} bytes removed (as its marker says), the body {} bytes smaller",
                a.removed
            ),
            None => format!("{} bytes removed", a.removed),
        };
        report.push_str(&format!(
            "  rule {} ({} {}): {}: {what}\n",
            a.rule,
            rule.path,
            super::check::describe_action(&rule.action),
            a.path,
        ));
    }
    report.push_str(if shrunk.fits {
        "fits: yes\n"
    } else {
        "fits: no (the smallest result was written; the rules cannot reach the target)\n"
    });
    eprint!("{report}");
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::{HUGE_INPUT, huge, read_file};

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        file
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn large_files_are_read_whole_at_any_size() {
        const MIB: usize = 1024 * 1024;
        // Around the threshold and around whole 2 MiB pages (the probe byte lands on the next).
        for len in [
            HUGE_INPUT as usize,
            HUGE_INPUT as usize + 1,
            6 * MIB - 1,
            6 * MIB,
            6 * MIB + 1,
        ] {
            let bytes = pattern(len);
            let body = read_file(file_of(&bytes)).unwrap();
            assert!(body[..] == bytes[..], "{len} bytes");
        }
    }

    #[test]
    fn a_file_that_changed_size_since_it_was_measured_is_read_to_its_end() {
        let bytes = pattern(5 * 1024 * 1024 + 3);
        // Grew: more than the size the buffer was made for.
        let body = huge::read(&file_of(&bytes), 0, 4 * 1024 * 1024)
            .unwrap()
            .unwrap();
        assert!(body[..] == bytes[..]);
        let body = huge::read(&file_of(&bytes), 0, bytes.len() as u64 - 1)
            .unwrap()
            .unwrap();
        assert!(body[..] == bytes[..]);
        // Shrank: fewer, into the second half of the buffer, then not even to its middle.
        let body = huge::read(&file_of(&bytes), 0, 8 * 1024 * 1024)
            .unwrap()
            .unwrap();
        assert!(body[..] == bytes[..]);
        let body = huge::read(&file_of(&bytes), 0, 16 * 1024 * 1024)
            .unwrap()
            .unwrap();
        assert!(body[..] == bytes[..]);
    }

    #[test]
    fn a_file_is_read_from_its_current_position() {
        let bytes = pattern(HUGE_INPUT as usize + 100);
        let mut file = file_of(&bytes);
        file.seek(SeekFrom::Start(100)).unwrap();
        let body = huge::read(&file, 100, bytes.len() as u64 - 100)
            .unwrap()
            .unwrap();
        assert!(body[..] == bytes[100..]);
        // And leaves the file's position at its end, as a plain read does.
        assert_eq!(file.stream_position().unwrap(), bytes.len() as u64);
        file.seek(SeekFrom::Start(100)).unwrap();
        let body = read_file(file).unwrap();
        assert!(body[..] == bytes[100..]);
    }
}
