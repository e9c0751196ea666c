//! Where workflow executions live: the [`WorkflowStore`] trait, with transactions and
//! leases, so that every transition is committed before its effects are visible and two
//! processes never advance one execution at once. The embedded SQLite store implements it
//! (`portcullis-store`), and `memstore::MemoryWorkflowStore`
//! serves `portcullis workflow run` and tests.
//!
//! An execution is one row: its status, its machine state (the interpreter's JSON, opaque
//! here), and `wake_at`, when it next has something to do (a Wait ends, a retry is due, a
//! timeout fires). Its history is an append-only list of rows. Signals (a callback's
//! answer, a heartbeat, a stop) are queued beside it and wake it; the runner consumes them
//! in the same transaction that commits what they caused. A callback token takes one answer:
//! [`WorkflowStore::answer`] records the token as answered in the transaction that queues the
//! answer, so of concurrent answers exactly one is queued.
//!
//! Times are Unix milliseconds, given by the caller.

use serde::{Deserialize, Serialize};

/// An execution's status, as Step Functions names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Aborted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "RUNNING",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::TimedOut => "TIMED_OUT",
            Status::Aborted => "ABORTED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "RUNNING" => Status::Running,
            "SUCCEEDED" => Status::Succeeded,
            "FAILED" => Status::Failed,
            "TIMED_OUT" => Status::TimedOut,
            "ABORTED" => Status::Aborted,
            _ => return None,
        })
    }

    pub fn is_closed(self) -> bool {
        self != Status::Running
    }
}

/// One history event: Step Functions' `id`, `previousEventId`, `timestamp` and `type`, with
/// the type's details as JSON text (`{"name": "Drain", "input": …}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub id: u64,
    pub previous: u64,
    pub timestamp_ms: i64,
    pub kind: String,
    pub details: String,
}

/// An execution as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRow {
    /// Unique across workflows (a UUID).
    pub id: String,
    /// The workflow (state machine) it runs.
    pub workflow: String,
    /// Its name, unique within the workflow.
    pub name: String,
    pub status: Status,
    /// JSON text.
    pub input: String,
    /// JSON text, once succeeded.
    pub output: Option<String>,
    pub error: Option<String>,
    pub cause: Option<String>,
    pub started_at: i64,
    pub stopped_at: Option<i64>,
    /// Who started it: `Portcullis::Admin::"alice"`, `Portcullis::Trigger::"failover"`, …
    pub started_by: String,
    /// The execution that started it as a child, if any.
    pub parent: Option<String>,
    /// The interpreter's state, JSON text (opaque to the store).
    pub state: String,
    /// When it next has something to do; `None` when it waits only for a signal.
    pub wake_at: Option<i64>,
    /// How many history events it has.
    pub history_len: u64,
}

/// What a new execution starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewExecution {
    pub row: ExecutionRow,
    /// Its first history events (ExecutionStarted).
    pub history: Vec<HistoryRow>,
}

/// The outcome of [`WorkflowStore::start`], with Step Functions' naming semantics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// A new execution, with this id.
    Started(String),
    /// An execution of this name is running with the same input: that one.
    Running(String),
    /// An execution of this name exists with another input, or has closed:
    /// `ExecutionAlreadyExists`. The existing execution's id.
    AlreadyExists(String),
}

/// What a signal asks of a waiting execution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SignalKind {
    /// A callback task succeeded with this output (JSON text).
    Success { token: String, output: String },
    /// A callback task failed.
    Failure {
        token: String,
        error: String,
        cause: String,
    },
    /// A callback task is still alive.
    Heartbeat { token: String },
    /// Stop the execution (it ends ABORTED).
    Stop { error: String, cause: String },
    /// A task the runner ran succeeded (`key` is the task's idempotency key).
    TaskSucceeded { key: String, output: String },
    /// A task the runner ran failed.
    TaskFailed {
        key: String,
        error: String,
        cause: String,
    },
    /// Nothing but a wake-up: the runner looks at the execution now (after a restart, to
    /// send again the tasks that were in flight).
    Wake,
}

impl SignalKind {
    /// The callback token a `Success` or `Failure` answers.
    pub fn answers(&self) -> Option<&str> {
        match self {
            SignalKind::Success { token, .. } | SignalKind::Failure { token, .. } => Some(token),
            _ => None,
        }
    }
}

