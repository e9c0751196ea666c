//! How much each caller used its usage plan, per UTC day, like API Gateway's `GetUsage`:
//! `GET /api/v1/usage` on the admin API, and the same report read offline from the embedded
//! store by `portcullis usage`.
//!
//! * **Where the counts come from.** The plans count in memory ([`crate::plans`]) and write
//!   to the store every `limits.sync_interval`. The endpoint writes the pending counts first
//!   ([`crate::plans::PlanRegistry::flush`], on a blocking thread), so its answer includes
//!   every request let through up to the call. `portcullis usage` reads the store as it is:
//!   at most one sync interval behind a running proxy (WAL lets it read while the proxy
//!   writes).
//! * **Quotas.** For a plan with a quota, the answer also gives each key's use of the current
//!   period: from the running plan when there is one (the endpoint), else from the store's
//!   quota table.
//! * **Keys as text** ([`key_from_text`], [`key_to_text`]): a principal `provider/subject`
//!   (`dev/alice`, `agents/deploy-bot-1`), a client's IP address on a public route
//!   (`192.0.2.7`, `2001:db8::1`), `sha256:` and 44 hex digits for a key longer than 256 bytes
//!   (stored as a digest), and `0x` and hex for bytes that are none of these. A key given as
//!   text matches the stored key of the same bytes: `192.0.2.7` matches the address's octets.
//!
//! ```json
//! {"from":"2026-11-07","to":"2026-12-06",
//!  "plans":{"agents":{"agents/deploy-bot-1":[["2026-12-05",12],["2026-12-06",41]]},"visitors":{}},
//!  "quota":{"agents":{"agents/deploy-bot-1":{"limit":1000,"per":"day","used":41,
//!    "remaining":959,"period_start":"2026-12-06T00:00:00Z"}}}}
//! ```

use crate::plans::{self, PlanRt};
use crate::table_keys::{hex, shorten, unhex};
use crate::Runtime;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use portcullis_config::{Config, UsagePlan};
use portcullis_limits::key::INLINE_LEN;
use portcullis_limits::quota::{civil_from_days, day_of, day_string, parse_day, SECS_PER_DAY};
use portcullis_limits::{Key, StoredKey};
use portcullis_store::{Store, UsageQuery};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Days a report covers when `from` is not given: the 30 days ending with `to`.
pub const DEFAULT_DAYS: i64 = 30;
/// The most days one report covers.
pub const MAX_DAYS: i64 = 366;

// ---------------------------------------------------------------------------------------------
// The query
// ---------------------------------------------------------------------------------------------

