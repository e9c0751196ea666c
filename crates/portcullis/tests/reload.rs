//! Hot reload as operators use it: SIGHUP, the admin API and plain file edits, under load,
//! with bad configs, with runtime state that must survive, and with listeners coming and going.
mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Backend `b` with servers s1 (ONE) and s2 (TWO, weight __W__), route `r` on `/app`, and
/// EXTRA for more routes or listeners.
const BASE: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:{port}\" }
LISTENERS
backends:
  - name: b
    servers:
      - { name: s1, address: \"ONE\" }
      - { name: s2, address: \"TWO\", weight: __W__ }
routes:
  - { name: r, match: { path_prefix: /app }, backend: b, public: true }
EXTRA
";

fn config(one: &Origin, two: &Origin, weight: u32, extra: &str, listeners: &str) -> String {
    BASE.replace("ONE", &one.address())
        .replace("TWO", &two.address())
        .replace("__W__", &weight.to_string())
        .replace("EXTRA", extra)
        .replace("LISTENERS", listeners)
}

const EXTRA_ROUTE: &str =
    "  - { name: extra, match: { path_prefix: /extra }, backend: b, public: true }";

async fn version(p: &Proxy) -> String {
    p.config_status().await["version"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until the served version differs from `old`, and returns it.
async fn wait_version_change(p: &Proxy, old: &str, what: &str) -> String {
    let changed = eventually(Duration::from_secs(10), || async {
        version(p).await != old
    })
    .await;
    assert!(
        changed,
        "{what}: the version stayed {old}; status {}\nlog:\n{}",
        p.config_status().await,
        p.log_text()
    );
    version(p).await
}

/// A client loop that counts successes and records failures until `stop`.
fn load_loop(
    url: String,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let c = if keep_alive {
            reqwest::Client::new()
        } else {
            client()
        };
        let mut ok = 0;
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut req = c.get(&url).timeout(Duration::from_secs(10));
            if !keep_alive {
                req = req.header("connection", "close");
            }
            match req.send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(format!("body: {e}")),
                },
                Ok(r) => {
                    let s = r.status();
                    failures.push(format!("{s}: {}", r.text().await.unwrap_or_default()));
                }
                Err(e) => failures.push(format!("error: {e:?}")),
            }
        }
        (ok, failures)
    })
}

