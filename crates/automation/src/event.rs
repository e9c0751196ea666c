//! The event as triggers see it: [`EventView`], a borrowed view of a CloudEvent that the caller
//! builds from its own event type, and [`Field`], a reference to one of the event's attributes
//! or to a value inside its `data` (`subject`, `data.server`, `data.checks[0].status`).
//!
//! Field paths inside `data` are written dotted (`server`, `target.host`, `items.0`) or in
//! JSONPath's simple form (`$.server`, `$.items[0]`, `$['odd.key']`): names and array indexes
//! only, no wildcards or filters.

use crate::time::Timestamp;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// One event, borrowed from whatever type the caller keeps events in. Only what triggers read.
#[derive(Clone, Copy, Debug)]
pub struct EventView<'a> {
    /// The CloudEvent `id`, unique per source: the engine drops an id it has just seen.
    pub id: &'a str,
    /// The CloudEvent `type`, like `dev.portcullis.server.down`.
    pub type_: &'a str,
    /// The CloudEvent `source` (the instance that emitted it); empty when unknown.
    pub source: &'a str,
    /// The resource the event is about (`billing/billing-v2/s1`, a route, a key), if any.
    pub subject: Option<&'a str>,
    /// The event's JSON `data` (`Value::Null` when it has none).
    pub data: &'a Value,
    /// The `causedby` extension: the id of the event whose automation caused this one. Set on
    /// every event that an action emitted or whose effect (a state change) produced.
    pub causedby: Option<&'a str>,
    /// How many automation firings lie in this event's causal chain (the firing's
    /// [`hop`](crate::Firing::hop) for events its actions caused; 0 for events nobody automated).
    /// An event with `causedby` counts as at least 1.
    pub hops: u32,
    /// When the event happened (the CloudEvent `time`).
    pub time: Timestamp,
}

impl<'a> EventView<'a> {
    /// An event with no subject, data or cause: fill in the rest with struct update syntax.
    pub fn new(id: &'a str, type_: &'a str, time: Timestamp) -> EventView<'a> {
        static NULL: Value = Value::Null;
        EventView {
            id,
            type_,
            source: "",
            subject: None,
            data: &NULL,
            causedby: None,
            hops: 0,
            time,
        }
    }

    /// The automation hops behind this event: `hops`, and at least 1 when `causedby` is set.
    pub fn automation_hops(&self) -> u32 {
        if self.causedby.is_some() {
            self.hops.max(1)
        } else {
            self.hops
        }
    }
}

/// One step of a path inside `data`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    /// An object key; if it is all digits it also indexes an array (`items.0`).
    Name(String),
    /// `[n]`: an array index.
    Index(usize),
}

/// A parsed path inside `data`: empty for `data` itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DataPath(pub Vec<Seg>);

