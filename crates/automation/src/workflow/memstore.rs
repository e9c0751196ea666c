//! An in-memory [`WorkflowStore`]: every execution, its history and its queued signals in
//! maps behind one mutex. It keeps nothing across a restart; it serves `portcullis workflow
//! run` (one execution, start to end, in one process) and the interpreter's tests.
//!
//! Its semantics are exactly the SQLite store's (`portcullis-store`): the same start
//! outcomes, the same lease rules and order, a batch of commits applied all or nothing (a
//! history event whose id the execution has already fails the whole batch, as SQLite's primary
//! key does), signal numbers that are never reused. The [`conformance`] checks run against
//! both.

use super::store::{
    Answered, Commit, ExecutionRow, HistoryRow, Leased, ListFilter, NewExecution, Signal,
    SignalKind, StartOutcome, Status, StoreError, WorkflowStore,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

/// How many executions [`WorkflowStore::list`] returns when its filter's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;

/// A [`WorkflowStore`] in memory. See the [module docs](self).
#[derive(Debug, Default)]
pub struct MemoryWorkflowStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By id.
    executions: HashMap<String, Entry>,
    /// `(workflow, name)` to id.
    names: HashMap<(String, String), String>,
    /// The last signal's `seq`: the next is one more, even after that one is consumed.
    last_seq: i64,
    /// Callback tokens answered, with their executions.
    answered: HashMap<String, String>,
}

#[derive(Debug)]
struct Entry {
    row: ExecutionRow,
    /// The owner and until when, while leased.
    lease: Option<(String, i64)>,
    history: BTreeMap<u64, HistoryRow>,
    /// In `seq` order.
    signals: Vec<Signal>,
}

impl Entry {
    fn leasable_by(&self, owner: &str, now: i64) -> bool {
        match &self.lease {
            None => true,
            Some((holder, until)) => holder == owner || *until <= now,
        }
    }

    fn is_due(&self, now: i64) -> bool {
        self.row.status == Status::Running
            && (self.row.wake_at.is_some_and(|w| w <= now) || !self.signals.is_empty())
    }
}

/// The order [`WorkflowStore::lease`] hands out due executions in: by `wake_at` when it has
/// passed, and as if due `now` when only a signal makes the execution due; then by id.
fn due_key(wake_at: Option<i64>, now: i64) -> i64 {
    match wake_at {
        Some(w) if w <= now => w,
        _ => now,
    }
}

/// Adds `rows` to `history`, failing (and leaving it as it was) if an id repeats.
fn append_history(
    history: &mut BTreeMap<u64, HistoryRow>,
    execution: &str,
    rows: Vec<HistoryRow>,
    what: &str,
) -> Result<(), StoreError> {
    let mut seen = HashSet::with_capacity(rows.len());
    for r in &rows {
        if history.contains_key(&r.id) || !seen.insert(r.id) {
            return Err(duplicate_event(what, execution, r.id));
        }
    }
    history.extend(rows.into_iter().map(|r| (r.id, r)));
    Ok(())
}

fn duplicate_event(what: &str, execution: &str, id: u64) -> StoreError {
    StoreError(format!(
        "{what}: execution {execution} already has a history event {id}"
    ))
}

