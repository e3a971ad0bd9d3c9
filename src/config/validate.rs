//! Raw configuration → [`Config`]: applies defaults, checks every value and relation, and
//! collects all mistakes (with their place in the file) instead of stopping at the first.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;
use toml::Spanned;

use super::presets::{self, Preset};
use super::raw::{
    OnOversize, OnSpoolResponse, RawAction, RawConfig, RawKeep, RawResign, RawRoute, RawSpool,
    RawVerify,
};
use super::units::{ByteSize, Dur, both_forms, decimal_unit, parse_size, thousands};
use super::{
    Config, ConfigError, ConfigErrors, DEFAULT_BODY_MIN_RATE_BYTES, DEFAULT_BUFFER_BUDGET_BYTES,
    DEFAULT_MAX_413_RETRIES, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_HEADER_BYTES, IncidentsConfig, LimitCounts, OnTrimFailure, Resign, RouteConfig,
    ServerConfig, SpoolSettings, StoreBackend, TlsConfig, TrimConfig, VerifyConfig,
};
use crate::trim::{ActionSpec, DEFAULT_PROTECT, Keep, RuleOrigin, RuleSet, RuleSpec};
use crate::verify::{Scheme, Secret, Verifier};
use http::HeaderName;

/// Collects errors, turning byte spans into line and column.
struct Reporter<'a> {
    text: &'a str,
    file: String,
    errors: Vec<ConfigError>,
    /// Valid but probably not meant (decimal size units next to binary-counting receivers).
    warnings: Vec<ConfigError>,
    /// Where secrets come from (the process environment, or a test's map).
    env: &'a Env<'a>,
}

/// Looks up an environment variable.
pub(super) type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

