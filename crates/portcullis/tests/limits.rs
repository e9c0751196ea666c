//! Limits through the real binary: a per-IP stick table with a deny rule, a usage plan with
//! the IETF rate-limit headers, tables kept (or started afresh) across reloads, and
//! `portcullis check` on unknown counters.

mod common;

use common::{client, Proxy};
use std::time::Duration;

const HEAD: &str = r#"
listeners: [{ name: web, bind: "127.0.0.1:{port}" }]
identity:
  providers:
    - { name: dev, kind: dev_issuer }
backends:
  - { name: o, servers: [{ address: "builtin:echo" }] }
"#;

/// A per-IP table and a route that denies above 3 requests in 10s; `store` is the table's
/// rate counter, `extra` more YAML (routes).
fn per_ip(store: &str, extra: &str) -> String {
    format!(
        r#"{HEAD}
stick_tables:
  - {{ name: per_ip, key: src, size: 1000, store: ["{store}"] }}
routes:
  - name: app
    match: {{ path_prefix: /app }}
    backend: o
    public: true
    limits:
      track: [per_ip]
      rules: [{{ table: per_ip, counter: "{store}", above: 3 }}]
{extra}"#
    )
}

async fn status(c: &reqwest::Client, url: &str) -> reqwest::Response {
    c.get(url).send().await.expect("a response")
}

#[tokio::test]
async fn a_per_ip_table_denies_above_its_threshold_with_retry_after() {
    let p = Proxy::start(&per_ip("http_req_rate(10s)", "")).await;
    let c = client();
    for i in 0..3 {
        let r = status(&c, &p.url("/app/x")).await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    for _ in 0..2 {
        let r = status(&c, &p.url("/app/x")).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "10");
        assert!(r.headers().get("ratelimit").is_none());
    }
    let (_, metrics) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    assert!(
        metrics
            .contains("portcullis_limit_rejections_total{route=\"default/app\",by=\"per_ip\"} 2"),
        "{metrics}"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            p.access_log_text().contains("\"limit\":\"per_ip\"")
        })
        .await
    );
}

fn mint(p: &Proxy, user: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--config"])
        .arg(&p.config)
        .args([
            "--provider",
            "dev",
            "--user",
            user,
            "--groups",
            "eng",
            "--ttl",
            "1h",
        ])
        .output()
        .expect("run portcullis token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn a_usage_plan_allows_its_burst_per_principal_then_429_with_ratelimit_headers() {
    let yaml = format!(
        r#"{HEAD}
usage_plans:
  - {{ name: agents, rate: 5/s, burst: 5 }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    backend: o
    auth: [dev]
    allow: [{{ groups: [eng] }}]
    limits: {{ plan: agents }}
"#
    );
    let p = Proxy::start(&yaml).await;
    let (alice, bob) = (mint(&p, "alice"), mint(&p, "bob"));
    let c = client();
    let get = |token: &str| c.get(p.url("/api/x")).bearer_auth(token).send();
    // Warm the connection, so that the burst is not spread over a connect.
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(get(&alice).await.unwrap());
    }
    for (i, r) in got[..5].iter().enumerate() {
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["ratelimit-policy"], "\"agents\";q=5;w=1");
        let rl = r.headers()["ratelimit"].to_str().unwrap();
        assert!(rl.starts_with("\"agents\";r="), "{rl}");
    }
    let r = &got[5];
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["ratelimit-policy"], "\"agents\";q=5;w=1");
    assert_eq!(r.headers()["ratelimit"], "\"agents\";r=0;t=1");
    assert_eq!(r.headers()["retry-after"], "1");
    // Another principal has its own bucket.
    let r = get(&bob).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-policy"], "\"agents\";q=5;w=1");
}

async fn reload(p: &Proxy) {
    let (s, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_table_and_restarts_a_changed_one() {
    let p = Proxy::start(&per_ip("http_req_rate(10s)", "")).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(status(&c, &p.url("/app/x")).await.status(), 200);
    }
    assert_eq!(status(&c, &p.url("/app/x")).await.status(), 429);

    // An unrelated change: the table and its counts stay.
    let other = "  - { name: other, match: { path_prefix: /other }, backend: o, public: true }\n";
    p.write_config(&per_ip("http_req_rate(10s)", other));
    reload(&p).await;
    assert_eq!(status(&c, &p.url("/other")).await.status(), 200, "reloaded");
    assert_eq!(
        status(&c, &p.url("/app/x")).await.status(),
        429,
        "still limited"
    );
    assert!(!p.log_text().contains("starting it afresh"));

    // A new shape: the table starts afresh, and says so.
    p.write_config(&per_ip("http_req_rate(20s)", other));
    reload(&p).await;
    assert_eq!(
        status(&c, &p.url("/app/x")).await.status(),
        200,
        "a fresh table"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            p.log_text()
                .contains("stick table `per_ip` changed; starting it afresh")
        })
        .await
    );
}

