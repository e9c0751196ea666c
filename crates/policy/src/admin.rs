//! Cedar for the admin side: which admin calls a person may make (the admin API by identity),
//! and which control commands an automation principal (a trigger, a workflow) may run, on
//! which resources. Policies come from `admin.policies`. A person needs a policy that permits
//! the call (deny by default). Automation, with no policies configured, acts as written in the
//! config (the config's author wrote it); with some, it too needs a permit. Forbid wins.
//!
//! The model (no schema, so policies stay short):
//! * principals `Portcullis::User::"user"` (a bearer token's) or `Portcullis::Agent::"user"`
//!   (an API key's) in `Portcullis::Group::"name"`, as route policies name them; `Portcullis::Trigger::"name"`, `Portcullis::Workflow::"name"`;
//! * actions `Portcullis::Admin::Action::"server.set_state"`, `"server.set_weight"`, `"table.set"`,
//!   `"table.clear"`, `"table.read"`, `"route.switch"`, `"route.restore"`, `"config.reload"`, `"sessions.revoke"`,
//!   `"config.read"`, `"backends.read"`, `"metrics.read"`, `"usage.read"`, `"events.publish"`,
//!   `"workflow.read"`, `"workflow.start"`, `"workflow.stop"`, `"workflow.callback"`,
//!   `"events.read"`, `"dashboard.read"`, `"audit.read"`;
//! * resources `Portcullis::Server::"app/backend/server"` in `Portcullis::Backend::"app/backend"`
//!   in `Portcullis::App::"app"`; `Portcullis::Route::"app/route"` in its app;
//!   `Portcullis::Table::"name"`; `Portcullis::Execution::"id"` in `Portcullis::Workflow::"name"`;
//!   `Portcullis::EventType::"com.example.deploy"` (publishing an event of that type);
//!   `Portcullis::Backend::"app/backend"` in its app, also for `route.switch`: a switch is
//!   decided on the route and on the backend it sends the route to, and needs both;
//!   `Portcullis::Config::"config"` for the rest.
//!
//! So "the drain workflow may drain billing servers and nothing else" is
//! `permit(principal == Portcullis::Workflow::"drain", action == Portcullis::Admin::Action::"server.set_state", resource in Portcullis::App::"billing");`.

use cedar_policy::{Authorizer, Context, Entities, Entity, EntityUid, PolicySet, Request};
use portcullis_config::Diagnostic;
use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

/// What a command acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminResource {
    /// A server: its backend's full id (`app/backend`) and its name.
    Server {
        backend: String,
        server: String,
    },
    /// A route's full id (`app/route`).
    Route(String),
    Table(String),
    /// A workflow (its definitions, or starting one).
    Workflow(String),
    /// An execution of a workflow (`workflow` empty when unknown).
    Execution {
        workflow: String,
        id: String,
    },
    /// An event type, for `events.publish`.
    EventType(String),
    /// A backend's full id (`app/backend`): where a route switch sends the route.
    Backend(String),
    Config,
}

/// The decision, with the policies that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminDecision {
    pub allowed: bool,
    /// Ids of the policies that decided (`file.cedar#0`, or their `@id`).
    pub reasons: Vec<String>,
}

/// Every admin action a call or a command is decided as (`Portcullis::Admin::Action::"…"`).
pub const ACTIONS: [&str; 21] = [
    "server.set_state",
    "server.set_weight",
    "table.set",
    "table.clear",
    "table.read",
    "route.switch",
    "route.restore",
    "config.reload",
    "config.read",
    "sessions.revoke",
    "backends.read",
    "metrics.read",
    "usage.read",
    "events.publish",
    "events.read",
    "workflow.read",
    "workflow.start",
    "workflow.stop",
    "workflow.callback",
    "dashboard.read",
    "audit.read",
];

/// The entity types of the model (without `Portcullis::`): principals, then resources.
const TYPES: [&str; 13] = [
    "User",
    "Agent",
    "Group",
    "Trigger",
    "Workflow",
    "Server",
    "Backend",
    "App",
    "Route",
    "Table",
    "Execution",
    "EventType",
    "Config",
];

