//! Long-lived per-server state that outlives config snapshots: health, passive ejection,
//! admin overrides (state and weight), in-flight counters, the max-connections gate and the
//! connection pool. It is keyed by `backend-id/server-name`, so a reload keeps it for every
//! server that still exists.
//!
//! A [`Watcher`] set on the registry hears each change of a server's health and ejection
//! (the events module turns them into events): a health check's verdict (`health`), an
//! ejection ([`ServerState::eject`]) and its end, announced by a timer the ejection starts,
//! or by the next ejection if that comes first. Without a watcher nothing is scheduled.

use crate::upstream::pool::Pool;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The operator's intent for a server, with HAProxy's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes traffic.
    Ready,
    /// Takes no new traffic except requests stuck to it by cookie; health checks continue.
    Drain,
    /// Takes no traffic at all; health checks stop.
    Maint,
}

impl AdminState {
    fn to_u32(self) -> u32 {
        match self {
            AdminState::Ready => 0,
            AdminState::Drain => 1,
            AdminState::Maint => 2,
        }
    }
    fn from_u32(v: u32) -> Self {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

/// A change of a server that a [`Watcher`] hears about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Active health checks pass again.
    Up,
    /// Active health checks fail.
    Down,
    /// Outlier detection took it out for this long.
    Ejected(Duration),
    /// Its ejection ended.
    Restored,
}

/// Hears each [`Change`] of every server of a registry, with the reason in words. Called on
/// the task that made the change: it must not block.
pub type Watcher = Arc<dyn Fn(&ServerState, Change, &str) + Send + Sync>;

/// The registry's watcher, shared with each of its servers; set at most once.
type WatchSlot = Arc<OnceLock<Watcher>>;

/// The last active health check of a server: when, whether it passed, and why not.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub at: std::time::SystemTime,
    pub ok: bool,
    /// Why it failed, in words (`connection refused`, `status 503`); empty when it passed.
    pub detail: String,
}

/// Process-wide monotonic origin so instants fit in an atomic.
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub struct ServerState {
    pub key: String,
    pub address: String,
    /// Result of active health checks; true when no check is configured.
    healthy: AtomicBool,
    /// Consecutive check results in the current direction, for rise/fall.
    pub check_streak: AtomicU32,
    admin: AtomicU32,
    /// Weight set through the admin API; 0 means "use the config weight".
    weight_override: AtomicU32,
    /// Requests currently being handled by this server (including response streaming).
    pub active: AtomicUsize,
    /// Requests waiting for a slot under `max_connections`.
    pub queued: AtomicUsize,
    pub total: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_connect: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// Failed exchanges (a 5xx answer or no connection), for the console.
    errors: AtomicU64,
    /// When health checks last took the server down (`now_ms`; 0 while up), and the
    /// downtime of its earlier outages.
    down_since_ms: AtomicU64,
    downtime_ms: AtomicU64,
    last_check: Mutex<Option<CheckResult>>,
    /// With a watcher: the `ejected_until_ms` of the ejection whose end is not announced
    /// yet (0: none). Whoever swaps it out announces `Restored`, so it is announced once.
    restore_due: AtomicU64,
    watch: WatchSlot,
    /// This state itself, for the timer that announces the end of an ejection.
    me: Weak<ServerState>,
    /// The `max_connections` gate, for the server's whole life.
    pub gate: Arc<Gate>,
    pub pool: Arc<Pool>,
}

impl ServerState {
    #[cfg(test)]
    fn new(key: String, address: String) -> Self {
        Self::watched(key, address, WatchSlot::default(), Weak::new())
    }

    fn watched(key: String, address: String, watch: WatchSlot, me: Weak<ServerState>) -> Self {
        ServerState {
            key,
            address,
            healthy: AtomicBool::new(true),
            check_streak: AtomicU32::new(0),
            admin: AtomicU32::new(0),
            weight_override: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_connect: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            errors: AtomicU64::new(0),
            down_since_ms: AtomicU64::new(0),
            downtime_ms: AtomicU64::new(0),
            last_check: Mutex::new(None),
            restore_due: AtomicU64::new(0),
            watch,
            me,
            gate: Arc::new(Gate::default()),
            pool: Arc::new(Pool::default()),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, v: bool) {
        let was = self.healthy.swap(v, Ordering::Relaxed);
        if was && !v {
            self.down_since_ms.store(now_ms(), Ordering::Relaxed);
        } else if !was && v {
            let since = self.down_since_ms.swap(0, Ordering::Relaxed);
            if since > 0 {
                self.downtime_ms
                    .fetch_add(now_ms().saturating_sub(since), Ordering::Relaxed);
            }
        }
    }

    /// Total time health checks have held the server down, the current outage included.
    pub fn downtime(&self) -> Duration {
        let since = self.down_since_ms.load(Ordering::Relaxed);
        let current = if since > 0 {
            now_ms().saturating_sub(since)
        } else {
            0
        };
        Duration::from_millis(self.downtime_ms.load(Ordering::Relaxed) + current)
    }

    /// Records the result of an active health check.
    pub fn set_check(&self, ok: bool, detail: String) {
        *self.last_check.lock() = Some(CheckResult {
            at: std::time::SystemTime::now(),
            ok,
            detail,
        });
    }

    pub fn last_check(&self) -> Option<CheckResult> {
        self.last_check.lock().clone()
    }

    /// Counts a failed exchange (a 5xx answer or no connection).
    pub fn note_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed exchanges so far (5xx answers and connect failures).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u32(self.admin.load(Ordering::Relaxed))
    }

