//! One external decision function: [`Authorizer::check`] looks the request's key up in the
//! decision cache, joins a call already in flight for the same key (single-flight), or makes
//! the call in a task of its own, so that a caller that goes away does not cancel the answer
//! the others wait for. Errors are never cached, and `on_error` turns them into a verdict.

use crate::cache::{Cache, Decision};
use crate::call::{self, CacheHint, RequestBody};
use crate::key::{self, Key, KeyAttr, KeyBuilder};
use crate::Error;
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use portcullis_config::{AuthorizerCfg, OnError};
use portcullis_identity::Identity;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// What an authorizer is asked about: one request by one identity.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub identity: &'a Identity,
    /// The route id, `app/route`.
    pub route: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The raw query string (without `?`); only read for `query:NAME` cache-key attributes.
    pub query: Option<&'a str>,
    /// The request headers. Only the `send` ones are sent; `header:NAME` cache-key attributes
    /// are read from here too.
    pub headers: &'a http::HeaderMap,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The authorizer's `reason`, if it gave one.
    pub reason: Option<String>,
    /// Headers to add upstream (on allow only; already filtered).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Answered from the decision cache.
    pub cached: bool,
    /// Set when the call failed and `on_error` decided.
    pub error: Option<String>,
}

/// Counters of one authorizer, for metrics. They survive reloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Checks answered from the cache.
    pub hits: u64,
    /// Checks not answered from the cache (including those that joined a call in flight).
    pub misses: u64,
    /// Misses that joined a call already in flight instead of making one.
    pub coalesced: u64,
    /// HTTP calls made.
    pub calls: u64,
    /// Calls that failed (timeout, connection error, unexpected status, bad body).
    pub errors: u64,
    /// Entries held in the decision cache now.
    pub entries: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    calls: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The result of one call, shared by everyone who waited for it.
type Outcome = Result<Arc<Decision>, String>;

/// One external decision function with its cache. Build it through [`crate::Authorizers`].
pub struct Authorizer {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AuthorizerCfg,
    /// The `Debug` rendering of `cfg`, to tell on reload whether anything changed.
    fingerprint: String,
    client: Result<reqwest::Client, String>,
    /// Lower-cased, de-duplicated `send` header names.
    send: Vec<String>,
    /// `upstream_headers`: the only headers an answer may set, when not empty.
    upstream: Vec<HeaderName>,
    /// The parsed `cache.key`; `None` when an entry could not be understood, in which case
    /// nothing is cached or shared for this authorizer (fail safe).
    attrs: Option<Vec<KeyAttr>>,
    cache: Cache,
    inflight: Mutex<HashMap<Key, watch::Receiver<Option<Outcome>>>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("name", &self.inner.cfg.name)
            .field("url", &self.inner.cfg.url)
            .finish_non_exhaustive()
    }
}

/// Checks an authorizer's config beyond what the config crate validates: every `cache.key`
/// entry must be understood. [`crate::Authorizers::build`] accepts a config that fails this,
/// but then disables caching and single-flight for that authorizer.
pub fn validate(cfg: &AuthorizerCfg) -> Result<(), Error> {
    for k in &cfg.cache.key {
        KeyAttr::parse(k)?;
    }
    Ok(())
}

/// The config's identity for reload: two configs with the same fingerprint behave the same.
pub(crate) fn fingerprint(cfg: &AuthorizerCfg) -> String {
    format!("{cfg:?}")
}

