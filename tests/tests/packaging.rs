//! Packaging: the Debian packages from `packaging/build-debs`, installed with the real `dpkg`
//! on this machine (CI runs as root on a throw-away machine); their files, users and modes;
//! the systemd units checked by `systemd-analyze verify` and `security`; `lintian`; the
//! first-boot path (the user-data of `bastide token create --cloud-init`, then the
//! enrollment unit's and the agent unit's own command lines); the daemon's sd_notify
//! protocol; and the VM templates rendered and checked by rsyslog and postconf.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bastide_tests::{bin, require, wait_for, Bastion};

const UNITS: &str = "/usr/lib/systemd/system";

/// This checkout (from the test crate itself: packaging/ must be the one under test).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The three .debs and their three -dbgsym .ddebs.
struct Built {
    server: PathBuf,
    agent: PathBuf,
    login: PathBuf,
    server_dbg: PathBuf,
    agent_dbg: PathBuf,
    login_dbg: PathBuf,
}

const PACKAGES: [&str; 3] = ["bastide", "bastide-agent", "bastide-login"];

/// The three .debs, built once (one release build) by the release path the README
/// documents (`packaging/build-debs`: release build, stripped binaries, -dbgsym packages),
/// purged if a previous run left them, installed fresh, then installed again over themselves
/// (the upgrade path of the maintainer scripts).
fn debs() -> &'static Built {
    built()
}

fn built() -> &'static Built {
    static DEBS: OnceLock<Built> = OnceLock::new();
    DEBS.get_or_init(|| {
        require("dpkg", "dpkg");
        let id = run(Command::new("id").arg("-u"));
        assert_eq!(
            stdout(&id).trim(),
            "0",
            "the packaging tests install the .debs with dpkg: run them as root"
        );
        let cargo_deb = Command::new("cargo").args(["deb", "--version"]).output();
        assert!(
            cargo_deb.is_ok_and(|o| o.status.success()),
            "cargo-deb is required by this test: cargo install cargo-deb --locked --version 3.8.0"
        );
        let out = tempfile::Builder::new()
            .prefix("bastide-debs-")
            .tempdir()
            .unwrap()
            .keep();
        let mut build = Command::new(workspace().join("packaging/build-debs"));
        bastide_tests::without_cargo_test_env(&mut build);
        run(build.arg("-o").arg(&out));
        let find = |prefix: &str, ext: &str| {
            std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().to_string();
                    n.starts_with(prefix) && n.ends_with(ext)
                })
                .unwrap_or_else(|| panic!("no {prefix}*{ext} in {}", out.display()))
        };
        let b = Built {
            server: find("bastide_", ".deb"),
            agent: find("bastide-agent_", ".deb"),
            login: find("bastide-login_", ".deb"),
            server_dbg: find("bastide-dbgsym_", ".ddeb"),
            agent_dbg: find("bastide-agent-dbgsym_", ".ddeb"),
            login_dbg: find("bastide-login-dbgsym_", ".ddeb"),
        };
        // A fresh install: what a previous run left goes (purge keeps non-empty state dirs).
        let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
        for _ in 0..2 {
            run(Command::new("dpkg")
                .arg("-i")
                .arg(&b.server)
                .arg(&b.agent)
                .arg(&b.login)
                .env("DEBIAN_FRONTEND", "noninteractive"));
        }
        b
    })
}

fn mode_owner(path: &str) -> (u32, String, String) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |flag: &str, id: u32| {
        let o = run(Command::new("getent").args([flag, &id.to_string()]));
        stdout(&o).split(':').next().unwrap().to_string()
    };
    (
        m.permissions().mode() & 0o7777,
        name("passwd", m.uid()),
        name("group", m.gid()),
    )
}

