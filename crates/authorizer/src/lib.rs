//! portcullis authorizers: external decision functions (the "Lambda authorizer" pattern). A
//! route lists them with `authorize_with`; they run after Cedar allows, and both must allow.
//!
//! Each [`Authorizer`] POSTs a JSON summary of the request to its `url` (see [`call`]), keeps
//! the answers in a bounded decision cache keyed so that two callers can never share a
//! decision (see [`key`]), and makes one call for any number of concurrent identical checks.
//! [`Authorizers`] holds them by name; a reload reuses the authorizers (and so the caches) of
//! unchanged configs.
//!
//! ```no_run
//! # async fn demo(cfgs: &[portcullis_config::AuthorizerCfg], input: portcullis_authorizer::Input<'_>) {
//! let all = portcullis_authorizer::Authorizers::build(cfgs, None);
//! if let Some(a) = all.get("entitlements") {
//!     let v = a.check(&input).await;
//!     if !v.allowed { /* 403 */ }
//! }
//! # }
//! ```

pub mod authorizer;
pub mod cache;
pub mod call;
pub mod key;

pub use authorizer::{validate, Authorizer, Input, Stats, Verdict};

use portcullis_config::AuthorizerCfg;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong in this crate. A failed call becomes a [`Verdict`] with
/// `error` set; only [`validate`] returns an `Error` to its caller.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "cache key `{0}` must be `header:NAME` (a valid header name), `query:NAME` or `claim:PATH`"
    )]
    CacheKey(String),
    #[error("authorizer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("authorizer unreachable: {0}")]
    Transport(String),
    #[error("authorizer answered with status {0}, which is neither 2xx, 401 nor 403")]
    Status(u16),
    #[error("authorizer answer is larger than {} bytes", call::MAX_BODY)]
    BodyTooLarge,
    #[error("cannot encode the request: {0}")]
    Encode(String),
    #[error("HTTP client unavailable: {0}")]
    Client(String),
}

/// The authorizers of one config snapshot, by name.
#[derive(Debug, Default, Clone)]
pub struct Authorizers {
    by_name: HashMap<String, Arc<Authorizer>>,
}

/// The HTTP client shared by the authorizers of one build: no redirects (a 3xx is an error,
/// not a decision), no proxy from the environment, pooled keep-alive connections.
fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("portcullis-authorizer/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| e.to_string())
}

impl Authorizers {
    /// Builds from config. An authorizer whose config is unchanged from `prev` is taken over
    /// as is, so a reload keeps its cache; a changed one starts with an empty cache but keeps
    /// its counters, so metrics stay monotonic.
    pub fn build(cfgs: &[AuthorizerCfg], prev: Option<&Authorizers>) -> Authorizers {
        let mut shared: Option<Result<reqwest::Client, String>> = None;
        let mut by_name = HashMap::new();
        for cfg in cfgs {
            let old = prev.and_then(|p| p.by_name.get(&cfg.name));
            let a = match old {
                Some(old) if old.fingerprint() == authorizer::fingerprint(cfg) => old.clone(),
                _ => {
                    let c = shared.get_or_insert_with(client).clone();
                    let counters = old.map(|o| o.counters()).unwrap_or_default();
                    Arc::new(Authorizer::new(cfg, c, counters))
                }
            };
            by_name.insert(cfg.name.clone(), a);
        }
        Authorizers { by_name }
    }

    /// The authorizer called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Authorizer>> {
        self.by_name.get(name)
    }

    /// Every authorizer, in no particular order (for metrics).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Authorizer>> {
        self.by_name.values()
    }

    /// How many authorizers there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_config::{AuthorizerCache, Dur, OnError};

    fn cfg(name: &str, url: &str) -> AuthorizerCfg {
        AuthorizerCfg {
            name: name.into(),
            url: url.into(),
            timeout: Dur(Duration::from_millis(200)),
            send: vec![],
            upstream_headers: vec![],
            cache: AuthorizerCache::default(),
            on_error: OnError::Deny,
        }
    }

    #[test]
    fn reload_keeps_unchanged_and_rebuilds_changed() {
        let a = Authorizers::build(
            &[
                cfg("a", "http://127.0.0.1:1/"),
                cfg("b", "http://127.0.0.1:2/"),
            ],
            None,
        );
        assert_eq!(a.len(), 2);
        assert!(a.get("c").is_none());
        let b = Authorizers::build(
            &[
                cfg("a", "http://127.0.0.1:1/"),
                cfg("b", "http://127.0.0.1:3/"),
            ],
            Some(&a),
        );
        assert!(Arc::ptr_eq(a.get("a").unwrap(), b.get("a").unwrap()));
        assert!(!Arc::ptr_eq(a.get("b").unwrap(), b.get("b").unwrap()));
        assert_eq!(b.get("b").unwrap().config().url, "http://127.0.0.1:3/");
        // Counters carry over a changed config.
        assert!(Arc::ptr_eq(
            &a.get("b").unwrap().counters(),
            &b.get("b").unwrap().counters()
        ));
        // A removed authorizer is gone.
        let c = Authorizers::build(&[cfg("a", "http://127.0.0.1:1/")], Some(&b));
        assert!(c.get("b").is_none());
        assert_eq!(c.iter().count(), 1);
        assert!(Authorizers::default().is_empty());
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            Error::Status(502).to_string(),
            "authorizer answered with status 502, which is neither 2xx, 401 nor 403"
        );
        assert!(validate(&cfg("a", "http://x/")).is_ok());
    }
}
