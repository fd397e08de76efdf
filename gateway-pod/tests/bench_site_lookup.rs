//! Site lookup benchmark (issue 5; not a timed test, ignored by default). A private MariaDB
//! with the documented schema (`SiteStore::migrate`) holds two site tables in one run: a
//! small one (10,000 rows) and the large one (`SITE_BENCH_ROWS`, default 1,000,000). For
//! each, random by-peer-ID lookups one at a time, 64 at a time and open-loop at half the
//! measured capacity give p50/p99/max, InnoDB disk reads, statements and CPU per lookup, on
//! two paths alternating in rounds: a statement per lookup (`SiteStore::site_by_peer_id`, the
//! parameterised, indexed query and its pool) and batched (`SiteLookups`, what the egroups
//! use: lookups waiting while a statement is in flight share the next one); then 64
//! concurrent "connecting sites" run the gateway's dynamic-eroute creation path
//! (`select_responder`, `Egroups::lookup_by_peer` with its coalescing cache, the subnet
//! check, `Egroups::insert`, one owner task as in `control/`) for creations per second.
//! The tables alternate in rounds, so load from elsewhere falls on both alike. It prints the
//! large/small ratios of per-lookup cost, the unix socket against TCP, and how many queries
//! 64 simultaneous connects of one site cost. Run in release mode for meaningful numbers:
//!
//!   cargo test --release -p concentrator-gateway --test bench_site_lookup -- --ignored --nocapture
//!
//! `SITE_BENCH_ROWS` sets the large table's rows (default 1,000,000, at most 2^20);
//! `SITE_BENCH_LOOKUPS` the lookups (and creations) per measurement (default 20,000).
//! `SITE_BENCH_ROWS=20000 SITE_BENCH_LOOKUPS=2000` runs in seconds; the default takes about
//! two minutes on two cores. The harness starts MariaDB with a 32 MB buffer pool; as root,
//! everything is measured once more after growing it over the server's root socket and
//! reading both tables in (`SITE_BENCH_BUFFER_POOL`, default 512M, `0` to skip).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use concentrator_crds::egroup::SiteTable;
use concentrator_crds::set::ValidatedSet;
use concentrator_e2e::mariadb::{self, MariaDb};
use concentrator_e2e::prereq;
use concentrator_gateway::config;
use concentrator_gateway::egroups::Egroups;
use concentrator_gateway::eroute::{Selection, select_responder};
use concentrator_gateway::sitedb::{LookupError, Site, SiteLookups, SiteStore};
use ipnet::{IpNet, Ipv4Net};
use sqlx::mysql::MySqlPool;
use sqlx::{AssertSqlSafe, Row};

/// Rows per INSERT statement while loading.
const BATCH: u64 = 5_000;
/// Rows of the small table.
const SMALL_ROWS: u64 = 10_000;
/// Connecting sites at once.
const CONCURRENCY: usize = 64;
/// The dynamic eroutes an egroup may hold (the CRD's default).
const MAX_DYNAMIC: u32 = 10_000;
/// Remote subnet prefix of the egroups: 2^20 distinct /28 in 10.0.0.0/8.
const PREFIX: u8 = 28;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// One site table and how its rows are named.
#[derive(Clone)]
struct Table {
    /// Egroup and Eroute name, and the peer-ID domain label (same length for both tables,
    /// so keys compare alike).
    tag: &'static str,
    name: &'static str,
    rows: u64,
    /// First address of the base eroute's remote subnet (a /8 or /12).
    base: Ipv4Addr,
    base_len: u8,
}

impl Table {
    fn peer_id(&self, i: u64) -> String {
        format!("site{i:07}.{}.example", self.tag)
    }
    fn subnet(&self, i: u64) -> Ipv4Net {
        let addr = u32::from(self.base) + (u32::try_from(i).expect("row index fits") << (32 - PREFIX));
        Ipv4Net::new(Ipv4Addr::from(addr), PREFIX).expect("prefix")
    }
    fn psk(i: u64) -> String {
        format!("{:016x}{:016x}", mix(i), mix(!i))
    }
    fn peer_address(i: u64) -> String {
        format!("198.18.{}.{}", (i >> 8) & 0xff, i & 0xff)
    }
    fn base_net(&self) -> Ipv4Net {
        Ipv4Net::new(self.base, self.base_len).expect("prefix")
    }
}

