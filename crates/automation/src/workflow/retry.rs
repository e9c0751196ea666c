//! Retry and Catch (ASL): parsing a state's `Retry` and `Catch` arrays with path-named
//! problems, matching error names against `ErrorEquals`, and computing retry delays.
//!
//! * Error names match exactly, with the wildcards Step Functions defines: `States.ALL` matches
//!   every error but the terminal ones; `States.TaskFailed` every error but the timeouts and the
//!   terminal ones; `States.Timeout` also matches `States.HeartbeatTimeout` (a heartbeat timeout
//!   is a timeout). `States.Runtime` is terminal: nothing retries or catches it.
//!   `States.DataLimitExceeded` is terminal for the wildcards, but may be named.
//! * The first retrier whose `ErrorEquals` matches an error is the one used; once exhausted,
//!   later retriers are not tried and the error goes on to `Catch`. Each retrier counts its own
//!   attempts.
//! * The delay before retry `n` (from 0) is `IntervalSeconds × BackoffRate^n`, capped at
//!   `MaxDelaySeconds`; with `"JitterStrategy": "FULL"` a random fraction of it.

use super::choice::describe;
use super::names;
use super::paths::check_reference_path;
use crate::suggest::nearest;
use crate::Problem;
use serde_json::{Map, Value};

/// The largest `IntervalSeconds` and `MaxAttempts` (as Step Functions).
pub const MAX_RETRY_FIELD: u64 = 99_999_999;

/// The largest `MaxDelaySeconds`: a year and a day (as Step Functions).
pub const MAX_DELAY_SECONDS: u64 = 31_622_400;

/// A retrier's `JitterStrategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Jitter {
    /// `"NONE"` (the default): the computed delay.
    #[default]
    None,
    /// `"FULL"`: a uniformly random delay between 0 and the computed one.
    Full,
}

/// One element of a `Retry` array.
#[derive(Clone, Debug, PartialEq)]
pub struct Retrier {
    /// `ErrorEquals`: the error names it retries.
    pub error_equals: Vec<String>,
    /// `IntervalSeconds` (default 1): the delay before the first retry.
    pub interval_seconds: f64,
    /// `MaxAttempts` (default 3): how many retries at most; 0 never retries.
    pub max_attempts: u32,
    /// `BackoffRate` (default 2.0, at least 1.0): the factor the delay grows by per retry.
    pub backoff_rate: f64,
    /// `MaxDelaySeconds`: the cap on the delay, if any.
    pub max_delay_seconds: Option<f64>,
    /// `JitterStrategy` (default `NONE`).
    pub jitter: Jitter,
}

/// One element of a `Catch` array.
#[derive(Clone, Debug, PartialEq)]
pub struct Catcher {
    /// `ErrorEquals`: the error names it catches.
    pub error_equals: Vec<String>,
    /// `Next`: the state to go to.
    pub next: String,
    /// `None`: `"ResultPath": null` (the error is discarded); absent in the definition: `$`.
    pub result_path: Option<String>,
    /// `Assign`: the variables to set, as written.
    pub assign: Option<Value>,
}

/// The error names a state can report that start with `States.` (the others are reserved).
const PREDEFINED: [&str; 15] = [
    names::ALL,
    names::HEARTBEAT_TIMEOUT,
    names::TIMEOUT,
    names::TASK_FAILED,
    names::PERMISSIONS,
    names::RESULT_PATH_MATCH_FAILURE,
    names::PARAMETER_PATH_FAILURE,
    names::BRANCH_FAILED,
    names::NO_CHOICE_MATCHED,
    names::INTRINSIC_FAILURE,
    names::EXCEED_TOLERATED_FAILURE_THRESHOLD,
    names::ITEM_READER_FAILED,
    names::RESULT_WRITER_FAILED,
    names::DATA_LIMIT_EXCEEDED,
    names::RUNTIME,
];

/// Parses a state's `Retry` array (`at` names it in problems, e.g. `States.Call.Retry`), with
/// the defaults filled in. Every problem is reported with its path.
pub fn parse_retry(v: &Value, at: &str) -> Result<Vec<Retrier>, Vec<Problem>> {
    let example = "[{\"ErrorEquals\": [\"States.Timeout\"], \"MaxAttempts\": 3}]";
    parse_array(v, at, "Retry", example, parse_retrier)
}

