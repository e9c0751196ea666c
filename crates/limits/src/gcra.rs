//! Token buckets as GCRA (the generic cell rate algorithm): a steady rate plus a burst, kept
//! as one timestamp per key and updated only when a request is checked, so there is no
//! background refill, no timer, and nothing to do for idle keys.
//!
//! # The model
//!
//! A bucket with rate `r` (say 100/s) and burst `b` (say 200) admits up to `b` requests at
//! once, then one every `T = 1/r` (10ms). The state is the *theoretical arrival time* `tat`:
//! when the bucket would be full again if nothing else arrived. A request of cost `c` at time
//! `now` is admitted if
//!
//! ```text
//! max(tat, now) + c·T − now ≤ b·T
//! ```
//!
//! and then `tat` becomes `max(tat, now) + c·T`. Otherwise it is refused and `tat` is
//! unchanged, so refused requests cost nothing.
//!
//! Time is kept in ticks of `1/count` nanoseconds (for 3 per second, a tick is a third of a
//! nanosecond), so `T` is an exact integer for every rate and nothing drifts by rounding.
//! Products are `u128`; sums saturate; durations handed back round up, so a client that waits
//! `retry_after` is admitted.
//!
//! ```
//! use portcullis_limits::{clock::Moment, gcra::Bucket, Rate};
//! use std::time::Duration;
//!
//! let mut bucket = Bucket::new(Rate::per_second(100), 200)?;
//! let t0 = Moment::ZERO;
//! // A full bucket: 200 at once...
//! for _ in 0..200 {
//!     assert!(bucket.check(t0, 1).allowed);
//! }
//! // ...then the 201st waits 10ms for the next token.
//! let v = bucket.check(t0, 1);
//! assert!(!v.allowed);
//! assert_eq!(v.retry_after, Duration::from_millis(10));
//! assert!(bucket.check(t0 + v.retry_after, 1).allowed);
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

use crate::clock::Moment;
use crate::{Error, Rate};
use std::time::Duration;

/// The parameters of a bucket: a rate and a burst. Shared by every key on the same plan; the
/// per-key state is a [`GcraState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Ticks per nanosecond: the rate's count.
    ticks_per_ns: u64,
    /// The emission interval `T` in ticks: the rate's period in nanoseconds.
    interval: u64,
    burst: u64,
}

/// One key's bucket: the theoretical arrival time, in ticks. `Default` is a full bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcraState {
    tat: u128,
}

impl GcraState {
    /// The theoretical arrival time, in the bucket's ticks: a larger value is an emptier
    /// bucket (for choosing what to forget).
    pub(crate) fn tat(&self) -> u128 {
        self.tat
    }
}

/// The answer to one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request is admitted (and its cost taken).
    pub allowed: bool,
    /// How long until the same request would be admitted: zero when `allowed`, and
    /// `Duration::MAX` when the cost exceeds the burst, so it never will be.
    pub retry_after: Duration,
    /// Whole requests of cost 1 that would be admitted right now, after this check. This is
    /// the `remaining` of the IETF `RateLimit` header.
    pub remaining: u64,
    /// How long until the bucket is full again if nothing else arrives (the `reset` of the
    /// `RateLimit` header).
    pub reset_after: Duration,
}

