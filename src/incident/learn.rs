//! Learning a receiver's real limit: per route, the largest body it accepted and the smallest
//! it refused with 413. When the configured `upstream_limit` is missing or too generous, the
//! proxy uses the learned bound instead ([`effective_limit`], pure).
//!
//! The bracket lives in memory and survives restarts through the incident log: every
//! `upstream_413` line is a refused size, and incidents carry the bracket as it was then in
//! `learned` ([`rebuild_from_log`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::{Incident, Kind};

/// What a route's receiver is known to accept and refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bracket {
    /// The largest body size the receiver accepted (not answered 413).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub largest_accepted: Option<u64>,
    /// The smallest body size the receiver refused with 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smallest_rejected: Option<u64>,
}

impl Bracket {
    /// Nothing known yet.
    pub fn is_empty(&self) -> bool {
        self.largest_accepted.is_none() && self.smallest_rejected.is_none()
    }

    /// The receiver accepted `bytes`.
    ///
    /// Newer evidence wins: accepting a size at or above the smallest refused one means the
    /// receiver's limit was raised, so the old refusal is forgotten rather than kept as a
    /// contradiction that would pin the limit low forever.
    pub fn accepted(&mut self, bytes: u64) {
        if self.largest_accepted.is_none_or(|a| bytes > a) {
            self.largest_accepted = Some(bytes);
        }
        if self.smallest_rejected.is_some_and(|r| bytes >= r) {
            self.smallest_rejected = None;
        }
    }

    /// The receiver refused `bytes` with 413.
    ///
    /// Newer evidence wins here too: refusing a size at or below the largest accepted one
    /// means the limit was lowered.
    pub fn rejected(&mut self, bytes: u64) {
        if self.smallest_rejected.is_none_or(|r| bytes < r) {
            self.smallest_rejected = Some(bytes);
        }
        if self.largest_accepted.is_some_and(|a| bytes <= a) {
            self.largest_accepted = None;
        }
    }
}

/// Body limits that receivers commonly use, in bytes: body-parser's `100kb` default, nginx's
/// `1m`, AWS Lambda's 6 MB and API Gateway's 10 MB, and round sizes around them. When only a
/// refusal is known, the largest of these below it is the best guess of the receiver's limit.
pub const COMMON_LIMITS: &[u64] = &[
    64 * 1024,
    100_000,
    100 * 1024,
    256 * 1024,
    500_000,
    512 * 1024,
    1_000_000,
    1024 * 1024,
    2 * 1024 * 1024,
    5_000_000,
    5 * 1024 * 1024,
    6 * 1024 * 1024,
    8 * 1024 * 1024,
    10_000_000,
    10 * 1024 * 1024,
    16 * 1024 * 1024,
    20 * 1024 * 1024,
    32 * 1024 * 1024,
    50 * 1024 * 1024,
    64 * 1024 * 1024,
    100 * 1024 * 1024,
];

/// The receiver limit to enforce for a route: the configured `upstream_limit`, unless the
/// receiver has refused a size at or under it (or none is configured). Then the limit lies
/// between the largest accepted size (if below the refusal) and the smallest refused one; the
/// guess is the largest [`COMMON_LIMITS`] value in that bracket, else the largest accepted
/// size, else half the refused size — never one byte under the refusal, which would let a
/// receiver with a round limit refuse payload after payload.
pub fn effective_limit(configured: Option<u64>, bracket: &Bracket) -> Option<u64> {
    match bracket.smallest_rejected {
        Some(rejected) if configured.is_none_or(|c| c >= rejected) => {
            let floor = bracket.largest_accepted.filter(|&a| a < rejected);
            let guess = COMMON_LIMITS
                .iter()
                .rev()
                .copied()
                .find(|&l| l < rejected && floor.is_none_or(|f| l > f));
            Some(guess.or(floor).unwrap_or(rejected / 2))
        }
        _ => configured,
    }
}