/// Parses a state's `Catch` array (`at` names it in problems, e.g. `States.Call.Catch`).
/// Every problem is reported with its path.
pub fn parse_catch(v: &Value, at: &str) -> Result<Vec<Catcher>, Vec<Problem>> {
    let example = "[{\"ErrorEquals\": [\"States.ALL\"], \"Next\": \"Recover\"}]";
    parse_array(v, at, "Catch", example, parse_catcher)
}

/// A parser of one array element: the element, its path, whether it is the last one.
type ParseOne<T> = fn(&Map<String, Value>, &str, bool, &mut Vec<Problem>) -> Option<T>;

/// The elements of the `field` array `v`, each an object parsed by `one`.
fn parse_array<T>(
    v: &Value,
    at: &str,
    field: &str,
    example: &str,
    one: ParseOne<T>,
) -> Result<Vec<T>, Vec<Problem>> {
    let Some(items) = v.as_array() else {
        return Err(vec![(
            at.to_string(),
            format!(
                "`{field}` must be an array such as {example}, not {}",
                describe(v)
            ),
        )]);
    };
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_at = format!("{at}[{i}]");
        match item.as_object() {
            Some(obj) => out.extend(one(obj, &item_at, i + 1 == items.len(), &mut problems)),
            None => problems.push((
                item_at,
                format!(
                    "each element of `{field}` must be an object such as {}, not {}",
                    &example[1..example.len() - 1],
                    describe(item)
                ),
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Problems for the fields of `obj` (at `at`, a `what`) that are not in `known`.
fn unknown_fields(
    obj: &Map<String, Value>,
    at: &str,
    what: &str,
    known: &[&str],
    p: &mut Vec<Problem>,
) {
    for k in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        let hint = match nearest(k, known) {
            Some(n) => format!("did you mean `{n}`?"),
            None => format!("expected one of `{}`", known.join("`, `")),
        };
        p.push((
            format!("{at}.{k}"),
            format!("unknown field `{k}` in a {what}: {hint}"),
        ));
    }
}

/// One retrier, with its defaults.
fn parse_retrier(
    obj: &Map<String, Value>,
    at: &str,
    last: bool,
    p: &mut Vec<Problem>,
) -> Option<Retrier> {
    const KNOWN: [&str; 7] = [
        "ErrorEquals",
        "IntervalSeconds",
        "MaxAttempts",
        "BackoffRate",
        "MaxDelaySeconds",
        "JitterStrategy",
        "Comment",
    ];
    unknown_fields(obj, at, "retrier", &KNOWN, p);
    check_comment(obj, at, p);
    let error_equals = parse_error_equals(obj, at, last, "retrier", p);
    let interval = whole(obj, "IntervalSeconds", at, 1, MAX_RETRY_FIELD, p).unwrap_or(Some(1));
    let max_attempts = whole(obj, "MaxAttempts", at, 0, MAX_RETRY_FIELD, p).unwrap_or(Some(3));
    let max_delay = whole(obj, "MaxDelaySeconds", at, 1, MAX_DELAY_SECONDS, p);
    let backoff_rate = match obj.get("BackoffRate") {
        None => Some(2.0),
        Some(v) => match v.as_f64() {
            Some(rate) if rate.is_finite() && rate >= 1.0 => Some(rate),
            _ => {
                p.push((
                    format!("{at}.BackoffRate"),
                    format!(
                        "`BackoffRate` must be a number of at least 1.0 (the factor the delay \
                         grows by per retry; 1.0 keeps it constant), not {}",
                        describe(v)
                    ),
                ));
                None
            }
        },
    };
    let jitter = match obj.get("JitterStrategy") {
        None => Some(Jitter::None),
        Some(Value::String(s)) if s == "NONE" => Some(Jitter::None),
        Some(Value::String(s)) if s == "FULL" => Some(Jitter::Full),
        Some(v) => {
            p.push((
                format!("{at}.JitterStrategy"),
                format!(
                    "`JitterStrategy` must be \"FULL\" or \"NONE\", not {}",
                    describe(v)
                ),
            ));
            None
        }
    };
    Some(Retrier {
        error_equals: error_equals?,
        interval_seconds: interval? as f64,
        max_attempts: u32::try_from(max_attempts?).ok()?,
        backoff_rate: backoff_rate?,
        max_delay_seconds: match max_delay {
            None => None,
            Some(d) => Some(d? as f64),
        },
        jitter: jitter?,
    })
}

/// One catcher.
fn parse_catcher(
    obj: &Map<String, Value>,
    at: &str,
    last: bool,
    p: &mut Vec<Problem>,
) -> Option<Catcher> {
    const KNOWN: [&str; 5] = ["ErrorEquals", "Next", "ResultPath", "Assign", "Comment"];
    unknown_fields(obj, at, "catcher", &KNOWN, p);
    check_comment(obj, at, p);
    let error_equals = parse_error_equals(obj, at, last, "catcher", p);
    let next = match obj.get("Next") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(v) => {
            p.push((
                format!("{at}.Next"),
                format!("`Next` must be the name of a state, not {}", describe(v)),
            ));
            None
        }
        None => {
            p.push((
                at.to_string(),
                "a catcher needs `Next`: the state to go to when it catches an error, e.g. \
                 \"Next\": \"Recover\""
                    .to_string(),
            ));
            None
        }
    };
    let result_path = match obj.get("ResultPath") {
        None => Some(Some("$".to_string())),
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => match check_reference_path(s) {
            Ok(()) => Some(Some(s.clone())),
            Err(e) => {
                p.push((
                    format!("{at}.ResultPath"),
                    format!("`ResultPath` is not valid: {e}"),
                ));
                None
            }
        },
        Some(v) => {
            p.push((
                format!("{at}.ResultPath"),
                format!(
                    "`ResultPath` must be a reference path such as \"$.error\" (where the error \
                     output goes in the input), or null to discard it; not {}",
                    describe(v)
                ),
            ));
            None
        }
    };
    let assign = match obj.get("Assign") {
        None => None,
        Some(a @ Value::Object(_)) => Some(a.clone()),
        Some(v) => {
            p.push((
                format!("{at}.Assign"),
                format!(
                    "`Assign` must be an object of variable names to values, e.g. \
                     {{\"failed\": true}}, not {}",
                    describe(v)
                ),
            ));
            None
        }
    };
    Some(Catcher {
        error_equals: error_equals?,
        next: next?,
        result_path: result_path?,
        assign,
    })
}

/// A problem if `Comment` is there and not a string.
fn check_comment(obj: &Map<String, Value>, at: &str, p: &mut Vec<Problem>) {
    if let Some(v) = obj.get("Comment").filter(|v| !v.is_string()) {
        p.push((
            format!("{at}.Comment"),
            format!("`Comment` must be a string, not {}", describe(v)),
        ));
    }
}

/// The optional whole-number field `field` of `obj`, in `min..=max`: `None` when absent,
/// `Some(None)` when invalid (with a problem).
fn whole(
    obj: &Map<String, Value>,
    field: &str,
    at: &str,
    min: u64,
    max: u64,
    p: &mut Vec<Problem>,
) -> Option<Option<u64>> {
    let v = obj.get(field)?;
    let n = v
        .as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= max as f64)
                .map(|f| f as u64)
        })
        .filter(|n| (min..=max).contains(n));
    if n.is_none() {
        let what = if min == 0 {
            "a whole number"
        } else {
            "a positive whole number"
        };
        p.push((
            format!("{at}.{field}"),
            format!(
                "`{field}` must be {what} from {min} to {max}, not {}",
                describe(v)
            ),
        ));
    }
    Some(n)
}

