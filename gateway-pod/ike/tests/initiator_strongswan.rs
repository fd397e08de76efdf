//! The initiator state machine against a real strongSwan responder: our initiator in a site
//! namespace connects to charon (kernel-libipsec) in a gateway namespace, both on one WAN
//! bridge.
//!
//! The initiator runs in a thin driver (blocking UDP on ports 500 and 4500 of the site
//! address, one thread per socket feeding a channel, `Instant::now()` at each datagram and
//! timer). The test binary re-executes itself inside the site namespace to run it:
//! `driver_process` does nothing unless `IKE_INITIATOR_DRIVER` is set. The driver prints one
//! `EVENT ...` line per event, which the test reads from its log, and keeps answering the
//! responder until it is killed.
//!
//! charon's key log (`chd = 4`) is the oracle for the CHILD SA keys; `swanctl --list-sas`
//! must show the SAs ESTABLISHED / INSTALLED. As non-root every test prints SKIP and passes.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::strongswan::{self, Charon, CharonOptions, Connection};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch};
use concentrator_ike::initiator::{Config, Event, Initiator};
use concentrator_ike::negotiate::ts_bounds;
use concentrator_ike::payload::{Identity, TrafficSelector};
use concentrator_ike::responder::{IdBuf, SystemEntropy};
use ipnet::IpNet;

