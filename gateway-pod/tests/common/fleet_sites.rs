//! Sites on a fleet, as the take-over and drain tests use them: a fleet with its sites
//! up and replicated, who owns each site, the SPIs a site lists, and the capture that
//! checks no (SPI, sequence number) pair is sent twice.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_e2e::capture::{self, Capture};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{Affinity, Fleet};
use concentrator_e2e::netns::addr;
use concentrator_e2e::topology::GW_HOST;

/// How long the fleet tests wait for a condition.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(40);
/// Sites started and initiated in parallel.
pub(crate) const THREADS: usize = 6;

pub(crate) fn logs(fleet: &Fleet, s: &Site) -> String {
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
pub(crate) fn child_spis_out(s: &Site) -> Result<Vec<String>> {
    let out = s.charon().swanctl(&["--list-sas", "--ike", sites::CONNECTION])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("out "))
        .filter_map(|l| l.split([',', ' ']).next())
        .map(str::to_owned)
        .collect())
}

/// The IKE SA's SPIs as the site lists them (`<spi>_i* <spi>_r`).
pub(crate) fn ike_spis(s: &Site) -> Result<String> {
    let out = s.charon().swanctl(&["--list-sas", "--ike", sites::CONNECTION])?;
    let spis: Vec<&str> = out
        .split_whitespace()
        .filter(|w| w.trim_end_matches('*').ends_with("_i") || w.ends_with("_r"))
        .collect();
    ensure!(spis.len() >= 2, "no IKE SA SPIs in:\n{out}");
    Ok(spis.join(" "))
}

/// [`fleet_with_sites`] with `pods` pods, `replicas` copies of each IKE SA and more gateway
/// arguments.
pub(crate) fn fleet_of(
    pods: usize,
    replicas: usize,
    n: usize,
    options: &sites::SiteOptions,
    more: &[&str],
) -> Result<(tempfile::TempDir, Fleet, Vec<Site>, Vec<usize>)> {
    let psks = super::fleet::psks(n);
    let replicas_arg = replicas.to_string();
    let mut args = vec!["--fleet-replicas", &replicas_arg];
    args.extend_from_slice(more);
    let (config, fleet) = super::fleet::start_with_args(pods, Affinity::client_ip(), &psks, &args)?;
    let front = fleet.front().address();
    let started = sites::start_all_with(fleet.wan(), front, &psks, THREADS, options)?;
    sites::in_parallel(&started, THREADS, |s| {
        s.initiate().with_context(|| logs(&fleet, s))?;
        s.wait_ping(addr(GW_HOST), TIMEOUT)
            .with_context(|| logs(&fleet, s))
    })?;
    fleet
        .wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)
        .with_context(|| fleet.log_tails(30))?;
    // Every IKE SA has its copies on its shard's replicas.
    fleet
        .wait_metric_sum("fleet_replica_sas", TIMEOUT, |v| v == (n * replicas) as f64)
        .with_context(|| fleet.log_tails(30))?;
    let owners = owners_of_sites(&fleet, &started)?;
    Ok((config, fleet, started, owners))
}

/// The one pod that lists each site.
pub(crate) fn owners_of_sites(fleet: &Fleet, sites: &[Site]) -> Result<Vec<usize>> {
    sites
        .iter()
        .map(|s| {
            let o = fleet.owners_of(&s.peer_id())?;
            ensure!(o.len() == 1, "site {} listed by pods {o:?}", s.n());
            Ok(o[0])
        })
        .collect()
}

/// How many sites each of `pods` pods owns.
pub(crate) fn per_pod_of(pods: usize, owners: &[usize]) -> Vec<usize> {
    let mut count = vec![0; pods];
    for o in owners {
        count[*o] += 1;
    }
    count
}

/// Captures the sites' WAN (every packet between the front and the sites).
pub(crate) fn capture_wan(fleet: &Fleet) -> Result<Capture> {
    Capture::start(
        fleet.wan().namespace(),
        "br0",
        &fleet.dir().join("wan.pcap"),
        &fleet.dir().join("tcpdump.log"),
    )
}

/// Fails if the fleet sent any (SPI, sequence number) pair twice toward the sites.
pub(crate) fn check_no_sequence_reuse(fleet: &Fleet, capture: Capture) -> Result<()> {
    let packets = capture.finish()?;
    let front = fleet.front().address();
    let sent = packets.iter().filter(|p| p.src == front).count();
    ensure!(sent > 0, "the capture saw no ESP from the fleet");
    let twice = capture::repeated(&packets, front);
    eprintln!(
        "capture: {sent} ESP packets from the fleet, {} (SPI, sequence number) pairs sent more than once",
        twice.len()
    );
    ensure!(
        twice.is_empty(),
        "the fleet sent these (SPI, seq) pairs more than once (nonce reuse): {:?}",
        &twice[..twice.len().min(20)]
    );
    Ok(())
}

/// The pause of each shard a draining pod handed over, in milliseconds, sorted: from its log
/// (`shard handed over ... pause_ms=N`).
pub(crate) fn handover_pauses(log: &str) -> Vec<u64> {
    let mut p: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("shard handed over"))
        .filter_map(|l| {
            l.split("pause_ms=")
                .nth(1)?
                .split([' ', ',', '}'])
                .next()?
                .parse()
                .ok()
        })
        .collect();
    p.sort_unstable();
    p
}
