//! Choice rules (ASL, JSONPath mode): parsing a Choice state's `Choices` into [`Choice`]s with
//! path-named problems, and evaluating them against a state's [`Scope`].
//!
//! A rule is either a comparison — a `Variable` path and exactly one operator (`StringEquals`,
//! `NumericLessThanPath`, `StringMatches`, `IsPresent`, …) — or a combinator (`And`, `Or`,
//! `Not`) over nested rules. Top-level rules carry `Next` and may carry `Assign`; nested rules
//! carry neither.
//!
//! Semantics, as the ASL specification and Step Functions define them:
//! * a comparison on a value (or a `…Path` operand) of another type than the operator's is
//!   false, not an error: `"NumericEquals": 5` on `"5"` is false;
//! * a `Variable` that selects nothing is a `States.Runtime` error, except for `IsPresent`,
//!   which is then false (guard with `IsPresent` inside an `And`: it short-circuits);
//! * a `…Path` operand that selects nothing is a `States.Runtime` error;
//! * timestamps are RFC 3339 with an uppercase `T` and `Z` or a numeric offset, compared as
//!   instants (`…T01:59:00Z` equals `…T03:59:00+02:00`);
//! * `StringMatches`: `*` matches any run of characters (also none), `\*` is a literal asterisk
//!   and `\\` a literal backslash (in JSON source: `"\\*"` and `"\\\\"`); nothing else is
//!   special.

use super::paths::{check_path, select_opt};
use super::{Scope, StatesError};
use crate::suggest::nearest;
use crate::Problem;
use ::time::format_description::well_known::Rfc3339;
use ::time::OffsetDateTime;
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// The type of the values a comparison operator compares (the operator's prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `String…`: strings, ordered by Unicode code point.
    String,
    /// `Numeric…`: JSON numbers (`1` equals `1.0`).
    Numeric,
    /// `BooleanEquals`: booleans.
    Boolean,
    /// `Timestamp…`: RFC 3339 timestamp strings, compared as instants.
    Timestamp,
}

/// How a comparison operator compares (the operator's suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `…Equals`
    Equals,
    /// `…LessThan`
    LessThan,
    /// `…GreaterThan`
    GreaterThan,
    /// `…LessThanEquals`
    LessThanEquals,
    /// `…GreaterThanEquals`
    GreaterThanEquals,
}

/// The right side of a comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    /// The operator's own value (`"StringEquals": "ok"`), of the operator's type.
    Literal(Value),
    /// A `…Path` operator's path (`"StringEqualsPath": "$.expected"`), read when evaluated.
    Path(String),
}

/// What a type test checks of the value its `Variable` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// `IsNull`: the value is `null`.
    Null,
    /// `IsPresent`: the path selects something.
    Present,
    /// `IsNumeric`: the value is a number.
    Numeric,
    /// `IsString`: the value is a string.
    String,
    /// `IsBoolean`: the value is `true` or `false`.
    Boolean,
    /// `IsTimestamp`: the value is a string holding an RFC 3339 timestamp.
    Timestamp,
}

/// A Choice rule: a comparison on the value its `Variable` selects, or a combinator.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// `String…`, `Numeric…`, `BooleanEquals`, `Timestamp…` and their `…Path` forms.
    Compare {
        /// The path of the value compared (`Variable`).
        variable: String,
        /// The operator's type.
        kind: Kind,
        /// The operator's comparison.
        cmp: Cmp,
        /// What the value is compared with.
        operand: Operand,
    },
    /// `StringMatches`, with its pattern as written (escapes included).
    Matches {
        /// The path of the value matched (`Variable`).
        variable: String,
        /// The pattern: `*` a wildcard, `\*` a literal asterisk, `\\` a literal backslash.
        pattern: String,
    },
    /// `IsNull`, `IsPresent`, `IsNumeric`, `IsString`, `IsBoolean`, `IsTimestamp`: true when
    /// the test's outcome is `expected` (`"IsNull": false` means "is not null").
    Is {
        /// The path of the value tested (`Variable`).
        variable: String,
        /// The test.
        test: Test,
        /// The outcome the rule asks for.
        expected: bool,
    },
    /// `And`: every nested rule matches (evaluated in order, stopping at the first false).
    And(Vec<Rule>),
    /// `Or`: some nested rule matches (evaluated in order, stopping at the first true).
    Or(Vec<Rule>),
    /// `Not`: the nested rule does not match.
    Not(Box<Rule>),
}

/// A top-level Choice rule: its [`Rule`], the state to go to when it matches, and its
/// `Assign` (kept as raw JSON for the caller to render).
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The rule.
    pub rule: Rule,
    /// `Next`: the state to go to when the rule matches.
    pub next: String,
    /// `Assign`: the variables to set when the rule matches, as written.
    pub assign: Option<Value>,
}

/// The comparison operators by their parts.
const KINDS: [(&str, Kind); 4] = [
    ("String", Kind::String),
    ("Numeric", Kind::Numeric),
    ("Boolean", Kind::Boolean),
    ("Timestamp", Kind::Timestamp),
];
const CMPS: [(&str, Cmp); 5] = [
    ("Equals", Cmp::Equals),
    ("LessThan", Cmp::LessThan),
    ("GreaterThan", Cmp::GreaterThan),
    ("LessThanEquals", Cmp::LessThanEquals),
    ("GreaterThanEquals", Cmp::GreaterThanEquals),
];
const TESTS: [(&str, Test); 6] = [
    ("IsNull", Test::Null),
    ("IsPresent", Test::Present),
    ("IsNumeric", Test::Numeric),
    ("IsString", Test::String),
    ("IsBoolean", Test::Boolean),
    ("IsTimestamp", Test::Timestamp),
];

/// A field of a rule that is an operator.
#[derive(Clone, Copy)]
enum Op {
    /// A comparison: type, comparison, and whether the operand is a path.
    Compare(Kind, Cmp, bool),
    Matches,
    Is(Test),
    And,
    Or,
    Not,
}