impl MemoryWorkflowStore {
    /// An empty store.
    pub fn new() -> MemoryWorkflowStore {
        MemoryWorkflowStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every method checks before it changes anything, so a panic elsewhere while the
        // lock was held left the maps consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Queues `kind` for execution `id` and wakes it, when it is running; whether it was.
fn queue(inner: &mut Inner, id: &str, kind: SignalKind, now: i64) -> bool {
    match inner.executions.get_mut(id) {
        Some(e) if e.row.status == Status::Running => {
            inner.last_seq += 1;
            e.signals.push(Signal {
                seq: inner.last_seq,
                at: now,
                kind,
            });
            e.row.wake_at = Some(e.row.wake_at.map_or(now, |w| w.min(now)));
            true
        }
        _ => false,
    }
}

impl WorkflowStore for MemoryWorkflowStore {
    fn start(&self, new: NewExecution) -> Result<StartOutcome, StoreError> {
        let mut inner = self.lock();
        let key = (new.row.workflow.clone(), new.row.name.clone());
        if let Some(id) = inner.names.get(&key) {
            let existing = &inner.executions[id].row;
            return Ok(
                if existing.status == Status::Running && existing.input == new.row.input {
                    StartOutcome::Running(id.clone())
                } else {
                    StartOutcome::AlreadyExists(id.clone())
                },
            );
        }
        let what = "starting a workflow execution";
        if inner.executions.contains_key(&new.row.id) {
            return Err(StoreError(format!(
                "{what}: an execution with id {} exists already",
                new.row.id
            )));
        }
        let mut history = BTreeMap::new();
        let history_len = new.history.len() as u64;
        append_history(&mut history, &new.row.id, new.history, what)?;
        let mut row = new.row;
        row.history_len = history_len;
        let id = row.id.clone();
        inner.names.insert(key, id.clone());
        inner.executions.insert(
            id.clone(),
            Entry {
                row,
                lease: None,
                history,
                signals: Vec::new(),
            },
        );
        Ok(StartOutcome::Started(id))
    }

    fn lease(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Leased>, StoreError> {
        let mut inner = self.lock();
        let mut due: Vec<(i64, String)> = inner
            .executions
            .iter()
            .filter(|(_, e)| e.is_due(now) && e.leasable_by(owner, now))
            .map(|(id, e)| (due_key(e.row.wake_at, now), id.clone()))
            .collect();
        due.sort_unstable();
        due.truncate(limit);
        let until = now.saturating_add(lease_ms);
        let mut leased = Vec::with_capacity(due.len());
        for (_, id) in due {
            if let Some(e) = inner.executions.get_mut(&id) {
                e.lease = Some((owner.to_owned(), until));
                leased.push(Leased {
                    row: e.row.clone(),
                    signals: e.signals.clone(),
                });
            }
        }
        Ok(leased)
    }

    fn commit(&self, commits: &[Commit]) -> Result<Vec<bool>, StoreError> {
        let mut inner = self.lock();
        // First decide every commit against the state as the earlier commits of the batch
        // leave it (running? leased to whom?), and fail the batch, changing nothing, if one
        // would add a history event its execution has.
        let mut applies = Vec::with_capacity(commits.len());
        {
            let mut after: HashMap<&str, (bool, Option<&str>)> = HashMap::new();
            let mut added: HashSet<(&str, u64)> = HashSet::new();
            for c in commits {
                let Some(e) = inner.executions.get(&c.id) else {
                    applies.push(false);
                    continue;
                };
                let (running, holder) = after.get(c.id.as_str()).copied().unwrap_or((
                    e.row.status == Status::Running,
                    e.lease.as_ref().map(|(o, _)| o.as_str()),
                ));
                let applied = running
                    && holder == Some(c.owner.as_str())
                    && !c.closes.iter().any(|t| inner.answered.contains_key(t));
                applies.push(applied);
                if !applied {
                    continue;
                }
                for h in &c.history {
                    if e.history.contains_key(&h.id) || !added.insert((c.id.as_str(), h.id)) {
                        return Err(duplicate_event(
                            "committing workflow transitions",
                            &c.id,
                            h.id,
                        ));
                    }
                }
                let closed = c.status.is_closed();
                after.insert(
                    c.id.as_str(),
                    (!closed, (!closed).then_some(c.owner.as_str())),
                );
            }
        }
        for (c, _) in commits.iter().zip(&applies).filter(|(_, a)| **a) {
            for t in &c.closes {
                inner.answered.insert(t.clone(), c.id.clone());
            }
            let Some(e) = inner.executions.get_mut(&c.id) else {
                continue;
            };
            let closed = c.status.is_closed();
            let row = &mut e.row;
            row.status = c.status;
            row.state.clone_from(&c.state);
            row.wake_at = if closed { None } else { c.wake_at };
            row.output.clone_from(&c.output);
            row.error.clone_from(&c.error);
            row.cause.clone_from(&c.cause);
            row.stopped_at = c.stopped_at;
            row.history_len += c.history.len() as u64;
            e.history
                .extend(c.history.iter().map(|h| (h.id, h.clone())));
            if let Some(upto) = c.consumed_signals {
                e.signals.retain(|s| s.seq > upto);
            }
            e.lease = (!closed).then(|| (c.owner.clone(), c.lease_until));
        }
        Ok(applies)
    }

    fn release(&self, owner: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for e in inner.executions.values_mut() {
            if e.lease.as_ref().is_some_and(|(o, _)| o == owner) {
                e.lease = None;
            }
        }
        Ok(())
    }

    fn signal(&self, id: &str, kind: SignalKind, now: i64) -> Result<bool, StoreError> {
        Ok(queue(&mut self.lock(), id, kind, now))
    }

    fn answer(&self, id: &str, kind: SignalKind, now: i64) -> Result<Answered, StoreError> {
        let Some(token) = kind.answers().map(str::to_owned) else {
            return Ok(Answered::NotRunning);
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.answered.contains_key(&token) {
            return Ok(Answered::Before);
        }
        if !queue(inner, id, kind, now) {
            return Ok(Answered::NotRunning);
        }
        inner.answered.insert(token, id.to_owned());
        Ok(Answered::Queued)
    }

    fn answered(&self, token: &str) -> Result<bool, StoreError> {
        Ok(self.lock().answered.contains_key(token))
    }

    fn get(&self, id: &str) -> Result<Option<ExecutionRow>, StoreError> {
        Ok(self.lock().executions.get(id).map(|e| e.row.clone()))
    }

    fn find(&self, workflow: &str, name: &str) -> Result<Option<ExecutionRow>, StoreError> {
        let inner = self.lock();
        let key = (workflow.to_owned(), name.to_owned());
        Ok(inner
            .names
            .get(&key)
            .and_then(|id| inner.executions.get(id))
            .map(|e| e.row.clone()))
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRow>, StoreError> {
        let inner = self.lock();
        let mut rows: Vec<&ExecutionRow> = inner
            .executions
            .values()
            .map(|e| &e.row)
            .filter(|r| filter.workflow.as_ref().map_or(true, |w| *w == r.workflow))
            .filter(|r| filter.status.map_or(true, |s| s == r.status))
            .collect();
        // Newest first; among equals, the greater id first (as the SQLite store).
        rows.sort_unstable_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
        let limit = if filter.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            filter.limit
        };
        Ok(rows.into_iter().take(limit).cloned().collect())
    }

    fn history(&self, id: &str, after: u64, limit: usize) -> Result<Vec<HistoryRow>, StoreError> {
        let inner = self.lock();
        let Some(e) = inner.executions.get(id) else {
            return Ok(Vec::new());
        };
        let limit = if limit == 0 { usize::MAX } else { limit };
        Ok(e.history
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(limit)
            .map(|(_, h)| h.clone())
            .collect())
    }

    fn prune(&self, before: i64) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let gone: Vec<String> = inner
            .executions
            .iter()
            .filter(|(_, e)| {
                e.row.status.is_closed() && e.row.stopped_at.is_some_and(|s| s < before)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            if let Some(e) = inner.executions.remove(id) {
                inner.names.remove(&(e.row.workflow, e.row.name));
            }
        }
        inner.answered.retain(|_, e| !gone.contains(e));
        Ok(gone.len())
    }
}

/// Behaviour every [`WorkflowStore`] must show, as functions over `&dyn WorkflowStore`, run
/// by this module's tests on [`MemoryWorkflowStore`] and by `portcullis-store`'s on SQLite.
/// Each check wants a fresh, empty store and panics on the first difference.
#[doc(hidden)]
pub mod conformance {
    use super::super::store::{
        Commit, ExecutionRow, HistoryRow, Leased, ListFilter, NewExecution, SignalKind,
        StartOutcome, Status, WorkflowStore,
    };

    /// One check: it panics where the store differs.
    pub type Check = fn(&dyn WorkflowStore);

    /// Every check, with its name: run each on a fresh, empty store.
    pub const CHECKS: &[(&str, Check)] = &[
        ("start outcomes", start_outcomes),
        ("leases", leases),
        ("signals", signals),
        ("one answer per token", answers),
        (
            "an answer and a timeout race for a token",
            answer_races_timeout,
        ),
        ("commits", commits),
        ("a failing batch changes nothing", failing_batch),
        ("list", list),
        ("prune", prune),
    ];

    /// A history event `id` (following `id - 1`) of type `kind`, at `timestamp_ms`.
    pub fn event(id: u64, timestamp_ms: i64, kind: &str) -> HistoryRow {
        HistoryRow {
            id,
            previous: id.saturating_sub(1),
            timestamp_ms,
            kind: kind.into(),
            details: format!(r#"{{"event":{id}}}"#),
        }
    }

    /// A new running execution `id`, named `name` in `workflow`, started at `started_at` with
    /// its ExecutionStarted event, due at `wake_at`.
    pub fn execution(
        id: &str,
        workflow: &str,
        name: &str,
        input: &str,
        started_at: i64,
        wake_at: Option<i64>,
    ) -> NewExecution {
        NewExecution {
            row: ExecutionRow {
                id: id.into(),
                workflow: workflow.into(),
                name: name.into(),
                status: Status::Running,
                input: input.into(),
                output: None,
                error: None,
                cause: None,
                started_at,
                stopped_at: None,
                started_by: r#"Portcullis::Admin::"alice""#.into(),
                parent: None,
                state: r#"{"at":"Start"}"#.into(),
                wake_at,
                history_len: 1,
            },
            history: vec![event(1, started_at, "ExecutionStarted")],
        }
    }

    /// A commit by `owner` that keeps execution `id` running, in `state`, due at `wake_at`,
    /// appending `history` and holding the lease until `lease_until`.
    pub fn step(
        id: &str,
        owner: &str,
        state: &str,
        wake_at: Option<i64>,
        history: Vec<HistoryRow>,
        lease_until: i64,
    ) -> Commit {
        Commit {
            id: id.into(),
            owner: owner.into(),
            status: Status::Running,
            state: state.into(),
            wake_at,
            output: None,
            error: None,
            cause: None,
            stopped_at: None,
            history,
            consumed_signals: None,
            lease_until,
            closes: Vec::new(),
            at: lease_until,
        }
    }

    /// A commit by `owner` that closes execution `id` with `status` at `stopped_at` (with an
    /// output if it succeeded, an error and cause otherwise), appending `history`.
    pub fn close(
        id: &str,
        owner: &str,
        status: Status,
        stopped_at: i64,
        history: Vec<HistoryRow>,
    ) -> Commit {
        let ok = status == Status::Succeeded;
        Commit {
            id: id.into(),
            owner: owner.into(),
            status,
            state: r#"{"at":null}"#.into(),
            // Ignored: a closed execution never wakes.
            wake_at: Some(stopped_at + 1_000),
            output: ok.then(|| r#"{"done":true}"#.into()),
            error: (!ok).then(|| "States.TaskFailed".into()),
            cause: (!ok).then(|| "it broke".into()),
            stopped_at: Some(stopped_at),
            history,
            consumed_signals: None,
            lease_until: stopped_at + 60_000,
            closes: Vec::new(),
            at: stopped_at,
        }
    }

    fn ids(leased: &[Leased]) -> Vec<&str> {
        leased.iter().map(|l| l.row.id.as_str()).collect()
    }

    fn started(s: &dyn WorkflowStore, new: NewExecution) {
        let id = new.row.id.clone();
        assert_eq!(s.start(new).unwrap(), StartOutcome::Started(id));
    }

    /// `start`'s three outcomes, and `get`/`find`/`history` of a new execution.
    pub fn start_outcomes(s: &dyn WorkflowStore) {
        let new = execution("e1", "wf", "n1", r#"{"a":1}"#, 100, Some(100));
        assert_eq!(
            s.start(new.clone()).unwrap(),
            StartOutcome::Started("e1".into())
        );
        assert_eq!(s.get("e1").unwrap().as_ref(), Some(&new.row));
        assert_eq!(s.find("wf", "n1").unwrap().as_ref(), Some(&new.row));
        assert_eq!(s.history("e1", 0, 0).unwrap(), new.history);
        // The same name and input while it runs: that execution (and no new one).
        let again = execution("e2", "wf", "n1", r#"{"a":1}"#, 200, Some(200));
        assert_eq!(s.start(again).unwrap(), StartOutcome::Running("e1".into()));
        assert_eq!(s.get("e2").unwrap(), None);
        // Another input: it exists.
        let other = execution("e2", "wf", "n1", r#"{"a":2}"#, 200, Some(200));
        assert_eq!(
            s.start(other).unwrap(),
            StartOutcome::AlreadyExists("e1".into())
        );
        // The same name in another workflow is another execution.
        started(s, execution("e3", "wf2", "n1", r#"{"a":1}"#, 300, None));
        assert_eq!(s.find("wf2", "n1").unwrap().unwrap().id, "e3");
        // Once closed, even the same input is refused.
        let leased = s.lease("r", 100, 1_000, 10).unwrap();
        assert_eq!(ids(&leased), ["e1"]);
        assert_eq!(
            s.commit(&[close("e1", "r", Status::Succeeded, 150, vec![])])
                .unwrap(),
            [true]
        );
        let same = execution("e4", "wf", "n1", r#"{"a":1}"#, 400, Some(400));
        assert_eq!(
            s.start(same).unwrap(),
            StartOutcome::AlreadyExists("e1".into())
        );
        assert_eq!(s.get("e4").unwrap(), None);
        assert_eq!(s.get("nope").unwrap(), None);
        assert_eq!(s.find("wf", "nope").unwrap(), None);
        assert_eq!(s.find("nope", "n1").unwrap(), None);
    }

    /// Which executions `lease` hands out, to whom, in what order; `release`.
    pub fn leases(s: &dyn WorkflowStore) {
        started(s, execution("a", "wf", "a", "{}", 1, Some(100)));
        started(s, execution("b", "wf", "b", "{}", 2, Some(50)));
        started(s, execution("c", "wf", "c", "{}", 3, Some(200)));
        started(s, execution("d", "wf", "d", "{}", 4, None));
        assert!(s.lease("r1", 49, 1_000, 10).unwrap().is_empty(), "not due");
        assert!(
            s.lease("r1", 1_000, 1_000, 0).unwrap().is_empty(),
            "limit 0"
        );
        // Oldest wake first, at most `limit`.
        let leased = s.lease("r1", 100, 1_000, 1).unwrap();
        assert_eq!(ids(&leased), ["b"]);
        assert_eq!(leased[0].row, s.get("b").unwrap().unwrap());
        assert!(leased[0].signals.is_empty());
        // The owner may lease its own again (renewing it).
        assert_eq!(ids(&s.lease("r1", 100, 1_000, 10).unwrap()), ["b", "a"]);
        // Another owner may not, while the lease lasts; c is not due yet.
        assert!(s.lease("r2", 150, 1_000, 10).unwrap().is_empty());
        assert_eq!(ids(&s.lease("r2", 250, 1_000, 10).unwrap()), ["c"]);
        assert_eq!(
            ids(&s.lease("r1", 1_000, 1_000, 10).unwrap()),
            ["b", "a"],
            "its own, not r2's"
        );
        assert_eq!(ids(&s.lease("r2", 1_999, 1_000, 10).unwrap()), ["c"]);
        // A lease ends at `now + lease_ms`: then anyone may take it.
        assert_eq!(
            ids(&s.lease("r2", 2_000, 1_000, 10).unwrap()),
            ["b", "a", "c"]
        );
        assert!(s.lease("r1", 2_999, 1_000, 10).unwrap().is_empty());
        // Released, at once.
        s.release("r2").unwrap();
        s.release("nobody").unwrap();
        assert_eq!(
            ids(&s.lease("r1", 2_100, 1_000, 10).unwrap()),
            ["b", "a", "c"]
        );
        // d waits for a signal only: never leased without one.
        let far = i64::MAX / 2;
        assert_eq!(
            ids(&s.lease("r3", far, 1_000, 10).unwrap()),
            ["b", "a", "c"]
        );
        // A closed execution is never leased, even with its wake time past.
        assert_eq!(
            s.commit(&[close("b", "r3", Status::Aborted, 3_000, vec![])])
                .unwrap(),
            [true]
        );
        s.release("r3").unwrap();
        assert_eq!(ids(&s.lease("r1", 5_000, 1_000, 10).unwrap()), ["a", "c"]);
    }

    /// Signals: queued for running executions only, wake them, come with the lease in
    /// order, and are consumed by commits.
    pub fn answers(s: &dyn WorkflowStore) {
        use super::super::store::Answered;
        started(s, execution("x", "wf", "x", "{}", 1, None));
        let ok = |t: &str| SignalKind::Success {
            token: t.into(),
            output: "{}".into(),
        };
        let no = SignalKind::Failure {
            token: "t1".into(),
            error: "Rejected".into(),
            cause: "by bob".into(),
        };
        assert_eq!(s.answer("x", ok("t1"), 100).unwrap(), Answered::Queued);
        assert_eq!(s.answer("x", no, 101).unwrap(), Answered::Before);
        assert_eq!(s.answer("x", ok("t1"), 102).unwrap(), Answered::Before);
        assert_eq!(s.answer("x", ok("t2"), 103).unwrap(), Answered::Queued);
        assert_eq!(
            s.answer("nope", ok("t3"), 104).unwrap(),
            Answered::NotRunning
        );
        let beat = SignalKind::Heartbeat { token: "t4".into() };
        assert_eq!(s.answer("x", beat, 105).unwrap(), Answered::NotRunning);
        assert_eq!(s.get("x").unwrap().unwrap().wake_at, Some(100));
        let leased = s.lease("r", 200, 1000, 10).unwrap();
        let kinds: Vec<_> = leased[0].signals.iter().map(|g| &g.kind).collect();
        assert_eq!(kinds, [&ok("t1"), &ok("t2")], "the losers are not queued");
        // Consumed, the token stays answered.
        let mut c = step("x", "r", "{}", None, vec![], 1_200);
        c.consumed_signals = Some(leased[0].signals[1].seq);
        assert_eq!(s.commit(&[c]).unwrap(), [true]);
        assert_eq!(s.answer("x", ok("t1"), 300).unwrap(), Answered::Before);
        assert!(s.answered("t1").unwrap() && s.answered("t2").unwrap());
        assert!(!s.answered("t3").unwrap() && !s.answered("t4").unwrap());
    }

    /// A commit that ends a task without its answer (a timeout) and an answer to that task
    /// race: whichever the store records first wins, and the other is refused. An answer told
    /// it was taken is never dropped.
    pub fn answer_races_timeout(s: &dyn WorkflowStore) {
        use super::super::store::Answered;
        started(s, execution("x", "wf", "x", "{}", 1, Some(50)));
        let ok = |t: &str| SignalKind::Success {
            token: t.into(),
            output: "{}".into(),
        };
        let before = s.get("x").unwrap().unwrap();
        assert_eq!(ids(&s.lease("r", 100, 1_000, 10).unwrap()), ["x"]);
        // The answer lands while the runner holds the lease and times the task out.
        assert_eq!(s.answer("x", ok("t1"), 150).unwrap(), Answered::Queued);
        let mut timeout = step(
            "x",
            "r",
            "timed out",
            None,
            vec![event(before.history_len + 1, 160, "TaskTimedOut")],
            1_200,
        );
        timeout.closes = vec!["t1".into()];
        assert_eq!(
            s.commit(&[timeout]).unwrap(),
            [false],
            "the answer came first"
        );
        let row = s.get("x").unwrap().unwrap();
        assert_eq!(
            (row.state, row.history_len),
            (before.state, before.history_len),
            "nothing of it applied"
        );
        s.release("r").unwrap();
        // The runner then takes the answer.
        let leased = s.lease("r", 200, 1_000, 10).unwrap();
        assert_eq!(leased[0].signals.len(), 1);

        // The other way: the timeout is committed first, and the answer is refused.
        let mut timeout = step(
            "x",
            "r",
            "timed out",
            None,
            vec![event(before.history_len + 1, 210, "TaskTimedOut")],
            1_200,
        );
        timeout.closes = vec!["t2".into()];
        timeout.consumed_signals = Some(leased[0].signals[0].seq);
        assert_eq!(s.commit(&[timeout]).unwrap(), [true]);
        assert!(s.answered("t2").unwrap());
        assert_eq!(s.answer("x", ok("t2"), 220).unwrap(), Answered::Before);
        assert!(
            s.lease("r", 300, 1_000, 10).unwrap().is_empty(),
            "no answer queued"
        );
    }

    pub fn signals(s: &dyn WorkflowStore) {
        started(s, execution("x", "wf", "x", "{}", 1, None));
        started(s, execution("y", "wf", "y", "{}", 2, Some(5_000)));
        started(s, execution("z", "wf", "z", "{}", 3, Some(10)));
        let beat = SignalKind::Heartbeat { token: "t1".into() };
        let ok = SignalKind::Success {
            token: "t1".into(),
            output: r#"{"ok":true}"#.into(),
        };
        let stop = SignalKind::Stop {
            error: "Admin.Stop".into(),
            cause: "by alice".into(),
        };
        let fail = SignalKind::Failure {
            token: "t2".into(),
            error: "Http.500".into(),
            cause: "upstream".into(),
        };
        assert!(s.signal("x", beat.clone(), 100).unwrap());
        assert!(s.signal("x", ok.clone(), 110).unwrap());
        assert_eq!(s.get("x").unwrap().unwrap().wake_at, Some(100));
        assert!(s.signal("y", stop.clone(), 120).unwrap());
        assert_eq!(s.get("y").unwrap().unwrap().wake_at, Some(120), "sooner");
        assert!(s.signal("z", fail.clone(), 130).unwrap());
        assert_eq!(s.get("z").unwrap().unwrap().wake_at, Some(10), "not later");
        assert!(!s.signal("nope", beat.clone(), 130).unwrap());

        let leased = s.lease("r", 200, 1_000, 10).unwrap();
        assert_eq!(ids(&leased), ["z", "x", "y"]);
        let x = &leased[1].signals;
        assert_eq!(x.len(), 2);
        assert!(x[0].seq < x[1].seq);
        assert_eq!((x[0].at, &x[0].kind), (100, &beat));
        assert_eq!((x[1].at, &x[1].kind), (110, &ok));
        assert_eq!(leased[2].signals.len(), 1);
        assert_eq!(leased[2].signals[0].kind, stop);
        assert_eq!(leased[0].signals[0].kind, fail);
        assert!(leased[2].signals[0].seq > x[1].seq);

        // x consumes its first signal only, and waits for a signal: the second still makes
        // it due (as if now, after y which is due since 120).
        let mut c = step("x", "r", r#"{"at":"Wait"}"#, None, vec![], 1_200);
        c.consumed_signals = Some(x[0].seq);
        // z consumes its own, numbered after x's: x's are not touched.
        let mut cz = step("z", "r", "{}", Some(50_000), vec![], 1_200);
        cz.consumed_signals = Some(leased[0].signals[0].seq);
        assert_eq!(s.commit(&[c, cz]).unwrap(), [true, true]);
        let leased = s.lease("r", 300, 1_000, 10).unwrap();
        assert_eq!(ids(&leased), ["y", "x"]);
        assert_eq!(leased[1].signals.len(), 1);
        assert_eq!(leased[1].signals[0].kind, ok);
        assert_eq!(leased[0].signals.len(), 1, "y's own stays");
        // x consumes the rest and closes: it takes no more signals.
        let mut c = close("x", "r", Status::Succeeded, 400, vec![]);
        c.consumed_signals = Some(leased[1].signals[0].seq);
        assert_eq!(s.commit(&[c]).unwrap(), [true]);
        assert!(!s.signal("x", beat.clone(), 500).unwrap());
        assert_eq!(ids(&s.lease("r", 600, 1_000, 10).unwrap()), ["y"]);
        // New signals get new numbers, never reused.
        assert!(s.signal("z", beat.clone(), 700).unwrap());
        let leased = s.lease("r", 800, 1_000, 10).unwrap();
        assert_eq!(ids(&leased), ["y", "z"]);
        assert!(leased[1].signals[0].seq > leased[0].signals[0].seq);
        assert_eq!(leased[1].row.wake_at, Some(700));
    }

    /// Commits: refused for a stale owner or a closed execution (changing nothing), applied
    /// in order within a batch; history appended and paged.
    pub fn commits(s: &dyn WorkflowStore) {
        started(s, execution("a", "wf", "a", "{}", 0, Some(0)));
        started(s, execution("b", "wf", "b", "{}", 0, Some(0)));
        assert_eq!(s.commit(&[]).unwrap(), Vec::<bool>::new());
        assert_eq!(ids(&s.lease("r1", 0, 100, 10).unwrap()), ["a", "b"]);
        let before = s.get("a").unwrap().unwrap();
        let stale = step("a", "r2", "stale", Some(1), vec![event(2, 1, "X")], 100);
        assert_eq!(s.commit(&[stale]).unwrap(), [false]);
        assert_eq!(s.get("a").unwrap().unwrap(), before);
        let unknown = step("nope", "r1", "{}", None, vec![], 100);
        assert_eq!(s.commit(&[unknown]).unwrap(), [false]);

        let c = step(
            "a",
            "r1",
            r#"{"at":"Two"}"#,
            Some(250),
            vec![
                event(2, 10, "TaskStateEntered"),
                event(3, 11, "TaskScheduled"),
            ],
            300,
        );
        assert_eq!(s.commit(&[c]).unwrap(), [true]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(
            (a.state.as_str(), a.wake_at, a.history_len, a.status),
            (r#"{"at":"Two"}"#, Some(250), 3, Status::Running)
        );
        // r1's lease of a ends at 300 (the commit's), so r2 takes it; b's ended at 100.
        assert!(s.lease("r2", 299, 1_000, 10).unwrap().len() == 1);
        assert_eq!(ids(&s.lease("r2", 300, 1_000, 10).unwrap()), ["b", "a"]);
        let before = s.get("a").unwrap().unwrap();
        let late = step("a", "r1", "late", None, vec![event(4, 301, "Late")], 400);
        assert_eq!(s.commit(&[late]).unwrap(), [false]);
        assert_eq!(s.get("a").unwrap().unwrap(), before);

        // One batch: two steps of a in order, then a closing; b by the wrong owner.
        let batch = [
            step("a", "r2", "s4", Some(400), vec![event(4, 310, "S4")], 1_300),
            step("b", "r1", "x", None, vec![event(2, 310, "X")], 1_300),
            close(
                "a",
                "r2",
                Status::Failed,
                320,
                vec![event(5, 320, "S5"), event(6, 320, "ExecutionFailed")],
            ),
            step(
                "a",
                "r2",
                "after",
                Some(1),
                vec![event(7, 330, "Late")],
                1_300,
            ),
        ];
        assert_eq!(s.commit(&batch).unwrap(), [true, false, true, false]);
        let a = s.get("a").unwrap().unwrap();
        assert_eq!(a.status, Status::Failed);
        assert_eq!(a.state, r#"{"at":null}"#);
        assert_eq!(a.wake_at, None, "a closed execution never wakes");
        assert_eq!(a.stopped_at, Some(320));
        assert_eq!(a.output, None);
        assert_eq!(a.error.as_deref(), Some("States.TaskFailed"));
        assert_eq!(a.cause.as_deref(), Some("it broke"));
        assert_eq!(a.history_len, 6);
        let b = s.get("b").unwrap().unwrap();
        assert_eq!((b.history_len, b.state.as_str()), (1, r#"{"at":"Start"}"#));
        // Closed: the lease is gone and nothing commits to it any more.
        assert!(s.lease("r3", 10_000, 1_000, 10).unwrap().len() == 1);
        let again = close("a", "r2", Status::Succeeded, 500, vec![event(7, 500, "X")]);
        assert_eq!(s.commit(&[again]).unwrap(), [false]);
        assert_eq!(s.get("a").unwrap().unwrap(), a);

        // History, in pages.
        let page = |after, limit| -> Vec<u64> {
            s.history("a", after, limit)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect()
        };
        assert_eq!(page(0, 0), [1, 2, 3, 4, 5, 6]);
        assert_eq!(page(0, 2), [1, 2]);
        assert_eq!(page(2, 2), [3, 4]);
        assert_eq!(page(4, 0), [5, 6]);
        assert_eq!(page(6, 10), Vec::<u64>::new());
        assert_eq!(page(u64::MAX, 0), Vec::<u64>::new());
        let all = s.history("a", 0, 0).unwrap();
        assert_eq!(all[1], event(2, 10, "TaskStateEntered"));
        assert_eq!(all[5], event(6, 320, "ExecutionFailed"));
        assert!(s.history("nope", 0, 0).unwrap().is_empty());
    }

    /// A batch with a commit whose history event exists already fails as a whole.
    pub fn failing_batch(s: &dyn WorkflowStore) {
        started(s, execution("a", "wf", "a", "{}", 0, Some(0)));
        started(s, execution("b", "wf", "b", "{}", 0, Some(0)));
        assert_eq!(s.lease("r", 0, 1_000, 10).unwrap().len(), 2);
        let (a, b) = (s.get("a").unwrap(), s.get("b").unwrap());
        let batch = [
            step("a", "r", "moved", Some(5), vec![event(2, 1, "Ok")], 1_000),
            step(
                "b",
                "r",
                "moved",
                Some(5),
                vec![event(1, 1, "Again")],
                1_000,
            ),
        ];
        let err = s.commit(&batch).unwrap_err();
        assert!(!err.to_string().is_empty());
        assert_eq!((s.get("a").unwrap(), s.get("b").unwrap()), (a, b));
        assert_eq!(s.history("a", 0, 0).unwrap().len(), 1);
        // Twice in one commit, too.
        let twice = step(
            "a",
            "r",
            "m",
            None,
            vec![event(2, 1, "A"), event(2, 1, "B")],
            9,
        );
        assert!(s.commit(&[twice]).is_err());
        assert_eq!(s.history("a", 0, 0).unwrap().len(), 1);
        // And the store goes on.
        let ok = step("a", "r", "moved", Some(5), vec![event(2, 1, "Ok")], 1_000);
        assert_eq!(s.commit(&[ok]).unwrap(), [true]);
        assert_eq!(s.get("a").unwrap().unwrap().history_len, 2);
    }

    /// `list`: filters, newest first, limits (0 means 100).
    pub fn list(s: &dyn WorkflowStore) {
        started(s, execution("a10", "a", "1", "{}", 10, Some(0)));
        started(s, execution("a30", "a", "3", "{}", 30, None));
        started(s, execution("a20", "a", "2", "{}", 20, None));
        started(s, execution("b40", "b", "4", "{}", 40, None));
        s.lease("r", 0, 1_000, 10).unwrap();
        let closed = close("a10", "r", Status::TimedOut, 50, vec![]);
        assert_eq!(s.commit(&[closed]).unwrap(), [true]);
        let list = |workflow: Option<&str>, status, limit| -> Vec<String> {
            let filter = ListFilter {
                workflow: workflow.map(str::to_owned),
                status,
                limit,
            };
            s.list(&filter).unwrap().into_iter().map(|r| r.id).collect()
        };
        assert_eq!(list(None, None, 0), ["b40", "a30", "a20", "a10"]);
        assert_eq!(list(Some("a"), None, 0), ["a30", "a20", "a10"]);
        assert_eq!(list(Some("a"), None, 2), ["a30", "a20"]);
        assert_eq!(list(None, Some(Status::Running), 0), ["b40", "a30", "a20"]);
        assert_eq!(list(Some("a"), Some(Status::TimedOut), 0), ["a10"]);
        assert!(list(Some("b"), Some(Status::Succeeded), 0).is_empty());
        assert!(list(Some("c"), None, 0).is_empty());
        let rows = s.list(&ListFilter::default()).unwrap();
        assert_eq!(rows[3], s.get("a10").unwrap().unwrap());
        // Equal start times: the greater id first.
        started(s, execution("b40x", "b", "5", "{}", 40, None));
        assert_eq!(list(Some("b"), None, 0), ["b40x", "b40"]);
        for i in 0..100 {
            let id = format!("c{i:03}");
            started(s, execution(&id, "c", &id, "{}", 100 + i, None));
        }
        let all = list(None, None, 0);
        assert_eq!(all.len(), 100, "0 means 100");
        assert_eq!((all[0].as_str(), all[99].as_str()), ("c099", "c000"));
        assert_eq!(list(None, None, 1_000).len(), 105);
    }

    /// `prune`: closed executions stopped before the time go, with their history; running
    /// ones and later ones stay; their names may be used again.
    pub fn prune(s: &dyn WorkflowStore) {
        started(s, execution("a", "wf", "a", "{}", 0, Some(0)));
        started(s, execution("b", "wf", "b", "{}", 0, Some(0)));
        started(s, execution("c", "wf", "c", "{}", 0, Some(0)));
        assert!(s
            .signal("a", SignalKind::Heartbeat { token: "t".into() }, 0)
            .unwrap());
        s.lease("r", 0, 1_000, 10).unwrap();
        let batch = [
            close(
                "a",
                "r",
                Status::Succeeded,
                100,
                vec![event(2, 100, "Done")],
            ),
            close("b", "r", Status::Aborted, 200, vec![]),
        ];
        assert_eq!(s.commit(&batch).unwrap(), [true, true]);
        assert_eq!(s.prune(100).unwrap(), 0, "stopped at 100 is not before 100");
        assert_eq!(s.prune(101).unwrap(), 1);
        assert_eq!(s.get("a").unwrap(), None);
        assert_eq!(s.find("wf", "a").unwrap(), None);
        assert!(s.history("a", 0, 0).unwrap().is_empty());
        assert!(s.get("b").unwrap().is_some());
        assert_eq!(s.history("b", 0, 0).unwrap().len(), 1);
        assert_eq!(s.prune(i64::MAX).unwrap(), 1);
        assert_eq!(s.prune(i64::MAX).unwrap(), 0);
        assert!(s.get("c").unwrap().is_some(), "running: kept");
        // The name is free again (and so is the id).
        started(s, execution("a", "wf", "a", "{}", 300, None));
        assert_eq!(s.history("a", 0, 0).unwrap().len(), 1);
        assert!(s.lease("r", 300, 1_000, 10).unwrap().len() == 1, "only c");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        for (name, check) in conformance::CHECKS {
            eprintln!("check: {name}");
            check(&MemoryWorkflowStore::new());
        }
    }

    #[test]
    fn it_is_a_shared_store() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<MemoryWorkflowStore>();
        let store: std::sync::Arc<dyn WorkflowStore> =
            std::sync::Arc::new(MemoryWorkflowStore::new());
        let new = conformance::execution("e", "wf", "n", "{}", 0, Some(0));
        assert_eq!(store.start(new).unwrap(), StartOutcome::Started("e".into()));
    }

    #[test]
    fn a_started_execution_counts_its_history() {
        let s = MemoryWorkflowStore::new();
        let mut new = conformance::execution("e", "wf", "n", "{}", 0, Some(0));
        new.row.history_len = 0;
        new.history
            .push(conformance::event(2, 0, "PassStateEntered"));
        s.start(new).unwrap();
        assert_eq!(s.get("e").unwrap().unwrap().history_len, 2);
        let mut dup = conformance::execution("f", "wf", "m", "{}", 0, Some(0));
        dup.history.push(conformance::event(1, 0, "Again"));
        assert!(s.start(dup).is_err());
        assert_eq!(s.find("wf", "m").unwrap(), None);
        let same_id = conformance::execution("e", "wf", "other", "{}", 0, Some(0));
        assert!(s.start(same_id).is_err());
    }
}
