//! The queue runner: delivers due messages to the smarthost with `lettre` (pooled, reused
//! connections), retries temporary failures with exponential backoff until the maximum
//! queue lifetime, and on a permanent failure or expiry sends a DSN to the sender (never
//! to the null sender) and moves the message to `dead/`.
//!
//! Delivery is at-least-once: a message is removed from the spool only after the
//! smarthost's 250, so a crash between that reply and the removal re-sends it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::PoolConfig;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::spool::{decode, new_id, now_ms, FailedRecipient, Meta, Queue};
use super::{RelayTls, SmtpConfig, SmtpMetrics};

/// Time deliveries in progress get at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The queue runner's notion of "now", in ms since the epoch: retry times and the queue
/// lifetime are computed from it, so tests inject a clock they move by hand instead of
/// waiting hours of backoff.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The wall clock (arrival times in the spool are wall-clock times too).
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The smarthost transport and the retry policy.
pub struct Relay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    concurrency: usize,
    timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    max_lifetime: Duration,
    target: String,
}

impl Relay {
    pub fn new(cfg: &SmtpConfig, hostname: &str) -> Result<Self> {
        let r = &cfg.relay;
        let params = || -> Result<TlsParameters> {
            let mut b = TlsParameters::builder(r.host.clone());
            if let Some(ca) = &r.ca_file {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                b = b
                    .certificate_store(CertificateStore::None)
                    .add_root_certificate(
                        Certificate::from_pem(&pem)
                            .with_context(|| format!("parsing {}", ca.display()))?,
                    );
            }
            b.build_rustls().context("TLS parameters")
        };
        let tls = match r.tls {
            RelayTls::Required => Tls::Required(params()?),
            RelayTls::Opportunistic => Tls::Opportunistic(params()?),
            RelayTls::Implicit => Tls::Wrapper(params()?),
            RelayTls::None => {
                warn!(host = %r.host, "smtp.relay.tls = \"none\": mail to the smarthost travels in plaintext");
                Tls::None
            }
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(r.host.clone())
            .port(r.port)
            .tls(tls)
            .timeout(Some(r.timeout))
            .hello_name(ClientId::Domain(hostname.to_string()))
            .pool_config(
                PoolConfig::new()
                    .max_size(r.concurrency as u32)
                    .idle_timeout(Duration::from_secs(30)),
            );
        if let (Some(user), Some(pw)) = (&r.username, &r.password_file) {
            crate::fsutil::check_secret_file(pw)?;
            let password =
                std::fs::read_to_string(pw).with_context(|| format!("reading {}", pw.display()))?;
            b = b
                .credentials(Credentials::new(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                ))
                .authentication(vec![Mechanism::Plain, Mechanism::Login]);
        }
        Ok(Self {
            transport: b.build(),
            concurrency: r.concurrency,
            timeout: r.timeout,
            retry_initial: r.retry_initial,
            retry_max: r.retry_max,
            max_lifetime: r.max_lifetime,
            target: format!("{}:{}", r.host, r.port),
        })
    }

    /// Delay before attempt `attempts + 1`: initial × 2^(attempts-1), capped.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1).min(30))
            .unwrap_or(u32::MAX);
        self.retry_initial
            .checked_mul(factor)
            .unwrap_or(self.retry_max)
            .min(self.retry_max)
    }
}

enum Outcome {
    Delivered,
    /// `replied`: the smarthost answered with a reply code, as opposed to a connection,
    /// TLS or timeout failure.
    Temporary {
        error: String,
        replied: bool,
    },
    Permanent {
        error: String,
        status: String,
        replied: bool,
    },
}

fn parse_addr(a: &str) -> Result<Address, String> {
    a.parse::<Address>()
        .map_err(|e| format!("address {a:?} cannot be relayed: {e}"))
}

fn local_failure(error: String, status: &str) -> Outcome {
    Outcome::Permanent {
        error,
        status: status.into(),
        replied: false,
    }
}

