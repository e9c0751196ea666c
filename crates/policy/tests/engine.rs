//! The policy engine against real config files: Cedar policies on groups, methods, paths,
//! addresses and time; schema errors located by line and column; shorthand rules; deny
//! beating allow; default deny.

use portcullis_identity::{AuthMethod, Identity};
use portcullis_policy::{Engine, RequestInfo};
use std::net::IpAddr;
use std::path::Path;
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

fn who(user: &str, groups: &[&str]) -> Identity {
    Identity {
        provider: "dev".into(),
        method: AuthMethod::Jwt,
        subject: user.into(),
        user: user.into(),
        email: Some(format!("{user}@example.com")),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        claims: serde_json::json!({ "dept": "sales", "level": 3 }),
        expires_at: None,
    }
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

fn decide(e: &Engine, route: &str, id: &Identity, r: Req<'_>) -> portcullis_policy::Decision {
    let ip: IpAddr = r.ip.parse().unwrap();
    e.decide(
        route,
        &RequestInfo {
            identity: id,
            method: r.method,
            host: "h",
            path: r.path,
            query: Some("a=1&b"),
            headers: &r.headers,
            client_ip: ip,
            tls_client_subject: None,
            tls_client_cert: false,
            request_id: "rid",
            now: r.at,
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
