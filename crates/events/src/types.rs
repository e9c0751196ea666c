//! Every event type portcullis emits, the shape of its `data`, and the typed constructors
//! on [`Source`] that build each one.
//!
//! | type | subject | data |
//! |---|---|---|
//! | `dev.portcullis.server.up` | `backend/server` | [`ServerData`]: health checks pass again |
//! | `dev.portcullis.server.down` | `backend/server` | [`ServerData`]: health checks fail |
//! | `dev.portcullis.server.ejected` | `backend/server` | [`ServerData`] with `for_ms`: outlier detection took it out |
//! | `dev.portcullis.server.restored` | `backend/server` | [`ServerData`]: its ejection ended |
//! | `dev.portcullis.backend.unhealthy` | `backend` | [`BackendData`]: no healthy server left |
//! | `dev.portcullis.limit.exceeded` | the table, or `plan:<name>` | [`WindowCount`]: refusals of one key in one window |
//! | `dev.portcullis.auth.denial_burst` | chosen by the emitter (the route) | [`WindowCount`]: policy denials of one key in one window |
//! | `dev.portcullis.auth.failure_burst` | chosen by the emitter (the route) | [`WindowCount`]: failed authentications of one key in one window |
//! | `dev.portcullis.config.reloaded` | none | [`ConfigReloaded`] |
//! | `dev.portcullis.config.rejected` | none | [`ConfigRejected`]: the old config stays |
//! | `dev.portcullis.certificate.expiring` | the certificate file | [`CertificateExpiring`] |
//! | `dev.portcullis.jwks.refresh_failed` | the identity provider | [`JwksRefreshFailed`]: JWKS or discovery could not be fetched |
//! | `dev.portcullis.audit.overload` | the audit sink | [`AuditOverload`]: audit records were dropped |
//! | `dev.portcullis.automation.action` | the action's target | [`AutomationAction`]; `causedby` is the trigger's event |
//! | `dev.portcullis.alert.firing` | `alertname[/instance]` | an Alertmanager alert (made by the `alertmanager` module) |
//! | `dev.portcullis.alert.resolved` | `alertname[/instance]` | an Alertmanager alert that ended |
//!
//! Times inside `data` are RFC 3339 strings; durations are whole milliseconds in fields
//! ending `_ms`. Request-level events (limits, denials, authentication failures) are never
//! one per request: an [`Aggregator`](crate::Aggregator) counts them per key and window.

use crate::event::{rfc3339, Event, Source};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

pub const SERVER_UP: &str = "dev.portcullis.server.up";
pub const SERVER_DOWN: &str = "dev.portcullis.server.down";
pub const SERVER_EJECTED: &str = "dev.portcullis.server.ejected";
pub const SERVER_RESTORED: &str = "dev.portcullis.server.restored";
pub const BACKEND_UNAVAILABLE: &str = "dev.portcullis.backend.unhealthy";
pub const LIMIT_EXCEEDED: &str = "dev.portcullis.limit.exceeded";
pub const AUTH_DENIAL_BURST: &str = "dev.portcullis.auth.denial_burst";
pub const AUTH_FAILURE_BURST: &str = "dev.portcullis.auth.failure_burst";
pub const CONFIG_RELOADED: &str = "dev.portcullis.config.reloaded";
pub const CONFIG_REJECTED: &str = "dev.portcullis.config.rejected";
pub const CERTIFICATE_EXPIRING: &str = "dev.portcullis.certificate.expiring";
pub const JWKS_REFRESH_FAILED: &str = "dev.portcullis.jwks.refresh_failed";
pub const AUDIT_OVERLOAD: &str = "dev.portcullis.audit.overload";
pub const AUTOMATION_ACTION: &str = "dev.portcullis.automation.action";
pub const ALERT_FIRING: &str = "dev.portcullis.alert.firing";
pub const ALERT_RESOLVED: &str = "dev.portcullis.alert.resolved";

/// Every type above.
pub const ALL: &[&str] = &[
    SERVER_UP,
    SERVER_DOWN,
    SERVER_EJECTED,
    SERVER_RESTORED,
    BACKEND_UNAVAILABLE,
    LIMIT_EXCEEDED,
    AUTH_DENIAL_BURST,
    AUTH_FAILURE_BURST,
    CONFIG_RELOADED,
    CONFIG_REJECTED,
    CERTIFICATE_EXPIRING,
    JWKS_REFRESH_FAILED,
    AUDIT_OVERLOAD,
    AUTOMATION_ACTION,
    ALERT_FIRING,
    ALERT_RESOLVED,
];

