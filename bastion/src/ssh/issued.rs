//! The SSH user certificates issued after single sign-on: recorded by serial in the
//! registry's store (admin, `sub`, groups, key, validity), looked up at every SSH
//! authentication (so a revocation made on any node sharing the store refuses new
//! connections at once), and the connections authenticated with each, so that
//! `bastide ssh certs revoke` cuts them on this node as agent revocation cuts live streams.
//! A revocation made on another node sharing a PostgreSQL store is notified to this one
//! (`crate::cluster`, [`IssuedCerts::cut_on_events`]) and cuts its connections at once. A
//! connection also looks its serial up again every [`RECHECK`], which covers notifications
//! lost while this node was cut off from the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::store::SshCertRow;

/// Cheap to clone: every clone is the same table.
#[derive(Clone)]
pub struct IssuedCerts {
    registry: Registry,
    live: Arc<Mutex<HashMap<i64, HashMap<u64, CancellationToken>>>>,
    next: Arc<AtomicU64>,
}

/// A tracked connection; untracked when dropped.
pub struct Tracked {
    certs: IssuedCerts,
    serial: i64,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut live = self.certs.lock();
        if let Some(m) = live.get_mut(&self.serial) {
            m.remove(&self.id);
            if m.is_empty() {
                live.remove(&self.serial);
            }
        }
    }
}

/// How often an open connection's certificate is looked up again.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Cuts `cut` when the certificate `serial` is found revoked (or gone) in the store; ends
/// when `cut` is cancelled or the connection ends (`ended`). A store that cannot be read
/// cuts nothing.
pub async fn watch_revocation(
    certs: IssuedCerts,
    serial: i64,
    cut: CancellationToken,
    ended: CancellationToken,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cut.cancelled() => return,
            _ = ended.cancelled() => return,
            _ = tick.tick() => {}
        }
        match certs.get(serial).await {
            Ok(Some(r)) if !r.revoked => {}
            Ok(_) => {
                tracing::info!(
                    serial,
                    "ssh: certificate revoked (seen in the store): connection cut"
                );
                cut.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(serial, error = %format!("{e:#}"), "ssh: issued certificates cannot be read")
            }
        }
    }
}

/// What a revocation did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    pub serials: Vec<i64>,
    pub connections_cut: usize,
}

impl IssuedCerts {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            live: Arc::default(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, HashMap<u64, CancellationToken>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::store::Store) -> crate::store::Result<R> + Send + 'static,
    ) -> Result<R> {
        let reg = self.registry.clone();
        Ok(tokio::task::spawn_blocking(move || reg.with_store(f))
            .await
            .context("store task")??)
    }

    /// Records an issued certificate (on disk when this returns).
    pub async fn record(&self, row: SshCertRow) -> Result<()> {
        let now = crate::unix_now();
        self.blocking(move |s| s.insert_ssh_cert(&row, now)).await
    }

    pub async fn get(&self, serial: i64) -> Result<Option<SshCertRow>> {
        self.blocking(move |s| s.ssh_cert(serial)).await
    }

    /// Every row (expired ones included, until they are pruned).
    pub async fn list(&self) -> Result<Vec<SshCertRow>> {
        self.blocking(|s| s.ssh_certs()).await
    }

    /// Revokes by serial or by admin, then cuts the connections of the revoked serials.
    pub async fn revoke(&self, serial: Option<i64>, admin: Option<String>) -> Result<Revoked> {
        let serials = self
            .blocking(move |s| s.revoke_ssh_certs(serial, admin.as_deref()))
            .await?;
        let cut = self.cut(&serials);
        metrics::counter!(crate::metrics::names::SSH_CERTS_REVOKED).increment(serials.len() as u64);
        Ok(Revoked {
            serials,
            connections_cut: cut,
        })
    }

    /// Cuts the connections of every certificate the registry announces as revoked on
    /// another node, until `shutdown`.
    pub async fn cut_on_events(self, shutdown: CancellationToken) {
        let mut events = self.registry.events();
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.recv() => ev,
            };
            match ev {
                Ok(crate::registry::RegistryEvent::SshCertRevoked(serial)) => {
                    let n = self.cut(&[serial]);
                    if n > 0 {
                        tracing::info!(
                            serial,
                            connections_cut = n,
                            "ssh: certificate revoked on another node: connections cut"
                        );
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    }

    /// Cuts the connections of `serials`; returns how many.
    fn cut(&self, serials: &[i64]) -> usize {
        let mut cut = 0;
        let mut live = self.lock();
        for s in serials {
            for t in live.remove(s).unwrap_or_default().into_values() {
                t.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// Tracks a connection authenticated with certificate `serial`: `cut` is cancelled when
    /// the certificate is revoked.
    pub fn track(&self, serial: i64, cut: CancellationToken) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().entry(serial).or_default().insert(id, cut);
        Tracked {
            certs: self.clone(),
            serial,
            id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revocation another node wrote in the shared store (here: straight into the store,
    /// not through this node's `revoke`) cuts the connection at the next recheck.
    #[tokio::test]
    async fn a_revocation_seen_in_the_store_cuts_the_connection() {
        let dir = std::env::temp_dir().join(format!("bastide-issued-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let paths = crate::pki::PkiPaths::new(&dir);
        crate::pki::init(&paths, "p", None, &[]).unwrap();
        let store = crate::store::Store::create(&dir.join("registry.sqlite")).unwrap();
        let ca = crate::pki::AgentCa::load(&paths, "p", None).unwrap();
        let reg = Registry::open(
            store,
            ca,
            crate::registry::RegistrySettings {
                cert_lifetime: std::time::Duration::from_secs(3600),
                addresses: Default::default(),
            },
        )
        .unwrap();
        let certs = IssuedCerts::new(reg.clone());
        let now = crate::unix_now();
        certs
            .record(SshCertRow {
                serial: 7,
                admin: "alice".into(),
                sub: "s".into(),
                groups: vec![],
                key_fingerprint: "SHA256:x".into(),
                valid_after: now - 10,
                valid_before: now + 3600,
                issued_at: now,
                source: "127.0.0.1".into(),
                revoked: false,
            })
            .await
            .unwrap();
        let every = std::time::Duration::from_millis(20);
        // A connection that ends stops its watcher.
        let ended = CancellationToken::new();
        let w = tokio::spawn(watch_revocation(
            certs.clone(),
            7,
            CancellationToken::new(),
            ended.clone(),
            every,
        ));
        ended.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
        let cut = CancellationToken::new();
        let watch = tokio::spawn(watch_revocation(
            certs.clone(),
            7,
            cut.clone(),
            CancellationToken::new(),
            every,
        ));
        tokio::time::sleep(every * 5).await;
        assert!(!cut.is_cancelled(), "a valid certificate is not cut");
        let r = reg
            .with_store(|s| s.revoke_ssh_certs(Some(7), None))
            .unwrap();
        assert_eq!(r, vec![7]);
        tokio::time::timeout(std::time::Duration::from_secs(5), watch)
            .await
            .unwrap()
            .unwrap();
        assert!(cut.is_cancelled());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
