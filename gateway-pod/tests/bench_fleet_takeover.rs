//! What SA replication costs and what it buys (issue 15; a benchmark, not a timed test).
//! The same fleet (three gateway pods behind the kube-proxy-like front, `BENCH_SITES`
//! strongSwan sites with default settings) is built twice in one run, with
//! `--fleet-replicas 1` and with `--fleet-replicas 0`, and each time measures:
//!
//! - **setup**: the wall time for every site to connect at once, the gateways' CPU seconds
//!   per IKE SA, and the replication bytes per IKE SA (snapshot and sequence state, record
//!   layer included);
//! - **steady state**: the replication bytes per tunnel per second while every site pings
//!   every 100 ms for `BENCH_IDLE` seconds (sequence ceilings, inbound tops, heartbeats);
//! - **one tunnel**: iperf3 TCP from site 1 to the head-end for `BENCH_SECONDS`.
//!
//! and prints the ratios on/off. With replication on it then kills the busiest pod
//! `BENCH_KILLS` times (restarting it between kills, so three pods are back), every site
//! pinging every 20 ms, and prints the distribution of the sites' traffic gaps. The checks
//! are about behaviour, never about time: every site establishes in both modes, replication
//! sends bytes only when on, and after each kill every site carries traffic again.
//!
//! `BENCH_COPIES` (default 1) sets `--fleet-replicas` of the "on" fleet.
//!
//! Small by default (fit for CI: 6 sites, 2 s idle, 2 s iperf3, 1 kill). For numbers, as
//! root and in release mode:
//!
//!   BENCH_SITES=20 BENCH_IDLE=10 BENCH_SECONDS=10 BENCH_KILLS=10 cargo test --release \
//!     -p concentrator-gateway --test bench_fleet_takeover -- --nocapture
//!
//! As non-root it prints SKIP and passes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet};
use concentrator_e2e::netns::{self, addr};
use concentrator_e2e::ping::Ping;
use concentrator_e2e::topology::GW_HOST;
use concentrator_e2e::{etcd, prereq, process, strongswan};

mod common;

const PODS: usize = 3;
const THREADS: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(60);
const REPLICATION_BYTES: &str = "fleet_replication_bytes_total";

fn skip() -> bool {
    prereq::require(&[netns::TOOLS, strongswan::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip()
}

/// What one mode measured.
#[derive(Debug, Default)]
struct Mode {
    setup: Duration,
    cpu_per_sa_ms: f64,
    setup_bytes_per_sa: f64,
    steady_bytes_per_tunnel_s: f64,
    mbits: f64,
}

/// CPU seconds of every running pod's gateway (its `comm` is cut to 15 bytes).
fn gateway_cpu(fleet: &Fleet, ticks: f64) -> f64 {
    fleet
        .pods()
        .iter()
        .flat_map(|p| p.ns().pids())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("concentrator-ga"))
        })
        .map(|p| process::cpu_seconds(p, ticks))
        .sum()
}

/// Replication bytes sent by all running pods (every kind of message).
fn replication_bytes(fleet: &Fleet) -> Result<f64> {
    let mut sum = 0.0;
    for p in fleet.pods() {
        if !fleet.is_started(p.index()) {
            continue;
        }
        sum += p.samples(REPLICATION_BYTES)?.iter().map(|(_, v)| v).sum::<f64>();
    }
    Ok(sum)
}

fn owner_of(fleet: &Fleet, s: &Site) -> Result<usize> {
    let o = fleet.owners_of(&s.peer_id())?;
    ensure!(o.len() == 1, "site {} listed by pods {o:?}", s.n());
    Ok(o[0])
}

/// Builds the fleet with `replicas`, connects every site and measures; returns the fleet
/// and sites for the kills.
fn measure(replicas: &str, n: usize, ticks: f64) -> Result<(Mode, tempfile::TempDir, Fleet, Vec<Site>)> {
    let psks = common::fleet::psks(n);
    let (config, fleet) = common::fleet::start_with_args(
        PODS,
        Affinity::client_ip(),
        &psks,
        &["--fleet-replicas", replicas],
    )?;
    let started = sites::start_all(fleet.wan(), fleet.front().address(), &psks, THREADS)?;
    let (cpu0, bytes0) = (gateway_cpu(&fleet, ticks), replication_bytes(&fleet)?);
    let t0 = Instant::now();
    sites::in_parallel(&started, THREADS, |s| s.initiate())?;
    fleet.wait_metric_sum("ike_sas_established", TIMEOUT, |v| v == n as f64)?;
    let setup = t0.elapsed();
    let copies: usize = replicas.parse().unwrap_or(1);
    if copies > 0 {
        fleet.wait_metric_sum("fleet_replica_sas", TIMEOUT, |v| v == (n * copies) as f64)?;
    }
    let cpu = gateway_cpu(&fleet, ticks) - cpu0;
    let setup_bytes = replication_bytes(&fleet)? - bytes0;

    let idle = Duration::from_secs(common::env_num("BENCH_IDLE", 2));
    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-idle-site{}.log", s.n()));
            Ping::start(
                s.ns(),
                s.host(),
                addr(GW_HOST),
                Duration::from_millis(100),
                idle,
                &log,
            )
        })
        .collect::<Result<_>>()?;
    let b0 = replication_bytes(&fleet)?;
    let t_idle = Instant::now();
    for p in pings {
        let st = p.finish()?;
        ensure!(st.received > 0, "no ping answered while idle: {st}");
    }
    let steady = (replication_bytes(&fleet)? - b0) / t_idle.elapsed().as_secs_f64() / n as f64;

    let site = &started[0];
    let owner = owner_of(&fleet, site)?;
    let mbits = common::iperf_bps(
        site.ns(),
        site.host(),
        fleet.pod(owner).ns(),
        false,
        common::env_num("BENCH_SECONDS", 2),
        &fleet.dir().join("iperf3.log"),
    )? / 1e6;
    let mode = Mode {
        setup,
        cpu_per_sa_ms: cpu * 1000.0 / n as f64,
        setup_bytes_per_sa: setup_bytes / n as f64,
        steady_bytes_per_tunnel_s: steady,
        mbits,
    };
    Ok((mode, config, fleet, started))
}

