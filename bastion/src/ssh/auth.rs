//! Admin authentication: plain keys from the admin's `authorized_keys` lines, and OpenSSH
//! user certificates. russh has already checked the certificate's signature and validity
//! window; the CA, the certificate type, the principals and the critical options are
//! checked here, as OpenSSH's `auth2-pubkey.c` does.

use std::net::IpAddr;

use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::Certificate;

use super::config::{fingerprint, key_data_problem, Cidr, Policy};

/// Who a session authenticated as; goes to every audit line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Identity {
    pub admin: String,
    /// Fingerprint of the key (the certified key for a certificate).
    pub key_fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_ca: Option<String>,
    /// False for a certificate without `permit-port-forwarding`.
    #[serde(skip)]
    pub may_forward: bool,
    /// For a certificate issued after single sign-on: the groups recorded with its serial
    /// (what `[[ssh.rules]]` by group see instead of `[[ssh.admins]]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sso_groups: Option<std::collections::BTreeSet<String>>,
}

/// Whether some admin named `user` could accept this key, possibly as a certificate's key:
/// the pre-signature check. Certificates cannot be told apart from keys at this stage, so
/// an admin with a CA accepts any key here and decides after the signature.
pub fn offer_acceptable(policy: &Policy, user: &str, key: &KeyData) -> bool {
    match policy.admins.get(user) {
        Some(a) => !a.cas.is_empty() || a.keys.iter().any(|k| &k.key == key),
        None => false,
    }
}

/// Checks a plain key whose possession russh has verified.
pub fn check_key(policy: &Policy, user: &str, key: &KeyData) -> Result<Identity, String> {
    let admin = policy
        .admins
        .get(user)
        .ok_or_else(|| format!("no admin named {user:?}"))?;
    if !admin.keys.iter().any(|k| &k.key == key) {
        return Err(format!(
            "key {} is not one of {user}'s keys",
            fingerprint(key)
        ));
    }
    Ok(Identity {
        admin: admin.name.clone(),
        key_fingerprint: fingerprint(key),
        cert_key_id: None,
        cert_serial: None,
        cert_ca: None,
        may_forward: true,
        sso_groups: None,
    })
}

/// Checks a user certificate whose signature, validity and key possession russh has verified.
pub fn check_certificate(
    policy: &Policy,
    user: &str,
    cert: &Certificate,
    peer: Option<IpAddr>,
    now: u64,
) -> Result<Identity, String> {
    let admin = policy
        .admins
        .get(user)
        .ok_or_else(|| format!("no admin named {user:?}"))?;
    let id = cert.key_id();
    if !cert.cert_type().is_user() {
        return Err(format!("certificate {id:?} is a host certificate"));
    }
    let ca = admin
        .cas
        .iter()
        .find(|ca| &ca.key == cert.signature_key())
        .ok_or_else(|| {
            format!(
                "certificate {id:?} is signed by {}, not a CA trusted for {user}",
                fingerprint(cert.signature_key())
            )
        })?;
    // russh checked these too; checked again so this function stands on its own.
    if now < cert.valid_after() {
        return Err(format!("certificate {id:?} is not yet valid"));
    }
    if now >= cert.valid_before() {
        return Err(format!("certificate {id:?} has expired"));
    }
    if let Some(p) = key_data_problem(cert.public_key()) {
        return Err(format!("certificate {id:?}: {p}"));
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Err(format!("certificate {id:?} has no principals"));
    }
    let wanted: Vec<&str> = match &ca.principals {
        Some(list) => list.iter().map(String::as_str).collect(),
        None => vec![user],
    };
    if !principals.iter().any(|p| wanted.contains(&p.as_str())) {
        return Err(format!(
            "certificate {id:?} is for {principals:?}, not for {}",
            wanted.join(",")
        ));
    }
    check_critical_options(cert, peer)?;
    Ok(Identity {
        admin: admin.name.clone(),
        key_fingerprint: fingerprint(cert.public_key()),
        cert_key_id: Some(id.to_string()),
        cert_serial: Some(cert.serial()),
        cert_ca: Some(fingerprint(cert.signature_key())),
        may_forward: cert.extensions().contains_key("permit-port-forwarding"),
        sso_groups: None,
    })
}

