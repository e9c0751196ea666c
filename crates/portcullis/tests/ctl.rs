//! `portcullis ctl`, the runtime CLI, against the real binary: every command in its table
//! and `--json` forms; a drained server shown as drained and sent no more traffic; weights;
//! stick tables read and cleared; the live event stream followed; workflow executions,
//! their history and an approval by callback; reloads and session revocation; and the
//! errors: a bad token (1), no token (2), bad usage (2), and a call `admin.policies` forbid
//! to a person with a JWT or an agent with an API key (1, "forbidden").

mod common;

use common::{client, eventually, Origin, Proxy, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How `ctl` gets its credential.
enum Cred<'a> {
    /// `PORTCULLIS_ADMIN_TOKEN` set to the test's static token.
    Env,
    /// A `--token-file`, `--bearer-file` or `--api-key-file` (the flag, the file).
    File(&'a str, &'a Path),
    /// None at all.
    Nothing,
}

fn command(p: &Proxy, cred: &Cred, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    c.args(["ctl", "--admin", &p.admin_url("")]);
    c.env_remove("PORTCULLIS_ADMIN_TOKEN");
    // No saved `ctl login` of the machine's user stands in for the credentials a test gives.
    c.env("XDG_CONFIG_HOME", p.dir.path().join("no-ctl-login"));
    match cred {
        Cred::Env => {
            c.env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN);
        }
        Cred::File(flag, f) => {
            c.arg(flag).arg(f);
        }
        Cred::Nothing => {}
    }
    c.args(args);
    c
}

