//! Authorizers against a real HTTP decision function started by the test. The server counts
//! its own calls, so caching and single-flight are proven by what actually reached it, and it
//! is steered per request by the headers the authorizer sends:
//! `x-mode` (`allow`, `deny`, `401`, `500`), `x-sleep` (milliseconds) and `x-cc`
//! (a `Cache-Control` value for the answer). A subject called `mallory` is always denied.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use portcullis_authorizer::{Authorizers, Input, Verdict};
use portcullis_config::{AuthorizerCache, AuthorizerCfg, Dur, OnError};
use portcullis_identity::{AuthMethod, Identity};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A decision function on 127.0.0.1 that counts the calls it gets.
struct Server {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl Server {
    async fn start() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| decide(req, counter.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server {
            url: format!("http://{addr}/authorize"),
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn decide(
    req: Request<hyper::body::Incoming>,
    hits: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    hits.fetch_add(1, Ordering::SeqCst);
    assert_eq!(req.method(), hyper::Method::POST);
    let body = req.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON request body");
    let h = |name: &str| v["headers"][name].as_str().map(str::to_string);
    if let Some(ms) = h("x-sleep") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    let who = format!(
        "{}/{}",
        v["identity"]["provider"].as_str().unwrap(),
        v["identity"]["subject"].as_str().unwrap()
    );
    let mut mode = h("x-mode").unwrap_or_else(|| "allow".into());
    if v["identity"]["subject"] == "mallory" {
        mode = "deny".into();
    }
    let status = match mode.as_str() {
        "allow" => 200,
        "deny" => 403,
        "401" => 401,
        _ => 500,
    };
    let answer = serde_json::json!({
        "reason": format!("{mode} {who} {} {}", v["route"].as_str().unwrap(), v["path"].as_str().unwrap()),
        "headers": {
            "x-seen-subject": v["identity"]["subject"],
            "x-portcullis-user": "root",
            "connection": "close",
            "transfer-encoding": "chunked",
            "bad header": "x",
        },
    });
    let mut resp = Response::builder().status(status);
    if let Some(cc) = h("x-cc") {
        resp = resp.header("cache-control", cc);
    }
    Ok(resp
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap())
}

fn cfg(url: &str) -> AuthorizerCfg {
    AuthorizerCfg {
        name: "ext".into(),
        url: url.into(),
        timeout: Dur(Duration::from_millis(1000)),
        send: vec!["x-mode".into(), "x-sleep".into(), "x-cc".into()],
        upstream_headers: vec![],
        cache: AuthorizerCache {
            key: vec!["header:x-tenant".into()],
            ..Default::default()
        },
        on_error: OnError::Deny,
    }
}

fn ident(provider: &str, subject: &str) -> Identity {
    Identity {
        provider: provider.into(),
        method: AuthMethod::Jwt,
        subject: subject.into(),
        user: subject.into(),
        email: None,
        groups: vec!["eng".into()],
        claims: serde_json::json!({}),
        expires_at: None,
    }
}

fn hdrs(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

fn one(cfg: AuthorizerCfg) -> Arc<portcullis_authorizer::Authorizer> {
    Authorizers::build(&[cfg], None).get("ext").unwrap().clone()
}

async fn check(
    a: &portcullis_authorizer::Authorizer,
    id: &Identity,
    headers: &http::HeaderMap,
) -> Verdict {
    a.check(&Input {
        identity: id,
        route: "billing/api",
        method: "GET",
        host: "billing.example.com",
        path: "/api/invoices",
        query: None,
        headers,
    })
    .await
}

#[tokio::test]
async fn allow_and_deny() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = ident("corp", "alice");
    let v = check(&a, &alice, &hdrs(&[])).await;
    assert!(v.allowed && !v.cached && v.error.is_none());
    assert_eq!(
        v.reason.as_deref(),
        Some("allow corp/alice billing/api /api/invoices")
    );
    let v = check(&a, &alice, &hdrs(&[("x-mode", "deny")])).await;
    assert!(!v.allowed && v.error.is_none());
    assert_eq!(
        v.reason.as_deref(),
        Some("deny corp/alice billing/api /api/invoices")
    );
    assert!(v.headers.is_empty(), "a denial adds no headers");
    let v = check(&a, &alice, &hdrs(&[("x-mode", "401")])).await;
    assert!(!v.allowed && v.error.is_none());
    assert_eq!(s.hits(), 3);
}

#[tokio::test]
async fn response_headers_and_reason_pass_through_filtered() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let v = check(&a, &ident("corp", "alice"), &hdrs(&[])).await;
    assert!(v.allowed);
    assert!(v.reason.unwrap().starts_with("allow corp/alice"));
    let names: Vec<&str> = v.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["x-seen-subject"],
        "hop-by-hop, x-portcullis-* and invalid names dropped"
    );
    assert_eq!(v.headers[0].1, "alice");
}

#[tokio::test]
async fn errors_follow_on_error_and_are_not_cached() {
    let s = Server::start().await;
    let alice = ident("corp", "alice");
    let h500 = hdrs(&[("x-mode", "500")]);
    let deny = one(cfg(&s.url));
    for _ in 0..2 {
        let v = check(&deny, &alice, &h500).await;
        assert!(!v.allowed && !v.cached);
        assert!(v.error.as_deref().unwrap().contains("500"), "{v:?}");
    }
    assert_eq!(s.hits(), 2, "errors are never cached");
    assert_eq!(deny.stats().errors, 2);

    let mut c = cfg(&s.url);
    c.on_error = OnError::Allow;
    let allow = one(c);
    let v = check(&allow, &alice, &h500).await;
    assert!(v.allowed && v.error.is_some() && v.headers.is_empty());
}

#[tokio::test]
async fn timeout_is_an_error_in_both_modes() {
    let s = Server::start().await;
    let alice = ident("corp", "alice");
    let slow = hdrs(&[("x-sleep", "1500")]);
    for on_error in [OnError::Deny, OnError::Allow] {
        let mut c = cfg(&s.url);
        c.timeout = Dur(Duration::from_millis(100));
        c.on_error = on_error;
        let a = one(c);
        let started = std::time::Instant::now();
        let v = check(&a, &alice, &slow).await;
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "the timeout cut the call"
        );
        assert_eq!(v.allowed, on_error == OnError::Allow);
        assert!(v.error.as_deref().unwrap().contains("within"), "{v:?}");
    }
}

#[tokio::test]
async fn connection_error_is_an_error() {
    // Bind, learn the port, close: nothing listens there any more.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    drop(l);
    let a = one(cfg(&url));
    let v = check(&a, &ident("corp", "alice"), &hdrs(&[])).await;
    assert!(!v.allowed);
    assert!(v.error.unwrap().contains("unreachable"));
}

#[tokio::test]
async fn caches_within_ttl_then_calls_again() {
    let s = Server::start().await;
    let mut c = cfg(&s.url);
    c.cache.allow_ttl = Dur(Duration::from_millis(500));
    let a = one(c);
    let alice = ident("corp", "alice");
    let h = hdrs(&[]);
    let first = check(&a, &alice, &h).await;
    assert!(!first.cached);
    for _ in 0..10 {
        let v = check(&a, &alice, &h).await;
        assert!(v.allowed && v.cached);
        assert_eq!(v.reason, first.reason);
        assert_eq!(v.headers, first.headers);
    }
    assert_eq!(s.hits(), 1);
    let st = a.stats();
    assert_eq!((st.hits, st.misses, st.calls, st.entries), (10, 1, 1, 1));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!check(&a, &alice, &h).await.cached);
    assert_eq!(s.hits(), 2);
}

