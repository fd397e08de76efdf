//! The gateway as users run it, against real strongSwan sites: a site namespace running
//! charon (kernel-libipsec) initiates to `concentrator-gateway` in the gateway namespace,
//! configured with one static `Eroute` and its PSK Secret, no database. Both list the SAs,
//! ping crosses the tunnel both ways and a file sent over TCP arrives intact; a wrong PSK, an
//! unknown identity and a proposal mismatch fail cleanly and leave no state behind.
//!
//! As non-root every test prints SKIP and passes.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::strongswan::{self, Charon};
use concentrator_e2e::topology::{GW_HOST, SITE_HOST, SITE_ID, SITE_LAN};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch, tools};

mod common;

use common::site::{GatewayOptions, SiteGateway, TIMEOUT, eroute};

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");

fn carries_traffic(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = SiteGateway::start("ss", ike, esp, &psk)?;
    s.charon().load(&[s.connection(ike, esp, &psk, SITE_ID)])?;
    s.charon().initiate("gw").with_context(|| s.logs())?;
    let child = s
        .charon()
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.logs())?;
    ensure!(child.state == "INSTALLED", "child state {}", child.state);

    // Ours lists the tunnel too.
    let tunnels = s.tunnels()?;
    ensure!(
        tunnels.contains(SITE_ID) && tunnels.contains("site-a") && tunnels.contains(SITE_LAN),
        "tunnels:\n{tunnels}"
    );
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)?;

    // Ping both ways through the tunnel, then a checksummed TCP transfer both ways.
    s.ping_from_site()?;
    s.ping_from_gw()?;
    common::tcp_transfer(&s.site, SITE_HOST, &s.gw, GW_HOST, s.dir.path()).with_context(|| s.logs())?;
    common::tcp_transfer(&s.gw, GW_HOST, &s.site, SITE_HOST, s.dir.path()).with_context(|| s.logs())?;
    ensure!(
        s.metric("concentrator_gateway_esp_packets_in_total")? > 100.0,
        "ESP in counter"
    );
    ensure!(
        s.metric("concentrator_gateway_esp_packets_out_total")? > 100.0,
        "ESP out counter"
    );

    // The admin API's byte counters follow the traffic (refreshed every second).
    wait::until("the tunnel's byte counters", TIMEOUT, || {
        let table = s.tunnels()?;
        let row: Vec<String> = table
            .lines()
            .find(|l| l.starts_with(SITE_ID))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let bytes = |i: usize| row.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(if bytes(6) > 2_000_000 && bytes(7) > 2_000_000 {
            Probe::Ready(())
        } else {
            Probe::pending(table)
        })
    })?;
    Ok(())
}

mod strongswan_site_carries_traffic_with {
    concentrator_test_util::proposal_matrix!(super::carries_traffic);
}

/// Refused negotiations: strongSwan sees the notify, we count it, and no SA stays behind.
fn refused(ike_site: &str, psk_site: &str, id_site: &str, notify: &str, reason: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let s = SiteGateway::start("ss", ike, "aes128gcm16", "the-right-psk")?;
    s.charon()
        .load(&[s.connection(ike_site, "aes128gcm16", psk_site, id_site)])?;
    let _ = s.charon().initiate("gw");
    s.charon()
        .wait_logged(notify, TIMEOUT)
        .with_context(|| s.logs())?;
    s.wait_metric(
        &format!("concentrator_gateway_ike_failures_total{{reason=\"{reason}\"}}"),
        1.0,
    )
    .with_context(|| s.logs())?;
    // No state leaked: the half-open SA is forgotten, nothing was established.
    s.wait_metric("concentrator_gateway_ike_sas_established", 0.0)?;
    s.wait_metric("concentrator_gateway_ike_sas_half_open", 0.0)
        .with_context(|| s.logs())?;
    let tunnels = s.tunnels()?;
    ensure!(!tunnels.contains(SITE_ID), "a refused site is listed:\n{tunnels}");
    Ok(())
}

