//! Paths of the Amazon States Language (JSONPath mode); payload templates, which use them,
//! are in the `template` module.
//!
//! * [`select`] / [`select_opt`]: the value a Path selects. `$…` reads the state's input,
//!   `$$…` the context object, `$name…` the variable `name` (an `Assign`ed variable).
//! * [`set_at`]: ResultPath, placing a result inside the input.
//! * [`check_path`], [`check_reference_path`]: validation at load.
//!
//! Every query is parsed and evaluated by `serde_json_path` (RFC 9535). A path's root
//! (`$`, `$$`, `$name`) is mapped to a plain `$` query over the matching document first.
//! That crate does not expose a parsed query's segments, so [`set_at`] splits a singular
//! query at the boundaries the crate itself accepts, and reads each segment's name or
//! index back from the crate's rendering of a one-segment query (see `segments`).

use super::{names, Scope, StatesError};
use serde_json::{Map, Value};
use serde_json_path::{JsonPath, PathElement};

/// The document a path reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Root<'p> {
    /// `$…`: the state's input.
    Input,
    /// `$$…`: the context object.
    Context,
    /// `$name…`: the variable `name`.
    Var(&'p str),
}

/// A path compiled: its root, its `$` query over that root and whether it is singular.
pub(crate) struct Compiled<'p> {
    pub(crate) root: Root<'p>,
    pub(crate) query: JsonPath,
    pub(crate) singular: bool,
}

/// Splits `path` into its root and the plain `$` query over that root.
fn split_root(path: &str) -> Result<(Root<'_>, String), String> {
    let Some(after) = path.strip_prefix('$') else {
        return Err(format!(
            "`{path}` is not a path: a path starts with `$` (the input, e.g. `$.field`), \
             `$$` (the context object, e.g. `$$.Execution.Id`) or `$name` (a variable)"
        ));
    };
    if let Some(rest) = after.strip_prefix('$') {
        return Ok((Root::Context, format!("${rest}")));
    }
    match after.chars().next() {
        None | Some('.') | Some('[') => Ok((Root::Input, path.to_string())),
        Some(c) if c.is_alphabetic() || c == '_' => {
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            Ok((Root::Var(&after[..end]), format!("${}", &after[end..])))
        }
        Some(c) => Err(format!(
            "`{path}` is not a valid path: `$` must be followed by `.`, `[`, `$` (the context \
             object) or a variable name (a letter or `_`), not `{c}`"
        )),
    }
}

/// Whether a valid `$` query is singular (RFC 9535 2.3.5.1: only name and index
/// selectors, one per segment, no descendant segments). RFC 9535 only allows singular
/// queries as comparison operands, so the query is singular exactly when
/// `serde_json_path` accepts it as one.
fn is_singular(query: &str) -> bool {
    parse(&format!("$[?{query} == null]")).is_ok()
}

/// `JsonPath::parse`, except for a query that ends inside a `\u` escape: serde_json_path 0.7
/// reads escapes with nom's streaming `one_of`, and panics ("we do not use streaming
/// parsers") when the input ends where it expects one more character (found by fuzzing).
/// Such a query is never valid, so it is refused here with the message and position the
/// parser would give. The error is the message and the character position.
fn parse(query: &str) -> Result<JsonPath, (String, usize)> {
    if let Some(at) = unfinished_escape(query) {
        return Err((
            "the `\\u` escape is cut off by the end of the path".into(),
            at,
        ));
    }
    JsonPath::parse(query).map_err(|e| (e.message().to_string(), e.position()))
}

