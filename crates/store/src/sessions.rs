//! Session revocations: the principals (`provider/subject`) whose browser sessions were
//! revoked (the `revoke_sessions` action, the admin API), with when. The proxy loads them into
//! the identity engine at start and at every reload, so a revocation survives a restart.
//! Times are Unix seconds.
//!
//! ```
//! use portcullis_store::Store;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! store.revoke_sessions("corp/alice", 1_000)?;
//! store.revoke_sessions("corp/alice", 900)?; // an older revocation changes nothing
//! assert_eq!(store.session_revocations()?, vec![("corp/alice".to_string(), 1_000)]);
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
}