impl Reporter<'_> {
    /// Records a mistake at `span` (the value or key at fault) under the dotted `key`.
    fn at(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let err = self.located(span, key.into(), message.into(), false);
        self.errors.push(err);
    }

    /// Records a warning: the file stays valid.
    fn warn(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let err = self.located(span, key.into(), message.into(), true);
        self.warnings.push(err);
    }

    fn located(
        &self,
        span: Option<Range<usize>>,
        key: String,
        message: String,
        warning: bool,
    ) -> ConfigError {
        let (line, column) = match &span {
            Some(span) => line_col(self.text, span.start),
            None => (0, 0),
        };
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            key,
            message,
            span,
            warning,
        }
    }

    /// The collected entries in file order (those with no place in the file last).
    fn sorted(&self, mut errors: Vec<ConfigError>) -> ConfigErrors {
        errors.sort_by_key(|e| (e.line == 0, e.line, e.column));
        ConfigErrors {
            errors,
            text: Arc::from(self.text),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// Parses and validates the whole file.
pub(super) fn validate(text: &str, path: &Path, env: &Env<'_>) -> Result<Config, ConfigErrors> {
    let mut rep = Reporter {
        text,
        file: path.display().to_string(),
        errors: Vec::new(),
        warnings: Vec::new(),
        env,
    };
    // Syntax and type errors first (every one, see `diagnostics`), then the relations between
    // values on what did parse; an entry blanked for a parse error is not reported again (as
    // "missing", say).
    let (raw, parse_errors) = super::diagnostics::parse_all(text);
    let mut located = Vec::with_capacity(parse_errors.len());
    for e in &parse_errors {
        located.push(rep.located(
            Some(e.span.clone()),
            e.key.clone(),
            e.message.clone(),
            false,
        ));
    }
    let Some(raw) = raw else {
        return Err(rep.sorted(located));
    };
    let result = validate_raw(&raw, path, &mut rep);
    let blanked: Vec<&str> = parse_errors
        .iter()
        .map(|e| e.key.as_str())
        .filter(|k| !k.is_empty())
        .collect();
    let mut errors = std::mem::take(&mut rep.errors);
    errors.retain(|e| {
        !blanked.iter().any(|b| {
            e.key == *b
                || e.key
                    .strip_prefix(b)
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    });
    errors.extend(located);
    match result {
        Some(mut config) if errors.is_empty() => {
            let warnings = std::mem::take(&mut rep.warnings);
            config.warnings = rep.sorted(warnings);
            Ok(config)
        }
        _ => {
            errors.append(&mut rep.warnings);
            Err(rep.sorted(errors))
        }
    }
}

/// The relations between values of a file that parsed; `None` when any is wrong.
fn validate_raw(raw: &RawConfig, path: &Path, rep: &mut Reporter<'_>) -> Option<Config> {
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let server = validate_server(raw, &base_dir, rep);

    let incidents = IncidentsConfig {
        path: raw
            .incidents
            .as_ref()
            .and_then(|i| i.path.as_ref())
            .map(|p| resolve(&base_dir, p.get_ref()))
            .unwrap_or_else(|| base_dir.join("incidents.jsonl")),
        backend: raw.incidents.as_ref().map_or(StoreBackend::Disk, |i| {
            validate_backend(
                rep,
                "incidents",
                "file",
                i.backend.as_ref(),
                i.postgres_url_env.as_ref(),
            )
        }),
    };

    let defaults = raw.defaults.as_ref().map(|d| {
        for (key, span) in [
            ("name", d.get_ref().name.as_ref().map(Spanned::span)),
            (
                "path_prefix",
                d.get_ref().path_prefix.as_ref().map(Spanned::span),
            ),
        ] {
            if let Some(span) = span {
                rep.at(
                    Some(span),
                    format!("defaults.{key}"),
                    "is per route: set it in each [[routes]] table, not in [defaults]",
                );
            }
        }
        d.get_ref().clone()
    });
    let defaults = defaults.unwrap_or_default();

    if raw.routes.is_empty() {
        rep.at(
            None,
            "routes",
            "no routes: add at least one [[routes]] table with name, path_prefix and upstream",
        );
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut prefixes: HashMap<String, usize> = HashMap::new();
    for (index, spanned) in raw.routes.iter().enumerate() {
        let table_span = spanned.span();
        let route = spanned.get_ref();
        if let Some(name) = &route.name
            && let Some(first) = names.insert(name.get_ref().clone(), index)
        {
            rep.at(
                Some(name.span()),
                format!("routes[{index}].name"),
                format!(
                    "duplicate route name {:?} (also routes[{first}]): names must be unique",
                    name.get_ref()
                ),
            );
        }
        if let Some(prefix) = &route.path_prefix
            && let Ok(normal) = normalize_prefix(prefix.get_ref())
            && let Some(first) = prefixes.insert(normal.clone(), index)
        {
            rep.at(
                        Some(prefix.span()),
                        format!("routes[{index}].path_prefix"),
                        format!(
                            "duplicate path_prefix {normal:?} (also routes[{first}]): each prefix may belong to one route"
                        ),
                    );
        }
        if let Some(cfg) = validate_route(index, table_span, route, &defaults, &base_dir, rep) {
            routes.push(cfg);
        }
    }

    let mut spool = validate_spool(raw.spool.as_ref(), &base_dir, rep);
    spool.used = routes
        .iter()
        .any(|r| r.spool || r.dead_letter || r.archive_originals);
    if let StoreBackend::Postgres { .. } = spool.backend
        && let Some(route) = routes
            .iter()
            .filter(|r| r.spool)
            .find(|r| r.response_timeout >= spool.lease_for)
    {
        // A lease that runs out while the receiver is still answering lets another replica
        // send the same payload again.
        let span = raw
            .spool
            .as_ref()
            .and_then(|s| s.lease_for.as_ref())
            .map(Spanned::span);
        rep.at(
            span,
            "spool.lease_for",
            format!(
                "must be longer than route {:?}'s response_timeout ({}): raise lease_for or lower response_timeout",
                route.name,
                humantime::format_duration(route.response_timeout)
            ),
        );
    }
    rep.errors.is_empty().then(|| Config {
        source: path.to_path_buf(),
        server,
        routes,
        incidents,
        spool,
        warnings: ConfigErrors::default(),
    })
}

fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

fn positive(
    rep: &mut Reporter<'_>,
    value: Option<&Spanned<i64>>,
    key: &str,
    default: i64,
    max: i64,
) -> i64 {
    match value {
        None => default,
        Some(v) if *v.get_ref() >= 1 && *v.get_ref() <= max => *v.get_ref(),
        Some(v) => {
            rep.at(
                Some(v.span()),
                key,
                format!("must be between 1 and {max}, got {}", v.get_ref()),
            );
            default
        }
    }
}

/// A rate such as `"1KiB/s"`: a byte size per second, at least 1 byte.
fn rate(rep: &mut Reporter<'_>, value: Option<&Spanned<String>>, key: &str) -> u64 {
    let Some(v) = value else {
        return DEFAULT_BODY_MIN_RATE_BYTES;
    };
    let parsed = v
        .get_ref()
        .trim()
        .strip_suffix("/s")
        .and_then(|size| super::units::parse_size(size).ok())
        .filter(|bytes| *bytes >= 1);
    match parsed {
        Some(bytes) => bytes,
        None => {
            rep.at(
                Some(v.span()),
                key,
                format!(
                    "must be a size per second of at least 1 byte, like \"1KiB/s\", got {:?}",
                    v.get_ref()
                ),
            );
            DEFAULT_BODY_MIN_RATE_BYTES
        }
    }
}

fn nonzero_duration(
    rep: &mut Reporter<'_>,
    value: Option<&Spanned<super::units::Dur>>,
    key: &str,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(v) if v.get_ref().0.is_zero() => {
            rep.at(Some(v.span()), key, "must be longer than 0s");
            default
        }
        Some(v) => v.get_ref().0,
    }
}

fn validate_server(raw: &RawConfig, base_dir: &Path, rep: &mut Reporter<'_>) -> ServerConfig {
    let s = &raw.server;
    let admin_token = s.admin_token_env.as_ref().and_then(|env| {
        match (rep.env)(env.get_ref()).ok_or(()) {
            Ok(token) if token.trim().len() >= 16 => Some(Secret::new(token.trim().as_bytes().to_vec())),
            Ok(_) => {
                rep.at(
                    Some(env.span()),
                    "server.admin_token_env",
                    format!(
                        "environment variable {} holds a token shorter than 16 characters: use a long random token",
                        env.get_ref()
                    ),
                );
                None
            }
            Err(_) => {
                rep.at(
                    Some(env.span()),
                    "server.admin_token_env",
                    format!(
                        "environment variable {} is not set: export the admin bearer token in it",
                        env.get_ref()
                    ),
                );
                None
            }
        }
    });
    if let Some(admin) = s.admin_listen.as_ref()
        && !admin.get_ref().ip().is_loopback()
        && s.admin_token_env.is_none()
    {
        rep.at(
            Some(admin.span()),
            "server.admin_listen",
            format!(
                "{} is not a loopback address: set server.admin_token_env to an environment variable holding a bearer token, or listen on 127.0.0.1",
                admin.get_ref()
            ),
        );
    }
    let tls = s.tls.as_ref().and_then(|tls| {
        let t = tls.get_ref();
        let cert_path = resolve(base_dir, t.cert.get_ref());
        let key_path = resolve(base_dir, t.key.get_ref());
        match load_server_tls(&cert_path, &key_path) {
            Ok(server_config) => Some(TlsConfig {
                cert_path,
                key_path,
                server_config,
            }),
            Err((which, why)) => {
                let span = if which == "key" {
                    t.key.span()
                } else {
                    t.cert.span()
                };
                rep.at(Some(span), format!("server.tls.{which}"), why);
                None
            }
        }
    });
    let listen = s
        .listen
        .as_ref()
        .map(|l| *l.get_ref())
        .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid literal address"));
    let admin_listen = s.admin_listen.as_ref().map(|a| *a.get_ref());
    if let (Some(admin), Some(span)) = (admin_listen, s.admin_listen.as_ref().map(Spanned::span))
        && admin == listen
        && admin.port() != 0
    {
        rep.at(
            Some(span),
            "server.admin_listen",
            "must differ from server.listen",
        );
    }
    let max_header_bytes = match &s.max_header_bytes {
        None => DEFAULT_MAX_HEADER_BYTES,
        Some(v) if v.get_ref().0 < 8192 || v.get_ref().0 > 16 * 1024 * 1024 => {
            rep.at(
                Some(v.span()),
                "server.max_header_bytes",
                "must be between 8KiB and 16MiB",
            );
            DEFAULT_MAX_HEADER_BYTES
        }
        Some(v) => v.get_ref().0 as usize,
    };
    let buffer_budget_bytes = match &s.buffer_budget {
        None => DEFAULT_BUFFER_BUDGET_BYTES,
        Some(v) if v.get_ref().0 == 0 => {
            rep.at(
                Some(v.span()),
                "server.buffer_budget",
                "must be larger than 0 (it bounds memory used to buffer bodies for trimming)",
            );
            DEFAULT_BUFFER_BUDGET_BYTES
        }
        Some(v) => v.get_ref().0,
    };
    ServerConfig {
        listen,
        admin_listen,
        header_read_timeout: nonzero_duration(
            rep,
            s.header_read_timeout.as_ref(),
            "server.header_read_timeout",
            Duration::from_secs(10),
        ),
        body_idle_timeout: nonzero_duration(
            rep,
            s.body_idle_timeout.as_ref(),
            "server.body_idle_timeout",
            Duration::from_secs(30),
        ),
        body_timeout: nonzero_duration(
            rep,
            s.body_timeout.as_ref(),
            "server.body_timeout",
            Duration::from_secs(300),
        ),
        max_connections: positive(
            rep,
            s.max_connections.as_ref(),
            "server.max_connections",
            4096,
            1 << 20,
        ) as usize,
        max_connections_per_ip: positive(
            rep,
            s.max_connections_per_ip.as_ref(),
            "server.max_connections_per_ip",
            DEFAULT_MAX_CONNECTIONS_PER_IP as i64,
            1 << 20,
        ) as usize,
        body_min_rate_bytes: rate(rep, s.body_min_rate.as_ref(), "server.body_min_rate"),
        shutdown_grace: s
            .shutdown_grace
            .as_ref()
            .map_or(Duration::from_secs(30), |d| d.get_ref().0),
        max_header_bytes,
        max_concurrent_streams: positive(
            rep,
            s.max_concurrent_streams.as_ref(),
            "server.max_concurrent_streams",
            100,
            10_000,
        ) as u32,
        worker_threads: s.worker_threads.as_ref().map(|_| {
            positive(
                rep,
                s.worker_threads.as_ref(),
                "server.worker_threads",
                1,
                1024,
            ) as usize
        }),
        buffer_budget_bytes,
        admin_token_env: s.admin_token_env.as_ref().map(|e| e.get_ref().clone()),
        admin_token,
        tls,
    }
}

/// Loads a PEM certificate chain and key into a rustls server configuration offering h2 and
/// http/1.1 by ALPN. The error names the file at fault (`cert` or `key`).
pub(crate) fn load_server_tls(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let cert_pem = std::fs::read(cert_path)
        .map_err(|e| ("cert", format!("cannot read {}: {e}", cert_path.display())))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                "cert",
                format!("{} is not valid PEM: {e}", cert_path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((
            "cert",
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                cert_path.display()
            ),
        ));
    }
    let key_pem = std::fs::read(key_path)
        .map_err(|e| ("key", format!("cannot read {}: {e}", key_path.display())))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| {
            (
                "key",
                format!("{} is not valid PEM: {e}", key_path.display()),
            )
        })?
        .ok_or_else(|| {
            (
                "key",
                format!(
                    "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
                    key_path.display()
                ),
            )
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ("cert", format!("tls setup: {e}")))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        (
            "key",
            format!("the key does not fit the certificate, or is unsupported: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn validate_spool(
    raw: Option<&RawSpool>,
    base_dir: &Path,
    rep: &mut Reporter<'_>,
) -> SpoolSettings {
    let default = RawSpool::default();
    let s = raw.unwrap_or(&default);
    let dur = |rep: &mut Reporter<'_>, v: &Option<Spanned<Dur>>, key: &str, default: Duration| {
        nonzero_duration(rep, v.as_ref(), key, default)
    };
    let retry_initial = dur(
        rep,
        &s.retry_initial,
        "spool.retry_initial",
        Duration::from_secs(5),
    );
    let retry_max = dur(
        rep,
        &s.retry_max,
        "spool.retry_max",
        Duration::from_secs(3600),
    );
    if retry_max < retry_initial
        && let Some(m) = &s.retry_max
    {
        rep.at(
            Some(m.span()),
            "spool.retry_max",
            "must not be shorter than retry_initial",
        );
    }
    SpoolSettings {
        dir: s.dir.as_ref().map_or_else(
            || base_dir.join("spool"),
            |d| resolve(base_dir, d.get_ref()),
        ),
        max_bytes: s.max_bytes.as_ref().map_or(10 << 30, |m| m.get_ref().0),
        min_free: s.min_free.as_ref().map_or(1 << 30, |m| m.get_ref().0),
        retry_initial,
        retry_max,
        retry_for: dur(
            rep,
            &s.retry_for,
            "spool.retry_for",
            Duration::from_secs(72 * 3600),
        ),
        redeliver_concurrency: positive(
            rep,
            s.redeliver_concurrency.as_ref(),
            "spool.redeliver_concurrency",
            4,
            256,
        ) as usize,
        redeliver_interval: dur(
            rep,
            &s.redeliver_interval,
            "spool.redeliver_interval",
            Duration::from_secs(1),
        ),
        archive_for: dur(
            rep,
            &s.archive_for,
            "spool.archive_for",
            Duration::from_secs(30 * 24 * 3600),
        ),
        used: false,
        backend: validate_backend(
            rep,
            "spool",
            "disk",
            s.backend.as_ref(),
            s.postgres_url_env.as_ref(),
        ),
        lease_for: dur(
            rep,
            &s.lease_for,
            "spool.lease_for",
            Duration::from_secs(120),
        ),
    }
}

/// `backend` and `postgres_url_env` of `[spool]` (local value `"disk"`) or `[incidents]`
/// (`"file"`). The URL itself is only ever read from the environment: it holds a password.
fn validate_backend(
    rep: &mut Reporter<'_>,
    section: &str,
    local: &str,
    backend: Option<&Spanned<String>>,
    url_env: Option<&Spanned<String>>,
) -> StoreBackend {
    let postgres = match backend {
        None => false,
        Some(b) if b.get_ref() == local => false,
        Some(b) if b.get_ref() == "postgres" => true,
        Some(b) => {
            rep.at(
                Some(b.span()),
                format!("{section}.backend"),
                format!(
                    "unknown backend {:?}: use \"{local}\" or \"postgres\"",
                    b.get_ref()
                ),
            );
            false
        }
    };
    let env_name = url_env.map_or(crate::db::DEFAULT_URL_ENV, |e| e.get_ref().as_str());
    if !postgres {
        if let Some(e) = url_env {
            rep.at(
                Some(e.span()),
                format!("{section}.postgres_url_env"),
                "only used with backend = \"postgres\": set the backend or remove this key",
            );
        }
        return StoreBackend::Disk;
    }
    let span = url_env.map(Spanned::span).or(backend.map(Spanned::span));
    let key = format!("{section}.postgres_url_env");
    if env_name.is_empty()
        || !env_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        rep.at(
            span,
            key,
            format!("{env_name:?} is not an environment variable name"),
        );
    } else {
        match (rep.env)(env_name) {
            Some(url) if !url.is_empty() => {}
            _ => rep.at(
                span,
                key,
                format!(
                    "environment variable {env_name} is not set: export the database URL in it, e.g. postgres://payload_guard@db.internal/payload_guard (the URL holds a password, so it never goes in the TOML file)"
                ),
            ),
        }
    }
    StoreBackend::Postgres {
        url_env: env_name.to_owned(),
    }
}

/// Builds a route's sender verification, reading secrets from the environment. The route's
/// sender preset supplies the scheme when the table names none.
fn validate_verify(
    index: usize,
    raw: &Spanned<RawVerify>,
    preset: Option<&'static Preset>,
    rep: &mut Reporter<'_>,
) -> Option<VerifyConfig> {
    let key = |k: &str| format!("routes[{index}].verify.{k}");
    let v = raw.get_ref();
    let before = rep.errors.len();
    let encoding = match v.encoding.as_ref() {
        None => None,
        Some(e) => match e.get_ref().parse::<crate::verify::Encoding>() {
            Ok(enc) => Some(enc),
            Err(err) => {
                rep.at(Some(e.span()), key("encoding"), err.to_string());
                None
            }
        },
    };
    let scheme = match (v.scheme.as_ref(), preset) {
        (Some(name), _) => match Scheme::from_config(name.get_ref(), encoding) {
            Ok(s) => Some(s),
            Err(err) => {
                rep.at(Some(name.span()), key("scheme"), err.to_string());
                None
            }
        },
        (None, Some(p)) => match Scheme::from_config(p.scheme, encoding) {
            Ok(s) => Some(s),
            Err(err) => {
                let span = v
                    .encoding
                    .as_ref()
                    .map_or_else(|| raw.span(), Spanned::span);
                rep.at(Some(span), key("encoding"), err.to_string());
                None
            }
        },
        (None, None) => {
            rep.at(
                Some(raw.span()),
                key("scheme"),
                format!(
                    "missing: set scheme (one of {}), or sender on the route",
                    crate::verify::SCHEME_NAMES.join(", ")
                ),
            );
            None
        }
    };
    let header = match v.header.as_ref() {
        None => None,
        Some(h) => match HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                rep.at(
                    Some(h.span()),
                    key("header"),
                    format!("{:?} is not a valid header name", h.get_ref()),
                );
                None
            }
        },
    };
    let tolerance = match v.tolerance.as_ref() {
        Some(t) if scheme.is_some_and(|s| !s.has_timestamp()) => {
            rep.at(
                Some(t.span()),
                key("tolerance"),
                format!(
                    "scheme {} signs no timestamp: remove tolerance",
                    scheme.map_or("", Scheme::as_str)
                ),
            );
            None
        }
        other => Some(nonzero_duration(
            rep,
            other,
            &key("tolerance"),
            crate::verify::DEFAULT_TOLERANCE,
        )),
    };
    let public_url = match v.public_url.as_ref() {
        None => {
            if scheme.is_some_and(Scheme::needs_url) {
                rep.at(
                    Some(raw.span()),
                    key("public_url"),
                    "missing: Twilio signs the URL it calls; set public_url to that URL, e.g. \"https://guard.example.com/hooks/twilio\"",
                );
            }
            None
        }
        Some(url) => match url.get_ref().parse::<Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.query().is_none() =>
            {
                Some(url.get_ref().trim_end_matches('/').to_string())
            }
            _ => {
                rep.at(
                    Some(url.span()),
                    key("public_url"),
                    format!(
                        "{:?} is not an http(s) URL without query: write the URL the sender calls, like \"https://guard.example.com/hooks/twilio\"",
                        url.get_ref()
                    ),
                );
                None
            }
        },
    };
    let secret = read_secret(rep.env, v.secret_env.get_ref()).map_err(|why| {
        rep.at(Some(v.secret_env.span()), key("secret_env"), why);
    });
    let resign = v.resign.as_ref().and_then(|r| match r.get_ref() {
        RawResign::Mode(mode) if mode == "same" => match scheme {
            Some(s) if !s.signs_body() => {
                rep.at(
                    Some(r.span()),
                    key("resign"),
                    "has nothing to do for synthflow: its signature covers call.call_id, which trimming never changes; remove resign",
                );
                None
            }
            Some(s) if !s.can_resign() => {
                rep.at(
                    Some(r.span()),
                    key("resign"),
                    format!(
                        "scheme {} signs the URL and form parameters, not bytes the proxy can re-sign: remove resign, or do not trim this route",
                        s.as_str()
                    ),
                );
                None
            }
            _ => Some(Resign::Same),
        },
        RawResign::Mode(other) => {
            rep.at(
                Some(r.span()),
                key("resign"),
                format!(
                    "{other:?} is not a resign mode: write resign = \"same\", or resign = {{ header = \"X-...\", secret_env = \"...\" }}"
                ),
            );
            None
        }
        RawResign::Header(rr) => {
            if scheme == Some(Scheme::Synthflow) {
                rep.at(
                    Some(r.span()),
                    key("resign"),
                    "only applies to whole-body schemes: a synthflow signature covers call.call_id, which trimming never changes",
                );
                return None;
            }
            let header = HeaderName::from_bytes(rr.header.as_bytes())
                .map_err(|_| {
                    rep.at(
                        Some(r.span()),
                        key("resign.header"),
                        format!("{:?} is not a valid header name", rr.header),
                    )
                })
                .ok()?;
            let secret = read_secret(rep.env, &rr.secret_env)
                .map_err(|why| rep.at(Some(r.span()), key("resign.secret_env"), why))
                .ok()?;
            let scheme = Scheme::HmacSha256Body {
                encoding: match scheme {
                    Some(Scheme::HmacSha256Body { encoding }) => encoding,
                    _ => crate::verify::Encoding::Hex,
                },
            };
            Verifier::new(scheme, Some(header), secret)
                .map(Resign::Header)
                .map_err(|e| rep.at(Some(r.span()), key("resign"), e.to_string()))
                .ok()
        }
    });
    if rep.errors.len() > before {
        return None;
    }
    let verifier = Verifier::new(scheme?, header, secret.ok()?)
        .map_err(|e| {
            let span = match e {
                crate::verify::ConfigError::BadStandardWebhooksSecret => v.secret_env.span(),
                _ => raw.span(),
            };
            let name = match e {
                crate::verify::ConfigError::BadStandardWebhooksSecret => "secret_env",
                _ => "scheme",
            };
            rep.at(Some(span), key(name), e.to_string())
        })
        .ok()?
        .with_tolerance(tolerance.unwrap_or(crate::verify::DEFAULT_TOLERANCE));
    Some(VerifyConfig {
        verifier,
        secret_env: v.secret_env.get_ref().clone(),
        resign,
        public_url,
    })
}

