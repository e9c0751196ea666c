//! The interpreter: an execution's whole state as one serializable value ([`Exec`]), and
//! pure functions that advance it one transition at a time. Nothing here does I/O or reads a
//! clock: the caller commits what a step returns (its history events and the new state)
//! before it runs the step's task calls, which is what makes a crash resume from the last
//! committed transition with no state run twice and none skipped.
//!
//! An execution is a set of threads: the top level, and one per running Parallel branch or
//! Map iteration. A thread is at one state, in one of a few steps: about to enter it, waiting
//! until a time, waiting for a task's result, backing off before a retry, or waiting for its
//! children. Task results, callbacks, heartbeats and stops come in as signals
//! ([`SignalKind`]); times come in as `now` (Unix milliseconds).
//!
//! Input and output follow the specification's order: `InputPath` → `Parameters` → the task
//! → `ResultSelector` → `ResultPath` → `OutputPath`, with `Assign` evaluated on the result
//! and visible from the next state on.

use super::definition::{Definition, Kind, Seconds, State, Transition, WaitFor};
pub use super::stamp::{format_timestamp, parse_timestamp};
use super::store::{HistoryRow, SignalKind, Status};
use super::{after_ms, after_secs, choice, names, paths, retry, Scope, StatesError};
use super::{MAX_HISTORY, MAX_PAYLOAD, MAX_SECONDS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// What identifies an execution, for the context object `$$` and task calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecMeta {
    pub id: String,
    pub name: String,
    pub workflow: String,
    pub input: Value,
    pub start_ms: i64,
    /// The definition's version (a hash of its text), so a running execution keeps the
    /// definition it started with across reloads.
    #[serde(default)]
    pub version: String,
    /// For a child execution that its parent waits for: the parent's task key.
    #[serde(default)]
    pub parent_key: Option<String>,
    /// The automation firings behind it, for the triggers' loop guard: the hop of the firing
    /// that started it (a child has its parent's), 0 when a person started it.
    #[serde(default)]
    pub hops: u32,
}

/// An execution's whole state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub meta: ExecMeta,
    pub threads: BTreeMap<u32, Thread>,
    pub next_thread: u32,
    /// The execution's `TimeoutSeconds`, as a time.
    pub deadline: Option<i64>,
    /// The id of the last history event.
    pub last_event: u64,
    /// Set once the execution has closed.
    pub outcome: Option<Outcome>,
}

/// How an execution closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded(Value),
    Failed(StatesError),
    TimedOut(StatesError),
    Aborted(StatesError),
}

impl Outcome {
    pub fn status(&self) -> Status {
        match self {
            Outcome::Succeeded(_) => Status::Succeeded,
            Outcome::Failed(_) => Status::Failed,
            Outcome::TimedOut(_) => Status::TimedOut,
            Outcome::Aborted(_) => Status::Aborted,
        }
    }
}

/// One line of execution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thread {
    /// The Fanout thread that started it, and its slot there.
    pub parent: Option<(u32, usize)>,
    pub state: String,
    /// The state's raw input.
    pub input: Value,
    pub vars: Map<String, Value>,
    pub entered_ms: i64,
    pub step: Step,
    /// Attempts per retrier of the current state.
    pub retries: Vec<u32>,
    pub retry_count: u32,
    /// The id of this thread's last history event.
    pub last_event: u64,
}

/// Where a thread is within its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// About to run the state on its input.
    Enter,
    /// A Wait state, until then.
    Waiting { until: i64 },
    /// A task is out; its result comes as a signal.
    Task(Box<Pending>),
    /// Retrying the state at `until`.
    Backoff { until: i64 },
    /// A Parallel or Map state's children are running.
    Fanout(Fanout),
}

/// A task that has been scheduled (committed) and not answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub call: TaskCall,
    pub deadline: Option<i64>,
    /// The heartbeat interval and when the next heartbeat is due.
    pub heartbeat: Option<(u64, i64)>,
}

/// A Parallel state's branches or a Map state's items.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fanout {
    /// Each child's input.
    pub items: Vec<Value>,
    pub next: usize,
    pub running: usize,
    /// 0: no limit.
    pub max: usize,
    pub results: Vec<Option<Value>>,
}

/// A task to run, once the step that scheduled it is committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskCall {
    pub execution: String,
    pub workflow: String,
    pub state: String,
    pub resource: String,
    pub parameters: Value,
    /// The idempotency key: execution, state and the id of its TaskScheduled event. Sent again
    /// unchanged after a crash.
    pub key: String,
    /// For `portcullis:wait_for_callback`: the token that answers it.
    pub token: Option<String>,
    pub attempt: u32,
    pub timeout_ms: Option<u64>,
    /// The execution's [`ExecMeta::hops`]: what the task causes has as many firings behind it.
    #[serde(default)]
    pub hops: u32,
}