/// What a caller asks for, as text: the endpoint's query string, or `portcullis usage`'s
/// flags. An empty value counts as not given.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    pub key: Option<String>,
    pub plan: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A checked [`UsageParams`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRequest {
    /// The key as given, and its stored bytes (`StoredKey::to_bytes`).
    pub key: Option<(String, Vec<u8>)>,
    pub plan: Option<String>,
    /// UTC days since 1970-01-01, both included.
    pub from_day: i64,
    pub to_day: i64,
}

impl UsageParams {
    /// Checks the query, `today` being the current UTC day: `to` defaults to today and
    /// `from` to [`DEFAULT_DAYS`] days ending with `to`; `from` after `to`, more than
    /// [`MAX_DAYS`] days, a day that is not `YYYY-MM-DD` or a key that is no caller's are
    /// errors, each saying what to write.
    pub fn parse(&self, today: i64) -> Result<UsageRequest, String> {
        let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let day = |name: &str, v: &Option<String>| {
            given(v)
                .map(|t| parse_day(&t).map_err(|e| format!("`{name}`: {e}")))
                .transpose()
        };
        let (from, to) = (day("from", &self.from)?, day("to", &self.to)?);
        let to_day = to.unwrap_or(today);
        let from_day = from.unwrap_or(to_day - (DEFAULT_DAYS - 1));
        let to_text = || match to {
            Some(_) => format!("`to` ({})", day_string(to_day)),
            None => format!("today ({})", day_string(to_day)),
        };
        if from_day > to_day {
            return Err(format!(
                "`from` ({}) is after {}: give `from` on or before `to`",
                day_string(from_day),
                to_text()
            ));
        }
        if to_day - from_day + 1 > MAX_DAYS {
            return Err(format!(
                "{} to {} is {} days; a report covers at most {MAX_DAYS}: narrow `from` and `to`",
                day_string(from_day),
                to_text(),
                to_day - from_day + 1
            ));
        }
        let key = match given(&self.key) {
            Some(k) => {
                let bytes = key_from_text(&k).map_err(|e| format!("`key`: {e}"))?;
                Some((k, bytes))
            }
            None => None,
        };
        Ok(UsageRequest {
            key,
            plan: given(&self.plan),
            from_day,
            to_day,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Keys as text
// ---------------------------------------------------------------------------------------------

/// The stored bytes (`StoredKey::to_bytes`) of a plan's caller key given as text: see the
/// [module docs](self).
pub fn key_from_text(text: &str) -> Result<Vec<u8>, String> {
    if let Some(h) = text.strip_prefix("sha256:") {
        let digest = unhex(h).filter(|d| d.len() == INLINE_LEN).ok_or_else(|| {
            format!(
                "`{}` is not a hashed key: `sha256:` and {} hex digits",
                shorten(text),
                2 * INLINE_LEN
            )
        })?;
        // The tag byte of a hashed key, then its digest (see `StoredKey::to_bytes`).
        let bytes = [&[1u8][..], &digest].concat();
        return match StoredKey::from_bytes(&bytes) {
            Some(k) => Ok(k.to_bytes()),
            None => Err(format!("`{}` is not a hashed key", shorten(text))),
        };
    }
    if let Some(b) = text
        .strip_prefix("0x")
        .and_then(unhex)
        .filter(|b| !b.is_empty())
    {
        return Ok(StoredKey::of(&Key::new(&b)).to_bytes());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        // `::ffff:a.b.c.d` is the IPv4 client, as requests are keyed (`ConnInfo::new`). (An
        // IPv6 caller of a public route's plan is its /64, stored and shown as `2001:db8::`.)
        let ip = ip.to_canonical();
        return Ok(StoredKey::of(&Key::from(ip)).to_bytes());
    }
    if text.contains('/') {
        return Ok(StoredKey::of(&Key::from(text)).to_bytes());
    }
    Err(format!(
        "`{}` is not a caller's key: give a principal as `provider/subject` (like `dev/alice`), \
         a client's IP address (like `192.0.2.7`), or `sha256:` and {} hex digits for a key \
         stored hashed",
        shorten(text),
        2 * INLINE_LEN
    ))
}

/// The text of a stored key (`StoredKey::to_bytes`): a principal, an address, `sha256:…`, or
/// `0x` and hex. [`key_from_text`] reads it back to the same bytes.
pub fn key_to_text(bytes: &[u8]) -> String {
    let Some(k) = StoredKey::from_bytes(bytes) else {
        return format!("0x{}", hex(bytes));
    };
    if k.is_hashed() {
        return k.to_string();
    }
    let b = k.key_bytes();
    let same = |t: &str| key_from_text(t).ok().as_deref() == Some(bytes);
    if let Ok(t) = std::str::from_utf8(b) {
        if t.contains('/') && !t.chars().any(char::is_control) && same(t) {
            return t.to_string();
        }
    }
    let ip = match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    };
    match ip {
        Some(ip) => ip.to_string(),
        None => format!("0x{}", hex(b)),
    }
}

/// Unix seconds as RFC 3339 in UTC: `2026-12-06T00:00:00Z`.
pub fn rfc3339(unix_secs: i64) -> String {
    let (y, m, d) = civil_from_days(unix_secs.div_euclid(SECS_PER_DAY));
    let s = unix_secs.rem_euclid(SECS_PER_DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// A key's use of its plan's quota in the current period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaUse {
    pub limit: u64,
    /// `day`, `week` or `month`.
    pub per: &'static str,
    pub used: u64,
    /// The current period's start, Unix seconds.
    pub period_start: i64,
}

impl QuotaUse {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "limit": self.limit,
            "per": self.per,
            "used": self.used,
            "remaining": self.remaining(),
            "period_start": rfc3339(self.period_start),
        })
    }
}

/// The answer: requests per plan, key and day, and quota use per plan and key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub from_day: i64,
    pub to_day: i64,
    /// Plan → key text → `(day, requests)` in day order, only days with requests. Every
    /// plan asked for (all configured ones without `plan`) is here, even with no requests,
    /// and so is a plan no longer configured that has requests in the span.
    pub plans: BTreeMap<String, BTreeMap<String, Vec<(i64, u64)>>>,
    /// Plan → key text → quota use, for plans with a quota: each key in `plans`, and the key
    /// asked for if it used some of the current period.
    pub quota: BTreeMap<String, BTreeMap<String, QuotaUse>>,
    /// Set when the pending counts could not be written first (the answer lacks them).
    pub warning: Option<String>,
}

impl Report {
    /// The JSON answer (see the [module docs](self)).
    pub fn to_json(&self) -> Value {
        let plans: Map<String, Value> = self
            .plans
            .iter()
            .map(|(plan, keys)| {
                let keys: Map<String, Value> = keys
                    .iter()
                    .map(|(k, days)| {
                        let days: Vec<Value> = days
                            .iter()
                            .map(|(d, n)| json!([day_string(*d), n]))
                            .collect();
                        (k.clone(), Value::from(days))
                    })
                    .collect();
                (plan.clone(), Value::Object(keys))
            })
            .collect();
        let quota: Map<String, Value> = self
            .quota
            .iter()
            .map(|(plan, keys)| {
                let keys: Map<String, Value> =
                    keys.iter().map(|(k, q)| (k.clone(), q.to_json())).collect();
                (plan.clone(), Value::Object(keys))
            })
            .collect();
        let mut v = json!({
            "from": day_string(self.from_day),
            "to": day_string(self.to_day),
            "plans": plans,
            "quota": quota,
        });
        if let Some(w) = &self.warning {
            v["warning"] = json!(w);
        }
        v
    }
}

/// Why there is no report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The plan asked for is not in the config (404).
    #[error("{0}")]
    UnknownPlan(String),
    /// The store could not be read (500).
    #[error("{0}")]
    Store(String),
    /// The fleet's Redis did not answer (503: try again).
    #[error("{0}")]
    Unavailable(String),
}

