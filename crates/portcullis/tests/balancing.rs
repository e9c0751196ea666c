//! Server selection end to end: each balancing algorithm against real origins that answer
//! with their own name, consistent-hash stability when a server joins, and cookie stickiness
//! with the admin states `maint` and `drain`.
mod common;
use common::*;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::Response;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// A config with one backend `b` (the given `balance` and extra backend keys) behind a
/// catch-all route. `servers` are (name, address, weight).
fn config(balance: &str, extra: &str, servers: &[(&str, String, u32)]) -> String {
    let mut s = String::from(
        "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\nbackends:\n  - name: b\n",
    );
    s.push_str(&format!("    balance: {balance}\n"));
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {line}\n"));
    }
    s.push_str("    servers:\n");
    for (n, a, w) in servers {
        s.push_str(&format!(
            "      - {{ name: {n}, address: \"{a}\", weight: {w} }}\n"
        ));
    }
    s.push_str("routes:\n  - { name: r, match: { path_prefix: / }, backend: b, public: true }\n");
    s
}

/// Sends one GET (with optional extra headers) and returns the body, asserting a 200.
async fn get_name(c: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> String {
    let mut r = c.get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.text().await.unwrap()
}

/// Sends `n` sequential GETs and counts the answers by origin name.
async fn tally(p: &Proxy, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut m = HashMap::new();
    for _ in 0..n {
        *m.entry(get_name(&c, &p.url("/"), &[]).await).or_insert(0) += 1;
    }
    m
}

fn count(m: &HashMap<String, usize>, k: &str) -> usize {
    m.get(k).copied().unwrap_or(0)
}

#[tokio::test]
async fn round_robin_follows_weights() {
    let (a, b, c) = (
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    );
    let p = Proxy::start(&config(
        "round_robin",
        "",
        &[
            ("a", a.address(), 3),
            ("b", b.address(), 2),
            ("c", c.address(), 1),
        ],
    ))
    .await;
    let m = tally(&p, 600).await;
    // Smooth WRR is exact over whole cycles; allow a little slack anyway.
    let (na, nb, nc) = (count(&m, "a"), count(&m, "b"), count(&m, "c"));
    assert_eq!(na + nb + nc, 600, "{m:?}");
    assert!(
        (285..=315).contains(&na),
        "a (weight 3) should get ~300 of 600: {m:?}"
    );
    assert!(
        (185..=215).contains(&nb),
        "b (weight 2) should get ~200 of 600: {m:?}"
    );
    assert!(
        (85..=115).contains(&nc),
        "c (weight 1) should get ~100 of 600: {m:?}"
    );
}

#[tokio::test]
async fn round_robin_three_to_one() {
    let (a, b) = (Origin::named("a").await, Origin::named("b").await);
    let p = Proxy::start(&config(
        "round_robin",
        "",
        &[("a", a.address(), 3), ("b", b.address(), 1)],
    ))
    .await;
    let m = tally(&p, 400).await;
    let share = count(&m, "a") as f64 / 400.0;
    assert!(
        (0.70..=0.80).contains(&share),
        "3:1 should be ~75%/25%: {m:?}"
    );
    assert!(count(&m, "b") > 0, "{m:?}");
}

#[tokio::test]
async fn least_conn_sends_fewer_requests_to_a_slow_server() {
    let slow = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        Response::new(Full::new(Bytes::from("slow")))
    })
    .await;
    let (f1, f2) = (Origin::named("f1").await, Origin::named("f2").await);
    let servers = [
        ("slow", slow.address(), 1),
        ("f1", f1.address(), 1),
        ("f2", f2.address(), 1),
    ];
    let p = Proxy::start(&config("least_conn", "", &servers)).await;

    // 8 concurrent clients, 30 requests each.
    let url = p.url("/");
    let results: Vec<String> = futures_util::stream::iter(0..8)
        .map(|_| {
            let url = url.clone();
            async move {
                let c = client();
                let mut names = Vec::new();
                for _ in 0..30 {
                    names.push(get_name(&c, &url, &[]).await);
                }
                names
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .flatten()
        .collect();
    let total = results.len();
    let n_slow = results.iter().filter(|n| *n == "slow").count();
    let n_f1 = results.iter().filter(|n| *n == "f1").count();
    let n_f2 = results.iter().filter(|n| *n == "f2").count();
    assert_eq!(total, 240);
    eprintln!("least_conn: slow={n_slow} f1={n_f1} f2={n_f2}");
    // Round robin would give the slow server a third (80); least_conn gives it far fewer.
    assert!(
        n_slow > 0,
        "the slow server is still used: slow={n_slow} f1={n_f1} f2={n_f2}"
    );
    assert!(
        (n_slow as f64) < 0.15 * total as f64,
        "the slow server should get few requests: slow={n_slow} f1={n_f1} f2={n_f2}"
    );
    assert!(
        n_f1 > 60 && n_f2 > 60,
        "both fast servers share the rest: slow={n_slow} f1={n_f1} f2={n_f2}"
    );
}

#[tokio::test]
async fn random_reaches_every_server_and_favours_weight() {
    let (a, b, c) = (
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    );
    let p = Proxy::start(&config(
        "random",
        "",
        &[
            ("a", a.address(), 3),
            ("b", b.address(), 1),
            ("c", c.address(), 1),
        ],
    ))
    .await;
    let m = tally(&p, 500).await;
    let (na, nb, nc) = (count(&m, "a"), count(&m, "b"), count(&m, "c"));
    // Two weighted draws, less loaded (relative to weight) wins: with idle servers the heavy
    // one wins unless both draws miss it, so expect a ≈ 84%, b ≈ c ≈ 8%.
    assert!(nb >= 10 && nc >= 10, "every server gets traffic: {m:?}");
    assert!(na > 300, "weight 3 of 5 gets the most: {m:?}");
    assert!(na > 3 * nb && na > 3 * nc, "{m:?}");
}

#[tokio::test]
async fn random_with_equal_weights_spreads_evenly() {
    let (a, b, c) = (
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    );
    let p = Proxy::start(&config(
        "random",
        "",
        &[
            ("a", a.address(), 1),
            ("b", b.address(), 1),
            ("c", c.address(), 1),
        ],
    ))
    .await;
    let m = tally(&p, 450).await;
    for k in ["a", "b", "c"] {
        // Expected 150 each; first-draw-wins on ties makes it slightly uneven but not much.
        assert!((90..=210).contains(&count(&m, k)), "{k}: {m:?}");
    }
}

/// Four origins named s0..s3 and a proxy hashing on `hash`.
async fn hash_setup(hash: &str) -> (Vec<Origin>, Proxy) {
    let names = ["s0", "s1", "s2", "s3"];
    let mut origins = Vec::new();
    for n in names {
        origins.push(Origin::named(n).await);
    }
    let servers: Vec<_> = names
        .iter()
        .zip(&origins)
        .map(|(n, o)| (*n, o.address(), 1))
        .collect();
    let p = Proxy::start(&config(&format!("{{ hash: \"{hash}\" }}"), "", &servers)).await;
    (origins, p)
}

/// Asserts a key → server mapping is spread over the servers: at least 3 of 4 used and
/// none has more than 60% of the keys.
fn assert_spread(by_key: &HashMap<String, String>) {
    let mut per: HashMap<&str, usize> = HashMap::new();
    for v in by_key.values() {
        *per.entry(v.as_str()).or_insert(0) += 1;
    }
    assert!(
        per.len() >= 3,
        "keys should spread over the servers: {per:?}"
    );
    let max = per.values().max().copied().unwrap_or(0);
    assert!(
        (max as f64) < 0.6 * by_key.len() as f64,
        "one server has too many keys: {per:?}"
    );
}

#[tokio::test]
async fn hash_on_header_pins_each_value_and_spreads_values() {
    let (_o, p) = hash_setup("header:x-key").await;
    let c = client();
    let mut by_key = HashMap::new();
    for k in 0..100 {
        let key = format!("tenant-{k}");
        let first = get_name(&c, &p.url("/"), &[("x-key", &key)]).await;
        for _ in 0..3 {
            // Varying the path must not matter.
            let again = get_name(&c, &p.url(&format!("/x/{}", k * 7)), &[("X-Key", &key)]).await;
            assert_eq!(again, first, "key {key} moved");
        }
        by_key.insert(key, first);
    }
    assert_spread(&by_key);
}

#[tokio::test]
async fn hash_on_cookie_pins_each_value_and_spreads_values() {
    let (_o, p) = hash_setup("cookie:uid").await;
    let c = client();
    let mut by_key = HashMap::new();
    for k in 0..100 {
        let key = format!("user{k}");
        let first = get_name(&c, &p.url("/"), &[("cookie", &format!("uid={key}"))]).await;
        for _ in 0..3 {
            // Other cookies around it must not change the pick.
            let cookie = format!("a=1; uid={key}; theme=dark{}", k % 3);
            let again = get_name(&c, &p.url("/"), &[("cookie", &cookie)]).await;
            assert_eq!(again, first, "cookie uid={key} moved");
        }
        by_key.insert(key, first);
    }
    assert_spread(&by_key);
}

#[tokio::test]
async fn hash_on_client_ip_pins_each_address_and_spreads_addresses() {
    let (_o, p) = hash_setup("client_ip").await;
    let mut by_key = HashMap::new();
    // Every 127/8 address is local on Linux, so clients can come from many source addresses.
    for i in 1..=60u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .local_address(ip)
            .build()
            .unwrap();
        let first = get_name(&c, &p.url("/"), &[]).await;
        for j in 0..3 {
            // Neither the path nor a (untrusted) X-Forwarded-For may change the pick.
            let again = get_name(
                &c,
                &p.url(&format!("/p{j}")),
                &[("x-forwarded-for", &format!("10.9.8.{j}"))],
            )
            .await;
            assert_eq!(again, first, "client {ip} moved");
        }
        by_key.insert(ip.to_string(), first);
    }
    assert_spread(&by_key);
}

#[tokio::test]
async fn hash_on_path_pins_each_path_and_ignores_the_query() {
    let (_o, p) = hash_setup("path").await;
    let c = client();
    let mut by_key = HashMap::new();
    for k in 0..100 {
        let path = format!("/item/{k}");
        let first = get_name(&c, &p.url(&path), &[]).await;
        for q in 0..3 {
            let again = get_name(
                &c,
                &p.url(&format!("{path}?page={q}")),
                &[("x-other", &q.to_string())],
            )
            .await;
            assert_eq!(again, first, "path {path} moved");
        }
        by_key.insert(path, first);
    }
    assert_spread(&by_key);
}

/// Sends each key once (16 at a time) and returns key → origin name.
async fn route_keys(p: &Proxy, keys: &[String]) -> HashMap<String, String> {
    let url = p.url("/");
    let c = client();
    futures_util::stream::iter(keys.iter().cloned())
        .map(|k| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                let name = get_name(&c, &url, &[("x-key", &k)]).await;
                (k, name)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

#[tokio::test]
async fn consistent_hash_moves_about_one_fifth_of_keys_to_a_new_server() {
    let names = ["s0", "s1", "s2", "s3", "s4"];
    let mut origins = Vec::new();
    for n in names {
        origins.push(Origin::named(n).await);
    }
    let servers: Vec<_> = names
        .iter()
        .zip(&origins)
        .map(|(n, o)| (*n, o.address(), 1))
        .collect();
    let balance = "{ hash: \"header:x-key\" }";
    let p = Proxy::start(&config(balance, "", &servers[..4])).await;
    let keys: Vec<String> = (0..1000).map(|k| format!("key-{k}")).collect();
    let before = route_keys(&p, &keys).await;
    assert!(before.values().all(|v| v != "s4"));
    assert_spread(&before);

    let v0 = p.config_status().await["version"].clone();
    p.write_config(&config(balance, "", &servers));
    p.sighup();
    let mut reloaded = false;
    for _ in 0..100 {
        if p.config_status().await["version"] != v0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "config did not reload; log:\n{}", p.log_text());

    let after = route_keys(&p, &keys).await;
    let moved: Vec<&String> = keys.iter().filter(|k| before[*k] != after[*k]).collect();
    let frac = moved.len() as f64 / keys.len() as f64;
    eprintln!("moved {} of {} keys ({frac:.3})", moved.len(), keys.len());
    assert!(
        (0.10..=0.32).contains(&frac),
        "about 1/5 of keys should move, moved {frac}"
    );
    for k in &moved {
        assert_eq!(
            after[*k], "s4",
            "key {k} moved from {} to an old server",
            before[*k]
        );
    }
}

/// The value of `name=` in the response's Set-Cookie headers, if any.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let first = v.split(';').next()?;
            let (k, val) = first.trim().split_once('=')?;
            (k == name).then(|| val.to_string())
        })
}