/// The operator named `name`, if it is one.
fn operator(name: &str) -> Option<Op> {
    match name {
        "And" => return Some(Op::And),
        "Or" => return Some(Op::Or),
        "Not" => return Some(Op::Not),
        "StringMatches" => return Some(Op::Matches),
        _ => {}
    }
    if let Some((_, test)) = TESTS.iter().find(|(n, _)| *n == name) {
        return Some(Op::Is(*test));
    }
    let (base, path) = match name.strip_suffix("Path") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let (kind, rest) = KINDS
        .iter()
        .find_map(|(prefix, kind)| base.strip_prefix(prefix).map(|rest| (*kind, rest)))?;
    let (_, cmp) = CMPS.iter().find(|(suffix, _)| *suffix == rest)?;
    if kind == Kind::Boolean && *cmp != Cmp::Equals {
        return None;
    }
    Some(Op::Compare(kind, *cmp, path))
}

/// Every operator name, for suggestions.
fn operator_names() -> Vec<String> {
    let mut names = Vec::new();
    for (prefix, kind) in KINDS {
        for (suffix, cmp) in CMPS {
            if kind != Kind::Boolean || cmp == Cmp::Equals {
                names.push(format!("{prefix}{suffix}"));
                names.push(format!("{prefix}{suffix}Path"));
            }
        }
    }
    names.push("StringMatches".into());
    names.extend(TESTS.iter().map(|(n, _)| n.to_string()));
    names.extend(["And", "Or", "Not"].map(String::from));
    names
}

/// Parses a Choice state's `Choices` array (`at` names it in problems, e.g.
/// `States.Check.Choices`): every rule checked, every problem reported with its path
/// (`States.Check.Choices[2].And[0].StringEquals`) and a message saying how to fix it.
pub fn parse_choices(v: &Value, at: &str) -> Result<Vec<Choice>, Vec<Problem>> {
    let items = match v.as_array() {
        Some(items) if !items.is_empty() => items,
        Some(_) => {
            return Err(vec![(
                at.to_string(),
                "`Choices` is empty: add at least one rule, e.g. {\"Variable\": \"$.status\", \
                 \"StringEquals\": \"ok\", \"Next\": \"Done\"}"
                    .to_string(),
            )])
        }
        None => {
            return Err(vec![(
                at.to_string(),
                format!(
                    "`Choices` must be a non-empty array of Choice rules, not {}",
                    describe(v)
                ),
            )])
        }
    };
    let mut problems = Vec::new();
    let choices: Vec<Choice> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| parse_top(item, &format!("{at}[{i}]"), &mut problems))
        .collect();
    if problems.is_empty() {
        Ok(choices)
    } else {
        Err(problems)
    }
}

/// A top-level rule: a rule with `Next` and maybe `Assign`.
fn parse_top(v: &Value, at: &str, p: &mut Vec<Problem>) -> Option<Choice> {
    let Some(obj) = v.as_object() else {
        p.push((
            at.to_string(),
            format!("a Choice rule must be an object, not {}", describe(v)),
        ));
        return None;
    };
    let rule = parse_rule(obj, at, true, p);
    let next = match obj.get("Next") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            p.push((
                format!("{at}.Next"),
                format!(
                    "`Next` must be the name of a state, not {}",
                    describe(other)
                ),
            ));
            None
        }
        None => {
            p.push((
                at.to_string(),
                "a top-level Choice rule needs `Next`: the state to go to when the rule \
                 matches, e.g. \"Next\": \"Approve\""
                    .to_string(),
            ));
            None
        }
    };
    let assign = match obj.get("Assign") {
        None => None,
        Some(a @ Value::Object(_)) => Some(a.clone()),
        Some(other) => {
            p.push((
                format!("{at}.Assign"),
                format!(
                    "`Assign` must be an object of variable names to values, e.g. \
                     {{\"route\": \"fast\"}}, not {}",
                    describe(other)
                ),
            ));
            None
        }
    };
    Some(Choice {
        rule: rule?,
        next: next?,
        assign,
    })
}

/// A rule object at `at`; `top` when it is a top-level rule (which may have `Next`, `Assign`).
fn parse_rule(obj: &Map<String, Value>, at: &str, top: bool, p: &mut Vec<Problem>) -> Option<Rule> {
    let mut ops: Vec<(&str, Op)> = Vec::new();
    for (k, v) in obj {
        match k.as_str() {
            "Variable" => {}
            "Comment" if !v.is_string() => p.push((
                format!("{at}.Comment"),
                format!("`Comment` must be a string, not {}", describe(v)),
            )),
            "Comment" => {}
            "Next" | "Assign" if !top => p.push((
                format!("{at}.{k}"),
                format!(
                    "`{k}` is only allowed on a top-level Choice rule, not on a rule nested in \
                     `And`, `Or` or `Not`: remove it (the top-level rule's `{k}` applies)"
                ),
            )),
            "Next" | "Assign" => {}
            _ => match operator(k) {
                Some(op) => ops.push((k.as_str(), op)),
                None => p.push(unknown_field(at, k, top)),
            },
        }
    }
    let (name, op) = match ops.as_slice() {
        [one] => *one,
        [] => {
            p.push((
                at.to_string(),
                "a Choice rule needs one operator: a `Variable` and a comparison such as \
                 \"StringEquals\", \"NumericGreaterThan\" or \"IsPresent\", or one of `And`, \
                 `Or`, `Not`"
                    .to_string(),
            ));
            return None;
        }
        many => {
            let names: Vec<String> = many.iter().map(|(n, _)| format!("`{n}`")).collect();
            p.push((
                at.to_string(),
                format!(
                    "a Choice rule has exactly one operator, this one has {}: split it into \
                     several rules, or combine them with `And` or `Or`",
                    names.join(", ")
                ),
            ));
            return None;
        }
    };
    let op_at = format!("{at}.{name}");
    let value = &obj[name];
    if matches!(op, Op::And | Op::Or | Op::Not) {
        if obj.contains_key("Variable") {
            p.push((
                format!("{at}.Variable"),
                format!(
                    "`{name}` combines nested rules and takes no `Variable`: move it into \
                     each nested rule"
                ),
            ));
        }
        return parse_combinator(op, name, value, &op_at, p);
    }
    let variable = parse_variable(obj.get("Variable"), at, name, p);
    let rule = parse_comparison(
        op,
        name,
        variable.clone().unwrap_or_default(),
        value,
        &op_at,
        p,
    );
    variable.and(rule)
}

