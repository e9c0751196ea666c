//! Event targets: what `POST /api/v1/events` accepts (CloudEvents in structured, batch and
//! binary mode, and Alertmanager webhooks). Every event read must write out as
//! structured-mode JSON that reads back as the same event.
//!
//! The `cloudevents` input is a request as the endpoint sees it: header lines
//! (`name: value`), an empty line, then the body.

use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis_events::event::Event;
use portcullis_events::{alertmanager, inbound};

/// Each event survives its own JSON form.
fn round_trip(events: &[Event]) {
    for e in events {
        assert!(!e.id.is_empty() && !e.source.is_empty() && !e.type_.is_empty());
        let json = e.to_json();
        let back = Event::from_json(&json, usize::MAX).unwrap_or_else(|err| {
            panic!(
                "an event read from a request does not read back from its own JSON: {err}\n{}",
                String::from_utf8_lossy(&json)
            )
        });
        assert_eq!(&back, e, "{}", String::from_utf8_lossy(&json));
    }
}

/// A request to the events endpoint: header lines, an empty line, the body.
pub fn cloudevents(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (&data[..0], data),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    if let Ok(events) = inbound::parse(&headers, body, inbound::MAX_BODY) {
        assert!(!events.is_empty(), "a request that parsed yielded no event");
        round_trip(&events);
    }
}

/// An Alertmanager webhook body.
pub fn alertmanager(data: &[u8]) {
    if let Ok(events) = alertmanager::parse(data) {
        round_trip(&events);
    }
}