/// Entities a policy names that the model does not have: with no schema, Cedar takes any
/// name, and a policy about `Portcullis::Automation::"t"` or `"server.drain"` would never
/// apply (a forbid that silently forbids nothing). Each is located at its first mention.
fn outside_the_model(
    file: &std::path::Path,
    text: &str,
    p: &cedar_policy::Policy,
) -> Vec<Diagnostic> {
    use cedar_policy::{ActionConstraint, PrincipalConstraint, ResourceConstraint};
    let mut uids = p.entity_literals();
    let mut types = Vec::new();
    match p.principal_constraint() {
        PrincipalConstraint::In(u) | PrincipalConstraint::Eq(u) => uids.push(u),
        PrincipalConstraint::Is(t) => types.push(t),
        PrincipalConstraint::IsIn(t, u) => {
            types.push(t);
            uids.push(u);
        }
        PrincipalConstraint::Any => {}
    }
    match p.resource_constraint() {
        ResourceConstraint::In(u) | ResourceConstraint::Eq(u) => uids.push(u),
        ResourceConstraint::Is(t) => types.push(t),
        ResourceConstraint::IsIn(t, u) => {
            types.push(t);
            uids.push(u);
        }
        ResourceConstraint::Any => {}
    }
    match p.action_constraint() {
        ActionConstraint::In(us) => uids.extend(us),
        ActionConstraint::Eq(u) => uids.push(u),
        ActionConstraint::Any => {}
    }
    let mut problems = Vec::new();
    let mut say = |needle: String, message: String| {
        let at = text.find(&needle);
        if problems.iter().all(|d: &Diagnostic| d.message != message) {
            problems.push(crate::at_offset(file, text, at, message));
        }
    };
    let known_type = |t: &str| {
        t.strip_prefix("Portcullis::")
            .is_some_and(|n| TYPES.contains(&n) || n == "Admin::Action")
    };
    for t in types {
        let t = t.to_string();
        if !known_type(&t) {
            say(t.clone(), unknown_type(&t));
        }
    }
    for u in uids {
        let t = u.type_name().to_string();
        if !known_type(&t) {
            say(t.clone(), unknown_type(&t));
        } else if t == "Portcullis::Admin::Action" && !ACTIONS.contains(&u.id().unescaped()) {
            let id = u.id().unescaped().to_string();
            say(
                format!("\"{id}\""),
                format!(
                    "unknown admin action `{id}`: the actions are {}",
                    ACTIONS.map(|a| format!("`{a}`")).join(", ")
                ),
            );
        }
    }
    problems
}

