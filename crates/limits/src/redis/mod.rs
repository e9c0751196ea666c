//! A Redis-backed store for the limit counters, so that several portcullis processes enforce
//! one global limit: stick-table counters, usage-plan buckets (GCRA) and quotas, kept in one
//! Redis server and changed by one Lua script. This is the one part of the crate that does
//! I/O and runs background tasks; it needs a Tokio runtime.
//!
//! # API
//!
//! ```text
//! RedisConfig { url, timeout (5ms), prefix ("portcullis"), connections (2),
//!               sync_interval (50ms), max_pending (100_000), batch (None) }
//!                                                                  RedisConfig::new(url)
//! RedisStore::new(cfg) -> Result<RedisStore, StoreError>     no I/O; a bad URL is an error
//! store.check(&Check { tables: &[TableOp], plan: Option<PlanOp>, quota: Option<QuotaOp> })
//!     .await -> Result<Checked { tables: Vec<Snapshot>, plan: Option<Verdict>,
//!                                quota: Option<QuotaVerdict>, redis_time: Option<Duration> },
//!                      StoreError>                    one round trip, at most cfg.timeout
//! store.finish(table, &spec, &key, error, bytes_in, bytes_out)  never blocks; batched
//! store.flush().await -> Result<usize, StoreError>               send what finish batched now
//! store.get(table, &spec, &key).await -> Result<Option<Snapshot>, StoreError>
//! store.set_gpc(table, &spec, &key, value).await -> Result<Snapshot, StoreError>
//! store.clear(table, Option<&Key>).await -> Result<u64, StoreError>   one key or the table
//! store.ping().await -> Result<Duration, StoreError>                  the round-trip time
//! store.forget_refusals()                                 empty this process's deny cache
//! store.add_usage(&UsageBatch).await -> Result<bool, StoreError>     daily usage, once
//! store.usage(plan, key, from_day, to_day).await -> Result<Vec<UsageRecord>, StoreError>
//! store.quota_used(plan, period_start, &[StoredKey]).await -> Result<Vec<u64>, StoreError>
//! store.stats() -> StoreStats
//!
//! TableOp { table: &str, spec: &TableSpec, key: &Key, requests: u64 }   0 requests: read
//! PlanOp  { plan: &str, bucket: &str, rate: Rate, burst: u64, key: &Key, cost: u64 }
//! QuotaOp { plan: &str, key: &Key, period_start: i64, period_end: i64, limit: u64, cost: u64 }
//! QuotaVerdict { allowed, used, remaining, reset_after }
//! StoreError::{Timeout, Unavailable(String), Protocol(String), Config(String), Limits(Error)}
//! ```
//!
//! A plan is given by its [`Rate`] and burst rather than a [`crate::Gcra`], because the Lua
//! script needs the rate and a `Gcra` does not hand it back. [`Checked::allowed`] says
//! whether the request may pass (every plan and quota verdict allows it).
//!
//! # Keys in Redis
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:t:{table}:{key}` | hash | the counters the table's spec stores | the table's `expire` after the last write |
//! | `{prefix}:p:{plan}:{bucket}:{key}` | string `"<µs> <fraction>"` | the GCRA theoretical arrival time | when the bucket is full again (then it is the same as never seen) |
//! | `{prefix}:q:{plan}:{key}:{period_start}` | integer | the quota used in that period | a day after `period_end` |
//! | `{prefix}:u:{plan}:{day}`, `{prefix}:u`, `{prefix}:uf:{batch}` | hash, set, string | the fleet's daily usage per plan (see [`usage`]) | 400 days after the day; never; a day |
//!
//! `{table}`, `{plan}` and `{bucket}` are written with `%` as `%25` and `:` as `%3A`, so a name
//! cannot run into the next part. `{key}` is the key's bytes as they are; a key longer than
//! 256 bytes is already a SHA-256 prefix in [`Key`] and is written as `~` and 44 hex digits,
//! and a literal key that starts with `~` gets a second `~`, so the two never meet. So a
//! 100 KB header value makes a key of about 60 bytes.
//!
//! A table hash has one field per plain counter (`R` http_req_cnt, `E` http_err_cnt, `g`
//! gpc0), `T` for the entry's tags (separated by spaces, set by [`RedisStore::tag`]), and
//! three per rate (`r` http_req_rate, `e` http_err_rate, `i` bytes_in_rate, `o`
//! bytes_out_rate, each with `w` the current window's index, `c` its count, `p` the previous
//! window's count: `rw`, `rc`, `rp`), plus `_` for an entry that stores none of what a
//! request counts.
//!
//! # One round trip
//!
//! [`RedisStore::check`] sends one `EVALSHA` of `limits.lua` (falling back to `SCRIPT LOAD`
//! once after a Redis restart forgot it). The script, atomically:
//!
//! 1. reads the time from Redis (`TIME`), in microseconds: every process uses the same clock,
//!    whatever its own says;
//! 2. for each table entry: counts the requests in `http_req_rate` (the sliding window) and
//!    `http_req_cnt`, refreshes the expiry, and returns every stored counter's raw fields and
//!    the remaining time to live;
//! 3. for the plan: reads the bucket's theoretical arrival time and decides GCRA exactly as
//!    [`crate::gcra`] does;
//! 4. for the quota: reads the period's use and decides whether `used + cost <= limit`;
//! 5. takes the plan's cost and the quota's cost together, only if both admit the request:
//!    a refused request takes nothing from either;
//! 6. returns the time and the raw values. This module computes the rates, the `Verdict`
//!    and the `QuotaVerdict` from them in integer arithmetic, exactly as the local
//!    [`crate::Table`] and [`crate::Gcra`] do for the same moment.
//!
//! [`RedisStore::finish`] (errors and bytes, known when a response ends) does not wait for
//! Redis: it adds to a local map, and a background task sends the whole map every
//! `sync_interval` as one pipeline of `EVALSHA` calls (1,000 entries each).
//!
//! # Semantics, and where they differ from the local store
//!
//! * **Rates** are the estimate of [`crate::window`] with two windows: the current window's
//!   count plus the previous one's weighted by the part of it still inside the last period,
//!   window index `floor(now / period)`, rounded down, with the same handling of a moment up
//!   to two windows late. A period is counted in whole microseconds (periods are whole
//!   milliseconds unless built with [`crate::Period::new`]).
//! * **Time** is Redis's, in microseconds. The local store uses the proxy's monotonic clock
//!   in nanoseconds; for the same moments (Redis time × 1,000 as a [`crate::Moment`]) the
//!   numbers are identical, which the tests check.
//! * **GCRA** keeps the arrival time in units of `1/D` microsecond, where `D` makes the
//!   emission interval exact (`D = 3` for 3 per second), as a pair of Lua integers that stay
//!   below 2^53, so nothing drifts. Rates whose `D` would exceed 2^40 (over a billion per
//!   second with an odd count) are rounded to 2^40 units per microsecond.
//! * **Quotas** compare in Lua doubles: exact below 2^53 requests per period.
//! * **Finished responses** are attributed to the moment they are flushed, up to
//!   `sync_interval` (plus a round trip) after the response ended: a rate read right after a
//!   response may not include it yet, and an event near a window boundary may land in the next
//!   window. The error is bounded by what was finished in the last `sync_interval`.
//! * **`conn_cur` is not kept in Redis.** Concurrency is per process (a connection belongs
//!   to one process, and a crashed process would leave a shared count stuck). Keep a local
//!   [`crate::Table`] for it; snapshots from this store have `conn_cur: None` even when the
//!   spec stores it. Tags are kept in Redis (field `T`).
//! * **Size** is not enforced per table: entries leave by expiry. Set Redis's `maxmemory`
//!   with an LRU policy (`volatile-lru`) as the bound.
//! * **A changed table shape** keeps its plain counts; windows whose period changed start
//!   afresh (their index no longer matches). A changed plan rate keeps the bucket's arrival
//!   time.
//! * **Redis Cluster** is not supported: one script call touches several keys, which would
//!   have to share a slot. Use one server (with replicas and Sentinel or a failover address).
//!
//! # Local batching
//!
//! With `batch: Some(interval)`, `check` answers hot table entries and plans from the
//! process's ledger (views of entries, leases of tokens) and syncs them every interval in
//! the background: the error bounds are in the [`batch`] module's docs. Without it (the
//! default), every check is exactly one round trip as described above.
//!
//! # The deny cache
//!
//! A refusal is remembered locally, like Envoy's near-limit cache: while a plan bucket is
//! known to refuse a cost (until `retry_after` measured from when the request was *sent*) or
//! a quota is known to be exhausted for a cost (until the period ends), `check` answers it
//! without a round trip, for that cost or a larger one, with the same parameters.
//!
//! This adds no error. Between a refusal and its `retry_after` the bucket can only get fuller
//! (other processes take tokens; time alone only brings it to the moment of `retry_after`),
//! so a refused caller stays refused until `retry_after` passes; and a quota's use only grows
//! within its period. The reported `retry_after` and `reset_after` are measured from when the
//! refusal *arrived*, so a client that waits them is admitted. The one exception is a hand
//! edit: a bucket or quota deleted in Redis by an operator stays refused in each process
//! until its cached refusal ends, unless the admin path calls
//! [`RedisStore::forget_refusals`].
//!
//! The cache holds at most 10,000 refusals. When a request is refused from the cache, its
//! other limit (plan or quota) is not evaluated and is `None` in [`Checked`], and only the
//! tables go to Redis (no round trip when there are none). [`StoreStats::deny_cache_hits`]
//! counts these answers.
//!
//! # Failure
//!
//! Every call that waits for Redis is bounded: `check` and `ping` by `cfg.timeout` (including
//! the wait for a connection), and `get`, `set_gpc`, `clear` and flushes by the longer of
//! `cfg.timeout` and 1s (they are for the admin API and the background task). A call that runs
//! out of time returns [`StoreError::Timeout`]; one that finds Redis unreachable returns
//! [`StoreError::Unavailable`] at once. Nothing panics and nothing waits longer. The store
//! connects in the background (`new` needs no Redis), [`ConnectionManager`] reconnects by
//! itself, and after a connection failure the store answers `Unavailable` without trying for
//! 100ms, so a dead Redis costs nothing per request; when Redis comes back the next call after
//! that reconnects. Whether a request passes when Redis is unavailable (fail open or closed)
//! is the caller's choice. A check that timed out was usually sent, and Redis runs it when it
//! gets to it: its requests are counted and its tokens taken even though the caller saw
//! `Timeout` (the tests check this with a stopped and resumed server).
//!
//! A flush that could not reach Redis keeps its entries for the next one; a flush that failed
//! after sending drops them (it may have been applied) and counts them in
//! [`StoreStats::finish_dropped`], as does `finish` when `max_pending` entries are already
//! waiting. Call [`RedisStore::flush`] before shutting down.

mod batch;
pub mod usage;

use self::batch::{Ledger, QuotaAsk};
use crate::counter::Counter;
use crate::gcra::Verdict;
use crate::key::Key;
use crate::table::{Snapshot, TableSpec};
use crate::units::Rate;
use crate::Error;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, ErrorKind, Pipeline, RedisError, Script, Value};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The Lua script every call runs (see the module docs).
const SCRIPT: &str = include_str!("limits.lua");
/// Refusals the deny cache remembers at most.
const DENY_CACHE_SIZE: usize = 10_000;
/// How long a cost larger than the burst (refused forever) stays cached.
const NEVER_CACHED: Duration = Duration::from_secs(3_600);
/// After a connection failure, calls answer `Unavailable` without trying for this long.
const RETRY_DOWN: Duration = Duration::from_millis(100);
/// The shortest timeout of calls off the request path (admin calls, flushes, connecting).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Entries per `EVALSHA` in a flush.
const FLUSH_CHUNK: usize = 1_000;
/// Whole microseconds sent to Lua stay below this, so sums with the time stay exact.
const LUA_MAX: u64 = 1 << 51;
/// GCRA units per microsecond at most (see [`PlanMath`]).
const MAX_UNITS_PER_US: u128 = 1 << 40;

/// How to reach Redis and how patient to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `redis+unix://`).
    pub url: String,
    /// The longest a `check` waits, connection included. Default 5ms.
    pub timeout: Duration,
    /// The first part of every key. Default `portcullis`.
    pub prefix: String,
    /// Multiplexed connections, used in turn. Default 2.
    pub connections: usize,
    /// How often finished responses are sent. Default 50ms.
    pub sync_interval: Duration,
    /// Finished-response entries (table and key) waiting to be sent, at most. Default 100,000.
    pub max_pending: usize,
    /// Local batching (see [`batch`]): `None` (the default) sends every check; `Some(i)`
    /// answers hot keys locally and syncs them every `i`.
    pub batch: Option<Duration>,
}

