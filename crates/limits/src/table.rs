//! Stick tables (HAProxy's model): per-key counters, bounded in size, forgotten when idle.
//!
//! A [`Table`] is defined by a [`TableSpec`]: at most `size` entries, each forgotten after
//! `expire` without use, each storing exactly the [`Counter`]s in its `store` list. Callers
//! pick the key (client IP, principal, API key id, header, …; see [`Key`]) and record what
//! happened; rules read the counters back from a [`Snapshot`].
//!
//! ```
//! use portcullis_limits::{clock::Moment, Key, Table, TableSpec};
//! use std::time::Duration;
//!
//! let spec = TableSpec::parse(
//!     1_000_000,
//!     Duration::from_secs(600),
//!     ["http_req_rate(10s)", "conn_cur"],
//! )?;
//! let per_ip = Table::new(spec);
//! let ip = Key::from(std::net::IpAddr::from([192, 0, 2, 7]));
//! let now = Moment::ZERO;
//!
//! // The limit phase: count the request, then read the rate the rule compares.
//! let seen = per_ip.record_request(&ip, now);
//! assert_eq!(seen.http_req_rate, Some(1));
//! assert_eq!(seen.http_err_rate, None, "not stored by this table");
//! # Ok::<(), portcullis_limits::Error>(())
//! ```
//!
//! # Bounds
//!
//! * **Size.** A full table evicts its least recently used entry to make room. The table is
//!   split into up to 16 shards (one `parking_lot::Mutex` each, chosen by a seeded hash of the
//!   key), each holding a fixed share of `size` with its own LRU order: with many keys the
//!   shards fill evenly and this behaves like one LRU; with about `size` distinct keys a busy
//!   shard may evict while another still has room, so give the table some headroom. Tables
//!   under 128 entries have one shard and an exact LRU.
//! * **Expiry.** An entry not used for `expire` is gone: reads treat it as absent, and any
//!   write to its shard removes up to 8 expired entries from the LRU tail, so idle memory is
//!   reclaimed as traffic flows. [`Table::purge_expired`] sweeps everything, for a periodic
//!   task. An entry with `conn_cur > 0` is in use: it does not expire, and eviction passes over
//!   it (up to 8 such entries, then evicts anyway, so the bound holds).
//! * **Keys** are bounded by [`Key`] itself: at most 256 bytes are kept; longer keys are
//!   replaced by a SHA-256 prefix.
//! * **Locks** are held only for the few operations on one entry (no lock is held across an
//!   await; this crate has none). [`Table::top`], [`Table::len`] and the sweeps lock one shard
//!   at a time.
//!
//! # Memory per entry
//!
//! An entry costs a fixed part, plus the key's heap bytes for keys of 23 to 256 bytes, plus its
//! tags. The fixed part is what [`TableSpec::bytes_per_entry`] computes:
//!
//! | part | bytes |
//! |---|---|
//! | node: key (32: inline up to 22 bytes, and its hash), last use (8), LRU links (8) | 48 |
//! | index: an 8-byte slot, at most 3/4 full | ≤ 11 |
//! | `http_req_rate`, `http_err_rate` (each a `u32` sliding window, [`WindowState`]) | 12 each |
//! | `bytes_in_rate`, `bytes_out_rate` (each a `u64` sliding window) | 24 each |
//! | `http_req_cnt`, `http_err_cnt`, `gpc0` (`u64`) | 8 each |
//! | `conn_cur` (`u32`) | 4 |
//! | `tags` (a pointer; the tags themselves are on the heap) | 8 |
//!
//! So the issue's example table, `[http_req_rate(10s), http_err_rate(1m), conn_cur]` keyed by
//! client IP, costs 87 bytes per entry: 1,000,000 IPs in about 87 MB. A table storing
//! everything costs 167. (8 of each are the key's hash, kept so that a request hashes its key
//! once for every table and plan it touches.) `memory_per_entry_is_what_the_docs_say` checks
//! these figures against the allocated capacity of a full table ([`Table::memory`]), and the
//! ignored test `rss_of_a_million_ip_keys` measures the process's resident memory: inserting
//! 1,000,000 IPv4 keys into that table grew RSS by 88.0 MB (88.2 bytes per entry; release
//! build, Linux; 2026-12-07). It also shows the shard effect above: 998,209 of the
//! 1,000,000 keys were still held.

use crate::clock::Moment;
use crate::counter::{Counter, Kind, Kinds};
use crate::key::Key;
use crate::window::WindowState;
use crate::{Error, Period};
use parking_lot::Mutex;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::time::Duration;

/// The most shards a table is split into.
pub const MAX_SHARDS: usize = 16;
/// The fewest entries a shard holds (so small tables have one shard and an exact LRU).
pub const MIN_SHARD_SIZE: usize = 64;
/// The largest `size` a table accepts.
pub const MAX_SIZE: usize = 1 << 31;
/// The most tags an entry holds.
pub const MAX_TAGS: usize = 16;
/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 64;

/// Entries removed per write when their shard has expired entries at its LRU tail.
const SWEEP_PER_WRITE: usize = 8;
/// In-use entries eviction passes over before evicting one anyway.
const EVICT_TRIES: usize = 8;
const NIL: u32 = u32::MAX;

/// A table's shape: how many entries, how long they live idle, and what each one stores.
/// Two specs are equal when the tables have the same shape (a reload that changes the shape
/// must start the table afresh).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    size: usize,
    expire: Duration,
    store: Vec<Counter>,
}

impl TableSpec {
    /// A spec for up to `size` entries (1..=2^31), each forgotten after `expire` (≥ 1ms)
    /// without use, storing the `store` counters (each kind at most once).
    pub fn new(
        size: usize,
        expire: Duration,
        store: impl IntoIterator<Item = Counter>,
    ) -> Result<TableSpec, Error> {
        if size == 0 || size > MAX_SIZE {
            return Err(Error::BadTable {
                fix: format!("`size` must be between 1 and {MAX_SIZE}; it was {size}"),
            });
        }
        if expire < Duration::from_millis(1) {
            return Err(Error::BadTable {
                fix: "`expire` must be at least 1ms, e.g. `10m`".into(),
            });
        }
        let store: Vec<Counter> = store.into_iter().collect();
        for (i, c) in store.iter().enumerate() {
            if let Some(first) = store[..i].iter().find(|d| d.kind() == c.kind()) {
                let fix = if first == c {
                    format!("`{c}` is listed twice in `store`; list it once")
                } else {
                    format!(
                        "`store` lists both `{first}` and `{c}`; a table keeps one `{}`, so \
                         define a second table for the other period",
                        c.kind()
                    )
                };
                return Err(Error::BadTable { fix });
            }
        }
        Ok(TableSpec {
            size,
            expire,
            store,
        })
    }