/// splitmix64: random-looking, reproducible, no dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small random number generator for picking sites.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n
    }
}

/// Loads `t.rows` rows in primary-key order, `BATCH` per multi-row INSERT with bound values.
async fn load(pool: &MySqlPool, t: &Table) -> Duration {
    let started = Instant::now();
    let statement = |n: u64| {
        let values = vec!["(?, ?, ?, ?, NULL)"; usize::try_from(n).expect("batch fits")].join(", ");
        format!(
            "INSERT INTO `{}` (peer_id, psk, remote_subnet, peer_address, backup_peer_address) VALUES {values}",
            t.name
        )
    };
    let full = statement(BATCH);
    let mut first = 0;
    while first < t.rows {
        let n = BATCH.min(t.rows - first);
        let sql = if n == BATCH { full.clone() } else { statement(n) };
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in first..first + n {
            q = q
                .bind(t.peer_id(i))
                .bind(Table::psk(i))
                .bind(t.subnet(i).to_string())
                .bind(Table::peer_address(i));
        }
        q.execute(pool).await.expect("batch inserts");
        first += n;
    }
    started.elapsed()
}

/// A global status counter of the server (e.g. `Innodb_buffer_pool_reads`).
async fn status(pool: &MySqlPool, name: &'static str) -> u64 {
    let sql = format!("SHOW GLOBAL STATUS LIKE '{name}'");
    let row = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .expect("status");
    let v: String = row.try_get(1).expect("status value");
    v.parse().expect("numeric status")
}

async fn variable(pool: &MySqlPool, name: &'static str) -> u64 {
    let sql = format!("SHOW GLOBAL VARIABLES LIKE '{name}'");
    let row = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .expect("variable");
    let v: String = row.try_get(1).expect("variable value");
    v.parse().expect("numeric variable")
}

/// The server's process id, for its CPU time.
static SERVER_PID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// CPU time (user + system) of a process in clock ticks (`USER_HZ`, 100 per second on
/// Linux), all threads; 0 where /proc cannot tell.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Disk reads and CPU time so far: a measurement is the difference of two.
#[derive(Clone, Copy)]
struct Counters {
    disk_reads: u64,
    statements: u64,
    client_ticks: u64,
    server_ticks: u64,
}

impl Counters {
    async fn now(pool: &MySqlPool) -> Self {
        Self {
            disk_reads: status(pool, "Innodb_buffer_pool_reads").await,
            statements: status(pool, "Com_stmt_execute").await,
            client_ticks: cpu_ticks("self"),
            server_ticks: SERVER_PID.get().map_or(0, |p| cpu_ticks(p)),
        }
    }

    /// What happened since `self`, with these latencies over `wall`.
    async fn stats(self, pool: &MySqlPool, mut sorted: Vec<Duration>, wall: Duration) -> Stats {
        let end = Self::now(pool).await;
        sorted.sort_unstable();
        Stats {
            sorted,
            wall,
            disk_reads: end.disk_reads - self.disk_reads,
            // The two status queries are plain queries, not prepared statements.
            statements: end.statements - self.statements,
            client_ticks: end.client_ticks - self.client_ticks,
            server_ticks: end.server_ticks - self.server_ticks,
        }
    }
}

/// Latencies of one measurement, and its wall time.
#[derive(Default)]
struct Stats {
    sorted: Vec<Duration>,
    wall: Duration,
    /// Pages InnoDB read from disk during the measurement.
    disk_reads: u64,
    /// Prepared statements the server executed.
    statements: u64,
    /// CPU time of this process (the gateway's side: tokio, sqlx) and of the server.
    client_ticks: u64,
    server_ticks: u64,
}

