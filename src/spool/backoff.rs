//! Redelivery timing: exponential backoff with "equal jitter", and the retry deadline.
//! Pure functions of their inputs (the jitter comes from a caller-supplied seed), so the
//! schedule is testable without clocks.

use std::time::{Duration, SystemTime};

use super::meta::Meta;

/// Default delay after the first failed attempt (`retry_initial`).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(5);
/// Default cap on one delay (`retry_max`).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// Default time after receipt when a record stops being retried and goes to `dead/`
/// (`retry_for`).
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(72 * 60 * 60);

/// The delay before the next attempt, after `attempts` failed attempts have been made before
/// the one that just failed (pass the claim's `meta().attempts`, before `release` adds one).
///
/// Equal jitter: the ceiling is `min(max, initial * 2^attempts)`, and the delay is half the
/// ceiling plus a uniform random part of up to the other half. So the delay is always within
/// `[ceiling / 2, ceiling]`: it never collapses to zero (full jitter can, which turns a fleet of
/// spooled records into an immediate burst), and retries still spread out.
/// `seed` drives the random part (splitmix64); the same inputs give the same delay.
pub fn next_delay(attempts: u32, initial: Duration, max: Duration, seed: u64) -> Duration {
    let ceiling = initial
        .checked_mul(1u32.checked_shl(attempts).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let ceiling_nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    let half = ceiling_nanos / 2;
    let spread = ceiling_nanos - half;
    let jitter = if spread == 0 {
        0
    } else {
        splitmix64(seed) % (spread + 1)
    };
    Duration::from_nanos(half + jitter)
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A route's retry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay ceiling after the first failure.
    pub retry_initial: Duration,
    /// Cap on any one delay.
    pub retry_max: Duration,
    /// How long after receipt a payload is retried before it goes to `dead/`.
    pub retry_for: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            retry_for: DEFAULT_RETRY_FOR,
        }
    }
}

impl RetryPolicy {
    /// After a failed attempt at `now`: when to try again, or `None` when the record is past
    /// `received_at + retry_for` (or the next try would be) and should be buried.
    pub fn next_attempt_at(&self, meta: &Meta, now: SystemTime, seed: u64) -> Option<SystemTime> {
        let deadline = meta.received_at.checked_add(self.retry_for)?;
        let at = now.checked_add(next_delay(
            meta.attempts,
            self.retry_initial,
            self.retry_max,
            seed,
        ))?;
        (at <= deadline).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn delays_stay_within_equal_jitter_bounds() {
        let initial = Duration::from_secs(5);
        let max = Duration::from_secs(3600);
        for attempts in 0..80u32 {
            let ceiling = initial
                .checked_mul(2u32.saturating_pow(attempts))
                .unwrap_or(max)
                .min(max);
            for seed in 0..200u64 {
                let d = next_delay(attempts, initial, max, seed);
                assert!(d <= ceiling, "attempts {attempts} seed {seed}: {d:?}");
                assert!(d >= ceiling / 2, "attempts {attempts} seed {seed}: {d:?}");
            }
        }
        assert_eq!(
            next_delay(3, initial, max, 7),
            next_delay(3, initial, max, 7)
        );
        assert_eq!(next_delay(0, Duration::ZERO, max, 1), Duration::ZERO);
        // Extremes neither panic nor overflow.
        let _ = next_delay(u32::MAX, Duration::MAX, Duration::MAX, u64::MAX);
        // The jitter actually varies.
        let distinct: std::collections::HashSet<_> =
            (0..50).map(|s| next_delay(4, initial, max, s)).collect();
        assert!(distinct.len() > 40);
    }

    #[test]
    fn policy_gives_up_after_retry_for() {
        let policy = RetryPolicy::default();
        let received = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut meta = Meta::new("r", received, "q", "POST", "/", 0);
        let soon = policy.next_attempt_at(&meta, received, 1).unwrap();
        assert!(soon <= received + Duration::from_secs(5));
        meta.attempts = 30;
        let late = received + Duration::from_secs(71 * 3600 + 1800);
        assert_eq!(policy.next_attempt_at(&meta, late, 1), None);
        let earlier = received + Duration::from_secs(3600);
        assert!(policy.next_attempt_at(&meta, earlier, 1).is_some());
    }
}
