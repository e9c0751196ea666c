//! The bounded decision cache: digest → decision, each entry with its own expiry. When the
//! cache is full, expired entries go first (swept at most once a second), then the oldest
//! insertion. Time is passed in by the caller, so the tests need no sleeping.

use crate::key::Key;
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A decision the authorizer answered (errors are never decisions, and never cached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

struct Entry {
    decision: Arc<Decision>,
    expires: Instant,
    seq: u64,
}

#[derive(Default)]
struct State {
    map: HashMap<Key, Entry>,
    /// Insertion order, as (key, seq); records whose seq no longer matches the entry are stale.
    order: VecDeque<(Key, u64)>,
    seq: u64,
    last_sweep: Option<Instant>,
}

/// How often a full cache may scan for expired entries before evicting live ones.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A bounded TTL map from key to decision.
pub struct Cache {
    max: usize,
    state: Mutex<State>,
}

impl Cache {
    /// A cache of at most `max` entries; 0 disables caching.
    pub fn new(max: usize) -> Self {
        Cache {
            max,
            state: Mutex::new(State::default()),
        }
    }

    /// The live decision for `key`, if any. An expired entry is removed.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Decision>> {
        let mut st = self.state.lock();
        match st.map.get(key) {
            Some(e) if e.expires > now => Some(e.decision.clone()),
            Some(_) => {
                st.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores a decision for `ttl`. A zero TTL, or a disabled cache, stores nothing.
    pub fn insert(&self, key: Key, decision: Arc<Decision>, ttl: Duration, now: Instant) {
        if self.max == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        let mut st = self.state.lock();
        if !st.map.contains_key(&key) {
            while st.map.len() >= self.max {
                evict_one(&mut st, now);
            }
        }
        st.seq += 1;
        let seq = st.seq;
        st.map.insert(
            key,
            Entry {
                decision,
                expires,
                seq,
            },
        );
        st.order.push_back((key, seq));
        // Keep the order queue proportional to the map.
        if st.order.len() > 2 * st.map.len() + 64 {
            let State { map, order, .. } = &mut *st;
            order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    /// The number of entries held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees at least one slot: expired entries first, else the oldest insertion.
fn evict_one(st: &mut State, now: Instant) {
    let sweep_due = match st.last_sweep {
        None => true,
        Some(t) => now.saturating_duration_since(t) >= SWEEP_EVERY,
    };
    if sweep_due {
        st.last_sweep = Some(now);
        let before = st.map.len();
        st.map.retain(|_, e| e.expires > now);
        if st.map.len() < before {
            return;
        }
    }
    while let Some((k, s)) = st.order.pop_front() {
        if st.map.get(&k).is_some_and(|e| e.seq == s) {
            st.map.remove(&k);
            return;
        }
    }
    // The order queue lost track (cannot happen); drop an arbitrary entry to stay bounded.
    if let Some(k) = st.map.keys().next().copied() {
        st.map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(allowed: bool) -> Arc<Decision> {
        Arc::new(Decision {
            allowed,
            reason: None,
            headers: vec![],
        })
    }

    fn k(n: u8) -> Key {
        [n; 32]
    }

    #[test]
    fn expires() {
        let c = Cache::new(10);
        let t0 = Instant::now();
        c.insert(k(1), d(true), Duration::from_secs(5), t0);
        assert!(c.get(&k(1), t0).unwrap().allowed);
        assert!(c.get(&k(1), t0 + Duration::from_secs(4)).is_some());
        assert!(c.get(&k(1), t0 + Duration::from_secs(5)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn zero_ttl_and_disabled_store_nothing() {
        let t0 = Instant::now();
        let c = Cache::new(10);
        c.insert(k(1), d(true), Duration::ZERO, t0);
        assert!(c.get(&k(1), t0).is_none());
        let c = Cache::new(0);
        c.insert(k(1), d(true), Duration::from_secs(5), t0);
        assert!(c.get(&k(1), t0).is_none());
    }

    #[test]
    fn bounded_evicts_oldest() {
        let c = Cache::new(3);
        let t0 = Instant::now();
        for n in 1..=5 {
            c.insert(k(n), d(true), Duration::from_secs(60), t0);
            assert!(c.len() <= 3);
        }
        assert!(c.get(&k(1), t0).is_none());
        assert!(c.get(&k(2), t0).is_none());
        for n in 3..=5 {
            assert!(c.get(&k(n), t0).is_some(), "entry {n}");
        }
    }

    #[test]
    fn evicts_expired_before_live() {
        let c = Cache::new(3);
        let t0 = Instant::now();
        c.insert(k(1), d(true), Duration::from_secs(60), t0);
        c.insert(k(2), d(false), Duration::from_secs(1), t0);
        c.insert(k(3), d(true), Duration::from_secs(60), t0);
        let t1 = t0 + Duration::from_secs(2);
        c.insert(k(4), d(true), Duration::from_secs(60), t1);
        // k(2) had expired, so the oldest live entry k(1) survives.
        assert!(c.get(&k(1), t1).is_some());
        assert!(c.get(&k(3), t1).is_some());
        assert!(c.get(&k(4), t1).is_some());
    }

    #[test]
    fn reinsert_replaces_without_growing() {
        let c = Cache::new(2);
        let t0 = Instant::now();
        for _ in 0..1000 {
            c.insert(k(1), d(true), Duration::from_secs(60), t0);
        }
        c.insert(k(1), d(false), Duration::from_secs(60), t0);
        assert_eq!(c.len(), 1);
        assert!(!c.get(&k(1), t0).unwrap().allowed);
        assert!(
            c.state.lock().order.len() <= 2 + 65,
            "the order queue is compacted"
        );
        c.insert(k(2), d(true), Duration::from_secs(60), t0);
        c.insert(k(3), d(true), Duration::from_secs(60), t0);
        // k(1) was inserted (most recently) before k(2), so it goes first.
        assert!(c.get(&k(1), t0).is_none());
        assert!(c.get(&k(2), t0).is_some());
    }
}
