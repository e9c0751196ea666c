//! Local batching for the Redis store (`RedisConfig::batch`): what a process knows of the
//! shared counters and what it owes them, so that most checks need no round trip. Without
//! batching (the default) every check is one exact round trip; with it, a process answers a
//! hot key from its own ledger and talks to Redis about it once per interval, as Envoy's and
//! Kong's local counters with a sync interval do. This module holds the ledger and its rules;
//! the parent module does the I/O.
//!
//! * **A table entry's view.** After a round trip, the process keeps the entry's counters as
//!   Redis answered them. For the next `2 × interval` it counts the entry's requests itself
//!   and answers with Redis's counters plus its own requests since; a background task sends
//!   the requests counted here every interval and takes fresh counters back. What a rule or a
//!   policy reads is then short by the other replicas' requests of the last two intervals at
//!   most (and a rate is not aged over that time). A view unused for ten intervals is
//!   forgotten.
//! * **A plan's lease.** A round trip for a plan asks for a lease of `n` tokens (and `n` units
//!   of the plan's quota) instead of the request's cost, when the bucket (and the quota) has
//!   room for `n`. The process then spends those tokens itself, for at most one interval, and
//!   gives back what it did not spend. Since the tokens were taken from the shared bucket, a
//!   fleet never admits more than the plan allows; a caller may be refused early while other
//!   replicas hold unspent tokens, at most `n − 1` per replica for one interval. `n` is the
//!   plan's rate over one interval, at most a tenth of its burst, a hundredth of its quota and
//!   [`MAX_LEASE`]; when that is not more than the request's cost, there is no lease.

use crate::table::{Snapshot, TableSpec};
use crate::units::Rate;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Tokens (and quota units) one lease takes at most.
pub(super) const MAX_LEASE: u64 = 1_000;
/// A view unused for this many intervals is forgotten.
const IDLE_INTERVALS: u32 = 10;
/// Views, and leases, a process keeps at most (each): past it, checks go to Redis.
const MAX_ENTRIES: usize = 100_000;

/// Keyed by Redis keys, which callers choose: seeded per map, as the tables' maps are.
type Map<V> = HashMap<Vec<u8>, V, foldhash::fast::RandomState>;

/// The process's ledger. See the [module docs](self).
pub(super) struct Ledger {
    pub interval: Duration,
    views: Mutex<Map<View>>,
    leases: Mutex<Map<Lease>>,
    /// Leases replaced before they were collected, with tokens to give back.
    owed: Mutex<Vec<(Vec<u8>, Lease)>>,
    /// Buckets whose next lease one request is fetching: the others wait for it rather than
    /// each asking Redis for a lease of its own.
    fetching: Mutex<HashSet<Vec<u8>>>,
    /// Woken when a fetch ends.
    pub fetched: Notify,
}

/// A fetch of a bucket's lease in progress; ends (and wakes the waiters) when dropped,
/// whether the fetch worked, failed or was cancelled.
pub(super) struct Fetch<'a> {
    ledger: &'a Ledger,
    key: Vec<u8>,
}

impl Drop for Fetch<'_> {
    fn drop(&mut self) {
        self.ledger.fetching.lock().remove(&self.key);
        self.ledger.fetched.notify_waiters();
    }
}

struct View {
    /// The entry as Redis answered at `at`.
    snap: Snapshot,
    at: Instant,
    used: Instant,
    /// Requests counted here that `snap` does not hold.
    since: u64,
    /// Of those, the ones not sent yet.
    pending: u64,
    table: String,
    spec: TableSpec,
}

/// A table entry whose requests counted here are due to be sent.
pub(super) struct Due {
    pub key: Vec<u8>,
    pub table: String,
    pub spec: TableSpec,
    pub requests: u64,
}

/// Tokens of one plan bucket (and units of its quota) taken from Redis to spend here.
#[derive(Clone, Debug)]
pub(super) struct Lease {
    /// The plan's rate and burst: the lease holds only for the same ones.
    pub bucket: (Rate, u64),
    /// The bucket's parameters in the script's units (`PlanMath::params`), to give back.
    pub params: (u128, u64, u128),
    pub tokens: u64,
    /// The bucket's remaining tokens when it was taken, without the lease's own.
    pub remaining: u64,
    pub reset_after: Duration,
    pub at: Instant,
    pub quota: Option<QuotaLease>,
}

