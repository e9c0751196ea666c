//! The console's browser credential: the `portcullis_admin` cookie, and the CSRF token that
//! every state change made with it must carry.
//!
//! The cookie holds one of two grants, sealed (AES-256-GCM, see
//! [`portcullis_identity::session::Sealer`]):
//! * `s.<session>`: a browser session from an OIDC login through one of `admin.auth`'s
//!   providers, sealed by the identity engine's session keys exactly as a route's session is
//!   (so it refreshes, expires and is revoked the same way);
//! * `t.<grant>`: a break-glass token's grant, which holds a digest of the token (never the
//!   token), so removing the token from `admin.tokens` ends the grant; so does signing out,
//!   which refuses that very cookie value until it would have expired (in the identity
//!   engine's session store, as a signed-out session is).
//!
//! The cookie is `HttpOnly` and `SameSite=Strict`. A state change made with it must also send
//! `x-csrf-token`, a token sealed for this very cookie (the page carries it), and, when the
//! browser sends `Origin`, come from the console's own origin. Bearer tokens and API keys are
//! not sent by browsers on their own, so calls made with them need neither.
//!
//! Grants are sealed with the identity engine's session keys when configured (so they
//! survive a restart and are shared by a fleet), else with a key made at start.

use portcullis_identity::session::Sealer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use subtle::ConstantTimeEq;

/// The cookie that carries a console grant (never sent to an origin, nor set by one).
pub const COOKIE: &str = crate::upstream::head::CONSOLE_COOKIE;
/// The cookie that carries a console login in progress.
pub const PREAUTH: &str = crate::upstream::head::CONSOLE_PREAUTH_COOKIE;
/// The header a state change carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a token's grant lasts.
pub const TOKEN_GRANT_SECS: u64 = 8 * 3600;

/// What a console cookie grants.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant<'a> {
    /// A browser session (the identity engine's sealed session cookie value).
    Session(&'a str),
    /// The `n`th of `admin.tokens`.
    Token(usize),
}

#[derive(Serialize, Deserialize)]
struct TokenGrant {
    /// The first 16 bytes of the token's SHA-256, hex.
    d: String,
    exp: u64,
}

#[derive(Serialize, Deserialize)]
struct Csrf {
    /// The first 16 bytes of the cookie's SHA-256, hex.
    c: String,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn short_digest(b: &[u8]) -> String {
    to_hex(&Sha256::digest(b)[..16])
}

/// The sealer for grants: the identity engine's, else one made at start.
pub fn sealer(engine: &portcullis_identity::Engine) -> &Sealer {
    static FALLBACK: OnceLock<Sealer> = OnceLock::new();
    engine.sealer.as_ref().unwrap_or_else(|| {
        FALLBACK.get_or_init(|| {
            let mut k = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
            Sealer::new(&[k]).expect("one key")
        })
    })
}

/// A cookie value granting the token whose SHA-256 is `digest`.
pub fn token_cookie(sealer: &Sealer, digest: &[u8; 32]) -> Option<String> {
    let g = TokenGrant {
        d: to_hex(&digest[..16]),
        exp: now_secs() + TOKEN_GRANT_SECS,
    };
    Some(format!("t.{}", sealer.seal("admin-token", &g)?))
}

/// When the token grant `value` expires (None: not a token grant this sealer opens).
pub fn token_expiry(sealer: &Sealer, value: &str) -> Option<u64> {
    let g: TokenGrant = sealer.open("admin-token", value.strip_prefix("t.")?)?;
    Some(g.exp)
}

/// What `value` grants, given the configured tokens' digests. `None`: nothing (unsealable,
/// expired, or its token is no longer configured).
pub fn open<'a>(sealer: &Sealer, value: &'a str, digests: &[[u8; 32]]) -> Option<Grant<'a>> {
    if let Some(s) = value.strip_prefix("s.") {
        return Some(Grant::Session(s));
    }
    let g: TokenGrant = sealer.open("admin-token", value.strip_prefix("t.")?)?;
    if g.exp <= now_secs() {
        return None;
    }
    let mut found = None;
    for (i, d) in digests.iter().enumerate() {
        let want = to_hex(&d[..16]);
        if bool::from(want.as_bytes().ct_eq(g.d.as_bytes())) && found.is_none() {
            found = Some(i);
        }
    }
    found.map(Grant::Token)
}

