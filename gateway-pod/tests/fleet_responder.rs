//! Responders in a fleet: the head-end LAN reaches every connected site through any pod.
//! Three gateway pods behind the front (`concentrator_e2e::fleet`), a head-end LAN bridge
//! joined to every pod with a LAN host whose route toward each site names one pod (a LAN
//! router may pick any), and no egress for flows the pods start: anything a pod sends
//! toward the WAN outside a flow a site opened is dropped and counted as stray. The sites
//! (strongSwan, default settings) connect themselves, each landing on whichever pod the
//! front picks; they are sites of an egroup whose base eroute is `Responder`, or each of a
//! static `Responder` eroute of its own.
//!
//! For each connected site, the LAN host pings it through every pod: the holder seals the
//! packets itself; each other pod finds the site by subnet (its row, or its eroute), reads
//! its claim in etcd and forwards the packets to the holder in plain frames
//! (`fleet_forwarded_packets_total{kind="plain"}`). A site that never connected is pinged
//! through every pod too: no answer, the packets dropped and counted
//! (`fleet_forward_dropped_total{reason="not_held"}`), nothing initiated toward it and
//! nothing sent in clear.
//!
//! As non-root every test prints SKIP and passes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions, Pod};
use concentrator_e2e::netns::{self, net};
use concentrator_e2e::topology::site_lan;
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, scratch, strongswan, tools};

mod common;

const PODS: usize = 3;
/// Sites 1..=3 connect; the last one never does.
const SITES: usize = 4;
const CONNECTED: usize = 3;
/// How long a site may take to connect, or to answer the LAN's ping.
const TIMEOUT: Duration = Duration::from_secs(40);

const FORWARDED: &str = "fleet_forwarded_packets_total";
const DROPPED: &str = "fleet_forward_dropped_total";

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip()
}

/// The fleet (LAN bridge, no pod egress) with the configuration `write` puts in its config
/// dir and `import` in each pod's store, its config dir, and the sites (none connected).
fn start(
    write: impl Fn(&std::path::Path, &[(usize, String)]) -> Result<()>,
    import: bool,
) -> Result<(tempfile::TempDir, Fleet, Vec<Site>)> {
    let dir = scratch::dir("fleet-resp-config")?;
    let config = dir.path().join("config");
    let psks = common::fleet::psks(SITES);
    write(&config, &psks)?;
    let options =
        FleetOptions::new(PODS, Affinity::client_ip(), common::gateway_bin(), &config).head_end_lan();
    let mut fleet = Fleet::new(options)?;
    if import {
        for pod in fleet.pods() {
            common::fleet::import_sites(&pod.data_dir(), &psks)?;
        }
    }
    fleet.start_pods()?;
    let started = sites::start_all(fleet.wan(), fleet.front().address(), &psks, SITES)?;
    Ok((dir, fleet, started))
}

/// Sum of pod `pod`'s samples of `name` whose labels include every `k="v"` of `labels`.
fn labelled(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(pod
        .samples(name)?
        .iter()
        .filter(|(k, _)| labels.iter().all(|(l, v)| k.contains(&format!("{l}=\"{v}\""))))
        .fold(0.0, |a, (_, v)| a + v))
}

/// One pod's counters the test reads before and after a ping.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    plain_sent: f64,
    plain_received: f64,
    not_held: f64,
}

impl Counters {
    fn of(pod: &Pod) -> Result<Self> {
        let plain = |d| labelled(pod, FORWARDED, &[("kind", "plain"), ("direction", d)]);
        Ok(Self {
            plain_sent: plain("sent")?,
            plain_received: plain("received")?,
            not_held: labelled(pod, DROPPED, &[("reason", "not_held")])?,
        })
    }

    fn all(fleet: &Fleet) -> Result<Vec<Self>> {
        fleet.pods().iter().map(Self::of).collect()
    }
}

fn logs(fleet: &Fleet, s: &Site) -> String {
    format!("{}\n{}", s.log_tail(30), fleet.log_tails(30))
}

