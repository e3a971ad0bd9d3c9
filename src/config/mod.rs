//! Stage 0 of the pipeline: `proxy.toml` → [`Config`].
//!
//! Loading is two steps, as in the style guide: [`raw`] is a serde mirror of the file with typed
//! units and spans, [`validate`] turns it into the runtime [`Config`] and reports every mistake at
//! once, each with the file, line, column and key at fault. `diagnostics` gets every syntax and
//! type mistake out of serde (which stops at the first) and renders them all with a caret.
//!
//! # Adding a key
//!
//! 1. Add the field to its struct in [`raw`] as `Option<Spanned<T>>`, with `T` one of `bool`,
//!    `i64`, `String`, `PathBuf`, `SocketAddr`, [`units::ByteSize`], [`units::Dur`] or a
//!    `#[serde(rename_all = "snake_case")]` enum. Nothing else is needed for its parse errors:
//!    unknown keys (with "did you mean" among the struct's fields), wrong types in plain words
//!    ("expected a whole number"), unknown enum values (with "did you mean" among the
//!    variants), the dotted key and the caret all come from serde's own error and the span. A
//!    new unit type's `Visitor::expecting` text becomes its "expected ..." wording.
//! 2. Read it in `validate` (route keys through `pick(&route.x, &defaults.x)`), and report
//!    each wrong relation with `rep.at(Some(value.span()), key("x"), "what is wrong: the fix")`
//!    where the key is the dotted path as in the file (`routes[0].x`); `rep.warn` for a valid
//!    but doubtful value. Every mistake is collected; none stops the others.
//! 3. Document it in README.md's tables; `tests/it/cli.rs` runs `check` on every TOML block
//!    of README.md and deploy/.

mod diagnostics;
pub mod presets;
pub mod raw;
pub mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;

use crate::trim::{RuleSet, RuleSpec};
use crate::verify::{Secret, Verifier};

pub use raw::{LimitCounts, OnOversize, OnSpoolResponse, OnTrimFailure};

/// Default `max_body` when neither the route nor `[defaults]` sets one.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Default `[server] max_header_bytes`.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Headers per request beyond which the request gets 431.
pub const MAX_HEADERS: usize = 100;
/// Default `[server] max_connections_per_ip`.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default `[server] body_min_rate`: 1 KiB/s.
pub const DEFAULT_BODY_MIN_RATE_BYTES: u64 = 1024;
/// Default `[server] buffer_budget`.
pub const DEFAULT_BUFFER_BUDGET_BYTES: u64 = 256 * 1024 * 1024;

/// Default `max_413_retries`.
pub const DEFAULT_MAX_413_RETRIES: u32 = 3;

impl LimitCounts {
    /// The units the trim stage measures in.
    pub fn units(self) -> crate::trim::payload::Units {
        match self {
            LimitCounts::Wire => crate::trim::payload::Units::Wire,
            LimitCounts::Decoded => crate::trim::payload::Units::Decoded,
        }
    }
}

/// The validated, runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages and relative paths).
    pub source: PathBuf,
    /// `[server]`
    pub server: ServerConfig,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteConfig>,
    /// `[incidents]`
    pub incidents: IncidentsConfig,
    /// `[spool]` (used by routes with `spool`, `dead_letter` or `archive_originals`).
    pub spool: SpoolSettings,
    /// What `check` warns about in a valid file (e.g. decimal size units).
    pub warnings: ConfigErrors,
}

/// `[spool]`: where undeliverable payloads, dead letters and archived originals are kept, and
/// how they are redelivered.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// The spool directory (relative paths resolve against the config file's folder).
    pub dir: PathBuf,
    /// Bytes the spool may hold.
    pub max_bytes: u64,
    /// Free disk space to keep.
    pub min_free: u64,
    /// First redelivery delay (doubles per attempt, with jitter).
    pub retry_initial: Duration,
    /// Longest redelivery delay.
    pub retry_max: Duration,
    /// How long a payload is retried before it goes to `dead/`.
    pub retry_for: Duration,
    /// Redeliveries at a time.
    pub redeliver_concurrency: usize,
    /// How often the redelivery task looks for due records.
    pub redeliver_interval: Duration,
    /// How long archived originals are kept.
    pub archive_for: Duration,
    /// Whether any route uses the spool (else it is not opened).
    pub used: bool,
    /// Where records are kept: the directory (`"disk"`) or PostgreSQL shared by replicas.
    pub backend: StoreBackend,
    /// How long a redelivery attempt holds a record in PostgreSQL before another replica may
    /// take it over (the attempt's lease).
    pub lease_for: Duration,
}

