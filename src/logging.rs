//! The process's log output: the tracing subscriber on stderr, made cheap enough to leave the
//! per-request access line on by default.
//!
//! Three things cost more than the rest of a small request's user-space work when every
//! request writes an INFO line through the stock formatter:
//! - the text formatter styles every field name through `nu_ansi_term` even when colours are
//!   off: [`PlainFields`] writes `name=value` directly when stderr is not a terminal;
//! - the timestamp is formatted from scratch for every line: [`CachedTime`] keeps the
//!   `YYYY-MM-DDTHH:MM:SS` part of the current second;
//! - every line was one `write(2)` to stderr: [`BufferedStderr`] gathers lines and writes them
//!   together, at the latest [`FLUSH_EVERY`] after the first one was logged, at once for WARN and
//!   ERROR lines (and everything before them), and when the process ends ([`flush`]).

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Level, Metadata};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};

/// The longest an INFO line waits in the buffer before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Lines are written as soon as this much is waiting.
const FLUSH_BYTES: usize = 32 * 1024;

/// Sets up the tracing subscriber: stderr, `RUST_LOG` or `info`, text lines or (`json`) one
/// JSON object a line.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_timer(CachedTime)
        .with_writer(BufferedStderr);
    let installed = match (json, ansi) {
        (false, true) => builder.try_init(),
        (false, false) => builder.fmt_fields(PlainFields).try_init(),
        (true, _) => builder.json().flatten_event(true).try_init(),
    };
    // Filters on span or field values (`target[span{field=value}]=level`) can only be applied
    // to events: then every access line goes through tracing.
    let field_filters = std::env::var("RUST_LOG").is_ok_and(|v| v.contains('['));
    DIRECT_ACCESS_LINES.store(
        installed.is_ok() && !json && !ansi && !field_filters,
        std::sync::atomic::Ordering::Relaxed,
    );
    install_panic_flush();
}

// ---------------------------------------------------------------------------------------------
// The access line

/// Whether [`write_access_line`] writes lines itself (the subscriber is [`init`]'s plain text
/// one, with no field filters).
static DIRECT_ACCESS_LINES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The fields of an access line for a request that ended without an error of the proxy's.
#[derive(Debug)]
pub(crate) struct AccessLine<'a> {
    pub(crate) route: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) peer: std::net::IpAddr,
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) upstream_status: u16,
    pub(crate) duration_ms: f64,
    pub(crate) request_id: &'a str,
    pub(crate) outcome: &'a str,
}

/// Logs the access line of a request that ended without an error of the proxy's, as
/// `INFO access: request route="…" method=… path=… peer=… status=… bytes_in=… bytes_out=…
/// upstream_status=… duration_ms=… request_id=… outcome="…"`.
///
/// With [`init`]'s plain text subscriber (stderr not a terminal, not JSON, no field filters in
/// `RUST_LOG`), the line is written here, byte for byte what tracing would write: through
/// tracing it costs about 7,000 instructions, a tenth of a small request (dispatch, then a
/// visitor call and a `fmt` round per field), written here about 1,500. Otherwise it is a
/// tracing event.
pub(crate) fn access_line(line: &AccessLine<'_>) {
    if !write_access_line(line) {
        tracing::info!(
            target: "access",
            route = line.route,
            method = %line.method,
            path = %line.path,
            peer = %crate::observe::PeerIp(line.peer),
            status = line.status,
            bytes_in = line.bytes_in,
            bytes_out = line.bytes_out,
            upstream_status = line.upstream_status,
            duration_ms = line.duration_ms,
            request_id = %line.request_id,
            outcome = line.outcome,
            "request"
        );
    }
}

/// Writes `line` directly when [`access_line`] may (nothing when `access` is not enabled at
/// INFO); false when it may not.
fn write_access_line(line: &AccessLine<'_>) -> bool {
    if !DIRECT_ACCESS_LINES.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    if !tracing::enabled!(target: "access", Level::INFO) {
        return true;
    }
    LINE.with(|cell| {
        let mut out = cell.borrow_mut();
        out.clear();
        if format_access_line(&mut out, line).is_ok() {
            let _ = BufferedStderr
                .make_writer_for(&ACCESS_INFO)
                .write_all(out.as_bytes());
        }
    });
    true
}

