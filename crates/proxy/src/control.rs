//! The control path: every change of runtime state is one [`Command`], made by one
//! [`Principal`], and goes through [`apply`], which validates it, writes its audit record, applies
//! it and logs it, in that order and in this one place.
//!
//! Callers: the admin API (`admin.rs`, a thin HTTP layer that turns a request into a `Command`
//! and a [`ControlError`] into a status), and later `portcullis ctl` and automation, each with
//! its own principal. Nothing else changes runtime state: a new kind of change (table entries,
//! bans, route switches) is a new `Command` variant here, not a new handler elsewhere.
//!
//! The pure part, [`resolve`], checks a command against a [`Snapshot`] without touching any
//! state, so it can be tested without sockets; [`apply`] adds the audit write and the effect.

use crate::limits::{Registry, TableRt};
use crate::snapshot::{BackendRt, Snapshot};
use crate::state::{AdminState, ServerState};
use crate::table_keys::HASHED_SCAN_MAX;
use crate::Runtime;
use http::StatusCode;
use portcullis_limits::{Clock, Key, Kind, Moment, MonotonicClock};
use portcullis_policy::admin::AdminResource;
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The weights an operator may set. 0 is not a weight: stopping traffic is a state.
pub const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;

/// One change of runtime state. Serialized as `{"action": "...", "args": {...}}`, the shape of
/// the `detail` of its audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "args", rename_all = "snake_case")]
pub enum Command {
    /// Puts a server in `ready`, `drain` or `maint`.
    #[serde(rename = "set_state")]
    SetServerState {
        /// The backend's full id (`app/name`), or its name when that is unique across apps.
        backend: String,
        server: String,
        state: AdminState,
    },
    /// Overrides a server's configured weight, within [`WEIGHTS`].
    #[serde(rename = "set_weight")]
    SetServerWeight {
        backend: String,
        server: String,
        weight: u32,
    },
    /// Loads, validates and swaps in the config from disk (see [`Runtime::reload`]).
    Reload,
    /// Sets a stick-table entry's `gpc0` (creating the entry), as HAProxy's `set table`.
    /// `key` is the key's text (see [`crate::table_keys`]).
    SetTableGpc {
        table: String,
        key: String,
        value: u64,
    },
    /// Adds a tag to a stick-table entry (creating the entry).
    SetTableTag {
        table: String,
        key: String,
        tag: String,
    },
    /// Removes a tag from an existing stick-table entry.
    RemoveTableTag {
        table: String,
        key: String,
        tag: String,
    },
    /// Forgets one stick-table entry, present or not.
    ClearTableKey { table: String, key: String },
    /// Forgets every entry of a stick table.
    ClearTable { table: String },
    /// Sends a route's requests to another backend until [`Command::RestoreRoute`] (kept
    /// across reloads while both exist; kept by the automation runtime).
    SwitchRoute {
        /// The route's full id (`app/name`), or its name when that is unique across apps.
        route: String,
        /// The backend's full id, or its name when that is unique across apps.
        backend: String,
    },
    /// Sends a route's requests back to its configured backend.
    RestoreRoute { route: String },
    /// Ends every browser session of a principal (`provider/subject`) opened until now, here
    /// and after a restart (recorded in the embedded store).
    RevokeSessions { principal: String },
}

impl Command {
    /// The action's name, as the audit record calls it (the serialized `action`).
    pub fn action(&self) -> &'static str {
        match self {
            Command::SetServerState { .. } => "set_state",
            Command::SetServerWeight { .. } => "set_weight",
            Command::Reload => "reload",
            Command::SetTableGpc { .. } => "set_table_gpc",
            Command::SetTableTag { .. } => "set_table_tag",
            Command::RemoveTableTag { .. } => "remove_table_tag",
            Command::ClearTableKey { .. } => "clear_table_key",
            Command::ClearTable { .. } => "clear_table",
            Command::SwitchRoute { .. } => "switch_route",
            Command::RestoreRoute { .. } => "restore_route",
            Command::RevokeSessions { .. } => "revoke_sessions",
        }
    }

    /// The action's arguments: the `args` of its serialized form (null for a reload).
    pub fn args(&self) -> Value {
        match serde_json::to_value(self) {
            Ok(Value::Object(mut m)) => m.remove("args").unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }
}

/// What kind of caller a principal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// A bearer token from `admin.tokens`: the admin API today.
    Token,
    /// A person signed in with an identity provider (the dashboard, `ctl`; for later).
    Person,
    /// An automation trigger acting on an event (the automation runtime).
    Trigger,
    /// A step of an automation workflow (for later).
    Workflow,
}

impl PrincipalKind {
    /// The `principal.provider` of audit records made by this kind of caller.
    fn audit_provider(self) -> &'static str {
        match self {
            PrincipalKind::Token | PrincipalKind::Person => "admin",
            PrincipalKind::Trigger => "trigger",
            PrincipalKind::Workflow => "workflow",
        }
    }

    /// How this kind of caller is named in a reload's trigger.
    fn via(self) -> &'static str {
        match self {
            PrincipalKind::Token | PrincipalKind::Person => "admin API",
            PrincipalKind::Trigger => "automation trigger",
            PrincipalKind::Workflow => "automation workflow",
        }
    }
}

/// Who asks for a command: written to its audit record and its log line. Never a secret.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Principal {
    /// For example `admin-token[0]@127.0.0.1:5555`: a token's position, never the token.
    pub who: String,
    pub kind: PrincipalKind,
    /// A person's identity (`admin.auth`): what `admin.policies` decide on, beyond the call
    /// itself, for commands whose target is in their body (where a switch sends a route),
    /// and who their audit records name.
    #[serde(skip)]
    pub person: Option<Arc<portcullis_identity::Identity>>,
}

impl Principal {
    /// The caller holding the `index`th token of `admin.tokens`, connected from `peer`.
    pub fn token(index: usize, peer: std::net::SocketAddr) -> Principal {
        Principal {
            who: format!("admin-token[{index}]@{peer}"),
            kind: PrincipalKind::Token,
            person: None,
        }
    }

    /// An automation principal (a trigger or a workflow), named `who`.
    pub fn automation(who: String, kind: PrincipalKind) -> Principal {
        Principal {
            who,
            kind,
            person: None,
        }
    }

    /// The audit record of `action` (with `args`) by this principal: a person as its
    /// identity names it (as its refusals are recorded, so that one search finds both), any
    /// other principal as `who`, under its kind's provider (`admin`, `trigger`, `workflow`).
    pub fn record(&self, action: &str, args: Value) -> portcullis_audit::Record {
        let mut rec = crate::audit::admin(&self.who, action, args);
        match &self.person {
            Some(id) => rec.principal = Some(crate::audit::principal(id)),
            None => {
                if let Some(p) = rec.principal.as_mut() {
                    p.provider = self.kind.audit_provider().into();
                }
            }
        }
        rec
    }
}

