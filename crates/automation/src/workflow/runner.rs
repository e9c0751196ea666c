//! The durable runner: executions in a [`WorkflowStore`], advanced by the interpreter one
//! transition at a time, each transition committed before its effects are visible.
//!
//! * [`Runner::start`] starts a named execution (Step Functions' naming semantics).
//! * [`Runner::tick`] leases the executions that are due, applies their queued signals (task
//!   results, callbacks, heartbeats, stops), then steps them in rounds: one transition per
//!   execution per round, every round's transitions committed in **one** store transaction
//!   (group commit). Only then are the task calls those transitions scheduled handed back to
//!   the caller to run. A transition whose commit fails is not applied, and its calls are not
//!   made: the execution is taken up again from the last committed state.
//! * The caller runs each call (through the control path, over HTTP, …) and reports the
//!   result with [`Runner::report`], a signal that wakes the execution.
//! * After a crash, [`Runner::recover`] wakes every running execution: the tasks that were out
//!   are sent again with the same idempotency key, never as new ones.
//!
//! A running execution keeps the definition it started with: the definition's text is in its
//! `ExecutionStarted` event, and the runner reads it back when a reload changed it.
//!
//! Sync and free of I/O but the store's: the caller puts it on a blocking thread.

use super::definition::Definition;
use super::machine::{self, Exec, ExecMeta, Outcome, TaskCall};
use super::store::{
    Commit, ExecutionRow, HistoryRow, ListFilter, NewExecution, SignalKind, StartOutcome, Status,
    StoreError, WorkflowStore,
};
use super::{StatesError, MAX_PAYLOAD};
use parking_lot::Mutex;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// How long a tick holds the executions it leased (another process may take them after).
pub const LEASE_MS: i64 = 10_000;

/// The most transitions one execution makes in one tick, so that a long chain cannot keep
/// the others waiting.
pub const MAX_ROUNDS: usize = 2_000;

/// A workflow definition as loaded: its name, text and parsed form.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub name: String,
    /// The definition as JSON (what the execution history keeps).
    pub json: Value,
    pub version: String,
    pub def: Arc<Definition>,
}

impl Loaded {
    /// Parses and validates a definition.
    pub fn new(name: &str, json: Value) -> Result<Loaded, Vec<crate::Problem>> {
        let def = Definition::parse(&json)?;
        Ok(Loaded {
            name: name.to_string(),
            version: version_of(&json),
            json,
            def: Arc::new(def),
        })
    }
}

