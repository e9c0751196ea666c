//! The identity engine of one config: every provider ready to verify credentials, the
//! session sealer and store, and the assertion signer. Providers whose config is unchanged
//! are carried over on reload, so their key caches, token caches and refresh tasks survive.

use crate::apikey::KeyStore;
use crate::assertion::Signer;
use crate::cache::TokenCache;
use crate::jwks::{KeySet, KeySource, Source};
use crate::jwt::{peek, Validator};
use crate::oidc::OidcClient;
use crate::session::{Sealer, Session, Store};
use crate::{AuthError, AuthMethod, Error, Identity};
use jsonwebtoken::{Algorithm, DecodingKey};
use portcullis_config::{Config, Provider, ProviderKind};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Aborts a background task when the provider that owns it is dropped.
pub struct TaskGuard(tokio::task::JoinHandle<()>);
impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub enum Verifier {
    Token {
        validator: Arc<Validator>,
        login: Option<Arc<OidcClient>>,
    },
    ApiKey(Arc<KeyStore>),
    Mtls(Vec<String>),
}

pub struct ProviderRt {
    pub name: String,
    pub kind: ProviderKind,
    pub issuer: Option<String>,
    fingerprint: String,
    pub verifier: Verifier,
    _tasks: Vec<TaskGuard>,
}

impl ProviderRt {
    pub fn login(&self) -> Option<&Arc<OidcClient>> {
        match &self.verifier {
            Verifier::Token { login, .. } => login.as_ref(),
            _ => None,
        }
    }

    pub fn key_source(&self) -> Option<&Arc<KeySource>> {
        match &self.verifier {
            Verifier::Token { validator, .. } => Some(&validator.keys),
            _ => None,
        }
    }
}

/// The credentials found on a request.
#[derive(Default)]
pub struct Credentials<'a> {
    pub bearer: Option<&'a str>,
    pub api_key: Option<&'a str>,
    pub session_cookie: Option<&'a str>,
    pub client_cert: Option<&'a [u8]>,
}

pub enum Outcome {
    /// Authenticated. `set_session` is a refreshed session cookie value to send back.
    Ok {
        identity: Arc<Identity>,
        set_session: Option<String>,
    },
    /// No credential this route accepts was presented.
    Missing,
    /// A session existed but has ended (expired, refresh failed): clear it and log in again.
    SessionEnded,
    Rejected(AuthError),
}

pub struct Engine {
    /// By name; looked up on every request, and the names come from the config, so a fast
    /// hash is safe.
    providers: HashMap<String, Arc<ProviderRt>, foldhash::fast::RandomState>,
    pub sealer: Option<Sealer>,
    pub store: Arc<Store>,
    pub session: portcullis_config::Session,
    pub signer: Arc<Signer>,
    _signer_task: Arc<TaskGuard>,
    session_fp: String,
    assertion_fp: String,
}

fn algorithms(p: &Provider) -> Vec<Algorithm> {
    p.algorithms
        .iter()
        .filter_map(|a| Algorithm::from_str(a).ok())
        .collect()
}

fn perr(p: &Provider, message: impl Into<String>) -> Error {
    Error::Provider {
        provider: p.name.clone(),
        message: message.into(),
    }
}

fn token_validator(
    p: &Provider,
    keys: Arc<KeySource>,
    audiences: Vec<String>,
    method: AuthMethod,
) -> Validator {
    token_validator_caching(p, keys, audiences, method, p.cache_size)
}

/// The validator of the ID tokens an OIDC login receives, at the callback and at each
/// refresh. Each ID token is validated once, when it arrives, and is never presented again
/// (the session keeps the identity), so its validator caches nothing: a cache would only
/// collect dead entries, one per login or refresh (about 3 KiB each), until `cache_size`
/// (10,000 by default) was reached, since expired entries are swept only from a full cache.
fn id_token_validator(p: &Provider, keys: Arc<KeySource>, client_id: &str) -> Validator {
    token_validator_caching(p, keys, vec![client_id.to_string()], AuthMethod::Session, 0)
}

