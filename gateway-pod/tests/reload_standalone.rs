//! Hot reload of a standalone gateway (in-process, `--no-tunnels`) whose user edits the
//! config directory by hand: a file edited in place, a file added and removed, a Secret
//! rotated, an invalid edit refused and counted, and SIGHUP reading the directory again.
//! The tunnels' side is tests/hot_reload.rs.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use concentrator_gateway::{Options, Running, config, start};

const EROUTE: &str = "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: NAME\n\
                      spec:\n  localSubnet: 10.2.0.0/24\n  remoteSubnet: SUBNET\n  peerId: NAME.example\n\
                      \x20 pskSecretRef:\n    name: NAME\n    key: psk\n";

fn eroute(name: &str, subnet: &str) -> String {
    EROUTE.replace("NAME", name).replace("SUBNET", subnet)
}

fn write_psk(dir: &Path, name: &str, psk: &str) {
    std::fs::create_dir_all(dir.join("secrets").join(name)).unwrap();
    std::fs::write(dir.join("secrets").join(name).join("psk"), psk).unwrap();
}

fn reloads(running: &Running, result: &str) -> u64 {
    running
        .gateway
        .metrics
        .snapshot()
        .get(&format!("config_reloads{{result=\"{result}\"}}"))
        .copied()
        .unwrap_or_default()
}

/// Polls `what` until it holds (reloads are looked for every second).
async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_and_sighup_reload_and_invalid_edits_are_refused() {
    let (dir, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let d = dir.path();
    std::fs::write(d.join("hq.yaml"), eroute("hq", "172.16.0.0/24")).unwrap();
    write_psk(d, "hq", "first-key");
    let opts = Options::try_parse_from([
        "concentrator-gateway",
        "--config-dir",
        d.to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-tunnels",
    ])
    .unwrap();
    let running = start(&opts, config::load_dir(d).unwrap()).await.unwrap();
    let gw = running.gateway.clone();
    let eroutes = || gw.config().set.eroutes.keys().cloned().collect::<Vec<_>>();

    // A file added by hand.
    std::fs::write(d.join("lab.yaml"), eroute("lab", "172.17.0.0/24")).unwrap();
    write_psk(d, "lab", "lab-key");
    until("the added eroute", || eroutes() == ["hq", "lab"]).await;
    assert_eq!(reloads(&running, "applied"), 1);
    assert_eq!(gw.metrics.eroutes.get(), 2);

    // A file edited in place and a Secret rotated, together.
    std::fs::write(d.join("hq.yaml"), eroute("hq", "172.16.1.0/24")).unwrap();
    write_psk(d, "hq", "second-key");
    until("the edited eroute", || {
        gw.config().set.eroutes["hq"].remote_subnet.to_string() == "172.16.1.0/24"
    })
    .await;
    assert_eq!(gw.config().static_psks["hq"].expose(), b"second-key");

    // An invalid edit: refused, named, and the configuration in force stays.
    std::fs::write(d.join("lab.yaml"), eroute("lab", "172.17.0.1/24")).unwrap();
    until("the refusal", || reloads(&running, "refused") == 1).await;
    assert_eq!(eroutes(), ["hq", "lab"]);
    assert_eq!(
        gw.config().set.eroutes["lab"].remote_subnet.to_string(),
        "172.17.0.0/24"
    );
    let applied = reloads(&running, "applied");

    // Fixed by removing the file: applied, the eroute is gone.
    std::fs::remove_file(d.join("lab.yaml")).unwrap();
    until("the removal", || eroutes() == ["hq"]).await;
    assert_eq!(reloads(&running, "applied"), applied + 1);

    // SIGHUP reads the directory again even when nothing changed.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    until("the SIGHUP reload", || {
        reloads(&running, "applied") == applied + 2
    })
    .await;
    assert_eq!(reloads(&running, "refused"), 1);
    running.shutdown().await;
}
