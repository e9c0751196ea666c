//! The task resources a workflow's Task states call. Each call's result goes back to the
//! runner as a signal (durable); a callback task's answer comes later by its token.
//!
//! * `portcullis:command`: one control command, in the shape of a trigger action
//!   (`{"set_server_state": {"backend": …, "server": …, "state": "drain"}}`), applied by
//!   [`control::apply`] as `Portcullis::Workflow::"<name>"`, at most once per idempotency key
//!   (the key is claimed in the store first; a call sent again after a crash finds it claimed
//!   and does not apply the command twice). Refusals map to errors `Retry`/`Catch` can match:
//!   `Control.Forbidden` (policy), `Control.NotFound`, `Control.Invalid`, `Control.Conflict`,
//!   `Control.Unavailable`.
//! * `portcullis:http`: one request, with `Idempotency-Key` and the workflow's signed
//!   assertion; a 2xx is `{"status", "body"}`, another status the error `Http.<status>`, no
//!   answer `Http.Error` (or `States.Timeout` past the task's `TimeoutSeconds`).
//! * `portcullis:wait_for_callback`: publishes `dev.portcullis.workflow.callback` with the
//!   token; the answer is `portcullis workflow send-success|send-failure TOKEN`.
//! * `portcullis:start_workflow`: a child execution, named after the call's key unless named,
//!   so a call sent again finds the same child; with `"wait": true` the task ends when the
//!   child does.
//! * `portcullis:emit`: an event outside the reserved `dev.portcullis.*` types.

use super::{now_ms, Service};
use crate::control::{self, Command, ControlError, Principal, PrincipalKind};
use crate::state::AdminState;
use crate::Runtime;
use portcullis_automation::workflow::machine::TaskCall;
use portcullis_automation::workflow::runner::{StartError, Starter};
use portcullis_automation::workflow::store::Status;
use portcullis_automation::workflow::{names, StatesError};
use portcullis_events::Event;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The longest an HTTP task waits when its state gives no `TimeoutSeconds`.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a response body an HTTP task keeps.
pub const MAX_HTTP_BODY: usize = 64 * 1024;

/// Runs `call` and reports its result (a callback task reports nothing: its token does).
pub async fn run(rt: Arc<Runtime>, svc: Arc<Service>, call: TaskCall) {
    let result = match call.resource.as_str() {
        "portcullis:command" => command(&rt, &svc, &call).await,
        "portcullis:http" => http(&rt, &call).await,
        "portcullis:wait_for_callback" => {
            callback(&rt, &call);
            Ok(Value::Null)
        }
        "portcullis:start_workflow" => match start_child(&rt, &svc, &call).await {
            Ok(None) => return,
            Ok(Some(v)) => Ok(v),
            Err(e) => Err(e),
        },
        "portcullis:emit" => emit(&rt, &call),
        other => Err(StatesError::new(
            names::TASK_FAILED,
            format!("unknown resource `{other}`"),
        )),
    };
    if let Err(e) = &result {
        tracing::info!(workflow = %call.workflow, execution = %call.execution, state = %call.state, error = %e.error, cause = %e.cause, "workflows: a task failed");
    }
    let runner = svc.runner.clone();
    let reported =
        tokio::task::spawn_blocking(move || runner.report(&call, result, now_ms())).await;
    match reported {
        Ok(Ok(_)) => svc.wake(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "workflows: a task's result could not be stored; it runs again after a restart")
        }
        Err(e) => tracing::error!(error = %e, "workflows: reporting a task's result panicked"),
    }
}

/// The principal a workflow's commands run as, with the execution in its name.
pub fn principal(call: &TaskCall) -> Principal {
    Principal::automation(
        format!("{}#{}", call.workflow, call.execution),
        PrincipalKind::Workflow,
    )
}

fn obj<'a>(
    call: &'a TaskCall,
    what: &str,
) -> Result<&'a serde_json::Map<String, Value>, StatesError> {
    call.parameters.as_object().ok_or_else(|| {
        StatesError::new(
            names::TASK_FAILED,
            format!("{}: `Parameters` must be an object ({what})", call.resource),
        )
    })
}

fn text(o: &serde_json::Map<String, Value>, k: &str) -> Result<String, StatesError> {
    o.get(k)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| StatesError::new(names::TASK_FAILED, format!("`{k}` is required, a string")))
}

