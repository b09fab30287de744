//! Foundation: enrollment, the mTLS registry, revocation, renewal, restart and the admin CLI,
//! with the real `bastide` and `bastide-agent` binaries over loopback.

use std::time::{Duration, Instant};

use bastide_agent::tls::{connect, enroll_config, mtls_config, PinVerifier};
use bastide_proto::v1::agent_client::AgentClient;
use bastide_proto::v1::enrollment_client::EnrollmentClient;
use bastide_proto::v1::{agent_message, AgentMessage, EnrollRequest, Heartbeat, RegisterRequest};
use bastide_tests::{bin, free_port, parallel_enrollments, wait_for, Agent, Bastion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

fn rt() -> tokio::runtime::Runtime {
    bastide_agent::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// An mTLS gRPC client using an enrolled agent's own key and certificate.
async fn client_of(b: &Bastion, agent: &Agent) -> AgentClient<tonic::transport::Channel> {
    let dir = agent.state_dir();
    let ca = CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap();
    let cert = CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let cfg = mtls_config(ca, vec![cert], key).unwrap();
    AgentClient::new(connect(&b.agents_addr, "127.0.0.1", cfg).await.unwrap())
}

fn started() -> Bastion {
    let mut b = Bastion::init("proj");
    b.start();
    b
}

#[test]
fn enrollment_and_registration_show_in_agents_list() {
    let b = started();
    let token = b.token(&["--labels", "role=web,tier=front"]);
    let mut a = Agent::new("web01");
    a.enroll_ok(&b, &token);
    // Key stays private on the VM.
    let mode = std::fs::metadata(a.state_dir().join("key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    std::fs::write(
        a.dir.path().join("ssh/ssh_host_ed25519_key.pub"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl root@web01\n",
    )
    .unwrap();
    a.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(10)),
        "{}",
        a.log_text()
    );
    let info = b.agent("web01").unwrap();
    assert_eq!(info["labels"]["role"], "web");
    assert_eq!(info["labels"]["tier"], "front");
    // Its own address, claimed and observed (the connection comes from it): accepted.
    assert_eq!(info["addresses"], serde_json::json!([a.ip]), "{info}");
    assert_eq!(info["observed"], a.ip.as_str(), "{info}");
    assert_eq!(info["flags"], serde_json::json!([]), "{info}");
    assert_eq!(info["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(info["last_seen"].as_i64().unwrap() > 0);
    assert!(info["cert_not_after"].as_i64().unwrap() > info["enrolled_at"].as_i64().unwrap());
    assert!(!info["hostname"].as_str().unwrap().is_empty());

    // The human table has the same facts.
    let table = b.cli_ok(&["agents", "list"]);
    assert!(table.contains("web01") && table.contains("online") && table.contains("role=web"));

    // The one-screen summary.
    let status = b.cli_ok(&["status"]);
    assert!(
        status.contains("1 online, 0 offline, 0 revoked"),
        "{status}"
    );
    assert!(
        status.contains("agent CA") && status.contains("metrics on"),
        "{status}"
    );

    // Enrolling again is a clear no-op.
    let again = a.enroll(&b, &token);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already enrolled"));

    // The token's secret never reaches a log.
    let secret = token.split('.').nth(1).unwrap();
    assert!(!b.log_text().contains(secret));
    assert!(!a.log_text().contains(secret));
    assert!(b.log_text().contains("agent enrolled"));
}

#[test]
fn bad_tokens_are_refused() {
    let b = started();
    let token = b.token(&[]);
    let (id, secret) = token.split_once('.').unwrap();

    // Wrong secret.
    let forged = format!("{id}.{}", "0".repeat(secret.len()));
    let out = Agent::new("a1").enroll(&b, &forged);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid enrollment token"),
        "{}",
        stderr(&out)
    );
    // Garbage.
    let out = Agent::new("a1").enroll(&b, "nonsense");
    assert!(
        stderr(&out).contains("invalid enrollment token"),
        "{}",
        stderr(&out)
    );

    // Single use: the second enrollment with the same token fails.
    Agent::new("a1").enroll_ok(&b, &token);
    let out = Agent::new("a2").enroll(&b, &token);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));

    // Expired.
    let short = b.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let out = Agent::new("a3").enroll(&b, &short);
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));

    // Revoked.
    let t = b.token(&[]);
    b.cli_ok(&["token", "revoke", t.split('.').next().unwrap()]);
    let out = Agent::new("a4").enroll(&b, &t);
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));

    let list = b.cli_ok(&["token", "list", "--json"]);
    assert!(!list.contains(secret), "token list never shows secrets");
    let agents = b.agents();
    assert_eq!(agents.len(), 1, "only a1 enrolled: {agents:?}");
    assert!(b.log_text().contains("enrollment refused"));
}

