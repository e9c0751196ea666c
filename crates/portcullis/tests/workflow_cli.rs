//! `portcullis workflow`, run as a process: `validate` locates every problem at file:line:col,
//! `run` executes the shipped examples (examples/workflows/) in memory with canned task
//! results and virtual time, and the admin API commands send the requests the API expects
//! (against a stand-in server that records them; the live proxy is tested elsewhere).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env_remove("PORTCULLIS_ADMIN_TOKEN")
        .output()
        .expect("run portcullis")
}

/// Exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = portcullis(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/workflows")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The outcome line of `workflow run` (its first line).
fn outcome(stdout: &str) -> Value {
    let first = stdout.lines().next().unwrap_or_default();
    serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `workflow run --history`'s events: (id, type, offset in ms, details).
fn events(stdout: &str) -> Vec<(u64, String, i64, Value)> {
    stdout
        .lines()
        .skip(1)
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let id = parts.next().unwrap().parse().unwrap();
            let kind = parts.next().unwrap().to_string();
            let at = parts.next().unwrap();
            let ms = at
                .strip_prefix('+')
                .and_then(|s| s.strip_suffix("ms"))
                .unwrap_or_else(|| panic!("`{at}` in {l}"))
                .parse()
                .unwrap();
            let details = serde_json::from_str(parts.next().unwrap()).unwrap();
            (id, kind, ms, details)
        })
        .collect()
}

/// When each task of `state` was scheduled (ms from the start), and with what parameters.
fn scheduled(evs: &[(u64, String, i64, Value)], state: &str) -> Vec<(i64, Value)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for (_, kind, ms, d) in evs {
        if kind.ends_with("StateEntered") {
            current = d["name"].as_str().unwrap_or_default().to_string();
        }
        if kind == "TaskScheduled" && current == state {
            out.push((*ms, d["parameters"].clone()));
        }
    }
    out
}

const DRAIN_INPUT: &str = r#"{"backend": "web", "server": "web-1", "drain_seconds": 1, "health_url": "http://127.0.0.1:9001/"}"#;
const ACCESS_INPUT: &str = r#"{"agent": "agents/deploy-bot", "key_id": "deploy-bot-example", "scope": "deploy", "reason": "release 42"}"#;

#[test]
fn the_examples_are_valid() {
    let (code, out, err) = run(&[
        "workflow",
        "validate",
        &example("drain-restore.asl.json"),
        &example("agent-access.asl.json"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("drain-restore.asl.json: valid, 7 states"),
        "{out}"
    );
    assert!(
        out.contains("agent-access.asl.json: valid, 6 states"),
        "{out}"
    );
}

#[test]
fn a_file_that_is_not_json_is_located_where_the_parser_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "broken.asl.json",
        "{\n  \"StartAt\": \"A\",\n  \"States\": {\n    \"A\": { \"Type\": \"Succeed\" }\n    \"B\": { \"Type\": \"Succeed\" }\n  }\n}\n",
    );
    let (code, out, err) = run(&["workflow", "validate", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "{}:5:5: not valid JSON: expected `,` or `}}`",
            f.display()
        )),
        "{out}"
    );
    // YAML too, with the parser's position.
    let y = write(
        dir.path(),
        "broken.asl.yaml",
        "StartAt: A\nStates:\n  A: { Type: Succeed\n",
    );
    let (code, out, _) = run(&["workflow", "validate", y.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("{}:", y.display())) && out.contains("not valid YAML"),
        "{out}"
    );
}

#[test]
fn a_dangling_next_is_located_at_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "dangling.asl.json",
        r#"{
  "StartAt": "Drain",
  "States": {
    "Drain": {
      "Type": "Pass",
      "Next": "Nowhere"
    },
    "Lost": { "Type": "Succeed" }
  }
}
"#,
    );
    let good = example("drain-restore.asl.json");
    let (code, out, err) = run(&["workflow", "validate", &good, f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let file = f.display().to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with("drain-restore.asl.json: valid, 7 states"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{file}:6:15: States.Drain.Next: `Nowhere` is not a state"
        )),
        "{out}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{file}:8:13: States.Lost: state `Lost` is unreachable"
        )),
        "{out}"
    );
    assert!(err.contains("1 of 2 file(s) invalid"), "{err}");
    // The same in YAML, and as JSON for tools.
    let y = write(
        dir.path(),
        "dangling.asl.yaml",
        "StartAt: Drain\nStates:\n  Drain:\n    Type: Pass\n    Next: Nowhere\n",
    );
    let (code, out, _) = run(&["workflow", "validate", "--json", y.to_str().unwrap()]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["valid"], json!(false));
    assert_eq!(
        (&v[0]["problems"][0]["line"], &v[0]["problems"][0]["path"]),
        (&json!(5), &json!("States.Drain.Next"))
    );
}

