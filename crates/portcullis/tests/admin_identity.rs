//! The admin API by identity and policy, through the real binary: people call it with a
//! bearer JWT of `admin.auth`'s provider, and `admin.policies` (Cedar) decide each call by
//! action and resource; refusals are audited; the static token, stored hashed, remains for
//! break-glass; `portcullis admin hash-token` makes the hash.

mod common;

use common::{Origin, Proxy, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn portcullis(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const POLICY: &str = r#"
// The on-call group may read the backends and drain or restore the pool's servers.
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"backends.read", resource);
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"server.set_state",
       resource in Portcullis::Backend::"default/pool");
// The on-call group may publish deploy events, and no other type.
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"events.publish",
       resource == Portcullis::EventType::"com.example.deploy");
// Bob may stop executions of the approve workflow, and nothing else.
permit(principal == Portcullis::User::"bob",
       action == Portcullis::Admin::Action::"workflow.stop",
       resource in Portcullis::Workflow::"approve");
"#;

fn config(origin: &str, token_hash: &str) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
identity:
  providers:
    - {{ name: dev, kind: dev_issuer, key_file: dev.pem }}
backends:
  - {{ name: pool, servers: [{{ name: s1, address: "{origin}" }}] }}
  - {{ name: other, servers: [{{ name: o1, address: "{origin}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}
workflows:
  definitions:
    approve: {{ StartAt: W, States: {{ W: {{ Type: Wait, Seconds: 600, End: true }} }} }}
    other: {{ StartAt: W2, States: {{ W2: {{ Type: Wait, Seconds: 600, End: true }} }} }}
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{token_hash}"]
  auth: [dev]
  policies: [admin.cedar]
"#
    )
}

async fn call(
    p: &Proxy,
    m: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut r = reqwest::Client::new().request(m, p.admin_url(path));
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn mint(p: &Proxy, user: &str, groups: &str) -> String {
    let cfg = p.config.to_str().unwrap().to_string();
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
    let (ok, out, err) = portcullis(&args, None);
    assert!(ok, "portcullis token: {err}");
    out.trim().to_string()
}

/// The audit records of `kind`.
fn audit_records(dir: &Path, kind: &str) -> Vec<Value> {
    let Ok(files) = std::fs::read_dir(dir.join("audit")) else {
        return Vec::new();
    };
    files
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn audit_denials(dir: &Path) -> Vec<Value> {
    audit_records(dir, "admin")
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_call_the_admin_api_as_policy_allows_and_the_hashed_token_still_works() {
    let (ok, hash, err) = portcullis(&["admin", "hash-token"], Some(&format!("{ADMIN_TOKEN}\n")));
    assert!(ok, "{err}");
    let hash = hash.trim().to_string();
    assert!(
        hash.starts_with("sha256:") && hash.len() == 7 + 64,
        "{hash}"
    );
    let (ok, _, _) = portcullis(&["admin", "hash-token"], Some("short\n"));
    assert!(!ok, "a short token is refused");

    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.cedar"), POLICY).unwrap();
    let p = Proxy::start_in(dir, &config(&origin.address(), &hash)).await;
    let alice = mint(&p, "alice", "oncall");
    let carol = mint(&p, "carol", "");

    // Alice reads the backends and drains the pool's server.
    assert_eq!(
        call(&p, Method::GET, "/api/v1/backends", Some(&alice), None)
            .await
            .0,
        200
    );
    let (s, b) = call(
        &p,
        Method::POST,
        "/api/v1/backends/pool/servers/s1/state",
        Some(&alice),
        Some(json!({ "state": "drain" })),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // ... but not another backend's, nor the config.
    let (s, b) = call(
        &p,
        Method::POST,
        "/api/v1/backends/other/servers/o1/state",
        Some(&alice),
        Some(json!({ "state": "drain" })),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("server.set_state"), "{b}");
    assert_eq!(
        call(&p, Method::GET, "/api/v1/config", Some(&alice), None)
            .await
            .0,
        403
    );
    // Carol is in no group: nothing.
    assert_eq!(
        call(&p, Method::GET, "/api/v1/backends", Some(&carol), None)
            .await
            .0,
        403
    );
    // No credentials, or a forged one: 401.
    assert_eq!(
        call(&p, Method::GET, "/api/v1/backends", None, None)
            .await
            .0,
        401
    );
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    assert_eq!(
        call(&p, Method::GET, "/api/v1/backends", Some(&forged), None)
            .await
            .0,
        401
    );
    // The static token (stored as its hash) is break-glass: everything.
    let (s, b) = call(&p, Method::GET, "/api/v1/config", Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 200, "{b}");
    // The hash itself is not a token.
    assert_eq!(
        call(&p, Method::GET, "/api/v1/config", Some(&hash), None)
            .await
            .0,
        401
    );

    let backends: Value = serde_json::from_str(
        &call(&p, Method::GET, "/api/v1/backends", Some(ADMIN_TOKEN), None)
            .await
            .1,
    )
    .unwrap();
    let state = |b: &str, s: &str| {
        backends["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == format!("default/{b}"))
            .unwrap()["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == s)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(
        (state("pool", "s1"), state("other", "o1")),
        (json!("drain"), json!("ready"))
    );

    // Who may publish which event types.
    let event = |ty: &str| json!({ "specversion": "1.0", "id": format!("e-{ty}"), "source": "/ci", "type": ty });
    let publish = |body: Value| {
        let (p, alice) = (&p, &alice);
        async move {
            let r = reqwest::Client::new()
                .post(p.admin_url("/api/v1/events"))
                .bearer_auth(alice)
                .header(
                    "content-type",
                    if body.is_array() {
                        "application/cloudevents-batch+json"
                    } else {
                        "application/cloudevents+json"
                    },
                )
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    assert_eq!(publish(event("com.example.deploy")).await, 202);
    assert_eq!(publish(event("com.example.other")).await, 403);
    assert_eq!(
        publish(json!([
            event("com.example.deploy"),
            event("com.example.other")
        ]))
        .await,
        403
    );
    // A `ce-type` header of an allowed type beside a structured body of another names
    // nothing: the body's type is what would be published, so it is what is decided.
    let r = reqwest::Client::new()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(&alice)
        .header("content-type", "application/cloudevents+json")
        .header("ce-type", "com.example.deploy")
        .body(event("com.example.other").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "{}", r.text().await.unwrap());

    // Refusals are audited with the person and the reason; the allowed drain is audited too.
    let denied = audit_denials(p.dir.path());
    assert_eq!(denied.len(), 6, "{denied:#?}");
    // So are the calls refused before anyone was known: no credentials, a forged token, the
    // token's hash as a token (each an authentication failure of the admin listener, with
    // the address and the path, and no credential).
    let failures = audit_records(p.dir.path(), "auth_failure");
    assert_eq!(failures.len(), 3, "{failures:#?}");
    for f in &failures {
        assert_eq!(f["detail"]["listener"], "admin", "{f}");
        assert_eq!(f["client_ip"], "127.0.0.1", "{f}");
        assert_eq!(f["decision"], "deny", "{f}");
        assert!(
            !f.to_string().contains(&forged[..20]),
            "a credential in {f}"
        );
    }
    assert!(failures
        .iter()
        .any(|f| f["reasons"][0] == "authentication: missing credentials"));
    assert!(
        denied
            .iter()
            .any(|r| r["principal"]["user"] == "alice"
                && r["detail"]["action"] == "server.set_state"),
        "{denied:#?}"
    );
}

/// A person's route switch is decided on the backend it sends the route to, as well as on
/// the route: a permit on one route must not send it to a backend the person may not use.
/// Accepted and refused changes are both recorded under the person's own principal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_switch_needs_the_destination_backend_too() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.cedar"),
        r#"
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"route.switch",
       resource == Portcullis::Route::"default/app");
permit(principal in Portcullis::Group::"oncall",
       action == Portcullis::Admin::Action::"route.switch",
       resource == Portcullis::Backend::"default/pool");
"#,
    )
    .unwrap();
    let p = Proxy::start_in(
        dir,
        &config(
            &origin.address(),
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ),
    )
    .await;
    let alice = mint(&p, "alice", "oncall");
    let switch = |to: &'static str| {
        call(
            &p,
            Method::POST,
            "/api/v1/routes/app/switch",
            Some(&alice),
            Some(json!({ "backend": to })),
        )
    };
    let (s, b) = switch("other").await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("default/other"), "{b}");
    let (s, b) = switch("pool").await;
    assert_eq!(s, 200, "{b}");

    let records = audit_records(p.dir.path(), "admin");
    let switches: Vec<&Value> = records
        .iter()
        .filter(|r| r["detail"]["action"] == "switch_route")
        .collect();
    assert_eq!(switches.len(), 2, "{records:#?}");
    for r in &switches {
        assert_eq!(r["principal"]["user"], "alice", "{r}");
        assert_eq!(r["principal"]["provider"], "dev", "{r}");
        assert_eq!(r["principal"]["groups"], json!(["oncall"]), "{r}");
    }
    assert_eq!(switches[0]["decision"], "deny", "{:?}", switches[0]);
    assert_eq!(switches[1]["decision"], "allow", "{:?}", switches[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_scopes_workflow_actions_to_one_workflow() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.cedar"), POLICY).unwrap();
    let p = Proxy::start_in(dir, &config(&origin.address(), ADMIN_TOKEN)).await;
    let start = |w: &'static str| {
        let p = &p;
        async move {
            let (s, b) = call(
                p,
                Method::POST,
                &format!("/api/v1/workflows/{w}/executions"),
                Some(ADMIN_TOKEN),
                Some(json!({})),
            )
            .await;
            assert_eq!(s, 201, "{b}");
            serde_json::from_str::<Value>(&b).unwrap()["executionId"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let mine = start("approve").await;
    let theirs = start("other").await;
    let bob = mint(&p, "bob", "");
    let (s, b) = call(
        &p,
        Method::POST,
        &format!("/api/v1/executions/{theirs}/stop"),
        Some(&bob),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    let (s, b) = call(
        &p,
        Method::POST,
        &format!("/api/v1/executions/{mine}/stop"),
        Some(&bob),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // Bob may not read them, nor start one.
    assert_eq!(
        call(
            &p,
            Method::GET,
            &format!("/api/v1/executions/{mine}"),
            Some(&bob),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            &p,
            Method::POST,
            "/api/v1/workflows/approve/executions",
            Some(&bob),
            Some(json!({}))
        )
        .await
        .0,
        403
    );
}

#[test]
fn a_plaintext_admin_token_is_a_warning_and_a_bad_hash_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |tokens: &str| {
        let f = dir.path().join("p.yaml");
        std::fs::write(
            &f,
            format!("listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\nbackends: [{{ name: b, servers: [{{ name: s, address: \"127.0.0.1:1\" }}] }}]\nroutes: [{{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}]\nadmin: {{ tokens: [{tokens}] }}\n"),
        )
        .unwrap();
        f
    };
    let f = write(&format!("\"{ADMIN_TOKEN}\""));
    let (ok, out, err) = portcullis(&["check", "--config", f.to_str().unwrap()], None);
    assert!(ok, "{out}{err}");
    assert!((out.clone() + &err).contains("hash-token"), "{out}{err}");
    let f = write("\"sha256:abcd\"");
    let (ok, out, err) = portcullis(&["check", "--config", f.to_str().unwrap()], None);
    assert!(!ok);
    assert!((out + &err).contains("64 hex digits"));
}

/// Lists show only what each item's own read allows: with `table.read` and `workflow.read`
/// permitted on the config alone, the dashboard shows no table's entries and no execution,
/// and the executions list none (their pages answer 403); a permit on one table and one
/// workflow shows that table and those executions, and nothing of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_show_only_the_items_a_person_may_read() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.cedar"),
        r#"
permit(principal == Portcullis::User::"carol",
       action in [Portcullis::Admin::Action::"dashboard.read", Portcullis::Admin::Action::"table.read",
                  Portcullis::Admin::Action::"workflow.read"],
       resource == Portcullis::Config::"config");
permit(principal == Portcullis::User::"dave",
       action in [Portcullis::Admin::Action::"dashboard.read", Portcullis::Admin::Action::"workflow.read"],
       resource == Portcullis::Config::"config");
permit(principal == Portcullis::User::"dave", action == Portcullis::Admin::Action::"table.read",
       resource == Portcullis::Table::"per_ip");
permit(principal == Portcullis::User::"dave", action == Portcullis::Admin::Action::"workflow.read",
       resource in Portcullis::Workflow::"approve");
"#,
    )
    .unwrap();
    let yaml = config(&origin.address(), ADMIN_TOKEN)
        + "stick_tables:\n  - { name: per_ip, key: src, size: 100, expire: 10m, store: [gpc0, tags] }\n  - { name: per_key, key: src, size: 100, expire: 10m, store: [gpc0, tags] }\n";
    let p = Proxy::start_in(dir, &yaml).await;
    for t in ["per_ip", "per_key"] {
        let (s, b) = call(
            &p,
            Method::POST,
            &format!("/api/v1/tables/{t}/entries/192.0.2.7"),
            Some(ADMIN_TOKEN),
            Some(json!({ "tag": format!("secret-{t}") })),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    for w in ["approve", "other"] {
        let (s, b) = call(
            &p,
            Method::POST,
            &format!("/api/v1/workflows/{w}/executions"),
            Some(ADMIN_TOKEN),
            Some(json!({ "name": format!("run-{w}"), "input": { "secret": w } })),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
    let carol = mint(&p, "carol", "");
    let dave = mint(&p, "dave", "");
    let look = |who: &str| {
        let who = who.to_string();
        let p = &p;
        async move {
            let (s, b) = call(p, Method::GET, "/api/v1/dashboard", Some(&who), None).await;
            assert_eq!(s, 200, "{b}");
            let d: Value = serde_json::from_str(&b).unwrap();
            let (s, b) = call(p, Method::GET, "/api/v1/executions", Some(&who), None).await;
            assert_eq!(s, 200, "{b}");
            let l: Value = serde_json::from_str(&b).unwrap();
            (d, l)
        }
    };
    // Carol: the config only. Each table's and execution's page refuses her, and so do
    // the lists.
    let (d, l) = look(&carol).await;
    assert!(!d.to_string().contains("secret-"), "{d}");
    assert_eq!(d["tables"], json!([]), "{d}");
    assert_eq!(d["executions"], json!([]), "{d}");
    assert_eq!(l["executions"], json!([]), "{l}");
    assert_eq!(
        call(
            &p,
            Method::GET,
            "/api/v1/tables/per_key",
            Some(&carol),
            None
        )
        .await
        .0,
        403
    );
    // Dave: one table, one workflow.
    let (d, l) = look(&dave).await;
    let tables: Vec<&str> = d["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"]["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(tables, ["per_ip"], "{d}");
    assert!(!d.to_string().contains("secret-per_key"), "{d}");
    let runs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["workflow"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(runs(&d["executions"]), ["approve"], "{d}");
    assert_eq!(runs(&l["executions"]), ["approve"], "{l}");
    assert!(!l.to_string().contains("\"other\""), "{l}");
}

/// An event stream opened before a person's `events.read` is revoked ends with it: the
/// revocation (a policy reloaded) is decided again before the next event goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_event_stream_ends_when_its_reader_is_revoked() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    let allow = r#"permit(principal == Portcullis::User::"erin", action == Portcullis::Admin::Action::"events.read", resource);"#;
    std::fs::write(dir.path().join("admin.cedar"), allow).unwrap();
    let p = Proxy::start_in(dir, &config(&origin.address(), ADMIN_TOKEN)).await;
    let erin = mint(&p, "erin", "");
    let mut stream = reqwest::Client::new()
        .get(p.admin_url("/api/v1/events/stream?types=com.example.*"))
        .bearer_auth(&erin)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let publish = |id: &'static str| publish_event(&p, id.to_string());
    // Reads until `id` arrives (true) or the stream ends or stalls (false).
    async fn until(stream: &mut reqwest::Response, id: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = String::new();
        while std::time::Instant::now() < deadline {
            match tokio::time::timeout(std::time::Duration::from_secs(1), stream.chunk()).await {
                Ok(Ok(Some(c))) => {
                    seen.push_str(&String::from_utf8_lossy(&c));
                    if seen.contains(&format!("id: {id}")) {
                        return true;
                    }
                }
                Ok(_) => return false,
                Err(_) => {}
            }
        }
        false
    }
    publish("before").await;
    assert!(until(&mut stream, "before").await, "the stream delivers");
    std::fs::write(
        p.dir.path().join("admin.cedar"),
        format!("{allow}\nforbid(principal == Portcullis::User::\"erin\", action, resource);\n"),
    )
    .unwrap();
    let (s, b) = call(&p, Method::POST, "/api/v1/reload", Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 200, "{b}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    publish("after").await;
    assert!(
        !until(&mut stream, "after").await,
        "a revoked reader's stream went on"
    );
}

/// The event stream and the console's live view end with the credential they were opened
/// with: a break-glass token removed from `admin.tokens` (and the config reloaded) no longer
/// reads anything, even on a stream it opened before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_when_their_token_is_removed() {
    const SECOND: &str = "second-admin-token-0123456789";
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.cedar"), "").unwrap();
    let yaml = config(&origin.address(), ADMIN_TOKEN).replace(
        &format!("tokens: [\"{ADMIN_TOKEN}\"]"),
        &format!("tokens: [\"{ADMIN_TOKEN}\", \"{SECOND}\"]"),
    );
    let p = Proxy::start_in(dir, &yaml).await;
    let open = |path: &'static str| {
        let p = &p;
        async move {
            let r = reqwest::Client::new()
                .get(p.admin_url(path))
                .bearer_auth(SECOND)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r
        }
    };
    let mut events = open("/api/v1/events/stream").await;
    let mut looks = open("/api/v1/dashboard/stream").await;
    let publish = || publish_event(&p, uuid_like());
    // Both deliver while the token is in the config.
    publish().await;
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), events.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), looks.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");

    let text = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace(&format!(", \"{SECOND}\""), "");
    std::fs::write(&p.config, text).unwrap();
    let (s, b) = call(&p, Method::POST, "/api/v1/reload", Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 200, "{b}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // Each stream ends within a few seconds (what was in flight may still arrive).
    for (what, stream) in [("events", &mut events), ("dashboard", &mut looks)] {
        let mut ended = false;
        for _ in 0..8 {
            publish().await;
            match tokio::time::timeout(std::time::Duration::from_secs(1), stream.chunk()).await {
                Ok(Ok(None)) | Ok(Err(_)) => {
                    ended = true;
                    break;
                }
                _ => {}
            }
        }
        assert!(ended, "the {what} stream of a removed token went on");
    }
}

/// Publishes a `com.example.x` event with `id` through the admin API (with the token).
async fn publish_event(p: &Proxy, id: String) {
    let ev = json!({ "specversion": "1.0", "id": id, "source": "/ci", "type": "com.example.x" });
    let r = reqwest::Client::new()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/cloudevents+json")
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("ev-{}", N.fetch_add(1, Ordering::Relaxed))
}
