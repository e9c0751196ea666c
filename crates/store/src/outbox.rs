//! The durable event outbox: events a sink (an event webhook) must deliver, written here
//! before the first delivery attempt and deleted once the receiver took them, so events
//! pending at a crash or a restart are delivered afterwards (at least once; the event id is
//! the receiver's dedup key).
//!
//! Rows belong to a sink, by name. A delivery loop [leases](Store::outbox_lease) the rows
//! that are due (which pushes their `next_attempt_at` past the lease, so a crash during
//! delivery makes them due again), then [acks](Store::outbox_ack) the delivered ones and
//! [reschedules](Store::outbox_reschedule) the others. At start, [`Store::outbox_release`]
//! makes every row of a sink due at once. Each sink's rows are capped: [`Store::outbox_enqueue`]
//! evicts the oldest beyond `max_rows` and says how many.
//!
//! Times are Unix milliseconds, given by the caller (so tests control them). Every call is
//! one transaction and blocking: from async code, call it on `spawn_blocking`.
//!
//! ```
//! use portcullis_store::Store;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let put = store.outbox_enqueue("hooks", &[("ev-1", "{}"), ("ev-2", "{}")], 1_000, 100)?;
//! assert_eq!((put.inserted, put.evicted), (2, 0));
//! let rows = store.outbox_lease("hooks", 1_000, 31_000, 10)?;
//! assert_eq!(rows.len(), 2);
//! store.outbox_ack("hooks", &[rows[0].seq])?;
//! store.outbox_reschedule("hooks", &[(rows[1].seq, 1, 2_000)])?;
//! assert_eq!(store.outbox_count("hooks")?, 1);
//! assert_eq!(store.outbox_next_due("hooks")?, Some(2_000));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::{Result, Store};
use rusqlite::{params, TransactionBehavior};

/// One event waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its place in the sink's order of enqueueing (and its handle for ack and reschedule).
    pub seq: i64,
    /// The event's id (unique per sink).
    pub event_id: String,
    /// What was enqueued: the structured-mode CloudEvent.
    pub payload: String,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When it was enqueued (Unix milliseconds).
    pub created_at: i64,
}

