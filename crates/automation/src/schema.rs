//! The shape of `triggers:` checked on the raw value before deserializing, so every structural
//! mistake is reported with its path and the fix: an unknown key (with the nearest known one),
//! an unknown action (with the list), a missing field, or a value of the wrong type. serde's own
//! errors stop at the first problem and name the Rust type; these name the config path, like
//! `triggers[2].actions[0].set_server_state.state`, which the config crate turns into
//! file:line:col.
//!
//! The table below mirrors the types in [`crate::config`]; a test walks a fully filled config
//! through both to keep them in step.

use crate::config::{TriggerCfg, ACTION_NAMES};
use crate::guard::MaxUnavailable;
use crate::suggest::nearest;
use crate::time::parse_duration;
use crate::Problem;
use serde_json::Value;

#[derive(Clone, Copy)]
pub(crate) enum Ty {
    Str,
    /// A pattern: text, or a number or boolean taken as its text.
    Pattern,
    Bool,
    Count,
    Dur,
    Json,
    MaxUnavailable,
    Enum(&'static [&'static str]),
    StrList,
    PatternMap,
    Obj(&'static Obj),
    Actions,
}

pub(crate) struct Obj {
    pub what: &'static str,
    pub fields: &'static [F],
}

pub(crate) struct F {
    pub key: &'static str,
    pub ty: Ty,
    pub required: bool,
    /// How to write it, for a missing required field.
    pub example: &'static str,
}

const fn req(key: &'static str, ty: Ty, example: &'static str) -> F {
    F {
        key,
        ty,
        required: true,
        example,
    }
}

const fn opt(key: &'static str, ty: Ty) -> F {
    F {
        key,
        ty,
        required: false,
        example: "",
    }
}

pub(crate) static MATCH: Obj = Obj {
    what: "a match",
    fields: &[
        req("type", Ty::Pattern, "type: dev.portcullis.server.down"),
        opt("subject", Ty::Pattern),
        opt("data", Ty::PatternMap),
    ],
};

static AUTOMATION_EVENTS: Obj = Obj {
    what: "automation_events",
    fields: &[opt("allow", Ty::Bool), opt("max_hops", Ty::Count)],
};

pub(crate) static TRIGGER: Obj = Obj {
    what: "a trigger",
    fields: &[
        req("name", Ty::Str, "name: failover-billing"),
        req(
            "match",
            Ty::Obj(&MATCH),
            "match: { type: dev.portcullis.server.down }",
        ),
        opt("threshold", Ty::Count),
        opt("within", Ty::Dur),
        opt("for_each", Ty::Str),
        opt("posture", Ty::Enum(&["reactive", "proactive"])),
        opt("expect", Ty::Obj(&MATCH)),
        opt("cooldown", Ty::Dur),
        opt("inhibit", Ty::StrList),
        opt("automation_events", Ty::Obj(&AUTOMATION_EVENTS)),
        opt("enforce", Ty::Bool),
        opt("max_actions_per_minute", Ty::Count),
        opt("max_unavailable", Ty::MaxUnavailable),
        req(
            "actions",
            Ty::Actions,
            "actions: [{ switch_route: { route: billing/api, backend: billing-standby } }]",
        ),
    ],
};

const STATES: &[&str] = &["ready", "drain", "maint"];

