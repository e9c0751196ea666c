//! Durable workflow executions: [`WorkflowStore`] for [`Store`], in the tables
//! `workflow_executions`, `workflow_history` and `workflow_signals` (schema version 4), and
//! `workflow_answers` (version 7).
//!
//! Every method is one transaction. Those that read before they write (`start`, `lease`,
//! `commit`, `signal`, `answer`, `prune`) take the write lock first (`BEGIN IMMEDIATE`), so two
//! processes on the same file never both start one name, nor lease one execution, nor commit
//! on a lease the other took. [`WorkflowStore::commit`] writes a whole batch of transitions in
//! one transaction, with one `fsync`: that is the runner's group commit.
//!
//! Times are Unix milliseconds, given by the caller. Every call is blocking: from async code,
//! call it on `spawn_blocking`. The semantics are exactly those of
//! `portcullis_automation::workflow::memstore::MemoryWorkflowStore`; the same conformance
//! checks run on both.

use crate::Store;
use portcullis_automation::workflow::store::{
    Answered, Commit, ExecutionRow, HistoryRow, Leased, ListFilter, NewExecution, Signal,
    SignalKind, StartOutcome, Status, StoreError as WorkflowError, WorkflowStore,
};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

/// The columns [`read_execution`] reads, in its order.
macro_rules! columns {
    () => {
        "id, workflow, name, status, input, output, error, cause, started_at, stopped_at, \
         started_by, parent, state, wake_at, history_len"
    };
}

/// How many executions `list` returns when its filter's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_i64(n: u64) -> rusqlite::Result<i64> {
    i64::try_from(n).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn to_u64(column: usize, n: i64) -> rusqlite::Result<u64> {
    u64::try_from(n)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Integer, Box::new(e)))
}

fn read_execution(r: &Row<'_>) -> rusqlite::Result<ExecutionRow> {
    let status: String = r.get(3)?;
    let status = Status::parse(&status).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            3,
            Type::Text,
            format!("unknown execution status {status:?}").into(),
        )
    })?;
    Ok(ExecutionRow {
        id: r.get(0)?,
        workflow: r.get(1)?,
        name: r.get(2)?,
        status,
        input: r.get(4)?,
        output: r.get(5)?,
        error: r.get(6)?,
        cause: r.get(7)?,
        started_at: r.get(8)?,
        stopped_at: r.get(9)?,
        started_by: r.get(10)?,
        parent: r.get(11)?,
        state: r.get(12)?,
        wake_at: r.get(13)?,
        history_len: to_u64(14, r.get(14)?)?,
    })
}

fn read_history(r: &Row<'_>) -> rusqlite::Result<HistoryRow> {
    Ok(HistoryRow {
        id: to_u64(0, r.get(0)?)?,
        previous: to_u64(1, r.get(1)?)?,
        timestamp_ms: r.get(2)?,
        kind: r.get(3)?,
        details: r.get(4)?,
    })
}

fn read_signal(r: &Row<'_>) -> rusqlite::Result<Signal> {
    let kind: String = r.get(2)?;
    let kind = serde_json::from_str::<SignalKind>(&kind)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, Type::Text, Box::new(e)))?;
    Ok(Signal {
        seq: r.get(0)?,
        at: r.get(1)?,
        kind,
    })
}

/// Appends `rows` to execution `id`'s history (a repeated event id fails).
fn insert_history(tx: &Transaction<'_>, id: &str, rows: &[HistoryRow]) -> rusqlite::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO workflow_history (execution_id, id, previous, timestamp_ms, kind, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for h in rows {
        insert.execute(params![
            id,
            to_i64(h.id)?,
            to_i64(h.previous)?,
            h.timestamp_ms,
            h.kind,
            h.details
        ])?;
    }
    Ok(())
}

