//! Two of our gateways carry traffic to each other through IKEv2 (esp_static.rs does the same
//! with hand-made keys): a site gateway whose static eroute has role Initiator and the
//! head-end's address, and a head-end whose eroute answers it with the same PSK. Each gateway
//! routes for a LAN namespace behind it, so traffic is forwarded LAN → gateway → ESP in UDP →
//! gateway → LAN as in production, not delivered to the gateway's own namespace. Both list the
//! IKE SA and its CHILD SA; ping and a checksummed TCP transfer cross both ways, for an AEAD
//! and a CBC + HMAC proposal; CHILD and IKE SA rekeys by either gateway, or by both at once,
//! keep a TCP stream alive. With `--raw-esp` on both, the tunnel is plain ESP (IP protocol
//! 50, counted by nftables on the head-end); with it on the site only, the head-end makes the
//! site float to ESP in UDP all the same.
//!
//! As non-root every test prints SKIP and passes.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::process::Daemon;
// The site and the head-end are the topology's site and gateway; the gateways' addresses on
// their LANs are the LAN hosts' default routes.
use concentrator_e2e::topology::{
    GW_ADDR as HEAD_WAN, GW_HOST as HEAD_ROUTER, GW_LAN as HEAD_LAN, SITE_ADDR as SITE_WAN,
    SITE_HOST as SITE_ROUTER, SITE_ID, SITE_LAN,
};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{ids, logs, prereq, scratch, tools};

mod common;

use common::StaticEroute;

/// A host on each LAN, in its own namespace.
const SITE_HOST: &str = "10.1.0.10";
const HEAD_HOST: &str = "10.2.0.10";
const HEAD_ID: &str = "hq.example";
const TIMEOUT: Duration = Duration::from_secs(30);

/// One of our gateways with a LAN namespace behind it.
struct Gateway {
    daemon: Daemon,
    ns: Netns,
    lan: Netns,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// `role` names the namespaces; the LAN is `router`/24 on the gateway, `host`/24 behind.
    fn start(
        wan: &Wan,
        role: &str,
        wan_addr: &str,
        router: &str,
        host: &str,
        eroute: &StaticEroute<'_>,
        args: &[&str],
    ) -> Result<Self> {
        let ns = Netns::new(role)?;
        let lan = Netns::new(&format!("{role}lan"))?;
        wan.attach(&ns, "wan0", format!("{wan_addr}/24").parse()?)?;
        ns.link(
            "lan0",
            format!("{router}/24").parse()?,
            &lan,
            "eth0",
            format!("{host}/24").parse()?,
        )?;
        lan.ip(&["route", "add", "default", "via", router])?;
        ns.enable_forwarding()?;
        let dir = scratch::dir(role)?;
        eroute.write(&dir.path().join("config"))?;
        let mut daemon = common::spawn_gateway(&ns, role, dir.path(), wan_addr, args)?;
        common::wait_ready(&mut daemon, TIMEOUT)?;
        Ok(Self { daemon, ns, lan, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.log_path()).unwrap_or_default()
    }

    /// How often the log says `what`.
    fn logged(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    fn wait_metric(&self, name: &str, want: f64) -> Result<()> {
        common::wait_metric(&self.ns, name, want, TIMEOUT)
    }

    /// Waits until the tunnel to `peer_id` lists exactly one CHILD SA toward `subnet`, and
    /// returns its row.
    fn wait_one_child(&self, peer_id: &str, subnet: &str) -> Result<Vec<String>> {
        wait::until(format!("one CHILD SA with {peer_id}"), TIMEOUT, || {
            Ok(match common::tunnel_row(&self.ns, peer_id)? {
                Some(row)
                    if row.get(4).map(String::as_str) == Some(subnet)
                        && row.get(5).map(String::as_str) == Some("1") =>
                {
                    Probe::Ready(row)
                }
                other => Probe::pending(format!("{other:?}")),
            })
        })
    }
}

/// Lifetimes and proposals of the two ends.
struct Options<'a> {
    ike: &'a str,
    esp: &'a str,
    site_lifetimes: (&'a str, &'a str),
    head_lifetimes: (&'a str, &'a str),
    /// Extra command line arguments of each gateway.
    site_args: &'a [&'a str],
    head_args: &'a [&'a str],
}

const LONG: (&str, &str) = ("4h", "1h");

struct Pair {
    site: Gateway,
    head: Gateway,
    _wan: Wan,
}

