//! The bastion's PKI: the agent CA, the gRPC server certificate, the SSH host key, and the
//! signing of agent certificates whose every field is chosen here, never copied from a CSR.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use thiserror::Error;
use time::{Duration as TimeDuration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::fsutil::{check_secret_file, write_atomic};

/// How far back agent certificates' notBefore is set, against clock skew between VMs.
pub const BACKDATE: TimeDuration = TimeDuration::minutes(5);
/// Lifetime of the agent CA created by `bastide init`.
const CA_LIFETIME_DAYS: i64 = 3650;
/// Lifetime of the gRPC server certificate; it is reissued at start when close to expiry.
const SERVER_CERT_DAYS: i64 = 397;
/// Remaining lifetime under which `serve` reissues the server certificate.
const SERVER_CERT_RENEW_DAYS: i64 = 30;
/// The DNS name always present in the server certificate, usable as `--server-name`.
pub const SERVER_NAME: &str = "bastide";

/// Where the PKI files live inside a state directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ssh_host_key: PathBuf,
    /// The SSH user-certificate CA of single sign-on (`crate::ssh::userca`).
    pub ssh_user_ca_key: PathBuf,
}

impl PkiPaths {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("pki");
        Self {
            ca_cert: dir.join("agent-ca.crt"),
            ca_key: dir.join("agent-ca.key"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            ssh_host_key: state_dir.join("ssh_host_ed25519_key"),
            ssh_user_ca_key: dir.join("ssh-user-ca.key"),
            dir,
        }
    }
}

/// Errors in CSRs and certificates that come from agents.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("malformed certificate signing request")]
    MalformedCsr,
    #[error("the CSR's signature does not verify (proof of possession failed)")]
    BadCsrSignature,
    #[error("unsupported public key algorithm in CSR (use ECDSA P-256/P-384 or Ed25519)")]
    UnsupportedKey,
    #[error("certificate signing failed: {0}")]
    Signing(String),
    #[error("malformed client certificate")]
    MalformedCert,
    #[error("client certificate carries no agent identity for project {0}")]
    NoIdentity(String),
}

/// An issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial: String,
    pub not_after: i64,
}

/// The agent identity read from a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub name: String,
    pub serial: String,
    pub not_after: i64,
}

/// The loaded agent CA, able to sign agent certificates.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub project: String,
    pub zone: Option<String>,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa")
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

/// Checks that a name is a valid agent name: a lowercase DNS label.
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a DNS zone name (dot-separated labels, trailing dot optional).
pub fn valid_zone(zone: &str) -> bool {
    let z = zone.strip_suffix('.').unwrap_or(zone);
    !z.is_empty()
        && z.len() <= 253
        && z.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and of full length, so the hex form is stable.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn ia5(s: String) -> Result<rcgen::string::Ia5String> {
    rcgen::string::Ia5String::try_from(s).map_err(|e| anyhow::anyhow!("invalid IA5 string: {e}"))
}

/// sha256:<hex> of the certificate's SubjectPublicKeyInfo (the scheme of Teleport's --ca-pin).
pub fn spki_pin(cert_der: &[u8]) -> Result<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).context("parsing CA certificate")?;
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

/// Reads the first certificate of a PEM file.
pub fn read_cert_pem(path: &Path) -> Result<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading certificate {}", path.display()))
}

