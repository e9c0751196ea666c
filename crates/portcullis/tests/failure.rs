//! Failure handling end to end: active health checks (rise/fall, TCP, status ranges), passive
//! ejection and its cap, retries (connect failures, status codes, idempotency, budgets),
//! timeouts, no-server-available answers and the max-connections queue.
mod common;
use common::*;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A config with one backend `b` (extra backend keys in `extra`) and one route `r` (extra
/// route keys in `route_extra`, written inside the flow mapping). `servers` are (name, address).
fn config(extra: &str, route_extra: &str, servers: &[(&str, String)]) -> String {
    let mut s = String::from(
        "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\nbackends:\n  - name: b\n",
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {line}\n"));
    }
    s.push_str("    servers:\n");
    for (n, a) in servers {
        s.push_str(&format!("      - {{ name: {n}, address: \"{a}\" }}\n"));
    }
    let sep = if route_extra.is_empty() { "" } else { ", " };
    s.push_str(&format!(
        "routes:\n  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true{sep}{route_extra} }}\n"
    ));
    s
}

/// An origin answering `/healthz` with the current value of `status` and anything else
/// with 200 and `name`. Also counts health-check requests.
async fn switchable(
    name: &'static str,
    status: Arc<AtomicU16>,
    checks: Arc<AtomicUsize>,
) -> Origin {
    Origin::start(move |req| {
        let status = status.clone();
        let checks = checks.clone();
        async move {
            if req.uri().path() == "/healthz" {
                // Read the status before counting, so a check counted after a test reads the
                // count always sees the status the test set before reading it.
                let code = status.load(Ordering::SeqCst);
                checks.fetch_add(1, Ordering::SeqCst);
                let mut r = Response::new(Full::new(Bytes::from("health")));
                *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                r
            } else {
                Response::new(Full::new(Bytes::from(name)))
            }
        }
    })
    .await
}

/// An origin that waits `ms` before answering 200 with `name`.
async fn slow(name: &'static str, ms: u64) -> Origin {
    Origin::start(move |_req| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::new(Full::new(Bytes::from(name)))
    })
    .await
}

/// The admin API's view of one server of backend `b`.
async fn server(p: &Proxy, name: &str) -> serde_json::Value {
    let v = p.backends().await;
    let b = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "default/b")
        .unwrap_or_else(|| panic!("no backend default/b in {v}"))
        .clone();
    b["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no server {name} in {b}"))
        .clone()
}

