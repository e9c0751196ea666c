//! API keys for machines and agents. Keys live in a YAML file of hashed entries (SHA-256 or
//! argon2id; plaintext is never stored), re-read when the file changes. A key is presented as
//! `Authorization: ApiKey <key>` or `X-API-Key: <key>` and compared in constant time.
//!
//! ```yaml
//! keys:
//!   - id: deploy-bot-1
//!     hash: "sha256:9f86d081…"          # or an argon2id PHC string
//!     user: deploy-bot
//!     groups: [ci]
//!     expires: 2027-01-01T00:00:00Z     # optional
//!     plan: agents-pro                  # optional: the key's usage plan (claim `plan`)
//! ```

use crate::{now_secs, AuthError, AuthMethod, Identity};
use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use subtle::ConstantTimeEq;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    keys: Vec<Entry>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    hash: String,
    user: String,
    #[serde(default)]
    groups: Vec<String>,
    email: Option<String>,
    expires: Option<String>,
    #[serde(default)]
    revoked: bool,
    /// The key's usage plan, offered to the limit phase as the claim `plan`.
    plan: Option<String>,
}

struct Key {
    entry: Entry,
    expires_at: Option<u64>,
    /// The identity a match yields, built once per load and shared by every request that
    /// presents the key (so per-identity caches downstream see one identity, not copies).
    identity: Arc<Identity>,
}

#[derive(Default)]
struct Parsed {
    sha: HashMap<[u8; 32], Arc<Key>>,
    argon: Vec<Arc<Key>>,
}

pub struct KeyStore {
    pub provider: String,
    path: PathBuf,
    parsed: ArcSwap<Parsed>,
    stamp: Mutex<(Option<SystemTime>, Instant)>,
    /// Positive argon2 verifications, by SHA-256 of the presented key, so a repeated key
    /// costs a lookup rather than an argon2 run.
    argon_hits: Mutex<HashMap<[u8; 32], (String, u64)>>,
}

fn parse(provider: &str, text: &str) -> Result<Parsed, String> {
    let f: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut p = Parsed::default();
    for e in f.keys {
        if e.revoked {
            continue;
        }
        let expires_at = match &e.expires {
            Some(s) => Some(
                humantime::parse_rfc3339_weak(s)
                    .map_err(|err| {
                        format!(
                            "key `{}`: invalid `expires` `{s}`: {err} (write 2027-01-01T00:00:00Z)",
                            e.id
                        )
                    })?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            None => None,
        };
        let hash = e.hash.clone();
        let identity = Arc::new(Identity {
            provider: provider.to_string(),
            method: AuthMethod::ApiKey,
            subject: e.id.clone(),
            user: e.user.clone(),
            email: e.email.clone(),
            groups: e.groups.clone(),
            claims: match &e.plan {
                Some(plan) => {
                    serde_json::json!({ "key_id": e.id, "sub": e.user, "groups": e.groups, "plan": plan })
                }
                None => serde_json::json!({ "key_id": e.id, "sub": e.user, "groups": e.groups }),
            },
            expires_at,
        });
        let key = Arc::new(Key {
            entry: e,
            expires_at,
            identity,
        });
        if let Some(hex) = hash.strip_prefix("sha256:") {
            let bytes = decode_hex(hex).ok_or_else(|| {
                format!(
                    "key `{}`: `sha256:` must be followed by 64 hex digits",
                    key.entry.id
                )
            })?;
            p.sha.insert(bytes, key);
        } else if hash.starts_with("$argon2id$") {
            argon2::PasswordHash::new(&hash)
                .map_err(|err| format!("key `{}`: invalid argon2id hash: {err}", key.entry.id))?;
            p.argon.push(key);
        } else {
            return Err(format!(
                "key `{}`: hash must be `sha256:<hex>` or an argon2id PHC string",
                key.entry.id
            ));
        }
    }
    Ok(p)
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl KeyStore {
    pub fn open(provider: &str, path: PathBuf) -> Result<KeyStore, String> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let parsed = parse(provider, &text).map_err(|e| format!("{}: {e}", path.display()))?;
        let stamp = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(KeyStore {
            provider: provider.to_string(),
            path,
            parsed: ArcSwap::from_pointee(parsed),
            stamp: Mutex::new((stamp, Instant::now())),
            argon_hits: Mutex::new(HashMap::new()),
        })
    }

    /// Re-reads the file if it changed (checked at most once a second). A broken file keeps
    /// the previous keys.
    fn maybe_reload(&self) {
        let mut st = self.stamp.lock();
        if st.1.elapsed().as_millis() < 1000 {
            return;
        }
        st.1 = Instant::now();
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if now == st.0 {
            return;
        }
        st.0 = now;
        drop(st);
        match std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse(&self.provider, &t))
        {
            Ok(p) => {
                self.parsed.store(Arc::new(p));
                self.argon_hits.lock().clear();
                tracing::info!(provider = %self.provider, "API keys reloaded");
            }
            Err(e) => {
                tracing::error!(provider = %self.provider, error = %e, "API key file invalid; keeping the previous keys")
            }
        }
    }

    pub fn verify(&self, presented: &str) -> Result<Arc<Identity>, AuthError> {
        self.maybe_reload();
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let parsed = self.parsed.load();
        let mut found = parsed.sha.get(&digest).filter(|k| {
            // The map lookup already matched; compare again in constant time as a rule.
            let stored = decode_hex(k.entry.hash.trim_start_matches("sha256:")).unwrap_or([0; 32]);
            bool::from(stored.ct_eq(&digest))
        });
        let argon_hit;
        if found.is_none() && !parsed.argon.is_empty() {
            let cached = self.argon_hits.lock().get(&digest).cloned();
            argon_hit = match cached {
                Some((id, until)) if until > now_secs() => {
                    parsed.argon.iter().find(|k| k.entry.id == id).cloned()
                }
                _ => parsed
                    .argon
                    .iter()
                    .find(|k| verify_argon(&k.entry.hash, presented))
                    .cloned(),
            };
            if let Some(k) = &argon_hit {
                self.argon_hits
                    .lock()
                    .insert(digest, (k.entry.id.clone(), now_secs() + 300));
            }
            found = argon_hit.as_ref();
        }
        let key = found.ok_or_else(|| AuthError::new("unknown or revoked API key"))?;
        if key.expires_at.is_some_and(|e| e <= now_secs()) {
            return Err(AuthError::new(format!(
                "API key `{}` has expired",
                key.entry.id
            )));
        }
        Ok(key.identity.clone())
    }
}

