//! The CloudEvents HTTP protocol binding (v1.0.2), both ways.
//!
//! * **Structured mode**: `Content-Type: application/cloudevents+json`, the body is the
//!   whole event ([`Event::to_json`]).
//! * **Binary mode**: each attribute in a `ce-<name>` header (`ce-specversion`, `ce-id`,
//!   `ce-source`, `ce-type`, `ce-time`, `ce-subject`, `ce-causedby`), `Content-Type:
//!   application/json`, and the body is `data`. Header values are percent-encoded where the
//!   binding says so (space, `"`, `%`, and anything outside printable ASCII, as UTF-8).

use crate::error::ParseError;
use crate::event::{
    is_json_media_type, parse_rfc3339, rfc3339, Event, DATA_CONTENT_TYPE, SPECVERSION,
    STRUCTURED_CONTENT_TYPE,
};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::Value;
use std::time::SystemTime;

/// How an event travels over HTTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The whole event as JSON in the body.
    #[default]
    Structured,
    /// Attributes in `ce-*` headers, `data` as the body.
    Binary,
}

/// The headers and body of `event` in `mode`.
pub fn encode(event: &Event, mode: Mode) -> (HeaderMap, Vec<u8>) {
    match mode {
        Mode::Structured => to_structured(event),
        Mode::Binary => to_binary(event),
    }
}

/// Structured mode: the content type and the JSON event.
pub fn to_structured(event: &Event) -> (HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
    );
    (headers, event.to_json())
}

/// Binary mode: `ce-*` headers and `data` as the body (empty when the event has no data).
pub fn to_binary(event: &Event) -> (HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(value)) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    put("ce-specversion", SPECVERSION);
    put("ce-id", &event.id);
    put("ce-source", &event.source);
    put("ce-type", &event.type_);
    put("ce-time", &rfc3339(event.time));
    if let Some(s) = &event.subject {
        put("ce-subject", s);
    }
    if let Some(c) = &event.causedby {
        put("ce-causedby", c);
    }
    if event.data.is_null() {
        return (headers, Vec::new());
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(DATA_CONTENT_TYPE));
    let body = serde_json::to_vec(&event.data).unwrap_or_default();
    (headers, body)
}

/// Whether the request carries a binary-mode event (a `ce-specversion` header).
pub fn is_binary(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
}

/// Whether the content type says structured mode (`application/cloudevents+json`, or
/// `application/cloudevents` with any `+format`).
pub fn is_structured(headers: &HeaderMap) -> bool {
    media_type(headers).starts_with("application/cloudevents+")
        || media_type(headers) == "application/cloudevents"
}

/// The lowercased media type of `Content-Type`, without parameters (empty if none).
pub(crate) fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Reads a structured-mode event from a request: the content type must be
/// `application/cloudevents+json`.
pub fn from_structured(
    headers: &HeaderMap,
    body: &[u8],
    max_bytes: usize,
) -> Result<Event, ParseError> {
    let media = media_type(headers);
    if media != STRUCTURED_CONTENT_TYPE {
        return Err(ParseError::ContentType { found: media });
    }
    Event::from_json(body, max_bytes)
}

/// Reads a binary-mode event: attributes from `ce-*` headers, `data` from the body, which
/// must be JSON (or empty, for no data).
pub fn from_binary(
    headers: &HeaderMap,
    body: &[u8],
    max_bytes: usize,
) -> Result<Event, ParseError> {
    if body.len() > max_bytes {
        return Err(ParseError::TooLarge {
            size: body.len(),
            max: max_bytes,
        });
    }
    let specversion =
        header(headers, "ce-specversion")?.ok_or(ParseError::Missing("specversion"))?;
    if specversion != SPECVERSION {
        return Err(ParseError::SpecVersion { found: specversion });
    }
    let required = |name: &'static str, attr: &'static str| -> Result<String, ParseError> {
        let v = header(headers, name)?.ok_or(ParseError::Missing(attr))?;
        if v.is_empty() {
            return Err(ParseError::Attribute {
                attribute: attr.into(),
                reason: "must not be empty".into(),
            });
        }
        Ok(v)
    };
    let id = required("ce-id", "id")?;
    let source = required("ce-source", "source")?;
    let type_ = required("ce-type", "type")?;
    let time = match header(headers, "ce-time")? {
        Some(t) => parse_rfc3339("time", &t)?,
        None => SystemTime::now(),
    };
    let subject = header(headers, "ce-subject")?;
    let causedby = header(headers, "ce-causedby")?;
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        let media = media_type(headers);
        if !media.is_empty() && !is_json_media_type(&media) {
            return Err(ParseError::DataContentType { found: media });
        }
        serde_json::from_slice(body).map_err(|e| ParseError::NotJson {
            what: "the body (the event's data)",
            reason: e.to_string(),
        })?
    };
    Ok(Event {
        id,
        source,
        type_,
        time,
        subject,
        data,
        causedby,
    })
}

/// A `ce-*` header's value, percent-decoded.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ParseError> {
    let attribute = || name.trim_start_matches("ce-").to_owned();
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ParseError::Attribute {
        attribute: attribute(),
        reason: "(header `".to_owned() + name + "`) is not ASCII: percent-encode it as UTF-8",
    })?;
    percent_decode(text)
        .map(Some)
        .map_err(|reason| ParseError::Attribute {
            attribute: attribute(),
            reason: format!("(header `{name}`) {reason}"),
        })
}

/// Percent-encodes what the HTTP binding requires: space, `"`, `%`, and every byte outside
/// printable ASCII.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes [`percent_encode`] (and any other percent-encoding of UTF-8).
pub fn percent_decode(value: &str) -> Result<String, String> {
    if !value.contains('%') {
        return Ok(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("has a bad percent-escape at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once percent-decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_round_trips() {
        for s in ["plain", "a b", "50% \"off\"", "Zürich/ü€", "tab\there", ""] {
            let enc = percent_encode(s);
            assert!(enc.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{enc}");
            assert_eq!(percent_decode(&enc).unwrap(), s);
        }
        assert_eq!(percent_encode("a b"), "a%20b");
        assert!(percent_decode("bad%zz").is_err());
        assert!(percent_decode("cut%4").is_err());
        assert!(percent_decode("%FF").is_err());
    }
}
