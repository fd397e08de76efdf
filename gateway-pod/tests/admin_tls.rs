//! The admin API's mutual TLS with real certificates (made here by a test CA): only clients
//! whose certificate the configured CA signed get an answer; plaintext is for loopback only;
//! the `tunnels` command presents its certificate.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use concentrator_e2e::pki::TestCa;
use concentrator_e2e::ports::free_tcp_port;
use concentrator_gateway::{Options, Running, StartError, config, start};
use concentrator_proto::admin::ListEroutesRequest;
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use concentrator_proto::tls::{AdminTls, ClientTls, DEFAULT_SERVER_NAME};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");

fn examples() -> String {
    format!("{}/../examples", env!("CARGO_MANIFEST_DIR"))
}

fn options(data: &Path, listen: &str, tls: Option<&Path>) -> Options {
    let mut args = vec![
        "concentrator-gateway".to_owned(),
        "--config-dir".into(),
        examples(),
        "--data-dir".into(),
        data.display().to_string(),
        "--admin-listen".into(),
        listen.into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--no-tunnels".into(),
    ];
    if let Some(dir) = tls {
        args.extend(["--admin-tls-dir".into(), dir.display().to_string()]);
    }
    Options::try_parse_from(args).unwrap()
}

async fn start_with(opts: &Options) -> Result<Running, StartError> {
    let cfg = config::load_dir(opts.config_dir.as_deref().unwrap()).unwrap();
    start(opts, cfg).await
}

/// Lists the eroutes over `endpoint`; the error's text if refused (within 5 s).
async fn list_eroutes(endpoint: Endpoint) -> Result<usize, String> {
    let asked = async {
        let ch = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        GatewayAdminClient::new(ch)
            .list_eroutes(ListEroutesRequest {})
            .await
            .map(|r| r.into_inner().eroutes.len())
            .map_err(|s| format!("{s:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .unwrap_or_else(|_| Err("no answer within 5 s".into()))
}

fn https(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
}

#[tokio::test]
async fn only_clients_with_a_certificate_of_the_ca_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet CA").unwrap();
    let other = TestCa::new("another CA").unwrap();
    let server = ca
        .issue(&dir.path().join("server"), &[DEFAULT_SERVER_NAME])
        .unwrap();
    let client = ca.issue(&dir.path().join("client"), &["operator"]).unwrap();
    // Trusts the right CA, but its own certificate comes from another.
    let stranger = other
        .issue_trusting(&dir.path().join("stranger"), &["operator"], &ca.pem())
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let running = start_with(&options(data.path(), "127.0.0.1:0", Some(&server)))
        .await
        .unwrap();
    let addr = running.admin_addr;

    let good = ClientTls {
        files: AdminTls::load(&client).unwrap(),
        server_name: DEFAULT_SERVER_NAME.into(),
    };
    let ep = concentrator_proto::tls::endpoint(&addr.to_string(), Some(&good)).unwrap();
    assert_eq!(list_eroutes(ep).await, Ok(2), "the CA's client is answered");

    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name(DEFAULT_SERVER_NAME);
    let refused = list_eroutes(https(addr, no_cert)).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("CertificateRequired")),
        "a client without a certificate: {refused:?}"
    );

    let strange = AdminTls::load(&stranger).unwrap();
    let refused = list_eroutes(https(addr, strange.client_config(DEFAULT_SERVER_NAME))).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownCA")),
        "a certificate of another CA: {refused:?}"
    );

    let plain = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let refused = list_eroutes(plain).await;
    assert!(refused.is_err(), "plaintext: {refused:?}");

    // The server's certificate must carry the expected name, whatever the address.
    let wrong_name = ClientTls {
        server_name: "someone-else".into(),
        ..good.clone()
    };
    let ep = concentrator_proto::tls::endpoint(&addr.to_string(), Some(&wrong_name)).unwrap();
    assert!(
        list_eroutes(ep).await.is_err(),
        "a server certificate without the name"
    );

    // And the right client is still answered after those refusals.
    let ep = concentrator_proto::tls::endpoint(&addr.to_string(), Some(&good)).unwrap();
    assert_eq!(list_eroutes(ep).await, Ok(2));
    running.shutdown().await;
}

