//! Many tunnels at once (benchmark, not a timed test; ignored by default). N sites build
//! their tunnels through IKEv2 to ONE head-end `concentrator-gateway` (one base eroute and an
//! egroup whose N sites are rows of its embedded store), and one TCP flow per site runs
//! through its tunnel, all at the same time. In the same run it measures the same N flows
//! over the plain veth/bridge path (no tunnels) and one flow through one tunnel alone, and
//! prints the aggregates, per-flow spread, the CPU time of the head-end, of the sites'
//! gateways and of the traffic generators (/proc/PID/stat), how busy the machine was and the
//! ratios. It fails unless every flow moved data, and moved it through its own tunnel (the
//! head-end's per-tunnel byte counters and its ESP packet counters rose by what the flows
//! carried).
//!
//! Run as root, in release mode:
//!
//!   cargo test --release -p concentrator-gateway --test bench_many_tunnels -- --ignored --nocapture
//!
//! - `BENCH_SITES`: how the sites are simulated:
//!   - `multi` (default): ONE site `concentrator-gateway` in one "sites" namespace holds all N
//!     tunnels, one static eroute each (role Initiator, its own IKE SA and CHILD SA, its own
//!     local ID, local subnet and a head-end subnet of its own, since the site picks the
//!     outbound SA by destination only), and the flows are N threads of one sender process
//!     and one sink process (`concentrator_e2e::blast`). The machine then runs the head-end,
//!     one site gateway and two generator processes, so the figures say what the head-end
//!     does with N tunnels rather than how two cores schedule hundreds of processes;
//!   - `process`: one namespace and one site gateway process per site, one iperf3 pair per
//!     flow: the faithful set-up (each site has its own IKE address, UDP socket and TUN
//!     device), which at N = 100 measures the sites more than the head-end on two cores;
//! - `BENCH_SITE_GATEWAYS`: with `multi`, spread the tunnels over this many site gateway
//!   processes (default 1), each on its own WAN address: all ESP of one site gateway has one
//!   UDP 4-tuple, which SO_REUSEPORT hashes to one of the head-end's ingress workers;
//! - `BENCH_TUNNELS`: N (default 100);
//! - `BENCH_SECONDS`: length of each run (default 10);
//! - `BENCH_REVERSE=1`: the flows run head-end -> sites, so that the head-end encrypts them
//!   all instead of decrypting them;
//! - `BENCH_HEAD_NICE=-10`: renice every thread of the head-end (default: not reniced);
//! - `BENCH_HEAD_TXQUEUELEN=10000`: set the txqueuelen of the head-end's TUN device (default:
//!   the kernel's 500), the queue of packets the kernel routes into the tunnels;
//! - `BENCH_PERF=FILE`: also `perf record -g` the head-end during the N-tunnel run into FILE
//!   (then `perf report -i FILE`);
//! - `BENCH_GATEWAY_BIN`: another `concentrator-gateway` binary to run (head-end and sites),
//!   to compare two versions one run after the other.
//!
//! The generator processes are this test binary run again with `--exact tcp_blast` and
//! `BENCH_BLAST=sink|send` (a binary of another crate would not be built by
//! `cargo test -p concentrator-gateway`).

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::blast::{self, FlowReport, Pair};
use concentrator_e2e::netns::{self, Netns, Wan, addr};
use concentrator_e2e::process::{self, Daemon};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{ids, logs, prereq, scratch, tools};

mod common;

use common::StaticEroute;

const HEAD_WAN: &str = "198.18.0.1";
/// Wide enough for a subnet of its own per tunnel in `multi` mode (`head_subnet`).
const HEAD_LAN: &str = "10.0.0.0/9";
const HEAD_HOST: &str = "10.0.0.1";
const HEAD_ID: &str = "hq.bench";
const IKE: &str = "aes128gcm16-prfsha256-x25519";
const ESP: &str = "aes128gcm16";
/// The TCP port of every `blast` sink.
const BLAST_PORT: u16 = 5201;
/// The inner MTU of the tunnels (the gateway's default `--tun-mtu`): no ESP packet carries
/// more payload than this, so a flow of B bytes took at least B / this many ESP packets.
const TUN_MTU: f64 = 1400.0;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn reverse() -> bool {
    std::env::var("BENCH_REVERSE").is_ok_and(|v| !v.is_empty() && v != "0")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Multi,
    Process,
}

fn mode() -> Result<Mode> {
    match std::env::var("BENCH_SITES").unwrap_or_default().as_str() {
        "" | "multi" => Ok(Mode::Multi),
        "process" => Ok(Mode::Process),
        other => bail!("BENCH_SITES={other}: expected multi or process"),
    }
}

