//! Bearer JWT validation for `oidc`, `jwt` and `dev_issuer` providers. Checks, in order: size,
//! the header (`alg` on the allow-list and never `none`; no `crit`; key-bearing headers
//! `jku`/`x5u`/`jwk`/`x5c` refused outright, never fetched), the key (by `kid`, with its type
//! matching the algorithm; HS* only with the provider's own secret), the signature, then the
//! claims (`iss` exact, `aud` contains a configured audience, `exp` required unless disabled,
//! `nbf` and `iat` with clock skew). Verified tokens are cached by their exact bytes.

use crate::cache::{KeyRef, TokenCache};
use crate::jwks::KeySource;
use crate::{claims, now_secs, AuthError, AuthMethod, Identity};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use portcullis_config::ClaimMap;
use serde_json::Value;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Validator {
    pub provider: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Explicitly configured algorithms; empty means "what the issuer advertises, else the
    /// common asymmetric ones".
    pub algorithms: Vec<Algorithm>,
    pub hs_key: Option<DecodingKey>,
    pub skew: u64,
    pub require_exp: bool,
    pub max_size: usize,
    pub claims: ClaimMap,
    pub keys: Arc<KeySource>,
    pub cache: TokenCache,
    pub cache_ttl: Duration,
    pub method: AuthMethod,
}

const DEFAULT_ASYMMETRIC: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
];

/// Why a token that cannot be decoded is refused, whatever part of it is broken.
pub const MALFORMED: &str = "malformed token";

fn reject(r: impl Into<String>) -> AuthError {
    AuthError::new(r)
}

/// Why a verified-token cache hit could be trusted: the entry had not expired, and the key
/// that signed the token was still in the provider's key set. Whoever keeps the token (the
/// proxy remembers the last one per client connection) can trust it again while
/// [`Proof::holds`]: the entry would still be unexpired, and the key set has not changed
/// since (any change, a rotation or a refetch, ends the proof, and the next request goes
/// through the cache again, where a removed key drops the entry).
pub struct Proof {
    keys: Arc<KeySource>,
    generation: u64,
    /// The cache's revocations counter, and its value when the proof was made: a logout
    /// ends every proof (its token may be the one ended).
    revocations: Arc<std::sync::atomic::AtomicU64>,
    revoked: u64,
    /// When the cache entry expires, on the monotonic clock: a caller can then test it
    /// against a time it has already read for the request.
    until: Instant,
}

impl Proof {
    /// Whether the cache would still return the same identity at `at`, for as long as
    /// nothing evicted the entry to make room.
    pub fn holds(&self, at: Instant) -> bool {
        at < self.until
            && self.keys.generation() == self.generation
            && self.revocations.load(std::sync::atomic::Ordering::Acquire) == self.revoked
    }
}

/// The unverified header and payload, decoded just enough to choose a key and a provider.
pub struct Peek {
    pub header: Value,
    pub payload: Value,
}

/// Decodes the header and payload without verifying anything. Only for choosing which
/// provider should verify a token; never trust the result.
pub fn peek(token: &str) -> Result<Peek, AuthError> {
    // One message whichever part is broken (the number of segments, the base64url, the
    // JSON): the answer and the log say nothing of the decoder's internals.
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(reject(MALFORMED));
    };
    let dec = |s: &str| -> Result<Value, AuthError> {
        let raw = URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| reject(MALFORMED))?;
        match serde_json::from_slice(&raw) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(reject(MALFORMED)),
        }
    };
    Ok(Peek {
        header: dec(h)?,
        payload: dec(p)?,
    })
}

