//! IKE load benchmark (issue 3): IKE + CHILD SA establishments per second against our gateway
//! (`concentrator-gateway`) and against strongSwan's charon, one after the other in one run,
//! with one load generator built on [`Initiator`]: many concurrent negotiations from one
//! process, X25519 + PSK, `aes128gcm16-prfsha256-x25519` / `aes128gcm16`.
//!
//! The generator runs in a site namespace (the test binary re-executes itself there:
//! `load_driver` does nothing unless `IKE_LOAD_DRIVER` is set), each responder alone in its
//! own namespace on the same WAN bridge. Every SA has its own identity
//! (`sa-N.load.example`), matched by one wildcard eroute / connection with one PSK; every
//! CHILD SA offers the same subnets, so neither responder changes routes per SA. The
//! generator floats to UDP 4500 after IKE_SA_INIT as NAT-traversing sites do (charon's
//! kernel-libipsec would force it anyway), keeps a window of negotiations in flight, keeps the
//! established SAs (answering liveness checks) and prints how many it established in how
//! long. The test reads the responders' CPU time from `/proc` around each run:
//! establishments per responder CPU-second is the per-core figure. The generator and the
//! responder share the machine's cores.
//!
//! Both responders get what a load needs: our gateway a cookie threshold and half-open limit
//! above the window, charon its DoS protection off (`dos_protection`, `block_threshold`,
//! `cookie_threshold`, `init_limit_half_open`) and a hash table sized for the SAs
//! (`ikesa_table_size`, `ikesa_table_segments`). Logging is off on both (errors only) for the
//! full run.
//!
//! Small by default (CI: it only checks that every SA establishes with both, 2,000 of them
//! kept, and that both responders hold exactly those, never a rate):
//!
//!   cargo test -p concentrator-gateway --test initiator_load -- --nocapture
//!
//! Full size, release build (root):
//!
//!   IKE_LOAD=full cargo test --release -p concentrator-gateway --test initiator_load -- --nocapture
//!
//! `ike_establishment_rate_in_a_fleet_replication_on_vs_off` runs the generator against a
//! fleet of three of our gateways behind the front, replication off vs on.
//!
//! `tunnels_per_pod_ours_vs_strongswan` (issue 21) keeps N sites on one gateway, each with its
//! own subnet and answered liveness checks: 2,000 in CI, 10k/50k/100k in the full run.
//!
//! `ike_workers_one_vs_two` (issue 21, IKE on every core) runs the generator against our
//! gateway with `--ike-workers 1`, then 2, and prints the rates per gateway core and the ratio.
//!
//! `ike_on_4500_passed_on_vs_steered` (issue 21) runs it with IKE on 4500 read by the data
//! plane's threads (`--ike-steering off`), then by the IKE worker's own socket (the default).
//!
//! With the SAs kept, each responder's RSS growth over the run (read a few seconds after it)
//! divided by the SAs is its memory per tunnel, printed for both.
//!
//! `IKE_LOAD_SAS`, `IKE_LOAD_HOLD_SAS`, `IKE_LOAD_WINDOW` and `IKE_LOAD_THREADS` override the sizes;
//! `IKE_LOAD_GATEWAY_BIN` names the gateway binary (default: the one Cargo builds for this
//! test). Without the binary the small run measures strongSwan only and says so; the full
//! run fails. As non-root the test prints SKIP and passes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::fleet::{self, Affinity, Fleet, FleetOptions};
use concentrator_e2e::gateway::wait_ready;
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::process::{self, Daemon};
use concentrator_e2e::strongswan::{self, Charon, CharonOptions, Connection};
use concentrator_e2e::topology::{GW_ADDR as OURS_ADDR, GW_LAN, SITE_ADDR, SITE_LAN};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, prereq, scratch};
use concentrator_ike::Header;
use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use concentrator_ike::initiator::{Config, Event, Initiator, NatTraversal};
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{IdBuf, SystemEntropy};
use concentrator_test_util::interop::{driver_addrs, env, field, initiator_config, responder_config};

mod common;

use common::StaticEroute;

const IKE: &str = "aes128gcm16-prfsha256-x25519";
const ESP: &str = "aes128gcm16";
/// charon's address; ours is the topology's gateway address.
const SWAN_ADDR: &str = "192.0.2.3";
const GW_ID: &str = "gw.load.example";
const PSK: &str = "load-test-psk-not-a-secret";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

/// Counts the live heap of this process, so that the in-process engine run can tell its
/// memory per SA kept (a few relaxed atomic additions per allocation).
struct CountingAlloc;

static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE_BLOCKS: AtomicU64 = AtomicU64::new(0);
/// Live blocks by size class (16-byte steps; the last class holds everything larger): the
/// shape of the memory per SA, where a heap profiler is not at hand.
static LIVE_BY_SIZE: [AtomicU64; SIZE_CLASSES] = [const { AtomicU64::new(0) }; SIZE_CLASSES];
const SIZE_CLASSES: usize = 65;

fn size_class(size: usize) -> usize {
    size.div_ceil(16).min(SIZE_CLASSES - 1)
}

// Safety: every call is forwarded to the system allocator with the caller's arguments; the
// counters are only bookkeeping.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // Safety: as the caller's contract for `alloc`.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
            LIVE_BY_SIZE[size_class(layout.size())].fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // Safety: as the caller's contract for `dealloc`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        LIVE_BY_SIZE[size_class(layout.size())].fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // Safety: as the caller's contract for `realloc`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            LIVE_BY_SIZE[size_class(layout.size())].fetch_sub(1, Ordering::Relaxed);
            LIVE_BY_SIZE[size_class(new_size)].fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Live heap bytes and blocks now.
fn live_heap() -> (u64, u64) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_BLOCKS.load(Ordering::Relaxed),
    )
}

/// Live blocks per size class now.
fn live_by_size() -> Vec<i64> {
    LIVE_BY_SIZE
        .iter()
        .map(|c| c.load(Ordering::Relaxed) as i64)
        .collect()
}

/// Clock ticks of `/proc/*/stat` times.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of process `pid` (all its threads) so far.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from the closing parenthesis.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i).context("short stat")?.parse::<f64>()?) };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// Resident set size of process `pid`, in bytes.
fn rss_bytes(pid: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .context("no VmRSS")?
        .trim()
        .parse::<u64>()?;
    Ok(kib * 1024)
}

/// How long the responder's RSS is left to settle after the generator stops (the last
/// answers, freed buffers) before it is read.
const RSS_SETTLE: Duration = Duration::from_secs(3);

/// A window of answers arriving together overflows the default ~200 KiB receive buffer
/// (each small datagram costs a few KiB of it), and every loss costs a 2 s retransmission:
/// the generator must not be what limits either responder.
fn grow_receive_buffer(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 8 << 20;
    // Safety: the descriptor is open while `sock` is borrowed; the value is a live c_int of
    // the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        eprintln!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
}

/// What the generator threads share: the next SA number, datagrams sent.
#[derive(Default)]
struct Shared {
    next: AtomicU64,
    sent: AtomicU64,
}

/// The sites' subnets in the tunnels-per-pod runs: SA `n` is the site `10.128.0.0 + 16 n`/28
/// (524,288 of them), all inside the one eroute's remote subnet.
const SITES: &str = "10.128.0.0/9";
const SITE_PREFIX: u8 = 28;

