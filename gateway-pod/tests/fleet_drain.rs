//! A pod drains and loses no tunnel (the fleet, part 3): three gateway pods behind the
//! kube-proxy-like front, strongSwan sites with default settings, each pinging the head-end
//! through its tunnel every 20 ms. The pod holding the most tunnels is drained
//! (`concentrator-gateway drain --exit`): it reports not ready, the front drops its endpoint
//! as kube-proxy does when a readiness probe fails, and it hands each of its shards over
//! with the exact state of their SAs to the member that replicates them. Meanwhile another
//! pod is drained and un-drained. Every site keeps its IKE SA and its CHILD SAs (no site
//! negotiates anything: no IKE_SA_INIT, no rekey), its traffic pauses for less than a
//! second, the drained pod exits by itself once it holds nothing, and no (SPI, sequence
//! number) pair is ever sent twice (with AES-GCM that would reuse a nonce).
//!
//! The same without copies of the SAs (`--fleet-replicas 0`): the drained pod sends each
//! SA's whole state to the new owner.
//!
//! `FLEET_E2E_DRAIN_SITES` sets the number of sites (default 30). As non-root the test
//! prints SKIP and passes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::sites;
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::topology::GW_HOST;
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{capture, etcd, fleet, prereq, strongswan};

mod common;

use common::fleet_sites::{
    TIMEOUT, capture_wan, check_no_sequence_reuse, child_spis_out, fleet_of, handover_pauses, ike_spis, logs,
    owners_of_sites, per_pod_of,
};

const PODS: usize = 3;
const PING_EVERY: Duration = Duration::from_millis(20);
/// How long the pings run: before the drain, during it, and after.
const PINGING: Duration = Duration::from_secs(14);
/// When, after the pings start, the drain starts.
const DRAIN_AFTER: Duration = Duration::from_secs(3);
/// The longest pause of a site's traffic allowed.
const MAX_GAP: Duration = Duration::from_secs(1);

fn skip() -> bool {
    prereq::require(&[
        netns::TOOLS,
        strongswan::TOOLS,
        etcd::TOOLS,
        fleet::TOOLS,
        capture::TOOLS,
    ])
    .is_skip()
}

