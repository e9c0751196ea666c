//! `POST /api/v1/events` on the admin listener: events from outside onto the bus, where the
//! sinks and automation see them as they see the proxy's own.
//!
//! * **Who.** The caller holds an `admin.tokens` bearer token (the admin API's
//!   authentication, applied by `admin.rs`); its [`Principal`] is audited.
//! * **What.** Whatever `portcullis_events::inbound::parse` reads: a structured CloudEvent
//!   (`application/cloudevents+json`), a batch (`application/cloudevents-batch+json`), a
//!   binary-mode CloudEvent (`ce-*` headers, JSON body), or a Prometheus Alertmanager
//!   webhook payload (`application/json`, one event per alert) of at most [`MAX_BODY`] bytes.
//! * **The reserved namespace.** The proxy's own types (`dev.portcullis.*`) and source
//!   (`portcullis://…`) cannot be posted as CloudEvents: nobody outside may say that a server
//!   went down or that the config was reloaded. The only `dev.portcullis.*` events that come
//!   in are `dev.portcullis.alert.firing` and `dev.portcullis.alert.resolved`, which the
//!   endpoint makes itself from an Alertmanager payload.
//! * **All or nothing.** One bad event refuses the whole request with its 4xx and a JSON
//!   `{"error": "..."}`; nothing is published, audited or kept. A body over the limit is
//!   refused with 413 as soon as its `Content-Length` (or what was read of it) says so.
//! * **Accepted.** One audit record (`publish_events`, with each event's id, type, source and
//!   subject) is written first (if it cannot be, 503 and nothing is published), then each
//!   event is published, and the answer is 202 `{"accepted": [ids]}`.

use crate::control::Principal;
use crate::Runtime;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use portcullis_events::{inbound, Event};
use serde_json::json;
use std::sync::Arc;

/// The largest body taken.
pub const MAX_BODY: usize = inbound::MAX_BODY;

/// The prefix of the types the proxy emits, reserved.
pub const RESERVED_TYPES: &str = "dev.portcullis.";
/// The prefix of the proxy's own `source`, reserved.
pub const RESERVED_SOURCE: &str = "portcullis://";

pub fn routes() -> Router<Arc<Runtime>> {
    Router::new()
        .route("/api/v1/events", post(publish))
        .route("/api/v1/events/stream", axum::routing::get(stream))
}

/// A refusal: `status` with `{"error": message}`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// How long an inbound publish waits for the sinks to store its events before it answers
/// 503 (the events may still be delivered; a retry with the same ids is deduplicated by
/// receivers).
const HAND_ON_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn publish(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let too_large = |size: &str| {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is {size}more than the {MAX_BODY} bytes allowed"),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_BODY as u64) {
        return too_large(&format!("{n} bytes, "));
    }
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(""),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let events = match accept(&parts.headers, &body) {
        Ok(events) => events,
        Err((status, message)) => {
            tracing::info!(actor = %by.who, status = status.as_u16(), error = %message, "inbound events refused");
            return refuse(status, message);
        }
    };
    let summary: Vec<_> = events
        .iter()
        .map(|e| json!({ "id": e.id, "type": e.type_, "source": e.source, "subject": e.subject }))
        .collect();
    let mut rec = by.record("publish_events", json!({ "events": summary }));
    rec.decision = Some(portcullis_audit::Decision::Allow);
    if !crate::audit::write(&rt.shared, rec).await {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail is unavailable: nothing was published",
        );
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    tracing::info!(actor = %by.who, count = ids.len(), "inbound events published");
    // Answered once each sink has the events: a durable webhook sink has written them to
    // its outbox, so an acknowledged event survives a crash of the next moment.
    // One at a time, in order: a batch larger than a sink's queue then goes through it as
    // the sink drains, instead of overflowing it.
    let events_rt = &rt.shared.events;
    let stored = tokio::time::timeout(HAND_ON_WAIT, async {
        for e in events {
            if !events_rt.emit_handed_on(e).await {
                return false;
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !stored {
        tracing::warn!(actor = %by.who, count = ids.len(), "inbound events not stored by every sink (a queue full, or slow); answered 503");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not every event was stored by every sink (a sink's queue is full, or it is slow): send them again (same ids) later",
        );
    }
    (StatusCode::ACCEPTED, Json(json!({ "accepted": ids }))).into_response()
}

/// The events of a request, or the status and message to refuse it with.
pub fn accept(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Event>, (StatusCode, String)> {
    let events = inbound::parse(headers, body, MAX_BODY).map_err(|e| {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        (status, e.to_string())
    })?;
    let from_alertmanager = is_alertmanager(headers);
    for (i, e) in events.iter().enumerate() {
        let which = || {
            if events.len() > 1 {
                format!("event {i}")
            } else {
                "the event".to_owned()
            }
        };
        let alert = matches!(
            e.type_.as_str(),
            portcullis_events::types::ALERT_FIRING | portcullis_events::types::ALERT_RESOLVED
        );
        if reserved(&e.type_, RESERVED_TYPES) && !(from_alertmanager && alert) {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{}: type `{}` is reserved: `{RESERVED_TYPES}*` types are emitted by \
                     portcullis itself (alerts come in as Alertmanager payloads); use a type of \
                     your own, such as `com.example.deploy.finished`",
                    which(),
                    e.type_
                ),
            ));
        }
        if reserved(&e.source, RESERVED_SOURCE) {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{}: source `{}` is reserved: `{RESERVED_SOURCE}` names portcullis \
                     instances; name your system, such as `https://ci.example.com`",
                    which(),
                    e.source
                ),
            ));
        }
    }
    Ok(events)
}