fn unknown_plan(config: &Config, name: &str) -> ReportError {
    let names: Vec<&str> = config.usage_plans.iter().map(|p| p.name.as_str()).collect();
    ReportError::UnknownPlan(if names.is_empty() {
        format!("no usage plan `{name}`: no usage plans are configured")
    } else {
        format!(
            "no usage plan `{name}`; the plans are: {}",
            names.join(", ")
        )
    })
}

/// Where a report's counts come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The embedded store (`None`: nothing recorded yet).
    Local(Option<&'a Store>),
    /// The fleet's counts, read from Redis first ([`FleetCounts::fetch`]).
    Fleet(&'a FleetCounts),
}

/// A fleet's usage and quota use read from Redis (`limits.store: redis`) for one report:
/// every replica's counts, not only this process's.
#[derive(Clone, Debug, Default)]
pub struct FleetCounts {
    rows: Vec<(String, Vec<u8>, i64, u64)>,
    /// Plan → stored key → its use of the current period.
    quota: HashMap<String, HashMap<Vec<u8>, u64>>,
}

impl FleetCounts {
    /// Reads what `req` asks for from the fleet's Redis: the daily counts, then the quota use
    /// of each key they name (and of the key asked for) in each plan's current period.
    pub async fn fetch(
        store: &portcullis_limits::RedisStore,
        config: &Config,
        req: &UsageRequest,
        now_unix_nanos: i64,
    ) -> Result<FleetCounts, ReportError> {
        let err = |e: portcullis_limits::StoreError| {
            let msg = format!("reading usage from Redis: {e}");
            match e {
                portcullis_limits::StoreError::Timeout
                | portcullis_limits::StoreError::Unavailable(_) => ReportError::Unavailable(msg),
                _ => ReportError::Store(msg),
            }
        };
        let asked = req.key.as_ref().and_then(|(_, b)| StoredKey::from_bytes(b));
        let records = store
            .usage(
                req.plan.as_deref(),
                asked.as_ref(),
                req.from_day,
                req.to_day,
            )
            .await
            .map_err(err)?;
        let mut out = FleetCounts {
            rows: records
                .iter()
                .map(|r| (r.plan.clone(), r.key.to_bytes(), r.day, r.count))
                .collect(),
            quota: HashMap::new(),
        };
        let now_secs = now_unix_nanos.div_euclid(1_000_000_000);
        for d in &config.usage_plans {
            if req.plan.as_ref().is_some_and(|p| p != &d.name) {
                continue;
            }
            let Ok(Some(spec)) = plans::quota_spec(d) else {
                continue;
            };
            let mut keys: Vec<StoredKey> = records
                .iter()
                .filter(|r| r.plan == d.name)
                .map(|r| r.key.clone())
                .chain(asked.clone())
                .collect();
            keys.sort();
            keys.dedup();
            let (start, _) = spec.period(now_secs);
            let used = store.quota_used(&d.name, start, &keys).await.map_err(err)?;
            out.quota.insert(
                d.name.clone(),
                keys.iter().map(StoredKey::to_bytes).zip(used).collect(),
            );
        }
        Ok(out)
    }
}

/// The report `req` asks for, read from `source`, for the plans of `config`, at
/// `now_unix_nanos`. `running` gives a plan's running state by name, whose quota use is read
/// in memory; without it (`|_| None`, and always for a fleet), quota use is read from the
/// source.
pub fn report(
    source: Source<'_>,
    config: &Config,
    req: &UsageRequest,
    now_unix_nanos: i64,
    running: &dyn Fn(&str) -> Option<Arc<PlanRt>>,
) -> Result<Report, ReportError> {
    let defs: Vec<&UsagePlan> = match &req.plan {
        Some(name) => vec![config
            .usage_plans
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| unknown_plan(config, name))?],
        None => config.usage_plans.iter().collect(),
    };
    let mut r = Report {
        from_day: req.from_day,
        to_day: req.to_day,
        ..Report::default()
    };
    for d in &defs {
        r.plans.entry(d.name.clone()).or_default();
    }
    let store_err = |e: portcullis_store::StoreError| ReportError::Store(e.to_string());
    // The stored bytes of each key shown, by plan and text.
    let mut shown: HashMap<String, BTreeMap<String, Vec<u8>>> = HashMap::new();
    let rows: Vec<(String, Vec<u8>, i64, u64)> = match source {
        Source::Local(Some(store)) => store
            .usage(&UsageQuery {
                plan: req.plan.as_deref(),
                key: req.key.as_ref().map(|(_, b)| b.as_slice()),
                from_day: req.from_day,
                to_day: req.to_day,
            })
            .map_err(store_err)?
            .into_iter()
            .map(|r| (r.plan, r.key, r.day, r.count))
            .collect(),
        Source::Local(None) => Vec::new(),
        Source::Fleet(f) => f.rows.clone(),
    };
    for (plan, key, day, count) in rows {
        let text = key_to_text(&key);
        r.plans
            .entry(plan.clone())
            .or_default()
            .entry(text.clone())
            .or_default()
            .push((day, count));
        shown.entry(plan).or_default().insert(text, key);
    }
    let now_secs = now_unix_nanos.div_euclid(1_000_000_000);
    for d in &defs {
        let live = running(&d.name);
        let live = live.as_ref().and_then(|p| p.quota.as_ref());
        let spec = match (live, plans::quota_spec(d)) {
            (Some(q), _) => *q.quotas.spec(),
            (None, Ok(Some(spec))) => spec,
            _ => continue,
        };
        let (start, _) = spec.period(now_secs);
        let mut keys: Vec<(String, Vec<u8>, bool)> = shown
            .get(&d.name)
            .into_iter()
            .flatten()
            .map(|(t, b)| (t.clone(), b.clone(), true))
            .collect();
        if let Some((_, bytes)) = &req.key {
            if !keys.iter().any(|(_, b, _)| b == bytes) {
                keys.push((key_to_text(bytes), bytes.clone(), false));
            }
        }
        let mut stored: Option<HashMap<Vec<u8>, u64>> = None;
        for (text, bytes, listed) in keys {
            let literal = StoredKey::from_bytes(&bytes).and_then(|k| k.to_key());
            let used = match (live, literal) {
                (Some(q), Some(k)) => q.quotas.used(&k, now_unix_nanos),
                _ => {
                    if stored.is_none() {
                        stored = Some(match source {
                            Source::Local(Some(s)) => s
                                .load_quotas(&d.name, start)
                                .map_err(store_err)?
                                .into_iter()
                                .map(|(k, _, u)| (k, u))
                                .collect(),
                            Source::Local(None) => HashMap::new(),
                            Source::Fleet(f) => f.quota.get(&d.name).cloned().unwrap_or_default(),
                        });
                    }
                    stored
                        .as_ref()
                        .and_then(|m| m.get(&bytes).copied())
                        .unwrap_or(0)
                }
            };
            if listed || used > 0 {
                r.quota.entry(d.name.clone()).or_default().insert(
                    text,
                    QuotaUse {
                        limit: spec.limit,
                        per: spec.per.name(),
                        used,
                        period_start: start,
                    },
                );
            }
        }
    }
    Ok(r)
}