/// SA `n`'s own site subnet inside [`SITES`].
fn site_subnet(n: u64) -> Result<ipnet::IpNet> {
    let first = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
    let n = u32::try_from(n)
        .ok()
        .filter(|n| *n < 1 << 19)
        .context("more sites than 10.128.0.0/9 holds")?;
    Ok(ipnet::IpNet::new(
        IpAddr::from(std::net::Ipv4Addr::from(first + (n << 4))),
        SITE_PREFIX,
    )?)
}

/// What one generator thread does.
#[derive(Clone, Copy)]
struct Plan {
    /// Negotiations to start.
    quota: u64,
    /// At most this many in flight.
    window: usize,
    /// Keep each SA once up (else delete it at once).
    hold: bool,
    /// Each SA offers its own site subnet ([`site_subnet`]) instead of [`SITE_LAN`].
    sites: bool,
    /// Once all are up, keep answering until the responder has sent a request (its liveness
    /// check) on every SA kept, or this long has passed.
    liveness: Option<Duration>,
    /// No new negotiation starts after this instant (a responder too slow for the quota).
    deadline: Option<Instant>,
}

/// What one generator thread did.
#[derive(Default)]
struct Outcome {
    ok: u64,
    failed: u64,
    /// SAs kept on which the responder sent at least one request (a liveness check) that
    /// the generator answered.
    probed: u64,
    /// When the last negotiation ended (before any wait for liveness checks).
    done_after: Duration,
}

/// One generator thread: the plan's negotiations from its own UDP socket.
fn generate(base: &Config, remote: IpAddr, local: IpAddr, plan: Plan, shared: &Shared) -> Result<Outcome> {
    let Plan {
        mut quota,
        window,
        hold,
        sites,
        liveness,
        deadline,
    } = plan;
    let Shared { next, sent } = shared;
    let sock = UdpSocket::bind((local, 0))?;
    grow_receive_buffer(&sock);
    let here = sock.local_addr()?;
    let mut base = base.clone();
    // The float moves the peer to its 4500 and keeps our socket: one socket per thread.
    base.nat_t = NatTraversal {
        force: true,
        local_port: here.port(),
        remote_port: 4500,
    };
    let mut entropy = SystemEntropy;
    let mut inflight: HashMap<u64, Initiator> = HashMap::new();
    let mut established: HashMap<u64, Initiator> = HashMap::new();
    let mut probed = std::collections::HashSet::new();
    let mut liveness_until = None;
    let (started_at, mut done_after) = (Instant::now(), Duration::ZERO);
    let (mut started, mut ok, mut failed) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 65536];
    let send = |i: &mut Initiator| -> Result<()> {
        let marker = i.floated();
        while let Some(t) = i.poll_transmit() {
            sent.fetch_add(1, Ordering::Relaxed);
            // RFC 3948 §2.2: IKE on the NAT-T path carries the non-ESP marker.
            if marker {
                let mut out = Vec::with_capacity(t.payload.len() + 4);
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&t.payload);
                sock.send_to(&out, t.remote)?;
            } else {
                sock.send_to(&t.payload, t.remote)?;
            }
        }
        Ok(())
    };
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            quota = started;
        }
        if ok + failed >= quota {
            if liveness_until.is_none() {
                done_after = started_at.elapsed();
            }
            // All up: then, with `liveness`, answer until every SA kept was checked.
            let Some(wait) = liveness.filter(|_| hold) else {
                break;
            };
            let until = *liveness_until.get_or_insert_with(|| Instant::now() + wait);
            if probed.len() >= established.len() || Instant::now() >= until {
                break;
            }
        }
        while started < quota && inflight.len() < window {
            let n = next.fetch_add(1, Ordering::Relaxed);
            let mut config = base.clone();
            config.local_id = IdBuf::new(&Identity::Fqdn(format!("sa-{n}.load.example").as_bytes()));
            if sites {
                config.local_subnet = site_subnet(n)?;
            }
            let mut i = Initiator::connect(
                Arc::new(config),
                PSK.as_bytes(),
                here,
                SocketAddr::new(remote, 500),
                Instant::now(),
                &mut entropy,
            )?;
            send(&mut i)?;
            inflight.insert(i.spi_i(), i);
            started += 1;
        }
        let now = Instant::now();
        let due = inflight.values().filter_map(Initiator::poll_timeout).min();
        let wait = due.map_or(Duration::from_millis(50), |t| t.saturating_duration_since(now));
        sock.set_read_timeout(Some(
            wait.clamp(Duration::from_micros(100), Duration::from_millis(50)),
        ))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let data = buf.get(..n).unwrap_or_default();
                let ike = if from.port() == 4500 {
                    match data.strip_prefix(&[0, 0, 0, 0][..]) {
                        Some(rest) => rest,
                        None => continue,
                    }
                } else {
                    data
                };
                let Some((h, _)) = Header::peek(ike) else { continue };
                let now = Instant::now();
                if let Some(i) = inflight.get_mut(&h.spi_i) {
                    let _ = i.handle_datagram(now, here, from, ike, &mut entropy);
                    send(i)?;
                } else if let Some(i) = established.get_mut(&h.spi_i) {
                    // Once up, only the responder starts exchanges here: its liveness checks.
                    if !h.flags.contains(concentrator_ike::Flags::RESPONSE) {
                        probed.insert(h.spi_i);
                    }
                    let _ = i.handle_datagram(now, here, from, ike, &mut entropy);
                    send(i)?;
                    while i.poll_event().is_some() {}
                    continue;
                } else {
                    continue;
                }
                let Some(mut i) = inflight.remove(&h.spi_i) else {
                    continue;
                };
                let mut done = None;
                while let Some(ev) = i.poll_event() {
                    match ev {
                        Event::ChildSaInstalled(_) => done = Some(true),
                        Event::Failed(e) => {
                            eprintln!("FAILED {e}");
                            done = Some(false);
                        }
                        _ => {}
                    }
                }
                match done {
                    Some(true) if hold => {
                        ok += 1;
                        established.insert(i.spi_i(), i);
                    }
                    Some(true) => {
                        // Churn: the SA goes at once (an INFORMATIONAL DELETE, RFC 7296
                        // §1.4.1), so the responder holds about a window of SAs.
                        ok += 1;
                        i.delete(Instant::now());
                        send(&mut i)?;
                    }
                    Some(false) => failed += 1,
                    None => {
                        inflight.insert(i.spi_i(), i);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        let expired: Vec<u64> = inflight
            .iter()
            .filter(|(_, i)| i.poll_timeout().is_some_and(|t| t <= now))
            .map(|(spi, _)| *spi)
            .collect();
        for spi in expired {
            let Some(mut i) = inflight.remove(&spi) else {
                continue;
            };
            i.handle_timeout(now, &mut entropy);
            send(&mut i)?;
            if i.is_closed() {
                eprintln!("FAILED {:?}", i.poll_event());
                failed += 1;
            } else {
                inflight.insert(spi, i);
            }
        }
    }
    if liveness_until.is_none() {
        done_after = started_at.elapsed();
    }
    Ok(Outcome {
        ok,
        failed,
        probed: probed.len() as u64,
        done_after,
    })
}

/// The generators' initiator configuration; each SA replaces the local ID with its own.
fn load_initiator_config() -> Result<Config> {
    initiator_config(IKE, ESP, (SITE_LAN, GW_LAN), ("sa.load.example", GW_ID))
}

