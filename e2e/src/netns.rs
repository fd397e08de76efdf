//! Network namespaces, a WAN bridge joining them, and commands run inside them.
//!
//! Names are `e2e-{pid}-{counter}-{role}`: unique across parallel tests (counter) and test
//! processes (pid). Namespaces left behind by a killed run (whose pid no longer exists) are
//! deleted the first time this process creates one.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ipnet::IpNet;

use crate::ids;
use crate::process::{self, COMMAND_TIMEOUT, Daemon};
use crate::tools::{self, Tool};
use crate::wait::{self, Probe};

/// What this module needs.
pub const TOOLS: &[Tool] = &[tools::IP, tools::PING, tools::SH];

/// Every namespace this harness creates starts with this.
pub const PREFIX: &str = "e2e-";

/// The address `s`, a literal of a test's topology (panics on a typo).
pub fn addr(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

/// The prefix `s` (`192.0.2.1/24`), a literal of a test's topology (panics on a typo).
pub fn net(s: &str) -> IpNet {
    s.parse().expect("valid prefix")
}

/// A network namespace, deleted on drop together with every process still inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace for `role` (a short word such as `siteA`, `gw1`, `wan`), with `lo`
    /// up.
    pub fn new(role: &str) -> Result<Self> {
        static REAP: Once = Once::new();
        REAP.call_once(reap_stale);
        ensure!(
            !role.is_empty() && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "namespace role {role:?} must be ASCII letters, digits or _"
        );
        let name = format!("{PREFIX}{}-{role}", ids::unique_suffix());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name (for `ip netns exec NAME` / `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread of its own that has entered this namespace, and returns that
    /// thread: the sockets `f` opens are the namespace's (an in-process client of a pod's
    /// API, as a peer pod would be).
    pub fn spawn_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns(2) on a descriptor we own; it changes only this thread's network
            // namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            anyhow::ensure!(r == 0, "setns: {}", std::io::Error::last_os_error());
            Ok(f())
        }))
    }

    /// Runs `ip -n NAME args...`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// Add arguments, environment and so on as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(tools::IP.path());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args...` in the namespace; a non-zero exit is an error. Returns stdout.
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<String> {
        process::run(self.command(program).args(args), COMMAND_TIMEOUT)
    }

    /// Runs `program args...` in the namespace and returns its output whatever the status.
    pub fn output(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Output> {
        process::output(self.command(program).args(args), COMMAND_TIMEOUT)
    }

    /// Starts a long-running `program args...` in the namespace, output to `log`. It is
    /// killed when the returned [`Daemon`] is dropped (and, at the latest, when this
    /// namespace is).
    pub fn spawn(&self, name: &str, program: impl AsRef<OsStr>, args: &[&str], log: &Path) -> Result<Daemon> {
        let mut cmd = self.command(program);
        cmd.args(args);
        Daemon::spawn(name, cmd, log)
    }

    /// Adds `addr` (e.g. `10.1.0.1/24`) to interface `dev`.
    pub fn add_addr(&self, dev: &str, addr: IpNet) -> Result<()> {
        self.ip(&["addr", "add", &addr.to_string(), "dev", dev]).map(drop)
    }

    /// Adds a "LAN" address on `lo` (this kernel has no dummy interfaces). The whole prefix
    /// becomes local to the namespace, and the address is a valid ping source / target.
    pub fn add_lo_addr(&self, addr: IpNet) -> Result<()> {
        self.add_addr("lo", addr)
    }

    /// Joins this namespace to `peer` with a veth pair: `ifname` here with `addr`, `peer_ifname`
    /// there with `peer_addr`, both up. For a LAN behind a router namespace (see
    /// [`Netns::enable_forwarding`]) instead of an address on `lo`.
    pub fn link(
        &self,
        ifname: &str,
        addr: IpNet,
        peer: &Self,
        peer_ifname: &str,
        peer_addr: IpNet,
    ) -> Result<()> {
        ensure!(
            [ifname, peer_ifname]
                .iter()
                .all(|n| !n.is_empty() && n.len() <= 15),
            "interface names {ifname:?}, {peer_ifname:?} must be 1..=15 bytes"
        );
        self.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            peer_ifname,
            "netns",
            peer.name(),
        ])
        .with_context(|| format!("linking {} to {}", self.name, peer.name))?;
        self.add_addr(ifname, addr)?;
        peer.add_addr(peer_ifname, peer_addr)?;
        self.ip(&["link", "set", ifname, "up"])?;
        peer.ip(&["link", "set", peer_ifname, "up"])?;
        Ok(())
    }

    /// Makes the namespace route IPv4 between its interfaces (a gateway in front of a LAN).
    pub fn enable_forwarding(&self) -> Result<()> {
        // /proc/sys/net shows the network namespace of the process reading it.
        self.run(
            tools::SH.path(),
            &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        )
        .map(drop)
    }

    /// Polls `ping` from this namespace (optionally from source address `from`) until `to`
    /// answers.
    pub fn wait_reachable(&self, from: Option<IpAddr>, to: IpAddr, timeout: Duration) -> Result<()> {
        let to_s = to.to_string();
        let from_s = from.map(|a| a.to_string());
        let mut args = vec!["-c", "1", "-W", "1", "-n", "-q"];
        if let Some(f) = &from_s {
            args.extend(["-I", f.as_str()]);
        }
        args.push(&to_s);
        wait::until(
            format!("{to} to answer ping from namespace {}", self.name),
            timeout,
            || {
                let out = self.output(tools::PING.path(), &args)?;
                Ok(if out.status.success() {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!(
                        "ping: {} {}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                })
            },
        )
    }

    /// The pids of all processes in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = destroy(&self.name) {
            eprintln!("e2e: cleaning up namespace {}: {e:#}", self.name);
        }
    }
}

/// A WAN: a namespace holding bridge `br0`; [`Wan::attach`] plugs other namespaces into it
/// with veth pairs. Dropping it deletes the bridge namespace, which removes every veth pair.
#[derive(Debug)]
pub struct Wan {
    ns: Netns,
    ports: AtomicU32,
}

impl Wan {
    /// Creates the bridge namespace and `br0`.
    pub fn new() -> Result<Self> {
        Self::named("wan")
    }

    /// Like [`Self::new`], the namespace named for `role` (several bridges in one test, e.g.
    /// the sites' WAN and a pod network).
    pub fn named(role: &str) -> Result<Self> {
        let ns = Netns::new(role)?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self {
            ns,
            ports: AtomicU32::new(0),
        })
    }

    /// The bridge namespace (e.g. for tcpdump or nftables loss emulation on `br0`).
    pub fn namespace(&self) -> &Netns {
        &self.ns
    }

    /// A new namespace for `role` on the WAN: `wan0` with `wan_addr`/24 and, for a host with a
    /// LAN behind it, `lan_addr`/24 on `lo` (see [`Netns::add_lo_addr`]).
    pub fn host(&self, role: &str, wan_addr: &str, lan_addr: Option<&str>) -> Result<Netns> {
        let ns = Netns::new(role)?;
        self.attach(&ns, "wan0", format!("{wan_addr}/24").parse()?)?;
        if let Some(lan) = lan_addr {
            ns.add_lo_addr(format!("{lan}/24").parse()?)?;
        }
        Ok(ns)
    }

    /// Creates veth `ifname` in `ns` (address `addr`, up) whose peer is a port of `br0`.
    /// Returns the name of the bridge port in the WAN namespace.
    pub fn attach(&self, ns: &Netns, ifname: &str, addr: IpNet) -> Result<String> {
        ensure!(
            !ifname.is_empty() && ifname.len() <= 15,
            "interface name {ifname:?} must be 1..=15 bytes"
        );
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        ns.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.ns.name(),
        ])
        .with_context(|| format!("attaching {} to the WAN", ns.name()))?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.add_addr(ifname, addr)?;
        ns.ip(&["link", "set", ifname, "up"])?;
        Ok(port)
    }
}

