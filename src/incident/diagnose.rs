//! `payload-guard diagnose`: reads the incident log back and explains it per route — what
//! happened, how big the payloads were, which fields made them big, who refused them, what
//! the receiver is known to accept, and the concrete fix: the setting to raise on the
//! identified receiver, or the trim rule that would have saved the most requests.
//!
//! [`read_log`] is the only part that touches the file; [`diagnose`] and [`render_text`] are
//! pure. The [`Report`] serializes as the stable `--format json` output. Unlike the log, the
//! report writes every key, with `null` for an unknown value, so that scripts can index it
//! without checking for keys; only `learned` keeps the log's form (unknown ends omitted).
//! The CLI prints [`LogRead::warnings`] to stderr and, when
//! [`LogRead::nothing_to_diagnose`] says so, that message instead of a report (exit 0).
//!
//! # Counting
//!
//! - Incident counts (by kind, by action, by rejector) count log lines.
//! - Sizes, dominant fields and the trim suggestion count **requests**: one exchange often
//!   logs several incidents (`over_upstream_limit` with `action = "forwarded"`, then
//!   `upstream_413`), and its payload must count once. A request's size is the largest
//!   [`Incident::payload_bytes`] among its incidents.
//! - Percentiles are nearest-rank. Requests whose only incidents are
//!   `buffer_budget_exhausted` have no meaningful size (the body was cut off) and are left out.
//! - The setting recommended for a receiver is sized from the p99 of the payloads meant for it
//!   (`over_max_body` requests never reach it) plus [`HEADROOM_PERCENT`], rounded up to a whole
//!   MiB.
//! - A trim rule "saves" a request that was over the receiver's limit (refused by the receiver,
//!   or by the proxy without trimming) if cutting the field down to about [`TRIM_KEEP_BYTES`]
//!   would bring the request under the route's effective limit, computed from its recorded
//!   `top_fields`. Rules touching a protected path ([`PROTECTED_PATHS`]) or already covered by
//!   one of the route's own rules are never suggested; requests without `top_fields` count as
//!   not saved.
//! - Settings of the route itself are corrected from the evidence: an `upstream_limit` at or
//!   above a size the receiver refused (the line to paste is the learned limit; it "saves" the
//!   receiver's 413s over it), and `limit_counts = "decoded"` when the receiver refused
//!   compressed bodies whose wire size was under the limit.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::learn::{Bracket, LimitLearner, effective_limit};
use super::{Action, FieldBytes, Incident, Kind, Rejector};
use crate::config::LimitCounts;

/// Margin added to the observed p99 when recommending a receiver setting.
pub const HEADROOM_PERCENT: u64 = 25;

/// What a suggested trim rule is assumed to leave of the field it cuts (kept head and tail,
/// marker, or kept items): the estimate behind "would have saved".
pub const TRIM_KEEP_BYTES: u64 = 4096;

/// Paths no suggested rule may touch: Synthflow signs `call.call_id`.
pub const PROTECTED_PATHS: &[&str] = &["call.call_id"];

/// Items kept at each end by a suggested `keep_items` rule.
const KEEP_ITEMS: usize = 2;

/// How many fields the report lists per route.
const DOMINANT_FIELDS: usize = 5;

const MIB: u64 = 1024 * 1024;

/// Reading the incident log failed.
#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    /// The log exists but cannot be opened.
    #[error(
        "cannot open incident log {path}: {source}: check [incidents] path and its permissions"
    )]
    Open {
        /// The log path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading stopped part-way.
    #[error("cannot read incident log {path} at line {line}: {source}")]
    Read {
        /// The log path.
        path: PathBuf,
        /// The 1-based line being read.
        line: usize,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`read_log`] found.
#[derive(Debug, Default)]
pub struct LogRead {
    /// The incidents that passed the filters, in log order.
    pub incidents: Vec<Incident>,
    /// One message per skipped line, e.g. `line 17: skipped, not valid JSON (…)`.
    pub warnings: Vec<String>,
    /// The log file does not exist (yet): nothing was ever recorded.
    pub missing: bool,
    /// Non-blank lines read, before filtering.
    pub lines: usize,
}

impl LogRead {
    /// Reads one line of the log (`number` counts from 1): blank lines are skipped, corrupt
    /// ones are skipped with a warning, incidents passing the filters are kept.
    pub fn add_line(
        &mut self,
        number: usize,
        line: &[u8],
        since: Option<SystemTime>,
        route: Option<&str>,
    ) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        let incident: Incident = match serde_json::from_slice(line) {
            Ok(incident) => incident,
            Err(e) if e.is_data() => {
                self.warnings.push(format!(
                    "line {number}: skipped, not an incident record ({e})"
                ));
                return;
            }
            Err(e) => {
                self.warnings
                    .push(format!("line {number}: skipped, not valid JSON ({e})"));
                return;
            }
        };
        if route.is_some_and(|r| r != incident.route) {
            return;
        }
        if let Some(since) = since {
            match humantime::parse_rfc3339_weak(&incident.ts) {
                Ok(ts) if ts < since => return,
                Ok(_) => {}
                Err(e) => {
                    self.warnings.push(format!(
                        "line {number}: skipped, ts {:?} is not an RFC 3339 time ({e})",
                        incident.ts
                    ));
                    return;
                }
            }
        }
        self.incidents.push(incident);
    }

    /// The message to print instead of a report when there is nothing to diagnose, if so:
    /// a missing or empty log is not an error.
    pub fn nothing_to_diagnose(&self, path: &Path) -> Option<String> {
        if self.missing {
            Some(format!(
                "no incident log at {}: no size incidents recorded yet",
                path.display()
            ))
        } else if self.lines == 0 {
            Some(format!(
                "incident log {} is empty: no size incidents recorded yet",
                path.display()
            ))
        } else if self.incidents.is_empty() {
            Some(format!(
                "no incidents in {} match the filters ({} lines read)",
                path.display(),
                self.lines
            ))
        } else {
            None
        }
    }
}

/// Reads incident lines that came from the shared table (oldest first), with the same
/// filters and warnings as [`read_log`]; `missing` is never set.
pub fn read_lines(lines: &[String], since: Option<SystemTime>, route: Option<&str>) -> LogRead {
    let mut read = LogRead::default();
    for (index, line) in lines.iter().enumerate() {
        read.add_line(index + 1, line.as_bytes(), since, route);
    }
    read
}

