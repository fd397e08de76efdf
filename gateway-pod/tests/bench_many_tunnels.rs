//! Many tunnels at once (benchmark, not a timed test; ignored by default). N site namespaces,
//! each running its own `concentrator-gateway` (a static eroute with role Initiator), build
//! their tunnels through IKEv2 to ONE head-end `concentrator-gateway` (one base eroute and an
//! egroup whose N sites are rows of its embedded store), and one iperf3 TCP flow per site runs
//! through its tunnel, all at the same time. In the same run it measures the same N flows
//! over the plain veth/bridge path (no tunnels) and one flow through one tunnel alone, and
//! prints the aggregates, per-flow spread, the head-end's CPU time (/proc/PID/stat), how busy
//! the machine was and the ratios.
//!
//! Run as root, in release mode:
//!
//!   cargo test --release -p concentrator-gateway --test bench_many_tunnels -- --ignored --nocapture
//!
//! - `BENCH_TUNNELS`: N (default 100);
//! - `BENCH_SECONDS`: length of each iperf3 run (default 10);
//! - `BENCH_REVERSE=1`: the flows run head-end -> sites (iperf3 -R), so that the head-end
//!   encrypts them all instead of decrypting them;
//! - `BENCH_HEAD_NICE=-10`: renice every thread of the head-end (default: not reniced), to
//!   see how much of the aggregate is the head-end's share of two cores shared with the
//!   sites' gateways and the iperf3 processes, rather than its own cost;
//! - `BENCH_HEAD_TXQUEUELEN=10000`: set the txqueuelen of the head-end's TUN device (default:
//!   the kernel's 500), the queue of packets the kernel routes into the tunnels;
//! - `BENCH_PERF=FILE`: also `perf record -g` the head-end during the N-tunnel run into FILE
//!   (then `perf report -i FILE`).
//!
//! One gateway process per site is the faithful setup (each site is a separate box with its
//! own IKE SA, UDP socket and TUN device); it also means the sites' encryption competes with
//! the head-end for the two cores, so the aggregate is that of the whole system, and the
//! head-end's CPU share is printed beside it.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::process::{self, Daemon};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{ids, prereq, scratch, tools};

mod common;

use common::StaticEroute;

const BIN: &str = env!("CARGO_BIN_EXE_concentrator-gateway");
const HEAD_WAN: &str = "198.18.0.1";
const HEAD_LAN: &str = "10.0.0.0/16";
const HEAD_HOST: &str = "10.0.0.1";
const HEAD_ID: &str = "hq.bench";
const IKE: &str = "aes128gcm16-prfsha256-x25519";
const ESP: &str = "aes128gcm16";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn reverse() -> bool {
    std::env::var("BENCH_REVERSE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn site_wan(i: usize) -> String {
    format!("198.18.{}.{}", 1 + i / 250, 1 + i % 250)
}
fn site_lan(i: usize) -> String {
    format!("10.{}.{}.0/24", 128 + i / 256, i % 256)
}
fn site_host(i: usize) -> String {
    format!("10.{}.{}.1", 128 + i / 256, i % 256)
}
fn site_id(i: usize) -> String {
    format!("site{i}.sites.bench")
}
/// Each flow has its own iperf3 server (one test at a time each).
fn port(i: usize) -> u16 {
    5201 + u16::try_from(i).unwrap_or(0)
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

/// CPU seconds (user + system, all threads) of process `pid` so far.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces, closed by the last ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let field = |i: usize| rest.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks
}

/// Busy and total jiffies of all CPUs (/proc/stat).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn clock_ticks() -> f64 {
    process::run(
        std::process::Command::new("getconf").arg("CLK_TCK"),
        process::COMMAND_TIMEOUT,
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(100.0)
}

/// One iperf3 client run: from `ns` (bound to `from`) to the server for flow `i` at `to`.
struct Flow<'a> {
    ns: &'a Netns,
    from: String,
    to: String,
    port: u16,
}