/// The control command of a `portcullis:command` task's Parameters.
pub fn parse_command(p: &Value) -> Result<Command, String> {
    let o = p.as_object().filter(|o| o.len() == 1).ok_or(
        "Parameters name one command: set_server_state, set_server_weight, switch_route, restore_route, set_table, clear_table or reload",
    )?;
    let (name, args) = o.iter().next().expect("one entry");
    let s = |k: &str| -> Result<String, String> {
        args.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("`{name}.{k}` is required, a string"))
    };
    Ok(match name.as_str() {
        "set_server_state" => Command::SetServerState {
            backend: s("backend")?,
            server: s("server")?,
            state: match s("state")?.as_str() {
                "ready" => AdminState::Ready,
                "drain" => AdminState::Drain,
                "maint" => AdminState::Maint,
                other => return Err(format!("`{other}` is not a server state: ready, drain or maint")),
            },
        },
        "set_server_weight" => Command::SetServerWeight {
            backend: s("backend")?,
            server: s("server")?,
            weight: args.get("weight").and_then(Value::as_u64).and_then(|w| u32::try_from(w).ok()).ok_or("`set_server_weight.weight` is required, a whole number")?,
        },
        "switch_route" => Command::SwitchRoute {
            route: s("route")?,
            backend: s("backend").or_else(|_| s("to"))?,
        },
        "restore_route" => Command::RestoreRoute { route: s("route")? },
        "set_table" => match (args.get("tag").and_then(Value::as_str), args.get("gpc0").and_then(Value::as_u64)) {
            (Some(tag), _) => Command::SetTableTag { table: s("table")?, key: s("key")?, tag: tag.to_string() },
            (None, Some(v)) => Command::SetTableGpc { table: s("table")?, key: s("key")?, value: v },
            (None, None) => return Err("`set_table` sets `gpc0` (a number) or `tag` (a string)".into()),
        },
        "clear_table" => match args.get("key").and_then(Value::as_str) {
            Some(k) => Command::ClearTableKey { table: s("table")?, key: k.to_string() },
            None => Command::ClearTable { table: s("table")? },
        },
        "reload" => Command::Reload,
        other => return Err(format!("unknown command `{other}`: use set_server_state, set_server_weight, switch_route, restore_route, set_table, clear_table or reload")),
    })
}

fn control_error(e: &ControlError) -> &'static str {
    match e {
        ControlError::Forbidden(_) => "Control.Forbidden",
        ControlError::NotFound(_) => "Control.NotFound",
        ControlError::Invalid(_) => "Control.Invalid",
        ControlError::Ambiguous(_) | ControlError::NotStored(_) => "Control.Conflict",
        ControlError::AuditUnavailable | ControlError::StoreUnavailable(_) => "Control.Unavailable",
        ControlError::ReloadRejected { .. } => "Control.ReloadRejected",
    }
}

async fn command(rt: &Runtime, svc: &Service, call: &TaskCall) -> Result<Value, StatesError> {
    let cmd =
        parse_command(&call.parameters).map_err(|m| StatesError::new(names::TASK_FAILED, m))?;
    // At most once per key: claimed before it is applied.
    let store = rt.shared.limits.plans.store().cloned();
    let key = format!("workflow|{}", call.key);
    let claimed = match store {
        Some(s) => tokio::task::spawn_blocking(move || s.firing_claim(&key, now_ms()))
            .await
            .map_err(|e| StatesError::new("Control.Unavailable", e.to_string()))?
            .map_err(|e| StatesError::new("Control.Unavailable", e.to_string()))?,
        None => true,
    };
    if !claimed {
        return Ok(json!({ "applied": false, "duplicate": true, "action": cmd.action() }));
    }
    // An execution that automation started (a trigger, or another execution) is held, when
    // it takes a server out, to the guard rail triggers are (the default `max_unavailable`,
    // 50%), checked and applied one at a time, so that executions running side by side
    // cannot take out more between them. One a person started acts as its starter asked.
    let _one_at_a_time = match &cmd {
        Command::SetServerState {
            backend,
            server,
            state: AdminState::Drain | AdminState::Maint,
        } if started_by_automation(svc, &call.execution).await => {
            let turn = TAKE_OUT.lock().await;
            if let Some(views) = crate::automate::act::server_views(rt, backend) {
                let limit = portcullis_automation::guard::MaxUnavailable::default();
                if let Err(r) = portcullis_automation::guard::may_take_out(&views, server, limit) {
                    return Err(StatesError::new("Control.MaxUnavailable", r.to_string()));
                }
            }
            Some(turn)
        }
        _ => None,
    };
    match control::apply(rt, &principal(call), cmd).await {
        Ok(v) => Ok(json!({ "applied": true, "result": v })),
        Err(e) => Err(StatesError::new(control_error(&e), e.to_string())),
    }
}

