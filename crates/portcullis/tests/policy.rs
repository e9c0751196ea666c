//! Authorization against the real binary: Cedar policies (global and per route) and shorthand
//! rules deciding real requests, default deny, deny beating allow, shadow mode, a reload with
//! a bad policy, external authorizers served by a real HTTP server in the test, and the policy
//! tooling (`portcullis check`, `policy test`, `policy explain`, `policy schema`).
//!
//! Identities come from a `dev_issuer` provider: tokens are minted with `portcullis token`
//! against the running proxy's own config, as a developer would.
mod common;
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const HEAD: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:{port}\" }
identity:
  providers: [{ name: dev, kind: dev_issuer }]
";

fn portcullis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    // Atomic, so a file watcher never sees half a file.
    let tmp = p.with_extension("tmp~");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

/// `portcullis token` for `user` in `groups` (comma-separated), signed by the proxy's
/// dev_issuer.
fn mint(p: &Proxy, user: &str, groups: &str) -> String {
    let config = p.config.to_str().unwrap();
    let out = portcullis(&[
        "token",
        "--config",
        config,
        "--provider",
        "dev",
        "--user",
        user,
        "--groups",
        groups,
        "--ttl",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "portcullis token: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

/// One request with a bearer token: (status, body).
async fn call(p: &Proxy, method: &str, path: &str, token: &str) -> (u16, String) {
    let r = client()
        .request(method.parse().unwrap(), p.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// The access log records with this method and path (the writer is asynchronous: waits
/// until there are `n`).
async fn access_records(p: &Proxy, method: &str, path: &str, n: usize) -> Vec<Value> {
    let find = || -> Vec<Value> {
        p.access_log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["method"] == method && v["path"] == path)
            .collect()
    };
    let ok = eventually(Duration::from_secs(5), || async { find().len() >= n }).await;
    assert!(
        ok,
        "no access record for {method} {path}; access log:\n{}",
        p.access_log_text()
    );
    find()
}

/// Asserts the status; on a 403, also that the body names the request id of the access log
/// record and nothing about the policies that decided.
async fn expect(p: &Proxy, method: &str, path: &str, token: &str, status: u16) -> String {
    let (got, body) = call(p, method, path, token).await;
    assert_eq!(
        got,
        status,
        "{method} {path}: body {body}\nlog tail:\n{}",
        tail(&p.log_text())
    );
    if status == 403 {
        let recs = access_records(p, method, path, 1).await;
        let rec = recs.last().unwrap();
        assert_eq!(rec["status"], 403, "{rec}");
        assert_eq!(rec["decision"], "deny", "{rec}");
        let rid = rec["request_id"].as_str().unwrap();
        assert!(!rid.is_empty());
        assert!(
            body.contains(rid),
            "403 body must carry the request id {rid}: {body:?}"
        );
        let lower = body.to_ascii_lowercase();
        for internal in [
            "permit",
            "forbid(",
            "@id",
            "policy",
            ".cedar",
            "allow[",
            "deny[",
            "default/",
            "principal",
            "group",
            "reason",
        ] {
            assert!(
                !lower.contains(internal),
                "403 body leaks `{internal}`: {body:?}"
            );
        }
    }
    body
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// UTC hour and weekday (as Cedar sees them) now and one hour from now, so a policy on "the
/// current hour" still holds if the clock ticks over during the test.
fn hours_and_days() -> ([i64; 2], [&'static str; 2]) {
    const DAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let later = now + 3600;
    (
        [((now / 3600) % 24) as i64, ((later / 3600) % 24) as i64],
        [
            DAYS[((now / 86400) % 7) as usize],
            DAYS[((later / 86400) % 7) as usize],
        ],
    )
}

// ---------------------------------------------------------------------------------------
// Cedar through the proxy
// ---------------------------------------------------------------------------------------

/// Policies on groups, methods, paths, client addresses and time decide real requests:
/// 200 or 403. A global policy file applies to every route; a `forbid` beats any `permit`;
/// a route with identity but no rule or policy denies everyone; shorthand rules compile to
/// the same engine.
#[tokio::test]
async fn cedar_policies_decide_requests_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (hours, days) = hours_and_days();
    write(
        d,
        "policies/global.cedar",
        r#"// Applies to every route that requires identity.
@id("global-blocklist")
forbid(principal, action, resource) when { context.path like "*/blocked*" };
"#,
    );
    write(
        d,
        "policies/groups.cedar",
        r#"@id("eng-only")
permit(principal in Portcullis::Group::"eng", action, resource);
"#,
    );
    write(
        d,
        "policies/methods.cedar",
        r#"@id("everyone-reads")
permit(principal, action in Portcullis::Action::"read", resource);

@id("ops-post")
permit(principal in Portcullis::Group::"ops", action == Portcullis::Action::"POST", resource);
"#,
    );
    write(
        d,
        "policies/paths.cedar",
        r#"@id("public-tree")
permit(principal, action, resource) when { context.path like "/p/public/*" };

@id("but-not-secrets")
forbid(principal, action, resource) when { context.path like "/p/public/secret*" };
"#,
    );
    write(
        d,
        "policies/ip-ok.cedar",
        r#"@id("loopback")
permit(principal, action, resource) when { context.ip.isInRange(ip("127.0.0.0/8")) };
"#,
    );
    write(
        d,
        "policies/ip-no.cedar",
        r#"@id("office-only")
permit(principal, action, resource) when { context.ip.isInRange(ip("10.0.0.0/8")) };
"#,
    );
    write(
        d,
        "policies/time-ok.cedar",
        &format!(
            r#"@id("window-now")
permit(principal, action, resource)
when {{ context.time.timestamp >= {from} && context.time.timestamp < {to}
       && (context.time.hour == {h0} || context.time.hour == {h1})
       && (context.time.weekday == "{d0}" || context.time.weekday == "{d1}") }};
"#,
            from = now - 3600,
            to = now + 3600,
            h0 = hours[0],
            h1 = hours[1],
            d0 = days[0],
            d1 = days[1],
        ),
    );
    write(
        d,
        "policies/time-no.cedar",
        &format!(
            r#"@id("window-past")
permit(principal, action, resource)
when {{ context.time.timestamp < {past} }};

@id("other-hours")
permit(principal, action, resource)
when {{ context.time.hour != {h0} && context.time.hour != {h1} }};
"#,
            past = now - 3600,
            h0 = hours[0],
            h1 = hours[1],
        ),
    );
    let yaml = HEAD.to_string()
        + r#"
policies: [policies/global.cedar]
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - { name: groups, match: { path_prefix: /g/ }, backend: echo, auth: [dev], policies: [policies/groups.cedar] }
  - { name: methods, match: { path_prefix: /m/ }, backend: echo, auth: [dev], policies: [policies/methods.cedar] }
  - { name: paths, match: { path_prefix: /p/ }, backend: echo, auth: [dev], policies: [policies/paths.cedar] }
  - { name: ip-ok, match: { path_prefix: /ip-ok/ }, backend: echo, auth: [dev], policies: [policies/ip-ok.cedar] }
  - { name: ip-no, match: { path_prefix: /ip-no/ }, backend: echo, auth: [dev], policies: [policies/ip-no.cedar] }
  - { name: time-ok, match: { path_prefix: /t-ok/ }, backend: echo, auth: [dev], policies: [policies/time-ok.cedar] }
  - { name: time-no, match: { path_prefix: /t-no/ }, backend: echo, auth: [dev], policies: [policies/time-no.cedar] }
  - { name: closed, match: { path_prefix: /closed/ }, backend: echo, auth: [dev] }
  - name: short
    match: { path_prefix: /s/ }
    backend: echo
    auth: [dev]
    allow:
      - { groups: [eng] }
      - { users: [viewer], methods: [GET], paths: ["/s/reports/**", "/s/files/*.pdf"] }
    deny:
      - { users: [alice] }
  - { name: open, match: { path_prefix: /open/ }, backend: echo, public: true }
"#;
    let p = Proxy::start_in(dir, &yaml).await;
    let alice = mint(&p, "alice", "eng");
    let carol = mint(&p, "carol", "eng");
    let bob = mint(&p, "bob", "sales");
    let olga = mint(&p, "olga", "ops");
    let viewer = mint(&p, "viewer", "");

    // Groups.
    let body = expect(&p, "GET", "/g/x", &alice, 200).await;
    assert!(
        body.contains("\"/g/x\""),
        "the echo origin answered: {body}"
    );
    expect(&p, "GET", "/g/y", &bob, 403).await;
    // A global forbid beats the route's permit.
    expect(&p, "GET", "/g/blocked", &alice, 403).await;

    // Methods: `read` is an action group, `POST` one action.
    expect(&p, "GET", "/m/a", &bob, 200).await;
    expect(&p, "HEAD", "/m/a", &bob, 200).await;
    expect(&p, "DELETE", "/m/b", &bob, 403).await;
    expect(&p, "POST", "/m/c", &bob, 403).await;
    expect(&p, "POST", "/m/d", &olga, 200).await;
    expect(&p, "PUT", "/m/e", &olga, 403).await;

    // Paths, and deny beating allow within a file.
    expect(&p, "GET", "/p/public/doc", &bob, 200).await;
    expect(&p, "GET", "/p/private/doc", &bob, 403).await;
    expect(&p, "GET", "/p/public/secrets.txt", &bob, 403).await;

    // The client address (the test connects from 127.0.0.1).
    expect(&p, "GET", "/ip-ok/x", &bob, 200).await;
    expect(&p, "GET", "/ip-no/x", &bob, 403).await;

    // Time: timestamp, hour and weekday.
    expect(&p, "GET", "/t-ok/x", &bob, 200).await;
    expect(&p, "GET", "/t-no/x", &bob, 403).await;

    // Default deny: identity required, no rule and no policy.
    expect(&p, "GET", "/closed/x", &alice, 403).await;
    expect(&p, "GET", "/closed/y", &bob, 403).await;

    // Shorthand rules: `deny` beats `allow`.
    expect(&p, "GET", "/s/x", &carol, 200).await;
    expect(&p, "GET", "/s/y", &alice, 403).await;
    expect(&p, "GET", "/s/reports/q3/sum", &viewer, 200).await;
    expect(&p, "POST", "/s/reports/q3/sum", &viewer, 403).await;
    expect(&p, "GET", "/s/other", &viewer, 403).await;
    // `**` crosses segments, `*` does not.
    expect(&p, "GET", "/s/files/q3.pdf", &viewer, 200).await;
    expect(&p, "GET", "/s/files/old/q3.pdf", &viewer, 403).await;

    // Public routes are not authorized at all (and global policies do not apply).
    let r = client().get(p.url("/open/blocked")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Every decision is in the access log: allow on a 200, deny on a 403.
    let allowed = access_records(&p, "GET", "/g/x", 1).await;
    assert_eq!(allowed[0]["decision"], "allow", "{}", allowed[0]);
    assert_eq!(allowed[0]["user"], "alice");
    // The process log has the reasons the client did not get.
    let log = p.log_text();
    assert!(
        log.contains("request denied by policy") && log.contains("global-blocklist"),
        "{}",
        tail(&log)
    );
}

/// What a policy decides on is what the origin may serve: a `deny: paths` rule covers every
/// spelling the route takes (case, `;` parameters, an encoded `;`), a `methods` rule naming a
/// method without an action of its own allows only that method, `context.headers` holds
/// every value of a header (also one that is not UTF-8), and a `forbid` that fails to
/// evaluate denies.
#[tokio::test]
async fn decisions_cover_what_the_origin_may_read_as_the_same_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "policies/headers.cedar",
        r#"@id("all")
permit(principal, action, resource);

@id("suspended")
forbid(principal, action, resource)
when { context.headers has "x-tenant" && context.headers["x-tenant"] like "*suspended*" };

@id("no-debug")
forbid(principal, action, resource) when { context.headers has "x-debug" };
"#,
    );
    write(
        d,
        "policies/overflow.cedar",
        r#"@id("all-e")
permit(principal, action, resource);

@id("overflows")
forbid(principal, action, resource)
when { context.time.timestamp * 1000000000000 > 1700000000 };
"#,
    );
    let yaml = HEAD.to_string()
        + r#"
policy: { context_headers: [x-tenant, x-debug] }
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: app
    match: { path_prefix: /app/ }
    backend: echo
    auth: [dev]
    allow:
      - { groups: [eng] }
      - { groups: [readers], methods: [GET, PROPFIND] }
    deny:
      - { paths: ["/app/admin/**"] }
  - name: strict
    match: { path_prefix: /Strict/, case_sensitive: true }
    backend: echo
    auth: [dev]
    allow: [{ groups: [eng] }]
    deny: [{ paths: ["/Strict/Admin/**"] }]
  - { name: h, match: { path_prefix: /h/ }, backend: echo, auth: [dev], policies: [policies/headers.cedar] }
  - { name: e, match: { path_prefix: /e/ }, backend: echo, auth: [dev], policies: [policies/overflow.cedar] }
"#;
    let p = Proxy::start_in(dir, &yaml).await;
    let eng = mint(&p, "erin", "eng");
    let reader = mint(&p, "rita", "readers");

    assert_eq!(call(&p, "GET", "/app/x", &eng).await.0, 200);
    assert_eq!(call(&p, "GET", "/app/administrator", &eng).await.0, 200);
    for path in [
        "/app/admin",
        "/app/admin/",
        "/APP/Admin",
        "/app/admin/x",
        "/APP/ADMIN/x",
        "/app/Admin/x",
        "/app/admin;jsessionid=1/x",
        "/app;x/admin/x",
        "/app/admin%3Bx/y",
        "/app/ADMIN%3bx=1/y",
        "/app/admin./x",
        "/app/admin%20/x",
        "/app/admin.",
    ] {
        let (status, body) = call(&p, "GET", path, &eng).await;
        assert_eq!(status, 403, "{path} passed the deny rule: {body}");
    }
    // A case-sensitive route takes only its own spelling, and its glob is kept as written.
    assert_eq!(call(&p, "GET", "/Strict/Admin/x", &eng).await.0, 403);
    assert_eq!(call(&p, "GET", "/Strict/Admin;v=1/x", &eng).await.0, 403);
    assert_eq!(call(&p, "GET", "/Strict/Other", &eng).await.0, 200);

    // `methods: [GET, PROPFIND]`: PROPFIND, not every method that shares its action.
    assert_eq!(call(&p, "GET", "/app/doc", &reader).await.0, 200);
    assert_eq!(call(&p, "PROPFIND", "/app/doc", &reader).await.0, 200);
    for m in ["MOVE", "MKCOL", "PURGE", "PROPPATCH", "DELETE"] {
        let (status, _) = call(&p, m, "/app/doc", &reader).await;
        assert_eq!(status, 403, "{m} allowed by a rule that lists PROPFIND");
    }

    // Every value of a header, and a value that is not UTF-8.
    let send = |headers: Vec<(&'static str, reqwest::header::HeaderValue)>| {
        let mut r = client().get(p.url("/h/x")).bearer_auth(&eng);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let v = |s: &'static [u8]| reqwest::header::HeaderValue::from_bytes(s).unwrap();
    assert_eq!(send(vec![("x-tenant", v(b"ok"))]).await, 200);
    assert_eq!(send(vec![("x-tenant", v(b"suspended"))]).await, 403);
    assert_eq!(
        send(vec![("x-tenant", v(b"ok")), ("x-tenant", v(b"suspended"))]).await,
        403,
        "a second value hid behind the first"
    );
    assert_eq!(
        send(vec![("x-debug", v(b"\xe9t\xe9"))]).await,
        403,
        "a header that is not UTF-8 was left out of the context"
    );

    // A forbid that cannot be evaluated denies, and is the reason.
    assert_eq!(call(&p, "GET", "/e/x", &eng).await.0, 403);
    let log = p.log_text();
    assert!(log.contains("overflows"), "{}", tail(&log));
}

/// `enforce: false` is shadow mode: what the policies deny still goes through, is recorded as
/// `would_deny` in the access log, and is logged as such.
#[tokio::test]
async fn shadow_mode_records_would_deny_and_lets_the_request_through() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "policies/new.cedar",
        r#"@id("new-rule-admins-only")
permit(principal in Portcullis::Group::"admins", action, resource);
"#,
    );
    let yaml = HEAD.to_string()
        + r#"
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: trial
    match: { path_prefix: /trial/ }
    backend: echo
    auth: [dev]
    enforce: false
    policies: [policies/new.cedar]
  - name: enforced
    match: { path_prefix: /enforced/ }
    backend: echo
    auth: [dev]
    policies: [policies/new.cedar]
"#;
    let p = Proxy::start_in(dir, &yaml).await;
    let bob = mint(&p, "bob", "eng");
    let root = mint(&p, "root", "admins");

    let body = expect(&p, "GET", "/trial/x", &bob, 200).await;
    assert!(body.contains("/trial/x"), "reached the origin: {body}");
    expect(&p, "GET", "/trial/y", &root, 200).await;
    // The same policy, enforced.
    expect(&p, "GET", "/enforced/x", &bob, 403).await;

    let would = access_records(&p, "GET", "/trial/x", 1).await;
    assert_eq!(would[0]["decision"], "would_deny", "{}", would[0]);
    assert_eq!(would[0]["status"], 200);
    let line = p
        .access_log_text()
        .lines()
        .find(|l| l.contains("/trial/x"))
        .unwrap()
        .to_string();
    assert!(line.contains(r#""decision":"would_deny""#), "{line}");
    let allowed = access_records(&p, "GET", "/trial/y", 1).await;
    assert_eq!(allowed[0]["decision"], "allow", "{}", allowed[0]);

    let ok = eventually(Duration::from_secs(5), || async {
        p.log_text().contains("shadow mode")
    })
    .await;
    assert!(
        ok,
        "no shadow mode line in the log:\n{}",
        tail(&p.log_text())
    );
    let shadow_line = p
        .log_text()
        .lines()
        .find(|l| l.contains("shadow mode"))
        .unwrap()
        .to_string();
    assert!(
        shadow_line.contains("bob") && shadow_line.contains("default/trial"),
        "{shadow_line}"
    );
}

/// A reload that brings a policy with a typo in an attribute is rejected with the file, line
/// and column, and the old policies keep deciding; a good policy then takes effect.
#[tokio::test]
async fn reload_with_a_bad_policy_keeps_the_old_policies() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policies");
    write(
        dir.path(),
        "policies/api.cedar",
        r#"@id("eng-only")
permit(principal in Portcullis::Group::"eng", action, resource);
"#,
    );
    let yaml = HEAD.to_string()
        + r#"
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - { name: api, match: { path_prefix: /api/ }, backend: echo, auth: [dev], policies: [policies/api.cedar] }
"#;
    let p = Proxy::start_in(dir, &yaml).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    expect(&p, "GET", "/api/1", &alice, 200).await;
    expect(&p, "GET", "/api/2", &bob, 403).await;

    // Line 6, column 8: `principal.emial`.
    write(
        &policy_dir,
        "api.cedar",
        r#"@id("eng-only")
permit(principal in Portcullis::Group::"eng", action, resource);

@id("bob-by-mail")
permit(principal, action, resource) when {
       principal.emial == "bob@example.com" };
"#,
    );
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(status, 422, "a bad policy must be rejected: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["result"], "rejected", "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("api.cedar:6:8") && err.contains("emial"),
        "the error must name file:line:col and the attribute: {err}"
    );
    // The old policies still decide.
    expect(&p, "GET", "/api/3", &alice, 200).await;
    expect(&p, "GET", "/api/4", &bob, 403).await;

    // A good policy takes effect on the next reload.
    write(
        &policy_dir,
        "api.cedar",
        r#"@id("eng-and-sales")
permit(principal in Portcullis::Group::"eng", action, resource);
permit(principal in Portcullis::Group::"sales", action == Portcullis::Action::"GET", resource);
"#,
    );
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    expect(&p, "GET", "/api/5", &bob, 200).await;
    expect(&p, "DELETE", "/api/6", &bob, 403).await;
}

// ---------------------------------------------------------------------------------------
// External authorizers
// ---------------------------------------------------------------------------------------

/// A real HTTP authorizer: allows `alice` (adding a header upstream), denies everyone else,
/// and remembers who it was asked about.
async fn authorizer_server() -> (Origin, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let s = seen.clone();
    let o = Origin::start(move |req| {
        let s = s.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let user = v["identity"]["user"].as_str().unwrap_or("").to_string();
            s.lock().unwrap().push(v);
            let (status, answer) = if user == "alice" {
                (
                    200,
                    json!({ "reason": "entitled", "headers": { "X-Entitlement": "gold" } }),
                )
            } else {
                (403, json!({ "reason": "no entitlement for this tenant" }))
            };
            let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
    })
    .await;
    (o, seen)
}

/// Cedar decides first; only what Cedar allows reaches the authorizer, whose allow lets the
/// request through with the authorizer's headers, and whose deny is a 403 that does not leak
/// the authorizer's reason.
#[tokio::test]
async fn external_authorizer_runs_after_cedar_allows() {
    let (authz, seen) = authorizer_server().await;
    let yaml = HEAD.to_string()
        + &r#"
authorizers:
  - name: entitlements
    url: "http://@AUTHZ@/check"
    timeout: 2s
    send: [x-tenant]
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: api
    match: { path_prefix: /api/ }
    backend: echo
    auth: [dev]
    allow: [{ groups: [eng] }]
    authorize_with: [entitlements]
"#
        .replace("@AUTHZ@", &authz.address());
    let p = Proxy::start(&yaml).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "eng");
    let dave = mint(&p, "dave", "sales");

    // Allowed by both: the authorizer's header reaches the origin.
    let r = client()
        .get(p.url("/api/orders"))
        .bearer_auth(&alice)
        .header("x-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-entitlement"], "gold", "{echo}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let call = &seen[0];
        assert_eq!(call["identity"]["user"], "alice", "{call}");
        assert_eq!(call["identity"]["provider"], "dev", "{call}");
        assert_eq!(call["route"], "default/api", "{call}");
        assert_eq!(call["method"], "GET", "{call}");
        assert_eq!(call["path"], "/api/orders", "{call}");
        assert_eq!(call["headers"]["x-tenant"], "acme", "{call}");
    }

    // Cedar allows, the authorizer denies: 403, and the reason stays inside.
    let body = expect(&p, "GET", "/api/orders/bob", &bob, 403).await;
    assert!(!body.contains("entitlement"), "{body}");

    // Cedar denies: the authorizer is never asked.
    expect(&p, "GET", "/api/orders/dave", &dave, 403).await;
    let users: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|v| v["identity"]["user"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        users,
        ["alice", "bob"],
        "dave must not reach the authorizer"
    );

    // A repeated allowed request is answered from the decision cache.
    let r = client()
        .get(p.url("/api/orders"))
        .bearer_auth(&alice)
        .header("x-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-entitlement"], "gold", "{echo}");
    assert_eq!(seen.lock().unwrap().len(), 2, "the second call was cached");

    // Hits and misses are exported.
    let (status, metrics) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(status, 200);
    for want in [
        r#"portcullis_authorizer_cache_lookups_total{authorizer="entitlements",result="hit"} 1"#,
        r#"portcullis_authorizer_cache_lookups_total{authorizer="entitlements",result="miss"} 2"#,
    ] {
        assert!(
            metrics.contains(want),
            "`{want}` missing from:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("authorizer"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tooling
// ---------------------------------------------------------------------------------------

/// A config (no proxy) with a policy file and shorthand rules, for the CLI tools.
fn tool_config(dir: &Path) -> String {
    write(
        dir,
        "policies/billing.cedar",
        r#"@id("finance-reads")
permit(principal in Portcullis::Group::"finance", action in Portcullis::Action::"read", resource);

@id("no-exports-off-site")
forbid(principal, action, resource)
when { context.path like "/billing/export*" && !context.ip.isInRange(ip("10.0.0.0/8")) };
"#,
    );
    write(
        dir,
        "portcullis.yaml",
        r#"listeners:
  - { name: web, bind: "127.0.0.1:8080" }
identity:
  providers: [{ name: dev, kind: dev_issuer }]
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: billing
    match: { host: billing.example.com, path_prefix: /billing/ }
    backend: echo
    auth: [dev]
    policies: [policies/billing.cedar]
    allow:
      - { groups: [billing-admins] }
"#,
    );
    dir.join("portcullis.yaml").to_str().unwrap().to_string()
}

/// `portcullis check` reports a policy error as file:line:col and exits 1.
#[test]
fn check_reports_policy_errors_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let config = tool_config(dir.path());
    let out = portcullis(&["check", "--config", &config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));

    write(
        dir.path(),
        "policies/billing.cedar",
        "@id(\"typo\")\npermit(principal, action, resource)\nwhen { principal.emial == \"x@example.com\" };\n",
    );
    let out = portcullis(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let file = dir.path().join("policies/billing.cedar");
    let want = format!("{}:3:8:", file.display());
    assert!(
        err.contains(&want) && err.contains("emial"),
        "expected `{want}` and the attribute in:\n{err}"
    );

    // An unknown entity type is located too.
    write(
        dir.path(),
        "policies/billing.cedar",
        "\n\npermit(principal in Portcullis::Team::\"x\", action, resource);\n",
    );
    let out = portcullis(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", file.display())) && err.contains("Team"),
        "{err}"
    );
}

/// `portcullis check` reports a shorthand rule that does not compile at the rule itself, in
/// the app bundle that defines its route: `apps/billing.yaml:line:col`, not the root file.
#[test]
fn check_reports_a_bad_shorthand_rule_at_its_place_in_the_app_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = tool_config(dir.path());
    let root = std::fs::read_to_string(&config).unwrap();
    write(
        dir.path(),
        "portcullis.yaml",
        &format!("{root}apps:\n  include: [\"apps/*.yaml\"]\n"),
    );
    // Cedar refuses an IPv6 address written with an embedded IPv4 one, which is how an
    // IPv4-mapped range prints.
    write(
        dir.path(),
        "apps/billing.yaml",
        r#"name: billing
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: api
    match: { host: api.billing.example.com }
    backend: echo
    auth: [dev]
    allow:
      - { groups: [billing-admins] }
      - groups: [finance]
        cidrs: ["::ffff:10.0.0.0/104"]
"#,
    );
    let out = portcullis(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let want = format!("{}:11:9: ", dir.path().join("apps/billing.yaml").display());
    assert!(
        err.lines()
            .any(|l| l.starts_with(&want) && l.contains("billing/api/allow[2]")),
        "expected a line starting `{want}` naming the rule in:\n{err}"
    );
    assert!(err.contains("1 error(s) found"), "{err}");
}

/// `portcullis policy test` passes on good cases and exits 1 with an expected/actual diff
/// on a wrong expectation.
#[test]
fn policy_test_passes_and_fails_with_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let config = tool_config(dir.path());
    write(
        dir.path(),
        "good.yaml",
        r#"cases:
  - name: finance reads invoices
    identity: { user: fay, groups: [finance], provider: dev }
    request: { method: GET, url: "https://billing.example.com/billing/invoices/7" }
    expect: { decision: allow, policies: [finance-reads] }
  - name: finance cannot write
    identity: { user: fay, groups: [finance], provider: dev }
    request: { method: POST, url: "https://billing.example.com/billing/invoices" }
    expect: { decision: deny, policies: [] }
  - name: admins by shorthand rule
    identity: { user: ada, groups: [billing-admins], provider: dev }
    request: { method: DELETE, url: "https://billing.example.com/billing/invoices/7" }
    expect: { decision: allow, policies: ["default/billing/allow[1]"] }
  - name: exports only from the office
    identity: { user: ada, groups: [billing-admins] }
    request: { method: GET, url: "https://billing.example.com/billing/export.csv", ip: 203.0.113.9 }
    expect: { decision: deny, policies: [no-exports-off-site] }
  - name: exports from the office
    identity: { user: ada, groups: [billing-admins] }
    request: { method: GET, url: "https://billing.example.com/billing/export.csv", ip: 10.1.2.3 }
    expect: { decision: allow }
"#,
    );
    let good = dir.path().join("good.yaml");
    let out = portcullis(&[
        "policy",
        "test",
        "--config",
        &config,
        good.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("5 passed, 0 failed"), "{stdout}");

    write(
        dir.path(),
        "bad.yaml",
        r#"cases:
  - name: finance reads invoices
    identity: { user: fay, groups: [finance] }
    request: { method: GET, url: "https://billing.example.com/billing/invoices/7" }
    expect: { decision: allow }
  - name: finance deletes invoices
    identity: { user: fay, groups: [finance] }
    request: { method: DELETE, url: "https://billing.example.com/billing/invoices/7" }
    expect: { decision: allow, policies: [finance-reads] }
  - name: wrong policy id
    identity: { user: fay, groups: [finance] }
    request: { method: GET, url: "https://billing.example.com/billing/invoices/7" }
    expect: { decision: allow, policies: [someone-else] }
"#,
    );
    let bad = dir.path().join("bad.yaml");
    let out = portcullis(&["policy", "test", "--config", &config, bad.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ok   finance reads invoices"), "{stdout}");
    assert!(stdout.contains("FAIL finance deletes invoices"), "{stdout}");
    assert!(
        stdout.contains("- expected: allow by [finance-reads]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("+ actual:   deny (no policy matched: default deny)"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL wrong policy id"), "{stdout}");
    assert!(
        stdout.contains("- expected: allow by [someone-else]")
            && stdout.contains("+ actual:   allow by [finance-reads]"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 2 failed"), "{stdout}");

    // A case file with a typo in a key is an error, not a silent pass.
    write(
        dir.path(),
        "typo.yaml",
        "cases:\n  - name: x\n    identity: { user: fay }\n    request: { method: GET, url: \"https://billing.example.com/billing/\" }\n    expect: { decisoin: allow }\n",
    );
    let out = portcullis(&[
        "policy",
        "test",
        "--config",
        &config,
        dir.path().join("typo.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("decisoin"),
        "{}",
        text(&out.stderr)
    );
}

/// `portcullis policy explain` names the decision, the matched policy and its source, and says
/// when nothing matched; `policy schema` prints the entity model.
#[test]
fn policy_explain_names_the_matched_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = tool_config(dir.path());
    let out = portcullis(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--user",
        "fay",
        "--groups",
        "finance",
        "GET",
        "https://billing.example.com/billing/invoices/7",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("route:    default/billing"), "{stdout}");
    assert!(
        stdout.contains("decision: allow by [finance-reads]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("matched policy `finance-reads`"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"principal in Portcullis::Group::"finance""#),
        "the policy's source is shown: {stdout}"
    );

    // A forbid that matched, from an address outside the office.
    let out = portcullis(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--user",
        "ada",
        "--groups",
        "billing-admins",
        "--ip",
        "198.51.100.7",
        "GET",
        "https://billing.example.com/billing/export.csv",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("decision: deny by [no-exports-off-site]"),
        "{stdout}"
    );

    // A shorthand rule is named by where it came from.
    let out = portcullis(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--user",
        "ada",
        "--groups",
        "billing-admins",
        "POST",
        "https://billing.example.com/billing/invoices",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("matched policy `default/billing/allow[1]`"),
        "{stdout}"
    );

    // Nothing matched: default deny, said plainly.
    let out = portcullis(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--user",
        "eve",
        "DELETE",
        "https://billing.example.com/billing/invoices/7",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("decision: deny (no policy matched: default deny)"),
        "{stdout}"
    );
    assert!(stdout.contains("denied by default"), "{stdout}");

    let out = portcullis(&["policy", "schema", "--config", &config]);
    let schema = text(&out.stdout);
    assert!(out.status.success());
    for want in [
        "namespace Portcullis",
        "entity User in [Group]",
        "entity Agent in [Group]",
        "entity Route",
        "ip: ipaddr",
        "action \"read\", \"write\";",
    ] {
        assert!(schema.contains(want), "schema lacks `{want}`:\n{schema}");
    }
}

/// A policy that reads a stick table's counters (`context.limits`): `policy test` gives the
/// counters per case, denies at the threshold, and refuses a counter the table does not store.
#[test]
fn policy_test_exercises_counters_in_the_context() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "policies/agents.cedar",
        r#"@id("agents")
permit(principal, action, resource);

@id("too-many-errors")
forbid(principal, action, resource)
when { context.limits.per_key.http_err_rate_1m > 50 || context.limits.per_key.tags.contains("banned") };
"#,
    );
    write(
        dir.path(),
        "portcullis.yaml",
        r#"listeners:
  - { name: web, bind: "127.0.0.1:8080" }
identity:
  providers: [{ name: dev, kind: dev_issuer }]
stick_tables:
  - { name: per_key, key: principal, size: 1000, store: ["http_req_rate(10s)", "http_err_rate(1m)", tags] }
backends:
  - { name: echo, servers: [{ address: "builtin:echo" }] }
routes:
  - name: api
    match: { path_prefix: /api/ }
    backend: echo
    auth: [dev]
    policies: [policies/agents.cedar]
    limits: { track: [per_key] }
"#,
    );
    let config = dir.path().join("portcullis.yaml");
    let config = config.to_str().unwrap();
    write(
        dir.path(),
        "cases.yaml",
        r#"cases:
  - name: no counts yet
    identity: { user: bot, provider: dev }
    request: { method: GET, url: "https://api.example.com/api/x" }
    expect: { decision: allow, policies: [agents] }
  - name: at the threshold
    identity: { user: bot, provider: dev }
    request: { method: GET, url: "https://api.example.com/api/x", limits: { per_key: { http_err_rate_1m: 50 } } }
    expect: { decision: allow }
  - name: over the threshold
    identity: { user: bot, provider: dev }
    request: { method: GET, url: "https://api.example.com/api/x", limits: { per_key: { http_err_rate_1m: 51, http_req_rate_10s: 3 } } }
    expect: { decision: deny, policies: [too-many-errors] }
  - name: tagged by an operator
    identity: { user: bot, provider: dev }
    request: { method: GET, url: "https://api.example.com/api/x", limits: { per_key: { tags: [banned] } } }
    expect: { decision: deny, policies: [too-many-errors] }
"#,
    );
    let cases = dir.path().join("cases.yaml");
    let out = portcullis(&[
        "policy",
        "test",
        "--config",
        config,
        cases.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("4 passed, 0 failed"), "{stdout}");

    write(
        dir.path(),
        "typo.yaml",
        r#"cases:
  - name: a counter the table does not store
    identity: { user: bot, provider: dev }
    request: { method: GET, url: "https://api.example.com/api/x", limits: { per_key: { http_err_rate_10s: 51 } } }
    expect: { decision: deny }
"#,
    );
    let typo = dir.path().join("typo.yaml");
    let out = portcullis(&["policy", "test", "--config", config, typo.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("`limits.per_key.http_err_rate_10s`: the table stores [http_req_rate_10s, http_err_rate_1m, tags]"),
        "{stdout}"
    );
}
