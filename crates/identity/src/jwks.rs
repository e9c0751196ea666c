//! Signing keys of a token issuer: from a JWKS URL (possibly found by OIDC discovery), a file
//! or inline JWKs. Keys are fetched at start and refreshed periodically (honouring
//! `Cache-Control: max-age`); an unknown `kid` triggers one rate-limited refetch with a
//! negative cache; when the issuer is unreachable the last good keys stay in use.

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The kind of key, which decides which algorithms it may verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    /// Does this key type go with this algorithm? (Prevents key-confusion attacks.)
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyType::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyType::P256, ES256)
                | (KeyType::P384, ES384)
                | (KeyType::Ed25519, EdDSA)
        )
    }
}

pub struct Key {
    pub kid: Option<String>,
    pub kty: KeyType,
    pub alg: Option<Algorithm>,
    pub decoding: DecodingKey,
    /// SHA-256 of the key's public parameters as parsed: the same key read again (a refetch
    /// of an unchanged JWKS) has the same fingerprint, another key under the same `kid` has
    /// another. The verified-token cache keeps it, so that an entry lives only as long as
    /// the key set would still verify its token with the very key that did.
    pub fingerprint: [u8; 32],
}

#[derive(Default)]
pub struct KeySet {
    /// Keys by `kid`, in the document's order: usually one each, but an issuer may publish
    /// keys of different types under one `kid` (an RSA and an EC key for RS256 and ES256).
    by_kid: HashMap<String, Vec<Arc<Key>>>,
    no_kid: Vec<Arc<Key>>,
}

impl KeySet {
    /// The key ids of the set, sorted, and how many keys have none.
    pub fn kids(&self) -> (Vec<String>, usize) {
        let mut k: Vec<String> = self.by_kid.keys().cloned().collect();
        k.sort();
        (k, self.no_kid.len())
    }

    /// Parses a JWKS document, keeping the signature keys we can use and skipping the rest.
    pub fn parse(doc: &serde_json::Value) -> Result<KeySet, String> {
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("JWKS has no `keys` array")?;
        Self::from_values(keys)
    }

    /// Reads and parses a JWKS file.
    pub fn read_file(p: &std::path::Path) -> Result<KeySet, String> {
        let text =
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid JSON: {e}", p.display()))?;
        KeySet::parse(&doc).map_err(|e| format!("{}: {e}", p.display()))
    }

