//! SMTP sessions (RFC 5321 with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and
//! optional STARTTLS). Commands and DATA are parsed by `smtp-proto`; DATA ends only on
//! CRLF.CRLF (a bare LF.LF is content, never an end: no SMTP smuggling). Replies to
//! pipelined commands are written in one batch when the client's input is drained.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use smtp_proto::{Error as ProtoError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::rewrite::Rewriter;
use super::spool::{new_id, now_ms, Meta, Queue};
use super::{Cidr, SmtpConfig, SmtpMetrics};
use crate::registry::Registry;

/// Longest command line (RFC 5321 says 512; extensions make them longer).
const MAX_COMMAND_LINE: usize = 2048;
pub use super::UNQUALIFIED;

/// Errors after which a session is closed.
const MAX_ERRORS: u32 = 20;
/// Time sessions in progress get after shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// What every session reads.
pub struct Shared {
    cfg: SmtpConfig,
    hostname: String,
    networks: Vec<Cidr>,
    registry: Registry,
    queue: Arc<Queue>,
    metrics: Arc<SmtpMetrics>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    rewriter: Arc<Rewriter>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

impl Shared {
    pub fn new(
        cfg: SmtpConfig,
        hostname: String,
        registry: Registry,
        queue: Arc<Queue>,
        metrics: Arc<SmtpMetrics>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        rewriter: Arc<Rewriter>,
    ) -> Self {
        let networks = cfg.allow.iter().filter_map(|n| Cidr::parse(n)).collect();
        Self {
            cfg,
            hostname,
            networks,
            registry,
            queue,
            metrics,
            tls,
            rewriter,
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// Configured networks, or an enrolled agent's ACCEPTED address (the registry applies
    /// the address policy, `crate::addresses`: a mere claim never opens the relay).
    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.networks.iter().any(|n| n.contains(ip)) {
            return true;
        }
        self.cfg.allow_agents
            && self
                .registry
                .snapshot()
                .active()
                .any(|a| a.addresses.iter().any(|x| x.to_canonical() == ip))
    }
}

/// Loads the bastion's certificate and key for STARTTLS.
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server certificate and key")?;
    Ok(cfg)
}

struct ClientSlot<'a> {
    shared: &'a Shared,
    ip: IpAddr,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut g = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until `shutdown`, then gives sessions a short grace.
pub async fn serve(
    shared: Arc<Shared>,
    listener: crate::listeners::TcpListeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addrs();
    info!(listen = ?addr, hostname = %shared.hostname, "smtp relay listening");
    let limit = Arc::new(Semaphore::new(shared.cfg.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = crate::listeners::accept(&listener, "smtp") => c,
        };
        SmtpMetrics::inc(&shared.metrics.connections);
        let _ = stream.set_nodelay(true);
        let permit = limit.clone().try_acquire_owned();
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            let Ok(_permit) = permit else {
                SmtpMetrics::inc(&shared.metrics.refused_limit);
                reject(
                    stream,
                    "421 4.7.0 Too many connections, try again later\r\n",
                )
                .await;
                return;
            };
            session(&shared, stream, peer, shutdown).await;
        });
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("smtp: sessions still open after the grace period: cut (unacknowledged mail is not kept)");
    }
    Ok(())
}

