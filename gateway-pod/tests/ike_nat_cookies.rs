//! The gateway as users run it, against real strongSwan sites, where the network gets in the
//! way:
//!
//! * NAT traversal (RFC 7296 §2.23, RFC 3948): the site sits behind a router namespace that
//!   masquerades (nftables) its LAN onto the WAN. The site initiates through the NAT; the
//!   gateway detects it, follows the site's float to port 4500 and sends its ESP to the
//!   router's mapping, so traffic crosses the tunnel both ways. IKE may also start directly
//!   on port 4500.
//! * Cookies (RFC 7296 §2.6): with `--ike-cookie-threshold 5`, a flood of IKE_SA_INIT
//!   requests from an attacker that never answers leaves at most 5 half-open SAs, every
//!   further request gets a stateless COOKIE, the drops are counted, the half-open SAs expire,
//!   and a real strongSwan site (which returns cookies) still gets its tunnel during the
//!   flood.
//!
//! As non-root every test prints SKIP and passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::process::Daemon;
// Site and gateway use the harness's default proposals.
use concentrator_e2e::strongswan::{
    self, Charon, Connection, DEFAULT_ESP_PROPOSAL as ESP, DEFAULT_IKE_PROPOSAL as IKE, IkeSa,
};
use concentrator_e2e::tools::{self, Tool};
// The NAT router takes the site's WAN address, which is what the gateway sees of a site
// behind it; the cookie test's site sits there directly.
use concentrator_e2e::topology::{
    GW_ADDR, GW_HOST, SITE_ADDR as ROUTER_WAN, SITE_ADDR as SITE_WAN, SITE_HOST, SITE_ID, site_connection,
};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch};

mod common;

use common::site::{GatewayOptions, eroute};
use concentrator_test_util::ike_sa_init_request;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const NFT: Tool = Tool::search("nft", "nftables");

/// The NAT router on the site's side.
const ROUTER_INSIDE: &str = "198.51.100.254";
/// The site's own address, behind the NAT (unroutable from the WAN).
const SITE_INSIDE: &str = "198.51.100.1";
/// The flooding attacker on the WAN.
const ATTACKER: &str = "192.0.2.66";
const TIMEOUT: Duration = Duration::from_secs(20);

/// Half-open SAs from which the gateway asks for cookies in the flood test.
const COOKIE_THRESHOLD: usize = 5;
/// IKE_SA_INIT requests the attacker sends, and over how long.
const FLOOD_COUNT: usize = 400;
const FLOOD_SECONDS: f64 = 4.0;
/// The endpoint's half-open timeout (not configurable from the command line), plus slack.
const HALF_OPEN_EXPIRY: Duration = Duration::from_secs(30 + 15);
const COOKIE_DROPS: &str = "concentrator_gateway_ike_dropped_total{reason=\"cookie_required\"}";

/// `concentrator-gateway` in its own namespace on a WAN, with one static eroute for the
/// site and JSON logs (so that the tests can read the fields of its events).
struct Gateway {
    daemon: Daemon,
    dir: tempfile::TempDir,
    ns: Netns,
}

impl Gateway {
    fn start(wan: &Wan, psk: &str, args: &[&str]) -> Result<Self> {
        let ns = wan.host("natgw", GW_ADDR, Some(GW_HOST))?;
        let dir = scratch::dir("ike-nat")?;
        eroute(IKE, ESP, psk, &GatewayOptions::default()).write(&dir.path().join("config"))?;
        let all = [&["--log-format", "json"], args].concat();
        let daemon = common::start_gateway(&ns, "gateway", dir.path(), GW_ADDR, &all)?;
        Ok(Self { daemon, dir, ns })
    }

    /// `concentrator-gateway tunnels` in the gateway namespace (admin API on its loopback).
    fn tunnels(&self) -> Result<String> {
        self.ns.run(BIN, &["tunnels"])
    }

