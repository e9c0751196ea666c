//! Automation through the real binary: triggers are validated with the rest of the config,
//! and a trigger on a health check's verdict fails a route over to another backend and back.

mod common;
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn check(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "p.yaml");
    (out.status.code(), text)
}

const BASE: &str = r#"listeners: [{ name: web, bind: "127.0.0.1:18080" }]
backends:
  - { name: o, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: site, match: { path_prefix: / }, backend: o, public: true }
"#;

/// A trigger with an unknown field or action is a config error at its place, with the fix.
#[test]
fn check_locates_trigger_mistakes() {
    let (code, err) = check(&format!(
        "{BASE}triggers:
  - name: drain-on-errors
    match: {{ type: dev.portcullis.server.down }}
    cooldwn: 1m
    actions:
      - set_server_state: {{ backend: o, server: \"{{data.server}}\", state: drain }}
      - explode: {{}}
"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("p.yaml:9:") && err.contains("did you mean `cooldown`?"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:12:") && err.contains("unknown action `explode`"),
        "{err}"
    );
    let (code, err) = check(&format!(
        "{BASE}triggers:
  - name: drain-on-errors
    match: {{ type: dev.portcullis.server.down }}
    cooldown: 1m
    actions:
      - set_server_state: {{ backend: o, server: \"{{data.server}}\", state: drain }}
"
    ));
    assert_eq!(code, Some(0), "{err}");
}

/// An action that names a backend, route, server or table the config lacks (in fixed text),
/// or one this build does not run, is a config error at its place.
#[test]
fn check_locates_what_actions_name() {
    let (code, err) = check(&format!(
        "{BASE}stick_tables:
  - {{ name: per_ip, key: src, size: 100, store: [http_req_cnt] }}
triggers:
  - name: failover
    match: {{ type: dev.portcullis.server.down, subject: \"default/o/*\" }}
    for_each: subject
    actions:
      - switch_route: {{ route: site, backend: standby }}
      - restore_route: {{ route: nope }}
      - block: {{ table: per_ip, key: \"{{data.key}}\", for: 10m }}
      - set_server_state: {{ backend: o, server: s2, state: drain }}
      - start_workflow: {{ name: nope }}
      - set_server_state: {{ backend: \"{{data.backend}}\", server: \"{{data.server}}\", state: drain }}
"
    ));
    assert_eq!(code, Some(1), "{err}");
    for (at, says) in [
        (
            "p.yaml:13:47:",
            "no backend `standby`; the backends are `default/o`",
        ),
        (
            "p.yaml:14:33:",
            "no route `nope`; the routes are `default/site`",
        ),
        (
            "p.yaml:15:25:",
            "stick table `per_ip` does not store `gpc0`",
        ),
        ("p.yaml:16:49:", "backend `default/o` has no server `s2`"),
        ("p.yaml:17:", "no workflow is called `nope`"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(at) && l.contains(says)),
            "no `{at} … {says}` in:\n{err}"
        );
    }
    // The templated action is checked when it runs, not here.
    assert_eq!(err.matches("p.yaml:").count(), 5, "{err}");
}

/// The route `app` on `primary`, health-checked every 100ms (one failure marks it down), a
/// `fallback`, and triggers that switch the route on `server.down` and back on `server.up`.
const FAILOVER: &str = r#"listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
state_dir: "{dir}/state"
audit: { sink: file, dir: "{dir}/audit", fsync: every_record }
backends:
  - name: primary
    servers: [{ name: p1, address: "PRIMARY" }]
    health_check: { tcp: true, interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }
  - name: fallback
    servers: [{ name: f1, address: "FALLBACK" }]
routes:
  - { name: app, match: { path_prefix: / }, backend: primary, public: true }
triggers:
  - name: failover
    match: { type: dev.portcullis.server.down, subject: "default/primary/*" }
    for_each: subject
    actions: [{ switch_route: { route: app, backend: fallback } }]
  - name: failback
    match: { type: dev.portcullis.server.up, subject: "default/primary/*" }
    for_each: subject
    actions: [{ restore_route: { route: app } }]
"#;

/// An origin answering `name`, whose connections all end when the returned task is aborted
/// (unlike [`Origin::stop`], which only stops accepting).
fn killable(name: &'static str, l: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(name),
                )))
            });
            conns.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    })
}

/// The body of a 200 answer to `GET url`.
async fn body(c: &reqwest::Client, url: &str) -> Option<String> {
    let r = c.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// What one request of the load loop got: when, and the body or the failure.
type Answer = (Instant, Result<String, String>);

/// GETs `/` every 10ms until `stop`, one fresh connection each.
fn load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Answer>> {
    tokio::spawn(async move {
        let c = client();
        let mut got = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => Ok(r.text().await.unwrap_or_default()),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            got.push((Instant::now(), r));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        got
    })
}

/// The origin dies under load; its health check's verdict (`server.down`) switches the route
/// to `fallback` at once, and no request fails after the switch. When the origin returns on
/// the same port, `server.up` restores the route. Both switches are audited as the trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_fails_the_route_over_and_back() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let primary_addr = l.local_addr().unwrap();
    let primary = killable("primary", l);
    let fallback = Origin::named("fallback").await;
    let yaml = FAILOVER
        .replace("PRIMARY", &primary_addr.to_string())
        .replace("FALLBACK", &fallback.address());
    let p = Proxy::start(&yaml).await;
    let c = client();
    assert_eq!(
        c.get(p.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "primary"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(p.url("/"), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    // Its listener and every open connection go at once, as when the process dies.
    primary.abort();
    let switched = eventually(Duration::from_secs(5), || async {
        body(&c, &p.url("/")).await.as_deref() == Some("fallback")
    })
    .await;
    assert!(
        switched,
        "the route was not switched; log:\n{}",
        p.log_text()
    );
    let switch_after = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The origin comes back on its port: the route returns to it.
    let l = tokio::net::TcpListener::bind(primary_addr).await.unwrap();
    let primary = killable("primary", l);
    let back = eventually(Duration::from_secs(5), || async {
        body(&c, &p.url("/")).await.as_deref() == Some("primary")
    })
    .await;
    assert!(back, "the route did not return; log:\n{}", p.log_text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = loader.await.unwrap();

    // After the first answer from the fallback, every request was answered.
    let first_fallback = answers
        .iter()
        .position(|(_, r)| r.as_deref() == Ok("fallback"))
        .expect("the fallback answered");
    let failed_after: Vec<_> = answers[first_fallback..]
        .iter()
        .filter(|(_, r)| r.is_err())
        .collect();
    assert!(
        failed_after.is_empty(),
        "failed after the switch: {failed_after:?}"
    );
    let first = answers[first_fallback].0.duration_since(killed);
    eprintln!(
        "switch seen by the load {}ms after the kill ({}ms by the probe); {} requests",
        first.as_millis(),
        switch_after.as_millis(),
        answers.len()
    );
    // The check runs every 100ms and one failure is a verdict: the switch follows within a
    // second of the kill, verdict included.
    assert!(first < Duration::from_secs(1), "{first:?}");
    assert_eq!(answers.last().unwrap().1.as_deref(), Ok("primary"));

    // Each switch is in the audit trail, as the trigger that made it.
    let audit: Vec<serde_json::Value> = std::fs::read_dir(p.dir.path().join("audit"))
        .unwrap()
        .filter_map(|e| e.ok())
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    let by = |action: &str, who: &str| {
        audit
            .iter()
            .filter(|r| r["detail"]["action"] == action && r["principal"]["user"] == who)
            .count()
    };
    assert_eq!(by("switch_route", "failover"), 1, "{audit:#?}");
    assert!(by("restore_route", "failback") >= 1, "{audit:#?}");
    assert_eq!(by("firing", "failover"), 1, "{audit:#?}");
    drop(fallback);
    primary.abort();
}

/// Triggers on events posted to the admin API, with the store and the audit trail in `SHARED`
/// (outside the proxy's own directory, so a second process finds them).
const ONCE: &str = r#"listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
state_dir: "SHARED/state"
audit: { sink: file, dir: "SHARED/audit", fsync: every_record }
backends:
  - { name: o, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: site, match: { path_prefix: / }, backend: o, public: true }
stick_tables:
  - { name: per_ip, key: src, size: 100, store: [gpc0] }
triggers:
  - name: ban
    match: { type: com.example.ban }
    for_each: subject
    actions: [{ set_table: { table: per_ip, key: "{subject}", gpc0: 1 } }]
  - name: sentinel
    match: { type: com.example.sentinel }
    for_each: subject
    actions: [{ set_table: { table: per_ip, key: "{subject}", gpc0: 2 } }]
"#;

fn audit_in(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn firings_of(dir: &std::path::Path, trigger: &str) -> usize {
    audit_in(dir)
        .iter()
        .filter(|r| r["detail"]["action"] == "firing" && r["detail"]["args"]["trigger"] == trigger)
        .count()
}

/// The audit trail's denials of `action`, once there is one (or after 5 s).
async fn denials(p: &Proxy, action: &str) -> Vec<serde_json::Value> {
    let of = || -> Vec<serde_json::Value> {
        audit_in(&p.dir.path().join("audit"))
            .into_iter()
            .filter(|r| r["decision"] == "deny" && r["detail"]["action"] == action)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while of().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    of()
}

async fn post_event(p: &Proxy, event: &serde_json::Value) {
    let r = reqwest::Client::new()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 202, "{}", r.text().await.unwrap_or_default());
}

/// A firing's key is claimed in SQLite before it runs: the same event delivered again after
/// the process was killed with -9 and restarted does not run it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_is_not_run_again_after_a_kill_and_restart() {
    let shared = tempfile::tempdir().unwrap();
    let yaml = ONCE.replace("SHARED", &shared.path().display().to_string());
    let audit = shared.path().join("audit");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let time = |s: u64| {
        let days = s / 86_400;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        let t = s % 86_400;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            t / 3600,
            t / 60 % 60,
            t % 60
        )
    };
    let ban = serde_json::json!({
        "specversion": "1.0", "id": "ban-1", "source": "test://client",
        "type": "com.example.ban", "subject": "192.0.2.7", "time": time(now),
    });
    let sentinel = |id: &str| {
        serde_json::json!({
            "specversion": "1.0", "id": id, "source": "test://client",
            "type": "com.example.sentinel", "subject": id, "time": time(now),
        })
    };

    let p = Proxy::start(&yaml).await;
    post_event(&p, &ban).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            firings_of(&audit, "ban") == 1
        })
        .await,
        "no firing; log:\n{}",
        p.log_text()
    );
    drop(p); // SIGKILL

    let p = Proxy::start(&yaml).await;
    post_event(&p, &ban).await;
    post_event(&p, &sentinel("after-restart")).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            firings_of(&audit, "sentinel") == 1
        })
        .await,
        "log:\n{}",
        p.log_text()
    );
    assert_eq!(firings_of(&audit, "ban"), 1, "{:#?}", audit_in(&audit));
    assert!(
        p.log_text().contains("was claimed before"),
        "{}",
        p.log_text()
    );
}

