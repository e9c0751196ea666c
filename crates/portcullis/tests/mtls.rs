//! Client certificates as identity, against the real binary over real TLS: a listener with
//! `client_auth: { required: false }`, an `mtls` provider taking the SPIFFE ID from the
//! certificate's SAN URI, routes with `client_cert: required` and `optional`, and a client
//! certificate from a CA the listener does not trust. CAs and certificates are generated
//! with rcgen; the client is rustls (ring) under hyper.
mod common;
use common::pki::{init_crypto, Ca, Leaf};
use common::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

const SPIFFE: &str = "spiffe://example.org/ns/prod/sa/billing";

/// A workload certificate: SAN URI (the SPIFFE ID), a SAN DNS name and a CN.
fn workload(ca: &Ca, spiffe: &str) -> Leaf {
    let mut p = CertificateParams::new(vec!["billing.internal".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::URI(spiffe.try_into().unwrap()));
    p.distinguished_name.push(DnType::CommonName, "billing");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    ca.sign(p)
}

/// A client trusting `ca` (for the server), presenting `cert` if given.
fn client_config(ca: &Ca, cert: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    client_config_for(
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        ca,
        cert,
    )
}

fn client_config_for(
    versions: &[&'static rustls::SupportedProtocolVersion],
    ca: &Ca,
    cert: Option<&Leaf>,
) -> Arc<rustls::ClientConfig> {
    init_crypto();
    let b = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(ca.roots());
    Arc::new(match cert {
        Some(l) => b
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// A GET over TLS (HTTP/1.1) to the proxy. Any failure, including a handshake the server
/// refuses (with TLS 1.3 the client learns on its first read), is an Err.
async fn tls_get(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    tls_request(port, cfg, "GET", path, headers, "").await
}

/// A request over TLS (HTTP/1.1), as [`tls_get`].
async fn tls_request(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), String> {
    let body = Bytes::from(body.to_string());
    let fut = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = s
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// An origin that answers with the headers it received, as JSON lists of values.
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
        Response::new(Full::new(Bytes::from(json!({ "headers": h }).to_string())))
    })
    .await
}

/// The values of header `name` the echo origin received.
fn seen(body: &str, name: &str) -> Vec<String> {
    let doc: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not echoed JSON ({e}): {body}"));
    doc["headers"][name]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// An ES256 key for provider `tok` and its JWKS.
struct TokenKey {
    enc: EncodingKey,
    jwks: Value,
}

impl TokenKey {
    fn new() -> TokenKey {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        TokenKey {
            enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks: json!({ "keys": [{
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "t1",
                "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
            }] }),
        }
    }

    fn mint(&self, sub: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("t1".into());
        jsonwebtoken::encode(
            &h,
            &json!({ "iss": "https://tok.test", "aud": "api", "sub": sub, "iat": now, "exp": now + 600 }),
            &self.enc,
        )
        .unwrap()
    }
}

struct Setup {
    p: Proxy,
    origin: Origin,
    ca: Ca,
    workload: Leaf,
    tok: TokenKey,
}

/// A TLS listener (client certificates optional at the handshake, verified against the
/// clients' CA when presented), providers `mesh` (mtls) and `tok` (jwt), and routes:
/// /req/ (`mesh`, `client_cert: required`), /reqtok/ (`mesh` or `tok`, required), and
/// /opt/ (`mesh` or `tok`, `client_cert: optional`).
async fn setup() -> Setup {
    let server_ca = Ca::new("server CA");
    let clients_ca = Ca::new("clients CA");
    let server = server_ca.server(&["localhost"]);
    let workload = workload(&clients_ca, SPIFFE);
    let tok = TokenKey::new();
    let origin = echo().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "server.pem", &server.cert_pem);
    write(dir.path(), "server.key", &server.key_pem);
    write(dir.path(), "clients-ca.pem", &clients_ca.cert.pem());
    write(dir.path(), "tok.json", &tok.jwks.to_string());
    let headers = r#"headers: { upstream: { X-User: "{identity.user}", X-Spiffe: "{claims.spiffe_id}", X-Provider: "{identity.provider}" } }"#;
    let yaml = r#"
listeners:
  - name: web
    bind: "127.0.0.1:{port}"
    tls:
      certificates: [{ cert: "{dir}/server.pem", key: "{dir}/server.key" }]
      client_auth: { ca: "{dir}/clients-ca.pem", required: false }
identity:
  providers:
    - { name: mesh, kind: mtls }
    - { name: tok, kind: jwt, issuer: "https://tok.test", audiences: [api], jwks_file: "{dir}/tok.json" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: req, match: { path_prefix: /req/ }, backend: o, auth: [mesh], client_cert: required, allow: [{}], @HEADERS@ }
  - { name: reqtok, match: { path_prefix: /reqtok/ }, backend: o, auth: [mesh, tok], client_cert: required, allow: [{}], @HEADERS@ }
  - { name: opt, match: { path_prefix: /opt/ }, backend: o, auth: [mesh, tok], client_cert: optional, allow: [{}], @HEADERS@ }
"#
    .replace("@ORIGIN@", &origin.address())
    .replace("@HEADERS@", headers);
    let p = Proxy::start_in(dir, &yaml).await;
    Setup {
        p,
        origin,
        ca: server_ca,
        workload,
        tok,
    }
}

/// `client_cert: required`: no certificate gets 401, a certificate from the trusted CA gets
/// 200 with its SPIFFE ID as the identity. A bearer token does not stand in for the
/// certificate on such a route.
#[tokio::test]
async fn a_required_client_certificate_is_the_identity() {
    let s = setup().await;
    let port = s.p.port;
    let anon = client_config(&s.ca, None);
    let with_cert = client_config(&s.ca, Some(&s.workload));

    let (status, body) = tls_get(port, anon.clone(), "/req/x", &[]).await.unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body) = tls_get(port, with_cert.clone(), "/req/x", &[("x-user", "mallory")])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body, "x-user"), [SPIFFE]);
    assert_eq!(seen(&body, "x-spiffe"), [SPIFFE]);
    assert_eq!(seen(&body, "x-provider"), ["mesh"]);
    assert_eq!(s.origin.hits(), 1);

    let auth = format!("Bearer {}", s.tok.mint("alice"));
    let (status, body) = tls_get(port, anon, "/reqtok/x", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(
        status, 401,
        "a bearer token replaced the required client certificate: {body}"
    );
    assert_eq!(s.origin.hits(), 1);
    let logged = eventually(Duration::from_secs(5), || {
        let text = s.p.access_log_text();
        async move {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|r| {
                    r["route"] == "default/reqtok"
                        && r["status"] == 401
                        && r["error"] == "client certificate required"
                })
        }
    })
    .await;
    assert!(logged, "refusal not logged:\n{}", s.p.access_log_text());
    let (status, body) = tls_get(port, with_cert, "/reqtok/x", &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body, "x-user"), [SPIFFE]);
}

