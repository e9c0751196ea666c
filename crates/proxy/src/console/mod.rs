//! The operator's console: the live dashboard at `/` on the admin listener, its login, and
//! the JSON it reads (see [`data`]).
//!
//! The page is one HTML document and one script, embedded in the binary (no front-end build
//! step: the script is plain JavaScript that reads the admin API, so it is reviewed as it is
//! served). The page is served with a strict Content-Security-Policy (no inline script or
//! style, nothing from elsewhere), and renders nothing secret: only the viewer's name and
//! the CSRF token of the viewer's own cookie.
//!
//! Logging in gives the `portcullis_admin` cookie (see [`grant`]): through an OIDC provider
//! of `admin.auth` that has a login client (authorization code with PKCE, the same flow as a
//! route's login; the callback is `/login/callback` on the admin listener, or
//! `admin.login_redirect_url`), or with a break-glass token of `admin.tokens` typed into the
//! form. Every call the page makes then goes through the admin API's own authentication and
//! Cedar authorization, as any other caller's.

pub mod audit;
pub mod credential;
pub mod data;
pub mod grant;

use crate::admin_authz::{Caller, ClientCert};
use crate::Runtime;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

const PAGE: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Nothing but the console's own script, style and API; no framing, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's pages: outside the admin API's authentication, each checks the cookie
/// itself.
pub fn routes() -> Router<Arc<Runtime>> {
    Router::new()
        .route("/", get(page))
        .route(
            "/assets/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/assets/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/login", get(login_page).post(login_token))
        .route("/login/oidc/{provider}", get(login_oidc))
        .route("/login/callback", get(login_callback))
        .route("/logout", post(logout))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn asset(body: &'static str, ty: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An HTML answer with the console's security headers.
fn html(status: StatusCode, body: String, cookies: &[String]) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // `same-origin`, not `no-referrer`: under `no-referrer` a browser's form post (the
    // break-glass sign-in) says `Origin: null`, which the sign-in's same-origin check must
    // refuse; other sites are still told nothing.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    r
}

fn redirect(to: &str, cookies: &[String]) -> Response {
    let mut r = html(StatusCode::SEE_OTHER, String::new(), cookies);
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether the console cookie should be `Secure`: when the admin listener speaks TLS.
fn secure(snap: &crate::snapshot::Snapshot) -> bool {
    snap.config.admin.as_ref().is_some_and(|a| a.tls.is_some())
}

/// The configured tokens' digests.
pub fn token_digests(snap: &crate::snapshot::Snapshot) -> Vec<[u8; 32]> {
    snap.config
        .admin
        .as_ref()
        .map(|a| {
            a.tokens
                .iter()
                .map(|t| crate::admin_tokens::token_digest(t))
                .collect()
        })
        .unwrap_or_default()
}

/// What a CSRF token is bound to for a caller known by its client certificate alone.
pub fn cert_key(der: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(der);
    format!(
        "cert:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The person a client certificate names, through an `mtls` provider of `admin.auth`.
async fn from_cert(snap: &crate::snapshot::Snapshot, der: &[u8]) -> Option<Caller> {
    let providers = snap
        .config
        .admin
        .as_ref()
        .map(|a| a.auth.as_slice())
        .unwrap_or(&[]);
    let creds = portcullis_identity::engine::Credentials {
        bearer: None,
        api_key: None,
        session_cookie: None,
        client_cert: Some(der),
    };
    match snap.identity.authenticate(providers, &creds).await {
        portcullis_identity::engine::Outcome::Ok { identity, .. } => Some(Caller::Person(identity)),
        _ => None,
    }
}

/// What a console cookie says of its holder.
pub enum Seen {
    /// No cookie, or one that grants nothing (any more).
    Nobody,
    /// The caller, and a refreshed session cookie to send back.
    Caller(Caller, Option<String>),
}

/// The caller the console cookie `value` grants.
pub async fn from_cookie(snap: &crate::snapshot::Snapshot, peer: SocketAddr, value: &str) -> Seen {
    let engine = &snap.identity;
    let sealer = grant::sealer(engine);
    match grant::open(sealer, value, &token_digests(snap)) {
        // Unless its holder signed out with it.
        Some(grant::Grant::Token(_)) if engine.store.is_ended(value) => Seen::Nobody,
        Some(grant::Grant::Token(i)) => Seen::Caller(
            Caller::Token(crate::control::Principal::token(i, peer).who),
            None,
        ),
        Some(grant::Grant::Session(s)) => {
            let providers = snap
                .config
                .admin
                .as_ref()
                .map(|a| a.auth.as_slice())
                .unwrap_or(&[]);
            let creds = portcullis_identity::engine::Credentials {
                bearer: None,
                api_key: None,
                session_cookie: Some(s),
                client_cert: None,
            };
            match engine.authenticate(providers, &creds).await {
                portcullis_identity::engine::Outcome::Ok {
                    identity,
                    set_session,
                } => Seen::Caller(
                    Caller::Person(identity),
                    set_session.map(|v| {
                        grant::set_cookie(
                            grant::COOKIE,
                            Some(&format!("s.{v}")),
                            secure(snap),
                            "/",
                            "Strict",
                        )
                    }),
                ),
                _ => Seen::Nobody,
            }
        }
        None => Seen::Nobody,
    }
}

async fn page(
    State(rt): State<Arc<Runtime>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<ClientCert>>,
    headers: HeaderMap,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let Some(value) = grant::cookie(&headers, grant::COOKIE) else {
        // A client certificate an `mtls` provider accepts is a sign-in of its own.
        if let Some(axum::Extension(c)) = cert {
            if let Some(caller) = from_cert(&snap, &c.0).await {
                return render(&snap, &caller, &cert_key(&c.0), &[]);
            }
        }
        return redirect("/login", &[]);
    };
    let (caller, refreshed) = match from_cookie(&snap, peer, value).await {
        Seen::Caller(c, r) => (c, r),
        Seen::Nobody => {
            let clear = grant::set_cookie(grant::COOKIE, None, secure(&snap), "/", "Strict");
            return redirect("/login?ended=1", &[clear]);
        }
    };
    // The token is made for the cookie the browser will hold from now on.
    let held = refreshed
        .as_deref()
        .and_then(|c| c.split(';').next())
        .and_then(|kv| kv.split_once('=').map(|(_, v)| v.to_string()))
        .unwrap_or_else(|| value.to_string());
    render(&snap, &caller, &held, refreshed.as_slice())
}

/// The page for `caller`, with a CSRF token bound to `held` (the credential the browser
/// sends on its own: the cookie, or the client certificate).
fn render(
    snap: &crate::snapshot::Snapshot,
    caller: &Caller,
    held: &str,
    cookies: &[String],
) -> Response {
    let Some(csrf) = grant::csrf_token(grant::sealer(&snap.identity), held) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot seal a CSRF token\n",
        )
            .into_response();
    };
    let body = PAGE
        .replace("{{csrf}}", &escape(&csrf))
        .replace("{{viewer}}", &escape(&caller.name()))
        .replace("{{version}}", &escape(&snap.config.version));
    html(StatusCode::OK, body, cookies)
}

#[derive(Deserialize)]
struct LoginQuery {
    ended: Option<String>,
}

fn login_html(snap: &crate::snapshot::Snapshot, error: Option<&str>) -> String {
    let admin = snap.config.admin.as_ref();
    let mut providers = String::new();
    for name in admin.map(|a| a.auth.as_slice()).unwrap_or(&[]) {
        if snap
            .identity
            .provider(name)
            .and_then(|p| p.login())
            .is_some()
        {
            let n = escape(name);
            let path: String =
                percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            providers.push_str(&format!(
                "<li><a class=\"button\" id=\"login-{n}\" href=\"/login/oidc/{path}\">Sign in with {n}</a></li>\n"
            ));
        }
    }
    let has_tokens = admin.is_some_and(|a| !a.tokens.is_empty());
    let token_form = if has_tokens {
        "<form method=\"post\" action=\"/login\" id=\"token-form\"><label>Break-glass token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" required></label> <button type=\"submit\">Sign in</button></form>"
    } else {
        ""
    };
    let error = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" id=\"login-error\">{}</p>", escape(e))
    });
    LOGIN
        .replace("{{providers}}", &providers)
        .replace("{{token_form}}", token_form)
        .replace("{{error}}", &error)
}