async fn reject(mut stream: TcpStream, reply: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn session(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let ip = peer.ip().to_canonical();
    if !shared.allowed(ip) {
        SmtpMetrics::inc(&shared.metrics.refused_client);
        warn!(client = %ip, "smtp: client not allowed to relay: refused");
        reject(
            stream,
            &format!(
                "554 5.7.1 {} ESMTP: {ip} is not allowed to relay\r\n",
                shared.hostname
            ),
        )
        .await;
        return;
    }
    let over = {
        let mut g = shared.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(ip).or_insert(0);
        if *n >= shared.cfg.max_connections_per_client {
            true
        } else {
            *n += 1;
            false
        }
    };
    if over {
        SmtpMetrics::inc(&shared.metrics.refused_limit);
        reject(
            stream,
            "421 4.7.0 Too many connections from your address\r\n",
        )
        .await;
        return;
    }
    let _slot = ClientSlot { shared, ip };
    let mut s = Session {
        shared,
        peer: ip,
        helo: None,
        esmtp: false,
        tls: false,
        from: None,
        rcpts: Vec::new(),
        out: Vec::with_capacity(512),
        errors: 0,
    };
    if let Err(e) = s.run(Box::new(stream), shutdown).await {
        debug!(client = %ip, error = %format!("{e:#}"), "smtp session ended");
    }
}

enum Mode {
    Command,
    /// Discarding the rest of an over-long command line.
    SkipLine,
    Data(Box<DataState>),
}

struct DataState {
    rx: DataReceiver,
    discard: Option<DummyDataReceiver>,
    buf: Vec<u8>,
    too_big: bool,
    line_len: usize,
    long_line: bool,
    deadline: Instant,
    /// The last (up to 5) bytes of DATA input consumed, to check the terminator exactly.
    tail: Vec<u8>,
}

/// The only end of DATA (RFC 5321 4.1.1.4).
const END_OF_DATA: &[u8] = b"\r\n.\r\n";

enum Next {
    Continue,
    Quit,
    StartTls,
    Data,
}

struct Session<'a> {
    shared: &'a Shared,
    peer: IpAddr,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    from: Option<String>,
    rcpts: Vec<String>,
    out: Vec<u8>,
    errors: u32,
}