/// Why a command was not applied. In every case but [`ControlError::ReloadRejected`] nothing
/// changed and nothing was recorded; a rejected reload is recorded by the runtime. (One race
/// is the exception: a tag refused because another caller filled the entry's 16 tags between
/// the check and the change is recorded, as an attempt, and answered as `Invalid`.)
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such backend, server, stick table or table entry.
    #[error("{0}")]
    NotFound(String),
    /// The stick table does not store the counter the command sets or reads.
    #[error("{0}")]
    NotStored(String),
    /// A backend name that several apps use.
    #[error("{0}")]
    Ambiguous(String),
    /// A value out of range, with the way to do what was meant.
    #[error("{0}")]
    Invalid(String),
    /// The audit record could not be written, so the command was not applied.
    #[error("audit trail unavailable; nothing changed")]
    AuditUnavailable,
    /// The shared limit store (Redis) did not confirm the change in time (this process's
    /// table took it). A command already sent may still be applied when the store
    /// answers: the error says so, and to read the entry.
    #[error("the shared limit store did not confirm the change, which may still take effect when it answers (read the entry to know): {0}")]
    StoreUnavailable(String),
    /// `admin.policies` do not permit this automation principal the command; the refusal
    /// is recorded.
    #[error("{0}")]
    Forbidden(String),
    /// The config on disk was rejected; `serving_version` keeps serving.
    #[error("config reload rejected: {error}")]
    ReloadRejected {
        error: String,
        serving_version: String,
    },
}

impl ControlError {
    /// The HTTP status of the admin API's answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControlError::Ambiguous(_) => StatusCode::CONFLICT,
            ControlError::NotStored(_) => StatusCode::CONFLICT,
            ControlError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::ReloadRejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// A command checked against a snapshot, ready to apply.
pub struct Resolved {
    /// The command with the backend written as its full id and a table key in its canonical
    /// text: what is audited and answered.
    pub command: Command,
    target: Target,
}

enum Target {
    Server(Arc<ServerState>),
    Config,
    /// A stick table, and the entry's key for the commands that name one.
    Table(Arc<TableRt>, Option<Key>),
    /// A route (its id), and the backend (its id) to switch it to, or none to restore it.
    Route(String, Option<String>),
    /// A principal's sessions.
    Sessions(String),
}

/// Finds a stick table the serving config defines, running in `tables`.
pub fn find_table(
    snap: &Snapshot,
    tables: &Registry,
    name: &str,
) -> Result<Arc<TableRt>, ControlError> {
    let defs = &snap.config.stick_tables;
    if let Some(t) = defs
        .iter()
        .any(|d| d.name == name)
        .then(|| tables.get(name))
        .flatten()
    {
        return Ok(t);
    }
    let known = defs
        .iter()
        .map(|d| format!("`{}`", d.name))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ControlError::NotFound(if known.is_empty() {
        format!("no stick table `{name}`: none is defined")
    } else {
        format!("no stick table `{name}`; the tables are {known}")
    }))
}

/// Checks that `t` stores `kind` (a clear 409 otherwise).
fn require(t: &TableRt, kind: Kind) -> Result<(), ControlError> {
    let spec = t.table.spec();
    if spec.stores(kind) {
        return Ok(());
    }
    let stored = spec
        .store()
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ControlError::NotStored(format!(
        "stick table `{}` does not store `{kind}` (it stores {stored}): add `{kind}` to its \
         `store` list to set it at runtime",
        t.name
    )))
}

/// Checks a tag by the limits crate's own rule: a scratch one-entry table that stores tags is
/// asked to hold it. (The crate keeps the rule private; this stays exactly in step with it.)
fn check_tag(tag: &str) -> Result<(), ControlError> {
    let spec = portcullis_limits::TableSpec::new(
        1,
        std::time::Duration::from_secs(1),
        [portcullis_limits::Counter::Tags],
    )
    .map_err(|e| ControlError::Invalid(e.to_string()))?;
    portcullis_limits::Table::new(spec)
        .set_tag(&Key::new(b"check"), Moment::ZERO, tag)
        .map(drop)
        .map_err(|e| ControlError::Invalid(e.to_string()))
}

/// Checks a table command: the table, what it stores, the tag, the key. Returns the command
/// with the key in its canonical text, and its target.
fn resolve_table(
    snap: &Snapshot,
    tables: &Registry,
    cmd: Command,
) -> Result<Resolved, ControlError> {
    let now = MonotonicClock.now();
    let key = |t: &TableRt, text: &str| -> Result<(Key, String), ControlError> {
        let k = table_key(t, text, now)?;
        let text = crate::table_keys::key_to_text(&t.parts, &k);
        Ok((k, text))
    };
    let (command, table, k) = match cmd {
        Command::SetTableGpc {
            table,
            key: text,
            value,
        } => {
            let t = find_table(snap, tables, &table)?;
            require(&t, Kind::Gpc0)?;
            let (k, key) = key(&t, &text)?;
            (Command::SetTableGpc { table, key, value }, t, Some(k))
        }
        Command::SetTableTag {
            table,
            key: text,
            tag,
        } => {
            check_tag(&tag)?;
            let t = find_table(snap, tables, &table)?;
            require(&t, Kind::Tags)?;
            let (k, key) = key(&t, &text)?;
            if let Some(s) = t.table.get(&k, now) {
                let max = portcullis_limits::table::MAX_TAGS;
                if !s.has_tag(&tag) && s.tags.len() >= max {
                    return Err(ControlError::Invalid(format!(
                        "entry `{key}` of stick table `{table}` already holds {max} tags, the \
                         most an entry holds; remove one first"
                    )));
                }
            }
            (Command::SetTableTag { table, key, tag }, t, Some(k))
        }
        Command::RemoveTableTag {
            table,
            key: text,
            tag,
        } => {
            check_tag(&tag)?;
            let t = find_table(snap, tables, &table)?;
            require(&t, Kind::Tags)?;
            let (k, key) = key(&t, &text)?;
            // In a fleet the entry is in Redis: one this process never saw may be there.
            if tables.fleet.is_none() && t.table.get(&k, now).is_none() {
                return Err(ControlError::NotFound(format!(
                    "no entry `{key}` in stick table `{table}`"
                )));
            }
            (Command::RemoveTableTag { table, key, tag }, t, Some(k))
        }
        Command::ClearTableKey { table, key: text } => {
            let t = find_table(snap, tables, &table)?;
            let (k, key) = key(&t, &text)?;
            (Command::ClearTableKey { table, key }, t, Some(k))
        }
        Command::ClearTable { table } => {
            let t = find_table(snap, tables, &table)?;
            (Command::ClearTable { table }, t, None)
        }
        other => unreachable!("not a table command: {}", other.action()),
    };
    Ok(Resolved {
        command,
        target: Target::Table(table, k),
    })
}

/// Finds a backend by full id (`app/name`) or by a name unique across apps.
pub fn find_backend<'a>(
    snap: &'a Snapshot,
    name: &str,
) -> Result<&'a Arc<BackendRt>, ControlError> {
    if let Some(b) = snap.backend(name) {
        return Ok(b);
    }
    by_name(&snap.backends, |b| &b.id, "backend", name, "%2F")
}

