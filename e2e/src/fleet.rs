//! A fleet of gateway pods behind one front address, as a Kubernetes Service would put them:
//!
//! ```text
//!  sites (192.0.2.1x) ── WAN br0 ── front (192.0.2.2 = the Service address)
//!                                     │ DNAT UDP 500/4500 to a pod, conntrack, affinity
//!                                   pod0 10.244.0.1 (the pods' default gateway)
//!                                     │
//!              pod network br0 ───────┼──────────┬──────────┐
//!                 etcd 10.244.0.2   gw-0 .10   gw-1 .11   gw-2 .12 ...
//! ```
//!
//! * [`Fleet::new`] builds the networks, the [`Front`] (kube-proxy in nftables, see
//!   [`front`]), a private etcd in its own namespace on the pod network
//!   ([`crate::etcd::Etcd::start_in`]) and one namespace per pod (its pod IP, the head-end
//!   LAN address on `lo`, a default route via the front), and writes the fleet key. No
//!   gateway runs yet: the caller fills each pod's data dir ([`Pod::data_dir`]) if it needs
//!   to, then calls [`Fleet::start_pods`], which starts `concentrator-gateway` in every pod
//!   with the `--fleet-*` flags and waits until every pod counts all members, one leads, and
//!   the shard map in etcd gives every pod its share ([`Fleet::wait_settled`]).
//!   [`Fleet::start`] does both.
//! * Pods are `gw-0`, `gw-1`, ... (StatefulSet ordinals: their member IDs), each with its
//!   own data dir and `gateway.log`, one shared config dir. `RUST_LOG` of the test process
//!   reaches the gateways (`RUST_LOG=debug cargo test ...` for debug logs).
//! * [`Fleet::kill_pod`] and [`Fleet::start_pod`] kill and restart one pod's gateway (its
//!   namespace and address stay); [`Front::remove_endpoint`] takes it out of the Service.
//! * [`sites`]: strongSwan sites on the WAN that address the front.
//! * [`vip`]: the VIP front's per-pod addresses, which the director redirects sites to.
//! * For tunnels the pods start ([`headend`]): [`FleetOptions::lan`] joins a head-end LAN
//!   bridge with a LAN host to every pod ([`Fleet::lan`]), and [`FleetOptions::pod_egress`]
//!   has the node SNAT the flows pods start toward the WAN, as a Kubernetes node does.
//!
//! Dropping the fleet kills the gateways, then etcd, then deletes every namespace.

pub mod front;
pub mod headend;
pub mod sites;
pub mod vip;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concentrator_fleet::{SHARDS, Shard, ShardMap};
use ipnet::IpNet;
use tempfile::TempDir;

pub use front::{Affinity, Flow, Front};
pub use headend::Lan;

use crate::etcd::Etcd;
use crate::netns::{Netns, Wan, addr};
use crate::pki::ADMIN_SERVER_NAME;
use crate::process::Daemon;
use crate::tools::{self, Tool};
use crate::topology::{GW_ADDR, GW_HOST, GW_LAN};
use crate::wait::{self, Probe};
use crate::{gateway, ids, logs, scratch};

/// What this module needs (with [`crate::netns::TOOLS`] and [`crate::etcd::TOOLS`]).
pub const TOOLS: &[Tool] = &[tools::NFT, tools::CONNTRACK, tools::CURL, tools::ETCD];

/// The pod network.
pub const POD_NET: &str = "10.244.0.0/24";
/// The front's address on the pod network: the pods' default gateway.
pub const FRONT_POD_ADDR: &str = "10.244.0.1";
/// etcd's address on the pod network.
pub const ETCD_ADDR: &str = "10.244.0.2";
/// The UDP port pods forward to each other on (`--fleet-address` without a port).
pub const FLEET_PORT: u16 = 4510;
/// The prefix of the gateway's metric names.
pub const METRIC_PREFIX: &str = "concentrator_gateway_";

/// The gateway's default `--fleet-prefix`: where the fleet keeps its keys in etcd.
pub const ETCD_PREFIX: &str = "/concentrator";

