//! The proxy's events: the bus that carries them to the sinks of `events:` (webhooks with
//! their outbox, NATS, files), the instance's CloudEvents `source`, the in-process
//! subscription that automation reads, and the emitters (see `docs/events.md`). Emitting
//! never waits: a full queue drops the event and counts it (see `portcullis_events::Bus`).
//!
//! What emits what:
//!
//! * **Servers** (`server.up|down|ejected|restored`, `backend.unhealthy`): a
//!   [`Watcher`](crate::state::Watcher) set on the server registry by [`watch`] hears each
//!   change of health (`crate::health`) and ejection (`crate::state`), and counts the
//!   backend's servers in rotation in the running snapshot.
//! * **Request-level events** (`limit.exceeded`, `auth.denial_burst`, `auth.failure_burst`)
//!   are never one per request: the limit, identify and authorize phases count refusals in
//!   [`Windows`] (one map update, nothing at all when no sink listens), and one event per
//!   window and key comes out (`events.aggregate` sets the windows).
//! * **Reloads** (`config.reloaded`, `config.rejected`): `Runtime::reload`, through
//!   [`reloaded`] and [`rejected`].
//! * **Audit overload** (`audit.overload`): [`watch`] polls the count of audit records that
//!   could not be written.
//!
//! The bus is built at start; a reload that changes `events:` takes effect at the next
//! restart (and says so in the log).

use crate::state::{AdminState, Change, ServerState};
use crate::Shared;
use portcullis_config::{Config, Diagnostic};
use portcullis_events::types::{AuditOverload, BackendData, ConfigRejected, ConfigReloaded};
use portcullis_events::{
    types, Aggregator, Bus, Event, EventsCfg, ServerChange, ServerData, Source, TypeFilter,
};
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Events queued for automation at most; beyond that they are dropped and counted.
pub const AUTOMATION_QUEUE: usize = 10_000;

/// How often the count of audit records that could not be written is read.
pub const AUDIT_POLL: Duration = Duration::from_secs(10);

/// The bus, this instance's source, and the windows request-level events are counted in.
pub struct Events {
    pub bus: Bus,
    pub source: Source,
    pub windows: Windows,
}

/// The aggregators of request-level events. Their publishers run when the bus has a sink or
/// a subscriber; otherwise nothing is ever counted in them.
pub struct Windows {
    /// `limit.exceeded`: subject the table or `plan:<name>`, key the caller.
    pub limits: Arc<Aggregator>,
    /// `auth.denial_burst`: subject the route, key the client address.
    pub denials: Arc<Aggregator>,
    /// `auth.failure_burst`: subject the route, key the client address.
    pub failures: Arc<Aggregator>,
}

impl Windows {
    fn new(cfg: &AggregateCfg) -> Windows {
        let agg = |type_: &str, w: &WindowCfg| {
            Arc::new(Aggregator::new(type_, w.window, cfg.max_keys).min_count(w.min_count))
        };
        Windows {
            limits: agg(types::LIMIT_EXCEEDED, &cfg.limit_exceeded),
            denials: agg(types::AUTH_DENIAL_BURST, &cfg.denial_burst),
            failures: agg(types::AUTH_FAILURE_BURST, &cfg.failure_burst),
        }
    }

    /// Publishes each aggregator's closed windows on `bus`, until it shuts down.
    fn spawn(&self, bus: &Bus, source: &Source) {
        for agg in [&self.limits, &self.denials, &self.failures] {
            // A tenth of the window, within [100ms, 1s]: a window is reported at most that
            // late.
            let tick =
                (agg.window() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
            agg.clone().spawn(bus.clone(), source.clone(), tick);
        }
    }
}

impl Events {
    /// No sinks and no subscribers: emitting costs a check.
    pub fn off(source: Source) -> Events {
        Events {
            bus: Bus::builder().build(),
            source,
            windows: Windows::new(&AggregateCfg::default()),
        }
    }

    /// The bus `config` describes, started with the publishers of its windows, and (when
    /// the config has triggers) the subscription automation reads. `store` keeps durable
    /// webhooks' outboxes.
    pub async fn start(
        config: &Config,
        store: Option<&portcullis_store::Store>,
        source: Source,
    ) -> Result<(Events, Option<mpsc::Receiver<Arc<Event>>>), String> {
        let cfg = events_cfg(config).map_err(|d| d.to_string())?;
        let aggregate = aggregate_cfg(config).map_err(|d| d.to_string())?;
        let mut builder = Bus::builder_from_config(&cfg, store)
            .await
            .map_err(|e| e.to_string())?;
        let rx = (!config.triggers.is_null())
            .then(|| builder.subscribe("automation", AUTOMATION_QUEUE, TypeFilter::any()));
        let bus = builder.build();
        let windows = Windows::new(&aggregate);
        if bus.is_active() {
            windows.spawn(&bus, &source);
        }
        Ok((
            Events {
                bus,
                source,
                windows,
            },
            rx,
        ))
    }

