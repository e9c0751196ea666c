//! The identify stage: strip every client-supplied identity header, find the caller's
//! credential (bearer token, API key, session cookie, client certificate), turn it into an
//! [`Identity`] through the route's providers, and attach the identity for the origin
//! (header templates, the signed assertion, an optional bearer token). Deciding what the
//! identity may do is the authorize stage's job, not this one's. It also serves the login
//! endpoints under `/.portcullis/` and the assertion JWKS.
//!
//! Requests without credentials get 401 with an RFC 6750 `WWW-Authenticate` header, or a
//! 302 to the IdP when they come from a browser and the route has a login provider.

use crate::edge::conn::ConnInfo;
use crate::snapshot::{RouteRt, Snapshot};
use crate::upstream::body::{full, RespBody};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use portcullis_identity::engine::{Credentials, Outcome};
use portcullis_identity::oidc::safe_return_to;
use portcullis_identity::session::PreAuth;
use portcullis_identity::Identity;
use std::sync::Arc;

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
use crate::upstream::head::PREAUTH_COOKIE;

/// The result of identifying a request.
pub enum Step {
    /// Go on to the backend, with the caller's identity (None on public routes) and
    /// possibly a refreshed session cookie to set on the response.
    Continue {
        identity: Option<Arc<Identity>>,
        set_cookie: Option<HeaderValue>,
    },
    /// Answer now (401, 403 or a login redirect). The string is the reason, for the log.
    Respond(Response<RespBody>, String),
}

/// A credential header's value as text, or None if it is not ASCII. `HeaderValue::to_str`
/// checks byte by byte, and a bearer token is often a kilobyte; this checks a word at a time.
/// Unlike `to_str` it lets control characters through, but request header values never
/// carry them (hyper's HTTP/1 and HTTP/2 parsers refuse them, tab aside), and a credential
/// with one would match no token, key or hash anyway.
fn credential_text(v: &HeaderValue) -> Option<&str> {
    let b = v.as_bytes();
    if b.is_ascii() {
        std::str::from_utf8(b).ok()
    } else {
        None
    }
}

/// The token of an `Authorization: Bearer` value, as bytes (the scheme in any case, the
/// token without surrounding whitespace), for comparing with a remembered token.
fn bearer_bytes(v: &[u8]) -> Option<&[u8]> {
    match v.split_at_checked(7) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            Some(token.trim_ascii())
        }
        _ => None,
    }
}

pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn quote_safe(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .take(200)
        .collect()
}

fn unauthorized(rid: &str, error: Option<&str>) -> Response<RespBody> {
    let challenge = match error {
        Some(e) => format!(
            "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
            quote_safe(e)
        ),
        None => "Bearer realm=\"portcullis\"".to_string(),
    };
    let mut r = Response::new(full(Bytes::from_static(b"authentication required\n")));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    r
}

