//! Browser sessions and the short-lived pre-auth state of a login, both kept in cookies
//! sealed with AES-256-GCM (authenticated encryption: a changed byte fails to open). Keys
//! rotate: the first configured key seals, every configured key opens. A session too large
//! for one cookie is kept server-side (in memory) and the cookie holds only its sealed id.
//! The identities of recently opened session cookies are cached by the exact cookie bytes
//! (see [`Store::cached`]).

use crate::cache::TokenCache;
use crate::Identity;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

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
    /// When the login that opened it happened (seconds since the epoch; kept across
    /// refreshes). A session issued before its principal's sessions were revoked does not
    /// open. 0 in sessions sealed before this field existed.
    #[serde(default)]
    pub issued_at: u64,
    /// The session's id: made at login and kept across refreshes, so that a logout ends
    /// every cookie the session had (one from before a refresh, too). Empty in sessions
    /// sealed before this field existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sid: String,
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

/// The key a cookie is revoked under.
fn digest(cookie: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(cookie.trim().as_bytes()).into()
}

/// A SHA-256 digest from its base64url text ([`Ended::key`]).
pub(crate) fn decode_digest(key: &str) -> Option<[u8; 32]> {
    URL_SAFE_NO_PAD.decode(key).ok()?.try_into().ok()
}

/// A credential a logout ended before its expiry, as the embedded store keeps it so that
/// the end survives restarts and reloads: a session by its id ([`Ended::SID`]), a sealed
/// cookie ([`Ended::COOKIE`]) by the base64url SHA-256 of its value, or an ID token
/// (`id_token/<provider>`) by that of its signing input
/// ([`revocation_digest`](crate::cache::revocation_digest)); never the value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub kind: String,
    pub key: String,
    /// When it would have expired anyway (seconds since the epoch).
    pub until: u64,
}

impl Ended {
    pub const SID: &'static str = "sid";
    pub const COOKIE: &'static str = "cookie";
    /// The prefix of an ID token's kind, before its provider's name.
    pub const ID_TOKEN: &'static str = "id_token/";
}

/// Session cookies whose identity is cached at most.
const CACHE_SIZE: usize = 4096;
/// The longest an opened session's identity is served from the cache.
const CACHE_TTL: u64 = 300;

pub struct Store {
    server_side: Mutex<HashMap<String, Session>>,
    /// Identities of sessions opened recently, by the exact cookie bytes: a browser's next
    /// requests cost a hash lookup instead of a decryption and a JSON parse, and they share
    /// one `Arc<Identity>`, which the policy decision cache is keyed by. Only cookies that
    /// opened (authenticated decryption) and had not expired are cached.
    cache: TokenCache,
    /// Sessions ended by logout, by the SHA-256 of their cookie, with the time they would
    /// have expired: a copy of a logged-out cookie no longer opens. In memory, like
    /// server-side sessions: a restart, or another instance, does not know them.
    revoked: Mutex<HashMap<[u8; 32], u64>>,
    /// Principals (`provider/subject`) whose sessions were revoked, with when: a session
    /// issued at or before that does not open. Loaded from the embedded store by the proxy.
    revoked_principals: Mutex<HashMap<String, u64>>,
    /// Sessions ended by logout, by id ([`Session::sid`]), with when they would have
    /// expired: every cookie of such a session, refreshed or not, no longer opens.
    revoked_sids: Mutex<HashMap<String, u64>>,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            server_side: Mutex::default(),
            cache: TokenCache::new(CACHE_SIZE),
            revoked: Mutex::default(),
            revoked_principals: Mutex::default(),
            revoked_sids: Mutex::default(),
        }
    }
}

/// How a session's principal is named for revocation: `provider/subject`.
pub fn principal_of(identity: &Identity) -> String {
    format!("{}/{}", identity.provider, identity.subject)
}

impl Store {
    /// A new store (for new session settings: other keys, another lifetime) that keeps
    /// `prev`'s revocations, so that a reload does not let logged-out or revoked sessions
    /// open again.
    pub fn inheriting(prev: &Store) -> Store {
        let s = Store::default();
        *s.revoked.lock() = prev.revoked.lock().clone();
        *s.revoked_principals.lock() = prev.revoked_principals.lock().clone();
        *s.revoked_sids.lock() = prev.revoked_sids.lock().clone();
        s
    }

