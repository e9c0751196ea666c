//! portcullis against a real OpenID Provider: panva's `oidc-provider` (a certified OP), run
//! from `tests/idp/server.mjs` on loopback. A browser is simulated with reqwest: no automatic
//! redirects, a hand-kept cookie jar (one per host, shared across ports as in a real
//! browser), and the OP's login, consent and logout forms read with regexes.
//!
//! Covered: the browser login (PKCE S256, state, nonce, cookies, identity headers and the
//! assertion), transparent refresh, RP-initiated logout, bearer ID tokens, key rotation at
//! the OP, an OP that is down, tampered and rotated session cookies, open redirects, and the
//! callback's CSRF, PKCE, nonce and code-replay defences.
//!
//! Needs `node` and `tests/idp/node_modules` (`npm ci --prefix tests/idp`; scripts/test.sh
//! does it, and so does the first test here when it is missing).

mod common;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use reqwest::header::{HeaderMap, ACCEPT, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use reqwest::Url;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

use common::idp::{Idp, Ttls, CLIENT_ID, CLIENT_SECRET, TEST_RP_CALLBACK};
/// Two session sealing keys (base64 of 32 bytes).
const SESSION_KEY_OLD: &str = "b2xkLXNlc3Npb24ta2V5LTAxMjM0NTY3ODlhYmNkZWY=";
const SESSION_KEY_NEW: &str = "bmV3LXNlc3Npb24ta2V5LTAxMjM0NTY3ODlhYmNkZWY=";

// ---------------------------------------------------------------------------------------
// The OpenID Provider process (see common::idp): what these tests add to it
// ---------------------------------------------------------------------------------------

impl Idp {
    /// Registers portcullis's callback and post-logout URIs with the OP's client.
    async fn allow_proxy(&self, p: &Proxy) {
        self.control(
            "/client",
            Some(json!({
                "redirect_uris": [p.url("/.portcullis/callback"), TEST_RP_CALLBACK],
                "post_logout_redirect_uris": [p.url("/"), p.url("/bye")],
            })),
        )
        .await;
    }

    /// Runs the code flow as the tests' own client and returns the token response.
    async fn tokens(&self, login: &str) -> Value {
        let d = self.discovery().await;
        let verifier = URL_SAFE_NO_PAD.encode(rand_bytes());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let mut auth = Url::parse(d["authorization_endpoint"].as_str().unwrap()).unwrap();
        auth.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", CLIENT_ID)
            .append_pair("redirect_uri", TEST_RP_CALLBACK)
            .append_pair("scope", "openid email groups")
            .append_pair("state", "test-state")
            .append_pair("nonce", "test-nonce")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        let mut b = Browser::new();
        let back = b.idp_login(&self.issuer, auth.as_str(), login).await;
        assert!(back.starts_with(TEST_RP_CALLBACK), "{back}");
        let q = query(&back);
        assert_eq!(q["state"], "test-state");
        let resp = client()
            .post(d["token_endpoint"].as_str().unwrap())
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", q["code"].as_str()),
                ("redirect_uri", TEST_RP_CALLBACK),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "token endpoint: {v}");
        v
    }