pub fn forbidden(rid: &str) -> Response<RespBody> {
    let mut r = Response::new(full(format!("forbidden (request id {rid})\n")));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Like every other answer, so a client can match a denial to its audit record.
    if let Ok(v) = HeaderValue::from_str(rid) {
        r.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    r
}

/// The answer to a browser that must log in while its provider cannot be reached: 503,
/// with a page that says so and when to try again.
fn login_unavailable(rid: &str, provider: &str) -> Response<RespBody> {
    let mut r = Response::new(full(format!(
        "sign-in is unavailable: the identity provider `{}` cannot be reached right now. \
         Try again in a moment (request id {rid}).\n",
        quote_safe(provider)
    )));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    r
}

fn redirect(location: &str, cookies: &[String]) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

fn cookie_attrs(secure: bool, path: &str, max_age: Option<u64>) -> String {
    let mut s = format!("; Path={path}; HttpOnly; SameSite=Lax");
    if secure {
        s.push_str("; Secure");
    }
    if let Some(m) = max_age {
        s.push_str(&format!("; Max-Age={m}"));
    }
    s
}

fn session_cookie(snap: &Snapshot, value: &str) -> String {
    let s = &snap.identity.session;
    format!(
        "{}={value}{}",
        s.cookie,
        cookie_attrs(s.secure, "/", Some(s.ttl.0.as_secs()))
    )
}

fn clear_cookie(name: &str, secure: bool, path: &str) -> String {
    format!("{name}={}", cookie_attrs(secure, path, Some(0)))
}

fn wants_html(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// `scheme://host` of the request, for building callback URLs.
fn origin(conn: &ConnInfo, host: &str) -> String {
    format!("{}://{host}", if conn.tls { "https" } else { "http" })
}

/// Identifies the caller of `route`. `headers` is modified: identity headers are stripped,
/// the credential removed (unless passed on), and the identity headers for the origin added
/// (`head::identity`). `to` is the request's (host, target), for a login's return.
#[allow(clippy::too_many_arguments)]
pub async fn identify(
    snap: &Arc<Snapshot>,
    route: &RouteRt,
    conn: &ConnInfo,
    headers: &mut HeaderMap,
    method: &http::Method,
    to: (&str, &str),
    rid: &str,
    at: std::time::Instant,
) -> Step {
    if route.public {
        return Step::Continue {
            identity: None,
            set_cookie: None,
        };
    }
    if route.cert_required && conn.client_cert.is_none() {
        // `client_cert: required`: no other credential stands in for the certificate.
        let reason = "client certificate required";
        return Step::Respond(unauthorized(rid, None), reason.into());
    }
    // Credentials stay at the edge (unless the route passes the token on): take them out of
    // the request now, one lookup each.
    let (Ok(authz), Ok(key_header)) = (
        take_one(headers, header::AUTHORIZATION),
        take_one(headers, &X_API_KEY),
    ) else {
        // Each is one credential (RFC 9110 §11.6.2): two would leave whoever reads the
        // request after portcullis to pick another one than it verified.
        let msg = "several Authorization or X-API-Key fields\n";
        let r = crate::exchange::local(StatusCode::BAD_REQUEST, msg, rid);
        return Step::Respond(r, msg.trim_end().into());
    };
    // The token this connection presented last is recognised by its bytes, before any
    // parsing (see `memo`).
    let remembered = authz
        .as_ref()
        .and_then(|v| bearer_bytes(v.as_bytes()))
        .and_then(|t| conn.memo.identity(snap, route, t, at));
    let (identity, set_cookie) = match remembered {
        Some(identity) => (identity, None),
        None => match verify(snap, route, conn, headers, &authz, &key_header).await {
            Ok(v) => v,
            Err(Unverified::Rejected(reason)) => {
                return Step::Respond(unauthorized(rid, Some(&reason)), reason);
            }
            Err(Unverified::Missing { ended }) => {
                return challenge(snap, route, conn, headers, method, to, rid, ended);
            }
        },
    };
    // Read as text only if it goes upstream.
    let bearer = if route.pass_token {
        authz
            .as_ref()
            .and_then(credential_text)
            .and_then(|a| a.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, v)| v.trim())
    } else {
        None
    };
    crate::upstream::head::identity(snap, route, headers, &identity, bearer);
    Step::Continue {
        identity: Some(identity),
        set_cookie: set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()),
    }
}

/// Removes every `name` field from `headers`, in one lookup, and returns its value; `Err` when
/// there were several.
fn take_one(
    headers: &mut HeaderMap,
    name: impl http::header::IntoHeaderName,
) -> Result<Option<HeaderValue>, ()> {
    match headers.entry(name) {
        http::header::Entry::Vacant(_) => Ok(None),
        http::header::Entry::Occupied(o) => {
            let (_, mut values) = o.remove_entry_mult();
            let first = values.next();
            match values.next() {
                None => Ok(first),
                Some(_) => Err(()),
            }
        }
    }
}

/// Why a request has no identity.
enum Unverified {
    /// A credential was refused; the reason.
    Rejected(String),
    /// No credential the route accepts, or a session that ended.
    Missing { ended: bool },
}

