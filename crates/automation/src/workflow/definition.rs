//! A state machine definition (Amazon States Language, JSONPath mode): parsed from JSON (or
//! the same structure in YAML) into typed states, and validated at load. Every problem is
//! named by its path in the definition (`States.Drain.Next`), so the caller can locate it in
//! the file: an unknown state type, a missing or dangling `Next`, unreachable states, a bad
//! path, `States.ALL` misplaced, a name over 80 characters, a field a state does not take.
//!
//! State names are unique across the whole definition, branches and Map processors
//! included, so the interpreter finds any state by its name alone.

use super::choice::{self, Choice};
use super::paths;
use super::retry::{self, Catcher, Retrier};
use super::MAX_SECONDS;
use crate::Problem;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// The longest state name the specification allows.
pub const MAX_NAME: usize = 80;

/// The task resources portcullis runs.
pub const RESOURCES: &[&str] = &[
    "portcullis:command",
    "portcullis:http",
    "portcullis:wait_for_callback",
    "portcullis:start_workflow",
    "portcullis:emit",
];

/// A whole definition: its top-level machine and the execution's time limit.
#[derive(Clone, Debug)]
pub struct Definition {
    pub comment: Option<String>,
    /// `TimeoutSeconds` of the execution.
    pub timeout_seconds: Option<u64>,
    pub root: Machine,
    /// Every state of every machine, by name.
    states: HashMap<String, State>,
}

/// One machine: the top level, a Parallel branch or a Map's item processor.
#[derive(Clone, Debug)]
pub struct Machine {
    pub start_at: String,
    /// Its states' names, in definition order.
    pub states: Vec<String>,
}

/// Where a state goes when it is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Next(String),
    End,
    /// Choice, Succeed and Fail say where to go (or stop) themselves.
    Own,
}

/// A path field: absent means `$`, `null` means "nothing" (the spec's null cases).
pub type NullablePath = Option<String>;

/// A number of seconds, fixed or read from the input.
#[derive(Clone, Debug, PartialEq)]
pub enum Seconds {
    Fixed(u64),
    Path(String),
}

/// A state.
#[derive(Clone, Debug)]
pub struct State {
    pub name: String,
    pub kind: Kind,
    pub transition: Transition,
    /// `InputPath` (`None`: null, the state sees `{}`).
    pub input_path: NullablePath,
    /// `OutputPath` (`None`: null, the state outputs `{}`).
    pub output_path: NullablePath,
    pub parameters: Option<Value>,
    pub result_selector: Option<Value>,
    /// `ResultPath` (`None`: null, the result is discarded and the input passes on).
    pub result_path: NullablePath,
    pub assign: Option<Value>,
    pub retry: Vec<Retrier>,
    pub catch: Vec<Catcher>,
}

/// What a state does.
#[derive(Clone, Debug)]
pub enum Kind {
    Pass {
        result: Option<Value>,
    },
    Task {
        resource: String,
        timeout: Option<Seconds>,
        heartbeat: Option<Seconds>,
    },
    Choice {
        choices: Vec<Choice>,
        default: Option<String>,
    },
    Wait(WaitFor),
    Succeed,
    Fail {
        error: Option<String>,
        cause: Option<String>,
        error_path: Option<String>,
        cause_path: Option<String>,
    },
    Parallel {
        branches: Vec<Machine>,
    },
    Map {
        items_path: String,
        item_selector: Option<Value>,
        /// 0: no limit.
        max_concurrency: Seconds,
        processor: Machine,
    },
}

/// How long a Wait state waits.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitFor {
    Seconds(u64),
    Timestamp(String),
    SecondsPath(String),
    TimestampPath(String),
}

impl Kind {
    /// The state's `Type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Pass { .. } => "Pass",
            Kind::Task { .. } => "Task",
            Kind::Choice { .. } => "Choice",
            Kind::Wait(_) => "Wait",
            Kind::Succeed => "Succeed",
            Kind::Fail { .. } => "Fail",
            Kind::Parallel { .. } => "Parallel",
            Kind::Map { .. } => "Map",
        }
    }
}