/// `admin.policies` draw the automation's lines: a trigger may drain its own app's servers,
/// and its command on another app's server is refused, audited and not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cedar_policy_keeps_a_trigger_off_another_apps_servers() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("apps")).unwrap();
    std::fs::write(
        dir.path().join("apps/shop.yaml"),
        format!(
            "name: shop\nbackends: [{{ name: web, servers: [{{ name: s1, address: \"{0}\" }}, {{ name: s2, address: \"{0}\" }}] }}]\nroutes: [{{ name: shop, match: {{ path_prefix: /shop }}, backend: web, public: true }}]\n",
            origin.address()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("admin.cedar"),
        r#"permit(principal == Portcullis::Trigger::"drainer", action == Portcullis::Admin::Action::"server.set_state", resource in Portcullis::App::"default");
permit(principal == Portcullis::Trigger::"switcher", action == Portcullis::Admin::Action::"route.switch", resource in Portcullis::App::"default");"#,
    )
    .unwrap();
    let yaml = format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
apps: {{ include: ["apps/*.yaml"] }}
# Two servers each: draining one stays within max_unavailable (50%).
backends: [{{ name: pool, servers: [{{ name: s1, address: "{o}" }}, {{ name: s2, address: "{o}" }}] }}]
routes: [{{ name: app, match: {{ path_prefix: / }}, backend: pool, public: true }}]
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{ADMIN_TOKEN}"]
  policies: [admin.cedar]
triggers:
  - name: drainer
    match: {{ type: com.example.maintenance }}
    actions:
      - set_server_state: {{ backend: default/pool, server: s1, state: drain }}
      - set_server_state: {{ backend: shop/web, server: s1, state: drain }}
  # Its own app's route, sent to another app's backend (by the event's data).
  - name: switcher
    match: {{ type: com.example.switch }}
    actions:
      - switch_route: {{ route: default/app, backend: "{{data.to}}" }}
"#,
        o = origin.address()
    );
    let p = Proxy::start_in(dir, &yaml).await;
    post_event(
        &p,
        &serde_json::json!({ "specversion": "1.0", "id": "m-1", "source": "/ops", "type": "com.example.maintenance" }),
    )
    .await;
    let state = |b: &serde_json::Value, backend: &str| {
        b["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == backend)
            .unwrap()["servers"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut drained = false;
    for _ in 0..100 {
        if state(&p.backends().await, "default/pool") == "drain" {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        drained,
        "its own app's server was not drained:\n{}",
        p.log_text()
    );
    assert_eq!(
        state(&p.backends().await, "shop/web"),
        "ready",
        "another app's server was drained"
    );
    let denied = denials(&p, "set_state").await;
    assert_eq!(
        denied.len(),
        1,
        "{:#?}\n{}",
        audit_in(&p.dir.path().join("audit")),
        p.log_text()
    );
    assert_eq!(denied[0]["principal"]["provider"], "trigger");
    assert_eq!(denied[0]["detail"]["args"]["backend"], "shop/web");
    // The firing's own record says which action was denied. It is written once the firing's
    // actions are done, after the denial's record: wait for it too.
    let outcomes_of = |dir: &std::path::Path| -> Vec<String> {
        audit_in(&dir.join("audit"))
            .iter()
            .filter(|r| r["detail"]["action"] == "firing")
            .flat_map(|r| {
                r["detail"]["args"]["actions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|a| a.to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while outcomes_of(p.dir.path()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = outcomes_of(p.dir.path());
    assert!(
        outcomes.iter().any(|o| o.contains("denied")),
        "{outcomes:#?}"
    );

    // A switch is decided on where it sends the route: the trigger may switch its own app's
    // route, but not to another app's backend, whatever the event says.
    post_event(
        &p,
        &serde_json::json!({ "specversion": "1.0", "id": "s-1", "source": "/ops", "type": "com.example.switch", "data": { "to": "shop/web" } }),
    )
    .await;
    let denied = denials(&p, "switch_route").await;
    assert_eq!(denied.len(), 1, "{}", p.log_text());
    assert_eq!(denied[0]["detail"]["args"]["backend"], "shop/web");
}