impl Stats {
    /// Adds one round of a measurement made in rounds.
    fn merge(&mut self, mut other: Self) {
        self.sorted.append(&mut other.sorted);
        self.sorted.sort_unstable();
        self.wall += other.wall;
        self.disk_reads += other.disk_reads;
        self.statements += other.statements;
        self.client_ticks += other.client_ticks;
        self.server_ticks += other.server_ticks;
    }
    fn pct(&self, p: usize) -> f64 {
        let i = (self.sorted.len() * p / 100).min(self.sorted.len() - 1);
        ms(self.sorted[i])
    }
    fn max(&self) -> f64 {
        ms(*self.sorted.last().expect("measured"))
    }
    fn mean(&self) -> f64 {
        ms(self.sorted.iter().sum::<Duration>()) / self.sorted.len() as f64
    }
    fn per_second(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64()
    }
    fn reads_per_op(&self) -> f64 {
        self.disk_reads as f64 / self.sorted.len() as f64
    }
    fn statements_per_op(&self) -> f64 {
        self.statements as f64 / self.sorted.len() as f64
    }
    /// CPU microseconds per operation: (this process, the server).
    fn cpu_us_per_op(&self) -> (f64, f64) {
        let per = |ticks: u64| ticks as f64 * 10_000.0 / self.sorted.len() as f64;
        (per(self.client_ticks), per(self.server_ticks))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The site must be the row we loaded: a benchmark of wrong answers measures nothing.
fn check(t: &Table, i: u64, r: Result<Site, LookupError>) -> Site {
    let site = r.unwrap_or_else(|e| panic!("lookup of {} failed: {e}", t.peer_id(i)));
    assert_eq!(site.remote_subnet, IpNet::V4(t.subnet(i)), "{}", t.peer_id(i));
    site
}

/// How lookups arrive.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// This many workers, each one lookup after another (closed loop: saturates the server).
    Concurrent(usize),
    /// Lookups started at this rate per second whatever is in flight (open loop), in bursts
    /// per millisecond tick; latency counts from the start of each, so it includes waiting
    /// for a pooled connection but not the tick's own lateness.
    Rate(f64),
}

/// How a lookup reaches the server.
#[derive(Clone)]
enum Path {
    /// A statement per lookup.
    Single(SiteStore),
    /// Waiting lookups share a statement (the egroups' path).
    Batched(SiteLookups),
}

impl Path {
    fn label(&self) -> &'static str {
        match self {
            Self::Single(_) => "statement each",
            Self::Batched(_) => "batched",
        }
    }
}

/// One lookup of a random site of `t`, and how long it took from `since`.
async fn one(path: &Path, st: &SiteTable, t: &Table, i: u64, since: Instant) -> Duration {
    let r = match path {
        Path::Single(store) => {
            store
                .site_by_peer_id(st, &t.peer_id(i), PREFIX, Duration::from_secs(10))
                .await
        }
        Path::Batched(l) => l.by_peer_id(&t.peer_id(i), PREFIX).await,
    };
    let took = since.elapsed();
    check(t, i, r);
    took
}

/// `n` random by-peer-ID lookups in `t` under `load`.
async fn lookups(
    store: &Path,
    stats_pool: &MySqlPool,
    st: &SiteTable,
    t: &Table,
    n: usize,
    load: Load,
    seed: u64,
) -> Stats {
    let before = Counters::now(stats_pool).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Concurrent(conc) => {
            for w in 0..conc {
                let (store, st, t) = (store.clone(), st.clone(), t.clone());
                let count = n / conc + usize::from(w < n % conc);
                tasks.spawn(async move {
                    let mut rng = Rng(mix(seed ^ (w as u64) << 32));
                    let mut lat = Vec::with_capacity(count);
                    for _ in 0..count {
                        let i = rng.below(t.rows);
                        lat.push(one(&store, &st, &t, i, Instant::now()).await);
                    }
                    lat
                });
            }
        }
        Load::Rate(rate) => {
            let mut rng = Rng(mix(seed));
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut spawned = 0;
            while spawned < n {
                tick.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(n);
                for _ in spawned..due {
                    let (store, st, t) = (store.clone(), st.clone(), t.clone());
                    let i = rng.below(t.rows);
                    let at = Instant::now();
                    tasks.spawn(async move { vec![one(&store, &st, &t, i, at).await] });
                }
                spawned = spawned.max(due);
            }
        }
    }
    let mut all = Vec::with_capacity(n);
    while let Some(lat) = tasks.join_next().await {
        all.extend(lat.expect("lookup task"));
    }
    before.stats(stats_pool, all, started.elapsed()).await
}

/// What a lookup task hands back to the owner of the egroups (as `LookupDone` in control/policy).
struct Done {
    started: Instant,
    i: u64,
    egroup: String,
    base: String,
    result: Result<Site, LookupError>,
}