fn read_secret(lookup: &Env<'_>, env: &str) -> Result<Secret, String> {
    match lookup(env) {
        Some(value) if !value.is_empty() => Ok(Secret::new(value.into_bytes())),
        Some(_) => Err(format!(
            "environment variable {env} is empty: export the secret in it"
        )),
        None => Err(format!(
            "environment variable {env} is not set: export the secret in it (secrets never go in the TOML file)"
        )),
    }
}

/// Picks the route's own value, else the `[defaults]` one.
fn pick<'a, T>(
    own: &'a Option<Spanned<T>>,
    default: &'a Option<Spanned<T>>,
) -> Option<&'a Spanned<T>> {
    own.as_ref().or(default.as_ref())
}

fn validate_route(
    index: usize,
    table_span: Range<usize>,
    route: &RawRoute,
    defaults: &RawRoute,
    base_dir: &Path,
    rep: &mut Reporter<'_>,
) -> Option<RouteConfig> {
    let key = |k: &str| format!("routes[{index}].{k}");
    let before = rep.errors.len();

    let name = match &route.name {
        Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            rep.at(
                Some(n.span()),
                key("name"),
                format!(
                    "invalid route name {:?}: use 1-64 letters, digits, '-' or '_'",
                    n.get_ref()
                ),
            );
            String::new()
        }
        None => {
            rep.at(
                Some(table_span.clone()),
                key("name"),
                "missing: every route needs a name",
            );
            String::new()
        }
    };

    let path_prefix = match &route.path_prefix {
        Some(p) => match normalize_prefix(p.get_ref()) {
            Ok(p) => p,
            Err(why) => {
                rep.at(Some(p.span()), key("path_prefix"), why);
                String::new()
            }
        },
        None => {
            rep.at(
                Some(table_span.clone()),
                key("path_prefix"),
                "missing: set the path this route serves, like \"/hooks/synthflow\"",
            );
            String::new()
        }
    };

    let upstream = match pick(&route.upstream, &defaults.upstream) {
        Some(u) => match parse_upstream(u.get_ref()) {
            Ok(uri) => Some(uri),
            Err(why) => {
                rep.at(Some(u.span()), key("upstream"), why);
                None
            }
        },
        None => {
            rep.at(
                Some(table_span.clone()),
                key("upstream"),
                "missing: set the receiver's URL, like \"http://127.0.0.1:3000/webhook\"",
            );
            None
        }
    };

    let max_body = pick(&route.max_body, &defaults.max_body);
    let max_body_bytes = match max_body {
        Some(m) if m.get_ref().0 == 0 => {
            rep.at(Some(m.span()), key("max_body"), "must be larger than 0");
            DEFAULT_MAX_BODY_BYTES
        }
        Some(m) => m.get_ref().0,
        None => DEFAULT_MAX_BODY_BYTES,
    };
    let upstream_limit = pick(&route.upstream_limit, &defaults.upstream_limit);
    let upstream_limit_bytes = upstream_limit.map(|l| l.get_ref().0);
    if let Some(limit) = upstream_limit {
        if limit.get_ref().0 == 0 {
            rep.at(
                Some(limit.span()),
                key("upstream_limit"),
                "must be larger than 0",
            );
        } else if limit.get_ref().0 > max_body_bytes {
            rep.at(
                Some(limit.span()),
                key("upstream_limit"),
                format!(
                    "{} is larger than max_body, {}: raise max_body or lower upstream_limit",
                    both_forms(limit.get_ref().0),
                    both_forms(max_body_bytes)
                ),
            );
        }
        decimal_unit_warning(rep, limit, &key("upstream_limit"));
    }

    let preset = match pick(&route.sender, &defaults.sender) {
        None => None,
        Some(s) => match presets::find(s.get_ref()) {
            Some(p) => Some(p),
            None => {
                rep.at(
                    Some(s.span()),
                    key("sender"),
                    format!(
                        "unknown sender {:?}: expected one of {}",
                        s.get_ref(),
                        presets::names()
                    ),
                );
                None
            }
        },
    };
    let trim = validate_trim(index, &table_span, route, defaults, preset, rep);
    let on_oversize = match pick(&route.on_oversize, &defaults.on_oversize) {
        Some(o)
            if *o.get_ref() == OnOversize::Trim
                && route.trim.is_none()
                && defaults.trim.is_none()
                && preset.is_none_or(|p| p.rules.is_empty()) =>
        {
            rep.at(
                Some(o.span()),
                key("on_oversize"),
                "\"trim\" needs trim rules: add [[routes.trim]] tables to this route, or use \"forward\" or \"reject\"",
            );
            OnOversize::Forward
        }
        Some(o) => *o.get_ref(),
        None if trim.is_some() => OnOversize::Trim,
        None => OnOversize::Forward,
    };

    let ca_certs = match pick(&route.ca_file, &defaults.ca_file) {
        None => Vec::new(),
        Some(file) => match load_ca(&resolve(base_dir, file.get_ref())) {
            Ok(certs) => certs,
            Err(why) => {
                rep.at(Some(file.span()), key("ca_file"), why);
                Vec::new()
            }
        },
    };
    if !ca_certs.is_empty()
        && let Some(u) = &upstream
        && u.scheme_str() != Some("https")
    {
        let span = pick(&route.ca_file, &defaults.ca_file).map(Spanned::span);
        rep.at(span, key("ca_file"), "only applies to an https:// upstream");
    }

    let connect_timeout = nonzero_duration(
        rep,
        pick(&route.connect_timeout, &defaults.connect_timeout),
        &key("connect_timeout"),
        Duration::from_secs(5),
    );
    let response_timeout = nonzero_duration(
        rep,
        pick(&route.response_timeout, &defaults.response_timeout),
        &key("response_timeout"),
        Duration::from_secs(60),
    );
    let retry_on_413 = match pick(&route.retry_on_413, &defaults.retry_on_413) {
        Some(r) if *r.get_ref() && (trim.is_none() || on_oversize != OnOversize::Trim) => {
            rep.at(
                Some(r.span()),
                key("retry_on_413"),
                "needs a trim route (on_oversize = \"trim\" with [[routes.trim]] rules): the retry trims the payload below the receiver's learned limit",
            );
            false
        }
        Some(r) => *r.get_ref(),
        // On by default where it can work: a receiver's 413 is answered by trimming lower.
        None => trim.is_some() && on_oversize == OnOversize::Trim,
    };
    let max_413_retries = match pick(&route.max_413_retries, &defaults.max_413_retries) {
        None => DEFAULT_MAX_413_RETRIES,
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(n) if n <= 10 => n,
            _ => {
                rep.at(
                    Some(n.span()),
                    key("max_413_retries"),
                    "expected a whole number from 0 to 10 (how many times a refused payload is trimmed lower and resent)",
                );
                DEFAULT_MAX_413_RETRIES
            }
        },
    };
    let dedupe = match pick(&route.dedupe, &defaults.dedupe) {
        None => None,
        Some(d) if d.get_ref().0.is_zero() => {
            rep.at(
                Some(d.span()),
                key("dedupe"),
                "must be longer than 0s: write the window, like \"24h\", or leave the key out",
            );
            None
        }
        Some(d) => Some(d.get_ref().0),
    };
    let claim_check_url = match pick(&route.claim_check_url, &defaults.claim_check_url) {
        None => None,
        Some(url) => match url.get_ref().parse::<Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() =>
            {
                Some(url.get_ref().trim_end_matches('/').to_string())
            }
            _ => {
                rep.at(
                    Some(url.span()),
                    key("claim_check_url"),
                    format!("{:?} is not an http(s) URL: write it like \"https://guard.example.com/originals\"", url.get_ref()),
                );
                None
            }
        },
    };
    let verify =
        pick(&route.verify, &defaults.verify).and_then(|v| validate_verify(index, v, preset, rep));
    let preserve_host =
        pick(&route.preserve_host, &defaults.preserve_host).is_some_and(|p| *p.get_ref());

    if rep.errors.len() > before {
        return None;
    }
    Some(RouteConfig {
        name,
        path_prefix,
        upstream: upstream?,
        max_body_bytes,
        upstream_limit_bytes,
        on_oversize,
        connect_timeout,
        response_timeout,
        preserve_host,
        ca_certs,
        trim,
        id_path: pick(&route.id_path, &defaults.id_path).map_or_else(
            || {
                preset
                    .and_then(|p| p.id_path)
                    .unwrap_or("call.call_id")
                    .to_string()
            },
            |p| p.get_ref().clone(),
        ),
        sender: preset,
        retry_on_413,
        max_413_retries,
        dedupe,
        verify,
        spool: pick(&route.spool, &defaults.spool).is_some_and(|v| *v.get_ref()),
        on_spool_response: pick(&route.on_spool_response, &defaults.on_spool_response)
            .map_or(OnSpoolResponse::Accepted, |v| *v.get_ref()),
        dead_letter: pick(&route.dead_letter, &defaults.dead_letter).is_some_and(|v| *v.get_ref()),
        spool_memory_threshold: pick(
            &route.spool_memory_threshold,
            &defaults.spool_memory_threshold,
        )
        .map_or(1024 * 1024, |v| v.get_ref().0),
        archive_originals: pick(&route.archive_originals, &defaults.archive_originals)
            .is_some_and(|v| *v.get_ref()),
        claim_check_url,
    })
}