    pub fn set_admin_state(&self, s: AdminState) {
        self.admin.store(s.to_u32(), Ordering::Relaxed)
    }

    pub fn weight_override(&self) -> Option<u32> {
        match self.weight_override.load(Ordering::Relaxed) {
            0 => None,
            w => Some(w),
        }
    }

    pub fn set_weight_override(&self, w: u32) {
        self.weight_override.store(w, Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// May new (non-sticky) requests go here?
    pub fn available(&self) -> bool {
        self.admin_state() == AdminState::Ready && self.healthy() && !self.ejected()
    }

    /// May a request stuck to this server by cookie go here? (Drain still serves them.)
    pub fn available_sticky(&self) -> bool {
        self.admin_state() != AdminState::Maint && self.healthy() && !self.ejected()
    }

    pub fn ejection_count(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Records an upstream outcome for passive outlier detection. Returns true when this
    /// outcome crossed a threshold and the server should be considered for ejection.
    pub fn record_outcome(
        &self,
        status_5xx: bool,
        connect_failure: bool,
        limit_5xx: u32,
        limit_connect: u32,
    ) -> bool {
        if connect_failure {
            let n = self.consecutive_connect.fetch_add(1, Ordering::Relaxed) + 1;
            return limit_connect > 0 && n >= limit_connect;
        }
        self.consecutive_connect.store(0, Ordering::Relaxed);
        if status_5xx {
            let n = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            limit_5xx > 0 && n >= limit_5xx
        } else {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
            false
        }
    }

    /// Ejects the server for `base × n`, where n counts its ejections so far. With a
    /// watcher, announces the ejection, and its end when the time is up.
    pub fn eject(&self, base: Duration) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let d = base.saturating_mul(n.min(64));
        let until = now_ms() + d.as_millis() as u64;
        let watcher = self.watch.get();
        if let Some(w) = watcher {
            // The previous ejection's end, if its timer has not announced it yet.
            if self.restore_due.swap(until, Ordering::AcqRel) != 0 {
                w(self, Change::Restored, "ejection ended");
            }
        }
        let connect = self.consecutive_connect.swap(0, Ordering::Relaxed);
        let failed = self.consecutive_5xx.swap(0, Ordering::Relaxed);
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        if let Some(w) = watcher {
            let reason = if connect > 0 {
                format!("{connect} consecutive connect failures")
            } else {
                format!("{failed} consecutive failed responses")
            };
            w(self, Change::Ejected(d), &reason);
            self.announce_restore(until, d);
        }
        d
    }

    /// After `d`, announces the end of the ejection until `until`, unless already done.
    fn announce_restore(&self, until: u64, d: Duration) {
        let (Ok(rt), Some(me)) = (tokio::runtime::Handle::try_current(), self.me.upgrade()) else {
            return;
        };
        rt.spawn(async move {
            tokio::time::sleep(d).await;
            // The clock of `ejected` has millisecond steps: wait until it agrees.
            while me.ejected() && me.ejected_until_ms.load(Ordering::Relaxed) == until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let announce = me
                .restore_due
                .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
            if let (true, Some(w)) = (announce, me.watch.get()) {
                w(&me, Change::Restored, "ejection ended");
            }
        });
    }

    /// Tells the registry's watcher, if any, about `change`.
    pub fn notify(&self, change: Change, reason: &str) {
        if let Some(w) = self.watch.get() {
            w(self, change, reason);
        }
    }
}

/// A server's `max_connections` (HAProxy's `maxconn`): at most `limit` requests in progress
/// on it; the others wait, first come first served. One gate per server for its whole life,
/// whose limit each config sets when it is loaded: a new limit applies at once to every
/// request that waits or comes after (those in progress finish), whichever config they were
/// routed by. A semaphore made per limit would let a lowered limit admit new requests beside
/// those still holding the old one's permits, and split one server into two queues.
pub struct Gate {
    /// `usize::MAX`: no limit.
    limit: AtomicUsize,
    in_use: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            limit: AtomicUsize::new(usize::MAX),
            in_use: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }
}

impl Gate {
    /// Sets the limit (`None`: none). Waiters look again.
    pub fn set_limit(&self, max: Option<usize>) {
        self.limit
            .store(max.unwrap_or(usize::MAX), Ordering::Release);
        self.freed.notify_waiters();
    }

