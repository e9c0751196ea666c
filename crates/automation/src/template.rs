//! Templates in action fields: text with `{field}` placeholders filled from the event that
//! caused the firing.
//!
//! | placeholder | value |
//! |---|---|
//! | `{group}` | the firing's group: the value of the trigger's `for_each` field (needs `for_each`) |
//! | `{trigger}` | the trigger's name |
//! | `{id}`, `{type}`, `{source}`, `{subject}` | the cause event's CloudEvent attributes |
//! | `{data}` | the event's whole `data`, as compact JSON |
//! | `{data.server}`, `{data.target.host}`, `{data.items[0]}` | a value inside `data` (see [`DataPath`](crate::event::DataPath)) |
//!
//! `{{` and `}}` stand for literal braces. Values are inserted as text: strings as they are,
//! numbers and booleans as JSON writes them. In JSON-valued fields (`emit.data`,
//! `start_workflow.input`), every string is a template, and a string that is exactly one
//! placeholder (`"{data}"`, `"{data.count}"`) is replaced by the JSON value itself, keeping its
//! type. A placeholder whose value the event lacks (or that is `null`) fails the whole firing's
//! actions with a message naming it: actions never run with a blank where a name should be.

use crate::event::{EventView, Field};
use serde_json::Value;
use std::fmt::Write as _;

/// What a template may refer to, beyond the event's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Var {
    Group,
    Trigger,
    Event(Field),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(Var),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// What a template is rendered against.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'s, 'e> {
    pub event: &'s EventView<'e>,
    pub group: &'s str,
    pub trigger: &'s str,
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let c = &rest[i..];
            if let Some(r) = c.strip_prefix("{{") {
                lit.push('{');
                rest = r;
            } else if let Some(r) = c.strip_prefix("}}") {
                lit.push('}');
                rest = r;
            } else if c.starts_with('}') {
                return Err(format!(
                    "unmatched `}}` in `{text}`: write `}}}}` for a literal brace"
                ));
            } else {
                let end = c.find('}').ok_or_else(|| {
                    format!("unclosed `{{` in `{text}`: write `{{subject}}`, or `{{{{` for a literal brace")
                })?;
                let name = &c[1..end];
                let var = match name {
                    "group" => Var::Group,
                    "trigger" => Var::Trigger,
                    _ => Var::Event(Field::parse(name).map_err(|e| {
                        format!("`{{{name}}}` in `{text}`: {e}, or `group` or `trigger`")
                    })?),
                };
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(var));
                rest = &c[end + 1..];
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// The placeholders this template uses.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Lit(_) => None,
        })
    }

    /// Whether the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.vars().next().is_none()
    }

    pub fn render(&self, scope: &Scope<'_, '_>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(Var::Group) => out.push_str(scope.group),
                Part::Var(Var::Trigger) => out.push_str(scope.trigger),
                Part::Var(Var::Event(f)) => match f.text(scope.event) {
                    Some(t) => out.push_str(&t),
                    None => return Err(missing(f, scope)),
                },
            }
        }
        Ok(out)
    }

    /// Renders a JSON string: a template that is one placeholder gives that value as JSON.
    fn render_json(&self, scope: &Scope<'_, '_>) -> Result<Value, String> {
        if let [Part::Var(Var::Event(f))] = self.parts.as_slice() {
            return f.value(scope.event).ok_or_else(|| missing(f, scope));
        }
        self.render(scope).map(Value::String)
    }
}

fn missing(f: &Field, scope: &Scope<'_, '_>) -> String {
    let mut m = format!(
        "the placeholder `{{{f}}}` has no value: event `{}`",
        scope.event.id
    );
    let _ = write!(m, " (type `{}`) has no `{f}`", scope.event.type_);
    m
}

/// Renders the template `text` (parsed here; it was validated with the config).
pub fn render_str(text: &str, scope: &Scope<'_, '_>) -> Result<String, String> {
    Template::parse(text)?.render(scope)
}

/// Renders every string inside a JSON value (see the module docs); keys are not templated.
pub fn render_value(v: &Value, scope: &Scope<'_, '_>) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Template::parse(s)?.render_json(scope)?,
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_value(x, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Every string inside a JSON value with its path below `at` (`at.key[0]`), for validation.
pub fn json_strings<'v>(v: &'v Value, at: &str, out: &mut Vec<(String, &'v str)>) {
    match v {
        Value::String(s) => out.push((at.to_string(), s)),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                json_strings(x, &format!("{at}[{i}]"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                json_strings(x, &format!("{at}.{k}"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use serde_json::json;

    #[test]
    fn renders_attributes_data_and_group() {
        let data = json!({"server": "s1", "code": 503, "tags": ["a"]});
        let ev = EventView {
            subject: Some("billing/v2/s1"),
            data: &data,
            ..EventView::new("e1", "dev.portcullis.server.down", Timestamp(0))
        };
        let scope = Scope {
            event: &ev,
            group: "billing/v2",
            trigger: "t",
        };
        let r = |t: &str| render_str(t, &scope);
        assert_eq!(r("{group}/{data.server}").unwrap(), "billing/v2/s1");
        assert_eq!(
            r("{trigger}:{type}:{subject}").unwrap(),
            "t:dev.portcullis.server.down:billing/v2/s1"
        );
        assert_eq!(
            r("code={data.code} {{literal}}").unwrap(),
            "code=503 {literal}"
        );
        assert_eq!(r("{data.tags}").unwrap(), r#"["a"]"#);
        assert!(r("{data.nope}")
            .unwrap_err()
            .contains("`{data.nope}` has no value"));
        let v = render_value(
            &json!({"n": "{data.code}", "s": "x-{data.code}", "all": "{data"}),
            &scope,
        );
        assert!(v.is_err());
        let v = render_value(
            &json!({"n": "{data.code}", "s": "x-{data.code}", "k": [1, "{id}"]}),
            &scope,
        );
        assert_eq!(v.unwrap(), json!({"n": 503, "s": "x-503", "k": [1, "e1"]}));
    }

    #[test]
    fn malformed_templates_say_how_to_fix_them() {
        for (t, says) in [
            ("{subject", "unclosed `{`"),
            ("a}b", "unmatched `}`"),
            ("{server}", "data.<field>"),
            ("{data..x}", "single dots"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert!(e.contains(says), "{t}: {e}");
        }
        assert!(Template::parse("plain {{x}}").unwrap().is_literal());
    }
}
