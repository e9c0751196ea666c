//! portcullis authorization: Cedar policies (global, per app, per route) and route shorthand
//! rules, validated against the generated schema at load time, pre-selected per route so the
//! cost of a decision does not grow with the number of routes. `decide` is a pure function of
//! the loaded policies and the request: data in, decision (with its reasons) out.
//!
//! A decision builds only the context attributes the route's policies read (see `context`),
//! and the engine caches, per engine (so a reload starts afresh), the principal entity of
//! each identity and each decision by (route, identity, the values the context is built
//! from); see `cache`. `decide_uncached` bypasses both caches.

pub mod admin;
mod cache;
mod context;
pub mod schema;
pub mod shorthand;

use cedar_policy::{
    Authorizer, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use portcullis_config::{Config, Diagnostic};
use portcullis_identity::{AuthMethod, Identity};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

/// Built principals kept (identities in use at once; each holds its identity alive). An
/// identity's principal, and a decision, are kept from the second time they are needed on.
const PRINCIPALS: usize = 4096;
/// Decisions kept.
const DECISIONS: usize = 32768;
/// Entity stores kept per principal, one per (route, action) it was used with.
const STORES_PER_PRINCIPAL: usize = 32;

/// Every problem found in the policies, each located where it is written: a Cedar policy file
/// at the position Cedar reports, a shorthand rule at its `routes[N].allow[i]` (or `deny[i]`)
/// in the file that defines the route.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// The outcome of authorizing one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that decided: the satisfied `forbid`s on a deny, the satisfied `permit`s
    /// on an allow, sorted by id. Empty on a default deny.
    pub reasons: Vec<String>,
    /// Policies that failed to evaluate. A `permit` that fails is skipped (which can only
    /// deny); a `forbid` that fails denies, and is then the reason.
    pub errors: Vec<String>,
}

/// What a policy may look at in a request.
pub struct RequestInfo<'a> {
    /// Shared, as the identity layer hands it out: the engine's caches recognise an identity
    /// by this allocation (and keep it alive while they refer to it), so the same `Arc` on
    /// the next request finds its principal and decisions ready.
    pub identity: &'a Arc<Identity>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The path as the route matched it: canonical, without `;` parameters (encoded or
    /// not), and lower-case unless the route is case-sensitive (the proxy's
    /// `canon::match_path`). What `paths` rules read (`context.route_path`), so that every
    /// spelling the route takes, and a case-insensitive or parameter-dropping origin
    /// serves as the same path, is covered.
    pub route_path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub client_ip: IpAddr,
    pub tls_client_subject: Option<&'a str>,
    pub tls_client_cert: bool,
    pub request_id: &'a str,
    /// The time of the request; `None` means now, read only when a policy of the route
    /// reads `context.time`.
    pub now: Option<SystemTime>,
    /// The request's stick-table counters, for `context.limits` (see
    /// [`Engine::reads_limits`]); `None` reads as zeros.
    pub limits: Option<&'a dyn LimitValues>,
}

/// A request's stick-table counters, as `context.limits` reads them: the request has been
/// counted in each table it has a key for.
pub trait LimitValues {
    /// `kind` in `table` for this request, or `None` when the request was not counted there.
    fn value(&self, table: &str, kind: portcullis_limits::Kind) -> Option<u64>;
    /// The entry's tags in `table`.
    fn tags(&self, table: &str) -> Vec<String>;
}

/// `r` with `now` filled in when the route reads the time, so the cache key and the context
/// see the same second.
fn with_time<'r, 'a>(
    r: &'r RequestInfo<'a>,
    reads_time: bool,
    slot: &'r mut Option<RequestInfo<'a>>,
) -> &'r RequestInfo<'a> {
    if r.now.is_some() || !reads_time {
        return r;
    }
    slot.insert(RequestInfo {
        now: Some(SystemTime::now()),
        ..*r
    })
}