#[test]
fn wrong_psk_fails_with_authentication_failed_and_leaves_no_state() -> Result<()> {
    refused(
        "aes128gcm16-prfsha256-x25519",
        "a-wrong-psk",
        SITE_ID,
        "AUTHENTICATION_FAILED",
        "authentication_failed",
    )
}

#[test]
fn unknown_identity_fails_with_authentication_failed() -> Result<()> {
    refused(
        "aes128gcm16-prfsha256-x25519",
        "the-right-psk",
        "stranger.example",
        "AUTHENTICATION_FAILED",
        "unknown_peer",
    )
}

#[test]
fn proposal_mismatch_fails_with_no_proposal_chosen() -> Result<()> {
    refused(
        "aes256-sha512-modp3072",
        "the-right-psk",
        SITE_ID,
        "NO_PROPOSAL_CHOSEN",
        "no_proposal_chosen",
    )
}

/// The route to the site's subnet through our TUN device, as `ip route` prints it.
fn site_route(s: &SiteGateway) -> Result<String> {
    Ok(s.gw.run("ip", &["route", "show", SITE_LAN])?.trim().to_owned())
}

#[test]
fn a_site_that_deletes_its_ike_sa_leaves_no_tunnel_and_no_route() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = SiteGateway::start("ss", ike, "aes128gcm16", &psk)?;
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    ensure!(site_route(&s)?.contains("concentrator0"), "no route to the site");
    s.charon()
        .swanctl(&["--terminate", "--ike", "gw", "--timeout", "10"])
        .with_context(|| s.logs())?;
    s.wait_metric("concentrator_gateway_ike_sas_established", 0.0)
        .with_context(|| s.logs())?;
    wait::until("the tunnel and its route to go", TIMEOUT, || {
        let (tunnels, route) = (s.tunnels()?, site_route(&s)?);
        Ok(if !tunnels.contains(SITE_ID) && route.is_empty() {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{tunnels}\nroute: {route}"))
        })
    })?;
    // The site can come back at once.
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))
}

#[test]
fn a_standalone_gateway_that_stops_tells_its_sites() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = SiteGateway::start("st", ike, "aes128gcm16", &psk)?;
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    // SIGTERM: no fleet carries the tunnel on, so the site is sent an IKE DELETE.
    let pid = s.gateway.pid().to_string();
    concentrator_e2e::process::run(
        std::process::Command::new("kill").args(["-TERM", &pid]),
        concentrator_e2e::process::COMMAND_TIMEOUT,
    )?;
    wait::until("the gateway to exit", TIMEOUT, || {
        Ok(match s.gateway.exit_status()? {
            Some(st) => Probe::Ready(st),
            None => Probe::pending(s.gateway.log_tail(5)),
        })
    })?;
    wait::until("the site to drop its IKE SA", TIMEOUT, || {
        let sas = s.charon().swanctl(&["--list-sas"])?;
        Ok(if sas.contains("ESTABLISHED") {
            Probe::pending(sas)
        } else {
            Probe::Ready(())
        })
    })
    .with_context(|| s.logs())?;
    ensure!(
        logs::contains(s.charon().log_path(), "received DELETE for IKE_SA"),
        "the site's IKE SA ended without our DELETE:\n{}",
        s.logs()
    );
    Ok(())
}

