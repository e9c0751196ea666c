//! TLS on both sides. Listeners terminate TLS with rustls, choosing a certificate by SNI
//! among several, and re-reading certificate and key files when they change on disk.
//! Backends get a rustls client config with their own CA, optional client certificate (mTLS)
//! and ALPN for the upstream protocol.

use arc_swap::ArcSwap;
use portcullis_config::{ListenerTls, Protocol, UpstreamTls};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, format!("invalid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("cannot read a PEM private key: {e}")))
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(cert, format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| file_err(cert, format!("certificate and key do not match: {e}")))?;
    Ok(ck)
}

/// The certificates of one listener, chosen by SNI; the first is the default.
#[derive(Debug)]
pub struct SniResolver {
    keys: ArcSwap<Vec<Arc<CertifiedKey>>>,
    files: Vec<(PathBuf, PathBuf)>,
    stamps: parking_lot::Mutex<Vec<Option<Stamp>>>,
    provider: Arc<CryptoProvider>,
}

/// See [`SniResolver::stamps`].
type Stamp = (u64, u64, u64, (i64, i64), (i64, i64));

impl SniResolver {
    fn load_all(
        files: &[(PathBuf, PathBuf)],
        p: &CryptoProvider,
    ) -> Result<Vec<Arc<CertifiedKey>>, TlsError> {
        files
            .iter()
            .map(|(c, k)| certified_key(c, k, p).map(Arc::new))
            .collect()
    }

    /// What says a file changed: which file (device, inode), its size, and both its
    /// modification time and its status change time. The last one catches a rotation that
    /// keeps the old modification time (`cp -p`, `rsync -t`, archives, build outputs with
    /// fixed times), which no tool can set back.
    fn stamps(files: &[(PathBuf, PathBuf)]) -> Vec<Option<Stamp>> {
        use std::os::unix::fs::MetadataExt;
        files
            .iter()
            .flat_map(|(c, k)| [c, k])
            .map(|p| {
                std::fs::metadata(p).ok().map(|m| {
                    (
                        m.dev(),
                        m.ino(),
                        m.size(),
                        (m.mtime(), m.mtime_nsec()),
                        (m.ctime(), m.ctime_nsec()),
                    )
                })
            })
            .collect()
    }

    /// Re-reads the files if any changed. A broken file keeps the previous certificates.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let now = Self::stamps(&self.files);
        let mut st = self.stamps.lock();
        if *st == now {
            return Ok(false);
        }
        *st = now;
        drop(st);
        let keys = Self::load_all(&self.files, &self.provider)?;
        self.keys.store(Arc::new(keys));
        Ok(true)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.load();
        if let Some(name) = hello.server_name() {
            if let Ok(sn) = ServerName::try_from(name) {
                for k in keys.iter() {
                    let Some(leaf) = k.cert.first() else { continue };
                    if let Ok(ee) = webpki::EndEntityCert::try_from(leaf) {
                        if ee.verify_is_valid_for_subject_name(&sn).is_ok() {
                            return Some(k.clone());
                        }
                    }
                }
            }
        }
        keys.first().cloned()
    }
}

/// Builds a listener's server config. The resolver is returned so the caller can refresh it.
pub fn server_config(
    tls: &ListenerTls,
    protocols: &[Protocol],
) -> Result<(Arc<rustls::ServerConfig>, Arc<SniResolver>), TlsError> {
    let provider = provider();
    let files: Vec<(PathBuf, PathBuf)> = tls
        .certificates
        .iter()
        .map(|c| (PathBuf::from(&c.cert), PathBuf::from(&c.key)))
        .collect();
    let keys = SniResolver::load_all(&files, &provider)?;
    let resolver = Arc::new(SniResolver {
        keys: ArcSwap::from_pointee(keys),
        stamps: parking_lot::Mutex::new(SniResolver::stamps(&files)),
        files,
        provider: provider.clone(),
    });
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_auth {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(Path::new(&ca.ca))? {
                roots.add(c).map_err(|e| {
                    file_err(Path::new(&ca.ca), format!("invalid CA certificate: {e}"))
                })?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let v = if ca.required {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder
                .with_client_cert_verifier(v.build().map_err(|e| file_err(Path::new(&ca.ca), e))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = protocols
        .iter()
        .map(|p| match p {
            Protocol::Http2 => b"h2".to_vec(),
            Protocol::Http1 => b"http/1.1".to_vec(),
        })
        .collect();
    // Prefer h2 when offered.
    cfg.alpn_protocols.sort_by_key(|p| p != b"h2");
    Ok((Arc::new(cfg), resolver))
}

/// Accepts any server certificate: only for `tls.verify: false`, which the docs warn about.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the client config for a backend's upstream TLS.
pub fn client_config(
    tls: &UpstreamTls,
    protocol: Protocol,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if !tls.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(ca) => {
                for c in load_certs(Path::new(ca))? {
                    roots.add(c).map_err(|e| {
                        file_err(Path::new(ca), format!("invalid CA certificate: {e}"))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match (&tls.client_cert, &tls.client_key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(load_certs(Path::new(c))?, load_key(Path::new(k))?)
            .map_err(|e| file_err(Path::new(c), format!("client certificate: {e}")))?,
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![match protocol {
        Protocol::Http2 => b"h2".to_vec(),
        Protocol::Http1 => b"http/1.1".to_vec(),
    }];
    Ok(Arc::new(cfg))
}