    async fn id_token(&self, login: &str) -> String {
        self.tokens(login).await["id_token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn rand_bytes() -> [u8; 32] {
    // Unique enough for a PKCE verifier in a test: time and a counter through SHA-256.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Sha256::digest(format!("{t}-{n}-{}", std::process::id()).as_bytes()).into()
}

// ---------------------------------------------------------------------------------------
// The simulated browser
// ---------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    url: String,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    /// The `Location`, resolved against the request URL.
    fn location(&self) -> String {
        let l = self
            .headers
            .get(LOCATION)
            .unwrap_or_else(|| panic!("no Location in {} from {}", self.status, self.url))
            .to_str()
            .unwrap();
        Url::parse(&self.url).unwrap().join(l).unwrap().to_string()
    }

    fn raw_location(&self) -> Option<&str> {
        self.headers.get(LOCATION).and_then(|v| v.to_str().ok())
    }

    /// The full `Set-Cookie` line for `name`, if any.
    fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.split_once('=').is_some_and(|(k, _)| k.trim() == name))
            .map(String::from)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

struct JarCookie {
    name: String,
    value: String,
    path: String,
}

/// A browser: no automatic redirects, and a cookie jar for the one host (127.0.0.1) that
/// ignores ports, as browsers do.
struct Browser {
    http: reqwest::Client,
    jar: Vec<JarCookie>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            jar: Vec::new(),
        }
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.jar
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value.clone())
    }

    fn put_cookie(&mut self, name: &str, value: &str, path: &str) {
        self.jar.retain(|c| !(c.name == name && c.path == path));
        self.jar.push(JarCookie {
            name: name.into(),
            value: value.into(),
            path: path.into(),
        });
    }

    fn store(&mut self, headers: &HeaderMap) {
        for line in headers.get_all(SET_COOKIE).iter() {
            let line = line.to_str().unwrap();
            let mut parts = line.split(';');
            let (name, value) = parts.next().unwrap().split_once('=').unwrap();
            let (name, value) = (name.trim(), value.trim());
            let mut path = "/".to_string();
            let mut gone = value.is_empty();
            for a in parts {
                let (k, v) = a.split_once('=').unwrap_or((a, ""));
                match k.trim().to_ascii_lowercase().as_str() {
                    "path" => path = v.trim().to_string(),
                    "max-age" => gone |= v.trim().parse::<i64>().is_ok_and(|n| n <= 0),
                    "expires" => gone |= v.contains("1970"),
                    _ => {}
                }
            }
            self.jar.retain(|c| !(c.name == name && c.path == path));
            if !gone {
                self.put_cookie(name, value, &path);
            }
        }
    }

    fn cookie_header(&self, url: &Url) -> Option<String> {
        let path = url.path();
        let v: Vec<String> = self
            .jar
            .iter()
            .filter(|c| path.starts_with(&c.path) || c.path == "/")
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        (!v.is_empty()).then(|| v.join("; "))
    }

    async fn send(
        &mut self,
        method: reqwest::Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
        html: bool,
    ) -> Resp {
        let u = Url::parse(url).unwrap();
        let mut r = self.http.request(method, u.clone());
        if html {
            r = r.header(ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8");
        }
        if let Some(c) = self.cookie_header(&u) {
            r = r.header(COOKIE, c);
        }
        if let Some(f) = form {
            r = r.form(f);
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        self.store(&headers);
        Resp {
            status,
            url: url.to_string(),
            headers,
            body,
        }
    }

    /// A top-level navigation (`Accept: text/html`).
    async fn get(&mut self, url: &str) -> Resp {
        self.send(reqwest::Method::GET, url, None, true).await
    }

    /// A non-browser request (no `Accept: text/html`), with the jar's cookies.
    async fn api_get(&mut self, url: &str) -> Resp {
        self.send(reqwest::Method::GET, url, None, false).await
    }

    async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> Resp {
        self.send(reqwest::Method::POST, url, Some(form), true)
            .await
    }

    /// Follows an authorization request through the OP's login and consent pages until the
    /// OP redirects off its own origin; returns that URL (the client's redirect URI).
    async fn idp_login(&mut self, issuer: &str, auth_url: &str, login: &str) -> String {
        let form_re =
            regex::Regex::new(r#"(?s)<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>"#).unwrap();
        let prompt_re = regex::Regex::new(r#"name="prompt" value="([a-z]+)""#).unwrap();
        let mut url = auth_url.to_string();
        for _ in 0..20 {
            let r = self.get(&url).await;
            match r.status {
                302 | 303 => {
                    let next = r.location();
                    if !next.starts_with(issuer) {
                        return next;
                    }
                    url = next;
                }
                200 => {
                    let f = form_re
                        .captures(&r.body)
                        .unwrap_or_else(|| panic!("no form at {url}:\n{}", r.body));
                    let action = Url::parse(&url)
                        .unwrap()
                        .join(&f[1].replace("&amp;", "&"))
                        .unwrap()
                        .to_string();
                    let prompt = prompt_re
                        .captures(&f[2])
                        .map(|c| c[1].to_string())
                        .unwrap_or_else(|| panic!("a form without prompt at {url}:\n{}", r.body));
                    let sent = match prompt.as_str() {
                        "login" => {
                            self.post(
                                &action,
                                &[("prompt", "login"), ("login", login), ("password", "x")],
                            )
                            .await
                        }
                        "consent" => self.post(&action, &[("prompt", "consent")]).await,
                        other => panic!("unexpected prompt {other} at {url}"),
                    };
                    assert!(
                        matches!(sent.status, 302 | 303),
                        "{prompt} form: {} {}",
                        sent.status,
                        sent.body
                    );
                    url = sent.location();
                }
                s => panic!("OP answered {s} at {url}:\n{}", r.body),
            }
        }
        panic!("too many redirects from {auth_url}");
    }

    /// Starts a login at `path` on the proxy: returns the authorization URL (the pre-auth
    /// cookie is now in the jar).
    async fn start_login(&mut self, p: &Proxy, path: &str) -> String {
        let r = self.get(&p.url(path)).await;
        assert_eq!(r.status, 302, "{}: {}", path, r.body);
        r.location()
    }

    /// The whole login: GET `path` → OP → callback → back at `path` (the response there).
    async fn login(&mut self, p: &Proxy, idp: &Idp, path: &str, user: &str) -> Resp {
        let auth = self.start_login(p, path).await;
        let back = self.idp_login(&idp.issuer, &auth, user).await;
        assert!(back.starts_with(&p.url("/.portcullis/callback?")), "{back}");
        let cb = self.get(&back).await;
        assert_eq!(cb.status, 302, "callback: {}\n{}", cb.body, p.log_text());
        let target = cb.location();
        self.get(&target).await
    }
}

fn query(url: &str) -> std::collections::HashMap<String, String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Replaces (or removes, with `None`) one query parameter.
fn with_param(url: &str, name: &str, value: Option<&str>) -> String {
    let mut u = Url::parse(url).unwrap();
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut q = u.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        if let Some(v) = value {
            q.append_pair(name, v);
        }
    }
    u.to_string()
}

/// The decoded payload (or header, `part` 0) of a JWT, unverified.
fn jwt_part(token: &str, part: usize) -> Value {
    let seg = token.split('.').nth(part).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

/// `token` with its header's `kid` replaced (the signature no longer matches).
fn with_kid(token: &str, kid: &str) -> String {
    let mut h = jwt_part(token, 0);
    h["kid"] = json!(kid);
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(h.to_string()),
        parts[1],
        parts[2]
    )
}

/// The echo origin's view of one request header.
fn echoed(r: &Resp, name: &str) -> Option<String> {
    r.json()["headers"][name].as_str().map(String::from)
}

// ---------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------

fn config(idp: &Idp, session_keys: &[&str]) -> String {
    let keys: Vec<String> = session_keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        r#"listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
identity:
  providers:
    - name: corp
      kind: oidc
      issuer: "{issuer}"
      client_id: {CLIENT_ID}
      client_secret: {CLIENT_SECRET}
      scopes: [openid, email, groups]
      claims: {{ user: sub, email: email, groups: groups }}
    - {{ name: dev, kind: dev_issuer }}
  session: {{ keys: [{keys}], secure: false }}
backends:
  - {{ name: echo, servers: [{{ address: builtin:echo }}] }}
routes:
  - name: dev-only
    match: {{ path_prefix: /dev-only }}
    backend: echo
    auth: [dev]
    allow: [{{ providers: [dev] }}]
  - name: eng-only
    match: {{ path_prefix: /eng }}
    backend: echo
    auth: [corp]
    allow: [{{ groups: [eng] }}]
  - name: app
    match: {{ path_prefix: / }}
    backend: echo
    auth: [corp]
    allow: [{{ providers: [corp] }}]
    headers:
      upstream: {{ X-User: "{{identity.user}}", X-Email: "{{identity.email}}", X-Groups: "{{identity.groups}}" }}
      assertion: true
"#,
        issuer = idp.issuer,
        keys = keys.join(", ")
    )
}

/// An OP and a proxy that logs in against it.
async fn setup(ttl: Ttls) -> (Idp, Proxy) {
    let idp = Idp::start(ttl).await;
    let p = Proxy::start(&config(&idp, &[SESSION_KEY_OLD])).await;
    idp.allow_proxy(&p).await;
    (idp, p)
}

async fn bearer(p: &Proxy, path: &str, token: &str) -> Resp {
    let url = p.url(path);
    let r = client().get(&url).bearer_auth(token).send().await.unwrap();
    Resp {
        status: r.status().as_u16(),
        url,
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

/// A non-browser request carrying only the session cookie `cookie`.
async fn replay(p: &Proxy, cookie: &str) -> (u16, HeaderMap) {
    replay_at(p, "/app", cookie).await
}

async fn replay_at(p: &Proxy, path: &str, cookie: &str) -> (u16, HeaderMap) {
    let r = client()
        .get(p.url(path))
        .header(COOKIE, format!("portcullis_session={cookie}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.headers().clone())
}

/// Waits until the proxy serves a config different from `before`.
async fn reloaded(p: &Proxy, before: &Value) {
    p.sighup();
    let ok = eventually(Duration::from_secs(10), || async {
        p.config_status().await["version"] != *before
    })
    .await;
    assert!(
        ok,
        "no reload: {}\n{}",
        p.config_status().await,
        p.log_text()
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn browser_login_with_a_real_provider() {
    let (idp, p) = setup(Ttls::default()).await;
    let disco = idp.discovery().await;
    let mut b = Browser::new();

    // A non-browser gets 401, never a redirect; so does a browser's POST.
    let r = b.api_get(&p.url("/app/page")).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let r = b.post(&p.url("/app/page"), &[("a", "b")]).await;
    assert_eq!(r.status, 401);

    // A browser is sent to the OP's authorization endpoint, with PKCE S256, state and nonce.
    let r = b.get(&p.url("/app/page?x=1")).await;
    assert_eq!(r.status, 302, "{}", r.body);
    let auth = r.location();
    assert!(
        auth.starts_with(disco["authorization_endpoint"].as_str().unwrap()),
        "{auth}"
    );
    let q = query(&auth);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], p.url("/.portcullis/callback"));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43, "SHA-256, base64url");
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32, "{q:?}");
    assert_ne!(q["state"], q["nonce"]);
    assert!(q["scope"].split(' ').any(|s| s == "openid"));
    let pre = r.set_cookie("portcullis_auth").expect("pre-auth cookie");
    for attr in ["Path=/.portcullis/", "HttpOnly", "SameSite=Lax"] {
        assert!(pre.contains(attr), "{pre}");
    }
    assert!(
        !pre.contains("Secure"),
        "secure: false for plain HTTP: {pre}"
    );

    // The OP's login and consent pages, then back to the callback.
    let back = b.idp_login(&idp.issuer, &auth, "alice").await;
    let cbq = query(&back);
    assert!(back.starts_with(&p.url("/.portcullis/callback?")), "{back}");
    assert_eq!(cbq["state"], q["state"]);
    assert_eq!(
        cbq.get("iss").map(String::as_str),
        Some(idp.issuer.as_str()),
        "RFC 9207 iss"
    );
    let cb = b.get(&back).await;
    assert_eq!(cb.status, 302, "{}\n{}", cb.body, p.log_text());
    assert_eq!(
        cb.raw_location(),
        Some("/app/page?x=1"),
        "back to the original path"
    );
    let sc = cb.set_cookie("portcullis_session").expect("session cookie");
    for attr in ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age="] {
        assert!(sc.contains(attr), "{sc}");
    }
    let cleared = cb
        .set_cookie("portcullis_auth")
        .expect("pre-auth cookie cleared");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert!(b.cookie("portcullis_auth").is_none());

    // The proxied request carries the identity.
    let r = b.get(&cb.location()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.json();
    assert_eq!(doc["path"], "/app/page");
    assert_eq!(doc["query"], "x=1");
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("alice"));
    assert_eq!(echoed(&r, "x-email").as_deref(), Some("alice@example.com"));
    assert_eq!(echoed(&r, "x-groups").as_deref(), Some("eng"));
    let assertion = echoed(&r, "x-portcullis-assertion").expect("assertion");
    let a = jwt_part(&assertion, 1);
    assert_eq!(a["user"], "alice");
    assert_eq!(a["email"], "alice@example.com");
    assert_eq!(a["groups"], json!(["eng"]));
    assert_eq!(a["provider"], "corp");
    let cookies_upstream = echoed(&r, "cookie").unwrap_or_default();
    assert!(
        !cookies_upstream.contains("portcullis_session"),
        "the session cookie stays at the edge: {cookies_upstream}"
    );
    // A non-browser request with the session cookie works too.
    let r = b.api_get(&p.url("/eng/x")).await;
    assert_eq!(r.status, 200, "alice is in eng");

    // A second user, through the same OP: bob is not in eng.
    let mut bob = Browser::new();
    let r = bob.login(&p, &idp, "/hello", "bob").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("bob"));
    assert_eq!(echoed(&r, "x-groups").as_deref(), Some("sales"));
    let r = bob.get(&p.url("/eng/x")).await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn sessions_refresh_transparently_and_logout_ends_them() {
    // portcullis refreshes 60 s before the tokens expire: with 64 s tokens that is 4 s
    // after login.
    let ttl = Ttls {
        access: 64,
        id: 64,
        ..Ttls::default()
    };
    let (idp, p) = setup(ttl).await;
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "alice").await;
    assert_eq!(r.status, 200);
    assert!(
        r.set_cookie("portcullis_session").is_none(),
        "fresh tokens: no refresh yet"
    );
    let first = b.cookie("portcullis_session").unwrap();

    tokio::time::sleep(Duration::from_millis(4500)).await;
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 200, "{}\n{}", r.body, p.log_text());
    assert!(
        r.set_cookie("portcullis_session").is_some(),
        "refreshed session sent back:\n{}",
        p.log_text()
    );
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("alice"));
    let refreshed = b.cookie("portcullis_session").unwrap();
    assert_ne!(first, refreshed);
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.set_cookie("portcullis_session").is_none(),
        "no second refresh"
    );

    // Logout: the cookie is cleared and the browser goes to the OP's end_session endpoint
    // with id_token_hint and a same-site post-logout URI.
    let end_session = idp.discovery().await["end_session_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let r = b.get(&p.url("/.portcullis/logout?rd=/bye")).await;
    assert_eq!(r.status, 302);
    let clear = r.set_cookie("portcullis_session").expect("cleared");
    assert!(clear.contains("Max-Age=0"), "{clear}");
    assert!(b.cookie("portcullis_session").is_none());
    let out = r.location();
    assert!(out.starts_with(&end_session), "{out}");
    let q = query(&out);
    assert_eq!(q["post_logout_redirect_uri"], p.url("/bye"));
    assert_eq!(q["client_id"], CLIENT_ID);
    let hint = &q["id_token_hint"];
    assert_eq!(jwt_part(hint, 1)["sub"], "alice");
    assert_eq!(jwt_part(hint, 1)["aud"], CLIENT_ID);

    // The OP asks for confirmation, then sends the browser back.
    let page = b.get(&out).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let xsrf = regex::Regex::new(r#"name="xsrf" value="([^"]+)""#)
        .unwrap()
        .captures(&page.body)
        .unwrap_or_else(|| panic!("no logout form:\n{}", page.body))[1]
        .to_string();
    let action = regex::Regex::new(r#"id="op.logoutForm" method="post" action="([^"]+)""#)
        .unwrap()
        .captures(&page.body)
        .unwrap()[1]
        .to_string();
    let done = b.post(&action, &[("xsrf", &xsrf), ("logout", "yes")]).await;
    assert!(matches!(done.status, 302 | 303), "{}", done.body);
    assert!(
        done.location().starts_with(&p.url("/bye")),
        "{}",
        done.location()
    );

    // The browser has no session now: the next navigation starts a new login.
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 302);
    assert!(r.location().starts_with(&idp.issuer));

    // A copy of the logged-out cookie (inline or server-side, cached or not) no longer
    // opens, and is cleared.
    let (status, h) = replay(&p, &refreshed).await;
    assert_eq!(status, 401, "a logged-out session still opens");
    let clears = h
        .get_all(SET_COOKIE)
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("portcullis_session=;"));
    assert!(clears, "an ended session is cleared: {h:?}");
    // Nor does a copy from before the refresh: the logout ended the session, not a cookie.
    let (status, _) = replay(&p, &first).await;
    assert_eq!(status, 401, "the copy from before the refresh still opens");
    // The ID token the logout showed the browser (`id_token_hint`) opens no route as a
    // bearer token any more.
    let r = bearer(&p, "/api/x", hint).await;
    assert_eq!(
        r.status, 401,
        "the logout's ID token still opens: {}",
        r.body
    );
}