/// Kills the busiest pod while every site pings; the sites' gaps. Restarts it after.
fn kill_once(fleet: &mut Fleet, started: &[Site], round: u64, copies: usize) -> Result<Vec<Duration>> {
    let n = started.len();
    let owners: Vec<usize> = started
        .iter()
        .map(|s| owner_of(fleet, s))
        .collect::<Result<_>>()?;
    let mut count = [0usize; PODS];
    for o in &owners {
        count[*o] += 1;
    }
    let victim = (0..PODS).max_by_key(|i| count[*i]).context("no pod")?;
    let pings: Vec<Ping> = started
        .iter()
        .map(|s| {
            let log = fleet.dir().join(format!("ping-kill{round}-site{}.log", s.n()));
            Ping::start(
                s.ns(),
                s.host(),
                addr(GW_HOST),
                Duration::from_millis(20),
                Duration::from_secs(8),
                &log,
            )
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(2));
    fleet.kill_pod(victim);
    fleet.front().remove_endpoint(victim)?;
    let mut gaps = Vec::with_capacity(n);
    for p in pings {
        let (st, gap) = p.finish_with_gap()?;
        ensure!(st.received > 0, "kill {round}: a site got no answer at all: {st}");
        gaps.push(gap);
    }
    for s in started {
        s.wait_ping(addr(GW_HOST), TIMEOUT).with_context(|| {
            format!(
                "kill {round}: site {} after the kill\n{}",
                s.n(),
                fleet.log_tails(20)
            )
        })?;
    }
    // Three pods again, every SA with its copies.
    fleet.start_pod(victim)?;
    fleet.front().restore_endpoint(victim)?;
    fleet.wait_members(PODS, fleet::MEMBERS_TIMEOUT)?;
    fleet.wait_metric_sum("fleet_replica_sas", TIMEOUT, |v| v == (n * copies) as f64)?;
    eprintln!(
        "kill {round}: gw-{victim} held {} of {n}; largest gap {:?}",
        count[victim],
        gaps.iter().max().copied().unwrap_or_default()
    );
    Ok(gaps)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[test]
fn replication_cost_and_takeover_gaps() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let n = common::env_num("BENCH_SITES", 6) as usize;
    let ticks = process::clock_ticks();
    let (off, _c0, fleet_off, sites_off) = measure("0", n, ticks)?;
    ensure!(
        replication_bytes(&fleet_off)? == 0.0,
        "--fleet-replicas 0 sent replication bytes"
    );
    drop(sites_off);
    drop(fleet_off);
    // BENCH_COPIES=2 measures two copies of every SA (4 pods would be needed to lose two at
    // once; the kills below still kill one).
    let copies = common::env_num("BENCH_COPIES", 1).max(1).to_string();
    let (on, _c1, mut fleet, started) = measure(&copies, n, ticks)?;
    ensure!(on.setup_bytes_per_sa > 0.0, "replication on sent nothing");

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    eprintln!("\n{n} sites, 3 pods; replication on ({copies} copies) vs off (same run):");
    eprintln!(
        "  setup of all sites:        {:>8.2?} vs {:>8.2?}  (x{:.2})",
        on.setup,
        off.setup,
        ratio(on.setup.as_secs_f64(), off.setup.as_secs_f64())
    );
    eprintln!(
        "  gateway CPU per IKE SA:    {:>8.2} ms vs {:>6.2} ms (x{:.2})",
        on.cpu_per_sa_ms,
        off.cpu_per_sa_ms,
        ratio(on.cpu_per_sa_ms, off.cpu_per_sa_ms)
    );
    eprintln!(
        "  one tunnel (iperf3 TCP):   {:>8.1} Mbit/s vs {:>6.1} Mbit/s (x{:.2})",
        on.mbits,
        off.mbits,
        ratio(on.mbits, off.mbits)
    );
    eprintln!(
        "  replication per IKE SA set up: {:.0} bytes; per tunnel per second at steady state: {:.0} bytes",
        on.setup_bytes_per_sa, on.steady_bytes_per_tunnel_s
    );

    let kills = common::env_num("BENCH_KILLS", 1);
    let mut all = Vec::new();
    let mut worst = Vec::new();
    for round in 1..=kills {
        let gaps = kill_once(&mut fleet, &started, round, copies.parse().unwrap_or(1))?;
        worst.push(gaps.iter().max().copied().unwrap_or_default());
        all.extend(gaps);
    }
    all.sort_unstable();
    worst.sort_unstable();
    eprintln!(
        "traffic gap over {kills} kills x {n} sites (pings every 20 ms): p50 {:?}, p90 {:?}, max {:?}; \
         per kill, the largest: median {:?}, max {:?}",
        quantile(&all, 0.5),
        quantile(&all, 0.9),
        all.last().copied().unwrap_or_default(),
        quantile(&worst, 0.5),
        worst.last().copied().unwrap_or_default()
    );
    Ok(())
}
