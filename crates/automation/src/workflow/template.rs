//! Payload templates: `Parameters`, `ResultSelector`, `ItemSelector` and `Assign`. A key
//! ending in `.$` takes its value from a path ([`super::paths`]) or an intrinsic function call
//! ([`super::intrinsics`]); everything else is copied. Rendering at run time, and checking at
//! load (every `.$` value must be a valid path or intrinsic call).

use super::paths::{check_path, compile, describe, document, kind_of, select};
use super::{intrinsics, names, Scope, StatesError};
use crate::Problem;
use serde_json::{Map, Value};

/// Renders a payload template (Parameters, ResultSelector, ItemSelector, Assign).
///
/// Objects and arrays are walked recursively. A key ending in `.$` loses that suffix and its
/// value, a string, is either a path (read with [`select`]: `$…`, `$$…`, `$var…`) or an
/// intrinsic function call (`States.Format(…)`, see [`intrinsics::eval`]). Other values are
/// copied as they are. A singular path that selects nothing (or an undefined variable) is
/// `States.ParameterPathFailure` naming the key and the path; an intrinsic's failure is
/// `States.IntrinsicFailure`; a `.$` value that is not a path or an intrinsic call is
/// `States.Runtime` (validation at load reports it first).
pub fn render(template: &Value, scope: &Scope) -> Result<Value, StatesError> {
    render_at(template, scope, "")
}

