//! TLS of `bastide-login`: the bastion is trusted through its CA only (pinned like the
//! agents pin it, or given as a file), never through the system's roots; the provider is a
//! public service and is checked against the system's roots. The pin check is the agent's
//! (agent/src/tls.rs), repeated here so this binary does not pull in the agent.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn spki_pin(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

fn parse_pin(pin: &str) -> Result<String> {
    let hexpart = pin
        .strip_prefix("sha256:")
        .context("--pin must look like sha256:<64 hex digits>")?;
    let bytes = hex::decode(hexpart).context("--pin: not hexadecimal")?;
    anyhow::ensure!(bytes.len() == 32, "--pin: expected 32 bytes of SHA-256");
    Ok(format!("sha256:{}", hex::encode(bytes)))
}

/// Accepts the bastion only if its chain holds a CA matching the pin and its certificate
/// verifies against that CA.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| spki_pin(c).as_deref() == Some(self.pin.as_str()))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the bastion's CA does not match the pinned CA {}",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The client for the bastion: its CA from `pin` or `ca_file`.
pub fn bastion_client(pin: Option<&str>, ca_file: Option<&Path>) -> Result<reqwest::Client> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let tls = match (pin, ca_file) {
        (Some(pin), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: parse_pin(pin)?,
            }))
            .with_no_client_auth(),
        (None, Some(f)) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(f)
                .with_context(|| format!("reading {}", f.display()))?
            {
                roots
                    .add(c.with_context(|| format!("reading {}", f.display()))?)
                    .with_context(|| format!("{}: unusable CA", f.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => anyhow::bail!(
            "give the bastion's CA: --pin sha256:... (bastide token create prints it) or --ca-file"
        ),
    };
    client(tls)
}

/// The client for the identity provider: the system's roots.
pub fn provider_client() -> Result<reqwest::Client> {
    let mut roots = RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client(tls)
}
