//! The name rule of admins and groups, shared by `[[ssh.admins]]` and single sign-on.

/// A valid login / group name: what OpenSSH accepts as a user name, conservatively.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
