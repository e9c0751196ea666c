//! Time, injected. Every counter in this crate takes the current [`Moment`] as an argument
//! instead of reading a clock itself, so a test can walk time forward by exact amounts (no
//! sleeps) and the proxy can read the clock once per request and reuse it.
//!
//! A [`Moment`] is a point on a monotonic timeline, in nanoseconds since an origin. Moments
//! are only comparable when they come from the same [`Clock`]:
//!
//! * [`MonotonicClock`] is the real one: nanoseconds since the first time any
//!   `MonotonicClock` was read in this process (one origin for the whole process).
//! * [`ManualClock`] is for tests and simulations: it starts at zero and moves only when told.
//!
//! ```
//! use portcullis_limits::clock::{Clock, ManualClock, Moment};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! assert_eq!(clock.now(), Moment::ZERO);
//! clock.advance(Duration::from_millis(1500));
//! assert_eq!(clock.now(), Moment::from_nanos(1_500_000_000));
//! ```

use std::fmt;
use std::ops::Add;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A point in monotonic time: nanoseconds since the clock's origin. A `u64` of nanoseconds
/// lasts 584 years, so arithmetic saturates rather than wraps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Moment(u64);

impl Moment {
    /// The clock's origin.
    pub const ZERO: Moment = Moment(0);
    /// The last representable moment.
    pub const MAX: Moment = Moment(u64::MAX);

    pub const fn from_nanos(nanos: u64) -> Moment {
        Moment(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later (two threads may read
    /// the clock in one order and take a lock in the other).
    pub fn saturating_since(self, earlier: Moment) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// `moment + duration`, saturating at [`Moment::MAX`].
impl Add<Duration> for Moment {
    type Output = Moment;
    fn add(self, d: Duration) -> Moment {
        Moment(self.0.saturating_add(duration_nanos(d)))
    }
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", Duration::from_nanos(self.0))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of [`Moment`]s. The counters never call it; callers do, once per unit of work.
pub trait Clock: Send + Sync {
    fn now(&self) -> Moment;
}

/// The real monotonic clock ([`std::time::Instant`]), with one origin per process so moments
/// from any two `MonotonicClock`s compare correctly.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl MonotonicClock {
    fn origin() -> Instant {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// The moment of an `Instant` taken elsewhere (for example when a request arrived).
    /// Instants before the origin map to [`Moment::ZERO`].
    pub fn moment_of(instant: Instant) -> Moment {
        Moment(duration_nanos(
            instant.saturating_duration_since(Self::origin()),
        ))
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Moment {
        Self::moment_of(Instant::now())
    }
}

/// A clock that moves only when told: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock at [`Moment::ZERO`].
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// A clock at `at`.
    pub fn starting_at(at: Moment) -> ManualClock {
        ManualClock {
            nanos: AtomicU64::new(at.0),
        }
    }

    /// Moves the clock forward by `d` (saturating).
    pub fn advance(&self, d: Duration) {
        let d = duration_nanos(d);
        let _ = self
            .nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(d))
            });
    }

    /// Sets the clock to `at`. A test may move it backwards to check that counters tolerate a
    /// moment older than one they have already seen.
    pub fn set(&self, at: Moment) {
        self.nanos.store(at.0, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Moment {
        Moment(self.nanos.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);

        clock.advance(Duration::from_secs(10));
        assert_eq!(clock.now().saturating_since(t0), Duration::from_secs(10));

        // Going back is allowed, and "since" never goes negative.
        clock.set(Moment::from_nanos(5));
        assert_eq!(
            clock.now().saturating_since(t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn moments_saturate_instead_of_wrapping() {
        assert_eq!(Moment::MAX + Duration::from_secs(1), Moment::MAX);
        let clock = ManualClock::starting_at(Moment::MAX);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), Moment::MAX);
    }

    #[test]
    fn monotonic_clocks_share_one_origin() {
        let a = MonotonicClock.now();
        let b = MonotonicClock.now();
        assert!(b >= a);
        // An instant before the origin is the origin, not a panic. (Some platforms cannot
        // represent an instant that far back at all, hence `checked_sub`.)
        if let Some(earlier) = Instant::now().checked_sub(Duration::from_secs(3600)) {
            let origin_is_recent = MonotonicClock::moment_of(Instant::now()).as_nanos()
                < Duration::from_secs(3600).as_nanos() as u64;
            if origin_is_recent {
                assert_eq!(MonotonicClock::moment_of(earlier), Moment::ZERO);
            }
        }
    }
}
