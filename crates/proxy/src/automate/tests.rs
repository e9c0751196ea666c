//! The automation runtime against a real [`Runtime`]: events go in through the bus, actions
//! come out through the control path, and the audit trail, the events file and the routing
//! say what happened.

use super::*;
use crate::control::{apply, Command, Principal};
use crate::state::AdminState;
use portcullis_events::{ServerChange, ServerData};
use portcullis_limits::{Clock, Key, MonotonicClock};
use std::path::Path;
use std::time::Instant;

/// Backends `primary` and `fallback` (one echo server each), `pool` (two), route `app` on
/// `primary`, and stick table `per_ip` storing `gpc0`.
const BASE: &str = r#"
backends:
  - { name: primary, servers: [{ name: p1, address: "builtin:echo" }] }
  - { name: fallback, servers: [{ name: f1, address: "builtin:echo" }] }
  - name: pool
    servers:
      - { name: s1, address: "builtin:echo" }
      - { name: s2, address: "builtin:echo" }
routes:
  - { name: app, match: { path_prefix: / }, backend: primary, public: true }
stick_tables:
  - { name: per_ip, key: src, size: 100, store: [gpc0, tags] }
"#;

/// A runtime in `dir` (config, audit trail in `audit/`, events in `events.jsonl`), with its
/// embedded store in `state` (shared by runtimes given the same one) and `triggers` (YAML).
async fn runtime_in(dir: &Path, state: &Path, triggers: &str) -> Arc<Runtime> {
    std::fs::create_dir_all(dir).unwrap();
    let yaml = format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\n\
         access_log: {{ path: \"off\" }}\n\
         audit: {{ sink: file, dir: \"{audit}\", fsync: every_record }}\n\
         state_dir: \"{state}\"\n\
         events: {{ sinks: [{{ name: log, file: {{ path: \"{events}\" }} }}] }}\n\
         {BASE}\ntriggers:\n{triggers}",
        audit = dir.join("audit").display(),
        state = state.display(),
        events = dir.join("events.jsonl").display(),
    );
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = portcullis_config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let rt = Runtime::start(config).await.unwrap();
    assert!(rt.automation.running(), "the automation task runs");
    rt
}

async fn runtime(dir: &Path, triggers: &str) -> Arc<Runtime> {
    runtime_in(dir, &dir.join("state"), triggers).await
}

fn records(dir: &Path) -> Vec<Value> {
    crate::testkit::audit_records(dir)
}

/// The audit records of firings, optionally of one trigger.
fn firings(dir: &Path, trigger: Option<&str>) -> Vec<Value> {
    records(dir)
        .into_iter()
        .filter(|r| r["kind"] == "admin" && r["detail"]["action"] == "firing")
        .filter(|r| trigger.is_none_or(|t| r["detail"]["args"]["trigger"] == t))
        .collect()
}

/// The audit records the control path wrote for commands of `trigger`.
fn commands_by(dir: &Path, trigger: &str) -> Vec<Value> {
    records(dir)
        .into_iter()
        .filter(|r| {
            r["kind"] == "admin"
                && r["detail"]["action"] != "firing"
                && r["principal"]["user"] == trigger
                && r["principal"]["provider"] == "trigger"
        })
        .collect()
}

/// The events the file sink wrote.
fn events(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn server_event(rt: &Runtime, change: ServerChange, server: &str) -> Event {
    rt.shared.events.source.server(
        change,
        ServerData::new("default/primary", server, "test", 0, 1),
    )
}

/// An event of `type_` about `subject`, with a unique `data.n`.
fn event(rt: &Runtime, type_: &str, subject: &str) -> Event {
    let n = uuid::Uuid::new_v4().to_string();
    Event::new(rt.shared.events.source.as_str(), type_, json!({ "n": n })).with_subject(subject)
}

/// Where the route `app` sends its requests now, as the route phase reads it.
fn app_backend(rt: &Runtime) -> String {
    let snap = rt.shared.snapshot.load_full();
    let conn = crate::edge::conn::ConnInfo::new(
        "127.0.0.1:40000".parse().unwrap(),
        Arc::from("web"),
        false,
        Arc::new(crate::edge::canon::Rules::new(&snap.config.listeners[0])),
        None,
        Arc::default(),
    );
    let (parts, ()) = http::Request::get("/x")
        .header("host", "example.com")
        .body(())
        .unwrap()
        .into_parts();
    let mut x = crate::exchange::Exchange::new(&rt.shared, &snap, &conn, parts, Instant::now());
    assert!(matches!(
        crate::phase::check::run(&mut x),
        crate::exchange::Flow::Next
    ));
    let flow = futures_util::FutureExt::now_or_never(crate::phase::route::run(&mut x));
    assert!(matches!(flow, Some(crate::exchange::Flow::Next)));
    x.backend
        .expect("the route phase chose a backend")
        .id
        .clone()
}

const FAILOVER: &str = r#"
  - name: failover
    match: { type: dev.portcullis.server.down, subject: "default/primary/*" }
    for_each: subject
    cooldown: 1m
    actions: [{ switch_route: { route: app, backend: fallback } }]
  - name: failback
    match: { type: dev.portcullis.server.up, subject: "default/primary/*" }
    for_each: subject
    actions: [{ restore_route: { route: app } }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_switches_the_route_and_up_restores_it_audited() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path(), FAILOVER).await;
    assert_eq!(app_backend(&rt), "default/primary");

    let down = server_event(&rt, ServerChange::Down, "p1");
    let cause = down.id.clone();
    rt.shared.events.emit(down);
    until("the switch", || app_backend(&rt) == "default/fallback").await;
    until("the firing's record", || {
        !firings(dir.path(), Some("failover")).is_empty()
    })
    .await;

    // The control path recorded the command as the trigger, before applying it.
    let cmds = commands_by(dir.path(), "failover");
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(cmds[0]["detail"]["action"], "switch_route");
    assert_eq!(
        cmds[0]["detail"]["args"],
        json!({ "route": "default/app", "backend": "default/fallback" })
    );
    // One record for the firing: trigger, group, cause, principal, each action's outcome.
    let f = &firings(dir.path(), Some("failover"))[0];
    let args = &f["detail"]["args"];
    assert_eq!(args["group"], "default/primary/p1");
    assert_eq!(args["cause_event_id"], cause.as_str());
    assert_eq!(args["principal"], "Portcullis::Trigger::\"failover\"");
    assert_eq!(args["result"], "done");
    assert_eq!(
        args["actions"],
        json!([{ "action": "switch_route", "args": { "route": "app", "backend": "fallback" }, "result": "done" }])
    );
    assert_eq!(f["principal"]["provider"], "trigger");
    // And an event, caused by the server's.
    until("the automation.action event", || {
        events(dir.path())
            .iter()
            .any(|e| e["type"] == portcullis_events::types::AUTOMATION_ACTION)
    })
    .await;
    let ev = events(dir.path())
        .into_iter()
        .find(|e| e["type"] == portcullis_events::types::AUTOMATION_ACTION)
        .unwrap();
    assert_eq!(ev["causedby"], cause.as_str());
    assert_eq!(ev["subject"], "app");
    assert_eq!(ev["data"]["result"], "applied");
    assert_eq!(ev["data"]["trigger"], "failover");

    // A reload keeps the switch.
    let path = dir.path().join("portcullis.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, yaml.replace("size: 100", "size: 101")).unwrap();
    rt.reload("test").await.unwrap();
    assert_eq!(app_backend(&rt), "default/fallback");

    rt.shared
        .events
        .emit(server_event(&rt, ServerChange::Up, "p1"));
    until("the restore", || app_backend(&rt) == "default/primary").await;
    until("the failback record", || {
        !firings(dir.path(), Some("failback")).is_empty()
    })
    .await;
    assert_eq!(
        commands_by(dir.path(), "failback")[0]["detail"]["action"],
        "restore_route"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_server_fires_once_per_cooldown_and_inhibited_triggers_stay_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let triggers = format!(
        "{FAILOVER}
  - name: page
    match: {{ type: dev.portcullis.server.down }}
    for_each: subject
    actions: [{{ emit: {{ type: com.example.page, subject: \"{{subject}}\" }} }}]
  - name: damped
    match: {{ type: dev.portcullis.server.down }}
    for_each: subject
    cooldown: 1m
    inhibit: [page]
    actions: [{{ set_table: {{ table: per_ip, key: 192.0.2.9, tag: flapping }} }}]
  - name: sentinel
    match: {{ type: com.example.sentinel }}
    for_each: data.n
    actions: [{{ set_table: {{ table: per_ip, key: 192.0.2.1, gpc0: 5 }} }}]
"
    );
    let rt = runtime(dir.path(), &triggers).await;
    // Ten flaps within a second: down, up, down, up, ...
    for _ in 0..10 {
        for change in [ServerChange::Down, ServerChange::Up] {
            rt.shared.events.emit(server_event(&rt, change, "p1"));
        }
    }
    // Events are handled in order: once the sentinel's firing is recorded, the flaps were.
    rt.shared
        .events
        .emit(event(&rt, "com.example.sentinel", "s"));
    until("the sentinel", || {
        !firings(dir.path(), Some("sentinel")).is_empty()
    })
    .await;
    assert_eq!(firings(dir.path(), Some("damped")).len(), 1);
    assert_eq!(commands_by(dir.path(), "damped").len(), 1);
    assert!(
        firings(dir.path(), Some("page")).is_empty(),
        "inhibited by `damped`: {:?}",
        firings(dir.path(), Some("page"))
    );
    // The failover fired once too; each up restored (no cooldown on failback).
    assert_eq!(firings(dir.path(), Some("failover")).len(), 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_whose_event_matches_its_own_trigger_does_not_loop() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(
        dir.path(),
        r#"
  - name: echo
    match: { type: com.example.ping }
    for_each: data.n
    actions: [{ emit: { type: com.example.ping, subject: again, data: { n: "{id}" } } }]
  - name: chain
    match: { type: com.example.pong }
    for_each: data.n
    automation_events: { allow: true, max_hops: 3 }
    actions: [{ emit: { type: com.example.pong, subject: again, data: { n: "{id}" } } }]
  - name: sentinel
    match: { type: com.example.sentinel }
    actions: [{ set_table: { table: per_ip, key: 192.0.2.1, gpc0: 5 } }]
"#,
    )
    .await;
    rt.shared
        .events
        .emit(event(&rt, "com.example.ping", "first"));
    rt.shared
        .events
        .emit(event(&rt, "com.example.pong", "first"));
    until("three hops of `chain`", || {
        firings(dir.path(), Some("chain")).len() >= 3
    })
    .await;
    // Give a fourth hop, or a second `echo`, the time to show, then look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rt.shared
        .events
        .emit(event(&rt, "com.example.sentinel", "s"));
    until("the sentinel", || {
        !firings(dir.path(), Some("sentinel")).is_empty()
    })
    .await;
    assert_eq!(firings(dir.path(), Some("echo")).len(), 1);
    let hops: Vec<u64> = firings(dir.path(), Some("chain"))
        .iter()
        .map(|r| r["detail"]["args"]["hop"].as_u64().unwrap())
        .collect();
    assert_eq!(hops, [1, 2, 3], "max_hops: 3 stops the chain");
    // What `echo` emitted names its cause.
    let first_ping = events(dir.path())
        .into_iter()
        .find(|e| e["type"] == "com.example.ping" && e["subject"] == "first")
        .unwrap();
    let again = events(dir.path())
        .into_iter()
        .find(|e| e["type"] == "com.example.ping" && e["subject"] == "again")
        .unwrap();
    assert_eq!(again["causedby"], first_ping["id"]);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_runs_once_across_replicas_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (a_dir, b_dir, c_dir) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let triggers = format!(
        "{FAILOVER}
  - name: sentinel
    match: {{ type: com.example.sentinel }}
    for_each: data.n
    actions: [{{ set_table: {{ table: per_ip, key: 192.0.2.1, gpc0: 5 }} }}]
"
    );
    let a = runtime_in(&a_dir, &state, &triggers).await;
    let b = runtime_in(&b_dir, &state, &triggers).await;
    // Both replicas see the same event (as from a shared event stream).
    let down = server_event(&a, ServerChange::Down, "p1");
    a.shared.events.emit(down.clone());
    b.shared.events.emit(down.clone());
    for rt in [&a, &b] {
        let s = event(rt, "com.example.sentinel", "s");
        rt.shared.events.emit(s);
    }
    until("both sentinels", || {
        !firings(&a_dir, Some("sentinel")).is_empty()
            && !firings(&b_dir, Some("sentinel")).is_empty()
    })
    .await;
    let ran: Vec<bool> = [&a_dir, &b_dir]
        .iter()
        .map(|d| !firings(d, Some("failover")).is_empty())
        .collect();
    assert_eq!(
        ran.iter().filter(|r| **r).count(),
        1,
        "exactly one replica ran it: {ran:?}"
    );
    let switched = [&a, &b]
        .iter()
        .filter(|rt| app_backend(rt) == "default/fallback")
        .count();
    assert_eq!(switched, 1);
    a.shutdown().await;
    b.shutdown().await;
    drop((a, b));

    // After a restart, the same event (a redelivery) does not run it again: the key is in
    // SQLite.
    let c = runtime_in(&c_dir, &state, &triggers).await;
    c.shared.events.emit(down);
    c.shared.events.emit(event(&c, "com.example.sentinel", "s"));
    until("the sentinel", || {
        !firings(&c_dir, Some("sentinel")).is_empty()
    })
    .await;
    assert!(firings(&c_dir, Some("failover")).is_empty());
    assert_eq!(app_backend(&c), "default/primary");
    let store = c.shared.limits.plans.store().unwrap();
    assert!(!store
        .firing_claim(
            firings(if ran[0] { &a_dir } else { &b_dir }, Some("failover"))[0]["detail"]["args"]
                ["idempotency_key"]
                .as_str()
                .unwrap(),
            0
        )
        .unwrap());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_past_max_unavailable_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(
        dir.path(),
        r#"
  - name: drain
    match: { type: com.example.drain }
    for_each: subject
    actions:
      - set_server_state: { backend: pool, server: "{subject}", state: drain }
      - set_table: { table: per_ip, key: 192.0.2.1, gpc0: 5 }
"#,
    )
    .await;
    let state = |s: &str| {
        let snap = rt.shared.snapshot.load();
        let b = snap.backend("default/pool").unwrap();
        let i = b.servers.iter().position(|x| x.name == s).unwrap();
        b.slots[i].state.admin_state()
    };
    // An operator drained s1; automation may not take s2 too (50% of 2 is 1).
    let by = Principal::token(0, "127.0.0.1:5555".parse().unwrap());
    let drain_s1 = Command::SetServerState {
        backend: "pool".into(),
        server: "s1".into(),
        state: AdminState::Drain,
    };
    apply(&rt, &by, drain_s1).await.unwrap();
    rt.shared.events.emit(event(&rt, "com.example.drain", "s2"));
    until("the firing", || {
        !firings(dir.path(), Some("drain")).is_empty()
    })
    .await;
    assert_eq!(state("s2"), AdminState::Ready);
    let args = firings(dir.path(), Some("drain"))[0]["detail"]["args"].clone();
    assert_eq!(args["result"], "stopped");
    assert_eq!(args["actions"][0]["result"], "blocked");
    let reason = args["actions"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("max_unavailable 50%"), "{reason}");
    assert_eq!(args["actions"][1]["result"], "skipped");
    assert!(commands_by(dir.path(), "drain").is_empty());

    // With s1 back, s2 may go.
    let ready_s1 = Command::SetServerState {
        backend: "pool".into(),
        server: "s1".into(),
        state: AdminState::Ready,
    };
    apply(&rt, &by, ready_s1).await.unwrap();
    rt.shared.events.emit(event(&rt, "com.example.drain", "s2"));
    until("the second firing", || {
        firings(dir.path(), Some("drain")).len() == 2
    })
    .await;
    assert_eq!(state("s2"), AdminState::Drain);
    assert_eq!(commands_by(dir.path(), "drain").len(), 2);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_records_would_act_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(
        dir.path(),
        r#"
  - name: rehearse
    match: { type: dev.portcullis.server.down }
    enforce: false
    actions:
      - switch_route: { route: app, backend: fallback }
      - emit: { type: com.example.rehearsed }
"#,
    )
    .await;
    rt.shared
        .events
        .emit(server_event(&rt, ServerChange::Down, "p1"));
    until("the firing", || {
        !firings(dir.path(), Some("rehearse")).is_empty()
    })
    .await;
    assert_eq!(app_backend(&rt), "default/primary");
    let args = firings(dir.path(), Some("rehearse"))[0]["detail"]["args"].clone();
    assert_eq!(args["enforce"], false);
    assert_eq!(args["result"], "would_act");
    assert_eq!(args["actions"][0]["result"], "would_act");
    assert!(commands_by(dir.path(), "rehearse").is_empty());
    until("the events", || {
        events(dir.path())
            .iter()
            .filter(|e| e["data"]["result"] == "would_act")
            .count()
            == 2
    })
    .await;
    assert!(!events(dir.path())
        .iter()
        .any(|e| e["type"] == "com.example.rehearsed"));
    rt.shutdown().await;
}

fn gpc0(rt: &Runtime, ip: &str) -> Option<u64> {
    let t = rt.shared.limits.get("per_ip").unwrap();
    let key = Key::from(ip.parse::<std::net::IpAddr>().unwrap());
    t.table.get(&key, MonotonicClock.now()).and_then(|s| s.gpc0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_ends_after_its_time_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let triggers = r#"
  - name: ban
    match: { type: com.example.abuse }
    for_each: subject
    actions: [{ block: { table: per_ip, key: "{subject}", for: 400ms } }]
  - name: long-ban
    match: { type: com.example.abuse.long }
    for_each: subject
    actions: [{ block: { table: per_ip, key: "{subject}", for: 1500ms } }]
"#;
    let rt = runtime(dir.path(), triggers).await;
    rt.shared
        .events
        .emit(event(&rt, "com.example.abuse", "192.0.2.7"));
    until("the block", || gpc0(&rt, "192.0.2.7") == Some(1)).await;
    until("its end", || gpc0(&rt, "192.0.2.7") == Some(0)).await;
    let cmds = commands_by(dir.path(), "ban");
    let values: Vec<&Value> = cmds.iter().map(|r| &r["detail"]["args"]["value"]).collect();
    assert_eq!(values, [&json!(1), &json!(0)]);

    // A block whose end is due after a restart still ends.
    rt.shared
        .events
        .emit(event(&rt, "com.example.abuse.long", "192.0.2.8"));
    until("the long block", || gpc0(&rt, "192.0.2.8") == Some(1)).await;
    let store = rt.shared.limits.plans.store().unwrap().clone();
    assert_eq!(store.firing_follow_ups().unwrap().len(), 1);
    rt.shutdown().await;
    drop(rt);
    let again = runtime_in(
        &dir.path().join("again"),
        &dir.path().join("state"),
        triggers,
    )
    .await;
    until("the end, by the new process", || {
        commands_by(&dir.path().join("again"), "long-ban").len() == 1
    })
    .await;
    let rec = &commands_by(&dir.path().join("again"), "long-ban")[0];
    assert_eq!(
        rec["detail"]["args"],
        json!({ "table": "per_ip", "key": "192.0.2.8", "value": 0 })
    );
    until("the follow-up is done", || {
        store.firing_follow_ups().unwrap().is_empty()
    })
    .await;
    again.shutdown().await;
}

/// A one-shot HTTP receiver: answers `status` and hands over what it got.
async fn receiver(status: u16) -> (String, tokio::sync::mpsc::Receiver<http::Request<Bytes>>) {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook?x=1", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let _ = tx.send(http::Request::from_parts(parts, body)).await;
                            let mut r =
                                http::Response::new(http_body_util::Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, rx)
}

use bytes::Bytes;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_the_firing_with_the_automation_s_signed_assertion() {
    let dir = tempfile::tempdir().unwrap();
    let (ok_url, mut ok) = receiver(204).await;
    let (bad_url, mut bad) = receiver(500).await;
    let rt = runtime(
        dir.path(),
        &format!(
            r#"
  - name: tell
    match: {{ type: com.example.tell }}
    actions: [{{ webhook: {{ url: "{ok_url}" }} }}]
  - name: tell-broken
    match: {{ type: com.example.tell }}
    actions: [{{ webhook: {{ url: "{bad_url}" }} }}]
"#
        ),
    )
    .await;
    let ev = event(&rt, "com.example.tell", "x");
    let cause = ev.id.clone();
    rt.shared.events.emit(ev);
    let req = tokio::time::timeout(Duration::from_secs(10), ok.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.uri(), "/hook?x=1");
    assert_eq!(req.headers()["content-type"], "application/json");
    let body: Value = serde_json::from_slice(req.body()).unwrap();
    assert_eq!(body["trigger"], "tell");
    assert_eq!(body["cause_event_id"], cause.as_str());
    let key = body["idempotency_key"].as_str().unwrap();
    assert_eq!(
        req.headers()["idempotency-key"],
        format!("{key}#0").as_str()
    );
    // The assertion: an ES256 JWT whose claims name the automation, for this URL.
    let jwt = req.headers()["x-portcullis-assertion"].to_str().unwrap();
    let claims = jwt.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "Portcullis::Trigger::\"tell\"");
    assert_eq!(claims["user"], "tell");
    assert_eq!(claims["provider"], "automation");
    assert_eq!(claims["aud"], ok_url.as_str());
    // Its key is published where origins find the assertion's keys.
    let kid: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    let jwks = rt.shared.snapshot.load().identity.signer.jwks();
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid["kid"]));

    // A receiver's 500 fails the action, and says so.
    tokio::time::timeout(Duration::from_secs(10), bad.recv())
        .await
        .unwrap()
        .unwrap();
    until("both records", || firings(dir.path(), None).len() == 2).await;
    let broken = firings(dir.path(), Some("tell-broken"))[0]["detail"]["args"].clone();
    assert_eq!(broken["result"], "stopped");
    assert_eq!(broken["actions"][0]["result"], "failed");
    assert_eq!(broken["actions"][0]["reason"], "the webhook answered 500");
    assert_eq!(
        firings(dir.path(), Some("tell"))[0]["detail"]["args"]["result"],
        "done"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn check_names_unknown_backends_routes_tables_and_unbuilt_actions_at_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\n{BASE}triggers:
  - name: t
    match: {{ type: dev.portcullis.server.down }}
    for_each: subject
    actions:
      - switch_route: {{ route: nope, backend: fallbak }}
      - set_server_state: {{ backend: pool, server: s9, state: drain }}
      - block: {{ table: per_nothing, key: \"{{subject}}\", for: 1m }}
      - revoke_sessions: {{ principal: \"{{subject}}\" }}
      - start_workflow: {{ name: w }}
      - set_server_state: {{ backend: \"{{data.backend}}\", server: \"{{data.server}}\", state: drain }}
      - restore_route: {{ route: default/app }}
"
    );
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = portcullis_config::load(&path).unwrap();
    let out: Vec<String> = crate::check(&config)
        .iter()
        .map(|d| d.to_string().replace(&path.display().to_string(), "p.yaml"))
        .collect();
    let want = [
        (
            "p.yaml:19:32:",
            "triggers[0].actions[0].switch_route.route: no route `nope`; the routes are `default/app`",
        ),
        (
            "p.yaml:19:47:",
            "triggers[0].actions[0].switch_route.backend: no backend `fallbak`",
        ),
        (
            "p.yaml:20:52:",
            "triggers[0].actions[1].set_server_state.server: backend `default/pool` has no server `s9`; its servers are `s1`, `s2`",
        ),
        (
            "p.yaml:21:25:",
            "triggers[0].actions[2].block.table: no stick table `per_nothing`; the tables are `per_ip`",
        ),
        (
            "p.yaml:23:",
            "triggers[0].actions[4].start_workflow.name: no workflow is called `w` (there are none: add `workflows:`)",
        ),
    ];
    assert_eq!(out.len(), want.len(), "{out:#?}");
    for (loc, msg) in want {
        assert!(
            out.iter().any(|d| d.starts_with(loc) && d.contains(msg)),
            "no `{loc} … {msg}` in {out:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_is_a_checked_command_and_ends_when_a_reload_drops_its_backend() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path(), "  []\n").await;
    let by = Principal::token(0, "127.0.0.1:5555".parse().unwrap());
    let switch = |route: &str, backend: &str| Command::SwitchRoute {
        route: route.into(),
        backend: backend.into(),
    };
    for (cmd, status) in [
        (switch("nope", "fallback"), 404),
        (switch("app", "nope"), 404),
        (
            Command::RestoreRoute {
                route: "nope".into(),
            },
            404,
        ),
    ] {
        let e = apply(&rt, &by, cmd).await.unwrap_err();
        assert_eq!(e.status().as_u16(), status, "{e}");
    }
    assert!(
        records(dir.path()).is_empty(),
        "a refused command is not recorded"
    );

    let out = apply(&rt, &by, switch("app", "fallback")).await.unwrap();
    assert_eq!(
        out,
        json!({ "route": "default/app", "backend": "default/fallback", "configured": "default/primary", "before": null })
    );
    assert_eq!(app_backend(&rt), "default/fallback");
    assert_eq!(
        rt.automation.routes.list(),
        [("default/app".to_string(), "default/fallback".to_string())]
    );
    let recs = records(dir.path());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["detail"]["action"], "switch_route");
    assert_eq!(recs[0]["principal"]["provider"], "admin");

    // A reload without the backend ends the switch.
    let path = dir.path().join("portcullis.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let without = yaml.replace(
        "  - { name: fallback, servers: [{ name: f1, address: \"builtin:echo\" }] }\n",
        "",
    );
    assert_ne!(without, yaml);
    std::fs::write(&path, without).unwrap();
    rt.reload("test").await.unwrap();
    assert_eq!(app_backend(&rt), "default/primary");
    assert!(rt.automation.routes.list().is_empty());
    rt.shutdown().await;
}
