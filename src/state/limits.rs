//! Learned receiver limits: per route and per unit ([`Units::Wire`] bytes on the wire,
//! [`Units::Decoded`] bytes after `Content-Encoding`), the largest size the receiver accepted
//! and the smallest it refused with 413, with the evidence (sizes, times, request ids).
//!
//! Evidence is counted in the units the receiver counts: an uncompressed body is the same size
//! in both units, so it is evidence for both; a refused `gzip`/`deflate` body is evidence only
//! about its decoded size (Express's body-parser, for one, counts decoded bytes), so it can
//! never drag a `wire` route's limit down to the size of a small compressed body.
//!
//! A configured `upstream_limit` is the upper bound; learning lowers it only with evidence in
//! the route's own units ([`crate::incident::effective_limit`]). Changing a route's
//! `upstream_limit` (at start-up or reload) forgets what was learned for it: the operator has
//! said something new about the receiver.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::file::{Persisted, StateFile};
use crate::incident::{Bracket, effective_limit, format_ts};
use crate::trim::payload::Units;

/// The file name of the learned-limits state.
pub const FILE_NAME: &str = "learned-limits.json";

/// How many pieces of evidence are kept per route.
pub const EVIDENCE_KEPT: usize = 16;

/// One observation that changed what is known about a receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// When (RFC 3339 UTC).
    pub at: String,
    /// `accepted` or `refused`.
    pub verdict: String,
    /// The size, in `units`.
    pub bytes: u64,
    /// What `bytes` counts.
    pub units: Units,
    /// The request it came from.
    pub request_id: String,
}

/// What is known about one route's receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteLearned {
    /// The `upstream_limit` configured when this was learned (a change resets the route).
    #[serde(default)]
    pub configured: Option<u64>,
    /// In bytes on the wire.
    #[serde(default)]
    pub wire: Bracket,
    /// In decoded bytes.
    #[serde(default)]
    pub decoded: Bracket,
    /// The latest evidence, oldest first.
    #[serde(default)]
    pub evidence: VecDeque<Evidence>,
}

/// One thing learned about a receiver, as it is applied to a route's state: here, and in the
/// table replicas share (`state::shared`), by the same rules ([`RouteLearned::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitEvent {
    /// The receiver accepted a body of `wire` bytes (`decoded` when it was compressed).
    Accepted {
        /// The route.
        route: String,
        /// Bytes on the wire.
        wire: u64,
        /// Decoded bytes, for a compressed body.
        decoded: Option<u64>,
        /// The request it came from.
        request_id: String,
        /// When.
        at: SystemTime,
    },
    /// The receiver refused a body of `wire` bytes with 413.
    Refused {
        /// The route.
        route: String,
        /// Bytes on the wire.
        wire: u64,
        /// Decoded bytes, for a compressed body.
        decoded: Option<u64>,
        /// The request it came from.
        request_id: String,
        /// When.
        at: SystemTime,
    },
    /// Forget what was learned for the route.
    Reset {
        /// The route.
        route: String,
    },
    /// The route's configured `upstream_limit` (a change forgets what was learned).
    Configured {
        /// The route.
        route: String,
        /// Its `upstream_limit`.
        upstream_limit: Option<u64>,
    },
}

impl LimitEvent {
    /// The route it is about.
    pub fn route(&self) -> &str {
        match self {
            LimitEvent::Accepted { route, .. }
            | LimitEvent::Refused { route, .. }
            | LimitEvent::Reset { route }
            | LimitEvent::Configured { route, .. } => route,
        }
    }
}

impl RouteLearned {
    /// Applies `event`; `true` when it changed what is known.
    pub fn apply(&mut self, event: &LimitEvent) -> bool {
        match event {
            LimitEvent::Accepted {
                wire,
                decoded,
                request_id,
                at,
                ..
            } => accept(self, *wire, *decoded, request_id, *at),
            LimitEvent::Refused {
                wire,
                decoded,
                request_id,
                at,
                ..
            } => {
                match decoded {
                    // Compressed: evidence about the decoded size only.
                    Some(d) => {
                        self.decoded.rejected(*d);
                        self.note("refused", *d, Units::Decoded, request_id, *at);
                    }
                    None => {
                        self.wire.rejected(*wire);
                        self.decoded.rejected(*wire);
                        self.note("refused", *wire, Units::Wire, request_id, *at);
                    }
                }
                true
            }
            LimitEvent::Reset { .. } => {
                let had =
                    !self.wire.is_empty() || !self.decoded.is_empty() || !self.evidence.is_empty();
                *self = RouteLearned {
                    configured: self.configured,
                    ..RouteLearned::default()
                };
                had
            }
            LimitEvent::Configured { upstream_limit, .. } => {
                if self.configured == *upstream_limit {
                    return false;
                }
                *self = RouteLearned {
                    configured: *upstream_limit,
                    ..RouteLearned::default()
                };
                true
            }
        }
    }