impl Definition {
    /// Parses and validates `v`, or returns every problem found.
    pub fn parse(v: &Value) -> Result<Definition, Vec<Problem>> {
        let mut p = Vec::new();
        let Some(obj) = v.as_object() else {
            return Err(vec![(
                String::new(),
                "a workflow definition is an object with `StartAt` and `States`".into(),
            )]);
        };
        let mut states = HashMap::new();
        allowed(
            obj,
            "",
            &[
                "Comment",
                "StartAt",
                "States",
                "TimeoutSeconds",
                "Version",
                "QueryLanguage",
            ],
            &mut p,
        );
        if let Some(q) = obj.get("QueryLanguage") {
            if q != "JSONPath" {
                p.push(("QueryLanguage".into(), "only `JSONPath` is supported (JSONata is not): remove the field or set it to JSONPath".into()));
            }
        }
        let timeout_seconds = match obj.get("TimeoutSeconds") {
            None => None,
            Some(t) => positive(t, "TimeoutSeconds", &mut p),
        };
        let comment = obj
            .get("Comment")
            .and_then(Value::as_str)
            .map(str::to_string);
        let root = machine(obj, "", &mut states, &mut p);
        let def = Definition {
            comment,
            timeout_seconds,
            root,
            states: states
                .into_iter()
                .filter_map(|(name, s)| Some((name, s?)))
                .collect(),
        };
        if p.is_empty() {
            def.check_graph(&mut p);
        }
        if p.is_empty() {
            Ok(def)
        } else {
            Err(p)
        }
    }

    /// The state called `name`.
    pub fn state(&self, name: &str) -> Option<&State> {
        self.states.get(name)
    }

    /// Every state, in no particular order.
    pub fn states(&self) -> impl Iterator<Item = &State> {
        self.states.values()
    }

    /// Transitions stay inside their machine, and every state is reachable from `StartAt`.
    fn check_graph(&self, p: &mut Vec<Problem>) {
        let mut machines = vec![(String::new(), &self.root)];
        // The states whose branches or processor have been queued. Names are unique, so each
        // nested machine is queued once; this keeps the walk finite even if they were not.
        let mut nested: HashSet<&str> = HashSet::new();
        while let Some((at, m)) = machines.pop() {
            let members: HashSet<&str> = m.states.iter().map(String::as_str).collect();
            if !members.contains(m.start_at.as_str()) {
                p.push((
                    format!("{at}StartAt"),
                    format!("`StartAt` names `{}`, which is not a state of this machine: name one of {}", m.start_at, list(&m.states)),
                ));
                continue;
            }
            let mut seen = HashSet::new();
            let mut todo = vec![m.start_at.as_str()];
            while let Some(n) = todo.pop() {
                if !seen.insert(n) {
                    continue;
                }
                let s = &self.states[n];
                for (field, t) in s.targets() {
                    if members.contains(t) {
                        todo.push(t);
                    } else {
                        p.push((
                            format!("{at}States.{n}.{field}"),
                            format!("`{t}` is not a state of this machine (a transition cannot leave its branch or processor): name one of {}", list(&m.states)),
                        ));
                    }
                }
                if !nested.insert(s.name.as_str()) {
                    continue;
                }
                if let Kind::Parallel { branches } = &s.kind {
                    for (i, b) in branches.iter().enumerate() {
                        machines.push((format!("{at}States.{n}.Branches[{i}]."), b));
                    }
                }
                if let Kind::Map { processor, .. } = &s.kind {
                    machines.push((format!("{at}States.{n}.ItemProcessor."), processor));
                }
            }
            for n in &m.states {
                if !seen.contains(n.as_str()) {
                    p.push((
                        format!("{at}States.{n}"),
                        format!("state `{n}` is unreachable from `{}`: add a transition to it, or remove it", m.start_at),
                    ));
                }
            }
        }
    }
}

impl State {
    /// Every state this one may go to, with the field that names it.
    pub fn targets(&self) -> Vec<(String, &str)> {
        let mut t = Vec::new();
        if let Transition::Next(n) = &self.transition {
            t.push(("Next".to_string(), n.as_str()));
        }
        if let Kind::Choice { choices, default } = &self.kind {
            for (i, c) in choices.iter().enumerate() {
                t.push((format!("Choices[{i}].Next"), c.next.as_str()));
            }
            if let Some(d) = default {
                t.push(("Default".to_string(), d.as_str()));
            }
        }
        for (i, c) in self.catch.iter().enumerate() {
            t.push((format!("Catch[{i}].Next"), c.next.as_str()));
        }
        t
    }
}