/// How long pods may take to find each other and elect a leader.
pub const MEMBERS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway may take to log "gateway ready".
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Pod `i`'s IP, 10.244.0.{10 + i}.
pub fn pod_ip(i: usize) -> IpAddr {
    addr(&format!("10.244.0.{}", 10 + i))
}

/// Pod `i`'s name and fleet member name, `gw-{i}`.
pub fn pod_name(i: usize) -> String {
    format!("gw-{i}")
}

/// The full name of gateway metric `name` (`fleet_members` →
/// `concentrator_gateway_fleet_members`); names that have the prefix stay as they are.
pub fn metric_name(name: &str) -> String {
    if name.starts_with(METRIC_PREFIX) {
        name.to_owned()
    } else {
        format!("{METRIC_PREFIX}{name}")
    }
}

/// How to build a fleet.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Number of pods.
    pub pods: usize,
    /// The front's session affinity.
    pub affinity: Affinity,
    /// The `concentrator-gateway` binary.
    pub gateway_bin: PathBuf,
    /// The config dir every pod reads (Eroutes, Egroups, Secrets).
    pub config_dir: PathBuf,
    /// More gateway arguments, after the ones the fleet sets.
    pub gateway_args: Vec<String>,
    /// More environment of the gateways (the test's own is inherited).
    pub gateway_env: Vec<(String, String)>,
    /// `--fleet-lease-ttl`.
    pub lease_ttl: Duration,
    /// The Service address the sites talk to.
    pub front_address: IpAddr,
    /// The head-end LAN address each pod has on `lo` (`None`: none).
    pub pod_lan: Option<IpNet>,
    /// The head-end LAN as a bridge joined to every pod, with a LAN host ([`Lan`]);
    /// `None`: no bridge. Not with [`Self::pod_lan`] (one prefix, two places).
    pub lan: Option<IpNet>,
    /// Whether the node SNATs the flows pods start toward the WAN to the front address
    /// ([`headend::enable_node_egress`]), which initiating pods need. Off, a pod can only
    /// answer in flows the front DNAT'd to it, and anything else it sends to the WAN is
    /// dropped as stray ([`Front::stray_packets`]).
    pub pod_egress: bool,
}

impl FleetOptions {
    /// `pods` pods behind a front with `affinity`, lease TTL 3 s, the front at
    /// [`GW_ADDR`] and [`GW_HOST`]/24 on every pod's `lo`.
    pub fn new(
        pods: usize,
        affinity: Affinity,
        gateway_bin: impl Into<PathBuf>,
        config_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            pods,
            affinity,
            gateway_bin: gateway_bin.into(),
            config_dir: config_dir.into(),
            gateway_args: Vec::new(),
            // Plain log files: no terminal colour codes.
            gateway_env: vec![("NO_COLOR".to_owned(), "1".to_owned())],
            lease_ttl: Duration::from_secs(3),
            front_address: addr(GW_ADDR),
            pod_lan: Some(format!("{GW_HOST}/24").parse().expect("valid prefix")),
            lan: None,
            pod_egress: false,
        }
    }

    /// Options for pods that initiate to sites: [`Self::head_end_lan`] and pod egress
    /// through the node's SNAT.
    #[must_use]
    pub fn initiating(self) -> Self {
        let mut o = self.head_end_lan();
        o.pod_egress = true;
        o
    }

    /// [`GW_LAN`] as a LAN bridge joined to every pod (instead of on each pod's `lo`), whose
    /// host may send a site's traffic through any pod; no pod egress: anything a pod starts
    /// toward the WAN is stray (responders never need it).
    #[must_use]
    pub fn head_end_lan(mut self) -> Self {
        self.pod_lan = None;
        self.lan = Some(GW_LAN.parse().expect("valid prefix"));
        self
    }
}

/// One gateway pod: its namespace, its files, its gateway while it runs.
#[derive(Debug)]
pub struct Pod {
    index: usize,
    ns: Netns,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl Pod {
    /// The pod's ordinal.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `gw-{index}`.
    pub fn name(&self) -> String {
        pod_name(self.index)
    }

    /// The pod IP.
    pub fn ip(&self) -> IpAddr {
        pod_ip(self.index)
    }

    /// The pod's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The gateway's `--data-dir` (created, possibly empty).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The gateway's output.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("gateway.log")
    }

