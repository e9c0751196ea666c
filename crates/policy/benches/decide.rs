//! The cost of one authorization decision at scale: 10,000 routes and 10,000 policies, spread
//! the way a large deployment spreads them (global files, app bundle files, per-route files
//! and shorthand `allow`/`deny` rules), written to a temp dir, loaded with
//! `portcullis_config::load` and built with `Engine::build`, as the proxy does.
//!
//! Criterion measures a decision on a route in the middle (an allow and a default deny).
//! Criterion reports means and medians, so the bench also times 100,000 single calls itself
//! and prints p50/p99/p99.9 (the target is p99 ≤ 50 µs for a decision served from no
//! cache), in wall-clock time and in the thread's CPU time (which leaves out preemption by
//! other processes). It does the same on a config of 10 routes whose middle route has the
//! same 19 policies, to show that the cost depends on the route's own policies, not on how
//! many routes and policies there are.
//!
//! The engine caches principals and decisions, so each case is timed on its own path:
//! - `uncached`: `decide_uncached`, which reads and writes no cache (the target's figure);
//! - `new identity`: `decide` with a fresh `Arc<Identity>` each call (as a new token or a
//!   session that is not shared would be): both caches miss and are filled;
//! - `new path`: `decide` with the same identity and a different path each call: the
//!   principal is cached, the decision is not (the route's policies read `context.path`);
//! - `cached`: `decide` with the same identity and request: a decision-cache hit, as the
//!   proxy gets on repeated requests with one token.
//!
//! `cargo bench -p portcullis-policy --bench decide -- --quick`

use criterion::{criterion_group, criterion_main, Criterion};

use portcullis_identity::{AuthMethod, Identity};
use portcullis_policy::{Engine, RequestInfo};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator of the `portcullis` binary, so the figures are the proxy's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APPS: usize = 10;
const ROUTES_PER_APP: usize = 1_000;
const GLOBAL_POLICIES: usize = 10;
const APP_POLICIES: usize = 5;
/// Routes with a policy file of their own (two policies each).
const ROUTES_WITH_FILES: usize = 2_470;
/// Routes with shorthand rules (one `allow` each; every tenth also one `deny`).
const ROUTES_WITH_RULES: usize = 4_545;

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

/// The shape of a generated config.
struct Shape {
    apps: usize,
    per_app: usize,
    /// Policies in the global file.
    global: usize,
    /// Policies in each app's file.
    app_policies: usize,
    /// Routes with a policy file of their own (two policies each).
    with_files: usize,
    /// Routes with an `allow` rule.
    with_rules: usize,
    /// Every `deny_every`-th route with rules also gets a `deny` rule.
    deny_every: usize,
}

