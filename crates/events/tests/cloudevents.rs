//! CloudEvents in and out: round trips in structured and binary mode, what
//! `POST /api/v1/events` will accept (`inbound::parse`), and the clear error and status
//! for each malformed input.

use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis_events::http::{from_binary, to_binary, to_structured};
use portcullis_events::inbound::{parse, MAX_BODY};
use portcullis_events::{Event, ParseError, ServerChange, ServerData, Source};
use serde_json::json;
use std::time::{Duration, SystemTime};

fn sample() -> Event {
    Source::new("portcullis://edge-1")
        .server(
            ServerChange::Down,
            ServerData::new("billing-v2", "10.0.0.11:8080", "3 failed checks", 1, 2),
        )
        .caused_by("e-41")
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn structured(body: &str) -> Result<Vec<Event>, ParseError> {
    parse(
        &headers(&[("content-type", "application/cloudevents+json")]),
        body.as_bytes(),
        MAX_BODY,
    )
}

/// The error for `body` in structured mode, with its status.
fn refused(body: &str) -> (String, u16) {
    let e = structured(body).unwrap_err();
    (e.to_string(), e.status())
}

#[test]
fn structured_mode_round_trips() {
    let e = sample();
    let json: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
    assert_eq!(json["specversion"], "1.0");
    assert_eq!(json["type"], "dev.portcullis.server.down");
    assert_eq!(json["datacontenttype"], "application/json");
    assert_eq!(json["causedby"], "e-41");
    assert_eq!(json["subject"], "billing-v2/10.0.0.11:8080");
    assert_eq!(json["data"]["healthy"], 1);
    assert_eq!(Event::from_json(&e.to_json(), MAX_BODY).unwrap(), e);
    let (h, body) = to_structured(&e);
    assert_eq!(parse(&h, &body, MAX_BODY).unwrap(), vec![e]);
}

#[test]
fn binary_mode_round_trips_with_percent_encoding() {
    let mut e = sample();
    e.subject = Some("Zürich pool/\"a\" 100%".into());
    let (h, body) = to_binary(&e);
    assert_eq!(h["ce-id"], e.id.as_str());
    assert_eq!(h["ce-subject"], "Z%C3%BCrich%20pool/%22a%22%20100%25");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        e.data
    );
    assert_eq!(from_binary(&h, &body, MAX_BODY).unwrap(), e);
    assert_eq!(parse(&h, &body, MAX_BODY).unwrap(), vec![e.clone()]);
    // No data: an empty body, and back to null.
    e.data = serde_json::Value::Null;
    let (h, body) = to_binary(&e);
    assert!(body.is_empty() && !h.contains_key("content-type"));
    assert_eq!(from_binary(&h, &body, MAX_BODY).unwrap(), e);
}

#[test]
fn a_spec_example_parses_and_unknown_extensions_are_ignored() {
    // The example of the CloudEvents JSON format spec, plus an offset time.
    let events = structured(
        r#"{
            "specversion" : "1.0",
            "type" : "com.example.someevent",
            "source" : "/mycontext",
            "subject": null,
            "id" : "C234-1234-1234",
            "time" : "2018-04-05T19:31:00+02:00",
            "comexampleextension1" : "value",
            "comexampleothervalue" : 5,
            "datacontenttype" : "application/json",
            "data" : { "appinfoA" : "abc", "appinfoB" : 123, "appinfoC" : true }
        }"#,
    )
    .unwrap();
    let e = &events[0];
    assert_eq!(
        (e.id.as_str(), e.source.as_str()),
        ("C234-1234-1234", "/mycontext")
    );
    assert_eq!(portcullis_events::rfc3339(e.time), "2018-04-05T17:31:00Z");
    assert_eq!(e.subject, None);
    assert_eq!(e.data["appinfoB"], 123);
    // Without `time`, the time of receipt.
    let e = &structured(r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#).unwrap()[0];
    assert!(SystemTime::now().duration_since(e.time).unwrap() < Duration::from_secs(5));
    assert!(e.data.is_null());
}