#[test]
fn child_and_ike_sa_rekeys_keep_a_tcp_stream_alive() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = SiteGateway::start("ss", ike, "aes128gcm16-x25519", &psk)?;
    let mut c = s.connection(ike, esp, &psk, SITE_ID);
    // strongSwan rekeys (as initiator) the CHILD SA every 3 s with PFS and the IKE SA every
    // 5 s, while a paced TCP stream runs for 12 s.
    c.child_extra
        .extend(["rekey_time = 3s", "life_time = 60s", "rand_time = 0s"].map(str::to_owned));
    c.extra
        .extend(["rekey_time = 5s", "over_time = 60s", "rand_time = 0s"].map(str::to_owned));
    s.establish(&c)?;
    let (first, now) = s.paced_stream(true)?;
    ensure!(
        first.fields.get("spi-in") != now.fields.get("spi-in"),
        "the CHILD SA was not rekeyed: {first:?} / {now:?}"
    );
    ensure!(
        logs::contains(s.gateway.log_path(), "IKE SA rekeyed"),
        "no IKE SA rekey seen:\n{}",
        s.logs()
    );
    // Rekeyed CHILD SAs were deleted by the site: one SA pair remains, and one tunnel.
    wait::until("the old CHILD SAs to go", TIMEOUT, || {
        let table = s.tunnels()?;
        let sas = table
            .lines()
            .find(|l| l.starts_with(SITE_ID))
            .and_then(|l| l.split_whitespace().nth(5).map(str::to_owned));
        Ok(if sas.as_deref() == Some("1") {
            Probe::Ready(())
        } else {
            Probe::pending(table)
        })
    })?;
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)
}

#[test]
fn a_vanished_site_is_found_dead_and_removed() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = SiteGateway::start_with(
        "ss",
        ike,
        "aes128gcm16",
        &psk,
        &GatewayOptions {
            dpd: Some("2s"),
            args: &["--ike-retransmit-timeout", "500ms", "--ike-retransmit-tries", "2"],
            ..GatewayOptions::default()
        },
    )?;
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    // Liveness checks are answered while the site lives: still up after a few intervals.
    let alive_until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < alive_until {
        ensure!(
            s.metric("concentrator_gateway_ike_sas_established")? == 1.0,
            "a live site was dropped:\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // SIGKILL: the site goes silent without deleting anything.
    s.kill_charon();
    s.wait_metric("concentrator_gateway_ike_sas_established", 0.0)
        .with_context(|| s.logs())?;
    s.wait_metric(
        "concentrator_gateway_ike_failures_total{reason=\"dead_peer\"}",
        1.0,
    )?;
    ensure!(site_route(&s)?.is_empty(), "route to a dead site left behind");
    Ok(())
}

#[test]
fn a_gateway_that_redirects_sends_the_site_to_another_one() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    const GW2_ADDR: &str = "192.0.2.3";
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    // The first gateway redirects every new site (RFC 5685) to the second one.
    let s = SiteGateway::start_with(
        "ss",
        ike,
        "aes128gcm16",
        &psk,
        &GatewayOptions {
            args: &["--redirect-to", GW2_ADDR],
            ..GatewayOptions::default()
        },
    )?;
    let gw2 = s.wan.host("ssgw2", GW2_ADDR, Some(GW_HOST))?;
    // The same eroute, in its own directory.
    let dir2 = scratch::dir("ike-gateway2")?;
    eroute(ike, "aes128gcm16", &psk, &GatewayOptions::default()).write(&dir2.path().join("config"))?;
    let second = common::start_gateway(&gw2, "gateway 2", dir2.path(), GW2_ADDR, &[])?;
    // The site knows only the first gateway.
    s.charon()
        .load(&[s.connection(ike, "aes128gcm16", &psk, SITE_ID)])?;
    let _ = s.charon().initiate("gw");
    wait::until(
        "the site to be established with the second gateway",
        TIMEOUT,
        || {
            let sas = s.charon().list_sas()?;
            Ok(match sas.iter().find(|sa| sa.state == "ESTABLISHED") {
                Some(sa) if sa.fields.get("remote-host").map(String::as_str) == Some(GW2_ADDR) => {
                    Probe::Ready(())
                }
                other => Probe::pending(format!("{other:?}")),
            })
        },
    )
    .with_context(|| format!("{}\ngateway 2:\n{}", s.logs(), second.log_tail(20)))?;
    s.wait_metric(
        "concentrator_gateway_ike_dropped_total{reason=\"redirected\"}",
        1.0,
    )?;
    s.wait_metric("concentrator_gateway_ike_sas_established", 0.0)?;
    let tunnels = gw2.run(BIN, &["tunnels"])?;
    ensure!(
        tunnels.contains(SITE_ID),
        "second gateway does not list the site:\n{tunnels}"
    );
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| second.log_tail(20))
}