/// The generator: runs when `IKE_LOAD_DRIVER` is set, prints one `RESULT` line, exits.
#[test]
fn load_driver() -> Result<()> {
    let Some((local, remote)) = driver_addrs("IKE_LOAD_DRIVER", "IKE_LOAD")? else {
        return Ok(());
    };
    let sas: u64 = env("IKE_LOAD_SAS")?.parse()?;
    let window: usize = env("IKE_LOAD_WINDOW")?.parse()?;
    let threads: u64 = env("IKE_LOAD_THREADS")?.parse()?;
    let hold = std::env::var_os("IKE_LOAD_HOLD").is_some();
    let sites = std::env::var_os("IKE_LOAD_SITES").is_some();
    let secs = |name: &str| -> Result<Option<Duration>> {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse::<f64>()
                    .map(Duration::from_secs_f64)
                    .with_context(|| format!("{name}={v}"))
            })
            .transpose()
    };
    let liveness = secs("IKE_LOAD_LIVENESS_SECS")?;
    let deadline = secs("IKE_LOAD_DEADLINE_SECS")?.map(|d| Instant::now() + d);
    let config = load_initiator_config()?;
    let shared = Arc::new(Shared::default());
    let cpu_before = cpu_seconds("self")?;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let quota = sas / threads + u64::from(t < sas % threads);
            let (config, shared) = (config.clone(), Arc::clone(&shared));
            let plan = Plan {
                quota,
                window: window.div_ceil(usize::try_from(threads).unwrap_or(1)).max(1),
                hold,
                sites,
                liveness,
                deadline,
            };
            std::thread::spawn(move || generate(&config, remote, local, plan, &shared))
        })
        .collect();
    let mut all = Outcome::default();
    for w in workers {
        let o = w
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        all.ok += o.ok;
        all.failed += o.failed;
        all.probed += o.probed;
        all.done_after = all.done_after.max(o.done_after);
    }
    let Outcome {
        ok,
        failed,
        probed,
        done_after,
    } = all;
    // The establishments' time; the liveness answers after them are not part of it.
    let seconds = done_after.min(start.elapsed()).as_secs_f64();
    let cpu = cpu_seconds("self")? - cpu_before;
    let sent = shared.sent.load(Ordering::Relaxed);
    println!(
        "RESULT established={ok} failed={failed} seconds={seconds:.3} cpu={cpu:.3} sent={sent} probed={probed}"
    );
    Ok(())
}

/// One generator run's figures.
#[derive(Debug)]
struct Run {
    established: u64,
    failed: u64,
    seconds: f64,
    generator_cpu: f64,
    responder_cpu: f64,
    /// Datagrams the generator sent: 2 per SA (IKE_SA_INIT, IKE_AUTH), 3 with churn (the
    /// DELETE); more are retransmissions, i.e. lost or late answers.
    sent: u64,
    /// The responder's RSS growth over the run, read [`RSS_SETTLE`] after it (bytes).
    rss_growth: i64,
    /// SAs kept on which the responder's liveness check was answered.
    probed: u64,
    /// Our gateway's kernel routes into its TUN device toward [`SITES`], after a sites run.
    site_routes: Option<usize>,
    /// The responder's CPU (cores) while it holds the SAs with nothing to do, read over
    /// [`RSS_SETTLE`] after the run: what its timers and status passes cost per second.
    idle_cpu: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.established as f64 / self.seconds
    }

    fn per_core(&self) -> f64 {
        self.established as f64 / self.responder_cpu.max(1e-9)
    }

    /// RSS growth per SA established, in KiB: with the SAs kept, the memory of a tunnel.
    fn kib_per_sa(&self) -> f64 {
        self.rss_growth as f64 / 1024.0 / self.established.max(1) as f64
    }
}

/// One measurement: how many SAs, and whether the generator keeps them (the responder's
/// state grows to all of them) or deletes each once established (churn: the responder holds
/// about a window of SAs, so the figure is the cost of an establishment alone).
#[derive(Clone, Copy)]
struct Scenario {
    sas: u64,
    hold: bool,
    /// Each SA a site with its own subnet inside [`SITES`] (else all offer [`SITE_LAN`]).
    sites: bool,
    /// Our gateway checks liveness every so often (`ike.dpdInterval`), and the generator keeps
    /// answering until each SA kept was checked once (at most three intervals and 30 s).
    liveness: Option<Duration>,
    /// No new negotiation after this long: the largest number the responder reaches in it.
    deadline: Option<Duration>,
}

impl Scenario {
    /// The first scenarios: every SA offers the same subnets, no liveness checks, no deadline.
    fn plain(sas: u64, hold: bool) -> Self {
        Self {
            sas,
            hold,
            sites: false,
            liveness: None,
            deadline: None,
        }
    }
}

impl Scenario {
    fn label(&self) -> String {
        if self.hold {
            format!("{} SAs kept", self.sas)
        } else {
            format!("{} SAs, each deleted once up", self.sas)
        }
    }
}

/// How big a run is.
struct Size {
    window: usize,
    threads: u64,
    full: bool,
    scenarios: Vec<Scenario>,
    /// Our gateway's `--ike-workers` (its default when `None`).
    ike_workers: Option<usize>,
    /// Our gateway's `--ike-steering` (on by default).
    steering: bool,
}

impl Size {
    fn from_env() -> Result<Self> {
        let full = std::env::var("IKE_LOAD").is_ok_and(|v| v == "full");
        // Small (CI): a few thousand tunnels kept, as a correctness check at some scale.
        let (churn, hold, window) = if full {
            (20_000, 5_000, 256)
        } else {
            (200, 2_000, 32)
        };
        Ok(Self {
            window: env_or("IKE_LOAD_WINDOW", window)?,
            threads: env_or("IKE_LOAD_THREADS", 1)?,
            full,
            scenarios: vec![
                Scenario::plain(env_or("IKE_LOAD_SAS", churn)?, false),
                Scenario::plain(env_or("IKE_LOAD_HOLD_SAS", hold)?, true),
            ],
            ike_workers: None,
            steering: true,
        })
    }
}

/// Runs the generator in `site` against `remote` and samples `responder_pid`'s CPU time.
fn run_generator(
    site: &Netns,
    remote: &str,
    responder_pid: &str,
    size: &Size,
    scenario: Scenario,
) -> Result<Run> {
    let responder = || Ok((cpu_seconds(responder_pid)?, rss_bytes(responder_pid)?));
    run_generator_with(site, remote, &responder, size, scenario)
}

