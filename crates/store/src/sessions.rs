//! Session revocations: the principals (`provider/subject`) whose browser sessions were
//! revoked (the `revoke_sessions` action, the admin API), with when; and the credentials a
//! logout ended before their expiry (a session, a sealed cookie, an ID token), until then.
//! The proxy loads both into the identity engine at start and at every reload, so a
//! revocation or a logout survives a restart. Times are Unix seconds.
//!
//! ```
//! use portcullis_store::Store;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! store.revoke_sessions("corp/alice", 1_000)?;
//! store.revoke_sessions("corp/alice", 900)?; // an older revocation changes nothing
//! assert_eq!(store.session_revocations()?, vec![("corp/alice".to_string(), 1_000)]);
//!
//! store.end_credential("sid", "s-1", 2_000)?;
//! store.end_credential("cookie", "ab12", 1_500)?;
//! // Only those that have not expired by `now` are read back (and the others dropped).
//! assert_eq!(store.ended_credentials(1_600)?, vec![("sid".into(), "s-1".into(), 2_000)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::{Result, Store};
use rusqlite::params;

impl Store {
    /// Records that `principal`'s sessions issued at or before `at` are revoked.
    pub fn revoke_sessions(&self, principal: &str, at: i64) -> Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO session_revocations (principal, revoked_at) VALUES (?1, ?2)
                 ON CONFLICT (principal) DO UPDATE SET revoked_at = MAX(revoked_at, excluded.revoked_at)",
            )
            .and_then(|mut s| s.execute(params![principal, at]))
            .map_err(|e| self.error("revoking sessions", e))?;
        Ok(())
    }

    /// Every revocation, by principal.
    pub fn session_revocations(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut s = conn
            .prepare_cached(
                "SELECT principal, revoked_at FROM session_revocations ORDER BY principal",
            )
            .map_err(|e| self.error("reading session revocations", e))?;
        let rows = s
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| self.error("reading session revocations", e))?;
        Ok(rows)
    }

    /// Records that the credential `key` of `kind` is refused until `until`.
    pub fn end_credential(&self, kind: &str, key: &str, until: i64) -> Result<()> {
        self.conn()
            .prepare_cached(
                "INSERT INTO ended_credentials (kind, key, until) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, key) DO UPDATE SET until = MAX(until, excluded.until)",
            )
            .and_then(|mut s| s.execute(params![kind, key, until]))
            .map_err(|e| self.error("ending a credential", e))?;
        Ok(())
    }

    /// The credentials still refused at `now`, as (kind, key, until); those that expired
    /// are deleted.
    pub fn ended_credentials(&self, now: i64) -> Result<Vec<(String, String, i64)>> {
        let conn = self.conn();
        conn.prepare_cached("DELETE FROM ended_credentials WHERE until <= ?1")
            .and_then(|mut s| s.execute(params![now]))
            .map_err(|e| self.error("pruning ended credentials", e))?;
        let mut s = conn
            .prepare_cached("SELECT kind, key, until FROM ended_credentials ORDER BY kind, key")
            .map_err(|e| self.error("reading ended credentials", e))?;
        let rows = s
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| self.error("reading ended credentials", e))?;
        Ok(rows)
    }
}