fn valid_addr_text(a: &str) -> bool {
    a.len() <= 320 && !a.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl Session<'_> {
    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn error(&mut self, text: &str) {
        SmtpMetrics::inc(&self.shared.metrics.refused_syntax);
        self.errors += 1;
        self.reply(text);
    }

    fn reset(&mut self) {
        self.from = None;
        self.rcpts.clear();
    }

    async fn flush(&mut self, io: &mut Box<dyn Io>) -> Result<()> {
        if !self.out.is_empty() {
            let t = self.shared.cfg.command_timeout;
            tokio::time::timeout(t, io.write_all(&self.out))
                .await
                .context("write timeout")??;
            tokio::time::timeout(t, io.flush())
                .await
                .context("write timeout")??;
            self.out.clear();
        }
        Ok(())
    }

    async fn run(&mut self, mut io: Box<dyn Io>, shutdown: CancellationToken) -> Result<()> {
        let cfg = &self.shared.cfg;
        self.reply(&format!("220 {} ESMTP Bastide", self.shared.hostname));
        let mut line: Vec<u8> = Vec::with_capacity(256);
        let mut mode = Mode::Command;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.flush(&mut io).await?;
            if self.errors >= MAX_ERRORS {
                self.reply("421 4.7.0 Too many errors, closing");
                self.flush(&mut io).await?;
                return Ok(());
            }
            let n = match &mode {
                Mode::Data(d) => {
                    match tokio::time::timeout_at(d.deadline, io.read(&mut buf)).await {
                        Ok(r) => r?,
                        Err(_) => {
                            SmtpMetrics::inc(&self.shared.metrics.refused_timeout);
                            info!(client = %self.peer, "smtp: DATA timeout: message discarded");
                            self.reply("421 4.4.2 Timeout during DATA, closing");
                            self.flush(&mut io).await?;
                            return Ok(());
                        }
                    }
                }
                _ => {
                    tokio::select! {
                        r = tokio::time::timeout(cfg.command_timeout, io.read(&mut buf)) => match r {
                            Ok(r) => r?,
                            Err(_) => {
                                SmtpMetrics::inc(&self.shared.metrics.refused_timeout);
                                self.reply("421 4.4.2 Timeout, closing");
                                self.flush(&mut io).await?;
                                return Ok(());
                            }
                        },
                        _ = shutdown.cancelled() => {
                            self.reply("421 4.3.2 Service shutting down, try again later");
                            self.flush(&mut io).await?;
                            return Ok(());
                        }
                    }
                }
            };
            if n == 0 {
                if matches!(mode, Mode::Data(_)) {
                    info!(client = %self.peer, "smtp: client disconnected during DATA: message discarded");
                }
                return Ok(());
            }
            let mut iter = buf[..n].iter();
            while !iter.as_slice().is_empty() {
                match &mut mode {
                    Mode::SkipLine => {
                        let rest = iter.as_slice();
                        match rest.iter().position(|&b| b == b'\n') {
                            Some(p) => {
                                iter = rest[p + 1..].iter();
                                mode = Mode::Command;
                            }
                            None => iter = [].iter(),
                        }
                    }
                    Mode::Data(d) => {
                        if self.ingest_data(d, &mut iter) {
                            let Mode::Data(d) = std::mem::replace(&mut mode, Mode::Command) else {
                                continue;
                            };
                            if d.tail != END_OF_DATA {
                                // smtp-proto also ends DATA on CRLF "." CR... CR LF, and on a
                                // first line "." after a bare-LF DATA; Postfix and the relay's
                                // smarthost do not, so what follows would be
                                // read as commands here and as content there (smuggling).
                                // Refused, and the session closed, as Postfix does for bare
                                // newlines (smtpd_forbid_bare_newline).
                                SmtpMetrics::inc(&self.shared.metrics.refused_syntax);
                                warn!(client = %self.peer,
                                    "smtp: DATA ended by a line \".\" not within <CR><LF>.<CR><LF> (extra <CR>s, or right after a bare-LF DATA): message refused, connection closed");
                                self.from = None;
                                self.rcpts.clear();
                                self.reply("521 5.5.2 Error: malformed end of data: only <CR><LF>.<CR><LF> ends a message; closing");
                                self.flush(&mut io).await?;
                                let _ = io.shutdown().await;
                                return Ok(());
                            }
                            self.finish_data(*d).await;
                        }
                    }
                    Mode::Command => {
                        let rest = iter.as_slice();
                        let Some(p) = rest.iter().position(|&b| b == b'\n') else {
                            if line.len() + rest.len() > MAX_COMMAND_LINE {
                                self.error("500 5.5.2 Line too long");
                                line.clear();
                                mode = Mode::SkipLine;
                            } else {
                                line.extend_from_slice(rest);
                            }
                            iter = [].iter();
                            continue;
                        };
                        iter = rest[p + 1..].iter();
                        if line.len() + p + 1 > MAX_COMMAND_LINE {
                            self.error("500 5.5.2 Line too long");
                            line.clear();
                            continue;
                        }
                        line.extend_from_slice(&rest[..=p]);
                        let crlf = line.ends_with(b"\r\n");
                        let parsed = {
                            let qualified = qualify_local(&line);
                            Request::parse(&mut qualified.iter()).map(Request::into_owned)
                        };
                        line.clear();
                        let req = match parsed {
                            Ok(r) => r,
                            Err(e) => {
                                let text = proto_error(&e);
                                self.error(&text);
                                continue;
                            }
                        };
                        match self.command(req) {
                            Next::Continue => {}
                            Next::Quit => {
                                self.flush(&mut io).await?;
                                let _ = io.shutdown().await;
                                return Ok(());
                            }
                            Next::Data => {
                                let mut rx = DataReceiver::new();
                                // Prime the receiver as if after a CRLF, so that a first
                                // line "." ends the message and ".." is unstuffed.
                                let mut scratch = Vec::new();
                                rx.ingest(&mut b"\r\n".iter(), &mut scratch);
                                mode = Mode::Data(Box::new(DataState {
                                    rx,
                                    discard: None,
                                    buf: Vec::with_capacity(8192),
                                    too_big: false,
                                    line_len: 0,
                                    long_line: false,
                                    deadline: Instant::now() + cfg.data_timeout,
                                    // A DATA command ended by a bare LF: a first line
                                    // "." was not preceded by CRLF, so it is no end.
                                    tail: if crlf {
                                        b"\r\n".to_vec()
                                    } else {
                                        b"\n".to_vec()
                                    },
                                }));
                            }
                            Next::StartTls => {
                                self.flush(&mut io).await?;
                                if !iter.as_slice().is_empty() {
                                    // RFC 3207: nothing sent before the handshake counts.
                                    warn!(client = %self.peer, "smtp: data pipelined after STARTTLS discarded");
                                }
                                let Some(acceptor) = self.shared.tls.clone() else {
                                    return Ok(());
                                };
                                let tls =
                                    tokio::time::timeout(cfg.command_timeout, acceptor.accept(io))
                                        .await
                                        .context("TLS handshake timeout")?
                                        .context("TLS handshake")?;
                                io = Box::new(tls);
                                self.tls = true;
                                self.helo = None;
                                self.reset();
                                line.clear();
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Feeds DATA bytes; true when the terminating CRLF.CRLF was seen.
    fn ingest_data(&mut self, d: &mut DataState, iter: &mut std::slice::Iter<'_, u8>) -> bool {
        let input = iter.as_slice();
        let done = self.ingest_data_bytes(d, iter);
        let used = &input[..input.len() - iter.as_slice().len()];
        d.tail
            .extend_from_slice(&used[used.len().saturating_sub(END_OF_DATA.len())..]);
        let extra = d.tail.len().saturating_sub(END_OF_DATA.len());
        d.tail.drain(..extra);
        done
    }

    fn ingest_data_bytes(
        &mut self,
        d: &mut DataState,
        iter: &mut std::slice::Iter<'_, u8>,
    ) -> bool {
        if let Some(discard) = d.discard.as_mut() {
            return discard.ingest(iter);
        }
        let before = d.buf.len();
        let done = d.rx.ingest(iter, &mut d.buf);
        if track_lines(
            &d.buf,
            before,
            &mut d.line_len,
            self.shared.cfg.max_line_length,
        ) {
            d.long_line = true;
        }
        if d.buf.len() > self.shared.cfg.max_message_size {
            d.too_big = true;
            d.discard = Some(DummyDataReceiver::new_data(&d.rx));
            d.buf = Vec::new();
        }
        done
    }

    async fn finish_data(&mut self, d: DataState) {
        let (from, rcpts) = (
            self.from.take().unwrap_or_default(),
            std::mem::take(&mut self.rcpts),
        );
        if d.too_big {
            SmtpMetrics::inc(&self.shared.metrics.refused_size);
            info!(client = %self.peer, "smtp: message over the size limit refused");
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return;
        }
        if d.long_line {
            SmtpMetrics::inc(&self.shared.metrics.refused_line_length);
            info!(client = %self.peer, "smtp: message with an over-long line refused");
            self.reply(&format!(
                "500 5.5.6 Message has a line longer than {} characters",
                self.shared.cfg.max_line_length
            ));
            return;
        }
        let id = new_id();
        let rw = &self.shared.rewriter;
        let sender = rw.sender(&from);
        let mut body = d.buf;
        if sender != from {
            if let Some(b) = rw.header_from(&body) {
                body = b;
            }
        }
        let proto = match (self.esmtp, self.tls) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let helo = self.helo.clone().unwrap_or_default();
        let for_clause = match rcpts.as_slice() {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        let received = format!(
            "Received: from {helo} ([{}])\r\n\tby {} (Bastide) with {proto} id {id}{for_clause};\r\n\t{}\r\n",
            self.peer,
            self.shared.hostname,
            rfc5322_date(crate::unix_now())
        );
        let mut content = Vec::with_capacity(received.len() + body.len());
        content.extend_from_slice(received.as_bytes());
        content.extend_from_slice(&body);
        let size = content.len();
        let meta = Meta {
            id: id.clone(),
            arrived_ms: now_ms(),
            client: self.peer.to_string(),
            helo,
            sender: sender.clone(),
            recipients: rcpts,
            size,
        };
        match self.shared.queue.submit(meta, &content).await {
            Ok(()) => {
                let m = &self.shared.metrics;
                SmtpMetrics::inc(&m.accepted);
                m.accepted_bytes.fetch_add(size as u64, Ordering::Relaxed);
                info!(id = %id, client = %self.peer, from = %sender, size, "smtp: message queued");
                self.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(e) => {
                SmtpMetrics::inc(&self.shared.metrics.spool_errors);
                warn!(client = %self.peer, error = %format!("{e:#}"), "smtp: cannot spool a message");
                if super::spool::is_disk_full(&e) {
                    self.reply("452 4.3.1 Insufficient system storage: message not queued, try again later");
                } else {
                    self.reply(
                        "451 4.3.0 Local error in processing: message not queued, try again",
                    );
                }
            }
        }
    }

    fn command(&mut self, req: Request<String>) -> Next {
        let cfg = &self.shared.cfg;
        match req {
            Request::Ehlo { host } => {
                self.reset();
                self.helo = Some(host);
                self.esmtp = true;
                let mut lines = vec![
                    self.shared.hostname.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", cfg.max_message_size),
                    "8BITMIME".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.shared.tls.is_some() && !self.tls {
                    lines.push("STARTTLS".into());
                }
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                }
            }
            Request::Helo { host } => {
                self.reset();
                self.helo = Some(host);
                self.esmtp = false;
                self.reply(&format!("250 {}", self.shared.hostname));
            }
            Request::Lhlo { .. } => self.error("500 5.5.1 Error: LMTP is not spoken here"),
            Request::Mail { from } => {
                if self.helo.is_none() {
                    self.error("503 5.5.1 Error: send HELO/EHLO first");
                } else if self.from.is_some() {
                    self.error("503 5.5.1 Error: nested MAIL command");
                } else if from.size > cfg.max_message_size {
                    SmtpMetrics::inc(&self.shared.metrics.refused_size);
                    self.reply("552 5.3.4 Message size exceeds fixed limit");
                } else if !self.shared.queue.has_room(from.size as u64) {
                    warn!(client = %self.peer, spool = %self.shared.queue.root().display(), "smtp: spool filesystem full: mail refused with 452");
                    self.reply("452 4.3.1 Insufficient system storage, try again later");
                } else if !valid_addr_text(&from.address) {
                    self.error("501 5.1.7 Bad sender address syntax");
                } else if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
                    self.error("504 5.5.4 BODY=BINARYMIME is not supported");
                } else {
                    self.from = Some(from.address);
                    self.reply("250 2.1.0 Ok");
                }
            }
            Request::Rcpt { to } => {
                if self.from.is_none() {
                    self.error("503 5.5.1 Error: need MAIL command");
                } else if self.rcpts.len() >= cfg.max_recipients {
                    SmtpMetrics::inc(&self.shared.metrics.refused_limit);
                    self.reply("452 4.5.3 Error: too many recipients");
                } else if !valid_addr_text(&to.address) {
                    self.error("501 5.1.3 Bad recipient address syntax");
                } else {
                    // smtp-proto gives `<postmaster>` as "".
                    let addr = if to.address.is_empty() {
                        format!("postmaster@{UNQUALIFIED}")
                    } else {
                        to.address
                    };
                    match self.shared.rewriter.recipient(&addr) {
                        None => {
                            SmtpMetrics::inc(&self.shared.metrics.refused_recipient);
                            self.reply("550 5.1.3 Recipient address has no domain and no smtp.admin_address is configured");
                        }
                        Some(r) if !self.domain_allowed(&r) => {
                            SmtpMetrics::inc(&self.shared.metrics.refused_recipient);
                            info!(client = %self.peer, rcpt = %r, "smtp: recipient domain not allowed");
                            self.reply(
                                "550 5.7.1 Relay access denied: recipient domain not allowed",
                            );
                        }
                        Some(r) => {
                            if !self.rcpts.contains(&r) {
                                self.rcpts.push(r);
                            }
                            self.reply("250 2.1.5 Ok");
                        }
                    }
                }
            }
            Request::Data => {
                if self.from.is_none() {
                    self.error("503 5.5.1 Error: need MAIL command");
                } else if self.rcpts.is_empty() {
                    self.error("554 5.5.1 Error: no valid recipients");
                } else {
                    self.reply("354 End data with <CR><LF>.<CR><LF>");
                    return Next::Data;
                }
            }
            Request::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Request::Noop { .. } => self.reply("250 2.0.0 Ok"),
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                return Next::Quit;
            }
            Request::Vrfy { .. } => self.error("502 5.5.1 VRFY command is disabled"),
            Request::Expn { .. } => self.error("502 5.5.1 EXPN command is disabled"),
            Request::Help { .. } => self.reply("214 2.0.0 See RFC 5321"),
            Request::StartTls => {
                if self.shared.tls.is_none() {
                    self.error("502 5.5.1 STARTTLS is not offered");
                } else if self.tls {
                    self.error("503 5.5.1 Error: TLS already active");
                } else {
                    self.reply("220 2.0.0 Ready to start TLS");
                    return Next::StartTls;
                }
            }
            Request::Auth { .. } => {
                self.error("502 5.5.1 AUTH is not offered: access is by network")
            }
            Request::Bdat { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error("502 5.5.1 Command not implemented"),
        }
        Next::Continue
    }

    fn domain_allowed(&self, rcpt: &str) -> bool {
        let list = &self.shared.cfg.allow_recipient_domains;
        if list.is_empty() {
            return true;
        }
        let Some((_, d)) = rcpt.rsplit_once('@') else {
            return false;
        };
        list.iter().any(|a| a.eq_ignore_ascii_case(d))
    }
}

/// Not an API: one session over any byte stream, without the listener (whose allow-list
/// and per-client limits do not apply). The `smtp_session` fuzz target's entry point.
#[doc(hidden)]
pub async fn session_over<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    shared: &Shared,
    io: T,
    peer: IpAddr,
) -> Result<()> {
    let mut s = Session {
        shared,
        peer,
        helo: None,
        esmtp: false,
        tls: false,
        from: None,
        rcpts: Vec::new(),
        out: Vec::with_capacity(512),
        errors: 0,
    };
    s.run(Box::new(io), CancellationToken::new()).await
}

/// Line-length accounting of the bytes `DataReceiver::ingest` appended to `buf` after
/// `before`; true when a line is longer than `max_line`. The receiver can also take back a
/// byte it appended in an earlier call (the CR of the final CRLF.CRLF when the LF arrives in
/// a later read), so `buf` may be shorter than `before`: the `smtp_session` fuzzer found the
/// slice `buf[before..]` panicking on a session sent one byte per read.
fn track_lines(buf: &[u8], before: usize, line_len: &mut usize, max_line: usize) -> bool {
    let mut long = false;
    for &b in buf.get(before..).unwrap_or_default() {
        if b == b'\n' {
            *line_len = 0;
        } else {
            *line_len += 1;
            // The CR of CRLF is not part of the line.
            if *line_len > max_line + 1 {
                long = true;
            }
        }
    }
    long
}

/// `MAIL FROM:<root>` / `RCPT TO:<root>`: VMs' system mail often has no domain, which
/// RFC 5321 parsers refuse; give it the [`UNQUALIFIED`] marker domain.
fn qualify_local(line: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let upper: Vec<u8> = line.iter().take(10).map(u8::to_ascii_uppercase).collect();
    if !(upper.starts_with(b"RCPT TO:") || upper.starts_with(b"MAIL FROM:")) {
        return line.into();
    }
    let (Some(l), Some(r)) = (
        line.iter().position(|&b| b == b'<'),
        line.iter().position(|&b| b == b'>'),
    ) else {
        return line.into();
    };
    if r <= l + 1 {
        return line.into();
    }
    let inner = &line[l + 1..r];
    let local_part = inner
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._+".contains(b));
    if !local_part || inner.eq_ignore_ascii_case(b"postmaster") {
        return line.into();
    }
    let mut out = Vec::with_capacity(line.len() + UNQUALIFIED.len() + 1);
    out.extend_from_slice(&line[..r]);
    out.push(b'@');
    out.extend_from_slice(UNQUALIFIED.as_bytes());
    out.extend_from_slice(&line[r..]);
    out.into()
}

fn proto_error(e: &ProtoError) -> String {
    match e {
        ProtoError::UnknownCommand => "500 5.5.2 Error: command not recognized".into(),
        ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".into(),
        ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".into(),
        ProtoError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
        ProtoError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param:?}"),
        ProtoError::UnsupportedParameter { param } => {
            let p: String = param.chars().filter(|c| !c.is_control()).take(64).collect();
            format!("555 5.5.4 Unsupported parameter {p:?}")
        }
        _ => "500 5.5.2 Error: bad syntax".into(),
    }
}

/// An RFC 5322 date in UTC: "Fri, 27 Nov 2026 01:16:51 +0000".
pub fn rfc5322_date(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let wd = match t.weekday() {
        time::Weekday::Monday => "Mon",
        time::Weekday::Tuesday => "Tue",
        time::Weekday::Wednesday => "Wed",
        time::Weekday::Thursday => "Thu",
        time::Weekday::Friday => "Fri",
        time::Weekday::Saturday => "Sat",
        time::Weekday::Sunday => "Sun",
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS
        .get(usize::from(u8::from(t.month())).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{wd}, {:02} {m} {} {:02}:{:02}:{:02} +0000",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut rx = DataReceiver::new();
        let mut buf = Vec::new();
        rx.ingest(&mut b"\r\n".iter(), &mut buf);
        buf.clear();
        for c in chunks {
            let mut it = c.iter();
            if rx.ingest(&mut it, &mut buf) {
                return (buf, true);
            }
        }
        (buf, false)
    }

    #[test]
    fn data_end_and_unstuffing() {
        assert_eq!(feed(&[b".\r\n"]), (vec![], true));
        assert_eq!(feed(&[b"..a\r\n.\r\n"]), (b".a\r\n".to_vec(), true));
        assert_eq!(feed(&[b"a\r\n.", b"\r", b"\n"]), (b"a\r\n".to_vec(), true));
        // Smuggling attempts: bare LF around the dot never end DATA.
        assert!(!feed(&[b"a\n.\nMAIL FROM:<x@y>\n"]).1);
        assert!(!feed(&[b"a\r\n.\nb"]).1);
        assert!(!feed(&[b"a\n.\r\nb"]).1);
    }

    /// fuzz/seeds/smtp_session/bytewise: DATA sent one byte per read; the end of data
    /// shrinks the buffer under the previous length.
    #[test]
    fn data_one_byte_per_read_does_not_panic() {
        let mut rx = DataReceiver::new();
        let mut buf = Vec::new();
        rx.ingest(&mut b"\r\n".iter(), &mut buf);
        buf.clear();
        let (mut line_len, mut long, mut done) = (0usize, false, false);
        for b in b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n" {
            let before = buf.len();
            done = rx.ingest(&mut std::slice::from_ref(b).iter(), &mut buf);
            long |= track_lines(&buf, before, &mut line_len, 200);
        }
        assert!(done);
        assert!(!long);
        assert_eq!(buf, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
        let mut n = 0;
        assert!(track_lines(b"0123456789\r", 0, &mut n, 5));
        assert!(!track_lines(b"ab", 5, &mut n, 5));
    }

    #[test]
    fn date_format() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.1")
            .unwrap()
            .contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }
}
