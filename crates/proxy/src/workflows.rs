//! Durable workflows in the running proxy: the [`Runner`] of the automation crate over the
//! embedded store, driven by one task, with task calls run here ([`tasks`]).
//!
//! * **Driving.** The driver ticks the runner on a blocking thread whenever something is
//!   due: at once after a start, a signal or a task's result (a wake-up), and at least every
//!   [`POLL`] for Waits, retries and timeouts coming due. Each tick commits its transitions
//!   before the driver starts the task calls they scheduled.
//! * **After a crash.** At start, every running execution is woken: a Wait keeps its
//!   persisted end, and a task that was out is sent again with its idempotency key.
//! * **Audit.** Starts (by whom), ends (with the status) and stops go into the audit trail;
//!   commands go through [`crate::control::apply`] as `Portcullis::Workflow::"<name>"`, which
//!   audits them and checks them against `admin.policies`.
//! * **Events.** An execution's end is `dev.portcullis.workflow.<status>`, a callback task
//!   waiting for its answer is `dev.portcullis.workflow.callback` (with the token). What an
//!   execution that automation started causes carries `causedby` and the hop of the firing
//!   behind it (see `crate::automate`), so a trigger cannot loop through a workflow.
//! * **Reloads** change the definitions new executions start with; running executions keep
//!   the definition they started with.

pub mod load;
pub mod tasks;

use crate::Runtime;
use portcullis_automation::workflow::runner::{Loaded, Runner, StartError, Starter};
use portcullis_automation::workflow::store::{ExecutionRow, StartOutcome, Status, WorkflowStore};
use portcullis_events::Event;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;

/// The longest the driver sleeps when nothing wakes it.
pub const POLL: Duration = Duration::from_millis(100);
/// Executions leased per tick.
const TICK_LIMIT: usize = 256;
/// How often closed executions past `workflows.retention` are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The runtime's workflows: set once at start when the config has `workflows:`.
#[derive(Default)]
pub struct Workflows {
    svc: OnceLock<Arc<Service>>,
}

