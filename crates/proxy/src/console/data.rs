//! What the console shows, as JSON: `GET /api/v1/dashboard` (one look) and
//! `GET /api/v1/dashboard/stream` (server-sent events, one `dashboard` event a second).
//!
//! One look holds the listeners and routes (request rates by status class and decision,
//! p50/p99 latency over the last second), the backends and servers HAProxy-style, the
//! identity providers' keys, the stick tables' top keys and the workflow executions. Each
//! part is there only when the viewer may read it (`backends.read`, `config.read`,
//! `table.read`, `workflow.read`), and each thing the console can act on says whether the
//! viewer may (`can`), so the page offers only the actions the viewer's policy permits. Rates
//! are differences between two looks, kept per stream in a [`Ticker`].

use crate::admin_authz::Caller;
use crate::Runtime;
use portcullis_policy::admin::AdminResource;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

/// How many keys of each stick table one look shows.
const TOP_KEYS: usize = 10;
/// How many executions one look shows (newest first).
const EXECUTIONS: usize = 50;

/// What the previous look saw, so that this one can give rates.
#[derive(Default)]
pub struct Ticker {
    at: Option<Instant>,
    routes: HashMap<String, RoutePrev>,
    servers: HashMap<String, u64>,
    /// In a fleet: each table's last listing from Redis, and when it was read.
    fleet_tables: HashMap<String, (Instant, Value)>,
}

#[derive(Default, Clone)]
struct RoutePrev {
    classes: [u64; 5],
    decisions: [u64; 3],
    buckets: Vec<(f64, u64)>,
}

fn rfc3339(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// One look at everything the viewer may read.
pub async fn look(rt: &Runtime, caller: &Caller, ticker: &mut Ticker) -> Value {
    let snap = rt.shared.snapshot.load_full();
    let now = Instant::now();
    let secs = ticker
        .at
        .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    ticker.at = Some(now);
    let may = |action: &str| caller.may(&snap, action, &AdminResource::Config);
    let mut out = json!({
        "at": rfc3339(SystemTime::now()),
        "version": snap.config.version,
        "viewer": caller.name(),
        "interval_s": secs,
    });
    if may("backends.read") {
        out["listeners"] = listeners(rt, &snap);
        out["routes"] = routes(&snap, ticker, secs);
        out["backends"] = backends(&snap, caller, ticker, secs);
    }
    if may("config.read") {
        out["identity"] = identity(&snap);
    }
    // Each table and execution shown needs the read its own page would (a permit on the
    // config alone shows none of them).
    let t = tables(rt, &snap, caller, ticker).await;
    if may("table.read") || !t.is_empty() {
        out["tables"] = Value::Array(t);
    }
    let e = executions(rt, &snap, caller).await;
    if may("workflow.read") || !e.is_empty() {
        out["executions"] = Value::Array(e);
    }
    out["can"] = json!({
        "usage": may("usage.read"),
        "events": may("events.read"),
        "audit": may("audit.read"),
        "workflows": may("workflow.read"),
    });
    out
}

fn listeners(rt: &Runtime, snap: &crate::snapshot::Snapshot) -> Value {
    let m = &rt.shared.metrics;
    snap.config
        .listeners
        .iter()
        .map(|l| {
            let conns = m
                .active_connections
                .get_or_create(&vec![("listener", l.name.clone())])
                .get();
            json!({ "name": l.name, "bind": l.bind, "tls": l.tls.is_some(), "connections": conns })
        })
        .collect()
}

/// Cumulative `(upper bound, count)` pairs of a histogram. (prometheus-client keeps them
/// to itself; its text encoding is the public way to read them.)
fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("h", "", h.clone());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &reg).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("h_bucket{le=\"")?;
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two cumulative bucket lists, interpolated
/// within its bucket as Prometheus's `histogram_quantile` does. `None` without observations.
pub fn quantile(q: f64, now: &[(f64, u64)], before: &[(f64, u64)]) -> Option<f64> {
    let delta: Vec<(f64, u64)> = now
        .iter()
        .enumerate()
        .map(|(i, (le, n))| (*le, n.saturating_sub(before.get(i).map_or(0, |b| b.1))))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (le, cum) in delta {
        if cum as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = (cum - below) as f64;
            let frac = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        (lower, below) = (le, cum);
    }
    Some(lower)
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    let r = now.saturating_sub(before) as f64 / secs;
    (r * 10.0).round() / 10.0
}

