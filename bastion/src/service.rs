//! The one shape every service of the daemon has: [`Service::bind`] from its config section
//! (listeners, files, handles other services need), then [`Service::run`] with the shared
//! [`Ctx`] until its shutdown token is cancelled. `daemon::serve` is a list of services, one
//! line each; adding a service is writing its module (with its `impl Service`) and one line
//! there.
//!
//! Every service is bound before any runs, so nothing starts half-configured and READY is
//! only sent when all listeners exist. What services need of each other goes through the
//! context, never through imports: handles published at bind time ([`Handles`]), admin
//! commands ([`crate::control::AdminHandlers`]) and metrics collectors run before each
//! scrape ([`crate::metrics::names::Collectors`]). A service binds after those it takes a
//! handle from (the order of the list in `serve`).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use anyhow::Result;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{AdminHandlers, ReloadRequest};
use crate::hostmetrics::HostMetrics;
use crate::metrics::names::Collectors;
use crate::registry::Registry;

/// What every service gets: the registry, the running configuration, and the registries
/// through which services offer things to each other.
#[derive(Clone)]
pub struct Ctx {
    pub registry: Registry,
    /// The running configuration (replaced on reload; services that can reload watch it).
    pub config: watch::Receiver<Arc<Config>>,
    /// Where reloads are asked (the daemon's main loop).
    pub reload: mpsc::Sender<ReloadRequest>,
    /// Host metrics the agents ship, served by the metrics endpoint.
    pub hosts: HostMetrics,
    /// Admin socket commands, registered by the services that answer them.
    pub admin: AdminHandlers,
    /// Metrics collectors, run before each scrape of `/metrics`.
    pub collectors: Collectors,
    /// Handles services publish at bind time for others (the log store, the mail queue...).
    pub handles: Handles,
}

/// Handles services publish for each other, one per type.
#[derive(Clone, Default)]
pub struct Handles(Arc<RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>>);

impl Handles {
    /// Publishes `v` (replacing one of the same type).
    pub fn provide<T: Clone + Send + Sync + 'static>(&self, v: T) {
        if let Ok(mut m) = self.0.write() {
            m.insert(TypeId::of::<T>(), Box::new(v));
        }
    }

    /// The handle of type `T`, if a service that is on published one.
    pub fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.0
            .read()
            .ok()?
            .get(&TypeId::of::<T>())?
            .downcast_ref::<T>()
            .cloned()
    }
}

/// A service of the daemon.
pub trait Service: Sized + Send + 'static {
    /// Its name in logs (`service = ...`) and errors.
    const NAME: &'static str;

    /// Binds from the configuration: `Ok(None)` when its table is absent (the service is
    /// off). Errors name the config key (`agents.listen: cannot bind ...`).
    fn bind(cfg: &Config, ctx: &Ctx) -> impl Future<Output = Result<Option<Self>>>;

    /// Serves until `shutdown` is cancelled.
    fn run(self, ctx: Ctx, shutdown: CancellationToken) -> impl Future<Output = Result<()>> + Send;
}

type Start =
    Box<dyn FnOnce(Ctx, CancellationToken) -> Pin<Box<dyn Future<Output = Result<()>> + Send>>>;

/// The bound services, waiting to run.
pub struct Bound {
    ctx: Ctx,
    ready: Vec<(&'static str, Start)>,
}

impl Bound {
    pub fn new(ctx: Ctx) -> Self {
        Self {
            ctx,
            ready: Vec::new(),
        }
    }

    /// Binds `S`; it runs when [`Bound::spawn`] is called.
    pub async fn bind<S: Service>(&mut self, cfg: &Config) -> Result<()> {
        if let Some(s) = S::bind(cfg, &self.ctx).await? {
            self.ready
                .push((S::NAME, Box::new(move |ctx, t| Box::pin(s.run(ctx, t)))));
        }
        Ok(())
    }

    /// Starts every bound service under a child of `root`.
    pub fn spawn(self, root: &CancellationToken, set: &mut JoinSet<(&'static str, Result<()>)>) {
        for (name, start) in self.ready {
            let fut = start(self.ctx.clone(), root.child_token());
            set.spawn(async move { (name, fut.await) });
        }
    }
}
