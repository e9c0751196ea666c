//! The policy engine against real config files: Cedar policies on groups, methods, paths,
//! addresses and time; schema errors located by line and column; shorthand rules; deny
//! beating allow; default deny.

use portcullis_identity::{AuthMethod, Identity};
use portcullis_policy::{Decision, Engine, RequestInfo};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn config(dir: &Path, routes: &str) -> portcullis_config::Config {
    write(
        dir,
        "p.yaml",
        &format!(
            "identity:\n  providers: [{{ name: dev, kind: dev_issuer }}]\npolicy: {{ context_headers: [x-tenant] }}\nbackends: [{{ name: b, servers: [{{ address: builtin:echo }}] }}]\nroutes:\n{routes}"
        ),
    );
    portcullis_config::load(&dir.join("p.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn who(user: &str, groups: &[&str]) -> Arc<Identity> {
    Arc::new(Identity {
        provider: "dev".into(),
        method: AuthMethod::Jwt,
        subject: user.into(),
        user: user.into(),
        email: Some(format!("{user}@example.com")),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        claims: serde_json::json!({ "dept": "sales", "level": 3 }),
        expires_at: None,
    })
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    ip: &'a str,
    at: SystemTime,
    headers: http::HeaderMap,
}

impl Default for Req<'_> {
    fn default() -> Self {
        Req {
            method: "GET",
            path: "/",
            ip: "10.1.2.3",
            // A Monday, 10:00 UTC.
            at: UNIX_EPOCH + Duration::from_secs(1_700_474_400),
            headers: http::HeaderMap::new(),
        }
    }
}

fn decide(e: &Engine, route: &str, id: &Arc<Identity>, r: Req<'_>) -> Arc<Decision> {
    let ip: IpAddr = r.ip.parse().unwrap();
    e.decide(
        route,
        &RequestInfo {
            identity: id,
            method: r.method,
            host: "h",
            path: r.path,
            route_path: r.path,
            query: Some("a=1&b"),
            headers: &r.headers,
            client_ip: ip,
            tls_client_subject: None,
            tls_client_cert: false,
            request_id: "rid",
            now: Some(r.at),
            limits: None,
        },
    )
}

#[test]
fn cedar_policies_on_groups_methods_paths_ips_and_time() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "policies/api.cedar",
        r#"
@id("eng-read")
permit(principal in Portcullis::Group::"eng", action in Portcullis::Action::"read", resource);

@id("ops-write-internal")
permit(principal in Portcullis::Group::"ops", action in Portcullis::Action::"write", resource)
when { context.ip.isInRange(ip("10.0.0.0/8")) && context.path like "/admin/*" };

@id("business-hours")
forbid(principal, action, resource)
when { context.time.hour < 7 || context.time.hour > 19 };

@id("tenant-header")
permit(principal, action, resource)
when { context.headers has "x-tenant" && context.headers["x-tenant"] == "acme" && principal.hasTag("dept") && principal.getTag("dept") == "sales" };
"#,
    );
    let c = config(
        d.path(),
        "  - { name: api, match: { path_prefix: / }, backend: b, auth: [dev], policies: [\"policies/*.cedar\"] }\n",
    );
    let e = Engine::build(&c).unwrap();
    let r = "default/api";
    let eng = who("alice", &["eng"]);
    let ops = who("olga", &["ops"]);
    let d1 = decide(&e, r, &eng, Req::default());
    assert!(d1.allowed, "{d1:?}");
    assert_eq!(d1.reasons, vec!["eng-read"]);
    assert!(
        !decide(
            &e,
            r,
            &eng,
            Req {
                method: "POST",
                ..Default::default()
            }
        )
        .allowed,
        "eng cannot write"
    );
    assert!(
        decide(
            &e,
            r,
            &ops,
            Req {
                method: "POST",
                path: "/admin/x",
                ..Default::default()
            }
        )
        .allowed
    );
    assert!(
        !decide(
            &e,
            r,
            &ops,
            Req {
                method: "POST",
                path: "/other",
                ..Default::default()
            }
        )
        .allowed
    );
    assert!(
        !decide(
            &e,
            r,
            &ops,
            Req {
                method: "POST",
                path: "/admin/x",
                ip: "192.168.1.1",
                ..Default::default()
            }
        )
        .allowed
    );
    let night = decide(
        &e,
        r,
        &eng,
        Req {
            at: UNIX_EPOCH + Duration::from_secs(1_700_474_400 + 12 * 3600),
            ..Default::default()
        },
    );
    assert!(!night.allowed);
    assert_eq!(
        night.reasons,
        vec!["business-hours"],
        "deny wins, and says which policy"
    );
    let mut h = http::HeaderMap::new();
    h.insert("x-tenant", "acme".parse().unwrap());
    assert!(
        decide(
            &e,
            r,
            &who("sam", &[]),
            Req {
                method: "DELETE",
                headers: h,
                ..Default::default()
            }
        )
        .allowed
    );
    let nobody = decide(
        &e,
        r,
        &who("nobody", &[]),
        Req {
            method: "DELETE",
            ..Default::default()
        },
    );
    assert!(!nobody.allowed && nobody.reasons.is_empty(), "default deny");
}

