//! What forwarding between fleet pods costs a tunnel (issue 14; a benchmark, not a timed
//! test). One strongSwan site with default settings (IKE on 500, floating to 4500) connects
//! through the front (`concentrator_e2e::fleet`, kube-proxy's DNAT with per-port ClientIP
//! affinity) to a fleet of two gateway pods. Then, in the same run and alternating
//! `BENCH_ROUNDS` times, the site's port-4500 flow (its ESP in UDP) is pinned in the front:
//!
//! - (a) **owner**: to the pod that owns the site's SAs, as without a fleet;
//! - (b) **forwarded**: to the other pod, so every ESP packet from the site crosses the pod
//!   network to the owner in a fleet frame (`ingress`), and every ESP packet toward the site
//!   comes back from the owner to the entry pod (`egress`) and leaves through its socket.
//!
//! Each phase runs iperf3 TCP from the site's LAN to the head-end LAN address on the owner
//! pod's loopback, the reverse (`-R`), and `BENCH_PINGS` pings at 10 ms intervals; it prints
//! the throughputs, the ratio forwarded/owner (the goal: at least 50%), RTT median
//! and p99 and what forwarding adds, the CPU seconds of each pod's gateway and of the site's
//! IPsec process (charon, or our gateway), and each pod's UDP receive-buffer overflows. The
//! checks are about the path, never about time: in (a) no frame crossed between the pods,
//! in (b) the entry pod forwarded at least every ping and the owner sent its answers back
//! through it without an IP fragment on the pod network (the owner clamps the TCP MSS), and
//! every run moved data.
//!
//! Runs by default at a small size (2 s per iperf3 run, one round, 50 pings), fit for CI.
//! For numbers, as root and in release mode:
//!
//!   BENCH_SECONDS=10 BENCH_ROUNDS=3 BENCH_PINGS=200 cargo test --release \
//!     -p concentrator-gateway --test bench_fleet_forwarding -- --nocapture
//!
//! `BENCH_SITE=gateway` makes the site our own gateway (a static eroute, role Initiator, to
//! the front) instead of strongSwan, whose kernel-libipsec caps one tunnel near 80 Mbit/s on
//! this machine and would hide the pods' own limits. `BENCH_POD_MTU=N` sets the pod
//! network's MTU (the pods' and the bridge's interfaces) to N once the pods run (their MSS
//! clamp keeps following the 1500 bytes they started with). `BENCH_GATEWAY_BIN` runs another
//! `concentrator-gateway` binary. As non-root it prints SKIP and passes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet};
use concentrator_e2e::netns::{self, Netns, addr};
use concentrator_e2e::topology::{GW_HOST, site_host, site_wan};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, process, strongswan, tools};

mod common;

const PODS: usize = 2;
/// The site's number (its addresses and identity, `concentrator_e2e::topology`).
const SITE: usize = 1;
/// The Service port that carries the site's ESP (and its IKE after NAT detection).
const NATT: u16 = 4500;
const TIMEOUT: Duration = Duration::from_secs(40);
const FORWARDED: &str = "fleet_forwarded_packets_total";

/// How big a run is.
struct Size {
    secs: u64,
    rounds: u64,
    pings: u64,
}

impl Size {
    fn from_env() -> Self {
        Self {
            secs: common::env_num("BENCH_SECONDS", 2),
            rounds: common::env_num("BENCH_ROUNDS", 1),
            pings: common::env_num("BENCH_PINGS", 50),
        }
    }
}

/// Where the site's ESP enters the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Owner,
    Other,
}

/// The fleet frames a pod counted, by `kind/direction` (`ingress/sent`, ...).
type Frames = BTreeMap<String, f64>;

fn frames(pod: &fleet::Pod) -> Result<Frames> {
    let label = |k: &str, name: &str| -> String {
        k.split_once(&format!("{name}=\""))
            .and_then(|(_, rest)| rest.split('"').next())
            .unwrap_or("?")
            .to_owned()
    };
    Ok(pod
        .samples(FORWARDED)?
        .into_iter()
        .map(|(k, v)| (format!("{}/{}", label(&k, "kind"), label(&k, "direction")), v))
        .collect())
}