/// Whether `type_` is one of [`ALL`].
pub fn is_known(type_: &str) -> bool {
    ALL.contains(&type_)
}

/// What happened to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerChange {
    /// Health checks pass again (`rise` in a row).
    Up,
    /// Health checks fail (`fall` in a row).
    Down,
    /// Outlier detection took it out of rotation for a while.
    Ejected,
    /// Its ejection ended.
    Restored,
}

impl ServerChange {
    /// The event type.
    pub fn type_(self) -> &'static str {
        match self {
            ServerChange::Up => SERVER_UP,
            ServerChange::Down => SERVER_DOWN,
            ServerChange::Ejected => SERVER_EJECTED,
            ServerChange::Restored => SERVER_RESTORED,
        }
    }
}

/// `data` of `server.up|down|ejected|restored`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerData {
    /// The backend's name (app-qualified, as the proxy shows it).
    pub backend: String,
    /// The server's address, `host:port`.
    pub server: String,
    /// Why, in words: `3 failed health checks: connection refused`, `5 consecutive 5xx`.
    pub reason: String,
    /// The backend's servers in rotation after this change.
    pub healthy: u32,
    /// The backend's servers.
    pub total: u32,
    /// For `ejected`: how long the ejection lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
}

impl ServerData {
    pub fn new(
        backend: impl Into<String>,
        server: impl Into<String>,
        reason: impl Into<String>,
        healthy: u32,
        total: u32,
    ) -> ServerData {
        ServerData {
            backend: backend.into(),
            server: server.into(),
            reason: reason.into(),
            healthy,
            total,
            for_ms: None,
        }
    }
}

/// `data` of `backend.unhealthy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendData {
    pub backend: String,
    /// Its servers, none of them healthy.
    pub total: u32,
    /// Why, in words.
    pub reason: String,
}

/// The limit a `limit.exceeded` event is about; its subject is the table's name or
/// `plan:<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit<'a> {
    /// A stick table's rule.
    Table(&'a str),
    /// A usage plan's rate or quota.
    Plan(&'a str),
}

impl Limit<'_> {
    /// The event's subject.
    pub fn subject(&self) -> String {
        match self {
            Limit::Table(t) => (*t).to_owned(),
            Limit::Plan(p) => format!("plan:{p}"),
        }
    }
}

/// `data` of the windowed events (`limit.exceeded`, `auth.denial_burst`,
/// `auth.failure_burst`): `count` times for `key` in the window of `window_ms` that began
/// at `start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCount {
    /// The key as text: a client address, a principal (`User::"alice"`), an API key's name.
    pub key: String,
    pub count: u64,
    pub window_ms: u64,
    /// RFC 3339.
    pub start: String,
}

impl WindowCount {
    pub fn new(key: impl Into<String>, count: u64, window: Duration, start: SystemTime) -> Self {
        WindowCount {
            key: key.into(),
            count,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            start: rfc3339(start),
        }
    }
}

/// `data` of `config.reloaded`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReloaded {
    /// The running config's generation, counting from 1 at start.
    pub generation: u64,
    /// What asked for it: `file` (a watched file changed), `signal` (SIGHUP), `api`.
    pub trigger: String,
}

/// `data` of `config.rejected`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRejected {
    /// The generation still running.
    pub generation: u64,
    pub trigger: String,
    /// Each error, as `file:line:col: message`.
    pub errors: Vec<String>,
}

/// `data` of `certificate.expiring`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateExpiring {
    /// The certificate file.
    pub certificate: String,
    /// Its DNS names.
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// Whole days left (negative once expired).
    pub days_left: i64,
}

/// `data` of `jwks.refresh_failed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwksRefreshFailed {
    /// The identity provider's name.
    pub provider: String,
    /// What could not be fetched: the JWKS URI or the discovery document.
    pub uri: String,
    pub error: String,
    /// Failures in a row.
    pub failures: u32,
    /// The last successful refresh (RFC 3339), if any: keys that old are still in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
}

/// `data` of `audit.overload`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditOverload {
    /// The audit sink.
    pub sink: String,
    /// Records dropped since the last such event.
    pub dropped: u64,
    /// The sink's queue capacity.
    pub queue: usize,
}

/// How an automation action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionResult {
    /// Run, and it worked.
    Applied,
    /// Policy forbade it: recorded, not run.
    Denied,
    /// Run, and it failed.
    Failed,
    /// Dry run (`enforce: false`): it would have run.
    WouldAct,
}

