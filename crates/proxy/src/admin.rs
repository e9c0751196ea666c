//! The admin listener: health and readiness, Prometheus metrics, and the runtime API (server
//! state and weight, reload, config status, stick tables (see [`crate::admin_tables`]) and
//! usage-plan usage (see [`crate::admin_usage`])), and inbound events (see
//! [`crate::admin_events`]).
//! The console's pages (`/`, `/login`, see [`crate::console`]) check their own cookie.
//! Everything else but `/healthz` and `/readyz` needs a caller: a bearer token from
//! `admin.tokens` (break-glass; compared by SHA-256 digest in constant time, configured as the
//! token or its digest), or a bearer JWT, API key or client certificate of one of
//! `admin.auth`'s identity providers, or the console's cookie; a person's every call must be
//! permitted by `admin.policies` (Cedar; see [`crate::admin_authz`]), and a refusal is
//! audited. A change made with the cookie or a client certificate alone (credentials a
//! browser sends by itself) must carry the console's CSRF token. With neither tokens nor
//! providers configured the API refuses every call. The token's position and the peer, or the identity, make the caller's
//! [`Principal`]. The API is a thin HTTP layer over
//! [`control`]: every change it makes is a [`Command`] that control validates, audits, applies
//! and logs with that principal.

use crate::admin_authz::{decide, Caller};
use crate::admin_tokens::check_token;
use crate::console::credential::Credential;
use crate::control::{self, Command, ControlError, Principal};
use crate::state::AdminState;
use crate::Runtime;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn router(rt: Arc<Runtime>) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/backends", get(backends))
        .route(
            "/api/v1/backends/{backend}/servers/{server}/state",
            post(set_state),
        )
        .route(
            "/api/v1/backends/{backend}/servers/{server}/weight",
            put(set_weight),
        )
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/sessions/revoke", post(revoke_sessions))
        .route("/api/v1/routes/{route}/switch", post(switch_route))
        .route("/api/v1/routes/{route}/restore", post(restore_route))
        .route("/api/v1/config", get(config))
        .merge(crate::admin_tables::routes())
        .merge(crate::admin_usage::routes())
        .merge(crate::admin_events::routes())
        .merge(crate::admin_workflows::routes())
        .route("/api/v1/dashboard", get(dashboard))
        .route("/api/v1/dashboard/stream", get(dashboard_stream))
        .route("/api/v1/audit", get(crate::console::audit::handler))
        // Inside `auth` (layers wrap what came before): a caller is known, and a browser's
        // change without its CSRF token is refused (and recorded) as such first.
        .route_layer(middleware::from_fn(json_bodies))
        .route_layer(middleware::from_fn_with_state(rt.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(crate::console::routes())
        .merge(api)
        .with_state(rt)
}

/// The largest JSON body an endpoint takes (axum's default limit of its `Json` extractor).
const MAX_JSON_BODY: u64 = 2 << 20;

/// The API's request bodies are JSON, sent as JSON: a body of another type (a form's, or
/// text, the types a page on another site can send without asking) gets 400 before a handler
/// reads it. Inbound events (`/api/v1/events`) have media types of their own, checked there.
async fn json_bodies(req: Request, next: Next) -> Response {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if !has_body || req.uri().path() == "/api/v1/events" {
        return next.run(req).await;
    }
    // Larger than any handler takes (axum's 2 MiB for JSON bodies): refused from its length,
    // before it is read (a client still writing it would only see the connection close).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_JSON_BODY) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large\n").into_response();
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|t| {
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        });
    if json {
        return next.run(req).await;
    }
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "the body must be JSON, sent with Content-Type: application/json" })),
    )
        .into_response()
}

fn unauthorized(msg: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"portcullis-admin\"",
        )],
        msg,
    )
        .into_response()
}

/// A call refused before any caller was known (see [`crate::audit::admin_auth_failure`]):
/// recorded in the audit trail, then answered with `resp`.
async fn refused(rt: &Runtime, rec: portcullis_audit::Record, resp: Response) -> Response {
    crate::audit::write(&rt.shared, rec).await;
    resp
}

