//! What is known about one client connection, fixed when it is accepted: the peer, the
//! listener and its canonicalization rules, TLS and the client certificate, what the
//! request-smuggling guard saw, and the per-connection memo. Every stage of the request path
//! reads it; it depends on none of them.

use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::Arc;

/// What is known about the client connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    pub tls: bool,
    /// The listener's canonicalization rules.
    pub rules: Arc<crate::edge::canon::Rules>,
    /// The verified client certificate (DER), when the listener asked for one.
    pub client_cert: Option<Arc<Vec<u8>>>,
    /// What the request-smuggling guard saw on this connection.
    pub smuggle: Arc<crate::edge::smuggle::Flags>,
    /// The peer's address as a header value, formatted once per connection.
    pub peer_ip: HeaderValue,
    /// The last bearer token on this connection and what it was found to be.
    pub memo: crate::memo::Memo,
    /// The peer's address as a limits key (`src`), made at the first request that needs it.
    ip_key: std::sync::OnceLock<portcullis_limits::Key>,
    /// The key a public route's plan counts the peer under, made at the first request that
    /// needs it (see [`crate::limits::anonymous_caller`]).
    caller_key: std::sync::OnceLock<portcullis_limits::Key>,
    /// How long the client may leave its request body waiting (`timeouts.client_body`).
    pub body_timeout: std::time::Duration,
    /// The responses in flight, which the idle timer watches (see `edge::sending`).
    pub sending: Arc<crate::edge::sending::Sending>,
    /// The listener's: its tunnels, and the end of its grace period.
    pub life: Arc<Life>,
    /// What the connection counts for in its listener (`max_connections`, the active
    /// connections gauge), released when the connection ends; a tunnel the connection
    /// becomes takes it, and releases it when the tunnel ends.
    pub held: parking_lot::Mutex<Option<Box<dyn Send>>>,
}

/// What a listener's connections and tunnels last as long as. When the listener stops
/// (shutdown, or a reload that removes or moves it), its connections are asked to finish and
/// its tunnels (WebSocket and other upgrades, which outlive their connection's task) are
/// waited for, up to `shutdown_grace`; then `end` is cancelled and everything still open is
/// closed.
#[derive(Default)]
pub struct Life {
    pub tunnels: tokio_util::task::TaskTracker,
    pub end: tokio_util::sync::CancellationToken,
}

impl ConnInfo {
    /// The peer's address as a limits key: what a `src` table counts the client under,
    /// hashed once per connection instead of once per request.
    pub fn ip_key(&self) -> &portcullis_limits::Key {
        self.ip_key
            .get_or_init(|| portcullis_limits::Key::from(self.peer.ip()))
    }

    /// The peer as a plan's caller on a public route: its address, or its /64 for IPv6
    /// ([`crate::limits::anonymous_caller`]).
    pub fn caller_key(&self) -> &portcullis_limits::Key {
        self.caller_key.get_or_init(|| {
            portcullis_limits::Key::from(crate::limits::anonymous_caller(self.peer.ip()))
        })
    }

    pub fn new(
        peer: SocketAddr,
        listener: Arc<str>,
        tls: bool,
        rules: Arc<crate::edge::canon::Rules>,
        client_cert: Option<Arc<Vec<u8>>>,
        smuggle: Arc<crate::edge::smuggle::Flags>,
    ) -> Self {
        // An IPv4 client of a dual-stack listener (`[::]`) arrives as `::ffff:a.b.c.d`: it is
        // its IPv4 address for everything (limits keys and prefixes, trusted proxies, the
        // forwarded headers, policy and logs), as a client of an IPv4 listener would be.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            listener,
            tls,
            rules,
            client_cert,
            smuggle,
            peer_ip,
            memo: Default::default(),
            ip_key: std::sync::OnceLock::new(),
            caller_key: std::sync::OnceLock::new(),
            body_timeout: std::time::Duration::from_secs(30),
            held: parking_lot::Mutex::new(None),
            sending: Arc::default(),
            life: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo::new(
            peer.parse().unwrap(),
            "web".into(),
            false,
            Arc::new(crate::edge::canon::Rules::default()),
            None,
            Arc::default(),
        )
    }

    /// An IPv4 client seen through a dual-stack listener is its IPv4 address: two such
    /// clients are two limits keys (not one `::/64`), and the origin is told the IPv4 form.
    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_address() {
        let a = conn("[::ffff:192.0.2.7]:4000");
        let b = conn("[::ffff:198.51.100.9]:4000");
        assert_eq!(a.peer, "192.0.2.7:4000".parse().unwrap());
        assert_eq!(a.peer_ip, "192.0.2.7");
        assert_ne!(a.ip_key(), b.ip_key());
        assert_eq!(a.ip_key(), conn("192.0.2.7:5000").ip_key());
        // Real IPv6 stays as it is.
        assert_eq!(conn("[2001:db8::1]:1").peer.ip().to_string(), "2001:db8::1");
    }

    /// A public route's plan counts an IPv6 client by its /64 (one host picks any address
    /// of it for each request), an IPv4 client by its address; `src` tables by the address.
    #[test]
    fn a_plan_counts_an_ipv6_caller_by_its_64() {
        let a = conn("[2001:db8:1:2::1]:1");
        let b = conn("[2001:db8:1:2:ffff:ffff:ffff:ffff]:1");
        let other = conn("[2001:db8:1:3::1]:1");
        assert_eq!(a.caller_key(), b.caller_key());
        assert_ne!(a.caller_key(), other.caller_key());
        assert_ne!(a.ip_key(), b.ip_key());
        assert_eq!(
            a.caller_key(),
            &portcullis_limits::Key::from("2001:db8:1:2::".parse::<std::net::IpAddr>().unwrap())
        );
        let v4 = conn("[::ffff:192.0.2.7]:4000");
        assert_eq!(v4.caller_key(), v4.ip_key());
        assert_ne!(v4.caller_key(), conn("192.0.2.8:1").caller_key());
    }
}