    /// The bracket in `units`.
    pub fn bracket(&self, units: Units) -> Bracket {
        match units {
            Units::Wire => self.wire,
            Units::Decoded => self.decoded,
        }
    }

    fn note(&mut self, verdict: &str, bytes: u64, units: Units, request_id: &str, at: SystemTime) {
        if self.evidence.len() >= EVIDENCE_KEPT {
            self.evidence.pop_front();
        }
        self.evidence.push_back(Evidence {
            at: format_ts(at),
            verdict: verdict.to_string(),
            bytes,
            units,
            request_id: request_id.to_string(),
        });
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    routes: BTreeMap<String, RouteLearned>,
}

/// The learned limits of every route: shared by requests, redelivery and the admin listener.
#[derive(Debug)]
pub struct LearnedLimits {
    routes: Mutex<BTreeMap<String, RouteLearned>>,
    file: Option<Arc<StateFile>>,
    /// Where changes are also sent (to share them with other replicas), once subscribed.
    events: Mutex<Option<mpsc::UnboundedSender<LimitEvent>>>,
}

/// One route's configured limit, for [`LearnedLimits::reconcile`].
pub struct Configured<'a> {
    /// The route's name.
    pub route: &'a str,
    /// Its `upstream_limit`.
    pub upstream_limit: Option<u64>,
}

impl LearnedLimits {
    /// Nothing learned, nothing persisted (tests, one-off CLI runs).
    pub fn in_memory() -> LearnedLimits {
        LearnedLimits {
            routes: Mutex::new(BTreeMap::new()),
            file: None,
            events: Mutex::default(),
        }
    }

    /// Loads the state file at `path` (missing: nothing learned; unreadable or corrupt: a
    /// WARN line, nothing learned — start-up never fails because of it).
    pub fn open(path: PathBuf) -> LearnedLimits {
        let file = StateFile::new(path);
        let stored: Stored = file.load("learned limits");
        LearnedLimits {
            routes: Mutex::new(stored.routes),
            file: Some(Arc::new(file)),
            events: Mutex::default(),
        }
    }

    /// From now on, every change is also sent as a [`LimitEvent`] to the returned receiver
    /// (the replica's link to the shared table).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<LimitEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Replaces what is known about `route` (with the shared table's version).
    pub fn replace_route(&self, route: &str, learned: RouteLearned) {
        let changed = {
            let mut all = self.lock();
            let slot = all.entry(route.to_string()).or_default();
            let changed = *slot != learned;
            *slot = learned;
            changed
        };
        if changed {
            self.changed();
        }
    }