/// One SMTP transaction: `sender` to `recipients`.
async fn attempt(relay: &Relay, sender: &str, recipients: &[String], content: &[u8]) -> Outcome {
    let from = if sender.is_empty() {
        None
    } else {
        match parse_addr(sender) {
            Ok(a) => Some(a),
            Err(e) => return local_failure(e, "5.1.7"),
        }
    };
    let mut to = Vec::new();
    for r in recipients {
        match parse_addr(r) {
            Ok(a) => to.push(a),
            Err(e) => return local_failure(e, "5.1.3"),
        }
    }
    let envelope = match Envelope::new(from, to) {
        Ok(e) => e,
        Err(e) => return local_failure(format!("bad envelope: {e}"), "5.1.0"),
    };
    // lettre sends CRLF.CRLF after the content: its own CRLF ends our last line.
    let body = content.strip_suffix(b"\r\n").unwrap_or(content);
    let send = relay.transport.send_raw(&envelope, body);
    // lettre's timeout is per command; bound the whole transaction too.
    let total = relay.timeout * 4 + Duration::from_secs(content.len() as u64 / 100_000);
    match tokio::time::timeout(total, send).await {
        Err(_) => Outcome::Temporary {
            error: format!("{}: timed out", relay.target),
            replied: false,
        },
        Ok(Ok(_)) => Outcome::Delivered,
        Ok(Err(e)) if e.is_permanent() => {
            let code = e
                .status()
                .map(|c| format!("{c}"))
                .unwrap_or_else(|| "5.0.0".into());
            let status = if code.starts_with('5') && code.len() == 3 {
                "5.0.0".to_string()
            } else {
                code
            };
            Outcome::Permanent {
                error: format!("{}: {e}", relay.target),
                status,
                replied: true,
            }
        }
        Ok(Err(e)) => Outcome::Temporary {
            error: format!("{}: {e}", relay.target),
            replied: e.is_transient(),
        },
    }
}