/// The problem of an unknown field `k` of the rule at `at`.
fn unknown_field(at: &str, k: &str, top: bool) -> Problem {
    let mut known = operator_names();
    known.extend(["Variable", "Comment"].map(String::from));
    if top {
        known.extend(["Next", "Assign"].map(String::from));
    }
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let msg = match nearest(k, &known) {
        Some(n) => format!("unknown field `{k}` in a Choice rule: did you mean `{n}`?"),
        None => format!(
            "unknown field `{k}` in a Choice rule: a rule has a `Variable` and one comparison \
             operator (StringEquals, NumericGreaterThan, IsPresent, …), or one of `And`, `Or`, \
             `Not`{}",
            if top {
                "; a top-level rule also has `Next`, and may have `Assign` and `Comment`"
            } else {
                ""
            }
        ),
    };
    (format!("{at}.{k}"), msg)
}

/// The `Variable` of a comparison rule at `at` whose operator is `name`.
fn parse_variable(v: Option<&Value>, at: &str, name: &str, p: &mut Vec<Problem>) -> Option<String> {
    let problem = match v {
        Some(Value::String(s)) => match check_path(s) {
            Ok(()) => return Some(s.clone()),
            Err(e) => (
                format!("{at}.Variable"),
                format!("`Variable` is not a valid path: {e}"),
            ),
        },
        Some(other) => (
            format!("{at}.Variable"),
            format!(
                "`Variable` must be a path such as \"$.status\", not {}",
                describe(other)
            ),
        ),
        None => (
            at.to_string(),
            format!(
                "`{name}` needs a `Variable`: the path of the value to test, e.g. \
                 \"Variable\": \"$.status\""
            ),
        ),
    };
    p.push(problem);
    None
}

/// The comparison `op` (named `name`, at `at`) on `variable`, with its operand `v`.
fn parse_comparison(
    op: Op,
    name: &str,
    variable: String,
    v: &Value,
    at: &str,
    p: &mut Vec<Problem>,
) -> Option<Rule> {
    let rule = match op {
        Op::Compare(kind, cmp, true) => match v {
            Value::String(path) => check_path(path)
                .map(|()| Rule::Compare {
                    variable,
                    kind,
                    cmp,
                    operand: Operand::Path(path.clone()),
                })
                .map_err(|e| format!("`{name}` takes a path, and this one is not valid: {e}")),
            other => Err(format!(
                "`{name}` takes a path such as \"$.expected\", not {}",
                describe(other)
            )),
        },
        Op::Compare(kind, cmp, false) => {
            check_literal(kind, cmp, name, v).map(|()| Rule::Compare {
                variable,
                kind,
                cmp,
                operand: Operand::Literal(v.clone()),
            })
        }
        Op::Matches => match v.as_str() {
            Some(pattern) => check_pattern(name, pattern).map(|()| Rule::Matches {
                variable,
                pattern: pattern.to_string(),
            }),
            None => Err(format!(
                "`{name}` takes a string pattern such as \"log-*.txt\", not {}",
                describe(v)
            )),
        },
        Op::Is(test) => match v.as_bool() {
            Some(expected) => Ok(Rule::Is {
                variable,
                test,
                expected,
            }),
            None => Err(format!("`{name}` takes true or false, not {}", describe(v))),
        },
        Op::And | Op::Or | Op::Not => Err(format!("`{name}` is not a comparison")),
    };
    rule.map_err(|msg| p.push((at.to_string(), msg))).ok()
}

/// Whether `v` is a valid operand of the literal comparison `name`; the problem if not.
fn check_literal(kind: Kind, cmp: Cmp, name: &str, v: &Value) -> Result<(), String> {
    let ok = match kind {
        Kind::String => v.is_string(),
        Kind::Numeric => v.is_number(),
        Kind::Boolean => v.is_boolean(),
        Kind::Timestamp => v.as_str().and_then(parse_timestamp).is_some(),
    };
    if ok {
        return Ok(());
    }
    let expected = match kind {
        Kind::String => "a string",
        Kind::Numeric => "a number",
        Kind::Boolean => "true or false",
        Kind::Timestamp => {
            "an RFC 3339 timestamp with an uppercase `T` and `Z` or an offset, e.g. \
             \"2016-03-14T01:59:00Z\" or \"2016-03-14T03:59:00+02:00\""
        }
    };
    let mut msg = format!("`{name}` takes {expected}, not {}", describe(v));
    // The operator of the same comparison for the type the value has.
    let family = match v {
        Value::String(s) if parse_timestamp(s).is_some() => Some("Timestamp"),
        Value::String(_) => Some("String"),
        Value::Number(_) => Some("Numeric"),
        Value::Bool(_) if cmp == Cmp::Equals => Some("Boolean"),
        _ => None,
    };
    let suffix = CMPS.iter().find(|(_, c)| *c == cmp).map_or("", |(s, _)| s);
    match family {
        Some(f) if !name.starts_with(f) => {
            msg.push_str(&format!(": to compare with this value, use `{f}{suffix}`"));
        }
        _ => {}
    }
    Err(msg)
}

/// Whether a `StringMatches` pattern's escapes are valid: a backslash escapes `*` or `\`.
fn check_pattern(name: &str, pattern: &str) -> Result<(), String> {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('*' | '\\')) {
            return Err(format!(
                "`{name}`: a backslash must be followed by `*` (a literal asterisk) or by another \
                 backslash (a literal backslash); in JSON write \"\\\\*\" or \"\\\\\\\\\""
            ));
        }
    }
    Ok(())
}

/// `And`, `Or` (a non-empty array of rules) or `Not` (one rule), at `at`.
fn parse_combinator(op: Op, name: &str, v: &Value, at: &str, p: &mut Vec<Problem>) -> Option<Rule> {
    if let Op::Not = op {
        let problem = match v {
            Value::Object(m) => return parse_rule(m, at, false, p).map(|r| Rule::Not(Box::new(r))),
            Value::Array(_) => "`Not` takes one rule object, not an array: to negate several \
                               rules, put an `And` or an `Or` inside the `Not`"
                .to_string(),
            other => format!(
                "`Not` takes one rule object, e.g. {{\"Variable\": \"$.done\", \
                 \"BooleanEquals\": true}}, not {}",
                describe(other)
            ),
        };
        p.push((at.to_string(), problem));
        return None;
    }
    let items = match v.as_array() {
        Some(items) if !items.is_empty() => items,
        other => {
            let what = other.map_or_else(|| describe(v), |_| "an empty array".to_string());
            p.push((
                at.to_string(),
                format!("`{name}` takes a non-empty array of rule objects, not {what}"),
            ));
            return None;
        }
    };
    let mut rules = Vec::new();
    for (j, item) in items.iter().enumerate() {
        let item_at = format!("{at}[{j}]");
        match item.as_object() {
            Some(m) => rules.extend(parse_rule(m, &item_at, false, p)),
            None => p.push((
                item_at,
                format!(
                    "a nested Choice rule must be an object, not {}",
                    describe(item)
                ),
            )),
        }
    }
    if rules.len() < items.len() {
        return None;
    }
    Some(match op {
        Op::Or => Rule::Or(rules),
        _ => Rule::And(rules),
    })
}