/// Runs `portcullis ctl --admin … ARGS`: the exit code, stdout and stderr.
fn ctl_as(p: &Proxy, cred: &Cred, args: &[&str]) -> (i32, String, String) {
    let out = command(p, cred, args).output().expect("run portcullis ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl ARGS` with the static token: stdout, after checking it exited 0.
fn ctl(p: &Proxy, args: &[&str]) -> String {
    let (code, out, err) = ctl_as(p, &Cred::Env, args);
    assert_eq!(code, 0, "ctl {args:?}: {err}{out}");
    out
}

/// `ctl --json ARGS` with the static token: stdout as JSON.
fn ctl_json(p: &Proxy, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(p, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {all:?}: not JSON ({e}): {out}"))
}

/// The cells of the table row whose first cells are `first`.
fn row(table: &str, first: &[&str]) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.len() >= first.len() && cells[..first.len()] == *first)
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    f
}

// ---------------------------------------------------------------------------------------
// Servers

fn servers_config(a: &Origin, b: &Origin) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
backends:
  - {{ name: pool, servers: [{{ name: s1, address: "{a}" }}, {{ name: s2, address: "{b}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}
"#,
        a = a.address(),
        b = b.address()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_listed_drained_weighted_and_the_config_reloaded() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let p = Proxy::start(&servers_config(&a, &b)).await;
    let web = client();
    for _ in 0..4 {
        assert_eq!(web.get(p.url("/")).send().await.unwrap().status(), 200);
    }

    // The table: one row per server.
    let out = ctl(&p, &["servers"]);
    let head: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
            "BACKEND", "SERVER", "ADDRESS", "STATE", "HEALTH", "EJECTED", "WEIGHT", "ACTIVE",
            "QUEUED", "TOTAL"
        ]
    );
    let s1 = row(&out, &["default/pool", "s1"]);
    assert_eq!(
        s1[2..9],
        [a.address().as_str(), "ready", "up", "no", "1", "0", "0"],
        "{out}"
    );
    let s2 = row(&out, &["default/pool", "s2"]);
    let total = |r: &[String]| r[9].parse::<u64>().unwrap();
    assert_eq!(total(&s1) + total(&s2), 4, "{out}");
    // JSON: the API's answer; a backend asked for by its name.
    let v = ctl_json(&p, &["servers", "pool"]);
    assert_eq!(v["backends"][0]["name"], "default/pool", "{v}");
    assert_eq!(v["backends"][0]["servers"][1]["name"], "s2", "{v}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["servers", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no backend `nope`"), "{err}");

    // Drain s1 by its full name: shown, and it gets no more traffic.
    let out = ctl(&p, &["drain", "default/pool/s1"]);
    assert_eq!(out, "default/pool/s1: drain\n");
    let out = ctl(&p, &["servers"]);
    assert_eq!(row(&out, &["default/pool", "s1"])[3], "drain", "{out}");
    assert_eq!(row(&out, &["default/pool", "s2"])[3], "ready", "{out}");
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..6 {
        assert_eq!(web.get(p.url("/")).send().await.unwrap().status(), 200);
    }
    assert_eq!((a.hits() - a0, b.hits() - b0), (0, 6));

    // Maintenance, then ready again, by the backend's short name; JSON answers.
    let v = ctl_json(&p, &["maint", "pool/s1"]);
    assert_eq!(
        v,
        json!({ "backend": "default/pool", "server": "s1", "state": "maint" })
    );
    assert_eq!(
        ctl_json(&p, &["servers"])["backends"][0]["servers"][0]["state"],
        "maint"
    );
    assert_eq!(ctl(&p, &["ready", "pool/s1"]), "default/pool/s1: ready\n");
    let a0 = a.hits();
    for _ in 0..4 {
        web.get(p.url("/")).send().await.unwrap();
    }
    assert!(a.hits() > a0, "a ready server gets traffic again");

    // Weights.
    assert_eq!(
        ctl(&p, &["weight", "pool/s2", "50"]),
        "default/pool/s2: weight 50\n"
    );
    let out = ctl(&p, &["servers"]);
    assert_eq!(row(&out, &["default/pool", "s2"])[6], "50", "{out}");
    let v = ctl_json(&p, &["weight", "default/pool/s2", "7"]);
    assert_eq!(v["weight"], 7, "{v}");
    let v = p.backends().await;
    assert_eq!(v["backends"][0]["servers"][1]["weight"], 7, "{v}");

    // Refusals: the API's message and status, exit 1; bad usage, exit 2.
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["weight", "pool/s2", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(400)"), "{err}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["drain", "pool/nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nope") && err.contains("(404)"), "{err}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["drain", "s1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("APP/BACKEND/SERVER"), "{err}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["weight", "pool/s2", "lots"]);
    assert_eq!(code, 2, "{err}");

    // Credentials: a wrong token is refused by the API (1), none is bad usage (2).
    let wrong = write(p.dir.path(), "wrong.token", "not-the-token\n");
    let (code, _, err) = ctl_as(&p, &Cred::File("--token-file", &wrong), &["servers"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad or missing token") && err.contains("(401)"),
        "{err}"
    );
    let (code, _, err) = ctl_as(&p, &Cred::Nothing, &["servers"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--token-file") && err.contains("PORTCULLIS_ADMIN_TOKEN"),
        "{err}"
    );
    let right = write(p.dir.path(), "admin.token", &format!("{ADMIN_TOKEN}\n"));
    let (code, out, err) = ctl_as(&p, &Cred::File("--token-file", &right), &["servers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default/pool"), "{out}");

    // Reload: the version that serves; a rejected config keeps it.
    let version = p.config_status().await["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        ctl(&p, &["reload"]),
        format!("reloaded: serving version {version}\n")
    );
    let v = ctl_json(&p, &["reload"]);
    assert_eq!(v, json!({ "result": "ok", "version": version }));

    // Sessions.
    let out = ctl(&p, &["revoke-sessions", "dev/alice"]);
    assert!(
        out.starts_with("revoked the sessions of dev/alice opened until 20"),
        "{out}"
    );
    let v = ctl_json(&p, &["revoke-sessions", "dev/bob"]);
    assert_eq!(v["principal"], "dev/bob", "{v}");
    assert!(v["revoked_at"].as_u64().is_some(), "{v}");

    p.write_config(&servers_config(&a, &b).replace("backend: pool", "backend: missing"));
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("missing") && err.contains(&format!("still serving version {version}")),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_admin_api_is_an_error() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["ctl", "servers", "--admin"])
            .arg(format!("http://{}", common::dead_address()))
            .env("PORTCULLIS_ADMIN_TOKEN", "t")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Stick tables

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_listed_shown_and_cleared() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - {{ name: o, servers: [{{ name: s1, address: "{}" }}] }}
stick_tables:
  - {{ name: per_ip, key: src, size: 1000, store: ["http_req_rate(10s)", http_req_cnt, gpc0] }}
  - {{ name: per_tenant, key: [src, "header:x-tenant"], size: 100, store: [http_req_cnt] }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    backend: o
    public: true
    limits: {{ track: [per_ip, per_tenant] }}
"#,
        origin.address()
    ))
    .await;
    let web = client();
    for _ in 0..3 {
        let r = web
            .get(p.url("/x"))
            .header("x-tenant", "acme")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let out = ctl(&p, &["tables"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert_eq!(
        row(&out, &["per_ip"])[..3],
        ["per_ip", "src", "1000"],
        "{out}"
    );
    assert_eq!(row(&out, &["per_tenant"])[4], "1", "{out}");
    let v = ctl_json(&p, &["tables"]);
    let names: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["per_ip", "per_tenant"]);

    let out = ctl(&p, &["table", "per_ip", "--top", "5"]);
    assert!(
        out.starts_with("table per_ip: key src, 1 of 1000 entries"),
        "{out}"
    );
    assert!(out.contains("top by http_req_rate"), "{out}");
    assert_eq!(
        row(&out, &["127.0.0.1"])[..4],
        ["127.0.0.1", "3", "3", "0"],
        "{out}"
    );
    let v = ctl_json(&p, &["table", "per_ip", "--by", "http_req_cnt"]);
    assert_eq!(v["by"], "http_req_cnt", "{v}");
    assert_eq!(v["entries"][0]["key"], "127.0.0.1", "{v}");
    assert_eq!(v["entries"][0]["counters"]["http_req_cnt"], 3, "{v}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["table", "per_ip", "--by", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(400)"), "{err}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["table", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no stick table `nope`") && err.contains("(404)"),
        "{err}"
    );

    // Clear one entry, then a whole table.
    assert_eq!(
        ctl(&p, &["clear", "per_ip", "127.0.0.1"]),
        "cleared 127.0.0.1 in per_ip\n"
    );
    assert_eq!(
        ctl(&p, &["table", "per_ip"]).lines().nth(1),
        Some("no entries")
    );
    let v = ctl_json(&p, &["clear", "per_tenant", "--all"]);
    assert_eq!(
        v,
        json!({ "result": "cleared", "table": "per_tenant", "all": true })
    );
    let v = ctl_json(&p, &["table", "per_tenant"]);
    assert_eq!(v["entries"], json!([]), "{v}");
    let v = ctl_json(&p, &["clear", "per_ip", "192.0.2.1"]);
    assert_eq!(v["key"], "192.0.2.1", "{v}");
    assert_eq!(
        ctl(&p, &["clear", "per_tenant", "--all"]),
        "cleared every entry of per_tenant\n"
    );
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["clear", "per_ip"]);
    assert_eq!(code, 2, "KEY or --all: {err}");
}

// ---------------------------------------------------------------------------------------
// Events

/// Starts `ctl events --follow ARGS…` and sends its stdout lines to the returned channel.
fn follow(p: &Proxy, args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut all = vec!["events", "--follow"];
    all.extend_from_slice(args);
    let mut child = command(p, &Cred::Env, &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ctl events");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Publishes an event of `ty` with the admin token.
async fn publish(p: &Proxy, id: &str, ty: &str) {
    let ev = json!({ "specversion": "1.0", "id": id, "source": "https://ci.example", "type": ty,
                     "subject": "web", "time": "2026-01-02T03:04:05Z", "data": { "n": 1 } });
    let r = client()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/cloudevents+json")
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// Publishes an unwanted then a wanted event until the watcher prints a line (it may not
/// have connected yet at first): that line.
async fn first_line(p: &Proxy, rx: &std::sync::mpsc::Receiver<String>, tag: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0.. {
        publish(p, &format!("{tag}-other-{n}"), "com.example.other").await;
        publish(p, &format!("{tag}-{n}"), "com.example.deploy.finished").await;
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            return line;
        }
        assert!(Instant::now() < deadline, "ctl events printed nothing");
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_followed_live_as_lines_or_json() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends: [{{ name: b, servers: [{{ name: s, address: \"{}\" }}] }}]\nroutes: [{{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}]\n",
        origin.address()
    ))
    .await;

    // Without --follow: bad usage.
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["events"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--follow"), "{err}");

    let (mut child, rx) = follow(&p, &["--types", "com.example.deploy.*"]);
    let line = first_line(&p, &rx, "t").await;
    assert_eq!(
        line,
        r#"2026-01-02T03:04:05Z com.example.deploy.finished web {"n":1}"#
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, rx) = follow(&p, &["--types", "com.example.deploy.*", "--json"]);
    let line = first_line(&p, &rx, "j").await;
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["type"], "com.example.deploy.finished", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("j-"), "{v}");
    assert_eq!(v["data"], json!({ "n": 1 }));
    // The next ones come as they are published, and the filter holds.
    publish(&p, "j-last", "com.example.deploy.finished").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("j-last printed");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "com.example.deploy.finished", "{v}");
        if v["id"] == "j-last" {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // A bad token ends it at once.
    let wrong = write(p.dir.path(), "wrong.token", "nope-nope-nope\n");
    let (code, _, err) = ctl_as(
        &p,
        &Cred::File("--token-file", &wrong),
        &["events", "--follow"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad or missing token"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Workflows

fn workflow_config(origin: &Origin) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
backends:
  - {{ name: pool, servers: [{{ name: s1, address: "{}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}
workflows:
  definitions:
    approve:
      StartAt: Ask
      States:
        Ask:
          Type: Task
          Resource: "portcullis:wait_for_callback"
          Parameters: {{ "token.$": "$$.Task.Token", "who.$": "$.who" }}
          ResultPath: "$.answer"
          End: true
"#,
        origin.address()
    )
}

/// Starts an execution of `approve` for `who`: its id.
async fn start(p: &Proxy, who: &str) -> String {
    let (s, text) = p
        .admin(
            Method::POST,
            "/api/v1/workflows/approve/executions",
            Some(json!({ "name": who, "input": { "who": who } })),
        )
        .await;
    assert_eq!(s, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["executionId"].as_str().unwrap().to_string()
}

/// The callback token of execution `id`'s waiting task, from `ctl --json history`.
async fn token_of(p: &Proxy, id: &str) -> String {
    let mut found = None;
    let ok = eventually(Duration::from_secs(5), || {
        let v = ctl_json(p, &["history", id]);
        found = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "TaskScheduled")
            .and_then(|e| e["details"]["parameters"]["token"].as_str())
            .map(str::to_string);
        let done = found.is_some();
        async move { done }
    })
    .await;
    assert!(ok, "no task scheduled for {id}");
    found.unwrap()
}

/// Waits until execution `id` is no longer RUNNING: its description.
async fn closed(p: &Proxy, id: &str) -> Value {
    let mut last = Value::Null;
    let ok = eventually(Duration::from_secs(5), || {
        let v = ctl_json(p, &["workflows"]);
        last = v["executions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["executionId"] == id)
            .cloned()
            .unwrap_or(Value::Null);
        let done = last["status"] != "RUNNING";
        async move { done }
    })
    .await;
    assert!(ok, "still running: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_are_listed_their_history_shown_and_their_tasks_approved_or_rejected() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&workflow_config(&origin)).await;
    assert_eq!(ctl(&p, &["workflows"]), "no executions\n");
    let a = start(&p, "agent-7").await;
    let b = start(&p, "agent-8").await;
    let token = token_of(&p, &a).await;

    let out = ctl(&p, &["workflows"]);
    let head: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        ["ID", "WORKFLOW", "NAME", "STATUS", "STARTED", "STATES"]
    );
    let r = row(&out, &[a.as_str()]);
    assert_eq!(
        (&r[1], &r[2], &r[3], &r[5]),
        (
            &"approve".to_string(),
            &"agent-7".to_string(),
            &"RUNNING".to_string(),
            &"Ask".to_string()
        ),
        "{out}"
    );
    assert!(r[4].starts_with("20") && r[4].ends_with('Z'), "{out}");
    let v = ctl_json(&p, &["workflows", "--status", "running"]);
    assert_eq!(v["executions"].as_array().unwrap().len(), 2, "{v}");

    // The history, one event per line.
    let out = ctl(&p, &["history", &a]);
    let kinds: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(kinds[0], "ExecutionStarted", "{out}");
    assert!(kinds.contains(&"TaskScheduled"), "{out}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["history", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no execution `nope` (404)"), "{err}");

    // Approve a: it succeeds with the output.
    let out = ctl(
        &p,
        &["approve", &token, "--output", r#"{"approved": true}"#],
    );
    assert_eq!(out, format!("approved: execution {a} resumes\n"));
    let d = closed(&p, &a).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d}");
    let (s, text) = p
        .admin(Method::GET, &format!("/api/v1/executions/{a}"), None)
        .await;
    assert_eq!(s, 200);
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["output"]["answer"], json!({ "approved": true }), "{d}");
    // A token answers once: a second answer is refused as taken already.
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["approve", &token]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(409)"), "{err}");
    let (code, _, err) = ctl_as(&p, &Cred::Env, &["approve", &token, "--output", "yes"]);
    assert_eq!(code, 2, "{err}");

    // Reject b, in JSON: it fails with the error given.
    let token_b = token_of(&p, &b).await;
    let v = ctl_json(
        &p,
        &[
            "reject",
            &token_b,
            "--error",
            "Denied",
            "--cause",
            "not today",
        ],
    );
    assert_eq!(v, json!({ "ok": true, "execution": b }));
    let d = closed(&p, &b).await;
    assert_eq!(
        (&d["status"], &d["error"]),
        (&json!("FAILED"), &json!("Denied")),
        "{d}"
    );
    let out = ctl(&p, &["workflows"]);
    assert_eq!(row(&out, &[a.as_str()])[3], "SUCCEEDED", "{out}");
    assert_eq!(row(&out, &[b.as_str()])[3], "FAILED", "{out}");
}

// ---------------------------------------------------------------------------------------
// Identity and policy

const POLICY: &str = r#"
// The on-call group may read the backends and drain or restore the pool's servers.
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"backends.read", resource);
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"server.set_state",
       resource in Portcullis::Backend::"default/pool");
// The ops agents may read the stick tables.
permit(principal in Portcullis::Group::"ops",
       action == Portcullis::Admin::Action::"table.read", resource);
"#;

fn portcullis(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "portcullis {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_and_agents_are_held_to_the_admin_policies() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "admin.cedar", POLICY);
    let key_out = portcullis(&["apikey", "new", "--user", "bot", "--groups", "ops"]);
    let key = key_out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("pk_"))
        .unwrap_or_else(|| panic!("{key_out}"))
        .to_string();
    let entry = key_out.split_once("keys_file:\n\n").unwrap().1.trim_end();
    write(dir.path(), "keys.yaml", &format!("keys:\n{entry}\n"));
    let p = Proxy::start_in(
        dir,
        &format!(
            r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
identity:
  providers:
    - {{ name: dev, kind: dev_issuer, key_file: dev.pem }}
    - {{ name: agents, kind: api_key, keys_file: "{{dir}}/keys.yaml" }}
backends:
  - {{ name: pool, servers: [{{ name: s1, address: "{o}" }}] }}
  - {{ name: other, servers: [{{ name: o1, address: "{o}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{ADMIN_TOKEN}"]
  auth: [dev, agents]
  policies: [admin.cedar]
"#,
            o = origin.address()
        ),
    )
    .await;
    let cfg = p.config.to_str().unwrap().to_string();
    let mint = |user: &str, groups: &str| {
        let mut args = vec![
            "token",
            "--config",
            &cfg,
            "--provider",
            "dev",
            "--user",
            user,
        ];
        if !groups.is_empty() {
            args.extend(["--groups", groups]);
        }
        portcullis(&args).trim().to_string()
    };
    let alice = write(p.dir.path(), "alice.jwt", &mint("alice", "oncall"));
    let carol = write(p.dir.path(), "carol.jwt", &mint("carol", ""));
    let bot = write(p.dir.path(), "bot.key", &key);
    let as_alice = Cred::File("--bearer-file", &alice);

    // Alice reads the backends and drains the pool's server...
    let (code, out, err) = ctl_as(&p, &as_alice, &["servers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("default/other"), "{out}");
    let (code, out, err) = ctl_as(&p, &as_alice, &["drain", "pool/s1"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "default/pool/s1: drain\n"),
        "{err}"
    );
    // ... but not another backend's server, nor the tables.
    let (code, _, err) = ctl_as(&p, &as_alice, &["drain", "other/o1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error: forbidden: dev/alice may not server.set_state here")
            && err.contains("(403)"),
        "{err}"
    );
    let (code, _, err) = ctl_as(&p, &as_alice, &["--json", "tables"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("forbidden") && err.contains("table.read"),
        "{err}"
    );
    // Carol may do nothing.
    let (code, _, err) = ctl_as(&p, &Cred::File("--bearer-file", &carol), &["servers"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("forbidden: dev/carol"), "{err}");
    // The agent's API key reads the tables, and nothing else.
    let as_bot = Cred::File("--api-key-file", &bot);
    let (code, out, err) = ctl_as(&p, &as_bot, &["tables"]);
    assert_eq!((code, out.as_str()), (0, "no stick tables\n"), "{err}");
    let (code, _, err) = ctl_as(&p, &as_bot, &["servers"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("forbidden: agents/bot"), "{err}");
    // A forged JWT is not a credential.
    let text = std::fs::read_to_string(&alice).unwrap();
    let forged = write(
        p.dir.path(),
        "forged.jwt",
        &format!("{}x", &text.trim()[..text.trim().len() - 1]),
    );
    let (code, _, err) = ctl_as(&p, &Cred::File("--bearer-file", &forged), &["servers"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad or missing token") && err.contains("(401)"),
        "{err}"
    );
    // The static token is break-glass: everything.
    assert_eq!(ctl(&p, &["drain", "other/o1"]), "default/other/o1: drain\n");
    // One credential at a time.
    let (code, _, err) = ctl_as(
        &p,
        &as_alice,
        &["--api-key-file", bot.to_str().unwrap(), "servers"],
    );
    assert_eq!(code, 2, "{err}");
}