/// Runs the queue until `shutdown`. The runner sleeps until the next message is due by
/// `clock`, or until [`Queue::wake`] is notified (new mail, flush, retry).
pub async fn run_queue(
    relay: Relay,
    queue: Arc<Queue>,
    metrics: Arc<SmtpMetrics>,
    hostname: String,
    postmaster: Option<String>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<()> {
    let relay = Arc::new(relay);
    let ctx = Arc::new(Ctx {
        queue: queue.clone(),
        metrics,
        hostname,
        postmaster,
        clock: clock.clone(),
    });
    let mut running: JoinSet<String> = JoinSet::new();
    loop {
        let free = relay.concurrency.saturating_sub(running.len());
        for meta in queue.take_due(clock.now_ms(), free) {
            let (relay, ctx) = (relay.clone(), ctx.clone());
            running.spawn(async move {
                let id = meta.id.clone();
                if let Err(e) = deliver(&relay, &ctx, meta).await {
                    warn!(id = %id, error = %format!("{e:#}"), "mail queue: spool update failed");
                    // Keep it queued; it will be tried again.
                    let mut st = ctx.queue.state(&id).unwrap_or_default();
                    st.next_try_ms = ctx.clock.now_ms() + relay.retry_initial.as_millis() as i64;
                    let _ = ctx.queue.deferred(&id, st).await;
                }
                id
            });
        }
        let sleep = match queue.next_due() {
            Some(t) if running.len() < relay.concurrency => {
                Duration::from_millis((t - clock.now_ms()).clamp(0, 3_600_000) as u64)
            }
            _ => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = queue.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    let drain = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!("mail queue: deliveries cut at shutdown; they stay queued");
        running.abort_all();
    }
    Ok(())
}

struct Ctx {
    queue: Arc<Queue>,
    metrics: Arc<SmtpMetrics>,
    hostname: String,
    postmaster: Option<String>,
    clock: Arc<dyn Clock>,
}

/// One delivery attempt of a message to the recipients it still has.
///
/// lettre reports one result per transaction: a refused RCPT fails the whole
/// transaction. So when the smarthost refuses a message with several recipients, each is
/// tried again in a transaction of its own, at once, to learn which were refused: the
/// others are delivered (and never sent again: the state file records them), and only
/// the refused ones are bounced at once (5xx) or retried (4xx). The message goes to
/// `dead/` once every recipient is settled and one of them failed for good.
async fn deliver(relay: &Relay, ctx: &Ctx, meta: Meta) -> Result<()> {
    let id = meta.id.clone();
    let data = ctx.queue.read(&id).await?;
    let (meta, content) = decode(&data)?;
    let mut state = ctx.queue.state(&id).unwrap_or_default();
    let pending: Vec<String> = meta
        .recipients
        .iter()
        .filter(|r| !state.settled(r))
        .cloned()
        .collect();
    state.attempts += 1;
    let failed_before = state.failed.len();
    let mut temporary: Option<String> = None;
    let mut delivered_now = 0usize;
    let outcome = attempt(relay, &meta.sender, &pending, content).await;
    let split = pending.len() > 1
        && matches!(
            outcome,
            Outcome::Permanent { replied: true, .. } | Outcome::Temporary { replied: true, .. }
        );
    if split {
        for r in pending {
            match attempt(relay, &meta.sender, std::slice::from_ref(&r), content).await {
                Outcome::Delivered => {
                    delivered_now += 1;
                    state.done.push(r);
                }
                Outcome::Permanent { error, status, .. } => state.failed.push(FailedRecipient {
                    recipient: r,
                    error,
                    status,
                }),
                Outcome::Temporary { error, .. } => {
                    temporary.get_or_insert(error);
                }
            }
        }
    } else {
        match outcome {
            Outcome::Delivered => {
                delivered_now = pending.len();
                state.done.extend(pending);
            }
            Outcome::Permanent { error, status, .. } => {
                state
                    .failed
                    .extend(pending.into_iter().map(|recipient| FailedRecipient {
                        recipient,
                        error: error.clone(),
                        status: status.clone(),
                    }))
            }
            Outcome::Temporary { error, .. } => temporary = Some(error),
        }
    }
    if delivered_now > 0 {
        info!(id = %id, to = ?state.done, relay = %relay.target, attempts = state.attempts, "mail relayed");
    }
    let remaining: Vec<String> = meta
        .recipients
        .iter()
        .filter(|r| !state.settled(r))
        .cloned()
        .collect();
    let now = ctx.clock.now_ms();
    let age = Duration::from_millis((now - meta.arrived_ms).max(0) as u64);
    let err = temporary.unwrap_or_else(|| format!("{}: not delivered", relay.target));
    if !remaining.is_empty() && age >= relay.max_lifetime {
        let reason = format!(
            "gave up after {} attempts over {}: last error: {err}",
            state.attempts,
            humantime::format_duration(Duration::from_secs(age.as_secs()))
        );
        state
            .failed
            .extend(remaining.iter().map(|recipient| FailedRecipient {
                recipient: recipient.clone(),
                error: reason.clone(),
                status: "4.4.7".into(),
            }));
    }
    // Recipients refused now are bounced now, even if others are still being retried.
    if state.failed.len() > failed_before {
        bounce(ctx, &meta, content, &state.failed[failed_before..]).await?;
    }
    if !remaining.is_empty() && age < relay.max_lifetime {
        let delay = relay.backoff(state.attempts);
        state.next_try_ms = now + delay.as_millis() as i64;
        state.last_error = Some(err.clone());
        SmtpMetrics::inc(&ctx.metrics.deferred);
        warn!(id = %id, attempts = state.attempts, delay_ms = delay.as_millis() as u64, to = ?remaining, error = %err, "mail deferred");
        return ctx.queue.deferred(&id, state).await;
    }
    if !state.done.is_empty() {
        SmtpMetrics::inc(&ctx.metrics.relayed);
    }
    if state.failed.is_empty() {
        ctx.queue.delivered(&id).await
    } else {
        // Given up for some recipient: kept in dead/ with who got it and who did not.
        let reason = state
            .failed
            .iter()
            .map(|f| format!("{}: {}", f.recipient, f.error))
            .collect::<Vec<_>>()
            .join("; ");
        warn!(id = %meta.id, error = %reason, delivered_to = ?state.done, "mail undeliverable: moved to dead/");
        state.last_error = Some(reason);
        ctx.queue.dead_letter(&meta.id, state).await?;
        SmtpMetrics::inc(&ctx.metrics.dead_lettered);
        Ok(())
    }
}

/// Sends a DSN for `failed` to the envelope sender and the postmaster, unless the sender
/// is null (a bounce never bounces).
async fn bounce(ctx: &Ctx, meta: &Meta, content: &[u8], failed: &[FailedRecipient]) -> Result<()> {
    if meta.sender.is_empty() {
        return Ok(());
    }
    let mut to = vec![meta.sender.clone()];
    if let Some(p) = &ctx.postmaster {
        if !to.contains(p) {
            to.push(p.clone());
        }
    }
    let dsn = build_dsn(&ctx.hostname, meta, content, failed);
    let bounce = Meta {
        id: new_id(),
        arrived_ms: ctx.clock.now_ms(),
        client: "local".into(),
        helo: ctx.hostname.clone(),
        sender: String::new(),
        recipients: to,
        size: dsn.len(),
    };
    let bid = bounce.id.clone();
    ctx.queue.submit(bounce, &dsn).await?;
    SmtpMetrics::inc(&ctx.metrics.bounced);
    info!(id = %meta.id, bounce = %bid, failed = ?failed.iter().map(|f| &f.recipient).collect::<Vec<_>>(), "bounce queued");
    Ok(())
}

/// A delivery status notification (RFC 3464) with the original headers attached.
pub fn build_dsn(
    hostname: &str,
    meta: &Meta,
    content: &[u8],
    failed: &[FailedRecipient],
) -> Vec<u8> {
    let boundary = format!("{}/{}", meta.id, hostname);
    let date = super::server::rfc5322_date(crate::unix_now());
    let arrival = super::server::rfc5322_date(meta.arrived_ms / 1000);
    let headers_end = content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(content.len());
    let line = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).collect() };
    let mut s = String::new();
    s.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{}.bounce@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message {} could not be delivered to:\r\n",
        meta.sender,
        meta.id,
        meta.id
    ));
    for f in failed {
        s.push_str(&format!(
            "  <{}>: {}\r\n",
            line(&f.recipient),
            line(&f.error)
        ));
    }
    s.push_str(&format!(
        "\r\n\
         --{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Bastide-Queue-ID: {}\r\n\
         Arrival-Date: {arrival}\r\n",
        meta.id
    ));
    for f in failed {
        s.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            line(&f.recipient),
            line(&f.status),
            line(&f.error)
        ));
    }
    s.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Description: Undelivered Message Headers\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    ));
    let mut out = s.into_bytes();
    out.extend_from_slice(&content[..headers_end]);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::spool::{decode, Meta};
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A clock the test moves by hand.
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const T0: i64 = 1_800_000_000_000;
    const MIN: i64 = 60_000;

    fn config(port: u16) -> SmtpConfig {
        toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\n\
             allow = [\"127.0.0.1/32\"]\n\
             postmaster = \"postmaster@example.org\"\n\
             [relay]\n\
             host = \"127.0.0.1\"\n\
             port = {port}\n\
             tls = \"none\"\n\
             timeout = \"2s\"\n\
             retry_initial = \"1m\"\n\
             retry_max = \"10m\"\n\
             max_lifetime = \"1h\"\n"
        ))
        .unwrap()
    }

    fn meta(sender: &str) -> Meta {
        Meta {
            id: new_id(),
            arrived_ms: T0,
            client: "127.0.0.1".into(),
            helo: "web01".into(),
            sender: sender.into(),
            recipients: vec!["ops@example.org".into()],
            size: 0,
        }
    }

    /// Polls (in real time: deliveries are real connection attempts) until `f` holds.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn dead_files(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("dead"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// The retry schedule and the queue lifetime, driven by an injected clock against a
    /// smarthost that refuses connections: delays double from `retry_initial` up to
    /// `retry_max`; nothing is tried before it is due; the first failure after
    /// `max_lifetime` bounces (4.4.7) to the sender and postmaster — not for the null
    /// sender — and moves the message to `dead/`.
    #[tokio::test]
    async fn backoff_and_lifetime_expiry_with_an_injected_clock() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let dir = std::env::temp_dir().join(format!("bastide-relay-{}", rand::random::<u64>()));
        let queue = Arc::new(Queue::open(&dir).unwrap());
        let (a, b) = (meta("alice@example.com"), meta(""));
        queue
            .submit(a.clone(), b"Subject: expiring\r\n\r\nbody\r\n")
            .await
            .unwrap();
        queue
            .submit(b.clone(), b"Subject: null sender\r\n\r\nbody\r\n")
            .await
            .unwrap();
        let clock = Arc::new(ManualClock(AtomicI64::new(T0)));
        let metrics = Arc::new(SmtpMetrics::default());
        let relay = Relay::new(&config(port), "bastion.example.org").unwrap();
        let stop = CancellationToken::new();
        let runner = tokio::spawn(run_queue(
            relay,
            queue.clone(),
            metrics.clone(),
            "bastion.example.org".into(),
            Some("postmaster@example.org".into()),
            clock.clone(),
            stop.clone(),
        ));
        let attempts = |q: &Queue, id: &str| q.state(id).map(|s| s.attempts).unwrap_or(0);

        // Attempt k fails at `now`; the next is due `delays[k-1]` later.
        let delays = [1, 2, 4, 8, 10, 10, 10, 10, 10]; // minutes
        let mut now = T0;
        for (k, d) in delays.iter().enumerate() {
            let k = k as u32 + 1;
            until(&format!("attempt {k}"), || {
                attempts(&queue, &a.id) == k && attempts(&queue, &b.id) == k
            })
            .await;
            let st = queue.state(&a.id).unwrap();
            assert_eq!(st.next_try_ms - now, d * MIN, "delay after attempt {k}");
            assert!(st.last_error.as_deref().unwrap().contains("127.0.0.1"));
            // Not a moment before it is due.
            clock.0.store(st.next_try_ms - 1, Ordering::SeqCst);
            queue.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(attempts(&queue, &a.id), k, "tried before it was due");
            now = st.next_try_ms;
            clock.0.store(now, Ordering::SeqCst);
            queue.wake.notify_one();
        }
        // Attempt 10 comes 65 min after arrival, past the 1 h lifetime: given up.
        assert_eq!(now - T0, 65 * MIN);
        assert!(dead_files(&dir).is_empty(), "nothing dead before expiry");
        until("both dead-lettered", || {
            dead_files(&dir)
                .iter()
                .filter(|f| f.ends_with(".msg"))
                .count()
                == 2
        })
        .await;
        assert!(queue.state(&a.id).is_none() && queue.state(&b.id).is_none());
        let dead_state = std::fs::read_to_string(dir.join(format!("dead/{}.state", a.id))).unwrap();
        assert!(
            dead_state.contains("gave up after 10 attempts over 1h 5m"),
            "{dead_state}"
        );
        // One bounce (the null sender gets none), queued with the null sender.
        until("the bounce queued", || {
            metrics.bounced.load(Ordering::Relaxed) == 1
        })
        .await;
        let items = queue.list();
        assert_eq!(items.len(), 1, "{items:?}");
        let bounce = &items[0];
        assert_eq!(bounce.sender, "");
        assert_eq!(
            bounce.recipients,
            vec!["alice@example.com", "postmaster@example.org"]
        );
        let data = queue.read(&bounce.id).await.unwrap();
        let (_, dsn) = decode(&data).unwrap();
        let dsn = String::from_utf8_lossy(dsn);
        assert!(dsn.contains("Status: 4.4.7"), "{dsn}");
        assert!(dsn.contains("Action: failed"));
        assert!(dsn.contains("Final-Recipient: rfc822; ops@example.org"));
        assert!(
            dsn.contains("Subject: expiring"),
            "original headers attached"
        );
        // The counter follows the move to dead/ (which the files showed first).
        until("both counted as dead letters", || {
            metrics.dead_lettered.load(Ordering::Relaxed) == 2
        })
        .await;
        assert!(metrics.deferred.load(Ordering::Relaxed) >= 18);
        stop.cancel();
        runner.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn backoff_doubles_and_caps() {
        let r = Relay::new(&config(25), "h").unwrap();
        let mins: Vec<u64> = (1..=7).map(|a| r.backoff(a).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 10, 10, 10]);
    }
}
