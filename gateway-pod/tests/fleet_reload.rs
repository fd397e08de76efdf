//! Hot reload in a fleet: two gateway pods behind the front share one config directory with
//! two static eroutes, each for one strongSwan site; each pod holds the claims (in etcd) of
//! the sites it terminates. Removing one eroute from the directory makes every pod reload on
//! its own: the pod holding that site sends it a DELETE and its claim is released, while the
//! other site keeps its SA (same SPIs) and its claim.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions};
use concentrator_e2e::topology::{GW_ID, GW_LAN, site_lan};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, netns, prereq, scratch, strongswan};

mod common;

const PODS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(30);

fn eroute_name(n: usize) -> String {
    format!("hq{n}")
}

/// A static responder eroute for site `n`, with its PSK as a Secret.
fn write_eroute(dir: &Path, n: usize, psk: &str) -> Result<()> {
    let name = eroute_name(n);
    std::fs::create_dir_all(dir.join("secrets").join(&name))?;
    std::fs::write(dir.join("secrets").join(&name).join("psk"), psk)?;
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {name}\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: {}\n  peerId: {}\n  localId: {GW_ID}\n\
             \x20 pskSecretRef:\n    name: {name}\n    key: psk\n  role: Responder\n",
            site_lan(n),
            sites::peer_id(n)
        ),
    )?;
    Ok(())
}

/// The scopes of the site claims in etcd, sorted.
fn claimed_scopes(fleet: &Fleet) -> Result<Vec<String>> {
    let mut scopes: Vec<String> = fleet.claims()?.into_iter().map(|c| c.scope).collect();
    scopes.sort();
    Ok(scopes)
}

fn spis(s: &Site) -> Result<Vec<(Option<String>, Option<String>)>> {
    Ok(s.charon()
        .list_sas()?
        .iter()
        .flat_map(|ike| &ike.children)
        .map(|c| (c.fields.get("spi-in").cloned(), c.fields.get("spi-out").cloned()))
        .collect())
}

#[test]
fn each_pod_reloads_and_releases_the_claims_of_a_removed_eroute() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let dir = scratch::dir("fleet-reload-config")?;
    let config = dir.path().join("config");
    let psks = common::fleet::psks(2);
    for (n, psk) in &psks {
        write_eroute(&config, *n, psk)?;
    }
    let mut fleet = Fleet::new(FleetOptions::new(
        PODS,
        Affinity::client_ip(),
        common::gateway_bin(),
        &config,
    ))?;
    fleet.start_pods()?;
    let started = sites::start_all(fleet.wan(), fleet.front().address(), &psks, 2)?;
    for s in &started {
        s.initiate().with_context(|| fleet.log_tails(20))?;
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == 2.0)
        .with_context(|| fleet.log_tails(30))?;
    let both = ["eroute/hq1", "eroute/hq2"];
    wait::until("both sites claimed", TIMEOUT, || {
        let scopes = claimed_scopes(&fleet)?;
        Ok(if scopes == both {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{scopes:?}"))
        })
    })?;
    let kept = &started[1];
    let before = spis(kept)?;

    std::fs::remove_file(config.join(format!("{}.yaml", eroute_name(1))))?;
    fleet
        .wait_metric_sum("config_reloads_total{result=\"applied\"}", TIMEOUT, |v| {
            v == PODS as f64
        })
        .with_context(|| fleet.log_tails(20))?;
    let removed = &started[0];
    wait::until("the removed eroute's site to hold no SA", TIMEOUT, || {
        Ok(if removed.is_established()? {
            Probe::pending("still up")
        } else {
            Probe::Ready(())
        })
    })
    .with_context(|| fleet.log_tails(20))?;
    wait::until("its claim to be released", TIMEOUT, || {
        let scopes = claimed_scopes(&fleet)?;
        Ok(if scopes == ["eroute/hq2"] {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{scopes:?}"))
        })
    })
    .with_context(|| fleet.log_tails(20))?;
    ensure!(kept.is_established()?, "the other site lost its SA");
    ensure!(spis(kept)? == before, "the other site's SAs changed");
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == 1.0)
        .with_context(|| fleet.log_tails(20))?;
    fleet.check_running()?;
    Ok(())
}
