//! The agents' endpoint under attack (issue 16, points 3 to 5): revocation raced by
//! handshakes in flight, strangers holding certificate-less connections, and an enrolled VM
//! looping on certificate renewal. Real `bastide` and `bastide-agent` binaries on loopback;
//! the attackers are small clients written here with the agent's own certificate and key.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bastide_agent::tls::{connect, enroll_config, mtls_config, PinVerifier};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::enrollment_client::EnrollmentClient;
use bastide_proto::v1::{
    agent_message, bastion_message, AgentMessage, EnrollRequest, Heartbeat, RegisterRequest,
    RenewRequest,
};
use bastide_tests::{Agent, Bastion};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

fn rt() -> tokio::runtime::Runtime {
    bastide_agent::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// The mutual-TLS client configuration of an enrolled agent, from its state directory.
fn agent_tls(agent: &Agent) -> rustls::ClientConfig {
    let dir = agent.state_dir();
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    mtls_config(ca, vec![cert], key).unwrap()
}

/// A gRPC channel over one already open stream (no reconnection: a second dial fails).
async fn channel_over<IO>(io: IO) -> Result<Channel, tonic::transport::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(io)));
    Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = slot.lock().unwrap().take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("this test channel does not reconnect"))
            }
        }))
        .await
}

fn heartbeat(seq: u64) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
            seq,
            agent_time_unix: 0,
            no_ack: false,
        })),
    }
}

/// Runs a session on `client`: a heartbeat every 50 ms, recording when each ack arrives,
/// until the stream ends. Errors (a refused session) end it at once.
async fn heartbeat_session(
    mut client: AgentClient<Channel>,
    last_ack: Arc<Mutex<Option<Instant>>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if tx.send(heartbeat(1)).await.is_err() {
        return;
    }
    let Ok(resp) = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut inbound = resp.into_inner();
    let mut seq = 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), inbound.message()).await {
            Ok(Ok(Some(_))) => *last_ack.lock().unwrap() = Some(Instant::now()),
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seq += 1;
        if tx.send(heartbeat(seq)).await.is_err() {
            return;
        }
    }
}

/// A connection outlives nothing: an agent holding a session past its certificate's expiry
/// (it did not renew) is cut within about a second of it, not at its next reconnection, and
/// the same certificate then opens nothing.
#[test]
fn a_live_connection_is_cut_when_its_certificate_expires() {
    let mut b = Bastion::init("proj");
    b.edit_config(|c| c.replace("cert_lifetime = \"24h\"", "cert_lifetime = \"5s\""));
    b.start();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let not_after = b.agent("web01").unwrap()["cert_not_after"]
        .as_i64()
        .unwrap();
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let rt = rt();
    let (last_ack, ended) = rt.block_on(async {
        let ch = connect(&b.agents_addr, "127.0.0.1", agent_tls(&a))
            .await
            .unwrap();
        let mut client = AgentClient::new(ch);
        client.register(RegisterRequest::default()).await.unwrap();
        let last = Arc::new(Mutex::new(None));
        tokio::time::timeout(
            Duration::from_secs(15),
            heartbeat_session(client, last.clone()),
        )
        .await
        .expect("the session outlived its certificate by 10 s");
        let ended = unix();
        let last_ack = last
            .lock()
            .unwrap()
            .map(|t: Instant| ended - t.elapsed().as_secs_f64());
        (last_ack, ended)
    });
    let last_ack = last_ack.expect("no heartbeat was acknowledged");
    // Valid through its notAfter second: acknowledged until then, cut within two seconds
    // after it (the sweep runs every second; one more for a loaded machine).
    assert!(
        last_ack >= not_after as f64 - 0.5,
        "cut before expiry: last ack at {last_ack}, notAfter {not_after}"
    );
    assert!(
        ended <= not_after as f64 + 3.0,
        "cut too late: at {ended}, notAfter {not_after}"
    );
    assert!(
        bastide_tests::wait_for(Duration::from_secs(5), || b
            .log_text()
            .contains("certificate expired")
            .then_some(()))
        .is_some(),
        "no cut logged:\n{}",
        b.log_text()
    );
    // The expired certificate opens nothing new.
    let refused = rt.block_on(async {
        match connect(&b.agents_addr, "127.0.0.1", agent_tls(&a)).await {
            Err(_) => true,
            Ok(ch) => AgentClient::new(ch)
                .register(RegisterRequest::default())
                .await
                .is_err(),
        }
    });
    assert!(refused, "an expired certificate registered");
}