/// The one item whose id (`app/name`) ends in `name`: not found, or ambiguous across apps
/// (then the id is the way to name it; `sep` is how the caller writes the slash).
fn by_name<'a, T>(
    items: &'a [T],
    id: impl Fn(&T) -> &str,
    what: &str,
    name: &str,
    sep: &str,
) -> Result<&'a T, ControlError> {
    let matches: Vec<&T> = items
        .iter()
        .filter(|t| id(t).rsplit_once('/').is_some_and(|(_, n)| n == name))
        .collect();
    match matches.as_slice() {
        [t] => Ok(t),
        [] => Err(ControlError::NotFound(format!("no {what} `{name}`"))),
        _ => Err(ControlError::Ambiguous(format!(
            "{what} name `{name}` is ambiguous: use `app{sep}{name}`"
        ))),
    }
}

/// Finds a route by full id (`app/name`) or by a name unique across apps.
pub fn find_route<'a>(
    snap: &'a Snapshot,
    name: &str,
) -> Result<&'a crate::snapshot::RouteRt, ControlError> {
    if let Some(r) = snap.routes.iter().find(|r| &*r.id == name) {
        return Ok(r);
    }
    by_name(&snap.routes, |r| &r.id, "route", name, "/")
}

/// Checks `cmd` against `snap` (and, for a stick-table command, the running `tables`): the
/// values first, then the backend and server, or the table and key, it names. Pure: changes
/// nothing and records nothing.
pub fn resolve(snap: &Snapshot, tables: &Registry, cmd: Command) -> Result<Resolved, ControlError> {
    let server =
        |backend: &str, server: &str| -> Result<(String, Arc<ServerState>), ControlError> {
            let b = find_backend(snap, backend)?;
            let i = b
                .servers
                .iter()
                .position(|s| s.name == server)
                .ok_or_else(|| {
                    ControlError::NotFound(format!("no server `{server}` in backend `{}`", b.id))
                })?;
            Ok((b.id.clone(), b.slots[i].state.clone()))
        };
    match cmd {
        Command::SetServerState {
            backend,
            server: name,
            state,
        } => {
            let (backend, st) = server(&backend, &name)?;
            Ok(Resolved {
                command: Command::SetServerState {
                    backend,
                    server: name,
                    state,
                },
                target: Target::Server(st),
            })
        }
        Command::SetServerWeight {
            backend,
            server: name,
            weight,
        } => {
            if !WEIGHTS.contains(&weight) {
                return Err(ControlError::Invalid(format!(
                    "weight must be between {} and {}; use state `drain` or `maint` to stop traffic",
                    WEIGHTS.start(),
                    WEIGHTS.end()
                )));
            }
            let (backend, st) = server(&backend, &name)?;
            Ok(Resolved {
                command: Command::SetServerWeight {
                    backend,
                    server: name,
                    weight,
                },
                target: Target::Server(st),
            })
        }
        Command::Reload => Ok(Resolved {
            command: Command::Reload,
            target: Target::Config,
        }),
        cmd @ (Command::SetTableGpc { .. }
        | Command::SetTableTag { .. }
        | Command::RemoveTableTag { .. }
        | Command::ClearTableKey { .. }
        | Command::ClearTable { .. }) => resolve_table(snap, tables, cmd),
        Command::SwitchRoute { route, backend } => {
            let route = find_route(snap, &route)?.id.to_string();
            let backend = find_backend(snap, &backend)?.id.clone();
            Ok(Resolved {
                command: Command::SwitchRoute {
                    route: route.clone(),
                    backend: backend.clone(),
                },
                target: Target::Route(route, Some(backend)),
            })
        }
        Command::RestoreRoute { route } => {
            let route = find_route(snap, &route)?.id.to_string();
            Ok(Resolved {
                command: Command::RestoreRoute {
                    route: route.clone(),
                },
                target: Target::Route(route, None),
            })
        }
        Command::RevokeSessions { principal } => {
            let p = principal.trim();
            if p.is_empty() || !p.contains('/') || p.len() > 512 {
                return Err(ControlError::Invalid(format!(
                    "`{principal}` is not a principal: write `provider/subject`, as in the audit trail"
                )));
            }
            Ok(Resolved {
                command: Command::RevokeSessions {
                    principal: p.to_string(),
                },
                target: Target::Sessions(p.to_string()),
            })
        }
    }
}

/// Validates `cmd`, records it in the audit trail, applies it and logs it with `by`. Returns
/// the result as JSON: the command's arguments (backend as full id) for a server;
/// `{"result": "ok", "version": ...}` for a reload; the entry after the change for a table
/// entry's `gpc0` or tags (see [`crate::table_keys::entry_json`], null if it is gone);
/// `{"table", "key", "cleared": bool}` for a cleared entry and `{"table", "removed": n}` for
/// a cleared table; `{"route", "backend", "configured", "before"}` for a switched or restored
/// route (`backend` where its requests go now, `before` where they went: null for its own).
///
/// A server or table command is recorded before it is applied; if the record cannot be
/// written it is not applied ([`ControlError::AuditUnavailable`]). A reload is recorded by
/// [`Runtime::reload`] itself, once, after the outcome is known (with `by` in its trigger), so
/// no second record is written here.
pub async fn apply(rt: &Runtime, by: &Principal, cmd: Command) -> Result<Value, ControlError> {
    let snap = rt.shared.snapshot.load_full();
    let Resolved { command, target } = resolve(&snap, &rt.shared.limits, cmd)?;
    authorize(rt, &snap, by, &command).await?;
    if let Target::Config = target {
        return reload(rt, by).await;
    }
    let args = command.args();
    let mut rec = by.record(command.action(), args.clone());
    rec.decision = Some(portcullis_audit::Decision::Allow);
    if !crate::audit::write(&rt.shared, rec).await {
        return Err(ControlError::AuditUnavailable);
    }
    let server = match target {
        Target::Server(st) => st,
        Target::Table(t, key) => {
            let Some(f) = &rt.shared.limits.fleet else {
                return apply_table(by, &command, &t, key);
            };
            shared_table(f, &command, &t, key.as_ref()).await?;
            // This process's copy (conn_cur, and what its own requests read until the next
            // check) follows; the answer is the entry as the fleet has it.
            let here = apply_table(by, &command, &t, key.clone());
            return match (&command, key) {
                (Command::ClearTableKey { .. } | Command::ClearTable { .. }, _) | (_, None) => here,
                (_, Some(k)) => shared_entry(f, &t, &k).await,
            };
        }
        Target::Route(route, backend) => return Ok(switch(rt, by, &route, backend.as_deref())),
        Target::Sessions(principal) => return revoke_sessions(rt, by, &principal).await,
        Target::Config => unreachable!("a reload returned above"),
    };
    match &command {
        Command::SetServerState {
            backend,
            server: name,
            state,
        } => {
            server.set_admin_state(*state);
            tracing::info!(actor = %by.who, kind = ?by.kind, backend = %backend, server = %name, state = ?state, "control: server state changed");
        }
        Command::SetServerWeight {
            backend,
            server: name,
            weight,
        } => {
            server.set_weight_override(*weight);
            tracing::info!(actor = %by.who, kind = ?by.kind, backend = %backend, server = %name, weight, "control: server weight changed");
        }
        _ => unreachable!("not a server command: {}", command.action()),
    }
    Ok(args)
}

