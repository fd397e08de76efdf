//! The responder state machine against a real strongSwan initiator: a strongSwan site in one
//! namespace initiates to our responder in another, both on one WAN bridge.
//!
//! The responder runs in a thin driver (blocking UDP on ports 500 and 4500, one thread per
//! socket feeding a channel, `Instant::now()` at each datagram, a static PSK answering
//! `PeerIdentified`). The test binary re-executes itself inside the gateway namespace to run
//! the driver: `driver_process` does nothing unless `IKE_DRIVER` is set. The driver prints
//! one `EVENT ...` line per event, which the test reads from its log.
//!
//! As non-root every test prints SKIP and passes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_crds::proposal::{parse_esp, parse_ike};
use concentrator_e2e::netns::{self, Netns, Wan};
use concentrator_e2e::strongswan::{self, Charon, CharonOptions, Connection};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq, scratch};
use concentrator_ike::negotiate::ts_bounds;
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{Config, IdBuf, SystemEntropy};
use concentrator_ike::{Event, Header, Responder};
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

/// The driver: runs until killed when `IKE_DRIVER` is set, else returns at once.
#[test]
fn driver_process() -> Result<()> {
    if std::env::var_os("IKE_DRIVER").is_none() {
        return Ok(());
    }
    let listen: IpAddr = env("IKE_DRIVER_LISTEN")?.parse()?;
    let psk = env("IKE_DRIVER_PSK")?.into_bytes();
    let config = Arc::new(Config {
        ike_proposals: vec![parse_ike("ike", &env("IKE_DRIVER_IKE")?)?],
        esp_proposals: vec![parse_esp("esp", &env("IKE_DRIVER_ESP")?)?],
        local_subnet: env("IKE_DRIVER_LOCAL_SUBNET")?.parse()?,
        remote_subnet: env("IKE_DRIVER_REMOTE_SUBNET")?.parse()?,
        local_id: IdBuf::new(&Identity::Fqdn(env("IKE_DRIVER_LOCAL_ID")?.as_bytes())),
        child_lifetime: Duration::from_secs(3600),
    });
    let s500 = UdpSocket::bind((listen, 500)).context("binding UDP 500")?;
    let s4500 = UdpSocket::bind((listen, 4500)).context("binding UDP 4500")?;
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
    println!("READY");
    let mut entropy = SystemEntropy;
    let mut sas: HashMap<u64, Responder> = HashMap::new();
    while let Ok((port, remote, data)) = rx.recv() {
        // RFC 3948 §2.2: on port 4500, IKE messages start with four zero octets (the
        // non-ESP marker); anything else is ESP, which this driver does not handle.
        let ike = if port == 4500 {
            match data.strip_prefix(&[0, 0, 0, 0][..]) {
                Some(rest) => rest,
                None => continue,
            }
        } else {
            &data[..]
        };
        let Some((header, _)) = Header::peek(ike) else {
            continue;
        };
        let local = SocketAddr::new(listen, port);
        let r = sas
            .entry(header.spi_i)
            .or_insert_with(|| Responder::new(Arc::clone(&config)));
        let now = Instant::now();
        if let Err(e) = r.handle_datagram(now, local, remote, ike, &mut entropy) {
            println!("DROP {e}");
        }
        loop {
            while let Some(t) = r.poll_transmit() {
                let mut out = Vec::with_capacity(t.payload.len() + 4);
                let sock = if t.local.port() == 4500 {
                    out.extend_from_slice(&[0, 0, 0, 0]);
                    &s4500
                } else {
                    &s500
                };
                out.extend_from_slice(&t.payload);
                sock.send_to(&out, t.remote)?;
            }
            let Some(ev) = r.poll_event() else { break };
            match ev {
                Event::PeerIdentified { id } => {
                    println!("EVENT PeerIdentified id={id}");
                    if let Err(e) = r.provide_psk(Instant::now(), Some(&psk), &mut entropy) {
                        println!("DROP {e}");
                    }
                }
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
                    let ts = |v: &[concentrator_ike::payload::TrafficSelector<'_>]| {
                        v.iter()
                            .filter_map(ts_bounds)
                            .map(|(a, b)| format!("{a}-{b}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    // Test only: the keys go to the driver log so that the test can compare
                    // them with the ones charon logs (key-oracle mode).
                    let key = |k: &concentrator_crypto::DirectionKeys| {
                        hex(&[k.encr.expose(), k.salt.expose()].concat())
                    };
                    println!(
                        "EVENT ChildSaInstalled spi_in={:08x} spi_out={:08x} encr={:?} integ={:?} \
                         in_key={} in_integ={} out_key={} out_integ={} ts_local={} ts_remote={} encap={}",
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
                    );
                }
                Event::Failed(e) => println!("EVENT Failed {e}"),
            }
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".to_owned();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first hex dump `"<label> => N bytes @ 0x..."` in a charon log (`chd = 4`), as hex.
fn charon_dump(log: &str, label: &str) -> Option<String> {
    let mut lines = log.lines();
    while let Some(line) = lines.next() {
        let Some((head, tail)) = line.split_once(" => ") else {
            continue;
        };
        if !head.ends_with(label) {
            continue;
        }
        let n: usize = tail.split_once(" bytes @ ")?.0.trim().parse().ok()?;
        let mut bytes = Vec::with_capacity(n);
        while bytes.len() < n {
            let (_, dump) = lines.next()?.split_once(": ")?;
            for tok in dump.split(' ').take_while(|t| !t.is_empty()).take(16) {
                bytes.push(u8::from_str_radix(tok, 16).ok()?);
            }
        }
        bytes.truncate(n);
        return Some(hex(&bytes));
    }
    None
}

fn net(s: &str) -> IpNet {
    s.parse().expect("valid prefix")
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

/// Both namespaces, the driver and a charon; dropped in reverse order.
struct Setup {
    _wan: Wan,
    site: Netns,
    _gw: Netns,
    _dir: tempfile::TempDir,
    driver: concentrator_e2e::process::Daemon,
    charon: Charon,
}

impl Setup {
    fn start(ike: &str, esp: &str, driver_psk: &str) -> Result<Self> {
        let wan = Wan::new()?;
        let site = Netns::new("ikesite")?;
        let gw = Netns::new("ikegw")?;
        wan.attach(&site, "wan0", net(&format!("{SITE_ADDR}/24")))?;
        wan.attach(&gw, "wan0", net(&format!("{GW_ADDR}/24")))?;
        site.add_lo_addr(net("10.1.0.1/24"))?;
        site.wait_reachable(None, addr(GW_ADDR), Duration::from_secs(5))?;

        let dir = scratch::dir("ike-driver")?;
        let log = dir.path().join("driver.log");
        let mut cmd = gw.command(std::env::current_exe()?);
        cmd.args(["--exact", "driver_process", "--nocapture", "--test-threads=1"])
            .env("IKE_DRIVER", "1")
            .env("IKE_DRIVER_LISTEN", GW_ADDR)
            .env("IKE_DRIVER_PSK", driver_psk)
            .env("IKE_DRIVER_IKE", ike)
            .env("IKE_DRIVER_ESP", esp)
            .env("IKE_DRIVER_LOCAL_SUBNET", GW_LAN)
            .env("IKE_DRIVER_REMOTE_SUBNET", SITE_LAN)
            .env("IKE_DRIVER_LOCAL_ID", GW_ID);
        let mut driver = concentrator_e2e::process::Daemon::spawn("ike driver", cmd, &log)?;
        wait::until("the IKE driver to bind", Duration::from_secs(10), || {
            driver.ensure_running()?;
            Ok(if logs::contains(&log, "READY") {
                Probe::Ready(())
            } else {
                Probe::pending(driver.log_tail(5))
            })
        })?;
        let charon = Charon::start_with(&site, &CharonOptions::key_oracle())?;
        Ok(Self {
            _wan: wan,
            site,
            _gw: gw,
            _dir: dir,
            driver,
            charon,
        })
    }

    fn connection(&self, ike: &str, esp: &str, psk: &str) -> Connection {
        let _ = &self.site;
        let mut c = Connection::new(
            "gw",
            addr(SITE_ADDR),
            addr(GW_ADDR),
            psk,
            vec![net(SITE_LAN)],
            vec![net(GW_LAN)],
        );
        c.local_id = SITE_ID.to_owned();
        c.remote_id = GW_ID.to_owned();
        c.ike_proposal = ike.to_owned();
        c.esp_proposal = esp.to_owned();
        c
    }

    /// The first driver log line starting with `prefix`, once it appears.
    fn wait_driver_line(&mut self, prefix: &str) -> Result<String> {
        let log = self.driver.log_path().to_owned();
        let driver = &mut self.driver;
        wait::until(format!("driver line {prefix:?}"), TIMEOUT, || {
            driver.ensure_running()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(match text.lines().find(|l| l.starts_with(prefix)) {
                Some(l) => Probe::Ready(l.to_owned()),
                None => Probe::pending(driver.log_tail(10)),
            })
        })
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn establishes(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = Setup::start(ike, esp, &psk)?;
    s.charon.load(&[s.connection(ike, esp, &psk)])?;
    s.charon.initiate("gw").with_context(|| s.driver.log_tail(20))?;
    let child = s
        .charon
        .wait_established("gw", "gw", TIMEOUT)
        .with_context(|| s.driver.log_tail(20))?;
    let ike_line = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let child_line = s.wait_driver_line("EVENT ChildSaInstalled")?;
    ensure!(
        field(&ike_line, "peer") == Some(SITE_ID),
        "peer ID in {ike_line:?}"
    );
    // Their inbound SA is our outbound one and vice versa.
    let (their_in, their_out) = (child.fields.get("spi-in"), child.fields.get("spi-out"));
    ensure!(
        their_in.map(String::as_str) == field(&child_line, "spi_out")
            && their_out.map(String::as_str) == field(&child_line, "spi_in"),
        "SPIs differ: strongSwan in={their_in:?} out={their_out:?}, ours: {child_line}"
    );
    ensure!(
        field(&child_line, "ts_local") == Some("10.2.0.0-10.2.0.255")
            && field(&child_line, "ts_remote") == Some("10.1.0.0-10.1.0.255"),
        "traffic selectors in {child_line:?}"
    );
    // The CHILD SA keys are charon's (RFC 7296 §2.17 KEYMAT): initiator-to-responder keys
    // protect our inbound SA.
    let log = std::fs::read_to_string(s.charon.log_path())?;
    for (label, ours) in [
        ("encryption initiator key", "in_key"),
        ("encryption responder key", "out_key"),
        ("integrity initiator key", "in_integ"),
        ("integrity responder key", "out_integ"),
    ] {
        let theirs = charon_dump(&log, label);
        let theirs = theirs.as_deref().unwrap_or("-");
        ensure!(
            Some(theirs) == field(&child_line, ours),
            "{label}: charon {theirs}, ours {:?}",
            field(&child_line, ours)
        );
    }
    eprintln!("{ike}/{esp}: strongSwan child {child:?}\nours: {ike_line}\n{child_line}");
    let sas = s.charon.list_sas()?;
    let sa = sas.iter().find(|sa| sa.name == "gw").context("no IKE SA")?;
    ensure!(sa.state == "ESTABLISHED", "IKE SA state {}", sa.state);
    ensure!(child.state == "INSTALLED", "child state {}", child.state);
    Ok(())
}

#[test]
fn strongswan_establishes_with_aes128gcm16_prfsha256_x25519() -> Result<()> {
    establishes("aes128gcm16-prfsha256-x25519", "aes128gcm16")
}

#[test]
fn strongswan_establishes_with_aes256gcm16_prfsha384_ecp384() -> Result<()> {
    establishes("aes256gcm16-prfsha384-ecp384", "aes256gcm16")
}

#[test]
fn strongswan_establishes_with_chacha20poly1305_prfsha256_x25519() -> Result<()> {
    establishes("chacha20poly1305-prfsha256-x25519", "chacha20poly1305")
}

#[test]
fn strongswan_establishes_with_aes256_sha256_modp2048() -> Result<()> {
    establishes("aes256-sha256-modp2048", "aes256-sha256")
}

#[test]
fn strongswan_establishes_with_aes128_sha256_ecp256() -> Result<()> {
    establishes("aes128-sha256-ecp256", "aes128-sha256")
}

#[test]
fn wrong_psk_is_rejected_with_authentication_failed() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let mut s = Setup::start(ike, "aes128gcm16", "the-right-psk")?;
    s.charon
        .load(&[s.connection(ike, "aes128gcm16", "a-wrong-psk")])?;
    // swanctl reports the failed initiation as an error; the logs say why.
    let _ = s.charon.initiate("gw");
    let log = s.charon.log_path().to_owned();
    wait::until("strongSwan to log AUTHENTICATION_FAILED", TIMEOUT, || {
        Ok(if logs::contains(&log, "AUTHENTICATION_FAILED") {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })
    .with_context(|| format!("{}\n{}", s.charon.log_tail(30), s.driver.log_tail(20)))?;
    let failed = s.wait_driver_line("EVENT Failed")?;
    ensure!(failed.contains("authentication failed"), "{failed}");
    let text = std::fs::read_to_string(s.driver.log_path())?;
    if text.contains("EVENT IkeSaEstablished") || text.contains("EVENT ChildSaInstalled") {
        bail!("the responder established an SA with a wrong PSK:\n{text}");
    }
    ensure!(
        s.charon.list_sas()?.iter().all(|sa| sa.state != "ESTABLISHED"),
        "strongSwan established an IKE SA with a wrong PSK"
    );
    Ok(())
}
