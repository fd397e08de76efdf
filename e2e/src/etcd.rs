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

use anyhow::{Context, Result, ensure};
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

    /// Every key starting with `prefix`, read through etcd's JSON gateway (`/v3/kv/range`):
    /// what the test sees in etcd without an etcd client.
    pub fn range(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            base64_encode(prefix.as_bytes()),
            base64_encode(&prefix_end(prefix))
        );
        let addr = SocketAddr::new(self.place.host, self.client_port);
        let response = match &self.place.netns {
            Some(ns) => curl_in(ns, addr, "/v3/kv/range", Some(&body))?,
            None => {
                let whole = http(addr, "/v3/kv/range", Some(&body))?;
                whole
                    .split_once("\r\n\r\n")
                    .map_or(whole.clone(), |(_, b)| b.to_owned())
            }
        };
        parse_kvs(&response).with_context(|| format!("etcd range of {prefix}"))
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
            None => http(addr, "/health", None).map_err(anyhow::Error::from),
            Some(ns) => curl_in(ns, addr, "/health", None),
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

/// GET `path` from `addr` (or POST `body`) with curl inside namespace `ns`: the body, or an
/// error.
fn curl_in(ns: &str, addr: SocketAddr, path: &str, body: Option<&str>) -> Result<String> {
    let url = format!("http://{}:{}{path}", url_host(addr.ip()), addr.port());
    let mut cmd = Command::new(tools::IP.path());
    cmd.args(["netns", "exec", ns])
        .arg(tools::CURL.path())
        .args(["-sS", "-m", "2", &url]);
    if let Some(b) = body {
        cmd.args(["-X", "POST", "-H", "Content-Type: application/json", "-d", b]);
    }
    process::run(&mut cmd, Duration::from_secs(5))
}

/// A minimal HTTP/1.0 request: GET, or POST of `body`; returns the whole response (status
/// line, headers, body).
fn http(addr: SocketAddr, path: &str, body: Option<&str>) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    match body {
        None => write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?,
        Some(b) => write!(
            stream,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{b}",
            b.len()
        )?,
    }
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// One key of [`Etcd::range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl KeyValue {
    /// The value as text (lossy UTF-8).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// The `kvs` of a JSON range response of etcd's gRPC gateway: objects without nesting whose
/// `key` and `value` are base64 and whose numbers are strings.
fn parse_kvs(json: &str) -> Result<Vec<KeyValue>> {
    let Some((_, rest)) = json.split_once("\"kvs\":[") else {
        ensure!(json.contains("\"header\""), "not a range response: {json}");
        return Ok(Vec::new());
    };
    let array = rest.split(']').next().unwrap_or_default();
    let field = |obj: &str, name: &str| -> Option<String> {
        let (_, after) = obj.split_once(&format!("\"{name}\":\""))?;
        after.split('"').next().map(str::to_owned)
    };
    let mut out = Vec::new();
    for obj in array.split("},{") {
        let key = field(obj, "key").with_context(|| format!("no key in {obj}"))?;
        let value = field(obj, "value").unwrap_or_default();
        out.push(KeyValue {
            key: String::from_utf8_lossy(&base64_decode(&key)?).into_owned(),
            value: base64_decode(&value)?,
            lease: field(obj, "lease").and_then(|l| l.parse().ok()).unwrap_or(0),
        });
    }
    Ok(out)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = BASE64
            .iter()
            .position(|b| *b == c)
            .with_context(|| format!("{c:?} is not base64 in {text:?}"))?;
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` of a
/// prefix query).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: the whole key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "/concentrator/sites/", "\u{ff}\u{0}x"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes(), "{s:?} as {e}");
        }
        assert_eq!(
            base64_encode(b"/c/sites/egroup%2Fb/s1"),
            "L2Mvc2l0ZXMvZWdyb3VwJTJGYi9zMQ=="
        );
        assert!(base64_decode("a b").is_err());
    }

    #[test]
    fn reads_range_responses() {
        let json = r#"{"header":{"revision":"2"},"kvs":[{"key":"L2Mvc2l0ZXMvZWdyb3VwJTJGYi9zMQ==","create_revision":"2","mod_revision":"2","version":"1","value":"Mg==","lease":"7587"},{"key":"eA==","value":"eQ=="}],"count":"2"}"#;
        let kvs = parse_kvs(json).unwrap();
        assert_eq!(kvs.len(), 2);
        assert_eq!(kvs[0].key, "/c/sites/egroup%2Fb/s1");
        assert_eq!((kvs[0].value_str(), kvs[0].lease), ("2".to_owned(), 7587));
        assert_eq!(
            (kvs[1].key.as_str(), kvs[1].value.as_slice(), kvs[1].lease),
            ("x", &b"y"[..], 0)
        );
        assert!(parse_kvs(r#"{"header":{"revision":"2"}}"#).unwrap().is_empty());
        assert!(parse_kvs("404 page not found").is_err());
        assert_eq!(prefix_end("/a/"), b"/a0");
    }
}