impl RedisConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            timeout: Duration::from_millis(5),
            prefix: "portcullis".into(),
            connections: 2,
            sync_interval: Duration::from_millis(50),
            max_pending: 100_000,
            batch: None,
        }
    }
}

/// What can go wrong talking to Redis.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("redis did not answer in time")]
    Timeout,
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected answer from redis: {0}")]
    Protocol(String),
    #[error("bad redis store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Limits(#[from] Error),
}

/// One stick-table entry to count in (or read, with `requests: 0`).
#[derive(Clone, Copy, Debug)]
pub struct TableOp<'a> {
    pub table: &'a str,
    pub spec: &'a TableSpec,
    pub key: &'a Key,
    /// Requests to count: usually 1; 0 only reads (and does not create or refresh the entry).
    pub requests: u64,
}

/// One usage-plan bucket to take from.
#[derive(Clone, Copy, Debug)]
pub struct PlanOp<'a> {
    pub plan: &'a str,
    /// A sub-bucket of the plan: `""`, or an override's id.
    pub bucket: &'a str,
    pub rate: Rate,
    /// At least 1.
    pub burst: u64,
    pub key: &'a Key,
    /// Tokens to take; 0 only reads.
    pub cost: u64,
}

/// One quota period to take from.
#[derive(Clone, Copy, Debug)]
pub struct QuotaOp<'a> {
    pub plan: &'a str,
    pub key: &'a Key,
    /// Unix seconds; part of the Redis key, so each period counts apart.
    pub period_start: i64,
    /// Unix seconds.
    pub period_end: i64,
    pub limit: u64,
    pub cost: u64,
}

/// Everything one request checks, in one round trip.
#[derive(Clone, Copy, Debug, Default)]
pub struct Check<'a> {
    pub tables: &'a [TableOp<'a>],
    pub plan: Option<PlanOp<'a>>,
    pub quota: Option<QuotaOp<'a>>,
}

/// The answers to a [`Check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// One per [`TableOp`], in order. `conn_cur` is `None` (it is not kept in Redis).
    /// A read of an absent entry gives zeros and `expires_in` zero.
    pub tables: Vec<Snapshot>,
    /// `None` without a plan, or when the deny cache refused the quota.
    pub plan: Option<Verdict>,
    /// `None` without a quota, or when the deny cache refused the plan.
    pub quota: Option<QuotaVerdict>,
    /// Redis's clock (since the Unix epoch) when it ran the check; `None` when no round trip
    /// was needed.
    pub redis_time: Option<Duration>,
}

impl Checked {
    /// Whether the plan and the quota (those checked) admit the request.
    pub fn allowed(&self) -> bool {
        self.plan.map_or(true, |v| v.allowed) && self.quota.map_or(true, |q| q.allowed)
    }
}

/// A table's entries with the most of one counter, across the fleet: see [`RedisStore::top`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Top {
    /// At most `n`, the largest first.
    pub entries: Vec<(Key, Snapshot)>,
    /// Entries read.
    pub scanned: usize,
    /// The table had more entries than `max_keys`: only the first `max_keys` found were read.
    pub truncated: bool,
}

/// A quota's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaVerdict {
    /// Whether `used + cost <= limit`. When the plan refused, the cost was not taken even so.
    pub allowed: bool,
    /// Used in this period, after this check.
    pub used: u64,
    pub remaining: u64,
    /// Until the period ends.
    pub reset_after: Duration,
}

/// Counters of what the store did, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Successful round trips to Redis.
    pub round_trips: u64,
    /// Calls that failed other than by timing out.
    pub errors: u64,
    pub timeouts: u64,
    /// The sum of the successful round trips' times, in nanoseconds.
    pub rtt_nanos: u64,
    /// Plan or quota refusals answered from the deny cache.
    pub deny_cache_hits: u64,
    /// Finished-response entries waiting to be sent.
    pub finish_pending: u64,
    /// Entries sent.
    pub finish_flushed: u64,
    /// Entries lost: over `max_pending`, or in a flush that failed after sending.
    pub finish_dropped: u64,
    /// With batching: checks answered without a round trip.
    pub batch_local: u64,
    /// With batching: leases taken.
    pub leases_taken: u64,
    /// With batching: table entries whose local counts were sent, and those lost in a sync
    /// that failed after sending.
    pub batch_synced: u64,
    pub batch_dropped: u64,
}

impl StoreStats {
    /// The mean successful round-trip time.
    pub fn mean_rtt(&self) -> Option<Duration> {
        (self.round_trips > 0).then(|| Duration::from_nanos(self.rtt_nanos / self.round_trips))
    }
}

/// The Redis-backed store. Cloning is cheap and shares everything. See the
/// [module docs](self).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.cfg.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner {
    cfg: RedisConfig,
    client: Client,
    script: Script,
    slots: Box<[Slot]>,
    next: AtomicUsize,
    /// Calls fail fast until then, after a connection failure.
    down_until: Mutex<Option<Instant>>,
    deny: Mutex<HashMap<Vec<u8>, Denied>>,
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    flusher: AtomicBool,
    stats: Stats,
    /// With `cfg.batch`: what this process knows of the shared counters and owes them.
    ledger: Option<Ledger>,
}

/// One multiplexed connection, made in the background on first need.
#[derive(Default)]
struct Slot {
    conn: Mutex<Option<ConnectionManager>>,
    connecting: AtomicBool,
    ready: Notify,
    failed: Mutex<Option<(Instant, String)>>,
}

#[derive(Default)]
struct Stats {
    round_trips: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    rtt_nanos: AtomicU64,
    deny_cache_hits: AtomicU64,
    finish_flushed: AtomicU64,
    finish_dropped: AtomicU64,
    batch_local: AtomicU64,
    leases_taken: AtomicU64,
    batch_synced: AtomicU64,
    batch_dropped: AtomicU64,
}