/// Writes a config of `apps` × `per_app` routes and returns (root file, policy count). The
/// routes with files and the routes with rules are centred on the middle route, which gets
/// both.
fn write_config(dir: &Path, shape: &Shape) -> (std::path::PathBuf, usize) {
    let &Shape {
        apps,
        per_app,
        global,
        app_policies,
        with_files,
        with_rules,
        deny_every,
    } = shape;
    let routes = apps * per_app;
    let mut policies = 0;
    // Global policies: every route that requires identity gets these.
    let mut g = String::new();
    for i in 0..global {
        let _ = writeln!(
            g,
            "@id(\"global-{i}\")\nforbid(principal, action, resource) when {{ context.path like \"/blocked-{i}/*\" }};\n"
        );
        policies += 1;
    }
    write(dir, "policies/global.cedar", &g);
    let mut root = String::from(
        "listeners:\n  - { name: web, bind: \"127.0.0.1:8080\" }\n\
         identity:\n  providers: [{ name: dev, kind: dev_issuer }]\n\
         policy: { context_headers: [x-tenant] }\n\
         policies: [policies/global.cedar]\n\
         apps:\n  include: [\"apps/*.yaml\"]\n",
    );
    if global == 0 {
        root = root.replace("policies: [policies/global.cedar]\n", "");
    }
    write(dir, "portcullis.yaml", &root);

    let centred = |n: usize, count: usize| {
        let start = (routes - count) / 2;
        n >= start && n < start + count
    };
    for a in 0..apps {
        let app = format!("app{a:02}");
        let mut ap = String::new();
        let app_rules = [
            format!("permit(principal in Portcullis::Group::\"{app}-admins\", action, resource);"),
            "permit(principal is Portcullis::Agent, action in Portcullis::Action::\"read\", resource);".to_string(),
            "forbid(principal, action, resource) when { context.headers has \"x-tenant\" && context.headers[\"x-tenant\"] == \"blocked\" };".to_string(),
            "forbid(principal, action in Portcullis::Action::\"write\", resource) when { context.time.weekday == \"sun\" };".to_string(),
            "permit(principal, action in Portcullis::Action::\"read\", resource) when { principal.hasTag(\"dept\") && principal.getTag(\"dept\") == \"audit\" };".to_string(),
        ];
        for (i, rule) in app_rules.iter().cycle().take(app_policies).enumerate() {
            let _ = writeln!(ap, "@id(\"{app}-{i}\")\n{rule}\n");
            policies += 1;
        }
        let app_policy_line = if app_policies > 0 {
            write(dir, &format!("apps/{app}/app.cedar"), &ap);
            format!("policies: [{app}/app.cedar]\n")
        } else {
            String::new()
        };
        let mut y = format!(
            "name: {app}\n{app_policy_line}backends:\n  - {{ name: b, servers: [{{ address: \"builtin:echo\" }}] }}\nroutes:\n"
        );
        for r in 0..per_app {
            let n = a * per_app + r;
            let name = format!("r{r:04}");
            let id = format!("{app}/{name}");
            let _ = write!(
                y,
                "  - name: {name}\n    match: {{ host: {app}.example.com, path_prefix: /{name}/ }}\n    backend: b\n    auth: [dev]\n"
            );
            if centred(n, with_files) {
                let file = format!("{app}/routes/{name}.cedar");
                write(
                    dir,
                    &format!("apps/{file}"),
                    &format!(
                        "@id(\"{id}/read\")\n\
                         permit(principal in Portcullis::Group::\"team-{t}\", action in Portcullis::Action::\"read\", resource == Portcullis::Route::\"{id}\")\n\
                         when {{ context.path like \"/{name}/*\" }};\n\n\
                         @id(\"{id}/night-writes\")\n\
                         forbid(principal, action in Portcullis::Action::\"write\", resource == Portcullis::Route::\"{id}\")\n\
                         when {{ (context.time.hour < 6 || context.time.hour > 22) && !context.ip.isInRange(ip(\"10.0.0.0/8\")) }};\n",
                        t = n % 50
                    ),
                );
                policies += 2;
                let _ = writeln!(y, "    policies: [{file}]");
            }
            if centred(n, with_rules) {
                let _ = writeln!(
                    y,
                    "    allow:\n      - {{ groups: [team-{t}, ops], methods: [GET, POST], paths: [\"/{name}/**\"] }}",
                    t = n % 50
                );
                policies += 1;
                if n.is_multiple_of(deny_every) {
                    let _ = writeln!(y, "    deny:\n      - {{ cidrs: [\"192.168.0.0/16\"] }}");
                    policies += 1;
                }
            }
        }
        write(dir, &format!("apps/{app}.yaml"), &y);
    }
    (dir.join("portcullis.yaml"), policies)
}

fn identity(groups: &[&str]) -> Arc<Identity> {
    Arc::new(Identity {
        provider: "dev".into(),
        method: AuthMethod::Jwt,
        subject: "alice".into(),
        user: "alice".into(),
        email: Some("alice@example.com".into()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        claims: serde_json::json!({ "sub": "alice", "dept": "eng", "level": 3, "tenant": "acme" }),
        expires_at: None,
    })
}

fn request<'a>(
    id: &'a Arc<Identity>,
    headers: &'a http::HeaderMap,
    host: &'a str,
    path: &'a str,
) -> RequestInfo<'a> {
    RequestInfo {
        identity: id,
        method: "GET",
        host,
        path,
        route_path: path,
        query: Some("page=2&sort=desc"),
        headers,
        client_ip: "10.1.2.3".parse().unwrap(),
        tls_client_subject: None,
        tls_client_cert: false,
        request_id: "0123456789abcdef0123456789abcdef",
        now: None,
        limits: None,
    }
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
}

