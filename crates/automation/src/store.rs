//! Exactly-once firings: the caller claims a firing's idempotency key in a [`FiringStore`]
//! before running its actions, and runs them only if the claim is new. The embedded SQLite
//! store (or PostgreSQL for a fleet) implements the trait outside this crate; the
//! [`MemoryFiringStore`] here serves tests and single-process setups without persistence.
//!
//! Claim first, then act: a crash between the two leaves the firing claimed and not (fully)
//! run, so a firing runs at most once, and the audit record of the claim shows which one to
//! look at. Keys embed their window's start (`trigger|group|window_start`), so a store may
//! forget keys older than its longest trigger window plus cooldown.

use crate::Error;
use std::collections::HashSet;
use std::sync::Mutex;

/// Where claimed idempotency keys are kept. Implementations must make `claim` atomic across
/// every process that shares the store (a unique key and `INSERT ... ON CONFLICT DO NOTHING`).
pub trait FiringStore {
    /// Claims `key`: `Ok(true)` the first time it is claimed, `Ok(false)` ever after (another
    /// process, a retry or a restart already ran the firing). On `Err`, act as if it were
    /// `false`: never run a firing that could not be claimed.
    fn claim(&self, key: &str) -> Result<bool, Error>;
}

/// Claimed keys in memory, without bound: for tests and single-process use.
#[derive(Debug, Default)]
pub struct MemoryFiringStore {
    keys: Mutex<HashSet<String>>,
}

impl MemoryFiringStore {
    pub fn new() -> MemoryFiringStore {
        MemoryFiringStore::default()
    }

    /// How many keys have been claimed.
    pub fn len(&self) -> usize {
        self.keys.lock().map_or(0, |k| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FiringStore for MemoryFiringStore {
    fn claim(&self, key: &str) -> Result<bool, Error> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| Error::Store("the in-memory firing store's lock is poisoned".into()))?;
        Ok(keys.insert(key.to_string()))
    }
}

impl<S: FiringStore + ?Sized> FiringStore for &S {
    fn claim(&self, key: &str) -> Result<bool, Error> {
        (**self).claim(key)
    }
}

impl<S: FiringStore + ?Sized> FiringStore for std::sync::Arc<S> {
    fn claim(&self, key: &str) -> Result<bool, Error> {
        (**self).claim(key)
    }
}
