//! `kubectl concentrator` against a real fleet: three gateway pods with strongSwan sites,
//! the plugin run in the pod network (`--direct`, a pod's admin API, over mutual TLS with the
//! fleet's certificate). `tunnels` lists every site once, with the pod that holds it, in one
//! table and as JSON; `status` shows the three pods and each member's shards, which add up
//! to the fleet's; `sites import` puts a new site's row in each pod's store, and the site
//! connects, while a bad file is refused with its line named and nothing written; `drain`
//! and `undrain` reach the pod. (Through the API server's port-forward it needs a cluster
//! that runs pods.)
//!
//! Needs the plugin binary next to this test's (`cargo test --workspace` builds it); as
//! non-root the test prints SKIP and passes.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::sites::{Site, peer_id};
use concentrator_e2e::fleet::{self, sites};
use concentrator_e2e::netns::addr;
use concentrator_e2e::topology::{GW_HOST, site_lan};
use concentrator_e2e::{etcd, ids, netns, prereq, scratch, strongswan};
use concentrator_fleet::SHARDS;
use concentrator_gateway::sitedb::{LookupError, SiteStore};
use concentrator_gateway::sites::default_table;

mod common;

use common::fleet_sites::{TIMEOUT, fleet_of, owners_of_sites};

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
    // The plugin in pod 0's namespace, at pod `i`'s admin API; `output` whatever its status.
    let args_at = |i: usize, args: &[&str]| -> Result<Vec<String>> {
        let mut all = vec![
            "--direct".to_owned(),
            format!("{}:50051", fleet::pod_ip(i)),
            "--admin-tls-dir".to_owned(),
            tls.to_str().context("path")?.to_owned(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Ok(all)
    };
    let run_at = |i: usize, args: &[&str]| -> Result<String> {
        let all = args_at(i, args)?;
        pod.ns()
            .run(&bin, &all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let run = |args: &[&str]| run_at(0, args);

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
    eprintln!("{status}");
    ensure!(
        status.contains("active") && status.contains(" 3"),
        "status:\n{status}"
    );
    check_shards(&status, &run(&["-o", "json", "status"])?)?;

    // sites import: a new site's row into every pod's store (each pod keeps its own), then
    // the site connects through the front, whichever pod it lands on.
    let new = n + 1;
    let psk = ids::random_hex(24);
    let files = scratch::dir("kubectl-sites")?;
    let good = files.path().join("new-sites.csv");
    std::fs::write(
        &good,
        format!(
            "peer_id,psk,remote_subnet\n{},{psk},{}\n",
            peer_id(new),
            site_lan(new)
        ),
    )?;
    let good = good.to_str().context("path")?;
    for i in 0..3 {
        let out = run_at(i, &["sites", "import", good, "--prefix", "24"])?;
        ensure!(
            out.contains("imported 1 site(s)") && out.contains("embedded store"),
            "pod {i}: {out}"
        );
    }
    let site =
        stored(&fleet.pod(0).data_dir(), &peer_id(new))?.context("imported site not in pod 0's store")?;
    ensure!(site == (psk.clone(), site_lan(new)), "pod 0 stores {site:?}");
    let s = Site::start(fleet.wan(), fleet.front().address(), new, &psk)?;
    s.initiate()?;
    s.wait_ping(addr(GW_HOST), TIMEOUT)
        .with_context(|| fleet.log_tails(30))?;

    // A bad row: the import is refused with the line and column named, and nothing (not
    // the good row before it) is written.
    let bad = files.path().join("bad-sites.csv");
    std::fs::write(
        &bad,
        format!(
            "peer_id,psk,remote_subnet\n{},{psk},{}\n{},{psk},10.1.{}.0/25\n",
            peer_id(new + 1),
            site_lan(new + 1),
            peer_id(new + 2),
            new + 2
        ),
    )?;
    let all = args_at(
        0,
        &["sites", "import", bad.to_str().context("path")?, "--prefix", "24"],
    )?;
    let out = pod
        .ns()
        .output(&bin, &all.iter().map(String::as_str).collect::<Vec<_>>())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    ensure!(!out.status.success(), "a bad file was accepted: {stderr}");
    ensure!(
        stderr.contains("line 3: ") && stderr.contains("column remote_subnet") && !stderr.contains(&psk),
        "refusal: {stderr}"
    );
    ensure!(
        stored(&fleet.pod(0).data_dir(), &peer_id(new + 1))?.is_none(),
        "the good row of a bad file was written"
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

/// `status` (its table, and its JSON) shows every member's shards, as one pod applied the
/// map: they add up to the fleet's shards, one replica each (`fleet_of(.., 1, ..)`), none
/// moving.
fn check_shards(table: &str, json: &str) -> Result<()> {
    let total = u32::from(SHARDS);
    ensure!(
        table.contains(&format!("{total} shards, 0 unowned, 1 replica(s) each")),
        "status:\n{table}"
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip_while(|l| !l.starts_with("MEMBER"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(rows.len() == 3, "members:\n{table}");
    let mut owned = 0;
    for (i, r) in rows.iter().enumerate() {
        ensure!(r[0] == fleet::pod_name(i) && r.len() == 6, "row {r:?}");
        let n: u32 = r[2].parse()?;
        ensure!(n > 0, "{} owns no shard", r[0]);
        owned += n;
    }
    ensure!(
        owned == total,
        "the members own {owned} of {total} shards:\n{table}"
    );

    let j: serde_json::Value = serde_json::from_str(json)?;
    let s = &j["shards"];
    let members = s["members"].as_array().context("no shards in the JSON status")?;
    let sum = |k: &str| members.iter().filter_map(|m| m[k].as_u64()).sum::<u64>();
    ensure!(s["total"] == total && members.len() == 3, "{s}");
    ensure!(
        sum("owned") == u64::from(total) && sum("replica") == u64::from(total),
        "{s}"
    );
    ensure!(sum("handingOver") == 0 && sum("takingOver") == 0, "{s}");
    Ok(())
}

/// Site `peer`'s PSK and subnet in the embedded store in `data_dir` (read beside the running
/// gateway), if it is there.
fn stored(data_dir: &std::path::Path, peer: &str) -> Result<Option<(String, String)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = SiteStore::open_embedded(data_dir).await?;
        let found = store
            .site_by_peer_id(&default_table(), peer, 24, std::time::Duration::from_secs(2))
            .await;
        store.close().await;
        match found {
            Ok(s) => Ok(Some((
                String::from_utf8_lossy(s.psk.expose()).into_owned(),
                s.remote_subnet.to_string(),
            ))),
            Err(LookupError::NotFound) => Ok(None),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    })
}