    /// The last `lines` lines of the gateway's output.
    pub fn log_tail(&self, lines: usize) -> String {
        format!("{}:\n{}", self.name(), logs::tail(&self.log_path(), lines))
    }

    /// A metric of this pod's gateway, summed over the label sets whose line starts with
    /// `name` ([`metric_name`] adds the prefix).
    pub fn metric(&self, name: &str) -> Result<f64> {
        gateway::metric(&self.ns, &metric_name(name)).with_context(|| format!("metrics of {}", self.name()))
    }

    /// Every sample of the metrics starting with `name`, as `(name{labels}, value)`.
    pub fn samples(&self, name: &str) -> Result<Vec<(String, f64)>> {
        let name = metric_name(name);
        let text = self
            .ns
            .run(tools::CURL.path(), &["-sf", "http://127.0.0.1:9090/metrics"])?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&name))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect())
    }

    /// The pod's admin TLS files (its certificate serves and asks the other pods).
    pub fn admin_tls_dir(&self) -> PathBuf {
        self.dir.join("admin-tls")
    }

    /// `concentrator-gateway tunnels` in the pod (its admin API on the pod's loopback,
    /// over mutual TLS with the pod's certificate).
    pub fn tunnels(&self, bin: &Path) -> Result<String> {
        self.admin_command(bin, &["tunnels"])
    }

    /// `concentrator-gateway tunnels --fleet` in the pod: every member's tunnels, each
    /// line ending with the member that holds it.
    pub fn fleet_tunnels(&self, bin: &Path) -> Result<String> {
        self.admin_command(bin, &["tunnels", "--fleet"])
    }

    /// `concentrator-gateway drain` in the pod with `args` (`--wait`, `--cancel`, ...):
    /// its output (`draining: 12 tunnels left`).
    pub fn drain(&self, bin: &Path, args: &[&str]) -> Result<String> {
        let mut all = vec!["drain"];
        all.extend_from_slice(args);
        self.admin_command(bin, &all)
    }

    /// Whether the gateway's `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        self.ns
            .run(tools::CURL.path(), &["-sf", "http://127.0.0.1:9090/readyz"])
            .is_ok()
    }

    fn admin_command(&self, bin: &Path, args: &[&str]) -> Result<String> {
        let tls = self.admin_tls_dir();
        let tls = tls.to_str().context("non-UTF-8 path")?;
        let mut all = vec!["--admin-tls-dir", tls];
        all.extend_from_slice(args);
        self.ns.run(bin, &all)
    }
}

/// The whole fleet. Fields drop in order: gateways first, the networks last.
#[derive(Debug)]
pub struct Fleet {
    pods: Vec<Pod>,
    lan: Option<Lan>,
    etcd: Etcd,
    front: Front,
    etcd_ns: Netns,
    pod_net: Wan,
    wan: Wan,
    options: FleetOptions,
    key_file: PathBuf,
    dir: Option<TempDir>,
}

impl Fleet {
    /// [`Self::new`], then [`Self::start_pods`].
    pub fn start(options: FleetOptions) -> Result<Self> {
        let mut fleet = Self::new(options)?;
        fleet.start_pods()?;
        Ok(fleet)
    }

