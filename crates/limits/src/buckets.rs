//! Many keys' buckets on one plan: a bounded, sharded store of [`GcraState`]s.
//!
//! A usage plan gives every caller (principal, API key or client IP) its own bucket with the
//! same rate and burst. [`Buckets`] keeps one [`GcraState`] per key, split into up to 16
//! shards (one `parking_lot::Mutex` each, chosen by a seeded hash of the key), each holding at
//! most its share of `capacity` keys.
//!
//! # Bounds
//!
//! * **Forgetting is free when the bucket is full.** A key whose bucket has refilled is the
//!   same as a key never seen, so it may be dropped without changing any verdict. When a
//!   shard is full, it first drops every refilled key (at most once per second per shard,
//!   so a flood of new keys does not rescan the shard on every insert).
//! * **Then the fullest goes.** If the shard is still full, the key whose bucket is closest to
//!   full among a few sampled goes: forgetting it forgives that caller the least.
//! * **Locks** are held for one map operation (no lock across an await; this crate has none).
//! * **Memory:** about 60 bytes per key (the [`Key`] 24, the state 16, the map's slot and
//!   control byte, at most 7/8 full), plus the key's heap bytes for keys over 22 bytes.
//!
//! ```
//! use portcullis_limits::{clock::Moment, Buckets, Gcra, Key, Rate};
//!
//! let plan = Buckets::new(Gcra::new(Rate::per_second(5), 5)?, 10_000);
//! let alice = Key::from("dev/alice");
//! for _ in 0..5 {
//!     assert!(plan.check(&alice, Moment::ZERO, 1).allowed);
//! }
//! assert!(!plan.check(&alice, Moment::ZERO, 1).allowed);
//! assert!(plan.check(&Key::from("dev/bob"), Moment::ZERO, 1).allowed);
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

use crate::clock::Moment;
use crate::gcra::{Gcra, GcraState, Verdict};
use crate::key::Key;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Duration;

/// The most shards a store is split into.
const MAX_SHARDS: usize = 16;
/// The fewest keys per shard (small stores have one shard).
const MIN_SHARD: usize = 64;
/// Keys sampled for the last-resort eviction.
const EVICT_SAMPLE: usize = 8;
/// A full shard drops refilled keys at most this often.
const PURGE_EVERY: Duration = Duration::from_secs(1);

type Map = HashMap<Key, GcraState, foldhash::fast::RandomState>;

struct Shard {
    map: Map,
    cap: usize,
    /// When this shard last dropped its refilled keys.
    purged: Option<Moment>,
}

/// One [`Gcra`] and a bounded set of per-key states. See the [module docs](self).
pub struct Buckets {
    gcra: Gcra,
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets")
            .field("gcra", &self.gcra)
            .field("len", &self.len())
            .finish()
    }
}

impl Buckets {
    /// A store of up to `capacity` keys (at least 1) on `gcra`.
    pub fn new(gcra: Gcra, capacity: usize) -> Buckets {
        let capacity = capacity.max(1);
        let n = (capacity / MIN_SHARD).clamp(1, MAX_SHARDS);
        let hasher = foldhash::fast::RandomState::default();
        let shards = (0..n)
            .map(|i| {
                // The first shards take the remainder, so the caps add up to `capacity`.
                let cap = capacity / n + usize::from(i < capacity % n);
                Mutex::new(Shard {
                    map: Map::with_hasher(hasher.clone()),
                    cap,
                    purged: None,
                })
            })
            .collect();
        Buckets {
            gcra,
            shards,
            hasher,
        }
    }