async fn health(p: &Proxy, name: &str) -> String {
    server(p, name).await["health"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn ejected_count(p: &Proxy) -> usize {
    let v = p.backends().await;
    v["backends"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ejected"] == true)
        .count()
}

/// Waits until server `name`'s health is `want`, or fails with the log.
async fn wait_health(p: &Proxy, name: &str, want: &str, within: Duration) {
    let ok = eventually(within, || async { health(p, name).await == want }).await;
    assert!(
        ok,
        "server {name} did not become {want}; log:\n{}",
        p.log_text()
    );
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.text().await.unwrap())
}

async fn post(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.post(url).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.text().await.unwrap())
}

const FAST_CHECK: &str = "interval: 100ms, timeout: 100ms, rise: 2, fall: 2";

#[tokio::test]
async fn http_health_check_takes_a_server_down_after_fall_and_back_after_rise() {
    let status = Arc::new(AtomicU16::new(200));
    let checks = Arc::new(AtomicUsize::new(0));
    let flaky = switchable("flaky", status.clone(), checks.clone()).await;
    let steady = Origin::named("steady").await;
    let p = Proxy::start(&config(
        &format!("health_check: {{ http: {{ path: /healthz, expect: 200 }}, {FAST_CHECK} }}\nretries: {{ attempts: 0 }}"),
        "",
        &[("flaky", flaky.address()), ("steady", steady.address())],
    ))
    .await;
    let c = client();

    // Healthy: checks run and traffic reaches both servers.
    assert!(
        eventually(Duration::from_secs(3), || async {
            checks.load(Ordering::SeqCst) >= 3
        })
        .await
    );
    assert_eq!(health(&p, "flaky").await, "up");
    let mut seen_flaky = false;
    for _ in 0..6 {
        let (s, b) = get(&c, &p.url("/")).await;
        assert_eq!(s, 200);
        seen_flaky |= b == "flaky";
    }
    assert!(seen_flaky);

    // Failing checks: one failure is not enough for fall: 2 (hysteresis)...
    let before = checks.load(Ordering::SeqCst);
    status.store(500, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(2), || async {
            checks.load(Ordering::SeqCst) > before
        })
        .await
    );
    let h = health(&p, "flaky").await;
    // Only conclusive if no second check has even started meanwhile.
    if checks.load(Ordering::SeqCst) == before + 1 {
        assert_eq!(h, "up", "went down after a single failing check");
    }
    // ...then down after `fall`, and no more traffic.
    wait_health(&p, "flaky", "down", Duration::from_secs(3)).await;
    let s = server(&p, "flaky").await;
    assert_eq!(s["available"], false, "{s}");
    for _ in 0..20 {
        assert_eq!(
            get(&c, &p.url("/")).await,
            (200, "steady".to_string()),
            "a down server got traffic"
        );
    }

    // One good check is not enough for rise: 2 either.
    let before = checks.load(Ordering::SeqCst);
    status.store(200, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(2), || async {
            checks.load(Ordering::SeqCst) > before
        })
        .await
    );
    let h = health(&p, "flaky").await;
    if checks.load(Ordering::SeqCst) == before + 1 {
        assert_eq!(h, "down", "came up after a single passing check");
    }
    wait_health(&p, "flaky", "up", Duration::from_secs(3)).await;
    let mut seen_flaky = false;
    for _ in 0..6 {
        let (s, b) = get(&c, &p.url("/")).await;
        assert_eq!(s, 200);
        seen_flaky |= b == "flaky";
    }
    assert!(seen_flaky, "a server that came back up gets traffic again");
}

#[tokio::test]
async fn tcp_health_check_marks_a_dead_address_down() {
    let live = Origin::named("live").await;
    let dead = dead_address();
    let p = Proxy::start(&config(
        &format!("health_check: {{ tcp: true, {FAST_CHECK} }}\nretries: {{ attempts: 0 }}"),
        "",
        &[("live", live.address()), ("dead", dead)],
    ))
    .await;
    wait_health(&p, "dead", "down", Duration::from_secs(3)).await;
    assert_eq!(health(&p, "live").await, "up");
    // Without retries, every request succeeding shows the dead server is not picked.
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &p.url("/")).await, (200, "live".to_string()));
    }
}

#[tokio::test]
async fn http_health_check_expect_range() {
    let status = Arc::new(AtomicU16::new(204));
    let checks = Arc::new(AtomicUsize::new(0));
    let o = switchable("o", status.clone(), checks.clone()).await;
    let other = Origin::named("other").await;
    let p = Proxy::start(&config(
        &format!(
            "health_check: {{ http: {{ path: /healthz, expect: \"200-299\" }}, {FAST_CHECK} }}"
        ),
        "",
        &[("o", o.address()), ("other", other.address())],
    ))
    .await;
    // 204 is in range: several checks later, still up.
    assert!(
        eventually(Duration::from_secs(3), || async {
            checks.load(Ordering::SeqCst) >= 4
        })
        .await
    );
    assert_eq!(health(&p, "o").await, "up");
    // 302 is outside 200-299 (though inside the default 200-399): down.
    status.store(302, Ordering::SeqCst);
    wait_health(&p, "o", "down", Duration::from_secs(3)).await;
    // 299 is the inclusive upper bound: up again.
    status.store(299, Ordering::SeqCst);
    wait_health(&p, "o", "up", Duration::from_secs(3)).await;
    // 300 is just past the upper bound.
    status.store(300, Ordering::SeqCst);
    wait_health(&p, "o", "down", Duration::from_secs(3)).await;
}