/// Creates the PKI of a new state directory. Refuses to overwrite an existing CA.
pub fn init(
    paths: &PkiPaths,
    project: &str,
    zone: Option<&str>,
    extra_sans: &[String],
) -> Result<()> {
    if paths.ca_key.exists() || paths.ca_cert.exists() {
        bail!(
            "an agent CA already exists in {}: refusing to overwrite it (agents trust it)",
            paths.dir.display()
        );
    }
    crate::fsutil::ensure_dir(&paths.dir, 0o700)?;
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate().context("generating CA key")?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Bastide agent CA ({project})"));
    dn.push(DnType::OrganizationName, "Bastide");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - BACKDATE;
    ca.not_after = now + TimeDuration::days(CA_LIFETIME_DAYS);
    ca.serial_number = Some(random_serial());
    let ca_cert = ca.self_signed(&ca_key).context("self-signing CA")?;
    write_atomic(&paths.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;

    let issuer = Issuer::new(ca, ca_key);
    issue_server_cert(paths, &issuer, project, zone, extra_sans)?;
    write_ssh_host_key(&paths.ssh_host_key)?;
    crate::ssh::userca::ensure(&paths.ssh_user_ca_key)?;
    Ok(())
}

fn server_sans(project: &str, zone: Option<&str>, extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        SERVER_NAME.to_string(),
        format!("bastion.{project}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    if let Some(z) = zone {
        sans.push(format!("bastion.{}", z.trim_end_matches('.')));
    }
    sans.extend(extra.iter().cloned());
    sans.sort();
    sans.dedup();
    sans
}

fn issue_server_cert(
    paths: &PkiPaths,
    issuer: &Issuer<'_, KeyPair>,
    project: &str,
    zone: Option<&str>,
    extra_sans: &[String],
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate().context("generating server key")?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("bastide {project}"));
    p.distinguished_name = dn;
    for san in server_sans(project, zone, extra_sans) {
        p.subject_alt_names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(ia5(san)?),
        });
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now - BACKDATE;
    p.not_after = now + TimeDuration::days(SERVER_CERT_DAYS);
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    let cert = p
        .signed_by(&key, issuer)
        .context("signing server certificate")?;
    write_atomic(&paths.server_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.server_cert, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_ssh_host_key(path: &Path) -> Result<()> {
    use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding, PrivateKey};
    if path.exists() {
        return Ok(());
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("bastide host key");
    let pem = key
        .to_openssh(LineEnding::LF)
        .context("encoding SSH host key")?;
    write_atomic(path, pem.as_bytes(), 0o600)?;
    let public = key
        .public_key()
        .to_openssh()
        .context("encoding SSH public key")?;
    write_atomic(
        &path.with_extension("pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
}

/// Format tag of the identity bundle (`bastide export-identity`).
pub const IDENTITY_FORMAT: &str = "bastide-identity/1";

/// What every node of a project shares, so that agents (which pin one CA and check the
/// server name) and admins (whose known_hosts holds one key per bastion name) see one
/// bastion: the agent CA with its key, the gRPC server certificate with its key, and the SSH
/// host key. Written by `bastide export-identity` (mode 0600: it holds the CA key), read by
/// `bastide init --join`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub format: String,
    pub project: String,
    pub zone: Option<String>,
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
    pub ssh_host_key: String,
    /// The SSH user CA (absent in bundles of bastides that predate single sign-on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user_ca_key: Option<String>,
}

impl Identity {
    /// Reads the identity of an initialised state directory.
    pub fn read(paths: &PkiPaths, project: &str, zone: Option<&str>) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        for key in [&paths.ca_key, &paths.server_key, &paths.ssh_host_key] {
            check_secret_file(key)?;
        }
        Ok(Self {
            format: IDENTITY_FORMAT.into(),
            project: project.into(),
            zone: zone.map(str::to_string),
            ca_cert: read(&paths.ca_cert)?,
            ca_key: read(&paths.ca_key)?,
            server_cert: read(&paths.server_cert)?,
            server_key: read(&paths.server_key)?,
            ssh_host_key: read(&paths.ssh_host_key)?,
            ssh_user_ca_key: match paths.ssh_user_ca_key.exists() {
                true => {
                    check_secret_file(&paths.ssh_user_ca_key)?;
                    Some(read(&paths.ssh_user_ca_key)?)
                }
                false => None,
            },
        })
    }

    /// Checks that the parts are what they claim and belong together: the CA key is the
    /// CA certificate's, the server certificate is signed by that CA and matches its key,
    /// the SSH key parses.
    pub fn check(&self) -> Result<()> {
        if self.format != IDENTITY_FORMAT {
            bail!(
                "identity bundle format {:?}, this bastide reads {IDENTITY_FORMAT:?}",
                self.format
            );
        }
        if !valid_agent_name(&self.project) {
            bail!(
                "identity bundle: project {:?} is not a DNS label",
                self.project
            );
        }
        use rustls_pki_types::pem::PemObject;
        let ca_der = CertificateDer::from_pem_slice(self.ca_cert.as_bytes())
            .context("identity bundle: CA certificate")?;
        let ca_key = KeyPair::from_pem(&self.ca_key).context("identity bundle: CA key")?;
        let (_, ca) =
            X509Certificate::from_der(&ca_der).context("identity bundle: CA certificate")?;
        if ca.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&ca_key).as_slice()
        {
            bail!("identity bundle: the CA key is not the CA certificate's");
        }
        let srv_der = CertificateDer::from_pem_slice(self.server_cert.as_bytes())
            .context("identity bundle: server certificate")?;
        let srv_key = KeyPair::from_pem(&self.server_key).context("identity bundle: server key")?;
        let (_, srv) =
            X509Certificate::from_der(&srv_der).context("identity bundle: server certificate")?;
        if srv.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&srv_key).as_slice()
        {
            bail!("identity bundle: the server key is not the server certificate's");
        }
        srv.verify_signature(Some(ca.public_key())).map_err(|_| {
            anyhow::anyhow!("identity bundle: the server certificate is not signed by the CA")
        })?;
        russh::keys::ssh_key::PrivateKey::from_openssh(&self.ssh_host_key)
            .context("identity bundle: SSH host key")?;
        if let Some(k) = &self.ssh_user_ca_key {
            russh::keys::ssh_key::PrivateKey::from_openssh(k)
                .context("identity bundle: SSH user CA key")?;
        }
        Ok(())
    }

    /// Writes the identity into a new state directory's files (refusing to overwrite a CA).
    pub fn install(&self, paths: &PkiPaths) -> Result<()> {
        self.check()?;
        if paths.ca_key.exists() || paths.ca_cert.exists() || paths.ssh_host_key.exists() {
            bail!(
                "{} already holds an agent CA or an SSH host key: join into a new directory",
                paths.dir.display()
            );
        }
        crate::fsutil::ensure_dir(&paths.dir, 0o700)?;
        write_atomic(&paths.ca_key, self.ca_key.as_bytes(), 0o600)?;
        write_atomic(&paths.ca_cert, self.ca_cert.as_bytes(), 0o644)?;
        write_atomic(&paths.server_key, self.server_key.as_bytes(), 0o600)?;
        write_atomic(&paths.server_cert, self.server_cert.as_bytes(), 0o644)?;
        write_atomic(&paths.ssh_host_key, self.ssh_host_key.as_bytes(), 0o600)?;
        if let Some(k) = &self.ssh_user_ca_key {
            write_atomic(&paths.ssh_user_ca_key, k.as_bytes(), 0o600)?;
            let ca = russh::keys::ssh_key::PrivateKey::from_openssh(k)
                .context("identity bundle: SSH user CA key")?;
            let public = ca
                .public_key()
                .to_openssh()
                .context("encoding SSH public key")?;
            write_atomic(
                &paths.ssh_user_ca_key.with_extension("pub"),
                format!("{public}\n").as_bytes(),
                0o644,
            )?;
        }
        let key = russh::keys::ssh_key::PrivateKey::from_openssh(&self.ssh_host_key)
            .context("identity bundle: SSH host key")?;
        let public = key
            .public_key()
            .to_openssh()
            .context("encoding SSH public key")?;
        write_atomic(
            &paths.ssh_host_key.with_extension("pub"),
            format!("{public}\n").as_bytes(),
            0o644,
        )
    }
}

