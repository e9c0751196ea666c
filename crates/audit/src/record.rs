//! What an audit record says: the fields the proxy fills in ([`Record`]) and their small
//! parts. The writer adds `time`, `seq`, `instance`, `prev_hash` and `hash` (see
//! the `chain` module). Empty and absent fields are left out of the JSON line.
//!
//! Nothing here may hold a credential: no tokens, cookies, secrets or query values. The field
//! names say so (`query_keys`, not `query`), and the proxy fills them in from the identity,
//! never from raw headers.

use serde::{Deserialize, Serialize};

/// Why a record was written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A credential was presented and refused.
    AuthFailure,
    /// An authorization decision (allow, deny or would_deny).
    #[default]
    Decision,
    /// An action through the runtime API.
    Admin,
    /// A config reload, applied or rejected.
    Reload,
}

/// The outcome of an authorization decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    /// Shadow mode (`enforce: false`): the policy denied, the traffic went through.
    WouldDeny,
}

/// Who made the request, as identified (never the credential itself).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The stable subject (`sub`, key id, certificate identity).
    pub subject: String,
}

/// The result of an external decision function ("authorizer").
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizerNote {
    pub name: String,
    /// `allow`, `deny`, or the error handled by `on_error`.
    pub result: String,
    /// The answer came from the decision cache.
    pub cached: bool,
}

/// One audit record, as the proxy, the admin API and the reloader fill it in.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<Principal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path without the query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Query parameter names only, never their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Policy ids, errors and authorizer results that led to the decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizer: Option<AuthorizerNote>,
    /// Time spent deciding, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Free-form detail: the admin action, the reload error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// Counters of a running [`crate::Auditor`].
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records written to the sink since start.
    pub written: u64,
    /// Records waiting in the queue.
    pub queued: u64,
    /// The seq of the last record written (0 before the first one, ever).
    pub last_seq: u64,
    /// The disk is full and the writer holds records until it has space again
    /// (`on_overload: wait`).
    pub waiting_for_disk: bool,
    /// Times the writer started waiting for disk space since start.
    pub disk_waits: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enums_are_snake_case() {
        assert_eq!(json!(Kind::AuthFailure), json!("auth_failure"));
        assert_eq!(json!(Decision::WouldDeny), json!("would_deny"));
        let k: Kind = serde_json::from_value(json!("reload")).unwrap();
        assert_eq!(k, Kind::Reload);
    }

    #[test]
    fn absent_fields_are_left_out_and_read_back() {
        let r = Record {
            kind: Kind::Decision,
            route: Some("billing-api".into()),
            decision: Some(Decision::Deny),
            principal: Some(Principal {
                user: "alice".into(),
                provider: "corp".into(),
                groups: vec!["eng".into()],
                subject: "u-1".into(),
            }),
            ..Record::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({
                "kind": "decision",
                "route": "billing-api",
                "decision": "deny",
                "principal": {"user": "alice", "provider": "corp", "groups": ["eng"], "subject": "u-1"}
            })
        );
        let back: Record = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
