//! The Redis store against a real `redis-server` (no mocks): each test starts its own on a
//! free loopback port and kills it when done.

use portcullis_limits::redis::{
    Check, Checked, PlanOp, QuotaOp, QuotaVerdict, RedisConfig, RedisStore, StoreError, TableOp,
};
use portcullis_limits::{Gcra, GcraState, Key, Moment, Rate, Table, TableSpec};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of our own, killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
}

fn redis_server_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    let fallback = PathBuf::from("/usr/bin/redis-server");
    match on_path {
        Some(p) => p,
        None if fallback.is_file() => fallback,
        None => panic!(
            "redis-server not found: install the Debian package redis-server (scripts/test.sh does)"
        ),
    }
}

#[path = "../../../tests/ports.rs"]
mod ports;
use ports::free_port;

fn answers_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Server {
    fn start() -> Server {
        // Another process may take the port between our probe and the server's bind: retry.
        for _ in 0..5 {
            if let Some(s) = Server::start_on(free_port()) {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    fn start_on(port: u16) -> Option<Server> {
        let child = Command::new(redis_server_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let mut s = Server {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if answers_ping(port) {
                return Some(s);
            }
            if let Some(Ok(Some(_))) = s.child.as_mut().map(Child::try_wait) {
                return None; // exited: the port was taken
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        s.kill();
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain connection, for looking at what the store wrote.
    fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(server: &Server) -> RedisConfig {
    RedisConfig {
        // Generous: the tests share two cores with each other's servers.
        timeout: Duration::from_millis(500),
        prefix: "pc-test".into(),
        ..RedisConfig::new(server.url())
    }
}

fn spec(store: &[&str]) -> TableSpec {
    TableSpec::parse(10_000, Duration::from_secs(600), store.iter().copied()).unwrap()
}

fn moment(c: &Checked) -> Moment {
    let t = c.redis_time.expect("a round trip");
    Moment::from_nanos(u64::try_from(t.as_nanos()).unwrap())
}

async fn count(store: &RedisStore, table: &str, spec: &TableSpec, key: &Key, n: u64) -> Checked {
    let ops = [TableOp {
        table,
        spec,
        key,
        requests: n,
    }];
    store
        .check(&Check {
            tables: &ops,
            ..Check::default()
        })
        .await
        .unwrap()
}

fn plan<'a>(key: &'a Key, rate: Rate, burst: u64) -> PlanOp<'a> {
    PlanOp {
        plan: "gold",
        bucket: "",
        rate,
        burst,
        key,
        cost: 1,
    }
}

async fn check_quota(store: &RedisStore, op: QuotaOp<'_>) -> QuotaVerdict {
    store
        .check(&Check {
            quota: Some(op),
            ..Check::default()
        })
        .await
        .unwrap()
        .quota
        .unwrap()
}

async fn check_plan(store: &RedisStore, op: PlanOp<'_>) -> Checked {
    store
        .check(&Check {
            plan: Some(op),
            ..Check::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn rates_and_counts_match_the_local_table() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let spec = spec(&[
        "http_req_rate(1s)",
        "http_req_cnt",
        "http_err_rate(1s)",
        "gpc0",
        "conn_cur",
        "tags",
    ]);
    let local = Table::new(spec.clone());
    let key = Key::from("10.0.0.7");
    // About 2.4s of traffic, in bursts, so the sequence crosses window boundaries.
    let mut compared = 0;
    for i in 0..120u64 {
        let n = 1 + i % 3;
        let seen = count(&store, "per-ip", &spec, &key, n).await;
        let at = moment(&seen);
        let mut want = local.with_entry(&key, at, |e| {
            for _ in 0..n {
                e.add_request();
            }
            e.snapshot()
        });
        let got = &seen.tables[0];
        assert_eq!(got.conn_cur, None, "conn_cur stays per process");
        assert!(got.tags.is_empty());
        assert!(got.expires_in <= spec.expire() && got.expires_in > Duration::from_secs(590));
        want.conn_cur = None;
        want.expires_in = got.expires_in;
        assert_eq!(*got, want, "request {i} at {at}");
        compared += 1;

        // A read some time later, without counting.
        if i % 10 == 9 {
            let read = count(&store, "per-ip", &spec, &key, 0).await;
            let mut want = local.get(&key, moment(&read)).unwrap();
            want.conn_cur = None;
            want.expires_in = read.tables[0].expires_in;
            assert_eq!(read.tables[0], want);
        }
        tokio::time::sleep(Duration::from_millis(if i % 7 == 0 { 60 } else { 12 })).await;
    }
    assert_eq!(compared, 120);

    // gpc0 is set from outside, as on the local table.
    let set = store.set_gpc("per-ip", &spec, &key, 7).await.unwrap();
    assert_eq!(set.gpc0, Some(7));
    assert_eq!(set.http_req_cnt, Some(240));
    let no_gpc = self::spec(&["http_req_cnt"]);
    let err = store.set_gpc("other", &no_gpc, &key, 1).await.unwrap_err();
    assert!(err.to_string().contains("add `gpc0`"), "{err}");

    // An entry never seen reads as absent, and a read does not create it.
    let nobody = Key::from("nobody");
    assert_eq!(store.get("per-ip", &spec, &nobody).await.unwrap(), None);
    let read = count(&store, "per-ip", &spec, &nobody, 0).await;
    assert_eq!(read.tables[0].http_req_cnt, Some(0));
    assert_eq!(read.tables[0].expires_in, Duration::ZERO);
    assert_eq!(store.get("per-ip", &spec, &nobody).await.unwrap(), None);
    // A table that stores nothing a request counts still creates the entry.
    let err_only = self::spec(&["http_err_cnt"]);
    count(&store, "errs", &err_only, &nobody, 1).await;
    let s = store
        .get("errs", &err_only, &nobody)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.http_err_cnt, Some(0));
}

#[tokio::test]
async fn gcra_refuses_past_the_burst_and_says_when_to_retry() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let rate = Rate::per_second(10);
    let local = Gcra::new(rate, 5).unwrap();
    let mut state = GcraState::default();
    let key = Key::from("agent-1");
    let mut refused = None;
    for i in 0..8 {
        let c = check_plan(&store, plan(&key, rate, 5)).await;
        let v = c.plan.unwrap();
        if c.redis_time.is_some() {
            // Exactly the local bucket's verdict, for the same moments.
            assert_eq!(v, local.check(&mut state, moment(&c), 1), "check {i}");
        }
        if !v.allowed && refused.is_none() {
            refused = Some((i, v));
        }
    }
    let (first, v) = refused.expect("refused past the burst");
    assert!(first >= 5, "the burst of 5 is admitted first ({first})");
    assert!(v.retry_after > Duration::ZERO && v.retry_after <= Duration::from_millis(100));
    assert_eq!(v.remaining, 0);
    assert!(
        v.reset_after > Duration::from_millis(400) && v.reset_after <= Duration::from_millis(500)
    );

    // Waiting retry_after is enough.
    tokio::time::sleep(v.retry_after).await;
    let c = check_plan(&store, plan(&key, rate, 5)).await;
    assert!(c.plan.unwrap().allowed, "{c:?}");

    // A cost above the burst never passes; a cost of 0 reads and takes nothing.
    let c = check_plan(
        &store,
        PlanOp {
            cost: 6,
            ..plan(&Key::from("b"), rate, 5)
        },
    )
    .await;
    assert_eq!(c.plan.unwrap().retry_after, Duration::MAX);
    let c = check_plan(
        &store,
        PlanOp {
            cost: 0,
            ..plan(&Key::from("b"), rate, 5)
        },
    )
    .await;
    assert_eq!(c.plan.unwrap().remaining, 5);

    // A full bucket is forgotten: the key expires when the bucket would be full again.
    let mut raw = server.raw();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("pc-test:p:gold::agent-1")
        .query(&mut raw)
        .unwrap();
    assert!(ttl > 0 && ttl <= 500, "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_share_one_global_limit() {
    let server = Server::start();
    let cfg = RedisConfig {
        timeout: Duration::from_secs(2),
        ..config(&server)
    };
    let replicas = [
        RedisStore::new(cfg.clone()).unwrap(),
        RedisStore::new(cfg).unwrap(),
    ];
    // A burst of 500 and a negligible rate: 2,000 checks from 20 tasks across two "replicas".
    let rate = Rate::new(1, Duration::from_secs(3_600)).unwrap();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let store = replicas[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            let key = Key::from("tenant-a");
            let mut allowed = 0u32;
            for _ in 0..100 {
                let c = check_plan(&store, plan(&key, rate, 500)).await;
                allowed += u32::from(c.allowed());
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(allowed, 500);
    let (a, b) = (replicas[0].stats(), replicas[1].stats());
    println!("replica A {a:?}\nreplica B {b:?}");
    assert_eq!(a.errors + b.errors + a.timeouts + b.timeouts, 0);
    assert!(
        a.deny_cache_hits + b.deny_cache_hits > 1_000,
        "refusals were cached"
    );
}

#[tokio::test]
async fn quotas_refuse_at_the_limit_and_count_each_period_apart() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let key = Key::from("alice");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let quota = |start: i64, cost: u64| QuotaOp {
        plan: "gold",
        key: &key,
        period_start: start,
        period_end: start + 3_600,
        limit: 10,
        cost,
    };
    let start = now - 60;
    let mut used = Vec::new();
    for _ in 0..4 {
        used.push(check_quota(&store, quota(start, 3)).await);
    }
    assert_eq!(
        used.iter()
            .map(|v| (v.allowed, v.used, v.remaining))
            .collect::<Vec<_>>(),
        [(true, 3, 7), (true, 6, 4), (true, 9, 1), (false, 9, 1)]
    );
    let v = used[3];
    assert!(
        v.reset_after <= Duration::from_secs(3_540) && v.reset_after > Duration::from_secs(3_500)
    );
    // A smaller cost still fits (the refusal of 3 does not cache a refusal of 1).
    let v = check_quota(&store, quota(start, 1)).await;
    assert_eq!((v.allowed, v.used, v.remaining), (true, 10, 0));
    // The next period starts from zero.
    let v = check_quota(&store, quota(start + 3_600, 4)).await;
    assert_eq!((v.allowed, v.used), (true, 4));

    // A plan refusal takes nothing from the quota, and the other way round.
    let rate = Rate::new(1, Duration::from_secs(3_600)).unwrap();
    let bob = Key::from("bob");
    let both = |burst: u64, limit: u64| {
        let store = store.clone();
        let bob = bob.clone();
        async move {
            let p = PlanOp {
                plan: "silver",
                ..plan(&bob, rate, burst)
            };
            let q = QuotaOp {
                plan: "silver",
                key: &bob,
                period_start: start,
                period_end: start + 3_600,
                limit,
                cost: 1,
            };
            store
                .check(&Check {
                    tables: &[],
                    plan: Some(p),
                    quota: Some(q),
                })
                .await
                .unwrap()
        }
    };
    let c = both(1, 5).await;
    assert!(c.allowed());
    assert_eq!(c.quota.unwrap().used, 1);
    let c = both(1, 5).await;
    assert!(!c.allowed() && !c.plan.unwrap().allowed);
    assert_eq!(
        c.quota.unwrap().used,
        1,
        "the plan refused: the quota took nothing"
    );
    // With room in the plan (burst 5) but not in the quota (limit 1), the plan takes nothing.
    let c = both(5, 1).await;
    let (p, q) = (c.plan.unwrap(), c.quota.unwrap());
    assert!(!c.allowed() && p.allowed && !q.allowed);
    assert_eq!(
        p.remaining, 4,
        "one token was taken by the first check only"
    );
}

#[tokio::test]
async fn refusals_are_answered_from_the_deny_cache() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let rate = Rate::new(1, Duration::from_secs(3_600)).unwrap();
    let key = Key::from("abuser");
    for _ in 0..2 {
        assert!(check_plan(&store, plan(&key, rate, 2)).await.allowed());
    }
    let c = check_plan(&store, plan(&key, rate, 2)).await;
    assert!(!c.allowed() && c.redis_time.is_some());
    let before = store.stats();
    for _ in 0..100 {
        let c = check_plan(&store, plan(&key, rate, 2)).await;
        let v = c.plan.unwrap();
        assert!(!v.allowed && c.redis_time.is_none());
        assert!(v.retry_after > Duration::from_secs(1_790), "{v:?}");
    }
    let after = store.stats();
    assert_eq!(after.round_trips, before.round_trips, "no round trip");
    assert_eq!(after.deny_cache_hits, before.deny_cache_hits + 100);

    // Tables still count when the plan is refused from the cache.
    let spec = spec(&["http_req_cnt"]);
    let ops = [TableOp {
        table: "t",
        spec: &spec,
        key: &key,
        requests: 1,
    }];
    let c = store
        .check(&Check {
            tables: &ops,
            plan: Some(plan(&key, rate, 2)),
            quota: None,
        })
        .await
        .unwrap();
    assert!(!c.allowed());
    assert_eq!(c.tables[0].http_req_cnt, Some(1));
    assert_eq!(store.stats().round_trips, after.round_trips + 1);

    // Forgetting the refusals sends the next check to Redis again (still refused there).
    store.forget_refusals();
    let c = check_plan(&store, plan(&key, rate, 2)).await;
    assert!(!c.allowed() && c.redis_time.is_some());

    // Another bucket of the same plan, or other parameters, are not refused.
    let other = PlanOp {
        bucket: "override-1",
        ..plan(&key, rate, 2)
    };
    assert!(check_plan(&store, other).await.allowed());
    assert!(check_plan(&store, plan(&key, rate, 3)).await.allowed());
}

#[tokio::test]
async fn a_killed_redis_fails_fast_and_the_store_recovers() {
    let mut server = Server::start();
    let port = server.port;
    let store = RedisStore::new(RedisConfig {
        timeout: Duration::from_millis(50),
        ..config(&server)
    })
    .unwrap();
    let spec = spec(&["http_req_cnt"]);
    let key = Key::from("k");
    let ops = [TableOp {
        table: "t",
        spec: &spec,
        key: &key,
        requests: 1,
    }];
    let check = Check {
        tables: &ops,
        ..Check::default()
    };
    // The first check may wait for the background connection; give it a few tries.
    let mut ok = false;
    for _ in 0..50 {
        if store.check(&check).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);

    server.kill();
    for i in 0..20 {
        let start = Instant::now();
        let r = store.check(&check).await;
        let took = start.elapsed();
        assert!(r.is_err(), "check {i} with redis dead: {r:?}");
        assert!(took < Duration::from_secs(1), "check {i} took {took:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = store.stats();
    println!("while down: {s:?}");

    let _server = Server::start_on(port).expect("restart on the same port");
    let start = Instant::now();
    loop {
        match store.check(&check).await {
            Ok(c) => {
                // A fresh server: the count starts again.
                assert_eq!(c.tables[0].http_req_cnt, Some(1));
                break;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "not recovered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    println!("recovered in {:?}", start.elapsed());
}

#[tokio::test]
async fn a_stalled_redis_times_out_and_is_used_again_when_it_resumes() {
    let server = Server::start();
    let store = RedisStore::new(RedisConfig {
        timeout: Duration::from_millis(50),
        ..config(&server)
    })
    .unwrap();
    let spec = spec(&["http_req_cnt"]);
    let key = Key::from("k");
    let start = Instant::now();
    while store.ping().await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(2));
    }
    count(&store, "t", &spec, &key, 1).await;
    let pid = server.child.as_ref().unwrap().id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    let ops = [TableOp {
        table: "t",
        spec: &spec,
        key: &key,
        requests: 1,
    }];
    for _ in 0..5 {
        let start = Instant::now();
        let r = store
            .check(&Check {
                tables: &ops,
                ..Check::default()
            })
            .await;
        let took = start.elapsed();
        assert_eq!(r.unwrap_err(), StoreError::Timeout);
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }
    assert_eq!(store.stats().timeouts, 5);
    signal("-CONT");
    // The timed-out checks were sent and run when Redis resumed: 1 + 5, and this one.
    let start = Instant::now();
    loop {
        match store
            .check(&Check {
                tables: &ops,
                ..Check::default()
            })
            .await
        {
            Ok(c) => {
                assert_eq!(c.tables[0].http_req_cnt, Some(7));
                break;
            }
            Err(e) => assert!(start.elapsed() < Duration::from_secs(5), "{e}"),
        }
    }
}

#[tokio::test]
async fn a_store_made_before_redis_starts_works_once_it_does() {
    let port = free_port();
    let store = RedisStore::new(RedisConfig {
        timeout: Duration::from_millis(50),
        prefix: "pc-test".into(),
        ..RedisConfig::new(format!("redis://127.0.0.1:{port}/"))
    })
    .unwrap();
    let start = Instant::now();
    let err = store.ping().await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    let _server = Server::start_on(port).expect("start on the chosen port");
    let start = Instant::now();
    while store.ping().await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn finished_responses_are_flushed_in_the_background() {
    let server = Server::start();
    let store = RedisStore::new(RedisConfig {
        sync_interval: Duration::from_millis(20),
        ..config(&server)
    })
    .unwrap();
    let spec = spec(&[
        "http_err_rate(1h)",
        "http_err_cnt",
        "bytes_in_rate(1h)",
        "bytes_out_rate(1h)",
    ]);
    let keys: Vec<Key> = (0..50)
        .map(|i| Key::from(format!("k{i}").as_str()))
        .collect();
    for round in 0..4u64 {
        for k in &keys {
            store.finish("per-key", &spec, k, round % 2 == 0, 100, 1_000);
        }
    }
    // Not blocking: all of it is still local.
    assert_eq!(store.stats().finish_pending, 50);
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = store.get("per-key", &spec, &keys[49]).await.unwrap();
        if let Some(s) = s {
            assert_eq!(s.http_err_cnt, Some(2));
            // An hour-long window: all in the current one (or, across the hour, almost all of
            // the previous one still counts).
            assert!((1..=2).contains(&s.http_err_rate.unwrap()), "{s:?}");
            assert!((395..=400).contains(&s.bytes_in_rate.unwrap()), "{s:?}");
            assert!(
                (3_950..=4_000).contains(&s.bytes_out_rate.unwrap()),
                "{s:?}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_millis(500), "not flushed");
    }
    let s = store.stats();
    assert_eq!(
        (s.finish_pending, s.finish_flushed, s.finish_dropped),
        (0, 50, 0)
    );

    // The pending map is bounded: past max_pending, entries are dropped and counted.
    let small = RedisStore::new(RedisConfig {
        max_pending: 10,
        sync_interval: Duration::from_secs(3_600),
        ..config(&server)
    })
    .unwrap();
    for k in &keys {
        small.finish("per-key", &spec, k, true, 0, 0);
    }
    let s = small.stats();
    assert_eq!((s.finish_pending, s.finish_dropped), (10, 40));
    assert_eq!(small.flush().await.unwrap(), 10);
    // A table that stores neither errors nor bytes records nothing.
    small.finish(
        "plain",
        &self::spec(&["http_req_cnt"]),
        &keys[0],
        true,
        5,
        5,
    );
    assert_eq!(small.stats().finish_pending, 0);
}

#[tokio::test]
async fn clear_removes_one_key_or_a_whole_table() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let spec = spec(&["http_req_cnt"]);
    for i in 0..300 {
        let k = Key::from(format!("ip-{i}").as_str());
        count(&store, "a", &spec, &k, 1).await;
        if i < 5 {
            count(&store, "a:b", &spec, &k, 1).await;
        }
    }
    let k7 = Key::from("ip-7");
    assert_eq!(store.clear("a", Some(&k7)).await.unwrap(), 1);
    assert_eq!(store.clear("a", Some(&k7)).await.unwrap(), 0);
    assert_eq!(store.get("a", &spec, &k7).await.unwrap(), None);
    assert_eq!(store.clear("a", None).await.unwrap(), 299);
    // Table `a:b` is another table, not a part of `a`.
    assert_eq!(store.clear("a", None).await.unwrap(), 0);
    assert!(store
        .get("a:b", &spec, &Key::from("ip-1"))
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.clear("a:b", None).await.unwrap(), 5);
}

#[tokio::test]
async fn a_100kb_key_makes_a_short_redis_key() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let spec = spec(&["http_req_cnt"]);
    let huge = Key::new(&vec![b'h'; 100_000]);
    let c = count(&store, "hdr", &spec, &huge, 1).await;
    assert_eq!(c.tables[0].http_req_cnt, Some(1));
    check_plan(&store, plan(&huge, Rate::per_second(1), 1)).await;
    let mut raw = server.raw();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert!(k.len() < 80, "{}", String::from_utf8_lossy(&k));
    }
}

#[tokio::test]
async fn a_flushed_script_is_loaded_again() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let spec = spec(&["http_req_cnt"]);
    let key = Key::from("k");
    count(&store, "t", &spec, &key, 1).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut server.raw())
        .unwrap();
    let c = count(&store, "t", &spec, &key, 1).await;
    assert_eq!(c.tables[0].http_req_cnt, Some(2));
}

/// The round-trip time of a typical check (one table, one plan) on loopback.
#[tokio::test]
async fn round_trip_time_on_loopback() {
    let server = Server::start();
    let store = RedisStore::new(config(&server)).unwrap();
    let spec = spec(&["http_req_rate(10s)", "http_req_cnt"]);
    let rate = Rate::per_second(1_000_000);
    let mut times = Vec::with_capacity(3_000);
    store.ping().await.ok();
    for i in 0..3_000u32 {
        let key = Key::from(format!("ip-{}", i % 100).as_str());
        let ops = [TableOp {
            table: "per-ip",
            spec: &spec,
            key: &key,
            requests: 1,
        }];
        let start = Instant::now();
        let c = store
            .check(&Check {
                tables: &ops,
                plan: Some(plan(&key, rate, 1_000)),
                quota: None,
            })
            .await
            .unwrap();
        times.push(start.elapsed());
        assert!(c.allowed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    println!(
        "check round trip on loopback: median {median:?}, p99 {p99:?}, stats mean {:?}",
        store.stats().mean_rtt()
    );
    assert!(median < Duration::from_millis(20), "{median:?}");
    // For scale: a bare PING on the same connection.
    let mut pings = Vec::with_capacity(1_000);
    for _ in 0..1_000 {
        pings.push(store.ping().await.unwrap());
    }
    pings.sort();
    println!("PING on loopback: median {:?}", pings[pings.len() / 2]);
}

/// A store that batches, syncing every `interval`.
fn batching(server: &Server, interval: Duration) -> RedisStore {
    RedisStore::new(RedisConfig {
        batch: Some(interval),
        ..config(server)
    })
    .unwrap()
}

#[tokio::test]
async fn batching_counts_hot_keys_here_and_sends_them_every_interval() {
    let server = Server::start();
    let spec = spec(&["http_req_rate(10s)", "http_req_cnt"]);
    let store = batching(&server, Duration::from_millis(50));
    let exact = RedisStore::new(config(&server)).unwrap();
    let key = Key::from("10.0.0.1");
    let mut last = None;
    for _ in 0..200 {
        last = Some(count(&store, "per-ip", &spec, &key, 1).await);
    }
    let last = last.unwrap();
    // This process's own requests are never missing from what it answers.
    assert_eq!(last.tables[0].http_req_cnt, Some(200));
    assert_eq!(last.tables[0].http_req_rate, Some(200));
    let s = store.stats();
    println!("{s:?}");
    assert!(s.batch_local >= 150, "most checks were local: {s:?}");
    assert!(s.round_trips < 50, "{s:?}");
    // Redis has them within an interval or two, without a flush.
    let deadline = Instant::now() + Duration::from_secs(2);
    let seen = loop {
        let seen = count(&exact, "per-ip", &spec, &key, 0).await.tables[0].http_req_cnt;
        if seen == Some(200) || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen, Some(200));
    // Another replica's requests reach this one's answers at the next sync.
    count(&exact, "per-ip", &spec, &key, 50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = count(&store, "per-ip", &spec, &key, 1).await;
    assert_eq!(c.tables[0].http_req_cnt, Some(251));
    store.flush().await.unwrap();
    let seen = count(&exact, "per-ip", &spec, &key, 0).await.tables[0].http_req_cnt;
    assert_eq!(seen, Some(251));
}

#[tokio::test]
async fn leases_never_let_a_fleet_past_its_plan() {
    let server = Server::start();
    // Leases of 50 (a tenth of the burst) that live the whole test: the strictest case.
    let replicas = [
        batching(&server, Duration::from_secs(10)),
        batching(&server, Duration::from_secs(10)),
    ];
    let rate = Rate::per_second(100);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let store = replicas[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            let key = Key::from("tenant-a");
            let mut allowed = 0u64;
            for _ in 0..100 {
                let c = check_plan(&store, plan(&key, rate, 500)).await;
                allowed += u64::from(c.allowed());
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    let refilled = (start.elapsed().as_secs_f64() * 100.0).ceil() as u64;
    let (a, b) = (replicas[0].stats(), replicas[1].stats());
    println!(
        "allowed {allowed} in {:?}\nA {a:?}\nB {b:?}",
        start.elapsed()
    );
    assert!(
        allowed <= 500 + refilled + 1,
        "{allowed} > burst 500 + {refilled} refilled"
    );
    assert!(allowed >= 450, "{allowed}: leases were left unspent");
    assert!(a.leases_taken + b.leases_taken >= 2, "{a:?} {b:?}");
    assert!(a.batch_local + b.batch_local >= 300, "{a:?} {b:?}");
}

#[tokio::test]
async fn unspent_leases_are_given_back() {
    let server = Server::start();
    let store = batching(&server, Duration::from_secs(10));
    let exact = RedisStore::new(config(&server)).unwrap();
    let key = Key::from("tenant-b");
    let rate = Rate::per_second(100);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let both = |store: RedisStore, cost: u64| {
        let key = key.clone();
        async move {
            let p = PlanOp {
                cost,
                ..plan(&key, rate, 500)
            };
            let q = QuotaOp {
                plan: "gold",
                key: &key,
                period_start: now - 60,
                period_end: now + 3_600,
                limit: 10_000,
                cost,
            };
            store
                .check(&Check {
                    tables: &[],
                    plan: Some(p),
                    quota: Some(q),
                })
                .await
                .unwrap()
        }
    };
    // The first check takes a lease of 50 and spends one; the answer counts the other 49 as
    // this caller's.
    let c = both(store.clone(), 1).await;
    let (p, q) = (c.plan.unwrap(), c.quota.unwrap());
    assert!(c.allowed());
    assert_eq!((p.remaining, q.used, q.remaining), (499, 1, 9_999));
    assert_eq!(store.stats().leases_taken, 1);
    // In Redis, all 50 are taken.
    let c = both(exact.clone(), 0).await;
    assert_eq!(c.quota.unwrap().used, 50);
    assert!(c.plan.unwrap().remaining <= 452, "{:?}", c.plan);
    // Spent from the lease: no round trip.
    let trips = store.stats().round_trips;
    let c = both(store.clone(), 1).await;
    assert_eq!(store.stats().round_trips, trips);
    assert_eq!(c.quota.unwrap().used, 2);
    // A flush gives back the 48 not spent.
    store.flush().await.unwrap();
    let c = both(exact, 0).await;
    assert_eq!(c.quota.unwrap().used, 2);
    assert!(c.plan.unwrap().remaining >= 498, "{:?}", c.plan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_lease_fetch() {
    let server = Server::start();
    let store = batching(&server, Duration::from_millis(100));
    // Leases of 1,000: 64 callers at once take 12,800 tokens.
    let rate = Rate::per_second(1_000_000);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = Key::from("hot-key");
            for _ in 0..200 {
                assert!(check_plan(&store, plan(&key, rate, 1_000_000))
                    .await
                    .allowed());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = store.stats();
    println!("{s:?}");
    // 13 leases would do; each one taken while others wait, never one per waiting caller.
    assert!(s.leases_taken <= 40, "{s:?}");
    assert!(s.round_trips <= 80, "{s:?}");
    assert!(s.batch_local >= 12_000, "{s:?}");
}

#[tokio::test]
async fn top_lists_the_fleets_biggest_entries() {
    let server = Server::start();
    let spec = spec(&["http_req_cnt", "http_req_rate(10s)"]);
    let (a, b) = (
        RedisStore::new(config(&server)).unwrap(),
        RedisStore::new(config(&server)).unwrap(),
    );
    // Counts split across two replicas; a key too long to keep (stored hashed); and an
    // entry of another table that must not be listed.
    let long = Key::new(&vec![b'x'; 5_000]);
    for (store, key, n) in [
        (&a, Key::from("10.0.0.1"), 5),
        (&b, Key::from("10.0.0.1"), 4),
        (&a, Key::from("10.0.0.2"), 3),
        (&b, Key::from("~tilde"), 7),
        (&a, long.clone(), 8),
        (&b, Key::from("10.0.0.3"), 1),
    ] {
        count(store, "per-ip", &spec, &key, n).await;
    }
    count(&a, "per-ip-2", &spec, &Key::from("10.0.0.9"), 100).await;
    let top = a
        .top(
            "per-ip",
            &spec,
            portcullis_limits::Kind::HttpReqCnt,
            3,
            1_000,
        )
        .await
        .unwrap();
    let got: Vec<(Key, Option<u64>)> = top
        .entries
        .iter()
        .map(|(k, s)| (k.clone(), s.http_req_cnt))
        .collect();
    assert_eq!(
        got,
        [
            (Key::from("10.0.0.1"), Some(9)),
            (long, Some(8)),
            (Key::from("~tilde"), Some(7)),
        ]
    );
    assert_eq!((top.scanned, top.truncated), (5, false));
    let top = b
        .top("per-ip", &spec, portcullis_limits::Kind::HttpReqCnt, 10, 2)
        .await
        .unwrap();
    assert_eq!(
        (top.scanned, top.truncated, top.entries.len()),
        (2, true, 2)
    );
}

#[tokio::test]
async fn tags_are_shared_by_every_replica() {
    let server = Server::start();
    let tagged = spec(&["http_req_cnt", "tags"]);
    let (a, b) = (
        RedisStore::new(config(&server)).unwrap(),
        RedisStore::new(config(&server)).unwrap(),
    );
    let key = Key::from("10.0.0.7");
    assert!(a
        .tag("per-ip", &tagged, &key, "abuser", true)
        .await
        .unwrap());
    assert!(
        !a.tag("per-ip", &tagged, &key, "abuser", true)
            .await
            .unwrap(),
        "already there"
    );
    assert!(b.tag("per-ip", &tagged, &key, "seen", true).await.unwrap());
    // A check on the other replica reads them with the counts.
    let c = count(&b, "per-ip", &tagged, &key, 1).await;
    assert_eq!(c.tables[0].tags, ["abuser", "seen"]);
    assert_eq!(c.tables[0].http_req_cnt, Some(1));
    assert!(a
        .tag("per-ip", &tagged, &key, "abuser", false)
        .await
        .unwrap());
    let got = b.get("per-ip", &tagged, &key).await.unwrap().unwrap();
    assert_eq!(got.tags, ["seen"]);
    // At most 16: the 17th is refused with the fix.
    let other = Key::from("10.0.0.8");
    for i in 0..16 {
        a.tag("per-ip", &tagged, &other, &format!("t{i}"), true)
            .await
            .unwrap();
    }
    let e = a
        .tag("per-ip", &tagged, &other, "t16", true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("at most 16 tags"), "{e}");
    // A table without tags refuses them.
    let plain = spec(&["http_req_cnt"]);
    assert!(a.tag("per-ip", &plain, &key, "x", true).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_usage_adds_up_across_replicas_once_per_batch() {
    use portcullis_limits::redis::usage::{UsageBatch, UsageRecord};
    use portcullis_limits::StoredKey;
    let server = Server::start();
    let (a, b) = (
        RedisStore::new(config(&server)).unwrap(),
        RedisStore::new(config(&server)).unwrap(),
    );
    let alice = StoredKey::of(&Key::from("dev/alice"));
    // A key too long to keep whole is kept by its digest, and reads back as it.
    let long = StoredKey::of(&Key::from(format!("agents/{}", "x".repeat(300)).as_str()));
    assert!(long.is_hashed());
    let rec = |plan: &str, key: &StoredKey, day: i64, count: u64| UsageRecord {
        plan: plan.into(),
        key: key.clone(),
        day,
        count,
    };
    // Today: a day's hash expires 400 days after it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = now / 86_400;
    let one = UsageBatch::split(vec![
        rec("agents", &alice, day - 1, 2),
        rec("agents", &alice, day, 5),
        rec("agents", &long, day, 1),
        rec("visitors:eu", &alice, day, 4),
    ]);
    let two = UsageBatch::split(vec![rec("agents", &alice, day, 3)]);
    assert!(a.add_usage(&one[0]).await.unwrap());
    assert!(b.add_usage(&two[0]).await.unwrap());
    // Sent again (say after a timeout): counted once.
    assert!(!a.add_usage(&one[0]).await.unwrap());
    assert!(!b.add_usage(&two[0]).await.unwrap());

    let all = b.usage(None, None, day - 30, day).await.unwrap();
    assert_eq!(
        all,
        vec![
            rec("agents", &alice, day - 1, 2),
            rec("agents", &alice, day, 8),
            rec("agents", &long, day, 1),
            rec("visitors:eu", &alice, day, 4),
        ]
    );
    assert_eq!(
        a.usage(Some("agents"), Some(&alice), day, day)
            .await
            .unwrap(),
        vec![rec("agents", &alice, day, 8)]
    );
    assert!(a
        .usage(Some("gold"), None, day - 365, day)
        .await
        .unwrap()
        .is_empty());
    // The day hashes expire 400 days after their day, and are named for it.
    let mut raw = server.raw();
    let ttl: i64 = redis::cmd("EXPIRETIME")
        .arg(format!(
            "pc-test:u:visitors%3Aeu:{}",
            portcullis_limits::quota::day_string(day)
        ))
        .query(&mut raw)
        .unwrap();
    assert_eq!(ttl, (day + 401) * 86_400);

    // Quota use as the check script counts it, for the keys asked, in order.
    let start = 1_800_000_000;
    let quota = |key| QuotaOp {
        plan: "agents",
        key,
        period_start: start,
        period_end: start + 86_400,
        limit: u64::MAX >> 12,
        cost: 6,
    };
    let long_key = long.key();
    check_quota(&a, quota(&long_key)).await;
    check_quota(&b, quota(&long_key)).await;
    assert_eq!(
        b.quota_used("agents", start, &[alice.clone(), long.clone()])
            .await
            .unwrap(),
        vec![0, 12]
    );
}