impl RedisStore {
    /// A store for `cfg`. Does no I/O: connections are made in the background (at once when
    /// called inside a Tokio runtime, else on first use). Fails only on a bad configuration.
    pub fn new(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let client = Client::open(cfg.url.as_str())
            .map_err(|e| StoreError::Config(format!("redis url `{}`: {e}", cfg.url)))?;
        if cfg.timeout.is_zero() {
            return Err(StoreError::Config(
                "`timeout` must be more than zero, e.g. 5ms".into(),
            ));
        }
        if cfg.sync_interval.is_zero() {
            return Err(StoreError::Config(
                "`sync_interval` must be more than zero, e.g. 50ms".into(),
            ));
        }
        if cfg.connections == 0 || cfg.connections > 64 {
            return Err(StoreError::Config(format!(
                "`connections` must be between 1 and 64; it was {}",
                cfg.connections
            )));
        }
        if cfg
            .batch
            .is_some_and(|b| b.is_zero() || b > Duration::from_secs(10))
        {
            return Err(StoreError::Config(
                "`batch` must be more than zero and at most 10s, e.g. 100ms".into(),
            ));
        }
        let slots = (0..cfg.connections).map(|_| Slot::default()).collect();
        let inner = Arc::new(Inner {
            client,
            script: Script::new(SCRIPT),
            slots,
            next: AtomicUsize::new(0),
            down_until: Mutex::new(None),
            deny: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            flusher: AtomicBool::new(false),
            stats: Stats::default(),
            ledger: cfg.batch.map(Ledger::new),
            cfg,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            for i in 0..inner.slots.len() {
                inner.spawn_connect(i);
            }
            inner.start_flusher();
        }
        Ok(RedisStore { inner })
    }

    /// Counts and checks one request: its tables, plan and quota, in one round trip (or
    /// none, when the deny cache answers and there are no tables, or when batching answers
    /// from the ledger). See the module docs.
    pub async fn check(&self, c: &Check<'_>) -> Result<Checked, StoreError> {
        self.inner.start_flusher();
        match &self.inner.ledger {
            Some(ledger) => self.check_batched(c, ledger).await,
            // Boxed: a round trip's state would size every caller's future.
            None => Ok(Box::pin(self.check_exact(c, 0)).await?.0),
        }
    }

    /// One round trip for `c`, asking for a lease of `lease` tokens (0: none) for its plan.
    async fn check_exact(
        &self,
        c: &Check<'_>,
        lease: u64,
    ) -> Result<(Checked, Option<Granted>), StoreError> {
        let inner = &self.inner;
        let prefix = inner.cfg.prefix.as_bytes();
        let plan = c.plan.as_ref().map(|p| {
            let math = PlanMath::new(p.rate, p.burst, p.cost);
            (plan_key(prefix, p.plan, p.bucket, p.key), math)
        });
        let quota = c
            .quota
            .as_ref()
            .map(|q| (quota_key(prefix, q.plan, q.key, q.period_start), q));

        // The deny cache.
        let now = Instant::now();
        let (mut plan_verdict, mut quota_verdict) = (None, None);
        {
            let deny = inner.deny.lock();
            if let Some((key, math)) = &plan {
                plan_verdict = deny.get(key).and_then(|d| d.plan(math, now));
            }
            if let Some((key, q)) = &quota {
                quota_verdict = deny.get(key).and_then(|d| d.quota(q, now));
            }
        }
        let denied = plan_verdict.is_some() || quota_verdict.is_some();
        if denied {
            inner.stats.deny_cache_hits.fetch_add(1, Relaxed);
        }
        let (plan, quota) = if denied { (None, None) } else { (plan, quota) };
        if c.tables.is_empty() && plan.is_none() && quota.is_none() {
            let checked = Checked {
                tables: Vec::new(),
                plan: plan_verdict,
                quota: quota_verdict,
                redis_time: None,
            };
            return Ok((checked, None));
        }
        let lease = match (&plan, c.plan) {
            (Some(_), Some(p)) if lease > p.cost => Some(PlanMath::new(p.rate, p.burst, lease)),
            _ => None,
        };
        let cmd = check_cmd(inner, c, plan.as_ref(), quota.as_ref(), lease.as_ref());

        let sent = Instant::now();
        let reply = inner
            .round_trip(Req::Script(&cmd), inner.cfg.timeout)
            .await?;
        let arrived = Instant::now();
        let mut r = Reader::new(reply)?;
        let now_us = r.time()?;
        let mut tables = Vec::with_capacity(c.tables.len());
        for t in c.tables {
            tables.push(r.snapshot(t.spec, now_us)?.0);
        }
        let plan_raw = match plan {
            Some(p) => Some((p, r.flag()?, r.flag()?, r.int()?, r.int()?)),
            None => None,
        };
        let quota_raw = match quota {
            Some(q) => Some((q, r.flag()?, r.flag()?, r.int()?)),
            None => None,
        };
        let leased = match &lease {
            Some(l) => r.flag()?.then_some(*l),
            None => None,
        };
        let mut granted = None;
        if let Some(((key, math), allowed, taken, whole, fraction)) = plan_raw {
            let bucket = c.plan.as_ref().map(|p| (p.rate, p.burst));
            let raw = (allowed, taken, math.used(whole, fraction));
            let at = (sent, arrived);
            let (v, g) = inner.plan_answer(key, &math, bucket, raw, leased.as_ref(), at);
            (plan_verdict, granted) = (Some(v), g);
        }
        if let Some(((key, q), allowed, _taken, used)) = quota_raw {
            let raw = (allowed, u64::try_from(used).unwrap_or(0), now_us);
            let lease = leased.as_ref().zip(granted.as_mut());
            let v = inner.quota_answer(key, q, raw, lease, (sent, arrived));
            quota_verdict = Some(v);
        }
        let checked = Checked {
            tables,
            plan: plan_verdict,
            quota: quota_verdict,
            redis_time: Some(Duration::from_micros(now_us)),
        };
        Ok((checked, granted))
    }

    /// [`RedisStore::check`] with batching: what the ledger can answer, it does; the rest
    /// goes in one round trip, which also sends the requests counted here for those tables
    /// and asks for a lease. See [`batch`].
    async fn check_batched(&self, c: &Check<'_>, ledger: &Ledger) -> Result<Checked, StoreError> {
        let inner = &self.inner;
        let now = Instant::now();
        let split = self.split_tables(ledger, c, now);
        let (mut plan, mut quota, mut lease) = (c.plan, c.quota, 0);
        let (mut spent, mut fetch) = (None, None);
        if let Some(p) = &c.plan {
            (spent, fetch) = self.spend_or_fetch(ledger, p, c.quota.as_ref(), now).await;
            if spent.is_some() {
                (plan, quota) = (None, None);
            } else if fetch.is_some() {
                let limit = c.quota.as_ref().map(|q| q.limit);
                lease = batch::lease_size(p.rate, p.burst, limit, p.cost, ledger.interval);
            }
        }
        let (plan_v, quota_v) = match &spent {
            Some(s) => spent_verdicts(s),
            None => (None, None),
        };
        let Split {
            local,
            keys,
            remote,
            sent_here,
        } = split;
        if remote.is_empty() && plan.is_none() && quota.is_none() {
            inner.stats.batch_local.fetch_add(1, Relaxed);
            return Ok(Checked {
                tables: local.into_iter().map(Option::unwrap_or_default).collect(),
                plan: plan_v,
                quota: quota_v,
                redis_time: None,
            });
        }
        let sub = Check {
            tables: &remote,
            plan,
            quota,
        };
        let (mut checked, granted) = match Box::pin(self.check_exact(&sub, lease)).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    // Never sent: the requests counted here wait for the next call.
                    for &(i, pending) in &sent_here {
                        ledger.unsend(&keys[i], pending);
                    }
                }
                return Err(e);
            }
        };
        if let Some(g) = granted {
            inner.stats.leases_taken.fetch_add(1, Relaxed);
            ledger.grant(g.key, g.lease);
        }
        // The waiters may spend from it now.
        drop(fetch);
        let mut answered = checked.tables.drain(..);
        let mut tables = Vec::with_capacity(c.tables.len());
        for ((t, here), key) in c.tables.iter().zip(local).zip(keys) {
            let s = match here {
                Some(s) => s,
                None => {
                    let s = answered.next().unwrap_or_default();
                    if t.requests > 0 {
                        ledger.refresh(key, t.table, t.spec, s.clone());
                    }
                    s
                }
            };
            tables.push(s);
        }
        drop(answered);
        checked.tables = tables;
        if spent.is_some() {
            (checked.plan, checked.quota) = (plan_v, quota_v);
        }
        Ok(checked)
    }

    /// The tables whose fresh views the ledger counts in (their answers in `local`), and the
    /// rest, to send with the requests counted here and not sent yet.
    fn split_tables<'a>(&self, ledger: &Ledger, c: &Check<'a>, now: Instant) -> Split<'a> {
        let prefix = self.inner.cfg.prefix.as_bytes();
        let mut split = Split {
            local: Vec::with_capacity(c.tables.len()),
            keys: Vec::with_capacity(c.tables.len()),
            remote: Vec::new(),
            sent_here: Vec::new(),
        };
        for t in c.tables {
            let key = table_key(prefix, t.table, t.key);
            let here = (t.requests > 0)
                .then(|| ledger.count(&key, t.requests, now))
                .flatten();
            if here.is_none() {
                let pending = if t.requests > 0 {
                    ledger.take_pending(&key)
                } else {
                    0
                };
                split.remote.push(TableOp {
                    requests: t.requests + pending,
                    ..*t
                });
                if pending > 0 {
                    split.sent_here.push((split.keys.len(), pending));
                }
            }
            split.local.push(here);
            split.keys.push(key);
        }
        split
    }

    /// Spends the request's cost from its bucket's lease; or becomes the request that fetches
    /// the next lease; or, while another request fetches it, waits (at most the store's
    /// timeout in all) and tries again. Neither: the request is checked exactly.
    async fn spend_or_fetch<'l>(
        &self,
        ledger: &'l Ledger,
        p: &PlanOp<'_>,
        quota: Option<&QuotaOp<'_>>,
        now: Instant,
    ) -> (Option<batch::Spent>, Option<batch::Fetch<'l>>) {
        let prefix = self.inner.cfg.prefix.as_bytes();
        let key = plan_key(prefix, p.plan, p.bucket, p.key);
        let qkey = quota.map(|q| quota_key(prefix, q.plan, q.key, q.period_start));
        let ask = qkey.as_ref().zip(quota).map(|(key, q)| QuotaAsk {
            key,
            limit: q.limit,
            cost: q.cost,
        });
        let bucket = (p.rate, p.burst);
        let deadline = tokio::time::Instant::from_std(now + self.inner.cfg.timeout);
        loop {
            let spent = ledger.spend(&key, bucket, p.cost, ask.as_ref(), Instant::now());
            if spent.is_some() {
                return (spent, None);
            }
            if let Some(fetch) = ledger.begin_fetch(&key) {
                return (None, Some(fetch));
            }
            let fetched = ledger.fetched.notified();
            tokio::pin!(fetched);
            fetched.as_mut().enable();
            let spent = ledger.spend(&key, bucket, p.cost, ask.as_ref(), Instant::now());
            if spent.is_some() || tokio::time::timeout_at(deadline, fetched).await.is_err() {
                return (spent, None);
            }
        }
    }

    /// Records the end of a response: an error (when `error` and the table stores
    /// `http_err_rate` or `http_err_cnt`) and its bytes (when it stores `bytes_in_rate` or
    /// `bytes_out_rate`). Never blocks on Redis: the counts are added up locally and sent every
    /// `sync_interval` by a background task. See the module docs for what this costs in
    /// accuracy and what happens when `max_pending` entries are already waiting.
    pub fn finish(
        &self,
        table: &str,
        spec: &TableSpec,
        key: &Key,
        error: bool,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let layout = FinishLayout::of(spec);
        let errors = u64::from(error && (layout.err_period != 0 || layout.err_cnt));
        let bytes_in = if layout.in_period != 0 { bytes_in } else { 0 };
        let bytes_out = if layout.out_period != 0 { bytes_out } else { 0 };
        if errors == 0 && bytes_in == 0 && bytes_out == 0 {
            return;
        }
        let inner = &self.inner;
        inner.start_flusher();
        let redis_key = table_key(inner.cfg.prefix.as_bytes(), table, key);
        let mut pending = inner.pending.lock();
        let len = pending.len();
        match pending.get_mut(&redis_key) {
            Some(p) => p.add(layout, errors, bytes_in, bytes_out),
            None if len >= inner.cfg.max_pending => {
                inner.stats.finish_dropped.fetch_add(1, Relaxed);
            }
            None => {
                let mut p = Pending {
                    layout,
                    errors: 0,
                    bytes_in: 0,
                    bytes_out: 0,
                };
                p.add(layout, errors, bytes_in, bytes_out);
                pending.insert(redis_key, p);
            }
        }
    }

    /// Sends what [`RedisStore::finish`] has batched now, in one pipelined round trip, and
    /// with batching the requests counted here, and gives back every lease; returns the
    /// number of entries sent. The background tasks do this every `sync_interval` (and
    /// `batch`); call it before shutting down.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let synced = self.inner.sync_batch(true).await;
        let flushed = self.inner.flush().await?;
        Ok(flushed + synced?)
    }

    /// The entry's counters, if it exists. Reading does not count as use.
    pub async fn get(
        &self,
        table: &str,
        spec: &TableSpec,
        key: &Key,
    ) -> Result<Option<Snapshot>, StoreError> {
        let (snapshot, exists) = self.table_call(table, spec, key, None).await?;
        Ok(exists.then_some(snapshot))
    }

    /// Sets the entry's `gpc0` (creating the entry, and refreshing its expiry); returns its
    /// counters after.
    pub async fn set_gpc(
        &self,
        table: &str,
        spec: &TableSpec,
        key: &Key,
        value: u64,
    ) -> Result<Snapshot, StoreError> {
        stores(spec, crate::Kind::Gpc0)?;
        let set = self.table_call(table, spec, key, Some(value)).await?.0;
        if let Some(ledger) = &self.inner.ledger {
            ledger.forget_views();
        }
        Ok(set)
    }

    /// Adds `tag` to the entry's tags (`add`), or removes it; returns whether that changed
    /// them. Tags are kept in Redis like the counters, so every replica's rules and policies
    /// read them; an entry holds at most [`crate::table::MAX_TAGS`].
    pub async fn tag(
        &self,
        table: &str,
        spec: &TableSpec,
        key: &Key,
        tag: &str,
        add: bool,
    ) -> Result<bool, StoreError> {
        stores(spec, crate::Kind::Tags)?;
        let inner = &self.inner;
        let mut cmd = inner.evalsha();
        cmd.arg(1)
            .arg(table_key(inner.cfg.prefix.as_bytes(), table, key))
            .arg("T")
            .arg(expire_ms(spec))
            .arg(if add { "+" } else { "-" })
            .arg(tag)
            .arg(crate::table::MAX_TAGS);
        let reply = inner
            .round_trip(Req::Script(&cmd), inner.admin_timeout())
            .await?;
        if let Some(ledger) = &inner.ledger {
            ledger.forget_views();
        }
        let mut r = Reader::new(reply)?;
        r.time()?;
        match r.int()? {
            -1 => Err(Error::BadTag {
                tag: tag.to_string(),
                fix: format!(
                    "an entry holds at most {} tags; remove one first",
                    crate::table::MAX_TAGS
                ),
            }
            .into()),
            changed => Ok(changed == 1),
        }
    }

    async fn table_call(
        &self,
        table: &str,
        spec: &TableSpec,
        key: &Key,
        gpc: Option<u64>,
    ) -> Result<(Snapshot, bool), StoreError> {
        let inner = &self.inner;
        let mut cmd = inner.evalsha();
        cmd.arg(1)
            .arg(table_key(inner.cfg.prefix.as_bytes(), table, key))
            .arg("c")
            .arg(1)
            .arg(expire_ms(spec))
            .arg(0);
        match gpc {
            Some(v) => cmd.arg(v),
            None => cmd.arg(""),
        };
        cmd.arg(spec_arg(spec)).arg("0").arg("0");
        let reply = inner
            .round_trip(Req::Script(&cmd), inner.admin_timeout())
            .await?;
        let mut r = Reader::new(reply)?;
        let now_us = r.time()?;
        r.snapshot(spec, now_us)
    }

    /// Removes one entry (`Some(key)`), or every entry of the table (`None`, by `SCAN` and
    /// `UNLINK`: meant for the admin API). Returns how many were removed.
    pub async fn clear(&self, table: &str, key: Option<&Key>) -> Result<u64, StoreError> {
        let inner = &self.inner;
        if let Some(ledger) = &inner.ledger {
            ledger.forget_views();
        }
        let prefix = inner.cfg.prefix.as_bytes();
        let timeout = inner.admin_timeout();
        if let Some(key) = key {
            let mut cmd = ::redis::cmd("UNLINK");
            cmd.arg(table_key(prefix, table, key));
            let v = inner.round_trip(Req::Cmd(&cmd), timeout).await?;
            return Reader::unlinked(&v);
        }
        let mut pattern = glob_escape(&table_key_prefix(prefix, table));
        pattern.push(b'*');
        let mut cursor = 0u64;
        let mut removed = 0;
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern.as_slice())
                .arg("COUNT")
                .arg(1_000);
            let v = inner.round_trip(Req::Cmd(&scan), timeout).await?;
            let (next, keys) = Reader::scan(v)?;
            if !keys.is_empty() {
                let mut unlink = ::redis::cmd("UNLINK");
                for k in &keys {
                    unlink.arg(k.as_slice());
                }
                let v = inner.round_trip(Req::Cmd(&unlink), timeout).await?;
                removed += Reader::unlinked(&v)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// The table's `n` entries with the most of `by`, across every replica: the table's keys
    /// in Redis (by `SCAN`, at most `max_keys` of them), their counters read 1,000 at a time,
    /// as [`RedisStore::get`] reads one. For the admin API, like HAProxy's `show table`:
    /// each call is bounded by the admin timeout, and a table of a million keys costs a
    /// thousand calls. `conn_cur` is not in Redis (`None` here).
    pub async fn top(
        &self,
        table: &str,
        spec: &TableSpec,
        by: crate::Kind,
        n: usize,
        max_keys: usize,
    ) -> Result<Top, StoreError> {
        let inner = &self.inner;
        let timeout = inner.admin_timeout();
        let start = table_key_prefix(inner.cfg.prefix.as_bytes(), table);
        let mut pattern = glob_escape(&start);
        pattern.push(b'*');
        let mut found: Vec<(Key, Snapshot)> = Vec::new();
        let (mut cursor, mut scanned, mut truncated) = (0u64, 0usize, false);
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern.as_slice())
                .arg("COUNT")
                .arg(FLUSH_CHUNK);
            let (next, mut keys) = Reader::scan(inner.round_trip(Req::Cmd(&scan), timeout).await?)?;
            if scanned + keys.len() > max_keys {
                keys.truncate(max_keys - scanned);
                truncated = true;
            }
            scanned += keys.len();
            if !keys.is_empty() {
                let mut cmd = self.inner.evalsha();
                cmd.arg(keys.len());
                for k in &keys {
                    cmd.arg(k.as_slice());
                }
                push_table_args(&mut cmd, keys.iter().map(|_| (spec, 0)));
                cmd.arg("0").arg("0");
                let mut r = Reader::new(inner.round_trip(Req::Script(&cmd), timeout).await?)?;
                let now_us = r.time()?;
                for k in &keys {
                    let (snap, exists) = r.snapshot(spec, now_us)?;
                    let key = k.strip_prefix(start.as_slice()).and_then(key_from_redis);
                    if let (true, Some(key)) = (exists, key) {
                        found.push((key, snap));
                    }
                }
            }
            if next == 0 || truncated {
                break;
            }
            cursor = next;
        }
        let count = |s: &Snapshot| s.get(by).unwrap_or(0);
        found.sort_by(|a, b| count(&b.1).cmp(&count(&a.1)).then_with(|| a.0.cmp(&b.0)));
        found.truncate(n);
        Ok(Top {
            entries: found,
            scanned,
            truncated,
        })
    }

    /// One `PING`; returns its round-trip time.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        let cmd = ::redis::cmd("PING");
        self.inner
            .round_trip(Req::Cmd(&cmd), self.inner.cfg.timeout)
            .await?;
        Ok(start.elapsed())
    }

    /// Empties the deny cache: the next check of every plan and quota goes to Redis. For an
    /// admin reset of a bucket or quota.
    pub fn forget_refusals(&self) {
        self.inner.deny.lock().clear();
    }

    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.stats;
        StoreStats {
            round_trips: s.round_trips.load(Relaxed),
            errors: s.errors.load(Relaxed),
            timeouts: s.timeouts.load(Relaxed),
            rtt_nanos: s.rtt_nanos.load(Relaxed),
            deny_cache_hits: s.deny_cache_hits.load(Relaxed),
            finish_pending: self.inner.pending.lock().len() as u64,
            finish_flushed: s.finish_flushed.load(Relaxed),
            finish_dropped: s.finish_dropped.load(Relaxed),
            batch_local: s.batch_local.load(Relaxed),
            leases_taken: s.leases_taken.load(Relaxed),
            batch_synced: s.batch_synced.load(Relaxed),
            batch_dropped: s.batch_dropped.load(Relaxed),
        }
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.cfg
    }
}