#[test]
fn check_names_the_table_store_of_an_unknown_counter() {
    for bad in ["http_req_rate(10fortnights)", "foo_cnt"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.yaml");
        let yaml = Proxy::render(&per_ip(bad, ""), 8080, 9901, dir.path());
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run portcullis check");
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{bad}: {err}");
        let at = format!("{}:", path.display());
        let line = err
            .lines()
            .find(|l| l.contains(bad) && l.contains(&at))
            .unwrap_or_else(|| panic!("{bad}: {err}"));
        // file:line:col, at stick_tables[0].store.
        let pos: Vec<&str> = line[at.len()..].splitn(3, ':').collect();
        // Line 10 holds the table; column 50 is its `store` list.
        assert_eq!((pos[0], pos[1]), ("10", "50"), "{line}");
        assert!(line.contains("stick_tables[0].store"), "{line}");
    }
}

/// A daily quota survives the process being killed (SIGKILL, no shutdown): counts written
/// by the flusher (every `sync_interval`) are read back, so the restart hands out no fresh
/// quota; past the quota, 429 with `Retry-After` until the day ends, and both policies in
/// the rate-limit headers. The daily usage is in the embedded store for `portcullis usage`.
#[tokio::test]
async fn a_quota_survives_a_kill_and_a_restart() {
    let yaml = format!(
        r#"{HEAD}
limits: {{ sync_interval: 100ms }}
usage_plans:
  - {{ name: visitors, rate: 1000/s, quota: {{ limit: 5, per: day }} }}
routes:
  - name: site
    match: {{ path_prefix: / }}
    backend: o
    public: true
    limits: {{ plan: visitors }}
"#
    );
    let mut p = Proxy::start(&yaml).await;
    let c = client();
    for i in 0..3 {
        let r = status(&c, &p.url("/x")).await;
        assert_eq!(r.status(), 200, "request {i}");
        let rl = r.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(
            rl.contains(&format!("\"visitors-day\";r={};t=", 4 - i)),
            "{rl}"
        );
    }
    // Past one sync interval, then killed without a chance to write anything more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(p.dir.path().join("state/portcullis.db").exists());
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    drop(p);
    let p = Proxy::start_in(dir, &yaml).await;
    let c = client();
    for i in 3..5 {
        let r = status(&c, &p.url("/x")).await;
        assert_eq!(r.status(), 200, "request {i} after the restart");
    }
    let r = status(&c, &p.url("/x")).await;
    assert_eq!(r.status(), 429, "the quota was spent before the restart");
    assert_eq!(
        r.headers()["ratelimit-policy"],
        "\"visitors\";q=1000;w=1, \"visitors-day\";q=5;w=86400"
    );
    let rl = r.headers()["ratelimit"].to_str().unwrap();
    assert!(rl.contains("\"visitors-day\";r=0;t="), "{rl}");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(retry.abs_diff(to_midnight) <= 2, "{retry} vs {to_midnight}");
}

/// A reload that adds the first usage plan opens the embedded store then, so the new plan's
/// quota is counted durably from its first request.
#[tokio::test]
async fn a_reload_that_adds_the_first_plan_opens_the_store() {
    let p = Proxy::start(&per_ip("http_req_cnt", "")).await;
    let db = p.dir.path().join("state/portcullis.db");
    assert!(!db.exists(), "no plans, no store");
    let planned = per_ip(
        "http_req_cnt",
        "  - { name: api, match: { path_prefix: /api }, backend: o, public: true, limits: { plan: daily } }\nusage_plans:\n  - { name: daily, rate: 100/s, quota: { limit: 2, per: day } }\nlimits: { sync_interval: 50ms }\n",
    );
    p.write_config(&planned);
    reload(&p).await;
    assert!(db.exists(), "the reload opened the store");
    let c = client();
    let got: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(status(&c, &p.url("/api/x")).await.status().as_u16());
        }
        v
    };
    assert_eq!(got, [200, 200, 429]);
    // The flusher started with the store: the use reaches the file.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            let out = std::process::Command::new("sqlite3")
                .arg(&db)
                .arg("select sum(used) from quota;")
                .output();
            out.map(|o| String::from_utf8_lossy(&o.stdout).trim() == "2")
                .unwrap_or(false)
        })
        .await,
        "the quota use was written"
    );
}