/// The per-route brackets of a running proxy. Cheap to query; shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct LimitLearner {
    routes: Mutex<HashMap<String, Bracket>>,
}

impl LimitLearner {
    /// Nothing learned.
    pub fn new() -> LimitLearner {
        LimitLearner::default()
    }

    /// Brackets rebuilt from incidents in log order (see [`LimitLearner::observe`]).
    pub fn from_incidents<'a>(incidents: impl IntoIterator<Item = &'a Incident>) -> LimitLearner {
        let learner = LimitLearner::new();
        for incident in incidents {
            learner.observe(incident);
        }
        learner
    }

    /// Applies what one logged incident says: its `learned` snapshot replaces the route's
    /// bracket (it was the whole state at that moment), and an `upstream_413` refuses its
    /// size.
    pub fn observe(&self, incident: &Incident) {
        let mut routes = self.lock();
        let bracket = routes.entry(incident.route.clone()).or_default();
        if let Some(learned) = incident.learned {
            *bracket = learned;
        }
        if incident.kind == Kind::Upstream413
            && let Some(bytes) = incident.body_bytes
        {
            bracket.rejected(bytes);
        }
    }

    /// The receiver of `route` accepted a body of `bytes`; returns the bracket after.
    pub fn record_accepted(&self, route: &str, bytes: u64) -> Bracket {
        self.update(route, |b| b.accepted(bytes))
    }

    /// The receiver of `route` refused a body of `bytes` with 413; returns the bracket after.
    pub fn record_rejected(&self, route: &str, bytes: u64) -> Bracket {
        self.update(route, |b| b.rejected(bytes))
    }

    /// What is known about `route` (empty if nothing).
    pub fn bracket(&self, route: &str) -> Bracket {
        self.lock().get(route).copied().unwrap_or_default()
    }

    /// Every route's bracket, sorted by route name.
    pub fn snapshot(&self) -> Vec<(String, Bracket)> {
        let mut all: Vec<_> = self.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn update(&self, route: &str, f: impl FnOnce(&mut Bracket)) -> Bracket {
        let mut routes = self.lock();
        // The hot path (an accepted body on a known route) must not allocate the key.
        if let Some(bracket) = routes.get_mut(route) {
            f(bracket);
            return *bracket;
        }
        let bracket = routes.entry(route.to_owned()).or_default();
        f(bracket);
        *bracket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bracket>> {
        // A panic while holding the lock cannot leave a bracket half-written (they are Copy
        // values assigned whole), so a poisoned map is still good.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Rebuilds the brackets from an incident log at start-up. Blocking file I/O: call it before
/// serving or from `spawn_blocking`.
///
/// A missing log is an empty learner. Unreadable or corrupt lines are skipped with a tracing
/// warning: start-up must not fail because of the log.
pub fn rebuild_from_log(path: &Path) -> LimitLearner {
    let learner = LimitLearner::new();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return learner,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "incident log unreadable: starting with no learned limits");
            return learner;
        }
    };
    let mut skipped = 0u64;
    for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                tracing::warn!(path = %path.display(), line = index + 1, error = %e, "incident log read failed: keeping what was learned so far");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Incident>(&line) {
            Ok(incident) => learner.observe(&incident),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(path = %path.display(), skipped, "incident log lines skipped while rebuilding learned limits: run `payload-guard diagnose` to see them");
    }
    learner
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    fn bracket(a: Option<u64>, r: Option<u64>) -> Bracket {
        Bracket {
            largest_accepted: a,
            smallest_rejected: r,
        }
    }

    #[test]
    fn bracket_narrows_and_forgets_contradicted_evidence() {
        let mut b = Bracket::default();
        assert!(b.is_empty());
        b.accepted(500);
        b.accepted(300);
        b.rejected(2000);
        b.rejected(1500);
        b.rejected(1800);
        assert_eq!(b, bracket(Some(500), Some(1500)));
        // The receiver's limit was raised: 1600 now passes.
        b.accepted(1600);
        assert_eq!(b, bracket(Some(1600), None));
        // And lowered again: 1000 is refused.
        b.rejected(1000);
        assert_eq!(b, bracket(None, Some(1000)));
    }

    #[test]
    fn effective_limit_cases() {
        let empty = Bracket::default();
        assert_eq!(effective_limit(None, &empty), None);
        assert_eq!(effective_limit(Some(1000), &empty), Some(1000));
        // Configured limit already under the refusals: keep it.
        assert_eq!(
            effective_limit(Some(1000), &bracket(Some(900), Some(1500))),
            Some(1000)
        );
        // Configured too generous, no common limit in the bracket: the largest accepted size.
        assert_eq!(
            effective_limit(Some(2000), &bracket(Some(900), Some(1500))),
            Some(900)
        );
        // Configured exactly at a refused size is too generous; tiny refusals halve.
        assert_eq!(
            effective_limit(Some(1500), &bracket(None, Some(1500))),
            Some(750)
        );
        // A refusal above a common limit: that limit (body-parser's 100kb here).
        assert_eq!(
            effective_limit(None, &bracket(None, Some(300_000))),
            Some(256 * 1024)
        );
        assert_eq!(
            effective_limit(None, &bracket(Some(120_000), Some(250_000))),
            Some(120_000)
        );
        assert_eq!(
            effective_limit(None, &bracket(Some(90_000), Some(250_000))),
            Some(100 * 1024)
        );
        // nginx's 1m: a 1.5 MiB refusal guesses 1 MiB.
        assert_eq!(
            effective_limit(None, &bracket(Some(10_000), Some(1_500_000))),
            Some(1024 * 1024)
        );
        // Only acceptances known: no bound from them.
        assert_eq!(effective_limit(None, &bracket(Some(1200), None)), None);
        assert_eq!(effective_limit(None, &bracket(None, Some(0))), Some(0));
    }

    #[test]
    fn learner_is_shared_across_threads() {
        let learner = Arc::new(LimitLearner::new());
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let l = Arc::clone(&learner);
                std::thread::spawn(move || {
                    l.record_accepted("a", 100 + i);
                    l.record_rejected("a", 1000 + i);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(learner.bracket("a"), bracket(Some(107), Some(1000)));
        assert!(learner.bracket("b").is_empty());
        assert_eq!(learner.snapshot().len(), 1);
    }

    #[test]
    fn rebuilds_from_upstream_413_lines_and_learned_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.jsonl");
        assert!(rebuild_from_log(&path).snapshot().is_empty());
        let mut f = File::create(&path).unwrap();
        let ts = "2026-11-26T10:00:00.000Z";
        writeln!(f, r#"{{"ts":"{ts}","kind":"upstream_413","route":"a","request_id":"1","body_bytes":3000}}"#).unwrap();
        writeln!(f, r#"{{"ts":"{ts}","kind":"upstream_413","route":"a","request_id":"2","body_bytes":2500}}"#).unwrap();
        writeln!(f, "not json").unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"ts":"{ts}","kind":"over_upstream_limit","route":"b","request_id":"3","body_bytes":9000,"learned":{{"largest_accepted":4000,"smallest_rejected":5000}}}}"#).unwrap();
        // An over_upstream_limit line's body size is not a refusal by the receiver.
        writeln!(f, r#"{{"ts":"{ts}","kind":"over_upstream_limit","route":"a","request_id":"4","body_bytes":100}}"#).unwrap();
        drop(f);
        let learner = rebuild_from_log(&path);
        assert_eq!(learner.bracket("a"), bracket(None, Some(2500)));
        assert_eq!(learner.bracket("b"), bracket(Some(4000), Some(5000)));
        assert_eq!(effective_limit(None, &learner.bracket("a")), Some(1250));
    }
}
