//! `portcullis policy …`: policy tooling for CI. `test` runs decision cases from a YAML file
//! against the config's policies and prints a readable diff for every failure; `explain`
//! shows how one request is decided and which policies matched; `schema` prints the Cedar
//! schema the policies are validated against.

use portcullis_identity::{AuthMethod, Identity};
use portcullis_policy::{Engine, RequestInfo};
use portcullis_proxy::edge::canon;
use serde::Deserialize;
use std::path::Path;
use std::process::ExitCode;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    identity: Who,
    request: Req,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Who {
    user: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default = "default_provider")]
    provider: String,
    email: Option<String>,
    /// jwt, session, api_key or mtls.
    #[serde(default = "default_method")]
    method: AuthMethod,
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
}

fn default_provider() -> String {
    "test".into()
}
fn default_method() -> AuthMethod {
    AuthMethod::Jwt
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    method: String,
    url: String,
    #[serde(default = "default_ip")]
    ip: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    listener: Option<String>,
    /// Stick-table counters for `context.limits`, as the request would see them.
    #[serde(default)]
    limits: CaseLimits,
}

/// Counters a case gives for `context.limits`: table → counter, named as the context names
/// it (`http_req_rate_10s`, `conn_cur`, `tags`) → a number (a list of strings for `tags`).
/// Tables and counters left out read as zeros, as for a request not counted there.
#[derive(Deserialize, Default)]
#[serde(transparent)]
struct CaseLimits(
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>>,
);

impl CaseLimits {
    /// Every table and counter named must be one the config's stick tables store.
    fn check(&self, cfg: &portcullis_config::Config) -> Result<(), String> {
        for (table, values) in &self.0 {
            let Some(t) = cfg.stick_tables.iter().find(|t| &t.name == table) else {
                return Err(format!(
                    "`limits.{table}`: no stick table `{table}` in the config"
                ));
            };
            let names: Vec<String> = t
                .store
                .iter()
                .filter_map(|c| portcullis_limits::Counter::parse(c).ok())
                .map(context_name)
                .collect();
            for (name, v) in values {
                if !names.contains(name) {
                    return Err(format!(
                        "`limits.{table}.{name}`: the table stores [{}]",
                        names.join(", ")
                    ));
                }
                let ok = if name == "tags" {
                    v.as_array()
                        .is_some_and(|a| a.iter().all(|t| t.is_string()))
                } else {
                    v.as_u64().is_some()
                };
                if !ok {
                    return Err(format!(
                        "`limits.{table}.{name}`: write {}",
                        if name == "tags" {
                            "a list of strings"
                        } else {
                            "a whole number ≥ 0"
                        }
                    ));
                }
            }
        }
        Ok(())
    }
}

fn context_name(c: portcullis_limits::Counter) -> String {
    if c.kind() == portcullis_limits::Kind::Tags {
        "tags".into()
    } else {
        c.context_name()
    }
}

/// A case's counters as the policy engine reads them.
struct LimitsView<'a> {
    cfg: &'a portcullis_config::Config,
    given: &'a CaseLimits,
}

impl LimitsView<'_> {
    fn get(&self, table: &str, kind: portcullis_limits::Kind) -> Option<&serde_json::Value> {
        let t = self.cfg.stick_tables.iter().find(|t| t.name == table)?;
        let c = t
            .store
            .iter()
            .filter_map(|c| portcullis_limits::Counter::parse(c).ok())
            .find(|c| c.kind() == kind)?;
        self.given.0.get(table)?.get(&context_name(c))
    }
}

