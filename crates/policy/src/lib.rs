//! portcullis authorization: Cedar policies (global, per app, per route) and route shorthand
//! rules, validated against the generated schema at load time, pre-selected per route so the
//! cost of a decision does not grow with the number of routes. `decide` is a pure function of
//! the loaded policies and the request: data in, decision (with its reasons) out.

pub mod schema;
pub mod shorthand;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use portcullis_config::Config;
use portcullis_identity::{AuthMethod, Identity};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

/// A problem in a policy file, located by file, line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// The outcome of authorizing one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that decided: the satisfied `forbid`s on a deny, the satisfied `permit`s
    /// on an allow. Empty on a default deny.
    pub reasons: Vec<String>,
    /// Policies that failed to evaluate (they are skipped, which can only deny).
    pub errors: Vec<String>,
}

/// What a policy may look at in a request.
pub struct RequestInfo<'a> {
    pub identity: &'a Identity,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub client_ip: IpAddr,
    pub tls_client_subject: Option<&'a str>,
    pub tls_client_cert: bool,
    pub request_id: &'a str,
    pub now: SystemTime,
}

struct RoutePolicies {
    set: PolicySet,
    resource: EntityUid,
    /// The route entity, built once.
    route: Entity,
}

/// Entity type names, parsed once (parsing a name runs Cedar's parser).
struct Types {
    user: EntityTypeName,
    agent: EntityTypeName,
    group: EntityTypeName,
}

pub struct Engine {
    routes: HashMap<String, RoutePolicies>,
    context_headers: Vec<http::HeaderName>,
    claims: Vec<String>,
    authorizer: Authorizer,
    /// The action entity of each method (with its `read` or `write` parent), from the schema.
    /// A request's entity store holds only its principal, its route and its action.
    actions: HashMap<&'static str, Entity>,
    types: Types,
    /// Every policy's source text, by id, for `explain`.
    sources: HashMap<String, String>,
    pub schema_text: String,
}

fn type_name(ty: &str) -> EntityTypeName {
    // The type names are ours and always valid.
    EntityTypeName::from_str(ty).unwrap_or_else(|_| unreachable!("valid type name {ty}"))
}

fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(ty), EntityId::new(id))
}

/// `ip("…")` for a client address. Building it makes Cedar parse the extension's name, which
/// costs more than the rest of the context; addresses repeat, so each thread keeps the last
/// ones it built.
fn ip_expression(ip: IpAddr) -> RestrictedExpression {
    const KEEP: usize = 1024;
    thread_local! {
        static MEMO: std::cell::RefCell<HashMap<IpAddr, RestrictedExpression>> =
            std::cell::RefCell::new(HashMap::new());
    }
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(e) = m.get(&ip) {
            return e.clone();
        }
        let e = RestrictedExpression::new_ip(ip.to_string());
        if m.len() >= KEEP {
            m.clear();
        }
        m.insert(ip, e.clone());
        e
    })
}

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

fn first_offset(d: &dyn miette::Diagnostic) -> Option<usize> {
    d.labels().and_then(|mut l| l.next()).map(|l| l.offset())
}

fn diag_message(d: &dyn miette::Diagnostic, top: &dyn std::fmt::Display) -> String {
    let mut m = top.to_string();
    if let Some(h) = d.help() {
        m.push_str(&format!(" (help: {h})"));
    }
    m
}

