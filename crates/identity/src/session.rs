//! Browser sessions and the short-lived pre-auth state of a login, both kept in cookies
//! sealed with AES-256-GCM (authenticated encryption: a changed byte fails to open). Keys
//! rotate: the first configured key seals, every configured key opens. A session too large
//! for one cookie is kept server-side (in memory) and the cookie holds only its sealed id.

use crate::Identity;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;

pub struct Sealer {
    ciphers: Vec<Aes256Gcm>,
}

impl Sealer {
    pub fn new(keys: &[[u8; 32]]) -> Option<Sealer> {
        if keys.is_empty() {
            return None;
        }
        Some(Sealer {
            ciphers: keys.iter().map(|k| Aes256Gcm::new(k.into())).collect(),
        })
    }

    /// `purpose` is bound as associated data, so a pre-auth cookie can never be replayed as
    /// a session cookie or the other way round.
    pub fn seal<T: Serialize>(&self, purpose: &str, value: &T) -> Option<String> {
        let plain = serde_json::to_vec(value).ok()?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self.ciphers[0]
            .encrypt(
                Nonce::from_slice(&nonce),
                aes_gcm::aead::Payload {
                    msg: &plain,
                    aad: purpose.as_bytes(),
                },
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Some(URL_SAFE_NO_PAD.encode(out))
    }

    pub fn open<T: DeserializeOwned>(&self, purpose: &str, sealed: &str) -> Option<T> {
        let raw = URL_SAFE_NO_PAD.decode(sealed.trim()).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        self.ciphers.iter().find_map(|c| {
            let plain = c
                .decrypt(
                    Nonce::from_slice(nonce),
                    aes_gcm::aead::Payload {
                        msg: ct,
                        aad: purpose.as_bytes(),
                    },
                )
                .ok()?;
            serde_json::from_slice(&plain).ok()
        })
    }
}

/// What a login leaves in the browser.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Session {
    pub identity: Identity,
    /// Seconds since the epoch.
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// When the tokens behind this session expire and a refresh is due.
    #[serde(default)]
    pub tokens_expire_at: u64,
}

/// The state of a login between the redirect to the IdP and the callback.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PreAuth {
    pub provider: String,
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub return_to: String,
    pub redirect_uri: String,
    pub expires_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CookieBody {
    Ref { r#ref: String },
    Inline(Box<Session>),
}

/// Cookies larger than this are kept server-side.
const MAX_COOKIE: usize = 3800;

#[derive(Default)]
pub struct Store {
    server_side: Mutex<HashMap<String, Session>>,
}

impl Store {
    pub fn encode(&self, sealer: &Sealer, s: &Session) -> Option<String> {
        let inline = sealer.seal("session", &CookieBody::Inline(Box::new(s.clone())))?;
        if inline.len() <= MAX_COOKIE {
            return Some(inline);
        }
        let mut id = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        let id = URL_SAFE_NO_PAD.encode(id);
        let mut m = self.server_side.lock();
        let now = crate::now_secs();
        m.retain(|_, v| v.expires_at > now);
        m.insert(id.clone(), s.clone());
        sealer.seal("session", &CookieBody::Ref { r#ref: id })
    }

    pub fn decode(&self, sealer: &Sealer, cookie: &str) -> Option<Session> {
        let s = match sealer.open::<CookieBody>("session", cookie)? {
            CookieBody::Inline(s) => *s,
            CookieBody::Ref { r#ref } => self.server_side.lock().get(&r#ref)?.clone(),
        };
        (s.expires_at > crate::now_secs()).then_some(s)
    }

    pub fn forget(&self, sealer: &Sealer, cookie: &str) {
        if let Some(CookieBody::Ref { r#ref }) = sealer.open::<CookieBody>("session", cookie) {
            self.server_side.lock().remove(&r#ref);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;

    fn session(claims: serde_json::Value) -> Session {
        Session {
            identity: Identity {
                provider: "corp".into(),
                method: AuthMethod::Session,
                subject: "s".into(),
                user: "alice".into(),
                email: None,
                groups: vec![],
                claims,
                expires_at: None,
            },
            expires_at: crate::now_secs() + 60,
            refresh_token: Some("r".into()),
            id_token: None,
            access_token: None,
            tokens_expire_at: 0,
        }
    }

    #[test]
    fn tamper_rotation_and_purpose() {
        let old = Sealer::new(&[[1; 32]]).unwrap();
        let both = Sealer::new(&[[2; 32], [1; 32]]).unwrap();
        let new_only = Sealer::new(&[[2; 32]]).unwrap();
        let store = Store::default();
        let c = store.encode(&old, &session(serde_json::json!({}))).unwrap();
        assert_eq!(
            store.decode(&both, &c).unwrap().identity.user,
            "alice",
            "old key still opens"
        );
        assert!(
            store.decode(&new_only, &c).is_none(),
            "retired key no longer opens"
        );
        let mut bytes = URL_SAFE_NO_PAD.decode(&c).unwrap();
        bytes[20] ^= 1;
        assert!(
            store
                .decode(&both, &URL_SAFE_NO_PAD.encode(bytes))
                .is_none(),
            "tampered"
        );
        let pre = old.seal("preauth", &"x").unwrap();
        assert!(
            old.open::<CookieBody>("session", &pre).is_none(),
            "purpose is bound"
        );
    }

    #[test]
    fn large_sessions_live_server_side() {
        let k = Sealer::new(&[[3; 32]]).unwrap();
        let store = Store::default();
        let big = serde_json::json!({ "blob": "x".repeat(10_000) });
        let c = store.encode(&k, &session(big)).unwrap();
        assert!(c.len() < 400);
        assert_eq!(
            store.decode(&k, &c).unwrap().identity.claims["blob"]
                .as_str()
                .unwrap()
                .len(),
            10_000
        );
        store.forget(&k, &c);
        assert!(store.decode(&k, &c).is_none());
    }
}