#[tokio::test]
async fn a_session_opens_only_the_routes_that_accept_its_provider() {
    let (idp, p) = setup(Ttls::default()).await;
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "alice").await;
    assert_eq!(r.status, 200);
    let cookie = b.cookie("portcullis_session").unwrap();
    // Opened (and from then on served from the session cache) where `corp` is accepted...
    for _ in 0..3 {
        assert_eq!(replay(&p, &cookie).await.0, 200);
    }
    // ...and refused, cached or not, where only another provider is.
    let (status, h) = replay_at(&p, "/dev-only/x", &cookie).await;
    assert_eq!(status, 401, "{}", p.log_text());
    let challenge = h.get(WWW_AUTHENTICATE).unwrap().to_str().unwrap();
    assert!(challenge.contains("does not accept"), "{challenge}");
    assert_eq!(replay(&p, &cookie).await.0, 200);
}

#[tokio::test]
async fn bearer_id_tokens_from_the_provider() {
    let (idp, p) = setup(Ttls::default()).await;
    let tokens = idp.tokens("carol").await;
    let id = tokens["id_token"].as_str().unwrap();
    let r = bearer(&p, "/api/x", id).await;
    assert_eq!(r.status, 200, "{}\n{}", r.body, p.log_text());
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("carol"));
    assert_eq!(echoed(&r, "x-email").as_deref(), Some("carol@example.com"));
    assert_eq!(echoed(&r, "x-groups").as_deref(), Some("eng,admins"));
    assert!(
        echoed(&r, "authorization").is_none(),
        "the token stays at the edge"
    );
    let r = bearer(&p, "/eng/x", id).await;
    assert_eq!(r.status, 200);

    // Tampering anywhere fails: a changed claim, a changed signature, `alg: none`.
    let parts: Vec<&str> = id.split('.').collect();
    let mut claims = jwt_part(id, 1);
    claims["sub"] = json!("admin");
    claims["groups"] = json!(["eng", "admins", "root"]);
    let forged_payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 0x40;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    for (what, t) in [
        ("claims", forged),
        ("signature", bad_sig),
        ("alg none", none),
    ] {
        let r = bearer(&p, "/api/x", &t).await;
        assert_eq!(r.status, 401, "{what}");
        let www = r.headers["www-authenticate"].to_str().unwrap();
        assert!(www.contains("invalid_token"), "{what}: {www}");
    }
    // The OP's access token is opaque here: not a JWT portcullis could check.
    let at = tokens["access_token"].as_str().unwrap();
    assert_eq!(bearer(&p, "/api/x", at).await.status, 401);
    // The original still works (the failures did not poison the cache).
    assert_eq!(bearer(&p, "/api/x", id).await.status, 200);
}