/// Whether `value` is in the reserved namespace `prefix`: compared without regard to ASCII
/// case (a URI's scheme is case-insensitive, RFC 3986 §3.1, and `DEV.portcullis.*` would read
/// as the proxy's own to many a receiver), and after leading whitespace.
pub fn reserved(value: &str, prefix: &str) -> bool {
    value
        .trim_start()
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

/// The types of the events an inbound body carries, read exactly as the endpoint will read
/// them ([`accept`]: batch, structured, binary or Alertmanager mode, by
/// the request's media type and `ce-*` headers), so that what is authorized is what is
/// published: a `ce-type` header beside a structured body, or an `alerts` member in a
/// CloudEvent, names no type here that the endpoint would not publish. A body the endpoint
/// refuses gives none (and is refused there).
pub fn event_types(headers: &http::HeaderMap, body: &[u8]) -> Vec<String> {
    let Ok(events) = accept(headers, body) else {
        return Vec::new();
    };
    let mut types: Vec<String> = events.into_iter().map(|e| e.type_).collect();
    types.sort_unstable();
    types.dedup();
    types
}

/// Whether `inbound::parse` read the request as an Alertmanager payload: JSON that is
/// neither a CloudEvent in any mode nor a batch.
fn is_alertmanager(headers: &HeaderMap) -> bool {
    use portcullis_events::http::{is_binary, is_structured};
    let batch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(portcullis_events::event::BATCH_CONTENT_TYPE)
        });
    !batch && !is_structured(headers) && !is_binary(headers)
}

/// Whether a stream's caller may still read events (see `stream`): its credential still
/// holds, and `events.read` is still permitted it.
struct Still {
    rt: Arc<Runtime>,
    caller: crate::admin_authz::Caller,
    recheck: crate::console::credential::Recheck,
}

