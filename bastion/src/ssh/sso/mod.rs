//! Single sign-on for admins (`[ssh.sso]`): an admin who logged in with the institution's
//! OpenID Connect provider (`bastide-login`, Device Authorization Grant) posts the ID token
//! and an SSH public key to the bastion's HTTPS login endpoint ([`http`]); the bastion
//! checks the token fully ([`oidc`]), decides the name, groups and lifetime itself, signs a
//! short-lived OpenSSH user certificate with its user CA (`crate::ssh::userca`) and records
//! it by serial (`crate::ssh::issued`), so that `[[ssh.rules]]` by group apply to it and
//! `bastide ssh certs revoke` refuses it at once. Every issue and every refusal is a line
//! of the SSH audit log.

pub mod config;
pub mod http;
pub mod oidc;

pub use self::config::SsoConfig;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use russh::keys::ssh_key::{PrivateKey, PublicKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::{fingerprint, key_data_problem, valid_name, Admin, Policy};
use super::issued::IssuedCerts;
use super::userca::{self, CertSpec};
use crate::store::SshCertRow;

pub use crate::ssh::names::GROUP_PRINCIPAL;

/// The login request `bastide-login` posts.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub id_token: String,
    /// One `authorized_keys`-style line.
    pub public_key: String,
}

/// What a login gets.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Issued {
    pub admin: String,
    /// The ID token's `sub`.
    pub sub: String,
    pub serial: i64,
    pub groups: Vec<String>,
    pub valid_after: i64,
    pub valid_before: i64,
    /// The certificate, one `*-cert.pub` line.
    pub certificate: String,
}

/// A refused login: the message the admin sees, also in the audit line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub reason: String,
    /// What was known of who asked when it was refused.
    pub admin: Option<String>,
    pub sub: Option<String>,
}

fn refused(reason: impl Into<String>) -> Refused {
    Refused {
        reason: reason.into(),
        admin: None,
        sub: None,
    }
}

/// Decides and signs certificates.
pub struct Issuer {
    pub cfg: SsoConfig,
    pub provider: oidc::Provider,
    ca: Arc<PrivateKey>,
    certs: IssuedCerts,
    /// Hashes of the ID tokens already used, with their expiry: a token gets one
    /// certificate.
    used: Mutex<HashMap<[u8; 32], u64>>,
}

/// Most remembered used tokens (each is kept until it expires).
const MAX_USED: usize = 100_000;

impl Issuer {
    pub fn new(cfg: SsoConfig, ca: Arc<PrivateKey>, certs: IssuedCerts) -> anyhow::Result<Self> {
        let provider = oidc::Provider::new(&cfg.issuer, oidc::http_client()?);
        Ok(Self {
            cfg,
            provider,
            ca,
            certs,
            used: Mutex::new(HashMap::new()),
        })
    }

    fn expect(&self) -> oidc::Expect {
        oidc::Expect {
            issuer: self.cfg.issuer.trim_end_matches('/').to_string(),
            client_id: self.cfg.client_id.clone(),
            skew: self.cfg.clock_skew.as_secs(),
        }
    }

    /// The admin name a token's claims give, by the name rules.
    fn admin_name(&self, claims: &Claims) -> Result<String, Refused> {
        let claim = &self.cfg.admin_claim;
        let value = claims
            .get(claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| refused(format!("the token has no {claim} claim (admin_claim)")))?;
        let name = if claim == "email" {
            if claims.get("email_verified").and_then(|v| v.as_bool()) != Some(true) {
                return Err(refused(format!(
                    "the email {value} is not verified by the provider (email_verified)"
                )));
            }
            let domain = self.cfg.email_domain.as_deref().unwrap_or_default();
            match value.rsplit_once('@') {
                Some((local, d)) if d.eq_ignore_ascii_case(domain) => local.to_string(),
                _ => {
                    return Err(refused(format!(
                        "the email {value} is not in domain {domain} (email_domain)"
                    )))
                }
            }
        } else {
            value.to_string()
        };
        if !valid_name(&name) {
            return Err(refused(format!(
                "{name:?} is not a valid admin name (letters, digits, '-', '_', '.', at most 64)"
            )));
        }
        Ok(name)
    }

