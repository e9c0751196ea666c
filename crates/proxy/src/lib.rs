//! portcullis data plane. The pipeline stages each have a module:
//!
//! ```text
//! listen ─▶ route ─▶ balance ─▶ forward ──▶ origin
//!    └─────────┴──────────┴──────────┴── record (metrics, access log)
//! ```
//!
//! [`Runtime`] ties them together: it holds the current [`snapshot::Snapshot`] behind an
//! `ArcSwap`, the long-lived server state, the listeners, health checks and the admin API,
//! and performs hot reloads.

pub mod admin;
pub mod admin_authz;
mod admin_body;
pub mod admin_events;
pub mod admin_tables;
pub mod admin_tls;
pub mod admin_tokens;
pub mod admin_usage;
pub mod admin_workflows;
pub mod audit;
pub mod automate;
pub mod console;
pub mod control;
pub mod edge;
pub mod events;
pub mod exchange;
pub mod fields;
pub mod health;
pub mod limits;
pub mod memo;
pub mod phase;
pub mod pipeline;
pub mod plans;
pub mod record;
pub mod snapshot;
pub mod state;
pub mod table_keys;
#[cfg(test)]
pub mod testkit;
pub mod upstream;
pub mod watch;
pub mod workflows;

use edge::{listen, tls};