/// The audit record of a refusal of `req` for `reason` (built before any await: a request
/// is not shared across threads).
fn failure(peer: SocketAddr, req: &Request, reason: &str) -> portcullis_audit::Record {
    crate::audit::admin_auth_failure(peer, req.method().as_str(), req.uri().path(), reason)
}

fn csrf_refusal() -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(json!({ "error": "missing or invalid CSRF token: reload the console" })),
    )
        .into_response()
}

/// Who is calling: a static token (break-glass, every call), or an identity of one of
/// `admin.auth`'s providers, whose every call `admin.policies` must permit.
async fn auth(
    State(rt): State<Arc<Runtime>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let (tokens, providers) = snap.config.admin.as_ref().map_or((&[][..], &[][..]), |a| {
        (a.tokens.as_slice(), a.auth.as_slice())
    });
    if tokens.is_empty() && providers.is_empty() {
        tracing::warn!(%peer, path = %crate::record::format::bounded(req.uri().path()), "admin call refused: no admin.tokens or admin.auth configured");
        return (
            StatusCode::FORBIDDEN,
            "admin API disabled: configure admin.tokens or admin.auth\n",
        )
            .into_response();
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme in any case (RFC 9110 §11.1), as the data plane reads it.
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .map(|v| v.trim().to_string());
    if let Some(i) = bearer
        .as_deref()
        .and_then(|p| check_token(p.as_bytes(), tokens))
    {
        let p = Principal::token(i, peer);
        req.extensions_mut().insert(Caller::Token(p.who.clone()));
        req.extensions_mut().insert(p);
        if let Some(t) = &bearer {
            req.extensions_mut().insert(Credential::token(peer, t));
        }
        return next.run(req).await;
    }
    if bearer.is_none() && !req.headers().contains_key("x-api-key") {
        if let Some(v) = crate::console::grant::cookie(req.headers(), crate::console::grant::COOKIE)
        {
            let v = v.to_string();
            req.extensions_mut().insert(Credential::cookie(peer, &v));
            return with_cookie(&rt, &snap, peer, &v, req, next).await;
        }
    }
    if providers.is_empty() {
        return match bearer {
            None => {
                let r = unauthorized("missing bearer token\n");
                refused(&rt, failure(peer, &req, "missing bearer token"), r).await
            }
            Some(_) => {
                tracing::warn!(%peer, path = %crate::record::format::bounded(req.uri().path()), "admin call refused: invalid token");
                refused(
                    &rt,
                    failure(peer, &req, "invalid token"),
                    unauthorized("invalid token\n"),
                )
                .await
            }
        };
    }
    with_identity(&rt, &snap, peer, providers, bearer, req, next).await
}

/// A call with a credential for a provider of `admin.auth` (a bearer JWT, an API key, a
/// client certificate): authenticated, then decided by `admin.policies` ([`as_person`]).
async fn with_identity(
    rt: &Runtime,
    snap: &crate::snapshot::Snapshot,
    peer: SocketAddr,
    providers: &[String],
    bearer: Option<String>,
    mut req: Request,
    next: Next,
) -> Response {
    let api_key = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cert = req
        .extensions()
        .get::<crate::admin_authz::ClientCert>()
        .cloned();
    // A client certificate is sent by the browser on its own, as a cookie is: a state change
    // made with it alone from a browser must carry the CSRF token the console made for it.
    // (An agent or `ctl` is no browser: see `crate::console::from_a_browser`.)
    if let (None, None, Some(c)) = (&bearer, &api_key, &cert) {
        let safe = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        let key = crate::console::cert_key(&c.0);
        if !safe
            && crate::console::from_a_browser(req.headers())
            && !crate::console::csrf_passes(snap, req.headers(), &key)
        {
            tracing::warn!(%peer, path = %crate::record::format::bounded(req.uri().path()), "admin call refused: missing or invalid CSRF token");
            return refused(
                rt,
                failure(peer, &req, "missing or invalid CSRF token"),
                csrf_refusal(),
            )
            .await;
        }
    }
    let creds = portcullis_identity::engine::Credentials {
        bearer: bearer.as_deref(),
        api_key: api_key.as_deref(),
        session_cookie: None,
        client_cert: cert.as_ref().map(|c| c.0.as_slice()),
    };
    let identity = match snap.identity.authenticate(providers, &creds).await {
        portcullis_identity::engine::Outcome::Ok { identity, .. } => {
            let c = Credential::identity(
                peer,
                bearer.as_deref(),
                api_key.as_deref(),
                cert.as_ref().map(|c| c.0.clone()),
            );
            req.extensions_mut().insert(c);
            identity
        }
        portcullis_identity::engine::Outcome::Rejected(e) => {
            tracing::warn!(%peer, path = %crate::record::format::bounded(req.uri().path()), error = %e, "admin call refused: credentials rejected");
            let reason = format!("invalid credentials: {e}");
            return refused(
                rt,
                failure(peer, &req, &reason),
                unauthorized("invalid credentials\n"),
            )
            .await;
        }
        _ => {
            let r = unauthorized(
                "missing credentials: a bearer token, an API key or a client certificate\n",
            );
            return refused(rt, failure(peer, &req, "missing credentials"), r).await;
        }
    };
    as_person(rt, snap, peer, identity, req, next).await
}

/// A call made with the console's cookie: a state change must carry the cookie's CSRF token
/// (and come from the console's origin); then it is the token's or the person's call.
async fn with_cookie(
    rt: &Runtime,
    snap: &crate::snapshot::Snapshot,
    peer: SocketAddr,
    value: &str,
    mut req: Request,
    next: Next,
) -> Response {
    let safe = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    if !safe && !crate::console::csrf_passes(snap, req.headers(), value) {
        tracing::warn!(%peer, path = %crate::record::format::bounded(req.uri().path()), "admin call refused: missing or invalid CSRF token");
        return refused(
            rt,
            failure(peer, &req, "missing or invalid CSRF token"),
            csrf_refusal(),
        )
        .await;
    }
    let (caller, refreshed) = match crate::console::from_cookie(snap, peer, value).await {
        crate::console::Seen::Caller(c, r) => (c, r),
        crate::console::Seen::Nobody => {
            let r = unauthorized("the console session has ended: sign in again\n");
            return refused(rt, failure(peer, &req, "the console sign-in has ended"), r).await;
        }
    };
    let mut resp = match caller {
        Caller::Token(who) => {
            req.extensions_mut().insert(Caller::Token(who.clone()));
            req.extensions_mut().insert(Principal {
                who,
                kind: control::PrincipalKind::Token,
                person: None,
            });
            next.run(req).await
        }
        Caller::Person(identity) => as_person(rt, snap, peer, identity, req, next).await,
    };
    if let Some(c) = refreshed.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// An identity's admin call: authorized by `admin.policies` as an action on a resource (a
/// refusal is a 403 and an audit record), then run as that person or agent.
pub(crate) async fn as_person(
    rt: &Runtime,
    snap: &crate::snapshot::Snapshot,
    peer: SocketAddr,
    identity: Arc<portcullis_identity::Identity>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    // A callback names its execution by the token in its body, and inbound events their
    // types: those bodies are read here (within the endpoints' own limits) and passed on.
    let path = parts.uri.path();
    let (token, types, body) = if path.starts_with("/api/v1/callbacks/") || path == "/api/v1/events"
    {
        let limit = crate::admin_events::MAX_BODY.max(1 << 20);
        let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large\n").into_response();
        };
        let token = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_string));
        let types = crate::admin_events::event_types(&parts.headers, &bytes);
        (token, types, axum::body::Body::from(bytes))
    } else {
        (None, Vec::new(), body)
    };
    let (action, resource) =
        crate::admin_authz::target(rt, snap, &parts.method, parts.uri.path(), token.as_deref())
            .await;
    let d = decide(snap, &identity, action, &resource, &types);
    let who = format!("{}/{}", identity.provider, identity.user);
    if !d.allowed {
        let mut rec = crate::audit::admin(
            &who,
            action,
            json!({ "resource": format!("{resource:?}"), "path": parts.uri.path(), "event_types": types }),
        );
        rec.principal = Some(crate::audit::principal(&identity));
        rec.decision = Some(portcullis_audit::Decision::Deny);
        rec.reasons = d.reasons.clone();
        crate::audit::write(&rt.shared, rec).await;
        tracing::warn!(%peer, actor = %who, action, reasons = ?d.reasons, "admin call refused by admin.policies");
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": format!("{who} may not {action} here"), "reasons": d.reasons })),
        )
            .into_response();
    }
    let mut req = Request::from_parts(parts, body);
    req.extensions_mut()
        .insert(Caller::Person(identity.clone()));
    req.extensions_mut().insert(Principal {
        who,
        kind: control::PrincipalKind::Person,
        person: Some(identity),
    });
    next.run(req).await
}

