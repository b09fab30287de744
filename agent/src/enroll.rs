//! `bastide-agent enroll`: a fresh key made here (it never leaves the VM), the bastion's CA
//! checked against the pin during the handshake (before the token is sent), then a CSR and
//! the token exchanged for a certificate.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bastide_proto::v1::enrollment_client::EnrollmentClient;
use bastide_proto::v1::EnrollRequest;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::state::{Meta, Paths, State};
use crate::tls::{connect, enroll_config, host_of, parse_pin, PinVerifier};

#[derive(Debug, Clone)]
pub struct EnrollArgs {
    pub bastion: String,
    /// Other bastions of the project: tried in turn if `bastion` cannot be reached, and
    /// kept for the session's failover.
    pub others: Vec<String>,
    pub token: String,
    pub ca_pin: String,
    pub name: Option<String>,
    pub server_name: Option<String>,
    pub state_dir: PathBuf,
    pub force: bool,
}

/// A key pair and a CSR for it (the bastion only uses the CSR's public key).
pub fn new_key_and_csr(name: &str) -> Result<(KeyPair, Vec<u8>)> {
    let key = KeyPair::generate().context("generating the agent key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).context("building the CSR")?;
    Ok((key, csr.der().to_vec()))
}

/// Outcome of `enroll`, for the caller to report.
pub enum Enrolled {
    Done { name: String, not_after: i64 },
    AlreadyEnrolled { name: String, not_after: i64 },
}

/// Enrolls on the first of the bastions that can be reached (a refusal is final: the token
/// is not tried elsewhere); the others are kept for failover.
pub async fn enroll(args: &EnrollArgs) -> Result<Enrolled> {
    let all = crate::endpoints::Endpoints::new(&args.bastion, &args.others, &[]);
    let mut last = None;
    let mut e = all.clone();
    for _ in 0..all.len() {
        let one = EnrollArgs {
            bastion: e.current().to_string(),
            others: Vec::new(),
            ..args.clone()
        };
        let list: Vec<String> = {
            let mut x = e.clone();
            (1..all.len())
                .map(|_| {
                    x.advance();
                    x.current().to_string()
                })
                .collect()
        };
        match enroll_on(&one, list).await {
            Err(err) if format!("{err:#}").contains("connecting to the bastion at") => {
                last = Some(err);
                e.advance();
            }
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no bastion to enroll with")))
}

async fn enroll_on(args: &EnrollArgs, others: Vec<String>) -> Result<Enrolled> {
    let paths = Paths::new(&args.state_dir);
    if paths.enrolled() && !args.force {
        let st = State::load(&args.state_dir)?;
        return Ok(Enrolled::AlreadyEnrolled {
            name: st.meta.name,
            not_after: st.not_after,
        });
    }
    let pin = parse_pin(&args.ca_pin)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => crate::facts::default_name(),
    };
    if name.is_empty() {
        bail!("no --name given and the host name is empty");
    }
    let server_name = args
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&args.bastion));
    let (key, csr) = new_key_and_csr(&name)?;
    let verifier = Arc::new(PinVerifier::new(pin.clone()));
    let cfg = enroll_config(verifier.clone())?;
    let channel = connect(&args.bastion, &server_name, cfg).await.map_err(|e| {
        // The pin check fails inside the handshake: say so plainly.
        if format!("{e:?}").contains("does not match the pinned CA") {
            anyhow::anyhow!(
                "the bastion at {} presented a CA that does not match {pin}: refusing to send the token",
                args.bastion
            )
        } else {
            e
        }
    })?;
    let matched = verifier
        .matched_ca
        .lock()
        .ok()
        .and_then(|m| m.clone())
        .context("no CA matched the pin")?;
    let resp = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: args.token.trim().to_string(),
            name: name.clone(),
            csr_der: csr,
            agent_version: crate::VERSION.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("enrollment refused by the bastion: {}", s.message()))?
        .into_inner();
    let ca = CertificateDer::from_pem_slice(resp.ca_pem.as_bytes())
        .context("bastion sent an unreadable CA")?;
    if ca.as_ref() != matched.as_ref() {
        bail!("the bastion's CA in the answer differs from the pinned one: not saving");
    }
    let meta = Meta {
        name: resp.name.clone(),
        bastion: args.bastion.clone(),
        bastions: others,
        server_name,
        project: resp.project,
        zone: resp.zone,
        cert_received: crate::unix_now(),
    };
    State::save_new(
        &args.state_dir,
        &meta,
        &key.serialize_pem(),
        &resp.certificate_pem,
        &resp.ca_pem,
    )?;
    Ok(Enrolled::Done {
        name: resp.name,
        not_after: resp.not_after_unix,
    })
}
