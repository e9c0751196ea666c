//! Identity targets: bearer JWTs (raw, and built from an `arbitrary` case and signed here, so
//! that the claim checks behind the signature are reached), JWKS documents, sealed session
//! cookies and the API key file. The key set is fixed: an HS256 secret and one ES256 key, both
//! made for these targets and used nowhere else.

use crate::support::{block_on, scratch, text};
use arbitrary::{Arbitrary, Unstructured};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use portcullis_config::ClaimMap;
use portcullis_identity::apikey::KeyStore;
use portcullis_identity::cache::TokenCache;
use portcullis_identity::jwks::{KeySet, KeySource, Source};
use portcullis_identity::jwt::{self, Validator};
use portcullis_identity::session::{Sealer, Session, Store};
use portcullis_identity::{dev, now_secs, AuthMethod, Identity};
use serde_json::{json, Map, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The ES256 key of these targets (PKCS#8). A test key: it signs nothing but fuzz inputs.
const ES256_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgLqTfcY3/y2anzvWg
or7fjDPGG4vV9pTghFt9du3WzNWhRANCAATFmW9cbS9SpaLDGCPoilhW3c3oEeXH
Drck2J8xta1QFp61U/1LNImRtPli+rYQ6Z/hVUNsiC53jZ0SLFT2p4uk
-----END PRIVATE KEY-----
";
/// The HS256 secret of these targets' provider.
pub const HS_SECRET: &[u8] = b"portcullis-fuzz-hs256-secret-not-used-anywhere-else";
/// The issuer and audience the validator expects.
pub const ISSUER: &str = "https://issuer.fuzz.test";
pub const AUDIENCE: &str = "portcullis";
/// The validator's clock skew, in seconds.
const SKEW: u64 = 30;
/// Tokens larger than this are refused unread.
const MAX_TOKEN: usize = 16 * 1024;

struct Keys {
    dev: dev::DevKey,
    source: Arc<KeySource>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dev = dev::from_pem(ES256_PEM).expect("the fixed ES256 key");
        let set = dev.key_set();
        let source = Arc::new(KeySource::new(
            "fuzz",
            Source::Inline,
            Some(set),
            Duration::from_secs(3600),
        ));
        Keys { dev, source }
    })
}

/// The kid of the fixed ES256 key.
pub fn es256_kid() -> String {
    keys().dev.kid.clone()
}

/// `claims` signed with the fixed ES256 key (for seeds).
pub fn sign_es256(claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.kid = Some(es256_kid());
    jsonwebtoken::encode(&h, claims, &keys().dev.encoding).expect("ES256")
}

/// A session cookie sealed with the current key (for seeds).
pub fn seal_session_seed(session: &Value) -> String {
    sealer().seal("session", session).expect("sealing a seed")
}

/// A validator like a `jwt` provider's, with a fresh cache, so that each input is judged on
/// its own.
fn validator() -> Validator {
    Validator {
        provider: "fuzz".into(),
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        algorithms: vec![Algorithm::HS256, Algorithm::ES256],
        hs_key: Some(DecodingKey::from_secret(HS_SECRET)),
        skew: SKEW,
        require_exp: false,
        max_size: MAX_TOKEN,
        claims: ClaimMap {
            user: "preferred_username".into(),
            email: "email".into(),
            groups: "realm_access.roles".into(),
        },
        keys: keys().source.clone(),
        cache: TokenCache::new(8),
        cache_ttl: Duration::from_secs(300),
        method: AuthMethod::Jwt,
    }
}

