//! A snapshot is one immutable, validated, compiled config: the route table, backends with
//! their balancers and connectors, and pre-resolved metric handles. A request loads the
//! current snapshot once and uses it to the end; a reload builds a new one off the request
//! path and swaps it in atomically.

use crate::phase::balance::balancer::{Balancer, Slot};
use crate::phase::route::router::Router;
use crate::record::{Metrics, CLASSES};
use crate::state::StateRegistry;
use crate::upstream::pool::Connector;
use http::HeaderValue;
use portcullis_config::{Config, HealthCheck, Outlier, Retries, RetryOn};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The signed assertion for the origin (`headers.assertion`); no client may send it.
pub static ASSERTION_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-portcullis-assertion");

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("backend `{backend}`: {source}")]
    Tls {
        backend: String,
        source: crate::edge::tls::TlsError,
    },
    #[error("{0}")]
    Limits(String),
    /// Problems in `triggers:`, each located as `file:line:col: message`.
    #[error("{0}")]
    Triggers(String),
    /// Problems in `admin.policies` or `workflows:`, each located.
    #[error("{0}")]
    Located(String),
}

pub struct ServerRt {
    pub name: String,
    pub address: String,
    pub echo: bool,
    pub max_connections: Option<usize>,
    /// The opaque value of the stickiness cookie for this server.
    pub sticky_id: String,
}

pub struct BackendRt {
    pub id: String,
    pub servers: Vec<ServerRt>,
    pub slots: Vec<Slot>,
    pub balancer: Balancer,
    pub connector: Connector,
    pub host: Option<HeaderValue>,
    pub retries: Retries,
    pub retry_connect: bool,
    pub retry_status: Vec<u16>,
    pub outlier: Option<Outlier>,
    pub health: Option<HealthCheck>,
    pub response_timeout: Duration,
    pub queue_timeout: Duration,
    pub sticky_cookie: Option<String>,
    pub in_flight: Arc<AtomicUsize>,
    pub retries_in_flight: Arc<AtomicUsize>,
    pub retry_counter: Counter,
    pub ejection_counter: Counter,
    pub connect_hist: Histogram,
}

pub struct RouteRt {
    pub id: Arc<str>,
    pub public: bool,
    pub auth: Vec<String>,
    /// An `mtls` provider is among `auth`.
    pub has_mtls: bool,
    pub cert_required: bool,
    pub upstream_headers: Vec<(http::HeaderName, String)>,
    pub assertion: bool,
    pub pass_token: bool,
    /// The route's policies read no request context but the method, so a connection may
    /// remember a decision for its identity and method (see `memo`). Found once per build.
    pub memo_decisions: bool,
    /// The route's policies read `context.limits` (its counters, counted before authorize).
    pub reads_limits: bool,
    /// `false`: shadow mode (decisions recorded, not enforced).
    pub enforce: bool,
    pub authorize_with: Vec<Arc<portcullis_authorizer::Authorizer>>,
    pub app: String,
    /// The route's configured backend. Requests go to [`RouteRt::current_backend`], which is
    /// this one unless the route is switched.
    pub backend: Arc<BackendRt>,
    /// Where a `switch_route` sent the route's traffic: 0 for `backend`, `n` for the
    /// snapshot's `backends[n - 1]`. Set from the long-lived switches (kept across reloads by
    /// route id, kept by the automation runtime), read once per request.
    pub switched: AtomicUsize,
    pub max_body: Option<u64>,
    pub timeout: Option<Duration>,
    pub retry_non_idempotent: bool,
    /// The route's overrides of its listener's rules (`canon::Rules`); None: the listener's.
    pub escaped_slashes: Option<portcullis_config::EscapedSlashes>,
    pub method_override: Option<portcullis_config::MethodOverride>,
    /// Upgrade protocols, lower-case, never `h2c`.
    pub upgrades: Option<Vec<String>>,
    /// The client's trailers go to the origin (`request_trailers: true`).
    pub request_trailers: bool,
    /// What a `GET`, `HEAD` or `TRACE` request with a body gets (`get_body`).
    pub get_body: portcullis_config::GetBody,
    /// The route matches paths case-sensitively (`match.case_sensitive`); else policies get
    /// `context.route_path` in lower case.
    pub case_sensitive: bool,
    pub by_class: [Counter; 5],
    /// Decisions made on the route: allow, deny, would_deny.
    pub decisions: [Counter; 3],
    pub duration: Histogram,
    /// Tables tracked, rules and plan; None when the route has no `limits` (the limit phase
    /// then costs one branch).
    pub limits: Option<Box<crate::limits::RouteLimits>>,
}

