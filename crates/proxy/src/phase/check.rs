//! The check phase: refuse what no route may see (a smuggling conflict, an oversized head, a
//! CONNECT tunnel), apply the listener's rule for header names with an underscore, remove the
//! identity headers no client may set (before any route is chosen by them), and put
//! the target into its one canonical form (`canon`): the host and path that every later
//! phase, the audit record and the origin see.

use crate::edge::canon::{self, Refusal};
use crate::exchange::{Exchange, Flow, Host};
use crate::snapshot::Snapshot;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};
use portcullis_config::UnderscoresInHeaders;

pub fn run(x: &mut Exchange<'_>) -> Flow {
    // Request smuggling guard: hyper accepts both headers (dropping Content-Length and
    // using chunked); we refuse. See `smuggle` for how the dropped header is noticed.
    let parts = &x.parts;
    let te = parts.headers.contains_key(header::TRANSFER_ENCODING);
    if x.conn.smuggle.next_request_conflicts()
        || (te && parts.headers.contains_key(header::CONTENT_LENGTH))
    {
        return Flow::Refuse(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding\n",
        );
    }
    // hyper frames a body by its last coding being `chunked` and drops the others: the
    // origin would get `gzip` bytes with nothing saying they are coded. RFC 9112 §6.1: a
    // coding the server does not understand is 501.
    if let Some(refused) = te.then(|| transfer_codings(&parts.headers)).flatten() {
        return Flow::Refuse(refused.0, refused.1);
    }
    if parts.version != Version::HTTP_2
        && canon::head_size(&parts.method, &parts.uri, &parts.headers)
            > x.conn.rules.max_header_size
    {
        return refuse_with(
            x,
            "header_size",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header section too large\n",
        );
    }
    // Methods are case-sensitive (RFC 9110 §9.1), but many origin frameworks upper-case
    // them: `delete` would be routed and authorized as a method of its own, and run as
    // DELETE. No registered method has a lower-case letter; nginx refuses them too.
    if parts
        .method
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return refuse(x, Refusal::MethodCase);
    }
    // portcullis is no forward proxy: a CONNECT tunnel would carry requests that no route
    // or policy sees.
    if parts.method == Method::CONNECT {
        return refuse_with(
            x,
            "connect",
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        );
    }
    if one_content_length(&mut x.parts.headers).is_err() {
        return Flow::Refuse(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length values\n",
        );
    }
    // Before routing, so that no route, policy or origin sees a header the rule drops.
    let mode = x.conn.rules.underscores_in_headers;
    if let Err(r) = canon::underscore_headers(&mut x.parts.headers, mode) {
        return refuse(x, r);
    }
    // Before routing too: a route must not be chosen by a header the client may not set
    // (`match.headers: { x-user: alice }` would send anyone who claims to be alice to her
    // backend, which then hears who the caller really is).
    strip_identity_headers(
        x.snap,
        &mut x.parts.headers,
        mode == UnderscoresInHeaders::Allow,
    );
    let raw_host = match request_host(&x.parts) {
        Ok(h) => h,
        Err(msg) => return Flow::Refuse(StatusCode::BAD_REQUEST, msg),
    };
    let t = match canon::target(&x.parts.uri, &raw_host, &x.conn.rules) {
        Ok(t) => t,
        Err(r) => return refuse(x, r),
    };
    let host = t.host.map(|h| Host {
        name: h.name.into_owned(),
        authority: h.authority,
    });
    let path = match t.path.path {
        std::borrow::Cow::Owned(p) => Some(p),
        std::borrow::Cow::Borrowed(_) => None,
    };
    x.escaped_slash = t.path.escaped_slash;
    x.host = host;
    x.path = path;
    if x.log {
        x.record.host = x.host_name().to_string();
        x.record.path = x.path().to_string();
    }
    Flow::Next
}

/// A request's `Transfer-Encoding` other than one `chunked`: 501 for a coding portcullis
/// does not decode (`gzip, chunked`), 400 for `chunked` more than once.
fn transfer_codings(h: &http::HeaderMap) -> Option<(StatusCode, &'static str)> {
    let mut codings = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let first = codings.next()?;
    let mut chunked = 0;
    for c in std::iter::once(first).chain(codings) {
        if !c.eq_ignore_ascii_case(b"chunked") {
            return Some((
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported\n",
            ));
        }
        chunked += 1;
    }
    (chunked > 1).then_some((
        StatusCode::BAD_REQUEST,
        "chunked transfer coding applied more than once\n",
    ))
}