/// A check's tables, split by [`RedisStore::split_tables`]: one answer or `None` (to ask
/// Redis) and the Redis key per table; the tables to send; and, by index into `keys`, the
/// requests counted here that go with them.
struct Split<'a> {
    local: Vec<Option<Snapshot>>,
    keys: Vec<Vec<u8>>,
    remote: Vec<TableOp<'a>>,
    sent_here: Vec<(usize, u64)>,
}

/// The verdicts of a request answered from a lease.
fn spent_verdicts(s: &batch::Spent) -> (Option<Verdict>, Option<QuotaVerdict>) {
    let plan = Verdict {
        allowed: true,
        retry_after: Duration::ZERO,
        remaining: s.remaining,
        reset_after: s.reset_after,
    };
    let quota = s.quota.map(|(used, remaining, reset_after)| QuotaVerdict {
        allowed: true,
        used,
        remaining,
        reset_after,
    });
    (Some(plan), quota)
}

/// Refuses a change to a counter the table does not store, saying what to add.
fn stores(spec: &TableSpec, kind: crate::Kind) -> Result<(), StoreError> {
    if spec.stores(kind) {
        return Ok(());
    }
    Err(Error::NotStored {
        kind,
        fix: format!("add `{}` to the table's `store` list", kind.name()),
    }
    .into())
}

/// A lease a round trip took, for the ledger.
struct Granted {
    key: Vec<u8>,
    lease: batch::Lease,
}

/// The `EVALSHA` of one check (mode `c` of the script): its tables, then the plan (with a
/// lease when `lease` is given), then the quota.
fn check_cmd(
    inner: &Inner,
    c: &Check<'_>,
    plan: Option<&(Vec<u8>, PlanMath)>,
    quota: Option<&(Vec<u8>, &QuotaOp<'_>)>,
    lease: Option<&PlanMath>,
) -> Cmd {
    let prefix = inner.cfg.prefix.as_bytes();
    let mut cmd = inner.evalsha();
    let keys = c.tables.len() + usize::from(plan.is_some()) + usize::from(quota.is_some());
    cmd.arg(keys);
    for t in c.tables {
        cmd.arg(table_key(prefix, t.table, t.key));
    }
    if let Some((key, _)) = plan {
        cmd.arg(key.as_slice());
    }
    if let Some((key, _)) = quota {
        cmd.arg(key.as_slice());
    }
    push_table_args(&mut cmd, c.tables.iter().map(|t| (t.spec, t.requests)));
    match (plan, lease) {
        (Some((_, m)), Some(l)) => {
            let [q, r, ..] = l.args();
            cmd.arg("L")
                .arg(&m.args()[..])
                .arg(q)
                .arg(r)
                .arg(l.cost_tokens);
        }
        (Some((_, m)), None) => {
            cmd.arg("1").arg(&m.args()[..]);
        }
        (None, _) => {
            cmd.arg("0");
        }
    }
    match quota {
        Some((_, q)) => {
            let expire_at = q.period_end.saturating_add(86_400).saturating_mul(1_000);
            cmd.arg("1").arg(q.cost).arg(q.limit).arg(expire_at.max(1));
        }
        None => {
            cmd.arg("0");
        }
    }
    cmd
}

/// Mode `c`'s table part: the count, then per table its expiry, requests, no gpc0 and spec.
fn push_table_args<'a>(cmd: &mut Cmd, tables: impl ExactSizeIterator<Item = (&'a TableSpec, u64)>) {
    cmd.arg("c").arg(tables.len());
    for (spec, requests) in tables {
        cmd.arg(expire_ms(spec))
            .arg(requests)
            .arg("")
            .arg(spec_arg(spec));
    }
}