/// Whether automation started `execution`: a trigger, or another execution. (Unknown: yes,
/// the guard rail then applies.)
async fn started_by_automation(svc: &Service, execution: &str) -> bool {
    let store = svc.runner.store().clone();
    let id = execution.to_string();
    let row = tokio::task::spawn_blocking(move || store.get(&id))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    row.is_none_or(|r| r.parent.is_some() || r.started_by.starts_with("Portcullis::Trigger::"))
}

/// Held while a workflow's take-out command is checked against the guard rail and applied.
static TAKE_OUT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn http(rt: &Runtime, call: &TaskCall) -> Result<Value, StatesError> {
    let o = obj(call, "url, method, headers, body")?;
    let url = text(o, "url")?;
    let method = match o.get("method").and_then(Value::as_str) {
        Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
            StatesError::new(names::TASK_FAILED, format!("`{m}` is not an HTTP method"))
        })?,
        None if o.contains_key("body") => http::Method::POST,
        None => http::Method::GET,
    };
    let mut headers = Vec::new();
    if let Some(h) = o.get("headers").and_then(Value::as_object) {
        for (k, v) in h {
            let (Ok(name), Some(Ok(value))) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                v.as_str().map(http::HeaderValue::from_str),
            ) else {
                return Err(StatesError::new(
                    names::TASK_FAILED,
                    format!("header `{k}` is not a valid header (a name and a string value)"),
                ));
            };
            headers.push((name, value));
        }
    }
    if let Ok(v) = http::HeaderValue::from_str(&call.key) {
        headers.push((http::HeaderName::from_static("idempotency-key"), v));
    }
    if let Some(jwt) = assertion(rt, call, &url) {
        headers.push((crate::snapshot::ASSERTION_HEADER.clone(), jwt));
    }
    let body = match o.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(b) => serde_json::to_vec(b).unwrap_or_default(),
    };
    let timeout = call.timeout_ms.map_or(HTTP_TIMEOUT, Duration::from_millis);
    let (status, bytes) =
        crate::automate::webhook::request(method, &url, headers, body, timeout, MAX_HTTP_BODY)
            .await
            .map_err(|e| StatesError::new("Http.Error", e))?;
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    if (200..300).contains(&status) {
        Ok(json!({ "status": status, "body": body }))
    } else {
        let snippet: String = String::from_utf8_lossy(&bytes).chars().take(256).collect();
        Err(StatesError::new(format!("Http.{status}"), snippet))
    }
}

/// The workflow's identity, signed like a route's assertion, for `aud` = the URL.
fn assertion(rt: &Runtime, call: &TaskCall, url: &str) -> Option<http::HeaderValue> {
    let snap = rt.shared.snapshot.load();
    let identity = portcullis_identity::Identity {
        provider: "workflow".into(),
        method: portcullis_identity::AuthMethod::ApiKey,
        subject: format!("Portcullis::Workflow::\"{}\"", call.workflow),
        user: call.workflow.clone(),
        email: None,
        groups: Vec::new(),
        claims: json!({ "execution": call.execution, "state": call.state }),
        expires_at: None,
    };
    let jwt = snap.identity.signer.sign(&identity, url).ok()?;
    http::HeaderValue::from_str(&jwt).ok()
}

fn callback(rt: &Runtime, call: &TaskCall) {
    let events = &rt.shared.events;
    let data = json!({
        "workflow": call.workflow, "execution": call.execution, "state": call.state,
        "token": call.token, "parameters": call.parameters,
    });
    let mut ev = Event::new(
        events.source.as_str(),
        "dev.portcullis.workflow.callback",
        data,
    );
    ev.subject = Some(format!("{}/{}", call.workflow, call.execution));
    if call.hops > 0 {
        // A trigger started the execution: its callback is automation's doing too.
        ev.causedby = Some(crate::workflows::cause_of(&call.execution));
        rt.automation.hops.lock().note(ev.id.clone(), call.hops);
    }
    events.emit(ev);
    tracing::info!(workflow = %call.workflow, execution = %call.execution, state = %call.state, "workflows: waiting for a callback");
}

fn emit(rt: &Runtime, call: &TaskCall) -> Result<Value, StatesError> {
    let o = obj(call, "type, subject, data")?;
    let ty = text(o, "type")?;
    if crate::admin_events::reserved(&ty, crate::admin_events::RESERVED_TYPES) {
        return Err(StatesError::new(
            names::TASK_FAILED,
            format!("`{ty}`: the `dev.portcullis.` types are the proxy's own; use your own prefix"),
        ));
    }
    let events = &rt.shared.events;
    let mut ev = Event::new(
        events.source.as_str(),
        ty,
        o.get("data").cloned().unwrap_or(Value::Null),
    );
    ev.subject = o.get("subject").and_then(Value::as_str).map(str::to_string);
    ev.id = emit_id(&call.key);
    // Automation's doing, as a trigger's `emit` is: triggers ignore it unless they opt in
    // (`automation_events`), so a trigger that starts this workflow cannot loop through it.
    ev.causedby = Some(crate::workflows::cause_of(&call.execution));
    let id = ev.id.clone();
    rt.automation.hops.lock().note(id.clone(), call.hops);
    events.emit(ev);
    Ok(json!({ "id": id }))
}