fn start(conn: &mut Connection, new: &NewExecution) -> rusqlite::Result<StartOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row = &new.row;
    let existing = tx
        .prepare_cached(
            "SELECT id, status, input FROM workflow_executions WHERE workflow = ?1 AND name = ?2",
        )?
        .query_row(params![row.workflow, row.name], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?;
    if let Some((id, status, input)) = existing {
        // Nothing written: dropping `tx` ends it.
        return Ok(
            if status == Status::Running.as_str() && input == row.input {
                StartOutcome::Running(id)
            } else {
                StartOutcome::AlreadyExists(id)
            },
        );
    }
    tx.prepare_cached(concat!(
        "INSERT INTO workflow_executions (",
        columns!(),
        ", lease_owner, lease_until)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, NULL, NULL)"
    ))?
    .execute(params![
        row.id,
        row.workflow,
        row.name,
        row.status.as_str(),
        row.input,
        row.output,
        row.error,
        row.cause,
        row.started_at,
        row.stopped_at,
        row.started_by,
        row.parent,
        row.state,
        row.wake_at,
        to_i64(new.history.len() as u64)?,
    ])?;
    insert_history(&tx, &row.id, &new.history)?;
    tx.commit()?;
    Ok(StartOutcome::Started(row.id.clone()))
}

fn lease(
    conn: &mut Connection,
    owner: &str,
    now: i64,
    lease_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Leased>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows = {
        // Due: its wake time has come (by the index), or a signal waits; only those rows are
        // read (hence the CROSS JOIN's order). Ordered by the wake time, or `now` for one due
        // by a signal only.
        let mut due = tx.prepare_cached(concat!(
            "SELECT ",
            columns!(),
            " FROM (SELECT id AS due_id FROM workflow_executions
                    WHERE status = 'RUNNING' AND wake_at <= ?2
                   UNION
                   SELECT execution_id FROM workflow_signals)
             CROSS JOIN workflow_executions ON id = due_id
             WHERE status = 'RUNNING'
               AND (lease_owner IS NULL OR lease_owner = ?1 OR lease_until <= ?2)
             ORDER BY CASE WHEN wake_at <= ?2 THEN wake_at ELSE ?2 END, id
             LIMIT ?3"
        ))?;
        let rows = due
            .query_map(params![owner, now, limit_param(limit)], read_execution)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let until = now.saturating_add(lease_ms);
    let mut leased = Vec::with_capacity(rows.len());
    {
        let mut take = tx.prepare_cached(
            "UPDATE workflow_executions SET lease_owner = ?2, lease_until = ?3 WHERE id = ?1",
        )?;
        let mut signals = tx.prepare_cached(
            "SELECT seq, at, kind FROM workflow_signals WHERE execution_id = ?1 ORDER BY seq",
        )?;
        for row in rows {
            take.execute(params![row.id, owner, until])?;
            let signals = signals
                .query_map(params![row.id], read_signal)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            leased.push(Leased { row, signals });
        }
    }
    tx.commit()?;
    Ok(leased)
}

fn commit(conn: &mut Connection, commits: &[Commit]) -> rusqlite::Result<Vec<bool>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut applied = Vec::with_capacity(commits.len());
    {
        let mut update = tx.prepare_cached(
            "UPDATE workflow_executions
                SET status = ?3, state = ?4, wake_at = ?5, output = ?6, error = ?7, cause = ?8,
                    stopped_at = ?9, history_len = history_len + ?10,
                    lease_owner = ?11, lease_until = ?12
              WHERE id = ?1 AND lease_owner = ?2 AND status = 'RUNNING'",
        )?;
        let mut consume = tx
            .prepare_cached("DELETE FROM workflow_signals WHERE execution_id = ?1 AND seq <= ?2")?;
        let mut answered = tx.prepare_cached("SELECT 1 FROM workflow_answers WHERE token = ?1")?;
        let mut close = tx.prepare_cached(
            "INSERT INTO workflow_answers (token, execution_id, at) VALUES (?1, ?2, ?3)",
        )?;
        for c in commits {
            // A token this commit ends that was answered meanwhile: the answer wins.
            let mut raced = false;
            for t in &c.closes {
                raced |= answered.exists(params![t])?;
            }
            if raced {
                applied.push(false);
                continue;
            }
            let open = !c.status.is_closed();
            let n = update.execute(params![
                c.id,
                c.owner,
                c.status.as_str(),
                c.state,
                c.wake_at.filter(|_| open),
                c.output,
                c.error,
                c.cause,
                c.stopped_at,
                to_i64(c.history.len() as u64)?,
                open.then_some(c.owner.as_str()),
                open.then_some(c.lease_until),
            ])?;
            applied.push(n == 1);
            if n != 1 {
                continue;
            }
            insert_history(&tx, &c.id, &c.history)?;
            for t in &c.closes {
                close.execute(params![t, c.id, c.at])?;
            }
            if let Some(upto) = c.consumed_signals {
                consume.execute(params![c.id, upto])?;
            }
        }
    }
    tx.commit()?;
    Ok(applied)
}