/// What one round trip sends.
enum Req<'a> {
    Cmd(&'a Cmd),
    /// An `EVALSHA` of [`SCRIPT`]: loaded and retried once on `NOSCRIPT`.
    Script(&'a Cmd),
    /// `EVALSHA`s of [`SCRIPT`].
    Pipe(&'a Pipeline),
}

impl Inner {
    /// The plan's verdict from the script's reply: `raw` is (admitted, taken, the bucket's use
    /// before), `at` when the call was sent and answered. With a lease taken, the request
    /// spends its cost of it and the rest is returned as a [`Granted`]; a refusal goes in the
    /// deny cache.
    fn plan_answer(
        &self,
        key: Vec<u8>,
        math: &PlanMath,
        bucket: Option<(Rate, u64)>,
        raw: (bool, bool, u128),
        leased: Option<&PlanMath>,
        at: (Instant, Instant),
    ) -> (Verdict, Option<Granted>) {
        let (allowed, taken, used) = raw;
        let (sent, arrived) = at;
        if let (Some(l), Some(bucket)) = (leased, bucket) {
            let v = l.verdict(true, true, used);
            let left = l.cost_tokens - math.cost_tokens;
            let lease = batch::Lease {
                bucket,
                params: math.params(),
                tokens: left,
                remaining: v.remaining,
                reset_after: v.reset_after,
                at: arrived,
                quota: None,
            };
            let v = Verdict {
                remaining: v.remaining.saturating_add(left),
                ..v
            };
            return (v, Some(Granted { key, lease }));
        }
        let v = math.verdict(allowed, taken, used);
        if !v.allowed {
            self.deny_insert(key, Denied::for_plan(math, &v, sent, arrived));
        }
        (v, None)
    }

    /// The quota's verdict from the script's reply: `raw` is (admitted, the period's use
    /// after, Redis's time in µs). With a lease, its units go in the [`Granted`] and the
    /// request is answered as having used only its own cost.
    fn quota_answer(
        &self,
        key: Vec<u8>,
        q: &QuotaOp<'_>,
        raw: (bool, u64, u64),
        lease: Option<(&PlanMath, &mut Granted)>,
        at: (Instant, Instant),
    ) -> QuotaVerdict {
        let (allowed, mut used, now_us) = raw;
        let (sent, arrived) = at;
        let end_us = i128::from(q.period_end) * 1_000_000;
        let left_us = u64::try_from((end_us - i128::from(now_us)).max(0)).unwrap_or(u64::MAX);
        let reset_after = Duration::from_micros(left_us);
        if let Some((l, g)) = lease {
            let units = l.cost_tokens.saturating_sub(q.cost);
            g.lease.quota = Some(batch::QuotaLease {
                key,
                limit: q.limit,
                units,
                used,
                ends: arrived + reset_after,
            });
            used = used.saturating_sub(units);
            return QuotaVerdict {
                allowed,
                used,
                remaining: q.limit.saturating_sub(used),
                reset_after,
            };
        }
        let v = QuotaVerdict {
            allowed,
            used,
            remaining: q.limit.saturating_sub(used),
            reset_after,
        };
        if !allowed {
            self.deny_insert(key, Denied::for_quota(q, &v, sent, arrived));
        }
        v
    }

    fn admin_timeout(&self) -> Duration {
        self.cfg.timeout.max(ADMIN_TIMEOUT)
    }

    fn evalsha(&self) -> Cmd {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash());
        cmd
    }

    /// Starts the flush task, once, if there is a runtime to run it on.
    fn start_flusher(self: &Arc<Self>) {
        if self.flusher.load(Relaxed) || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if self.flusher.swap(true, Relaxed) {
            return;
        }
        if let Some(ledger) = &self.ledger {
            let weak = Arc::downgrade(self);
            let every = ledger.interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let _ = inner.sync_batch(false).await;
                }
            });
        }
        let weak = Arc::downgrade(self);
        let every = self.cfg.sync_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let _ = inner.flush().await;
            }
        });
    }

    /// Connects slot `i` in the background, unless it is already connecting.
    fn spawn_connect(self: &Arc<Self>, i: usize) {
        let slot = &self.slots[i];
        if slot.connecting.swap(true, Relaxed) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        let client = self.client.clone();
        let config = ConnectionManagerConfig::new()
            // Reconnect when a command finds the connection broken, once, without sleeping:
            // the store's own RETRY_DOWN spaces the attempts.
            .set_number_of_retries(0)
            .set_connection_timeout(self.admin_timeout());
        tokio::spawn(async move {
            let made = ConnectionManager::new_with_config(client, config).await;
            let Some(inner) = weak.upgrade() else { return };
            let slot = &inner.slots[i];
            match made {
                Ok(mut conn) => {
                    // Load the script now rather than on the first check.
                    let _ = tokio::time::timeout(
                        inner.admin_timeout(),
                        inner.script.load_async(&mut conn),
                    )
                    .await;
                    *slot.conn.lock() = Some(conn);
                    *slot.failed.lock() = None;
                }
                Err(e) => *slot.failed.lock() = Some((Instant::now(), e.to_string())),
            }
            slot.connecting.store(false, Relaxed);
            slot.ready.notify_waiters();
        });
    }

    /// A connection, waiting for the background connect if there is none yet.
    async fn connection(self: &Arc<Self>) -> Result<ConnectionManager, StoreError> {
        let i = self.next.fetch_add(1, Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        loop {
            if let Some(c) = slot.conn.lock().as_ref() {
                return Ok(c.clone());
            }
            let ready = slot.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(c) = slot.conn.lock().as_ref() {
                return Ok(c.clone());
            }
            if let Some((at, e)) = slot.failed.lock().as_ref() {
                if at.elapsed() < RETRY_DOWN {
                    return Err(StoreError::Unavailable(e.clone()));
                }
            }
            self.spawn_connect(i);
            ready.await;
        }
    }

    fn is_down(&self) -> bool {
        let mut down = self.down_until.lock();
        match *down {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *down = None;
                false
            }
            None => false,
        }
    }

    /// Sends `req`, waiting at most `timeout` (connecting included), and counts the outcome.
    async fn round_trip(
        self: &Arc<Self>,
        req: Req<'_>,
        timeout: Duration,
    ) -> Result<Value, StoreError> {
        if self.is_down() {
            self.stats.errors.fetch_add(1, Relaxed);
            return Err(StoreError::Unavailable(
                "a recent attempt failed; retrying shortly".into(),
            ));
        }
        let start = Instant::now();
        let call = async {
            let mut conn = self.connection().await?;
            self.send(&mut conn, &req).await.map_err(store_error)
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout),
        };
        match &result {
            Ok(_) => {
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.stats.round_trips.fetch_add(1, Relaxed);
                self.stats.rtt_nanos.fetch_add(nanos, Relaxed);
            }
            Err(StoreError::Timeout) => {
                self.stats.timeouts.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Relaxed);
                if matches!(e, StoreError::Unavailable(_)) {
                    *self.down_until.lock() = Some(Instant::now() + RETRY_DOWN);
                }
            }
        }
        result
    }

    async fn send(&self, conn: &mut ConnectionManager, req: &Req<'_>) -> Result<Value, RedisError> {
        let first = match req {
            Req::Cmd(c) | Req::Script(c) => c.query_async(conn).await,
            Req::Pipe(p) => p.query_async(conn).await.map(Value::Array),
        };
        match first {
            Err(e) if e.kind() == ErrorKind::NoScriptError && !matches!(req, Req::Cmd(_)) => {
                self.script.load_async(conn).await?;
                match req {
                    Req::Cmd(c) | Req::Script(c) => c.query_async(conn).await,
                    Req::Pipe(p) => p.query_async(conn).await.map(Value::Array),
                }
            }
            r => r,
        }
    }

    fn deny_insert(&self, key: Vec<u8>, d: Denied) {
        let mut deny = self.deny.lock();
        if deny.len() >= DENY_CACHE_SIZE && !deny.contains_key(&key) {
            let now = Instant::now();
            deny.retain(|_, d| d.until > now);
            if deny.len() >= DENY_CACHE_SIZE {
                return;
            }
        }
        deny.insert(key, d);
    }

    async fn flush(self: &Arc<Self>) -> Result<usize, StoreError> {
        let batch = std::mem::take(&mut *self.pending.lock());
        if batch.is_empty() {
            return Ok(0);
        }
        let n = batch.len();
        let entries: Vec<(Vec<u8>, Pending)> = batch.into_iter().collect();
        let mut pipe = ::redis::pipe();
        for chunk in entries.chunks(FLUSH_CHUNK) {
            let mut cmd = self.evalsha();
            cmd.arg(chunk.len());
            for (key, _) in chunk {
                cmd.arg(key.as_slice());
            }
            cmd.arg("f");
            for (_, p) in chunk {
                let l = &p.layout;
                cmd.arg(l.expire_ms)
                    .arg(p.errors)
                    .arg(l.err_period)
                    .arg(u8::from(l.err_cnt))
                    .arg(p.bytes_in)
                    .arg(l.in_period)
                    .arg(p.bytes_out)
                    .arg(l.out_period);
            }
            pipe.add_command(cmd);
        }
        // Reach Redis first: what could not be sent waits for the next flush.
        let reachable = !self.is_down()
            && tokio::time::timeout(self.admin_timeout(), self.connection())
                .await
                .is_ok_and(|c| c.is_ok());
        if !reachable {
            self.requeue(entries);
            return Err(StoreError::Unavailable(
                "not connected; kept for the next flush".into(),
            ));
        }
        match self
            .round_trip(Req::Pipe(&pipe), self.admin_timeout())
            .await
        {
            Ok(_) => {
                self.stats.finish_flushed.fetch_add(n as u64, Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.stats.finish_dropped.fetch_add(n as u64, Relaxed);
                Err(e)
            }
        }
    }

    /// With batching: sends the requests counted here and takes the entries' counts back,
    /// and gives back the leases older than one interval (every lease, with `all`). Returns
    /// the entries sent.
    async fn sync_batch(self: &Arc<Self>, all: bool) -> Result<usize, StoreError> {
        let Some(ledger) = &self.ledger else {
            return Ok(0);
        };
        let now = Instant::now();
        let back = ledger.expired(now, all);
        let due = ledger.due(now);
        let returned = if back.is_empty() {
            Ok(())
        } else {
            self.give_back(&back).await
        };
        if due.is_empty() {
            return returned.map(|()| 0);
        }
        let mut pipe = ::redis::pipe();
        for chunk in due.chunks(FLUSH_CHUNK) {
            let mut cmd = self.evalsha();
            cmd.arg(chunk.len());
            for d in chunk {
                cmd.arg(d.key.as_slice());
            }
            push_table_args(&mut cmd, chunk.iter().map(|d| (&d.spec, d.requests)));
            cmd.arg("0").arg("0");
            pipe.add_command(cmd);
        }
        let reachable = !self.is_down()
            && tokio::time::timeout(self.admin_timeout(), self.connection())
                .await
                .is_ok_and(|c| c.is_ok());
        if !reachable {
            for d in &due {
                ledger.unsend(&d.key, d.requests);
            }
            return Err(StoreError::Unavailable(
                "not connected; kept for the next sync".into(),
            ));
        }
        let n = due.len();
        let replies = match self
            .round_trip(Req::Pipe(&pipe), self.admin_timeout())
            .await
        {
            Ok(Value::Array(replies)) => replies,
            Ok(other) => {
                self.stats.batch_dropped.fetch_add(n as u64, Relaxed);
                return Err(StoreError::Protocol(format!(
                    "a pipeline answered {other:?}"
                )));
            }
            Err(e) => {
                self.stats.batch_dropped.fetch_add(n as u64, Relaxed);
                return Err(e);
            }
        };
        self.stats.batch_synced.fetch_add(n as u64, Relaxed);
        for (chunk, reply) in due.chunks(FLUSH_CHUNK).zip(replies) {
            let mut r = Reader::new(reply)?;
            let now_us = r.time()?;
            for d in chunk {
                let snap = r.snapshot(&d.spec, now_us)?.0;
                ledger.refresh(d.key.clone(), &d.table, &d.spec, snap);
            }
        }
        returned.map(|()| n)
    }

    /// Gives back the tokens and quota units of leases this process did not spend (mode `r`
    /// of the script). What cannot be given back stays taken: a caller is refused a little
    /// early, never admitted too much.
    async fn give_back(
        self: &Arc<Self>,
        leases: &[(Vec<u8>, batch::Lease)],
    ) -> Result<(), StoreError> {
        let mut pipe = ::redis::pipe();
        for chunk in leases.chunks(FLUSH_CHUNK / 2) {
            let mut keys: Vec<&[u8]> = Vec::with_capacity(chunk.len() * 2);
            let mut argv: Vec<String> = Vec::with_capacity(chunk.len() * 6);
            for (key, l) in chunk {
                if l.tokens > 0 {
                    let (n, d, _) = l.params;
                    let units = u128::from(l.tokens).saturating_mul(n);
                    let d128 = u128::from(d.max(1));
                    let whole = u64::try_from(units / d128).map_or(LUA_MAX, |w| w.min(LUA_MAX));
                    keys.push(key);
                    let fraction = (units % d128).to_string();
                    argv.extend(["p".into(), whole.to_string(), fraction, d.to_string()]);
                }
                if let Some(q) = l.quota.as_ref().filter(|q| q.units > 0) {
                    keys.push(&q.key);
                    argv.extend(["q".into(), q.units.to_string()]);
                }
            }
            let mut cmd = self.evalsha();
            cmd.arg(keys.len()).arg(keys).arg("r").arg(argv);
            pipe.add_command(cmd);
        }
        self.round_trip(Req::Pipe(&pipe), self.admin_timeout())
            .await
            .map(|_| ())
    }

    fn requeue(&self, entries: Vec<(Vec<u8>, Pending)>) {
        let mut pending = self.pending.lock();
        for (key, p) in entries {
            let len = pending.len();
            match pending.get_mut(&key) {
                Some(q) => q.add(p.layout, p.errors, p.bytes_in, p.bytes_out),
                None if len >= self.cfg.max_pending => {
                    self.stats.finish_dropped.fetch_add(1, Relaxed);
                }
                None => {
                    pending.insert(key, p);
                }
            }
        }
    }
}

