//! Alertmanager's webhook payload (version 4), as Alertmanager 0.25+ posts it, becomes one
//! event per alert, with ids that stay the same when the same alert is sent again.

use http::{HeaderMap, HeaderValue};
use portcullis_events::inbound::{parse, MAX_BODY};
use portcullis_events::{alertmanager, rfc3339, types};

/// A group of two alerts, one firing and one resolved, in the shape Alertmanager posts.
const PAYLOAD: &str = r#"{
  "receiver": "portcullis",
  "status": "firing",
  "alerts": [
    {
      "status": "firing",
      "labels": {
        "alertname": "BackendDown",
        "backend": "billing-v2",
        "instance": "10.0.0.11:8080",
        "job": "billing",
        "severity": "page"
      },
      "annotations": {
        "summary": "billing-v2 server 10.0.0.11:8080 is down",
        "runbook_url": "https://runbooks.example/backend-down"
      },
      "startsAt": "2026-01-31T12:00:00.123456789Z",
      "endsAt": "0001-01-01T00:00:00Z",
      "generatorURL": "http://prometheus:9090/graph?g0.expr=up%7Bjob%3D%22billing%22%7D+%3D%3D+0&g0.tab=1",
      "fingerprint": "3bfa2cbd8f4c1a06"
    },
    {
      "status": "resolved",
      "labels": {
        "alertname": "HighLatency",
        "backend": "billing-v2",
        "severity": "warn"
      },
      "annotations": { "summary": "p99 above 500ms" },
      "startsAt": "2026-01-31T11:40:00Z",
      "endsAt": "2026-01-31T11:58:30Z",
      "generatorURL": "http://prometheus:9090/graph?g0.expr=latency",
      "fingerprint": "c5d1a94e0b7e22f1"
    }
  ],
  "groupLabels": { "backend": "billing-v2" },
  "commonLabels": { "backend": "billing-v2" },
  "commonAnnotations": {},
  "externalURL": "http://alertmanager.example:9093",
  "version": "4",
  "groupKey": "{}:{backend=\"billing-v2\"}",
  "truncatedAlerts": 0
}"#;

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h
}

#[test]
fn each_alert_becomes_an_event() {
    let events = parse(&json_headers(), PAYLOAD.as_bytes(), MAX_BODY).unwrap();
    assert_eq!(events.len(), 2);
    let (firing, resolved) = (&events[0], &events[1]);

    assert_eq!(firing.type_, types::ALERT_FIRING);
    assert_eq!(firing.source, "http://alertmanager.example:9093");
    assert_eq!(
        firing.subject.as_deref(),
        Some("BackendDown/10.0.0.11:8080")
    );
    assert_eq!(rfc3339(firing.time), "2026-01-31T12:00:00.123456789Z");
    assert!(
        firing.id.starts_with("am-") && firing.id.len() == 35,
        "{}",
        firing.id
    );
    assert_eq!(firing.data["labels"]["backend"], "billing-v2");
    assert_eq!(
        firing.data["annotations"]["summary"],
        "billing-v2 server 10.0.0.11:8080 is down"
    );
    assert_eq!(firing.data["receiver"], "portcullis");
    assert_eq!(firing.data["fingerprint"], "3bfa2cbd8f4c1a06");
    assert_eq!(firing.data["groupKey"], "{}:{backend=\"billing-v2\"}");

    assert_eq!(resolved.type_, types::ALERT_RESOLVED);
    assert_eq!(
        resolved.subject.as_deref(),
        Some("HighLatency"),
        "no instance label"
    );
    assert_eq!(
        rfc3339(resolved.time),
        "2026-01-31T11:58:30Z",
        "resolved: endsAt"
    );
    assert_ne!(firing.id, resolved.id);
}

#[test]
fn the_same_alert_sent_again_has_the_same_id_and_resolving_it_a_new_one() {
    let first = alertmanager::parse(PAYLOAD.as_bytes()).unwrap();
    let again = alertmanager::parse(PAYLOAD.as_bytes()).unwrap();
    assert_eq!(first[0].id, again[0].id, "repeat_interval resend: dedups");
    let resolved_later = PAYLOAD.replacen(
        r#""status": "firing",
      "labels""#,
        r#""status": "resolved",
      "labels""#,
        1,
    );
    let resolved_later = resolved_later.replacen(
        r#""endsAt": "0001-01-01T00:00:00Z""#,
        r#""endsAt": "2026-01-31T12:05:00Z""#,
        1,
    );
    let resolved = alertmanager::parse(resolved_later.as_bytes()).unwrap();
    assert_eq!(resolved[0].type_, types::ALERT_RESOLVED);
    assert_ne!(resolved[0].id, first[0].id);
    // A new firing (a new startsAt) of the same alert is a new event too.
    let refired = PAYLOAD.replace("2026-01-31T12:00:00.123456789Z", "2026-01-31T13:00:00Z");
    assert_ne!(
        alertmanager::parse(refired.as_bytes()).unwrap()[0].id,
        first[0].id
    );
}

#[test]
fn payloads_that_are_not_alertmanager_v4_are_refused_clearly() {
    let err = |body: &str| parse(&json_headers(), body.as_bytes(), MAX_BODY).unwrap_err();
    let v3 = PAYLOAD.replace(r#""version": "4""#, r#""version": "3""#);
    let e = err(&v3);
    assert!(
        e.to_string().contains("version `3`") && e.status() == 400,
        "{e}"
    );
    let e = err(r#"{"receiver": "x", "status": "firing", "version": "4"}"#);
    assert!(e.to_string().contains("missing field `alerts`"), "{e}");
    let odd = PAYLOAD.replacen(r#""status": "resolved""#, r#""status": "pending""#, 1);
    let e = err(&odd);
    assert!(
        e.to_string().contains("alerts[1].status is `pending`"),
        "{e}"
    );
    let bad_time = PAYLOAD.replace("2026-01-31T11:58:30Z", "soon");
    assert!(err(&bad_time)
        .to_string()
        .contains("`alerts[1].endsAt` is `soon`"));
    // A payload without alerts would be accepted as nothing (found by the `cloudevents`
    // fuzz target; kept in fuzz/regressions/cloudevents/).
    let e = err(r#"{"receiver": "x", "status": "firing", "version": "4", "alerts": []}"#);
    assert!(
        e.to_string().contains("`alerts` is empty") && e.status() == 400,
        "{e}"
    );
    let e = err("{\"alerts\": [");
    assert!(e.to_string().starts_with("the body is not JSON"), "{e}");
}