impl portcullis_policy::LimitValues for LimitsView<'_> {
    fn value(&self, table: &str, kind: portcullis_limits::Kind) -> Option<u64> {
        self.get(table, kind)?.as_u64()
    }
    fn tags(&self, table: &str) -> Vec<String> {
        self.get(table, portcullis_limits::Kind::Tags)
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn default_ip() -> String {
    "127.0.0.1".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: String,
    policies: Option<Vec<String>>,
}

fn identity(w: &Who) -> Identity {
    let mut claims = w.claims.clone();
    claims
        .entry("sub")
        .or_insert_with(|| serde_json::json!(w.user));
    Identity {
        provider: w.provider.clone(),
        method: w.method,
        subject: w.user.clone(),
        user: w.user.clone(),
        email: w.email.clone(),
        groups: w.groups.clone(),
        claims: serde_json::Value::Object(claims),
        expires_at: None,
    }
}

/// The decision for one request, with the route it matched.
struct Outcome {
    route: Option<String>,
    decision: portcullis_policy::Decision,
}

#[allow(clippy::too_many_arguments)]
fn decide(
    cfg: &portcullis_config::Config,
    engine: &Engine,
    who: &Identity,
    method: &str,
    url: &str,
    ip: &str,
    headers: &std::collections::BTreeMap<String, String>,
    listener: Option<&str>,
    limits: &CaseLimits,
) -> Result<Outcome, String> {
    limits.check(cfg)?;
    let view = LimitsView { cfg, given: limits };
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid url `{url}`: {e}"))?;
    let m = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("invalid method `{method}`"))?;
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("invalid header `{k}`"))?;
        h.insert(
            name,
            http::HeaderValue::from_str(v)
                .map_err(|_| format!("invalid header value for `{k}`"))?,
        );
    }
    let listener = listener
        .map(String::from)
        .or_else(|| cfg.listeners.first().map(|l| l.name.clone()))
        .unwrap_or_default();
    // The host and path as the proxy makes them canonical on this listener, and what it
    // refuses with 400 before any policy.
    let rules = cfg
        .listeners
        .iter()
        .find(|l| l.name == listener)
        .map(canon::Rules::new)
        .unwrap_or_default();
    let refused = |r: canon::Refusal| Outcome {
        route: None,
        decision: portcullis_policy::Decision {
            allowed: false,
            reasons: vec![],
            errors: vec![format!("the proxy answers 400: {}", r.message().trim_end())],
        },
    };
    let authority = http::HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str()))
        .map_err(|_| format!("invalid host in `{url}`"))?;
    let target = match canon::target(&uri, &authority, &rules) {
        Ok(t) => t,
        Err(r) => return Ok(refused(r)),
    };
    let host = target.host.as_ref().map_or("", |h| &h.name).to_string();
    let path = target.path.path.to_string();
    let router = portcullis_proxy::phase::route::router::Router::build(&cfg.routes);
    let Some(i) = router.route(&host, &canon::match_path(&path), &m, &h, &listener) else {
        return Ok(Outcome {
            route: None,
            decision: portcullis_policy::Decision {
                allowed: false,
                reasons: vec![],
                errors: vec!["no route matches (the proxy answers 404)".into()],
            },
        });
    };
    let route = &cfg.routes[i];
    let slashes = route
        .spec
        .normalize
        .escaped_slashes
        .unwrap_or(rules.escaped_slashes);
    if target.path.escaped_slash && slashes == portcullis_config::EscapedSlashes::Reject {
        return Ok(refused(canon::Refusal::EscapedSlash));
    }
    if route.spec.public {
        return Ok(Outcome {
            route: Some(route.id.clone()),
            decision: portcullis_policy::Decision {
                allowed: true,
                reasons: vec!["route is public".into()],
                errors: vec![],
            },
        });
    }
    let ip = ip.parse().map_err(|_| format!("invalid ip `{ip}`"))?;
    let who = std::sync::Arc::new(who.clone());
    let d = engine.decide_uncached(
        &route.id,
        &RequestInfo {
            identity: &who,
            method: m.as_str(),
            host: &host,
            path: &path,
            route_path: &portcullis_proxy::phase::authorize::decide::route_path(
                &path,
                route.spec.matcher.case_sensitive,
            ),
            query: target.query,
            headers: &h,
            client_ip: ip,
            // An mTLS identity came with its certificate, as the proxy sees it.
            tls_client_subject: (who.method == AuthMethod::Mtls).then_some(who.subject.as_str()),
            tls_client_cert: who.method == AuthMethod::Mtls,
            request_id: "policy-test",
            now: None,
            limits: Some(&view),
        },
    );
    Ok(Outcome {
        route: Some(route.id.clone()),
        decision: d,
    })
}

fn load(config: &Path) -> Result<(portcullis_config::Config, Engine), ExitCode> {
    let cfg = crate::load_config(config)?;
    let engine = Engine::build(&cfg).map_err(|portcullis_policy::Error::Invalid(e)| {
        for d in &e {
            eprintln!("{d}");
        }
        ExitCode::from(1)
    })?;
    Ok((cfg, engine))
}