use arc_swap::ArcSwap;
use portcullis_config::Config;
use snapshot::Snapshot;
use state::StateRegistry;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] portcullis_config::Error),
    #[error("{0}")]
    Build(#[from] snapshot::BuildError),
    #[error("{0}")]
    Listen(#[from] listen::ListenError),
    #[error("admin listener {bind}: {source}")]
    Admin {
        bind: String,
        source: std::io::Error,
    },
    #[error("admin listener {bind}: {source}")]
    AdminTls {
        bind: String,
        source: edge::tls::TlsError,
    },
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("{0}")]
    Identity(#[from] portcullis_identity::Error),
    #[error("{0}")]
    Policy(#[from] portcullis_policy::Error),
    #[error("audit: {0}")]
    Audit(#[from] portcullis_audit::Error),
    #[error("limits.store: {0}")]
    LimitStore(String),
    #[error("{0}")]
    Events(String),
    #[error("automation: {0}")]
    Automation(String),
    #[error("state_dir: {0}")]
    Store(#[from] portcullis_store::StoreError),
}

/// What the request path needs, shared by every connection.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: StateRegistry,
    /// Stick tables and usage plans, kept across reloads (see `limits`).
    pub limits: limits::Registry,
    pub metrics: Arc<record::Metrics>,
    pub access: record::AccessLog,
    /// The audit writer; None when `audit.sink` is `off`.
    pub audit: Option<portcullis_audit::Auditor>,
    /// Where events go (see `events`).
    pub events: events::Events,
    /// Addresses whose HTTP/2 connections were closed for abuse, paced when they reconnect
    /// (see `edge::abuse`).
    pub abusers: edge::abuse::Abusers,
}

#[derive(Clone, Debug)]
pub struct ReloadStatus {
    pub version: String,
    pub loaded_at: SystemTime,
    pub last_error: Option<String>,
    pub last_attempt: Option<SystemTime>,
    pub ok: u64,
    pub failed: u64,
}

pub struct Runtime {
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    listeners: listen::Listeners,
    health: health::HealthChecks,
    reload_lock: tokio::sync::Mutex<()>,
    /// Set when shutdown begins: no reload binds a listener again after that.
    stopping: AtomicBool,
    pub status: parking_lot::RwLock<ReloadStatus>,
    pub ready: AtomicBool,
    /// The admin address actually bound (useful when configured with port 0).
    pub admin_addr: parking_lot::Mutex<Option<std::net::SocketAddr>>,
    /// The events automation reads, until automation takes them (config with triggers).
    pub automation_events:
        parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Arc<portcullis_events::Event>>>>,
    /// Route switches, and the task that runs the triggers (see `automate`).
    pub automation: automate::Automation,
    /// Durable workflows, when the config has `workflows:`.
    pub workflows: workflows::Workflows,
}

/// Binds the admin listener and serves the admin API and the console on it, over TLS with
/// `admin.tls`.
async fn start_admin(rt: &Arc<Runtime>, admin: &portcullis_config::AdminDef) -> Result<(), Error> {
    let l = tokio::net::TcpListener::bind(&admin.bind)
        .await
        .map_err(|source| Error::Admin {
            bind: admin.bind.clone(),
            source,
        })?;
    *rt.admin_addr.lock() = l.local_addr().ok();
    admin_tls::serve(rt.clone(), l, admin.tls.as_ref()).map_err(|source| Error::AdminTls {
        bind: admin.bind.clone(),
        source,
    })?;
    if admin.tls.is_some() {
        tracing::info!(bind = %admin.bind, "admin API and console listening (TLS)");
    } else {
        tracing::info!(bind = %admin.bind, "admin API and console listening");
    }
    Ok(())
}

/// Applies the session revocations and the credentials logouts ended, kept in the embedded
/// store (if it is open), to `engine`, so they hold across restarts and reloads. Blocking
/// (a read of the store).
fn load_revocations(limits: &limits::Registry, engine: &portcullis_identity::Engine) {
    let Some(store) = limits.plans.store() else {
        return;
    };
    match store.session_revocations() {
        Ok(list) => {
            for (p, at) in list {
                engine
                    .store
                    .revoke_principal(&p, u64::try_from(at).unwrap_or(0));
            }
        }
        Err(e) => tracing::error!(error = %e, "session revocations could not be read"),
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match store.ended_credentials(i64::try_from(now).unwrap_or(i64::MAX)) {
        Ok(rows) => {
            let ended: Vec<_> = rows
                .into_iter()
                .map(|(kind, key, until)| portcullis_identity::session::Ended {
                    kind,
                    key,
                    until: u64::try_from(until).unwrap_or(0),
                })
                .collect();
            engine.restore_ended(&ended);
        }
        Err(e) => tracing::error!(error = %e, "ended sessions could not be read"),
    }
}

/// Keeps what a logout ended in the embedded store (opened in `state_dir` if it is not
/// yet), so that a copy of the session's cookies or of its ID token stays refused after a
/// restart or a reload. The logout is answered once it is written (it is in force in this
/// process already): a logout the browser saw survives a crash.
pub(crate) async fn keep_ended(
    shared: &Arc<Shared>,
    ended: Vec<portcullis_identity::session::Ended>,
) {
    if ended.is_empty() {
        return;
    }
    let shared = shared.clone();
    let written = tokio::task::spawn_blocking(move || {
        let plans = &shared.limits.plans;
        if plans.store().is_none() {
            let dir = shared.snapshot.load().config.state_dir.clone();
            if let Err(e) = plans.open_store(&dir) {
                tracing::error!(error = %e, "a logout could not be kept in the embedded store; it holds until a restart");
                return;
            }
        }
        let Some(store) = plans.store() else {
            return;
        };
        for e in ended {
            let until = i64::try_from(e.until).unwrap_or(i64::MAX);
            if let Err(err) = store.end_credential(&e.kind, &e.key, until) {
                tracing::error!(error = %err, "a logout could not be kept in the embedded store; it holds until a restart");
            }
        }
    })
    .await;
    if let Err(e) = written {
        tracing::error!(error = %e, "a logout could not be kept in the embedded store; it holds until a restart");
    }
}

/// The workflow definitions of `config`, or their problems as one located message.
fn workflow_defs(
    config: &Config,
) -> Result<Vec<portcullis_automation::workflow::runner::Loaded>, String> {
    workflows::load::definitions(config).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// The triggers of `config`, validated, or their problems as one located message.
fn triggers(config: &Config) -> Result<Vec<portcullis_automation::TriggerCfg>, String> {
    automate::check::triggers(config).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Whether `config` keeps anything in the embedded store: quota use and daily usage,
/// event outboxes, trigger firings.
fn needs_store(config: &Config) -> bool {
    !config.usage_plans.is_empty()
        || !config.events.is_null()
        || !config.triggers.is_null()
        || config.workflows.is_some()
        // Kept state from an earlier run (session revocations, …) is read back.
        || config.state_dir.join("portcullis.db").exists()
}

/// What [`Runtime::start`] would refuse, short of binding ports and fetching keys, for
/// `portcullis check`: each listener's and backend's TLS settings (certificate, key and CA
/// files), each stick table's counters (`store`), and each identity provider's local files (see
/// [`portcullis_identity::engine::check`]). Every problem is located in the config. The
/// policies are checked by `portcullis_policy::Engine::build`.
pub fn check(config: &Config) -> Vec<portcullis_config::Diagnostic> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut out = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(t) = &l.tls {
            if let Err(e) = tls::server_config(t, &l.protocols) {
                let loc = config.root_loc(&format!("listeners[{i}].tls"));
                out.push(loc.diag(format!("listener `{}`: {e}", l.name)));
            }
        }
    }
    for b in &config.backends {
        if let Some(t) = &b.spec.tls {
            if let Err(e) = tls::client_config(t, b.spec.protocol) {
                out.push(b.loc.diag(format!("backend `{}`: {e}", b.id)));
            }
        }
    }
    for (i, t) in config.stick_tables.iter().enumerate() {
        let parsed = t
            .store
            .iter()
            .map(|c| portcullis_limits::Counter::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|store| portcullis_limits::TableSpec::new(t.size.max(1), t.expire.0, store));
        if let Err(e) = parsed {
            // Located at the key the problem is about (`size`, `expire`, else `store`).
            let text = e.to_string();
            let key = ["size", "expire"]
                .into_iter()
                .find(|k| text.contains(&format!("`{k}`")))
                .unwrap_or("store");
            let at = format!("stick_tables[{i}].{key}");
            let loc = config.root_loc(&at);
            out.push(loc.diag(format!("{at}: stick table `{}`: {e}", t.name)));
        }
    }
    if let Err(d) = automate::check::triggers(config) {
        out.extend(d);
    }
    if let Err(d) = workflows::load::definitions(config) {
        out.extend(d);
    }
    if let Some(a) = &config.admin {
        if let Err(d) = portcullis_policy::admin::AdminPolicies::load(&a.policies) {
            out.extend(d);
        }
    }
    if let Err(d) = events::events_cfg(config) {
        out.push(d);
    }
    for (i, e) in portcullis_identity::engine::check(config) {
        let loc = config.root_loc(&format!("identity.providers[{i}]"));
        out.push(loc.diag(e.to_string()));
    }
    out
}

impl Runtime {
    /// Builds the first snapshot, binds every listener and the admin API, and starts health
    /// checks. Must run inside a Tokio runtime.
    pub async fn start(config: Config) -> Result<Arc<Runtime>, Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(record::Metrics::default());
        let access = record::AccessLog::start(&config.access_log).map_err(Error::AccessLog)?;
        let registry = StateRegistry::default();
        // The embedded store holds quota use and daily usage: opened only when there are
        // plans to keep.
        let store = if needs_store(&config) {
            Some(portcullis_store::Store::open(&config.state_dir)?)
        } else {
            None
        };
        let (events, automation_events) =
            events::Events::start(&config, store.as_ref(), events::instance_source())
                .await
                .map_err(Error::Events)?;
        let fleet = limits::Fleet::of(&config).map_err(Error::LimitStore)?;
        let plans =
            plans::PlanRegistry::new(store, Arc::new(portcullis_limits::wall::SystemWallClock));
        if let Some(f) = &fleet {
            plans.send_usage_to(f.store.clone(), tokio::runtime::Handle::current());
        }
        let limits = limits::Registry::new(plans, fleet);
        let config = Arc::new(config);
        let engine = Arc::new(portcullis_identity::Engine::build(&config, None)?);
        load_revocations(&limits, &engine);
        engine.warm_up(Duration::from_secs(5)).await;
        let policy = Arc::new(portcullis_policy::Engine::build(&config)?);
        let authorizers = Arc::new(portcullis_authorizer::Authorizers::build(
            &config.authorizers,
            None,
        ));
        let mut snap = Snapshot::build(
            config.clone(),
            &registry,
            &limits,
            &metrics,
            engine,
            policy,
            authorizers,
        )?;
        snap.triggers = Arc::new(triggers(&config).map_err(snapshot::BuildError::Triggers)?);
        snap.workflows = Arc::new(workflow_defs(&config).map_err(snapshot::BuildError::Located)?);
        let listeners = listen::Listeners::default();
        let prepared = listeners.prepare(&config.listeners)?;
        let audit = match config.audit.sink {
            portcullis_config::AuditSink::Off => None,
            _ => Some(portcullis_audit::Auditor::start(
                &config.audit,
                &std::env::var("HOSTNAME")
                    .unwrap_or_else(|_| format!("portcullis-{}", std::process::id())),
            )?),
        };
        snap.apply_limits();
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snap),
            registry,
            limits,
            metrics,
            access,
            audit,
            events,
            abusers: Default::default(),
        });
        let rt = Arc::new(Runtime {
            config_path: config.root.clone(),
            listeners,
            health: health::HealthChecks::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            status: parking_lot::RwLock::new(ReloadStatus {
                version: config.version.clone(),
                loaded_at: SystemTime::now(),
                last_error: None,
                last_attempt: None,
                ok: 0,
                failed: 0,
            }),
            ready: AtomicBool::new(false),
            admin_addr: parking_lot::Mutex::new(None),
            automation_events: parking_lot::Mutex::new(automation_events),
            automation: automate::Automation::default(),
            workflows: workflows::Workflows::default(),
            shared,
        });
        if let Some(admin) = &config.admin {
            start_admin(&rt, admin).await?;
        }
        rt.listeners
            .commit(prepared, &rt.shared, config.shutdown_grace);
        events::watch(&rt.shared);
        watch::start(&rt.shared);
        rt.health
            .reconcile(&rt.shared.snapshot.load(), &rt.shared.metrics);
        rt.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        plans::start_flusher(&rt.shared);
        automate::Automation::start(&rt).map_err(Error::Automation)?;
        let defs = rt.shared.snapshot.load().workflows.as_ref().clone();
        workflows::Workflows::start(&rt, defs)
            .await
            .map_err(Error::Automation)?;
        Ok(rt)
    }

    /// Loads, validates and swaps in the config from disk. On any error the running config
    /// keeps serving and the error is returned, logged and recorded for the admin API.
    pub async fn reload(&self, trigger: &str) -> Result<String, String> {
        let _g = self.reload_lock.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            // The listeners are closed and draining: a reload would bind them again and
            // serve connections the shutdown never waits for.
            tracing::warn!(trigger, "reload refused: portcullis is shutting down");
            return Err("portcullis is shutting down; the reload was not applied".into());
        }
        let path = self.config_path.clone();
        let result = self.try_reload(&path).await;
        match &result {
            Ok(Some(v)) => {
                audit::write(&self.shared, audit::reload(trigger, Ok(v))).await;
            }
            Err(e) => {
                audit::write(&self.shared, audit::reload(trigger, Err(e))).await;
            }
            Ok(None) => {}
        }
        let mut st = self.status.write();
        st.last_attempt = Some(SystemTime::now());
        let label = |r: &str| vec![("result", r.to_string())];
        match result {
            Ok(Some(version)) => {
                st.version = version.clone();
                st.loaded_at = SystemTime::now();
                st.last_error = None;
                st.ok += 1;
                events::reloaded(&self.shared, trigger, st.ok + 1);
                self.shared
                    .metrics
                    .reloads
                    .get_or_create(&label("ok"))
                    .inc();
                tracing::info!(%trigger, %version, "config reloaded");
                Ok(version)
            }
            Ok(None) => {
                st.last_error = None;
                Ok(st.version.clone())
            }
            Err(e) => {
                st.last_error = Some(e.clone());
                st.failed += 1;
                events::rejected(&self.shared, trigger, st.ok + 1, &e);
                self.shared
                    .metrics
                    .reloads
                    .get_or_create(&label("error"))
                    .inc();
                tracing::error!(%trigger, error = %e, "config reload rejected; the previous config keeps serving");
                Err(e)
            }
        }
    }

    /// Returns the new version, or None when nothing changed.
    async fn try_reload(&self, path: &std::path::Path) -> Result<Option<String>, String> {
        let p = path.to_path_buf();
        let config = tokio::task::spawn_blocking(move || portcullis_config::load(&p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let current = self.shared.snapshot.load_full();
        if config.version == current.version {
            // Cert files may have changed even when the YAML did not.
            self.listeners.refresh_certs();
            return Ok(None);
        }
        // What `portcullis check` would refuse (a listener's certificate and key that do not
        // match, …) is refused here with the same file:line:col, before anything of the new
        // config is applied.
        let (config, refused) = tokio::task::spawn_blocking(move || {
            let d = check(&config);
            (config, d)
        })
        .await
        .map_err(|e| e.to_string())?;
        if !refused.is_empty() {
            return Err(portcullis_config::Error(refused).to_string());
        }
        if config.workers != current.config.workers {
            tracing::warn!("`workers` changed; it takes effect at the next restart");
        }
        if config.events != current.config.events {
            // Checked as a start would check it: a reload that takes an `events:` the next
            // start refuses would leave a process that cannot be restarted.
            events::events_cfg(&config).map_err(|d| d.to_string())?;
            tracing::warn!("`events` changed; the sinks take it at the next restart");
        }
        let (new, old) = (&config.limits, &current.config.limits);
        if new.store != old.store || new.on_store_error != old.on_store_error {
            tracing::warn!("`limits.store` or `limits.on_store_error` changed; they take effect at the next restart");
        }
        if config.state_dir != current.config.state_dir
            && self.shared.limits.plans.store().is_some()
        {
            tracing::warn!("`state_dir` changed; the open store stays until the next restart");
        }
        // A first config with plans opens the embedded store their counts are kept in.
        let opened = if !needs_store(&config) {
            false
        } else {
            let shared = self.shared.clone();
            let dir = config.state_dir.clone();
            tokio::task::spawn_blocking(move || shared.limits.plans.open_store(&dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("state_dir: {e}"))?
        };
        let config = Arc::new(config);
        let engine = Arc::new(
            portcullis_identity::Engine::build(&config, Some(&current.identity))
                .map_err(|e| e.to_string())?,
        );
        load_revocations(&self.shared.limits, &engine);
        engine.warm_up(Duration::from_secs(5)).await;
        let policy =
            Arc::new(portcullis_policy::Engine::build(&config).map_err(|e| e.to_string())?);
        let authorizers = Arc::new(portcullis_authorizer::Authorizers::build(
            &config.authorizers,
            Some(&current.authorizers),
        ));
        let mut snap = Snapshot::build(
            config.clone(),
            &self.shared.registry,
            &self.shared.limits,
            &self.shared.metrics,
            engine,
            policy,
            authorizers,
        )
        .map_err(|e| e.to_string())?;
        snap.triggers = Arc::new(triggers(&config)?);
        snap.workflows = Arc::new(workflow_defs(&config)?);
        let prepared = self
            .listeners
            .prepare(&config.listeners)
            .map_err(|e| e.to_string())?;
        let version = snap.version.clone();
        let keep: std::collections::HashSet<String> = snap
            .backends
            .iter()
            .flat_map(|b| b.slots.iter().map(|s| s.state.key.clone()))
            .collect();
        // Route switches outlive the snapshot: pushed into it before and after it is installed.
        self.automation.routes.apply(&snap);
        snap.apply_limits();
        self.shared.snapshot.store(Arc::new(snap));
        self.automation.routes.apply(&self.shared.snapshot.load());
        self.automation
            .reconfigure(&self.shared.snapshot.load().triggers);
        self.workflows
            .reconfigure(self.shared.snapshot.load().workflows.as_ref().clone());
        self.listeners
            .commit(prepared, &self.shared, config.shutdown_grace);
        self.shared.registry.retain(&keep);
        // Counts of plans about to be dropped are written first.
        let shared = self.shared.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || shared.limits.plans.flush()).await {
            tracing::error!(error = %e, "usage counts could not be written at reload");
        }
        self.shared.limits.retain(&config);
        if opened {
            plans::start_flusher(&self.shared);
        }
        self.health
            .reconcile(&self.shared.snapshot.load(), &self.shared.metrics);
        Ok(Some(version))
    }

    /// Reloads on SIGHUP and on (debounced) changes to any config file or include
    /// directory, and re-reads changed TLS certificate files every second.
    pub fn spawn_watchers(self: &Arc<Self>) {
        let rt = self.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let _ = rt.reload("SIGHUP").await;
            }
        });
        let rt = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                rt.listeners.refresh_certs();
            }
        });
        self.spawn_file_watcher();
    }

    fn spawn_file_watcher(self: &Arc<Self>) {
        use notify::{RecursiveMode, Watcher};
        use std::collections::HashSet;
        // Only the config files themselves, and new files in include directories, count: a
        // log file written next to the config must not trigger reloads, nor keep the
        // debounce below from ever settling.
        type Relevant = (HashSet<PathBuf>, HashSet<PathBuf>);
        let relevant: Arc<parking_lot::RwLock<Relevant>> = Arc::default();
        let filter = relevant.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if !ev.kind.is_access() {
                    let (files, dirs) = &*filter.read();
                    let hit = ev
                        .paths
                        .iter()
                        .any(|p| files.contains(p) || p.parent().is_some_and(|d| dirs.contains(d)));
                    if hit {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP or the admin API");
                return;
            }
        };
        let watch_all = move |w: &mut notify::RecommendedWatcher, cfg: &Config| {
            // Watch directories, so editors that replace files (rename over) are seen too.
            let mut dirs: Vec<PathBuf> = cfg
                .files
                .iter()
                .filter_map(|f| f.parent().map(|p| p.to_path_buf()))
                .collect();
            dirs.extend(cfg.watch_dirs.iter().cloned());
            dirs.sort();
            dirs.dedup();
            for d in dirs {
                let _ = w.watch(&d, RecursiveMode::NonRecursive);
            }
            *relevant.write() = (
                cfg.files.iter().cloned().collect(),
                cfg.watch_dirs.iter().cloned().collect(),
            );
        };
        watch_all(&mut watcher, &self.shared.snapshot.load().config);
        let rt = self.clone();
        tokio::spawn(async move {
            let mut watcher = watcher;
            while rx.recv().await.is_some() {
                // Debounce: wait for the burst of events from one save to settle (but not
                // forever, if something keeps writing).
                let first = tokio::time::Instant::now();
                while first.elapsed() < Duration::from_secs(2) {
                    match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let before = rt.shared.snapshot.load().version.clone();
                if rt.reload("file change").await.is_ok()
                    && rt.shared.snapshot.load().version != before
                {
                    watch_all(&mut watcher, &rt.shared.snapshot.load().config);
                }
            }
        });
    }

    /// Stops accepting, drains in-flight requests for up to the grace period, and stops
    /// health checks.
    pub async fn shutdown(&self) {
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        // A reload already under way finishes first (the next one is refused), so that the
        // listeners closed below are the last ones bound.
        drop(self.reload_lock.lock().await);
        let grace = self.shared.snapshot.load().config.shutdown_grace;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight requests"
        );
        let _ = tokio::time::timeout(
            grace + Duration::from_millis(500),
            self.listeners.shutdown(),
        )
        .await;
        self.health.stop_all();
        self.automation.stop();
        if let Some(f) = &self.shared.limits.fleet {
            // End-of-response counts still batched for Redis.
            let _ = f.store.flush().await;
        }
        let shared = self.shared.clone();
        let flushed = tokio::task::spawn_blocking(move || shared.limits.plans.flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::error!(error = %e, "usage counts could not be written at shutdown");
        }
        // Events still queued go to their sinks (a webhook's to its outbox).
        self.shared
            .events
            .bus
            .shutdown(Duration::from_secs(5))
            .await;
        // Access log lines still in the writer's buffer reach the file.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.access.flush()).await;
    }
}