/// Validates and compiles a route's trim rules (its own, else those in `[defaults]`).
fn validate_trim(
    index: usize,
    table_span: &Range<usize>,
    route: &RawRoute,
    defaults: &RawRoute,
    preset: Option<&'static Preset>,
    rep: &mut Reporter<'_>,
) -> Option<TrimConfig> {
    let key = |k: &str| format!("routes[{index}].{k}");
    let raw_rules = route.trim.as_ref().or(defaults.trim.as_ref());
    let protect_raw = pick(&route.protect, &defaults.protect);
    // A preset protects its own id path (an explicit id_path or protect wins).
    let id_path = pick(&route.id_path, &defaults.id_path).map(|p| p.get_ref().clone());
    let protect: Vec<String> = protect_raw.map_or_else(
        || match (preset, id_path) {
            (Some(_), Some(id)) => vec![id],
            (Some(p), None) => p.id_path.iter().map(|s| s.to_string()).collect(),
            (None, _) => DEFAULT_PROTECT.iter().map(|p| p.to_string()).collect(),
        },
        |p| p.get_ref().clone(),
    );
    let on_failure = pick(&route.on_trim_failure, &defaults.on_trim_failure)
        .map_or(OnTrimFailure::Reject, |o| *o.get_ref());
    let dry_run = pick(&route.trim_dry_run, &defaults.trim_dry_run).is_some_and(|d| *d.get_ref());
    let limit_counts = pick(&route.limit_counts, &defaults.limit_counts)
        .map_or(LimitCounts::Wire, |l| *l.get_ref());
    if raw_rules.is_none()
        && let Some(p) = preset.filter(|p| !p.rules.is_empty())
    {
        let specs = p.rule_specs();
        return match RuleSet::compile(&specs, &protect) {
            Ok(rules) => Some(TrimConfig {
                rules: Arc::new(rules),
                specs,
                protect,
                on_failure,
                dry_run,
                limit_counts,
            }),
            Err(errors) => {
                for err in errors {
                    let span = protect_raw.map_or_else(|| table_span.clone(), Spanned::span);
                    rep.at(
                        Some(span),
                        key("protect"),
                        format!(
                            "{} (sender {}'s trim rules: write [[routes.trim]] rules of your own to replace them)",
                            err.message, p.sender
                        ),
                    );
                }
                None
            }
        };
    }
    let Some(raw_rules) = raw_rules else {
        for (name, span) in [
            (
                "on_trim_failure",
                pick(&route.on_trim_failure, &defaults.on_trim_failure).map(Spanned::span),
            ),
            (
                "trim_dry_run",
                pick(&route.trim_dry_run, &defaults.trim_dry_run).map(Spanned::span),
            ),
        ] {
            if let Some(span) = span {
                rep.at(
                    Some(span),
                    key(name),
                    "has no effect without trim rules: add [[routes.trim]] tables or remove it",
                );
            }
        }
        return None;
    };
    if raw_rules.is_empty() {
        rep.at(
            Some(table_span.clone()),
            key("trim"),
            "is empty: add at least one rule with path and action",
        );
        return None;
    }
    let before = rep.errors.len();
    let mut specs = Vec::with_capacity(raw_rules.len());
    for (i, rule) in raw_rules.iter().enumerate() {
        let rule = rule.get_ref();
        let rkey = |k: &str| format!("routes[{index}].trim[{i}].{k}");
        let action = *rule.action.get_ref();
        let allowed: &[&str] = match action {
            RawAction::Truncate => &["keep", "max_bytes", "marker"],
            RawAction::Drop => &[],
            RawAction::KeepItems => &["head", "tail"],
            RawAction::KeepLines => &["head", "tail", "marker"],
        };
        let action_name = match action {
            RawAction::Truncate => "truncate",
            RawAction::Drop => "drop",
            RawAction::KeepItems => "keep_items",
            RawAction::KeepLines => "keep_lines",
        };
        for (name, span) in [
            ("keep", rule.keep.as_ref().map(Spanned::span)),
            ("max_bytes", rule.max_bytes.as_ref().map(Spanned::span)),
            ("marker", rule.marker.as_ref().map(Spanned::span)),
            ("head", rule.head.as_ref().map(Spanned::span)),
            ("tail", rule.tail.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span
                && !allowed.contains(&name)
            {
                rep.at(
                    Some(span),
                    rkey(name),
                    format!(
                        "does not apply to action \"{action_name}\" (it takes: {})",
                        if allowed.is_empty() {
                            "no options".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                );
            }
        }
        let mut count = |v: &Option<Spanned<i64>>, name: &str| -> usize {
            match v {
                None => 0,
                Some(n) if *n.get_ref() >= 0 => *n.get_ref() as usize,
                Some(n) => {
                    rep.at(Some(n.span()), rkey(name), "must be 0 or more");
                    0
                }
            }
        };
        let head = count(&rule.head, "head");
        let tail = count(&rule.tail, "tail");
        if matches!(action, RawAction::KeepItems | RawAction::KeepLines)
            && rule.head.is_none()
            && rule.tail.is_none()
        {
            rep.at(
                Some(rule.action.span()),
                rkey("action"),
                format!(
                    "\"{action_name}\" needs head and/or tail: how many items to keep from each end"
                ),
            );
        }
        let spec_action = match action {
            RawAction::Truncate => ActionSpec::Truncate {
                keep: match rule.keep.as_ref().map(|k| *k.get_ref()) {
                    Some(RawKeep::Head) => Keep::Head,
                    Some(RawKeep::Tail) => Keep::Tail,
                    Some(RawKeep::HeadTail) | None => Keep::HeadTail,
                },
                max_bytes: rule.max_bytes.as_ref().map(|m| m.get_ref().0),
                marker: rule.marker.as_ref().map(|m| m.get_ref().clone()),
            },
            RawAction::Drop => ActionSpec::Drop,
            RawAction::KeepItems => ActionSpec::KeepItems { head, tail },
            RawAction::KeepLines => ActionSpec::KeepLines {
                head,
                tail,
                marker: rule.marker.as_ref().map(|m| m.get_ref().clone()),
            },
        };
        specs.push(RuleSpec {
            path: rule.path.get_ref().clone(),
            action: spec_action,
        });
    }
    let rules = match RuleSet::compile(&specs, &protect) {
        Ok(rules) => Some(rules),
        Err(errors) => {
            for err in errors {
                let (span, name) = match err.origin {
                    RuleOrigin::Rule(i) => {
                        let rule = raw_rules[i].get_ref();
                        let span = match err.field {
                            "max_bytes" => rule.max_bytes.as_ref().map(Spanned::span),
                            "marker" => rule.marker.as_ref().map(Spanned::span),
                            _ => None,
                        }
                        .unwrap_or_else(|| {
                            // Point into the quoted path string at the mistake.
                            let s = rule.path.span();
                            let at = s.start + 1 + err.position.unwrap_or(0);
                            at..at
                        });
                        (span, format!("routes[{index}].trim[{i}].{}", err.field))
                    }
                    RuleOrigin::Protect(i) => (
                        protect_raw.map_or_else(|| table_span.clone(), Spanned::span),
                        format!("routes[{index}].protect[{i}]"),
                    ),
                };
                let message = match err.position {
                    Some(pos) => format!("{} (at char {pos})", err.message),
                    None => err.message.clone(),
                };
                rep.at(Some(span), name, message);
            }
            None
        }
    };
    if rep.errors.len() > before {
        return None;
    }
    Some(TrimConfig {
        rules: Arc::new(rules?),
        specs,
        protect,
        on_failure,
        dry_run,
        limit_counts,
    })
}

/// Warns when a receiver's limit is written with a decimal unit (`"1MB"`: 1,000,000 bytes):
/// nginx (`1m`), Express (`'1mb'`) and Flask (`1 * 1024 * 1024`) count 1,048,576.
fn decimal_unit_warning(rep: &mut Reporter<'_>, value: &Spanned<ByteSize>, key: &str) {
    let written = rep.text.get(value.span()).unwrap_or("").trim_matches('"');
    let Some(binary) = decimal_unit(written) else {
        return;
    };
    let number = written.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c.is_whitespace());
    let meant = format!("{number}{binary}");
    let meant_bytes = parse_size(&meant).unwrap_or(value.get_ref().0);
    let unit = written.trim_start_matches(number).trim();
    rep.warn(
        Some(value.span()),
        key,
        format!(
            "\"{written}\" is {}; did you mean \"{meant}\", {}? Express and nginx count 1{} as {} bytes",
            both_forms(value.get_ref().0),
            both_forms(meant_bytes),
            unit.to_ascii_lowercase(),
            thousands(parse_size(&format!("1{binary}")).unwrap_or(0)),
        ),
    );
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a `path_prefix` and strips a trailing `/`.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let hint = "write an absolute path like \"/hooks/synthflow\"";
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/': {hint}"));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| matches!(c, '?' | '#' | '*' | '%') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{prefix:?} contains {bad:?}: a prefix is a plain path without query, wildcard or escapes; {hint}"
        ));
    }
    if prefix.len() > 1 && prefix.contains("//") {
        return Err(format!("{prefix:?} has an empty segment ('//'): {hint}"));
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("{prefix:?} has a '.' or '..' segment: {hint}"));
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Checks an upstream URL: http or https, a host, no query or fragment.
fn parse_upstream(url: &str) -> Result<Uri, String> {
    let hint = "write it like \"http://127.0.0.1:3000/webhook\"";
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?} ({e}): {hint}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => {
            return Err(format!(
                "unsupported scheme {other:?} in {url:?}: use http:// or https://"
            ));
        }
        None => return Err(format!("{url:?} has no scheme: {hint}")),
    }
    match uri.authority() {
        Some(a) if !a.host().is_empty() => {}
        _ => return Err(format!("{url:?} has no host: {hint}")),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{url:?} has user info: credentials in the URL are not supported, remove them"
        ));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(format!(
            "{url:?} has a query or fragment: the sender's query string is passed on, so the upstream URL must not have one"
        ));
    }
    Ok(uri)
}