fn site_count() -> usize {
    std::env::var("FLEET_E2E_DRAIN_SITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

#[test]
fn a_drained_pod_hands_every_tunnel_over_and_exits() -> Result<()> {
    if skip() {
        return Ok(());
    }
    drain_and_check(1, site_count(), true)
}

/// Without copies (`--fleet-replicas 0`) the drained pod sends every SA's state to the new
/// owner in full, over a stream opened for the hand-over.
#[test]
fn without_copies_a_drain_still_hands_every_tunnel_over() -> Result<()> {
    if skip() {
        return Ok(());
    }
    drain_and_check(0, site_count().min(10), false)
}

/// Drains the busiest of [`PODS`] pods with `n` sites and `replicas` copies of each SA
/// (and, with `undrain`, drains and un-drains another pod meanwhile), and checks that no
/// tunnel is lost.
fn drain_and_check(replicas: usize, n: usize, undrain: bool) -> Result<()> {
    let (_config, mut fleet, started, owners) =
        fleet_of(PODS, replicas, n, &sites::SiteOptions::default(), &[])?;
    let count = per_pod_of(PODS, &owners);
    let victim = (0..PODS).max_by_key(|i| count[*i]).context("no pod")?;
    let other = (0..PODS).find(|i| *i != victim).context("one pod")?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let children_before: Vec<Vec<String>> = started.iter().map(child_spis_out).collect::<Result<_>>()?;
    let capture = capture_wan(&fleet)?;
    let bin = std::path::PathBuf::from(common::gateway_bin());

    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-site{}.log", s.n()));
            Ping::start(s.ns(), s.host(), addr(GW_HOST), PING_EVERY, PINGING, &log)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(DRAIN_AFTER);
    let t0 = Instant::now();
    let said = fleet.pod(victim).drain(&bin, &["--exit"])?;
    eprintln!(
        "drain gw-{victim}, which holds {} of {n} tunnels: {}",
        count[victim],
        said.trim()
    );
    ensure!(said.starts_with("draining"), "drain answered {said:?}");
    wait::until("the drained pod to report not ready", TIMEOUT, || {
        Ok(if fleet.pod(victim).ready() {
            Probe::pending("still ready")
        } else {
            Probe::Ready(())
        })
    })?;
    // As kube-proxy does for an endpoint that is not ready: its flows go elsewhere, and the
    // members they reach forward them to their owner.
    fleet.front().remove_endpoint(victim)?;

    if undrain {
        // Another pod drains and is un-drained while the first one hands its shards over.
        let said = fleet.pod(other).drain(&bin, &[])?;
        ensure!(
            said.starts_with("draining"),
            "drain of gw-{other} answered {said:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        let said = fleet.pod(other).drain(&bin, &["--cancel"])?;
        ensure!(
            said.starts_with("active"),
            "cancel on gw-{other} answered {said:?}"
        );
        ensure!(
            fleet.pod(other).ready(),
            "gw-{other} is not ready after its drain was cancelled"
        );
    }

    let status = fleet
        .wait_pod_exit(victim, TIMEOUT)
        .with_context(|| fleet.log_tails(40))?;
    let drained_in = t0.elapsed();
    let victim_log = concentrator_e2e::logs::tail(&fleet.pod(victim).log_path(), 100_000);
    ensure!(status.success(), "gw-{victim} exited with {status}");
    let pause = handover_pauses(&victim_log);
    eprintln!(
        "gw-{victim} drained and exited {drained_in:.1?} after the drain began; {} shards handed over, pause per shard (ms): median {:?}, largest {:?}",
        pause.len(),
        pause.get(pause.len() / 2),
        pause.last()
    );
    ensure!(
        !pause.is_empty(),
        "gw-{victim} handed no shard over:\n{victim_log}"
    );
    ensure!(
        !victim_log.contains("IKE DELETE sent"),
        "the drained pod sent IKE DELETEs"
    );

    let results: Vec<_> = pings
        .into_iter()
        .map(Ping::finish_with_gap)
        .collect::<Result<_>>()?;
    let mut gaps: Vec<Duration> = results.iter().map(|(_, g)| *g).collect();
    gaps.sort_unstable();
    eprintln!(
        "traffic gap over {n} sites: median {:?}, largest {:?}",
        gaps[n / 2],
        gaps[n - 1]
    );
    for ((s, (st, gap)), o) in started.iter().zip(&results).zip(&owners) {
        ensure!(
            st.received > 0 && *gap <= MAX_GAP,
            "site {} (on gw-{o}) had a gap of {gap:?} (at most {MAX_GAP:?}): {st}\n{}",
            s.n(),
            logs(&fleet, s)
        );
    }

    // No site negotiated anything: the same IKE SA and the same CHILD SAs everywhere.
    for ((s, before), children) in started.iter().zip(&spis_before).zip(&children_before) {
        let after = ike_spis(s)?;
        ensure!(
            &after == before,
            "site {} has another IKE SA after the drain ({before} -> {after})",
            s.n()
        );
        let now = child_spis_out(s)?;
        ensure!(
            &now == children,
            "site {} has other CHILD SAs after the drain ({children:?} -> {now:?})",
            s.n()
        );
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    let owners_after = owners_of_sites(&fleet, &started)?;
    ensure!(
        !owners_after.contains(&victim),
        "sites still listed by the drained pod: {owners_after:?}"
    );
    let handed = fleet.metric_sum("fleet_adopted_sas_total")?;
    ensure!(
        handed >= count[victim] as f64,
        "{handed} IKE SAs carried on by the others, the drained pod held {}",
        count[victim]
    );
    for s in &started {
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))?;
    }
    check_no_sequence_reuse(&fleet, capture)
}
