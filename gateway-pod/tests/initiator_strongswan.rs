//! The initiator state machine against a real strongSwan responder: our initiator in a site
//! namespace connects to charon (kernel-libipsec) in a gateway namespace, both on one WAN
//! bridge.
//!
//! The initiator runs in a thin driver ([`concentrator_test_util::interop`]): the test binary
//! re-executes itself inside the site namespace to run it: `driver_process` does nothing
//! unless `IKE_INITIATOR_DRIVER` is set. The driver prints one `EVENT ...` line per event,
//! which the test reads from its log, and keeps answering the responder until it is killed.
//!
//! charon's key log (`chd = 4`) is the oracle for the CHILD SA keys; `swanctl --list-sas`
//! must show the SAs ESTABLISHED / INSTALLED. As non-root every test prints SKIP and passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns;
use concentrator_e2e::strongswan;
use concentrator_e2e::topology::{GW_ADDR, GW_ID, GW_LAN, SITE_ADDR, SITE_ID, SITE_LAN, site_connection};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq};
use concentrator_ike::initiator::{Event, Initiator};
use concentrator_ike::responder::SystemEntropy;
use concentrator_test_util::interop::{
    Interop, Sockets, TIMEOUT, child_sa_installed, driver_addrs, ensure_charon_keys, env, field,
    ike_sa_established, initiator_config, lines_with,
};

