//! The event: a CloudEvents 1.0 event whose data is JSON, its structured-mode JSON form
//! (both ways), and [`Source`], which stamps events with the instance that emits them.
//!
//! The JSON form has the context attributes at the top level (`specversion`, `id`,
//! `source`, `type`, `time`, `subject`, `datacontenttype`, the extension `causedby`) and
//! the data under `data`:
//!
//! ```json
//! {"specversion":"1.0","id":"0b7e…","source":"portcullis://edge-1",
//!  "type":"dev.portcullis.server.down","time":"2026-01-31T12:00:00.25Z",
//!  "subject":"billing-v2/10.0.0.11:8080","datacontenttype":"application/json",
//!  "data":{"backend":"billing-v2","server":"10.0.0.11:8080","reason":"…","healthy":1,"total":2}}
//! ```

use crate::error::ParseError;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::SystemTime;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The CloudEvents version this crate speaks.
pub const SPECVERSION: &str = "1.0";
/// The content type of every event's data.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// The content type of a structured-mode event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The content type of a batch of structured-mode events (a JSON array).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// One event. See the [module docs](self) for its JSON form.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique per `source`: a receiver's dedup key. A random UUID for the proxy's own events.
    pub id: String,
    /// The instance that emitted it (a URI reference, such as `portcullis://edge-1`).
    pub source: String,
    /// What happened: `dev.portcullis.server.down`, … (see the `types` module).
    pub type_: String,
    /// When it happened. An inbound event without `time` gets the time it was received.
    pub time: SystemTime,
    /// The resource it is about: `backend/server`, a route, a key.
    pub subject: Option<String>,
    /// The JSON data, whose shape the type documents; `Null` when the event has none.
    pub data: Value,
    /// The id of the event that caused this one (an automation action names its trigger's
    /// event), so loops can be seen and stopped.
    pub causedby: Option<String>,
}

/// `time` as RFC 3339 in UTC, with as many fractional digits as it needs. A time that RFC
/// 3339 cannot write in UTC (outside the years 0000 to 9999) is written as the epoch;
/// [`parse_rfc3339`] never yields one.
pub fn rfc3339(time: SystemTime) -> String {
    utc(time)
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// `time` in UTC, or `None` outside the range of the `time` crate (where its
/// `From<SystemTime>` panics).
fn utc(time: SystemTime) -> Option<OffsetDateTime> {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => OffsetDateTime::UNIX_EPOCH.checked_add(d.try_into().ok()?),
        Err(e) => OffsetDateTime::UNIX_EPOCH.checked_sub(e.duration().try_into().ok()?),
    }
}

/// Parses an RFC 3339 time (any offset). A time whose offset moves it out of the years RFC
/// 3339 can write in UTC (`9999-12-31T23:59:59-23:59`) is refused: the event could not be
/// written out again (found by fuzzing, docs/reliability.md).
pub(crate) fn parse_rfc3339(attribute: &str, value: &str) -> Result<SystemTime, ParseError> {
    let refused = |reason: String| ParseError::Time {
        attribute: attribute.into(),
        value: value.into(),
        reason,
    };
    let time = OffsetDateTime::parse(value, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| refused(e.to_string()))?;
    match utc(time) {
        Some(t) if (0..=9999).contains(&t.year()) => Ok(time),
        _ => Err(refused(
            "in UTC it falls outside the years 0000 to 9999".into(),
        )),
    }
}

/// Whether a media type (parameters allowed) says JSON: `application/json`, `text/json` or
/// any `+json` suffix.
pub(crate) fn is_json_media_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

#[derive(Serialize)]
struct Wire<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    type_: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causedby: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data = (!self.data.is_null()).then_some(&self.data);
        Wire {
            specversion: SPECVERSION,
            id: &self.id,
            source: &self.source,
            type_: &self.type_,
            time: rfc3339(self.time),
            subject: self.subject.as_deref(),
            datacontenttype: data.map(|_| DATA_CONTENT_TYPE),
            causedby: self.causedby.as_deref(),
            data,
        }
        .serialize(s)
    }
}

