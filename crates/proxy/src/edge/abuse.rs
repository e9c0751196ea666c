//! Client addresses that abused HTTP/2, and how fast they may connect again.
//!
//! When h2 closes a connection with `GOAWAY` `ENHANCE_YOUR_CALM` (too many streams reset
//! before they were served, a CONTINUATION or empty-DATA flood, an HPACK bomb, too many
//! resets the proxy had to send), the connection is gone, but an attacker reconnects at once
//! and starts again: on loopback, hundreds of times a second, each new connection costing
//! the proxy an accept, a handshake and the frames it reads before it refuses again. So the
//! address is flagged for [`PENALTY`], and while it is, its new connections (of any
//! protocol) are paced: each waits its turn, one every [`PACE`], before the proxy reads a
//! byte of it; one that would wait more than [`MAX_WAIT`] is closed at once. Connections
//! already open are not touched, and an address that behaves is never slowed.
//!
//! An IPv6 address counts by its /64, the block one host or one customer usually has, so an
//! attacker cannot step around the pace by moving within it.
//!
//! Like HAProxy's glitch counters with a `tarpit`, this trades a little latency for the
//! honest clients that share an abuser's address (behind one NAT) for most of the abuser's
//! cost. Bounded: at most [`MAX_FLAGGED`] addresses; when full, expired ones are dropped,
//! and if none has expired a new one is not flagged (the pacing is a cost cut, not a
//! security boundary: the h2 limits themselves still hold on every connection).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long an address stays flagged after its last abuse.
pub const PENALTY: Duration = Duration::from_secs(10);
/// One new connection per this, per flagged address.
pub const PACE: Duration = Duration::from_millis(100);
/// A new connection that would wait longer than this is closed.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// Addresses flagged at once, at most.
pub const MAX_FLAGGED: usize = 10_000;

/// What to do with a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Serve it.
    Now,
    /// Serve it after this wait.
    After(Duration),
    /// Close it: too many wait already.
    Refuse,
}

#[derive(Default)]
pub struct Abusers {
    flagged: Mutex<HashMap<IpAddr, Flag>>,
}

struct Flag {
    until: Instant,
    /// When the next new connection may start.
    next: Instant,
}

/// The address an abuser is known by: an IPv4 address, or an IPv6 address's /64.
fn block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Abusers {
    /// `ip`'s connection was closed for abuse at `now`.
    pub fn flag(&self, ip: IpAddr, now: Instant) {
        let ip = block(ip);
        let mut m = self.flagged.lock();
        if m.len() >= MAX_FLAGGED && !m.contains_key(&ip) {
            m.retain(|_, f| f.until > now);
            if m.len() >= MAX_FLAGGED {
                return;
            }
        }
        let f = m.entry(ip).or_insert(Flag {
            until: now,
            next: now,
        });
        f.until = now + PENALTY;
    }

    /// Whether a new connection from `ip`, at `now`, is served now, later, or not.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Admit {
        let mut m = self.flagged.lock();
        if m.is_empty() {
            return Admit::Now;
        }
        let ip = block(ip);
        let Some(f) = m.get_mut(&ip) else {
            return Admit::Now;
        };
        if f.until <= now {
            m.remove(&ip);
            return Admit::Now;
        }
        let at = f.next.max(now);
        let wait = at - now;
        if wait > MAX_WAIT {
            return Admit::Refuse;
        }
        f.next = at + PACE;
        if wait.is_zero() {
            Admit::Now
        } else {
            Admit::After(wait)
        }
    }

    /// Addresses flagged now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.flagged.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a connection's error is h2's `GOAWAY` `ENHANCE_YOUR_CALM`, sent by the proxy.
pub fn is_abuse(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && h2.is_library()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn a_flagged_address_connects_once_per_pace_until_its_penalty_ends() {
        let a = Abusers::default();
        let t0 = Instant::now();
        assert_eq!(a.admit(ip(1), t0), Admit::Now);
        a.flag(ip(1), t0);
        assert_eq!(a.admit(ip(1), t0), Admit::Now, "the first goes at once");
        assert_eq!(a.admit(ip(1), t0), Admit::After(PACE));
        assert_eq!(a.admit(ip(1), t0), Admit::After(PACE * 2));
        assert_eq!(a.admit(ip(2), t0), Admit::Now, "others are not slowed");
        // A queue longer than MAX_WAIT is refused, and does not move the queue.
        let mut last = Admit::Now;
        for _ in 0..30 {
            last = a.admit(ip(1), t0);
        }
        assert_eq!(last, Admit::Refuse);
        // Later, the pace resumes from then; after the penalty, nothing waits.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(a.admit(ip(1), later), Admit::Now);
        assert_eq!(a.admit(ip(1), later), Admit::After(PACE));
        assert_eq!(a.admit(ip(1), t0 + PENALTY), Admit::Now);
        assert!(a.is_empty(), "an expired flag is dropped");
    }

    #[test]
    fn an_ipv6_abuser_is_known_by_its_64() {
        let a = Abusers::default();
        let t0 = Instant::now();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        a.flag(v6("2001:db8:1:2::7"), t0);
        assert_eq!(a.admit(v6("2001:db8:1:2::7"), t0), Admit::Now);
        assert_eq!(
            a.admit(v6("2001:db8:1:2:ffff::1"), t0),
            Admit::After(PACE),
            "the same /64"
        );
        assert_eq!(
            a.admit(v6("2001:db8:1:3::7"), t0),
            Admit::Now,
            "another /64"
        );
        // An IPv4-mapped address is its IPv4 address.
        a.flag(ip(5), t0);
        a.admit(ip(5), t0);
        assert_eq!(a.admit(v6("::ffff:192.0.2.5"), t0), Admit::After(PACE));
    }

    #[test]
    fn flags_are_bounded() {
        let a = Abusers::default();
        let t0 = Instant::now();
        for i in 0..MAX_FLAGGED as u32 {
            a.flag(IpAddr::from(i.to_be_bytes()), t0);
        }
        a.flag(ip(9), t0);
        assert_eq!(a.len(), MAX_FLAGGED, "full: a new address is not flagged");
        a.flag(ip(9), t0 + PENALTY);
        assert_eq!(a.len(), 1, "the expired ones made room");
    }

    #[test]
    fn only_the_proxys_enhance_your_calm_counts() {
        let calm = h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM);
        // A reason alone (as a peer's RST_STREAM reads) is not a GOAWAY the proxy sent.
        assert!(!is_abuse(&calm));
        let io = std::io::Error::other("reset");
        assert!(!is_abuse(&io));
    }
}