/// `GET /api/v1/dashboard`: one look at what the console shows (see [`crate::console::data`]).
async fn dashboard(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(c): axum::Extension<Caller>,
) -> Response {
    let mut t = crate::console::data::Ticker::default();
    Json(crate::console::data::look(&rt, &c, &mut t).await).into_response()
}

/// `GET /api/v1/dashboard/stream`: a look every second, as server-sent events.
async fn dashboard_stream(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(c): axum::Extension<Caller>,
    credential: Option<axum::Extension<Credential>>,
) -> Response {
    crate::console::data::stream(rt, c, credential.map(|c| c.0))
}

async fn readyz(State(rt): State<Arc<Runtime>>) -> Response {
    if rt.ready.load(Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(rt): State<Arc<Runtime>>) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let m = &rt.shared.metrics;
    for b in &snap.backends {
        for (srv, slot) in b.servers.iter().zip(&b.slots) {
            let labels = vec![("backend", b.id.clone()), ("server", srv.name.clone())];
            m.server_up
                .get_or_create(&labels)
                .set(slot.state.available() as i64);
            m.server_active
                .get_or_create(&labels)
                .set(slot.state.active.load(Ordering::Relaxed) as i64);
        }
    }
    // Authorizer cache counters live in the authorizers; bring the exported totals up to them.
    // One scrape at a time, so two concurrent scrapes cannot both add the same difference.
    static SYNC: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    let _sync = SYNC.lock();
    for a in snap.authorizers.iter() {
        let st = a.stats();
        for (result, total) in [("hit", st.hits), ("miss", st.misses)] {
            let c = m.authorizer_cache.get_or_create(&vec![
                ("authorizer", a.name().to_string()),
                ("result", result.to_string()),
            ]);
            let cur = c.get();
            if total > cur {
                c.inc_by(total - cur);
            }
        }
    }
    m.sync_events(&rt.shared.events.bus.stats());
    crate::audit::sync_metrics(&rt.shared);
    drop(_sync);
    outbox_pending(&rt, &snap).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// Sets `portcullis_events_outbox_pending` for each durable webhook of the running bus: a
/// count in the embedded store, off the async threads.
async fn outbox_pending(rt: &Arc<Runtime>, snap: &crate::snapshot::Snapshot) {
    let Some(store) = rt.shared.limits.plans.store().cloned() else {
        return;
    };
    let Ok(cfg) = crate::events::events_cfg(&snap.config) else {
        return;
    };
    let running = rt.shared.events.bus.stats();
    let sinks: Vec<String> = cfg
        .sinks
        .into_iter()
        .filter(|s| matches!(&s.kind, portcullis_events::SinkKind::Webhook(w) if w.durable))
        .filter(|s| running.iter().any(|(name, _)| **name == *s.name))
        .map(|s| s.name)
        .collect();
    if sinks.is_empty() {
        return;
    }
    let counts = tokio::task::spawn_blocking(move || {
        sinks
            .into_iter()
            .filter_map(|s| store.outbox_count(&s).ok().map(|n| (s, n)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (sink, n) in counts {
        rt.shared
            .metrics
            .events_outbox
            .get_or_create(&vec![("sink", sink)])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

async fn backends(State(rt): State<Arc<Runtime>>) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let list: Vec<_> = snap
        .backends
        .iter()
        .map(|b| {
            let servers: Vec<_> = b
                .servers
                .iter()
                .zip(&b.slots)
                .map(|(srv, slot)| {
                    let st = &slot.state;
                    json!({
                        "name": srv.name,
                        "address": srv.address,
                        "state": st.admin_state(),
                        "health": if st.healthy() { "up" } else { "down" },
                        "ejected": st.ejected(),
                        "ejections": st.ejection_count(),
                        "available": st.available(),
                        "weight": st.weight_override().unwrap_or(slot.weight),
                        "config_weight": slot.weight,
                        "active": st.active.load(Ordering::Relaxed),
                        "queued": st.queued.load(Ordering::Relaxed),
                        "max_connections": srv.max_connections,
                        "total_requests": st.total.load(Ordering::Relaxed),
                        "idle_connections": st.pool.idle_count(),
                    })
                })
                .collect();
            json!({ "name": b.id, "servers": servers, "in_flight": b.in_flight.load(Ordering::Relaxed) })
        })
        .collect();
    Json(json!({ "backends": list })).into_response()
}

/// The admin API's answer to a command that was not applied: the message as plain text, or
/// for a rejected reload the JSON that says which version keeps serving.
impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            ControlError::ReloadRejected {
                error,
                serving_version,
            } => (
                status,
                Json(json!({ "result": "rejected", "error": error, "serving_version": serving_version })),
            )
                .into_response(),
            e => (status, format!("{e}\n")).into_response(),
        }
    }
}

/// Runs `cmd` through [`control::apply`] and answers with its result as JSON.
async fn run(rt: &Runtime, by: &Principal, cmd: Command) -> Response {
    match control::apply(rt, by, cmd).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: AdminState,
}

async fn set_state(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path((backend, server)): Path<(String, String)>,
    body: Result<Json<StateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(StateBody { state }) = match body {
        Ok(b) => b,
        Err(e) => {
            return crate::admin_body::refused(
                &e,
                "body must be {\"state\": \"ready\" | \"drain\" | \"maint\"}\n",
            )
        }
    };
    let cmd = Command::SetServerState {
        backend,
        server,
        state,
    };
    run(&rt, &by, cmd).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

async fn set_weight(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path((backend, server)): Path<(String, String)>,
    body: Result<Json<WeightBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(WeightBody { weight }) = match body {
        Ok(b) => b,
        Err(e) => return crate::admin_body::refused(&e, "body must be {\"weight\": 1..1000}\n"),
    };
    let cmd = Command::SetServerWeight {
        backend,
        server,
        weight,
    };
    run(&rt, &by, cmd).await
}

async fn reload(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
) -> Response {
    run(&rt, &by, Command::Reload).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchBody {
    backend: String,
}

/// `POST /api/v1/routes/{route}/switch` `{"backend": "app/name"}`: sends the route's requests
/// to another backend until it is restored (as a trigger's `switch_route`).
async fn switch_route(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path(route): Path<String>,
    body: Result<Json<SwitchBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(SwitchBody { backend }) = match body {
        Ok(b) => b,
        Err(e) => {
            return crate::admin_body::refused(&e, "body must be {\"backend\": \"app/name\"}\n")
        }
    };
    run(&rt, &by, Command::SwitchRoute { route, backend }).await
}

/// `POST /api/v1/routes/{route}/restore`: sends the route's requests back to its own backend.
async fn restore_route(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path(route): Path<String>,
) -> Response {
    run(&rt, &by, Command::RestoreRoute { route }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    principal: String,
}

/// `POST /api/v1/sessions/revoke` `{"principal": "provider/subject"}`: ends that principal's
/// browser sessions opened until now.
async fn revoke_sessions(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    match serde_json::from_slice::<RevokeBody>(&body) {
        Ok(b) => {
            run(
                &rt,
                &by,
                Command::RevokeSessions {
                    principal: b.principal,
                },
            )
            .await
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("the body is {{\"principal\": \"provider/subject\"}}: {e}") })),
        )
            .into_response(),
    }
}

async fn config(State(rt): State<Arc<Runtime>>) -> Response {
    let st = rt.status.read().clone();
    Json(json!({
        "version": st.version,
        "loaded_at": httpdate::fmt_http_date(st.loaded_at),
        "last_reload_error": st.last_error,
        "last_reload_attempt": st.last_attempt.map(httpdate::fmt_http_date),
        "reloads_ok": st.ok,
        "reloads_failed": st.failed,
    }))
    .into_response()
}