#[tokio::test]
async fn passive_ejection_is_capped_by_max_ejected_percent_and_expires() {
    let good = Origin::named("good").await;
    let (b1, b2, b3) = (
        Origin::status(500).await,
        Origin::status(500).await,
        Origin::status(500).await,
    );
    let p = Proxy::start(&config(
        "outlier: { consecutive_5xx: 2, eject_for: 1s, max_ejected_percent: 50 }\nretries: { attempts: 0 }",
        "",
        &[
            ("good", good.address()),
            ("bad1", b1.address()),
            ("bad2", b2.address()),
            ("bad3", b3.address()),
        ],
    ))
    .await;
    let c = client();
    let mut max_ejected = 0;
    for _ in 0..30 {
        let (s, _) = get(&c, &p.url("/")).await;
        assert!(s == 200 || s == 500, "{s}");
        let n = ejected_count(&p).await;
        max_ejected = max_ejected.max(n);
        assert!(n <= 2, "at most 50% of 4 servers may be ejected, saw {n}");
    }
    assert_eq!(
        max_ejected, 2,
        "two of the three failing servers should have been ejected"
    );
    let v = p.backends().await;
    assert_eq!(
        v["backends"][0]["servers"][0]["ejected"], false,
        "the healthy server is never ejected: {v}"
    );

    // With no traffic, ejections expire after eject_for (1s for a first ejection).
    let hits_before = b1.hits() + b2.hits() + b3.hits();
    assert!(
        eventually(Duration::from_secs(4), || async {
            ejected_count(&p).await == 0
        })
        .await,
        "ejected servers should come back after eject_for: {}",
        p.backends().await
    );
    // Back in rotation: every failing server gets requests again.
    for _ in 0..8 {
        get(&c, &p.url("/")).await;
    }
    assert!(b1.hits() + b2.hits() + b3.hits() > hits_before);
}

#[tokio::test]
async fn a_lone_failing_server_can_still_be_ejected() {
    let bad = Origin::status(500).await;
    let p = Proxy::start(&config(
        "outlier: { consecutive_5xx: 2, eject_for: 1s, max_ejected_percent: 50 }\nretries: { attempts: 0 }",
        "",
        &[("only", bad.address())],
    ))
    .await;
    let c = client();
    assert_eq!(get(&c, &p.url("/")).await.0, 500);
    assert_eq!(
        server(&p, "only").await["ejected"],
        false,
        "one failure is below the threshold"
    );
    assert_eq!(get(&c, &p.url("/")).await.0, 500);
    let s = server(&p, "only").await;
    assert_eq!(
        s["ejected"], true,
        "50% of one server rounds up to one: {s}"
    );
    assert_eq!(s["ejections"], 1, "{s}");
    // Ejected and alone: the proxy answers itself, without bothering the origin.
    let hits = bad.hits();
    let r = c.get(p.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(bad.hits(), hits);
    // And it returns after eject_for.
    assert!(
        eventually(Duration::from_secs(4), || async {
            server(&p, "only").await["ejected"] == false
        })
        .await
    );
    assert_eq!(get(&c, &p.url("/")).await.0, 500);
}

#[tokio::test]
async fn a_dead_server_is_invisible_to_clients() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let p = Proxy::start(&config(
        "",
        "",
        &[
            ("a", a.address()),
            ("dead", dead_address()),
            ("b", b.address()),
        ],
    ))
    .await;
    let c = client();
    for i in 0..100 {
        let (s, body) = get(&c, &p.url("/")).await;
        assert_eq!(s, 200, "request {i}: {body}");
    }
    assert_eq!(a.hits() + b.hits(), 100);
    // The dead server was tried (and its failures retried elsewhere).
    assert!(server(&p, "dead").await["total_requests"].as_u64().unwrap() >= 20);
}

