//! The responses a client connection is sending, and whether the client takes them: a client
//! that leaves a response waiting (an HTTP/2 stream window of 0, a socket it does not read)
//! while it keeps the connection busy otherwise (answering pings, reading other streams)
//! would hold the response's upstream connection, and its `max_connections` slot, for as
//! long as it liked. The connection's idle timer calls [`Sending::cut_stalled`] at each of
//! its ticks, which cuts a response that has waited on the client for the idle timeout: its
//! upstream side is dropped at once (the origin connection closed, the slot freed), and the
//! client's stream ends with an error when it is next asked for (HTTP/2: a reset of that
//! stream alone). Like HAProxy's `timeout client` on a blocked stream, or nginx's
//! `send_timeout`.
//!
//! A response counts as waiting on the client from when it is handed to the connection, and
//! from each frame it gives out, until the connection asks it for more. A response that waits
//! on its origin (asked, with nothing yet) waits on no one's client.
//!
//! The same list carries, for an HTTP/2 connection, what `frame_budget` follows of its streams
//! ([`Streams`]): the idle timer reads it at each tick too.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Weak;

/// What the connection's idle timer learns of an h2 connection from its frames, as
/// `frame_budget` follows them. Kept in the connection's [`Sending`], which the timer already
/// holds.
#[derive(Debug, Default)]
pub struct Streams {
    /// Set once the client's preface has passed: the idle timer goes by frames from then on.
    pub(crate) h2: AtomicBool,
    /// A HEADERS, DATA or RST_STREAM frame passed, either way, since the timer last looked.
    moved: AtomicBool,
    /// Requests in flight.
    pub(crate) in_flight: AtomicU32,
}

/// What the idle timer finds at one of its ticks on an h2 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// A HEADERS, DATA or RST_STREAM frame passed since the last tick.
    pub moved: bool,
    /// A request is in flight.
    pub in_flight: bool,
}

impl Streams {
    /// One tick of the idle timer: `None` until the connection is known to be h2 (bytes are
    /// what counts then), else what its frames did since the last tick.
    pub fn tick(&self) -> Option<Tick> {
        if !self.h2.load(Ordering::Relaxed) {
            return None;
        }
        Some(Tick {
            moved: self.moved.swap(false, Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed) > 0,
        })
    }

    /// A HEADERS, DATA or RST_STREAM frame passed.
    pub(crate) fn moved(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }
}

/// A response the connection watches.
pub trait Watched: Send + Sync {
    fn progress(&self) -> &Progress;
    /// Drops the response's upstream side: it waited on the client too long.
    fn cut(&self);
}

/// One connection's responses in flight.
#[derive(Default)]
pub struct Sending {
    list: Mutex<Vec<Weak<dyn Watched>>>,
    /// HTTP/2 only: the requests in flight and the frames that moved (see `frame_budget`).
    pub streams: Streams,
}

/// One response's progress, shared by its body and the connection's list.
pub struct Progress {
    /// The connection asked the body for a frame since the last tick.
    asked: AtomicBool,
    /// The body gave out a frame (or was handed to the connection) and waits to be asked
    /// again.
    waiting: AtomicBool,
    /// Ticks in a row it waited unasked.
    quiet: AtomicU32,
}

impl Default for Progress {
    /// Handed to the connection: waiting on the client from now.
    fn default() -> Self {
        Progress {
            asked: AtomicBool::new(false),
            waiting: AtomicBool::new(true),
            quiet: AtomicU32::new(0),
        }
    }
}

impl Sending {
    /// Watches a response handed to the connection.
    pub fn watch(&self, w: Weak<dyn Watched>) {
        let mut list = self.list.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(w);
    }

    /// One tick of the idle timer: cuts each response that has waited on the client,
    /// unasked, for `ticks` ticks in a row, and returns how many.
    pub fn cut_stalled(&self, ticks: u32) -> usize {
        let stalled: Vec<_> = {
            let mut list = self.list.lock();
            list.retain(|w| w.strong_count() > 0);
            list.iter()
                .filter_map(Weak::upgrade)
                .filter(|w| w.progress().tick(ticks))
                .collect()
        };
        // Outside the list's lock: cutting drops the upstream side.
        for w in &stalled {
            w.cut();
        }
        stalled.len()
    }
}

impl Progress {
    /// The connection asks the body for a frame.
    pub fn asked(&self) {
        self.asked.store(true, Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// The body gave out a frame and has more to come.
    pub fn gave(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// One tick: whether it has now waited unasked for `ticks` ticks in a row.
    fn tick(&self, ticks: u32) -> bool {
        if self.asked.swap(false, Ordering::Relaxed) || !self.waiting.load(Ordering::Relaxed) {
            self.quiet.store(0, Ordering::Relaxed);
            return false;
        }
        self.quiet.fetch_add(1, Ordering::Relaxed) + 1 >= ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[derive(Default)]
    struct Response {
        progress: Progress,
        cuts: AtomicUsize,
    }

    impl Watched for Response {
        fn progress(&self) -> &Progress {
            &self.progress
        }
        fn cut(&self) {
            self.cuts.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_response_is_cut_only_while_it_waits_on_the_client_unasked() {
        let s = Sending::default();
        let r = Arc::new(Response::default());
        let other = Arc::new(Response::default());
        s.watch(Arc::downgrade(&r) as Weak<dyn Watched>);
        s.watch(Arc::downgrade(&other) as Weak<dyn Watched>);
        // Handed over and never asked for: cut after 3 ticks; the other, asked at every
        // tick (a stream the client reads), is not.
        for _ in 0..2 {
            other.progress.asked();
            assert_eq!(s.cut_stalled(3), 0);
        }
        other.progress.asked();
        assert_eq!(s.cut_stalled(3), 1);
        assert_eq!(r.cuts.load(Ordering::Relaxed), 1);
        assert_eq!(other.cuts.load(Ordering::Relaxed), 0);
        // Asked (and waiting on its origin): never cut.
        r.progress.asked();
        for _ in 0..10 {
            assert_eq!(s.cut_stalled(3), 0);
        }
        // It gave a frame, and is asked again within each tick: never cut.
        for _ in 0..10 {
            r.progress.gave();
            r.progress.asked();
            r.progress.gave();
            assert_eq!(s.cut_stalled(3), 0);
        }
        // A finished response is forgotten.
        drop(r);
        drop(other);
        assert_eq!(s.cut_stalled(1), 0);
        assert!(s.list.lock().is_empty());
    }
}