async fn finish(
    loops: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
    stop: &AtomicBool,
) -> (usize, Vec<String>) {
    stop.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut failures = Vec::new();
    for l in loops {
        let (o, f) = l.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    (ok, failures)
}

#[tokio::test]
async fn ten_reloads_under_load_lose_no_request() {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    let p = Proxy::start(&config(&one, &two, 1, "", "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|ka| load_loop(p.url("/app"), ka, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut v = version(&p).await;
    let mut ok_before = 0;
    for i in 0..10u32 {
        // Every step changes the weight of s2; every other pair of steps adds or removes a route.
        let weight = 1 + (i + 1) % 2;
        let extra = if (i / 2) % 2 == 0 { EXTRA_ROUTE } else { "" };
        p.write_config(&config(&one, &two, weight, extra, ""));
        let how = match i % 3 {
            0 => {
                p.sighup();
                "SIGHUP"
            }
            1 => {
                let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
                assert_eq!(st, 200, "admin reload {i}: {body}");
                let b: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(b["result"], "ok", "{body}");
                "admin API"
            }
            _ => "file change",
        };
        let new = wait_version_change(&p, &v, &format!("reload {i} by {how}")).await;
        v = new;
        // The new config is in effect.
        let extra_status = client().get(p.url("/extra")).send().await.unwrap().status();
        assert_eq!(
            extra_status,
            if extra.is_empty() { 404 } else { 200 },
            "reload {i}"
        );
        let b = p.backends().await;
        assert_eq!(
            b["backends"][0]["servers"][1]["weight"], weight,
            "reload {i}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        let ok_now = p.config_status().await["reloads_ok"].as_u64().unwrap();
        assert!(ok_now > ok_before, "reload {i} was not counted");
        ok_before = ok_now;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, failures) = finish(loops, &stop).await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 100, "only {ok} requests ran during the reloads");
    let st = p.config_status().await;
    assert_eq!(st["reloads_failed"], 0, "{st}");
    assert!(st["last_reload_error"].is_null(), "{st}");
    assert!(!p.log_text().contains("panicked"));
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_config_serving() {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    let good = config(&one, &two, 1, "", "");
    let p = Proxy::start(&good).await;
    let v0 = version(&p).await;
    let c = client();

    // 1. An unknown key (line 8: `weigth`).
    p.write_config(&good.replace("weight: 1", "weigth: 1"));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 422, "{body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["result"], "rejected", "{b}");
    assert_eq!(b["serving_version"], v0.as_str(), "{b}");
    let err = b["error"].as_str().unwrap();
    let file = p.config.display().to_string();
    assert!(
        err.starts_with(&format!("{file}:8:")),
        "error does not name file:line:col: {err}"
    );
    assert!(
        err.contains("weigth") && err.contains("did you mean `weight`"),
        "{err}"
    );
    let status = p.config_status().await;
    assert_eq!(status["version"], v0.as_str(), "{status}");
    assert!(
        status["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("weigth")),
        "{status}"
    );
    for _ in 0..5 {
        assert_eq!(c.get(p.url("/app")).send().await.unwrap().status(), 200);
    }

    // 2. A route naming a backend that does not exist (line 10), through SIGHUP this time.
    let missing = good.replace("backend: b,", "backend: nope,");
    p.write_config(&missing);
    p.sighup();
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.config_status().await["last_reload_error"]
                .as_str()
                .is_some_and(|e| e.contains("nope"))
        })
        .await,
        "{}",
        p.config_status().await
    );
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 422, "{body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    let err = b["error"].as_str().unwrap();
    assert!(err.starts_with(&format!("{file}:10:")), "{err}");
    assert!(
        err.contains("backend `nope`, which does not exist"),
        "{err}"
    );
    let status = p.config_status().await;
    assert_eq!(status["version"], v0.as_str(), "{status}");
    assert!(status["reloads_failed"].as_u64().unwrap() >= 2, "{status}");
    for _ in 0..5 {
        let r = c.get(p.url("/app")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let (_, metrics) = p.admin(Method::GET, "/metrics", None).await;
    let errors: f64 = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_config_reloads_total{result=\"error\"}"))
        .unwrap_or_else(|| panic!("no reload error counter:\n{metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors >= 2.0, "{metrics}");
    assert!(
        p.log_text().contains("config reload rejected"),
        "{}",
        p.log_text()
    );

    // 3. A listener that cannot bind is rejected too, and changes nothing.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    p.write_config(&config(
        &one,
        &two,
        2,
        "",
        &format!("  - {{ name: web2, bind: \"127.0.0.1:{taken}\" }}"),
    ));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("web2"), "{body}");
    assert_eq!(p.backends().await["backends"][0]["servers"][1]["weight"], 1);
    assert_eq!(c.get(p.url("/app")).send().await.unwrap().status(), 200);

    // 4. An `events:` that a start would refuse (a webhook URL with a bad port) is refused
    // by a reload too, located at `events`, and without the URL's secret: else the process
    // would serve on and fail at its next restart.
    p.write_config(&format!(
        "{good}events:\n  sinks:\n    - name: hooks\n      webhook: {{ url: \"http://svc:S3CRET@hooks.example.com:99999/x\" }}\n"
    ));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("events") && body.contains(&file), "{body}");
    assert!(!body.contains("S3CRET"), "{body}");
    assert_eq!(p.config_status().await["version"], v0.as_str());

    // 5. Fixing the file clears the error.
    p.write_config(&config(&one, &two, 2, "", ""));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 200, "{body}");
    let status = p.config_status().await;
    assert_ne!(status["version"], v0.as_str(), "{status}");
    assert!(status["last_reload_error"].is_null(), "{status}");
    assert_eq!(p.backends().await["backends"][0]["servers"][1]["weight"], 2);
}