/// The `ErrorEquals` of a retrier or catcher (`what`) at `at`, the `last` of its array.
fn parse_error_equals(
    obj: &Map<String, Value>,
    at: &str,
    last: bool,
    what: &str,
    p: &mut Vec<Problem>,
) -> Option<Vec<String>> {
    let field_at = format!("{at}.ErrorEquals");
    let items = match obj.get("ErrorEquals") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        found => {
            let (path, msg) = match found {
                None => (at.to_string(), format!("a {what} needs `ErrorEquals`")),
                Some(v) => (
                    field_at,
                    format!("`ErrorEquals` must not be {}", describe(v)),
                ),
            };
            p.push((
                path,
                format!(
                    "{msg}: a non-empty array of error names, e.g. [\"States.Timeout\"], or \
                     [\"States.ALL\"] for any error"
                ),
            ));
            return None;
        }
    };
    let before = p.len();
    let mut found = Vec::new();
    for (j, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(name) => match check_error_name(name) {
                Ok(()) => found.push(name.to_string()),
                Err(msg) => p.push((format!("{field_at}[{j}]"), msg)),
            },
            None => p.push((
                format!("{field_at}[{j}]"),
                format!("an error name must be a string, not {}", describe(item)),
            )),
        }
    }
    if found.iter().any(|n| n == names::ALL) {
        if items.len() > 1 {
            p.push((
                field_at.clone(),
                "`States.ALL` matches every error, so it must be alone in its `ErrorEquals`: \
                 remove the other names, or give them a retrier or catcher of their own before \
                 this one"
                    .to_string(),
            ));
        }
        if !last {
            p.push((
                field_at,
                format!(
                    "`States.ALL` must be in the last {what}: the {what}s after it could never \
                     be used; move this {what} to the end"
                ),
            ));
        }
    }
    (p.len() == before).then_some(found)
}