fn signal(conn: &mut Connection, id: &str, kind: &str, now: i64) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx
        .prepare_cached(
            "UPDATE workflow_executions
                SET wake_at = CASE WHEN wake_at <= ?2 THEN wake_at ELSE ?2 END
              WHERE id = ?1 AND status = 'RUNNING'",
        )?
        .execute(params![id, now])?;
    if n == 0 {
        return Ok(false);
    }
    tx.prepare_cached("INSERT INTO workflow_signals (execution_id, at, kind) VALUES (?1, ?2, ?3)")?
        .execute(params![id, now, kind])?;
    tx.commit()?;
    Ok(true)
}

fn answer(
    conn: &mut Connection,
    id: &str,
    token: &str,
    kind: &str,
    now: i64,
) -> rusqlite::Result<Answered> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let before: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM workflow_answers WHERE token = ?1")?
        .query_row(params![token], |r| r.get(0))
        .optional()?;
    if before.is_some() {
        return Ok(Answered::Before);
    }
    let n = tx
        .prepare_cached(
            "UPDATE workflow_executions
                SET wake_at = CASE WHEN wake_at <= ?2 THEN wake_at ELSE ?2 END
              WHERE id = ?1 AND status = 'RUNNING'",
        )?
        .execute(params![id, now])?;
    if n == 0 {
        return Ok(Answered::NotRunning);
    }
    tx.prepare_cached(
        "INSERT INTO workflow_answers (token, execution_id, at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![token, id, now])?;
    tx.prepare_cached("INSERT INTO workflow_signals (execution_id, at, kind) VALUES (?1, ?2, ?3)")?
        .execute(params![id, now, kind])?;
    tx.commit()?;
    Ok(Answered::Queued)
}

fn prune(conn: &mut Connection, before: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "DELETE FROM workflow_answers WHERE execution_id IN
            (SELECT id FROM workflow_executions WHERE status <> 'RUNNING' AND stopped_at < ?1)",
        params![before],
    )?;
    tx.execute(
        "DELETE FROM workflow_history WHERE execution_id IN
            (SELECT id FROM workflow_executions WHERE status <> 'RUNNING' AND stopped_at < ?1)",
        params![before],
    )?;
    tx.execute(
        "DELETE FROM workflow_signals WHERE execution_id IN
            (SELECT id FROM workflow_executions WHERE status <> 'RUNNING' AND stopped_at < ?1)",
        params![before],
    )?;
    let n = tx.execute(
        "DELETE FROM workflow_executions WHERE status <> 'RUNNING' AND stopped_at < ?1",
        params![before],
    )?;
    tx.commit()?;
    Ok(n)
}

impl Store {
    /// The trait's error for `source`, saying what failed and where.
    fn workflow_error(&self, what: &'static str, source: rusqlite::Error) -> WorkflowError {
        WorkflowError(self.error(what, source).to_string())
    }
}

impl WorkflowStore for Store {
    fn start(&self, new: NewExecution) -> Result<StartOutcome, WorkflowError> {
        start(&mut self.conn(), &new)
            .map_err(|e| self.workflow_error("starting a workflow execution", e))
    }

    fn lease(
        &self,
        owner: &str,
        now: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Leased>, WorkflowError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        lease(&mut self.conn(), owner, now, lease_ms, limit)
            .map_err(|e| self.workflow_error("leasing due workflow executions", e))
    }

    fn commit(&self, commits: &[Commit]) -> Result<Vec<bool>, WorkflowError> {
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        commit(&mut self.conn(), commits)
            .map_err(|e| self.workflow_error("committing workflow transitions", e))
    }

    fn release(&self, owner: &str) -> Result<(), WorkflowError> {
        self.conn()
            .prepare_cached(
                "UPDATE workflow_executions SET lease_owner = NULL, lease_until = NULL
                  WHERE lease_owner = ?1",
            )
            .and_then(|mut s| s.execute(params![owner]))
            .map(drop)
            .map_err(|e| self.workflow_error("releasing workflow executions' leases", e))
    }

