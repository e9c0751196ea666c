//! The upstream request head, built in one place. In order:
//!
//! 1. hop-by-hop headers are removed (`strip_hop_by_hop`, called by the route phase before
//!    identify adds anything, so `Connection` can never name a header portcullis sets);
//! 2. identify and authorize add the identity headers, the assertion and an authorizer's
//!    context (their phases);
//! 3. [`build`] removes portcullis's own cookies and `Expect`, sets the allowed upgrade, the
//!    forwarded headers (`X-Forwarded-For`/`-Proto`/`-Host`, trusted only from trusted
//!    proxies), the request id, and the canonical `Host` (or the h2 URI).

use crate::exchange::{Exchange, Refused, X_REQUEST_ID};
use crate::snapshot::BackendRt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
        || n == header::PROXY_AUTHENTICATE
        || n == header::PROXY_AUTHORIZATION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    // Fast path: one pass over the names, no hashing; most messages carry none.
    if !h.keys().any(is_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let te_trailers = keep_te_trailers
        && h.get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The head sent upstream: its headers, and for an h2 backend the request URI.
pub struct Head {
    pub headers: HeaderMap,
    pub h2_uri: Option<Uri>,
}

/// Finishes the upstream head from the request's headers (taken out of the exchange). `pq`
/// is the origin's request target.
pub fn build(x: &mut Exchange<'_>, backend: &BackendRt, pq: &str) -> Result<Head, Refused> {
    let (conn, trusted) = (x.conn, x.trusted);
    let mut headers = std::mem::take(&mut x.parts.headers);
    crate::phase::identify::credentials::strip_own_cookies(x.snap, &mut headers);
    headers.remove(header::EXPECT);
    if let Some(u) = &x.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.protocols.clone());
    }
    if !trusted {
        // Other ways of claiming a client address are only believed from trusted proxies.
        headers.remove(header::FORWARDED);
        headers.remove(HeaderName::from_static("x-real-ip"));
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        _ => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    let authority = x.authority();
    let keep_forwarded_host = trusted && headers.contains_key(&X_FORWARDED_HOST);
    if let (Some(a), false) = (authority, keep_forwarded_host) {
        headers.insert(X_FORWARDED_HOST.clone(), a.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), x.rid.0.clone());
    let authority = match (&backend.host, authority) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.clone(),
        (None, None) => HeaderValue::from_static("localhost"),
    };
    // HTTP/1.1 upstreams get the origin-form target (`pq`) written as is; h2 needs a URI.
    if backend.connector.protocol != portcullis_config::Protocol::Http2 {
        headers.insert(header::HOST, authority);
        return Ok(Head {
            headers,
            h2_uri: None,
        });
    }
    headers.remove(header::HOST);
    let scheme = if backend.connector.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!(
        "{scheme}://{}{pq}",
        authority.to_str().unwrap_or("localhost")
    );
    match uri.parse() {
        Ok(u) => Ok(Head {
            headers,
            h2_uri: Some(u),
        }),
        Err(_) => Err((StatusCode::BAD_REQUEST, "invalid request target\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-secret-hop").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-kept").is_some());
    }
}