/// `backend = "disk" | "postgres"` of `[spool]` and `[incidents]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Files on this machine (the spool directory, the incident JSONL file).
    Disk,
    /// PostgreSQL, its URL in this environment variable.
    Postgres {
        /// The environment variable holding the database URL.
        url_env: String,
    },
}

/// `[server]`: listeners, timeouts and connection limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Public listener address.
    pub listen: SocketAddr,
    /// Admin listener (health, metrics), if any.
    pub admin_listen: Option<SocketAddr>,
    /// A connection that does not finish its request headers within this is closed.
    pub header_read_timeout: Duration,
    /// A sender that sends no body bytes for this long gets 408.
    pub body_idle_timeout: Duration,
    /// A body that is not complete within this gets 408.
    pub body_timeout: Duration,
    /// Open connections at most; at the cap the worst open connection is evicted, or the new
    /// one gets 503 (see [`crate::shed`]).
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per /64) at most; more get 503.
    pub max_connections_per_ip: usize,
    /// Bytes per second a request body must keep up after its first seconds when the proxy
    /// is short of connections (see [`crate::shed`]).
    pub body_min_rate_bytes: u64,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Request header section size beyond which the request gets 431.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Tokio worker threads (`None`: one per core).
    pub worker_threads: Option<usize>,
    /// Bytes all requests together may hold in memory while buffering.
    pub buffer_budget_bytes: u64,
    /// The environment variable holding the admin bearer token, if admin requests need one.
    pub admin_token_env: Option<String>,
    /// The admin bearer token (read from `admin_token_env` at load time).
    pub admin_token: Option<Secret>,
    /// TLS for the public listener.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: certificate chain and key, loaded and checked at load time.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The certificate chain file (PEM).
    pub cert_path: PathBuf,
    /// The private key file (PEM).
    pub key_path: PathBuf,
    /// The server configuration built from them (ALPN h2 and http/1.1).
    pub server_config: Arc<rustls::ServerConfig>,
}

/// `[routes.verify]`: sender authentication, with the secret read from the environment.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Checks the sender's signature.
    pub verifier: Verifier,
    /// The environment variable the secret came from (for messages; never the secret).
    pub secret_env: String,
    /// Re-signs a trimmed body for the receiver.
    pub resign: Option<Resign>,
    /// The URL the sender calls for this route (`public_url`), for schemes that sign the URL
    /// (Twilio); the rest of the request path and its query are appended.
    pub public_url: Option<String>,
}

impl VerifyConfig {
    /// The URL the sender called: `public_url`, then what follows the route's `path_prefix`
    /// in `path_and_query` (the request target as received).
    pub fn sender_url(&self, path_prefix: &str, path_and_query: &str) -> Option<String> {
        let base = self.public_url.as_deref()?;
        let rest = path_and_query
            .strip_prefix(path_prefix)
            .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            .unwrap_or("");
        Some(format!("{base}{rest}"))
    }
}

/// How a trimmed body is re-signed for the receiver.
#[derive(Debug, Clone)]
pub enum Resign {
    /// `resign = "same"`: in the sender's own scheme and headers, with the sender's secret,
    /// keeping its id and timestamp (the receiver changes nothing).
    Same,
    /// `resign = { header, secret_env }`: HMAC-SHA256 of the trimmed body into another header
    /// with another secret.
    Header(Verifier),
}

/// `[incidents]`: where the incident log goes.
#[derive(Debug, Clone)]
pub struct IncidentsConfig {
    /// The JSONL file (relative paths are resolved against the config file's folder).
    pub path: PathBuf,
    /// `backend = "postgres"`: incidents also go to the shared table, and `diagnose` reads
    /// them from there (every replica's).
    pub backend: StoreBackend,
}