fn verify_argon(hash: &str, presented: &str) -> bool {
    use argon2::PasswordVerifier;
    argon2::PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(presented.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new random key and the entry to add to the keys file. The key is shown once.
pub fn new_key(id: &str, user: &str, groups: &[String]) -> (String, String) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let key = format!("pk_{}", URL_SAFE_NO_PAD.encode(raw));
    let hash = crate::dev::hex(&Sha256::digest(key.as_bytes()));
    let entry = format!(
        "  - id: {id}\n    hash: \"sha256:{hash}\"\n    user: {user}\n    groups: [{}]\n",
        groups.join(", ")
    );
    (key, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_expire_and_reload() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys.yaml");
        let (k1, e1) = new_key("bot-1", "bot", &["ci".into()]);
        let (k2, e2) = new_key("old", "old", &[]);
        let e2 = e2 + "    expires: 2001-01-01T00:00:00Z\n";
        std::fs::write(&p, format!("keys:\n{e1}{e2}")).unwrap();
        let s = KeyStore::open("agents", p.clone()).unwrap();
        let id = s.verify(&k1).unwrap();
        assert_eq!(
            (id.user.as_str(), id.groups.as_slice()),
            ("bot", &["ci".to_string()][..])
        );
        assert!(s.verify(&k2).unwrap_err().reason.contains("expired"));
        assert!(s.verify("pk_wrong").is_err());
        // Revocation by removing the entry.
        std::fs::write(&p, "keys: []\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(s.verify(&k1).is_err());
    }

    #[test]
    fn argon2id_keys() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let h = argon2::Argon2::default()
            .hash_password(b"sekrit", &salt)
            .unwrap()
            .to_string();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys.yaml");
        std::fs::write(
            &p,
            format!("keys:\n  - {{ id: a, hash: '{h}', user: u }}\n"),
        )
        .unwrap();
        let s = KeyStore::open("agents", p).unwrap();
        assert_eq!(s.verify("sekrit").unwrap().subject, "a");
        assert_eq!(s.verify("sekrit").unwrap().subject, "a");
        assert!(s.verify("nope").is_err());
    }
}
