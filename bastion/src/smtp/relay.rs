//! The queue runner: delivers due messages to the smarthost, retries temporary failures
//! with exponential backoff until the maximum queue lifetime, and on a permanent failure or
//! expiry sends a DSN to the sender (never to the null sender) and moves the message to
//! `dead/`.
//!
//! Deliveries run concurrently, at most `destination_concurrency_limit` at once, each on a
//! connection of its own taken from a small pool: a connection carries up to
//! `messages_per_connection` transactions (RSET before each one after the first) and is
//! closed after [`IDLE_CLOSE`] unused. Connections, STARTTLS and AUTH, reply parsing and
//! dot-stuffing are `lettre`'s (`AsyncSmtpConnection`); the transaction itself is driven
//! here, command by command, so that every `RCPT` gets its own result, and pipelined
//! (RFC 2920: RSET, MAIL, every RCPT and DATA in one write) when the smarthost offers
//! PIPELINING.
//!
//! Delivery is at-least-once: a message is removed from the spool only after the
//! smarthost's 250, so a crash between that reply and the removal re-sends it.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, CertificateStore, Tls, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::Error as SmtpError;
use lettre::Address;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::spool::{decode, new_id, now_ms, FailedRecipient, Meta, Queue};
use super::{RelayTls, SmtpConfig, SmtpMetrics};

/// Time deliveries in progress get at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A pooled connection unused for this long is closed (QUIT), like Postfix's
/// `smtp_connection_cache_time_limit`.
pub const IDLE_CLOSE: Duration = Duration::from_secs(5);

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

/// One open connection to the smarthost, ready for a transaction.
struct Conn {
    c: AsyncSmtpConnection,
    /// The smarthost offered PIPELINING (in its EHLO reply after STARTTLS, if any).
    pipelining: bool,
    /// Transactions started on it.
    used: usize,
    idle_since: Instant,
}