/// [`run_generator`] with the responder's CPU seconds and RSS bytes read by `responder`
/// (several processes: a fleet).
fn run_generator_with(
    site: &Netns,
    remote: &str,
    responder: &dyn Fn() -> Result<(f64, u64)>,
    size: &Size,
    scenario: Scenario,
) -> Result<Run> {
    let mut cmd = site.command(std::env::current_exe()?);
    cmd.args(["--exact", "load_driver", "--nocapture", "--test-threads=1"])
        .env("IKE_LOAD_DRIVER", "1")
        .env("IKE_LOAD_LOCAL", SITE_ADDR)
        .env("IKE_LOAD_REMOTE", remote)
        .env("IKE_LOAD_SAS", scenario.sas.to_string())
        .env("IKE_LOAD_WINDOW", size.window.to_string())
        .env("IKE_LOAD_THREADS", size.threads.to_string());
    if scenario.hold {
        cmd.env("IKE_LOAD_HOLD", "1");
    }
    if scenario.sites {
        cmd.env("IKE_LOAD_SITES", "1");
    }
    if let Some(every) = scenario.liveness {
        let wait = (every * 3).max(every + Duration::from_secs(30));
        cmd.env("IKE_LOAD_LIVENESS_SECS", wait.as_secs_f64().to_string());
    }
    if let Some(d) = scenario.deadline {
        cmd.env("IKE_LOAD_DEADLINE_SECS", d.as_secs_f64().to_string());
    }
    let (before, rss_before) = responder()?;
    let out = process::output(&mut cmd, Duration::from_secs(1800))?;
    let (after, _) = responder()?;
    std::thread::sleep(RSS_SETTLE);
    let (settled, rss_after) = responder()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // libtest prints "test load_driver ... " before the driver's own output.
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").and_then(|at| l.get(at..)))
        .with_context(|| {
            format!(
                "no RESULT from the generator ({}):\n{stdout}\n{stderr}",
                out.status
            )
        })?;
    let get = |key: &str| -> Result<f64> {
        field(line, key)
            .with_context(|| format!("{key} in {line}"))?
            .parse::<f64>()
            .with_context(|| format!("{key} in {line}"))
    };
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("FAILED"))
        .take(5)
        .collect();
    if !failures.is_empty() {
        eprintln!("generator against {remote}: {failures:?}");
    }
    Ok(Run {
        established: get("established")? as u64,
        failed: get("failed")? as u64,
        seconds: get("seconds")?,
        generator_cpu: get("cpu")?,
        responder_cpu: after - before,
        sent: get("sent")? as u64,
        rss_growth: rss_after as i64 - rss_before as i64,
        probed: get("probed")? as u64,
        site_routes: None,
        idle_cpu: (settled - after) / RSS_SETTLE.as_secs_f64(),
    })
}

/// The gateway binary: `IKE_LOAD_GATEWAY_BIN`, else the one Cargo built for this test;
/// `None` if there is no such file.
fn gateway_bin() -> Option<PathBuf> {
    let bin = std::env::var_os("IKE_LOAD_GATEWAY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_concentrator-gateway")),
        PathBuf::from,
    );
    bin.is_file().then_some(bin)
}

/// The gateway's eroute for every `*.load.example` site. No liveness checks within the run
/// (an hour), as charon's connection has none: with tens of thousands of SAs they would be a
/// load of their own.
const LOAD_EROUTE: StaticEroute<'static> = StaticEroute {
    name: "load",
    local_subnet: GW_LAN,
    remote_subnet: SITE_LAN,
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

/// Our gateway in `ns`, ready; the generator against it.
fn measure_ours(
    wan: &Wan,
    site: &Netns,
    bin: &std::path::Path,
    size: &Size,
    scenario: Scenario,
) -> Result<Run> {
    let ns = Netns::new("loadours")?;
    wan.attach(&ns, "wan0", format!("{OURS_ADDR}/24").parse()?)?;
    ns.add_lo_addr("10.2.0.1/24".parse()?)?;
    // The address was another namespace's in the previous scenario: forget its MAC.
    site.ip(&["neigh", "flush", "all"])?;
    site.wait_reachable(None, OURS_ADDR.parse()?, Duration::from_secs(10))?;
    let dir = scratch::dir("ike-load-gateway")?;
    let config = dir.path().join("config");
    let dpd = scenario
        .liveness
        .map(|every| format!("{}s", every.as_secs().max(1)));
    let eroute = if scenario.sites {
        StaticEroute {
            remote_subnet: SITES,
            dpd: dpd.as_deref().or(LOAD_EROUTE.dpd),
            ..LOAD_EROUTE
        }
    } else {
        LOAD_EROUTE
    };
    eroute.write(&config)?;
    let log = dir.path().join("gateway.log");
    let data = dir.path().join("data");
    let limit = (size.window * 4).max(1000).to_string();
    let mut cmd = ns.command(bin);
    cmd.args(["--config-dir", config.to_str().context("path")?])
        .args(["--data-dir", data.to_str().context("path")?])
        .args(["--ike-listen", OURS_ADDR])
        .args(["--ike-cookie-threshold", &limit, "--ike-max-half-open", &limit])
        .args(
            size.ike_workers
                .map(|n| ["--ike-workers".to_owned(), n.to_string()])
                .into_iter()
                .flatten(),
        )
        .args(if size.steering {
            &[][..]
        } else {
            &["--ike-steering", "off"][..]
        })
        // The full run keeps the gateway's own start-up lines ("gateway ready") and drops the
        // two info lines per SA of the control plane, as charon logs nothing there.
        .env(
            "RUST_LOG",
            if size.full {
                "warn,concentrator_gateway=info,concentrator_gateway::control=warn"
            } else {
                "info"
            },
        );
    let mut gateway = Daemon::spawn("gateway", cmd, &log)?;
    wait_ready(&mut gateway, Duration::from_secs(20))?;
    let pid = gateway.pid().to_string();
    let mut run =
        run_generator(site, OURS_ADDR, &pid, size, scenario).with_context(|| gateway.log_tail(30))?;
    gateway.ensure_running()?;
    if scenario.sites {
        // One route for the eroute, however many sites (the data plane picks each site's SA).
        let sites: ipnet::IpNet = SITES.parse()?;
        let routes = ns.ip(&["route", "show", "dev", "concentrator0"])?;
        // `ip route` prints a host route without its /32.
        let dest = |word: &str| {
            word.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| word.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
        };
        run.site_routes = Some(
            routes
                .lines()
                .filter_map(|l| dest(l.split_whitespace().next()?))
                .filter(|n| sites.contains(n))
                .count(),
        );
    }
    if !size.full || scenario.sites {
        // Spot check, as for charon: the gateway holds the SAs kept, each with its tunnel
        // (the CHILD SA in the data plane), and none of those deleted.
        let want = if scenario.hold { run.established } else { 0 } as f64;
        for name in ["ike_sas_established", "tunnels"] {
            concentrator_e2e::gateway::wait_metric(
                &ns,
                &fleet::metric_name(name),
                want,
                Duration::from_secs(10),
            )
            .with_context(|| gateway.log_tail(30))?;
        }
    }
    // Every SA floated to 4500: the port's program gave all its IKE to the workers' own
    // sockets (a data plane thread reading one is the hop it exists to spare); without it,
    // the data plane's threads read every one.
    let passed_on =
        concentrator_e2e::gateway::metric(&ns, &fleet::metric_name("ike_passed_on_by_dataplane_total"))?;
    ensure!(
        (passed_on == 0.0) == size.steering,
        "steering {}: {passed_on} IKE messages on 4500 went through the data plane's threads\n{}",
        size.steering,
        gateway.log_tail(30)
    );
    Ok(run)
}

