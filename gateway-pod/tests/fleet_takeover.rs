//! A pod dies and its tunnels live on (the fleet, part 2): three gateway pods behind the
//! kube-proxy-like front, strongSwan sites with default settings, each pinging the head-end
//! through its tunnel every 20 ms. The pod holding the most tunnels is killed with SIGKILL
//! and the front drops its endpoint, as kube-proxy would once the pod is gone. Every site
//! carries traffic again within the lease TTL and a second, with the same IKE SA (its SPIs
//! unchanged: no site renegotiated), through the member that holds the dead pod's copy.
//!
//! `FLEET_E2E_TAKEOVER_SITES` sets the number of sites (default 20). As non-root the test
//! prints SKIP and passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet};
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::topology::GW_HOST;
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, strongswan};

mod common;

const PODS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(40);
const THREADS: usize = 6;
const PING_EVERY: Duration = Duration::from_millis(20);
/// How long the pings run: before the kill, the take-over, and well after.
const PINGING: Duration = Duration::from_secs(16);
/// When, after the pings start, the pod is killed.
const KILL_AFTER: Duration = Duration::from_secs(4);

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip()
}

fn site_count() -> usize {
    std::env::var("FLEET_E2E_TAKEOVER_SITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn logs(fleet: &Fleet, s: &Site) -> String {
    let placement = [500, 4500].map(|port| {
        fleet
            .front()
            .placement(port)
            .map(|p| format!("port {port}: gw-{:?}", p.get(&s.wan_addr())))
            .unwrap_or_else(|e| format!("{e:#}"))
    });
    let counters = [
        "esp_dropped_unknown_spi_total",
        "esp_dropped_invalid_total",
        "esp_dropped_no_sa_total",
        "esp_dropped_seq_ceiling_total",
        "fleet_forward_dropped_total",
        "fleet_forwarded_packets_total",
    ]
    .map(|name| {
        let by_pod: Vec<String> = fleet
            .pods()
            .iter()
            .map(|p| {
                p.samples(name)
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_else(|_| "-".into())
            })
            .collect();
        format!("{name}: {}", by_pod.join(" | "))
    });
    format!(
        "{}\nfront: {}\n{}\n{}",
        s.log_tail(30),
        placement.join(", "),
        counters.join("\n"),
        fleet.log_tails(40)
    )
}

/// The outbound SPIs of the site's CHILD SAs (our inbound SPIs), as it lists them.
fn child_spis_out(s: &Site) -> Result<Vec<String>> {
    let out = s.charon().swanctl(&["--list-sas", "--ike", sites::CONNECTION])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("out "))
        .filter_map(|l| l.split([',', ' ']).next())
        .map(str::to_owned)
        .collect())
}

/// The IKE SA's SPIs as the site lists them (`<spi>_i* <spi>_r`).
fn ike_spis(s: &Site) -> Result<String> {
    let out = s.charon().swanctl(&["--list-sas", "--ike", sites::CONNECTION])?;
    let spis: Vec<&str> = out
        .split_whitespace()
        .filter(|w| w.trim_end_matches('*').ends_with("_i") || w.ends_with("_r"))
        .collect();
    ensure!(spis.len() >= 2, "no IKE SA SPIs in:\n{out}");
    Ok(spis.join(" "))
}

