//! The `dev_issuer` provider, for the quickstart and tests: an ES256 key kept in a local file
//! (created on first use, mode 0600) that both `portcullis run` and `portcullis token` read,
//! so tokens minted on the command line are accepted by the running proxy.

use crate::jwks::KeySet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

pub struct DevKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: Value,
}

/// An ES256 key pair with its public JWK, from PKCS#8 PEM.
pub fn from_pem(pem: &str) -> Result<DevKey, String> {
    let kp = rcgen::KeyPair::from_pem(pem).map_err(|e| format!("invalid key: {e}"))?;
    let raw = kp.public_key_raw();
    if raw.len() != 65 || raw[0] != 4 {
        return Err("the key must be an ECDSA P-256 key".into());
    }
    let kid = hex(&Sha256::digest(raw)[..8]);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    let encoding =
        EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("invalid key: {e}"))?;
    Ok(DevKey { kid, encoding, jwk })
}

pub fn generate() -> Result<(String, DevKey), String> {
    let kp =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let pem = kp.serialize_pem();
    let k = from_pem(&pem)?;
    Ok((pem, k))
}

/// Loads the key at `path`; `None` when there is no such file.
pub fn load(path: &Path) -> Result<Option<DevKey>, String> {
    match std::fs::read_to_string(path) {
        Ok(pem) => from_pem(&pem)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Loads the key at `path`, creating it (and its directory) when missing.
pub fn load_or_create(path: &Path) -> Result<DevKey, String> {
    match load(path)? {
        Some(key) => Ok(key),
        None => {
            let (pem, key) = generate()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
            write_private(path, &pem)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(key)
        }
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // create_new: two processes starting at once must not overwrite each other's key.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => f.write_all(text.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl DevKey {
    pub fn key_set(&self) -> KeySet {
        KeySet::from_values(std::slice::from_ref(&self.jwk)).unwrap_or_default()
    }

    /// Mints a token for `user`.
    pub fn mint(
        &self,
        issuer: &str,
        audience: &str,
        user: &str,
        groups: &[String],
        email: Option<&str>,
        ttl_secs: u64,
    ) -> Result<String, String> {
        let now = crate::now_secs();
        let mut claims = json!({
            "iss": issuer, "aud": audience, "sub": user, "groups": groups,
            "iat": now, "nbf": now, "exp": now + ttl_secs,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        if let Some(e) = email {
            claims["email"] = json!(e);
        }
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.encoding).map_err(|e| e.to_string())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_once_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k/dev.pem");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.kid, b.kid);
        let t = a
            .mint("iss", "aud", "alice", &["eng".into()], None, 60)
            .unwrap();
        assert_eq!(t.split('.').count(), 3);
    }
}