/// Removes identity headers (and the headers authorizers set, `upstream_headers`) a client
/// might try to set, on every route. Names spelled with
/// `_`, `.` or another byte for `-` go too: CGI-style origin servers and frameworks (WSGI,
/// Rack, PHP, lighttpd's gateways) read `X_User` and `X.User` as `X-User`: looked for when
/// `spelled` (only a listener with `underscores_in_headers: allow` leaves such names).
pub fn strip_identity_headers(snap: &Snapshot, h: &mut http::HeaderMap, spelled: bool) {
    // One pass over the request's own header names (a handful) instead of one hash lookup per
    // identity header; most requests carry none of them, so nothing is removed.
    let doomed: Vec<http::HeaderName> = h
        .keys()
        .filter(|k| {
            let s = k.as_str();
            if s.starts_with("x-portcullis-") || snap.unforgeable.iter().any(|n| n == *k) {
                return true;
            }
            let Some(name) = spelled.then(|| crate::fields::cgi_reading(s)).flatten() else {
                return false;
            };
            name.starts_with("x-portcullis-") || snap.unforgeable.iter().any(|n| n.as_str() == name)
        })
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// Makes repeated Content-Length values (`0` in two fields, or `0, 0`) one field, so that an
/// HTTP/1.1 origin is sent one length: hyper (HTTP/1) and h2 refuse values that differ but
/// pass repeated equal ones, which the upstream head of a request without a body would
/// carry as they came, and which an origin may read as invalid framing (RFC 9110 §8.6).
/// Values that differ are an error here too. One lookup when there is one field.
fn one_content_length(headers: &mut http::HeaderMap) -> Result<(), ()> {
    let mut all = headers.get_all(header::CONTENT_LENGTH).iter();
    match (all.next(), all.next()) {
        (None, _) => return Ok(()),
        (Some(v), None) if !v.as_bytes().contains(&b',') => return Ok(()),
        _ => {}
    }
    let mut one: Option<&[u8]> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for n in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if one.is_some_and(|o| o != n) {
                return Err(());
            }
            one = Some(n);
        }
    }
    let one = one
        .and_then(|n| HeaderValue::from_bytes(n).ok())
        .ok_or(())?;
    headers.insert(header::CONTENT_LENGTH, one);
    Ok(())
}

/// Counts and logs a request refused for its form, and the answer it gets.
pub fn refuse(x: &Exchange<'_>, r: Refusal) -> Flow {
    refuse_with(x, r.reason(), StatusCode::BAD_REQUEST, r.message())
}

pub fn refuse_with(
    x: &Exchange<'_>,
    reason: &'static str,
    status: StatusCode,
    msg: &'static str,
) -> Flow {
    x.shared
        .metrics
        .refuse(&x.conn.listener, x.conn.peer.ip(), reason);
    Flow::Refuse(status, msg)
}

