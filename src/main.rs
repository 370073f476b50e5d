//! CLI: `smtp-tls-proxy [--config proxy.yaml]` runs, `smtp-tls-proxy check` validates.
//! Exit codes: 0 ok, 1 runtime failure (e.g. a port cannot be bound), 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smtp_tls_proxy::{check, server, snapshot, telemetry};

#[derive(Parser)]
#[command(version, about = "TLS-terminating SMTP front proxy")]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "proxy.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and certificates, print listeners, names and expiry.
    Check,
}

/// jemalloc with background purging (`.cargo/config.toml`): memory freed after a flood of
/// sessions goes back to the system within seconds (BENCHMARKS.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = !matches!(cli.command, Some(Command::Check));
    // Before the snapshot is built: the default `max_connections` follows from it. `check`
    // leaves the limit alone and shows the conservative default.
    let nofile = run.then(smtp_tls_proxy::admission::limits::raise_nofile);
    let acme = std::sync::Arc::new(smtp_tls_proxy::acme::AcmeManager::default());
    let loaded = snapshot::read_config(&cli.config).and_then(|c| snapshot::build(c, &acme, None));
    let snapshot = match loaded {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Check) = cli.command {
        print!("{}", check::describe(&snapshot));
        return ExitCode::SUCCESS;
    }
    telemetry::init(snapshot.config.log.format, &snapshot.config.log.level);
    let kubernetes = smtp_tls_proxy::config::kubernetes_service_vars();
    if !kubernetes.is_empty() {
        tracing::info!(
            variables = kubernetes.join(","),
            "ignoring the variables Kubernetes sets for a Service named smtp-tls-proxy"
        );
    }
    for w in check::warnings(&snapshot.config) {
        tracing::warn!(warning = %w, "configuration warning");
    }
    tracing::info!(
        nofile = nofile.map(|(n, _)| n).unwrap_or_default(),
        max_connections = snapshot.max_connections,
        "open-file limit"
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let triggers = match server::Triggers::from_signals() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cannot register signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
        let start = match server::Start::bind(acme, snapshot) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        server::run(start, triggers).await;
        ExitCode::SUCCESS
    })
}