#[test]
fn drain_restore_drains_waits_checks_and_restores() {
    let (code, out, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &example("drain-restore.asl.json"),
        "--input",
        DRAIN_INPUT,
        "--task-result",
        r#"Drain={"applied": true}"#,
        "--task-failure",
        "CheckHealth=Http.503:starting",
        "--task-result",
        r#"CheckHealth={"status": 200, "body": "ok"}"#,
        "--task-result",
        r#"Restore={"applied": true}"#,
        "--history",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut expected: Value = serde_json::from_str(DRAIN_INPUT).unwrap();
    expected["health"] = json!({ "status": 200 });
    assert_eq!(
        outcome(&out),
        json!({ "status": "SUCCEEDED", "output": expected })
    );
    let evs = events(&out);
    assert_eq!(
        scheduled(&evs, "Drain"),
        vec![(
            0,
            json!({ "set_server_state": { "backend": "web", "server": "web-1", "state": "drain" } })
        )]
    );
    // One second of Wait, then a retry one second after the 503.
    let checks: Vec<i64> = scheduled(&evs, "CheckHealth").iter().map(|c| c.0).collect();
    assert_eq!(checks, vec![1000, 2000]);
    assert_eq!(
        scheduled(&evs, "Restore"),
        vec![(
            2000,
            json!({ "set_server_state": { "backend": "web", "server": "web-1", "state": "ready" } })
        )]
    );
    assert_eq!(evs.last().unwrap().1, "ExecutionSucceeded");
    // Ids follow each other, from 1.
    assert!(evs.iter().enumerate().all(|(i, e)| e.0 == i as u64 + 1));
}

#[test]
fn drain_restore_opens_an_incident_when_the_server_stays_unhealthy() {
    let (code, out, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &example("drain-restore.asl.json"),
        "--input",
        DRAIN_INPUT,
        "--task-result",
        "Drain={}",
        "--task-failure",
        "CheckHealth=Http.503:still down",
        "--task-result",
        r#"OpenIncident={"id": "ev-1"}"#,
        "--history",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        outcome(&out),
        json!({ "status": "FAILED", "error": "HealthCheckFailed", "cause": "still down" })
    );
    let evs = events(&out);
    // The first check after the 1 s wait, then 3 retries 1 s, 2 s and 4 s apart.
    let checks: Vec<i64> = scheduled(&evs, "CheckHealth").iter().map(|c| c.0).collect();
    assert_eq!(checks, vec![1000, 2000, 4000, 8000]);
    let incident = scheduled(&evs, "OpenIncident");
    assert_eq!(incident.len(), 1);
    assert_eq!(incident[0].0, 8000);
    assert_eq!(
        incident[0].1,
        json!({
            "type": "com.example.incident.opened",
            "subject": "web/web-1",
            "data": {
                "summary": "web-1 stays unhealthy after a drain; it is left drained",
                "error": { "Error": "Http.503", "Cause": "still down" }
            }
        })
    );
    assert!(scheduled(&evs, "Restore").is_empty());
}

#[test]
fn agent_access_waits_for_an_approval_then_tags_the_key() {
    let (code, out, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &example("agent-access.asl.json"),
        "--input",
        ACCESS_INPUT,
        "--task-result",
        r#"AnnounceRequest={"id": "ev-1"}"#,
        "--task-result",
        r#"AwaitApproval={"approved": true, "by": "alice"}"#,
        "--task-result",
        r#"Grant={"applied": true}"#,
        "--history",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        outcome(&out),
        json!({ "status": "SUCCEEDED", "output": { "approved": true, "by": "alice" } })
    );
    let evs = events(&out);
    let announce = &scheduled(&evs, "AnnounceRequest")[0].1;
    assert_eq!(announce["type"], json!("com.example.access.requested"));
    assert_eq!(announce["data"]["execution"], json!("local"));
    let wait = &scheduled(&evs, "AwaitApproval")[0].1;
    assert!(
        wait["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("local.") && t.len() > 20),
        "{wait}"
    );
    assert_eq!(
        wait["question"],
        json!("May agents/deploy-bot have deploy access? (release 42)")
    );
    assert_eq!(
        scheduled(&evs, "Grant")[0].1,
        json!({ "set_table": { "table": "per_key", "key": "deploy-bot-example", "tag": "approved" } })
    );
}

#[test]
fn agent_access_is_denied_refused_or_times_out() {
    let def = example("agent-access.asl.json");
    let base = [
        "workflow",
        "run",
        "--definition",
        def.as_str(),
        "--input",
        ACCESS_INPUT,
        "--task-result",
        "AnnounceRequest={}",
    ];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        run(&a)
    };
    // The approver says no.
    let (code, out, _) = with(&["--task-result", r#"AwaitApproval={"approved": false}"#]);
    assert_eq!(code, 1);
    assert_eq!(
        outcome(&out),
        json!({ "status": "FAILED", "error": "AccessDenied", "cause": "the approver denied the request" })
    );
    // An answer without `approved` is not an approval.
    let (code, out, _) = with(&["--task-result", r#"AwaitApproval={"by": "alice"}"#]);
    assert_eq!((code, &outcome(&out)["error"]), (1, &json!("AccessDenied")));
    // send-failure: the approver's error ends it.
    let (code, out, _) = with(&[
        "--task-failure",
        "AwaitApproval=Rejected:not during the freeze",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        outcome(&out),
        json!({ "status": "FAILED", "error": "Rejected", "cause": "not during the freeze" })
    );
    // Nobody answers: an hour without a heartbeat.
    let (code, out, _) = with(&["--task-result", "AwaitApproval=silent", "--history"]);
    assert_eq!(code, 1);
    assert_eq!(outcome(&out)["error"], json!("States.HeartbeatTimeout"));
    let evs = events(&out);
    let timed_out = evs.iter().find(|e| e.1 == "TaskTimedOut").unwrap();
    assert_eq!(timed_out.2, 3_600_000);
}

#[test]
fn retries_back_off_as_the_specification_says() {
    // The specification's example: IntervalSeconds 3, BackoffRate 2: retries 3 s then 6 s
    // later; with MaxDelaySeconds 4 the second waits 4 s.
    let dir = tempfile::tempdir().unwrap();
    let def = |max_delay: &str| {
        format!(
            r#"{{"StartAt": "Call", "States": {{
  "Call": {{ "Type": "Task", "Resource": "portcullis:http",
            "Parameters": {{ "url": "http://127.0.0.1:9/" }},
            "Retry": [ {{ "ErrorEquals": ["Http.503"], "IntervalSeconds": 3, "BackoffRate": 2, "MaxAttempts": 2{max_delay} }} ],
            "End": true }}
}}}}"#
        )
    };
    let plain = write(dir.path(), "retry.asl.json", &def(""));
    let capped = write(
        dir.path(),
        "capped.asl.json",
        &def(r#", "MaxDelaySeconds": 4"#),
    );
    let answers = [
        "--task-failure",
        "Call=Http.503",
        "--task-failure",
        "Call=Http.503",
        "--task-result",
        r#"Call={"status": 200, "body": "ok"}"#,
        "--history",
    ];
    for (f, times) in [
        (&plain, vec![0, 3000, 9000]),
        (&capped, vec![0, 3000, 7000]),
    ] {
        let mut a = vec!["workflow", "run", "--definition", f.to_str().unwrap()];
        a.extend_from_slice(&answers);
        let (code, out, err) = run(&a);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            outcome(&out),
            json!({ "status": "SUCCEEDED", "output": { "status": 200, "body": "ok" } })
        );
        let at: Vec<i64> = scheduled(&events(&out), "Call")
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(at, times, "{out}");
        if times[2] == 9000 {
            assert!(
                out.contains(" TaskScheduled +3000ms ") && out.contains(" TaskScheduled +9000ms "),
                "{out}"
            );
        }
    }
    // A third failure is one too many: the error ends the execution.
    let mut a = vec!["workflow", "run", "--definition", plain.to_str().unwrap()];
    a.extend_from_slice(&["--task-failure", "Call=Http.503:busy"]);
    let (code, out, _) = run(&a);
    assert_eq!(code, 1);
    assert_eq!(
        outcome(&out),
        json!({ "status": "FAILED", "error": "Http.503", "cause": "busy" })
    );
}

#[test]
fn bad_arguments_are_refused_with_exit_2() {
    let def = example("drain-restore.asl.json");
    let (code, _, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &def,
        "--input",
        "{backend: web}",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--input is not JSON"), "{err}");
    // Over the payload cap (given as @FILE: one argument this long is more than exec takes).
    let dir = tempfile::tempdir().unwrap();
    let big = write(
        dir.path(),
        "big.json",
        &format!("{{\"x\": \"{}\"}}", "a".repeat(300 * 1024)),
    );
    let big = format!("@{}", big.display());
    let (code, _, err) = run(&["workflow", "run", "--definition", &def, "--input", &big]);
    assert_eq!(code, 2);
    assert!(err.contains("over the 262144-byte limit"), "{err}");
    let (code, _, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &def,
        "--task-result",
        "Drian={}",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("`Drian` is not a Task state"), "{err}");
    let (code, _, err) = run(&[
        "workflow",
        "run",
        "--definition",
        &def,
        "--task-failure",
        "Drain",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("STATE=ERROR"), "{err}");
    // An invalid definition is not run.
    let bad = write(
        dir.path(),
        "bad.asl.json",
        r#"{"StartAt": "A", "States": {"A": {"Type": "Teleport"}}}"#,
    );
    let (code, _, err) = run(&["workflow", "run", "--definition", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("States.A.Type: unknown state type `Teleport`"),
        "{err}"
    );
    // The admin commands need a token.
    let (code, _, err) = run(&["workflow", "list"]);
    assert_eq!(code, 2);
    assert!(err.contains("PORTCULLIS_ADMIN_TOKEN"), "{err}");
}

/// What the stand-in saw of each request: its request line, `Authorization` and body.
type Seen = Vec<(String, String, String)>;

/// A stand-in admin API: answers each of `answers` (status, body) in turn, and returns what it
/// was sent.
fn stand_in(answers: Vec<(u16, &'static str)>) -> (String, std::thread::JoinHandle<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in answers {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let (mut auth, mut len) = (String::new(), 0usize);
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "authorization" => auth = v.trim().to_string(),
                    "content-length" => len = v.trim().parse().unwrap(),
                    _ => {}
                }
            }
            let mut b = vec![0; len];
            r.read_exact(&mut b).unwrap();
            seen.push((
                line.trim_end().to_string(),
                auth,
                String::from_utf8(b).unwrap(),
            ));
            let mut s = r.into_inner();
            write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
        seen
    });
    (addr, h)
}

#[test]
fn admin_commands_send_the_apis_requests_and_print_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "admin.token", "s3cret\n");
    let (addr, server) = stand_in(vec![
        (
            201,
            r#"{"executionId":"e-1","name":"drain-web-1","workflow":"drain-restore","status":"RUNNING","started":true}"#,
        ),
        (
            409,
            r#"{"error":"ExecutionAlreadyExists: an execution named `drain-web-1` of `drain-restore` exists"}"#,
        ),
        (
            200,
            r#"{"executions":[{"executionId":"e-1","workflow":"drain-restore","name":"drain-web-1","status":"RUNNING","startedAt":"2026-01-02T03:04:05.000Z","stoppedAt":null,"startedBy":"Portcullis::Admin::\"ops\"","currentStates":["LetConnectionsFinish"]}]}"#,
        ),
        (
            200,
            r#"{"events":[{"id":1,"previousEventId":0,"timestamp":"2026-01-02T03:04:05.000Z","type":"ExecutionStarted","details":{"input":{}}}]}"#,
        ),
        (404, r#"{"error":"no task waits for this token"}"#),
    ]);
    let t = token.to_str().unwrap();
    let cmd = |args: &[&str]| {
        let mut a = vec!["workflow", "--admin", addr.as_str(), "--token-file", t];
        a.extend_from_slice(args);
        run(&a)
    };
    let (code, out, err) = cmd(&[
        "start",
        "drain-restore",
        "--name",
        "drain-web-1",
        "--input",
        DRAIN_INPUT,
    ]);
    assert_eq!((code, out.as_str()), (0, "e-1\n"), "{err}");
    assert!(
        err.contains("started execution `drain-web-1` of `drain-restore`"),
        "{err}"
    );
    let (code, _, err) = cmd(&["start", "drain-restore", "--name", "drain-web-1"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: ExecutionAlreadyExists: an execution named"),
        "{err}"
    );
    let (code, out, _) = cmd(&["list", "--status", "running", "--limit", "10"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("ID   WORKFLOW       NAME         STATUS   STARTED"),
        "{out}"
    );
    assert!(out.contains("LetConnectionsFinish"), "{out}");
    let (code, out, _) = cmd(&["history", "e-1", "--after", "0"]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            "1 ExecutionStarted 2026-01-02T03:04:05.000Z {\"input\":{}}\n"
        )
    );
    let (code, _, err) = cmd(&["send-success", "tok.1", "--output", r#"{"approved": true}"#]);
    assert_eq!(code, 1);
    assert!(err.contains("no task waits for this token (404)"), "{err}");

    let seen = server.join().unwrap();
    let lines: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        lines,
        vec![
            "POST /api/v1/workflows/drain-restore/executions HTTP/1.1",
            "POST /api/v1/workflows/drain-restore/executions HTTP/1.1",
            "GET /api/v1/executions?status=RUNNING&limit=10 HTTP/1.1",
            "GET /api/v1/executions/e-1/history?after=0 HTTP/1.1",
            "POST /api/v1/callbacks/success HTTP/1.1",
        ]
    );
    assert!(seen.iter().all(|s| s.1 == "Bearer s3cret"));
    let start: Value = serde_json::from_str(&seen[0].2).unwrap();
    assert_eq!(start["name"], json!("drain-web-1"));
    assert_eq!(start["input"]["server"], json!("web-1"));
    assert_eq!(seen[1].2, r#"{"name":"drain-web-1"}"#);
    assert_eq!(seen[4].2, r#"{"token":"tok.1","output":{"approved":true}}"#);
}