#[tokio::test]
async fn allow_and_deny_have_their_own_ttl() {
    let s = Server::start().await;
    let mut c = cfg(&s.url);
    c.cache.allow_ttl = Dur(Duration::from_secs(10));
    c.cache.deny_ttl = Dur(Duration::from_millis(300));
    let a = one(c);
    let (alice, mallory) = (ident("corp", "alice"), ident("corp", "mallory"));
    let h = hdrs(&[]);
    assert!(check(&a, &alice, &h).await.allowed);
    assert!(!check(&a, &mallory, &h).await.allowed);
    assert!(check(&a, &mallory, &h).await.cached);
    assert_eq!(s.hits(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = check(&a, &mallory, &h).await;
    assert!(!v.allowed && !v.cached, "the deny expired");
    let v = check(&a, &alice, &h).await;
    assert!(v.allowed && v.cached, "the allow did not");
    assert_eq!(s.hits(), 3);
}

#[tokio::test]
async fn two_principals_never_share_a_decision() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let h = hdrs(&[]);
    let alice = ident("corp", "alice");
    let mallory = ident("corp", "mallory");
    let other_alice = ident("partner", "alice");
    assert!(check(&a, &alice, &h).await.allowed);
    // Same route, method and path, another subject: a call of its own, and its own answer.
    let v = check(&a, &mallory, &h).await;
    assert!(!v.allowed && !v.cached);
    assert!(v.reason.unwrap().contains("corp/mallory"));
    // Same subject at another provider: another principal.
    let v = check(&a, &other_alice, &h).await;
    assert!(v.allowed && !v.cached);
    assert!(v.reason.unwrap().contains("partner/alice"));
    assert_eq!(s.hits(), 3);
    // Each principal's cached answer is still its own.
    let v = check(&a, &alice, &h).await;
    assert!(v.allowed && v.cached && v.reason.unwrap().contains("corp/alice"));
    assert_eq!(v.headers[0].1, "alice");
    let v = check(&a, &mallory, &h).await;
    assert!(!v.allowed && v.cached && v.reason.unwrap().contains("corp/mallory"));
    let v = check(&a, &other_alice, &h).await;
    assert!(v.allowed && v.cached && v.reason.unwrap().contains("partner/alice"));
    assert_eq!(s.hits(), 3);
}

#[tokio::test]
async fn cache_key_header_separates_entries() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = ident("corp", "alice");
    // x-tenant is not sent to the authorizer, only listed in cache.key.
    let (acme, globex) = (
        hdrs(&[("x-tenant", "acme")]),
        hdrs(&[("x-tenant", "globex")]),
    );
    assert!(!check(&a, &alice, &acme).await.cached);
    assert!(!check(&a, &alice, &globex).await.cached);
    assert!(!check(&a, &alice, &hdrs(&[])).await.cached);
    assert_eq!(s.hits(), 3);
    assert!(check(&a, &alice, &acme).await.cached);
    assert!(check(&a, &alice, &globex).await.cached);
    // A header that is neither sent nor in cache.key does not split the cache.
    assert!(
        check(&a, &alice, &hdrs(&[("x-tenant", "acme"), ("x-other", "1")]))
            .await
            .cached
    );
    assert_eq!(s.hits(), 3);
    assert_eq!(a.stats().entries, 3);
}

