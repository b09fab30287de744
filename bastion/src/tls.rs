//! TLS for the agents' endpoint: rustls (TLS 1.3 only, ring provider), a client verifier that
//! consults the registry at every handshake, and a connection type that the registry can cut
//! (revocation) and that closes itself when its client certificate expires.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;

use crate::pki::{identity_from_cert, AgentIdentity, PkiPaths};
use crate::registry::{Registry, SerialRefusal};

/// Installs the process-wide rustls crypto provider (ring) once, explicitly, so that no
/// feature unification can leave the choice to chance.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct RegistryVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    registry: Registry,
}

impl ClientCertVerifier for RegistryVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    // Enrollment happens before an agent has a certificate; every other call checks that
    // the connection carries an identity.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::warn!(error = %e, "client certificate refused"))?;
        let id = identity_from_cert(end_entity, &self.registry.ca().project).map_err(|e| {
            tracing::warn!(error = %e, "client certificate refused");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        self.registry.check_serial(&id.serial).map_err(|r| {
            tracing::warn!(agent = %id.name, serial = %id.serial, reason = %r, "client certificate refused");
            rustls::Error::InvalidCertificate(match r {
                SerialRefusal::Revoked => CertificateError::Revoked,
                SerialRefusal::Unknown => CertificateError::ApplicationVerificationFailure,
            })
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls server configuration of the agents' endpoint.
pub fn server_config(paths: &PkiPaths, registry: &Registry) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let ca = registry.ca().cert_der.clone();
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .context("adding agent CA to trust store")?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("building client verifier")?;
    let verifier = Arc::new(RegistryVerifier {
        inner: webpki,
        registry: registry.clone(),
    });
    let server_cert = crate::pki::read_cert_pem(&paths.server_cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .with_context(|| format!("reading {}", paths.server_key.display()))?;
    // The CA goes in the chain so that an enrolling agent can match it against its pin.
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert, ca], key)
        .context("server certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A plain server configuration (no client certificates) with the bastion's server
/// certificate, for HTTPS endpoints such as metrics.
pub fn https_config(paths: &PkiPaths) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let cert = crate::pki::read_cert_pem(&paths.server_cert)?;
    let ca = crate::pki::read_cert_pem(&paths.ca_cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.server_key)
        .with_context(|| format!("reading {}", paths.server_key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![cert, ca], key)
        .context("server certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// What a gRPC handler knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The agent identity from the verified client certificate, if one was presented.
    pub identity: Option<AgentIdentity>,
}

/// Closes the registry's record of a connection when it ends.
struct ConnGuard {
    registry: Registry,
    agent: String,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::names::AGENT_CONNECTIONS).decrement(1.0);
        self.registry.connection_closed(&self.agent, self.id);
    }
}

/// A TLS connection from an agent that ends itself when cut.
pub struct AgentConn {
    io: TlsStream<TcpStream>,
    info: ConnInfo,
    cut: Option<Pin<Box<dyn Future<Output = &'static str> + Send>>>,
    _guard: Option<ConnGuard>,
    _permit: OwnedSemaphorePermit,
}

impl AgentConn {
    /// Wraps a completed handshake, registering the connection with the registry when the
    /// client presented a certificate.
    pub fn new(
        io: TlsStream<TcpStream>,
        peer: SocketAddr,
        registry: &Registry,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let identity = io
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| registry.ca().identity(c).ok());
        let (cut, guard) = match &identity {
            Some(id) => {
                let (conn_id, token) = registry.connection_opened(&id.name);
                metrics::gauge!(crate::metrics::names::AGENT_CONNECTIONS).increment(1.0);
                let left = (id.not_after - crate::unix_now()).max(0) as u64;
                let expiry = tokio::time::Instant::now() + std::time::Duration::from_secs(left);
                let fut: Pin<Box<dyn Future<Output = &'static str> + Send>> =
                    Box::pin(async move {
                        tokio::select! {
                            _ = token.cancelled_owned() => "certificate revoked",
                            _ = tokio::time::sleep_until(expiry) => "certificate expired",
                        }
                    });
                (
                    Some(fut),
                    Some(ConnGuard {
                        registry: registry.clone(),
                        agent: id.name.clone(),
                        id: conn_id,
                    }),
                )
            }
            None => (None, None),
        };
        Self {
            io,
            info: ConnInfo { peer, identity },
            cut,
            _guard: guard,
            _permit: permit,
        }
    }

    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(cut) = self.cut.as_mut() {
            if let Poll::Ready(reason) = cut.as_mut().poll(cx) {
                if let Some(id) = &self.info.identity {
                    tracing::info!(agent = %id.name, reason, "cutting agent connection");
                }
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason));
            }
        }
        Ok(())
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}