    /// The PEER ADDRESS column of the site's row in `tunnels`, once the site is listed.
    fn wait_peer_address(&self) -> Result<String> {
        wait::until("the site's tunnel to be listed", TIMEOUT, || {
            let table = self.tunnels()?;
            let header: Vec<&str> = table.lines().next().unwrap_or_default().split("  ").collect();
            ensure!(
                header.first().is_some_and(|h| h.starts_with("PEER ID")),
                "unexpected tunnels table:\n{table}"
            );
            // Columns: PEER ID, EROUTE, EGROUP, PEER ADDRESS, ...; none of ours has spaces.
            let peer = table
                .lines()
                .find(|l| l.starts_with(SITE_ID))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned));
            Ok(match peer {
                Some(p) => Probe::Ready(p),
                None => Probe::pending(table),
            })
        })
    }

    fn metric(&self, name: &str) -> Result<f64> {
        metric(&self.ns, name)
    }

    fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> Result<()> {
        concentrator_e2e::gateway::wait_metric(&self.ns, name, want, timeout)
    }

    /// The JSON log events whose message is `message`.
    fn events(&self, message: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.daemon.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
            .collect()
    }

    /// Waits for the gateway's "IKE SA established" event and returns it.
    fn wait_established_event(&self) -> Result<serde_json::Value> {
        wait::until("the gateway to log \"IKE SA established\"", TIMEOUT, || {
            Ok(match self.events("IKE SA established").pop() {
                Some(e) => Probe::Ready(e),
                None => Probe::pending(self.daemon.log_tail(5)),
            })
        })
    }
}

use concentrator_e2e::gateway::metric;

/// The site's connection to the gateway from `local`.
fn connection(local: &str, psk: &str) -> Connection {
    site_connection("gw", local, IKE, ESP, psk)
}

/// The gateway's "IKE SA established" `event` says that it detected a NAT and took the
/// peer's address `want` (the router's mapping) from the floated IKE messages.
fn ensure_nat_event(event: &serde_json::Value, want: &str) -> Result<()> {
    ensure!(
        event.get("nat_detected") == Some(&serde_json::Value::Bool(true))
            && event.get("remote").and_then(|r| r.as_str()) == Some(want),
        "the gateway should log nat_detected=true and remote={want}: {event}"
    );
    Ok(())
}

/// The router's nftables rules: masquerade the LAN onto the WAN; count the datagrams
/// forwarded from the site to the IKE ports.
const NAT_RULES: &str = r#"table ip nat {
  counter to500 { }
  counter to4500 { }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "lan0" udp dport 500 counter name to500
    iifname "lan0" udp dport 4500 counter name to4500
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }
}
"#;

/// site (198.51.100.1) -- LAN bridge -- router (masquerade) -- WAN bridge -- gateway.
struct NatSetup {
    charon: Charon,
    gw: Gateway,
    router: Netns,
    site: Netns,
    _lan: Wan,
    _wan: Wan,
}

impl NatSetup {
    fn start(psk: &str) -> Result<Self> {
        let lan = Wan::new()?;
        let wan = Wan::new()?;
        let site = Netns::new("natsite")?;
        let router = Netns::new("natrouter")?;
        lan.attach(&site, "wan0", format!("{SITE_INSIDE}/24").parse()?)?;
        site.add_lo_addr(format!("{SITE_HOST}/24").parse()?)?;
        site.ip(&["route", "add", "default", "via", ROUTER_INSIDE])?;
        lan.attach(&router, "lan0", format!("{ROUTER_INSIDE}/24").parse()?)?;
        wan.attach(&router, "wan0", format!("{ROUTER_WAN}/24").parse()?)?;
        router.run("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        let gw = Gateway::start(&wan, psk, &[])?;
        let file = scratch::write(gw.dir.path(), "nat.nft", NAT_RULES)?;
        router.run(NFT.path(), &["-f", file.to_str().context("path")?])?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))
            .context("the gateway through the NAT")?;
        let charon = Charon::start(&site)?;
        Ok(Self {
            charon,
            gw,
            router,
            site,
            _lan: lan,
            _wan: wan,
        })
    }

    /// Datagrams the router forwarded from the site to UDP port `port` (500 or 4500).
    fn forwarded_to(&self, port: u16) -> Result<u64> {
        let out = self.router.run(
            NFT.path(),
            &["list", "counter", "ip", "nat", &format!("to{port}")],
        )?;
        let packets = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|v| v.parse().ok());
        packets.with_context(|| format!("no packet count in:\n{out}"))
    }

    fn logs(&self) -> String {
        format!(
            "gateway log:\n{}\n{}",
            self.gw.daemon.log_tail(30),
            self.charon.log_tail(40)
        )
    }

    /// Loads `c`, initiates it and waits until both ends say the IKE SA is up; returns
    /// strongSwan's view of the IKE SA and the gateway's "IKE SA established" event.
    fn establish(&self, c: &Connection) -> Result<(IkeSa, serde_json::Value)> {
        self.charon.load(std::slice::from_ref(c))?;
        self.charon.initiate("gw").with_context(|| self.logs())?;
        self.charon
            .wait_established("gw", "gw", TIMEOUT)
            .with_context(|| self.logs())?;
        let ike = self
            .charon
            .list_sas()?
            .into_iter()
            .find(|s| s.name == "gw")
            .context("strongSwan lists no IKE SA gw")?;
        let event = self.gw.wait_established_event().with_context(|| self.logs())?;
        Ok((ike, event))
    }

    /// Ping both ways, then a checksummed TCP transfer both ways.
    fn carries_traffic(&self) -> Result<()> {
        self.site
            .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
            .with_context(|| self.logs())?;
        // The gateway reaches the site only through the router's NAT mapping.
        self.gw
            .ns
            .wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
            .with_context(|| self.logs())?;
        let dir = self.gw.dir.path();
        common::tcp_transfer(&self.site, SITE_HOST, &self.gw.ns, GW_HOST, dir)
            .with_context(|| self.logs())?;
        common::tcp_transfer(&self.gw.ns, GW_HOST, &self.site, SITE_HOST, dir)
            .with_context(|| self.logs())?;
        Ok(())
    }
}