impl Validator {
    fn allowed(&self) -> Vec<Algorithm> {
        if !self.algorithms.is_empty() {
            return self.algorithms.clone();
        }
        let mut out: Vec<Algorithm> = match &**self.keys.discovery.load() {
            Some(d) if !d.id_token_signing_alg_values_supported.is_empty() => d
                .id_token_signing_alg_values_supported
                .iter()
                .filter_map(|a| Algorithm::from_str(a).ok())
                .filter(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
                .collect(),
            _ => DEFAULT_ASYMMETRIC.to_vec(),
        };
        out.push(Algorithm::EdDSA);
        out
    }

    /// The identity of a token this validator has already verified, if still valid: a hash
    /// lookup, no decoding and no signature check.
    pub fn cached(&self, token: &str) -> Option<Arc<Identity>> {
        self.cached_with_proof(token).map(|(id, _)| id)
    }

    /// `cached`, with a [`Proof`] that lets the caller trust the same token again without
    /// the lookup for as long as the proof holds.
    pub fn cached_with_proof(&self, token: &str) -> Option<(Arc<Identity>, Proof)> {
        if token.len() > self.max_size {
            return None;
        }
        // The generation is read before the keys: if the keys change after this, the
        // generation does too, and the proof stops holding.
        let generation = self.keys.generation();
        // Read before the revocations themselves, for the same reason.
        let revoked = self
            .cache
            .revocations()
            .load(std::sync::atomic::Ordering::Acquire);
        let keys = self.keys.keys();
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if self
            .cache
            .is_revoked(token.as_bytes(), since_epoch.as_secs())
        {
            return None;
        }
        let (identity, expires_at) =
            self.cache
                .get_until(token.as_bytes(), since_epoch.as_secs(), |k| {
                    keys.still_picks(k.kid.as_deref(), k.alg, &k.fingerprint)
                })?;
        // The entry is valid while the wall clock is before `expires_at`, exactly.
        let left = Duration::from_secs(expires_at).saturating_sub(since_epoch);
        Some((
            identity,
            Proof {
                keys: self.keys.clone(),
                generation,
                revocations: self.cache.revocations().clone(),
                revoked,
                until: Instant::now() + left,
            },
        ))
    }

    /// Validates a bearer token and returns the identity it carries.
    pub async fn validate(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        if token.len() > self.max_size {
            return Err(reject(format!("token larger than {} bytes", self.max_size)));
        }
        let now = now_secs();
        if self.cache.is_revoked(token.as_bytes(), now) {
            return Err(reject("token ended by a logout"));
        }
        let keys = self.keys.keys();
        if let Some(id) = self.cache.get(token.as_bytes(), now, |k| {
            keys.still_picks(k.kid.as_deref(), k.alg, &k.fingerprint)
        }) {
            return Ok(id);
        }
        drop(keys);
        let peek = peek(token)?;
        let h = &peek.header;
        refuse_header_extensions(h)?;
        let alg_s = h
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| reject("token header has no `alg`"))?;
        if alg_s.eq_ignore_ascii_case("none") {
            return Err(reject("token algorithm `none` is never accepted"));
        }
        let alg = Algorithm::from_str(alg_s).map_err(|_| {
            reject(format!(
                "unsupported token algorithm `{}`",
                alg_s.escape_debug()
            ))
        })?;
        let kid = match h.get("kid") {
            None => None,
            Some(Value::String(k)) if k.len() <= 256 && k.chars().all(|c| !c.is_control()) => {
                Some(k.as_str())
            }
            Some(_) => return Err(reject("token `kid` is not a reasonable key id")),
        };
        let is_hs = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let mut key_holder = None;
        let key: &DecodingKey = if is_hs {
            if !self.algorithms.contains(&alg) {
                return Err(reject(format!(
                    "token algorithm `{alg_s}` is not allowed for provider `{}`",
                    self.provider
                )));
            }
            self.hs_key.as_ref().ok_or_else(|| {
                reject(format!(
                    "token algorithm `{alg_s}` needs a shared secret, and provider `{}` has none",
                    self.provider
                ))
            })?
        } else {
            if !self.allowed().contains(&alg) {
                return Err(reject(format!(
                    "token algorithm `{alg_s}` is not allowed for provider `{}`",
                    self.provider
                )));
            }
            let found = self.keys.find(kid, alg).await.ok_or_else(|| {
                reject(format!(
                    "no key `{}` for provider `{}`",
                    kid.unwrap_or("").escape_debug(),
                    self.provider
                ))
            })?;
            if !found.kty.fits(alg) || found.alg.is_some_and(|a| a != alg) {
                return Err(reject(format!(
                    "key `{}` does not fit algorithm `{alg_s}`",
                    kid.unwrap_or("")
                )));
            }
            &key_holder.insert(found).decoding
        };
        let mut v = Validation::new(alg);
        v.leeway = self.skew;
        // `require_exp: false` makes `exp` optional; a token that has one is still checked.
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&self.audiences);
        let mut required = vec!["iss", "aud"];
        if self.require_exp {
            required.push("exp");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Value>(token, key, &v).map_err(|e| decode_error(&e))?;
        let c = data.claims;
        // jsonwebtoken skips a time claim it cannot read unless it is required: here one that
        // is present must be a NumericDate, or the token is refused.
        numeric_date(&c, "exp")?;
        numeric_date(&c, "nbf")?;
        if let Some(iat) = numeric_date(&c, "iat")? {
            if iat > now + self.skew {
                return Err(reject("token issued in the future (iat)"));
            }
        }
        let identity = Arc::new(identity_from_claims(
            &self.provider,
            self.method,
            &self.claims,
            c,
        )?);
        let exp = identity.expires_at.unwrap_or(u64::MAX);
        let until = exp.min(now + self.cache_ttl.as_secs());
        // The entry lives while the key set would verify this token with this very key. An
        // HS* token is checked with the provider's secret, which is in no key set: no key
        // ends its entry (its `kid` names none; found by fuzzing).
        let key_ref = key_holder.map(|k| KeyRef {
            kid: kid.map(Into::into),
            alg,
            fingerprint: k.fingerprint,
        });
        self.cache
            .insert(token.as_bytes(), identity.clone(), until, key_ref, now);
        Ok(identity)
    }
}

