//! The `bastide` command line: daemon, state-directory setup and the admin commands, which
//! talk to the running daemon over its Unix socket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::admin::AdminRequest;
use crate::config::{Config, DEFAULT_CONFIG};
use crate::config_push::service::ConfigRequest;
use crate::control as admin;
use crate::logging::LogFormat;
use crate::registry::{AgentStatus, CreatedToken, TokenSpec, TokenStatus};
use crate::smtp::MailRequest;
use crate::ssh::service::{SshCertsRequest, SshRequest};

#[derive(Debug, Parser)]
#[command(
    name = "bastide",
    version,
    about = "Bastide bastion daemon and admin CLI"
)]
pub struct Cli {
    /// Configuration file (also locates the admin socket).
    #[arg(long, global = true, default_value = DEFAULT_CONFIG, env = "BASTIDE_CONFIG")]
    pub config: PathBuf,
    /// Admin socket of the running daemon (overrides the one from --config).
    #[arg(long, global = true, env = "BASTIDE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a state directory: agent CA, server certificate, SSH host key, registry, config.
    Init(InitArgs),
    /// Print the agent CA pin (sha256 of its SubjectPublicKeyInfo) for `bastide-agent enroll`.
    CaPin {
        /// State directory (default: the one named in --config).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the daemon.
    Serve,
    /// Validate the configuration file and exit.
    CheckConfig,
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// The SMTP relay's queue.
    #[command(subcommand)]
    Mail(MailCmd),
    /// SSH jump host: host keys and client configuration for admins.
    #[command(subcommand)]
    Ssh(SshCmd),
    /// Reload the configuration of the running daemon (same as SIGHUP).
    Reload,
    /// One-screen summary of the running daemon: services, agents, queues, expiries.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Read the log store (agents' logs and syslog) through the running daemon.
    Logs(LogsArgs),
    /// Configuration push: the environment tree rendered for each agent.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Write this node's identity (agent CA and key, server certificate and key, SSH host
    /// key) into a bundle, mode 0600, for `bastide init --join` on another node.
    ExportIdentity {
        /// The bundle to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// The registry store: copy from SQLite to PostgreSQL.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (bastide.1 and one per subcommand) into a directory.
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy the SQLite registry (tokens, agents, certificates, revocations, pushed
    /// configuration states) into an empty PostgreSQL database, with the bastion stopped.
    /// Then set `backend = "postgres"` in [store] and start the bastion.
    Migrate {
        /// Target backend (only "postgres").
        #[arg(long, value_parser = ["postgres"])]
        to: String,
        /// Connection string instead of [store]'s url/host/port/dbname/user (no password in
        /// it: [store] password_file; TLS from [store] sslmode and ca_file).
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Host names to show, a glob ("web*").
    #[arg(long)]
    pub host: Option<String>,
    /// Start: a duration back from now ("1h", "2days") or a time ("2026-11-27T10:00:00Z").
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// End: same forms as --since.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Regular expression matched against the whole line.
    #[arg(long)]
    pub grep: Option<String>,
    /// Keep printing new events as they are stored.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
}

/// "1h" (ago) or an RFC 3339 time, as ms since the epoch.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(crate::logs::format::now_ms() - d.as_millis() as i64);
    }
    crate::logs::format::parse_ts(s)
        .ok_or_else(|| format!("{s:?} is neither a duration (1h, 30m) nor an RFC 3339 time"))
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective variables and files of one agent (from the tree on disk).
    Render {
        agent: String,
        /// Show, for each key, the level and file that set it.
        #[arg(long)]
        explain: bool,
        #[arg(long)]
        json: bool,
    },
    /// Validate the whole tree and every template for every enrolled agent; all errors at once.
    Check,
    /// Reload the tree now and push what changed (the daemon also watches the tree).
    Reload,
    /// Show what a candidate tree would change for each agent, without pushing: per agent
    /// the unified diff of each managed file and the settings that change, then a summary.
    /// Exit 0: nothing to change, 2: changes, 1: errors.
    Plan {
        /// A commit, branch or ref of the git source (default: the branch's head).
        #[arg(long, conflicts_with = "dir")]
        commit: Option<String>,
        /// A tree on the bastion's disk (default: the tree in force); with --offline, a
        /// checkout of the environment repository.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        json: bool,
        /// Without a bastion (a CI job on the git server): render --dir for the agents of
        /// --snapshot, the file of `bastide config snapshot`. Needs no configuration file,
        /// state directory or admin socket.
        #[arg(long, requires_all = ["snapshot", "dir"], conflicts_with = "commit")]
        offline: bool,
        /// A registry snapshot (`bastide config snapshot --out FILE`), with --offline.
        #[arg(long, requires = "offline")]
        snapshot: Option<PathBuf>,
    },
    /// Export what `config plan --offline` needs of the registry (active agents: names,
    /// labels, facts, applied revisions and the files and settings they applied) to a file
    /// written mode 0600: it holds rendered configuration, secrets included.
    Snapshot {
        /// The file to write (replaced atomically if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Rollouts in waves ([config_push.rollout]).
    #[command(subcommand)]
    Rollout(RolloutCmd),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// The rollout in progress (or the last one): waves, ACKs, and why it halted.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Go on to the next wave of a halted rollout.
    Resume,
    /// Give the agents the rollout reached their previous revision back.
    Abort,
}

#[derive(Debug, Subcommand)]
pub enum SshCmd {
    /// Print a known_hosts file: the bastion and every enrolled, non-revoked VM.
    KnownHosts,
    /// Print a ~/.ssh/config snippet (Host patterns, ProxyJump, UserKnownHostsFile).
    Config {
        /// Admin login name on the bastion.
        #[arg(long)]
        user: Option<String>,
        /// Where the admin keeps the output of `bastide ssh known-hosts`.
        #[arg(long)]
        known_hosts: Option<String>,
    },
    /// Print the fingerprint of the bastion's SSH host key (no daemon needed).
    Fingerprint,
    /// Print the public key of the SSH user CA of single sign-on (for a VM's
    /// TrustedUserCAKeys); creates the CA in a state directory made before it existed.
    UserCa,
    /// SSH user certificates issued after single sign-on.
    #[command(subcommand)]
    Certs(SshCertsCmd),
}

#[derive(Debug, Subcommand)]
pub enum SshCertsCmd {
    /// List the certificates that are valid now (--all: expired and revoked ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate by serial, or every certificate of an admin: refused at once,
    /// open connections cut.
    Revoke {
        #[arg(required_unless_present = "admin", conflicts_with = "admin")]
        serial: Option<i64>,
        #[arg(long)]
        admin: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// State directory to create.
    #[arg(long)]
    pub dir: PathBuf,
    /// Cloud project name (a lowercase DNS label).
    #[arg(long, required_unless_present = "join", conflicts_with = "join")]
    pub project: Option<String>,
    /// DNS zone of the project's VMs.
    #[arg(long)]
    pub zone: Option<String>,
    /// Extra names or addresses for the server certificate (how agents reach the bastion).
    #[arg(long = "san", conflicts_with = "join")]
    pub sans: Vec<String>,
    /// Address of the agents endpoint (agents.listen; repeat for several). Default:
    /// 0.0.0.0:4443, or the next free port when another process (another bastion) holds it.
    #[arg(long = "agents-listen", value_name = "ADDR")]
    pub agents_listen: Vec<SocketAddr>,
    /// Address of the metrics endpoint (metrics.listen; repeat for several). Default:
    /// 127.0.0.1:9469, or the next free port when another process holds it.
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    pub metrics_listen: Vec<SocketAddr>,
    /// Make another node of an existing project: take its identity (agent CA, server
    /// certificate, SSH host key) from a bundle `bastide export-identity` wrote.
    #[arg(long, conflicts_with = "zone")]
    pub join: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an enrollment token and print it.
    Create {
        /// Time the token stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Number of enrollments it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Glob the agent name must match (e.g. "web*").
        #[arg(long)]
        name_pattern: Option<String>,
        /// Labels given to agents enrolled with it: k=v,k2=v2.
        #[arg(long, value_parser = parse_labels, default_value = "")]
        labels: BTreeMap<String, String>,
        /// Allow replacing an enrolled agent of the same name (reimaged VM); the old
        /// certificate is revoked.
        #[arg(long)]
        replace: bool,
        #[arg(long, conflicts_with = "cloud_init")]
        json: bool,
        /// Print a cloud-init user-data document that installs bastide-agent and enrolls the
        /// VM at first boot (token, bastion address and CA pin filled in).
        #[arg(long)]
        cloud_init: bool,
        /// HOST:PORT the VMs dial to reach this bastion (with --cloud-init; default:
        /// the first specific address of agents.listen). The host must be one of the
        /// server certificate's names (`bastide init --san`).
        #[arg(long, requires = "cloud_init")]
        bastion: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents with their state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its connections are cut and its certificates refused.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum MailCmd {
    /// List queued messages: id, age, sender, recipients, attempts, last error.
    Queue {
        #[arg(long)]
        json: bool,
    },
    /// Try every queued message now.
    Flush,
    /// Try one message now.
    Retry { id: String },
    /// Delete one message from the queue for good.
    Delete { id: String },
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label {part:?} is not k=v"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(a) => init(&a),
        Command::CaPin { ref dir } => {
            let dir = match dir {
                Some(d) => d.clone(),
                None => Config::parse_file(&cli.config)?.state_dir,
            };
            let paths = crate::pki::PkiPaths::new(&dir);
            let der = crate::pki::read_cert_pem(&paths.ca_cert)?;
            println!("{}", crate::pki::spki_pin(&der)?);
            Ok(())
        }
        Command::Serve => {
            let cfg = Config::load(&cli.config)?;
            crate::daemon::serve(cfg).await
        }
        Command::CheckConfig => {
            let cfg = Config::load(&cli.config)?;
            crate::daemon::check_store_identity(&cfg)
                .with_context(|| format!("{}: [store]", cli.config.display()))?;
            println!("{}: configuration OK", cli.config.display());
            Ok(())
        }
        Command::Token(ref t) => token(&cli, t).await,
        Command::Agents(ref a) => agents(&socket(&cli)?, a).await,
        Command::Mail(ref m) => mail(&socket(&cli)?, m).await,
        Command::Ssh(ref c) => ssh(&cli, c).await,
        Command::Status { json } => status(&socket(&cli)?, json).await,
        Command::Logs(ref a) => logs(&socket(&cli)?, a).await,
        Command::Reload => {
            admin::call(&socket(&cli)?, &AdminRequest::Reload).await?;
            println!("configuration reloaded");
            Ok(())
        }
        Command::Config(ref c) => config_cmd(&cli, c).await,
        Command::Store(ref c) => store_cmd(&cli, c),
        Command::ExportIdentity { ref out } => export_identity(&cli, out),
        Command::Completions { shell } => bastide_common::clidocs::print_completions(
            <Cli as clap::CommandFactory>::command(),
            shell,
        ),
        Command::Manpages { ref dir } => {
            bastide_common::clidocs::write_man_pages(<Cli as clap::CommandFactory>::command(), dir)
        }
    }
}

fn export_identity(cli: &Cli, out: &Path) -> Result<()> {
    let cfg = Config::parse_file(&cli.config)?;
    let id = crate::pki::Identity::read(&cfg.pki_paths(), &cfg.project, cfg.zone.as_deref())?;
    id.check()?;
    let text = serde_json::to_string_pretty(&id)?;
    // create_new: never overwrite (the old file's mode could be wider than 0600).
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    println!(
        "identity of project {} written to {} (mode 0600; it holds the agent CA key: move it to the new node and delete it)",
        id.project,
        out.display()
    );
    Ok(())
}

fn store_cmd(cli: &Cli, cmd: &StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Migrate { to: _, url } => {
            let cfg = Config::load(&cli.config)?;
            if let Some(adm) = &cfg.admin {
                if std::os::unix::net::UnixStream::connect(&adm.socket).is_ok() {
                    bail!(
                        "the bastion is running (its admin socket {} answers): stop it first, the copy must see the SQLite store at rest",
                        adm.socket.display()
                    );
                }
            }
            let target = cfg
                .store
                .postgres_settings(url.as_deref())
                .map_err(|e| anyhow::anyhow!("{}: [store]: {e}", cli.config.display()))?;
            let from = cfg.store_path();
            let n = crate::store::copy::sqlite_to_postgres(&from, &target)?;
            println!(
                "copied {} tokens, {} agents, {} certificates, {} SSH user certificates from {} to {}",
                n.tokens,
                n.agents,
                n.certs,
                n.ssh_certs,
                from.display(),
                target.describe
            );
            if cfg.store.backend != crate::store::BackendKind::Postgres {
                println!(
                    "next: set backend = \"postgres\" in [store] of {} and start the bastion",
                    cli.config.display()
                );
            }
            Ok(())
        }
    }
}

async fn config_cmd(cli: &Cli, cmd: &ConfigCmd) -> Result<()> {
    use crate::config_push::{print_render, RenderView, Summary};
    // Not for `plan --offline`, which needs neither the configuration file nor the socket.
    let sock = || socket(cli);
    match cmd {
        ConfigCmd::Render {
            agent,
            explain,
            json,
        } => {
            let v = admin::call(
                &sock()?,
                &ConfigRequest::ConfigRender {
                    agent: agent.clone(),
                },
            )
            .await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let view: RenderView = serde_json::from_value(v)?;
                print!("{}", print_render(&view, *explain));
            }
        }
        ConfigCmd::Check => {
            let s: Summary =
                serde_json::from_value(admin::call(&sock()?, &ConfigRequest::ConfigCheck).await?)?;
            if !s.errors.is_empty() {
                for e in &s.errors {
                    eprintln!("{e}");
                }
                bail!("{} error(s) in the configuration tree", s.errors.len());
            }
            println!(
                "configuration tree OK: {} agent(s), {} file(s) rendered in {:.1} ms",
                s.agents, s.files, s.render_ms
            );
        }
        ConfigCmd::Plan {
            commit,
            dir,
            agent,
            json,
            offline,
            snapshot,
        } => {
            let dir = match dir {
                Some(d) => Some(
                    std::fs::canonicalize(d)
                        .with_context(|| format!("resolving {}", d.display()))?,
                ),
                None => None,
            };
            let plan: crate::config_push::plan::Plan = match (offline, snapshot, &dir) {
                (true, Some(snap), Some(d)) => {
                    let s = crate::config_push::snapshot::Snapshot::read(snap)?;
                    if !d.is_dir() {
                        bail!("{} is not a directory", d.display());
                    }
                    s.plan(d, agent.as_deref())
                }
                (true, _, _) => bail!("--offline needs --snapshot FILE and --dir PATH"),
                _ => {
                    let req = ConfigRequest::ConfigPlan {
                        commit: commit.clone(),
                        dir,
                        agent: agent.clone(),
                    };
                    // No 5 s limit: a plan renders every agent, and may fetch and export a
                    // commit.
                    let v = admin::call_stream(&sock()?, &req, |_| Ok(())).await?;
                    serde_json::from_value(v)?
                }
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", crate::config_push::plan::print(&plan));
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            match plan.exit_code() {
                0 => {}
                1 => bail!("the plan has errors"),
                code => std::process::exit(code),
            }
        }
        ConfigCmd::Snapshot { out } => {
            // No 5 s limit: thousands of agents' files.
            let v =
                admin::call_stream(&sock()?, &ConfigRequest::ConfigSnapshot, |_| Ok(())).await?;
            let s: crate::config_push::snapshot::Snapshot = serde_json::from_value(v)?;
            let text = serde_json::to_vec_pretty(&s)?;
            crate::fsutil::write_atomic(out, &text, 0o600)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "registry snapshot of {} agent(s) written to {} (mode 0600: it holds their rendered files)",
                s.agents.len(),
                out.display()
            );
        }
        ConfigCmd::Rollout(r) => {
            use crate::config_push::rollout::{print, RolloutStatus};
            let (req, json) = match r {
                RolloutCmd::Status { json } => (ConfigRequest::ConfigRolloutStatus, *json),
                RolloutCmd::Resume => (ConfigRequest::ConfigRolloutResume, false),
                RolloutCmd::Abort => (ConfigRequest::ConfigRolloutAbort, false),
            };
            let v = admin::call(&sock()?, &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let st: RolloutStatus = serde_json::from_value(v)?;
                print!("{}", print(&st));
            }
        }
        ConfigCmd::Reload => {
            let s: Summary =
                serde_json::from_value(admin::call(&sock()?, &ConfigRequest::ConfigReload).await?)?;
            println!(
                "configuration tree reloaded: {} agent(s), {} rendered, {} with a new revision ({:.1} ms); {} out-of-sync agent(s) sent their revision again",
                s.agents, s.rendered, s.changed, s.render_ms, s.repushed
            );
        }
    }
    Ok(())
}

/// The CONFIG column: state, revisions (applied->desired while they differ), last error.
fn config_column(a: &AgentStatus) -> String {
    let short = |s: &str| s.chars().take(8).collect::<String>();
    if a.config_desired.is_empty() && a.config_error.is_empty() {
        return "-".to_string();
    }
    let revs = if a.config_desired == a.config_applied {
        short(&a.config_applied)
    } else {
        format!(
            "{}->{}",
            if a.config_applied.is_empty() {
                "none".to_string()
            } else {
                short(&a.config_applied)
            },
            if a.config_desired.is_empty() {
                "none".to_string()
            } else {
                short(&a.config_desired)
            }
        )
    };
    let mut out = format!("{} {revs}", a.config_state);
    if !a.config_error.is_empty() {
        out.push_str(&format!(" ({})", a.config_error));
    }
    if a.config_state == "refused" {
        out.push_str(" [fix the cause, then `bastide config reload` sends it again]");
    }
    out
}

fn socket(cli: &Cli) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let cfg = Config::parse_file(&cli.config)?;
    match cfg.admin {
        Some(a) => Ok(a.socket),
        None => bail!(
            "{}: no [admin] table: the admin socket is off",
            cli.config.display()
        ),
    }
}

fn init(a: &InitArgs) -> Result<()> {
    let joined = match &a.join {
        Some(bundle) => {
            crate::fsutil::check_secret_file(bundle)?;
            let text = std::fs::read_to_string(bundle)
                .with_context(|| format!("reading {}", bundle.display()))?;
            let id: crate::pki::Identity = serde_json::from_str(&text)
                .with_context(|| format!("{}: not an identity bundle", bundle.display()))?;
            id.check()
                .with_context(|| format!("{}", bundle.display()))?;
            Some(id)
        }
        None => None,
    };
    let project = match (&joined, &a.project) {
        (Some(id), _) => id.project.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("--project or --join is required"),
    };
    let zone = match &joined {
        Some(id) => id.zone.clone(),
        None => a.zone.clone(),
    };
    if !crate::pki::valid_agent_name(&project) {
        bail!("--project {project:?}: must be a lowercase DNS label");
    }
    if let Some(z) = &zone {
        if !crate::pki::valid_zone(z) {
            bail!("--zone {z:?}: not a valid DNS zone name");
        }
    }
    crate::fsutil::ensure_dir(&a.dir, 0o700)?;
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", a.dir.display()))?;
    let paths = crate::pki::PkiPaths::new(&dir);
    match &joined {
        Some(id) => id.install(&paths)?,
        None => crate::pki::init(&paths, &project, zone.as_deref(), &a.sans)?,
    }
    let store = dir.join("registry.sqlite");
    if !store.exists() {
        crate::store::Store::create(&store)?;
        crate::fsutil::sync_dir(&dir)?;
    }
    let cfg_path = dir.join("bastide.toml");
    let mut listeners = Vec::new();
    if !cfg_path.exists() {
        let agents = init_listen("agents.listen", &a.agents_listen, DEFAULT_AGENTS_LISTEN);
        let metrics = init_listen("metrics.listen", &a.metrics_listen, DEFAULT_METRICS_LISTEN);
        let listen = crate::config::InitListen {
            agents: agents.0.clone(),
            metrics: metrics.0.clone(),
        };
        crate::fsutil::write_atomic(
            &cfg_path,
            crate::config::default_file(&project, zone.as_deref(), &dir, &listen).as_bytes(),
            0o640,
        )?;
        listeners = vec![("agents.listen: ", agents), ("metrics.listen:", metrics)];
    } else if !a.agents_listen.is_empty() || !a.metrics_listen.is_empty() {
        eprintln!(
            "warning: {} exists and is kept: --agents-listen and --metrics-listen are not applied (edit the file)",
            cfg_path.display()
        );
    }
    let pin = crate::pki::spki_pin(&crate::pki::read_cert_pem(&paths.ca_cert)?)?;
    println!("state directory: {}", dir.display());
    println!("configuration:   {}", cfg_path.display());
    for (key, (addrs, note)) in listeners {
        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        println!("{key} {}{note}", list.join(", "));
    }
    println!("agent CA pin:    {pin}");
    println!(
        "start with:      bastide serve --config {}",
        cfg_path.display()
    );
    Ok(())
}

const DEFAULT_AGENTS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 4443);
const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9469);
/// How far above a taken default port `init` looks for a free one.
const INIT_PORT_SEARCH: u16 = 100;

