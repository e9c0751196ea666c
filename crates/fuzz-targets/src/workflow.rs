//! Workflow targets: Amazon States Language definitions (parsed and validated, then run in
//! memory with canned task results and a small transition cap), payload templates and paths
//! (JSONPath, RFC 9535), and intrinsic functions.
//!
//! Inputs are JSON. `asl_run` takes up to three documents separated by a line `---`: the
//! definition, the execution input, and the task results by state name (a value, `"silent"`,
//! or `{"Error": …, "Cause": …}` for a failure). `jsonpath` takes one object:
//! `{"template": …, "input": …, "vars": {…}, "path": "$.x", "value": …}`.

use crate::support::{sections, text};
use portcullis_automation::workflow::definition::{Definition, Kind};
use portcullis_automation::workflow::local::{self, Answers, Canned};
use portcullis_automation::workflow::{intrinsics, names, paths, template, Scope, StatesError};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// Transitions a local run may take before it is stopped.
const MAX_TRANSITIONS: usize = 200;

/// A definition: parsed and validated. What validates has a start state, and every
/// transition of every state names a state that exists.
pub fn asl_definition(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match Definition::parse(&v) {
        Ok(def) => check_definition(&def),
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            for (_, message) in &problems {
                assert!(!message.is_empty(), "a problem without a message");
            }
        }
    }
}

fn check_definition(def: &Definition) {
    assert!(
        def.state(&def.root.start_at).is_some(),
        "StartAt `{}` is not a state",
        def.root.start_at
    );
    for s in def.states() {
        for (field, target) in s.targets() {
            assert!(
                def.state(target).is_some(),
                "state `{}` {field} names `{target}`, which is not a state",
                s.name
            );
        }
    }
}

/// Canned results: the ones given by state name, `{"ok": true}` for every other Task state.
fn answers(def: &Definition, given: &Map<String, Value>) -> Answers {
    let mut a = Answers::new();
    for s in def.states() {
        if !matches!(s.kind, Kind::Task { .. }) {
            continue;
        }
        let canned = match given.get(&s.name) {
            None => Canned::Ok(json!({ "ok": true })),
            Some(Value::String(x)) if x == "silent" => Canned::Silent,
            Some(Value::Object(o)) if o.contains_key("Error") => Canned::Err(StatesError::new(
                o["Error"].as_str().unwrap_or("States.TaskFailed"),
                o.get("Cause").and_then(Value::as_str).unwrap_or(""),
            )),
            Some(v) => Canned::Ok(v.clone()),
        };
        a.add(&s.name, canned);
    }
    a
}

/// A definition run in memory: it ends, fails, or stops at the transition cap, and, since
/// time is virtual and randomness fixed, a second run ends the same way (unless the
/// definition asks for UUIDs or unseeded random numbers).
pub fn asl_run(data: &[u8]) {
    let parts = sections(data, 3);
    let Ok(v) = serde_json::from_slice::<Value>(parts[0]) else {
        return;
    };
    let Ok(def) = Definition::parse(&v) else {
        return;
    };
    let input = parts
        .get(1)
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or_else(|| json!({}));
    let given = parts
        .get(2)
        .and_then(|p| serde_json::from_slice::<Value>(p).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let first = local::run(
        &def,
        input.clone(),
        &mut answers(&def, &given),
        0,
        MAX_TRANSITIONS,
    );
    // `States.UUID` and an unseeded `States.MathRandom` are random by design.
    let text = v.to_string();
    if text.contains("UUID") || text.contains("MathRandom") {
        return;
    }
    let second = local::run(&def, input, &mut answers(&def, &given), 0, MAX_TRANSITIONS);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                a.outcome, b.outcome,
                "two runs of one definition ended apart"
            );
            assert_eq!(a.ended_ms, b.ended_ms);
            assert_eq!(a.calls.len(), b.calls.len());
            assert_eq!(a.history.len(), b.history.len());
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("two runs of one definition ended apart: {first:?} / {second:?}"),
    }
}

