//! The OpenID Connect provider as the bastion sees it: its discovery document, its signing
//! keys (JWKS, fetched again when a token names a key id not seen yet, at most once per
//! [`JWKS_REFETCH`], so a rotation is picked up and a flood of made-up key ids is not a
//! flood of fetches), and the full check of an ID token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

pub use super::config::url_allowed;

/// Least time between two JWKS fetches caused by unknown key ids.
pub const JWKS_REFETCH: Duration = Duration::from_secs(30);
/// Largest discovery or JWKS document read.
const MAX_DOC: usize = 256 * 1024;

/// The parts of the discovery document the bastion and `bastide-login` use.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
}

/// Why a token was refused: a message for the admin and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenRefused(pub String);

fn refuse(s: impl Into<String>) -> TokenRefused {
    TokenRefused(s.into())
}

struct Keys {
    set: JwkSet,
    fetched: Option<Instant>,
}

/// One provider, shared by every login.
pub struct Provider {
    issuer: String,
    client: reqwest::Client,
    discovery: Mutex<Option<Discovery>>,
    keys: Mutex<Keys>,
}

/// The checks' parameters.
#[derive(Debug, Clone)]
pub struct Expect {
    pub issuer: String,
    pub client_id: String,
    pub skew: u64,
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    if !url_allowed(url) {
        return Err(format!("{url}: only https (or http on loopback) is used"));
    }
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if body.len() > MAX_DOC {
        return Err(format!("{url}: document larger than {MAX_DOC} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}

/// An HTTPS client that trusts the system's roots (the provider is a public service).
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for c in found.certs {
        let _ = roots.add(c);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

impl Provider {
    pub fn new(issuer: &str, client: reqwest::Client) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_string(),
            client,
            discovery: Mutex::new(None),
            keys: Mutex::new(Keys {
                set: JwkSet { keys: Vec::new() },
                fetched: None,
            }),
        }
    }

    /// The discovery document, fetched once (again after a failure).
    pub async fn discovery(&self) -> Result<Discovery, String> {
        let mut d = self.discovery.lock().await;
        if let Some(d) = &*d {
            return Ok(d.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let doc: Discovery = get_json(&self.client, &url).await?;
        if doc.issuer.trim_end_matches('/') != self.issuer {
            return Err(format!(
                "the provider's discovery names issuer {:?}, not {:?}",
                doc.issuer, self.issuer
            ));
        }
        *d = Some(doc.clone());
        Ok(doc)
    }

    /// The key of id `kid`, fetching the JWKS again when it is unknown (rate-limited).
    async fn key(&self, kid: Option<&str>) -> Result<Option<jsonwebtoken::jwk::Jwk>, String> {
        let find = |set: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
            let usable = |k: &&jsonwebtoken::jwk::Jwk| !matches!(k.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature);
            match kid {
                Some(kid) => set
                    .keys
                    .iter()
                    .filter(usable)
                    .find(|k| k.common.key_id.as_deref() == Some(kid))
                    .cloned(),
                // No kid: only unambiguous with one signing key.
                None => {
                    let mut it = set.keys.iter().filter(usable);
                    match (it.next(), it.next()) {
                        (Some(k), None) => Some(k.clone()),
                        _ => None,
                    }
                }
            }
        };
        let mut keys = self.keys.lock().await;
        if let Some(k) = find(&keys.set) {
            return Ok(Some(k));
        }
        if keys.fetched.is_some_and(|t| t.elapsed() < JWKS_REFETCH) {
            return Ok(None);
        }
        let d = self.discovery().await?;
        keys.fetched = Some(Instant::now());
        keys.set = get_json(&self.client, &d.jwks_uri).await?;
        Ok(find(&keys.set))
    }

    /// Checks an ID token fully and returns its claims.
    pub async fn verify(
        &self,
        token: &str,
        expect: &Expect,
        now: u64,
    ) -> Result<BTreeMap<String, serde_json::Value>, TokenRefused> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| refuse(format!("not a signed JWT: {e}")))?;
        let alg = header.alg;
        if !ALGORITHMS.contains(&alg) {
            return Err(refuse(format!(
                "signature algorithm {alg:?} is not accepted (asymmetric algorithms only)"
            )));
        }
        let jwk = self
            .key(header.kid.as_deref())
            .await
            .map_err(|e| refuse(format!("the provider's keys cannot be fetched: {e}")))?
            .ok_or_else(|| {
                refuse(format!(
                    "the token is signed by key {:?}, which is not in the provider's JWKS",
                    header.kid.as_deref().unwrap_or("(none)")
                ))
            })?;
        if let Some(ka) = jwk.common.key_algorithm {
            if format!("{ka:?}") != format!("{alg:?}") {
                return Err(refuse(format!(
                    "the token's algorithm {alg:?} is not its key's ({ka:?})"
                )));
            }
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| refuse(format!("the provider's key is unusable: {e}")))?;
        let mut v = Validation::new(alg);
        // Times are checked below against `now` with our own messages.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.required_spec_claims = Default::default();
        v.set_issuer(&[&expect.issuer, &format!("{}/", expect.issuer)]);
        v.set_audience(&[&expect.client_id]);
        let data = jsonwebtoken::decode::<BTreeMap<String, serde_json::Value>>(token, &key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                refuse(match e.kind() {
                    K::InvalidSignature => "the token's signature does not verify".to_string(),
                    K::InvalidIssuer => format!("wrong issuer (expected {})", expect.issuer),
                    K::InvalidAudience => {
                        format!("wrong audience (expected {})", expect.client_id)
                    }
                    K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
                    _ => format!("the token is invalid: {e}"),
                })
            })?;
        let c = data.claims;
        for required in ["iss", "aud", "sub", "exp", "iat"] {
            if !c.contains_key(required) {
                return Err(refuse(format!("the token has no {required} claim")));
            }
        }
        // Several audiences: the token must have been issued to us (OpenID Connect Core 3.1.3.7).
        if let Some(serde_json::Value::Array(a)) = c.get("aud") {
            if a.len() > 1
                && c.get("azp").and_then(|v| v.as_str()) != Some(expect.client_id.as_str())
            {
                return Err(refuse("wrong audience: azp is not this client"));
            }
        }
        let num = |k: &str| c.get(k).and_then(|v| v.as_u64());
        let exp = num("exp").ok_or_else(|| refuse("exp is not a number"))?;
        let iat = num("iat").ok_or_else(|| refuse("iat is not a number"))?;
        if now >= exp + expect.skew {
            return Err(refuse(format!(
                "the token expired {}s ago: log in again",
                now - exp
            )));
        }
        if iat > now + expect.skew {
            return Err(refuse(format!(
                "the token is issued {}s in the future (clock skew?)",
                iat - now
            )));
        }
        if let Some(nbf) = num("nbf") {
            if nbf > now + expect.skew {
                return Err(refuse("the token is not yet valid (nbf)"));
            }
        }
        Ok(c)
    }
}

/// Accepted signature algorithms: asymmetric only (an HMAC "signed" with a public key is
/// the classic JWT confusion attack).
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