#[tokio::test]
async fn provider_key_rotation_is_picked_up_without_restart() {
    let (idp, p) = setup(Ttls::default()).await;
    let first = idp.id_token("alice").await;
    let kid1 = jwt_part(&first, 0)["kid"].as_str().unwrap().to_string();
    assert_eq!(bearer(&p, "/api/x", &first).await.status, 200);

    // A token with an unknown kid makes portcullis refetch the keys (and refuse it), so the
    // rotation below comes right after a fetch.
    assert_eq!(
        bearer(&p, "/api/x", &with_kid(&first, "no-such-key"))
            .await
            .status,
        401
    );

    // A new key signs from now on; the old one stays published.
    let kid2 = idp.rotate(false).await;
    let second = idp.id_token("alice").await;
    assert_eq!(jwt_part(&second, 0)["kid"], kid2.as_str());
    assert_ne!(kid1, kid2);
    // The new kid makes portcullis refetch the keys, without a restart or a reload.
    // Refetches are rate-limited (one per 2 s), so a kid seen too soon after the last fetch
    // may be refused once, but must not be shut out for the negative-cache period (30 s).
    let ok = eventually(Duration::from_secs(6), || async {
        bearer(&p, "/api/x", &second).await.status == 200
    })
    .await;
    assert!(ok, "new kid not accepted:\n{}", p.log_text());
    assert_eq!(
        bearer(&p, "/api/x", &first).await.status,
        200,
        "old kid kept"
    );

    // The browser login validates ID tokens signed with the new key too.
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "bob").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("bob"));

    // A rotation that drops the old keys: the new kid works, the retired one stops.
    let kid3 = idp.rotate(true).await;
    let third = idp.id_token("alice").await;
    assert_eq!(jwt_part(&third, 0)["kid"], kid3.as_str());
    let ok = eventually(Duration::from_secs(6), || async {
        bearer(&p, "/api/x", &third).await.status == 200
    })
    .await;
    assert!(ok, "third kid not accepted:\n{}", p.log_text());
    assert_eq!(
        bearer(&p, "/api/x", &first).await.status,
        401,
        "a token signed by a key the OP no longer publishes"
    );
    assert_eq!(bearer(&p, "/api/x", &second).await.status, 401);
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_provider_is_down() {
    let (idp, p) = setup(Ttls::default()).await;
    let seen = idp.id_token("alice").await;
    let fresh = idp.id_token("bob").await;
    assert_eq!(bearer(&p, "/api/x", &seen).await.status, 200);

    idp.stop().await;
    assert!(
        client()
            .get(format!("{}/jwks", idp.issuer))
            .send()
            .await
            .is_err(),
        "the OP is down"
    );
    // A token portcullis has never seen, signed with the known key, validates from the key
    // cache alone; one it has seen comes from the token cache.
    let r = bearer(&p, "/api/x", &fresh).await;
    assert_eq!(r.status, 200, "{}\n{}", r.body, p.log_text());
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("bob"));
    assert_eq!(bearer(&p, "/api/x", &seen).await.status, 200);
    // An unknown kid cannot be looked up while the OP is down: refused, not an error.
    let odd = with_kid(&fresh, "not-a-known-key");
    assert_eq!(bearer(&p, "/api/x", &odd).await.status, 401);
    // A browser login cannot complete, but portcullis still sends the browser to the OP
    // (discovery is cached) rather than failing.
    let mut b = Browser::new();
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 302);
    assert!(r.location().starts_with(&idp.issuer));

    // The OP comes back with a new key: accepted again.
    idp.resume().await;
    let kid = idp.rotate(false).await;
    let after = idp.id_token("alice").await;
    assert_eq!(jwt_part(&after, 0)["kid"], kid.as_str());
    let ok = eventually(Duration::from_secs(6), || async {
        bearer(&p, "/api/x", &after).await.status == 200
    })
    .await;
    assert!(ok, "{}", p.log_text());
}