/// What one set of simultaneous flows did.
struct Measured {
    /// Received bits/s of each flow (iperf3's own interval).
    per_flow: Vec<f64>,
    /// Received bytes of all flows over the wall time from the first start to the last end.
    wall_bps: f64,
    wall: Duration,
    /// CPU seconds of the head-end and of all site gateways during the run.
    head_cpu: f64,
    sites_cpu: f64,
    /// Share of the machine's CPU time that was busy (1.0 = both cores).
    busy: f64,
    /// Mean of the 1-minute load average and of the runnable tasks, sampled each 0.5 s.
    load: f64,
    runnable: f64,
}

impl Measured {
    fn sum(&self) -> f64 {
        self.per_flow.iter().sum()
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.per_flow.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(0.0)
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(0.0)
    }
}

/// Runs `flows` at the same time for `secs` seconds each.
fn run_flows(
    flows: &[Flow<'_>],
    secs: usize,
    head: Option<u32>,
    sites: &[u32],
    perf: Option<&str>,
) -> Result<Measured> {
    let ticks = clock_ticks();
    let head_before = head.map_or(0.0, |p| cpu_seconds(p, ticks));
    let sites_before: f64 = sites.iter().map(|p| cpu_seconds(*p, ticks)).sum();
    let machine_before = machine_jiffies();
    let start = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (results, samples, perf_status) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
                let f: Vec<&str> = l.split_whitespace().collect();
                let load = f.first().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                let running = f
                    .get(3)
                    .and_then(|v| v.split('/').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
                samples.push((load, running));
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        });
        let recorder = perf.zip(head).map(|(file, pid)| {
            scope.spawn(move || {
                let mut cmd = std::process::Command::new("perf");
                let pid = pid.to_string();
                cmd.args(["record", "-g", "-o", file, "-p", pid.as_str(), "--", "sleep"])
                    .arg((secs.saturating_sub(2)).max(1).to_string());
                process::output(&mut cmd, Duration::from_secs(secs as u64 + 60))
            })
        });
        let handles: Vec<_> = flows
            .iter()
            .map(|f| scope.spawn(move || iperf(f, secs)))
            .collect();
        let results: Vec<Result<(f64, f64)>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("iperf3 thread panicked")))
            })
            .collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let perf_status = recorder.map(|r| r.join());
        (results, sampler.join().unwrap_or_default(), perf_status)
    });
    let wall = start.elapsed();
    let machine_after = machine_jiffies();
    if let Some(Ok(Ok(out))) = &perf_status
        && !out.status.success()
    {
        eprintln!("perf record failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut per_flow = Vec::new();
    let mut bytes = 0.0;
    for (i, r) in results.into_iter().enumerate() {
        let (bps, b) = r.with_context(|| format!("flow {i}"))?;
        per_flow.push(bps);
        bytes += b;
    }
    let n = samples.len().max(1) as f64;
    Ok(Measured {
        per_flow,
        wall_bps: bytes * 8.0 / wall.as_secs_f64(),
        wall,
        head_cpu: head.map_or(0.0, |p| cpu_seconds(p, ticks) - head_before),
        sites_cpu: sites.iter().map(|p| cpu_seconds(*p, ticks)).sum::<f64>() - sites_before,
        busy: (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0),
        load: samples.iter().map(|s| s.0).sum::<f64>() / n,
        runnable: samples.iter().map(|s| s.1).sum::<f64>() / n,
    })
}

/// One iperf3 client: received bits/s and bytes. Retries while the server is not listening
/// yet or still busy with a test that the previous phase ended.
fn iperf(f: &Flow<'_>, secs: usize) -> Result<(f64, f64)> {
    let mut last = String::new();
    for _ in 0..20 {
        let mut cmd = f.ns.command(tools::IPERF3.path());
        let (port, t) = (f.port.to_string(), secs.to_string());
        cmd.args([
            "-c",
            f.to.as_str(),
            "-B",
            f.from.as_str(),
            "-p",
            port.as_str(),
            "-t",
            t.as_str(),
            "-J",
        ]);
        if reverse() {
            cmd.arg("-R");
        }
        let out = process::output(&mut cmd, Duration::from_secs(secs as u64 + 60))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(&text).context("iperf3 JSON")?;
            let sum = &v["end"]["sum_received"];
            if let (Some(bps), Some(bytes)) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
                return Ok((bps, bytes));
            }
        }
        last = text;
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("iperf3 {} -> {}:{} never ran: {last}", f.from, f.to, f.port)
}