#[tokio::test]
async fn a_503_is_retried_for_get_but_not_for_post() {
    let good = Origin::named("good").await;
    let bad = Origin::status(503).await;
    let p = Proxy::start(&config(
        "balance: round_robin",
        "",
        &[("good", good.address()), ("bad", bad.address())],
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &p.url("/")).await, (200, "good".to_string()));
    }
    assert!(
        bad.hits() >= 5,
        "round robin sent GETs to the failing server too: {}",
        bad.hits()
    );

    let before = bad.hits();
    let mut n503 = 0;
    for _ in 0..20 {
        let (s, _) = post(&c, &p.url("/")).await;
        assert!(s == 200 || s == 503, "{s}");
        n503 += (s == 503) as usize;
    }
    assert!(
        n503 >= 5,
        "POSTs that hit the failing server must not be retried: {n503} of 20 saw 503"
    );
    assert_eq!(
        bad.hits() - before,
        n503,
        "each POST went to exactly one server"
    );
}

#[tokio::test]
async fn retry_non_idempotent_allows_retrying_post() {
    let good = Origin::named("good").await;
    let bad = Origin::status(503).await;
    let p = Proxy::start(&config(
        "balance: round_robin",
        "retry_non_idempotent: true",
        &[("good", good.address()), ("bad", bad.address())],
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(post(&c, &p.url("/")).await, (200, "good".to_string()));
    }
    assert!(
        bad.hits() >= 5,
        "the failing server was tried: {}",
        bad.hits()
    );
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    const N: usize = 10;
    let fast_backoff = "backoff_base: 1ms, backoff_max: 5ms";
    // No budget at all: not a single retry.
    let (a, b) = (Origin::status(503).await, Origin::status(503).await);
    let p = Proxy::start(&config(
        &format!("retries: {{ attempts: 5, budget_percent: 0, min_retries_in_flight: 0, {fast_backoff} }}"),
        "",
        &[("a", a.address()), ("b", b.address())],
    ))
    .await;
    let c = client();
    for _ in 0..N {
        assert_eq!(get(&c, &p.url("/")).await.0, 503);
    }
    assert_eq!(
        a.hits() + b.hits(),
        N,
        "with no retry budget each request is tried once"
    );
    drop(p);

    // The default budget (20%, at least 3 in flight) lets a lone request retry.
    let (a, b) = (Origin::status(503).await, Origin::status(503).await);
    let p = Proxy::start(&config(
        &format!("retries: {{ attempts: 5, {fast_backoff} }}"),
        "",
        &[("a", a.address()), ("b", b.address())],
    ))
    .await;
    for _ in 0..N {
        assert_eq!(get(&c, &p.url("/")).await.0, 503);
    }
    assert_eq!(
        a.hits() + b.hits(),
        N * 6,
        "each request is tried 1 + 5 times"
    );
}

#[tokio::test]
async fn the_retry_budget_counts_retries_until_they_finish() {
    // An always-503 origin that takes 100ms. 20 requests start 10ms apart, so their first
    // tries fail one after another over ~200ms. With budget_percent: 0 and
    // min_retries_in_flight: 2, at most 2 retries may be outstanding at once, and a retry is
    // outstanding for the whole 100ms it waits on the origin, so only a handful of the 20
    // failures can be retried. (Counting a retry only while it backs off would let nearly
    // every one through.)
    let o = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut r = Response::new(Full::new(Bytes::from("busy")));
        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        r
    })
    .await;
    let p = Proxy::start(&config(
        "retries: { attempts: 1, budget_percent: 0, min_retries_in_flight: 2, backoff_base: 1ms, backoff_max: 1ms }",
        "",
        &[("o", o.address())],
    ))
    .await;
    let c = client();
    let url = p.url("/");
    let reqs: Vec<_> = (0..20u64)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(10 * i)).await;
                get(&c, &url).await
            }
        })
        .collect();
    let res = futures_util::future::join_all(reqs).await;
    assert!(res.iter().all(|(s, _)| *s == 503));
    let retries = o.hits() - 20;
    eprintln!("retry budget: {retries} of 20 failures retried");
    // Ideal timing gives ~4-6 retries; allow for a noisy machine, far from 20.
    assert!(
        retries >= 2,
        "the minimum of 2 concurrent retries is allowed: {retries}"
    );
    assert!(
        retries <= 10,
        "the budget should stop most retries: {retries} of 20 retried"
    );
}

