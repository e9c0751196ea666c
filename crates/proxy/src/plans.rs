//! Usage plans at run time: each plan's buckets (one GCRA state per caller), its per-route
//! and per-method overrides (buckets of their own), and which plan a caller is on.
//!
//! * **Buckets outlive reloads**, by plan name: a plan whose rate and burst are unchanged
//!   keeps every caller's bucket (so a reload hands nobody a fresh burst), and so does each
//!   override whose routes, methods, rate and burst are unchanged.
//! * **Assignment**, first that applies: the plan an API key's entry names (its `plan`
//!   claim), the plan the claim `limits.plan_claim` names, a plan that lists the caller's
//!   principal, a plan that lists one of its groups, and then the route's `limits.plan`. A
//!   name that is no plan falls through to the next way.
//! * **Quotas** (per day, week or month) and **daily usage** are counted in memory and
//!   written to the embedded store (`state_dir`) by [`flush`], every `limits.sync_interval`
//!   and at shutdown; a plan's counts are read back from it when the plan is first built, so
//!   a restart hands out no fresh quota. A crash loses at most one interval of counting.
//! * **Headers**: `RateLimit-Policy` is fixed per plan (and override); `RateLimit` is made
//!   per answer from the verdict (draft-ietf-httpapi-ratelimit-headers). A plan with a
//!   quota names two policies: its buckets' and `<plan>-<day|week|month>`.
//!
//! The limit phase reads this module; it knows nothing of the exchange.

use http::{HeaderValue, Method};
use parking_lot::Mutex;
use portcullis_config::{PlanOverride, UsagePlan};
use portcullis_identity::{AuthMethod, Identity};
use portcullis_limits::quota::{Per, QuotaSpec, QuotaVerdict, Quotas, ResetAt, StoredKey};
use portcullis_limits::redis::usage::{UsageBatch, UsageRecord};
use portcullis_limits::wall::WallClock;
use portcullis_limits::{Buckets, DailyUsage, Gcra, Key, Verdict};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// The most callers a bucket set keeps at once (about 60 bytes each). Callers whose bucket
/// has refilled are forgotten first, which changes no verdict; see
/// [`portcullis_limits::buckets`].
pub const PLAN_KEYS: usize = 1_000_000;

/// One set of buckets: a plan's own, or an override's.
pub struct BucketSet {
    /// The name in the headers: the plan's, or `plan.N` for its N-th override.
    pub name: String,
    pub buckets: Buckets,
    /// `RateLimit-Policy`.
    pub policy: HeaderValue,
    /// The start of every `RateLimit` value: `"<name>";r=`.
    prefix: Box<[u8]>,
    rate: (u64, Duration),
    /// The rate, as the shared store takes it.
    pub limit: portcullis_limits::Rate,
    /// This set's own number in this process, for [`LAST_HEADER`] (an address could be
    /// reused by a set made after this one is dropped).
    id: u64,
}

