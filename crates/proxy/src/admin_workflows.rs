//! Workflows on the admin API (what `portcullis workflow` calls):
//!
//! * `GET /api/v1/workflows`: the definitions new executions start with.
//! * `POST /api/v1/workflows/{workflow}/executions` `{"name"?, "input"?}`: starts one (201),
//!   or answers the running execution of that name and input (200, `started: false`), or
//!   409 `ExecutionAlreadyExists`.
//! * `GET /api/v1/executions?workflow=&status=&limit=`, `GET /api/v1/executions/{id}`,
//!   `GET /api/v1/executions/{id}/history?after=&limit=`.
//! * `POST /api/v1/executions/{id}/stop` `{"error"?, "cause"?}`: ends it ABORTED.
//! * `POST /api/v1/executions/{id}/approve` `{"output"?}` and `.../reject` `{"error"?,
//!   "cause"?}`: answers the execution's one waiting `portcullis:wait_for_callback` task
//!   without its token (the console's approval buttons; 409 when several wait, 404 when none).
//! * `POST /api/v1/callbacks/{success|failure|heartbeat}` `{"token", …}`: answers a
//!   `portcullis:wait_for_callback` task (404 when the token matches no waiting task). A token
//!   takes one answer (success or failure, here or by approve/reject): of concurrent answers
//!   one is taken (200), the others get 409 and are audited as refused.
//!
//! Starts, stops and callbacks are audited with the caller. Bodies are at most 1 MiB.

use crate::control::Principal;
use crate::workflows::{now_ms, Service};
use crate::Runtime;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use portcullis_automation::workflow::machine::{format_timestamp, Exec};
use portcullis_automation::workflow::runner::{StartError, Starter};
use portcullis_automation::workflow::store::{
    Answered, ExecutionRow, ListFilter, SignalKind, StartOutcome, Status,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Runtime>> {
    Router::new()
        .route("/api/v1/workflows", get(definitions))
        .route("/api/v1/workflows/{workflow}/executions", post(start))
        .route("/api/v1/executions", get(list))
        .route("/api/v1/executions/{id}", get(describe))
        .route("/api/v1/executions/{id}/history", get(history))
        .route("/api/v1/executions/{id}/stop", post(stop))
        .route("/api/v1/executions/{id}/approve", post(approve))
        .route("/api/v1/executions/{id}/reject", post(reject))
        .route("/api/v1/callbacks/{outcome}", post(callback))
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// An error answer not yet rendered (small, unlike a `Response`).
struct Fail(StatusCode, String);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        err(self.0, self.1)
    }
}

fn fail(status: StatusCode, msg: impl Into<String>) -> Fail {
    Fail(status, msg.into())
}

fn service(rt: &Runtime) -> Result<&Arc<Service>, Fail> {
    rt.workflows.service().ok_or_else(|| {
        fail(
            StatusCode::NOT_FOUND,
            "no workflows are configured (add `workflows:` to the config)",
        )
    })
}

fn body_json(body: &Bytes) -> Result<Value, Fail> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    // Every body here is an object of named fields: anything else (`"x"`, `[]`) would be
    // read as no field at all, and its call taken with the defaults.
    if !v.is_object() {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object".to_string(),
        ));
    }
    // The texts a stop, a rejection or a failed callback records: a string or nothing, never
    // silently replaced by a default.
    for k in ["error", "cause"] {
        if v.get(k).is_some_and(|x| !x.is_string() && !x.is_null()) {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                format!("`{k}` must be a string"),
            ));
        }
    }
    Ok(v)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn definitions(State(rt): State<Arc<Runtime>>) -> Response {
    let snap = rt.shared.snapshot.load();
    let list: Vec<Value> = snap
        .workflows
        .iter()
        .map(|l| json!({ "name": l.name, "version": l.version, "states": l.def.states().count(), "definition": l.json }))
        .collect();
    Json(json!({ "workflows": list })).into_response()
}

