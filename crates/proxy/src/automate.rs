//! The automate stage: the trigger engine of `portcullis_automation`, run on the proxy's
//! events, acting back on the proxy through the control path.
//!
//! ```text
//! events bus ──▶ Engine::on_event / tick ──▶ Firing ──▶ execute(firing, store, control)
//!   ▲                                                     │  claim the idempotency key (SQLite)
//!   │                                                     │  guard rails (max_unavailable)
//!   │                                                     ▼
//!   └── automation.action, emit ◀── audit record ◀── control::apply as Principal::Trigger
//! ```
//!
//! * **One task** ([`Automation::start`]) owns the [`Engine`], built from the snapshot's
//!   `triggers`, and [`replace_config`](Engine::replace_config)d on reload. It reads the
//!   bus's automation subscription, calls `on_event`, and `tick`s at the next proactive
//!   deadline (or every second).
//! * **Exactly once.** Each firing is claimed in the embedded store (`firings` table, see
//!   `portcullis_store::firings`) before it runs: a retry, a restart or a second replica on
//!   the same state directory never runs it twice. Without an open store (a config whose
//!   state directory cannot be opened is refused at start, so this is only a fallback) the
//!   claims are kept in memory, and the log says so.
//! * **Acting** ([`act`]): every action goes through [`crate::control::apply`] as
//!   `Principal { who: <trigger>, kind: Trigger }`, which validates, audits and applies it,
//!   except `emit` (published on the bus) and `webhook` (an HTTP POST, see [`webhook`]),
//!   which the firing's own audit record covers. `block` sets `gpc0 = 1` and records its end
//!   in the store, so a restart still ends it.
//! * **Audit and events.** Every firing gets one audit record (`kind: admin`, action
//!   `firing`: trigger, group, cause event, principal, each action's outcome) and one
//!   `dev.portcullis.automation.action` event per action, with `causedby` = the cause event.
//! * **Hops.** CloudEvents here carry no `hops` attribute, so the runtime remembers
//!   ([`Automation::hops`]), for the recent events automation caused, how many firings lie
//!   behind them: an event a firing emitted has its firing's hop, an event a workflow
//!   execution emitted (or its end) has the hop of the firing that started the execution
//!   (kept in the execution's state, so it survives restarts; a child has its parent's), and
//!   an event whose `causedby` names a remembered event has one more. An event from
//!   elsewhere with `causedby` set counts as 1 hop.
//! * **Dry run.** A trigger with `enforce: false` is claimed and audited with `would_act`
//!   outcomes, and changes nothing.

pub mod act;
pub mod check;
pub mod routes;
pub mod webhook;

use crate::Runtime;
use parking_lot::Mutex;
use portcullis_automation::{
    Engine, EventView, Execution, Firing, FiringStore, MemoryFiringStore, Outcome, Timestamp,
    TriggerCfg,
};
use portcullis_events::{ActionResult, AutomationAction, Event};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};