#[test]
fn debs_install_users_directories_conffiles_and_binaries() {
    debs();
    // The system user and group of the daemon; no login.
    let pw = stdout(&run(Command::new("getent").args(["passwd", "_bastide"])));
    let f: Vec<&str> = pw.trim().split(':').collect();
    assert_eq!(f[5], "/var/lib/bastide", "{pw}");
    assert_eq!(f[6], "/usr/sbin/nologin", "{pw}");
    assert!(
        f[2].parse::<u32>().unwrap() < 1000,
        "not a system uid: {pw}"
    );
    run(Command::new("getent").args(["group", "_bastide"]));

    // State, spool and log directories with tight modes.
    for (dir, mode, user, group) in [
        ("/var/lib/bastide", 0o700, "_bastide", "_bastide"),
        ("/var/spool/bastide", 0o700, "_bastide", "_bastide"),
        ("/var/log/bastide", 0o750, "_bastide", "adm"),
        ("/var/lib/bastide-agent", 0o700, "root", "root"),
    ] {
        assert_eq!(
            mode_owner(dir),
            (mode, user.to_string(), group.to_string()),
            "{dir}"
        );
    }

    // Binaries and units in place.
    for (b, name) in [
        ("/usr/bin/bastide", "bastide"),
        ("/usr/bin/bastide-agent", "bastide-agent"),
        ("/usr/bin/bastide-login", "bastide-login"),
    ] {
        let v = stdout(&run(Command::new(b).arg("--version")));
        assert_eq!(v.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
        assert_eq!(mode_owner(b).0, 0o755);
    }
    for u in [
        "bastide.service",
        "bastide-agent.service",
        "bastide-agent-enroll.service",
    ] {
        assert_eq!(mode_owner(&format!("{UNITS}/{u}")).0, 0o644, "{u}");
    }
    assert!(Path::new("/usr/lib/sysusers.d/bastide.conf").is_file());
    assert!(Path::new("/usr/share/doc/bastide-agent/cloud-init/user-data.yaml").is_file());

    // The agent's configuration is a conffile (kept on upgrade when edited); the shipped one
    // is valid as it is (the first-boot test runs the agent with it).
    let conffiles = stdout(&run(Command::new("dpkg-query").args([
        "-W",
        "-f=${Conffiles}",
        "bastide-agent",
    ])));
    assert!(conffiles.contains("/etc/bastide/agent.toml"), "{conffiles}");
    // Nothing of the bastion's is a conffile: its configuration comes from `bastide init`.
    let server_files = stdout(&run(Command::new("dpkg").args(["-L", "bastide"])));
    assert!(server_files
        .lines()
        .all(|l| !l.starts_with("/etc/bastide/")));

    // Nothing enabled that an admin has not configured: the bastion is installed disabled;
    // the agent's units are enabled but gated by conditions on enrollment settings.
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants");
    assert!(!wants.join("bastide.service").exists());
    assert!(wants.join("bastide-agent.service").exists());
    assert!(wants.join("bastide-agent-enroll.service").exists());
    let enroll = std::fs::read_to_string(format!("{UNITS}/bastide-agent-enroll.service")).unwrap();
    assert!(enroll.contains("ConditionPathExists=|/etc/bastide/enroll.env"));
    assert!(enroll.contains("ConditionPathExists=!/var/lib/bastide-agent/cert.pem"));
    let agent = std::fs::read_to_string(format!("{UNITS}/bastide-agent.service")).unwrap();
    assert!(agent.contains("ConditionPathExists=/var/lib/bastide-agent/cert.pem"));
}

/// `bastide-login` is a client for admins' machines, packaged on its own: a binary, its man
/// page, completions and docs; no daemon, no unit, no user, no maintainer script, no
/// configuration file; it needs only ssh. Installed, it runs and asks for its bastion.
#[test]
fn login_package_is_a_client_only() {
    let pkgs = debs();
    let files = stdout(&run(Command::new("dpkg").args(["-L", "bastide-login"])));
    let files: Vec<&str> = files.lines().filter(|l| !Path::new(l).is_dir()).collect();
    for f in [
        "/usr/bin/bastide-login",
        "/usr/share/man/man1/bastide-login.1.gz",
        "/usr/share/bash-completion/completions/bastide-login",
        "/usr/share/zsh/vendor-completions/_bastide-login",
        "/usr/share/fish/vendor_completions.d/bastide-login.fish",
        "/usr/share/doc/bastide-login/copyright",
        "/usr/share/doc/bastide-login/changelog.Debian.gz",
        "/usr/share/doc/bastide-login/sso.md",
    ] {
        assert!(files.contains(&f), "bastide-login lacks {f}: {files:#?}");
    }
    for f in &files {
        assert!(
            ["/usr/bin/", "/usr/share/"]
                .iter()
                .any(|d| f.starts_with(d)),
            "bastide-login ships {f}: {files:#?}"
        );
    }
    let control = |field: &str| {
        let o = run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(&pkgs.login)
            .arg(field));
        stdout(&o).trim().to_string()
    };
    assert!(
        control("Depends").contains("openssh-client"),
        "{}",
        control("Depends")
    );
    assert_eq!(control("Section"), "net");
    // No maintainer script, no conffile: the control archive holds control (and md5sums).
    let control_files = stdout(&run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --ctrl-tarfile '{}' | tar -t",
        pkgs.login.display()
    ))));
    assert!(
        control_files
            .lines()
            .map(|l| l.trim_start_matches("./"))
            .all(|l| ["", "control", "md5sums"].contains(&l)),
        "bastide-login has maintainer scripts or conffiles: {control_files}"
    );

    // The installed binary: its help, and a clear error without a bastion (no stray env).
    let help = stdout(&run(Command::new("/usr/bin/bastide-login").arg("--help")));
    assert!(help.contains("--bastion"), "{help}");
    let out = Command::new("/usr/bin/bastide-login")
        .env_remove("BASTIDE_LOGIN_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--bastion"), "{err}");
}