/// Our gateway initiates (eroute role Initiator with the site's peerAddress) to a strongSwan
/// responder: both list the SAs and traffic crosses both ways.
fn gateway_initiates(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    // strongSwan waits as responder: its config is loaded before our gateway starts.
    let s = SiteGateway::start_with(
        "ss",
        ike,
        esp,
        &psk,
        &GatewayOptions {
            initiator: true,
            ..GatewayOptions::default()
        },
    )?;
    s.charon().load(&[s.connection(ike, esp, &psk, SITE_ID)])?;
    let child = s
        .charon()
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.logs())?;
    ensure!(child.state == "INSTALLED", "child state {}", child.state);
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)?;
    let tunnels = s.tunnels()?;
    ensure!(
        tunnels.contains("site-a") && tunnels.contains(SITE_LAN),
        "tunnels:\n{tunnels}"
    );
    s.ping_from_gw()?;
    s.ping_from_site()?;
    common::tcp_transfer(&s.gw, GW_HOST, &s.site, SITE_HOST, s.dir.path()).with_context(|| s.logs())
}

mod gateway_initiates_to_strongswan_with {
    concentrator_test_util::proposal_matrix!(super::gateway_initiates);
}

#[test]
fn a_site_that_restarts_replaces_its_old_ike_sa() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = SiteGateway::start("ss", ike, "aes128gcm16", &psk)?;
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    // The site loses its state (SIGKILL, no DELETE) and connects again.
    s.kill_charon();
    s.charon = Some(Charon::start(&s.site)?);
    s.establish(&s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)
        .with_context(|| s.logs())?;
    let tunnels = s.tunnels()?;
    ensure!(
        tunnels.lines().filter(|l| l.starts_with(SITE_ID)).count() == 1,
        "one tunnel per site expected:\n{tunnels}"
    );
    s.ping_from_gw()
}

#[test]
fn the_gateway_rekeys_child_and_ike_sas_itself_under_traffic() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    // Our lifetimes are short (strongSwan's stay at their long defaults): every rekey below
    // is started by the gateway, with PFS for the CHILD SAs.
    let s = SiteGateway::start_with(
        "ss",
        ike,
        esp,
        &psk,
        &GatewayOptions {
            lifetimes: Some(("8s", "4s")),
            ..GatewayOptions::default()
        },
    )?;
    s.establish(&s.connection(ike, esp, &psk, SITE_ID))?;
    let (first, now) = s.paced_stream(true)?;
    ensure!(
        first.fields.get("spi-in") != now.fields.get("spi-in"),
        "the CHILD SA was not rekeyed: {first:?} / {now:?}"
    );
    ensure!(
        logs::contains(s.gateway.log_path(), "IKE SA rekeyed"),
        "no IKE SA rekey by the gateway:\n{}",
        s.logs()
    );
    let sas = s.charon().list_sas()?;
    ensure!(
        sas.iter().filter(|sa| sa.state == "ESTABLISHED").count() == 1,
        "strongSwan: {sas:?}"
    );
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)?;
    s.ping_from_gw()
}

