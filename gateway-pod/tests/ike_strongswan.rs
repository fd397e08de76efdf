//! The gateway as users run it, against real strongSwan sites: a site namespace running
//! charon (kernel-libipsec) initiates to `concentrator-gateway` in the gateway namespace,
//! configured with one static `Eroute` and its PSK Secret, no database. Both list the SAs,
//! ping crosses the tunnel both ways and a file sent over TCP arrives intact; a wrong PSK, an
//! unknown identity and a proposal mismatch fail cleanly and leave no state behind.
//!
//! As non-root every test prints SKIP and passes.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::process::Daemon;
use concentrator_e2e::strongswan::{self, Charon, Connection};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch, tools};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const SITE_ADDR: &str = "192.0.2.1";
const GW_ADDR: &str = "192.0.2.2";
const SITE_LAN: &str = "10.1.0.0/24";
const GW_LAN: &str = "10.2.0.0/24";
const SITE_HOST: &str = "10.1.0.1";
const GW_HOST: &str = "10.2.0.1";
const GW_ID: &str = "gw.example";
const SITE_ID: &str = "site-a.example";
const TIMEOUT: Duration = Duration::from_secs(20);

fn addr(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

/// The gateway's config directory: one static eroute for the site, its PSK as a Secret file.
fn write_config(dir: &Path, ike: &str, esp: &str, psk: &str, o: &GatewayOptions<'_>) -> Result<()> {
    let (dpd, initiator) = (o.dpd.unwrap_or("30s"), o.initiator);
    let (ike_life, esp_life) = o.lifetimes.unwrap_or(("4h", "1h"));
    let esp_extra = o.esp_extra.unwrap_or("");
    // As initiator the gateway keeps the tunnel to the site's address up itself.
    let role = if initiator {
        format!("Initiator\n  peerAddress: {SITE_ADDR}")
    } else {
        "Responder".to_owned()
    };
    std::fs::create_dir_all(dir.join("secrets/site-a"))?;
    std::fs::write(dir.join("secrets/site-a/psk"), psk)?;
    std::fs::write(
        dir.join("site-a.yaml"),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: site-a\n\
             spec:\n  localSubnet: {GW_LAN}\n  remoteSubnet: {SITE_LAN}\n  peerId: {SITE_ID}\n\
             \x20 localId: {GW_ID}\n  pskSecretRef:\n    name: site-a\n    key: psk\n  role: {role}\n\
             \x20 ike:\n    proposals: [{ike}]\n    dpdInterval: {dpd}\n    lifetime: {ike_life}\n\
             \x20 esp:\n    proposals: [{esp}]\n    lifetime: {esp_life}\n{esp_extra}"
        ),
    )?;
    Ok(())
}

struct Setup {
    wan: Wan,
    site: Netns,
    gw: Netns,
    dir: tempfile::TempDir,
    gateway: Daemon,
    /// `None` once killed.
    charon: Option<Charon>,
}

/// Options of [`Setup::start_with`].
#[derive(Default)]
struct GatewayOptions<'a> {
    /// The eroute's `ike.dpdInterval` (default 30s).
    dpd: Option<&'a str>,
    /// Extra command-line arguments.
    args: &'a [&'a str],
    /// The eroute has role Initiator and the site's address: the gateway connects.
    initiator: bool,
    /// The eroute's IKE and ESP lifetimes (default 4h and 1h).
    lifetimes: Option<(&'a str, &'a str)>,
    /// More lines of the eroute's `esp` section, each `    key: value\n`.
    esp_extra: Option<&'a str>,
}

impl Setup {
    fn start(ike: &str, esp: &str, psk: &str) -> Result<Self> {
        Self::start_with(ike, esp, psk, &GatewayOptions::default())
    }

