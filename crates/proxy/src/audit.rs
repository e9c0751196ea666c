//! The audit side of the record stage: builds audit records for authentication failures,
//! authorization decisions, admin actions and reloads, and hands them to the audit writer.
//! A request waits until its record is acknowledged (written, or fsynced with
//! `fsync: every_record`) before it is answered, so every request that got a response has
//! its record. Tokens, cookies, secrets and query values are never written. With
//! `on_overload: wait`, a full audit disk makes the request wait until there is space again;
//! the writer's state is exported at each scrape ([`sync_metrics`]).

use crate::exchange::{Facts, Outcome};
use portcullis_audit::{AuthorizerNote, Decision, Kind, Principal, Record};
use portcullis_identity::Identity;

fn query_keys(q: Option<&str>) -> Vec<String> {
    q.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split('=').next().unwrap_or("").to_string())
        .collect()
}

fn base(f: &Facts<'_>, kind: Kind) -> Record {
    Record {
        kind,
        request_id: Some(f.request_id.to_string()),
        app: Some(f.app.to_string()),
        // The route's name within its app (`route.id` is `app/name`), as documented;
        // `audit search --route` takes the name or `app/name`.
        route: Some(
            f.route
                .strip_prefix(f.app)
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(f.route)
                .to_string(),
        ),
        client_ip: Some(f.conn.peer.ip().to_string()),
        method: Some(f.method.to_string()),
        host: Some(f.host.to_string()),
        path: Some(f.path.to_string()),
        query_keys: query_keys(f.query),
        ..Default::default()
    }
}

pub fn principal(id: &Identity) -> Principal {
    Principal {
        user: id.user.clone(),
        provider: id.provider.clone(),
        groups: id.groups.clone(),
        subject: id.subject.clone(),
    }
}

pub fn auth_failure(f: &Facts<'_>, reason: &str) -> Record {
    Record {
        decision: Some(Decision::Deny),
        reasons: vec![format!("authentication: {reason}")],
        ..base(f, Kind::AuthFailure)
    }
}

/// A call to the admin listener refused before any caller was known: no or bad
/// credentials, an ended console sign-in, or a browser's change without its CSRF token.
pub fn admin_auth_failure(
    peer: std::net::SocketAddr,
    method: &str,
    path: &str,
    reason: &str,
) -> Record {
    Record {
        kind: Kind::AuthFailure,
        client_ip: Some(peer.ip().to_string()),
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        decision: Some(Decision::Deny),
        reasons: vec![format!("authentication: {reason}")],
        detail: Some(serde_json::json!({ "listener": "admin" })),
        ..Default::default()
    }
}

pub fn decision(f: &Facts<'_>, id: &Identity, out: &Outcome) -> Record {
    Record {
        principal: Some(principal(id)),
        decision: Some(match out.decision {
            "allow" => Decision::Allow,
            "would_deny" => Decision::WouldDeny,
            _ => Decision::Deny,
        }),
        reasons: out.reasons.clone(),
        authorizer: out
            .authorizer
            .as_ref()
            .map(|(name, allowed, cached)| AuthorizerNote {
                name: name.clone(),
                result: if *allowed { "allow" } else { "deny" }.into(),
                cached: *cached,
            }),
        latency_us: Some(out.latency_us),
        ..base(f, Kind::Decision)
    }
}

pub fn admin(actor: &str, action: &str, detail: serde_json::Value) -> Record {
    Record {
        kind: Kind::Admin,
        principal: Some(Principal {
            user: actor.to_string(),
            provider: "admin".into(),
            groups: vec![],
            subject: actor.to_string(),
        }),
        detail: Some(serde_json::json!({ "action": action, "args": detail })),
        ..Default::default()
    }
}

pub fn reload(trigger: &str, result: Result<&str, &str>) -> Record {
    Record {
        kind: Kind::Reload,
        detail: Some(match result {
            Ok(version) => {
                serde_json::json!({ "trigger": trigger, "result": "ok", "version": version })
            }
            Err(e) => serde_json::json!({ "trigger": trigger, "result": "rejected", "error": e }),
        }),
        ..Default::default()
    }
}

/// Writes a record and waits for its acknowledgement. Returns false when the record could
/// not be written (overload with `fail_closed`, or a write error): the caller must not
/// answer as if it had been recorded.
pub async fn write(shared: &crate::Shared, rec: Record) -> bool {
    write_with(shared, || rec).await
}

/// Like [`write`], but builds the record only when there is an audit trail to write it to
/// (with `sink: off`, requests do not pay for records nobody keeps).
pub async fn write_with(shared: &crate::Shared, rec: impl FnOnce() -> Record) -> bool {
    let Some(a) = &shared.audit else {
        return true;
    };
    match a.record(rec()).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "audit record not written");
            shared.metrics.audit_failures.inc();
            false
        }
    }
}

/// Brings the audit metrics up to the writer's state: `portcullis_audit_waiting_for_disk`
/// and `portcullis_audit_disk_full_waits_total`. Called at each scrape, one at a time.
pub fn sync_metrics(shared: &crate::Shared) {
    let Some(a) = &shared.audit else {
        return;
    };
    let st = a.stats();
    let m = &shared.metrics;
    m.audit_waiting_for_disk.set(i64::from(st.waiting_for_disk));
    let cur = m.audit_disk_waits.get();
    if st.disk_waits > cur {
        m.audit_disk_waits.inc_by(st.disk_waits - cur);
    }
}