/// The addresses `init` writes for a listener, and a note for the admin: those given
/// (with a warning when one is taken now), else the default, moved to the next free port
/// when another process (another bastion on this host) holds it, so that a second
/// bastion set up on a host starts next to the first.
fn init_listen(key: &str, given: &[SocketAddr], default: SocketAddr) -> (Vec<SocketAddr>, String) {
    let free = |a: SocketAddr| std::net::TcpListener::bind(a).is_ok();
    if !given.is_empty() {
        let taken: Vec<String> = given
            .iter()
            .filter(|a| !free(**a))
            .map(|a| a.to_string())
            .collect();
        let note = if taken.is_empty() {
            String::new()
        } else {
            format!(
                "  (warning: {} in use on this host now: `bastide serve` fails until it is free)",
                taken.join(", ")
            )
        };
        return (given.to_vec(), note);
    }
    if free(default) {
        return (vec![default], String::new());
    }
    let flag = key.replace(".listen", "-listen");
    for port in default.port().saturating_add(1)..=default.port().saturating_add(INIT_PORT_SEARCH) {
        let a = SocketAddr::new(default.ip(), port);
        if free(a) {
            return (
                vec![a],
                format!("  ({default} is in use on this host, another bastion?; choose with --{flag} or edit {key})"),
            );
        }
    }
    (
        vec![default],
        format!("  (warning: {default} and the {INIT_PORT_SEARCH} ports above are in use on this host: choose with --{flag} or edit {key})"),
    )
}