/// Starts the connect of site `i` of `t` as the control task does on IKE_AUTH: select the
/// eroute by identity, run the lookup as its own task.
fn connect(
    egroups: &Egroups,
    set: &ValidatedSet,
    t: &Table,
    i: u64,
    tx: &tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let started = Instant::now();
    let peer = t.peer_id(i);
    let (egroup, base) = match select_responder(set, &peer, |g, p| egroups.has_dynamic(g, p)) {
        Selection::Egroup { egroup, base_eroute } => (egroup, base_eroute),
        Selection::Dynamic { egroup } => {
            let base = set.egroups[&egroup].eroute.clone();
            (egroup, base)
        }
        other => panic!("{peer} selected {other:?}"),
    };
    let lookup = egroups.lookup_by_peer(&egroup, &peer, Instant::now());
    let tx = tx.clone();
    tokio::spawn(async move {
        let result = lookup.await;
        let _ = tx.send(Done {
            started,
            i,
            egroup,
            base,
            result,
        });
    });
}

/// `n` dynamic-eroute creations, `CONCURRENCY` sites connecting at a time; latency is from
/// the identity to the inserted dynamic eroute. Returns the stats and how many were evicted.
async fn creations(
    egroups: &mut Egroups,
    set: &ValidatedSet,
    stats_pool: &MySqlPool,
    t: &Table,
    n: usize,
    seed: u64,
) -> (Stats, usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut rng = Rng(seed);
    let before = Counters::now(stats_pool).await;
    let wall = Instant::now();
    let mut started = 0;
    while started < CONCURRENCY.min(n) {
        connect(egroups, set, t, rng.below(t.rows), &tx);
        started += 1;
    }
    let (mut lat, mut evicted) = (Vec::with_capacity(n), 0);
    while lat.len() < n {
        let d = rx.recv().await.expect("lookup tasks answer");
        let site = check(t, d.i, d.result);
        let base_remote = set.eroutes[&d.base].remote_subnet;
        Egroups::check_subnet(&site, base_remote).expect("row inside the base eroute");
        evicted += egroups
            .insert(
                &d.egroup,
                &d.base,
                &t.peer_id(d.i),
                site.remote_subnet,
                site.peer_address.clone(),
                Instant::now(),
            )
            .len();
        lat.push(d.started.elapsed());
        if started < n {
            connect(egroups, set, t, rng.below(t.rows), &tx);
            started += 1;
        }
    }
    (before.stats(stats_pool, lat, wall.elapsed()).await, evicted)
}

/// `CONCURRENCY` simultaneous connects of one site: how many queries reach the server.
async fn coalescing(egroups: &Egroups, stats_pool: &MySqlPool, t: &Table) -> (u64, Duration) {
    let peer = t.peer_id(t.rows / 2);
    let futures: Vec<_> = (0..CONCURRENCY)
        .map(|_| egroups.lookup_by_peer(t.tag, &peer, Instant::now()))
        .collect();
    let before = status(stats_pool, "Com_stmt_execute").await;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while let Some(r) = set.join_next().await {
        check(t, t.rows / 2, r.expect("task"));
    }
    let took = started.elapsed();
    let queries = status(stats_pool, "Com_stmt_execute").await - before;
    (queries, took)
}

fn write_config(dir: &std::path::Path, url: &str, tables: &[&Table]) {
    // A URL with a password comes from a Secret (an inline one is refused).
    std::fs::create_dir_all(dir.join("secrets/sitedb")).expect("secret dir");
    std::fs::write(dir.join("secrets/sitedb/url"), url).expect("secret written");
    let mut yaml = String::new();
    for t in tables {
        yaml.push_str(&format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata:\n  name: {tag}\n\
             spec:\n  localSubnet: 192.168.0.0/16\n  remoteSubnet: {net}\n\
             \x20 peerId: \"*.{tag}.example\"\n  localId: gw.example\n  role: Both\n\
             ---\napiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata:\n  name: {tag}\n\
             spec:\n  eroute: {tag}\n  remoteSubnetPrefix: {PREFIX}\n  maxDynamicEroutes: {MAX_DYNAMIC}\n\
             \x20 database:\n    urlSecretRef: {{name: sitedb, key: url}}\n    table: {name}\n    timeout: 10s\n---\n",
            tag = t.tag,
            net = t.base_net(),
            name = t.name,
        ));
    }
    std::fs::write(dir.join("bench.yaml"), yaml).expect("config written");
}