/// Whether `rule` matches in `scope`. A comparison on a value of another type is false; a
/// `Variable` that selects nothing is a `States.Runtime` error (except for `IsPresent`, which
/// is then false), and so is a `…Path` operand that selects nothing.
pub fn evaluate(rule: &Rule, scope: &Scope) -> Result<bool, StatesError> {
    match rule {
        Rule::And(rules) => {
            for r in rules {
                if !evaluate(r, scope)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Rule::Or(rules) => {
            for r in rules {
                if evaluate(r, scope)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Rule::Not(r) => Ok(!evaluate(r, scope)?),
        Rule::Is {
            variable,
            test: Test::Present,
            expected,
        } => Ok(select_opt(variable, scope)?.is_some() == *expected),
        Rule::Is {
            variable,
            test,
            expected,
        } => Ok(holds(*test, &variable_value(variable, scope)?) == *expected),
        Rule::Matches { variable, pattern } => Ok(variable_value(variable, scope)?
            .as_str()
            .is_some_and(|s| string_matches(pattern, s))),
        Rule::Compare {
            variable,
            kind,
            cmp,
            operand,
        } => {
            let left = variable_value(variable, scope)?;
            match operand {
                Operand::Literal(right) => Ok(compare(*kind, *cmp, &left, right)),
                Operand::Path(path) => {
                    let right = select_opt(path, scope)?.ok_or_else(|| {
                        StatesError::runtime(format!(
                            "Invalid path '{path}': the Choice rule's operand path selects \
                             nothing"
                        ))
                    })?;
                    Ok(compare(*kind, *cmp, &left, &right))
                }
            }
        }
    }
}

/// The first of `choices` whose rule matches in `scope`; `None` when none does (the Choice
/// state then takes its `Default`, or fails with `States.NoChoiceMatched`).
pub fn choose<'c>(choices: &'c [Choice], scope: &Scope) -> Result<Option<&'c Choice>, StatesError> {
    for c in choices {
        if evaluate(&c.rule, scope)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The value a rule's `Variable` selects; `States.Runtime` when it selects nothing.
fn variable_value(variable: &str, scope: &Scope) -> Result<Value, StatesError> {
    select_opt(variable, scope)?.ok_or_else(|| {
        StatesError::runtime(format!(
            "Invalid path '{variable}': the Choice rule's Variable selects nothing (test it with \
             IsPresent first, e.g. as the first rule of an And)"
        ))
    })
}

/// Whether `test` holds of `v` (a value that is present).
fn holds(test: Test, v: &Value) -> bool {
    match test {
        Test::Null => v.is_null(),
        Test::Present => true,
        Test::Numeric => v.is_number(),
        Test::String => v.is_string(),
        Test::Boolean => v.is_boolean(),
        Test::Timestamp => v.as_str().and_then(parse_timestamp).is_some(),
    }
}

/// `left cmp right` for values of type `kind`; false when either is not of that type.
fn compare(kind: Kind, cmp: Cmp, left: &Value, right: &Value) -> bool {
    let ord = match (kind, left, right) {
        (Kind::String, Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Kind::Numeric, Value::Number(a), Value::Number(b)) => numeric_cmp(a, b),
        (Kind::Boolean, Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Kind::Timestamp, Value::String(a), Value::String(b)) => {
            match (parse_timestamp(a), parse_timestamp(b)) {
                (Some(a), Some(b)) => Some(a.cmp(&b)),
                _ => None,
            }
        }
        _ => None,
    };
    ord.is_some_and(|ord| match cmp {
        Cmp::Equals => ord == Ordering::Equal,
        Cmp::LessThan => ord == Ordering::Less,
        Cmp::GreaterThan => ord == Ordering::Greater,
        Cmp::LessThanEquals => ord != Ordering::Greater,
        Cmp::GreaterThanEquals => ord != Ordering::Less,
    })
}

/// Two JSON numbers compared: exactly when both are integers, as `f64` otherwise.
fn numeric_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    let int = |n: &serde_json::Number| n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
    match (int(a), int(b)) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// An ASL timestamp: RFC 3339 with an uppercase `T` between date and time, and `Z` or a
/// numeric offset (`2016-03-14T01:59:00Z`, `2016-03-14T03:59:00.5+02:00`).
pub(super) fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    // The parser accepts any separator and a lowercase `z`; ASL does not.
    if s.as_bytes().get(10) != Some(&b'T') || s.ends_with('z') {
        return None;
    }
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// A `StringMatches` pattern, read: `*` a wildcard, `\x` the character `x`.
#[derive(Clone, Copy, PartialEq)]
enum Token {
    Star,
    Char(char),
}

/// Whether `text` matches the `StringMatches` `pattern`.
fn string_matches(pattern: &str, text: &str) -> bool {
    let mut tokens = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => Token::Star,
            '\\' => Token::Char(chars.next().unwrap_or('\\')),
            c => Token::Char(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    // Greedy with backtracking to the last star: linear in practice, O(n·m) at worst.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(p) {
            Some(Token::Star) => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(Token::Char(c)) if *c == text[t] => {
                p += 1;
                t += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    tokens[p..].iter().all(|k| *k == Token::Star)
}

/// How a problem message names a JSON value.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The rule `r` (a rule object without `Next`), parsed as a top-level rule.
    fn rule(r: Value) -> Rule {
        let mut r = r;
        r["Next"] = json!("Next");
        parse_choices(&json!([r]), "Choices")
            .unwrap()
            .remove(0)
            .rule
    }

    /// `r` evaluated on `input`.
    fn eval(r: Value, input: Value) -> Result<bool, StatesError> {
        let context = json!({"Execution": {"Name": "run-1"}});
        let mut vars = Map::new();
        vars.insert("limit".into(), json!(10));
        let scope = Scope {
            input: &input,
            context: &context,
            vars: &vars,
        };
        evaluate(&rule(r), &scope)
    }

    /// `op: operand` on `$.v`, with `v` as the input's `v`.
    fn cmp(op: &str, operand: Value, v: Value) -> bool {
        let mut r = json!({"Variable": "$.v"});
        r[op] = operand;
        eval(r, json!({ "v": v })).unwrap()
    }

    /// `op` comparing `$.v` with `$.w`.
    fn cmp_path(op: &str, v: Value, w: Value) -> bool {
        let mut r = json!({"Variable": "$.v"});
        r[op] = json!("$.w");
        eval(r, json!({ "v": v, "w": w })).unwrap()
    }

    /// The problems of `choices` parsed at `Choices`.
    fn problems(choices: Value) -> Vec<Problem> {
        parse_choices(&choices, "Choices").unwrap_err()
    }

    /// The single problem of `choices`; its path and message.
    fn problem(choices: Value) -> (String, String) {
        let p = problems(choices);
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn string_operators() {
        let cases = [
            ("StringEquals", "b", true),
            ("StringEquals", "c", false),
            ("StringLessThan", "c", true),
            ("StringLessThan", "b", false),
            ("StringLessThan", "a", false),
            ("StringGreaterThan", "a", true),
            ("StringGreaterThan", "b", false),
            ("StringLessThanEquals", "b", true),
            ("StringLessThanEquals", "c", true),
            ("StringLessThanEquals", "a", false),
            ("StringGreaterThanEquals", "b", true),
            ("StringGreaterThanEquals", "a", true),
            ("StringGreaterThanEquals", "c", false),
        ];
        for (op, operand, want) in cases {
            assert_eq!(cmp(op, json!(operand), json!("b")), want, "{op} {operand}");
            // A value of another type is never equal, less or greater.
            assert!(!cmp(op, json!(operand), json!(1)), "{op} on a number");
            assert!(!cmp(op, json!(operand), Value::Null), "{op} on null");
        }
        // Code point order: uppercase before lowercase.
        assert!(cmp("StringLessThan", json!("a"), json!("B")));
    }

    #[test]
    fn numeric_operators() {
        let cases = [
            ("NumericEquals", json!(5), true),
            ("NumericEquals", json!(5.0), true),
            ("NumericEquals", json!(6), false),
            ("NumericLessThan", json!(6), true),
            ("NumericLessThan", json!(5), false),
            ("NumericGreaterThan", json!(4.5), true),
            ("NumericGreaterThan", json!(5), false),
            ("NumericLessThanEquals", json!(5), true),
            ("NumericLessThanEquals", json!(4), false),
            ("NumericGreaterThanEquals", json!(5), true),
            ("NumericGreaterThanEquals", json!(6), false),
        ];
        for (op, operand, want) in cases {
            assert_eq!(cmp(op, operand.clone(), json!(5)), want, "{op} {operand}");
            assert!(!cmp(op, operand.clone(), json!("5")), "{op} on a string");
            assert!(!cmp(op, operand.clone(), json!(true)), "{op} on a bool");
        }
        // Integers compare exactly, beyond what an f64 holds.
        assert!(!cmp("NumericEquals", json!(u64::MAX), json!(u64::MAX - 1)));
        assert!(cmp("NumericLessThan", json!(-1), json!(-2)));
    }

    #[test]
    fn boolean_operators() {
        assert!(cmp("BooleanEquals", json!(true), json!(true)));
        assert!(!cmp("BooleanEquals", json!(false), json!(true)));
        assert!(cmp("BooleanEquals", json!(false), json!(false)));
        assert!(!cmp("BooleanEquals", json!(true), json!("true")));
        assert!(!cmp("BooleanEquals", json!(true), json!(1)));
        assert!(cmp_path("BooleanEqualsPath", json!(true), json!(true)));
        assert!(!cmp_path("BooleanEqualsPath", json!(true), json!(false)));
        assert!(!cmp_path("BooleanEqualsPath", json!(true), json!("true")));
    }

    #[test]
    fn timestamp_operators() {
        let t = json!("2016-03-14T01:59:00Z");
        let cases = [
            // The same instant written with an offset.
            ("TimestampEquals", "2016-03-14T03:59:00+02:00", true),
            ("TimestampEquals", "2016-03-13T20:59:00-05:00", true),
            ("TimestampEquals", "2016-03-14T01:59:00.000Z", true),
            ("TimestampEquals", "2016-03-14T01:59:01Z", false),
            ("TimestampLessThan", "2016-03-14T02:00:00Z", true),
            ("TimestampLessThan", "2016-03-14T02:59:00+01:00", false),
            ("TimestampGreaterThan", "2016-03-14T01:58:59.999Z", true),
            ("TimestampGreaterThan", "2016-03-14T01:00:00-01:00", false),
            ("TimestampLessThanEquals", "2016-03-14T03:59:00+02:00", true),
            ("TimestampLessThanEquals", "2016-03-14T01:58:00Z", false),
            ("TimestampGreaterThanEquals", "2016-03-14T01:59:00Z", true),
            (
                "TimestampGreaterThanEquals",
                "2016-03-14T04:00:00+02:00",
                false,
            ),
        ];
        for (op, operand, want) in cases {
            assert_eq!(cmp(op, json!(operand), t.clone()), want, "{op} {operand}");
            // Not timestamps: a lowercase `t`/`z`, a space, a date alone, a number.
            for bad in [
                json!("2016-03-14t01:59:00z"),
                json!("2016-03-14 01:59:00Z"),
                json!("2016-03-14"),
                json!("2016-03-14T01:59:00"),
                json!(1457920740),
            ] {
                assert!(!cmp(op, json!(operand), bad.clone()), "{op} on {bad}");
            }
        }
    }

    #[test]
    fn path_operators() {
        let cases = [
            ("StringEqualsPath", json!("a"), json!("a"), json!("b")),
            ("StringLessThanPath", json!("a"), json!("b"), json!("a")),
            ("StringGreaterThanPath", json!("b"), json!("a"), json!("b")),
            (
                "StringLessThanEqualsPath",
                json!("a"),
                json!("a"),
                json!("0"),
            ),
            (
                "StringGreaterThanEqualsPath",
                json!("a"),
                json!("a"),
                json!("b"),
            ),
            ("NumericEqualsPath", json!(1), json!(1.0), json!(2)),
            ("NumericLessThanPath", json!(1), json!(2), json!(1)),
            ("NumericGreaterThanPath", json!(2), json!(1), json!(2)),
            ("NumericLessThanEqualsPath", json!(1), json!(1), json!(0)),
            ("NumericGreaterThanEqualsPath", json!(1), json!(1), json!(2)),
            ("BooleanEqualsPath", json!(true), json!(true), json!(false)),
            (
                "TimestampEqualsPath",
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T01:00:00+01:00"),
                json!("2020-01-01T00:00:01Z"),
            ),
            (
                "TimestampLessThanPath",
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T00:00:01Z"),
                json!("2020-01-01T00:00:00Z"),
            ),
            (
                "TimestampGreaterThanPath",
                json!("2020-01-01T00:00:01Z"),
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T01:00:01+01:00"),
            ),
            (
                "TimestampLessThanEqualsPath",
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T00:00:00Z"),
                json!("2019-12-31T23:59:59Z"),
            ),
            (
                "TimestampGreaterThanEqualsPath",
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T00:00:00Z"),
                json!("2020-01-01T00:00:01Z"),
            ),
        ];
        for (op, v, yes, no) in cases {
            assert!(cmp_path(op, v.clone(), yes), "{op} true case");
            assert!(!cmp_path(op, v.clone(), no), "{op} false case");
            // The other value of the wrong type: false, not an error.
            assert!(
                !cmp_path(op, v.clone(), json!({"a": 1})),
                "{op} on an object"
            );
            // The operand path selects nothing: States.Runtime.
            let mut r = json!({"Variable": "$.v"});
            r[op] = json!("$.missing");
            let err = eval(r, json!({ "v": v })).unwrap_err();
            assert_eq!(err.error, "States.Runtime", "{op}");
            assert!(err.cause.contains("$.missing"), "{}", err.cause);
        }
    }

    #[test]
    fn paths_read_context_and_variables() {
        let r = json!({"Variable": "$$.Execution.Name", "StringEquals": "run-1"});
        assert!(eval(r, json!({})).unwrap());
        let r = json!({"Variable": "$.n", "NumericLessThanPath": "$limit"});
        assert!(eval(r.clone(), json!({"n": 9})).unwrap());
        assert!(!eval(r, json!({"n": 10})).unwrap());
    }

    #[test]
    fn missing_variable_is_a_runtime_error_except_for_is_present() {
        for (op, operand) in [
            ("StringEquals", json!("a")),
            ("NumericEquals", json!(1)),
            ("BooleanEquals", json!(true)),
            ("TimestampEquals", json!("2020-01-01T00:00:00Z")),
            ("StringMatches", json!("*")),
            ("StringEqualsPath", json!("$.w")),
            ("IsNull", json!(true)),
            ("IsNull", json!(false)),
            ("IsString", json!(false)),
            ("IsNumeric", json!(true)),
            ("IsBoolean", json!(true)),
            ("IsTimestamp", json!(false)),
        ] {
            let mut r = json!({"Variable": "$.v"});
            r[op] = operand;
            let err = eval(r, json!({"w": "a"})).unwrap_err();
            assert_eq!(err.error, "States.Runtime", "{op}");
            assert!(err.cause.contains("$.v"), "{}", err.cause);
        }
        let present = |want: bool, input: Value| {
            eval(json!({"Variable": "$.v", "IsPresent": want}), input).unwrap()
        };
        assert!(!present(true, json!({})));
        assert!(present(false, json!({})));
        assert!(present(true, json!({"v": null})));
        assert!(!present(false, json!({"v": 0})));
        // The guard idiom: And stops at the first false rule.
        let guarded = json!({"And": [
            {"Variable": "$.v", "IsPresent": true},
            {"Variable": "$.v", "NumericGreaterThan": 3}
        ]});
        assert!(!eval(guarded.clone(), json!({})).unwrap());
        assert!(eval(guarded, json!({"v": 4})).unwrap());
    }

    #[test]
    fn type_tests() {
        let is = |op: &str, want: bool, v: Value| {
            let mut r = json!({"Variable": "$.v"});
            r[op] = json!(want);
            eval(r, json!({ "v": v })).unwrap()
        };
        let values = [
            json!(null),
            json!(1.5),
            json!("x"),
            json!(false),
            json!("2016-03-14T01:59:00+01:00"),
            json!([1]),
            json!({}),
        ];
        // Which of `values` each test holds of.
        let truth = [
            ("IsNull", [true, false, false, false, false, false, false]),
            (
                "IsNumeric",
                [false, true, false, false, false, false, false],
            ),
            ("IsString", [false, false, true, false, true, false, false]),
            (
                "IsBoolean",
                [false, false, false, true, false, false, false],
            ),
            (
                "IsTimestamp",
                [false, false, false, false, true, false, false],
            ),
            ("IsPresent", [true; 7]),
        ];
        for (op, holds) in truth {
            for (v, h) in values.iter().zip(holds) {
                assert_eq!(is(op, true, v.clone()), h, "{op}: true on {v}");
                assert_eq!(is(op, false, v.clone()), !h, "{op}: false on {v}");
            }
        }
        assert!(!is("IsTimestamp", true, json!("2016-03-14T01:59:00z")));
        assert!(!is("IsTimestamp", true, json!("yesterday")));
    }

    #[test]
    fn string_matches() {
        let m = |pattern: &str, v: &str| cmp("StringMatches", json!(pattern), json!(v));
        assert!(m("log-*.txt", "log-2024-01-01.txt"));
        assert!(m("log-*.txt", "log-.txt"));
        assert!(!m("log-*.txt", "log-1.csv"));
        assert!(!m("log-*.txt", "xlog-1.txt"));
        assert!(!m("log-*.txt", "log-1.txt.gz"));
        assert!(m("foo*.log", "foo23.log"));
        assert!(m("*.log", "zebra.log"));
        assert!(m("foo*.*", "foobar.zebra"));
        assert!(m("*", ""));
        assert!(m("a**b*c", "aXbYbZc"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(m("?[x]", "?[x]"), "only * is special");
        assert!(m("héllo*", "héllo wörld"));
        // `\*` (JSON "\\*") is a literal asterisk, `\\` (JSON "\\\\") a literal backslash.
        assert!(m(r"a\*b", "a*b"));
        assert!(!m(r"a\*b", "axb"));
        assert!(m(r"a\*b*", "a*bcd"));
        assert!(m(r"C:\\logs\\*", r"C:\logs\today"));
        assert!(!m(r"C:\\logs\\*", r"C:logs\today"));
        assert!(m(r"\\\*", r"\*"));
        // The same escapes written as JSON source.
        let r: Value =
            serde_json::from_str(r#"{"Variable": "$.v", "StringMatches": "log-\\*.txt"}"#).unwrap();
        assert!(eval(r.clone(), json!({"v": "log-*.txt"})).unwrap());
        assert!(!eval(r, json!({"v": "log-1.txt"})).unwrap());
        // Not a string: false.
        assert!(!cmp("StringMatches", json!("*"), json!(1)));
        assert!(!cmp("StringMatches", json!("*"), json!(null)));
    }

    #[test]
    fn and_or_not() {
        let r = json!({"Or": [
            {"Not": {"Variable": "$.kind", "StringEquals": "public"}},
            {"And": [
                {"Variable": "$.value", "NumericGreaterThanEquals": 20},
                {"Variable": "$.value", "NumericLessThan": 30},
                {"Not": {"Variable": "$.muted", "BooleanEquals": true}}
            ]}
        ]});
        assert!(eval(
            r.clone(),
            json!({"kind": "private", "value": 0, "muted": true})
        )
        .unwrap());
        assert!(eval(
            r.clone(),
            json!({"kind": "public", "value": 25, "muted": false})
        )
        .unwrap());
        assert!(!eval(
            r.clone(),
            json!({"kind": "public", "value": 30, "muted": false})
        )
        .unwrap());
        assert!(!eval(
            r.clone(),
            json!({"kind": "public", "value": 25, "muted": true})
        )
        .unwrap());
        // Or stops at the first true rule: the missing `$.value` is never read.
        assert!(eval(r, json!({"kind": "private"})).unwrap());
        assert_eq!(
            rule(json!({"Not": {"Not": {"Variable": "$.x", "IsNull": true}}})),
            Rule::Not(Box::new(Rule::Not(Box::new(Rule::Is {
                variable: "$.x".into(),
                test: Test::Null,
                expected: true
            }))))
        );
    }

    #[test]
    fn choose_takes_the_first_match() {
        let choices = parse_choices(
            &json!([
                {"Variable": "$.n", "NumericGreaterThan": 10, "Next": "Big"},
                {"Variable": "$.n", "NumericGreaterThan": 5, "Next": "Medium",
                 "Assign": {"size.$": "$.n"}},
                {"Variable": "$.n", "NumericGreaterThan": 0, "Next": "Small"}
            ]),
            "Choices",
        )
        .unwrap();
        assert_eq!(choices[1].assign, Some(json!({"size.$": "$.n"})));
        assert_eq!(choices[0].assign, None);
        let pick = |n: i64| {
            let input = json!({ "n": n });
            let (context, vars) = (json!({}), Map::new());
            let scope = Scope {
                input: &input,
                context: &context,
                vars: &vars,
            };
            choose(&choices, &scope).unwrap().map(|c| c.next.clone())
        };
        assert_eq!(pick(20).as_deref(), Some("Big"));
        assert_eq!(pick(7).as_deref(), Some("Medium"));
        assert_eq!(pick(1).as_deref(), Some("Small"));
        assert_eq!(pick(0), None);
    }

    #[test]
    fn parse_builds_rules() {
        assert_eq!(
            rule(json!({"Variable": "$.a", "NumericLessThanEqualsPath": "$.b"})),
            Rule::Compare {
                variable: "$.a".into(),
                kind: Kind::Numeric,
                cmp: Cmp::LessThanEquals,
                operand: Operand::Path("$.b".into())
            }
        );
        assert_eq!(
            rule(json!({"Variable": "$.a", "StringMatches": "x*", "Comment": "prefix"})),
            Rule::Matches {
                variable: "$.a".into(),
                pattern: "x*".into()
            }
        );
        assert_eq!(operator_names().len(), 16 * 2 + 1 + 6 + 3);
        for name in operator_names() {
            assert!(operator(&name).is_some(), "{name}");
        }
        for bad in [
            "BooleanLessThan",
            "StringMatchesPath",
            "IsNullPath",
            "Equals",
            "AndPath",
        ] {
            assert!(operator(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parse_choices_shape() {
        let (at, msg) = problem(json!({"Variable": "$.a"}));
        assert_eq!(at, "Choices");
        assert!(msg.contains("non-empty array"), "{msg}");
        let (at, msg) = problem(json!([]));
        assert_eq!(at, "Choices");
        assert!(msg.contains("empty"), "{msg}");
        let (at, msg) = problem(json!(["$.a"]));
        assert_eq!(at, "Choices[0]");
        assert!(msg.contains("object"), "{msg}");
    }

    #[test]
    fn parse_next_and_assign() {
        let (at, msg) = problem(json!([{"Variable": "$.a", "IsNull": true}]));
        assert_eq!(at, "Choices[0]");
        assert!(msg.contains("needs `Next`"), "{msg}");
        let (at, _) = problem(json!([{"Variable": "$.a", "IsNull": true, "Next": 3}]));
        assert_eq!(at, "Choices[0].Next");
        let (at, msg) =
            problem(json!([{"Variable": "$.a", "IsNull": true, "Next": "X", "Assign": [1]}]));
        assert_eq!(at, "Choices[0].Assign");
        assert!(msg.contains("object"), "{msg}");
        // Nested rules have neither Next nor Assign.
        let (at, msg) = problem(json!([{"Next": "X", "And": [
            {"Variable": "$.a", "IsNull": true, "Next": "Y"}
        ]}]));
        assert_eq!(at, "Choices[0].And[0].Next");
        assert!(msg.contains("top-level"), "{msg}");
        let (at, _) = problem(json!([{"Next": "X", "Not":
            {"Variable": "$.a", "IsNull": true, "Assign": {}}
        }]));
        assert_eq!(at, "Choices[0].Not.Assign");
    }

    #[test]
    fn parse_operator_count() {
        let (at, msg) = problem(json!([{"Variable": "$.a", "Next": "X"}]));
        assert_eq!(at, "Choices[0]");
        assert!(msg.contains("needs one operator"), "{msg}");
        let (at, msg) = problem(json!([
            {"Variable": "$.a", "StringEquals": "x", "IsPresent": true, "Next": "X"}
        ]));
        assert_eq!(at, "Choices[0]");
        assert!(
            msg.contains("`IsPresent`") && msg.contains("`StringEquals`"),
            "{msg}"
        );
        let (at, _) = problem(
            json!([{"Next": "X", "Not": {"Variable": "$.a", "IsNull": true},
            "And": [{"Variable": "$.a", "IsNull": true}]}]),
        );
        assert_eq!(at, "Choices[0]");
    }

    #[test]
    fn parse_variable() {
        let (at, msg) = problem(json!([{"StringEquals": "x", "Next": "X"}]));
        assert_eq!(at, "Choices[0]");
        assert!(msg.contains("needs a `Variable`"), "{msg}");
        let (at, _) = problem(json!([{"Variable": 5, "StringEquals": "x", "Next": "X"}]));
        assert_eq!(at, "Choices[0].Variable");
        let (at, _) = problem(json!([{"Variable": "foo", "StringEquals": "x", "Next": "X"}]));
        assert_eq!(at, "Choices[0].Variable");
        let (at, msg) = problem(json!([{"Variable": "$.a", "Next": "X",
            "And": [{"Variable": "$.a", "IsNull": true}]}]));
        assert_eq!(at, "Choices[0].Variable");
        assert!(msg.contains("takes no `Variable`"), "{msg}");
    }

    #[test]
    fn parse_operand_types() {
        let cases = [
            ("StringEquals", json!(5), "a string"),
            ("StringLessThan", json!(null), "a string"),
            ("NumericEquals", json!("5"), "a number"),
            ("NumericGreaterThanEquals", json!(true), "a number"),
            ("BooleanEquals", json!("true"), "true or false"),
            (
                "TimestampEquals",
                json!("2016-03-14t01:59:00z"),
                "uppercase `T`",
            ),
            ("TimestampLessThan", json!("2016-03-14"), "RFC 3339"),
            ("TimestampGreaterThan", json!(1457920740), "RFC 3339"),
            ("IsPresent", json!("yes"), "true or false"),
            ("IsNull", json!(1), "true or false"),
            ("StringMatches", json!(1), "string pattern"),
            ("StringMatches", json!(r"a\b"), "backslash"),
            ("StringMatches", json!("a\\"), "backslash"),
            ("StringEqualsPath", json!(5), "a path"),
            ("TimestampEqualsPath", json!("nope"), "path"),
        ];
        for (op, operand, needle) in cases {
            let mut r = json!({"Variable": "$.a", "Next": "X"});
            r[op] = operand.clone();
            let (at, msg) = problem(json!([r]));
            assert_eq!(at, format!("Choices[0].{op}"), "{op} {operand}");
            assert!(msg.contains(needle), "{op} {operand}: {msg}");
        }
        // The message points at the operator for the value's type.
        let (_, msg) = problem(json!([{"Variable": "$.a", "Next": "X", "StringEquals": 5}]));
        assert!(msg.contains("`NumericEquals`"), "{msg}");
        let (_, msg) = problem(json!([{"Variable": "$.a", "Next": "X",
            "StringLessThan": ["2016-03-14T01:59:00Z"]}]));
        assert!(!msg.contains("use"), "{msg}");
        let (_, msg) = problem(json!([{"Variable": "$.a", "Next": "X",
            "NumericLessThan": "2016-03-14T01:59:00Z"}]));
        assert!(msg.contains("`TimestampLessThan`"), "{msg}");
    }

    #[test]
    fn parse_combinators() {
        let (at, msg) =
            problem(json!([{"Next": "X", "Not": [{"Variable": "$.a", "IsNull": true}]}]));
        assert_eq!(at, "Choices[0].Not");
        assert!(msg.contains("one rule object"), "{msg}");
        let (at, _) = problem(json!([{"Next": "X", "Not": "$.a"}]));
        assert_eq!(at, "Choices[0].Not");
        let (at, msg) = problem(json!([{"Next": "X", "And": []}]));
        assert_eq!(at, "Choices[0].And");
        assert!(msg.contains("empty array"), "{msg}");
        let (at, _) = problem(json!([{"Next": "X", "Or": {"Variable": "$.a", "IsNull": true}}]));
        assert_eq!(at, "Choices[0].Or");
        let (at, _) =
            problem(json!([{"Next": "X", "Or": [{"Variable": "$.a", "IsNull": true}, 3]}]));
        assert_eq!(at, "Choices[0].Or[1]");
    }

    #[test]
    fn parse_unknown_fields() {
        let (at, msg) = problem(
            json!([{"Variable": "$.a", "stringEquals": "x", "IsNull": true,
            "Next": "X"}]),
        );
        assert_eq!(at, "Choices[0].stringEquals");
        assert!(msg.contains("did you mean `StringEquals`?"), "{msg}");
        let (at, msg) = problem(
            json!([{"Variable": "$.a", "NumericEqual": 1, "IsNull": true,
            "Next": "X"}]),
        );
        assert_eq!(at, "Choices[0].NumericEqual");
        assert!(msg.contains("did you mean `NumericEquals`?"), "{msg}");
        let (at, msg) = problem(json!([{"Variable": "$.a", "IsNull": true, "Next": "X",
            "Weight": 3}]));
        assert_eq!(at, "Choices[0].Weight");
        assert!(msg.contains("unknown field `Weight`"), "{msg}");
        let (at, _) =
            problem(json!([{"Variable": "$.a", "IsNull": true, "Next": "X", "Comment": 1}]));
        assert_eq!(at, "Choices[0].Comment");
    }

    #[test]
    fn parse_reports_every_problem_with_its_path() {
        let p = problems(json!([
            {"Variable": "$.a", "StringEquals": "x", "Next": "A"},
            {"Variable": "$.a", "StringEquals": "x", "Next": "B"},
            {"Next": "C", "And": [
                {"Variable": "$.a", "StringEquals": 1},
                {"Or": [{"Variable": "$.b", "NumericLessThan": "1"}, {"Not": {"Next": "D"}}]}
            ]}
        ]));
        let paths: Vec<&str> = p.iter().map(|(at, _)| at.as_str()).collect();
        assert_eq!(
            paths,
            [
                "Choices[2].And[0].StringEquals",
                "Choices[2].And[1].Or[0].NumericLessThan",
                "Choices[2].And[1].Or[1].Not.Next",
                "Choices[2].And[1].Or[1].Not",
            ]
        );
    }
}