/// The running engine.
pub struct Service {
    pub runner: Arc<Runner>,
    wake: Notify,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Workflows {
    /// Starts the engine if the serving config has workflows. Blocking parts run on blocking
    /// threads; the driver is spawned.
    pub async fn start(rt: &Arc<Runtime>, definitions: Vec<Loaded>) -> Result<(), String> {
        let snap = rt.shared.snapshot.load_full();
        if snap.config.workflows.is_none() {
            return Ok(());
        }
        let plans = &rt.shared.limits.plans;
        if plans.store().is_none() {
            plans
                .open_store(&snap.config.state_dir)
                .map_err(|e| format!("state_dir: the embedded store for workflows: {e}"))?;
        }
        let store = plans
            .store()
            .cloned()
            .ok_or("state_dir: no embedded store for workflows")?;
        let store: Arc<dyn WorkflowStore> = Arc::new(store);
        let runner = Arc::new(Runner::new(store, definitions));
        let r = runner.clone();
        let woken = tokio::task::spawn_blocking(move || r.recover(now_ms()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if woken > 0 {
            tracing::info!(executions = woken, "workflows: resuming running executions");
        }
        let svc = Arc::new(Service {
            runner,
            wake: Notify::new(),
        });
        let _ = rt.workflows.svc.set(svc.clone());
        tokio::spawn(drive(rt.clone(), svc));
        Ok(())
    }

    pub fn service(&self) -> Option<&Arc<Service>> {
        self.svc.get()
    }

    /// A reload: new executions start with these definitions.
    pub fn reconfigure(&self, definitions: Vec<Loaded>) {
        if let Some(s) = self.svc.get() {
            s.runner.set_definitions(definitions);
        }
    }
}

impl Service {
    /// Makes the driver tick now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Starts an execution (audited), and wakes the driver.
    pub async fn start(
        &self,
        rt: &Runtime,
        workflow: &str,
        name: Option<String>,
        input: Value,
        by: Starter,
    ) -> Result<(StartOutcome, String), StartError> {
        let runner = self.runner.clone();
        let w = workflow.to_string();
        let who = by.principal.clone();
        let r = tokio::task::spawn_blocking(move || {
            runner.start(&w, name.as_deref(), input, &by, now_ms())
        })
        .await
        .map_err(|e| StartError::InvalidInput(e.to_string()))??;
        if let StartOutcome::Started(id) = &r.0 {
            let rec = crate::audit::admin(
                &who,
                "workflow.start",
                json!({ "workflow": workflow, "execution": id }),
            );
            crate::audit::write(&rt.shared, rec).await;
            self.wake();
        }
        Ok(r)
    }
}

async fn drive(rt: Arc<Runtime>, svc: Arc<Service>) {
    let mut pruned = tokio::time::Instant::now();
    loop {
        let runner = svc.runner.clone();
        let tick = tokio::task::spawn_blocking(move || runner.tick(now_ms(), TICK_LIMIT)).await;
        let busy = match tick {
            Ok(Ok(t)) => {
                for (id, why) in &t.refused {
                    tracing::warn!(execution = %id, reason = %why, "workflows: a signal or an execution could not be applied");
                }
                for (id, status) in &t.closed {
                    closed(&rt, &svc, id, *status).await;
                }
                for call in t.calls {
                    tokio::spawn(tasks::run(rt.clone(), svc.clone(), call));
                }
                t.transitions > 0
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "workflows: the store failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "workflows: a tick panicked");
                false
            }
        };
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = tokio::time::Instant::now();
            prune(&rt, &svc).await;
        }
        if !busy {
            let _ = tokio::time::timeout(POLL, svc.wake.notified()).await;
        }
    }
}

/// An execution closed: audited, and published as an event.
async fn closed(rt: &Runtime, svc: &Service, id: &str, status: Status) {
    let store = svc.runner.store().clone();
    let eid = id.to_string();
    let row = tokio::task::spawn_blocking(move || store.get(&eid))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let (workflow, error) = row
        .as_ref()
        .map(|r| (r.workflow.clone(), r.error.clone()))
        .unwrap_or_default();
    // An execution that automation started (a trigger, or another execution) ends as
    // automation's doing: a trigger on its end does not start it again unless it opts in.
    let automated = row
        .as_ref()
        .is_some_and(|r| r.parent.is_some() || r.started_by.starts_with("Portcullis::Trigger::"));
    let detail =
        json!({ "workflow": workflow, "execution": id, "status": status.as_str(), "error": error });
    let mut rec = crate::audit::admin(&format!("{workflow}#{id}"), "workflow.end", detail.clone());
    if let Some(p) = rec.principal.as_mut() {
        p.provider = "workflow".into();
    }
    crate::audit::write(&rt.shared, rec).await;
    let events = &rt.shared.events;
    if events.active() {
        let ty = format!(
            "dev.portcullis.workflow.{}",
            status.as_str().to_ascii_lowercase()
        );
        let mut ev = Event::new(events.source.as_str(), ty, detail);
        ev.subject = Some(format!("{workflow}/{id}"));
        if automated {
            ev.causedby = Some(cause_of(id));
            let hops = row.as_ref().map_or(0, hops_of);
            rt.automation.hops.lock().note(ev.id.clone(), hops);
        }
        events.emit(ev);
    }
    tracing::info!(%workflow, execution = %id, status = status.as_str(), "workflows: execution closed");
}

/// The automation hops behind an execution (`ExecMeta::hops`, in its state).
fn hops_of(row: &ExecutionRow) -> u32 {
    serde_json::from_str::<Value>(&row.state)
        .ok()
        .and_then(|s| s["meta"]["hops"].as_u64())
        .map_or(0, |h| u32::try_from(h).unwrap_or(u32::MAX))
}

/// The `causedby` of the events an execution makes: the execution, named so that no event id
/// is taken for it.
pub fn cause_of(execution: &str) -> String {
    format!("urn:portcullis:execution:{execution}")
}

async fn prune(rt: &Runtime, svc: &Service) {
    let retention = rt
        .shared
        .snapshot
        .load()
        .config
        .workflows
        .as_ref()
        .map_or(Duration::from_secs(90 * 86_400), |w| w.retention);
    let before = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
    let store = svc.runner.store().clone();
    match tokio::task::spawn_blocking(move || store.prune(before)).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(
            executions = n,
            "workflows: forgot closed executions past their retention"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "workflows: pruning failed"),
        _ => {}
    }
}