struct RoutePolicies {
    /// A number of its own, for cache keys.
    idx: u32,
    set: PolicySet,
    /// The policies that can apply to each action (indexed like `Engine::actions`), picked
    /// from `set` by their action scope on the route's first request with that action. Cedar
    /// then evaluates only those: a `GET` never pays for the route's `write` policies.
    by_action: Box<[std::sync::OnceLock<PolicySet>]>,
    resource: EntityUid,
    /// The route entity, built once; `None` when no policy of the route needs it in the
    /// entity store (no condition mentions `resource`).
    route: Option<Entity>,
    /// Which context attributes its policies read: what to build, what to key the cache on.
    plan: context::Plan,
}

/// A principal built for one identity (the `Arc` it came in, held so that its address, the
/// cache key, cannot be reused while the entry lives), with the entity stores built for it.
struct Principal {
    identity: Arc<Identity>,
    entity: Entity,
    /// By (route, action), or (`u32::MAX`, action) for the routes that need no route entity:
    /// principal, action (and route) entities, closure computed.
    stores: parking_lot::Mutex<HashMap<(u32, u8), Arc<Entities>>>,
}

/// A cached decision, holding the identity whose address is in its key.
#[derive(Clone)]
struct Cached {
    _identity: Arc<Identity>,
    decision: Arc<Decision>,
}

/// Entity type names, parsed once (parsing a name runs Cedar's parser).
struct Types {
    user: EntityTypeName,
    agent: EntityTypeName,
    group: EntityTypeName,
}

