//! The audit side of the record stage: builds audit records for authentication failures,
//! authorization decisions, admin actions and reloads, and hands them to the audit writer.
//! A request waits until its record is acknowledged (written, or fsynced with
//! `fsync: every_record`) before it is answered, so every request that got a response has
//! its record. Tokens, cookies, secrets and query values are never written. With
//! `on_overload: wait`, a full audit disk makes the request wait until there is space again;
//! the writer's state is exported at each scrape ([`sync_metrics`]).

use crate::exchange::{Facts, Outcome};
use crate::record::format::bounded;
use portcullis_audit::{AuthorizerNote, Decision, Kind, Principal, Record};
use portcullis_identity::Identity;

/// The most query keys a record lists; the rest are counted in one last entry.
const MAX_QUERY_KEYS: usize = 32;

/// The names of the query's parameters (never their values), each bounded as paths are, at
/// most [`MAX_QUERY_KEYS`] of them and then `…[+N keys]`.
fn query_keys(q: Option<&str>) -> Vec<String> {
    let mut keys = q.unwrap_or("").split('&').filter(|kv| !kv.is_empty());
    let mut out: Vec<String> = keys
        .by_ref()
        .take(MAX_QUERY_KEYS)
        .map(|kv| bounded(kv.split('=').next().unwrap_or("")).into_owned())
        .collect();
    let more = keys.count();
    if more > 0 {
        out.push(format!("…[+{more} keys]"));
    }
    out
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
        path: Some(bounded(f.path).into_owned()),
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
        path: Some(bounded(path).into_owned()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_are_named_bounded_and_counted() {
        assert_eq!(query_keys(Some("a=1&b&=x&&c=2")), ["a", "b", "", "c"]);
        assert!(query_keys(None).is_empty());
        let many: Vec<String> = (0..9000).map(|i| format!("k{i}=v")).collect();
        let keys = query_keys(Some(&many.join("&")));
        assert_eq!(keys.len(), MAX_QUERY_KEYS + 1);
        assert_eq!(
            keys[MAX_QUERY_KEYS],
            format!("…[+{} keys]", 9000 - MAX_QUERY_KEYS)
        );
        let long = query_keys(Some(&format!("{}=1", "k".repeat(10_000))));
        assert!(long[0].len() < 2 * crate::record::format::MAX_LOGGED);
    }
}