/// `after - before` for every key of `after`.
fn delta(before: &Frames, after: &Frames) -> Frames {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// CPU seconds (user + system) of the processes in `ns` whose name starts with `comm`.
fn cpu_seconds(ns: &Netns, comm: &str, ticks: f64) -> f64 {
    ns.pids()
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with(comm)))
        .map(|p| process::cpu_seconds(p, ticks))
        .sum()
}

/// Sets the MTU of the pod network: every interface of its bridge namespace (the bridge and
/// its ports) and each pod's `eth0`.
fn set_pod_mtu(fleet: &Fleet, mtu: &str) -> Result<()> {
    let bridge = fleet.pod_net().namespace();
    let links = bridge.ip(&["-o", "link", "show"])?;
    // Ports first: a bridge's MTU cannot exceed its ports'.
    let mut names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default())
        .filter(|n| *n != "lo")
        .collect();
    names.sort_by_key(|n| *n == "br0");
    for n in names {
        bridge.ip(&["link", "set", "dev", n, "mtu", mtu])?;
    }
    for pod in fleet.pods() {
        pod.ns().ip(&["link", "set", "dev", "eth0", "mtu", mtu])?;
    }
    Ok(())
}

/// The kernel's UDP receive-buffer overflows (`Udp: RcvbufErrors`), failed reassemblies
/// (`Ip: ReasmFails`) and fragments made (`Ip: FragCreates`) in `ns`: where frames between
/// pods are lost when they are, and whether they had to be cut to cross the pod network.
fn udp_losses(ns: &Netns) -> [f64; 3] {
    let snmp = ns.run("cat", &["/proc/net/snmp"]).unwrap_or_default();
    let value = |proto: &str, name: &str| -> f64 {
        let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
        let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
            return 0.0;
        };
        head.split_whitespace()
            .zip(vals.split_whitespace())
            .find(|(h, _)| *h == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    [
        value("Udp:", "RcvbufErrors"),
        value("Ip:", "ReasmFails"),
        value("Ip:", "FragCreates"),
    ]
}

/// What the pods and the site have done so far: frames and CPU seconds per pod, the
/// CPU seconds of the site's IPsec process.
struct Snapshot {
    frames: Vec<Frames>,
    losses: Vec<[f64; 3]>,
    cpu: Vec<f64>,
    charon: f64,
}

fn snapshot(fleet: &Fleet, site: &Remote, ticks: f64) -> Result<Snapshot> {
    Ok(Snapshot {
        frames: fleet.pods().iter().map(frames).collect::<Result<_>>()?,
        losses: fleet.pods().iter().map(|p| udp_losses(p.ns())).collect(),
        cpu: fleet
            .pods()
            .iter()
            .map(|p| cpu_seconds(p.ns(), "concentrator-ga", ticks))
            .collect(),
        charon: cpu_seconds(site.ns(), site.comm(), ticks),
    })
}

/// The site: strongSwan (`BENCH_SITE` unset or `strongswan`: kernel-libipsec, whose one
/// core sets the rate on this machine) or our own gateway (`BENCH_SITE=gateway`: a static
/// eroute, role Initiator, to the front address), to see the pods' rates where the site is
/// not the limit.
enum Remote {
    Swan(Box<Site>),
    Ours(common::fleet::GatewaySite),
}

impl Remote {
    fn start(fleet: &Fleet, psk: &str, scratch: &Path) -> Result<Self> {
        let front = fleet.front().address();
        match std::env::var("BENCH_SITE").unwrap_or_default().as_str() {
            "" | "strongswan" => {
                let site = sites::start_all(fleet.wan(), front, &[(SITE, psk.to_owned())], 1)?
                    .pop()
                    .context("one site")?;
                site.initiate().with_context(|| fleet.log_tails(30))?;
                Ok(Self::Swan(Box::new(site)))
            }
            "gateway" => Ok(Self::Ours(common::fleet::GatewaySite::start(
                fleet, SITE, psk, scratch,
            )?)),
            other => bail!("BENCH_SITE={other}: expected strongswan or gateway"),
        }
    }

    fn ns(&self) -> &Netns {
        match self {
            Self::Swan(s) => s.ns(),
            Self::Ours(g) => &g.ns,
        }
    }

    fn host(&self) -> IpAddr {
        addr(&site_host(SITE))
    }

    fn wan_addr(&self) -> IpAddr {
        addr(&site_wan(SITE))
    }

    fn peer_id(&self) -> String {
        sites::peer_id(SITE)
    }

    /// The name of the site's IPsec process, for its CPU time.
    fn comm(&self) -> &'static str {
        match self {
            Self::Swan(_) => "charon",
            Self::Ours(_) => "concentrator-ga",
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        match self {
            Self::Swan(s) => s.log_tail(lines),
            Self::Ours(g) => g.log_tail(lines),
        }
    }
}

/// One iperf3 TCP run from the site's LAN address to [`GW_HOST`] on the owner pod (`-R`:
/// the owner sends); bits/s received.
fn iperf(site: &Remote, owner: &Netns, reverse: bool, secs: u64, log: &Path) -> Result<f64> {
    common::iperf_bps(site.ns(), site.host(), owner, reverse, secs, log)
}

/// `count` pings every 10 ms from the site's LAN through the tunnel; the RTTs (ms) of those
/// answered.
fn ping_rtts(site: &Remote, count: u64) -> Result<Vec<f64>> {
    let (from, count) = (site.host().to_string(), count.to_string());
    let out = site.ns().output(
        tools::PING.path(),
        &["-n", "-i", "0.01", "-W", "1", "-c", &count, "-I", &from, GW_HOST],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("time=")?.1.split_whitespace().next()?.parse().ok())
        .collect())
}