/// Refuses a header that points at a key (`jku`, `x5u`, `jwk`, `x5c`: portcullis never
/// fetches or trusts a key a token names) or has critical extensions (`crit`).
fn refuse_header_extensions(h: &Value) -> Result<(), AuthError> {
    for bad in ["jku", "x5u", "jwk", "x5c"] {
        if h.get(bad).is_some() {
            return Err(reject(format!(
                "token header carries `{bad}`: key-bearing headers are not accepted"
            )));
        }
    }
    if h.get("crit").is_some() {
        return Err(reject(
            "token header has `crit`: critical extensions are not supported",
        ));
    }
    Ok(())
}

/// Why jsonwebtoken refused a token, in portcullis's words. Decoding failures (segments,
/// base64, JSON, UTF-8, a key that does not parse) are one message, with nothing of the
/// decoder's internals.
fn decode_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    reject(match e.kind() {
        K::ExpiredSignature => "token expired".to_string(),
        K::ImmatureSignature => "token not valid yet (nbf)".to_string(),
        K::InvalidIssuer => "token issuer does not match".to_string(),
        K::InvalidAudience => "token audience does not match".to_string(),
        // Missing, or of another type (a number for `aud`, a negative `exp`).
        K::MissingRequiredClaim(c) => format!("token has no valid `{c}` claim"),
        K::InvalidSignature => "token signature is invalid".to_string(),
        K::InvalidAlgorithm => "token algorithm does not match the key".to_string(),
        _ => MALFORMED.to_string(),
    })
}

/// A time claim (`exp`, `nbf`, `iat`) as seconds since the epoch: `None` when absent or null,
/// an error when it is not a NumericDate. A fraction is rounded, as jsonwebtoken rounds it
/// when it checks `exp` and `nbf`, so that the identity expires when the check says the
/// token does (found by fuzzing: a float `exp` was checked, but the identity never expired,
/// and a float `iat` in the future, or an `nbf` of `1e300`, was not checked at all).
fn numeric_date(c: &Value, name: &str) -> Result<Option<u64>, AuthError> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                Ok(Some(f.round() as u64))
            }
            _ => Err(reject(format!("token `{name}` is not a NumericDate"))),
        },
    }
}

