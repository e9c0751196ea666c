//! Trigger firings, exactly once: the automation claims a firing's idempotency key
//! (`trigger|group|window_start`) here before it runs the firing's actions, and runs them only
//! if the claim is new. The claim is one `INSERT … ON CONFLICT DO NOTHING` on the key, so it is
//! atomic across every process that shares the file (a second replica on the same state
//! directory, or the same process after a restart).
//!
//! A claimed row may carry a **follow-up**: something to do later on behalf of the firing (the
//! end of a `block`), with the time it is due. [`Store::firing_follow_ups`] lists those still
//! pending, so a restart does not forget them, and [`Store::firing_follow_up_done`] clears one.
//!
//! Keys embed their window's start, so a key older than the longest trigger window plus its
//! cooldown can never be claimed again: [`Store::firing_prune`] forgets them (never a row whose
//! follow-up is pending).
//!
//! Times are Unix milliseconds, given by the caller. Every call is one statement or one
//! transaction, and blocking: from async code, call it on `spawn_blocking`.
//!
//! ```
//! use portcullis_store::Store;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! assert!(store.firing_claim("failover|billing|1000", 1_000)?);   // run it
//! assert!(!store.firing_claim("failover|billing|1000", 2_000)?);  // a retry does not
//! store.firing_follow_up("block|10.0.0.1|5000#0", 5_000, 65_000, r#"{"table":"per_ip"}"#)?;
//! assert_eq!(store.firing_follow_ups()?.len(), 1);
//! store.firing_follow_up_done("block|10.0.0.1|5000#0")?;
//! assert!(store.firing_follow_ups()?.is_empty());
//! assert_eq!(store.firing_prune(70_000)?, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::{Result, Store};
use rusqlite::params;

/// A follow-up still to be done: its row's key, when it is due and what it is (the caller's
/// JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowUp {
    pub key: String,
    pub due_at: i64,
    pub follow_up: String,
}

impl Store {
    /// Claims `key` at `now`: `true` the first time, `false` ever after (until pruned).
    pub fn firing_claim(&self, key: &str, now: i64) -> Result<bool> {
        let n = self
            .conn()
            .prepare_cached(
                "INSERT INTO firings (key, created_at) VALUES (?1, ?2)
                 ON CONFLICT (key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, now]))
            .map_err(|e| self.error("claiming a trigger firing", e))?;
        Ok(n == 1)
    }

    /// Records a follow-up under its own `key` (claimed at `now`), due at `due_at`. A key that
    /// exists already is left as it is; `false` then.
    pub fn firing_follow_up(
        &self,
        key: &str,
        now: i64,
        due_at: i64,
        follow_up: &str,
    ) -> Result<bool> {
        let n = self
            .conn()
            .prepare_cached(
                "INSERT INTO firings (key, created_at, due_at, follow_up) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, now, due_at, follow_up]))
            .map_err(|e| self.error("recording a firing's follow-up", e))?;
        Ok(n == 1)
    }

    /// Every follow-up not yet done, the soonest first.
    pub fn firing_follow_ups(&self) -> Result<Vec<FollowUp>> {
        let conn = self.conn();
        let run = || -> rusqlite::Result<Vec<FollowUp>> {
            let mut s = conn.prepare_cached(
                "SELECT key, due_at, follow_up FROM firings
                 WHERE due_at IS NOT NULL ORDER BY due_at, key",
            )?;
            let rows = s.query_map([], |r| {
                Ok(FollowUp {
                    key: r.get(0)?,
                    due_at: r.get(1)?,
                    follow_up: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.error("listing firings' follow-ups", e))
    }

    /// Marks the follow-up under `key` done (its row stays, as a claim, until pruned).
    pub fn firing_follow_up_done(&self, key: &str) -> Result<()> {
        self.conn()
            .prepare_cached("UPDATE firings SET due_at = NULL, follow_up = NULL WHERE key = ?1")
            .and_then(|mut s| s.execute(params![key]))
            .map_err(|e| self.error("finishing a firing's follow-up", e))?;
        Ok(())
    }

    /// Forgets the claims made before `before` whose follow-up (if any) is done; returns how
    /// many.
    pub fn firing_prune(&self, before: i64) -> Result<u64> {
        let n = self
            .conn()
            .prepare_cached("DELETE FROM firings WHERE created_at < ?1 AND due_at IS NULL")
            .and_then(|mut s| s.execute(params![before]))
            .map_err(|e| self.error("pruning old trigger firings", e))?;
        Ok(n as u64)
    }

    /// How many claims (and follow-ups) the store holds.
    pub fn firing_count(&self) -> Result<u64> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM firings", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.error("counting trigger firings", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_claimed_once_across_handles_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        let b = Store::open(dir.path()).unwrap();
        assert!(a.firing_claim("t|g|1", 1).unwrap());
        assert!(!b.firing_claim("t|g|1", 2).unwrap());
        assert!(b.firing_claim("t|g|2", 2).unwrap());
        drop((a, b));
        let c = Store::open(dir.path()).unwrap();
        assert!(!c.firing_claim("t|g|1", 3).unwrap());
        assert_eq!(c.firing_count().unwrap(), 2);
    }

    #[test]
    fn pruning_keeps_recent_claims_and_pending_follow_ups() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.firing_claim("old", 10).unwrap());
        assert!(s.firing_claim("new", 100).unwrap());
        assert!(s.firing_follow_up("old#0", 10, 500, "{}").unwrap());
        assert!(!s.firing_follow_up("old#0", 11, 600, "{}").unwrap());
        assert_eq!(s.firing_prune(50).unwrap(), 1);
        let pending = s.firing_follow_ups().unwrap();
        assert_eq!(
            pending,
            vec![FollowUp {
                key: "old#0".into(),
                due_at: 500,
                follow_up: "{}".into()
            }]
        );
        s.firing_follow_up_done("old#0").unwrap();
        assert!(s.firing_follow_ups().unwrap().is_empty());
        // Done, it is still a claim until pruned.
        assert!(!s.firing_claim("old#0", 20).unwrap());
        assert_eq!(s.firing_prune(50).unwrap(), 1);
        assert!(!s.firing_claim("new", 200).unwrap());
    }
}