fn list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every state name declared so far, with its state once parsed (`None` while its own
/// branches or processor are being parsed, or when it did not parse).
type Declared = HashMap<String, Option<State>>;

/// Parses the machine in `obj` (`StartAt` and `States`), adding its states to `all`.
fn machine(
    obj: &Map<String, Value>,
    at: &str,
    all: &mut Declared,
    p: &mut Vec<Problem>,
) -> Machine {
    let start_at = match obj.get("StartAt") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            p.push((
                format!("{at}StartAt"),
                "`StartAt` is the name of the first state, a string".into(),
            ));
            String::new()
        }
        None => {
            p.push((
                format!("{at}StartAt"),
                "`StartAt` is missing: name the state to start at".into(),
            ));
            String::new()
        }
    };
    let mut names = Vec::new();
    match obj.get("States") {
        Some(Value::Object(states)) if !states.is_empty() => {
            for (name, s) in states {
                let sat = format!("{at}States.{name}");
                if name.is_empty() || name.chars().count() > MAX_NAME {
                    p.push((sat.clone(), format!("a state name is 1 to {MAX_NAME} characters; `{name}` is {}: shorten it", name.chars().count())));
                }
                if all.contains_key(name) {
                    p.push((sat.clone(), format!("the state name `{name}` is used twice: state names are unique in the whole definition, branches and Map processors included; rename one")));
                    continue;
                }
                // Declared before its branches or processor are parsed, so that a nested
                // state reusing this name (its own parent's) is refused too.
                all.insert(name.clone(), None);
                let st = state(name, s, &sat, all, p);
                all.insert(name.clone(), st);
                names.push(name.clone());
            }
        }
        _ => p.push((
            format!("{at}States"),
            "`States` is an object of at least one state, by name".into(),
        )),
    }
    Machine {
        start_at,
        states: names,
    }
}

/// Fields every state type accepts, and the ones each type adds.
fn fields_of(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "Pass" => &[
            "InputPath",
            "OutputPath",
            "Parameters",
            "ResultPath",
            "Result",
            "Next",
            "End",
            "Assign",
        ],
        "Task" => &[
            "InputPath",
            "OutputPath",
            "Parameters",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "Next",
            "End",
            "Assign",
            "Resource",
            "TimeoutSeconds",
            "TimeoutSecondsPath",
            "HeartbeatSeconds",
            "HeartbeatSecondsPath",
        ],
        "Choice" => &["InputPath", "OutputPath", "Choices", "Default", "Assign"],
        "Wait" => &[
            "InputPath",
            "OutputPath",
            "Next",
            "End",
            "Assign",
            "Seconds",
            "Timestamp",
            "SecondsPath",
            "TimestampPath",
        ],
        "Succeed" => &["InputPath", "OutputPath"],
        "Fail" => &["Error", "Cause", "ErrorPath", "CausePath"],
        "Parallel" => &[
            "InputPath",
            "OutputPath",
            "Parameters",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "Next",
            "End",
            "Assign",
            "Branches",
        ],
        "Map" => &[
            "InputPath",
            "OutputPath",
            "ItemsPath",
            "ItemSelector",
            "Parameters",
            "ItemProcessor",
            "Iterator",
            "MaxConcurrency",
            "MaxConcurrencyPath",
            "ResultSelector",
            "ResultPath",
            "Retry",
            "Catch",
            "Next",
            "End",
            "Assign",
            "ItemReader",
            "ItemBatcher",
            "ResultWriter",
            "ToleratedFailureCount",
            "ToleratedFailurePercentage",
            "Label",
        ],
        _ => return None,
    })
}

fn allowed(obj: &Map<String, Value>, at: &str, ok: &[&str], p: &mut Vec<Problem>) {
    for k in obj.keys() {
        if k != "Type" && k != "Comment" && !ok.contains(&k.as_str()) {
            let at = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            p.push((
                at,
                format!(
                    "unknown field `{k}` here: the fields allowed are {}",
                    ok.join(", ")
                ),
            ));
        }
    }
}