    /// The networks, the front, etcd and the pods' namespaces; no gateway runs yet.
    pub fn new(options: FleetOptions) -> Result<Self> {
        ensure!(
            (1..=200).contains(&options.pods),
            "a fleet has 1 to 200 pods, not {}",
            options.pods
        );
        ensure!(
            options.lan.is_none() || options.pod_lan.is_none(),
            "the head-end LAN is either on each pod's lo or a bridge, not both"
        );
        let dir = scratch::dir("fleet")?;
        let wan = Wan::new()?;
        let pod_net = Wan::named("pods")?;
        let pod_prefix = |a: &str| -> Result<IpNet> { Ok(format!("{a}/24").parse()?) };
        let pods_ips: Vec<IpAddr> = (0..options.pods).map(pod_ip).collect();
        let front = Front::new(
            &wan,
            &pod_net,
            options.front_address,
            pod_prefix(FRONT_POD_ADDR)?,
            pods_ips,
            options.affinity,
        )?;
        let etcd_ns = Netns::new("etcd")?;
        pod_net.attach(&etcd_ns, "eth0", pod_prefix(ETCD_ADDR)?)?;
        let etcd = Etcd::start_in(&etcd_ns, addr(ETCD_ADDR))?;

        // 32 random bytes, the same file for every pod.
        let key: Vec<u8> = (0..4).flat_map(|_| ids::random_u64().to_le_bytes()).collect();
        let key_file = dir.path().join("fleet.key");
        std::fs::write(&key_file, key)?;

        // The admin API listens on every address, so (as in a cluster) over mutual TLS: one
        // CA, a certificate per pod.
        let ca = crate::pki::TestCa::new("fleet admin CA")?;
        let mut pods = Vec::with_capacity(options.pods);
        for i in 0..options.pods {
            let ns = Netns::new(&format!("gw{i}"))?;
            pod_net.attach(&ns, "eth0", IpNet::new(pod_ip(i), 24)?)?;
            ns.ip(&["route", "add", "default", "via", FRONT_POD_ADDR])?;
            if let Some(lan) = options.pod_lan {
                ns.add_lo_addr(lan)?;
            }
            if options.pod_egress {
                headend::enable_pod_egress(&ns)?;
            }
            let pod_dir = dir.path().join(pod_name(i));
            std::fs::create_dir_all(pod_dir.join("data"))?;
            ca.issue(&pod_dir.join("admin-tls"), &[ADMIN_SERVER_NAME])?;
            pods.push(Pod {
                index: i,
                ns,
                dir: pod_dir,
                daemon: None,
            });
        }
        if options.pod_egress {
            headend::enable_node_egress(&front, &pod_net)?;
        }
        let lan = match options.lan {
            Some(subnet) => Some(Lan::new(subnet, &pods.iter().map(|p| &p.ns).collect::<Vec<_>>())?),
            None => None,
        };
        Ok(Self {
            pods,
            lan,
            etcd,
            front,
            etcd_ns,
            pod_net,
            wan,
            options,
            key_file,
            dir: Some(dir),
        })
    }

    /// Starts every pod's gateway (all at once), waits until each logs "gateway ready",
    /// then until every pod counts all of them as members and exactly one leads, then until
    /// the shard map gives each its share ([`Self::wait_settled`]).
    pub fn start_pods(&mut self) -> Result<()> {
        for i in 0..self.pods.len() {
            self.spawn_pod(i)?;
        }
        for pod in &mut self.pods {
            let name = pod.name();
            if let Some(d) = pod.daemon.as_mut() {
                gateway::wait_ready(d, READY_TIMEOUT).with_context(|| format!("{name} did not start"))?;
            }
        }
        let n = self.pods.len();
        self.wait_members(n, MEMBERS_TIMEOUT)?;
        self.wait_settled(&(0..n).collect::<Vec<_>>(), MEMBERS_TIMEOUT)
    }

    /// (Re)starts pod `i`'s gateway (killing a running one first) and waits until it logs
    /// "gateway ready" (not for the fleet: see [`Self::wait_members`]).
    pub fn start_pod(&mut self, i: usize) -> Result<()> {
        self.spawn_pod(i)?;
        let pod = &mut self.pods[i];
        let name = pod.name();
        let d = pod.daemon.as_mut().context("just spawned")?;
        gateway::wait_ready(d, READY_TIMEOUT).with_context(|| format!("{name} did not start"))
    }

