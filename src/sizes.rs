//! Recent request sizes per route, for the console's histograms: an in-memory ring of the last
//! [`SIZES_PER_ROUTE`] body sizes of each route. Fed from one place, [`crate::metrics::Metrics::request`],
//! where every answered request reports the body bytes it received; read by [`crate::console`].
//!
//! Only sizes are kept (no payload bytes), and only for routes the proxy matched: the number of
//! rings is bounded by the configuration, like the metrics' label values.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use rustc_hash::FxHashMap;

/// How many recent sizes each route keeps: enough for a stable histogram, small enough
/// (8 bytes each) that a hundred routes cost well under a megabyte.
pub const SIZES_PER_ROUTE: usize = 1024;

/// The last [`SIZES_PER_ROUTE`] request body sizes of each route. Cheap to record into.
#[derive(Debug, Default)]
pub struct SizeRing {
    /// Keyed by the configured route names, which senders cannot choose: hashed with Fx, not
    /// the default SipHash (a lookup on every request).
    routes: Mutex<FxHashMap<String, VecDeque<u64>>>,
}

impl SizeRing {
    /// An empty ring for every route.
    pub fn new() -> SizeRing {
        SizeRing::default()
    }

    /// Records that a request to `route` carried a body of `bytes`, forgetting the route's
    /// oldest size once it holds [`SIZES_PER_ROUTE`].
    pub fn record(&self, route: &str, bytes: u64) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        // The hot path (a known route) must not allocate the key.
        let ring = match routes.get_mut(route) {
            Some(ring) => ring,
            None => routes
                .entry(route.to_owned())
                .or_insert_with(|| VecDeque::with_capacity(SIZES_PER_ROUTE)),
        };
        if ring.len() == SIZES_PER_ROUTE {
            ring.pop_front();
        }
        ring.push_back(bytes);
    }

    /// The sizes `route` recorded, oldest first (empty when none).
    pub fn recent(&self, route: &str) -> Vec<u64> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .get(route)
            .map(|ring| ring.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_sizes_per_route() {
        let ring = SizeRing::new();
        assert!(ring.recent("a").is_empty());
        for i in 0..(SIZES_PER_ROUTE as u64 + 5) {
            ring.record("a", i);
        }
        ring.record("b", 7);
        let a = ring.recent("a");
        assert_eq!(a.len(), SIZES_PER_ROUTE);
        assert_eq!(a.first(), Some(&5));
        assert_eq!(a.last(), Some(&(SIZES_PER_ROUTE as u64 + 4)));
        assert_eq!(ring.recent("b"), vec![7]);
    }
}