    pub fn from_values(keys: &[serde_json::Value]) -> Result<KeySet, String> {
        let mut set = KeySet::default();
        for v in keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(v.clone()) else {
                continue;
            };
            if let Some(u) = &jwk.common.public_key_use {
                if !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature) {
                    continue;
                }
            }
            let kty = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyType::Rsa,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => KeyType::P256,
                    EllipticCurve::P384 => KeyType::P384,
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
                    EllipticCurve::Ed25519 => KeyType::Ed25519,
                    _ => continue,
                },
                // Symmetric keys are never taken from a JWKS: HS* needs a configured secret.
                AlgorithmParameters::OctetKey(_) => continue,
            };
            // A key published for another use than verifying signatures (RFC 7517 §4.2,
            // §4.3): an `alg` that is no signature algorithm (`RSA-OAEP`), or `key_ops`
            // without `verify`.
            let alg = match jwk.common.key_algorithm {
                Some(a) => match key_alg(a) {
                    Some(alg) => Some(alg),
                    None => continue,
                },
                None => None,
            };
            if jwk
                .common
                .key_operations
                .as_ref()
                .is_some_and(|ops| !ops.contains(&jsonwebtoken::jwk::KeyOperations::Verify))
            {
                continue;
            }
            let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let Ok(params) = serde_json::to_vec(&jwk.algorithm) else {
                continue;
            };
            let key = Arc::new(Key {
                kid: jwk.common.key_id.clone(),
                kty,
                alg,
                decoding,
                fingerprint: Sha256::digest(&params).into(),
            });
            match &key.kid {
                Some(k) => set.by_kid.entry(k.clone()).or_default().push(key),
                None => set.no_kid.push(key),
            }
        }
        if set.by_kid.is_empty() && set.no_kid.is_empty() {
            return Err("JWKS has no usable signature keys".into());
        }
        Ok(set)
    }

    pub fn get(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        self.pick(kid, alg).cloned()
    }

    fn pick(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Arc<Key>> {
        match kid {
            // Of the keys under the `kid`, the last that fits the algorithm (the last one
            // when none does, for the verifier to refuse with its reason).
            Some(k) => {
                let keys = self.by_kid.get(k)?;
                keys.iter()
                    .rev()
                    .find(|key| key.kty.fits(alg) && key.alg.is_none_or(|a| a == alg))
                    .or_else(|| keys.last())
            }
            // Without a kid, only an unambiguous key of the right type is used.
            None => {
                let mut fitting = self
                    .no_kid
                    .iter()
                    .chain(self.by_kid.values().flatten())
                    .filter(|k| k.kty.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Some(k),
                    _ => None,
                }
            }
        }
    }

    /// Whether a token with `kid` and `alg` would be verified now with the key whose
    /// fingerprint is `fingerprint`: the key is still in the set, under the same `kid`, and
    /// (for a token without one) still the only key that fits.
    pub fn still_picks(&self, kid: Option<&str>, alg: Algorithm, fingerprint: &[u8; 32]) -> bool {
        self.pick(kid, alg)
            .is_some_and(|k| k.fingerprint == *fingerprint)
    }

    pub fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.no_kid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    use KeyAlgorithm as K;
    Some(match a {
        K::RS256 => Algorithm::RS256,
        K::RS384 => Algorithm::RS384,
        K::RS512 => Algorithm::RS512,
        K::PS256 => Algorithm::PS256,
        K::PS384 => Algorithm::PS384,
        K::PS512 => Algorithm::PS512,
        K::ES256 => Algorithm::ES256,
        K::ES384 => Algorithm::ES384,
        K::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The parts of an OpenID Provider's discovery document portcullis uses.
#[derive(Clone, Debug, Deserialize, Default)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub id_token_signing_alg_values_supported: Vec<String>,
    /// Whether the provider names itself (`iss`) in its authorization responses (RFC 9207).
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
}

pub enum Source {
    Uri(String),
    File(PathBuf),
    Inline,
    /// OIDC discovery at `issuer/.well-known/openid-configuration`.
    Discovery(String),
}

/// Shortest and longest time between two scheduled refreshes.
const MIN_REFRESH: Duration = Duration::from_secs(30);
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// At most one refetch for unknown key ids per this period.
const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(2);
/// An unknown kid is not looked up again for this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long a kid stays unknown when the refetch that looked for it failed (the provider
/// could not be asked): short, so that a key rotated in during an outage is accepted soon
/// after the provider returns, yet long enough that tokens with that kid do not each wait on
/// a provider that hangs.
const NEGATIVE_TTL_UNREACHABLE: Duration = Duration::from_secs(3);

pub struct KeySource {
    pub provider: String,
    source: Source,
    keys: ArcSwap<KeySet>,
    pub discovery: ArcSwap<Option<Discovery>>,
    generation: AtomicU64,
    last_fetch: Mutex<Option<Instant>>,
    /// Key ids found unknown, until when.
    negative: Mutex<HashMap<String, Instant>>,
    fallback_refresh: Duration,
    fetch_lock: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    file_stamp: Mutex<Option<SystemTime>>,
    health: Mutex<FetchHealth>,
}

/// How the key fetches of one provider have gone: what the console shows and what the
/// `jwks.refresh_failed` event reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchHealth {
    /// The last fetch that stored keys (or found them unchanged).
    pub last_ok: Option<SystemTime>,
    /// The last failure: when, and why.
    pub last_error: Option<(SystemTime, String)>,
    /// Failed fetches since start.
    pub failures: u64,
    /// Failed fetches since the last good one.
    pub in_a_row: u32,
}

/// The largest document read from an identity provider (discovery, key set, token
/// answer): real ones are a few KiB; a larger one (a hostile or broken provider, or a
/// man in the middle of an `http://` URL) is refused before it is all in memory.
pub const MAX_DOCUMENT: usize = 1 << 20;

/// Reads `resp`'s body as JSON of type `T`, refusing one over [`MAX_DOCUMENT`] bytes, by its
/// `Content-Length` or as it arrives.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    mut resp: reqwest::Response,
) -> Result<T, String> {
    let too_large = || format!("larger than {} KiB", MAX_DOCUMENT / 1024);
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("invalid JSON: {e}"))
}

impl KeySource {
    pub fn new(
        provider: &str,
        source: Source,
        inline: Option<KeySet>,
        fallback_refresh: Duration,
    ) -> KeySource {
        KeySource {
            provider: provider.to_string(),
            source,
            keys: ArcSwap::from_pointee(inline.unwrap_or_default()),
            discovery: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(0),
            last_fetch: Mutex::new(None),
            negative: Mutex::new(HashMap::new()),
            fallback_refresh,
            fetch_lock: tokio::sync::Mutex::new(()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()
                .unwrap_or_default(),
            file_stamp: Mutex::new(None),
            health: Mutex::new(FetchHealth::default()),
        }
    }

    /// Where the keys come from: the JWKS URI, the issuer's discovery document, or the file.
    pub fn uri(&self) -> String {
        match &self.source {
            Source::Uri(u) => u.clone(),
            Source::File(p) => p.display().to_string(),
            Source::Inline => "inline".into(),
            Source::Discovery(issuer) => {
                format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                )
            }
        }
    }