thread_local! {
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Metadata of an INFO line, for the writer (which only looks at the level).
static ACCESS_INFO: Metadata<'static> = {
    static FIELDS: &[&str] = &[];
    struct Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            &ACCESS_INFO
        }
    }
    Metadata::new(
        "request",
        "access",
        Level::INFO,
        None,
        None,
        None,
        tracing::field::FieldSet::new(FIELDS, tracing::callsite::Identifier(&Callsite)),
        tracing::metadata::Kind::EVENT,
    )
};

/// The whole line: timestamp, level, target, fields, newline.
fn format_access_line(out: &mut String, line: &AccessLine<'_>) -> fmt::Result {
    let mut w = Writer::new(out);
    CachedTime.format_time(&mut w)?;
    w.write_char(' ')?;
    access_line_fields(&mut w, line)
}

/// The line after its timestamp: level, target, fields, newline.
fn access_line_fields(w: &mut Writer<'_>, l: &AccessLine<'_>) -> fmt::Result {
    let quoted = |w: &mut Writer<'_>, v: &str| {
        if needs_no_escape(v) {
            w.write_char('"')
                .and_then(|()| w.write_str(v))
                .and_then(|()| w.write_char('"'))
        } else {
            write!(w, "{v:?}")
        }
    };
    let mut number = itoa::Buffer::new();
    w.write_str(" INFO access: request route=")?;
    quoted(w, l.route)?;
    w.write_str(" method=")?;
    w.write_str(l.method)?;
    w.write_str(" path=")?;
    w.write_str(l.path)?;
    write!(w, " peer={}", crate::observe::PeerIp(l.peer))?;
    w.write_str(" status=")?;
    w.write_str(number.format(l.status))?;
    w.write_str(" bytes_in=")?;
    w.write_str(number.format(l.bytes_in))?;
    w.write_str(" bytes_out=")?;
    w.write_str(number.format(l.bytes_out))?;
    w.write_str(" upstream_status=")?;
    w.write_str(number.format(l.upstream_status))?;
    w.write_str(" duration_ms=")?;
    write_f64(w, l.duration_ms)?;
    w.write_str(" request_id=")?;
    w.write_str(l.request_id)?;
    w.write_str(" outcome=")?;
    quoted(w, l.outcome)?;
    w.write_char('\n')
}

// ---------------------------------------------------------------------------------------------
// Output

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static FLUSHER: Once = Once::new();

/// Writes out whatever log lines are waiting. Called when the process ends.
pub fn flush() {
    let mut buf = BUFFER.lock().unwrap_or_else(PoisonError::into_inner);
    write_out(&mut buf);
}

fn write_out(buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    // Nowhere to report a failed write to stderr: the lines are dropped, as the stock
    // writer would.
    let _ = std::io::stderr().lock().write_all(buf);
    buf.clear();
    if buf.capacity() > 4 * FLUSH_BYTES {
        buf.shrink_to(2 * FLUSH_BYTES);
    }
}

/// A panic's message goes straight to stderr: write the lines logged before it first.
fn install_panic_flush() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut buf) = BUFFER.try_lock() {
                write_out(&mut buf);
            }
            previous(info);
        }));
    });
}

/// The log writer: stderr, with INFO and below gathered for at most [`FLUSH_EVERY`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferedStderr;

/// Receives one formatted line (the formatter writes each event with one `write_all`).
pub struct LineWriter {
    urgent: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut buf = BUFFER.lock().unwrap_or_else(PoisonError::into_inner);
        buf.extend_from_slice(line);
        if self.urgent || buf.len() >= FLUSH_BYTES {
            write_out(&mut buf);
        } else {
            FLUSHER.call_once(start_flusher);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A thread that writes waiting lines every [`FLUSH_EVERY`]; it sleeps otherwise.
fn start_flusher() {
    let spawned = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        });
    if spawned.is_err() {
        // No thread: nothing may wait, write every line at once from now on.
        URGENT_ALWAYS.store(true, std::sync::atomic::Ordering::Relaxed);
        flush();
    }
}

static URGENT_ALWAYS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            urgent: *meta.level() <= Level::WARN
                || URGENT_ALWAYS.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timestamps

