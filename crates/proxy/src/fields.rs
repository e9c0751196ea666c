//! The request fields portcullis owns: those it frames, routes or authenticates a request by,
//! and those it removes or sets itself before the origin sees the request. A field of these
//! names must reach the origin only as portcullis left it, so it is also refused where a
//! client could slip it past under another spelling or in another place:
//!
//! - under `underscores_in_headers: allow`, a name with a byte other than a letter, a digit
//!   or `-` that reads as one of these once every such byte is `-` is removed (by the check
//!   phase's rule for such names, and when the upstream head is built): CGI-style servers and
//!   frameworks read `X_Forwarded_For` as `X-Forwarded-For` (WSGI, Rack, PHP), and lighttpd's
//!   CGI, FastCGI and SCGI gateways read `X.Forwarded.For` and `X~Forwarded~For` so too;
//! - a request trailer of one of these names is dropped (an origin that merges trailers into
//!   the head would read it as the field).
//!
//! Identity headers (a route's `headers.upstream` names, `x-portcullis-*`) are handled with
//! the snapshot's list, as they depend on the config.

/// The fields that frame a message and belong to its connection (RFC 9110 §7.6.1, §6.5.1):
/// owned by portcullis in a request, and never taken from an origin's response trailers.
pub const FRAMING: [&str; 12] = [
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
];

/// Names (lower case, with `-`) of the other fields portcullis owns, besides the
/// [`FRAMING`] ones, any `x-forwarded-*` and `x-portcullis-*` name and the
/// [`portcullis_config::FORWARDED_FIELDS`].
const OWNED: [&str; 13] = [
    // Routing: the host and the path some origins serve instead of the request line's.
    "host",
    "x-original-url",
    "x-rewrite-url",
    "max-forwards",
    // Credentials portcullis checks, and the method it authorized.
    "authorization",
    "cookie",
    "x-api-key",
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
        || FRAMING.contains(&name)
        // Where the request came from, which portcullis sets or believes only from trusted
        // proxies.
        || portcullis_config::FORWARDED_FIELDS.contains(&name)
}

/// Whether `name` holds a byte other than a letter, a digit or `-`. Such bytes (`_`, `.`,
/// `~`, `!`, `*`, ...) are legal in a field name (RFC 9110 §5.1), and CGI-style servers make
/// every one of them `_` in the variable they name the field by (`HTTP_X_USER`), so such a
/// name is read as another one. nginx ignores such names by default
/// (`ignore_invalid_headers`), and so does portcullis (`underscores_in_headers: drop`).
pub fn is_unusual(name: &str) -> bool {
    // Eight bytes at a time: every header name of every request is checked. Written by
    // hand (no crate tests a byte class a word at a time); the test below holds it to the
    // plain definition for every byte.
    let b = name.as_bytes();
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        if unusual_word(u64::from_le_bytes(w)) {
            return true;
        }
    }
    let rest = chunks.remainder();
    // The tail, padded with letters.
    let mut w = [b'a'; 8];
    w[..rest.len()].copy_from_slice(rest);
    unusual_word(u64::from_le_bytes(w))
}

/// Whether any of eight bytes is not an ASCII letter, digit or `-`.
fn unusual_word(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    if x & HIGH != 0 {
        return true;
    }
    // With every byte below 0x80, `byte + (0x80 - n)` has its high bit set iff byte >= n,
    // and no byte carries into the next.
    let at_least = |n: u64| x.wrapping_add((0x80 - n) * ONES) & HIGH;
    // Exact per-byte equality (no false positives): high bit set where the byte is zero.
    let zero = |y: u64| !(((y & LOW7) + LOW7) | y) & HIGH;
    let dash = zero(x ^ (0x2d * ONES));
    let digit = at_least(0x30) & !at_least(0x3a);
    let letter = at_least(0x61) & !at_least(0x7b);
    // Names are lower case in a header map; upper case is allowed for other callers.
    let upper = at_least(0x41) & !at_least(0x5b);
    (dash | digit | letter | upper) != HIGH
}

/// `name` as a CGI-style server reads it (every byte other than a letter or a digit as `-`),
/// when it differs from `name`.
pub fn cgi_reading(name: &str) -> Option<String> {
    is_unusual(name).then(|| {
        name.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    b as char
                } else {
                    '-'
                }
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_are_lower_case_with_dashes_and_listed_once() {
        let all: Vec<&str> = OWNED
            .iter()
            .chain(&FRAMING)
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
        for n in [
            "x.user", "x~user", "x!user", "x*user", "x'user", "x|user", "x^user", "x`user",
        ] {
            assert_eq!(cgi_reading(n).as_deref(), Some("x-user"), "{n}");
        }
        assert!(is_owned("x-api-key"));
        // The word-at-a-time check is the plain definition.
        let plain = |n: &[u8]| !n.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        for b in 0..=255u8 {
            for at in 0..20 {
                let mut n = [b'x'; 20];
                n[at] = b;
                for len in [at + 1, 20] {
                    let name = &n[..len];
                    if let Ok(s) = std::str::from_utf8(name) {
                        assert_eq!(is_unusual(s), plain(name), "{name:?}");
                    } else {
                        assert!(plain(name));
                    }
                }
            }
        }
        assert!(!is_unusual(""));
        assert!(!is_unusual("x-request-id-0123456789"));
        assert!(is_unusual("x-request-id-012345678_"));
    }
}