#[derive(Clone, Debug)]
pub(super) struct QuotaLease {
    pub key: Vec<u8>,
    pub limit: u64,
    pub units: u64,
    /// The period's use in Redis when taken, the lease's units included.
    pub used: u64,
    /// The period's end.
    pub ends: Instant,
}

/// What one request's quota asks of a lease.
pub(super) struct QuotaAsk<'a> {
    pub key: &'a [u8],
    pub limit: u64,
    pub cost: u64,
}

/// A request answered from a lease.
pub(super) struct Spent {
    pub remaining: u64,
    pub reset_after: Duration,
    /// `(used, remaining, reset_after)` of the quota, when the plan has one.
    pub quota: Option<(u64, u64, Duration)>,
}

/// The lease to ask for: see the module docs. 0 means none.
pub(super) fn lease_size(
    rate: Rate,
    burst: u64,
    quota_limit: Option<u64>,
    cost: u64,
    interval: Duration,
) -> u64 {
    let per_ns = rate.per().as_nanos().max(1);
    let in_interval = u128::from(rate.count()) * interval.as_nanos() / per_ns;
    let mut n = u64::try_from(in_interval)
        .unwrap_or(u64::MAX)
        .min(burst / 10)
        .min(MAX_LEASE);
    if let Some(limit) = quota_limit {
        n = n.min(limit / 100);
    }
    if n > cost {
        n
    } else {
        0
    }
}

impl Ledger {
    pub fn new(interval: Duration) -> Ledger {
        Ledger {
            interval,
            views: Mutex::default(),
            leases: Mutex::default(),
            owed: Mutex::default(),
            fetching: Mutex::default(),
            fetched: Notify::new(),
        }
    }