/// What `admin.policies` call a command: its action and the resource it acts on.
pub fn admin_target(command: &Command) -> (&'static str, AdminResource) {
    match command {
        Command::SetServerState {
            backend, server, ..
        } => (
            "server.set_state",
            AdminResource::Server {
                backend: backend.clone(),
                server: server.clone(),
            },
        ),
        Command::SetServerWeight {
            backend, server, ..
        } => (
            "server.set_weight",
            AdminResource::Server {
                backend: backend.clone(),
                server: server.clone(),
            },
        ),
        Command::Reload => ("config.reload", AdminResource::Config),
        Command::SetTableGpc { table, .. }
        | Command::SetTableTag { table, .. }
        | Command::RemoveTableTag { table, .. } => {
            ("table.set", AdminResource::Table(table.clone()))
        }
        Command::ClearTableKey { table, .. } | Command::ClearTable { table } => {
            ("table.clear", AdminResource::Table(table.clone()))
        }
        Command::SwitchRoute { route, .. } => ("route.switch", AdminResource::Route(route.clone())),
        Command::RestoreRoute { route } => ("route.restore", AdminResource::Route(route.clone())),
        Command::RevokeSessions { .. } => ("sessions.revoke", AdminResource::Config),
    }
}

/// A trigger's or a workflow's command must be permitted by `admin.policies` (when there
/// are any). A refusal is recorded (decision `deny`, with the reasons) and answered as
/// [`ControlError::Forbidden`]. Operators' tokens are not checked here.
async fn authorize(
    rt: &Runtime,
    snap: &Snapshot,
    by: &Principal,
    command: &Command,
) -> Result<(), ControlError> {
    let ty = match by.kind {
        PrincipalKind::Trigger => "Trigger",
        PrincipalKind::Workflow => "Workflow",
        PrincipalKind::Person => return authorize_person(rt, snap, by, command).await,
        PrincipalKind::Token => return Ok(()),
    };
    let name = by.who.split('#').next().unwrap_or(&by.who);
    let (action, resource) = admin_target(command);
    let mut d = snap.admin_policies.authorize((ty, name), action, &resource);
    // A switch is decided on where it sends the route too: a permit on the route alone
    // would let an event's data pick any backend.
    if let (true, Command::SwitchRoute { backend, .. }) = (d.allowed, command) {
        let to = AdminResource::Backend(backend.clone());
        d = snap.admin_policies.authorize((ty, name), action, &to);
    }
    if d.allowed {
        return Ok(());
    }
    let mut rec = by.record(command.action(), command.args());
    rec.decision = Some(portcullis_audit::Decision::Deny);
    rec.reasons = d.reasons.clone();
    crate::audit::write(&rt.shared, rec).await;
    tracing::warn!(actor = %by.who, kind = ?by.kind, action, reasons = ?d.reasons, "control: command forbidden by admin.policies");
    Err(ControlError::Forbidden(format!(
        "Portcullis::{ty}::\"{name}\" may not {action} here: {}",
        d.reasons.join(", ")
    )))
}

/// Whether automation principal `by` (a trigger, or a workflow's execution) may start
/// `workflow` (`workflow.start` on `Portcullis::Workflow::"name"` in `admin.policies`): the
/// started execution acts as its own workflow, with that workflow's permissions, so a
/// trigger or workflow that may do nothing else must not reach them by starting it. A
/// refusal is audited as a command's is. People and tokens are decided by the admin API.
pub async fn authorize_start(
    rt: &Runtime,
    by: &Principal,
    workflow: &str,
    args: Value,
) -> Result<(), ControlError> {
    let ty = match by.kind {
        PrincipalKind::Trigger => "Trigger",
        PrincipalKind::Workflow => "Workflow",
        PrincipalKind::Person | PrincipalKind::Token => return Ok(()),
    };
    let snap = rt.shared.snapshot.load();
    let name = by.who.split('#').next().unwrap_or(&by.who);
    let action = "workflow.start";
    let d = snap.admin_policies.authorize(
        (ty, name),
        action,
        &AdminResource::Workflow(workflow.to_string()),
    );
    if d.allowed {
        return Ok(());
    }
    let mut rec = by.record("start_workflow", args);
    rec.decision = Some(portcullis_audit::Decision::Deny);
    rec.reasons = d.reasons.clone();
    crate::audit::write(&rt.shared, rec).await;
    tracing::warn!(actor = %by.who, kind = ?by.kind, action, workflow, reasons = ?d.reasons, "control: workflow start forbidden by admin.policies");
    Err(ControlError::Forbidden(format!(
        "Portcullis::{ty}::\"{name}\" may not {action} `{workflow}`: {}",
        d.reasons.join(", ")
    )))
}

/// A person's command: the admin API decided the call on its path's resource before it got
/// here; what its body names is decided here. A switch needs `route.switch` on the backend
/// it sends the route to as well (a permit on one app's route must not send it to another
/// app's backend), as for automation.
async fn authorize_person(
    rt: &Runtime,
    snap: &Snapshot,
    by: &Principal,
    command: &Command,
) -> Result<(), ControlError> {
    let (Some(id), Command::SwitchRoute { backend, .. }) = (&by.person, command) else {
        return Ok(());
    };
    let (action, _) = admin_target(command);
    let to = AdminResource::Backend(backend.clone());
    let d = snap.admin_policies.authorize_identity(id, action, &to);
    if d.allowed {
        return Ok(());
    }
    let mut rec = by.record(command.action(), command.args());
    rec.decision = Some(portcullis_audit::Decision::Deny);
    rec.reasons = d.reasons.clone();
    crate::audit::write(&rt.shared, rec).await;
    tracing::warn!(actor = %by.who, action, backend = %backend, reasons = ?d.reasons, "control: switch to a backend admin.policies do not permit");
    Err(ControlError::Forbidden(format!(
        "{} may not {action} to backend `{backend}`: {}",
        by.who,
        d.reasons.join(", ")
    )))
}

/// Revokes a principal's sessions: recorded in the embedded store (opened if need be), then
/// applied to the serving identity engine (later ones load it from the store).
async fn revoke_sessions(
    rt: &Runtime,
    by: &Principal,
    principal: &str,
) -> Result<Value, ControlError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = rt.shared.snapshot.load().config.state_dir.clone();
    let p = principal.to_string();
    let shared = rt.shared.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let plans = &shared.limits.plans;
        if plans.store().is_none() {
            plans.open_store(&dir).map_err(|e| e.to_string())?;
        }
        let store = plans.store().ok_or("no embedded store")?;
        store
            .revoke_sessions(&p, i64::try_from(now).unwrap_or(i64::MAX))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ControlError::StoreUnavailable(e.to_string()))?;
    stored.map_err(ControlError::StoreUnavailable)?;
    rt.shared
        .snapshot
        .load()
        .identity
        .store
        .revoke_principal(principal, now);
    tracing::info!(actor = %by.who, kind = ?by.kind, %principal, "control: sessions revoked");
    Ok(json!({ "principal": principal, "revoked_at": now }))
}