/// How many events with automation behind them the task remembers, for hop counting.
pub const HOPS_REMEMBERED: usize = 4096;
/// How often old firing claims are pruned from the store.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long a firing claim is kept beyond its trigger's longest `within` plus `cooldown`.
const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The automation runtime of a [`Runtime`]: route switches (which the control path changes
/// and every snapshot reads) and, with triggers configured, the task that runs them.
#[derive(Default)]
pub struct Automation {
    pub routes: routes::RouteSwitches,
    /// The hops behind recent events automation caused: the triggers' and the workflows'.
    pub hops: Arc<Mutex<Hops>>,
    running: Mutex<Option<Running>>,
}

struct Running {
    config: watch::Sender<Arc<Vec<TriggerCfg>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Automation {
    /// Starts the task when the config has triggers (that is, when the bus has an automation
    /// subscription to take). Returns whether it started.
    pub fn start(rt: &Arc<Runtime>) -> Result<bool, String> {
        let Some(rx) = rt.automation_events.lock().take() else {
            return Ok(false);
        };
        let snap = rt.shared.snapshot.load_full();
        let engine = Engine::new((*snap.triggers).clone()).map_err(|e| e.to_string())?;
        let store = Arc::new(Firings::of(rt));
        let (tx, cfg) = watch::channel(snap.triggers.clone());
        let me = Loop {
            rt: Arc::downgrade(rt),
            engine,
            store,
            hops: rt.automation.hops.clone(),
            follow_ups: BTreeMap::new(),
            next_prune: tokio::time::Instant::now(),
        };
        let task = tokio::spawn(me.run(rx, cfg));
        tracing::info!(triggers = snap.triggers.len(), "automation started");
        *rt.automation.running.lock() = Some(Running { config: tx, task });
        Ok(true)
    }

    /// Hands a reloaded config's triggers to the running task (kept state: see
    /// [`Engine::replace_config`]). Without a task, triggers added by a reload wait for a
    /// restart, and the log says so.
    pub fn reconfigure(&self, triggers: &Arc<Vec<TriggerCfg>>) {
        match &*self.running.lock() {
            Some(r) => {
                r.config.send_if_modified(|old| {
                    if **old == **triggers {
                        return false;
                    }
                    *old = triggers.clone();
                    true
                });
            }
            None if !triggers.is_empty() => {
                tracing::warn!(
                    "`triggers` were added by a reload; they run after the next restart"
                );
            }
            None => {}
        }
    }

    /// Stops the task (pending block ends stay in the store for the next start).
    pub fn stop(&self) {
        if let Some(r) = self.running.lock().take() {
            r.task.abort();
        }
    }

    /// Whether the task runs.
    pub fn running(&self) -> bool {
        self.running.lock().is_some()
    }
}

/// Where firings are claimed: the embedded store, or memory when none is open.
pub enum Firings {
    Sqlite(portcullis_store::Store),
    Memory(MemoryFiringStore),
}

impl Firings {
    /// The runtime's open store (opened at `state_dir` if it is not open yet), or memory,
    /// with a warning, when it cannot be opened.
    pub fn of(rt: &Runtime) -> Firings {
        let plans = &rt.shared.limits.plans;
        if plans.store().is_none() {
            let dir = rt.shared.snapshot.load().config.state_dir.clone();
            if let Err(e) = plans.open_store(&dir) {
                tracing::error!(error = %e, "state_dir: the embedded store could not be opened for trigger firings");
            }
        }
        match plans.store() {
            Some(s) => Firings::Sqlite(s.clone()),
            None => {
                tracing::warn!("no embedded store is open: trigger firings are claimed in memory only, so a restart or a second replica may run a firing again, and a block's end is forgotten at a restart");
                Firings::Memory(MemoryFiringStore::new())
            }
        }
    }

    /// Records a follow-up of a firing (blocking).
    fn follow_up(&self, key: &str, due_at: i64, what: &Value) {
        if let Firings::Sqlite(s) = self {
            if let Err(e) = s.firing_follow_up(key, now_ms(), due_at, &what.to_string()) {
                tracing::error!(error = %e, %key, "a firing's follow-up could not be stored; it is kept in memory only");
            }
        }
    }
}

impl FiringStore for Firings {
    fn claim(&self, key: &str) -> Result<bool, portcullis_automation::Error> {
        match self {
            Firings::Sqlite(s) => s
                .firing_claim(key, now_ms())
                .map_err(|e| portcullis_automation::Error::Store(e.to_string())),
            Firings::Memory(m) => m.claim(key),
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(Timestamp::from_system_time(SystemTime::now()).as_millis()).unwrap_or(i64::MAX)
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// The hops behind recent events that automation caused (see the module docs).
#[derive(Default)]
pub struct Hops {
    map: HashMap<String, u32>,
    order: VecDeque<String>,
}

impl Hops {
    /// The automation hops behind `ev`, remembered if there are any.
    pub fn of(&mut self, ev: &Event) -> u32 {
        if let Some(h) = self.map.get(&ev.id) {
            return *h;
        }
        let Some(cause) = &ev.causedby else { return 0 };
        let h = self.map.get(cause).map_or(1, |h| h.saturating_add(1));
        self.note(ev.id.clone(), h);
        h
    }

    /// Remembers that `id` has `hops` firings behind it.
    pub fn note(&mut self, id: String, hops: u32) {
        if self.map.insert(id.clone(), hops).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > HOPS_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// A follow-up waiting in memory: the end of a block.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockEnd {
    pub trigger: String,
    pub table: String,
    pub key: String,
    /// The event that caused the block.
    pub cause: String,
    /// The firing's idempotency key.
    pub firing: String,
}

/// The task's state.
struct Loop {
    rt: Weak<Runtime>,
    engine: Engine,
    store: Arc<Firings>,
    hops: Arc<Mutex<Hops>>,
    /// Block ends by (due, store key).
    follow_ups: BTreeMap<(i64, String), BlockEnd>,
    next_prune: tokio::time::Instant,
}

impl Loop {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Arc<Event>>,
        mut cfg: watch::Receiver<Arc<Vec<TriggerCfg>>>,
    ) {
        self.load_follow_ups().await;
        loop {
            let wake = self.next_wake();
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.on_event(&ev).await,
                    None => return,
                },
                changed = cfg.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let triggers = cfg.borrow_and_update().clone();
                    match self.engine.replace_config((*triggers).clone()) {
                        Ok(()) => tracing::info!(triggers = triggers.len(), "automation: triggers reloaded"),
                        Err(e) => tracing::error!(error = %e, "automation: the reloaded triggers were refused; the previous ones keep running"),
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
            self.tick().await;
        }
    }

    /// How long until something is due: a proactive deadline, a block's end, or a second.
    fn next_wake(&self) -> Duration {
        let now = now();
        let mut wake = Duration::from_secs(1);
        if let Some(d) = self.engine.next_deadline() {
            wake = wake.min(d.since(now));
        }
        if let Some(((due, _), _)) = self.follow_ups.first_key_value() {
            let due = Timestamp::from_millis(u64::try_from(*due).unwrap_or(0));
            wake = wake.min(due.since(now));
        }
        wake
    }

    async fn on_event(&mut self, ev: &Event) {
        let hops = self.hops.lock().of(ev);
        let view = EventView {
            id: &ev.id,
            type_: &ev.type_,
            source: &ev.source,
            subject: ev.subject.as_deref(),
            data: &ev.data,
            causedby: ev.causedby.as_deref(),
            hops,
            time: Timestamp::from_system_time(ev.time),
        };
        let firings = self.engine.on_event(&view, now());
        for f in firings {
            self.fire(f).await;
        }
    }

    async fn tick(&mut self) {
        for f in self.engine.tick(now()) {
            self.fire(f).await;
        }
        self.end_blocks().await;
        if tokio::time::Instant::now() >= self.next_prune {
            self.next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
            self.prune().await;
        }
    }

    /// Runs one firing: claims, acts, audits and reports it.
    async fn fire(&mut self, firing: Firing) {
        let Some(rt) = self.rt.upgrade() else { return };
        tracing::info!(trigger = %firing.trigger, group = %firing.group, cause = %firing.cause_event_id, key = %firing.idempotency_key, enforce = firing.enforce, "automation: trigger fired");
        let store = self.store.clone();
        let hops = self.hops.clone();
        let handle = tokio::runtime::Handle::current();
        let rt2 = rt.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut ctl = act::ProxyControl::new(rt2, handle, hops, store.clone());
            let exec = portcullis_automation::execute(&firing, &*store, &mut ctl);
            (firing, exec, ctl.block_ends)
        })
        .await;
        let (firing, exec, ends) = match joined {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "automation: a firing's task failed");
                return;
            }
        };
        for (due, key, end) in ends {
            self.follow_ups.insert((due, key), end);
        }
        match &exec {
            Ok(e) if !e.claimed => {
                tracing::info!(key = %firing.idempotency_key, "automation: the firing was claimed before (a retry, a restart or another replica ran it); not run again");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, key = %firing.idempotency_key, "automation: the firing could not be claimed; not run");
            }
        }
        record(&rt, &firing, &exec).await;
        report(&rt, &self.hops, &firing, &exec);
    }

    /// Loads the block ends a previous run left in the store.
    async fn load_follow_ups(&mut self) {
        let Firings::Sqlite(s) = &*self.store else {
            return;
        };
        let s = s.clone();
        let rows = match tokio::task::spawn_blocking(move || s.firing_follow_ups()).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "automation: pending block ends could not be read");
                return;
            }
            Err(_) => return,
        };
        for r in rows {
            match serde_json::from_str::<BlockEnd>(&r.follow_up) {
                Ok(end) => {
                    self.follow_ups.insert((r.due_at, r.key), end);
                }
                Err(e) => {
                    tracing::warn!(key = %r.key, error = %e, "automation: an unreadable follow-up is dropped");
                    self.done(r.key).await;
                }
            }
        }
        if !self.follow_ups.is_empty() {
            tracing::info!(
                pending = self.follow_ups.len(),
                "automation: block ends from before the restart are scheduled"
            );
        }
    }

    /// Ends the blocks that are due: `gpc0` back to 0, through the control path.
    async fn end_blocks(&mut self) {
        let now = now_ms();
        while let Some(entry) = self.follow_ups.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, key), end) = entry.remove_entry();
            let Some(rt) = self.rt.upgrade() else { return };
            let by = crate::control::Principal::automation(
                end.trigger.clone(),
                crate::control::PrincipalKind::Trigger,
            );
            let cmd = crate::control::Command::SetTableGpc {
                table: end.table.clone(),
                key: end.key.clone(),
                value: 0,
            };
            let (result, detail) = match crate::control::apply(&rt, &by, cmd).await {
                Ok(_) => (ActionResult::Applied, "the block ended".to_string()),
                Err(e) => {
                    tracing::warn!(trigger = %end.trigger, table = %end.table, key = %end.key, error = %e, "automation: a block could not be ended");
                    (
                        ActionResult::Failed,
                        format!("the block could not be ended: {e}"),
                    )
                }
            };
            let ev = rt.shared.events.source.automation_action(
                &end.cause,
                AutomationAction {
                    trigger: end.trigger.clone(),
                    action: "block".into(),
                    target: format!("{}/{}", end.table, end.key),
                    result,
                    firing: end.firing.clone(),
                    detail: Some(detail),
                },
            );
            self.hops.lock().note(ev.id.clone(), 1);
            rt.shared.events.emit(ev);
            self.done(key).await;
        }
    }

    async fn done(&self, key: String) {
        if let Firings::Sqlite(s) = &*self.store {
            let s = s.clone();
            let k = key.clone();
            if let Ok(Err(e)) =
                tokio::task::spawn_blocking(move || s.firing_follow_up_done(&k)).await
            {
                tracing::error!(error = %e, %key, "automation: a finished follow-up could not be marked done");
            }
        }
    }

    /// Forgets claims older than any trigger could make again.
    async fn prune(&self) {
        let Firings::Sqlite(s) = &*self.store else {
            return;
        };
        let longest = self
            .engine
            .configs()
            .map(|c| {
                let within = c.within.map_or(Duration::ZERO, |d| d.0);
                within.saturating_add(c.cooldown.map_or(Duration::ZERO, |d| d.0))
            })
            .max()
            .unwrap_or_default();
        let keep = longest.saturating_add(MIN_RETENTION);
        let before = now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        let s = s.clone();
        match tokio::task::spawn_blocking(move || s.firing_prune(before)).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::debug!(pruned = n, "automation: old firing claims pruned")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "automation: old firing claims could not be pruned")
            }
            _ => {}
        }
    }
}