fn describe(d: &portcullis_policy::Decision) -> String {
    let verdict = if d.allowed { "allow" } else { "deny" };
    if d.reasons.is_empty() {
        format!("{verdict} (no policy matched: default deny)")
    } else {
        format!("{verdict} by [{}]", d.reasons.join(", "))
    }
}

pub fn test(config: &Path, cases_file: &Path) -> ExitCode {
    let (cfg, engine) = match load(config) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let text = match std::fs::read_to_string(cases_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", cases_file.display());
            return ExitCode::from(1);
        }
    };
    let cases: Cases = match serde_yaml_ng::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            let loc = e
                .location()
                .map(|l| format!("{}:{}:", l.line(), l.column()))
                .unwrap_or_default();
            eprintln!("{}:{loc} {e}", cases_file.display());
            return ExitCode::from(1);
        }
    };
    let mut failed = 0;
    for c in &cases.cases {
        let who = identity(&c.identity);
        let out = match decide(
            &cfg,
            &engine,
            &who,
            &c.request.method,
            &c.request.url,
            &c.request.ip,
            &c.request.headers,
            c.request.listener.as_deref(),
            &c.request.limits,
        ) {
            Ok(o) => o,
            Err(e) => {
                println!("FAIL {}\n  error: {e}", c.name);
                failed += 1;
                continue;
            }
        };
        let got = if out.decision.allowed {
            "allow"
        } else {
            "deny"
        };
        let decision_ok = got == c.expect.decision;
        let policies_ok = c.expect.policies.as_ref().is_none_or(|p| {
            let mut a = p.clone();
            let mut b = out.decision.reasons.clone();
            a.sort();
            b.sort();
            a == b
        });
        if decision_ok && policies_ok {
            println!("ok   {}", c.name);
        } else {
            failed += 1;
            let expected = match &c.expect.policies {
                Some(p) => format!("{} by [{}]", c.expect.decision, p.join(", ")),
                None => c.expect.decision.clone(),
            };
            println!("FAIL {}", c.name);
            println!("  route:    {}", out.route.as_deref().unwrap_or("(none)"));
            println!("  - expected: {expected}");
            println!("  + actual:   {}", describe(&out.decision));
            for e in &out.decision.errors {
                println!("    error: {e}");
            }
        }
    }
    println!("{} passed, {} failed", cases.cases.len() - failed, failed);
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[allow(clippy::too_many_arguments)]
pub fn explain(
    config: &Path,
    who: Who,
    method: &str,
    url: &str,
    ip: &str,
    headers: &[String],
) -> ExitCode {
    let (cfg, engine) = match load(config) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let mut h = std::collections::BTreeMap::new();
    for kv in headers {
        match kv.split_once(':') {
            Some((k, v)) => {
                h.insert(k.trim().to_string(), v.trim().to_string());
            }
            None => {
                eprintln!("error: --header takes `Name: value`");
                return ExitCode::from(2);
            }
        }
    }
    let id = identity(&who);
    let none = CaseLimits::default();
    let out = match decide(&cfg, &engine, &id, method, url, ip, &h, None, &none) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("request:  {method} {url} from {ip}");
    println!(
        "identity: {} (provider {}, groups [{}])",
        id.user,
        id.provider,
        id.groups.join(", ")
    );
    println!(
        "route:    {}",
        out.route.as_deref().unwrap_or("(none: 404)")
    );
    println!("decision: {}", describe(&out.decision));
    for r in &out.decision.reasons {
        println!("\nmatched policy `{r}`:");
        if let Some(src) = engine.source(r) {
            for line in src.lines() {
                println!("    {line}");
            }
        }
    }
    for e in &out.decision.errors {
        println!("\nerror: {e}");
    }
    if !out.decision.allowed && out.decision.reasons.is_empty() {
        println!("\nNo permit policy matched this request, so it is denied by default.");
    }
    ExitCode::SUCCESS
}

pub fn schema(config: &Path) -> ExitCode {
    match load(config) {
        Ok((_, e)) => {
            print!("{}", e.schema_text);
            ExitCode::SUCCESS
        }
        Err(c) => c,
    }
}

pub fn who(user: String, groups: Vec<String>, provider: String, email: Option<String>) -> Who {
    Who {
        user,
        groups: groups.into_iter().filter(|g| !g.is_empty()).collect(),
        provider,
        email,
        method: AuthMethod::Jwt,
        claims: Default::default(),
    }
}
