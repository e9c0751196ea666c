//! Running a definition in memory, to try it: `portcullis workflow run --definition F --input
//! JSON --task-result State=JSON`. Tasks get canned results instead of running, and time is
//! virtual: a Wait or a retry's back-off moves the clock forward at once, so the history shows
//! the times a real run would have (a 3 s retry is stamped 3 s later) without waiting.

use super::definition::Definition;
use super::machine::{self, Exec, ExecMeta, Outcome, TaskCall};
use super::store::{HistoryRow, SignalKind};
use super::{names, StatesError};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};

/// A canned task result.
#[derive(Clone, Debug, PartialEq)]
pub enum Canned {
    Ok(Value),
    Err(StatesError),
    /// No answer at all: the task runs until its timeout or heartbeat ends it.
    Silent,
}

/// Canned results by state name. A state given several answers gets them in turn (one per
/// attempt), and the last one again for every later attempt.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    by_state: HashMap<String, (Vec<Canned>, usize)>,
}

impl Answers {
    pub fn new() -> Answers {
        Answers::default()
    }

    /// Adds an answer for `state`'s next attempt.
    pub fn add(&mut self, state: &str, answer: Canned) -> &mut Answers {
        self.by_state
            .entry(state.to_string())
            .or_default()
            .0
            .push(answer);
        self
    }

    /// Parses `State=JSON` (a success with that output), or `State=silent` (no answer).
    pub fn add_result(&mut self, spec: &str) -> Result<(), String> {
        let (state, json) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: give STATE=JSON, like Check='{{\"ok\": true}}'"))?;
        if json == "silent" {
            self.add(state, Canned::Silent);
            return Ok(());
        }
        let v = serde_json::from_str(json)
            .map_err(|e| format!("`{spec}`: the result after `=` is not JSON: {e}"))?;
        self.add(state, Canned::Ok(v));
        Ok(())
    }

    /// Parses `State=Error` or `State=Error:Cause` (a failure).
    pub fn add_failure(&mut self, spec: &str) -> Result<(), String> {
        let (state, err) = spec.split_once('=').ok_or_else(|| {
            format!("`{spec}`: give STATE=ERROR[:CAUSE], like Check=Http.503:down")
        })?;
        let (error, cause) = err.split_once(':').unwrap_or((err, ""));
        if error.is_empty() {
            return Err(format!("`{spec}`: the error name after `=` is empty"));
        }
        self.add(state, Canned::Err(StatesError::new(error, cause)));
        Ok(())
    }

    fn next(&mut self, state: &str) -> Canned {
        match self.by_state.get_mut(state) {
            Some((list, i)) if !list.is_empty() => {
                let a = list[(*i).min(list.len() - 1)].clone();
                *i += 1;
                a
            }
            _ => Canned::Err(StatesError::new(
                names::TASK_FAILED,
                format!("no canned result for the task state `{state}`: give --task-result {state}=JSON"),
            )),
        }
    }
}

/// What a local run did.
#[derive(Clone, Debug)]
pub struct LocalRun {
    pub outcome: Outcome,
    pub history: Vec<HistoryRow>,
    /// Every task call, in the order they were made.
    pub calls: Vec<TaskCall>,
    /// The virtual time at the end.
    pub ended_ms: i64,
}

/// Runs `def` on `input` from virtual time `start_ms` until it closes, with at most
/// `max_transitions` steps (a definition that loops forever stops with an error).
pub fn run(
    def: &Definition,
    input: Value,
    answers: &mut Answers,
    start_ms: i64,
    max_transitions: usize,
) -> Result<LocalRun, String> {
    let meta = ExecMeta {
        id: "local".into(),
        name: "local".into(),
        workflow: "local".into(),
        input,
        start_ms,
        version: String::new(),
        parent_key: None,
        hops: 0,
    };
    let (mut exec, mut history) = machine::start(def, meta, start_ms);
    let mut calls = Vec::new();
    let mut out: VecDeque<TaskCall> = VecDeque::new();
    let mut now = start_ms;
    let mut rand = || 0.5;
    for _ in 0..max_transitions {
        if let Some(p) = machine::step(def, &mut exec, now, &mut rand) {
            history.extend(p.history);
            out.extend(p.calls.iter().cloned());
            calls.extend(p.calls);
            continue;
        }
        if let Some(outcome) = &exec.outcome {
            return Ok(LocalRun {
                outcome: outcome.clone(),
                history,
                calls,
                ended_ms: now,
            });
        }
        if let Some(call) = out.pop_front() {
            answer(def, &mut exec, answers, &call, now, &mut history);
            continue;
        }
        match exec.wake_at() {
            Some(t) => now = now.max(t),
            None => return Err("the execution waits for something that will never come".into()),
        }
    }
    Err(format!(
        "the execution did not end within {max_transitions} transitions"
    ))
}

fn answer(
    def: &Definition,
    exec: &mut Exec,
    answers: &mut Answers,
    call: &TaskCall,
    now: i64,
    history: &mut Vec<HistoryRow>,
) {
    let kind = match (answers.next(&call.state), &call.token) {
        (Canned::Silent, _) => return,
        (Canned::Ok(v), None) => SignalKind::TaskSucceeded {
            key: call.key.clone(),
            output: v.to_string(),
        },
        (Canned::Err(e), None) => SignalKind::TaskFailed {
            key: call.key.clone(),
            error: e.error,
            cause: e.cause,
        },
        (Canned::Ok(v), Some(t)) => SignalKind::Success {
            token: t.clone(),
            output: v.to_string(),
        },
        (Canned::Err(e), Some(t)) => SignalKind::Failure {
            token: t.clone(),
            error: e.error,
            cause: e.cause,
        },
    };
    // A task that timed out meanwhile no longer takes its answer: that is what a real run does.
    if let Ok(p) = machine::signal(def, exec, &kind, now) {
        history.extend(p.history);
    }
}