/// WAN address of site `i` (`process` mode).
fn site_wan(i: usize) -> String {
    format!("198.18.{}.{}", 1 + i / 250, 1 + i % 250)
}
/// WAN address of site gateway process `k` (`multi` mode), apart from the per-site ones.
fn multi_wan(k: usize) -> String {
    format!("198.18.200.{}", 1 + k)
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
/// The head-end subnet that tunnel `i` reaches (`multi` mode): one per tunnel, inside
/// `HEAD_LAN`, so that the one site gateway can tell the N outbound SAs apart.
fn head_subnet(i: usize) -> String {
    format!("10.{}.{}.0/24", i / 256, i % 256)
}
fn head_host(i: usize) -> String {
    format!("10.{}.{}.1", i / 256, i % 256)
}
/// The site whose LAN (or, with `head`, whose head-end subnet) holds `addr`.
fn site_of(addr: IpAddr, head: bool) -> Option<usize> {
    let IpAddr::V4(a) = addr else { return None };
    let [ten, b, c, _] = a.octets();
    let b = usize::from(b);
    match (ten, head) {
        (10, false) if b >= 128 => Some((b - 128) * 256 + usize::from(c)),
        (10, true) if b < 128 => Some(b * 256 + usize::from(c)),
        _ => None,
    }
}
/// Each iperf3 flow has its own server (one test at a time each).
fn port(i: usize) -> u16 {
    5201 + u16::try_from(i).unwrap_or(0)
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

/// One iperf3 client run: from `ns` (bound to `from`) to the server for flow `site` at `to`.
struct Flow<'a> {
    ns: &'a Netns,
    from: String,
    to: String,
    port: u16,
    site: usize,
}

/// Flows to run at the same time.
enum Flows<'a> {
    /// One iperf3 client per flow (`process` mode).
    Iperf(Vec<Flow<'a>>),
    /// One `blast` sender in `from` and one sink in `to`; `head`: the senders' addresses are
    /// in the head-end's LAN (to find each flow's site from its sink report).
    Blast {
        from: &'a Netns,
        to: &'a Netns,
        pairs: Vec<Pair>,
        head: bool,
        dir: &'a Path,
    },
}

/// Flow `i` of `n` between `site(i)` and `head(i)`: from the site unless `BENCH_REVERSE`
/// (with `blast`, whose sender and sink run in the sites' and head-end's namespaces).
fn flows<'a>(
    sites: &'a Sites,
    head_ns: &'a Netns,
    dir: &'a Path,
    n: usize,
    site: impl Fn(usize) -> String,
    head: impl Fn(usize) -> String,
) -> Flows<'a> {
    match sites {
        Sites::Process(v) => Flows::Iperf(
            (0..n)
                .map(|i| Flow {
                    ns: &v[i].ns,
                    from: site(i),
                    to: head(i),
                    port: port(i),
                    site: i,
                })
                .collect(),
        ),
        Sites::Multi(m) => {
            let (from, to) = if reverse() {
                (head_ns, &m.ns)
            } else {
                (&m.ns, head_ns)
            };
            let pairs = (0..n)
                .map(|i| {
                    let (a, b) = if reverse() {
                        (head(i), site(i))
                    } else {
                        (site(i), head(i))
                    };
                    Pair {
                        from: addr(&a),
                        to: SocketAddr::new(addr(&b), BLAST_PORT),
                    }
                })
                .collect();
            Flows::Blast {
                from,
                to,
                pairs,
                head: reverse(),
                dir,
            }
        }
    }
}

impl Flows<'_> {
    /// The first flow alone.
    fn first(&self) -> Self {
        match self {
            Self::Iperf(v) => Self::Iperf(
                v.iter()
                    .take(1)
                    .map(|f| Flow {
                        ns: f.ns,
                        from: f.from.clone(),
                        to: f.to.clone(),
                        port: f.port,
                        site: f.site,
                    })
                    .collect(),
            ),
            Self::Blast {
                from,
                to,
                pairs,
                head,
                dir,
            } => Self::Blast {
                from,
                to,
                pairs: pairs.iter().take(1).copied().collect(),
                head: *head,
                dir,
            },
        }
    }

    fn run(&self, secs: usize) -> Result<Traffic> {
        match self {
            Self::Iperf(flows) => iperf_all(flows, secs),
            Self::Blast {
                from,
                to,
                pairs,
                head,
                dir,
            } => run_blast(from, to, pairs, *head, dir, secs),
        }
    }
}

/// What the flows of one run reported.
struct Traffic {
    /// Received bits/s of each flow (over its own duration).
    per_flow: Vec<f64>,
    /// Received bytes of each flow, by the site it belongs to (`None`: not a site's address,
    /// as on the plain path).
    by_site: Vec<(Option<usize>, u64)>,
    /// From the first byte received to the last, if the generator says.
    span: Option<Duration>,
    /// CPU seconds of the generator processes, if known.
    generator_cpu: Option<f64>,
}

