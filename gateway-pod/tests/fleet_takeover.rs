//! A pod dies and its tunnels live on (the fleet, part 2): three gateway pods behind the
//! kube-proxy-like front, strongSwan sites with default settings, each pinging the head-end
//! through its tunnel every 20 ms. The pod holding the most tunnels is killed with SIGKILL
//! and the front drops its endpoint, as kube-proxy would once the pod is gone. Every site
//! carries traffic again within the lease TTL and a second, with the same IKE SA (its SPIs
//! unchanged: no site renegotiated), through the member that holds the dead pod's copy.
//! Once the adopted SAs have their copies on the last member, the busiest of the two left
//! is killed too, and every tunnel lives on in the one pod left.
//!
//! A capture on the sites' WAN checks that the fleet never sent one (SPI, sequence number)
//! pair twice: with AES-GCM that would reuse a nonce under one key. The same with the owner
//! frozen (SIGSTOP) for 10 s instead of killed: its SAs are taken over while it sleeps, and
//! when it wakes up it sends nothing its successor sends, and steps down.
//!
//! CHILD SA rekeys and deletes that the sites start while their owner hangs complete after
//! it is killed, answered by the member that took its SAs over.
//!
//! With `--fleet-message-id-sync` and AES-CBC IKE SAs, each adopted SA synchronizes its
//! Message IDs with its site (RFC 6311; strongSwan announces it when it initiates) and the
//! tunnels live on the same.
//!
//! `FLEET_E2E_TAKEOVER_SITES` sets the number of sites (default 20). As non-root the tests
//! print SKIP and pass.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::capture;
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Fleet};
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::topology::GW_HOST;
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, strongswan};

mod common;

use common::fleet_sites::{
    TIMEOUT, capture_wan, check_no_sequence_reuse, child_spis_out, fleet_of, ike_spis, logs, owners_of_sites,
    per_pod_of,
};

const PODS: usize = 3;
const PING_EVERY: Duration = Duration::from_millis(20);
/// How long the pings run: before the kill, the take-over, and well after.
const PINGING: Duration = Duration::from_secs(16);
/// When, after the pings start, the pod is killed.
const KILL_AFTER: Duration = Duration::from_secs(4);