/// What one step did: history to commit, then task calls to run.
#[derive(Debug, Default)]
pub struct Progress {
    pub history: Vec<HistoryRow>,
    pub calls: Vec<TaskCall>,
}

/// Starts an execution: its state and its first history event.
pub fn start(def: &Definition, meta: ExecMeta, now: i64) -> (Exec, Vec<HistoryRow>) {
    let input = meta.input.clone();
    let mut exec = Exec {
        deadline: def.timeout_seconds.map(|s| after_secs(now, s)),
        meta,
        threads: BTreeMap::new(),
        next_thread: 1,
        last_event: 0,
        outcome: None,
    };
    let mut cx = Cx::new(def, &mut exec, now, None);
    let id = cx.event(
        0,
        "ExecutionStarted",
        json!({ "input": input, "name": cx.exec.meta.name }),
    );
    cx.exec.threads.insert(
        0,
        Thread::new(None, &def.root.start_at, input, Map::new(), now, id),
    );
    let history = cx.out.history;
    (exec, history)
}

impl Thread {
    fn new(
        parent: Option<(u32, usize)>,
        state: &str,
        input: Value,
        vars: Map<String, Value>,
        now: i64,
        last: u64,
    ) -> Thread {
        Thread {
            parent,
            state: state.to_string(),
            input,
            vars,
            entered_ms: now,
            step: Step::Enter,
            retries: Vec::new(),
            retry_count: 0,
            last_event: last,
        }
    }
}

impl Exec {
    /// When this execution next has something to do by itself: `Some(t <= now)` if it can step
    /// now, `None` if it waits only for signals (or has closed).
    pub fn wake_at(&self) -> Option<i64> {
        if self.outcome.is_some() {
            return None;
        }
        let mut at = self.deadline;
        let mut earliest = |t: i64| at = Some(at.map_or(t, |a| a.min(t)));
        for t in self.threads.values() {
            match &t.step {
                Step::Enter => earliest(i64::MIN),
                Step::Waiting { until } | Step::Backoff { until } => earliest(*until),
                Step::Task(p) => {
                    if let Some(d) = p.deadline {
                        earliest(d);
                    }
                    if let Some((_, h)) = p.heartbeat {
                        earliest(h);
                    }
                }
                Step::Fanout(f) => {
                    if f.can_spawn() || f.done() {
                        earliest(i64::MIN);
                    }
                }
            }
        }
        at
    }

    /// The tasks out now (to send again after a restart).
    pub fn pending_calls(&self) -> Vec<TaskCall> {
        self.threads
            .values()
            .filter_map(|t| match &t.step {
                Step::Task(p) => Some(p.call.clone()),
                _ => None,
            })
            .collect()
    }

    /// The states its threads are at (for a console drawing the execution).
    pub fn current_states(&self) -> Vec<String> {
        self.threads.values().map(|t| t.state.clone()).collect()
    }
}

impl Fanout {
    fn can_spawn(&self) -> bool {
        self.next < self.items.len() && (self.max == 0 || self.running < self.max)
    }
    fn done(&self) -> bool {
        self.next >= self.items.len() && self.running == 0
    }
}

/// Advances the execution by one transition if it has one due at `now`; `None` if it has
/// nothing to do now. `rand01` gives jitter for retries and callback tokens' randomness comes
/// from the operating system.
pub fn step(
    def: &Definition,
    exec: &mut Exec,
    now: i64,
    rand01: &mut dyn FnMut() -> f64,
) -> Option<Progress> {
    if exec.outcome.is_some() {
        return None;
    }
    let mut cx = Cx::new(def, exec, now, Some(rand01));
    if cx.exec.deadline.is_some_and(|d| d <= now) {
        let e = StatesError::new(names::TIMEOUT, "the execution ran past its TimeoutSeconds");
        cx.close(Outcome::TimedOut(e));
        return Some(cx.out);
    }
    let due = cx
        .exec
        .threads
        .iter()
        .find_map(|(id, t)| t.due(now).then_some(*id))?;
    cx.advance(due);
    cx.cap_history();
    Some(cx.out)
}

