//! Windowed counting for request-level events: the proxy records each denial, failed login
//! or limit refusal here (a map update, no event), and one event per key and window comes
//! out: "N denials for key K in the T after the first".
//!
//! A key's window opens at its first hit and lasts `window`; when it has passed,
//! [`Aggregator::due`] returns the key's [`Tally`] (if it reached `min_count`) and forgets the
//! key, so the next hit opens a new window. A key reports at most once per window, however
//! many requests hit it.
//!
//! Memory is bounded: at most `max_keys` keys are tracked at once. A hit for a new key when
//! full is not counted, and [`Aggregator::dropped`] says how many were lost that way.
//!
//! ```
//! use portcullis_events::{types, Aggregator, Source};
//! use std::time::{Duration, Instant};
//!
//! let agg = Aggregator::new(types::AUTH_DENIAL_BURST, Duration::from_secs(10), 10_000);
//! let t0 = Instant::now();
//! for _ in 0..500 {
//!     agg.add_at(t0, "billing/api", "User::\"mallory\"", 1);
//! }
//! assert!(agg.due(t0 + Duration::from_secs(9)).is_empty());
//! let tallies = agg.due(t0 + Duration::from_secs(10));
//! assert_eq!(tallies.len(), 1);
//! let event = tallies[0].to_event(&Source::new("portcullis://edge-1"));
//! assert_eq!(event.type_, types::AUTH_DENIAL_BURST);
//! assert_eq!(event.data["count"], 500);
//! ```

use crate::bus::Bus;
use crate::event::{Event, Source};
use crate::types::WindowCount;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Counts hits per (subject, key) in windows; see the [module docs](self).
#[derive(Debug)]
pub struct Aggregator {
    type_: String,
    window: Duration,
    max_keys: usize,
    min_count: u64,
    state: Mutex<State>,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// subject → key → its open window.
    groups: HashMap<String, HashMap<String, Slot>>,
    keys: usize,
}

#[derive(Debug)]
struct Slot {
    count: u64,
    opened: Instant,
    opened_at: SystemTime,
}

/// One key's count over one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    pub type_: String,
    pub subject: String,
    pub key: String,
    pub count: u64,
    pub window: Duration,
    /// When the window opened (the first hit).
    pub start: SystemTime,
}

impl Tally {
    /// The event: this tally's type and subject, [`WindowCount`] data.
    pub fn to_event(&self, source: &Source) -> Event {
        source.event(
            self.type_.clone(),
            Some(self.subject.clone()),
            WindowCount::new(self.key.clone(), self.count, self.window, self.start),
        )
    }
}

impl Aggregator {
    /// Counts for events of `type_` over `window`, tracking at most `max_keys` keys.
    pub fn new(type_: impl Into<String>, window: Duration, max_keys: usize) -> Aggregator {
        Aggregator {
            type_: type_.into(),
            window,
            max_keys,
            min_count: 1,
            state: Mutex::new(State::default()),
            dropped: AtomicU64::new(0),
        }
    }

    /// Reports a window only if it counted at least `n` (a "burst"); default 1.
    pub fn min_count(mut self, n: u64) -> Aggregator {
        self.min_count = n.max(1);
        self
    }