async fn start(
    State(rt): State<Arc<Runtime>>,
    Extension(by): Extension<Principal>,
    Path(workflow): Path<String>,
    body: Bytes,
) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    let b = match body_json(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let Some(o) = b.as_object() else {
        return err(
            StatusCode::BAD_REQUEST,
            "the body is an object: {\"name\"?: string, \"input\"?: any}",
        );
    };
    if let Some(k) = o.keys().find(|k| *k != "name" && *k != "input") {
        return err(
            StatusCode::BAD_REQUEST,
            format!("unknown field `{k}`: the body takes `name` and `input`"),
        );
    }
    let name = match o.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => return err(StatusCode::BAD_REQUEST, "`name` is a string"),
    };
    let input = o.get("input").cloned().unwrap_or(json!({}));
    let starter = Starter {
        principal: by.who.clone(),
        parent: None,
        parent_key: None,
        hops: 0,
    };
    match svc.start(&rt, &workflow, name, input, starter).await {
        Ok((outcome, id)) => {
            let started = matches!(outcome, StartOutcome::Started(_));
            let store = svc.runner.store().clone();
            let row = blocking(move || store.get(&id))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            let code = if started {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut v = row.map(|r| summary(&r)).unwrap_or(json!({}));
            v["started"] = json!(started);
            (code, Json(v)).into_response()
        }
        Err(e @ StartError::UnknownWorkflow(_)) => err(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ StartError::AlreadyExists { .. }) => err(StatusCode::CONFLICT, e.to_string()),
        Err(e @ StartError::InvalidInput(_)) => err(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ StartError::Store(_)) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// An execution as the API shows it (without its history).
pub fn summary(r: &ExecutionRow) -> Value {
    let exec = serde_json::from_str::<Exec>(&r.state).ok();
    let states = exec
        .as_ref()
        .map(|e| e.current_states())
        .unwrap_or_default();
    // Whether a `wait_for_callback` task waits for its answer (its token stays unshown).
    let awaiting = r.status == Status::Running
        && exec
            .as_ref()
            .is_some_and(|e| e.pending_calls().iter().any(|c| c.token.is_some()));
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
    };
    json!({
        "executionId": r.id, "workflow": r.workflow, "name": r.name, "status": r.status.as_str(),
        "startedAt": format_timestamp(r.started_at), "stoppedAt": r.stopped_at.map(format_timestamp),
        "startedBy": r.started_by, "parent": r.parent, "currentStates": states,
        "input": serde_json::from_str::<Value>(&r.input).unwrap_or(Value::Null),
        "output": parse(&r.output), "error": r.error, "cause": r.cause, "historyLength": r.history_len,
        "awaitingCallback": awaiting,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    workflow: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(rt): State<Arc<Runtime>>,
    Extension(caller): Extension<crate::admin_authz::Caller>,
    Query(q): Query<ListQuery>,
) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match Status::parse(&s.to_ascii_uppercase()) {
            Some(st) => Some(st),
            None => {
                return err(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "`{s}` is not a status: RUNNING, SUCCEEDED, FAILED, TIMED_OUT or ABORTED"
                    ),
                )
            }
        },
    };
    let filter = ListFilter {
        workflow: q.workflow.filter(|w| !w.is_empty()),
        status,
        limit: q.limit.unwrap_or(100).min(1000),
    };
    let store = svc.runner.store().clone();
    match blocking(move || store.list(&filter)).await {
        Ok(Ok(rows)) => {
            // Listing is decided on the config; each execution shown (with its input and
            // output) needs the read its own page would.
            let snap = rt.shared.snapshot.load_full();
            let shown: Vec<Value> = rows
                .iter()
                .filter(|r| caller.may(&snap, "workflow.read", &execution(r)))
                .map(summary)
                .collect();
            Json(json!({ "executions": shown })).into_response()
        }
        Ok(Err(e)) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(r) => r.into_response(),
    }
}

/// An execution as admin policies name it.
pub fn execution(r: &ExecutionRow) -> portcullis_policy::admin::AdminResource {
    portcullis_policy::admin::AdminResource::Execution {
        workflow: r.workflow.clone(),
        id: r.id.clone(),
    }
}