#[tokio::test]
async fn no_store_is_honoured() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = ident("corp", "alice");
    let h = hdrs(&[("x-cc", "no-store")]);
    for _ in 0..5 {
        let v = check(&a, &alice, &h).await;
        assert!(v.allowed && !v.cached);
    }
    assert_eq!(s.hits(), 5);
    assert_eq!(a.stats().entries, 0);
}

#[tokio::test]
async fn max_age_overrides_the_ttl() {
    let s = Server::start().await;
    let mut c = cfg(&s.url);
    c.cache.allow_ttl = Dur(Duration::from_secs(30));
    c.cache.deny_ttl = Dur(Duration::from_millis(100));
    let a = one(c);
    let alice = ident("corp", "alice");
    // Shorter than allow_ttl.
    let short = hdrs(&[("x-cc", "private, max-age=1")]);
    assert!(!check(&a, &alice, &short).await.cached);
    assert!(check(&a, &alice, &short).await.cached);
    // Longer than deny_ttl.
    let long_deny = hdrs(&[("x-mode", "deny"), ("x-cc", "max-age=30")]);
    assert!(!check(&a, &alice, &long_deny).await.allowed);
    assert_eq!(s.hits(), 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!check(&a, &alice, &short).await.cached, "max-age=1 expired");
    let v = check(&a, &alice, &long_deny).await;
    assert!(!v.allowed && v.cached, "max-age=30 outlived deny_ttl");
    assert_eq!(s.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_under_100_concurrent_checks() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = Arc::new(ident("corp", "alice"));
    let h = Arc::new(hdrs(&[("x-sleep", "200")]));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (a, alice, h) = (a.clone(), alice.clone(), h.clone());
        set.spawn(async move { check(&a, &alice, &h).await });
    }
    let mut n = 0;
    while let Some(v) = set.join_next().await {
        let v = v.unwrap();
        assert!(v.allowed && v.error.is_none());
        assert!(v.reason.unwrap().contains("corp/alice"));
        n += 1;
    }
    assert_eq!(n, 100);
    assert_eq!(s.hits(), 1, "exactly one call reached the authorizer");
    let st = a.stats();
    assert_eq!(st.calls, 1);
    assert_eq!(st.hits + st.misses, 100);
    assert_eq!(st.misses, st.coalesced + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_shares_errors_but_does_not_cache_them() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = Arc::new(ident("corp", "alice"));
    let h = Arc::new(hdrs(&[("x-sleep", "200"), ("x-mode", "500")]));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (a, alice, h) = (a.clone(), alice.clone(), h.clone());
        set.spawn(async move { check(&a, &alice, &h).await });
    }
    while let Some(v) = set.join_next().await {
        let v = v.unwrap();
        assert!(!v.allowed && v.error.is_some());
    }
    assert_eq!(s.hits(), 1);
    check(&a, &alice, &h).await;
    assert_eq!(s.hits(), 2);
}

#[tokio::test]
async fn a_cancelled_caller_does_not_cancel_the_call() {
    let s = Server::start().await;
    let a = one(cfg(&s.url));
    let alice = ident("corp", "alice");
    let h = hdrs(&[("x-sleep", "200")]);
    // Give up on the first check long before the authorizer answers.
    let r = tokio::time::timeout(Duration::from_millis(50), check(&a, &alice, &h)).await;
    assert!(r.is_err());
    // A second caller joins the call still in flight, or finds its answer cached.
    let v = check(&a, &alice, &h).await;
    assert!(v.allowed);
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn reload_keeps_the_cache_of_unchanged_authorizers() {
    let s = Server::start().await;
    let c = cfg(&s.url);
    let first = Authorizers::build(std::slice::from_ref(&c), None);
    let alice = ident("corp", "alice");
    let h = hdrs(&[]);
    check(first.get("ext").unwrap(), &alice, &h).await;
    let same = Authorizers::build(std::slice::from_ref(&c), Some(&first));
    assert!(check(same.get("ext").unwrap(), &alice, &h).await.cached);
    let mut changed_cfg = c.clone();
    changed_cfg.cache.allow_ttl = Dur(Duration::from_secs(60));
    let changed = Authorizers::build(&[changed_cfg], Some(&same));
    assert!(!check(changed.get("ext").unwrap(), &alice, &h).await.cached);
    assert_eq!(s.hits(), 2);
    // The counters carried over the changed config.
    assert_eq!(changed.get("ext").unwrap().stats().calls, 2);
}
