//! Quotas and daily usage in the store: the rows `portcullis_limits::Quotas::dirty` and
//! `DailyUsage::drain` produce, written in one transaction per sync interval
//! ([`Store::flush`]), read back at start ([`Store::load_quotas`]) and for reports
//! ([`Store::usage`], API Gateway's `GetUsage`).
//!
//! Keys are opaque bytes here: `portcullis_limits::StoredKey::to_bytes`, which keeps apart a
//! literal key and the SHA-256 prefix of a long one. Counts are `u64` in Rust and SQLite's
//! signed 64-bit integers on disk, saturating at `i64::MAX` (9.2·10^18, more than any real
//! count).

use crate::{Result, Store};
use portcullis_limits::quota::day_string;
use portcullis_limits::StoredKey;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, TransactionBehavior};

/// `(key, period_start, used)`: a key's use of a quota in the period starting at
/// `period_start` (Unix seconds).
pub type QuotaRow = (Vec<u8>, i64, u64);
/// `(key, day, delta)`: units to add to a key's count for a UTC day (days since 1970-01-01).
pub type UsageDelta = (Vec<u8>, i64, u64);

/// What [`Store::usage`] reads: days `from_day..=to_day`, of one plan or all, of one key or
/// all.
#[derive(Clone, Copy, Debug, Default)]
pub struct UsageQuery<'a> {
    pub plan: Option<&'a str>,
    pub key: Option<&'a [u8]>,
    pub from_day: i64,
    pub to_day: i64,
}

/// One key's use of one plan on one UTC day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub plan: String,
    pub key: Vec<u8>,
    pub day: i64,
    pub count: u64,
}

impl UsageRow {
    /// The key as the limits crate knows it (and shows it); `None` if the bytes are not a
    /// stored key.
    pub fn stored_key(&self) -> Option<StoredKey> {
        StoredKey::from_bytes(&self.key)
    }

    /// The day as `YYYY-MM-DD`.
    pub fn day_string(&self) -> String {
        day_string(self.day)
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Upserts quota rows: a row for an earlier period than the stored one never replaces it, and
/// in the same period the larger count stays.
fn put_quotas(conn: &Connection, plan: &str, rows: &[QuotaRow]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO quota (plan, key, period_start, used) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (plan, key) DO UPDATE
            SET period_start = excluded.period_start, used = excluded.used
          WHERE excluded.period_start > quota.period_start
             OR (excluded.period_start = quota.period_start AND excluded.used > quota.used)",
    )?;
    for (key, period_start, used) in rows {
        stmt.execute(params![plan, key, period_start, to_i64(*used)])?;
    }
    Ok(())
}

/// Adds usage deltas, saturating at `i64::MAX`.
fn add_usage(conn: &Connection, plan: &str, rows: &[UsageDelta]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO usage_daily (plan, key, day, count) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (plan, key, day) DO UPDATE
            SET count = CASE WHEN usage_daily.count > 9223372036854775807 - excluded.count
                             THEN 9223372036854775807
                             ELSE usage_daily.count + excluded.count END",
    )?;
    for (key, day, delta) in rows {
        if *delta > 0 {
            stmt.execute(params![plan, key, day, to_i64(*delta)])?;
        }
    }
    Ok(())
}

impl Store {
    /// Saves quota rows for `plan` (see [`QuotaRow`]), in one transaction.
    pub fn save_quotas(&self, plan: &str, rows: &[QuotaRow]) -> Result<()> {
        self.flush(&[(plan, rows)], &[])
    }

    /// The quota rows of `plan` for periods starting at or after `since_period_start`: pass
    /// the current period's start, and feed each row to `Quotas::load`.
    pub fn load_quotas(&self, plan: &str, since_period_start: i64) -> Result<Vec<QuotaRow>> {
        let what = "loading quotas";
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT key, period_start, used FROM quota
                  WHERE plan = ?1 AND period_start >= ?2 ORDER BY key",
            )
            .map_err(|e| self.error(what, e))?;
        let rows = stmt
            .query_map(params![plan, since_period_start], |r| {
                Ok((r.get(0)?, r.get(1)?, to_u64(r.get(2)?)))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(what, e));
        rows
    }

    /// Adds daily usage deltas for `plan` (see [`UsageDelta`]), in one transaction.
    pub fn add_usage(&self, plan: &str, rows: &[UsageDelta]) -> Result<()> {
        self.flush(&[], &[(plan, rows)])
    }

