//! Our gateway as a site follows RFC 5685 redirects: it keeps an eroute up toward a first
//! gateway (role Initiator, `peerAddress`), that gateway redirects every new site to a second
//! one (`--redirect-to`, as a fleet director in VIP mode does), and the site's tunnel comes up
//! with the second gateway and carries traffic, without waiting for a reconnect backoff.
//!
//! As non-root every test prints SKIP and passes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::gateway::{Gateway, metric};
use concentrator_e2e::netns::{self, Wan, addr};
use concentrator_e2e::topology::{GW_HOST, GW_ID, GW_LAN, SITE_ADDR, SITE_HOST, SITE_ID, SITE_LAN};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch, tools};

mod common;

use common::StaticEroute;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const GW1_ADDR: &str = "192.0.2.2";
const GW2_ADDR: &str = "192.0.2.3";
const TIMEOUT: Duration = Duration::from_secs(20);

/// One eroute and its PSK Secret: the head-end's view (responder) or the site's (initiator
/// toward `peer`).
fn eroute<'a>(psk: &'a str, site_to: Option<&'a str>) -> StaticEroute<'a> {
    let ((local_subnet, remote_subnet), (local_id, peer_id)) = match site_to {
        Some(_) => ((SITE_LAN, GW_LAN), (SITE_ID, GW_ID)),
        None => ((GW_LAN, SITE_LAN), (GW_ID, SITE_ID)),
    };
    StaticEroute {
        name: "tunnel",
        local_subnet,
        remote_subnet,
        peer_id,
        local_id,
        initiate_to: site_to,
        ike: "aes128gcm16-prfsha256-x25519",
        esp: "aes128gcm16",
        psk,
        ..StaticEroute::default()
    }
}

#[test]
fn a_gateway_keeping_a_tunnel_up_follows_a_redirect_to_another_gateway() -> Result<()> {
    if prereq::require(&[netns::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let wan = Wan::new()?;
    let site = wan.host("rdsite", SITE_ADDR, Some(SITE_HOST))?;
    let gw1 = wan.host("rdgw1", GW1_ADDR, Some(GW_HOST))?;
    let gw2 = wan.host("rdgw2", GW2_ADDR, Some(GW_HOST))?;
    site.wait_reachable(None, addr(GW2_ADDR), Duration::from_secs(5))?;

    let dir = scratch::dir("ike-redirect")?;
    for name in ["gw1", "gw2"] {
        eroute(&psk, None).write(&dir.path().join(format!("{name}-config")))?;
    }
    eroute(&psk, Some(GW1_ADDR)).write(&dir.path().join("site-config"))?;
    // The first gateway sends every new site to the second (RFC 5685 §4.1, in IKE_SA_INIT).
    let bin = Path::new(BIN);
    let first = Gateway::start(
        &gw1,
        bin,
        dir.path(),
        "gw1",
        GW1_ADDR,
        &["--redirect-to", GW2_ADDR],
    )?;
    let second = Gateway::start(&gw2, bin, dir.path(), "gw2", GW2_ADDR, &[])?;
    let started = Instant::now();
    let site_gw = Gateway::start(&site, bin, dir.path(), "site", SITE_ADDR, &[])?;
    let logs = || {
        format!(
            "site:\n{}\ngw1:\n{}\ngw2:\n{}",
            site_gw.log_tail(30),
            first.log_tail(15),
            second.log_tail(15)
        )
    };

    wait::until("the site's tunnel to the second gateway", TIMEOUT, || {
        let tunnels = gw2.run(BIN, &["tunnels"])?;
        Ok(if tunnels.contains(SITE_ID) {
            Probe::Ready(())
        } else {
            Probe::pending(tunnels)
        })
    })
    .with_context(logs)?;
    // Followed at once, not after the 2 s reconnect backoff of a failed attempt (plus the
    // time the first attempt lingers).
    let took = started.elapsed();
    ensure!(
        took < Duration::from_secs(8),
        "the redirect took {took:?} to follow\n{}",
        logs()
    );
    ensure!(
        metric(
            &gw1,
            "concentrator_gateway_ike_dropped_total{reason=\"redirected\"}"
        )? >= 1.0,
        "the first gateway did not redirect\n{}",
        logs()
    );
    ensure!(
        metric(&gw1, "concentrator_gateway_ike_sas_established")? == 0.0,
        "the first gateway kept an SA"
    );
    ensure!(
        logs::contains(&site_gw.log, "redirected: connecting to the gateway named"),
        "the site did not log the redirect\n{}",
        logs()
    );
    let site_tunnels = site.run(BIN, &["tunnels"])?;
    ensure!(site_tunnels.contains(GW2_ADDR), "site tunnels:\n{site_tunnels}");
    site.wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(logs)?;
    gw2.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(logs)?;
    Ok(())
}