/// `data` of `automation.action`; the event's `causedby` is the event that fired the
/// trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationAction {
    pub trigger: String,
    /// The action's kind: `set_server_state`, `switch_route`, `webhook`, …
    pub action: String,
    /// The resource acted on (also the subject).
    pub target: String,
    pub result: ActionResult,
    /// The firing's idempotency key (trigger, group, window).
    pub firing: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Source {
    /// `server.up|down|ejected|restored`, subject `backend/server`.
    pub fn server(&self, change: ServerChange, data: ServerData) -> Event {
        let subject = format!("{}/{}", data.backend, data.server);
        self.event(change.type_(), Some(subject), data)
    }

    /// `backend.unhealthy`, subject the backend.
    pub fn backend_unavailable(&self, data: BackendData) -> Event {
        let subject = data.backend.clone();
        self.event(BACKEND_UNAVAILABLE, Some(subject), data)
    }

    /// `limit.exceeded`, subject the table or `plan:<name>`.
    pub fn limit_exceeded(&self, limit: Limit<'_>, data: WindowCount) -> Event {
        self.event(LIMIT_EXCEEDED, Some(limit.subject()), data)
    }

    /// `auth.denial_burst`.
    pub fn denial_burst(&self, subject: impl Into<String>, data: WindowCount) -> Event {
        self.event(AUTH_DENIAL_BURST, Some(subject.into()), data)
    }

    /// `auth.failure_burst`.
    pub fn failure_burst(&self, subject: impl Into<String>, data: WindowCount) -> Event {
        self.event(AUTH_FAILURE_BURST, Some(subject.into()), data)
    }

    /// `config.reloaded`.
    pub fn config_reloaded(&self, data: ConfigReloaded) -> Event {
        self.event(CONFIG_RELOADED, None, data)
    }

    /// `config.rejected`.
    pub fn config_rejected(&self, data: ConfigRejected) -> Event {
        self.event(CONFIG_REJECTED, None, data)
    }

    /// `certificate.expiring`, subject the certificate file.
    pub fn certificate_expiring(&self, data: CertificateExpiring) -> Event {
        let subject = data.certificate.clone();
        self.event(CERTIFICATE_EXPIRING, Some(subject), data)
    }

    /// `jwks.refresh_failed`, subject the provider.
    pub fn jwks_refresh_failed(&self, data: JwksRefreshFailed) -> Event {
        let subject = data.provider.clone();
        self.event(JWKS_REFRESH_FAILED, Some(subject), data)
    }

    /// `audit.overload`, subject the audit sink.
    pub fn audit_overload(&self, data: AuditOverload) -> Event {
        let subject = data.sink.clone();
        self.event(AUDIT_OVERLOAD, Some(subject), data)
    }

    /// `automation.action`, subject the target, caused by `cause` (the trigger's event id).
    pub fn automation_action(&self, cause: &str, data: AutomationAction) -> Event {
        let subject = data.target.clone();
        self.event(AUTOMATION_ACTION, Some(subject), data)
            .caused_by(cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn constructors_set_type_subject_and_data() {
        let src = Source::new("portcullis://t");
        let mut d = ServerData::new("b", "10.0.0.1:80", "5 consecutive 5xx", 3, 4);
        d.for_ms = Some(30_000);
        let e = src.server(ServerChange::Ejected, d.clone());
        assert_eq!(
            (e.type_.as_str(), e.source.as_str()),
            (SERVER_EJECTED, "portcullis://t")
        );
        assert_eq!(e.subject.as_deref(), Some("b/10.0.0.1:80"));
        assert_eq!(serde_json::from_value::<ServerData>(e.data).unwrap(), d);

        let start = SystemTime::UNIX_EPOCH;
        let w = WindowCount::new("10.1.2.3", 41, Duration::from_secs(10), start);
        let e = src.limit_exceeded(Limit::Plan("gold"), w);
        assert_eq!(e.subject.as_deref(), Some("plan:gold"));
        assert_eq!(
            e.data,
            json!({"key": "10.1.2.3", "count": 41, "window_ms": 10_000, "start": "1970-01-01T00:00:00Z"})
        );

        let a = AutomationAction {
            trigger: "failover".into(),
            action: "switch_route".into(),
            target: "billing/api".into(),
            result: ActionResult::WouldAct,
            firing: "failover/billing/1".into(),
            detail: None,
        };
        let e = src.automation_action("cause-1", a);
        assert_eq!(e.causedby.as_deref(), Some("cause-1"));
        assert_eq!(e.data["result"], "would_act");
        assert!(is_known(&e.type_) && !is_known("dev.portcullis.nope"));
    }
}