fn ts(t: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)).to_string()
}

fn ago(t: Option<i64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let d = (crate::unix_now() - t).max(0);
            format!("{}s ago", d)
        }
    }
}

async fn token(cli: &Cli, cmd: &TokenCmd) -> Result<()> {
    let socket = &socket(cli)?;
    match cmd {
        TokenCmd::Create {
            ttl,
            uses,
            name_pattern,
            labels,
            replace,
            json,
            cloud_init,
            bastion,
        } => {
            // Everything the user-data needs is found before a token is spent on it.
            let enroll = match cloud_init {
                true => Some(cloud_init_settings(cli, bastion.as_deref())?),
                false => None,
            };
            let spec = TokenSpec {
                ttl_secs: ttl.as_secs().max(1),
                uses: *uses,
                name_pattern: name_pattern.clone(),
                labels: labels.clone(),
                replace: *replace,
            };
            let v = admin::call(socket, &AdminRequest::TokenCreate(spec)).await?;
            let t: CreatedToken = serde_json::from_value(v)?;
            if let Some((bastion, pin)) = enroll {
                print!(
                    "{}",
                    cloud_init_user_data(&bastion, &t.token, &pin, &ts(t.expires))
                );
                eprintln!("token {} valid until {}", t.id, ts(t.expires));
            } else if *json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
                eprintln!("token {} valid until {}", t.id, ts(t.expires));
            }
        }
        TokenCmd::List { json } => {
            let v = admin::call(socket, &AdminRequest::TokenList).await?;
            let list: Vec<TokenStatus> = serde_json::from_value(v)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<16}  {:<8}  {:>9}  {:<20}  {:<12}  {:<7}  LABELS",
                    "ID", "STATE", "USES-LEFT", "EXPIRES", "NAMES", "REPLACE"
                );
                for t in list {
                    println!(
                        "{:<16}  {:<8}  {:>9}  {:<20}  {:<12}  {:<7}  {}",
                        t.id,
                        t.state,
                        format!("{}/{}", t.uses_left, t.uses_total),
                        ts(t.expires),
                        t.name_pattern.unwrap_or_else(|| "*".into()),
                        t.replace,
                        labels_str(&t.labels)
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            admin::call(socket, &AdminRequest::TokenRevoke { id: id.clone() }).await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

/// The bastion address VMs dial and the CA pin, for `token create --cloud-init`.
fn cloud_init_settings(cli: &Cli, bastion: Option<&str>) -> Result<(String, String)> {
    let cfg = Config::parse_file(&cli.config)?;
    let bastion = match bastion {
        Some(b) => b.to_string(),
        None => match cfg
            .agents
            .as_ref()
            .map(|a| (&a.listen, crate::listeners::advertised(&a.listen)))
        {
            Some((_, Some(a))) if !a.ip().is_unspecified() => a.to_string(),
            Some((listen, _)) => {
                bail!("agents.listen is {listen:?}: pass --bastion HOST:PORT, the address VMs dial")
            }
            None => bail!(
                "{}: no [agents] table: agents cannot enroll",
                cli.config.display()
            ),
        },
    };
    // Values go into a shell-style environment file: refuse what would need quoting.
    let port_ok = bastion
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok
        || !bastion
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
    {
        bail!("--bastion {bastion:?}: expected HOST:PORT");
    }
    let paths = crate::pki::PkiPaths::new(&cfg.state_dir);
    let pin = crate::pki::spki_pin(&crate::pki::read_cert_pem(&paths.ca_cert)?)?;
    Ok((bastion, pin))
}

/// A cloud-init user-data document: the enrollment settings go to /run (tmpfs, so the
/// token never reaches the VM's disk), the agent package is installed, and enrollment is
/// started (the units are enabled, so a VM whose image already has the package enrolls at
/// boot without the runcmd). Same layout as packaging/cloud-init/user-data.yaml.
pub fn cloud_init_user_data(bastion: &str, token: &str, pin: &str, expires: &str) -> String {
    format!(
        r#"#cloud-config
# Bastide: enroll this VM with its bastion at first boot.
# The enrollment token is valid until {expires}.
write_files:
  - path: /run/bastide-agent/enroll.env
    owner: root:root
    permissions: "0600"
    content: |
      BASTIDE_BASTION={bastion}
      BASTIDE_TOKEN={token}
      BASTIDE_CA_PIN={pin}
      BASTIDE_ENROLL_ARGS=
# The bastide-agent package must be in an apt source of the image (see the README).
packages:
  - bastide-agent
runcmd:
  - [systemctl, start, --no-block, bastide-agent-enroll.service]
"#
    )
}

fn labels_str(l: &BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn agents(socket: &Path, cmd: &AgentsCmd) -> Result<()> {
    match cmd {
        AgentsCmd::List { json } => {
            let v = admin::call(socket, &AdminRequest::AgentsList).await?;
            let list: Vec<AgentStatus> = serde_json::from_value(v)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20}  {:<8}  {:<24}  {:<16}  {:<16}  {:<12}  {:<10}  {:<8}  {:<20}  CONFIG",
                    "NAME",
                    "STATE",
                    "ADDRESSES",
                    "OBSERVED",
                    "FLAGS",
                    "LABELS",
                    "LAST-SEEN",
                    "VERSION",
                    "CERT-EXPIRES"
                );
                let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
                let mut refused = Vec::new();
                for a in &list {
                    println!(
                        "{:<20}  {:<8}  {:<24}  {:<16}  {:<16}  {:<12}  {:<10}  {:<8}  {:<20}  {}",
                        a.name,
                        if a.node.is_empty() {
                            a.state.clone()
                        } else {
                            format!("{}@{}", a.state, a.node)
                        },
                        dash(a.addresses.join(",")),
                        dash(a.observed.clone()),
                        dash(a.flags.join(",")),
                        labels_str(&a.labels),
                        ago(a.last_seen),
                        a.agent_version,
                        ts(a.cert_not_after),
                        config_column(a)
                    );
                    refused.extend(a.refused.iter().map(|r| format!("  {}: {r}", a.name)));
                }
                // Why a claimed address is not used (the address policy, see the README).
                if !refused.is_empty() {
                    println!("\nrefused address claims:");
                    for r in refused {
                        println!("{r}");
                    }
                }
            }
        }
        AgentsCmd::Revoke { name } => {
            admin::call(socket, &AdminRequest::AgentsRevoke { name: name.clone() }).await?;
            println!("agent {name} revoked");
        }
    }
    Ok(())
}

