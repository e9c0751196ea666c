//! Durable workflows through the real binary: a workflow that drains a server, waits, checks
//! health over HTTP and restores it against a real origin; Cedar (`admin.policies`) refusing a
//! command outside the workflow's lines, caught and audited; Step Functions' naming
//! semantics; a human approval by callback and a heartbeat timeout; kill -9 during a Wait and
//! during a Task, resumed from the last committed transition; bad definitions located, and a
//! reload with one keeping the old definitions; a trigger starting a workflow.

mod common;

use common::{client, eventually, Origin, Proxy};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A config with backend `pool` (server `s1` at `origin`) and backend `other`, `heal` and
/// `approve` workflows, and `extra` appended (more workflows, policies).
fn config(origin: &str, extra: &str) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
backends:
  - {{ name: pool, servers: [{{ name: s1, address: "{origin}" }}] }}
  - {{ name: other, servers: [{{ name: o1, address: "{origin}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}
workflows:
  definitions:
    heal:
      StartAt: Drain
      States:
        Drain:
          Type: Task
          Resource: "portcullis:command"
          Parameters: {{ set_server_state: {{ "backend.$": "$.backend", "server.$": "$.server", state: drain }} }}
          ResultPath: "$.drained"
          Catch: [{{ ErrorEquals: [Control.Forbidden], ResultPath: "$.refused", Next: Refused }}]
          Next: Pause
        Pause: {{ Type: Wait, Seconds: 1, Next: Check }}
        Check:
          Type: Task
          Resource: "portcullis:http"
          Parameters: {{ "url.$": "$.health" }}
          ResultSelector: {{ "status.$": "$.status" }}
          ResultPath: "$.health_check"
          Retry: [{{ ErrorEquals: [Http.503], IntervalSeconds: 1, MaxAttempts: 2 }}]
          Next: Restore
        Restore:
          Type: Task
          Resource: "portcullis:command"
          Parameters: {{ set_server_state: {{ "backend.$": "$.backend", "server.$": "$.server", state: ready }} }}
          ResultPath: null
          End: true
        Refused: {{ Type: Pass, End: true }}
    approve:
      StartAt: Ask
      States:
        Ask:
          Type: Task
          Resource: "portcullis:wait_for_callback"
          HeartbeatSeconds: 2
          Parameters: {{ "token.$": "$$.Task.Token", "who.$": "$.who" }}
          ResultPath: "$.answer"
          End: true
{extra}"#
    )
}

async fn admin(p: &Proxy, m: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (s, text) = p.admin(m, path, body).await;
    (
        s,
        serde_json::from_str(&text).unwrap_or(json!({ "text": text })),
    )
}

async fn start(p: &Proxy, workflow: &str, body: Value) -> (u16, Value) {
    admin(
        p,
        Method::POST,
        &format!("/api/v1/workflows/{workflow}/executions"),
        Some(body),
    )
    .await
}

/// Publishes the CloudEvent `ev` through the admin API, which accepts it.
async fn post_event(p: &Proxy, ev: &Value) {
    let r = client()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(common::ADMIN_TOKEN)
        .header("content-type", "application/cloudevents+json")
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// The callback token of execution `id`'s first task, from its parameters (`$$.Task.Token`)
/// in the history, waiting up to 3 s for the task to be scheduled.
async fn task_token(p: &Proxy, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let h = history(p, id).await;
        if let Some(t) = h
            .iter()
            .find(|e| e["type"] == "TaskScheduled")
            .and_then(|e| e["details"]["parameters"]["token"].as_str())
        {
            return t.to_string();
        }
        assert!(Instant::now() < deadline, "no task scheduled: {h:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn describe(p: &Proxy, id: &str) -> Value {
    let (s, v) = admin(p, Method::GET, &format!("/api/v1/executions/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn history(p: &Proxy, id: &str) -> Vec<Value> {
    let (s, v) = admin(
        p,
        Method::GET,
        &format!("/api/v1/executions/{id}/history"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["events"].as_array().unwrap().clone()
}

/// Waits until the execution is no longer RUNNING: its description.
async fn closed(p: &Proxy, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let d = describe(p, id).await;
        if d["status"] != "RUNNING" {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "still running: {d}\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn server_state(backends: &Value, backend: &str, server: &str) -> String {
    backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend || b["name"] == format!("default/{backend}"))
        .and_then(|b| {
            b["servers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == server)
        })
        .map(|s| s["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn audit_records(dir: &Path) -> Vec<Value> {
    let Ok(files) = std::fs::read_dir(dir.join("audit")) else {
        return Vec::new();
    };
    let mut files: Vec<_> = files.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// An origin that records each request's `Idempotency-Key` and assertion, answering 200
/// (after `delay` for the first request).
struct Recorder {
    origin: Origin,
    keys: Arc<Mutex<Vec<(String, bool)>>>,
}

async fn recorder(delay_first: Duration) -> Recorder {
    let keys: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let k = keys.clone();
    let origin = Origin::start(move |req| {
        let k = k.clone();
        async move {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let signed = req.headers().contains_key("x-portcullis-assertion");
            let first = {
                let mut k = k.lock().unwrap();
                k.push((key, signed));
                k.len() == 1
            };
            if first && !delay_first.is_zero() {
                tokio::time::sleep(delay_first).await;
            }
            Response::new(Full::new(Bytes::from(r#"{"healthy":true}"#)))
        }
    })
    .await;
    Recorder { origin, keys }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_drains_waits_checks_health_and_restores_a_server() {
    let rec = recorder(Duration::ZERO).await;
    let origin = rec.origin.address();
    let p = Proxy::start(&config(&origin, "")).await;
    let input =
        json!({ "backend": "pool", "server": "s1", "health": format!("http://{origin}/health") });
    let (s, v) = start(&p, "heal", json!({ "name": "heal-1", "input": input })).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["started"], json!(true));
    let id = v["executionId"].as_str().unwrap().to_string();
    // It drains first (observed while it waits), then restores.
    assert!(
        eventually(Duration::from_secs(5), || async {
            server_state(&p.backends().await, "pool", "s1") == "drain"
        })
        .await,
        "never drained: {}",
        p.backends().await
    );
    let d = closed(&p, &id, Duration::from_secs(10)).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}\n{}", p.log_text());
    assert_eq!(server_state(&p.backends().await, "pool", "s1"), "ready");
    assert_eq!(d["output"]["health_check"], json!({ "status": 200 }), "{d}");
    assert_eq!(d["output"]["drained"]["applied"], json!(true), "{d}");
    // The health check carried its idempotency key and the workflow's signed assertion.
    let keys = rec.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].0.starts_with(&format!("{id}:Check:")) && keys[0].1,
        "{keys:?}"
    );
    // The history: every state in order, the Wait a second long, ids chained.
    let h = history(&p, &id).await;
    let kinds: Vec<&str> = h.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"ExecutionStarted"));
    assert_eq!(kinds.last(), Some(&"ExecutionSucceeded"));
    for want in [
        "TaskStateEntered",
        "TaskScheduled",
        "TaskSucceeded",
        "WaitStateEntered",
        "WaitStateExited",
    ] {
        assert!(kinds.contains(&want), "{kinds:?}");
    }
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e["id"], json!(i + 1), "{e}");
    }
    // Start, both commands (as the workflow, with the execution) and the end are audited.
    let recs = audit_records(p.dir.path());
    let by_workflow: Vec<&Value> = recs
        .iter()
        .filter(|r| r["principal"]["provider"] == "workflow")
        .collect();
    let actions: Vec<&str> = by_workflow
        .iter()
        .map(|r| r["detail"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["set_state", "set_state", "workflow.end"],
        "{by_workflow:#?}"
    );
    assert_eq!(
        by_workflow[0]["principal"]["user"],
        json!(format!("heal#{id}"))
    );
    assert!(recs
        .iter()
        .any(|r| r["detail"]["action"] == "workflow.start"
            && r["detail"]["args"]["execution"] == json!(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cedar_refuses_a_command_outside_the_workflows_lines_and_the_refusal_is_audited() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.cedar"),
        r#"permit(principal == Portcullis::Workflow::"heal", action == Portcullis::Admin::Action::"server.set_state", resource in Portcullis::Backend::"default/pool");"#,
    )
    .unwrap();
    let yaml = format!(
        "{}\nadmin:\n  bind: \"127.0.0.1:{{admin_port}}\"\n  tokens: [\"{}\"]\n  policies: [admin.cedar]\n",
        config(&origin.address(), ""),
        common::ADMIN_TOKEN
    );
    let p = Proxy::start_in(dir, &yaml).await;
    let input = json!({ "backend": "other", "server": "o1", "health": "http://127.0.0.1:9/" });
    let (s, v) = start(&p, "heal", json!({ "input": input })).await;
    assert_eq!(s, 201, "{v}");
    let id = v["executionId"].as_str().unwrap().to_string();
    let d = closed(&p, &id, Duration::from_secs(5)).await;
    // Caught: the workflow went to `Refused` with the error, and nothing was drained.
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(d["output"]["refused"]["Error"], "Control.Forbidden", "{d}");
    assert_eq!(server_state(&p.backends().await, "other", "o1"), "ready");
    let recs = audit_records(p.dir.path());
    let denied: Vec<&Value> = recs
        .iter()
        .filter(|r| r["decision"] == "deny" && r["kind"] == "admin")
        .collect();
    assert_eq!(denied.len(), 1, "{recs:#?}");
    assert_eq!(denied[0]["principal"]["user"], json!(format!("heal#{id}")));
    assert_eq!(denied[0]["detail"]["args"]["backend"], "default/other");
    // The same workflow on its own backend is allowed.
    let input = json!({ "backend": "pool", "server": "s1", "health": format!("http://{}/", origin.address()) });
    let (_, v) = start(&p, "heal", json!({ "input": input })).await;
    let d = closed(
        &p,
        v["executionId"].as_str().unwrap(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert!(d["output"].get("refused").is_none(), "{d}");
}

/// A trigger or a workflow starts a workflow only where `admin.policies` permit it
/// `workflow.start` on it: the started execution acts with its own workflow's permissions,
/// which a trigger or workflow allowed nothing must not reach. Refusals are audited; a
/// workflow sees `Control.Forbidden`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automation_starts_only_the_workflows_policy_permits_it() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.cedar"),
        r#"permit(principal == Portcullis::Trigger::"asker", action == Portcullis::Admin::Action::"workflow.start", resource == Portcullis::Workflow::"approve");"#,
    )
    .unwrap();
    let extra = r#"    spawner:
      StartAt: Spawn
      States:
        Spawn:
          Type: Task
          Resource: "portcullis:start_workflow"
          Parameters: { workflow: heal, input: { backend: other, server: o1, health: "http://127.0.0.1:9/" } }
          Catch: [{ ErrorEquals: [Control.Forbidden], ResultPath: "$.refused", Next: Refused }]
          End: true
        Refused: { Type: Pass, End: true }
triggers:
  - name: starter
    match: { type: com.example.heal }
    actions: [{ start_workflow: { name: heal, input: { backend: other, server: o1, health: "http://127.0.0.1:9/" } } }]
  - name: asker
    match: { type: com.example.ask }
    actions: [{ start_workflow: { name: approve, input: { who: agent-1 } } }]
"#;
    let yaml = format!(
        "{}\nadmin:\n  bind: \"127.0.0.1:{{admin_port}}\"\n  tokens: [\"{}\"]\n  policies: [admin.cedar]\n",
        config(&origin.address(), extra),
        common::ADMIN_TOKEN
    );
    let p = Proxy::start_in(dir, &yaml).await;
    post_event(
        &p,
        &json!({ "specversion": "1.0", "id": "h-1", "source": "/ops", "type": "com.example.heal" }),
    )
    .await;
    post_event(
        &p,
        &json!({ "specversion": "1.0", "id": "a-1", "source": "/ops", "type": "com.example.ask" }),
    )
    .await;
    let (s, v) = start(&p, "spawner", json!({})).await;
    assert_eq!(s, 201, "{v}");
    let d = closed(
        &p,
        v["executionId"].as_str().unwrap(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(d["output"]["refused"]["Error"], "Control.Forbidden", "{d}");
    // The permitted start happened; the two refused ones did not, and are on the record.
    let listed = |w: &'static str| {
        let p = &p;
        async move {
            let (_, v) = admin(
                p,
                Method::GET,
                &format!("/api/v1/executions?workflow={w}"),
                None,
            )
            .await;
            v["executions"].as_array().map_or(0, Vec::len)
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            listed("approve").await == 1
        })
        .await,
        "{}",
        p.log_text()
    );
    let refused = || {
        audit_records(p.dir.path())
            .into_iter()
            .filter(|r| r["decision"] == "deny" && r["detail"]["action"] == "start_workflow")
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || async { refused().len() == 2 }).await,
        "{:#?}",
        audit_records(p.dir.path())
    );
    let by: Vec<String> = refused()
        .iter()
        .map(|r| r["principal"]["provider"].as_str().unwrap().to_string())
        .collect();
    assert!(
        by.contains(&"trigger".to_string()) && by.contains(&"workflow".to_string()),
        "{by:?}"
    );
    assert_eq!(listed("heal").await, 0);
    assert_eq!(server_state(&p.backends().await, "other", "o1"), "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_executions_start_once() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&config(&origin.address(), "")).await;
    let (s, first) = start(
        &p,
        "approve",
        json!({ "name": "req-1", "input": { "who": "agent-7" } }),
    )
    .await;
    assert_eq!(s, 201, "{first}");
    // The same name and input while it runs: the running execution.
    let (s, again) = start(
        &p,
        "approve",
        json!({ "name": "req-1", "input": { "who": "agent-7" } }),
    )
    .await;
    assert_eq!(
        (s, again["started"].clone()),
        (200, json!(false)),
        "{again}"
    );
    assert_eq!(again["executionId"], first["executionId"]);
    // Another input: ExecutionAlreadyExists.
    let (s, other) = start(
        &p,
        "approve",
        json!({ "name": "req-1", "input": { "who": "agent-8" } }),
    )
    .await;
    assert_eq!(s, 409, "{other}");
    assert!(
        other["error"]
            .as_str()
            .unwrap()
            .contains("ExecutionAlreadyExists"),
        "{other}"
    );
    // Closed: even the same input is refused.
    let id = first["executionId"].as_str().unwrap();
    // A stop whose texts are not strings is refused, not read as the defaults.
    for body in [
        json!({ "error": 7 }),
        json!({ "cause": { "x": 1 } }),
        json!("x"),
        json!([]),
    ] {
        let (s, v) = admin(
            &p,
            Method::POST,
            &format!("/api/v1/executions/{id}/stop"),
            Some(body),
        )
        .await;
        assert_eq!(s, 400, "{v}");
    }
    let (s, _) = admin(
        &p,
        Method::POST,
        &format!("/api/v1/executions/{id}/stop"),
        Some(json!({ "cause": "test" })),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        closed(&p, id, Duration::from_secs(5)).await["status"],
        "ABORTED"
    );
    // Stopping what is not running (ended, or never was) changes nothing and records
    // nothing.
    let stops = || {
        audit_records(p.dir.path())
            .into_iter()
            .filter(|r| r["detail"]["action"] == "workflow.stop")
            .count()
    };
    let before = stops();
    assert!(before >= 1, "the stop above was recorded");
    for target in [id, "no-such-execution"] {
        let (s, _) = admin(
            &p,
            Method::POST,
            &format!("/api/v1/executions/{target}/stop"),
            Some(json!({ "cause": "test" })),
        )
        .await;
        assert_eq!(s, 404, "{target}");
    }
    assert_eq!(stops(), before, "a stop of nothing was recorded");
    let (s, _) = start(
        &p,
        "approve",
        json!({ "name": "req-1", "input": { "who": "agent-7" } }),
    )
    .await;
    assert_eq!(s, 409);
    // Bad requests: unknown workflow, input not JSON, input over 256 KiB, a bad name.
    assert_eq!(start(&p, "nope", json!({})).await.0, 404);
    let r = client()
        .post(p.admin_url("/api/v1/workflows/approve/executions"))
        .bearer_auth(common::ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = "x".repeat(300 * 1024);
    let (s, v) = start(&p, "approve", json!({ "input": { "big": big } })).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("256"), "{v}");
    assert_eq!(
        start(&p, "approve", json!({ "name": "has space" })).await.0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_resumes_on_its_callback_and_a_missed_heartbeat_fails_it() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&config(&origin.address(), "")).await;
    let (_, a) = start(&p, "approve", json!({ "input": { "who": "agent-7" } })).await;
    let (_, b) = start(&p, "approve", json!({ "input": { "who": "agent-8" } })).await;
    let a = a["executionId"].as_str().unwrap().to_string();
    let b = b["executionId"].as_str().unwrap().to_string();
    // The token is in the task's parameters ($$.Task.Token), in the history.
    let token = task_token(&p, &a).await;
    // A heartbeat keeps it alive past its 2 s; a forged token matches nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (s, _) = admin(
        &p,
        Method::POST,
        "/api/v1/callbacks/heartbeat",
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(s, 200);
    let forged = format!("{a}.00000000000000000000000000000000");
    let (s, _) = admin(
        &p,
        Method::POST,
        "/api/v1/callbacks/success",
        Some(json!({ "token": forged, "output": {} })),
    )
    .await;
    assert_eq!(s, 404);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The approver answers with the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "workflow",
            "send-success",
            &token,
            "--output",
            r#"{"approved": true}"#,
            "--admin",
        ])
        .arg(p.admin_url(""))
        .env("PORTCULLIS_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let d = closed(&p, &a, Duration::from_secs(5)).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(d["output"]["answer"], json!({ "approved": true }));
    // The other one had no heartbeat.
    let d = closed(&p, &b, Duration::from_secs(5)).await;
    assert_eq!(
        (d["status"].as_str(), d["error"].as_str()),
        (Some("FAILED"), Some("States.HeartbeatTimeout")),
        "{d}"
    );
    // A token used once answers nothing more, and says why.
    let (s, v) = admin(
        &p,
        Method::POST,
        "/api/v1/callbacks/success",
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(s, 409, "{v}");
}

/// Five answers to one callback token at once: one is taken (200), the other four are told
/// 409 and audited as refused; they were all told 200 before, and four were dropped unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_answers_to_one_token_take_one() {
    let origin = Origin::named("o").await;
    let extra = "    ask:\n      StartAt: Ask\n      States:\n        Ask:\n          Type: Task\n          Resource: \"portcullis:wait_for_callback\"\n          Parameters: { \"token.$\": \"$$.Task.Token\" }\n          End: true\n";
    let p = Proxy::start(&config(&origin.address(), extra)).await;
    let (_, a) = start(&p, "ask", json!({})).await;
    let a = a["executionId"].as_str().unwrap().to_string();
    let token = task_token(&p, &a).await;
    let answers = (1..=5).map(|n| {
        let (p, token) = (&p, token.clone());
        async move {
            let body = json!({ "token": token, "output": { "approver": n } });
            let (s, v) = admin(p, Method::POST, "/api/v1/callbacks/success", Some(body)).await;
            (n, s, v)
        }
    });
    let answers = futures_util::future::join_all(answers).await;
    let taken: Vec<_> = answers.iter().filter(|(_, s, _)| *s == 200).collect();
    assert_eq!(taken.len(), 1, "{answers:?}");
    for (_, s, v) in answers.iter().filter(|(_, s, _)| *s != 200) {
        assert_eq!(*s, 409, "{v}");
        assert!(v.to_string().contains("answered before"), "{v}");
    }
    let d = closed(&p, &a, Duration::from_secs(5)).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    assert_eq!(
        d["output"],
        json!({ "approver": taken[0].0 }),
        "the one taken"
    );
    let refused = audit_records(p.dir.path())
        .into_iter()
        .filter(|r| r["detail"]["action"] == "workflow.callback.success.refused")
        .count();
    assert_eq!(refused, 4);
}

/// Kills the proxy with SIGKILL and starts it again on the same directory (store, audit).
async fn kill_and_restart(mut p: Proxy, yaml: &str) -> Proxy {
    p.signal(libc::SIGKILL);
    let _ = p.child.wait();
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    drop(p);
    Proxy::start_in(dir, yaml).await
}

fn time_of(events: &[Value], kind: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| {
            let t = time::OffsetDateTime::parse(
                e["timestamp"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            (t.unix_timestamp_nanos() / 1_000_000) as i64
        })
        .collect()
}

fn assert_no_gap_or_repeat(h: &[Value]) {
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e["id"], json!(i + 1), "a gap or a repeat at {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_wait_resumes_and_the_wait_ends_on_time() {
    let rec = recorder(Duration::ZERO).await;
    let extra = format!(
        r#"    sleepy:
      StartAt: Sleep
      States:
        Sleep: {{ Type: Wait, Seconds: 4, Next: Call }}
        Call: {{ Type: Task, Resource: "portcullis:http", Parameters: {{ url: "http://{}/done" }}, End: true }}
"#,
        rec.origin.address()
    );
    let yaml = config(&rec.origin.address(), &extra);
    let p = Proxy::start(&yaml).await;
    let (s, v) = start(&p, "sleepy", json!({})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["executionId"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = kill_and_restart(p, &yaml).await;
    let d = closed(&p, &id, Duration::from_secs(10)).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}\n{}", p.log_text());
    let h = history(&p, &id).await;
    assert_no_gap_or_repeat(&h);
    let (entered, exited) = (
        time_of(&h, "WaitStateEntered"),
        time_of(&h, "WaitStateExited"),
    );
    assert_eq!((entered.len(), exited.len()), (1, 1), "{h:#?}");
    let waited = exited[0] - entered[0];
    // Not shortened, and not started again after the restart (which would be ≥ 5.5 s).
    assert!((4_000..5_200).contains(&waited), "waited {waited} ms");
    assert_eq!(rec.keys.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_task_sends_it_again_with_the_same_key() {
    // The first request is held for 3 s: the proxy is killed while it waits for it.
    let rec = recorder(Duration::from_secs(3)).await;
    let extra = format!(
        r#"    call:
      StartAt: Call
      States:
        Call: {{ Type: Task, Resource: "portcullis:http", Parameters: {{ url: "http://{}/op" }}, Next: After }}
        After: {{ Type: Pass, End: true }}
"#,
        rec.origin.address()
    );
    let yaml = config(&rec.origin.address(), &extra);
    let p = Proxy::start(&yaml).await;
    let (_, v) = start(&p, "call", json!({ "name": "op-1" })).await;
    let id = v["executionId"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            !rec.keys.lock().unwrap().is_empty()
        })
        .await
    );
    let p = kill_and_restart(p, &yaml).await;
    let d = closed(&p, &id, Duration::from_secs(15)).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}\n{}", p.log_text());
    // The target saw one key (sent twice: before and after the crash), never a new one.
    let keys = rec.keys.lock().unwrap().clone();
    let mut distinct: HashMap<String, usize> = HashMap::new();
    for (k, _) in &keys {
        *distinct.entry(k.clone()).or_default() += 1;
    }
    assert_eq!(distinct.len(), 1, "{keys:?}");
    let h = history(&p, &id).await;
    assert_no_gap_or_repeat(&h);
    let scheduled = h.iter().filter(|e| e["type"] == "TaskScheduled").count();
    let succeeded = h.iter().filter(|e| e["type"] == "TaskSucceeded").count();
    assert_eq!((scheduled, succeeded), (1, 1), "{h:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_definitions_are_located_and_a_reload_keeps_the_old_ones() {
    let origin = Origin::named("o").await;
    let good = config(&origin.address(), "");
    let p = Proxy::start(&good).await;
    let (_, before) = admin(&p, Method::GET, "/api/v1/workflows", None).await;
    let names: Vec<&str> = before["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["approve", "heal"]);
    // `Pause` now goes nowhere.
    let bad = good.replace(
        "Pause: { Type: Wait, Seconds: 1, Next: Check }",
        "Pause: { Type: Wait, Seconds: 1, Next: Chekc }",
    );
    assert_ne!(bad, good);
    p.write_config(&bad);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&p.config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let line = bad.lines().position(|l| l.contains("Chekc")).unwrap() + 1;
    assert!(
        text.contains(&format!("portcullis.yaml:{line}:")) && text.contains("Chekc"),
        "want line {line}: {text}"
    );
    let (s, v) = admin(&p, Method::POST, "/api/v1/reload", None).await;
    assert_eq!(s, 422, "{v}");
    let (_, after) = admin(&p, Method::GET, "/api/v1/workflows", None).await;
    assert_eq!(after, before, "the old definitions keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_starts_a_workflow_once_per_firing() {
    let origin = Origin::named("o").await;
    let extra = "triggers:\n  - name: ask\n    match: { type: com.example.access.requested }\n    actions: [{ start_workflow: { name: approve, input: { who: agent-9 } } }]\n";
    let yaml = config(&origin.address(), "") + extra;
    let p = Proxy::start(&yaml).await;
    let ev = json!({ "specversion": "1.0", "id": "ev-1", "source": "/agents", "type": "com.example.access.requested", "data": {} });
    post_event(&p, &ev).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let (_, v) = admin(&p, Method::GET, "/api/v1/executions?workflow=approve", None).await;
        if v["executions"].as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no execution started: {v}\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let e = &list["executions"][0];
    assert_eq!(e["startedBy"], "Portcullis::Trigger::\"ask\"");
    assert_eq!(e["input"], json!({ "who": "agent-9" }));
}

/// An event a workflow emits is automation's doing, as a trigger's `emit` is: a trigger that
/// starts the workflow on that very event type does not loop through it (it ran until the
/// global action cap before, starving every other trigger for the rest of the minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_does_not_loop_through_the_workflow_it_starts() {
    let origin = Origin::named("o").await;
    let extra = "    pinger:\n      StartAt: Ping\n      States:\n        Ping:\n          Type: Task\n          Resource: \"portcullis:emit\"\n          Parameters: { type: com.example.ping }\n          End: true\ntriggers:\n  - name: loop\n    match: { type: com.example.ping }\n    actions: [{ start_workflow: { name: pinger } }]\n";
    let p = Proxy::start(&config(&origin.address(), extra)).await;
    let ev = json!({ "specversion": "1.0", "id": "ping-1", "source": "/ops", "type": "com.example.ping" });
    post_event(&p, &ev).await;
    let runs = || async {
        let (_, v) = admin(&p, Method::GET, "/api/v1/executions?workflow=pinger", None).await;
        v["executions"].as_array().map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs().await == 0 {
        assert!(Instant::now() < deadline, "no execution\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a loop to show: each round is a firing, an execution and an event.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs().await, 1, "{}", p.log_text());
}

/// A trigger that opts into automation's events (`max_hops: 2`) and starts a workflow that
/// emits the event it matches goes round twice, not more: what the execution emits has the
/// hop of the firing that started it. Each round counted as hop 1 before, so the loop ran
/// until the global cap of 120 actions a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hops_stops_a_loop_through_a_workflow() {
    let origin = Origin::named("o").await;
    let extra = "    pinger:\n      StartAt: Ping\n      States:\n        Ping:\n          Type: Task\n          Resource: \"portcullis:emit\"\n          Parameters: { type: com.example.ping }\n          End: true\ntriggers:\n  - name: loop\n    match: { type: com.example.ping }\n    automation_events: { allow: true, max_hops: 2 }\n    actions: [{ start_workflow: { name: pinger } }]\n";
    let p = Proxy::start(&config(&origin.address(), extra)).await;
    let ev = json!({ "specversion": "1.0", "id": "ping-1", "source": "/ops", "type": "com.example.ping" });
    post_event(&p, &ev).await;
    let runs = || async {
        let (_, v) = admin(&p, Method::GET, "/api/v1/executions?workflow=pinger", None).await;
        v["executions"].as_array().map_or(0, Vec::len)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs().await < 2 {
        assert!(
            Instant::now() < deadline,
            "no second round\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a third round to show: each round is a firing, an execution and an event.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs().await, 2, "{}", p.log_text());
}

/// An execution a trigger started is held to the triggers' guard rail (`max_unavailable`,
/// 50% by default) when it takes a server out: it may not drain `pool`'s only server (it
/// drained every server before, whatever the trigger's own limit), and fails with
/// `Control.MaxUnavailable`. One an operator starts drains it (see the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_started_workflow_keeps_to_max_unavailable() {
    let origin = Origin::named("o").await;
    let extra = "triggers:\n  - name: healer\n    match: { type: com.example.heal }\n    actions: [{ start_workflow: { name: heal, input: { backend: pool, server: s1, health: \"http://127.0.0.1:9/\" } } }]\n";
    let p = Proxy::start(&config(&origin.address(), extra)).await;
    let ev = json!({ "specversion": "1.0", "id": "heal-1", "source": "/ops", "type": "com.example.heal" });
    post_event(&p, &ev).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = loop {
        let (_, v) = admin(&p, Method::GET, "/api/v1/executions?workflow=heal", None).await;
        if let Some(e) = v["executions"].as_array().and_then(|a| a.first()) {
            if e["status"] != "RUNNING" {
                break e.clone();
            }
        }
        assert!(Instant::now() < deadline, "no end: {v}\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ended["status"], "FAILED", "{ended}");
    assert_eq!(ended["error"], "Control.MaxUnavailable", "{ended}");
    assert_eq!(server_state(&p.backends().await, "pool", "s1"), "ready");
}