/// The input, context object and variables the path targets read, unless the input gives
/// its own.
fn default_scope() -> &'static (Value, Value, Map<String, Value>) {
    static S: OnceLock<(Value, Value, Map<String, Value>)> = OnceLock::new();
    S.get_or_init(|| {
        let input = json!({
            "name": "world", "list": [1, 2, 3], "text": "a,b,c", "n": 42, "f": 1.5,
            "nested": { "a": { "b": [true, null, { "c": "d" }] } },
            "items": [{ "id": 1, "tags": ["x"] }, { "id": 2, "tags": [] }],
            "weird key": { "with.dot": 1 }, "big": 9_007_199_254_740_993u64
        });
        let context = json!({
            "Execution": { "Id": "exec-1", "Name": "fuzz", "Input": { "a": 1 },
                           "StartTime": "2026-01-01T00:00:00Z" },
            "State": { "Name": "S", "EnteredTime": "2026-01-01T00:00:01Z" },
            "StateMachine": { "Id": "wf", "Name": "wf" }
        });
        let mut vars = Map::new();
        vars.insert("v".into(), json!(1));
        vars.insert("items".into(), json!(["x", "y"]));
        vars.insert("obj".into(), json!({ "k": [1, { "deep": true }] }));
        (input, context, vars)
    })
}

/// A payload template and a path, over an input: a template that validates fails only the
/// ways validation cannot see (a path that selects nothing, an intrinsic that fails), and a
/// reference path that places a value reads the same value back.
pub fn jsonpath(data: &[u8]) {
    let Ok(doc) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let (dinput, context, dvars) = default_scope();
    let obj = doc.as_object().filter(|o| o.contains_key("template"));
    let template_value = obj.map_or(&doc, |o| &o["template"]);
    let input = obj.and_then(|o| o.get("input")).unwrap_or(dinput);
    let vars = obj
        .and_then(|o| o.get("vars"))
        .and_then(Value::as_object)
        .unwrap_or(dvars);
    let scope = Scope {
        input,
        context,
        vars,
    };
    let problems = template::check_template(template_value, "Parameters");
    let rendered = template::render(template_value, &scope);
    if let (true, Err(e)) = (problems.is_empty(), &rendered) {
        assert!(
            e.error == names::PARAMETER_PATH_FAILURE || e.error == names::INTRINSIC_FAILURE,
            "a template that validated failed with {}: {}",
            e.error,
            e.cause
        );
    }
    let Some(path) = obj.and_then(|o| o.get("path")).and_then(Value::as_str) else {
        return;
    };
    if paths::check_path(path).is_ok() {
        let _ = paths::select(path, &scope);
        let _ = paths::select_opt(path, &scope);
    } else {
        assert!(
            paths::select(path, &scope).is_err(),
            "an invalid path selected"
        );
    }
    if paths::check_reference_path(path).is_err() {
        return;
    }
    let value = obj
        .and_then(|o| o.get("value"))
        .cloned()
        .unwrap_or(json!("placed"));
    if let Ok(out) = paths::set_at(input.clone(), path, value.clone()) {
        let placed = Scope {
            input: &out,
            context,
            vars,
        };
        let back = paths::select(path, &placed)
            .unwrap_or_else(|e| panic!("`{path}` placed a value and then selected nothing: {e:?}"));
        assert_eq!(
            back, value,
            "`{path}` placed one value and read back another"
        );
    }
}

/// An intrinsic function call, checked and evaluated over a fixed scope. An expression that
/// fails the load-time check must fail to evaluate too, and what evaluates is JSON.
pub fn intrinsics(data: &[u8]) {
    let Some(expr) = text(data) else {
        return;
    };
    let (input, context, vars) = default_scope();
    let scope = Scope {
        input,
        context,
        vars,
    };
    let checked = intrinsics::check(expr);
    match intrinsics::eval(expr, &scope) {
        Ok(v) => {
            assert!(
                checked.is_ok(),
                "evaluated what the check refuses: {checked:?}"
            );
            let _ = serde_json::to_vec(&v).expect("a result serializes");
        }
        Err(e) => assert_eq!(e.error, names::INTRINSIC_FAILURE, "{}", e.cause),
    }
}