    /// How this provider's key fetches have gone.
    pub fn health(&self) -> FetchHealth {
        self.health.lock().clone()
    }

    /// Notes a fetch's outcome in [`KeySource::health`].
    fn note(&self, r: &Result<Duration, String>) {
        let mut h = self.health.lock();
        match r {
            Ok(_) => {
                h.last_ok = Some(SystemTime::now());
                h.in_a_row = 0;
            }
            Err(e) => {
                h.failures += 1;
                h.in_a_row = h.in_a_row.saturating_add(1);
                h.last_error = Some((SystemTime::now(), e.clone()));
            }
        }
    }

    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Changes whenever a new key set is stored. Acquire pairs with the Release in `store`:
    /// whoever reads a generation and then the keys sees keys at least that new.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn store(&self, set: KeySet) {
        self.keys.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::Release);
        self.negative.lock().clear();
    }

    /// Fetches the keys now. Returns when to refresh next. On failure the old keys stay.
    pub async fn refresh(&self) -> Result<Duration, String> {
        let r = self.refresh_once().await;
        self.note(&r);
        r
    }

    async fn refresh_once(&self) -> Result<Duration, String> {
        let _g = self.fetch_lock.lock().await;
        *self.last_fetch.lock() = Some(Instant::now());
        match &self.source {
            Source::Inline => Ok(MAX_REFRESH),
            Source::File(p) => {
                let stamp = std::fs::metadata(p).and_then(|m| m.modified()).ok();
                if stamp.is_some()
                    && *self.file_stamp.lock() == stamp
                    && !self.keys.load().is_empty()
                {
                    return Ok(Duration::from_secs(2));
                }
                self.store(KeySet::read_file(p)?);
                *self.file_stamp.lock() = stamp;
                Ok(Duration::from_secs(2))
            }
            Source::Uri(u) => self.fetch_jwks(u).await,
            Source::Discovery(issuer) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let resp = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| format!("discovery at {url} failed: {e}"))?;
                let doc: Discovery = read_json(resp)
                    .await
                    .map_err(|e| format!("discovery at {url}: invalid document: {e}"))?;
                if doc.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
                    return Err(format!(
                        "discovery at {url} names issuer `{}`, expected `{issuer}`",
                        doc.issuer
                    ));
                }
                let jwks = doc.jwks_uri.clone();
                self.discovery.store(Arc::new(Some(doc)));
                self.fetch_jwks(&jwks).await
            }
        }
    }

    async fn fetch_jwks(&self, url: &str) -> Result<Duration, String> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("JWKS fetch from {url} failed: {e}"))?;
        let max_age = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        let doc: serde_json::Value = read_json(resp)
            .await
            .map_err(|e| format!("JWKS from {url}: {e}"))?;
        self.store(KeySet::parse(&doc)?);
        Ok(max_age
            .unwrap_or(self.fallback_refresh)
            .clamp(MIN_REFRESH, MAX_REFRESH))
    }

    /// Looks a key up, refetching once (rate-limited) when the kid is unknown.
    pub async fn find(&self, kid: Option<&str>, alg: jsonwebtoken::Algorithm) -> Option<Arc<Key>> {
        if let Some(k) = self.keys.load().get(kid, alg) {
            return Some(k);
        }
        if matches!(self.source, Source::Inline) {
            return None;
        }
        let kid_s = kid.unwrap_or("").to_string();
        {
            let neg = self.negative.lock();
            if neg.get(&kid_s).is_some_and(|until| Instant::now() < *until) {
                return None;
            }
        }
        // Check and claim the refetch slot in one step, so a burst of unknown kids makes one
        // fetch, not one each.
        let claimed = {
            let mut last = self.last_fetch.lock();
            if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL) {
                false
            } else {
                *last = Some(Instant::now());
                true
            }
        };
        if !claimed {
            // Rate-limited: the kid was not looked up, so it is not negative-cached (a key
            // rotated in right after a fetch must not be refused for NEGATIVE_TTL). A fetch
            // may be in flight: wait for it and look again.
            drop(self.fetch_lock.lock().await);
            return self.keys.load().get(kid, alg);
        }
        tracing::info!(provider = %self.provider, kid = %kid_s.escape_debug(), "unknown key id: refetching keys");
        let ttl = match self.refresh().await {
            Ok(_) => NEGATIVE_TTL,
            Err(e) => {
                tracing::warn!(provider = %self.provider, error = %e, "key refetch failed; keeping the last good keys");
                NEGATIVE_TTL_UNREACHABLE
            }
        };
        if let Some(k) = self.keys.load().get(kid, alg) {
            return Some(k);
        }
        let mut neg = self.negative.lock();
        if neg.len() > 1024 {
            neg.clear();
        }
        neg.insert(kid_s, Instant::now() + ttl);
        None
    }

    /// Keeps the keys fresh until the task is dropped.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let next = match me.refresh().await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(provider = %me.provider, error = %e, "key refresh failed; keeping the last good keys");
                        Duration::from_secs(10)
                    }
                };
                tokio::time::sleep(next).await;
            }
        })
    }
}

