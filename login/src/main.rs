//! `bastide-login`: an admin's single sign-on to a bastide bastion. Fetches the bastion's
//! login settings over HTTPS (its CA pinned like the agents pin it, or from a CA file), runs
//! the OAuth 2.0 Device Authorization Grant (RFC 8628) against the institution's OpenID
//! Connect provider, sends the ID token and the admin's SSH public key to the bastion, and
//! writes the short-lived certificate it returns next to the key, with the known_hosts file
//! and the `~/.ssh/config` block that make stock `ssh`, `scp`, `rsync` and Ansible jump
//! through the bastion without a prompt until the certificate expires.

mod tls;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "bastide-login", version, about, subcommand_negates_reqs = true)]
struct Cli {
    /// The bastion's login endpoint (`[ssh.sso] listen`), e.g. https://bastion.example.org:8443
    #[arg(long, env = "BASTIDE_LOGIN_URL", required = true)]
    bastion: Option<String>,
    /// Pin of the bastion's CA (sha256:HEX, what `bastide token create` prints for agents).
    #[arg(long, env = "BASTIDE_LOGIN_PIN", conflicts_with = "ca_file")]
    pin: Option<String>,
    /// The bastion's CA certificate (PEM) instead of a pin.
    #[arg(long, env = "BASTIDE_LOGIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The SSH private key to certify (created, Ed25519, when missing).
    #[arg(long, default_value = "~/.ssh/id_ed25519")]
    key: String,
    /// Where the known_hosts file (and, with --install-config, the config) go.
    #[arg(long, default_value = "~/.ssh")]
    ssh_dir: String,
    /// Write the Host block into <ssh-dir>/config (between marker lines, replacing an
    /// earlier one) instead of printing it.
    #[arg(long)]
    install_config: bool,
    /// Never try to open a browser.
    #[arg(long)]
    no_browser: bool,
    /// Seconds between polls of the provider when it names no interval (RFC 8628: 5).
    #[arg(long, hide = true, default_value_t = 5)]
    poll_interval: u64,
    /// With no subcommand: log in.
    #[command(subcommand)]
    command: Option<Command>,
}

/// The packaged documentation, generated from this definition (packaging/build-debs).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (bastide-login.1 and one per subcommand) into a directory.
    Manpages { dir: PathBuf },
}

/// What `GET /v1/sso` answers (see bastion/src/ssh/sso/http.rs).
#[derive(Debug, Deserialize)]
struct Settings {
    project: String,
    issuer: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    scopes: Vec<String>,
    ssh_host: String,
    ssh_port: u16,
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    device_authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DeviceAuth {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    interval: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Issued {
    admin: String,
    serial: i64,
    groups: Vec<String>,
    valid_before: i64,
    certificate: String,
    /// known_hosts lines of the bastion and its VMs.
    known_hosts: String,
    /// Host patterns to reach through the bastion.
    #[serde(default)]
    jump_patterns: Vec<String>,
}

fn expand(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => match std::env::var_os("HOME") {
            Some(h) => Path::new(&h).join(rest),
            None => PathBuf::from(p),
        },
        None => PathBuf::from(p),
    }
}

/// http is only for a provider on loopback (tests, a provider on the same host).
fn provider_url_allowed(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => true,
        "http" => match u.host_str() {
            Some("localhost") => true,
            Some(h) => h
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        },
        _ => false,
    }
}

