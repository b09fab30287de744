//! The `bastide-agent` command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::AgentConfig;
use crate::enroll::{EnrollArgs, Enrolled};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "bastide-agent",
    version,
    about = "Bastide agent for a project VM"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this VM with its bastion using a one-time token and the bastion's CA pin.
    Enroll {
        /// HOST:PORT of the bastion's agents endpoint; repeat it for each bastion of the
        /// project (the session fails over from one to the next).
        #[arg(long, required = true)]
        bastion: Vec<String>,
        /// Enrollment token from `bastide token create`.
        #[arg(long, env = "BASTIDE_TOKEN", hide_env_values = true)]
        token: String,
        /// sha256:<hex> from `bastide ca-pin`.
        #[arg(long)]
        ca_pin: String,
        /// Agent name (default: the short host name).
        #[arg(long)]
        name: Option<String>,
        /// Name to check the bastion's certificate against (default: the host of --bastion).
        #[arg(long)]
        server_name: Option<String>,
        #[arg(long, default_value = "/var/lib/bastide-agent")]
        state_dir: PathBuf,
        /// Enroll again even if this VM is already enrolled.
        #[arg(long)]
        force: bool,
    },
    /// Connect to the bastion and stay connected.
    Run {
        #[arg(long, default_value = "/var/lib/bastide-agent")]
        state_dir: PathBuf,
        /// Local configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (bastide-agent.1 and one per subcommand) into a directory.
    Manpages { dir: PathBuf },
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Human => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

fn ts(t: i64) -> String {
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    time::OffsetDateTime::from(st).to_string()
}

pub async fn run(cli: Cli) -> Result<()> {
    crate::tls::install_crypto_provider();
    match cli.command {
        Command::Enroll {
            bastion,
            token,
            ca_pin,
            name,
            server_name,
            state_dir,
            force,
        } => {
            let mut bastion = bastion.into_iter();
            let args = EnrollArgs {
                bastion: bastion.next().unwrap_or_default(),
                others: bastion.collect(),
                token,
                ca_pin,
                name,
                server_name,
                state_dir,
                force,
            };
            match crate::enroll::enroll(&args).await? {
                Enrolled::Done { name, not_after } => {
                    info!(agent = %name, "enrolled");
                    println!(
                        "enrolled as {name}; certificate valid until {}",
                        ts(not_after)
                    );
                }
                Enrolled::AlreadyEnrolled { name, not_after } => {
                    println!(
                        "already enrolled as {name} (certificate valid until {}): nothing to do; use --force to enroll again",
                        ts(not_after)
                    );
                }
            }
            Ok(())
        }
        Command::Completions { shell } => bastide_common::clidocs::print_completions(
            <Cli as clap::CommandFactory>::command(),
            shell,
        ),
        Command::Manpages { dir } => {
            bastide_common::clidocs::write_man_pages(<Cli as clap::CommandFactory>::command(), &dir)
        }
        Command::Run { state_dir, config } => {
            let cfg = match config {
                Some(p) => AgentConfig::load(&p)?,
                None => AgentConfig::default(),
            };
            let shutdown = CancellationToken::new();
            let s2 = shutdown.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                s2.cancel();
            });
            crate::session::run(&state_dir, &cfg, shutdown).await
        }
    }
}