/// What the firing's record and events call its overall result.
fn overall(
    firing: &Firing,
    exec: &Result<Execution, portcullis_automation::Error>,
) -> &'static str {
    match exec {
        Err(_) => "not_run",
        Ok(_) if firing.error.is_some() => "failed",
        Ok(e) => {
            if e.outcomes.iter().all(|(_, o)| *o == Outcome::Done) {
                "done"
            } else if e.outcomes.iter().all(|(_, o)| *o == Outcome::WouldAct) {
                "would_act"
            } else {
                "stopped"
            }
        }
    }
}

/// One action and its outcome, as the audit record lists it.
fn outcome_json(a: &portcullis_automation::Action, o: &Outcome) -> Value {
    let args = serde_json::to_value(a)
        .ok()
        .and_then(|v| v.get(a.name()).cloned())
        .unwrap_or(Value::Null);
    let mut v = json!({ "action": a.name(), "args": args });
    if let Ok(Value::Object(m)) = serde_json::to_value(o) {
        for (k, x) in m {
            v[k] = x;
        }
    }
    v
}

/// The firing's audit record: one per firing, after its actions (each action that changed
/// state has its own record from the control path, before it was applied).
async fn record(
    rt: &Runtime,
    firing: &Firing,
    exec: &Result<Execution, portcullis_automation::Error>,
) {
    let mut args = json!({
        "trigger": firing.trigger,
        "principal": firing.principal,
        "group": firing.group,
        "cause_event_id": firing.cause_event_id,
        "idempotency_key": firing.idempotency_key,
        "window_start": firing.window_start.as_millis(),
        "hop": firing.hop,
        "enforce": firing.enforce,
        "result": overall(firing, exec),
    });
    match exec {
        Ok(e) => {
            args["actions"] = e.outcomes.iter().map(|(a, o)| outcome_json(a, o)).collect();
        }
        Err(e) => args["error"] = json!(e.to_string()),
    }
    if let Some(err) = &firing.error {
        args["error"] = json!(err);
    }
    let mut rec = crate::audit::admin(&firing.trigger, "firing", args);
    if let Some(p) = rec.principal.as_mut() {
        p.provider = "trigger".into();
        p.subject = firing.principal.clone();
    }
    if !crate::audit::write(&rt.shared, rec).await {
        tracing::error!(key = %firing.idempotency_key, "automation: the firing's audit record was not written");
    }
}

