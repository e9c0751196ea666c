//! Inbound events: what `POST /api/v1/events` accepts, read from the request's headers and
//! body into events, or refused with a [`ParseError`] that names the problem (and its
//! [status](ParseError::status)). Authentication, authorization (who may publish which
//! types) and the check of known types are the caller's.
//!
//! What is accepted, by the request's shape:
//! * `Content-Type: application/cloudevents+json`: one structured-mode event;
//! * `Content-Type: application/cloudevents-batch+json`: a JSON array of them;
//! * a `ce-specversion` header: one binary-mode event, data in a JSON body;
//! * `Content-Type: application/json` without `ce-*` headers: a Prometheus Alertmanager
//!   webhook payload (version 4), one event per alert.
//!
//! In every mode, a control character (U+0000 to U+001F, U+007F to U+009F) in a String
//! attribute (`id`, `source`, `type`, `subject`, `causedby`) refuses the request (400), as
//! CloudEvents 1.0 forbids them.

use crate::error::ParseError;
use crate::event::{is_json_media_type, Event, BATCH_CONTENT_TYPE};
use crate::http::{self, media_type};
use ::http::HeaderMap;
use serde_json::Value;

/// The default largest body: 256 KiB (an Alertmanager group of many alerts fits).
pub const MAX_BODY: usize = 256 * 1024;

/// Reads the events in a request. See the [module docs](self).
pub fn parse(headers: &HeaderMap, body: &[u8], max_bytes: usize) -> Result<Vec<Event>, ParseError> {
    if body.len() > max_bytes {
        return Err(ParseError::TooLarge {
            size: body.len(),
            max: max_bytes,
        });
    }
    let media = media_type(headers);
    if media == BATCH_CONTENT_TYPE {
        return parse_batch(body);
    }
    let checked = |e: Event| e.check_text().map(|()| vec![e]);
    if http::is_structured(headers) {
        return http::from_structured(headers, body, max_bytes).and_then(checked);
    }
    if http::is_binary(headers) {
        return http::from_binary(headers, body, max_bytes).and_then(checked);
    }
    if is_json_media_type(&media) {
        let events = crate::alertmanager::parse(body)?;
        for e in &events {
            e.check_text()?;
        }
        return Ok(events);
    }
    Err(ParseError::ContentType {
        found: if media.is_empty() {
            "(none)".into()
        } else {
            media
        },
    })
}

/// A batch: a JSON array of structured-mode events, each checked; an error names the index.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Event>, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::NotJson {
        what: "the batch",
        reason: e.to_string(),
    })?;
    let Value::Array(items) = value else {
        return Err(ParseError::NotJson {
            what: "the batch",
            reason: "a batch is a JSON array of events".into(),
        });
    };
    if items.is_empty() {
        return Err(ParseError::EmptyBatch);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let event = Event::from_json_value(item).and_then(|e| e.check_text().map(|()| e));
            event.map_err(|e| ParseError::InBatch {
                index,
                error: Box::new(e),
            })
        })
        .collect()
}
