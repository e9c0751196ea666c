//! The authorize stage: the route's Cedar policies (global, app, route files and the
//! shorthand `allow`/`deny` rules) decide first; then the route's external authorizers, which
//! must all allow too. Deny wins, and a route that requires identity denies by default. With
//! `enforce: false` (shadow mode) a denial is recorded as `would_deny` and the request goes
//! through. Every outcome carries its reasons for the audit trail.

use crate::edge::conn::ConnInfo;
use crate::snapshot::{RouteRt, Snapshot};
use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis_identity::Identity;
use std::sync::Arc;
use std::time::Instant;

/// What the authorize stage decided.
pub struct Outcome {
    /// Let the request through (true in shadow mode even when the policies deny).
    pub pass: bool,
    /// `allow`, `deny` or `would_deny`.
    pub decision: &'static str,
    /// Why. Left empty for an allowed request when nobody will read it (no audit trail):
    /// formatting them costs more than a cached decision.
    pub reasons: Vec<String>,
    /// The last authorizer consulted: (name, allowed, cached).
    pub authorizer: Option<(String, bool, bool)>,
    /// Headers the authorizers asked to add upstream.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// Time spent deciding (0 when there is no audit trail to report it in).
    pub latency_us: u64,
}

#[allow(clippy::too_many_arguments)]
pub async fn authorize(
    snap: &Arc<Snapshot>,
    route: &RouteRt,
    conn: &ConnInfo,
    identity: &Arc<Identity>,
    method: &http::Method,
    host: &str,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    request_id: &str,
    want_reasons: bool,
    remembered: Option<Arc<portcullis_policy::Decision>>,
) -> Outcome {
    // The latency is only reported in the audit record.
    let start = want_reasons.then(Instant::now);
    // What the connection's memo held for this identity and method (see `memo`), else the
    // policies (and their caches).
    let d = match remembered {
        Some(d) => d,
        None => {
            let d = snap.policy.decide(
                &route.id,
                &portcullis_policy::RequestInfo {
                    identity,
                    method: method.as_str(),
                    host,
                    path,
                    query,
                    headers,
                    client_ip: conn.peer.ip(),
                    tls_client_subject: (identity.method == portcullis_identity::AuthMethod::Mtls)
                        .then_some(identity.subject.as_str()),
                    tls_client_cert: conn.client_cert.is_some(),
                    request_id,
                    now: None,
                },
            );
            if route.memo_decisions {
                conn.memo
                    .remember_decision(snap, route, identity, method, &d);
            }
            d
        }
    };
    let mut reasons = Vec::new();
    let mut allowed = d.allowed;
    let mut authorizer = None;
    let mut add_headers = Vec::new();
    if allowed || !route.enforce {
        for a in &route.authorize_with {
            let v = a
                .check(&portcullis_authorizer::Input {
                    identity,
                    route: &route.id,
                    method: method.as_str(),
                    host,
                    path,
                    query,
                    headers,
                })
                .await;
            reasons.push(format!(
                "authorizer:{}:{}{}{}",
                a.name(),
                if v.allowed { "allow" } else { "deny" },
                if v.cached { ":cached" } else { "" },
                v.error
                    .as_ref()
                    .map(|e| format!(":error={e}"))
                    .unwrap_or_default()
            ));
            if let Some(r) = &v.reason {
                reasons.push(format!("authorizer-reason:{r}"));
            }
            authorizer = Some((a.name().to_string(), v.allowed, v.cached));
            if !v.allowed {
                allowed = false;
                break;
            }
            add_headers.extend(v.headers);
        }
    }
    if want_reasons || !allowed {
        let mut all: Vec<String> = d.reasons.iter().map(|r| format!("policy:{r}")).collect();
        all.extend(d.errors.iter().map(|e| format!("error:{e}")));
        if d.reasons.is_empty() && !d.allowed {
            all.push("default deny: no policy permits this request".into());
        }
        all.append(&mut reasons);
        reasons = all;
    } else {
        reasons.clear();
    }
    let (pass, decision) = match (allowed, route.enforce) {
        (true, _) => (true, "allow"),
        (false, true) => (false, "deny"),
        (false, false) => (true, "would_deny"),
    };
    Outcome {
        pass,
        decision,
        reasons,
        authorizer,
        add_headers,
        latency_us: start.map_or(0, |s| s.elapsed().as_micros() as u64),
    }
}
