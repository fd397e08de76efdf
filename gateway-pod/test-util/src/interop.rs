//! Our IKE state machines against a real strongSwan: a site namespace and a gateway namespace
//! on one WAN bridge, charon (key-oracle logging, kernel-libipsec) in one of them and our
//! *driver* in the other.
//!
//! The driver is the test binary itself, re-executed in its namespace to run the test named
//! [`DRIVER_TEST`], which does nothing unless the test's environment variables are set. It
//! runs one of our state machines on UDP 500 and 4500 of its WAN address ([`Sockets`]: one
//! thread per socket feeding a channel, `Instant::now()` at each datagram and timer) and
//! prints one line per event (`EVENT ...`, [`ike_sa_established`], [`child_sa_installed`]),
//! which the test reads from its log ([`Interop::wait_driver`]). charon's key log is the
//! oracle for the CHILD SA keys ([`ensure_charon_keys`]).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_e2e::netns::{Netns, Wan, addr};
use concentrator_e2e::process::Daemon;
use concentrator_e2e::scratch;
use concentrator_e2e::strongswan::{self, Charon, CharonOptions, Connection};
use concentrator_e2e::topology::{GW_ADDR, GW_HOST, SITE_ADDR, SITE_HOST};
use concentrator_e2e::wait::{self, Probe};
use concentrator_ike::negotiate::ts_bounds;
use concentrator_ike::payload::{Identity, TrafficSelector};
use concentrator_ike::responder::{ChildSa, IdBuf};
use concentrator_ike::{initiator, responder};

/// How long a test waits for one thing to happen.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// The test every interop test binary defines to run its driver.
pub const DRIVER_TEST: &str = "driver_process";

/// The proposal matrix every interop suite covers: one `#[test]` per IKE/ESP proposal pair,
/// named after it, each returning `$check(ike, esp)` (an `anyhow::Result<()>`). Invoke it in a
/// module named after what is checked:
///
/// ```text
/// mod establishes_with_strongswan {
///     concentrator_test_util::proposal_matrix!(super::establishes);
/// }
/// ```
#[macro_export]
macro_rules! proposal_matrix {
    ($check:path) => {
        $crate::proposal_tests! { $check;
            aes128gcm16_prfsha256_x25519 = "aes128gcm16-prfsha256-x25519", "aes128gcm16";
            aes256gcm16_prfsha384_ecp384 = "aes256gcm16-prfsha384-ecp384", "aes256gcm16";
            chacha20poly1305_prfsha256_x25519 = "chacha20poly1305-prfsha256-x25519", "chacha20poly1305";
            aes256_sha256_modp2048 = "aes256-sha256-modp2048", "aes256-sha256";
            aes128_sha256_ecp256 = "aes128-sha256-ecp256", "aes128-sha256";
        }
    };
}

/// The tests of [`proposal_matrix!`]: each `$name` returns `$check($ike, $esp)`.
#[doc(hidden)]
#[macro_export]
macro_rules! proposal_tests {
    ($check:path; $($name:ident = $ike:literal, $esp:literal;)*) => {
        $(
            #[test]
            fn $name() -> ::anyhow::Result<()> {
                $check($ike, $esp)
            }
        )*
    };
}

/// An environment variable the driver needs.
pub fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} not set"))
}

/// Our responder's configuration: one IKE and one ESP proposal (strongSwan syntax), our
/// subnet and the peer's, our identity (an FQDN).
pub fn responder_config(
    ike: &str,
    esp: &str,
    local: &str,
    remote: &str,
    id: &str,
) -> Result<responder::Config> {
    Ok(responder::Config::new(
        vec![parse_ike("ike", ike)?],
        vec![parse_esp("esp", esp)?],
        local.parse()?,
        remote.parse()?,
        IdBuf::new(&Identity::Fqdn(id.as_bytes())),
    ))
}

