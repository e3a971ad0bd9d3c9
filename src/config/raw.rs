//! The serde mirror of `proxy.toml`: typed fields, unknown keys refused, every value kept with
//! its byte span so that validation can point at the line and column of a mistake.

// The fields mirror the TOML keys one to one; README.md documents each key.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::units::{ByteSize, Dur};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[server]`
    #[serde(default)]
    pub server: RawServer,
    /// `[defaults]`: any route key, inherited by every route.
    #[serde(default)]
    pub defaults: Option<Spanned<RawRoute>>,
    /// `[[routes]]`
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    /// `[incidents]`
    #[serde(default)]
    pub incidents: Option<RawIncidents>,
    /// `[spool]`
    #[serde(default)]
    pub spool: Option<RawSpool>,
}

/// `[spool]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub dir: Option<Spanned<PathBuf>>,
    pub max_bytes: Option<Spanned<ByteSize>>,
    pub min_free: Option<Spanned<ByteSize>>,
    pub retry_initial: Option<Spanned<Dur>>,
    pub retry_max: Option<Spanned<Dur>>,
    pub retry_for: Option<Spanned<Dur>>,
    pub redeliver_concurrency: Option<Spanned<i64>>,
    pub redeliver_interval: Option<Spanned<Dur>>,
    pub archive_for: Option<Spanned<Dur>>,
    pub backend: Option<Spanned<String>>,
    pub postgres_url_env: Option<Spanned<String>>,
    pub lease_for: Option<Spanned<Dur>>,
}

/// What the sender gets when its payload was spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSpoolResponse {
    /// `202 Accepted` with the spool id.
    Accepted,
    /// The receiver's own status (or the proxy's 502/504).
    Passthrough,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<SocketAddr>>,
    pub admin_listen: Option<Spanned<SocketAddr>>,
    pub header_read_timeout: Option<Spanned<Dur>>,
    pub body_idle_timeout: Option<Spanned<Dur>>,
    pub body_timeout: Option<Spanned<Dur>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub body_min_rate: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<Dur>>,
    pub max_header_bytes: Option<Spanned<ByteSize>>,
    pub max_concurrent_streams: Option<Spanned<i64>>,
    pub worker_threads: Option<Spanned<i64>>,
    pub buffer_budget: Option<Spanned<ByteSize>>,
    pub admin_token_env: Option<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

/// `[routes.verify]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// Optional when the route names a `sender`.
    pub scheme: Option<Spanned<String>>,
    pub header: Option<Spanned<String>>,
    pub encoding: Option<Spanned<String>>,
    pub secret_env: Spanned<String>,
    pub resign: Option<Spanned<RawResign>>,
    pub tolerance: Option<Spanned<Dur>>,
    pub public_url: Option<Spanned<String>>,
}

/// `resign = "same"` or `resign = { header = "...", secret_env = "..." }`
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "resign = \"same\", or resign = { header = \"X-...\", secret_env = \"...\" }"
)]
pub enum RawResign {
    /// `"same"` (checked in validation).
    Mode(String),
    /// Another header and secret.
    Header(RawResignHeader),
}

/// `resign = { header = "...", secret_env = "..." }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResignHeader {
    pub header: String,
    pub secret_env: String,
}

/// `[incidents]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIncidents {
    pub path: Option<Spanned<PathBuf>>,
    pub backend: Option<Spanned<String>>,
    pub postgres_url_env: Option<Spanned<String>>,
}

/// What to do with a payload over the receiver's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOversize {
    /// Send it on as is.
    Forward,
    /// Answer 413 without contacting the receiver.
    Reject,
    /// Shrink it by the route's trim rules.
    Trim,
}

/// One `[[routes]]` table, and the `[defaults]` table (which may not set the identity keys).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub max_body: Option<Spanned<ByteSize>>,
    pub upstream_limit: Option<Spanned<ByteSize>>,
    pub on_oversize: Option<Spanned<OnOversize>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub response_timeout: Option<Spanned<Dur>>,
    pub preserve_host: Option<Spanned<bool>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub protect: Option<Spanned<Vec<String>>>,
    pub on_trim_failure: Option<Spanned<OnTrimFailure>>,
    pub trim_dry_run: Option<Spanned<bool>>,
    pub limit_counts: Option<Spanned<LimitCounts>>,
    pub trim: Option<Vec<Spanned<RawTrimRule>>>,
    pub id_path: Option<Spanned<String>>,
    pub retry_on_413: Option<Spanned<bool>>,
    pub max_413_retries: Option<Spanned<i64>>,
    pub dedupe: Option<Spanned<Dur>>,
    pub verify: Option<Spanned<RawVerify>>,
    pub sender: Option<Spanned<String>>,
    pub spool: Option<Spanned<bool>>,
    pub on_spool_response: Option<Spanned<OnSpoolResponse>>,
    pub dead_letter: Option<Spanned<bool>>,
    pub spool_memory_threshold: Option<Spanned<ByteSize>>,
    pub archive_originals: Option<Spanned<bool>>,
    pub claim_check_url: Option<Spanned<String>>,
}

/// What to do when the trim rules cannot bring a payload under the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTrimFailure {
    /// Answer 413 (the receiver would reject it anyway).
    Reject,
    /// Send the smallest result reached.
    Forward,
}

impl OnTrimFailure {
    /// The value as written in the file (`reject`, `forward`), for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            OnTrimFailure::Reject => "reject",
            OnTrimFailure::Forward => "forward",
        }
    }
}

/// Which bytes `upstream_limit` counts when the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitCounts {
    /// The bytes on the wire (what nginx counts).
    Wire,
    /// The bytes after decoding `Content-Encoding` (what Express's body-parser counts).
    Decoded,
}

/// A trim action's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawAction {
    Truncate,
    Drop,
    KeepItems,
    KeepLines,
}

/// Which part of a truncated string survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawKeep {
    Head,
    Tail,
    HeadTail,
}

/// One `[[routes.trim]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrimRule {
    pub path: Spanned<String>,
    pub action: Spanned<RawAction>,
    pub keep: Option<Spanned<RawKeep>>,
    pub max_bytes: Option<Spanned<ByteSize>>,
    pub marker: Option<Spanned<String>>,
    pub head: Option<Spanned<i64>>,
    pub tail: Option<Spanned<i64>>,
}