#[test]
fn twenty_parallel_enrollments_one_winner() {
    let b = started();
    let token = b.token(&[]);
    let (wins, _agents) = parallel_enrollments(&b, &token, 20);
    assert_eq!(wins, 1);
    assert_eq!(b.agents().len(), 1);
    let tokens: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["token", "list", "--json"])).unwrap();
    assert_eq!(tokens[0]["uses_left"], 0);
}

#[test]
fn csr_fields_are_never_copied() {
    let b = started();
    let token = b.token(&[]);
    let rt = rt();
    let pem = rt.block_on(async {
        // A CSR that asks for a CA, server auth and another name.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["evil.example.com".into()]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::CodeSigning,
        ];
        p.distinguished_name.push(rcgen::DnType::CommonName, "root");
        let csr = p.serialize_request(&key).unwrap();
        let verifier = std::sync::Arc::new(PinVerifier::new(b.pin.clone()));
        let ch = connect(
            &b.agents_addr,
            "127.0.0.1",
            enroll_config(verifier).unwrap(),
        )
        .await
        .unwrap();
        EnrollmentClient::new(ch)
            .enroll(EnrollRequest {
                token: token.clone(),
                name: "good".into(),
                csr_der: csr.der().to_vec(),
                agent_version: "test".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .certificate_pem
    });
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.code_signing && !eku.any);
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert!(
        sans.iter().any(|s| s.contains("spiffe://proj/agent/good")),
        "{sans:?}"
    );
    assert!(
        sans.iter().any(|s| s.contains("good.proj.test")),
        "{sans:?}"
    );
    assert!(!sans.iter().any(|s| s.contains("evil")), "{sans:?}");
    assert!(!cert.subject().to_string().contains("root"));
    // Backdated against skew, short-lived, random serial as recorded.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(cert.validity().not_before.timestamp() <= now - 120);
    assert!(cert.validity().not_after.timestamp() <= now + 24 * 3600 + 60);
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(b.agent("good").unwrap()["cert_serial"], serial);
}

#[test]
fn name_pattern_duplicates_and_replace() {
    let b = started();
    let t = b.token(&["--name-pattern", "web*", "--uses", "3"]);
    let out = Agent::new("db01").enroll(&b, &t);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not allowed"), "{}", stderr(&out));
    let mut first = Agent::new("web01");
    first.enroll_ok(&b, &t);
    first.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));

    // Another VM claiming a live agent's name is refused.
    let out = Agent::new("web01").enroll(&b, &b.token(&[]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("held by another"), "{}", stderr(&out));

    // A reimaged VM re-enrolls under its name only with --replace; the old certificate is
    // revoked and its holder cut off.
    let mut second = Agent::new("web01");
    second.enroll_ok(&b, &b.token(&["--replace"]));
    let st = first.wait_exit(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", first.log_text());
    assert!(first.log_text().contains("revoked"));
    second.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(10)),
        "{}",
        second.log_text()
    );
}

#[test]
fn wrong_pin_sends_nothing() {
    let b = started();
    let token = b.token(&[]);
    let a = Agent::new("web01");
    let bad_pin = format!("sha256:{}", "ab".repeat(32));
    let out = std::process::Command::new(bin("bastide-agent"))
        .args([
            "enroll",
            "--bastion",
            &b.agents_addr,
            "--token",
            &token,
            "--ca-pin",
            &bad_pin,
        ])
        .args(["--name", "web01", "--state-dir"])
        .arg(a.state_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not match"), "{}", stderr(&out));
    assert!(!a.state_dir().join("cert.pem").exists());
    // The token was never presented: still valid, and it works with the right pin.
    let tokens: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["token", "list", "--json"])).unwrap();
    assert_eq!(tokens[0]["uses_left"], 1);
    assert_eq!(tokens[0]["state"], "valid");
    assert!(!b.log_text().contains("enrollment refused"));
    a.enroll_ok(&b, &token);
}

