//! The browser login for `oidc` providers with a client id and secret: the authorization
//! code flow with PKCE (S256). `state` and `nonce` are bound to a short-lived sealed pre-auth
//! cookie; the callback (`/.portcullis/callback`) checks both, exchanges the code, validates
//! the ID token with the same JWT validator as bearer tokens (audience = client id), and
//! creates the session. Sessions are refreshed with the refresh token before they expire, and
//! logout goes through the IdP's `end_session_endpoint` when it has one.
//!
//! A refresh is single-flight per session state (its tokens), and its result is reused for a
//! short grace period: a browser sends several requests at once with the same cookie, and an
//! IdP that rotates refresh tokens revokes the whole grant when a spent one is used again.
//!
//! Written on reqwest rather than the openidconnect crate so that ID tokens go through
//! portcullis's own validator (algorithm allow-list, unknown-kid refetch, key cache) instead
//! of a second, differently configured one.

use crate::jwt::Validator;
use crate::session::{PreAuth, Session};
use crate::{now_secs, AuthError, AuthMethod};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// How long a successful refresh is handed to other requests that present the same session
/// state (the same, now spent, tokens), such as requests already in flight with the old
/// cookie. A refreshed session has new tokens, so it never reuses this: its own next refresh
/// goes to the IdP and sees a revocation.
const REFRESH_GRACE: Duration = Duration::from_secs(30);

/// A session is refreshed when its tokens expire within this many seconds.
const REFRESH_AHEAD: u64 = 60;

type RefreshCell = Arc<tokio::sync::OnceCell<Result<Session, AuthError>>>;

pub struct OidcClient {
    pub provider: String,
    pub client_id: String,
    client_secret: String,
    pub scopes: Vec<String>,
    pub redirect_url: Option<String>,
    /// Validates ID tokens: same keys as the provider, audience = client id.
    pub id_tokens: Arc<Validator>,
    pub session_ttl: Duration,
    http: reqwest::Client,
    /// Refreshes in flight or recently done, by SHA-256 of the session's tokens.
    refreshes: Mutex<HashMap<[u8; 32], (Instant, RefreshCell)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
}