#[tokio::test]
async fn tampered_session_cookies_are_no_session() {
    let (idp, p) = setup(Ttls::default()).await;
    let mut b = Browser::new();
    assert_eq!(b.login(&p, &idp, "/app", "alice").await.status, 200);
    let good = b.cookie("portcullis_session").unwrap();

    let mut raw = URL_SAFE_NO_PAD.decode(&good).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    let flipped = URL_SAFE_NO_PAD.encode(&raw);
    for (what, bad) in [
        ("one bit flipped", flipped),
        ("truncated", good[..good.len() - 8].to_string()),
        ("garbage", "not-a-session".to_string()),
    ] {
        let mut t = Browser::new();
        t.put_cookie("portcullis_session", &bad, "/");
        let r = t.api_get(&p.url("/app")).await;
        assert_eq!(r.status, 401, "{what}");
        t.put_cookie("portcullis_session", &bad, "/");
        let r = t.get(&p.url("/app")).await;
        assert_eq!(r.status, 302, "{what}: a browser logs in again");
        assert!(r.location().starts_with(&idp.issuer), "{what}");
        let clear = r.set_cookie("portcullis_session").unwrap_or_default();
        assert!(
            clear.contains("Max-Age=0"),
            "{what}: bad cookie cleared: {clear}"
        );
    }
    // A pre-auth cookie is no session cookie (the sealing purpose is bound).
    let mut t = Browser::new();
    let _ = t.start_login(&p, "/app").await;
    let pre = t.cookie("portcullis_auth").unwrap();
    t.put_cookie("portcullis_session", &pre, "/");
    assert_eq!(t.api_get(&p.url("/app")).await.status, 401);
    // The untouched cookie still works.
    assert_eq!(b.api_get(&p.url("/app")).await.status, 200);
}