#[test]
fn schema_errors_are_located_by_line_and_column() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "bad.cedar",
        "permit(principal, action, resource);\n\npermit(principal, action, resource)\nwhen { principal.emial == \"x\" };\n",
    );
    let c = config(
        d.path(),
        "  - { name: api, backend: b, auth: [dev], policies: [bad.cedar] }\n",
    );
    let err = Engine::build(&c).err().expect("a schema error").to_string();
    assert!(err.contains("bad.cedar:4:"), "{err}");
    assert!(err.contains("emial"), "{err}");
    write(
        d.path(),
        "bad.cedar",
        "permit(principal, action, resource) when { Portcullis::Usr::\"a\" == principal };\n",
    );
    let err = Engine::build(&c).err().expect("a type error").to_string();
    assert!(err.contains("bad.cedar:1:"), "{err}");
    write(
        d.path(),
        "bad.cedar",
        "permit(principal, action, resource) when { ;\n",
    );
    let err = Engine::build(&c).err().expect("a syntax error").to_string();
    assert!(err.contains("bad.cedar:1:"), "{err}");
}

#[test]
fn shorthand_rules_deny_wins_and_default_deny() {
    let d = tempfile::tempdir().unwrap();
    let c = config(
        d.path(),
        "  - name: api\n    backend: b\n    auth: [dev]\n    allow:\n      - { groups: [eng] }\n      - { users: [bob], methods: [GET] }\n      - { claims: { dept: sales }, paths: [\"/reports/**\"] }\n    deny:\n      - { cidrs: [\"192.168.0.0/16\"] }\n  - { name: closed, backend: b, auth: [dev] }\n",
    );
    let e = Engine::build(&c).unwrap();
    let r = "default/api";
    let d1 = decide(&e, r, &who("alice", &["eng"]), Req::default());
    assert_eq!(d1.reasons, vec!["default/api/allow[1]"]);
    assert!(decide(&e, r, &who("bob", &[]), Req::default()).allowed);
    let bp = decide(
        &e,
        r,
        &who("bob", &[]),
        Req {
            method: "POST",
            ..Default::default()
        },
    );
    assert!(!bp.allowed, "{bp:?}");
    assert!(
        decide(
            &e,
            r,
            &who("sally", &[]),
            Req {
                path: "/reports/q3/x",
                ..Default::default()
            }
        )
        .allowed
    );
    let blocked = decide(
        &e,
        r,
        &who("alice", &["eng"]),
        Req {
            ip: "192.168.4.4",
            ..Default::default()
        },
    );
    assert!(!blocked.allowed);
    assert_eq!(blocked.reasons, vec!["default/api/deny[1]"]);
    assert!(
        !decide(
            &e,
            "default/closed",
            &who("alice", &["eng"]),
            Req::default()
        )
        .allowed,
        "no rule: deny"
    );
}

