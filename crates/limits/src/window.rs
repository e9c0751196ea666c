//! Sliding-window event counters: "how many requests in the last 10 seconds", as HAProxy's
//! `http_req_rate(10s)` answers it, without the burst a fixed window lets through.
//!
//! # The algorithm
//!
//! Time is cut into sub-windows of width `w = period / (N - 1)`. A [`WindowState`] keeps the
//! counts of the last `N` of them: the current (partial) one and the `N - 1` before it. The
//! rate at time `t` is
//!
//! ```text
//! rate(t) = current + the N - 2 full sub-windows in between + oldest × (w − elapsed) / w
//! ```
//!
//! where `elapsed` is how far `t` is into the current sub-window: the oldest sub-window is
//! weighted by how much of it still lies inside `(t − period, t]`. With `N = 2` (the default,
//! and what stick tables use) this is exactly HAProxy's `freq_ctr`: the previous and current
//! fixed windows weighted by overlap, in 12 bytes. A larger `N` follows bursty traffic more
//! closely at 4 (or 8) bytes per extra sub-window.
//!
//! # Accuracy
//!
//! Let `A(t)` be the true number of events in `(t − period, t]` and `b` the count of the
//! oldest sub-window. Only that sub-window is estimated, so
//!
//! ```text
//! |rate(t) − A(t)| ≤ b × max(f, 1 − f) ≤ b,   f = elapsed / w
//! ```
//!
//! and the error is zero (up to rounding down to a whole count) when the events in the oldest
//! sub-window were spread evenly. With `N = 2`, `b` is the whole previous window's count; with
//! `N = 11`, a tenth of it for steady traffic. As a limiter ("admit while `rate < limit`")
//! the classic fixed-window failure, `limit` events at the end of one window and `limit` more
//! at the start of the next, cannot happen: right after the boundary the previous window
//! still counts almost fully. The tests below measure both figures.
//!
//! Counts saturate at the count type's maximum instead of wrapping. A moment up to `N`
//! sub-windows older than the newest one seen (two threads reading the clock in one order
//! and taking a lock in the other) counts in the current sub-window rather than being lost.
//! Sub-window positions are 32-bit: a state left untouched for within `N` sub-windows of a
//! multiple of 2^32 sub-windows (136 years of 1s windows, 49 days of 1ms windows) would be
//! read as current.
//!
//! ```
//! use portcullis_limits::{clock::Moment, window::SlidingWindow, Period};
//! use std::time::Duration;
//!
//! let mut w = SlidingWindow::<2>::new(Period::parse("10s")?);
//! let t0 = Moment::ZERO;
//! w.add(t0, 100); // 100 requests in the first window
//! assert_eq!(w.rate(t0), 100);
//! // 2.5s into the next window, 75% of the previous window still overlaps the last 10s.
//! assert_eq!(w.rate(t0 + Duration::from_millis(12_500)), 75);
//! // Two periods later everything has slid out.
//! assert_eq!(w.rate(t0 + Duration::from_secs(20)), 0);
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

use crate::clock::Moment;
use crate::Period;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// A counter cell: `u32` (request and error counts; 4 billion per sub-window is plenty) or
/// `u64` (byte counts).
pub trait Count: Copy + Default + sealed::Sealed {
    fn add_saturating(self, n: u64) -> Self;
    fn get(self) -> u64;
}

impl Count for u32 {
    fn add_saturating(self, n: u64) -> u32 {
        u32::try_from(u64::from(self).saturating_add(n)).unwrap_or(u32::MAX)
    }
    fn get(self) -> u64 {
        u64::from(self)
    }
}

impl Count for u64 {
    fn add_saturating(self, n: u64) -> u64 {
        self.saturating_add(n)
    }
    fn get(self) -> u64 {
        self
    }
}

/// The compact state of a sliding window whose period is kept by its owner (a stick table
/// keeps one period per counter, not one per entry). `N` is the number of sub-windows kept,
/// including the current one; it must be at least 2.
///
/// `WindowState<u32, 2>` is 12 bytes; `WindowState<u64, 2>` is 24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState<C: Count, const N: usize> {
    /// The position (time / width, truncated to 32 bits) of `buckets[0]`.
    pos: u32,
    /// `buckets[0]` is the current sub-window, `buckets[N - 1]` the oldest.
    buckets: [C; N],
}

impl<C: Count, const N: usize> Default for WindowState<C, N> {
    fn default() -> Self {
        WindowState {
            pos: 0,
            buckets: [C::default(); N],
        }
    }
}

/// Where `now` falls: its sub-window position and how far (in nanoseconds) into it.
fn locate<const N: usize>(period: Period, now: Moment) -> (u32, u64, u64) {
    const { assert!(N >= 2, "a sliding window needs at least 2 sub-windows") };
    let width = (period.as_nanos() / (N as u64 - 1)).max(1);
    let now = now.as_nanos();
    ((now / width) as u32, now % width, width)
}

