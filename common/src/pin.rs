//! The bastion's CA pinned by its SPKI hash: what an agent checks before it sends its
//! enrollment token, and what `bastide-login` checks before it sends an ID token. One
//! verifier for both, so the check cannot drift between them.

use std::sync::{Arc, Mutex};

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

/// sha256:<hex> of a certificate's SubjectPublicKeyInfo.
pub fn spki_pin(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(cert.tbs_certificate.subject_pki.raw))
    ))
}

/// Normalises a pin given on the command line by `option` ("sha256:HEX", case-insensitive).
pub fn parse_pin(pin: &str, option: &str) -> Result<String> {
    let hexpart = pin
        .strip_prefix("sha256:")
        .with_context(|| format!("{option} must look like sha256:<64 hex digits>"))?;
    let bytes = hex::decode(hexpart).with_context(|| format!("{option}: not hexadecimal"))?;
    anyhow::ensure!(bytes.len() == 32, "{option}: expected 32 bytes of SHA-256");
    Ok(format!("sha256:{}", hex::encode(bytes)))
}

/// Accepts the server only if its chain holds a CA matching the pin and the server
/// certificate verifies against that CA. Remembers the CA it matched.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    pub matched_ca: Mutex<Option<CertificateDer<'static>>>,
}

impl PinVerifier {
    pub fn new(pin: String) -> Self {
        Self {
            pin,
            matched_ca: Mutex::new(None),
        }
    }
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
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut m) = self.matched_ca.lock() {
            *m = Some(ca.clone().into_owned());
        }
        Ok(ok)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_normalised_and_checked() {
        assert!(parse_pin("sha256:zz", "--pin").is_err());
        assert!(parse_pin("md5:00", "--pin").is_err());
        let p = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(parse_pin(&p, "--pin").unwrap(), p.to_lowercase());
        let e = parse_pin("sha256:00", "--ca-pin").unwrap_err().to_string();
        assert!(e.contains("--ca-pin"), "{e}");
    }
}