impl RouteRt {
    /// The backend this route's requests go to now: its own, or the one a `switch_route`
    /// chose. One relaxed atomic load.
    #[inline]
    pub fn current_backend<'a>(&'a self, snap: &'a Snapshot) -> &'a BackendRt {
        match self.switched.load(Ordering::Relaxed) {
            0 => &self.backend,
            n => snap.backends.get(n - 1).map_or(&*self.backend, |b| &**b),
        }
    }
}

pub struct Snapshot {
    pub config: Arc<Config>,
    pub version: String,
    pub loaded_at: SystemTime,
    pub router: Router,
    pub routes: Vec<RouteRt>,
    pub backends: Vec<Arc<BackendRt>>,
    pub trusted: Vec<ipnet::IpNet>,
    pub identity: Arc<portcullis_identity::Engine>,
    pub policy: Arc<portcullis_policy::Engine>,
    pub authorizers: Arc<portcullis_authorizer::Authorizers>,
    /// Headers no client may set on any route: every `headers.upstream` name of every route,
    /// plus the assertion header (anything under `x-portcullis-` is also removed).
    pub strip_headers: Arc<[http::HeaderName]>,
    /// What no client may send: `strip_headers`, and the headers authorizers set
    /// (`upstream_headers`). Removed from every request (see `phase::check`).
    pub unforgeable: Arc<[http::HeaderName]>,
    /// The triggers of `triggers:`, validated.
    pub triggers: Arc<Vec<portcullis_automation::TriggerCfg>>,
    /// The Cedar policies of `admin.policies`, for commands by triggers and workflows.
    pub admin_policies: Arc<portcullis_policy::admin::AdminPolicies>,
    /// The workflow definitions, validated.
    pub workflows: Arc<Vec<portcullis_automation::workflow::runner::Loaded>>,
}

/// The Cedar policies of `admin.policies`, or their problems, located.
fn admin_policies(config: &Config) -> Result<portcullis_policy::admin::AdminPolicies, BuildError> {
    let files = config.admin.as_ref().map_or(&[][..], |a| &a.policies[..]);
    portcullis_policy::admin::AdminPolicies::load(files).map_err(|d| {
        let lines: Vec<String> = d.iter().map(|d| d.to_string()).collect();
        BuildError::Located(lines.join("\n"))
    })
}

impl Snapshot {
    /// Gives each server's `max_connections` gate this config's limit: when the snapshot is
    /// installed, not when it is built, so that a reload that fails after the build leaves
    /// the running limits as they were.
    pub fn apply_limits(&self) {
        for b in &self.backends {
            for (server, slot) in b.servers.iter().zip(&b.slots) {
                slot.state.gate.set_limit(server.max_connections);
            }
        }
    }

