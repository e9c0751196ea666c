//! The verified-token cache: exact token bytes → identity, valid until the earlier of the
//! token's `exp` and a TTL, bounded in size. A hit costs one hash lookup and a comparison of
//! the stored token, not a signature check. Entries whose signing key the key set would no
//! longer pick for their token (removed, replaced under the same `kid`, or no longer the
//! only key that fits a token without one) are dropped on lookup.

use crate::Identity;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

struct Entry {
    identity: Arc<Identity>,
    expires_at: u64,
    key: Option<KeyRef>,
}

/// The key that verified a cached token: how the token named it (its `kid` and `alg`) and
/// which key it was. None for a key outside every key set (a provider's shared secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    pub kid: Option<Box<str>>,
    pub alg: jsonwebtoken::Algorithm,
    pub fingerprint: [u8; 32],
}

/// Tokens are long (often 1 KiB) and only verified ones are inserted, so a fast seeded
/// hash is safe here and costs a fraction of SipHash.
type Map = HashMap<Box<[u8]>, Entry, foldhash::fast::RandomState>;

pub struct TokenCache {
    map: RwLock<Map>,
    capacity: usize,
    /// Tokens ended before their expiry (an OIDC logout's ID token, which the logout
    /// redirect shows the browser), by [`revocation_digest`], with until when; `any` spares
    /// the lock while there are none.
    revoked: parking_lot::Mutex<HashMap<[u8; 32], u64>>,
    any: std::sync::atomic::AtomicBool,
    /// Bumped by every revocation: whoever trusts a token without asking the cache again
    /// (a connection's memo, through a `Proof`) stops at the next one.
    revocations: Arc<std::sync::atomic::AtomicU64>,
}

/// What a revocation is keyed by: the SHA-256 of the token's signing input (its header and
/// payload, the bytes before the last `.`), not of the whole token. The signature is not
/// unique: an ECDSA signature `(r, s)` has a twin `(r, n - s)` that anyone can compute
/// without the key, and would otherwise be a new token that no revocation names.
pub fn revocation_digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let signed = match token.iter().rposition(|b| *b == b'.') {
        Some(i) => &token[..i],
        None => token,
    };
    sha2::Sha256::digest(signed).into()
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            map: RwLock::new(Map::default()),
            capacity,
            revoked: parking_lot::Mutex::default(),
            any: std::sync::atomic::AtomicBool::new(false),
            revocations: Arc::default(),
        }
    }

    /// Refuses `token` from now until `until` (seconds since the epoch), cached or not, and
    /// every other token of the same header and payload (see [`revocation_digest`]).
    pub fn revoke(&self, token: &[u8], until: u64, now: u64) {
        self.revoke_digest(revocation_digest(token), until, now);
        // Any cached spelling of it: the same signing input under another signature.
        let signed = &token[..token
            .iter()
            .rposition(|b| *b == b'.')
            .unwrap_or(token.len())];
        self.map.write().retain(|t, _| {
            !(t.len() > signed.len() && t.starts_with(signed) && t[signed.len()] == b'.')
        });
    }

    /// Refuses the tokens whose [`revocation_digest`] is `digest` until `until` (a
    /// revocation read back from the embedded store; nothing of it can be cached yet).
    pub fn revoke_digest(&self, digest: [u8; 32], until: u64, now: u64) {
        let mut r = self.revoked.lock();
        r.retain(|_, u| *u > now);
        let u = r.entry(digest).or_insert(until);
        *u = (*u).max(until);
        self.any.store(true, std::sync::atomic::Ordering::Release);
        self.revocations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether `token` was revoked and is still refused at `now`.
    pub fn is_revoked(&self, token: &[u8], now: u64) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let d = revocation_digest(token);
        self.revoked.lock().get(&d).is_some_and(|u| *u > now)
    }

    /// The revocations counter, bumped by each revocation (see `jwt::Proof`).
    pub fn revocations(&self) -> &Arc<std::sync::atomic::AtomicU64> {
        &self.revocations
    }

    /// Returns the cached identity if the token is known, unexpired, and its key (checked
    /// by `key_alive`) would still be the one that verifies it.
    pub fn get(
        &self,
        token: &[u8],
        now: u64,
        key_alive: impl Fn(&KeyRef) -> bool,
    ) -> Option<Arc<Identity>> {
        self.get_until(token, now, key_alive).map(|(id, _)| id)
    }

    /// Like `get`, with the time (seconds since the epoch) at which the entry expires.
    pub fn get_until(
        &self,
        token: &[u8],
        now: u64,
        key_alive: impl Fn(&KeyRef) -> bool,
    ) -> Option<(Arc<Identity>, u64)> {
        let stale = {
            let map = self.map.read();
            let e = map.get(token)?;
            let alive = e.key.as_ref().is_none_or(&key_alive);
            if e.expires_at > now && alive {
                return Some((e.identity.clone(), e.expires_at));
            }
            true
        };
        if stale {
            self.map.write().remove(token);
        }
        None
    }

    pub fn insert(
        &self,
        token: &[u8],
        identity: Arc<Identity>,
        expires_at: u64,
        key: Option<KeyRef>,
        now: u64,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.write();
        if map.len() >= self.capacity {
            map.retain(|_, e| e.expires_at > now);
            if map.len() >= self.capacity {
                // Still full of live entries: drop an arbitrary tenth.
                let drop: Vec<Box<[u8]>> =
                    map.keys().take(self.capacity / 10 + 1).cloned().collect();
                for k in drop {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            token.into(),
            Entry {
                identity,
                expires_at,
                key,
            },
        );
    }

    /// Drops the entry for `token`, if any.
    pub fn remove(&self, token: &[u8]) {
        self.map.write().remove(token);
    }

    /// Drops every entry whose identity `gone` says to drop.
    pub fn retain_identities(&self, mut keep: impl FnMut(&crate::Identity) -> bool) {
        self.map.write().retain(|_, e| keep(&e.identity));
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;

    fn id() -> Arc<Identity> {
        Arc::new(Identity {
            provider: "p".into(),
            method: AuthMethod::Jwt,
            subject: "s".into(),
            user: "u".into(),
            email: None,
            groups: vec![],
            claims: serde_json::Value::Null,
            expires_at: None,
        })
    }

    #[test]
    fn expiry_key_loss_and_bound() {
        let c = TokenCache::new(10);
        let k1 = KeyRef {
            kid: Some("k1".into()),
            alg: jsonwebtoken::Algorithm::ES256,
            fingerprint: [1; 32],
        };
        c.insert(b"t1", id(), 100, Some(k1.clone()), 0);
        assert!(c.get(b"t1", 50, |_| true).is_some());
        assert!(
            c.get(b"t1", 50, |k| *k != k1).is_none(),
            "key gone: dropped"
        );
        assert!(c.get(b"t1", 50, |_| true).is_none());
        c.insert(b"t2", id(), 100, None, 0);
        assert!(c.get(b"t2", 100, |_| true).is_none(), "expired");
        for i in 0..50u32 {
            c.insert(&i.to_be_bytes(), id(), 1000, None, 0);
        }
        assert!(c.len() <= 10);
    }
}
