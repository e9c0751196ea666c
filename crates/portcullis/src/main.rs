//! The `portcullis` command: run the proxy, check a config, print the version.

/// mimalloc: the proxy allocates many small, short-lived buffers per request, which glibc's
/// allocator handles noticeably slower (measured in BENCHMARKS.md). Without the `mimalloc`
/// feature (on by default) the system allocator is used, for heap profilers.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit_cli;
mod ctl_cli;
mod policy_cli;
mod table_cli;
mod usage_cli;
mod workflow_cli;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An identity-aware proxy and load balancer"
)]
struct Cli {
    /// Log format for the process log (stderr).
    #[arg(long, global = true, default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config and exit: 0 when valid, 1 with every error as file:line:col otherwise.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print a token from a `dev_issuer` provider (for the quickstart and tests).
    Token {
        #[arg(short, long)]
        config: PathBuf,
        /// The dev_issuer provider's name.
        #[arg(long, default_value = "dev")]
        provider: String,
        #[arg(long)]
        user: String,
        /// Comma-separated groups.
        #[arg(long, default_value = "", value_delimiter = ',')]
        groups: Vec<String>,
        #[arg(long)]
        email: Option<String>,
        /// Lifetime, like `1h` or `15m`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Audience; default the provider's first.
        #[arg(long)]
        audience: Option<String>,
    },
    /// Policy tooling: test cases, explanations, the schema.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The audit trail: verify the hash chain, search records.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// API key tools.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Admin API tools.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Stick tables at runtime, through the admin API: show, get, set, clear.
    Table(table_cli::TableArgs),
    /// Requests per usage plan, caller and UTC day, read from the store in `state_dir`.
    Usage(usage_cli::UsageArgs),
    /// Durable workflows: validate and run definitions locally; start, list, inspect and
    /// stop executions and answer callbacks through the admin API.
    Workflow(workflow_cli::WorkflowArgs),
    /// The runtime CLI, HAProxy's runtime API with names, through the admin API: servers
    /// (drain, ready, maint, weight), stick tables, live events, workflows and approvals,
    /// reload, session revocation.
    Ctl(ctl_cli::CtlArgs),
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run decision test cases; exits 1 on any failure, with a diff.
    Test {
        #[arg(short, long)]
        config: PathBuf,
        /// YAML file of `cases: [{ name, identity, request, expect }]`.
        cases: PathBuf,
    },
    /// Explain how one request is decided, and which policies matched.
    Explain {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "", value_delimiter = ',')]
        groups: Vec<String>,
        #[arg(long, default_value = "test")]
        provider: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long, default_value = "127.0.0.1")]
        ip: String,
        /// Extra request headers, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        method: String,
        url: String,
    },
    /// Print the Cedar schema policies are validated against.
    Schema {
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain: OK, or the first broken seq, file and line (exit 1).
    Verify {
        /// Use the config's audit.dir when no files are given.
        #[arg(short, long)]
        config: Option<PathBuf>,
        files: Vec<PathBuf>,
    },
    /// Find records.
    Search {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        principal: Option<String>,
        /// allow, deny or would_deny.
        #[arg(long)]
        decision: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// A duration back from now (`1h`, `30m`) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// auth_failure, decision, admin or reload.
        #[arg(long)]
        kind: Option<String>,
        /// Print whole records as JSON lines.
        #[arg(long)]
        json: bool,
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Reads an admin token on stdin and prints `sha256:<hex>`, the form to write under
    /// `admin.tokens` so the config does not hold the token itself.
    HashToken,
}

#[derive(Subcommand)]
enum ApikeyCommand {
    /// Make a new key: prints the key once, and the entry to add to the keys file.
    New {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "", value_delimiter = ',')]
        groups: Vec<String>,
        /// Key id; default `<user>-<random>`.
        #[arg(long)]
        id: Option<String>,
    },
}

/// The log filter: `PORTCULLIS_LOG` (default `info`), with the file watcher's own logging
/// held at `warn` unless it names `notify`: at `trace`, the watcher logs every change in the
/// config directory, and a log file kept there would feed it without end.
fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = spec.unwrap_or("info");
    let spec = if spec.contains("notify") {
        spec.to_string()
    } else {
        format!("{spec},notify=warn")
    };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn"))
}