async fn mail(socket: &Path, cmd: &MailCmd) -> Result<()> {
    match cmd {
        MailCmd::Queue { json } => {
            let v = admin::call(socket, &MailRequest::MailQueue).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let list: Vec<crate::smtp::spool::QueueItem> =
                serde_json::from_value(v["messages"].clone())?;
            println!(
                "{:<22}  {:>7}  {:>8}  {:<28}  {:<32}  LAST-ERROR",
                "ID", "AGE", "ATTEMPTS", "SENDER", "RECIPIENTS"
            );
            for m in &list {
                let state = if m.delivering {
                    "delivering".to_string()
                } else {
                    m.last_error.clone().unwrap_or_default()
                };
                println!(
                    "{:<22}  {:>6}s  {:>8}  {:<28}  {:<32}  {}",
                    m.id,
                    m.age_secs,
                    m.attempts,
                    if m.sender.is_empty() { "<>" } else { &m.sender },
                    m.recipients.join(","),
                    state
                );
            }
            println!(
                "{} message(s) queued, {} in dead letters ({}/dead)",
                list.len(),
                v["dead"],
                v["spool"].as_str().unwrap_or("?")
            );
        }
        MailCmd::Flush => {
            let v = admin::call(socket, &MailRequest::MailFlush).await?;
            println!("{} message(s) scheduled for delivery now", v["scheduled"]);
        }
        MailCmd::Retry { id } => {
            admin::call(socket, &MailRequest::MailRetry { id: id.clone() }).await?;
            println!("message {id} scheduled for delivery now");
        }
        MailCmd::Delete { id } => {
            admin::call(socket, &MailRequest::MailDelete { id: id.clone() }).await?;
            println!("message {id} deleted");
        }
    }
    Ok(())
}