async fn row(svc: &Service, id: String) -> Result<ExecutionRow, Fail> {
    let store = svc.runner.store().clone();
    let shown = id.clone();
    match blocking(move || store.get(&id)).await? {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(fail(
            StatusCode::NOT_FOUND,
            format!("no execution `{shown}`"),
        )),
        Err(e) => Err(fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

async fn describe(State(rt): State<Arc<Runtime>>, Path(id): Path<String>) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    match row(&svc, id).await {
        Ok(r) => Json(summary(&r)).into_response(),
        Err(r) => r.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn history(
    State(rt): State<Arc<Runtime>>,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    if let Err(r) = row(&svc, id.clone()).await {
        return r.into_response();
    }
    let store = svc.runner.store().clone();
    let (after, limit) = (q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(25_000));
    match blocking(move || store.history(&id, after, limit)).await {
        Ok(Ok(rows)) => {
            let events: Vec<Value> = rows
                .iter()
                .map(|h| {
                    let mut v = json!({ "id": h.id, "previousEventId": h.previous, "timestamp": format_timestamp(h.timestamp_ms), "type": h.kind });
                    if let Ok(Value::Object(d)) = serde_json::from_str::<Value>(&h.details) {
                        v["details"] = Value::Object(d);
                    }
                    v
                })
                .collect();
            Json(json!({ "events": events })).into_response()
        }
        Ok(Err(e)) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(r) => r.into_response(),
    }
}

/// Queues `kind` for execution `id` (audited as `action` by `by`); 404 when it is not running.
async fn signal(
    rt: &Runtime,
    svc: &Service,
    by: &Principal,
    id: String,
    kind: SignalKind,
    action: &str,
    audit: Value,
) -> Response {
    // Nothing to signal, nothing to record: the trail holds only changes that were asked
    // of something (an execution that ends between this look and the signal is still
    // answered 404 below, after its record).
    let token = kind.answers().map(str::to_owned);
    match row(svc, id.clone()).await {
        Ok(r) if r.status == Status::Running => {}
        Ok(_) => return not_running(rt, svc, by, action, &id, token).await,
        Err(r) => return r.into_response(),
    }
    let mut rec = by.record(action, audit);
    rec.decision = Some(portcullis_audit::Decision::Allow);
    if !crate::audit::write(&rt.shared, rec).await {
        return err(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit trail unavailable; nothing changed",
        );
    }
    let store = svc.runner.store().clone();
    let shown = id.clone();
    let queued = blocking(move || {
        if kind.answers().is_some() {
            store.answer(&id, kind, now_ms())
        } else {
            let ok = store.signal(&id, kind, now_ms())?;
            Ok(if ok {
                Answered::Queued
            } else {
                Answered::NotRunning
            })
        }
    })
    .await;
    match queued {
        Ok(Ok(Answered::Queued)) => {
            svc.wake();
            Json(json!({ "ok": true, "execution": shown })).into_response()
        }
        Ok(Ok(Answered::Before)) => answered_before(rt, by, action, &shown).await,
        Ok(Ok(Answered::NotRunning)) => not_running(rt, svc, by, action, &shown, token).await,
        Ok(Err(e)) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(r) => r.into_response(),
    }
}

async fn stop(
    State(rt): State<Arc<Runtime>>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    let b = match body_json(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let error = b
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("Stopped")
        .to_string();
    let cause = b
        .get("cause")
        .and_then(Value::as_str)
        .map_or_else(|| format!("stopped by {}", by.who), str::to_string);
    let audit = json!({ "execution": id, "error": error, "cause": cause });
    signal(
        &rt,
        &svc,
        &by,
        id,
        SignalKind::Stop { error, cause },
        "workflow.stop",
        audit,
    )
    .await
}

/// The token of the execution's one task waiting for a callback.
async fn waiting_token(svc: &Service, id: &str) -> Result<String, Fail> {
    let r = row(svc, id.to_string()).await?;
    let exec: Exec = serde_json::from_str(&r.state).map_err(|_| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the execution's state cannot be read",
        )
    })?;
    let mut tokens: Vec<String> = exec
        .pending_calls()
        .iter()
        .filter_map(|c| c.token.clone())
        .collect();
    if r.status != Status::Running || tokens.is_empty() {
        return Err(fail(
            StatusCode::NOT_FOUND,
            format!("execution `{id}` waits for no callback"),
        ));
    }
    if tokens.len() > 1 {
        return Err(fail(
            StatusCode::CONFLICT,
            format!(
                "execution `{id}` waits for {} callbacks: answer each by its token",
                tokens.len()
            ),
        ));
    }
    Ok(tokens.swap_remove(0))
}

/// `POST /api/v1/executions/{id}/approve`: the waiting task succeeds with `output` (default
/// `{"approved": true, "by": caller}`).
async fn approve(
    State(rt): State<Arc<Runtime>>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    answer(rt, by, id, body, true).await
}

/// `POST /api/v1/executions/{id}/reject`: the waiting task fails with `error` (default
/// `Rejected`) and `cause`.
async fn reject(
    State(rt): State<Arc<Runtime>>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    answer(rt, by, id, body, false).await
}

async fn answer(rt: Arc<Runtime>, by: Principal, id: String, body: Bytes, ok: bool) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    let b = if body.is_empty() {
        json!({})
    } else {
        match body_json(&body) {
            Ok(b) => b,
            Err(r) => return r.into_response(),
        }
    };
    let token = match waiting_token(&svc, &id).await {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let text = |k: &str, d: &str| b.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
    let (kind, outcome) = if ok {
        let output = b
            .get("output")
            .cloned()
            .unwrap_or_else(|| json!({ "approved": true, "by": by.who }));
        let output = output.to_string();
        if output.len() > portcullis_automation::workflow::MAX_PAYLOAD {
            return err(StatusCode::PAYLOAD_TOO_LARGE, "the output is over 256 KiB");
        }
        (SignalKind::Success { token, output }, "success")
    } else {
        let cause = text("cause", &format!("rejected by {}", by.who));
        let error = text("error", "Rejected");
        (
            SignalKind::Failure {
                token,
                error,
                cause,
            },
            "failure",
        )
    };
    let audit = json!({ "execution": id, "outcome": outcome });
    signal(&rt, &svc, &by, id, kind, "workflow.callback", audit).await
}

/// The answer to a signal for an execution that is not running (any more): 409 for a
/// callback answer whose token was answered (the execution closed on a concurrent answer
/// between the look and the signal), else 404.
async fn not_running(
    rt: &Runtime,
    svc: &Service,
    by: &Principal,
    action: &str,
    id: &str,
    token: Option<String>,
) -> Response {
    if let Some(t) = token {
        let store = svc.runner.store().clone();
        if matches!(blocking(move || store.answered(&t)).await, Ok(Ok(true))) {
            return answered_before(rt, by, action, id).await;
        }
    }
    err(
        StatusCode::NOT_FOUND,
        format!("no running execution `{id}`"),
    )
}

/// A callback answer refused because its token took another answer: audited, and 409.
async fn answered_before(rt: &Runtime, by: &Principal, action: &str, id: &str) -> Response {
    let rec = crate::audit::admin(
        &by.who,
        &format!("{action}.refused"),
        json!({ "execution": id, "reason": "the callback was answered before" }),
    );
    crate::audit::write(&rt.shared, rec).await;
    err(
        StatusCode::CONFLICT,
        "the callback was answered before (by an earlier or a concurrent answer), or its task ended without it (a timeout, a stop); this answer is not taken",
    )
}

/// Whether two secrets are equal, in constant time (of their length).
fn eq_ct(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Whether execution `id` has a callback task waiting for `token` (the token starts with the
/// execution's id; the interpreter compares the whole token in constant time).
async fn waiting(svc: &Service, token: &str) -> Result<String, Fail> {
    let not_found = || {
        fail(StatusCode::NOT_FOUND, "the token matches no task waiting for a callback (it was answered, timed out, or never existed)")
    };
    let id = token
        .split('.')
        .next()
        .filter(|i| !i.is_empty())
        .ok_or_else(not_found)?
        .to_string();
    let r = row(svc, id.clone()).await.map_err(|_| not_found())?;
    let exec: Exec = serde_json::from_str(&r.state).map_err(|_| not_found())?;
    let waits = exec.pending_calls().iter().any(|c| {
        c.token
            .as_deref()
            .is_some_and(|t| eq_ct(t.as_bytes(), token.as_bytes()))
    });
    if r.status == Status::Running && waits {
        Ok(id)
    } else {
        Err(not_found())
    }
}

async fn callback(
    State(rt): State<Arc<Runtime>>,
    Extension(by): Extension<Principal>,
    Path(outcome): Path<String>,
    body: Bytes,
) -> Response {
    let svc = match service(&rt) {
        Ok(s) => s.clone(),
        Err(r) => return r.into_response(),
    };
    let b = match body_json(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let Some(token) = b.get("token").and_then(Value::as_str).map(str::to_string) else {
        return err(
            StatusCode::BAD_REQUEST,
            "`token` is required: the task's `$$.Task.Token`",
        );
    };
    let id = match waiting(&svc, &token).await {
        Ok(id) => id,
        Err(r) => {
            // Not waiting because an answer was applied: say so, as to a concurrent answer.
            let store = svc.runner.store().clone();
            let t = token.clone();
            let before = outcome != "heartbeat"
                && matches!(blocking(move || store.answered(&t)).await, Ok(Ok(true)));
            if !before {
                return r.into_response();
            }
            let shown = token.split('.').next().unwrap_or_default().to_string();
            return answered_before(&rt, &by, &format!("workflow.callback.{outcome}"), &shown)
                .await;
        }
    };
    let kind = match outcome.as_str() {
        "success" => {
            let output = b.get("output").cloned().unwrap_or(json!({}));
            let text = output.to_string();
            if text.len() > portcullis_automation::workflow::MAX_PAYLOAD {
                return err(StatusCode::PAYLOAD_TOO_LARGE, "the output is over 256 KiB");
            }
            SignalKind::Success {
                token,
                output: text,
            }
        }
        "failure" => SignalKind::Failure {
            token,
            error: b
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("TaskFailed")
                .to_string(),
            cause: b
                .get("cause")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        },
        "heartbeat" => SignalKind::Heartbeat { token },
        other => {
            return err(
                StatusCode::NOT_FOUND,
                format!("`{other}`: use success, failure or heartbeat"),
            )
        }
    };
    let audit = json!({ "execution": id, "outcome": outcome });
    signal(
        &rt,
        &svc,
        &by,
        id,
        kind,
        &format!("workflow.callback.{outcome}"),
        audit,
    )
    .await
}