    /// The identity of a session cookie opened recently, while its session needs no refresh.
    pub fn cached(&self, cookie: &str) -> Option<Arc<Identity>> {
        self.cache
            .get(cookie.as_bytes(), crate::now_secs(), |_| true)
    }

    /// Caches the identity of an opened session cookie until `until` (seconds since the
    /// epoch: the session's expiry, or when its tokens need a refresh), and for at most
    /// CACHE_TTL.
    pub fn remember(&self, cookie: &str, identity: Arc<Identity>, until: u64) {
        let now = crate::now_secs();
        let until = until.min(now + CACHE_TTL);
        // Under the lock `end` takes, so that a request that opened the cookie just before
        // its logout cannot put it back in the cache just after.
        let revoked = self.revoked.lock();
        if until > now && (revoked.is_empty() || !revoked.contains_key(&digest(cookie))) {
            self.cache
                .insert(cookie.as_bytes(), identity, until, None, now);
        }
    }

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

    /// Revokes every session of `principal` (`provider/subject`) issued at or before `at`
    /// (seconds since the epoch): they no longer open, here or after a refresh.
    pub fn revoke_principal(&self, principal: &str, at: u64) {
        {
            let mut r = self.revoked_principals.lock();
            let e = r.entry(principal.to_string()).or_insert(at);
            *e = (*e).max(at);
        }
        self.cache
            .retain_identities(|id| principal_of(id) != principal);
        self.server_side
            .lock()
            .retain(|_, s| principal_of(&s.identity) != principal || s.issued_at > at);
    }

    /// Every principal revocation, to carry into a new store.
    pub fn principal_revocations(&self) -> Vec<(String, u64)> {
        let r = self.revoked_principals.lock();
        r.iter().map(|(p, t)| (p.clone(), *t)).collect()
    }

    pub fn decode(&self, sealer: &Sealer, cookie: &str) -> Option<Session> {
        let s = match sealer.open::<CookieBody>("session", cookie)? {
            CookieBody::Inline(s) => *s,
            CookieBody::Ref { r#ref } => self.server_side.lock().get(&r#ref)?.clone(),
        };
        if s.expires_at <= crate::now_secs() {
            return None;
        }
        {
            let r = self.revoked_principals.lock();
            if !r.is_empty()
                && r.get(&principal_of(&s.identity))
                    .is_some_and(|at| s.issued_at <= *at)
            {
                return None;
            }
        }
        let revoked = self.revoked.lock();
        if !revoked.is_empty() && revoked.contains_key(&digest(cookie)) {
            return None;
        }
        drop(revoked);
        if !s.sid.is_empty() {
            let sids = self.revoked_sids.lock();
            if !sids.is_empty() && sids.contains_key(&s.sid) {
                return None;
            }
        }
        Some(s)
    }

    /// Ends `session` (opened from `cookie`) at logout: `cookie` as [`Store::end`] does, and
    /// every other cookie of the session (from before a refresh) by its id, until it would
    /// have expired. Cached identities of its principal are dropped, so that such a cookie
    /// is opened (and refused) again. Returns what was ended, for the embedded store.
    pub fn end_session(&self, sealer: &Sealer, cookie: &str, session: &Session) -> Vec<Ended> {
        let mut out = Vec::with_capacity(2);
        if !session.sid.is_empty() {
            let sid = Ended {
                kind: Ended::SID.into(),
                key: session.sid.clone(),
                until: session.expires_at,
            };
            self.restore(&sid);
            out.push(sid);
        }
        let principal = principal_of(&session.identity);
        self.cache
            .retain_identities(|id| principal_of(id) != principal);
        out.extend(self.end(sealer, cookie, session.expires_at));
        out
    }

    /// Ends the session of `cookie` at logout: forgets it, and refuses the cookie from now
    /// until `expires_at`, the session's expiry, so that a copy of it no longer opens.
    /// Returns what was ended, for the embedded store.
    pub fn end(&self, sealer: &Sealer, cookie: &str, expires_at: u64) -> Option<Ended> {
        let ended = Ended {
            kind: Ended::COOKIE.into(),
            key: URL_SAFE_NO_PAD.encode(digest(cookie)),
            until: expires_at,
        };
        self.restore(&ended);
        self.cache.remove(cookie.as_bytes());
        self.forget(sealer, cookie);
        (expires_at > crate::now_secs()).then_some(ended)
    }

    /// Refuses again what a logout ended (read back from the embedded store after a restart
    /// or a reload): a session by its id, a cookie by its digest. Other kinds (an ID token)
    /// are the engine's; see [`crate::Engine::restore_ended`].
    pub fn restore(&self, e: &Ended) {
        let now = crate::now_secs();
        if e.until <= now {
            return;
        }
        match e.kind.as_str() {
            Ended::SID => {
                let mut sids = self.revoked_sids.lock();
                sids.retain(|_, until| *until > now);
                sids.insert(e.key.clone(), e.until);
            }
            Ended::COOKIE => {
                let Some(d) = decode_digest(&e.key) else {
                    return;
                };
                let mut revoked = self.revoked.lock();
                revoked.retain(|_, until| *until > now);
                let u = revoked.entry(d).or_insert(e.until);
                *u = (*u).max(e.until);
            }
            _ => {}
        }
    }

    /// Whether `cookie` was ended with [`Store::end`] and has not expired since (for other
    /// sealed grants than sessions, such as the console's token grants, which are ended the
    /// same way at sign-out).
    pub fn is_ended(&self, cookie: &str) -> bool {
        let revoked = self.revoked.lock();
        !revoked.is_empty()
            && revoked
                .get(&digest(cookie))
                .is_some_and(|until| *until > crate::now_secs())
    }

    /// Ends the session of `cookie`: its cached identity, and its server-side state.
    pub fn forget(&self, sealer: &Sealer, cookie: &str) {
        self.cache.remove(cookie.as_bytes());
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
            issued_at: crate::now_secs(),
            sid: "sid-1".into(),
        }
    }

