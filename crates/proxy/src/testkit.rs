//! Test helpers for running one phase at a time, with no sockets to clients: a real
//! [`Shared`] and [`Snapshot`] built from a YAML string (the same way `Runtime::start` builds
//! them, but binding no listener and fetching nothing), a [`ConnInfo`] for a client on
//! 127.0.0.1, and an [`Exchange`] from an `http::Request` builder.
//!
//! ```ignore
//! let kit = Kit::new("backends: [...]\nroutes: [...]").await;
//! let mut x = kit.exchange(Request::get("/hello").header("host", "example.com"));
//! assert!(is_next(&check::run(&mut x)));
//! assert!(is_next(&route::run(&mut x).await));
//! assert_eq!(x.route.unwrap().id.as_ref(), "default/hello");
//! ```
//!
//! Each kit lives in its own temporary directory, which holds the config, the dev issuer's
//! key, the access log (`access.log`) and the audit trail (`audit/`).

use crate::edge::canon::Rules;
use crate::edge::conn::ConnInfo;
use crate::exchange::{Exchange, Flow};
use crate::snapshot::Snapshot;
use crate::upstream::body::RespBody;
use crate::Shared;
use http::{Response, StatusCode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The size of the future a three-argument async fn returns, without calling it: for the
/// tests that keep the request path's futures small.
pub fn future_size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// What [`Kit::new`] puts before the YAML it is given: one listener `web` (never bound), the
/// access log in `access.log` and the audit trail in `audit/`, both in the kit's directory.
pub const HEAD: &str = "listeners: [{ name: web, bind: \"127.0.0.1:0\" }]\n\
                        access_log: { path: access.log }\n\
                        audit: { sink: file, dir: audit }\n";

/// A snapshot and the shared state of the request path, built from one config.
pub struct Kit {
    /// The kit's directory: the config, keys, access log and audit trail.
    pub dir: tempfile::TempDir,
    pub shared: Arc<Shared>,
    pub snap: Arc<Snapshot>,
    /// A client on 127.0.0.1, connected to the first listener, without TLS.
    pub conn: ConnInfo,
    /// The wall clock quotas and daily usage count by: [`KIT_TIME`] until moved.
    pub clock: Arc<portcullis_limits::wall::ManualWallClock>,
}

/// Where a kit's wall clock starts: 2026-12-06 12:00:00 UTC.
pub const KIT_TIME: i64 = 1_796_558_400;

impl Kit {
    /// A kit for `yaml` (identity, backends, routes...), after [`HEAD`]. Must run inside a
    /// Tokio runtime (the identity engine and the audit writer start tasks).
    pub async fn new(yaml: &str) -> Kit {
        Kit::from_yaml(&format!("{HEAD}{yaml}")).await
    }

    /// A kit for a whole config, written as `portcullis.yaml` in a new temporary directory
    /// (relative paths in it are relative to that directory).
    pub async fn from_yaml(yaml: &str) -> Kit {
        Kit::with_files(yaml, &[]).await
    }

    /// A kit for a whole config and the files it names (policies, key files), written beside
    /// it by their relative paths.
    pub async fn with_files(yaml: &str, files: &[(&str, &str)]) -> Kit {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("a temporary directory");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("the file is written");
        }
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, yaml).expect("the config is written");
        let config = match portcullis_config::load(&path) {
            Ok(c) => Arc::new(c),
            Err(e) => panic!("invalid test config: {e}\n---\n{yaml}"),
        };
        let metrics = Arc::new(crate::record::Metrics::default());
        let access = crate::record::AccessLog::start(&config.access_log).expect("the access log");
        let registry = crate::state::StateRegistry::default();
        let store = (!config.usage_plans.is_empty())
            .then(|| portcullis_store::Store::open(&config.state_dir).expect("the embedded store"));
        let clock = Arc::new(portcullis_limits::wall::ManualWallClock::from_unix_secs(
            KIT_TIME,
        ));
        let limits = crate::limits::Registry::new(
            crate::plans::PlanRegistry::new(store, clock.clone()),
            crate::limits::Fleet::of(&config).expect("the limit store"),
        );
        let identity = Arc::new(
            portcullis_identity::Engine::build(&config, None).expect("the identity engine"),
        );
        let policy = Arc::new(portcullis_policy::Engine::build(&config).expect("the policies"));
        let authorizers = Arc::new(portcullis_authorizer::Authorizers::build(
            &config.authorizers,
            None,
        ));
        let snap = Snapshot::build(
            config.clone(),
            &registry,
            &limits,
            &metrics,
            identity,
            policy,
            authorizers,
        )
        .expect("the snapshot");
        let audit = match config.audit.sink {
            portcullis_config::AuditSink::Off => None,
            _ => Some(
                portcullis_audit::Auditor::start(&config.audit, "testkit").expect("the auditor"),
            ),
        };
        let shared = Arc::new(Shared {
            snapshot: arc_swap::ArcSwap::from_pointee({
                snap.apply_limits();
                snap
            }),
            registry,
            limits,
            metrics,
            access,
            audit,
            events: crate::events::Events::off(portcullis_events::Source::new(
                "portcullis://testkit",
            )),
            abusers: Default::default(),
        });
        let snap = shared.snapshot.load_full();
        let rules = config.listeners.first().map(Rules::new).unwrap_or_default();
        let conn = ConnInfo::new(
            "127.0.0.1:40000".parse().expect("an address"),
            Arc::from(config.listeners.first().map_or("web", |l| l.name.as_str())),
            false,
            Arc::new(rules),
            None,
            Arc::default(),
        );
        Kit {
            dir,
            shared,
            snap,
            conn,
            clock,
        }
    }

    /// A new exchange for `req`, as the listener hands it to the pipeline.
    pub fn exchange(&self, req: http::request::Builder) -> Exchange<'_> {
        let (parts, ()) = req.body(()).expect("a valid request").into_parts();
        Exchange::new(&self.shared, &self.snap, &self.conn, parts, Instant::now())
    }

    /// An exchange for `req` that has been through `check` and `route`, both of which must
    /// let it go on: what identify, authorize and balance start from.
    pub async fn routed(&self, req: http::request::Builder) -> Exchange<'_> {
        let mut x = self.exchange(req);
        let f = crate::phase::check::run(&mut x);
        assert!(is_next(&f), "check: {}", describe(&f));
        let f = crate::phase::route::run(&mut x).await;
        assert!(is_next(&f), "route: {}", describe(&f));
        x
    }

    /// A token for `user` in `groups`, minted by the `dev_issuer` provider `provider`, as
    /// `portcullis token` mints it.
    pub fn token(&self, provider: &str, user: &str, groups: &[&str]) -> String {
        let config = &self.snap.config;
        let p = config
            .identity
            .providers
            .iter()
            .find(|p| p.name == provider)
            .unwrap_or_else(|| panic!("no provider `{provider}`"));
        let key = portcullis_identity::dev::load_or_create(Path::new(
            p.key_file.as_deref().expect("a dev issuer key file"),
        ))
        .expect("the dev issuer key");
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        key.mint(
            p.issuer.as_deref().unwrap_or_default(),
            p.audiences.first().map_or("portcullis", String::as_str),
            user,
            &groups,
            None,
            300,
        )
        .expect("a token")
    }

    /// The metrics, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        self.shared.metrics.encode()
    }

    /// The value of the sample named `series` (name and labels, as in [`Kit::metrics`]), or 0
    /// when there is none.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// How many requests the listener `web` refused for `reason`
    /// (`portcullis_requests_refused_total`).
    pub fn refused(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "portcullis_requests_refused_total{{listener=\"web\",reason=\"{reason}\"}}"
        ))
    }

    /// The access log's records, once there are at least `n` (the writer is a thread of its
    /// own; this waits up to 5 seconds for it).
    pub fn access_log(&self, n: usize) -> Vec<Value> {
        let path = self.dir.path().join("access.log");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<Value> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON access record"))
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every record of the audit trail (each is written before the request is answered).
    pub fn audit(&self) -> Vec<Value> {
        audit_records(self.dir.path())
    }
}

/// Whether a phase said to go on.
pub fn is_next(f: &Flow) -> bool {
    matches!(f, Flow::Next)
}

/// A phase's answer, for assertion messages.
pub fn describe(f: &Flow) -> String {
    match f {
        Flow::Next => "Next".into(),
        Flow::Respond(r) => format!("Respond({})", r.status()),
        Flow::Refuse(s, m) => format!("Refuse({s}, {m:?})"),
    }
}

/// The short refusal a phase answered with; panics on any other answer.
pub fn refusal(f: Flow) -> (StatusCode, &'static str) {
    match f {
        Flow::Refuse(s, m) => (s, m),
        other => panic!("expected a refusal, got {}", describe(&other)),
    }
}

/// The response a phase answered with; panics on any other answer.
pub fn response(f: Flow) -> Response<RespBody> {
    match f {
        Flow::Respond(r) => r,
        other => panic!("expected a response, got {}", describe(&other)),
    }
}

/// Every record in the audit files under `dir/audit`, in file order.
pub fn audit_records(dir: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("audit"))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON audit record"))
                .collect::<Vec<Value>>()
        })
        .collect()
}