/// `client_cert: optional`: without a certificate there is no mtls identity (401 unless
/// another provider of the route matches, here a bearer token); with one, the certificate is
/// the identity.
#[tokio::test]
async fn an_optional_client_certificate_is_an_identity_when_presented() {
    let s = setup().await;
    let port = s.p.port;
    let anon = client_config(&s.ca, None);
    let with_cert = client_config(&s.ca, Some(&s.workload));

    let (status, body) = tls_get(port, anon.clone(), "/opt/x", &[]).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(s.origin.hits(), 0);

    let auth = format!("Bearer {}", s.tok.mint("alice"));
    let (status, body) = tls_get(port, anon, "/opt/x", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body, "x-user"), ["alice"]);
    assert_eq!(seen(&body, "x-provider"), ["tok"]);
    assert_eq!(
        seen(&body, "x-spiffe"),
        [""],
        "no certificate, no SPIFFE ID"
    );

    let (status, body) = tls_get(port, with_cert, "/opt/x", &[("x-spiffe", "spiffe://evil")])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(seen(&body, "x-user"), [SPIFFE]);
    assert_eq!(seen(&body, "x-spiffe"), [SPIFFE]);
    assert_eq!(seen(&body, "x-provider"), ["mesh"]);
}

/// A client certificate from a CA the listener does not trust fails the handshake, and
/// nothing reaches the origin; the trusted workload still gets through afterwards.
#[tokio::test]
async fn a_client_certificate_from_an_untrusted_ca_fails_the_handshake() {
    let s = setup().await;
    let rogue = workload(&Ca::new("rogue CA"), SPIFFE);
    // TLS 1.3: the client finishes its side first and learns of the refusal (a fatal alert)
    // when it reads.
    let cfg = client_config(&s.ca, Some(&rogue));
    for path in ["/req/x", "/opt/x"] {
        let r = tls_get(s.p.port, cfg.clone(), path, &[]).await;
        let err = r.expect_err("an untrusted client certificate was accepted");
        assert!(err.contains("UnknownCA"), "{path}: {err}");
    }
    // TLS 1.2: the handshake itself fails.
    let cfg = client_config_for(&[&rustls::version::TLS12], &s.ca, Some(&rogue));
    let r = tls_get(s.p.port, cfg, "/opt/x", &[]).await;
    let err = r.expect_err("an untrusted client certificate was accepted over TLS 1.2");
    assert!(err.starts_with("handshake:"), "{err}");
    assert_eq!(s.origin.hits(), 0);
    let (status, body) = tls_get(
        s.p.port,
        client_config(&s.ca, Some(&s.workload)),
        "/req/x",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// The admin listener over TLS: a client certificate that the `mtls` provider of
/// `admin.auth` accepts is an identity that `admin.policies` decides for, on the API and on
/// the console (where a change made with the certificate alone needs the page's CSRF token,
/// since a browser sends the certificate on its own).
#[tokio::test]
async fn the_admin_listener_takes_client_certificates_as_identities() {
    let server_ca = Ca::new("server CA");
    let clients_ca = Ca::new("clients CA");
    let server = server_ca.server(&["localhost"]);
    let billing = workload(&clients_ca, SPIFFE);
    let intruder = workload(&clients_ca, "spiffe://example.org/ns/prod/sa/intruder");
    let origin = echo().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "server.pem", &server.cert_pem);
    write(dir.path(), "server.key", &server.key_pem);
    write(dir.path(), "clients-ca.pem", &clients_ca.cert.pem());
    write(
        dir.path(),
        "admin.cedar",
        &format!(
            r#"permit(principal == Portcullis::Agent::"{SPIFFE}", action in [
  Portcullis::Admin::Action::"backends.read", Portcullis::Admin::Action::"dashboard.read",
  Portcullis::Admin::Action::"server.set_state"], resource);"#
        ),
    );
    let yaml = format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
