//! Usage reports through the real binary: requests as two principals and from a public
//! route, then `GET /api/v1/usage` on the admin API (filters, quota use, errors) and
//! `portcullis usage` reading the store while the proxy runs.

mod common;

use common::{client, Proxy, ADMIN_TOKEN};
use serde_json::{json, Value};
use std::process::Output;
use std::time::Duration;

const YAML: &str = r#"
listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
identity:
  providers:
    - { name: dev, kind: dev_issuer }
backends:
  - { name: o, servers: [{ address: "builtin:echo" }] }
limits: { sync_interval: 100ms }
usage_plans:
  - { name: agents, rate: 1000/s, quota: { limit: 100, per: day } }
  - { name: visitors, rate: 1000/s }
routes:
  - name: api
    match: { path_prefix: /api }
    backend: o
    auth: [dev]
    allow: [{ groups: [eng] }]
    limits: { plan: agents }
  - name: site
    match: { path_prefix: /pub }
    backend: o
    public: true
    limits: { plan: visitors }
"#;

fn mint(p: &Proxy, user: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--config"])
        .arg(&p.config)
        .args(["--provider", "dev", "--user", user, "--groups", "eng"])
        .output()
        .expect("run portcullis token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `portcullis usage --config FILE ARGS…`.
fn usage_cli(config: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["usage", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run portcullis usage")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The current UTC day, as `YYYY-MM-DD`.
fn today() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    portcullis_limits::quota::day_string(portcullis_limits::quota::day_of(now))
}

async fn get(p: &Proxy, query: &str) -> (u16, Value) {
    let (s, body) = p
        .admin(reqwest::Method::GET, &format!("/api/v1/usage{query}"), None)
        .await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{s} {body}: {e}"));
    (s, v)
}

/// A key's requests over the span: the sum of its days (robust to a midnight in between).
fn total(days: &Value) -> u64 {
    days.as_array()
        .unwrap_or_else(|| panic!("not a list of days: {days}"))
        .iter()
        .map(|d| {
            let day = d[0].as_str().unwrap();
            assert_eq!(day.len(), 10, "{d}");
            d[1].as_u64().unwrap()
        })
        .sum()
}

#[tokio::test]
async fn usage_per_plan_key_and_day_from_the_api_and_the_cli() {
    let p = Proxy::start(YAML).await;
    let (alice, bob) = (mint(&p, "alice"), mint(&p, "bob"));
    let c = client();
    for (token, n) in [(&alice, 3), (&bob, 2)] {
        for _ in 0..n {
            let r = c
                .get(p.url("/api/x"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    for _ in 0..4 {
        assert_eq!(c.get(p.url("/pub/x")).send().await.unwrap().status(), 200);
    }

    // Everything, the last 30 days: the counts not yet written are written first.
    let before = today();
    let (s, v) = get(&p, "").await;
    assert_eq!(s, 200, "{v}");
    let to = v["to"].as_str().unwrap().to_string();
    assert!(to == before || to == today(), "{v}");
    let agents = &v["plans"]["agents"];
    assert_eq!(agents.as_object().unwrap().len(), 2, "{v}");
    assert_eq!(total(&agents["dev/alice"]), 3, "{v}");
    assert_eq!(total(&agents["dev/bob"]), 2, "{v}");
    let visitors = &v["plans"]["visitors"];
    assert_eq!(visitors.as_object().unwrap().len(), 1, "{v}");
    assert_eq!(total(&visitors["127.0.0.1"]), 4, "{v}");
    let q = &v["quota"]["agents"]["dev/alice"];
    assert_eq!(
        (&q["limit"], &q["per"], &q["used"], &q["remaining"]),
        (&json!(100), &json!("day"), &json!(3), &json!(97)),
        "{v}"
    );
    assert!(
        q["period_start"].as_str().unwrap().ends_with("T00:00:00Z"),
        "{v}"
    );
    assert_eq!(v["quota"]["agents"]["dev/bob"]["used"], 2, "{v}");
    assert!(v["quota"].get("visitors").is_none(), "no quota: {v}");
    assert!(v.get("warning").is_none(), "{v}");

    // One key; one plan and an address; one day.
    let (s, v) = get(&p, "?key=dev/alice").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["plans"]["agents"].as_object().unwrap().len(),
        1,
        "only alice: {v}"
    );
    assert_eq!(total(&v["plans"]["agents"]["dev/alice"]), 3);
    assert_eq!(v["plans"]["visitors"], json!({}), "{v}");
    let (s, v) = get(&p, "?plan=visitors&key=127.0.0.1").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plans"].as_object().unwrap().len(), 1, "{v}");
    assert_eq!(total(&v["plans"]["visitors"]["127.0.0.1"]), 4);
    assert_eq!(v["quota"], json!({}), "{v}");
    let (s, v) = get(&p, &format!("?plan=agents&from={to}&to={to}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["from"], &v["to"]), (&json!(to), &json!(to)));

    // Errors.
    for (query, says) in [
        ("?from=2026-02-30", "`from`"),
        ("?to=yesterday", "YYYY-MM-DD"),
        ("?from=2026-12-07&to=2026-12-06", "is after `to`"),
        ("?from=2020-01-01&to=2026-01-01", "at most 366"),
        ("?key=alice", "provider/subject"),
        ("?user=alice", "unknown field"),
    ] {
        let (s, v) = get(&p, query).await;
        assert_eq!(s, 400, "{query}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(says), "{query}: {e}");
    }
    let (s, v) = get(&p, "?plan=gold").await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(
        v["error"],
        "no usage plan `gold`; the plans are: agents, visitors"
    );
    let r = c.get(p.admin_url("/api/v1/usage")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(p.admin_url("/api/v1/usage"))
        .bearer_auth(format!("{ADMIN_TOKEN}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The CLI reads the store while the proxy runs: the same requests, and the quota use
    // from the store.
    let (_, api) = get(&p, "").await;
    let out = usage_cli(&p.config, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["plans"], api["plans"]);
    assert_eq!(cli["quota"], api["quota"]);
    let out = usage_cli(&p.config, &["--plan", "agents", "--key", "dev/alice"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["PLAN", "KEY", "DAY", "REQUESTS"], "{table}");
    assert!(
        lines.contains(&vec!["agents", "dev/alice", "total", "3"]),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.len() == 6 && l[..5] == ["agents", "dev/alice", "100/day", "3", "97"]),
        "{table}"
    );
    assert!(!table.contains("dev/bob"), "{table}");

    // New requests reach the store within a sync interval, with no call to the API.
    for _ in 0..2 {
        assert_eq!(c.get(p.url("/pub/y")).send().await.unwrap().status(), 200);
    }
    let written = common::eventually(Duration::from_secs(5), || async {
        let out = usage_cli(
            &p.config,
            &["--json", "--plan", "visitors", "--key", "127.0.0.1"],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["plans"]["visitors"]
            .get("127.0.0.1")
            .is_some_and(|d| total(d) == 6)
    })
    .await;
    assert!(written, "the flusher wrote the new requests");

    // Bad arguments exit 2; an unknown plan 1.
    let out = usage_cli(&p.config, &["--from", "2026-13-01"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("`--from`"),
        "{}",
        text(&out.stderr)
    );
    let out = usage_cli(&p.config, &["--key", "alice"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = usage_cli(&p.config, &["--plan", "gold"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no usage plan `gold`"));
}

#[tokio::test]
async fn without_plans_or_a_store_the_report_is_empty() {
    // No plans: no store, and an empty answer.
    let p = Proxy::start(
        r#"
listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
backends:
  - { name: o, servers: [{ address: "builtin:echo" }] }
routes:
  - { name: site, match: { path_prefix: / }, backend: o, public: true }
"#,
    )
    .await;
    let (s, v) = get(&p, "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["plans"], &v["quota"]), (&json!({}), &json!({})));
    let (s, _) = get(&p, "?plan=agents").await;
    assert_eq!(s, 404);
    drop(p);

    // Plans, but no proxy has run: nothing recorded yet, and nothing created.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, Proxy::render(YAML, 8080, 9901, dir.path())).unwrap();
    let out = usage_cli(&config, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nothing recorded yet"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["PLAN", "KEY", "DAY", "REQUESTS"]
    );
    let out = usage_cli(&config, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plans"], json!({ "agents": {}, "visitors": {} }));
    assert!(!dir.path().join("state").exists());
}
