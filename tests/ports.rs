//! Loopback ports for the servers the tests start (portcullis itself, an OpenID Provider,
//! Redis, NATS), shared by the test crates with `#[path]`.
//!
//! Tests start several processes at once, and stop and restart servers on the port they
//! had. A port from `bind(0)` is an ephemeral one, from the range the kernel also takes the
//! local ports of outgoing connections from: between a probe and the server's bind, or
//! while a server is stopped, any client connection of the test could take it, or another
//! probe be handed it again, and the server would then fail to bind (or a readiness probe be
//! answered by another process). So a port is chosen at random below the ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), where neither happens, checked free by
//! binding it, and never handed out twice by one test binary.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::Mutex;

/// A free loopback port, outside the kernel's ephemeral range where it can be.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = below_ephemeral();
    for attempt in 0.. {
        let port = if high > low && attempt < 1000 {
            let r = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            low + (r % u64::from(high - low)) as u16
        } else {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    unreachable!()
}

/// The ports from 10000 up to the kernel's ephemeral range (empty when there is no room).
fn below_ephemeral() -> (u16, u16) {
    let lo: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    (10_000, lo.max(10_000))
}