identity:
  providers:
    - {{ name: mesh, kind: mtls }}
backends:
  - {{ name: o, servers: [{{ name: s1, address: "{}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: o, public: true }}
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{ADMIN_TOKEN}"]
  auth: [mesh]
  policies: [admin.cedar]
  tls:
    certificates: [{{ cert: "{{dir}}/server.pem", key: "{{dir}}/server.key" }}]
    client_auth: {{ ca: "{{dir}}/clients-ca.pem", required: false }}
"#,
        origin.address()
    );
    let p = Proxy::start_in(dir, &yaml).await;
    let port = p.admin_port;
    let with = client_config(&server_ca, Some(&billing));
    let other = client_config(&server_ca, Some(&intruder));
    let anon = client_config(&server_ca, None);

    let (s, body) = tls_get(port, with.clone(), "/api/v1/backends", &[])
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = tls_get(port, other.clone(), "/api/v1/backends", &[])
        .await
        .unwrap();
    assert_eq!(s, 403, "no policy permits the intruder: {body}");
    let (s, _) = tls_get(port, anon.clone(), "/api/v1/backends", &[])
        .await
        .unwrap();
    assert_eq!(s, 401);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let (s, _) = tls_get(
        port,
        anon.clone(),
        "/api/v1/backends",
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "the break-glass token still works over TLS");

    // A change with the certificate alone, from a browser (a form post, or a fetch that says
    // where it comes from), needs the console's CSRF token.
    let path = "/api/v1/backends/o/servers/s1/state";
    let drain = r#"{"state":"drain"}"#;
    // The Host the test client sends.
    let origin = "https://localhost".to_string();
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let (s, _) = tls_request(port, with.clone(), "POST", path, &form, "state=drain")
        .await
        .unwrap();
    assert_eq!(s, 403, "a form post without the CSRF token");
    let fetch = [
        ("content-type", "application/json"),
        ("origin", origin.as_str()),
    ];
    let (s, _) = tls_request(port, with.clone(), "POST", path, &fetch, drain)
        .await
        .unwrap();
    assert_eq!(s, 403, "a browser's fetch without the CSRF token");
    let (s, page) = tls_get(port, with.clone(), "/", &[]).await.unwrap();
    assert_eq!(s, 200, "the certificate signs in to the console: {page}");
    assert!(page.contains(SPIFFE), "the viewer is named");
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|x| x.split('"').next())
        .unwrap()
        .to_string();
    let hdrs = [
        ("content-type", "application/json"),
        ("origin", origin.as_str()),
        ("x-csrf-token", csrf.as_str()),
    ];
    let mut cross = hdrs;
    cross[1] = ("origin", "https://evil.example");
    let (s, _) = tls_request(port, with.clone(), "POST", path, &cross, drain)
        .await
        .unwrap();
    assert_eq!(s, 403, "the token, but from another origin");
    let (s, body) = tls_request(port, with.clone(), "POST", path, &hdrs, drain)
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    let (s, body) = tls_get(port, with.clone(), "/api/v1/backends", &[])
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert!(body.contains("\"drain\""), "{body}");
    // An agent (no browser's signs, a JSON body) changes state with its certificate alone,
    // and its policy still decides.
    let json = [("content-type", "application/json")];
    let ready = r#"{"state":"ready"}"#;
    let (s, body) = tls_request(port, with.clone(), "POST", path, &json, ready)
        .await
        .unwrap();
    assert_eq!(s, 200, "an agent needs no CSRF token: {body}");
    let (s, _) = tls_request(port, other.clone(), "POST", path, &json, drain)
        .await
        .unwrap();
    assert_eq!(s, 403, "the intruder's policy refuses it");
    let (s, _) = tls_get(port, anon, "/", &[]).await.unwrap();
    assert_eq!(s, 303, "without a certificate, the console asks to sign in");
}
