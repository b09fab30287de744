//! Masquerading, as a Postfix null client does for VM system mail: local senders
//! (`root@web01`, `root@localhost`, `cron`) become one configured address in the envelope
//! and in From:, and local recipients (`root`, `root@web01`) go to the admin address.
//!
//! "Local" means: no domain, a single-label domain, `localhost[.*]`, the project zone or a
//! name under it, an enrolled agent's name or host name (read from the registry), or a
//! configured `local_domains` entry.

use crate::registry::Registry;

use super::SmtpConfig;
use super::UNQUALIFIED;

pub struct Rewriter {
    sender_address: Option<String>,
    admin_address: Option<String>,
    local_domains: Vec<String>,
    zone: Option<String>,
    hostname: String,
    registry: Registry,
}

impl Rewriter {
    pub fn new(
        cfg: &SmtpConfig,
        zone: Option<String>,
        hostname: String,
        registry: Registry,
    ) -> Self {
        Self {
            sender_address: cfg.sender_address.clone(),
            admin_address: cfg.admin_address.clone(),
            local_domains: cfg
                .local_domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            zone,
            hostname,
            registry,
        }
    }

    /// Whether a domain (None: no domain) is local to the project.
    pub fn is_local_domain(&self, domain: Option<&str>) -> bool {
        let Some(d) = domain else { return true };
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        if d == UNQUALIFIED
            || d.is_empty()
            || !d.contains('.')
            || d == "localhost"
            || d.starts_with("localhost.")
        {
            return true;
        }
        if let Some(z) = &self.zone {
            if d == *z || d.ends_with(&format!(".{z}")) {
                return true;
            }
        }
        for l in &self.local_domains {
            let hit = match l.strip_prefix("*.") {
                Some(suffix) => d.ends_with(&format!(".{suffix}")),
                None => d == *l,
            };
            if hit {
                return true;
            }
        }
        let snap = self.registry.snapshot();
        let local = snap
            .active()
            .any(|a| a.name == d || a.hostname.eq_ignore_ascii_case(&d));
        local
    }

    fn local(&self, addr: &str) -> bool {
        self.is_local_domain(addr.rsplit_once('@').map(|(_, d)| d))
    }

    /// The envelope sender to relay; the null sender stays null. Without a sender address,
    /// a domain-less sender gets the bastion's host name (Postfix's `myorigin`).
    pub fn sender(&self, addr: &str) -> String {
        match &self.sender_address {
            Some(s) if !addr.is_empty() && self.local(addr) => s.clone(),
            _ => match addr.strip_suffix(&format!("@{UNQUALIFIED}")) {
                Some(local) => format!("{local}@{}", self.hostname),
                None => addr.to_string(),
            },
        }
    }

    /// A recipient to relay, or None when it has no domain and nowhere to go.
    pub fn recipient(&self, addr: &str) -> Option<String> {
        match &self.admin_address {
            Some(a) if self.local(addr) => Some(a.clone()),
            _ if !addr.contains('@') || addr.ends_with(&format!("@{UNQUALIFIED}")) => None,
            _ => Some(addr.to_string()),
        }
    }

    /// Rewrites a local address in the From: header to the sender address, keeping the
    /// display name (or, without one, the original address as display name, so the admin
    /// still sees which VM wrote). Returns None when nothing changes.
    pub fn header_from(&self, content: &[u8]) -> Option<Vec<u8>> {
        let new_addr = self.sender_address.as_ref()?;
        let (start, end) = find_header(content, b"from")?;
        let field = std::str::from_utf8(&content[start..end]).ok()?;
        let value = field.split_once(':')?.1;
        let unfolded: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        let (display, addr) = split_mailbox(unfolded.trim());
        if addr.contains(',') || !self.local(&addr) {
            return None;
        }
        let display = if display.is_empty() { addr } else { display };
        let quoted = display.replace(['\\', '"'], "");
        let mut out = Vec::with_capacity(content.len() + 32);
        out.extend_from_slice(&content[..start]);
        out.extend_from_slice(format!("From: \"{quoted}\" <{new_addr}>\r\n").as_bytes());
        out.extend_from_slice(&content[end..]);
        Some(out)
    }
}

/// (display name, address) of a mailbox: `Name <a@b>`, `a@b (Name)` or `a@b`.
fn split_mailbox(v: &str) -> (String, String) {
    if let (Some(l), Some(r)) = (v.find('<'), v.rfind('>')) {
        if l < r {
            let display = v[..l].trim().trim_matches('"').trim().to_string();
            return (display, v[l + 1..r].trim().to_string());
        }
    }
    if let (Some(l), Some(r)) = (v.find('('), v.rfind(')')) {
        if l < r {
            return (v[l + 1..r].trim().to_string(), v[..l].trim().to_string());
        }
    }
    (String::new(), v.trim().to_string())
}

/// Byte range of the first header field `name` (with its folded continuation lines and
/// CRLF) in the header section of `content`.
fn find_header(content: &[u8], name: &[u8]) -> Option<(usize, usize)> {
    let mut pos = 0;
    while pos < content.len() {
        let line_end = content[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(content.len());
        let line = &content[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return None;
        }
        let is_name = line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':';
        if is_name {
            let mut end = line_end;
            while end < content.len() && (content[end] == b' ' || content[end] == b'\t') {
                end = content[end..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|i| end + i + 1)
                    .unwrap_or(content.len());
            }
            return Some((pos, end));
        }
        pos = line_end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_forms() {
        assert_eq!(
            split_mailbox("Cron Daemon <root@web01>"),
            ("Cron Daemon".into(), "root@web01".into())
        );
        assert_eq!(
            split_mailbox("root@web01 (Cron Daemon)"),
            ("Cron Daemon".into(), "root@web01".into())
        );
        assert_eq!(split_mailbox("root"), ("".into(), "root".into()));
    }

    #[test]
    fn header_found_with_folding() {
        let m = b"Subject: a\r\nFrom: x\r\n  <root@web01>\r\nTo: y\r\n\r\nFrom: body\r\n";
        let (s, e) = find_header(m, b"from").unwrap();
        assert_eq!(&m[s..e], b"From: x\r\n  <root@web01>\r\n");
        assert!(find_header(b"A: b\r\n\r\nFrom: x\r\n", b"from").is_none());
    }
}