#[tokio::test]
async fn session_keys_rotate_on_reload() {
    let (idp, p) = setup(Ttls::default()).await;
    let mut b = Browser::new();
    assert_eq!(b.login(&p, &idp, "/app", "alice").await.status, 200);
    let sealed_old = b.cookie("portcullis_session").unwrap();

    // [new, old]: new cookies are sealed with the new key; old ones still open.
    let v = p.config_status().await["version"].clone();
    p.write_config(&config(&idp, &[SESSION_KEY_NEW, SESSION_KEY_OLD]));
    reloaded(&p, &v).await;
    let r = b.api_get(&p.url("/app")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("alice"));
    let mut b2 = Browser::new();
    assert_eq!(b2.login(&p, &idp, "/app", "bob").await.status, 200);
    let sealed_new = b2.cookie("portcullis_session").unwrap();
    // A session logged out before a reload stays logged out after it.
    let mut b3 = Browser::new();
    assert_eq!(b3.login(&p, &idp, "/app", "carol").await.status, 200);
    let carols = b3.cookie("portcullis_session").unwrap();
    assert_eq!(b3.get(&p.url("/.portcullis/logout")).await.status, 302);
    assert_eq!(replay(&p, &carols).await.0, 401);

    // [new] only: the old cookie no longer opens, the new one does.
    let v = p.config_status().await["version"].clone();
    p.write_config(&config(&idp, &[SESSION_KEY_NEW]));
    reloaded(&p, &v).await;
    assert_eq!(replay(&p, &sealed_old).await.0, 401, "retired key");
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 302, "a browser logs in again");
    let clear = r.set_cookie("portcullis_session").unwrap_or_default();
    assert!(clear.contains("Max-Age=0"), "the dead cookie is cleared");
    assert_eq!(b2.api_get(&p.url("/app")).await.status, 200);
    assert_eq!(b2.cookie("portcullis_session"), Some(sealed_new));
    assert_eq!(
        replay(&p, &carols).await.0,
        401,
        "a logout outlives the reload that changed the session keys"
    );
}

#[tokio::test]
async fn redirects_never_leave_the_site() {
    let (idp, p) = setup(Ttls::default()).await;
    let home = p.url("/");

    // Logout without a session goes back to `rd` only when it is a local path.
    let mut b = Browser::new();
    for rd in [
        "https://evil.example",
        "https%3A%2F%2Fevil.example",
        "//evil.example",
        "%2F%2Fevil.example",
        "/%5Cevil.example",
        "%2F%5Cevil.example",
        "evil.example",
        "/ok%0d%0aLocation:%20https://evil.example",
    ] {
        let r = b.get(&p.url(&format!("/.portcullis/logout?rd={rd}"))).await;
        assert_eq!(r.status, 302, "{rd}");
        let loc = r.raw_location().unwrap();
        assert_eq!(loc, home, "{rd}");
    }
    let r = b.get(&p.url("/.portcullis/logout?rd=/fine?x=1")).await;
    assert_eq!(r.raw_location(), Some(p.url("/fine?x=1").as_str()));

    // With a session, the OP is told to come back to this site only.
    assert_eq!(b.login(&p, &idp, "/app", "alice").await.status, 200);
    let r = b
        .get(&p.url("/.portcullis/logout?rd=https://evil.example"))
        .await;
    let q = query(&r.location());
    assert_eq!(q["post_logout_redirect_uri"], home);

    // A login started from `//evil.example/...` ends on this site: the path is merged to
    // its canonical `/evil.example/x` before anything reads it, never a scheme-relative URL.
    let mut b = Browser::new();
    let auth = b.start_login(&p, "//evil.example/x").await;
    let back = b.idp_login(&idp.issuer, &auth, "alice").await;
    let cb = b.get(&back).await;
    assert_eq!(cb.status, 302);
    assert_eq!(cb.raw_location(), Some("/evil.example/x"));

    // A forged Host makes portcullis ask for an unregistered redirect_uri: the OP refuses
    // it and redirects nowhere.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(p.url("/app"))
        .header("host", "evil.example")
        .header(ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let auth = r.headers()[LOCATION].to_str().unwrap().to_string();
    assert_eq!(
        query(&auth)["redirect_uri"],
        "http://evil.example/.portcullis/callback"
    );
    let r = Browser::new().get(&auth).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.raw_location().is_none());
    assert!(r.body.contains("redirect_uri"), "{}", r.body);
}