    fn start_with(ike: &str, esp: &str, psk: &str, o: &GatewayOptions<'_>) -> Result<Self> {
        let wan = Wan::new()?;
        let site = Netns::new("sssite")?;
        let gw = Netns::new("ssgw")?;
        wan.attach(&site, "wan0", format!("{SITE_ADDR}/24").parse()?)?;
        wan.attach(&gw, "wan0", format!("{GW_ADDR}/24").parse()?)?;
        site.add_lo_addr(format!("{SITE_HOST}/24").parse()?)?;
        gw.add_lo_addr(format!("{GW_HOST}/24").parse()?)?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;

        let dir = scratch::dir("ike-gateway")?;
        let config = dir.path().join("config");
        write_config(&config, ike, esp, psk, o)?;
        let log = dir.path().join("gateway.log");
        let data = dir.path().join("data");
        let mut args = vec![
            "--config-dir",
            config.to_str().context("path")?,
            "--data-dir",
            data.to_str().context("path")?,
            "--ike-listen",
            GW_ADDR,
        ];
        args.extend_from_slice(o.args);
        let mut gateway = gw.spawn("gateway", BIN, &args, &log)?;
        wait::until("the gateway to be ready", TIMEOUT, || {
            gateway.ensure_running()?;
            Ok(if logs::contains(&log, "gateway ready") {
                Probe::Ready(())
            } else {
                Probe::pending(gateway.log_tail(10))
            })
        })?;
        let charon = Charon::start(&site)?;
        Ok(Self {
            wan,
            site,
            gw,
            dir,
            gateway,
            charon: Some(charon),
        })
    }

    fn connection(&self, ike: &str, esp: &str, psk: &str, local_id: &str) -> Connection {
        let mut c = Connection::new(
            "gw",
            addr(SITE_ADDR),
            addr(GW_ADDR),
            psk,
            vec![SITE_LAN.parse().expect("subnet")],
            vec![GW_LAN.parse().expect("subnet")],
        );
        c.local_id = local_id.to_owned();
        c.remote_id = GW_ID.to_owned();
        c.ike_proposal = ike.to_owned();
        c.esp_proposal = esp.to_owned();
        c
    }

    fn charon(&self) -> &Charon {
        self.charon.as_ref().expect("charon is running")
    }

    /// Kills charon (SIGKILL): the site goes silent without deleting anything.
    fn kill_charon(&mut self) {
        self.charon = None;
    }

    fn logs(&self) -> String {
        format!(
            "gateway log:\n{}\ncharon log:\n{}",
            self.gateway.log_tail(40),
            self.charon.as_ref().map(|c| c.log_tail(40)).unwrap_or_default()
        )
    }

    /// `concentrator-gateway tunnels` in the gateway namespace (admin API on its loopback).
    fn tunnels(&self) -> Result<String> {
        self.gw.run(BIN, &["tunnels"])
    }

    /// A metric value from `/metrics` of the gateway.
    fn metric(&self, name: &str) -> Result<f64> {
        concentrator_e2e::gateway::metric(&self.gw, name)
    }

    fn wait_metric(&self, name: &str, want: f64) -> Result<()> {
        concentrator_e2e::gateway::wait_metric(&self.gw, name, want, TIMEOUT)
    }
}