/// Whether `name` may appear in `ErrorEquals`: any name, but a `States.` one must be known.
fn check_error_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an error name must not be empty".to_string());
    }
    if name == names::RUNTIME {
        return Err(
            "`States.Runtime` is terminal: it is never retried or caught, so it has no place \
             in `ErrorEquals`; remove it"
                .to_string(),
        );
    }
    if !name.starts_with("States.") || PREDEFINED.contains(&name) {
        return Ok(());
    }
    Err(match nearest(name, &PREDEFINED) {
        Some(n) => format!("unknown error name `{name}`: did you mean `{n}`?"),
        None => format!(
            "unknown error name `{name}`: names starting with `States.` are reserved; use one \
             of `{}`, or a name of your own without that prefix",
            PREDEFINED.join("`, `")
        ),
    })
}

/// Whether the error named `error` matches `error_equals` (see the module doc): an exact
/// name, or `States.ALL`, `States.TaskFailed`, `States.Timeout` as wildcards.
/// `States.Runtime` matches nothing.
pub fn matches(error_equals: &[String], error: &str) -> bool {
    if error == names::RUNTIME {
        return false;
    }
    let terminal = error == names::DATA_LIMIT_EXCEEDED;
    let timeout = error == names::TIMEOUT || error == names::HEARTBEAT_TIMEOUT;
    error_equals.iter().any(|name| {
        name == error
            || status_class(name, error)
            || match name.as_str() {
                names::ALL => !terminal,
                names::TASK_FAILED => !terminal && !timeout,
                names::TIMEOUT => timeout,
                _ => false,
            }
    })
}

/// `Http.5xx` (or `Http.4xx`, …) names every `Http.<status>` error of that class, so a
/// retrier need not list each status a `portcullis:http` task can fail with.
fn status_class(name: &str, error: &str) -> bool {
    let (Some(class), Some(status)) = (name.strip_prefix("Http."), error.strip_prefix("Http."))
    else {
        return false;
    };
    let c = class.as_bytes();
    c.len() == 3
        && c[0].is_ascii_digit()
        && &c[1..] == b"xx"
        && status.len() == 3
        && status.starts_with(c[0] as char)
        && status.bytes().all(|b| b.is_ascii_digit())
}

/// The delay in milliseconds before retrying after `error`, or `None` when no retrier matches
/// it or the first one that does has no attempts left (then the caller tries `Catch`).
///
/// `attempts` holds the retries made so far per retrier (it is resized to `retriers.len()`);
/// the matching retrier's count is incremented. The delay is `IntervalSeconds ×
/// BackoffRate^(retries before this one)`, capped at `MaxDelaySeconds`, and with `FULL` jitter
/// multiplied by `rand01` (in `[0, 1)`, given by the caller).
pub fn next_retry(
    retriers: &[Retrier],
    attempts: &mut Vec<u32>,
    error: &str,
    rand01: f64,
) -> Option<u64> {
    attempts.resize(retriers.len(), 0);
    let i = retriers
        .iter()
        .position(|r| matches(&r.error_equals, error))?;
    let r = &retriers[i];
    let done = attempts[i];
    if done >= r.max_attempts {
        return None;
    }
    attempts[i] = done + 1;
    let mut secs = r.interval_seconds * r.backoff_rate.powf(f64::from(done));
    if let Some(max) = r.max_delay_seconds {
        secs = secs.min(max);
    }
    if r.jitter == Jitter::Full {
        secs *= rand01.clamp(0.0, 1.0);
    }
    // `as` saturates: an unbounded backoff stays at u64::MAX; NaN (a NaN rand01) is 0.
    Some((secs * 1000.0).round() as u64)
}