/// The resource an action acts on (the event's subject).
pub fn target(a: &portcullis_automation::Action) -> String {
    use portcullis_automation::Action as A;
    match a {
        A::SetServerState(s) => format!("{}/{}", s.backend, s.server),
        A::SetServerWeight(s) => format!("{}/{}", s.backend, s.server),
        A::SwitchRoute(s) => s.route.clone(),
        A::RestoreRoute(s) => s.route.clone(),
        A::SetTable(s) => format!("{}/{}", s.table, s.key),
        A::ClearTable(s) => format!("{}/{}", s.table, s.key),
        A::Block(s) => format!("{}/{}", s.table, s.key),
        A::RevokeSessions(s) => s.principal.clone(),
        A::Reload(_) => "config".into(),
        A::Emit(e) => e.type_.clone(),
        A::Webhook(w) => w.url.clone(),
        A::StartWorkflow(w) => w.name.clone(),
    }
}

/// Emits `dev.portcullis.automation.action` for each action of the firing (one for the whole
/// firing when its actions could not be rendered or it could not be claimed).
fn report(
    rt: &Runtime,
    hops: &Mutex<Hops>,
    firing: &Firing,
    exec: &Result<Execution, portcullis_automation::Error>,
) {
    let source = &rt.shared.events.source;
    let mut events = Vec::new();
    let whole = |detail: String| AutomationAction {
        trigger: firing.trigger.clone(),
        action: "firing".into(),
        target: format!("{}/{}", firing.trigger, firing.group),
        result: ActionResult::Failed,
        firing: firing.idempotency_key.clone(),
        detail: Some(detail),
    };
    match exec {
        Err(e) => events.push(whole(format!("not run: {e}"))),
        Ok(_) if firing.error.is_some() => {
            events.push(whole(firing.error.clone().unwrap_or_default()))
        }
        Ok(e) => {
            for (a, o) in &e.outcomes {
                let (result, detail) = match o {
                    Outcome::Done => (ActionResult::Applied, None),
                    Outcome::WouldAct => (ActionResult::WouldAct, None),
                    Outcome::Blocked(r) => (ActionResult::Denied, Some(format!("blocked: {r}"))),
                    Outcome::Denied(r) => (ActionResult::Denied, Some(r.clone())),
                    Outcome::Failed(r) => (ActionResult::Failed, Some(r.clone())),
                    Outcome::Skipped => (
                        ActionResult::Failed,
                        Some("skipped: an earlier action did not go through".into()),
                    ),
                };
                events.push(AutomationAction {
                    trigger: firing.trigger.clone(),
                    action: a.name().into(),
                    target: target(a),
                    result,
                    firing: firing.idempotency_key.clone(),
                    detail,
                });
            }
        }
    }
    for data in events {
        let ev = source.automation_action(&firing.cause_event_id, data);
        hops.lock().note(ev.id.clone(), firing.hop);
        rt.shared.events.emit(ev);
    }
}

#[cfg(test)]
mod tests;