/// [`render`], with `at` the position of `template` inside the whole template.
fn render_at(template: &Value, scope: &Scope, at: &str) -> Result<Value, StatesError> {
    match template {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, value) in map {
                let here = join(at, key);
                match key.strip_suffix(".$") {
                    Some(name) => out.insert(name.to_string(), dynamic(value, scope, &here)?),
                    None => out.insert(key.clone(), render_at(value, scope, &here)?),
                };
            }
            Ok(Value::Object(out))
        }
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, v)| render_at(v, scope, &format!("{at}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

/// The value of the `.$` field `field` whose template value is `value`.
fn dynamic(value: &Value, scope: &Scope, field: &str) -> Result<Value, StatesError> {
    let Some(text) = value.as_str() else {
        return Err(StatesError::runtime(format!(
            "the field `{field}` ends in `.$`, so its value must be a string holding a path or \
             an intrinsic function call, not {}",
            kind_of(value)
        )));
    };
    if text.starts_with("States.") {
        return intrinsics::eval(text, scope);
    }
    if !text.starts_with('$') {
        return Err(StatesError::runtime(format!(
            "the field `{field}` ends in `.$`, so its value `{text}` must be a path (`$…`) or \
             an intrinsic function call (`States.…`)"
        )));
    }
    let compiled = compile(text).map_err(StatesError::runtime)?;
    let missing = || {
        StatesError::new(
            names::PARAMETER_PATH_FAILURE,
            format!(
                "The JSONPath `{text}` specified for the field `{field}` could not be found in \
                 {}",
                describe(compiled.root)
            ),
        )
    };
    if document(compiled.root, scope).is_none() {
        return Err(missing());
    }
    match select(text, scope) {
        Ok(v) => Ok(v),
        Err(_) if compiled.singular => Err(missing()),
        Err(e) => Err(e),
    }
}

/// `at.key`, or `key` at the top.
fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// Validates a payload template: every key ending in `.$` must hold a string that is a
/// valid path ([`check_path`]) or a valid intrinsic call ([`intrinsics::check`]); no key
/// may be given both with and without `.$`. Problems are named `{at}.{key}` with the full
/// key (`Parameters.Foo.Bar.$`), and array elements `{at}[{i}]`. Empty when fine.
pub fn check_template(template: &Value, at: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_into(template, at, &mut problems);
    problems
}

/// [`check_template`], appending to `problems`.
fn check_into(template: &Value, at: &str, problems: &mut Vec<Problem>) {
    match template {
        Value::Object(map) => {
            for (key, value) in map {
                let here = join(at, key);
                let Some(name) = key.strip_suffix(".$") else {
                    check_into(value, &here, problems);
                    continue;
                };
                if map.contains_key(name) {
                    problems.push((
                        here.clone(),
                        format!("both `{name}` and `{key}` are given; keep one of them"),
                    ));
                }
                if let Err(message) = check_dynamic(value) {
                    problems.push((here, message));
                }
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                check_into(v, &format!("{at}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

/// Validates the value of a `.$` field.
fn check_dynamic(value: &Value) -> Result<(), String> {
    let Some(text) = value.as_str() else {
        return Err(format!(
            "a key ending in `.$` takes a string holding a path or an intrinsic function call, \
             not {}; to pass a literal value, drop the `.$` from the key",
            kind_of(value)
        ));
    };
    if text.starts_with("States.") {
        intrinsics::check(text)
    } else if text.starts_with('$') {
        check_path(text)
    } else {
        Err(format!(
            "`{text}` is neither a path (`$.field`, `$$.Execution.Id`, `$variable`) nor an \
             intrinsic function call (`States.Format(…)`); to pass a literal string, drop the \
             `.$` from the key"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Env {
        input: Value,
        context: Value,
        vars: Map<String, Value>,
    }

    impl Env {
        fn new(input: Value) -> Env {
            let context = json!({
                "Execution": {
                    "Id": "arn:aws:states:us-east-1:123456789012:execution:stateMachineName:executionName",
                    "Name": "executionName",
                    "Input": {"k": "v"},
                    "StartTime": "2019-03-26T20:14:13.192Z"
                },
                "State": {"Name": "Test", "EnteredTime": "2019-03-26T20:14:13.192Z", "RetryCount": 3},
                "StateMachine": {"Id": "arn:sm", "Name": "stateMachineName"},
                "Task": {"Token": "h7XRiCdLtd/83p1E0dMccoxlzFhglsdkzpK9mBVKZsp7d9yrT1W"},
                "Map": {"Item": {"Index": 2, "Value": {"id": "c"}}}
            });
            let vars = json!({"count": 3, "server": {"name": "web-1"}, "items": ["x", "y"]});
            let Value::Object(vars) = vars else {
                unreachable!()
            };
            Env {
                input,
                context,
                vars,
            }
        }

        fn scope(&self) -> Scope<'_> {
            Scope {
                input: &self.input,
                context: &self.context,
                vars: &self.vars,
            }
        }
    }

    fn numbers() -> Env {
        Env::new(json!({"title": "Numbers to add", "numbers": {"val1": 3, "val2": 4}}))
    }

    #[test]
    fn render_spec_parameters() {
        let env = Env::new(json!({
            "flagged": 7,
            "vals": [0, 10, 20, 30, 40, 50],
            "name": "Arnav",
            "items": [{"id": 1}, {"id": 2}]
        }));
        let template = json!({
            "flagged": true,
            "parts": {
                "first.$": "$.vals[0]",
                "last3.$": "$.vals[-3:]",
                "deeper": [{"who.$": "$.name"}, "plain $.name"]
            },
            "ids.$": "$.items[*].id",
            "execution.$": "$$.Execution.Id",
            "count.$": "$count",
            "host.$": "$server.name",
            "greeting.$": "States.Format('Hello, {}!', $.name)",
            "literal": "$.not.a.path"
        });
        let out = render(&template, &env.scope()).unwrap();
        assert_eq!(
            out,
            json!({
                "flagged": true,
                "parts": {"first": 0, "last3": [30, 40, 50], "deeper": [{"who": "Arnav"}, "plain $.name"]},
                "ids": [1, 2],
                "execution": "arn:aws:states:us-east-1:123456789012:execution:stateMachineName:executionName",
                "count": 3,
                "host": "web-1",
                "greeting": "Hello, Arnav!",
                "literal": "$.not.a.path"
            })
        );
    }

    #[test]
    fn render_errors_name_key_and_path() {
        let env = numbers();
        let e = render(&json!({"a": {"b.$": "$.nothing"}}), &env.scope()).unwrap_err();
        assert_eq!(e.error, names::PARAMETER_PATH_FAILURE);
        assert!(
            e.cause.contains("`a.b.$`") && e.cause.contains("`$.nothing`"),
            "{}",
            e.cause
        );
        let e = render(&json!({"list": [{"v.$": "$nope"}]}), &env.scope()).unwrap_err();
        assert_eq!(e.error, names::PARAMETER_PATH_FAILURE);
        assert!(e.cause.contains("`list[0].v.$`"), "{}", e.cause);
        let e = render(
            &json!({"x.$": "States.ArrayGetItem(States.Array(1), 5)"}),
            &env.scope(),
        )
        .unwrap_err();
        assert_eq!(e.error, names::INTRINSIC_FAILURE);
        let e = render(&json!({"x.$": 5}), &env.scope()).unwrap_err();
        assert_eq!(e.error, names::RUNTIME);
        let e = render(&json!({"x.$": "hello"}), &env.scope()).unwrap_err();
        assert_eq!(e.error, names::RUNTIME);
        // A non-singular path that matches nothing is an empty array, not a failure.
        assert_eq!(
            render(&json!({"x.$": "$.none[*]"}), &env.scope()).unwrap(),
            json!({"x": []})
        );
    }

    #[test]
    fn check_template_names_problems() {
        let template = json!({
            "ok.$": "$.a",
            "ctx.$": "$$.Execution.Id",
            "f.$": "States.Format('{}', $.a)",
            "Foo": {"Bar.$": 5, "Baz.$": "States.Nope()", "list": [{"q.$": "no"}]},
            "dup": 1,
            "dup.$": "$.x",
            "bad.$": "$.a["
        });
        let problems = check_template(&template, "States.S.Parameters");
        let mut at: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        at.sort_unstable();
        assert_eq!(
            at,
            vec![
                "States.S.Parameters.Foo.Bar.$",
                "States.S.Parameters.Foo.Baz.$",
                "States.S.Parameters.Foo.list[0].q.$",
                "States.S.Parameters.bad.$",
                "States.S.Parameters.dup.$",
            ],
            "{problems:?}"
        );
        assert!(check_template(&json!({"a.$": "$.b", "c": [1, {"d": "$"}]}), "P").is_empty());
    }
}