/// A JSON number as `f64`, as jsonwebtoken reads a NumericDate (it takes floats too).
fn number(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

/// What must hold of every identity a token yielded: the checks the validator promises
/// (docs/identity.md), read back from the claims.
fn check_accepted(id: &Identity, now: u64) {
    assert_eq!(id.provider, "fuzz");
    assert_eq!(id.method, AuthMethod::Jwt);
    let c = &id.claims;
    assert_eq!(c.get("iss").and_then(Value::as_str), Some(ISSUER), "issuer");
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => a == AUDIENCE,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(aud_ok, "audience: {:?}", c.get("aud"));
    let (now_f, skew) = (now as f64, SKEW as f64);
    if let Some(exp) = number(c.get("exp")) {
        // One second of slack each way: the validator and this check read the clock apart.
        assert!(
            exp.round() + skew + 1.0 >= now_f,
            "accepted an expired token: exp {exp}"
        );
        // The identity expires when the token does: the token cache and the session built
        // on it use `expires_at`.
        assert_eq!(
            id.expires_at,
            Some(exp.round() as u64),
            "`exp` {exp} was checked but the identity does not expire with it"
        );
    }
    if let Some(nbf) = number(c.get("nbf")) {
        assert!(
            nbf.round() <= now_f + skew + 1.0,
            "accepted before nbf {nbf}"
        );
    }
    if let Some(iat) = number(c.get("iat")) {
        assert!(
            iat <= now_f + skew + 1.0,
            "accepted a token issued in the future: iat {iat}"
        );
    }
}

/// A bearer token as sent: decoded, checked against the fixed key set, and, when accepted,
/// served again from the cache.
pub fn jwt(data: &[u8]) {
    let Some(token) = text(data) else {
        return;
    };
    let _ = jwt::peek(token);
    let v = validator();
    let now = now_secs();
    if let Ok(id) = block_on(v.validate(token)) {
        check_accepted(&id, now);
        let again = block_on(v.validate(token)).expect("an accepted token, asked again");
        assert!(
            Arc::ptr_eq(&id, &again),
            "the second answer comes from the cache"
        );
    }
}

/// The `alg` a case's header names.
#[derive(Arbitrary, Debug, Clone)]
enum Alg {
    Hs256,
    Hs384,
    Es256,
    Es384,
    Rs256,
    EdDsa,
    None,
    NoneMixed,
    Other(String),
}

impl Alg {
    fn name(&self) -> String {
        match self {
            Alg::Hs256 => "HS256".into(),
            Alg::Hs384 => "HS384".into(),
            Alg::Es256 => "ES256".into(),
            Alg::Es384 => "ES384".into(),
            Alg::Rs256 => "RS256".into(),
            Alg::EdDsa => "EdDSA".into(),
            Alg::None => "none".into(),
            Alg::NoneMixed => "nOnE".into(),
            Alg::Other(s) => s.clone(),
        }
    }
}

/// How a case's token is signed.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Signer {
    /// HS256 with the provider's secret.
    Secret,
    /// HS256 with another secret.
    OtherSecret,
    /// ES256 with the fixed key.
    EsKey,
    /// The provider's secret used as an HMAC key whatever the header says.
    SecretAsHs384,
    /// No signature at all.
    Empty,
    /// Random bytes.
    Garbage,
}

#[derive(Arbitrary, Debug, Clone)]
enum Kid {
    Ours,
    Other(String),
    Number(i64),
    Long,
}

#[derive(Arbitrary, Debug, Clone)]
enum Extra {
    Crit,
    Jku,
    X5u,
    Jwk,
    X5c,
    Typ(String),
}

#[derive(Arbitrary, Debug, Clone)]
enum Iss {
    Ours,
    OursWithSlash,
    Other(String),
    Number(u32),
    Missing,
}

#[derive(Arbitrary, Debug, Clone)]
enum Aud {
    Ours,
    AmongOthers(Vec<String>),
    Other(String),
    Number(u32),
    Missing,
}

/// A time claim, relative to now where it matters.
#[derive(Arbitrary, Debug, Clone)]
enum Time {
    Missing,
    /// Seconds from now, as an integer.
    Offset(i32),
    /// Seconds from now, as a float.
    FloatOffset(i32, u8),
    Negative(i64),
    Text(String),
    Huge,
}

impl Time {
    fn value(&self, now: u64) -> Option<Value> {
        let at = |off: i32| (now as i64 + i64::from(off)).max(0);
        Some(match self {
            Time::Missing => return None,
            Time::Offset(o) => json!(at(*o)),
            Time::FloatOffset(o, frac) => json!(at(*o) as f64 + f64::from(*frac) / 256.0),
            Time::Negative(n) => json!(-(n.unsigned_abs().clamp(1, i64::MAX as u64) as i64)),
            Time::Text(s) => json!(s),
            Time::Huge => json!(1e300),
        })
    }

    /// Clearly in the past beyond the skew, or clearly in the future beyond it: `Some(true)`
    /// when later than now + skew + margin, `Some(false)` when earlier than now - skew -
    /// margin, `None` when close, absent or not a number jsonwebtoken takes.
    fn side(&self) -> Option<bool> {
        let margin = SKEW as i64 + 5;
        let off = match self {
            Time::Offset(o) | Time::FloatOffset(o, _) => i64::from(*o),
            _ => return None,
        };
        if off > margin {
            Some(true)
        } else if off < -margin {
            Some(false)
        } else {
            None
        }
    }
}

