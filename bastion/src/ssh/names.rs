//! The name rule of admins and groups, shared by `[[ssh.admins]]` and single sign-on.

/// A valid login / group name: what OpenSSH accepts as a user name, conservatively.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Prefix of the certificate principals that carry an admin's groups (`group:ops`): a VM's
/// sshd that trusts the user CA admits a group by listing it in its
/// `AuthorizedPrincipalsFile`. `:` is outside [`valid_name`], so no login name can be one.
pub const GROUP_PRINCIPAL: &str = "group:";
