//! The real binary: `--check`, exit codes, environment variables, start-up and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concentrator_e2e::ports::free_tcp_port;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn check_accepts_the_examples() {
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(examples())
        .arg("--check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("eroute branches:"), "{stdout}");
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn check_refuses_a_bad_document_with_exit_2_and_the_field() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("bad.yaml"),
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata: {name: x}\nspec:\n  localSubnet: 10.0.0.0/40\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n",
    )
    .unwrap();
    // The directory comes from the environment this time.
    let out = Command::new(BIN)
        .env("CONCENTRATOR_CONFIG_DIR", d.path())
        .env("CONCENTRATOR_CHECK", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml (document 1)") && err.contains("spec.localSubnet"),
        "{err}"
    );
}

#[test]
fn help_documents_every_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CONCENTRATOR_CONFIG_DIR",
        "CONCENTRATOR_DATA_DIR",
        "CONCENTRATOR_SITE_DB",
        "CONCENTRATOR_ADMIN_LISTEN",
        "CONCENTRATOR_METRICS_LISTEN",
        "CONCENTRATOR_LOG_FORMAT",
        "CONCENTRATOR_CHECK",
    ] {
        assert!(help.contains(var), "--help lacks {var}:\n{help}");
    }
}

#[test]
fn serves_until_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (admin, metrics) = (free_tcp_port().unwrap(), free_tcp_port().unwrap());
    let mut child = Command::new(BIN)
        .arg("--config-dir")
        .arg(examples())
        .arg("--data-dir")
        .arg(data.path())
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        // Admin and metrics only: this test needs no tunnels (and no privileges).
        .arg("--no-tunnels")
        .args(["--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = None;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("gateway ready") => {
                ready = Some(line);
                break;
            }
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("gateway exited early: {status}");
        }
    }
    let line = ready.expect("gateway logs 'gateway ready' within 20s");
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(v["admin"], format!("127.0.0.1:{admin}"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", metrics)).is_ok());

    // The status view talks to the running gateway's admin API.
    let admin_addr = format!("127.0.0.1:{admin}");
    let out = Command::new(BIN)
        .args(["--admin-listen", &admin_addr, "tunnels"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.starts_with("PEER ID"),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(table.lines().count(), 1, "no tunnels yet: header only");
    let out = Command::new(BIN)
        .args(["--admin-listen", &admin_addr, "tunnels", "--peer-id", "a b"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed pattern is refused by the gateway"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not stop within 10s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn migrate_and_import_sites_into_the_embedded_store() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(data.path())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = data.path().join("sites.csv");
    std::fs::write(&csv, "peer_id,psk,remote_subnet,peer_address\na.sites,k1,10.128.1.0/24,192.0.2.1\nb.sites,k2,10.128.2.0/24,\n")
        .unwrap();
    let out = Command::new(BIN)
        .env("CONCENTRATOR_DATA_DIR", data.path())
        .args(["sites", "import", "--prefix", "24"])
        .arg(&csv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("imported 2 site(s)"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad file: exit 2, the line named, the PSK not shown.
    std::fs::write(&csv, "peer_id,psk,remote_subnet\nc.sites,hunter2,10.128.3.0/23\n").unwrap();
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(data.path())
        .args(["sites", "import", "--prefix", "24"])
        .arg(&csv)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
}