/// The smarthost: how to connect, the connection pool and the retry policy.
pub struct Relay {
    host: String,
    port: u16,
    tls: Tls,
    hello: ClientId,
    credentials: Option<Credentials>,
    concurrency: usize,
    messages_per_connection: usize,
    timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    max_lifetime: Duration,
    target: String,
    /// Idle connections, most recently used last.
    pool: Mutex<Vec<Conn>>,
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
        let credentials = match (&r.username, &r.password_file) {
            (Some(user), Some(pw)) => {
                crate::fsutil::check_secret_file(pw)?;
                let password = std::fs::read_to_string(pw)
                    .with_context(|| format!("reading {}", pw.display()))?;
                Some(Credentials::new(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                ))
            }
            _ => None,
        };
        Ok(Self {
            host: r.host.clone(),
            port: r.port,
            tls,
            hello: ClientId::Domain(hostname.to_string()),
            credentials,
            concurrency: r.destination_concurrency_limit,
            messages_per_connection: r.messages_per_connection,
            timeout: r.timeout,
            retry_initial: r.retry_initial,
            retry_max: r.retry_max,
            max_lifetime: r.max_lifetime,
            target: format!("{}:{}", r.host, r.port),
            pool: Mutex::new(Vec::new()),
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

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: TCP (with `TCP_NODELAY`: the content and its final "." are two
    /// writes, which Nagle's algorithm would hold back until the peer's delayed ACK),
    /// greeting and EHLO, STARTTLS as configured, EHLO again to learn PIPELINING, AUTH.
    async fn connect(&self, metrics: &SmtpMetrics) -> Result<Conn, String> {
        let t = self.timeout;
        let target = &self.target;
        let fail = |what: &str, e: &dyn fmt::Display| format!("{target}: {what}: {e}");
        let mut c = match &self.tls {
            // lettre wraps the socket in TLS before the greeting itself; it does not set
            // TCP_NODELAY there.
            Tls::Wrapper(p) => AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(t),
                &self.hello,
                Some(p.clone()),
                None,
            )
            .await
            .map_err(|e| fail("connect", &e))?,
            _ => {
                let tcp = tokio::time::timeout(
                    t,
                    tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                .map_err(|_| format!("{target}: connect: timed out"))?
                .map_err(|e| fail("connect", &e))?;
                let _ = tcp.set_nodelay(true);
                tokio::time::timeout(
                    t,
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello),
                )
                .await
                .map_err(|_| format!("{target}: greeting: timed out"))?
                .map_err(|e| fail("greeting", &e))?
            }
        };
        SmtpMetrics::inc(&metrics.relay_connections);
        let starttls = match &self.tls {
            Tls::Required(p) => Some(p),
            Tls::Opportunistic(p) if c.can_starttls() => Some(p),
            _ => None,
        };
        if let Some(p) = starttls {
            tokio::time::timeout(t, c.starttls(p.clone(), &self.hello))
                .await
                .map_err(|_| format!("{target}: STARTTLS: timed out"))?
                .map_err(|e| fail("STARTTLS", &e))?;
        }
        // lettre keeps only the extensions it uses from EHLO; ask once more for the list.
        let ehlo = tokio::time::timeout(t, c.command(Ehlo::new(self.hello.clone())))
            .await
            .map_err(|_| format!("{target}: EHLO: timed out"))?
            .map_err(|e| fail("EHLO", &e))?;
        let pipelining = ehlo.message().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("PIPELINING"))
        });
        if let Some(cred) = &self.credentials {
            tokio::time::timeout(t, c.auth(&[Mechanism::Plain, Mechanism::Login], cred))
                .await
                .map_err(|_| format!("{target}: AUTH: timed out"))?
                .map_err(|e| fail("AUTH", &e))?;
        }
        info!(relay = %target, pipelining, tls = c.is_encrypted(), "smarthost connection opened");
        Ok(Conn {
            c,
            pipelining,
            used: 0,
            idle_since: Instant::now(),
        })
    }

    /// An idle pooled connection (the most recently used), if any.
    fn take(&self) -> Option<Conn> {
        self.lock_pool().pop()
    }

    /// Back to the pool, unless it has carried its share of messages.
    async fn give_back(&self, mut conn: Conn) {
        if conn.used >= self.messages_per_connection {
            close(conn).await;
            return;
        }
        conn.idle_since = Instant::now();
        self.lock_pool().push(conn);
    }

    /// Closes the connections idle for `idle` or more (all of them with zero), in the
    /// background unless `wait` (the runner must not stall on a smarthost slow to answer
    /// QUIT); returns whether some stay open.
    async fn reap(&self, idle: Duration, wait: bool) -> bool {
        let old: Vec<Conn> = {
            let mut g = self.lock_pool();
            let (old, keep) = std::mem::take(&mut *g)
                .into_iter()
                .partition(|c| c.idle_since.elapsed() >= idle);
            *g = keep;
            old
        };
        for c in old {
            if wait {
                close(c).await;
            } else {
                tokio::spawn(close(c));
            }
        }
        !self.lock_pool().is_empty()
    }
}

/// QUIT and close, without waiting long for the reply (lettre's `abort` sends QUIT unless
/// the connection already failed, and waits for the reply without a timeout).
async fn close(mut conn: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.c.abort()).await;
}

/// What became of one recipient in one attempt.
#[derive(Debug, Clone)]
enum Outcome {
    Delivered,
    Temporary(String),
    Permanent {
        error: String,
        /// RFC 3463 status for the DSN.
        status: String,
    },
}

fn parse_addr(a: &str) -> Result<Address, String> {
    a.parse::<Address>()
        .map_err(|e| format!("address {a:?} cannot be relayed: {e}"))
}