/// The id of the event a `portcullis:emit` task publishes, from the task's idempotency key:
/// a task sent again after a crash publishes the same event again, which receivers
/// deduplicate by id, not a second one. A UUID in form (its bytes from SHA-256).
fn emit_id(key: &str) -> String {
    let d = Sha256::digest(format!("emit|{key}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

/// Starts the child; `None` when the task ends with the child (wait), else its result.
async fn start_child(
    rt: &Runtime,
    svc: &Service,
    call: &TaskCall,
) -> Result<Option<Value>, StatesError> {
    let o = obj(call, "workflow, name, input, wait")?;
    let workflow = text(o, "workflow")?;
    let wait = o.get("wait").and_then(Value::as_bool).unwrap_or(false);
    let name = match o.get("name").and_then(Value::as_str) {
        Some(n) => n.to_string(),
        None => {
            let d = Sha256::digest(call.key.as_bytes());
            d.iter().take(16).map(|b| format!("{b:02x}")).collect()
        }
    };
    let input = o.get("input").cloned().unwrap_or(json!({}));
    let args = json!({ "workflow": workflow, "name": name });
    if let Err(e) = crate::control::authorize_start(rt, &principal(call), &workflow, args).await {
        return Err(StatesError::new(control_error(&e), e.to_string()));
    }
    let by = Starter {
        principal: format!("{}#{}", call.workflow, call.execution),
        parent: Some(call.execution.clone()),
        parent_key: wait.then(|| call.key.clone()),
        hops: call.hops,
    };
    let id = match svc
        .start(rt, &workflow, Some(name.clone()), input, by)
        .await
    {
        Ok((_, id)) => id,
        Err(StartError::AlreadyExists { id, .. }) => id,
        Err(e) => return Err(StatesError::new(names::TASK_FAILED, e.to_string())),
    };
    if !wait {
        return Ok(Some(json!({ "executionId": id, "name": name })));
    }
    // Sent again after a crash: the child may have closed already.
    let store = svc.runner.store().clone();
    let row = tokio::task::spawn_blocking(move || store.get(&id))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    match row {
        Some(r) if r.status == Status::Succeeded => Ok(Some(
            r.output
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or(Value::Null),
        )),
        Some(r) if r.status.is_closed() => Err(StatesError::new(
            r.error.unwrap_or_else(|| names::TASK_FAILED.into()),
            r.cause.unwrap_or_default(),
        )),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emitted_events_id_is_its_tasks_not_a_new_one_each_time() {
        let a = emit_id("e1#Ping#5");
        assert_eq!(
            a,
            emit_id("e1#Ping#5"),
            "sent again after a crash: the same event"
        );
        assert_ne!(a, emit_id("e1#Ping#9"));
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
    }

    #[test]
    fn commands_take_the_shape_of_trigger_actions() {
        let c = parse_command(&json!({ "set_server_state": { "backend": "billing/api", "server": "b1", "state": "drain" } })).unwrap();
        assert_eq!(
            c,
            Command::SetServerState {
                backend: "billing/api".into(),
                server: "b1".into(),
                state: AdminState::Drain
            }
        );
        let c = parse_command(&json!({ "switch_route": { "route": "r", "to": "b" } })).unwrap();
        assert_eq!(
            c,
            Command::SwitchRoute {
                route: "r".into(),
                backend: "b".into()
            }
        );
        let c =
            parse_command(&json!({ "set_table": { "table": "t", "key": "k", "tag": "approved" } }))
                .unwrap();
        assert_eq!(
            c,
            Command::SetTableTag {
                table: "t".into(),
                key: "k".into(),
                tag: "approved".into()
            }
        );
        assert!(parse_command(
            &json!({ "set_server_state": { "backend": "b", "server": "s", "state": "off" } })
        )
        .unwrap_err()
        .contains("ready, drain or maint"));
        assert!(parse_command(&json!({ "a": {}, "b": {} })).is_err());
        assert!(parse_command(&json!({ "rm_rf": {} }))
            .unwrap_err()
            .contains("unknown command"));
    }
}