/// What [`WorkflowStore::answer`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// The answer is queued: the first for its token.
    Queued,
    /// The token was answered before: this answer is dropped.
    Before,
    /// There is no such running execution (or the signal answers no token).
    NotRunning,
}

/// A queued signal, in arrival order (`seq` grows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    pub seq: i64,
    pub at: i64,
    pub kind: SignalKind,
}

/// An execution leased to one runner, with the signals queued for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leased {
    pub row: ExecutionRow,
    pub signals: Vec<Signal>,
}

/// One execution's transition(s), committed atomically with the others of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub id: String,
    /// The runner that holds the lease; the commit is refused if it no longer does.
    pub owner: String,
    pub status: Status,
    pub state: String,
    pub wake_at: Option<i64>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub cause: Option<String>,
    /// Set when the execution closes.
    pub stopped_at: Option<i64>,
    /// Appended to its history (ids continue from `history_len`).
    pub history: Vec<HistoryRow>,
    /// Signals consumed by this commit: every signal with `seq <=` this is deleted.
    pub consumed_signals: Option<i64>,
    /// The lease is held until then (ignored once closed).
    pub lease_until: i64,
    /// Callback tokens this commit ends without their answer (a timeout, a stop, a failure
    /// elsewhere in the execution). They are recorded as answered with it, so that a later
    /// answer is refused ([`Answered::Before`]); and if one of them was answered meanwhile,
    /// the commit is refused, so that the runner takes that answer on its next tick. An
    /// answer told it was taken is never dropped by a timeout that raced it.
    pub closes: Vec<String>,
    /// When the runner made the commit (the time recorded with `closes`).
    pub at: i64,
}

/// Which executions to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub workflow: Option<String>,
    pub status: Option<Status>,
    /// At most this many, newest first (0 means 100).
    pub limit: usize,
}

/// A store failure (I/O, corruption): the caller retries later and changes nothing.
#[derive(Debug, thiserror::Error)]
#[error("workflow store: {0}")]
pub struct StoreError(pub String);

/// Durable executions. Every method is one transaction. Implementations shared by several
/// processes make `start` atomic on `(workflow, name)` and `lease`/`commit` atomic per row.
pub trait WorkflowStore: Send + Sync {
    /// Creates the execution unless its `(workflow, name)` exists; see [`StartOutcome`].
    fn start(&self, new: NewExecution) -> Result<StartOutcome, StoreError>;

    /// Leases up to `limit` running executions that are due (`wake_at <= now`, or with a
    /// queued signal) and not leased by another owner until after `now`, to `owner` until
    /// `now + lease_ms`; oldest `wake_at` first. Returns them with their queued signals.
    fn lease(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Leased>, StoreError>;

    /// Applies every commit in one transaction. Per commit, `true` if applied, `false` if
    /// its execution is not leased to its owner any more (or is closed), which leaves that
    /// row untouched.
    fn commit(&self, commits: &[Commit]) -> Result<Vec<bool>, StoreError>;

    /// Gives up `owner`'s leases (at shutdown), so another runner may take them at once.
    fn release(&self, owner: &str) -> Result<(), StoreError>;

    /// Queues a signal for a running execution and makes it due now. `false` if there is no
    /// such running execution.
    fn signal(&self, id: &str, kind: SignalKind, now: i64) -> Result<bool, StoreError>;

    /// Queues a callback's answer (`kind` is a `Success` or `Failure`) for a running
    /// execution, and records its token as answered, in one transaction: a token answered
    /// before takes no other answer ([`Answered::Before`]). The token stays answered until
    /// its execution is pruned.
    fn answer(&self, id: &str, kind: SignalKind, now: i64) -> Result<Answered, StoreError>;

    /// Whether the callback `token` was answered (see [`WorkflowStore::answer`]).
    fn answered(&self, token: &str) -> Result<bool, StoreError>;

    fn get(&self, id: &str) -> Result<Option<ExecutionRow>, StoreError>;

    /// The execution `name` of `workflow`.
    fn find(&self, workflow: &str, name: &str) -> Result<Option<ExecutionRow>, StoreError>;

    /// Executions, newest `started_at` first.
    fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRow>, StoreError>;

    /// History events with `id > after`, in order, at most `limit` (0 means all).
    fn history(&self, id: &str, after: u64, limit: usize) -> Result<Vec<HistoryRow>, StoreError>;

    /// Forgets closed executions (and their history) stopped before `before`. How many.
    fn prune(&self, before: i64) -> Result<usize, StoreError>;
}