#[tokio::test]
async fn plaintext_is_refused_beyond_loopback() {
    let data = tempfile::tempdir().unwrap();
    let Err(e) = start_with(&options(data.path(), "0.0.0.0:0", None)).await else {
        panic!("a plaintext admin API on every address started");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("0.0.0.0:0") && msg.contains("--admin-tls-dir") && msg.contains("loopback"),
        "{msg}"
    );
    assert!(
        !data.path().join("sites.db").exists(),
        "refused before anything was created"
    );

    // With TLS, every address is fine.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet CA").unwrap();
    let server = ca
        .issue(&dir.path().join("server"), &[DEFAULT_SERVER_NAME])
        .unwrap();
    let running = start_with(&options(data.path(), "0.0.0.0:0", Some(&server)))
        .await
        .unwrap();
    running.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_are_named_at_start() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet CA").unwrap();
    let server = ca
        .issue(&dir.path().join("server"), &[DEFAULT_SERVER_NAME])
        .unwrap();
    std::fs::write(server.join("ca.crt"), "not a certificate").unwrap();
    let Err(e) = start_with(&options(data.path(), "127.0.0.1:0", Some(&server))).await else {
        panic!("started with a ca.crt that holds no certificate");
    };
    assert!(e.to_string().contains("ca.crt"), "{e}");
    std::fs::remove_file(server.join("tls.key")).unwrap();
    let Err(e) = start_with(&options(data.path(), "127.0.0.1:0", Some(&server))).await else {
        panic!("started without tls.key");
    };
    assert!(e.to_string().contains("tls.key"), "{e}");
}

#[test]
fn tunnels_command_presents_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet CA").unwrap();
    let server = ca
        .issue(&dir.path().join("server"), &[DEFAULT_SERVER_NAME])
        .unwrap();
    let client = ca.issue(&dir.path().join("client"), &["admin"]).unwrap();
    let data = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_tcp_port().unwrap());
    /// Kills the gateway however the test ends (a failed assertion included).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut gateway = Command::new(BIN)
        .args(["--config-dir", &examples()])
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--admin-listen",
            &admin,
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-tunnels",
        ])
        .env("CONCENTRATOR_ADMIN_TLS_DIR", &server)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Killed)
        .unwrap();
    let tunnels = |tls: Option<&Path>| {
        let mut c = Command::new(BIN);
        c.args(["--admin-listen", &admin]);
        if let Some(d) = tls {
            c.arg("--admin-tls-dir").arg(d);
        }
        c.arg("tunnels");
        c.output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = tunnels(Some(&client));
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        assert!(gateway.0.try_wait().unwrap().is_none(), "gateway exited early");
        std::thread::sleep(Duration::from_millis(200));
    };
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.starts_with("PEER ID"),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tunnels(None);
    assert!(
        !out.status.success(),
        "tunnels without a certificate was answered"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the admin API") || err.contains("tunnels:"),
        "{err}"
    );
    drop(gateway);
}

/// Replaces `dir`'s three files by those of `from`, each by a rename (as kubelet swaps a
/// Secret volume's files: a reader sees the old file or the new one, never half of one).
fn swap_files(from: &Path, dir: &Path) {
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::rename(from.join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test]
async fn renewed_files_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA").unwrap();
    let server = old_ca
        .issue(&dir.path().join("server"), &[DEFAULT_SERVER_NAME])
        .unwrap();
    let client = |ca: &TestCa, name: &str| ClientTls {
        files: AdminTls::load(&ca.issue(&dir.path().join(name), &["admin"]).unwrap()).unwrap(),
        server_name: DEFAULT_SERVER_NAME.into(),
    };
    let old_client = client(&old_ca, "old-client");
    let data = tempfile::tempdir().unwrap();
    let running = start_with(&options(data.path(), "127.0.0.1:0", Some(&server)))
        .await
        .unwrap();
    let addr = running.admin_addr.to_string();
    let ask = |c: &ClientTls| list_eroutes(concentrator_proto::tls::endpoint(&addr, Some(c)).unwrap());
    assert_eq!(ask(&old_client).await, Ok(2));

    // A new CA, a new server certificate: swapped in while the gateway runs.
    let new_ca = TestCa::new("new CA").unwrap();
    swap_files(
        &new_ca
            .issue(&dir.path().join("renewed"), &[DEFAULT_SERVER_NAME])
            .unwrap(),
        &server,
    );
    let new_client = client(&new_ca, "new-client");
    tokio::time::sleep(concentrator_gateway::admin::incoming::RECHECK + Duration::from_millis(200)).await;
    assert_eq!(ask(&new_client).await, Ok(2), "the new files are used");
    assert!(ask(&old_client).await.is_err(), "the old CA's client is refused");

    // Files that stop being usable leave the last good ones in use.
    std::fs::write(server.join("ca.crt"), "garbage").unwrap();
    tokio::time::sleep(concentrator_gateway::admin::incoming::RECHECK + Duration::from_millis(200)).await;
    assert_eq!(ask(&new_client).await, Ok(2), "the last good files stay in use");
    running.shutdown().await;
}