#[tokio::test]
async fn the_callback_refuses_csrf_pkce_nonce_and_replay() {
    let (idp, p) = setup(Ttls::default()).await;
    let no_session = |r: &Resp| {
        r.set_cookie("portcullis_session")
            .is_none_or(|c| c.contains("Max-Age=0"))
    };

    // 1. A wrong state: refused before the code is used.
    let mut b = Browser::new();
    let auth = b.start_login(&p, "/app").await;
    let back = b.idp_login(&idp.issuer, &auth, "alice").await;
    let r = b
        .get(&with_param(&back, "state", Some("attacker-state")))
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(no_session(&r));
    assert!(r.body.contains("state"), "{}", r.body);
    // 2. No pre-auth cookie (a callback forced on a victim's browser).
    let mut victim = Browser::new();
    let r = victim.get(&back).await;
    assert_eq!(r.status, 401);
    assert!(no_session(&r));
    assert!(r.body.contains("no login in progress"), "{}", r.body);
    // 3. The genuine callback still works: the failures burned nothing.
    let pre = b.cookie("portcullis_auth").expect("pre-auth cookie kept");
    let ok = b.get(&back).await;
    assert_eq!(ok.status, 302, "{}", ok.body);
    assert!(ok.set_cookie("portcullis_session").is_some());
    // 4. Replaying the spent code, even with the login's own pre-auth cookie (state and
    //    PKCE verifier right): the OP refuses it.
    let mut replayer = Browser::new();
    replayer.put_cookie("portcullis_auth", &pre, "/.portcullis/");
    let r = replayer.get(&back).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(no_session(&r));

    // 5. Another login's pre-auth cookie with this login's code: the states differ.
    let mut a = Browser::new();
    let auth_a = a.start_login(&p, "/a").await;
    let back_a = a.idp_login(&idp.issuer, &auth_a, "alice").await;
    let mut m = Browser::new();
    let _ = m.start_login(&p, "/m").await;
    let r = m.get(&back_a).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(no_session(&r));
    // ... and with that login's state too: PKCE binds the code to its own verifier.
    let m_state = query(&m.start_login(&p, "/m2").await)["state"].clone();
    let r = m.get(&with_param(&back_a, "state", Some(&m_state))).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(no_session(&r));
    assert!(r.body.contains("token endpoint refused"), "{}", r.body);

    // 6. The nonce: an authorization request altered to carry another nonce (the PKCE
    //    challenge and state untouched) yields a valid code and a genuine ID token whose
    //    nonce is not this login's: refused.
    let mut n = Browser::new();
    let auth_n = n.start_login(&p, "/n").await;
    for altered in [
        with_param(&auth_n, "nonce", Some("replayed-nonce")),
        with_param(&auth_n, "nonce", None),
    ] {
        let back_n = n.idp_login(&idp.issuer, &altered, "alice").await;
        let r = n.get(&back_n).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(no_session(&r));
        assert!(r.body.contains("nonce"), "{}", r.body);
    }
    // The unaltered request still completes.
    let back_n = n.idp_login(&idp.issuer, &auth_n, "alice").await;
    assert_eq!(n.get(&back_n).await.status, 302);

    // 7. The OP's error answer (the user cancelled) is refused.
    let mut c = Browser::new();
    let auth_c = c.start_login(&p, "/c").await;
    let r = c
        .get(&p.url(&format!(
            "/.portcullis/callback?error=access_denied&state={}",
            query(&auth_c)["state"]
        )))
        .await;
    assert_eq!(r.status, 401);
    assert!(no_session(&r));
    // The provider's words are shown as plain text, never as a page.
    let r = c
        .get(&p.url(&format!(
            "/.portcullis/callback?error=%3Cscript%3Ealert(1)%3C/script%3E&state={}",
            query(&auth_c)["state"]
        )))
        .await;
    assert_eq!(r.status, 401);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "{ct:?}");

    // 8. A mix-up (RFC 9207): an answer that names another issuer than the login's
    //    provider is refused before its code goes anywhere; and, since this provider names
    //    itself in every answer, one that names no issuer is refused too. The genuine one
    //    still completes.
    let mut x = Browser::new();
    let auth_x = x.start_login(&p, "/x").await;
    let back_x = x.idp_login(&idp.issuer, &auth_x, "alice").await;
    assert_eq!(
        query(&back_x).get("iss").map(String::as_str),
        Some(idp.issuer.as_str()),
        "the provider names itself: {back_x}"
    );
    let r = x
        .get(&with_param(&back_x, "iss", Some("https://evil.example")))
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(no_session(&r));
    assert!(r.body.contains("mix-up"), "{}", r.body);
    let r = x.get(&with_param(&back_x, "iss", None)).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("does not name its issuer"), "{}", r.body);
    assert_eq!(x.get(&back_x).await.status, 302);
}

#[tokio::test]
async fn concurrent_requests_while_a_refresh_is_due() {
    // An OP that rotates refresh tokens and revokes the grant when a spent one is reused
    // (as OAuth 2.0 Security BCP recommends). A page load sends several requests at once
    // with the same cookie; when its refresh is due, all must keep working.
    let ttl = Ttls {
        access: 64,
        id: 64,
        rotate_refresh: true,
    };
    let (idp, p) = setup(ttl).await;
    let mut b = Browser::new();
    assert_eq!(b.login(&p, &idp, "/app", "alice").await.status, 200);
    let cookie = b.cookie("portcullis_session").unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let p = &p;
    let cookie = &cookie;
    let results = futures_util::future::join_all((0..4).map(|_| async move {
        let (status, h) = replay(p, cookie).await;
        let set = h
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>();
        (status, set)
    }))
    .await;
    for (status, set) in &results {
        assert_eq!(*status, 200, "{results:?}\n{}", p.log_text());
        assert!(set.iter().all(|c| !c.contains("Max-Age=0")), "{results:?}");
    }
    // A request sent with the old cookie after the refresh (it was in flight) also works,
    // and so does the newest cookie.
    let (status, _) = replay(p, cookie).await;
    assert_eq!(status, 200, "{}", p.log_text());
    let newest = results
        .iter()
        .flat_map(|(_, set)| set.iter())
        .find_map(|c| {
            c.strip_prefix("portcullis_session=")
                .map(|v| v.split(';').next().unwrap().to_string())
        })
        .expect("a refreshed cookie");
    assert_eq!(replay(p, &newest).await.0, 200, "{}", p.log_text());
}