/// The value at quantile `q` (0.0 to 1.0) of `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// One measured phase.
struct Phase {
    entry: Entry,
    up: f64,
    down: f64,
    rtts: Vec<f64>,
    pings: u64,
    /// Frames counted during the phase, per pod.
    frames: Vec<Frames>,
    /// UDP receive-buffer overflows and failed reassemblies during the phase, per pod.
    losses: Vec<[f64; 3]>,
    cpu: Vec<f64>,
    charon: f64,
}

/// Moves the site's port-4500 flow onto pod `entry_pod` and waits until its tunnel answers
/// through it.
fn pin(fleet: &Fleet, site: &Remote, entry_pod: usize) -> Result<()> {
    fleet.front().pin_client(site.wan_addr(), NATT, entry_pod)?;
    // The flow is re-created by the site's next packet to 4500: the pings are that packet.
    wait::until(
        format!("the site's ESP to enter through gw-{entry_pod}"),
        TIMEOUT,
        || {
            site.ns()
                .wait_reachable(Some(site.host()), addr(GW_HOST), TIMEOUT)?;
            let at = fleet.front().placement(NATT)?.get(&site.wan_addr()).copied();
            Ok(if at == Some(entry_pod) {
                Probe::Ready(())
            } else {
                Probe::pending(format!("port-4500 flow on {at:?}"))
            })
        },
    )
    .with_context(|| fleet.log_tails(20))
}

fn measure(
    fleet: &Fleet,
    site: &Remote,
    owner: usize,
    entry: Entry,
    size: &Size,
    ticks: f64,
) -> Result<Phase> {
    let entry_pod = match entry {
        Entry::Owner => owner,
        Entry::Other => 1 - owner,
    };
    pin(fleet, site, entry_pod)?;
    // A second of traffic on the new path before counting, so the owner has learnt which
    // pod the site's flow enters by (it sends its answers by the last packet it got).
    ping_rtts(site, 20)?;
    let log = fleet.dir().join("iperf3-server.log");
    let own = fleet.pod(owner).ns();
    let before = snapshot(fleet, site, ticks)?;
    let up = iperf(site, own, false, size.secs, &log)?;
    let down = iperf(site, own, true, size.secs, &log)?;
    let rtts = ping_rtts(site, size.pings)?;
    let after = snapshot(fleet, site, ticks)?;
    let at = fleet.front().placement(NATT)?.get(&site.wan_addr()).copied();
    ensure!(
        at == Some(entry_pod),
        "the site's port-4500 flow moved to {at:?} during the {entry:?} phase"
    );
    Ok(Phase {
        entry,
        up,
        down,
        rtts,
        pings: size.pings,
        frames: before
            .frames
            .iter()
            .zip(&after.frames)
            .map(|(b, a)| delta(b, a))
            .collect(),
        cpu: before.cpu.iter().zip(&after.cpu).map(|(b, a)| a - b).collect(),
        losses: before
            .losses
            .iter()
            .zip(&after.losses)
            .map(|(b, a)| [a[0] - b[0], a[1] - b[1], a[2] - b[2]])
            .collect(),
        charon: after.charon - before.charon,
    })
}