fn state(
    name: &str,
    v: &Value,
    at: &str,
    all: &mut Declared,
    p: &mut Vec<Problem>,
) -> Option<State> {
    let Some(obj) = v.as_object() else {
        p.push((at.to_string(), "a state is an object with a `Type`".into()));
        return None;
    };
    let ty = match obj.get("Type") {
        Some(Value::String(t)) => t.as_str(),
        _ => {
            p.push((
                format!("{at}.Type"),
                "`Type` is missing: one of Pass, Task, Choice, Wait, Succeed, Fail, Parallel, Map"
                    .into(),
            ));
            return None;
        }
    };
    let Some(fields) = fields_of(ty) else {
        p.push((format!("{at}.Type"), format!("unknown state type `{ty}`: use one of Pass, Task, Choice, Wait, Succeed, Fail, Parallel, Map")));
        return None;
    };
    allowed(obj, at, fields, p);
    for k in [
        "ItemReader",
        "ItemBatcher",
        "ResultWriter",
        "ToleratedFailureCount",
        "ToleratedFailurePercentage",
        "Label",
    ] {
        if obj.contains_key(k) {
            p.push((format!("{at}.{k}"), format!("`{k}` belongs to the distributed Map, which portcullis does not run: use an inline Map (remove `{k}`)")));
        }
    }
    let kind = kind(ty, obj, at, all, p)?;
    let transition = transition(ty, obj, at, p);
    let mut s = State {
        name: name.to_string(),
        kind,
        transition,
        input_path: nullable_path(obj, "InputPath", at, false, p),
        output_path: nullable_path(obj, "OutputPath", at, false, p),
        parameters: template(obj, "Parameters", at, p),
        result_selector: template(obj, "ResultSelector", at, p),
        result_path: nullable_path(obj, "ResultPath", at, true, p),
        assign: template(obj, "Assign", at, p),
        retry: Vec::new(),
        catch: Vec::new(),
    };
    if let Some(r) = obj.get("Retry") {
        s.retry = retry::parse_retry(r, &format!("{at}.Retry")).unwrap_or_else(|e| {
            p.extend(e);
            Vec::new()
        });
    }
    if let Some(c) = obj.get("Catch") {
        s.catch = retry::parse_catch(c, &format!("{at}.Catch")).unwrap_or_else(|e| {
            p.extend(e);
            Vec::new()
        });
    }
    Some(s)
}

fn transition(ty: &str, obj: &Map<String, Value>, at: &str, p: &mut Vec<Problem>) -> Transition {
    if matches!(ty, "Choice" | "Succeed" | "Fail") {
        return Transition::Own;
    }
    match (obj.get("Next"), obj.get("End")) {
        (Some(Value::String(n)), None) => Transition::Next(n.clone()),
        (None, Some(Value::Bool(true))) => Transition::End,
        (Some(_), Some(_)) => {
            p.push((
                format!("{at}.Next"),
                "a state has `Next` or `End: true`, not both: remove one".into(),
            ));
            Transition::End
        }
        (Some(_), None) => {
            p.push((
                format!("{at}.Next"),
                "`Next` is the name of a state, a string".into(),
            ));
            Transition::End
        }
        _ => {
            p.push((
                at.to_string(),
                format!("a {ty} state needs `Next` (the state that follows) or `End: true`"),
            ));
            Transition::End
        }
    }
}

fn nullable_path(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
    reference: bool,
    p: &mut Vec<Problem>,
) -> NullablePath {
    match obj.get(key) {
        None => Some("$".to_string()),
        Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let r = if reference {
                paths::check_reference_path(s)
            } else {
                paths::check_path(s)
            };
            if let Err(e) = r {
                p.push((format!("{at}.{key}"), e));
            }
            Some(s.clone())
        }
        Some(_) => {
            p.push((
                format!("{at}.{key}"),
                format!("`{key}` is a path such as `$.field`, or null"),
            ));
            None
        }
    }
}

fn path_field(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
    p: &mut Vec<Problem>,
) -> Option<String> {
    match obj.get(key) {
        None => None,
        Some(Value::String(s)) => {
            if let Err(e) = paths::check_path(s) {
                p.push((format!("{at}.{key}"), e));
            }
            Some(s.clone())
        }
        Some(_) => {
            p.push((
                format!("{at}.{key}"),
                format!("`{key}` is a path such as `$.field`"),
            ));
            None
        }
    }
}

fn template(obj: &Map<String, Value>, key: &str, at: &str, p: &mut Vec<Problem>) -> Option<Value> {
    let v = obj.get(key)?;
    let at = format!("{at}.{key}");
    if key != "Parameters" && key != "Result" && !v.is_object() {
        p.push((at, format!("`{key}` is an object")));
        return None;
    }
    p.extend(super::template::check_template(v, &at));
    Some(v.clone())
}

fn positive(v: &Value, at: &str, p: &mut Vec<Problem>) -> Option<u64> {
    match v.as_u64() {
        Some(n) if (1..=MAX_SECONDS).contains(&n) => Some(n),
        Some(n) if n > MAX_SECONDS => {
            p.push((
                at.to_string(),
                format!("{n} seconds is over the limit of {MAX_SECONDS} (about three years)"),
            ));
            None
        }
        _ => {
            p.push((at.to_string(), "a positive whole number of seconds".into()));
            None
        }
    }
}

fn seconds(obj: &Map<String, Value>, key: &str, at: &str, p: &mut Vec<Problem>) -> Option<Seconds> {
    let path_key = format!("{key}Path");
    match (obj.get(key), obj.get(&path_key)) {
        (Some(_), Some(_)) => {
            p.push((
                format!("{at}.{key}"),
                format!("`{key}` and `{path_key}` exclude each other: keep one"),
            ));
            None
        }
        (Some(v), None) => positive(v, &format!("{at}.{key}"), p).map(Seconds::Fixed),
        (None, Some(_)) => path_field(obj, &path_key, at, p).map(Seconds::Path),
        (None, None) => None,
    }
}