    /// Starts fetching the bucket's next lease, unless another request already is.
    pub fn begin_fetch(&self, key: &[u8]) -> Option<Fetch<'_>> {
        self.fetching.lock().insert(key.to_vec()).then(|| Fetch {
            ledger: self,
            key: key.to_vec(),
        })
    }

    /// Counts `requests` here, if the entry's view is fresh, and answers with what the entry
    /// holds then.
    pub fn count(&self, key: &[u8], requests: u64, now: Instant) -> Option<Snapshot> {
        let mut views = self.views.lock();
        let v = views.get_mut(key)?;
        if now.saturating_duration_since(v.at) >= 2 * self.interval {
            return None;
        }
        v.since = v.since.saturating_add(requests);
        v.pending = v.pending.saturating_add(requests);
        v.used = now;
        let mut s = v.snap.clone();
        let add = |c: &mut Option<u64>| {
            if let Some(c) = c {
                *c = c.saturating_add(v.since);
            }
        };
        add(&mut s.http_req_cnt);
        add(&mut s.http_req_rate);
        s.expires_in = v.spec.expire();
        Some(s)
    }

    /// Takes the requests counted here and not sent yet, to send them with a round trip.
    pub fn take_pending(&self, key: &[u8]) -> u64 {
        self.views
            .lock()
            .get_mut(key)
            .map_or(0, |v| std::mem::take(&mut v.pending))
    }

    /// Gives back requests taken by [`Ledger::take_pending`] or [`Ledger::due`] that were
    /// never sent.
    pub fn unsend(&self, key: &[u8], requests: u64) {
        if let Some(v) = self.views.lock().get_mut(key) {
            v.pending = v.pending.saturating_add(requests);
        }
    }

    /// The entry as Redis answered it just now, every request counted here until the call
    /// was sent included.
    pub fn refresh(&self, key: Vec<u8>, table: &str, spec: &TableSpec, snap: Snapshot) {
        let now = Instant::now();
        let mut views = self.views.lock();
        if let Some(v) = views.get_mut(&key) {
            // Counted while the call was out: still not in Redis's answer.
            v.since = v.pending;
            v.snap = snap;
            v.at = now;
            if v.spec != *spec {
                v.spec = spec.clone();
            }
            return;
        }
        if views.len() >= MAX_ENTRIES {
            return;
        }
        views.insert(
            key,
            View {
                snap,
                at: now,
                used: now,
                since: 0,
                pending: 0,
                table: table.to_owned(),
                spec: spec.clone(),
            },
        );
    }

    /// Forgets every view (after an admin change to the entries in Redis).
    pub fn forget_views(&self) {
        self.views.lock().clear();
    }

    /// The entries with requests to send now; forgets views unused for ten intervals.
    pub fn due(&self, now: Instant) -> Vec<Due> {
        let idle = IDLE_INTERVALS * self.interval;
        let mut views = self.views.lock();
        views.retain(|_, v| v.pending > 0 || now.saturating_duration_since(v.used) < idle);
        views
            .iter_mut()
            .filter(|(_, v)| v.pending > 0)
            .map(|(k, v)| Due {
                key: k.clone(),
                table: v.table.clone(),
                spec: v.spec.clone(),
                requests: std::mem::take(&mut v.pending),
            })
            .collect()
    }

    /// Spends `cost` tokens (and the quota's cost) of the bucket's lease, if it has them,
    /// is younger than one interval, and was taken for the same parameters and period.
    pub fn spend(
        &self,
        key: &[u8],
        bucket: (Rate, u64),
        cost: u64,
        quota: Option<&QuotaAsk<'_>>,
        now: Instant,
    ) -> Option<Spent> {
        let mut leases = self.leases.lock();
        let l = leases.get_mut(key)?;
        let age = now.saturating_duration_since(l.at);
        if age >= self.interval || l.bucket != bucket || l.tokens < cost {
            return None;
        }
        match (quota, &l.quota) {
            (None, None) => {}
            (Some(a), Some(q)) if a.key == q.key.as_slice() && a.limit == q.limit => {
                if q.units < a.cost {
                    return None;
                }
            }
            _ => return None,
        }
        l.tokens -= cost;
        let quota = match (quota, l.quota.as_mut()) {
            (Some(a), Some(q)) => {
                q.units -= a.cost;
                let used = q.used.saturating_sub(q.units);
                Some((
                    used,
                    q.limit.saturating_sub(used),
                    q.ends.saturating_duration_since(now),
                ))
            }
            _ => None,
        };
        Some(Spent {
            remaining: l.remaining.saturating_add(l.tokens),
            reset_after: l.reset_after.saturating_sub(age),
            quota,
        })
    }

    /// Keeps a lease just taken. One it replaces is given back at the next sync.
    pub fn grant(&self, key: Vec<u8>, lease: Lease) {
        let mut leases = self.leases.lock();
        if leases.len() >= MAX_ENTRIES && !leases.contains_key(&key) {
            drop(leases);
            self.owed.lock().push((key, lease));
            return;
        }
        if let Some(old) = leases.insert(key.clone(), lease) {
            if old.tokens > 0 || old.quota.as_ref().is_some_and(|q| q.units > 0) {
                self.owed.lock().push((key, old));
            }
        }
    }

    /// The leases to give back now: those older than one interval (every one with `all`),
    /// and those replaced since the last call, with tokens or units left.
    pub fn expired(&self, now: Instant, all: bool) -> Vec<(Vec<u8>, Lease)> {
        let mut out = std::mem::take(&mut *self.owed.lock());
        let mut leases = self.leases.lock();
        let old: Vec<Vec<u8>> = leases
            .iter()
            .filter(|(_, l)| all || now.saturating_duration_since(l.at) >= self.interval)
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            if let Some(l) = leases.remove(&k) {
                if l.tokens > 0 || l.quota.as_ref().is_some_and(|q| q.units > 0) {
                    out.push((k, l));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TableSpec {
        TableSpec::parse(
            1_000,
            Duration::from_secs(60),
            ["http_req_cnt", "http_req_rate(10s)"],
        )
        .unwrap()
    }

    fn snap(cnt: u64) -> Snapshot {
        Snapshot {
            http_req_cnt: Some(cnt),
            http_req_rate: Some(cnt),
            ..Snapshot::default()
        }
    }

    #[test]
    fn lease_sizes_follow_rate_burst_quota_and_cap() {
        let r = Rate::per_second;
        let i = Duration::from_millis(100);
        assert_eq!(
            lease_size(r(100_000_000), 100_000_000, None, 1, i),
            MAX_LEASE
        );
        assert_eq!(lease_size(r(1_000), 2_000, None, 1, i), 100);
        assert_eq!(lease_size(r(1_000), 200, None, 1, i), 20);
        assert_eq!(lease_size(r(1_000), 2_000, Some(3_000), 1, i), 30);
        // Not more than the cost: no lease.
        assert_eq!(lease_size(r(10), 20, None, 1, i), 0);
        assert_eq!(lease_size(r(1_000), 2_000, None, 100, i), 0);
    }

    #[test]
    fn a_fresh_view_counts_here_and_a_stale_one_does_not() {
        let l = Ledger::new(Duration::from_millis(50));
        let t0 = Instant::now();
        assert!(l.count(b"k", 1, t0).is_none(), "no view yet");
        l.refresh(b"k".to_vec(), "t", &spec(), snap(10));
        let now = Instant::now();
        let s = l.count(b"k", 1, now).unwrap();
        assert_eq!((s.http_req_cnt, s.http_req_rate), (Some(11), Some(11)));
        let s = l.count(b"k", 2, now).unwrap();
        assert_eq!(s.http_req_cnt, Some(13));
        assert!(l.count(b"k", 1, now + Duration::from_millis(100)).is_none());
        // Three counted, to send.
        assert_eq!(l.take_pending(b"k"), 3);
        assert_eq!(l.take_pending(b"k"), 0);
        l.unsend(b"k", 3);
        let due = l.due(now);
        assert_eq!((due.len(), due[0].requests), (1, 3));
        // Counted while the sync was out, then Redis answers with the three it was sent.
        l.count(b"k", 1, now).unwrap();
        l.refresh(b"k".to_vec(), "t", &spec(), snap(13));
        let s = l.count(b"k", 1, Instant::now()).unwrap();
        assert_eq!(s.http_req_cnt, Some(15), "13 in Redis and 2 here");
    }

    #[test]
    fn idle_views_are_forgotten() {
        let l = Ledger::new(Duration::from_millis(10));
        l.refresh(b"k".to_vec(), "t", &spec(), snap(0));
        assert_eq!(l.views.lock().len(), 1);
        assert!(l
            .due(Instant::now() + Duration::from_millis(200))
            .is_empty());
        assert!(l.views.lock().is_empty());
    }

    fn lease(tokens: u64, quota: Option<u64>) -> Lease {
        Lease {
            bucket: b(),
            params: (1, 1, 100),
            tokens,
            remaining: 50,
            reset_after: Duration::from_secs(1),
            at: Instant::now(),
            quota: quota.map(|units| QuotaLease {
                key: b"q1".to_vec(),
                limit: 1_000,
                units,
                used: 400,
                ends: Instant::now() + Duration::from_secs(60),
            }),
        }
    }

    fn b() -> (Rate, u64) {
        (Rate::per_second(10), 100)
    }

    #[test]
    fn only_one_request_fetches_a_buckets_lease() {
        let l = Ledger::new(Duration::from_millis(100));
        let f = l.begin_fetch(b"p").expect("the first fetches");
        assert!(l.begin_fetch(b"p").is_none(), "the second waits");
        assert!(l.begin_fetch(b"q").is_some(), "another bucket is apart");
        drop(f);
        assert!(l.begin_fetch(b"p").is_some(), "a fetch ends when dropped");
    }

    #[test]
    fn a_lease_is_spent_for_its_own_bucket_and_period_only() {
        let l = Ledger::new(Duration::from_millis(100));
        let now = Instant::now();
        l.grant(b"p".to_vec(), lease(2, Some(2)));
        let ask = QuotaAsk {
            key: b"q1",
            limit: 1_000,
            cost: 1,
        };
        let other_period = QuotaAsk {
            key: b"q2",
            limit: 1_000,
            cost: 1,
        };
        assert!(l.spend(b"p", b(), 1, Some(&other_period), now).is_none());
        assert!(l
            .spend(b"p", (Rate::per_second(20), 100), 1, Some(&ask), now)
            .is_none());
        assert!(l.spend(b"p", b(), 1, None, now).is_none());
        let s = l.spend(b"p", b(), 1, Some(&ask), now).unwrap();
        assert_eq!(s.remaining, 51);
        assert_eq!(s.quota.map(|q| (q.0, q.1)), Some((399, 601)));
        assert!(l.spend(b"p", b(), 1, Some(&ask), now).is_some());
        assert!(l.spend(b"p", b(), 1, Some(&ask), now).is_none(), "spent");
        // Too old.
        l.grant(b"p".to_vec(), lease(5, Some(5)));
        let later = now + Duration::from_millis(150);
        assert!(l.spend(b"p", b(), 1, Some(&ask), later).is_none());
        let back = l.expired(later, false);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.tokens, 5);
    }

    #[test]
    fn a_replaced_lease_is_given_back() {
        let l = Ledger::new(Duration::from_millis(100));
        l.grant(b"p".to_vec(), lease(3, None));
        l.grant(b"p".to_vec(), lease(7, None));
        let now = Instant::now();
        let back = l.expired(now, false);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.tokens, 3);
        let back = l.expired(now, true);
        assert_eq!(back[0].1.tokens, 7);
        assert!(l.expired(now, true).is_empty());
    }
}
