//! The agent's state directory: its private key (0600, never leaves the VM), its certificate,
//! the pinned CA and a small metadata file. Renewal replaces key and certificate so that a
//! crash at any point leaves a matching pair.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::fsutil::{sync_dir, write_atomic};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Name granted by the bastion (also in the certificate).
    pub name: String,
    /// HOST:PORT of the bastion's agents endpoint.
    pub bastion: String,
    /// Other bastions of the project (HOST:PORT), tried in turn when the session is lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bastions: Vec<String>,
    /// Name the bastion's server certificate is checked against.
    pub server_name: String,
    pub project: String,
    #[serde(default)]
    pub zone: String,
    /// When the current certificate was received (renewal is due at 2/3 of its lifetime).
    pub cert_received: i64,
}

#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub meta: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            key: dir.join("key.pem"),
            cert: dir.join("cert.pem"),
            ca: dir.join("ca.pem"),
            meta: dir.join("agent.toml"),
        }
    }

    fn pending(p: &Path) -> PathBuf {
        let mut s = p.as_os_str().to_owned();
        s.push(".new");
        PathBuf::from(s)
    }

    pub fn enrolled(&self) -> bool {
        self.cert.exists() && self.key.exists() && self.meta.exists()
    }
}

/// A loaded identity.
#[derive(Debug, Clone)]
pub struct State {
    pub paths: Paths,
    pub meta: Meta,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub not_after: i64,
}

/// Validity of a PEM certificate, (not_before, not_after) in Unix seconds.
pub fn validity(cert_pem: &str) -> Result<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parsing certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).context("parsing certificate")?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

impl State {
    /// Loads the state, first finishing a renewal interrupted by a crash.
    pub fn load(dir: &Path) -> Result<Self> {
        let paths = Paths::new(dir);
        let pending_cert = Paths::pending(&paths.cert);
        let pending_key = Paths::pending(&paths.key);
        if pending_cert.exists() {
            // cert.pem.new is only created once key.pem.new is durable: finish the swap.
            if pending_key.exists() {
                std::fs::rename(&pending_key, &paths.key)?;
            }
            std::fs::rename(&pending_cert, &paths.cert)?;
            sync_dir(dir)?;
        } else if pending_key.exists() {
            // A renewal that never got its certificate written: discard its key.
            std::fs::remove_file(&pending_key)?;
        }
        if !paths.enrolled() {
            bail!(
                "{} holds no enrollment: run `bastide-agent enroll` first",
                dir.display()
            );
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let meta: Meta = toml::from_str(&read(&paths.meta)?)
            .with_context(|| format!("parsing {}", paths.meta.display()))?;
        let cert_pem = read(&paths.cert)?;
        let key_pem = read(&paths.key)?;
        let ca_pem = read(&paths.ca)?;
        let (_, not_after) = validity(&cert_pem)?;
        Ok(Self {
            paths,
            meta,
            cert_pem,
            key_pem,
            ca_pem,
            not_after,
        })
    }

    /// Writes a fresh enrollment.
    pub fn save_new(
        dir: &Path,
        meta: &Meta,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<()> {
        crate::fsutil_ensure_dir(dir)?;
        let paths = Paths::new(dir);
        write_atomic(&paths.key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&paths.ca, ca_pem.as_bytes(), 0o644)?;
        write_atomic(&paths.cert, cert_pem.as_bytes(), 0o644)?;
        write_atomic(&paths.meta, toml::to_string(meta)?.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Replaces key and certificate after a renewal, crash-safely (see `load`).
    pub fn save_renewal(&mut self, key_pem: &str, cert_pem: &str) -> Result<()> {
        let pending_key = Paths::pending(&self.paths.key);
        let pending_cert = Paths::pending(&self.paths.cert);
        write_atomic(&pending_key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&pending_cert, cert_pem.as_bytes(), 0o644)?;
        std::fs::rename(&pending_key, &self.paths.key)?;
        std::fs::rename(&pending_cert, &self.paths.cert)?;
        sync_dir(&self.paths.dir)?;
        self.meta.cert_received = crate::unix_now();
        write_atomic(
            &self.paths.meta,
            toml::to_string(&self.meta)?.as_bytes(),
            0o644,
        )?;
        self.key_pem = key_pem.to_string();
        self.cert_pem = cert_pem.to_string();
        self.not_after = validity(cert_pem)?.1;
        Ok(())
    }

    /// When the certificate should be renewed: at 2/3 of its lifetime as received.
    pub fn renew_at(&self) -> i64 {
        let start = self.meta.cert_received.min(self.not_after);
        start + (self.not_after - start) * 2 / 3
    }

    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing cert.pem")
    }

    pub fn key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("parsing key.pem")
    }

    pub fn ca(&self) -> Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).context("parsing ca.pem")
    }
}
