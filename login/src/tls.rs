//! TLS of `bastide-login`: the bastion is trusted through its CA only (pinned like the
//! agents pin it, or given as a file), never through the system's roots; the provider is a
//! public service and is checked against the system's roots. The pin check is the agent's
//! (`bastide_common::pin`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bastide_common::pin::{parse_pin, PinVerifier};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(parse_pin(pin, "--pin")?)))
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
