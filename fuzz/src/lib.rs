//! Shared set-up of the fuzz targets: a real registry (CA, SQLite store, one enrolled agent)
//! in a scratch directory under /dev/shm (tmpfs: fsyncs are cheap), built once per process.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bastide::pki::{AgentCa, AgentIdentity, PkiPaths};
use bastide::registry::{Registry, RegistrySettings, TokenSpec};
use bastide::store::Store;

pub const PROJECT: &str = "fuzz";
pub const ZONE: &str = "fuzz.test.";
pub const AGENT: &str = "web01";

pub struct World {
    pub dir: PathBuf,
    pub registry: Registry,
    pub identity: AgentIdentity,
    pub runtime: tokio::runtime::Runtime,
}

fn scratch() -> PathBuf {
    scratch_dir("world")
}

/// A fresh directory of this process on tmpfs (`/dev/shm`, else the temp dir).
pub fn scratch_dir(what: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("bastide-fuzz-{}-{what}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The process-wide world (built on first use).
pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        bastide::tls::install_crypto_provider();
        let dir = scratch();
        let state = dir.join("state");
        let paths = PkiPaths::new(&state);
        bastide::pki::init(&paths, PROJECT, Some(ZONE), &[]).unwrap();
        let store_path = state.join("registry.sqlite");
        Store::create(&store_path).unwrap();
        let store = Store::open(&store_path).unwrap();
        let ca = AgentCa::load(&paths, PROJECT, Some(ZONE)).unwrap();
        let registry = Registry::open(
            store,
            ca,
            RegistrySettings {
                cert_lifetime: std::time::Duration::from_secs(3600),
                addresses: bastide::addresses::AddressPolicy {
                    networks: vec!["192.0.2.0/24".parse().unwrap(), "10.0.0.0/8".parse().unwrap()],
                    bastion: ["192.0.2.1".parse().unwrap()].into(),
                    claimed: bastide::addresses::ClaimedAddresses::Observed,
                },
            },
        )
        .unwrap();
        let token = registry
            .create_token(&TokenSpec {
                ttl_secs: 3600,
                uses: 1,
                name_pattern: None,
                labels: [("env".to_string(), "prod".to_string())].into(),
                replace: false,
            })
            .unwrap();
        let (_key, csr) = bastide_agent::enroll::new_key_and_csr(AGENT).unwrap();
        let enrolled = registry.enroll(&token.token, AGENT, &csr, "fuzz").unwrap();
        // Registration looks the agent up by the certificate's name only.
        let identity = AgentIdentity {
            name: enrolled.name,
            serial: String::new(),
            not_after: enrolled.not_after,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        World {
            dir,
            registry,
            identity,
            runtime,
        }
    })
}

/// Shared for the SMTP target: the relay's session state behind a real spool.
pub fn smtp() -> &'static (
    Arc<bastide::smtp::server::Shared>,
    Arc<bastide::smtp::Queue>,
) {
    static S: OnceLock<(
        Arc<bastide::smtp::server::Shared>,
        Arc<bastide::smtp::Queue>,
    )> = OnceLock::new();
    S.get_or_init(|| {
        let w = world();
        let cfg: bastide::smtp::SmtpConfig = toml::from_str(
            r#"
listen = "127.0.0.1:25"
allow = ["127.0.0.1/32"]
max_message_size = 65536
max_recipients = 5
max_line_length = 200
sender_address = "vms@example.org"
admin_address = "admin@example.org"
allow_recipient_domains = ["example.org", "example.net"]
[relay]
host = "127.0.0.1"
tls = "none"
"#,
        )
        .unwrap();
        let queue = Arc::new(bastide::smtp::Queue::open(&w.dir.join("spool")).unwrap());
        let hostname = "bastion.fuzz.test".to_string();
        let rewriter = Arc::new(bastide::smtp::rewrite::Rewriter::new(
            &cfg,
            Some("fuzz.test".into()),
            hostname.clone(),
            w.registry.clone(),
        ));
        let shared = Arc::new(bastide::smtp::server::Shared::new(
            cfg,
            hostname,
            w.registry.clone(),
            queue.clone(),
            Arc::new(bastide::smtp::SmtpMetrics::default()),
            None,
            rewriter,
        ));
        (shared, queue)
    })
}

/// The configuration push service's handle over the world's registry (the tree is not
/// loaded: only agents' results go through it).
pub fn config_push() -> &'static bastide::config_push::ConfigPushHandle {
    static P: OnceLock<bastide::config_push::ConfigPushHandle> = OnceLock::new();
    P.get_or_init(|| {
        let w = world();
        let cfg: bastide::config_push::ConfigPushConfig = toml::from_str(&format!(
            "dir = {:?}\ncloud = \"c\"\nsite = \"s\"\ninstance = \"i\"\n",
            w.dir.display().to_string()
        ))
        .unwrap();
        bastide::config_push::ConfigPushHandle::new(
            cfg,
            PROJECT,
            Some(ZONE.to_string()),
            serde_json::json!({}),
            w.registry.clone(),
        )
    })
}