    pub fn build(
        config: Arc<Config>,
        registry: &StateRegistry,
        limits: &crate::limits::Registry,
        metrics: &Metrics,
        identity: Arc<portcullis_identity::Engine>,
        policy: Arc<portcullis_policy::Engine>,
        authorizers: Arc<portcullis_authorizer::Authorizers>,
    ) -> Result<Snapshot, BuildError> {
        let mut backends = Vec::new();
        let mut by_id: HashMap<&str, Arc<BackendRt>> = HashMap::new();
        for b in &config.backends {
            let rt = backend(b, registry, metrics)?;
            by_id.insert(&b.id, rt.clone());
            backends.push(rt);
        }
        let tables = config
            .stick_tables
            .iter()
            .map(|t| Ok((t.name.as_str(), limits.table(t)?)))
            .collect::<Result<HashMap<_, _>, String>>()
            .map_err(BuildError::Limits)?;
        let plans = Arc::new(
            crate::plans::Assignment::build(&config, &limits.plans).map_err(BuildError::Limits)?,
        );
        let mut routes = Vec::new();
        for r in &config.routes {
            // Validation guarantees the backend exists.
            let Some(backend) = by_id.get(r.backend_id.as_str()).cloned() else {
                continue;
            };
            let (by_class, decisions) = route_counters(metrics, r);
            let spec = &r.spec;
            let route_limits =
                route_limits(r, &tables, &plans, metrics, policy.reads_limits(&r.id))?;
            let has_mtls = spec.auth.iter().any(|a| {
                identity
                    .provider(a)
                    .is_some_and(|p| p.kind == portcullis_config::ProviderKind::Mtls)
            });
            routes.push(RouteRt {
                id: Arc::from(r.id.as_str()),
                public: spec.public,
                auth: spec.auth.clone(),
                has_mtls,
                cert_required: spec.client_cert == Some(portcullis_config::CertMode::Required),
                upstream_headers: spec
                    .headers
                    .upstream
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok()?,
                            v.clone(),
                        ))
                    })
                    .collect(),
                assertion: spec.headers.assertion,
                pass_token: spec.headers.pass_token,
                memo_decisions: policy.decided_by_identity_and_method(&r.id),
                reads_limits: policy.reads_limits(&r.id),
                enforce: spec.enforce,
                authorize_with: spec
                    .authorize_with
                    .iter()
                    .filter_map(|n| authorizers.get(n).cloned())
                    .collect(),
                app: r.app.clone(),
                backend,
                switched: AtomicUsize::new(0),
                max_body: r.spec.max_body_size.map(|s| s.0),
                timeout: r.spec.timeout.map(|d| d.0),
                retry_non_idempotent: r.spec.retry_non_idempotent,
                escaped_slashes: spec.normalize.escaped_slashes,
                method_override: spec.method_override,
                upgrades: spec.upgrades.as_deref().map(crate::edge::canon::lower_all),
                request_trailers: spec.request_trailers,
                get_body: spec.get_body,
                case_sensitive: spec.matcher.case_sensitive,
                by_class,
                decisions,
                duration: metrics
                    .duration
                    .get_or_create(&vec![("route", r.id.clone())])
                    .clone(),
                limits: route_limits,
            });
        }
        let (strip_headers, unforgeable) = header_lists(&config, &authorizers);
        Ok(Snapshot {
            identity,
            policy,
            authorizers,
            strip_headers,
            unforgeable,
            // Set by the caller, which validates them (`automate::check::triggers`).
            triggers: Arc::default(),
            admin_policies: Arc::new(admin_policies(&config)?),
            // Set by the caller, which loads them (`workflows::load`).
            workflows: Arc::default(),
            router: Router::build(&config.routes),
            version: config.version.clone(),
            trusted: config.trusted_proxies.clone(),
            loaded_at: SystemTime::now(),
            routes,
            backends,
            config,
        })
    }

    pub fn backend(&self, id: &str) -> Option<&Arc<BackendRt>> {
        self.backends.iter().find(|b| b.id == id)
    }
}

/// A route's request counters by status class, and its decision counters (allow, deny,
/// would_deny).
fn route_counters(
    metrics: &Metrics,
    r: &portcullis_config::RouteDef,
) -> ([Counter; 5], [Counter; 3]) {
    let by_class = CLASSES.map(|c| {
        metrics
            .requests
            .get_or_create(&vec![
                ("route", r.id.clone()),
                ("backend", r.backend_id.clone()),
                ("code", c.to_string()),
            ])
            .clone()
    });
    let decisions = ["allow", "deny", "would_deny"].map(|d| {
        metrics
            .decisions
            .get_or_create(&vec![("route", r.id.clone()), ("decision", d.to_string())])
            .clone()
    });
    (by_class, decisions)
}