    /// Publishes `event`; never blocks.
    pub fn emit(&self, event: Event) {
        self.bus.publish(event);
    }

    /// Emits `event`, resolving once every sink that takes it has handed it on (a durable
    /// webhook sink has written it to its outbox): `true`, or `false` when a sink's queue was
    /// full. See `Bus::publish_handed_on`.
    pub fn emit_handed_on(&self, event: Event) -> impl std::future::Future<Output = bool> {
        self.bus.publish_handed_on(event)
    }

    /// Whether anything listens: emitters check this before building an event.
    #[inline]
    pub fn active(&self) -> bool {
        self.bus.is_active()
    }

    /// A limit refused a request: `by` is the table or `plan:<name>` (the event's subject),
    /// `key` names the caller (built only when something listens).
    #[inline]
    pub fn limit_refused(&self, by: &str, key: impl FnOnce() -> String) {
        if self.active() {
            self.windows.limits.hit(by, &key());
        }
    }

    /// Policy denied a request (403) on `route` from `ip`.
    #[inline]
    pub fn denied(&self, route: &str, ip: IpAddr) {
        if self.active() {
            hit_ip(&self.windows.denials, route, ip);
        }
    }

    /// Identify refused a request (401) on `route` from `ip`.
    #[inline]
    pub fn auth_failed(&self, route: &str, ip: IpAddr) {
        if self.active() {
            hit_ip(&self.windows.failures, route, ip);
        }
    }
}

/// Counts a hit keyed by an address, formatted on the stack (a key already tracked costs no
/// allocation).
fn hit_ip(agg: &Aggregator, subject: &str, ip: IpAddr) {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut w = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(w, "{ip}");
    let n = usize::try_from(w.position()).unwrap_or(0);
    agg.hit(subject, std::str::from_utf8(&buf[..n]).unwrap_or(""));
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// `events.aggregate`: the windows request-level events are counted in. Read by the proxy
/// (the events crate's `EventsCfg` takes the sinks).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateCfg {
    #[serde(default = "limit_window")]
    pub limit_exceeded: WindowCfg,
    #[serde(default = "burst_window")]
    pub denial_burst: WindowCfg,
    #[serde(default = "burst_window")]
    pub failure_burst: WindowCfg,
    /// Keys (subject and key pairs) each aggregator tracks at once; hits of new keys past it
    /// are not counted.
    #[serde(default = "max_keys")]
    pub max_keys: usize,
}

impl Default for AggregateCfg {
    fn default() -> Self {
        AggregateCfg {
            limit_exceeded: limit_window(),
            denial_burst: burst_window(),
            failure_burst: burst_window(),
            max_keys: max_keys(),
        }
    }
}

/// One aggregator's window: a key's window opens at its first hit and lasts `window`; it is
/// reported if it counted at least `min_count`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowCfg {
    #[serde(deserialize_with = "portcullis_events::config::duration::deserialize")]
    pub window: Duration,
    #[serde(default = "one")]
    pub min_count: u64,
}

fn limit_window() -> WindowCfg {
    WindowCfg {
        window: Duration::from_secs(10),
        min_count: 1,
    }
}
fn burst_window() -> WindowCfg {
    WindowCfg {
        window: Duration::from_secs(60),
        min_count: 10,
    }
}
fn max_keys() -> usize {
    10_000
}
fn one() -> u64 {
    1
}

/// `events:` without `aggregate`, with `${env:}` and `${file:}` expanded in the keys that
/// take them (see [`EXPANDED`]), and where a problem is.
fn sinks_value(config: &Config) -> Result<Value, Diagnostic> {
    let mut value = config.events.clone();
    if let Value::Object(map) = &mut value {
        map.remove("aggregate");
    }
    let base = config
        .root
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if let Some(Value::Array(sinks)) = value.get_mut("sinks") {
        for (i, sink) in sinks.iter_mut().enumerate() {
            for (kind, key) in EXPANDED {
                let Some(Value::String(s)) = sink.get_mut(*kind).and_then(|k| k.get_mut(*key))
                else {
                    continue;
                };
                if !s.contains("${") {
                    continue;
                }
                let at = format!("events.sinks[{i}].{kind}.{key}");
                *s = portcullis_config::expand(s, &base)
                    .map_err(|e| config.root_loc(&at).diag(format!("{at}: {e}")))?;
            }
        }
    }
    Ok(value)
}

