//! `bastide-agent run`: dials out over mutual TLS, registers, keeps one session stream with
//! heartbeats, renews the certificate at 2/3 of its lifetime, and reconnects with
//! exponential backoff and jitter when cut.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::{
    agent_message, bastion_message, AgentMessage, Heartbeat, RegisterRequest, RenewRequest,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::endpoints::Endpoints;
use crate::logs::LogSourceConfig;
use crate::state::State;
use crate::tls::{connect_from, is_revoked, mtls_config, probe_revoked};

/// One heartbeat in `ACK_EVERY` asks the bastion for an acknowledgement (the first one
/// does): each acknowledgement is a write and a wake-up on both sides, for every agent of
/// the fleet, and TCP already proves the path alive.
pub const ACK_EVERY: u64 = 3;

/// Errors that end the agent instead of being retried.
#[derive(Debug, Error)]
pub enum Fatal {
    #[error("certificate of {name} expired at {at}: this agent was offline past its certificate's lifetime and must re-enroll (bastide-agent enroll --force with a new token)")]
    Expired { name: String, at: String },
    #[error("the bastion refused our certificate as revoked: re-enroll with a new token (bastide-agent enroll --force)")]
    Revoked,
}

enum Outcome {
    Shutdown,
    Renewed,
}

fn ts(t: i64) -> String {
    humantime_rfc3339(t)
}

fn humantime_rfc3339(t: i64) -> String {
    let st = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    time::OffsetDateTime::from(st).to_string()
}

/// Runs until `shutdown`, or until a fatal condition (expired or revoked certificate).
pub async fn run(state_dir: &Path, cfg: &AgentConfig, shutdown: CancellationToken) -> Result<()> {
    // The log source list from the local file; a pushed configuration replaces it through
    // this channel (keep the sender alive for the agent's lifetime).
    let (_log_sources, log_sources_rx) = tokio::sync::watch::channel(cfg.logs.sources.clone());
    run_with_log_sources(state_dir, cfg, log_sources_rx, shutdown).await
}

/// [`run`], with the log sources taken from `log_sources` (changes apply at run time).
pub async fn run_with_log_sources(
    state_dir: &Path,
    cfg: &AgentConfig,
    log_sources: tokio::sync::watch::Receiver<Vec<crate::logs::LogSourceConfig>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let applier = crate::apply::Applier::open(state_dir, cfg.config.clone());
    let effective = follow_pushed_sources(
        log_sources,
        applier.log_sources(),
        cfg.config.allow_log_sources.clone(),
        &shutdown,
    );
    // Logs must not take heartbeats and metrics down with them: without a usable buffer
    // directory the agent runs on without shipping logs, and says so.
    let logs = match crate::logs::start(state_dir, &cfg.logs, effective, shutdown.clone()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "log shipping disabled: cannot start the log pipeline");
            None
        }
    };
    let mut backoff = Backoff::new(cfg.reconnect_initial, cfg.reconnect_max);
    let mut endpoints: Option<Endpoints> = None;
    loop {
        let mut st = State::load(state_dir)?;
        let endpoints = endpoints.get_or_insert_with(|| {
            Endpoints::new(&st.meta.bastion, &st.meta.bastions, &cfg.bastions)
        });
        if st.not_after <= crate::unix_now() {
            return Err(Fatal::Expired {
                name: st.meta.name.clone(),
                at: ts(st.not_after),
            }
            .into());
        }
        let mut registered = false;
        // The session dials the endpoint in use (the others are for failover).
        let bastion = endpoints.current().to_string();
        match session_once(
            &mut st,
            &bastion,
            cfg,
            &logs,
            &applier,
            &shutdown,
            &mut registered,
        )
        .await
        {
            Ok(Outcome::Shutdown) => return Ok(()),
            Ok(Outcome::Renewed) => {
                backoff.reset();
                continue;
            }
            Err(e) => {
                if e.chain().any(is_revoked) || (!registered && probe(&st, &bastion).await) {
                    return Err(Fatal::Revoked.into());
                }
                if registered {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let lost = endpoints.current().to_string();
                endpoints.advance();
                warn!(error = %format!("{e:#}"), bastion = %lost, next = %endpoints.current(), retry_in_ms = delay.as_millis() as u64, "bastion session lost");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The log sources in effect: the ones pushed by the bastion when it pushed any, else the
/// local ones. Pushed sources are files (with an optional multiline rule), each confined to
/// the local `[config] allow_log_sources` (checked again on every file it opens); the
/// journal stays a local decision.
fn follow_pushed_sources(
    mut local: watch::Receiver<Vec<LogSourceConfig>>,
    mut pushed: watch::Receiver<Vec<bastide_proto::v1::LogSource>>,
    allow: Vec<String>,
    shutdown: &CancellationToken,
) -> watch::Receiver<Vec<LogSourceConfig>> {
    fn effective(
        local: &watch::Receiver<Vec<LogSourceConfig>>,
        pushed: &watch::Receiver<Vec<bastide_proto::v1::LogSource>>,
        allow: &[String],
    ) -> Vec<LogSourceConfig> {
        let pushed = pushed.borrow();
        if pushed.is_empty() {
            return local.borrow().clone();
        }
        pushed
            .iter()
            .map(|p| {
                let mut s = LogSourceConfig::file(&p.path);
                if !p.multiline_start.is_empty() {
                    s.multiline_start = Some(p.multiline_start.clone());
                }
                s.pushed_allow = Some(allow.to_vec());
                s
            })
            .collect()
    }
    let (tx, rx) = watch::channel(effective(&local, &pushed, &allow));
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = local.changed() => if r.is_err() { return },
                r = pushed.changed() => if r.is_err() { return },
            }
            let now = effective(&local, &pushed, &allow);
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                if changed {
                    info!(sources = now.len(), "log sources changed");
                    *cur = now;
                }
                changed
            });
        }
    });
    rx
}

