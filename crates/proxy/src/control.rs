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

use crate::snapshot::{BackendRt, Snapshot};
use crate::state::{AdminState, ServerState};
use crate::Runtime;
use http::StatusCode;
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
}

impl Command {
    /// The action's name, as the audit record calls it (the serialized `action`).
    pub fn action(&self) -> &'static str {
        match self {
            Command::SetServerState { .. } => "set_state",
            Command::SetServerWeight { .. } => "set_weight",
            Command::Reload => "reload",
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
    /// An automation trigger acting on an event (for later).
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// For example `admin-token[0]@127.0.0.1:5555`: a token's position, never the token.
    pub who: String,
    pub kind: PrincipalKind,
}

impl Principal {
    /// The caller holding the `index`th token of `admin.tokens`, connected from `peer`.
    pub fn token(index: usize, peer: std::net::SocketAddr) -> Principal {
        Principal {
            who: format!("admin-token[{index}]@{peer}"),
            kind: PrincipalKind::Token,
        }
    }
}

/// Why a command was not applied. In every case but [`ControlError::ReloadRejected`] nothing
/// changed and nothing was recorded; a rejected reload is recorded by the runtime.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such backend or server.
    #[error("{0}")]
    NotFound(String),
    /// A backend name that several apps use.
    #[error("{0}")]
    Ambiguous(String),
    /// A value out of range, with the way to do what was meant.
    #[error("{0}")]
    Invalid(String),
    /// The audit record could not be written, so the command was not applied.
    #[error("audit trail unavailable; nothing changed")]
    AuditUnavailable,
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
            ControlError::Ambiguous(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::ReloadRejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

/// A command checked against a snapshot, ready to apply.
pub struct Resolved {
    /// The command with the backend written as its full id: what is audited and answered.
    pub command: Command,
    target: Target,
}

enum Target {
    Server(Arc<ServerState>),
    Config,
}

/// Finds a backend by full id (`app/name`) or by a name unique across apps.
pub fn find_backend<'a>(
    snap: &'a Snapshot,
    name: &str,
) -> Result<&'a Arc<BackendRt>, ControlError> {
    if let Some(b) = snap.backend(name) {
        return Ok(b);
    }
    let matches: Vec<_> = snap
        .backends
        .iter()
        .filter(|b| b.id.rsplit_once('/').is_some_and(|(_, n)| n == name))
        .collect();
    match matches.as_slice() {
        [b] => Ok(b),
        [] => Err(ControlError::NotFound(format!("no backend `{name}`"))),
        _ => Err(ControlError::Ambiguous(format!(
            "backend name `{name}` is ambiguous: use `app%2F{name}`"
        ))),
    }
}

/// Checks `cmd` against `snap`: the values first, then the backend and server it names. Pure:
/// changes nothing and records nothing.
pub fn resolve(snap: &Snapshot, cmd: Command) -> Result<Resolved, ControlError> {
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
    }
}

/// Validates `cmd`, records it in the audit trail, applies it and logs it with `by`. Returns
/// the result as JSON: the command's arguments (backend as full id) for a server, or
/// `{"result": "ok", "version": ...}` for a reload.
///
/// A server command is recorded before it is applied; if the record cannot be written it is
/// not applied ([`ControlError::AuditUnavailable`]). A reload is recorded by
/// [`Runtime::reload`] itself, once, after the outcome is known (with `by` in its trigger), so
/// no second record is written here.
pub async fn apply(rt: &Runtime, by: &Principal, cmd: Command) -> Result<Value, ControlError> {
    let snap = rt.shared.snapshot.load_full();
    let Resolved { command, target } = resolve(&snap, cmd)?;
    let server = match target {
        Target::Config => return reload(rt, by).await,
        Target::Server(st) => st,
    };
    let args = command.args();
    let mut rec = crate::audit::admin(&by.who, command.action(), args.clone());
    if let Some(p) = rec.principal.as_mut() {
        p.provider = by.kind.audit_provider().into();
    }
    if !crate::audit::write(&rt.shared, rec).await {
        return Err(ControlError::AuditUnavailable);
    }
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
        Command::Reload => unreachable!("a reload has no server"),
    }
    Ok(args)
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
        let r = resolve(&snap, set_state("default/b", "s2", AdminState::Drain)).unwrap();
        assert_eq!(r.command, set_state("default/b", "s2", AdminState::Drain));
        let r = resolve(&snap, set_weight("c", "s1", 5)).unwrap();
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
            resolve(&snap, Command::Reload).unwrap().target,
            Target::Config
        ));

        let err = |cmd| resolve(&snap, cmd).err().expect("a bad command");
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
            assert!(resolve(&snap, set_weight("default/b", "s1", w)).is_ok());
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
}