/// The sets made so far in this process, for [`BucketSet::id`].
static SETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The last `RateLimit` value this worker thread made: for which set, remaining and
    /// seconds. Callers well within their rate (nearly all of them) find their bucket nearly
    /// full, so answer after answer says the same; the value is then shared (a reference
    /// count) instead of formatted, checked and allocated again (about 400 instructions of
    /// the plan's check, measured with `bench/instructions.sh`).
    static LAST_HEADER: std::cell::RefCell<Option<(u64, u64, u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

impl BucketSet {
    fn new(name: String, rate: (u64, Duration), burst: u64) -> Result<BucketSet, String> {
        let bad = |e: portcullis_limits::Error| format!("usage plan `{name}`: {e}");
        let limit = portcullis_limits::Rate::new(rate.0, rate.1).map_err(bad)?;
        let gcra = Gcra::new(limit, burst).map_err(bad)?;
        // The window the burst refills in: burst / rate.
        let window = rate.1.as_nanos() * u128::from(burst) / u128::from(rate.0.max(1));
        let w = u64::try_from(window.div_ceil(1_000_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let policy = HeaderValue::from_str(&format!("\"{name}\";q={burst};w={w}"))
            .map_err(|e| format!("usage plan `{name}`: {e}"))?;
        Ok(BucketSet {
            prefix: format!("\"{name}\";r=").into_bytes().into(),
            name,
            buckets: Buckets::new(gcra, PLAN_KEYS),
            policy,
            rate,
            limit,
            id: SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn same(&self, rate: (u64, Duration), burst: u64) -> bool {
        self.rate == rate && self.buckets.gcra().burst() == burst
    }

    /// The `RateLimit` header for a verdict: `"<name>";r=<remaining>;t=<seconds until the
    /// bucket is full>`.
    pub fn header(&self, v: &Verdict) -> HeaderValue {
        let (remaining, secs) = (v.remaining, ceil_secs(v.reset_after));
        LAST_HEADER.with_borrow_mut(|last| {
            if let Some((id, r, t, value)) = last {
                if (*id, *r, *t) == (self.id, remaining, secs) {
                    return value.clone();
                }
            }
            let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
            let value = join(&[
                &self.prefix,
                r.format(remaining).as_bytes(),
                b";t=",
                t.format(secs).as_bytes(),
            ]);
            *last = Some((self.id, remaining, secs, value.clone()));
            value
        })
    }
}

/// A header value from `parts`. On every answer of a limited route: joined on the stack, then
/// copied once into the value (one allocation of the exact length; a `Vec` with room to
/// spare would take a second one when the value takes it over, and `format!` more).
fn join(parts: &[&[u8]]) -> HeaderValue {
    let mut buf = [0u8; 192];
    let mut len = 0;
    for p in parts {
        let Some(to) = buf.get_mut(len..len + p.len()) else {
            // Names too long for the buffer.
            return HeaderValue::from_bytes(&parts.concat())
                .unwrap_or_else(|_| HeaderValue::from_static("\"plan\""));
        };
        to.copy_from_slice(p);
        len += p.len();
    }
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("\"plan\""))
}

/// An override of a plan: its own buckets on some routes and methods.
pub struct OverrideRt {
    pub def: PlanOverride,
    pub set: Arc<BucketSet>,
}

/// A plan's quota: the use per caller in the current period, kept in the embedded store.
pub struct QuotaRt {
    pub quotas: Arc<Quotas>,
    /// `<plan>-<per>`, the quota's name in the headers.
    pub name: String,
    /// The period's length in seconds (a month counts 30 days), the `w` of its policy.
    pub window: u64,
    /// The start of its part of every `RateLimit` value: `, "<plan>-<per>";r=`.
    prefix: Box<[u8]>,
    /// `RateLimit-Policy` for the plan's own buckets and then each override's, with the
    /// quota's policy after the buckets': made once, as the bucket sets' are.
    policies: Vec<HeaderValue>,
}

/// A usage plan as the request path uses it.
pub struct PlanRt {
    pub name: String,
    pub own: Arc<BucketSet>,
    pub overrides: Vec<OverrideRt>,
    pub quota: Option<QuotaRt>,
    /// Requests let through per caller and day (counted with the quota when there is one).
    pub daily: Arc<DailyUsage>,
}

/// The answer of a plan to one request: its bucket's, and its quota's when it has one.
#[derive(Clone)]
pub struct PlanVerdict {
    pub bucket: Verdict,
    pub quota: Option<QuotaVerdict>,
}

impl PlanVerdict {
    pub fn allowed(&self) -> bool {
        self.bucket.allowed && self.quota.as_ref().is_none_or(|q| q.allowed)
    }

    /// `Retry-After` of a refusal: the bucket's wait, or the time until the quota's period
    /// ends.
    pub fn retry_after(&self) -> Duration {
        match &self.quota {
            Some(q) if !q.allowed => q.reset_after,
            _ => self.bucket.retry_after,
        }
    }
}

impl PlanRt {
    /// Charges one request of `key` to `set` (one of this plan's bucket sets) and, if the
    /// bucket lets it through, to the quota. A request the bucket refuses takes nothing from
    /// the quota; one the quota refuses has spent its token.
    pub fn check(
        &self,
        set: &BucketSet,
        key: &Key,
        now: portcullis_limits::Moment,
        wall: i64,
    ) -> PlanVerdict {
        let bucket = set.buckets.check(key, now, 1);
        let quota = match &self.quota {
            Some(q) => Some(q.quotas.check(key, wall, u64::from(bucket.allowed))),
            None => {
                if bucket.allowed {
                    self.daily.record(key, wall, 1);
                }
                None
            }
        };
        PlanVerdict { bucket, quota }
    }

    /// Reads `key`'s state without charging it (for the headers of a refusal by a rule).
    pub fn peek(
        &self,
        set: &BucketSet,
        key: &Key,
        now: portcullis_limits::Moment,
        wall: i64,
    ) -> PlanVerdict {
        PlanVerdict {
            bucket: set.buckets.check(key, now, 0),
            quota: self.quota.as_ref().map(|q| q.quotas.check(key, wall, 0)),
        }
    }

    /// `RateLimit-Policy` and `RateLimit` for a verdict on `set`.
    pub fn headers(&self, set: &BucketSet, v: &PlanVerdict) -> [HeaderValue; 2] {
        let (Some(q), Some(qv)) = (&self.quota, &v.quota) else {
            return [set.policy.clone(), set.header(&v.bucket)];
        };
        // The policy made for this set (the plan's own, or an override's), when the quota's
        // limit is the one it was made with.
        let made = std::iter::once(&*self.own)
            .chain(self.overrides.iter().map(|o| &*o.set))
            .position(|s| std::ptr::eq(s, set))
            .and_then(|i| q.policies.get(i))
            .filter(|_| qv.limit == q.quotas.spec().limit);
        let policy = match made {
            Some(p) => p.clone(),
            None => q.policy(set, qv.limit),
        };
        let (mut r, mut t, mut qr, mut qt) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        let now = join(&[
            &set.prefix,
            r.format(v.bucket.remaining).as_bytes(),
            b";t=",
            t.format(ceil_secs(v.bucket.reset_after)).as_bytes(),
            &q.prefix,
            qr.format(qv.remaining).as_bytes(),
            b";t=",
            qt.format(ceil_secs(qv.reset_after)).as_bytes(),
        ]);
        [policy, now]
    }
}

impl QuotaRt {
    /// `RateLimit-Policy` for `set` with this quota of `limit`: the set's policy, then the
    /// quota's.
    fn policy(&self, set: &BucketSet, limit: u64) -> HeaderValue {
        let (mut q, mut w) = (itoa::Buffer::new(), itoa::Buffer::new());
        join(&[
            set.policy.as_bytes(),
            b", \"",
            self.name.as_bytes(),
            b"\";q=",
            q.format(limit).as_bytes(),
            b";w=",
            w.format(self.window).as_bytes(),
        ])
    }
}

impl PlanRt {
    /// The buckets for a request on the route `route_id` (`app/name`; an override may name
    /// the route by its name or its id) with `method`: the first override naming both (an
    /// empty list names all), else the plan's own.
    pub fn buckets_for(&self, route_id: &str, method: &Method) -> &BucketSet {
        if self.overrides.is_empty() {
            return &self.own;
        }
        let name = route_id.rsplit('/').next().unwrap_or(route_id);
        self.overrides
            .iter()
            .find(|o| {
                (o.def.routes.is_empty() || o.def.routes.iter().any(|r| r == name || r == route_id))
                    && (o.def.methods.is_empty()
                        || o.def.methods.iter().any(|m| m == method.as_str()))
            })
            .map_or(&self.own, |o| &o.set)
    }
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Plans by name, kept across reloads, with the embedded store their quotas and daily
/// usage are kept in. See the [module docs](self).
pub struct PlanRegistry {
    plans: Mutex<HashMap<String, Arc<PlanRt>>>,
    /// Opened when the first config with plans is loaded (at start or at a reload).
    store: std::sync::OnceLock<portcullis_store::Store>,
    /// One flush at a time: a reader that flushes first then sees every count so far.
    flushing: Mutex<()>,
    /// In a fleet (`limits.store: redis`), daily usage goes to Redis instead of the embedded
    /// store, so that every replica's report shows the fleet's.
    fleet: std::sync::OnceLock<FleetUsage>,
    /// The wall clock quotas and days are counted by (injected by tests).
    pub clock: Arc<dyn WallClock>,
}

impl Default for PlanRegistry {
    fn default() -> Self {
        PlanRegistry::new(None, Arc::new(portcullis_limits::wall::SystemWallClock))
    }
}

impl PlanRegistry {
    pub fn new(store: Option<portcullis_store::Store>, clock: Arc<dyn WallClock>) -> Self {
        let cell = std::sync::OnceLock::new();
        if let Some(s) = store {
            let _ = cell.set(s);
        }
        PlanRegistry {
            plans: Mutex::default(),
            store: cell,
            flushing: Mutex::new(()),
            fleet: std::sync::OnceLock::new(),
            clock,
        }
    }

    pub fn store(&self) -> Option<&portcullis_store::Store> {
        self.store.get()
    }

    /// Opens the embedded store in `dir` unless one is open; true when this call opened it.
    /// Blocking (file I/O).
    pub fn open_store(&self, dir: &std::path::Path) -> Result<bool, portcullis_store::StoreError> {
        if self.store.get().is_some() {
            return Ok(false);
        }
        let s = portcullis_store::Store::open(dir)?;
        Ok(self.store.set(s).is_ok())
    }

    /// The plan's quota: the running one when its spec is unchanged, the running one's use
    /// under a new spec when it changed, or a new one loaded from the store.
    fn quota(
        &self,
        def: &UsagePlan,
        old: Option<&PlanRt>,
        daily: &Arc<DailyUsage>,
    ) -> Result<Option<QuotaRt>, String> {
        let Some(q) = &def.quota else { return Ok(None) };
        let bad = |e: portcullis_limits::Error| format!("usage plan `{}`: quota: {e}", def.name);
        let per = match q.per {
            portcullis_config::QuotaPer::Day => Per::Day,
            portcullis_config::QuotaPer::Week => Per::Week,
            portcullis_config::QuotaPer::Month => Per::Month,
        };
        let spec =
            QuotaSpec::new(q.limit, per, ResetAt::parse(&q.reset).map_err(bad)?).map_err(bad)?;
        let now = self.clock.unix_nanos();
        let quotas = match old.and_then(|p| p.quota.as_ref()) {
            Some(o) if *o.quotas.spec() == spec => o.quotas.clone(),
            Some(o) => Arc::new(o.quotas.respec(spec, now)),
            None => {
                let quotas = Quotas::with_daily(spec, PLAN_KEYS, daily.clone());
                if let Some(store) = self.store.get() {
                    let (start, _) = quotas.spec().period(now.div_euclid(1_000_000_000));
                    let rows = store.load_quotas(&def.name, start).map_err(|e| {
                        format!("usage plan `{}`: reading its quota: {e}", def.name)
                    })?;
                    for (key, period_start, used) in rows {
                        if let Some(k) = StoredKey::from_bytes(&key) {
                            quotas.load(&k, period_start, used);
                        }
                    }
                }
                Arc::new(quotas)
            }
        };
        let name = format!("{}-{}", def.name, per.name());
        Ok(Some(QuotaRt {
            quotas,
            prefix: format!(", \"{name}\";r=").into_bytes().into(),
            name,
            window: match per {
                Per::Day => 86_400,
                Per::Week => 7 * 86_400,
                Per::Month => 30 * 86_400,
            },
            policies: Vec::new(),
        }))
    }

    /// Sends daily usage to the fleet's Redis from now on (see [`FleetUsage`]). `handle` runs
    /// the sends: [`PlanRegistry::flush`] blocks on it, off the runtime's threads.
    pub fn send_usage_to(&self, store: portcullis_limits::RedisStore, handle: Handle) {
        let _ = self.fleet.set(FleetUsage {
            store,
            handle,
            pending: Mutex::default(),
        });
    }

    /// The fleet's Redis when daily usage goes there.
    pub fn fleet_usage(&self) -> Option<&portcullis_limits::RedisStore> {
        self.fleet.get().map(|f| &f.store)
    }

    /// Writes every plan's changed quota use and daily usage to the store, in one
    /// transaction (daily usage to the fleet's Redis instead, when there is one). On failure
    /// the counts are kept for the next try. Blocking: not on a runtime thread.
    pub fn flush(&self) -> Result<(), String> {
        let _one = self.flushing.lock();
        let plans: Vec<Arc<PlanRt>> = self.plans.lock().values().cloned().collect();
        let sent = self.fleet.get().map(|f| f.flush(&plans));
        let Some(store) = self.store.get() else {
            return sent.unwrap_or(Ok(()));
        };
        let mut quotas = Vec::new();
        let mut usage = Vec::new();
        for p in &plans {
            if let Some(q) = &p.quota {
                let rows = q.quotas.dirty();
                if !rows.is_empty() {
                    quotas.push((p, rows));
                }
            }
            if sent.is_some() {
                continue;
            }
            let rows = p.daily.drain();
            if !rows.is_empty() {
                usage.push((p, rows));
            }
        }
        let written = self.write(store, quotas, usage);
        sent.unwrap_or(Ok(())).and(written)
    }

    /// One transaction of the embedded store; what it could not write is kept.
    fn write(
        &self,
        store: &portcullis_store::Store,
        quotas: Vec<PlanRows<'_>>,
        usage: Vec<PlanRows<'_>>,
    ) -> Result<(), String> {
        if quotas.is_empty() && usage.is_empty() {
            return Ok(());
        }
        let q_rows: Vec<(&str, Vec<portcullis_store::QuotaRow>)> = quotas
            .iter()
            .map(|(p, rows)| {
                (
                    p.name.as_str(),
                    rows.iter()
                        .map(|(k, s, u)| (k.to_bytes(), *s, *u))
                        .collect(),
                )
            })
            .collect();
        let u_rows: Vec<(&str, Vec<portcullis_store::UsageDelta>)> = usage
            .iter()
            .map(|(p, rows)| {
                (
                    p.name.as_str(),
                    rows.iter()
                        .map(|(k, d, n)| (k.to_bytes(), *d, *n))
                        .collect(),
                )
            })
            .collect();
        let q_refs: Vec<(&str, &[portcullis_store::QuotaRow])> =
            q_rows.iter().map(|(n, r)| (*n, r.as_slice())).collect();
        let u_refs: Vec<(&str, &[portcullis_store::UsageDelta])> =
            u_rows.iter().map(|(n, r)| (*n, r.as_slice())).collect();
        if let Err(e) = store.flush(&q_refs, &u_refs) {
            for (p, rows) in quotas {
                if let Some(q) = &p.quota {
                    q.quotas.mark_dirty(rows.iter().map(|(k, _, _)| k));
                }
            }
            for (p, rows) in usage {
                p.daily.put_back(rows);
            }
            return Err(e.to_string());
        }
        Ok(())
    }

    /// The plan for `def`, keeping the running buckets of the plan and of each override
    /// whose definition is unchanged.
    pub fn plan(&self, def: &UsagePlan) -> Result<Arc<PlanRt>, String> {
        let burst = def.burst.map_or(def.rate.count, u64::from);
        let rate = (def.rate.count, def.rate.per);
        let mut plans = self.plans.lock();
        let old = plans.get(&def.name).cloned();
        let keep_own = old.as_ref().is_some_and(|p| p.own.same(rate, burst));
        if old.is_some() && !keep_own {
            tracing::info!(target: "portcullis::limits", plan = %def.name, "usage plan `{}` changed; starting it afresh", def.name);
        }
        let mut overrides = Vec::with_capacity(def.overrides.len());
        for (i, o) in def.overrides.iter().enumerate() {
            let burst = o.burst.map_or(o.rate.count, u64::from);
            let kept = old.as_ref().and_then(|p| p.overrides.get(i)).filter(|k| {
                k.def.routes == o.routes
                    && k.def.methods == o.methods
                    && k.set.same((o.rate.count, o.rate.per), burst)
            });
            // The running buckets, shared: a snapshot still using the old plan counts in
            // the same ones.
            let set = match kept {
                Some(k) => k.set.clone(),
                None => Arc::new(BucketSet::new(
                    format!("{}.{}", def.name, i + 1),
                    (o.rate.count, o.rate.per),
                    burst,
                )?),
            };
            overrides.push(OverrideRt {
                def: o.clone(),
                set,
            });
        }
        let own = match old.as_ref().filter(|_| keep_own) {
            Some(p) => p.own.clone(),
            None => Arc::new(BucketSet::new(def.name.clone(), rate, burst)?),
        };
        let daily = match &old {
            Some(p) => p.daily.clone(),
            None => Arc::new(DailyUsage::new(PLAN_KEYS)),
        };
        let mut quota = self.quota(def, old.as_deref(), &daily)?;
        if let Some(q) = quota.as_mut() {
            let limit = q.quotas.spec().limit;
            q.policies = std::iter::once(&*own)
                .chain(overrides.iter().map(|o| &*o.set))
                .map(|set| q.policy(set, limit))
                .collect();
        }
        let p = Arc::new(PlanRt {
            name: def.name.clone(),
            own,
            overrides,
            quota,
            daily,
        });
        plans.insert(def.name.clone(), p.clone());
        Ok(p)
    }

    /// Forgets the plans `config` no longer defines (after a reload).
    pub fn retain(&self, config: &portcullis_config::Config) {
        self.plans
            .lock()
            .retain(|n, _| config.usage_plans.iter().any(|p| &p.name == n));
    }
}

/// Which plan a caller is on, for one snapshot: every plan by name and the assignments.
#[derive(Default)]
pub struct Assignment {
    pub plans: Vec<Arc<PlanRt>>,
    by_name: HashMap<String, usize>,
    principals: HashMap<String, usize>,
    groups: HashMap<String, usize>,
    claim: Option<String>,
}

impl Assignment {
    pub fn build(
        config: &portcullis_config::Config,
        registry: &PlanRegistry,
    ) -> Result<Assignment, String> {
        let mut a = Assignment {
            claim: config.limits.plan_claim.clone(),
            ..Assignment::default()
        };
        for (i, def) in config.usage_plans.iter().enumerate() {
            a.plans.push(registry.plan(def)?);
            a.by_name.insert(def.name.clone(), i);
            for p in &def.assign.principals {
                a.principals.entry(p.clone()).or_insert(i);
            }
            for g in &def.assign.groups {
                a.groups.entry(g.clone()).or_insert(i);
            }
        }
        Ok(a)
    }

    /// The index of the plan named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The plan assigned to `id` (see the [module docs](self)), if any; the route's default
    /// applies otherwise.
    pub fn assigned(&self, id: &Identity) -> Option<usize> {
        let named = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_str)
                .and_then(|n| self.index(n))
        };
        if id.method == AuthMethod::ApiKey {
            if let Some(i) = named(id.claims.get("plan")) {
                return Some(i);
            }
        }
        if let Some(c) = &self.claim {
            if let Some(i) = named(portcullis_identity::claims::lookup(&id.claims, c)) {
                return Some(i);
            }
        }
        if !self.principals.is_empty() {
            let who = format!("{}/{}", id.provider, id.subject);
            if let Some(&i) = self.principals.get(&who) {
                return Some(i);
            }
        }
        if !self.groups.is_empty() {
            return id.groups.iter().find_map(|g| self.groups.get(g).copied());
        }
        None
    }

    /// Whether any caller can be assigned a plan other than its route's default.
    pub fn any(&self) -> bool {
        !self.plans.is_empty()
    }
}

/// A plan's rows to write: (key, period start or day, count).
type PlanRows<'a> = (&'a Arc<PlanRt>, Vec<(StoredKey, i64, u64)>);

/// Daily usage bound for the fleet's Redis, in batches that Redis adds once however often
/// they are sent ([`portcullis_limits::redis::usage`]): a batch that failed, or whose answer
/// was lost, is sent again as it was, so nothing is counted twice or dropped while the
/// process lives.
pub struct FleetUsage {
    store: portcullis_limits::RedisStore,
    handle: Handle,
    pending: Mutex<std::collections::VecDeque<UsageBatch>>,
}

/// The most rows waiting for Redis; past it the oldest batches are dropped, and logged.
const FLEET_PENDING_ROWS: usize = 2_000_000;

impl FleetUsage {
    /// Drains `plans`' daily usage into batches, and sends every waiting batch in order.
    fn flush(&self, plans: &[Arc<PlanRt>]) -> Result<(), String> {
        let rows: Vec<UsageRecord> = plans
            .iter()
            .flat_map(|p| {
                p.daily
                    .drain()
                    .into_iter()
                    .map(|(key, day, count)| UsageRecord {
                        plan: p.name.clone(),
                        key,
                        day,
                        count,
                    })
            })
            .collect();
        let mut pending = self.pending.lock();
        pending.extend(UsageBatch::split(rows));
        let mut waiting: usize = pending.iter().map(|b| b.rows().len()).sum();
        while waiting > FLEET_PENDING_ROWS {
            let Some(b) = pending.pop_front() else { break };
            waiting -= b.rows().len();
            tracing::error!(target: "portcullis::limits", rows = b.rows().len(), "daily usage waited too long for Redis and was dropped");
        }
        while let Some(b) = pending.front() {
            let sent = self.handle.block_on(self.store.add_usage(b));
            if let Err(e) = sent {
                return Err(format!(
                    "daily usage could not be sent to Redis ({} batches wait): {e}",
                    pending.len()
                ));
            }
            pending.pop_front();
        }
        Ok(())
    }
}

/// Writes the plans' counts to the embedded store every `limits.sync_interval` (read from
/// the running config each time), on a thread of its own: the writes block on `fsync`. The
/// thread ends when the runtime is dropped.
pub fn start_flusher(shared: &Arc<crate::Shared>) {
    if shared.limits.plans.store().is_none() {
        return;
    }
    let weak = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("portcullis-usage-flush".into())
        .spawn(move || {
            // Wakes often and reads the interval each time, so that a reload that shortens
            // `sync_interval` bounds what a crash can lose from then on, not an interval later.
            let mut last = std::time::Instant::now();
            loop {
                let every = match weak.upgrade() {
                    Some(s) => s.snapshot.load().config.limits.sync_interval.0,
                    None => return,
                };
                let due = last + every;
                let now = std::time::Instant::now();
                if now < due {
                    std::thread::sleep((due - now).min(Duration::from_millis(250)));
                    continue;
                }
                last = now;
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = s.limits.plans.flush() {
                    tracing::error!(target: "portcullis::limits", error = %e, "usage counts could not be written; keeping them for the next try");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "the usage flusher could not start");
    }
}

impl PlanRegistry {
    /// The running plan named `name`, as the last snapshot built it, if any. Read-only: for
    /// the admin API's usage report, which reads its quota's use.
    pub fn running(&self, name: &str) -> Option<Arc<PlanRt>> {
        self.plans.lock().get(name).cloned()
    }
}

/// The quota `def` defines, as the registry builds it: `None` without one. For readers of the
/// store that have no running plan (`portcullis usage`).
pub fn quota_spec(def: &UsagePlan) -> Result<Option<QuotaSpec>, String> {
    let Some(q) = &def.quota else { return Ok(None) };
    let bad = |e: portcullis_limits::Error| format!("usage plan `{}`: quota: {e}", def.name);
    let per = match q.per {
        portcullis_config::QuotaPer::Day => Per::Day,
        portcullis_config::QuotaPer::Week => Per::Week,
        portcullis_config::QuotaPer::Month => Per::Month,
    };
    QuotaSpec::new(q.limit, per, ResetAt::parse(&q.reset).map_err(bad)?)
        .map(Some)
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_limits::wall::ManualWallClock;
    use portcullis_limits::{Clock, MonotonicClock};

    /// 2026-12-06 23:59:58 UTC: two seconds before a daily quota resets.
    const LATE: i64 = 1_796_601_598;

    fn plan_def(yaml: &str) -> UsagePlan {
        serde_yaml_ng::from_str(yaml).expect("a plan")
    }

    fn registry(dir: &std::path::Path, clock: &Arc<ManualWallClock>) -> PlanRegistry {
        let store = portcullis_store::Store::open(dir).expect("the store");
        PlanRegistry::new(Some(store), clock.clone())
    }

    const DAILY: &str =
        "{ name: agents, rate: 1000/s, burst: 1000, quota: { limit: 3, per: day } }";

    fn check(p: &PlanRt, clock: &ManualWallClock, who: &str) -> PlanVerdict {
        p.check(
            &p.own,
            &Key::from(who),
            MonotonicClock.now(),
            clock.unix_nanos(),
        )
    }

    #[test]
    fn the_ratelimit_value_names_the_bucket_whatever_its_names_length() {
        let v = |remaining, ms| Verdict {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining,
            reset_after: Duration::from_millis(ms),
        };
        let short = BucketSet::new("agents".into(), (10, Duration::from_secs(1)), 20).unwrap();
        assert_eq!(short.header(&v(17, 300)), "\"agents\";r=17;t=1");
        assert_eq!(
            short.header(&v(u64::MAX, 0)),
            "\"agents\";r=18446744073709551615;t=0"
        );
        let name = "p".repeat(120);
        let long = BucketSet::new(name.clone(), (10, Duration::from_secs(1)), 20).unwrap();
        assert_eq!(
            long.header(&v(3, 2500)),
            format!("\"{name}\";r=3;t=3").as_str()
        );
    }

    #[test]
    fn a_repeated_ratelimit_value_is_shared_only_for_the_same_set_and_counts() {
        let v = |remaining, ms| Verdict {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining,
            reset_after: Duration::from_millis(ms),
        };
        let a = BucketSet::new("a".into(), (10, Duration::from_secs(1)), 20).unwrap();
        let b = BucketSet::new("b".into(), (10, Duration::from_secs(1)), 20).unwrap();
        let first = a.header(&v(19, 100));
        let again = a.header(&v(19, 100));
        assert_eq!(again, "\"a\";r=19;t=1");
        // The same bytes, not a copy.
        assert_eq!(first.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        assert_eq!(b.header(&v(19, 100)), "\"b\";r=19;t=1");
        assert_eq!(a.header(&v(18, 100)), "\"a\";r=18;t=1");
        assert_eq!(a.header(&v(18, 1100)), "\"a\";r=18;t=2");
        // A set made where a dropped one was is another set.
        drop(b);
        let c = BucketSet::new("c".into(), (10, Duration::from_secs(1)), 20).unwrap();
        assert_eq!(c.header(&v(18, 1100)), "\"c\";r=18;t=2");
    }

    #[test]
    fn a_quota_refuses_until_its_period_ends_then_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualWallClock::from_unix_secs(LATE));
        let reg = registry(dir.path(), &clock);
        let p = reg.plan(&plan_def(DAILY)).unwrap();
        for left in [2, 1, 0] {
            let v = check(&p, &clock, "agents/a");
            assert!(v.allowed());
            assert_eq!(v.quota.unwrap().remaining, left);
        }
        let v = check(&p, &clock, "agents/a");
        assert!(!v.allowed() && v.bucket.allowed);
        // Retry-After is the time until midnight UTC: 2 seconds.
        assert_eq!(ceil_secs(v.retry_after()), 2);
        let [policy, now] = p.headers(&p.own, &v);
        assert_eq!(policy, "\"agents\";q=1000;w=1, \"agents-day\";q=3;w=86400");
        assert_eq!(
            now.to_str().unwrap().split(", ").nth(1),
            Some("\"agents-day\";r=0;t=2")
        );
        // Another caller has its own quota.
        assert!(check(&p, &clock, "agents/b").allowed());
        // At the boundary the quota is whole again.
        clock.advance(std::time::Duration::from_secs(2));
        let v = check(&p, &clock, "agents/a");
        assert!(v.allowed());
        assert_eq!(v.quota.unwrap().remaining, 2);
    }

    /// An override's answers name its own buckets beside the plan's quota, in both headers.
    #[test]
    fn an_overrides_headers_name_its_buckets_and_the_plans_quota() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualWallClock::from_unix_secs(LATE));
        let reg = registry(dir.path(), &clock);
        let p = reg
            .plan(&plan_def(
                "{ name: agents, rate: 1000/s, burst: 1000, quota: { limit: 3, per: week }, \
                 overrides: [{ methods: [POST], rate: 10/s, burst: 20 }] }",
            ))
            .unwrap();
        let set = p.buckets_for("default/api", &Method::POST);
        assert_eq!(set.name, "agents.1");
        let v = p.check(
            set,
            &Key::from("a"),
            MonotonicClock.now(),
            clock.unix_nanos(),
        );
        let [policy, now] = p.headers(set, &v);
        assert_eq!(
            policy,
            "\"agents.1\";q=20;w=2, \"agents-week\";q=3;w=604800"
        );
        let now = now.to_str().unwrap();
        assert!(
            now.starts_with("\"agents.1\";r=19;t=1, \"agents-week\";r=2;t="),
            "{now}"
        );
        let [own, _] = p.headers(&p.own, &check(&p, &clock, "b"));
        assert_eq!(own, "\"agents\";q=1000;w=1, \"agents-week\";q=3;w=604800");
    }

    #[test]
    fn quota_use_and_daily_usage_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualWallClock::from_unix_secs(LATE - 3600));
        {
            let reg = registry(dir.path(), &clock);
            let p = reg.plan(&plan_def(DAILY)).unwrap();
            assert!(check(&p, &clock, "agents/a").allowed());
            assert!(check(&p, &clock, "agents/a").allowed());
            reg.flush().unwrap();
            // Counted after the last flush: lost by a crash (at most one sync interval).
            assert!(check(&p, &clock, "agents/a").allowed());
        }
        let reg = registry(dir.path(), &clock);
        let p = reg.plan(&plan_def(DAILY)).unwrap();
        let v = check(&p, &clock, "agents/a");
        assert_eq!(
            v.quota.unwrap().used,
            3,
            "the restart handed out no fresh quota"
        );
        reg.flush().unwrap();
        let day = portcullis_limits::quota::day_of(clock.unix_nanos());
        let all = portcullis_store::UsageQuery {
            from_day: day,
            to_day: day,
            ..Default::default()
        };
        let rows = reg.store().unwrap().usage(&all).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].plan.as_str(), rows[0].day, rows[0].count),
            ("agents", day, 3)
        );
        // A plan without a quota still counts its daily usage.
        let free = reg.plan(&plan_def("{ name: free, rate: 10/s }")).unwrap();
        assert!(check(&free, &clock, "dev/bob").allowed());
        reg.flush().unwrap();
        let rows = reg
            .store()
            .unwrap()
            .usage(&portcullis_store::UsageQuery {
                plan: Some("free"),
                ..all
            })
            .unwrap();
        assert_eq!(rows[0].count, 1);
    }

    #[test]
    fn a_reload_keeps_buckets_and_quota_use_and_a_new_limit_applies_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualWallClock::from_unix_secs(LATE - 3600));
        let reg = registry(dir.path(), &clock);
        let p = reg.plan(&plan_def(DAILY)).unwrap();
        assert!(check(&p, &clock, "agents/a").allowed());
        assert!(check(&p, &clock, "agents/a").allowed());
        let same = reg.plan(&plan_def(DAILY)).unwrap();
        assert!(Arc::ptr_eq(&p.own, &same.own));
        assert_eq!(check(&same, &clock, "agents/a").quota.unwrap().used, 3);
        let raised = reg
            .plan(&plan_def(
                "{ name: agents, rate: 1000/s, burst: 1000, quota: { limit: 5, per: day } }",
            ))
            .unwrap();
        let v = check(&raised, &clock, "agents/a");
        assert_eq!((v.quota.unwrap().used, v.quota.unwrap().remaining), (4, 1));
    }

    #[test]
    fn assignment_reads_the_key_file_then_the_claim_then_lists() {
        let cfg_dir = tempfile::tempdir().unwrap();
        let path = cfg_dir.path().join("p.yaml");
        std::fs::write(
            &path,
            "limits: { plan_claim: tier }\nusage_plans:\n  - { name: basic, rate: 1/s }\n  - { name: gold, rate: 1/s, assign: { groups: [vip] } }\n  - { name: pro, rate: 1/s }\n",
        )
        .unwrap();
        let config = portcullis_config::load(&path).unwrap();
        let a = Assignment::build(&config, &PlanRegistry::default()).unwrap();
        let id = |method, claims: serde_json::Value, groups: &[&str]| Identity {
            provider: "p".into(),
            method,
            subject: "s".into(),
            user: "u".into(),
            email: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            claims,
            expires_at: None,
        };
        let name = |i: Option<usize>| i.map(|i| a.plans[i].name.as_str());
        let key = id(
            AuthMethod::ApiKey,
            serde_json::json!({ "plan": "pro", "tier": "gold" }),
            &[],
        );
        assert_eq!(name(a.assigned(&key)), Some("pro"));
        // A JWT's `plan` claim is not the key file's: only `plan_claim` is read.
        let jwt = id(
            AuthMethod::Jwt,
            serde_json::json!({ "plan": "pro", "tier": "gold" }),
            &[],
        );
        assert_eq!(name(a.assigned(&jwt)), Some("gold"));
        let unknown = id(
            AuthMethod::Jwt,
            serde_json::json!({ "tier": "platinum" }),
            &["vip"],
        );
        assert_eq!(
            name(a.assigned(&unknown)),
            Some("gold"),
            "an unknown name falls through"
        );
        let none = id(AuthMethod::Jwt, serde_json::json!({}), &[]);
        assert_eq!(a.assigned(&none), None);
    }

    #[test]
    fn overrides_apply_by_route_name_or_id_and_method() {
        let reg = PlanRegistry::default();
        let p = reg
            .plan(&plan_def(
                "{ name: gold, rate: 10/s, overrides: [{ routes: [upload], methods: [POST], rate: 1/s }, { routes: [billing/api], rate: 2/s }] }",
            ))
            .unwrap();
        let name = |route: &str, m: Method| p.buckets_for(route, &m).name.clone();
        assert_eq!(
            name("app/upload", Method::POST),
            "gold.1",
            "by the route's name"
        );
        assert_eq!(name("app/upload", Method::GET), "gold", "not its method");
        assert_eq!(
            name("billing/api", Method::GET),
            "gold.2",
            "by the route's id"
        );
        assert_eq!(
            name("other/api", Method::GET),
            "gold",
            "another app's `api`"
        );
        let plain = reg.plan(&plan_def("{ name: plain, rate: 10/s }")).unwrap();
        assert_eq!(plain.buckets_for("app/upload", &Method::POST).name, "plain");
    }
}