fn unknown_type(t: &str) -> String {
    let hint = if t.ends_with("Automation") {
        " (a trigger is `Portcullis::Trigger::\"<name>\"`)"
    } else {
        ""
    };
    format!(
        "unknown entity type `{t}`: the admin model has {}{hint}",
        TYPES
            .iter()
            .map(|n| format!("`Portcullis::{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The control path's policies.
#[derive(Clone, Debug, Default)]
pub struct AdminPolicies {
    set: Option<PolicySet>,
}

fn uid(ty: &str, id: &str) -> EntityUid {
    let quoted = serde_json::to_string(id).unwrap_or_else(|_| "\"\"".into());
    EntityUid::from_str(&format!("Portcullis::{ty}::{quoted}")).expect("a valid entity uid")
}

impl AdminPolicies {
    /// Loads `files`; every problem is located in its file.
    pub fn load(files: &[PathBuf]) -> Result<AdminPolicies, Vec<Diagnostic>> {
        if files.is_empty() {
            return Ok(AdminPolicies { set: None });
        }
        let mut problems = Vec::new();
        let mut set = PolicySet::new();
        for f in files {
            let text = match std::fs::read_to_string(f) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Diagnostic {
                        file: f.clone(),
                        line: 1,
                        col: 1,
                        message: format!("cannot read the admin policy file: {e}"),
                    });
                    continue;
                }
            };
            for (p, _) in crate::parse_file(f, &text, &mut problems) {
                problems.extend(outside_the_model(f, &text, &p));
                if let Err(e) = set.add(p) {
                    problems.push(Diagnostic {
                        file: f.clone(),
                        line: 1,
                        col: 1,
                        message: format!("{e} (give each policy a unique @id)"),
                    });
                }
            }
        }
        if problems.is_empty() {
            Ok(AdminPolicies { set: Some(set) })
        } else {
            Err(problems)
        }
    }

    /// Whether any policy is configured.
    pub fn configured(&self) -> bool {
        self.set.is_some()
    }

    /// May `principal` (`("Workflow", "drain")`) do `action` on `resource`?
    pub fn authorize(
        &self,
        principal: (&str, &str),
        action: &str,
        resource: &AdminResource,
    ) -> AdminDecision {
        if self.set.is_none() {
            return AdminDecision {
                allowed: true,
                reasons: vec!["no admin.policies: automation acts as configured".into()],
            };
        }
        self.decide(principal, &[], action, resource)
    }

    /// May `principal`, a person or an agent as route policies name them
    /// (`("User", "alice")`, `("Agent", "deploy-bot")`), in `groups`, make the admin call
    /// `action` on `resource`? Denied when no policy is configured.
    /// May the person or agent `id` do `action` on `resource`? An API key's or a client
    /// certificate's identity is a `Portcullis::Agent`, any other a `Portcullis::User`, in
    /// its groups.
    pub fn authorize_identity(
        &self,
        id: &portcullis_identity::Identity,
        action: &str,
        resource: &AdminResource,
    ) -> AdminDecision {
        let ty = match id.method {
            portcullis_identity::AuthMethod::ApiKey | portcullis_identity::AuthMethod::Mtls => {
                "Agent"
            }
            _ => "User",
        };
        self.decide((ty, id.user.as_str()), &id.groups, action, resource)
    }

    pub fn authorize_user(
        &self,
        principal: (&str, &str),
        groups: &[String],
        action: &str,
        resource: &AdminResource,
    ) -> AdminDecision {
        self.decide(principal, groups, action, resource)
    }

    fn decide(
        &self,
        principal: (&str, &str),
        groups: &[String],
        action: &str,
        resource: &AdminResource,
    ) -> AdminDecision {
        let Some(set) = &self.set else {
            return AdminDecision {
                allowed: false,
                reasons: vec!["no admin.policies permit people anything (deny by default)".into()],
            };
        };
        let p = uid(principal.0, principal.1);
        let a = uid("Admin::Action", action);
        let (r, entities) = resource_entities(resource);
        let mut all = entities;
        let parents: HashSet<EntityUid> = groups.iter().map(|g| uid("Group", g)).collect();
        for g in &parents {
            all.push(Entity::new_no_attrs(g.clone(), HashSet::new()));
        }
        all.push(Entity::new_no_attrs(p.clone(), parents));
        let Ok(entities) = Entities::from_entities(all, None) else {
            return AdminDecision {
                allowed: false,
                reasons: vec!["the request's entities could not be built".into()],
            };
        };
        let Ok(req) = Request::new(p, a, r, Context::empty(), None) else {
            return AdminDecision {
                allowed: false,
                reasons: vec!["the request could not be built".into()],
            };
        };
        let resp = Authorizer::new().is_authorized(&req, set, &entities);
        let mut reasons: Vec<String> = resp
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        reasons.sort();
        let allowed = resp.decision() == cedar_policy::Decision::Allow;
        if !allowed && reasons.is_empty() {
            reasons.push("no policy permits it (deny by default)".into());
        }
        AdminDecision { allowed, reasons }
    }
}

/// The resource's uid and its entity hierarchy.
fn resource_entities(r: &AdminResource) -> (EntityUid, Vec<Entity>) {
    let app_of = |id: &str| id.split_once('/').map_or("default", |(a, _)| a).to_string();
    let one = |u: &EntityUid, parents: &[&EntityUid]| {
        Entity::new_no_attrs(u.clone(), parents.iter().map(|p| (*p).clone()).collect())
    };
    match r {
        AdminResource::Server { backend, server } => {
            let app = uid("App", &app_of(backend));
            let b = uid("Backend", backend);
            let s = uid("Server", &format!("{backend}/{server}"));
            (
                s.clone(),
                vec![one(&app, &[]), one(&b, &[&app]), one(&s, &[&b])],
            )
        }
        AdminResource::Route(route) => {
            let app = uid("App", &app_of(route));
            let rt = uid("Route", route);
            (rt.clone(), vec![one(&app, &[]), one(&rt, &[&app])])
        }
        AdminResource::Table(t) => {
            let u = uid("Table", t);
            (u.clone(), vec![one(&u, &[])])
        }
        AdminResource::Workflow(w) => {
            let u = uid("Workflow", w);
            (u.clone(), vec![one(&u, &[])])
        }
        AdminResource::Execution { workflow, id } => {
            let w = uid("Workflow", workflow);
            let e = uid("Execution", id);
            (e.clone(), vec![one(&w, &[]), one(&e, &[&w])])
        }
        AdminResource::Backend(backend) => {
            let app = uid("App", &app_of(backend));
            let b = uid("Backend", backend);
            (b.clone(), vec![one(&app, &[]), one(&b, &[&app])])
        }
        AdminResource::EventType(t) => {
            let u = uid("EventType", t);
            (u.clone(), vec![one(&u, &[])])
        }
        AdminResource::Config => {
            let u = uid("Config", "config");
            (u.clone(), vec![one(&u, &[])])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(text: &str) -> AdminPolicies {
        // One file per call: tests run in parallel, and a shared name would
        // let one test load another's policies.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pc-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("p{n}.cedar"));
        std::fs::write(&f, text).unwrap();
        AdminPolicies::load(&[f]).unwrap()
    }

    #[test]
    fn without_policies_automation_acts_as_configured() {
        let p = AdminPolicies::load(&[]).unwrap();
        assert!(!p.configured());
        assert!(
            p.authorize(("Workflow", "w"), "config.reload", &AdminResource::Config)
                .allowed
        );
    }

    #[test]
    fn a_workflow_may_drain_its_apps_servers_and_nothing_else() {
        let p = policies(
            r#"permit(principal == Portcullis::Workflow::"drain", action == Portcullis::Admin::Action::"server.set_state", resource in Portcullis::App::"billing");"#,
        );
        let billing = AdminResource::Server {
            backend: "billing/api".into(),
            server: "b1".into(),
        };
        let other = AdminResource::Server {
            backend: "shop/api".into(),
            server: "s1".into(),
        };
        assert!(
            p.authorize(("Workflow", "drain"), "server.set_state", &billing)
                .allowed
        );
        let d = p.authorize(("Workflow", "drain"), "server.set_state", &other);
        assert!(!d.allowed);
        assert!(d.reasons[0].contains("deny by default"), "{d:?}");
        assert!(
            !p.authorize(("Workflow", "drain"), "server.set_weight", &billing)
                .allowed
        );
        assert!(
            !p.authorize(("Trigger", "drain"), "server.set_state", &billing)
                .allowed
        );
        assert!(
            !p.authorize(
                ("Workflow", "drain"),
                "config.reload",
                &AdminResource::Config
            )
            .allowed
        );
    }

    #[test]
    fn forbid_wins_and_names_are_quoted_safely() {
        let p = policies(
            r#"permit(principal, action, resource);
forbid(principal, action == Portcullis::Admin::Action::"table.clear", resource == Portcullis::Table::"per_ip");"#,
        );
        assert!(
            p.authorize(
                ("Trigger", "t"),
                "table.set",
                &AdminResource::Table("per_ip".into())
            )
            .allowed
        );
        assert!(
            !p.authorize(
                ("Trigger", "t"),
                "table.clear",
                &AdminResource::Table("per_ip".into())
            )
            .allowed
        );
        // A name with quotes cannot break out of its uid.
        assert!(
            p.authorize(
                ("Trigger", "a\"b"),
                "route.switch",
                &AdminResource::Route("x/\"y".into())
            )
            .allowed
        );
    }

    #[test]
    fn people_need_a_permit_and_groups_scope_it() {
        let none = AdminPolicies::load(&[]).unwrap();
        assert!(
            !none
                .authorize_user(
                    ("User", "alice"),
                    &[],
                    "backends.read",
                    &AdminResource::Config
                )
                .allowed
        );
        let p = policies(
            r#"permit(principal in Portcullis::Group::"billing-oncall", action in [Portcullis::Admin::Action::"server.set_state", Portcullis::Admin::Action::"backends.read"], resource in Portcullis::App::"billing");
permit(principal in Portcullis::Group::"billing-oncall", action == Portcullis::Admin::Action::"backends.read", resource == Portcullis::Config::"config");
permit(principal == Portcullis::User::"bob", action == Portcullis::Admin::Action::"workflow.stop", resource in Portcullis::Workflow::"heal");"#,
        );
        let billing = AdminResource::Server {
            backend: "billing/api".into(),
            server: "b1".into(),
        };
        let shop = AdminResource::Server {
            backend: "shop/api".into(),
            server: "s1".into(),
        };
        let oncall = vec!["billing-oncall".to_string()];
        assert!(
            p.authorize_user(("User", "alice"), &oncall, "server.set_state", &billing)
                .allowed
        );
        assert!(
            !p.authorize_user(("User", "alice"), &oncall, "server.set_state", &shop)
                .allowed
        );
        assert!(
            !p.authorize_user(("User", "alice"), &[], "server.set_state", &billing)
                .allowed
        );
        assert!(
            p.authorize_user(
                ("User", "alice"),
                &oncall,
                "backends.read",
                &AdminResource::Config
            )
            .allowed
        );
        let heal = AdminResource::Execution {
            workflow: "heal".into(),
            id: "e1".into(),
        };
        let other = AdminResource::Execution {
            workflow: "other".into(),
            id: "e2".into(),
        };
        assert!(
            p.authorize_user(("User", "bob"), &[], "workflow.stop", &heal)
                .allowed
        );
        assert!(
            !p.authorize_user(("User", "bob"), &[], "workflow.stop", &other)
                .allowed
        );
    }

    #[test]
    fn a_bad_policy_file_is_located() {
        let dir = std::env::temp_dir().join(format!("pc-admin-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.cedar");
        std::fs::write(&f, "permit(principal, action, resource)\nwhen { nope };").unwrap();
        let e = AdminPolicies::load(std::slice::from_ref(&f)).unwrap_err();
        assert_eq!(e[0].file, f);
    }

    /// A policy that names an entity type or an action the model does not have would never
    /// apply (a forbid that forbids nothing): it is refused, where it is written, with the
    /// names the model has.
    #[test]
    fn names_outside_the_model_are_refused_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("admin.cedar");
        std::fs::write(
            &f,
            "permit(principal == Portcullis::Trigger::\"ok\", action == Portcullis::Admin::Action::\"table.set\", resource);\n\
             forbid(principal == Portcullis::Automation::\"t\", action, resource);\n\
             permit(principal, action == Portcullis::Admin::Action::\"server.drain\", resource in Portcullis::Ap::\"billing\");\n\
             permit(principal, action, resource) when { principal in Portcullis::Team::\"ops\" };\n",
        )
        .unwrap();
        let e = AdminPolicies::load(std::slice::from_ref(&f)).unwrap_err();
        let said: Vec<(usize, &str)> = e.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert_eq!(e.len(), 4, "{said:#?}");
        assert!(
            said[0].1.contains("`Portcullis::Automation`")
                && said[0].1.contains("Portcullis::Trigger::"),
            "{said:#?}"
        );
        assert_eq!(said[0].0, 2);
        assert!(
            said.iter()
                .any(|(l, m)| *l == 3 && m.contains("unknown admin action `server.drain`")),
            "{said:#?}"
        );
        assert!(
            said.iter()
                .any(|(l, m)| *l == 3 && m.contains("`Portcullis::Ap`")),
            "{said:#?}"
        );
        assert!(
            said.iter()
                .any(|(l, m)| *l == 4 && m.contains("`Portcullis::Team`")),
            "{said:#?}"
        );
        // Every name of the model is taken.
        std::fs::write(
            &f,
            "permit(principal in Portcullis::Group::\"ops\", action in [Portcullis::Admin::Action::\"server.set_state\", Portcullis::Admin::Action::\"audit.read\"], resource in Portcullis::App::\"billing\");\n\
             permit(principal == Portcullis::Agent::\"bot\", action, resource is Portcullis::EventType);\n\
             forbid(principal is Portcullis::Workflow, action, resource == Portcullis::Config::\"config\");\n",
        )
        .unwrap();
        assert!(AdminPolicies::load(std::slice::from_ref(&f)).is_ok());
    }
}