/// A cookie whose refresh the provider refuses (a spent refresh token, a revoked grant) and
/// that a client keeps replaying asks the token endpoint once, not once per request.
#[tokio::test]
async fn a_refused_refresh_is_not_asked_again_for_each_replay() {
    let ttl = Ttls {
        access: 64,
        id: 64,
        rotate_refresh: false,
    };
    let (idp, p) = setup(ttl).await;
    let mut b = Browser::new();
    assert_eq!(b.login(&p, &idp, "/app", "alice").await.status, 200);
    let cookie = b.cookie("portcullis_session").unwrap();
    let before = idp.control("/refuse_tokens", None).await["token_requests"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for _ in 0..6 {
        let (status, _) = replay(&p, &cookie).await;
        assert_ne!(status, 200, "{}", p.log_text());
    }
    let state = idp.control("/refuse_tokens?on=0", None).await;
    assert_eq!(
        state["token_requests"].as_u64().unwrap(),
        before + 1,
        "{state}\n{}",
        p.log_text()
    );
}

#[tokio::test]
async fn portcullis_starts_before_the_provider_is_up() {
    let idp = Idp::start(Ttls::default()).await;
    idp.stop().await;
    let p = Proxy::start(&config(&idp, &[SESSION_KEY_OLD])).await;
    idp.allow_proxy(&p).await;
    // No discovery yet: a browser cannot be sent anywhere, and gets a 503 that says so.
    let mut b = Browser::new();
    let r = b.get(&p.url("/app")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("sign-in is unavailable"), "{}", r.body);
    // A non-browser still gets the 401 challenge.
    assert_eq!(b.api_get(&p.url("/app")).await.status, 401);

    idp.resume().await;
    let token = idp.id_token("alice").await;
    // The first token from the OP makes portcullis discover it and fetch its keys.
    let ok = eventually(Duration::from_secs(6), || async {
        bearer(&p, "/api/x", &token).await.status == 200
    })
    .await;
    assert!(ok, "{}", p.log_text());
    let r = b.login(&p, &idp, "/app", "bob").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(echoed(&r, "x-user").as_deref(), Some("bob"));
}

/// Revoking a principal's sessions (the control path's `revoke_sessions`, here through the
/// admin API) ends every session it opened until then, and the revocation holds after a
/// restart; a new login opens again.
#[tokio::test]
async fn revoked_sessions_stay_revoked_across_a_restart() {
    let (idp, mut p) = setup(Ttls::default()).await;
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "alice").await;
    assert_eq!(r.status, 200);
    let cookie = b.cookie("portcullis_session").unwrap();
    assert_eq!(replay(&p, &cookie).await.0, 200);
    let (s, body) = p
        .admin(
            reqwest::Method::POST,
            "/api/v1/sessions/revoke",
            Some(serde_json::json!({ "principal": "corp/alice" })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = replay(&p, &cookie).await;
    assert_ne!(s, 200, "a revoked session still opens");
    let (s, body) = p
        .admin(
            reqwest::Method::POST,
            "/api/v1/sessions/revoke",
            Some(serde_json::json!({ "principal": "nobody" })),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    // After a restart on the same state directory, still revoked.
    p.signal(libc::SIGKILL);
    let _ = p.child.wait();
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    drop(p);
    let p = Proxy::start_in(dir, &config(&idp, &[SESSION_KEY_OLD])).await;
    let (s, _) = replay(&p, &cookie).await;
    assert_ne!(
        s,
        200,
        "the revocation was lost at restart:\n{}",
        p.log_text()
    );
}

/// A logout holds after a crash and restart on the same state directory: a copy of the
/// session's cookie (from before it) and the ID token the logout showed the browser stay
/// refused; a new login opens again.
#[tokio::test]
async fn a_logout_holds_across_a_restart() {
    let (idp, mut p) = setup(Ttls::default()).await;
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "alice").await;
    assert_eq!(r.status, 200);
    let cookie = b.cookie("portcullis_session").unwrap();
    let r = b.get(&p.url("/.portcullis/logout?rd=/bye")).await;
    assert_eq!(r.status, 302);
    let hint = query(&r.location())["id_token_hint"].clone();
    assert_eq!(replay(&p, &cookie).await.0, 401);
    assert_eq!(bearer(&p, "/api/x", &hint).await.status, 401);

    p.signal(libc::SIGKILL);
    let _ = p.child.wait();
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    drop(p);
    let p = Proxy::start_in(dir, &config(&idp, &[SESSION_KEY_OLD])).await;
    let (s, _) = replay(&p, &cookie).await;
    assert_eq!(s, 401, "the logout was lost at restart:\n{}", p.log_text());
    let r = bearer(&p, "/api/x", &hint).await;
    assert_eq!(
        r.status, 401,
        "the logout's ID token opens again: {}",
        r.body
    );
    idp.allow_proxy(&p).await;
    let mut b = Browser::new();
    let r = b.login(&p, &idp, "/app", "alice").await;
    assert_eq!(r.status, 200, "{}", r.body);
}