/// The checks on the path a phase took (not on its times).
fn check(p: &Phase, owner: usize) -> Result<()> {
    let entry = 1 - owner;
    let count = |pod: usize, key: &str| p.frames[pod].get(key).copied().unwrap_or(0.0);
    ensure!(
        p.up > 0.0 && p.down > 0.0 && !p.rtts.is_empty(),
        "{:?}: a run moved nothing (up {} down {} bit/s, {} pings answered)",
        p.entry,
        p.up,
        p.down,
        p.rtts.len()
    );
    match p.entry {
        Entry::Owner => ensure!(
            p.frames.iter().all(Frames::is_empty),
            "the site's ESP entered through its owner, yet frames crossed between the pods: {:?}",
            p.frames
        ),
        Entry::Other => {
            // Each answered ping is one ESP packet in and one out, both forwarded.
            let answered = p.rtts.len() as f64;
            ensure!(
                count(entry, "ingress/sent") >= answered && count(owner, "ingress/received") >= answered,
                "gw-{entry} should have forwarded every ESP packet to gw-{owner}: {:?}",
                p.frames
            );
            ensure!(
                count(owner, "egress/sent") >= answered && count(entry, "egress/received") >= answered,
                "gw-{owner} should have sent every answer back through gw-{entry}: {:?}",
                p.frames
            );
            // The owner clamps the TCP MSS (--tcp-mss-clamp auto) so that a full segment,
            // sealed and framed, fits the pod network: no frame of the iperf3 runs is cut.
            let fragments: f64 = p.losses.iter().map(|l| l[2]).sum();
            ensure!(
                fragments == 0.0,
                "the pods made {fragments} IP fragments forwarding TCP between them: the MSS clamp should keep frames within the pod MTU"
            );
        }
    }
    Ok(())
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    quantile(&v.into_iter().collect::<Vec<_>>(), 0.5)
}