/// A CSRF token for the cookie `value`.
pub fn csrf_token(sealer: &Sealer, value: &str) -> Option<String> {
    sealer.seal(
        "admin-csrf",
        &Csrf {
            c: short_digest(value.as_bytes()),
        },
    )
}

/// Whether `token` was made for the cookie `value`.
pub fn csrf_ok(sealer: &Sealer, value: &str, token: &str) -> bool {
    sealer.open::<Csrf>("admin-csrf", token).is_some_and(|c| {
        bool::from(
            c.c.as_bytes()
                .ct_eq(short_digest(value.as_bytes()).as_bytes()),
        )
    })
}

/// Whether a browser's `Origin` (when sent) is the console's own: `scheme://host`, where
/// `host` is the request's `Host`.
pub fn same_origin(origin: Option<&str>, host: Option<&str>) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some(host) = host else {
        return false;
    };
    origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .is_some_and(|h| h.eq_ignore_ascii_case(host))
}

/// A `Set-Cookie` value for the grant `value` (or, with `None`, one that clears it).
pub fn set_cookie(
    name: &str,
    value: Option<&str>,
    secure: bool,
    path: &str,
    same_site: &str,
) -> String {
    let sec = if secure { "; Secure" } else { "" };
    match value {
        Some(v) => format!("{name}={v}; Path={path}; HttpOnly; SameSite={same_site}{sec}"),
        None => format!("{name}=; Path={path}; HttpOnly; SameSite={same_site}; Max-Age=0{sec}"),
    }
}

/// The value of cookie `name` in a `Cookie` header list.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&[[7u8; 32]]).unwrap()
    }

    #[test]
    fn a_token_grant_names_its_token_until_the_token_goes() {
        let s = sealer();
        let a: [u8; 32] = Sha256::digest(b"token-a").into();
        let b: [u8; 32] = Sha256::digest(b"token-b").into();
        let v = token_cookie(&s, &b).unwrap();
        assert_eq!(open(&s, &v, &[a, b]), Some(Grant::Token(1)));
        assert_eq!(open(&s, &v, &[a]), None, "the token was removed");
        let other = Sealer::new(&[[8u8; 32]]).unwrap();
        assert_eq!(open(&other, &v, &[a, b]), None, "another key");
        let mut forged = v.clone();
        forged.push('A');
        assert_eq!(open(&s, &forged, &[a, b]), None);
        assert_eq!(open(&s, "t.garbage", &[a, b]), None);
        assert_eq!(open(&s, "s.abc", &[]), Some(Grant::Session("abc")));
        assert_eq!(open(&s, "abc", &[a]), None);
    }

    #[test]
    fn a_csrf_token_fits_only_its_cookie() {
        let s = sealer();
        let t = csrf_token(&s, "t.cookie-one").unwrap();
        assert!(csrf_ok(&s, "t.cookie-one", &t));
        assert!(!csrf_ok(&s, "t.cookie-two", &t));
        assert!(!csrf_ok(&s, "t.cookie-one", "x"));
        // A grant is no CSRF token, and the other way round: each is sealed for its purpose.
        let a: [u8; 32] = Sha256::digest(b"token-a").into();
        let g = token_cookie(&s, &a).unwrap();
        assert!(!csrf_ok(&s, "t.cookie-one", g.trim_start_matches("t.")));
        assert_eq!(open(&s, &format!("t.{t}"), &[a]), None);
    }

    #[test]
    fn origins_must_be_the_consoles_own() {
        assert!(same_origin(None, Some("127.0.0.1:9090")));
        assert!(same_origin(
            Some("http://127.0.0.1:9090"),
            Some("127.0.0.1:9090")
        ));
        assert!(same_origin(
            Some("https://Admin.example"),
            Some("admin.example")
        ));
        assert!(!same_origin(
            Some("https://evil.example"),
            Some("admin.example")
        ));
        assert!(!same_origin(Some("null"), Some("admin.example")));
        assert!(!same_origin(Some("http://127.0.0.1:9090"), None));
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; portcullis_admin_login=x".parse().unwrap(),
        );
        h.append(http::header::COOKIE, "portcullis_admin=y".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE), Some("y"));
        assert_eq!(cookie(&h, PREAUTH), Some("x"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