fn store_error(e: RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

/// What a table needs of a finished response, in the script's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FinishLayout {
    expire_ms: u64,
    /// `http_err_rate`'s period in µs, 0 when not stored; likewise below.
    err_period: u64,
    err_cnt: bool,
    in_period: u64,
    out_period: u64,
}

impl FinishLayout {
    fn of(spec: &TableSpec) -> FinishLayout {
        let mut l = FinishLayout {
            expire_ms: expire_ms(spec),
            err_period: 0,
            err_cnt: false,
            in_period: 0,
            out_period: 0,
        };
        for c in spec.store() {
            match *c {
                Counter::HttpErrRate(p) => l.err_period = period_us(p),
                Counter::HttpErrCnt => l.err_cnt = true,
                Counter::BytesInRate(p) => l.in_period = period_us(p),
                Counter::BytesOutRate(p) => l.out_period = period_us(p),
                _ => {}
            }
        }
        l
    }
}

/// Finished-response counts waiting to be sent for one entry.
#[derive(Clone, Copy, Debug)]
struct Pending {
    layout: FinishLayout,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl Pending {
    fn add(&mut self, layout: FinishLayout, errors: u64, bytes_in: u64, bytes_out: u64) {
        // The latest spec wins (a reload may have changed it).
        self.layout = layout;
        self.errors = self.errors.saturating_add(errors);
        self.bytes_in = self.bytes_in.saturating_add(bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(bytes_out);
    }
}

/// A remembered refusal (see the module docs).
#[derive(Clone, Copy, Debug)]
struct Denied {
    /// Refused for this cost or more until then (measured from when the request was sent).
    until: Instant,
    cost: u64,
    kind: DeniedKind,
}

#[derive(Clone, Copy, Debug)]
enum DeniedKind {
    Plan {
        /// The bucket's parameters: a refusal holds only for the same ones.
        params: (u128, u64, u128),
        never: bool,
        /// `retry_after` and `reset_after` end here (measured from the answer's arrival).
        retry_at: Instant,
        reset_at: Instant,
        remaining: u64,
    },
    Quota {
        limit: u64,
        used: u64,
        /// The period's end, measured from the answer's arrival.
        reset_at: Instant,
    },
}

impl Denied {
    fn for_plan(math: &PlanMath, v: &Verdict, sent: Instant, arrived: Instant) -> Denied {
        let retry = if math.never {
            NEVER_CACHED
        } else {
            v.retry_after
        };
        let later = |from: Instant, d: Duration| from.checked_add(d).unwrap_or(from + NEVER_CACHED);
        Denied {
            until: later(sent, retry),
            cost: math.cost_tokens,
            kind: DeniedKind::Plan {
                params: math.params(),
                never: math.never,
                retry_at: later(arrived, retry),
                reset_at: later(arrived, v.reset_after),
                remaining: v.remaining,
            },
        }
    }

    fn for_quota(q: &QuotaOp<'_>, v: &QuotaVerdict, sent: Instant, arrived: Instant) -> Denied {
        let later = |from: Instant| {
            from.checked_add(v.reset_after)
                .unwrap_or(from + NEVER_CACHED)
        };
        Denied {
            until: later(sent),
            cost: q.cost,
            kind: DeniedKind::Quota {
                limit: q.limit,
                used: v.used,
                reset_at: later(arrived),
            },
        }
    }

    fn applies(&self, cost: u64, now: Instant) -> bool {
        now < self.until && cost >= self.cost
    }

    fn plan(&self, math: &PlanMath, now: Instant) -> Option<Verdict> {
        let DeniedKind::Plan {
            params,
            never,
            retry_at,
            reset_at,
            remaining,
        } = self.kind
        else {
            return None;
        };
        if !self.applies(math.cost_tokens, now) || params != math.params() {
            return None;
        }
        Some(Verdict {
            allowed: false,
            retry_after: if never || math.never {
                Duration::MAX
            } else {
                retry_at.saturating_duration_since(now)
            },
            remaining,
            reset_after: reset_at.saturating_duration_since(now),
        })
    }

    fn quota(&self, q: &QuotaOp<'_>, now: Instant) -> Option<QuotaVerdict> {
        let DeniedKind::Quota {
            limit,
            used,
            reset_at,
        } = self.kind
        else {
            return None;
        };
        if !self.applies(q.cost, now) || limit != q.limit {
            return None;
        }
        Some(QuotaVerdict {
            allowed: false,
            used,
            remaining: limit.saturating_sub(used),
            reset_after: reset_at.saturating_duration_since(now),
        })
    }
}

/// GCRA in the script's units: `1/d` microsecond, chosen so the emission interval `T`
/// (`n` units) is exact. The local [`crate::Gcra`] counts in ticks of `1/count` nanosecond;
/// with Redis's microsecond clock every quantity here is a whole multiple of those ticks,
/// so the two agree exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PlanMath {
    /// The emission interval, in units.
    n: u128,
    /// Units per microsecond.
    d: u64,
    /// `cost · T` and `burst · T`, in units.
    cost: u128,
    cap: u128,
    cost_tokens: u64,
    /// The cost exceeds the burst: never admitted.
    never: bool,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl PlanMath {
    fn new(rate: Rate, burst: u64, cost: u64) -> PlanMath {
        let burst = burst.max(1);
        // As crate::Gcra: the interval is per/count nanoseconds, per saturating at u64::MAX ns.
        let per_ns = rate.per().as_nanos().min(u128::from(u64::MAX)).max(1);
        let mut n = per_ns;
        let mut d = 1_000 * u128::from(rate.count().max(1));
        let g = gcd(n, d);
        (n, d) = (n / g, d / g);
        if d > MAX_UNITS_PER_US {
            // Only for absurd rates: round the interval to 2^-40 µs.
            let scaled = (n as f64) * (MAX_UNITS_PER_US as f64) / (d as f64);
            (n, d) = ((scaled.round() as u128).max(1), MAX_UNITS_PER_US);
        }
        PlanMath {
            n,
            d: d as u64,
            cost: u128::from(cost).saturating_mul(n),
            cap: u128::from(burst).saturating_mul(n),
            cost_tokens: cost,
            never: cost > burst,
        }
    }

    fn params(&self) -> (u128, u64, u128) {
        (self.n, self.d, self.cap)
    }

    /// Units as the script's pair (whole µs, fraction), the whole part clamped to [`LUA_MAX`].
    fn split(&self, units: u128) -> (u64, u64) {
        let d = u128::from(self.d);
        match u64::try_from(units / d) {
            Ok(whole) if whole < LUA_MAX => (whole, (units % d) as u64),
            _ => (LUA_MAX, 0),
        }
    }

    /// The script's arguments: cost·T and burst·T as pairs, and `d`.
    fn args(&self) -> [u64; 5] {
        let (cq, cr) = self.split(self.cap);
        let (q, r) = if self.never {
            (cq + 1, 0)
        } else {
            self.split(self.cost)
        };
        [q, r, cq, cr, self.d]
    }

    /// The bucket's use before this check (`tat − now`, at least 0), from the script's pair.
    fn used(&self, whole_us: i64, fraction: i64) -> u128 {
        let whole = u128::try_from(whole_us).unwrap_or(0);
        let fraction = u128::try_from(fraction).unwrap_or(0);
        whole
            .saturating_mul(u128::from(self.d))
            .saturating_add(fraction)
    }

    /// Units to a duration, rounding up to the nanosecond, as `crate::Gcra` does.
    fn duration(&self, units: u128) -> Duration {
        let ns = units.saturating_mul(1_000).div_ceil(u128::from(self.d));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The verdict for a check whose bucket was `used` before it. `allowed` is whether the
    /// bucket admits the cost; `taken` whether it was taken (not when a quota refused).
    fn verdict(&self, allowed: bool, taken: bool, used: u128) -> Verdict {
        let remaining =
            |u: u128| u64::try_from(self.cap.saturating_sub(u) / self.n).unwrap_or(u64::MAX);
        if allowed {
            let after = if taken {
                used.saturating_add(self.cost)
            } else {
                used
            };
            return Verdict {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: remaining(after),
                reset_after: self.duration(after),
            };
        }
        let retry_after = if self.never {
            Duration::MAX
        } else {
            self.duration(used.saturating_add(self.cost).saturating_sub(self.cap))
        };
        Verdict {
            allowed: false,
            retry_after,
            remaining: remaining(used),
            reset_after: self.duration(used),
        }
    }
}

/// A period in whole microseconds (at least 1).
fn period_us(p: crate::Period) -> u64 {
    (p.as_nanos() / 1_000).max(1)
}

fn expire_ms(spec: &TableSpec) -> u64 {
    u64::try_from(spec.expire().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The counters a table keeps in Redis, as the script reads them (see `limits.lua`).
fn spec_arg(spec: &TableSpec) -> String {
    let mut s = String::new();
    for c in spec.store() {
        let (letter, period) = match *c {
            Counter::HttpReqRate(p) => ('r', Some(p)),
            Counter::HttpReqCnt => ('R', None),
            Counter::HttpErrRate(p) => ('e', Some(p)),
            Counter::HttpErrCnt => ('E', None),
            Counter::BytesInRate(p) => ('i', Some(p)),
            Counter::BytesOutRate(p) => ('o', Some(p)),
            Counter::Gpc0 => ('g', None),
            Counter::Tags => ('T', None),
            Counter::ConnCur => continue,
        };
        if !s.is_empty() {
            s.push(' ');
        }
        s.push(letter);
        if let Some(p) = period {
            let _ = write!(s, "{}", period_us(p));
        }
    }
    s
}

/// A name (table, plan, bucket) in a key: `%` as `%25` and `:` as `%3A`.
fn push_name(buf: &mut Vec<u8>, name: &str) {
    // Names rarely hold either byte: copied whole then (keys are built on every check).
    if !name.bytes().any(|b| b == b'%' || b == b':') {
        buf.extend_from_slice(name.as_bytes());
        return;
    }
    for b in name.bytes() {
        match b {
            b'%' => buf.extend_from_slice(b"%25"),
            b':' => buf.extend_from_slice(b"%3A"),
            _ => buf.push(b),
        }
    }
}

/// A [`Key`] in a key: its bytes; a hashed key as `~` and hex; a literal `~…` as `~~…`.
fn push_key(buf: &mut Vec<u8>, key: &Key) {
    let bytes = key.as_bytes();
    if key.is_hashed() {
        buf.push(b'~');
        for b in bytes {
            let _ = write!(HexOut(buf), "{b:02x}");
        }
    } else {
        if bytes.first() == Some(&b'~') {
            buf.push(b'~');
        }
        buf.extend_from_slice(bytes);
    }
}

/// The [`Key`] that [`push_key`] wrote as `bytes`; `None` for bytes it cannot have written.
fn key_from_redis(bytes: &[u8]) -> Option<Key> {
    match bytes {
        [b'~', b'~', rest @ ..] => Some(Key::new(&[b"~", rest].concat())),
        [b'~', hex @ ..] => {
            let mut digest = [0u8; crate::key::INLINE_LEN];
            if hex.len() != digest.len() * 2 {
                return None;
            }
            for (d, pair) in digest.iter_mut().zip(hex.chunks(2)) {
                *d = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
            }
            Some(Key::from_digest(digest))
        }
        literal => Some(Key::new(literal)),
    }
}

struct HexOut<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for HexOut<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `{prefix}:t:{table}:`, the start of every key of the table.
fn table_key_prefix(prefix: &[u8], table: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + table.len() + 32);
    k.extend_from_slice(prefix);
    k.extend_from_slice(b":t:");
    push_name(&mut k, table);
    k.push(b':');
    k
}

fn table_key(prefix: &[u8], table: &str, key: &Key) -> Vec<u8> {
    let mut k = table_key_prefix(prefix, table);
    push_key(&mut k, key);
    k
}

fn plan_key(prefix: &[u8], plan: &str, bucket: &str, key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + plan.len() + bucket.len() + 40);
    k.extend_from_slice(prefix);
    k.extend_from_slice(b":p:");
    push_name(&mut k, plan);
    k.push(b':');
    push_name(&mut k, bucket);
    k.push(b':');
    push_key(&mut k, key);
    k
}

fn quota_key(prefix: &[u8], plan: &str, key: &Key, period_start: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + plan.len() + 60);
    k.extend_from_slice(prefix);
    k.extend_from_slice(b":q:");
    push_name(&mut k, plan);
    k.push(b':');
    push_key(&mut k, key);
    let _ = write!(HexOut(&mut k), ":{period_start}");
    k
}

/// Bytes as a `SCAN MATCH` pattern that matches exactly them.
fn glob_escape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 4);
    for &b in bytes {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// The estimate of [`crate::window::WindowState::rate`] with two windows, from the fields the
/// script keeps: `w` the index of the window counted in `cur`, `prev` the one before it.
fn window_rate(w: Option<u64>, cur: u64, prev: u64, now_us: u64, period_us: u64) -> u64 {
    let Some(w) = w else { return 0 };
    let period_us = period_us.max(1);
    let pos = now_us / period_us;
    let elapsed = now_us % period_us;
    let (full, oldest, elapsed) = if w == pos {
        (cur, prev, elapsed)
    } else if w > pos && w - pos <= 2 {
        // A moment a little older than the state: as of the start of its current window.
        (cur, prev, 0)
    } else if w + 1 == pos {
        (0, cur, elapsed)
    } else {
        return 0;
    };
    let weighted = u128::from(oldest) * u128::from(period_us - elapsed) / u128::from(period_us);
    full.saturating_add(weighted as u64)
}

/// Reads the script's flat reply in order.
struct Reader {
    items: std::vec::IntoIter<Value>,
}

impl Reader {
    fn new(v: Value) -> Result<Reader, StoreError> {
        match v {
            Value::Array(items) => Ok(Reader {
                items: items.into_iter(),
            }),
            other => Err(StoreError::Protocol(format!(
                "expected an array, got {other:?}"
            ))),
        }
    }

    fn next(&mut self) -> Result<Value, StoreError> {
        self.items
            .next()
            .ok_or_else(|| StoreError::Protocol("the script's reply is too short".into()))
    }

    fn int(&mut self) -> Result<i64, StoreError> {
        match self.next()? {
            Value::Int(i) => Ok(i),
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Protocol(format!("not an integer: {b:?}"))),
            other => Err(StoreError::Protocol(format!("not an integer: {other:?}"))),
        }
    }

    fn flag(&mut self) -> Result<bool, StoreError> {
        Ok(self.int()? != 0)
    }

    /// A counter's value: `None` when the field is absent; negative values read as 0.
    fn count(&mut self) -> Result<Option<u64>, StoreError> {
        match self.next()? {
            Value::Nil => Ok(None),
            Value::Int(i) => Ok(Some(u64::try_from(i).unwrap_or(0))),
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .map(|i| Some(u64::try_from(i).unwrap_or(0)))
                .ok_or_else(|| StoreError::Protocol(format!("not a count: {b:?}"))),
            other => Err(StoreError::Protocol(format!("not a count: {other:?}"))),
        }
    }

    /// Redis's time, in microseconds since the Unix epoch.
    fn time(&mut self) -> Result<u64, StoreError> {
        let (s, us) = (self.int()?, self.int()?);
        let us = i128::from(s) * 1_000_000 + i128::from(us);
        u64::try_from(us).map_err(|_| StoreError::Protocol(format!("bad time {us}")))
    }

    /// One table entry, as `table_op` in the script appends it; and whether it exists.
    fn snapshot(&mut self, spec: &TableSpec, now_us: u64) -> Result<(Snapshot, bool), StoreError> {
        let pttl = self.int()?;
        let mut s = Snapshot {
            expires_in: match pttl {
                -2 => Duration::ZERO,
                -1 => spec.expire(),
                ms => Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
            },
            ..Snapshot::default()
        };
        for c in spec.store() {
            match *c {
                Counter::ConnCur => {}
                Counter::Tags => s.tags = Reader::tags(self.next()?)?,
                Counter::HttpReqCnt => s.http_req_cnt = Some(self.count()?.unwrap_or(0)),
                Counter::HttpErrCnt => s.http_err_cnt = Some(self.count()?.unwrap_or(0)),
                Counter::Gpc0 => s.gpc0 = Some(self.count()?.unwrap_or(0)),
                Counter::HttpReqRate(p)
                | Counter::HttpErrRate(p)
                | Counter::BytesInRate(p)
                | Counter::BytesOutRate(p) => {
                    let w = self.count()?;
                    let (mut cur, mut prev) =
                        (self.count()?.unwrap_or(0), self.count()?.unwrap_or(0));
                    let field = match *c {
                        Counter::HttpReqRate(_) => &mut s.http_req_rate,
                        Counter::HttpErrRate(_) => &mut s.http_err_rate,
                        Counter::BytesInRate(_) => &mut s.bytes_in_rate,
                        _ => &mut s.bytes_out_rate,
                    };
                    if matches!(*c, Counter::HttpReqRate(_) | Counter::HttpErrRate(_)) {
                        // The local table counts requests and errors in u32 cells.
                        cur = cur.min(u64::from(u32::MAX));
                        prev = prev.min(u64::from(u32::MAX));
                    }
                    *field = Some(window_rate(w, cur, prev, now_us, period_us(p)));
                }
            }
        }
        Ok((s, pttl != -2))
    }

    /// An entry's tags, as the script keeps them: separated by spaces; absent is none.
    fn tags(v: Value) -> Result<Vec<String>, StoreError> {
        match v {
            Value::Nil => Ok(Vec::new()),
            Value::BulkString(b) => Ok(String::from_utf8_lossy(&b)
                .split_whitespace()
                .map(str::to_owned)
                .collect()),
            other => Err(StoreError::Protocol(format!("not tags: {other:?}"))),
        }
    }

    /// The integer reply of `UNLINK`.
    fn count_of(v: &Value) -> Option<u64> {
        match v {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    fn unlinked(v: &Value) -> Result<u64, StoreError> {
        Reader::count_of(v).ok_or_else(|| StoreError::Protocol(format!("not a count: {v:?}")))
    }

    /// A `SCAN` reply: the next cursor and the keys.
    fn scan(v: Value) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let bad = |v: &Value| StoreError::Protocol(format!("bad SCAN reply: {v:?}"));
        let Value::Array(mut parts) = v else {
            return Err(bad(&v));
        };
        if parts.len() != 2 {
            return Err(bad(&Value::Array(parts)));
        }
        let keys = parts.pop();
        let cursor = parts.pop();
        let cursor = match cursor {
            Some(Value::BulkString(b)) => std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()),
            Some(Value::Int(i)) => u64::try_from(i).ok(),
            _ => None,
        }
        .ok_or_else(|| StoreError::Protocol("bad SCAN cursor".into()))?;
        let keys = match keys {
            Some(Value::Array(keys)) => keys
                .into_iter()
                .map(|k| match k {
                    Value::BulkString(b) => Ok(b),
                    other => Err(bad(&other)),
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => return Err(StoreError::Protocol(format!("bad SCAN keys: {other:?}"))),
        };
        Ok((cursor, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Moment;
    use crate::gcra::GcraState;
    use crate::window::WindowState;
    use crate::{Gcra, Period};

    #[test]
    fn names_and_keys_cannot_run_into_each_other() {
        assert_eq!(
            table_key(b"pc", "per-ip", &Key::from("10.0.0.1")),
            b"pc:t:per-ip:10.0.0.1"
        );
        assert_eq!(
            table_key(b"pc", "a:b%", &Key::from("k")),
            b"pc:t:a%3Ab%25:k"
        );
        assert_ne!(
            plan_key(b"pc", "a:b", "", &Key::from("k")),
            plan_key(b"pc", "a", "b", &Key::from("k"))
        );
        assert_eq!(
            plan_key(b"pc", "gold", "", &Key::from("alice")),
            b"pc:p:gold::alice"
        );
        assert_eq!(
            quota_key(b"pc", "gold", &Key::from("alice"), 1_700_000_000),
            b"pc:q:gold:alice:1700000000"
        );
        assert_eq!(
            quota_key(b"pc", "gold", &Key::from("a"), -5),
            b"pc:q:gold:a:-5"
        );
    }

    #[test]
    fn keys_read_back_from_redis_are_the_keys_written() {
        for key in [
            Key::from("10.0.0.1"),
            Key::from("~tilde"),
            Key::from("~~two"),
            Key::new(&[0xff, 0, 7]),
            Key::new(&[b'a'; 200]),
            Key::new(&vec![b'b'; 100_000]),
        ] {
            let mut k = Vec::new();
            push_key(&mut k, &key);
            assert_eq!(key_from_redis(&k), Some(key.clone()), "{key}");
        }
        assert_eq!(key_from_redis(b"~zz"), None);
    }

    #[test]
    fn hashed_keys_are_hex_and_never_equal_a_literal() {
        let long = Key::new(&vec![b'x'; 100_000]);
        let k = table_key(b"pc", "t", &long);
        assert_eq!(k.len(), b"pc:t:t:".len() + 1 + 44);
        assert!(k[7..].starts_with(b"~"));
        assert!(k[8..].iter().all(u8::is_ascii_hexdigit));
        // The literal key spelled like the hashed one's encoding.
        let spelled = Key::new(&k[7..]);
        assert_ne!(table_key(b"pc", "t", &spelled), k);
        assert_eq!(table_key(b"pc", "t", &Key::from("~a")), b"pc:t:t:~~a");
        // A literal key with the digest's bytes is another key too.
        assert_ne!(table_key(b"pc", "t", &Key::new(long.as_bytes())), k);
        // Binary keys go in as they are.
        let ip = Key::from(std::net::IpAddr::from([10, 0, 0, 1]));
        assert_eq!(table_key(b"pc", "t", &ip), b"pc:t:t:\x0a\x00\x00\x01");
    }

    #[test]
    fn scan_patterns_match_only_the_table() {
        assert_eq!(glob_escape(b"p*:t:a?[b]\\:"), b"p\\*:t:a\\?\\[b\\]\\\\:");
        assert_eq!(table_key_prefix(b"pc", "t"), b"pc:t:t:");
    }

    #[test]
    fn the_spec_argument_names_what_is_kept() {
        let spec = TableSpec::parse(
            10,
            Duration::from_secs(60),
            [
                "http_req_rate(10s)",
                "conn_cur",
                "http_req_cnt",
                "http_err_rate(1m)",
                "http_err_cnt",
                "bytes_in_rate(250ms)",
                "bytes_out_rate(1s)",
                "gpc0",
                "tags",
            ],
        )
        .unwrap();
        assert_eq!(
            spec_arg(&spec),
            "r10000000 R e60000000 E i250000 o1000000 g T"
        );
        assert_eq!(expire_ms(&spec), 60_000);
        assert_eq!(
            FinishLayout::of(&spec),
            FinishLayout {
                expire_ms: 60_000,
                err_period: 60_000_000,
                err_cnt: true,
                in_period: 250_000,
                out_period: 1_000_000,
            }
        );
    }

    /// The Redis-side window against the local one, at every step of an irregular sequence.
    #[test]
    fn window_rates_match_the_local_window() {
        let period = Period::parse("1s").unwrap();
        let p_us = period_us(period);
        let mut local = WindowState::<u64, 2>::default();
        // The script's state.
        let (mut w, mut cur, mut prev): (Option<u64>, u64, u64) = (None, 0, 0);
        let mut now_us = 1_700_000_000_123_456u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            now_us += seed % 300_000;
            let n = seed % 5;
            let idx = now_us / p_us;
            // window_add in limits.lua
            match w {
                Some(x) if x == idx || (x > idx && x - idx <= 2) => cur += n,
                Some(x) if x + 1 == idx => (w, prev, cur) = (Some(idx), cur, n),
                _ => (w, prev, cur) = (Some(idx), 0, n),
            }
            let moment = Moment::from_nanos(now_us * 1_000);
            local.add(period, moment, n);
            assert_eq!(
                window_rate(w, cur, prev, now_us, p_us),
                local.rate(period, moment),
                "at {now_us}"
            );
            // Reads later, without adding.
            for later in [
                1, 400_000, 999_999, 1_000_000, 1_500_000, 2_000_000, 9_000_000,
            ] {
                let t = now_us + later;
                assert_eq!(
                    window_rate(w, cur, prev, t, p_us),
                    local.rate(period, Moment::from_nanos(t * 1_000)),
                    "at {t}"
                );
            }
        }
        assert_eq!(window_rate(None, 5, 5, now_us, p_us), 0);
        // Two windows late: as of the start of the state's window.
        assert_eq!(window_rate(Some(12), 3, 4, 10 * p_us + 5, p_us), 7);
        assert_eq!(window_rate(Some(13), 3, 4, 10 * p_us + 5, p_us), 0);
    }

    /// A simulation of the script's GCRA (pairs of whole µs and fractions) against
    /// crate::Gcra fed the same moments.
    fn simulate(rate: Rate, burst: u64, steps: &[(u64, u64)]) {
        let gcra = Gcra::new(rate, burst).unwrap();
        let mut state = GcraState::default();
        let mut tat: (u64, u64) = (0, 0);
        for &(now_us, cost) in steps {
            let m = PlanMath::new(rate, burst, cost);
            let [q, r, cq, cr, d] = m.args();
            let (sa, sf) = if tat.0 > now_us || (tat.0 == now_us && tat.1 > 0) {
                tat
            } else {
                (now_us, 0)
            };
            let (mut na, mut nf) = (sa + q, sf + r);
            if nf >= d {
                (na, nf) = (na + 1, nf - d);
            }
            let ok = na - now_us < cq || (na - now_us == cq && nf <= cr);
            if ok && cost > 0 {
                tat = (na, nf);
            }
            let used = m.used((sa - now_us) as i64, sf as i64);
            let ours = m.verdict(ok, ok, used);
            let local = gcra.check(&mut state, Moment::from_nanos(now_us * 1_000), cost);
            assert_eq!(
                ours, local,
                "{rate} burst {burst} at {now_us}µs cost {cost}"
            );
        }
    }

    #[test]
    fn gcra_matches_the_local_bucket() {
        let t0 = 1_700_000_000_000_000u64;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for (rate, burst) in [
            (Rate::per_second(100), 200),
            (Rate::per_second(3), 2),
            (Rate::per_second(7), 1),
            (Rate::new(5_000, Duration::from_secs(3_600)).unwrap(), 50),
            (Rate::new(1, Duration::from_secs(86_400)).unwrap(), 500),
            (Rate::new(999_999_937, Duration::from_secs(1)).unwrap(), 10),
        ] {
            let mut now = t0;
            let mut steps = Vec::new();
            for _ in 0..5_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                now += seed % 20_000;
                steps.push((now, [1, 1, 1, 0, 3, burst + 1][(seed >> 40) as usize % 6]));
            }
            simulate(rate, burst, &steps);
        }
    }

    #[test]
    fn gcra_units_are_exact_for_rates_that_do_not_divide() {
        // 3 per second: one per 333,333.3̅ µs, kept as 1,000,000 units of 1/3 µs.
        let m = PlanMath::new(Rate::per_second(3), 2, 1);
        assert_eq!((m.n, m.d), (1_000_000, 3));
        assert_eq!(m.args(), [333_333, 1, 666_666, 2, 3]);
        assert_eq!(m.duration(1), Duration::from_nanos(334));
        // A cost above the burst is never admitted, whatever the bucket holds.
        let never = PlanMath::new(Rate::per_second(3), 2, 3);
        assert!(never.never);
        assert_eq!(never.args()[0], 666_667);
        assert_eq!(never.verdict(false, false, 0).retry_after, Duration::MAX);
        // Absurd inputs do not overflow the Lua side's exact range.
        let slow = PlanMath::new(Rate::new(1, Duration::MAX).unwrap(), u64::MAX, u64::MAX);
        assert!(slow.args().iter().all(|&x| x <= LUA_MAX + 1));
        let fast = PlanMath::new(Rate::new(u64::MAX, Duration::from_nanos(1)).unwrap(), 1, 1);
        assert!(u128::from(fast.d) <= MAX_UNITS_PER_US && fast.n >= 1);
    }

    #[test]
    fn denied_answers_only_for_the_same_or_a_larger_cost() {
        let q = QuotaOp {
            plan: "gold",
            key: &Key::from("a"),
            period_start: 0,
            period_end: 100,
            limit: 10,
            cost: 3,
        };
        let v = QuotaVerdict {
            allowed: false,
            used: 9,
            remaining: 1,
            reset_after: Duration::from_secs(60),
        };
        let t = Instant::now();
        let d = Denied::for_quota(&q, &v, t, t + Duration::from_millis(1));
        assert!(d.quota(&q, t).is_some());
        assert!(d.quota(&QuotaOp { cost: 5, ..q }, t).is_some());
        assert!(d.quota(&QuotaOp { cost: 1, ..q }, t).is_none());
        assert!(d.quota(&QuotaOp { limit: 20, ..q }, t).is_none());
        assert!(d.quota(&q, t + Duration::from_secs(61)).is_none());
        assert!(d
            .plan(&PlanMath::new(Rate::per_second(1), 1, 1), t)
            .is_none());

        let m = PlanMath::new(Rate::per_second(10), 5, 1);
        let v = m.verdict(false, false, 5 * m.n);
        assert_eq!(v.retry_after, Duration::from_millis(100));
        let d = Denied::for_plan(&m, &v, t, t + Duration::from_millis(1));
        let cached = d.plan(&m, t).unwrap();
        assert!(!cached.allowed);
        assert_eq!(cached.retry_after, Duration::from_millis(101));
        assert!(d.plan(&m, t + Duration::from_millis(100)).is_none());
        assert!(d
            .plan(&PlanMath::new(Rate::per_second(20), 5, 1), t)
            .is_none());
    }

    #[test]
    fn a_store_needs_no_redis_to_be_made_but_a_good_url() {
        let store = RedisStore::new(RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        assert_eq!(store.stats(), StoreStats::default());
        let err = RedisStore::new(RedisConfig::new("http://nope")).unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
        let err = RedisStore::new(RedisConfig {
            connections: 0,
            ..RedisConfig::new("redis://127.0.0.1/")
        })
        .unwrap_err();
        assert!(err.to_string().contains("between 1 and 64"), "{err}");
        fn shared<T: Send + Sync + Clone>() {}
        shared::<RedisStore>();
    }
}