/// Lines the process log holds for a slow reader of stderr before it drops new ones.
const LOG_BACKLOG: usize = 16_384;

/// The process log, written to stderr by a thread of its own: a reader of stderr that is slow
/// (a blocking container log driver, a busy journald, `| tee` to a slow disk) must never
/// hold up the threads that serve requests. Lines beyond [`LOG_BACKLOG`] are dropped, and
/// the count is reported at shutdown. The guard returned flushes what is held when dropped.
fn init_logging(format: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = log_filter(std::env::var("PORTCULLIS_LOG").ok().as_deref());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BACKLOG)
        .lossy(true)
        .thread_name("portcullis-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    DROPPED_LOG_LINES.get_or_init(|| dropped);
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
    guard
}

/// How many process log lines were dropped because stderr was read too slowly.
static DROPPED_LOG_LINES: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Says on stderr (directly, as the log's thread may be behind) how many log lines a slow
/// reader of stderr cost, if any.
fn report_dropped_log_lines() {
    if let Some(n) = DROPPED_LOG_LINES
        .get()
        .map(|c| c.dropped_lines())
        .filter(|n| *n > 0)
    {
        eprintln!("portcullis: {n} process log line(s) dropped: stderr was read too slowly");
    }
}

/// A command's output piped into `head` or `true`: stop quietly when the reader goes away,
/// as other command-line tools do, instead of panicking in `println!`. (The proxy itself
/// keeps Rust's default, SIGPIPE ignored: a client that hangs up is an error on that socket
/// alone.)
fn end_on_closed_pipe() {
    // SAFETY: resetting a signal's action to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        end_on_closed_pipe();
    }
    match cli.command {
        Command::Version => {
            println!("portcullis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Table(args) => table_cli::run(args),
        Command::Ctl(args) => ctl_cli::run(args),
        Command::Usage(args) => usage_cli::run(args),
        Command::Workflow(args) => workflow_cli::run(args),
        Command::Token {
            config,
            provider,
            user,
            groups,
            email,
            ttl,
            audience,
        } => token(
            &config,
            &provider,
            &user,
            &groups,
            email.as_deref(),
            &ttl,
            audience.as_deref(),
        ),
        Command::Policy { command } => match command {
            PolicyCommand::Test { config, cases } => policy_cli::test(&config, &cases),
            PolicyCommand::Explain {
                config,
                user,
                groups,
                provider,
                email,
                ip,
                headers,
                method,
                url,
            } => policy_cli::explain(
                &config,
                policy_cli::who(user, groups, provider, email),
                &method,
                &url,
                &ip,
                &headers,
            ),
            PolicyCommand::Schema { config } => policy_cli::schema(&config),
        },
        Command::Audit { command } => match command {
            AuditCommand::Verify { config, files } => audit_cli::verify(files, config),
            AuditCommand::Search {
                config,
                principal,
                decision,
                route,
                since,
                kind,
                json,
                files,
            } => audit_cli::search(audit_cli::SearchArgs {
                files,
                config,
                principal,
                decision,
                route,
                since,
                kind,
                json,
            }),
        },
        Command::Admin {
            command: AdminCommand::HashToken,
        } => {
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() || token.trim().len() < 16 {
                eprintln!("portcullis admin hash-token: give the token (at least 16 characters) on stdin, like `openssl rand -hex 32 | tee admin.token | portcullis admin hash-token`");
                return ExitCode::from(2);
            }
            let digest = <sha2::Sha256 as sha2::Digest>::digest(token.trim().as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            println!("sha256:{hex}");
            ExitCode::SUCCESS
        }
        Command::Apikey {
            command: ApikeyCommand::New { user, groups, id },
        } => {
            let groups: Vec<String> = groups.into_iter().filter(|g| !g.is_empty()).collect();
            let id = id.unwrap_or_else(|| format!("{user}-{}", &uuid_like()[..8]));
            let (key, entry) = portcullis_identity::apikey::new_key(&id, &user, &groups);
            println!("API key (shown once, store it now):\n\n  {key}\n");
            println!("Add this entry under `keys:` in the provider's keys_file:\n\n{entry}");
            ExitCode::SUCCESS
        }
        Command::Check { config } => match portcullis_config::load(&config) {
            Ok(c) => {
                // What the proxy would refuse (or start without) beyond the YAML itself:
                // TLS files, identity providers' key files, and the policies.
                // Each is a `Diagnostic`, located in the file that holds the problem.
                let mut problems = portcullis_proxy::check(&c);
                if let Err(portcullis_policy::Error::Invalid(p)) =
                    portcullis_policy::Engine::build(&c)
                {
                    problems.extend(p);
                }
                if !problems.is_empty() {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    eprintln!("{} error(s) found", problems.len());
                    return ExitCode::from(1);
                }
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: OK ({} listeners, {} backends, {} routes, version {})",
                    config.display(),
                    c.listeners.len(),
                    c.backends.len(),
                    c.routes.len(),
                    c.version
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                for d in &e.0 {
                    eprintln!("{d}");
                }
                eprintln!("{} error(s) found", e.0.len());
                ExitCode::from(1)
            }
        },
        Command::Run { config } => run_proxy(&config, &cli.log_format),
    }
}

/// Loads the config at `path`, or prints each of its errors (file:line:col and the fix) on
/// stderr and gives exit code 1: what every command that reads the config does first.
pub(crate) fn load_config(path: &std::path::Path) -> Result<portcullis_config::Config, ExitCode> {
    portcullis_config::load(path).map_err(|e| {
        for d in &e.0 {
            eprintln!("{d}");
        }
        ExitCode::from(1)
    })
}

/// `portcullis run`: the proxy, until it is stopped, with its process log.
fn run_proxy(config: &std::path::Path, log_format: &str) -> ExitCode {
    let log_guard = init_logging(log_format);
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // One worker: a current-thread runtime, which skips the work-stealing machinery.
    let mut builder = if cfg.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.workers);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run(cfg));
    drop(rt);
    drop(log_guard);
    report_dropped_log_lines();
    code
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

fn token(
    config: &std::path::Path,
    provider: &str,
    user: &str,
    groups: &[String],
    email: Option<&str>,
    ttl: &str,
    audience: Option<&str>,
) -> ExitCode {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(p) = cfg.identity.providers.iter().find(|p| p.name == provider) else {
        eprintln!("error: no provider `{provider}` in {}", config.display());
        return ExitCode::from(1);
    };
    if p.kind != portcullis_config::ProviderKind::DevIssuer {
        eprintln!("error: provider `{provider}` is not a dev_issuer; only dev_issuer providers can mint tokens");
        return ExitCode::from(1);
    }
    let ttl = match portcullis_config::units::parse_duration(ttl) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --ttl: {e}");
            return ExitCode::from(1);
        }
    };
    let key_file = p.key_file.clone().unwrap_or_default();
    let key = match portcullis_identity::dev::load_or_create(std::path::Path::new(&key_file)) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let groups: Vec<String> = groups.iter().filter(|g| !g.is_empty()).cloned().collect();
    let aud = audience
        .or(p.audiences.first().map(String::as_str))
        .unwrap_or("portcullis");
    match key.mint(
        p.issuer.as_deref().unwrap_or_default(),
        aud,
        user,
        &groups,
        email,
        ttl.as_secs(),
    ) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: portcullis_config::Config) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = match portcullis_proxy::Runtime::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "startup failed");
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.spawn_watchers();
    tracing::info!(version = %runtime.status.read().version, "portcullis started");
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // A second signal during the drain stops at once, as a crash would (what is
    // acknowledged is already durable; quota counts since the last sync are lost).
    tokio::select! {
        _ = runtime.shutdown() => {}
        _ = term.recv() => return stopped_now(),
        _ = int.recv() => return stopped_now(),
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn stopped_now() -> ExitCode {
    tracing::warn!("a second signal during the drain: stopping now");
    eprintln!("portcullis: a second signal during the drain: stopping now");
    ExitCode::from(130)
}

#[cfg(test)]
mod tests {
    /// The file watcher stays at `warn` whatever the level, unless the filter names it.
    #[test]
    fn the_file_watcher_never_logs_below_warn_unless_asked() {
        for spec in [
            None,
            Some("trace"),
            Some("debug,portcullis_proxy=trace"),
            Some("not a filter["),
        ] {
            let f = super::log_filter(spec).to_string();
            assert!(f.contains("notify=warn"), "{spec:?}: {f}");
        }
        let f = super::log_filter(Some("trace,notify=trace")).to_string();
        assert!(!f.contains("notify=warn"), "{f}");
    }
}