/// Reads the incident log at `path`, keeping incidents at or after `since` and of `route`.
/// Corrupt lines are skipped with a warning naming the line number; a missing file is an
/// empty [`LogRead`] with `missing` set.
pub fn read_log(
    path: &Path,
    since: Option<SystemTime>,
    route: Option<&str>,
) -> Result<LogRead, DiagnoseError> {
    let mut read = LogRead::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            read.missing = true;
            return Ok(read);
        }
        Err(source) => {
            return Err(DiagnoseError::Open {
                path: path.to_owned(),
                source,
            });
        }
    };
    for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
        let number = index + 1;
        let line = line.map_err(|source| DiagnoseError::Read {
            path: path.to_owned(),
            line: number,
            source,
        })?;
        read.add_line(number, &line, since, route);
    }
    Ok(read)
}

/// A configured route, as `diagnose` needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteInfo {
    /// The route's `name`.
    pub name: String,
    /// Its `max_body` in bytes.
    pub max_body: u64,
    /// Its configured `upstream_limit` in bytes.
    pub upstream_limit: Option<u64>,
    /// The paths of its trim rules (a rule they cover is never suggested).
    pub trim_paths: Vec<String>,
    /// Its `limit_counts`, when it trims.
    pub limit_counts: Option<LimitCounts>,
}

impl RouteInfo {
    /// What `diagnose` needs of a configured route.
    pub fn of(route: &crate::config::RouteConfig) -> RouteInfo {
        RouteInfo {
            name: route.name.clone(),
            max_body: route.max_body_bytes,
            upstream_limit: route.upstream_limit_bytes,
            trim_paths: route.trim.as_ref().map_or_else(Vec::new, |t| {
                t.specs.iter().map(|spec| spec.path.clone()).collect()
            }),
            limit_counts: route.trim.as_ref().map(|t| t.limit_counts),
        }
    }
}

/// The whole diagnosis; its JSON form is the stable `--format json` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Incidents diagnosed.
    pub incidents: u64,
    /// One entry per route with incidents, by route name.
    pub routes: Vec<RouteReport>,
}

/// Everything about one route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteReport {
    /// The route's name.
    pub route: String,
    /// The route is in the configuration (false: only in the log, e.g. renamed since).
    pub configured: bool,
    /// `max_body` in bytes (from the configuration, else the log).
    pub max_body: Option<u64>,
    /// Configured `upstream_limit` in bytes (from the configuration, else the log).
    pub upstream_limit: Option<u64>,
    /// The limit the proxy would enforce now, given what it learned.
    pub effective_limit: Option<u64>,
    /// Incidents (log lines).
    pub incidents: u64,
    /// Distinct requests (`request_id`).
    pub requests: u64,
    /// Incidents by kind.
    pub by_kind: KindCounts,
    /// `over_upstream_limit` incidents by action.
    pub actions: ActionCounts,
    /// Request sizes (see the module docs).
    pub body_bytes: Option<SizeStats>,
    /// The fields that dominate the payloads, largest first.
    pub dominant_fields: Vec<FieldShare>,
    /// Who answered the receiver's 413s, most first.
    pub rejectors: Vec<RejectorCount>,
    /// The learned size bracket.
    pub learned: Bracket,
    /// What to change on each identified receiver component.
    pub remediation: Vec<Remediation>,
    /// The trim rule that would have saved the most requests, if any would.
    pub trim: Option<TrimSuggestion>,
    /// Corrections to the route's own settings, most requests saved first.
    pub settings: Vec<SettingFix>,
}

/// A correction to one of the route's settings, from the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingFix {
    /// The key (`upstream_limit`, `limit_counts`).
    pub key: String,
    /// The exact line to paste into the route's `[[routes]]` table.
    pub line: String,
    /// Requests the receiver refused that the setting would have kept from it.
    pub saved: u64,
    /// Why, in one sentence.
    pub reason: String,
}

/// Incidents by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    /// `over_max_body`.
    pub over_max_body: u64,
    /// `over_upstream_limit`.
    pub over_upstream_limit: u64,
    /// `upstream_413`.
    pub upstream_413: u64,
    /// `buffer_budget_exhausted`.
    pub buffer_budget_exhausted: u64,
    /// `spool_refused`.
    pub spool_refused: u64,
    /// `duplicate_conflict`.
    pub duplicate_conflict: u64,
}

impl KindCounts {
    /// The count for one kind.
    pub fn get(&self, kind: Kind) -> u64 {
        match kind {
            Kind::OverMaxBody => self.over_max_body,
            Kind::OverUpstreamLimit => self.over_upstream_limit,
            Kind::Upstream413 => self.upstream_413,
            Kind::BufferBudgetExhausted => self.buffer_budget_exhausted,
            Kind::SpoolRefused => self.spool_refused,
            Kind::DuplicateConflict => self.duplicate_conflict,
        }
    }

    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::OverMaxBody => self.over_max_body += 1,
            Kind::OverUpstreamLimit => self.over_upstream_limit += 1,
            Kind::Upstream413 => self.upstream_413 += 1,
            Kind::BufferBudgetExhausted => self.buffer_budget_exhausted += 1,
            Kind::SpoolRefused => self.spool_refused += 1,
            Kind::DuplicateConflict => self.duplicate_conflict += 1,
        }
    }
}

/// `over_upstream_limit` incidents by action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ActionCounts {
    /// `forwarded`.
    pub forwarded: u64,
    /// `rejected`.
    pub rejected: u64,
    /// `trimmed`.
    pub trimmed: u64,
    /// `trim_failed`.
    pub trim_failed: u64,
}

/// Nearest-rank percentiles of request sizes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SizeStats {
    /// Requests with a known size.
    pub samples: u64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// One field's weight across the route's payloads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldShare {
    /// Leaf path as in `top_fields`.
    pub path: String,
    /// Its bytes summed over requests.
    pub bytes: u64,
    /// `bytes` over the summed size of the requests with `top_fields`, 0.0 to 1.0.
    pub share: f64,
    /// Requests where it was among the largest fields.
    pub requests: u64,
}

/// How many 413s one component answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RejectorCount {
    /// The component.
    pub rejector: Rejector,
    /// `upstream_413` incidents it answered.
    pub count: u64,
}

/// The fix on one receiver component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Remediation {
    /// The component.
    pub rejector: Rejector,
    /// Whether its limit can be raised at all (false for hard platform limits).
    pub can_raise: bool,
    /// The size the setting is computed for, in bytes (p99 plus headroom, whole MiB).
    pub recommended_bytes: Option<u64>,
    /// The exact setting to paste, when there is one.
    pub setting: Option<String>,
    /// One sentence on what to do.
    pub advice: String,
}

