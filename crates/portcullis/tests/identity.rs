//! Identity at the edge, against the real binary and real TCP origins. Keys are generated in
//! the tests (RSA with the `rsa` crate, EC P-256 with rcgen), tokens are signed by hand so
//! their headers can be anything an attacker likes, and JWKS documents are written to files
//! or served over HTTP by a test server.
//!
//! Covered: the JWT attack corpus (each refused with 401, a logged reason and never reaching
//! the origin), JWKS over HTTP (a refetch on an unknown `kid`, rate-limited, surviving an
//! outage), the verified-token cache, spoofed identity headers, identity propagation (header
//! templates, the signed assertion, `pass_token`), group claims and `allow` rules, the 401
//! challenge, API keys made with `portcullis apikey new`, and the `dev_issuer` with
//! `portcullis token` and `portcullis check`.
mod common;
use common::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Keys and tokens
// ---------------------------------------------------------------------------------------

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A string no other call in this process returns (for `jti` and random key ids).
fn unique() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{nanos:x}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// One 2048-bit RSA key per test process: generating it is the slow part.
fn rsa_private() -> &'static rsa::RsaPrivateKey {
    static K: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    K.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap())
}

/// A signing key with its public JWK.
struct Key {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    jwk: Value,
}

impl Key {
    /// A fresh EC P-256 key (ES256).
    fn ec(kid: &str) -> Key {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65);
        Key {
            kid: kid.to_string(),
            alg: Algorithm::ES256,
            enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
            }),
        }
    }

    /// The process's RSA key (RS256) under `kid`.
    fn rsa(kid: &str) -> Key {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let k = rsa_private();
        Key {
            kid: kid.to_string(),
            alg: Algorithm::RS256,
            enc: EncodingKey::from_rsa_der(k.to_pkcs1_der().unwrap().as_bytes()),
            jwk: json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": B64.encode(k.n().to_bytes_be()), "e": B64.encode(k.e().to_bytes_be()),
            }),
        }
    }

    fn header(&self) -> Value {
        json!({ "alg": format!("{:?}", self.alg), "typ": "JWT", "kid": self.kid })
    }

    fn mint(&self, claims: &Value) -> String {
        sign(&self.header(), claims, &self.enc, self.alg)
    }

    /// Mints with extra (or replaced) header fields.
    fn mint_with(&self, extra: Value, claims: &Value) -> String {
        let mut h = self.header();
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        sign(&h, claims, &self.enc, self.alg)
    }
}

