//! The upstream request head, built in one place. In order:
//!
//! 1. hop-by-hop headers are removed (`strip_hop_by_hop`, called by the route phase before
//!    identify adds anything, so `Connection` can never name a header portcullis sets);
//! 2. identify adds the identity headers, the assertion and a passed-on token
//!    ([`identity`]), and authorize an authorizer's context;
//! 3. [`build`] removes portcullis's own cookies, the path-override headers
//!    (`X-Original-URL`, `X-Rewrite-URL`) and `Expect`, sets the allowed upgrade, the
//!    forwarded headers (`X-Forwarded-For`/`-Proto`/`-Host`, trusted only from trusted
//!    proxies), the request id, and the canonical `Host` (or the h2 URI).

use crate::exchange::{Exchange, Refused, X_REQUEST_ID};
use crate::snapshot::{BackendRt, RouteRt, Snapshot, ASSERTION_HEADER};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use portcullis_config::UnderscoresInHeaders;
use portcullis_identity::{template, Identity};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Headers in which CDNs and load balancers tell the origin the client's address. Only a
/// trusted proxy may send them; from anyone else they would be a client naming its own
/// address to an origin that trusts it.
static CLIENT_IP_CLAIMS: [HeaderName; 6] = [
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
];
/// Other headers by which origins (Rails, IIS, Werkzeug, Tornado) believe a request came over
/// TLS. (Owned fields as well, `portcullis_config::FORWARDED_FIELDS`, so that their CGI
/// spellings and trailers go too.)
static SCHEME_CLAIMS: [HeaderName; 3] = [
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("x-scheme"),
];
/// Headers with which some origins (IIS URL Rewrite, Symfony, Zend) serve another path than the
/// request line's: `GET /` with `X-Original-URL: /admin` would be routed and authorized as `/`
/// and served as `/admin`. No client may send them through portcullis.
static PATH_OVERRIDES: [HeaderName; 2] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];
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

/// The cookie that holds a browser login in progress (sealed; its path is `/.portcullis/`).
pub const PREAUTH_COOKIE: &str = "portcullis_auth";
/// The console's cookies: its grant, and a console login in progress. The admin listener is
/// another port of the same host, and browsers send a host's cookies to every port of it.
pub const CONSOLE_COOKIE: &str = "portcullis_admin";
pub const CONSOLE_PREAUTH_COOKIE: &str = "portcullis_admin_login";
/// The cookies portcullis sets and reads itself, besides the session cookie (whose name is
/// configured).
pub const OWN_COOKIES: [&str; 3] = [PREAUTH_COOKIE, CONSOLE_COOKIE, CONSOLE_PREAUTH_COOKIE];

/// Whether `name` is a cookie portcullis owns: the session cookie (`session`) or one of
/// [`OWN_COOKIES`].
fn own_cookie(name: &str, session: &str) -> bool {
    name == session || OWN_COOKIES.contains(&name)
}

/// Removes the `Set-Cookie` fields of an origin's response that would set (or clear) a
/// cookie portcullis owns: an origin must not plant a session of its choosing (session
/// fixation, a login as the attacker's account) or end the user's.
pub fn drop_own_set_cookies(session: &str, headers: &mut HeaderMap) {
    let named = |v: &HeaderValue| {
        let b = v.as_bytes();
        let end = memchr::memchr(b'=', b).unwrap_or(b.len());
        std::str::from_utf8(&b[..end]).map_or(true, |n| own_cookie(n.trim(), session))
    };
    if !headers.get_all(header::SET_COOKIE).iter().any(named) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !named(v))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Removes portcullis's own cookies (the session and the login-in-progress cookie) from a
/// request on its way to any origin, public routes included: a browser sends the session
/// cookie with every path of the host, and an origin (or its logs) that held it could open
/// protected routes as that user. Other cookies stay.
pub fn strip_own_cookies(snap: &Snapshot, headers: &mut HeaderMap) {
    let session = snap.identity.session.cookie.as_str();
    let mut fields = headers.get_all(header::COOKIE).iter();
    let several = fields.next().is_some() && fields.next().is_some();
    let ours = headers.get_all(header::COOKIE).iter().any(|v| {
        let b = v.as_bytes();
        memchr::memmem::find(b, session.as_bytes()).is_some()
            || memchr::memmem::find(b, b"portcullis_").is_some()
    });
    // Several Cookie fields (HTTP/2 splits the cookies into one field each, RFC 9113
    // §8.2.3) are joined into one with `; ` for an HTTP/1.1 origin, which may read only one.
    if ours || several {
        remove_cookies(headers, |name| own_cookie(name, session));
    }
}

/// Removes one cookie from the Cookie header(s), keeping the others for the origin.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    remove_cookies(headers, |n| n == name);
}