#[test]
fn revoked_agent_is_cut_within_a_second_and_cannot_return() {
    let b = started();
    let mut a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    a.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));
    let rt = rt();
    rt.block_on(async {
        // Our own session with the agent's certificate, to time the cut.
        let mut client = client_of(&b, &a).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                seq: 1,
                agent_time_unix: 0,
                no_ack: false,
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(
            inbound.message().await.unwrap().is_some(),
            "heartbeat acknowledged"
        );
        let start = Instant::now();
        let out = b.cli(&["agents", "revoke", "web01"]);
        assert!(out.status.success());
        let cut = tokio::time::timeout(Duration::from_secs(3), async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        assert!(cut.is_ok(), "stream not cut");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "cut took {:?}",
            start.elapsed()
        );
        // A new connection with that certificate is refused.
        let again = client_of(&b, &a)
            .await
            .register(RegisterRequest::default())
            .await;
        assert!(again.is_err());
        drop(tx);
    });
    let st = a.wait_exit(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(3), "{}", a.log_text());
    assert_eq!(b.agent("web01").unwrap()["state"], "revoked");
    assert!(b.log_text().contains("agent revoked"));
    // Re-enrolling needs a new token, and then works.
    let again = Agent::new("web01");
    again.enroll_ok(&b, &b.token(&[]));
}

#[test]
fn foreign_ca_and_missing_certificate_are_refused() {
    let b = started();
    Agent::new("web01").enroll_ok(&b, &b.token(&[]));
    let rt = rt();
    rt.block_on(async {
        // A client certificate from another CA that claims the same identity.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut cap = rcgen::CertificateParams::default();
        cap.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let _ca_cert = cap.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(cap, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://proj/agent/web01".to_string().try_into().unwrap(),
        )];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer).unwrap();
        let real_ca =
            CertificateDer::from_pem_file(b.state_dir().join("pki/agent-ca.crt")).unwrap();
        let cfg = mtls_config(
            real_ca.clone(),
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let r = match connect(&b.agents_addr, "127.0.0.1", cfg).await {
            Ok(ch) => AgentClient::new(ch)
                .register(RegisterRequest::default())
                .await
                .map(|_| ()),
            Err(_) => Ok(()).and(Err(tonic::Status::unavailable("refused at connect"))),
        };
        assert!(r.is_err(), "foreign certificate accepted");

        // No client certificate at all: only enrollment is open.
        let verifier = std::sync::Arc::new(PinVerifier::new(b.pin.clone()));
        let ch = connect(
            &b.agents_addr,
            "127.0.0.1",
            enroll_config(verifier).unwrap(),
        )
        .await
        .unwrap();
        let r = AgentClient::new(ch)
            .register(RegisterRequest::default())
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);
    });
    assert!(
        b.log_text().contains("client certificate refused"),
        "{}",
        b.log_text()
    );
}

#[test]
fn registration_is_recorded_under_the_certificate_name() {
    let b = started();
    let a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    Agent::new("db01").enroll_ok(&b, &b.token(&[]));
    let rt = rt();
    rt.block_on(async {
        let mut client = client_of(&b, &a).await;
        let resp = client
            .register(RegisterRequest {
                claimed_name: "db01".into(),
                hostname: "impostor-host".into(),
                addresses: vec!["10.9.9.9".into(), "not-an-ip".into()],
                os: "test".into(),
                agent_version: "9.9".into(),
                ssh_host_keys: vec!["garbage key".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.name, "web01");
    });
    let web = b.agent("web01").unwrap();
    assert_eq!(web["hostname"], "impostor-host");
    // A claim is kept for the admin to see, never used: outside the agent networks, and not
    // where the connection came from.
    assert_eq!(web["claimed"], serde_json::json!(["10.9.9.9"]), "{web}");
    assert_eq!(web["addresses"], serde_json::json!([]), "{web}");
    assert_eq!(
        web["flags"],
        serde_json::json!(["address-mismatch"]),
        "{web}"
    );
    let db = b.agent("db01").unwrap();
    assert_ne!(db["hostname"], "impostor-host");
    assert!(b.log_text().contains("claims another name"));
}

#[test]
fn restart_keeps_registry_and_agents_reconnect() {
    let mut b = started();
    let mut a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    a.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));
    let st = b.stop().unwrap();
    assert_eq!(st.code(), Some(0), "SIGTERM must exit 0:\n{}", b.log_text());
    b.start();
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(15)),
        "agent did not come back:\n{}",
        a.log_text()
    );
    assert_eq!(b.agents().len(), 1);
}