/// The installed binaries are stripped, their debug symbols are in the -dbgsym packages
/// (found by build id, as gdb and systemd-coredump look them up), and the man pages and
/// shell completions generated from the command-line definitions are installed and valid.
#[test]
fn stripped_binaries_dbgsym_man_pages_and_completions() {
    let pkgs = built();
    require("readelf", "binutils");
    for (b, ddeb) in [
        ("/usr/bin/bastide", &pkgs.server_dbg),
        ("/usr/bin/bastide-agent", &pkgs.agent_dbg),
        ("/usr/bin/bastide-login", &pkgs.login_dbg),
    ] {
        let sections = stdout(&run(Command::new("readelf").args(["-S", "-W", b])));
        assert!(
            !sections.contains(".debug_info") && !sections.contains(".debug_line"),
            "{b} is not stripped:\n{sections}"
        );
        let notes = stdout(&run(Command::new("readelf").args(["-n", b])));
        let build_id = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .unwrap_or_else(|| panic!("{b} has no build id:\n{notes}"))
            .trim()
            .to_string();
        let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(ddeb)));
        let debug_file = format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &build_id[..2],
            &build_id[2..]
        );
        assert!(
            listing.contains(&debug_file),
            "{} lacks {debug_file}:\n{listing}",
            ddeb.display()
        );
    }
    for (name, page) in [
        ("bastide", "/usr/share/man/man1/bastide.1.gz"),
        ("bastide", "/usr/share/man/man1/bastide-token-create.1.gz"),
        ("bastide-agent", "/usr/share/man/man1/bastide-agent.1.gz"),
        (
            "bastide-agent",
            "/usr/share/man/man1/bastide-agent-enroll.1.gz",
        ),
        ("bastide-login", "/usr/share/man/man1/bastide-login.1.gz"),
    ] {
        let text = stdout(&run(Command::new("sh").arg("-c").arg(format!(
            "gzip -dc {page} | groff -man -Tutf8 -ww -z 2>&1; gzip -dc {page} | head -c 2000"
        ))));
        assert!(text.contains(".TH"), "{page}: not a man page:\n{text}");
        assert!(!text.contains("warning"), "{page}: groff warns:\n{text}");
        let completion = format!("/usr/share/bash-completion/completions/{name}");
        run(Command::new("bash").arg("-n").arg(&completion));
        assert!(Path::new(&format!("/usr/share/zsh/vendor-completions/_{name}")).is_file());
        assert!(Path::new(&format!("/usr/share/fish/vendor_completions.d/{name}.fish")).is_file());
    }
    // The completion knows the subcommands: bash completes `bastide ag` to `agents`.
    let out = stdout(&run(Command::new("bash").arg("-c").arg(
        "source /usr/share/bash-completion/completions/bastide; \
         COMP_WORDS=(bastide ag); COMP_CWORD=1; COMP_LINE='bastide ag'; COMP_POINT=10; \
         _bastide bastide ag bastide; printf '%s\n' \"${COMPREPLY[@]}\"",
    )));
    assert!(out.lines().any(|l| l == "agents"), "{out}");
}

/// systemd-analyze's own verdict on the installed units: no warning at all.
#[test]
fn units_verify_clean() {
    debs();
    require("systemd-analyze", "systemd");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args([
            "bastide.service",
            "bastide-agent.service",
            "bastide-agent-enroll.service",
        ])
        .current_dir(UNITS)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // Without systemd as PID 1 some versions note that; anything about our units is a fault.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("bastide")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
}

