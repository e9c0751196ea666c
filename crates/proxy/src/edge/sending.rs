//! The responses a client connection is sending, and whether the client takes them: a client
//! that leaves a response waiting (an HTTP/2 stream window of 0, a socket it does not read)
//! while it keeps the connection busy otherwise (answering pings, trickling bytes) would hold
//! the response's upstream connection, and its `max_connections` slot, for as long as it
//! likes. The connection's idle timer asks [`Sending::stalled`] at each of its ticks, and
//! closes the connection once a response has waited on the client for the idle timeout, as
//! nginx's `send_timeout` and Envoy's stream idle timeout do.
//!
//! A response counts as waiting on the client from when it is handed to the connection, and
//! from each frame it gives out, until the connection asks it for more. A response that waits
//! on its origin (asked, with nothing yet) waits on no one's client.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};

/// One connection's responses in flight.
#[derive(Default)]
pub struct Sending {
    list: Mutex<Vec<Weak<Progress>>>,
}

/// One response's progress, shared by its body and the connection's list.
#[derive(Default)]
pub struct Progress {
    /// The connection asked the body for a frame since the last tick.
    asked: AtomicBool,
    /// The body gave out a frame (or was handed to the connection) and waits to be asked
    /// again.
    waiting: AtomicBool,
    /// Ticks in a row it waited unasked.
    quiet: AtomicU32,
}

impl Sending {
    /// Watches a response handed to the connection (waiting on the client from now).
    pub fn watch(&self) -> Arc<Progress> {
        let p = Arc::new(Progress {
            waiting: AtomicBool::new(true),
            ..Progress::default()
        });
        let mut list = self.list.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&p));
        p
    }

    /// One tick of the idle timer: whether a response has waited on the client, unasked, for
    /// `ticks` ticks in a row.
    pub fn stalled(&self, ticks: u32) -> bool {
        let list = self.list.lock();
        let mut stalled = false;
        for p in list.iter().filter_map(Weak::upgrade) {
            if p.asked.swap(false, Ordering::Relaxed) || !p.waiting.load(Ordering::Relaxed) {
                p.quiet.store(0, Ordering::Relaxed);
            } else if p.quiet.fetch_add(1, Ordering::Relaxed) + 1 >= ticks {
                stalled = true;
            }
        }
        stalled
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_stalls_only_while_it_waits_on_the_client_unasked() {
        let s = Sending::default();
        let p = s.watch();
        // Handed over and never asked for: stalled after 3 ticks.
        assert!(!s.stalled(3));
        assert!(!s.stalled(3));
        assert!(s.stalled(3));
        // Asked (and waiting on its origin): never stalled.
        p.asked();
        for _ in 0..10 {
            assert!(!s.stalled(3));
        }
        // It gave a frame, and is asked again within each tick: never stalled.
        for _ in 0..10 {
            p.gave();
            p.asked();
            p.gave();
            assert!(!s.stalled(3));
        }
        // Gave a frame, then nothing asked for it.
        assert!(!s.stalled(3));
        assert!(!s.stalled(3));
        assert!(s.stalled(3));
        // A finished response is forgotten.
        drop(p);
        assert!(!s.stalled(1));
        let _q = s.watch();
        assert_eq!(s.list.lock().len(), 1);
    }
}
