//! The limit phase: stick-table counters, rules over them, and usage plans, answering 429
//! with `Retry-After` when a caller is over its limits. It runs after authorize, so that it
//! counts only callers that were let in, and sees their identity. A route without `limits`
//! pays one branch here and touches no table.
//!
//! In order, on a route with limits:
//!
//! 1. **Count.** For each tracked table whose key this request has (see
//!    `crate::limits::build_key`; a missing part skips the table and its rules), count the
//!    request and, if the table stores `conn_cur`, hold one until the response ends.
//! 2. **Rules**, in order, on the updated values: the first whose counter is above its
//!    threshold acts. `deny` answers its status (429 by default) with `Retry-After` (a rate
//!    counter's period, rounded up to seconds; 1 for other counters); `tarpit` waits `delay`
//!    first (holding no lock); `mark` sets its header to `1` for the origin and goes on.
//! 3. **Plan.** One GCRA bucket per caller (`provider/subject`, or on a public route the
//!    client address, an IPv6 client's /64): over it, 429 with `Retry-After`. Every answer
//!    on the route carries `RateLimit-Policy` and `RateLimit`.
//!
//! Errors (`http_err_*`) count only what the origin or the client's authentication caused:
//! the origin's 4xx and 5xx (forward's `Done`), and a 401 from identify ([`auth_failed`]).
//! Never a policy denial, never these 429s.

use crate::exchange::{local, Exchange, Flow};
use crate::limits::{
    build_key, ceil_secs, Action, KeyFacts, Part, Queue, RouteLimits, Rule, Usage,
};
use crate::plans::{BucketSet, PlanRt, PlanVerdict};
use portcullis_config::OnStoreError;

mod fleet;
use crate::snapshot::RouteRt;
use http::header::{self, HeaderValue};
use http::StatusCode;
use portcullis_limits::{Clock, Key, Kind, Moment, MonotonicClock};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Before authorize, on a route whose policies read `context.limits`: counts the request in
/// the route's tables, so that the policies (and then the rules) read counters that include
/// it. Other routes count in [`run`].
pub async fn count(x: &mut Exchange<'_>) -> Flow {
    let Some(route) = x.route else {
        return Flow::Next;
    };
    let Some(lim) = route.limits.as_deref() else {
        return Flow::Next;
    };
    let now = MonotonicClock::moment_of(x.start);
    if x.shared.limits.fleet.is_none() {
        count_local(x, route, lim, now, None);
        return Flow::Next;
    }
    // Boxed, as in [`run`].
    match Box::pin(tally(x, route, lim, None, true, now, None)).await {
        Ok(_) => Flow::Next,
        Err(refused) => refused,
    }
}

/// After authorize: counts the request (unless [`count`] did), then the rules, then the plan.
pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let Some(route) = x.route else {
        return Flow::Next;
    };
    let Some(lim) = route.limits.as_deref() else {
        return Flow::Next;
    };
    if x.shared.limits.fleet.is_none() && !lim.waits {
        // Counters in this process and no rule that waits: nothing is awaited, so there is
        // no future to box (every request of such a route).
        return limit_now(x, route, lim);
    }
    // Boxed here and below: the limit phase's futures (a Redis round trip, a queue) inline
    // would size every request's future, limits or not (see `pipeline::handle`).
    Box::pin(limit(x, route, lim)).await
}

/// What the plan said, when it was asked along with the tables.
enum Early {
    /// Not asked: the plan (if any) is checked after the rules.
    NotAsked,
    /// The shared store failed and `on_store_error: allow`: no plan applies.
    Skip,
    Got(PlanVerdict),
}

/// The caller's plan (its plan, the buckets that apply, its key).
type CallerPlan<'r> = Option<(&'r PlanRt, &'r BucketSet, Key)>;

/// What every check does first: adds it to the route's checks metric, removes a client's
/// own values of the headers `mark` rules set, and finds the caller's plan. Also returns the phase's moment: the
/// request's arrival, read once by the pipeline (no clock read of its own; a request is
/// counted a few microseconds early, not late).
fn begin<'r>(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    lim: &'r RouteLimits,
) -> (CallerPlan<'r>, Moment) {
    lim.checks.inc();
    for h in &lim.marks {
        x.parts.headers.remove(h);
    }
    let plan = plan_of(x, route, lim);
    (plan, MonotonicClock::moment_of(x.start))
}

/// The check in this process when no rule waits: tables, rules (deny or mark), then the plan.
fn limit_now(x: &mut Exchange<'_>, route: &RouteRt, lim: &RouteLimits) -> Flow {
    let (plan, now) = begin(x, route, lim);
    if x.seen.is_empty() && !lim.track.is_empty() {
        count_local(x, route, lim, now, plan.as_ref().map(|p| &p.2));
    }
    if let Some(rule) = lim.rules.iter().find(|r| over(x, r)) {
        match &rule.action {
            Action::Mark(h) => mark(x, rule, h),
            // `waits` is false, so no tarpit or queue is here; were one, refusing at once is
            // the safe answer. Listed, so that a new action must be placed.
            Action::Deny | Action::Tarpit(_) | Action::Queue(_) => {
                return refuse_by_rule(x, lim, rule, plan.as_ref(), &Early::NotAsked, now)
            }
        }
    }
    charge(x, lim, plan, Early::NotAsked, now)
}

/// The check with a shared store, or with a rule that waits (tarpit, queue).
async fn limit(x: &mut Exchange<'_>, route: &RouteRt, lim: &RouteLimits) -> Flow {
    let (plan, now) = begin(x, route, lim);
    let counted = !x.seen.is_empty() || lim.track.is_empty();
    // In a fleet, the tables and the plan are one round trip; in one process the plan is
    // charged only after the rules let the request through.
    let fleet = x.shared.limits.fleet.is_some();
    let mut early = Early::NotAsked;
    if !counted || (fleet && plan.is_some()) {
        let ask = if fleet { plan.as_ref() } else { None };
        match tally(
            x,
            route,
            lim,
            ask,
            !counted,
            now,
            plan.as_ref().map(|p| &p.2),
        )
        .await
        {
            Ok(e) => early = e,
            Err(refused) => return refused,
        }
    }
    if let Some(rule) = lim.rules.iter().find(|r| over(x, r)) {
        let refused = match &rule.action {
            Action::Mark(h) => {
                mark(x, rule, h);
                false
            }
            Action::Deny => true,
            // Boxed, as rare paths: inline, their timers would size every check's future.
            Action::Tarpit(d) => {
                // Held only while few are held: a flood from many connections would
                // otherwise hold a socket each for the whole delay. Past the bound, answered
                // at once, as `deny` does.
                if let Some(_held) = Held::take(&TARPITTED, MAX_TARPITTED) {
                    Box::pin(tokio::time::sleep(*d)).await;
                }
                true
            }
            Action::Queue(q) => !Box::pin(queue(x, route, lim, rule, q)).await,
        };
        if refused {
            return refuse_by_rule(x, lim, rule, plan.as_ref(), &early, now);
        }
    }
    charge(x, lim, plan, early, now)
}