impl Percentiles {
    fn of(mut t: Vec<Duration>) -> Percentiles {
        t.sort_unstable();
        let n = t.len();
        let at = |q: f64| t[((n as f64 * q) as usize).min(n - 1)];
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: t[n - 1],
        }
    }
}

/// CPU time of the calling thread: unlike wall time, it leaves out the time the thread spent
/// preempted, which on a shared, busy machine is most of the tail.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Times `n` single calls of `f` (after a warm-up), each on an input made by `setup`
/// outside the timed span: wall-clock and thread-CPU percentiles.
fn percentiles<S>(
    n: usize,
    mut setup: impl FnMut(usize) -> S,
    mut f: impl FnMut(S),
) -> (Percentiles, Percentiles) {
    for i in 0..n / 10 {
        f(setup(n + i));
    }
    let mut wall = Vec::with_capacity(n);
    let mut cpu = Vec::with_capacity(n);
    for i in 0..n {
        let input = setup(i);
        let c = thread_cpu_time();
        let s = Instant::now();
        f(input);
        wall.push(s.elapsed());
        cpu.push(thread_cpu_time().saturating_sub(c));
    }
    (Percentiles::of(wall), Percentiles::of(cpu))
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

struct Setup {
    _dir: tempfile::TempDir,
    engine: Engine,
    policies: usize,
    routes: usize,
    build: Duration,
}

fn setup(shape: &Shape) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (root, policies) = write_config(dir.path(), shape);
    let start = Instant::now();
    let cfg = portcullis_config::load(&root).unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::build(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let build = start.elapsed();
    assert_eq!(cfg.routes.len(), shape.apps * shape.per_app);
    Setup {
        _dir: dir,
        engine,
        policies,
        routes: cfg.routes.len(),
        build,
    }
}

fn print(what: &str, n: usize, (wall, cpu): (Percentiles, Percentiles), target: bool) {
    for (clock, p) in [("wall", wall), ("cpu ", cpu)] {
        println!(
            "  {what:22} {clock} over {n} calls: p50 {:6.1} µs  p99 {:6.1} µs  p99.9 {:7.1} µs  max {:8.1} µs{}",
            us(p.p50),
            us(p.p99),
            us(p.p999),
            us(p.max),
            match (target, p.p99 <= Duration::from_micros(50)) {
                (false, _) => "",
                (true, true) => "  (p99 ≤ 50 µs: met)",
                (true, false) => "  (p99 ≤ 50 µs: MISSED)",
            }
        );
    }
}

fn report(label: &str, s: &Setup, route: &str, allow: &RequestInfo<'_>, deny: &RequestInfo<'_>) {
    const N: usize = 100_000;
    println!(
        "\n{label}: {} routes, {} policies, load+build {:.2} s, route {route}",
        s.routes,
        s.policies,
        s.build.as_secs_f64()
    );
    for (what, r) in [("allow", allow), ("deny", deny)] {
        let t = percentiles(
            N,
            |_| (),
            |()| {
                black_box(s.engine.decide_uncached(black_box(route), black_box(r)));
            },
        );
        print(&format!("uncached {what}"), N, t, true);
    }
    // A fresh identity each call: the caches miss (and are filled).
    let t = percentiles(
        N,
        |_| Arc::new((**allow.identity).clone()),
        |id| {
            let r = RequestInfo {
                identity: &id,
                ..*allow
            };
            black_box(s.engine.decide(black_box(route), black_box(&r)));
        },
    );
    print("new identity allow", N, t, true);
    // The same identity, a new path each call: the principal is cached, the decision not.
    let prefix = allow.path.trim_end_matches(|c: char| c != '/');
    let t = percentiles(
        N,
        |i| format!("{prefix}{i}"),
        |path| {
            let r = RequestInfo {
                path: &path,
                route_path: &path,
                ..*allow
            };
            let d = s.engine.decide(black_box(route), black_box(&r));
            assert!(d.allowed);
            black_box(d);
        },
    );
    print("new path allow", N, t, true);
    for (what, r) in [("allow", allow), ("deny", deny)] {
        let t = percentiles(
            N,
            |_| (),
            |()| {
                black_box(s.engine.decide(black_box(route), black_box(r)));
            },
        );
        print(&format!("cached {what}"), N, t, false);
    }
    let (principals, decisions) = s.engine.cached();
    println!("  cache entries: {principals} principals, {decisions} decisions");
}

fn decide(c: &mut Criterion) {
    let big = setup(&Shape {
        apps: APPS,
        per_app: ROUTES_PER_APP,
        global: GLOBAL_POLICIES,
        app_policies: APP_POLICIES,
        with_files: ROUTES_WITH_FILES,
        with_rules: ROUTES_WITH_RULES,
        deny_every: 10,
    });
    assert_eq!(big.policies, 10_000, "the bench is about 10,000 policies");
    // The same middle route (the same 19 policies decide it), in a config of 10 routes.
    let small = setup(&Shape {
        apps: 1,
        per_app: 10,
        global: GLOBAL_POLICIES,
        app_policies: APP_POLICIES,
        with_files: 1,
        with_rules: 1,
        deny_every: 1,
    });
    assert_eq!(small.policies, 19);

    // The route in the middle has all four kinds: global, app, route file and rules.
    let route = "app05/r0000";
    let host = "app05.example.com";
    let path = "/r0000/orders/42";
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("x-tenant", "acme".parse().unwrap());
        h.insert("user-agent", "bench".parse().unwrap());
        h
    };
    // Route 5000 (and route 4 of the small config) is team-0's.
    let member = identity(&["team-0", "team-4", "staff"]);
    let stranger = identity(&["staff"]);
    let allow = request(&member, &headers, host, path);
    let deny = request(&stranger, &headers, host, path);
    let d = big.engine.decide_uncached(route, &allow);
    assert_eq!(*big.engine.decide(route, &allow), d);
    assert_eq!(*big.engine.decide(route, &allow), d, "cached");
    assert!(d.allowed, "{d:?}");
    let mut reasons = d.reasons.clone();
    reasons.sort();
    assert_eq!(
        reasons,
        ["app05/r0000/allow[1]", "app05/r0000/read"],
        "{d:?}"
    );
    assert!(d.errors.is_empty(), "{d:?}");
    let d = big.engine.decide_uncached(route, &deny);
    assert_eq!(*big.engine.decide(route, &deny), d);
    assert_eq!(*big.engine.decide(route, &deny), d, "cached");
    assert!(
        !d.allowed && d.reasons.is_empty() && d.errors.is_empty(),
        "{d:?}"
    );

    let small_route = "app00/r0004";
    let small_allow = request(&member, &headers, "app00.example.com", "/r0004/x");
    let small_deny = request(&stranger, &headers, "app00.example.com", "/r0004/x");
    assert!(small.engine.decide(small_route, &small_allow).allowed);
    assert!(!small.engine.decide(small_route, &small_deny).allowed);

    report("10k config", &big, route, &allow, &deny);
    report(
        "10-route config",
        &small,
        small_route,
        &small_allow,
        &small_deny,
    );

    let mut g = c.benchmark_group("decide");
    g.bench_function("10k_routes_10k_policies/allow/uncached", |b| {
        b.iter(|| {
            big.engine
                .decide_uncached(black_box(route), black_box(&allow))
        })
    });
    g.bench_function("10k_routes_10k_policies/default_deny/uncached", |b| {
        b.iter(|| {
            big.engine
                .decide_uncached(black_box(route), black_box(&deny))
        })
    });
    g.bench_function("10_routes_19_policies/allow/uncached", |b| {
        b.iter(|| {
            small
                .engine
                .decide_uncached(black_box(small_route), black_box(&small_allow))
        })
    });
    g.bench_function("10k_routes_10k_policies/allow/cached", |b| {
        b.iter(|| big.engine.decide(black_box(route), black_box(&allow)))
    });
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