    /// Writes quota rows and usage deltas of any number of plans in ONE transaction: all of
    /// it is on disk when this returns, or none of it is. What the proxy's flusher calls
    /// every sync interval (on a blocking thread).
    pub fn flush(
        &self,
        quotas: &[(&str, &[QuotaRow])],
        usage: &[(&str, &[UsageDelta])],
    ) -> Result<()> {
        let what = "saving quotas and usage";
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error(what, e))?;
        for (plan, rows) in quotas {
            put_quotas(&tx, plan, rows).map_err(|e| self.error(what, e))?;
        }
        for (plan, rows) in usage {
            add_usage(&tx, plan, rows).map_err(|e| self.error(what, e))?;
        }
        tx.commit().map_err(|e| self.error(what, e))
    }

    /// Daily usage matching `q`, ordered by plan, key and day.
    pub fn usage(&self, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>> {
        let what = "reading usage";
        let mut sql = String::from(
            "SELECT plan, key, day, count FROM usage_daily WHERE day >= ? AND day <= ?",
        );
        let mut args = vec![Value::Integer(q.from_day), Value::Integer(q.to_day)];
        if let Some(plan) = q.plan {
            sql.push_str(" AND plan = ?");
            args.push(Value::Text(plan.to_string()));
        }
        if let Some(key) = q.key {
            sql.push_str(" AND key = ?");
            args.push(Value::Blob(key.to_vec()));
        }
        sql.push_str(" ORDER BY plan, key, day");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.error(what, e))?;
        let rows = stmt
            .query_map(params_from_iter(args), |r| {
                Ok(UsageRow {
                    plan: r.get(0)?,
                    key: r.get(1)?,
                    day: r.get(2)?,
                    count: to_u64(r.get(3)?),
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| self.error(what, e));
        rows
    }

    /// Deletes daily usage before `day` (retention); returns how many rows went.
    pub fn delete_usage_before(&self, day: i64) -> Result<usize> {
        self.conn()
            .execute("DELETE FROM usage_daily WHERE day < ?1", [day])
            .map_err(|e| self.error("deleting old usage", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Vec<u8> {
        StoredKey::of(&portcullis_limits::Key::from(s)).to_bytes()
    }

    #[test]
    fn quotas_survive_a_reopen_and_never_go_back_a_period() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let (a, b) = (key("alice"), key("bob"));
        store
            .save_quotas("gold", &[(a.clone(), 100, 7), (b.clone(), 100, 3)])
            .unwrap();
        store.save_quotas("silver", &[(a.clone(), 100, 1)]).unwrap();
        // Same period: the larger count stays. A later period replaces. An earlier one never
        // does.
        store
            .save_quotas("gold", &[(a.clone(), 100, 5), (b.clone(), 200, 2)])
            .unwrap();
        store.save_quotas("gold", &[(b.clone(), 100, 50)]).unwrap();
        drop(store);

        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(
            store.load_quotas("gold", 0).unwrap(),
            vec![(a.clone(), 100, 7), (b.clone(), 200, 2)]
        );
        assert_eq!(store.load_quotas("gold", 150).unwrap(), vec![(b, 200, 2)]);
        assert_eq!(store.load_quotas("silver", 0).unwrap(), vec![(a, 100, 1)]);
        assert!(store.load_quotas("bronze", 0).unwrap().is_empty());
    }

    #[test]
    fn counts_saturate_instead_of_failing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let a = key("a");
        store.save_quotas("p", &[(a.clone(), 1, u64::MAX)]).unwrap();
        assert_eq!(store.load_quotas("p", 0).unwrap()[0].2, i64::MAX as u64);
        store.add_usage("p", &[(a.clone(), 1, u64::MAX)]).unwrap();
        store.add_usage("p", &[(a.clone(), 1, 5)]).unwrap();
        let rows = store
            .usage(&UsageQuery {
                from_day: 0,
                to_day: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows[0].count, i64::MAX as u64);
    }

    #[test]
    fn usage_adds_up_and_the_query_filters() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let (a, b) = (key("alice"), key("bob"));
        let d = portcullis_limits::quota::parse_day("2026-12-06").unwrap();
        store
            .add_usage(
                "gold",
                &[(a.clone(), d, 2), (a.clone(), d + 1, 1), (b.clone(), d, 9)],
            )
            .unwrap();
        store
            .flush(
                &[],
                &[
                    ("gold", &[(a.clone(), d, 3), (b.clone(), d, 0)]),
                    ("silver", &[(a.clone(), d, 4)]),
                ],
            )
            .unwrap();
        let row = |plan: &str, k: &[u8], day: i64, count: u64| UsageRow {
            plan: plan.into(),
            key: k.to_vec(),
            day,
            count,
        };
        let all = |plan, key, from_day, to_day| {
            store
                .usage(&UsageQuery {
                    plan,
                    key,
                    from_day,
                    to_day,
                })
                .unwrap()
        };
        assert_eq!(
            all(None, None, d, d + 1),
            vec![
                row("gold", &a, d, 5),
                row("gold", &a, d + 1, 1),
                row("gold", &b, d, 9),
                row("silver", &a, d, 4),
            ]
        );
        assert_eq!(
            all(Some("gold"), Some(&a), d, d + 30),
            vec![row("gold", &a, d, 5), row("gold", &a, d + 1, 1)]
        );
        assert_eq!(
            all(None, Some(&a), d + 1, d + 1),
            vec![row("gold", &a, d + 1, 1)]
        );
        assert_eq!(all(Some("silver"), Some(&b), 0, i64::MAX), vec![]);
        assert_eq!(all(None, None, d + 2, d + 9), vec![]);
        let r = &all(Some("silver"), None, d, d)[0];
        assert_eq!(r.day_string(), "2026-12-06");
        assert_eq!(r.stored_key().unwrap().to_string(), "alice");

        assert_eq!(store.delete_usage_before(d + 1).unwrap(), 3);
        assert_eq!(
            all(None, None, 0, i64::MAX),
            vec![row("gold", &a, d + 1, 1)]
        );
    }

    #[test]
    fn a_failed_flush_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        // Break the second statement: the usage table is gone.
        store
            .conn()
            .execute_batch("ALTER TABLE usage_daily RENAME TO broken")
            .unwrap();
        let err = store
            .flush(
                &[("gold", &[(key("a"), 1, 1)])],
                &[("gold", &[(key("a"), 1, 1)])],
            )
            .unwrap_err();
        assert!(err.to_string().contains("saving quotas and usage"), "{err}");
        assert!(store.load_quotas("gold", 0).unwrap().is_empty());
    }

    #[test]
    fn the_limits_hooks_round_trip_through_the_store() {
        use portcullis_limits::quota::{Per, QuotaSpec, Quotas, ResetAt};
        use portcullis_limits::Key;

        let tmp = tempfile::tempdir().unwrap();
        let spec = QuotaSpec::new(10, Per::Day, ResetAt::MIDNIGHT).unwrap();
        let now = 1_796_558_400 * 1_000_000_000; // 2026-12-06 12:00 UTC
        let long = Key::new(&[b'k'; 300]);
        {
            let store = Store::open(tmp.path()).unwrap();
            let plan = Quotas::new(spec, 100);
            assert!(plan.check(&long, now, 6).allowed);
            assert!(plan.check(&Key::from("alice"), now, 2).allowed);
            let q: Vec<QuotaRow> = plan
                .dirty()
                .into_iter()
                .map(|(k, p, u)| (k.to_bytes(), p, u))
                .collect();
            let u: Vec<UsageDelta> = plan
                .drain_daily()
                .into_iter()
                .map(|(k, d, n)| (k.to_bytes(), d, n))
                .collect();
            store.flush(&[("gold", &q)], &[("gold", &u)]).unwrap();
        }
        // "Restart": a new store, a new plan, loaded from the file.
        let store = Store::open(tmp.path()).unwrap();
        let plan = Quotas::new(spec, 100);
        let (start, _) = spec.period(now / 1_000_000_000);
        for (k, p, u) in store.load_quotas("gold", start).unwrap() {
            assert!(plan.load(&StoredKey::from_bytes(&k).unwrap(), p, u));
        }
        assert_eq!(plan.check(&long, now, 1).used, 7);
        assert!(!plan.check(&Key::from("alice"), now, 9).allowed);
        let day = portcullis_limits::quota::day_of(now);
        let rows = store
            .usage(&UsageQuery {
                plan: Some("gold"),
                key: None,
                from_day: day,
                to_day: day,
            })
            .unwrap();
        let shown: Vec<String> = rows
            .iter()
            .map(|r| format!("{}={}", r.stored_key().unwrap(), r.count))
            .collect();
        assert_eq!(shown.len(), 2);
        assert!(shown.contains(&"alice=2".to_string()), "{shown:?}");
        assert!(shown.contains(&format!("{long}=6")), "{shown:?}");
    }
}