/// A shorthand rule that does not fit the schema is reported at the rule in the YAML file
/// that defines its route, an app bundle included: `file:line:col` of `routes[N].allow[i]`
/// (or `deny[i]`), with the other problems found in the same build.
#[test]
fn bad_shorthand_rules_are_located_in_their_own_file() {
    let d = tempfile::tempdir().unwrap();
    // Cedar refuses IPv6 addresses written with an embedded IPv4 address, which is how an
    // IPv4-mapped range prints.
    write(
        d.path(),
        "apps/billing.yaml",
        "\
name: billing
backends:
  - { name: v2, servers: [{ address: builtin:echo }] }
routes:
  - { name: open, backend: v2, public: true }
  - name: api
    backend: v2
    auth: [dev]
    allow:
      - { groups: [eng] }
      - groups: [ops]
        cidrs: [\"::ffff:10.0.0.0/104\"]
",
    );
    let c = config(
        d.path(),
        "  - name: api\n    backend: b\n    auth: [dev]\n    deny:\n      - { cidrs: [\"::ffff:192.168.0.0/112\"] }\napps: { include: [\"apps/*.yaml\"] }\n",
    );
    let Err(portcullis_policy::Error::Invalid(problems)) = Engine::build(&c) else {
        panic!("the bad rules are refused");
    };
    let app = d.path().join("apps/billing.yaml");
    let root = d.path().join("p.yaml");
    let at: Vec<(&Path, usize, usize)> = problems
        .iter()
        .map(|p| (p.file.as_path(), p.line, p.col))
        .collect();
    assert_eq!(
        at,
        [(root.as_path(), 10, 9), (app.as_path(), 11, 9)],
        "{problems:#?}"
    );
    assert!(
        problems[0].message.contains("default/api/deny[1]"),
        "{}",
        problems[0]
    );
    let shown = problems[1].to_string();
    assert!(
        shown.starts_with(&format!("{}:11:9: ", app.display()))
            && shown.contains("billing/api/allow[2]")
            && shown.contains("::ffff:10.0.0.0/104"),
        "{shown}"
    );
}

/// A request with every field settable, for the cache tests.
struct Full<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    ip: &'a str,
    at: SystemTime,
    tenant: Option<&'a str>,
    request_id: &'a str,
}

impl Default for Full<'_> {
    fn default() -> Self {
        Full {
            method: "GET",
            path: "/",
            query: None,
            ip: "10.1.2.3",
            at: UNIX_EPOCH + Duration::from_secs(1_700_474_400),
            tenant: None,
            request_id: "rid",
        }
    }
}

/// `decide` twice (the second may come from the cache) and `decide_uncached`: all three
/// must agree. Returns the decision.
fn checked(e: &Engine, route: &str, id: &Arc<Identity>, r: &Full<'_>) -> Decision {
    let mut headers = http::HeaderMap::new();
    if let Some(t) = r.tenant {
        headers.insert("x-tenant", t.parse().unwrap());
    }
    let info = RequestInfo {
        identity: id,
        method: r.method,
        host: "h",
        path: r.path,
        route_path: r.path,
        query: r.query,
        headers: &headers,
        client_ip: r.ip.parse().unwrap(),
        tls_client_subject: None,
        tls_client_cert: false,
        request_id: r.request_id,
        now: Some(r.at),
        limits: None,
    };
    let fresh = e.decide_uncached(route, &info);
    let first = e.decide(route, &info);
    let second = e.decide(route, &info);
    assert_eq!(*first, fresh, "{route} {}", r.path);
    assert_eq!(*second, fresh, "{route} {} (cached)", r.path);
    fresh
}

const CACHE_POLICIES: &str = r#"
@id("eng-reports")
permit(principal in Portcullis::Group::"eng", action in Portcullis::Action::"read", resource)
when { context.path like "/reports/*" };

@id("ops-anything")
permit(principal in Portcullis::Group::"ops", action, resource);

@id("blocked-tenant")
forbid(principal, action, resource)
when { context.headers has "x-tenant" && context.headers["x-tenant"] == "blocked" };

@id("outside")
forbid(principal, action in Portcullis::Action::"write", resource)
when { !context.ip.isInRange(ip("10.0.0.0/8")) };

@id("night")
forbid(principal, action, resource)
when { context.time.hour < 7 || context.time.hour > 19 };

@id("debug-query")
forbid(principal, action, resource) when { context.query.contains("debug=1") };
"#;