/// What one set of simultaneous flows did.
struct Measured {
    traffic: Traffic,
    /// Received bytes of all flows over the span of the run (`blast`: first byte to last;
    /// iperf3: the wall time from the first start to the last end).
    wall_bps: f64,
    /// The wall time the CPU figures cover (the traffic generators' lifetime).
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
        self.traffic.per_flow.iter().sum()
    }
    fn bytes(&self) -> u64 {
        self.traffic.by_site.iter().map(|(_, b)| b).sum()
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.traffic.per_flow.clone();
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
    /// Cores used by the head-end over the run.
    fn head_cores(&self) -> f64 {
        self.head_cpu / self.wall.as_secs_f64()
    }
}

/// Runs `flows` at the same time for `secs` seconds each, sampling CPU time and load.
fn run_flows(
    flows: &Flows<'_>,
    secs: usize,
    head: Option<u32>,
    sites: &[u32],
    perf: Option<&str>,
) -> Result<Measured> {
    let ticks = process::clock_ticks();
    let head_before = head.map_or(0.0, |p| process::cpu_seconds(p, ticks));
    let sites_before: f64 = sites.iter().map(|p| process::cpu_seconds(*p, ticks)).sum();
    let machine_before = machine_jiffies();
    let start = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (traffic, samples, perf_status) = std::thread::scope(|scope| {
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
        let traffic = flows.run(secs);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let perf_status = recorder.map(|r| r.join());
        (traffic, sampler.join().unwrap_or_default(), perf_status)
    });
    let wall = start.elapsed();
    let machine_after = machine_jiffies();
    if let Some(Ok(Ok(out))) = &perf_status
        && !out.status.success()
    {
        eprintln!("perf record failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let traffic = traffic?;
    let bytes: u64 = traffic.by_site.iter().map(|(_, b)| b).sum();
    let n = samples.len().max(1) as f64;
    Ok(Measured {
        wall_bps: bytes as f64 * 8.0 / traffic.span.unwrap_or(wall).as_secs_f64().max(1e-9),
        traffic,
        wall,
        head_cpu: head.map_or(0.0, |p| process::cpu_seconds(p, ticks) - head_before),
        sites_cpu: sites.iter().map(|p| process::cpu_seconds(*p, ticks)).sum::<f64>() - sites_before,
        busy: (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0),
        load: samples.iter().map(|s| s.0).sum::<f64>() / n,
        runnable: samples.iter().map(|s| s.1).sum::<f64>() / n,
    })
}

/// Every iperf3 flow at once, one thread each.
fn iperf_all(flows: &[Flow<'_>], secs: usize) -> Result<Traffic> {
    let results: Vec<Result<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = flows
            .iter()
            .map(|f| scope.spawn(move || iperf(f, secs)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("iperf3 thread panicked")))
            })
            .collect()
    });
    let mut traffic = Traffic {
        per_flow: Vec::new(),
        by_site: Vec::new(),
        span: None,
        generator_cpu: None,
    };
    for (f, r) in flows.iter().zip(results) {
        let (bps, bytes) = r.with_context(|| format!("flow {}", f.site))?;
        traffic.per_flow.push(bps);
        traffic.by_site.push((Some(f.site), bytes as u64));
    }
    Ok(traffic)
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

/// The generator: runs only when `BENCH_BLAST` is set (see the file's doc), prints one
/// `FLOW` line per flow and a `CPU` line with its own CPU seconds, and exits.
#[test]
fn tcp_blast() -> Result<()> {
    let Ok(role) = std::env::var("BENCH_BLAST") else {
        return Ok(());
    };
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let reports = match role.as_str() {
        "sink" => {
            let listen: SocketAddr = var("BENCH_BLAST_LISTEN")?.parse()?;
            let listener =
                std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            println!("{}", BLAST_LISTENING);
            blast::sink(
                listener,
                var("BENCH_BLAST_FLOWS")?.parse()?,
                Duration::from_secs(var("BENCH_BLAST_TIMEOUT")?.parse()?),
            )
        }
        "send" => {
            let file = var("BENCH_BLAST_PAIRS")?;
            let pairs = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {file}"))?
                .lines()
                .map(|l| Pair::parse(l).with_context(|| format!("{file}: not from>to: {l}")))
                .collect::<Result<Vec<_>>>()?;
            let secs = var("BENCH_BLAST_SECONDS")?.parse()?;
            blast::send(&pairs, Duration::from_secs(secs), BLAST_CONNECT)?
        }
        other => bail!("BENCH_BLAST={other}: expected sink or send"),
    };
    let mut out = std::io::stdout().lock();
    for r in &reports {
        writeln!(out, "{}", r.line())?;
    }
    writeln!(
        out,
        "CPU {:.3}",
        process::cpu_seconds(std::process::id(), process::clock_ticks())
    )?;
    Ok(())
}