/// A `mark` rule acts: its header, set to `1`, goes to the origin.
fn mark(x: &mut Exchange<'_>, rule: &Rule, h: &http::HeaderName) {
    x.parts
        .headers
        .insert(h.clone(), HeaderValue::from_static("1"));
    rule.counter.inc();
}

/// A rule refuses the request: its status and `Retry-After`, with the plan's headers (the
/// plan was not charged, unless the shared store answered for it with the tables).
fn refuse_by_rule(
    x: &mut Exchange<'_>,
    lim: &RouteLimits,
    rule: &Rule,
    plan: Option<&(&PlanRt, &BucketSet, Key)>,
    early: &Early,
    now: Moment,
) -> Flow {
    if let Some((plan, set, key)) = plan {
        let v = match early {
            Early::Got(v) => Some(v.clone()),
            // Not charged: read the caller's bucket for the headers.
            Early::NotAsked => Some(plan.peek(set, key, now, wall(x, now))),
            Early::Skip => None,
        };
        if let Some(v) = v {
            x.ratelimit = Some(plan.headers(set, &v));
        }
    }
    rule.counter.inc();
    let by = &lim.track[rule.table].name;
    refuse(x, rule.status, rule.retry_after.clone(), by)
}

/// The rules let the request through: charges the caller's plan (unless the shared store
/// did with the tables), sets the plan's headers, and refuses a caller over its plan.
fn charge(
    x: &mut Exchange<'_>,
    lim: &RouteLimits,
    plan: CallerPlan<'_>,
    early: Early,
    now: Moment,
) -> Flow {
    let Some((plan, set, key)) = plan else {
        return Flow::Next;
    };
    let v = match early {
        Early::Skip => return Flow::Next,
        Early::Got(v) => v,
        Early::NotAsked => plan.check(set, &key, now, wall(x, now)),
    };
    x.ratelimit = Some(plan.headers(set, &v));
    if v.allowed() {
        return Flow::Next;
    }
    if v.quota.as_ref().is_some_and(|q| q.table_full) {
        quota_full(&plan.name);
    }
    if let Some(p) = &lim.plan {
        if let Some(c) = plan_index(x, p).and_then(|i| p.rejected.get(i)) {
            c.inc();
        }
    }
    let retry = HeaderValue::from(ceil_secs(v.retry_after()).max(1));
    let by = match &plan.quota {
        Some(q) if v.bucket.allowed => format!("plan:{}", q.name),
        _ => format!("plan:{}", set.name),
    };
    refuse(x, StatusCode::TOO_MANY_REQUESTS, retry, &by)
}

/// A quota that tracks as many callers as it can hold refuses new ones (it never forgets a
/// caller's use within a period): logged at most once a second.
fn quota_full(plan: &str) {
    static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let second = MonotonicClock.now().as_nanos() / 1_000_000_000 + 1;
    if LOGGED.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(target: "portcullis::limits", plan, "usage plan `{plan}`: its quota tracks as many callers as it holds; refusing new ones this period");
    }
}

/// The wall clock quotas and daily usage count by, in Unix nanoseconds, at `now` (the
/// request's arrival).
fn wall(x: &Exchange<'_>, now: Moment) -> i64 {
    x.shared.limits.plans.clock.unix_nanos_at(now)
}

/// Counts the request in the route's tables (with `tables`) and, with `plan`, charges the
/// caller's plan: in the shared store in one round trip when there is one, else (or when it
/// fails and `on_store_error: local`) in this process. Fills `x.seen` and `x.usage`.
async fn tally(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    lim: &RouteLimits,
    plan: Option<&(&PlanRt, &BucketSet, Key)>,
    tables: bool,
    now: Moment,
    caller: Option<&Key>,
) -> Result<Early, Flow> {
    if let Some(f) = &x.shared.limits.fleet {
        // Boxed: the Redis round trip's future inline would be moved with every local check.
        match Box::pin(fleet::tally(x, f, route, lim, plan, tables)).await {
            Ok(early) => return Ok(early),
            Err(e) => {
                fleet::failed(x, &e, f.on_error);
                match f.on_error {
                    OnStoreError::Local => {}
                    OnStoreError::Allow => {
                        x.seen = lim.track.iter().map(|_| None).collect();
                        return Ok(Early::Skip);
                    }
                    OnStoreError::Deny => {
                        let retry = HeaderValue::from_static("1");
                        return Err(refuse(x, StatusCode::TOO_MANY_REQUESTS, retry, "store"));
                    }
                }
            }
        }
    }
    if tables {
        count_local(x, route, lim, now, caller);
    }
    Ok(match plan {
        Some((plan, set, key)) => Early::Got(plan.check(set, key, now, wall(x, now))),
        None => Early::NotAsked,
    })
}

/// Counts the request in each tracked table it has a key for ([`key_in`]), in this process.
fn count_local(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    lim: &RouteLimits,
    now: Moment,
    caller: Option<&Key>,
) {
    let facts = KeyFacts {
        ip: x.conn.peer.ip(),
        identity: x.identity.as_deref(),
        route: &route.id,
        headers: &x.parts.headers,
        trusted: x.trusted,
    };
    let mut usage = Usage::default();
    // Filled in place: a snapshot is large, and the exchange holds the vector inline.
    x.seen.clear();
    for (t, read) in lim.track.iter().zip(&lim.read) {
        let Some(key) = key_in(t, &facts, caller, x.conn) else {
            x.seen.push(None);
            continue;
        };
        let s = t.table.with_entry(&key, now, |e| {
            e.add_request();
            if t.conn {
                e.conn_start();
            }
            e.read(*read)
        });
        if t.conn || t.errs || t.bytes {
            usage.entries.push((t.clone(), key));
        }
        x.seen.push(Some(s));
    }
    if !usage.entries.is_empty() {
        x.usage = Some(usage);
    }
}

/// The request's key in table `t`. A table keyed by the principal alone takes the plan's
/// caller key, already built, when there is one, and a table keyed by the client address
/// alone the connection's (the same bytes as [`build_key`] would make).
fn key_in(
    t: &crate::limits::TableRt,
    facts: &KeyFacts<'_>,
    caller: Option<&Key>,
    conn: &crate::edge::conn::ConnInfo,
) -> Option<Key> {
    match (caller, &t.parts[..]) {
        (Some(k), [Part::Principal]) if facts.identity.is_some() => Some(k.clone()),
        (_, [Part::Src]) if facts.ip == conn.peer.ip() => Some(conn.ip_key().clone()),
        _ => build_key(&t.parts, facts),
    }
}