impl Gcra {
    /// A bucket admitting `rate` on average and up to `burst` at once (`burst` ≥ 1; with
    /// `burst` 1 requests are spaced exactly `1/rate` apart).
    pub fn new(rate: Rate, burst: u64) -> Result<Gcra, Error> {
        if burst == 0 {
            return Err(Error::BadLimit {
                fix: "burst must be at least 1 (1 means no bursting: requests are spaced evenly)"
                    .into(),
            });
        }
        Ok(Gcra {
            ticks_per_ns: rate.count(),
            interval: u64::try_from(rate.per().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            burst,
        })
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Whether `state`'s bucket is full at `now`: the same as a key never seen, so it can be
    /// forgotten without changing any verdict.
    pub fn is_full(&self, state: &GcraState, now: Moment) -> bool {
        state.tat <= self.ticks(now)
    }

    fn ticks(&self, now: Moment) -> u128 {
        u128::from(now.as_nanos()) * u128::from(self.ticks_per_ns)
    }

    /// Ticks to a duration, rounding up.
    fn duration(&self, ticks: u128) -> Duration {
        let ns = match u64::try_from(ticks) {
            // A 64-bit division when it fits (every wait under about 18 s at 1 tick a
            // nanosecond): the 128-bit one is a library call on every check.
            Ok(t) => u128::from(t.div_ceil(self.ticks_per_ns)),
            Err(_) => ticks.div_ceil(u128::from(self.ticks_per_ns)),
        };
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Checks a request of `cost` at `now` against `state`, taking the cost if it is admitted.
    /// A cost of 0 only reads the bucket.
    pub fn check(&self, state: &mut GcraState, now: Moment, cost: u64) -> Verdict {
        let now = self.ticks(now);
        let interval = u128::from(self.interval);
        let capacity = u128::from(self.burst) * interval;
        let start = state.tat.max(now);
        let used = start - now;
        let tat = start.saturating_add(u128::from(cost) * interval);
        let remaining_after = |used: u128| {
            let left = capacity.saturating_sub(used);
            match u64::try_from(left) {
                Ok(l) => l / self.interval,
                Err(_) => (left / interval) as u64,
            }
        };

        if tat - now <= capacity {
            state.tat = tat;
            return Verdict {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: remaining_after(tat - now),
                reset_after: self.duration(tat - now),
            };
        }
        let retry_after = if cost > self.burst {
            Duration::MAX
        } else {
            // Admitted once `now` reaches tat − capacity.
            self.duration(tat - capacity - now)
        };
        Verdict {
            allowed: false,
            retry_after,
            remaining: remaining_after(used),
            reset_after: self.duration(used),
        }
    }
}

/// A self-contained bucket: a [`Gcra`] and its state, for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    gcra: Gcra,
    state: GcraState,
}

impl Bucket {
    /// A full bucket admitting `rate`, and up to `burst` at once.
    pub fn new(rate: Rate, burst: u64) -> Result<Bucket, Error> {
        Ok(Bucket {
            gcra: Gcra::new(rate, burst)?,
            state: GcraState::default(),
        })
    }

    /// See [`Gcra::check`].
    pub fn check(&mut self, now: Moment, cost: u64) -> Verdict {
        self.gcra.check(&mut self.state, now, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_steady_rate_is_admitted_and_anything_faster_is_not() {
        // 100/s with no burst allowance beyond one: exactly one request per 10ms.
        let mut b = Bucket::new(Rate::per_second(100), 1).unwrap();
        let t0 = Moment::ZERO;
        for i in 0..1_000 {
            let now = t0 + ms(10 * i);
            assert!(b.check(now, 1).allowed, "request {i} on schedule");
            assert!(!b.check(now + ms(5), 1).allowed, "a second one 5ms later");
        }
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_the_rate() {
        let mut b = Bucket::new(Rate::per_second(100), 200).unwrap();
        let t0 = Moment::ZERO;
        let admitted = (0..1_000).filter(|_| b.check(t0, 1).allowed).count();
        assert_eq!(admitted, 200);

        // One second later, 100 tokens have come back.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..1_000).filter(|_| b.check(t1, 1).allowed).count();
        assert_eq!(admitted, 100);

        // Over ten seconds of hammering every millisecond, 100/s get through.
        let mut admitted = 0;
        for i in 1..=10_000 {
            admitted += u64::from(b.check(t1 + ms(i), 1).allowed);
        }
        assert_eq!(admitted, 1_000);
    }

    #[test]
    fn verdicts_carry_the_rate_limit_header_values() {
        let mut b = Bucket::new(Rate::per_second(100), 200).unwrap();
        let t0 = Moment::ZERO;

        let v = b.check(t0, 1);
        assert_eq!(
            v,
            Verdict {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: 199,
                reset_after: ms(10),
            }
        );

        let v = b.check(t0, 149);
        assert!(v.allowed);
        assert_eq!(v.remaining, 50);
        assert_eq!(v.reset_after, ms(1_500));

        // 60 more do not fit: 10 are missing, which take 100ms to come back.
        let v = b.check(t0, 60);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, ms(100));
        assert_eq!(v.remaining, 50, "a refusal takes nothing");
        assert_eq!(v.reset_after, ms(1_500));

        // Waiting exactly retry_after is enough, and not a nanosecond less.
        assert!(
            !b.check(t0 + (ms(100) - Duration::from_nanos(1)), 60)
                .allowed
        );
        assert!(b.check(t0 + ms(100), 60).allowed);
    }

    #[test]
    fn a_cost_larger_than_the_burst_is_never_admitted() {
        let mut b = Bucket::new(Rate::per_second(10), 5).unwrap();
        let v = b.check(Moment::ZERO, 6);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, Duration::MAX);
        assert_eq!(v.remaining, 5);
    }

    #[test]
    fn a_zero_cost_only_reads() {
        let mut b = Bucket::new(Rate::per_second(10), 5).unwrap();
        b.check(Moment::ZERO, 2);
        let before = b;
        let v = b.check(Moment::ZERO, 0);
        assert!(v.allowed);
        assert_eq!(v.remaining, 3);
        assert_eq!(b, before);
    }

    #[test]
    fn rates_that_do_not_divide_into_nanoseconds_are_exact() {
        // 3 per second is one every 333,333,333.3…ns. Hammered every millisecond for 1,000s, a
        // bucket with burst 2 admits its burst and then exactly 3 per second: no drift.
        let g = Gcra::new(Rate::per_second(3), 2).unwrap();
        let mut s = GcraState::default();
        let admitted = (0..=1_000_000u64)
            .filter(|ms| {
                g.check(&mut s, Moment::from_nanos(ms * 1_000_000), 1)
                    .allowed
            })
            .count();
        assert_eq!(admitted, 2 + 3_000);

        // 3 per nanosecond: a third of a nanosecond per token is kept exactly, not rounded to 0
        // (unlimited) or 1ns (a third of the rate).
        let mut b = Bucket::new(Rate::new(3, Duration::from_nanos(1)).unwrap(), 3_000).unwrap();
        assert!(b.check(Moment::ZERO, 3_000).allowed);
        let t = Moment::from_nanos(1_000);
        assert!(b.check(t, 3_000).allowed);
        let v = b.check(t, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, Duration::from_nanos(1));
    }

    #[test]
    fn huge_gaps_and_huge_rates_do_not_overflow() {
        // A year of silence refills the bucket; it does not overflow it.
        let mut b = Bucket::new(Rate::per_second(100), 200).unwrap();
        assert!(b.check(Moment::ZERO, 200).allowed);
        let v = b.check(Moment::ZERO + Duration::from_secs(365 * 86_400), 1);
        assert_eq!(v.remaining, 199);

        // The extremes of every input: no panic, sane answers.
        let mut b = Bucket::new(
            Rate::new(u64::MAX, Duration::from_nanos(1)).unwrap(),
            u64::MAX,
        )
        .unwrap();
        assert!(b.check(Moment::MAX, u64::MAX).allowed);
        assert!(!b.check(Moment::MAX, u64::MAX).allowed);
        // One per 584 years (Duration::MAX saturates to u64::MAX nanoseconds).
        let mut b = Bucket::new(Rate::new(1, Duration::MAX).unwrap(), 1).unwrap();
        assert!(b.check(Moment::ZERO, 1).allowed);
        let v = b.check(Moment::ZERO + Duration::from_secs(365 * 86_400), 1);
        assert!(!v.allowed);
        assert!(v.retry_after > Duration::from_secs(500 * 365 * 86_400));
        let mut b = Bucket::new(Rate::new(u64::MAX, Duration::MAX).unwrap(), u64::MAX).unwrap();
        for now in [Moment::ZERO, Moment::MAX, Moment::ZERO] {
            let _ = b.check(now, u64::MAX);
            let _ = b.check(now, 1);
        }
    }

    #[test]
    fn a_moment_older_than_the_last_one_is_handled() {
        let mut b = Bucket::new(Rate::per_second(1), 1).unwrap();
        assert!(b.check(Moment::ZERO + ms(1_000), 1).allowed);
        let v = b.check(Moment::ZERO, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, ms(2_000));
    }

    #[test]
    fn burst_zero_is_an_error_that_says_what_to_write() {
        let err = Gcra::new(Rate::per_second(1), 0).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}