/// What a `tcp_blast` sink prints once it listens.
const BLAST_LISTENING: &str = "BLAST LISTENING";
/// How long the sender keeps trying to connect each flow.
const BLAST_CONNECT: Duration = Duration::from_secs(30);

/// This test binary as a `tcp_blast` generator in `ns`.
fn blast_command(ns: &Netns, role: &str) -> Result<std::process::Command> {
    let mut cmd = ns.command(std::env::current_exe()?);
    cmd.args(["--exact", "tcp_blast", "--nocapture", "--test-threads=1"])
        .env("BENCH_BLAST", role);
    Ok(cmd)
}

/// The `FLOW` lines and the `CPU` line of a generator's output.
fn blast_output(text: &str) -> (Vec<FlowReport>, Option<f64>) {
    let flows = text.lines().filter_map(FlowReport::parse).collect();
    let cpu = text
        .lines()
        .find_map(|l| l.get(l.find("CPU ")? + 4..).and_then(|v| v.trim().parse().ok()));
    (flows, cpu)
}

/// One `blast` run: a sink in `to` on `BLAST_PORT`, then a sender in `from` with `pairs`.
fn run_blast(
    from: &Netns,
    to: &Netns,
    pairs: &[Pair],
    head: bool,
    dir: &Path,
    secs: usize,
) -> Result<Traffic> {
    let tag = ids::unique_suffix();
    let pairs_file = dir.join(format!("blast-{tag}.pairs"));
    let lines: String = pairs.iter().map(|p| format!("{}>{}\n", p.from, p.to)).collect();
    std::fs::write(&pairs_file, lines)?;
    let mut sink = blast_command(to, "sink")?;
    sink.env("BENCH_BLAST_LISTEN", format!("0.0.0.0:{BLAST_PORT}"))
        .env("BENCH_BLAST_FLOWS", pairs.len().to_string())
        .env(
            "BENCH_BLAST_TIMEOUT",
            (secs as u64 + BLAST_CONNECT.as_secs() + 60).to_string(),
        );
    let mut sink = Daemon::spawn("blast sink", sink, &dir.join(format!("blast-{tag}-sink.log")))?;
    let sink_log = sink.log_path().to_owned();
    wait::until("the blast sink to listen", Duration::from_secs(30), || {
        sink.ensure_running()?;
        Ok(if logs::contains(&sink_log, BLAST_LISTENING) {
            Probe::Ready(())
        } else {
            Probe::pending(sink.log_tail(5))
        })
    })?;
    let mut send = blast_command(from, "send")?;
    send.env("BENCH_BLAST_PAIRS", &pairs_file)
        .env("BENCH_BLAST_SECONDS", secs.to_string());
    let out = process::output(
        &mut send,
        Duration::from_secs(secs as u64 + BLAST_CONNECT.as_secs() + 60),
    )?;
    let sent_text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "blast sender failed ({}):\n{sent_text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The sink ends by itself once every flow has closed.
    wait::until(
        "the blast sink to count every flow",
        Duration::from_secs(60),
        || {
            Ok(match sink.exit_status()? {
                Some(status) => Probe::Ready(status),
                None => Probe::pending(sink.log_tail(3)),
            })
        },
    )?;
    let (sent, sender_cpu) = blast_output(&sent_text);
    let (received, sink_cpu) = blast_output(&std::fs::read_to_string(&sink_log)?);
    ensure!(
        received.len() == pairs.len() && sent.len() == pairs.len(),
        "{} flows, {} reported by the sender, {} by the sink:\n{}",
        pairs.len(),
        sent.len(),
        received.len(),
        sink.log_tail(10)
    );
    let (sent_bytes, received_bytes) = (
        sent.iter().map(|r| r.bytes).sum::<u64>(),
        received.iter().map(|r| r.bytes).sum::<u64>(),
    );
    ensure!(
        sent_bytes == received_bytes,
        "the sender wrote {sent_bytes} bytes, the sink received {received_bytes}"
    );
    let first = received.iter().map(|r| r.start).fold(f64::INFINITY, f64::min);
    let last = received.iter().map(|r| r.start + r.secs).fold(0.0, f64::max);
    Ok(Traffic {
        per_flow: received.iter().map(FlowReport::bps).collect(),
        by_site: received
            .iter()
            .map(|r| (site_of(r.peer.ip(), head), r.bytes))
            .collect(),
        span: Some(Duration::from_secs_f64((last - first).max(0.0))),
        generator_cpu: sender_cpu.zip(sink_cpu).map(|(a, b)| a + b),
    })
}