/// Whether the rule's counter, as this request saw it, is above the threshold.
fn over(x: &Exchange<'_>, r: &Rule) -> bool {
    x.seen
        .get(r.table)
        .and_then(Option::as_ref)
        .and_then(|s| s.get(r.kind))
        .is_some_and(|v| v > r.above)
}

/// The plan index of this caller: its assigned plan, else the route's default.
fn plan_index(x: &Exchange<'_>, p: &crate::limits::PlanUse) -> Option<usize> {
    x.identity
        .as_deref()
        .and_then(|id| p.assignment.assigned(id))
        .or(p.default)
}

/// The caller's plan, the buckets that apply to this request, and the caller's key.
fn plan_of<'r>(
    x: &Exchange<'_>,
    route: &RouteRt,
    lim: &'r RouteLimits,
) -> Option<(&'r PlanRt, &'r BucketSet, Key)> {
    let p = lim.plan.as_ref()?;
    let (i, key) = match &x.identity {
        // Both are the identity's alone on this route: the connection's memo keeps them for
        // the identity it verified (see `crate::memo`), so a client that keeps its connection
        // finds them with a comparison instead of building and hashing its key each time.
        Some(id) => match x.conn.memo.caller(x.snap, route, id) {
            Some(found) => found,
            None => {
                let (i, key) = (plan_index(x, p), caller(x));
                x.conn.memo.remember_caller(x.snap, route, id, i, &key);
                (i, key)
            }
        },
        None => (Some(p.default?), caller(x)),
    };
    let plan = p.assignment.plans.get(i?)?;
    let set = plan.buckets_for(&route.id, x.method());
    Some((plan, set, key))
}

/// A `queue` rule: holds the request until its counter is back at the threshold, at most
/// `max_wait`, re-reading it every few milliseconds. A queued request does not hold a
/// `conn_cur` slot while it waits (else the waiters alone would keep the count over), and
/// takes one again, atomically with the check, when it goes on. Returns whether it may go.
async fn queue(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    lim: &RouteLimits,
    rule: &Rule,
    q: &Queue,
) -> bool {
    if q.waiting.fetch_add(1, Ordering::AcqRel) >= q.max_queue {
        q.waiting.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    // From here the request holds a place in the queue, given back however the wait ends:
    // answered, or dropped with its client's connection.
    let _place = Place(&q.waiting);
    let t = &lim.track[rule.table];
    let Some(key) = x.usage.as_ref().and_then(|u| u.key_of(t)).or_else(|| {
        let facts = KeyFacts {
            ip: x.conn.peer.ip(),
            identity: x.identity.as_deref(),
            route: &route.id,
            headers: &x.parts.headers,
            trusted: x.trusted,
        };
        build_key(&t.parts, &facts)
    }) else {
        return true;
    };
    let slot = rule.kind == Kind::ConnCur && t.conn;
    // A queued request does not hold its `conn_cur` slot while it waits; unless it is
    // admitted (which takes one again), the slot is taken back when the wait ends, however
    // it ends, since dropping the request's usage gives one back.
    let mut released = slot.then(|| {
        t.table.conn_end(&key, MonotonicClock.now());
        Released {
            t,
            key: &key,
            settled: false,
        }
    });
    let step = (q.max_wait / 20).clamp(Duration::from_millis(1), Duration::from_millis(10));
    let deadline = tokio::time::Instant::now() + q.max_wait;
    let admitted = loop {
        let now = MonotonicClock.now();
        let ok = if slot {
            admit_conn(t, &key, now, rule.above)
        } else {
            let s = match &x.shared.limits.fleet {
                // In a fleet the counts are in Redis: one read per look, within the check's
                // timeout; a store that fails is answered as `on_store_error` says.
                Some(f) => {
                    let read = f.store.get(&t.name, t.table.spec(), &key);
                    match tokio::time::timeout(f.timeout, read).await {
                        Ok(Ok(s)) => Ok(s),
                        _ => match f.on_error {
                            portcullis_config::OnStoreError::Allow => Err(true),
                            portcullis_config::OnStoreError::Deny => Err(false),
                            portcullis_config::OnStoreError::Local => Ok(t.table.get(&key, now)),
                        },
                    }
                }
                None => Ok(t.table.get(&key, now)),
            };
            match s {
                Ok(s) => s
                    .and_then(|s| s.get(rule.kind))
                    .is_none_or(|v| v <= rule.above),
                Err(verdict) => verdict,
            }
        };
        if ok {
            break true;
        }
        if tokio::time::Instant::now() + step > deadline {
            break false;
        }
        tokio::time::sleep(step).await;
    };
    if admitted {
        q.passed.inc();
        if let Some(r) = &mut released {
            r.settled = true;
        }
    }
    admitted
}

/// The most requests held by `tarpit` rules at once, in the whole process.
pub const MAX_TARPITTED: usize = 1024;
static TARPITTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A request held by a tarpit, counted (in [`TARPITTED`]) until dropped.
struct Held<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Held<'a> {
    /// A place under `max` in `count`, if one is free.
    fn take(count: &'a std::sync::atomic::AtomicUsize, max: usize) -> Option<Held<'a>> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Held(count))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in a queue rule's queue, given back when dropped.
struct Place<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A `conn_cur` slot a queued request gave up while it waits: taken back when dropped,
/// unless the request was admitted (which took one).
struct Released<'a> {
    t: &'a crate::limits::TableRt,
    key: &'a Key,
    settled: bool,
}

impl Drop for Released<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.t.table.conn_start(self.key, MonotonicClock.now());
        }
    }
}

/// Takes a `conn_cur` slot if one is free under `above`, in one step under the entry's lock.
fn admit_conn(t: &crate::limits::TableRt, key: &Key, now: Moment, above: u64) -> bool {
    t.table.with_entry(key, now, |e| {
        let cur = e.snapshot().conn_cur.unwrap_or(0);
        if cur < above {
            e.conn_start();
            true
        } else {
            false
        }
    })
}

/// A plan's caller: `provider/subject`, or when there is no identity the client's address
/// (an IPv6 client's /64, see [`crate::limits::anonymous_caller`]).
fn caller(x: &Exchange<'_>) -> Key {
    match &x.identity {
        Some(id) => {
            let (p, s) = (id.provider.as_bytes(), id.subject.as_bytes());
            let len = p.len() + 1 + s.len();
            // On every request of a route with a plan: joined on the stack when it fits
            // (copies, rather than SmallVec's slower generic extend).
            let mut buf = [0u8; 128];
            if len <= buf.len() {
                buf[..p.len()].copy_from_slice(p);
                buf[p.len()] = b'/';
                buf[p.len() + 1..len].copy_from_slice(s);
                Key::new(&buf[..len])
            } else {
                Key::new(&[p, b"/", s].concat())
            }
        }
        None => x.conn.caller_key().clone(),
    }
}