#[test]
fn a_killed_pod_loses_no_tunnel_and_no_site_renegotiates() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count();
    let psks = common::fleet::psks(n);
    let (_config, mut fleet) = common::fleet::start(PODS, Affinity::client_ip(), &psks)?;
    let front = fleet.front().address();
    let started = sites::start_all(fleet.wan(), front, &psks, THREADS)?;
    sites::in_parallel(&started, THREADS, |s| {
        s.initiate().with_context(|| logs(&fleet, s))?;
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))
    })?;
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    // Every IKE SA has its copy on its shard's replica.
    fleet
        .wait_metric_sum("fleet_replica_sas", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;

    let owners: Vec<usize> = started
        .iter()
        .map(|s| {
            let o = fleet.owners_of(&s.peer_id())?;
            ensure!(o.len() == 1, "site {} listed by pods {o:?}", s.n());
            Ok(o[0])
        })
        .collect::<Result<_>>()?;
    let mut per_pod: BTreeMap<usize, usize> = BTreeMap::new();
    for o in &owners {
        *per_pod.entry(*o).or_default() += 1;
    }
    let (&victim, &held) = per_pod.iter().max_by_key(|(_, c)| **c).context("no owner")?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let children_before: Vec<Vec<String>> = started.iter().map(child_spis_out).collect::<Result<_>>()?;

    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-site{}.log", s.n()));
            Ping::start(s.ns(), s.host(), addr(GW_HOST), PING_EVERY, PINGING, &log)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(KILL_AFTER);
    let killed = Instant::now();
    fleet.kill_pod(victim);
    fleet.front().remove_endpoint(victim)?;
    eprintln!("killed gw-{victim}, which held {held} of {n} tunnels");

    let results: Vec<_> = pings
        .into_iter()
        .map(Ping::finish_with_gap)
        .collect::<Result<_>>()?;
    let mut gaps: Vec<Duration> = results.iter().map(|(_, g)| *g).collect();
    let report: Vec<String> = started
        .iter()
        .zip(&results)
        .zip(&owners)
        .map(|((s, (st, gap)), o)| format!("site {} (gw-{o}): {st}, gap {gap:?}", s.n()))
        .collect();
    eprintln!("after the kill:\n  {}", report.join("\n  "));
    gaps.sort_unstable();
    let (median, largest) = (gaps[gaps.len() / 2], gaps[gaps.len() - 1]);
    eprintln!(
        "traffic gap over {n} sites: median {median:?}, largest {largest:?} (kill at +{KILL_AFTER:?}, {:.1?} ago)",
        killed.elapsed()
    );
    let bound = fleet.options().lease_ttl + Duration::from_secs(1);
    for ((s, (st, gap)), o) in started.iter().zip(&results).zip(&owners) {
        ensure!(
            st.received > 0 && *gap <= bound,
            "site {} (on gw-{o}) had a gap of {gap:?} (at most {bound:?}): {st}\n{}",
            s.n(),
            logs(&fleet, s)
        );
    }

    // No site renegotiated: the same IKE SA everywhere, all established again on the two
    // pods left, the dead pod's taken over.
    for (s, before) in started.iter().zip(&spis_before) {
        let after = ike_spis(s)?;
        ensure!(
            &after == before,
            "site {} has another IKE SA after the kill ({before} -> {after})",
            s.n()
        );
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    let adopted = fleet.metric_sum("fleet_adopted_sas_total")?;
    ensure!(
        adopted == held as f64,
        "{adopted} IKE SAs adopted, the dead pod held {held}"
    );
    // The adopted CHILD SAs are rekeyed (new SPIs, in the new owner's shards), and every
    // site is listed by exactly one live pod.
    wait::until("the adopted CHILD SAs to be rekeyed", TIMEOUT, || {
        let mut pending = Vec::new();
        for ((s, o), before) in started.iter().zip(&owners).zip(&children_before) {
            let listed = fleet.owners_of(&s.peer_id())?;
            let now = child_spis_out(s)?;
            let rekeyed = *o != victim || now.iter().all(|spi| !before.contains(spi));
            if listed.len() != 1 || !rekeyed || now.is_empty() {
                pending.push(format!(
                    "site {} (listed by {listed:?}, CHILD SAs out {now:?})",
                    s.n()
                ));
            }
        }
        Ok(if pending.is_empty() {
            Probe::Ready(())
        } else {
            Probe::pending(pending.join(", "))
        })
    })
    .with_context(|| fleet.log_tails(40))?;
    for s in &started {
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))?;
    }
    Ok(())
}