/// The character position of a `\u` escape that the end of `query` cuts off: fewer than
/// four characters after it, or a high surrogate (`\uD800`–`\uDBFF`) without room for
/// its low half (`\uXXXX`).
fn unfinished_escape(query: &str) -> Option<usize> {
    let chars: Vec<char> = query.chars().collect();
    let mut backslashes = 0;
    for (i, &c) in chars.iter().enumerate() {
        if c == 'u' && backslashes % 2 == 1 {
            let rest = &chars[i + 1..];
            let high = rest.len() >= 2
                && matches!(rest[0], 'D' | 'd')
                && matches!(rest[1], '8' | '9' | 'A' | 'B' | 'a' | 'b');
            if rest.len() < 4 || (high && rest.len() < 10) {
                return Some(i - 1);
            }
        }
        backslashes = if c == '\\' { backslashes + 1 } else { 0 };
    }
    None
}

/// The deepest nesting of brackets and parentheses a path may have. serde_json_path parses
/// nested filters by recursion, so a path nested thousands deep overflows the stack (found by
/// fuzzing); real paths nest a few levels.
pub const MAX_PATH_NESTING: usize = 8;

/// Refuses a path nested deeper than [`MAX_PATH_NESTING`] (brackets and parentheses outside
/// quoted names).
fn check_nesting(path: &str) -> Result<(), String> {
    let (mut depth, mut deepest, mut quote, mut escaped) = (0usize, 0usize, None::<char>, false);
    for c in path.chars() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[' | '(') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (None, ']' | ')') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_PATH_NESTING {
        return Err(format!(
            "`{}…` nests {deepest} levels of brackets or parentheses; at most {MAX_PATH_NESTING} are allowed",
            path.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

/// Parses `path` (any root) into a [`Compiled`] query.
pub(crate) fn compile(path: &str) -> Result<Compiled<'_>, String> {
    check_nesting(path)?;
    let (root, query) = split_root(path)?;
    let parsed = parse(&query).map_err(|(message, position)| {
        format!(
            "`{path}` is not a valid JSONPath (RFC 9535): {message} (at character {position} of `{query}`); \
             write e.g. `$.field`, `$.list[0]`, `$['key with spaces']` or `$.list[*].id`"
        )
    })?;
    Ok(Compiled {
        root,
        singular: is_singular(&query),
        query: parsed,
    })
}

/// The document `root` names in `scope`; `None` for an undefined variable.
pub(crate) fn document<'s>(root: Root<'_>, scope: &Scope<'s>) -> Option<&'s Value> {
    match root {
        Root::Input => Some(scope.input),
        Root::Context => Some(scope.context),
        Root::Var(name) => scope.vars.get(name),
    }
}

/// What a root is called in messages.
pub(crate) fn describe(root: Root<'_>) -> String {
    match root {
        Root::Input => "the input".to_string(),
        Root::Context => "the context object".to_string(),
        Root::Var(name) => format!("the variable `${name}`"),
    }
}

/// The value `path` selects: `$…` reads `scope.input`, `$$…` reads `scope.context` (the
/// context object) and `$name…` reads the variable `name` from `scope.vars`, then the rest
/// of the path inside it (`$count`, `$server.name`, `$items[0]`).
///
/// A singular query (only name and index segments) yields its one node; a non-singular
/// query (wildcards, slices, filters, descendants, several selectors) yields a JSON array
/// of every node it matches, possibly empty. A singular query that matches nothing, an
/// undefined variable or an invalid path is a `States.Runtime` error naming the path.
pub fn select(path: &str, scope: &Scope) -> Result<Value, StatesError> {
    let compiled = compile(path).map_err(StatesError::runtime)?;
    let Some(doc) = document(compiled.root, scope) else {
        return Err(StatesError::runtime(format!(
            "the path `{path}` reads {}, which is not defined (assign it first with `Assign`)",
            describe(compiled.root)
        )));
    };
    let nodes = compiled.query.query(doc).all();
    if !compiled.singular {
        return Ok(Value::Array(nodes.into_iter().cloned().collect()));
    }
    match nodes.first() {
        Some(node) => Ok((*node).clone()),
        None => Err(StatesError::runtime(format!(
            "the path `{path}` selects nothing in {}",
            describe(compiled.root)
        ))),
    }
}

/// Like [`select`], but `Ok(None)` when the query matches no node (a singular query that
/// matches nothing, a non-singular query that matches nothing, or an undefined variable);
/// this is what Choice's `IsPresent` asks. A non-singular query that matches nodes gives
/// `Some` array of them. An invalid path is a `States.Runtime` error.
pub fn select_opt(path: &str, scope: &Scope) -> Result<Option<Value>, StatesError> {
    let compiled = compile(path).map_err(StatesError::runtime)?;
    let Some(doc) = document(compiled.root, scope) else {
        return Ok(None);
    };
    let nodes = compiled.query.query(doc).all();
    if nodes.is_empty() {
        Ok(None)
    } else if compiled.singular {
        Ok(Some(nodes[0].clone()))
    } else {
        Ok(Some(Value::Array(nodes.into_iter().cloned().collect())))
    }
}

/// One step of a singular query.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Name(String),
    Index(i64),
}

/// The segments of a valid singular `$` query.
///
/// `serde_json_path` keeps its parse tree private, so this finds the segment boundaries it
/// accepts: a boundary is a place where the text so far is itself a valid query and the
/// rest starts a new segment (`.` or `[`). A prefix that ends inside a quoted name is never
/// valid (the string is unterminated) and a dot-name cannot contain `.` or `[`, so these are
/// exactly the segment boundaries. Each segment is then parsed alone as `$<segment>` and its
/// name or index read back from the crate's rendering of it (`$.name`, `$['name']`, `$[3]`),
/// so no escape or quoting rule is decoded here.
fn segments(query: &str) -> Result<Vec<Seg>, String> {
    check_nesting(query)?;
    let mut segs = Vec::new();
    let mut start = 1; // after the `$`
    let ends = query
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(query.len()));
    for end in ends {
        if end <= start {
            continue;
        }
        let rest = query[end..].trim_start();
        let next_segment = rest.is_empty() || rest.starts_with('.') || rest.starts_with('[');
        if !next_segment || parse(&query[..end]).is_err() {
            continue;
        }
        segs.push(segment(query[start..end].trim())?);
        start = end + (query[end..].len() - rest.len());
    }
    if start < query.len() {
        return Err(format!("`{query}` is not a valid singular query"));
    }
    Ok(segs)
}