impl Authorizer {
    pub(crate) fn new(
        cfg: &AuthorizerCfg,
        client: Result<reqwest::Client, String>,
        counters: Arc<Counters>,
    ) -> Authorizer {
        let mut send: Vec<String> = Vec::new();
        for s in &cfg.send {
            let s = s.to_ascii_lowercase();
            if !send.contains(&s) {
                send.push(s);
            }
        }
        let attrs = match cfg
            .cache
            .key
            .iter()
            .map(|k| KeyAttr::parse(k))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(authorizer = %cfg.name, error = %e, "decision cache and single-flight disabled");
                None
            }
        };
        let upstream = cfg
            .upstream_headers
            .iter()
            .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        Authorizer {
            inner: Arc::new(Inner {
                fingerprint: fingerprint(cfg),
                cfg: cfg.clone(),
                client,
                send,
                upstream,
                attrs,
                cache: Cache::new(cfg.cache.max_entries),
                inflight: Mutex::new(HashMap::new()),
                counters,
            }),
        }
    }

    /// The authorizer's name.
    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    /// The config it was built from.
    pub fn config(&self) -> &AuthorizerCfg {
        &self.inner.cfg
    }

    /// The headers its answers may set (`upstream_headers`; empty: any it may).
    pub fn upstream_headers(&self) -> &[HeaderName] {
        &self.inner.upstream
    }

    pub(crate) fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.inner.counters.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            calls: c.calls.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            entries: self.inner.cache.len(),
        }
    }

    /// Asks the authorizer (or its cache) about one request. Never fails: a failed call is
    /// decided by `on_error`, with [`Verdict::error`] set.
    pub async fn check(&self, input: &Input<'_>) -> Verdict {
        let inner = &self.inner;
        let body = RequestBody::new(
            input.identity,
            input.route,
            input.method,
            input.host,
            input.path,
            input.headers,
            &inner.send,
        );
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return inner.verdict(&Err(Error::Encode(e.to_string()).to_string()), false),
        };
        let Some(attrs) = &inner.attrs else {
            // The key would be incomplete: never reuse a decision, never share a call.
            bump(&inner.counters.misses);
            let out = Inner::run(inner.clone(), None, body).await;
            return inner.verdict(&out, false);
        };
        let key = inner.key(input, attrs);
        let mut counted = false;
        loop {
            if let Some(d) = inner.cache.get(&key, Instant::now()) {
                bump(&inner.counters.hits);
                return inner.verdict(&Ok(d), true);
            }
            if !counted {
                bump(&inner.counters.misses);
                counted = true;
            }
            let mut rx = {
                let mut map = inner.inflight.lock();
                if let Some(rx) = map.get(&key) {
                    bump(&inner.counters.coalesced);
                    rx.clone()
                } else if let Some(d) = inner.cache.get(&key, Instant::now()) {
                    // The call in flight finished between our cache look-up and taking the
                    // lock: it stores its answer before leaving the in-flight map.
                    return inner.verdict(&Ok(d), true);
                } else {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key, rx.clone());
                    let task_inner = inner.clone();
                    let body = body.clone();
                    tokio::spawn(async move {
                        let guard = InflightGuard {
                            inner: task_inner.clone(),
                            key,
                        };
                        let out = Inner::run(task_inner, Some(key), body).await;
                        // Leave the in-flight map only after the cache holds the answer.
                        drop(guard);
                        let _ = tx.send(Some(out));
                    });
                    rx
                }
            };
            // `None` when the call's task died without answering (a panic): try again.
            let out = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => None,
            };
            if let Some(out) = out {
                return inner.verdict(&out, false);
            }
        }
    }
}

/// Removes a key from the in-flight map when the call's task ends, even by panic.
struct InflightGuard {
    inner: Arc<Inner>,
    key: Key,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inner.inflight.lock().remove(&self.key);
    }
}