async fn login_page(State(rt): State<Arc<Runtime>>, Query(q): Query<LoginQuery>) -> Response {
    let snap = rt.shared.snapshot.load_full();
    // The page shows only its own words: no text from the query (which anyone could
    // write into a link to the real console).
    let error = q
        .ended
        .as_ref()
        .map(|_| "Your session has ended: sign in again.");
    html(StatusCode::OK, login_html(&snap, error), &[])
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

/// `POST /login` with a break-glass token: a grant cookie, or the form again.
async fn login_token(
    State(rt): State<Arc<Runtime>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let record = |reason: &str| {
        let rec = crate::audit::admin_auth_failure(peer, "POST", "/login", reason);
        let rt = rt.clone();
        async move { crate::audit::write(&rt.shared, rec).await }
    };
    if !same_origin(&headers) {
        tracing::warn!(%peer, "console login refused: cross-origin form");
        record("console sign-in from another origin").await;
        return html(
            StatusCode::FORBIDDEN,
            login_html(&snap, Some("Cross-site sign-in refused.")),
            &[],
        );
    }
    let Ok(Form(TokenForm { token })) = form else {
        return html(
            StatusCode::BAD_REQUEST,
            login_html(&snap, Some("Type a token.")),
            &[],
        );
    };
    let tokens = snap
        .config
        .admin
        .as_ref()
        .map(|a| a.tokens.as_slice())
        .unwrap_or(&[]);
    let Some(i) = crate::admin_tokens::check_token(token.trim().as_bytes(), tokens) else {
        tracing::warn!(%peer, "console login refused: invalid token");
        record("console sign-in with an invalid token").await;
        return html(
            StatusCode::UNAUTHORIZED,
            login_html(&snap, Some("That token is not valid.")),
            &[],
        );
    };
    let digest = crate::admin_tokens::token_digest(&tokens[i]);
    let Some(v) = grant::token_cookie(grant::sealer(&snap.identity), &digest) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot seal the grant\n").into_response();
    };
    tracing::info!(%peer, who = %crate::control::Principal::token(i, peer).who, "console login with a token");
    let cookie = grant::set_cookie(grant::COOKIE, Some(&v), secure(&snap), "/", "Strict");
    redirect("/", &[cookie])
}

