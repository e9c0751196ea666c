//! Seed inputs that cannot be written by hand: tokens signed with the targets' fixed keys,
//! sealed session cookies, API key files naming a known key's hash, and hash-chained audit
//! files. `cargo test -p portcullis-fuzz-targets --test seeds -- --ignored` writes them into
//! `fuzz/corpus/<target>/` (the hand-written seeds there come from the repository's tests and
//! examples).

use crate::identity::{es256_kid, sign_es256, AUDIENCE, HS_SECRET, ISSUER, KNOWN_API_KEY};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis_audit::chain::{canonical, record_hash, GENESIS};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Far in the future (2100-01-01), so that seeds do not expire.
const FAR: u64 = 4_102_444_800;

fn hs256(claims: &Value, kid: Option<&str>) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_secret(HS_SECRET)).expect("HS256")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Audit lines: `records` chained from genesis, each the canonical form of its object.
fn audit_chain(records: &[Value]) -> Vec<u8> {
    let mut prev = GENESIS.to_string();
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let mut obj = r.as_object().cloned().unwrap_or_default();
        obj.insert("seq".into(), json!(i as u64 + 1));
        obj.insert("prev_hash".into(), json!(prev));
        obj.insert("instance".into(), json!("edge-1"));
        obj.insert(
            "time".into(),
            json!(format!("2026-01-01T00:00:0{}.250Z", i % 10)),
        );
        let hash = record_hash(&obj);
        obj.insert("hash".into(), json!(hash));
        out.extend_from_slice(&canonical(&Value::Object(obj)));
        out.push(b'\n');
        prev = hash;
    }
    out
}

/// Every generated seed: (target, file name, bytes). A name under `regressions/` goes to
/// `fuzz/regressions/<target>/` instead of the corpus: an input that once failed.
pub fn generated() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let good = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": FAR, "iat": 1_700_000_000u64,
        "email": "alice@example.com", "realm_access": { "roles": ["eng", "ops"] },
        "preferred_username": "alice"
    });
    out.push((
        "jwt",
        "hs256-good.txt".into(),
        hs256(&good, None).into_bytes(),
    ));
    out.push((
        "jwt",
        "hs256-aud-array-no-exp.txt".into(),
        hs256(
            &json!({ "iss": ISSUER, "aud": ["other", AUDIENCE], "sub": "bob" }),
            Some("any"),
        )
        .into_bytes(),
    ));
    out.push((
        "jwt",
        "hs256-expired.txt".into(),
        hs256(
            &json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "exp": 1_000_000_000u64 }),
            None,
        )
        .into_bytes(),
    ));
    out.push((
        "jwt",
        "hs256-wrong-issuer.txt".into(),
        hs256(
            &json!({ "iss": "https://evil.test", "aud": AUDIENCE, "sub": "mallory" }),
            None,
        )
        .into_bytes(),
    ));
    // Time claims as floats, or not NumericDates at all: jsonwebtoken checks a float `exp`
    // and `nbf` (rounded) but skips what it cannot read, and portcullis read only integers.
    for (name, claim, value) in [
        ("float-exp", "exp", json!(4_102_444_800.5)),
        ("float-iat-in-2100", "iat", json!(4_102_444_800.5)),
        ("nbf-1e300", "nbf", json!(1e300)),
        ("exp-negative", "exp", json!(-1)),
    ] {
        let mut c = json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": "dave" });
        c[claim] = value;
        out.push((
            "jwt",
            format!("regressions/hs256-{name}.txt"),
            hs256(&c, None).into_bytes(),
        ));
    }
    out.push((
        "jwt",
        "es256-good.txt".into(),
        sign_es256(&good).into_bytes(),
    ));
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(good.to_string());
    out.push((
        "jwt",
        "alg-none.txt".into(),
        format!("{none_header}.{payload}.").into_bytes(),
    ));
    let jku = URL_SAFE_NO_PAD.encode(
        json!({ "alg": "ES256", "kid": es256_kid(), "jku": "https://evil.test/k" }).to_string(),
    );
    out.push((
        "jwt",
        "jku-header.txt".into(),
        format!("{jku}.{payload}.c2ln").into_bytes(),
    ));

    let session = json!({
        "identity": {
            "provider": "corp", "method": "session", "subject": "alice", "user": "alice",
            "email": "alice@example.com", "groups": ["eng"], "claims": { "sub": "alice" },
            "expires_at": FAR
        },
        "expires_at": FAR, "refresh_token": "r", "tokens_expire_at": FAR
    });
    let mut sealed = vec![1u8];
    sealed.extend_from_slice(session.to_string().as_bytes());
    out.push(("session_cookie", "sealed-current-key.json".into(), sealed));
    let mut rotated = vec![2u8];
    rotated.extend_from_slice(session.to_string().as_bytes());
    out.push(("session_cookie", "sealed-rotated-key.json".into(), rotated));
    let mut by_ref = vec![1u8];
    by_ref.extend_from_slice(br#"{"ref":"c2Vzc2lvbi1pZA"}"#);
    out.push(("session_cookie", "server-side-ref.json".into(), by_ref));
    let cookie = crate::identity::seal_session_seed(&session);
    let mut raw = vec![0u8];
    raw.extend_from_slice(cookie.as_bytes());
    out.push(("session_cookie", "cookie.txt".into(), raw));

    let digest = Sha256::digest(KNOWN_API_KEY.as_bytes());
    out.push((
        "apikey_file",
        "known-key.yaml".into(),
        format!(
            "keys:\n  - id: deploy-bot-1\n    hash: \"sha256:{}\"\n    user: deploy-bot\n    \
             groups: [ci]\n    plan: agents-pro\n  - id: old\n    hash: \"sha256:{}\"\n    \
             user: old\n    revoked: true\n  - id: later\n    hash: \"sha256:{}\"\n    \
             user: later\n    expires: 2099-01-01T00:00:00Z\n",
            hex(&digest),
            "00".repeat(32),
            "11".repeat(32)
        )
        .into_bytes(),
    ));

    let deny = json!({
        "kind": "decision", "request_id": "r1", "app": "billing", "route": "api",
        "principal": { "user": "alice", "provider": "corp", "groups": ["eng"], "subject": "sub-alice" },
        "client_ip": "192.0.2.7", "method": "GET", "host": "billing.example.com",
        "path": "/api/items/1", "query_keys": ["page"], "decision": "deny",
        "reasons": ["billing/api/deny[0]"], "latency_us": 42
    });
    let admin = json!({
        "kind": "admin", "detail": { "action": "set_weight", "weight": 0.25, "note": "é/\n\u{7f}" }
    });
    let chain = audit_chain(&[deny.clone(), admin, deny]);
    out.push((
        "audit_records",
        "chain-of-three.jsonl".into(),
        chain.clone(),
    ));
    let mut torn = chain.clone();
    torn.extend_from_slice(br#"{"kind":"decision","seq":4"#);
    out.push(("audit_records", "torn-final-line.jsonl".into(), torn));
    let mut edited = chain;
    if let Some(i) = edited.windows(5).position(|w| w == b"alice") {
        edited[i] = b'A';
    }
    out.push(("audit_records", "edited-record.jsonl".into(), edited));
    out
}