async fn set_state(p: &Proxy, server: &str, state: &str) {
    let (s, body) = p
        .admin(
            reqwest::Method::POST,
            &format!("/api/v1/backends/b/servers/{server}/state"),
            Some(serde_json::json!({ "state": state })),
        )
        .await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test]
async fn sticky_cookie_keeps_a_client_on_its_server_and_respects_admin_states() {
    let (a, b, c) = (
        Origin::named("a").await,
        Origin::named("b").await,
        Origin::named("c").await,
    );
    let p = Proxy::start(&config(
        "round_robin",
        "sticky: { cookie: srv }",
        &[
            ("a", a.address(), 1),
            ("b", b.address(), 1),
            ("c", c.address(), 1),
        ],
    ))
    .await;
    let cl = client();

    // The first response picks a server and remembers it in the cookie.
    let resp = cl.get(p.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = set_cookie(&resp, "srv").expect("first response sets the sticky cookie");
    let home = resp.text().await.unwrap();
    let cookie = format!("srv={id}");

    // With the cookie, every request goes to the same server (round robin would rotate).
    for _ in 0..12 {
        let resp = cl
            .get(p.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            set_cookie(&resp, "srv"),
            None,
            "an honoured cookie is not re-set"
        );
        assert_eq!(resp.text().await.unwrap(), home);
    }
    // Without it, requests rotate over all servers.
    let m = tally(&p, 6).await;
    assert_eq!(m.len(), 3, "{m:?}");

    // maint: no traffic at all, not even sticky; the client is moved and re-stuck.
    set_state(&p, &home, "maint").await;
    for _ in 0..6 {
        let resp = cl
            .get(p.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let new_id = set_cookie(&resp, "srv").expect("a moved client gets a new cookie");
        assert_ne!(new_id, id);
        assert_ne!(
            resp.text().await.unwrap(),
            home,
            "a server in maint got a sticky request"
        );
    }

    // Back to ready: the cookie works again.
    set_state(&p, &home, "ready").await;
    assert_eq!(
        get_name(&cl, &p.url("/"), &[("cookie", &cookie)]).await,
        home
    );

    // drain: sticky requests still go there, new ones do not.
    set_state(&p, &home, "drain").await;
    for _ in 0..6 {
        assert_eq!(
            get_name(&cl, &p.url("/"), &[("cookie", &cookie)]).await,
            home,
            "drain still serves sticky clients"
        );
    }
    let m = tally(&p, 12).await;
    assert_eq!(
        count(&m, &home),
        0,
        "a draining server got a new client: {m:?}"
    );
    assert_eq!(m.len(), 2, "{m:?}");
}