fn report(phases: &[Phase], owner: usize, size: &Size, site: &str) {
    let of = |e: Entry| phases.iter().filter(move |p| p.entry == e);
    let mbit = |bps: f64| bps / 1e6;
    let rounds = |e: Entry, f: fn(&Phase) -> f64| -> String {
        of(e)
            .map(|p| format!("{:.0}", mbit(f(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rtts = |e: Entry| of(e).flat_map(|p| p.rtts.iter().copied()).collect::<Vec<_>>();
    let sent = |e: Entry| of(e).map(|p| p.pings).sum::<u64>();
    let (a_up, b_up) = (
        median(of(Entry::Owner).map(|p| p.up)),
        median(of(Entry::Other).map(|p| p.up)),
    );
    let (a_dn, b_dn) = (
        median(of(Entry::Owner).map(|p| p.down)),
        median(of(Entry::Other).map(|p| p.down)),
    );
    let (a_rtt, b_rtt) = (rtts(Entry::Owner), rtts(Entry::Other));
    println!(
        "fleet of {PODS} pods, one {site} site, ESP in UDP through the front; owner gw-{owner}, \
         other gw-{}; iperf3 TCP {} s per run, {} round(s) (medians, Mbit/s):",
        1 - owner,
        size.secs,
        size.rounds
    );
    for (label, owner, other, rate) in [
        ("site -> owner", a_up, b_up, (|p| p.up) as fn(&Phase) -> f64),
        ("owner -> site", a_dn, b_dn, |p| p.down),
    ] {
        println!(
            "  {label}:  ESP enters at the owner {:>7.0}  [{}]   at the other pod {:>7.0}  [{}]   forwarded/owner {:>5.1}%",
            mbit(owner),
            rounds(Entry::Owner, rate),
            mbit(other),
            rounds(Entry::Other, rate),
            100.0 * other / owner
        );
    }
    for (name, e, v) in [
        ("owner", Entry::Owner, &a_rtt),
        ("forwarded", Entry::Other, &b_rtt),
    ] {
        println!(
            "  ping RTT, {name:<9}: median {:.3} ms, p99 {:.3} ms ({} of {} answered)",
            quantile(v, 0.5),
            quantile(v, 0.99),
            v.len(),
            sent(e)
        );
    }
    println!(
        "  forwarding adds {:.3} ms to the median RTT, {:.3} ms to the p99",
        quantile(&b_rtt, 0.5) - quantile(&a_rtt, 0.5),
        quantile(&b_rtt, 0.99) - quantile(&a_rtt, 0.99)
    );
    for e in [Entry::Owner, Entry::Other] {
        let cpu: Vec<String> = (0..PODS)
            .map(|i| format!("gw-{i} {:.1}", of(e).map(|p| p.cpu[i]).sum::<f64>()))
            .collect();
        let charon: f64 = of(e).map(|p| p.charon).sum();
        // The site (strongSwan's kernel-libipsec) may be what limits the rate: CPU per byte
        // carried shows what forwarding costs the pods even when the rates come out alike.
        let gbytes: f64 = of(e)
            .map(|p| (p.up + p.down) * size.secs as f64 / 8.0 / 1e9)
            .sum();
        let pods_cpu: f64 = of(e).map(|p| p.cpu.iter().sum::<f64>()).sum();
        let frames: Vec<String> = (0..PODS)
            .map(|i| {
                let mut sum = Frames::new();
                for p in of(e) {
                    for (k, v) in &p.frames[i] {
                        *sum.entry(k.clone()).or_default() += v;
                    }
                }
                format!("gw-{i} {sum:?}")
            })
            .collect();
        let losses: Vec<String> = (0..PODS)
            .map(|i| {
                let l = |k: usize| of(e).map(|p| p.losses[i][k]).sum::<f64>();
                format!("gw-{i} {}/{}/{}", l(0), l(1), l(2))
            })
            .collect();
        println!(
            "  {e:?} phases: UDP receive-buffer overflows/failed reassemblies/fragments made {}",
            losses.join(", ")
        );
        println!(
            "  {e:?} phases: CPU seconds {}, site {charon:.1}; {:.2} GB carried by iperf3, \
             {:.1} pod CPU seconds per GB, {:.1} site CPU seconds per GB; frames {}",
            cpu.join(", "),
            gbytes,
            pods_cpu / gbytes,
            charon / gbytes,
            frames.join(", ")
        );
    }
}

#[test]
fn forwarded_esp_vs_esp_at_the_owner() -> Result<()> {
    if prereq::require(&[
        netns::TOOLS,
        strongswan::TOOLS,
        etcd::TOOLS,
        fleet::TOOLS,
        &[tools::IPERF3],
    ])
    .is_skip()
    {
        return Ok(());
    }
    let size = Size::from_env();
    let ticks = process::clock_ticks();
    let psks = common::fleet::psks(1);
    let (config, fleet) = common::fleet::start(PODS, Affinity::client_ip(), &psks)?;
    if let Ok(mtu) = std::env::var("BENCH_POD_MTU") {
        set_pod_mtu(&fleet, &mtu)?;
    }
    let site = Remote::start(&fleet, &psks[0].1, config.path())?;
    site.ns()
        .wait_reachable(Some(site.host()), addr(GW_HOST), TIMEOUT)
        .with_context(|| format!("{}\n{}", site.log_tail(30), fleet.log_tails(30)))?;

    // The owner: the pod whose tunnel table lists the site, and which its claim names.
    let owners = fleet.owners_of(&site.peer_id())?;
    let &[owner] = owners.as_slice() else {
        bail!("the site is listed by pods {owners:?}, not by exactly one");
    };
    let claimed: Vec<Option<usize>> = fleet
        .claims()?
        .into_iter()
        .filter(|c| c.peer_id == site.peer_id())
        .map(|c| c.member)
        .collect();
    ensure!(
        claimed == [Some(owner)],
        "the site's tunnel is on gw-{owner}, its claims name {claimed:?}"
    );

    let mut phases = Vec::new();
    for round in 0..size.rounds {
        // Alternate which goes first, so drift in the machine's load falls on both.
        let order = if round % 2 == 0 {
            [Entry::Owner, Entry::Other]
        } else {
            [Entry::Other, Entry::Owner]
        };
        for entry in order {
            let p = measure(&fleet, &site, owner, entry, &size, ticks)
                .with_context(|| format!("round {round}, {entry:?}\n{}", site.log_tail(20)))?;
            check(&p, owner)?;
            phases.push(p);
        }
    }
    report(&phases, owner, &size, site.comm());
    let stray = fleet.front().stray_packets()?;
    println!("  packets pods sent toward the WAN outside a front flow (dropped): {stray}");
    Ok(())
}
