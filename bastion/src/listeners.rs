//! A service's TCP listeners: one per address of its `listen` list (a single address is a
//! list of one), accepted from as one listener, so each service keeps one accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connections the kernel may hold per listener before they are accepted (it clamps this to
/// `net.core.somaxconn`, 4096 by default). A fleet reconnecting after a restart arrives by
/// thousands within a second: past tokio's default of 1024 the kernel drops their SYNs, and
/// each such agent waits for its SYN retransmission (1 s, then 3 s, 7 s...) while the bastion
/// idles (issue 18).
const BACKLOG: u32 = 65_535;

fn bind_one(a: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted bastion binds again at once.
    s.set_reuseaddr(true)?;
    s.bind(a)?;
    s.listen(BACKLOG)
}

/// Every listener of one service.
pub struct TcpListeners {
    list: Vec<TcpListener>,
    /// The listener polled first on the next accept, so that a busy one cannot starve the
    /// others.
    next: AtomicUsize,
}

impl TcpListeners {
    /// Binds every address of `addrs`; an error names the file, the key and the address.
    pub async fn bind(addrs: &[SocketAddr], key: &str, source: &Path) -> Result<Self> {
        if addrs.is_empty() {
            bail!("{}: {key}: no address to listen on", source.display());
        }
        let mut list = Vec::with_capacity(addrs.len());
        for a in addrs {
            let l = bind_one(*a).map_err(|e| {
                let hint = in_use_hint(&e, key, source);
                anyhow::Error::new(e).context(format!(
                    "{}: {key}: cannot bind {a}{hint}",
                    source.display()
                ))
            })?;
            list.push(l);
        }
        Ok(Self::from(list))
    }

    /// The addresses bound (with the ports the system chose for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.list
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The listeners as standard sockets, to be served by another runtime (see
    /// [`TcpListeners::from_std`]): a socket is served by the runtime that registered it.
    pub fn into_std(self) -> std::io::Result<Vec<std::net::TcpListener>> {
        self.list.into_iter().map(TcpListener::into_std).collect()
    }

    /// Listeners registered with the current runtime.
    pub fn from_std(list: Vec<std::net::TcpListener>) -> std::io::Result<Self> {
        let list = list
            .into_iter()
            .map(TcpListener::from_std)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self::from(list))
    }
}

/// What a service accepts connections from: its [`TcpListeners`] or one listener.
pub trait Accept {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(TcpStream, SocketAddr)>>;
}

impl Accept for TcpListener {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(TcpStream, SocketAddr)>> {
        TcpListener::poll_accept(self, cx)
    }
}

impl Accept for TcpListeners {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<(TcpStream, SocketAddr)>> {
        let n = self.list.len();
        let start = self.next.load(Ordering::Relaxed);
        for i in 0..n {
            let k = (start + i) % n;
            if let Poll::Ready(r) = self.list[k].poll_accept(cx) {
                self.next.store((k + 1) % n, Ordering::Relaxed);
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }
}

/// Pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection on `listener`, for the accept loop of `service` (its name in the
/// log). A failed accept (out of file descriptors, EMFILE or ENFILE, or a connection reset
/// before it was taken) is logged and tried again after a pause: at once, it would spin
/// while the cause lasts. Cancel-safe, for a `select!` with the shutdown token.
pub async fn accept(listener: &impl Accept, service: &str) -> (TcpStream, SocketAddr) {
    loop {
        match std::future::poll_fn(|cx| listener.poll_accept(cx)).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "{service}: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

impl From<Vec<TcpListener>> for TcpListeners {
    fn from(list: Vec<TcpListener>) -> Self {
        Self {
            list,
            next: AtomicUsize::new(0),
        }
    }
}

impl From<TcpListener> for TcpListeners {
    fn from(l: TcpListener) -> Self {
        Self::from(vec![l])
    }
}

/// What to do when an address is taken: another process (often another bastion on the same
/// host) holds it.
pub fn in_use_hint(e: &std::io::Error, key: &str, source: &Path) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            " (another process listens there, another bastion?: `ss -ltnp` names it; give this one another address in {key} of {})",
            source.display()
        )
    } else {
        String::new()
    }
}

/// [`in_use_hint`] for an error that carries an I/O error somewhere in its chain (the DNS and
/// syslog services bind their own sockets).
pub fn in_use_hint_of(e: &anyhow::Error, key: &str, source: &Path) -> String {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|io| in_use_hint(io, key, source))
        .unwrap_or_default()
}

/// The one address of a `listen` list to tell others (the SSH config snippet, cloud-init,
/// template variables): the first that is not a wildcard (0.0.0.0, ::), else the first.
pub fn advertised(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| !a.ip().is_unspecified())
        .or(addrs.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_on_every_address() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:0".parse().unwrap(),
            "127.0.1.1:0".parse().unwrap(),
        ];
        let ls = TcpListeners::bind(&addrs, "x.listen", Path::new("f.toml"))
            .await
            .unwrap();
        let bound = ls.local_addrs();
        assert_eq!(bound.len(), 2);
        for round in 0..2 {
            for a in &bound {
                let _c = TcpStream::connect(a).await.unwrap();
                let (s, _) = accept(&ls, "test").await;
                assert_eq!(s.local_addr().unwrap(), *a, "round {round}");
            }
        }
    }

    #[tokio::test]
    async fn a_bind_error_names_the_key_and_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = taken.local_addr().unwrap();
        let e = TcpListeners::bind(&[a], "smtp.listen", Path::new("f.toml"))
            .await
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "f.toml: smtp.listen: cannot bind {a} (another process listens there"
            )),
            "{e}"
        );
        assert!(e.contains("smtp.listen of f.toml"), "{e}");
    }

    #[test]
    fn an_address_in_use_deep_in_an_error_gets_the_hint() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = anyhow::Error::new(io).context("cannot bind TCP 127.0.0.1:53");
        let hint = in_use_hint_of(&e, "dns.listen", Path::new("f.toml"));
        assert!(
            hint.contains("another process listens there") && hint.contains("dns.listen of f.toml"),
            "{hint}"
        );
        let other = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(
            in_use_hint_of(&other, "dns.listen", Path::new("f.toml")),
            ""
        );
    }

    #[test]
    fn the_advertised_address_is_the_first_specific_one() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            advertised(&[p("0.0.0.0:22"), p("10.0.0.1:2222")]),
            Some(p("10.0.0.1:2222"))
        );
        assert_eq!(advertised(&[p("0.0.0.0:22")]), Some(p("0.0.0.0:22")));
        assert_eq!(advertised(&[]), None);
    }
}
