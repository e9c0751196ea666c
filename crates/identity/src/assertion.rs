//! The signed assertion sent to origins as `X-Portcullis-Assertion`: a short-lived ES256 JWT
//! whose `aud` is the route, carrying `sub`, `email`, `groups`, `iss` and `jti`. Signing keys
//! are generated in memory and rotate; the current and previous public keys are published at
//! `/.well-known/portcullis/jwks.json` so origins can verify across a rotation.

use crate::dev::{self, DevKey};
use crate::Identity;
use jsonwebtoken::{Algorithm, Header};
use parking_lot::RwLock;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Signer {
    issuer: String,
    ttl: Duration,
    rotate_every: Duration,
    /// Newest first: the first signs; all are published.
    keys: RwLock<Vec<(Arc<DevKey>, Instant)>>,
}

impl Signer {
    pub fn new(issuer: String, ttl: Duration, rotate_every: Duration) -> Result<Signer, String> {
        let (_, k) = dev::generate()?;
        Ok(Signer {
            issuer,
            ttl,
            rotate_every,
            keys: RwLock::new(vec![(Arc::new(k), Instant::now())]),
        })
    }

    /// Rotates when the newest key is older than the period; keeps one previous key.
    pub fn maybe_rotate(&self) {
        let due = self
            .keys
            .read()
            .first()
            .is_none_or(|(_, t)| t.elapsed() >= self.rotate_every);
        if due {
            if let Ok((_, k)) = dev::generate() {
                let mut keys = self.keys.write();
                keys.insert(0, (Arc::new(k), Instant::now()));
                keys.truncate(2);
                tracing::info!("assertion signing key rotated");
            }
        }
    }

    pub fn sign(&self, id: &Identity, route: &str) -> Result<String, String> {
        let key = self
            .keys
            .read()
            .first()
            .map(|(k, _)| k.clone())
            .ok_or("no signing key")?;
        let now = crate::now_secs();
        let claims = json!({
            "iss": self.issuer,
            "aud": route,
            "sub": id.subject,
            "user": id.user,
            "email": id.email,
            "groups": id.groups,
            "provider": id.provider,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl.as_secs().max(1),
            "jti": uuid::Uuid::new_v4().simple().to_string(),
        });
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(key.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, &claims, &key.encoding).map_err(|e| e.to_string())
    }

    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .keys
            .read()
            .iter()
            .map(|(k, _)| k.jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    pub fn spawn_rotation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30).min(me.rotate_every)).await;
                me.maybe_rotate();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::KeySet;
    use crate::AuthMethod;

    #[test]
    fn assertions_verify_against_the_published_keys_across_rotation() {
        let s = Signer::new("portcullis".into(), Duration::from_secs(60), Duration::ZERO).unwrap();
        let id = Identity {
            provider: "dev".into(),
            method: AuthMethod::Jwt,
            subject: "alice".into(),
            user: "alice".into(),
            email: Some("a@x".into()),
            groups: vec!["eng".into()],
            claims: json!({}),
            expires_at: None,
        };
        let t = s.sign(&id, "default/r").unwrap();
        s.maybe_rotate();
        let set = KeySet::parse(&s.jwks()).unwrap();
        assert_eq!(set.len(), 2);
        let h = jsonwebtoken::decode_header(&t).unwrap();
        let k = set.get(h.kid.as_deref(), Algorithm::ES256).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
        v.set_audience(&["default/r"]);
        v.set_issuer(&["portcullis"]);
        let d = jsonwebtoken::decode::<serde_json::Value>(&t, &k.decoding, &v).unwrap();
        assert_eq!(d.claims["sub"], "alice");
        assert_eq!(d.claims["groups"][0], "eng");
    }
}