/// A structured token: the fuzzer chooses the header, the claims, the signer and a tampered
/// byte; the harness builds and signs it, so the checks after the signature are reached.
#[derive(Arbitrary, Debug)]
struct JwtCase {
    alg: Alg,
    signer: Signer,
    kid: Option<Kid>,
    extra: Option<Extra>,
    iss: Iss,
    aud: Aud,
    exp: Time,
    nbf: Time,
    iat: Time,
    sub: Option<String>,
    username: Option<String>,
    email: Option<String>,
    roles: Option<Vec<String>>,
    claims: Vec<(String, String)>,
    /// Replace the character at this position (in the payload and signature) with another.
    tamper: Option<(u16, u8)>,
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

impl JwtCase {
    fn header(&self) -> Value {
        let mut h = Map::new();
        h.insert("alg".into(), json!(self.alg.name()));
        match &self.kid {
            None => {}
            Some(Kid::Ours) => {
                h.insert("kid".into(), json!(es256_kid()));
            }
            Some(Kid::Other(s)) => {
                h.insert("kid".into(), json!(s));
            }
            Some(Kid::Number(n)) => {
                h.insert("kid".into(), json!(n));
            }
            Some(Kid::Long) => {
                h.insert("kid".into(), json!("k".repeat(300)));
            }
        }
        match &self.extra {
            None => {}
            Some(Extra::Crit) => {
                h.insert("crit".into(), json!(["exp"]));
            }
            Some(Extra::Jku) => {
                h.insert("jku".into(), json!("https://evil.test/jwks"));
            }
            Some(Extra::X5u) => {
                h.insert("x5u".into(), json!("https://evil.test/cert"));
            }
            Some(Extra::Jwk) => {
                h.insert("jwk".into(), keys().dev.jwk.clone());
            }
            Some(Extra::X5c) => {
                h.insert("x5c".into(), json!(["MIIB"]));
            }
            Some(Extra::Typ(t)) => {
                h.insert("typ".into(), json!(t));
            }
        }
        Value::Object(h)
    }

    fn claims(&self, now: u64) -> Value {
        let mut c = Map::new();
        // Free claims first, so that the named ones below win.
        for (k, v) in &self.claims {
            c.insert(k.clone(), json!(v));
        }
        for (name, t) in [("exp", &self.exp), ("nbf", &self.nbf), ("iat", &self.iat)] {
            match t.value(now) {
                Some(v) => {
                    c.insert(name.into(), v);
                }
                None => {
                    c.remove(name);
                }
            }
        }
        match &self.iss {
            Iss::Ours => {
                c.insert("iss".into(), json!(ISSUER));
            }
            Iss::OursWithSlash => {
                c.insert("iss".into(), json!(format!("{ISSUER}/")));
            }
            Iss::Other(s) => {
                c.insert("iss".into(), json!(s));
            }
            Iss::Number(n) => {
                c.insert("iss".into(), json!(n));
            }
            Iss::Missing => {
                c.remove("iss");
            }
        }
        match &self.aud {
            Aud::Ours => {
                c.insert("aud".into(), json!(AUDIENCE));
            }
            Aud::AmongOthers(others) => {
                let mut list: Vec<Value> = others.iter().map(|o| json!(o)).collect();
                list.push(json!(AUDIENCE));
                c.insert("aud".into(), Value::Array(list));
            }
            Aud::Other(s) => {
                c.insert("aud".into(), json!(s));
            }
            Aud::Number(n) => {
                c.insert("aud".into(), json!(n));
            }
            Aud::Missing => {
                c.remove("aud");
            }
        }
        for (name, v) in [
            ("sub", &self.sub),
            ("preferred_username", &self.username),
            ("email", &self.email),
        ] {
            match v {
                Some(v) => {
                    c.insert(name.into(), json!(v));
                }
                None => {
                    c.remove(name);
                }
            }
        }
        if let Some(roles) = &self.roles {
            c.insert("realm_access".into(), json!({ "roles": roles }));
        }
        Value::Object(c)
    }

