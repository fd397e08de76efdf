//! The VIP front (issue 16): three pods behind the front address with `--fleet-vip`, each
//! with its own address on the front (a per-pod Service, `e2e::fleet::vip`) published from
//! the addresses file the operator would write. The elected director redirects every new
//! site (RFC 5685) by load:
//!
//! - 60 new sites, strongSwan sites and our own initiators (a generator in a site namespace
//!   that follows redirects as the gateway's initiator does), end up spread over the three
//!   pods within ±20% of even, every one of them redirected;
//! - the director's pod is killed (SIGKILL): another member directs within the lease TTL and
//!   a second, and new sites still connect, redirected by it;
//! - a strongSwan site that does not support redirects (`follow_redirects = no`: it does
//!   not announce REDIRECT_SUPPORTED) still connects, placed as in the SLB front.
//!
//! With `--fleet-redirect-in-auth` the director authenticates each new site first and
//! redirects it in its IKE_AUTH response (RFC 5685 §6): the sites spread the same way. Only
//! our initiators there: strongSwan 5.9.8's charon follows the redirect and then dies of a
//! double free while it starts the new IKE SA (docs/fleet.md).
//!
//! With `--fleet-rebalance`, a pod that comes back after its sites went to the others gets
//! its share again: the others redirect established sites to it (RFC 5685 §5).
//!
//! The tests take turns (a lock): each runs a fleet and many sites on CI's two cores.
//! As non-root the test prints SKIP and passes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::sites::{self, Site, SiteOptions};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions, vip};
use concentrator_e2e::topology::{GW_ADDR, GW_ID, GW_LAN};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, netns, prereq, scratch, strongswan};
use concentrator_ike::Header;
use concentrator_ike::initiator::{Event, Initiator, NatTraversal};
use concentrator_ike::payload::Identity;
use concentrator_ike::redirect::GatewayId;
use concentrator_ike::responder::{IdBuf, SystemEntropy};
use concentrator_test_util::interop::{driver_addrs, env, field, initiator_config};

mod common;

use common::StaticEroute;

const PODS: usize = 3;
/// strongSwan sites and our initiators that connect first: 60 in all.
const SWAN_SITES: usize = 15;
const OUR_SITES: u64 = 45;
/// Sites that connect after the director's death.
const LATE_SITES: usize = 3;
const LEASE_TTL: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

const IKE: &str = "aes128gcm16-prfsha256-x25519";
const ESP: &str = "aes128gcm16";
const PSK: &str = "vip-load-psk-not-a-secret";
/// Where the generator runs, and the subnet its initiators offer.
const GENERATOR_ADDR: &str = "192.0.2.150";
const GENERATOR_LAN: &str = "10.3.0.0/24";

/// The eroute our initiators (`sa-N.load.example`) connect to, beside the egroup of the
/// strongSwan sites.
const LOAD_EROUTE: StaticEroute<'static> = StaticEroute {
    name: "load",
    local_subnet: GW_LAN,
    remote_subnet: GENERATOR_LAN,
    peer_id: "*.load.example",
    local_id: GW_ID,
    initiate_to: None,
    ike: IKE,
    esp: ESP,
    dpd: Some("1h"),
    lifetimes: None,
    esp_extra: "",
    psk: PSK,
};

/// One test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A VIP fleet of [`PODS`] pods with more gateway `args`, the strongSwan sites `psks` in
/// every pod's store, not started yet: its per-pod addresses on the front, the addresses
/// file in `dir`.
fn vip_fleet(dir: &Path, psks: &[(usize, String)], args: &[&str]) -> Result<Fleet> {
    let config = dir.join("config");
    common::fleet::write_egroup_config(&config)?;
    LOAD_EROUTE.write(&config)?;
    let addresses = dir.join("redirect-addresses");
    std::fs::write(&addresses, vip::addresses_file(PODS))?;
    let addresses = addresses.to_str().context("path")?;
    let mut options = FleetOptions::new(PODS, Affinity::client_ip(), common::gateway_bin(), &config);
    options.lease_ttl = LEASE_TTL;
    options.gateway_args = [
        "--fleet-vip",
        GW_ADDR,
        "--fleet-redirect-addresses-file",
        addresses,
        // Our initiators come from one address, many at once.
        "--ike-cookie-threshold",
        "1000",
        "--ike-max-half-open",
        "1000",
    ]
    .iter()
    .chain(args)
    .map(|a| (*a).to_owned())
    .collect();
    let fleet = Fleet::new(options)?;
    vip::expose_pods(fleet.front(), PODS)?;
    for pod in fleet.pods() {
        common::fleet::import_sites(&pod.data_dir(), psks)?;
    }
    Ok(fleet)
}