/// RFC 3339 UTC timestamps with microseconds (`2026-11-30T04:34:10.376663Z`), the same text as
/// the stock timer; the date and time of the current second are formatted once a second.
#[derive(Debug, Clone, Copy, Default)]
pub struct CachedTime;

thread_local! {
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for CachedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        SECOND.with(|cell| {
            let mut cached = cell.borrow_mut();
            if cached.0 != secs {
                let full =
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
                        .to_string();
                // "YYYY-MM-DDTHH:MM:SSZ": keep all but the zone.
                cached.1 = full.trim_end_matches('Z').to_string();
                cached.0 = secs;
            }
            w.write_str(&cached.1)?;
            let micros = since.subsec_micros();
            let mut frac = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
            let mut n = micros;
            for slot in frac[1..7].iter_mut().rev() {
                *slot = b'0' + (n % 10) as u8;
                n /= 10;
            }
            // Only ASCII digits, '.' and 'Z' were written.
            w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Fields

/// The text formatter's fields without terminal styling: `message name=value ...`, values as
/// the stock formatter writes them (strings quoted, `%` values as displayed), control
/// characters in the message escaped as the stock formatter does.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes the separator and `name=` (nothing for the message); false when it must stop.
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        if self.empty {
            self.empty = false;
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return false;
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .writer
                .write_str(name)
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.start(field) {
            self.result = write_f64(&mut self.writer, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if self.start(field) {
            self.result = if needs_no_escape(value) {
                // What `{:?}` writes for it, without walking it char by char.
                self.writer
                    .write_char('"')
                    .and_then(|()| self.writer.write_str(value))
                    .and_then(|()| self.writer.write_char('"'))
            } else {
                write!(self.writer, "{value:?}")
            };
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        let mut out = Escaping(&mut self.writer);
        self.result = write!(out, "{value}");
        if let Some(first) = value.source() {
            let name = field.name();
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self.result.and_then(|()| write!(out, " {name}.sources=["));
            let mut source = Some(first);
            let mut sep = "";
            while let (Ok(()), Some(err)) = (self.result, source) {
                self.result = write!(out, "{sep}{err}");
                sep = ", ";
                source = err.source();
            }
            self.result = self.result.and_then(|()| out.write_char(']'));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            write!(Escaping(&mut self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

/// Printable ASCII other than `"` and `\\`: `{:?}` only adds the quotes.
fn needs_no_escape(value: &str) -> bool {
    value
        .bytes()
        .all(|b| matches!(b, 0x20..=0x7E) && b != b'"' && b != b'\\')
}

/// `value` as `{:?}` writes it. A value of thousandths (the access line's `duration_ms`) is
/// written with `itoa`, a tenth of the cost: it is the double nearest `k / 1000`, and as
/// doubles below 10^12 are far denser than 0.001, `k / 1000` in decimal is the shortest text
/// that reads back as it, which is what `{:?}` writes (with `.0` when whole).
fn write_f64(w: &mut Writer<'_>, value: f64) -> fmt::Result {
    let k = (value * 1000.0).round();
    if !(value.is_sign_positive() && k < 1e15 && k / 1000.0 == value) {
        return write!(w, "{value:?}");
    }
    let k = k as u64;
    w.write_str(itoa::Buffer::new().format(k / 1000))?;
    let frac = k % 1000;
    if frac == 0 {
        return w.write_str(".0");
    }
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = 3 - digits.iter().rev().take_while(|&&d| d == b'0').count();
    w.write_char('.')?;
    w.write_str(std::str::from_utf8(&digits[..len]).map_err(|_| fmt::Error)?)
}

/// Escapes the control characters a terminal would act on (as the stock formatter does for
/// messages and errors).
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or('\u{fffd}');
            match c {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", c as u32)?
                }
                c => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    /// Captures what a formatter writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<StdMutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    fn render(plain: bool, emit: impl FnOnce()) -> String {
        let out = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(out.clone());
        if plain {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn access_line() {
        let method = http::Method::POST;
        tracing::info!(
            target: "access",
            route = "bench",
            method = %method,
            path = %"/bench",
            status = 200u16,
            bytes_in = 1881u64,
            duration_ms = 0.353f64,
            delta = -3i64,
            ok = true,
            outcome = "complete",
            reason = %"the sender closed \"the\" connection",
            "request"
        );
    }

    #[test]
    fn plain_fields_write_what_the_stock_formatter_writes_without_colours() {
        assert_eq!(render(true, access_line), render(false, access_line));
        let line = render(true, access_line);
        assert!(
            line.contains("request route=\"bench\" method=POST path=/bench status=200 bytes_in=1881 duration_ms=0.353 delta=-3 ok=true outcome=\"complete\" reason=the sender closed \"the\" connection"),
            "{line}"
        );
    }

    proptest::proptest! {
        #[test]
        fn strings_and_durations_read_as_the_stock_formatter_writes_them(
            text in "\\PC{0,12}|[ -~]{0,24}",
            micros in proptest::prop_oneof![0u64..10_000_000, proptest::num::u64::ANY],
            other in proptest::num::f64::ANY,
        ) {
            let ms = micros as f64 / 1000.0;
            let emit = || tracing::info!(route = text.as_str(), duration_ms = ms, x = other, "request");
            proptest::prop_assert_eq!(render(true, emit), render(false, emit));
        }
    }

    proptest::proptest! {
        #[test]
        fn direct_access_lines_are_what_tracing_writes(
            route in "[a-z_-]{1,12}|\\PC{0,8}",
            method in proptest::sample::select(vec!["GET", "POST", "PATCH", "-"]),
            path in "/[a-zA-Z0-9/%._~-]{0,30}",
            v6 in proptest::bool::ANY,
            ip in proptest::num::u32::ANY,
            status in 100u16..600,
            bytes in (proptest::num::u64::ANY, 0u64..10_000_000),
            upstream_status in proptest::sample::select(vec![0u16, 200, 413, 502]),
            micros in 0u64..100_000_000,
            request_id in "[0-9a-f-]{1,36}",
            outcome in proptest::sample::select(vec!["complete", "sender_disconnected", "response_incomplete"]),
        ) {
            let peer = if v6 {
                std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::from(ip) << 64 | 1))
            } else {
                std::net::IpAddr::V4(ip.into())
            };
            let line = AccessLine {
                route: &route, method, path: &path, peer, status, bytes_in: bytes.0,
                bytes_out: bytes.1, upstream_status, duration_ms: micros as f64 / 1000.0,
                request_id: &request_id, outcome,
            };
            // Through tracing, as `init` sets it up for a file (the direct path is off in tests).
            let out = Capture::default();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_timer(CachedTime)
                .fmt_fields(PlainFields)
                .with_writer(out.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || super::access_line(&line));
            let traced = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let mut direct = String::new();
            format_access_line(&mut direct, &line).unwrap();
            // The same text after the timestamp, which is as long in both.
            let stamp = "2026-11-30T04:34:10.376663Z".len();
            proptest::prop_assert_eq!(&direct[stamp..], &traced[stamp..]);
            proptest::prop_assert!(direct.starts_with(&traced[..17]), "{} / {}", direct, traced);
        }
    }

    #[test]
    fn control_characters_in_messages_are_escaped_like_the_stock_formatter() {
        let emit = || tracing::warn!("bell\x07 and \x1b[31mred\u{85}");
        let plain = render(true, emit);
        assert_eq!(plain, render(false, emit));
        assert!(
            plain.contains("bell\\x07 and \\x1b[31mred\\u{85}"),
            "{plain}"
        );
    }

    #[test]
    fn cached_timestamps_are_rfc3339_with_microseconds() {
        let mut s = String::new();
        CachedTime.format_time(&mut Writer::new(&mut s)).unwrap();
        let mut again = String::new();
        CachedTime
            .format_time(&mut Writer::new(&mut again))
            .unwrap();
        for t in [&s, &again] {
            assert_eq!(t.len(), "2026-11-30T04:34:10.376663Z".len(), "{t}");
            assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.');
            let parsed = humantime::parse_rfc3339(t).expect("parses as RFC 3339");
            let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
            assert!(off < Duration::from_secs(60), "{t} is not now");
        }
        assert!(again >= s, "{again} before {s}");
    }
}