/// A ready-to-paste trim rule and what it would have achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrimSuggestion {
    /// The rule's path.
    pub path: String,
    /// `truncate` (a string field) or `keep_items` (an array).
    pub action: String,
    /// Requests over the limit that the rule would have brought under it.
    pub saved: u64,
    /// Requests over the limit with `top_fields` recorded (the most it could save).
    pub over_limit: u64,
    /// The `[[routes.trim]]` table to add to the route.
    pub toml: String,
}

/// One request of a route, merged from its incidents.
#[derive(Debug, Default)]
struct Request<'a> {
    size: Option<u64>,
    top_fields: &'a [FieldBytes],
    kinds: Vec<Kind>,
    actions: Vec<Action>,
    limit: Option<u64>,
    max_body: Option<u64>,
    encoding: Option<&'a str>,
}

impl Request<'_> {
    /// Has a size worth counting (not only a cut-off buffer-budget body).
    fn sized(&self) -> bool {
        self.kinds
            .iter()
            .any(|k| !matches!(k, Kind::BufferBudgetExhausted | Kind::SpoolRefused))
    }

    /// Its payload was meant for the receiver (the proxy did not refuse it for `max_body`).
    fn bound_for_receiver(&self) -> bool {
        self.kinds
            .iter()
            .any(|k| matches!(k, Kind::OverUpstreamLimit | Kind::Upstream413))
    }

    /// It failed because of the receiver's limit and was not rescued by trimming.
    fn failed_over_limit(&self) -> bool {
        let trimmed = self.actions.contains(&Action::Trimmed);
        self.kinds.contains(&Kind::Upstream413)
            || (!trimmed && self.kinds.contains(&Kind::OverUpstreamLimit))
    }
}

/// Builds the per-route report from incidents in log order (pure).
pub fn diagnose(incidents: &[Incident], routes: &[RouteInfo]) -> Report {
    let mut by_route: BTreeMap<&str, Vec<&Incident>> = BTreeMap::new();
    for incident in incidents {
        by_route.entry(&incident.route).or_default().push(incident);
    }
    let learner = LimitLearner::from_incidents(incidents);
    let routes = by_route
        .into_iter()
        .map(|(name, incidents)| {
            let info = routes.iter().find(|r| r.name == name);
            route_report(name, &incidents, info, learner.bracket(name))
        })
        .collect();
    Report {
        incidents: incidents.len() as u64,
        routes,
    }
}

fn route_report(
    name: &str,
    incidents: &[&Incident],
    info: Option<&RouteInfo>,
    learned: Bracket,
) -> RouteReport {
    let mut by_kind = KindCounts::default();
    let mut actions = ActionCounts::default();
    let mut rejectors: BTreeMap<Rejector, u64> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut requests: HashMap<&str, Request<'_>> = HashMap::new();
    for incident in incidents {
        by_kind.add(incident.kind);
        match incident.action {
            Some(Action::Forwarded) => actions.forwarded += 1,
            Some(Action::Rejected) => actions.rejected += 1,
            Some(Action::Trimmed) => actions.trimmed += 1,
            Some(Action::TrimFailed) => actions.trim_failed += 1,
            None => {}
        }
        if incident.kind == Kind::Upstream413 {
            *rejectors
                .entry(incident.rejector.unwrap_or(Rejector::Unknown))
                .or_default() += 1;
        }
        let request = requests.entry(&incident.request_id).or_insert_with(|| {
            order.push(&incident.request_id);
            Request::default()
        });
        request.size = request.size.max(incident.payload_bytes());
        if request.top_fields.is_empty() {
            request.top_fields = &incident.top_fields;
        }
        request.kinds.push(incident.kind);
        request.actions.extend(incident.action);
        request.limit = request.limit.or(incident.upstream_limit);
        request.max_body = request.max_body.or(incident.max_body);
        request.encoding = request.encoding.or(incident.content_encoding.as_deref());
    }
    // Log order, so that results do not depend on hash order.
    let requests: Vec<Request<'_>> = order.iter().filter_map(|id| requests.remove(id)).collect();

    let max_body = info
        .map(|r| r.max_body)
        .or_else(|| requests.iter().find_map(|r| r.max_body));
    let configured_limit = match info {
        Some(info) => info.upstream_limit,
        // Not configured any more: the newest limit the log shows.
        None => requests.iter().rev().find_map(|r| r.limit),
    };
    let limit = effective_limit(configured_limit, &learned);

    let sizes: Vec<u64> = requests
        .iter()
        .filter(|r| r.sized())
        .filter_map(|r| r.size)
        .collect();
    let receiver_sizes: Vec<u64> = requests
        .iter()
        .filter(|r| r.bound_for_receiver())
        .filter_map(|r| r.size)
        .collect();
    let recommended = size_stats(&receiver_sizes).map(|s| recommended_bytes(s.p99));

    let mut rejectors: Vec<RejectorCount> = rejectors
        .into_iter()
        .map(|(rejector, count)| RejectorCount { rejector, count })
        .collect();
    rejectors.sort_by(|a, b| b.count.cmp(&a.count).then(a.rejector.cmp(&b.rejector)));
    let remediation = rejectors
        .iter()
        .map(|r| remediation(r.rejector, recommended, &learned))
        .collect();

    RouteReport {
        route: name.to_owned(),
        configured: info.is_some(),
        max_body,
        upstream_limit: configured_limit,
        effective_limit: limit,
        incidents: incidents.len() as u64,
        requests: requests.len() as u64,
        by_kind,
        actions,
        body_bytes: size_stats(&sizes),
        dominant_fields: dominant_fields(&requests),
        rejectors,
        learned,
        remediation,
        trim: suggest_trim(
            name,
            &requests,
            limit,
            info.map_or(&[][..], |i| &i.trim_paths),
        ),
        settings: setting_fixes(info, configured_limit, &learned, limit, &requests),
    }
}