/// Our initiator's configuration, as [`responder_config`] plus the identity the responder
/// must show.
pub fn initiator_config(
    ike: &str,
    esp: &str,
    (local, remote): (&str, &str),
    (id, remote_id): (&str, &str),
) -> Result<initiator::Config> {
    let mut config = initiator::Config::new(
        vec![parse_ike("ike", ike)?],
        vec![parse_esp("esp", esp)?],
        local.parse()?,
        remote.parse()?,
        IdBuf::new(&Identity::Fqdn(id.as_bytes())),
    );
    config.remote_id = Some(IdBuf::new(&Identity::Fqdn(remote_id.as_bytes())));
    Ok(config)
}

/// A driver's own address and its peer's, from `{prefix}_LOCAL` and `{prefix}_REMOTE`; `None`
/// when `gate` is not set, i.e. the test binary runs its tests rather than a driver.
pub fn driver_addrs(gate: &str, prefix: &str) -> Result<Option<(IpAddr, IpAddr)>> {
    if std::env::var_os(gate).is_none() {
        return Ok(None);
    }
    let local = env(&format!("{prefix}_LOCAL"))?.parse()?;
    let remote = env(&format!("{prefix}_REMOTE"))?.parse()?;
    Ok(Some((local, remote)))
}

/// Lowercase hex; `-` for no bytes (an absent key, e.g. the integrity key of an AEAD).
pub fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".to_owned();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Traffic selectors as `first-last` address ranges, comma-separated.
pub fn ts(v: &[TrafficSelector<'_>]) -> String {
    v.iter()
        .filter_map(ts_bounds)
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The value of `key=value` in a driver log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Lines of a driver log that start with `prefix`.
pub fn lines_with<'a>(log: &'a str, prefix: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// Every key charon dumped as `label` (`chd = 4`), in order, in the driver log's hex.
pub fn charon_keys(charon_log: &str, label: &str) -> Vec<String> {
    strongswan::hex_dumps_of(charon_log, label)
        .iter()
        .map(|b| hex(b))
        .collect()
}

/// Checks that the keys of the `ChildSaInstalled` driver line `line` are the ones charon
/// derived for its `nth` CHILD SA: for each `(charon's label, our field)`, the `nth` dump of
/// the label (RFC 7296 §2.17 KEYMAT), `-` where charon dumped none.
pub fn ensure_charon_keys(charon_log: &str, nth: usize, line: &str, keys: &[(&str, &str)]) -> Result<()> {
    for (label, ours) in keys {
        let theirs = charon_keys(charon_log, label);
        let theirs = theirs.get(nth).map_or("-", String::as_str);
        ensure!(
            Some(theirs) == field(line, ours),
            "{label}: charon {theirs}, ours {:?} in {line}",
            field(line, ours)
        );
    }
    Ok(())
}

/// The driver log line of an established IKE SA.
pub fn ike_sa_established(spi_i: u64, spi_r: u64, peer_id: &IdBuf, remote: SocketAddr, nat: bool) -> String {
    format!(
        "EVENT IkeSaEstablished spi_i={spi_i:016x} spi_r={spi_r:016x} peer={peer_id} remote={remote} nat={nat}"
    )
}

/// The driver log line of an installed CHILD SA. Test only: the keys go to the log so that
/// the test can compare them with the ones charon logs.
pub fn child_sa_installed(c: &ChildSa) -> String {
    let key = |k: &concentrator_crypto::DirectionKeys| hex(&[k.encr.expose(), k.salt.expose()].concat());
    let replaces = c
        .replaces
        .map_or_else(|| "-".to_owned(), |spi| format!("{spi:08x}"));
    format!(
        "EVENT ChildSaInstalled spi_in={:08x} spi_out={:08x} encr={:?} integ={:?} in_key={} \
         in_integ={} out_key={} out_integ={} ts_local={} ts_remote={} encap={} replaces={replaces}",
        c.spi_in,
        c.spi_out,
        c.encryption,
        c.integrity,
        key(&c.inbound),
        hex(c.inbound.integ.expose()),
        key(&c.outbound),
        hex(c.outbound.integ.expose()),
        ts(&c.ts_local),
        ts(&c.ts_remote),
        c.udp_encap
    )
}

/// An IKE message a driver received.
#[derive(Debug)]
pub struct Datagram {
    /// Where it arrived: the driver's address and port 500 or 4500.
    pub local: SocketAddr,
    /// Who sent it.
    pub remote: SocketAddr,
    /// The IKE message (without the non-ESP marker on port 4500).
    pub ike: Vec<u8>,
}

/// The driver's UDP sockets, ports 500 and 4500 of one address, each read by a thread.
#[derive(Debug)]
pub struct Sockets {
    local: IpAddr,
    s500: UdpSocket,
    s4500: UdpSocket,
    rx: Receiver<(u16, SocketAddr, Vec<u8>)>,
}

impl Sockets {
    /// Binds UDP 500 and 4500 of `local` and starts reading them.
    pub fn bind(local: IpAddr) -> Result<Self> {
        let s500 = UdpSocket::bind((local, 500)).context("binding UDP 500")?;
        let s4500 = UdpSocket::bind((local, 4500)).context("binding UDP 4500")?;
        let (tx, rx) = mpsc::channel();
        for sock in [&s500, &s4500] {
            let sock = sock.try_clone()?;
            let tx = tx.clone();
            let port = sock.local_addr()?.port();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if tx.send((port, from, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            local,
            s500,
            s4500,
            rx,
        })
    }

    /// The next IKE message, waiting until `deadline` (for ever without one):
    /// `Err(Timeout)` once it passed. ESP on port 4500 is skipped: drivers handle IKE only.
    pub fn recv(&self, deadline: Option<Instant>) -> Result<Datagram, RecvTimeoutError> {
        loop {
            let (port, remote, data) = match deadline {
                Some(t) => self
                    .rx
                    .recv_timeout(t.saturating_duration_since(Instant::now()))?,
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)?,
            };
            // RFC 3948 §2.2: on port 4500, IKE messages start with four zero octets (the
            // non-ESP marker); anything else there is ESP.
            let ike = if port == 4500 {
                match data.strip_prefix(&[0, 0, 0, 0][..]) {
                    Some(rest) => rest.to_vec(),
                    None => continue,
                }
            } else {
                data
            };
            return Ok(Datagram {
                local: SocketAddr::new(self.local, port),
                remote,
                ike,
            });
        }
    }

    /// Sends an IKE message to `remote`: from port 4500 with the non-ESP marker (RFC 3948
    /// §2.2) when `nat_t`, else from port 500.
    pub fn send(&self, nat_t: bool, ike: &[u8], remote: SocketAddr) -> Result<()> {
        let mut out = Vec::with_capacity(ike.len() + 4);
        let sock = if nat_t {
            out.extend_from_slice(&[0, 0, 0, 0]);
            &self.s4500
        } else {
            &self.s500
        };
        out.extend_from_slice(ike);
        sock.send_to(&out, remote)?;
        Ok(())
    }
}

/// Both namespaces, our driver and charon; dropped in field order, the namespaces (and every
/// process in them) first.
#[derive(Debug)]
pub struct Interop {
    _wan: Wan,
    /// The site namespace.
    pub site: Netns,
    /// The gateway namespace.
    pub gw: Netns,
    _dir: tempfile::TempDir,
    /// Our driver; its output is its log.
    pub driver: Daemon,
    /// `None` once killed.
    charon: Option<Charon>,
}

impl Interop {
    /// Our initiator (the driver, in the site namespace, environment `driver_env`) against
    /// charon in the gateway namespace, which has loaded `theirs` (its view of the
    /// connection). Returns once the driver runs; it connects at once.
    pub fn initiator(theirs: &Connection, driver_env: &[(&str, String)]) -> Result<Self> {
        Self::start("ini", |site, gw| {
            let charon = Charon::start_with(gw, &CharonOptions::key_oracle())?;
            charon.load(std::slice::from_ref(theirs))?;
            let dir = scratch::dir("ike-initiator")?;
            let driver = spawn_driver(site, "ike initiator driver", &dir, driver_env)?;
            Ok((dir, driver, charon))
        })
    }

    /// Our responder (the driver, in the gateway namespace, environment `driver_env`), once it
    /// printed `READY`, and charon in the site namespace with nothing loaded yet.
    pub fn responder(driver_env: &[(&str, String)]) -> Result<Self> {
        Self::start("ike", |site, gw| {
            let dir = scratch::dir("ike-driver")?;
            let mut driver = spawn_driver(gw, "ike driver", &dir, driver_env)?;
            driver.wait_logged("READY", Duration::from_secs(10))?;
            let charon = Charon::start_with(site, &CharonOptions::key_oracle())?;
            Ok((dir, driver, charon))
        })
    }

    /// The WAN, the site and gateway namespaces (`{tag}site`, `{tag}gw`) with their LAN
    /// addresses, the site reaching the gateway; then `start` runs the driver and charon.
    fn start(
        tag: &str,
        start: impl FnOnce(&Netns, &Netns) -> Result<(tempfile::TempDir, Daemon, Charon)>,
    ) -> Result<Self> {
        let wan = Wan::new()?;
        let site = wan.host(&format!("{tag}site"), SITE_ADDR, Some(SITE_HOST))?;
        let gw = wan.host(&format!("{tag}gw"), GW_ADDR, Some(GW_HOST))?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;
        let (dir, driver, charon) = start(&site, &gw)?;
        Ok(Self {
            _wan: wan,
            site,
            gw,
            _dir: dir,
            driver,
            charon: Some(charon),
        })
    }

    /// charon, while it runs.
    pub fn charon(&self) -> &Charon {
        self.charon.as_ref().expect("charon is running")
    }

    /// Kills charon (SIGKILL): its side goes silent without deleting anything.
    pub fn kill_charon(&mut self) {
        self.charon = None;
    }

    /// charon's log so far.
    pub fn charon_log(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.charon().log_path())?)
    }

    /// The driver's log so far.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(self.driver.log_path()).unwrap_or_default()
    }

    /// The first driver log line starting with `prefix`, once it appears.
    pub fn wait_driver_line(&mut self, prefix: &str) -> Result<String> {
        self.wait_driver(format!("driver line {prefix:?}"), TIMEOUT, |text| {
            text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned)
        })
    }

    /// Polls the driver log until `found` returns something; fails at once if the driver
    /// exits.
    pub fn wait_driver<T>(
        &mut self,
        what: impl std::fmt::Display,
        timeout: Duration,
        found: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let log = self.driver.log_path().to_owned();
        let driver = &mut self.driver;
        let charon = self.charon.as_ref();
        wait::until(what, timeout, || {
            driver.ensure_running()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(match found(&text) {
                Some(v) => Probe::Ready(v),
                None => Probe::pending(driver.log_tail(10)),
            })
        })
        .with_context(|| charon.map(|c| c.log_tail(30)).unwrap_or_default())
    }

    /// Polls charon's log until it holds `count` lines containing `needle`.
    pub fn wait_charon_log(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let log = self.charon().log_path().to_owned();
        wait::until(
            format!("{count} charon log lines with {needle:?}"),
            timeout,
            || {
                let n = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count();
                Ok(if n >= count {
                    Probe::Ready(())
                } else {
                    Probe::pending(format!("{n} so far"))
                })
            },
        )
        .with_context(|| self.charon().log_tail(30))
    }

    /// charon (the site) loads `conn`, initiates it and waits until it holds the SAs and the
    /// driver reported the CHILD SA.
    pub fn establish(&mut self, conn: &Connection) -> Result<strongswan::ChildSa> {
        let name = conn.name.as_str();
        self.charon().load(std::slice::from_ref(conn))?;
        self.charon()
            .initiate(name)
            .with_context(|| self.driver.log_tail(20))?;
        let child = self
            .charon()
            .wait_established(name, name, TIMEOUT)
            .with_context(|| self.driver.log_tail(20))?;
        self.wait_driver_line("EVENT ChildSaInstalled")?;
        Ok(child)
    }
}

/// This test binary, running only [`DRIVER_TEST`] in `ns` with `env`; its output goes to
/// `driver.log` in `dir`.
fn spawn_driver(ns: &Netns, name: &str, dir: &tempfile::TempDir, env: &[(&str, String)]) -> Result<Daemon> {
    let mut cmd = ns.command(std::env::current_exe()?);
    cmd.args(["--exact", DRIVER_TEST, "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (k, v)));
    Daemon::spawn(name, cmd, &dir.path().join("driver.log"))
}