fn kind(
    ty: &str,
    obj: &Map<String, Value>,
    at: &str,
    all: &mut Declared,
    p: &mut Vec<Problem>,
) -> Option<Kind> {
    Some(match ty {
        "Pass" => Kind::Pass {
            result: obj.get("Result").cloned(),
        },
        "Task" => task(obj, at, p),
        "Choice" => {
            let choices = match obj.get("Choices") {
                Some(c) => choice::parse_choices(c, &format!("{at}.Choices")).unwrap_or_else(|e| {
                    p.extend(e);
                    Vec::new()
                }),
                None => {
                    p.push((
                        format!("{at}.Choices"),
                        "a Choice state needs `Choices`, a non-empty array of rules".into(),
                    ));
                    Vec::new()
                }
            };
            let default = match obj.get("Default") {
                None => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => {
                    p.push((
                        format!("{at}.Default"),
                        "`Default` is the name of a state, a string".into(),
                    ));
                    None
                }
            };
            Kind::Choice { choices, default }
        }
        "Wait" => Kind::Wait(wait(obj, at, p)?),
        "Succeed" => Kind::Succeed,
        "Fail" => fail(obj, at, p),
        "Parallel" => {
            let mut branches = Vec::new();
            match obj.get("Branches") {
                Some(Value::Array(bs)) if !bs.is_empty() => {
                    for (i, b) in bs.iter().enumerate() {
                        let bat = format!("{at}.Branches[{i}].");
                        match b.as_object() {
                            Some(bo) => {
                                allowed(
                                    bo,
                                    &bat[..bat.len() - 1],
                                    &["StartAt", "States", "ProcessorConfig"],
                                    p,
                                );
                                branches.push(machine(bo, &bat, all, p));
                            }
                            None => p.push((
                                bat[..bat.len() - 1].to_string(),
                                "a branch is an object with `StartAt` and `States`".into(),
                            )),
                        }
                    }
                }
                _ => p.push((
                    format!("{at}.Branches"),
                    "a Parallel state needs `Branches`, a non-empty array of machines".into(),
                )),
            }
            Kind::Parallel { branches }
        }
        "Map" => map(obj, at, all, p)?,
        _ => return None,
    })
}

fn task(obj: &Map<String, Value>, at: &str, p: &mut Vec<Problem>) -> Kind {
    let resource = match obj.get("Resource") {
        Some(Value::String(r)) => {
            if !RESOURCES.contains(&r.as_str()) {
                p.push((
                    format!("{at}.Resource"),
                    format!(
                        "unknown resource `{r}`: portcullis runs {}",
                        RESOURCES.join(", ")
                    ),
                ));
            }
            r.clone()
        }
        _ => {
            p.push((
                format!("{at}.Resource"),
                format!("a Task needs `Resource`, one of {}", RESOURCES.join(", ")),
            ));
            String::new()
        }
    };
    let timeout = seconds(obj, "TimeoutSeconds", at, p);
    let heartbeat = seconds(obj, "HeartbeatSeconds", at, p);
    if let (Some(Seconds::Fixed(t)), Some(Seconds::Fixed(h))) = (&timeout, &heartbeat) {
        if h >= t {
            p.push((
                format!("{at}.HeartbeatSeconds"),
                format!("`HeartbeatSeconds` ({h}) must be less than `TimeoutSeconds` ({t})"),
            ));
        }
    }
    Kind::Task {
        resource,
        timeout,
        heartbeat,
    }
}

