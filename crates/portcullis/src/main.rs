//! The `portcullis` command: run the proxy, check a config, print the version.

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
    /// Print the version.
    Version,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("portcullis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match portcullis_config::load(&config) {
            Ok(c) => {
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
        Command::Run { config } => {
            init_logging(&cli.log_format);
            let cfg = match portcullis_config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    for d in &e.0 {
                        eprintln!("{d}");
                    }
                    return ExitCode::from(1);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.workers)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(run(cfg))
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
    runtime.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