#[tokio::test]
async fn a_slow_response_times_out_with_504() {
    let o = slow("slow", 2000).await;
    let p = Proxy::start(&config(
        "timeouts: { response: 200ms }\nretries: { attempts: 0 }",
        "",
        &[("s", o.address())],
    ))
    .await;
    let c = client();
    let t = Instant::now();
    let (s, body) = get(&c, &p.url("/")).await;
    let took = t.elapsed();
    assert_eq!(s, 504, "{body}");
    assert_eq!(body, "upstream timeout\n");
    assert!(took >= Duration::from_millis(180), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn the_route_timeout_bounds_the_whole_request() {
    let o = slow("slow", 2000).await;
    // Retries are on (default), but none may go past the route's deadline.
    let p = Proxy::start(&config("", "timeout: 300ms", &[("s", o.address())])).await;
    let c = client();
    let t = Instant::now();
    let (s, body) = get(&c, &p.url("/")).await;
    let took = t.elapsed();
    assert_eq!(s, 504, "{body}");
    assert!(took >= Duration::from_millis(280), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_per_try_timeout_moves_on_to_another_server() {
    let s = slow("slow", 2000).await;
    let f = Origin::named("fast").await;
    let p = Proxy::start(&config(
        "balance: round_robin\nretries: { attempts: 1, per_try_timeout: 200ms }",
        "",
        &[("slow", s.address()), ("fast", f.address())],
    ))
    .await;
    let c = client();
    let t = Instant::now();
    for _ in 0..4 {
        assert_eq!(get(&c, &p.url("/")).await, (200, "fast".to_string()));
    }
    assert!(s.hits() >= 1, "the slow server was tried");
    // Two of four requests waited one per-try timeout each; none waited for the slow origin.
    assert!(
        t.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );

    // Only slow servers: each try times out, then 504.
    let p2 = Proxy::start(&config(
        "retries: { attempts: 1, per_try_timeout: 200ms, backoff_base: 1ms, backoff_max: 1ms }",
        "",
        &[("slow", s.address())],
    ))
    .await;
    let hits = s.hits();
    let t = Instant::now();
    assert_eq!(get(&c, &p2.url("/")).await.0, 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(s.hits() - hits, 2, "one try and one retry");
}

#[tokio::test]
async fn an_unreachable_server_fails_fast() {
    // Non-routable: either the connect hangs (then the 200ms connect timeout gives 504) or
    // this machine refuses at once (then 502). Either way, quickly. Some sandboxes intercept
    // every outbound connection and answer themselves; there this test cannot say anything.
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect("10.255.255.1:81"),
    )
    .await;
    if matches!(probe, Ok(Ok(_))) {
        eprintln!("10.255.255.1:81 accepts connections here (intercepted network); skipping");
        return;
    }
    let p = Proxy::start(&config(
        "timeouts: { connect: 200ms }\nretries: { attempts: 0 }",
        "",
        &[("x", "10.255.255.1:81".to_string())],
    ))
    .await;
    let c = client();
    let t = Instant::now();
    let (s, body) = get(&c, &p.url("/")).await;
    assert!(s == 502 || s == 504, "{s} {body}");
    assert!(body.starts_with("upstream connect"), "{body}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_connect_timeout_gives_504() {
    // A listener with a tiny backlog that never accepts: once its accept queue is full, the
    // kernel drops further SYNs and connects hang, a local stand-in for a black-holed address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    let mut filled = false;
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => {
                filled = true;
                break;
            }
        }
    }
    if !filled {
        eprintln!("could not fill the accept backlog on this machine; skipping");
        return;
    }
    let p = Proxy::start(&config(
        "timeouts: { connect: 200ms }\nretries: { attempts: 0 }",
        "",
        &[("x", addr.to_string())],
    ))
    .await;
    let c = client();
    let t = Instant::now();
    let (s, body) = get(&c, &p.url("/")).await;
    let took = t.elapsed();
    assert_eq!((s, body.as_str()), (504, "upstream connect timeout\n"));
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn every_server_down_gives_503_with_retry_after() {
    let p = Proxy::start(&config(
        &format!("health_check: {{ tcp: true, {FAST_CHECK} }}"),
        "",
        &[("x", dead_address()), ("y", dead_address())],
    ))
    .await;
    wait_health(&p, "x", "down", Duration::from_secs(3)).await;
    wait_health(&p, "y", "down", Duration::from_secs(3)).await;
    let c = client();
    let t = Instant::now();
    let r = c.get(p.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let ra = r
        .headers()
        .get("retry-after")
        .expect("Retry-After on 503")
        .to_str()
        .unwrap()
        .to_string();
    assert!(ra.parse::<u64>().is_ok_and(|n| n >= 1), "Retry-After: {ra}");
    let body = r.text().await.unwrap();
    assert_eq!(body, "no server available\n");
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn max_connections_queues_then_times_out() {
    let o = slow("slow", 1000).await;
    let cfg = |queue: &str| {
        format!(
            "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - name: b\n    queue_timeout: {queue}\n    servers: [{{ name: s, address: \"{}\", max_connections: 1 }}]\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}\n",
            o.address()
        )
    };
    let c = client();

    // A short queue: the second request gives up while the first holds the only slot.
    let p = Proxy::start(&cfg("200ms")).await;
    let url = p.url("/");
    let t = Instant::now();
    let (r1, r2) = tokio::join!(get(&c, &url), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = get(&c, &url).await;
        (r, t.elapsed())
    });
    assert_eq!(r1, (200, "slow".to_string()));
    let ((s2, b2), took2) = r2;
    assert_eq!((s2, b2.as_str()), (503, "queue timeout\n"));
    assert!(
        took2 < Duration::from_millis(900),
        "the queued request gave up early: {took2:?}"
    );
    assert_eq!(o.hits(), 1, "the origin never saw more than one request");
    drop(p);

    // A queue longer than the origin's delay: both succeed, one after the other.
    let p = Proxy::start(&cfg("3s")).await;
    let url = p.url("/");
    let t = Instant::now();
    let (r1, r2) = tokio::join!(get(&c, &url), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        get(&c, &url).await
    });
    assert_eq!(r1, (200, "slow".to_string()));
    assert_eq!(r2, (200, "slow".to_string()));
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "served one at a time: {:?}",
        t.elapsed()
    );
}

/// A request whose route deadline passes while it waits in the queue gets 504 without being
/// sent, and neither it nor the route's deadline is held against the server: before, it was
/// sent with no time left, timed out, and got a healthy server ejected. A client that gives up
/// while queued leaves the queue count.
#[tokio::test]
async fn a_deadline_spent_in_the_queue_is_not_the_servers_fault() {
    let o = slow("slow", 1000).await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - name: b\n    queue_timeout: 5s\n    outlier: {{ consecutive_5xx: 1, eject_for: 60s }}\n    servers: [{{ name: s, address: \"{}\", max_connections: 1 }}]\nroutes:\n  - {{ name: quick, match: {{ path_prefix: /quick }}, backend: b, public: true, timeout: 300ms }}\n  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}\n",
        o.address()
    ))
    .await;
    let c = client();
    let url = p.url("/");
    // The first holds the only slot for a second; the second's 300 ms run out in the queue.
    let (r1, r2) = tokio::join!(get(&c, &url), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        get(&c, &p.url("/quick")).await
    });
    assert_eq!(r1, (200, "slow".to_string()));
    assert_eq!(r2, (504, "upstream timeout\n".to_string()));
    assert_eq!(o.hits(), 1, "the expired request was sent");
    // Not ejected: the next request is served.
    assert_eq!(
        get(&c, &url).await,
        (200, "slow".to_string()),
        "{}",
        p.log_text()
    );

    // Clients that give up while queued.
    let busy = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let quick = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        assert!(quick.get(&url).send().await.is_err());
    }
    assert_eq!(busy.await.unwrap().0, 200);
    let queued = eventually(Duration::from_secs(3), || async {
        let (_, b) = p
            .admin(reqwest::Method::GET, "/api/v1/backends", None)
            .await;
        b.contains("\"queued\":0")
    })
    .await;
    let (_, b) = p
        .admin(reqwest::Method::GET, "/api/v1/backends", None)
        .await;
    assert!(queued, "{b}");
}

/// A reload that fails after the new config was built (here: a new listener on a port
/// already taken) leaves `max_connections` as it was: the limit is applied when a config is
/// installed, not when it is built.
#[tokio::test]
async fn a_failed_reload_leaves_max_connections_as_it_was() {
    let o = slow("slow", 800).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = |max: u32, extra: &str| {
        format!(
            "listeners:\n  - {{ name: web, bind: \"127.0.0.1:{{port}}\" }}\n{extra}backends:\n  - name: b\n    queue_timeout: 200ms\n    servers: [{{ name: s, address: \"{}\", max_connections: {max} }}]\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}\n",
            o.address()
        )
    };
    let p = Proxy::start(&cfg(1, "")).await;
    p.write_config(&cfg(
        5,
        &format!(
            "  - {{ name: more, bind: \"{}\" }}\n",
            taken.local_addr().unwrap()
        ),
    ));
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_ne!(status, 200, "{body}");
    let c = client();
    let url = p.url("/");
    let (r1, r2) = tokio::join!(get(&c, &url), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        get(&c, &url).await
    });
    assert_eq!(r1.0, 200);
    assert_eq!(
        r2,
        (503, "queue timeout\n".to_string()),
        "the failed reload's limit applied"
    );
}

#[tokio::test]
async fn a_full_server_is_skipped_while_another_has_room() {
    // Two servers with one slot each. While the slow one is busy, new requests go to the fast
    // one instead of queueing behind the slow one: the queue is for when every server is full.
    let s = slow("slow", 1500).await;
    let f = Origin::named("fast").await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - name: b\n    balance: round_robin\n    queue_timeout: 200ms\n    servers:\n      - {{ name: slow, address: \"{}\", max_connections: 1 }}\n      - {{ name: fast, address: \"{}\", max_connections: 1 }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}\n",
        s.address(),
        f.address()
    ))
    .await;
    let c = client();
    let url = p.url("/");
    let busy = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url).await }
    });
    // Wait until the slow server holds its only slot.
    let ok = eventually(Duration::from_secs(2), || async { s.hits() == 1 }).await;
    assert!(
        ok,
        "slow={} fast={} log:\n{}",
        s.hits(),
        f.hits(),
        p.log_text()
    );
    for i in 0..6 {
        assert_eq!(
            get(&c, &url).await,
            (200, "fast".to_string()),
            "request {i} while slow is full"
        );
    }
    assert_eq!(busy.await.unwrap(), (200, "slow".to_string()));
}