/// The head-end: one base eroute for every site and an egroup whose rows are the sites, each
/// at `peer_address(i)`.
fn write_head_config(
    dir: &Path,
    n: usize,
    psks: &[String],
    peer_address: impl Fn(usize) -> String,
) -> Result<()> {
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
        csv.push_str(&format!(
            "{},{psk},{},{}\n",
            site_id(i),
            site_lan(i),
            peer_address(i)
        ));
    }
    let file = dir.join("sites.csv");
    std::fs::write(&file, csv)?;
    let data = dir.join("data");
    let mut cmd = std::process::Command::new(common::gateway_bin());
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

/// Losses in `namespaces`, whose gateways' TUN devices are `tuns`.
fn losses(namespaces: &[&Netns], tuns: &[String]) -> Losses {
    let mut l = Losses::default();
    for ns in namespaces {
        let snmp_text = ns.run("cat", &["/proc/net/snmp"]).unwrap_or_default();
        l.retransmitted += snmp(&snmp_text, "Tcp", "RetransSegs");
        l.udp_rcvbuf += snmp(&snmp_text, "Udp", "RcvbufErrors");
        for tun in tuns {
            let link = ns
                .ip(&["-j", "-s", "link", "show", "dev", tun.as_str()])
                .unwrap_or_default();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&link) {
                let stats = &v[0]["stats64"];
                l.tun_rx += stats["rx"]["dropped"].as_u64().unwrap_or(0);
                l.tun_tx += stats["tx"]["dropped"].as_u64().unwrap_or(0);
            }
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

/// Bytes in and out of each tunnel at the head-end (`concentrator-gateway tunnels`), by the
/// site's peer ID. The table is refreshed each second.
fn tunnel_bytes(head_ns: &Netns) -> Result<HashMap<String, (u64, u64)>> {
    let table = head_ns.run(common::gateway_bin(), &["tunnels"])?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // PEER ID ... BYTES IN, BYTES OUT, IDLE: counted from the right.
            let at = |back: usize| cols.len().checked_sub(back).and_then(|i| cols.get(i));
            Some((
                (*cols.first()?).to_owned(),
                (at(3)?.parse().ok()?, at(2)?.parse().ok()?),
            ))
        })
        .collect())
}

/// Fails unless the tunnel of every site in `m` carried at least that site's flow, in the
/// flows' direction (head-end counters, from `before`).
fn check_per_tunnel(head_ns: &Netns, before: &HashMap<String, (u64, u64)>, m: &Measured) -> Result<()> {
    let expect: Vec<(String, u64)> = m
        .traffic
        .by_site
        .iter()
        .map(|(site, bytes)| {
            Ok((
                site_id(site.context("a flow from outside the sites' subnets")?),
                *bytes,
            ))
        })
        .collect::<Result<_>>()?;
    // Status refreshes each second: wait for the counters to catch up with the flows.
    wait::until(
        "every tunnel's byte counter at the head-end",
        Duration::from_secs(15),
        || {
            let now = tunnel_bytes(head_ns)?;
            let short: Vec<String> = expect
                .iter()
                .filter_map(|(id, bytes)| {
                    let (b_in, b_out) = now.get(id).copied().unwrap_or_default();
                    let (a_in, a_out) = before.get(id).copied().unwrap_or_default();
                    let moved = if reverse() {
                        b_out.saturating_sub(a_out)
                    } else {
                        b_in.saturating_sub(a_in)
                    };
                    (moved < *bytes).then(|| format!("{id}: {moved} of {bytes} bytes"))
                })
                .collect();
            Ok(if short.is_empty() {
                Probe::Ready(())
            } else {
                Probe::pending(format!("{} tunnels short, e.g. {}", short.len(), short[0]))
            })
        },
    )
}

/// The head-end's ESP packets in the flows' direction (in: it decrypts; out: it encrypts).
fn esp_packets(head_ns: &Netns) -> Result<f64> {
    common::metric(
        head_ns,
        if reverse() {
            "concentrator_gateway_esp_packets_out_total"
        } else {
            "concentrator_gateway_esp_packets_in_total"
        },
    )
}

/// Fails unless the head-end's ESP counter in the flows' direction rose by at least one
/// packet per `TUN_MTU` bytes the flows carried (from `before`).
fn check_esp(head_ns: &Netns, before: f64, m: &Measured, what: &str) -> Result<()> {
    let rose = esp_packets(head_ns)? - before;
    let least = m.bytes() as f64 / TUN_MTU;
    ensure!(
        rose >= least,
        "{what}: {} bytes carried but the head-end's ESP counter rose by only {rose} packets \
         (at least {least:.0} expected): the traffic did not go through the tunnels",
        m.bytes()
    );
    Ok(())
}