/// RFC 6311 syncs by result.
const SYNCED: &str = r#"ike_message_id_syncs_total{result="synced"}"#;
const UNUSABLE: &str = r#"ike_message_id_syncs_total{result="unusable"}"#;

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
    std::env::var("FLEET_E2E_TAKEOVER_SITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A fleet of [`PODS`] with `n` sites (started with `options`) up, each IKE SA copied to its
/// replica; which pod owns each site.
fn fleet_with_sites(
    n: usize,
    options: &sites::SiteOptions,
) -> Result<(tempfile::TempDir, Fleet, Vec<Site>, Vec<usize>)> {
    fleet_of(PODS, 1, n, options, &[])
}

/// How many sites each pod owns.
fn per_pod(owners: &[usize]) -> [usize; PODS] {
    let mut count = [0; PODS];
    count.copy_from_slice(&per_pod_of(PODS, owners));
    count
}

/// The pod that owns the most sites, and how many.
fn busiest(owners: &[usize]) -> Result<(usize, usize)> {
    let count = per_pod(owners);
    (0..PODS)
        .max_by_key(|i| count[*i])
        .map(|i| (i, count[i]))
        .context("no owner")
}

/// Kills `victim` while every site pings, drops its endpoint from the front, and checks
/// that every site's longest gap stays within the lease TTL and a second.
fn kill_and_measure(
    fleet: &mut Fleet,
    started: &[Site],
    owners: &[usize],
    victim: usize,
    round: &str,
) -> Result<Vec<Duration>> {
    let n = started.len();
    let held = owners.iter().filter(|o| **o == victim).count();
    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-{round}-site{}.log", s.n()));
            Ping::start(s.ns(), s.host(), addr(GW_HOST), PING_EVERY, PINGING, &log)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(KILL_AFTER);
    let killed = Instant::now();
    fleet.kill_pod(victim);
    fleet.front().remove_endpoint(victim)?;
    eprintln!("{round} kill: gw-{victim}, which held {held} of {n} tunnels");

    let results: Vec<_> = pings
        .into_iter()
        .map(Ping::finish_with_gap)
        .collect::<Result<_>>()?;
    let gaps: Vec<Duration> = results.iter().map(|(_, g)| *g).collect();
    let report: Vec<String> = started
        .iter()
        .zip(&results)
        .zip(owners)
        .map(|((s, (st, gap)), o)| format!("site {} (gw-{o}): {st}, gap {gap:?}", s.n()))
        .collect();
    eprintln!("after the kill:\n  {}", report.join("\n  "));
    let mut sorted = gaps.clone();
    sorted.sort_unstable();
    let (median, largest) = (sorted[n / 2], sorted[n - 1]);
    eprintln!(
        "traffic gap over {n} sites: median {median:?}, largest {largest:?} (kill at +{KILL_AFTER:?}, {:.1?} ago)",
        killed.elapsed()
    );
    let bound = fleet.options().lease_ttl + Duration::from_secs(1);
    for ((s, (st, gap)), o) in started.iter().zip(&results).zip(owners) {
        ensure!(
            st.received > 0 && *gap <= bound,
            "site {} (on gw-{o}) had a gap of {gap:?} (at most {bound:?}): {st}\n{}",
            s.n(),
            logs(fleet, s)
        );
    }

    Ok(gaps)
}

#[test]
fn a_killed_pod_loses_no_tunnel_and_no_site_renegotiates() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count();
    let (_config, mut fleet, started, owners) = fleet_with_sites(n, &sites::SiteOptions::default())?;
    let (victim, held) = busiest(&owners)?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let children_before: Vec<Vec<String>> = started.iter().map(child_spis_out).collect::<Result<_>>()?;
    let capture = capture_wan(&fleet)?;

    kill_and_measure(&mut fleet, &started, &owners, victim, "first")?;

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

    // The adopted SAs have copies on the last member left: the new busiest dies too, and
    // every tunnel lives on in the one pod left.
    fleet
        .wait_metric_sum("fleet_replica_sas", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    let owners = owners_of_sites(&fleet, &started)?;
    let (second, _) = busiest(&owners)?;
    kill_and_measure(&mut fleet, &started, &owners, second, "second")?;
    for (s, before) in started.iter().zip(&spis_before) {
        ensure!(
            &ike_spis(s)? == before,
            "site {} has another IKE SA after the second kill",
            s.n()
        );
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    check_no_sequence_reuse(&fleet, capture)
}

/// How long the owner stays frozen.
const FROZEN: Duration = Duration::from_secs(10);

#[test]
fn a_frozen_owner_wakes_up_without_reusing_a_sequence_number_and_steps_down() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count().min(10);
    let (_config, fleet, started, owners) = fleet_with_sites(n, &sites::SiteOptions::default())?;
    let (victim, held) = busiest(&owners)?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let capture = capture_wan(&fleet)?;
    let pinging = FROZEN + Duration::from_secs(12);
    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-site{}.log", s.n()));
            Ping::start(s.ns(), s.host(), addr(GW_HOST), PING_EVERY, pinging, &log)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(2));
    // Frozen, not killed: the front keeps sending it the flows pinned to it (kube-proxy
    // drops the endpoint only once its readiness probe fails).
    fleet.freeze_pod(victim)?;
    let frozen = Instant::now();
    eprintln!("froze gw-{victim}, which held {held} of {n} tunnels");
    // Its SAs are taken over while it sleeps.
    // (The frozen pod's metrics do not answer: the others' only.)
    let adopted = wait::until("the frozen pod's SAs to be adopted", FROZEN, || {
        let mut sum = 0.0;
        for p in fleet.pods().iter().filter(|p| p.index() != victim) {
            sum += p.metric("fleet_adopted_sas_total")?;
        }
        Ok(if sum >= held as f64 {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{sum} of {held} adopted"))
        })
    });
    let t_adopted = frozen.elapsed();
    std::thread::sleep(FROZEN.saturating_sub(frozen.elapsed()));
    fleet.thaw_pod(victim)?;
    adopted.with_context(|| fleet.log_tails(30))?;
    eprintln!("gw-{victim} thawed after {FROZEN:?}; its SAs were adopted {t_adopted:.1?} into the freeze");

    // Awake, it learns that its shards are gone and gives their SAs up, without a DELETE.
    wait::until("the thawed pod to step down", TIMEOUT, || {
        let down = fleet.pod(victim).metric("fleet_stepped_down_sas_total")?;
        Ok(if down >= held as f64 {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{down} of {held} SAs given up"))
        })
    })
    .with_context(|| fleet.log_tails(30))?;
    let results: Vec<_> = pings
        .into_iter()
        .map(Ping::finish_with_gap)
        .collect::<Result<_>>()?;
    let report: Vec<String> = started
        .iter()
        .zip(&results)
        .zip(&owners)
        .map(|((s, (st, gap)), o)| format!("site {} (gw-{o}): {st}, gap {gap:?}", s.n()))
        .collect();
    eprintln!("pings across the freeze:\n  {}", report.join("\n  "));
    for (s, before) in started.iter().zip(&spis_before) {
        let after = ike_spis(s)?;
        ensure!(
            &after == before,
            "site {} has another IKE SA after the freeze ({before} -> {after})",
            s.n()
        );
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))?;
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    check_no_sequence_reuse(&fleet, capture)
}