/// A route's `limits`, compiled: its tables (from the registry), rules with their
/// pre-resolved counters, and its plan. None when the route counts and limits nothing.
/// `reads_limits`: the route's policies read `context.limits` (so every counter is read).
fn route_limits(
    r: &portcullis_config::RouteDef,
    tables: &HashMap<&str, Arc<crate::limits::TableRt>>,
    plans: &Arc<crate::plans::Assignment>,
    metrics: &Metrics,
    reads_limits: bool,
) -> Result<Option<Box<crate::limits::RouteLimits>>, BuildError> {
    use crate::limits::{Action, PlanUse, Queue, Rule};
    let l = &r.spec.limits;
    if l.track.is_empty() && l.rules.is_empty() && l.plan.is_none() {
        return Ok(None);
    }
    let bad = |m: String| BuildError::Limits(format!("route `{}`: {m}", r.id));
    let track = l
        .track
        .iter()
        .map(|n| tables.get(n.as_str()).cloned())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("tracks an undefined stick table".into()))?;
    let mut rules = Vec::new();
    let mut marks = Vec::new();
    for rule in &l.rules {
        let table = l
            .track
            .iter()
            .position(|t| *t == rule.table)
            .ok_or_else(|| bad(format!("a rule reads untracked table `{}`", rule.table)))?;
        let counter =
            portcullis_limits::Counter::parse(&rule.counter).map_err(|e| bad(e.to_string()))?;
        let (action, family, label) = match rule.action {
            portcullis_config::LimitAction::Deny => (Action::Deny, &metrics.limit_rejections, "by"),
            portcullis_config::LimitAction::Tarpit => (
                Action::Tarpit(rule.delay.map_or(Duration::ZERO, |d| d.0)),
                &metrics.limit_rejections,
                "by",
            ),
            portcullis_config::LimitAction::Queue => (
                Action::Queue(Queue {
                    passed: metrics
                        .limit_queued
                        .get_or_create(&vec![
                            ("route", r.id.clone()),
                            ("table", rule.table.clone()),
                        ])
                        .clone(),
                    max_wait: rule.max_wait.map_or(Duration::ZERO, |d| d.0),
                    max_queue: rule.max_queue,
                    waiting: Default::default(),
                }),
                &metrics.limit_rejections,
                "by",
            ),
            portcullis_config::LimitAction::Mark => {
                let h = rule.header.as_deref().unwrap_or_default();
                let h = http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|e| bad(e.to_string()))?;
                marks.push(h.clone());
                (Action::Mark(h), &metrics.limit_marks, "table")
            }
        };
        let retry = counter
            .period()
            .map_or(1, |p| crate::limits::ceil_secs(p.as_duration()).max(1));
        rules.push(Rule {
            table,
            kind: counter.kind(),
            above: rule.above,
            action,
            status: http::StatusCode::from_u16(rule.status.unwrap_or(429))
                .map_err(|e| bad(e.to_string()))?,
            retry_after: HeaderValue::from(retry),
            counter: family
                .get_or_create(&vec![("route", r.id.clone()), (label, rule.table.clone())])
                .clone(),
        });
    }
    let plan = match &l.plan {
        Some(name) => Some(
            plans
                .index(name)
                .ok_or_else(|| bad(format!("usage plan `{name}` is not defined")))?,
        ),
        None => None,
    };
    let plan = plans.any().then(|| PlanUse {
        assignment: plans.clone(),
        default: plan,
        rejected: plans
            .plans
            .iter()
            .map(|p| {
                metrics
                    .limit_rejections
                    .get_or_create(&vec![
                        ("route", r.id.clone()),
                        ("by", format!("plan:{}", p.name)),
                    ])
                    .clone()
            })
            .collect(),
    });
    Ok(Some(Box::new(crate::limits::RouteLimits {
        checks: metrics
            .limit_checks
            .get_or_create(&vec![("route", r.id.clone())])
            .clone(),
        read: counters_read(&rules, track.len(), reads_limits),
        track,
        waits: rules
            .iter()
            .any(|r| matches!(r.action, Action::Tarpit(_) | Action::Queue(_))),
        rules,
        plan,
        marks,
    })))
}