async fn ssh(cli: &Cli, cmd: &SshCmd) -> Result<()> {
    match cmd {
        SshCmd::Fingerprint => {
            let cfg = Config::parse_file(&cli.config)?;
            println!("{}", crate::ssh::hosts::fingerprint(&cfg)?);
        }
        SshCmd::UserCa => {
            let cfg = Config::parse_file(&cli.config)?;
            let paths = cfg.pki_paths();
            if crate::ssh::userca::ensure(&paths.ssh_user_ca_key)? {
                eprintln!(
                    "created the SSH user CA {} (restart bastide to use it)",
                    paths.ssh_user_ca_key.display()
                );
            }
            let ca = crate::ssh::userca::load(&paths.ssh_user_ca_key)?;
            println!("{}", crate::ssh::userca::public_line(&ca)?);
        }
        SshCmd::Certs(SshCertsCmd::List { all, json }) => {
            let v = admin::call(&socket(cli)?, &SshCertsRequest::SshCertsList).await?;
            let rows: Vec<crate::store::SshCertRow> = serde_json::from_value(v)?;
            let now = crate::unix_now();
            let rows: Vec<_> = rows
                .into_iter()
                .filter(|r| *all || (!r.revoked && r.valid_before > now))
                .collect();
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<20} {:<16} {:<21} {:<21} {:<8} {:<24} SUB",
                    "SERIAL", "ADMIN", "VALID FROM", "VALID UNTIL", "STATE", "GROUPS"
                );
                for r in rows {
                    let state = if r.revoked {
                        "revoked"
                    } else if r.valid_before <= now {
                        "expired"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<20} {:<16} {:<21} {:<21} {:<8} {:<24} {}",
                        r.serial,
                        r.admin,
                        ts(r.valid_after),
                        ts(r.valid_before),
                        state,
                        r.groups.join(","),
                        r.sub
                    );
                }
            }
        }
        SshCmd::Certs(SshCertsCmd::Revoke { serial, admin: who }) => {
            let req = SshCertsRequest::SshCertsRevoke {
                serial: *serial,
                admin: who.clone(),
            };
            let v = admin::call(&socket(cli)?, &req).await?;
            let r: crate::ssh::issued::Revoked = serde_json::from_value(v)?;
            if r.serials.is_empty() {
                anyhow::bail!("no valid certificate matched");
            }
            for s in &r.serials {
                println!("certificate {s} revoked");
            }
            println!("{} connection(s) cut", r.connections_cut);
        }
        SshCmd::KnownHosts => {
            let v = admin::call(&socket(cli)?, &SshRequest::SshKnownHosts).await?;
            print!("{}", v.as_str().unwrap_or_default());
        }
        SshCmd::Config { user, known_hosts } => {
            let known_hosts = match known_hosts {
                Some(k) => k.clone(),
                None => {
                    let project = Config::parse_file(&cli.config)?.project;
                    format!("~/.ssh/bastide-{project}.known_hosts")
                }
            };
            let req = SshRequest::SshConfig {
                user: user.clone(),
                known_hosts,
            };
            let v = admin::call(&socket(cli)?, &req).await?;
            print!("{}", v.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

async fn status(socket: &Path, json: bool) -> Result<()> {
    let v = admin::call(socket, &AdminRequest::Status).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let days = |t: &serde_json::Value| match t.as_i64() {
        Some(t) => format!("{} ({} days)", ts(t), (t - crate::unix_now()) / 86400),
        None => "unknown".into(),
    };
    println!(
        "bastide {}  project {}",
        v["version"].as_str().unwrap_or("?"),
        v["project"].as_str().unwrap_or("?")
    );
    if let Some(s) = v["services"].as_object() {
        let list: Vec<String> = s
            .iter()
            .map(|(k, on)| {
                format!(
                    "{k} {}",
                    if on.as_bool() == Some(true) {
                        "on"
                    } else {
                        "off"
                    }
                )
            })
            .collect();
        println!("services      {}", list.join(", "));
    }
    if let Some(l) = v["listen"].as_object() {
        let list: Vec<String> = l
            .iter()
            .map(|(k, addrs)| {
                let addrs: Vec<&str> = addrs
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                    .unwrap_or_default();
                format!("{k} {}", addrs.join(" "))
            })
            .collect();
        println!("listen        {}", list.join(", "));
    }
    if let Some(s) = v["store"].as_str() {
        println!("store         {s}");
    }
    if let Some(c) = v["cluster"].as_object() {
        let node = c.get("node").and_then(|x| x.as_str()).unwrap_or("?");
        let leader = if c.get("leader").and_then(|x| x.as_bool()) == Some(true) {
            ", leader"
        } else {
            ""
        };
        let store = match c.get("disconnected_secs").and_then(|x| x.as_u64()) {
            None => "database reachable".to_string(),
            Some(s) => format!("database UNREACHABLE for {s}s"),
        };
        println!("cluster       node {node}{leader}, {store}");
        if let Some(r) = c.get("refusal").and_then(|x| x.as_str()) {
            println!("              REFUSING NEW AGENT SESSIONS: {r}");
        }
    }
    let a = &v["agents"];
    println!(
        "agents        {} online, {} offline, {} revoked",
        a["online"], a["offline"], a["revoked"]
    );
    match v["mail"].as_object() {
        Some(m) => println!(
            "mail queue    {} queued, oldest {}s",
            m["queued"], m["oldest_age_secs"]
        ),
        None => println!("mail queue    relay off"),
    }
    if let Some(l) = v["logs"].as_object() {
        println!(
            "log store     {} bytes in {}, {} events received, {} duplicate batches{}",
            l["store_bytes"],
            l["dir"].as_str().unwrap_or("?"),
            l["events_received"],
            l["duplicate_batches"],
            if l["store_failed"].as_bool() == Some(true) {
                "  FAILED: restart to recover"
            } else {
                ""
            }
        );
        if let Some(f) = l["forward"].as_object() {
            println!(
                "log forward   {} bytes queued, {}, {} sent, {} dropped",
                f["queue_bytes"],
                if f["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "not connected"
                },
                f["sent"],
                f["dropped"]
            );
        }
    }
    if let Some(g) = v["config_source"].as_object() {
        let text = |k: &str| g.get(k).and_then(|x| x.as_str()).unwrap_or("");
        let commit = text("commit");
        println!(
            "config source {} {}  commit {}{}",
            text("url"),
            text("branch"),
            if commit.is_empty() { "none" } else { commit },
            match g.get("applied_at").and_then(|t| t.as_i64()) {
                Some(t) if t > 0 => format!(" (applied {})", ts(t)),
                _ => String::new(),
            }
        );
        if !text("fetch_error").is_empty() {
            println!("  last fetch failed: {}", text("fetch_error"));
        }
        if let Some(r) = g.get("refused").and_then(|r| r.as_object()) {
            let rt = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("");
            println!(
                "  REFUSED commit {}: {} (signer {}): {}",
                rt("commit"),
                rt("reason"),
                if rt("signer").is_empty() {
                    "-"
                } else {
                    rt("signer")
                },
                rt("detail")
            );
        }
    }
    let c = &v["certificates"];
    println!("agent CA      valid until {}", days(&c["ca_not_after"]));
    println!("server cert   valid until {}", days(&c["server_not_after"]));
    if let Some(list) = c["offline_agents_expiring"].as_array() {
        for e in list {
            println!(
                "  offline agent {} certificate expires {} (must re-enroll if it stays offline)",
                e["name"].as_str().unwrap_or("?"),
                ts(e["not_after"].as_i64().unwrap_or(0))
            );
        }
    }
    Ok(())
}

async fn logs(socket: &Path, a: &LogsArgs) -> Result<()> {
    use std::io::Write;
    let req = crate::logs::service::LogsRequest::Logs(crate::logs::query::LogsQuery {
        host: a.host.clone(),
        since_ms: a.since,
        until_ms: a.until,
        grep: a.grep.clone(),
        follow: a.follow,
    });
    let stdout = std::io::stdout();
    let json = a.json;
    admin::call_stream(socket, &req, |v| {
        let mut out = stdout.lock();
        if let Some(line) = v["line"].as_str() {
            if json {
                match crate::logs::format::parse_line(line) {
                    Some(p) => writeln!(out, "{}", serde_json::to_string(&p)?)?,
                    None => writeln!(out, "{}", serde_json::json!({ "raw": line }))?,
                }
            } else {
                writeln!(out, "{line}")?;
            }
            if a.follow {
                out.flush()?;
            }
        } else if let Some(n) = v["notice"].as_str() {
            eprintln!("{n}");
        }
        Ok(())
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A default held by another process moves to the next free port, with a note naming
    /// the flag; an address the admin gave is kept, with a warning when it is taken now.
    #[test]
    fn init_listeners_avoid_taken_defaults_and_keep_given_ones() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        let (addrs, note) = init_listen("metrics.listen", &[], taken);
        assert_eq!(addrs.len(), 1);
        assert_ne!(addrs[0], taken);
        assert!(addrs[0].port() > taken.port(), "{addrs:?}");
        assert!(
            note.contains(&format!("{taken} is in use on this host"))
                && note.contains("--metrics-listen"),
            "{note}"
        );
        let (addrs, note) = init_listen("agents.listen", &[taken], taken);
        assert_eq!(addrs, vec![taken]);
        assert!(
            note.contains("warning") && note.contains(&taken.to_string()),
            "{note}"
        );
        drop(held);
        let (addrs, note) = init_listen("agents.listen", &[], taken);
        assert_eq!((addrs, note), (vec![taken], String::new()));
    }
}
