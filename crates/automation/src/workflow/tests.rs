//! Golden tests of the interpreter, from the specification's worked examples, run in memory
//! with canned task results and virtual time ([`super::local`]).

use super::definition::Definition;
use super::local::{self, Answers, Canned, LocalRun};
use super::machine::{self, ExecMeta, Outcome};
use super::store::SignalKind;
use super::{names, StatesError, MAX_HISTORY};
use serde_json::{json, Value};

const T0: i64 = 1_700_000_000_000;

fn def(v: Value) -> Definition {
    Definition::parse(&v).unwrap_or_else(|p| panic!("{p:?}"))
}

fn run(d: &Definition, input: Value, answers: &mut Answers) -> LocalRun {
    local::run(d, input, answers, T0, 100_000).unwrap()
}

/// Offsets from T0 (ms) of every event of `kind`.
fn times(r: &LocalRun, kind: &str) -> Vec<i64> {
    r.history
        .iter()
        .filter(|h| h.kind == kind)
        .map(|h| h.timestamp_ms - T0)
        .collect()
}

fn kinds(r: &LocalRun) -> Vec<&str> {
    r.history.iter().map(|h| h.kind.as_str()).collect()
}

fn succeeded(r: &LocalRun) -> &Value {
    match &r.outcome {
        Outcome::Succeeded(v) => v,
        o => panic!("expected success, got {o:?}; history {:?}", kinds(r)),
    }
}

fn failed(r: &LocalRun) -> &StatesError {
    match &r.outcome {
        Outcome::Failed(e) | Outcome::TimedOut(e) => e,
        o => panic!("expected failure, got {o:?}"),
    }
}

#[test]
fn the_specifications_input_and_output_example() {
    // InputPath picks the numbers, the task's result goes to $.sum beside the input, and
    // OutputPath keeps only the sum's part.
    let d = def(json!({"StartAt": "Add", "States": {
        "Add": { "Type": "Task", "Resource": "portcullis:http", "InputPath": "$.numbers",
                 "Parameters": { "a.$": "$.val1", "b.$": "$.val2" },
                 "ResultSelector": { "total.$": "$.sum" },
                 "ResultPath": "$.sum", "OutputPath": "$.sum", "End": true }
    }}));
    let mut a = Answers::new();
    a.add("Add", Canned::Ok(json!({ "sum": 7, "noise": true })));
    let r = run(
        &d,
        json!({"title": "Numbers to add", "numbers": { "val1": 3, "val2": 4 }}),
        &mut a,
    );
    assert_eq!(succeeded(&r), &json!({ "total": 7 }));
    assert_eq!(r.calls[0].parameters, json!({ "a": 3, "b": 4 }));
}

#[test]
fn result_path_keeps_the_raw_input_and_null_paths_mean_nothing() {
    let d = def(json!({"StartAt": "A", "States": {
        "A": { "Type": "Pass", "InputPath": "$.inner", "Result": "done", "ResultPath": "$.status", "Next": "B" },
        "B": { "Type": "Pass", "Result": { "lost": true }, "ResultPath": null, "Next": "C" },
        "C": { "Type": "Pass", "InputPath": null, "ResultPath": "$.fromNull", "Next": "D" },
        "D": { "Type": "Pass", "OutputPath": null, "End": true }
    }}));
    let r = run(
        &d,
        json!({ "inner": { "x": 1 }, "keep": 2 }),
        &mut Answers::new(),
    );
    assert_eq!(succeeded(&r), &json!({}));
    // The steps before: A wrote $.status into the raw input, B discarded its result, C's
    // null InputPath gave it `{}` as its result.
    let exits: Vec<Value> = r
        .history
        .iter()
        .filter(|h| h.kind == "PassStateExited")
        .map(|h| serde_json::from_str::<Value>(&h.details).unwrap()["output"].clone())
        .collect();
    assert_eq!(
        exits[0],
        json!({ "inner": { "x": 1 }, "keep": 2, "status": "done" })
    );
    assert_eq!(exits[1], exits[0]);
    assert_eq!(
        exits[2],
        json!({ "inner": { "x": 1 }, "keep": 2, "status": "done", "fromNull": {} })
    );
}