/// The store's file under the config's `state_dir`.
pub fn store_path(config: &Config) -> PathBuf {
    config.state_dir.join(portcullis_store::FILE_NAME)
}

/// Opens the store to read it while a proxy may be writing it (`portcullis usage`):
/// `Ok(None)` when it does not exist yet (no proxy with usage plans has run with this
/// `state_dir`). Creates nothing.
pub fn open_store(config: &Config) -> Result<Option<Store>, String> {
    let path = store_path(config);
    match std::fs::metadata(&path) {
        Ok(_) => Store::open(&config.state_dir)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

// ---------------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------------

/// `GET /api/v1/usage`, merged into the admin API behind its token.
pub fn routes() -> Router<Arc<Runtime>> {
    Router::new().route("/api/v1/usage", get(usage))
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn usage(
    State(rt): State<Arc<Runtime>>,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Response {
    let params = match q {
        Ok(Query(p)) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; the query takes `key`, `plan`, `from` and `to` (days as YYYY-MM-DD)",
                    e.body_text()
                ),
            )
        }
    };
    let shared = rt.shared.clone();
    let now = shared.limits.plans.clock.unix_nanos();
    let req = match params.parse(day_of(now)) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match answer(shared, req, now).await {
        Ok(r) => Json(r.to_json()).into_response(),
        Err(e @ ReportError::UnknownPlan(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ReportError::Unavailable(_)) => {
            tracing::warn!(target: "portcullis::limits", error = %e, "usage report: the fleet's store did not answer");
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => {
            tracing::error!(target: "portcullis::limits", error = %e, "usage report failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// The report, after writing the counts not yet written (so that it includes every request
/// so far): from the embedded store, or in a fleet from Redis, where they were sent.
async fn answer(
    shared: Arc<crate::Shared>,
    req: UsageRequest,
    now: i64,
) -> Result<Report, ReportError> {
    let snap = shared.snapshot.load_full();
    let (local, warning) = {
        let (shared, snap, req) = (shared.clone(), snap.clone(), req.clone());
        tokio::task::spawn_blocking(move || {
            let plans = &shared.limits.plans;
            let warning = plans.flush().err().map(|e| {
                tracing::warn!(target: "portcullis::limits", error = %e, "usage report: the pending counts could not be written");
                format!("the latest counts could not be written to the store, so they are missing here: {e}")
            });
            if plans.fleet_usage().is_some() {
                return Ok((None, warning));
            }
            let r = report(Source::Local(plans.store()), &snap.config, &req, now, &|n| {
                plans.running(n)
            })?;
            Ok::<_, ReportError>((Some(r), warning))
        })
        .await
        .map_err(|e| ReportError::Store(format!("the usage report failed: {e}")))??
    };
    let mut r = match (local, shared.limits.plans.fleet_usage()) {
        (Some(r), _) => r,
        (None, Some(store)) => {
            let counts = FleetCounts::fetch(store, &snap.config, &req, now).await?;
            report(Source::Fleet(&counts), &snap.config, &req, now, &|_| None)?
        }
        (None, None) => report(Source::Local(None), &snap.config, &req, now, &|_| None)?,
    };
    r.warning = warning;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_limits::quota::days_from_civil;

    fn day(s: &str) -> i64 {
        parse_day(s).unwrap()
    }

    fn params(key: Option<&str>, from: Option<&str>, to: Option<&str>) -> UsageParams {
        UsageParams {
            key: key.map(String::from),
            plan: None,
            from: from.map(String::from),
            to: to.map(String::from),
        }
    }

    #[test]
    fn the_span_defaults_to_the_last_30_days_ending_today() {
        let today = day("2026-12-06");
        let r = UsageParams::default().parse(today).unwrap();
        assert_eq!((r.from_day, r.to_day), (day("2026-11-07"), today));
        assert_eq!((r.key, r.plan), (None, None));
        // Only `to`: the 30 days ending then. Only `from`: up to today.
        let r = params(None, None, Some("2026-01-31")).parse(today).unwrap();
        assert_eq!(
            (r.from_day, r.to_day),
            (day("2026-01-02"), day("2026-01-31"))
        );
        let r = params(None, Some("2026-12-01"), None).parse(today).unwrap();
        assert_eq!((r.from_day, r.to_day), (day("2026-12-01"), today));
        // One day, and empty values as not given.
        let r = params(Some(""), Some("2026-12-06"), Some("2026-12-06"))
            .parse(today)
            .unwrap();
        assert_eq!((r.from_day, r.to_day, r.key), (today, today, None));
        let r = params(None, Some(""), Some("")).parse(today).unwrap();
        assert_eq!(r.from_day, day("2026-11-07"));
    }

    #[test]
    fn bad_days_and_spans_say_what_to_write() {
        let today = day("2026-12-06");
        let err =
            |from: Option<&str>, to: Option<&str>| params(None, from, to).parse(today).unwrap_err();
        let e = err(Some("2026-13-01"), None);
        assert!(
            e.starts_with("`from`: ") && e.contains("no month 13"),
            "{e}"
        );
        let e = err(None, Some("yesterday"));
        assert!(e.starts_with("`to`: ") && e.contains("YYYY-MM-DD"), "{e}");
        let e = err(Some("2027-02-29"), Some("2027-03-01"));
        assert!(e.contains("not a leap year"), "{e}");
        let e = err(Some("2026-12-07"), Some("2026-12-06"));
        assert_eq!(
            e,
            "`from` (2026-12-07) is after `to` (2026-12-06): give `from` on or before `to`"
        );
        let e = err(Some("2027-01-01"), None);
        assert!(e.contains("after today (2026-12-06)"), "{e}");
        // 366 days is fine (a leap year); 367 is not.
        assert!(params(None, Some("2028-01-01"), Some("2028-12-31"))
            .parse(today)
            .is_ok());
        let e = err(Some("2025-12-05"), None);
        assert!(
            e.contains("is 367 days") && e.contains("at most 366"),
            "{e}"
        );
    }

    #[test]
    fn keys_as_text_are_principals_addresses_or_digests() {
        let stored = |k: Key| StoredKey::of(&k).to_bytes();
        assert_eq!(
            key_from_text("dev/alice").unwrap(),
            stored(Key::from("dev/alice"))
        );
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(key_from_text("192.0.2.7").unwrap(), stored(Key::from(v4)));
        assert_eq!(key_from_text("192.0.2.7").unwrap(), vec![0, 192, 0, 2, 7]);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(key_from_text("2001:db8::1").unwrap(), stored(Key::from(v6)));
        // The mapped form is the IPv4 caller.
        assert_eq!(
            key_from_text("::ffff:192.0.2.7").unwrap(),
            stored(Key::from(v4))
        );
        // A principal too long to keep is kept hashed: its full text and its digest match.
        let long = format!("agents/{}", "x".repeat(300));
        let hashed = stored(Key::from(long.as_str()));
        assert_eq!(key_from_text(&long).unwrap(), hashed);
        let text = key_to_text(&hashed);
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 44,
            "{text}"
        );
        assert_eq!(key_from_text(&text).unwrap(), hashed);

        for bad in ["alice", "sha256:abc", "sha256:zz", "0x", "192.0.2.300"] {
            let e = key_from_text(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
        assert!(key_from_text("alice")
            .unwrap_err()
            .contains("provider/subject"));
        let e = params(Some("alice"), None, None)
            .parse(day("2026-12-06"))
            .unwrap_err();
        assert!(e.starts_with("`key`: "), "{e}");
    }

    #[test]
    fn every_stored_key_reads_back_from_its_text() {
        let keys = [
            Key::from("dev/alice"),
            Key::from("agents/deploy-bot-1"),
            Key::from(IpAddr::from([127, 0, 0, 1])),
            Key::from("2001:db8::1".parse::<IpAddr>().unwrap()),
            // Four bytes of text with a slash: a principal, not an address.
            Key::from("a/bc"),
            // Control characters, and a principal that looks like hex.
            Key::new(b"dev/\x01bell"),
            Key::from("0xab/cd"),
            Key::new(&[0xff, 0xfe, 0x00]),
            Key::new(&[b'k'; 400]),
        ];
        let texts: Vec<String> = keys
            .iter()
            .map(|k| {
                let bytes = StoredKey::of(k).to_bytes();
                let text = key_to_text(&bytes);
                assert_eq!(key_from_text(&text).unwrap(), bytes, "{text}");
                text
            })
            .collect();
        assert_eq!(
            &texts[..8],
            [
                "dev/alice",
                "agents/deploy-bot-1",
                "127.0.0.1",
                "2001:db8::1",
                "a/bc",
                "0x6465762f0162656c6c",
                "0xab/cd",
                "0xfffe00"
            ]
        );
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let d = days_from_civil(2026, 12, 6) * SECS_PER_DAY;
        assert_eq!(rfc3339(d), "2026-12-06T00:00:00Z");
        assert_eq!(rfc3339(d + 9 * 3600 + 30 * 60 + 5), "2026-12-06T09:30:05Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    fn config(dir: &std::path::Path) -> Config {
        let path = dir.join("p.yaml");
        std::fs::write(
            &path,
            "usage_plans:\n  - { name: agents, rate: 10/s, quota: { limit: 100, per: day } }\n  - { name: visitors, rate: 10/s }\n",
        )
        .unwrap();
        portcullis_config::load(&path).unwrap()
    }

    #[test]
    fn a_report_groups_by_plan_and_key_with_the_quota_from_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        assert_eq!(store_path(&cfg), tmp.path().join("state/portcullis.db"));
        assert!(open_store(&cfg).unwrap().is_none(), "nothing yet");
        assert!(!tmp.path().join("state").exists(), "and nothing created");
        let store = Store::open(&cfg.state_dir).unwrap();
        let d = day("2026-12-06");
        let noon = (d * SECS_PER_DAY + 12 * 3600) * 1_000_000_000;
        let key = |t: &str| key_from_text(t).unwrap();
        store
            .flush(
                &[(
                    "agents",
                    &[
                        (key("dev/alice"), d * SECS_PER_DAY, 7),
                        // A past period's use is not the current one's.
                        (key("dev/bob"), (d - 1) * SECS_PER_DAY, 9),
                    ],
                )],
                &[
                    (
                        "agents",
                        &[
                            (key("dev/alice"), d - 1, 2),
                            (key("dev/alice"), d, 7),
                            (key("dev/bob"), d - 1, 9),
                        ],
                    ),
                    ("visitors", &[(key("127.0.0.1"), d, 4)]),
                    ("retired", &[(key("dev/alice"), d, 1)]),
                ],
            )
            .unwrap();
        let store = open_store(&cfg).unwrap().expect("the store");
        let req = |q: UsageParams| q.parse(d).unwrap();
        let r = report(
            Source::Local(Some(&store)),
            &cfg,
            &req(UsageParams::default()),
            noon,
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            r.to_json(),
            json!({
                "from": "2026-11-07", "to": "2026-12-06",
                "plans": {
                    "agents": {
                        "dev/alice": [["2026-12-05", 2], ["2026-12-06", 7]],
                        "dev/bob": [["2026-12-05", 9]],
                    },
                    "visitors": { "127.0.0.1": [["2026-12-06", 4]] },
                    "retired": { "dev/alice": [["2026-12-06", 1]] },
                },
                "quota": { "agents": {
                    "dev/alice": { "limit": 100, "per": "day", "used": 7, "remaining": 93,
                                   "period_start": "2026-12-06T00:00:00Z" },
                    "dev/bob": { "limit": 100, "per": "day", "used": 0, "remaining": 100,
                                 "period_start": "2026-12-06T00:00:00Z" },
                }},
            })
        );
        // One key, one plan, one day.
        let q = UsageParams {
            key: Some("dev/alice".into()),
            plan: Some("agents".into()),
            from: Some("2026-12-06".into()),
            to: None,
        };
        let r = report(Source::Local(Some(&store)), &cfg, &req(q), noon, &|_| None).unwrap();
        assert_eq!(
            r.to_json()["plans"],
            json!({ "agents": { "dev/alice": [["2026-12-06", 7]] } })
        );
        assert_eq!(r.quota["agents"]["dev/alice"].used, 7);
        // A key with no requests in the span still shows its quota use.
        let q = UsageParams {
            key: Some("dev/alice".into()),
            from: Some("2026-11-01".into()),
            to: Some("2026-11-30".into()),
            ..Default::default()
        };
        let r = report(Source::Local(Some(&store)), &cfg, &req(q), noon, &|_| None).unwrap();
        assert_eq!(
            r.to_json()["plans"],
            json!({ "agents": {}, "visitors": {} })
        );
        assert_eq!(r.quota["agents"]["dev/alice"].remaining(), 93);
        // An address.
        let q = UsageParams {
            key: Some("127.0.0.1".into()),
            ..Default::default()
        };
        let r = report(Source::Local(Some(&store)), &cfg, &req(q), noon, &|_| None).unwrap();
        assert_eq!(r.plans["visitors"]["127.0.0.1"], vec![(d, 4)]);
        assert!(r.quota.is_empty());
        // An unknown plan names the known ones; no store is no requests.
        let q = UsageParams {
            plan: Some("gold".into()),
            ..Default::default()
        };
        let e = report(Source::Local(Some(&store)), &cfg, &req(q), noon, &|_| None).unwrap_err();
        assert!(matches!(e, ReportError::UnknownPlan(_)));
        assert_eq!(
            e.to_string(),
            "no usage plan `gold`; the plans are: agents, visitors"
        );
        let r = report(
            Source::Local(None),
            &cfg,
            &req(UsageParams::default()),
            noon,
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            r.to_json()["plans"],
            json!({ "agents": {}, "visitors": {} })
        );
        assert_eq!(r.to_json()["quota"], json!({}));
    }

    #[test]
    fn the_running_quota_is_read_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let d = day("2026-12-06");
        let clock = Arc::new(portcullis_limits::ManualWallClock::from_unix_secs(
            d * SECS_PER_DAY + 3600,
        ));
        let reg =
            plans::PlanRegistry::new(Some(Store::open(&cfg.state_dir).unwrap()), clock.clone());
        let p = reg.plan(&cfg.usage_plans[0]).unwrap();
        let now = || portcullis_limits::WallClock::unix_nanos(&*clock);
        for _ in 0..3 {
            let v = p.check(
                &p.own,
                &Key::from("dev/alice"),
                portcullis_limits::Clock::now(&portcullis_limits::MonotonicClock),
                now(),
            );
            assert!(v.allowed());
        }
        reg.flush().unwrap();
        // One more, not written yet: the running plan has it, the store does not.
        assert!(p
            .check(
                &p.own,
                &Key::from("dev/alice"),
                portcullis_limits::Clock::now(&portcullis_limits::MonotonicClock),
                now(),
            )
            .allowed());
        let req = UsageParams::default().parse(d).unwrap();
        let live = report(Source::Local(reg.store()), &cfg, &req, now(), &|n| {
            reg.running(n)
        })
        .unwrap();
        assert_eq!(live.plans["agents"]["dev/alice"], vec![(d, 3)]);
        assert_eq!(live.quota["agents"]["dev/alice"].used, 4);
        let offline = report(Source::Local(reg.store()), &cfg, &req, now(), &|_| None).unwrap();
        assert_eq!(offline.quota["agents"]["dev/alice"].used, 3);
    }
}
