//! Chaos under load: each test keeps a few clients sending requests through the real binary
//! (see `common::load::Load`) while one dependency fails, and checks that the proxy does what
//! the docs promise for that failure, then recovers when the dependency comes back:
//!
//! 1. the OpenID Provider stops (sessions and tokens signed by known keys keep working, a
//!    token signed by a key the proxy never saw fails closed, a browser login on a proxy that
//!    never reached the provider gets a clear 503, and the new key is accepted once the
//!    provider is back, without a restart);
//! 2. an external authorizer hangs (`on_error` applies within its `timeout`, no request
//!    hangs, calls in flight stay bounded);
//! 3. the audit disk fills up (with `on_overload: fail_closed` requests needing a record get
//!    503, with `wait` they wait for space; nothing acknowledged is lost, the chain verifies,
//!    writes resume when space returns, and a SIGTERM while waiting stops the proxy in time);
//! 4. Redis is killed and restarted (`on_store_error` decides while it is down, the proxy uses
//!    Redis again when it is back);
//! 5. both origins of a backend flap every 500 ms (retries and passive ejection leave no 5xx).
//!
//! Each test prints one `chaos figure:` line (run with `--nocapture`); docs/reliability.md
//! quotes them. The tests that measure take turns (one lock), so that one test's load does not
//! skew another's figures; the OpenID Provider test mostly waits, and runs beside them.
//!
//! Needs `node` with `tests/idp/node_modules` (as tests/oidc.rs), `redis-server` (as
//! tests/fleet.rs), and root for `mount -t tmpfs` (the audit test is skipped, with a printed
//! reason, where mounting is not allowed).

mod common;
use common::idp::{Idp, Ttls, CLIENT_ID, CLIENT_SECRET, TEST_RP_CALLBACK};
use common::load::{mint, Flapping, Load, Redis, Samples, Tmpfs};
use common::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use reqwest::header::{ACCEPT, COOKIE, LOCATION, SET_COOKIE};
use reqwest::Url;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The tests that measure under load take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

// ---------------------------------------------------------------------------------------
// 1. The OpenID Provider stops
// ---------------------------------------------------------------------------------------

const SESSION_KEY: &str = "b2xkLXNlc3Npb24ta2V5LTAxMjM0NTY3ODlhYmNkZWY=";

/// A browser as far as the OP's login needs one: no automatic redirects, and one cookie jar
/// for 127.0.0.1 whatever the port, as browsers keep them.
struct Browser {
    http: reqwest::Client,
    /// (name, value, path)
    jar: Vec<(String, String, String)>,
}

