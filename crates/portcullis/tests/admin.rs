//! The admin listener as an operator uses it: bearer-token authentication, server states with
//! HAProxy's meanings (`ready`, `drain`, `maint`), runtime weights, Prometheus metrics, the
//! admin action log, and the JSON access log.
mod common;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// Two origins (`one`, `two`) behind backend `b`, route `r` on `/app`.
async fn two_servers(extra_backend: &str) -> (Origin, Origin, Proxy) {
    let one = Origin::named("one").await;
    let two = Origin::named("two").await;
    let yaml = "\
listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]
backends:
  - name: b
    EXTRA
    servers:
      - { name: s1, address: \"ONE\" }
      - { name: s2, address: \"TWO\" }
routes:
  - { name: r, match: { path_prefix: /app }, backend: b, public: true }
"
    .replace("EXTRA", extra_backend)
    .replace("ONE", &one.address())
    .replace("TWO", &two.address());
    let p = Proxy::start(&yaml).await;
    (one, two, p)
}

/// Sends `n` requests on fresh connections and counts the bodies.
async fn spread(p: &Proxy, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut out = HashMap::new();
    for _ in 0..n {
        let r = c.get(p.url("/app")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *out.entry(r.text().await.unwrap()).or_insert(0) += 1;
    }
    out
}

async fn set_state(p: &Proxy, backend: &str, server: &str, state: &str) -> (u16, String) {
    p.admin(
        Method::POST,
        &format!("/api/v1/backends/{backend}/servers/{server}/state"),
        Some(json!({ "state": state })),
    )
    .await
}

fn server<'a>(backends: &'a Value, backend: &str, server: &str) -> &'a Value {
    backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == backend)
        .unwrap_or_else(|| panic!("no backend {backend} in {backends}"))["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == server)
        .unwrap_or_else(|| panic!("no server {server} in {backends}"))
}

#[tokio::test]
async fn api_needs_a_valid_bearer_token_but_health_does_not() {
    let (_one, _two, p) = two_servers("").await;
    let c = reqwest::Client::new();

    let r = c.get(p.admin_url("/api/v1/backends")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r
        .headers()
        .get("www-authenticate")
        .expect("WWW-Authenticate on 401");
    assert!(
        challenge.to_str().unwrap().starts_with("Bearer"),
        "{challenge:?}"
    );

    let r = c
        .get(p.admin_url("/api/v1/backends"))
        .bearer_auth("not-the-right-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));

    // A prefix of the right token is still wrong.
    let r = c
        .get(p.admin_url("/api/v1/backends"))
        .bearer_auth(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Not a bearer token.
    let r = c
        .get(p.admin_url("/metrics"))
        .basic_auth("admin", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = c
        .get(p.admin_url("/api/v1/backends"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["backends"][0]["name"], "default/b");
    // The scheme in any case, as RFC 9110 has it.
    for scheme in ["bearer", "BEARER"] {
        let r = c
            .get(p.admin_url("/api/v1/backends"))
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }

    for path in ["/metrics", "/api/v1/config", "/api/v1/reload"] {
        let m = if path == "/api/v1/reload" {
            Method::POST
        } else {
            Method::GET
        };
        let r = c.request(m, p.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
    }

    for path in ["/healthz", "/readyz"] {
        let r = c.get(p.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn with_no_tokens_the_api_is_disabled_but_health_answers() {
    let o = Origin::named("x").await;
    let yaml = "\
listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]
admin:
  bind: \"127.0.0.1:{admin_port}\"
  tokens: []
backends:
  - { name: b, servers: [{ address: \"ADDR\" }] }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"
    .replace("ADDR", &o.address());
    let p = Proxy::start(&yaml).await;
    let c = reqwest::Client::new();
    for path in ["/api/v1/backends", "/api/v1/config", "/metrics"] {
        let r = c
            .get(p.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let r = c.get(p.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 403, "{path} without a token");
    }
    let r = c.post(p.admin_url("/api/v1/reload")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    for path in ["/healthz", "/readyz"] {
        let r = c.get(p.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // The data plane is unaffected.
    assert_eq!(client().get(p.url("/")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn maint_and_drain_take_a_server_out_and_ready_brings_it_back() {
    // Cookie stickiness shows the difference between the two: a drained server still serves
    // requests stuck to it, a server in maintenance serves nothing.
    let (one, two, p) = two_servers("sticky: { cookie: srv }").await;

    let s = spread(&p, 10).await;
    assert_eq!((s.get("one"), s.get("two")), (Some(&5), Some(&5)), "{s:?}");

    // The cookie that sticks a client to s2.
    let c = client();
    let sticky_two = loop {
        let r = c.get(p.url("/app")).send().await.unwrap();
        let cookie = r
            .headers()
            .get("set-cookie")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if r.text().await.unwrap() == "two" {
            break cookie.split(';').next().unwrap().to_string();
        }
    };
    let stuck = |c: reqwest::Client, cookie: String, url: String| async move {
        let r = c.get(url).header("cookie", cookie).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(
        stuck(c.clone(), sticky_two.clone(), p.url("/app")).await,
        (200, "two".to_string())
    );

    // maint: no traffic at all, not even sticky.
    let (st, body) = set_state(&p, "b", "s2", "maint").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        server(&p.backends().await, "default/b", "s2")["state"],
        "maint"
    );
    let before = two.hits();
    let s = spread(&p, 10).await;
    assert_eq!(s.get("one"), Some(&10), "{s:?}");
    assert_eq!(
        stuck(c.clone(), sticky_two.clone(), p.url("/app")).await,
        (200, "one".to_string())
    );
    assert_eq!(two.hits(), before, "a server in maint got traffic");

    // ready: back in rotation.
    let (st, _) = set_state(&p, "b", "s2", "ready").await;
    assert_eq!(st, 200);
    let s = spread(&p, 10).await;
    assert_eq!((s.get("one"), s.get("two")), (Some(&5), Some(&5)), "{s:?}");

    // drain: no new traffic, but sticky clients still reach it.
    let (st, _) = set_state(&p, "default%2Fb", "s2", "drain").await;
    assert_eq!(st, 200);
    assert_eq!(
        server(&p.backends().await, "default/b", "s2")["state"],
        "drain"
    );
    let before_one = one.hits();
    let s = spread(&p, 10).await;
    assert_eq!(s.get("one"), Some(&10), "{s:?}");
    assert_eq!(one.hits(), before_one + 10);
    assert_eq!(
        stuck(c.clone(), sticky_two.clone(), p.url("/app")).await,
        (200, "two".to_string())
    );

    let (st, _) = set_state(&p, "b", "s2", "ready").await;
    assert_eq!(st, 200);
    assert_eq!(
        server(&p.backends().await, "default/b", "s2")["state"],
        "ready"
    );
    let s = spread(&p, 10).await;
    assert_eq!((s.get("one"), s.get("two")), (Some(&5), Some(&5)), "{s:?}");

    // Bad requests.
    let (st, body) = set_state(&p, "b", "s2", "sleeping").await;
    assert_eq!(st, 400, "{body}");
    let (st, _) = p
        .admin(
            Method::POST,
            "/api/v1/backends/b/servers/s2/state",
            Some(json!({ "stat": "maint" })),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = p
        .admin(Method::POST, "/api/v1/backends/b/servers/s2/state", None)
        .await;
    assert_eq!(st, 400);
    let (st, body) = set_state(&p, "nope", "s2", "maint").await;
    assert_eq!(st, 404, "{body}");
    let (st, body) = set_state(&p, "other%2Fb", "s2", "maint").await;
    assert_eq!(st, 404, "{body}");
    let (st, body) = set_state(&p, "b", "s9", "maint").await;
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("s9"), "{body}");
    // None of that changed anything.
    assert_eq!(
        server(&p.backends().await, "default/b", "s2")["state"],
        "ready"
    );
}

#[tokio::test]
async fn weight_changes_the_distribution() {
    let (_one, _two, p) = two_servers("").await;
    let weight = |backend: &'static str, server: &'static str, w: Value| {
        let p = &p;
        async move {
            p.admin(
                Method::PUT,
                &format!("/api/v1/backends/{backend}/servers/{server}/weight"),
                Some(json!({ "weight": w })),
            )
            .await
        }
    };
    let (st, body) = weight("b", "s1", json!(3)).await;
    assert_eq!(st, 200, "{body}");
    let s1 = server(&p.backends().await, "default/b", "s1").clone();
    assert_eq!(s1["weight"], 3, "{s1}");
    assert_eq!(s1["config_weight"], 1, "{s1}");

    let s = spread(&p, 40).await;
    assert_eq!(
        (s.get("one"), s.get("two")),
        (Some(&30), Some(&10)),
        "{s:?}"
    );

    // By full id too.
    let (st, body) = weight("default%2Fb", "s2", json!(3)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(server(&p.backends().await, "default/b", "s2")["weight"], 3);
    let s = spread(&p, 40).await;
    assert_eq!(
        (s.get("one"), s.get("two")),
        (Some(&20), Some(&20)),
        "{s:?}"
    );

    for bad in [json!(0), json!(1001), json!(-1), json!("heavy")] {
        let (st, body) = weight("b", "s1", bad.clone()).await;
        assert_eq!(st, 400, "{bad}: {body}");
    }
    let (st, _) = weight("nope", "s1", json!(2)).await;
    assert_eq!(st, 404);
    let (st, _) = weight("b", "nope", json!(2)).await;
    assert_eq!(st, 404);
    assert_eq!(server(&p.backends().await, "default/b", "s1")["weight"], 3);
}

#[tokio::test]
async fn metrics_cover_requests_latency_servers_and_connections() {
    let (_one, _two, p) = two_servers("").await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(c.get(p.url("/app")).send().await.unwrap().status(), 200);
    }
    assert_eq!(c.get(p.url("/nowhere")).send().await.unwrap().status(), 404);
    // Keep one client connection open while scraping.
    let held = kept_alive(p.port, "/app").await;

    let r = reqwest::Client::new()
        .get(p.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (st, m) = p.admin(Method::GET, "/metrics", None).await;
    assert_eq!(st, 200);
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("portcullis_requests_total{route=\"default/r\",backend=\"default/b\",code=\"2xx\"}"),
        5.0
    );
    assert!(
        m.contains("# TYPE portcullis_request_duration_seconds histogram"),
        "{m}"
    );
    assert_eq!(
        value("portcullis_request_duration_seconds_count{route=\"default/r\"}"),
        5.0
    );
    assert!(
        m.contains("portcullis_request_duration_seconds_bucket{le="),
        "{m}"
    );
    assert_eq!(
        value("portcullis_server_up{backend=\"default/b\",server=\"s1\"}"),
        1.0
    );
    assert_eq!(
        value("portcullis_server_up{backend=\"default/b\",server=\"s2\"}"),
        1.0
    );
    assert!(
        value("portcullis_active_connections{listener=\"web\"}") >= 1.0,
        "{m}"
    );
    assert!(
        m.contains("# TYPE portcullis_upstream_connect_duration_seconds histogram"),
        "{m}"
    );
    assert!(
        value("portcullis_upstream_connect_duration_seconds_count{backend=\"default/b\"}") >= 1.0
    );
    assert!(m.contains("# EOF"), "{m}");

    // A server in maintenance is reported down.
    let (st, _) = set_state(&p, "b", "s2", "maint").await;
    assert_eq!(st, 200);
    let (_, m) = p.admin(Method::GET, "/metrics", None).await;
    assert!(
        m.contains("portcullis_server_up{backend=\"default/b\",server=\"s2\"} 0"),
        "{m}"
    );
    drop(held);
}

#[tokio::test]
async fn admin_actions_are_logged_with_the_actor_and_never_the_token() {
    let (_one, _two, p) = two_servers("").await;
    assert_eq!(set_state(&p, "b", "s2", "drain").await.0, 200);
    let (st, _) = p
        .admin(
            Method::PUT,
            "/api/v1/backends/b/servers/s1/weight",
            Some(json!({ "weight": 7 })),
        )
        .await;
    assert_eq!(st, 200);
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 200, "{body}");
    // A refused call with a wrong token must not log that token either.
    let wrong = "wrong-token-that-must-not-be-logged";
    let r = reqwest::Client::new()
        .post(p.admin_url("/api/v1/reload"))
        .bearer_auth(wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let want = [
        "server state changed",
        "server weight changed",
        "reload requested",
    ];
    let found = eventually(Duration::from_secs(5), || {
        let log = p.log_text();
        async move { want.iter().all(|w| log.contains(w)) && log.contains("invalid token") }
    })
    .await;
    let log = p.log_text();
    assert!(found, "admin actions missing from the log:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for w in want {
        let line = lines
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.contains(w)))
            .unwrap_or_else(|| panic!("no JSON line for `{w}` in\n{log}"));
        let actor = line["actor"]
            .as_str()
            .unwrap_or_else(|| panic!("no actor in {line}"));
        assert!(actor.starts_with("admin-token[0]@127.0.0.1:"), "{line}");
    }
    let state = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("server state changed"))
        })
        .unwrap();
    assert_eq!(state["server"], "s2", "{state}");
    assert_eq!(state["backend"], "default/b", "{state}");
    assert!(
        !log.contains(ADMIN_TOKEN),
        "the admin token leaked into the log"
    );
    assert!(
        !log.contains(wrong),
        "a presented token leaked into the log"
    );
}

#[tokio::test]
async fn access_log_has_every_field() {
    let o = Origin::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(format!(
            "got {} bytes",
            body.len()
        ))))
    })
    .await;
    let yaml = "\
listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]
backends:
  - { name: b, servers: [{ name: s1, address: \"ADDR\" }] }
routes:
  - { name: r, match: { path_prefix: /app }, backend: b, public: true }
"
    .replace("ADDR", &o.address());
    let p = Proxy::start(&yaml).await;
    let r = client()
        .post(p.url("/app/upload?x=1"))
        .header("host", "Files.Example.com:8080")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.text().await.unwrap(), "got 5 bytes");
    assert_eq!(
        client()
            .get(p.url("/nowhere"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    assert!(
        eventually(Duration::from_secs(5), || {
            let t = p.access_log_text();
            async move { t.lines().count() >= 2 }
        })
        .await,
        "access log: {}",
        p.access_log_text()
    );
    let text = p.access_log_text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rec = lines
        .iter()
        .find(|l| l["request_id"] == rid.as_str())
        .unwrap_or_else(|| panic!("no line for {rid}:\n{text}"));
    assert_eq!(rec["client"], "127.0.0.1", "{rec}");
    assert_eq!(rec["method"], "POST", "{rec}");
    assert_eq!(rec["host"], "files.example.com", "{rec}");
    assert_eq!(rec["path"], "/app/upload", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["route"], "default/r", "{rec}");
    assert_eq!(rec["backend"], "default/b", "{rec}");
    assert_eq!(rec["server"], "s1", "{rec}");
    assert_eq!(rec["attempts"], 1, "{rec}");
    assert_eq!(rec["bytes_in"], 5, "{rec}");
    assert_eq!(rec["bytes_out"], "got 5 bytes".len(), "{rec}");
    assert_eq!(rec["listener"], "web", "{rec}");
    for f in ["total_ms", "connect_ms", "first_byte_ms"] {
        let v = rec[f]
            .as_f64()
            .unwrap_or_else(|| panic!("{f} missing: {rec}"));
        assert!((0.0..10_000.0).contains(&v), "{f}: {rec}");
    }
    assert!(
        rec["total_ms"].as_f64().unwrap() >= rec["first_byte_ms"].as_f64().unwrap(),
        "{rec}"
    );
    assert!(rec["time"].as_str().is_some_and(|t| !t.is_empty()), "{rec}");

    let miss = lines
        .iter()
        .find(|l| l["path"] == "/nowhere")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(miss["status"], 404, "{miss}");
    assert_eq!(miss["route"], "", "{miss}");
    assert!(
        miss["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{miss}"
    );
}

/// A route is switched to another backend and restored through the admin API (the control
/// commands triggers use), and a switch to a backend that does not exist changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_is_switched_and_restored_through_the_admin_api() {
    let a = Origin::named("a").await;
    let b = Origin::named("b").await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - {{ name: main, servers: [{{ name: s, address: \"{}\" }}] }}\n  - {{ name: standby, servers: [{{ name: s, address: \"{}\" }}] }}\nroutes: [{{ name: app, match: {{ path_prefix: / }}, backend: main, public: true }}]\n",
        a.address(),
        b.address()
    ))
    .await;
    let get = || async {
        reqwest::get(p.url("/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(get().await, "a");
    let (s, body) = p
        .admin(
            reqwest::Method::POST,
            "/api/v1/routes/app/switch",
            Some(serde_json::json!({ "backend": "standby" })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(get().await, "b");
    let (s, body) = p
        .admin(
            reqwest::Method::POST,
            "/api/v1/routes/app/switch",
            Some(serde_json::json!({ "backend": "nope" })),
        )
        .await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(get().await, "b");
    let (s, body) = p
        .admin(reqwest::Method::POST, "/api/v1/routes/app/restore", None)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(get().await, "a");
    let (s, _) = p
        .admin(
            reqwest::Method::POST,
            "/api/v1/routes/app/switch",
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(s, 400);
}

/// The admin listener answers anyone who reaches it, so a client that is no caller may hold
/// little there: a request head not finished within 10 s closes its connection (the data
/// plane's listeners have `timeouts.client_header`), and past 256 open connections new ones
/// are closed as they come, so that idle connections cannot take the process's descriptors
/// from the data plane. Each is served again once the others go.
#[tokio::test]
async fn the_admin_listener_bounds_slow_heads_and_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_one, _two, p) = two_servers("").await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", p.admin_port));
    let healthz = || async {
        let mut s = connect().await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(healthz().await.starts_with("HTTP/1.1 200"));

    // A head that never ends; a connection that never sends a byte; an HTTP/2 one with its
    // preface and settings and no stream.
    let started = std::time::Instant::now();
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = connect().await.unwrap();
    let mut h2 = connect().await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // HTTP/2 is not served here: closed at once.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), h2.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "an HTTP/2 connection was kept open");

    // Idle connections up to the bound, then one more: that one is closed at once.
    let mut idle = Vec::new();
    for _ in 0..254 {
        idle.push(connect().await.unwrap());
    }
    let mut over = connect().await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), over.read(&mut buf))
        .await
        .expect("a connection over the bound was left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "a connection over the bound was answered");
    // The data plane is not touched, and the admin listener serves again once they go.
    let data_plane = client()
        .get(format!("http://127.0.0.1:{}/", p.port))
        .send()
        .await;
    assert!(data_plane.is_ok(), "{data_plane:?}");
    drop(idle);
    let mut answered = String::new();
    for _ in 0..50 {
        answered = healthz().await;
        if answered.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered:?}");

    // The slow head's connection is closed after the header timeout (10 s).
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "a half-sent head kept its connection open");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(16),
        "closed after {took:?}"
    );
    // So is the one that never sent a byte, by then.
    let r = tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "a connection that sent nothing was kept open");
}

/// The API's bodies are JSON sent as JSON: a form's or a text body (what a page on another
/// site can send without asking) gets 400 on every endpoint that takes a body, before
/// anything reads it; the same body as `application/json` is taken.
#[tokio::test]
async fn bodies_of_other_types_than_json_get_400() {
    let (_one, _two, p) = two_servers("").await;
    let c = reqwest::Client::new();
    let body = r#"{"state":"drain"}"#;
    for (path, ct) in [
        ("/api/v1/backends/b/servers/s1/state", "text/plain"),
        (
            "/api/v1/backends/b/servers/s1/state",
            "application/x-www-form-urlencoded",
        ),
        ("/api/v1/sessions/revoke", "text/plain"),
        ("/api/v1/sessions/revoke", "multipart/form-data; boundary=x"),
    ] {
        let r = c
            .post(p.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} as {ct}");
    }
    let r = c
        .post(p.admin_url("/api/v1/sessions/revoke"))
        .bearer_auth(ADMIN_TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no Content-Type");
    let r = c
        .post(p.admin_url("/api/v1/backends/b/servers/s1/state"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // A body too large is 413, as on every endpoint: answered from its length, before it
    // is sent (a client still writing it would see the connection close).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.admin_port))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/backends/b/servers/s1/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"state\": ",
        5 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .expect("an answer before the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}