/// The first of `catchers` whose `ErrorEquals` matches `error` (see [`matches`]).
pub fn find_catcher<'c>(catchers: &'c [Catcher], error: &str) -> Option<&'c Catcher> {
    catchers.iter().find(|c| matches(&c.error_equals, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn retriers(v: Value) -> Vec<Retrier> {
        parse_retry(&v, "Retry").unwrap()
    }

    fn catchers(v: Value) -> Vec<Catcher> {
        parse_catch(&v, "Catch").unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The single problem of `v` parsed by `parse`.
    fn problem<T: std::fmt::Debug>(r: Result<Vec<T>, Vec<Problem>>) -> (String, String) {
        let p = r.unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn defaults() {
        let r = retriers(json!([{"ErrorEquals": ["Http.503"]}]));
        assert_eq!(
            r,
            [Retrier {
                error_equals: names(&["Http.503"]),
                interval_seconds: 1.0,
                max_attempts: 3,
                backoff_rate: 2.0,
                max_delay_seconds: None,
                jitter: Jitter::None,
            }]
        );
        let r = retriers(
            json!([{"ErrorEquals": ["States.Timeout"], "IntervalSeconds": 5,
            "MaxAttempts": 0, "BackoffRate": 1.5, "MaxDelaySeconds": 60, "JitterStrategy": "FULL",
            "Comment": "slow backend"}]),
        );
        assert_eq!(r[0].interval_seconds, 5.0);
        assert_eq!(r[0].max_attempts, 0);
        assert_eq!(r[0].backoff_rate, 1.5);
        assert_eq!(r[0].max_delay_seconds, Some(60.0));
        assert_eq!(r[0].jitter, Jitter::Full);
        assert!(retriers(json!([])).is_empty());
    }

    #[test]
    fn spec_example_backoff() {
        // IntervalSeconds 3, BackoffRate 2, MaxAttempts 2: 3 s, 6 s, then give up.
        let r = retriers(json!([{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 3,
            "BackoffRate": 2, "MaxAttempts": 2}]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(3000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(6000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), None);
        assert_eq!(attempts, [2]);
    }

    #[test]
    fn max_delay_caps_the_backoff() {
        let r = retriers(json!([{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 3,
            "BackoffRate": 2, "MaxAttempts": 3, "MaxDelaySeconds": 4}]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(3000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(4000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(4000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), None);
    }

    #[test]
    fn full_jitter_scales_the_delay() {
        let r = retriers(json!([{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 3,
            "BackoffRate": 2, "JitterStrategy": "FULL"}]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.5), Some(1500));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.5), Some(3000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(0));
        // Without jitter, rand01 is ignored.
        let r = retriers(json!([{"ErrorEquals": ["States.ALL"], "IntervalSeconds": 3}]));
        assert_eq!(next_retry(&r, &mut Vec::new(), "Boom", 0.5), Some(3000));
    }

    #[test]
    fn max_attempts_zero_never_retries() {
        let r = retriers(json!([{"ErrorEquals": ["Boom"], "MaxAttempts": 0}]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), None);
        assert_eq!(attempts, [0]);
    }

    #[test]
    fn backoff_rate_one_keeps_the_interval() {
        let r =
            retriers(json!([{"ErrorEquals": ["Boom"], "IntervalSeconds": 2, "BackoffRate": 1.0}]));
        let mut attempts = Vec::new();
        for _ in 0..3 {
            assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(2000));
        }
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), None);
    }

    #[test]
    fn counters_are_per_retrier() {
        // The spec's example: ErrorA, ErrorB, ErrorC, ErrorB.
        let r = retriers(json!([
            {"ErrorEquals": ["ErrorA", "ErrorB"], "IntervalSeconds": 1, "BackoffRate": 2.0,
             "MaxAttempts": 2},
            {"ErrorEquals": ["ErrorC"], "IntervalSeconds": 5}
        ]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "ErrorA", 0.0), Some(1000));
        assert_eq!(next_retry(&r, &mut attempts, "ErrorB", 0.0), Some(2000));
        assert_eq!(next_retry(&r, &mut attempts, "ErrorC", 0.0), Some(5000));
        assert_eq!(next_retry(&r, &mut attempts, "ErrorB", 0.0), None);
        assert_eq!(attempts, [2, 1]);
        // The second retrier still has its own attempts.
        assert_eq!(next_retry(&r, &mut attempts, "ErrorC", 0.0), Some(10000));
        assert_eq!(next_retry(&r, &mut attempts, "Other", 0.0), None);
        assert_eq!(attempts, [2, 2]);
    }

    #[test]
    fn an_exhausted_retrier_does_not_fall_through() {
        let r = retriers(json!([
            {"ErrorEquals": ["Boom"], "MaxAttempts": 1},
            {"ErrorEquals": ["States.ALL"], "MaxAttempts": 5}
        ]));
        let mut attempts = Vec::new();
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(1000));
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), None);
        assert_eq!(next_retry(&r, &mut attempts, "Other", 0.0), Some(1000));
    }

    #[test]
    fn runaway_backoff_saturates() {
        let r = retriers(json!([{"ErrorEquals": ["Boom"], "MaxAttempts": 99999999,
            "BackoffRate": 1000}]));
        let mut attempts = vec![5000];
        assert_eq!(next_retry(&r, &mut attempts, "Boom", 0.0), Some(u64::MAX));
    }

    #[test]
    fn matching_rules() {
        let all = names(&[names::ALL]);
        let task_failed = names(&[names::TASK_FAILED]);
        let timeout = names(&[names::TIMEOUT]);
        for e in [
            "Boom",
            names::TIMEOUT,
            names::TASK_FAILED,
            names::BRANCH_FAILED,
        ] {
            assert!(matches(&all, e), "States.ALL ~ {e}");
        }
        // Terminal errors: States.ALL does not catch them.
        assert!(!matches(&all, names::RUNTIME));
        assert!(!matches(&all, names::DATA_LIMIT_EXCEEDED));
        // States.TaskFailed: everything but the timeouts and the terminal errors.
        for e in [
            "Boom",
            names::TASK_FAILED,
            names::PERMISSIONS,
            names::NO_CHOICE_MATCHED,
        ] {
            assert!(matches(&task_failed, e), "States.TaskFailed ~ {e}");
        }
        for e in [
            names::TIMEOUT,
            names::HEARTBEAT_TIMEOUT,
            names::RUNTIME,
            names::DATA_LIMIT_EXCEEDED,
        ] {
            assert!(!matches(&task_failed, e), "States.TaskFailed !~ {e}");
        }
        // States.Timeout: a heartbeat timeout is a timeout.
        assert!(matches(&timeout, names::TIMEOUT));
        assert!(matches(&timeout, names::HEARTBEAT_TIMEOUT));
        assert!(!matches(&timeout, "Boom"));
        assert!(!matches(
            &names(&[names::HEARTBEAT_TIMEOUT]),
            names::TIMEOUT
        ));
        // Exact names, case-sensitive.
        let custom = names(&["Http.503", "Http.502"]);
        assert!(matches(&custom, "Http.502"));
        assert!(!matches(&custom, "http.502"));
        assert!(!matches(&custom, "Http.5"));
        assert!(matches(
            &names(&[names::DATA_LIMIT_EXCEEDED]),
            names::DATA_LIMIT_EXCEEDED
        ));
        assert!(!matches(&names(&[names::RUNTIME]), names::RUNTIME));
    }

    #[test]
    fn find_catcher_takes_the_first_match() {
        let c = catchers(json!([
            {"ErrorEquals": ["Http.404"], "Next": "NotFound", "ResultPath": null},
            {"ErrorEquals": ["States.TaskFailed"], "Next": "Failed", "ResultPath": "$.error",
             "Assign": {"failed": true}},
            {"ErrorEquals": ["States.ALL"], "Next": "Anything"}
        ]));
        let next = |e: &str| find_catcher(&c, e).map(|c| c.next.as_str());
        assert_eq!(next("Http.404"), Some("NotFound"));
        assert_eq!(next("Http.500"), Some("Failed"));
        assert_eq!(next(names::TIMEOUT), Some("Anything"));
        assert_eq!(next(names::RUNTIME), None);
        assert_eq!(next(names::DATA_LIMIT_EXCEEDED), None);
        assert_eq!(c[0].result_path, None);
        assert_eq!(c[1].result_path.as_deref(), Some("$.error"));
        assert_eq!(c[1].assign, Some(json!({"failed": true})));
        assert_eq!(c[2].result_path.as_deref(), Some("$"));
        assert_eq!(c[2].assign, None);
    }

    #[test]
    fn states_all_must_be_alone_and_last() {
        let (at, msg) = problem(parse_retry(
            &json!([{"ErrorEquals": ["States.ALL"]}, {"ErrorEquals": ["Boom"]}]),
            "Retry",
        ));
        assert_eq!(at, "Retry[0].ErrorEquals");
        assert!(msg.contains("last retrier"), "{msg}");
        let (at, msg) = problem(parse_retry(
            &json!([{"ErrorEquals": ["Boom", "States.ALL"]}]),
            "Retry",
        ));
        assert_eq!(at, "Retry[0].ErrorEquals");
        assert!(msg.contains("alone"), "{msg}");
        let (at, msg) = problem(parse_catch(
            &json!([
                {"ErrorEquals": ["States.ALL"], "Next": "A"},
                {"ErrorEquals": ["B"], "Next": "B"}
            ]),
            "Catch",
        ));
        assert_eq!(at, "Catch[0].ErrorEquals");
        assert!(msg.contains("last catcher"), "{msg}");
        let (at, _) = problem(parse_catch(
            &json!([{"ErrorEquals": ["States.ALL", "States.Timeout"], "Next": "A"}]),
            "Catch",
        ));
        assert_eq!(at, "Catch[0].ErrorEquals");
    }

    #[test]
    fn error_equals_problems() {
        let cases = [
            (json!({}), "Retry[0]", "needs `ErrorEquals`"),
            (
                json!({"ErrorEquals": []}),
                "Retry[0].ErrorEquals",
                "non-empty array",
            ),
            (
                json!({"ErrorEquals": "Boom"}),
                "Retry[0].ErrorEquals",
                "non-empty array",
            ),
            (
                json!({"ErrorEquals": ["A", 3]}),
                "Retry[0].ErrorEquals[1]",
                "string",
            ),
            (
                json!({"ErrorEquals": [""]}),
                "Retry[0].ErrorEquals[0]",
                "empty",
            ),
            (
                json!({"ErrorEquals": ["States.Timout"]}),
                "Retry[0].ErrorEquals[0]",
                "`States.Timeout`",
            ),
            (
                json!({"ErrorEquals": ["States.Nope"]}),
                "Retry[0].ErrorEquals[0]",
                "reserved",
            ),
            (
                json!({"ErrorEquals": ["States.Runtime"]}),
                "Retry[0].ErrorEquals[0]",
                "terminal",
            ),
        ];
        for (retrier, path, needle) in cases {
            let (at, msg) = problem(parse_retry(&json!([retrier]), "Retry"));
            assert_eq!(at, path, "{retrier}");
            assert!(msg.contains(needle), "{retrier}: {msg}");
        }
    }

    #[test]
    fn retrier_field_problems() {
        let cases = [
            (
                json!({"IntervalSeconds": 0}),
                "IntervalSeconds",
                "positive whole number",
            ),
            (
                json!({"IntervalSeconds": 1.5}),
                "IntervalSeconds",
                "positive whole number",
            ),
            (
                json!({"IntervalSeconds": "1"}),
                "IntervalSeconds",
                "positive whole number",
            ),
            (
                json!({"IntervalSeconds": 100000000}),
                "IntervalSeconds",
                "99999999",
            ),
            (
                json!({"MaxAttempts": -1}),
                "MaxAttempts",
                "whole number from 0",
            ),
            (json!({"MaxAttempts": 2.5}), "MaxAttempts", "whole number"),
            (json!({"BackoffRate": 0.5}), "BackoffRate", "at least 1.0"),
            (json!({"BackoffRate": "2"}), "BackoffRate", "at least 1.0"),
            (
                json!({"MaxDelaySeconds": 0}),
                "MaxDelaySeconds",
                "positive whole number",
            ),
            (
                json!({"MaxDelaySeconds": 31622401}),
                "MaxDelaySeconds",
                "31622400",
            ),
            (
                json!({"JitterStrategy": "full"}),
                "JitterStrategy",
                "\"FULL\" or \"NONE\"",
            ),
            (json!({"Comment": 1}), "Comment", "string"),
            (
                json!({"MaxAttempt": 1}),
                "MaxAttempt",
                "did you mean `MaxAttempts`?",
            ),
            (
                json!({"Next": "X"}),
                "Next",
                "unknown field `Next` in a retrier",
            ),
        ];
        for (fields, field, needle) in cases {
            let mut r = json!({"ErrorEquals": ["Boom"]});
            r.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            let (at, msg) = problem(parse_retry(&json!([r]), "Retry"));
            assert_eq!(at, format!("Retry[0].{field}"), "{fields}");
            assert!(msg.contains(needle), "{fields}: {msg}");
        }
        // Whole numbers written as floats are fine.
        let r = retriers(
            json!([{"ErrorEquals": ["Boom"], "IntervalSeconds": 2.0, "MaxAttempts": 1.0}]),
        );
        assert_eq!((r[0].interval_seconds, r[0].max_attempts), (2.0, 1));
    }

    #[test]
    fn catcher_problems() {
        let cases = [
            (json!({"ErrorEquals": ["A"]}), "Catch[0]", "needs `Next`"),
            (
                json!({"ErrorEquals": ["A"], "Next": 1}),
                "Catch[0].Next",
                "name of a state",
            ),
            (
                json!({"ErrorEquals": ["A"], "Next": "B", "ResultPath": 3}),
                "Catch[0].ResultPath",
                "null",
            ),
            (
                json!({"ErrorEquals": ["A"], "Next": "B", "ResultPath": "error"}),
                "Catch[0].ResultPath",
                "not valid",
            ),
            (
                json!({"ErrorEquals": ["A"], "Next": "B", "Assign": "x"}),
                "Catch[0].Assign",
                "object",
            ),
            (
                json!({"ErrorEquals": ["A"], "Next": "B", "Retry": []}),
                "Catch[0].Retry",
                "unknown field",
            ),
            (json!({"Next": "B"}), "Catch[0]", "needs `ErrorEquals`"),
        ];
        for (catcher, path, needle) in cases {
            let (at, msg) = problem(parse_catch(&json!([catcher]), "Catch"));
            assert_eq!(at, path, "{catcher}");
            assert!(msg.contains(needle), "{catcher}: {msg}");
        }
    }

    #[test]
    fn array_problems() {
        let (at, msg) = problem(parse_retry(
            &json!({"ErrorEquals": ["A"]}),
            "States.Call.Retry",
        ));
        assert_eq!(at, "States.Call.Retry");
        assert!(msg.contains("must be an array"), "{msg}");
        let (at, _) = problem(parse_catch(&json!(["States.ALL"]), "States.Call.Catch"));
        assert_eq!(at, "States.Call.Catch[0]");
        // Every problem, each with its path.
        let p = parse_retry(
            &json!([
                {"ErrorEquals": ["A"], "MaxAttempts": -1},
                {"ErrorEquals": [], "BackoffRate": 0}
            ]),
            "Retry",
        )
        .unwrap_err();
        let paths: Vec<&str> = p.iter().map(|(at, _)| at.as_str()).collect();
        assert_eq!(
            paths,
            [
                "Retry[0].MaxAttempts",
                "Retry[1].ErrorEquals",
                "Retry[1].BackoffRate"
            ]
        );
    }

    #[test]
    fn an_http_status_class_names_every_status_in_it() {
        let class = vec!["Http.5xx".to_string()];
        assert!(matches(&class, "Http.503"));
        assert!(matches(&class, "Http.500"));
        assert!(!matches(&class, "Http.404"));
        assert!(!matches(&class, "Http.Error"));
        assert!(!matches(&["Http.5x".to_string()], "Http.503"));
    }
}