struct Page {
    status: u16,
    location: Option<String>,
    body: String,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jar: Vec::new(),
        }
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.jar.iter().find(|c| c.0 == name).map(|c| c.1.clone())
    }

    async fn send(&mut self, url: &str, form: Option<&[(&str, &str)]>) -> Page {
        let u = Url::parse(url).unwrap();
        let mut r = match form {
            Some(f) => self.http.post(u.clone()).form(f),
            None => self.http.get(u.clone()),
        }
        .header(ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8");
        let cookies: Vec<String> = self
            .jar
            .iter()
            .filter(|c| u.path().starts_with(&c.2))
            .map(|c| format!("{}={}", c.0, c.1))
            .collect();
        if !cookies.is_empty() {
            r = r.header(COOKIE, cookies.join("; "));
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        for line in resp.headers().get_all(SET_COOKIE) {
            let line = line.to_str().unwrap();
            let mut attrs = line.split(';');
            let (name, value) = attrs.next().unwrap().split_once('=').unwrap();
            let (name, value) = (name.trim().to_string(), value.trim().to_string());
            let mut path = "/".to_string();
            let mut gone = value.is_empty();
            for a in attrs {
                let (k, v) = a.split_once('=').unwrap_or((a, ""));
                match k.trim().to_ascii_lowercase().as_str() {
                    "path" => path = v.trim().to_string(),
                    "max-age" => gone |= v.trim().parse::<i64>().is_ok_and(|n| n <= 0),
                    "expires" => gone |= v.contains("1970"),
                    _ => {}
                }
            }
            self.jar.retain(|c| !(c.0 == name && c.2 == path));
            if !gone {
                self.jar.push((name, value, path));
            }
        }
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(LOCATION)
            .map(|l| u.join(l.to_str().unwrap()).unwrap().to_string());
        Page {
            status,
            location,
            body: resp.text().await.unwrap_or_default(),
        }
    }

    /// Follows an authorization request through the OP's login and consent forms; returns
    /// the URL the OP finally sends the browser to (the client's redirect URI).
    async fn through_op(&mut self, issuer: &str, auth_url: &str, login: &str) -> String {
        let form_re =
            regex::Regex::new(r#"(?s)<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>"#).unwrap();
        let prompt_re = regex::Regex::new(r#"name="prompt" value="([a-z]+)""#).unwrap();
        let mut url = auth_url.to_string();
        for _ in 0..20 {
            let page = self.send(&url, None).await;
            let next = match page.status {
                302 | 303 => page.location.unwrap(),
                200 => {
                    let f = form_re
                        .captures(&page.body)
                        .unwrap_or_else(|| panic!("no form at {url}:\n{}", page.body));
                    let action = Url::parse(&url)
                        .unwrap()
                        .join(&f[1].replace("&amp;", "&"))
                        .unwrap()
                        .to_string();
                    let prompt = prompt_re.captures(&f[2]).unwrap()[1].to_string();
                    let form: &[(&str, &str)] = if prompt == "login" {
                        &[("prompt", "login"), ("login", login), ("password", "x")]
                    } else {
                        &[("prompt", "consent")]
                    };
                    let sent = self.send(&action, Some(form)).await;
                    assert!(matches!(sent.status, 302 | 303), "{prompt}: {}", sent.body);
                    sent.location.unwrap()
                }
                s => panic!("the OP answered {s} at {url}:\n{}", page.body),
            };
            if !next.starts_with(issuer) {
                return next;
            }
            url = next;
        }
        panic!("too many redirects from {auth_url}");
    }
}

/// An ID token for `login`, from the OP's code flow run as the tests' own client.
async fn id_token(idp: &Idp, login: &str) -> String {
    let d = idp.discovery().await;
    let seed = format!("{login}-{:?}-{}", Instant::now(), std::process::id());
    let verifier = URL_SAFE_NO_PAD.encode(Sha256::digest(seed.as_bytes()));
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let mut auth = Url::parse(d["authorization_endpoint"].as_str().unwrap()).unwrap();
    auth.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", TEST_RP_CALLBACK)
        .append_pair("scope", "openid email groups")
        .append_pair("state", "chaos-state")
        .append_pair("nonce", "chaos-nonce")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let back = Browser::new()
        .through_op(&idp.issuer, auth.as_str(), login)
        .await;
    let code = Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no code in {back}"));
    let v: Value = client()
        .post(d["token_endpoint"].as_str().unwrap())
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", TEST_RP_CALLBACK),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no id_token: {v}"))
        .to_string()
}

fn kid(token: &str) -> String {
    let h = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<Value>(&h).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

fn oidc_config(idp: &Idp) -> String {
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
      jwks_refresh: 30s          # the shortest refresh period there is
  session: {{ keys: ["{SESSION_KEY}"], secure: false }}
backends:
  - {{ name: echo, servers: [{{ address: builtin:echo }}] }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    backend: echo
    auth: [corp]
    allow: [{{ providers: [corp] }}]
"#,
        issuer = idp.issuer
    )
}

/// A browser's first request without a session: its status and body.
async fn login_attempt(p: &Proxy) -> (u16, Option<String>, String) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(p.url("/app/start"))
        .header(ACCEPT, "text/html,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.text().await.unwrap())
}

/// The OP stops while clients use a session, a bearer ID token signed by the key the proxy
/// cached, a bearer ID token signed by a key the OP rotated in just before it stopped (the
/// proxy never saw it), and a browser with no session:
///
/// - the session and the known-key token keep working (cached keys; nothing needs the OP);
/// - the new-key token fails closed (401), never a 5xx;
/// - a browser at this proxy is still sent to the OP (discovery is cached), and a browser at
///   a proxy started during the outage (which never discovered the OP) gets a clear 503;
/// - when the OP is back, the new-key token is accepted without a restart, within the JWKS
///   refresh period / negative cache (30 s each), and the second proxy sends browsers to
///   the OP once its discovery retry (every 10 s) has found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_provider_stops_under_load() {
    let idp = Idp::start(Ttls::default()).await;
    let yaml = oidc_config(&idp);
    let a = Proxy::start(&yaml).await;
    idp.control(
        "/client",
        Some(json!({ "redirect_uris": [a.url("/.portcullis/callback"), TEST_RP_CALLBACK] })),
    )
    .await;

    // A session through the proxy's own login, and a token signed by the key it cached.
    let mut b = Browser::new();
    let first = b.send(&a.url("/app/home"), None).await;
    assert_eq!(first.status, 302, "{}", first.body);
    let back = b
        .through_op(&idp.issuer, &first.location.unwrap(), "alice")
        .await;
    let cb = b.send(&back, None).await;
    assert_eq!(cb.status, 302, "callback: {}\n{}", cb.body, a.log_text());
    let session = b.cookie("portcullis_session").expect("a session cookie");
    let known = id_token(&idp, "bob").await;
    // The OP rotates in a new signing key (the old one stays published) and signs with it;
    // the proxy has not fetched the keys since, so it has never seen this kid.
    let new_kid = idp.rotate(false).await;
    let fresh = id_token(&idp, "carol").await;
    assert_eq!(kid(&fresh), new_kid);
    assert_ne!(kid(&known), new_kid);

    // The new-key client sends the known token until the OP is down, so that the proxy
    // first sees the new kid during the outage.
    let outage = Arc::new(AtomicBool::new(false));
    let (url, o) = (a.url("/app/x"), outage.clone());
    let load = Load::start(4, Duration::from_millis(20), move |c, i, n| {
        let url = format!("{url}/{i}/{n}");
        match i {
            0 => (
                "session",
                c.get(url)
                    .header(COOKIE, format!("portcullis_session={session}")),
            ),
            1 => ("known-key", c.get(url).bearer_auth(&known)),
            2 if o.load(Ordering::Relaxed) => ("new-key", c.get(url).bearer_auth(&fresh)),
            2 => ("known-key", c.get(url).bearer_auth(&known)),
            _ => ("browser", c.get(url).header(ACCEPT, "text/html,*/*;q=0.8")),
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    idp.stop().await;
    let t_stop = load.now();
    outage.store(true, Ordering::Relaxed);
    // A second proxy, started while the OP is down: its first fetch fails (the port refuses
    // connections), and it starts without having discovered the provider.
    let started = Instant::now();
    let b2 = Proxy::start(&yaml).await;
    let b2_start = started.elapsed();
    let (status, retry, page) = login_attempt(&b2).await;
    assert_eq!(status, 503, "{page}\n{}", b2.log_text());
    assert!(page.contains("sign-in is unavailable"), "{page}");
    assert!(page.contains("`corp`"), "{page}");
    assert_eq!(retry.as_deref(), Some("10"));
    // The session still opens there: it is sealed by the proxy, not checked at the OP.
    let r = client()
        .get(b2.url("/app/s"))
        .header(
            COOKIE,
            format!(
                "portcullis_session={}",
                b.cookie("portcullis_session").unwrap()
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The outage lasts at least 5 s.
    let left = Duration::from_secs(5).saturating_sub(load.now() - t_stop);
    tokio::time::sleep(left).await;

    idp.resume().await;
    let t_back = load.now();
    // The replica retries its discovery every 10 s after a failure.
    let replica = async {
        let ok = eventually(Duration::from_secs(15), || async {
            login_attempt(&b2).await.0 == 302
        })
        .await;
        (ok, load.now() - t_back)
    };
    let (recovered, (b2_recovered, b2_back)) = tokio::join!(
        load.until(Duration::from_secs(40), |s| {
            s.of("new-key").first_from(t_back, 200).is_some()
        }),
        replica
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = load.stop().await;
    assert!(
        recovered,
        "the new key was never accepted:\n{}",
        a.log_text()
    );
    assert!(
        b2_recovered,
        "no login at the second proxy:\n{}",
        b2.log_text()
    );

    let new_key = s.of("new-key");
    let back_at = new_key.first_from(t_back, 200).unwrap();
    let recovery = back_at.at + back_at.latency - t_back;
    // Through the whole run: no 5xx and no request without an answer.
    assert_eq!(s.failures(), 0, "{}", s.summary());
    for kind in ["session", "known-key"] {
        let k = s.of(kind);
        assert_eq!(k.count(200), k.len(), "{kind}: {}", k.summary());
    }
    let browser = s.of("browser");
    assert_eq!(browser.count(302), browser.len(), "{}", browser.summary());
    // The new key: refused while the OP was down, accepted once it had been fetched.
    let during = new_key.sent_between(t_stop, t_back);
    assert!(!during.is_empty());
    assert_eq!(during.count(401), during.len(), "{}", during.summary());
    let after = new_key.sent_between(back_at.at, Duration::MAX);
    assert_eq!(after.count(200), after.len(), "{}", after.summary());
    assert!(recovery < Duration::from_secs(35), "{recovery:?}");

    println!(
        "chaos figure: idp stopped {} under load: {} requests; session {}, known-key token {}, \
         browser {}; new-key token while down {}; new key accepted {} after the OP returned; \
         replica started during the outage: ready in {}, browser login 503, login back {} after \
         the OP returned",
        secs(t_back - t_stop),
        s.len(),
        s.of("session").summary(),
        s.of("known-key").summary(),
        browser.summary(),
        during.summary(),
        secs(recovery),
        secs(b2_start),
        secs(b2_back),
    );
}

// ---------------------------------------------------------------------------------------
// 2. An external authorizer hangs
// ---------------------------------------------------------------------------------------

/// An authorizer that accepts every call and never answers; counts the calls it holds.
async fn hanging_authorizer() -> (Origin, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    struct Held(Arc<AtomicUsize>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let held = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (h, p) = (held.clone(), peak.clone());
    let o = Origin::start(move |_req| {
        let now = h.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        let guard = Held(h.clone());
        async move {
            let _guard = guard;
            std::future::pending::<Response<Full<Bytes>>>().await
        }
    })
    .await;
    (o, held, peak)
}

/// The authorizer of two routes hangs: every call times out after `timeout` (300 ms), and
/// `on_error` decides (deny: 403, allow: 200), for every request of 16 concurrent clients
/// (each with its own path, so no two share a call). No answer takes much longer than the
/// timeout, the calls held at the authorizer never exceed the requests in flight, and they
/// are all let go once the load stops. A route without the authorizer is not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_authorizer_is_cut_off_by_its_timeout() {
    let _turn = TURN.lock().await;
    let (authz, held, peak) = hanging_authorizer().await;
    let yaml = r#"listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
identity:
  providers: [{ name: dev, kind: dev_issuer }]
authorizers:
  - { name: stuck-deny, url: "http://@AUTHZ@/check", timeout: 300ms, on_error: deny }
  - { name: stuck-allow, url: "http://@AUTHZ@/check", timeout: 300ms, on_error: allow }
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - { name: closed, match: { path_prefix: /deny/ }, backend: echo, auth: [dev], allow: [{}], authorize_with: [stuck-deny] }
  - { name: open, match: { path_prefix: /allow/ }, backend: echo, auth: [dev], allow: [{}], authorize_with: [stuck-allow] }
  - { name: plain, match: { path_prefix: /plain/ }, backend: echo, auth: [dev], allow: [{}] }
"#
    .replace("@AUTHZ@", &authz.address());
    let p = Proxy::start(&yaml).await;
    let token = mint(&p, "alice", "eng");
    const CLIENTS: usize = 16;
    let base = p.url("");
    let load = Load::start(CLIENTS, Duration::from_millis(10), move |c, i, n| {
        let (kind, prefix) = match i % 8 {
            0 => ("plain", "plain"),
            1..=4 => ("deny", "deny"),
            _ => ("allow", "allow"),
        };
        (
            kind,
            c.get(format!("{base}/{prefix}/{i}/{n}"))
                .bearer_auth(&token),
        )
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = load.stop().await;
    let stopped = Instant::now();
    let released = eventually(Duration::from_secs(3), || async {
        held.load(Ordering::SeqCst) == 0
    })
    .await;
    let release_time = stopped.elapsed();

    let (deny, allow, plain) = (s.of("deny"), s.of("allow"), s.of("plain"));
    assert!(deny.len() >= 20 && allow.len() >= 20, "{}", s.summary());
    assert_eq!(deny.count(403), deny.len(), "deny: {}", deny.summary());
    assert_eq!(allow.count(200), allow.len(), "allow: {}", allow.summary());
    assert_eq!(plain.count(200), plain.len(), "plain: {}", plain.summary());
    let timeout = Duration::from_millis(300);
    let slack = Duration::from_millis(1500);
    for k in [&deny, &allow] {
        let min = k.0.iter().map(|x| x.latency).min().unwrap();
        assert!(min >= timeout - Duration::from_millis(20), "{min:?}");
        assert!(k.max_latency() < timeout + slack, "{:?}", k.max_latency());
    }
    let in_flight = CLIENTS - CLIENTS / 8;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= in_flight,
        "{peak} calls held, {in_flight} requests in flight"
    );
    assert!(
        released,
        "calls still held: {}",
        held.load(Ordering::SeqCst)
    );
    // The route without the authorizer does not wait for it (99% well under its timeout;
    // the odd slow answer is the machine, not the authorizer).
    let plain_p99 = plain.latency_percentile(99);
    assert!(plain_p99 < timeout, "the plain route waited {plain_p99:?}");
    assert!(!p.log_text().contains("panicked"));

    println!(
        "chaos figure: authorizer hangs (timeout 300ms), {CLIENTS} clients for 4 s: {} requests; \
         on_error deny {} (latency {}..{}), on_error allow {} (latency {}..{}); route without \
         the authorizer {} (99th percentile {}); at most {peak} calls held at the authorizer, all released \
         {} after the load stopped",
        s.len(),
        deny.summary(),
        ms(deny.0.iter().map(|x| x.latency).min().unwrap()),
        ms(deny.max_latency()),
        allow.summary(),
        ms(allow.0.iter().map(|x| x.latency).min().unwrap()),
        ms(allow.max_latency()),
        plain.summary(),
        ms(plain_p99),
        ms(release_time),
    );
}

// ---------------------------------------------------------------------------------------
// 3. The audit disk fills up
// ---------------------------------------------------------------------------------------

/// The records in the `audit-*.jsonl` files of `dir`.
fn audit_records(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("audit-") && n.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A proxy whose audit trail is on a 2 MiB tmpfs. The fields drop in order: the proxy, then
/// the disk (unmounted), then its mount point (a directory of its own, not inside the
/// proxy's, so that it is unmounted before it is removed).
struct AuditDisk {
    p: Proxy,
    disk: Tmpfs,
    _mount_point: tempfile::TempDir,
}

impl AuditDisk {
    /// The proxy (`on_overload` as given, `fsync: interval`, `shutdown_grace: 1s`) and 4
    /// clients sending allowed (3 in 4) and denied requests, each needing a decision record.
    /// None, with a printed reason, where a tmpfs cannot be mounted.
    async fn start(on_overload: &str) -> Option<(AuditDisk, Load, String)> {
        let mount_point = tempfile::tempdir().unwrap();
        let disk = match Tmpfs::mount(mount_point.path(), "2m") {
            Ok(d) => d,
            Err(why) => {
                println!("chaos: audit disk test ({on_overload}) skipped: {why}");
                return None;
            }
        };
        let audit = disk.path.display();
        let yaml = format!(
            r#"listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
shutdown_grace: 1s
identity:
  providers: [{{ name: dev, kind: dev_issuer }}]
audit: {{ dir: "{audit}", fsync: interval, on_overload: {on_overload} }}
backends:
  - {{ name: echo, servers: [{{ address: "builtin:echo" }}] }}
routes:
  - {{ name: api, match: {{ path_prefix: /api/ }}, backend: echo, auth: [dev], allow: [{{ groups: [eng] }}] }}
"#
        );
        let p = Proxy::start(&yaml).await;
        let (alice, bob) = (mint(&p, "alice", "eng"), mint(&p, "bob", "sales"));
        let base = p.url("/api");
        let a = alice.clone();
        let load = Load::start(4, Duration::from_millis(10), move |c, i, n| {
            let url = format!("{base}/{i}/{n}");
            if n % 4 == 3 {
                ("denied", c.get(url).bearer_auth(&bob))
            } else {
                ("allowed", c.get(url).bearer_auth(&a))
            }
        });
        let d = AuditDisk {
            p,
            disk,
            _mount_point: mount_point,
        };
        Some((d, load, alice))
    }

    /// `portcullis_audit_waiting_for_disk` and `portcullis_audit_disk_full_waits_total`.
    async fn audit_metrics(&self) -> (i64, u64) {
        let (_, m) = self.p.admin(reqwest::Method::GET, "/metrics", None).await;
        let value = |name: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{m}"))
        };
        (
            value("portcullis_audit_waiting_for_disk") as i64,
            value("portcullis_audit_disk_full_waits_total") as u64,
        )
    }

    /// Every answered request (200 or 403) has its record and no refused one (503) has,
    /// and `portcullis audit verify` passes. The number of records and verify's output.
    fn check_trail(&self, s: &Samples) -> (usize, String) {
        let recs = audit_records(&self.disk.path);
        let recorded: HashSet<&str> = recs
            .iter()
            .filter_map(|r| r["request_id"].as_str())
            .collect();
        let mut lost = 0;
        for x in &s.0 {
            let rid = x
                .request_id
                .as_deref()
                .expect("every answer has a request id");
            match x.status {
                503 => assert!(!recorded.contains(rid), "a refused request was recorded"),
                _ => lost += usize::from(!recorded.contains(rid)),
            }
        }
        assert_eq!(lost, 0, "{lost} answered requests without a record");
        let verify = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["audit", "verify"])
            .arg(&self.disk.path)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&verify.stdout).into_owned()
            + &String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success(), "audit verify: {out}");
        (recs.len(), out.trim().to_string())
    }
}

/// `on_overload: fail_closed`: a request whose record cannot be written (the audit disk is
/// full) is a 503; nothing acknowledged is lost, nothing refused is recorded, the chain
/// verifies, and writes resume when space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_disk_fills_up_with_fail_closed() {
    let _turn = TURN.lock().await;
    let Some((mut d, load, _)) = AuditDisk::start("fail_closed").await else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Full: the filler takes every free page. The audit file's last page may still take a
    // few records.
    let t_full = load.now();
    let filled = d.disk.fill("filler");
    let refused = load
        .until(Duration::from_secs(5), |s| {
            s.sent_between(t_full, Duration::MAX).count(503) >= 20
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(refused, "no 503 on a full disk:\n{}", d.p.log_text());

    // Space again.
    std::fs::remove_file(d.disk.path.join("filler")).unwrap();
    let t_free = load.now();
    let recovered = load
        .until(Duration::from_secs(5), |s| {
            s.of("allowed").first_from(t_free, 200).is_some()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = load.stop().await;
    assert!(recovered, "no 200 once space was back:\n{}", d.p.log_text());
    let back = s.of("allowed").first_from(t_free, 200).unwrap();
    let recovery = back.at + back.latency - t_free;
    let first_503 = s.first_from(t_full, 503).unwrap();

    d.p.signal(libc::SIGTERM);
    let _ = d.p.child.wait();
    let log = d.p.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("audit record not written"), "{log}");
    assert!(
        !log.contains("audit: the disk is full"),
        "fail_closed never waits: {log}"
    );

    // Only 200, 403 and 503, and none without an answer.
    assert!(s.other_than(&[200, 403, 503]).is_empty(), "{}", s.summary());
    // Answered before the fill: a request still in flight when the disk fills may rightly
    // be refused.
    let before = s.answered_before(t_full);
    assert_eq!(before.count(503), 0, "{}", before.summary());
    let full = s.sent_between(first_503.at, t_free);
    let after = s.sent_between(back.at, Duration::MAX);
    assert_eq!(after.count(503), 0, "{}", after.summary());
    let (records, verify) = d.check_trail(&s);

    println!(
        "chaos figure: audit disk full (on_overload: fail_closed, 2 MiB tmpfs, {} KiB filler): \
         {} requests; before {}; while full {} (first 503 {} after the fill); after {} (first \
         200 {} after space was freed); {records} records, none of an answered request \
         missing; verify: {verify}",
        filled / 1024,
        s.len(),
        before.summary(),
        full.summary(),
        ms(first_503.at.saturating_sub(t_full)),
        after.summary(),
        ms(recovery),
    );
}

/// `on_overload: wait`: while the audit disk is full, the requests in flight wait for their
/// records (no 503, no crash); once the filler is deleted they are answered with their
/// normal status (200 or 403), every answered request has its record, and the chain
/// verifies. Then the disk fills again and the proxy gets SIGTERM while requests wait:
/// it stops within `shutdown_grace` and a little more, those requests get no answer, and
/// the chain still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_disk_fills_up_with_wait() {
    let _turn = TURN.lock().await;
    let Some((mut d, load, alice)) = AuditDisk::start("wait").await else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Full for 2.5 s after the writer started waiting: nothing is answered meanwhile.
    let t_full = load.now();
    let filled = d.disk.fill("filler");
    let waiting = eventually(Duration::from_secs(5), || async {
        d.audit_metrics().await.0 == 1
    })
    .await;
    assert!(waiting, "the writer never waited:\n{}", d.p.log_text());
    let t_waiting = load.now();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Space again.
    std::fs::remove_file(d.disk.path.join("filler")).unwrap();
    let t_free = load.now();
    let resumed = load
        .until(Duration::from_secs(5), |s| {
            s.first_from(t_free, 200).is_some() && s.first_from(t_free, 403).is_some()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = load.stop().await;
    assert!(
        resumed,
        "nothing answered once space was back:\n{}",
        d.p.log_text()
    );
    let (waiting_after, waits) = d.audit_metrics().await;
    assert_eq!((waiting_after, waits), (0, 1));

    // No 503 and no request without an answer; nothing answered while the writer waited
    // (an answer sent just before may be read a little later); the requests held are
    // answered once space is back.
    assert!(s.other_than(&[200, 403]).is_empty(), "{}", s.summary());
    let done = |x: &common::load::Sample| x.at + x.latency;
    let stalled =
        s.0.iter()
            .filter(|x| done(x) >= t_waiting + Duration::from_millis(500));
    assert!(
        stalled.clone().all(|x| done(x) >= t_free),
        "answered while waiting"
    );
    let held = Samples(stalled.filter(|x| x.at < t_free).cloned().collect());
    assert!(!held.is_empty(), "no request was held");
    let first_back = held.0.iter().map(done).min().unwrap() - t_free;
    let last_back = held.0.iter().map(done).max().unwrap() - t_free;
    let before = s.sent_between(Duration::ZERO, t_full);
    let after = s.sent_between(t_free, Duration::MAX);

    let (stop_took, unanswered, answered) = sigterm_while_full(&mut d, &alice).await;
    let log = d.p.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("audit: the disk is full"), "{log}");
    assert!(log.contains("audit: disk space is back"), "{log}");
    assert!(log.contains("audit: stopped waiting for disk space: the writer is stopping"));
    let mut all = s.clone();
    all.0.extend(answered.0);
    let (records, verify) = d.check_trail(&all);

    println!(
        "chaos figure: audit disk full (on_overload: wait, 2 MiB tmpfs, {} KiB filler): {} \
         requests, no 503; before {}; the writer waited from {} after the fill for {} until \
         the filler was deleted, and nothing was answered meanwhile; {} requests held ({}), \
         answered {} to {} after space was freed; after {}; {records} records, none of an \
         answered request missing; SIGTERM while full again: stopped in {} (shutdown_grace \
         1 s), held requests left without an answer: {unanswered}; verify: {verify}",
        filled / 1024,
        s.len(),
        before.summary(),
        ms(t_waiting.saturating_sub(t_full)),
        secs(t_free - t_waiting),
        held.len(),
        held.summary(),
        ms(first_back),
        ms(last_back),
        after.summary(),
        secs(stop_took),
    );
}

/// Fills the audit disk again, sends requests one by one until the writer waits (the first
/// few may still fit in the audit file's last page, and are answered), and stops the proxy
/// with SIGTERM: it must exit within `shutdown_grace` (1 s) and a few seconds, and the
/// requests held get no answer (they were never recorded). The time it took to stop, how
/// many requests got no answer, and the answers of the others (for the record check).
async fn sigterm_while_full(d: &mut AuditDisk, token: &str) -> (Duration, usize, Samples) {
    d.disk.fill("filler");
    let started = Instant::now();
    let mut sent = Vec::new();
    while d.audit_metrics().await.0 == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the writer never waited:\n{}",
            d.p.log_text()
        );
        let r = client()
            .get(d.p.url(&format!("/api/held/{}", sent.len())))
            .bearer_auth(token)
            .timeout(Duration::from_secs(20));
        sent.push(tokio::spawn(async move {
            let r = r.send().await.ok()?;
            let rid = r.headers().get("x-request-id")?.to_str().ok()?.to_string();
            Some((r.status().as_u16(), rid))
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    d.p.signal(libc::SIGTERM);
    let mut exited = None;
    while exited.is_none() && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        exited = d.p.child.try_wait().unwrap();
    }
    let took = started.elapsed();
    assert!(
        exited.is_some_and(|st| st.success()),
        "{exited:?} after {took:?}:\n{}",
        d.p.log_text()
    );
    let mut unanswered = 0;
    let mut answered = Samples::default();
    for h in sent {
        match h.await.unwrap() {
            None => unanswered += 1,
            Some((status, rid)) => answered.0.push(common::load::Sample {
                kind: "allowed",
                at: Duration::ZERO,
                latency: Duration::ZERO,
                status,
                request_id: Some(rid),
            }),
        }
    }
    assert!(unanswered > 0, "no request was held at SIGTERM");
    assert_eq!(
        answered.count(200),
        answered.len(),
        "{}",
        answered.summary()
    );
    std::fs::remove_file(d.disk.path.join("filler")).unwrap();
    (took, unanswered, answered)
}

// ---------------------------------------------------------------------------------------
// 4. Redis is killed and restarted
// ---------------------------------------------------------------------------------------

fn redis_config(port: u16, on_error: &str) -> String {
    format!(
        r#"listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - {{ name: o, servers: [{{ address: "builtin:echo" }}] }}
limits:
  store: {{ redis: {{ url: "redis://127.0.0.1:{port}", timeout: 1s, prefix: {on_error} }} }}
  on_store_error: {on_error}
stick_tables:
  - {{ name: per_ip, key: src, size: 100, store: [http_req_cnt] }}
usage_plans:
  - {{ name: roomy, rate: 1000/s, burst: 100000 }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    backend: o
    public: true
    limits: {{ track: [per_ip], plan: roomy }}
"#
    )
}

/// Whether keys with `prefix` are in the Redis on `port`.
fn has_keys(port: u16, prefix: &str) -> bool {
    common::load::redis_command(port, &format!("KEYS {prefix}:*"))
        .is_some_and(|a| a.starts_with('*') && !a.starts_with("*0"))
}

/// Redis is killed under load and started again on its port. While it is down, each
/// `on_store_error` does what it says (allow: 200, local: 200 counted in the process, deny:
/// 429, never a 5xx) and no request waits longer than the store timeout; when it is back,
/// every proxy counts in Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_is_killed_and_restarted_under_load() {
    let _turn = TURN.lock().await;
    let mut redis = Redis::start();
    let port = redis.port;
    let modes = ["allow", "deny", "local"];
    let configs = modes.map(|m| redis_config(port, m));
    let (pa, pd, pl) = tokio::join!(
        Proxy::start(&configs[0]),
        Proxy::start(&configs[1]),
        Proxy::start(&configs[2]),
    );
    let urls = [pa.url("/x"), pd.url("/x"), pl.url("/x")];
    let load = Load::start(6, Duration::from_millis(20), move |c, i, n| {
        (modes[i % 3], c.get(format!("{}/{i}/{n}", urls[i % 3])))
    });
    let up = eventually(Duration::from_secs(5), || async {
        modes.iter().all(|m| has_keys(port, m))
    })
    .await;
    assert!(up, "the proxies never counted in Redis");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t_before_kill = load.now();
    redis.kill();
    let t_kill = load.now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t_restart = load.now();
    let redis = Redis::start_on(port).expect("redis-server starts again on its port");
    let t_up = load.now();
    let recovered = load
        .until(Duration::from_secs(10), |s| {
            s.of("deny").first_from(t_restart, 200).is_some()
        })
        .await;
    let all_back = eventually(Duration::from_secs(5), || async {
        modes.iter().all(|m| has_keys(port, m))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = load.stop().await;
    assert!(
        recovered,
        "the deny-mode proxy never served again:\n{}",
        pd.log_text()
    );
    assert!(
        all_back,
        "not every proxy counts in Redis again ({} keys)",
        redis.dbsize().unwrap_or(0)
    );

    assert_eq!(s.failures(), 0, "no 5xx, no hang: {}", s.summary());
    let deny = s.of("deny");
    let back = deny.first_from(t_restart, 200).unwrap();
    let recovery = (back.at + back.latency).saturating_sub(t_up);
    let down = deny.sent_between(t_kill, t_restart);
    assert!(!down.is_empty());
    assert_eq!(
        down.count(429),
        down.len(),
        "deny while down: {}",
        down.summary()
    );
    // Answered before the kill began: Redis counted them. (A request sent just before the
    // kill may reach Redis after it, and is then rightly denied.)
    assert_eq!(deny.answered_before(t_before_kill).count(429), 0);
    for m in ["allow", "local"] {
        let k = s.of(m);
        assert_eq!(k.count(200), k.len(), "{m}: {}", k.summary());
    }
    let outage = s.sent_between(t_kill, t_restart);
    assert!(
        outage.max_latency() < Duration::from_secs(1),
        "{:?}",
        outage.max_latency()
    );
    for p in [&pa, &pd, &pl] {
        let (_, m) = p.admin(reqwest::Method::GET, "/metrics", None).await;
        assert!(m.contains("portcullis_limit_store_errors_total{"), "{m}");
        assert!(!p.log_text().contains("panicked"));
    }
    let r = client().get(pd.url("/probe")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    println!(
        "chaos figure: redis killed for {} under load: {} requests; while down allow {}, local \
         {}, deny {} (max latency {}); redis-server answered again {} after it was started, and \
         the deny-mode proxy served 200 again {} after that; whole run: {} 5xx",
        secs(t_restart - t_kill),
        s.len(),
        s.of("allow").sent_between(t_kill, t_restart).summary(),
        s.of("local").sent_between(t_kill, t_restart).summary(),
        down.summary(),
        ms(outage.max_latency()),
        ms(t_up - t_restart),
        ms(recovery),
        s.failures(),
    );
}

// ---------------------------------------------------------------------------------------
// 5. Origins flap
// ---------------------------------------------------------------------------------------

/// Both servers of a backend flap for 10 s: every 500 ms one of them goes down (its port
/// refuses connections and its open connections are dropped) or comes back, in the order
/// a down, a up, b down, b up, so that one is always up. With retries (2 attempts, a budget
/// of at least as many retries as clients) and passive ejection on connect failures, GETs
/// see no 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_flap_every_500ms_under_load() {
    let _turn = TURN.lock().await;
    let a = Flapping::start("a").await;
    let b = Flapping::start("b").await;
    const CLIENTS: usize = 4;
    // Short, so that a server's ejection (n × eject_for, n its ejection count) ends well
    // before the other server goes down: with eject_for 1s, the ejected server is often
    // still out when the other one fails, and those requests find no server (502).
    const EJECT_FOR_MS: u64 = 20;
    let yaml = format!(
        r#"listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - name: b
    balance: round_robin
    retries: {{ attempts: 2, min_retries_in_flight: {CLIENTS}, backoff_base: 5ms, backoff_max: 20ms }}
    outlier: {{ consecutive_connect_failures: 2, consecutive_5xx: 3, eject_for: {EJECT_FOR_MS}ms, max_ejected_percent: 50 }}
    servers:
      - {{ name: a, address: "{a}" }}
      - {{ name: b, address: "{b}" }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}
"#,
        a = a.address(),
        b = b.address()
    );
    let p = Proxy::start(&yaml).await;
    let url = p.url("/f");
    let load = Load::start(CLIENTS, Duration::from_millis(5), move |c, i, n| {
        ("get", c.get(format!("{url}/{i}/{n}")))
    });
    let mut flips = 0;
    let started = Instant::now();
    for tick in 0..20 {
        // At least 500 ms between two flips, even on a machine that stalls.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match tick % 4 {
            0 => a.down(),
            1 => a.up().await,
            2 => b.down(),
            _ => b.up().await,
        }
        flips += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = load.stop().await;
    let v = p.backends().await;
    let servers = v["backends"][0]["servers"].as_array().unwrap().clone();
    let ejections: Vec<u64> = servers
        .iter()
        .map(|x| x["ejections"].as_u64().unwrap_or(0))
        .collect();
    let (_, metrics) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    let retries: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let bad: Samples = s.other_than(&[200]);
    println!(
        "chaos figure: origins flapping every 500 ms for {} ({flips} flips), {CLIENTS} clients: \
         {} requests, {} ({} 5xx or no answer); {} retries; ejections a {}, b {} (the \
         longest {} ms); hits a {}, b {}",
        secs(started.elapsed()),
        s.len(),
        s.summary(),
        s.failures(),
        retries,
        ejections[0],
        ejections[1],
        ejections.iter().max().unwrap() * EJECT_FOR_MS,
        a.hits.load(Ordering::Relaxed),
        b.hits.load(Ordering::Relaxed),
    );
    assert!(s.len() >= 200, "{}", s.summary());
    assert!(
        bad.is_empty(),
        "{}: {:?}\n{}",
        s.summary(),
        bad.0.iter().take(10).collect::<Vec<_>>(),
        p.log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
