//! Wall-clock time, injected. Quotas reset at a time of day ("00:00 UTC", the 1st of the
//! month), so unlike the counters in [`crate::clock`] they need the calendar, not a monotonic
//! timeline. A [`WallClock`] reads nanoseconds since the Unix epoch (UTC, leap seconds not
//! counted, as every Unix clock does); callers read it once per request and hand the value to
//! the quota module's `Quotas::check`, so tests can stand on a boundary to the nanosecond.
//!
//! * [`SystemWallClock`] is the real one ([`std::time::SystemTime`]). It can jump (NTP, an
//!   operator): the quota module tolerates a clock that goes backwards.
//! * [`ManualWallClock`] is for tests and simulations: it moves only when told.
//!
//! ```
//! use portcullis_limits::wall::{ManualWallClock, WallClock, NANOS_PER_SEC};
//! use std::time::Duration;
//!
//! // 2026-12-06 00:00:00 UTC.
//! let clock = ManualWallClock::from_unix_secs(1_796_515_200);
//! clock.advance(Duration::from_millis(1500));
//! assert_eq!(clock.unix_nanos(), 1_796_515_201 * NANOS_PER_SEC + 500_000_000);
//! assert_eq!(clock.unix_secs(), 1_796_515_201);
//! ```

use crate::clock::{Clock, Moment, MonotonicClock};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds in a second.
pub const NANOS_PER_SEC: i64 = 1_000_000_000;

/// A source of wall-clock time: nanoseconds since 1970-01-01 00:00:00 UTC (negative before).
/// An `i64` of nanoseconds covers the years 1677 to 2262.
pub trait WallClock: Send + Sync {
    fn unix_nanos(&self) -> i64;

    /// The wall time at `at`, a moment of this process's [`MonotonicClock`] (a request's
    /// arrival, read once). Reads the clock now unless the clock knows better:
    /// [`SystemWallClock`] answers from the offset between the two clocks, which it reads
    /// again at most every [`RESYNC`], so a request path reads no clock of its own.
    fn unix_nanos_at(&self, at: Moment) -> i64 {
        let _ = at;
        self.unix_nanos()
    }

    /// Whole seconds since the epoch, rounded down (towards the past, also before 1970).
    fn unix_secs(&self) -> i64 {
        self.unix_nanos().div_euclid(NANOS_PER_SEC)
    }
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemWallClock;

/// How long [`SystemWallClock::unix_nanos_at`] goes on one reading of the offset between the
/// wall clock and the monotonic one. A step of the wall clock (an operator, NTP) shows that
/// much later; a slew (at most 500 ppm under NTP) moves it by 5 µs at most in that time.
pub const RESYNC: Duration = Duration::from_millis(10);

/// The wall clock minus the monotonic clock, in nanoseconds, and the monotonic moment it was
/// read at (0: never).
static OFFSET: AtomicI64 = AtomicI64::new(0);
static SYNCED: AtomicU64 = AtomicU64::new(0);

impl WallClock for SystemWallClock {
    fn unix_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_nanos())
                .map(|n| -n)
                .unwrap_or(i64::MIN),
        }
    }

    fn unix_nanos_at(&self, at: Moment) -> i64 {
        let at = at.as_nanos();
        // Acquire: the offset stored before this moment is seen with it. A moment before the
        // last reading (a request that arrived earlier) takes the same offset.
        let synced = SYNCED.load(Ordering::Acquire);
        let fresh = at.saturating_sub(synced) < RESYNC.as_nanos() as u64;
        if synced == 0 || !fresh {
            // The wall reading between two monotonic ones, set against their midpoint: a
            // thread descheduled between the reads errs by half the gap, not all of it.
            let m0 = MonotonicClock.now().as_nanos();
            let wall = self.unix_nanos();
            let m1 = MonotonicClock.now().as_nanos();
            let mono = m0 + m1.saturating_sub(m0) / 2;
            OFFSET.store(
                wall.saturating_sub(i64::try_from(mono).unwrap_or(i64::MAX)),
                Ordering::Relaxed,
            );
            SYNCED.store(mono.max(1), Ordering::Release);
        }
        OFFSET
            .load(Ordering::Relaxed)
            .saturating_add(i64::try_from(at).unwrap_or(i64::MAX))
    }
}

/// A wall clock that moves only when told: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualWallClock {
    nanos: AtomicI64,
}

impl ManualWallClock {
    /// A clock at `unix_nanos`.
    pub fn new(unix_nanos: i64) -> ManualWallClock {
        ManualWallClock {
            nanos: AtomicI64::new(unix_nanos),
        }
    }

    /// A clock at `unix_secs` (saturating).
    pub fn from_unix_secs(unix_secs: i64) -> ManualWallClock {
        ManualWallClock::new(unix_secs.saturating_mul(NANOS_PER_SEC))
    }

    /// Moves the clock forward by `d` (saturating).
    pub fn advance(&self, d: Duration) {
        let d = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(d))
            });
    }

    /// Sets the clock to `unix_nanos`, forwards or backwards (a test of a clock stepped back).
    pub fn set(&self, unix_nanos: i64) {
        self.nanos.store(unix_nanos, Ordering::Relaxed);
    }
}

impl WallClock for ManualWallClock {
    fn unix_nanos(&self) -> i64 {
        self.nanos.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_is_after_2024() {
        // 2024-01-01 00:00:00 UTC.
        assert!(SystemWallClock.unix_secs() > 1_704_067_200);
    }

    #[test]
    fn the_system_clock_at_a_moment_matches_a_reading_then() {
        let c = SystemWallClock;
        for _ in 0..3 {
            let before = c.unix_nanos();
            let at = MonotonicClock.now();
            let then = c.unix_nanos_at(at);
            let after = c.unix_nanos();
            // Within the clocks' drift over one resync, and a scheduler's hiccup.
            let slack = 50_000_000;
            assert!(
                then >= before - slack && then <= after + slack,
                "{before} {then} {after}"
            );
            // An earlier moment is earlier by as much.
            let earlier = Moment::from_nanos(at.as_nanos().saturating_sub(1_000_000));
            let d = then - c.unix_nanos_at(earlier);
            assert!(
                at.as_nanos() < 1_000_000 || (999_000..=1_001_000).contains(&d),
                "{d}"
            );
            std::thread::sleep(RESYNC + Duration::from_millis(1));
        }
        // Other clocks answer with their reading.
        let m = ManualWallClock::from_unix_secs(7);
        assert_eq!(m.unix_nanos_at(MonotonicClock.now()), 7 * NANOS_PER_SEC);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_saturates() {
        let c = ManualWallClock::from_unix_secs(-1);
        assert_eq!(c.unix_nanos(), -NANOS_PER_SEC);
        c.advance(Duration::from_nanos(1));
        // Seconds round towards the past, also before the epoch.
        assert_eq!(c.unix_secs(), -1);
        c.set(i64::MAX - 5);
        c.advance(Duration::MAX);
        assert_eq!(c.unix_nanos(), i64::MAX);
        assert_eq!(
            ManualWallClock::from_unix_secs(i64::MIN).unix_nanos(),
            i64::MIN
        );
    }
}