/// The full path: the route's providers verify the request's credential (the bearer token,
/// the API key from `Authorization: ApiKey` or `X-API-Key`, the session cookie or the client
/// certificate). A token the provider's cache already knows is remembered for this
/// connection's next request. Also returns a refreshed session cookie to set.
async fn verify(
    snap: &Arc<Snapshot>,
    route: &RouteRt,
    conn: &ConnInfo,
    headers: &HeaderMap,
    authz: &Option<HeaderValue>,
    key_header: &Option<HeaderValue>,
) -> Result<(Arc<Identity>, Option<String>), Unverified> {
    let engine = &snap.identity;
    // Without a sealer there are no sessions, so no cookie to look for.
    let session = if engine.sealer.is_some() {
        cookie(headers, &engine.session.cookie)
    } else {
        None
    };
    let (bearer, mut api_key) = match authz
        .as_ref()
        .and_then(credential_text)
        .map(|a| a.split_once(' '))
    {
        Some(Some((scheme, v))) if scheme.eq_ignore_ascii_case("bearer") => (Some(v.trim()), None),
        Some(Some((scheme, v))) if scheme.eq_ignore_ascii_case("apikey") => {
            (None, Some(v.trim().to_string()))
        }
        _ => (None, None),
    };
    if api_key.is_none() {
        api_key = key_header
            .as_ref()
            .and_then(credential_text)
            .map(|s| s.trim().to_string());
    }
    let creds = Credentials {
        bearer,
        api_key: api_key.as_deref(),
        session_cookie: session,
        client_cert: if route.has_mtls {
            conn.client_cert.as_deref().map(|v| v.as_slice())
        } else {
            None
        },
    };
    let outcome = match bearer.map(|t| (t, engine.bearer_cached(&route.auth, t))) {
        Some((token, Some((identity, proof)))) => {
            conn.memo.remember(snap, route, token, &identity, proof);
            Outcome::Ok {
                identity,
                set_session: None,
            }
        }
        _ => engine.authenticate(&route.auth, &creds).await,
    };
    match outcome {
        Outcome::Ok {
            identity,
            set_session,
        } => Ok((identity, set_session.map(|v| session_cookie(snap, &v)))),
        Outcome::Rejected(e) => Err(Unverified::Rejected(e.reason)),
        Outcome::Missing => Err(Unverified::Missing { ended: false }),
        Outcome::SessionEnded => Err(Unverified::Missing { ended: true }),
    }
}

