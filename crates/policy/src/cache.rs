//! The engine's bounded, concurrent maps: built principals by identity and decisions by
//! request. Sharded `RwLock`ed hash maps (a hit takes one shard's read lock); a full shard
//! drops its oldest entry for each new one. Keys are compared in full, never by hash alone.
//! Admission filters (`Doorkeeper`, `SeenArcs`) let only what comes back be cached.
//! The caches live in the engine, so a config reload (a new engine) starts them empty.

use parking_lot::RwLock;
use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

const SHARDS: usize = 16;

struct Shard<K, V> {
    map: HashMap<K, V>,
    /// Keys in insertion order, for first-in-first-out eviction: one entry out per entry in,
    /// so no insert pays for a sweep.
    order: VecDeque<K>,
}

pub struct Sharded<K, V> {
    shards: Box<[RwLock<Shard<K, V>>]>,
    per_shard: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    /// A map of at most `capacity` entries, rounded up to a multiple of the shard count
    /// (0: caches nothing).
    pub fn new(capacity: usize) -> Self {
        Sharded {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        map: HashMap::new(),
                        order: VecDeque::new(),
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    /// `shard` is any well-spread number derived from the key (e.g. from an address); the
    /// same key must always come with the same `shard`.
    pub fn get<Q>(&self, shard: usize, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[shard % SHARDS].read().map.get(key).cloned()
    }

    pub fn insert(&self, shard: usize, key: K, value: V) {
        if self.per_shard == 0 {
            return;
        }
        let evicted;
        {
            let mut s = self.shards[shard % SHARDS].write();
            if s.map.contains_key(&key) {
                // Two threads decided the same thing at once: keep the first.
                return;
            }
            evicted = if s.map.len() >= self.per_shard {
                s.order.pop_front().and_then(|k| s.map.remove(&k))
            } else {
                None
            };
            s.order.push_back(key.clone());
            s.map.insert(key, value);
        }
        // Dropped outside the lock: it may free an identity.
        drop(evicted);
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().map.len()).sum()
    }
}

/// Admission: remembers (lossily) what it has seen, so that only what comes back at least
/// a second time is cached. One-off identities and requests then cost no insertion and push
/// nothing useful out. A slot per hash, overwritten by collisions: a wrong answer only
/// caches something a little earlier or later, it never changes a decision.
pub struct Doorkeeper {
    slots: Box<[std::sync::atomic::AtomicU64]>,
}

impl Doorkeeper {
    pub fn new(slots: usize) -> Self {
        Doorkeeper {
            slots: (0..slots.max(1))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Whether `h` was seen before (and remembers it).
    pub fn seen(&self, h: u64) -> bool {
        let h = h | 1; // 0 marks an empty slot
        let i = (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % self.slots.len();
        self.slots[i].swap(h, std::sync::atomic::Ordering::Relaxed) == h
    }
}

/// Admission for shared values: remembers (lossily) the `Arc`s it has seen, by a `Weak`
/// that pins the allocation, so a new value at a freed address is never taken for an old
/// one (an allocator reuses addresses at once). Only an `Arc` seen before is cached.
pub struct SeenArcs<T> {
    slots: Box<[parking_lot::Mutex<std::sync::Weak<T>>]>,
}

impl<T> SeenArcs<T> {
    pub fn new(slots: usize) -> Self {
        SeenArcs {
            slots: (0..slots.max(1))
                .map(|_| parking_lot::Mutex::new(std::sync::Weak::new()))
                .collect(),
        }
    }

    /// Whether this very `Arc` was seen before (and remembers it).
    pub fn seen(&self, a: &std::sync::Arc<T>) -> bool {
        let addr = std::sync::Arc::as_ptr(a) as usize;
        let i = shard_of(addr, 0x51ed) ^ (addr >> 4);
        let mut slot = self.slots[i % self.slots.len()].lock();
        // The `Weak` keeps the allocation, so an equal address is the same `Arc`.
        if std::ptr::eq(slot.as_ptr(), std::sync::Arc::as_ptr(a)) {
            return true;
        }
        let old = std::mem::replace(&mut *slot, std::sync::Arc::downgrade(a));
        drop(slot);
        drop(old);
        false
    }
}

/// A shard number from an address (allocations are aligned: drop the low bits).
pub fn shard_of(addr: usize, salt: u32) -> usize {
    let x = (addr >> 4) as u64 ^ ((salt as u64) << 32 | salt as u64);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorkeeper() {
        let d = Doorkeeper::new(128);
        assert!(!d.seen(42));
        assert!(d.seen(42));
        assert!(d.seen(42));
        assert!(!d.seen(7));
    }

    #[test]
    fn seen_arcs() {
        let s = SeenArcs::new(64);
        let a = std::sync::Arc::new(1u64);
        assert!(!s.seen(&a));
        assert!(s.seen(&a));
        let addr = std::sync::Arc::as_ptr(&a);
        drop(a);
        // The allocation is pinned: a new value cannot get the old address while remembered.
        let b = std::sync::Arc::new(2u64);
        assert_ne!(std::sync::Arc::as_ptr(&b), addr);
        assert!(!s.seen(&b));
    }

    #[test]
    fn bounded() {
        let m: Sharded<u32, u32> = Sharded::new(64);
        for i in 0..10_000u32 {
            m.insert(i as usize, i, i);
            assert_eq!(m.get(i as usize, &i), Some(i));
        }
        assert_eq!(m.len(), 64);
        let none: Sharded<u32, u32> = Sharded::new(0);
        none.insert(0, 1, 1);
        assert_eq!(none.get(0, &1), None);
    }
}