/// Agents ask for one heartbeat acknowledgement in three (issue 18): a heartbeat marked
/// `no_ack` gets none, the others still do, in order, and the session stays open.
#[test]
fn heartbeats_that_ask_for_no_ack_get_none_and_keep_the_session() {
    let mut b = Bastion::init("proj");
    b.start();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let rt = rt();
    rt.block_on(async {
        let ch = connect(&b.agents_addr, "127.0.0.1", agent_tls(&a))
            .await
            .unwrap();
        let mut client = AgentClient::new(ch);
        client.register(RegisterRequest::default()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let beat = |seq: u64, no_ack: bool| AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                seq,
                agent_time_unix: 0,
                no_ack,
            })),
        };
        tx.send(beat(1, false)).await.unwrap();
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let next_ack = |m: Option<bastide_proto::v1::BastionMessage>| match m.and_then(|m| m.kind) {
            Some(bastion_message::Kind::HeartbeatAck(ack)) => ack.seq,
            other => panic!("expected a heartbeat acknowledgement, got {other:?}"),
        };
        let wait = Duration::from_secs(5);
        let first = tokio::time::timeout(wait, inbound.message()).await;
        assert_eq!(next_ack(first.unwrap().unwrap()), 1);
        for seq in 2..=5 {
            tx.send(beat(seq, true)).await.unwrap();
        }
        // Nothing comes back for the four that asked for nothing...
        assert!(
            tokio::time::timeout(Duration::from_millis(700), inbound.message())
                .await
                .is_err(),
            "a heartbeat marked no_ack was acknowledged"
        );
        // ...and the next one that asks is answered on the same session.
        tx.send(beat(6, false)).await.unwrap();
        let sixth = tokio::time::timeout(wait, inbound.message()).await;
        assert_eq!(next_ack(sixth.unwrap().unwrap()), 6);
        let list = tokio::task::block_in_place(|| b.cli_ok(&["agents", "list", "--json"]));
        assert!(list.contains("\"online\""), "{list}");
    });
}

// ---- Point 3: revocation cannot be outrun ----

/// A TLS client whose last encrypted record (the end of its Finished message) is held back
/// by a relay until released, so that the bastion has checked the client certificate but
/// not completed the handshake: the widest form of the race between a handshake and a
/// revocation, made deterministic.
struct HeldHandshake {
    /// Encrypted records the relay may forward; `usize::MAX`: all.
    allow: tokio::sync::watch::Sender<usize>,
    queued: Arc<AtomicUsize>,
}

impl HeldHandshake {
    async fn start(
        addr: &str,
        mut cfg: rustls::ClientConfig,
    ) -> (
        Self,
        tokio::task::JoinHandle<
            std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>>,
        >,
    ) {
        // Small records: the client's last flight (certificate, its signature, Finished)
        // spans many records, the last of which holds only the end of Finished. A full
        // handshake: a resumed one would not send the certificate.
        cfg.max_fragment_size = Some(64);
        cfg.resumption = rustls::client::Resumption::disabled();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (client_io, relay_io) = tokio::io::duplex(256 * 1024);
        let (mut tcp_r, mut tcp_w) = tcp.into_split();
        let (mut relay_r, mut relay_w) = tokio::io::split(relay_io);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tcp_r, &mut relay_w).await;
            let _ = relay_w.shutdown().await;
        });
        let (allow, mut allowed) = tokio::sync::watch::channel(0usize);
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            let mut held: VecDeque<Vec<u8>> = VecDeque::new();
            let mut sent_encrypted = 0usize;
            let mut chunk = [0u8; 16 * 1024];
            let mut client_open = true;
            loop {
                // Forward what the gate allows, in order.
                while let Some(rec) = held.front() {
                    let encrypted = rec[0] == 23;
                    if encrypted && sent_encrypted >= *allowed.borrow() {
                        break;
                    }
                    if tcp_w.write_all(rec).await.is_err() {
                        return;
                    }
                    if encrypted {
                        sent_encrypted += 1;
                    }
                    held.pop_front();
                }
                tokio::select! {
                    r = relay_r.read(&mut chunk), if client_open => match r {
                        Ok(0) | Err(_) => client_open = false,
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            while buf.len() >= 5 {
                                let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
                                if buf.len() < 5 + len {
                                    break;
                                }
                                let rec: Vec<u8> = buf.drain(..5 + len).collect();
                                if rec[0] == 23 {
                                    q.fetch_add(1, Ordering::SeqCst);
                                }
                                held.push_back(rec);
                            }
                        }
                    },
                    r = allowed.changed() => if r.is_err() { return },
                }
            }
        });
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let connector = TlsConnector::from(Arc::new(cfg));
        let handshake = tokio::spawn(async move { connector.connect(name, client_io).await });
        (Self { allow, queued }, handshake)
    }

    /// Lets everything through but the last encrypted record seen so far.
    fn release_all_but_last(&self) {
        let n = self.queued.load(Ordering::SeqCst);
        self.allow.send_replace(n.saturating_sub(1));
    }

    fn release(&self) {
        self.allow.send_replace(usize::MAX);
    }
}