const SITE_ADDR: &str = "192.0.2.1";
const GW_ADDR: &str = "192.0.2.2";
const SITE_LAN: &str = "10.1.0.0/24";
const GW_LAN: &str = "10.2.0.0/24";
const GW_ID: &str = "gw.example";
const SITE_ID: &str = "site-a.example";
const TIMEOUT: Duration = Duration::from_secs(15);

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} not set"))
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".to_owned();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ts(v: &[TrafficSelector<'_>]) -> String {
    v.iter()
        .filter_map(ts_bounds)
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The driver: runs until killed when `IKE_INITIATOR_DRIVER` is set, else returns at once.
#[test]
fn driver_process() -> Result<()> {
    if std::env::var_os("IKE_INITIATOR_DRIVER").is_none() {
        return Ok(());
    }
    let local: IpAddr = env("IKE_INITIATOR_LOCAL")?.parse()?;
    let remote: IpAddr = env("IKE_INITIATOR_REMOTE")?.parse()?;
    let mut config = Config::new(
        vec![parse_ike("ike", &env("IKE_INITIATOR_IKE")?)?],
        vec![parse_esp("esp", &env("IKE_INITIATOR_ESP")?)?],
        env("IKE_INITIATOR_LOCAL_SUBNET")?.parse()?,
        env("IKE_INITIATOR_REMOTE_SUBNET")?.parse()?,
        IdBuf::new(&Identity::Fqdn(env("IKE_INITIATOR_LOCAL_ID")?.as_bytes())),
    );
    config.remote_id = Some(IdBuf::new(&Identity::Fqdn(
        env("IKE_INITIATOR_REMOTE_ID")?.as_bytes(),
    )));
    config.nat_t.force = std::env::var_os("IKE_INITIATOR_FORCE_NAT_T").is_some();
    if let Ok(ms) = std::env::var("IKE_INITIATOR_CHILD_LIFETIME_MS") {
        config.child_lifetime = Duration::from_millis(ms.parse()?);
    }
    if let Ok(ms) = std::env::var("IKE_INITIATOR_IKE_LIFETIME_MS") {
        config.ike_lifetime = Some(Duration::from_millis(ms.parse()?));
    }
    let psk = env("IKE_INITIATOR_PSK")?.into_bytes();
    let s500 = UdpSocket::bind((local, 500)).context("binding UDP 500")?;
    let s4500 = UdpSocket::bind((local, 4500)).context("binding UDP 4500")?;
    let (tx, rx) = mpsc::channel::<(u16, SocketAddr, Vec<u8>)>();
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
    let mut entropy = SystemEntropy;
    let mut i = Initiator::connect(
        Arc::new(config),
        &psk,
        SocketAddr::new(local, 500),
        SocketAddr::new(remote, 500),
        Instant::now(),
        &mut entropy,
    )?;
    println!("STARTED spi_i={:016x}", i.spi_i());
    let mut spis = None;
    loop {
        drain(&mut i, &s500, &s4500)?;
        // The IKE SA in use, printed when it changes (a rekey).
        if i.ike_spis() != spis {
            spis = i.ike_spis();
            if let Some((a, b)) = spis {
                println!("SPIS spi_i={a:016x} spi_r={b:016x}");
            }
        }
        let received = match i.poll_timeout() {
            Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match received {
            Ok((port, from, data)) => {
                // RFC 3948 §2.2: IKE on port 4500 follows four zero octets (the non-ESP
                // marker); anything else there is ESP, which this driver does not handle.
                let ike = if port == 4500 {
                    match data.strip_prefix(&[0, 0, 0, 0][..]) {
                        Some(rest) => rest,
                        None => continue,
                    }
                } else {
                    &data[..]
                };
                let to = SocketAddr::new(local, port);
                if let Err(e) = i.handle_datagram(Instant::now(), to, from, ike, &mut entropy) {
                    println!("DROP {e}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => i.handle_timeout(Instant::now(), &mut entropy),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

/// Sends what the initiator queued and prints its events.
fn drain(i: &mut Initiator, s500: &UdpSocket, s4500: &UdpSocket) -> Result<()> {
    let floated = i.floated();
    while let Some(t) = i.poll_transmit() {
        let mut out = Vec::with_capacity(t.payload.len() + 4);
        // RFC 3948 §2.2: IKE on the NAT-T path carries the non-ESP marker.
        let sock = if floated {
            out.extend_from_slice(&[0, 0, 0, 0]);
            s4500
        } else {
            s500
        };
        out.extend_from_slice(&t.payload);
        sock.send_to(&out, t.remote)?;
    }
    while let Some(ev) = i.poll_event() {
        match ev {
            Event::IkeSaEstablished {
                spi_i,
                spi_r,
                peer_id,
                remote,
                nat_detected,
            } => println!(
                "EVENT IkeSaEstablished spi_i={spi_i:016x} spi_r={spi_r:016x} peer={peer_id} \
                 remote={remote} nat={nat_detected}"
            ),
            Event::ChildSaInstalled(c) => {
                // Test only: the keys go to the driver log so that the test can compare them
                // with the ones charon logs.
                let key = |k: &concentrator_crypto::DirectionKeys| {
                    hex(&[k.encr.expose(), k.salt.expose()].concat())
                };
                println!(
                    "EVENT ChildSaInstalled spi_in={:08x} spi_out={:08x} encr={:?} integ={:?} \
                     in_key={} in_integ={} out_key={} out_integ={} ts_local={} ts_remote={} encap={} \
                     replaces={}",
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
                    c.udp_encap,
                    c.replaces
                        .map_or_else(|| "-".to_owned(), |spi| format!("{spi:08x}"))
                );
            }
            Event::ChildSaDeleted { spi_in, spi_out } => {
                println!("EVENT ChildSaDeleted spi_in={spi_in:08x} spi_out={spi_out:08x}");
            }
            Event::IkeSaDeleted { spi, reason } => {
                println!("EVENT IkeSaDeleted spi_i={spi:016x} reason={reason:?}");
            }
            Event::RequestRefused { exchange, error } => {
                println!("EVENT RequestRefused exchange={exchange} error={error}");
            }
            Event::PeerError { notify_type } => println!("EVENT PeerError notify={notify_type}"),
            Event::Failed(e) => println!("EVENT Failed {e} notify={:?}", e.notify()),
            other => println!("EVENT {other:?}"),
        }
    }
    Ok(())
}

/// Every hex dump `"<label> => N bytes @ 0x..."` in a charon log (`chd = 4`), in order.
fn charon_dumps(log: &str, label: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        let Some((head, tail)) = line.split_once(" => ") else {
            continue;
        };
        if !head.ends_with(label) {
            continue;
        }
        let Some(n) = tail
            .split_once(" bytes @ ")
            .and_then(|(n, _)| n.trim().parse::<usize>().ok())
        else {
            continue;
        };
        let mut bytes = Vec::with_capacity(n);
        while bytes.len() < n {
            let Some((_, dump)) = lines.next().and_then(|l| l.split_once(": ")) else {
                return out;
            };
            for tok in dump.split(' ').take_while(|t| !t.is_empty()).take(16) {
                match u8::from_str_radix(tok, 16) {
                    Ok(b) => bytes.push(b),
                    Err(_) => return out,
                }
            }
        }
        bytes.truncate(n);
        out.push(hex(&bytes));
    }
    out
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("valid prefix")
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

/// Both namespaces, charon with the mirrored connection, and our driver; dropped in reverse
/// order.
struct Setup {
    _wan: Wan,
    _site: Netns,
    _gw: Netns,
    _dir: tempfile::TempDir,
    charon: Charon,
    driver: concentrator_e2e::process::Daemon,
}

/// What a test varies.
struct Case<'a> {
    /// Our IKE proposal.
    ike: &'a str,
    /// charon's (the same unless a test wants a mismatch).
    charon_ike: &'a str,
    esp: &'a str,
    /// Our PSK and charon's.
    psk: &'a str,
    charon_psk: &'a str,
    force_nat_t: bool,
    /// Extra lines for charon's connection section.
    charon_extra: &'a [&'a str],
    /// Extra lines for charon's child section.
    charon_child_extra: &'a [&'a str],
    /// Our CHILD SA lifetime in milliseconds (its soft part starts our rekeys).
    child_lifetime_ms: Option<u64>,
    /// Our IKE SA lifetime in milliseconds.
    ike_lifetime_ms: Option<u64>,
}

impl<'a> Case<'a> {
    fn new(ike: &'a str, esp: &'a str, psk: &'a str) -> Self {
        Self {
            ike,
            charon_ike: ike,
            esp,
            psk,
            charon_psk: psk,
            force_nat_t: false,
            charon_extra: &[],
            charon_child_extra: &[],
            child_lifetime_ms: None,
            ike_lifetime_ms: None,
        }
    }
}

impl Setup {
    fn start(case: &Case<'_>) -> Result<Self> {
        let wan = Wan::new()?;
        let site = Netns::new("inisite")?;
        let gw = Netns::new("inigw")?;
        wan.attach(&site, "wan0", net(&format!("{SITE_ADDR}/24")))?;
        wan.attach(&gw, "wan0", net(&format!("{GW_ADDR}/24")))?;
        gw.add_lo_addr(net("10.2.0.1/24"))?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;

        // The connection as the site sees it; charon gets the gateway's view of it.
        let mut conn = Connection::new(
            "site",
            addr(SITE_ADDR),
            addr(GW_ADDR),
            case.charon_psk,
            vec![net(SITE_LAN)],
            vec![net(GW_LAN)],
        );
        conn.local_id = SITE_ID.to_owned();
        conn.remote_id = GW_ID.to_owned();
        conn.ike_proposal = case.charon_ike.to_owned();
        conn.esp_proposal = case.esp.to_owned();
        let mut theirs = conn.mirrored();
        theirs
            .extra
            .extend(case.charon_extra.iter().map(|l| (*l).to_owned()));
        theirs
            .child_extra
            .extend(case.charon_child_extra.iter().map(|l| (*l).to_owned()));
        let charon = Charon::start_with(&gw, &CharonOptions::key_oracle())?;
        charon.load(&[theirs])?;

        let dir = scratch::dir("ike-initiator")?;
        let log = dir.path().join("driver.log");
        let mut cmd = site.command(std::env::current_exe()?);
        cmd.args(["--exact", "driver_process", "--nocapture", "--test-threads=1"])
            .env("IKE_INITIATOR_DRIVER", "1")
            .env("IKE_INITIATOR_LOCAL", SITE_ADDR)
            .env("IKE_INITIATOR_REMOTE", GW_ADDR)
            .env("IKE_INITIATOR_PSK", case.psk)
            .env("IKE_INITIATOR_IKE", case.ike)
            .env("IKE_INITIATOR_ESP", case.esp)
            .env("IKE_INITIATOR_LOCAL_SUBNET", SITE_LAN)
            .env("IKE_INITIATOR_REMOTE_SUBNET", GW_LAN)
            .env("IKE_INITIATOR_LOCAL_ID", SITE_ID)
            .env("IKE_INITIATOR_REMOTE_ID", GW_ID);
        if case.force_nat_t {
            cmd.env("IKE_INITIATOR_FORCE_NAT_T", "1");
        }
        if let Some(ms) = case.child_lifetime_ms {
            cmd.env("IKE_INITIATOR_CHILD_LIFETIME_MS", ms.to_string());
        }
        if let Some(ms) = case.ike_lifetime_ms {
            cmd.env("IKE_INITIATOR_IKE_LIFETIME_MS", ms.to_string());
        }
        let driver = concentrator_e2e::process::Daemon::spawn("ike initiator driver", cmd, &log)?;
        Ok(Self {
            _wan: wan,
            _site: site,
            _gw: gw,
            _dir: dir,
            charon,
            driver,
        })
    }

    /// The first driver log line starting with `prefix`, once it appears.
    fn wait_driver_line(&mut self, prefix: &str) -> Result<String> {
        let log = self.driver.log_path().to_owned();
        let driver = &mut self.driver;
        let charon = &self.charon;
        wait::until(format!("driver line {prefix:?}"), TIMEOUT, || {
            driver.ensure_running()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(match text.lines().find(|l| l.starts_with(prefix)) {
                Some(l) => Probe::Ready(l.to_owned()),
                None => Probe::pending(driver.log_tail(10)),
            })
        })
        .with_context(|| charon.log_tail(30))
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.driver.log_path()).unwrap_or_default()
    }
}

fn establishes(case: &Case<'_>) -> Result<String> {
    let mut s = Setup::start(case)?;
    let ike_line = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let child_line = s.wait_driver_line("EVENT ChildSaInstalled")?;
    ensure!(field(&ike_line, "peer") == Some(GW_ID), "peer ID in {ike_line:?}");
    let child = s
        .charon
        .wait_established("site", "site", TIMEOUT)
        .with_context(|| s.driver.log_tail(20))?;
    let sas = s.charon.list_sas()?;
    let sa = sas.iter().find(|sa| sa.name == "site").context("no IKE SA")?;
    ensure!(sa.state == "ESTABLISHED", "IKE SA state {}", sa.state);
    ensure!(child.state == "INSTALLED", "child state {}", child.state);
    ensure!(
        sa.fields.get("initiator-spi").map(String::as_str) == field(&ike_line, "spi_i"),
        "strongSwan's IKE SA {:?} is not ours: {ike_line}",
        sa.fields
    );
    // Their inbound SA is our outbound one and vice versa.
    let (their_in, their_out) = (child.fields.get("spi-in"), child.fields.get("spi-out"));
    ensure!(
        their_in.map(String::as_str) == field(&child_line, "spi_out")
            && their_out.map(String::as_str) == field(&child_line, "spi_in"),
        "SPIs differ: strongSwan in={their_in:?} out={their_out:?}, ours: {child_line}"
    );
    ensure!(
        field(&child_line, "ts_local") == Some("10.1.0.0-10.1.0.255")
            && field(&child_line, "ts_remote") == Some("10.2.0.0-10.2.0.255"),
        "traffic selectors in {child_line:?}"
    );
    // RFC 7296 §2.17: the initiator-to-responder keys (charon's "initiator key") protect our
    // outbound SA.
    let log = std::fs::read_to_string(s.charon.log_path())?;
    for (label, ours) in [
        ("encryption initiator key", "out_key"),
        ("encryption responder key", "in_key"),
        ("integrity initiator key", "out_integ"),
        ("integrity responder key", "in_integ"),
    ] {
        let theirs = charon_dumps(&log, label);
        let theirs = theirs.first().map_or("-", String::as_str);
        ensure!(
            Some(theirs) == field(&child_line, ours),
            "{label}: charon {theirs}, ours {:?}",
            field(&child_line, ours)
        );
    }
    let driver = s.driver_log();
    ensure!(
        !driver
            .lines()
            .any(|l| l.starts_with("EVENT Failed") || l.starts_with("EVENT RequestRefused")),
        "driver trouble:\n{driver}"
    );
    eprintln!(
        "{}/{}: strongSwan child {child:?}\nours: {ike_line}\n{child_line}",
        case.ike, case.esp
    );
    Ok(driver)
}

fn matrix(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    establishes(&Case::new(ike, esp, &psk)).map(drop)
}

#[test]
fn establishes_with_strongswan_aes128gcm16_prfsha256_x25519() -> Result<()> {
    matrix("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn establishes_with_strongswan_aes256gcm16_prfsha384_ecp384() -> Result<()> {
    matrix("aes256gcm16-prfsha384-ecp384", "aes256gcm16")
}

#[test]
fn establishes_with_strongswan_chacha20poly1305_prfsha256_x25519() -> Result<()> {
    matrix("chacha20poly1305-prfsha256-x25519", "chacha20poly1305")
}

#[test]
fn establishes_with_strongswan_aes256_sha256_modp2048() -> Result<()> {
    matrix("aes256-sha256-modp2048", "aes256-sha256")
}

#[test]
fn establishes_with_strongswan_aes128_sha256_ecp256() -> Result<()> {
    matrix("aes128-sha256-ecp256", "aes128-sha256")
}

#[test]
fn retries_with_strongswans_group_after_invalid_ke_payload() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    // We guess P-256; charon takes only X25519, which we offer too.
    let case = Case {
        charon_ike: "aes128gcm16-prfsha256-x25519",
        ..Case::new("aes128gcm16-prfsha256-ecp256-x25519", "aes128gcm16", &psk)
    };
    establishes(&case)?;
    Ok(())
}

#[test]
fn floats_to_4500_when_forced() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let case = Case {
        force_nat_t: true,
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16", &psk)
    };
    let driver = establishes(&case)?;
    let ike = driver
        .lines()
        .find(|l| l.starts_with("EVENT IkeSaEstablished"))
        .unwrap_or_default();
    ensure!(field(ike, "remote") == Some("192.0.2.2:4500"), "{ike}");
    let child = driver
        .lines()
        .find(|l| l.starts_with("EVENT ChildSaInstalled"))
        .unwrap_or_default();
    ensure!(field(child, "encap") == Some("true"), "{child}");
    Ok(())
}

#[test]
fn wrong_psk_fails_with_authentication_failed() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let case = Case {
        charon_psk: "the-right-psk",
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16", "a-wrong-psk")
    };
    let mut s = Setup::start(&case)?;
    let failed = s.wait_driver_line("EVENT Failed")?;
    ensure!(
        failed.contains("notify=Some(AUTHENTICATION_FAILED)"),
        "{failed}\n{}",
        s.charon.log_tail(20)
    );
    let driver = s.driver_log();
    ensure!(!driver.contains("EVENT IkeSaEstablished"), "{driver}");
    let log = s.charon.log_path().to_owned();
    // charon abbreviates the notify in its message logs.
    wait::until("charon to log the failed authentication", TIMEOUT, || {
        Ok(if logs::contains(&log, "N(AUTH_FAILED)") {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })?;
    ensure!(
        s.charon.list_sas()?.iter().all(|sa| sa.state != "ESTABLISHED"),
        "strongSwan established an IKE SA with a wrong PSK"
    );
    Ok(())
}

#[test]
fn answers_strongswans_liveness_checks_and_delete() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    // strongSwan checks liveness after a second without traffic (RFC 7296 §2.4).
    let case = Case {
        charon_extra: &["dpd_delay = 1s"],
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16", &psk)
    };
    let mut s = Setup::start(&case)?;
    s.wait_driver_line("EVENT ChildSaInstalled")?;
    s.charon.wait_established("site", "site", TIMEOUT)?;
    let log = s.charon.log_path().to_owned();
    wait::until("two answered liveness checks of charon", TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let n = text.matches("parsed INFORMATIONAL response").count();
        Ok(if n >= 2 {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{n} so far"))
        })
    })
    .with_context(|| s.driver.log_tail(20))?;
    // Then its DELETE, which we answer and report.
    s.charon
        .swanctl(&["--terminate", "--ike", "site", "--timeout", "10"])?;
    let deleted = s.wait_driver_line("EVENT IkeSaDeleted")?;
    ensure!(field(&deleted, "reason") == Some("PeerDeleted"), "{deleted}");
    let log = s.driver_log();
    ensure!(
        log.lines()
            .filter(|l| l.starts_with("EVENT ChildSaDeleted"))
            .count()
            == 1,
        "{log}"
    );
    ensure!(
        s.charon.list_sas()?.iter().all(|sa| sa.name != "site"),
        "strongSwan still lists the IKE SA"
    );
    Ok(())
}

#[test]
fn answers_strongswans_child_sa_rekey_with_pfs() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    // charon, the responder, rekeys the CHILD SA every 3 s with a new X25519 exchange; its
    // hard lifetime stays out of the way.
    let case = Case {
        charon_child_extra: &["rekey_time = 3s", "life_time = 30s", "rand_time = 0s"],
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16-x25519", &psk)
    };
    let mut s = Setup::start(&case)?;
    let first = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let log = s.driver.log_path().to_owned();
    let rekeyed = wait::until("a CHILD SA rekeyed by charon", Duration::from_secs(20), || {
        s.driver.ensure_running()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .find(|l| l.starts_with("EVENT ChildSaInstalled") && field(l, "replaces") != Some("-"));
        Ok(match found {
            Some(l) => Probe::Ready(l.to_owned()),
            None => Probe::pending(s.driver.log_tail(5)),
        })
    })
    .with_context(|| s.charon.log_tail(30))?;
    ensure!(
        field(&rekeyed, "replaces") == field(&first, "spi_in"),
        "{rekeyed} does not replace {first}"
    );
    // charon deletes the CHILD SA it replaced (RFC 7296 §2.8).
    let old = field(&first, "spi_in").unwrap_or_default().to_owned();
    wait::until("the replaced CHILD SA's deletion", TIMEOUT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let deleted = text
            .lines()
            .any(|l| l.starts_with("EVENT ChildSaDeleted") && field(l, "spi_in") == Some(old.as_str()));
        Ok(if deleted {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })?;
    // The new keys are charon's (KEYMAT with the new DH secret, RFC 7296 §2.17); charon
    // initiated this exchange, so its "initiator key" protects our inbound SA.
    let charon_log = std::fs::read_to_string(s.charon.log_path())?;
    for (label, ours) in [
        ("encryption initiator key", "in_key"),
        ("encryption responder key", "out_key"),
    ] {
        let theirs = charon_dumps(&charon_log, label);
        ensure!(
            theirs.get(1).map(String::as_str) == field(&rekeyed, ours),
            "{label}: charon {theirs:?}, ours {rekeyed}"
        );
    }
    let driver = s.driver_log();
    ensure!(
        !driver
            .lines()
            .any(|l| l.starts_with("EVENT Failed") || l.starts_with("EVENT RequestRefused")),
        "driver trouble:\n{driver}"
    );
    s.charon.wait_established("site", "site", TIMEOUT)?;
    Ok(())
}

/// Our initiator rekeys the CHILD SA at its soft lifetime (a 4 s lifetime: every 3.4 to
/// 3.8 s) while strongSwan's lifetimes are long: CREATE_CHILD_SA with N(REKEY_SA) and PFS
/// from our side (RFC 7296 §1.3.3), then our DELETE of the old SA; strongSwan ends up on
/// our latest CHILD SA.
#[test]
fn rekeys_its_child_sa_with_pfs_at_our_soft_lifetime() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let case = Case {
        child_lifetime_ms: Some(4000),
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16-x25519", &psk)
    };
    let mut s = Setup::start(&case)?;
    let mut previous = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let log = s.driver.log_path().to_owned();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    for round in 0..2 {
        let want = field(&previous, "spi_in").unwrap_or_default().to_owned();
        let rekeyed = wait::until(format!("our rekey {round}"), Duration::from_secs(20), || {
            s.driver.ensure_running()?;
            let found = read()
                .lines()
                .find(|l| {
                    l.starts_with("EVENT ChildSaInstalled") && field(l, "replaces") == Some(want.as_str())
                })
                .map(str::to_owned);
            Ok(match found {
                Some(l) => Probe::Ready(l),
                None => Probe::pending(s.driver.log_tail(5)),
            })
        })
        .with_context(|| s.charon.log_tail(30))?;
        wait::until(format!("deletion of {want}"), TIMEOUT, || {
            let deleted = read()
                .lines()
                .any(|l| l.starts_with("EVENT ChildSaDeleted") && field(l, "spi_in") == Some(want.as_str()));
            Ok(if deleted {
                Probe::Ready(())
            } else {
                Probe::pending("not yet")
            })
        })?;
        previous = rekeyed;
    }
    // RFC 7296 §2.17: we initiated the exchange, so charon's "initiator key" of the first
    // rekeyed SA protects our outbound direction.
    let driver = s.driver_log();
    let second = driver
        .lines()
        .filter(|l| l.starts_with("EVENT ChildSaInstalled"))
        .nth(1)
        .context("no rekeyed CHILD SA")?
        .to_owned();
    let charon_log = std::fs::read_to_string(s.charon.log_path())?;
    for (label, ours) in [
        ("encryption initiator key", "out_key"),
        ("encryption responder key", "in_key"),
    ] {
        let theirs = charon_dumps(&charon_log, label);
        ensure!(
            theirs.get(1).map(String::as_str) == field(&second, ours),
            "{label}: charon {theirs:?}, ours {second}"
        );
    }
    let want_in = field(&previous, "spi_out").unwrap_or_default().to_owned();
    let child = wait::until("strongSwan on our latest CHILD SA", TIMEOUT, || {
        let sas = s.charon.list_sas()?;
        let found = sas
            .iter()
            .filter(|sa| sa.name == "site" && sa.state == "ESTABLISHED")
            .flat_map(|sa| sa.children.iter())
            .find(|c| c.fields.get("spi-in") == Some(&want_in) && c.state == "INSTALLED")
            .cloned();
        Ok(match found {
            Some(c) => Probe::Ready(c),
            None => Probe::pending(format!("{sas:?}")),
        })
    })?;
    ensure!(
        child.fields.get("spi-out").map(String::as_str) == field(&previous, "spi_in"),
        "strongSwan {child:?}, ours {previous}"
    );
    ensure!(
        !driver
            .lines()
            .any(|l| l.starts_with("EVENT Failed") || l.starts_with("EVENT RequestRefused")),
        "driver trouble:\n{driver}"
    );
    Ok(())
}