    /// A logout ends the session, not only the cookie it was made with: a copy from before
    /// a refresh (another cookie of the same session, cached or not) no longer opens, and
    /// neither does any after a reload with new session settings (a store that inherits the
    /// revocations). Another session of the same person still opens.
    #[test]
    fn a_logout_ends_every_cookie_of_the_session_across_reloads() {
        let sealer = Sealer::new(&[[5; 32]]).unwrap();
        let store = Store::default();
        let mut s = session(serde_json::json!({}));
        s.expires_at = crate::now_secs() + 3600;
        let before_refresh = store.encode(&sealer, &s).unwrap();
        store.remember(&before_refresh, Arc::new(s.identity.clone()), s.expires_at);
        let mut refreshed = s.clone();
        refreshed.access_token = Some("new".into());
        let after_refresh = store.encode(&sealer, &refreshed).unwrap();
        let mut other = s.clone();
        other.sid = "sid-2".into();
        let other_cookie = store.encode(&sealer, &other).unwrap();

        store.end_session(&sealer, &after_refresh, &refreshed);
        assert!(store.decode(&sealer, &after_refresh).is_none());
        assert!(store.cached(&before_refresh).is_none(), "out of the cache");
        assert!(
            store.decode(&sealer, &before_refresh).is_none(),
            "the copy from before the refresh"
        );
        assert!(
            store.decode(&sealer, &other_cookie).is_some(),
            "another session"
        );

        let reloaded = Store::inheriting(&store);
        assert!(reloaded.decode(&sealer, &before_refresh).is_none());
        assert!(reloaded.decode(&sealer, &after_refresh).is_none());
        assert!(reloaded.decode(&sealer, &other_cookie).is_some());
    }

    /// What a logout returns is enough for a new store (after a restart: nothing inherited)
    /// to refuse every cookie of the session again; nothing of it is a cookie's value.
    #[test]
    fn what_a_logout_ended_is_refused_again_by_a_new_store() {
        let sealer = Sealer::new(&[[6; 32]]).unwrap();
        let store = Store::default();
        let mut s = session(serde_json::json!({}));
        s.expires_at = crate::now_secs() + 3600;
        let before_refresh = store.encode(&sealer, &s).unwrap();
        let after_refresh = store.encode(&sealer, &s).unwrap();
        let mut no_sid = s.clone();
        no_sid.sid = String::new();
        let old_style = store.encode(&sealer, &no_sid).unwrap();

        let ended = store.end_session(&sealer, &after_refresh, &s);
        let kinds: Vec<_> = ended.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, [Ended::SID, Ended::COOKIE]);
        assert!(ended.iter().all(|e| e.until == s.expires_at));
        assert!(!ended.iter().any(|e| e.key.contains(&after_refresh)));
        let ended_old = store.end_session(&sealer, &old_style, &no_sid);