    /// The token, and whether a byte of it was changed after signing.
    fn token(&self, now: u64) -> (String, bool) {
        let h = URL_SAFE_NO_PAD.encode(self.header().to_string());
        let p = URL_SAFE_NO_PAD.encode(self.claims(now).to_string());
        let input = format!("{h}.{p}");
        let es = || EncodingKey::from_ec_pem(ES256_PEM.as_bytes()).expect("the fixed ES256 key");
        let sig = match self.signer {
            Signer::Secret => jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(HS_SECRET),
                Algorithm::HS256,
            ),
            Signer::OtherSecret => jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(b"another secret"),
                Algorithm::HS256,
            ),
            Signer::SecretAsHs384 => jsonwebtoken::crypto::sign(
                input.as_bytes(),
                &EncodingKey::from_secret(HS_SECRET),
                Algorithm::HS384,
            ),
            Signer::EsKey => jsonwebtoken::crypto::sign(input.as_bytes(), &es(), Algorithm::ES256),
            Signer::Empty => Ok(String::new()),
            Signer::Garbage => Ok(URL_SAFE_NO_PAD.encode(input.len().to_be_bytes())),
        }
        .expect("signing with a fixed key");
        let mut token = format!("{input}.{sig}").into_bytes();
        let mut tampered = false;
        if let Some((at, with)) = self.tamper {
            // Within the payload and the signature (a changed header is just another header).
            let from = h.len() + 1;
            if token.len() > from {
                let i = from + usize::from(at) % (token.len() - from);
                let c = B64URL[usize::from(with) % 64];
                if token[i] != b'.' && token[i] != c {
                    token[i] = c;
                    tampered = true;
                }
            }
        }
        (
            String::from_utf8(token).expect("base64url and dots"),
            tampered,
        )
    }

    /// Why the validator must refuse this token, if it must.
    fn must_refuse(&self, token: &str, tampered: bool) -> Option<&'static str> {
        // By the name in the header: `Other("HS256")` is HS256 too.
        let alg = self.alg.name();
        let signed_right = (alg == "HS256" && self.signer == Signer::Secret)
            || (alg == "ES256" && self.signer == Signer::EsKey);
        if tampered {
            return Some("a byte was changed after signing");
        }
        if !signed_right {
            return Some("not signed with the key its algorithm names");
        }
        if self
            .extra
            .as_ref()
            .is_some_and(|e| !matches!(e, Extra::Typ(_)))
        {
            return Some("a key-bearing or critical header");
        }
        if matches!(self.kid, Some(Kid::Number(_) | Kid::Long)) {
            return Some("an unreasonable kid");
        }
        if alg == "ES256" && matches!(self.kid, Some(Kid::Other(ref k)) if *k != es256_kid()) {
            return Some("an unknown kid");
        }
        if !matches!(self.iss, Iss::Ours) {
            return Some("another issuer");
        }
        match &self.aud {
            Aud::Ours | Aud::AmongOthers(_) => {}
            _ => return Some("another audience"),
        }
        if self.exp.side() == Some(false) {
            return Some("expired");
        }
        if self.nbf.side() == Some(true) {
            return Some("not valid yet");
        }
        if self.iat.side() == Some(true) {
            return Some("issued in the future");
        }
        if token.len() > MAX_TOKEN {
            return Some("too large");
        }
        None
    }

    /// Whether everything about this token is plainly fine, so the validator must accept it.
    fn plainly_fine(&self, token: &str, tampered: bool) -> bool {
        let time_ok = |t: &Time, late_ok: bool| match t {
            Time::Missing => true,
            Time::Offset(_) => t.side() == Some(late_ok),
            _ => false,
        };
        self.must_refuse(token, tampered).is_none()
            && self.extra.is_none()
            && match &self.kid {
                None | Some(Kid::Ours) => true,
                Some(Kid::Other(k)) => {
                    self.alg.name() == "HS256" && k.len() <= 256 && !k.chars().any(char::is_control)
                }
                _ => false,
            }
            && time_ok(&self.exp, true)
            && time_ok(&self.nbf, false)
            && time_ok(&self.iat, false)
            && self.sub.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// A token built from a structured case and signed here: whatever the validator accepts
/// must pass every check it promises, and a plainly good token must be accepted.
pub fn jwt_claims(data: &[u8]) {
    let Ok(case) = JwtCase::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let now = now_secs();
    let (token, tampered) = case.token(now);
    let v = validator();
    match block_on(v.validate(&token)) {
        Ok(id) => {
            if let Some(why) = case.must_refuse(&token, tampered) {
                panic!("accepted a token that must be refused ({why}): {case:?}\n{token}");
            }
            check_accepted(&id, now);
        }
        Err(e) => {
            assert!(
                !case.plainly_fine(&token, tampered),
                "refused a plainly good token ({e}): {case:?}\n{token}"
            );
        }
    }
}

/// A JWKS document: parsed into a key set, and every key it yields tried on a fixed token.
pub fn jwks(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(set) = KeySet::parse(&doc) else {
        return;
    };
    assert!(!set.is_empty(), "a parsed key set has a key");
    static TOKEN: OnceLock<String> = OnceLock::new();
    let token = TOKEN.get_or_init(|| {
        keys()
            .dev
            .mint(ISSUER, AUDIENCE, "fuzz", &[], None, 3600)
            .expect("a token")
    });
    let algs = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    let kids: Vec<Option<&str>> = std::iter::once(None)
        .chain(
            doc.get("keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|k| k.get("kid").and_then(Value::as_str).map(Some)),
        )
        .collect();
    for kid in kids {
        for alg in algs {
            let Some(key) = set.get(kid, alg) else {
                continue;
            };
            if kid.is_none() {
                assert!(
                    key.kty.fits(alg),
                    "a key without kid is chosen only if it fits"
                );
            }
            if key.kty.fits(alg) && key.alg.is_none_or(|a| a == alg) {
                let mut v = jsonwebtoken::Validation::new(alg);
                v.validate_aud = false;
                let _ = jsonwebtoken::decode::<Value>(token, &key.decoding, &v);
            }
        }
    }
}

fn sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| Sealer::new(&[[7u8; 32], [9u8; 32]]).expect("two keys"))
}

