//! CLI: `smtp-tls-proxy [--config proxy.yaml]` runs, `smtp-tls-proxy check` validates.
//! Exit codes: 0 ok, 1 runtime failure (e.g. a port cannot be bound), 2 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use smtp_tls_proxy::{check, server, snapshot, telemetry};

#[derive(Parser)]
#[command(
    version,
    about = "TLS-terminating SMTP front proxy",
    disable_help_subcommand = true,
    after_long_help = "The configuration file is described in smtp-tls-proxy.yaml(5); the \
                       installed example is /etc/smtp-tls-proxy/proxy.yaml. Exit status: 0 \
                       ok, 1 runtime failure (a port cannot be bound), 2 bad configuration."
)]
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
    /// Write the man pages (section 8) and the bash, zsh and fish completions, made from
    /// these very definitions, under DIR (`man/`, `completions/`): what the package ships.
    #[command(hide = true)]
    GenerateAssets {
        /// Where to write them.
        dir: PathBuf,
    },
}

/// jemalloc with background purging (`.cargo/config.toml`): memory freed after a flood of
/// sessions goes back to the system within seconds (BENCHMARKS.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::GenerateAssets { dir }) = &cli.command {
        return match generate_assets(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                ExitCode::from(1)
            }
        };
    }
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

/// Man pages and completions from the clap definitions: one source of truth for the CLI.
fn generate_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cli = Cli::command();
    let page = |cmd: clap::Command, name: &str| -> std::io::Result<()> {
        let mut roff = Vec::new();
        clap_mangen::Man::new(cmd)
            .title(name.to_ascii_uppercase())
            .section("8")
            .manual("System Administration")
            .source(format!("smtp-tls-proxy {}", env!("CARGO_PKG_VERSION")))
            .render(&mut roff)?;
        std::fs::write(man.join(format!("{name}.8")), roff)
    };
    page(cli.clone(), "smtp-tls-proxy")?;
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("smtp-tls-proxy-{}", sub.get_name());
        // NAME carries the page's own name (what whatis/apropos index), the synopsis the
        // command as typed.
        let typed = format!("smtp-tls-proxy {}", sub.get_name());
        page(
            sub.clone().display_name(name.clone()).bin_name(typed),
            &name,
        )?;
    }
    // Where Debian's shells look: bash-completion, zsh's vendor-completions, fish's
    // vendor_completions.d (the package installs them there).
    for (shell, file) in [
        (Shell::Bash, "smtp-tls-proxy"),
        (Shell::Zsh, "_smtp-tls-proxy"),
        (Shell::Fish, "smtp-tls-proxy.fish"),
    ] {
        let mut out = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cli, "smtp-tls-proxy", &mut out);
    }
    Ok(())
}