/// Applies a signal. `Err` says why it does not apply (an unknown or stale token, a closed
/// execution); the state is then unchanged.
pub fn signal(
    def: &Definition,
    exec: &mut Exec,
    kind: &SignalKind,
    now: i64,
) -> Result<Progress, String> {
    if exec.outcome.is_some() {
        return Err("the execution has closed".into());
    }
    let mut cx = Cx::new(def, exec, now, None);
    match kind {
        SignalKind::Stop { error, cause } => {
            cx.close(Outcome::Aborted(StatesError::new(
                error.clone(),
                cause.clone(),
            )));
        }
        SignalKind::Wake => {}
        SignalKind::TaskSucceeded { key, output } => {
            let tid = cx.find_task(|c| c.token.is_none() && &c.key == key)?;
            cx.task_result(tid, parse_output(output));
        }
        SignalKind::TaskFailed { key, error, cause } => {
            let tid = cx.find_task(|c| c.token.is_none() && &c.key == key)?;
            cx.task_result(tid, Err(StatesError::new(error.clone(), cause.clone())));
        }
        SignalKind::Success { token, output } => {
            let tid = cx.find_task(|c| token_eq(c.token.as_deref(), token))?;
            cx.task_result(tid, parse_output(output));
        }
        SignalKind::Failure {
            token,
            error,
            cause,
        } => {
            let tid = cx.find_task(|c| token_eq(c.token.as_deref(), token))?;
            cx.task_result(tid, Err(StatesError::new(error.clone(), cause.clone())));
        }
        SignalKind::Heartbeat { token } => {
            let tid = cx.find_task(|c| token_eq(c.token.as_deref(), token))?;
            if let Some(Step::Task(p)) = cx.exec.threads.get_mut(&tid).map(|t| &mut t.step) {
                if let Some((secs, due)) = &mut p.heartbeat {
                    *due = after_secs(now, *secs);
                }
            }
        }
    }
    cx.cap_history();
    Ok(cx.out)
}