/// Grows the buffer pool as MariaDB's root (unix-socket authentication: only as root).
fn grow_buffer_pool(db: &MariaDb, size: &str) -> Result<(), String> {
    if size == "0" {
        return Err("SITE_BENCH_BUFFER_POOL=0".into());
    }
    let bytes = parse_size(size).ok_or_else(|| format!("'{size}' is not a size"))?;
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-uroot"])
        .arg(format!("--socket={}", db.socket_path().display()))
        .arg("-e")
        .arg(format!("SET GLOBAL innodb_buffer_pool_size = {bytes}"))
        .output()
        .map_err(|e| format!("mariadb client: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mul = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<u64>().ok().map(|d| d * mul)
}

/// Each measurement is split in this many rounds, alternating the tables (or connections)
/// compared, so that load from elsewhere on a shared machine falls on both alike.
const ROUNDS: usize = 4;

/// What one run measures with.
struct Bench {
    store: SiteStore,
    pool: MySqlPool,
    set: ValidatedSet,
    /// Small table, then large.
    tables: [(Table, SiteTable); 2],
    /// The batched path, per table.
    batched: [SiteLookups; 2],
    n: usize,
}

/// Everything measured against one buffer pool size.
struct Phase {
    label: String,
    /// Per load and path: small, large.
    lookups: Vec<(Load, &'static str, [Stats; 2])>,
    /// Per table: creations and evictions.
    creations: [(Stats, usize); 2],
}

impl Bench {
    /// `load` on both tables and both paths (statement each, batched), alternating in rounds.
    async fn pairs(&self, load: Load, seed: u64) -> [(&'static str, [Stats; 2]); 2] {
        let mut out: [(&'static str, [Stats; 2]); 2] = Default::default();
        for r in 0..ROUNDS {
            for (p, o) in out.iter_mut().enumerate() {
                for (k, (t, st)) in self.tables.iter().enumerate() {
                    let path = if p == 0 {
                        Path::Single(self.store.clone())
                    } else {
                        Path::Batched(self.batched[k].clone())
                    };
                    o.0 = path.label();
                    let seed = mix(seed ^ (r * 4 + p * 2 + k) as u64);
                    let s = lookups(&path, &self.pool, st, t, self.n / ROUNDS, load, seed).await;
                    o.1[k].merge(s);
                }
            }
        }
        out
    }

    async fn phase(&self, label: String, egroups: &mut Egroups, seed: u64) -> Phase {
        let mut measured = Vec::new();
        for load in [Load::Concurrent(1), Load::Concurrent(CONCURRENCY)] {
            for (path, s) in self.pairs(load, mix(seed ^ measured.len() as u64)).await {
                measured.push((load, path, s));
            }
        }
        // Open loop at half of what the slower table sustained at concurrency 64, a
        // statement each.
        let capacity = measured[2]
            .2
            .iter()
            .map(Stats::per_second)
            .fold(f64::MAX, f64::min);
        let load = Load::Rate((capacity / 2.0).round());
        for (path, s) in self.pairs(load, mix(seed ^ 7)).await {
            measured.push((load, path, s));
        }
        let mut created = [(Stats::default(), 0), (Stats::default(), 0)];
        for r in 0..ROUNDS {
            for (k, (t, _)) in self.tables.iter().enumerate() {
                let seed = mix(seed ^ 0xc0ffee ^ (r * 2 + k) as u64);
                let (s, evicted) = creations(egroups, &self.set, &self.pool, t, self.n / ROUNDS, seed).await;
                created[k].0.merge(s);
                created[k].1 += evicted;
            }
        }
        Phase {
            label,
            lookups: measured,
            creations: created,
        }
    }
}

fn load_label(l: Load) -> String {
    match l {
        Load::Concurrent(c) => format!("{c} at a time"),
        Load::Rate(r) => format!("{r:.0}/s open loop"),
    }
}

fn print_phase(b: &Bench, p: &Phase) {
    let [(small, _), (large, _)] = &b.tables;
    println!("{}:", p.label);
    println!(
        "  {:<40} {:<12} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "lookups", "table", "rows", "p50 ms", "p99 ms", "max ms", "per s", "disk", "stmts", "gw us", "db us"
    );
    for (load, path, s) in &p.lookups {
        for (k, t) in [small, large].into_iter().enumerate() {
            let label = if k == 0 {
                format!("{}, {path}", load_label(*load))
            } else {
                String::new()
            };
            println!(
                "  {label:<40} {:<12} {:>9} {:>8.3} {:>8.3} {:>8.2} {:>9.0} {:>6.2} {:>6.3} {:>6.0} {:>6.0}",
                t.name,
                t.rows,
                s[k].pct(50),
                s[k].pct(99),
                s[k].max(),
                s[k].per_second(),
                s[k].reads_per_op(),
                s[k].statements_per_op(),
                s[k].cpu_us_per_op().0,
                s[k].cpu_us_per_op().1
            );
        }
    }
    for (k, t) in [small, large].into_iter().enumerate() {
        let (s, evicted) = &p.creations[k];
        let label = if k == 0 {
            format!("creations, {CONCURRENCY} at a time, batched")
        } else {
            String::new()
        };
        println!(
            "  {label:<40} {:<12} {:>9} {:>8.3} {:>8.3} {:>8.2} {:>9.0} {:>6.2} {:>6.3} {:>6.0} {:>6.0}  ({evicted} LRU evictions)",
            t.name,
            t.rows,
            s.pct(50),
            s.pct(99),
            s.max(),
            s.per_second(),
            s.reads_per_op(),
            s.statements_per_op(),
            s.cpu_us_per_op().0,
            s.cpu_us_per_op().1
        );
    }
    println!(
        "  large / small per-lookup cost ({} / {} rows):",
        large.rows, small.rows
    );
    for (load, path, s) in &p.lookups {
        let [a, z] = s;
        print!("    {path}: ");
        match load {
            Load::Concurrent(1) => println!(
                "1 at a time, mean latency {:.2}x (p50 {:.2}x, p99 {:.2}x)",
                z.mean() / a.mean(),
                z.pct(50) / a.pct(50),
                z.pct(99) / a.pct(99)
            ),
            Load::Concurrent(c) => println!(
                "{c} at a time, 1 / throughput {:.2}x (p99 {:.2}x)",
                a.per_second() / z.per_second(),
                z.pct(99) / a.pct(99)
            ),
            Load::Rate(_) => println!(
                "open loop, mean latency {:.2}x (p99 {:.2}x)",
                z.mean() / a.mean(),
                z.pct(99) / a.pct(99)
            ),
        }
    }
    let [(a, _), (z, _)] = &p.creations;
    println!("    creations, 1 / rate {:.2}x", a.per_second() / z.per_second());
    println!(
        "  batched / statement each (per table: {} rows, {} rows):",
        small.rows, large.rows
    );
    for pair in p.lookups.chunks(2) {
        let [(load, _, single), (_, _, batched)] = pair else {
            continue;
        };
        let ratio = |f: &dyn Fn(&Stats) -> f64| {
            format!(
                "{:.2}x, {:.2}x",
                f(&batched[0]) / f(&single[0]),
                f(&batched[1]) / f(&single[1])
            )
        };
        println!(
            "    {}: p50 {}; p99 {}; throughput {}; CPU per lookup gw {}, db {}",
            load_label(*load),
            ratio(&|s| s.pct(50)),
            ratio(&|s| s.pct(99)),
            ratio(&Stats::per_second),
            ratio(&|s| s.cpu_us_per_op().0),
            ratio(&|s| s.cpu_us_per_op().1),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run explicitly (see the file's doc)"]
async fn site_lookup_latency_small_vs_large_table() {
    if prereq::require(&[mariadb::TOOLS]).is_skip() {
        return;
    }
    let rows = env_u64("SITE_BENCH_ROWS", 1_000_000).clamp(1, 1 << 20);
    let n = usize::try_from(env_u64("SITE_BENCH_LOOKUPS", 20_000)).expect("fits");
    let n = n.max(CONCURRENCY * ROUNDS) / ROUNDS * ROUNDS;
    let small = Table {
        tag: "small",
        name: "sites_small",
        rows: SMALL_ROWS.min(rows),
        base: Ipv4Addr::new(172, 16, 0, 0),
        base_len: 12,
    };
    let large = Table {
        tag: "large",
        name: "sites",
        rows,
        base: Ipv4Addr::new(10, 0, 0, 0),
        base_len: 8,
    };

    let db = MariaDb::start().expect("private MariaDB starts");
    if let Some(dir) = db.socket_path().parent()
        && let Ok(pid) = std::fs::read_to_string(dir.join("mariadbd.pid"))
    {
        let _ = SERVER_PID.set(pid.trim().to_owned());
    }
    let store = SiteStore::open_url(&db.url(), Duration::from_secs(10))
        .await
        .expect("store opens");
    store.migrate().await.expect("documented schema applies");
    let SiteStore::MySql(pool) = &store else {
        panic!("mysql:// opened {}", store.kind());
    };
    let pool = pool.clone();
    // The small table: the same documented schema, indexes included.
    sqlx::query("CREATE TABLE sites_small LIKE sites")
        .execute(&pool)
        .await
        .expect("small table");
    let load_small = load(&pool, &small).await;
    let load_large = load(&pool, &large).await;
    let mut sizes = BTreeMap::new();
    for t in [&small, &large] {
        // Fresh statistics, so that the sizes below are the tables' own.
        sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE TABLE `{}`", t.name)))
            .execute(&pool)
            .await
            .expect("analyze");
        let (data, index): (u64, u64) = sqlx::query_as(
            "SELECT CAST(DATA_LENGTH AS UNSIGNED), CAST(INDEX_LENGTH AS UNSIGNED) \
             FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
        .bind(t.name)
        .fetch_one(&pool)
        .await
        .expect("table size");
        sizes.insert(t.name, (data + index) as f64 / f64::from(1 << 20));
    }
    let explain = sqlx::raw_sql(AssertSqlSafe(format!(
        "EXPLAIN SELECT peer_id, psk, remote_subnet, peer_address, backup_peer_address FROM sites \
         WHERE peer_id = '{}' LIMIT 2",
        large.peer_id(rows / 2)
    )))
    .fetch_one(&pool)
    .await
    .expect("explain");
    let key: Option<String> = explain.try_get("key").expect("key");
    let examined = explain
        .try_get::<Option<u64>, _>("rows")
        .map(|r| r.map_or("NULL".to_owned(), |r| r.to_string()))
        .or_else(|_| {
            explain
                .try_get::<Option<String>, _>("rows")
                .map(|r| r.unwrap_or_default())
        })
        .unwrap_or_else(|e| format!("? ({e})"));
    let harness_pool_mb = variable(&pool, "innodb_buffer_pool_size").await >> 20;

    // The egroups the gateway would build from this configuration, on the same server.
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &db.url(), &[&small, &large]);
    let cfg = config::load_dir(dir.path()).expect("bench config loads");
    let mut egroups = Egroups::open(&cfg, &store).await.expect("egroups open");
    let set = cfg.set.clone();
    let table_of = |t: &Table| (t.clone(), set.egroups[t.tag].site_table.clone());
    let tables = [table_of(&small), table_of(&large)];
    let batched = tables
        .clone()
        .map(|(_, st)| SiteLookups::new("bench", store.clone(), st, Duration::from_secs(10)));
    let bench = Bench {
        tables,
        batched,
        store: store.clone(),
        pool: pool.clone(),
        set: set.clone(),
        n,
    };

    // Open the pool's connections and prepare the statement before measuring.
    let warm = n.min(2_000);
    for (k, (t, st)) in bench.tables.iter().enumerate() {
        for path in [
            Path::Single(store.clone()),
            Path::Batched(bench.batched[k].clone()),
        ] {
            let _ = lookups(&path, &pool, st, t, warm, Load::Concurrent(CONCURRENCY), 1).await;
        }
    }
    let mut phases = vec![
        bench
            .phase(
                format!("InnoDB buffer pool {harness_pool_mb} MB (the e2e harness's)"),
                &mut egroups,
                11,
            )
            .await,
    ];

    // The same over the unix socket (a gateway in a network namespace reaches the server
    // through it), alternating with TCP, on the large table.
    let socket_url = format!(
        "mysql://{}:{}@localhost/{}?socket={}",
        mariadb::USER,
        db.password(),
        mariadb::DATABASE,
        db.socket_path().display()
    );
    let socket_store = SiteStore::open_url(&socket_url, Duration::from_secs(10))
        .await
        .expect("socket store");
    let (lt, lst) = &bench.tables[1];
    let _ = lookups(
        &Path::Single(socket_store.clone()),
        &pool,
        lst,
        lt,
        warm,
        Load::Concurrent(CONCURRENCY),
        2,
    )
    .await;
    let mut socket = Vec::new();
    for conc in [1, CONCURRENCY] {
        let mut s = [Stats::default(), Stats::default()];
        for r in 0..ROUNDS {
            for (k, st) in [&store, &socket_store].into_iter().enumerate() {
                let st = &Path::Single(st.clone());
                let seed = mix(0x50c ^ (r * 2 + k) as u64);
                let one = lookups(st, &pool, lst, lt, n / ROUNDS, Load::Concurrent(conc), seed).await;
                s[k].merge(one);
            }
        }
        socket.push((conc, s));
    }
    socket_store.close().await;
    let (coalesced_queries, coalesced_took) = coalescing(&egroups, &pool, lt).await;

    // As root: grow the buffer pool past the large table, read it in, measure both again.
    let pool_size = std::env::var("SITE_BENCH_BUFFER_POOL").unwrap_or_else(|_| "512M".into());
    let grown = grow_buffer_pool(&db, &pool_size);
    if grown.is_ok() {
        // Resizing runs in the background: wait until the server reports the new size.
        let want = parse_size(&pool_size).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while variable(&pool, "innodb_buffer_pool_size").await < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mb = variable(&pool, "innodb_buffer_pool_size").await >> 20;
        for t in ["sites_small", "sites"] {
            let _: (i64,) = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT COUNT(psk) FROM `{t}` FORCE INDEX (PRIMARY)"
            )))
            .fetch_one(&pool)
            .await
            .expect("scan");
        }
        let label = format!("InnoDB buffer pool {mb} MB, both tables read in first");
        phases.push(bench.phase(label, &mut egroups, 13).await);
    }

    println!();
    println!("MariaDB site store, documented schema (SiteStore::migrate), pool of 16 connections over TCP;");
    println!(
        "{} rows loaded in {:.1} s ({:.0} rows/s, {BATCH} per INSERT), {} in {:.1} s;",
        large.rows,
        load_large.as_secs_f64(),
        large.rows as f64 / load_large.as_secs_f64(),
        small.rows,
        load_small.as_secs_f64()
    );
    println!(
        "{}: {:.1} MB, {}: {:.1} MB (data + indexes); EXPLAIN of the lookup: key {}, rows {examined}.",
        small.name,
        sizes["sites_small"],
        large.name,
        sizes["sites"],
        key.as_deref().unwrap_or("NONE"),
    );
    println!(
        "{n} random existing sites per row, in {ROUNDS} rounds alternating the tables; latency in ms; \
         disk = InnoDB pages read from disk per lookup; \
         gw us, db us = CPU microseconds per lookup of this process (tokio, sqlx) and of mariadbd."
    );
    println!();
    for p in &phases {
        print_phase(&bench, p);
        println!();
    }
    println!("unix socket vs TCP, {} (harness buffer pool):", lt.name);
    for (conc, [tcp, sock]) in &socket {
        println!(
            "  {conc:>2} at a time: TCP p50 {:.3} p99 {:.3} ms {:.0}/s; socket p50 {:.3} p99 {:.3} ms {:.0}/s; socket / TCP throughput {:.2}x",
            tcp.pct(50),
            tcp.pct(99),
            tcp.per_second(),
            sock.pct(50),
            sock.pct(99),
            sock.per_second(),
            sock.per_second() / tcp.per_second()
        );
    }
    println!(
        "{CONCURRENCY} simultaneous connects of one site (Egroups::lookup_by_peer): {coalesced_queries} statement(s) \
         executed by the server, all answered in {:.2} ms",
        ms(coalesced_took)
    );
    if let Err(why) = grown {
        println!("buffer pool not grown (needs root): {why}");
    }
    store.close().await;
    assert!(
        phases
            .iter()
            .all(|p| p.creations.iter().all(|(s, _)| s.per_second() > 0.0))
    );
}