/// A one-segment singular query (`.name`, `['name']`, `[3]`) as a [`Seg`].
fn segment(text: &str) -> Result<Seg, String> {
    let one = format!("${text}");
    let shown = parse(&one)
        .map_err(|(message, _)| format!("`{one}`: {message}"))?
        .to_string();
    if let Some(name) = shown.strip_prefix("$.") {
        return Ok(Seg::Name(name.to_string()));
    }
    if let Some(name) = shown.strip_prefix("$['").and_then(|s| s.strip_suffix("']")) {
        return Ok(Seg::Name(name.to_string()));
    }
    shown
        .strip_prefix("$[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse::<i64>().ok())
        .map(Seg::Index)
        .ok_or_else(|| format!("`{text}` is not a name or index segment"))
}

/// Checks a ResultPath and returns its compiled query and segments.
fn reference(path: &str) -> Result<(JsonPath, Vec<Seg>), String> {
    let compiled = compile(path)?;
    if compiled.root != Root::Input {
        return Err(format!(
            "`{path}` is not a reference path: ResultPath places the result inside the state's \
             input, so it starts with `$` followed by `.` or `[` (e.g. `$.result`), not with \
             `$$` or a variable"
        ));
    }
    if !compiled.singular {
        return Err(format!(
            "`{path}` is not a reference path: it must name one place, with only field names \
             and array indexes (e.g. `$.result`, `$['a b'].c`, `$.list[0]`); wildcards, \
             slices, filters and `..` are not allowed"
        ));
    }
    Ok((compiled.query, segments(path)?))
}

/// `target` with `value` placed at the reference path `path` (ResultPath).
///
/// `$` replaces the whole target; `$.a.b` sets field `b` of `a`, creating missing
/// intermediate objects; bracket names (`$['a b']`) are allowed; an index (`$.list[1]`,
/// `$.list[-1]`) replaces an existing array element. `States.ResultPathMatchFailure` when
/// the path cannot be applied: it is not a singular `$…` query, a step meets a value of the
/// wrong type (a field of a non-object, an index of a non-array), or an index is out of range.
pub fn set_at(target: Value, path: &str, value: Value) -> Result<Value, StatesError> {
    let fail = |cause: String| StatesError::new(names::RESULT_PATH_MATCH_FAILURE, cause);
    let (query, segs) = reference(path).map_err(fail)?;
    let mut target = target;
    let mut resolved = Vec::with_capacity(segs.len());
    put(&mut target, &segs, value, path, &mut resolved).map_err(fail)?;
    // The segments found above must be the place serde_json_path itself locates.
    let located = query.query_located(&target);
    let same = located.locations().next().is_some_and(|loc| {
        loc.len() == resolved.len()
            && loc.iter().zip(&resolved).all(|(el, seg)| match (el, seg) {
                (PathElement::Name(a), Seg::Name(b)) => a == b,
                (PathElement::Index(a), Seg::Index(b)) => i64::try_from(*a).ok() == Some(*b),
                _ => false,
            })
    });
    if !same {
        return Err(fail(format!(
            "internal error: could not place the result at `{path}`"
        )));
    }
    Ok(target)
}

/// Places `value` at `segs` below `node`, recording the segments with negative indexes
/// resolved in `resolved`.
fn put(
    node: &mut Value,
    segs: &[Seg],
    value: Value,
    path: &str,
    resolved: &mut Vec<Seg>,
) -> Result<(), String> {
    let Some((first, rest)) = segs.split_first() else {
        *node = value;
        return Ok(());
    };
    let kind = kind_of(node);
    match first {
        Seg::Name(name) => {
            let Value::Object(map) = node else {
                return Err(format!(
                    "ResultPath `{path}` sets the field `{name}` of {kind}: only objects have fields"
                ));
            };
            resolved.push(first.clone());
            if rest.is_empty() {
                map.insert(name.clone(), value);
                return Ok(());
            }
            let child = match (map.contains_key(name), rest.first()) {
                (false, Some(Seg::Index(i))) => {
                    return Err(format!(
                        "ResultPath `{path}` needs element [{i}] of the field `{name}`, which \
                         does not exist"
                    ))
                }
                _ => map
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new())),
            };
            put(child, rest, value, path, resolved)
        }
        Seg::Index(i) => {
            let Value::Array(list) = node else {
                return Err(format!(
                    "ResultPath `{path}` sets element [{i}] of {kind}: only arrays have elements"
                ));
            };
            let len = list.len();
            let at = if *i < 0 {
                i64::try_from(len).ok().map(|l| l + i)
            } else {
                Some(*i)
            };
            let Some(at) = at
                .and_then(|a| usize::try_from(a).ok())
                .filter(|&a| a < len)
            else {
                return Err(format!(
                    "ResultPath `{path}`: index [{i}] is out of range for an array of {len} \
                     elements (ResultPath replaces existing elements only)"
                ));
            };
            resolved.push(Seg::Index(at as i64));
            put(&mut list[at], rest, value, path, resolved)
        }
    }
}