fn token_validator_caching(
    p: &Provider,
    keys: Arc<KeySource>,
    audiences: Vec<String>,
    method: AuthMethod,
    cache_size: usize,
) -> Validator {
    Validator {
        provider: p.name.clone(),
        issuer: p.issuer.clone().unwrap_or_default(),
        audiences,
        algorithms: algorithms(p),
        hs_key: p
            .hs_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.as_bytes())),
        skew: p.clock_skew.0.as_secs(),
        require_exp: p.require_exp,
        max_size: p.max_token_size.0 as usize,
        claims: p.claims.clone(),
        keys,
        cache: TokenCache::new(cache_size),
        cache_ttl: p.cache_ttl.0,
        method,
    }
}

fn build_provider(p: &Provider, session_ttl: Duration) -> Result<ProviderRt, Error> {
    let mut tasks = Vec::new();
    let verifier = match p.kind {
        ProviderKind::Oidc | ProviderKind::Jwt | ProviderKind::DevIssuer => {
            let (source, inline) = match p.kind {
                ProviderKind::Oidc => (
                    Source::Discovery(p.issuer.clone().unwrap_or_default()),
                    None,
                ),
                ProviderKind::DevIssuer => {
                    let path = p.key_file.clone().unwrap_or_default();
                    let key = crate::dev::load_or_create(std::path::Path::new(&path))
                        .map_err(|e| perr(p, e))?;
                    (Source::Inline, Some(key.key_set()))
                }
                _ => match (&p.jwks_uri, &p.jwks_file, &p.keys) {
                    (Some(u), _, _) => (Source::Uri(u.clone()), None),
                    (_, Some(f), _) => (Source::File(f.into()), None),
                    (_, _, Some(k)) => (
                        Source::Inline,
                        Some(KeySet::from_values(k).map_err(|e| perr(p, e))?),
                    ),
                    _ => (Source::Inline, Some(KeySet::default())),
                },
            };
            let keys = Arc::new(KeySource::new(&p.name, source, inline, p.jwks_refresh.0));
            tasks.push(TaskGuard(keys.spawn_refresher()));
            let validator = Arc::new(token_validator(
                p,
                keys.clone(),
                p.audiences.clone(),
                AuthMethod::Jwt,
            ));
            let login = match (&p.client_id, &p.client_secret) {
                (Some(id), Some(secret)) if p.kind == ProviderKind::Oidc => {
                    let idv = Arc::new(id_token_validator(p, keys, id));
                    Some(Arc::new(OidcClient::new(
                        &p.name,
                        id.clone(),
                        secret.clone(),
                        p.scopes.clone(),
                        p.redirect_url.clone(),
                        idv,
                        session_ttl,
                    )))
                }
                _ => None,
            };
            Verifier::Token { validator, login }
        }
        ProviderKind::ApiKey => {
            let path = p.keys_file.clone().unwrap_or_default();
            Verifier::ApiKey(Arc::new(
                KeyStore::open(&p.name, path.into()).map_err(|e| perr(p, e))?,
            ))
        }
        ProviderKind::Mtls => Verifier::Mtls(p.identity_from.clone()),
    };
    Ok(ProviderRt {
        name: p.name.clone(),
        kind: p.kind,
        issuer: p.issuer.clone(),
        fingerprint: String::new(),
        verifier,
        _tasks: tasks,
    })
}

/// Checks what can be checked offline about each provider, for `portcullis check`: an API
/// key file, a JWKS file, inline keys, and an existing dev issuer key file. It has no side
/// effects: nothing is fetched (issuer discovery and `jwks_uri` are tried when the proxy
/// starts, which keeps running with the last good keys) and no file is created (a missing
/// dev issuer key is generated at start). Returns every problem, with the index of the
/// provider it belongs to.
pub fn check(cfg: &Config) -> Vec<(usize, Error)> {
    let mut out = Vec::new();
    for (i, p) in cfg.identity.providers.iter().enumerate() {
        let r = match p.kind {
            ProviderKind::ApiKey => {
                let path = p.keys_file.clone().unwrap_or_default();
                KeyStore::open(&p.name, path.into()).map(drop)
            }
            ProviderKind::DevIssuer => {
                let path = p.key_file.clone().unwrap_or_default();
                crate::dev::load(std::path::Path::new(&path)).map(drop)
            }
            ProviderKind::Jwt | ProviderKind::Oidc => match (&p.jwks_uri, &p.jwks_file, &p.keys) {
                (None, Some(f), _) => KeySet::read_file(std::path::Path::new(f)).map(drop),
                (None, None, Some(k)) => KeySet::from_values(k).map(drop),
                _ => Ok(()),
            },
            ProviderKind::Mtls => Ok(()),
        };
        if let Err(e) = r {
            out.push((i, perr(p, e)));
        }
    }
    out
}