#[tokio::test]
async fn a_connect_failure_is_retried_even_for_a_post_with_a_body() {
    // Nothing was sent to a server that refused the connection, so even a POST with a body
    // may safely go to the next server, body intact.
    let o = Origin::start(|req| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(Full::new(body))
    })
    .await;
    let p = Proxy::start(&config(
        "balance: round_robin",
        "",
        &[("dead", dead_address()), ("live", o.address())],
    ))
    .await;
    let c = client();
    for i in 0..6 {
        let payload = format!("payload-{i}-{}", "x".repeat(1000 * i));
        let r = c
            .post(p.url("/"))
            .body(payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), payload);
    }
    assert!(server(&p, "dead").await["total_requests"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn consecutive_connect_failures_eject_a_server() {
    let live = Origin::named("live").await;
    let p = Proxy::start(&config(
        "balance: round_robin\noutlier: { consecutive_connect_failures: 2, eject_for: 10s }",
        "",
        &[("dead", dead_address()), ("live", live.address())],
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(get(&c, &p.url("/")).await, (200, "live".to_string()));
    }
    let s = server(&p, "dead").await;
    assert_eq!(s["ejected"], true, "{s}");
    // Once ejected it is not even tried.
    let tried = s["total_requests"].as_u64().unwrap();
    for _ in 0..10 {
        assert_eq!(get(&c, &p.url("/")).await, (200, "live".to_string()));
    }
    assert_eq!(
        server(&p, "dead").await["total_requests"].as_u64().unwrap(),
        tried
    );
}