/// charon in its own namespace, tuned not to refuse the load; the generator against it.
fn measure_strongswan(wan: &Wan, site: &Netns, size: &Size, scenario: Scenario) -> Result<Run> {
    let ns = Netns::new("loadswan")?;
    wan.attach(&ns, "wan0", format!("{SWAN_ADDR}/24").parse()?)?;
    ns.add_lo_addr("10.2.0.1/24".parse()?)?;
    // The address was another namespace's in the previous scenario: forget its MAC.
    site.ip(&["neigh", "flush", "all"])?;
    site.wait_reachable(None, SWAN_ADDR.parse()?, Duration::from_secs(10))?;
    let mut options = CharonOptions::default();
    if size.full {
        options.log_levels = vec![("default".to_owned(), -1)];
    }
    let big = (scenario.sas * 2).max(1000);
    options.extra_settings = vec![
        // TESTBED.md: charon throttles IKE_SA_INITs from one address (block_threshold),
        // demands cookies (cookie_threshold) and limits half-open SAs; a load generator is
        // one address with many half-open SAs.
        "dos_protection = no".to_owned(),
        format!("block_threshold = {big}"),
        format!("cookie_threshold = {big}"),
        format!("init_limit_half_open = {big}"),
        // The IKE SA manager's hash table defaults to one row: sized for the load instead.
        "ikesa_table_size = 32768".to_owned(),
        "ikesa_table_segments = 16".to_owned(),
    ];
    let charon = Charon::start_with(&ns, &options)?;
    // The site's view of one connection for every `*.load.example` identity.
    let mut conn = Connection::new(
        "load",
        SITE_ADDR.parse()?,
        SWAN_ADDR.parse()?,
        PSK,
        vec![if scenario.sites { SITES } else { SITE_LAN }.parse()?],
        vec![GW_LAN.parse()?],
    );
    conn.local_id = "*.load.example".to_owned();
    conn.remote_id = GW_ID.to_owned();
    conn.ike_proposal = IKE.to_owned();
    conn.esp_proposal = ESP.to_owned();
    charon.load(&[conn.mirrored()])?;
    let pid = ns
        .pids()
        .into_iter()
        .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "charon"))
        .context("no charon process in its namespace")?
        .to_string();
    let run = run_generator(site, SWAN_ADDR, &pid, size, scenario).with_context(|| charon.log_tail(30))?;
    if !size.full && scenario.deadline.is_none() {
        // Spot check: charon holds the SAs kept, established with their CHILD SAs installed,
        // and none of those deleted.
        let want = if scenario.hold { run.established } else { 0 };
        wait::until(
            format!("charon to hold {want} SAs"),
            Duration::from_secs(10),
            || {
                let sas = charon.list_sas()?;
                let up = sas
                    .iter()
                    .filter(|sa| {
                        sa.state == "ESTABLISHED" && sa.children.iter().any(|c| c.state == "INSTALLED")
                    })
                    .count();
                Ok(if up as u64 == want && sas.len() as u64 == want {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!("{up} established of {} listed", sas.len()))
                })
            },
        )?;
    }
    Ok(run)
}

fn report(what: &str, r: &Run) {
    // CPU times come in clock ticks (10 ms): too little of it says nothing per core.
    let per_core = if r.responder_cpu >= 0.1 {
        format!("{:.0}", r.per_core())
    } else {
        "-".to_owned()
    };
    println!(
        "  {what:<11} {:>6} SAs in {:>7.2} s: {:>8.0} /s, responder {:>6.2} CPU-s ({per_core:>7} /s per core), \
         generator {:>6.2} CPU-s, {:.2} datagrams/SA, failed {}",
        r.established,
        r.seconds,
        r.rate(),
        r.responder_cpu,
        r.generator_cpu,
        r.sent as f64 / r.established.max(1) as f64,
        r.failed
    );
}

#[test]
fn ike_establishment_rate_ours_vs_strongswan() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let size = Size::from_env()?;
    let wan = Wan::new()?;
    let site = Netns::new("loadsite")?;
    wan.attach(&site, "wan0", format!("{SITE_ADDR}/24").parse()?)?;
    let bin = gateway_bin();
    if bin.is_none() {
        ensure!(
            !size.full,
            "no concentrator-gateway binary: cargo build --release -p concentrator-gateway"
        );
        eprintln!("SKIP (gateway half): no concentrator-gateway binary at IKE_LOAD_GATEWAY_BIN");
    }
    println!(
        "IKE + CHILD SA establishments, {IKE} / {ESP}, PSK, window {}, {} generator thread(s); \
         generator and responder share this machine's {} cores:",
        size.window,
        size.threads,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut runs = Vec::new();
    for scenario in &size.scenarios {
        // Each responder fresh and alone, in its own namespace.
        let ours = match &bin {
            Some(bin) => Some(measure_ours(&wan, &site, bin, &size, *scenario)?),
            None => None,
        };
        let swan = measure_strongswan(&wan, &site, &size, *scenario)?;
        println!("{}:", scenario.label());
        if let Some(o) = &ours {
            report("ours", o);
        }
        report("strongSwan", &swan);
        if let Some(o) = &ours {
            println!(
                "  ours / strongSwan: {:.1}x establishments/s, {:.1}x per responder core",
                o.rate() / swan.rate(),
                o.per_core() / swan.per_core().max(1e-9)
            );
        }
        if let Some(o) = ours.as_ref().filter(|_| scenario.hold) {
            println!(
                "  memory per tunnel (RSS growth / SAs kept, {}s after): ours {:.1} KiB, strongSwan {:.1} KiB: {:.1}x less",
                RSS_SETTLE.as_secs(),
                o.kib_per_sa(),
                swan.kib_per_sa(),
                swan.kib_per_sa() / o.kib_per_sa().max(1e-9)
            );
        }
        runs.extend(ours.map(|o| ("ours", *scenario, o)));
        runs.push(("strongSwan", *scenario, swan));
    }
    // Correctness only: every negotiation established. Rates are never asserted.
    for (what, scenario, r) in &runs {
        ensure!(
            r.established == scenario.sas && r.failed == 0,
            "{what}, {}: {} established, {} failed",
            scenario.label(),
            r.established,
            r.failed
        );
    }
    Ok(())
}

/// Issue 21's IKE on every core: our gateway with one IKE worker, then with two (each a
/// fresh gateway), the same generator against each: the churn scenario (each SA deleted once
/// up) then the one that keeps them (`IKE_LOAD_SAS`, `IKE_LOAD_HOLD_SAS`). Printed per
/// scenario: each run's establishment rate and rate per gateway CPU-second (per core), and
/// the ratios two workers / one. The generator shares the machine: where it and the
/// gateway together fill every core, the rate cannot double however the gateway scales;
/// the per-core figure still says what each establishment costs the gateway.
#[test]
fn ike_workers_one_vs_two() -> Result<()> {
    ab_ours(
        "IKE workers, 1 vs 2",
        ["1 worker(s)", "2 worker(s)"],
        "2 workers / 1",
        |size, i| size.ike_workers = Some(i + 1),
    )
}

/// IKE on port 4500 read by the data plane's threads and passed to the IKE worker
/// (`--ike-steering off`, as before the port's program) vs read by the worker's own socket
/// (the default), one worker each, a fresh gateway per run, the scenarios of the other
/// benchmarks. Printed: each run's rate and rate per gateway core, and the ratios. Correctness
/// only: every SA established, and which threads read the IKE (checked in `measure_ours`).
#[test]
fn ike_on_4500_passed_on_vs_steered() -> Result<()> {
    ab_ours(
        "IKE on 4500 passed on by the data plane vs steered to the IKE worker (one worker)",
        ["passed on", "steered"],
        "steered / passed on",
        |size, i| {
            size.ike_workers = Some(1);
            size.steering = i == 1;
        },
    )
}