impl AgentCa {
    /// Loads the CA (refusing a CA key readable by others) and reissues the server
    /// certificate if it is missing or close to expiry.
    pub fn load(paths: &PkiPaths, project: &str, zone: Option<&str>) -> Result<Self> {
        check_secret_file(&paths.ca_key)?;
        let key_pem = std::fs::read_to_string(&paths.ca_key)
            .with_context(|| format!("reading {}", paths.ca_key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing CA key {}", paths.ca_key.display()))?;
        let cert_der = read_cert_pem(&paths.ca_cert)?;
        let cert_pem = std::fs::read_to_string(&paths.ca_cert)
            .with_context(|| format!("reading {}", paths.ca_cert.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .with_context(|| format!("parsing CA certificate {}", paths.ca_cert.display()))?;
        let ca = Self {
            issuer,
            cert_der,
            cert_pem,
            project: project.to_string(),
            zone: zone.map(|z| z.trim_end_matches('.').to_string()),
        };
        ca.renew_server_cert_if_needed(paths)?;
        Ok(ca)
    }

    fn renew_server_cert_if_needed(&self, paths: &PkiPaths) -> Result<()> {
        let needs = match read_cert_pem(&paths.server_cert) {
            Ok(der) => {
                let (_, cert) =
                    X509Certificate::from_der(&der).context("parsing server certificate")?;
                let left = cert.validity().not_after.timestamp() - crate::unix_now();
                left < SERVER_CERT_RENEW_DAYS * 86400
            }
            Err(_) => true,
        };
        if needs {
            tracing::warn!(
                path = %paths.server_cert.display(),
                "server certificate missing or expiring within {SERVER_CERT_RENEW_DAYS} days: reissuing"
            );
            issue_server_cert(
                paths,
                &self.issuer,
                &self.project,
                self.zone.as_deref(),
                &[],
            )?;
        }
        Ok(())
    }

    /// The URI SAN naming an agent of this project.
    pub fn agent_uri(&self, name: &str) -> String {
        format!("spiffe://{}/agent/{}", self.project, name)
    }

    /// Signs a client certificate for `name` around the public key of `csr_der`. Only the
    /// public key is taken from the CSR; name, usages, validity and serial are ours.
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        name: &str,
        lifetime: std::time::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let spki = csr_public_key(csr_der)?;
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, self.project.clone());
        p.distinguished_name = dn;
        let uri = ia5(self.agent_uri(name)).map_err(|e| PkiError::Signing(e.to_string()))?;
        let dns = match &self.zone {
            Some(z) => format!("{name}.{z}"),
            None => name.to_string(),
        };
        let dns = ia5(dns).map_err(|e| PkiError::Signing(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - BACKDATE;
        let lifetime = TimeDuration::try_from(lifetime)
            .map_err(|e| PkiError::Signing(format!("lifetime: {e}")))?;
        p.not_after = now + lifetime;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(|e| PkiError::Signing(e.to_string()))?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: serial_hex,
            not_after: p.not_after.unix_timestamp(),
        })
    }

    /// Reads the agent identity out of a client certificate already verified against the CA.
    pub fn identity(&self, cert_der: &[u8]) -> Result<AgentIdentity, PkiError> {
        identity_from_cert(cert_der, &self.project)
    }
}

/// Reads name, serial and expiry of an agent certificate of `project`.
pub fn identity_from_cert(cert_der: &[u8], project: &str) -> Result<AgentIdentity, PkiError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|_| PkiError::MalformedCert)?;
    let prefix = format!("spiffe://{project}/agent/");
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PkiError::MalformedCert)?
        .ok_or_else(|| PkiError::NoIdentity(project.to_string()))?;
    let name = san
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            GeneralName::URI(u) => u.strip_prefix(prefix.as_str()).map(str::to_string),
            _ => None,
        })
        .filter(|n| valid_agent_name(n))
        .ok_or_else(|| PkiError::NoIdentity(project.to_string()))?;
    Ok(AgentIdentity {
        name,
        serial: hex::encode(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Verifies a PKCS#10 CSR's self-signature and returns its public key.
pub fn csr_public_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfo, PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let (rest, csr) =
        X509CertificationRequest::from_der(csr_der).map_err(|_| PkiError::MalformedCsr)?;
    if !rest.is_empty() {
        return Err(PkiError::MalformedCsr);
    }
    csr.verify_signature()
        .map_err(|_| PkiError::BadCsrSignature)?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::UnsupportedKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_agent_name("web01"));
        assert!(valid_agent_name("a-b"));
        assert!(!valid_agent_name("Web01"));
        assert!(!valid_agent_name("-a"));
        assert!(!valid_agent_name("a.b"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name(&"a".repeat(64)));
        assert!(valid_zone("example.org."));
        assert!(!valid_zone("bad..zone"));
    }

    #[test]
    fn signs_only_our_fields() {
        let dir = tempdir();
        let paths = PkiPaths::new(&dir);
        init(&paths, "proj", Some("proj.example.org."), &[]).unwrap();
        let ca = AgentCa::load(&paths, "proj", Some("proj.example.org.")).unwrap();
        // A CSR that asks for a CA certificate, server usage and another name.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = p.serialize_request(&key).unwrap();
        let issued = ca
            .sign_agent(csr.der(), "web01", std::time::Duration::from_secs(3600))
            .unwrap();
        let der = {
            use rustls_pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap()
        };
        let id = ca.identity(&der).unwrap();
        assert_eq!(id.name, "web01");
        assert_eq!(id.serial, issued.serial);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert!(sans.iter().all(|s| !s.contains("evil")), "{sans:?}");
        assert!(
            init(&paths, "proj", None, &[]).is_err(),
            "CA overwrite refused"
        );
        let pin = spki_pin(&ca.cert_der).unwrap();
        assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64);
    }

    #[test]
    fn rejects_forged_csr() {
        assert!(matches!(
            csr_public_key(b"garbage"),
            Err(PkiError::MalformedCsr)
        ));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bastide-pki-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