/// The answer to a request without a credential the route accepts (or whose session has
/// ended): a 302 to the login for a browser's GET when the route has a login provider, else
/// 401 with a bearer challenge. An ended session's cookie is cleared either way.
#[allow(clippy::too_many_arguments)]
fn challenge(
    snap: &Snapshot,
    route: &RouteRt,
    conn: &ConnInfo,
    headers: &HeaderMap,
    method: &http::Method,
    (raw_host, path_and_query): (&str, &str),
    rid: &str,
    ended: bool,
) -> Step {
    let engine = &snap.identity;
    let mut clear = Vec::new();
    if ended {
        clear.push(clear_cookie(
            &engine.session.cookie,
            engine.session.secure,
            "/",
        ));
    }
    if wants_html(headers) && *method == http::Method::GET {
        if let (Some(login), Some(sealer)) = (engine.login_provider(&route.auth), &engine.sealer) {
            let redirect_uri = login
                .redirect_url
                .clone()
                .unwrap_or_else(|| format!("{}/.portcullis/callback", origin(conn, raw_host)));
            match login.start_login(&redirect_uri, path_and_query) {
                Ok((url, pre)) => {
                    if let Some(sealed) = sealer.seal("preauth", &pre) {
                        clear.push(format!(
                            "{PREAUTH_COOKIE}={sealed}{}",
                            cookie_attrs(engine.session.secure, "/.portcullis/", Some(600))
                        ));
                        return Step::Respond(redirect(&url, &clear), "login required".into());
                    }
                }
                Err(e) => {
                    // The provider has not been discovered (it was unreachable at start or
                    // since a reload), so there is nowhere to send the browser: say so, as
                    // an outage (503), rather than ask for credentials nobody can obtain.
                    tracing::warn!(provider = %login.provider, error = %e, "cannot start login");
                    let mut r = login_unavailable(rid, &login.provider);
                    for c in clear {
                        if let Ok(v) = HeaderValue::from_str(&c) {
                            r.headers_mut().append(header::SET_COOKIE, v);
                        }
                    }
                    return Step::Respond(r, "login unavailable: provider not reachable".into());
                }
            }
        }
    }
    let reason = if ended {
        "session ended"
    } else {
        "no credentials"
    };
    let mut r = unauthorized(rid, ended.then_some("session expired"));
    for c in clear {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Step::Respond(r, reason.into())
}

fn query_param(q: &str, name: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves `/.portcullis/*` and `/.well-known/portcullis/jwks.json`. Returns None for any other path.
pub async fn endpoints(
    shared: &std::sync::Arc<crate::Shared>,
    snap: &Snapshot,
    conn: &ConnInfo,
    headers: &HeaderMap,
    path: &str,
    query: &str,
    raw_host: &str,
) -> Option<Response<RespBody>> {
    let engine = &snap.identity;
    match path {
        "/.well-known/portcullis/jwks.json" => {
            let mut r = Response::new(full(engine.signer.jwks().to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            Some(r)
        }
        "/.portcullis/callback" => Some(callback(snap, headers, query).await),
        "/.portcullis/logout" => {
            let secure = engine.session.secure;
            let mut cookies = vec![clear_cookie(&engine.session.cookie, secure, "/")];
            let mut session = None;
            if let (Some(c), Some(sealer)) =
                (cookie(headers, &engine.session.cookie), &engine.sealer)
            {
                session = engine.store.decode(sealer, c);
                match &session {
                    Some(s) => crate::keep_ended(shared, engine.end_login(sealer, c, s)).await,
                    None => engine.store.forget(sealer, c),
                }
            }
            cookies.push(clear_cookie(PREAUTH_COOKIE, secure, "/.portcullis/"));
            let back = format!(
                "{}{}",
                origin(conn, raw_host),
                safe_return_to(&query_param(query, "rd").unwrap_or_else(|| "/".into()))
            );
            let idp = session.as_ref().and_then(|s| {
                engine
                    .provider(&s.identity.provider)
                    .and_then(|p| p.login())
                    .and_then(|l| l.logout_url(Some(s), &back))
            });
            Some(redirect(idp.as_deref().unwrap_or(&back), &cookies))
        }
        _ if path.starts_with("/.portcullis/") => {
            let mut r = Response::new(full(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            Some(r)
        }
        _ => None,
    }
}

async fn callback(snap: &Snapshot, headers: &HeaderMap, query: &str) -> Response<RespBody> {
    let engine = &snap.identity;
    let fail = |reason: &str| {
        tracing::info!(target: "portcullis::auth", reason, "login callback refused");
        let mut r = Response::new(full(format!("login failed: {}\n", quote_safe(reason))));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The reason can hold the provider's words (its `error`): plain text, never sniffed
        // as a page.
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r.headers_mut().insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        r
    };
    let Some(sealer) = &engine.sealer else {
        return fail("browser login is not configured");
    };
    if let Some(err) = query_param(query, "error") {
        return fail(&format!("the identity provider returned `{err}`"));
    }
    let Some(pre) =
        cookie(headers, PREAUTH_COOKIE).and_then(|c| sealer.open::<PreAuth>("preauth", c))
    else {
        return fail("no login in progress (missing or invalid login cookie)");
    };
    let (Some(code), Some(state)) = (query_param(query, "code"), query_param(query, "state"))
    else {
        return fail("callback without code and state");
    };
    let Some(login) = engine.provider(&pre.provider).and_then(|p| p.login()) else {
        return fail("the login's provider is no longer configured");
    };
    let iss = query_param(query, "iss");
    match login
        .finish_login(&pre, &code, &state, iss.as_deref())
        .await
    {
        Ok(session) => {
            let Some(value) = engine.store.encode(sealer, &session) else {
                return fail("cannot seal the session");
            };
            tracing::info!(target: "portcullis::auth", provider = %pre.provider, user = %session.identity.user, "login succeeded");
            let cookies = [
                session_cookie(snap, &value),
                clear_cookie(PREAUTH_COOKIE, engine.session.secure, "/.portcullis/"),
            ];
            redirect(&safe_return_to(&pre.return_to), &cookies)
        }
        Err(e) => fail(&e.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A browser that must log in while the provider has never been discovered (it was down
    /// when the proxy started) gets a 503 that says so, not a 401 asking for credentials that
    /// cannot be obtained; a non-browser still gets the 401 challenge.
    #[tokio::test]
    async fn a_login_without_a_discovered_provider_is_a_503() {
        use crate::testkit::{response, Kit};
        // The kit fetches nothing, so the provider stays undiscovered.
        let kit = Kit::new(
            r#"
identity:
  providers:
    - { name: corp, kind: oidc, issuer: "http://127.0.0.1:9", client_id: px, client_secret: s }
  session: { keys: ["b2xkLXNlc3Npb24ta2V5LTAxMjM0NTY3ODlhYmNkZWY="], secure: false }
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: app, match: { path_prefix: / }, backend: b, auth: [corp], allow: [{}] }
"#,
        )
        .await;
        let browser = http::Request::get("/app")
            .header("host", "example.com")
            .header(header::ACCEPT, "text/html,*/*;q=0.8");
        let mut x = kit.routed(browser).await;
        let r = response(crate::phase::identify::run(&mut x).await);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "10");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert!(r.headers().get(header::LOCATION).is_none());
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("sign-in is unavailable") && body.contains("`corp`"),
            "{body}"
        );
        let audit = kit.audit();
        assert_eq!(
            audit[0]["reasons"][0],
            "authentication: login unavailable: provider not reachable"
        );

        let api = http::Request::get("/app").header("host", "example.com");
        let mut x = kit.routed(api).await;
        let r = response(crate::phase::identify::run(&mut x).await);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn credentials_are_read_as_ascii_only() {
        let token = "Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig".repeat(20);
        let v = HeaderValue::from_str(&token).unwrap();
        assert_eq!(credential_text(&v), Some(token.as_str()));
        assert_eq!(credential_text(&v), v.to_str().ok());
        // obs-text (bytes 0x80 and up) is a valid header value, but no credential.
        let v = HeaderValue::from_bytes(b"Bearer caf\xc3\xa9").unwrap();
        assert_eq!(credential_text(&v), None);
        assert!(v.to_str().is_err());
    }

    /// The bytes compared with a connection's remembered token are the token the full path
    /// reads: after a `Bearer` scheme in any case, without surrounding whitespace; anything
    /// else is no bearer token (and goes the full path).
    #[test]
    fn bearer_bytes_are_the_token_the_full_path_reads() {
        let full = |v: &[u8]| {
            let v = HeaderValue::from_bytes(v).unwrap();
            credential_text(&v)
                .and_then(|a| a.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim().as_bytes().to_vec())
        };
        for v in [
            &b"Bearer abc.def.ghi"[..],
            b"bearer abc",
            b"BEARER  abc \t",
            b"Bearer ",
            b"Bearer\tabc",
            b"Bearerabc",
            b"Basic abc",
            b"ApiKey abc",
            b"Bear",
            b"",
        ] {
            assert_eq!(
                bearer_bytes(v).map(<[u8]>::to_vec),
                full(v),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn cookies_are_removed_individually() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; portcullis_session=xyz; b=2".parse().unwrap(),
        );
        crate::upstream::head::remove_cookie(&mut h, "portcullis_session");
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(percent_decode("a%2Fb+c%zz"), "a/b c%zz");
        assert_eq!(
            query_param("x=1&rd=%2Fapp%3Fq", "rd").as_deref(),
            Some("/app?q")
        );
    }
}