/// The keys of a sink where `${env:NAME}` and `${file:PATH}` are expanded.
pub const EXPANDED: &[(&str, &str)] = &[("webhook", "secret"), ("webhook", "url"), ("nats", "url")];

/// `events:` as the events engine reads it (none when absent).
pub fn events_cfg(config: &Config) -> Result<EventsCfg, Diagnostic> {
    if config.events.is_null() {
        return Ok(EventsCfg::default());
    }
    let at = config.root_loc("events");
    let cfg: EventsCfg = serde_json::from_value(sinks_value(config)?)
        .map_err(|e| at.diag(format!("events: {e}")))?;
    cfg.validate()
        .map_err(|e| at.diag(format!("events: {e}")))?;
    aggregate_cfg(config)?;
    Ok(cfg)
}

/// `events.aggregate` (the defaults when absent).
pub fn aggregate_cfg(config: &Config) -> Result<AggregateCfg, Diagnostic> {
    let Some(v) = config.events.get("aggregate") else {
        return Ok(AggregateCfg::default());
    };
    let at = config.root_loc("events.aggregate");
    let cfg: AggregateCfg =
        serde_json::from_value(v.clone()).map_err(|e| at.diag(format!("events.aggregate: {e}")))?;
    for (name, w) in [
        ("limit_exceeded", &cfg.limit_exceeded),
        ("denial_burst", &cfg.denial_burst),
        ("failure_burst", &cfg.failure_burst),
    ] {
        if w.window < Duration::from_millis(100) {
            return Err(at.diag(format!(
                "events.aggregate.{name}.window must be at least 100ms"
            )));
        }
        if w.min_count == 0 {
            return Err(at.diag(format!(
                "events.aggregate.{name}.min_count must be at least 1"
            )));
        }
    }
    if cfg.max_keys == 0 {
        return Err(at.diag("events.aggregate.max_keys must be at least 1"));
    }
    Ok(cfg)
}

/// This instance's CloudEvents `source`: `portcullis://<hostname>`.
pub fn instance_source() -> Source {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    Source::new(format!("portcullis://{host}"))
}

// ---------------------------------------------------------------------------------------------
// Runtime emitters
// ---------------------------------------------------------------------------------------------

/// Starts the runtime's emitters, when something listens: the server watcher and the audit
/// overload poll. Call once, at start.
pub fn watch(shared: &Arc<Shared>) {
    if !shared.events.active() {
        return;
    }
    let weak = Arc::downgrade(shared);
    shared
        .registry
        .watch(Arc::new(move |state, change, reason| {
            if let Some(shared) = weak.upgrade() {
                server_changed(&shared, state, change, reason);
            }
        }));
    spawn_audit_poll(Arc::downgrade(shared));
}

/// The events of a server's change: `server.*`, and `backend.unhealthy` when the change
/// took the backend's last server in rotation out.
fn server_changed(shared: &Shared, state: &ServerState, change: Change, reason: &str) {
    let snap = shared.snapshot.load();
    // A server that left the config (its ejection's end after a reload) has no backend.
    let Some((b, slot)) = snap.backends.iter().find_map(|b| {
        let slot = b.slots.iter().find(|s| std::ptr::eq(&*s.state, state))?;
        Some((b, slot))
    }) else {
        return;
    };
    let total = u32::try_from(b.slots.len()).unwrap_or(u32::MAX);
    let healthy = b.slots.iter().filter(|s| s.state.available()).count();
    let healthy = u32::try_from(healthy).unwrap_or(u32::MAX);
    // `server` is the server's name, as the admin API and the control path take it (its
    // address unless named); `address` is added beside it.
    let mut data = ServerData::new(b.id.clone(), slot.name.clone(), reason, healthy, total);
    let ready = state.admin_state() == AdminState::Ready;
    let (kind, was_available) = match change {
        Change::Up => (ServerChange::Up, false),
        Change::Down => (ServerChange::Down, ready && !state.ejected()),
        Change::Ejected(d) => {
            data.for_ms = Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            (ServerChange::Ejected, ready && state.healthy())
        }
        Change::Restored => (ServerChange::Restored, false),
    };
    let ev = &shared.events;
    let mut event = ev.source.server(kind, data);
    if let Value::Object(m) = &mut event.data {
        m.insert("address".into(), Value::from(state.address.as_str()));
    }
    ev.emit(event);
    if was_available && healthy == 0 {
        ev.emit(ev.source.backend_unavailable(BackendData {
            backend: b.id.clone(),
            total,
            reason: format!("{} ({}) {}: {reason}", slot.name, state.address, verb(kind)),
        }));
    }
}