fn field<'a>(ike: &'a IkeSa, key: &str) -> &'a str {
    ike.fields.get(key).map_or("(missing)", String::as_str)
}

#[test]
fn a_site_behind_nat_floats_to_4500_and_carries_traffic_both_ways() -> Result<()> {
    if prereq::require(&[
        netns::TOOLS,
        strongswan::TOOLS,
        &[tools::CURL, tools::PYTHON3, NFT],
    ])
    .is_skip()
    {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = NatSetup::start(&psk)?;
    let (ike, event) = s.establish(&connection(SITE_INSIDE, &psk))?;
    eprintln!("strongSwan: {:?}\ngateway: {event}", ike.fields);

    // strongSwan found itself behind the NAT (a real one: the gateway's hash of the
    // address it saw differs) and floated from 500 to 4500.
    ensure!(
        field(&ike, "nat-local") == "yes" && field(&ike, "local-port") == "4500",
        "strongSwan should see itself behind a NAT and use port 4500: {:?}",
        ike.fields
    );
    let (to500, to4500) = (s.forwarded_to(500)?, s.forwarded_to(4500)?);
    ensure!(
        to500 >= 1 && to4500 >= 1,
        "the router should have forwarded IKE on 500, then IKE and ESP on 4500: {to500} \
         datagrams to 500, {to4500} to 4500"
    );

    // Ours detected the NAT and took the peer's address from the floated IKE_AUTH: the
    // router's masqueraded address on 4500, never the site's private one.
    let want = format!("{ROUTER_WAN}:4500");
    ensure_nat_event(&event, &want)?;
    let peer = s.gw.wait_peer_address()?;
    ensure!(
        peer == want,
        "PEER ADDRESS should be the router's mapping {want}, is {peer}:\n{}",
        s.gw.tunnels()?
    );

    s.carries_traffic()?;
    let esp_out = s.gw.metric("concentrator_gateway_esp_packets_out_total")?;
    ensure!(esp_out > 100.0, "ESP sent to the NAT mapping: {esp_out} packets");
    // The port's program gave IKE on 4500 to the IKE worker's own socket: no data plane
    // thread read any of it (and ESP did not go the other way: the traffic above).
    let passed_on =
        s.gw.metric("concentrator_gateway_ike_passed_on_by_dataplane_total")?;
    ensure!(
        passed_on == 0.0,
        "IKE on 4500 went through the data plane's threads: {passed_on} messages"
    );
    Ok(())
}

#[test]
fn a_site_behind_nat_can_start_ike_on_port_4500() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, NFT]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let s = NatSetup::start(&psk)?;
    let mut c = connection(SITE_INSIDE, &psk);
    // local_port 4500: charon's NAT-T socket, which adds the non-ESP marker.
    c.extra
        .extend(["remote_port = 4500", "local_port = 4500"].map(str::to_owned));
    let (ike, event) = s.establish(&c)?;
    ensure!(
        field(&ike, "remote-port") == "4500" && field(&ike, "local-port") == "4500",
        "strongSwan should run IKE on 4500 at both ends: {:?}",
        ike.fields
    );
    let (to500, to4500) = (s.forwarded_to(500)?, s.forwarded_to(4500)?);
    ensure!(
        to500 == 0 && to4500 >= 2,
        "IKE should never touch port 500: the router forwarded {to500} datagrams to 500 and \
         {to4500} to 4500"
    );
    let want = format!("{ROUTER_WAN}:4500");
    ensure_nat_event(&event, &want)?;
    let peer = s.gw.wait_peer_address()?;
    ensure!(peer == want, "PEER ADDRESS should be {want}, is {peer}");
    s.site
        .wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
    s.gw.ns
        .wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(|| s.logs())?;
    Ok(())
}