    fn emit(&self, event: LimitEvent) {
        if let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(event);
        }
    }

    /// Forgets what was learned for routes whose `upstream_limit` changed since (and records
    /// the configured limit of new routes). Returns the routes that were reset.
    pub fn reconcile<'a>(&self, routes: impl IntoIterator<Item = Configured<'a>>) -> Vec<String> {
        let mut reset = Vec::new();
        {
            let mut all = self.lock();
            for c in routes {
                self.emit(LimitEvent::Configured {
                    route: c.route.to_string(),
                    upstream_limit: c.upstream_limit,
                });
                match all.get_mut(c.route) {
                    Some(learned) if learned.configured != c.upstream_limit => {
                        let had_evidence = !learned.wire.is_empty() || !learned.decoded.is_empty();
                        *learned = RouteLearned {
                            configured: c.upstream_limit,
                            ..RouteLearned::default()
                        };
                        if had_evidence {
                            tracing::info!(route = c.route, upstream_limit = ?c.upstream_limit, "upstream_limit changed: forgetting the limit learned for this route");
                            reset.push(c.route.to_string());
                        }
                    }
                    Some(_) => {}
                    None => {
                        all.insert(
                            c.route.to_string(),
                            RouteLearned {
                                configured: c.upstream_limit,
                                ..RouteLearned::default()
                            },
                        );
                    }
                }
            }
        }
        self.changed();
        reset
    }

    /// The limit to enforce for `route` in `units`: `configured`, or lower when the receiver
    /// refused a size at or under it (see [`effective_limit`]).
    pub fn limit(&self, route: &str, units: Units, configured: Option<u64>) -> Option<u64> {
        effective_limit(configured, &self.bracket(route, units))
    }

    /// What is known about `route` in `units`.
    pub fn bracket(&self, route: &str, units: Units) -> Bracket {
        self.lock()
            .get(route)
            .map(|l| l.bracket(units))
            .unwrap_or_default()
    }

    /// Everything known about `route`.
    pub fn route(&self, route: &str) -> Option<RouteLearned> {
        self.lock().get(route).cloned()
    }

    /// The receiver accepted a body of `wire` bytes (`decoded`: its decoded size, when it
    /// was compressed). Cheap when it says nothing new: every delivered payload comes here,
    /// and one no larger than what the route's receiver took before builds no event.
    pub fn accepted(&self, route: &str, wire: u64, decoded: Option<u64>, request_id: &str) {
        if self
            .lock()
            .get(route)
            .is_some_and(|l| !accept_changes(l, wire, decoded))
        {
            return;
        }
        let event = LimitEvent::Accepted {
            route: route.to_string(),
            wire,
            decoded,
            request_id: request_id.to_string(),
            at: SystemTime::now(),
        };
        if self.insert_then(route, |l| l.apply(&event)) {
            self.changed();
            self.emit(event);
        }
    }

    /// The receiver refused a body of `wire` bytes with 413 (`decoded`: its decoded size, when
    /// it was compressed). Returns the bracket after, in the units the evidence counts.
    pub fn refused(
        &self,
        route: &str,
        wire: u64,
        decoded: Option<u64>,
        request_id: &str,
    ) -> Bracket {
        let event = LimitEvent::Refused {
            route: route.to_string(),
            wire,
            decoded,
            request_id: request_id.to_string(),
            at: SystemTime::now(),
        };
        let bracket = self.insert_then(route, |l| {
            l.apply(&event);
            if decoded.is_some() { l.decoded } else { l.wire }
        });
        self.changed();
        self.emit(event);
        bracket
    }

    /// Forgets what was learned for `route`; `false` if nothing was known.
    pub fn reset(&self, route: &str) -> bool {
        let event = LimitEvent::Reset {
            route: route.to_string(),
        };
        let had = match self.lock().get_mut(route) {
            Some(l) => l.apply(&event),
            None => false,
        };
        if had {
            tracing::info!(route, "learned limit reset");
            self.changed();
        }
        // Other replicas may know something this one does not: reset the shared state too.
        self.emit(event);
        had
    }

    /// Every route's state, by name.
    pub fn snapshot(&self) -> Vec<(String, RouteLearned)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Replaces everything with what the file says now (used on reload, after `payload-guard
    /// limits --reset` edited the file).
    pub fn reread(&self) {
        let Some(file) = &self.file else { return };
        if let Ok(Some(bytes)) = file.read()
            && let Ok(stored) = serde_json::from_slice::<Stored>(&bytes)
        {
            *self.lock() = stored.routes;
        }
    }

    fn insert_then<T>(&self, route: &str, f: impl FnOnce(&mut RouteLearned) -> T) -> T {
        let mut all = self.lock();
        let learned = all.entry(route.to_string()).or_default();
        f(learned)
    }

    fn changed(&self) {
        if let Some(file) = &self.file {
            file.mark_dirty();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RouteLearned>> {
        // Brackets are Copy values assigned whole: a panic cannot leave one half-written.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Applies an acceptance; `true` when it changed a bracket.
fn accept(
    l: &mut RouteLearned,
    wire: u64,
    decoded: Option<u64>,
    request_id: &str,
    at: SystemTime,
) -> bool {
    let changed = accept_changes(l, wire, decoded);
    if changed {
        l.wire.accepted(wire);
        l.decoded.accepted(decoded.unwrap_or(wire));
        l.note("accepted", wire, Units::Wire, request_id, at);
    }
    changed
}

/// Whether an acceptance would change a bracket of `l`.
fn accept_changes(l: &RouteLearned, wire: u64, decoded: Option<u64>) -> bool {
    let (mut w, mut d) = (l.wire, l.decoded);
    w.accepted(wire);
    d.accepted(decoded.unwrap_or(wire));
    w != l.wire || d != l.decoded
}

impl Persisted for LearnedLimits {
    fn file(&self) -> Option<&Arc<StateFile>> {
        self.file.as_ref()
    }

    fn serialize(&self) -> Vec<u8> {
        let stored = Stored {
            version: 1,
            routes: self.lock().clone(),
        };
        serde_json::to_vec_pretty(&stored).unwrap_or_default()
    }
}

/// Reads the learned limits file at `path` without a running proxy (for `payload-guard
/// limits`); `Ok(empty)` when it does not exist.
pub fn read_file(path: &std::path::Path) -> Result<Vec<(String, RouteLearned)>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Stored>(&bytes)
            .map(|s| s.routes.into_iter().collect())
            .map_err(|e| format!("{}: not a learned-limits file: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Resets `route` in the file at `path` (for `payload-guard limits --reset`); `Ok(false)`
/// when nothing was known about it.
pub fn reset_in_file(path: &std::path::Path, route: &str) -> Result<bool, String> {
    let limits = LearnedLimits::open(path.to_path_buf());
    let had = limits.reset(route);
    limits
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(had)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acceptance_that_says_nothing_new_changes_nothing_and_emits_nothing() {
        let l = LearnedLimits::in_memory();
        let mut events = l.subscribe();
        l.accepted("r", 2_000, None, "first");
        l.accepted("r", 1_500, None, "smaller");
        l.accepted("r", 2_000, None, "same");
        l.accepted("r", 3_000, None, "larger");
        let evidence: Vec<_> = l
            .route("r")
            .unwrap()
            .evidence
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        assert_eq!(evidence, ["first", "larger"]);
        let mut emitted = Vec::new();
        while let Ok(LimitEvent::Accepted { request_id, .. }) = events.try_recv() {
            emitted.push(request_id);
        }
        assert_eq!(emitted, ["first", "larger"]);
    }

    #[test]
    fn a_compressed_refusal_never_lowers_the_wire_limit() {
        let l = LearnedLimits::in_memory();
        l.reconcile([Configured {
            route: "r",
            upstream_limit: Some(102_400),
        }]);
        // 3,245 bytes of gzip that decode to 409 KB, refused.
        l.refused("r", 3_245, Some(409_000), "a");
        assert_eq!(l.limit("r", Units::Wire, Some(102_400)), Some(102_400));
        assert_eq!(l.limit("r", Units::Decoded, Some(102_400)), Some(102_400));
        // An uncompressed refusal is evidence in both units.
        l.refused("r", 90_000, None, "b");
        assert!(l.limit("r", Units::Wire, Some(102_400)).unwrap() < 90_000);
    }

    #[test]
    fn changing_the_configured_limit_forgets_the_route() {
        let l = LearnedLimits::in_memory();
        l.reconcile([Configured {
            route: "r",
            upstream_limit: Some(1_000_000),
        }]);
        l.refused("r", 500_000, None, "a");
        assert_eq!(l.limit("r", Units::Wire, Some(1_000_000)), Some(256 * 1024));
        let same = l.reconcile([Configured {
            route: "r",
            upstream_limit: Some(1_000_000),
        }]);
        assert!(same.is_empty());
        let reset = l.reconcile([Configured {
            route: "r",
            upstream_limit: Some(2_000_000),
        }]);
        assert_eq!(reset, ["r"]);
        assert_eq!(l.limit("r", Units::Wire, Some(2_000_000)), Some(2_000_000));
    }

    #[test]
    fn persists_and_resets_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let l = LearnedLimits::open(path.clone());
        l.refused("r", 300_000, None, "req-1");
        l.accepted("r", 100_000, None, "req-2");
        l.flush().unwrap();
        let again = LearnedLimits::open(path.clone());
        let r = again.route("r").unwrap();
        assert_eq!(r.wire.smallest_rejected, Some(300_000));
        assert_eq!(r.wire.largest_accepted, Some(100_000));
        assert_eq!(r.evidence.len(), 2);
        assert_eq!(r.evidence[0].request_id, "req-1");
        assert!(reset_in_file(&path, "r").unwrap());
        let listed = read_file(&path).unwrap();
        assert!(listed[0].1.wire.is_empty());
        assert!(!reset_in_file(&path, "r").unwrap());
    }
}