fn cache_engine(d: &Path) -> Engine {
    write(d, "policies/api.cedar", CACHE_POLICIES);
    write(
        d,
        "policies/rid.cedar",
        r#"
@id("rid-ok")
permit(principal, action, resource == Portcullis::Route::"default/rid") when { context.request_id != "bad" };
"#,
    );
    write(
        d,
        "policies/stamp.cedar",
        r#"
@id("stamp")
permit(principal, action, resource == Portcullis::Route::"default/stamp") when { context.time.timestamp == 1700474400 };
"#,
    );
    let c = config(
        d,
        "  - { name: api, match: { path_prefix: / }, backend: b, auth: [dev], policies: [policies/api.cedar] }\n\
         \x20 - { name: rid, match: { path_prefix: /rid }, backend: b, auth: [dev], policies: [policies/rid.cedar] }\n\
         \x20 - { name: stamp, match: { path_prefix: /stamp }, backend: b, auth: [dev], policies: [policies/stamp.cedar] }\n",
    );
    Engine::build(&c).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn cache_same_identity_different_path() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let r = "default/api";
    let alice = who("alice", &["eng"]);
    let ok = Full {
        path: "/reports/q3",
        ..Default::default()
    };
    assert!(checked(&e, r, &alice, &ok).allowed);
    let other = Full {
        path: "/admin",
        ..Default::default()
    };
    let d2 = checked(&e, r, &alice, &other);
    assert!(!d2.allowed && d2.reasons.is_empty(), "{d2:?}");
    // Method: a write is not a read, with the same path.
    assert!(
        !checked(
            &e,
            r,
            &alice,
            &Full {
                method: "POST",
                ..ok
            }
        )
        .allowed
    );
    // The query is part of the key when a policy reads it.
    let dq = checked(
        &e,
        r,
        &alice,
        &Full {
            query: Some("debug=1"),
            ..ok
        },
    );
    assert_eq!(dq.reasons, vec!["debug-query"]);
    assert!(
        checked(
            &e,
            r,
            &alice,
            &Full {
                query: Some("debug=0"),
                ..ok
            }
        )
        .allowed
    );
    assert!(
        checked(&e, r, &alice, &ok).allowed,
        "still allowed after the others"
    );
}

#[test]
fn cache_two_identities() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let r = "default/api";
    let req = Full {
        path: "/admin",
        method: "DELETE",
        ..Default::default()
    };
    let olga = who("olga", &["ops"]);
    let eve = who("eve", &["eng"]);
    assert!(checked(&e, r, &olga, &req).allowed);
    assert!(
        !checked(&e, r, &eve, &req).allowed,
        "olga's allow is not eve's"
    );
    // The same user name in a new identity with other groups (a new token): decided anew.
    let olga2 = who("olga", &["eng"]);
    assert!(!checked(&e, r, &olga2, &req).allowed);
    assert!(checked(&e, r, &olga, &req).allowed);
    // Identities come and go: an address freed and reused by a new identity must not find
    // the old one's decisions (the cache holds the old one alive, so it cannot be reused).
    for i in 0..200 {
        let groups: &[&str] = if i % 2 == 0 { &["ops"] } else { &["eng"] };
        let id = who("u", groups);
        assert_eq!(checked(&e, r, &id, &req).allowed, i % 2 == 0, "{i}");
    }
    let (principals, decisions) = e.cached();
    assert!(principals > 0 && decisions > 0);
}