fn routes(snap: &crate::snapshot::Snapshot, ticker: &mut Ticker, secs: f64) -> Value {
    let mut list = Vec::new();
    for r in &snap.routes {
        let classes: [u64; 5] = std::array::from_fn(|i| r.by_class[i].get());
        let decisions: [u64; 3] = std::array::from_fn(|i| r.decisions[i].get());
        let b = buckets(&r.duration);
        let prev = ticker.routes.get(&*r.id).cloned().unwrap_or_default();
        let ms = |q| quantile(q, &b, &prev.buckets).map(|s| (s * 1e5).round() / 100.0);
        let class_rates: Vec<f64> = (0..5)
            .map(|i| rate(classes[i], prev.classes[i], secs))
            .collect();
        list.push(json!({
            "id": &*r.id,
            "backend": r.backend.id,
            "total": classes.iter().sum::<u64>(),
            "rps": (class_rates.iter().sum::<f64>() * 10.0).round() / 10.0,
            "codes": { "1xx": class_rates[0], "2xx": class_rates[1], "3xx": class_rates[2], "4xx": class_rates[3], "5xx": class_rates[4] },
            "decisions": {
                "allow": rate(decisions[0], prev.decisions[0], secs),
                "deny": rate(decisions[1], prev.decisions[1], secs),
                "would_deny": rate(decisions[2], prev.decisions[2], secs),
            },
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
        }));
        ticker.routes.insert(
            r.id.to_string(),
            RoutePrev {
                classes,
                decisions,
                buckets: b,
            },
        );
    }
    Value::Array(list)
}

/// HAProxy's word for a server's state: MAINT, DOWN, EJECTED, DRAIN or UP.
pub fn state_word(st: &crate::state::ServerState) -> &'static str {
    use crate::state::AdminState;
    match st.admin_state() {
        AdminState::Maint => "MAINT",
        _ if !st.healthy() => "DOWN",
        _ if st.ejected() => "EJECTED",
        AdminState::Drain => "DRAIN",
        AdminState::Ready => "UP",
    }
}

fn backends(
    snap: &crate::snapshot::Snapshot,
    caller: &Caller,
    ticker: &mut Ticker,
    secs: f64,
) -> Value {
    let mut list = Vec::new();
    for b in &snap.backends {
        let mut servers = Vec::new();
        for (srv, slot) in b.servers.iter().zip(&b.slots) {
            let st = &slot.state;
            let total = st.total.load(Ordering::Relaxed);
            let prev = ticker
                .servers
                .insert(st.key.clone(), total)
                .unwrap_or(total);
            let check = st
                .last_check()
                .map(|c| json!({ "at": rfc3339(c.at), "ok": c.ok, "detail": c.detail }));
            let res = AdminResource::Server {
                backend: b.id.clone(),
                server: srv.name.clone(),
            };
            servers.push(json!({
                "name": srv.name,
                "address": srv.address,
                "state": state_word(st),
                "admin": st.admin_state(),
                "check": check,
                "health_checked": b.health.is_some(),
                "weight": st.weight_override().unwrap_or(slot.weight),
                "config_weight": slot.weight,
                "active": st.active.load(Ordering::Relaxed),
                "max_connections": srv.max_connections,
                "queued": st.queued.load(Ordering::Relaxed),
                "rps": rate(total, prev, secs),
                "total": total,
                "errors": st.errors(),
                "ejections": st.ejection_count(),
                "downtime_s": st.downtime().as_secs(),
                "can": {
                    "state": caller.may(snap, "server.set_state", &res),
                    "weight": caller.may(snap, "server.set_weight", &res),
                },
            }));
        }
        list.push(json!({
            "id": b.id,
            "in_flight": b.in_flight.load(Ordering::Relaxed),
            "retries": b.retry_counter.get(),
            "servers": servers,
        }));
    }
    Value::Array(list)
}