/// Corrections to the route's own settings (see the module docs), most saved first.
fn setting_fixes(
    info: Option<&RouteInfo>,
    configured: Option<u64>,
    learned: &Bracket,
    limit: Option<u64>,
    requests: &[Request<'_>],
) -> Vec<SettingFix> {
    let refused = |r: &&Request<'_>| r.kinds.contains(&Kind::Upstream413);
    let counts_wire = info.and_then(|i| i.limit_counts) == Some(LimitCounts::Wire);
    // A compressed body refused under a wire-counted limit is explained by limit_counts.
    let compressed = |r: &&Request<'_>| {
        counts_wire
            && r.encoding
                .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
    };
    let mut fixes = Vec::new();
    if let (Some(rejected), Some(suggested)) = (learned.smallest_rejected, limit)
        && configured.is_none_or(|c| c >= rejected)
        && suggested < rejected
    {
        let saved = requests
            .iter()
            .filter(refused)
            .filter(|r| !compressed(r))
            .filter(|r| r.size.is_some_and(|s| s > suggested))
            .count() as u64;
        let reason = match configured {
            Some(c) => format!(
                "upstream_limit is {} but the receiver refused {}: the limit in force is the learned one, make it the configured one",
                exact_bytes(c),
                exact_bytes(rejected)
            ),
            None => format!(
                "upstream_limit is not set and the receiver refused {}: set it so every replica knows it from the first request",
                exact_bytes(rejected)
            ),
        };
        if saved > 0 {
            fixes.push(SettingFix {
                key: "upstream_limit".to_owned(),
                line: format!("upstream_limit = \"{}\"", toml_size(suggested)),
                saved,
                reason,
            });
        }
    }
    if let Some(limit) = configured {
        let compressed = requests
            .iter()
            .filter(refused)
            .filter(compressed)
            .filter(|r| r.size.is_some_and(|s| s <= limit))
            .count() as u64;
        if compressed > 0 {
            fixes.push(SettingFix {
                key: "limit_counts".to_owned(),
                line: "limit_counts = \"decoded\"".to_owned(),
                saved: compressed,
                reason: format!(
                    "the receiver refused {} under upstream_limit on the wire: it counts decoded bytes (Express's body-parser does)",
                    plural(compressed, "compressed body", "compressed bodies")
                ),
            });
        }
    }
    fixes.sort_by_key(|f| std::cmp::Reverse(f.saved));
    fixes
}

/// A size as a TOML string: `"1MiB"`, `"100KiB"`, else bytes (`"1000000B"`).
fn toml_size(bytes: u64) -> String {
    if bytes > 0 && bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else if bytes > 0 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

/// `1 request`, `2 requests`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Whether the trim rule `rule` (a rule path, `*` within a key) acts on `path` or an ancestor
/// of it, so suggesting `path` would repeat it.
fn rule_covers(rule: &str, path: &str) -> bool {
    let rule: Vec<&str> = rule.split('.').collect();
    let path: Vec<&str> = path.split('.').collect();
    rule.len() <= path.len() && rule.iter().zip(&path).all(|(r, p)| glob(r, p))
}

/// `*` matches any run of characters (within one key).
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else {
                return false;
            };
            (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .any(|i| glob(rest, &text[i..]))
        }
    }
}

/// Nearest-rank percentiles; `None` for no samples.
pub fn size_stats(samples: &[u64]) -> Option<SizeStats> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let rank = |p: usize| sorted[(p * n).div_ceil(100).clamp(1, n) - 1];
    Some(SizeStats {
        samples: n as u64,
        p50: rank(50),
        p95: rank(95),
        p99: rank(99),
        max: sorted[n - 1],
    })
}

/// `p99` plus [`HEADROOM_PERCENT`], rounded up to a whole MiB (at least 1 MiB).
pub fn recommended_bytes(p99: u64) -> u64 {
    let with_headroom = u128::from(p99) * u128::from(100 + HEADROOM_PERCENT) / 100;
    let with_headroom = u64::try_from(with_headroom).unwrap_or(u64::MAX);
    with_headroom.div_ceil(MIB).max(1).saturating_mul(MIB)
}

fn dominant_fields(requests: &[Request<'_>]) -> Vec<FieldShare> {
    let mut total = 0u64;
    let mut fields: HashMap<&str, (u64, u64)> = HashMap::new();
    for request in requests.iter().filter(|r| !r.top_fields.is_empty()) {
        total += request.size.unwrap_or(0);
        for field in request.top_fields {
            let entry = fields.entry(&field.path).or_default();
            entry.0 += field.bytes;
            entry.1 += 1;
        }
    }
    let mut shares: Vec<FieldShare> = fields
        .into_iter()
        .map(|(path, (bytes, requests))| FieldShare {
            path: path.to_owned(),
            bytes,
            share: if total == 0 {
                0.0
            } else {
                bytes as f64 / total as f64
            },
            requests,
        })
        .collect();
    shares.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path)));
    shares.truncate(DOMINANT_FIELDS);
    shares
}

/// The setting for one component, sized to `recommended` bytes.
fn remediation(rejector: Rejector, recommended: Option<u64>, learned: &Bracket) -> Remediation {
    let raise = |setting: Option<String>, advice: String| Remediation {
        rejector,
        can_raise: true,
        recommended_bytes: recommended,
        setting,
        advice,
    };
    let hard = |advice: &str| Remediation {
        rejector,
        can_raise: false,
        recommended_bytes: None,
        setting: None,
        advice: advice.to_owned(),
    };
    let Some(bytes) = recommended else {
        return raise(
            None,
            "no payload sizes recorded for this receiver: cannot size a setting".to_owned(),
        );
    };
    let mib = bytes / MIB;
    let human = human_bytes(bytes);
    match rejector {
        Rejector::Nginx => raise(
            Some(format!("client_max_body_size {mib}m;")),
            format!(
                "raise nginx's client_max_body_size to {human} in the receiver's server or location block, then reload nginx"
            ),
        ),
        Rejector::Express => raise(
            Some(format!("express.json({{ limit: '{mib}mb' }})")),
            format!(
                "raise body-parser's limit (default 100kb) to {human} where the app calls express.json()"
            ),
        ),
        Rejector::Werkzeug => raise(
            Some(format!(
                "app.config['MAX_CONTENT_LENGTH'] = {mib} * 1024 * 1024"
            )),
            format!("raise Flask's MAX_CONTENT_LENGTH to {human}"),
        ),
        Rejector::Caddy => raise(
            // Caddy reads MB as 10^6 bytes; MiB says what is meant.
            Some(format!("request_body {{ max_size {mib}MiB }}")),
            format!(
                "raise max_size in the site's request_body directive to {human}, then reload Caddy"
            ),
        ),
        Rejector::Haproxy => raise(
            Some(format!(
                "http-request deny deny_status 413 if {{ req.body_size gt {bytes} }}"
            )),
            format!(
                "HAProxy has no body limit of its own: raise the size in the rule that denies with 413 to {bytes} bytes ({human})"
            ),
        ),
        Rejector::Envoy => raise(
            Some(format!("max_request_bytes: {bytes}")),
            format!(
                "raise max_request_bytes of the envoy.filters.http.buffer filter (and per_connection_buffer_limit_bytes if set lower) to {human}"
            ),
        ),
        Rejector::Traefik => raise(
            Some(format!("buffering:\n  maxRequestBodyBytes: {bytes}")),
            format!("raise maxRequestBodyBytes of the route's buffering middleware to {human}"),
        ),
        Rejector::Tomcat => raise(
            Some(format!("<Connector ... maxPostSize=\"{bytes}\" />")),
            format!(
                "raise maxPostSize on the Connector in server.xml to {human} (and multipart max-file-size / max-request-size if the app uses them)"
            ),
        ),
        Rejector::AwsApiGateway => hard(
            "cannot be raised: trim (API Gateway's payload limit is 10 MB, 6 MB for Lambda integrations)",
        ),
        Rejector::Cloudflare => hard(
            "cannot be raised: trim (Cloudflare's request body limit is 100 MB on Free and Pro plans, 200 MB on Business, 500 MB on Enterprise by default)",
        ),
        Rejector::Unknown => {
            let known = match (learned.largest_accepted, learned.smallest_rejected) {
                (Some(a), Some(r)) => format!(
                    "; it accepted {} and refused {}",
                    human_bytes(a),
                    human_bytes(r)
                ),
                (None, Some(r)) => format!("; it refused {}", human_bytes(r)),
                _ => String::new(),
            };
            raise(
                None,
                format!(
                    "could not tell which component answered 413 (see upstream_snippet in the log){known}: raise its body limit to {human}, or trim"
                ),
            )
        }
    }
}