#[test]
fn cache_forbids_on_context_attributes() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let r = "default/api";
    let olga = who("olga", &["ops"]);
    let post = Full {
        method: "POST",
        path: "/x",
        ..Default::default()
    };
    assert!(checked(&e, r, &olga, &post).allowed);
    // Header.
    let blocked = checked(
        &e,
        r,
        &olga,
        &Full {
            tenant: Some("blocked"),
            ..post
        },
    );
    assert_eq!(blocked.reasons, vec!["blocked-tenant"]);
    assert!(
        checked(
            &e,
            r,
            &olga,
            &Full {
                tenant: Some("acme"),
                ..post
            }
        )
        .allowed
    );
    // Address.
    let outside = checked(
        &e,
        r,
        &olga,
        &Full {
            ip: "192.168.1.1",
            ..post
        },
    );
    assert_eq!(outside.reasons, vec!["outside"]);
    assert!(
        checked(
            &e,
            r,
            &olga,
            &Full {
                ip: "10.9.9.9",
                ..post
            }
        )
        .allowed
    );
    // Time: the key holds the hour (only hour is read), so 10:00 and 10:59 share an entry,
    // and 19:59 and 20:00 do not.
    let at = |h: u64, m: u64| UNIX_EPOCH + Duration::from_secs(1_700_438_400 + h * 3600 + m * 60);
    assert!(
        checked(
            &e,
            r,
            &olga,
            &Full {
                at: at(10, 0),
                ..post
            }
        )
        .allowed
    );
    assert!(
        checked(
            &e,
            r,
            &olga,
            &Full {
                at: at(10, 59),
                ..post
            }
        )
        .allowed
    );
    assert!(
        checked(
            &e,
            r,
            &olga,
            &Full {
                at: at(19, 59),
                ..post
            }
        )
        .allowed
    );
    let late = checked(
        &e,
        r,
        &olga,
        &Full {
            at: at(20, 0),
            ..post
        },
    );
    assert_eq!(late.reasons, vec!["night"]);
    // A route reading the timestamp is keyed by the second.
    let s = "default/stamp";
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_474_400);
    assert!(checked(&e, s, &olga, &Full { at: t0, ..post }).allowed);
    assert!(
        !checked(
            &e,
            s,
            &olga,
            &Full {
                at: t0 + Duration::from_secs(1),
                ..post
            }
        )
        .allowed
    );
    assert!(
        checked(&e, s, &olga, &Full { at: t0, ..post }).allowed,
        "again"
    );
}

#[test]
fn cache_skips_routes_reading_request_id() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let r = "default/rid";
    let alice = who("alice", &[]);
    let before = e.cached().1;
    assert!(checked(&e, r, &alice, &Full::default()).allowed);
    let bad = Full {
        request_id: "bad",
        ..Default::default()
    };
    assert!(!checked(&e, r, &alice, &bad).allowed);
    assert!(
        checked(
            &e,
            r,
            &alice,
            &Full {
                request_id: "r2",
                ..Default::default()
            }
        )
        .allowed
    );
    assert_eq!(e.cached().1, before, "no decision of this route is cached");
}

#[test]
fn cache_dies_with_the_engine() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let r = "default/api";
    let olga = who("olga", &["ops"]);
    let req = Full {
        path: "/x",
        ..Default::default()
    };
    assert!(checked(&e, r, &olga, &req).allowed);
    // Reload: the ops permit is gone.
    write(
        d.path(),
        "policies/api.cedar",
        &CACHE_POLICIES.replace(
            "@id(\"ops-anything\")\npermit",
            "@id(\"ops-anything\")\nforbid",
        ),
    );
    let c = config(
        d.path(),
        "  - { name: api, match: { path_prefix: / }, backend: b, auth: [dev], policies: [policies/api.cedar] }\n",
    );
    let reloaded = Engine::build(&c).unwrap();
    assert_eq!(reloaded.cached(), (0, 0));
    let d2 = checked(&reloaded, r, &olga, &req);
    assert_eq!(
        (d2.allowed, d2.reasons.clone()),
        (false, vec!["ops-anything".to_string()])
    );
    assert!(
        checked(&e, r, &olga, &req).allowed,
        "the old engine is unchanged"
    );
}

#[test]
fn cached_decisions_match_uncached_over_many_requests() {
    let d = tempfile::tempdir().unwrap();
    let e = cache_engine(d.path());
    let ids = [
        who("alice", &["eng"]),
        who("olga", &["ops"]),
        who("sam", &[]),
        who("alice", &["eng", "ops"]),
    ];
    let mut n = 0;
    for round in 0..2 {
        for id in &ids {
            for method in ["GET", "POST", "PROPFIND"] {
                for path in ["/", "/reports/a", "/reports", "/admin/x"] {
                    for ip in ["10.1.2.3", "192.168.0.1", "::1"] {
                        for tenant in [None, Some("blocked"), Some("acme")] {
                            for hour in [3u64, 12] {
                                let r = Full {
                                    method,
                                    path,
                                    ip,
                                    tenant,
                                    at: UNIX_EPOCH
                                        + Duration::from_secs(1_700_438_400 + hour * 3600),
                                    query: if round == 0 { None } else { Some("a=1") },
                                    ..Default::default()
                                };
                                checked(&e, "default/api", id, &r);
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(n, 2 * 4 * 3 * 4 * 3 * 3 * 2);
}
