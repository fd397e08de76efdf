//! A private single-node etcd (Debian's `etcd` 3.4, v3 API), data in a temp dir, killed and
//! deleted on drop. [`Etcd::start`] puts it on free 127.0.0.1 client and peer ports of the
//! test's own namespace; [`Etcd::start_in`] runs it inside a network namespace on one of that
//! namespace's addresses, so that processes in other namespaces on the same bridge (gateway
//! pods) reach it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use crate::netns::Netns;
use crate::process::{self, Daemon};
use crate::tools::{self, Tool};
use crate::wait::{self, Probe};
use crate::{ids, ports, scratch};

/// What this module needs ([`Etcd::start_in`] also needs `ip` and `curl`).
pub const TOOLS: &[Tool] = &[tools::ETCD];

/// How long to wait for `/health` to report true.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bind attempts (a port can be taken between choosing and binding it).
const ATTEMPTS: usize = 3;

/// The client port of an etcd started with [`Etcd::start_in`] (its namespace is its own: no
/// other process takes the port).
pub const NETNS_CLIENT_PORT: u16 = 2379;
/// The peer port of an etcd started with [`Etcd::start_in`].
pub const NETNS_PEER_PORT: u16 = 2380;

/// Where etcd runs: which namespace and which address its URLs carry.
#[derive(Clone, Debug)]
struct Place {
    /// `None`: the test's own namespace.
    netns: Option<String>,
    host: IpAddr,
}

/// A running private etcd.
#[derive(Debug)]
pub struct Etcd {
    daemon: Daemon,
    place: Place,
    client_port: u16,
    peer_port: u16,
    dir: Option<TempDir>,
}

impl Etcd {
    /// Starts etcd on 127.0.0.1 and waits until `/health` reports `"health":"true"` (a leader
    /// exists).
    pub fn start() -> Result<Self> {
        let place = Place {
            netns: None,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        Self::start_at(place, || Ok((ports::free_tcp_port()?, ports::free_tcp_port()?)))
    }

    /// Starts etcd inside `ns`, listening on `host` (an address of `ns`) at
    /// [`NETNS_CLIENT_PORT`], and waits until it is healthy. Reachable from every namespace
    /// that routes to `host`; its health is checked with `curl` inside `ns` (this process
    /// lives in another namespace).
    pub fn start_in(ns: &Netns, host: IpAddr) -> Result<Self> {
        let place = Place {
            netns: Some(ns.name().to_owned()),
            host,
        };
        Self::start_at(place, || Ok((NETNS_CLIENT_PORT, NETNS_PEER_PORT)))
    }

    fn start_at(place: Place, mut pick_ports: impl FnMut() -> Result<(u16, u16)>) -> Result<Self> {
        let dir = scratch::dir("etcd")?;
        let path = dir.path().to_owned();
        let host = url_host(place.host);
        ports::start_on_free_ports("etcd", ATTEMPTS, |attempt| {
            let (client_port, peer_port) = pick_ports()?;
            let client = format!("http://{host}:{client_port}");
            let peer = format!("http://{host}:{peer_port}");
            let log = path.join(format!("etcd-{attempt}.log"));
            let mut cmd = match &place.netns {
                Some(ns) => {
                    let mut c = Command::new(tools::IP.path());
                    c.args(["netns", "exec", ns]).arg(tools::ETCD.path());
                    c
                }
                None => Command::new(tools::ETCD.path()),
            };
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("ETCD") {
                    cmd.env_remove(key);
                }
            }
            cmd.arg("--data-dir")
                .arg(path.join(format!("data-{attempt}")))
                .args(["--name", "e2e"])
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("e2e={peer}")])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--initial-cluster-token",
                    &format!("e2e-{}", ids::unique_suffix()),
                ])
                // Single node on loopback: elect a leader in ~100 ms instead of ~1 s.
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .args(["--logger", "zap", "--log-outputs", "stderr"]);
            let mut daemon = Daemon::spawn("etcd", cmd, &log)?;
            match wait_healthy(&mut daemon, &place, client_port) {
                Ok(()) => Ok(ports::Attempt::Started((daemon, client_port, peer_port))),
                Err(e) => ports::failed_start(&mut daemon, e, &log),
            }
        })
        .map(|(daemon, client_port, peer_port)| Self {
            daemon,
            place,
            client_port,
            peer_port,
            dir: Some(dir),
        })
    }

    /// The client endpoint, `http://HOST:PORT` (`127.0.0.1` unless started with
    /// [`Self::start_in`]).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", url_host(self.place.host), self.client_port)
    }

    /// The address etcd listens on.
    pub fn host(&self) -> IpAddr {
        self.place.host
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The etcd log.
    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    /// The tail of the etcd log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// Freezes etcd (SIGSTOP): its clients' requests hang as they would for a partition.
    pub fn freeze(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Thaws etcd (SIGCONT) after [`Self::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.daemon.pid().to_string();
        process::run(
            Command::new("kill").args([&format!("-{sig}"), &pid]),
            Duration::from_secs(5),
        )?;
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A frozen process dies of SIGKILL too.
        self.daemon.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(30));
        }
        if let Some(dir) = self.dir.take() {
            scratch::release(dir);
        }
    }
}

fn wait_healthy(daemon: &mut Daemon, place: &Place, port: u16) -> Result<()> {
    let addr = SocketAddr::new(place.host, port);
    wait::until(format!("etcd /health on {addr}"), START_TIMEOUT, || {
        daemon.ensure_running()?;
        let got = match &place.netns {
            None => http_get(addr, "/health").map_err(anyhow::Error::from),
            Some(ns) => curl_in(ns, addr, "/health"),
        };
        Ok(match got {
            Ok(body) if body.contains(r#""health":"true""#) => Probe::Ready(()),
            Ok(body) => Probe::pending(body.trim()),
            Err(e) => Probe::pending(format!("{e:#}")),
        })
    })
}

/// `host` as it goes in a URL (IPv6 in brackets).
fn url_host(host: IpAddr) -> String {
    match host {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// GET `path` from `addr` with curl inside namespace `ns`: the body, or an error.
fn curl_in(ns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let url = format!("http://{}:{}{path}", url_host(addr.ip()), addr.port());
    let mut cmd = Command::new(tools::IP.path());
    cmd.args(["netns", "exec", ns])
        .arg(tools::CURL.path())
        .args(["-sS", "-m", "2", &url]);
    process::run(&mut cmd, Duration::from_secs(5))
}

/// A minimal HTTP/1.0 GET; returns the whole response (status line, headers, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