    fn spawn_pod(&mut self, i: usize) -> Result<()> {
        ensure!(i < self.pods.len(), "no pod {i}");
        // The new one binds the same addresses.
        self.kill_pod(i);
        let o = &self.options;
        let pod = &self.pods[i];
        let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
        let ip = pod.ip().to_string();
        let mut args = vec![
            "--config-dir".to_owned(),
            path(&o.config_dir)?,
            "--data-dir".to_owned(),
            path(&pod.data_dir())?,
            "--ike-listen".to_owned(),
            ip.clone(),
            "--fleet-etcd".to_owned(),
            self.etcd.endpoint(),
            "--fleet-member".to_owned(),
            pod.name(),
            "--fleet-address".to_owned(),
            ip,
            "--fleet-key-file".to_owned(),
            path(&self.key_file)?,
            "--fleet-lease-ttl".to_owned(),
            format!("{}ms", o.lease_ttl.as_millis()),
            // On every address, as in a pod: the members ask each other for their tunnels.
            "--admin-listen".to_owned(),
            "0.0.0.0:50051".to_owned(),
            "--admin-tls-dir".to_owned(),
            path(&pod.admin_tls_dir())?,
        ];
        args.extend(o.gateway_args.iter().cloned());
        let mut cmd: Command = pod.ns.command(&o.gateway_bin);
        cmd.args(&args).envs(o.gateway_env.iter().map(|(k, v)| (k, v)));
        let daemon = Daemon::spawn(&pod.name(), cmd, &pod.log_path())?;
        self.pods[i].daemon = Some(daemon);
        Ok(())
    }