/// The head-end: one base eroute for every site and an egroup whose rows are the sites.
fn write_head_config(dir: &Path, n: usize, psks: &[String]) -> Result<()> {
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join("sites.yaml"),
        format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: sites\n\
             spec:\n  localSubnet: {HEAD_LAN}\n  remoteSubnet: 10.128.0.0/9\n\
             \x20 peerId: \"*.sites.bench\"\n  localId: {HEAD_ID}\n  role: Responder\n\
             \x20 ike:\n    proposals: [{IKE}]\n  esp:\n    proposals: [{ESP}]\n\
             ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: sites\n\
             spec:\n  eroute: sites\n  remoteSubnetPrefix: 24\n  maxDynamicEroutes: {}\n",
            // Far from the 10 % rule: no site is evicted.
            2 * n + 10
        ),
    )?;
    let mut csv = String::from("peer_id,psk,remote_subnet,peer_address\n");
    for (i, psk) in psks.iter().enumerate() {
        csv.push_str(&format!("{},{psk},{},{}\n", site_id(i), site_lan(i), site_wan(i)));
    }
    let file = dir.join("sites.csv");
    std::fs::write(&file, csv)?;
    let data = dir.join("data");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["--data-dir", data.to_str().context("path")?, "sites", "import"])
        .arg(&file)
        .args(["--prefix", "24"]);
    process::run(&mut cmd, process::COMMAND_TIMEOUT)?;
    Ok(())
}

/// Where packets were lost, summed over namespaces.
#[derive(Default)]
struct Losses {
    retransmitted: u64,
    udp_rcvbuf: u64,
    tun_rx: u64,
    tun_tx: u64,
}

impl Losses {
    fn since(&self, before: &Self) -> Self {
        Self {
            retransmitted: self.retransmitted.saturating_sub(before.retransmitted),
            udp_rcvbuf: self.udp_rcvbuf.saturating_sub(before.udp_rcvbuf),
            tun_rx: self.tun_rx.saturating_sub(before.tun_rx),
            tun_tx: self.tun_tx.saturating_sub(before.tun_tx),
        }
    }
}

/// A counter of `/proc/net/snmp` as seen in `ns` (its header line names the columns).
fn snmp(text: &str, proto: &str, name: &str) -> u64 {
    let mut rows = text.lines().filter(|l| l.starts_with(&format!("{proto}: ")));
    let (Some(head), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    head.split_whitespace()
        .position(|h| h == name)
        .and_then(|i| values.split_whitespace().nth(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn losses(namespaces: &[&Netns]) -> Losses {
    let mut l = Losses::default();
    for ns in namespaces {
        let snmp_text = ns.run("cat", &["/proc/net/snmp"]).unwrap_or_default();
        l.retransmitted += snmp(&snmp_text, "Tcp", "RetransSegs");
        l.udp_rcvbuf += snmp(&snmp_text, "Udp", "RcvbufErrors");
        let link = ns
            .ip(&["-j", "-s", "link", "show", "dev", "concentrator0"])
            .unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&link) {
            let stats = &v[0]["stats64"];
            l.tun_rx += stats["rx"]["dropped"].as_u64().unwrap_or(0);
            l.tun_tx += stats["tx"]["dropped"].as_u64().unwrap_or(0);
        }
    }
    l
}

/// Sets the nice value of every thread of `pid` (setpriority acts on one thread).
fn renice(pid: u32, nice: &str) -> Result<()> {
    let mut cmd = std::process::Command::new("renice");
    cmd.args(["-n", nice, "-p"]);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        cmd.arg(task?.file_name());
    }
    process::run(&mut cmd, process::COMMAND_TIMEOUT).map(drop)
}

/// Runs `f` over `items` on a few threads (namespace set-up and waits are mostly waiting on
/// `ip` and `ping`).
fn in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let f = &f;
    std::thread::scope(|scope| {
        let chunk = items.len().div_ceil(8).max(1);
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| scope.spawn(move || c.iter().try_for_each(f)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker thread panicked")))
        })
    })
}

