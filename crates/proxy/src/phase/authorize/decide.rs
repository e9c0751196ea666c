//! The authorize stage: the route's Cedar policies (global, app, route files and the
//! shorthand `allow`/`deny` rules) decide first; then the route's external authorizers, which
//! must all allow too. Deny wins, and a route that requires identity denies by default. With
//! `enforce: false` (shadow mode) a denial is recorded as `would_deny` and the request goes
//! through. Every outcome carries its reasons for the audit trail.

use crate::exchange::{Exchange, Outcome};
use crate::snapshot::RouteRt;
use portcullis_identity::Identity;
use std::sync::Arc;
use std::time::Instant;

/// The path as `route` matched it, for `context.route_path`: without `;` parameters, and
/// lower-case unless the route matches case-sensitively. Borrowed when it is the path.
pub fn route_path(path: &str, case_sensitive: bool) -> std::borrow::Cow<'_, str> {
    let p = crate::edge::canon::match_path(path);
    if case_sensitive || !p.bytes().any(|b| b.is_ascii_uppercase()) {
        return p;
    }
    std::borrow::Cow::Owned(p.to_ascii_lowercase())
}

/// Decides on the exchange's request for `identity`: the facts policy and the authorizers
/// read are views of the exchange.
pub async fn authorize(x: &Exchange<'_>, route: &RouteRt, identity: &Arc<Identity>) -> Outcome {
    let (snap, conn) = (x.snap, x.conn);
    let (method, host, path, query) = (x.method(), x.host_name(), x.path(), x.query());
    let headers = &x.parts.headers;
    // The latency is only reported in the audit record.
    let want_reasons = x.shared.audit.is_some();
    let start = want_reasons.then(Instant::now);
    // What the connection's memo holds for this identity and method (see `memo`), else the
    // policies (and their caches).
    let remembered = if route.memo_decisions {
        conn.memo.decision(snap, route, identity, method)
    } else {
        None
    };
    let view = route.reads_limits.then(|| crate::limits::LimitView {
        track: route.limits.as_deref().map_or(&[][..], |l| &l.track[..]),
        seen: &x.seen,
    });
    let d = match remembered {
        Some(d) => d,
        None => {
            let route_path = route_path(path, route.case_sensitive);
            let d = snap.policy.decide(
                &route.id,
                &portcullis_policy::RequestInfo {
                    identity,
                    method: method.as_str(),
                    host,
                    path,
                    route_path: &route_path,
                    query,
                    headers,
                    client_ip: conn.peer.ip(),
                    tls_client_subject: (identity.method == portcullis_identity::AuthMethod::Mtls)
                        .then_some(identity.subject.as_str()),
                    tls_client_cert: conn.client_cert.is_some(),
                    request_id: &x.rid,
                    now: None,
                    limits: view
                        .as_ref()
                        .map(|v| v as &dyn portcullis_policy::LimitValues),
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
            // Boxed: an external decision is an HTTP call, whose future inline would size
            // every request's future (see `pipeline::handle`).
            let v = Box::pin(a.check(&portcullis_authorizer::Input {
                identity,
                route: &route.id,
                method: method.as_str(),
                host,
                path,
                query,
                headers,
            }))
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