    pub fn type_(&self) -> &str {
        &self.type_
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Counts one hit for `key` under `subject`, now.
    pub fn hit(&self, subject: &str, key: &str) {
        self.add_at(Instant::now(), subject, key, 1);
    }

    /// Counts `n` hits for `key` under `subject` at `now`.
    pub fn add_at(&self, now: Instant, subject: &str, key: &str, n: u64) {
        let mut state = self.state.lock();
        let full = state.keys >= self.max_keys;
        if let Some(slot) = state.groups.get_mut(subject).and_then(|g| g.get_mut(key)) {
            slot.count = slot.count.saturating_add(n);
            return;
        }
        if full {
            drop(state);
            self.dropped.fetch_add(n, Ordering::Relaxed);
            return;
        }
        let slot = Slot {
            count: n,
            opened: now,
            opened_at: SystemTime::now(),
        };
        match state.groups.get_mut(subject) {
            Some(group) => {
                group.insert(key.to_owned(), slot);
            }
            None => {
                let group = HashMap::from([(key.to_owned(), slot)]);
                state.groups.insert(subject.to_owned(), group);
            }
        }
        state.keys += 1;
    }

    /// Closes every window that has lasted `window` by `now`, and returns the tallies that
    /// reached `min_count`, ordered by subject and key.
    pub fn due(&self, now: Instant) -> Vec<Tally> {
        let mut out = Vec::new();
        let mut state = self.state.lock();
        let mut closed = 0;
        state.groups.retain(|subject, group| {
            group.retain(|key, slot| {
                if now.saturating_duration_since(slot.opened) < self.window {
                    return true;
                }
                closed += 1;
                if slot.count >= self.min_count {
                    out.push(Tally {
                        type_: self.type_.clone(),
                        subject: subject.clone(),
                        key: key.clone(),
                        count: slot.count,
                        window: self.window,
                        start: slot.opened_at,
                    });
                }
                false
            });
            !group.is_empty()
        });
        state.keys -= closed;
        drop(state);
        out.sort_by(|a, b| (&a.subject, &a.key).cmp(&(&b.subject, &b.key)));
        out
    }

    /// Keys with an open window.
    pub fn tracked(&self) -> usize {
        self.state.lock().keys
    }

    /// Hits not counted because `max_keys` keys were already tracked.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Publishes the due tallies on `bus` every `tick` (a fraction of the window, such as a
    /// second), as events from `source`, until [`Bus::shutdown`] (the task holds a handle to
    /// the bus, so dropping the others does not stop it; abort it then).
    pub fn spawn(
        self: Arc<Self>,
        bus: Bus,
        source: Source,
        tick: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let mut shutdown = bus.shutdown_signal();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = crate::bus::stopped(&mut shutdown) => return,
                }
                for tally in self.due(Instant::now()) {
                    bus.publish(tally.to_event(&source));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LIMIT_EXCEEDED;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn one_tally_per_key_and_window() {
        let agg = Aggregator::new(LIMIT_EXCEEDED, 10 * S, 100);
        let t0 = Instant::now();
        agg.add_at(t0, "per_ip", "10.0.0.1", 1);
        agg.add_at(t0 + 3 * S, "per_ip", "10.0.0.1", 4);
        agg.add_at(t0 + 5 * S, "per_ip", "10.0.0.2", 1);
        agg.add_at(t0 + 5 * S, "plan:gold", "10.0.0.1", 2);
        assert_eq!(agg.tracked(), 3);
        assert!(agg.due(t0 + 9 * S).is_empty());
        let due = agg.due(t0 + 10 * S);
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].subject.as_str(), due[0].key.as_str(), due[0].count),
            ("per_ip", "10.0.0.1", 5)
        );
        // A hit after the window closed opens a new one.
        agg.add_at(t0 + 11 * S, "per_ip", "10.0.0.1", 1);
        let due = agg.due(t0 + 15 * S);
        let got: Vec<_> = due
            .iter()
            .map(|t| (t.subject.as_str(), t.key.as_str(), t.count))
            .collect();
        assert_eq!(
            got,
            [("per_ip", "10.0.0.2", 1), ("plan:gold", "10.0.0.1", 2)]
        );
        assert_eq!(agg.due(t0 + 21 * S)[0].count, 1);
        assert_eq!(agg.tracked(), 0);
        assert!(agg.due(t0 + 100 * S).is_empty());
    }

    #[test]
    fn windows_below_min_count_are_not_reported() {
        let agg = Aggregator::new(LIMIT_EXCEEDED, S, 100).min_count(3);
        let t0 = Instant::now();
        agg.add_at(t0, "r", "a", 2);
        agg.add_at(t0, "r", "b", 3);
        let due = agg.due(t0 + S);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, "b");
        assert_eq!(agg.tracked(), 0, "the quiet key is forgotten too");
    }

    #[test]
    fn keys_are_capped_and_what_is_dropped_is_counted() {
        let agg = Aggregator::new(LIMIT_EXCEEDED, S, 2);
        let t0 = Instant::now();
        agg.add_at(t0, "r", "a", 1);
        agg.add_at(t0, "q", "b", 1);
        agg.add_at(t0, "r", "c", 5);
        agg.add_at(t0, "q", "d", 1);
        // Keys already tracked still count when full.
        agg.add_at(t0, "r", "a", 1);
        assert_eq!((agg.tracked(), agg.dropped()), (2, 6));
        assert_eq!(agg.due(t0 + S).len(), 2);
        agg.add_at(t0 + S, "r", "c", 1);
        assert_eq!(agg.tracked(), 1);
    }
}