    /// An error (with its log tail) if a pod's gateway that was started has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for pod in &mut self.pods {
            if let Some(d) = pod.daemon.as_mut() {
                d.ensure_running()?;
            }
        }
        Ok(())
    }

    /// Whether pod `i`'s gateway was started and not killed (see [`Self::check_running`]
    /// for one that died by itself).
    pub fn is_started(&self, i: usize) -> bool {
        self.pods[i].daemon.is_some()
    }

    /// Kills pod `i`'s gateway (SIGKILL: no word to etcd or the others), as a node failure
    /// would. Its namespace, address and files stay.
    pub fn kill_pod(&mut self, i: usize) {
        if let Some(mut d) = self.pods[i].daemon.take() {
            d.kill();
        }
    }

    /// Waits until pod `i`'s gateway exits by itself; its exit status. The pod counts as
    /// not started afterwards.
    pub fn wait_pod_exit(&mut self, i: usize, timeout: Duration) -> Result<std::process::ExitStatus> {
        let name = self.pods[i].name();
        let d = self.pods[i]
            .daemon
            .as_mut()
            .with_context(|| format!("{name} does not run"))?;
        let status = wait::until(format!("{name} to exit"), timeout, || {
            Ok(match d.exit_status()? {
                Some(st) => Probe::Ready(st),
                None => Probe::pending(d.log_tail(5)),
            })
        })?;
        self.pods[i].daemon = None;
        Ok(status)
    }

    /// Stops pod `i`'s gateway with SIGTERM, as Kubernetes does when it deletes a pod (see
    /// [`Self::wait_pod_exit`]).
    pub fn terminate_pod(&self, i: usize) -> Result<()> {
        self.signal_pod(i, "-TERM")
    }

    /// Freezes pod `i`'s gateway (SIGSTOP), as a stalled node or a paused VM would: it
    /// neither answers nor sends, and wakes up later with its old state ([`Self::thaw_pod`]).
    pub fn freeze_pod(&self, i: usize) -> Result<()> {
        self.signal_pod(i, "-STOP")
    }

    /// Wakes a frozen pod (SIGCONT).
    pub fn thaw_pod(&self, i: usize) -> Result<()> {
        self.signal_pod(i, "-CONT")
    }

    fn signal_pod(&self, i: usize, signal: &str) -> Result<()> {
        let pid = self.pods[i]
            .daemon
            .as_ref()
            .with_context(|| format!("pod {i} does not run"))?
            .pid()
            .to_string();
        let mut cmd = Command::new("kill");
        cmd.args([signal, &pid]);
        crate::process::run(&mut cmd, crate::process::COMMAND_TIMEOUT).map(drop)
    }

    /// Waits until every running pod counts `members` members and exactly one of them is
    /// the leader.
    pub fn wait_members(&mut self, members: usize, timeout: Duration) -> Result<()> {
        let want = members as f64;
        let result = wait::until(
            format!("{members} fleet members seen by every pod"),
            timeout,
            || {
                let mut seen = Vec::new();
                let mut leaders = 0.0;
                for pod in &mut self.pods {
                    let Some(d) = pod.daemon.as_mut() else {
                        continue;
                    };
                    d.ensure_running()?;
                    let n = pod.metric("fleet_members");
                    let l = pod.metric("fleet_leader");
                    leaders += l.as_ref().copied().unwrap_or(0.0);
                    seen.push(format!(
                        "{}: members {} leader {}",
                        pod.name(),
                        n.as_ref().map_or_else(|e| format!("{e:#}"), f64::to_string),
                        l.as_ref().map_or_else(|e| format!("{e:#}"), f64::to_string)
                    ));
                    if n.ok() != Some(want) {
                        return Ok(Probe::pending(seen.join("; ")));
                    }
                }
                Ok(if (leaders - 1.0).abs() < f64::EPSILON {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!("{} leaders: {}", leaders, seen.join("; ")))
                })
            },
        );
        result.with_context(|| self.log_tails(20))
    }

    /// The shard map in etcd (`{prefix}/fleet/shards`), decoded with the gateway's codec;
    /// `None` before the first leader wrote one.
    pub fn shard_map(&self) -> Result<Option<ShardMap>> {
        let key = format!("{ETCD_PREFIX}/fleet/shards");
        let kvs = self.etcd.range(&key)?;
        let Some(kv) = kvs.into_iter().find(|kv| kv.key == key) else {
            return Ok(None);
        };
        Ok(Some(
            ShardMap::decode(&kv.value).with_context(|| format!("decoding {key}"))?,
        ))
    }

    /// Waits until the shard map has settled on `members` (pod ordinals): each owns its
    /// share of the shards (`SHARDS / n`, or one more) and no shard is moving. Until then a
    /// member that joined last owns no shard, and new sites are placed on the others only.
    pub fn wait_settled(&self, members: &[usize], timeout: Duration) -> Result<()> {
        let share = usize::from(SHARDS) / members.len().max(1);
        wait::until(
            format!("the shard map to settle on pods {members:?}"),
            timeout,
            || {
                let Some(map) = self.shard_map()? else {
                    return Ok(Probe::pending("no shard map yet"));
                };
                let mut owned: BTreeMap<Option<u16>, usize> = BTreeMap::new();
                let mut moving = 0;
                for s in Shard::all() {
                    let e = map.entry(s);
                    *owned.entry(e.owner.map(|m| m.0)).or_default() += 1;
                    moving += usize::from(e.moving_to.is_some());
                }
                let fair = members.iter().all(|m| {
                    u16::try_from(*m)
                        .ok()
                        .and_then(|m| owned.get(&Some(m)))
                        .is_some_and(|n| (share..=share + 1).contains(n))
                });
                Ok(if fair && moving == 0 && owned.len() == members.len() {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!(
                        "map version {}: shards by owner {owned:?}, {moving} moving",
                        map.version()
                    ))
                })
            },
        )
        .with_context(|| self.log_tails(20))
    }

    /// The sites' WAN (sites attach here, see [`sites`]).
    pub fn wan(&self) -> &Wan {
        &self.wan
    }

    /// The pod network's bridge.
    pub fn pod_net(&self) -> &Wan {
        &self.pod_net
    }

    /// The front.
    pub fn front(&self) -> &Front {
        &self.front
    }

    /// The head-end LAN bridge and its host ([`FleetOptions::lan`]).
    pub fn lan(&self) -> Result<&Lan> {
        self.lan
            .as_ref()
            .context("the fleet was built without a head-end LAN bridge")
    }

    /// Flows the pods started toward the WAN through the node's SNAT
    /// ([`FleetOptions::pod_egress`]).
    pub fn egress_flows(&self) -> Result<u64> {
        ensure!(self.options.pod_egress, "the fleet was built without pod egress");
        headend::egress_flows(&self.front)
    }

    /// The fleet's etcd (freeze and thaw it for outages).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// etcd's namespace.
    pub fn etcd_ns(&self) -> &Netns {
        &self.etcd_ns
    }

    /// The pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pod `i`.
    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// The options the fleet was built with.
    pub fn options(&self) -> &FleetOptions {
        &self.options
    }

    /// The fleet's work dir (key file, each pod's dir).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/nonexistent"), TempDir::path)
    }

    /// Metric `name` of each pod whose gateway runs, in pod order (`None` for a stopped
    /// pod).
    pub fn metric_by_pod(&self, name: &str) -> Result<Vec<Option<f64>>> {
        self.pods
            .iter()
            .map(|p| {
                if p.daemon.is_some() {
                    p.metric(name).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }

    /// Metric `name` summed over the running pods.
    pub fn metric_sum(&self, name: &str) -> Result<f64> {
        Ok(self.metric_by_pod(name)?.into_iter().flatten().sum())
    }

    /// Waits until `name` summed over the pods satisfies `ok`.
    pub fn wait_metric_sum(&self, name: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> Result<f64> {
        wait::until(
            format!("{} summed over the pods", metric_name(name)),
            timeout,
            || {
                let v = self.metric_by_pod(name)?;
                let sum: f64 = v.iter().flatten().sum();
                Ok(if ok(sum) {
                    Probe::Ready(sum)
                } else {
                    Probe::pending(format!("sum {sum}, by pod {v:?}"))
                })
            },
        )
    }

    /// Which pod lists a tunnel for `peer_id` (`concentrator-gateway tunnels` in each pod):
    /// the pods (by index) whose table has it.
    pub fn owners_of(&self, peer_id: &str) -> Result<Vec<usize>> {
        let mut owners = Vec::new();
        for pod in self.pods.iter().filter(|p| p.daemon.is_some()) {
            let table = pod.tunnels(&self.options.gateway_bin)?;
            if table
                .lines()
                .any(|l| l.split_whitespace().next() == Some(peer_id))
            {
                owners.push(pod.index);
            }
        }
        Ok(owners)
    }

    /// The site claims in etcd (`{prefix}/sites/{scope}/{peer}`, the holder's member ID as
    /// value): who holds which site, as the fleet itself would tell.
    pub fn claims(&self) -> Result<Vec<SiteClaim>> {
        let prefix = format!("{ETCD_PREFIX}/sites/");
        self.etcd
            .range(&prefix)?
            .into_iter()
            .map(|kv| {
                let rest = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key);
                let (scope, peer) = rest
                    .split_once('/')
                    .with_context(|| format!("claim key {:?} has no scope", kv.key))?;
                Ok(SiteClaim {
                    scope: unescape(scope),
                    peer_id: unescape(peer),
                    member: kv.value_str().parse().ok(),
                    lease: kv.lease,
                })
            })
            .collect()
    }

    /// The last `lines` lines of every pod's gateway log and of etcd's.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out: Vec<String> = self.pods.iter().map(|p| p.log_tail(lines)).collect();
        out.push(format!("etcd:\n{}", self.etcd.log_tail(lines.min(10))));
        out.join("\n")
    }
}

/// One site claim in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteClaim {
    /// What the site is a site of: `egroup/NAME` or `eroute/NAME`.
    pub scope: String,
    /// The site's identity.
    pub peer_id: String,
    /// The member (pod ordinal) that holds it, if the value names one.
    pub member: Option<usize>,
    /// The lease the claim lives with (that member's session).
    pub lease: i64,
}

/// Undoes the gateway's `%XX` escaping of claim key parts.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            if let Some(mut d) = pod.daemon.take() {
                d.kill();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(30));
        }
        if let Some(dir) = self.dir.take() {
            scratch::release(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_escapes() {
        assert_eq!(pod_ip(2), addr("10.244.0.12"));
        assert_eq!(pod_name(1), "gw-1");
        assert_eq!(metric_name("fleet_members"), "concentrator_gateway_fleet_members");
        assert_eq!(metric_name("concentrator_gateway_x"), "concentrator_gateway_x");
        assert_eq!(unescape("egroup%2Fbranches"), "egroup/branches");
        assert_eq!(unescape("a%2"), "a%2");
        assert_eq!(unescape("%41%zz"), "A%zz");
    }
}
