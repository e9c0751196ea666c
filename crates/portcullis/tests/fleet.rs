//! A fleet on one real Redis: several portcullis processes share `limits.store: { redis }`
//! and enforce one global limit, and each `on_store_error` mode does what it says when
//! Redis is killed mid-load, with no 5xx from the proxy and recovery when Redis is back.
//! The harness starts `redis-server` itself (installed by scripts/test.sh).

mod common;

use common::Proxy;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` on a loopback port, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
}

fn redis_server() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => p,
        None if PathBuf::from("/usr/bin/redis-server").is_file() => "/usr/bin/redis-server".into(),
        None => panic!("redis-server not found: install the Debian package redis-server (scripts/test.sh does)"),
    }
}

fn pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Redis {
    fn start() -> Redis {
        for _ in 0..5 {
            if let Some(r) = Redis::start_on(common::free_port()) {
                return r;
            }
        }
        panic!("could not start redis-server");
    }

    fn start_on(port: u16) -> Option<Redis> {
        let child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let mut r = Redis {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if pong(port) {
                return Some(r);
            }
            if let Some(Ok(Some(_))) = r.child.as_mut().map(Child::try_wait) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        r.kill();
        None
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A public route with a plan (one bucket for every client: they all come from 127.0.0.1)
/// and a route with a rule on a shared request count.
fn fleet_config(redis: &Redis, timeout: &str, on_error: &str, burst: u32) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
identity:
  providers: [{{ name: dev, kind: dev_issuer }}]
backends:
  - {{ name: o, servers: [{{ address: "builtin:echo" }}] }}
limits:
  store: {{ redis: {{ url: "redis://127.0.0.1:{port}", timeout: {timeout} }} }}
  on_store_error: {on_error}
stick_tables:
  - {{ name: everyone, key: route, size: 10, store: [http_req_cnt] }}
  - {{ name: per_ip, key: src, size: 100, store: [gpc0, http_req_cnt, tags] }}
  - {{ name: guesses, key: src, size: 100, store: [http_err_cnt] }}
  - {{ name: pace, key: src, size: 100, store: ["http_req_rate(2s)"] }}
usage_plans:
  - {{ name: shared, rate: 1/h, burst: {burst} }}
routes:
  - name: planned
    match: {{ path_prefix: /plan }}
    backend: o
    public: true
    limits: {{ plan: shared }}
  - name: counted
    match: {{ path_prefix: /count }}
    backend: o
    public: true
    limits:
      track: [everyone]
      rules: [{{ table: everyone, counter: http_req_cnt, above: 150 }}]
  - name: guarded
    match: {{ path_prefix: /guarded }}
    backend: o
    public: true
    limits:
      track: [per_ip]
      rules: [{{ table: per_ip, counter: gpc0, above: 0, status: 403 }}]
  - name: login
    match: {{ path_prefix: /login }}
    backend: o
    auth: [dev]
    allow: [{{}}]
    limits:
      track: [guesses]
      rules: [{{ table: guesses, counter: http_err_cnt, above: 2 }}]
  - name: paced
    match: {{ path_prefix: /paced }}
    backend: o
    public: true
    limits:
      track: [pace]
      rules: [{{ table: pace, counter: "http_req_rate(2s)", above: 2, action: queue, max_wait: 5s }}]
"#,
        port = redis.port
    )
}

/// `total` requests to `path`, spread over `proxies` by `clients` concurrent clients; the
/// statuses seen.
async fn load(proxies: &[&Proxy], path: &str, total: usize, clients: usize) -> Vec<u16> {
    let urls: Vec<String> = proxies.iter().map(|p| p.url(path)).collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (urls, next) = (urls.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let c = common::client();
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return got;
                }
                let r = c
                    .get(&urls[i % urls.len()])
                    .send()
                    .await
                    .expect("a response");
                got.push(r.status().as_u16());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// Three processes, one Redis, concurrent clients: a plan's burst of 300 and a rule at 150
/// requests hold across the fleet, within ±2% (they are exact: one atomic script per check).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_enforce_one_global_limit() {
    let redis = Redis::start();
    // A generous timeout: the machine's two cores run Redis, three proxies and the clients.
    let yaml = fleet_config(&redis, "2s", "deny", 300);
    let (a, b, c) = tokio::join!(
        Proxy::start(&yaml),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    let fleet = [&a, &b, &c];
    let got = load(&fleet, "/plan/x", 900, 12).await;
    let ok = count(&got, 200);
    assert_eq!(ok + count(&got, 429), 900, "only 200 and 429: {got:?}");
    assert!(
        (294..=306).contains(&ok),
        "{ok} of a global burst of 300 let through"
    );
    let got = load(&fleet, "/count/x", 450, 12).await;
    let ok = count(&got, 200);
    assert_eq!(ok + count(&got, 429), 450, "only 200 and 429: {got:?}");
    assert!(
        (147..=153).contains(&ok),
        "{ok} let through by a global rule at 150"
    );
    // Each process answered some of both, so the limit was shared rather than local.
    for p in fleet {
        let (_, m) = p.admin(reqwest::Method::GET, "/metrics", None).await;
        assert!(
            m.contains("portcullis_limit_store_rtt_seconds_count"),
            "{m}"
        );
        assert!(
            !m.contains("portcullis_limit_store_errors_total{"),
            "no store errors: {m}"
        );
    }
}

/// With local batching, leases of tokens spent in each process: the fleet never lets
/// through more than the plan allows (its burst, and what the rate refilled while the load
/// ran), and lets through nearly all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batching_fleet_never_passes_its_plan() {
    let redis = Redis::start();
    // A rate of 100/s and a 10s batch: leases of 30 (a tenth of the burst) that outlive the
    // test, the strictest case for a fleet of three.
    let yaml = fleet_config(&redis, "2s", "deny", 300)
        .replace("timeout: 2s }", "timeout: 2s, batch: 10s }")
        .replace("rate: 1/h", "rate: 100/s");
    assert!(yaml.contains("batch: 10s"), "{yaml}");
    let (a, b, c) = tokio::join!(
        Proxy::start(&yaml),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    let fleet = [&a, &b, &c];
    let start = Instant::now();
    let got = load(&fleet, "/plan/x", 900, 12).await;
    let refilled = (start.elapsed().as_secs_f64() * 100.0).ceil() as usize;
    let ok = count(&got, 200);
    println!("{ok} of 900 let through in {:?}", start.elapsed());
    assert_eq!(ok + count(&got, 429), 900, "only 200 and 429: {got:?}");
    assert!(
        ok <= 300 + refilled + 3,
        "{ok} let through: more than the burst of 300 and {refilled} refilled"
    );
    assert!(ok >= 270, "{ok}: leases were left unspent");
    for p in fleet {
        let (_, m) = p.admin(reqwest::Method::GET, "/metrics", None).await;
        assert!(
            !m.contains("portcullis_limit_store_errors_total{"),
            "no store errors: {m}"
        );
    }
}

/// Redis killed mid-load and started again: `allow` lets everything through, `deny`
/// refuses with 429 (never a 5xx), `local` counts in each process; all of them go back to
/// the shared counts when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_on_store_error_mode_does_what_it_says_when_redis_dies() {
    let mut redis = Redis::start();
    let port = redis.port;
    let configs = ["allow", "deny", "local"].map(|m| fleet_config(&redis, "1s", m, 5));
    let (allow, deny, local) = tokio::join!(
        Proxy::start(&configs[0]),
        Proxy::start(&configs[1]),
        Proxy::start(&configs[2]),
    );
    // The three share one bucket of 5 (same plan, same caller). Not spent before the
    // outage: a caller the store has refused stays refused from each process's deny cache,
    // whatever the mode, until its retry time.
    let before = load(&[&allow, &deny, &local], "/plan/x", 3, 1).await;
    assert_eq!(count(&before, 200), 3, "{before:?}");

    redis.kill();
    let start = Instant::now();
    let outage_allow = load(&[&allow], "/plan/x", 8, 2).await;
    let outage_deny = load(&[&deny], "/plan/x", 8, 2).await;
    let outage_local = load(&[&local], "/plan/x", 8, 2).await;
    assert!(start.elapsed() < Duration::from_secs(5), "no request hangs");
    assert_eq!(count(&outage_allow, 200), 8, "allow: {outage_allow:?}");
    assert_eq!(count(&outage_deny, 429), 8, "deny: {outage_deny:?}");
    // A fresh bucket in this process: its burst of 5, then 429s.
    assert_eq!(count(&outage_local, 200), 5, "local: {outage_local:?}");
    assert_eq!(count(&outage_local, 429), 3, "local: {outage_local:?}");
    // A queue rule on a rate (over 2 in 2 s) holds the local-mode process's requests on its
    // own counts while Redis is gone: the fourth of four at once waits for the rate to fall
    // (it was let through at once, its re-read of Redis failing as "under").
    let held = Instant::now();
    let paced = load(&[&local], "/paced/x", 4, 4).await;
    assert_eq!(count(&paced, 200), 4, "local: {paced:?}");
    assert!(
        held.elapsed() >= Duration::from_millis(400),
        "nothing was held: {:?}",
        held.elapsed()
    );
    for p in [&allow, &deny, &local] {
        let (_, m) = p.admin(reqwest::Method::GET, "/metrics", None).await;
        assert!(m.contains("portcullis_limit_store_errors_total{"), "{m}");
        assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
    }

    // Back on the same port (empty: no persistence). Each process finds it again: the
    // deny-mode one lets requests through again, the allow-mode one limits again.
    let _redis = Redis::start_on(port).expect("redis-server starts again on its port");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = load(&[&deny], "/plan/x", 1, 1).await;
        if got == [200] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deny-mode process never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The allow-mode one limits again: the fresh bucket's tokens, then a 429.
    let mut after = Vec::new();
    while !after.contains(&429) {
        assert!(
            Instant::now() < deadline,
            "the allow-mode process never limited again: {after:?}"
        );
        after.extend(load(&[&allow], "/plan/x", 1, 1).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all: Vec<u16> = [before, outage_allow, outage_deny, outage_local, after].concat();
    assert!(all.iter().all(|s| *s < 500), "no 5xx: {all:?}");
    // The local-mode process's daily usage of the outage waited, and reached the new Redis:
    // the fleet's report counts at least its 5, and never more than were let through.
    // Until the process finds Redis again, the report says so with a 503.
    let body = loop {
        let (status, body) = local
            .admin(reqwest::Method::GET, "/api/v1/usage?plan=shared", None)
            .await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "no report: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reported: u64 = v["plans"]["shared"]["127.0.0.1"]
        .as_array()
        .map(|days| days.iter().map(|d| d[1].as_u64().unwrap()).sum())
        .unwrap_or(0);
    let through = count(&all, 200) as u64;
    assert!(
        (5..=through).contains(&reported),
        "{reported} reported, {through} let through: {body}"
    );
}

/// An operator bans a client on one process of the fleet (gpc0 = 1 over the admin API, an
/// audited control command); every process refuses it, reads the entry from Redis, and
/// lets it in again once another process clears the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ban_set_on_one_process_holds_on_every_process() {
    let redis = Redis::start();
    let yaml = fleet_config(&redis, "2s", "deny", 1000);
    let (a, b, c) = tokio::join!(
        Proxy::start(&yaml),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    assert_eq!(
        load(&[&a, &b, &c], "/guarded/x", 3, 1).await,
        [200, 200, 200]
    );
    let entry = "/api/v1/tables/per_ip/entries/127.0.0.1";
    let (status, body) = a
        .admin(
            reqwest::Method::POST,
            entry,
            Some(serde_json::json!({ "gpc0": 1 })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        load(&[&b, &c, &a], "/guarded/x", 3, 1).await,
        [403, 403, 403]
    );
    let (status, body) = b.admin(reqwest::Method::GET, entry, None).await;
    assert_eq!(status, 200, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["counters"]["gpc0"], 1, "{e}");
    assert_eq!(
        e["counters"]["http_req_cnt"], 6,
        "counted by all three: {e}"
    );
    let (status, body) = c.admin(reqwest::Method::DELETE, entry, None).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(
        load(&[&a, &b, &c], "/guarded/x", 3, 1).await,
        [200, 200, 200]
    );
    // Tags are shared too: set through one process, every other one reads them.
    let (status, body) = a
        .admin(
            reqwest::Method::POST,
            entry,
            Some(serde_json::json!({ "tag": "watched" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = b.admin(reqwest::Method::GET, entry, None).await;
    assert_eq!(status, 200, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["tags"], serde_json::json!(["watched"]), "{e}");
    let (status, body) = c
        .admin(
            reqwest::Method::POST,
            entry,
            Some(serde_json::json!({ "untag": "watched" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = a.admin(reqwest::Method::GET, entry, None).await;
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["tags"], serde_json::json!([]), "{e}");
}

/// In a fleet, failed credentials count in Redis (so a guesser spread over the processes
/// is refused by all of them), and a queue rule on a rate waits for the shared rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_credentials_and_queues_read_the_shared_counts() {
    let redis = Redis::start();
    let yaml = fleet_config(&redis, "2s", "deny", 1000);
    let (a, b, c) = tokio::join!(
        Proxy::start(&yaml),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    let client = common::client();
    let guess = |p: &Proxy| {
        client
            .get(p.url("/login"))
            .bearer_auth("not-a-token")
            .send()
    };
    for p in [&a, &b, &c] {
        assert_eq!(guess(p).await.unwrap().status(), 401);
    }
    // The errors reach Redis within the sync interval (50ms by default).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if guess(&a).await.unwrap().status() == 429 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three guesses never added up across the fleet"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(guess(&b).await.unwrap().status(), 429);

    // Two at once go through; the third waits for the fleet's rate to fall back to 2/s.
    assert_eq!(load(&[&a, &b], "/paced/x", 2, 2).await, [200, 200]);
    assert_eq!(load(&[&c], "/paced/x", 1, 1).await, [200]);
    // Held by the queue rule (over 2 in the fleet's window), then let through.
    let (_, m) = c.admin(reqwest::Method::GET, "/metrics", None).await;
    assert!(
        m.contains("portcullis_limit_queued_total{route=\"default/paced\",table=\"pace\"} 1"),
        "{m}"
    );
}

/// `GET /api/v1/tables/{name}?top=N` on any replica lists the fleet's biggest entries, read
/// from Redis, not just the ones that replica saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_listing_shows_the_whole_fleet() {
    let redis = Redis::start();
    let yaml = format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - {{ name: o, servers: [{{ address: "builtin:echo" }}] }}
limits:
  store: {{ redis: {{ url: "redis://127.0.0.1:{port}", timeout: 2s }} }}
stick_tables:
  - {{ name: per_client, key: "header:x-client", size: 100, store: [http_req_cnt] }}
routes:
  - name: all
    match: {{ path_prefix: / }}
    backend: o
    public: true
    limits: {{ track: [per_client] }}
"#,
        port = redis.port
    );
    let (a, b, c) = tokio::join!(
        Proxy::start(&yaml),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    let client = common::client();
    for (p, who, n) in [
        (&a, "alpha", 3),
        (&b, "alpha", 2),
        (&a, "beta", 4),
        (&b, "gamma", 1),
    ] {
        for _ in 0..n {
            let r = client
                .get(p.url("/x"))
                .header("x-client", who)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // Replica c saw none of them.
    let (status, body) = c
        .admin(
            reqwest::Method::GET,
            "/api/v1/tables/per_client?top=2",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let entries: Vec<(String, u64)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["counters"]["http_req_cnt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [("alpha".to_string(), 5), ("beta".to_string(), 4)],
        "{body}"
    );
    assert_eq!(v["source"], "redis", "{body}");
    assert_eq!(v["scanned"], 3, "{body}");

    // The console's dashboard on replica c shows the fleet's top entries too.
    let (status, body) = c
        .admin(reqwest::Method::GET, "/api/v1/dashboard", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let t = &v["tables"][0];
    assert_eq!(t["source"], "redis", "{body}");
    let keys: Vec<&str> = t["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["alpha", "beta", "gamma"], "{body}");
}

/// `GET /api/v1/usage` on any replica, and `portcullis usage` with the fleet's config, show
/// the fleet's daily usage and quota use, read from Redis: not just what that replica let
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usage_report_shows_the_whole_fleet() {
    let redis = Redis::start();
    let yaml = format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - {{ name: o, servers: [{{ address: "builtin:echo" }}] }}
limits:
  store: {{ redis: {{ url: "redis://127.0.0.1:{port}", timeout: 2s }} }}
  sync_interval: 100ms
usage_plans:
  - {{ name: metered, rate: 100/s, quota: {{ limit: 1000, per: day }} }}
  - {{ name: open, rate: 100/s }}
routes:
  - name: metered
    match: {{ path_prefix: /m }}
    backend: o
    public: true
    limits: {{ plan: metered }}
  - name: open
    match: {{ path_prefix: /o }}
    backend: o
    public: true
    limits: {{ plan: open }}
"#,
        port = redis.port
    );
    // Replica a on one worker (a current-thread runtime: its flusher's sends to Redis are
    // driven by the runtime's own thread), b and c on the default.
    let one_worker = format!("workers: 1\n{yaml}");
    let (a, b, c) = tokio::join!(
        Proxy::start(&one_worker),
        Proxy::start(&yaml),
        Proxy::start(&yaml)
    );
    let client = common::client();
    for (p, path, n) in [(&a, "/m", 3), (&b, "/m", 2), (&b, "/o", 4)] {
        for _ in 0..n {
            let r = client.get(p.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let today = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        portcullis_limits::quota::day_string(secs / 86_400)
    };
    // Replica c let nothing through; a and b send their counts within 100 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (whole, last) = loop {
        let (status, body) = c
            .admin(reqwest::Method::GET, "/api/v1/usage?key=127.0.0.1", None)
            .await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let whole = v["plans"]["metered"]["127.0.0.1"] == serde_json::json!([[&today, 5]])
            && v["plans"]["open"]["127.0.0.1"] == serde_json::json!([[&today, 4]])
            && v["quota"]["metered"]["127.0.0.1"]["used"] == 5
            && v["quota"]["metered"]["127.0.0.1"]["remaining"] == 995;
        if whole || Instant::now() > deadline {
            break (whole, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(whole, "the fleet's usage on replica c: {last}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["usage", "--json", "--plan", "metered", "--config"])
        .arg(&c.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["plans"],
        serde_json::json!({ "metered": { "127.0.0.1": [[today, 5]] } }),
        "{text}"
    );
    assert_eq!(v["quota"]["metered"]["127.0.0.1"]["used"], 5, "{text}");
}