/// What [`Store::outbox_enqueue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// New rows (an event id already in the sink's outbox is not added again).
    pub inserted: usize,
    /// The oldest rows deleted to keep the sink at `max_rows`.
    pub evicted: u64,
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// Adds events `(event_id, payload)` to `sink`'s outbox, due at once (`now`), in one
    /// transaction; then, if the sink holds more than `max_rows`, deletes its oldest rows.
    pub fn outbox_enqueue(
        &self,
        sink: &str,
        events: &[(&str, &str)],
        now: i64,
        max_rows: usize,
    ) -> Result<Enqueued> {
        let what = "enqueueing events in the outbox";
        let mut conn = self.conn();
        let mut run = || -> rusqlite::Result<Enqueued> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut inserted = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO outbox
                        (sink, event_id, payload, attempts, next_attempt_at, created_at)
                     VALUES (?1, ?2, ?3, 0, ?4, ?4)",
                )?;
                for (id, payload) in events {
                    inserted += stmt.execute(params![sink, id, payload, now])?;
                }
            }
            let count: i64 =
                tx.query_row("SELECT COUNT(*) FROM outbox WHERE sink = ?1", [sink], |r| {
                    r.get(0)
                })?;
            let excess = count - to_i64(max_rows);
            let evicted = if excess > 0 {
                tx.execute(
                    "DELETE FROM outbox WHERE seq IN
                        (SELECT seq FROM outbox WHERE sink = ?1 ORDER BY seq LIMIT ?2)",
                    params![sink, excess],
                )? as u64
            } else {
                0
            };
            tx.commit()?;
            Ok(Enqueued { inserted, evicted })
        };
        run().map_err(|e| self.error(what, e))
    }

    /// Takes up to `limit` of `sink`'s rows that are due at `now`, oldest first, and leases
    /// them until `lease_until`: they are not due again before then unless acked or
    /// rescheduled sooner.
    pub fn outbox_lease(
        &self,
        sink: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>> {
        let what = "leasing due events from the outbox";
        let mut conn = self.conn();
        let mut run = || -> rusqlite::Result<Vec<OutboxRow>> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut rows = {
                let mut stmt = tx.prepare_cached(
                    "UPDATE outbox SET next_attempt_at = ?3
                      WHERE seq IN (SELECT seq FROM outbox
                                     WHERE sink = ?1 AND next_attempt_at <= ?2
                                     ORDER BY seq LIMIT ?4)
                      RETURNING seq, event_id, payload, attempts, created_at",
                )?;
                let rows = stmt
                    .query_map(params![sink, now, lease_until, to_i64(limit)], |r| {
                        Ok(OutboxRow {
                            seq: r.get(0)?,
                            event_id: r.get(1)?,
                            payload: r.get(2)?,
                            attempts: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
                            created_at: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            tx.commit()?;
            rows.sort_by_key(|r| r.seq);
            Ok(rows)
        };
        run().map_err(|e| self.error(what, e))
    }

    /// Deletes rows of `sink` (delivered, or given up on); returns how many existed.
    pub fn outbox_ack(&self, sink: &str, seqs: &[i64]) -> Result<usize> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let what = "deleting delivered events from the outbox";
        let mut conn = self.conn();
        let mut run = || -> rusqlite::Result<usize> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut deleted = 0;
            {
                let mut stmt =
                    tx.prepare_cached("DELETE FROM outbox WHERE sink = ?1 AND seq = ?2")?;
                for seq in seqs {
                    deleted += stmt.execute(params![sink, seq])?;
                }
            }
            tx.commit()?;
            Ok(deleted)
        };
        run().map_err(|e| self.error(what, e))
    }

    /// Sets `(seq, attempts, next_attempt_at)` on rows of `sink`, in one transaction.
    pub fn outbox_reschedule(&self, sink: &str, rows: &[(i64, u32, i64)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let what = "rescheduling events in the outbox";
        let mut conn = self.conn();
        let mut run = || -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE outbox SET attempts = ?3, next_attempt_at = ?4
                      WHERE sink = ?1 AND seq = ?2",
                )?;
                for (seq, attempts, next) in rows {
                    stmt.execute(params![sink, seq, i64::from(*attempts), next])?;
                }
            }
            tx.commit()
        };
        run().map_err(|e| self.error(what, e))
    }

    /// Makes every row of `sink` due at `now` (at start: a restart is a fresh chance, and
    /// leases of a crashed process end). Returns how many rows the sink holds.
    pub fn outbox_release(&self, sink: &str, now: i64) -> Result<usize> {
        self.conn()
            .execute(
                "UPDATE outbox SET next_attempt_at = ?2 WHERE sink = ?1",
                params![sink, now],
            )
            .map_err(|e| self.error("releasing the outbox", e))
    }

    /// How many events `sink` has waiting.
    pub fn outbox_count(&self, sink: &str) -> Result<u64> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM outbox WHERE sink = ?1", [sink], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| self.error("counting the outbox", e))
    }

    /// When `sink`'s next row is due (Unix milliseconds), or `None` if it has none.
    pub fn outbox_next_due(&self, sink: &str) -> Result<Option<i64>> {
        self.conn()
            .query_row(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE sink = ?1",
                [sink],
                |r| r.get(0),
            )
            .map_err(|e| self.error("reading the outbox", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        (tmp, store)
    }

    fn ids(rows: &[OutboxRow]) -> Vec<&str> {
        rows.iter().map(|r| r.event_id.as_str()).collect()
    }

    #[test]
    fn enqueue_is_idempotent_per_sink_and_event_id() {
        let (_tmp, s) = store();
        let put = s
            .outbox_enqueue("a", &[("e1", "p1"), ("e1", "p1")], 5, 10)
            .unwrap();
        assert_eq!(put.inserted, 1);
        let put = s.outbox_enqueue("a", &[("e1", "other")], 6, 10).unwrap();
        assert_eq!(put.inserted, 0);
        // The same event for another sink is another row.
        assert_eq!(
            s.outbox_enqueue("b", &[("e1", "p1")], 5, 10)
                .unwrap()
                .inserted,
            1
        );
        assert_eq!(
            (s.outbox_count("a").unwrap(), s.outbox_count("b").unwrap()),
            (1, 1)
        );
        let rows = s.outbox_lease("a", 5, 100, 10).unwrap();
        assert_eq!(rows[0].payload, "p1");
        assert_eq!((rows[0].attempts, rows[0].created_at), (0, 5));
    }

    #[test]
    fn a_full_sink_evicts_its_oldest_rows_only() {
        let (_tmp, s) = store();
        s.outbox_enqueue("other", &[("x", "")], 0, 10).unwrap();
        let first: Vec<_> = (0..5).map(|i| format!("e{i}")).collect();
        let rows: Vec<_> = first.iter().map(|id| (id.as_str(), "")).collect();
        assert_eq!(s.outbox_enqueue("a", &rows, 0, 3).unwrap().evicted, 2);
        let put = s.outbox_enqueue("a", &[("e5", "")], 1, 3).unwrap();
        assert_eq!(
            put,
            Enqueued {
                inserted: 1,
                evicted: 1
            }
        );
        let left = s.outbox_lease("a", 10, 20, 10).unwrap();
        assert_eq!(ids(&left), ["e3", "e4", "e5"]);
        assert_eq!(s.outbox_count("other").unwrap(), 1);
    }

    #[test]
    fn a_lease_hides_rows_until_it_ends_and_release_ends_it() {
        let (_tmp, s) = store();
        s.outbox_enqueue("a", &[("e1", ""), ("e2", ""), ("e3", "")], 100, 10)
            .unwrap();
        assert!(
            s.outbox_lease("a", 99, 1_000, 10).unwrap().is_empty(),
            "not due yet"
        );
        let leased = s.outbox_lease("a", 100, 1_000, 2).unwrap();
        assert_eq!(ids(&leased), ["e1", "e2"]);
        assert_eq!(ids(&s.outbox_lease("a", 500, 1_000, 10).unwrap()), ["e3"]);
        assert!(s.outbox_lease("a", 999, 2_000, 10).unwrap().is_empty());
        assert_eq!(s.outbox_next_due("a").unwrap(), Some(1_000));
        // The lease ends: due again, as after a crash mid-delivery.
        assert_eq!(s.outbox_lease("a", 1_000, 2_000, 10).unwrap().len(), 3);
        // A restart releases everything at once.
        assert_eq!(s.outbox_release("a", 1_500).unwrap(), 3);
        assert_eq!(s.outbox_lease("a", 1_500, 2_000, 10).unwrap().len(), 3);
        assert_eq!(s.outbox_next_due("b").unwrap(), None);
    }

    #[test]
    fn ack_deletes_and_reschedule_counts_attempts() {
        let (_tmp, s) = store();
        s.outbox_enqueue("a", &[("e1", ""), ("e2", "")], 0, 10)
            .unwrap();
        let rows = s.outbox_lease("a", 0, 100, 10).unwrap();
        assert_eq!(s.outbox_ack("a", &[rows[0].seq]).unwrap(), 1);
        assert_eq!(
            s.outbox_ack("b", &[rows[1].seq]).unwrap(),
            0,
            "another sink's row"
        );
        s.outbox_reschedule("a", &[(rows[1].seq, 3, 50)]).unwrap();
        assert!(s.outbox_lease("a", 49, 100, 10).unwrap().is_empty());
        let again = s.outbox_lease("a", 50, 100, 10).unwrap();
        assert_eq!((again[0].event_id.as_str(), again[0].attempts), ("e2", 3));
        assert_eq!(s.outbox_count("a").unwrap(), 1);
    }

    #[test]
    fn the_outbox_survives_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        s.outbox_enqueue("a", &[("e1", "{\"id\":\"e1\"}")], 7, 10)
            .unwrap();
        drop(s);
        let s = Store::open(tmp.path()).unwrap();
        let rows = s.outbox_lease("a", 7, 8, 10).unwrap();
        assert_eq!(rows[0].payload, "{\"id\":\"e1\"}");
    }
}