impl Engine {
    /// Builds the engine for `cfg`, reusing unchanged providers from `prev`. Must run inside
    /// a Tokio runtime (key refresh tasks are spawned).
    pub fn build(cfg: &Config, prev: Option<&Engine>) -> Result<Engine, Error> {
        let id = &cfg.identity;
        let session_fp = format!("{:?}|{:?}", id.session, cfg.session_keys);
        let mut providers = HashMap::default();
        for p in &id.providers {
            let fp = format!("{p:?}|{:?}", id.session.ttl);
            if let Some(old) = prev.and_then(|e| e.providers.get(&p.name)) {
                if old.fingerprint == fp {
                    providers.insert(p.name.clone(), old.clone());
                    continue;
                }
            }
            let mut rt = build_provider(p, id.session.ttl.0)?;
            rt.fingerprint = fp;
            providers.insert(p.name.clone(), Arc::new(rt));
        }
        let (signer, task) = match prev {
            Some(e) if e.assertion_fp == format!("{:?}", id.assertion) => {
                (e.signer.clone(), e._signer_task.clone())
            }
            _ => {
                let s = Arc::new(
                    Signer::new(
                        id.assertion.issuer.clone(),
                        id.assertion.ttl.0,
                        id.assertion.rotate_every.0,
                    )
                    .map_err(Error::Session)?,
                );
                let t = Arc::new(TaskGuard(s.spawn_rotation()));
                (s, t)
            }
        };
        let store = match prev {
            Some(e) if e.session_fp == session_fp => e.store.clone(),
            Some(e) => Arc::new(Store::inheriting(&e.store)),
            None => Arc::new(Store::default()),
        };
        Ok(Engine {
            providers,
            sealer: Sealer::new(&cfg.session_keys),
            store,
            session: id.session.clone(),
            signer,
            _signer_task: task,
            session_fp,
            assertion_fp: format!("{:?}", id.assertion),
        })
    }