async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response, what: &str) -> Result<T> {
    let status = r.status();
    let body = r.text().await.with_context(|| format!("reading {what}"))?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("{what}: HTTP {status}: {msg}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what}: unexpected answer"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("bastide-login: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Completions { shell }) => {
            return bastide_common::clidocs::print_completions(
                <Cli as clap::CommandFactory>::command(),
                shell,
            )
        }
        Some(Command::Manpages { dir }) => {
            return bastide_common::clidocs::write_man_pages(
                <Cli as clap::CommandFactory>::command(),
                &dir,
            )
        }
        None => {}
    }
    let url = cli.bastion.as_deref().context("--bastion is required")?;
    let base = url.trim_end_matches('/').to_string();
    if !base.starts_with("https://") {
        bail!("--bastion must be an https:// URL");
    }
    let bastion = tls::bastion_client(cli.pin.as_deref(), cli.ca_file.as_deref())?;
    let settings: Settings = json(
        bastion
            .get(format!("{base}/v1/sso"))
            .send()
            .await
            .context("reaching the bastion")?,
        "the bastion's login settings",
    )
    .await?;
    if !provider_url_allowed(&settings.issuer) {
        bail!(
            "the bastion names provider {:?}: only https (or http on loopback) is used",
            settings.issuer
        );
    }
    let provider = tls::provider_client()?;
    let issuer = settings.issuer.trim_end_matches('/');
    let disco: Discovery = json(
        provider
            .get(format!("{issuer}/.well-known/openid-configuration"))
            .send()
            .await
            .context("reaching the identity provider")?,
        "the provider's discovery document",
    )
    .await?;
    if disco.issuer.trim_end_matches('/') != issuer {
        bail!(
            "the provider says it is {:?}, the bastion expects {issuer:?}",
            disco.issuer
        );
    }
    let device_ep = disco
        .device_authorization_endpoint
        .filter(|u| provider_url_allowed(u))
        .context("the provider offers no device authorization endpoint (RFC 8628)")?;
    let token_ep = disco
        .token_endpoint
        .filter(|u| provider_url_allowed(u))
        .context("the provider has no token endpoint")?;
    let scope = settings.scopes.join(" ");
    let mut form = vec![("client_id", settings.client_id.clone()), ("scope", scope)];
    if let Some(s) = &settings.client_secret {
        form.push(("client_secret", s.clone()));
    }
    let auth: DeviceAuth = json(
        provider.post(&device_ep).form(&form).send().await?,
        "the device authorization request",
    )
    .await?;
    let open = auth
        .verification_uri_complete
        .clone()
        .unwrap_or_else(|| auth.verification_uri.clone());
    println!(
        "To log in, open {} and enter the code {}",
        auth.verification_uri, auth.user_code
    );
    if !cli.no_browser && std::env::var_os("DISPLAY").is_some() {
        let _ = std::process::Command::new("xdg-open")
            .arg(&open)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let id_token = poll(&provider, &token_ep, &settings, &auth, cli.poll_interval).await?;

    let key = expand(&cli.key);
    let public = key.with_extension(match key.extension() {
        Some(e) => format!("{}.pub", e.to_string_lossy()),
        None => "pub".into(),
    });
    if !key.exists() {
        if let Some(d) = key.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "bastide-login", "-f"])
            .arg(&key)
            .status()
            .context("running ssh-keygen (install openssh-client)")?;
        if !st.success() {
            bail!("ssh-keygen failed to create {}", key.display());
        }
        println!("created the SSH key {}", key.display());
    }
    let public_key = std::fs::read_to_string(&public)
        .with_context(|| format!("reading {}", public.display()))?;
    let issued: Issued = json(
        bastion
            .post(format!("{base}/v1/sso/login"))
            .json(&serde_json::json!({ "id_token": id_token, "public_key": public_key.trim() }))
            .send()
            .await
            .context("reaching the bastion")?,
        "the bastion refused the login",
    )
    .await?;
    let cert_path = PathBuf::from(format!("{}-cert.pub", key.display()));
    write(
        &cert_path,
        format!("{}\n", issued.certificate.trim()).as_bytes(),
    )?;
    let ssh_dir = expand(&cli.ssh_dir);
    std::fs::create_dir_all(&ssh_dir).with_context(|| format!("creating {}", ssh_dir.display()))?;
    let kh = ssh_dir.join(format!("bastide-{}.known_hosts", settings.project));
    write(&kh, issued.known_hosts.as_bytes())?;
    let until = std::time::UNIX_EPOCH + Duration::from_secs(issued.valid_before.max(0) as u64);
    println!(
        "certificate {} for {} (groups: {}) written to {}, valid until {}",
        issued.serial,
        issued.admin,
        issued.groups.join(", "),
        cert_path.display(),
        humantime_like(until)
    );
    let block = config_block(&settings, &issued, &key, &cert_path, &kh);
    if cli.install_config {
        let path = ssh_dir.join("config");
        install_block(&path, &settings.project, &block)?;
        println!("~/.ssh/config block installed in {}", path.display());
    } else {
        println!("\nAdd this to ~/.ssh/config (or run again with --install-config):\n");
        print!("{block}");
    }
    Ok(())
}