fn identity(snap: &crate::snapshot::Snapshot) -> Value {
    let mut list: Vec<Value> = snap
        .identity
        .providers()
        .map(|(name, p)| {
            let mut v = json!({
                "name": name,
                "kind": format!("{:?}", p.kind).to_ascii_lowercase(),
                "issuer": p.issuer,
                "login": p.login().is_some(),
            });
            if let Some(ks) = p.key_source() {
                let h = ks.health();
                let (kids, unnamed) = ks.keys().kids();
                v["keys"] = json!({
                    "kids": kids,
                    "without_kid": unnamed,
                    "last_fetch": h.last_ok.map(rfc3339),
                    "last_error": h.last_error.map(|(t, e)| json!({ "at": rfc3339(t), "error": e })),
                    "failures": h.failures,
                    "failing_in_a_row": h.in_a_row,
                });
            }
            v
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Value::Array(list)
}

/// Keys of one table a dashboard listing reads from Redis, at most (the API reads more).
const FLEET_DASHBOARD_KEYS: usize = 10_000;
/// How long a viewer's dashboard shows a table's listing from Redis before reading it again.
const FLEET_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Each table's top entries: in a fleet the fleet's, read from Redis at most every
/// [`FLEET_REFRESH`] per viewer (the process's own when Redis does not answer, said in
/// `source`).
async fn tables(
    rt: &Runtime,
    snap: &crate::snapshot::Snapshot,
    caller: &Caller,
    ticker: &mut Ticker,
) -> Vec<Value> {
    let mut out = Vec::new();
    for def in &snap.config.stick_tables {
        let res = AdminResource::Table(def.name.clone());
        if !caller.may(snap, "table.read", &res) {
            continue;
        }
        let listed = match &rt.shared.limits.fleet {
            Some(f) => fleet_listing(rt, f, &def.name, ticker).await,
            None => crate::admin_tables::top(rt, &def.name, TOP_KEYS, None).ok(),
        };
        let Some(mut v) = listed else { continue };
        v["can"] = json!({ "clear": caller.may(snap, "table.clear", &res) });
        out.push(v);
    }
    out
}

async fn fleet_listing(
    rt: &Runtime,
    f: &crate::limits::Fleet,
    name: &str,
    ticker: &mut Ticker,
) -> Option<Value> {
    if let Some((at, v)) = ticker.fleet_tables.get(name) {
        if at.elapsed() < FLEET_REFRESH {
            return Some(v.clone());
        }
    }
    let read = crate::admin_tables::fleet_top(rt, f, name, TOP_KEYS, None, FLEET_DASHBOARD_KEYS);
    match read.await {
        Ok(v) => {
            ticker
                .fleet_tables
                .insert(name.to_string(), (Instant::now(), v.clone()));
            Some(v)
        }
        Err(e) => {
            let mut v = crate::admin_tables::top(rt, name, TOP_KEYS, None).ok()?;
            v["source"] = json!("local");
            v["error"] = json!(format!("Redis did not answer: {e}"));
            Some(v)
        }
    }
}

async fn executions(rt: &Runtime, snap: &crate::snapshot::Snapshot, caller: &Caller) -> Vec<Value> {
    use portcullis_automation::workflow::store::ListFilter;
    let Some(svc) = rt.workflows.service() else {
        return Vec::new();
    };
    let store = svc.runner.store().clone();
    let rows = tokio::task::spawn_blocking(move || {
        store.list(&ListFilter {
            workflow: None,
            status: None,
            limit: EXECUTIONS,
        })
    })
    .await;
    let Ok(Ok(rows)) = rows else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|r| {
            let res = crate::admin_workflows::execution(r);
            if !caller.may(snap, "workflow.read", &res) {
                return None;
            }
            let mut v = crate::admin_workflows::summary(r);
            v["can"] = json!({
                "stop": caller.may(snap, "workflow.stop", &res),
                "callback": caller.may(snap, "workflow.callback", &res),
            });
            // Inputs and outputs can be large, and the list does not show them.
            if let Some(o) = v.as_object_mut() {
                o.remove("input");
                o.remove("output");
            }
            Some(v)
        })
        .collect()
}

/// `GET /api/v1/dashboard/stream`: one look now, then one a second.
pub fn stream(
    rt: std::sync::Arc<Runtime>,
    caller: Caller,
    credential: Option<super::credential::Credential>,
) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The caller's credential and `dashboard.read` are checked again before each look: a
    // stream ends with a sign-out, a removed token, an expired session or a policy reloaded.
    let recheck = super::credential::Recheck::new(credential);
    let state = (rt, caller, Ticker::default(), tick, recheck);
    let looks = futures_util::stream::unfold(
        state,
        |(rt, caller, mut ticker, mut tick, mut recheck)| async move {
            tick.tick().await;
            let may = |snap: &crate::snapshot::Snapshot| {
                caller.may(
                    snap,
                    "dashboard.read",
                    &portcullis_policy::admin::AdminResource::Config,
                )
            };
            if !recheck.still(&rt, may).await {
                return None;
            }
            let v = look(&rt, &caller, &mut ticker).await;
            let e = Event::default().event("dashboard").data(v.to_string());
            Some((
                Ok::<_, std::convert::Infallible>(e),
                (rt, caller, ticker, tick, recheck),
            ))
        },
    );
    Sse::new(looks)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let inf = f64::INFINITY;
        let before = vec![(0.001, 0), (0.002, 0), (0.004, 0), (inf, 0)];
        // 100 observations: 50 under 1 ms, 40 in (1, 2] ms, 10 in (2, 4] ms.
        let now = vec![(0.001, 50), (0.002, 90), (0.004, 100), (inf, 100)];
        let p50 = quantile(0.5, &now, &before).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p99 = quantile(0.99, &now, &before).unwrap();
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        // Only what happened since the last look counts.
        assert_eq!(quantile(0.5, &now, &now), None);
        let later = vec![(0.001, 50), (0.002, 90), (0.004, 100), (inf, 110)];
        assert_eq!(
            quantile(0.99, &later, &now),
            Some(0.004),
            "+Inf: the last bound"
        );
    }

    #[test]
    fn rates_are_per_second_over_the_interval() {
        assert_eq!(rate(150, 50, 2.0), 50.0);
        assert_eq!(
            rate(50, 150, 2.0),
            0.0,
            "a counter that went back (a new route)"
        );
        assert_eq!(rate(150, 50, 0.0), 0.0, "the first look has no rate");
    }

    #[test]
    fn a_histograms_buckets_are_read_back() {
        let h = Histogram::new([0.001, 0.01]);
        h.observe(0.0005);
        h.observe(0.005);
        h.observe(1.0);
        assert_eq!(buckets(&h), vec![(0.001, 1), (0.01, 2), (f64::INFINITY, 3)]);
    }
}