/// A limit's refusal: `status` with `Retry-After` (and the plan's headers), counted in the
/// route's status classes and logged with what refused it.
fn refuse(x: &mut Exchange<'_>, status: StatusCode, retry: HeaderValue, by: &str) -> Flow {
    let msg = if status == StatusCode::TOO_MANY_REQUESTS {
        "too many requests\n"
    } else {
        "request refused by a limit\n"
    };
    let mut r = local(status, msg, &x.rid);
    r.headers_mut().insert(header::RETRY_AFTER, retry);
    x.rate_headers(r.headers_mut());
    if x.log {
        x.record.limit = by.to_string();
    }
    tracing::debug!(target: "portcullis::limits", request_id = %x.rid, by, status = status.as_u16(), "request refused by a limit");
    // Counted for `limit.exceeded` (a failing shared store is not a limit).
    if by != "store" {
        x.shared.events.limit_refused(by, || refused_key(x, by));
    }
    x.count(status.as_u16());
    x.finish(status.as_u16(), Some(format!("limited by {by}")));
    Flow::Respond(r)
}

/// The key a refusal by `by` is counted under in `limit.exceeded`: the table's key as text
/// (as the admin API shows it), or for a plan the caller (`provider/subject`, or the client
/// address on a public route).
fn refused_key(x: &Exchange<'_>, by: &str) -> String {
    let table = x
        .route
        .and_then(|r| Some((r, r.limits.as_deref()?)))
        .and_then(|(r, lim)| Some((r, lim.track.iter().find(|t| t.name == by)?)));
    if let Some((route, t)) = table {
        let key = x.usage.as_ref().and_then(|u| u.key_of(t)).or_else(|| {
            let facts = KeyFacts {
                ip: x.conn.peer.ip(),
                identity: x.identity.as_deref(),
                route: &route.id,
                headers: &x.parts.headers,
                trusted: x.trusted,
            };
            build_key(&t.parts, &facts)
        });
        if let Some(key) = key {
            return crate::table_keys::key_to_text(&t.parts, &key);
        }
    }
    match &x.identity {
        Some(id) => format!("{}/{}", id.provider, id.subject),
        None => crate::limits::anonymous_caller(x.conn.peer.ip()).to_string(),
    }
}

/// Identify refused the request with 401: an error the client's authentication caused,
/// counted in the route's tables that store errors and whose key needs no identity. Then the
/// route's deny and tarpit rules on such tables apply to the refusal too: once a client is
/// over a rule, a wrong credential gets the same answer as a right one, so the limit is no
/// oracle for a guess. Returns that answer, when a rule acts.
pub async fn auth_failed(x: &mut Exchange<'_>, route: &RouteRt) -> Option<Flow> {
    let lim = route.limits.as_deref()?;
    let now = MonotonicClock.now();
    let facts = KeyFacts {
        ip: x.conn.peer.ip(),
        identity: None,
        route: &route.id,
        headers: &x.parts.headers,
        trusted: x.trusted,
    };
    let mut seen: crate::limits::Seen = Default::default();
    // In a fleet, the shared counts are read within the request path's `timeout` for all
    // the tables together; once the store fails, `on_store_error` answers for the rest
    // (`local`: this process's counts; `allow` and `deny`: none, the 401 stands).
    let shared = x.shared.limits.fleet.as_ref();
    let mut fleet = shared;
    let deadline = tokio::time::Instant::now() + shared.map_or(Duration::ZERO, |f| f.timeout);
    let here = shared.is_none_or(|f| f.on_error == OnStoreError::Local);
    for t in lim.track.iter() {
        let Some(key) = t.anonymous.then(|| build_key(&t.parts, &facts)).flatten() else {
            seen.push(None);
            continue;
        };
        let Some(f) = fleet else {
            seen.push(here.then(|| local_error(t, &key, now)).flatten());
            continue;
        };
        // In a fleet the error goes to Redis with the other end-of-response counts (so it
        // shows within `sync_interval`), and the rules read the shared counts.
        if t.errs {
            f.store.finish(&t.name, t.table.spec(), &key, true, 0, 0);
        }
        let read = tokio::time::timeout_at(deadline, f.store.get(&t.name, t.table.spec(), &key));
        seen.push(
            match read
                .await
                .unwrap_or(Err(portcullis_limits::StoreError::Timeout))
            {
                Ok(s) => s,
                Err(e) => {
                    fleet::failed(x, &e, f.on_error);
                    fleet = None;
                    here.then(|| local_error(t, &key, now)).flatten()
                }
            },
        );
    }
    let rule = lim.rules.iter().find(|r| {
        matches!(r.action, Action::Deny | Action::Tarpit(_))
            && seen
                .get(r.table)
                .and_then(Option::as_ref)
                .and_then(|s| s.get(r.kind))
                .is_some_and(|v| v > r.above)
    })?;
    if let Action::Tarpit(d) = rule.action {
        // Bounded as in `limit`: past the bound, refused at once.
        if let Some(_held) = Held::take(&TARPITTED, MAX_TARPITTED) {
            tokio::time::sleep(d).await;
        }
    }
    rule.counter.inc();
    let by = lim.track[rule.table].name.clone();
    Some(refuse(x, rule.status, rule.retry_after.clone(), &by))
}