pub(crate) static ACTIONS: &[(&str, Obj)] = &[
    (
        "set_server_state",
        Obj {
            what: "set_server_state",
            fields: &[
                req("backend", Ty::Str, "backend: billing/billing-v2"),
                req("server", Ty::Str, "server: \"{data.server}\""),
                req("state", Ty::Enum(STATES), "state: drain"),
            ],
        },
    ),
    (
        "set_server_weight",
        Obj {
            what: "set_server_weight",
            fields: &[
                req("backend", Ty::Str, "backend: billing/billing-v2"),
                req("server", Ty::Str, "server: \"{data.server}\""),
                req("weight", Ty::Count, "weight: 1"),
            ],
        },
    ),
    (
        "switch_route",
        Obj {
            what: "switch_route",
            fields: &[
                req("route", Ty::Str, "route: billing/billing-api"),
                req("backend", Ty::Str, "backend: billing-standby"),
            ],
        },
    ),
    (
        "restore_route",
        Obj {
            what: "restore_route",
            fields: &[req("route", Ty::Str, "route: billing/billing-api")],
        },
    ),
    (
        "set_table",
        Obj {
            what: "set_table",
            fields: &[
                req("table", Ty::Str, "table: per_ip"),
                req("key", Ty::Str, "key: \"{data.key}\""),
                opt("gpc0", Ty::Count),
                opt("tag", Ty::Str),
            ],
        },
    ),
    (
        "clear_table",
        Obj {
            what: "clear_table",
            fields: &[
                req("table", Ty::Str, "table: per_ip"),
                req("key", Ty::Str, "key: \"{data.key}\""),
            ],
        },
    ),
    (
        "block",
        Obj {
            what: "block",
            fields: &[
                req("table", Ty::Str, "table: per_ip"),
                req("key", Ty::Str, "key: \"{data.key}\""),
                req("for", Ty::Dur, "for: 10m"),
            ],
        },
    ),
    (
        "revoke_sessions",
        Obj {
            what: "revoke_sessions",
            fields: &[req("principal", Ty::Str, "principal: \"{data.principal}\"")],
        },
    ),
    (
        "reload",
        Obj {
            what: "reload",
            fields: &[],
        },
    ),
    (
        "emit",
        Obj {
            what: "emit",
            fields: &[
                req("type", Ty::Str, "type: com.example.failover"),
                opt("subject", Ty::Str),
                opt("data", Ty::Json),
            ],
        },
    ),
    (
        "webhook",
        Obj {
            what: "webhook",
            fields: &[req("url", Ty::Str, "url: https://hooks.example/portcullis")],
        },
    ),
    (
        "start_workflow",
        Obj {
            what: "start_workflow",
            fields: &[
                req("name", Ty::Str, "name: recover-billing"),
                opt("input", Ty::Json),
            ],
        },
    ),
];

/// `value` with the other spellings of a key written the one way: `switch_route: { to: … }`
/// (as the design page writes it) is `backend`.
fn with_aliases(value: &Value) -> Value {
    let mut v = value.clone();
    for t in v.as_array_mut().into_iter().flatten() {
        let actions = t.get_mut("actions").and_then(Value::as_array_mut);
        for a in actions.into_iter().flatten() {
            if let Some(Value::Object(m)) = a.get_mut("switch_route") {
                if !m.contains_key("backend") {
                    if let Some(to) = m.remove("to") {
                        m.insert("backend".into(), to);
                    }
                }
            }
        }
    }
    v
}