/// Points the LAN host's route to site `s`'s LAN at pod `via`.
fn route_via(fleet: &Fleet, s: &Site, via: usize) -> Result<()> {
    let lan = fleet.lan()?;
    lan.route_via(net(&site_lan(s.n())), via)?;
    ensure!(
        lan.route_to(s.host())? == Some(via),
        "the LAN host's route to {} does not go through gw-{via}",
        s.host()
    );
    Ok(())
}

/// The one pod whose tunnel table lists site `s`.
fn holder(fleet: &Fleet, s: &Site) -> Result<usize> {
    let owners = fleet.owners_of(&s.peer_id())?;
    match owners[..] {
        [one] => Ok(one),
        _ => bail!(
            "site {} is listed by pods {owners:?}, not by exactly one\n{}",
            s.n(),
            logs(fleet, s)
        ),
    }
}

/// How many IKE SAs site `s`'s charon has for its connection.
fn site_ike_sas(s: &Site) -> Result<usize> {
    Ok(s.charon()
        .list_sas()?
        .iter()
        .filter(|sa| sa.name == sites::CONNECTION)
        .count())
}

/// The LAN host pings connected site `s` (held by `own`) through pod `via` until it
/// answers; through another pod than the holder, the packets travel in plain frames.
fn ping_via(fleet: &Fleet, s: &Site, own: usize, via: usize) -> Result<()> {
    route_via(fleet, s, via)?;
    let before = Counters::all(fleet)?;
    let t0 = Instant::now();
    let lan = fleet.lan()?;
    lan.host()
        .wait_reachable(Some(lan.host_addr()), s.host(), TIMEOUT)
        .with_context(|| {
            format!(
                "LAN host -> site {} via gw-{via} (held by gw-{own})\n{}",
                s.n(),
                logs(fleet, s)
            )
        })?;
    let after = Counters::all(fleet)?;
    eprintln!(
        "site {} (held by gw-{own}) answered the LAN through gw-{via} after {:.1?}; plain sent \
         by gw-{via} {} -> {}, received by gw-{own} {} -> {}",
        s.n(),
        t0.elapsed(),
        before[via].plain_sent,
        after[via].plain_sent,
        before[own].plain_received,
        after[own].plain_received
    );
    if via != own {
        ensure!(
            after[via].plain_sent > before[via].plain_sent,
            "gw-{via} forwarded no plain frame, yet the ping through it was answered\n{}",
            fleet.log_tails(20)
        );
        ensure!(
            after[own].plain_received > before[own].plain_received,
            "gw-{own} (the holder) received no plain frame from gw-{via}\n{}",
            fleet.log_tails(20)
        );
    }
    ensure!(
        fleet.owners_of(&s.peer_id())? == [own] && site_ike_sas(s)? == 1,
        "after traffic through gw-{via}, site {} moved or has another IKE SA\n{}",
        s.n(),
        logs(fleet, s)
    );
    Ok(())
}

/// The LAN host pings site `s`, which never connected, through pod `via`: no answer, and
/// the pod drops and counts the packets (no member holds the site).
fn ping_unheld_via(fleet: &Fleet, s: &Site, via: usize) -> Result<()> {
    route_via(fleet, s, via)?;
    let before = Counters::of(fleet.pod(via))?;
    let lan = fleet.lan()?;
    let (from, to) = (lan.host_addr().to_string(), s.host().to_string());
    let out = lan.host().output(
        tools::PING.path(),
        &["-c", "4", "-i", "0.5", "-W", "1", "-n", "-q", "-I", &from, &to],
    )?;
    ensure!(
        !out.status.success(),
        "site {}, which never connected, answered the LAN through gw-{via}:\n{}",
        s.n(),
        String::from_utf8_lossy(&out.stdout)
    );
    wait::until(
        format!("gw-{via} to count packets toward site {} as not held", s.n()),
        TIMEOUT,
        || {
            let now = Counters::of(fleet.pod(via))?;
            Ok(if now.not_held > before.not_held {
                Probe::Ready(())
            } else {
                Probe::pending(format!("not_held {} -> {}", before.not_held, now.not_held))
            })
        },
    )
    .with_context(|| fleet.log_tails(20))?;
    Ok(())
}