/// One site of `process` mode.
struct Site {
    gateway: Option<Daemon>,
    ns: Netns,
    dir: tempfile::TempDir,
}

/// The site gateway processes of `multi` mode, in one namespace.
struct MultiSites {
    gateways: Vec<Daemon>,
    ns: Netns,
    dirs: Vec<tempfile::TempDir>,
}

/// The simulated sites.
enum Sites {
    Process(Vec<Site>),
    Multi(MultiSites),
}

impl Sites {
    fn namespaces(&self) -> Vec<&Netns> {
        match self {
            Self::Process(v) => v.iter().map(|s| &s.ns).collect(),
            Self::Multi(m) => vec![&m.ns],
        }
    }
    fn tuns(&self) -> Vec<String> {
        match self {
            Self::Process(_) => vec!["concentrator0".to_owned()],
            Self::Multi(m) => (0..m.dirs.len()).map(multi_tun).collect(),
        }
    }
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Process(v) => v
                .iter()
                .filter_map(|s| s.gateway.as_ref().map(Daemon::pid))
                .collect(),
            Self::Multi(m) => m.gateways.iter().map(Daemon::pid).collect(),
        }
    }
    fn log_tail(&self, i: usize, k: usize) -> String {
        match self {
            Self::Process(v) => v
                .get(i)
                .and_then(|s| s.gateway.as_ref())
                .map(|g| g.log_tail(20))
                .unwrap_or_default(),
            Self::Multi(m) => m
                .gateways
                .get(i % k.max(1))
                .map(|g| g.log_tail(20))
                .unwrap_or_default(),
        }
    }
}

/// TUN device of site gateway process `k` (`multi` mode; they share a namespace).
fn multi_tun(k: usize) -> String {
    format!("sites{k}")
}

fn gbit(bps: f64) -> f64 {
    bps / 1e9
}