impl Pair {
    /// The head-end first (it only answers), then the site, which connects at start.
    fn start(o: &Options<'_>) -> Result<Self> {
        let wan = Wan::new()?;
        let psk = ids::random_hex(32);
        let head = Gateway::start(
            &wan,
            "gphead",
            HEAD_WAN,
            HEAD_ROUTER,
            HEAD_HOST,
            &StaticEroute {
                name: "site-a",
                local_subnet: HEAD_LAN,
                remote_subnet: SITE_LAN,
                peer_id: SITE_ID,
                local_id: HEAD_ID,
                initiate_to: None,
                ike: o.ike,
                esp: o.esp,
                lifetimes: Some(o.head_lifetimes),
                psk: &psk,
                ..StaticEroute::default()
            },
            o.head_args,
        )?;
        let site = Gateway::start(
            &wan,
            "gpsite",
            SITE_WAN,
            SITE_ROUTER,
            SITE_HOST,
            &StaticEroute {
                name: "hq",
                local_subnet: SITE_LAN,
                remote_subnet: HEAD_LAN,
                peer_id: HEAD_ID,
                local_id: SITE_ID,
                initiate_to: Some(HEAD_WAN),
                ike: o.ike,
                esp: o.esp,
                lifetimes: Some(o.site_lifetimes),
                psk: &psk,
                ..StaticEroute::default()
            },
            o.site_args,
        )?;
        Ok(Self {
            site,
            head,
            _wan: wan,
        })
    }

    fn logs(&self) -> String {
        format!(
            "site gateway log:\n{}\nhead-end log:\n{}",
            self.site.daemon.log_tail(40),
            self.head.daemon.log_tail(40)
        )
    }

    /// Both gateways hold one IKE SA and one CHILD SA, each toward the other's LAN.
    fn wait_up(&self) -> Result<()> {
        for gw in [&self.site, &self.head] {
            gw.wait_metric("concentrator_gateway_ike_sas_established", 1.0)
                .with_context(|| self.logs())?;
        }
        self.site
            .wait_one_child(HEAD_ID, HEAD_LAN)
            .with_context(|| self.logs())?;
        self.head
            .wait_one_child(SITE_ID, SITE_LAN)
            .with_context(|| self.logs())?;
        Ok(())
    }

    /// Ping from each LAN host to the other.
    fn ping_both_ways(&self) -> Result<()> {
        self.site
            .lan
            .wait_reachable(Some(addr(SITE_HOST)), addr(HEAD_HOST), TIMEOUT)
            .with_context(|| self.logs())?;
        self.head
            .lan
            .wait_reachable(Some(addr(HEAD_HOST)), addr(SITE_HOST), TIMEOUT)
            .with_context(|| self.logs())
    }
}

