//! A private single-node etcd (Debian's `etcd` 3.4, v3 API) on free 127.0.0.1 client and
//! peer ports, data in a temp dir. Killed and deleted on drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use tempfile::TempDir;

use crate::process::Daemon;
use crate::tools::{self, Tool};
use crate::wait::{self, Probe};
use crate::{ids, ports, scratch};

/// What this module needs.
pub const TOOLS: &[Tool] = &[tools::ETCD];

/// How long to wait for `/health` to report true.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bind attempts (a port can be taken between choosing and binding it).
const ATTEMPTS: usize = 3;

/// A running private etcd.
#[derive(Debug)]
pub struct Etcd {
    daemon: Daemon,
    client_port: u16,
    peer_port: u16,
    dir: Option<TempDir>,
}

impl Etcd {
    /// Starts etcd and waits until `/health` reports `"health":"true"` (a leader exists).
    pub fn start() -> Result<Self> {
        let dir = scratch::dir("etcd")?;
        let path = dir.path().to_owned();
        ports::start_on_free_ports("etcd", ATTEMPTS, |attempt| {
            let client_port = ports::free_tcp_port()?;
            let peer_port = ports::free_tcp_port()?;
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = path.join(format!("etcd-{attempt}.log"));
            let mut cmd = Command::new(tools::ETCD.path());
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
            match wait_healthy(&mut daemon, client_port) {
                Ok(()) => Ok(ports::Attempt::Started((daemon, client_port, peer_port))),
                Err(e) => ports::failed_start(&mut daemon, e, &log),
            }
        })
        .map(|(daemon, client_port, peer_port)| Self {
            daemon,
            client_port,
            peer_port,
            dir: Some(dir),
        })
    }

    /// The client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
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
        crate::process::run(
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

fn wait_healthy(daemon: &mut Daemon, port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait::until(format!("etcd /health on {addr}"), START_TIMEOUT, || {
        daemon.ensure_running()?;
        Ok(match http_get(addr, "/health") {
            Ok(body) if body.contains(r#""health":"true""#) => Probe::Ready(()),
            Ok(body) => Probe::pending(body.trim()),
            Err(e) => Probe::pending(e),
        })
    })
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