/// The host a request names. HTTP/2's `:authority`, and the authority of an HTTP/1
/// absolute-form target, win over the `Host` header (RFC 9112 §3.2.2), so routing and
/// forwarding agree on one host; HTTP/1.1 still requires a `Host` header. Empty when an
/// HTTP/1.0 request names none.
fn request_host(parts: &http::request::Parts) -> Result<HeaderValue, &'static str> {
    if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err("more than one Host header\n");
    }
    match parts.uri.authority() {
        Some(a)
            if parts.version != Version::HTTP_11 || parts.headers.contains_key(header::HOST) =>
        {
            HeaderValue::from_str(a.as_str()).map_err(|_| "invalid Host header\n")
        }
        _ => match parts.headers.get(header::HOST) {
            Some(h) => Ok(h.clone()),
            None if parts.version == Version::HTTP_11 => Err("missing Host header\n"),
            None => Ok(HeaderValue::from_static("")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{describe, is_next, refusal, Kit};
    use http::Request;

    const CONFIG: &str = r#"
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"#;

    #[tokio::test]
    async fn a_canonical_request_goes_on_with_its_host_and_path() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(Request::get("/hello?q=1").header("host", "Example.COM:80"));
        let f = run(&mut x);
        assert!(is_next(&f), "{}", describe(&f));
        // The host is lower case, without the default port; the path was already canonical.
        assert_eq!(x.host_name(), "example.com");
        assert_eq!(x.path, None);
        assert_eq!(x.path(), "/hello");
        assert_eq!(x.query(), Some("q=1"));
        assert_eq!(x.record.host, "example.com");
        assert_eq!(x.record.path, "/hello");
    }

    #[tokio::test]
    async fn an_encoded_unreserved_character_is_decoded_once_for_everyone() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(Request::get("/%61dmin").header("host", "example.com"));
        assert!(is_next(&run(&mut x)));
        assert_eq!(x.path(), "/admin");
        // The origin is sent the canonical path too.
        assert_eq!(x.origin_target(), "/admin");
        assert_eq!(x.record.path, "/admin");
    }

    /// An absolute-form target with an empty path is routed as `/`, and the origin is sent
    /// `/` and the query, never a target that starts with `?`.
    #[tokio::test]
    async fn an_empty_path_reaches_the_origin_as_a_slash() {
        let kit = Kit::new(CONFIG).await;
        for (target, sent) in [
            ("http://example.com?x=1", "/?x=1"),
            ("http://example.com", "/"),
            ("http://example.com/?x=1", "/?x=1"),
        ] {
            let mut x = kit.exchange(Request::get(target).header("host", "example.com"));
            assert!(is_next(&run(&mut x)), "{target}");
            assert_eq!(x.path(), "/", "{target}");
            assert_eq!(x.origin_target(), sent, "{target}");
        }
    }

    #[tokio::test]
    async fn a_dot_segment_is_refused_and_counted() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(Request::get("/public/../admin").header("host", "example.com"));
        assert_eq!(
            refusal(run(&mut x)),
            (StatusCode::BAD_REQUEST, "path has dot segments\n")
        );
        assert_eq!(kit.refused("dot_segment"), 1.0, "{}", kit.metrics());
    }

    #[tokio::test]
    async fn a_connect_tunnel_is_refused_and_counted() {
        let kit = Kit::new(CONFIG).await;
        let mut x =
            kit.exchange(Request::connect("example.com:443").header("host", "example.com:443"));
        assert_eq!(
            refusal(run(&mut x)),
            (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
        );
        assert_eq!(kit.refused("connect"), 1.0, "{}", kit.metrics());
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_and_counted() {
        let kit = Kit::new(CONFIG).await;
        // The listener's max_header_size is 64 KiB by default.
        let big = "a".repeat(65 * 1024);
        let mut x = kit.exchange(
            Request::get("/")
                .header("host", "example.com")
                .header("x-big", big),
        );
        assert_eq!(
            refusal(run(&mut x)),
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request header section too large\n"
            )
        );
        assert_eq!(kit.refused("header_size"), 1.0, "{}", kit.metrics());
    }

    /// `delete` is not DELETE to portcullis's routes and policies, but is to many origins:
    /// a method with a lower-case letter is refused before routing.
    #[tokio::test]
    async fn a_method_in_lower_case_is_refused_and_counted() {
        let kit = Kit::new(CONFIG).await;
        for m in ["delete", "Delete", "gEt", "purge"] {
            let mut x = kit.exchange(
                Request::builder()
                    .method(m)
                    .uri("/")
                    .header("host", "example.com"),
            );
            assert_eq!(
                refusal(run(&mut x)),
                (
                    StatusCode::BAD_REQUEST,
                    "method names are case-sensitive: send them in upper case\n"
                ),
                "{m}"
            );
        }
        assert_eq!(kit.refused("method_case"), 4.0, "{}", kit.metrics());
        for m in ["DELETE", "PURGE", "PROPFIND", "M-SEARCH"] {
            let mut x = kit.exchange(
                Request::builder()
                    .method(m)
                    .uri("/")
                    .header("host", "example.com"),
            );
            assert!(is_next(&run(&mut x)), "{m}");
        }
    }

    #[tokio::test]
    async fn a_request_with_both_content_length_and_chunked_is_refused() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(
            Request::post("/")
                .header("host", "example.com")
                .header("content-length", "5")
                .header("transfer-encoding", "chunked"),
        );
        assert_eq!(
            refusal(run(&mut x)),
            (
                StatusCode::BAD_REQUEST,
                "conflicting Content-Length and Transfer-Encoding\n"
            )
        );
    }

    #[tokio::test]
    async fn a_transfer_coding_other_than_one_chunked_is_refused() {
        let kit = Kit::new(CONFIG).await;
        let with_te = |values: &[&str]| {
            let mut r = Request::post("/").header("host", "example.com");
            for v in values {
                r = r.header("transfer-encoding", *v);
            }
            kit.exchange(r)
        };
        for ok in [&["chunked"][..], &["Chunked"], &[" chunked ,"]] {
            let mut x = with_te(ok);
            assert!(is_next(&run(&mut x)), "{ok:?}");
        }
        for unknown in [
            &["gzip, chunked"][..],
            &["identity, chunked"],
            &["gzip", "chunked"],
        ] {
            let mut x = with_te(unknown);
            assert_eq!(
                refusal(run(&mut x)).0,
                StatusCode::NOT_IMPLEMENTED,
                "{unknown:?}"
            );
        }
        for twice in [&["chunked, chunked"][..], &["chunked", "chunked"]] {
            let mut x = with_te(twice);
            assert_eq!(refusal(run(&mut x)).0, StatusCode::BAD_REQUEST, "{twice:?}");
        }
    }

    /// `Transfer_Encoding`, `Content_Length` and an identity header lookalike: what CGI-style
    /// origins would read as `Transfer-Encoding`, `Content-Length` and `X-Portcullis-User`;
    /// the same with other punctuation, which lighttpd's CGI gateways read as `_` too; and
    /// `X_Custom` and `X.Custom`, which read as no field portcullis owns.
    fn with_underscores() -> http::request::Builder {
        Request::post("/")
            .header("host", "example.com")
            .header("Transfer_Encoding", "chunked")
            .header("Content_Length", "5")
            .header("X_Portcullis_User", "admin")
            .header("X_Custom", "1")
            .header("X.Portcullis.User", "admin")
            .header("X~Forwarded~For", "6.6.6.6")
            .header("X.Custom", "1")
            .header("x-kept", "1")
    }

    #[tokio::test]
    async fn header_names_with_underscores_are_dropped_by_default() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(with_underscores());
        assert!(is_next(&run(&mut x)));
        let mut names: Vec<&str> = x.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-kept"]);
        assert_eq!(kit.refused("underscore_header"), 0.0);
    }

    #[tokio::test]
    async fn header_names_with_underscores_follow_the_listeners_rule() {
        let listener = |mode: &str| {
            format!(
                "listeners: [{{ name: web, bind: \"127.0.0.1:0\", underscores_in_headers: {mode} }}]\n{CONFIG}"
            )
        };
        let kit = Kit::from_yaml(&listener("reject")).await;
        let mut x = kit.exchange(with_underscores());
        assert_eq!(
            refusal(run(&mut x)),
            (
                StatusCode::BAD_REQUEST,
                "header names with an underscore or other punctuation are not accepted\n"
            )
        );
        assert_eq!(kit.refused("underscore_header"), 1.0, "{}", kit.metrics());
        let kit = Kit::from_yaml(&listener("allow")).await;
        let mut x = kit.exchange(with_underscores());
        assert!(is_next(&run(&mut x)));
        // Kept, less what reads as a field portcullis owns.
        let mut names: Vec<&str> = x.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-kept", "x.custom", "x_custom"]);
    }

    #[tokio::test]
    async fn repeated_content_lengths_become_one_and_different_ones_are_refused() {
        let kit = Kit::new(CONFIG).await;
        for (repeated, one) in [
            (&["0", "0"][..], "0"),
            (&["0, 0"], "0"),
            (&["5", "5, 5"], "5"),
        ] {
            let mut r = Request::get("/").header("host", "example.com");
            for v in repeated {
                r = r.header("content-length", *v);
            }
            let mut x = kit.exchange(r);
            assert!(is_next(&run(&mut x)), "{repeated:?}");
            let left: Vec<_> = x.parts.headers.get_all("content-length").iter().collect();
            assert_eq!(left, [one], "{repeated:?}");
        }
        for different in [&["0", "40"][..], &["0, 40"], &["5,"]] {
            let mut r = Request::get("/").header("host", "example.com");
            for v in different {
                r = r.header("content-length", *v);
            }
            let mut x = kit.exchange(r);
            assert_eq!(
                refusal(run(&mut x)),
                (
                    StatusCode::BAD_REQUEST,
                    "conflicting Content-Length values\n"
                ),
                "{different:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_http11_request_must_name_its_host() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.exchange(Request::get("/"));
        assert_eq!(
            refusal(run(&mut x)),
            (StatusCode::BAD_REQUEST, "missing Host header\n")
        );
    }
}
