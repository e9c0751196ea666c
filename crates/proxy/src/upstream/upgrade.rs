//! HTTP/1.1 upgrades (tunnels). Once an origin answers 101, portcullis no longer sees the
//! requests that flow through the connection, so a tunnel opens only when:
//!
//! - the client asked for a protocol that the route allows (`upgrades`, default
//!   `[websocket]`; `h2c` never, since an h2c tunnel would carry requests for any host and
//!   path past routing and policy, the h2c smuggling attack);
//! - the 101 names one of the protocols asked for;
//! - for WebSocket, the 101's `Sec-WebSocket-Accept` matches the client's key (RFC 6455
//!   §4.2.2), which proves that the origin speaks WebSocket and is not a server that answers
//!   101 to anything.
//!
//! Any other 101 gets 502 (see `forward`). A request that asks only for protocols the route
//! does not allow is forwarded as an ordinary request, without `Upgrade`.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::Version;
use sha1::{Digest, Sha1};

static SEC_WEBSOCKET_KEY: header::HeaderName = header::SEC_WEBSOCKET_KEY;

/// An upgrade that the client asked for and the route allows.
#[derive(Debug)]
pub struct Upgrade {
    /// The `Upgrade` value sent to the origin: the allowed protocols, in the client's order.
    pub protocols: HeaderValue,
    /// Their names (before any `/version`), lower-case.
    names: Vec<String>,
    /// The client's `Sec-WebSocket-Key`, when WebSocket is among them.
    websocket_key: Option<HeaderValue>,
}

/// The upgrade a request asks for, limited to the protocols in `allowed` (lower-case names,
/// or `name/version`). None when it asks for none, or for none that is allowed.
pub fn requested(version: Version, headers: &HeaderMap, allowed: &[String]) -> Option<Upgrade> {
    if version != Version::HTTP_11 {
        return None;
    }
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let websocket_key = headers.get(&SEC_WEBSOCKET_KEY).cloned();
    let mut kept: Vec<&str> = Vec::new();
    let mut names = Vec::new();
    for v in headers.get_all(header::UPGRADE) {
        let Ok(v) = v.to_str() else { continue };
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = p.to_ascii_lowercase();
            let name = lower.split('/').next().unwrap_or("").to_string();
            let ok = allowed.iter().any(|a| *a == lower || *a == name)
                && name != "h2c"
                && (name != "websocket" || websocket_key.is_some());
            if ok {
                kept.push(p);
                names.push(name);
            }
        }
    }
    if kept.is_empty() {
        return None;
    }
    let protocols = HeaderValue::from_str(&kept.join(", ")).ok()?;
    let websocket_key = websocket_key.filter(|_| names.iter().any(|n| n == "websocket"));
    Some(Upgrade {
        protocols,
        names,
        websocket_key,
    })
}

impl Upgrade {
    /// Whether an origin's 101 (its headers) may open the tunnel.
    pub fn accepts(&self, resp: &HeaderMap) -> bool {
        let mut upgrades = resp.get_all(header::UPGRADE).iter();
        let (Some(v), None) = (upgrades.next(), upgrades.next()) else {
            return false;
        };
        let Ok(v) = v.to_str() else { return false };
        let chosen = v.trim().to_ascii_lowercase();
        let name = chosen.split('/').next().unwrap_or("");
        if chosen.contains(',') || !self.names.iter().any(|n| n == name) {
            return false;
        }
        if name != "websocket" {
            return true;
        }
        match (&self.websocket_key, resp.get(header::SEC_WEBSOCKET_ACCEPT)) {
            (Some(key), Some(accept)) => accept.as_bytes() == websocket_accept(key).as_bytes(),
            _ => false,
        }
    }
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
fn websocket_accept(key: &HeaderValue) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn ws() -> Vec<String> {
        vec!["websocket".into()]
    }

    #[test]
    fn the_rfc_example_accept_is_computed() {
        assert_eq!(websocket_accept(&HeaderValue::from_static(KEY)), ACCEPT);
    }

    #[test]
    fn only_allowed_protocols_are_asked_for() {
        let h = req(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", KEY),
        ]);
        let u = requested(Version::HTTP_11, &h, &ws()).unwrap();
        assert_eq!(u.protocols, "WebSocket");
        assert!(requested(Version::HTTP_10, &h, &ws()).is_none());
        assert!(requested(Version::HTTP_11, &h, &[]).is_none());
        // h2c never, even when listed.
        let h2c = req(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested(Version::HTTP_11, &h2c, &["h2c".into()]).is_none());
        // Unknown protocols are dropped; an allowed one in the same list is kept.
        let mixed = req(&[("connection", "upgrade"), ("upgrade", "foo/1, h2c, bar")]);
        assert!(requested(Version::HTTP_11, &mixed, &ws()).is_none());
        let u = requested(Version::HTTP_11, &mixed, &["bar".into()]).unwrap();
        assert_eq!(u.protocols, "bar");
        // No Connection: upgrade, no upgrade.
        let bare = req(&[("upgrade", "websocket"), ("sec-websocket-key", KEY)]);
        assert!(requested(Version::HTTP_11, &bare, &ws()).is_none());
        // WebSocket without a key is no WebSocket handshake.
        let nokey = req(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(requested(Version::HTTP_11, &nokey, &ws()).is_none());
    }

    #[test]
    fn a_101_must_match_what_was_asked() {
        let h = req(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", KEY),
        ]);
        let u = requested(Version::HTTP_11, &h, &ws()).unwrap();
        assert!(u.accepts(&req(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", ACCEPT)
        ])));
        assert!(!u.accepts(&req(&[("upgrade", "websocket")])));
        assert!(!u.accepts(&req(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        ])));
        assert!(!u.accepts(&req(&[
            ("upgrade", "h2c"),
            ("sec-websocket-accept", ACCEPT)
        ])));
        assert!(!u.accepts(&req(&[("sec-websocket-accept", ACCEPT)])));
        assert!(!u.accepts(&req(&[
            ("upgrade", "websocket, h2c"),
            ("sec-websocket-accept", ACCEPT)
        ])));
        let other = requested(
            Version::HTTP_11,
            &req(&[("connection", "upgrade"), ("upgrade", "foo/1")]),
            &["foo".into()],
        )
        .unwrap();
        assert!(other.accepts(&req(&[("upgrade", "foo/1")])));
        assert!(!other.accepts(&req(&[("upgrade", "bar")])));
    }
}
