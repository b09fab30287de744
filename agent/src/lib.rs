//! Bastide agent: enrolls a VM with its bastion (one-time token, pinned CA) and keeps an
//! outgoing mutual-TLS gRPC session to it.

pub mod apply;
pub mod backoff;
pub mod beneath;
pub mod cli;
pub mod config;
pub mod endpoints;
pub mod enroll;
pub mod facts;
pub mod fsutil;
pub mod hostmetrics;
pub mod logs;
pub mod session;
pub mod state;
pub mod tls;

/// Agent version reported to the bastion.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Creates the state directory (0700) if needed.
pub(crate) fn fsutil_ensure_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