fn same_origin(headers: &HeaderMap) -> bool {
    grant::same_origin(
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    )
}

/// `scheme://host` of the console, as the browser reached it.
fn origin(snap: &crate::snapshot::Snapshot, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if secure(snap) { "https" } else { "http" };
    format!("{scheme}://{host}")
}

/// `GET /login/oidc/{provider}`: to the provider's login, with the login's state sealed in
/// a short-lived cookie.
async fn login_oidc(
    State(rt): State<Arc<Runtime>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let admin = snap.config.admin.as_ref();
    let allowed = admin.is_some_and(|a| a.auth.contains(&provider));
    let login = snap.identity.provider(&provider).and_then(|p| p.login());
    let (true, Some(login), Some(sealer)) = (allowed, login, snap.identity.sealer.as_ref()) else {
        return html(
            StatusCode::NOT_FOUND,
            login_html(&snap, Some("No such sign-in (it needs an `admin.auth` provider with a login client, and `identity.session.keys`).")),
            &[],
        );
    };
    let redirect_uri = admin
        .and_then(|a| a.login_redirect_url.clone())
        .unwrap_or_else(|| format!("{}/login/callback", origin(&snap, &headers)));
    match login.start_login(&redirect_uri, "/") {
        Ok((url, pre)) => match sealer.seal("preauth", &pre) {
            Some(sealed) => {
                // Lax: the provider sends the browser back with a cross-site navigation.
                let c = format!(
                    "{}; Max-Age=600",
                    grant::set_cookie(
                        grant::PREAUTH,
                        Some(&sealed),
                        secure(&snap),
                        "/login/",
                        "Lax"
                    )
                );
                let mut r = redirect(&url, &[c]);
                *r.status_mut() = StatusCode::FOUND;
                r
            }
            None => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot seal the login state\n",
            )
                .into_response(),
        },
        Err(e) => {
            tracing::warn!(provider = %provider, error = %e, "console login cannot start");
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                login_html(
                    &snap,
                    Some(&format!(
                        "The identity provider `{provider}` cannot be reached; try again later."
                    )),
                ),
                &[],
            )
        }
    }
}

#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    /// The provider's name for itself (RFC 9207), when it sends one.
    iss: Option<String>,
}

/// `GET /login/callback`: the provider's answer; a session cookie, then (through a page of
/// its own, so that the `Strict` cookie is sent) the dashboard.
async fn login_callback(
    State(rt): State<Arc<Runtime>>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let engine = &snap.identity;
    let clear_pre = grant::set_cookie(grant::PREAUTH, None, secure(&snap), "/login/", "Lax");
    let fail = |why: &str| {
        tracing::info!(target: "portcullis::auth", reason = why, "console login refused");
        html(
            StatusCode::UNAUTHORIZED,
            login_html(&snap, Some(&format!("Sign-in failed: {why}"))),
            std::slice::from_ref(&clear_pre),
        )
    };
    let Some(sealer) = &engine.sealer else {
        return fail("browser login is not configured");
    };
    if let Some(e) = &q.error {
        return fail(&format!("the identity provider returned `{e}`"));
    }
    let Some(pre) = grant::cookie(&headers, grant::PREAUTH)
        .and_then(|c| sealer.open::<portcullis_identity::session::PreAuth>("preauth", c))
    else {
        return fail("no sign-in in progress");
    };
    let (Some(code), Some(state)) = (&q.code, &q.state) else {
        return fail("the answer has no code and state");
    };
    let allowed = snap
        .config
        .admin
        .as_ref()
        .is_some_and(|a| a.auth.contains(&pre.provider));
    let Some(login) = engine
        .provider(&pre.provider)
        .and_then(|p| p.login())
        .filter(|_| allowed)
    else {
        return fail("the sign-in's provider is no longer configured for the console");
    };
    match login
        .finish_login(&pre, code, state, q.iss.as_deref())
        .await
    {
        Ok(session) => {
            let Some(v) = engine.store.encode(sealer, &session) else {
                return fail("cannot seal the session");
            };
            tracing::info!(target: "portcullis::auth", provider = %pre.provider, user = %session.identity.user, "console login succeeded");
            let cookie = grant::set_cookie(
                grant::COOKIE,
                Some(&format!("s.{v}")),
                secure(&snap),
                "/",
                "Strict",
            );
            let body = "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url=/\"><title>Signed in</title><p>Signed in. <a href=\"/\">Open the console</a>.</p>".to_string();
            html(StatusCode::OK, body, &[cookie, clear_pre.clone()])
        }
        Err(e) => fail(&e.reason),
    }
}