fn wait(obj: &Map<String, Value>, at: &str, p: &mut Vec<Problem>) -> Option<WaitFor> {
    let given: Vec<&str> = ["Seconds", "Timestamp", "SecondsPath", "TimestampPath"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    if given.len() != 1 {
        p.push((at.to_string(), "a Wait state has exactly one of `Seconds`, `Timestamp`, `SecondsPath`, `TimestampPath`".into()));
        return None;
    }
    let key = given[0];
    let v = &obj[key];
    let kat = format!("{at}.{key}");
    Some(match key {
        "Seconds" => match v.as_u64() {
            Some(n) if n <= MAX_SECONDS => WaitFor::Seconds(n),
            Some(n) => {
                p.push((
                    kat,
                    format!("{n} seconds is over the limit of {MAX_SECONDS} (about three years)"),
                ));
                return None;
            }
            None => {
                p.push((
                    kat,
                    "`Seconds` is a whole number of seconds, 0 or more".into(),
                ));
                return None;
            }
        },
        "Timestamp" => match v.as_str() {
            Some(t) if super::stamp::parse_timestamp(t).is_some() => {
                WaitFor::Timestamp(t.to_string())
            }
            _ => {
                p.push((
                    kat,
                    "`Timestamp` is an RFC 3339 time such as `2026-03-14T01:59:00Z`".into(),
                ));
                return None;
            }
        },
        "SecondsPath" => WaitFor::SecondsPath(path_field(obj, key, at, p)?),
        _ => WaitFor::TimestampPath(path_field(obj, key, at, p)?),
    })
}

fn fail(obj: &Map<String, Value>, at: &str, p: &mut Vec<Problem>) -> Kind {
    let text = |k: &str, p: &mut Vec<Problem>| match obj.get(k) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            p.push((format!("{at}.{k}"), format!("`{k}` is a string")));
            None
        }
    };
    let error = text("Error", p);
    let cause = text("Cause", p);
    let error_path = path_field(obj, "ErrorPath", at, p);
    let cause_path = path_field(obj, "CausePath", at, p);
    for (a, b) in [("Error", "ErrorPath"), ("Cause", "CausePath")] {
        if obj.contains_key(a) && obj.contains_key(b) {
            p.push((
                format!("{at}.{b}"),
                format!("`{a}` and `{b}` exclude each other: keep one"),
            ));
        }
    }
    Kind::Fail {
        error,
        cause,
        error_path,
        cause_path,
    }
}

