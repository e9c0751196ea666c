//! The store's schema, as an ordered list of migrations, and the code that applies them.
//!
//! The `schema_version` table records each migration applied (its number, name and when).
//! Opening the store runs, in one transaction, every migration numbered above the highest
//! recorded one, so opening a database that is up to date changes nothing, and a crash
//! halfway leaves the database as it was. A database whose highest version is above [`SCHEMA_VERSION`] was
//! written by a newer portcullis and is refused: its tables may mean something this version
//! does not know.
//!
//! To change the schema, append a migration with the next number; never edit one that has
//! shipped.

use rusqlite::{params, Connection, TransactionBehavior};

/// One step of the schema.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order, numbered from 1 without gaps.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "quotas and daily usage",
        sql: "
        -- Each key's use of a plan's quota: one row per (plan, key), for its latest period.
        -- `key` is portcullis_limits::StoredKey::to_bytes; `period_start` is Unix seconds.
        CREATE TABLE quota (
            plan         TEXT    NOT NULL,
            key          BLOB    NOT NULL,
            period_start INTEGER NOT NULL,
            used         INTEGER NOT NULL CHECK (used >= 0),
            PRIMARY KEY (plan, key)
        ) WITHOUT ROWID;

        -- Units used per (plan, key, UTC day), for usage reports. `day` counts days since
        -- 1970-01-01.
        CREATE TABLE usage_daily (
            plan  TEXT    NOT NULL,
            key   BLOB    NOT NULL,
            day   INTEGER NOT NULL,
            count INTEGER NOT NULL CHECK (count >= 0),
            PRIMARY KEY (plan, key, day)
        ) WITHOUT ROWID;
        CREATE INDEX usage_daily_by_day ON usage_daily (day);
    ",
    },
    Migration {
        version: 2,
        name: "event outbox",
        sql: "
        -- Events waiting for delivery by a sink (a webhook), written before the first
        -- attempt and deleted once delivered: see crate::outbox. `seq` orders them as
        -- enqueued; `payload` is the structured-mode CloudEvent (JSON); times are Unix
        -- milliseconds. One row per (sink, event id), so enqueueing an event twice is a no-op.
        CREATE TABLE outbox (
            seq             INTEGER PRIMARY KEY,
            sink            TEXT    NOT NULL,
            event_id        TEXT    NOT NULL,
            payload         TEXT    NOT NULL,
            attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            next_attempt_at INTEGER NOT NULL,
            created_at      INTEGER NOT NULL,
            UNIQUE (sink, event_id)
        );
        CREATE INDEX outbox_due ON outbox (sink, next_attempt_at);
    ",
    },
    Migration {
        version: 3,
        name: "trigger firings",
        sql: "
        -- Claimed trigger firings, one row per idempotency key (`trigger|group|window`), so
        -- a retry, a restart or a second replica never runs one firing twice: see
        -- crate::firings. Times are Unix milliseconds. A row may carry a follow-up that is
        -- due later (a block's end): `due_at` and its JSON `follow_up`, cleared once done.
        CREATE TABLE firings (
            key        TEXT    PRIMARY KEY,
            created_at INTEGER NOT NULL,
            due_at     INTEGER,
            follow_up  TEXT
        ) WITHOUT ROWID;
        CREATE INDEX firings_created ON firings (created_at);
        CREATE INDEX firings_due ON firings (due_at) WHERE due_at IS NOT NULL;
    ",
    },
    Migration {
        version: 4,
        name: "workflow executions",
        sql: "
        -- Durable workflow executions: see crate::workflows and
        -- portcullis_automation::workflow::store. One row per execution; `status` is the
        -- Status's text, `input`, `output` and `state` are JSON text; times are Unix
        -- milliseconds. `wake_at` is when it next has something to do (NULL: a signal only);
        -- `lease_owner` holds it until `lease_until` (both NULL when not leased). Names are
        -- unique per workflow.
        CREATE TABLE workflow_executions (
            id          TEXT    PRIMARY KEY,
            workflow    TEXT    NOT NULL,
            name        TEXT    NOT NULL,
            status      TEXT    NOT NULL CHECK (status IN
                            ('RUNNING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'ABORTED')),
            input       TEXT    NOT NULL,
            output      TEXT,
            error       TEXT,
            cause       TEXT,
            started_at  INTEGER NOT NULL,
            stopped_at  INTEGER,
            started_by  TEXT    NOT NULL,
            parent      TEXT,
            state       TEXT    NOT NULL,
            wake_at     INTEGER,
            history_len INTEGER NOT NULL CHECK (history_len >= 0),
            lease_owner TEXT,
            lease_until INTEGER,
            UNIQUE (workflow, name)
        );
        -- Leasing: the running executions that are due.
        CREATE INDEX workflow_executions_due ON workflow_executions (status, wake_at);
        -- Listing, newest first, of all or one workflow's.
        CREATE INDEX workflow_executions_started ON workflow_executions (started_at, id);
        CREATE INDEX workflow_executions_workflow
            ON workflow_executions (workflow, started_at, id);
        -- Pruning closed executions.
        CREATE INDEX workflow_executions_stopped
            ON workflow_executions (stopped_at) WHERE stopped_at IS NOT NULL;

        -- Each execution's history events, append-only; `details` is JSON text.
        CREATE TABLE workflow_history (
            execution_id TEXT    NOT NULL,
            id           INTEGER NOT NULL,
            previous     INTEGER NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            kind         TEXT    NOT NULL,
            details      TEXT    NOT NULL,
            PRIMARY KEY (execution_id, id)
        );

        -- Signals queued for running executions, in arrival order (`seq`, never reused);
        -- `kind` is the SignalKind as JSON. Deleted when a commit consumes them.
        CREATE TABLE workflow_signals (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            execution_id TEXT    NOT NULL,
            at           INTEGER NOT NULL,
            kind         TEXT    NOT NULL
        );
        CREATE INDEX workflow_signals_execution ON workflow_signals (execution_id, seq);
    ",
    },
    Migration {
        version: 5,
        name: "session revocations",
        sql: "
        -- Principals (`provider/subject`) whose browser sessions were revoked, and when:
        -- sessions issued at or before `revoked_at` do not open.
        CREATE TABLE session_revocations (
            principal  TEXT    PRIMARY KEY,
            revoked_at INTEGER NOT NULL
        );
    ",
    },
    Migration {
        version: 6,
        name: "ended credentials",
        sql: "
        -- Credentials ended by a logout before they expire, so that a copy of them stays
        -- refused across restarts and reloads: a session by its id, a sealed cookie or an
        -- ID token by the SHA-256 of its value, base64url (never the value). `kind` is `sid`,
        -- `cookie` or `id_token/<provider>`; `until` is when it would have expired anyway
        -- (Unix seconds), after which the row is dropped.
        CREATE TABLE ended_credentials (
            kind  TEXT    NOT NULL,
            key   TEXT    NOT NULL,
            until INTEGER NOT NULL,
            PRIMARY KEY (kind, key)
        ) WITHOUT ROWID;
    ",
    },
    Migration {
        version: 7,
        name: "workflow callback answers",
        sql: "
        -- Callback tokens answered (send-success, send-failure), so that a token takes one
        -- answer: the row is inserted in the transaction that queues the answer, and the
        -- token's later answers are refused. Deleted with the execution when it is pruned.
        CREATE TABLE workflow_answers (
            token        TEXT    PRIMARY KEY,
            execution_id TEXT    NOT NULL,
            at           INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX workflow_answers_execution ON workflow_answers (execution_id);
    ",
    },
];

/// The schema version this build writes: the last migration's number.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// What [`migrate`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// At [`SCHEMA_VERSION`], after applying the migrations after `from` (none if equal).
    Current { from: i64 },
    /// The database is at `found`, beyond [`SCHEMA_VERSION`]; nothing was changed.
    TooNew { found: i64 },
}

/// Brings the schema up to [`SCHEMA_VERSION`], in one immediate transaction.
pub(crate) fn migrate(conn: &mut Connection, now_unix_secs: i64) -> rusqlite::Result<Outcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at INTEGER NOT NULL
         )",
    )?;
    let from: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    if from > SCHEMA_VERSION {
        // Dropping `tx` rolls back (there is nothing to roll back: the table existed).
        return Ok(Outcome::TooNew { found: from });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.execute_batch(m.sql)?;
        tx.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, now_unix_secs],
        )?;
    }
    tx.commit()?;
    Ok(Outcome::Current { from })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
    }

    #[test]
    fn migrating_twice_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn, 1).unwrap(), Outcome::Current { from: 0 });
        assert_eq!(
            migrate(&mut conn, 2).unwrap(),
            Outcome::Current {
                from: SCHEMA_VERSION
            }
        );
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, SCHEMA_VERSION);
        let applied_at: i64 = conn
            .query_row(
                "SELECT applied_at FROM schema_version WHERE version = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(applied_at, 1);
    }

    #[test]
    fn a_newer_database_is_left_alone() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, 1).unwrap();
        conn.execute(
            "INSERT INTO schema_version VALUES (?1, 'from the future', 0)",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
        assert_eq!(
            migrate(&mut conn, 2).unwrap(),
            Outcome::TooNew {
                found: SCHEMA_VERSION + 1
            }
        );
    }
}