/// Removes the cookies whose name `doomed` says from the Cookie header(s), and leaves the
/// others in one field, joined with `; `.
fn remove_cookies(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').is_none_or(|(k, _)| !doomed(k.trim())))
        .map(String::from)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// Adds what tells the origin who the caller is: the route's identity header templates (their
/// values encoded losslessly, see `portcullis_identity::template`), the signed assertion, and
/// the bearer token when the route passes it on (`pass_token`).
pub fn identity(
    snap: &Snapshot,
    route: &RouteRt,
    headers: &mut HeaderMap,
    identity: &Identity,
    bearer: Option<&str>,
) {
    if let Some(b) = bearer {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {b}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    for (name, t) in &route.upstream_headers {
        if let Ok(v) = HeaderValue::from_str(&template::render(t, identity)) {
            headers.insert(name.clone(), v);
        }
    }
    if route.assertion {
        match snap.identity.signer.sign(identity, &route.id) {
            Ok(jwt) => {
                if let Ok(v) = HeaderValue::from_str(&jwt) {
                    headers.insert(ASSERTION_HEADER.clone(), v);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot sign assertion"),
        }
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
    strip_own_cookies(x.snap, &mut headers);
    if headers.keys().any(|k| PATH_OVERRIDES.contains(k)) {
        for n in &PATH_OVERRIDES {
            headers.remove(n);
        }
    }
    headers.remove(header::EXPECT);
    if let Some(u) = &x.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.protocols.clone());
    }
    if !trusted {
        // Other ways of claiming a client address are only believed from trusted proxies.
        headers.remove(header::FORWARDED);
        if headers.keys().any(|k| CLIENT_IP_CLAIMS.contains(k)) {
            for n in &CLIENT_IP_CLAIMS {
                headers.remove(n);
            }
        }
        // And every other `X-Forwarded-*` (and kin) a client could say how it came in with:
        // Rack reads `X-Forwarded-Ssl` and `X-Forwarded-Scheme` before `X-Forwarded-Proto`,
        // and Rack and Werkzeug build URLs from `X-Forwarded-Port` and `-Prefix`. The three
        // portcullis sets are set below.
        let claims_scheme =
            |k: &HeaderName| k.as_str().starts_with("x-forwarded-") || SCHEME_CLAIMS.contains(k);
        if headers.keys().any(claims_scheme) {
            let doomed: Vec<HeaderName> = headers
                .keys()
                .filter(|k| claims_scheme(k))
                .cloned()
                .collect();
            for n in doomed {
                headers.remove(n);
            }
        }
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
    if conn.rules.underscores_in_headers == UnderscoresInHeaders::Allow {
        drop_lookalikes(&mut headers);
    }
    // A request that named no host (HTTP/1.0 without `Host`, or an empty one) is sent with an
    // empty `Host`, as the client sent it: never a name the client did not give, which an
    // origin might trust (a default or internal virtual host).
    let authority = match (&backend.host, authority) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.clone(),
        (None, None) => HeaderValue::from_static(""),
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
    let host = authority.to_str().unwrap_or("");
    if host.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            "a request without a host cannot go to an HTTP/2 origin\n",
        ));
    }
    let uri = format!("{scheme}://{host}{pq}");
    match uri.parse() {
        Ok(u) => Ok(Head {
            headers,
            h2_uri: Some(u),
        }),
        Err(_) => Err((StatusCode::BAD_REQUEST, "invalid request target\n")),
    }
}

/// Under `underscores_in_headers: allow`: removes a field whose name holds `_` (or another
/// byte than a letter, a digit or `-`) and reads, as CGI-style servers read it (each such
/// byte as `-`), as a field the head carries: one portcullis set
/// (an identity header, an authorizer's context, a limit's mark, the forwarded headers) or
/// the client's own, which the origin could not tell apart from it either. (Names of fields
/// portcullis owns went before routing, in `edge::canon::underscore_headers`.)
fn drop_lookalikes(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|k| crate::fields::is_unusual(k.as_str()))
    {
        return;
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            crate::fields::cgi_reading(k.as_str())
                .is_some_and(|n| crate::fields::is_owned(&n) || headers.contains_key(n.as_str()))
        })
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin cannot set, or clear, a cookie portcullis owns; its other cookies pass.
    #[test]
    fn an_origin_sets_no_cookie_of_portcullis() {
        let mut h = HeaderMap::new();
        for c in [
            "theme=dark; Path=/",
            "sess=fixated; Path=/; HttpOnly",
            "portcullis_auth=x",
            " portcullis_admin =y; Path=/",
            "portcullis_admin_login=z",
            "portcullis_session_x=kept",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_str(c).unwrap());
        }
        drop_own_set_cookies("sess", &mut h);
        let left: Vec<_> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["theme=dark; Path=/", "portcullis_session_x=kept"]);
    }

    /// The fields this module removes or sets are among those portcullis owns, so that their
    /// `_` spellings and trailers of their names are refused too.
    #[test]
    fn the_fields_removed_or_set_here_are_owned() {
        let hops = [
            header::CONNECTION,
            KEEP_ALIVE.clone(),
            PROXY_CONNECTION.clone(),
            header::PROXY_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ];
        let set = [
            X_FORWARDED_FOR.clone(),
            X_FORWARDED_PROTO.clone(),
            X_FORWARDED_HOST.clone(),
            X_REQUEST_ID.clone(),
            header::FORWARDED,
            header::EXPECT,
            header::HOST,
            header::COOKIE,
        ];
        for n in hops
            .iter()
            .chain(&set)
            .chain(&CLIENT_IP_CLAIMS)
            .chain(&PATH_OVERRIDES)
        {
            assert!(crate::fields::is_owned(n.as_str()), "{n}");
        }
    }

    #[test]
    fn under_allow_a_name_that_reads_as_a_field_of_the_head_goes() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-tenant", "acme"),
            ("x_tenant", "evil"),
            ("x_forwarded_proto", "https"),
            ("x_custom", "kept"),
            ("x-custom-2", "kept"),
        ] {
            h.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        drop_lookalikes(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-custom-2", "x-tenant", "x_custom"]);
        assert_eq!(h["x-tenant"], "acme");
    }

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