/// Checks the critical options of a certificate (only `source-address` is supported).
fn check_critical_options(cert: &Certificate, peer: Option<IpAddr>) -> Result<(), String> {
    let id = cert.key_id();
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            "source-address" => {
                let Some(ip) = peer else {
                    return Err("source-address: client address unknown".into());
                };
                let mut any = false;
                for net in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match net.parse::<Cidr>() {
                        Ok(c) => any |= c.contains(ip),
                        Err(e) => {
                            return Err(format!("certificate {id:?}: bad source-address {e}"))
                        }
                    }
                }
                if !any {
                    return Err(format!(
                        "certificate {id:?}: source-address {value} excludes {ip}"
                    ));
                }
            }
            other => {
                return Err(format!(
                    "certificate {id:?}: critical option {other:?} is not supported"
                ))
            }
        }
    }
    Ok(())
}

/// Checks a certificate signed by the bastion's own user CA (single sign-on), given the
/// row recorded under its serial: the principal is the login name and the recorded admin,
/// the serial is known and not revoked, the key is the one certified at issue.
pub fn check_sso_certificate(
    user: &str,
    cert: &Certificate,
    row: Option<&crate::store::SshCertRow>,
    peer: Option<IpAddr>,
    now: u64,
) -> Result<Identity, String> {
    let id = cert.key_id();
    if !cert.cert_type().is_user() {
        return Err(format!("certificate {id:?} is a host certificate"));
    }
    if now < cert.valid_after() {
        return Err(format!("certificate {id:?} is not yet valid"));
    }
    if now >= cert.valid_before() {
        return Err(format!("certificate {id:?} has expired"));
    }
    if let Some(p) = key_data_problem(cert.public_key()) {
        return Err(format!("certificate {id:?}: {p}"));
    }
    let principals = cert.valid_principals();
    if principals.first().map(String::as_str) != Some(user) {
        return Err(format!(
            "certificate {id:?} is for {principals:?}, not for {user}"
        ));
    }
    let serial =
        i64::try_from(cert.serial()).map_err(|_| format!("certificate {id:?}: unknown serial"))?;
    let Some(row) = row.filter(|r| r.serial == serial) else {
        return Err(format!(
            "certificate {id:?}: serial {serial} was not issued here"
        ));
    };
    if row.revoked {
        return Err(format!("certificate {id:?}: serial {serial} is revoked"));
    }
    if row.admin != user {
        return Err(format!(
            "certificate {id:?}: serial {serial} was issued to {}",
            row.admin
        ));
    }
    // The others are the recorded groups, as issued.
    for p in &principals[1..] {
        let ok = p
            .strip_prefix(crate::ssh::names::GROUP_PRINCIPAL)
            .is_some_and(|g| row.groups.iter().any(|x| x == g));
        if !ok {
            return Err(format!(
                "certificate {id:?}: principal {p:?} was not issued with serial {serial}"
            ));
        }
    }
    let fp = fingerprint(cert.public_key());
    if row.key_fingerprint != fp {
        return Err(format!(
            "certificate {id:?}: serial {serial} certified another key"
        ));
    }
    check_critical_options(cert, peer)?;
    Ok(Identity {
        admin: user.to_string(),
        key_fingerprint: fp,
        cert_key_id: Some(id.to_string()),
        cert_serial: Some(cert.serial()),
        cert_ca: Some(fingerprint(cert.signature_key())),
        may_forward: cert.extensions().contains_key("permit-port-forwarding"),
        sso_groups: Some(row.groups.iter().cloned().collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::config::{AdminEntry, SshConfig};
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use russh::keys::ssh_key::PrivateKey;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    const NOW: u64 = 1_800_000_000;

    fn cert(ca: &PrivateKey, f: impl FnOnce(&mut Builder)) -> Certificate {
        cert_of(ca, CertType::User, f)
    }

    fn cert_of(ca: &PrivateKey, ty: CertType, f: impl FnOnce(&mut Builder)) -> Certificate {
        let subject = key(9);
        let mut b = Builder::new(
            [0u8; 16],
            subject.public_key().key_data().clone(),
            NOW - 60,
            NOW + 3600,
        )
        .unwrap();
        b.cert_type(ty).unwrap();
        b.key_id("kid").unwrap();
        b.extension("permit-port-forwarding", "").unwrap();
        f(&mut b);
        b.sign(ca).unwrap()
    }

    fn policy(ca: &PrivateKey) -> Policy {
        let mut cfg: SshConfig =
            toml::from_str("listen = \"127.0.0.1:1\"\naudit_log = \"/tmp/a\"\n").unwrap();
        cfg.admins.push(AdminEntry {
            name: "carol".into(),
            keys: vec![format!(
                "cert-authority {}",
                ca.public_key().to_openssh().unwrap()
            )],
            groups: vec![],
        });
        Policy::build(&cfg, None).unwrap()
    }

    #[test]
    fn certificate_checks() {
        let ca = key(1);
        let p = policy(&ca);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let check = |c: &Certificate| check_certificate(&p, "carol", c, Some(ip), NOW);

        let ok = cert(&ca, |b| {
            b.valid_principal("carol").unwrap();
            b.critical_option("source-address", "10.0.0.0/8,127.0.0.0/8")
                .unwrap();
        });
        let id = check(&ok).unwrap();
        assert_eq!(id.cert_key_id.as_deref(), Some("kid"));
        assert!(id.may_forward);

        let cases: Vec<(Certificate, &str)> = vec![
            (
                cert(&ca, |b| {
                    b.valid_principal("dave").unwrap();
                }),
                "not for carol",
            ),
            (
                cert(&ca, |b| {
                    b.all_principals_valid().unwrap();
                }),
                "no principals",
            ),
            (
                cert_of(&ca, CertType::Host, |b| {
                    b.valid_principal("carol").unwrap();
                }),
                "host certificate",
            ),
            (
                cert(&key(2), |b| {
                    b.valid_principal("carol").unwrap();
                }),
                "not a CA trusted",
            ),
            (
                cert(&ca, |b| {
                    b.valid_principal("carol").unwrap();
                    b.critical_option("source-address", "10.0.0.0/8").unwrap();
                }),
                "excludes",
            ),
            (
                cert(&ca, |b| {
                    b.valid_principal("carol").unwrap();
                    b.critical_option("force-command", "/bin/true").unwrap();
                }),
                "not supported",
            ),
        ];
        for (c, why) in cases {
            let e = check(&c).unwrap_err();
            assert!(e.contains(why), "{e} (wanted {why})");
        }
        // Validity is checked at `now`.
        let e = check_certificate(&p, "carol", &ok, Some(ip), NOW + 7200).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let e = check_certificate(&p, "carol", &ok, Some(ip), NOW - 7200).unwrap_err();
        assert!(e.contains("not yet valid"), "{e}");
        // Another login name is not carol's.
        assert!(check_certificate(&p, "dave", &ok, Some(ip), NOW).is_err());
        // No permit-port-forwarding: authenticated, but jumps are refused later.
        let nofwd = {
            let subject = key(9);
            let mut b = Builder::new(
                [0u8; 16],
                subject.public_key().key_data().clone(),
                NOW - 60,
                NOW + 3600,
            )
            .unwrap();
            b.cert_type(CertType::User).unwrap();
            b.valid_principal("carol").unwrap();
            b.sign(&ca).unwrap()
        };
        assert!(!check(&nofwd).unwrap().may_forward);
    }
}