    /// Waits (up to `limit`) for every provider's first key fetch, so the first requests
    /// after start do not all race to fetch keys. Failures are logged; refresh continues.
    pub async fn warm_up(&self, limit: Duration) {
        let futs = self.providers.values().filter_map(|p| p.key_source().cloned()).map(|k| async move {
            if k.keys().is_empty() || k.discovery.load().is_none() {
                if let Ok(Err(e)) = tokio::time::timeout(limit, k.refresh()).await {
                    tracing::warn!(provider = %k.provider, error = %e, "initial key fetch failed");
                }
            }
        });
        for f in futs {
            f.await;
        }
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderRt>> {
        self.providers.get(name)
    }

    /// Ends `token` (a session's ID token, at its logout) as a bearer token of `provider`
    /// for a day, the longest ID tokens are commonly valid: the logout redirect shows it to
    /// the browser (`id_token_hint`), and a copy must not keep opening routes.
    /// Returns what was ended, for the embedded store.
    pub fn end_id_token(&self, provider: &str, token: &str) -> Option<crate::session::Ended> {
        use base64::Engine as _;
        let Some(Verifier::Token { validator, .. }) = self.provider(provider).map(|p| &p.verifier)
        else {
            return None;
        };
        let now = crate::now_secs();
        validator.cache.revoke(token.as_bytes(), now + 86_400, now);
        Some(crate::session::Ended {
            kind: format!("{}{provider}", crate::session::Ended::ID_TOKEN),
            key: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(crate::cache::revocation_digest(token.as_bytes())),
            until: now + 86_400,
        })
    }

    /// Ends a browser session at its logout: the session (every cookie of it) and its ID
    /// token as a bearer token. Returns what was ended, for the embedded store.
    pub fn end_login(
        &self,
        sealer: &crate::session::Sealer,
        cookie: &str,
        session: &crate::session::Session,
    ) -> Vec<crate::session::Ended> {
        let mut out = self.store.end_session(sealer, cookie, session);
        // Its ID token goes to the provider's logout in the URL: it must not open routes
        // as a bearer token after this.
        if let Some(t) = &session.id_token {
            out.extend(self.end_id_token(&session.identity.provider, t));
        }
        out
    }

    /// Refuses again what logouts ended, as read back from the embedded store (after a
    /// restart, or into the engine a reload builds): see [`crate::session::Ended`].
    pub fn restore_ended(&self, ended: &[crate::session::Ended]) {
        let now = crate::now_secs();
        for e in ended {
            let Some(provider) = e.kind.strip_prefix(crate::session::Ended::ID_TOKEN) else {
                self.store.restore(e);
                continue;
            };
            if let (Some(Verifier::Token { validator, .. }), Some(d)) = (
                self.provider(provider).map(|p| &p.verifier),
                crate::session::decode_digest(&e.key),
            ) {
                validator.cache.revoke_digest(d, e.until, now);
            }
        }
    }

    /// Every provider, by name, in no particular order.
    pub fn providers(&self) -> impl Iterator<Item = (&String, &Arc<ProviderRt>)> {
        self.providers.iter()
    }

    /// The first provider of `allowed` that can run a browser login.
    pub fn login_provider(&self, allowed: &[String]) -> Option<&Arc<OidcClient>> {
        allowed.iter().find_map(|n| self.providers.get(n)?.login())
    }

    /// Authenticates a request against the providers a route accepts.
    pub async fn authenticate(&self, allowed: &[String], c: &Credentials<'_>) -> Outcome {
        if let Some(token) = c.bearer {
            return self.bearer(allowed, token).await;
        }
        if let Some(key) = c.api_key {
            let mut any = false;
            for n in allowed {
                if let Some(ProviderRt {
                    verifier: crate::engine::Verifier::ApiKey(store),
                    ..
                }) = self.providers.get(n).map(|p| &**p)
                {
                    any = true;
                    if let Ok(identity) = store.verify(key) {
                        return Outcome::Ok {
                            identity,
                            set_session: None,
                        };
                    }
                }
            }
            return Outcome::Rejected(AuthError::new(if any {
                "unknown, revoked or expired API key"
            } else {
                "API keys are not accepted on this route"
            }));
        }
        if let (Some(cookie), Some(sealer)) = (c.session_cookie, &self.sealer) {
            // A session opened recently: its identity, unless this route does not accept its
            // provider (the full path below says so).
            if let Some(identity) = self.store.cached(cookie) {
                let provider = &identity.provider;
                if allowed.iter().any(|a| a == provider)
                    && self
                        .providers
                        .get(provider)
                        .and_then(|p| p.login())
                        .is_some()
                {
                    return Outcome::Ok {
                        identity,
                        set_session: None,
                    };
                }
            }
            if let Some(s) = self.store.decode(sealer, cookie) {
                return self.session(allowed, s, sealer, cookie).await;
            }
            // An unreadable or expired session: treat as no session.
            return Outcome::SessionEnded;
        }
        if let Some(der) = c.client_cert {
            for n in allowed {
                if let Some(p) = self.providers.get(n) {
                    if let Verifier::Mtls(from) = &p.verifier {
                        return match crate::mtls::identity(&p.name, from, der) {
                            Ok(id) => Outcome::Ok {
                                identity: Arc::new(id),
                                set_session: None,
                            },
                            Err(e) => Outcome::Rejected(e),
                        };
                    }
                }
            }
        }
        Outcome::Missing
    }

    /// The identity of a bearer token that one of `allowed` has verified before, with the
    /// [`Proof`](crate::jwt::Proof) that lets the caller trust it again without a lookup.
    /// `None` if no provider has it cached; `authenticate` then does the full check.
    pub fn bearer_cached(
        &self,
        allowed: &[String],
        token: &str,
    ) -> Option<(Arc<Identity>, crate::jwt::Proof)> {
        allowed
            .iter()
            .find_map(|n| match self.providers.get(n).map(|p| &p.verifier) {
                Some(Verifier::Token { validator, .. }) => validator.cached_with_proof(token),
                _ => None,
            })
    }

    async fn bearer(&self, allowed: &[String], token: &str) -> Outcome {
        // A token verified before costs one lookup in its provider's cache.
        for n in allowed {
            if let Some(Verifier::Token { validator, .. }) =
                self.providers.get(n).map(|p| &p.verifier)
            {
                if let Some(identity) = validator.cached(token) {
                    return Outcome::Ok {
                        identity,
                        set_session: None,
                    };
                }
            }
        }
        let iss = match peek(token) {
            Ok(p) => p
                .payload
                .get("iss")
                .and_then(|v| v.as_str())
                .map(String::from),
            Err(e) => return Outcome::Rejected(e),
        };
        let Some(iss) = iss else {
            return Outcome::Rejected(AuthError::new("token has no `iss` claim"));
        };
        for n in allowed {
            let Some(p) = self.providers.get(n) else {
                continue;
            };
            if let Verifier::Token { validator, .. } = &p.verifier {
                if p.issuer.as_deref().map(|i| i.trim_end_matches('/'))
                    == Some(iss.trim_end_matches('/'))
                {
                    return match validator.validate(token).await {
                        Ok(identity) => Outcome::Ok {
                            identity,
                            set_session: None,
                        },
                        Err(e) => Outcome::Rejected(e),
                    };
                }
            }
        }
        let known = self
            .providers
            .values()
            .any(|p| p.issuer.as_deref() == Some(iss.as_str()));
        Outcome::Rejected(AuthError::new(if known {
            "token issuer is not accepted on this route"
        } else {
            "token from an unknown issuer"
        }))
    }

    async fn session(
        &self,
        allowed: &[String],
        s: Session,
        sealer: &Sealer,
        cookie: &str,
    ) -> Outcome {
        if !allowed.iter().any(|a| a == &s.identity.provider) {
            return Outcome::Rejected(AuthError::new(
                "session is from a provider this route does not accept",
            ));
        }
        let Some(login) = self
            .providers
            .get(&s.identity.provider)
            .and_then(|p| p.login())
        else {
            return Outcome::SessionEnded;
        };
        if !login.needs_refresh(&s) {
            let until = s.expires_at.min(login.refresh_due(&s));
            let identity = Arc::new(s.identity);
            self.store.remember(cookie, identity.clone(), until);
            return Outcome::Ok {
                identity,
                set_session: None,
            };
        }
        match login.refresh(&s).await {
            Ok(fresh) => {
                self.store.forget(sealer, cookie);
                let set_session = self.store.encode(sealer, &fresh);
                Outcome::Ok {
                    identity: Arc::new(fresh.identity),
                    set_session,
                }
            }
            Err(e) => {
                tracing::info!(provider = %s.identity.provider, reason = %e, "session refresh failed; login required");
                self.store.forget(sealer, cookie);
                Outcome::SessionEnded
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OIDC provider with a login client, its keys inline (a dev key), and the default
    /// `cache_size`.
    fn oidc() -> (Provider, Arc<KeySource>, crate::dev::DevKey) {
        let p: Provider = serde_yaml_ng::from_str(
            "{ name: corp, kind: oidc, issuer: 'https://idp.test', client_id: web, client_secret: s }",
        )
        .unwrap();
        assert!(p.cache_size > 0, "the provider caches its bearer tokens");
        let dev = crate::dev::generate().unwrap().1;
        let keys = Arc::new(KeySource::new(
            &p.name,
            Source::Inline,
            Some(dev.key_set()),
            Duration::from_secs(3600),
        ));
        (p, keys, dev)
    }

    /// An ID token is validated once, at a login callback or a refresh, and never presented
    /// again: its validator keeps none of them. (It kept every one, about 3 KiB each, up to
    /// the provider's `cache_size`: the growth of the 30-minute soak.) Bearer tokens of the
    /// same provider, which come back on every request, are still cached.
    #[tokio::test]
    async fn id_tokens_are_not_cached_and_bearer_tokens_are() {
        let (p, keys, dev) = oidc();
        let id_tokens = id_token_validator(&p, keys.clone(), "web");
        for user in ["alice", "bob", "carol"] {
            let t = dev
                .mint("https://idp.test", "web", user, &[], None, 120)
                .unwrap();
            let id = id_tokens.validate(&t).await.unwrap();
            assert_eq!(id.subject, user);
            assert_eq!(id.method, AuthMethod::Session);
        }
        assert_eq!(id_tokens.cache.len(), 0, "no ID token kept");

        let bearer = token_validator(&p, keys, vec!["web".into()], AuthMethod::Jwt);
        let t = dev
            .mint("https://idp.test", "web", "alice", &[], None, 120)
            .unwrap();
        bearer.validate(&t).await.unwrap();
        assert_eq!(bearer.cache.len(), 1, "a bearer token is cached");
    }
}