/// Our initiator rekeys the IKE SA at its soft lifetime (a 5 s lifetime: every 4.25 to
/// 4.75 s), twice, while strongSwan's lifetimes are long (RFC 7296 §1.3.2, §2.18): strongSwan
/// ends up with one IKE SA, the newest, ESTABLISHED with our new SPIs and the CHILD SA
/// INSTALLED on it; nothing failed and the IKE SA was never deleted.
#[test]
fn rekeys_its_ike_sa_at_our_soft_lifetime() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let case = Case {
        ike_lifetime_ms: Some(5000),
        ..Case::new("aes128gcm16-prfsha256-x25519", "aes128gcm16", &psk)
    };
    let mut s = Setup::start(&case)?;
    let child = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let log = s.driver.log_path().to_owned();
    let newest = wait::until("two IKE SA rekeys of ours", Duration::from_secs(25), || {
        s.driver.ensure_running()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let spis: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("SPIS"))
            .map(str::to_owned)
            .collect();
        Ok(if spis.len() >= 3 {
            Probe::Ready(spis[2].clone())
        } else {
            Probe::pending(s.driver.log_tail(5))
        })
    })
    .with_context(|| s.charon.log_tail(30))?;
    let (spi_i, spi_r) = (field(&newest, "spi_i"), field(&newest, "spi_r"));
    let child_in = field(&child, "spi_out").unwrap_or_default().to_owned();
    wait::until("strongSwan on our newest IKE SA only", TIMEOUT, || {
        let sas = s.charon.list_sas()?;
        let ike: Vec<_> = sas.iter().filter(|sa| sa.name == "site").collect();
        let ok = ike.len() == 1
            && ike.iter().all(|sa| {
                sa.state == "ESTABLISHED"
                    && sa.fields.get("initiator-spi").map(String::as_str) == spi_i
                    && sa.fields.get("responder-spi").map(String::as_str) == spi_r
                    && sa
                        .children
                        .iter()
                        .any(|c| c.state == "INSTALLED" && c.fields.get("spi-in") == Some(&child_in))
            });
        Ok(if ok {
            Probe::Ready(())
        } else {
            Probe::pending(format!("{sas:?}"))
        })
    })?;
    let driver = s.driver_log();
    ensure!(
        !driver.lines().any(|l| l.starts_with("EVENT Failed")
            || l.starts_with("EVENT RequestRefused")
            || l.starts_with("EVENT IkeSaDeleted")),
        "driver trouble:\n{driver}"
    );
    Ok(())
}