/// Exchanges the sites start while their owner hangs, answered by the member that takes its
/// SAs over: the owner is frozen (and dropped from the front), the sites of the busiest pod
/// rekey their CHILD SA or delete it, the requests go unanswered, the owner is killed; the
/// sites' retransmissions reach the new owner, whose copies expect exactly those requests.
#[test]
fn rekeys_and_deletes_in_flight_at_a_kill_complete() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count().min(8);
    let (_config, mut fleet, started, owners) = fleet_with_sites(n, &sites::SiteOptions::default())?;
    let (victim, held) = busiest(&owners)?;
    let mine: Vec<&Site> = started
        .iter()
        .zip(&owners)
        .filter(|(_, o)| **o == victim)
        .map(|(s, _)| s)
        .collect();
    let spis_before: Vec<String> = mine.iter().map(|s| ike_spis(s)).collect::<Result<_>>()?;
    let children_before: Vec<Vec<String>> = mine.iter().map(|s| child_spis_out(s)).collect::<Result<_>>()?;
    fleet.freeze_pod(victim)?;
    fleet.front().remove_endpoint(victim)?;
    // Every other site of the victim rekeys its CHILD SA, the others delete it.
    for (i, s) in mine.iter().enumerate() {
        let child = ["--child", sites::CONNECTION];
        if i % 2 == 0 {
            s.charon().swanctl(&[&["--rekey"][..], &child].concat())?;
        } else {
            // swanctl stops waiting after a second; charon goes on retransmitting the DELETE.
            let _ = s
                .charon()
                .swanctl(&[&["--terminate"][..], &child, &["--timeout", "1"]].concat());
        }
    }
    eprintln!("froze gw-{victim} ({held} tunnels); its sites sent their requests");
    std::thread::sleep(Duration::from_secs(1));
    fleet.kill_pod(victim);
    wait::until("the exchanges in flight at the kill to complete", TIMEOUT, || {
        let mut pending = Vec::new();
        for (i, (s, before)) in mine.iter().zip(&children_before).enumerate() {
            let now = child_spis_out(s)?;
            let done = if i % 2 == 0 {
                now.len() == 1 && !before.contains(&now[0])
            } else {
                now.is_empty()
            };
            if !done {
                pending.push(format!("site {} (CHILD SAs out {now:?})", s.n()));
            }
        }
        Ok(if pending.is_empty() {
            Probe::Ready(())
        } else {
            Probe::pending(pending.join(", "))
        })
    })
    .with_context(|| {
        let sites: Vec<String> = mine.iter().map(|s| logs(&fleet, s)).collect();
        format!("{}\n{}", sites.join("\n"), fleet.log_tails(30))
    })?;
    for (i, (s, before)) in mine.iter().zip(&spis_before).enumerate() {
        ensure!(&ike_spis(s)? == before, "site {} renegotiated its IKE SA", s.n());
        if i % 2 == 0 {
            s.wait_ping(addr(GW_HOST), TIMEOUT)
                .with_context(|| logs(&fleet, s))?;
        }
    }
    Ok(())
}