/// A rule candidate: what it acts on and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Candidate {
    /// `truncate` a string leaf.
    Truncate(String),
    /// `keep_items` on an array.
    KeepItems(String),
}

impl Candidate {
    /// The rule for a `top_fields` leaf path: an array element path acts on its outermost
    /// array, anything else is truncated where it is. `None` for a top-level array, which no
    /// rule path can name.
    fn for_leaf(leaf: &str) -> Option<Candidate> {
        match leaf.find("[*]") {
            Some(0) => None,
            Some(at) => Some(Candidate::KeepItems(leaf[..at].to_owned())),
            None => Some(Candidate::Truncate(leaf.to_owned())),
        }
    }

    fn path(&self) -> &str {
        match self {
            Candidate::Truncate(p) | Candidate::KeepItems(p) => p,
        }
    }

    /// The bytes of a request's `top_fields` this rule acts on.
    fn bytes_in(&self, fields: &[FieldBytes]) -> u64 {
        fields
            .iter()
            .filter(|f| Candidate::for_leaf(&f.path).as_ref() == Some(self))
            .map(|f| f.bytes)
            .sum()
    }

    fn touches_protected(&self) -> bool {
        let path = self.path();
        PROTECTED_PATHS
            .iter()
            .any(|p| path_covers(path, p) || path_covers(p, path))
    }
}

/// `outer` is `inner` or one of its ancestors.
fn path_covers(outer: &str, inner: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

fn suggest_trim(
    route: &str,
    requests: &[Request<'_>],
    limit: Option<u64>,
    existing: &[String],
) -> Option<TrimSuggestion> {
    let limit = limit?;
    let failed: Vec<&Request<'_>> = requests
        .iter()
        .filter(|r| r.failed_over_limit() && r.size.is_some_and(|s| s > limit))
        .collect();
    let over: Vec<(u64, &[FieldBytes])> = failed
        .iter()
        .filter(|r| !r.top_fields.is_empty())
        .filter_map(|r| r.size.map(|size| (size, r.top_fields)))
        .collect();
    let mut candidates: Vec<Candidate> = over
        .iter()
        .flat_map(|(_, fields)| fields.iter().filter_map(|f| Candidate::for_leaf(&f.path)))
        .filter(|c| !c.touches_protected())
        .filter(|c| !existing.iter().any(|rule| rule_covers(rule, c.path())))
        .collect();
    candidates.sort();
    candidates.dedup();
    let (best, saved, _) = candidates
        .into_iter()
        .map(|candidate| {
            let mut saved = 0u64;
            let mut removed = 0u64;
            for (size, fields) in &over {
                let cut = candidate.bytes_in(fields).saturating_sub(TRIM_KEEP_BYTES);
                removed += cut;
                if size - cut <= limit {
                    saved += 1;
                }
            }
            (candidate, saved, removed)
        })
        .filter(|(_, saved, _)| *saved > 0)
        // Most saved, then most bytes removed; ties go to the first path in sort order.
        .min_by(|a, b| {
            b.1.cmp(&a.1)
                .then(b.2.cmp(&a.2))
                .then_with(|| a.0.cmp(&b.0))
        })?;
    Some(TrimSuggestion {
        path: best.path().to_owned(),
        action: match best {
            Candidate::Truncate(_) => "truncate",
            Candidate::KeepItems(_) => "keep_items",
        }
        .to_owned(),
        saved,
        over_limit: failed.len() as u64,
        toml: trim_toml(route, &best),
    })
}

fn trim_toml(route: &str, candidate: &Candidate) -> String {
    let path = serde_json::to_string(candidate.path()).unwrap_or_default();
    let action = match candidate {
        Candidate::Truncate(_) => "action = \"truncate\"\nkeep = \"head_tail\"".to_owned(),
        Candidate::KeepItems(_) => {
            format!("action = \"keep_items\"\nhead = {KEEP_ITEMS}\ntail = {KEEP_ITEMS}")
        }
    };
    let route = serde_json::to_string(route).unwrap_or_default();
    format!(
        "# in the [[routes]] table with name = {route}\n[[routes.trim]]\npath = {path}\n{action}\n"
    )
}

pub use crate::config::units::human_bytes;

/// `1100000 bytes (1.0 MiB)`.
fn exact_bytes(bytes: u64) -> String {
    format!("{bytes} bytes ({})", human_bytes(bytes))
}

fn opt_bytes(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), human_bytes)
}