async fn probe(st: &State, bastion: &str) -> bool {
    match mtls_config_of(st) {
        Ok(cfg) => probe_revoked(bastion, &st.meta.server_name, cfg).await,
        Err(_) => false,
    }
}

fn mtls_config_of(st: &State) -> Result<rustls::ClientConfig> {
    mtls_config(st.ca()?, st.cert_chain()?, st.key()?)
}

async fn session_once(
    st: &mut State,
    bastion: &str,
    cfg: &AgentConfig,
    logs: &Option<std::sync::Arc<crate::logs::Shared>>,
    applier: &crate::apply::Applier,
    shutdown: &CancellationToken,
    registered: &mut bool,
) -> Result<Outcome> {
    let tls = mtls_config_of(st)?;
    let channel = connect_from(bastion, &st.meta.server_name, tls, cfg.source_address).await?;
    let mut client = AgentClient::new(channel.clone());
    let reg = client
        .register(RegisterRequest {
            claimed_name: st.meta.name.clone(),
            hostname: crate::facts::hostname(cfg),
            addresses: crate::facts::addresses(cfg),
            os: crate::facts::os(),
            agent_version: crate::VERSION.to_string(),
            ssh_host_keys: crate::facts::ssh_host_keys(&cfg.ssh_host_keys_dir),
            config_revision: applier.applied_revision(),
        })
        .await
        .context("registration")?
        .into_inner();
    *registered = true;
    if reg.name != st.meta.name {
        warn!(ours = %st.meta.name, bastion = %reg.name, "the bastion knows us under another name");
    }
    let interval = Duration::from_secs(u64::from(reg.heartbeat_interval_secs.max(1)));
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("opening session")?
        .into_inner();
    info!(name = %reg.name, project = %reg.project, heartbeat_secs = interval.as_secs(), "connected to the bastion");
    // Logs go on their own stream over the same connection; it ends with this session.
    let ship_cancel = shutdown.child_token();
    let _ship_guard = ship_cancel.clone().drop_guard();
    if let Some(logs) = logs {
        tokio::spawn(crate::logs::shipper::run(
            channel.clone(),
            logs.clone(),
            ship_cancel,
        ));
    }

    let renew_in = Duration::from_secs((st.renew_at() - crate::unix_now()).max(0) as u64);
    let renew = tokio::time::sleep(renew_in);
    tokio::pin!(renew);
    let mut ticker = tokio::time::interval(interval);
    let mut seq: u64 = 0;
    // The bastion acknowledges the heartbeats that ask for it, one in ACK_EVERY: no answer
    // to two of them in a row means the bastion is stuck even though its system still
    // answers TCP. A dead path is caught sooner by TCP itself (`tls::USER_TIMEOUT`).
    let mut last_ack = tokio::time::Instant::now();
    let ack_silence = interval * (2 * ACK_EVERY as u32 + 1);
    // Host metrics: first batch right away, then every interval (never when turned off).
    // The bastion may push another interval (configuration push): it applies at once.
    let mut pushed = applier.settings();
    let interval_of =
        |p: &crate::apply::PushedSettings| p.metrics_interval.unwrap_or(cfg.metrics_interval);
    let mut metrics_every = interval_of(&pushed.borrow_and_update());
    let mut metrics_tick = tokio::time::interval(metrics_every.max(Duration::from_secs(1)));
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                info!("shutting down: closing the session");
                return Ok(Outcome::Shutdown);
            }
            _ = ticker.tick() => {
                if last_ack.elapsed() > ack_silence {
                    bail!("no answer from the bastion for {}s", last_ack.elapsed().as_secs());
                }
                seq += 1;
                let hb = AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                        seq,
                        agent_time_unix: crate::unix_now(),
                        no_ack: seq % ACK_EVERY != 1,
                    })),
                };
                if tx.send(hb).await.is_err() {
                    bail!("session stream closed");
                }
            }
            Ok(()) = pushed.changed() => {
                let every = interval_of(&pushed.borrow_and_update());
                if every != metrics_every {
                    info!(interval_secs = every.as_secs(), "host metrics interval changed by the bastion");
                    metrics_every = every;
                    metrics_tick = tokio::time::interval(every.max(Duration::from_secs(1)));
                    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            _ = metrics_tick.tick(), if !metrics_every.is_zero() => {
                let src = crate::hostmetrics::Sources::default();
                let logs = logs.clone();
                let collect = tokio::task::spawn_blocking(move || {
                    let mut batch = crate::hostmetrics::collect(&src);
                    if let Some(logs) = logs {
                        batch.families.extend(logs.metric_families());
                    }
                    batch
                });
                // A hung filesystem must not stall the session.
                match tokio::time::timeout(Duration::from_secs(5), collect).await {
                    Ok(Ok(batch)) => {
                        let m = AgentMessage { kind: Some(agent_message::Kind::Metrics(batch)) };
                        if tx.send(m).await.is_err() {
                            bail!("session stream closed");
                        }
                    }
                    _ => warn!("host metrics collection took over 5s: skipped"),
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.kind {
                    Some(bastion_message::Kind::HeartbeatAck(ack)) => {
                        last_ack = tokio::time::Instant::now();
                        let skew = ack.bastion_time_unix - crate::unix_now();
                        if skew.abs() > 60 {
                            warn!(skew_secs = skew, "clock differs from the bastion's by over a minute");
                        }
                    }
                    Some(bastion_message::Kind::Config(push)) => applier.handle(push, tx.clone()),
                    None => {}
                },
                Ok(None) => bail!("the bastion closed the session"),
                Err(s) => return Err(anyhow::Error::new(s).context("session")),
            },
            _ = &mut renew => {
                let (key, csr) = crate::enroll::new_key_and_csr(&st.meta.name)?;
                let resp = client
                    .renew(RenewRequest { csr_der: csr })
                    .await
                    .context("certificate renewal")?
                    .into_inner();
                st.save_renewal(&key.serialize_pem(), &resp.certificate_pem)?;
                info!(not_after = %ts(resp.not_after_unix), "certificate renewed: reconnecting with it");
                return Ok(Outcome::Renewed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(500) && d[0] <= Duration::from_secs(1));
        assert!(d[5] >= Duration::from_secs(4) && d[5] <= Duration::from_secs(8));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