/// Sites 1..=[`CONNECTED`] connect; the LAN reaches each through every pod; the last site,
/// never connected, is reached through none and nothing is initiated toward it.
fn check(fleet: &Fleet, started: &[Site], scope: impl Fn(&Site) -> String) -> Result<()> {
    let t0 = Instant::now();
    for s in &started[..CONNECTED] {
        s.initiate().with_context(|| logs(fleet, s))?;
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == CONNECTED as f64)
        .with_context(|| fleet.log_tails(30))?;
    let mut holders = Vec::new();
    for s in &started[..CONNECTED] {
        let own = wait::until(format!("one pod to list site {}", s.n()), TIMEOUT, || {
            Ok(match holder(fleet, s) {
                Ok(own) => Probe::Ready(own),
                Err(e) => Probe::pending(format!("{e:#}")),
            })
        })?;
        // Where the pods that do not hold the site will look.
        wait::until(
            format!("site {}'s claim to name gw-{own}", s.n()),
            TIMEOUT,
            || {
                let claims = fleet.claims()?;
                Ok(
                    if claims
                        .iter()
                        .any(|c| c.peer_id == s.peer_id() && c.scope == scope(s) && c.member == Some(own))
                    {
                        Probe::Ready(())
                    } else {
                        Probe::pending(format!("{claims:?}"))
                    },
                )
            },
        )?;
        holders.push(own);
    }
    eprintln!(
        "{CONNECTED} sites connected after {:.1?}, held by {holders:?}",
        t0.elapsed()
    );

    for (s, &own) in started.iter().zip(&holders) {
        // Through the holder first (sealed there), then through every other pod.
        ping_via(fleet, s, own, own)?;
        for via in (0..PODS).filter(|&p| p != own) {
            ping_via(fleet, s, own, via)?;
        }
    }

    // A site that never connected: nobody holds it, nobody may initiate to it.
    let idle = &started[SITES - 1];
    for via in 0..PODS {
        ping_unheld_via(fleet, idle, via)?;
    }
    ensure!(
        site_ike_sas(idle)? == 0 && fleet.owners_of(&idle.peer_id())?.is_empty(),
        "site {} got a tunnel from traffic toward it (a responder must not initiate)\n{}",
        idle.n(),
        logs(fleet, idle)
    );
    let claims = fleet.claims()?;
    ensure!(
        claims.len() == CONNECTED && claims.iter().all(|c| c.peer_id != idle.peer_id()),
        "claims in etcd: {claims:?}"
    );
    let stray = fleet.front().stray_packets()?;
    ensure!(
        stray == 0,
        "pods sent {stray} packets toward the WAN outside a flow the front DNAT'd\n{}",
        fleet.front().ruleset()
    );
    fleet.wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == CONNECTED as f64)?;
    eprintln!("total {:.1?}", t0.elapsed());
    Ok(())
}

#[test]
fn the_head_end_lan_reaches_responder_egroup_sites_through_any_pod() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let (_config, fleet, started) = start(|dir, _| common::fleet::write_egroup_config(dir), true)?;
    check(&fleet, &started, |_| format!("egroup/{}", common::fleet::EGROUP))
}

#[test]
fn the_head_end_lan_reaches_static_responder_sites_through_any_pod() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let eroute = |n: usize| format!("hq{n}");
    let (_config, fleet, started) = start(
        |dir, psks| {
            for (n, psk) in psks {
                common::fleet::write_static_eroute(dir, &eroute(*n), *n, psk)?;
            }
            Ok(())
        },
        false,
    )?;
    check(&fleet, &started, |s| format!("eroute/{}", eroute(s.n())))
}