/// Applies a resolved, recorded route switch (or restore), and logs it.
fn switch(rt: &Runtime, by: &Principal, route: &str, backend: Option<&str>) -> Value {
    let before = rt
        .automation
        .routes
        .set(&rt.shared.snapshot, route, backend);
    let snap = rt.shared.snapshot.load();
    let configured = snap
        .routes
        .iter()
        .find(|r| &*r.id == route)
        .map(|r| r.backend.id.clone());
    let now = backend.map(str::to_string).or_else(|| configured.clone());
    match backend {
        Some(b) => {
            tracing::warn!(actor = %by.who, kind = ?by.kind, %route, backend = %b, "control: route switched")
        }
        None => {
            tracing::info!(actor = %by.who, kind = ?by.kind, %route, "control: route restored to its own backend")
        }
    }
    json!({ "route": route, "backend": now, "configured": configured, "before": before })
}

/// In a fleet, what lives in Redis (`gpc0`, tags, the request and error counts) changes
/// there too: set `gpc0`, add or remove a tag, clear a key or a table. `conn_cur` is per
/// process.
async fn shared_table(
    f: &crate::limits::Fleet,
    command: &Command,
    t: &TableRt,
    key: Option<&Key>,
) -> Result<(), ControlError> {
    let bad =
        |e: portcullis_limits::redis::StoreError| ControlError::StoreUnavailable(e.to_string());
    match (command, key) {
        (Command::SetTableGpc { value, .. }, Some(k)) => {
            f.store
                .set_gpc(&t.name, t.table.spec(), k, *value)
                .await
                .map_err(bad)?;
        }
        (Command::SetTableTag { tag, .. }, Some(k)) => {
            tag_shared(f, t, k, tag, true).await?;
        }
        (Command::RemoveTableTag { tag, .. }, Some(k)) => {
            tag_shared(f, t, k, tag, false).await?;
        }
        (Command::ClearTableKey { .. }, Some(k)) => {
            f.store.clear(&t.name, Some(k)).await.map_err(bad)?;
        }
        (Command::ClearTable { .. }, _) => {
            f.store.clear(&t.name, None).await.map_err(bad)?;
        }
        _ => {}
    }
    Ok(())
}

/// The entry as Redis holds it, with this process's `conn_cur`; null if it is gone.
async fn shared_entry(
    f: &crate::limits::Fleet,
    t: &TableRt,
    key: &Key,
) -> Result<Value, ControlError> {
    let shared = f
        .store
        .get(&t.name, t.table.spec(), key)
        .await
        .map_err(|e| ControlError::StoreUnavailable(e.to_string()))?;
    Ok(shared.map_or(Value::Null, |mut s| {
        s.conn_cur = t
            .table
            .get(key, MonotonicClock.now())
            .and_then(|l| l.conn_cur);
        let mut e = crate::table_keys::entry_json(t, key, &s);
        e["table"] = json!(t.name);
        e
    }))
}

/// A tag added or removed in Redis: a full entry is the caller's mistake (400), anything
/// else the store's (503).
async fn tag_shared(
    f: &crate::limits::Fleet,
    t: &TableRt,
    key: &Key,
    tag: &str,
    add: bool,
) -> Result<(), ControlError> {
    match f.store.tag(&t.name, t.table.spec(), key, tag, add).await {
        Ok(_) => Ok(()),
        Err(portcullis_limits::redis::StoreError::Limits(e)) => {
            Err(ControlError::Invalid(e.to_string()))
        }
        Err(e) => Err(ControlError::StoreUnavailable(e.to_string())),
    }
}

/// Applies a resolved, recorded table command, and logs it. It fails only in a race that
/// resolving could not see (another caller filled the entry's tags meanwhile); the record of
/// the attempt stays.
fn apply_table(
    by: &Principal,
    command: &Command,
    t: &TableRt,
    key: Option<Key>,
) -> Result<Value, ControlError> {
    let now = MonotonicClock.now();
    let entry = |k: &Key| {
        t.table.get(k, now).map_or(Value::Null, |s| {
            let mut e = crate::table_keys::entry_json(t, k, &s);
            e["table"] = json!(t.name);
            e
        })
    };
    let key = key.unwrap_or_else(|| Key::new(&[]));
    let (out, outcome) = match command {
        Command::SetTableGpc { value, .. } => {
            // Resolve checked that the table stores `gpc0`; a table's spec never changes.
            let r = t.table.set_gpc(&key, now, *value).map(drop);
            (entry(&key), r.err().map(|e| e.to_string()))
        }
        Command::SetTableTag { tag, .. } => {
            // Only a race with another caller filling the entry's tags can fail here.
            let r = t.table.set_tag(&key, now, tag).map(drop);
            (entry(&key), r.err().map(|e| e.to_string()))
        }
        Command::RemoveTableTag { tag, .. } => {
            let r = t.table.remove_tag(&key, now, tag).map(drop);
            (entry(&key), r.err().map(|e| e.to_string()))
        }
        Command::ClearTableKey { table, key: text } => {
            let cleared = t.table.clear(&key);
            (
                json!({ "table": table, "key": text, "cleared": cleared }),
                None,
            )
        }
        Command::ClearTable { table } => {
            let removed = t.table.len();
            t.table.clear_all();
            (json!({ "table": table, "removed": removed }), None)
        }
        _ => unreachable!("not a table command: {}", command.action()),
    };
    let key_text = match command {
        Command::SetTableGpc { key, .. }
        | Command::SetTableTag { key, .. }
        | Command::RemoveTableTag { key, .. }
        | Command::ClearTableKey { key, .. } => key.as_str(),
        _ => "",
    };
    match outcome {
        None => {
            tracing::info!(actor = %by.who, kind = ?by.kind, table = %t.name, key = %key_text, action = command.action(), "control: stick table changed");
            Ok(out)
        }
        Some(error) => {
            tracing::warn!(actor = %by.who, kind = ?by.kind, table = %t.name, key = %key_text, action = command.action(), %error, "control: stick table change not applied");
            Err(ControlError::Invalid(error))
        }
    }
}

async fn reload(rt: &Runtime, by: &Principal) -> Result<Value, ControlError> {
    tracing::info!(actor = %by.who, kind = ?by.kind, "control: reload requested");
    match rt.reload(&format!("{} ({})", by.kind.via(), by.who)).await {
        Ok(version) => Ok(json!({ "result": "ok", "version": version })),
        Err(error) => Err(ControlError::ReloadRejected {
            error,
            serving_version: rt.shared.snapshot.load().version.clone(),
        }),
    }
}