    fn signal(&self, id: &str, kind: SignalKind, now: i64) -> Result<bool, WorkflowError> {
        let kind = serde_json::to_string(&kind).map_err(|e| {
            WorkflowError(format!(
                "the database {}: queueing a signal for a workflow execution: {e}",
                self.path().display()
            ))
        })?;
        signal(&mut self.conn(), id, &kind, now)
            .map_err(|e| self.workflow_error("queueing a signal for a workflow execution", e))
    }

    fn answer(&self, id: &str, kind: SignalKind, now: i64) -> Result<Answered, WorkflowError> {
        let Some(token) = kind.answers().map(str::to_owned) else {
            return Ok(Answered::NotRunning);
        };
        let kind = serde_json::to_string(&kind).map_err(|e| {
            WorkflowError(format!(
                "the database {}: queueing a callback's answer: {e}",
                self.path().display()
            ))
        })?;
        answer(&mut self.conn(), id, &token, &kind, now)
            .map_err(|e| self.workflow_error("queueing a callback's answer", e))
    }

    fn answered(&self, token: &str) -> Result<bool, WorkflowError> {
        self.conn()
            .prepare_cached("SELECT 1 FROM workflow_answers WHERE token = ?1")
            .and_then(|mut s| s.query_row(params![token], |_| Ok(())).optional())
            .map(|r| r.is_some())
            .map_err(|e| self.workflow_error("reading a callback's answer", e))
    }

    fn get(&self, id: &str) -> Result<Option<ExecutionRow>, WorkflowError> {
        self.conn()
            .prepare_cached(concat!(
                "SELECT ",
                columns!(),
                " FROM workflow_executions WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row(params![id], read_execution).optional())
            .map_err(|e| self.workflow_error("reading a workflow execution", e))
    }

    fn find(&self, workflow: &str, name: &str) -> Result<Option<ExecutionRow>, WorkflowError> {
        self.conn()
            .prepare_cached(concat!(
                "SELECT ",
                columns!(),
                " FROM workflow_executions WHERE workflow = ?1 AND name = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![workflow, name], read_execution)
                    .optional()
            })
            .map_err(|e| self.workflow_error("finding a workflow execution by name", e))
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRow>, WorkflowError> {
        let limit = if filter.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            filter.limit
        };
        // One statement per filter shape, so each can use its index.
        const SELECT: &str = concat!("SELECT ", columns!(), " FROM workflow_executions");
        const ORDER: &str = " ORDER BY started_at DESC, id DESC LIMIT ?3";
        let sql = match (filter.workflow.is_some(), filter.status.is_some()) {
            (false, false) => format!("{SELECT} WHERE ?1 IS NULL AND ?2 IS NULL{ORDER}"),
            (true, false) => format!("{SELECT} WHERE workflow = ?1 AND ?2 IS NULL{ORDER}"),
            (false, true) => format!("{SELECT} WHERE ?1 IS NULL AND status = ?2{ORDER}"),
            (true, true) => format!("{SELECT} WHERE workflow = ?1 AND status = ?2{ORDER}"),
        };
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<ExecutionRow>> {
            let mut s = conn.prepare_cached(&sql)?;
            let rows = s.query_map(
                params![
                    filter.workflow,
                    filter.status.map(Status::as_str),
                    limit_param(limit)
                ],
                read_execution,
            )?;
            rows.collect()
        };
        run().map_err(|e| self.workflow_error("listing workflow executions", e))
    }

    fn history(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<HistoryRow>, WorkflowError> {
        // Event ids are stored as SQLite integers (at most i64::MAX): none is after more.
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let limit = if limit == 0 { -1 } else { limit_param(limit) };
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<HistoryRow>> {
            let mut s = conn.prepare_cached(
                "SELECT id, previous, timestamp_ms, kind, details FROM workflow_history
                  WHERE execution_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let rows = s.query_map(params![id, after, limit], read_history)?;
            rows.collect()
        };
        run().map_err(|e| self.workflow_error("reading a workflow execution's history", e))
    }

    fn prune(&self, before: i64) -> Result<usize, WorkflowError> {
        prune(&mut self.conn(), before)
            .map_err(|e| self.workflow_error("pruning closed workflow executions", e))
    }
}