/// Parses the value of `triggers:` (a list; `null` means none): checks its shape, deserializes
/// it, and validates it ([`crate::validate`]). Every problem names its path, starting with
/// `triggers`.
pub fn parse_triggers(value: &Value) -> Result<Vec<TriggerCfg>, Vec<Problem>> {
    let value = &with_aliases(value);
    let mut problems = Vec::new();
    let list = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        other => {
            return Err(vec![(
                "triggers".to_string(),
                format!(
                    "expected a list of triggers, got {}: write `triggers:` followed by `- name: ...` items",
                    describe(other)
                ),
            )])
        }
    };
    for (i, t) in list.iter().enumerate() {
        walk(
            t,
            Ty::Obj(&TRIGGER),
            &format!("triggers[{i}]"),
            &mut problems,
        );
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let cfgs: Vec<TriggerCfg> = serde_json::from_value(value.clone())
        .map_err(|e| vec![("triggers".to_string(), e.to_string())])?;
    let problems = crate::validate::validate(&cfgs);
    if problems.is_empty() {
        Ok(cfgs)
    } else {
        Err(problems)
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn walk(v: &Value, ty: Ty, at: &str, out: &mut Vec<Problem>) {
    let mut err = |m: String| out.push((at.to_string(), m));
    match (ty, v) {
        (_, Value::Null) => err("empty value: give a value or remove the key".to_string()),
        (Ty::Str, Value::String(_)) | (Ty::Bool, Value::Bool(_)) | (Ty::Json, _) => {}
        (Ty::Pattern, Value::String(_) | Value::Number(_) | Value::Bool(_)) => {}
        (Ty::Str, Value::Number(_) | Value::Bool(_)) => err(format!(
            "expected text, got {}: put it in quotes",
            describe(v)
        )),
        (Ty::Str | Ty::Pattern, _) => err(format!("expected text, got {}", describe(v))),
        (Ty::Bool, _) => err(format!("expected `true` or `false`, got {}", describe(v))),
        (Ty::Count, Value::Number(n)) if n.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)) => {}
        (Ty::Count, _) => err(format!(
            "expected a whole number from 0 to {}, got {}",
            u32::MAX,
            match v {
                Value::Number(n) => n.to_string(),
                other => describe(other).to_string(),
            }
        )),
        (Ty::Dur, Value::String(s)) => {
            if let Err(e) = parse_duration(s) {
                err(e)
            }
        }
        (Ty::Dur, Value::Number(n)) => err(format!(
            "duration `{n}` has no unit: write `{n}s` for seconds or `{n}ms` for milliseconds"
        )),
        (Ty::Dur, _) => err(format!(
            "expected a duration like `30s` or `2m`, got {}",
            describe(v)
        )),
        (Ty::MaxUnavailable, Value::String(s)) => {
            if let Err(e) = MaxUnavailable::parse(s) {
                err(e)
            }
        }
        (Ty::MaxUnavailable, Value::Number(n))
            if n.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)) => {}
        (Ty::MaxUnavailable, _) => {
            err("expected a percentage like `50%` or a number of servers like `2`".to_string())
        }
        (Ty::Enum(allowed), Value::String(s)) => {
            if !allowed.contains(&s.as_str()) {
                err(format!("unknown value `{s}`: use {}", one_of(allowed)))
            }
        }
        (Ty::Enum(allowed), _) => err(format!("expected {}, got {}", one_of(allowed), describe(v))),
        (Ty::StrList, Value::Array(a)) => {
            for (i, x) in a.iter().enumerate() {
                walk(x, Ty::Str, &format!("{at}[{i}]"), out);
            }
        }
        (Ty::StrList, Value::String(s)) => {
            err(format!("expected a list of trigger names: write `[{s}]`"))
        }
        (Ty::StrList, _) => err(format!(
            "expected a list of trigger names, got {}",
            describe(v)
        )),
        (Ty::PatternMap, Value::Object(m)) => {
            for (k, x) in m {
                walk(x, Ty::Pattern, &format!("{at}.{k}"), out);
            }
        }
        (Ty::PatternMap, _) => err(format!(
            "expected a mapping of data fields to patterns, like `{{ server: \"s1\" }}`, got {}",
            describe(v)
        )),
        (Ty::Obj(obj), Value::Object(m)) => walk_obj(obj, m, at, out),
        (Ty::Obj(obj), _) => err(format!(
            "expected {} (a mapping with {}), got {}",
            obj.what,
            keys(obj),
            describe(v)
        )),
        (Ty::Actions, Value::Array(a)) => {
            for (i, x) in a.iter().enumerate() {
                walk_action(x, &format!("{at}[{i}]"), out);
            }
        }
        (Ty::Actions, _) => err(format!(
            "expected a list of actions, like `[{{ reload: {{}} }}]`, got {}",
            describe(v)
        )),
    }
}

fn walk_obj(obj: &Obj, m: &serde_json::Map<String, Value>, at: &str, out: &mut Vec<Problem>) {
    for (k, v) in m {
        match obj.fields.iter().find(|f| f.key == k) {
            Some(f) => walk(v, f.ty, &format!("{at}.{k}"), out),
            None => {
                let names: Vec<&str> = obj.fields.iter().map(|f| f.key).collect();
                let mut msg = format!("unknown field `{k}` in {}", obj.what);
                match nearest(k, &names) {
                    Some(n) => msg.push_str(&format!(": did you mean `{n}`?")),
                    None if names.is_empty() => msg.push_str(": it takes no fields, write `{}`"),
                    None => msg.push_str(&format!(": expected {}", one_of(&names))),
                }
                out.push((format!("{at}.{k}"), msg));
            }
        }
    }
    for f in obj.fields.iter().filter(|f| f.required) {
        if !m.contains_key(f.key) {
            out.push((
                at.to_string(),
                format!("{} needs `{}`: add `{}`", obj.what, f.key, f.example),
            ));
        }
    }
}

fn walk_action(v: &Value, at: &str, out: &mut Vec<Problem>) {
    let m = match v {
        Value::Object(m) if m.len() == 1 => m,
        Value::Object(m) if m.len() > 1 => {
            let names: Vec<&str> = m.keys().map(String::as_str).collect();
            out.push((
                at.to_string(),
                format!(
                    "an action is a mapping with one key, the action's name, but this one has {}: put each action in its own list item",
                    one_of(&names).replace(" or ", " and ")
                ),
            ));
            return;
        }
        Value::String(s) if ACTIONS.iter().any(|(n, _)| n == s) => {
            out.push((
                at.to_string(),
                format!("write the action as `{s}: {{ ... }}` with its fields"),
            ));
            return;
        }
        other => {
            out.push((
                at.to_string(),
                format!(
                    "expected an action, a mapping like `{{ switch_route: {{ route: ..., backend: ... }} }}`, got {}",
                    describe(other)
                ),
            ));
            return;
        }
    };
    for (name, args) in m {
        let path = format!("{at}.{name}");
        match ACTIONS.iter().find(|(n, _)| n == name) {
            Some((_, obj)) => walk(args, Ty::Obj(obj), &path, out),
            None => {
                let mut msg = format!("unknown action `{name}`");
                if let Some(n) = nearest(name, ACTION_NAMES) {
                    msg.push_str(&format!(": did you mean `{n}`?"));
                }
                msg.push_str(&format!("; the actions are {}", ACTION_NAMES.join(", ")));
                if matches!(name.as_str(), "drain" | "maint" | "disable") {
                    msg.push_str(&format!(
                        "; to {name} a server write `set_server_state: {{ backend: ..., server: ..., state: {} }}`",
                        if name == "drain" { "drain" } else { "maint" }
                    ));
                }
                out.push((path, msg));
            }
        }
    }
}