/// Starts the generator of `sas` of our initiators in its own namespace on the WAN; its
/// output goes to `log`. The generator drops before its namespace.
fn start_generator(
    fleet: &Fleet,
    sas: u64,
    log: &Path,
) -> Result<(concentrator_e2e::process::Daemon, netns::Netns)> {
    let generator = fleet.wan().host("vipgen", GENERATOR_ADDR, None)?;
    let mut cmd = generator.command(std::env::current_exe()?);
    cmd.args(["--exact", "vip_load_driver", "--nocapture", "--test-threads=1"])
        .env("VIP_LOAD_DRIVER", "1")
        .env("VIP_LOAD_LOCAL", GENERATOR_ADDR)
        .env("VIP_LOAD_REMOTE", GW_ADDR)
        .env("VIP_LOAD_SAS", sas.to_string());
    let daemon = concentrator_e2e::process::Daemon::spawn("generator", cmd, log)?;
    Ok((daemon, generator))
}

/// The generator's `RESULT` line, once all its initiators are up or failed.
fn generator_result(log: &Path) -> Result<String> {
    wait::until("the generator's result", CONNECT_TIMEOUT, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        Ok(
            match text
                .lines()
                .find_map(|l| l.find("RESULT ").and_then(|at| l.get(at..)))
            {
                Some(line) => Probe::Ready(line.to_owned()),
                None => Probe::pending(concentrator_e2e::logs::tail(log, 5)),
            },
        )
    })
}

/// Each pod's established IKE SAs.
fn per_pod(fleet: &Fleet) -> Result<Vec<Option<f64>>> {
    fleet.metric_by_pod("ike_sas_established")
}

/// The pod whose gateway says it directs, once exactly one running pod does.
fn wait_director(fleet: &Fleet, timeout: Duration) -> Result<usize> {
    wait::until("exactly one VIP director", timeout, || {
        let gauges = fleet.metric_by_pod("fleet_director")?;
        let on: Vec<usize> = (0..gauges.len()).filter(|&i| gauges[i] == Some(1.0)).collect();
        Ok(match on[..] {
            [d] => Probe::Ready(d),
            _ => Probe::pending(format!("fleet_director by pod {gauges:?}")),
        })
    })
}