impl<C: Count, const N: usize> WindowState<C, N> {
    /// How many sub-windows `pos` is ahead of the state (capped at `N`), or `None` if it is
    /// slightly behind: a thread that read the clock before another took the lock. Such late
    /// events count in the current sub-window, so they are never dropped. "Slightly" is up to
    /// `N` sub-windows; anything else is a jump forward (positions are 32-bit and wrap).
    fn lag(&self, pos: u32) -> Option<usize> {
        let behind = self.pos.wrapping_sub(pos);
        if behind != 0 && behind <= N as u32 {
            return None;
        }
        Some((pos.wrapping_sub(self.pos) as usize).min(N))
    }

    /// Records `n` events at `now`.
    pub fn add(&mut self, period: Period, now: Moment, n: u64) {
        let (pos, _, _) = locate::<N>(period, now);
        match self.lag(pos) {
            None | Some(0) => {}
            Some(lag) if lag >= N => {
                self.buckets = [C::default(); N];
                self.pos = pos;
            }
            Some(lag) => {
                self.buckets.copy_within(0..N - lag, lag);
                self.buckets[..lag].fill(C::default());
                self.pos = pos;
            }
        }
        self.buckets[0] = self.buckets[0].add_saturating(n);
    }

    /// The estimated number of events in `(now − period, now]`; see the module docs for the
    /// bound on its error.
    pub fn rate(&self, period: Period, now: Moment) -> u64 {
        let (pos, elapsed, width) = locate::<N>(period, now);
        let (lag, elapsed) = match self.lag(pos) {
            // Older than the state: answer as of the start of the state's current sub-window.
            None => (0, 0),
            Some(lag) if lag >= N => return 0,
            Some(lag) => (lag, elapsed),
        };
        // After sliding by `lag`, sub-window i holds buckets[i - lag]; the oldest kept one is
        // buckets[N - 1 - lag].
        let oldest = self.buckets[N - 1 - lag].get();
        let full: u64 = self.buckets[..N - 1 - lag]
            .iter()
            .fold(0u64, |s, c| s.saturating_add(c.get()));
        // In 64 bits when the product fits (a count under about 1.8e9 over a 10 s window),
        // which is every request-rate read: a 128-bit division is a library call.
        let weighted = match oldest.checked_mul(width - elapsed) {
            Some(p) => p / width,
            None => (u128::from(oldest) * u128::from(width - elapsed) / u128::from(width)) as u64,
        };
        full.saturating_add(weighted)
    }
}

/// A self-contained sliding-window counter: a [`WindowState`] with its [`Period`], counting in
/// `u64`. `N` is the number of sub-windows (default 2: HAProxy's previous/current scheme).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow<const N: usize = 2> {
    period: Period,
    state: WindowState<u64, N>,
}

impl<const N: usize> SlidingWindow<N> {
    pub fn new(period: Period) -> Self {
        SlidingWindow {
            period,
            state: WindowState::default(),
        }
    }

    pub fn period(&self) -> Period {
        self.period
    }

    /// Records `n` events at `now`.
    pub fn add(&mut self, now: Moment, n: u64) {
        self.state.add(self.period, now, n);
    }