fn random() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// Only a same-origin relative path may be returned to after login (no open redirect).
pub fn safe_return_to(s: &str) -> String {
    let ok = s.starts_with('/')
        && !s.starts_with("//")
        && !s.starts_with("/\\")
        && !s.chars().any(|c| c.is_control() || c == '\\')
        && s.len() <= 2048;
    if !ok {
        return "/".to_string();
    }
    // A `Location` is an ASCII URI reference: bytes beyond ASCII (a decoded `rd`) and spaces
    // are written percent-encoded.
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii() && b != b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl OidcClient {
    pub fn new(
        provider: &str,
        client_id: String,
        client_secret: String,
        scopes: Vec<String>,
        redirect_url: Option<String>,
        id_tokens: Arc<Validator>,
        session_ttl: Duration,
    ) -> Self {
        OidcClient {
            provider: provider.to_string(),
            client_id,
            client_secret,
            scopes,
            redirect_url,
            id_tokens,
            session_ttl,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            refreshes: Mutex::new(HashMap::new()),
        }
    }

    fn discovery(&self) -> Result<crate::jwks::Discovery, AuthError> {
        (**self.id_tokens.keys.discovery.load())
            .clone()
            .ok_or_else(|| {
                AuthError::new(format!(
                    "provider `{}` has not been discovered yet",
                    self.provider
                ))
            })
    }

    /// The IdP URL to send the browser to, and the pre-auth state to seal into a cookie.
    pub fn start_login(
        &self,
        redirect_uri: &str,
        return_to: &str,
    ) -> Result<(String, PreAuth), AuthError> {
        let d = self.discovery()?;
        let endpoint = d
            .authorization_endpoint
            .ok_or_else(|| AuthError::new("the provider advertises no authorization_endpoint"))?;
        let pre = PreAuth {
            provider: self.provider.clone(),
            state: random(),
            nonce: random(),
            verifier: random(),
            return_to: safe_return_to(return_to),
            redirect_uri: redirect_uri.to_string(),
            expires_at: now_secs() + 600,
        };
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pre.verifier.as_bytes()));
        let mut url = reqwest::Url::parse(&endpoint)
            .map_err(|e| AuthError::new(format!("bad authorization_endpoint: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &self.scopes.join(" "))
            .append_pair("state", &pre.state)
            .append_pair("nonce", &pre.nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok((url.to_string(), pre))
    }

    /// Completes a login from the callback's `code` and `state`.
    /// `iss` is the authorization response's, when it has one (RFC 9207).
    pub async fn finish_login(
        &self,
        pre: &PreAuth,
        code: &str,
        state: &str,
        iss: Option<&str>,
    ) -> Result<Session, AuthError> {
        if pre.expires_at < now_secs() {
            return Err(AuthError::new("login took too long: start again"));
        }
        if !bool::from(pre.state.as_bytes().ct_eq(state.as_bytes())) {
            return Err(AuthError::new("login state does not match (possible CSRF)"));
        }
        self.same_issuer(iss)?;
        let tokens = self
            .token_request(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &pre.redirect_uri),
                ("code_verifier", &pre.verifier),
            ])
            .await?;
        let id_token = tokens
            .id_token
            .clone()
            .ok_or_else(|| AuthError::new("the provider returned no id_token"))?;
        let ident = self.id_tokens.validate(&id_token).await?;
        authorized_party(&self.client_id, &ident)?;
        let nonce = ident
            .claims
            .get("nonce")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !bool::from(nonce.as_bytes().ct_eq(pre.nonce.as_bytes())) {
            return Err(AuthError::new(
                "ID token nonce does not match (possible replay)",
            ));
        }
        Ok(self.session_from(tokens, Arc::unwrap_or_clone(ident), None))
    }

    /// The authorization response must come from the provider the login started with: every
    /// provider answers at the one callback, so a code that another provider issued (a
    /// mix-up, which a malicious provider of another route can cause) would otherwise be sent,
    /// with the login's PKCE verifier, to this provider's token endpoint. A response that
    /// names another issuer is refused; one that names none is refused when the provider
    /// says it always names itself (RFC 9207).
    fn same_issuer(&self, iss: Option<&str>) -> Result<(), AuthError> {
        match iss {
            Some(i) if i != self.id_tokens.issuer => Err(AuthError::new(format!(
                "the authorization response comes from issuer `{}`, not from `{}` where this login started (a mix-up of providers): start again",
                i.escape_debug(),
                self.id_tokens.issuer
            ))),
            None if self.discovery()?.authorization_response_iss_parameter_supported => {
                Err(AuthError::new(
                    "the authorization response does not name its issuer (`iss`), which this provider always does: start again",
                ))
            }
            _ => Ok(()),
        }
    }

    fn session_from(
        &self,
        t: TokenResponse,
        mut identity: crate::Identity,
        previous: Option<&Session>,
    ) -> Session {
        identity.method = AuthMethod::Session;
        let now = now_secs();
        let tokens_expire_at = t
            .expires_in
            .map(|e| now + e)
            .or(identity.expires_at)
            .unwrap_or(now + 300);
        Session {
            expires_at: previous.map_or(now + self.session_ttl.as_secs(), |p| p.expires_at),
            refresh_token: t
                .refresh_token
                .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
            id_token: t
                .id_token
                .or_else(|| previous.and_then(|p| p.id_token.clone())),
            access_token: t.access_token,
            tokens_expire_at,
            issued_at: previous.map_or(now, |p| p.issued_at),
            sid: previous.map_or_else(random, |p| p.sid.clone()),
            identity,
        }
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<TokenResponse, AuthError> {
        let d = self.discovery()?;
        let endpoint = d
            .token_endpoint
            .ok_or_else(|| AuthError::new("the provider advertises no token_endpoint"))?;
        let resp = self
            .http
            .post(&endpoint)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(form)
            .send()
            .await
            .map_err(|e| AuthError::new(format!("token endpoint unreachable: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let err = crate::jwks::read_json::<serde_json::Value>(resp)
                .await
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_default();
            return Err(AuthError::new(format!(
                "token endpoint refused ({status}): {err}"
            )));
        }
        crate::jwks::read_json(resp)
            .await
            .map_err(|e| AuthError::new(format!("token endpoint answered badly: {e}")))
    }

    /// Does this session need its tokens refreshed now?
    pub fn needs_refresh(&self, s: &Session) -> bool {
        s.tokens_expire_at <= now_secs() + REFRESH_AHEAD
    }

    /// When `needs_refresh` becomes true for `s` (seconds since the epoch).
    pub fn refresh_due(&self, s: &Session) -> u64 {
        s.tokens_expire_at.saturating_sub(REFRESH_AHEAD)
    }

    /// Refreshes the session's tokens. Without a refresh token an expired session ends.
    /// Concurrent refreshes of one session state share one token request, and its result
    /// is reused for REFRESH_GRACE: a success (requests in flight with the old cookie), and
    /// a failure too, so that a client replaying a cookie whose refresh the provider refused
    /// (a spent refresh token, a revoked grant, the provider down) makes the token endpoint
    /// be asked once per REFRESH_GRACE, not once per request.
    pub async fn refresh(&self, s: &Session) -> Result<Session, AuthError> {
        let rt = s
            .refresh_token
            .clone()
            .ok_or_else(|| AuthError::new("session expired and cannot be refreshed"))?;
        let mut h = Sha256::new();
        for part in [Some(&rt), s.access_token.as_ref(), s.id_token.as_ref()] {
            h.update(part.map_or("", |p| p.as_str()).as_bytes());
            h.update([0]);
        }
        h.update(s.tokens_expire_at.to_be_bytes());
        let key: [u8; 32] = h.finalize().into();
        let cell = {
            let mut m = self.refreshes.lock();
            m.retain(|_, (at, _)| at.elapsed() < REFRESH_GRACE);
            m.entry(key)
                .or_insert_with(|| (Instant::now(), Arc::default()))
                .1
                .clone()
        };
        cell.get_or_init(|| self.refresh_now(s, &rt)).await.clone()
    }

    async fn refresh_now(&self, s: &Session, rt: &str) -> Result<Session, AuthError> {
        let t = self
            .token_request(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
            .await?;
        let identity = match &t.id_token {
            Some(id) => {
                let fresh = self.id_tokens.validate(id).await?;
                authorized_party(&self.client_id, &fresh)?;
                if fresh.subject != s.identity.subject {
                    return Err(AuthError::new("refreshed ID token is for another subject"));
                }
                Arc::unwrap_or_clone(fresh)
            }
            None => s.identity.clone(),
        };
        Ok(self.session_from(t, identity, Some(s)))
    }

    /// Where to send the browser to end the IdP session too, when the IdP supports it.
    pub fn logout_url(&self, s: Option<&Session>, post_logout: &str) -> Option<String> {
        let d = self.discovery().ok()?;
        let mut url = reqwest::Url::parse(d.end_session_endpoint.as_deref()?).ok()?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.client_id);
            q.append_pair("post_logout_redirect_uri", post_logout);
            if let Some(id) = s.and_then(|s| s.id_token.as_deref()) {
                q.append_pair("id_token_hint", id);
            }
        }
        Some(url.to_string())
    }
}

/// An ID token issued to another client is not this login's, even when its `aud` names
/// `client_id` among others: its `azp` (the party it was issued to), when present, must be
/// `client_id` (OpenID Connect Core §3.1.3.7).
fn authorized_party(client_id: &str, ident: &crate::Identity) -> Result<(), AuthError> {
    match ident.claims.get("azp") {
        None => Ok(()),
        Some(serde_json::Value::String(a)) if a == client_id => Ok(()),
        Some(other) => Err(AuthError::new(format!(
            "the ID token was issued to another client (azp {other}), not to `{client_id}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_token_of_another_authorized_party_is_refused() {
        let with = |claims: serde_json::Value| crate::Identity {
            provider: "corp".into(),
            method: AuthMethod::Session,
            subject: "s".into(),
            user: "alice".into(),
            email: None,
            groups: vec![],
            claims,
            expires_at: None,
        };
        let ok = |c| authorized_party("web", &with(c)).is_ok();
        assert!(ok(
            serde_json::json!({ "aud": ["web", "other"], "azp": "web" })
        ));
        assert!(ok(serde_json::json!({ "aud": "web" })));
        assert!(!ok(
            serde_json::json!({ "aud": ["web", "other"], "azp": "other" })
        ));
        assert!(!ok(serde_json::json!({ "aud": "web", "azp": 7 })));
    }

    #[test]
    fn only_relative_same_origin_paths_are_followed() {
        assert_eq!(safe_return_to("/app?x=1"), "/app?x=1");
        for bad in [
            "//evil.com",
            "https://evil.com",
            "/\\evil.com",
            "evil",
            "/a\r\nb",
            "",
        ] {
            assert_eq!(safe_return_to(bad), "/", "{bad}");
        }
        // Written as ASCII, whatever was decoded.
        assert_eq!(safe_return_to("/\u{200b}/a b"), "/%E2%80%8B/a%20b");
    }
}