/// One `[[routes]]` entry with `[defaults]` applied.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique route name (used in logs, incidents and metrics).
    pub name: String,
    /// Normalised path prefix: starts with `/`, no trailing `/` (unless it is `/`).
    pub path_prefix: String,
    /// The receiver's base URL.
    pub upstream: Uri,
    /// Hard cap on request bodies: larger gets 413, never forwarded.
    pub max_body_bytes: u64,
    /// What the receiver accepts, if known.
    pub upstream_limit_bytes: Option<u64>,
    /// What to do with a payload over `upstream_limit`.
    pub on_oversize: OnOversize,
    /// Upstream TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Time from sending the request until the upstream's response headers arrive.
    pub response_timeout: Duration,
    /// Keep the sender's `Host` header instead of the upstream authority.
    pub preserve_host: bool,
    /// Extra trusted CA certificates for an `https://` upstream (from `ca_file`).
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Trim rules and their settings, when the route has `[[routes.trim]]` rules.
    pub trim: Option<TrimConfig>,
    /// Where the payload's id lives (for incidents and idempotency keys).
    pub id_path: String,
    /// After a receiver's 413, trim lower and resend (on by default on trim routes).
    pub retry_on_413: bool,
    /// How many times one payload is trimmed lower and resent after 413s.
    pub max_413_retries: u32,
    /// Remember delivered payload ids for this long and answer exact repeats without
    /// forwarding them (`None`: off).
    pub dedupe: Option<Duration>,
    /// Sender authentication, if configured.
    pub verify: Option<VerifyConfig>,
    /// The sender preset (`sender`), if the route names one.
    pub sender: Option<&'static presets::Preset>,
    /// Spool payloads the receiver could not take, and acknowledge them with 202.
    pub spool: bool,
    /// What the sender gets when its payload was spooled.
    pub on_spool_response: OnSpoolResponse,
    /// Keep payloads the receiver refused for good (final 4xx) in `spool/dead/`.
    pub dead_letter: bool,
    /// Spool routes keep bodies up to this size in memory; larger ones go to a file.
    pub spool_memory_threshold: u64,
    /// Keep the untrimmed original of every trimmed payload in `spool/archive/`.
    pub archive_originals: bool,
    /// Base URL where the receiver can fetch archived originals (`<url>/<id>`).
    pub claim_check_url: Option<String>,
}

/// A route's trim settings with its rules compiled.
#[derive(Debug, Clone)]
pub struct TrimConfig {
    /// The compiled rules (shared: compiled once per config load).
    pub rules: Arc<RuleSet>,
    /// The rules as written, for `check` and reports.
    pub specs: Vec<RuleSpec>,
    /// Paths no rule may touch.
    pub protect: Vec<String>,
    /// What to do when the rules cannot reach the limit.
    pub on_failure: OnTrimFailure,
    /// Compute and record the trim, but forward the original.
    pub dry_run: bool,
    /// Whether `upstream_limit` counts wire or decoded bytes.
    pub limit_counts: LimitCounts,
}

/// One mistake in the configuration, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file's path as given.
    pub file: String,
    /// 1-based line (0 when the mistake has no place in the file).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The key at fault, as a dotted path (`routes[0].max_body`).
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The bytes at fault, to put a caret under.
    pub span: Option<Range<usize>>,
    /// A warning: the file is valid but probably not what was meant.
    pub warning: bool,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if self.warning {
            write!(f, "warning: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every mistake found in one configuration file, in file order, with the file's text (to show
/// the offending lines).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors {
    /// The mistakes (and, in [`Config::warnings`], the warnings).
    pub errors: Vec<ConfigError>,
    /// The file's text.
    pub text: Arc<str>,
}

impl ConfigErrors {
    /// Each mistake as `file:line:col: key: message`, then the offending line with a caret
    /// under the value or key at fault (what `check` prints). `Display` gives the first lines
    /// only, for logs and the `POST /reload` answer.
    pub fn render(&self) -> String {
        diagnostics::render(&self.text, &self.errors)
    }

    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {}: {}", path.display(), crate::config::io_words(source))]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
}

/// An I/O error in plain words, without Rust's `(os error 2)`.
pub(crate) fn io_words(err: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::NotFound => {
            "no such file (pass --config PATH, or run where proxy.toml is)".into()
        }
        ErrorKind::PermissionDenied => "permission denied".into(),
        ErrorKind::IsADirectory => "it is a directory, not a file".into(),
        ErrorKind::InvalidData => "not UTF-8 text".into(),
        _ => {
            let text = err.to_string();
            match text.split_once(" (os error") {
                Some((words, _)) => words.to_lowercase(),
                None => text,
            }
        }
    }
}

impl LoadError {
    /// What `check`, `run` and the other commands print: every mistake with its line and caret.
    pub fn render(&self) -> String {
        match self {
            LoadError::Read { .. } => format!("{self}\n"),
            LoadError::Invalid(errors) => errors.render(),
        }
    }

    /// Whether the file was missing or unreadable (exit 66) rather than invalid (exit 65).
    pub fn is_unreadable(&self) -> bool {
        matches!(self, LoadError::Read { .. })
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Config::from_str(&text, path)?)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder);
    /// secrets are read from the process environment.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        validate::validate(text, path, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_str`], with environment variables looked up by `env` (tests use a
    /// map instead of mutating the process environment).
    pub fn from_str_with_env(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        validate::validate(text, path, env)
    }

    /// The route with this name.
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }
}