impl Still {
    async fn may_read(&mut self) -> bool {
        let caller = &self.caller;
        self.recheck
            .still(&self.rt, |snap| {
                caller.may(
                    snap,
                    "events.read",
                    &portcullis_policy::admin::AdminResource::Config,
                )
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[u8] =
        br#"{"specversion":"1.0","id":"1","source":"https://x","type":"com.example.ban"}"#;

    #[test]
    fn the_types_of_an_inbound_body_are_found_in_every_mode() {
        let ct = |v| headers(&[("content-type", v)]);
        assert_eq!(event_types(&ct(STRUCTURED), EVENT), vec!["com.example.ban"]);
        let batch = br#"[{"specversion":"1.0","id":"1","source":"https://x","type":"b"},
            {"specversion":"1.0","id":"2","source":"https://x","type":"a"}]"#;
        assert_eq!(
            event_types(&ct("application/cloudevents-batch+json"), batch),
            vec!["a", "b"]
        );
        assert_eq!(
            event_types(
                &ct("application/json"),
                br#"{"version":"4","status":"firing","receiver":"r","alerts":[
                    {"status":"firing","labels":{"alertname":"A"},"startsAt":"2026-01-01T00:00:00Z"},
                    {"status":"resolved","labels":{"alertname":"B"},"startsAt":"2026-01-01T00:00:00Z","endsAt":"2026-01-01T01:00:00Z"}]}"#
            ),
            vec!["dev.portcullis.alert.firing", "dev.portcullis.alert.resolved"]
        );
        let binary = headers(&[
            ("content-type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "https://x"),
            ("ce-type", "com.example.bin"),
        ]);
        assert_eq!(event_types(&binary, b"{}"), vec!["com.example.bin"]);
        assert!(event_types(&ct("application/json"), b"not json").is_empty());
    }

    /// The types authorized are the types the endpoint publishes, however the request mixes
    /// the modes: a `ce-type` header beside a structured or batch body names nothing, and a
    /// CloudEvent with an `alerts` member is that CloudEvent.
    #[test]
    fn a_header_or_member_of_another_mode_names_no_type() {
        let with = |ct| headers(&[("content-type", ct), ("ce-type", "com.example.allowed")]);
        assert_eq!(
            event_types(&with(STRUCTURED), EVENT),
            vec!["com.example.ban"]
        );
        let batch =
            br#"[{"specversion":"1.0","id":"1","source":"https://x","type":"com.example.ban"}]"#;
        assert_eq!(
            event_types(&with("application/cloudevents-batch+json"), batch),
            vec!["com.example.ban"]
        );
        let both = br#"{"specversion":"1.0","id":"1","source":"https://x","type":"com.example.ban","alerts":[{"status":"firing"}]}"#;
        assert_eq!(
            event_types(&headers(&[("content-type", STRUCTURED)]), both),
            vec!["com.example.ban"]
        );
        // Without a media type the endpoint reads nothing, so nothing is authorized.
        assert!(event_types(&http::HeaderMap::new(), both).is_empty());
        // Whatever is authorized is what `accept` publishes.
        for (h, body) in [
            (with(STRUCTURED), EVENT),
            (with("application/json"), &both[..]),
        ] {
            let published: Vec<String> = accept(&h, body)
                .map(|e| e.into_iter().map(|e| e.type_).collect())
                .unwrap_or_default();
            let mut published = published;
            published.sort_unstable();
            published.dedup();
            assert_eq!(event_types(&h, body), published);
        }
    }
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const STRUCTURED: &str = "application/cloudevents+json";

    fn event(type_: &str, source: &str) -> String {
        json!({"specversion": "1.0", "id": "e1", "source": source, "type": type_, "data": {"x": 1}})
            .to_string()
    }

    /// CloudEvents forbids control characters in String attributes: a NUL or a newline in
    /// `type`, `subject` or a `ce-*` header is a 400 naming the attribute, in every mode.
    #[test]
    fn control_characters_in_attributes_are_refused() {
        let h = headers(&[("content-type", STRUCTURED)]);
        let base = json!({"specversion": "1.0", "id": "e1", "source": "https://x", "type": "com.example.t"});
        for (attr, value) in [
            ("type", "com.example.t\u{0}\n"),
            ("id", "e\r1"),
            ("source", "https://x\u{1b}[2J"),
            ("subject", "a\u{85}b"),
            ("causedby", "x\u{7f}"),
        ] {
            let mut ev = base.clone();
            ev[attr] = json!(value);
            let (status, msg) = accept(&h, ev.to_string().as_bytes()).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{attr}: {msg}");
            assert!(
                msg.contains(attr) && msg.contains("control character"),
                "{msg}"
            );
        }
        let batch =
            json!([base, {"specversion": "1.0", "id": "e2", "source": "https://x", "type": "t\n"}]);
        let bh = headers(&[("content-type", "application/cloudevents-batch+json")]);
        let (status, msg) = accept(&bh, batch.to_string().as_bytes()).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{msg}");
        assert!(
            msg.contains('1') && msg.contains("control character"),
            "{msg}"
        );
        let binary = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "https://x"),
            ("ce-type", "com.example.t%0A"),
            ("content-type", "application/json"),
        ]);
        let (status, msg) = accept(&binary, b"{}").unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{msg}");
        // Printable text outside ASCII is fine.
        let mut ok = base.clone();
        ok["subject"] = json!("café/ü");
        assert!(accept(&h, ok.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn outside_types_are_taken() {
        let h = headers(&[("content-type", STRUCTURED)]);
        let got = accept(
            &h,
            event("com.example.deploy", "https://ci.example").as_bytes(),
        )
        .unwrap();
        assert_eq!(got[0].type_, "com.example.deploy");
    }

    #[test]
    fn the_proxys_types_and_source_are_reserved_even_for_alert_types() {
        let h = headers(&[("content-type", STRUCTURED)]);
        for (type_, source) in [
            ("dev.portcullis.server.down", "https://x"),
            ("dev.portcullis.alert.firing", "https://x"),
            ("dev.portcullis.nope", "https://x"),
            ("com.example.x", "portcullis://edge-1"),
            ("com.example.x", "PORTCULLIS://edge-1"),
            ("com.example.x", "Portcullis://edge-1"),
            ("com.example.x", " portcullis://edge-1"),
            ("DEV.portcullis.server.down", "https://x"),
            ("Dev.Portcullis.config.reloaded", "https://x"),
        ] {
            let (status, msg) = accept(&h, event(type_, source).as_bytes()).unwrap_err();
            assert_eq!(status, StatusCode::FORBIDDEN, "{type_} {source}: {msg}");
            assert!(msg.contains("reserved"), "{msg}");
        }
        // In a batch, the index is named.
        let h = headers(&[("content-type", "application/cloudevents-batch+json")]);
        let batch = format!(
            "[{},{}]",
            event("com.example.ok", "https://x"),
            event("dev.portcullis.server.up", "https://x")
        );
        let (_, msg) = accept(&h, batch.as_bytes()).unwrap_err();
        assert!(msg.starts_with("event 1: "), "{msg}");
    }

    #[test]
    fn alertmanager_payloads_become_alert_events() {
        let h = headers(&[("content-type", "application/json")]);
        let body = json!({
            "version": "4", "status": "firing", "receiver": "portcullis", "groupKey": "{}",
            "externalURL": "http://am:9093",
            "alerts": [{"status": "firing", "labels": {"alertname": "Down", "instance": "a:1"},
                        "startsAt": "2026-01-31T12:00:00Z", "fingerprint": "f1"}]
        });
        let got = accept(&h, body.to_string().as_bytes()).unwrap();
        assert_eq!(got[0].type_, portcullis_events::types::ALERT_FIRING);
        assert_eq!(got[0].subject.as_deref(), Some("Down/a:1"));
    }

    #[test]
    fn parse_errors_keep_their_status() {
        let h = headers(&[("content-type", STRUCTURED)]);
        let (status, _) = accept(&h, b"{not json").unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, msg) = accept(&h, br#"{"id":"a","source":"s","type":"t"}"#).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(msg.contains("specversion"), "{msg}");
        let h = headers(&[("content-type", "text/plain")]);
        assert_eq!(
            accept(&h, b"x").unwrap_err().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}

/// `?types=`: comma-separated type patterns (`*` wildcards); every type when absent.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    types: Option<String>,
}

/// `GET /api/v1/events/stream[?types=dev.portcullis.server.*,com.example.*]`: every event
/// published from now on, live, as server-sent events (`event: cloudevent`, `id:` the
/// CloudEvent's id, `data:` its structured-mode JSON). A watcher that falls more than
/// [`portcullis_events::bus::TAP_QUEUE`] events behind gets `event: lagged` with how many it
/// missed. A comment every 15 s keeps idle connections open. (What `portcullis ctl events
/// --follow` and the dashboard read.)
pub async fn stream(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(caller): axum::Extension<crate::admin_authz::Caller>,
    credential: Option<axum::Extension<crate::console::credential::Credential>>,
    axum::extract::Query(q): axum::extract::Query<StreamQuery>,
) -> Response {
    use axum::response::sse::{Event as Sse, KeepAlive};
    let patterns: Vec<String> = q
        .types
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let filter = match portcullis_events::TypeFilter::new(&patterns) {
        Ok(f) => f,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": e }))).into_response();
        }
    };
    let tap = rt.shared.events.bus.tap();
    // The caller's credential and `events.read` are checked again before an event goes
    // out, at most once a second: a stream opened before a revocation (a token removed, a
    // sign-out, a policy reloaded) ends with it.
    let still = Still {
        rt: rt.clone(),
        caller,
        recheck: crate::console::credential::Recheck::new(credential.map(|c| c.0)),
    };
    let events = futures_util::stream::unfold(
        (tap, filter, still),
        |(mut tap, filter, mut still)| async move {
            loop {
                let item = match tap.next().await {
                    Ok(e) if !filter.matches(&e.type_) => continue,
                    Ok(_) if !still.may_read().await => return None,
                    Ok(e) => Sse::default()
                        .event("cloudevent")
                        .id(e.id.clone())
                        .data(e.to_json_string()),
                    Err(missed) => Sse::default()
                        .event("lagged")
                        .data(json!({ "missed": missed }).to_string()),
                };
                return Some((
                    Ok::<_, std::convert::Infallible>(item),
                    (tap, filter, still),
                ));
            }
        },
    );
    axum::response::sse::Sse::new(events)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response()
}