/// The driver: runs until killed when `IKE_INITIATOR_DRIVER` is set, else returns at once.
#[test]
fn driver_process() -> Result<()> {
    let Some((local, remote)) = driver_addrs("IKE_INITIATOR_DRIVER", "IKE_INITIATOR")? else {
        return Ok(());
    };
    let mut config = initiator_config(
        &env("IKE_INITIATOR_IKE")?,
        &env("IKE_INITIATOR_ESP")?,
        (
            &env("IKE_INITIATOR_LOCAL_SUBNET")?,
            &env("IKE_INITIATOR_REMOTE_SUBNET")?,
        ),
        (&env("IKE_INITIATOR_LOCAL_ID")?, &env("IKE_INITIATOR_REMOTE_ID")?),
    )?;
    config.nat_t.force = std::env::var_os("IKE_INITIATOR_FORCE_NAT_T").is_some();
    if let Ok(ms) = std::env::var("IKE_INITIATOR_CHILD_LIFETIME_MS") {
        config.child_lifetime = Duration::from_millis(ms.parse()?);
    }
    if let Ok(ms) = std::env::var("IKE_INITIATOR_IKE_LIFETIME_MS") {
        config.ike_lifetime = Some(Duration::from_millis(ms.parse()?));
    }
    let psk = env("IKE_INITIATOR_PSK")?.into_bytes();
    let sockets = Sockets::bind(local)?;
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
        drain(&mut i, &sockets)?;
        // The IKE SA in use, printed when it changes (a rekey).
        if i.ike_spis() != spis {
            spis = i.ike_spis();
            if let Some((a, b)) = spis {
                println!("SPIS spi_i={a:016x} spi_r={b:016x}");
            }
        }
        match sockets.recv(i.poll_timeout()) {
            Ok(d) => {
                if let Err(e) = i.handle_datagram(Instant::now(), d.local, d.remote, &d.ike, &mut entropy) {
                    println!("DROP {e}");
                }
            }
            Err(RecvTimeoutError::Timeout) => i.handle_timeout(Instant::now(), &mut entropy),
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

/// Sends what the initiator queued (on the NAT-T path once floated) and prints its events.
fn drain(i: &mut Initiator, sockets: &Sockets) -> Result<()> {
    let floated = i.floated();
    while let Some(t) = i.poll_transmit() {
        sockets.send(floated, &t.payload, t.remote)?;
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
                "{}",
                ike_sa_established(spi_i, spi_r, &peer_id, remote, nat_detected)
            ),
            Event::ChildSaInstalled(c) => println!("{}", child_sa_installed(&c)),
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

    /// Both namespaces, charon with the gateway's view of the connection, and our driver.
    fn start(&self) -> Result<Interop> {
        let mut theirs =
            site_connection("site", SITE_ADDR, self.charon_ike, self.esp, self.charon_psk).mirrored();
        theirs
            .extra
            .extend(self.charon_extra.iter().map(|l| (*l).to_owned()));
        theirs
            .child_extra
            .extend(self.charon_child_extra.iter().map(|l| (*l).to_owned()));
        let mut env = vec![
            ("IKE_INITIATOR_DRIVER", "1".to_owned()),
            ("IKE_INITIATOR_LOCAL", SITE_ADDR.to_owned()),
            ("IKE_INITIATOR_REMOTE", GW_ADDR.to_owned()),
            ("IKE_INITIATOR_PSK", self.psk.to_owned()),
            ("IKE_INITIATOR_IKE", self.ike.to_owned()),
            ("IKE_INITIATOR_ESP", self.esp.to_owned()),
            ("IKE_INITIATOR_LOCAL_SUBNET", SITE_LAN.to_owned()),
            ("IKE_INITIATOR_REMOTE_SUBNET", GW_LAN.to_owned()),
            ("IKE_INITIATOR_LOCAL_ID", SITE_ID.to_owned()),
            ("IKE_INITIATOR_REMOTE_ID", GW_ID.to_owned()),
        ];
        if self.force_nat_t {
            env.push(("IKE_INITIATOR_FORCE_NAT_T", "1".to_owned()));
        }
        if let Some(ms) = self.child_lifetime_ms {
            env.push(("IKE_INITIATOR_CHILD_LIFETIME_MS", ms.to_string()));
        }
        if let Some(ms) = self.ike_lifetime_ms {
            env.push(("IKE_INITIATOR_IKE_LIFETIME_MS", ms.to_string()));
        }
        Interop::initiator(&theirs, &env)
    }
}

/// Nothing in the driver log says the negotiation failed or a request was declined.
fn ensure_no_trouble(driver: &str) -> Result<()> {
    ensure!(
        !driver
            .lines()
            .any(|l| l.starts_with("EVENT Failed") || l.starts_with("EVENT RequestRefused")),
        "driver trouble:\n{driver}"
    );
    Ok(())
}

/// The first `ChildSaInstalled` line that replaces the CHILD SA `want` replaces (`None`: any
/// rekeyed one), once our driver reported it within `timeout`.
fn wait_rekeyed(s: &mut Interop, what: String, timeout: Duration, want: Option<&str>) -> Result<String> {
    s.wait_driver(what, timeout, |log| {
        log.lines()
            .find(|l| {
                l.starts_with("EVENT ChildSaInstalled")
                    && match want {
                        Some(w) => field(l, "replaces") == Some(w),
                        None => field(l, "replaces") != Some("-"),
                    }
            })
            .map(str::to_owned)
    })
}

/// Waits until our driver reported the deletion of the CHILD SA whose `spi_in` is `spi_in`.
fn wait_child_deleted(s: &mut Interop, spi_in: &str) -> Result<()> {
    s.wait_driver(format!("deletion of {spi_in}"), TIMEOUT, |log| {
        log.lines()
            .any(|l| l.starts_with("EVENT ChildSaDeleted") && field(l, "spi_in") == Some(spi_in))
            .then_some(())
    })
}

fn establishes(case: &Case<'_>) -> Result<String> {
    let mut s = case.start()?;
    let ike_line = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let child_line = s.wait_driver_line("EVENT ChildSaInstalled")?;
    ensure!(field(&ike_line, "peer") == Some(GW_ID), "peer ID in {ike_line:?}");
    let child = s
        .charon()
        .wait_established("site", "site", TIMEOUT)
        .with_context(|| s.driver.log_tail(20))?;
    let sas = s.charon().list_sas()?;
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
    ensure_charon_keys(
        &s.charon_log()?,
        0,
        &child_line,
        &[
            ("encryption initiator key", "out_key"),
            ("encryption responder key", "in_key"),
            ("integrity initiator key", "out_integ"),
            ("integrity responder key", "in_integ"),
        ],
    )?;
    let driver = s.driver_log();
    ensure_no_trouble(&driver)?;
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

mod establishes_with_strongswan {
    concentrator_test_util::proposal_matrix!(super::matrix);
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
    let mut s = case.start()?;
    let failed = s.wait_driver_line("EVENT Failed")?;
    ensure!(
        failed.contains("notify=Some(AUTHENTICATION_FAILED)"),
        "{failed}\n{}",
        s.charon().log_tail(20)
    );
    let driver = s.driver_log();
    ensure!(!driver.contains("EVENT IkeSaEstablished"), "{driver}");
    let log = s.charon().log_path().to_owned();
    // charon abbreviates the notify in its message logs.
    wait::until("charon to log the failed authentication", TIMEOUT, || {
        Ok(if logs::contains(&log, "N(AUTH_FAILED)") {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })?;
    ensure!(
        s.charon().list_sas()?.iter().all(|sa| sa.state != "ESTABLISHED"),
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
    let mut s = case.start()?;
    s.wait_driver_line("EVENT ChildSaInstalled")?;
    s.charon().wait_established("site", "site", TIMEOUT)?;
    let log = s.charon().log_path().to_owned();
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
    s.charon()
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
        s.charon().list_sas()?.iter().all(|sa| sa.name != "site"),
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
    let mut s = case.start()?;
    let first = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let rekeyed = wait_rekeyed(
        &mut s,
        "a CHILD SA rekeyed by charon".to_owned(),
        Duration::from_secs(20),
        None,
    )?;
    ensure!(
        field(&rekeyed, "replaces") == field(&first, "spi_in"),
        "{rekeyed} does not replace {first}"
    );
    // charon deletes the CHILD SA it replaced (RFC 7296 §2.8).
    wait_child_deleted(&mut s, field(&first, "spi_in").unwrap_or_default())?;
    // The new keys are charon's (KEYMAT with the new DH secret, RFC 7296 §2.17); charon
    // initiated this exchange, so its "initiator key" protects our inbound SA.
    ensure_charon_keys(
        &s.charon_log()?,
        1,
        &rekeyed,
        &[
            ("encryption initiator key", "in_key"),
            ("encryption responder key", "out_key"),
        ],
    )?;
    ensure_no_trouble(&s.driver_log())?;
    s.charon().wait_established("site", "site", TIMEOUT)?;
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
    let mut s = case.start()?;
    let mut previous = s.wait_driver_line("EVENT ChildSaInstalled")?;
    for round in 0..2 {
        let want = field(&previous, "spi_in").unwrap_or_default().to_owned();
        let rekeyed = wait_rekeyed(
            &mut s,
            format!("our rekey {round}"),
            Duration::from_secs(20),
            Some(&want),
        )?;
        wait_child_deleted(&mut s, &want)?;
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
    ensure_charon_keys(
        &s.charon_log()?,
        1,
        &second,
        &[
            ("encryption initiator key", "out_key"),
            ("encryption responder key", "in_key"),
        ],
    )?;
    let want_in = field(&previous, "spi_out").unwrap_or_default().to_owned();
    let child = wait::until("strongSwan on our latest CHILD SA", TIMEOUT, || {
        let sas = s.charon().list_sas()?;
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
    ensure_no_trouble(&driver)?;
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
    let mut s = case.start()?;
    let child = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let newest = s.wait_driver("two IKE SA rekeys of ours", Duration::from_secs(25), |log| {
        lines_with(log, "SPIS").get(2).map(|l| (*l).to_owned())
    })?;
    let (spi_i, spi_r) = (field(&newest, "spi_i"), field(&newest, "spi_r"));
    let child_in = field(&child, "spi_out").unwrap_or_default().to_owned();
    wait::until("strongSwan on our newest IKE SA only", TIMEOUT, || {
        let sas = s.charon().list_sas()?;
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