/// By track index, the counters a route reads in each table: its rules', or every counter
/// when its policies read `context.limits`.
fn counters_read(
    rules: &[crate::limits::Rule],
    tables: usize,
    reads_limits: bool,
) -> Vec<portcullis_limits::Kinds> {
    use portcullis_limits::Kinds;
    let all = if reads_limits {
        Kinds::ALL
    } else {
        Kinds::NONE
    };
    let mut read = vec![all; tables];
    for r in rules {
        if let Some(k) = read.get_mut(r.table) {
            *k = k.with(r.kind);
        }
    }
    read
}

/// One backend's runtime form: its servers (with their long-lived state from the registry),
/// balancer, connector and retry settings, and its metric handles.
fn backend(
    b: &portcullis_config::BackendDef,
    registry: &StateRegistry,
    metrics: &Metrics,
) -> Result<Arc<BackendRt>, BuildError> {
    let spec = &b.spec;
    let tls = match &spec.tls {
        Some(t) => Some((
            crate::edge::tls::client_config(t, spec.protocol).map_err(|source| {
                BuildError::Tls {
                    backend: b.id.clone(),
                    source,
                }
            })?,
            t.sni.clone(),
        )),
        None => None,
    };
    let mut servers = Vec::new();
    let mut slots = Vec::new();
    for (s, name) in spec.servers.iter().zip(&b.server_names) {
        let key = format!("{}/{}", b.id, name);
        let state = registry.server(&key, &s.address);
        servers.push(ServerRt {
            name: name.clone(),
            address: s.address.clone(),
            echo: s.address == "builtin:echo",
            max_connections: s.max_connections,
            sticky_id: format!(
                "{:016x}",
                crate::phase::balance::balancer::hash64(key.as_bytes())
            ),
        });
        slots.push(Slot {
            name: name.clone(),
            weight: s.weight,
            state,
        });
    }
    let label = vec![("backend", b.id.clone())];
    Ok(Arc::new(BackendRt {
        id: b.id.clone(),
        balancer: Balancer::new(spec.balance.clone(), &slots),
        servers,
        slots,
        connector: Connector {
            protocol: spec.protocol,
            tls,
            connect_timeout: spec.timeouts.connect.0,
            idle_timeout: spec.timeouts.idle.0,
        },
        host: spec
            .host
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok()),
        retry_connect: spec.retries.on.contains(&RetryOn::ConnectFailure),
        retry_status: spec
            .retries
            .on
            .iter()
            .filter_map(|r| match r {
                RetryOn::Status(s) => Some(*s),
                _ => None,
            })
            .collect(),
        retries: spec.retries.clone(),
        outlier: spec.outlier.clone(),
        health: spec.health_check.clone(),
        response_timeout: spec.timeouts.response.0,
        queue_timeout: spec.queue_timeout.0,
        sticky_cookie: spec.sticky.as_ref().map(|s| s.cookie.clone()),
        in_flight: Arc::new(AtomicUsize::new(0)),
        retries_in_flight: Arc::new(AtomicUsize::new(0)),
        retry_counter: metrics.retries.get_or_create(&label).clone(),
        ejection_counter: metrics.ejections.get_or_create(&label).clone(),
        connect_hist: metrics.connect.get_or_create(&label).clone(),
    }))
}

/// The identity headers portcullis sets (every route's `headers.upstream`, and the
/// assertion header), and what no client may send: those and the headers authorizers set
/// (`upstream_headers`). Sorted, without repeats.
fn header_lists(
    config: &portcullis_config::Config,
    authorizers: &portcullis_authorizer::Authorizers,
) -> (Arc<[http::HeaderName]>, Arc<[http::HeaderName]>) {
    let mut strip: Vec<http::HeaderName> = config
        .routes
        .iter()
        .flat_map(|r| r.spec.headers.upstream.keys())
        .filter_map(|k| http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok())
        .collect();
    strip.push(ASSERTION_HEADER.clone());
    let mut unforgeable = strip.clone();
    unforgeable.extend(
        authorizers
            .iter()
            .flat_map(|a| a.upstream_headers().iter().cloned()),
    );
    for list in [&mut strip, &mut unforgeable] {
        list.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        list.dedup();
    }
    (strip.into(), unforgeable.into())
}