/// Reads PEM certificates from a CA file.
fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )),
        Err(e) => Err(format!("{} is not valid PEM: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        validate(text, Path::new("proxy.toml"), &|_| None)
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let route = format!(
            "{MINIMAL}[routes.verify]\nscheme = \"synthflow\"\nsecret_env = \"SF_SECRET\"\n"
        );
        let err = load(&route).unwrap_err();
        assert!(
            err.to_string()
                .contains("environment variable SF_SECRET is not set"),
            "{err}"
        );
        let env = |k: &str| (k == "SF_SECRET").then(|| "s3cret".to_string());
        let cfg = validate(&route, Path::new("proxy.toml"), &env).unwrap();
        assert!(cfg.routes[0].verify.is_some());
        assert!(
            !format!("{:?}", cfg.routes[0].verify).contains("s3cret"),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn postgres_backends_take_their_url_from_the_environment() {
        let spool_route = MINIMAL.replace("[[routes]]", "[[routes]]\nspool = true");
        let text = format!("[spool]\nbackend = \"postgres\"\n{spool_route}");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                "spool.postgres_url_env: environment variable PAYLOAD_GUARD_DATABASE_URL is not set"
            ),
            "{err}"
        );
        let env = |k: &str| (k == "DB_URL").then(|| "postgres://u:pw@db/x".to_string());
        let text = format!(
            "[incidents]\nbackend = \"postgres\"\npostgres_url_env = \"DB_URL\"\n[spool]\nbackend = \"postgres\"\npostgres_url_env = \"DB_URL\"\n{spool_route}"
        );
        let cfg = validate(&text, Path::new("proxy.toml"), &env).unwrap();
        let want = StoreBackend::Postgres {
            url_env: "DB_URL".into(),
        };
        assert_eq!((&cfg.spool.backend, &cfg.incidents.backend), (&want, &want));
        assert!(!format!("{cfg:?}").contains("pw@"), "the URL is never kept");
        assert_eq!(load(MINIMAL).unwrap().spool.backend, StoreBackend::Disk);

        let bad = load(&format!("[spool]\nbackend = \"redis\"\n{MINIMAL}")).unwrap_err();
        assert!(
            bad.to_string().contains("unknown backend \"redis\""),
            "{bad}"
        );
        let stray = load(&format!("[spool]\npostgres_url_env = \"X\"\n{MINIMAL}")).unwrap_err();
        assert!(
            stray.to_string().contains("only used with backend"),
            "{stray}"
        );
        let short = format!(
            "[spool]\nbackend = \"postgres\"\npostgres_url_env = \"DB_URL\"\nlease_for = \"10s\"\n{}",
            spool_route.replace("[[routes]]", "[[routes]]\nresponse_timeout = \"30s\"")
        );
        let err = validate(&short, Path::new("proxy.toml"), &env).unwrap_err();
        assert!(
            err.to_string()
                .contains("spool.lease_for: must be longer than route"),
            "{err}"
        );
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let text = format!("[server]\nadmin_listen = \"0.0.0.0:9090\"\n{MINIMAL}");
        let err = load(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("server.admin_listen: 0.0.0.0:9090 is not a loopback address"),
            "{err}"
        );
        let text = format!(
            "[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token_env = \"PG_TOKEN\"\n{MINIMAL}"
        );
        let env = |k: &str| (k == "PG_TOKEN").then(|| "0123456789abcdef0123".to_string());
        let cfg = validate(&text, Path::new("proxy.toml"), &env).unwrap();
        assert!(cfg.server.admin_token.is_some());
    }

    const MINIMAL: &str = r#"
[[routes]]
name = "a"
path_prefix = "/hooks/a/"
upstream = "http://127.0.0.1:3000/webhook"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = load(MINIMAL).unwrap();
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.server.body_timeout, Duration::from_secs(300));
        let r = &cfg.routes[0];
        assert_eq!(r.path_prefix, "/hooks/a");
        assert_eq!(r.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(r.on_oversize, OnOversize::Forward);
        assert_eq!(r.upstream_limit_bytes, None);
        assert_eq!(cfg.incidents.path, PathBuf::from("incidents.jsonl"));
    }

    #[test]
    fn defaults_apply_and_routes_override() {
        let cfg = load(
            r#"
[defaults]
max_body = "4MiB"
connect_timeout = "250ms"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "http://127.0.0.1:1/"
[[routes]]
name = "b"
path_prefix = "/b"
upstream = "http://127.0.0.1:1/"
max_body = 100
"#,
        )
        .unwrap();
        assert_eq!(cfg.routes[0].max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(cfg.routes[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(cfg.routes[1].max_body_bytes, 100);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = load("[server]\nlisten = \"127.0.0.1:1\"\nlisten_addr = 3\n").unwrap_err();
        let e = &err.errors[0];
        assert_eq!((e.line, e.column), (3, 1));
        assert_eq!(e.key, "server.listen_addr");
        assert!(e.message.contains("unknown key \"listen_addr\""), "{e}");
    }

    #[test]
    fn bad_size_and_duration_are_located() {
        let err = load(&format!("{MINIMAL}max_body = \"12 parsecs\"\n")).unwrap_err();
        assert_eq!(err.errors[0].line, 6, "{err}");
        assert!(err.errors[0].message.contains("expected a size"), "{err}");
        let err = load(&format!("{MINIMAL}connect_timeout = \"soon\"\n")).unwrap_err();
        assert!(
            err.errors[0].message.contains("expected a duration"),
            "{err}"
        );
    }

    #[test]
    fn all_relation_errors_are_collected() {
        let err = load(
            r#"
[[routes]]
name = "a"
path_prefix = "/a"
upstream = "ftp://x/"
max_body = "1MiB"
upstream_limit = "2MiB"
[[routes]]
name = "a"
path_prefix = "a"
upstream = "http://127.0.0.1:1/?q=1"
[[routes]]
name = "c"
path_prefix = "/a/"
upstream = "http://127.0.0.1:1/"
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "routes[0].upstream: unsupported scheme",
            "routes[0].upstream_limit: 2 MiB (2,097,152 bytes) is larger than max_body, 1 MiB (1,048,576 bytes)",
            "routes[1].path_prefix: \"a\" must start with '/'",
            "routes[1].upstream: \"http://127.0.0.1:1/?q=1\" has a query",
            "routes[2].path_prefix: duplicate path_prefix \"/a\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(text.starts_with("proxy.toml:5:12: "), "{text}");
    }

    #[test]
    fn duplicate_names_are_errors() {
        let err = load(&format!("{MINIMAL}{}", MINIMAL.replace("/hooks/a/", "/b"))).unwrap_err();
        assert!(
            err.to_string().contains("duplicate route name \"a\""),
            "{err}"
        );
    }

    #[test]
    fn trim_without_rules_is_an_error() {
        let err = load(&format!("{MINIMAL}on_oversize = \"trim\"\n")).unwrap_err();
        assert!(err.to_string().contains("needs trim rules"), "{err}");
    }

    #[test]
    fn trim_rules_compile_and_default_on_oversize_to_trim() {
        let cfg = load(&format!(
            "{MINIMAL}upstream_limit = \"1MiB\"\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\nkeep = \"head\"\nmax_bytes = \"200KiB\"\n[[routes.trim]]\npath = \"analysis.*_feedback\"\naction = \"drop\"\n"
        ))
        .unwrap();
        let r = &cfg.routes[0];
        assert_eq!(r.on_oversize, OnOversize::Trim);
        let trim = r.trim.as_ref().unwrap();
        assert_eq!(trim.specs.len(), 2);
        assert_eq!(trim.protect, ["call.call_id"]);
        assert_eq!(trim.on_failure, OnTrimFailure::Reject);
        assert_eq!(trim.limit_counts, LimitCounts::Wire);
    }

    #[test]
    fn trim_rule_errors_are_located() {
        let err = load(&format!(
            "{MINIMAL}[[routes.trim]]\npath = \"call..transcript\"\naction = \"truncate\"\n[[routes.trim]]\npath = \"call.call_id\"\naction = \"drop\"\n[[routes.trim]]\npath = \"x\"\naction = \"drop\"\nhead = 3\n[[routes.trim]]\npath = \"y\"\naction = \"keep_items\"\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "proxy.toml:7:14: routes[0].trim[0].path: empty segment",
            "routes[0].trim[1].path: ",
            "routes[0].trim[2].head: does not apply to action \"drop\"",
            "routes[0].trim[3].action: \"keep_items\" needs head and/or tail",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(text.contains("call.call_id"), "{text}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        assert_eq!(normalize_prefix("/a/b/").unwrap(), "/a/b");
        assert!(normalize_prefix("/a//b").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
        assert!(normalize_prefix("/a?x").is_err());
    }

    #[test]
    fn no_routes_is_an_error() {
        assert!(load("").unwrap_err().to_string().contains("no routes"));
    }
}
