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
    /// How long the client may leave its request body waiting (`timeouts.client_body`).
    pub body_timeout: std::time::Duration,
    /// The responses in flight, which the idle timer watches (see `edge::sending`).
    pub sending: Arc<crate::edge::sending::Sending>,
}

impl ConnInfo {
    /// The peer's address as a limits key: what a `src` table and a public route's plan
    /// count the client under, hashed once per connection instead of once per request.
    pub fn ip_key(&self) -> &portcullis_limits::Key {
        self.ip_key
            .get_or_init(|| portcullis_limits::Key::from(self.peer.ip()))
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
            body_timeout: std::time::Duration::from_secs(30),
            sending: Arc::default(),
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
}