struct Site {
    gateway: Option<Daemon>,
    ns: Netns,
    dir: tempfile::TempDir,
}

fn gbit(bps: f64) -> f64 {
    bps / 1e9
}

#[test]
#[ignore = "benchmark: run explicitly (see the file's doc)"]
fn many_tunnels_aggregate_vs_veth_vs_one_tunnel() -> Result<()> {
    let iperf3 = tools::IPERF3;
    if prereq::require(&[netns::TOOLS, &[tools::CURL, iperf3]]).is_skip() {
        return Ok(());
    }
    let n = env_num("BENCH_TUNNELS", 100);
    ensure!((1..=10_000).contains(&n), "BENCH_TUNNELS must be 1..=10000");
    let secs = env_num("BENCH_SECONDS", 10);
    let perf = std::env::var("BENCH_PERF").ok().filter(|v| !v.is_empty());
    let set_up = Instant::now();

    let wan = Wan::new()?;
    let head_ns = Netns::new("mthead")?;
    wan.attach(&head_ns, "wan0", format!("{HEAD_WAN}/16").parse()?)?;
    head_ns.add_lo_addr(format!("{HEAD_HOST}/16").parse()?)?;
    let head_dir = scratch::dir("many-head")?;
    let mut servers = Vec::new();
    for i in 0..n {
        let p = port(i).to_string();
        servers.push(head_ns.spawn(
            "iperf3 server",
            iperf3.path(),
            &["-s", "-p", p.as_str()],
            &head_dir.path().join(format!("iperf3-{i}.log")),
        )?);
    }
    let psks: Vec<String> = (0..n).map(|_| ids::random_hex(32)).collect();
    let sites: Vec<Site> = (0..n)
        .map(|i| -> Result<Site> {
            Ok(Site {
                gateway: None,
                ns: Netns::new(&format!("mts{i}"))?,
                dir: scratch::dir("many-site")?,
            })
        })
        .collect::<Result<_>>()?;
    let indexed: Vec<(usize, &Site)> = sites.iter().enumerate().collect();
    in_parallel(&indexed, |(i, s)| {
        wan.attach(&s.ns, "wan0", format!("{}/16", site_wan(*i)).parse()?)?;
        s.ns.add_lo_addr(format!("{}/24", site_host(*i)).parse()?)?;
        StaticEroute {
            name: "hq",
            local_subnet: &site_lan(*i),
            remote_subnet: HEAD_LAN,
            peer_id: HEAD_ID,
            local_id: &site_id(*i),
            initiate_to: Some(HEAD_WAN),
            ike: IKE,
            esp: ESP,
            lifetimes: ("4h", "1h"),
            psk: &psks[*i],
        }
        .write(&s.dir.path().join("config"))
    })?;
    in_parallel(&indexed, |(_, s)| {
        s.ns.wait_reachable(None, addr(HEAD_WAN), Duration::from_secs(20))
    })?;

    // (a) the plain path: one flow, then N at once, WAN address to WAN address.
    let veth_flows: Vec<Flow<'_>> = (0..n)
        .map(|i| Flow {
            ns: &sites[i].ns,
            from: site_wan(i),
            to: HEAD_WAN.to_owned(),
            port: port(i),
        })
        .collect();
    let veth_one = run_flows(&veth_flows[..1], secs, None, &[], None)?;
    let site_ns: Vec<&Netns> = sites.iter().map(|s| &s.ns).collect();
    let before = (losses(&site_ns), losses(&[&head_ns]));
    let veth_all = run_flows(&veth_flows, secs, None, &[], None)?;
    let veth_losses = (
        losses(&site_ns).since(&before.0),
        losses(&[&head_ns]).since(&before.1),
    );
    drop(site_ns);

    drop(veth_flows);

    // The head-end, then every site's gateway (each connects at start).
    write_head_config(head_dir.path(), n, &psks)?;
    let mut head = common::spawn_gateway(&head_ns, "head-end", head_dir.path(), HEAD_WAN, &[])?;
    common::wait_ready(&mut head, Duration::from_secs(30))?;
    let txqueuelen = std::env::var("BENCH_HEAD_TXQUEUELEN")
        .ok()
        .filter(|v| !v.is_empty());
    if let Some(len) = &txqueuelen {
        head_ns.ip(&["link", "set", "dev", "concentrator0", "txqueuelen", len])?;
    }
    let nice = std::env::var("BENCH_HEAD_NICE").ok().filter(|v| !v.is_empty());
    if let Some(nice) = &nice {
        renice(head.pid(), nice)?;
    }
    let mut sites = sites;
    for (i, s) in sites.iter_mut().enumerate() {
        s.gateway = Some(common::spawn_gateway(
            &s.ns,
            &format!("site {i}"),
            s.dir.path(),
            &site_wan(i),
            &[],
        )?);
    }
    let up_timeout = Duration::from_secs(60 + n as u64 / 2);
    wait::until("every site's IKE SA at the head-end", up_timeout, || {
        head.ensure_running()?;
        let up = common::metric(&head_ns, "concentrator_gateway_ike_sas_established")?;
        Ok(if up >= n as f64 {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{up} of {n}"))
        })
    })
    .with_context(|| head.log_tail(30))?;
    let indexed: Vec<(usize, &Site)> = sites.iter().enumerate().collect();
    in_parallel(&indexed, |(i, s)| {
        s.ns.wait_reachable(Some(addr(&site_host(*i))), addr(HEAD_HOST), up_timeout)
            .with_context(|| s.gateway.as_ref().map(|g| g.log_tail(20)).unwrap_or_default())
    })?;
    let set_up = set_up.elapsed();
    let head_pid = head.pid();
    let site_pids: Vec<u32> = sites
        .iter()
        .filter_map(|s| s.gateway.as_ref().map(Daemon::pid))
        .collect();

    // (b) one tunnel alone, then all N at once.
    let tunnel_flows: Vec<Flow<'_>> = (0..n)
        .map(|i| Flow {
            ns: &sites[i].ns,
            from: site_host(i),
            to: HEAD_HOST.to_owned(),
            port: port(i),
        })
        .collect();
    let one = run_flows(&tunnel_flows[..1], secs, Some(head_pid), &site_pids[..1], None)?;
    let site_ns: Vec<&Netns> = sites.iter().map(|s| &s.ns).collect();
    let before = (losses(&site_ns), losses(&[&head_ns]));
    let all = run_flows(&tunnel_flows, secs, Some(head_pid), &site_pids, perf.as_deref())?;
    let tunnel_losses = (
        losses(&site_ns).since(&before.0),
        losses(&[&head_ns]).since(&before.1),
    );

    // Every tunnel stayed up and nothing was dropped for want of an SA.
    head.ensure_running()?;
    ensure!(
        common::metric(&head_ns, "concentrator_gateway_ike_sas_established")? == n as f64,
        "tunnels went down during the run:\n{}",
        head.log_tail(30)
    );
    let drops = [
        "concentrator_gateway_esp_packets_in_total",
        "concentrator_gateway_esp_packets_out_total",
        "concentrator_gateway_esp_dropped_no_sa_total",
        "concentrator_gateway_esp_dropped_unknown_spi_total",
        "concentrator_gateway_esp_dropped_invalid_total",
        "concentrator_gateway_esp_dropped_policy_total",
    ]
    .iter()
    .map(|m| Ok(format!("{m} {}", common::metric(&head_ns, m)?)))
    .collect::<Result<Vec<String>>>()?;

    let row = |name: &str, m: &Measured, cpu: bool| {
        let spread = if m.per_flow.len() > 1 {
            format!(
                "{:>7.3} {:>7.3} {:>7.3}",
                gbit(m.min()),
                gbit(m.median()),
                gbit(m.max())
            )
        } else {
            format!("{:>23}", "")
        };
        let cpu = if cpu {
            format!(
                "{:>6.2} {:>6.2}",
                m.head_cpu / m.wall.as_secs_f64(),
                m.sites_cpu / m.wall.as_secs_f64()
            )
        } else {
            format!("{:>6} {:>6}", "-", "-")
        };
        println!(
            "  {name:<18} {:>8.3} {:>8.3}  {spread}  {cpu}  {:>5.0}%  {:>5.1} {:>5.1}",
            gbit(m.sum()),
            gbit(m.wall_bps),
            100.0 * m.busy,
            m.load,
            m.runnable
        );
    };
    println!(
        "\nMany tunnels: N = {n}, iperf3 TCP {}, {secs} s per run, {IKE} / {ESP}; \
         one site gateway process per site, one head-end{} (set-up {:.0?})",
        if reverse() {
            "head-end -> sites"
        } else {
            "sites -> head-end"
        },
        [
            nice.as_ref().map(|v| format!(" at nice {v}")),
            txqueuelen.as_ref().map(|v| format!(" with TUN txqueuelen {v}")),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
        set_up
    );
    println!(
        "  {:<18} {:>8} {:>8}  {:>7} {:>7} {:>7}  {:>6} {:>6}  {:>6}  {:>5} {:>5}",
        "Gbit/s", "sum", "bytes/t", "min", "median", "max", "head", "sites", "busy", "load", "run"
    );
    row("veth, 1 flow", &veth_one, false);
    row(&format!("veth, {n} flows"), &veth_all, false);
    row("tunnel, 1 flow", &one, true);
    row(&format!("tunnels, {n} flows"), &all, true);
    println!("  (sum: of each flow's iperf3 rate; bytes/t: all bytes over the wall time of the run;");
    println!("   head, sites: CPU cores used by the head-end and by all site gateways; busy: both cores)");
    println!(
        "  {n} tunnels / {n} veth flows:   {:>6.1}%",
        100.0 * all.sum() / veth_all.sum()
    );
    println!(
        "  {n} tunnels / 1 tunnel:         {:>6.2}x",
        all.sum() / one.sum()
    );
    println!(
        "  1 tunnel / 1 veth flow:         {:>6.1}%",
        100.0 * one.sum() / veth_one.sum()
    );
    println!(
        "  head-end CPU per Gbit/s:        {:>6.3} cores (1 tunnel), {:.3} ({n} tunnels)",
        (one.head_cpu / one.wall.as_secs_f64()) / gbit(one.sum()),
        (all.head_cpu / all.wall.as_secs_f64()) / gbit(all.sum())
    );
    println!("  head-end after the run: {}", drops.join(", "));
    println!("  losses during the {n}-flow runs (TCP segments retransmitted, UDP receive-buffer drops,");
    println!("  TUN rx/tx drops), all sites' namespaces | the head-end's:");
    for (name, (s, h)) in [("veth", &veth_losses), ("tunnels", &tunnel_losses)] {
        println!(
            "    {name:<8} {} {} {}/{} | {} {} {}/{}",
            s.retransmitted,
            s.udp_rcvbuf,
            s.tun_rx,
            s.tun_tx,
            h.retransmitted,
            h.udp_rcvbuf,
            h.tun_rx,
            h.tun_tx
        );
    }
    if let Some(file) = &perf {
        println!("  perf profile of the head-end: perf report -i {file}");
    }
    ensure!(
        all.per_flow.iter().all(|b| *b > 0.0) && one.sum() > 0.0 && veth_all.sum() > 0.0,
        "a flow carried nothing"
    );
    drop(servers);
    Ok(())
}