    /// The estimated number of events in the last period.
    pub fn rate(&self, now: Moment) -> u64 {
        self.state.rate(self.period, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at_ms(ms: u64) -> Moment {
        Moment::from_nanos(ms * 1_000_000)
    }

    fn ten_seconds() -> Period {
        Period::parse("10s").unwrap()
    }

    /// A limiter the way a route rule uses a window: admit while the rate is under the limit.
    fn admit<const N: usize>(w: &mut SlidingWindow<N>, now: Moment, limit: u64) -> bool {
        if w.rate(now) < limit {
            w.add(now, 1);
            true
        } else {
            false
        }
    }

    #[test]
    fn state_sizes() {
        assert_eq!(std::mem::size_of::<WindowState<u32, 2>>(), 12);
        assert_eq!(std::mem::size_of::<WindowState<u64, 2>>(), 24);
    }

    #[test]
    fn a_burst_across_the_boundary_does_not_get_twice_the_limit() {
        // Limit: 100 requests per 10s. 1,000 requests arrive 2ms apart, from 1s before a
        // window boundary to 1s after it. A fixed window would admit 100 in the last second
        // of window 0 and 100 more in the first second of window 1: 200 within 2 seconds.
        let limit = 100;
        let mut w = SlidingWindow::<2>::new(ten_seconds());
        let mut admitted = 0;
        for i in 0..1_000 {
            if admit(&mut w, at_ms(9_000 + 2 * i), limit) {
                admitted += 1;
            }
        }
        println!("admitted of 1,000 across a boundary, limit 100: {admitted}");
        // After the boundary the previous window still weighs 90-100%, so only ~10% more get in.
        assert!(admitted < 2 * limit, "{admitted}");
        assert!(admitted <= limit + limit / 10 + 1, "{admitted}");
        assert!(admitted >= limit, "{admitted}");
    }

    #[test]
    fn the_worst_case_for_two_windows_and_how_sub_windows_shrink_it() {
        // The same 1,000 requests, spread over a whole period: 10ms apart from 5s before the
        // boundary to 5s after. All of them fall within one 10s span.
        fn run<const N: usize>() -> u64 {
            let mut w = SlidingWindow::<N>::new(ten_seconds());
            (0..1_000u64)
                .filter(|i| admit(&mut w, at_ms(5_000 + 10 * i), 100))
                .count() as u64
        }
        // Two windows: the 100 admitted in the first second sit at the end of the previous
        // window, but are assumed spread evenly over it, so 50 more get in by the end: 1.5×.
        let two = run::<2>();
        let eleven = run::<11>();
        println!("admitted of 1,000 over one period, limit 100: N=2: {two}, N=11: {eleven}");
        assert!((140..=151).contains(&two), "{two}");
        // Ten 1s sub-windows: the early 100 stay counted in full until their own second has
        // slid out, so the span sees the limit and barely more.
        assert!(eleven <= 101, "{eleven}");
        // A fixed window would have admitted 200.
    }

    #[test]
    fn steady_traffic_is_counted_exactly() {
        // 20 events per second, for a minute, against a 10s window: always 200 once warm.
        let mut w = SlidingWindow::<2>::new(ten_seconds());
        for i in 0..1_200u64 {
            let now = at_ms(50 * i);
            w.add(now, 1);
            if i >= 400 {
                let r = w.rate(now);
                assert!((199..=201).contains(&r), "at {now}: {r}");
            }
        }
    }

    #[test]
    fn accuracy_stays_within_the_documented_bound() {
        // Irregular traffic from a fixed pseudo-random sequence; at every step compare the
        // estimate with the true count over (t - 10s, t] and check the documented bound
        // |rate - true| <= oldest sub-window count (+1 for rounding down).
        fn check<const N: usize>() {
            let period = ten_seconds();
            let width = period.as_nanos() / (N as u64 - 1);
            let mut w = SlidingWindow::<N>::new(period);
            let mut events: Vec<(u64, u64)> = Vec::new();
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut now = 0u64;
            for _ in 0..5_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                now += seed % 40_000_000; // up to 40ms apart, bursty
                let n = 1 + (seed >> 40) % 5;
                w.add(Moment::from_nanos(now), n);
                events.push((now, n));

                let truth: u64 = events
                    .iter()
                    .filter(|(t, _)| *t + period.as_nanos() > now)
                    .map(|(_, n)| n)
                    .sum();
                let pos = now / width;
                let oldest_start = (pos + 1).saturating_sub(N as u64) * width;
                let oldest: u64 = events
                    .iter()
                    .filter(|(t, _)| *t >= oldest_start && *t < oldest_start + width)
                    .map(|(_, n)| n)
                    .sum();
                let est = w.rate(Moment::from_nanos(now));
                assert!(
                    est.abs_diff(truth) <= oldest + 1,
                    "N={N} t={now}: est {est}, true {truth}, oldest {oldest}"
                );
            }
        }
        check::<2>();
        check::<11>();
    }

    #[test]
    fn a_slightly_late_moment_still_counts() {
        // Thread A reads the clock at 9.999s, thread B at 10.001s; B takes the lock first.
        let mut w = SlidingWindow::<2>::new(ten_seconds());
        w.add(at_ms(10_001), 1);
        w.add(at_ms(9_999), 1);
        assert_eq!(w.rate(at_ms(10_001)), 2);
        // Asking about the past does not panic or wrap either.
        assert_eq!(w.rate(at_ms(1)), 2);
    }

    #[test]
    fn a_long_idle_window_restarts_instead_of_reading_stale_counts() {
        // With 1ms windows, 25 days is more than 2^31 sub-windows: far ahead, not "late".
        let mut w = SlidingWindow::<2>::new(Period::parse("1ms").unwrap());
        w.add(Moment::ZERO, 5);
        let later = Moment::ZERO + Duration::from_secs(25 * 86_400);
        w.add(later, 1);
        assert_eq!(w.rate(later), 1);
    }

    #[test]
    fn counts_saturate_and_long_gaps_reset() {
        let mut s = WindowState::<u32, 2>::default();
        let p = ten_seconds();
        s.add(p, at_ms(0), u64::MAX);
        s.add(p, at_ms(1), 5);
        assert_eq!(s.rate(p, at_ms(1)), u64::from(u32::MAX));

        let mut w = SlidingWindow::<2>::new(p);
        w.add(Moment::ZERO, u64::MAX);
        w.add(Moment::ZERO, u64::MAX);
        assert_eq!(w.rate(Moment::ZERO), u64::MAX);
        // A year later (and at the end of time) the window is empty, not garbage.
        let year = Moment::ZERO + Duration::from_secs(365 * 86_400);
        assert_eq!(w.rate(year), 0);
        w.add(Moment::MAX, 3);
        assert_eq!(w.rate(Moment::MAX), 3);
    }
}