#[test]
#[ignore = "benchmark: run explicitly (see the file's doc)"]
fn many_tunnels_aggregate_vs_veth_vs_one_tunnel() -> Result<()> {
    let iperf3 = tools::IPERF3;
    let mode = mode()?;
    let needs: &[tools::Tool] = match mode {
        Mode::Process => &[tools::CURL, iperf3],
        Mode::Multi => &[tools::CURL],
    };
    if prereq::require(&[netns::TOOLS, needs]).is_skip() {
        return Ok(());
    }
    let n = env_num("BENCH_TUNNELS", 100);
    ensure!((1..=10_000).contains(&n), "BENCH_TUNNELS must be 1..=10000");
    let k = env_num("BENCH_SITE_GATEWAYS", 1);
    ensure!((1..=50).contains(&k), "BENCH_SITE_GATEWAYS must be 1..=50");
    let k = if mode == Mode::Multi { k.min(n) } else { n };
    let secs = env_num("BENCH_SECONDS", 10);
    let perf = std::env::var("BENCH_PERF").ok().filter(|v| !v.is_empty());
    let set_up = Instant::now();

    let wan = Wan::new()?;
    let head_ns = Netns::new("mthead")?;
    wan.attach(&head_ns, "wan0", format!("{HEAD_WAN}/16").parse()?)?;
    // The whole prefix is local: every head-end subnet's host answers.
    head_ns.add_lo_addr(format!("{HEAD_HOST}/9").parse()?)?;
    let head_dir = scratch::dir("many-head")?;
    let psks: Vec<String> = (0..n).map(|_| ids::random_hex(32)).collect();
    let mut servers = Vec::new();
    let sites = match mode {
        Mode::Process => {
            for i in 0..n {
                let p = port(i).to_string();
                servers.push(head_ns.spawn(
                    "iperf3 server",
                    iperf3.path(),
                    &["-s", "-p", p.as_str()],
                    &head_dir.path().join(format!("iperf3-{i}.log")),
                )?);
            }
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
                    lifetimes: Some(("4h", "1h")),
                    psk: &psks[*i],
                    ..StaticEroute::default()
                }
                .write(&s.dir.path().join("config"))
            })?;
            in_parallel(&indexed, |(_, s)| {
                s.ns.wait_reachable(None, addr(HEAD_WAN), Duration::from_secs(20))
            })?;
            Sites::Process(sites)
        }
        Mode::Multi => {
            let ns = Netns::new("mtsites")?;
            // One WAN interface with an address per site gateway process (several interfaces
            // on one subnet would all send through the first).
            wan.attach(&ns, "wan0", format!("{}/16", multi_wan(0)).parse()?)?;
            for g in 1..k {
                ns.add_addr("wan0", format!("{}/16", multi_wan(g)).parse()?)?;
            }
            // Every site's LAN host is local to the one namespace.
            ns.add_lo_addr(format!("{}/9", site_host(0)).parse()?)?;
            let dirs: Vec<tempfile::TempDir> = (0..k)
                .map(|_| scratch::dir("many-sites"))
                .collect::<Result<_>>()?;
            for (i, psk) in psks.iter().enumerate() {
                let dir = &dirs[i % k];
                StaticEroute {
                    name: &format!("hq{i}"),
                    local_subnet: &site_lan(i),
                    remote_subnet: &head_subnet(i),
                    peer_id: HEAD_ID,
                    local_id: &site_id(i),
                    initiate_to: Some(HEAD_WAN),
                    ike: IKE,
                    esp: ESP,
                    lifetimes: Some(("4h", "1h")),
                    psk,
                    ..StaticEroute::default()
                }
                .write(&dir.path().join("config"))?;
            }
            ns.wait_reachable(None, addr(HEAD_WAN), Duration::from_secs(20))?;
            Sites::Multi(MultiSites {
                gateways: Vec::new(),
                ns,
                dirs,
            })
        }
    };

    // (a) the plain path: one flow, then N at once, WAN address to WAN address.
    let veth_flows = flows(
        &sites,
        &head_ns,
        head_dir.path(),
        n,
        |i| match &sites {
            Sites::Process(_) => site_wan(i),
            Sites::Multi(_) => multi_wan(i % k),
        },
        |_| HEAD_WAN.to_owned(),
    );
    let veth_one = run_flows(&veth_flows.first(), secs, None, &[], None)?;
    let tuns = sites.tuns();
    let head_tun = ["concentrator0".to_owned()];
    let before = (losses(&sites.namespaces(), &tuns), losses(&[&head_ns], &head_tun));
    let veth_all = run_flows(&veth_flows, secs, None, &[], None)?;
    let veth_losses = (
        losses(&sites.namespaces(), &tuns).since(&before.0),
        losses(&[&head_ns], &head_tun).since(&before.1),
    );
    drop(veth_flows);

    // The head-end, then the sites' gateways (each connects its tunnels at start).
    write_head_config(head_dir.path(), n, &psks, |i| match mode {
        Mode::Process => site_wan(i),
        Mode::Multi => multi_wan(i % k),
    })?;
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
    match &mut sites {
        Sites::Process(v) => {
            for (i, s) in v.iter_mut().enumerate() {
                s.gateway = Some(common::spawn_gateway(
                    &s.ns,
                    &format!("site {i}"),
                    s.dir.path(),
                    &site_wan(i),
                    &[],
                )?);
            }
        }
        Sites::Multi(m) => {
            for (g, dir) in m.dirs.iter().enumerate() {
                // Several gateways in one namespace: each its own TUN device and local ports.
                let (tun, metrics, admin) = (
                    multi_tun(g),
                    format!("127.0.0.1:{}", 9190 + g),
                    format!("127.0.0.1:{}", 50151 + g),
                );
                let mut gw = common::spawn_gateway(
                    &m.ns,
                    &format!("sites {g}"),
                    dir.path(),
                    &multi_wan(g),
                    &[
                        "--tun-name",
                        tun.as_str(),
                        "--metrics-listen",
                        metrics.as_str(),
                        "--admin-listen",
                        admin.as_str(),
                    ],
                )?;
                common::wait_ready(&mut gw, Duration::from_secs(30))?;
                m.gateways.push(gw);
            }
        }
    }
    let up_timeout = Duration::from_secs(60 + n as u64 / 2);
    wait::until("every site's IKE SA at the head-end", up_timeout, || {
        head.ensure_running()?;
        if let Sites::Multi(m) = &mut sites {
            m.gateways.iter_mut().try_for_each(Daemon::ensure_running)?;
        }
        let up = common::metric(&head_ns, "concentrator_gateway_ike_sas_established")?;
        Ok(if up >= n as f64 {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{up} of {n}"))
        })
    })
    .with_context(|| head.log_tail(30))?;
    let pings: Vec<(usize, &Netns)> = match &sites {
        Sites::Process(v) => v.iter().map(|s| &s.ns).enumerate().collect(),
        Sites::Multi(m) => (0..n).map(|i| (i, &m.ns)).collect(),
    };
    in_parallel(&pings, |(i, ns)| {
        let to = match mode {
            Mode::Process => HEAD_HOST.to_owned(),
            Mode::Multi => head_host(*i),
        };
        ns.wait_reachable(Some(addr(&site_host(*i))), addr(&to), up_timeout)
            .with_context(|| sites.log_tail(*i, k))
    })?;
    drop(pings);
    let set_up = set_up.elapsed();
    let head_pid = head.pid();
    let site_pids = sites.pids();

    // (b) one tunnel alone, then all N at once.
    let tunnel_flows = flows(
        &sites,
        &head_ns,
        head_dir.path(),
        n,
        site_host,
        |i| match &sites {
            Sites::Process(_) => HEAD_HOST.to_owned(),
            Sites::Multi(_) => head_host(i),
        },
    );
    // The site gateways' CPU for one tunnel: only the process that holds tunnel 0.
    let esp_before = esp_packets(&head_ns)?;
    let one = run_flows(&tunnel_flows.first(), secs, Some(head_pid), &site_pids[..1], None)?;
    check_esp(&head_ns, esp_before, &one, "one tunnel")?;
    let before = (losses(&sites.namespaces(), &tuns), losses(&[&head_ns], &head_tun));
    let (esp_before, bytes_before) = (esp_packets(&head_ns)?, tunnel_bytes(&head_ns)?);
    let all = run_flows(&tunnel_flows, secs, Some(head_pid), &site_pids, perf.as_deref())?;
    let tunnel_losses = (
        losses(&sites.namespaces(), &tuns).since(&before.0),
        losses(&[&head_ns], &head_tun).since(&before.1),
    );
    // Checked now, failed after the figures are printed.
    let through_tunnels = check_esp(&head_ns, esp_before, &all, &format!("{n} tunnels"))
        .and_then(|()| check_per_tunnel(&head_ns, &bytes_before, &all));

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
        let spread = if m.traffic.per_flow.len() > 1 {
            format!(
                "{:>7.3} {:>7.3} {:>7.3}",
                gbit(m.min()),
                gbit(m.median()),
                gbit(m.max())
            )
        } else {
            format!("{:>23}", "")
        };
        let cores = |v: f64| format!("{:>6.2}", v / m.wall.as_secs_f64());
        let cpu = if cpu {
            format!("{} {}", cores(m.head_cpu), cores(m.sites_cpu))
        } else {
            format!("{:>6} {:>6}", "-", "-")
        };
        let generator = m
            .traffic
            .generator_cpu
            .map_or_else(|| format!("{:>6}", "-"), cores);
        println!(
            "  {name:<18} {:>8.3} {:>8.3}  {spread}  {cpu} {generator}  {:>5.0}%  {:>5.1} {:>5.1}",
            gbit(m.sum()),
            gbit(m.wall_bps),
            100.0 * m.busy,
            m.load,
            m.runnable
        );
    };
    println!(
        "\nMany tunnels: N = {n}, TCP {} via {}, {secs} s per run, {IKE} / {ESP}; {}, one \
         head-end{} (set-up {:.0?})",
        if reverse() {
            "head-end -> sites"
        } else {
            "sites -> head-end"
        },
        match mode {
            Mode::Process => "iperf3 (one pair per flow)",
            Mode::Multi => "blast (one sender, one sink)",
        },
        match mode {
            Mode::Process => "one site gateway process per site".to_owned(),
            Mode::Multi if k == 1 => "ONE site gateway process for all sites".to_owned(),
            Mode::Multi => format!("{k} site gateway processes for all sites"),
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
        "  {:<18} {:>8} {:>8}  {:>7} {:>7} {:>7}  {:>6} {:>6} {:>6}  {:>6}  {:>5} {:>5}",
        "Gbit/s", "sum", "bytes/t", "min", "median", "max", "head", "sites", "gen", "busy", "load", "run"
    );
    row("veth, 1 flow", &veth_one, false);
    row(&format!("veth, {n} flows"), &veth_all, false);
    row("tunnel, 1 flow", &one, true);
    row(&format!("tunnels, {n} flows"), &all, true);
    println!("  (sum: of each flow's rate; bytes/t: all bytes over the span of the run;");
    println!("   head, sites, gen: CPU cores used by the head-end, by the site gateway(s) and by");
    println!("   the traffic generators; busy: both cores; load, run: load average, runnable tasks)");
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
        "  head-end Gbit/s per core:       {:>6.2} (1 tunnel), {:.2} ({n} tunnels)",
        gbit(one.sum()) / one.head_cores(),
        gbit(all.sum()) / all.head_cores()
    );
    println!(
        "  head-end CPU per Gbit/s:        {:>6.3} cores (1 tunnel), {:.3} ({n} tunnels)",
        one.head_cores() / gbit(one.sum()),
        all.head_cores() / gbit(all.sum())
    );
    println!("  head-end after the run: {}", drops.join(", "));
    println!("  losses during the {n}-flow runs (TCP segments retransmitted, UDP receive-buffer drops,");
    println!("  TUN rx/tx drops), the sites' namespaces | the head-end's:");
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
    through_tunnels?;
    ensure!(
        all.traffic.per_flow.iter().all(|b| *b > 0.0)
            && one.sum() > 0.0
            && veth_all.traffic.per_flow.iter().all(|b| *b > 0.0),
        "a flow carried nothing"
    );
    drop(servers);
    Ok(())
}