#[test]
fn a_tunnel_the_gateway_initiated_survives_its_own_child_and_ike_rekeys() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = SiteGateway::start_with(
        "ss",
        ike,
        esp,
        &psk,
        &GatewayOptions {
            initiator: true,
            lifetimes: Some(("8s", "4s")),
            ..GatewayOptions::default()
        },
    )?;
    s.charon().load(&[s.connection(ike, esp, &psk, SITE_ID)])?;
    s.charon()
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.logs())?;
    let first = s.charon().child_sa("gw", "gw")?.context("child")?;
    let ike_spis = |s: &SiteGateway| -> Result<Vec<String>> {
        let sas = s.charon().list_sas()?;
        let sa = sas
            .iter()
            .find(|sa| sa.state == "ESTABLISHED")
            .context("no IKE SA")?;
        Ok(sa
            .fields
            .iter()
            .filter(|(k, _)| k.ends_with("-spi"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect())
    };
    let first_ike = ike_spis(&s)?;
    ensure!(!first_ike.is_empty(), "no IKE SPIs listed");
    let (_, now) = s.paced_stream(false)?;
    ensure!(
        first.fields.get("spi-in") != now.fields.get("spi-in"),
        "the CHILD SA was not rekeyed: {first:?} / {now:?}"
    );
    // The IKE SA strongSwan holds now has other SPIs: our initiator rekeyed it.
    let now_ike = ike_spis(&s)?;
    ensure!(first_ike != now_ike, "the IKE SA was not rekeyed: {first_ike:?}");
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)?;
    s.ping_from_site()
}

#[test]
fn the_gateway_rekeys_child_sas_at_their_byte_limit_under_traffic() -> Result<()> {
    rekeys_at_the_byte_limit("ss", &[])
}

/// The same with two IKE workers: the data plane's volume events reach the worker that
/// holds the site's IKE SA (found from the CHILD SA's inbound SPI, drawn in that SA's
/// shard), and IKE on port 500 is steered to it.
#[test]
fn with_two_ike_workers_the_byte_limit_rekeys_reach_the_sas_worker() -> Result<()> {
    rekeys_at_the_byte_limit("sw", &["--ike-workers", "2"])
}

fn rekeys_at_the_byte_limit(tag: &str, args: &[&str]) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16";
    let psk = concentrator_e2e::ids::random_hex(32);
    // Time lifetimes stay long on both sides: only the byte limit can rekey. The paced
    // stream brings ~52 kB/s of inner packets toward the gateway, so the inbound SA reaches
    // 150 kB about every 3 s; the hard limit (165 kB) is never reached if the rekeys work.
    let s = SiteGateway::start_with(
        tag,
        ike,
        esp,
        &psk,
        &GatewayOptions {
            esp_extra: Some("    rekeyBytes: 150000\n"),
            args,
            ..GatewayOptions::default()
        },
    )?;
    s.establish(&s.connection(ike, esp, &psk, SITE_ID))?;
    let (first, now) = s.paced_stream(true)?;
    ensure!(
        first.fields.get("spi-in") != now.fields.get("spi-in")
            && first.fields.get("spi-out") != now.fields.get("spi-out"),
        "the CHILD SA was not rekeyed: {first:?} / {now:?}"
    );
    let soft = s.metric("concentrator_gateway_esp_sa_soft_expired_total")?;
    ensure!(
        soft >= 3.0,
        "{soft} soft byte limits reached, expected 3 or more\n{}",
        s.logs()
    );
    ensure!(
        s.metric("concentrator_gateway_esp_sa_hard_expired_total")? == 0.0,
        "an SA reached its hard limit:\n{}",
        s.logs()
    );
    let log = std::fs::read_to_string(s.gateway.log_path())?;
    let rekeys = log
        .lines()
        // The log has colour codes between a field's name, `=` and its value.
        .filter(|l| l.contains("volume soft limit") && l.contains("true"))
        .count();
    ensure!(
        rekeys >= 3,
        "{rekeys} rekeys started by the byte limit:\n{}",
        s.logs()
    );
    // Every rekey deleted its old SA: strongSwan holds one CHILD SA, installed (a rekey may
    // be finishing as the stream ends).
    wait::until("strongSwan to hold one CHILD SA", TIMEOUT, || {
        let sas = s.charon().list_sas()?;
        Ok(
            if sas.len() == 1 && sas[0].children.len() == 1 && sas[0].children[0].state == "INSTALLED" {
                Probe::Ready(())
            } else {
                Probe::pending(format!("{sas:?}"))
            },
        )
    })?;
    s.ping_from_gw()
}