#[test]
fn certificate_renewal_with_a_short_lifetime() {
    let mut b = Bastion::init("proj");
    b.edit_config(|c| {
        c.replace("cert_lifetime = \"24h\"", "cert_lifetime = \"6s\"")
            .replace(
                "heartbeat_interval = \"10s\"",
                "heartbeat_interval = \"1s\"",
            )
            .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"5s\"")
    });
    b.start();
    let mut a = Agent::new("web01");
    a.enroll_ok(&b, &b.token(&[]));
    let first = b.agent("web01").unwrap()["cert_serial"].clone();
    a.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(10)));
    // Two renewals at least in 10 s of a 6 s lifetime, and online all along.
    let serials = wait_for(Duration::from_secs(12), || {
        let s = b.agent("web01").unwrap()["cert_serial"].clone();
        (s != first).then_some(s)
    });
    assert!(serials.is_some(), "no renewal:\n{}", a.log_text());
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        b.wait_state("web01", "online", Duration::from_secs(5)),
        "{}",
        a.log_text()
    );
    let info = b.agent("web01").unwrap();
    assert!(info["cert_not_after"].as_i64().unwrap() > b_now());
    assert!(a.log_text().contains("certificate renewed"));
    // An agent offline past expiry must re-enroll and says so.
    a.stop();
    std::thread::sleep(Duration::from_secs(7));
    a.start();
    let st = a.wait_exit(Duration::from_secs(10));
    assert_eq!(st.and_then(|s| s.code()), Some(3));
    assert!(a.log_text().contains("must re-enroll"), "{}", a.log_text());
}