fn keys(obj: &Obj) -> String {
    let names: Vec<&str> = obj.fields.iter().map(|f| f.key).collect();
    one_of(&names)
}

fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        None => "no keys".to_string(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of every object in the table, by the path of objects that leads to it.
    fn schema_keys(obj: &Obj, at: &str, out: &mut Vec<String>) {
        for f in obj.fields {
            let path = format!("{at}.{}", f.key);
            out.push(path.clone());
            if let Ty::Obj(o) = f.ty {
                schema_keys(o, &path, out);
            }
            if let Ty::Actions = f.ty {
                for (name, o) in ACTIONS {
                    out.push(format!("{path}.{name}"));
                    schema_keys(o, &format!("{path}.{name}"), out);
                }
            }
        }
    }

    /// Every key in a serialized config, with list indexes left out.
    fn value_keys(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let path = format!("{at}.{k}");
                    if !at.ends_with(".data") && !at.ends_with(".input") {
                        out.push(path.clone());
                        value_keys(x, &path, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| value_keys(x, at, out)),
            _ => {}
        }
    }

    #[test]
    fn the_table_and_the_serde_types_agree() {
        let yaml = r#"
- name: full
  match: { type: a, subject: b, data: { x: "1" } }
  threshold: 2
  within: 1m
  for_each: subject
  posture: reactive
  cooldown: 1m
  inhibit: [other]
  automation_events: { allow: true, max_hops: 2 }
  enforce: false
  max_actions_per_minute: 5
  max_unavailable: 2
  actions:
    - set_server_state: { backend: b, server: s, state: drain }
    - set_server_weight: { backend: b, server: s, weight: 2 }
    - switch_route: { route: r, backend: b }
    - restore_route: { route: r }
    - set_table: { table: t, key: k, gpc0: 1, tag: x }
    - clear_table: { table: t, key: k }
    - block: { table: t, key: k, for: 1m }
    - revoke_sessions: { principal: p }
    - reload: {}
    - emit: { type: com.example.x, subject: s, data: { a: 1 } }
    - webhook: { url: "https://h/" }
    - start_workflow: { name: w, input: { a: 1 } }
- name: other
  posture: proactive
  match: { type: a }
  expect: { type: b, subject: c, data: { y: "2" } }
  within: 1m
  for_each: subject
  actions: [{ reload: {} }]
"#;
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        // The table accepts it, and so does serde (which rejects unknown keys).
        let mut problems = Vec::new();
        for (i, t) in v.as_array().unwrap().iter().enumerate() {
            walk(
                t,
                Ty::Obj(&TRIGGER),
                &format!("triggers[{i}]"),
                &mut problems,
            );
        }
        assert!(problems.is_empty(), "{problems:#?}");
        let cfgs: Vec<TriggerCfg> = serde_json::from_value(v).unwrap();
        // Every key the table knows is in the config serde read, and back.
        let mut known = Vec::new();
        schema_keys(&TRIGGER, "", &mut known);
        let mut written = Vec::new();
        value_keys(&serde_json::to_value(&cfgs).unwrap(), "", &mut written);
        for k in &known {
            assert!(
                written.contains(k),
                "the table has `{k}`, the serde types did not write it"
            );
        }
        for k in &written {
            assert!(
                known.contains(k),
                "serde wrote `{k}`, the table does not know it"
            );
        }
    }

    #[test]
    fn typos_find_their_key() {
        assert_eq!(
            nearest("cooldwn", &["cooldown", "within"]),
            Some("cooldown")
        );
        assert_eq!(nearest("swich_route", ACTION_NAMES), Some("switch_route"));
        assert_eq!(nearest("frobnicate", ACTION_NAMES), None);
    }
}
