//! Rate-limited warnings. A flood of identical events (200 bad signatures in two seconds, a
//! receiver outage at thousands of requests a second) must not become a flood of WARN lines:
//! the first event of a kind on a route is logged as usual, the repeats within the interval
//! are only counted, and one summary line per interval says how many there were
//! ("upstream request failed, 4,812 more in the last 10s"). Access-log lines are not affected:
//! they stay one per request at INFO.
//!
//! The decision is pure ([`WarnLimiter::admit_at`] with an injected clock); the process-wide
//! limiter [`warnings`] is flushed by a task the server starts ([`flush_task`]), so a burst that
//! stops still gets its summary line.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How often a repeated warning of one kind and route is logged.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The most (kind, route) pairs tracked; past it, new pairs are logged without limiting (the
/// route names come from the configuration, so this is never reached in practice).
const MAX_KEYS: usize = 4096;

/// Counts repeated warnings per (kind, route) and decides which ones are logged.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    slots: Mutex<HashMap<(&'static str, String), Slot>>,
}

#[derive(Debug)]
struct Slot {
    /// When the current interval started (the last logged event).
    since: Instant,
    /// Events counted but not logged in the current interval.
    suppressed: u64,
}

/// A summary of the events a limiter held back in one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The event kind (its message).
    pub kind: &'static str,
    /// The route the events were about (`-`: none).
    pub route: String,
    /// How many were held back.
    pub count: u64,
}

impl WarnLimiter {
    /// A limiter that logs each (kind, route) at most once per `interval`.
    pub fn new(interval: Duration) -> WarnLimiter {
        WarnLimiter {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether an event of `kind` on `route` should be logged now.
    pub fn admit(&self, kind: &'static str, route: &str) -> bool {
        self.admit_at(kind, route, Instant::now())
    }

    /// [`WarnLimiter::admit`] at `now`. The first event of an interval is admitted (after the
    /// summary of the interval before it, if that held events back, is logged).
    pub fn admit_at(&self, kind: &'static str, route: &str, now: Instant) -> bool {
        let Ok(mut slots) = self.slots.lock() else {
            return true;
        };
        let key = (kind, route.to_string());
        match slots.get_mut(&key) {
            Some(slot) if now.saturating_duration_since(slot.since) < self.interval => {
                slot.suppressed += 1;
                false
            }
            Some(slot) => {
                let count = std::mem::take(&mut slot.suppressed);
                slot.since = now;
                if count > 0 {
                    log_summary(
                        &Suppressed {
                            kind,
                            route: route.to_string(),
                            count,
                        },
                        self.interval,
                    );
                }
                true
            }
            None => {
                if slots.len() < MAX_KEYS {
                    slots.insert(
                        key,
                        Slot {
                            since: now,
                            suppressed: 0,
                        },
                    );
                }
                true
            }
        }
    }

    /// Takes the summaries of intervals that ended by `now` and forgets quiet pairs.
    pub fn due_at(&self, now: Instant) -> Vec<Suppressed> {
        let Ok(mut slots) = self.slots.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        slots.retain(|(kind, route), slot| {
            if now.saturating_duration_since(slot.since) < self.interval {
                return true;
            }
            if slot.suppressed == 0 {
                // Quiet for a whole interval: the next event is logged at once.
                return false;
            }
            due.push(Suppressed {
                kind,
                route: route.clone(),
                count: std::mem::take(&mut slot.suppressed),
            });
            slot.since = now;
            true
        });
        due.sort_by(|a, b| (a.kind, &a.route).cmp(&(b.kind, &b.route)));
        due
    }

    /// Logs the summaries of intervals that ended (see [`WarnLimiter::due_at`]).
    pub fn flush(&self) {
        for summary in self.due_at(Instant::now()) {
            log_summary(&summary, self.interval);
        }
    }
}

fn log_summary(summary: &Suppressed, interval: Duration) {
    tracing::warn!(
        kind = summary.kind,
        route = %summary.route,
        suppressed = summary.count,
        "{}, {} more in the last {}",
        summary.kind,
        thousands(summary.count),
        humantime::format_duration(interval)
    );
}

/// `4812` → `"4,812"`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

static WARNINGS: LazyLock<WarnLimiter> = LazyLock::new(|| WarnLimiter::new(DEFAULT_INTERVAL));

/// The process-wide limiter for WARN events.
pub fn warnings() -> &'static WarnLimiter {
    &WARNINGS
}

/// Logs the summaries of the process-wide limiter once a second, forever (spawn it).
pub async fn flush_task() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        warnings().flush();
    }
}

/// Logs a WARN event unless an event of the same kind on the same route was logged within the
/// interval (then it is only counted, and summarised later). `kind` is the message:
///
/// ```
/// # let route = "synthflow";
/// payload_guard::warn_limited!(route, "upstream request failed", error = "refused");
/// ```
#[macro_export]
macro_rules! warn_limited {
    ($route:expr, $kind:literal $(, $($field:tt)*)?) => {{
        let route: &str = &$route;
        if $crate::warn_limit::warnings().admit($kind, route) {
            ::tracing::warn!(route = %route, $($($field)*,)? $kind);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_interval_are_counted_not_logged() {
        let limiter = WarnLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(limiter.admit_at("signature refused", "a", t0));
        for i in 1..=200 {
            assert!(!limiter.admit_at(
                "signature refused",
                "a",
                t0 + Duration::from_millis(i * 10)
            ));
        }
        // Another route and another kind are limited separately.
        assert!(limiter.admit_at("signature refused", "b", t0));
        assert!(limiter.admit_at("upstream failed", "a", t0));
        assert_eq!(limiter.due_at(t0 + Duration::from_secs(9)), vec![]);
        assert_eq!(
            limiter.due_at(t0 + Duration::from_secs(10)),
            vec![Suppressed {
                kind: "signature refused",
                route: "a".into(),
                count: 200
            }]
        );
        // The summary restarted the interval: nothing more is due until events come again.
        assert_eq!(limiter.due_at(t0 + Duration::from_secs(21)), vec![]);
        // A pair quiet for a whole interval is forgotten: its next event is logged at once.
        assert!(limiter.admit_at("signature refused", "a", t0 + Duration::from_secs(31)));
    }

    #[test]
    fn an_event_after_the_interval_is_logged_and_resets_the_count() {
        let limiter = WarnLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(limiter.admit_at("k", "r", t0));
        assert!(!limiter.admit_at("k", "r", t0 + Duration::from_secs(1)));
        assert!(limiter.admit_at("k", "r", t0 + Duration::from_secs(10)));
        assert_eq!(limiter.due_at(t0 + Duration::from_secs(20)), vec![]);
    }

    #[test]
    fn counts_read_with_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4812), "4,812");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