        let restarted = Store::default();
        assert!(restarted.decode(&sealer, &before_refresh).is_some());
        for e in ended.iter().chain(&ended_old) {
            restarted.restore(e);
        }
        assert!(restarted.decode(&sealer, &before_refresh).is_none());
        assert!(restarted.decode(&sealer, &after_refresh).is_none());
        assert!(
            restarted.decode(&sealer, &old_style).is_none(),
            "a session without an id, by its cookie"
        );
        // An end that has expired is not restored (nor returned).
        let mut past = ended[0].clone();
        past.key = "other".into();
        past.until = crate::now_secs() - 1;
        restarted.restore(&past);
        assert!(!restarted.revoked_sids.lock().contains_key("other"));
    }

    #[test]
    fn a_principals_sessions_issued_before_its_revocation_no_longer_open() {
        let sealer = Sealer::new(&[[3; 32]]).unwrap();
        let store = Store::default();
        let s = session(serde_json::json!({}));
        let c = store.encode(&sealer, &s).unwrap();
        let opened = store.decode(&sealer, &c).unwrap();
        store.remember(&c, Arc::new(opened.identity), crate::now_secs() + 60);
        assert!(store.cached(&c).is_some());
        store.revoke_principal("corp/s", s.issued_at);
        assert!(store.cached(&c).is_none(), "its cached identity is dropped");
        assert!(
            store.decode(&sealer, &c).is_none(),
            "the cookie no longer opens"
        );
        // Another principal, and a login after the revocation, still open.
        let mut other = session(serde_json::json!({}));
        other.identity.subject = "t".into();
        assert!(store
            .decode(&sealer, &store.encode(&sealer, &other).unwrap())
            .is_some());
        let mut later = session(serde_json::json!({}));
        later.issued_at = s.issued_at + 1;
        assert!(store
            .decode(&sealer, &store.encode(&sealer, &later).unwrap())
            .is_some());
        assert_eq!(
            store.principal_revocations(),
            vec![("corp/s".to_string(), s.issued_at)]
        );
    }

    #[test]
    fn opened_sessions_are_cached_until_due_and_forgotten_at_logout() {
        let sealer = Sealer::new(&[[3; 32]]).unwrap();
        let store = Store::default();
        // A session too large for a cookie (kept server-side) and an inline one.
        let big = session(serde_json::json!({ "pad": "x".repeat(5000) }));
        for s in [session(serde_json::json!({})), big] {
            let c = store.encode(&sealer, &s).unwrap();
            assert!(
                store.cached(&c).is_none(),
                "nothing cached before it is opened"
            );
            let now = crate::now_secs();
            let id = Arc::new(store.decode(&sealer, &c).unwrap().identity);
            store.remember(&c, id.clone(), now + 100);
            let hit = store.cached(&c).expect("cached");
            assert!(Arc::ptr_eq(&hit, &id), "one shared identity");
            assert!(store.cached(&format!("{c}A")).is_none(), "exact bytes only");
            store.forget(&sealer, &c);
            assert!(store.cached(&c).is_none(), "logout drops it");
            // Due for a refresh (or expired) now: not served from the cache.
            store.remember(&c, id, now);
            assert!(store.cached(&c).is_none());
        }
    }

    #[test]
    fn a_logged_out_cookie_no_longer_opens() {
        let sealer = Sealer::new(&[[4; 32]]).unwrap();
        let store = Store::default();
        let mut s = session(serde_json::json!({}));
        s.expires_at = crate::now_secs() + 3600;
        let ended = store.encode(&sealer, &s).unwrap();
        let other = store.encode(&sealer, &s).unwrap();
        assert_ne!(ended, other, "a fresh nonce per cookie");
        store.remember(&ended, Arc::new(s.identity.clone()), s.expires_at);
        store.end(&sealer, &ended, s.expires_at);
        assert!(store.decode(&sealer, &ended).is_none(), "revoked");
        assert!(store.cached(&ended).is_none(), "and out of the cache");
        // A request that opened it just before the logout cannot cache it again.
        store.remember(&ended, Arc::new(s.identity.clone()), s.expires_at);
        assert!(store.cached(&ended).is_none());
        assert!(store.decode(&sealer, &format!(" {ended} ")).is_none());
        assert!(
            store.decode(&sealer, &other).is_some(),
            "other sessions still open"
        );
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