/// Sends `count` copies of a datagram (hex) to `gw`:500 over `seconds`, each from a new
/// socket (a new source port) with a random SPIi, never answering; classifies what comes
/// back and prints one JSON line of counts when 2 s pass without an answer.
const FLOOD_PY: &str = r#"
import json, os, resource, selectors, socket, sys, time
gw, src, count, seconds, hexmsg = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
msg = bytearray(bytes.fromhex(hexmsg))
sel = selectors.DefaultSelector()
stats = {"sent": 0, "cookie": 0, "init": 0, "other": 0}
ports, spis, socks = set(), set(), []
def classify(d):
    if len(d) >= 36 and d[8:16] == bytes(8) and d[16] == 41 and int.from_bytes(d[34:36], "big") == 16390:
        stats["cookie"] += 1
    elif len(d) >= 28 and d[8:16] != bytes(8):
        stats["init"] += 1
    else:
        stats["other"] += 1
def drain(timeout):
    got = False
    for key, _ in sel.select(timeout):
        while True:
            try:
                d = key.fileobj.recv(65536)
            except OSError:
                break
            classify(d)
            got = True
    return got
start = time.monotonic()
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    socks.append(s)
    ports.add(s.getsockname()[1])
    spi = os.urandom(8)
    spis.add(spi)
    msg[0:8] = spi
    s.sendto(msg, (gw, 500))
    stats["sent"] += 1
    target = start + seconds * (i + 1) / count
    while time.monotonic() < target:
        drain(max(0.0, target - time.monotonic()))
quiet = time.monotonic() + 2
while time.monotonic() < quiet:
    if drain(max(0.0, quiet - time.monotonic())):
        quiet = time.monotonic() + 2
stats["ports"], stats["spis"] = len(ports), len(spis)
print("FLOOD " + json.dumps(stats), flush=True)
"#;

/// The attacker's counts.
#[derive(Debug, serde::Deserialize)]
struct FloodStats {
    sent: u64,
    cookie: u64,
    init: u64,
    other: u64,
    ports: u64,
    spis: u64,
}