/// Parses one policy file. Policies get ids from an `@id("...")` annotation, else
/// `<file name>#<n>` (0-based position in the file).
fn parse_file(path: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<(Policy, String)> {
    let set = match PolicySet::from_str(text) {
        Ok(s) => s,
        Err(errs) => {
            for e in errs.iter() {
                let (line, col) = first_offset(e).map_or((1, 1), |o| line_col(text, o));
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line,
                    col,
                    message: diag_message(e, e),
                });
            }
            return Vec::new();
        }
    };
    if set.templates().next().is_some() {
        problems.push(Problem {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message:
                "policy templates (?principal, ?resource) are not supported: write static policies"
                    .into(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut policies: Vec<&Policy> = set.policies().collect();
    // `PolicySet` does not keep file order; the generated ids (policy0, policy1, ...) do.
    policies.sort_by_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(0)
    });
    for (i, p) in policies.into_iter().enumerate() {
        let id = p
            .annotation("id")
            .map(String::from)
            .unwrap_or_else(|| format!("{name}#{i}"));
        out.push((p.new_id(PolicyId::new(&id)), p.to_string()));
    }
    out
}

impl Engine {
    /// Loads and validates every policy of the config. All problems are reported at once.
    pub fn build(cfg: &Config) -> Result<Engine, Error> {
        let schema_text = schema::schema_text(&cfg.policy.context_headers);
        let schema = Schema::from_cedarschema_str(&schema_text)
            .map_err(|e| {
                Error::Invalid(vec![Problem {
                    file: cfg.root.clone(),
                    line: 1,
                    col: 1,
                    message: format!("policy.context_headers produce an invalid schema: {e}"),
                }])
            })?
            .0;
        let mut problems = Vec::new();
        // Parse each file once.
        let mut files: BTreeMap<PathBuf, Vec<(Policy, String)>> = BTreeMap::new();
        let mut texts: HashMap<PathBuf, String> = HashMap::new();
        let all_files = cfg
            .global_policies
            .iter()
            .chain(cfg.routes.iter().flat_map(|r| r.policy_files.iter()));
        for f in all_files {
            if files.contains_key(f) {
                continue;
            }
            match std::fs::read_to_string(f) {
                Ok(t) => {
                    let parsed = parse_file(f, &t, &mut problems);
                    files.insert(f.clone(), parsed);
                    texts.insert(f.clone(), t);
                }
                Err(e) => problems.push(Problem {
                    file: f.clone(),
                    line: 1,
                    col: 1,
                    message: format!("cannot read policy file: {e}"),
                }),
            }
        }
        // Validate every file's policies (once) against the schema.
        let actions = schema.action_entities().map_err(|e| {
            Error::Invalid(vec![Problem {
                file: cfg.root.clone(),
                line: 1,
                col: 1,
                message: format!("schema actions: {e}"),
            }])
        })?;
        let validator = Validator::new(schema);
        let mut seen_ids: HashMap<String, PathBuf> = HashMap::new();
        for (f, policies) in &files {
            let mut set = PolicySet::new();
            for (p, _) in policies {
                let id = p.id().to_string();
                if let Some(other) = seen_ids.insert(id.clone(), f.clone()) {
                    if &other != f {
                        problems.push(Problem {
                            file: f.clone(),
                            line: 1,
                            col: 1,
                            message: format!(
                                "policy id `{id}` is also used in {}: ids must be unique",
                                other.display()
                            ),
                        });
                    }
                }
                if let Err(e) = set.add(p.clone()) {
                    problems.push(Problem {
                        file: f.clone(),
                        line: 1,
                        col: 1,
                        message: e.to_string(),
                    });
                }
            }
            let text = texts.get(f).map(String::as_str).unwrap_or("");
            let result = validator.validate(&set, ValidationMode::Strict);
            for e in result.validation_errors() {
                let (line, col) = first_offset(e).map_or((1, 1), |o| line_col(text, o));
                problems.push(Problem {
                    file: f.clone(),
                    line,
                    col,
                    message: format!("policy `{}`: {}", e.policy_id(), diag_message(e, e)),
                });
            }
        }
        // Per-route policy sets: global + app + route files + the route's shorthand rules.
        let mut routes = HashMap::new();
        let mut sources = HashMap::new();
        for (p, src) in files.values().flatten() {
            sources.insert(p.id().to_string(), src.clone());
        }
        for r in &cfg.routes {
            if r.spec.public {
                continue;
            }
            let mut set = PolicySet::new();
            for f in cfg.global_policies.iter().chain(r.policy_files.iter()) {
                for (p, _) in files.get(f).into_iter().flatten() {
                    let _ = set.add(p.clone());
                }
            }
            let mut short = PolicySet::new();
            for (effect, kind, rules) in [
                ("permit", "allow", &r.spec.allow),
                ("forbid", "deny", &r.spec.deny),
            ] {
                for (i, rule) in rules.iter().enumerate() {
                    let id = format!("{}/{kind}[{}]", r.id, i + 1);
                    let text = shorthand::compile(rule, effect, &r.id);
                    match Policy::parse(Some(PolicyId::new(&id)), &text) {
                        Ok(p) => {
                            sources.insert(id.clone(), text);
                            let _ = short.add(p.clone());
                            let _ = set.add(p);
                        }
                        Err(e) => problems.push(Problem {
                            file: cfg.root.clone(),
                            line: 1,
                            col: 1,
                            message: format!("route `{}` {kind}[{}]: {e}", r.id, i + 1),
                        }),
                    }
                }
            }
            for e in validator
                .validate(&short, ValidationMode::Strict)
                .validation_errors()
            {
                problems.push(Problem {
                    file: cfg.root.clone(),
                    line: 1,
                    col: 1,
                    message: format!(
                        "route `{}`: rule `{}` does not fit the schema: {e}",
                        r.id,
                        e.policy_id()
                    ),
                });
            }
            let (host, path) = (
                r.spec.matcher.host.clone().unwrap_or_default(),
                r.spec
                    .matcher
                    .path
                    .clone()
                    .or(r.spec.matcher.path_prefix.clone())
                    .or(r.spec.matcher.path_regex.clone())
                    .unwrap_or_default(),
            );
            let resource = uid("Portcullis::Route", &r.id);
            let route = Entity::new(
                resource.clone(),
                [
                    (
                        "name".to_string(),
                        RestrictedExpression::new_string(r.spec.name.clone()),
                    ),
                    (
                        "app".to_string(),
                        RestrictedExpression::new_string(r.app.clone()),
                    ),
                    ("host".to_string(), RestrictedExpression::new_string(host)),
                    ("path".to_string(), RestrictedExpression::new_string(path)),
                ]
                .into_iter()
                .collect(),
                std::collections::HashSet::new(),
            );
            match route {
                Ok(route) => {
                    routes.insert(
                        r.id.clone(),
                        RoutePolicies {
                            set,
                            resource,
                            route,
                        },
                    );
                }
                Err(e) => problems.push(Problem {
                    file: cfg.root.clone(),
                    line: 1,
                    col: 1,
                    message: format!("route `{}`: {e}", r.id),
                }),
            }
        }
        let mut action_entities = HashMap::new();
        for m in schema::READ_METHODS
            .iter()
            .chain(schema::WRITE_METHODS.iter())
        {
            match actions.get(&uid("Portcullis::Action", m)) {
                Some(e) => {
                    action_entities.insert(*m, e.clone());
                }
                None => problems.push(Problem {
                    file: cfg.root.clone(),
                    line: 1,
                    col: 1,
                    message: format!("schema: no action entity for `{m}`"),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        Ok(Engine {
            routes,
            context_headers: cfg
                .policy
                .context_headers
                .iter()
                .filter_map(|h| {
                    http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                })
                .collect(),
            claims: cfg.policy.claims.clone(),
            authorizer: Authorizer::new(),
            actions: action_entities,
            types: Types {
                user: type_name("Portcullis::User"),
                agent: type_name("Portcullis::Agent"),
                group: type_name("Portcullis::Group"),
            },
            sources,
            schema_text,
        })
    }

    /// The source text of a policy, for explanations.
    pub fn source(&self, id: &str) -> Option<&str> {
        self.sources.get(id).map(String::as_str)
    }

    pub fn has_route(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    /// Decides whether the identity may make this request on `route`. Deny wins; with no
    /// satisfied `permit`, the answer is deny.
    pub fn decide(&self, route: &str, r: &RequestInfo<'_>) -> Decision {
        let Some(rp) = self.routes.get(route) else {
            return Decision {
                allowed: false,
                reasons: vec![],
                errors: vec![format!("no policies loaded for route `{route}`")],
            };
        };
        match self.evaluate(rp, r) {
            Ok(d) => d,
            Err(e) => Decision {
                allowed: false,
                reasons: vec![],
                errors: vec![e],
            },
        }
    }

    fn principal(&self, id: &Identity) -> Result<Entity, String> {
        let ty = match id.method {
            AuthMethod::ApiKey | AuthMethod::Mtls => &self.types.agent,
            AuthMethod::Jwt | AuthMethod::Session => &self.types.user,
        };
        let mut attrs = vec![
            (
                "user".to_string(),
                RestrictedExpression::new_string(id.user.clone()),
            ),
            (
                "subject".to_string(),
                RestrictedExpression::new_string(id.subject.clone()),
            ),
            (
                "provider".to_string(),
                RestrictedExpression::new_string(id.provider.clone()),
            ),
            (
                "auth_method".to_string(),
                RestrictedExpression::new_string(
                    match id.method {
                        AuthMethod::Jwt => "jwt",
                        AuthMethod::Session => "session",
                        AuthMethod::ApiKey => "api_key",
                        AuthMethod::Mtls => "mtls",
                    }
                    .into(),
                ),
            ),
        ];
        if let Some(e) = &id.email {
            attrs.push((
                "email".into(),
                RestrictedExpression::new_string(e.to_ascii_lowercase()),
            ));
        }
        let parents: Vec<EntityUid> = id
            .groups
            .iter()
            .map(|g| EntityUid::from_type_name_and_id(self.types.group.clone(), EntityId::new(g)))
            .collect();
        let tags = claim_tags(&id.claims, &self.claims);
        let principal = EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(&id.user));
        Entity::new_with_tags(principal, attrs, parents, tags).map_err(|e| e.to_string())
    }

    fn evaluate(&self, rp: &RoutePolicies, r: &RequestInfo<'_>) -> Result<Decision, String> {
        let principal = self.principal(r.identity)?;
        let principal_uid = principal.uid();
        let action = self
            .actions
            .get(schema::action_for(r.method))
            .ok_or_else(|| format!("no action entity for `{}`", r.method))?
            .clone();
        let action_uid = action.uid();
        // `add_entities` repairs the transitive closure of what it adds; `from_entities`
        // would run the general (and much slower) cycle-aware closure.
        let entities = Entities::empty()
            .add_entities([principal, rp.route.clone(), action], None)
            .map_err(|e| e.to_string())?;
        let context = self.context(r)?;
        let req = Request::new(
            principal_uid,
            action_uid,
            rp.resource.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let resp = self.authorizer.is_authorized(&req, &rp.set, &entities);
        let allowed = resp.decision() == cedar_policy::Decision::Allow;
        Ok(Decision {
            allowed,
            reasons: resp.diagnostics().reason().map(|p| p.to_string()).collect(),
            errors: resp.diagnostics().errors().map(|e| e.to_string()).collect(),
        })
    }

    fn context(&self, r: &RequestInfo<'_>) -> Result<Context, String> {
        let (query, query_keys): (Vec<_>, Vec<_>) = r
            .query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let k = kv.split('=').next().unwrap_or("");
                (
                    RestrictedExpression::new_string(kv.to_string()),
                    RestrictedExpression::new_string(k.to_string()),
                )
            })
            .unzip();
        let headers = self.context_headers.iter().filter_map(|h| {
            let v = r.headers.get(h)?.to_str().ok()?;
            Some((
                h.as_str().to_string(),
                RestrictedExpression::new_string(v.to_string()),
            ))
        });
        let secs = r
            .now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        const DAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"];
        let time = RestrictedExpression::new_record([
            (
                "timestamp".to_string(),
                RestrictedExpression::new_long(secs as i64),
            ),
            (
                "hour".to_string(),
                RestrictedExpression::new_long(((secs / 3600) % 24) as i64),
            ),
            (
                "weekday".to_string(),
                RestrictedExpression::new_string(DAYS[((secs / 86400) % 7) as usize].to_string()),
            ),
        ])
        .map_err(|e| e.to_string())?;
        let mut tls = vec![(
            "client_cert".to_string(),
            RestrictedExpression::new_bool(r.tls_client_cert),
        )];
        if let Some(s) = r.tls_client_subject {
            tls.push((
                "client_subject".into(),
                RestrictedExpression::new_string(s.to_string()),
            ));
        }
        let pairs = vec![
            (
                "path".to_string(),
                RestrictedExpression::new_string(r.path.to_string()),
            ),
            (
                "method".to_string(),
                RestrictedExpression::new_string(r.method.to_string()),
            ),
            ("query".to_string(), RestrictedExpression::new_set(query)),
            (
                "query_keys".to_string(),
                RestrictedExpression::new_set(query_keys),
            ),
            (
                "headers".to_string(),
                RestrictedExpression::new_record(headers).map_err(|e| e.to_string())?,
            ),
            ("ip".to_string(), ip_expression(r.client_ip)),
            ("time".to_string(), time),
            (
                "tls".to_string(),
                RestrictedExpression::new_record(tls).map_err(|e| e.to_string())?,
            ),
            (
                "request_id".to_string(),
                RestrictedExpression::new_string(r.request_id.to_string()),
            ),
        ];
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }
}

/// Claims as tags: every top-level scalar claim (strings as they are, numbers and booleans
/// as text), plus the nested paths listed in `policy.claims`.
fn claim_tags(claims: &serde_json::Value, extra: &[String]) -> Vec<(String, RestrictedExpression)> {
    let mut out = Vec::new();
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    if let Some(obj) = claims.as_object() {
        for (k, v) in obj {
            if let Some(s) = scalar(v) {
                out.push((k.clone(), RestrictedExpression::new_string(s)));
            }
        }
    }
    for path in extra {
        if let Some(s) = portcullis_identity::claims::lookup(claims, path).and_then(scalar) {
            out.push((path.clone(), RestrictedExpression::new_string(s)));
        }
    }
    out
}

pub type SharedEngine = Arc<Engine>;