/// Constant-time comparison of a callback token (it is a bearer secret).
fn token_eq(have: Option<&str>, given: &str) -> bool {
    let Some(have) = have else { return false };
    let (a, b) = (have.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_output(text: &str) -> Result<Value, StatesError> {
    if text.len() > MAX_PAYLOAD {
        return Err(StatesError::new(
            names::DATA_LIMIT_EXCEEDED,
            format!(
                "the task's output is {} bytes, over the {MAX_PAYLOAD}-byte limit",
                text.len()
            ),
        ));
    }
    serde_json::from_str(text)
        .map_err(|e| StatesError::runtime(format!("the task's output is not JSON: {e}")))
}

impl Thread {
    fn due(&self, now: i64) -> bool {
        match &self.step {
            Step::Enter => true,
            Step::Waiting { until } | Step::Backoff { until } => *until <= now,
            Step::Task(p) => {
                p.deadline.is_some_and(|d| d <= now) || p.heartbeat.is_some_and(|(_, h)| h <= now)
            }
            Step::Fanout(f) => f.can_spawn() || f.done(),
        }
    }
}

/// One step's working set.
struct Cx<'a, 'r> {
    def: &'a Definition,
    exec: &'a mut Exec,
    now: i64,
    rand01: Option<&'r mut dyn FnMut() -> f64>,
    out: Progress,
}

impl<'a, 'r> Cx<'a, 'r> {
    fn new(
        def: &'a Definition,
        exec: &'a mut Exec,
        now: i64,
        rand01: Option<&'r mut dyn FnMut() -> f64>,
    ) -> Self {
        Cx {
            def,
            exec,
            now,
            rand01,
            out: Progress::default(),
        }
    }

    /// Appends a history event caused by `previous`; its id.
    fn event(&mut self, previous: u64, kind: &str, details: Value) -> u64 {
        self.exec.last_event += 1;
        let id = self.exec.last_event;
        self.out.history.push(HistoryRow {
            id,
            previous,
            timestamp_ms: self.now,
            kind: kind.to_string(),
            details: details.to_string(),
        });
        id
    }

    /// An event of thread `tid`, chained to its previous one.
    fn tevent(&mut self, tid: u32, kind: &str, details: Value) -> u64 {
        let prev = self
            .exec
            .threads
            .get(&tid)
            .map_or(self.exec.last_event, |t| t.last_event);
        let id = self.event(prev, kind, details);
        if let Some(t) = self.exec.threads.get_mut(&tid) {
            t.last_event = id;
        }
        id
    }

    fn cap_history(&mut self) {
        if self.exec.outcome.is_none() && self.exec.last_event >= MAX_HISTORY {
            let e = StatesError::runtime(format!("the execution reached {MAX_HISTORY} history events, the most one execution may have"));
            self.close(Outcome::Failed(e));
        }
    }

    fn close(&mut self, outcome: Outcome) {
        let details = match &outcome {
            Outcome::Succeeded(v) => json!({ "output": v }),
            Outcome::Failed(e) | Outcome::TimedOut(e) | Outcome::Aborted(e) => {
                json!({ "error": e.error, "cause": e.cause })
            }
        };
        let kind = match outcome {
            Outcome::Succeeded(_) => "ExecutionSucceeded",
            Outcome::Failed(_) => "ExecutionFailed",
            Outcome::TimedOut(_) => "ExecutionTimedOut",
            Outcome::Aborted(_) => "ExecutionAborted",
        };
        let prev = self.exec.last_event;
        self.event(prev, kind, details);
        self.exec.threads.clear();
        self.exec.outcome = Some(outcome);
    }

    fn find_task(&self, want: impl Fn(&TaskCall) -> bool) -> Result<u32, String> {
        self.exec
            .threads
            .iter()
            .find_map(|(id, t)| match &t.step {
                Step::Task(p) if want(&p.call) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| "no task of this execution waits for that token or key (it has answered, timed out, or never existed)".to_string())
    }

    fn state(&self, tid: u32) -> &'a State {
        let def = self.def;
        let name = &self.exec.threads[&tid].state;
        def.state(name)
            .expect("an execution's state is in its definition")
    }

    /// The context object `$$` for thread `tid`.
    fn context(&self, tid: u32, token: Option<&str>) -> Value {
        let t = &self.exec.threads[&tid];
        let m = &self.exec.meta;
        let mut c = json!({
            "Execution": { "Id": m.id, "Name": m.name, "Input": m.input, "StartTime": format_timestamp(m.start_ms), "RedriveCount": 0 },
            "StateMachine": { "Id": m.workflow, "Name": m.workflow },
            "State": { "Name": t.state, "EnteredTime": format_timestamp(t.entered_ms), "RetryCount": t.retry_count },
        });
        if let Some(tok) = token {
            c["Task"] = json!({ "Token": tok });
        }
        c
    }

    fn advance(&mut self, tid: u32) {
        let step = self.exec.threads[&tid].step.clone();
        let r = match step {
            Step::Enter => self.enter(tid),
            Step::Waiting { .. } => self.wait_done(tid),
            Step::Backoff { .. } => {
                self.exec.threads.get_mut(&tid).expect("thread").step = Step::Enter;
                self.enter(tid)
            }
            Step::Task(p) => {
                let (kind, err) = if p.deadline.is_some_and(|d| d <= self.now) {
                    (
                        "TaskTimedOut",
                        StatesError::new(names::TIMEOUT, "the task ran past its TimeoutSeconds"),
                    )
                } else {
                    (
                        "TaskTimedOut",
                        StatesError::new(
                            names::HEARTBEAT_TIMEOUT,
                            "no heartbeat came within HeartbeatSeconds",
                        ),
                    )
                };
                self.tevent(
                    tid,
                    kind,
                    json!({ "error": err.error, "cause": err.cause, "resource": p.call.resource }),
                );
                Err(err)
            }
            Step::Fanout(f) => self.fanout(tid, f),
        };
        if let Err(e) = r {
            self.state_failed(tid, e);
        }
    }

    /// Runs the state thread `tid` is at, from its raw input.
    fn enter(&mut self, tid: u32) -> Result<(), StatesError> {
        let state = self.state(tid);
        let ty = state.kind.type_name();
        let t = &self.exec.threads[&tid];
        if t.retry_count == 0 {
            let details = json!({ "name": state.name, "input": t.input });
            self.tevent(tid, &format!("{ty}StateEntered"), details);
        }
        let effective = self.effective_input(tid, state)?;
        match &state.kind {
            Kind::Pass { result } => {
                let r = match result {
                    Some(r) => r.clone(),
                    None => self.parameters(tid, state, &effective, None)?,
                };
                self.finish(tid, state, r)
            }
            Kind::Task {
                resource,
                timeout,
                heartbeat,
            } => self.schedule(tid, state, resource, timeout, heartbeat, &effective),
            Kind::Choice { choices, default } => {
                self.choose(tid, state, choices, default.as_deref(), effective)
            }
            Kind::Wait(w) => {
                let until = self.wait_until(tid, w, &effective)?;
                self.exec.threads.get_mut(&tid).expect("thread").step = Step::Waiting { until };
                Ok(())
            }
            Kind::Succeed => {
                let out = self.output_path(tid, state, effective)?;
                self.tevent(
                    tid,
                    "SucceedStateExited",
                    json!({ "name": state.name, "output": out }),
                );
                self.thread_done(tid, Ok(out));
                Ok(())
            }
            Kind::Fail {
                error,
                cause,
                error_path,
                cause_path,
            } => {
                let text = |fixed: &Option<String>,
                            path: &Option<String>,
                            cx: &Self|
                 -> Result<String, StatesError> {
                    if let Some(p) = path {
                        let v = cx.select(tid, p, &cx.exec.threads[&tid].input)?;
                        return v.as_str().map(str::to_string).ok_or_else(|| {
                            StatesError::runtime(format!("`{p}` selects {v}, not a string"))
                        });
                    }
                    Ok(fixed.clone().unwrap_or_default())
                };
                let e = StatesError::new(
                    text(error, error_path, self)?,
                    text(cause, cause_path, self)?,
                );
                self.thread_done(tid, Err(e));
                Ok(())
            }
            Kind::Parallel { branches } => {
                let p = self.parameters(tid, state, &effective, None)?;
                let items = vec![p; branches.len()];
                self.tevent(tid, "ParallelStateStarted", json!({ "name": state.name }));
                self.start_fanout(tid, items, 0);
                Ok(())
            }
            Kind::Map {
                items_path,
                item_selector,
                max_concurrency,
                ..
            } => self.start_map(
                tid,
                state,
                items_path,
                item_selector,
                max_concurrency,
                &effective,
            ),
        }
    }

    fn scope_select(
        &self,
        tid: u32,
        path: &str,
        input: &Value,
        token: Option<&str>,
    ) -> Result<Value, StatesError> {
        let ctx = self.context(tid, token);
        let t = &self.exec.threads[&tid];
        paths::select(
            path,
            &Scope {
                input,
                context: &ctx,
                vars: &t.vars,
            },
        )
    }

    fn select(&self, tid: u32, path: &str, input: &Value) -> Result<Value, StatesError> {
        self.scope_select(tid, path, input, None)
    }

    fn render(
        &self,
        tid: u32,
        template: &Value,
        input: &Value,
        token: Option<&str>,
    ) -> Result<Value, StatesError> {
        let ctx = self.context(tid, token);
        let t = &self.exec.threads[&tid];
        super::template::render(
            template,
            &Scope {
                input,
                context: &ctx,
                vars: &t.vars,
            },
        )
    }

    fn effective_input(&self, tid: u32, state: &State) -> Result<Value, StatesError> {
        let input = &self.exec.threads[&tid].input;
        match &state.input_path {
            None => Ok(json!({})),
            Some(p) if p == "$" => Ok(input.clone()),
            Some(p) => self.select(tid, p, input),
        }
    }

    fn parameters(
        &self,
        tid: u32,
        state: &State,
        effective: &Value,
        token: Option<&str>,
    ) -> Result<Value, StatesError> {
        match &state.parameters {
            Some(t) => self.render(tid, t, effective, token),
            None => Ok(effective.clone()),
        }
    }

    fn output_path(&self, tid: u32, state: &State, v: Value) -> Result<Value, StatesError> {
        let out = match &state.output_path {
            None => json!({}),
            Some(p) if p == "$" => v,
            Some(p) => self.select(tid, p, &v)?,
        };
        check_size(&out, "output")?;
        Ok(out)
    }

    /// Evaluates `Assign` (on `on`, the state's result) into the thread's variables.
    fn assign(&mut self, tid: u32, assign: Option<&Value>, on: &Value) -> Result<(), StatesError> {
        let Some(a) = assign else { return Ok(()) };
        let Value::Object(vars) = self.render(tid, a, on, None)? else {
            return Err(StatesError::runtime("`Assign` must give an object"));
        };
        let t = self.exec.threads.get_mut(&tid).expect("thread");
        t.vars.extend(vars);
        Ok(())
    }

    /// A state's result through `ResultSelector`, `Assign`, `ResultPath` and `OutputPath`,
    /// then on to the next state.
    fn finish(&mut self, tid: u32, state: &State, result: Value) -> Result<(), StatesError> {
        let result = match &state.result_selector {
            Some(s) => self.render(tid, s, &result, None)?,
            None => result,
        };
        check_size(&result, "result")?;
        let raw = self.exec.threads[&tid].input.clone();
        let combined = match &state.result_path {
            None => raw,
            Some(p) => paths::set_at(raw, p, result.clone())?,
        };
        let out = self.output_path(tid, state, combined)?;
        self.assign(tid, state.assign.as_ref(), &result)?;
        let ty = state.kind.type_name();
        self.tevent(
            tid,
            &format!("{ty}StateExited"),
            json!({ "name": state.name, "output": out }),
        );
        self.transition(tid, &state.transition, out);
        Ok(())
    }

    fn transition(&mut self, tid: u32, t: &Transition, out: Value) {
        match t {
            Transition::Next(n) => self.goto(tid, n, out),
            _ => self.thread_done(tid, Ok(out)),
        }
    }

    fn goto(&mut self, tid: u32, next: &str, input: Value) {
        let now = self.now;
        let t = self.exec.threads.get_mut(&tid).expect("thread");
        t.state = next.to_string();
        t.input = input;
        t.step = Step::Enter;
        t.retries.clear();
        t.retry_count = 0;
        t.entered_ms = now;
    }

    fn choose(
        &mut self,
        tid: u32,
        state: &State,
        choices: &[choice::Choice],
        default: Option<&str>,
        effective: Value,
    ) -> Result<(), StatesError> {
        let picked = {
            let ctx = self.context(tid, None);
            let t = &self.exec.threads[&tid];
            choice::choose(
                choices,
                &Scope {
                    input: &effective,
                    context: &ctx,
                    vars: &t.vars,
                },
            )?
            .cloned()
        };
        let next = match (&picked, default) {
            (Some(c), _) => c.next.clone(),
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                return Err(StatesError::new(
                    names::NO_CHOICE_MATCHED,
                    format!(
                        "no choice rule of `{}` matched its input, and it has no Default",
                        state.name
                    ),
                ))
            }
        };
        let out = self.output_path(tid, state, effective.clone())?;
        self.assign(tid, state.assign.as_ref(), &effective)?;
        if let Some(c) = &picked {
            self.assign(tid, c.assign.as_ref(), &effective)?;
        }
        self.tevent(
            tid,
            "ChoiceStateExited",
            json!({ "name": state.name, "output": out, "next": next }),
        );
        self.goto(tid, &next, out);
        Ok(())
    }

    fn wait_until(&self, tid: u32, w: &WaitFor, effective: &Value) -> Result<i64, StatesError> {
        let secs = |v: &Value, p: &str| -> Result<u64, StatesError> {
            match v.as_u64() {
                Some(s) if s <= MAX_SECONDS => Ok(s),
                Some(_) => Err(StatesError::runtime(format!(
                    "`{p}` selects {v}, over the limit of {MAX_SECONDS} seconds"
                ))),
                None => Err(StatesError::runtime(format!(
                    "`{p}` selects {v}, not a whole number of seconds"
                ))),
            }
        };
        let stamp = |s: &str| {
            parse_timestamp(s)
                .ok_or_else(|| StatesError::runtime(format!("`{s}` is not an RFC 3339 timestamp")))
        };
        Ok(match w {
            WaitFor::Seconds(s) => after_secs(self.now, *s),
            WaitFor::Timestamp(t) => stamp(t)?,
            WaitFor::SecondsPath(p) => {
                after_secs(self.now, secs(&self.select(tid, p, effective)?, p)?)
            }
            WaitFor::TimestampPath(p) => {
                let v = self.select(tid, p, effective)?;
                stamp(v.as_str().ok_or_else(|| {
                    StatesError::runtime(format!("`{p}` selects {v}, not a timestamp"))
                })?)?
            }
        })
    }

    fn wait_done(&mut self, tid: u32) -> Result<(), StatesError> {
        let state = self.state(tid);
        let effective = self.effective_input(tid, state)?;
        let out = self.output_path(tid, state, effective.clone())?;
        self.assign(tid, state.assign.as_ref(), &effective)?;
        self.tevent(
            tid,
            "WaitStateExited",
            json!({ "name": state.name, "output": out }),
        );
        self.transition(tid, &state.transition, out);
        Ok(())
    }

    fn seconds(
        &self,
        tid: u32,
        s: &Option<Seconds>,
        effective: &Value,
    ) -> Result<Option<u64>, StatesError> {
        match s {
            None => Ok(None),
            Some(Seconds::Fixed(n)) => Ok(Some(*n)),
            Some(Seconds::Path(p)) => {
                let v = self.select(tid, p, effective)?;
                v.as_u64()
                    .filter(|n| (1..=MAX_SECONDS).contains(n))
                    .map(Some)
                    .ok_or_else(|| {
                        StatesError::runtime(format!(
                            "`{p}` selects {v}, not a whole number of seconds from 1 to {MAX_SECONDS}"
                        ))
                    })
            }
        }
    }

    fn schedule(
        &mut self,
        tid: u32,
        state: &State,
        resource: &str,
        timeout: &Option<Seconds>,
        heartbeat: &Option<Seconds>,
        effective: &Value,
    ) -> Result<(), StatesError> {
        let callback = resource == "portcullis:wait_for_callback";
        let token =
            callback.then(|| format!("{}.{}", self.exec.meta.id, uuid::Uuid::new_v4().simple()));
        let params = self.parameters(tid, state, effective, token.as_deref())?;
        check_size(&params, "parameters")?;
        let timeout = self.seconds(tid, timeout, effective)?;
        let heartbeat = self.seconds(tid, heartbeat, effective)?;
        let details = json!({ "resource": resource, "parameters": params, "timeoutInSeconds": timeout, "heartbeatInSeconds": heartbeat });
        let id = self.tevent(tid, "TaskScheduled", details);
        let t = &self.exec.threads[&tid];
        let call = TaskCall {
            execution: self.exec.meta.id.clone(),
            workflow: self.exec.meta.workflow.clone(),
            state: state.name.clone(),
            resource: resource.to_string(),
            parameters: params,
            key: format!("{}:{}:{id}", self.exec.meta.id, state.name),
            token,
            attempt: t.retry_count,
            timeout_ms: timeout.map(|s| s.saturating_mul(1000)),
            hops: self.exec.meta.hops,
        };
        let pending = Pending {
            call: call.clone(),
            deadline: timeout.map(|s| after_secs(self.now, s)),
            heartbeat: heartbeat.map(|s| (s, after_secs(self.now, s))),
        };
        self.exec.threads.get_mut(&tid).expect("thread").step = Step::Task(Box::new(pending));
        self.out.calls.push(call);
        Ok(())
    }

    fn task_result(&mut self, tid: u32, r: Result<Value, StatesError>) {
        let state = self.state(tid);
        let r = match r {
            Ok(v) => {
                self.tevent(
                    tid,
                    "TaskSucceeded",
                    json!({ "resource": resource_of(state), "output": v }),
                );
                self.finish(tid, state, v)
            }
            Err(e) => {
                self.tevent(
                    tid,
                    "TaskFailed",
                    json!({ "resource": resource_of(state), "error": e.error, "cause": e.cause }),
                );
                Err(e)
            }
        };
        if let Err(e) = r {
            self.state_failed(tid, e);
        }
    }

    /// The state of thread `tid` failed with `e`: retry, catch, or fail the thread.
    fn state_failed(&mut self, tid: u32, e: StatesError) {
        if !self.exec.threads.contains_key(&tid) || self.exec.outcome.is_some() {
            return;
        }
        let state = self.state(tid);
        let rand = self.rand01.as_mut().map_or(0.0, |r| r());
        let t = self.exec.threads.get_mut(&tid).expect("thread");
        t.retries.resize(state.retry.len(), 0);
        if let Some(delay) = retry::next_retry(&state.retry, &mut t.retries, &e.error, rand) {
            t.retry_count += 1;
            t.step = Step::Backoff {
                until: after_ms(self.now, delay),
            };
            return;
        }
        if let Some(c) = retry::find_catcher(&state.catch, &e.error) {
            let raw = t.input.clone();
            let out = match &c.result_path {
                None => Ok(raw),
                Some(p) => paths::set_at(raw, p, e.output()),
            };
            let caught = out.and_then(|out| {
                self.assign(tid, c.assign.as_ref(), &e.output())
                    .map(|_| out)
            });
            match caught {
                Ok(out) => {
                    let ty = state.kind.type_name();
                    self.tevent(
                        tid,
                        &format!("{ty}StateExited"),
                        json!({ "name": state.name, "output": out, "caught": e }),
                    );
                    self.goto(tid, &c.next.clone(), out);
                }
                Err(e2) => self.thread_done(tid, Err(e2)),
            }
            return;
        }
        self.thread_done(tid, Err(e));
    }

    /// Thread `tid` reached its end: to the parent's results, or the execution's outcome.
    fn thread_done(&mut self, tid: u32, r: Result<Value, StatesError>) {
        let Some(t) = self.exec.threads.remove(&tid) else {
            return;
        };
        let Some((ptid, slot)) = t.parent else {
            match r {
                Ok(v) => self.close(Outcome::Succeeded(v)),
                Err(e) => self.close(Outcome::Failed(e)),
            }
            return;
        };
        let is_map = matches!(self.state(ptid).kind, Kind::Map { .. });
        match r {
            Ok(v) => {
                if is_map {
                    self.tevent(ptid, "MapIterationSucceeded", json!({ "index": slot }));
                }
                if let Some(Step::Fanout(f)) = self.exec.threads.get_mut(&ptid).map(|p| &mut p.step)
                {
                    f.results[slot] = Some(v);
                    f.running -= 1;
                }
            }
            Err(e) => {
                let what = if is_map { "iteration" } else { "branch" };
                if is_map {
                    self.tevent(
                        ptid,
                        "MapIterationFailed",
                        json!({ "index": slot, "error": e.error, "cause": e.cause }),
                    );
                }
                self.abort_children(ptid);
                let ty = self.state(ptid).kind.type_name();
                self.tevent(
                    ptid,
                    &format!("{ty}StateFailed"),
                    json!({ "error": e.error, "cause": e.cause }),
                );
                let cause = format!("{what} {slot} failed with {}: {}", e.error, e.cause);
                self.state_failed(ptid, StatesError::new(names::BRANCH_FAILED, cause));
            }
        }
    }

    /// Stops every descendant of thread `ptid`.
    fn abort_children(&mut self, ptid: u32) {
        let kids: Vec<u32> = self
            .exec
            .threads
            .iter()
            .filter(|(_, t)| t.parent.is_some_and(|(p, _)| p == ptid))
            .map(|(id, _)| *id)
            .collect();
        for k in kids {
            self.abort_children(k);
            self.exec.threads.remove(&k);
        }
    }

    fn start_map(
        &mut self,
        tid: u32,
        state: &State,
        items_path: &str,
        selector: &Option<Value>,
        max: &Seconds,
        effective: &Value,
    ) -> Result<(), StatesError> {
        let items = self.select(tid, items_path, effective)?;
        let Value::Array(items) = items else {
            return Err(StatesError::runtime(format!(
                "`ItemsPath` `{items_path}` selects {items}, not an array"
            )));
        };
        let mut inputs = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            inputs.push(match selector {
                None => item,
                Some(s) => {
                    let mut ctx = self.context(tid, None);
                    ctx["Map"] = json!({ "Item": { "Index": i, "Value": item } });
                    let t = &self.exec.threads[&tid];
                    super::template::render(
                        s,
                        &Scope {
                            input: effective,
                            context: &ctx,
                            vars: &t.vars,
                        },
                    )?
                }
            });
        }
        let max = match max {
            Seconds::Fixed(n) => *n as usize,
            Seconds::Path(p) => self
                .select(tid, p, effective)?
                .as_u64()
                .ok_or_else(|| StatesError::runtime(format!("`{p}` is not a whole number")))?
                as usize,
        };
        self.tevent(
            tid,
            "MapStateStarted",
            json!({ "name": state.name, "length": inputs.len() }),
        );
        self.start_fanout(tid, inputs, max);
        Ok(())
    }

    fn start_fanout(&mut self, tid: u32, items: Vec<Value>, max: usize) {
        let results = vec![None; items.len()];
        self.exec.threads.get_mut(&tid).expect("thread").step = Step::Fanout(Fanout {
            items,
            next: 0,
            running: 0,
            max,
            results,
        });
    }

    /// Starts the children there is room for, or finishes the state once all are done.
    fn fanout(&mut self, tid: u32, mut f: Fanout) -> Result<(), StatesError> {
        let state = self.state(tid);
        if f.done() {
            let results: Vec<Value> = f
                .results
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect();
            let ty = state.kind.type_name();
            self.tevent(
                tid,
                &format!("{ty}StateSucceeded"),
                json!({ "name": state.name }),
            );
            return self.finish(tid, state, Value::Array(results));
        }
        let vars = self.exec.threads[&tid].vars.clone();
        while f.can_spawn() {
            let slot = f.next;
            let start = match &state.kind {
                Kind::Parallel { branches } => &branches[slot].start_at,
                Kind::Map { processor, .. } => &processor.start_at,
                _ => unreachable!("only Parallel and Map states fan out"),
            };
            if matches!(state.kind, Kind::Map { .. }) {
                self.tevent(tid, "MapIterationStarted", json!({ "index": slot }));
            }
            let child = self.exec.next_thread;
            self.exec.next_thread += 1;
            let last = self.exec.threads[&tid].last_event;
            let th = Thread::new(
                Some((tid, slot)),
                start,
                f.items[slot].clone(),
                vars.clone(),
                self.now,
                last,
            );
            self.exec.threads.insert(child, th);
            f.next += 1;
            f.running += 1;
        }
        self.exec.threads.get_mut(&tid).expect("thread").step = Step::Fanout(f);
        Ok(())
    }
}

fn resource_of(state: &State) -> &str {
    match &state.kind {
        Kind::Task { resource, .. } => resource,
        _ => "",
    }
}

fn check_size(v: &Value, what: &str) -> Result<(), StatesError> {
    let n = serde_json::to_string(v).map_or(0, |s| s.len());
    if n > MAX_PAYLOAD {
        return Err(StatesError::new(
            names::DATA_LIMIT_EXCEEDED,
            format!("the state's {what} is {n} bytes, over the {MAX_PAYLOAD}-byte limit"),
        ));
    }
    Ok(())
}