fn map(
    obj: &Map<String, Value>,
    at: &str,
    all: &mut Declared,
    p: &mut Vec<Problem>,
) -> Option<Kind> {
    let (key, proc) = match (obj.get("ItemProcessor"), obj.get("Iterator")) {
        (Some(v), None) => ("ItemProcessor", v),
        (None, Some(v)) => ("Iterator", v),
        _ => {
            p.push((
                format!("{at}.ItemProcessor"),
                "a Map state needs `ItemProcessor` (or the older `Iterator`), not both".into(),
            ));
            return None;
        }
    };
    let pat = format!("{at}.{key}");
    let Some(po) = proc.as_object() else {
        p.push((
            pat,
            "the item processor is an object with `StartAt` and `States`".into(),
        ));
        return None;
    };
    allowed(po, &pat, &["StartAt", "States", "ProcessorConfig"], p);
    if let Some(cfg) = po.get("ProcessorConfig") {
        if cfg.get("Mode").is_some_and(|m| m != "INLINE") {
            p.push((
                format!("{pat}.ProcessorConfig.Mode"),
                "portcullis runs inline Maps only: set `Mode: INLINE`".into(),
            ));
        }
    }
    let processor = machine(po, &format!("{pat}."), all, p);
    let item_selector = match (obj.get("ItemSelector"), obj.get("Parameters")) {
        (Some(_), Some(_)) => {
            p.push((
                format!("{at}.Parameters"),
                "`ItemSelector` replaces a Map's `Parameters`: keep one".into(),
            ));
            None
        }
        (Some(_), None) => template(obj, "ItemSelector", at, p),
        (None, Some(_)) => template(obj, "Parameters", at, p),
        (None, None) => None,
    };
    let items_path = path_field(obj, "ItemsPath", at, p).unwrap_or_else(|| "$".into());
    let max_concurrency = match (obj.get("MaxConcurrency"), obj.get("MaxConcurrencyPath")) {
        (Some(_), Some(_)) => {
            p.push((
                format!("{at}.MaxConcurrency"),
                "`MaxConcurrency` and `MaxConcurrencyPath` exclude each other".into(),
            ));
            Seconds::Fixed(0)
        }
        (Some(v), None) => match v.as_u64() {
            Some(n) => Seconds::Fixed(n),
            None => {
                p.push((
                    format!("{at}.MaxConcurrency"),
                    "`MaxConcurrency` is a whole number (0: no limit)".into(),
                ));
                Seconds::Fixed(0)
            }
        },
        (None, Some(_)) => {
            Seconds::Path(path_field(obj, "MaxConcurrencyPath", at, p).unwrap_or_default())
        }
        (None, None) => Seconds::Fixed(0),
    };
    Some(Kind::Map {
        items_path,
        item_selector,
        max_concurrency,
        processor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(v: Value) -> Vec<Problem> {
        Definition::parse(&v).err().unwrap_or_default()
    }

    fn has(p: &[Problem], at: &str, needle: &str) -> bool {
        p.iter().any(|(a, m)| a == at && m.contains(needle))
    }

    #[test]
    fn a_good_definition_parses_with_every_state_by_name() {
        let d = Definition::parse(&json!({
            "StartAt": "A",
            "TimeoutSeconds": 60,
            "States": {
                "A": { "Type": "Pass", "Result": {"x": 1}, "ResultPath": "$.a", "Next": "P" },
                "P": { "Type": "Parallel", "Next": "M", "Branches": [
                    { "StartAt": "B1", "States": { "B1": { "Type": "Succeed" } } },
                    { "StartAt": "B2", "States": { "B2": { "Type": "Wait", "Seconds": 1, "End": true } } }
                ]},
                "M": { "Type": "Map", "ItemsPath": "$.items", "MaxConcurrency": 2, "Next": "Done",
                       "ItemProcessor": { "ProcessorConfig": {"Mode": "INLINE"}, "StartAt": "I", "States": { "I": { "Type": "Pass", "End": true } } } },
                "Done": { "Type": "Succeed" }
            }
        }))
        .unwrap();
        assert_eq!(d.root.start_at, "A");
        assert_eq!(d.timeout_seconds, Some(60));
        assert!(d.state("B2").is_some() && d.state("I").is_some());
        assert_eq!(d.state("A").unwrap().result_path.as_deref(), Some("$.a"));
        assert_eq!(d.state("A").unwrap().input_path.as_deref(), Some("$"));
    }

    #[test]
    fn null_paths_are_kept_apart_from_absent_ones() {
        let d = Definition::parse(&json!({"StartAt": "A", "States": {
            "A": { "Type": "Pass", "InputPath": null, "ResultPath": null, "OutputPath": null, "End": true }
        }}))
        .unwrap();
        let a = d.state("A").unwrap();
        assert_eq!(
            (
                a.input_path.clone(),
                a.result_path.clone(),
                a.output_path.clone()
            ),
            (None, None, None)
        );
    }

    #[test]
    fn each_structural_mistake_is_named_by_its_path() {
        let p = problems(json!({"StartAt": "Nope", "States": {
            "A": { "Type": "Pass" },
            "B": { "Type": "Teleport", "End": true },
            "C": { "Type": "Pass", "Next": "Missing" },
            "D": { "Type": "Succeed", "Next": "A" },
            "E": { "Type": "Pass", "Next": "A", "End": true }
        }}));
        assert!(has(&p, "States.A", "needs `Next`"), "{p:?}");
        assert!(has(&p, "States.B.Type", "unknown state type"), "{p:?}");
        assert!(has(&p, "States.D.Next", "unknown field `Next`"), "{p:?}");
        assert!(has(&p, "States.E.Next", "not both"), "{p:?}");
    }

    #[test]
    fn dangling_and_unreachable_states_are_found_after_the_shape_is_right() {
        let p = problems(json!({"StartAt": "A", "States": {
            "A": { "Type": "Pass", "Next": "Missing" },
            "Lost": { "Type": "Succeed" }
        }}));
        assert!(
            has(&p, "States.A.Next", "`Missing` is not a state"),
            "{p:?}"
        );
        assert!(has(&p, "States.Lost", "unreachable"), "{p:?}");
        let p = problems(json!({"StartAt": "Nope", "States": { "A": { "Type": "Succeed" } }}));
        assert!(has(&p, "StartAt", "`Nope`"), "{p:?}");
    }

    #[test]
    fn a_transition_cannot_leave_its_branch() {
        let p = problems(json!({"StartAt": "P", "States": {
            "P": { "Type": "Parallel", "End": true, "Branches": [
                { "StartAt": "B", "States": { "B": { "Type": "Pass", "Next": "Out" } } }
            ]},
            "Out": { "Type": "Succeed" }
        }}));
        assert!(
            has(&p, "States.P.Branches[0].States.B.Next", "cannot leave"),
            "{p:?}"
        );
    }

    #[test]
    fn names_are_bounded_and_unique_across_branches() {
        let long = "x".repeat(81);
        let p = problems(
            json!({"StartAt": long.clone(), "States": { long.clone(): { "Type": "Succeed" } }}),
        );
        assert!(has(&p, &format!("States.{long}"), "1 to 80"), "{p:?}");
        let p = problems(json!({"StartAt": "P", "States": {
            "P": { "Type": "Parallel", "Next": "B", "Branches": [
                { "StartAt": "B", "States": { "B": { "Type": "Succeed" } } }
            ]},
            "B": { "Type": "Succeed" }
        }}));
        assert!(p.iter().any(|(_, m)| m.contains("used twice")), "{p:?}");
    }

    #[test]
    fn a_nested_state_cannot_reuse_an_enclosing_states_name() {
        // The enclosing state's name is taken before its processor or branches are parsed:
        // once, the nested one replaced it and the graph check looped forever between them.
        let leaf = json!({ "StartAt": "L", "States": { "L": { "Type": "Pass", "End": true } } });
        let p = problems(json!({"StartAt": "N", "States": {
            "N": { "Type": "Map", "ItemsPath": "$.x", "End": true, "ItemProcessor": { "StartAt": "N", "States": {
                "N": { "Type": "Map", "ItemsPath": "$", "End": true, "ItemProcessor": leaf.clone() }
            }}}
        }}));
        assert!(
            has(&p, "States.N.ItemProcessor.States.N", "used twice"),
            "{p:?}"
        );
        let p = problems(json!({"StartAt": "P", "States": {
            "P": { "Type": "Parallel", "End": true, "Branches": [
                leaf.clone(),
                { "StartAt": "P", "States": { "P": { "Type": "Succeed" } } }
            ]}
        }}));
        assert!(
            has(&p, "States.P.Branches[1].States.P", "used twice"),
            "{p:?}"
        );
        // Two levels down: a Map's name reused inside a Parallel branch of its processor.
        let p = problems(json!({"StartAt": "A", "States": {
            "A": { "Type": "Map", "End": true, "ItemProcessor": { "StartAt": "B", "States": {
                "B": { "Type": "Parallel", "End": true, "Branches": [
                    { "StartAt": "A", "States": { "A": { "Type": "Succeed" } } }
                ]}
            }}}
        }}));
        assert!(
            has(
                &p,
                "States.A.ItemProcessor.States.B.Branches[0].States.A",
                "used twice"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_resources_fields_and_distributed_maps_are_refused() {
        let p = problems(json!({"StartAt": "T", "States": {
            "T": { "Type": "Task", "Resource": "arn:aws:states:::lambda:invoke", "End": true, "Bogus": 1 },
        }}));
        assert!(has(&p, "States.T.Resource", "unknown resource"), "{p:?}");
        assert!(has(&p, "States.T.Bogus", "unknown field"), "{p:?}");
        let p = problems(json!({"StartAt": "M", "States": {
            "M": { "Type": "Map", "End": true, "ItemReader": {}, "ItemProcessor": { "ProcessorConfig": {"Mode": "DISTRIBUTED"}, "StartAt": "I", "States": { "I": { "Type": "Succeed" } } } }
        }}));
        assert!(has(&p, "States.M.ItemReader", "distributed"), "{p:?}");
        assert!(
            has(&p, "States.M.ItemProcessor.ProcessorConfig.Mode", "inline"),
            "{p:?}"
        );
    }

    #[test]
    fn waits_and_timeouts_are_checked() {
        let p = problems(json!({"StartAt": "W", "States": {
            "W": { "Type": "Wait", "Seconds": 1, "Timestamp": "2026-01-01T00:00:00Z", "Next": "X" },
            "X": { "Type": "Wait", "Timestamp": "yesterday", "Next": "T" },
            "T": { "Type": "Task", "Resource": "portcullis:http", "TimeoutSeconds": 5, "HeartbeatSeconds": 10, "End": true }
        }}));
        assert!(has(&p, "States.W", "exactly one"), "{p:?}");
        assert!(has(&p, "States.X.Timestamp", "RFC 3339"), "{p:?}");
        assert!(has(&p, "States.T.HeartbeatSeconds", "less than"), "{p:?}");
    }

    /// Seconds past Step Functions' limit are refused where they are written: they used to
    /// overflow into a deadline in the past, so the Wait or the timeout ended at once.
    #[test]
    fn seconds_over_the_limit_are_refused() {
        let huge = json!(9_223_372_036_854_776u64);
        let p = problems(json!({"TimeoutSeconds": huge, "StartAt": "W", "States": {
            "W": { "Type": "Wait", "Seconds": huge, "Next": "T" },
            "T": { "Type": "Task", "Resource": "portcullis:http", "TimeoutSeconds": u64::MAX,
                   "HeartbeatSeconds": 100_000_000, "End": true }
        }}));
        for at in [
            "TimeoutSeconds",
            "States.W.Seconds",
            "States.T.TimeoutSeconds",
            "States.T.HeartbeatSeconds",
        ] {
            assert!(has(&p, at, "over the limit of 99999999"), "{at}: {p:?}");
        }
        let ok = json!({"TimeoutSeconds": MAX_SECONDS, "StartAt": "W", "States": {
            "W": { "Type": "Wait", "Seconds": MAX_SECONDS, "End": true }
        }});
        assert!(Definition::parse(&ok).is_ok());
    }
}
