//! How an admin caller authenticated, kept by the answers that outlive their request (the
//! event stream and the console's live view), so that they can ask again, at most once a
//! second, whether it still does: a stream opened with a break-glass token removed since
//! from `admin.tokens`, a console cookie signed out, or a person's token expired or ended
//! by a logout, ends, as a new request with it would be refused.

use crate::snapshot::Snapshot;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a caller presented, as the admin listener's authentication took it.
#[derive(Clone)]
pub struct Credential {
    peer: SocketAddr,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// A break-glass bearer token of `admin.tokens`.
    Token(String),
    /// The console's cookie (a token's grant or a person's session).
    Cookie(String),
    /// A person's or agent's credentials for a provider of `admin.auth`.
    Identity {
        bearer: Option<String>,
        api_key: Option<String>,
        cert: Option<Arc<Vec<u8>>>,
    },
}

impl Credential {
    pub fn token(peer: SocketAddr, token: &str) -> Credential {
        Credential {
            peer,
            kind: Kind::Token(token.to_string()),
        }
    }

    pub fn cookie(peer: SocketAddr, value: &str) -> Credential {
        Credential {
            peer,
            kind: Kind::Cookie(value.to_string()),
        }
    }

    pub fn identity(
        peer: SocketAddr,
        bearer: Option<&str>,
        api_key: Option<&str>,
        cert: Option<Arc<Vec<u8>>>,
    ) -> Credential {
        Credential {
            peer,
            kind: Kind::Identity {
                bearer: bearer.map(str::to_string),
                api_key: api_key.map(str::to_string),
                cert,
            },
        }
    }

    /// Whether a request with this credential would still be let in under `snap`.
    pub async fn holds(&self, snap: &Snapshot) -> bool {
        let admin = snap.config.admin.as_ref();
        match &self.kind {
            Kind::Token(t) => {
                let tokens = admin.map_or(&[][..], |a| a.tokens.as_slice());
                crate::admin_tokens::check_token(t.as_bytes(), tokens).is_some()
            }
            Kind::Cookie(v) => matches!(
                super::from_cookie(snap, self.peer, v).await,
                super::Seen::Caller(..)
            ),
            Kind::Identity {
                bearer,
                api_key,
                cert,
            } => {
                let providers = admin.map_or(&[][..], |a| a.auth.as_slice());
                let creds = portcullis_identity::engine::Credentials {
                    bearer: bearer.as_deref(),
                    api_key: api_key.as_deref(),
                    session_cookie: None,
                    client_cert: cert.as_ref().map(|c| c.as_slice()),
                };
                matches!(
                    snap.identity.authenticate(providers, &creds).await,
                    portcullis_identity::engine::Outcome::Ok { .. }
                )
            }
        }
    }
}

/// A stream's check of its caller, at most once a second: its credential still holds, and
/// `may` (the caller's permission to read what it streams) still says yes.
pub struct Recheck {
    credential: Option<Credential>,
    checked: std::time::Instant,
}

impl Recheck {
    pub fn new(credential: Option<Credential>) -> Recheck {
        Recheck {
            credential,
            checked: std::time::Instant::now(),
        }
    }

    /// Whether the stream may go on; `may` is asked with the current snapshot.
    pub async fn still(&mut self, rt: &crate::Runtime, may: impl Fn(&Snapshot) -> bool) -> bool {
        if self.checked.elapsed() < std::time::Duration::from_secs(1) {
            return true;
        }
        self.checked = std::time::Instant::now();
        let snap = rt.shared.snapshot.load_full();
        if !may(&snap) {
            return false;
        }
        match &self.credential {
            Some(c) => c.holds(&snap).await,
            // Every authenticated request carries one; a stream without it is not served.
            None => false,
        }
    }
}