/// The key a rotated-out sealer used: the second of [`sealer`]'s keys.
fn old_sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| Sealer::new(&[[9u8; 32]]).expect("one key"))
}

/// A session cookie: mode 0 decodes the rest as a cookie; modes 1 and 2 seal the rest (JSON)
/// with the current or the rotated-out key first, since random bytes never decrypt.
/// Whatever opens must re-encode to a cookie that opens to the same session, must not open
/// under another purpose, and must not open again once logged out.
pub fn session_cookie(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let store = Store::default();
    let cookie = match mode % 3 {
        0 => match text(rest) {
            Some(c) => c.to_string(),
            None => return,
        },
        m => {
            let Ok(v) = serde_json::from_slice::<Value>(rest) else {
                return;
            };
            let by = if m == 1 { sealer() } else { old_sealer() };
            let Some(c) = by.seal("session", &v) else {
                return;
            };
            assert!(
                sealer().open::<Value>("preauth", &c).is_none(),
                "a session cookie opened as a pre-auth cookie"
            );
            c
        }
    };
    let Some(s) = store.decode(sealer(), &cookie) else {
        return;
    };
    let now = now_secs();
    assert!(s.expires_at > now, "an expired session opened");
    if s.expires_at <= now + 5 {
        // Too close to its expiry to compare reliably.
        return;
    }
    let before = serde_json::to_value(&s).expect("a session serializes");
    let again = store.encode(sealer(), &s).expect("a session encodes");
    let reopened: Session = store
        .decode(sealer(), &again)
        .expect("a fresh cookie opens");
    let after = serde_json::to_value(&reopened).expect("a session serializes");
    assert_eq!(before, after, "a session changed through encode and decode");
    store.end(sealer(), &again, s.expires_at);
    assert!(
        store.decode(sealer(), &again).is_none(),
        "a logged-out cookie opened again"
    );
}

/// The key presented to an API key file: the seeds name its SHA-256.
pub const KNOWN_API_KEY: &str = "pk_fuzz_known_key";

/// An API key file: read as the key store reads it, then asked for a known key and an unknown
/// one. (Files with argon2id entries are only parsed: verifying with the file's own cost
/// parameters would make every input as slow as the file asks.)
pub fn apikey_file(data: &[u8]) {
    let Some(text) = text(data) else {
        return;
    };
    let path = scratch("apikey_file").join("keys.yaml");
    std::fs::write(&path, data).expect("writing the scratch key file");
    let Ok(store) = KeyStore::open("fuzz", path) else {
        return;
    };
    if text.contains("argon2") {
        return;
    }
    if let Ok(id) = store.verify(KNOWN_API_KEY) {
        assert_eq!(id.provider, "fuzz");
        assert_eq!(id.method, AuthMethod::ApiKey);
        if let Some(e) = id.expires_at {
            assert!(e > now_secs(), "an expired key was accepted");
        }
    }
    assert!(
        store.verify("pk_never_listed_anywhere").is_err(),
        "a key that no entry hashes to was accepted"
    );
}