/// Starts `sites` strongSwan sites and brings each one's tunnel up.
fn connect_swan(fleet: &Fleet, sites: &[(usize, String)], options: &SiteOptions) -> Result<Vec<Site>> {
    let started = sites::start_all_with(fleet.wan(), fleet.front().address(), sites, 4, options)?;
    sites::in_parallel(&started, 4, |s| {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            // swanctl may report a failure for an IKE SA that was redirected while charon
            // goes on with the new gateway: look at what charon holds before trying again.
            let _ = s.initiate();
            let settled = Instant::now() + Duration::from_secs(10);
            while Instant::now() < settled {
                if s.is_established()? {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if Instant::now() > deadline {
                bail!("site {} never established:\n{}", s.n(), s.log_tail(30));
            }
            s.reset()?;
        }
    })?;
    Ok(started)
}

#[test]
fn the_director_spreads_new_sites_and_is_replaced_when_its_pod_dies() -> Result<()> {
    if prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let dir = scratch::dir("fleet-vip")?;
    let psks = common::fleet::psks(SWAN_SITES + LATE_SITES + 1);
    let mut fleet = vip_fleet(dir.path(), &psks, &[])?;
    fleet.start_pods()?;
    let director = wait_director(&fleet, Duration::from_secs(20))?;
    eprintln!(
        "fleet of {PODS} up after {:.1?}; pod {director} directs",
        t0.elapsed()
    );

    // 60 new sites at once: strongSwan sites and our generator's initiators.
    let gen_log = dir.path().join("generator.log");
    let _gen = start_generator(&fleet, OUR_SITES, &gen_log)?;
    let swan = connect_swan(&fleet, &psks[..SWAN_SITES], &SiteOptions::default())
        .with_context(|| fleet.log_tails(20))?;
    let result = generator_result(&gen_log)?;
    eprintln!("generator: {result}");
    ensure!(
        field(&result, "established") == Some(&OUR_SITES.to_string()),
        "our initiators did not all connect: {result}"
    );
    ensure!(
        field(&result, "redirected") == Some(&OUR_SITES.to_string()),
        "not every initiator was redirected: {result}"
    );
    let total = (SWAN_SITES as f64) + OUR_SITES as f64;
    fleet
        .wait_metric_sum("ike_sas_established", Duration::from_secs(20), |n| n >= total)
        .with_context(|| fleet.log_tails(20))?;
    let spread = per_pod(&fleet)?;
    let redirects = fleet.metric_sum("fleet_redirects")?;
    eprintln!("{total} sites: IKE SAs by pod {spread:?}, redirects {redirects}");
    let even = total / PODS as f64;
    for (i, n) in spread.iter().enumerate() {
        let n = n.unwrap_or(0.0);
        ensure!(
            (n - even).abs() <= even * 0.2,
            "pod {i} holds {n} of {total} sites, more than 20% from {even}: {spread:?}"
        );
    }
    ensure!(redirects >= total, "{redirects} redirects for {total} new sites");

    // The director's pod dies: another member directs within the lease TTL and a second.
    let killed = Instant::now();
    fleet.kill_pod(director);
    fleet.front().remove_endpoint(director)?;
    let next = wait_director(&fleet, LEASE_TTL + Duration::from_secs(5))?;
    let took = killed.elapsed();
    eprintln!("director pod {director} killed; pod {next} directs after {took:.2?}");
    ensure!(next != director);
    ensure!(
        took <= LEASE_TTL + Duration::from_secs(1),
        "a new director took {took:.2?}, more than the lease TTL ({LEASE_TTL:?}) and a second"
    );

    // New sites still connect, redirected by the new director.
    let before = fleet.pod(next).metric("fleet_redirects")?;
    let late = connect_swan(
        &fleet,
        &psks[SWAN_SITES..SWAN_SITES + LATE_SITES],
        &SiteOptions::default(),
    )
    .with_context(|| fleet.log_tails(20))?;
    let after = fleet.pod(next).metric("fleet_redirects")?;
    ensure!(
        after - before >= LATE_SITES as f64,
        "the new director redirected {} of {LATE_SITES} new sites",
        after - before
    );

    // A site that does not support redirects is served, not sent away.
    let stubborn = SiteOptions {
        charon: vec!["follow_redirects = no".to_owned()],
        ..SiteOptions::default()
    };
    let redirects_before = fleet.metric_sum("fleet_redirects")?;
    let last = &psks[SWAN_SITES + LATE_SITES..];
    let plain = connect_swan(&fleet, last, &stubborn).with_context(|| fleet.log_tails(20))?;
    ensure!(
        fleet.metric_sum("fleet_redirects")? == redirects_before,
        "a site without redirect support was redirected"
    );
    eprintln!("all checks passed after {:.1?}", t0.elapsed());
    drop((swan, late, plain));
    fleet.check_running().ok();
    Ok(())
}

#[test]
fn a_pod_that_comes_back_gets_its_share_by_rebalancing() -> Result<()> {
    if prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const SITES: u64 = 30;
    let dir = scratch::dir("fleet-vip-rebalance")?;
    let mut fleet = vip_fleet(dir.path(), &[], &["--fleet-rebalance"])?;
    fleet.start_pods()?;
    // Pod 2 is away while the sites connect: they all go to pods 0 and 1.
    fleet.kill_pod(2);
    fleet.front().remove_endpoint(2)?;
    fleet.wait_members(2, fleet::MEMBERS_TIMEOUT)?;
    wait_director(&fleet, Duration::from_secs(20))?;
    let gen_log = dir.path().join("generator.log");
    let _gen = start_generator(&fleet, SITES, &gen_log)?;
    let result = generator_result(&gen_log)?;
    ensure!(
        field(&result, "established") == Some(&SITES.to_string()),
        "our initiators did not all connect: {result}"
    );
    fleet.wait_metric_sum("ike_sas_established", Duration::from_secs(20), |n| {
        n >= SITES as f64
    })?;
    eprintln!("{SITES} sites on two pods: {:?}", per_pod(&fleet)?);

    // Pod 2 comes back: the others redirect sites to it until each holds about a third.
    let back = Instant::now();
    fleet.start_pod(2)?;
    fleet.front().restore_endpoint(2)?;
    fleet.wait_members(3, fleet::MEMBERS_TIMEOUT)?;
    let even = SITES as f64 / PODS as f64;
    let spread = wait::until(
        "every pod within 20% of an even share",
        Duration::from_secs(60),
        || {
            let v = per_pod(&fleet)?;
            let n: Vec<f64> = v.iter().map(|n| n.unwrap_or(0.0)).collect();
            let total: f64 = n.iter().sum();
            Ok(
                if n.iter().all(|n| (n - even).abs() <= even * 0.2) && (total - SITES as f64).abs() < 0.5 {
                    Probe::Ready(n)
                } else {
                    Probe::pending(format!("IKE SAs by pod {v:?}"))
                },
            )
        },
    )
    .with_context(|| rebalance_story(&fleet))?;
    let moved = fleet.metric_sum("fleet_redirects")?;
    eprintln!(
        "rebalanced to {spread:?} in {:.1?} after pod 2 came back; redirects (new sites and moves) {moved}",
        back.elapsed()
    );
    ensure!(
        moved >= SITES as f64 + 1.0,
        "no site was moved: {moved} redirects"
    );
    Ok(())
}

#[test]
fn the_director_may_redirect_after_authentication() -> Result<()> {
    if prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const OURS: u64 = 30;
    let dir = scratch::dir("fleet-vip-auth")?;
    let mut fleet = vip_fleet(dir.path(), &[], &["--fleet-redirect-in-auth"])?;
    fleet.start_pods()?;
    wait_director(&fleet, Duration::from_secs(20))?;
    let gen_log = dir.path().join("generator.log");
    let _gen = start_generator(&fleet, OURS, &gen_log)?;
    let result = generator_result(&gen_log)?;
    ensure!(
        field(&result, "established") == Some(&OURS.to_string())
            && field(&result, "redirected") == Some(&OURS.to_string()),
        "our initiators were not all redirected and connected: {result}"
    );
    let total = OURS as f64;
    fleet
        .wait_metric_sum("ike_sas_established", Duration::from_secs(20), |n| n >= total)
        .with_context(|| fleet.log_tails(20))?;
    let spread = per_pod(&fleet)?;
    let in_auth: f64 = fleet
        .pods()
        .iter()
        .map(|p| {
            p.samples("fleet_redirects_total").map(|v| {
                v.iter()
                    .filter(|(k, _)| k.contains("reason=\"auth\""))
                    .map(|(_, n)| n)
                    .sum::<f64>()
            })
        })
        .sum::<Result<f64>>()?;
    eprintln!("{total} sites redirected in IKE_AUTH ({in_auth}): IKE SAs by pod {spread:?}");
    ensure!(
        in_auth >= total,
        "{in_auth} redirects in IKE_AUTH for {total} new sites"
    );
    ensure!(
        fleet.metric_sum("fleet_redirects")? - in_auth < 0.5,
        "sites were redirected in IKE_SA_INIT too"
    );
    let even = total / PODS as f64;
    for (i, n) in spread.iter().enumerate() {
        let n = n.unwrap_or(0.0);
        ensure!(
            (n - even).abs() <= even * 0.2,
            "pod {i} holds {n} of {total} sites, more than 20% from {even}: {spread:?}"
        );
    }
    Ok(())
}

/// For a failed rebalance: each pod's members and redirects as it reports them, and the log
/// lines about membership, the director and rebalancing.
fn rebalance_story(fleet: &Fleet) -> String {
    let mut out = String::new();
    for pod in fleet.pods() {
        let members = pod
            .metric("fleet_members")
            .map_or_else(|e| format!("{e:#}"), |m| m.to_string());
        let redirects = pod.samples("fleet_redirects_total").unwrap_or_default();
        out.push_str(&format!(
            "{}: members {members}, redirects {redirects:?}\n",
            pod.name()
        ));
        let log = std::fs::read_to_string(pod.log_path()).unwrap_or_default();
        for line in log.lines().filter(|l| {
            ["rebalance", "fleet session", "in the fleet", "director", "lease"]
                .iter()
                .any(|w| l.contains(w))
        }) {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// The generator of our initiators: runs when `VIP_LOAD_DRIVER` is set (the test runs it in
/// a site namespace), connects `VIP_LOAD_SAS` IKE SAs to the front, each following a
/// redirect as the gateway's initiator does (to the address named, with REDIRECTED_FROM),
/// prints one `RESULT` line, then keeps the SAs (answering liveness checks) until killed.
#[test]
fn vip_load_driver() -> Result<()> {
    let Some((local, front)) = driver_addrs("VIP_LOAD_DRIVER", "VIP_LOAD")? else {
        return Ok(());
    };
    let sas: u64 = env("VIP_LOAD_SAS")?.parse()?;
    let mut base = initiator_config(IKE, ESP, (GENERATOR_LAN, GW_LAN), ("sa.load.example", GW_ID))?;
    let sock = UdpSocket::bind((local, 0))?;
    let here = sock.local_addr()?;
    base.nat_t = NatTraversal {
        force: true,
        local_port: here.port(),
        remote_port: 4500,
    };
    let mut entropy = SystemEntropy;
    let mut sas_by_spi: HashMap<u64, (u64, Initiator)> = HashMap::new();
    let connect =
        |n: u64, to: IpAddr, from: Option<IpAddr>, entropy: &mut SystemEntropy| -> Result<Initiator> {
            let mut config = base.clone();
            config.local_id = IdBuf::new(&Identity::Fqdn(format!("sa-{n}.load.example").as_bytes()));
            config.redirected_from = from.map(GatewayId::Ip);
            Ok(Initiator::connect(
                Arc::new(config),
                PSK.as_bytes(),
                here,
                SocketAddr::new(to, 500),
                Instant::now(),
                entropy,
            )?)
        };
    let send = |i: &mut Initiator| -> Result<()> {
        let marker = i.floated();
        while let Some(t) = i.poll_transmit() {
            let mut out = Vec::with_capacity(t.payload.len() + 4);
            if marker {
                // RFC 3948 §2.2: IKE on the NAT-T path carries the non-ESP marker.
                out.extend_from_slice(&[0; 4]);
            }
            out.extend_from_slice(&t.payload);
            sock.send_to(&out, t.remote)?;
        }
        Ok(())
    };
    for n in 0..sas {
        let mut i = connect(n, front, None, &mut entropy)?;
        send(&mut i)?;
        sas_by_spi.insert(i.spi_i(), (n, i));
    }
    let (mut established, mut redirected, mut failed) = (0u64, 0u64, 0u64);
    let mut reported = false;
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if !reported && established + failed == sas {
            println!("RESULT established={established} redirected={redirected} failed={failed}");
            reported = true;
        }
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        if let Ok((len, from)) = sock.recv_from(&mut buf) {
            let data = buf.get(..len).unwrap_or_default();
            let ike = if from.port() == 4500 {
                match data.strip_prefix(&[0, 0, 0, 0][..]) {
                    Some(rest) => rest,
                    None => continue,
                }
            } else {
                data
            };
            let Some((h, _)) = Header::peek(ike) else { continue };
            if let Some((_, i)) = sas_by_spi.get_mut(&h.spi_i) {
                let _ = i.handle_datagram(Instant::now(), here, from, ike, &mut entropy);
                send(i)?;
            }
        }
        let now = Instant::now();
        let spis: Vec<u64> = sas_by_spi.keys().copied().collect();
        for spi in spis {
            let Some((n, mut i)) = sas_by_spi.remove(&spi) else {
                continue;
            };
            if i.poll_timeout().is_some_and(|t| t <= now) {
                i.handle_timeout(now, &mut entropy);
                send(&mut i)?;
            }
            while let Some(ev) = i.poll_event() {
                match ev {
                    Event::ChildSaInstalled(_) => established += 1,
                    Event::Failed(e) if i.redirected_to().is_none() => {
                        eprintln!("FAILED sa-{n}: {e}");
                        failed += 1;
                    }
                    _ => {}
                }
            }
            match i.redirected_to().cloned() {
                Some(GatewayId::Ip(to)) if i.is_closed() => {
                    redirected += 1;
                    let mut next = connect(n, to, Some(front), &mut entropy)?;
                    send(&mut next)?;
                    sas_by_spi.insert(next.spi_i(), (n, next));
                }
                Some(_) if i.is_closed() => {
                    eprintln!("FAILED sa-{n}: redirected to a name");
                    failed += 1;
                }
                _ if i.is_closed() => {}
                _ => {
                    sas_by_spi.insert(spi, (n, i));
                }
            }
        }
    }
    Ok(())
}
