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
//! * **Headers**: `RateLimit-Policy` is fixed per plan (and override); `RateLimit` is made
//!   per answer from the verdict (draft-ietf-httpapi-ratelimit-headers).
//!
//! The limit phase reads this module; it knows nothing of the exchange.

use http::{HeaderValue, Method};
use parking_lot::Mutex;
use portcullis_config::{PlanOverride, UsagePlan};
use portcullis_identity::{AuthMethod, Identity};
use portcullis_limits::{Buckets, Gcra, Verdict};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
    rate: (u64, Duration),
}

impl BucketSet {
    fn new(name: String, rate: (u64, Duration), burst: u64) -> Result<BucketSet, String> {
        let bad = |e: portcullis_limits::Error| format!("usage plan `{name}`: {e}");
        let gcra = Gcra::new(
            portcullis_limits::Rate::new(rate.0, rate.1).map_err(bad)?,
            burst,
        )
        .map_err(bad)?;
        // The window the burst refills in: burst / rate.
        let window = rate.1.as_nanos() * u128::from(burst) / u128::from(rate.0.max(1));
        let w = u64::try_from(window.div_ceil(1_000_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let policy = HeaderValue::from_str(&format!("\"{name}\";q={burst};w={w}"))
            .map_err(|e| format!("usage plan `{name}`: {e}"))?;
        Ok(BucketSet {
            name,
            buckets: Buckets::new(gcra, PLAN_KEYS),
            policy,
            rate,
        })
    }

    fn same(&self, rate: (u64, Duration), burst: u64) -> bool {
        self.rate == rate && self.buckets.gcra().burst() == burst
    }

    /// The `RateLimit` header for a verdict: `"<name>";r=<remaining>;t=<seconds until the
    /// bucket is full>`.
    pub fn header(&self, v: &Verdict) -> HeaderValue {
        let t = ceil_secs(v.reset_after);
        HeaderValue::from_str(&format!("\"{}\";r={};t={t}", self.name, v.remaining))
            .unwrap_or_else(|_| HeaderValue::from_static("\"plan\""))
    }
}

/// An override of a plan: its own buckets on some routes and methods.
pub struct OverrideRt {
    pub def: PlanOverride,
    pub set: Arc<BucketSet>,
}

/// A usage plan as the request path uses it.
pub struct PlanRt {
    pub name: String,
    pub own: Arc<BucketSet>,
    pub overrides: Vec<OverrideRt>,
}

impl PlanRt {
    /// The buckets for a request on `route` (its name or id) with `method`: the first
    /// override naming both (an empty list names all), else the plan's own.
    pub fn buckets_for(&self, route: (&str, &str), method: &Method) -> &BucketSet {
        self.overrides
            .iter()
            .find(|o| {
                (o.def.routes.is_empty()
                    || o.def.routes.iter().any(|r| r == route.0 || r == route.1))
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

/// Plans by name, kept across reloads. See the [module docs](self).
#[derive(Default)]
pub struct PlanRegistry {
    plans: Mutex<HashMap<String, Arc<PlanRt>>>,
}

impl PlanRegistry {
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
        let own = match old.filter(|_| keep_own) {
            Some(p) => p.own.clone(),
            None => Arc::new(BucketSet::new(def.name.clone(), rate, burst)?),
        };
        let p = Arc::new(PlanRt {
            name: def.name.clone(),
            own,
            overrides,
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
