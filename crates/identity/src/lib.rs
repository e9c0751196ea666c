//! portcullis identity: turns credentials into one [`Identity`]. Bearer JWTs (from `oidc`,
//! `jwt` and `dev_issuer` providers, validated against JWKS with an algorithm allow-list and a
//! verified-token cache), API keys (hashed, hot-reloaded), client certificates (mTLS, SPIFFE
//! URIs), and browser sessions from the OIDC login. It also signs the assertion JWT sent to
//! origins. Pure validation is separated from I/O: only [`jwks`] and [`oidc`] talk to the
//! network.

pub mod apikey;
pub mod assertion;
pub mod cache;
pub mod claims;
pub mod dev;
pub mod engine;
pub mod jwks;
pub mod jwt;
pub mod mtls;
pub mod oidc;
pub mod session;
pub mod template;

pub use engine::Engine;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How the caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Jwt,
    Session,
    ApiKey,
    Mtls,
}

/// Who is calling. Built once per request (or taken from a cache) and shared read-only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub provider: String,
    pub method: AuthMethod,
    /// The stable subject (`sub`, key id, certificate identity).
    pub subject: String,
    pub user: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// Every claim, for policy and header templates.
    pub claims: serde_json::Value,
    /// Seconds since the epoch after which this identity is no longer valid.
    pub expires_at: Option<u64>,
}

/// A credential was presented and refused. `reason` is for logs and the
/// `WWW-Authenticate` description; it never contains the credential.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{reason}")]
pub struct AuthError {
    pub reason: String,
}

impl AuthError {
    pub fn new(reason: impl Into<String>) -> Self {
        AuthError {
            reason: reason.into(),
        }
    }
}

/// Errors setting up identity from config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("provider `{provider}`: {message}")]
    Provider { provider: String, message: String },
    #[error("session: {0}")]
    Session(String),
}

pub type SharedIdentity = Arc<Identity>;

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
