//! Pieces shared by the load tool (`bastide-load`) and the soak tool (`bastide-soak`):
//! enrollment helpers, synthetic metrics, small parsers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bastide_agent::tls::{connect, enroll_config, PinVerifier};

/// `500ms`, `10s`, `3m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration {s}")),
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Clock ticks per second (for /proc CPU times).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A batch shaped like a small VM's: CPU per mode, memory, filesystems, interfaces.
/// A metrics batch of `series` synthetic counters, like an agent's collection.
pub fn synthetic_batch(series: usize) -> bastide_proto::v1::MetricsBatch {
    use bastide_proto::v1::{Label, MetricFamily, MetricType, MetricsBatch, Sample};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let per_family = 10;
    let families = (0..series.div_ceil(per_family))
        .map(|f| MetricFamily {
            name: format!("node_synthetic_{f}_total"),
            help: "Synthetic load-test series.".into(),
            r#type: MetricType::Counter as i32,
            samples: (0..per_family.min(series - f * per_family))
                .map(|i| Sample {
                    labels: vec![
                        Label {
                            name: "device".into(),
                            value: format!("dev{i}"),
                        },
                        Label {
                            name: "mode".into(),
                            value: "user".into(),
                        },
                    ],
                    value: rand::random::<f64>() * 1e9,
                })
                .collect(),
        })
        .collect();
    MetricsBatch {
        timestamp_ms: now,
        families,
    }
}

/// The bastion's CA, read from the chain it presents (checked against the pin).
pub async fn fetch_ca(addr: &str, pin: &str) -> Result<rustls_pem::Cert> {
    let verifier = Arc::new(PinVerifier::new(pin.to_string()));
    let _ = connect(addr, "127.0.0.1", enroll_config(verifier.clone())?).await?;
    let ca = verifier
        .matched_ca
        .lock()
        .ok()
        .and_then(|m| m.clone())
        .context("no CA")?;
    Ok(ca)
}

/// An enrolled simulated agent's name, certificate and key (PEM).
pub struct Cred {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// PEM helpers over rustls' pki types.
pub mod rustls_pem {
    use anyhow::{Context, Result};
    use bastide_agent::tls::pki::pem::PemObject;
    use bastide_agent::tls::pki::{CertificateDer, PrivateKeyDer};

    pub type Cert = CertificateDer<'static>;

    pub fn parse(cert: &str, key: &str) -> Result<(Vec<Cert>, PrivateKeyDer<'static>)> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("cert")?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("key")?;
        Ok((chain, key))
    }
}

/// Starts `bastide --config CFG serve` with warnings to `log`, and waits until its admin
/// socket answers (`agents list`), for at most `within`.
pub fn start_bastide(bastide: &Path, cfg: &Path, log: &Path, within: Duration) -> Result<Child> {
    let mut child = Command::new(bastide)
        .arg("--config")
        .arg(cfg)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(log)?)
        .stdout(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while bastide_cli(bastide, cfg, &["agents", "list"]).is_err() {
        if start.elapsed() > within {
            let _ = child.kill();
            bail!("bastide did not start (see {})", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child)
}

/// Runs one admin command of the bastion and returns its output.
pub fn bastide_cli(bastide: &Path, cfg: &Path, args: &[&str]) -> Result<String> {
    let o = Command::new(bastide)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}
