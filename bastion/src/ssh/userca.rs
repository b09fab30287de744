//! The SSH user-certificate CA of single sign-on: an Ed25519 key in the PKI directory, kept
//! like the agent CA key (mode 0600, refused when readable by others). `bastide init`
//! creates it; a state directory made before it existed gets one when the daemon starts (or
//! with `bastide ssh user-ca`). Only the certificates it signs after a login
//! (`crate::ssh::sso`) are trusted through it, and each only while its serial is recorded
//! and not revoked (`crate::ssh::issued`).

use std::path::Path;

use anyhow::{Context, Result};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Certificate, LineEnding, PrivateKey};

use crate::fsutil::{check_secret_file, write_atomic};

/// Creates the user CA key at `path` (`PkiPaths::ssh_user_ca_key`, in the PKI directory,
/// mode 0700) if there is none; true when it was created.
pub fn ensure(path: &Path) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir, 0o700)?;
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment("bastide SSH user CA");
    let pem = key
        .to_openssh(LineEnding::LF)
        .context("encoding the SSH user CA key")?;
    write_atomic(path, pem.as_bytes(), 0o600)?;
    let public = key
        .public_key()
        .to_openssh()
        .context("encoding the SSH user CA public key")?;
    write_atomic(
        &path.with_extension("pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(true)
}

/// Loads the user CA key (refusing one readable by group or others).
pub fn load(path: &Path) -> Result<PrivateKey> {
    check_secret_file(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the SSH user CA key {}", path.display()))?;
    PrivateKey::from_openssh(text.trim())
        .with_context(|| format!("parsing the SSH user CA key {}", path.display()))
}

/// The CA's public key as one `authorized_keys`/`TrustedUserCAKeys` line.
pub fn public_line(key: &PrivateKey) -> Result<String> {
    key.public_key()
        .to_openssh()
        .context("encoding the SSH user CA public key")
}

/// What a certificate says; every field is chosen by the bastion.
#[derive(Debug, Clone)]
pub struct CertSpec {
    pub serial: u64,
    pub key_id: String,
    pub principal: String,
    /// More principals after the admin name: `group:<name>` for each group, so that a VM's
    /// sshd can admit a group in its `AuthorizedPrincipalsFile`.
    pub extra_principals: Vec<String>,
    pub valid_after: u64,
    pub valid_before: u64,
}

/// Signs a user certificate for `key`: the admin's principals, `permit-port-forwarding` as its only
/// extension (a jump host needs nothing else, and a VM's sshd that trusts this CA grants no
/// pty, agent or X11 forwarding on it either), no critical option.
pub fn sign(ca: &PrivateKey, key: &KeyData, spec: &CertSpec) -> Result<Certificate> {
    let nonce: [u8; 32] = rand::random();
    let mut b = Builder::new(&nonce[..], key.clone(), spec.valid_after, spec.valid_before)
        .context("certificate builder")?;
    b.serial(spec.serial).context("certificate serial")?;
    b.cert_type(CertType::User).context("certificate type")?;
    b.key_id(&spec.key_id).context("certificate key id")?;
    b.valid_principal(&spec.principal)
        .context("certificate principal")?;
    for p in &spec.extra_principals {
        b.valid_principal(p).context("certificate principal")?;
    }
    b.extension("permit-port-forwarding", "")
        .context("certificate extension")?;
    b.sign(ca).context("signing the certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_signs() {
        let dir = std::env::temp_dir().join(format!("bastide-userca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = crate::pki::PkiPaths::new(&dir);
        assert!(ensure(&paths.ssh_user_ca_key).unwrap());
        let first = std::fs::read_to_string(&paths.ssh_user_ca_key).unwrap();
        assert!(
            !ensure(&paths.ssh_user_ca_key).unwrap(),
            "an existing CA is kept"
        );
        assert_eq!(
            first,
            std::fs::read_to_string(&paths.ssh_user_ca_key).unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&paths.ssh_user_ca_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = load(&paths.ssh_user_ca_key).unwrap();
        let pubfile = std::fs::read_to_string(paths.ssh_user_ca_key.with_extension("pub")).unwrap();
        assert_eq!(pubfile.trim(), public_line(&ca).unwrap());
        let user = PrivateKey::from(Ed25519Keypair::from_seed(&[7; 32]));
        let cert = sign(
            &ca,
            user.public_key().key_data(),
            &CertSpec {
                serial: 42,
                key_id: "alice sub=123".into(),
                principal: "alice".into(),
                extra_principals: Vec::new(),
                valid_after: 100,
                valid_before: 200,
            },
        )
        .unwrap();
        assert_eq!(cert.serial(), 42);
        assert_eq!(cert.valid_principals(), ["alice".to_string()]);
        assert_eq!(cert.extensions().len(), 1);
        assert!(cert.extensions().contains_key("permit-port-forwarding"));
        assert!(cert.critical_options().is_empty());
        assert_eq!(cert.signature_key(), ca.public_key().key_data());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