/// A compact JWS over exactly this header and payload.
fn sign(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let msg = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

fn claims(iss: &str, sub: &str) -> Value {
    let n = now();
    json!({
        "iss": iss, "aud": "api", "sub": sub, "iat": n, "exp": n + 600, "jti": unique(),
    })
}

fn jwks(keys: &[&Key]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

/// Writes a file atomically (temp file + rename), as a deploy tool would.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------
// Origins, requests and logs
// ---------------------------------------------------------------------------------------

/// An origin that answers with the request it received as JSON: `{method, path, headers}`,
/// every header as a list of its values.
async fn echo() -> Origin {
    Origin::start(|req: Request<Incoming>| async move {
        let mut h = serde_json::Map::new();
        for (k, v) in req.headers() {
            h.entry(k.as_str().to_string())
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .unwrap()
                .push(Value::String(
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                ));
        }
        let doc =
            json!({ "method": req.method().as_str(), "path": req.uri().path(), "headers": h });
        Response::new(Full::new(Bytes::from(doc.to_string())))
    })
    .await
}

/// What a request through the proxy gave.
struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Got {
    /// The request id: from `X-Request-Id`, or from the body of a 403.
    fn rid(&self) -> String {
        if let Some(v) = self.headers.get("x-request-id") {
            return v.to_str().unwrap().to_string();
        }
        self.body
            .split("request id ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .unwrap_or_else(|| panic!("no request id in response: {}", self.body))
            .to_string()
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// The values of header `name` the echo origin received.
    fn seen(&self, name: &str) -> Vec<String> {
        let doc: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("origin did not echo JSON ({e}): {}", self.body));
        doc["headers"][name.to_ascii_lowercase()]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

async fn send(p: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = client().request(method.parse().unwrap(), p.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Got {
        status,
        headers,
        body: resp.text().await.unwrap(),
    }
}

async fn get(p: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    send(p, "GET", path, headers).await
}

async fn get_bearer(p: &Proxy, path: &str, token: &str) -> Got {
    let auth = format!("Bearer {token}");
    get(p, path, &[("authorization", &auth)]).await
}

/// Polls `path` with tokens from `token` until the status is `want`.
async fn until_status(
    p: &Proxy,
    path: &str,
    token: impl Fn() -> String,
    want: u16,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if get_bearer(p, path, &token()).await.status == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The access log record and the `portcullis::auth` process log record of request `rid`.
async fn refusal_records(p: &Proxy, rid: &str) -> (Value, Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let access = json_lines(&p.access_log_text())
            .into_iter()
            .find(|r| r["request_id"] == rid);
        let auth = json_lines(&p.log_text())
            .into_iter()
            .find(|r| r["target"] == "portcullis::auth" && r["request_id"] == rid);
        if let (Some(a), Some(l)) = (access, auth) {
            return (a, l);
        }
        if Instant::now() > deadline {
            panic!(
                "no access log and `portcullis::auth` records for request {rid}\nprocess log:\n{}\naccess log:\n{}",
                p.log_text(),
                p.access_log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts `g` was refused with `status`, and that both the access log (`error`) and the
/// process log (target `portcullis::auth`) give a reason containing `reason`.
async fn assert_refused(p: &Proxy, case: &str, g: &Got, status: u16, reason: &str) {
    assert_eq!(g.status, status, "{case}: got {} {}", g.status, g.body);
    let (access, auth) = refusal_records(p, &g.rid()).await;
    assert_eq!(access["status"], status, "{case}: access record {access}");
    let err = access["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(reason),
        "{case}: access log `error` is `{err}`, expected it to mention `{reason}`"
    );
    if status == 403 {
        // Denied by the authorize stage, which logs its policy reasons.
        assert_eq!(
            auth["message"], "request denied by policy",
            "{case}: {auth}"
        );
    } else {
        let why = auth["reason"].as_str().unwrap_or_default();
        assert!(
            why.contains(reason),
            "{case}: process log reason is `{why}`, expected it to mention `{reason}`: {auth}"
        );
    }
}

/// Asserts a 401 carries an RFC 6750 challenge for an invalid token.
fn assert_invalid_token_challenge(case: &str, g: &Got) {
    let www = g.header("www-authenticate");
    assert!(
        www.starts_with(
            "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\""
        ) && www.ends_with('"'),
        "{case}: WWW-Authenticate is `{www}`"
    );
}

fn portcullis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

/// `portcullis apikey new --user USER --groups GROUPS [--id ID]`: the key and its entry.
fn apikey_new(user: &str, groups: &str, id: Option<&str>) -> (String, String) {
    let mut args = vec!["apikey", "new", "--user", user, "--groups", groups];
    if let Some(id) = id {
        args.extend(["--id", id]);
    }
    let out = portcullis(&args);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "apikey new failed: {text}");
    let key = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("pk_"))
        .unwrap_or_else(|| panic!("no key in `apikey new` output:\n{text}"))
        .to_string();
    let entry = text
        .split_once("keys_file:\n\n")
        .unwrap_or_else(|| panic!("no entry in `apikey new` output:\n{text}"))
        .1
        .trim_end()
        .to_string()
        + "\n";
    assert!(
        entry.contains(&format!("user: {user}")) && !entry.contains(&key),
        "the entry must name the user and never hold the key itself:\n{entry}"
    );
    (key, entry)
}

const LISTENER: &str = "listeners:\n  - { name: web, bind: \"127.0.0.1:{port}\" }\n";

// ---------------------------------------------------------------------------------------
// The attack corpus
// ---------------------------------------------------------------------------------------

const HS_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!!";

/// Providers `a` (RS256 key `a1`, max token 4 KiB), `ahs` (the same JWKS, but HS256 allowed
/// with its own secret) and `b` (ES256 key `b1`); routes /a/, /ahs/ and /b/ each accept one.
async fn corpus_proxy(a1: &Key, b1: &Key, origin: &Origin) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("a.json"), &jwks(&[a1]).to_string());
    write_atomic(&dir.path().join("b.json"), &jwks(&[b1]).to_string());
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: a, kind: jwt, issuer: "https://a.test", audiences: [api], jwks_file: "{dir}/a.json", max_token_size: 4KiB }
    - name: ahs
      kind: jwt
      issuer: "https://ahs.test"
      audiences: [api]
      jwks_file: "{dir}/a.json"
      algorithms: [RS256, HS256]
      hs_secret: "@SECRET@"
    - { name: b, kind: jwt, issuer: "https://b.test", audiences: [api], jwks_file: "{dir}/b.json" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: ra, match: { path_prefix: /a/ }, backend: o, auth: [a], allow: [{}] }
  - { name: rahs, match: { path_prefix: /ahs/ }, backend: o, auth: [ahs], allow: [{}] }
  - { name: rb, match: { path_prefix: /b/ }, backend: o, auth: [b], allow: [{}] }
"#;
    let yaml = yaml
        .replace("@ORIGIN@", &origin.address())
        .replace("@SECRET@", HS_SECRET);
    Proxy::start_in(dir, &yaml).await
}

/// Every token in the corpus gets 401 with an RFC 6750 challenge, its reason is in the access
/// log and the `portcullis::auth` log, it never reaches the origin, and no token is logged.
/// Valid tokens for the same routes pass, so the setup itself is proven.
#[tokio::test]
async fn the_jwt_attack_corpus_is_refused_logged_and_never_reaches_the_origin() {
    let a1 = Key::rsa("a1");
    let b1 = Key::ec("b1");
    let attacker = Key::ec("evil");
    let origin = echo().await;
    let p = corpus_proxy(&a1, &b1, &origin).await;

    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let public = rsa_private().to_public_key();
    let spki_pem = public.to_public_key_pem(LineEnding::LF).unwrap();
    let spki_der = public.to_public_key_der().unwrap().as_bytes().to_vec();
    let pkcs1_pem = public.to_pkcs1_pem(LineEnding::LF).unwrap();

    let a = || claims("https://a.test", "alice");
    let ahs = || claims("https://ahs.test", "alice");
    let with = |mut c: Value, k: &str, v: Value| {
        c[k] = v;
        c
    };
    let without = |mut c: Value, k: &str| {
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let unsigned = |h: Value, c: &Value| {
        format!(
            "{}.{}.",
            B64.encode(h.to_string()),
            B64.encode(c.to_string())
        )
    };
    let hs = |secret: &[u8], kid: &str, c: &Value| {
        sign(
            &json!({ "alg": "HS256", "typ": "JWT", "kid": kid }),
            c,
            &EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
    };
    let valid = a1.mint(&a());
    let (vh, vp, _) = {
        let mut it = valid.split('.');
        (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        )
    };
    let altered_payload = B64.encode(with(a(), "sub", json!("admin")).to_string());
    let n = now();

    let cases: Vec<(&str, &str, String, &str)> = vec![
        (
            "alg none",
            "/a/x",
            unsigned(json!({ "alg": "none", "typ": "JWT" }), &a()),
            "`none`",
        ),
        (
            "alg nOnE",
            "/a/x",
            unsigned(json!({ "alg": "nOnE", "kid": "a1" }), &a()),
            "`none`",
        ),
        (
            "HS256 signed with the RSA public key (HS256 not allowed)",
            "/a/x",
            hs(spki_pem.as_bytes(), "a1", &a()),
            "not allowed",
        ),
        (
            "HS256 signed with the RSA public key (HS256 allowed, own secret)",
            "/ahs/x",
            hs(spki_pem.as_bytes(), "a1", &ahs()),
            "signature is invalid",
        ),
        (
            "HS256 signed with the PKCS#1 RSA public key (HS256 allowed)",
            "/ahs/x",
            hs(pkcs1_pem.as_bytes(), "a1", &ahs()),
            "signature is invalid",
        ),
        (
            "HS256 signed with the DER RSA public key (HS256 allowed)",
            "/ahs/x",
            hs(&spki_der, "a1", &ahs()),
            "signature is invalid",
        ),
        (
            "ES256 under the RSA key's kid",
            "/a/x",
            attacker.mint_with(json!({ "kid": "a1" }), &a()),
            "does not fit",
        ),
        (
            "path traversal kid",
            "/a/x",
            a1.mint_with(json!({ "kid": "../../etc/passwd" }), &a()),
            "no key",
        ),
        (
            "very long kid",
            "/a/x",
            a1.mint_with(json!({ "kid": "k".repeat(2000) }), &a()),
            "not a reasonable key id",
        ),
        (
            "kid with control characters",
            "/a/x",
            a1.mint_with(json!({ "kid": "a1\u{0}\r\nX-Injected: 1" }), &a()),
            "not a reasonable key id",
        ),
        (
            "kid that is not a string",
            "/a/x",
            a1.mint_with(json!({ "kid": { "$ne": null } }), &a()),
            "not a reasonable key id",
        ),
        (
            "jku pointing elsewhere",
            "/a/x",
            a1.mint_with(json!({ "jku": "https://evil.example/jwks.json" }), &a()),
            "`jku`",
        ),
        (
            "x5u pointing elsewhere",
            "/a/x",
            a1.mint_with(json!({ "x5u": "https://evil.example/cert.pem" }), &a()),
            "`x5u`",
        ),
        (
            "jwk header embedding the attacker's key that signed the token",
            "/a/x",
            attacker.mint_with(json!({ "jwk": attacker.jwk.clone() }), &a()),
            "`jwk`",
        ),
        (
            "x5c header",
            "/a/x",
            a1.mint_with(
                json!({ "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"] }),
                &a(),
            ),
            "`x5c`",
        ),
        (
            "crit header",
            "/a/x",
            a1.mint_with(json!({ "crit": ["exp"] }), &a()),
            "`crit`",
        ),
        (
            "expired",
            "/a/x",
            a1.mint(&with(
                with(a(), "exp", json!(n - 3600)),
                "iat",
                json!(n - 7200),
            )),
            "expired",
        ),
        (
            "nbf in the future",
            "/a/x",
            a1.mint(&with(a(), "nbf", json!(n + 3600))),
            "nbf",
        ),
        (
            "iat in the future",
            "/a/x",
            a1.mint(&with(a(), "iat", json!(n + 3600))),
            "future",
        ),
        (
            "unknown iss",
            "/a/x",
            a1.mint(&with(a(), "iss", json!("https://evil.example"))),
            "unknown issuer",
        ),
        (
            "iss differing from the provider's exact issuer",
            "/a/x",
            a1.mint(&with(a(), "iss", json!("https://a.test/"))),
            "issuer does not match",
        ),
        (
            "wrong aud",
            "/a/x",
            a1.mint(&with(a(), "aud", json!(["other", "web"]))),
            "audience",
        ),
        (
            "missing aud",
            "/a/x",
            a1.mint(&without(a(), "aud")),
            "`aud`",
        ),
        (
            "missing exp",
            "/a/x",
            a1.mint(&without(a(), "exp")),
            "`exp`",
        ),
        (
            "oversize token",
            "/a/x",
            a1.mint(&with(a(), "pad", json!("x".repeat(5000)))),
            "larger than 4096 bytes",
        ),
        (
            "stripped signature",
            "/a/x",
            format!("{vh}.{vp}."),
            "signature is invalid",
        ),
        (
            "signature removed entirely",
            "/a/x",
            format!("{vh}.{vp}"),
            "malformed",
        ),
        (
            "altered payload",
            "/a/x",
            format!(
                "{vh}.{altered_payload}.{}",
                valid.rsplit('.').next().unwrap()
            ),
            "signature is invalid",
        ),
        (
            "token valid for provider b on a route that only accepts a",
            "/a/x",
            b1.mint(&claims("https://b.test", "bob")),
            "not accepted on this route",
        ),
        ("garbage", "/a/x", "not.a.jwt".to_string(), "malformed"),
    ];

    for (case, path, token, reason) in &cases {
        let g = get_bearer(&p, path, token).await;
        assert_refused(&p, case, &g, 401, reason).await;
        assert_invalid_token_challenge(case, &g);
        assert_eq!(g.header("cache-control"), "no-store", "{case}");
    }
    assert_eq!(
        origin.hits(),
        0,
        "a refused token reached the origin; access log:\n{}",
        p.access_log_text()
    );

    // The same routes do accept valid tokens: the refusals above are the checks at work.
    let g = get_bearer(&p, "/a/ok", &valid).await;
    assert_eq!(g.status, 200, "valid RS256 token: {}", g.body);
    let g = get_bearer(&p, "/b/ok", &b1.mint(&claims("https://b.test", "bob"))).await;
    assert_eq!(g.status, 200, "valid ES256 token for b: {}", g.body);
    let g = get_bearer(&p, "/ahs/ok", &hs(HS_SECRET.as_bytes(), "any", &ahs())).await;
    assert_eq!(
        g.status, 200,
        "HS256 with the provider's own secret: {}",
        g.body
    );
    assert_eq!(origin.hits(), 3);

    // Reasons name what was wrong, never the credential.
    let logs = p.log_text() + &p.access_log_text();
    for (case, _, token, _) in &cases {
        assert!(
            !logs.contains(token.as_str()),
            "{case}: the token itself was logged"
        );
    }
}

// ---------------------------------------------------------------------------------------
// JWKS over HTTP
// ---------------------------------------------------------------------------------------

/// A JWKS endpoint whose document can be changed, that counts its requests, and that can be
/// stopped for real (listener and open connections closed).
struct JwksServer {
    url: String,
    doc: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl JwksServer {
    async fn start(doc: Value) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/keys", listener.local_addr().unwrap());
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (d, h, t) = (doc.clone(), hits.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (d, h) = (d.clone(), h.clone());
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().to_string();
                        async move {
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        JwksServer {
            url,
            doc,
            hits,
            tasks,
        }
    }

    fn set(&self, doc: Value) {
        *self.doc.lock().unwrap() = doc;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A proxy whose provider `idp` takes its keys from `srv`; route /api/ accepts it.
async fn jwks_uri_proxy(srv: &JwksServer, origin: &Origin) -> Proxy {
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: idp, kind: jwt, issuer: "https://idp.test", audiences: [api], jwks_uri: "@JWKS@" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: api, match: { path_prefix: /api/ }, backend: o, auth: [idp], allow: [{}] }
"#;
    Proxy::start(
        &yaml
            .replace("@JWKS@", &srv.url)
            .replace("@ORIGIN@", &origin.address()),
    )
    .await
}

fn idp() -> Value {
    claims("https://idp.test", "alice")
}

/// The IdP rotates: a token signed with a key the proxy has never seen makes it refetch the
/// JWKS, and the new key is accepted without a restart, even when the rotation happens right
/// after a fetch (inside the refetch rate limit).
#[tokio::test]
async fn an_unknown_kid_refetches_the_jwks_so_rotated_keys_work_without_restart() {
    let k1 = Key::ec("k1");
    let k2 = Key::ec("k2");
    let srv = JwksServer::start(jwks(&[&k1])).await;
    let origin = echo().await;
    let p = jwks_uri_proxy(&srv, &origin).await;
    let g = get_bearer(&p, "/api/x", &k1.mint(&idp())).await;
    assert_eq!(g.status, 200, "{}", g.body);

    let before = srv.hits();
    srv.set(jwks(&[&k1, &k2]));
    let accepted = until_status(
        &p,
        "/api/x",
        || k2.mint(&idp()),
        200,
        Duration::from_secs(8),
    )
    .await;
    assert!(
        accepted,
        "a token signed with the rotated-in key was never accepted; log:\n{}",
        p.log_text()
    );
    assert!(srv.hits() > before, "accepted without refetching?");
    assert!(
        p.log_text().contains("unknown key id: refetching keys"),
        "no refetch logged"
    );
    let g = get_bearer(&p, "/api/x", &k1.mint(&idp())).await;
    assert_eq!(g.status, 200, "the old key still works");
}

/// A flood of tokens with random unknown kids, concurrent and sequential, does not turn into
/// a flood of JWKS fetches: at most one refetch per rate-limit period (2 s).
#[tokio::test]
async fn unknown_kid_refetches_are_rate_limited() {
    let k1 = Key::ec("k1");
    let srv = JwksServer::start(jwks(&[&k1])).await;
    let origin = echo().await;
    let p = jwks_uri_proxy(&srv, &origin).await;
    let g = get_bearer(&p, "/api/x", &k1.mint(&idp())).await;
    assert_eq!(g.status, 200, "{}", g.body);
    // Let the rate-limit period of the start-up fetch pass, so the flood may refetch once.
    tokio::time::sleep(Duration::from_millis(2200)).await;

    let before = srv.hits();
    let started = Instant::now();
    let burst = (0..40).map(|_| {
        let t = k1.mint_with(json!({ "kid": format!("rnd-{}", unique()) }), &idp());
        let p = &p;
        async move { get_bearer(p, "/api/x", &t).await.status }
    });
    let statuses = futures_util::future::join_all(burst).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    for _ in 0..30 {
        let t = k1.mint_with(json!({ "kid": format!("rnd-{}", unique()) }), &idp());
        assert_eq!(get_bearer(&p, "/api/x", &t).await.status, 401);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fetches = srv.hits() - before;
    let allowed = 1 + (elapsed / 2.0).floor() as usize;
    assert!(
        (1..=allowed).contains(&fetches),
        "{fetches} JWKS fetches for 70 unknown kids in {elapsed:.1}s (allowed 1..={allowed})"
    );
    assert_eq!(origin.hits(), 1);
}

/// When the JWKS server goes away, tokens signed with keys already fetched keep working,
/// including new tokens that are not in the verified-token cache.
#[tokio::test]
async fn known_keys_keep_working_when_the_jwks_server_is_down() {
    let k1 = Key::ec("k1");
    let srv = JwksServer::start(jwks(&[&k1])).await;
    let origin = echo().await;
    let p = jwks_uri_proxy(&srv, &origin).await;
    let g = get_bearer(&p, "/api/x", &k1.mint(&idp())).await;
    assert_eq!(g.status, 200, "{}", g.body);

    srv.stop();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // An unknown kid now makes the proxy try to refetch, which fails.
    let t = k1.mint_with(json!({ "kid": "k-unknown" }), &idp());
    let g = get_bearer(&p, "/api/x", &t).await;
    assert_refused(&p, "unknown kid while the IdP is down", &g, 401, "no key").await;
    let failed = eventually(Duration::from_secs(5), || {
        let log = p.log_text();
        async move { log.contains("key refetch failed; keeping the last good keys") }
    })
    .await;
    assert!(failed, "no failed refetch logged:\n{}", p.log_text());

    for _ in 0..3 {
        let g = get_bearer(&p, "/api/x", &k1.mint(&idp())).await;
        assert_eq!(g.status, 200, "a fresh token with a known key: {}", g.body);
    }
}

// ---------------------------------------------------------------------------------------
// The verified-token cache
// ---------------------------------------------------------------------------------------

/// A verified token is served from the cache only while the key set would verify it with
/// the key that did: when the JWKS file is rewritten so that its `kid` names other key
/// material, the cached token is refused at once, as fresh tokens signed with the old key
/// are (it was accepted until `cache_ttl` when the cache checked the `kid` alone); and when
/// its key leaves the set, the same.
#[tokio::test]
async fn a_cached_token_is_refused_once_its_key_is_replaced_or_removed() {
    let old = Key::ec("k1");
    let new = Key::ec("k1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    write_atomic(&file, &jwks(&[&old]).to_string());
    let origin = echo().await;
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: f, kind: jwt, issuer: "https://f.test", audiences: [api], jwks_file: "{dir}/keys.json" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: api, match: { path_prefix: /api/ }, backend: o, auth: [f], allow: [{}] }
"#;
    let p = Proxy::start_in(dir, &yaml.replace("@ORIGIN@", &origin.address())).await;
    let f = || claims("https://f.test", "alice");
    let cached = old.mint(&f());
    for _ in 0..3 {
        assert_eq!(get_bearer(&p, "/api/x", &cached).await.status, 200);
    }

    // The same kid, other key material.
    write_atomic(&file, &jwks(&[&new]).to_string());
    let swapped = until_status(
        &p,
        "/api/x",
        || old.mint(&f()),
        401,
        Duration::from_secs(10),
    )
    .await;
    assert!(swapped, "the JWKS file was not re-read");
    let g = get_bearer(&p, "/api/x", &new.mint(&f())).await;
    assert_eq!(g.status, 200, "the new key material works: {}", g.body);
    let g = get_bearer(&p, "/api/x", &cached).await;
    assert_eq!(
        g.status, 401,
        "the cached token outlived its key's replacement: {}",
        g.body
    );

    // A token of the new key, cached, then its key removed.
    let cached = new.mint(&f());
    assert_eq!(get_bearer(&p, "/api/x", &cached).await.status, 200);
    write_atomic(&file, &jwks(&[&Key::ec("k2")]).to_string());
    let evicted = until_status(
        &p,
        "/api/x",
        || cached.clone(),
        401,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        evicted,
        "a cached token outlived the removal of its signing key"
    );
}

/// One client connection, kept open: every request goes over the same TCP connection, as a
/// service or an agent with a pooled HTTP client sends them.
struct KeptAlive(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl KeptAlive {
    async fn open(p: &Proxy) -> KeptAlive {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        KeptAlive(send)
    }

    /// The status of a GET with this bearer token, on this connection (which must stay open).
    async fn status(&mut self, path: &str, token: &str) -> u16 {
        self.send("GET", path, token).await
    }

    async fn send(&mut self, method: &str, path: &str, token: &str) -> u16 {
        self.0
            .ready()
            .await
            .expect("the proxy closed a kept-alive connection");
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kept.test")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        status
    }

    /// Repeats the request on this connection until the status is `want`.
    async fn until(&mut self, path: &str, token: &str, want: u16, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.status(path, token).await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// The proxy remembers the last bearer token of each client connection, with its identity
/// and policy decision, so that the next request with it skips the shared caches. A token
/// on a kept-alive connection must get no more than it would on a new connection: it stops
/// at its `exp`, when its signing key leaves the key set, and when a reload changes the
/// policy.
#[tokio::test]
async fn a_kept_alive_connection_gets_no_more_from_its_token_than_a_new_one() {
    let k1 = Key::ec("k1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    write_atomic(&file, &jwks(&[&k1]).to_string());
    let origin = echo().await;
    let config = |group: &str| {
        LISTENER.to_string()
            + &r#"
identity:
  providers:
    - { name: f, kind: jwt, issuer: "https://f.test", audiences: [api], jwks_file: "{dir}/keys.json", clock_skew: 0s }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: api, match: { path_prefix: /api/ }, backend: o, auth: [f], allow: [{ groups: [@GROUP@] }] }
  - { name: ro, match: { path_prefix: /ro/ }, backend: o, auth: [f], allow: [{ groups: [eng], methods: [GET] }] }
  - { name: ops, match: { path_prefix: /ops/ }, backend: o, auth: [f], allow: [{ groups: [ops] }] }
"#
            .replace("@ORIGIN@", &origin.address())
            .replace("@GROUP@", group)
    };
    let p = Proxy::start_in(dir, &config("eng")).await;
    let eng = |exp: u64| {
        let mut c = claims("https://f.test", "alice");
        c["groups"] = json!(["eng"]);
        c["exp"] = json!(exp);
        k1.mint(&c)
    };
    let long = eng(now() + 600);
    let mut conn = KeptAlive::open(&p).await;
    for i in 0..3 {
        assert_eq!(conn.status("/api/x", &long).await, 200, "request {i}");
    }
    // What was decided for one method and route is not reused for another.
    for _ in 0..2 {
        assert_eq!(conn.send("GET", "/ro/x", &long).await, 200);
        assert_eq!(conn.send("GET", "/ro/x", &long).await, 200);
        assert_eq!(conn.send("POST", "/ro/x", &long).await, 403);
        assert_eq!(conn.send("DELETE", "/ro/x", &long).await, 403);
        assert_eq!(conn.status("/api/x", &long).await, 200);
        assert_eq!(conn.status("/ops/x", &long).await, 403);
    }

    // Expiry: a token that expires in two seconds, repeated on the connection.
    let short = eng(now() + 2);
    assert_eq!(conn.status("/api/x", &short).await, 200);
    assert_eq!(conn.status("/api/x", &short).await, 200);
    let expired = conn
        .until("/api/x", &short, 401, Duration::from_secs(6))
        .await;
    assert!(expired, "an expired token kept working on its connection");
    assert_eq!(conn.status("/api/x", &long).await, 200);
    assert_eq!(conn.status("/api/x", &long).await, 200);

    // A reload that stops allowing `eng`: the remembered decision goes with the old config.
    p.write_config(&config("ops"));
    p.sighup();
    let denied = conn
        .until("/api/x", &long, 403, Duration::from_secs(10))
        .await;
    assert!(denied, "a decision outlived the policy that made it");
    p.write_config(&config("eng"));
    p.sighup();
    assert!(
        conn.until("/api/x", &long, 200, Duration::from_secs(10))
            .await
    );
    assert_eq!(conn.status("/api/x", &long).await, 200);

    // The signing key leaves the key set.
    write_atomic(&file, &jwks(&[&Key::ec("k2")]).to_string());
    let revoked = conn
        .until("/api/x", &long, 401, Duration::from_secs(10))
        .await;
    assert!(
        revoked,
        "a token outlived the removal of its signing key on its connection"
    );
    assert_eq!(conn.status("/api/x", &long).await, 401);
}

// ---------------------------------------------------------------------------------------
// Spoofing and propagation
// ---------------------------------------------------------------------------------------

/// Headers a client might send to pose as someone: every name used by any route's
/// `headers.upstream`, in odd cases and repeated, and the `X-Portcullis-` prefix; also
/// spelled with `_` for `-`, which CGI-style origin frameworks (WSGI, Rack, PHP) read as
/// the same header.
const SPOOFED: &[(&str, &str)] = &[
    ("X-User", "mallory"),
    ("x-user", "mallory-again"),
    ("X_User", "mallory-underscore"),
    ("x_portcullis_assertion", "forged-underscore"),
    ("X-Portcullis_Anything", "1"),
    ("X-EMAIL", "mallory@evil.example"),
    ("X-Groups", "admins"),
    ("X-Tenant", "t-evil"),
    ("X-Who", "evil"),
    ("X-Key-User", "mallory"),
    ("X-Portcullis-Anything", "1"),
    ("X-Portcullis-User", "mallory"),
    ("X-Portcullis-Assertion", "forged.assertion.jwt"),
];

/// Routes: /pub/ (public), /jwt/ (templates + assertion), /pass/ (`pass_token`), /key/
/// (API keys, a template + assertion), /plain/ (JWT, nothing propagated).
async fn propagation_proxy(a1: &Key, key_entry: &str, origin: &Origin) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("a.json"), &jwks(&[a1]).to_string());
    write_atomic(
        &dir.path().join("keys.yaml"),
        &format!("keys:\n{key_entry}"),
    );
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: a, kind: jwt, issuer: "https://a.test", audiences: [api], jwks_file: "{dir}/a.json" }
    - { name: agents, kind: api_key, keys_file: "{dir}/keys.yaml" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: pub, match: { path_prefix: /pub/ }, backend: o, public: true }
  - name: jwt
    match: { path_prefix: /jwt/ }
    backend: o
    auth: [a]
    allow: [{}]
    headers:
      upstream:
        X-User: "{identity.user}"
        X-Email: "{identity.email}"
        X-Groups: "{identity.groups}"
        X-Tenant: "{claims.tenant.id}"
        X-Who: "{identity.provider}:{identity.subject}"
      assertion: true
  - { name: pass, match: { path_prefix: /pass/ }, backend: o, auth: [a], allow: [{}], headers: { pass_token: true } }
  - { name: plain, match: { path_prefix: /plain/ }, backend: o, auth: [a], allow: [{}] }
  - name: key
    match: { path_prefix: /key/ }
    backend: o
    auth: [agents]
    allow: [{}]
    headers: { upstream: { X-Key-User: "{identity.user}" }, assertion: true }
"#;
    Proxy::start_in(dir, &yaml.replace("@ORIGIN@", &origin.address())).await
}

/// Asserts no spoofed value reached the origin.
fn assert_no_spoofed_value(case: &str, g: &Got) {
    for (name, value) in SPOOFED {
        assert!(
            !g.seen(name).iter().any(|v| v == value),
            "{case}: spoofed `{name}: {value}` reached the origin: {}",
            g.body
        );
    }
}

/// Verifies an assertion against the proxy's published keys, for audience `aud`.
async fn verify_assertion(p: &Proxy, jwt: &str, aud: &str) -> Value {
    let doc: Value = client()
        .get(p.url("/.well-known/portcullis/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let h = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(h.alg, Algorithm::ES256, "assertions are ES256");
    let jwk = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"].as_str() == h.kid.as_deref())
        .unwrap_or_else(|| panic!("assertion kid {:?} is not published: {doc}", h.kid))
        .clone();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
    let key = DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = 0;
    v.set_issuer(&["portcullis"]);
    v.set_audience(&[aud]);
    let c = jsonwebtoken::decode::<Value>(jwt, &key, &v)
        .unwrap_or_else(|e| panic!("the assertion does not verify for aud {aud}: {e}"))
        .claims;
    let mut other = v.clone();
    other.set_audience(&["default/some-other-route"]);
    assert!(
        jsonwebtoken::decode::<Value>(jwt, &key, &other).is_err(),
        "an assertion must be bound to its route"
    );
    let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
    assert!(
        exp > now() && exp - iat <= 120,
        "assertions are short-lived: iat {iat}, exp {exp}"
    );
    c
}

/// Spoofed identity headers never reach the origin, on public, JWT and API-key routes; the
/// identity is propagated through header templates, a signed assertion for the route, and
/// the bearer token only where `pass_token` is set; the API key never leaves the proxy.
#[tokio::test]
async fn spoofed_identity_headers_are_stripped_and_identity_is_propagated() {
    let a1 = Key::rsa("a1");
    let (api_key, entry) = apikey_new("deploy-bot", "ci,deploy", Some("bot-1"));
    let origin = echo().await;
    let p = propagation_proxy(&a1, &entry, &origin).await;
    let token = a1.mint(&json!({
        "iss": "https://a.test", "aud": "api", "sub": "u-123", "email": "alice@example.com",
        "groups": ["eng", "ops"], "tenant": { "id": "t-42" }, "exp": now() + 600,
    }));
    let auth = format!("Bearer {token}");

    // Public route: none of the identity headers arrive at all.
    let g = get(&p, "/pub/x", SPOOFED).await;
    assert_eq!(g.status, 200, "{}", g.body);
    for (name, _) in SPOOFED {
        assert!(
            g.seen(name).is_empty(),
            "public route: `{name}` reached the origin: {}",
            g.body
        );
    }

    // JWT route: the templates, rendered from the token, replace what the client sent.
    let mut h: Vec<(&str, &str)> = SPOOFED.to_vec();
    h.push(("authorization", &auth));
    let g = get(&p, "/jwt/x", &h).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_no_spoofed_value("jwt route", &g);
    assert_eq!(g.seen("x-user"), ["u-123"]);
    assert_eq!(g.seen("x-email"), ["alice@example.com"]);
    assert_eq!(g.seen("x-groups"), ["eng,ops"]);
    assert_eq!(g.seen("x-tenant"), ["t-42"]);
    assert_eq!(g.seen("x-who"), ["a:u-123"]);
    assert!(g.seen("x-key-user").is_empty());
    assert!(g.seen("x-portcullis-anything").is_empty());
    assert!(g.seen("x-portcullis-user").is_empty());
    assert!(
        g.seen("authorization").is_empty(),
        "the token reached the origin without pass_token"
    );
    let assertion = g.seen("x-portcullis-assertion");
    assert_eq!(assertion.len(), 1, "{}", g.body);
    let c = verify_assertion(&p, &assertion[0], "default/jwt").await;
    assert_eq!(c["sub"], "u-123");
    assert_eq!(c["email"], "alice@example.com");
    assert_eq!(c["groups"], json!(["eng", "ops"]));

    // pass_token: the caller's bearer token goes on, unchanged.
    let g = get(&p, "/pass/x", &[("authorization", &auth)]).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("authorization"), [auth.as_str()]);
    // Without it, nothing of the token goes on.
    let g = get(&p, "/plain/x", &[("authorization", &auth)]).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert!(g.seen("authorization").is_empty());
    assert!(!g.body.contains(&token));

    // API-key route, with both ways of presenting the key.
    let apikey_auth = format!("ApiKey {api_key}");
    for (how, cred) in [("authorization", &apikey_auth), ("x-api-key", &api_key)] {
        let case = format!("api key route ({how})");
        let mut h: Vec<(&str, &str)> = SPOOFED.to_vec();
        h.push((how, cred));
        let g = get(&p, "/key/x", &h).await;
        assert_eq!(g.status, 200, "{case}: {}", g.body);
        assert_no_spoofed_value(&case, &g);
        assert_eq!(g.seen("x-key-user"), ["deploy-bot"], "{case}");
        assert!(g.seen("x-user").is_empty(), "{case}");
        assert!(
            g.seen("x-api-key").is_empty(),
            "{case}: the key reached the origin"
        );
        assert!(
            g.seen("authorization").is_empty(),
            "{case}: the key reached the origin"
        );
        assert!(
            !g.body.contains(&api_key),
            "{case}: the key reached the origin"
        );
        let assertion = g.seen("x-portcullis-assertion");
        assert_eq!(assertion.len(), 1, "{case}");
        let c = verify_assertion(&p, &assertion[0], "default/key").await;
        assert_eq!(c["sub"], "bot-1");
        assert_eq!(c["user"], "deploy-bot");
        assert_eq!(c["groups"], json!(["ci", "deploy"]));
    }
    // And the key is never logged.
    assert!(!(p.log_text() + &p.access_log_text()).contains(&api_key));
}

// ---------------------------------------------------------------------------------------
// Groups, allow rules and the 401 challenge
// ---------------------------------------------------------------------------------------

/// `kc` maps groups from the nested `realm_access.roles`, `sc` from the space-separated
/// `scope` (and the user from `preferred_username`). /admin/ needs group `admins`; /ro/ lets
/// `viewers` GET and `admins` do anything.
async fn groups_proxy(kc: &Key, sc: &Key, origin: &Origin) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("kc.json"), &jwks(&[kc]).to_string());
    write_atomic(&dir.path().join("sc.json"), &jwks(&[sc]).to_string());
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - name: kc
      kind: jwt
      issuer: "https://kc.test"
      audiences: [api]
      jwks_file: "{dir}/kc.json"
      claims: { groups: realm_access.roles }
    - name: sc
      kind: jwt
      issuer: "https://sc.test"
      audiences: [api]
      jwks_file: "{dir}/sc.json"
      claims: { groups: scope, user: preferred_username }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - name: admin
    match: { path_prefix: /admin/ }
    backend: o
    auth: [kc, sc]
    allow: [{ groups: [admins] }]
    headers: { upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" } }
  - name: ro
    match: { path_prefix: /ro/ }
    backend: o
    auth: [kc]
    allow: [{ groups: [viewers], methods: [GET] }, { groups: [admins] }]
"#;
    Proxy::start_in(dir, &yaml.replace("@ORIGIN@", &origin.address())).await
}

/// Groups come from a nested claim path and from a space-separated string; an identity the
/// `allow` rules refuse gets 403 (not 401), logged, and never reaches the origin.
#[tokio::test]
async fn groups_from_nested_and_space_separated_claims_feed_allow_rules() {
    let kc = Key::ec("kc1");
    let sc = Key::ec("sc1");
    let origin = echo().await;
    let p = groups_proxy(&kc, &sc, &origin).await;
    let kc_token = |roles: Value| {
        let mut c = claims("https://kc.test", "kc-user");
        c["realm_access"] = json!({ "roles": roles });
        kc.mint(&c)
    };
    let sc_token = |scope: &str| {
        let mut c = claims("https://sc.test", "sub-77");
        c["scope"] = json!(scope);
        c["preferred_username"] = json!("sam");
        sc.mint(&c)
    };

    let g = get_bearer(&p, "/admin/x", &kc_token(json!(["offline", "admins"]))).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-groups"), ["offline,admins"]);
    assert_eq!(g.seen("x-user"), ["kc-user"]);
    let g = get_bearer(&p, "/admin/x", &sc_token("read admins write")).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-groups"), ["read,admins,write"]);
    assert_eq!(g.seen("x-user"), ["sam"]);
    let g = get_bearer(&p, "/ro/x", &kc_token(json!(["viewers"]))).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let allowed = origin.hits();
    assert_eq!(allowed, 3);

    let refused = [
        (
            "nested roles without admins",
            "GET",
            "/admin/x",
            kc_token(json!(["viewers"])),
        ),
        (
            "a group name inside a longer one",
            "GET",
            "/admin/x",
            kc_token(json!(["admins-not"])),
        ),
        (
            "scope without admins",
            "GET",
            "/admin/x",
            sc_token("read write"),
        ),
        ("roles given as a flat claim", "GET", "/admin/x", {
            let mut c = claims("https://kc.test", "kc-user");
            c["roles"] = json!(["admins"]);
            c["groups"] = json!(["admins"]);
            kc.mint(&c)
        }),
        (
            "viewer posting",
            "POST",
            "/ro/x",
            kc_token(json!(["viewers"])),
        ),
    ];
    for (case, method, path, token) in &refused {
        let auth = format!("Bearer {token}");
        let g = send(&p, method, path, &[("authorization", &auth)]).await;
        assert_refused(&p, case, &g, 403, "deny for").await;
    }
    assert_eq!(
        origin.hits(),
        allowed,
        "a refused identity reached the origin"
    );

    // An admin may POST where viewers may only GET.
    let auth = format!("Bearer {}", kc_token(json!(["admins"])));
    let g = send(&p, "POST", "/ro/x", &[("authorization", &auth)]).await;
    assert_eq!(g.status, 200, "{}", g.body);
}

/// No credentials, even from a browser (`Accept: text/html`), on a route with no login
/// provider: 401 with a bare RFC 6750 challenge, not a redirect; a bad token gets the
/// `invalid_token` challenge.
#[tokio::test]
async fn without_credentials_a_browser_gets_401_with_a_bearer_challenge() {
    let kc = Key::ec("kc1");
    let sc = Key::ec("sc1");
    let origin = echo().await;
    let p = groups_proxy(&kc, &sc, &origin).await;

    let g = get(
        &p,
        "/admin/page",
        &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
    )
    .await;
    assert_refused(&p, "browser without credentials", &g, 401, "no credentials").await;
    assert_eq!(g.header("www-authenticate"), "Bearer realm=\"portcullis\"");
    assert!(
        g.header("location").is_empty(),
        "a redirect without a login provider"
    );
    assert_eq!(g.header("cache-control"), "no-store");

    let g = get(&p, "/admin/page", &[("accept", "application/json")]).await;
    assert_refused(
        &p,
        "API client without credentials",
        &g,
        401,
        "no credentials",
    )
    .await;
    assert_eq!(g.header("www-authenticate"), "Bearer realm=\"portcullis\"");

    let g = get(
        &p,
        "/admin/page",
        &[("accept", "text/html"), ("authorization", "Bearer x.y.z")],
    )
    .await;
    assert_refused(&p, "browser with a bad token", &g, 401, "malformed").await;
    assert_invalid_token_challenge("browser with a bad token", &g);

    let g = get(
        &p,
        "/admin/page",
        &[("authorization", "Basic YWxpY2U6cHc=")],
    )
    .await;
    assert_refused(&p, "another auth scheme", &g, 401, "no credentials").await;
    assert_eq!(origin.hits(), 0);
}

// ---------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------

/// Keys made with `portcullis apikey new`: accepted as `Authorization: ApiKey` and
/// `X-API-Key`; a wrong, expired or revoked key is refused; a key added to the file is
/// accepted within seconds without a restart.
#[tokio::test]
async fn api_keys_from_the_cli_verify_expire_revoke_and_reload() {
    let (k1, e1) = apikey_new("deploy-bot", "ci,deploy", None);
    let (k_old, e_old) = apikey_new("old-bot", "ci", Some("old-1"));
    let e_old = e_old + "    expires: 2001-01-01T00:00:00Z\n";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    write_atomic(&keys, &format!("keys:\n{e1}{e_old}"));
    let origin = echo().await;
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: agents, kind: api_key, keys_file: "{dir}/keys.yaml" }
    - { name: dev, kind: dev_issuer }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - name: api
    match: { path_prefix: /api/ }
    backend: o
    auth: [agents]
    allow: [{}]
    headers: { upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" } }
  - { name: jwt-only, match: { path_prefix: /jwt/ }, backend: o, auth: [dev], allow: [{}] }
"#;
    let p = Proxy::start_in(dir, &yaml.replace("@ORIGIN@", &origin.address())).await;
    let apikey = |k: &str| format!("ApiKey {k}");

    let g = get(&p, "/api/x", &[("authorization", &apikey(&k1))]).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-user"), ["deploy-bot"]);
    assert_eq!(g.seen("x-groups"), ["ci,deploy"]);
    let g = get(&p, "/api/x", &[("x-api-key", &k1)]).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-user"), ["deploy-bot"]);
    let hits = origin.hits();

    // The same key with its last character changed.
    let last = if k1.ends_with('A') { "B" } else { "A" };
    let wrong = format!("{}{last}", &k1[..k1.len() - 1]);
    let cases = [
        (
            "wrong key",
            "/api/x",
            "authorization",
            apikey(&wrong),
            "API key",
        ),
        (
            "wrong key in X-API-Key",
            "/api/x",
            "x-api-key",
            wrong.clone(),
            "API key",
        ),
        (
            "expired key",
            "/api/x",
            "authorization",
            apikey(&k_old),
            "API key",
        ),
        (
            "valid key on a route without an api_key provider",
            "/jwt/x",
            "x-api-key",
            k1.clone(),
            "not accepted on this route",
        ),
    ];
    for (case, path, header, value, reason) in &cases {
        let g = get(&p, path, &[(*header, value.as_str())]).await;
        assert_refused(&p, case, &g, 401, reason).await;
        assert_invalid_token_challenge(case, &g);
    }
    assert_eq!(origin.hits(), hits, "a refused key reached the origin");

    // Reload: a new key is accepted without a restart.
    let (k2, e2) = apikey_new("new-bot", "ops", None);
    write_atomic(&keys, &format!("keys:\n{e1}{e_old}{e2}"));
    let pr = &p;
    let added = eventually(Duration::from_secs(5), || {
        let k2 = k2.clone();
        async move { get(pr, "/api/x", &[("x-api-key", &k2)]).await.status == 200 }
    })
    .await;
    assert!(
        added,
        "a key added to the file was not picked up; log:\n{}",
        p.log_text()
    );

    // Revocation: removing the entry refuses the key; the others still work.
    write_atomic(&keys, &format!("keys:\n{e2}"));
    let revoked = eventually(Duration::from_secs(5), || {
        let k1 = k1.clone();
        async move { get(pr, "/api/x", &[("x-api-key", &k1)]).await.status == 401 }
    })
    .await;
    assert!(revoked, "a removed key is still accepted");
    let g = get(&p, "/api/x", &[("authorization", &apikey(&k2))]).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-user"), ["new-bot"]);

    // A broken file keeps the last good keys.
    write_atomic(&keys, "keys: [ this is not valid");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let g = get(&p, "/api/x", &[("x-api-key", &k2)]).await;
    assert_eq!(g.status, 200, "a broken keys file dropped the good keys");
    assert!(p.log_text().contains("API key file invalid"));
    let logs = p.log_text() + &p.access_log_text();
    for k in [&k1, &k2, &k_old] {
        assert!(!logs.contains(k.as_str()), "an API key was logged");
    }
}

// ---------------------------------------------------------------------------------------
// dev_issuer
// ---------------------------------------------------------------------------------------

/// `portcullis token` mints with the same key file the running proxy uses, so its output is
/// accepted; a provider that is not a dev_issuer cannot mint.
#[tokio::test]
async fn tokens_from_portcullis_token_are_accepted_by_the_running_proxy() {
    let origin = echo().await;
    let yaml = LISTENER.to_string()
        + r#"
identity:
  providers:
    - { name: dev, kind: dev_issuer }
    - { name: agents, kind: api_key, keys_file: "{dir}/keys.yaml" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - name: api
    match: { path_prefix: /api/ }
    backend: o
    auth: [dev]
    allow: [{ groups: [eng] }]
    headers: { upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" } }
"#;
    let dir = tempfile::tempdir().unwrap();
    write_atomic(&dir.path().join("keys.yaml"), "keys: []\n");
    let p = Proxy::start_in(dir, &yaml.replace("@ORIGIN@", &origin.address())).await;
    let config = p.config.to_str().unwrap().to_string();
    let mint = |user: &str, groups: &str| {
        let out = portcullis(&[
            "token",
            "--config",
            &config,
            "--provider",
            "dev",
            "--user",
            user,
            "--groups",
            groups,
            "--ttl",
            "1h",
        ]);
        assert!(
            out.status.success(),
            "portcullis token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };

    let token = mint("alice", "eng");
    assert_eq!(token.split('.').count(), 3, "{token}");
    let g = get_bearer(&p, "/api/x", &token).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.seen("x-user"), ["alice"]);
    assert_eq!(g.seen("x-groups"), ["eng"]);
    let g = get_bearer(&p, "/api/x", &mint("bob", "sales")).await;
    assert_refused(
        &p,
        "dev token outside the allowed group",
        &g,
        403,
        "deny for bob",
    )
    .await;

    let out = portcullis(&[
        "token",
        "--config",
        &config,
        "--provider",
        "agents",
        "--user",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a dev_issuer"));
}

/// `portcullis check` warns when a dev_issuer guards a route on a non-loopback listener,
/// and says nothing when every listener is loopback.
#[test]
fn check_warns_about_a_dev_issuer_reachable_from_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bind: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "listeners:\n  - {{ name: web, bind: \"{bind}\" }}\nidentity:\n  providers:\n    - {{ name: dev, kind: dev_issuer }}\nbackends:\n  - {{ name: o, servers: [{{ address: \"builtin:echo\" }}] }}\nroutes:\n  - {{ name: api, backend: o, auth: [dev] }}\n"
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let open = write("open.yaml", "0.0.0.0:18443");
    let local = write("local.yaml", "127.0.0.1:18443");

    let out = portcullis(&["check", "--config", &open]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("dev_issuer") && err.contains("0.0.0.0:18443"),
        "no warning for a dev_issuer on 0.0.0.0:\n{err}"
    );

    let out = portcullis(&["check", "--config", &local]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("warning"),
        "a warning for a loopback listener:\n{err}"
    );
}
