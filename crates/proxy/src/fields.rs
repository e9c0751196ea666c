//! The request fields portcullis owns: those it frames, routes or authenticates a request by,
//! and those it removes or sets itself before the origin sees the request. A field of these
//! names must reach the origin only as portcullis left it, so it is also refused where a
//! client could slip it past under another spelling or in another place:
//!
//! - under `underscores_in_headers: allow`, a name with `_` that reads as one of these once
//!   `_` is `-` (CGI-style frameworks, WSGI, Rack and PHP, read `X_Forwarded_For` as
//!   `X-Forwarded-For`) is removed (by the check phase's rule for such names, and when the
//!   upstream head is built);
//! - a request trailer of one of these names is dropped (an origin that merges trailers into
//!   the head would read it as the field).
//!
//! Identity headers (a route's `headers.upstream` names, `x-portcullis-*`) are handled with
//! the snapshot's list, as they depend on the config.

/// Names (lower case, with `-`) of the fields portcullis owns, besides any `x-forwarded-*` and
/// `x-portcullis-*` name and the [`portcullis_config::FORWARDED_FIELDS`].
const OWNED: [&str; 24] = [
    // Framing and the connection (RFC 9110 §7.6.1, §6.5.1).
    "connection",
    "content-encoding",
    "content-length",
    "content-range",
    "content-type",
    "expect",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Routing: the host and the path some origins serve instead of the request line's.
    "host",
    "x-original-url",
    "x-rewrite-url",
    "max-forwards",
    // Credentials portcullis checks, and the method it authorized.
    "authorization",
    "cookie",
    "proxy-authenticate",
    "proxy-authorization",
    "x-http-method",
    "x-http-method-override",
    "x-method-override",
    "x-request-id",
];

/// Whether `name` (lower case, with `-`) is a field portcullis owns.
pub fn is_owned(name: &str) -> bool {
    name.starts_with("x-forwarded-")
        || name.starts_with("x-portcullis-")
        || OWNED.contains(&name)
        // Where the request came from, which portcullis sets or believes only from trusted
        // proxies.
        || portcullis_config::FORWARDED_FIELDS.contains(&name)
}

/// `name` as a CGI-style framework reads it (`_` as `-`), when it holds a `_`.
pub fn cgi_reading(name: &str) -> Option<String> {
    name.contains('_').then(|| name.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_are_lower_case_with_dashes_and_listed_once() {
        let all: Vec<&str> = OWNED
            .iter()
            .chain(&portcullis_config::FORWARDED_FIELDS)
            .copied()
            .collect();
        for n in &all {
            assert_eq!(*n, n.to_ascii_lowercase());
            assert!(!n.contains('_'), "{n}");
            assert_eq!(all.iter().filter(|m| *m == n).count(), 1, "{n}");
        }
        for n in [
            "x-forwarded-for",
            "x-forwarded-prefix",
            "x-portcullis-user",
            "x-real-ip",
            "via",
        ] {
            assert!(is_owned(n), "{n}");
        }
        for n in ["x-user", "accept", "x-forwarded", "x-tenant"] {
            assert!(!is_owned(n), "{n}");
        }
        assert_eq!(
            cgi_reading("x_forwarded_for").as_deref(),
            Some("x-forwarded-for")
        );
        assert_eq!(cgi_reading("x-user"), None);
    }
}