pub struct Engine {
    /// By route id (looked up per request; config-defined keys, so a fast hash is safe).
    routes: HashMap<String, RoutePolicies, foldhash::fast::RandomState>,
    context_headers: Vec<http::HeaderName>,
    /// The stick tables `context.limits` shows, with their counters.
    tables: Vec<context::ContextTable>,
    claims: Vec<String>,
    authorizer: Authorizer,
    /// The action entity of each method (with its `read` or `write` parent), from the schema,
    /// in the order of `schema::READ_METHODS` then `schema::WRITE_METHODS`.
    /// A request's entity store holds only its principal, its route and its action.
    actions: Vec<(&'static str, Entity)>,
    /// Principals by the address of their identity's `Arc`.
    principals: cache::Sharded<usize, Arc<Principal>>,
    /// Decisions by route, identity address and the context values the route reads.
    decisions: cache::Sharded<Arc<[u8]>, Cached>,
    /// Decision keys (by hash) seen once: cached when seen again.
    seen: cache::Doorkeeper,
    /// Identities (the `Arc`s) seen once: their principal is cached when seen again.
    identities: cache::SeenArcs<Identity>,
    hasher: std::collections::hash_map::RandomState,
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

/// A problem in a policy file, at a byte offset of its text (the start of the file if none).
pub(crate) fn at_offset(
    path: &Path,
    text: &str,
    offset: Option<usize>,
    message: impl Into<String>,
) -> Diagnostic {
    let (line, col) = offset.map_or((1, 1), |o| line_col(text, o));
    Diagnostic {
        file: path.to_path_buf(),
        line,
        col,
        message: message.into(),
    }
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
fn parse_file(path: &Path, text: &str, problems: &mut Vec<Diagnostic>) -> Vec<(Policy, String)> {
    let set = match PolicySet::from_str(text) {
        Ok(s) => s,
        Err(errs) => {
            for e in errs.iter() {
                problems.push(at_offset(path, text, first_offset(e), diag_message(e, e)));
            }
            return Vec::new();
        }
    };
    if set.templates().next().is_some() {
        problems.push(at_offset(
            path,
            text,
            None,
            "policy templates (?principal, ?resource) are not supported: write static policies",
        ));
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

/// The stick tables of the config as `context.limits` shows them. A counter the limits
/// engine does not know is left out (`portcullis check` reports it).
fn context_tables(cfg: &Config) -> Vec<context::ContextTable> {
    cfg.stick_tables
        .iter()
        .map(|t| {
            let attrs = t
                .store
                .iter()
                .filter_map(|c| portcullis_limits::Counter::parse(c).ok())
                .map(|c| {
                    let name = if c.kind() == portcullis_limits::Kind::Tags {
                        "tags".to_string()
                    } else {
                        c.context_name()
                    };
                    (name, c.kind())
                })
                .collect();
            (t.name.clone(), attrs)
        })
        .collect()
}

impl Engine {
    /// Loads and validates every policy of the config. All problems are reported at once.
    pub fn build(cfg: &Config) -> Result<Engine, Error> {
        let tables = context_tables(cfg);
        let table_attrs: Vec<schema::TableAttrs> = tables
            .iter()
            .map(|(n, a)| (n.clone(), a.iter().map(|(x, _)| x.clone()).collect()))
            .collect();
        let schema_text = schema::schema_text(&cfg.policy.context_headers, &table_attrs);
        let schema = Schema::from_cedarschema_str(&schema_text)
            .map_err(|e| {
                Error::Invalid(vec![cfg.root_loc("policy.context_headers").diag(format!(
                    "policy.context_headers produce an invalid schema: {e}"
                ))])
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
                Err(e) => problems.push(at_offset(
                    f,
                    "",
                    None,
                    format!("cannot read policy file: {e}"),
                )),
            }
        }
        // Validate every file's policies (once) against the schema.
        let actions = schema.action_entities().map_err(|e| {
            Error::Invalid(vec![cfg
                .root_loc("policy")
                .diag(format!("schema actions: {e}"))])
        })?;
        let validator = Validator::new(schema);
        let mut seen_ids: HashMap<String, PathBuf> = HashMap::new();
        for (f, policies) in &files {
            let mut set = PolicySet::new();
            for (p, _) in policies {
                let id = p.id().to_string();
                if let Some(other) = seen_ids.insert(id.clone(), f.clone()) {
                    if &other != f {
                        problems.push(at_offset(
                            f,
                            "",
                            None,
                            format!(
                                "policy id `{id}` is also used in {}: ids must be unique",
                                other.display()
                            ),
                        ));
                    }
                }
                if let Err(e) = set.add(p.clone()) {
                    problems.push(at_offset(f, "", None, e.to_string()));
                }
            }
            let text = texts.get(f).map(String::as_str).unwrap_or("");
            let result = validator.validate(&set, ValidationMode::Strict);
            for e in result.validation_errors() {
                problems.push(at_offset(
                    f,
                    text,
                    first_offset(e),
                    format!("policy `{}`: {}", e.policy_id(), diag_message(e, e)),
                ));
            }
        }
        let context_headers: Vec<http::HeaderName> = cfg
            .policy
            .context_headers
            .iter()
            .filter_map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        // What each file's policies read of the context, merged per file (files are shared
        // by many routes).
        let file_uses: HashMap<&PathBuf, context::Use> = files
            .iter()
            .map(|(f, policies)| {
                let mut u = context::Use::default();
                for (p, _) in policies {
                    u.merge(&context::Use::of_policy(p));
                }
                (f, u)
            })
            .collect();
        // Per-route policy sets: global + app + route files + the route's shorthand rules.
        let mut routes = HashMap::default();
        let mut sources = HashMap::new();
        for (p, src) in files.values().flatten() {
            sources.insert(p.id().to_string(), src.clone());
        }
        for r in &cfg.routes {
            if r.spec.public {
                continue;
            }
            let mut set = PolicySet::new();
            let mut uses = context::Use::default();
            for f in cfg.global_policies.iter().chain(r.policy_files.iter()) {
                for (p, _) in files.get(f).into_iter().flatten() {
                    let _ = set.add(p.clone());
                }
                if let Some(u) = file_uses.get(f) {
                    uses.merge(u);
                }
            }
            let mut short = PolicySet::new();
            // Where each rule is written, by its policy id, for the validator's errors.
            let mut rule_at: HashMap<String, String> = HashMap::new();
            for (effect, kind, rules) in [
                ("permit", "allow", &r.spec.allow),
                ("forbid", "deny", &r.spec.deny),
            ] {
                for (i, rule) in rules.iter().enumerate() {
                    let id = format!("{}/{kind}[{}]", r.id, i + 1);
                    let at = format!("{kind}[{i}]");
                    let text =
                        shorthand::compile(rule, effect, &r.id, r.spec.matcher.case_sensitive);
                    match Policy::parse(Some(PolicyId::new(&id)), &text) {
                        Ok(p) => {
                            sources.insert(id.clone(), text);
                            uses.merge(&context::Use::of_policy(&p));
                            let _ = short.add(p.clone());
                            let _ = set.add(p);
                            rule_at.insert(id, at);
                        }
                        Err(e) => problems.push(cfg.route_loc(&r.id, &at).diag(format!(
                            "route `{}` {kind}[{}]: {e}",
                            r.id,
                            i + 1
                        ))),
                    }
                }
            }
            for e in validator
                .validate(&short, ValidationMode::Strict)
                .validation_errors()
            {
                let id = e.policy_id().to_string();
                let at = rule_at.get(&id).map_or("", String::as_str);
                problems.push(cfg.route_loc(&r.id, at).diag(format!(
                    "route `{}`: rule `{id}` does not fit the schema: {e}",
                    r.id
                )));
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
                    let idx = routes.len() as u32;
                    routes.insert(
                        r.id.clone(),
                        RoutePolicies {
                            idx,
                            set,
                            by_action: (0..schema::READ_METHODS.len()
                                + schema::WRITE_METHODS.len())
                                .map(|_| std::sync::OnceLock::new())
                                .collect(),
                            resource,
                            route: uses.resource.then_some(route),
                            plan: context::Plan::new(&uses, &context_headers),
                        },
                    );
                }
                Err(e) => problems.push(
                    cfg.route_loc(&r.id, "")
                        .diag(format!("route `{}`: {e}", r.id)),
                ),
            }
        }
        let mut action_entities = Vec::new();
        for m in schema::READ_METHODS
            .iter()
            .chain(schema::WRITE_METHODS.iter())
        {
            match actions.get(&uid("Portcullis::Action", m)) {
                Some(e) => {
                    action_entities.push((*m, e.clone()));
                }
                None => problems.push(
                    cfg.root_loc("policy")
                        .diag(format!("schema: no action entity for `{m}`")),
                ),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        Ok(Engine {
            routes,
            context_headers,
            tables,
            claims: cfg.policy.claims.clone(),
            authorizer: Authorizer::new(),
            actions: action_entities,
            principals: cache::Sharded::new(PRINCIPALS),
            decisions: cache::Sharded::new(DECISIONS),
            seen: cache::Doorkeeper::new(2 * DECISIONS),
            identities: cache::SeenArcs::new(2 * PRINCIPALS),
            hasher: std::collections::hash_map::RandomState::new(),
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
    ///
    /// Repeated decisions are served from the engine's cache: the key is the route, the
    /// identity (by its `Arc`), the method and every context value the route's policies
    /// read, so a hit is the decision the policies would make again. Routes whose policies
    /// read `context.request_id` (or use `context` whole) are never cached, nor are
    /// decisions with errors.
    pub fn decide(&self, route: &str, r: &RequestInfo<'_>) -> Arc<Decision> {
        let Some(rp) = self.routes.get(route) else {
            return Arc::new(no_route(route));
        };
        let mut slot = None;
        let r = with_time(r, rp.plan.reads_time(), &mut slot);
        if !rp.plan.cacheable {
            return Arc::new(self.evaluate(rp, r, true).0);
        }
        let addr = Arc::as_ptr(r.identity) as usize;
        let mut key = Vec::with_capacity(64 + r.path.len());
        key.extend_from_slice(&rp.idx.to_le_bytes());
        key.extend_from_slice(&addr.to_le_bytes());
        rp.plan.write_key(r, &self.context_headers, &mut key);
        let shard = cache::shard_of(addr, rp.idx);
        if let Some(c) = self.decisions.get(shard, key.as_slice()) {
            return c.decision;
        }
        let (d, principal_kept) = self.evaluate(rp, r, true);
        let d = Arc::new(d);
        // Kept if its identity's principal is (the identity came back), it has no errors,
        // and this request was seen before.
        let again = self.seen.seen(self.hasher.hash_one(key.as_slice()));
        if again && principal_kept && d.errors.is_empty() {
            self.decisions.insert(
                shard,
                Arc::from(key),
                Cached {
                    _identity: r.identity.clone(),
                    decision: d.clone(),
                },
            );
        }
        d
    }

    /// Whether `route`'s policies read `context.limits`: the caller then counts the request
    /// in the route's stick tables before it asks, and passes the values in
    /// [`RequestInfo::limits`].
    pub fn reads_limits(&self, route: &str) -> bool {
        self.routes
            .get(route)
            .is_some_and(|rp| rp.plan.reads_limits())
    }

    /// Whether `route`'s decisions depend only on the identity and the method (its policies
    /// read no other context), so that, for one engine, the same identity `Arc` and method
    /// always get the same decision. A caller may then keep a decision without errors and
    /// reuse it for that identity and method, as the proxy does per client connection.
    pub fn decided_by_identity_and_method(&self, route: &str) -> bool {
        self.routes
            .get(route)
            .is_some_and(|rp| rp.plan.method_only())
    }

    /// `decide` without the caches: every entity and the context built afresh, nothing
    /// read from or written to the caches. Same answer; for measuring and checking.
    pub fn decide_uncached(&self, route: &str, r: &RequestInfo<'_>) -> Decision {
        match self.routes.get(route) {
            Some(rp) => {
                let mut slot = None;
                let r = with_time(r, rp.plan.reads_time(), &mut slot);
                self.evaluate(rp, r, false).0
            }
            None => no_route(route),
        }
    }

    /// Entries in the (principal, decision) caches.
    pub fn cached(&self) -> (usize, usize) {
        (self.principals.len(), self.decisions.len())
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

    /// The principal of this identity: from the cache, or built (and cached if this `Arc`
    /// was seen before). The flag says whether it is in the cache.
    fn cached_principal(&self, id: &Arc<Identity>) -> Result<(Arc<Principal>, bool), String> {
        let addr = Arc::as_ptr(id) as usize;
        let shard = cache::shard_of(addr, 0);
        if let Some(p) = self.principals.get(shard, &addr) {
            // The entry holds the `Arc`, so the address is still that identity's.
            debug_assert!(Arc::ptr_eq(&p.identity, id));
            return Ok((p, true));
        }
        let p = Arc::new(Principal {
            identity: id.clone(),
            entity: self.principal(id)?,
            stores: parking_lot::Mutex::new(HashMap::new()),
        });
        let again = self.identities.seen(id);
        if again {
            self.principals.insert(shard, addr, p.clone());
        }
        Ok((p, again))
    }

    /// The entity store of a request: its principal, its route and its action.
    fn store(
        &self,
        principal: Entity,
        route: &RoutePolicies,
        action: &Entity,
    ) -> Result<Entities, String> {
        // `add_entities` repairs the transitive closure of what it adds; `from_entities`
        // would run the general (and much slower) cycle-aware closure.
        let mut entities = vec![principal, action.clone()];
        entities.extend(route.route.clone());
        Entities::empty()
            .add_entities(entities, None)
            .map_err(|e| e.to_string())
    }

    /// The decision, and whether the principal is in the cache.
    fn evaluate(&self, rp: &RoutePolicies, r: &RequestInfo<'_>, cached: bool) -> (Decision, bool) {
        match self.try_evaluate(rp, r, cached) {
            Ok(d) => d,
            Err(e) => (
                Decision {
                    allowed: false,
                    reasons: vec![],
                    errors: vec![e],
                },
                false,
            ),
        }
    }

    fn try_evaluate(
        &self,
        rp: &RoutePolicies,
        r: &RequestInfo<'_>,
        cached: bool,
    ) -> Result<(Decision, bool), String> {
        let method = schema::action_for(r.method);
        let (action_idx, (_, action)) = self
            .actions
            .iter()
            .enumerate()
            .find(|(_, (m, _))| *m == method)
            .ok_or_else(|| format!("no action entity for `{}`", r.method))?;
        let mut principal_kept = false;
        let (principal_uid, entities) = if cached {
            let (p, kept) = self.cached_principal(r.identity)?;
            principal_kept = kept;
            // The store holds the route only if its policies need it.
            let at = (
                if rp.route.is_some() { rp.idx } else { u32::MAX },
                action_idx as u8,
            );
            let found = p.stores.lock().get(&at).cloned();
            let entities = match found {
                Some(e) => e,
                None => {
                    let e = Arc::new(self.store(p.entity.clone(), rp, action)?);
                    let mut stores = p.stores.lock();
                    if stores.len() >= STORES_PER_PRINCIPAL {
                        stores.clear();
                    }
                    stores.insert(at, e.clone());
                    e
                }
            };
            (p.entity.uid(), entities)
        } else {
            let principal = self.principal(r.identity)?;
            (
                principal.uid(),
                Arc::new(self.store(principal, rp, action)?),
            )
        };
        let context = rp.plan.build(r, &self.context_headers, &self.tables)?;
        let req = Request::new(
            principal_uid,
            action.uid(),
            rp.resource.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let set = match rp.by_action.get(action_idx) {
            Some(slot) => slot.get_or_init(|| for_action(&rp.set, method, &action.uid())),
            None => &rp.set,
        };
        let resp = self.authorizer.is_authorized(&req, set, &entities);
        // Cedar skips a policy that fails to evaluate: a `forbid` that errors (an overflow,
        // say) would let the request through. portcullis denies instead, naming it.
        let failed_forbids: Vec<String> = resp
            .diagnostics()
            .errors()
            .map(|cedar_policy::AuthorizationError::PolicyEvaluationError(e)| e.policy_id())
            .filter(|id| {
                set.policy(id)
                    .is_some_and(|p| p.effect() == cedar_policy::Effect::Forbid)
            })
            .map(ToString::to_string)
            .collect();
        let allowed = resp.decision() == cedar_policy::Decision::Allow && failed_forbids.is_empty();
        let mut reasons: Vec<String> = if allowed || failed_forbids.is_empty() {
            resp.diagnostics().reason().map(|p| p.to_string()).collect()
        } else {
            failed_forbids
        };
        // Cedar gives them as a set; sorted, the same decision always reads the same.
        reasons.sort_unstable();
        let d = Decision {
            allowed,
            reasons,
            errors: resp.diagnostics().errors().map(|e| e.to_string()).collect(),
        };
        Ok((d, principal_kept))
    }
}

/// The policies of `set` whose action scope admits `action` (the HTTP method's action entity,
/// a member of the `read` or `write` group). The others cannot be satisfied by a request
/// with that action, so leaving them out changes no decision, reason or error.
fn for_action(set: &PolicySet, method: &str, action: &EntityUid) -> PolicySet {
    let group = if schema::READ_METHODS.contains(&method) {
        "read"
    } else {
        "write"
    };
    let group = EntityUid::from_type_name_and_id(
        action.type_name().clone(),
        cedar_policy::EntityId::new(group),
    );
    let mut out = PolicySet::new();
    for p in set.policies() {
        let applies = match p.action_constraint() {
            cedar_policy::ActionConstraint::Any => true,
            cedar_policy::ActionConstraint::Eq(a) => &a == action,
            cedar_policy::ActionConstraint::In(list) => {
                list.iter().any(|a| a == action || *a == group)
            }
        };
        if applies {
            // Ids are unique in `set`, so adding cannot fail.
            let _ = out.add(p.clone());
        }
    }
    out
}

fn no_route(route: &str) -> Decision {
    Decision {
        allowed: false,
        reasons: vec![],
        errors: vec![format!("no policies loaded for route `{route}`")],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_picked_by_action_scope() {
        let set = PolicySet::from_str(
            r#"
            @id("any") permit(principal, action, resource);
            @id("read") permit(principal, action in Portcullis::Action::"read", resource);
            @id("write") forbid(principal, action in Portcullis::Action::"write", resource);
            @id("get") permit(principal, action == Portcullis::Action::"GET", resource);
            @id("list") permit(principal, action in [Portcullis::Action::"DELETE", Portcullis::Action::"HEAD"], resource);
            "#,
        )
        .unwrap();
        let ids = |method: &str| {
            let uid = EntityUid::from_str(&format!("Portcullis::Action::\"{method}\"")).unwrap();
            let mut v: Vec<String> = for_action(&set, method, &uid)
                .policies()
                .map(|p| p.annotation("id").unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids("GET"), ["any", "get", "read"]);
        assert_eq!(ids("HEAD"), ["any", "list", "read"]);
        assert_eq!(ids("POST"), ["any", "write"]);
        assert_eq!(ids("DELETE"), ["any", "list", "write"]);
        assert_eq!(ids("OTHER"), ["any", "write"]);
    }
}