#[test]
fn context_object_and_assigned_variables_reach_later_states() {
    let d = def(json!({"StartAt": "A", "States": {
        "A": { "Type": "Pass", "Assign": { "server.$": "$.server", "tries": 3 }, "Next": "B" },
        "B": { "Type": "Pass", "Parameters": { "who.$": "$server", "tries.$": "$tries", "exec.$": "$$.Execution.Name", "state.$": "$$.State.Name" }, "End": true }
    }}));
    let r = run(&d, json!({ "server": "web-1" }), &mut Answers::new());
    assert_eq!(
        succeeded(&r),
        &json!({ "who": "web-1", "tries": 3, "exec": "local", "state": "B" })
    );
}

#[test]
fn retry_waits_three_then_six_seconds_and_max_delay_caps_it() {
    let retry = |extra: Value| {
        let mut r = json!({ "ErrorEquals": ["Http.503"], "IntervalSeconds": 3, "BackoffRate": 2, "MaxAttempts": 2 });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        def(json!({"StartAt": "Call", "States": {
            "Call": { "Type": "Task", "Resource": "portcullis:http", "Retry": [r], "End": true }
        }}))
    };
    let down = || Canned::Err(StatesError::new("Http.503", "origin down"));
    let mut a = Answers::new();
    a.add("Call", down());
    let r = run(&retry(json!({})), json!({}), &mut a);
    assert_eq!(times(&r, "TaskScheduled"), vec![0, 3_000, 9_000]);
    assert_eq!(failed(&r).error, "Http.503");
    assert_eq!(
        times(&r, "TaskStateEntered"),
        vec![0],
        "a retry does not enter the state again"
    );

    let mut a = Answers::new();
    a.add("Call", down());
    let r = run(&retry(json!({ "MaxDelaySeconds": 4 })), json!({}), &mut a);
    assert_eq!(times(&r, "TaskScheduled"), vec![0, 3_000, 7_000]);

    // The third attempt succeeds: the execution does.
    let mut a = Answers::new();
    a.add("Call", down())
        .add("Call", down())
        .add("Call", Canned::Ok(json!("up")));
    let r = run(&retry(json!({})), json!({}), &mut a);
    assert_eq!(succeeded(&r), &json!("up"));
    // $$.State.RetryCount and the attempt number count the retries.
    assert_eq!(
        r.calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let keys: std::collections::HashSet<_> = r.calls.iter().map(|c| c.key.clone()).collect();
    assert_eq!(keys.len(), 3, "each attempt has its own idempotency key");
}

#[test]
fn catch_goes_to_the_fallback_with_the_error_output() {
    let d = def(json!({"StartAt": "Call", "States": {
        "Call": { "Type": "Task", "Resource": "portcullis:http", "Next": "Done",
                  "Catch": [ { "ErrorEquals": ["Http.404"], "Next": "NotFound" },
                             { "ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Fallback" } ] },
        "NotFound": { "Type": "Fail", "Error": "Gone" },
        "Fallback": { "Type": "Pass", "End": true },
        "Done": { "Type": "Succeed" }
    }}));
    let mut a = Answers::new();
    a.add("Call", Canned::Err(StatesError::new("Http.500", "boom")));
    let r = run(&d, json!({ "server": "a" }), &mut a);
    assert_eq!(
        succeeded(&r),
        &json!({ "server": "a", "error": { "Error": "Http.500", "Cause": "boom" } })
    );
    let mut a = Answers::new();
    a.add("Call", Canned::Err(StatesError::new("Http.404", "")));
    let r = run(&d, json!({}), &mut a);
    assert_eq!(failed(&r).error, "Gone");
}

#[test]
fn runtime_errors_are_not_caught_by_states_all() {
    let d = def(json!({"StartAt": "Call", "States": {
        "Call": { "Type": "Task", "Resource": "portcullis:http", "End": true,
                  "Catch": [ { "ErrorEquals": ["States.ALL"], "Next": "Fallback" } ] },
        "Fallback": { "Type": "Succeed" }
    }}));
    let mut a = Answers::new();
    a.add("Call", Canned::Err(StatesError::runtime("bad output")));
    assert_eq!(failed(&run(&d, json!({}), &mut a)).error, names::RUNTIME);
}

#[test]
fn choice_picks_a_rule_then_default_then_fails() {
    let d = |default: bool| {
        // A comparison on a path that selects nothing is an error, so presence comes first.
        let mut c = json!({ "Type": "Choice", "Choices": [
            { "Not": { "Variable": "$.n", "IsPresent": true }, "Next": "Missing" },
            { "Variable": "$.n", "NumericGreaterThan": 10, "Next": "Big" }
        ]});
        let mut d = json!({"StartAt": "C", "States": {
            "Big": { "Type": "Pass", "Result": "big", "End": true },
            "Missing": { "Type": "Pass", "Result": "missing", "End": true }
        }});
        if default {
            c["Default"] = json!("Small");
            d["States"]["Small"] = json!({ "Type": "Pass", "Result": "small", "End": true });
        }
        d["States"]["C"] = c;
        def(d)
    };
    let out = |d: &Definition, input: Value| run(d, input, &mut Answers::new());
    assert_eq!(succeeded(&out(&d(true), json!({ "n": 11 }))), &json!("big"));
    assert_eq!(
        succeeded(&out(&d(true), json!({ "n": 1 }))),
        &json!("small")
    );
    assert_eq!(succeeded(&out(&d(true), json!({}))), &json!("missing"));
    assert_eq!(
        failed(&out(&d(false), json!({ "n": 1 }))).error,
        names::NO_CHOICE_MATCHED
    );
}

#[test]
fn waits_move_the_clock_by_seconds_path_and_timestamp() {
    let d = def(json!({"StartAt": "W1", "States": {
        "W1": { "Type": "Wait", "Seconds": 5, "Next": "W2" },
        "W2": { "Type": "Wait", "SecondsPath": "$.delay", "Next": "W3" },
        "W3": { "Type": "Wait", "TimestampPath": "$.at", "End": true }
    }}));
    let at = machine::format_timestamp(T0 + 60_000);
    let r = run(&d, json!({ "delay": 2, "at": at }), &mut Answers::new());
    assert_eq!(times(&r, "WaitStateExited"), vec![5_000, 7_000, 60_000]);
    // A timestamp already past does not wait.
    let r = run(
        &d,
        json!({ "delay": 0, "at": "2001-01-01T00:00:00Z" }),
        &mut Answers::new(),
    );
    assert_eq!(times(&r, "WaitStateExited"), vec![5_000, 5_000, 5_000]);
}

#[test]
fn parallel_gathers_its_branches_in_order() {
    let d = def(json!({"StartAt": "P", "States": {
        "P": { "Type": "Parallel", "End": true, "ResultSelector": { "first.$": "$[0]", "second.$": "$[1]" }, "Branches": [
            { "StartAt": "Slow", "States": { "Slow": { "Type": "Wait", "Seconds": 3, "Next": "One" }, "One": { "Type": "Pass", "Result": 1, "End": true } } },
            { "StartAt": "Two", "States": { "Two": { "Type": "Pass", "Result": 2, "End": true } } }
        ]}
    }}));
    let r = run(&d, json!({}), &mut Answers::new());
    assert_eq!(succeeded(&r), &json!({ "first": 1, "second": 2 }));
    assert_eq!(times(&r, "ParallelStateExited"), vec![3_000]);
}

#[test]
fn a_failing_branch_fails_the_parallel_state_with_branch_failed() {
    let d = def(json!({"StartAt": "P", "States": {
        "P": { "Type": "Parallel", "Next": "Ok", "Catch": [ { "ErrorEquals": ["States.BranchFailed"], "ResultPath": "$.why", "Next": "Caught" } ], "Branches": [
            { "StartAt": "Long", "States": { "Long": { "Type": "Wait", "Seconds": 100, "End": true } } },
            { "StartAt": "Boom", "States": { "Boom": { "Type": "Fail", "Error": "Broken", "Cause": "on purpose" } } }
        ]},
        "Ok": { "Type": "Succeed" },
        "Caught": { "Type": "Pass", "End": true }
    }}));
    let r = run(&d, json!({ "x": 1 }), &mut Answers::new());
    let out = succeeded(&r);
    assert_eq!(out["why"]["Error"], json!(names::BRANCH_FAILED));
    assert!(
        out["why"]["Cause"].as_str().unwrap().contains("Broken"),
        "{out}"
    );
    assert_eq!(
        r.ended_ms, T0,
        "the other branch was stopped, not waited for"
    );
}

#[test]
fn map_runs_each_item_with_its_selector_and_concurrency() {
    let d = def(json!({"StartAt": "M", "States": {
        "M": { "Type": "Map", "ItemsPath": "$.servers", "MaxConcurrency": 1,
               "ItemSelector": { "name.$": "$$.Map.Item.Value", "index.$": "$$.Map.Item.Index", "app.$": "$.app" },
               "ItemProcessor": { "StartAt": "Drain", "States": {
                   "Drain": { "Type": "Task", "Resource": "portcullis:command", "ResultPath": "$.done", "Next": "Pause" },
                   "Pause": { "Type": "Wait", "Seconds": 1, "End": true } } },
               "End": true }
    }}));
    let mut a = Answers::new();
    a.add("Drain", Canned::Ok(json!(true)));
    let r = run(
        &d,
        json!({ "app": "billing", "servers": ["a", "b", "c"] }),
        &mut a,
    );
    assert_eq!(
        succeeded(&r),
        &json!([
            { "name": "a", "index": 0, "app": "billing", "done": true },
            { "name": "b", "index": 1, "app": "billing", "done": true },
            { "name": "c", "index": 2, "app": "billing", "done": true }
        ])
    );
    // One at a time: each iteration starts after the previous one's second.
    assert_eq!(times(&r, "MapIterationStarted"), vec![0, 1_000, 2_000]);
    // An empty list is an empty result, and a failing iteration is States.BranchFailed.
    let r = run(
        &d,
        json!({ "app": "x", "servers": [] }),
        &mut Answers::new(),
    );
    assert_eq!(succeeded(&r), &json!([]));
    let mut a = Answers::new();
    a.add("Drain", Canned::Ok(json!(1)))
        .add("Drain", Canned::Err(StatesError::new("Nope", "")));
    let r = run(
        &d,
        json!({ "app": "x", "servers": ["a", "b", "c"] }),
        &mut a,
    );
    assert_eq!(failed(&r).error, names::BRANCH_FAILED);
}

#[test]
fn task_timeout_and_heartbeat_timeout() {
    let d = def(json!({"StartAt": "Approve", "States": {
        "Approve": { "Type": "Task", "Resource": "portcullis:wait_for_callback", "TimeoutSeconds": 60, "HeartbeatSeconds": 5, "End": true }
    }}));
    let mut a = Answers::new();
    a.add("Approve", Canned::Silent);
    let r = run(&d, json!({}), &mut a);
    assert_eq!(failed(&r).error, names::HEARTBEAT_TIMEOUT);
    assert_eq!(r.ended_ms - T0, 5_000);
    assert!(
        r.calls[0].token.as_deref().is_some_and(|t| t.len() > 32),
        "a callback task has a token"
    );

    let d = def(
        json!({"StartAt": "Call", "TimeoutSeconds": 3600, "States": {
            "Call": { "Type": "Task", "Resource": "portcullis:http", "TimeoutSeconds": 10, "End": true }
        }}),
    );
    let mut a = Answers::new();
    a.add("Call", Canned::Silent);
    let r = run(&d, json!({}), &mut a);
    assert_eq!(failed(&r).error, names::TIMEOUT);
    assert_eq!(r.ended_ms - T0, 10_000);
}

#[test]
fn the_execution_times_out_as_a_whole() {
    let d = def(
        json!({"StartAt": "W", "TimeoutSeconds": 30, "States": { "W": { "Type": "Wait", "Seconds": 600, "End": true } }}),
    );
    let r = run(&d, json!({}), &mut Answers::new());
    assert!(
        matches!(&r.outcome, Outcome::TimedOut(e) if e.error == names::TIMEOUT),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.ended_ms - T0, 30_000);
}

#[test]
fn callbacks_answer_by_token_and_heartbeats_keep_them_alive() {
    let d = def(json!({"StartAt": "Approve", "States": {
        "Approve": { "Type": "Task", "Resource": "portcullis:wait_for_callback", "HeartbeatSeconds": 5,
                     "Parameters": { "token.$": "$$.Task.Token", "who.$": "$.who" }, "End": true }
    }}));
    let meta = ExecMeta {
        id: "e1".into(),
        name: "n".into(),
        workflow: "w".into(),
        input: json!({ "who": "agent-7" }),
        start_ms: T0,
        version: String::new(),
        parent_key: None,
        hops: 0,
    };
    let (mut exec, _) = machine::start(&d, meta, T0);
    let mut rand = || 0.0;
    let p = machine::step(&d, &mut exec, T0, &mut rand).unwrap();
    let call = &p.calls[0];
    let token = call.token.clone().unwrap();
    assert_eq!(
        call.parameters["token"],
        json!(token),
        "$$.Task.Token is the callback token"
    );
    // A wrong token, or the task's internal key, does not answer it.
    assert!(machine::signal(
        &d,
        &mut exec,
        &SignalKind::Success {
            token: "e1.guess".into(),
            output: "{}".into()
        },
        T0
    )
    .is_err());
    assert!(machine::signal(
        &d,
        &mut exec,
        &SignalKind::Success {
            token: call.key.clone(),
            output: "{}".into()
        },
        T0
    )
    .is_err());
    // A heartbeat at 4 s moves the heartbeat deadline to 9 s.
    machine::signal(
        &d,
        &mut exec,
        &SignalKind::Heartbeat {
            token: token.clone(),
        },
        T0 + 4_000,
    )
    .unwrap();
    assert_eq!(exec.wake_at(), Some(T0 + 9_000));
    assert!(machine::step(&d, &mut exec, T0 + 6_000, &mut rand).is_none());
    machine::signal(
        &d,
        &mut exec,
        &SignalKind::Success {
            token,
            output: r#"{"approved":true}"#.into(),
        },
        T0 + 7_000,
    )
    .unwrap();
    assert_eq!(
        exec.outcome,
        Some(Outcome::Succeeded(json!({ "approved": true })))
    );
}

#[test]
fn a_stop_aborts_and_a_closed_execution_takes_no_signal() {
    let d = def(
        json!({"StartAt": "W", "States": { "W": { "Type": "Wait", "Seconds": 600, "End": true } }}),
    );
    let meta = ExecMeta {
        id: "e".into(),
        name: "n".into(),
        workflow: "w".into(),
        input: json!({}),
        start_ms: T0,
        version: String::new(),
        parent_key: None,
        hops: 0,
    };
    let (mut exec, _) = machine::start(&d, meta, T0);
    let p = machine::signal(
        &d,
        &mut exec,
        &SignalKind::Stop {
            error: "Stopped".into(),
            cause: "by alice".into(),
        },
        T0,
    )
    .unwrap();
    assert_eq!(p.history[0].kind, "ExecutionAborted");
    assert!(matches!(exec.outcome, Some(Outcome::Aborted(_))));
    assert!(machine::signal(&d, &mut exec, &SignalKind::Wake, T0).is_err());
    assert_eq!(exec.wake_at(), None);
}

#[test]
fn history_ids_chain_and_are_capped() {
    let d = def(json!({"StartAt": "A", "States": {
        "A": { "Type": "Pass", "Next": "B" },
        "B": { "Type": "Pass", "Next": "A" }
    }}));
    let r = local::run(&d, json!({}), &mut Answers::new(), T0, 1_000_000).unwrap();
    let e = failed(&r);
    assert_eq!(e.error, names::RUNTIME);
    assert!(e.cause.contains("25000"), "{e:?}");
    // The cap is checked after each transition (a Pass writes two events), then closes.
    assert!(
        (MAX_HISTORY + 1..=MAX_HISTORY + 3).contains(&(r.history.len() as u64)),
        "{}",
        r.history.len()
    );
    for (i, h) in r.history.iter().enumerate() {
        assert_eq!(h.id, i as u64 + 1);
        assert!(h.previous < h.id);
    }
}

#[test]
fn an_oversized_result_is_a_data_limit_error() {
    let d = def(json!({"StartAt": "Call", "States": {
        "Call": { "Type": "Task", "Resource": "portcullis:http", "End": true, "Catch": [ { "ErrorEquals": ["States.ALL"], "Next": "F" } ] },
        "F": { "Type": "Succeed" }
    }}));
    let mut a = Answers::new();
    a.add("Call", Canned::Ok(json!("x".repeat(300 * 1024))));
    assert_eq!(
        failed(&run(&d, json!({}), &mut a)).error,
        names::DATA_LIMIT_EXCEEDED
    );
}

/// Runs `f` on its own thread; fails if it takes longer than `secs` (a hang must fail the
/// test, not stall the suite).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

#[test]
fn a_nested_map_reusing_its_parents_name_is_refused_without_hanging() {
    // Fuzz regression `fuzz/regressions/asl_run/hang-nested-map`, run as the harness runs it.
    // The inner Map took the outer one's place by name, and the definition check then walked
    // the outer Map's processor forever.
    let definition: &[u8] = br#"{"StartAt": "N", "States": {"N": {"Type": "Map", "ItemsPath": "$.x", "ItemProcessor": {"StartAt": "N", "States": {"N": {"Type": "Map", "ItemsPath": "$", "ItemProcessor": {"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}, "End": true}}}, "End": true}}}"#;
    // Not UTF-8 in a key: the harness falls back to `{}`.
    let input: &[u8] = b"{\"vvvvv\xff\xff\xffsvvvv\": [[1,2],[ ],[]]}\n";
    let v: Value = serde_json::from_slice(definition).unwrap();
    let input = serde_json::from_slice::<Value>(input).unwrap_or(json!({}));
    let parsed = v.clone();
    let r = within(5, move || {
        Definition::parse(&parsed).map(|d| local::run(&d, input, &mut Answers::new(), 0, 200))
    });
    let p = r.expect_err("a definition naming two states `N` parsed");
    assert!(
        p.iter()
            .any(|(at, m)| at == "States.N.ItemProcessor.States.N" && m.contains("used twice")),
        "{p:?}"
    );
    // The durable runner loads definitions (from the config, and read back from an
    // execution's history) through the same parse: refused there too, not spun on.
    assert!(within(5, move || super::runner::Loaded::new("nested", v).is_err()));
}

/// A Wait, a timeout or a heartbeat whose seconds come from the input and are past the limit
/// fails the state with `States.Runtime` (they overflowed into the past before, and the Wait
/// ended at once); at the limit, the Wait lasts.
#[test]
fn seconds_from_the_input_past_the_limit_fail_and_never_end_at_once() {
    let d = def(json!({"StartAt": "W", "States": {
        "W": { "Type": "Wait", "SecondsPath": "$.s", "Next": "T" },
        "T": { "Type": "Task", "Resource": "portcullis:http", "TimeoutSecondsPath": "$.s", "End": true }
    }}));
    for s in [
        json!(9_223_372_036_854_775u64),
        json!(i64::MAX),
        json!(u64::MAX),
    ] {
        let r = run(&d, json!({ "s": s }), &mut Answers::new());
        let e = failed(&r);
        assert_eq!(e.error, names::RUNTIME, "{s}: {e:?}");
        assert!(e.cause.contains("over the limit"), "{e:?}");
        assert!(times(&r, "WaitStateExited").is_empty(), "{s}");
    }
    let (mut exec, _) = machine::start(&d, meta(json!({ "s": super::MAX_SECONDS })), T0);
    let mut rand = || 0.5;
    machine::step(&d, &mut exec, T0, &mut rand).unwrap();
    let until = exec.wake_at().unwrap();
    assert_eq!(
        until,
        T0 + super::MAX_SECONDS as i64 * 1000,
        "the Wait lasts"
    );
    assert!(machine::step(&d, &mut exec, T0 + 86_400_000, &mut rand).is_none());
}

/// Deadlines saturate: a time past the end of `i64` milliseconds stays in the far future.
#[test]
fn deadlines_saturate() {
    assert_eq!(super::after_secs(T0, u64::MAX), i64::MAX);
    assert_eq!(super::after_ms(T0, u64::MAX), i64::MAX);
    assert_eq!(super::after_secs(T0, 2), T0 + 2000);
}

fn meta(input: Value) -> ExecMeta {
    ExecMeta {
        id: "e1".into(),
        name: "n".into(),
        workflow: "w".into(),
        input,
        start_ms: T0,
        version: String::new(),
        parent_key: None,
        hops: 0,
    }
}