/// A value's JSON type with an article, for messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Validates a Path (InputPath, OutputPath, ItemsPath, a Choice `Variable`, the `…Path`
/// operands, SecondsPath, TimestampPath, ErrorPath, CausePath): it starts with `$` (the
/// input), `$$` (the context object) or `$name` (a variable), and the rest parses as an
/// RFC 9535 query. The message says what is wrong and how to write it.
pub fn check_path(path: &str) -> Result<(), String> {
    compile(path).map(|_| ())
}

/// Validates a reference path (ResultPath): a singular query (field names and array indexes
/// only) over the input, starting with `$`.
pub fn check_reference_path(path: &str) -> Result<(), String> {
    reference(path).map(|_| ())
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
    fn select_spec_input_path() {
        let env = numbers();
        assert_eq!(
            select("$.numbers", &env.scope()).unwrap(),
            json!({"val1": 3, "val2": 4})
        );
        assert_eq!(select("$.numbers.val2", &env.scope()).unwrap(), json!(4));
        assert_eq!(
            select("$['title']", &env.scope()).unwrap(),
            json!("Numbers to add")
        );
        assert_eq!(select("$", &env.scope()).unwrap(), env.input);
    }

    #[test]
    fn select_context_and_variables() {
        let env = numbers();
        let s = env.scope();
        assert_eq!(
            select("$$.Execution.Id", &s).unwrap(),
            json!("arn:aws:states:us-east-1:123456789012:execution:stateMachineName:executionName")
        );
        assert_eq!(select("$$.State.RetryCount", &s).unwrap(), json!(3));
        assert_eq!(select("$$.Map.Item.Value.id", &s).unwrap(), json!("c"));
        assert_eq!(select("$$", &s).unwrap(), env.context);
        assert_eq!(select("$count", &s).unwrap(), json!(3));
        assert_eq!(select("$server.name", &s).unwrap(), json!("web-1"));
        assert_eq!(select("$items[0]", &s).unwrap(), json!("x"));
        assert_eq!(select("$items[-1]", &s).unwrap(), json!("y"));
        assert_eq!(select("$items[*]", &s).unwrap(), json!(["x", "y"]));
    }

    #[test]
    fn select_non_singular_gives_arrays() {
        let env = Env::new(json!({"items": [{"id": 1}, {"id": 2}, {"name": "n"}], "empty": []}));
        let s = env.scope();
        assert_eq!(select("$.items[*].id", &s).unwrap(), json!([1, 2]));
        assert_eq!(select("$..id", &s).unwrap(), json!([1, 2]));
        assert_eq!(select("$.items[0:1]", &s).unwrap(), json!([{"id": 1}]));
        assert_eq!(
            select("$.items[?@.id > 1]", &s).unwrap(),
            json!([{"id": 2}])
        );
        assert_eq!(select("$.empty[*]", &s).unwrap(), json!([]));
        assert_eq!(select("$.items[0,1].id", &s).unwrap(), json!([1, 2]));
    }

    #[test]
    fn select_missing_is_an_error_naming_the_path() {
        let env = numbers();
        let e = select("$.numbers.val3", &env.scope()).unwrap_err();
        assert_eq!(e.error, names::RUNTIME);
        assert!(e.cause.contains("$.numbers.val3"), "{}", e.cause);
        let e = select("$nope", &env.scope()).unwrap_err();
        assert!(
            e.cause.contains("$nope") && e.cause.contains("not defined"),
            "{}",
            e.cause
        );
        let e = select("$.a[", &env.scope()).unwrap_err();
        assert_eq!(e.error, names::RUNTIME);
    }

    #[test]
    fn select_opt_none_for_missing() {
        let env = Env::new(json!({"a": {"b": null}, "list": []}));
        let s = env.scope();
        assert_eq!(select_opt("$.a.b", &s).unwrap(), Some(Value::Null));
        assert_eq!(select_opt("$.a.c", &s).unwrap(), None);
        assert_eq!(select_opt("$.list[*]", &s).unwrap(), None);
        assert_eq!(select_opt("$.list[0]", &s).unwrap(), None);
        assert_eq!(select_opt("$undefined", &s).unwrap(), None);
        assert_eq!(
            select_opt("$.*", &s).unwrap(),
            Some(json!([{"b": null}, []]))
        );
        assert!(select_opt("$.a[?", &s).is_err());
    }

    #[test]
    fn set_at_spec_result_path() {
        let input = json!({"title": "Numbers to add", "numbers": {"val1": 3, "val2": 4}});
        assert_eq!(
            set_at(input.clone(), "$.sum", json!(7)).unwrap(),
            json!({"title": "Numbers to add", "numbers": {"val1": 3, "val2": 4}, "sum": 7})
        );
        assert_eq!(set_at(input.clone(), "$", json!(7)).unwrap(), json!(7));
        assert_eq!(
            set_at(input, "$.numbers.val1", json!("x")).unwrap(),
            json!({"title": "Numbers to add", "numbers": {"val1": "x", "val2": 4}})
        );
        // The spec's example: ResultPath `$.master.detail` with the result "Hello, AWS Step Functions!".
        let out = set_at(
            json!({"master": {"detail": [1, 2, 3]}}),
            "$.master.detail",
            json!("Hi"),
        );
        assert_eq!(out.unwrap(), json!({"master": {"detail": "Hi"}}));
    }

    #[test]
    fn set_at_creates_intermediates_and_handles_brackets() {
        assert_eq!(
            set_at(json!({}), "$.a.b.c", json!(1)).unwrap(),
            json!({"a": {"b": {"c": 1}}})
        );
        assert_eq!(
            set_at(json!({"a": {"x": 0}}), "$.a['b c'][\"d.e\"]", json!(true)).unwrap(),
            json!({"a": {"x": 0, "b c": {"d.e": true}}})
        );
        assert_eq!(
            set_at(json!({}), "$['it\\'s']", json!(1)).unwrap(),
            json!({"it's": 1})
        );
        assert_eq!(
            set_at(json!({"list": [1, 2, 3]}), "$.list[1]", json!("b")).unwrap(),
            json!({"list": [1, "b", 3]})
        );
        assert_eq!(
            set_at(json!({"list": [1, {"a": 1}]}), "$.list[-1].b", json!(2)).unwrap(),
            json!({"list": [1, {"a": 1, "b": 2}]})
        );
    }

    #[test]
    fn set_at_agrees_with_select() {
        let env = Env::new(json!({"a": {"b c": [0, {"é": 1}]}}));
        for path in [
            "$['\\u0041']",
            "$.a['b c'][1]['é']",
            "$.a[\"b c\"][-1].new",
            "$.a[ 'b c' ][0]",
            "$.a['x\\\\y']",
            "$.a['q\\'']",
        ] {
            assert_eq!(check_reference_path(path), Ok(()), "{path}");
            let out = set_at(env.input.clone(), path, json!("placed")).unwrap();
            let scope = Scope {
                input: &out,
                context: &env.context,
                vars: &env.vars,
            };
            assert_eq!(select(path, &scope).unwrap(), json!("placed"), "{path}");
        }
        let out = set_at(json!({}), "$['\\u0041']", json!(1)).unwrap();
        assert_eq!(out, json!({"A": 1}));
    }

    #[test]
    fn set_at_failures() {
        let fails = |target: Value, path: &str| {
            let e = set_at(target, path, json!(1)).unwrap_err();
            assert_eq!(e.error, names::RESULT_PATH_MATCH_FAILURE, "{path}: {e}");
            e.cause
        };
        let cause = fails(json!({"a": "text"}), "$.a.b");
        assert!(
            cause.contains("a string") && cause.contains("`b`"),
            "{cause}"
        );
        fails(json!([1]), "$.a");
        fails(json!(null), "$.a");
        fails(json!({"list": [1]}), "$.list[1]");
        fails(json!({"list": [1]}), "$.list[-2]");
        fails(json!({"a": {}}), "$.a[0]");
        fails(json!({}), "$.missing[0]");
        fails(json!({}), "$.items[*]");
        fails(json!({}), "$$.Execution");
        fails(json!({}), "$var.x");
        fails(json!({}), "result");
    }

    #[test]
    fn segments_follow_the_library() {
        let segs = segments("$.a['b.c'][0][\"d'e\"]['x\\'y'].f").unwrap();
        assert_eq!(
            segs,
            vec![
                Seg::Name("a".into()),
                Seg::Name("b.c".into()),
                Seg::Index(0),
                Seg::Name("d'e".into()),
                Seg::Name("x'y".into()),
                Seg::Name("f".into()),
            ]
        );
        assert_eq!(segments("$").unwrap(), vec![]);
        assert_eq!(
            segments("$[\"a']['b\"]").unwrap(),
            vec![Seg::Name("a']['b".into())]
        );
        assert!(segments("$['a]['b']").is_err());
        assert_eq!(segments("$[-3]").unwrap(), vec![Seg::Index(-3)]);
        assert_eq!(segments("$.ab").unwrap(), vec![Seg::Name("ab".into())]);
    }

    #[test]
    fn check_path_accepts_and_explains() {
        for ok in [
            "$",
            "$.a",
            "$$.Execution.Id",
            "$$",
            "$count",
            "$server.name",
            "$items[0]",
            "$.items[*].id",
            "$..x",
            "$['a b']",
            "$.a[?@.b == 'c']",
            "$_x",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "a.b", "$.", "$.a[", "$[?]", "$-x", "$.a b", "$ ", "$.a..", "$$$",
        ] {
            let message = check_path(bad).unwrap_err();
            assert!(message.contains('`'), "{bad}: {message}");
        }
        assert!(check_path("x").unwrap_err().contains("starts with `$`"));
    }

    /// A path nested thousands deep is refused before the parser recurses through it (it
    /// overflowed the stack; found by fuzzing); quoted brackets do not count.
    #[test]
    fn deeply_nested_paths_are_refused_not_parsed() {
        let deep = format!("$.a{}{}", "[?@.b".repeat(5000), "]".repeat(5000));
        let e = check_path(&deep).unwrap_err();
        assert!(e.contains("levels"), "{e}");
        assert!(check_reference_path(&format!("$.a{}", "[0]".repeat(50))).is_ok());
        let filters = format!("$.a{}{}", "[?@.b".repeat(4), "]".repeat(4));
        assert_eq!(check_path(&filters), Ok(()));
        let quoted = format!("$['{}']", "[(".repeat(100));
        assert_eq!(check_path(&quoted), Ok(()));
    }

    #[test]
    fn a_path_cut_off_inside_a_unicode_escape_is_refused_not_a_panic() {
        // Each of these made serde_json_path 0.7 panic (found by fuzzing `intrinsics`).
        for cut in [
            r#"$.li11 ["++++k++'H\u"#,
            r#"$['a\u"#,
            r#"$['a\u00"#,
            r#"$['a\uD83D"#,
            r#"$['a\uD83D\u"#,
            r#"$['a\uD83D\uDE0"#,
        ] {
            let e = check_path(cut).unwrap_err();
            assert!(e.contains("not a valid JSONPath"), "{cut}: {e}");
        }
        // Whole escapes still parse, and an escaped backslash before `u` is no escape.
        assert_eq!(check_path(r#"$['\u0041']"#), Ok(()));
        assert_eq!(check_path(r#"$['\uD83D\uDE00']"#), Ok(()));
        assert!(unfinished_escape(r#"$['a\\u"#).is_none());
    }

    #[test]
    fn check_reference_path_is_singular_only() {
        for ok in ["$", "$.a", "$.a.b[0]", "$['a b']", "$.list[-1]"] {
            assert_eq!(check_reference_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "$.a[*]",
            "$..a",
            "$.a[0:2]",
            "$.a[?@.b]",
            "$['a','b']",
            "$$.x",
            "$v",
            "$.a[",
        ] {
            assert!(check_reference_path(bad).is_err(), "{bad}");
        }
        assert!(check_reference_path("$.a[*]")
            .unwrap_err()
            .contains("wildcards"));
    }
}