fn verb(kind: ServerChange) -> &'static str {
    match kind {
        ServerChange::Up => "up",
        ServerChange::Down => "down",
        ServerChange::Ejected => "ejected",
        ServerChange::Restored => "restored",
    }
}

/// Every [`AUDIT_POLL`], an `audit.overload` event when audit records could not be written
/// since the last poll (the audit queue was full with `on_overload: fail_closed`, or the
/// sink failed): each such request was refused with 503.
fn spawn_audit_poll(weak: Weak<Shared>) {
    tokio::spawn(async move {
        let mut last = None;
        let mut every = tokio::time::interval(AUDIT_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(shared) = weak.upgrade() else { return };
            let failed = shared.metrics.audit_failures.get();
            let before = last.replace(failed).unwrap_or(failed);
            if failed <= before {
                continue;
            }
            let audit = &shared.snapshot.load().config.audit;
            let sink = match audit.sink {
                portcullis_config::AuditSink::File => format!("file:{}", audit.dir),
                portcullis_config::AuditSink::Stdout => "stdout".into(),
                portcullis_config::AuditSink::Off => "off".into(),
            };
            let ev = &shared.events;
            ev.emit(ev.source.audit_overload(AuditOverload {
                sink,
                dropped: failed - before,
                queue: audit.queue,
            }));
        }
    });
}

/// How a reload's trigger is named in its event: `file`, `signal`, `api`, `automation`.
fn trigger_kind(trigger: &str) -> String {
    match trigger {
        "file change" => "file".into(),
        "SIGHUP" => "signal".into(),
        t if t.starts_with("admin API") => "api".into(),
        t if t.starts_with("automation") => "automation".into(),
        t => t.to_owned(),
    }
}

/// `config.reloaded`: generation `generation` (1 at start) is running.
pub fn reloaded(shared: &Shared, trigger: &str, generation: u64) {
    let ev = &shared.events;
    if ev.active() {
        ev.emit(ev.source.config_reloaded(ConfigReloaded {
            generation,
            trigger: trigger_kind(trigger),
        }));
    }
}