/// Columns padded to their widest cell, two spaces apart, no trailing spaces.
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_owned();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The report for a terminal: a summary table, then one block per route.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    if report.routes.is_empty() {
        out.push_str("no incidents to diagnose\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{} incidents on {} route{}\n",
        report.incidents,
        report.routes.len(),
        if report.routes.len() == 1 { "" } else { "s" }
    );
    let mut rows = vec![
        [
            "ROUTE",
            "INCIDENTS",
            "OVER_MAX_BODY",
            "OVER_LIMIT",
            "UPSTREAM_413",
            "BUDGET_503",
            "SPOOL_503",
            "DUP_CONFLICT",
            "P50",
            "P95",
            "MAX",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in &report.routes {
        let stats = r.body_bytes;
        let mut row = vec![r.route.clone(), r.incidents.to_string()];
        row.extend(Kind::ALL.iter().map(|k| r.by_kind.get(*k).to_string()));
        row.push(opt_bytes(stats.map(|s| s.p50)));
        row.push(opt_bytes(stats.map(|s| s.p95)));
        row.push(opt_bytes(stats.map(|s| s.max)));
        rows.push(row);
    }
    out.push_str(&table(&rows, ""));
    for r in &report.routes {
        out.push('\n');
        render_route(&mut out, r);
    }
    out
}

fn render_route(out: &mut String, r: &RouteReport) {
    let _ = writeln!(
        out,
        "== {}{} ==",
        r.route,
        if r.configured {
            ""
        } else {
            " (not in the configuration)"
        }
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |label: &str, value: String| rows.push(vec![label.to_owned(), value]);
    row(
        "limits",
        format!(
            "max_body {}, upstream_limit {}, effective {}",
            opt_bytes(r.max_body),
            opt_bytes(r.upstream_limit),
            opt_bytes(r.effective_limit)
        ),
    );
    row(
        "incidents",
        format!(
            "{} in {}: {}",
            r.incidents,
            plural(r.requests, "request", "requests"),
            Kind::ALL
                .iter()
                .map(|k| format!("{} {}", k.as_str(), r.by_kind.get(*k)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if r.by_kind.over_upstream_limit > 0 {
        let a = r.actions;
        row(
            "actions",
            format!(
                "forwarded {}, rejected {}, trimmed {}, trim_failed {}",
                a.forwarded, a.rejected, a.trimmed, a.trim_failed
            ),
        );
    }
    if let Some(s) = r.body_bytes {
        row(
            "body size",
            format!(
                "p50 {}, p95 {}, p99 {}, max {} ({})",
                human_bytes(s.p50),
                human_bytes(s.p95),
                human_bytes(s.p99),
                human_bytes(s.max),
                plural(s.samples, "request", "requests")
            ),
        );
    }
    if !r.rejectors.is_empty() {
        row(
            "rejected by",
            r.rejectors
                .iter()
                .map(|c| format!("{} {}", c.rejector.as_str(), c.count))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    // Exact bytes beside the human size: a bracket is often narrower than the rounding.
    let mut learned = Vec::new();
    if let Some(a) = r.learned.largest_accepted {
        learned.push(format!("accepted up to {}", exact_bytes(a)));
    }
    if let Some(rej) = r.learned.smallest_rejected {
        learned.push(format!("refused from {}", exact_bytes(rej)));
    }
    if learned.is_empty() {
        learned.push("nothing yet".to_owned());
    }
    row("learned limit", learned.join(", "));
    out.push_str(&table(&rows, "  "));

    if !r.dominant_fields.is_empty() {
        out.push_str("  dominant fields\n");
        let mut rows = vec![vec![
            "PATH".to_owned(),
            "SHARE".to_owned(),
            "BYTES".to_owned(),
            "REQUESTS".to_owned(),
        ]];
        for f in &r.dominant_fields {
            rows.push(vec![
                f.path.clone(),
                format!("{:.1}%", f.share * 100.0),
                human_bytes(f.bytes),
                f.requests.to_string(),
            ]);
        }
        out.push_str(&table(&rows, "    "));
    }
    for fix in &r.remediation {
        let _ = writeln!(out, "  fix ({}): {}", fix.rejector.as_str(), fix.advice);
        if let Some(setting) = &fix.setting {
            for line in setting.lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    for fix in &r.settings {
        let _ = writeln!(
            out,
            "  set {}: would have saved {} of {} the receiver refused; {}",
            fix.key,
            fix.saved,
            plural(r.by_kind.upstream_413, "request", "requests"),
            fix.reason
        );
        let _ = writeln!(out, "    {}", fix.line);
    }
    if let Some(t) = &r.trim {
        let _ = writeln!(
            out,
            "  trim: {} {} would have saved {} of {} over the limit",
            t.action,
            t.path,
            t.saved,
            plural(t.over_limit, "request", "requests")
        );
        for line in t.toml.lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/incident/fixtures/incidents.jsonl"
    );

    fn routes() -> Vec<RouteInfo> {
        vec![
            RouteInfo {
                name: "synthflow".into(),
                max_body: 32 * MIB,
                upstream_limit: Some(MIB),
                ..RouteInfo::default()
            },
            RouteInfo {
                name: "retell".into(),
                max_body: 32 * MIB,
                upstream_limit: None,
                ..RouteInfo::default()
            },
        ]
    }

    fn fixture_report() -> Report {
        let read = read_log(Path::new(LOG), None, None).unwrap();
        diagnose(&read.incidents, &routes())
    }

    #[test]
    fn reads_the_fixture_and_names_the_corrupt_line() {
        let read = read_log(Path::new(LOG), None, None).unwrap();
        assert_eq!(read.incidents.len(), 14);
        assert_eq!(read.lines, 15);
        assert_eq!(read.warnings.len(), 1);
        assert!(
            read.warnings[0].starts_with("line 6: skipped, not valid JSON ("),
            "{}",
            read.warnings[0]
        );
        assert_eq!(read.nothing_to_diagnose(Path::new(LOG)), None);
    }

    #[test]
    fn filters_by_route_and_time() {
        let path = Path::new(LOG);
        let read = read_log(path, None, Some("synthflow")).unwrap();
        assert_eq!(read.incidents.len(), 10);
        let since = humantime::parse_rfc3339("2026-11-26T10:35:00Z").unwrap();
        let read = read_log(path, Some(since), None).unwrap();
        assert_eq!(read.incidents.len(), 4);
        assert!(read.incidents.iter().all(|i| i.route == "retell"));
        let read = read_log(path, None, Some("nope")).unwrap();
        assert!(
            read.nothing_to_diagnose(path)
                .unwrap()
                .starts_with("no incidents in")
        );
    }

    #[test]
    fn missing_empty_and_odd_logs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.jsonl");
        let read = read_log(&missing, None, None).unwrap();
        assert!(read.missing);
        assert!(
            read.nothing_to_diagnose(&missing)
                .unwrap()
                .starts_with("no incident log at")
        );
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "\n\n").unwrap();
        let read = read_log(&empty, None, None).unwrap();
        assert!(!read.missing);
        assert!(
            read.nothing_to_diagnose(&empty)
                .unwrap()
                .contains("is empty")
        );
        let odd = dir.path().join("odd.jsonl");
        std::fs::write(
            &odd,
            "{\"a\":1}\n{\"ts\":\"yesterday\",\"kind\":\"over_max_body\",\"route\":\"a\",\"request_id\":\"r\"}\n",
        )
        .unwrap();
        let since = SystemTime::UNIX_EPOCH;
        let read = read_log(&odd, Some(since), None).unwrap();
        assert!(
            read.warnings[0].starts_with("line 1: skipped, not an incident record (missing field")
        );
        assert!(read.warnings[1].starts_with("line 2: skipped, ts \"yesterday\""));
        // A directory cannot be read as a log.
        assert!(read_log(dir.path(), None, None).is_err());
        assert_eq!(
            render_text(&diagnose(&[], &routes())),
            "no incidents to diagnose\n"
        );
    }

    #[test]
    fn synthflow_answers() {
        let report = fixture_report();
        assert_eq!(report.incidents, 14);
        assert_eq!(report.routes.len(), 2);
        let r = &report.routes[1];
        assert_eq!(r.route, "synthflow");
        assert_eq!(r.incidents, 10);
        assert_eq!(r.requests, 7);
        assert_eq!(
            r.by_kind,
            KindCounts {
                over_max_body: 1,
                over_upstream_limit: 5,
                upstream_413: 3,
                buffer_budget_exhausted: 1,
                spool_refused: 0,
                duplicate_conflict: 0
            }
        );
        assert_eq!(
            r.actions,
            ActionCounts {
                forwarded: 3,
                rejected: 1,
                trimmed: 1,
                trim_failed: 0
            }
        );
        // Sizes of a1..a5 and a7 (a6 only ran out of buffer budget); a5 counts its
        // Content-Length, its body was never read.
        assert_eq!(
            r.body_bytes,
            Some(SizeStats {
                samples: 6,
                p50: 1_500_000,
                p95: 40_000_000,
                p99: 40_000_000,
                max: 40_000_000
            })
        );
        let top = &r.dominant_fields[0];
        assert_eq!(
            (top.path.as_str(), top.bytes, top.requests),
            ("call.transcript", 5_100_000, 5)
        );
        assert!((top.share - 5_100_000.0 / 8_800_000.0).abs() < 1e-9);
        assert_eq!(r.dominant_fields[1].path, "call.turns[*].text");
        assert_eq!(r.dominant_fields.len(), 5);
        assert_eq!(
            r.rejectors,
            vec![RejectorCount {
                rejector: Rejector::Nginx,
                count: 3
            }]
        );
        assert_eq!(
            r.learned,
            Bracket {
                largest_accepted: None,
                smallest_rejected: Some(1_100_000)
            }
        );
        assert_eq!(r.effective_limit, Some(MIB));
        // p99 of the payloads meant for the receiver is 3,000,000; +25% = 3,750,000 -> 4 MiB.
        let fix = &r.remediation[0];
        assert_eq!(fix.setting.as_deref(), Some("client_max_body_size 4m;"));
        assert_eq!(fix.recommended_bytes, Some(4 * MIB));
        assert!(fix.can_raise);
        // a1, a2, a7 fit once call.transcript is cut; a3 is mostly call.turns.
        let trim = r.trim.as_ref().unwrap();
        assert_eq!(
            (trim.path.as_str(), trim.action.as_str()),
            ("call.transcript", "truncate")
        );
        assert_eq!((trim.saved, trim.over_limit), (3, 4));
        assert_eq!(
            trim.toml,
            "# in the [[routes]] table with name = \"synthflow\"\n[[routes.trim]]\npath = \"call.transcript\"\naction = \"truncate\"\nkeep = \"head_tail\"\n"
        );
    }

    #[test]
    fn retell_answers_from_learned_limits() {
        let report = fixture_report();
        let r = &report.routes[0];
        assert_eq!(r.route, "retell");
        assert_eq!(r.by_kind.upstream_413, 4);
        assert_eq!(r.upstream_limit, None);
        assert_eq!(
            r.learned,
            Bracket {
                largest_accepted: Some(90_000),
                smallest_rejected: Some(120_000)
            }
        );
        assert_eq!(r.effective_limit, Some(100 * 1024));
        let s = r.body_bytes.unwrap();
        assert_eq!((s.p50, s.p95, s.max), (150_000, 300_000, 300_000));
        assert_eq!(r.rejectors[0].rejector, Rejector::Express);
        assert_eq!(
            r.remediation[0].setting.as_deref(),
            Some("express.json({ limit: '1mb' })")
        );
        let top = &r.dominant_fields[0];
        assert_eq!(top.path, "transcript_object[*].content");
        assert!((top.share - 570_000.0 / 770_000.0).abs() < 1e-9);
        let trim = r.trim.as_ref().unwrap();
        assert_eq!(
            (trim.path.as_str(), trim.action.as_str()),
            ("transcript_object", "keep_items")
        );
        assert_eq!((trim.saved, trim.over_limit), (4, 4));
        assert!(
            trim.toml
                .contains("action = \"keep_items\"\nhead = 2\ntail = 2\n")
        );
    }

    #[test]
    fn never_suggests_the_protected_call_id() {
        let mut a = Incident::new(Kind::Upstream413, "r", "1");
        a.body_bytes = Some(100_000);
        a.upstream_limit = Some(50_000);
        a.top_fields = vec![
            FieldBytes {
                path: "call.call_id".into(),
                bytes: 90_000,
            },
            FieldBytes {
                path: "call.note".into(),
                bytes: 5_000,
            },
        ];
        let report = diagnose(&[a], &[]);
        assert_eq!(report.routes[0].trim, None);
        assert!(!report.routes[0].configured);
        assert!(Candidate::KeepItems("call".into()).touches_protected());
        assert!(Candidate::Truncate("call.call_id.x".into()).touches_protected());
        assert!(!Candidate::Truncate("call.call_ids".into()).touches_protected());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(size_stats(&[]), None);
        let s = size_stats(&[5]).unwrap();
        assert_eq!((s.p50, s.p95, s.max), (5, 5, 5));
        let v: Vec<u64> = (1..=100).rev().collect();
        let s = size_stats(&v).unwrap();
        assert_eq!((s.p50, s.p95, s.p99, s.max), (50, 95, 99, 100));
        let s = size_stats(&[1, 2, 3, 4]).unwrap();
        assert_eq!((s.p50, s.p95), (2, 4));
    }

    #[test]
    fn recommended_sizes_round_up_to_whole_mib() {
        assert_eq!(recommended_bytes(0), MIB);
        assert_eq!(recommended_bytes(3_000_000), 4 * MIB);
        // 6.4 MiB + 25% = 8.0 MiB exactly: no extra MiB.
        assert_eq!(recommended_bytes(6_710_886), 8 * MIB);
        assert_eq!(recommended_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn never_suggests_a_rule_the_route_has() {
        let read = read_log(Path::new(LOG), None, None).unwrap();
        let mut routes = routes();
        routes[0].trim_paths = vec!["call.transcript".into()];
        let report = diagnose(&read.incidents, &routes);
        let r = &report.routes[1];
        assert_ne!(
            r.trim.as_ref().map(|t| t.path.as_str()),
            Some("call.transcript")
        );
        // A glob on a key covers it too; an ancestor rule covers its descendants.
        assert!(rule_covers("call.*script", "call.transcript"));
        assert!(rule_covers("call", "call.turns[*].text"));
        assert!(rule_covers("call.turns[*].text", "call.turns[*].text"));
        assert!(!rule_covers("call.transcript", "call.turns[*].text"));
        assert!(!rule_covers("analysis.*_feedback", "analysis.summary"));
    }

    #[test]
    fn upstream_limit_is_corrected_from_the_receivers_413s() {
        let read = read_log(Path::new(LOG), None, None).unwrap();
        let mut routes = routes();
        // Configured above what nginx refused (1,100,000 bytes).
        routes[0].upstream_limit = Some(2 * MIB);
        let report = diagnose(&read.incidents, &routes);
        let fix = &report.routes[1].settings[0];
        assert_eq!(fix.key, "upstream_limit");
        assert_eq!(fix.line, "upstream_limit = \"1MiB\"");
        assert_eq!(fix.saved, 3);
        assert!(
            fix.reason.contains("refused 1100000 bytes"),
            "{}",
            fix.reason
        );
        // Configured under the refusals: nothing to correct.
        assert!(fixture_report().routes[1].settings.is_empty());
        // Not configured: the learned limit, to paste.
        let retell = &fixture_report().routes[0];
        let learned = toml_size(retell.effective_limit.unwrap());
        assert_eq!(
            retell.settings[0].line,
            format!("upstream_limit = \"{learned}\"")
        );
        let text = render_text(&report);
        assert!(
            text.contains(
                "  set upstream_limit: would have saved 3 of 3 requests the receiver refused;"
            ),
            "{text}"
        );
        assert!(text.contains("\n    upstream_limit = \"1MiB\"\n"), "{text}");
    }

    #[test]
    fn limit_counts_is_suggested_when_compressed_bodies_were_refused() {
        let mut refused = Incident::new(Kind::Upstream413, "express", "r1");
        refused.content_encoding = Some("gzip".into());
        refused.body_bytes = Some(60_000);
        refused.upstream_limit = Some(100 * 1024);
        refused.rejector = Some(Rejector::Express);
        let routes = [RouteInfo {
            name: "express".into(),
            max_body: 32 * MIB,
            upstream_limit: Some(100 * 1024),
            trim_paths: vec!["call.transcript".into()],
            limit_counts: Some(LimitCounts::Wire),
        }];
        let report = diagnose(&[refused.clone()], &routes);
        let fixes = &report.routes[0].settings;
        let fix = fixes.iter().find(|f| f.key == "limit_counts").unwrap();
        assert_eq!(fix.line, "limit_counts = \"decoded\"");
        assert_eq!(fix.saved, 1);
        assert!(
            fix.reason.contains("1 compressed body under"),
            "{}",
            fix.reason
        );
        // Already decoded, or not compressed: nothing to say.
        let decoded = [RouteInfo {
            limit_counts: Some(LimitCounts::Decoded),
            ..routes[0].clone()
        }];
        let report = diagnose(&[refused.clone()], &decoded);
        assert!(
            report.routes[0]
                .settings
                .iter()
                .all(|f| f.key != "limit_counts")
        );
        refused.content_encoding = None;
        let report = diagnose(&[refused], &routes);
        assert!(
            report.routes[0]
                .settings
                .iter()
                .all(|f| f.key != "limit_counts")
        );
        // One request reads as one request.
        let text = render_text(&report);
        assert!(
            text.contains("(1 request)") && text.contains("in 1 request:"),
            "{text}"
        );
    }

    #[test]
    fn hard_limits_say_trim() {
        let b = Bracket::default();
        let aws = remediation(Rejector::AwsApiGateway, Some(MIB), &b);
        assert!(!aws.can_raise);
        assert!(aws.advice.starts_with("cannot be raised: trim"));
        assert!(
            remediation(Rejector::Cloudflare, Some(MIB), &b)
                .advice
                .contains("100 MB")
        );
        let caddy = remediation(Rejector::Caddy, Some(8 * MIB), &b);
        assert_eq!(
            caddy.setting.as_deref(),
            Some("request_body { max_size 8MiB }")
        );
        let flask = remediation(Rejector::Werkzeug, Some(8 * MIB), &b);
        assert_eq!(
            flask.setting.as_deref(),
            Some("app.config['MAX_CONTENT_LENGTH'] = 8 * 1024 * 1024")
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(MIB + MIB / 2), "1.5 MiB");
        assert_eq!(human_bytes(40_000_000), "38.1 MiB");
    }

    #[test]
    fn text_report_is_aligned_and_complete() {
        let text = render_text(&fixture_report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "14 incidents on 2 routes");
        let header = lines[2];
        assert!(
            header.starts_with("ROUTE      INCIDENTS  OVER_MAX_BODY"),
            "{text}"
        );
        // Columns line up: every summary row has its P50 cell where the header's starts.
        let p50 = header.find("P50").unwrap();
        assert_eq!(&lines[3][..10], "retell    ");
        assert_eq!(&lines[3][p50..p50 + 9], "146.5 KiB");
        assert_eq!(&lines[4][p50..p50 + 7], "1.4 MiB");
        for needle in [
            "== synthflow ==",
            "  limits         max_body 32 MiB, upstream_limit 1 MiB, effective 1 MiB",
            "  body size      p50 1.4 MiB, p95 38.1 MiB, p99 38.1 MiB, max 38.1 MiB (6 requests)",
            "  rejected by    nginx 3",
            "  learned limit  refused from 1100000 bytes (1 MiB)",
            "  learned limit  accepted up to 90000 bytes (87.9 KiB), refused from 120000 bytes (117.2 KiB)",
            "    call.transcript      58.0%  4.9 MiB    5",
            "  fix (nginx): raise nginx's client_max_body_size to 4 MiB",
            "    client_max_body_size 4m;",
            "  trim: truncate call.transcript would have saved 3 of 4 requests over the limit",
            "    path = \"call.transcript\"",
            "    express.json({ limit: '1mb' })",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn json_report_is_stable() {
        let json = serde_json::to_value(fixture_report()).unwrap();
        let route = &json["routes"][1];
        assert_eq!(route["route"], "synthflow");
        assert_eq!(route["by_kind"]["upstream_413"], 3);
        assert_eq!(route["body_bytes"]["p50"], 1_500_000);
        assert_eq!(route["rejectors"][0]["rejector"], "nginx");
        assert_eq!(
            route["remediation"][0]["setting"],
            "client_max_body_size 4m;"
        );
        assert_eq!(route["trim"]["saved"], 3);
        assert_eq!(route["learned"]["smallest_rejected"], 1_100_000);
    }
}