impl Event {
    /// A new event from `source`, with a random id and the current time.
    pub fn new(source: impl Into<String>, type_: impl Into<String>, data: Value) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            source: source.into(),
            type_: type_.into(),
            time: SystemTime::now(),
            subject: None,
            data,
            causedby: None,
        }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Event {
        self.subject = Some(subject.into());
        self
    }

    /// Names the event that caused this one.
    pub fn caused_by(mut self, event_id: impl Into<String>) -> Event {
        self.causedby = Some(event_id.into());
        self
    }

    /// The structured-mode JSON (`application/cloudevents+json`).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing strings and a `Value` to memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The structured-mode JSON as a string.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a structured-mode event of at most `max_bytes`.
    pub fn from_json(body: &[u8], max_bytes: usize) -> Result<Event, ParseError> {
        if body.len() > max_bytes {
            return Err(ParseError::TooLarge {
                size: body.len(),
                max: max_bytes,
            });
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::NotJson {
            what: "the body",
            reason: e.to_string(),
        })?;
        Event::from_json_value(value)
    }

    /// Reads a structured-mode event from parsed JSON. Unknown extension attributes are
    /// ignored.
    pub fn from_json_value(value: Value) -> Result<Event, ParseError> {
        let Value::Object(mut map) = value else {
            return Err(ParseError::NotAnObject {
                found: json_kind(&value),
            });
        };
        let specversion =
            take_string(&mut map, "specversion")?.ok_or(ParseError::Missing("specversion"))?;
        if specversion != SPECVERSION {
            return Err(ParseError::SpecVersion { found: specversion });
        }
        let id = required(&mut map, "id")?;
        let source = required(&mut map, "source")?;
        let type_ = required(&mut map, "type")?;
        let time = match take_string(&mut map, "time")? {
            Some(t) => parse_rfc3339("time", &t)?,
            None => SystemTime::now(),
        };
        let subject = take_string(&mut map, "subject")?;
        let causedby = take_string(&mut map, "causedby")?;
        if let Some(ct) = take_string(&mut map, "datacontenttype")? {
            if !is_json_media_type(&ct) {
                return Err(ParseError::DataContentType { found: ct });
            }
        }
        if map.contains_key("data_base64") {
            return Err(ParseError::DataBase64);
        }
        let data = map.remove("data").unwrap_or(Value::Null);
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
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An optional string attribute: absent or null is `None`, another JSON type an error.
impl Event {
    /// Refuses a control character (U+0000 to U+001F, U+007F to U+009F) in a String
    /// attribute (`id`, `source`, `type`, `subject`, `causedby`), as CloudEvents 1.0 does: a
    /// newline or a NUL there would reach logs, headers and receivers as it is.
    pub fn check_text(&self) -> Result<(), ParseError> {
        let attributes = [
            ("id", Some(&self.id)),
            ("source", Some(&self.source)),
            ("type", Some(&self.type_)),
            ("subject", self.subject.as_ref()),
            ("causedby", self.causedby.as_ref()),
        ];
        for (name, value) in attributes {
            let Some(c) = value.and_then(|v| v.chars().find(|c| c.is_control())) else {
                continue;
            };
            return Err(ParseError::Attribute {
                attribute: name.into(),
                reason: format!(
                    "holds the control character U+{:04X}, which CloudEvents forbids",
                    u32::from(c)
                ),
            });
        }
        Ok(())
    }
}

fn take_string(map: &mut Map<String, Value>, name: &str) -> Result<Option<String>, ParseError> {
    match map.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ParseError::Attribute {
            attribute: name.into(),
            reason: format!("must be a string, not {}", json_kind(&other)),
        }),
    }
}

fn required(map: &mut Map<String, Value>, name: &'static str) -> Result<String, ParseError> {
    let value = take_string(map, name)?.ok_or(ParseError::Missing(name))?;
    if value.is_empty() {
        return Err(ParseError::Attribute {
            attribute: name.into(),
            reason: "must not be empty".into(),
        });
    }
    Ok(value)
}

/// The instance that emits events: every event built through it carries it as `source`.
/// Cheap to clone. The typed constructors for the proxy's events are in the `types` module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source(Arc<str>);

impl Source {
    /// `source` is a URI reference naming the instance, such as `portcullis://edge-1`.
    pub fn new(source: impl Into<String>) -> Source {
        Source(Arc::from(source.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An event of any type, with `data` serialized to JSON.
    pub fn event(
        &self,
        type_: impl Into<String>,
        subject: Option<String>,
        data: impl Serialize,
    ) -> Event {
        let mut event = Event::new(
            self.as_str(),
            type_,
            serde_json::to_value(data).unwrap_or(Value::Null),
        );
        event.subject = subject;
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc_and_parse_back_with_any_offset() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_250);
        assert_eq!(rfc3339(t), "2027-01-15T08:00:00.25Z");
        assert_eq!(parse_rfc3339("time", "2027-01-15T08:00:00.25Z").unwrap(), t);
        assert_eq!(
            parse_rfc3339("time", "2027-01-15T10:00:00.25+02:00").unwrap(),
            t
        );
    }

    #[test]
    fn json_media_types() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "text/json",
            "application/vnd.x+json",
        ] {
            assert!(is_json_media_type(ct), "{ct}");
        }
        for ct in ["text/plain", "application/xml", "application/jsonx", ""] {
            assert!(!is_json_media_type(ct), "{ct}");
        }
    }

    #[test]
    fn an_event_without_data_has_no_datacontenttype() {
        let e = Event::new("s", "t", Value::Null);
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert!(v.get("data").is_none() && v.get("datacontenttype").is_none());
        assert_eq!(Event::from_json(&e.to_json(), 1 << 20).unwrap(), e);
    }
}
