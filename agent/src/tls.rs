//! TLS toward the bastion: rustls (TLS 1.3, ring), a verifier that checks the bastion's CA
//! against a pin before anything is sent (enrollment), and the mutual-TLS configuration
//! used afterwards.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// rustls' PKI types, re-exported for tools built on this library.
pub use rustls::pki_types as pki;

/// Installs the process-wide rustls crypto provider (ring), explicitly.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub use bastide_common::pin::{spki_pin, PinVerifier};

/// Normalises the `--ca-pin` given on the command line ("sha256:HEX", case-insensitive).
pub fn parse_pin(pin: &str) -> Result<String> {
    bastide_common::pin::parse_pin(pin, "--ca-pin")
}

fn builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")
}

/// Server-authenticated configuration for enrollment.
pub fn enroll_config(verifier: Arc<PinVerifier>) -> Result<rustls::ClientConfig> {
    let mut cfg = builder()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Mutual-TLS configuration from a stored identity.
pub fn mtls_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).context("adding the bastion CA")?;
    let mut cfg = builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("client certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The host part of HOST:PORT (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Data sent and not acknowledged by the bastion's TCP for this long closes the
/// connection (`TCP_USER_TIMEOUT`): a dead path (a bastion's VM gone, a firewall dropping
/// the connection) is noticed at the next heartbeat plus this, and the agent reconnects,
/// rather than waiting for its unanswered heartbeats.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The TCP settings of every connection to the bastion.
fn tune(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// Opens a gRPC channel to `bastion` (HOST:PORT) over TLS with `cfg`.
pub async fn connect(
    bastion: &str,
    server_name: &str,
    cfg: rustls::ClientConfig,
) -> Result<Channel> {
    connect_from(bastion, server_name, cfg, None).await
}

/// A TCP connection to `addr` (HOST:PORT) from local address `source` when given.
async fn dial(addr: &str, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(src) = source else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for dst in tokio::net::lookup_host(addr).await? {
        if dst.is_ipv4() != src.is_ipv4() {
            continue;
        }
        let sock = if src.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.bind(std::net::SocketAddr::new(src, 0))?;
        match sock.connect(dst).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{addr} has no address of the family of source_address {src}"),
        )
    }))
}

/// [`connect`] from a given local address (`source_address` of the agent's configuration).
pub async fn connect_from(
    bastion: &str,
    server_name: &str,
    cfg: rustls::ClientConfig,
    source: Option<std::net::IpAddr>,
) -> Result<Channel> {
    let name = ServerName::try_from(server_name.to_string())
        .with_context(|| format!("invalid server name {server_name:?}"))?;
    let connector = TlsConnector::from(Arc::new(cfg));
    let addr = bastion.to_string();
    // The URI only names the authority for HTTP/2; the connector does the real dialing.
    let endpoint = Endpoint::from_shared(format!("http://{}", server_name_authority(server_name)))
        .context("endpoint")?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let addr = addr.clone();
            let name = name.clone();
            async move {
                let tcp = dial(&addr, source).await?;
                tune(&tcp)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to the bastion at {bastion}"))?;
    Ok(channel)
}

fn server_name_authority(name: &str) -> String {
    if name.contains(':') {
        format!("[{name}]")
    } else {
        name.to_string()
    }
}

/// Whether an error chain says the bastion refused our certificate as revoked.
pub fn is_revoked(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)) =
            e.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if is_revoked(inner) {
                    return true;
                }
            }
        }
        if format!("{e:?}").contains("CertificateRevoked") {
            return true;
        }
        cur = e.source();
    }
    false
}

/// After a failed connection, tells whether the bastion refuses our certificate as revoked.
/// In TLS 1.3 the server's verdict on a client certificate arrives after the client thinks
/// the handshake is done, so gRPC only sees a closed connection; a bare handshake and one
/// read shows the alert itself.
pub async fn probe_revoked(bastion: &str, server_name: &str, cfg: rustls::ClientConfig) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(name) = ServerName::try_from(server_name.to_string()) else {
        return false;
    };
    let probe = async {
        let tcp = TcpStream::connect(bastion).await.ok()?;
        let mut tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .ok()?;
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await {
            Err(e) => Some(is_revoked(&e)),
            Ok(_) => Some(false),
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), probe).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead path is noticed by TCP within USER_TIMEOUT of unacknowledged data, whatever
    /// the heartbeats' acknowledgements (one in three only).
    #[tokio::test]
    async fn connections_to_the_bastion_carry_the_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let tcp = dial(&addr, None).await.unwrap();
        tune(&tcp).unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(tcp.nodelay().unwrap());
    }

    #[test]
    fn hosts_and_pins() {
        assert_eq!(host_of("127.0.0.1:4443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4443"), "::1");
        assert_eq!(host_of("bastion.example.org:4443"), "bastion.example.org");
        assert!(parse_pin("sha256:zz").is_err());
        assert!(parse_pin("md5:00").is_err());
        let p = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(parse_pin(&p).unwrap(), p.to_lowercase());
    }
}