fn required() -> bool {
    prereq::require(&[netns::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip()
}

fn carries_traffic(ike: &str, esp: &str) -> Result<()> {
    if required() {
        return Ok(());
    }
    let p = Pair::start(&Options {
        ike,
        esp,
        site_lifetimes: LONG,
        head_lifetimes: LONG,
        site_args: &[],
        head_args: &[],
    })?;
    p.wait_up()?;
    ensure!(
        p.site.logged("initiating") >= 1 && p.head.logged("initiating") == 0,
        "the site should be the one that connects:\n{}",
        p.logs()
    );
    p.ping_both_ways()?;
    let out = p.site.lan.run(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "2", "-I", SITE_HOST, HEAD_HOST],
    )?;
    ensure!(out.contains("3 received"), "{out}");

    let dir = p.site.dir.path();
    common::tcp_transfer(&p.site.lan, SITE_HOST, &p.head.lan, HEAD_HOST, dir).with_context(|| p.logs())?;
    common::tcp_transfer(&p.head.lan, HEAD_HOST, &p.site.lan, SITE_HOST, dir).with_context(|| p.logs())?;

    // The bytes went through the tunnel on both gateways (counters refreshed every second):
    // the LANs have no other path to each other.
    for (gw, peer) in [(&p.site, HEAD_ID), (&p.head, SITE_ID)] {
        wait::until(format!("{peer}'s byte counters"), TIMEOUT, || {
            let row = common::tunnel_row(&gw.ns, peer)?.unwrap_or_default();
            let bytes = |i: usize| row.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Ok(if bytes(6) > 2_000_000 && bytes(7) > 2_000_000 {
                Probe::Ready(())
            } else {
                Probe::pending(format!("{row:?}"))
            })
        })?;
        ensure!(
            common::metric(&gw.ns, "concentrator_gateway_esp_packets_in_total")? > 1000.0
                && common::metric(&gw.ns, "concentrator_gateway_esp_packets_out_total")? > 1000.0,
            "ESP packet counters"
        );
        // Nothing was sent before its SA was up, and the kernel's own IPv6 link traffic on
        // the TUN device (router solicitations, MLD) is not counted as tunnel traffic.
        let no_sa = common::metric(&gw.ns, "concentrator_gateway_esp_dropped_no_sa_total")?;
        ensure!(no_sa == 0.0, "{no_sa} packets without an SA:\n{}", p.logs());
    }
    Ok(())
}

#[test]
fn two_gateways_carry_traffic_with_aes128gcm16_prfsha256_x25519() -> Result<()> {
    carries_traffic("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn two_gateways_carry_traffic_with_aes256_sha256_modp2048() -> Result<()> {
    carries_traffic("aes256-sha256-modp2048", "aes256-sha256")
}

/// With short lifetimes on `site`, `head` or both, a paced TCP stream LAN to LAN spans several
/// CHILD SA rekeys (with PFS) and an IKE SA rekey; it arrives intact, and both gateways end
/// with one IKE SA and one CHILD SA that still carry traffic.
fn rekeys_keep_traffic_flowing(site_short: bool, head_short: bool) -> Result<()> {
    if required() {
        return Ok(());
    }
    // CHILD SAs rekeyed at 85-95 % of 4 s, the IKE SA at 85-95 % of 8 s.
    let short = ("8s", "4s");
    let pick = |s: bool| if s { short } else { LONG };
    let p = Pair::start(&Options {
        ike: "aes128gcm16-prfsha256-x25519",
        esp: "aes128gcm16-x25519",
        site_lifetimes: pick(site_short),
        head_lifetimes: pick(head_short),
        site_args: &[],
        head_args: &[],
    })?;
    p.wait_up()?;
    p.ping_both_ways()?;
    let installed = |gw: &Gateway| gw.logged("CHILD SA installed");
    let before = (installed(&p.site), installed(&p.head));
    common::paced_tcp_transfer(
        &p.site.lan,
        SITE_HOST,
        &p.head.lan,
        HEAD_HOST,
        p.site.dir.path(),
        Duration::from_secs(12),
    )
    .with_context(|| p.logs())?;
    let after = (installed(&p.site), installed(&p.head));
    ensure!(
        after.0 >= before.0 + 2 && after.1 >= before.1 + 2,
        "expected at least two CHILD SA rekeys in 12 s (installed before {before:?}, after {after:?}):\n{}",
        p.logs()
    );
    // The responder of the IKE SA logs every IKE SA rekey, whichever side started it.
    ensure!(
        p.head.logged("IKE SA rekeyed") >= 1,
        "no IKE SA rekey:\n{}",
        p.logs()
    );
    // Rekeyed SAs were deleted: one of each remains on both sides, and it carries traffic.
    p.wait_up()?;
    p.ping_both_ways()?;
    common::tcp_transfer(&p.head.lan, HEAD_HOST, &p.site.lan, SITE_HOST, p.site.dir.path())
        .with_context(|| p.logs())?;
    for gw in [&p.site, &p.head] {
        ensure!(
            !logs::contains(gw.daemon.log_path(), "CHILD SA cannot be installed"),
            "{}",
            p.logs()
        );
    }
    Ok(())
}

#[test]
fn the_site_gateway_rekeys_child_and_ike_sas_under_traffic() -> Result<()> {
    rekeys_keep_traffic_flowing(true, false)
}

#[test]
fn the_head_end_rekeys_child_and_ike_sas_under_traffic() -> Result<()> {
    rekeys_keep_traffic_flowing(false, true)
}

#[test]
fn both_gateways_rekeying_settle_on_one_sa_under_traffic() -> Result<()> {
    rekeys_keep_traffic_flowing(true, true)
}

/// Starts a pair with these arguments, carries a checksummed TCP transfer each way, and
/// returns the head-end's (plain ESP, UDP 4500) packet counts and the pair.
fn transfer_with(site_args: &[&str], head_args: &[&str]) -> Result<(Pair, (u64, u64))> {
    let p = Pair::start(&Options {
        ike: "aes128gcm16-prfsha256-x25519",
        esp: "aes128gcm16",
        site_lifetimes: LONG,
        head_lifetimes: LONG,
        site_args,
        head_args,
    })?;
    common::count_outer(&p.head.ns)?;
    p.wait_up()?;
    p.ping_both_ways()?;
    let dir = p.site.dir.path();
    common::tcp_transfer(&p.site.lan, SITE_HOST, &p.head.lan, HEAD_HOST, dir).with_context(|| p.logs())?;
    common::tcp_transfer(&p.head.lan, HEAD_HOST, &p.site.lan, SITE_HOST, dir).with_context(|| p.logs())?;
    let counts = common::outer_counts(&p.head.ns)?;
    Ok((p, counts))
}

#[test]
fn two_gateways_with_raw_esp_carry_plain_esp() -> Result<()> {
    if required() || prereq::require(&[&[tools::NFT]]).is_skip() {
        return Ok(());
    }
    let (p, (esp, udp)) = transfer_with(&["--raw-esp"], &["--raw-esp"])?;
    // Only IKE on port 500: no NAT between them, so nobody floats. (The 2 MB transfer to the
    // head-end's LAN arrives there as ESP.)
    ensure!(
        esp > 2_000_000 && udp == 0,
        "expected plain ESP only, got {esp} ESP and {udp} UDP 4500 bytes:\n{}",
        p.logs()
    );
    Ok(())
}

#[test]
fn a_head_end_without_raw_esp_makes_a_raw_capable_site_use_udp() -> Result<()> {
    if required() || prereq::require(&[&[tools::NFT]]).is_skip() {
        return Ok(());
    }
    // The site would stay on plain ESP (it does not force the float); the head-end's NAT
    // detection answer makes it float.
    let (p, (esp, udp)) = transfer_with(&["--raw-esp"], &[])?;
    ensure!(
        esp == 0 && udp > 2_000_000,
        "expected ESP in UDP only, got {esp} ESP and {udp} UDP 4500 bytes:\n{}",
        p.logs()
    );
    Ok(())
}