fn carries_traffic(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = Setup::start(ike, esp, &psk)?;
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
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
    s.gw.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
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

#[test]
fn strongswan_site_carries_traffic_with_aes128gcm16_prfsha256_x25519() -> Result<()> {
    carries_traffic("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn strongswan_site_carries_traffic_with_aes256gcm16_prfsha384_ecp384() -> Result<()> {
    carries_traffic("aes256gcm16-prfsha384-ecp384", "aes256gcm16")
}

#[test]
fn strongswan_site_carries_traffic_with_chacha20poly1305_prfsha256_x25519() -> Result<()> {
    carries_traffic("chacha20poly1305-prfsha256-x25519", "chacha20poly1305")
}

#[test]
fn strongswan_site_carries_traffic_with_aes256_sha256_modp2048() -> Result<()> {
    carries_traffic("aes256-sha256-modp2048", "aes256-sha256")
}

#[test]
fn strongswan_site_carries_traffic_with_aes128_sha256_ecp256() -> Result<()> {
    carries_traffic("aes128-sha256-ecp256", "aes128-sha256")
}

/// Refused negotiations: strongSwan sees the notify, we count it, and no SA stays behind.
fn refused(ike_site: &str, psk_site: &str, id_site: &str, notify: &str, reason: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let s = Setup::start(ike, "aes128gcm16", "the-right-psk")?;
    s.charon()
        .load(&[s.connection(ike_site, "aes128gcm16", psk_site, id_site)])?;
    let _ = s.charon().initiate("gw");
    let log = s.charon().log_path().to_owned();
    wait::until(format!("strongSwan to log {notify}"), TIMEOUT, || {
        Ok(if logs::contains(&log, notify) {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })
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

/// Establishes the site's tunnel and waits until it carries a ping.
fn establish(s: &Setup, c: &Connection) -> Result<()> {
    s.charon().load(std::slice::from_ref(c))?;
    s.charon().initiate("gw").with_context(|| s.logs())?;
    s.charon()
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.logs())?;
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| s.logs())
}

/// The route to the site's subnet through our TUN device, as `ip route` prints it.
fn site_route(s: &Setup) -> Result<String> {
    Ok(s.gw.run("ip", &["route", "show", SITE_LAN])?.trim().to_owned())
}

#[test]
fn a_site_that_deletes_its_ike_sa_leaves_no_tunnel_and_no_route() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = Setup::start(ike, "aes128gcm16", &psk)?;
    establish(&s, &s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
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
    establish(&s, &s.connection(ike, "aes128gcm16", &psk, SITE_ID))
}

#[test]
fn child_and_ike_sa_rekeys_keep_a_tcp_stream_alive() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = Setup::start(ike, "aes128gcm16-x25519", &psk)?;
    let mut c = s.connection(ike, esp, &psk, SITE_ID);
    // strongSwan rekeys (as initiator) the CHILD SA every 3 s with PFS and the IKE SA every
    // 5 s, while a paced TCP stream runs for 12 s.
    c.child_extra
        .extend(["rekey_time = 3s", "life_time = 60s", "rand_time = 0s"].map(str::to_owned));
    c.extra
        .extend(["rekey_time = 5s", "over_time = 60s", "rand_time = 0s"].map(str::to_owned));
    establish(&s, &c)?;
    let first = s.charon().child_sa("gw", "gw")?.context("child")?;
    common::paced_tcp_transfer(
        &s.site,
        SITE_HOST,
        &s.gw,
        GW_HOST,
        s.dir.path(),
        Duration::from_secs(12),
    )
    .with_context(|| s.logs())?;
    let now = s.charon().child_sa("gw", "gw")?.context("child after rekeys")?;
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
    let mut s = Setup::start_with(
        ike,
        "aes128gcm16",
        &psk,
        &GatewayOptions {
            dpd: Some("2s"),
            args: &["--ike-retransmit-timeout", "500ms", "--ike-retransmit-tries", "2"],
            initiator: false,
            lifetimes: None,
            esp_extra: None,
        },
    )?;
    establish(&s, &s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
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
    let s = Setup::start_with(
        ike,
        "aes128gcm16",
        &psk,
        &GatewayOptions {
            dpd: None,
            args: &["--redirect-to", GW2_ADDR],
            initiator: false,
            lifetimes: None,
            esp_extra: None,
        },
    )?;
    let gw2 = Netns::new("ssgw2")?;
    s.wan.attach(&gw2, "wan0", format!("{GW2_ADDR}/24").parse()?)?;
    gw2.add_lo_addr(format!("{GW_HOST}/24").parse()?)?;
    let config = s.dir.path().join("config");
    let log = s.dir.path().join("gateway2.log");
    let data = s.dir.path().join("data2");
    let mut second = gw2.spawn(
        "gateway 2",
        BIN,
        &[
            "--config-dir",
            config.to_str().context("path")?,
            "--data-dir",
            data.to_str().context("path")?,
            "--ike-listen",
            GW2_ADDR,
        ],
        &log,
    )?;
    wait::until("the second gateway to be ready", TIMEOUT, || {
        second.ensure_running()?;
        Ok(if logs::contains(&log, "gateway ready") {
            Probe::Ready(())
        } else {
            Probe::pending(second.log_tail(10))
        })
    })?;
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
    let s = Setup::start_with(
        ike,
        esp,
        &psk,
        &GatewayOptions {
            dpd: None,
            args: &[],
            initiator: true,
            lifetimes: None,
            esp_extra: None,
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
    s.gw.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
    common::tcp_transfer(&s.gw, GW_HOST, &s.site, SITE_HOST, s.dir.path()).with_context(|| s.logs())
}

#[test]
fn gateway_initiates_to_strongswan_with_aes128gcm16_prfsha256_x25519() -> Result<()> {
    gateway_initiates("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn gateway_initiates_to_strongswan_with_aes256gcm16_prfsha384_ecp384() -> Result<()> {
    gateway_initiates("aes256gcm16-prfsha384-ecp384", "aes256gcm16")
}

#[test]
fn gateway_initiates_to_strongswan_with_chacha20poly1305_prfsha256_x25519() -> Result<()> {
    gateway_initiates("chacha20poly1305-prfsha256-x25519", "chacha20poly1305")
}

#[test]
fn gateway_initiates_to_strongswan_with_aes256_sha256_modp2048() -> Result<()> {
    gateway_initiates("aes256-sha256-modp2048", "aes256-sha256")
}

#[test]
fn gateway_initiates_to_strongswan_with_aes128_sha256_ecp256() -> Result<()> {
    gateway_initiates("aes128-sha256-ecp256", "aes128-sha256")
}

#[test]
fn a_site_that_restarts_replaces_its_old_ike_sa() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = Setup::start(ike, "aes128gcm16", &psk)?;
    establish(&s, &s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    // The site loses its state (SIGKILL, no DELETE) and connects again.
    s.kill_charon();
    s.charon = Some(Charon::start(&s.site)?);
    establish(&s, &s.connection(ike, "aes128gcm16", &psk, SITE_ID))?;
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)
        .with_context(|| s.logs())?;
    let tunnels = s.tunnels()?;
    ensure!(
        tunnels.lines().filter(|l| l.starts_with(SITE_ID)).count() == 1,
        "one tunnel per site expected:\n{tunnels}"
    );
    s.gw.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())
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
    let s = Setup::start_with(
        ike,
        esp,
        &psk,
        &GatewayOptions {
            dpd: None,
            args: &[],
            initiator: false,
            lifetimes: Some(("8s", "4s")),
            esp_extra: None,
        },
    )?;
    establish(&s, &s.connection(ike, esp, &psk, SITE_ID))?;
    let first = s.charon().child_sa("gw", "gw")?.context("child")?;
    common::paced_tcp_transfer(
        &s.site,
        SITE_HOST,
        &s.gw,
        GW_HOST,
        s.dir.path(),
        Duration::from_secs(12),
    )
    .with_context(|| s.logs())?;
    let now = s.charon().child_sa("gw", "gw")?.context("child after rekeys")?;
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
    s.gw.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())
}

#[test]
fn a_tunnel_the_gateway_initiated_survives_its_own_child_and_ike_rekeys() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = Setup::start_with(
        ike,
        esp,
        &psk,
        &GatewayOptions {
            dpd: None,
            args: &[],
            initiator: true,
            lifetimes: Some(("8s", "4s")),
            esp_extra: None,
        },
    )?;
    s.charon().load(&[s.connection(ike, esp, &psk, SITE_ID)])?;
    s.charon()
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.logs())?;
    let first = s.charon().child_sa("gw", "gw")?.context("child")?;
    let ike_spis = |s: &Setup| -> Result<Vec<String>> {
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
    common::paced_tcp_transfer(
        &s.gw,
        GW_HOST,
        &s.site,
        SITE_HOST,
        s.dir.path(),
        Duration::from_secs(12),
    )
    .with_context(|| s.logs())?;
    let now = s.charon().child_sa("gw", "gw")?.context("child after rekeys")?;
    ensure!(
        first.fields.get("spi-in") != now.fields.get("spi-in"),
        "the CHILD SA was not rekeyed: {first:?} / {now:?}"
    );
    // The IKE SA strongSwan holds now has other SPIs: our initiator rekeyed it.
    let now_ike = ike_spis(&s)?;
    ensure!(first_ike != now_ike, "the IKE SA was not rekeyed: {first_ike:?}");
    s.wait_metric("concentrator_gateway_ike_sas_established", 1.0)?;
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| s.logs())
}

#[test]
fn the_gateway_rekeys_child_sas_at_their_byte_limit_under_traffic() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let esp = "aes128gcm16";
    let psk = concentrator_e2e::ids::random_hex(32);
    // Time lifetimes stay long on both sides: only the byte limit can rekey. The paced
    // stream brings ~52 kB/s of inner packets toward the gateway, so the inbound SA reaches
    // 150 kB about every 3 s; the hard limit (165 kB) is never reached if the rekeys work.
    let s = Setup::start_with(
        ike,
        esp,
        &psk,
        &GatewayOptions {
            esp_extra: Some("    rekeyBytes: 150000\n"),
            ..GatewayOptions::default()
        },
    )?;
    establish(&s, &s.connection(ike, esp, &psk, SITE_ID))?;
    let first = s.charon().child_sa("gw", "gw")?.context("child")?;
    common::paced_tcp_transfer(
        &s.site,
        SITE_HOST,
        &s.gw,
        GW_HOST,
        s.dir.path(),
        Duration::from_secs(12),
    )
    .with_context(|| s.logs())?;
    let now = s.charon().child_sa("gw", "gw")?.context("child after rekeys")?;
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
    s.gw.wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())
}