/// Runs the generator against our gateway set up two ways (`set` with 0, then 1; a fresh
/// gateway each) for each scenario, and prints each run and the ratios (`ratio`: second /
/// first). Correctness only: every SA established in every run.
fn ab_ours(what: &str, labels: [&str; 2], ratio: &str, set: impl Fn(&mut Size, usize)) -> Result<()> {
    if prereq::require(&[netns::TOOLS]).is_skip() {
        return Ok(());
    }
    let mut size = Size::from_env()?;
    let Some(bin) = gateway_bin() else {
        ensure!(
            !size.full,
            "no concentrator-gateway binary: cargo build --release -p concentrator-gateway"
        );
        eprintln!("SKIP: no concentrator-gateway binary at IKE_LOAD_GATEWAY_BIN");
        return Ok(());
    };
    let wan = Wan::new()?;
    let site = Netns::new("loadsite")?;
    wan.attach(&site, "wan0", format!("{SITE_ADDR}/24").parse()?)?;
    println!(
        "{what}: IKE + CHILD SA establishments, {IKE} / {ESP}, PSK, window {}, {} generator thread(s); \
         generator and gateway share this machine's {} cores:",
        size.window,
        size.threads,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    for scenario in size.scenarios.clone() {
        println!("{}:", scenario.label());
        let mut runs = Vec::new();
        for (i, label) in labels.iter().enumerate() {
            set(&mut size, i);
            let run = measure_ours(&wan, &site, &bin, &size, scenario)?;
            report(label, &run);
            ensure!(
                run.established == scenario.sas && run.failed == 0,
                "{label}, {}: {} established, {} failed",
                scenario.label(),
                run.established,
                run.failed
            );
            runs.push(run);
        }
        if let [a, b] = &runs[..] {
            println!(
                "  {ratio}: {:.2}x establishments/s, {:.2}x per gateway core; gateway cores busy: {:.2} vs {:.2}",
                b.rate() / a.rate().max(1e-9),
                b.per_core() / a.per_core().max(1e-9),
                a.responder_cpu / a.seconds.max(1e-9),
                b.responder_cpu / b.seconds.max(1e-9),
            );
        }
    }
    Ok(())
}

/// Issue 21's tunnels per pod: `IKE_LOAD_PER_POD` tunnels kept by one gateway (a comma list;
/// default 2,000, and 10,000, 50,000 and 100,000 with `IKE_LOAD=full`), each run a fresh
/// gateway. Every SA is a site of its own (its own /28 inside the eroute's 10.128.0.0/9, so
/// the data plane holds one selector per site) and the gateway checks liveness on every one
/// (`ike.dpdInterval` 3 s, 30 s full; `IKE_LOAD_DPD_SECS`): the generator keeps answering until
/// each SA kept was checked. Printed per N: establishment rate and per gateway core, memory
/// per tunnel (RSS growth / N), the SAs whose liveness check was answered, and the kernel
/// routes toward the sites. Then charon, with the same sites and no liveness checks (charon
/// as responder sends none without `dpd_delay`), at the largest N or as many as it
/// establishes in `IKE_LOAD_SWAN_DEADLINE_SECS` (300 s; unlimited in the small run).
///
/// Correctness only (never a time): every SA established, its liveness check answered, the
/// gateway holding exactly those SAs and tunnels afterwards, and one route for all sites.
#[test]
fn tunnels_per_pod_ours_vs_strongswan() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let size = Size::from_env()?;
    let counts: Vec<u64> = match std::env::var("IKE_LOAD_PER_POD") {
        Ok(v) => v
            .split(',')
            .map(|n| n.trim().parse().with_context(|| format!("IKE_LOAD_PER_POD={v}")))
            .collect::<Result<_>>()?,
        Err(_) if size.full => vec![10_000, 50_000, 100_000],
        Err(_) => vec![2_000],
    };
    let largest = counts
        .iter()
        .copied()
        .max()
        .context("IKE_LOAD_PER_POD is empty")?;
    let every = Duration::from_secs(env_or("IKE_LOAD_DPD_SECS", if size.full { 30 } else { 3 })?);
    let swan_deadline = size
        .full
        .then(|| env_or("IKE_LOAD_SWAN_DEADLINE_SECS", 300.0).map(Duration::from_secs_f64))
        .transpose()?;
    let Some(bin) = gateway_bin() else {
        ensure!(
            !size.full,
            "no concentrator-gateway binary: cargo build --release -p concentrator-gateway"
        );
        eprintln!("SKIP: no concentrator-gateway binary at IKE_LOAD_GATEWAY_BIN");
        return Ok(());
    };
    let wan = Wan::new()?;
    let site = Netns::new("loadsite")?;
    wan.attach(&site, "wan0", format!("{SITE_ADDR}/24").parse()?)?;
    println!(
        "Tunnels per pod: one gateway keeps N sites (IKE SA + CHILD SA each, {IKE} / {ESP}, PSK, \
         each its own /28 in {SITES}), liveness checks every {} s; window {}, {} generator \
         thread(s) on the same {} cores (the responder CPU-s include answering the liveness checks):",
        every.as_secs(),
        size.window,
        size.threads,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut ours = Vec::new();
    for &sas in &counts {
        let scenario = Scenario {
            sas,
            hold: true,
            sites: true,
            liveness: Some(every),
            deadline: None,
        };
        let run = measure_ours(&wan, &site, &bin, &size, scenario)?;
        report("ours", &run);
        println!(
            "  {sas} tunnels: {:.2} KiB per tunnel, {:.1}% of a core while idle, liveness answered on {}, kernel routes toward the sites: {}",
            run.kib_per_sa(),
            run.idle_cpu * 100.0,
            run.probed,
            run.site_routes.map_or("-".to_owned(), |n| n.to_string())
        );
        ours.push((scenario, run));
    }
    let scenario = Scenario {
        sas: largest,
        hold: true,
        sites: true,
        liveness: None,
        deadline: swan_deadline,
    };
    let swan = measure_strongswan(&wan, &site, &size, scenario)?;
    report("strongSwan", &swan);
    println!(
        "  strongSwan: {} tunnels, {:.2} KiB per tunnel, {:.1}% of a core while idle",
        swan.established,
        swan.kib_per_sa(),
        swan.idle_cpu * 100.0
    );
    if let Some((_, o)) = ours.iter().find(|(s, _)| s.sas == largest) {
        println!(
            "  at the largest N: ours {:.2} KiB per tunnel ({} tunnels), strongSwan {:.2} KiB ({} tunnels): {:.1}x less; \
             {:.1}x establishments per responder core",
            o.kib_per_sa(),
            o.established,
            swan.kib_per_sa(),
            swan.established,
            swan.kib_per_sa() / o.kib_per_sa().max(1e-9),
            o.per_core() / swan.per_core().max(1e-9)
        );
    }
    for (scenario, r) in &ours {
        ensure!(
            r.established == scenario.sas && r.failed == 0,
            "ours, {} sites: {} established, {} failed",
            scenario.sas,
            r.established,
            r.failed
        );
        ensure!(
            r.probed == r.established,
            "ours, {} sites: the liveness check answered on {} of them",
            scenario.sas,
            r.probed
        );
        ensure!(
            r.site_routes == Some(1),
            "ours, {} sites: {:?} kernel routes toward {SITES} (one expected)",
            scenario.sas,
            r.site_routes
        );
    }
    ensure!(
        swan.established > 0 && (size.full || (swan.established == largest && swan.failed == 0)),
        "strongSwan: {} of {largest} established, {} failed",
        swan.established,
        swan.failed
    );
    Ok(())
}

/// Our gateways as a fleet of `FLEET_PODS` behind the kube-proxy-like front
/// (`concentrator_e2e::fleet`, per-port ClientIP affinity), with `--fleet-replicas 1` or `0`;
/// the generator against the front address. Every new IKE SA is placed on a member by
/// rendezvous hashing and forwarded there, so most SAs cross the pod network.
fn measure_fleet(bin: &std::path::Path, replicas: &str, size: &Size, scenario: Scenario) -> Result<Run> {
    let dir = scratch::dir("ike-load-fleet")?;
    let config = dir.path().join("config");
    LOAD_EROUTE.write(&config)?;
    let limit = (size.window * 4).max(1000).to_string();
    let mut options = FleetOptions::new(FLEET_PODS, Affinity::client_ip(), bin, &config);
    options.gateway_args = [
        "--fleet-replicas",
        replicas,
        "--ike-cookie-threshold",
        &limit,
        "--ike-max-half-open",
        &limit,
    ]
    .map(str::to_owned)
    .to_vec();
    if size.full {
        options.gateway_env.push((
            "RUST_LOG".to_owned(),
            "warn,concentrator_gateway=info,concentrator_gateway::control=warn".to_owned(),
        ));
    }
    let mut fleet = Fleet::start(options)?;
    let site = fleet.wan().host("loadsite", SITE_ADDR, None)?;
    let cpu = || -> Result<(f64, u64)> {
        let (mut cpu, mut rss) = (0.0, 0);
        for p in fleet.pods() {
            for pid in p.ns().pids() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.starts_with("concentrator-ga") {
                    cpu += cpu_seconds(&pid.to_string())?;
                    rss += rss_bytes(&pid.to_string())?;
                }
            }
        }
        Ok((cpu, rss))
    };
    let run = run_generator_with(&site, GW_ADDR_FRONT, &cpu, size, scenario)
        .with_context(|| fleet.log_tails(20))?;
    fleet.check_running()?;
    Ok(run)
}