    fn groups(&self, claims: &Claims) -> BTreeSet<String> {
        let list: Vec<String> = match claims.get(&self.cfg.groups_claim) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        list.into_iter()
            .map(|g| g.trim_start_matches('/').to_string())
            .filter(|g| valid_name(g))
            .filter(|g| self.cfg.allowed_groups.is_empty() || self.cfg.allowed_groups.contains(g))
            .collect()
    }

    fn first_use(&self, token: &str, exp: u64, now: u64) -> bool {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.len() >= MAX_USED {
            used.retain(|_, e| *e + self.cfg.clock_skew.as_secs() > now);
        }
        used.insert(h, exp).is_none()
    }

    /// Checks a login and issues its certificate (recorded before it is returned).
    pub async fn login(
        &self,
        req: &LoginRequest,
        policy: &Policy,
        source: IpAddr,
        now: u64,
    ) -> Result<Issued, Refused> {
        let key = PublicKey::from_openssh(req.public_key.trim())
            .map_err(|e| refused(format!("not an OpenSSH public key: {e}")))?;
        if let Some(p) = key_data_problem(key.key_data()) {
            return Err(refused(format!("key refused: {p}")));
        }
        let claims = self
            .provider
            .verify(&req.id_token, &self.expect(), now)
            .await
            .map_err(|e| refused(e.0))?;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let with_who = |admin: Option<&str>, r: Refused| Refused {
            admin: admin.map(str::to_string),
            sub: Some(sub.clone()),
            ..r
        };
        let admin = self.admin_name(&claims).map_err(|r| with_who(None, r))?;
        let groups = self.groups(&claims);
        let who = Admin {
            name: admin.clone(),
            keys: Vec::new(),
            cas: Vec::new(),
            groups: groups.clone(),
        };
        if !super::rules::any_rule_for(policy, &who) {
            return Err(with_who(
                Some(&admin),
                refused(format!(
                    "no [[ssh.rules]] names admin {admin} or any of its groups ({}): no certificate issued",
                    groups.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
            ));
        }
        let fp = fingerprint(key.key_data());
        for (name, a) in &policy.admins {
            if name != &admin && a.keys.iter().any(|k| &k.key == key.key_data()) {
                return Err(with_who(
                    Some(&admin),
                    refused(format!("key {fp} is already used by another admin")),
                ));
            }
        }
        let rows = self
            .certs
            .list()
            .await
            .map_err(|e| with_who(Some(&admin), refused(format!("store: {e:#}"))))?;
        if rows
            .iter()
            .any(|r| r.key_fingerprint == fp && r.admin != admin)
        {
            return Err(with_who(
                Some(&admin),
                refused(format!("key {fp} is already used by another admin")),
            ));
        }
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(now);
        if !self.first_use(&req.id_token, exp, now) {
            return Err(with_who(
                Some(&admin),
                refused("this ID token was used already: log in again"),
            ));
        }
        let lifetime = self.cfg.cert_lifetime.as_secs();
        let skew = self.cfg.clock_skew.as_secs();
        let mut valid_before = now + lifetime;
        if let Some(at) = claims.get("auth_time").and_then(|v| v.as_u64()) {
            valid_before = valid_before.min(at.saturating_add(lifetime));
        }
        if valid_before <= now + 60 {
            return Err(with_who(
                Some(&admin),
                refused("the session at the provider is older than cert_lifetime: log in again at the provider"),
            ));
        }
        let valid_after = now.saturating_sub(skew);
        let serial: i64 = (rand::random::<u64>() >> 1).max(1) as i64;
        let spec = CertSpec {
            serial: serial as u64,
            key_id: format!("{admin} sub={sub} sso"),
            principal: admin.clone(),
            extra_principals: groups
                .iter()
                .map(|g| format!("{GROUP_PRINCIPAL}{g}"))
                .collect(),
            valid_after,
            valid_before,
        };
        let cert = userca::sign(&self.ca, key.key_data(), &spec)
            .map_err(|e| with_who(Some(&admin), refused(format!("signing failed: {e:#}"))))?;
        let certificate = cert
            .to_openssh()
            .map_err(|e| with_who(Some(&admin), refused(format!("encoding failed: {e}"))))?;
        let row_sub = sub.clone();
        let row = SshCertRow {
            serial,
            admin: admin.clone(),
            sub: sub.clone(),
            groups: groups.iter().cloned().collect(),
            key_fingerprint: fp,
            valid_after: valid_after as i64,
            valid_before: valid_before as i64,
            issued_at: now as i64,
            source: source.to_string(),
            revoked: false,
        };
        self.certs.record(row).await.map_err(|e| {
            with_who(
                Some(&admin),
                refused(format!("the certificate cannot be recorded: {e:#}")),
            )
        })?;
        metrics::counter!(crate::metrics::names::SSH_CERTS_ISSUED).increment(1);
        Ok(Issued {
            admin,
            sub: row_sub,
            serial,
            groups: groups.into_iter().collect(),
            valid_after: valid_after as i64,
            valid_before: valid_before as i64,
            certificate,
        })
    }
}

type Claims = std::collections::BTreeMap<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    //! Tokens signed by a test key, served as a JWKS by a small HTTP server on loopback:
    //! every refusal of the token and identity checks. The real provider's flow is in
    //! tests/tests/sso.rs.
    use super::*;
    use crate::ssh::config::SshConfig;
    use jsonwebtoken::{EncodingKey, Header};
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use std::time::Duration;

    struct Signer {
        kid: String,
        key: EncodingKey,
        jwk: serde_json::Value,
    }

    fn signer(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        use base64::Engine;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        Signer {
            kid: kid.into(),
            key: EncodingKey::from_ed_der(&kp.serialize_der()),
            jwk: serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}),
        }
    }

    impl Signer {
        fn sign(&self, claims: &serde_json::Value) -> String {
            let mut h = Header::new(jsonwebtoken::Algorithm::EdDSA);
            h.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&h, claims, &self.key).unwrap()
        }
    }

    async fn provider(jwks: serde_json::Value) -> String {
        use axum::routing::get;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", l.local_addr().unwrap());
        let disco = serde_json::json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")});
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let d = disco.to_string();
                    async move { d }
                }),
            )
            .route(
                "/jwks",
                get(move || {
                    let j = jwks.to_string();
                    async move { j }
                }),
            );
        tokio::spawn(async move { axum::serve(l, app).await });
        issuer
    }

    fn policy() -> Policy {
        let cfg: SshConfig = toml::from_str(
            r#"listen = "127.0.0.1:1"
            [[admins]]
            name = "bob"
            keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D"]
            [[rules]]
            groups = ["ops"]
            cidrs = ["10.0.0.0/8"]
            "#,
        )
        .unwrap();
        Policy::build(&cfg, None).unwrap()
    }

    fn registry(dir: &std::path::Path) -> crate::registry::Registry {
        let paths = crate::pki::PkiPaths::new(dir);
        crate::pki::init(&paths, "p", None, &[]).unwrap();
        let store = crate::store::Store::create(&dir.join("registry.sqlite")).unwrap();
        let ca = crate::pki::AgentCa::load(&paths, "p", None).unwrap();
        crate::registry::Registry::open(
            store,
            ca,
            crate::registry::RegistrySettings {
                cert_lifetime: Duration::from_secs(3600),
                addresses: Default::default(),
            },
        )
        .unwrap()
    }

    /// An RSA key too small for the SSH service (ssh-keygen -t rsa -b 2048).
    const RSA_2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDWqOfSDZFd7VGVIwu3fB++mOJwrl4bdrOPJaeGhz29hbps0foaZhM3IOfqUCEFPHGU7diQZiS0TLyW7XLWdDZdeha5fazTMGlm6uQPUzzS0fucmY8C2twPfaMZEGT3fNf2Tj+IemQYm+5pv7mdXkzzcKXfhjAosBnvGg88WhkJwHORKKy6IigFyv3LWX59ffk5V2q9yuGMwaY3maqbYRx7RtPM7HuaeCZwUz2T4T6/jwUuQzzZ7aW8MEvrdsNhMM8M6EDjkvPkVwd1fRbY37LlFOqCqV0y2vPE7Oho+//TBmuBRxpQ8JYDXmd8yzZuQuxuK/cKl2mpTdzo+QHl3H5P";

    fn ssh_key(seed: u8) -> String {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
            .public_key()
            .to_openssh()
            .unwrap()
    }

    #[test]
    fn config_problems() {
        let p = |extra: &str| -> Vec<String> {
            let c: SsoConfig = toml::from_str(&format!(
                "listen = \"127.0.0.1:1\"\nclient_id = \"b\"\n{extra}"
            ))
            .unwrap();
            c.problems().into_iter().map(|(k, _)| k).collect()
        };
        assert!(p("issuer = \"https://idp.example.org/realms/x\"").is_empty());
        assert!(p("issuer = \"http://[::1]:8080\"").is_empty());
        assert_eq!(p("issuer = \"http://idp.example.org\""), ["ssh.sso.issuer"]);
        assert_eq!(
            p("issuer = \"https://i\"\nadmin_claim = \"email\""),
            ["ssh.sso.email_domain"]
        );
        assert_eq!(
            p("issuer = \"https://i\"\ncert_lifetime = \"25h\"\nclock_skew = \"10m\""),
            ["ssh.sso.cert_lifetime", "ssh.sso.clock_skew"]
        );
        assert_eq!(
            p("issuer = \"https://i\"\nscopes = [\"email\"]\nallowed_groups = [\"a b\"]"),
            ["ssh.sso.scopes", "ssh.sso.allowed_groups"]
        );
        assert!(toml::from_str::<SsoConfig>(
            "listen = \"127.0.0.1:1\"\nclient_id = \"b\"\nissuer = \"https://i\"\ntypo = 1"
        )
        .is_err());
    }

    #[tokio::test]
    async fn tokens_names_groups_and_keys_are_checked() {
        crate::tls::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("bastide-sso-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let reg = registry(&dir);
        let good = signer("k1");
        let issuer = provider(serde_json::json!({"keys": [good.jwk]})).await;
        let cfg: SsoConfig = toml::from_str(&format!(
            "listen = \"127.0.0.1:1\"\nissuer = \"{issuer}\"\nclient_id = \"bastide\"\nadmin_claim = \"email\"\nemail_domain = \"example.org\"\n"
        ))
        .unwrap();
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let ca = Arc::new(PrivateKey::from(Ed25519Keypair::from_seed(&[1; 32])));
        let certs = IssuedCerts::new(reg.clone());
        let iss = Issuer::new(cfg, ca.clone(), certs.clone()).unwrap();
        let policy = policy();
        let now = crate::unix_now() as u64;
        let claims = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = serde_json::json!({
                "iss": issuer, "aud": "bastide", "sub": "u-1", "exp": now + 300, "iat": now - 10,
                "auth_time": now - 20, "email": "alice@example.org", "email_verified": true,
                "groups": ["ops", "other"],
            });
            f(&mut c);
            c
        };
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        let login = |token: String, key: String| {
            let req = LoginRequest {
                id_token: token,
                public_key: key,
            };
            let (iss, policy) = (&iss, &policy);
            async move { iss.login(&req, policy, src, now).await }
        };

        let ok = login(good.sign(&claims(&|_| {})), ssh_key(5))
            .await
            .unwrap();
        assert_eq!(ok.admin, "alice");
        assert_eq!(ok.groups, vec!["ops", "other"]);
        assert!(ok.valid_before as u64 <= now - 20 + 8 * 3600);
        let cert = russh::keys::ssh_key::Certificate::from_openssh(&ok.certificate).unwrap();
        assert_eq!(
            cert.valid_principals(),
            ["alice", "group:ops", "group:other"].map(String::from)
        );
        assert!(cert.key_id().contains("u-1"));
        let row = certs.get(ok.serial).await.unwrap().unwrap();
        let id =
            crate::ssh::auth::check_sso_certificate("alice", &cert, Some(&row), Some(src), now)
                .unwrap();
        assert_eq!(id.sso_groups.unwrap().len(), 2);
        assert!(
            crate::ssh::auth::check_sso_certificate("bob", &cert, Some(&row), Some(src), now)
                .is_err()
        );

        // A certificate of the same CA that says more than was recorded under its serial.
        let forge = |key: u8, extra: &[&str]| {
            let k = PrivateKey::from(Ed25519Keypair::from_seed(&[key; 32]));
            userca::sign(
                &ca,
                k.public_key().key_data(),
                &CertSpec {
                    serial: ok.serial as u64,
                    key_id: "forged".into(),
                    principal: "alice".into(),
                    extra_principals: extra.iter().map(|s| s.to_string()).collect(),
                    valid_after: now - 10,
                    valid_before: now + 60,
                },
            )
            .unwrap()
        };
        let check = |c: &russh::keys::ssh_key::Certificate| {
            crate::ssh::auth::check_sso_certificate("alice", c, Some(&row), Some(src), now)
        };
        let e = check(&forge(5, &["group:ops", "group:admins"])).unwrap_err();
        assert!(e.contains("was not issued"), "{e}");
        let e = check(&forge(8, &["group:ops"])).unwrap_err();
        assert!(e.contains("certified another key"), "{e}");
        check(&forge(5, &["group:ops"])).unwrap();

        let stranger = signer("k2");
        let cases: Vec<(String, String, &str)> =
            vec![
            (good.sign(&claims(&|_| {})), ssh_key(5), "used already"),
            (
                good.sign(&claims(&|c| c["exp"] = (now - 120).into())),
                ssh_key(5),
                "expired",
            ),
            (
                good.sign(&claims(&|c| c["iat"] = (now + 600).into())),
                ssh_key(5),
                "future",
            ),
            (
                good.sign(&claims(&|c| c["aud"] = "other".into())),
                ssh_key(5),
                "wrong audience",
            ),
            (
                good.sign(&claims(&|c| c["iss"] = "https://evil.example".into())),
                ssh_key(5),
                "wrong issuer",
            ),
            (
                stranger.sign(&claims(&|_| {})),
                ssh_key(5),
                "not in the provider's JWKS",
            ),
            (
                good.sign(&claims(&|c| c["email_verified"] = false.into())),
                ssh_key(5),
                "not verified",
            ),
            (
                good.sign(&claims(&|c| c["email"] = "alice@evil.org".into())),
                ssh_key(5),
                "not in domain",
            ),
            (
                good.sign(&claims(&|c| c["email"] = "al ice@example.org".into())),
                ssh_key(5),
                "not a valid admin name",
            ),
            (
                good.sign(&claims(&|c| c["groups"] = serde_json::json!(["nobody"]))),
                ssh_key(5),
                "no [[ssh.rules]]",
            ),
            (
                good.sign(&claims(&|c| c["email"] = "carol@example.org".into())),
                ssh_key(5),
                "already used by another admin",
            ),
            (
                good.sign(&claims(&|c| c["sub"] = "u-2".into())),
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D"
                    .into(),
                "already used by another admin",
            ),
            (
                good.sign(&claims(&|c| c["auth_time"] = (now - 9 * 3600).into())),
                ssh_key(6),
                "older than cert_lifetime",
            ),
            (
                good.sign(&claims(&|_| {})),
                "ssh-dss AAAA".into(),
                "not an OpenSSH public key",
            ),
            (good.sign(&claims(&|_| {})), RSA_2048.into(), "at least 3072 required"),
            ("not.a.jwt".into(), ssh_key(5), "not a signed JWT"),
        ];
        for (token, key, why) in cases {
            let e = login(token, key).await.unwrap_err();
            assert!(e.reason.contains(why), "{} (wanted {why})", e.reason);
        }
        // Revocation: the row says so, and the SSH check refuses it.
        let r = certs.revoke(None, Some("alice".into())).await.unwrap();
        assert_eq!(r.serials, vec![ok.serial]);
        let row = certs.get(ok.serial).await.unwrap().unwrap();
        let e = crate::ssh::auth::check_sso_certificate("alice", &cert, Some(&row), Some(src), now)
            .unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let e = crate::ssh::auth::check_sso_certificate("alice", &cert, None, Some(src), now)
            .unwrap_err();
        assert!(e.contains("not issued here"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