    pub fn gcra(&self) -> &Gcra {
        &self.gcra
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key);
        // The top bits: the map itself uses the low ones.
        let i = ((h >> 32) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// Checks a request of `cost` for `key` at `now` (see [`Gcra::check`]), taking the cost
    /// if it is admitted. A cost of 0 only reads the bucket and stores nothing new.
    pub fn check(&self, key: &Key, now: Moment, cost: u64) -> Verdict {
        let mut shard = self.shard(key).lock();
        if let Some(state) = shard.map.get_mut(key) {
            return self.gcra.check(state, now, cost);
        }
        let mut state = GcraState::default();
        let verdict = self.gcra.check(&mut state, now, cost);
        if verdict.allowed && cost > 0 {
            if shard.map.len() >= shard.cap {
                self.make_room(&mut shard, now);
            }
            shard.map.insert(key.clone(), state);
        }
        verdict
    }

    /// Frees one slot in a full shard: refilled keys first, then the fullest of a sample.
    fn make_room(&self, shard: &mut Shard, now: Moment) {
        let due = match shard.purged {
            None => true,
            Some(t) => now.saturating_since(t) >= PURGE_EVERY,
        };
        if due {
            shard.purged = Some(now);
            let gcra = self.gcra;
            shard.map.retain(|_, s| !gcra.is_full(s, now));
            if shard.map.len() < shard.cap {
                return;
            }
        }
        let victim = shard
            .map
            .iter()
            .take(EVICT_SAMPLE)
            .min_by_key(|(_, s)| s.tat())
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            shard.map.remove(&k);
        }
    }

    /// Keys held (including refilled ones not yet dropped).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every refilled key (for a periodic task; never needed for correctness).
    pub fn purge(&self, now: Moment) -> usize {
        let gcra = self.gcra;
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.lock();
                let before = s.map.len();
                s.map.retain(|_, st| !gcra.is_full(st, now));
                before - s.map.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rate;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let b = Buckets::new(Gcra::new(Rate::per_second(5), 5).unwrap(), 100);
        let t0 = Moment::ZERO;
        let (a, c) = (Key::from("a"), Key::from("c"));
        let admitted = (0..20).filter(|_| b.check(&a, t0, 1).allowed).count();
        assert_eq!(admitted, 5);
        let v = b.check(&a, t0, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, ms(200));
        assert_eq!(v.remaining, 0);
        assert!(b.check(&c, t0, 1).allowed);
        assert!(b.check(&a, t0 + ms(200), 1).allowed);
    }

    #[test]
    fn reading_stores_nothing() {
        let b = Buckets::new(Gcra::new(Rate::per_second(5), 5).unwrap(), 100);
        let v = b.check(&Key::from("a"), Moment::ZERO, 0);
        assert!(v.allowed);
        assert_eq!(v.remaining, 5);
        assert!(b.is_empty());
    }

    #[test]
    fn the_store_is_bounded_and_forgets_refilled_keys_first() {
        let b = Buckets::new(Gcra::new(Rate::per_second(1), 2).unwrap(), 1_000);
        let t0 = Moment::ZERO;
        for i in 0..10_000u32 {
            b.check(&Key::new(&i.to_be_bytes()), t0, 1);
        }
        assert!(b.len() <= 1_000, "{}", b.len());

        // A caller that emptied its bucket is kept while refilled keys are around to go.
        let b = Buckets::new(Gcra::new(Rate::per_second(1), 2).unwrap(), 64);
        let hog = Key::from("hog");
        assert!(b.check(&hog, t0, 2).allowed);
        for i in 0..63u32 {
            b.check(&Key::new(&i.to_be_bytes()), t0, 1);
        }
        // 1.5s later every other key has refilled; new keys push them out.
        let t1 = t0 + Duration::from_millis(1500);
        for i in 100..160u32 {
            b.check(&Key::new(&i.to_be_bytes()), t1, 1);
        }
        assert!(b.len() <= 64);
        assert!(!b.check(&hog, t1, 2).allowed, "the hog is still limited");
    }

    #[test]
    fn purge_drops_refilled_keys_only() {
        let b = Buckets::new(Gcra::new(Rate::per_second(1), 1).unwrap(), 100);
        let t0 = Moment::ZERO;
        b.check(&Key::from("a"), t0, 1);
        b.check(&Key::from("b"), t0 + ms(900), 1);
        assert_eq!(b.purge(t0 + ms(1000)), 1);
        assert_eq!(b.len(), 1);
    }
}