async fn poll(
    provider: &reqwest::Client,
    token_ep: &str,
    settings: &Settings,
    auth: &DeviceAuth,
    default_interval: u64,
) -> Result<String> {
    let mut interval = Duration::from_secs(auth.interval.unwrap_or(default_interval).clamp(1, 60));
    let deadline = Instant::now() + Duration::from_secs(auth.expires_in.unwrap_or(600).min(3600));
    loop {
        if Instant::now() > deadline {
            bail!("the code expired before the login was approved");
        }
        tokio::time::sleep(interval).await;
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:device_code".to_string(),
            ),
            ("device_code", auth.device_code.clone()),
            ("client_id", settings.client_id.clone()),
        ];
        if let Some(s) = &settings.client_secret {
            form.push(("client_secret", s.clone()));
        }
        let r = provider.post(token_ep).form(&form).send().await?;
        let t: TokenAnswer =
            serde_json::from_str(&r.text().await?).context("the provider's token answer")?;
        if let Some(tok) = t.id_token {
            return Ok(tok);
        }
        match t.error.as_deref() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += Duration::from_secs(5),
            Some(e) => bail!(
                "the provider refused: {e}{}",
                t.error_description
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            None => {
                bail!("the provider answered without an ID token (is \"openid\" among the scopes?)")
            }
        }
    }
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-bastide-login");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn humantime_like(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let left = secs.saturating_sub(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    format!("{}h{:02}m from now", left / 3600, (left % 3600) / 60)
}

fn config_block(s: &Settings, issued: &Issued, key: &Path, cert: &Path, kh: &Path) -> String {
    let alias = format!("bastide-{}", s.project);
    let admin = &issued.admin;
    let mut out = format!(
        "Host {alias}\n    HostName {}\n    Port {}\n    User {admin}\n    IdentityFile {}\n    CertificateFile {}\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
        s.ssh_host,
        s.ssh_port,
        key.display(),
        cert.display(),
        kh.display()
    );
    if !issued.jump_patterns.is_empty() {
        out.push_str(&format!(
            "\nHost {}\n    ProxyJump {alias}\n    IdentityFile {}\n    CertificateFile {}\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
            issued.jump_patterns.join(" "),
            key.display(),
            cert.display(),
            kh.display()
        ));
    }
    out
}

/// Replaces the block between this project's markers in `path` (or appends it).
fn install_block(path: &Path, project: &str, block: &str) -> Result<()> {
    let begin = format!("# bastide-login {project} begin");
    let end = format!("# bastide-login {project} end");
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::new();
    let mut skipping = false;
    for line in old.lines() {
        if line.trim() == begin {
            skipping = true;
            continue;
        }
        if skipping {
            if line.trim() == end {
                skipping = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    // First: OpenSSH takes the first value of each option, so ours must come before a
    // `Host *` block.
    let new = format!("{begin}\n{block}{end}\n\n{out}");
    write(path, new.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_block_is_installed_once() {
        let dir = std::env::temp_dir().join(format!("bastide-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config");
        std::fs::write(&path, "Host *\n    ServerAliveInterval 30\n").unwrap();
        install_block(&path, "p", "Host bastide-p\n    Port 1\n").unwrap();
        install_block(&path, "p", "Host bastide-p\n    Port 2\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("Host bastide-p").count(), 1, "{text}");
        assert!(text.contains("Port 2") && !text.contains("Port 1\n"));
        assert!(text.find("bastide-p").unwrap() < text.find("Host *").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn provider_urls() {
        assert!(provider_url_allowed("https://idp.example.org/realms/x"));
        assert!(provider_url_allowed("http://127.0.0.1:8080"));
        assert!(provider_url_allowed("http://[::1]:8080"));
        assert!(!provider_url_allowed("http://idp.example.org"));
        assert!(!provider_url_allowed("file:///etc/passwd"));
    }
}
