//! What an admin call is in Cedar's terms: its action (`Portcullis::Admin::Action::"…"`)
//! and the resource it acts on, from its method and path. People who call the admin API
//! with an identity (`admin.auth`) are authorized per call against `admin.policies`; see
//! [`portcullis_policy::admin`] for the model.
//!
//! A backend named by its short name is resolved to its full id (`app/backend`), so a policy
//! on `Portcullis::App::"billing"` covers it. An execution is looked up for its workflow, and
//! a callback's token (in its body) for its execution. [`Caller`] is who calls, and
//! [`decide`] what `admin.policies` say of a person's call.

use crate::snapshot::Snapshot;
use crate::Runtime;
use http::Method;
use percent_encoding::percent_decode_str;
use portcullis_policy::admin::AdminResource;

/// Who calls the admin API, for what the console shows and offers.
#[derive(Clone)]
pub enum Caller {
    /// A break-glass token (`who` as the control path records it): may do everything.
    Token(String),
    /// A person or agent, whose every call `admin.policies` decides.
    Person(std::sync::Arc<portcullis_identity::Identity>),
}

impl Caller {
    /// Whether this caller may take `action` on `resource`.
    pub fn may(&self, snap: &Snapshot, action: &str, resource: &AdminResource) -> bool {
        match self {
            Caller::Token(_) => true,
            Caller::Person(id) => decide(snap, id, action, resource, &[]).allowed,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Caller::Token(who) => who.clone(),
            Caller::Person(id) => format!("{}/{}", id.provider, id.user),
        }
    }
}

/// The DER of the certificate an admin client presented over TLS (verified by the
/// handshake against `admin.tls.client_auth`).
#[derive(Clone)]
pub struct ClientCert(pub std::sync::Arc<Vec<u8>>);

/// The decision on `action` over `resource` for `identity`. Publishing events is decided on
/// each event's type instead (a body with no type is decided on the resource, then refused
/// by the endpoint).
pub fn decide(
    snap: &crate::snapshot::Snapshot,
    identity: &portcullis_identity::Identity,
    action: &str,
    resource: &portcullis_policy::admin::AdminResource,
    types: &[String],
) -> portcullis_policy::admin::AdminDecision {
    let p = &snap.admin_policies;
    if types.is_empty() {
        return p.authorize_identity(identity, action, resource);
    }
    for t in types {
        let r = portcullis_policy::admin::AdminResource::EventType(t.clone());
        let d = p.authorize_identity(identity, action, &r);
        if !d.allowed {
            return d;
        }
    }
    portcullis_policy::admin::AdminDecision {
        allowed: true,
        reasons: Vec::new(),
    }
}

/// A call's action and resource. `token` is a callback's token, when the call is one.
pub async fn target(
    rt: &Runtime,
    snap: &Snapshot,
    method: &Method,
    path: &str,
    token: Option<&str>,
) -> (&'static str, AdminResource) {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    match s.as_slice() {
        ["metrics"] => ("metrics.read", AdminResource::Config),
        ["api", "v1", "backends"] => ("backends.read", AdminResource::Config),
        ["api", "v1", "backends", b, "servers", srv, what] => {
            let backend = crate::control::find_backend(snap, b)
                .map_or_else(|_| b.to_string(), |x| x.id.clone());
            let action = if *what == "weight" {
                "server.set_weight"
            } else {
                "server.set_state"
            };
            (
                action,
                AdminResource::Server {
                    backend,
                    server: srv.to_string(),
                },
            )
        }
        ["api", "v1", "reload"] => ("config.reload", AdminResource::Config),
        ["api", "v1", "sessions", "revoke"] => ("sessions.revoke", AdminResource::Config),
        ["api", "v1", "routes", r, what] => {
            let route = crate::control::find_route(snap, r)
                .map_or_else(|_| r.to_string(), |x| x.id.to_string());
            let action = if *what == "restore" {
                "route.restore"
            } else {
                "route.switch"
            };
            (action, AdminResource::Route(route))
        }
        ["api", "v1", "config"] => ("config.read", AdminResource::Config),
        ["api", "v1", "dashboard", ..] => ("dashboard.read", AdminResource::Config),
        ["api", "v1", "audit"] => ("audit.read", AdminResource::Config),
        ["api", "v1", "tables"] => ("table.read", AdminResource::Config),
        ["api", "v1", "tables", t, ..] => {
            let action = match *method {
                _ if read => "table.read",
                Method::DELETE => "table.clear",
                _ => "table.set",
            };
            (action, AdminResource::Table(t.to_string()))
        }
        ["api", "v1", "usage"] => ("usage.read", AdminResource::Config),
        ["api", "v1", "events"] => ("events.publish", AdminResource::Config),
        ["api", "v1", "events", "stream"] => ("events.read", AdminResource::Config),
        // (Each event's type is checked too: see `event_types`.)
        ["api", "v1", "workflows"] => ("workflow.read", AdminResource::Config),
        ["api", "v1", "workflows", w, ..] => {
            ("workflow.start", AdminResource::Workflow(w.to_string()))
        }
        ["api", "v1", "executions"] => ("workflow.read", AdminResource::Config),
        ["api", "v1", "executions", id, rest @ ..] => {
            let action = match rest.first() {
                Some(&"stop") => "workflow.stop",
                Some(&"approve" | &"reject") => "workflow.callback",
                _ => "workflow.read",
            };
            (action, execution(rt, id).await)
        }
        ["api", "v1", "callbacks", ..] => {
            let id = token.and_then(|t| t.split('.').next()).unwrap_or_default();
            ("workflow.callback", execution(rt, id).await)
        }
        _ => ("admin.other", AdminResource::Config),
    }
}

/// The execution `id`, with its workflow when it exists.
async fn execution(rt: &Runtime, id: &str) -> AdminResource {
    let mut workflow = String::new();
    if let Some(svc) = rt.workflows.service() {
        let store = svc.runner.store().clone();
        let i = id.to_string();
        if let Ok(Ok(Some(row))) = tokio::task::spawn_blocking(move || store.get(&i)).await {
            workflow = row.workflow;
        }
    }
    AdminResource::Execution {
        workflow,
        id: id.to_string(),
    }
}