impl Inner {
    /// The cache key: everything the authorizer is sent, plus the `cache.key` attributes.
    fn key(&self, input: &Input<'_>, attrs: &[KeyAttr]) -> Key {
        let mut k = KeyBuilder::new();
        k.str(&self.cfg.name);
        key::add_identity(&mut k, input.identity);
        k.str(input.route)
            .str(input.method)
            .str(input.host)
            .str(input.path);
        for name in &self.send {
            k.str(name);
            k.list(
                input
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| v.as_bytes()),
            );
        }
        for a in attrs {
            key::add_attr(&mut k, a, input.identity, input.headers, input.query);
        }
        k.finish()
    }

    /// Makes the call and, when `key` is given, caches a decision under the TTL it earned.
    async fn run(inner: Arc<Inner>, key: Option<Key>, body: Vec<u8>) -> Outcome {
        bump(&inner.counters.calls);
        let res = match &inner.client {
            Ok(c) => call::call(c, &inner.cfg.url, inner.cfg.timeout.0, body).await,
            Err(e) => Err(Error::Client(e.clone())),
        };
        match res {
            Ok(answer) => {
                let decision = Arc::new(answer.decision);
                if let Some(key) = key {
                    let ttl = match answer.hint {
                        CacheHint::NoStore => None,
                        CacheHint::MaxAge(d) => Some(d),
                        CacheHint::Default if decision.allowed => Some(inner.cfg.cache.allow_ttl.0),
                        CacheHint::Default => Some(inner.cfg.cache.deny_ttl.0),
                    };
                    if let Some(ttl) = ttl {
                        inner
                            .cache
                            .insert(key, decision.clone(), ttl, Instant::now());
                    }
                }
                Ok(decision)
            }
            Err(e) => {
                bump(&inner.counters.errors);
                tracing::warn!(authorizer = %inner.cfg.name, error = %e, on_error = ?inner.cfg.on_error, "authorizer call failed");
                Err(e.to_string())
            }
        }
    }

    fn verdict(&self, out: &Outcome, cached: bool) -> Verdict {
        match out {
            Ok(d) => Verdict {
                allowed: d.allowed,
                reason: d.reason.clone(),
                headers: d
                    .headers
                    .iter()
                    .filter(|(n, _)| self.upstream.is_empty() || self.upstream.contains(n))
                    .cloned()
                    .collect(),
                cached,
                error: None,
            },
            Err(e) => Verdict {
                allowed: self.cfg.on_error == OnError::Allow,
                reason: None,
                headers: Vec::new(),
                cached: false,
                error: Some(e.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_config::{AuthorizerCache, Dur};
    use portcullis_identity::AuthMethod;
    use std::time::Duration;

    fn cfg(key: &[&str]) -> AuthorizerCfg {
        AuthorizerCfg {
            name: "ext".into(),
            // Nothing listens on port 9 of the loopback: every call fails fast.
            url: "http://127.0.0.1:9/".into(),
            timeout: Dur(Duration::from_millis(500)),
            send: vec!["X-Tenant".into(), "x-tenant".into()],
            upstream_headers: vec![],
            cache: AuthorizerCache {
                key: key.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            on_error: OnError::Deny,
        }
    }

    fn ident(subject: &str) -> Identity {
        Identity {
            provider: "corp".into(),
            method: AuthMethod::Jwt,
            subject: subject.into(),
            user: "u".into(),
            email: None,
            groups: vec![],
            claims: serde_json::json!({"org": "acme"}),
            expires_at: None,
        }
    }

    fn input<'a>(id: &'a Identity, h: &'a http::HeaderMap, q: Option<&'a str>) -> Input<'a> {
        Input {
            identity: id,
            route: "app/r",
            method: "GET",
            host: "h",
            path: "/p",
            query: q,
            headers: h,
        }
    }

    #[test]
    fn send_is_normalised_and_validate_catches_bad_keys() {
        let a = Authorizer::new(&cfg(&[]), Err("none".into()), Arc::default());
        assert_eq!(a.inner.send, vec!["x-tenant".to_string()]);
        assert!(validate(&cfg(&["header:x-a", "query:q", "claim:org"])).is_ok());
        assert!(validate(&cfg(&["header:bad name"])).is_err());
        let bad = Authorizer::new(&cfg(&["bogus:x"]), Err("none".into()), Arc::default());
        assert!(bad.inner.attrs.is_none());
    }

    #[test]
    fn key_covers_principal_sent_headers_and_attrs() {
        let a = Authorizer::new(
            &cfg(&["query:t", "claim:org"]),
            Err("none".into()),
            Arc::default(),
        );
        let attrs = a.inner.attrs.clone().unwrap();
        let h0 = http::HeaderMap::new();
        let mut h1 = http::HeaderMap::new();
        h1.insert("x-tenant", "a".parse().unwrap());
        let (i1, i2) = (ident("1"), ident("2"));
        let k = |inp: Input<'_>| a.inner.key(&inp, &attrs);
        assert_eq!(k(input(&i1, &h0, None)), k(input(&i1, &h0, None)));
        assert_ne!(k(input(&i1, &h0, None)), k(input(&i2, &h0, None)));
        // A sent header is part of the key even without `header:` in cache.key.
        assert_ne!(k(input(&i1, &h0, None)), k(input(&i1, &h1, None)));
        assert_ne!(
            k(input(&i1, &h0, Some("t=1"))),
            k(input(&i1, &h0, Some("t=2")))
        );
        // A query parameter not in cache.key does not split the cache.
        assert_eq!(
            k(input(&i1, &h0, Some("u=1"))),
            k(input(&i1, &h0, Some("u=2")))
        );
        let mut i3 = ident("1");
        i3.claims = serde_json::json!({"org": "other"});
        assert_ne!(k(input(&i1, &h0, None)), k(input(&i3, &h0, None)));
    }

    #[tokio::test]
    async fn client_failure_is_decided_by_on_error() {
        let mut c = cfg(&[]);
        let a = Authorizer::new(&c, Err("no tls backend".into()), Arc::default());
        let (id, h) = (ident("1"), http::HeaderMap::new());
        let v = a.check(&input(&id, &h, None)).await;
        assert!(!v.allowed);
        assert!(v.error.unwrap().contains("no tls backend"));
        c.on_error = OnError::Allow;
        let a = Authorizer::new(&c, Err("no tls backend".into()), Arc::default());
        let v = a.check(&input(&id, &h, None)).await;
        assert!(v.allowed && v.error.is_some() && !v.cached);
        let s = a.stats();
        assert_eq!(
            (s.calls, s.errors, s.hits, s.misses, s.entries),
            (1, 1, 0, 1, 0)
        );
    }

    #[tokio::test]
    async fn connection_refused_is_an_error_and_not_cached() {
        let a = Authorizer::new(&cfg(&[]), Ok(reqwest::Client::new()), Arc::default());
        let (id, h) = (ident("1"), http::HeaderMap::new());
        for _ in 0..2 {
            let v = a.check(&input(&id, &h, None)).await;
            assert!(!v.allowed);
            assert!(v.error.is_some());
        }
        assert_eq!(a.stats().calls, 2);
        assert_eq!(a.stats().errors, 2);
    }
}
