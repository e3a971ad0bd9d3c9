//! The dedupe memory of routes with `dedupe = "<window>"`: which payload ids (from `id_path`)
//! were delivered (or spooled for delivery) within the window, with a hash of their body and
//! the request that first carried them.
//!
//! A repeat with the same body is answered by the proxy itself and not forwarded; a repeat
//! with a different body is forwarded and recorded as a `duplicate_conflict` incident. The
//! memory is bounded ([`DEFAULT_CAPACITY`] ids, the oldest forgotten first) and persisted to a
//! small state file, so a restart does not forget it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::file::{Persisted, StateFile};

/// The file name of the dedupe state.
pub const FILE_NAME: &str = "dedupe.json";

/// Ids remembered at most (all routes together).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// What a payload id was seen with before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repeat {
    /// Not seen within the window.
    New,
    /// Seen with the same body: do not forward it again.
    Duplicate {
        /// The request that first carried it.
        first_request_id: String,
    },
    /// Seen with a different body.
    Conflict {
        /// The request that first carried it.
        first_request_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    route: String,
    id: String,
    /// Hex SHA-256 of the body as received.
    hash: String,
    first_request_id: String,
    /// Unix seconds.
    at: u64,
}

#[derive(Debug, Default)]
struct Memory {
    by_key: HashMap<(String, String), Seen>,
    order: VecDeque<(String, String)>,
}

/// The dedupe memory, shared by requests and redelivery.
#[derive(Debug)]
pub struct DedupeMemory {
    memory: Mutex<Memory>,
    capacity: usize,
    file: Option<Arc<StateFile>>,
}

/// The hash a body is remembered by.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl DedupeMemory {
    /// An empty memory that is not persisted.
    pub fn in_memory(capacity: usize) -> DedupeMemory {
        DedupeMemory {
            memory: Mutex::new(Memory::default()),
            capacity,
            file: None,
        }
    }

    /// Loads the file at `path` (missing or corrupt: empty, with a WARN for corrupt).
    pub fn open(path: PathBuf, capacity: usize) -> DedupeMemory {
        let file = StateFile::new(path);
        let mut memory = Memory::default();
        for seen in file.load::<Vec<Seen>>("dedupe") {
            let key = (seen.route.clone(), seen.id.clone());
            memory.order.push_back(key.clone());
            memory.by_key.insert(key, seen);
        }
        DedupeMemory {
            memory: Mutex::new(memory),
            capacity,
            file: Some(Arc::new(file)),
        }
    }

    /// What `id` on `route` was seen with within `window` before `now`.
    pub fn check(
        &self,
        route: &str,
        id: &str,
        hash: &str,
        window: Duration,
        now: SystemTime,
    ) -> Repeat {
        let memory = self.lock();
        let Some(seen) = memory.by_key.get(&(route.to_string(), id.to_string())) else {
            return Repeat::New;
        };
        if seen.at + window.as_secs() < unix_secs(now) {
            return Repeat::New;
        }
        if seen.hash == hash {
            Repeat::Duplicate {
                first_request_id: seen.first_request_id.clone(),
            }
        } else {
            Repeat::Conflict {
                first_request_id: seen.first_request_id.clone(),
            }
        }
    }

    /// Remembers that `id` was delivered (or spooled) with this body hash. A conflicting
    /// repeat replaces the earlier body: the latest delivered version is the one remembered.
    pub fn remember(&self, route: &str, id: &str, hash: &str, request_id: &str, now: SystemTime) {
        {
            let mut memory = self.lock();
            let key = (route.to_string(), id.to_string());
            if let Some(seen) = memory.by_key.get(&key)
                && seen.hash == hash
            {
                return;
            }
            if !memory.by_key.contains_key(&key) {
                memory.order.push_back(key.clone());
            }
            memory.by_key.insert(
                key,
                Seen {
                    route: route.to_string(),
                    id: id.to_string(),
                    hash: hash.to_string(),
                    first_request_id: request_id.to_string(),
                    at: unix_secs(now),
                },
            );
            while memory.by_key.len() > self.capacity {
                match memory.order.pop_front() {
                    Some(old) => {
                        memory.by_key.remove(&old);
                    }
                    None => break,
                }
            }
        }
        if let Some(file) = &self.file {
            file.mark_dirty();
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Persisted for DedupeMemory {
    fn file(&self) -> Option<&Arc<StateFile>> {
        self.file.as_ref()
    }

    fn serialize(&self) -> Vec<u8> {
        let memory = self.lock();
        let list: Vec<&Seen> = memory
            .order
            .iter()
            .filter_map(|k| memory.by_key.get(k))
            .collect();
        serde_json::to_vec(&list).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_conflicts_windows_and_the_cap() {
        let m = DedupeMemory::in_memory(2);
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let (a, b) = (body_hash(b"A"), body_hash(b"B"));
        assert_eq!(m.check("r", "call-1", &a, day, now), Repeat::New);
        m.remember("r", "call-1", &a, "req-1", now);
        assert_eq!(
            m.check("r", "call-1", &a, day, now),
            Repeat::Duplicate {
                first_request_id: "req-1".into()
            }
        );
        assert_eq!(
            m.check("r", "call-1", &b, day, now),
            Repeat::Conflict {
                first_request_id: "req-1".into()
            }
        );
        assert_eq!(m.check("other", "call-1", &a, day, now), Repeat::New);
        let later = now + Duration::from_secs(86_400 + 5);
        assert_eq!(m.check("r", "call-1", &a, day, later), Repeat::New);
        m.remember("r", "call-2", &a, "req-2", now);
        m.remember("r", "call-3", &a, "req-3", now);
        assert_eq!(m.len(), 2, "the oldest id is forgotten past the cap");
        assert_eq!(m.check("r", "call-1", &a, day, now), Repeat::New);
    }

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let m = DedupeMemory::open(path.clone(), 10);
        let now = SystemTime::now();
        m.remember("r", "call-1", &body_hash(b"A"), "req-1", now);
        m.flush().unwrap();
        let again = DedupeMemory::open(path, 10);
        assert_eq!(
            again.check(
                "r",
                "call-1",
                &body_hash(b"A"),
                Duration::from_secs(60),
                now
            ),
            Repeat::Duplicate {
                first_request_id: "req-1".into()
            }
        );
    }
}