/// `POST /logout` (with the CSRF token): forgets the cookie (and ends the session).
async fn logout(
    State(rt): State<Arc<Runtime>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let engine = &snap.identity;
    let sealer = grant::sealer(engine);
    let Some(value) = grant::cookie(&headers, grant::COOKIE) else {
        return redirect("/login", &[]);
    };
    let token = headers
        .get(grant::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !same_origin(&headers) || !grant::csrf_ok(sealer, value, token) {
        // Recorded, as every other refused console or admin call is.
        let rec = crate::audit::admin_auth_failure(
            peer,
            "POST",
            "/logout",
            "missing or invalid CSRF token",
        );
        crate::audit::write(&rt.shared, rec).await;
        return (StatusCode::FORBIDDEN, "missing or invalid CSRF token\n").into_response();
    }
    if let (Some(s), Some(es)) = (value.strip_prefix("s."), &engine.sealer) {
        match engine.store.decode(es, s) {
            Some(sess) => crate::keep_ended(&rt.shared, engine.end_login(es, s, &sess)).await,
            None => engine.store.forget(es, s),
        }
    }
    // A token's grant is sealed, not kept: a copy of the cookie would open until it
    // expires, so this very value is refused from now until then.
    if let Some(exp) = grant::token_expiry(sealer, value) {
        let ended = engine.store.end(sealer, value, exp);
        crate::keep_ended(&rt.shared, ended.into_iter().collect()).await;
    }
    let clear = grant::set_cookie(grant::COOKIE, None, secure(&snap), "/", "Strict");
    redirect("/login", &[clear])
}

/// Whether a request may come from a browser, so that a credential the browser sends by
/// itself (a client certificate) could have been sent for another site (CSRF). Browsers send
/// `Origin` (or `Sec-Fetch-Site`) with every cross-site request that changes state, and a
/// request they can send across sites without a preflight has a body of a "simple" type
/// (a form's, or text). A request with neither sign, whose body is absent or JSON, is an
/// agent's or `ctl`'s.
pub fn from_a_browser(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site") {
        return true;
    }
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => false,
        Some(ct) => {
            let ct = ct.split(';').next().unwrap_or_default().trim();
            !ct.eq_ignore_ascii_case("application/json")
                && !ct.eq_ignore_ascii_case("application/cloudevents+json")
                && !ct.eq_ignore_ascii_case("application/cloudevents-batch+json")
        }
    }
}

/// Whether a state change made with the console cookie `value` carries its CSRF token and
/// comes from the console's own origin.
pub fn csrf_passes(snap: &crate::snapshot::Snapshot, headers: &HeaderMap, value: &str) -> bool {
    let token = headers
        .get(grant::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    same_origin(headers) && grant::csrf_ok(grant::sealer(&snap.identity), value, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_are_told_from_agents() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(!from_a_browser(&h(&[])));
        assert!(!from_a_browser(&h(&[("content-type", "application/json")])));
        assert!(!from_a_browser(&h(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        assert!(from_a_browser(&h(&[("origin", "https://evil.example")])));
        assert!(from_a_browser(&h(&[("sec-fetch-site", "cross-site")])));
        assert!(from_a_browser(&h(&[(
            "content-type",
            "application/x-www-form-urlencoded"
        )])));
        assert!(from_a_browser(&h(&[("content-type", "text/plain")])));
        assert!(from_a_browser(&h(&[(
            "content-type",
            "multipart/form-data; boundary=x"
        )])));
    }

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        for page in [PAGE, LOGIN] {
            let lower = page.to_ascii_lowercase();
            assert!(!lower.contains("<script>"), "inline script");
            assert!(!lower.contains(" style="), "inline style");
            assert!(!lower.contains("<style"), "inline style sheet");
            // No inline event handler (` onclick=` and the like).
            let handler = lower.split(" on").skip(1).any(|rest| {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                !name.is_empty() && rest[name.len()..].starts_with('=')
            });
            assert!(!handler, "inline event handler");
        }
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
    }
}