    pub fn limited(&self) -> bool {
        self.limit.load(Ordering::Acquire) != usize::MAX
    }

    /// True when a new request would have to wait.
    pub fn full(&self) -> bool {
        self.in_use.load(Ordering::Acquire) >= self.limit.load(Ordering::Acquire)
    }

    /// A slot now, if one is free.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut cur = self.in_use.load(Ordering::Acquire);
        loop {
            if cur >= self.limit.load(Ordering::Acquire) {
                return None;
            }
            match self.in_use.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// A slot, once one is free (cancel-safe: a dropped wait hands its wake-up on).
    pub async fn take(self: &Arc<Self>) -> Slot {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so that a slot freed in between wakes it.
            freed.as_mut().enable();
            if let Some(s) = self.try_take() {
                return s;
            }
            freed.await;
        }
    }
}

/// A request's place under its server's `max_connections`, given back when dropped.
pub struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// All servers' state, by key. Entries for servers that left the config are pruned on reload.
#[derive(Default)]
pub struct StateRegistry {
    servers: Mutex<HashMap<String, Arc<ServerState>>>,
    watch: WatchSlot,
}

impl StateRegistry {
    /// Sets the watcher of every server, present and future. Only the first call counts.
    pub fn watch(&self, watcher: Watcher) {
        let _ = self.watch.set(watcher);
    }

    pub fn server(&self, key: &str, address: &str) -> Arc<ServerState> {
        let mut m = self.servers.lock();
        if let Some(s) = m.get(key) {
            if s.address == address {
                return s.clone();
            }
        }
        // A new server, or the same name at a new address: fresh state.
        let s = Arc::new_cyclic(|me| {
            ServerState::watched(
                key.to_string(),
                address.to_string(),
                self.watch.clone(),
                me.clone(),
            )
        });
        m.insert(key.to_string(), s.clone());
        s
    }

    pub fn retain(&self, keep: &std::collections::HashSet<String>) {
        self.servers.lock().retain(|k, _| keep.contains(k));
    }
}

#[cfg(test)]
mod tests {
    /// A limit changed by a reload holds for everything in progress on the server: lowered,
    /// no new request goes in until enough have ended; raised, waiters go in at once.
    #[tokio::test]
    async fn a_gate_keeps_its_count_across_limit_changes() {
        let g = Arc::new(Gate::default());
        assert!(!g.limited());
        g.set_limit(Some(4));
        let mut held: Vec<Slot> = (0..4).map(|_| g.try_take().unwrap()).collect();
        assert!(g.full() && g.try_take().is_none());
        g.set_limit(Some(1));
        held.truncate(2);
        assert!(g.try_take().is_none(), "2 in progress over a limit of 1");
        held.truncate(0);
        let one = g.try_take().expect("room once all ended");
        assert!(g.try_take().is_none());
        // A waiter goes in when the limit is raised, and another when a slot is freed.
        let (a, b) = (g.clone(), g.clone());
        let first = tokio::spawn(async move { a.take().await });
        let second = tokio::spawn(async move { b.take().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.set_limit(Some(2));
        let s1 = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::select! { s = first => s.unwrap(), s = second => s.unwrap() }
        })
        .await
        .expect("a waiter went in when the limit was raised");
        assert!(g.full());
        drop(one);
        drop(s1);
        assert!(!g.full());
    }

    use super::*;

    #[test]
    fn state_survives_lookup_by_key_and_resets_on_new_address() {
        let r = StateRegistry::default();
        let a = r.server("b/s1", "127.0.0.1:1");
        a.set_admin_state(AdminState::Drain);
        assert_eq!(
            r.server("b/s1", "127.0.0.1:1").admin_state(),
            AdminState::Drain
        );
        assert_eq!(
            r.server("b/s1", "127.0.0.1:2").admin_state(),
            AdminState::Ready
        );
    }

    #[test]
    fn downtime_adds_up_outages_and_the_current_one() {
        let s = ServerState::new("k".into(), "a".into());
        assert_eq!(s.downtime(), Duration::ZERO);
        s.set_healthy(false);
        std::thread::sleep(Duration::from_millis(20));
        s.set_healthy(true);
        let first = s.downtime();
        assert!(first >= Duration::from_millis(20), "{first:?}");
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(s.downtime(), first, "no downtime while up");
        s.set_healthy(false);
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.downtime() >= first + Duration::from_millis(20));
        s.set_check(false, "status 503".into());
        let c = s.last_check().unwrap();
        assert!(!c.ok && c.detail == "status 503");
    }

    #[test]
    fn ejection_grows_with_each_ejection() {
        let s = ServerState::new("k".into(), "a".into());
        assert!(!s.record_outcome(true, false, 2, 2));
        assert!(s.record_outcome(true, false, 2, 2));
        assert_eq!(
            s.eject(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        assert!(s.ejected() && !s.available());
        assert_eq!(
            s.eject(Duration::from_millis(100)),
            Duration::from_millis(200)
        );
    }
}