fn version_of(json: &Value) -> String {
    let digest = Sha256::digest(json.to_string().as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Why an execution did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no workflow is called `{0}`")]
    UnknownWorkflow(String),
    #[error("ExecutionAlreadyExists: an execution named `{name}` of `{workflow}` exists (id {id}) with another input, or has closed; choose another name")]
    AlreadyExists {
        workflow: String,
        name: String,
        id: String,
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a tick did.
#[derive(Debug, Default)]
pub struct Tick {
    /// Task calls to run now (each committed as scheduled).
    pub calls: Vec<TaskCall>,
    /// Transitions committed.
    pub transitions: usize,
    /// Executions that closed, with their rows' ids.
    pub closed: Vec<(String, Status)>,
    /// Signals that applied to nothing (a stale callback token), with why.
    pub refused: Vec<(String, String)>,
}

/// Who started an execution, and for which parent task.
#[derive(Clone, Debug, Default)]
pub struct Starter {
    /// `Portcullis::Admin::"alice"`, `Portcullis::Trigger::"failover"`, …
    pub principal: String,
    /// The parent execution, for a child.
    pub parent: Option<String>,
    /// The parent's task key, when the parent waits for this child to end.
    pub parent_key: Option<String>,
    /// The automation firings behind the start (see [`machine::ExecMeta::hops`]).
    pub hops: u32,
}

/// The runner of one process.
pub struct Runner {
    store: Arc<dyn WorkflowStore>,
    owner: String,
    current: Mutex<Arc<HashMap<String, Loaded>>>,
    versions: Mutex<HashMap<String, Arc<Definition>>>,
    /// Keys of the task calls this process is running now.
    in_flight: Mutex<HashSet<String>>,
}

struct Held {
    row: ExecutionRow,
    exec: Exec,
    def: Arc<Definition>,
    /// History rows and calls of the transition being committed.
    history: Vec<HistoryRow>,
    calls: Vec<TaskCall>,
    consumed: Option<i64>,
    /// A step changed its state since the last commit, whether or not it wrote history (a
    /// Parallel state spawning its branches writes none).
    dirty: bool,
    live: bool,
    /// The callback tokens its tasks waited for at the last commit (or when leased).
    tokens: Vec<String>,
    /// Tokens answered by the signals consumed since the last commit.
    answered: Vec<String>,
}

impl Runner {
    pub fn new(store: Arc<dyn WorkflowStore>, definitions: Vec<Loaded>) -> Runner {
        let r = Runner {
            store,
            owner: format!("runner-{}", uuid::Uuid::new_v4().simple()),
            current: Mutex::new(Arc::new(HashMap::new())),
            versions: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
        };
        r.set_definitions(definitions);
        r
    }

    pub fn store(&self) -> &Arc<dyn WorkflowStore> {
        &self.store
    }

    /// Replaces the definitions new executions start with (a reload). Running executions
    /// keep theirs.
    pub fn set_definitions(&self, definitions: Vec<Loaded>) {
        let mut versions = self.versions.lock();
        for l in &definitions {
            versions.insert(l.version.clone(), l.def.clone());
        }
        *self.current.lock() = Arc::new(
            definitions
                .into_iter()
                .map(|l| (l.name.clone(), l))
                .collect(),
        );
    }

    /// The definitions new executions start with.
    pub fn definitions(&self) -> Arc<HashMap<String, Loaded>> {
        self.current.lock().clone()
    }

    /// Starts an execution of `workflow` named `name` (a fresh UUID when `None`).
    pub fn start(
        &self,
        workflow: &str,
        name: Option<&str>,
        input: Value,
        by: &Starter,
        now: i64,
    ) -> Result<(StartOutcome, String), StartError> {
        let defs = self.definitions();
        let loaded = defs
            .get(workflow)
            .ok_or_else(|| StartError::UnknownWorkflow(workflow.to_string()))?;
        let text = input.to_string();
        if text.len() > MAX_PAYLOAD {
            return Err(StartError::InvalidInput(format!(
                "the input is {} bytes, over the 256 KiB limit ({MAX_PAYLOAD} bytes)",
                text.len()
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let name = match name {
            Some(n) => check_name(n)?,
            None => id.clone(),
        };
        let meta = ExecMeta {
            id: id.clone(),
            name: name.clone(),
            workflow: workflow.to_string(),
            input,
            start_ms: now,
            version: loaded.version.clone(),
            parent_key: by.parent_key.clone(),
            hops: by.hops,
        };
        let (exec, mut history) = machine::start(&loaded.def, meta, now);
        if let Some(first) = history.first_mut() {
            let mut d: Value = serde_json::from_str(&first.details).unwrap_or_default();
            d["definition"] = loaded.json.clone();
            d["version"] = Value::String(loaded.version.clone());
            d["startedBy"] = Value::String(by.principal.clone());
            first.details = d.to_string();
        }
        let row = ExecutionRow {
            id: id.clone(),
            workflow: workflow.to_string(),
            name: name.clone(),
            status: Status::Running,
            input: text,
            output: None,
            error: None,
            cause: None,
            started_at: now,
            stopped_at: None,
            started_by: by.principal.clone(),
            parent: by.parent.clone(),
            state: to_text(&exec),
            wake_at: exec.wake_at().map(|t| t.max(now)),
            history_len: exec.last_event,
        };
        let outcome = self.store.start(NewExecution { row, history })?;
        match &outcome {
            StartOutcome::AlreadyExists(existing) => Err(StartError::AlreadyExists {
                workflow: workflow.to_string(),
                name,
                id: existing.clone(),
            }),
            StartOutcome::Started(i) | StartOutcome::Running(i) => {
                let i = i.clone();
                Ok((outcome, i))
            }
        }
    }

    /// Reports a task call's result: queued as a signal, so it is durable and applied in order.
    pub fn report(
        &self,
        call: &TaskCall,
        result: Result<Value, StatesError>,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.in_flight.lock().remove(&call.key);
        if call.token.is_some() {
            // A callback task is answered by its token, not by the call that announced it.
            return Ok(true);
        }
        let kind = match result {
            Ok(v) => SignalKind::TaskSucceeded {
                key: call.key.clone(),
                output: v.to_string(),
            },
            Err(e) => SignalKind::TaskFailed {
                key: call.key.clone(),
                error: e.error,
                cause: e.cause,
            },
        };
        self.store.signal(&call.execution, kind, now)
    }

    /// Wakes every running execution (at start, after a crash): their tasks out are sent again.
    pub fn recover(&self, now: i64) -> Result<usize, StoreError> {
        let running = self.store.list(&ListFilter {
            status: Some(Status::Running),
            limit: usize::MAX / 2,
            ..ListFilter::default()
        })?;
        for r in &running {
            self.store.signal(&r.id, SignalKind::Wake, now)?;
        }
        Ok(running.len())
    }

    /// Advances every due execution as far as it goes now; see the module doc.
    pub fn tick(&self, now: i64, limit: usize) -> Result<Tick, StoreError> {
        let leased = self.store.lease(&self.owner, now, LEASE_MS, limit)?;
        let mut tick = Tick::default();
        let mut held = Vec::with_capacity(leased.len());
        for l in leased {
            let Some(mut h) = self.hold(l.row, now, &mut tick) else {
                continue;
            };
            for s in &l.signals {
                match machine::signal(&h.def, &mut h.exec, &s.kind, now) {
                    Ok(p) => {
                        h.history.extend(p.history);
                        h.calls.extend(p.calls);
                    }
                    Err(why) => tick.refused.push((h.row.id.clone(), why)),
                }
                h.consumed = Some(s.seq);
                if let Some(t) = s.kind.answers() {
                    h.answered.push(t.to_owned());
                }
                if matches!(s.kind, SignalKind::Wake) {
                    self.resend(&h.exec, &mut h.calls);
                }
            }
            held.push(h);
        }
        // Round 0 commits the signals; later rounds one transition each.
        let result = self.rounds(&mut held, now, &mut tick);
        let released = self.store.release(&self.owner);
        result.and(released)?;
        Ok(tick)
    }

    fn rounds(&self, held: &mut [Held], now: i64, tick: &mut Tick) -> Result<(), StoreError> {
        let mut rand = rand01();
        for round in 0..=MAX_ROUNDS {
            if round > 0 {
                for h in held.iter_mut().filter(|h| h.live) {
                    match machine::step(&h.def, &mut h.exec, now, &mut rand) {
                        Some(p) => {
                            h.dirty = true;
                            h.history.extend(p.history);
                            h.calls.extend(p.calls);
                        }
                        None => h.live = false,
                    }
                }
            }
            let batch: Vec<usize> = (0..held.len())
                .filter(|i| {
                    let h = &held[*i];
                    h.dirty || !h.history.is_empty() || h.consumed.is_some()
                })
                .collect();
            if batch.is_empty() {
                if round > 0 {
                    return Ok(());
                }
                continue;
            }
            let commits: Vec<Commit> = batch
                .iter()
                .map(|i| self.commit_of(&held[*i], now))
                .collect();
            let applied = self.store.commit(&commits)?;
            for (i, ok) in batch.into_iter().zip(applied) {
                let h = &mut held[i];
                if !ok {
                    // Another runner took it: drop what this one did.
                    h.live = false;
                    h.dirty = false;
                    h.history.clear();
                    h.calls.clear();
                    continue;
                }
                tick.transitions += 1;
                h.tokens = tokens_of(&h.exec);
                h.answered.clear();
                h.dirty = false;
                h.row.history_len = h.exec.last_event;
                h.consumed = None;
                h.history.clear();
                let calls = std::mem::take(&mut h.calls);
                self.in_flight
                    .lock()
                    .extend(calls.iter().map(|c| c.key.clone()));
                tick.calls.extend(calls);
                if let Some(o) = &h.exec.outcome {
                    h.live = false;
                    tick.closed.push((h.row.id.clone(), o.status()));
                    self.notify_parent(&h.exec, o, now);
                }
            }
        }
        Ok(())
    }

    /// An execution's row parsed, with its definition; a row that cannot be read is failed.
    fn hold(&self, row: ExecutionRow, now: i64, tick: &mut Tick) -> Option<Held> {
        let exec: Exec = match serde_json::from_str(&row.state) {
            Ok(e) => e,
            Err(e) => {
                tick.refused
                    .push((row.id.clone(), format!("its state cannot be read: {e}")));
                return None;
            }
        };
        let def = match self.definition_of(&row, &exec) {
            Ok(d) => d,
            Err(why) => {
                tick.refused.push((row.id.clone(), why));
                return None;
            }
        };
        let _ = now;
        Some(Held {
            row,
            tokens: tokens_of(&exec),
            exec,
            def,
            history: Vec::new(),
            calls: Vec::new(),
            consumed: None,
            dirty: false,
            live: true,
            answered: Vec::new(),
        })
    }

    fn definition_of(&self, row: &ExecutionRow, exec: &Exec) -> Result<Arc<Definition>, String> {
        if let Some(d) = self.versions.lock().get(&exec.meta.version) {
            return Ok(d.clone());
        }
        let first = self
            .store
            .history(&row.id, 0, 1)
            .map_err(|e| e.to_string())?;
        let details: Value = first
            .first()
            .and_then(|h| serde_json::from_str(&h.details).ok())
            .unwrap_or_default();
        let def = Definition::parse(&details["definition"]).map_err(|p| {
            format!(
                "its definition (version {}) cannot be read back: {p:?}",
                exec.meta.version
            )
        })?;
        let def = Arc::new(def);
        self.versions
            .lock()
            .insert(exec.meta.version.clone(), def.clone());
        Ok(def)
    }

    /// The tasks that are out but not running in this process (after a restart).
    fn resend(&self, exec: &Exec, calls: &mut Vec<TaskCall>) {
        let in_flight = self.in_flight.lock();
        for c in exec.pending_calls() {
            if !in_flight.contains(&c.key) && !calls.iter().any(|k| k.key == c.key) {
                calls.push(c);
            }
        }
    }

    fn commit_of(&self, h: &Held, now: i64) -> Commit {
        let (status, output, error, cause) = match &h.exec.outcome {
            None => (Status::Running, None, None, None),
            Some(Outcome::Succeeded(v)) => (Status::Succeeded, Some(v.to_string()), None, None),
            Some(o @ (Outcome::Failed(e) | Outcome::TimedOut(e) | Outcome::Aborted(e))) => (
                o.status(),
                None,
                Some(e.error.clone()),
                Some(e.cause.clone()),
            ),
        };
        Commit {
            id: h.row.id.clone(),
            owner: self.owner.clone(),
            status,
            state: to_text(&h.exec),
            wake_at: h.exec.wake_at().map(|t| t.max(now)),
            output,
            error,
            cause,
            stopped_at: h.exec.outcome.as_ref().map(|_| now),
            history: h.history.clone(),
            consumed_signals: h.consumed,
            lease_until: now + LEASE_MS,
            closes: closes(h),
            at: now,
        }
    }

    /// A child whose parent waits for it has closed: the parent's task gets its result.
    fn notify_parent(&self, exec: &Exec, outcome: &Outcome, now: i64) {
        let (Some(key), Some(parent)) = (
            &exec.meta.parent_key,
            key_execution(exec.meta.parent_key.as_deref()),
        ) else {
            return;
        };
        let kind = match outcome {
            Outcome::Succeeded(v) => SignalKind::TaskSucceeded {
                key: key.clone(),
                output: v.to_string(),
            },
            Outcome::Failed(e) | Outcome::TimedOut(e) | Outcome::Aborted(e) => {
                SignalKind::TaskFailed {
                    key: key.clone(),
                    error: e.error.clone(),
                    cause: e.cause.clone(),
                }
            }
        };
        // Best effort after the child's close is committed; a crash here is healed by the
        // parent's task being sent again after recovery, which finds the child closed.
        let _ = self.store.signal(parent, kind, now);
    }
}

/// The execution a task key belongs to (`execution:state:event`).
pub fn key_execution(key: Option<&str>) -> Option<&str> {
    key.and_then(|k| k.split(':').next())
}

fn check_name(n: &str) -> Result<String, StartError> {
    let ok = !n.is_empty()
        && n.chars().count() <= 80
        && n.chars().all(|c| {
            !c.is_whitespace() && !c.is_control() && !"<>{}[]?*\"#%\\^|~`$&,;:/".contains(c)
        });
    if ok {
        Ok(n.to_string())
    } else {
        Err(StartError::InvalidInput(format!("`{n}` is not a valid execution name: 1 to 80 characters, with no spaces, brackets, wildcards or any of \"#%\\^|~`$&,;:/")))
    }
}

fn to_text(exec: &Exec) -> String {
    serde_json::to_string(exec).expect("an execution's state serializes")
}

fn rand01() -> impl FnMut() -> f64 {
    use rand::Rng;
    let mut r = rand::rng();
    move || r.random::<f64>()
}

/// The callback tokens `exec`'s tasks wait for.
fn tokens_of(exec: &Exec) -> Vec<String> {
    exec.pending_calls()
        .into_iter()
        .filter_map(|c| c.token)
        .collect()
}

/// The tokens the commit of `h` ends without their answer: waited for at the last commit,
/// waited for no more, and not answered by a signal since.
fn closes(h: &Held) -> Vec<String> {
    if h.tokens.is_empty() {
        return Vec::new();
    }
    let now = tokens_of(&h.exec);
    h.tokens
        .iter()
        .filter(|t| !now.contains(t) && !h.answered.contains(t))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::memstore::MemoryWorkflowStore;
    use serde_json::json;

    const T0: i64 = 1_700_000_000_000;

    fn runner(name: &str, def: Value) -> Runner {
        let store: Arc<dyn WorkflowStore> = Arc::new(MemoryWorkflowStore::new());
        Runner::new(store, vec![Loaded::new(name, def).unwrap()])
    }

    /// Ticks until the execution closes (or a bound on ticks): its row.
    fn run_to_end(r: &Runner, id: &str) -> ExecutionRow {
        for n in 0..20 {
            r.tick(T0 + n, 16).unwrap();
            let row = r.store().get(id).unwrap().unwrap();
            if row.status.is_closed() {
                return row;
            }
        }
        panic!("still running: {:?}", r.store().get(id).unwrap());
    }

    /// The only execution of a tick reaches a Parallel state: spawning its branches writes no
    /// history event, and must be committed all the same (it was lost, and the execution
    /// stayed at the Parallel state for good).
    #[test]
    fn a_lone_execution_runs_its_parallel_branches() {
        let r = runner(
            "par",
            json!({"StartAt": "Par", "States": {"Par": {"Type": "Parallel", "End": true,
            "Branches": [
                {"StartAt": "A", "States": {"A": {"Type": "Pass", "Result": 1, "End": true}}},
                {"StartAt": "B", "States": {"B": {"Type": "Pass", "Result": 2, "End": true}}}
            ]}}}),
        );
        let (_, id) = r
            .start("par", None, json!({}), &Starter::default(), T0)
            .unwrap();
        let row = run_to_end(&r, &id);
        assert_eq!(row.status, Status::Succeeded, "{row:?}");
        assert_eq!(row.output.as_deref(), Some("[1,2]"));
    }

    /// A callback task that times out records its token as answered in the same commit: an
    /// answer that comes after is refused, not told it was taken and then dropped. (The
    /// store's half, an answer that lands before that commit, is in the conformance checks.)
    #[test]
    fn a_timed_out_callback_takes_no_answer() {
        let r = runner(
            "ask",
            json!({"StartAt": "Ask", "States": {
                "Ask": {"Type": "Task", "Resource": "portcullis:wait_for_callback",
                        "TimeoutSeconds": 1, "End": true,
                        "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Hold"}]},
                "Hold": {"Type": "Wait", "Seconds": 3600, "End": true}}}),
        );
        let (_, id) = r
            .start("ask", None, json!({}), &Starter::default(), T0)
            .unwrap();
        let tick = r.tick(T0, 16).unwrap();
        let token = tick.calls[0].token.clone().expect("a callback token");
        assert!(!r.store().answered(&token).unwrap());
        // Past the timeout: caught, the execution waits on (so an answer could be queued).
        for n in 0..5 {
            r.tick(T0 + 2_000 + n, 16).unwrap();
        }
        let row = r.store().get(&id).unwrap().unwrap();
        assert_eq!(row.status, Status::Running, "{row:?}");
        assert!(r.store().answered(&token).unwrap());
        let late = SignalKind::Success {
            token,
            output: "{}".into(),
        };
        assert_eq!(
            r.store().answer(&id, late, T0 + 2_100).unwrap(),
            crate::workflow::store::Answered::Before
        );
    }
}