    /// [`TableSpec::new`] with the counters as the config writes them.
    pub fn parse<'a>(
        size: usize,
        expire: Duration,
        store: impl IntoIterator<Item = &'a str>,
    ) -> Result<TableSpec, Error> {
        let store = store
            .into_iter()
            .map(Counter::parse)
            .collect::<Result<Vec<_>, _>>()?;
        TableSpec::new(size, expire, store)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn expire(&self) -> Duration {
        self.expire
    }

    pub fn store(&self) -> &[Counter] {
        &self.store
    }

    /// The stored counter of this kind, with its period.
    pub fn counter(&self, kind: Kind) -> Option<Counter> {
        self.store.iter().copied().find(|c| c.kind() == kind)
    }

    pub fn stores(&self, kind: Kind) -> bool {
        self.counter(kind).is_some()
    }

    /// The fixed memory one entry costs when the table is full, in bytes (rounded up): the
    /// node, its share of the index, and the stored counters. Keys of 23 to 256 bytes and tags
    /// add their heap bytes. See the [module docs](self#memory-per-entry).
    pub fn bytes_per_entry(&self) -> usize {
        size_of::<Node>() + (size_of::<Slot>() * 4).div_ceil(3) + Columns::bytes_per_entry(self)
    }

    fn period(&self, kind: Kind) -> Period {
        // Only called for stored rates; the fallback is never used to count.
        self.counter(kind)
            .and_then(Counter::period)
            .unwrap_or(Period::new(Duration::from_secs(1)).expect("1s is a valid period"))
    }
}

/// The counter values of one entry at one moment. A field is `None` when the table does not
/// store that counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub http_req_rate: Option<u64>,
    pub http_req_cnt: Option<u64>,
    pub http_err_rate: Option<u64>,
    pub http_err_cnt: Option<u64>,
    pub conn_cur: Option<u64>,
    pub bytes_in_rate: Option<u64>,
    pub bytes_out_rate: Option<u64>,
    pub gpc0: Option<u64>,
    /// Empty when there are none or the table does not store tags.
    pub tags: Vec<String>,
    /// How long until the entry expires if unused (the full `expire` while `conn_cur > 0`).
    pub expires_in: Duration,
}

impl Snapshot {
    /// A numeric counter by kind (`None` for [`Kind::Tags`] and for counters not stored).
    pub fn get(&self, kind: Kind) -> Option<u64> {
        match kind {
            Kind::HttpReqRate => self.http_req_rate,
            Kind::HttpReqCnt => self.http_req_cnt,
            Kind::HttpErrRate => self.http_err_rate,
            Kind::HttpErrCnt => self.http_err_cnt,
            Kind::ConnCur => self.conn_cur,
            Kind::BytesInRate => self.bytes_in_rate,
            Kind::BytesOutRate => self.bytes_out_rate,
            Kind::Gpc0 => self.gpc0,
            Kind::Tags => None,
        }
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// What a table's allocations add up to (see [`Table::memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub entries: usize,
    /// Bytes allocated by the table: capacities of its vectors, heap keys and tags, and the
    /// shards themselves.
    pub bytes: usize,
}

type Win32 = WindowState<u32, 2>;
type Win64 = WindowState<u64, 2>;
/// An entry's tags, allocated only when it has some.
type Tags = Option<Box<Vec<Box<str>>>>;

macro_rules! columns {
    ($($field:ident: $ty:ty = $kind:ident),* $(,)?) => {
        /// The counters, one vector per stored counter (`None` if not stored), indexed like
        /// `Shard::nodes`: each entry pays only for what its table stores, with no per-entry
        /// allocation.
        struct Columns {
            $($field: Option<Vec<$ty>>,)*
        }

        impl Columns {
            fn new(spec: &TableSpec) -> Columns {
                Columns { $($field: spec.stores(Kind::$kind).then(Vec::new),)* }
            }

            fn push_default(&mut self) {
                $(if let Some(c) = &mut self.$field {
                    c.push(<$ty>::default());
                })*
            }

            fn reset(&mut self, i: usize) {
                $(if let Some(c) = &mut self.$field {
                    c[i] = <$ty>::default();
                })*
            }

            fn reserve_exact(&mut self, additional: usize) {
                $(if let Some(c) = &mut self.$field {
                    c.reserve_exact(additional);
                })*
            }

            fn heap_bytes(&self) -> usize {
                0 $(+ self.$field.as_ref().map_or(0, |c| c.capacity() * size_of::<$ty>()))*
            }

            fn bytes_per_entry(spec: &TableSpec) -> usize {
                0 $(+ if spec.stores(Kind::$kind) { size_of::<$ty>() } else { 0 })*
            }
        }
    };
}

columns! {
    http_req_rate: Win32 = HttpReqRate,
    http_req_cnt: u64 = HttpReqCnt,
    http_err_rate: Win32 = HttpErrRate,
    http_err_cnt: u64 = HttpErrCnt,
    conn_cur: u32 = ConnCur,
    bytes_in_rate: Win64 = BytesInRate,
    bytes_out_rate: Win64 = BytesOutRate,
    gpc0: u64 = Gpc0,
    tags: Tags = Tags,
}

/// An entry's identity and place in the LRU order. Its counters live in `Columns`.
struct Node {
    key: Key,
    /// Nanoseconds; see [`Moment`].
    last_used: u64,
    /// Towards the most recently used end (the head).
    prev: u32,
    next: u32,
}

/// An index slot: the node and the low 32 bits of the key's hash (to skip most key
/// comparisons, and to find the slot's home when rehashing or deleting).
#[derive(Clone, Copy)]
struct Slot {
    node: u32,
    hash: u32,
}

const EMPTY: Slot = Slot { node: NIL, hash: 0 };

/// The slot a hash would like: a multiply-shift onto `0..n`, so `n` need not be a power of two
/// and the index can stop growing at exactly 3/4 full.
fn home(hash: u32, n: usize) -> usize {
    ((u64::from(hash) * n as u64) >> 32) as usize
}

/// One shard: an open-addressing index (linear probing, backward-shift deletion) over a slab
/// of nodes threaded on an LRU list, plus a free list of removed nodes.
struct Shard {
    cap: usize,
    len: usize,
    slots: Vec<Slot>,
    nodes: Vec<Node>,
    cols: Columns,
    head: u32,
    tail: u32,
    free: u32,
}

impl Shard {
    fn new(cap: usize, spec: &TableSpec) -> Shard {
        Shard {
            cap,
            len: 0,
            slots: Vec::new(),
            nodes: Vec::new(),
            cols: Columns::new(spec),
            head: NIL,
            tail: NIL,
            free: NIL,
        }
    }

