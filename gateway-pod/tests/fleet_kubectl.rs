//! `kubectl concentrator` against a real fleet: three gateway pods with strongSwan sites,
//! the plugin run in the pod network (`--direct`, a pod's admin API, over mutual TLS with the
//! fleet's certificate). `tunnels` lists every site once, with the pod that holds it, in one
//! table and as JSON; `status` shows the three pods; `drain` and `undrain` reach the pod.
//! (Through the API server's port-forward it needs a cluster that runs pods.)
//!
//! Needs the plugin binary next to this test's (`cargo test --workspace` builds it); as
//! non-root the test prints SKIP and passes.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::{self, sites};
use concentrator_e2e::{etcd, netns, prereq, strongswan};

mod common;

use common::fleet_sites::{fleet_of, owners_of_sites};

/// `kubectl-concentrator`, built beside this test by `cargo test --workspace`.
fn plugin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("kubectl-concentrator");
    bin.is_file().then_some(bin)
}

#[test]
fn the_plugin_lists_a_fleets_tunnels_with_their_pods() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let Some(bin) = plugin() else {
        eprintln!(
            "SKIP: no kubectl-concentrator binary beside the test (cargo build -p kubectl-concentrator)"
        );
        return Ok(());
    };
    let n = 9;
    let (_config, fleet, started, _) = fleet_of(3, 1, n, &sites::SiteOptions::default(), &[])?;
    let pod = fleet.pod(0);
    let tls = pod.admin_tls_dir();
    let direct = format!("{}:50051", fleet::pod_ip(0));
    let run = |args: &[&str]| -> Result<String> {
        let mut all = vec![
            "--direct",
            &direct,
            "--admin-tls-dir",
            tls.to_str().context("path")?,
        ];
        all.extend_from_slice(args);
        pod.ns().run(&bin, &all)
    };

    let table = run(&["tunnels"])?;
    eprintln!("{table}");
    let owners = owners_of_sites(&fleet, &started)?;
    for (s, o) in started.iter().zip(&owners) {
        let line = table
            .lines()
            .find(|l| l.starts_with(&s.peer_id()))
            .with_context(|| format!("site {} missing:\n{table}", s.n()))?;
        ensure!(
            line.ends_with(&fleet::pod_name(*o)),
            "site {} listed as {line:?}, held by {}",
            s.n(),
            fleet::pod_name(*o)
        );
    }
    let json: serde_json::Value = serde_json::from_str(&run(&["-o", "json", "tunnels"])?)?;
    ensure!(json.as_array().map(Vec::len) == Some(n), "JSON lists {json}");

    let status = run(&["status"])?;
    ensure!(
        status.contains("active") && status.contains(" 3"),
        "status:\n{status}"
    );
    let drained = run(&["drain"])?;
    ensure!(
        drained.contains("draining") || drained.contains("drained"),
        "drain: {drained}"
    );
    let undrained = run(&["undrain"])?;
    ensure!(undrained.contains("active"), "undrain: {undrained}");
    Ok(())
}