fn b_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn broken_configuration_is_refused_with_its_key_named() {
    let b = Bastion::init("proj");
    b.edit_config(|c| {
        c.replace(
            "max_connections = 20000",
            "max_connections = 20000\nbogus_key = 1",
        )
    });
    let out = b.cli(&["serve"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bogus_key") && err.contains("bastide.toml"),
        "{err}"
    );
    let out = b.cli(&["check-config"]);
    assert!(!out.status.success() && stderr(&out).contains("bogus_key"));

    // Unknown keys and wrong types are all reported in one run, each by its key path, with
    // a "did you mean" for a near miss and what to put in a missing required key.
    b.edit_config(|c| {
        c.replace("bogus_key = 1", "bogus_key = 1\nhandshake_timout = \"5s\"")
            .replace("max_connections = 20000", "max_connections = \"many\"")
            + "\n[ssh]\nlisten = \"127.0.0.1:1\"\n[[ssh.admins]]\nname = \"a\"\nkeyz = []\n[[ssh.admins]]\nkeys = []\n"
            + "\n[smtp]\nlisten = \"127.0.0.1:1\"\nallow_networks = [\"10.0.0.0/8\"]\n[smtp.relay]\nhost = \"h\"\n"
    });
    let err = stderr(&b.cli(&["check-config"]));
    for expected in [
        "agents.bogus_key: unknown key",
        "agents.handshake_timout: unknown key (did you mean `handshake_timeout`?)",
        "agents.max_connections: invalid type: string \"many\"",
        "ssh.admins[0].keyz: unknown key (did you mean `keys`?)",
        "ssh.admins[1].name: required key missing: the admin's name",
        // One vocabulary: SMTP's client networks are `allow`, as in every other table.
        "smtp.allow_networks: unknown key (did you mean `allow`?)",
    ] {
        assert!(err.contains(expected), "no {expected:?} in:\n{err}");
    }
    b.edit_config(|c| {
        let c = c
            .replace("\nhandshake_timout = \"5s\"", "")
            .replace("max_connections = \"many\"", "max_connections = 20000");
        c[..c.find("\n[ssh]").unwrap()].to_string()
    });
    assert!(
        !err.contains("audit_log"),
        "ssh.audit_log has a default:\n{err}"
    );

    b.edit_config(|c| {
        c.replace("bogus_key = 1", "")
            .replace("heartbeat_timeout = \"35s\"", "heartbeat_timeout = \"1s\"")
    });
    let out = b.cli(&["check-config"]);
    assert!(
        stderr(&out).contains("agents.heartbeat_timeout"),
        "{}",
        stderr(&out)
    );

    // A world-readable CA key is refused.
    b.edit_config(|c| c.replace("heartbeat_timeout = \"1s\"", "heartbeat_timeout = \"35s\""));
    b.cli_ok(&["check-config"]);
    let key = b.state_dir().join("pki/agent-ca.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = b.cli(&["serve"]);
    assert!(
        !out.status.success() && stderr(&out).contains("mode 0644"),
        "{}",
        stderr(&out)
    );

    // A corrupt registry is an error at start, never silently reset.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(b.state_dir().join("registry.sqlite"), vec![0x42u8; 8192]).unwrap();
    let out = b.cli(&["serve"]);
    assert!(
        !out.status.success() && stderr(&out).contains("registry store"),
        "{}",
        stderr(&out)
    );

    // init refuses to overwrite a CA.
    let out = std::process::Command::new(bin("bastide"))
        .args(["init", "--project", "proj", "--dir"])
        .arg(b.state_dir())
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("refusing to overwrite"));
}

#[test]
fn admin_cli_fails_clearly() {
    let b = Bastion::init("proj");
    // Daemon not running.
    let start = Instant::now();
    let out = b.cli(&["agents", "list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is it running"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1);
    assert!(start.elapsed() < Duration::from_secs(1));
    let mut b = b;
    b.start();
    let out = b.cli(&["agents", "revoke", "nobody"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown agent"), "{}", stderr(&out));
    let out = b.cli(&["token", "revoke", "0000"]);
    assert!(!out.status.success() && stderr(&out).contains("unknown token"));
    let out = b.cli(&["token", "create", "--uses", "0"]);
    assert!(!out.status.success());
    // The socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(b.state_dir().join("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Every command answers fast.
    let start = Instant::now();
    b.cli_ok(&["token", "list"]);
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A VM whose connection comes from another address than the one it claims (a NAT, a
/// misconfiguration, or a VM naming a neighbour's address) is flagged in `agents list`,
/// counted by `bastide_agents_address_mismatch`, and its claim is not used (the default
/// `claimed_addresses = "observed"`).
#[test]
fn an_agent_connecting_from_another_address_than_it_claims_is_flagged_and_counted() {
    let b = started();
    let mut a = Agent::new("web01");
    let other = bastide_tests::next_agent_ip();
    a.set_addresses(&[&other], Some(&a.ip));
    a.enroll_ok(&b, &b.token(&[]));
    a.start();
    let info = wait_for(Duration::from_secs(20), || {
        b.agent("web01")
            .filter(|i| i["state"] == "online" && i["observed"] == a.ip.as_str())
    })
    .unwrap_or_else(|| panic!("not registered: {:?}\n{}", b.agent("web01"), a.log_text()));
    assert_eq!(
        info["flags"],
        serde_json::json!(["address-mismatch"]),
        "{info}"
    );
    assert_eq!(info["claimed"], serde_json::json!([other]), "{info}");
    assert_eq!(info["addresses"], serde_json::json!([]), "{info}");
    assert!(
        info["refused"]
            .to_string()
            .contains(&format!("not the observed address {}", a.ip)),
        "{info}"
    );
    assert_eq!(b.metric("bastide_agents_address_mismatch"), Some(1.0));
    let table = b.cli_ok(&["agents", "list"]);
    assert!(
        table.contains("address-mismatch") && table.contains(&a.ip),
        "{table}"
    );
    // Logged once per change, not at every registration: a reconnection with the same
    // claims adds no line.
    let logged = |b: &Bastion| {
        b.log_text()
            .lines()
            .filter(|l| {
                l.contains("agent address claims refused or flagged") && l.contains("web01")
            })
            .count()
    };
    assert_eq!(logged(&b), 1, "{}", b.log_text());
    a.stop();
    assert!(b.wait_state("web01", "offline", Duration::from_secs(10)));
    a.start();
    assert!(b.wait_state("web01", "online", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(logged(&b), 1, "{}", b.log_text());
}

/// The first line a server sends on `addr` (an SMTP greeting), or the first line of its
/// answer to `send` (an HTTP status line).
fn first_line(addr: &str, send: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(send.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Every `listen` is a list: a service binds every address of it (SMTP and metrics here,
/// on two loopback addresses), and a single string still means a list of one.
#[test]
fn a_listen_list_binds_every_address() {
    let mut b = Bastion::init("lists");
    let smtp = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.1.1:{}", free_port()),
    ];
    let metrics2 = format!("127.0.1.1:{}", free_port());
    let (m1, m2) = (b.metrics_addr.clone(), metrics2.clone());
    b.edit_config(|c| {
        c.replace(&format!("[\"{m1}\"]"), &format!("[\"{m1}\", \"{m2}\"]"))
            + &format!(
                "\n[smtp]\nlisten = [\"{}\", \"{}\"]\nallow = [\"127.0.0.0/8\"]\n[smtp.relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
                smtp[0],
                smtp[1],
                free_port()
            )
    });
    b.start();
    for a in &smtp {
        let greeting = first_line(a, "");
        assert!(greeting.starts_with("220 "), "{a}: {greeting:?}");
    }
    for a in [&b.metrics_addr, &metrics2] {
        let status = first_line(a, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(
            status.starts_with("HTTP/1.") && status.contains(" 200 "),
            "{a}: {status:?}"
        );
    }
    assert!(
        b.log_text().contains(&smtp[1]),
        "the listening log line names every address:\n{}",
        b.log_text()
    );
}

/// A second bastion on the same host: `bastide init` with its default listeners moves to
/// free ports when the first bastion holds the defaults (and says so), and both serve; two
/// inits before either serves get the same defaults, and the second `serve` says which key
/// to change in which file.
#[test]
fn a_second_bastion_on_the_same_host_gets_listeners_that_do_not_collide() {
    let mut first = Bastion::init_with("one", &[]);
    let early = Bastion::init_with("early", &[]);
    assert_eq!(early.agents_addr, first.agents_addr);
    first.start();

    let mut serve = std::process::Command::new(bin("bastide"))
        .arg("--config")
        .arg(&early.config)
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_for(Duration::from_secs(20), || serve.try_wait().unwrap());
    if st.is_none() {
        serve.kill().unwrap();
    }
    let out = serve.wait_with_output().unwrap();
    assert!(
        st.is_some_and(|s| !s.success()),
        "the second serve must stop"
    );
    let err = stderr(&out);
    assert!(
        err.contains("agents.listen: cannot bind")
            && err.contains("another process listens there")
            && err.contains(&format!("agents.listen of {}", early.config.display())),
        "{err}"
    );

    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("bastide"))
        .args(["init", "--project", "two", "--dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    for (key, taken) in [
        ("agents.listen:", &first.agents_addr),
        ("metrics.listen:", &first.metrics_addr),
    ] {
        let line = printed
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {printed}"));
        assert!(
            line.contains(&format!("{taken} is in use on this host")) && line.contains("--"),
            "{line}"
        );
    }
    drop(state);

    let mut second = Bastion::init_with("two", &[]);
    assert_ne!(second.agents_addr, first.agents_addr);
    assert_ne!(second.metrics_addr, first.metrics_addr);
    second.start();
    for b in [&first, &second] {
        // `status` says where each bastion listens.
        let status = b.cli_ok(&["status"]);
        assert!(
            status.contains(&format!("listen        agents {}", b.agents_addr))
                && status.contains(&format!("metrics {}", b.metrics_addr)),
            "{status}"
        );
        let status = first_line(&b.metrics_addr, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(
            status.starts_with("HTTP/1.") && status.contains(" 200 "),
            "{status:?}"
        );
    }
}