#[test]
fn revocation_during_handshakes_leaves_no_connection_alive() {
    let mut b = Bastion::init("proj");
    // Sixty handshakes at once from one address are this test's doing, not a stranger's.
    b.edit_config(|c| {
        c.replace(
            "max_unauthenticated_per_address = 32",
            "max_unauthenticated_per_address = 1000",
        )
    });
    b.start();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let rt = rt();
    let addr = b.agents_addr.clone();
    let tls = agent_tls(&a);
    rt.block_on(async {
        // 1. Many parallel connections with the same certificate, each handshaking anew in
        // a loop and holding a session with heartbeats.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut acks: Vec<Arc<Mutex<Option<Instant>>>> = Vec::new();
        let mut loops = Vec::new();
        for _ in 0..50 {
            let last = Arc::new(Mutex::new(None));
            acks.push(last.clone());
            let (addr, tls, stop) = (addr.clone(), tls.clone(), stop.clone());
            loops.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(ch) = connect(&addr, "127.0.0.1", tls.clone()).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let mut client = AgentClient::new(ch);
                    let _ = client.register(RegisterRequest::default()).await;
                    // A session of a few heartbeats, then a fresh handshake.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(300),
                        heartbeat_session(client, last.clone()),
                    )
                    .await;
                }
            }));
        }
        // Let the loops run until sessions answer (a loaded machine is slow to start 50).
        let acks_now = acks.clone();
        let started = tokio::task::block_in_place(|| {
            bastide_tests::wait_for(Duration::from_secs(30), || {
                acks_now
                    .iter()
                    .any(|a| a.lock().unwrap().is_some())
                    .then_some(())
            })
        });
        assert!(started.is_some(), "no session ever got a heartbeat ack");

        // 2. Handshakes held just before their end: certificate checked, Finished not sent.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(HeldHandshake::start(&addr, tls.clone()).await);
        }
        // The client side of a TLS 1.3 handshake ends when it has written its Finished.
        let mut streams = Vec::new();
        for (_, hs) in held.iter_mut() {
            streams.push(
                tokio::time::timeout(Duration::from_secs(10), hs)
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (h, _) in &held {
            assert!(h.queued.load(Ordering::SeqCst) >= 2, "final flight not split");
            h.release_all_but_last();
        }
        // Time for the bastion to read the certificates (and check their serial).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // 3. Revoke in the middle of it all.
        let b2 = &b;
        let out = tokio::task::block_in_place(|| b2.cli(&["agents", "revoke", "web01"]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let revoked_at = Instant::now();
        // The held handshakes complete now, after the revocation.
        for (h, _) in &held {
            h.release();
        }
        let mut held_sessions = Vec::new();
        for s in streams {
            let last = Arc::new(Mutex::new(None));
            acks.push(last.clone());
            held_sessions.push(tokio::spawn(async move {
                if let Ok(ch) = channel_over(s).await {
                    heartbeat_session(AgentClient::new(ch), last).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::SeqCst);
        let deadline = revoked_at + Duration::from_secs(1);
        let survivors: Vec<_> = acks
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.lock().unwrap().filter(|t| *t > deadline).map(|t| (i, t - revoked_at)))
            .collect();
        assert!(
            survivors.is_empty(),
            "connections still answered more than 1 s after the revocation (index >= 50: held handshakes): {survivors:?}"
        );
        // Every held session has ended, and a new connection is refused.
        for s in held_sessions {
            tokio::time::timeout(Duration::from_secs(3), s)
                .await
                .expect("a held session still runs")
                .unwrap();
        }
        for l in loops {
            tokio::time::timeout(Duration::from_secs(5), l).await.unwrap().unwrap();
        }
        // Nor does a new connection get anything, even with the session tickets the client
        // configuration of the loops may hold (a resumed handshake skips the verifier).
        let last = Arc::new(Mutex::new(None));
        if let Ok(ch) = connect(&addr, "127.0.0.1", tls.clone()).await {
            let mut client = AgentClient::new(ch);
            assert!(client.register(RegisterRequest::default()).await.is_err());
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                heartbeat_session(client, last.clone()),
            )
            .await;
        }
        assert!(
            last.lock().unwrap().is_none(),
            "a revoked certificate got a session after the revocation"
        );
    });
    assert!(
        b.log_text()
            .contains("certificate refused after the handshake: cutting the connection"),
        "the held handshakes did not meet the re-check:\n{}",
        b.log_text()
    );
    b.stop();
}

// ---- Point 4: the endpoint cannot be held by strangers ----

/// Holds up to `n` certificate-less TLS connections from `source`, opening a new one
/// whenever the bastion closes one, until `stop`. Counts the ones open.
fn flood(
    addr: std::net::SocketAddr,
    source: std::net::IpAddr,
    pin: String,
    n: usize,
    open: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let verifier = Arc::new(PinVerifier::new(pin));
    let cfg = Arc::new(enroll_config(verifier).unwrap());
    (0..n)
        .map(|_| {
            let (cfg, open, stop) = (cfg.clone(), open.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let sock = TcpSocket::new_v4().unwrap();
                    sock.bind((source, 0).into()).unwrap();
                    let Ok(Ok(tcp)) =
                        tokio::time::timeout(Duration::from_secs(2), sock.connect(addr)).await
                    else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let name = ServerName::try_from("127.0.0.1").unwrap();
                    let hs = TlsConnector::from(cfg.clone()).connect(name, tcp);
                    let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(2), hs).await
                    else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    // Held: silent until the bastion closes it.
                    open.fetch_add(1, Ordering::SeqCst);
                    let mut buf = [0u8; 1024];
                    loop {
                        tokio::select! {
                            r = tls.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            },
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                                if stop.load(Ordering::SeqCst) { break }
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect()
}

#[test]
fn certificateless_flood_leaves_agents_connected_and_enrollment_open() {
    let mut b = Bastion::init("proj");
    // A small connection limit, so that a flood that today's bastion lets through fills it.
    b.edit_config(|c| c.replace("max_connections = 20000", "max_connections = 64"));
    b.start();
    let mut web = Agent::new("web01");
    web.enroll_ok(&b, &b.token(&[]));
    web.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));
    let rt = rt();
    let open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr: std::net::SocketAddr = b.agents_addr.parse().unwrap();
    let tasks = rt.block_on(async {
        flood(
            addr,
            "127.0.0.2".parse().unwrap(),
            b.pin.clone(),
            200,
            open.clone(),
            stop.clone(),
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    let held = open.load(Ordering::SeqCst);
    assert!(held > 0, "the flood holds nothing: the test does not test");
    // The default per-source bound (32).
    assert!(
        held <= 32,
        "one source holds {held} certificate-less connections"
    );
    // Enrollment from another address goes through, and the new agent connects.
    let mut db = Agent::new("db01");
    let out = db.enroll(&b, &b.token(&[]));
    assert!(
        out.status.success(),
        "enrollment during the flood failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    db.start();
    assert!(
        b.wait_state("db01", "online", Duration::from_secs(10)),
        "{}",
        db.log_text()
    );
    // The agent connected before the flood is still online, on the same process.
    assert_eq!(b.agent("web01").unwrap()["state"], "online");
    assert!(
        web.wait_exit(Duration::from_millis(10)).is_none(),
        "{}",
        web.log_text()
    );
    let held = open.load(Ordering::SeqCst);
    assert!(
        held <= 32,
        "one source holds {held} certificate-less connections"
    );
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
    assert!(
        b.log_text().contains("connection refused by a limit"),
        "{}",
        b.log_text()
    );
}

/// A channel over one certificate-less TLS connection, that does not dial again once the
/// bastion closes it.
async fn certless_channel(addr: &str, cfg: &Arc<rustls::ClientConfig>) -> Channel {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    channel_over(tls).await.unwrap()
}

#[test]
fn certificateless_connections_close_when_idle_old_or_enrolled() {
    let mut b = Bastion::init("proj");
    b.edit_config(|c| {
        c.replace(
            "unauthenticated_idle_timeout = \"5s\"",
            "unauthenticated_idle_timeout = \"1s\"",
        )
        .replace(
            "unauthenticated_lifetime = \"30s\"",
            "unauthenticated_lifetime = \"4s\"",
        )
    });
    b.start();
    let rt = rt();
    rt.block_on(async {
        let verifier = Arc::new(PinVerifier::new(b.pin.clone()));
        let cfg = Arc::new(enroll_config(verifier.clone()).unwrap());
        // Idle: a TLS connection that never says anything is closed after the idle time.
        let tcp = TcpStream::connect(&b.agents_addr).await.unwrap();
        let mut tls = TlsConnector::from(cfg.clone())
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle certificate-less connection stayed open 10 s"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "closed after {:?}",
            t0.elapsed()
        );

        // Busy: calls every 200 ms (each refused: no certificate) keep it from being idle,
        // and the lifetime closes it anyway.
        let mut client = AgentClient::new(certless_channel(&b.agents_addr, &cfg).await);
        let t0 = Instant::now();
        let mut refused = 0;
        let ended = loop {
            let r = client.register(RegisterRequest::default()).await;
            match r {
                Err(s) if s.code() == tonic::Code::Unauthenticated => refused += 1,
                _ => break t0.elapsed(),
            }
            if t0.elapsed() > Duration::from_secs(10) {
                break t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(refused > 5, "refused {refused} calls only");
        assert!(
            ended < Duration::from_secs(6),
            "a busy certificate-less connection lived {ended:?} (lifetime 4 s)"
        );

        // Enrolled: the connection closes shortly after the enrollment's answer.
        let mut client = EnrollmentClient::new(certless_channel(&b.agents_addr, &cfg).await);
        let r = client
            .enroll(EnrollRequest {
                token: "0123456789abcdef.bad".into(),
                name: "web01".into(),
                ..Default::default()
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);
        let t0 = Instant::now();
        let mut ended = None;
        while t0.elapsed() < Duration::from_secs(4) {
            let r = client
                .enroll(EnrollRequest {
                    token: "0123456789abcdef.bad".into(),
                    name: "web01".into(),
                    ..Default::default()
                })
                .await;
            if !matches!(&r, Err(s) if s.code() == tonic::Code::Unauthenticated) {
                ended = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ended = ended.expect("connection still answering 4 s after its enrollment call");
        assert!(ended < Duration::from_secs(3), "closed after {ended:?}");
    });
}

/// An enrollment the bastion takes longer than the idle time to answer (its store's write
/// lock held by someone else) still gets its answer: the idle clock of a certificate-less
/// connection does not run while a call on it is being answered. Before, the connection
/// was cut as idle and the agent got no certificate for a token the bastion then spent.
#[test]
fn a_slow_enrollment_is_answered_past_the_idle_timeout() {
    let mut b = Bastion::init("proj");
    b.edit_config(|c| {
        c.replace(
            "unauthenticated_idle_timeout = \"5s\"",
            "unauthenticated_idle_timeout = \"1s\"",
        )
    });
    b.start();
    let token = b.token(&[]);
    // The store's write lock, held for 2.5 s as a long checkpoint or a slow disk would.
    let db = rusqlite::Connection::open(b.state_dir().join("registry.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let rt = rt();
    let (answer, waited) = rt.block_on(async {
        let verifier = Arc::new(PinVerifier::new(b.pin.clone()));
        let cfg = Arc::new(enroll_config(verifier).unwrap());
        let mut client = EnrollmentClient::new(certless_channel(&b.agents_addr, &cfg).await);
        let (_key, csr) = bastide_agent::enroll::new_key_and_csr("slow01").unwrap();
        let t0 = Instant::now();
        let call = tokio::spawn(async move {
            client
                .enroll(EnrollRequest {
                    token,
                    name: "slow01".into(),
                    csr_der: csr,
                    agent_version: "test".into(),
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !call.is_finished(),
            "the enrollment did not wait for the store"
        );
        db.execute_batch("COMMIT").unwrap();
        (call.await.unwrap(), t0.elapsed())
    });
    let answer = answer.expect("a slow enrollment is answered, not cut as idle");
    assert!(
        answer
            .into_inner()
            .certificate_pem
            .contains("BEGIN CERTIFICATE"),
        "no certificate in the answer"
    );
    assert!(
        waited >= Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    assert!(b.agents().iter().any(|a| a["name"] == "slow01"));
}

// ---- Point 5: an enrolled VM cannot grow the registry without bound ----

fn cert_rows(b: &Bastion) -> i64 {
    let c = rusqlite::Connection::open_with_flags(
        b.state_dir().join("registry.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row("SELECT COUNT(*) FROM certs", [], |r| r.get(0))
        .unwrap()
}

fn store_bytes(b: &Bastion) -> u64 {
    ["registry.sqlite", "registry.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(b.state_dir().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Makes `n` Renew calls on one connection, 16 at a time; (granted, refused with
/// RESOURCE_EXHAUSTED, one refusal's message).
async fn renew_many(b: &Bastion, a: &Agent, n: usize) -> (usize, usize, String) {
    let ch = connect(&b.agents_addr, "127.0.0.1", agent_tls(a))
        .await
        .unwrap();
    let (_key, csr) = bastide_agent::enroll::new_key_and_csr(&a.name).unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (ch, csr, next) = (ch.clone(), csr.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = AgentClient::new(ch);
            let (mut ok, mut refused, mut msg) = (0, 0, String::new());
            while next.fetch_add(1, Ordering::SeqCst) < n {
                match client
                    .renew(RenewRequest {
                        csr_der: csr.clone(),
                    })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        refused += 1;
                        msg = s.message().to_string();
                    }
                    Err(s) => panic!("renewal failed otherwise: {s}"),
                }
            }
            (ok, refused, msg)
        }));
    }
    let mut total = (0, 0, String::new());
    for t in tasks {
        let (ok, refused, msg) = t.await.unwrap();
        total.0 += ok;
        total.1 += refused;
        if !msg.is_empty() {
            total.2 = msg;
        }
    }
    total
}

#[test]
fn ten_thousand_renewals_are_refused_cheaply_and_leave_the_store_bounded() {
    let mut b = Bastion::init("proj");
    b.start();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let pid = b.pid().unwrap();
    let rt = rt();
    let rss_before = rss_kib(pid);
    let t0 = Instant::now();
    let (ok, refused, msg) = rt.block_on(renew_many(&b, &a, 10_000));
    let took = t0.elapsed();
    // The default: a burst of 5, then one per tenth of the certificate lifetime (2.4 h).
    assert_eq!(ok, 5, "renewals granted");
    assert_eq!(refused, 9_995);
    assert!(
        msg.contains("rate limit") && msg.contains("retry in"),
        "refusal message: {msg:?}"
    );
    assert!(took < Duration::from_secs(60), "10,000 calls took {took:?}");
    let log = b.log_text();
    assert_eq!(
        log.matches("renewal refused: rate limit").count(),
        1,
        "one log line per refusal streak, not per call:\n{log}"
    );
    // The enrollment certificate (the one the calls came on) and the newest renewal.
    assert_eq!(cert_rows(&b), 2, "certificate rows after 5 renewals");
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn renewals_past_a_lifted_limit_leave_the_store_bounded() {
    let mut b = Bastion::init("proj");
    // A limit lifted far enough to grant thousands of renewals: pruning alone must keep the
    // store bounded.
    b.edit_config(|c| {
        c.replace(
            "renew_burst = 5",
            "renew_burst = 100000\nrenew_interval = \"1ms\"",
        )
    });
    b.start();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let pid = b.pid().unwrap();
    let rt = rt();
    let (ok, _, _) = rt.block_on(renew_many(&b, &a, 500));
    assert_eq!(ok, 500);
    let rss_500 = rss_kib(pid);
    let bytes_500 = store_bytes(&b);
    let (ok, _, _) = rt.block_on(renew_many(&b, &a, 2_000));
    assert_eq!(ok, 2_000);
    assert_eq!(cert_rows(&b), 2, "certificate rows after 2,500 renewals");
    let rss = rss_kib(pid);
    let bytes = store_bytes(&b);
    assert!(
        rss < rss_500 + 16 * 1024,
        "RSS grew from {rss_500} KiB to {rss} KiB"
    );
    // The write-ahead log is checkpointed at about 4 MiB; the database itself stays small.
    assert!(
        bytes < bytes_500 + 8 * 1024 * 1024,
        "store grew from {bytes_500} to {bytes} bytes"
    );
    let db = std::fs::metadata(b.state_dir().join("registry.sqlite"))
        .unwrap()
        .len();
    assert!(db < 512 * 1024, "registry.sqlite is {db} bytes");
    // The revocation still reaches what is left.
    b.cli_ok(&["agents", "revoke", "web01"]);
    let refused = rt.block_on(async {
        match connect(&b.agents_addr, "127.0.0.1", agent_tls(&a)).await {
            Ok(ch) => AgentClient::new(ch)
                .register(RegisterRequest::default())
                .await
                .is_err(),
            Err(_) => true,
        }
    });
    assert!(refused);
}