/// Samples metric `name` of the gateway in `ns` every 10 ms until `stop` is set; returns the
/// highest value seen and the number of samples.
fn sample_max(ns: &Netns, name: &str, stop: &AtomicBool) -> Result<(f64, u32)> {
    let (mut max, mut samples) = (0.0f64, 0u32);
    while !stop.load(Ordering::Relaxed) {
        max = max.max(metric(ns, name)?);
        samples += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((max, samples))
}

#[test]
fn a_cookie_flood_keeps_half_open_sas_bounded_and_a_real_site_still_connects() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS, &[tools::CURL, tools::PYTHON3]]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let wan = Wan::new()?;
    let threshold = COOKIE_THRESHOLD.to_string();
    let gw = Gateway::start(&wan, &psk, &["--ike-cookie-threshold", &threshold])?;
    let site = Netns::new("cksite")?;
    wan.attach(&site, "wan0", format!("{SITE_WAN}/24").parse()?)?;
    site.add_lo_addr(format!("{SITE_HOST}/24").parse()?)?;
    let attacker = Netns::new("ckflood")?;
    wan.attach(&attacker, "wan0", format!("{ATTACKER}/24").parse()?)?;
    attacker.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;
    site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;
    let charon = Charon::start(&site)?;
    charon.load(&[connection(SITE_WAN, &psk)])?;
    let logs = || {
        format!(
            "gateway log:\n{}\n{}",
            gw.daemon.log_tail(30),
            charon.log_tail(40)
        )
    };

    let datagram = hex::encode(ike_sa_init_request(0, &[0x5a; 32], None));
    let flood_log = gw.dir.path().join("flood.log");
    // The half-open gauge is sampled in a thread for the whole flood.
    let stop = AtomicBool::new(false);
    let (max_half_open, samples) = std::thread::scope(|scope| -> Result<(f64, u32)> {
        let sampler = scope.spawn(|| sample_max(&gw.ns, "concentrator_gateway_ike_sas_half_open", &stop));
        let flooded = (|| -> Result<()> {
            let _flood = attacker.spawn(
                "flood",
                "python3",
                &[
                    "-c",
                    FLOOD_PY,
                    GW_ADDR,
                    ATTACKER,
                    &FLOOD_COUNT.to_string(),
                    &FLOOD_SECONDS.to_string(),
                    &datagram,
                ],
                &flood_log,
            )?;
            // Under load: the threshold is reached and requests are answered with cookies.
            wait::until("the gateway to demand cookies", TIMEOUT, || {
                let dropped = gw.metric(COOKIE_DROPS)?;
                Ok(if dropped >= 1.0 {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!(
                        "cookie_required drops {dropped}, half-open {}; flood: {}",
                        gw.metric("concentrator_gateway_ike_sas_half_open")?,
                        logs::tail(&flood_log, 5)
                    ))
                })
            })?;
            // While the flood goes on, the real site connects: it returns the cookie.
            charon.initiate("gw").with_context(logs)?;
            charon.wait_established("gw", "gw", TIMEOUT).with_context(logs)?;
            ensure!(
                !logs::contains(&flood_log, "FLOOD "),
                "the flood ended before the site connected; not a connection during the flood"
            );
            site.wait_reachable(Some(addr(SITE_HOST)), addr(GW_HOST), TIMEOUT)
                .with_context(logs)?;
            wait::until("the flood to end", Duration::from_secs(30), || {
                Ok(if logs::contains(&flood_log, "FLOOD ") {
                    Probe::Ready(())
                } else {
                    Probe::pending(logs::tail(&flood_log, 5))
                })
            })?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let sampled = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("the half-open sampler panicked"))?;
        flooded?;
        sampled
    })?;

    let line = std::fs::read_to_string(&flood_log)?;
    let json = line
        .lines()
        .find_map(|l| l.strip_prefix("FLOOD "))
        .with_context(|| format!("no result from the flood:\n{line}"))?;
    let flood: FloodStats = serde_json::from_str(json).with_context(|| json.to_owned())?;
    eprintln!("flood: {flood:?}; half-open peaked at {max_half_open} over {samples} samples");
    let threshold = COOKIE_THRESHOLD as u64;
    ensure!(
        flood.sent == FLOOD_COUNT as u64 && flood.ports == flood.sent && flood.spis == flood.sent,
        "the flood should use a new port and SPIi per request: {flood:?}"
    );
    // Only the first `threshold` requests made the gateway keep state; every other one got
    // a stateless COOKIE notify, none was lost or answered otherwise.
    ensure!(
        flood.init == threshold && flood.cookie == flood.sent - threshold && flood.other == 0,
        "expected {threshold} IKE_SA_INIT responses and {} COOKIE notifies: {flood:?}",
        flood.sent - threshold
    );
    // The gateway counted each of those cookie demands, plus the one to strongSwan's first
    // request.
    let dropped = gw.metric(COOKIE_DROPS)?;
    ensure!(
        dropped == (flood.cookie + 1) as f64,
        "cookie_required drops: {dropped}, expected the attacker's {} + strongSwan's 1",
        flood.cookie
    );
    ensure!(
        logs::contains(charon.log_path(), "COOKIE"),
        "strongSwan never saw a COOKIE:\n{}",
        charon.log_tail(40)
    );
    // Half-open SAs stayed bounded: the attacker's `threshold` plus at most the site's
    // own while it authenticated.
    ensure!(
        samples > 10 && max_half_open <= (COOKIE_THRESHOLD + 1) as f64,
        "half-open SAs during the flood peaked at {max_half_open} ({samples} samples), \
         threshold {COOKIE_THRESHOLD}"
    );
    let half_open = gw.metric("concentrator_gateway_ike_sas_half_open")?;
    ensure!(
        half_open == COOKIE_THRESHOLD as f64,
        "after the flood the attacker's {COOKIE_THRESHOLD} half-open SAs should remain: {half_open}"
    );
    gw.wait_metric("concentrator_gateway_ike_sas_established", 1.0, TIMEOUT)?;

    // The attacker's half-open SAs expire; the site's tunnel stays.
    gw.wait_metric("concentrator_gateway_ike_sas_half_open", 0.0, HALF_OPEN_EXPIRY)
        .with_context(logs)?;
    gw.wait_metric("concentrator_gateway_ike_sas_established", 1.0, TIMEOUT)?;
    gw.ns
        .wait_reachable(Some(addr(GW_HOST)), addr(SITE_HOST), TIMEOUT)
        .with_context(logs)?;
    Ok(())
}