/// The key `text` names in table `t`: [`crate::table_keys::parse_key`], and a `sha256:` key found among the
/// table's live entries (a hashed key cannot be rebuilt from its digest).
pub fn table_key(t: &TableRt, text: &str, now: Moment) -> Result<Key, ControlError> {
    let digest = match crate::table_keys::parse_key(&t.parts, text) {
        Ok(crate::table_keys::KeyText::Key(k)) => return Ok(k),
        Ok(crate::table_keys::KeyText::Hashed(d)) => d,
        Err(e) => {
            return Err(ControlError::Invalid(format!(
                "stick table `{}`: {e}",
                t.name
            )))
        }
    };
    let Some(by) = crate::table_keys::numeric(t).next() else {
        return Err(ControlError::Invalid(format!(
            "stick table `{}` stores no counter to search its entries by; give the key's full \
             text instead of `sha256:`",
            t.name
        )));
    };
    if t.table.len() > HASHED_SCAN_MAX {
        return Err(ControlError::Invalid(format!(
            "stick table `{}` holds over {HASHED_SCAN_MAX} entries, too many to search for a \
             `sha256:` key; give the key's full text",
            t.name
        )));
    }
    let all = t
        .table
        .top(t.table.len(), by, now)
        .map_err(|e| ControlError::Invalid(e.to_string()))?;
    all.into_iter()
        .map(|(k, _)| k)
        .find(|k| k.is_hashed() && k.as_bytes() == digest.as_slice())
        .ok_or_else(|| {
            ControlError::NotFound(format!(
                "no entry `{}` in stick table `{}`",
                crate::table_keys::shorten(text),
                t.name
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BACKEND: &str = r#"
backends:
  - name: b
    servers:
      - { name: s1, address: "builtin:echo" }
      - { name: s2, address: "builtin:echo" }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"#;

    /// A runtime on `dir/portcullis.yaml`: one listener on a free port, backend `b` (id
    /// `default/b`) with servers `s1` and `s2`, and the audit trail in `dir/audit` (or off).
    async fn runtime(dir: &Path, audit: bool, extra: &str) -> Arc<Runtime> {
        let audit = if audit {
            format!(
                "{{ sink: file, dir: \"{}\", fsync: every_record }}",
                dir.join("audit").display()
            )
        } else {
            "{ sink: off }".into()
        };
        let yaml = format!(
            "listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\n\
             access_log: {{ path: \"off\" }}\n\
             audit: {audit}\n{extra}{BACKEND}"
        );
        let path = dir.join("portcullis.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = portcullis_config::load(&path).unwrap();
        Runtime::start(config).await.unwrap()
    }

    fn token() -> Principal {
        Principal::token(0, "127.0.0.1:5555".parse().unwrap())
    }

    fn state(rt: &Runtime, server: &str) -> (AdminState, Option<u32>) {
        let snap = rt.shared.snapshot.load();
        let b = snap.backend("default/b").unwrap();
        let i = b.servers.iter().position(|s| s.name == server).unwrap();
        let st = &b.slots[i].state;
        (st.admin_state(), st.weight_override())
    }

    fn records(dir: &Path) -> Vec<Value> {
        crate::testkit::audit_records(dir)
    }

    fn admin_records(dir: &Path, action: &str) -> Vec<Value> {
        records(dir)
            .into_iter()
            .filter(|r| r["kind"] == "admin" && r["detail"]["action"] == action)
            .collect()
    }

    fn set_state(backend: &str, server: &str, state: AdminState) -> Command {
        Command::SetServerState {
            backend: backend.into(),
            server: server.into(),
            state,
        }
    }

    fn set_weight(backend: &str, server: &str, weight: u32) -> Command {
        Command::SetServerWeight {
            backend: backend.into(),
            server: server.into(),
            weight,
        }
    }

    #[tokio::test]
    async fn resolve_finds_backends_by_id_or_unique_name_and_rejects_bad_commands() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        std::fs::write(
            dir.path().join("apps/other.yaml"),
            "name: other\nbackends:\n  - { name: b, servers: [{ name: s1, address: \"builtin:echo\" }] }\n  - { name: c, servers: [{ name: s1, address: \"builtin:echo\" }] }\n",
        )
        .unwrap();
        let rt = runtime(dir.path(), false, "apps: { include: [\"apps/*.yaml\"] }\n").await;
        let snap = rt.shared.snapshot.load_full();

        // By full id, and by a name only one app uses: the command names the full id.
        let r = resolve(
            &snap,
            &rt.shared.limits,
            set_state("default/b", "s2", AdminState::Drain),
        )
        .unwrap();
        assert_eq!(r.command, set_state("default/b", "s2", AdminState::Drain));
        let r = resolve(&snap, &rt.shared.limits, set_weight("c", "s1", 5)).unwrap();
        assert_eq!(r.command, set_weight("other/c", "s1", 5));
        assert_eq!(
            serde_json::to_value(&r.command).unwrap(),
            json!({ "action": "set_weight", "args": { "backend": "other/c", "server": "s1", "weight": 5 } })
        );
        for cmd in [
            set_state("b", "s1", AdminState::Ready),
            set_weight("b", "s1", 1),
            Command::Reload,
        ] {
            let v = serde_json::to_value(&cmd).unwrap();
            assert_eq!(v["action"], cmd.action(), "{v}");
        }
        assert!(matches!(
            resolve(&snap, &rt.shared.limits, Command::Reload)
                .unwrap()
                .target,
            Target::Config
        ));

        let err = |cmd| {
            resolve(&snap, &rt.shared.limits, cmd)
                .err()
                .expect("a bad command")
        };
        let e = err(set_state("b", "s1", AdminState::Maint));
        assert!(matches!(e, ControlError::Ambiguous(_)), "{e}");
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(
            e.to_string(),
            "backend name `b` is ambiguous: use `app%2Fb`"
        );
        let e = err(set_state("nope", "s1", AdminState::Maint));
        assert!(matches!(e, ControlError::NotFound(_)), "{e}");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "no backend `nope`");
        let e = err(set_weight("default/b", "s9", 2));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "no server `s9` in backend `default/b`");
        for w in [0, 1001] {
            // The value is checked first, whatever it names.
            for backend in ["default/b", "nope"] {
                let e = err(set_weight(backend, "s1", w));
                assert!(matches!(e, ControlError::Invalid(_)), "{w}: {e}");
                assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                assert!(e.to_string().contains("between 1 and 1000"), "{e}");
                assert!(e.to_string().contains("`drain` or `maint`"), "{e}");
            }
        }
        for w in [1, 1000] {
            assert!(resolve(&snap, &rt.shared.limits, set_weight("default/b", "s1", w)).is_ok());
        }
        // Resolving changed nothing.
        assert_eq!(state(&rt, "s2"), (AdminState::Ready, None));
        assert_eq!(state(&rt, "s1"), (AdminState::Ready, None));
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn a_command_is_applied_once_and_audited_once() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), true, "").await;
        let by = token();

        let out = apply(&rt, &by, set_state("b", "s2", AdminState::Drain))
            .await
            .unwrap();
        assert_eq!(
            out,
            json!({ "backend": "default/b", "server": "s2", "state": "drain" })
        );
        assert_eq!(state(&rt, "s2"), (AdminState::Drain, None));
        assert_eq!(state(&rt, "s1"), (AdminState::Ready, None));
        let recs = admin_records(dir.path(), "set_state");
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["detail"]["args"], out);
        assert_eq!(
            recs[0]["principal"]["user"],
            "admin-token[0]@127.0.0.1:5555"
        );
        assert_eq!(recs[0]["principal"]["provider"], "admin");

        let out = apply(&rt, &by, set_weight("default/b", "s1", 7))
            .await
            .unwrap();
        assert_eq!(
            out,
            json!({ "backend": "default/b", "server": "s1", "weight": 7 })
        );
        assert_eq!(state(&rt, "s1"), (AdminState::Ready, Some(7)));
        let recs = admin_records(dir.path(), "set_weight");
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["detail"]["args"], out);
        // Only those two records, and no reload record.
        assert_eq!(records(dir.path()).len(), 2, "{:?}", records(dir.path()));
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn a_bad_command_changes_nothing_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), true, "").await;
        let by = token();
        for (cmd, status) in [
            (set_state("nope", "s1", AdminState::Maint), 404),
            (set_state("b", "s9", AdminState::Maint), 404),
            (set_weight("nope", "s1", 5), 404),
            (set_weight("b", "s9", 5), 404),
            (set_weight("b", "s1", 0), 400),
            (set_weight("b", "s1", 1001), 400),
        ] {
            let shown = format!("{cmd:?}");
            let e = apply(&rt, &by, cmd).await.expect_err(&shown);
            assert_eq!(e.status().as_u16(), status, "{shown}: {e}");
        }
        assert_eq!(state(&rt, "s1"), (AdminState::Ready, None));
        assert_eq!(state(&rt, "s2"), (AdminState::Ready, None));
        assert_eq!(records(dir.path()), Vec::<Value>::new());
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn a_reload_is_audited_once_by_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), true, "").await;
        let by = token();
        let path = dir.path().join("portcullis.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let reloads = |result: &str| -> Vec<Value> {
            records(dir.path())
                .into_iter()
                .filter(|r| r["kind"] == "reload" && r["detail"]["result"] == result)
                .collect()
        };

        std::fs::write(&path, yaml.replace("path_prefix: /", "path_prefix: /x")).unwrap();
        let out = apply(&rt, &by, Command::Reload).await.unwrap();
        let version = rt.shared.snapshot.load().version.clone();
        assert_eq!(out, json!({ "result": "ok", "version": version }));
        let ok = reloads("ok");
        assert_eq!(ok.len(), 1, "{ok:?}");
        assert_eq!(
            ok[0]["detail"]["trigger"],
            "admin API (admin-token[0]@127.0.0.1:5555)"
        );

        std::fs::write(&path, yaml.clone() + "\nbogus_key: 1\n").unwrap();
        let e = apply(&rt, &by, Command::Reload).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let ControlError::ReloadRejected {
            error,
            serving_version,
        } = e
        else {
            panic!("not a rejected reload: {e}")
        };
        assert!(error.contains("bogus_key"), "{error}");
        assert_eq!(serving_version, version);
        assert_eq!(reloads("rejected").len(), 1);
        // The runtime's reload records are the only ones.
        assert_eq!(records(dir.path()).len(), 2, "{:?}", records(dir.path()));
        rt.shutdown().await;
    }

    /// Stick tables for the table commands: `per_ip` stores `gpc0` and tags, `per_net` is
    /// keyed by a /24 prefix and stores neither, `pair` is keyed by a tuple.
    const TABLES: &str = r#"
