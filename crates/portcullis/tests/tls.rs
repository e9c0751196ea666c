//! TLS on both sides of the real binary, with certificates issued by CAs generated in the
//! test: SNI certificate selection and ALPN at the listener, certificate files re-read when
//! they change on disk, client certificates at the listener (mTLS), and upstream TLS with its
//! own CA and client certificate.
mod common;
use common::pki::{client_config, handshake, init_crypto, Ca, Leaf};
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

fn write_pem(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A GET over TLS to the proxy, speaking h2 or HTTP/1.1 as ALPN decided. Any failure (the
/// handshake, or the server rejecting it right after, as TLS 1.3 client auth does) is an Err.
async fn tls_get(
    port: u16,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, String), String> {
    let hs = handshake(port, sni, cfg).await?;
    let fut = async move {
        let h2 = hs.alpn.as_deref() == Some(b"h2");
        let io = TokioIo::new(hs.stream);
        let resp = if h2 {
            let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::builder()
                .uri(format!("https://{sni}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            s.send_request(req)
                .await
                .map_err(|e| format!("h2 request: {e}"))?
        } else {
            let (mut s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::builder()
                .uri(path)
                .header("host", sni)
                .body(Full::new(Bytes::new()))
                .unwrap();
            s.send_request(req)
                .await
                .map_err(|e| format!("h1 request: {e}"))?
        };
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
        .map_err(|_| "request timed out".to_string())?
}

/// A real TLS origin. It answers `tls-origin <version> client-cert=<yes|no>`.
struct TlsOrigin {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_origin(cfg: rustls::ServerConfig) -> TlsOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client_cert = if tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty())
                {
                    "yes"
                } else {
                    "no"
                };
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let msg = format!("tls-origin {:?} client-cert={client_cert}", req.version());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(msg))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsOrigin { addr, task }
}

fn origin_server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> rustls::ServerConfig {
    init_crypto();
    let b = rustls::ServerConfig::builder();
    let b = match client_ca {
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder(Arc::new(ca.roots()))
                .build()
                .unwrap(),
        ),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b.with_single_cert(leaf.chain(), leaf.key()).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

fn yaml_path(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

// ---------------------------------------------------------------------------------------
// Listener: SNI, ALPN, reload
// ---------------------------------------------------------------------------------------

/// Starts a proxy with a TLS listener serving a.test and b.test, routed to a named origin.
async fn sni_proxy(a: &Leaf, b: &Leaf, origin: &Origin) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key) = a.write(dir.path(), "a");
    let (b_cert, b_key) = b.write(dir.path(), "b");
    Proxy::start_in(
        dir,
        &format!(
            "listeners:\n  - name: web\n    bind: \"127.0.0.1:{{port}}\"\n    tls:\n      certificates:\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {} }}\nbackends:\n  - {{ name: b, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: r, backend: b, public: true }}\n",
            yaml_path(&a_cert),
            yaml_path(&a_key),
            yaml_path(&b_cert),
            yaml_path(&b_key),
            origin.address()
        ),
    )
    .await
}

/// The listener picks the certificate matching the client's SNI among several, each verifies
/// against the CA for its name, and ALPN negotiates h2 when offered (http/1.1 otherwise).
#[tokio::test]
async fn sni_selects_the_certificate_and_alpn_negotiates_h2() {
    let ca = Ca::new("listener CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test"]);
    let origin = Origin::named("behind tls").await;
    let p = sni_proxy(&a, &b, &origin).await;

    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let hs = handshake(p.port, "a.test", client_config(&ca, both, None))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    assert!(hs.leaf == a.der, "SNI a.test must get certificate a");
    assert_eq!(
        hs.alpn.as_deref(),
        Some(&b"h2"[..]),
        "h2 is chosen when offered"
    );
    let hs = handshake(p.port, "b.test", client_config(&ca, both, None))
        .await
        .unwrap();
    assert!(hs.leaf == b.der, "SNI b.test must get certificate b");

    // A request over each, in each protocol.
    for sni in ["a.test", "b.test"] {
        let r = tls_get(p.port, sni, client_config(&ca, both, None), "/x")
            .await
            .unwrap();
        assert_eq!(r, (200, "behind tls".to_string()), "h2 via {sni}");
        let h1: &[&[u8]] = &[b"http/1.1"];
        let hs = handshake(p.port, sni, client_config(&ca, h1, None))
            .await
            .unwrap();
        assert_eq!(hs.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let r = tls_get(p.port, sni, client_config(&ca, h1, None), "/y")
            .await
            .unwrap();
        assert_eq!(r, (200, "behind tls".to_string()), "http/1.1 via {sni}");
    }

    // A client that does not trust the listener's CA fails the handshake.
    let other = Ca::new("some other CA");
    assert!(
        handshake(p.port, "a.test", client_config(&other, both, None))
            .await
            .is_err()
    );
}

/// Whether new handshakes for `name` get the certificate `der` within ten seconds.
async fn comes_to_serve(
    port: u16,
    name: &'static str,
    cfg: &Arc<rustls::ClientConfig>,
    der: &rustls::pki_types::CertificateDer<'static>,
) -> bool {
    eventually(Duration::from_secs(10), || {
        let (cfg, der) = (cfg.clone(), der.clone());
        async move {
            match handshake(port, name, cfg).await {
                Ok(hs) => hs.leaf == der,
                Err(_) => false,
            }
        }
    })
    .await
}

/// Replacing a listener's certificate files on disk takes effect for new handshakes within a
/// few seconds, without a reload; the other certificate is unaffected.
#[tokio::test]
async fn certificate_files_are_reread_when_they_change() {
    let ca = Ca::new("listener CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test"]);
    let origin = Origin::named("ok").await;
    let p = sni_proxy(&a, &b, &origin).await;
    let cfg = client_config(&ca, &[b"http/1.1"], None);
    assert!(handshake(p.port, "a.test", cfg.clone()).await.unwrap().leaf == a.der);

    let a2 = ca.server(&["a.test"]);
    assert!(a2.der != a.der);
    a2.write(p.dir.path(), "a");
    let switched = comes_to_serve(p.port, "a.test", &cfg, &a2.der).await;
    assert!(
        switched,
        "new handshakes did not get the new certificate\n{}",
        p.log_text()
    );
    assert!(handshake(p.port, "b.test", cfg.clone()).await.unwrap().leaf == b.der);
    let r = tls_get(p.port, "a.test", cfg.clone(), "/").await.unwrap();
    assert_eq!(r, (200, "ok".to_string()));

    // A broken replacement keeps the current certificate.
    std::fs::write(p.dir.path().join("a.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hs = handshake(p.port, "a.test", cfg.clone()).await.unwrap();
    assert!(
        hs.leaf == a2.der,
        "a broken certificate file must not replace the working one"
    );

    // A rotation that keeps the files' modification times (`cp -p`, `rsync -t`, build
    // outputs with fixed times) is noticed too.
    let mtime = |f: &str| {
        std::fs::metadata(p.dir.path().join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let (cert_t, key_t) = (mtime("a.pem"), mtime("a.key"));
    let a3 = ca.server(&["a.test"]);
    let (cert, key) = a3.write(p.dir.path(), "a");
    for (f, t) in [(cert, cert_t), (key, key_t)] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    assert_eq!((mtime("a.pem"), mtime("a.key")), (cert_t, key_t));
    let switched = comes_to_serve(p.port, "a.test", &cfg, &a3.der).await;
    assert!(
        switched,
        "a rotation with the old mtime was missed\n{}",
        p.log_text()
    );
}

/// A reload whose listener certificate and key do not match is refused with the place in
/// the config, as `portcullis check` says it, and the running certificates keep serving.
#[tokio::test]
async fn a_reload_with_a_mismatched_key_is_refused_where_it_is_written() {
    let ca = Ca::new("listener CA");
    let (a, b) = (ca.server(&["a.test"]), ca.server(&["b.test"]));
    let origin = Origin::named("ok").await;
    let p = sni_proxy(&a, &b, &origin).await;
    let dir = p.dir.path();
    let text = std::fs::read_to_string(&p.config).unwrap();
    // a.test's certificate with b.test's key.
    let broken = text.replacen(
        &yaml_path(&dir.join("a.key")),
        &yaml_path(&dir.join("b.key")),
        1,
    );
    assert_ne!(broken, text);
    std::fs::write(&p.config, broken).unwrap();
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("portcullis.yaml:"), "{body}");
    assert!(body.contains("do not match"), "{body}");
    let cfg = client_config(&ca, &[b"http/1.1"], None);
    assert!(handshake(p.port, "a.test", cfg).await.unwrap().leaf == a.der);
}

// ---------------------------------------------------------------------------------------
// Listener: client certificates
// ---------------------------------------------------------------------------------------

/// `client_auth: { required: true }`: a client without a certificate, or with one from another
/// CA, cannot talk to the listener; one with a certificate from the configured CA gets 200.
/// With `required: false` a client without a certificate is served.
#[tokio::test]
async fn listener_requires_client_certificates() {
    let ca = Ca::new("listener CA");
    let clients = Ca::new("clients CA");
    let strangers = Ca::new("strangers CA");
    let server = ca.server(&["a.test"]);
    let origin = Origin::named("mtls ok").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server.write(dir.path(), "server");
    let clients_ca = write_pem(dir.path(), "clients-ca.pem", &clients.pem());
    let optional_port = free_port();
    let tls = |required: bool| {
        format!(
            "{{ certificates: [{{ cert: {}, key: {} }}], client_auth: {{ ca: {}, required: {required} }} }}",
            yaml_path(&cert),
            yaml_path(&key),
            yaml_path(&clients_ca)
        )
    };
    let p = Proxy::start_in(
        dir,
        &format!(
            "listeners:\n  - {{ name: strict, bind: \"127.0.0.1:{{port}}\", tls: {} }}\n  - {{ name: optional, bind: \"127.0.0.1:{optional_port}\", tls: {} }}\nbackends:\n  - {{ name: b, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: r, backend: b, public: true }}\n",
            tls(true),
            tls(false),
            origin.address()
        ),
    )
    .await;

    let alpns: [&[&[u8]]; 2] = [&[b"http/1.1"], &[b"h2"]];
    for alpn in alpns {
        let anonymous = tls_get(p.port, "a.test", client_config(&ca, alpn, None), "/").await;
        assert!(
            anonymous.is_err(),
            "no client certificate must fail: {anonymous:?}"
        );
        let stranger = strangers.client("mallory");
        let r = tls_get(
            p.port,
            "a.test",
            client_config(&ca, alpn, Some(&stranger)),
            "/",
        )
        .await;
        assert!(r.is_err(), "a certificate from another CA must fail: {r:?}");
        let alice = clients.client("alice");
        let r = tls_get(
            p.port,
            "a.test",
            client_config(&ca, alpn, Some(&alice)),
            "/",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
        assert_eq!(r, (200, "mtls ok".to_string()));
    }
    assert_eq!(
        origin.hits(),
        2,
        "only the authenticated requests reached the origin"
    );

    // Optional client auth: anonymous is served, a valid certificate too.
    let r = tls_get(
        optional_port,
        "a.test",
        client_config(&ca, &[b"http/1.1"], None),
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.0, 200);
    let alice = clients.client("alice");
    let r = tls_get(
        optional_port,
        "a.test",
        client_config(&ca, &[b"http/1.1"], Some(&alice)),
        "/",
    )
    .await
    .unwrap();
    assert_eq!(r.0, 200);
}

// ---------------------------------------------------------------------------------------
// Upstream TLS
// ---------------------------------------------------------------------------------------

/// Backend `tls:` verifies the origin against the configured CA: the wrong CA or a name the
/// certificate does not cover gives 502; the right CA gives 200, with the server's IP or an
/// explicit `sni`, over HTTP/1.1 and h2.
#[tokio::test]
async fn upstream_tls_verifies_the_origin_against_the_configured_ca() {
    let upstream_ca = Ca::new("upstream CA");
    let other_ca = Ca::new("other CA");
    let leaf = upstream_ca.server(&["127.0.0.1", "origin.test"]);
    let origin = tls_origin(origin_server_config(&leaf, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let good = write_pem(dir.path(), "upstream-ca.pem", &upstream_ca.pem());
    let bad = write_pem(dir.path(), "other-ca.pem", &other_ca.pem());
    let (good, bad) = (yaml_path(&good), yaml_path(&bad));
    let o = origin.addr;
    let p = Proxy::start_in(
        dir,
        &format!(
            "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]
backends:
  - {{ name: wrong-ca, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {bad} }} }}
  - {{ name: right-ca, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {good} }} }}
  - {{ name: by-name, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {good}, sni: origin.test }} }}
  - {{ name: wrong-name, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {good}, sni: elsewhere.test }} }}
  - {{ name: h2, protocol: http2, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {good} }} }}
  - {{ name: no-verify, servers: [{{ address: \"{o}\" }}], tls: {{ verify: false }} }}
routes:
  - {{ name: wrong-ca, match: {{ path_prefix: /wrong-ca }}, backend: wrong-ca, public: true }}
  - {{ name: right-ca, match: {{ path_prefix: /right-ca }}, backend: right-ca, public: true }}
  - {{ name: by-name, match: {{ path_prefix: /by-name }}, backend: by-name, public: true }}
  - {{ name: wrong-name, match: {{ path_prefix: /wrong-name }}, backend: wrong-name, public: true }}
  - {{ name: h2, match: {{ path_prefix: /h2 }}, backend: h2, public: true }}
  - {{ name: no-verify, match: {{ path_prefix: /no-verify }}, backend: no-verify, public: true }}
"
        ),
    )
    .await;
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        let url = p.url(path);
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/wrong-ca").await.0, 502, "{}", p.log_text());
    assert_eq!(get("/wrong-name").await.0, 502);
    assert_eq!(
        get("/right-ca").await,
        (200, "tls-origin HTTP/1.1 client-cert=no".to_string())
    );
    assert_eq!(
        get("/by-name").await,
        (200, "tls-origin HTTP/1.1 client-cert=no".to_string())
    );
    assert_eq!(
        get("/h2").await,
        (200, "tls-origin HTTP/2.0 client-cert=no".to_string())
    );
    assert_eq!(get("/no-verify").await.0, 200);
    // Still failing after successes (no cached connection is reused across backends).
    assert_eq!(get("/wrong-ca").await.0, 502);
}

/// Upstream mTLS: an origin that requires a client certificate is reachable only by a
/// backend configured with `client_cert`/`client_key` from the CA the origin trusts.
#[tokio::test]
async fn upstream_mtls_presents_the_client_certificate() {
    let upstream_ca = Ca::new("upstream CA");
    let proxy_clients = Ca::new("proxy clients CA");
    let strangers = Ca::new("strangers CA");
    let leaf = upstream_ca.server(&["127.0.0.1"]);
    let origin = tls_origin(origin_server_config(&leaf, Some(&proxy_clients))).await;

    let dir = tempfile::tempdir().unwrap();
    let ca = yaml_path(&write_pem(
        dir.path(),
        "upstream-ca.pem",
        &upstream_ca.pem(),
    ));
    let (cc, ck) = proxy_clients
        .client("portcullis")
        .write(dir.path(), "proxy");
    let (sc, sk) = strangers.client("portcullis").write(dir.path(), "stranger");
    let (cc, ck, sc, sk) = (
        yaml_path(&cc),
        yaml_path(&ck),
        yaml_path(&sc),
        yaml_path(&sk),
    );
    let o = origin.addr;
    let p = Proxy::start_in(
        dir,
        &format!(
            "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]
backends:
  - {{ name: with-cert, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {ca}, client_cert: {cc}, client_key: {ck} }} }}
  - {{ name: h2-with-cert, protocol: http2, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {ca}, client_cert: {cc}, client_key: {ck} }} }}
  - {{ name: without-cert, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {ca} }} }}
  - {{ name: h2-without-cert, protocol: http2, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {ca} }} }}
  - {{ name: stranger-cert, servers: [{{ address: \"{o}\" }}], tls: {{ ca: {ca}, client_cert: {sc}, client_key: {sk} }} }}
routes:
  - {{ name: with-cert, match: {{ path_prefix: /with-cert }}, backend: with-cert, public: true }}
  - {{ name: h2-with-cert, match: {{ path_prefix: /h2-with-cert }}, backend: h2-with-cert, public: true }}
  - {{ name: without-cert, match: {{ path_prefix: /without-cert }}, backend: without-cert, public: true }}
  - {{ name: h2-without-cert, match: {{ path_prefix: /h2-without-cert }}, backend: h2-without-cert, public: true }}
  - {{ name: stranger-cert, match: {{ path_prefix: /stranger-cert }}, backend: stranger-cert, public: true }}
"
        ),
    )
    .await;
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        let url = p.url(path);
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("/with-cert").await,
        (200, "tls-origin HTTP/1.1 client-cert=yes".to_string()),
        "{}",
        p.log_text()
    );
    assert_eq!(
        get("/h2-with-cert").await,
        (200, "tls-origin HTTP/2.0 client-cert=yes".to_string())
    );
    assert_eq!(get("/without-cert").await.0, 502);
    assert_eq!(get("/h2-without-cert").await.0, 502);
    assert_eq!(get("/stranger-cert").await.0, 502);
    assert_eq!(get("/with-cert").await.0, 200);
}