/// Pods of the fleet measured by [`ike_establishment_rate_in_a_fleet_replication_on_vs_off`].
const FLEET_PODS: usize = 3;
/// The fleet's front (the Service address).
const GW_ADDR_FRONT: &str = OURS_ADDR;

/// The cost of SA replication on establishments: the same load against a fleet of three of
/// our gateways with replication off and on, in one run. Per core is establishments per
/// CPU-second of all the gateways together.
#[test]
fn ike_establishment_rate_in_a_fleet_replication_on_vs_off() -> Result<()> {
    if prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let Some(bin) = gateway_bin() else {
        eprintln!("SKIP: no concentrator-gateway binary at IKE_LOAD_GATEWAY_BIN");
        return Ok(());
    };
    let size = Size::from_env()?;
    // The churn scenario: the cost of an establishment, not of holding many SAs.
    let scenario = size.scenarios[0];
    // Two rounds, alternating (the machine's other load drifts); the ratio is the second
    // round's. It also checks what sites with one socket for both ports need: the generator
    // sends to ports 500 and 4500 from one address and port, which the front's per-port
    // affinity may send to two members, and each answer must leave through the member of
    // its own port.
    println!("{} in a fleet of {FLEET_PODS} pods:", scenario.label());
    let mut last = None;
    for round in 1..=2 {
        let off = measure_fleet(&bin, "0", &size, scenario)?;
        let on = measure_fleet(&bin, "1", &size, scenario)?;
        report(&format!("round {round}, replication off"), &off);
        report(&format!("round {round}, replication on"), &on);
        last = Some((off, on));
    }
    let (off, on) = last.context("no round")?;
    println!(
        "  on / off: {:.2}x establishments/s, {:.2}x per core of the gateways",
        on.rate() / off.rate(),
        on.per_core() / off.per_core().max(1e-9)
    );
    for (what, r) in [("off", &off), ("on", &on)] {
        ensure!(
            r.established == scenario.sas && r.failed == 0,
            "replication {what}: {} established, {} failed",
            r.established,
            r.failed
        );
    }
    Ok(())
}