impl DataPath {
    /// Parses a dotted path (`a.b`, `a.0`, `a[0]`) or a simple JSONPath (`$.a.b`, `$['a.b']`).
    pub fn parse(text: &str) -> Result<DataPath, String> {
        let t = text.trim();
        if t != text || t.is_empty() {
            return Err(format!(
                "`{text}` is not a field path: write names separated by dots, like `server` or `target.host`"
            ));
        }
        let (mut rest, mut need_sep) = match t.strip_prefix('$') {
            Some(r) => (r, true),
            None => (t, false),
        };
        let mut segs = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']').ok_or_else(|| {
                    format!("unclosed `[` in `{text}`: write `[0]` or `['name']`")
                })?;
                let inner = &r[..end];
                let quoted = inner.len() >= 2
                    && ((inner.starts_with('\'') && inner.ends_with('\''))
                        || (inner.starts_with('"') && inner.ends_with('"')));
                if quoted {
                    segs.push(Seg::Name(inner[1..inner.len() - 1].to_string()));
                } else {
                    let i = inner.parse::<usize>().map_err(|_| {
                        format!("`[{inner}]` in `{text}` is not an array index: write `[0]`, or `['{inner}']` for a key")
                    })?;
                    segs.push(Seg::Index(i));
                }
                rest = &r[end + 1..];
                need_sep = true;
                continue;
            }
            if need_sep {
                rest = rest
                    .strip_prefix('.')
                    .ok_or_else(|| format!("expected `.` or `[` in `{text}` before `{rest}`"))?;
            }
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let name = &rest[..end];
            if name.is_empty() {
                return Err(format!(
                    "empty name in field path `{text}`: write names separated by single dots"
                ));
            }
            if name.contains([']', '{', '}', ' ']) {
                return Err(format!(
                    "`{name}` in `{text}` is not a field name: use `['{name}']` for a key with special characters"
                ));
            }
            segs.push(Seg::Name(name.to_string()));
            rest = &rest[end..];
            need_sep = true;
        }
        Ok(DataPath(segs))
    }

    /// The value at this path inside `v`, if there is one.
    pub fn resolve<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        let mut cur = v;
        for s in &self.0 {
            cur = match (s, cur) {
                (Seg::Name(n), Value::Object(m)) => m.get(n)?,
                (Seg::Name(n), Value::Array(a)) => a.get(n.parse::<usize>().ok()?)?,
                (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(cur)
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Name(n) if n.contains(['.', '[', ']']) => write!(f, "['{n}']")?,
                Seg::Name(n) if i == 0 => f.write_str(n)?,
                Seg::Name(n) => write!(f, ".{n}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// An event attribute, or a value inside `data`: what `for_each` groups by and what templates
/// insert.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    Id,
    Type,
    Source,
    Subject,
    /// `data` (empty path) or a value inside it (`data.server`).
    Data(DataPath),
}

impl Field {
    /// Parses `id`, `type`, `source`, `subject`, `data`, `data.<path>` or `data[<n>]`.
    pub fn parse(text: &str) -> Result<Field, String> {
        match text {
            "id" => return Ok(Field::Id),
            "type" => return Ok(Field::Type),
            "source" => return Ok(Field::Source),
            "subject" => return Ok(Field::Subject),
            "data" => return Ok(Field::Data(DataPath::default())),
            _ => {}
        }
        if let Some(rest) = text.strip_prefix("data") {
            if let Some(p) = rest.strip_prefix('.') {
                return DataPath::parse(p).map(Field::Data);
            }
            if rest.starts_with('[') {
                return DataPath::parse(&format!("${rest}")).map(Field::Data);
            }
        }
        Err(format!(
            "unknown event field `{text}`: use `subject`, `type`, `source`, `id` or `data.<field>` (like `data.server`)"
        ))
    }

    /// This field's value in `ev`, as text (see [`value_text`]); `None` if the event lacks it.
    pub fn text<'v>(&self, ev: &EventView<'v>) -> Option<Cow<'v, str>> {
        match self {
            Field::Id => Some(Cow::Borrowed(ev.id)),
            Field::Type => Some(Cow::Borrowed(ev.type_)),
            Field::Source => Some(Cow::Borrowed(ev.source)).filter(|s| !s.is_empty()),
            Field::Subject => ev.subject.map(Cow::Borrowed),
            Field::Data(p) => p.resolve(ev.data).and_then(value_text),
        }
    }

    /// This field's JSON value in `ev` (attributes as strings).
    pub fn value(&self, ev: &EventView<'_>) -> Option<Value> {
        match self {
            Field::Data(p) => p.resolve(ev.data).filter(|v| !v.is_null()).cloned(),
            other => other.text(ev).map(|t| Value::String(t.into_owned())),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Id => f.write_str("id"),
            Field::Type => f.write_str("type"),
            Field::Source => f.write_str("source"),
            Field::Subject => f.write_str("subject"),
            Field::Data(p) if p.0.is_empty() => f.write_str("data"),
            Field::Data(p) => match p.0.first() {
                Some(Seg::Index(_)) => write!(f, "data{p}"),
                _ => write!(f, "data.{p}"),
            },
        }
    }
}

/// A JSON value as text for matching and templates: strings as they are, numbers and booleans
/// as JSON writes them (`503`, `true`), arrays and objects as compact JSON, and `null` as absent.
pub fn value_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        other => Some(Cow::Owned(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_in_both_spellings_reach_the_same_value() {
        let data = json!({"target": {"host": "a", "ports": [80, 443]}, "odd.key": 1});
        for p in [
            "target.host",
            "$.target.host",
            "$['target']['host']",
            "target['host']",
        ] {
            assert_eq!(
                DataPath::parse(p).unwrap().resolve(&data),
                Some(&json!("a")),
                "{p}"
            );
        }
        for p in ["target.ports.1", "target.ports[1]", "$.target.ports[1]"] {
            assert_eq!(
                DataPath::parse(p).unwrap().resolve(&data),
                Some(&json!(443)),
                "{p}"
            );
        }
        assert_eq!(
            DataPath::parse("$['odd.key']").unwrap().resolve(&data),
            Some(&json!(1))
        );
        assert_eq!(DataPath::parse("missing.x").unwrap().resolve(&data), None);
    }

    #[test]
    fn malformed_paths_say_how_to_write_them() {
        for (p, says) in [
            ("a..b", "single dots"),
            ("a[x]", "['x']"),
            ("a[0", "unclosed"),
            ("", "names separated by dots"),
            ("$x", "expected `.`"),
        ] {
            let e = DataPath::parse(p).unwrap_err();
            assert!(e.contains(says), "{p}: {e}");
        }
        assert!(Field::parse("server").unwrap_err().contains("data.<field>"));
        assert_eq!(Field::parse("data.a[2]").unwrap().to_string(), "data.a[2]");
        assert_eq!(Field::parse("data[2]").unwrap().to_string(), "data[2]");
    }
}