/// A 401 counted in this process's table `t` (when it stores errors), and its counters.
fn local_error(
    t: &crate::limits::TableRt,
    key: &Key,
    now: Moment,
) -> Option<portcullis_limits::Snapshot> {
    if t.errs {
        t.table.record_error(key, now);
    }
    t.table.get(key, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{KeyFacts, Part};
    use crate::testkit::{describe, is_next, response, Kit};
    use http::Request;
    use portcullis_identity::{AuthMethod, Identity};
    use std::time::{Duration, Instant};

    const CONFIG: &str = r#"
identity:
  providers:
    - { name: dev, kind: dev_issuer }
stick_tables:
  - { name: per_ip, key: src, size: 1000, store: ["http_req_rate(10s)", http_err_cnt, conn_cur] }
  - { name: per_tenant, key: "header:x-tenant", size: 100, store: [http_req_cnt] }
  - { name: per_user, key: principal, size: 100, store: [http_req_cnt, http_err_cnt] }
  - { name: slow, key: src, size: 100, store: [http_req_cnt] }
  - { name: warn, key: src, size: 100, store: [http_req_cnt] }
  - { name: guesses, key: src, size: 100, store: [http_err_cnt] }
usage_plans:
  - { name: agents, rate: 5/s, burst: 3 }
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - name: deny
    match: { path_prefix: /deny }
    backend: b
    public: true
    limits:
      track: [per_ip, per_tenant]
      rules:
        - { table: per_ip, counter: "http_req_rate(10s)", above: 2 }
        - { table: per_tenant, counter: http_req_cnt, above: 0, status: 503 }
  - name: tarpit
    match: { path_prefix: /tarpit }
    backend: b
    public: true
    limits:
      track: [slow]
      rules: [{ table: slow, counter: http_req_cnt, above: 0, action: tarpit, delay: 50ms }]
  - name: mark
    match: { path_prefix: /mark }
    backend: b
    public: true
    limits:
      track: [warn]
      rules: [{ table: warn, counter: http_req_cnt, above: 1, action: mark, header: X-Rate-Warn }]
  - name: api
    match: { path_prefix: /api }
    backend: b
    auth: [dev]
    allow: [{ groups: [eng] }]
    limits: { track: [per_user, per_ip], plan: agents }
  - name: login
    match: { path_prefix: /login }
    backend: b
    auth: [dev]
    allow: [{ groups: [eng] }]
    limits:
      track: [guesses]
      rules: [{ table: guesses, counter: http_err_cnt, above: 2 }]
  - { name: plain, match: { path_prefix: / }, backend: b, public: true }
"#;

    fn get(path: &str) -> http::request::Builder {
        Request::get(path).header("host", "example.com")
    }

    /// Runs identify and authorize (both must go on), then the limit phase.
    async fn limited<'k>(kit: &'k Kit, req: http::request::Builder) -> (Exchange<'k>, Flow) {
        let mut x = kit.routed(req).await;
        let f = crate::phase::identify::run(&mut x).await;
        assert!(is_next(&f), "identify: {}", describe(&f));
        if x.route.is_some_and(|r| r.reads_limits) {
            assert!(is_next(&count(&mut x).await));
        }
        let f = crate::phase::authorize::run(&mut x).await;
        assert!(is_next(&f), "authorize: {}", describe(&f));
        let f = run(&mut x).await;
        (x, f)
    }

    fn bearer(kit: &Kit, user: &str, groups: &[&str]) -> String {
        format!("Bearer {}", kit.token("dev", user, groups))
    }

    fn count_of(kit: &Kit, table: &str, key: &Key) -> Option<portcullis_limits::Snapshot> {
        let t = kit.shared.limits.get(table).expect("the table");
        t.table.get(key, MonotonicClock.now())
    }

    fn localhost() -> Key {
        Key::from(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    #[test]
    fn keys_are_built_from_each_part_and_tuples_join_them() {
        let id = Identity {
            provider: "agents".into(),
            method: AuthMethod::ApiKey,
            subject: "key-7".into(),
            user: "bot".into(),
            email: None,
            groups: vec![],
            claims: serde_json::json!({ "org": { "id": "acme" }, "tier": 3 }),
            expires_at: None,
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("t1"));
        let f = KeyFacts {
            ip: "192.0.2.77".parse().unwrap(),
            identity: Some(&id),
            route: "default/api",
            headers: &headers,
            trusted: true,
        };
        let key = |parts: &[&str]| {
            let parts: Vec<Part> = parts.iter().map(|p| Part::parse(p).unwrap()).collect();
            build_key(&parts, &f).map(|k| k.as_bytes().to_vec())
        };
        assert_eq!(key(&["src"]).unwrap(), [192, 0, 2, 77]);
        assert_eq!(key(&["src/24"]).unwrap(), [192, 0, 2, 0]);
        assert_eq!(key(&["src/64"]).unwrap(), [192, 0, 2, 77], "v4 keeps /32");
        assert_eq!(key(&["principal"]).unwrap(), b"agents/key-7");
        assert_eq!(key(&["api_key"]).unwrap(), b"key-7");
        assert_eq!(key(&["route"]).unwrap(), b"default/api");
        assert_eq!(key(&["header:X-Tenant"]).unwrap(), b"t1");
        assert_eq!(key(&["claim:org.id"]).unwrap(), b"acme");
        assert_eq!(key(&["claim:tier"]).unwrap(), b"3");
        assert_eq!(
            key(&["principal", "header:x-tenant"]).unwrap(),
            b"agents/key-7\x1ft1"
        );
        // Missing parts: no key, so the table is skipped.
        assert_eq!(key(&["header:x-other"]), None);
        // A header that says where the request came from is believed from a trusted proxy
        // only; from anyone else the part is the peer's address, as the origin is told.
        let mut fwd = headers.clone();
        fwd.insert("cf-connecting-ip", HeaderValue::from_static("6.6.6.6"));
        fwd.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        for (trusted, want) in [(true, &b"6.6.6.6"[..]), (false, &[192, 0, 2, 77][..])] {
            let g = KeyFacts {
                headers: &fwd,
                trusted,
                ..f
            };
            for h in ["header:CF-Connecting-IP", "header:x-forwarded-for"] {
                let k = build_key(&[Part::parse(h).unwrap()], &g).unwrap();
                assert_eq!(k.as_bytes(), want, "{h} trusted={trusted}");
            }
            let g = KeyFacts {
                headers: &headers,
                trusted,
                ..f
            };
            let k = build_key(&[Part::parse("header:x-real-ip").unwrap()], &g);
            assert_eq!(k.is_some(), !trusted, "absent from a trusted proxy: no key");
        }
        assert_eq!(key(&["claim:nope"]), None);
        let jwt = Identity {
            method: AuthMethod::Jwt,
            ..id.clone()
        };
        let f = KeyFacts {
            identity: Some(&jwt),
            ..f
        };
        let parts = [Part::ApiKey];
        assert!(build_key(&parts, &f).is_none(), "not an API key");
        let f = KeyFacts {
            identity: None,
            ..f
        };
        assert!(build_key(&[Part::Principal], &f).is_none());
        assert!(build_key(&[Part::Src, Part::Principal], &f).is_none());
        let v6 = KeyFacts {
            ip: "2001:db8:1:2:3:4:5:6".parse().unwrap(),
            ..f
        };
        let k = build_key(&[Part::SrcMask(64)], &v6).unwrap();
        assert_eq!(k.as_bytes()[..8], [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        assert_eq!(k.as_bytes()[8..], [0; 8]);
    }

    #[tokio::test]
    async fn a_rule_denies_above_its_threshold_with_429_and_retry_after() {
        let kit = Kit::new(CONFIG).await;
        for _ in 0..2 {
            let (_, f) = limited(&kit, get("/deny")).await;
            assert!(is_next(&f), "{}", describe(&f));
        }
        let (x, f) = limited(&kit, get("/deny")).await;
        let r = response(f);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "10");
        assert_eq!(r.headers()["x-request-id"], &*x.rid);
        assert!(r.headers().get("ratelimit").is_none(), "no plan here");
        assert_eq!(
            kit.metric("portcullis_limit_rejections_total{route=\"default/deny\",by=\"per_ip\"}"),
            1.0
        );
        // The two let through were never answered here (no forward phase): they are in the
        // log as 499, before the refusal.
        let log = kit.access_log(3);
        assert_eq!(log[0]["status"], 499);
        assert_eq!(log[2]["status"], 429);
        assert_eq!(log[2]["limit"], "per_ip");
        // The refused request was counted too, and its conn_cur ended with the exchange.
        drop(x);
        let s = count_of(&kit, "per_ip", &localhost()).unwrap();
        assert_eq!(s.http_req_rate, Some(3));
        assert_eq!(s.conn_cur, Some(0));
        assert_eq!(s.http_err_cnt, Some(0), "a 429 of ours is no error");
    }

    #[tokio::test]
    async fn a_rule_on_a_header_key_answers_its_status_and_a_missing_header_skips_it() {
        let kit = Kit::new(CONFIG).await;
        // No X-Tenant: the table is skipped, so its rule (above 0) never applies.
        let (_, f) = limited(&kit, get("/deny")).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert!(kit
            .shared
            .limits
            .get("per_tenant")
            .unwrap()
            .table
            .is_empty());
        let (_, f) = limited(&kit, get("/deny").header("x-tenant", "t1")).await;
        let r = response(f);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1", "not a rate: 1s");
    }

    #[tokio::test]
    async fn a_tarpit_waits_then_denies() {
        let kit = Kit::new(CONFIG).await;
        let t0 = Instant::now();
        let (_, f) = limited(&kit, get("/tarpit")).await;
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t0.elapsed()
        );
        let r = response(f);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn a_mark_sets_the_header_for_the_origin_and_goes_on() {
        let kit = Kit::new(CONFIG).await;
        // A client cannot mark itself, nor hide a mark.
        let (x, f) = limited(&kit, get("/mark").header("x-rate-warn", "forged")).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert!(x.parts.headers.get("x-rate-warn").is_none());
        // The second is above 1.
        let (x, f) = limited(&kit, get("/mark")).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert_eq!(x.parts.headers["x-rate-warn"], "1");
        assert_eq!(
            kit.metric("portcullis_limit_marks_total{route=\"default/mark\",table=\"warn\"}"),
            1.0
        );
    }

    #[tokio::test]
    async fn a_plan_allows_the_burst_then_429_with_the_ratelimit_headers() {
        let kit = Kit::new(CONFIG).await;
        let alice = bearer(&kit, "alice", &["eng"]);
        for left in (0..3).rev() {
            let (x, f) = limited(&kit, get("/api/x").header("authorization", &alice)).await;
            assert!(is_next(&f), "{}", describe(&f));
            let h = x.ratelimit.as_ref().expect("the plan's headers");
            assert_eq!(h[0], "\"agents\";q=3;w=1");
            let rl = h[1].to_str().unwrap();
            assert!(rl.starts_with(&format!("\"agents\";r={left};t=")), "{rl}");
        }
        let (_, f) = limited(&kit, get("/api/x").header("authorization", &alice)).await;
        let r = response(f);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()["ratelimit-policy"], "\"agents\";q=3;w=1");
        assert_eq!(r.headers()["ratelimit"], "\"agents\";r=0;t=1");
        assert_eq!(
            kit.metric(
                "portcullis_limit_rejections_total{route=\"default/api\",by=\"plan:agents\"}"
            ),
            1.0
        );
        // Another principal has a bucket of its own.
        let bob = bearer(&kit, "bob", &["eng"]);
        let (_, f) = limited(&kit, get("/api/x").header("authorization", &bob)).await;
        assert!(is_next(&f), "{}", describe(&f));
    }

    #[tokio::test]
    async fn a_route_without_limits_touches_no_table() {
        let kit = Kit::new(CONFIG).await;
        assert!(kit
            .snap
            .routes
            .iter()
            .any(|r| &*r.id == "default/plain" && r.limits.is_none()));
        for _ in 0..5 {
            let (x, f) = limited(&kit, get("/other").header("x-tenant", "t1")).await;
            assert_eq!(x.route.map(|r| &*r.id), Some("default/plain"));
            assert!(is_next(&f), "{}", describe(&f));
            assert!(x.usage.is_none() && x.ratelimit.is_none());
        }
        for t in ["per_ip", "per_tenant", "per_user", "slow", "warn"] {
            assert!(kit.shared.limits.get(t).unwrap().table.is_empty(), "{t}");
        }
    }

    #[tokio::test]
    async fn origin_errors_count_and_policy_denials_do_not() {
        let kit = Kit::new(CONFIG).await;
        // Denied by policy: 403, never counted.
        let mallory = bearer(&kit, "mallory", &["sales"]);
        let mut x = kit
            .routed(get("/api/x").header("authorization", &mallory))
            .await;
        assert!(is_next(&crate::phase::identify::run(&mut x).await));
        let r = response(crate::phase::authorize::run(&mut x).await);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(count_of(&kit, "per_user", &Key::from("dev/mallory")).is_none());
        assert!(count_of(&kit, "per_ip", &localhost()).is_none());

        // A 401 counts in the tables keyed without identity.
        let mut x = kit.routed(get("/api/x")).await;
        let r = response(crate::phase::identify::run(&mut x).await);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let s = count_of(&kit, "per_ip", &localhost()).unwrap();
        assert_eq!(s.http_err_cnt, Some(1));
        assert!(kit.shared.limits.get("per_user").unwrap().table.is_empty());

        // An origin's 5xx counts in every table that stores errors.
        let alice = bearer(&kit, "alice", &["eng"]);
        let (mut x, f) = limited(&kit, get("/api/x").header("authorization", &alice)).await;
        assert!(is_next(&f));
        let usage = x.usage.take().expect("usage to finish");
        usage.finish(502, 10);
        let s = count_of(&kit, "per_user", &Key::from("dev/alice")).unwrap();
        assert_eq!((s.http_req_cnt, s.http_err_cnt), (Some(1), Some(1)));
        assert_eq!(
            count_of(&kit, "per_ip", &localhost()).unwrap().conn_cur,
            Some(1)
        );
        drop(usage);
        let s = count_of(&kit, "per_ip", &localhost()).unwrap();
        assert_eq!((s.http_err_cnt, s.conn_cur), (Some(2), Some(0)));
    }

    /// Once a client is over a rule on failed logins, a wrong credential and a right one get
    /// the same 429: the limit tells a guesser nothing.
    #[tokio::test]
    async fn over_a_login_rule_a_wrong_and_a_right_credential_get_the_same_answer() {
        let kit = Kit::new(CONFIG).await;
        let wrong = || get("/login/x").header("authorization", "Bearer not-a-token");
        for _ in 0..2 {
            let mut x = kit.routed(wrong()).await;
            let r = response(crate::phase::identify::run(&mut x).await);
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        // The third error puts the client over the rule (above 2): from now on it acts on
        // every answer, this one included.
        let mut x = kit.routed(wrong()).await;
        let r = response(crate::phase::identify::run(&mut x).await);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let alice = bearer(&kit, "alice", &["eng"]);
        let (_x, f) = limited(&kit, get("/login/x").header("authorization", &alice)).await;
        assert_eq!(response(f).status(), StatusCode::TOO_MANY_REQUESTS);
    }

    const PLANS: &str = r#"
identity:
  providers:
    - { name: dev, kind: dev_issuer }
stick_tables:
  - { name: per_user, key: principal, size: 100, store: [http_req_cnt, "http_req_rate(10s)", tags] }
  - { name: slots, key: src, size: 100, store: [conn_cur] }
usage_plans:
  - name: basic
    rate: 1/m
    burst: 1
  - name: gold
    rate: 1/m
    burst: 4
    assign: { groups: [gold] }
    overrides:
      - { methods: [POST], rate: 1/m, burst: 2 }
  - name: vip
    rate: 1/m
    burst: 6
    assign: { principals: [dev/carol] }
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - name: api
    match: { path_prefix: /api }
    backend: b
    auth: [dev]
    allow: [{ groups: [eng] }]
    limits: { plan: basic }
  - name: watched
    match: { path_prefix: /watched }
    backend: b
    auth: [dev]
    policies: [watch.cedar]
    limits: { track: [per_user] }
  - name: queued
    match: { path_prefix: /queued }
    backend: b
    public: true
    limits:
      track: [slots]
      rules: [{ table: slots, counter: conn_cur, above: 1, action: queue, max_wait: 400ms, max_queue: 1 }]
"#;

    const WATCH: &str = r#"
permit(principal, action, resource);
forbid(principal, action, resource) when { context.limits.per_user.http_req_cnt > 2 };
forbid(principal, action, resource) when { context.limits.per_user.tags.contains("blocked") };
"#;

    async fn plans_kit() -> Kit {
        Kit::with_files(
            &format!("{}{PLANS}", crate::testkit::HEAD),
            &[("watch.cedar", WATCH)],
        )
        .await
    }

    /// Requests until the first refusal: how many got through.
    async fn admitted(kit: &Kit, req: impl Fn() -> http::request::Builder) -> usize {
        for n in 0..20 {
            let (_, f) = limited(kit, req()).await;
            if !is_next(&f) {
                assert_eq!(response(f).status(), StatusCode::TOO_MANY_REQUESTS);
                return n;
            }
        }
        panic!("never refused");
    }

    #[tokio::test]
    async fn a_caller_gets_its_assigned_plan_else_the_routes() {
        let kit = plans_kit().await;
        let alice = bearer(&kit, "alice", &["eng"]);
        let gold = bearer(&kit, "bob", &["eng", "gold"]);
        let carol = bearer(&kit, "carol", &["eng", "gold"]);
        let on = |t: &str| {
            let t = t.to_string();
            move || get("/api/x").header("authorization", t.clone())
        };
        assert_eq!(
            admitted(&kit, on(&alice)).await,
            1,
            "the route's default plan"
        );
        assert_eq!(admitted(&kit, on(&gold)).await, 4, "the plan of a group");
        assert_eq!(
            admitted(&kit, on(&carol)).await,
            6,
            "a principal's plan comes first"
        );
        // Refused: the answer carries the plan's headers.
        let (_, f) = limited(&kit, get("/api/x").header("authorization", &carol)).await;
        assert_eq!(
            response(f).headers()["ratelimit-policy"],
            "\"vip\";q=6;w=360"
        );
    }

    /// The connection's memo keeps the plan and key of the identity it verified; callers
    /// that take turns on one connection are each charged to their own plan and bucket.
    #[tokio::test]
    async fn the_connections_memo_keeps_the_plan_of_its_own_identity_only() {
        let kit = plans_kit().await;
        let alice = bearer(&kit, "alice", &["eng"]);
        let carol = bearer(&kit, "carol", &["eng", "gold"]);
        let on = |t: &str| get("/api/x").header("authorization", t);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (x, f) = limited(&kit, on(&alice)).await;
            seen.push(is_next(&f));
            let (route, id) = (x.route.unwrap(), x.identity.clone().unwrap());
            let basic = route
                .limits
                .as_ref()
                .unwrap()
                .plan
                .as_ref()
                .unwrap()
                .default;
            assert!(basic.is_some());
            // From the second request on, the token is the connection's memo's.
            if seen.len() > 1 {
                let memo = kit.conn.memo.caller(&kit.snap, route, &id);
                assert_eq!(memo, Some((basic, Key::from("dev/alice"))));
            }
        }
        assert_eq!(seen, [true, false, false], "basic: a burst of 1");
        for _ in 0..6 {
            let (x, f) = limited(&kit, on(&carol)).await;
            assert!(is_next(&f), "{}", describe(&f));
            assert_eq!(x.ratelimit.as_ref().unwrap()[0], "\"vip\";q=6;w=360");
            let (_, f) = limited(&kit, on(&alice)).await;
            let r = response(f);
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(r.headers()["ratelimit-policy"], "\"basic\";q=1;w=60");
        }
        let (_, f) = limited(&kit, on(&carol)).await;
        assert_eq!(response(f).status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn an_override_has_its_own_buckets_for_its_methods() {
        let kit = plans_kit().await;
        let gold = bearer(&kit, "bob", &["eng", "gold"]);
        let post = || {
            Request::post("/api/x")
                .header("host", "example.com")
                .header("authorization", gold.clone())
        };
        assert_eq!(admitted(&kit, post).await, 2);
        let (_, f) = limited(&kit, post()).await;
        assert_eq!(
            response(f).headers()["ratelimit-policy"],
            "\"gold.1\";q=2;w=120"
        );
        // GET still has the plan's own burst.
        let get = || get("/api/x").header("authorization", gold.clone());
        assert_eq!(admitted(&kit, get).await, 4);
    }

    #[tokio::test]
    async fn a_policy_reads_the_counters_and_denies_at_the_threshold() {
        let kit = plans_kit().await;
        let alice = bearer(&kit, "alice", &[]);
        let mut decisions = Vec::new();
        for _ in 0..4 {
            let mut x = kit
                .routed(get("/watched").header("authorization", &alice))
                .await;
            assert!(is_next(&crate::phase::identify::run(&mut x).await));
            assert!(is_next(&count(&mut x).await));
            let f = crate::phase::authorize::run(&mut x).await;
            decisions.push(if is_next(&f) { "allow" } else { "deny" });
        }
        // Counted before the decision: the third request is the one over 2.
        assert_eq!(decisions, ["allow", "allow", "deny", "deny"]);
        // Another principal has counters of its own; a tag set at run time is read too.
        let bob = bearer(&kit, "bob", &[]);
        let key = Key::from("dev/bob");
        let table = kit.shared.limits.get("per_user").unwrap();
        let mut x = kit
            .routed(get("/watched").header("authorization", &bob))
            .await;
        assert!(is_next(&crate::phase::identify::run(&mut x).await));
        assert!(is_next(&count(&mut x).await));
        assert!(is_next(&crate::phase::authorize::run(&mut x).await));
        table
            .table
            .set_tag(&key, MonotonicClock.now(), "blocked")
            .unwrap();
        let mut x = kit
            .routed(get("/watched").header("authorization", &bob))
            .await;
        assert!(is_next(&crate::phase::identify::run(&mut x).await));
        assert!(is_next(&count(&mut x).await));
        assert!(!is_next(&crate::phase::authorize::run(&mut x).await));
    }

    #[tokio::test]
    async fn a_route_computes_the_counters_its_rules_read_or_all_for_its_policies() {
        use portcullis_limits::Kinds;
        fn read(kit: &Kit, id: &str) -> Vec<Kinds> {
            let r = kit.snap.routes.iter().find(|r| &*r.id == id).unwrap();
            r.limits.as_deref().unwrap().read.clone()
        }
        // A rule on `http_req_rate(10s)` of a table that stores three counters: only it.
        let kit = Kit::new(CONFIG).await;
        let rate = Kinds::NONE.with(Kind::HttpReqRate);
        let cnt = Kinds::NONE.with(Kind::HttpReqCnt);
        assert_eq!(read(&kit, "default/deny"), [rate, cnt]);
        let (x, f) = limited(&kit, get("/deny")).await;
        assert!(is_next(&f), "{}", describe(&f));
        let s = x.seen[0].as_ref().unwrap();
        assert_eq!(
            (s.http_req_rate, s.http_err_cnt, s.conn_cur),
            (Some(1), None, None)
        );
        // The table still counts what it stores (here, the request holds a `conn_cur`).
        assert_eq!(
            count_of(&kit, "per_ip", &localhost()).unwrap().conn_cur,
            Some(1)
        );
        // Policies that read `context.limits`: every counter.
        let kit = plans_kit().await;
        assert_eq!(read(&kit, "default/watched"), [Kinds::ALL]);
        let alice = bearer(&kit, "alice", &[]);
        let (x, _) = limited(&kit, get("/watched").header("authorization", &alice)).await;
        let s = x.seen[0].as_ref().unwrap();
        assert_eq!((s.http_req_cnt, s.http_req_rate), (Some(1), Some(1)));
    }

    #[tokio::test]
    async fn a_queue_holds_a_request_until_a_slot_frees() {
        let kit = plans_kit().await;
        let (first, f) = limited(&kit, get("/queued")).await;
        assert!(is_next(&f));
        // The second waits for the first's slot, which frees after 100 ms.
        let release = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
        };
        let start = Instant::now();
        let ((second, f), ()) = tokio::join!(limited(&kit, get("/queued")), release);
        assert!(is_next(&f), "{}", describe(&f));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(90), "{waited:?}");
        assert_eq!(
            count_of(&kit, "slots", &localhost()).unwrap().conn_cur,
            Some(1)
        );
        // The queue holds one: with one waiting, the next is refused at once; the waiter
        // gives up after max_wait.
        let start = Instant::now();
        let (waiter, other) = tokio::join!(limited(&kit, get("/queued")), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            limited(&kit, get("/queued")).await
        });
        assert_eq!(response(other.1).status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response(waiter.1).status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(start.elapsed() >= Duration::from_millis(390));
        drop((second, waiter.0, other.0));
        assert_eq!(
            count_of(&kit, "slots", &localhost()).unwrap().conn_cur,
            Some(0),
            "no slot leaks"
        );
    }

    /// Tarpits hold at most MAX_TARPITTED requests at once; past that, none is held (and
    /// each place is given back when its request goes).
    #[test]
    fn tarpits_hold_a_bounded_number_of_requests() {
        let count = std::sync::atomic::AtomicUsize::new(0);
        let held: Vec<Held> = std::iter::from_fn(|| Held::take(&count, 3))
            .take(10)
            .collect();
        assert_eq!(held.len(), 3);
        assert!(Held::take(&count, 3).is_none(), "over the bound");
        drop(held);
        assert!(Held::take(&count, 3).is_some(), "given back");
    }

    /// A queued request whose client goes away (its future dropped mid-wait) gives back its
    /// place in the queue, and takes no `conn_cur` slot from the count: the queue stays
    /// open to others, and the concurrency limit still holds.
    #[tokio::test]
    async fn a_waiter_that_goes_away_gives_back_its_place_and_no_slot() {
        let kit = plans_kit().await;
        let (first, f) = limited(&kit, get("/queued")).await;
        assert!(is_next(&f));
        for _ in 0..3 {
            // Waits (the slot is taken), then its client leaves.
            let gone =
                tokio::time::timeout(Duration::from_millis(50), limited(&kit, get("/queued")));
            assert!(gone.await.is_err(), "it was waiting");
        }
        assert_eq!(
            count_of(&kit, "slots", &localhost()).unwrap().conn_cur,
            Some(1),
            "only the first holds a slot"
        );
        // The queue (of one) is free for the next waiter, which gets the slot when it frees.
        let release = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(first);
        };
        let ((second, f), ()) = tokio::join!(limited(&kit, get("/queued")), release);
        assert!(is_next(&f), "{}", describe(&f));
        // And the limit holds: with the second in, a third waits and is refused.
        let (third, f) = limited(&kit, get("/queued")).await;
        assert_eq!(response(f).status(), StatusCode::TOO_MANY_REQUESTS);
        drop((second, third));
        assert_eq!(
            count_of(&kit, "slots", &localhost()).unwrap().conn_cur,
            Some(0)
        );
    }
}
#[cfg(test)]
mod future_size {
    use crate::testkit::future_size as size;

    /// Every request of a route with limits moves this future into a box: the Redis round
    /// trip, a tarpit's timer and a queue are boxed where they are awaited, so that a check
    /// in the process moves a few hundred bytes, not the 1.1 KiB it was with them inline.
    #[test]
    fn a_check_moves_a_small_future() {
        let n = size(super::limit);
        assert!(n <= 512, "the limit phase's future grew to {n} bytes");
    }
}