/// Drain by hand-over at scale (issue 16): the generator establishes and keeps
/// `IKE_LOAD_DRAIN_SAS` tunnels (default 300; 15,000 with `IKE_LOAD=full`, about 5,000 per
/// pod) through the front of a fleet of three of our gateways with `--fleet-replicas 1`; the
/// pod holding the most is drained (`concentrator-gateway drain --wait`). Prints the time to
/// DRAINED and the distribution of the shards' pauses (from the drained pod's log: freeze to
/// the map that moves the shard). Checks that no tunnel is lost: the others hold them all
/// afterwards, each carried on once. `IKE_LOAD_DRAIN_LOG` replaces the pods' `RUST_LOG`.
#[test]
fn draining_a_pod_of_thousands_of_tunnels() -> Result<()> {
    if prereq::require(&[netns::TOOLS, etcd::TOOLS, fleet::TOOLS]).is_skip() {
        return Ok(());
    }
    let Some(bin) = gateway_bin() else {
        eprintln!("SKIP: no concentrator-gateway binary at IKE_LOAD_GATEWAY_BIN");
        return Ok(());
    };
    let size = Size::from_env()?;
    let sas: u64 = env_or("IKE_LOAD_DRAIN_SAS", if size.full { 15_000 } else { 300 })?;
    let dir = scratch::dir("ike-load-drain")?;
    let config = dir.path().join("config");
    LOAD_EROUTE.write(&config)?;
    let limit = (size.window * 4).max(1000).to_string();
    let mut options = FleetOptions::new(FLEET_PODS, Affinity::client_ip(), &bin, &config);
    options.gateway_args = [
        "--fleet-replicas",
        "1",
        "--ike-cookie-threshold",
        &limit,
        "--ike-max-half-open",
        &limit,
    ]
    .map(str::to_owned)
    .to_vec();
    // One line per shard handed over; not one per SA.
    let log = std::env::var("IKE_LOAD_DRAIN_LOG").unwrap_or_else(|_| {
        "warn,concentrator_gateway=info,concentrator_gateway::control=warn,concentrator_gateway::control::handover=info"
            .to_owned()
    });
    options.gateway_env.push(("RUST_LOG".to_owned(), log));
    let mut fleet = Fleet::start(options)?;
    let site = fleet.wan().host("loadsite", SITE_ADDR, None)?;
    let run = run_generator_with(
        &site,
        GW_ADDR_FRONT,
        &|| Ok((0.0, 0)),
        &size,
        Scenario::plain(sas, true),
    )
    .with_context(|| fleet.log_tails(20))?;
    ensure!(run.established == sas, "{} of {sas} established", run.established);
    fleet
        .wait_metric_sum("ike_sas_established", Duration::from_secs(120), |v| {
            v == sas as f64
        })
        .with_context(|| fleet.log_tails(20))?;
    // Every SA copied to its replica before the drain: the hand-over sends only the final state.
    fleet
        .wait_metric_sum("fleet_replica_sas", Duration::from_secs(120), |v| v == sas as f64)
        .with_context(|| fleet.log_tails(20))?;
    let per_pod = fleet.metric_by_pod("ike_sas_established")?;
    let (victim, held) = per_pod
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v as u64)))
        .max_by_key(|(_, v)| *v)
        .context("no pod")?;
    let t0 = Instant::now();
    let said = fleet.pod(victim).drain(&bin, &["--wait", "--timeout", "300s"])?;
    let drained = t0.elapsed();
    ensure!(said.starts_with("drained"), "drain said {said:?}");
    let log = concentrator_e2e::logs::tail(&fleet.pod(victim).log_path(), 1_000_000);
    let pauses = common::fleet_sites::handover_pauses(&log);
    let q = |p: f64| {
        pauses
            .get(((pauses.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "drain of gw-{victim} holding {held} of {sas} tunnels: DRAINED after {drained:.2?}; {} shards handed over, pause per shard p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        pauses.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        pauses.last().copied().unwrap_or(0)
    );
    ensure!(!pauses.is_empty(), "no shard handed over");
    // Nothing lost: the two others hold every tunnel, and carried the drained pod's on once.
    fleet
        .wait_metric_sum("ike_sas_established", Duration::from_secs(60), |v| {
            v == sas as f64
        })
        .with_context(|| fleet.log_tails(20))?;
    let others: f64 = (0..FLEET_PODS)
        .filter(|i| *i != victim)
        .map(|i| fleet.pod(i).metric("fleet_adopted_sas_total"))
        .sum::<Result<f64>>()?;
    ensure!(
        others == held as f64,
        "{others} SAs carried on, the drained pod held {held}"
    );
    fleet.check_running()?;
    Ok(())
}

/// The engine alone, in process and on one thread: `IKE_LOAD_ENGINE_SAS` (default 200, 20000
/// with `IKE_LOAD=full`) initiators establish through one [`Endpoint`] that keeps every SA,
/// with the time spent on each side summed separately, so that each side's figure is
/// establishments per second of one core. No root needed, nothing asserted but success.
#[test]
fn engine_establishment_rate_in_process() -> Result<()> {
    let full = std::env::var("IKE_LOAD").is_ok_and(|v| v == "full");
    let sas: u64 = env_or("IKE_LOAD_ENGINE_SAS", if full { 20_000 } else { 200 })?;
    let config = load_initiator_config()?;
    let responder_config = Arc::new(responder_config(IKE, ESP, GW_LAN, SITE_LAN, GW_ID)?);
    let (heap_before, classes_before) = (live_heap(), live_by_size());
    let malloc_before = malloc_in_use();
    let mut ep = Endpoint::new(
        EndpointConfig {
            cookie_threshold: usize::MAX,
            max_half_open: usize::MAX,
            ..EndpointConfig::default()
        },
        responder_config,
    );
    let (site, gw): (SocketAddr, SocketAddr) = ("192.0.2.1:500".parse()?, "192.0.2.2:500".parse()?);
    let mut e = SystemEntropy;
    let (mut t_initiator, mut t_responder) = (Duration::ZERO, Duration::ZERO);
    // Checkpoints: the responder's time per establishment as the endpoint fills up.
    let mut checkpoints = Vec::new();
    let mut since = (Duration::ZERO, 0u64);
    for n in 0..sas {
        let mut c = config.clone();
        c.local_id = IdBuf::new(&Identity::Fqdn(format!("sa-{n}.load.example").as_bytes()));
        let c = Arc::new(c);
        let t0 = Instant::now();
        let mut i = Initiator::connect(c, PSK.as_bytes(), site, gw, t0, &mut e)?;
        t_initiator += t0.elapsed();
        loop {
            let t0 = Instant::now();
            let out: Vec<_> = std::iter::from_fn(|| i.poll_transmit()).collect();
            t_initiator += t0.elapsed();
            if out.is_empty() {
                break;
            }
            let t0 = Instant::now();
            let mut back = Vec::new();
            for t in out {
                let _ = ep.handle_datagram(t0, t.remote, t.local, &t.payload, &mut e);
                loop {
                    back.extend(std::iter::from_fn(|| ep.poll_transmit()));
                    let Some(ev) = ep.poll_event() else { break };
                    if let EndpointEvent::Sa {
                        id,
                        event: Event::PeerIdentified { .. },
                        ..
                    } = ev
                    {
                        let _ = ep.provide_psk(id, t0, Some(PSK.as_bytes()), &mut e);
                    }
                }
            }
            let spent = t0.elapsed();
            t_responder += spent;
            since.0 += spent;
            let t0 = Instant::now();
            for t in back {
                let _ = i.handle_datagram(t0, t.remote, t.local, &t.payload, &mut e);
            }
            t_initiator += t0.elapsed();
        }
        ensure!(
            i.is_established(),
            "SA {n}: {:?}",
            std::iter::from_fn(|| i.poll_event()).collect::<Vec<_>>()
        );
        since.1 += 1;
        if (n + 1) % (sas / 4).max(1) == 0 {
            checkpoints.push((n + 1, since.1 as f64 / since.0.as_secs_f64()));
            since = (Duration::ZERO, 0);
        }
    }
    ensure!(
        ep.counts().established == usize::try_from(sas)?,
        "{:?}",
        ep.counts()
    );
    // Each initiator is gone once its SA is up: what the heap grew by is the responder's.
    let heap = live_heap();
    let malloc = malloc_in_use();
    let per_core = |t: Duration| sas as f64 / t.as_secs_f64();
    println!(
        "engine in process, {IKE} / {ESP}, {sas} SAs kept in one Endpoint: responder side {:.0} /s per \
         core, initiator side {:.0} /s per core",
        per_core(t_responder),
        per_core(t_initiator)
    );
    let marks: Vec<String> = checkpoints
        .iter()
        .map(|(n, r)| format!("{r:.0} /s up to {n}"))
        .collect();
    println!("  responder side as the endpoint fills: {}", marks.join(", "));
    println!(
        "  responder memory: {:.0} heap bytes in {:.1} blocks per SA kept (live heap growth / SAs; \
         the engine only: no data plane, no driver)",
        heap.0.saturating_sub(heap_before.0) as f64 / sas as f64,
        heap.1.saturating_sub(heap_before.1) as f64 / sas as f64
    );
    let classes: Vec<String> = live_by_size()
        .iter()
        .zip(&classes_before)
        .enumerate()
        .filter_map(|(class, (after, before))| {
            let per_sa = (after - before) as f64 / sas as f64;
            let upto = if class == SIZE_CLASSES - 1 {
                format!(">{}", (class - 1) * 16)
            } else {
                format!("<={}", class * 16)
            };
            (per_sa >= 0.05).then(|| format!("{upto} B: {per_sa:.1}"))
        })
        .collect();
    println!("  its blocks per SA by size: {}", classes.join(", "));
    println!(
        "  responder memory, malloc's view: {:.0} bytes in use per SA kept (glibc mallinfo2: \
         Rust's heap and AWS-LC's own allocations, e.g. its cipher contexts, with malloc's \
         per-block overhead)",
        malloc.saturating_sub(malloc_before) as f64 / sas as f64
    );
    Ok(())
}

/// Bytes glibc's malloc has handed out and not had back (`mallinfo2`: `uordblks` from its
/// arenas, `hblkhd` in blocks it mapped on their own, such as a large hash table): unlike
/// [`live_heap`], this sees what AWS-LC allocates itself (cipher contexts), and malloc's
/// per-block overhead.
fn malloc_in_use() -> u64 {
    // Safety: mallinfo2 only reads the allocator's statistics; it takes no arguments.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}