fn parse_max_age(v: &str) -> Option<Duration> {
    if v.split(',').any(|d| {
        d.trim().eq_ignore_ascii_case("no-store") || d.trim().eq_ignore_ascii_case("no-cache")
    }) {
        return Some(MIN_REFRESH);
    }
    v.split(',')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age() {
        assert_eq!(
            parse_max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(parse_max_age("no-store"), Some(MIN_REFRESH));
        assert_eq!(parse_max_age("public"), None);
    }

    /// Keys published for encryption, by their `alg` or their `key_ops`, verify nothing.
    #[test]
    fn keys_for_other_uses_are_not_taken() {
        let dev = crate::dev::generate().unwrap().1;
        let with = |extra: serde_json::Value| {
            let mut k = dev.jwk.clone();
            for (name, v) in extra.as_object().unwrap() {
                k[name] = v.clone();
            }
            KeySet::from_values(&[k])
        };
        assert!(with(serde_json::json!({})).is_ok());
        assert!(with(serde_json::json!({ "key_ops": ["verify"] })).is_ok());
        assert!(with(serde_json::json!({ "alg": "ES256" })).is_ok());
        for bad in [
            serde_json::json!({ "alg": "ECDH-ES" }),
            serde_json::json!({ "key_ops": ["encrypt"] }),
            serde_json::json!({ "key_ops": ["sign"] }),
        ] {
            assert!(with(bad.clone()).is_err(), "{bad}");
        }
    }

    /// A document larger than MAX_DOCUMENT is refused, whether it says so in its
    /// `Content-Length` or streams it chunked.
    #[tokio::test]
    async fn an_oversized_key_set_is_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let big = format!(
                        "{{\"keys\": [], \"pad\": \"{}\"}}",
                        "x".repeat(MAX_DOCUMENT)
                    );
                    if head.starts_with("GET /length") {
                        let h = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", big.len());
                        let _ = s.write_all(h.as_bytes()).await;
                        let _ = s.write_all(big.as_bytes()).await;
                    } else {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n").await;
                        for part in big.as_bytes().chunks(64 * 1024) {
                            let c = format!("{:x}\r\n", part.len());
                            if s.write_all(c.as_bytes()).await.is_err()
                                || s.write_all(part).await.is_err()
                                || s.write_all(b"\r\n").await.is_err()
                            {
                                return;
                            }
                        }
                        let _ = s.write_all(b"0\r\n\r\n").await;
                    }
                });
            }
        });
        for path in ["length", "chunked"] {
            let keys = KeySource::new(
                "p",
                Source::Uri(format!("http://{addr}/{path}")),
                None,
                Duration::from_secs(60),
            );
            let e = keys.refresh().await.unwrap_err();
            assert!(e.contains("larger than 1024 KiB"), "{path}: {e}");
        }
    }

    /// Keys of different types under one `kid`: each algorithm gets the key that fits it,
    /// whichever comes last in the document.
    #[test]
    fn one_kid_for_keys_of_different_types() {
        let mut ec = crate::dev::generate().unwrap().1.jwk;
        ec["kid"] = "k".into();
        // RFC 8037, appendix A.2.
        let ed = serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "kid": "k",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" });
        for doc in [[ec.clone(), ed.clone()], [ed, ec]] {
            let set = KeySet::from_values(&doc).unwrap();
            assert_eq!(set.len(), 2);
            assert_eq!(set.kids(), (vec!["k".to_string()], 0));
            let kty = |alg| set.get(Some("k"), alg).map(|k| k.kty);
            assert_eq!(kty(Algorithm::ES256), Some(KeyType::P256));
            assert_eq!(kty(Algorithm::EdDSA), Some(KeyType::Ed25519));
            // No key fits: one is still handed over, for the verifier to refuse.
            assert!(kty(Algorithm::RS256).is_some());
            assert!(set.get(Some("other"), Algorithm::ES256).is_none());
        }
    }

    #[test]
    fn key_types_fit_algorithms() {
        assert!(KeyType::Rsa.fits(Algorithm::RS256));
        assert!(!KeyType::Rsa.fits(Algorithm::HS256));
        assert!(!KeyType::P256.fits(Algorithm::ES384));
        assert!(KeyType::Ed25519.fits(Algorithm::EdDSA));
    }
}