    fn find(&self, key: &Key, hash: u32) -> Option<(usize, u32)> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let mut i = home(hash, n);
        loop {
            let s = self.slots[i];
            if s.node == NIL {
                return None;
            }
            if s.hash == hash && self.nodes[s.node as usize].key == *key {
                return Some((i, s.node));
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// The slot holding `node`, whose key hashes to `hash`.
    fn slot_of(&self, node: u32, hash: u32) -> usize {
        let n = self.slots.len();
        let mut i = home(hash, n);
        while self.slots[i].node != node {
            debug_assert!(self.slots[i].node != NIL, "node not in index");
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        i
    }

    fn place(slots: &mut [Slot], s: Slot) {
        let n = slots.len();
        let mut i = home(s.hash, n);
        while slots[i].node != NIL {
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        slots[i] = s;
    }

    fn insert_slot(&mut self, node: u32, hash: u32) {
        let n = self.slots.len();
        if (self.len + 1) * 4 > n * 3 {
            let most = self.cap + self.cap / 3 + 1;
            let grown = (n * 2).clamp(8, most.max(8));
            let mut slots = vec![EMPTY; grown];
            for s in self.slots.iter().filter(|s| s.node != NIL) {
                Self::place(&mut slots, *s);
            }
            self.slots = slots;
        }
        Self::place(&mut self.slots, Slot { node, hash });
    }

    fn remove_slot(&mut self, mut hole: usize) {
        let n = self.slots.len();
        let mut j = hole;
        loop {
            j = if j + 1 == n { 0 } else { j + 1 };
            let s = self.slots[j];
            if s.node == NIL {
                break;
            }
            // `s` may move back into the hole unless its home lies after the hole.
            let from_home = (j + n - home(s.hash, n)) % n;
            let from_hole = (j + n - hole) % n;
            if from_home >= from_hole {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }

    fn mark_used(&mut self, i: u32, now: Moment) {
        let n = &mut self.nodes[i as usize];
        n.last_used = n.last_used.max(now.as_nanos());
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn in_use(&self, i: u32) -> bool {
        self.cols
            .conn_cur
            .as_ref()
            .is_some_and(|c| c[i as usize] > 0)
    }

    fn idle(&self, i: u32, now: Moment) -> Duration {
        now.saturating_since(Moment::from_nanos(self.nodes[i as usize].last_used))
    }

    fn expired(&self, i: u32, now: Moment, expire: Duration) -> bool {
        self.idle(i, now) >= expire && !self.in_use(i)
    }

    fn remove(&mut self, i: u32, hasher: &foldhash::fast::RandomState) {
        let hash = hasher.hash_one(&self.nodes[i as usize].key) as u32;
        let slot = self.slot_of(i, hash);
        self.remove_slot(slot);
        self.unlink(i);
        self.cols.reset(i as usize);
        let n = &mut self.nodes[i as usize];
        n.key = Key::new(&[]);
        n.next = self.free;
        self.free = i;
        self.len -= 1;
    }

    /// Removes up to `budget` expired entries from the LRU tail; returns how many.
    fn sweep(
        &mut self,
        now: Moment,
        expire: Duration,
        budget: usize,
        hasher: &foldhash::fast::RandomState,
    ) -> usize {
        let mut removed = 0;
        for _ in 0..budget {
            let t = self.tail;
            if t == NIL || self.idle(t, now) < expire {
                break;
            }
            if self.in_use(t) {
                self.mark_used(t, now);
            } else {
                self.remove(t, hasher);
                removed += 1;
            }
        }
        removed
    }

    /// A node for a new entry: a free one, a new one, or the least recently used one.
    fn allocate(&mut self, now: Moment, hasher: &foldhash::fast::RandomState) -> u32 {
        if self.free == NIL {
            if self.nodes.len() < self.cap {
                if self.nodes.len() == self.nodes.capacity() {
                    // Grow by doubling, but never past the shard's share.
                    let more = self.nodes.len().max(8).min(self.cap - self.nodes.len());
                    self.nodes.reserve_exact(more);
                    self.cols.reserve_exact(more);
                }
                self.nodes.push(Node {
                    key: Key::new(&[]),
                    last_used: 0,
                    prev: NIL,
                    next: NIL,
                });
                self.cols.push_default();
                return (self.nodes.len() - 1) as u32;
            }
            let mut victim = self.tail;
            for _ in 0..EVICT_TRIES {
                if !self.in_use(victim) {
                    break;
                }
                self.mark_used(victim, now);
                victim = self.tail;
            }
            self.remove(victim, hasher);
        }
        let i = self.free;
        self.free = self.nodes[i as usize].next;
        i
    }

    /// The entry for `key`, created if absent and restarted if expired, marked used at `now`.
    fn entry(
        &mut self,
        key: &Key,
        hash: u32,
        now: Moment,
        expire: Duration,
        hasher: &foldhash::fast::RandomState,
    ) -> u32 {
        self.sweep(now, expire, SWEEP_PER_WRITE, hasher);
        if let Some((_, i)) = self.find(key, hash) {
            if self.expired(i, now, expire) {
                self.cols.reset(i as usize);
            }
            self.mark_used(i, now);
            return i;
        }
        let i = self.allocate(now, hasher);
        {
            let n = &mut self.nodes[i as usize];
            n.key = key.clone();
            n.last_used = now.as_nanos();
        }
        self.insert_slot(i, hash);
        self.push_front(i);
        self.len += 1;
        i
    }

    /// The live (unexpired) entry for `key`, without marking it used.
    fn live(&self, key: &Key, hash: u32, now: Moment, expire: Duration) -> Option<u32> {
        let (_, i) = self.find(key, hash)?;
        (!self.expired(i, now, expire)).then_some(i)
    }

    fn heap_bytes(&self) -> usize {
        let mut bytes = self.slots.capacity() * size_of::<Slot>()
            + self.nodes.capacity() * size_of::<Node>()
            + self.cols.heap_bytes();
        let mut i = self.head;
        while i != NIL {
            bytes += self.nodes[i as usize].key.heap_bytes();
            i = self.nodes[i as usize].next;
        }
        if let Some(tags) = &self.cols.tags {
            for t in tags.iter().flatten() {
                bytes += size_of::<Vec<Box<str>>>()
                    + t.capacity() * size_of::<Box<str>>()
                    + t.iter().map(|s| s.len()).sum::<usize>();
            }
        }
        bytes
    }
}

/// A stick table. See the [module docs](self).
pub struct Table {
    spec: TableSpec,
    req_period: Period,
    err_period: Period,
    in_period: Period,
    out_period: Period,
    hasher: foldhash::fast::RandomState,
    shard_bits: u32,
    shards: Box<[Mutex<Shard>]>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("spec", &self.spec)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Table {
    /// An empty table. Memory is allocated as entries arrive, never past the spec's size.
    pub fn new(spec: TableSpec) -> Table {
        let shards = (spec.size / MIN_SHARD_SIZE).clamp(1, MAX_SHARDS);
        let shard_bits = usize::BITS - 1 - shards.leading_zeros(); // round down to a power of 2
        let count = 1usize << shard_bits;
        let shards = (0..count)
            .map(|i| {
                let cap = spec.size / count + usize::from(i < spec.size % count);
                Mutex::new(Shard::new(cap, &spec))
            })
            .collect();
        Table {
            req_period: spec.period(Kind::HttpReqRate),
            err_period: spec.period(Kind::HttpErrRate),
            in_period: spec.period(Kind::BytesInRate),
            out_period: spec.period(Kind::BytesOutRate),
            hasher: foldhash::fast::RandomState::default(),
            shard_bits,
            shards,
            spec,
        }
    }

    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// The shard and the low 32 bits of the hash (the shard uses the top bits).
    fn locate(&self, key: &Key) -> (&Mutex<Shard>, u32) {
        let h = self.hasher.hash_one(key);
        let shard = if self.shard_bits == 0 {
            0
        } else {
            (h >> (64 - self.shard_bits)) as usize
        };
        (&self.shards[shard], h as u32)
    }

    /// Runs `f` on the entry for `key` (created if absent, restarted if expired), marked used
    /// at `now`, under its shard's lock. Keep `f` short: it blocks that shard.
    pub fn with_entry<R>(&self, key: &Key, now: Moment, f: impl FnOnce(&mut Entry<'_>) -> R) -> R {
        let (shard, hash) = self.locate(key);
        let mut shard = shard.lock();
        let idx = shard.entry(key, hash, now, self.spec.expire, &self.hasher);
        f(&mut Entry {
            table: self,
            shard: &mut shard,
            idx: idx as usize,
            now,
        })
    }

    /// Starts tracking `key` (or refreshes it) without counting anything; returns its values.
    pub fn track(&self, key: &Key, now: Moment) -> Snapshot {
        self.with_entry(key, now, |e| e.snapshot())
    }

    /// Counts a request: `http_req_rate` and `http_req_cnt`. Returns the values after it.
    pub fn record_request(&self, key: &Key, now: Moment) -> Snapshot {
        self.with_entry(key, now, |e| {
            e.add_request();
            e.snapshot()
        })
    }

    /// Counts an error: `http_err_rate` and `http_err_cnt`. Record only errors the origin or
    /// the client's authentication caused, never a policy denial, or a client could push a
    /// victim key's error count up with requests it knows will be denied.
    pub fn record_error(&self, key: &Key, now: Moment) -> Snapshot {
        self.with_entry(key, now, |e| {
            e.add_error();
            e.snapshot()
        })
    }

    /// Counts request and response bytes: `bytes_in_rate` and `bytes_out_rate`.
    pub fn record_bytes(&self, key: &Key, now: Moment, bytes_in: u64, bytes_out: u64) -> Snapshot {
        self.with_entry(key, now, |e| {
            e.add_bytes_in(bytes_in);
            e.add_bytes_out(bytes_out);
            e.snapshot()
        })
    }

    /// One more request or connection in progress (`conn_cur`). Pair it with
    /// [`Table::conn_end`].
    pub fn conn_start(&self, key: &Key, now: Moment) -> Snapshot {
        self.with_entry(key, now, |e| {
            e.conn_start();
            e.snapshot()
        })
    }

    /// One fewer in progress. Does nothing if the entry is gone (cleared, or evicted as the
    /// last resort); never goes below zero.
    pub fn conn_end(&self, key: &Key, now: Moment) -> Option<Snapshot> {
        let (shard, hash) = self.locate(key);
        let mut shard = shard.lock();
        let (_, idx) = shard.find(key, hash)?;
        shard.mark_used(idx, now);
        let mut e = Entry {
            table: self,
            shard: &mut shard,
            idx: idx as usize,
            now,
        };
        e.conn_end();
        Some(e.snapshot())
    }

    /// The values for `key`, if it has a live entry. Reading does not count as use.
    pub fn get(&self, key: &Key, now: Moment) -> Option<Snapshot> {
        let (shard, hash) = self.locate(key);
        let shard = shard.lock();
        let idx = shard.live(key, hash, now, self.spec.expire)?;
        Some(self.snapshot(&shard, idx as usize, now))
    }

    /// The `n` live entries with the highest `by`, highest first (ties by key). Scans the
    /// whole table, one shard at a time: for the admin API, not the request path.
    pub fn top(&self, n: usize, by: Kind, now: Moment) -> Result<Vec<(Key, Snapshot)>, Error> {
        if by == Kind::Tags {
            return Err(Error::NotStored {
                kind: by,
                fix: "tags are not a number; sort by a counter such as `http_req_rate`".into(),
            });
        }
        self.require(by)?;
        /// Ordered best first: higher value, then lower key.
        struct Ranked(u64, Key, Snapshot);
        impl PartialEq for Ranked {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == Ordering::Equal
            }
        }
        impl Eq for Ranked {}
        impl PartialOrd for Ranked {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Ranked {
            fn cmp(&self, o: &Self) -> Ordering {
                self.0.cmp(&o.0).then_with(|| o.1.cmp(&self.1))
            }
        }
        // A min-heap of the best `n` so far: its top is the worst of them.
        let mut best: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(n + 1);
        if n == 0 {
            return Ok(Vec::new());
        }
        for shard in self.shards.iter() {
            let shard = shard.lock();
            let mut i = shard.head;
            while i != NIL {
                let node = &shard.nodes[i as usize];
                let next = node.next;
                if !shard.expired(i, now, self.spec.expire) {
                    let value = self.value(&shard, i as usize, by, now).unwrap_or(0);
                    let better = match best.peek() {
                        Some(Reverse(worst)) if best.len() == n => {
                            value > worst.0 || (value == worst.0 && node.key < worst.1)
                        }
                        _ => true,
                    };
                    if better {
                        let snap = self.snapshot(&shard, i as usize, now);
                        best.push(Reverse(Ranked(value, node.key.clone(), snap)));
                        if best.len() > n {
                            best.pop();
                        }
                    }
                }
                i = next;
            }
        }
        Ok(best
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(Ranked(_, k, s))| (k, s))
            .collect())
    }

    fn require(&self, kind: Kind) -> Result<(), Error> {
        if self.spec.stores(kind) {
            return Ok(());
        }
        let written = match kind.has_period() {
            true => format!("{kind}(10s)"),
            false => kind.to_string(),
        };
        Err(Error::NotStored {
            kind,
            fix: format!("add `{written}` to the table's `store` list"),
        })
    }

    /// Sets `gpc0` for `key` (creating the entry), as `set table` does in HAProxy.
    pub fn set_gpc(&self, key: &Key, now: Moment, value: u64) -> Result<Snapshot, Error> {
        self.require(Kind::Gpc0)?;
        self.with_entry(key, now, |e| {
            e.set_gpc0(value)?;
            Ok(e.snapshot())
        })
    }

    /// Adds `tag` to `key`'s tags (creating the entry).
    pub fn set_tag(&self, key: &Key, now: Moment, tag: &str) -> Result<Snapshot, Error> {
        self.require(Kind::Tags)?;
        check_tag(tag)?;
        self.with_entry(key, now, |e| {
            e.set_tag(tag)?;
            Ok(e.snapshot())
        })
    }

    /// Removes `tag` from `key`'s tags; returns whether it was there.
    pub fn remove_tag(&self, key: &Key, now: Moment, tag: &str) -> Result<bool, Error> {
        self.require(Kind::Tags)?;
        let (shard, hash) = self.locate(key);
        let mut shard = shard.lock();
        let Some(idx) = shard.live(key, hash, now, self.spec.expire) else {
            return Ok(false);
        };
        shard.mark_used(idx, now);
        Entry {
            table: self,
            shard: &mut shard,
            idx: idx as usize,
            now,
        }
        .remove_tag(tag)
    }

    /// Forgets `key`; returns whether it had an entry.
    pub fn clear(&self, key: &Key) -> bool {
        let (shard, hash) = self.locate(key);
        let mut shard = shard.lock();
        match shard.find(key, hash) {
            Some((_, idx)) => {
                shard.remove(idx, &self.hasher);
                true
            }
            None => false,
        }
    }

    /// Forgets every entry and frees the table's memory.
    pub fn clear_all(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let cap = shard.cap;
            *shard = Shard::new(cap, &self.spec);
        }
    }

    /// Removes every expired entry; returns how many. Writes already remove a few each, so
    /// this is for a periodic task that returns idle memory sooner.
    pub fn purge_expired(&self, now: Moment) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .sweep(now, self.spec.expire, usize::MAX, &self.hasher)
            })
            .sum()
    }

    /// Entries held, including expired ones not yet removed.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the table has allocated, for metrics and for checking the documented figures.
    pub fn memory(&self) -> Memory {
        let mut m = Memory {
            entries: 0,
            bytes: size_of::<Table>() + self.shards.len() * size_of::<Mutex<Shard>>(),
        };
        for s in self.shards.iter() {
            let s = s.lock();
            m.entries += s.len;
            m.bytes += s.heap_bytes();
        }
        m
    }

    fn value(&self, shard: &Shard, i: usize, kind: Kind, now: Moment) -> Option<u64> {
        let c = &shard.cols;
        match kind {
            Kind::HttpReqRate => c
                .http_req_rate
                .as_ref()
                .map(|v| v[i].rate(self.req_period, now)),
            Kind::HttpReqCnt => c.http_req_cnt.as_ref().map(|v| v[i]),
            Kind::HttpErrRate => c
                .http_err_rate
                .as_ref()
                .map(|v| v[i].rate(self.err_period, now)),
            Kind::HttpErrCnt => c.http_err_cnt.as_ref().map(|v| v[i]),
            Kind::ConnCur => c.conn_cur.as_ref().map(|v| u64::from(v[i])),
            Kind::BytesInRate => c
                .bytes_in_rate
                .as_ref()
                .map(|v| v[i].rate(self.in_period, now)),
            Kind::BytesOutRate => c
                .bytes_out_rate
                .as_ref()
                .map(|v| v[i].rate(self.out_period, now)),
            Kind::Gpc0 => c.gpc0.as_ref().map(|v| v[i]),
            Kind::Tags => None,
        }
    }

    fn snapshot(&self, shard: &Shard, i: usize, now: Moment) -> Snapshot {
        self.read(shard, i, now, Kinds::ALL)
    }

    /// The entry's values of `kinds`; the others read as not stored.
    fn read(&self, shard: &Shard, i: usize, now: Moment, kinds: Kinds) -> Snapshot {
        let v = |kind| {
            if kinds.has(kind) {
                self.value(shard, i, kind, now)
            } else {
                None
            }
        };
        let expires_in = if shard.in_use(i as u32) {
            self.spec.expire
        } else {
            self.spec.expire.saturating_sub(shard.idle(i as u32, now))
        };
        Snapshot {
            http_req_rate: v(Kind::HttpReqRate),
            http_req_cnt: v(Kind::HttpReqCnt),
            http_err_rate: v(Kind::HttpErrRate),
            http_err_cnt: v(Kind::HttpErrCnt),
            conn_cur: v(Kind::ConnCur),
            bytes_in_rate: v(Kind::BytesInRate),
            bytes_out_rate: v(Kind::BytesOutRate),
            gpc0: v(Kind::Gpc0),
            tags: shard
                .cols
                .tags
                .as_ref()
                .filter(|_| kinds.has(Kind::Tags))
                .and_then(|t| t[i].as_deref())
                .map(|t| t.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
            expires_in,
        }
    }
}

fn check_tag(tag: &str) -> Result<(), Error> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        return Ok(());
    }
    Err(Error::BadTag {
        tag: tag.chars().take(MAX_TAG_LEN).collect(),
        fix: format!(
            "a tag is 1 to {MAX_TAG_LEN} letters, digits, `_`, `-`, `.` or `:`, e.g. `abuser`"
        ),
    })
}

/// One entry, borrowed under its shard's lock by [`Table::with_entry`]. Counting methods do
/// nothing for counters the table does not store; setting methods say so with an error.
pub struct Entry<'a> {
    table: &'a Table,
    shard: &'a mut Shard,
    idx: usize,
    now: Moment,
}

impl Entry<'_> {
    pub fn key(&self) -> &Key {
        &self.shard.nodes[self.idx].key
    }

    /// Counts a request (`http_req_rate`, `http_req_cnt`).
    pub fn add_request(&mut self) {
        let (i, now, t) = (self.idx, self.now, self.table);
        if let Some(c) = &mut self.shard.cols.http_req_rate {
            c[i].add(t.req_period, now, 1);
        }
        if let Some(c) = &mut self.shard.cols.http_req_cnt {
            c[i] = c[i].saturating_add(1);
        }
    }

    /// Counts an error (`http_err_rate`, `http_err_cnt`); see [`Table::record_error`].
    pub fn add_error(&mut self) {
        let (i, now, t) = (self.idx, self.now, self.table);
        if let Some(c) = &mut self.shard.cols.http_err_rate {
            c[i].add(t.err_period, now, 1);
        }
        if let Some(c) = &mut self.shard.cols.http_err_cnt {
            c[i] = c[i].saturating_add(1);
        }
    }

    pub fn add_bytes_in(&mut self, n: u64) {
        let (i, now, t) = (self.idx, self.now, self.table);
        if let Some(c) = &mut self.shard.cols.bytes_in_rate {
            c[i].add(t.in_period, now, n);
        }
    }

    pub fn add_bytes_out(&mut self, n: u64) {
        let (i, now, t) = (self.idx, self.now, self.table);
        if let Some(c) = &mut self.shard.cols.bytes_out_rate {
            c[i].add(t.out_period, now, n);
        }
    }

    pub fn conn_start(&mut self) {
        if let Some(c) = &mut self.shard.cols.conn_cur {
            c[self.idx] = c[self.idx].saturating_add(1);
        }
    }

    pub fn conn_end(&mut self) {
        if let Some(c) = &mut self.shard.cols.conn_cur {
            c[self.idx] = c[self.idx].saturating_sub(1);
        }
    }

    fn gpc0(&mut self) -> Result<&mut u64, Error> {
        self.table.require(Kind::Gpc0)?;
        let c = self.shard.cols.gpc0.as_mut().expect("stored");
        Ok(&mut c[self.idx])
    }

    pub fn set_gpc0(&mut self, value: u64) -> Result<(), Error> {
        *self.gpc0()? = value;
        Ok(())
    }

    /// Adds `n` to `gpc0` (saturating); returns the new value.
    pub fn inc_gpc0(&mut self, n: u64) -> Result<u64, Error> {
        let g = self.gpc0()?;
        *g = g.saturating_add(n);
        Ok(*g)
    }

    fn tags(&mut self) -> Result<&mut Tags, Error> {
        self.table.require(Kind::Tags)?;
        let c = self.shard.cols.tags.as_mut().expect("stored");
        Ok(&mut c[self.idx])
    }

    /// Adds `tag`; returns whether it was new. An entry holds at most [`MAX_TAGS`].
    pub fn set_tag(&mut self, tag: &str) -> Result<bool, Error> {
        check_tag(tag)?;
        let tags = self.tags()?.get_or_insert_with(Default::default);
        if tags.iter().any(|t| &**t == tag) {
            return Ok(false);
        }
        if tags.len() >= MAX_TAGS {
            return Err(Error::BadTag {
                tag: tag.to_string(),
                fix: format!("an entry holds at most {MAX_TAGS} tags; remove one first"),
            });
        }
        tags.push(tag.into());
        Ok(true)
    }

    /// Removes `tag`; returns whether it was there.
    pub fn remove_tag(&mut self, tag: &str) -> Result<bool, Error> {
        let slot = self.tags()?;
        let Some(tags) = slot else {
            return Ok(false);
        };
        let before = tags.len();
        tags.retain(|t| &**t != tag);
        let removed = tags.len() != before;
        if tags.is_empty() {
            *slot = None;
        }
        Ok(removed)
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.shard
            .cols
            .tags
            .as_ref()
            .and_then(|t| t[self.idx].as_deref())
            .is_some_and(|t| t.iter().any(|s| &**s == tag))
    }

    /// The entry's values now.
    pub fn snapshot(&self) -> Snapshot {
        self.table.snapshot(self.shard, self.idx, self.now)
    }

    /// The entry's values of `kinds` now; the others read as not stored (`None`, no tags).
    pub fn read(&self, kinds: Kinds) -> Snapshot {
        self.table.read(self.shard, self.idx, self.now, kinds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at(s: u64) -> Moment {
        Moment::ZERO + secs(s)
    }

    fn table(size: usize, expire: u64, store: &[&str]) -> Table {
        Table::new(TableSpec::parse(size, secs(expire), store.iter().copied()).unwrap())
    }

    fn ip(n: u32) -> Key {
        Key::new(&n.to_be_bytes())
    }

    #[test]
    fn a_table_is_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Table>();
    }

    #[test]
    fn per_ip_request_rate_for_a_deny_rule() {
        // `deny if http_req_rate(10s) > 100` for each client IP.
        let t = table(1_000, 600, &["http_req_rate(10s)", "http_req_cnt"]);
        let (alice, bob) = (Key::from("10.0.0.1"), Key::from("10.0.0.2"));
        let mut denied = 0;
        for ms in 0..1_000u64 {
            let now = Moment::ZERO + Duration::from_millis(ms);
            let seen = t.record_request(&alice, now);
            if seen.http_req_rate.unwrap() > 100 {
                denied += 1;
            }
        }
        assert_eq!(denied, 900);
        let bob_seen = t.record_request(&bob, at(1));
        assert_eq!(bob_seen.http_req_rate, Some(1));
        assert_eq!(t.get(&alice, at(1)).unwrap().http_req_cnt, Some(1_000));
        // Twenty seconds later the rate is back to zero; the count is not.
        let later = t.get(&alice, at(21)).unwrap();
        assert_eq!(
            (later.http_req_rate, later.http_req_cnt),
            (Some(0), Some(1_000))
        );
    }

    #[test]
    fn a_read_computes_only_the_kinds_asked_for() {
        let t = table(10, 60, &["http_req_rate(10s)", "http_err_rate(1m)", "tags"]);
        let k = ip(1);
        t.set_tag(&k, at(0), "vip").unwrap();
        let rate = Kinds::NONE.with(Kind::HttpReqRate);
        let s = t.with_entry(&k, at(1), |e| {
            e.add_request();
            e.add_error();
            e.read(rate)
        });
        assert_eq!((s.http_req_rate, s.http_err_rate), (Some(1), None));
        assert!(s.tags.is_empty());
        let all = t.with_entry(&k, at(1), |e| e.read(Kinds::ALL));
        assert_eq!((all.http_req_rate, all.http_err_rate), (Some(1), Some(1)));
        assert_eq!(all.tags, ["vip"]);
        assert!(Kinds::ALL.has(Kind::Tags) && !Kinds::NONE.has(Kind::HttpReqRate));
    }

    #[test]
    fn errors_are_counted_apart_from_requests() {
        let t = table(
            100,
            600,
            &["http_req_cnt", "http_err_rate(1m)", "http_err_cnt"],
        );
        let k = Key::from("api-key-7");
        for i in 0..10 {
            t.record_request(&k, at(i));
            if i % 2 == 0 {
                // The origin answered 5xx: an error. (A policy denial is not recorded.)
                t.record_error(&k, at(i));
            }
        }
        let s = t.get(&k, at(10)).unwrap();
        assert_eq!(s.http_req_cnt, Some(10));
        assert_eq!(s.http_err_cnt, Some(5));
        assert_eq!(s.http_err_rate, Some(5));
        assert_eq!(s.http_req_rate, None);
    }

    #[test]
    fn concurrent_requests_and_bytes() {
        let t = table(
            100,
            600,
            &["conn_cur", "bytes_in_rate(1s)", "bytes_out_rate(1m)"],
        );
        let k = Key::from("tenant-a");
        assert_eq!(t.conn_start(&k, at(0)).conn_cur, Some(1));
        assert_eq!(t.conn_start(&k, at(0)).conn_cur, Some(2));
        t.record_bytes(&k, at(0), 1_000, 50_000);
        assert_eq!(t.conn_end(&k, at(1)).unwrap().conn_cur, Some(1));
        assert_eq!(t.conn_end(&k, at(1)).unwrap().conn_cur, Some(0));
        assert_eq!(
            t.conn_end(&k, at(1)).unwrap().conn_cur,
            Some(0),
            "never below zero"
        );
        // A minute and a second later, the 1s window has slid out and 59/60 of the bytes
        // still overlap the 1m one.
        let s = t.get(&k, at(61)).unwrap();
        assert_eq!(s.bytes_in_rate, Some(0));
        assert_eq!(s.bytes_out_rate, Some(49_166));
        assert!(
            t.conn_end(&Key::from("unknown"), at(1)).is_none(),
            "does not create"
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used() {
        let t = table(3, 600, &["http_req_cnt"]);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            t.record_request(&Key::from(*name), at(i as u64));
        }
        t.record_request(&Key::from("a"), at(3)); // a is now the most recent; b the least
        t.record_request(&Key::from("d"), at(4));
        assert_eq!(t.len(), 3);
        assert!(t.get(&Key::from("b"), at(4)).is_none(), "b was evicted");
        for k in ["a", "c", "d"] {
            assert!(t.get(&Key::from(k), at(4)).is_some(), "{k} kept");
        }
        // Reading does not count as use: c stays least recent and goes next.
        t.get(&Key::from("c"), at(5));
        t.record_request(&Key::from("e"), at(5));
        assert!(t.get(&Key::from("c"), at(5)).is_none());
    }

    #[test]
    fn idle_entries_expire() {
        let t = table(100, 60, &["http_req_cnt", "conn_cur"]);
        let (idle, busy, open) = (Key::from("idle"), Key::from("busy"), Key::from("open"));
        t.record_request(&idle, at(0));
        t.conn_start(&open, at(0)); // a long-lived connection
        t.record_request(&busy, at(0));
        t.record_request(&busy, at(30));
        assert_eq!(t.get(&idle, at(59)).unwrap().expires_in, secs(1));
        assert!(t.get(&idle, at(60)).is_none(), "expired after 60s idle");
        for s in [60, 90, 120] {
            t.record_request(&busy, at(s));
        }
        assert_eq!(t.get(&busy, at(120)).unwrap().http_req_cnt, Some(5));
        let open_seen = t.get(&open, at(120)).unwrap();
        assert_eq!(open_seen.expires_in, secs(60), "in use: does not expire");

        // An expired entry that is used again starts from zero.
        assert_eq!(t.record_request(&idle, at(121)).http_req_cnt, Some(1));

        // A sweep returns the memory of entries nobody touches again.
        t.conn_end(&open, at(121));
        assert_eq!(t.len(), 3);
        assert_eq!(t.purge_expired(at(1_000)), 3);
        assert!(t.is_empty());
    }

    #[test]
    fn writes_remove_expired_entries_as_they_go() {
        let t = table(10_000, 1, &["http_req_cnt"]);
        for i in 0..1_000 {
            t.record_request(&ip(i), at(0));
        }
        assert_eq!(t.len(), 1_000);
        // Traffic from other keys later drains the expired ones without a sweep task.
        for i in 0..1_000 {
            t.record_request(&ip(1_000_000 + i), at(10));
        }
        assert_eq!(t.len(), 1_000);
    }

    #[test]
    fn eviction_passes_over_entries_in_use() {
        let t = table(2, 600, &["conn_cur"]);
        t.conn_start(&Key::from("ws"), at(0)); // an open websocket: oldest, but in use
        t.conn_start(&Key::from("a"), at(1));
        t.conn_end(&Key::from("a"), at(1));
        t.conn_start(&Key::from("b"), at(2));
        assert!(t.get(&Key::from("ws"), at(2)).is_some());
        assert!(t.get(&Key::from("a"), at(2)).is_none());
        // When everything is in use, the bound still holds.
        t.conn_start(&Key::from("c"), at(3));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn top_lists_the_heaviest_keys() {
        let t = table(1_000, 600, &["http_req_rate(10s)", "http_err_cnt"]);
        for n in 1..=20u32 {
            for _ in 0..n {
                t.record_request(&ip(n), at(1));
            }
        }
        let top = t.top(3, Kind::HttpReqRate, at(1)).unwrap();
        let got: Vec<(Key, u64)> = top
            .iter()
            .map(|(k, s)| (k.clone(), s.http_req_rate.unwrap()))
            .collect();
        assert_eq!(got, vec![(ip(20), 20), (ip(19), 19), (ip(18), 18)]);
        assert_eq!(t.top(100, Kind::HttpReqRate, at(1)).unwrap().len(), 20);
        assert!(t.top(0, Kind::HttpReqRate, at(1)).unwrap().is_empty());

        let err = t.top(3, Kind::ConnCur, at(1)).unwrap_err().to_string();
        assert!(
            err.contains("add `conn_cur` to the table's `store` list"),
            "{err}"
        );
    }

    #[test]
    fn gpc_and_tags_are_set_from_outside() {
        let t = table(100, 600, &["gpc0", "tags"]);
        let k = Key::from("agent-42");
        assert_eq!(t.set_gpc(&k, at(0), 3).unwrap().gpc0, Some(3));
        t.set_tag(&k, at(0), "abuser").unwrap();
        let s = t.set_tag(&k, at(0), "agent:batch").unwrap();
        assert_eq!(s.tags, ["abuser", "agent:batch"]);
        assert!(s.has_tag("abuser"));
        let bumped = t.with_entry(&k, at(1), |e| e.inc_gpc0(2).unwrap());
        assert_eq!(bumped, 5);

        assert!(t.remove_tag(&k, at(2), "abuser").unwrap());
        assert!(!t.remove_tag(&k, at(2), "abuser").unwrap());
        assert_eq!(t.get(&k, at(2)).unwrap().tags, ["agent:batch"]);

        let err = t.set_tag(&k, at(2), "has space").unwrap_err().to_string();
        assert!(err.contains("letters, digits"), "{err}");
        for i in 0..MAX_TAGS - 1 {
            t.set_tag(&k, at(2), &format!("t{i}")).unwrap();
        }
        let err = t
            .set_tag(&k, at(2), "one-too-many")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 16 tags"), "{err}");

        let plain = table(100, 600, &["http_req_cnt"]);
        let err = plain.set_gpc(&k, at(0), 1).unwrap_err().to_string();
        assert!(
            err.contains("add `gpc0` to the table's `store` list"),
            "{err}"
        );
        assert!(plain.is_empty(), "a refused set creates nothing");
    }

    #[test]
    fn clear_one_key_or_everything() {
        let t = table(100, 600, &["http_req_cnt"]);
        for i in 0..50 {
            t.record_request(&ip(i), at(0));
        }
        assert!(t.clear(&ip(7)));
        assert!(!t.clear(&ip(7)));
        assert!(t.get(&ip(7), at(0)).is_none());
        assert_eq!(t.len(), 49);
        // The freed node is reused.
        t.record_request(&ip(1_000), at(0));
        assert_eq!(t.len(), 50);
        t.clear_all();
        assert!(t.is_empty());
        assert!(t.memory().bytes < 4_096, "{:?}", t.memory());
    }

    #[test]
    fn bad_specs_say_how_to_fix_them() {
        let err = |size, store: &[&str]| {
            TableSpec::parse(size, secs(60), store.iter().copied())
                .unwrap_err()
                .to_string()
        };
        assert!(err(0, &[]).contains("`size` must be between 1"));
        assert!(err(10, &["http_req_rate(10s)", "http_req_rate(1m)"])
            .contains("define a second table for the other period"));
        assert!(err(10, &["conn_cur", "conn_cur"]).contains("listed twice"));
        assert!(err(10, &["http_req_rat(10s)"]).contains("did you mean `http_req_rate(10s)`"));
        assert!(TableSpec::parse(10, Duration::ZERO, []).is_err());
        // Same shape, same spec: a reload can keep the table.
        assert_eq!(
            TableSpec::parse(10, secs(60), ["conn_cur"]).unwrap(),
            TableSpec::new(10, secs(60), [Counter::ConnCur]).unwrap()
        );
    }

    #[test]
    fn a_huge_header_key_does_not_grow_memory() {
        let t = table(1_000, 600, &["http_req_cnt"]);
        for i in 0..100u8 {
            let mut value = vec![b'x'; 100_000];
            value[0] = i;
            t.record_request(&Key::new(&value), at(0));
        }
        let m = t.memory();
        assert_eq!(m.entries, 100);
        assert!(m.bytes < 100 * 200, "{m:?}");
    }

    #[test]
    fn many_threads_share_one_table() {
        let t = table(100_000, 600, &["http_req_cnt", "conn_cur"]);
        std::thread::scope(|s| {
            for th in 0..4u32 {
                let t = &t;
                s.spawn(move || {
                    for i in 0..5_000u32 {
                        let k = ip(i % 1_000);
                        t.conn_start(&k, at(0));
                        t.record_request(&k, at(0));
                        t.conn_end(&k, at(0));
                        t.record_request(&ip((th + 1) * 1_000_000 + i), at(0));
                    }
                });
            }
        });
        assert_eq!(t.len(), 1_000 + 4 * 5_000);
        let total: u64 = (0..1_000)
            .map(|i| t.get(&ip(i), at(0)).unwrap().http_req_cnt.unwrap())
            .sum();
        assert_eq!(total, 4 * 5_000);
        assert!((0..1_000).all(|i| t.get(&ip(i), at(0)).unwrap().conn_cur == Some(0)));
    }

    #[test]
    fn a_million_keys_into_a_table_of_100_000_keep_it_at_100_000() {
        let t = table(
            100_000,
            600,
            &["http_req_rate(10s)", "http_err_rate(1m)", "conn_cur"],
        );
        for i in 0..1_000_000u32 {
            t.record_request(&ip(i), at(0));
        }
        assert_eq!(t.len(), 100_000);
        // The most recent keys are the ones kept (each shard evicted its own oldest).
        assert!(t.get(&ip(999_999), at(0)).is_some());
        assert!(t.get(&ip(0), at(0)).is_none());
        let kept = (900_000..1_000_000)
            .filter(|i| t.get(&ip(*i), at(0)).is_some())
            .count();
        assert!(kept > 95_000, "{kept}");
    }

    #[test]
    fn memory_per_entry_is_what_the_docs_say() {
        let spec = TableSpec::parse(
            100_000,
            secs(600),
            ["http_req_rate(10s)", "http_err_rate(1m)", "conn_cur"],
        )
        .unwrap();
        assert_eq!(size_of::<Node>(), 48);
        assert_eq!(size_of::<Slot>(), 8);
        assert_eq!(spec.bytes_per_entry(), 48 + 11 + 12 + 12 + 4);
        let all = TableSpec::parse(
            10,
            secs(1),
            [
                "http_req_rate(1s)",
                "http_req_cnt",
                "http_err_rate(1s)",
                "http_err_cnt",
                "conn_cur",
                "bytes_in_rate(1s)",
                "bytes_out_rate(1s)",
                "gpc0",
                "tags",
            ],
        )
        .unwrap();
        assert_eq!(all.bytes_per_entry(), 167);

        // A full table allocates what the figure says (IPv4 keys, inline).
        let t = Table::new(spec.clone());
        for i in 0..300_000u32 {
            t.record_request(&ip(i), at(0));
        }
        let m = t.memory();
        let per_entry = m.bytes as f64 / m.entries as f64;
        println!("{per_entry:.1} bytes per entry ({m:?})");
        assert!(
            per_entry <= spec.bytes_per_entry() as f64 * 1.02,
            "{per_entry}"
        );
        assert!(
            per_entry >= spec.bytes_per_entry() as f64 * 0.95,
            "{per_entry}"
        );
    }

    /// Resident memory of a table of 1,000,000 IPv4 keys storing the issue's example counters.
    /// Run alone, in release: `cargo test -p portcullis-limits --release -- --ignored rss`.
    #[test]
    #[ignore = "measures the whole process's RSS; run alone"]
    #[cfg(target_os = "linux")]
    fn rss_of_a_million_ip_keys() {
        fn rss() -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        let before = rss();
        let spec = TableSpec::parse(
            1_000_000,
            secs(600),
            ["http_req_rate(10s)", "http_err_rate(1m)", "conn_cur"],
        )
        .unwrap();
        let t = Table::new(spec.clone());
        for i in 0..1_000_000u32 {
            t.record_request(&ip(i), at(0));
        }
        let after = rss();
        let m = t.memory();
        println!(
            "entries {}: RSS grew {:.1} MB ({:.1} B/entry); accounted {:.1} MB; documented {} B/entry",
            m.entries,
            (after - before) as f64 / 1e6,
            (after - before) as f64 / m.entries as f64,
            m.bytes as f64 / 1e6,
            spec.bytes_per_entry()
        );
        assert!(after - before < 150_000_000);
    }
}
