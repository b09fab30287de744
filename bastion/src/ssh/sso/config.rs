//! The `[ssh.sso]` table: the provider, the client, the claims and the certificates' lifetime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::ssh::names::valid_name;

/// Longest certificate lifetime `cert_lifetime` may ask for.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest clock skew `clock_skew` may allow.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// `[ssh.sso]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsoConfig {
    /// Addresses of the HTTPS login endpoint (served with the bastion's server certificate,
    /// which chains to the agent CA `bastide-login` pins).
    #[serde(deserialize_with = "bastide_common::tomlcfg::one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// The provider's issuer URL (https; http only on loopback).
    pub issuer: String,
    /// The client registered at the provider for `bastide-login` (a public client with the
    /// device grant).
    pub client_id: String,
    /// For a confidential client: the file holding its secret (mode 0600). It is handed to
    /// every `bastide-login` that asks, so it protects nothing from admins: prefer a public
    /// client.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes `bastide-login` asks for.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The claim that names the admin (`preferred_username`, or `email` with
    /// `email_domain`: the admin name is then the part before the `@`).
    #[serde(default = "default_admin_claim")]
    pub admin_claim: String,
    /// With `admin_claim = "email"`: the only domain accepted (required then).
    #[serde(default)]
    pub email_domain: Option<String>,
    /// The claim that lists the admin's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Groups taken from the token (others are ignored); empty: all of them.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// Certificate lifetime (at most 24 h), counted from the login at the provider
    /// (`auth_time`) when the token says when that was.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// Clock skew tolerated on the token's times (at most 5 min).
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups"]
        .map(String::from)
        .to_vec()
}
fn default_admin_claim() -> String {
    "preferred_username".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(8 * 3600)
}
fn default_clock_skew() -> Duration {
    Duration::from_secs(60)
}

impl SsoConfig {
    /// Every problem, each as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |k: &str, r: String| out.push((format!("ssh.sso.{k}"), r));
        if !url_allowed(&self.issuer) {
            bad(
                "issuer",
                format!(
                    "{:?} must be an https URL (http only on loopback)",
                    self.issuer
                ),
            );
        }
        if self.client_id.trim().is_empty() {
            bad("client_id", "must not be empty".into());
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            bad("scopes", "must include \"openid\"".into());
        }
        if self.admin_claim == "email" && self.email_domain.is_none() {
            bad(
                "email_domain",
                "required with admin_claim = \"email\" (alice@a.org and alice@b.org would be one admin)".into(),
            );
        }
        for g in &self.allowed_groups {
            if !valid_name(g) {
                bad("allowed_groups", format!("{g:?} is not a valid group name"));
            }
        }
        if self.cert_lifetime < Duration::from_secs(60) || self.cert_lifetime > MAX_CERT_LIFETIME {
            bad("cert_lifetime", "must be between 1m and 24h".into());
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            bad("clock_skew", "must be at most 5m".into());
        }
        if let Some(f) = &self.client_secret_file {
            if let Err(e) = crate::fsutil::check_secret_file(f) {
                bad("client_secret_file", format!("{e:#}"));
            }
        }
        out
    }

    pub fn client_secret(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        match &self.client_secret_file {
            Some(f) => Ok(Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_string(),
            )),
            None => Ok(None),
        }
    }
}

/// Whether `url` may be used to reach the provider: HTTPS, or HTTP on loopback (tests, a
/// provider on the same host).
pub fn url_allowed(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => u.host_str().is_some(),
        "http" => match u.host_str() {
            Some("localhost") => true,
            Some(h) => h
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        },
        _ => false,
    }
}