/// Exposure of both daemons (and the enrollment unit) "OK" or better, offline on the unit
/// files as installed.
#[test]
fn units_security_exposure_ok_or_better() {
    debs();
    require("systemd-analyze", "systemd");
    let v = stdout(&run(Command::new("systemd-analyze").arg("--version")));
    let version: u32 = v
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        version >= 250,
        "systemd-analyze security --offline needs systemd 250 or newer, this is {v}"
    );
    for unit in [
        "bastide.service",
        "bastide-agent.service",
        "bastide-agent-enroll.service",
    ] {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("{UNITS}/{unit}")));
        let text = stdout(&out);
        let last = text
            .lines()
            .rev()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no overall exposure for {unit}:\n{text}"));
        let words: Vec<&str> = last.split_whitespace().collect();
        let i = words.iter().position(|w| w.ends_with(':')).unwrap();
        let score: f64 = words[i + 1].parse().unwrap();
        let level = words[i + 2];
        eprintln!("{unit}: exposure {score} {level}");
        assert!(
            ["OK", "SAFE", "PERFECT"].contains(&level) && score < 5.0,
            "{unit}: {last}\n{text}"
        );
    }
}

/// lintian on the six packages: no error, and no warning that the packages' override files
/// (each override with its reason) do not justify.
#[test]
fn lintian_reports_no_errors() {
    let b = built();
    require("lintian", "lintian");
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .args([&b.server, &b.agent, &b.login])
        .args([&b.server_dbg, &b.agent_dbg, &b.login_dbg])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("lintian:\n{text}");
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        errors.is_empty(),
        "lintian errors or unjustified warnings:\n{}",
        errors.join("\n")
    );
    // Exit 0: nothing at or above lintian's fail-on level, and lintian itself ran.
    assert!(out.status.success(), "lintian: {}\n{text}", out.status);
}

/// Debian's python3 with a module from a Debian package (not whatever python3 is first on
/// PATH, which may lack it).
fn debian_python(module: &str, package: &str) -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "/usr/bin/python3 with {module} is required by this test: apt-get install -y {package}"
    );
    python
}

/// A unit file's `Key=` values, in order (enough of systemd's syntax for our own units).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{UNITS}/{unit}")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// systemd's EnvironmentFile= syntax: KEY=VALUE lines, comments, optional quotes.
fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// An ExecStart= line as systemd expands it: `${X}` is one argument, a lone `$X` splits
/// into words (none when empty or unset).
fn expand_exec(line: &str, env: &HashMap<String, String>) -> Vec<String> {
    let line = line.trim_start_matches(['-', '+', '!', '@', ':']);
    let mut args = Vec::new();
    for word in line.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            args.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = word.strip_prefix('$') {
            let v = env.get(name).cloned().unwrap_or_default();
            args.extend(v.split_whitespace().map(str::to_string));
        } else {
            assert!(!word.contains('$'), "unhandled expansion in {word}");
            args.push(word.to_string());
        }
    }
    args
}