#[test]
fn malformed_structured_events_get_clear_errors() {
    let ok = json!({"specversion":"1.0","id":"1","source":"s","type":"t","data":{}});
    let with = |k: &str, v: serde_json::Value| {
        let mut m = ok.clone();
        m[k] = v;
        m.to_string()
    };
    let without = |k: &str| {
        let mut m = ok.clone();
        m.as_object_mut().unwrap().remove(k);
        m.to_string()
    };
    assert_eq!(
        refused(&without("id")),
        ("the required attribute `id` is missing".into(), 400)
    );
    assert_eq!(
        refused(&without("specversion")).0,
        "the required attribute `specversion` is missing"
    );
    let (msg, status) = refused(&with("specversion", json!("0.3")));
    assert!(msg.contains("`0.3`") && msg.contains("1.0"), "{msg}");
    assert_eq!(status, 400);
    let (msg, _) = refused(&with("time", json!("yesterday")));
    assert!(
        msg.starts_with("`time` is `yesterday`, not an RFC 3339 time"),
        "{msg}"
    );
    assert_eq!(
        refused(&with("id", json!(42))).0,
        "the attribute `id` must be a string, not a number"
    );
    assert_eq!(
        refused(&with("type", json!(""))).0,
        "the attribute `type` must not be empty"
    );
    let (msg, status) = refused(&with("datacontenttype", json!("text/plain")));
    assert!(msg.contains("`text/plain` is not JSON"), "{msg}");
    assert_eq!(status, 415);
    assert!(refused(&with("data_base64", json!("AAAA")))
        .0
        .contains("data_base64"));
    let (msg, status) = refused(r#"{"specversion": "1.0", "id": "#);
    assert!(
        msg.starts_with("the body is not JSON: EOF while parsing") && msg.contains("line 1"),
        "{msg}"
    );
    assert_eq!(status, 400);
    assert_eq!(
        refused("[1]").0,
        "a structured CloudEvent is a JSON object, not an array"
    );
}

#[test]
fn too_large_bodies_are_refused_before_parsing() {
    let e = sample();
    let (h, body) = to_structured(&e);
    let err = parse(&h, &body, 100).unwrap_err();
    assert_eq!(err.status(), 413);
    assert_eq!(
        err.to_string(),
        format!(
            "the body is {} bytes, more than the 100 bytes allowed",
            body.len()
        )
    );
    let (h, body) = to_binary(&e);
    assert_eq!(parse(&h, &body, 10).unwrap_err().status(), 413);
}

#[test]
fn malformed_binary_events_get_clear_errors() {
    let base = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
        ("content-type", "application/json"),
    ];
    let without = |name: &str| {
        let pairs: Vec<_> = base.iter().copied().filter(|(k, _)| *k != name).collect();
        headers(&pairs)
    };
    let err = |h: &HeaderMap, body: &str| parse(h, body.as_bytes(), MAX_BODY).unwrap_err();
    assert_eq!(
        err(&without("ce-type"), "{}").to_string(),
        "the required attribute `type` is missing"
    );
    let mut h = headers(&base);
    h.insert("ce-specversion", HeaderValue::from_static("0.3"));
    assert!(matches!(err(&h, "{}"), ParseError::SpecVersion { .. }));
    let e = err(&headers(&base), "not json");
    assert!(
        e.to_string()
            .starts_with("the body (the event's data) is not JSON"),
        "{e}"
    );
    let mut h = headers(&base);
    h.insert("content-type", HeaderValue::from_static("text/plain"));
    assert_eq!(err(&h, "hello").status(), 415);
    let mut h = headers(&base);
    h.insert("ce-time", HeaderValue::from_static("2026-13-01T00:00:00Z"));
    assert!(err(&h, "{}")
        .to_string()
        .contains("`time` is `2026-13-01T00:00:00Z`"));
    let mut h = headers(&base);
    h.insert("ce-subject", HeaderValue::from_static("bad%zz"));
    let msg = err(&h, "{}").to_string();
    assert!(
        msg.contains("subject") && msg.contains("percent-escape"),
        "{msg}"
    );
}

#[test]
fn what_is_not_an_event_is_a_415() {
    let e = parse(&headers(&[("content-type", "text/plain")]), b"hi", MAX_BODY).unwrap_err();
    assert_eq!(e.status(), 415);
    assert!(
        e.to_string().contains("`text/plain` is not an event"),
        "{e}"
    );
    let e = parse(&HeaderMap::new(), b"{}", MAX_BODY).unwrap_err();
    assert!(e.to_string().contains("`(none)`"), "{e}");
}

#[test]
fn batches_parse_each_event_and_name_the_bad_one() {
    let h = headers(&[("content-type", "application/cloudevents-batch+json")]);
    let a = sample();
    let b = Source::new("s").event("t", None, json!(1));
    let body = serde_json::to_vec(&[&a, &b]).unwrap();
    assert_eq!(parse(&h, &body, MAX_BODY).unwrap(), vec![a, b]);
    let bad = r#"[{"specversion":"1.0","id":"1","source":"s","type":"t"},{"specversion":"1.0","id":"2","source":"s"}]"#;
    assert_eq!(
        parse(&h, bad.as_bytes(), MAX_BODY).unwrap_err().to_string(),
        "event 1 of the batch: the required attribute `type` is missing"
    );
    assert!(matches!(
        parse(&h, b"[]", MAX_BODY),
        Err(ParseError::EmptyBatch)
    ));
    assert!(parse(&h, b"{}", MAX_BODY)
        .unwrap_err()
        .to_string()
        .contains("JSON array"));
}