/// Builds an identity from verified claims.
pub fn identity_from_claims(
    provider: &str,
    method: AuthMethod,
    map: &ClaimMap,
    c: Value,
) -> Result<Identity, AuthError> {
    // An empty subject names no one: refused, as a missing one is.
    let subject = claims::string(&c, "sub")
        .or_else(|| claims::string(&c, &map.user))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| reject("token has no `sub` claim"))?;
    let user = claims::string(&c, &map.user).unwrap_or_else(|| subject.clone());
    Ok(Identity {
        provider: provider.to_string(),
        method,
        email: claims::string(&c, &map.email),
        groups: claims::groups(&c, &map.groups),
        expires_at: numeric_date(&c, "exp").ok().flatten(),
        subject,
        user,
        claims: c,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::Source;

    fn write_keys(path: &std::path::Path, jwk: &Value) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// The key set of the JWKS file `file`, read once.
    async fn file_keys(file: &std::path::Path) -> Arc<KeySource> {
        let keys = Arc::new(KeySource::new(
            "p",
            Source::File(file.to_path_buf()),
            None,
            Duration::from_secs(60),
        ));
        keys.refresh().await.unwrap();
        keys
    }

    /// An ES256 validator for issuer `https://p.test`, audience `api`, over `keys`.
    fn validator(keys: Arc<KeySource>) -> Validator {
        Validator {
            provider: "p".into(),
            issuer: "https://p.test".into(),
            audiences: vec!["api".into()],
            algorithms: vec![Algorithm::ES256],
            hs_key: None,
            skew: 0,
            require_exp: true,
            max_size: 16 * 1024,
            claims: ClaimMap::default(),
            keys,
            cache: TokenCache::new(16),
            cache_ttl: Duration::from_secs(300),
            method: AuthMethod::Jwt,
        }
    }

    /// A cache hit's proof holds until the entry's expiry, and ends with any new key set.
    #[tokio::test]
    async fn a_proof_ends_at_expiry_and_with_a_new_key_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let dev = crate::dev::generate().unwrap().1;
        write_keys(&file, &dev.jwk);
        let keys = file_keys(&file).await;
        let v = validator(keys.clone());
        let token = dev
            .mint("https://p.test", "api", "alice", &[], None, 120)
            .unwrap();
        assert!(v.cached_with_proof(&token).is_none(), "not verified yet");
        let id = v.validate(&token).await.unwrap();
        let (cached, proof) = v.cached_with_proof(&token).unwrap();
        assert!(Arc::ptr_eq(&id, &cached));
        let now = Instant::now();
        assert!(proof.holds(now));
        assert!(proof.holds(now + Duration::from_secs(100)));
        // The token's `exp` (120 s) comes before the cache TTL (300 s).
        assert!(!proof.holds(now + Duration::from_secs(121)));

        // A new key set (the same key, rewritten): the proof ends; the cache, asked again,
        // gives a new one.
        std::thread::sleep(Duration::from_millis(20));
        write_keys(&file, &dev.jwk);
        keys.refresh().await.unwrap();
        assert!(!proof.holds(now));
        let (_, again) = v.cached_with_proof(&token).unwrap();
        assert!(again.holds(now));

        // The signing key leaves: no proof, and the entry is gone. (Each rewrite waits a
        // little: the file is re-read when its modification time changes, which the kernel
        // keeps with a coarse clock.)
        std::thread::sleep(Duration::from_millis(20));
        write_keys(&file, &crate::dev::generate().unwrap().1.jwk);
        keys.refresh().await.unwrap();
        assert!(!again.holds(now));
        assert!(v.cached_with_proof(&token).is_none());
    }

    /// The twin of an ES256 token: the same header and payload, signed `(r, n - s)`, which
    /// verifies as well and which anyone can compute without the key.
    fn ecdsa_twin(token: &str) -> String {
        const N: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let s = &mut sig[32..];
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
            borrow = i16::from(d < 0);
            s[i] = (d + 256 * borrow) as u8;
        }
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// A logout's revocation refuses the token in either of its ECDSA signatures (a cached
    /// twin too), and ends the proofs connections hold, whichever token they were for.
    #[tokio::test]
    async fn a_revoked_token_is_refused_under_either_signature_and_ends_every_proof() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let dev = crate::dev::generate().unwrap().1;
        write_keys(&file, &dev.jwk);
        let v = validator(file_keys(&file).await);
        let token = dev
            .mint("https://p.test", "api", "alice", &[], None, 120)
            .unwrap();
        let twin = ecdsa_twin(&token);
        assert_ne!(twin, token);
        let other = dev
            .mint("https://p.test", "api", "bob", &[], None, 120)
            .unwrap();
        // Both spellings verify, and are cached.
        v.validate(&token).await.unwrap();
        v.validate(&twin).await.unwrap();
        v.validate(&other).await.unwrap();
        let (_, proof) = v.cached_with_proof(&twin).unwrap();
        let (_, bobs) = v.cached_with_proof(&other).unwrap();
        let now_i = Instant::now();
        assert!(proof.holds(now_i) && bobs.holds(now_i));

        let now = now_secs();
        v.cache.revoke(token.as_bytes(), now + 60, now);
        for t in [&token, &twin] {
            let e = v.validate(t).await.unwrap_err();
            assert!(e.to_string().contains("ended by a logout"), "{e}");
            assert!(v.cached_with_proof(t).is_none());
        }
        assert!(!proof.holds(now_i), "a connection's memo of the twin ends");
        assert!(!bobs.holds(now_i), "every proof ends; bob's is made again");
        assert!(v.cached_with_proof(&other).unwrap().1.holds(now_i));
        v.validate(&other).await.unwrap();

        // As read back from the embedded store: by the digest of the signing input.
        let w = validator(file_keys(&file).await);
        let d = crate::cache::revocation_digest(twin.as_bytes());
        w.cache.revoke_digest(d, now + 60, now);
        assert!(w.validate(&token).await.is_err());
        assert!(w.validate(&other).await.is_ok());
    }

    /// A cached token is served only while the key set would verify it with the key that
    /// did: not after that key leaves (a token without `kid` too), not after another key
    /// takes its `kid`, and not when a second key makes a `kid`-less token ambiguous. The
    /// same key read again keeps it.
    #[tokio::test]
    async fn a_cached_token_lives_only_as_long_as_the_key_that_verified_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let write = |keys: &[&Value]| {
            std::thread::sleep(Duration::from_millis(20));
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, serde_json::json!({ "keys": keys }).to_string()).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        let dev = crate::dev::generate().unwrap().1;
        let other = crate::dev::generate().unwrap().1;
        let without_kid = |jwk: &Value| {
            let mut j = jwk.clone();
            j.as_object_mut().unwrap().remove("kid");
            j
        };
        let (dev_bare, other_bare) = (without_kid(&dev.jwk), without_kid(&other.jwk));
        // `other`'s key under `dev`'s kid.
        let mut impostor = other.jwk.clone();
        impostor["kid"] = Value::String(dev.kid.clone());
        let now = now_secs();
        let claims = serde_json::json!({
            "iss": "https://p.test", "aud": "api", "sub": "alice", "exp": now + 120,
        });
        let bare_token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::ES256),
            &claims,
            &dev.encoding,
        )
        .unwrap();
        let kid_token = dev
            .mint("https://p.test", "api", "alice", &[], None, 120)
            .unwrap();

        write(&[&dev_bare, &impostor]);
        // Without `kid` the token names no key; `dev` is the only key with none, but
        // `impostor` fits ES256 too: ambiguous, refused.
        let keys = file_keys(&file).await;
        let v = validator(keys.clone());
        assert!(v.validate(&bare_token).await.is_err(), "two keys fit");

        // The `kid`-less key alone: verified and cached.
        write(&[&dev_bare]);
        keys.refresh().await.unwrap();
        assert!(v.validate(&bare_token).await.is_ok());
        assert!(v.cached(&bare_token).is_some());
        // Read again unchanged: still served from the cache.
        write(&[&dev_bare]);
        keys.refresh().await.unwrap();
        assert!(v.cached(&bare_token).is_some(), "the same key, read again");
        // A second fitting key: a fresh check would find two, so the cache does not answer.
        write(&[&dev_bare, &other_bare]);
        keys.refresh().await.unwrap();
        assert!(v.cached(&bare_token).is_none(), "ambiguous now");
        assert!(v.validate(&bare_token).await.is_err());
        // The signing key replaced by another: refused, from the cache and afresh.
        write(&[&dev_bare]);
        keys.refresh().await.unwrap();
        assert!(v.validate(&bare_token).await.is_ok());
        write(&[&other_bare]);
        keys.refresh().await.unwrap();
        assert!(v.cached(&bare_token).is_none(), "its key is gone");
        assert!(v.validate(&bare_token).await.is_err());

        // A token with `kid`: cached, then another key takes that kid.
        write(&[&dev.jwk]);
        keys.refresh().await.unwrap();
        assert!(v.validate(&kid_token).await.is_ok());
        assert!(v.cached(&kid_token).is_some());
        write(&[&impostor]);
        keys.refresh().await.unwrap();
        assert!(v.cached(&kid_token).is_none(), "another key under its kid");
        assert!(v.validate(&kid_token).await.is_err());
    }

    /// `require_exp: false` makes `exp` optional, never ignored: a token without one is
    /// accepted, one whose `exp` has passed is still refused.
    #[tokio::test]
    async fn without_require_exp_a_past_exp_is_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let dev = crate::dev::generate().unwrap().1;
        write_keys(&file, &dev.jwk);
        let keys = file_keys(&file).await;
        let mut v = validator(keys);
        v.require_exp = false;
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some(dev.kid.clone());
        let sign = |c: Value| jsonwebtoken::encode(&h, &c, &dev.encoding).unwrap();
        let base = serde_json::json!({ "iss": "https://p.test", "aud": "api", "sub": "alice" });
        assert!(v.validate(&sign(base.clone())).await.is_ok(), "no exp");
        let mut past = base.clone();
        past["exp"] = Value::from(now_secs() - 600);
        assert!(v.validate(&sign(past)).await.is_err(), "exp passed");
        let mut text = base;
        text["exp"] = Value::from("never");
        assert!(v.validate(&sign(text)).await.is_err(), "exp not a number");
    }

    /// A subject must name someone: an empty `sub` is refused as a missing one is.
    #[test]
    fn an_empty_subject_is_refused() {
        let map = ClaimMap::default();
        let with = |sub: Value| serde_json::json!({ "sub": sub, "iss": "i" });
        let refused = |c: Value| identity_from_claims("p", AuthMethod::Jwt, &map, c).is_err();
        assert!(refused(with(Value::String(String::new()))));
        assert!(refused(serde_json::json!({ "iss": "i" })));
        assert!(!refused(with(Value::String("alice".into()))));
    }

    /// A token broken in any of its parts is refused with the one message, which names no
    /// decoder.
    #[tokio::test]
    async fn a_broken_token_gets_one_message_whatever_part_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        let dev = crate::dev::generate().unwrap().1;
        write_keys(&file, &dev.jwk);
        let keys = file_keys(&file).await;
        let v = validator(keys);
        let good = dev
            .mint("https://p.test", "api", "alice", &[], None, 120)
            .unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let broken = [
            "not-a-token".to_string(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            format!("!!!.{}.{}", parts[1], parts[2]),
            format!("{}.!!!.{}", parts[0], parts[2]),
            format!("{}.{}.{}", b64("{not json"), parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], b64("[1,2]"), parts[2]),
            format!("{}.{}.{}", parts[0], b64("\"text\""), parts[2]),
            format!("{}.{}.%%%", parts[0], parts[1]),
        ];
        for t in broken {
            let e = v.validate(&t).await.unwrap_err();
            assert_eq!(e.reason, MALFORMED, "{t}");
        }
        assert!(v.validate(&good).await.is_ok());
    }
}
