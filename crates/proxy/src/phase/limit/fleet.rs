//! The limit phase against the shared store (`limits.store: { redis: … }`): the request's
//! table counts, its plan bucket and its quota in one round trip, so that every replica
//! enforces one global limit. `conn_cur` stays in this process (a connection belongs to one
//! process, and a crashed one would leave a shared count stuck); tags are in Redis too. When the store
//! does not answer within its timeout, [`failed`] counts and logs it, and the caller applies
//! `on_store_error`.

use super::Early;
use crate::exchange::Exchange;
use crate::limits::{Fleet, KeyFacts, RouteLimits, Usage};
use crate::plans::{BucketSet, PlanRt, PlanVerdict};
use crate::snapshot::RouteRt;
use portcullis_config::OnStoreError;
use portcullis_limits::quota::QuotaVerdict;
use portcullis_limits::redis::{Check, PlanOp, QuotaOp, StoreError, TableOp};
use portcullis_limits::{Clock, Key, MonotonicClock, Verdict};
use smallvec::SmallVec;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One round trip: the tables (with `tables`) and the plan (with `plan`).
pub(super) async fn tally(
    x: &mut Exchange<'_>,
    f: &Fleet,
    route: &RouteRt,
    lim: &RouteLimits,
    plan: Option<&(&PlanRt, &BucketSet, Key)>,
    tables: bool,
) -> Result<Early, StoreError> {
    let keys: SmallVec<[Option<Key>; 2]> = if tables {
        let facts = KeyFacts {
            ip: x.conn.peer.ip(),
            identity: x.identity.as_deref(),
            route: &route.id,
            headers: &x.parts.headers,
            trusted: x.trusted,
        };
        let caller = plan.map(|(_, _, k)| k);
        lim.track
            .iter()
            .map(|t| super::key_in(t, &facts, caller, x.conn))
            .collect()
    } else {
        SmallVec::new()
    };
    let ops: SmallVec<[TableOp<'_>; 2]> = lim
        .track
        .iter()
        .zip(&keys)
        .filter_map(|(t, k)| {
            Some(TableOp {
                table: &t.name,
                spec: t.table.spec(),
                key: k.as_ref()?,
                requests: 1,
            })
        })
        .collect();
    let wall = super::wall(x, MonotonicClock::moment_of(x.start));
    let plan_op = plan.map(|(p, set, key)| PlanOp {
        plan: &p.name,
        bucket: if std::ptr::eq(*set, &*p.own) {
            ""
        } else {
            &set.name
        },
        rate: set.limit,
        burst: set.buckets.gcra().burst(),
        key,
        cost: 1,
    });
    let quota_op = plan.and_then(|(p, _, key)| {
        let q = p.quota.as_ref()?;
        let (start, end) = q.quotas.spec().period(wall.div_euclid(1_000_000_000));
        Some(QuotaOp {
            plan: &p.name,
            key,
            period_start: start,
            period_end: end,
            limit: q.quotas.spec().limit,
            cost: 1,
        })
    });
    if ops.is_empty() && plan_op.is_none() {
        x.seen = lim.track.iter().map(|_| None).collect();
        return Ok(Early::NotAsked);
    }
    let start = Instant::now();
    let checked = f
        .store
        .check(&Check {
            tables: &ops,
            plan: plan_op,
            quota: quota_op,
        })
        .await?;
    drop(ops);
    if checked.redis_time.is_some() {
        x.shared
            .metrics
            .limit_store_rtt
            .observe(start.elapsed().as_secs_f64());
    }
    if tables {
        record(x, f, lim, keys, checked.tables);
    }
    let Some((p, _, key)) = plan else {
        return Ok(Early::NotAsked);
    };
    let bucket = checked.plan.unwrap_or(Verdict {
        // The deny cache refused the quota without asking for the bucket.
        allowed: true,
        retry_after: Duration::ZERO,
        remaining: 0,
        reset_after: Duration::ZERO,
    });
    let quota = match (&p.quota, checked.quota) {
        (Some(q), Some(v)) => Some(QuotaVerdict {
            allowed: v.allowed,
            used: v.used,
            limit: q.quotas.spec().limit,
            remaining: v.remaining,
            reset_after: v.reset_after,
            period_start: quota_op.map_or(0, |o| o.period_start),
            table_full: false,
        }),
        _ => None,
    };
    let v = PlanVerdict { bucket, quota };
    if v.allowed() {
        p.daily.record(key, wall, 1);
    }
    Ok(Early::Got(v))
}

/// The request's counts from the store, with `conn_cur` counted in this process; what the
/// end of the response needs goes in `x.usage`, bound for the store.
fn record(
    x: &mut Exchange<'_>,
    f: &Fleet,
    lim: &RouteLimits,
    keys: SmallVec<[Option<Key>; 2]>,
    mut counted: Vec<portcullis_limits::Snapshot>,
) {
    let now = MonotonicClock.now();
    let mut usage = Usage::default();
    usage.fleet = Some(f.store.clone());
    let mut from_store = counted.drain(..);
    x.seen = lim
        .track
        .iter()
        .zip(keys)
        .map(|(t, key)| {
            let key = key?;
            let mut s = from_store.next()?;
            if t.conn {
                s.conn_cur = t.table.conn_start(&key, now).conn_cur;
            }
            if t.conn || t.errs || t.bytes {
                usage.entries.push((t.clone(), key));
            }
            Some(s)
        })
        .collect();
    if !usage.entries.is_empty() {
        x.usage = Some(usage);
    }
}

/// Counts a failed check by its kind and what `on_store_error` does with it, and logs it at
/// most once a second.
pub(super) fn failed(x: &Exchange<'_>, e: &StoreError, then: OnStoreError) {
    let error = match e {
        StoreError::Timeout => "timeout",
        StoreError::Unavailable(_) => "unavailable",
        _ => "error",
    };
    let action = match then {
        OnStoreError::Allow => "allow",
        OnStoreError::Deny => "deny",
        OnStoreError::Local => "local",
    };
    x.shared
        .metrics
        .limit_store_errors
        .get_or_create(&vec![("error", error.into()), ("action", action.into())])
        .inc();
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let second = MonotonicClock.now().as_nanos() / 1_000_000_000 + 1;
    if LOGGED.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(target: "portcullis::limits", error = %e, on_store_error = action, "the shared limit store did not answer");
    }
}