/// Two members lost at once with one replica per shard: the SAs of a shard whose owner and
/// replica were those two are gone, and only their sites renegotiate; every other site keeps
/// its IKE SA. Sites here run dead peer detection (every second, dead after ~3 s, then
/// restart), as a site must to notice a head-end that lost its state; nothing hangs.
#[test]
fn two_members_lost_at_once_cost_only_the_sites_of_their_shared_shards() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count().min(12);
    let (_config, mut fleet, started, owners) = fleet_with_sites(n, &sites::SiteOptions::quick_dpd())?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    // The survivor: the pod that owns the fewest sites (so that most sites are at stake).
    let count = per_pod(&owners);
    let survivor = (0..PODS).min_by_key(|i| count[*i]).context("no pod")?;
    for pod in (0..PODS).filter(|p| *p != survivor) {
        fleet.kill_pod(pod);
        fleet.front().remove_endpoint(pod)?;
    }
    eprintln!("killed every pod but gw-{survivor} at once");
    // Every site carries traffic again: adopted by the survivor, or renegotiated with it.
    for s in &started {
        s.wait_ping(addr(GW_HOST), Duration::from_secs(60))
            .with_context(|| logs(&fleet, s))?;
    }
    let mut kept = 0;
    for ((s, before), o) in started.iter().zip(&spis_before).zip(&owners) {
        let same = &ike_spis(s)? == before;
        ensure!(
            same || *o != survivor,
            "site {} on the surviving gw-{survivor} renegotiated\n{}",
            s.n(),
            logs(&fleet, s)
        );
        kept += usize::from(same);
    }
    eprintln!(
        "{kept} of {n} sites kept their IKE SA; {} renegotiated (owner and replica both lost)",
        n - kept
    );
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    Ok(())
}

/// With two replicas per shard, any two members lost at once lose nothing: four pods, two
/// of them killed together (the two that own the most tunnels); every site keeps its IKE
/// SA and carries traffic again, through whichever of each shard's replicas is left.
#[test]
fn with_two_replicas_two_members_lost_at_once_lose_no_tunnel() -> Result<()> {
    if skip() {
        return Ok(());
    }
    const FOUR: usize = 4;
    let n = site_count().min(12);
    let (_config, mut fleet, started, owners) = fleet_of(FOUR, 2, n, &sites::SiteOptions::default(), &[])?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let count = per_pod_of(FOUR, &owners);
    let mut ranked: Vec<usize> = (0..FOUR).collect();
    ranked.sort_by_key(|p| std::cmp::Reverse(count[*p]));
    let killed = [ranked[0], ranked[1]];
    for pod in killed {
        fleet.kill_pod(pod);
        fleet.front().remove_endpoint(pod)?;
    }
    let lost = owners.iter().filter(|o| killed.contains(o)).count();
    eprintln!(
        "killed gw-{} and gw-{} at once: {lost} of {n} tunnels were theirs",
        killed[0], killed[1]
    );
    for s in &started {
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))?;
    }
    for (s, before) in started.iter().zip(&spis_before) {
        ensure!(
            &ike_spis(s)? == before,
            "site {} renegotiated although a replica of its shard was alive\n{}",
            s.n(),
            logs(&fleet, s)
        );
    }
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    let adopted = fleet.metric_sum("fleet_adopted_sas_total")?;
    ensure!(
        adopted >= lost as f64,
        "{adopted} IKE SAs adopted, {lost} were lost"
    );
    Ok(())
}

/// RFC 6311 after a take-over (`--fleet-message-id-sync`, sites with AES-CBC IKE SAs): each
/// adopted SA asks its site for its Message ID counters and takes them; no site renegotiates
/// and every tunnel carries traffic again.
#[test]
fn adopted_sas_synchronize_message_ids_with_their_sites() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = site_count().min(8);
    let cbc = sites::SiteOptions {
        ike_proposal: Some("aes256-sha256-x25519".to_owned()),
        ..sites::SiteOptions::default()
    };
    let (_config, mut fleet, started, owners) = fleet_of(PODS, 1, n, &cbc, &["--fleet-message-id-sync"])?;
    let spis_before: Vec<String> = started.iter().map(ike_spis).collect::<Result<_>>()?;
    let (victim, held) = busiest(&owners)?;
    fleet.kill_pod(victim);
    fleet.front().remove_endpoint(victim)?;
    // The new owner's sync request reaches a site once the site's own packets come in
    // through the front again (here its pings).
    for (s, before) in started.iter().zip(&spis_before) {
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))?;
        ensure!(&ike_spis(s)? == before, "site {} renegotiated", s.n());
    }
    fleet
        .wait_metric_sum(SYNCED, TIMEOUT, |v| v == held as f64)
        .with_context(|| fleet.log_tails(30))?;
    let unusable = fleet.metric_sum(UNUSABLE)?;
    ensure!(unusable == 0.0, "{unusable} Message ID syncs were unusable");
    // The adopted CHILD SAs are rekeyed on the synchronized IKE SAs, which carry on.
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    Ok(())
}