stick_tables:
  - { name: per_ip, key: src, size: 100, store: [http_req_cnt, gpc0, tags] }
  - { name: per_net, key: src/24, size: 100, store: [http_req_cnt] }
  - { name: pair, key: [src, "header:x-tenant"], size: 100, store: [gpc0] }
"#;

    fn set_gpc(table: &str, key: &str, value: u64) -> Command {
        Command::SetTableGpc {
            table: table.into(),
            key: key.into(),
            value,
        }
    }

    fn tag(table: &str, key: &str, tag: &str) -> Command {
        Command::SetTableTag {
            table: table.into(),
            key: key.into(),
            tag: tag.into(),
        }
    }

    fn untag(table: &str, key: &str, tag: &str) -> Command {
        Command::RemoveTableTag {
            table: table.into(),
            key: key.into(),
            tag: tag.into(),
        }
    }

    fn clear_key(table: &str, key: &str) -> Command {
        Command::ClearTableKey {
            table: table.into(),
            key: key.into(),
        }
    }

    fn clear(table: &str) -> Command {
        Command::ClearTable {
            table: table.into(),
        }
    }

    fn table(rt: &Runtime, name: &str) -> Arc<TableRt> {
        rt.shared.limits.get(name).expect("a running table")
    }

    fn ip_key(ip: &str) -> Key {
        Key::from(ip.parse::<std::net::IpAddr>().unwrap())
    }

    #[tokio::test]
    async fn resolve_checks_table_commands_and_writes_keys_canonically() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), false, TABLES).await;
        let snap = rt.shared.snapshot.load_full();
        let ok = |cmd| resolve(&snap, &rt.shared.limits, cmd).map(|r| r.command);

        // The key is audited and answered in its canonical text.
        assert_eq!(
            ok(set_gpc("per_ip", "192.0.2.7", 1)).unwrap(),
            set_gpc("per_ip", "192.0.2.7", 1)
        );
        assert_eq!(
            ok(clear_key("per_net", "192.0.2.77")).unwrap(),
            clear_key("per_net", "192.0.2.0/24")
        );
        assert_eq!(
            ok(set_gpc("pair", r#"[ "192.0.2.7" , "acme" ]"#, 2)).unwrap(),
            set_gpc("pair", r#"["192.0.2.7","acme"]"#, 2)
        );
        assert_eq!(ok(clear("per_net")).unwrap(), clear("per_net"));
        assert_eq!(
            ok(tag("per_ip", "::1", "blocked")).unwrap(),
            tag("per_ip", "::1", "blocked")
        );
        for cmd in [
            set_gpc("per_ip", "192.0.2.7", 1),
            tag("per_ip", "192.0.2.7", "x"),
            untag("per_ip", "192.0.2.7", "x"),
            clear_key("per_ip", "192.0.2.7"),
            clear("per_ip"),
        ] {
            let v = serde_json::to_value(&cmd).unwrap();
            assert_eq!(v["action"], cmd.action(), "{v}");
        }
        assert_eq!(
            serde_json::to_value(set_gpc("per_ip", "192.0.2.7", 5)).unwrap(),
            json!({ "action": "set_table_gpc", "args": { "table": "per_ip", "key": "192.0.2.7", "value": 5 } })
        );
        assert_eq!(clear("t").args(), json!({ "table": "t" }));

        let err = |cmd| {
            resolve(&snap, &rt.shared.limits, cmd)
                .err()
                .expect("a bad command")
        };
        let e = err(set_gpc("nope", "192.0.2.7", 1));
        assert!(matches!(e, ControlError::NotFound(_)), "{e}");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "no stick table `nope`; the tables are `per_ip`, `per_net`, `pair`"
        );
        assert_eq!(err(clear("nope")).status(), StatusCode::NOT_FOUND);

        // The table must store what is set.
        let e = err(set_gpc("per_net", "192.0.2.0/24", 1));
        assert!(matches!(e, ControlError::NotStored(_)), "{e}");
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(
            e.to_string(),
            "stick table `per_net` does not store `gpc0` (it stores `http_req_cnt`): add `gpc0` \
             to its `store` list to set it at runtime"
        );
        for cmd in [
            tag("pair", r#"["::1","a"]"#, "x"),
            untag("per_net", "10.0.0.0/24", "x"),
        ] {
            let e = err(cmd);
            assert_eq!(e.status(), StatusCode::CONFLICT, "{e}");
            assert!(e.to_string().contains("does not store `tags`"), "{e}");
        }

        // Tags by the limits crate's rule, checked before anything else.
        for bad in ["", "has space", "é", &"x".repeat(65)] {
            for cmd in [
                tag("per_ip", "192.0.2.7", bad),
                untag("nope", "192.0.2.7", bad),
            ] {
                let e = err(cmd);
                assert!(matches!(e, ControlError::Invalid(_)), "{bad:?}: {e}");
                assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                assert!(e.to_string().contains("letters, digits"), "{e}");
            }
        }
        assert!(ok(tag("per_ip", "192.0.2.7", &"x".repeat(64))).is_ok());
        assert!(ok(tag("per_ip", "192.0.2.7", "agent:batch-1_v2.0")).is_ok());

        // Keys.
        for (cmd, want) in [
            (set_gpc("per_ip", "not-an-ip", 1), "not an IP address"),
            (clear_key("per_net", "192.0.2.0/16"), "keyed by `src/24`"),
            (set_gpc("pair", "192.0.2.7", 1), "JSON array of 2 strings"),
        ] {
            let e = err(cmd);
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        // Untagging needs an entry; a hashed key must be one the table holds.
        let e = err(untag("per_ip", "192.0.2.7", "x"));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.to_string(),
            "no entry `192.0.2.7` in stick table `per_ip`"
        );
        let e = err(clear_key("per_ip", &format!("sha256:{}", "ab".repeat(22))));
        assert_eq!(e.status(), StatusCode::NOT_FOUND, "{e}");

        // Resolving changed nothing.
        for t in ["per_ip", "per_net", "pair"] {
            assert!(table(&rt, t).table.is_empty(), "{t}");
        }
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn table_commands_are_applied_and_audited_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), true, TABLES).await;
        let by = token();
        let per_ip = table(&rt, "per_ip");
        let now = MonotonicClock.now();
        let ip = ip_key("192.0.2.7");
        per_ip.table.record_request(&ip, now);

        let out = apply(&rt, &by, set_gpc("per_ip", "192.0.2.7", 1))
            .await
            .unwrap();
        assert_eq!(out["table"], "per_ip");
        assert_eq!(out["key"], "192.0.2.7");
        assert_eq!(out["counters"], json!({ "http_req_cnt": 1, "gpc0": 1 }));
        assert_eq!(out["tags"], json!([]));
        let out = apply(&rt, &by, tag("per_ip", "192.0.2.7", "blocked"))
            .await
            .unwrap();
        assert_eq!(out["tags"], json!(["blocked"]));
        assert_eq!(out["counters"]["gpc0"], 1);
        let s = per_ip.table.get(&ip, now).unwrap();
        assert_eq!(
            (s.gpc0, s.tags.clone()),
            (Some(1), vec!["blocked".to_string()])
        );

        let out = apply(&rt, &by, untag("per_ip", "192.0.2.7", "blocked"))
            .await
            .unwrap();
        assert_eq!(out["tags"], json!([]));
        // Removing a tag the entry does not have changes nothing, and is still recorded.
        apply(&rt, &by, untag("per_ip", "192.0.2.7", "blocked"))
            .await
            .unwrap();

        // A new entry, by another spelling of its key.
        let out = apply(&rt, &by, set_gpc("pair", r#"[ "192.0.2.7", "acme"]"#, 3))
            .await
            .unwrap();
        assert_eq!(out["key"], r#"["192.0.2.7","acme"]"#);
        assert_eq!(out["counters"], json!({ "gpc0": 3 }));
        assert!(out.get("tags").is_none(), "{out}");

        let out = apply(&rt, &by, clear_key("per_ip", "192.0.2.7"))
            .await
            .unwrap();
        assert_eq!(
            out,
            json!({ "table": "per_ip", "key": "192.0.2.7", "cleared": true })
        );
        assert!(per_ip.table.get(&ip, now).is_none());
        let out = apply(&rt, &by, clear_key("per_ip", "192.0.2.7"))
            .await
            .unwrap();
        assert_eq!(out["cleared"], false);

        per_ip.table.record_request(&ip_key("192.0.2.8"), now);
        per_ip.table.record_request(&ip_key("192.0.2.9"), now);
        let out = apply(&rt, &by, clear("per_ip")).await.unwrap();
        assert_eq!(out, json!({ "table": "per_ip", "removed": 2 }));
        assert!(per_ip.table.is_empty());

        let recs: Vec<Value> = records(dir.path())
            .into_iter()
            .filter(|r| r["kind"] == "admin")
            .collect();
        let got: Vec<(String, Value)> = recs
            .iter()
            .map(|r| {
                (
                    r["detail"]["action"].as_str().unwrap().to_string(),
                    r["detail"]["args"].clone(),
                )
            })
            .collect();
        let want = [
            (
                "set_table_gpc",
                json!({ "table": "per_ip", "key": "192.0.2.7", "value": 1 }),
            ),
            (
                "set_table_tag",
                json!({ "table": "per_ip", "key": "192.0.2.7", "tag": "blocked" }),
            ),
            (
                "remove_table_tag",
                json!({ "table": "per_ip", "key": "192.0.2.7", "tag": "blocked" }),
            ),
            (
                "remove_table_tag",
                json!({ "table": "per_ip", "key": "192.0.2.7", "tag": "blocked" }),
            ),
            (
                "set_table_gpc",
                json!({ "table": "pair", "key": r#"["192.0.2.7","acme"]"#, "value": 3 }),
            ),
            (
                "clear_table_key",
                json!({ "table": "per_ip", "key": "192.0.2.7" }),
            ),
            (
                "clear_table_key",
                json!({ "table": "per_ip", "key": "192.0.2.7" }),
            ),
            ("clear_table", json!({ "table": "per_ip" })),
        ]
        .map(|(a, v)| (a.to_string(), v));
        assert_eq!(got, want);
        for r in &recs {
            assert_eq!(r["principal"]["user"], "admin-token[0]@127.0.0.1:5555");
            assert_eq!(r["principal"]["provider"], "admin");
        }
        assert_eq!(records(dir.path()).len(), want.len());
        rt.shutdown().await;
    }

    #[tokio::test]
    async fn a_bad_table_command_changes_nothing_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path(), true, TABLES).await;
        let by = token();
        for (cmd, status) in [
            (set_gpc("nope", "192.0.2.7", 1), 404),
            (clear("nope"), 404),
            (set_gpc("per_net", "192.0.2.7", 1), 409),
            (tag("per_ip", "192.0.2.7", "no spaces"), 400),
            (set_gpc("per_ip", "192.0.2", 1), 400),
            (untag("per_ip", "192.0.2.7", "x"), 404),
        ] {
            let shown = format!("{cmd:?}");
            let e = apply(&rt, &by, cmd).await.expect_err(&shown);
            assert_eq!(e.status().as_u16(), status, "{shown}: {e}");
        }
        for t in ["per_ip", "per_net", "pair"] {
            assert!(table(&rt, t).table.is_empty(), "{t}");
        }
        assert_eq!(records(dir.path()), Vec::<Value>::new());
        rt.shutdown().await;
    }
}