#[tokio::test]
async fn editing_the_file_alone_reloads_it() {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    let p = Proxy::start(&config(&one, &two, 1, "", "")).await;
    let v0 = version(&p).await;
    let c = client();
    assert_eq!(c.get(p.url("/extra")).send().await.unwrap().status(), 404);

    p.write_config(&config(&one, &two, 1, EXTRA_ROUTE, ""));
    let served = eventually(Duration::from_secs(5), || async {
        client().get(p.url("/extra")).send().await.unwrap().status() == 200
    })
    .await;
    assert!(
        served,
        "the edited file was not picked up within 5s:\n{}",
        p.log_text()
    );
    // The new snapshot serves a moment before the admin status reports its version.
    wait_version_change(&p, &v0, "the edited file").await;
    assert!(p.log_text().contains("file change"), "{}", p.log_text());

    // A burst of writes (an editor saving several times) settles into few reloads.
    let before = p.config_status().await["reloads_ok"].as_u64().unwrap();
    for w in [2, 3, 4, 5, 6] {
        p.write_config(&config(&one, &two, w, EXTRA_ROUTE, ""));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = eventually(Duration::from_secs(5), || async {
        p.backends().await["backends"][0]["servers"][1]["weight"] == 6
    })
    .await;
    assert!(settled, "{}", p.backends().await);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = p.config_status().await["reloads_ok"].as_u64().unwrap();
    assert!(
        after - before <= 2,
        "5 quick writes caused {} reloads",
        after - before
    );

    // Touching the file without changing it is not a new version.
    let v = version(&p).await;
    p.write_config(&config(&one, &two, 6, EXTRA_ROUTE, ""));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(version(&p).await, v);
    assert_eq!(
        p.config_status().await["reloads_ok"].as_u64().unwrap(),
        after
    );
}

#[tokio::test]
async fn runtime_state_survives_a_reload() {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    // s3 fails its health checks.
    let three = Origin::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("three")));
        if req.uri().path() == "/healthz" {
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        }
        r
    })
    .await;
    let (a1, a2, a3) = (one.address(), two.address(), three.address());
    let yaml = |extra: &str| {
        format!(
            "\
listeners:
  - {{ name: web, bind: \"127.0.0.1:{{port}}\" }}
backends:
  - name: b
    health_check: {{ http: {{ path: /healthz, expect: 200 }}, interval: 200ms, rise: 1, fall: 1, timeout: 1s }}
    servers:
      - {{ name: s1, address: \"{a1}\" }}
      - {{ name: s2, address: \"{a2}\" }}
      - {{ name: s3, address: \"{a3}\" }}
routes:
  - {{ name: r, match: {{ path_prefix: /app }}, backend: b, public: true }}
{extra}
"
        )
    };
    let p = Proxy::start(&yaml("")).await;

    let down = eventually(Duration::from_secs(5), || async {
        let b = p.backends().await;
        b["backends"][0]["servers"][2]["health"] == "down"
    })
    .await;
    assert!(
        down,
        "s3 never failed its health check: {}",
        p.backends().await
    );

    let (st, body) = p
        .admin(
            Method::POST,
            "/api/v1/backends/b/servers/s2/state",
            Some(json!({ "state": "drain" })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = p
        .admin(
            Method::PUT,
            "/api/v1/backends/b/servers/s1/weight",
            Some(json!({ "weight": 5 })),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    // An unrelated change: a new route.
    let v0 = version(&p).await;
    p.write_config(&yaml(EXTRA_ROUTE));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 200, "{body}");
    assert_ne!(version(&p).await, v0);
    assert_eq!(
        client().get(p.url("/extra")).send().await.unwrap().status(),
        200
    );

    let b = p.backends().await;
    let servers = &b["backends"][0]["servers"];
    assert_eq!(servers[1]["state"], "drain", "{b}");
    assert_eq!(servers[0]["weight"], 5, "{b}");
    assert_eq!(servers[2]["health"], "down", "{b}");
    assert_eq!(servers[0]["state"], "ready", "{b}");

    // Only s1 gets traffic: s2 drains, s3 is down.
    let c = client();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        let r = c.get(p.url("/app")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *seen.entry(r.text().await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(seen.get("one"), Some(&20), "{seen:?}");

    // And again through SIGHUP, removing the route.
    let v1 = version(&p).await;
    p.write_config(&yaml(""));
    p.sighup();
    wait_version_change(&p, &v1, "SIGHUP").await;
    let b = p.backends().await;
    assert_eq!(b["backends"][0]["servers"][1]["state"], "drain", "{b}");
    assert_eq!(b["backends"][0]["servers"][0]["weight"], 5, "{b}");
}

#[tokio::test]
async fn listeners_come_and_go_without_disturbing_the_others() {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    let p = Proxy::start(&config(&one, &two, 1, "", "")).await;
    let port2 = free_port();
    let second = format!("  - {{ name: web2, bind: \"127.0.0.1:{port2}\" }}");
    let url2 = format!("http://127.0.0.1:{port2}/app");

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = [true, false]
        .into_iter()
        .map(|ka| load_loop(p.url("/app"), ka, stop.clone()))
        .collect();
    // A keep-alive connection to the first listener, opened before any reload, stays usable.
    let held = reqwest::Client::new();
    assert_eq!(held.get(p.url("/app")).send().await.unwrap().status(), 200);

    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port2))
        .await
        .is_err());
    let v0 = version(&p).await;
    p.write_config(&config(&one, &two, 1, "", &second));
    p.sighup();
    wait_version_change(&p, &v0, "adding web2").await;
    let served = Arc::new(AtomicUsize::new(0));
    let ok = eventually(Duration::from_secs(5), || {
        let url2 = url2.clone();
        let served = served.clone();
        async move {
            match client().get(&url2).send().await {
                Ok(r) if r.status() == 200 => {
                    served.fetch_add(1, Ordering::Relaxed);
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    assert!(ok, "the added listener does not serve:\n{}", p.log_text());
    for _ in 0..10 {
        assert_eq!(client().get(&url2).send().await.unwrap().status(), 200);
    }
    // A route can be limited to one listener.
    let only2 =
        "  - { name: only2, match: { path_prefix: /only2 }, listeners: [web2], backend: b, public: true }";
    let v1 = version(&p).await;
    p.write_config(&config(&one, &two, 1, only2, &second));
    p.sighup();
    wait_version_change(&p, &v1, "route on web2").await;
    assert_eq!(
        client()
            .get(format!("http://127.0.0.1:{port2}/only2"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client().get(p.url("/only2")).send().await.unwrap().status(),
        404
    );

    // Remove it again.
    let v2 = version(&p).await;
    p.write_config(&config(&one, &two, 1, "", ""));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 200, "{body}");
    assert_ne!(version(&p).await, v2);
    let closed = eventually(Duration::from_secs(5), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port2))
            .await
            .is_err()
    })
    .await;
    assert!(closed, "the removed listener still accepts connections");

    assert_eq!(held.get(p.url("/app")).send().await.unwrap().status(), 200);
    let (ok, failures) = finish(loops, &stop).await;
    assert!(
        failures.is_empty(),
        "the first listener was interrupted: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 20, "only {ok} requests on the first listener");
}