fn ip(args: &[&str]) -> Result<String> {
    process::run(Command::new(tools::IP.path()).args(args), COMMAND_TIMEOUT)
}

fn pids(name: &str) -> Vec<u32> {
    ip(&["netns", "pids", name])
        .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in namespace `name`, waits for them to go, deletes the namespace.
fn destroy(name: &str) -> Result<()> {
    let victims = pids(name);
    if !victims.is_empty() {
        let mut cmd = Command::new(tools::SH.path());
        cmd.args(["-c", "kill -KILL \"$@\" 2>/dev/null; true", "sh"]);
        cmd.args(victims.iter().map(u32::to_string));
        process::run(&mut cmd, COMMAND_TIMEOUT)?;
        // Zombies whose parent is this process are reaped by their owners; only wait for
        // processes that are not zombies to disappear.
        wait::until(
            format!("processes {victims:?} in {name} to die"),
            Duration::from_secs(10),
            || {
                let alive: Vec<u32> = victims.iter().copied().filter(|&p| running(p)).collect();
                Ok(if alive.is_empty() {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!("still alive: {alive:?}"))
                })
            },
        )?;
    }
    ip(&["netns", "del", name])?;
    Ok(())
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Deletes `e2e-{pid}-...` namespaces whose creating process is gone (a test run that was
/// killed before its destructors ran).
fn reap_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            match destroy(name) {
                Ok(()) => eprintln!("e2e: removed stale namespace {name}"),
                Err(e) => eprintln!("e2e: could not remove stale namespace {name}: {e:#}"),
            }
        }
    }
}