/// The first-boot path with the installed packages: the user-data of `bastide token create
/// --cloud-init` provides the enrollment file, the enrollment unit's ExecStart (with the
/// environment systemd would give it: the file, STATE_DIRECTORY) enrolls, and the agent
/// unit's ExecStart connects: the bastion shows the VM online.
#[test]
fn first_boot_enrollment_from_cloud_init_user_data() {
    debs();
    let python = debian_python("yaml", "python3-yaml");
    let mut b = Bastion::init("boot");
    b.start();
    let out = b.cli(&["token", "create", "--cloud-init", "--labels", "role=web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user_data = stdout(&out);
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    // Valid YAML with the cloud-config structure the example documents.
    let tmp = tempfile::tempdir().unwrap();
    let ud = tmp.path().join("user-data");
    std::fs::write(&ud, &user_data).unwrap();
    let parsed = run(Command::new(&python)
        .arg("-c")
        .arg("import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))")
        .arg(&ud));
    let doc: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
    let file = &doc["write_files"][0];
    assert_eq!(file["permissions"], "0600");
    assert_eq!(doc["packages"][0], "bastide-agent");
    assert_eq!(
        doc["runcmd"][0],
        serde_json::json!([
            "systemctl",
            "start",
            "--no-block",
            "bastide-agent-enroll.service"
        ])
    );
    let env_path = file["path"].as_str().unwrap();
    let unit = "bastide-agent-enroll.service";
    assert!(
        unit_values(unit, "EnvironmentFile")
            .iter()
            .any(|p| p.trim_start_matches('-') == env_path),
        "the unit does not read {env_path}"
    );
    let mut env = parse_env_file(file["content"].as_str().unwrap());
    assert_eq!(env["BASTIDE_BASTION"], b.agents_addr);
    assert_eq!(env["BASTIDE_CA_PIN"], b.pin);

    // What systemd does for StateDirectory=bastide-agent, in a fresh directory.
    assert_eq!(unit_values(unit, "StateDirectory"), ["bastide-agent"]);
    let state = tmp.path().join("bastide-agent");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    env.insert("STATE_DIRECTORY".into(), state.display().to_string());
    // The enrollment runs only while the certificate its condition names is missing.
    let cond = unit_values(unit, "ConditionPathExists");
    assert!(cond.contains(&"!/var/lib/bastide-agent/cert.pem".to_string()));
    assert!(!state.join("cert.pem").exists());

    let exec = expand_exec(&unit_values(unit, "ExecStart")[0], &env);
    assert_eq!(exec[0], "/usr/bin/bastide-agent");
    assert!(
        !exec.iter().any(|a| a == &env["BASTIDE_TOKEN"]),
        "token on the command line"
    );
    let enroll = |exec: &[String]| {
        run(Command::new(&exec[0])
            .args(&exec[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(&env))
    };
    let first = stdout(&enroll(&exec));
    assert!(first.contains("enrolled as"), "{first}");
    assert!(
        state.join("cert.pem").is_file(),
        "no certificate where the agent unit's condition looks"
    );
    // A second run (the condition aside) changes nothing.
    assert!(stdout(&enroll(&exec)).contains("already enrolled"));
    let name = first
        .split("enrolled as ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap()
        .to_string();

    // The agent unit's command, with the shipped /etc/bastide/agent.toml.
    let unit = "bastide-agent.service";
    assert_eq!(unit_values(unit, "StateDirectory"), ["bastide-agent"]);
    let exec = expand_exec(&unit_values(unit, "ExecStart")[0], &env);
    assert!(
        exec.contains(&"/etc/bastide/agent.toml".to_string()),
        "{exec:?}"
    );
    let log = tmp.path().join("agent.log");
    let mut agent = Command::new(&exec[0])
        .args(&exec[1..])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let online = b.wait_state(&name, "online", Duration::from_secs(20));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        online,
        "agent {name} not online:\n{}\nbastion:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        b.log_text()
    );
    assert_eq!(b.agent(&name).unwrap()["labels"]["role"], "web");
}

/// `token create --cloud-init` needs an address VMs can dial: with agents.listen on all
/// addresses it asks for --bastion instead of spending a token.
#[test]
fn cloud_init_needs_a_dialable_bastion_address() {
    let mut b = Bastion::init("ci");
    b.edit_config(|c| {
        c.replace(
            &b.agents_addr,
            &b.agents_addr.replace("127.0.0.1", "0.0.0.0"),
        )
    });
    b.start();
    let out = b.cli(&["token", "create", "--cloud-init"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bastion"));
    let list = b.cli_ok(&["token", "list", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap(),
        serde_json::json!([])
    );
    let out = b.cli_ok(&[
        "token",
        "create",
        "--cloud-init",
        "--bastion",
        "bastion.example.org:4443",
    ]);
    assert!(
        out.contains("BASTIDE_BASTION=bastion.example.org:4443\n"),
        "{out}"
    );
    for bad in [
        "x; rm -rf /",
        "bastion.example.org",
        "bastion.example.org:99999",
    ] {
        let out = b.cli(&["token", "create", "--cloud-init", "--bastion", bad]);
        assert!(!out.status.success(), "{bad} accepted");
    }
}

/// Notifications the daemon sends to a NOTIFY_SOCKET the test binds.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> (Self, PathBuf) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        (
            Self {
                sock,
                seen: Vec::new(),
            },
            path,
        )
    }

    /// Waits for a datagram with this line; returns the whole datagram.
    fn wait(&mut self, line: &str, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < timeout {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == line) {
                        return Some(msg);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
        None
    }
}

fn kill(pid: u32, sig: &str) {
    run(Command::new("kill").args([sig, &pid.to_string()]));
}

fn spawn_notified(b: &Bastion, notify: &Path, watchdog_usec: &str) -> std::process::Child {
    Command::new(bin("bastide"))
        .arg("--config")
        .arg(&b.config)
        .arg("serve")
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", watchdog_usec)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&b.log).unwrap())
        .spawn()
        .unwrap()
}

/// READY=1 only once every listener is bound (each accepts a connection the moment READY
/// arrives), watchdog pings at half of WATCHDOG_USEC, RELOADING=1 then READY=1 around a
/// SIGHUP reload, STOPPING=1 on SIGTERM; and no READY at all when a listener cannot bind.
#[test]
fn sd_notify_ready_after_listeners_watchdog_reload_stopping() {
    let b = Bastion::init("notify");
    let (mut notify, path) = Notify::bind(b.dir.path());
    let mut child = spawn_notified(&b, &path, "400000");
    let ready = notify.wait("READY=1", Duration::from_secs(20));
    assert!(
        ready.is_some(),
        "no READY=1: {:?}\n{}",
        notify.seen,
        b.log_text()
    );
    std::net::TcpStream::connect(&b.agents_addr).expect("agents listener bound at READY");
    std::net::TcpStream::connect(&b.metrics_addr).expect("metrics listener bound at READY");
    std::os::unix::net::UnixStream::connect(b.state_dir().join("admin.sock"))
        .expect("admin socket bound at READY");
    assert!(ready.unwrap().contains("STATUS="));

    // Pings every 200 ms: about 7 in 1.5 s (some, however loaded the machine; never a flood).
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        if notify
            .wait("WATCHDOG=1", Duration::from_millis(300))
            .is_some()
        {
            pings += 1;
        }
    }
    assert!((3..=12).contains(&pings), "{pings} watchdog pings in 1.5 s");

    kill(child.id(), "-HUP");
    let reloading = notify.wait("RELOADING=1", Duration::from_secs(10));
    assert!(
        reloading
            .as_deref()
            .is_some_and(|m| m.contains("MONOTONIC_USEC=")),
        "{reloading:?} {:?}",
        notify.seen
    );
    assert!(notify.wait("READY=1", Duration::from_secs(10)).is_some());

    kill(child.id(), "-TERM");
    assert!(
        notify.wait("STOPPING=1", Duration::from_secs(10)).is_some(),
        "{:?}",
        notify.seen
    );
    let st = wait_for(Duration::from_secs(20), || child.try_wait().unwrap()).unwrap();
    assert!(st.success(), "{st}");

    // A listener that cannot bind: the daemon exits with the reason, never READY.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    b.edit_config(|c| c.replace(&b.metrics_addr, &taken_addr));
    std::fs::remove_file(&path).unwrap();
    let (mut notify, path) = Notify::bind(b.dir.path());
    let mut child = spawn_notified(&b, &path, "400000");
    let st = wait_for(Duration::from_secs(20), || child.try_wait().unwrap()).unwrap();
    assert!(!st.success());
    assert!(b.log_text().contains("metrics.listen"), "{}", b.log_text());
    assert!(
        notify.wait("READY=1", Duration::from_millis(300)).is_none(),
        "{:?}",
        notify.seen
    );
}

/// The VM templates render with example values (strict: a misspelt variable fails), and the
/// real tools accept what they render: rsyslogd -N1 the forwarding rule, postconf the relay.
#[test]
fn packaging_templates_render_and_rsyslog_accepts_them() {
    let python = debian_python("jinja2", "python3-jinja2");
    let rsyslogd = require("rsyslogd", "rsyslog");
    let postconf = require("postconf", "postfix");
    let dir = workspace().join("packaging/templates");
    let tmp = tempfile::tempdir().unwrap();
    let vars = serde_json::json!({
        "bastion": {
            "zone": "proj.example.org",
            "services": {
                "dns": [{"host": "10.0.0.1", "port": 53}, {"host": "10.0.0.2", "port": 53}],
                "smtp": [{"host": "10.0.0.1", "port": 25}, {"host": "10.0.0.2", "port": 25}],
                "syslog": [{"host": "10.0.0.1", "port": 514, "protocol": "tcp"}],
            },
            "ssh_user_ca": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtlFkDaDSwC2VsKj2yxzgyhDiZbsNrbjzCtr0rRwc3D bastide SSH user CA",
        },
        "agent": {"name": "web01", "ssh_principals": ["group:ops", "alice"]},
    });
    let render = |name: &str| -> String {
        let out = run(Command::new(&python)
            .arg("-c")
            .arg(
                "import json,sys,jinja2\n\
                 env=jinja2.Environment(undefined=jinja2.StrictUndefined,keep_trailing_newline=True)\n\
                 t=env.from_string(open(sys.argv[1]).read())\n\
                 sys.stdout.write(t.render(**json.loads(sys.argv[2])))",
            )
            .arg(dir.join(name))
            .arg(vars.to_string()));
        stdout(&out)
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".j2"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    let rendered: HashMap<String, String> = names.iter().map(|n| (n.clone(), render(n))).collect();

    let resolved = &rendered["resolved-bastide.conf.j2"];
    assert!(
        resolved.contains("[Resolve]\nDNS=10.0.0.1 10.0.0.2\nDomains=~. proj.example.org\n"),
        "{resolved}"
    );
    let resolv = &rendered["resolv.conf.j2"];
    assert!(
        resolv.contains("nameserver 10.0.0.1\nnameserver 10.0.0.2\nsearch proj.example.org\n"),
        "{resolv}"
    );
    let remotes = &rendered["nullmailer-remotes.j2"];
    assert!(
        remotes.ends_with("\n10.0.0.1 smtp --port=25\n10.0.0.2 smtp --port=25\n"),
        "{remotes}"
    );

    // sshd accepts the single sign-on trust: its configuration with the rendered fragment,
    // the CA file and the principals file (checked by sshd -T for root).
    let principals = &rendered["bastide-principals.j2"];
    let lines: Vec<&str> = principals
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert_eq!(lines, ["group:ops", "alice"], "{principals}");
    let ca = &rendered["bastide-user-ca.pub.j2"];
    assert!(ca.trim_end().ends_with("bastide SSH user CA"), "{ca}");
    let sshd = require("sshd", "openssh-server");
    let ssh_dir = tmp.path().join("ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let host_key = ssh_dir.join("host_key");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key));
    let fragment =
        rendered["sshd-bastide.conf.j2"].replace("/etc/ssh/", &format!("{}/", ssh_dir.display()));
    std::fs::write(ssh_dir.join("bastide_user_ca.pub"), ca).unwrap();
    let sshd_cfg = ssh_dir.join("sshd_config");
    std::fs::write(
        &sshd_cfg,
        format!("HostKey {}\nPidFile none\n{fragment}", host_key.display()),
    )
    .unwrap();
    let out = Command::new(&sshd)
        .args(["-T", "-C", "user=root,host=vm,addr=10.0.0.9", "-f"])
        .arg(&sshd_cfg)
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "sshd -T: {text}");
    assert!(
        text.contains(&format!(
            "trustedusercakeys {}/bastide_user_ca.pub",
            ssh_dir.display()
        )),
        "{text}"
    );
    assert!(text.contains("authorizedprincipalsfile"), "{text}");

    // rsyslog parses the forwarding rule (with a work directory for its disk queue).
    let conf = tmp.path().join("rsyslog.conf");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{}\")\n{}",
            work.display(),
            rendered["rsyslog-forward.conf.j2"]
        ),
    )
    .unwrap();
    let out = Command::new(&rsyslogd)
        .args(["-N1", "-f"])
        .arg(&conf)
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && !text.contains("error"),
        "rsyslogd -N1: {text}"
    );

    // The postfix fragment, applied the way its header says, sets relayhost.
    let pf = tmp.path().join("postfix");
    std::fs::create_dir(&pf).unwrap();
    std::fs::write(pf.join("main.cf"), "myhostname = vm.example.org\n").unwrap();
    let line: String = rendered["postfix-relayhost.cf.j2"]
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    run(Command::new(&postconf)
        .arg("-c")
        .arg(&pf)
        .arg("-e")
        .arg(&line));
    let got = run(Command::new(&postconf)
        .arg("-c")
        .arg(&pf)
        .args(["-h", "relayhost"]));
    assert_eq!(stdout(&got).trim(), "[10.0.0.1]:25, [10.0.0.2]:25");
}
