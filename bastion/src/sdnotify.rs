//! The systemd notification protocol (`Type=notify`): READY once every listener is bound,
//! RELOADING/READY around a reload, STOPPING on shutdown, and watchdog pings. Outside systemd
//! (no `NOTIFY_SOCKET`) every call is a no-op, so `bastide serve` behaves the same by hand.
//!
//! A failed notification is logged and never fatal: the daemon serves whether or not the
//! service manager hears about it.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(what: &str, states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(notify = what, "sent to the service manager"),
        Err(e) => warn!(notify = what, error = %e, "notifying the service manager failed"),
    }
}

/// Every listener is bound and every service started.
pub fn ready(status: &str) {
    send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A configuration reload starts; [`ready`] ends it. systemd wants the monotonic time with
/// RELOADING=1 to match it to the `systemctl reload` that asked for it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send("RELOADING", &states);
}

/// Shutdown has begun.
pub fn stopping() {
    send(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status("shutting down")],
    );
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC` (as sd_watchdog_enabled(3)
/// advises), or None when systemd set no watchdog for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// One watchdog ping: the main loop is alive.
pub fn watchdog() {
    send("WATCHDOG", &[NotifyState::Watchdog]);
}