/// `config.rejected`: `error` (one problem a line) kept generation `generation` running.
pub fn rejected(shared: &Shared, trigger: &str, generation: u64, error: &str) {
    let ev = &shared.events;
    if ev.active() {
        let errors = error
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        ev.emit(ev.source.config_rejected(ConfigRejected {
            generation,
            trigger: trigger_kind(trigger),
            errors,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Kit;

    const BACKENDS: &str = r#"
backends:
  - name: b
    servers:
      - { name: s1, address: "127.0.0.1:1" }
      - { name: s2, address: "127.0.0.1:2" }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"#;

    /// A kit whose bus has one subscriber, with the server watcher set.
    async fn watched() -> (Kit, mpsc::Receiver<Arc<Event>>) {
        let mut kit = Kit::new(BACKENDS).await;
        let mut b = Bus::builder();
        let rx = b.subscribe("test", 100, TypeFilter::any());
        let shared = Arc::get_mut(&mut kit.shared).expect("the kit's only handle");
        shared.events.bus = b.build();
        watch(&kit.shared);
        (kit, rx)
    }

    fn next(rx: &mut mpsc::Receiver<Arc<Event>>) -> Arc<Event> {
        rx.try_recv().expect("an event")
    }

    #[tokio::test]
    async fn health_verdicts_are_server_events_and_the_last_one_down_is_backend_unavailable() {
        let (kit, mut rx) = watched().await;
        let states: Vec<_> = kit.snap.backends[0]
            .slots
            .iter()
            .map(|s| s.state.clone())
            .collect();
        for _ in 0..3 {
            crate::health::apply(&states[0], false, 2, 3, "default/b");
        }
        states[0].notify(Change::Down, "3 failed health checks: connection refused");
        let e = next(&mut rx);
        assert_eq!(e.type_, types::SERVER_DOWN);
        assert_eq!(e.subject.as_deref(), Some("default/b/s1"));
        assert_eq!(
            (&e.data["server"], &e.data["address"]),
            (&"s1".into(), &"127.0.0.1:1".into())
        );
        assert_eq!(e.data["healthy"], 1);
        assert_eq!(e.data["total"], 2);
        assert_eq!(
            e.data["reason"],
            "3 failed health checks: connection refused"
        );
        assert!(rx.try_recv().is_err(), "one server of two is left");

        states[1].set_healthy(false);
        states[1].notify(Change::Down, "3 failed health checks: status 503");
        assert_eq!(next(&mut rx).type_, types::SERVER_DOWN);
        let e = next(&mut rx);
        assert_eq!(e.type_, types::BACKEND_UNAVAILABLE);
        assert_eq!(e.subject.as_deref(), Some("default/b"));
        assert_eq!(e.data["total"], 2);
        assert_eq!(
            e.data["reason"],
            "s2 (127.0.0.1:2) down: 3 failed health checks: status 503"
        );

        states[1].set_healthy(true);
        states[1].notify(Change::Up, "2 passed health checks");
        let e = next(&mut rx);
        assert_eq!(
            (e.type_.as_str(), &e.data["healthy"]),
            (types::SERVER_UP, &1.into())
        );
    }

    #[tokio::test]
    async fn an_ejection_and_its_end_are_announced_once_each() {
        let (kit, mut rx) = watched().await;
        let s = kit.snap.backends[0].slots[0].state.clone();
        s.record_outcome(true, false, 1, 1);
        let d = s.eject(Duration::from_millis(50));
        let e = next(&mut rx);
        assert_eq!(e.type_, types::SERVER_EJECTED);
        assert_eq!(e.data["for_ms"], 50);
        assert_eq!(e.data["healthy"], 1);
        assert_eq!(e.data["reason"], "1 consecutive failed responses");
        tokio::time::sleep(d + Duration::from_millis(100)).await;
        let e = next(&mut rx);
        assert_eq!(e.type_, types::SERVER_RESTORED);
        assert_eq!(e.data["healthy"], 2);
        assert!(rx.try_recv().is_err());

        // Ejected again before the timer announced the end: the end comes first, once.
        s.eject(Duration::from_millis(1));
        assert_eq!(next(&mut rx).type_, types::SERVER_EJECTED);
        tokio::time::sleep(Duration::from_millis(5)).await;
        while s.ejected() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        s.eject(Duration::from_millis(1000));
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.type_.clone())
            .collect();
        // The first ejection's timer may have announced its end already, or not: either
        // way, one `restored` between the two `ejected`.
        assert_eq!(got, [types::SERVER_RESTORED, types::SERVER_EJECTED]);
    }

    #[tokio::test]
    async fn nothing_is_counted_when_nothing_listens() {
        let kit = Kit::new(BACKENDS).await;
        let ev = &kit.shared.events;
        assert!(!ev.active());
        ev.denied("r", "192.0.2.1".parse().unwrap());
        ev.auth_failed("r", "192.0.2.1".parse().unwrap());
        ev.limit_refused("t", || unreachable!("no key is built"));
        assert_eq!(
            ev.windows.denials.tracked() + ev.windows.failures.tracked(),
            0
        );
    }

    #[test]
    fn bursts_are_keyed_by_address_without_allocating_known_keys() {
        let agg = Aggregator::new(types::AUTH_FAILURE_BURST, Duration::from_secs(1), 10);
        for _ in 0..3 {
            hit_ip(&agg, "default/r", "2001:db8::1".parse().unwrap());
        }
        hit_ip(&agg, "default/r", "192.0.2.7".parse().unwrap());
        let due = agg.due(std::time::Instant::now() + Duration::from_secs(1));
        let got: Vec<_> = due.iter().map(|t| (t.key.as_str(), t.count)).collect();
        assert_eq!(got, [("192.0.2.7", 1), ("2001:db8::1", 3)]);
    }

    #[test]
    fn triggers_are_named_by_kind() {
        assert_eq!(trigger_kind("SIGHUP"), "signal");
        assert_eq!(trigger_kind("file change"), "file");
        assert_eq!(
            trigger_kind("admin API (admin-token[0]@127.0.0.1:1)"),
            "api"
        );
        assert_eq!(trigger_kind("automation trigger (x)"), "automation");
    }
}
