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
        }
    }
}