/// The RFC 3463 status of a reply: its enhanced status code when it has one ("5.1.1"),
/// else the class ("5.0.0").
fn status_of(code: &str, text: &str) -> String {
    let enhanced = text.split_whitespace().find(|w| {
        let p: Vec<&str> = w.split('.').collect();
        p.len() == 3
            && matches!(p[0], "2" | "4" | "5")
            && p[1..]
                .iter()
                .all(|n| (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
    });
    match enhanced {
        Some(s) if s.starts_with(&code[..1]) => s.to_string(),
        _ => format!("{}.0.0", &code[..1]),
    }
}

/// The outcome an SMTP error gives the recipients it concerns.
fn outcome_of(target: &str, e: &SmtpError) -> Outcome {
    let error = format!("{target}: {e}");
    match e.status() {
        Some(code) if e.is_permanent() => {
            let status = status_of(&code.to_string(), &error);
            Outcome::Permanent { error, status }
        }
        _ => Outcome::Temporary(error),
    }
}

/// Why a transaction stopped before every recipient had a result.
enum Broken {
    /// Nothing was said about this transaction yet (a stale pooled connection closed by the
    /// smarthost, or its 421 to RSET): worth one more try on a fresh connection at once.
    Stale(String),
    /// The connection failed mid-transaction: every recipient still open gets this
    /// temporary failure.
    Failed(String),
}

/// Several commands sent in one write (RFC 2920): lettre's `command` writes the text of
/// what it is given and reads one reply; the others are read with `read_response`.
struct Group(String);

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One transaction on `conn`: the outcome of each of `to` (in order), or why the
/// connection broke. The connection stays usable unless `Err` is returned.
async fn transaction(
    relay: &Relay,
    conn: &mut Conn,
    from: Option<Address>,
    to: &[Address],
    body: &[u8],
) -> Result<Vec<Outcome>, Broken> {
    let t = relay.timeout;
    let target = relay.target.as_str();
    let reset = conn.used > 0;
    conn.used += 1;
    let info = conn.c.server_info();
    let mut params = Vec::new();
    if to
        .iter()
        .chain(from.iter())
        .any(|a: &Address| !AsRef::<str>::as_ref(a).is_ascii())
    {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            let error = format!("{target}: the smarthost does not offer SMTPUTF8, needed by the non-ASCII addresses");
            return Ok(vec![
                Outcome::Permanent {
                    error,
                    status: "5.6.7".into(),
                };
                to.len()
            ]);
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    if !body.is_ascii() {
        if !info.supports_feature(Extension::EightBitMime) {
            let error =
                format!("{target}: the smarthost does not offer 8BITMIME, needed by the content");
            return Ok(vec![
                Outcome::Permanent {
                    error,
                    status: "5.6.3".into(),
                };
                to.len()
            ]);
        }
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mut commands: Vec<String> = Vec::with_capacity(to.len() + 3);
    if reset {
        commands.push(Rset.to_string());
    }
    commands.push(Mail::new(from, params).to_string());
    for a in to {
        commands.push(Rcpt::new(a.clone(), vec![]).to_string());
    }
    commands.push(Data.to_string());
    let n_cmds = commands.len();
    let first_rcpt = n_cmds - 1 - to.len();
    // One reply per command, in order; `None` for commands not sent (no PIPELINING and
    // the transaction already over).
    let mut replies: Vec<Option<Result<(), SmtpError>>> = Vec::with_capacity(n_cmds);
    let broken = |i: usize, what: String| {
        if reset && i == 0 {
            Broken::Stale(what)
        } else {
            Broken::Failed(what)
        }
    };
    let io = |i: usize,
              r: Result<
        Result<lettre::transport::smtp::response::Response, SmtpError>,
        tokio::time::error::Elapsed,
    >|
     -> Result<Result<(), SmtpError>, Broken> {
        match r {
            Err(_) => Err(broken(i, format!("{target}: timed out"))),
            Ok(Ok(_)) => Ok(Ok(())),
            Ok(Err(e)) if e.status().is_some() => Ok(Err(e)),
            Ok(Err(e)) => Err(broken(i, format!("{target}: {e}"))),
        }
    };
    let stale_reset = |replies: &[Option<Result<(), SmtpError>>]| match replies.first() {
        // A smarthost that refuses RSET (421: going away) has said nothing about the mail.
        Some(Some(Err(e))) if reset => Err(Broken::Stale(format!("{target}: RSET: {e}"))),
        _ => Ok(()),
    };
    if conn.pipelining {
        let group = Group(commands.concat());
        replies.push(Some(io(
            0,
            tokio::time::timeout(t, conn.c.command(group)).await,
        )?));
        stale_reset(&replies)?;
        for i in 1..n_cmds {
            replies.push(Some(io(
                i,
                tokio::time::timeout(t, conn.c.read_response()).await,
            )?));
        }
    } else {
        for (i, cmd) in commands.into_iter().enumerate() {
            // Without pipelining, stop at the first reply that ends the transaction: a
            // refused RSET or MAIL, or DATA when no recipient was accepted.
            let over = replies
                .iter()
                .take(first_rcpt)
                .any(|r| matches!(r, Some(Err(_))))
                || (i == n_cmds - 1
                    && replies[first_rcpt..]
                        .iter()
                        .all(|r| matches!(r, Some(Err(_)))));
            if over {
                replies.push(None);
                continue;
            }
            replies.push(Some(io(
                i,
                tokio::time::timeout(t, conn.c.command(Group(cmd))).await,
            )?));
            stale_reset(&replies)?;
        }
    }
    if let Some(Err(e)) = &replies[first_rcpt - 1] {
        // MAIL refused: every recipient gets that answer.
        if matches!(replies[n_cmds - 1], Some(Ok(()))) {
            // DATA accepted after a refused MAIL (should not happen): never send content
            // the smarthost may take for another transaction; drop the connection.
            conn.used = usize::MAX;
        }
        return Ok(vec![outcome_of(target, e); to.len()]);
    }
    let mut outcomes: Vec<Option<Outcome>> = replies[first_rcpt..n_cmds - 1]
        .iter()
        .map(|r| match r {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(outcome_of(target, e)),
            None => Some(Outcome::Temporary(format!("{target}: not tried"))),
        })
        .collect();
    let accepted = outcomes.iter().filter(|o| o.is_none()).count();
    let data = &replies[n_cmds - 1];
    if accepted == 0 {
        if matches!(data, Some(Ok(()))) {
            // 354 with no recipient (RFC 2920 says to send "." then; dropping the
            // connection is as safe and simpler).
            conn.used = usize::MAX;
        }
        return Ok(outcomes.into_iter().flatten().collect());
    }
    let result = match data {
        Some(Ok(())) => {
            // lettre sends CRLF.CRLF after the content: its own CRLF ends our last line.
            let body = body.strip_suffix(b"\r\n").unwrap_or(body);
            let budget = t + Duration::from_secs(body.len() as u64 / 100_000);
            match tokio::time::timeout(budget, conn.c.message(body)).await {
                Err(_) => return Err(Broken::Failed(format!("{target}: timed out after DATA"))),
                Ok(Ok(_)) => Outcome::Delivered,
                Ok(Err(e)) if e.status().is_some() => outcome_of(target, &e),
                Ok(Err(e)) => return Err(Broken::Failed(format!("{target}: {e}"))),
            }
        }
        Some(Err(e)) => outcome_of(target, e),
        None => Outcome::Temporary(format!("{target}: DATA not sent")),
    };
    for o in outcomes.iter_mut() {
        o.get_or_insert_with(|| result.clone());
    }
    Ok(outcomes.into_iter().flatten().collect())
}

/// One attempt for `recipients`: their outcomes, in order. Uses a pooled connection when
/// there is one (retrying at once on a fresh one if it turns out stale), else opens one.
async fn attempt(
    relay: &Relay,
    metrics: &SmtpMetrics,
    sender: &str,
    recipients: &[String],
    content: &[u8],
) -> Vec<Outcome> {
    let local = |error: String, status: &str| Outcome::Permanent {
        error,
        status: status.into(),
    };
    let from = if sender.is_empty() {
        None
    } else {
        match parse_addr(sender) {
            Ok(a) => Some(a),
            Err(e) => return vec![local(e, "5.1.7"); recipients.len()],
        }
    };
    // An unusable address is settled alone; the others are still tried.
    let parsed: Vec<Result<Address, String>> = recipients.iter().map(|r| parse_addr(r)).collect();
    let to: Vec<Address> = parsed.iter().filter_map(|r| r.clone().ok()).collect();
    let mut results = if to.is_empty() {
        Vec::new()
    } else {
        let mut tries = 0;
        loop {
            tries += 1;
            let (mut conn, pooled) = match relay.take() {
                Some(c) => (c, true),
                None => match relay.connect(metrics).await {
                    Ok(c) => (c, false),
                    Err(e) => break vec![Outcome::Temporary(e); to.len()],
                },
            };
            SmtpMetrics::inc(&metrics.relay_transactions);
            match transaction(relay, &mut conn, from.clone(), &to, content).await {
                Ok(r) => {
                    relay.give_back(conn).await;
                    break r;
                }
                Err(Broken::Stale(e)) if pooled && tries < 3 => {
                    debug!(relay = %relay.target, error = %e, "stale pooled connection dropped");
                    close(conn).await;
                }
                Err(Broken::Stale(e) | Broken::Failed(e)) => {
                    close(conn).await;
                    break vec![Outcome::Temporary(e); to.len()];
                }
            }
        }
    }
    .into_iter();
    parsed
        .into_iter()
        .map(|p| match p {
            Ok(_) => results
                .next()
                .unwrap_or_else(|| Outcome::Temporary("no result".into())),
            Err(e) => local(e, "5.1.3"),
        })
        .collect()
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
        let mut sleep = match queue.next_due() {
            Some(t) if running.len() < relay.concurrency => {
                Duration::from_millis((t - clock.now_ms()).clamp(0, 3_600_000) as u64)
            }
            _ => Duration::from_secs(3600),
        };
        if running.is_empty() && relay.reap(IDLE_CLOSE, false).await {
            sleep = sleep.min(IDLE_CLOSE);
        }
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
    relay.reap(Duration::ZERO, true).await;
    Ok(())
}

struct Ctx {
    queue: Arc<Queue>,
    metrics: Arc<SmtpMetrics>,
    hostname: String,
    postmaster: Option<String>,
    clock: Arc<dyn Clock>,
}

/// One delivery attempt of a message to the recipients it still has, in one transaction
/// with a result per recipient: the accepted ones are recorded as done (never sent again:
/// the state file records them), those refused with 5xx are bounced at once (a DSN listing
/// only them), those refused with 4xx are retried with the backoff. The message goes to
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
    let outcomes = attempt(relay, &ctx.metrics, &meta.sender, &pending, content).await;
    for (r, o) in pending.into_iter().zip(outcomes) {
        match o {
            Outcome::Delivered => {
                delivered_now += 1;
                state.done.push(r);
            }
            Outcome::Permanent { error, status } => state.failed.push(FailedRecipient {
                recipient: r,
                error,
                status,
            }),
            Outcome::Temporary(error) => {
                temporary.get_or_insert(error);
            }
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

    #[test]
    fn status_from_the_enhanced_code_or_the_class() {
        let t = "127.0.0.1:25: permanent error (550): 5.1.1 <bad@example.net>: no such user";
        assert_eq!(status_of("550", t), "5.1.1");
        assert_eq!(
            status_of("550", "permanent error (550): no such user"),
            "5.0.0"
        );
        // A code of another class in the text is not taken.
        assert_eq!(status_of("554", "x: 4.2.1 later"), "5.0.0");
        assert_eq!(status_of("450", "x: 4.2.1 later"), "4.2.1");
    }

    #[tokio::test]
    async fn backoff_doubles_and_caps() {
        let r = Relay::new(&config(25), "h").unwrap();
        let mins: Vec<u64> = (1..=7).map(|a| r.backoff(a).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 10, 10, 10]);
    }
}
