//! The responder state machine against a real strongSwan initiator: a strongSwan site in one
//! namespace initiates to our responder in another, both on one WAN bridge.
//!
//! The responder runs in a thin driver ([`concentrator_test_util::interop`]; a static PSK
//! answers `PeerIdentified`). The test binary re-executes itself inside the gateway namespace
//! to run the driver: `driver_process` does nothing unless `IKE_DRIVER` is set. The driver
//! prints one `EVENT ...` line per event, which the test reads from its log.
//!
//! As non-root every test prints SKIP and passes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::netns;
use concentrator_e2e::strongswan::{self, Connection};
use concentrator_e2e::topology::{GW_ADDR, GW_ID, GW_LAN, SITE_ADDR, SITE_ID, SITE_LAN, site_connection};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{logs, prereq};
use concentrator_ike::responder::{Config, Retransmit, SystemEntropy};
use concentrator_ike::{Event, Flags, Header, Responder};
use concentrator_test_util::interop::{
    Interop, Sockets, TIMEOUT, child_sa_installed, ensure_charon_keys, env, field, ike_sa_established,
    lines_with, responder_config,
};

/// Optional driver settings from the environment: `IKE_DRIVER_DPD_MS` (liveness-check
/// interval), `IKE_DRIVER_RETRANSMIT` (`first-wait-ms,tries`), `IKE_DRIVER_CHILD_LIFETIME_MS`
/// (our CHILD SA lifetime, whose soft part starts our rekeys), `IKE_DRIVER_IKE_LIFETIME_MS`
/// (the same for the IKE SA).
fn driver_timers(config: &mut Config) -> Result<()> {
    if let Ok(ms) = std::env::var("IKE_DRIVER_CHILD_LIFETIME_MS") {
        config.child_lifetime = Duration::from_millis(ms.parse()?);
    }
    if let Ok(ms) = std::env::var("IKE_DRIVER_IKE_LIFETIME_MS") {
        config.ike_lifetime = Some(Duration::from_millis(ms.parse()?));
    }
    if let Ok(ms) = std::env::var("IKE_DRIVER_DPD_MS") {
        config.dpd_interval = Some(Duration::from_millis(ms.parse()?));
    }
    if let Ok(r) = std::env::var("IKE_DRIVER_RETRANSMIT") {
        let (ms, tries) = r.split_once(',').context("IKE_DRIVER_RETRANSMIT is ms,tries")?;
        config.retransmit = Retransmit {
            timeout: Duration::from_millis(ms.parse()?),
            tries: tries.parse()?,
        };
    }
    Ok(())
}

/// The driver: runs until killed when `IKE_DRIVER` is set, else returns at once.
#[test]
fn driver_process() -> Result<()> {
    if std::env::var_os("IKE_DRIVER").is_none() {
        return Ok(());
    }
    let listen: IpAddr = env("IKE_DRIVER_LISTEN")?.parse()?;
    let psk = env("IKE_DRIVER_PSK")?.into_bytes();
    let mut config = responder_config(
        &env("IKE_DRIVER_IKE")?,
        &env("IKE_DRIVER_ESP")?,
        &env("IKE_DRIVER_LOCAL_SUBNET")?,
        &env("IKE_DRIVER_REMOTE_SUBNET")?,
        &env("IKE_DRIVER_LOCAL_ID")?,
    )?;
    driver_timers(&mut config)?;
    let config = Arc::new(config);
    let sockets = Sockets::bind(listen)?;
    println!("READY");
    let mut entropy = SystemEntropy;
    // Responders by index; routes by our SPI (every SPI a responder answers for, kept after
    // it closes so that a retransmitted DELETE is still answered) and, for IKE_SA_INIT
    // (SPIr zero), by the initiator's SPI.
    let mut responders: Vec<Responder> = Vec::new();
    let mut by_spi_r: HashMap<u64, usize> = HashMap::new();
    let mut by_spi_i: HashMap<u64, usize> = HashMap::new();
    // `IKE_DRIVER_REDIRECT_TO`: redirect the first IKE SA there once it is established.
    let redirect_to = match std::env::var("IKE_DRIVER_REDIRECT_TO") {
        Ok(a) => Some(concentrator_ike::redirect::GatewayId::Ip(a.parse()?)),
        Err(_) => None,
    };
    let mut redirected = false;
    loop {
        let next_timer = responders.iter().filter_map(Responder::poll_timeout).min();
        match sockets.recv(next_timer) {
            Ok(d) => {
                let Some((header, _)) = Header::peek(&d.ike) else {
                    continue;
                };
                let index = if header.spi_r == 0 {
                    *by_spi_i.entry(header.spi_i).or_insert_with(|| {
                        responders.push(Responder::new(Arc::clone(&config)));
                        responders.len() - 1
                    })
                } else {
                    // Our SPI is SPIr unless we rekeyed the IKE SA: then we are its initiator
                    // and the peer's messages lack the I flag (RFC 7296 §3.1).
                    let ours = if header.flags.contains(Flags::INITIATOR) {
                        header.spi_r
                    } else {
                        header.spi_i
                    };
                    match by_spi_r.get(&ours) {
                        Some(&i) => i,
                        None => {
                            println!("DROP no IKE SA with our SPI {ours:016x}");
                            continue;
                        }
                    }
                };
                let r = &mut responders[index];
                if let Err(e) = r.handle_datagram(Instant::now(), d.local, d.remote, &d.ike, &mut entropy) {
                    println!("DROP {e}");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        for (index, r) in responders.iter_mut().enumerate() {
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now, &mut entropy);
            }
            drain(r, &psk, &mut entropy, &sockets)?;
            for spi in r.spis_r() {
                by_spi_r.insert(spi, index);
            }
        }
        if let Some(gw) = &redirect_to
            && !redirected
            && let Some(r) = responders.first_mut().filter(|r| r.is_established())
        {
            redirected = true;
            match r.redirect(now, gw) {
                Ok(()) => {
                    println!("REDIRECTED to={gw}");
                    drain(r, &psk, &mut entropy, &sockets)?;
                }
                Err(e) => println!("REDIRECT failed: {e}"),
            }
        }
    }
    Ok(())
}

/// Sends what `r` queued and prints its events (answering `PeerIdentified` with the PSK).
fn drain(r: &mut Responder, psk: &[u8], entropy: &mut SystemEntropy, sockets: &Sockets) -> Result<()> {
    loop {
        while let Some(t) = r.poll_transmit() {
            sockets.send(t.local.port() == 4500, &t.payload, t.remote)?;
        }
        let Some(ev) = r.poll_event() else {
            return Ok(());
        };
        match ev {
            Event::PeerIdentified { id } => {
                println!("EVENT PeerIdentified id={id}");
                if let Err(e) = r.provide_psk(Instant::now(), Some(psk), entropy) {
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
                "{}",
                ike_sa_established(spi_i, spi_r, &peer_id, remote, nat_detected)
            ),
            Event::ChildSaInstalled(c) => println!("{}", child_sa_installed(&c)),
            Event::ChildSaDeleted { spi_in, spi_out } => {
                println!("EVENT ChildSaDeleted spi_in={spi_in:08x} spi_out={spi_out:08x}");
            }
            Event::IkeSaRekeyed {
                old_spi_r,
                new_spi_i,
                new_spi_r,
            } => println!(
                "EVENT IkeSaRekeyed old_spi_r={old_spi_r:016x} new_spi_i={new_spi_i:016x} \
                 new_spi_r={new_spi_r:016x}"
            ),
            Event::IkeSaRetired { spi_r } => println!("EVENT IkeSaRetired spi_r={spi_r:016x}"),
            Event::IkeSaDeleted { spi, reason } => {
                println!("EVENT IkeSaDeleted spi_r={spi:016x} reason={reason:?}");
            }
            Event::RequestRefused { exchange, error } => {
                println!("EVENT RequestRefused exchange={exchange} error={error}");
            }
            Event::PeerError { notify_type } => println!("EVENT PeerError notify={notify_type}"),
            Event::MessageIdSync { requested, next } => {
                println!("EVENT MessageIdSync requested={requested} next={next:?}");
            }
            Event::Failed(e) => println!("EVENT Failed {e}"),
        }
    }
}

/// Our responder (driver PSK `driver_psk`, proposals `ike` / `esp`) and charon in the site
/// namespace, with extra driver environment (`IKE_DRIVER_DPD_MS`, ...).
fn start_with(ike: &str, esp: &str, driver_psk: &str, driver_env: &[(&str, &str)]) -> Result<Interop> {
    let mut env = vec![
        ("IKE_DRIVER", "1".to_owned()),
        ("IKE_DRIVER_LISTEN", GW_ADDR.to_owned()),
        ("IKE_DRIVER_PSK", driver_psk.to_owned()),
        ("IKE_DRIVER_IKE", ike.to_owned()),
        ("IKE_DRIVER_ESP", esp.to_owned()),
        ("IKE_DRIVER_LOCAL_SUBNET", GW_LAN.to_owned()),
        ("IKE_DRIVER_REMOTE_SUBNET", SITE_LAN.to_owned()),
        ("IKE_DRIVER_LOCAL_ID", GW_ID.to_owned()),
    ];
    env.extend(driver_env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Interop::responder(&env)
}

/// As [`start_with`], without extra driver environment.
fn start(ike: &str, esp: &str, driver_psk: &str) -> Result<Interop> {
    start_with(ike, esp, driver_psk, &[])
}

/// The site's connection to our responder, as charon loads it.
fn connection(ike: &str, esp: &str, psk: &str) -> Connection {
    site_connection("gw", SITE_ADDR, ike, esp, psk)
}

fn establishes(ike: &str, esp: &str) -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start(ike, esp, &psk)?;
    let child = s.establish(&connection(ike, esp, &psk))?;
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
    ensure_charon_keys(
        &s.charon_log()?,
        0,
        &child_line,
        &[
            ("encryption initiator key", "in_key"),
            ("encryption responder key", "out_key"),
            ("integrity initiator key", "in_integ"),
            ("integrity responder key", "out_integ"),
        ],
    )?;
    eprintln!("{ike}/{esp}: strongSwan child {child:?}\nours: {ike_line}\n{child_line}");
    let sas = s.charon().list_sas()?;
    let sa = sas.iter().find(|sa| sa.name == "gw").context("no IKE SA")?;
    ensure!(sa.state == "ESTABLISHED", "IKE SA state {}", sa.state);
    ensure!(child.state == "INSTALLED", "child state {}", child.state);
    Ok(())
}

mod strongswan_establishes_with {
    concentrator_test_util::proposal_matrix!(super::establishes);
}

#[test]
fn wrong_psk_is_rejected_with_authentication_failed() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let ike = "aes128gcm16-prfsha256-x25519";
    let mut s = start(ike, "aes128gcm16", "the-right-psk")?;
    s.charon()
        .load(&[connection(ike, "aes128gcm16", "a-wrong-psk")])?;
    // swanctl reports the failed initiation as an error; the logs say why.
    let _ = s.charon().initiate("gw");
    let log = s.charon().log_path().to_owned();
    wait::until("strongSwan to log AUTHENTICATION_FAILED", TIMEOUT, || {
        Ok(if logs::contains(&log, "AUTHENTICATION_FAILED") {
            Probe::Ready(())
        } else {
            Probe::pending("not yet")
        })
    })
    .with_context(|| format!("{}\n{}", s.charon().log_tail(30), s.driver.log_tail(20)))?;
    let failed = s.wait_driver_line("EVENT Failed")?;
    ensure!(failed.contains("authentication failed"), "{failed}");
    let text = std::fs::read_to_string(s.driver.log_path())?;
    if text.contains("EVENT IkeSaEstablished") || text.contains("EVENT ChildSaInstalled") {
        bail!("the responder established an SA with a wrong PSK:\n{text}");
    }
    ensure!(
        s.charon().list_sas()?.iter().all(|sa| sa.state != "ESTABLISHED"),
        "strongSwan established an IKE SA with a wrong PSK"
    );
    Ok(())
}

const IKE: &str = "aes128gcm16-prfsha256-x25519";

/// Nothing in the driver log says a message was dropped, refused or failed.
fn ensure_clean(log: &str) -> Result<()> {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.starts_with("DROP") || l.starts_with("EVENT RequestRefused") || l.starts_with("EVENT Failed")
        })
        .collect();
    ensure!(bad.is_empty(), "driver trouble: {bad:#?}\n{log}");
    Ok(())
}

#[test]
fn strongswan_liveness_checks_are_answered_and_its_delete_is_reported() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start(IKE, "aes128gcm16", &psk)?;
    let mut conn = connection(IKE, "aes128gcm16", &psk);
    // strongSwan checks liveness after a second without traffic (RFC 7296 §2.4).
    conn.extra.push("dpd_delay = 1s".to_owned());
    s.establish(&conn)?;
    s.wait_charon_log("parsed INFORMATIONAL response", 2, TIMEOUT)?;
    let established = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let child = s.wait_driver_line("EVENT ChildSaInstalled")?;

    s.charon()
        .swanctl(&["--terminate", "--ike", "gw", "--timeout", "10"])?;
    let deleted = s.wait_driver_line("EVENT IkeSaDeleted")?;
    ensure!(
        field(&deleted, "spi_r") == field(&established, "spi_r")
            && field(&deleted, "reason") == Some("PeerDeleted"),
        "{deleted} after {established}"
    );
    // The CHILD SA goes with its IKE SA, reported first.
    let log = s.driver_log();
    let child_deleted = lines_with(&log, "EVENT ChildSaDeleted");
    ensure!(
        child_deleted.len() == 1 && field(child_deleted[0], "spi_in") == field(&child, "spi_in"),
        "{log}"
    );
    ensure_clean(&log)?;
    // strongSwan got our (empty) response to its DELETE and holds nothing any more.
    s.wait_charon_log("parsed INFORMATIONAL response", 3, TIMEOUT)?;
    ensure!(
        s.charon().list_sas()?.iter().all(|sa| sa.name != "gw"),
        "strongSwan still lists the IKE SA"
    );
    Ok(())
}

#[test]
fn strongswan_rekeys_the_child_sa_with_pfs() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start(IKE, esp, &psk)?;
    let mut conn = connection(IKE, esp, &psk);
    // Rekeyed every 3 s; the hard lifetime stays out of the way (by default it would be the
    // rekey time here, and strongSwan would delete and recreate instead of rekeying).
    conn.child_extra
        .extend(["rekey_time = 3s", "life_time = 30s", "rand_time = 0s"].map(str::to_owned));
    s.establish(&conn)?;
    let first = s.wait_driver_line("EVENT ChildSaInstalled")?;
    // The rekeyed CHILD SA names the one it replaces; strongSwan then deletes the old one.
    let rekeyed = s.wait_driver("a rekeyed CHILD SA", Duration::from_secs(20), |log| {
        lines_with(log, "EVENT ChildSaInstalled")
            .into_iter()
            .find(|l| field(l, "replaces") != Some("-"))
            .map(str::to_owned)
    })?;
    ensure!(
        field(&rekeyed, "replaces") == field(&first, "spi_in"),
        "{rekeyed} does not replace {first}"
    );
    let old_in = field(&first, "spi_in").unwrap_or_default().to_owned();
    s.wait_driver("the old CHILD SA's deletion", TIMEOUT, |log| {
        lines_with(log, "EVENT ChildSaDeleted")
            .into_iter()
            .find(|l| field(l, "spi_in") == Some(old_in.as_str()))
            .map(|_| ())
    })?;
    // The rekeyed CHILD SA's keys (KEYMAT with the new DH secret, RFC 7296 §2.17) are the
    // ones charon derived for its second CHILD SA.
    ensure_charon_keys(
        &s.charon_log()?,
        1,
        &rekeyed,
        &[
            ("encryption initiator key", "in_key"),
            ("encryption responder key", "out_key"),
        ],
    )?;
    // strongSwan holds the SAs, with SPIs of a CHILD SA we installed and did not delete.
    let child = s.charon().wait_established("gw", "gw", TIMEOUT)?;
    let driver = s.driver_log();
    let installed = lines_with(&driver, "EVENT ChildSaInstalled");
    ensure!(
        installed.iter().any(|l| {
            child.fields.get("spi-in").map(String::as_str) == field(l, "spi_out")
                && child.fields.get("spi-out").map(String::as_str) == field(l, "spi_in")
        }),
        "strongSwan's child {child:?} is none of ours:\n{driver}"
    );
    ensure_clean(&driver)?;
    Ok(())
}

/// Our responder rekeys the CHILD SA at its soft lifetime (a 4 s lifetime: every 3.4 to
/// 3.8 s) while strongSwan's lifetimes are long: CREATE_CHILD_SA with N(REKEY_SA) and PFS
/// from our side (RFC 7296 §1.3.3), then our DELETE of the old SA.
#[test]
fn we_rekey_strongswans_child_sa_with_pfs_at_our_soft_lifetime() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let esp = "aes128gcm16-x25519";
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start_with(IKE, esp, &psk, &[("IKE_DRIVER_CHILD_LIFETIME_MS", "4000")])?;
    let conn = connection(IKE, esp, &psk);
    s.establish(&conn)?;
    let first = s.wait_driver_line("EVENT ChildSaInstalled")?;
    // Two rekeys in a row, each replacing the previous SA, which we delete.
    let mut previous = first;
    let mut last = String::new();
    for round in 0..2 {
        let want = field(&previous, "spi_in").unwrap_or_default().to_owned();
        let rekeyed = s.wait_driver(format!("our rekey {round}"), Duration::from_secs(20), |log| {
            lines_with(log, "EVENT ChildSaInstalled")
                .into_iter()
                .find(|l| field(l, "replaces") == Some(want.as_str()))
                .map(str::to_owned)
        })?;
        s.wait_driver(format!("deletion of {want}"), TIMEOUT, |log| {
            lines_with(log, "EVENT ChildSaDeleted")
                .into_iter()
                .find(|l| field(l, "spi_in") == Some(want.as_str()))
                .map(|_| ())
        })?;
        previous = rekeyed.clone();
        last = rekeyed;
    }
    // RFC 7296 §2.17: we initiated the exchanges, so charon's "initiator key" of each
    // rekeyed SA protects our outbound direction.
    let second = lines_with(&s.driver_log(), "EVENT ChildSaInstalled")
        .get(1)
        .map(|l| (*l).to_owned())
        .context("no rekeyed CHILD SA")?;
    ensure_charon_keys(
        &s.charon_log()?,
        1,
        &second,
        &[
            ("encryption initiator key", "out_key"),
            ("encryption responder key", "in_key"),
        ],
    )?;
    // strongSwan lists the IKE SA established and our latest CHILD SA installed.
    let want_in = field(&last, "spi_out").unwrap_or_default().to_owned();
    let child = wait::until("strongSwan on our latest CHILD SA", TIMEOUT, || {
        let sas = s.charon().list_sas()?;
        let found = sas
            .iter()
            .filter(|sa| sa.name == "gw" && sa.state == "ESTABLISHED")
            .flat_map(|sa| sa.children.iter())
            .find(|c| c.fields.get("spi-in") == Some(&want_in) && c.state == "INSTALLED")
            .cloned();
        Ok(match found {
            Some(c) => Probe::Ready(c),
            None => Probe::pending(format!("{sas:?}")),
        })
    })?;
    ensure!(
        child.fields.get("spi-out").map(String::as_str) == field(&last, "spi_in"),
        "strongSwan {child:?}, ours {last}"
    );
    ensure_clean(&s.driver_log())?;
    Ok(())
}

#[test]
fn strongswan_rekeys_the_ike_sa_and_carries_on_with_the_new_one() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start(IKE, "aes128gcm16", &psk)?;
    let mut conn = connection(IKE, "aes128gcm16", &psk);
    // IKE SA rekeyed every 3 s, CHILD SA every 5 s; hard lifetimes out of the way.
    conn.extra
        .extend(["rekey_time = 3s", "over_time = 30s", "rand_time = 0s"].map(str::to_owned));
    conn.child_extra
        .extend(["rekey_time = 5s", "life_time = 30s", "rand_time = 0s"].map(str::to_owned));
    s.establish(&conn)?;
    let established = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let rekeyed = s.wait_driver_line("EVENT IkeSaRekeyed")?;
    ensure!(
        field(&rekeyed, "old_spi_r") == field(&established, "spi_r"),
        "{rekeyed} after {established}"
    );
    // strongSwan deletes the old IKE SA right after (RFC 7296 §2.8).
    let retired = s.wait_driver_line("EVENT IkeSaRetired")?;
    ensure!(
        field(&retired, "spi_r") == field(&rekeyed, "old_spi_r"),
        "{retired}"
    );
    // A CHILD SA rekey after that runs on a rekeyed IKE SA (its SK_d), and a second IKE SA
    // rekey on the first one's successor.
    s.wait_driver(
        "a CHILD SA rekey and a second IKE SA rekey",
        Duration::from_secs(20),
        |log| {
            let after = &log[log.find("EVENT IkeSaRetired")?..];
            let child = lines_with(after, "EVENT ChildSaInstalled")
                .into_iter()
                .any(|l| field(l, "replaces") != Some("-"));
            (child && lines_with(log, "EVENT IkeSaRekeyed").len() >= 2).then_some(())
        },
    )?;
    let sas = s.charon().list_sas()?;
    let sa = sas.iter().find(|sa| sa.name == "gw").context("no IKE SA")?;
    s.charon().wait_established("gw", "gw", TIMEOUT)?;
    let driver = s.driver_log();
    // strongSwan's current IKE SA is one of the rekeyed ones we answer for.
    let theirs = sa.fields.get("responder-spi").cloned().unwrap_or_default();
    ensure!(
        lines_with(&driver, "EVENT IkeSaRekeyed")
            .iter()
            .any(|l| field(l, "new_spi_r") == Some(theirs.as_str())),
        "strongSwan's IKE SA {:?} is none of ours:\n{driver}",
        sa.fields
    );
    ensure!(
        !driver.contains("EVENT IkeSaDeleted"),
        "the IKE SA went away:\n{driver}"
    );
    ensure_clean(&driver)?;
    Ok(())
}

#[test]
fn liveness_checks_find_a_dead_strongswan() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    // A check after 1 s of silence; retransmissions after 0.5, 1.5 and 3.5 s; given up at
    // 7.5 s.
    let mut s = start_with(
        IKE,
        "aes128gcm16",
        &psk,
        &[("IKE_DRIVER_DPD_MS", "1000"), ("IKE_DRIVER_RETRANSMIT", "500,3")],
    )?;
    let conn = connection(IKE, "aes128gcm16", &psk);
    s.establish(&conn)?;
    // strongSwan answers our checks: Message IDs 0, 1, 2 each arrive once answered.
    s.wait_charon_log("parsed INFORMATIONAL request 2 [ ]", 1, TIMEOUT)?;
    ensure!(
        !s.driver_log().contains("EVENT IkeSaDeleted"),
        "{}",
        s.driver_log()
    );
    s.kill_charon();
    let deleted = s.wait_driver(
        "the IKE SA's deletion by the liveness check",
        Duration::from_secs(20),
        |log| {
            lines_with(log, "EVENT IkeSaDeleted")
                .first()
                .map(|l| (*l).to_owned())
        },
    )?;
    ensure!(field(&deleted, "reason") == Some("DeadPeer"), "{deleted}");
    let log = s.driver_log();
    ensure!(lines_with(&log, "EVENT ChildSaDeleted").len() == 1, "{log}");
    ensure_clean(&log)?;
    Ok(())
}

/// Our responder rekeys the IKE SA at its soft lifetime (a 5 s lifetime: every 4.25 to
/// 4.75 s), twice, while strongSwan's lifetimes are long (RFC 7296 §1.3.2): we become the new
/// IKE SA's initiator, delete the old one (retired once strongSwan answers), the CHILD SA
/// moves along, and strongSwan lists the newest IKE SA established with our SPI as its
/// initiator SPI and the CHILD SA installed. A liveness check on it is answered.
#[test]
fn we_rekey_strongswans_ike_sa_at_our_soft_lifetime() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start_with(
        IKE,
        "aes128gcm16",
        &psk,
        &[
            ("IKE_DRIVER_IKE_LIFETIME_MS", "5000"),
            ("IKE_DRIVER_DPD_MS", "1500"),
        ],
    )?;
    let conn = connection(IKE, "aes128gcm16", &psk);
    s.establish(&conn)?;
    let established = s.wait_driver_line("EVENT IkeSaEstablished")?;
    let child = s.wait_driver_line("EVENT ChildSaInstalled")?;
    let mut old = field(&established, "spi_r").unwrap_or_default().to_owned();
    let mut newest = String::new();
    for round in 0..2 {
        let want = old.clone();
        let rekeyed = s.wait_driver(format!("our IKE rekey {round}"), Duration::from_secs(20), |log| {
            lines_with(log, "EVENT IkeSaRekeyed")
                .into_iter()
                .find(|l| field(l, "old_spi_r") == Some(want.as_str()))
                .map(str::to_owned)
        })?;
        s.wait_driver(format!("retirement of {want}"), TIMEOUT, |log| {
            lines_with(log, "EVENT IkeSaRetired")
                .into_iter()
                .find(|l| field(l, "spi_r") == Some(want.as_str()))
                .map(|_| ())
        })?;
        old = field(&rekeyed, "new_spi_r").unwrap_or_default().to_owned();
        newest = rekeyed;
    }
    // strongSwan is on the newest IKE SA, which we initiated, with the same CHILD SA.
    let ours = field(&newest, "new_spi_r").unwrap_or_default().to_owned();
    let theirs = field(&newest, "new_spi_i").unwrap_or_default().to_owned();
    let child_in = field(&child, "spi_out").unwrap_or_default().to_owned();
    wait::until("strongSwan on our newest IKE SA", TIMEOUT, || {
        let sas = s.charon().list_sas()?;
        let ok = sas.iter().any(|sa| {
            sa.name == "gw"
                && sa.state == "ESTABLISHED"
                && sa.fields.get("initiator-spi") == Some(&ours)
                && sa.fields.get("responder-spi") == Some(&theirs)
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
    // Our liveness checks on the newest IKE SA are answered: no dead peer.
    let log = s.driver_log();
    ensure!(!log.contains("EVENT IkeSaDeleted"), "IKE SA deleted:\n{log}");
    ensure_clean(&log)?;
    Ok(())
}

/// RFC 5685 §5: our responder redirects strongSwan's established IKE SA with an
/// INFORMATIONAL N(REDIRECT) (strongSwan announces REDIRECT_SUPPORTED and follows redirects
/// by default). Redirected to our own address, strongSwan comes back with a new IKE_SA_INIT
/// naming us in N(REDIRECTED_FROM), establishes a new IKE SA and deletes the old one.
#[test]
fn strongswan_follows_our_redirect_of_an_established_sa() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let psk = concentrator_e2e::ids::random_hex(32);
    let mut s = start_with(IKE, "aes128gcm16", &psk, &[("IKE_DRIVER_REDIRECT_TO", GW_ADDR)])?;
    let conn = connection(IKE, "aes128gcm16", &psk);
    s.establish(&conn)?;
    let first = s.wait_driver_line("EVENT IkeSaEstablished")?;
    s.wait_driver_line("REDIRECTED")?;
    let first_spi = field(&first, "spi_r").unwrap_or_default().to_owned();
    // A second IKE SA from strongSwan, then the first one deleted by it.
    s.wait_driver("a second IKE SA after the redirect", TIMEOUT, |log| {
        (lines_with(log, "EVENT IkeSaEstablished").len() >= 2).then_some(())
    })?;
    s.wait_driver("strongSwan's DELETE of the redirected IKE SA", TIMEOUT, |log| {
        lines_with(log, "EVENT IkeSaDeleted")
            .into_iter()
            .find(|l| field(l, "spi_r") == Some(first_spi.as_str()) && l.contains("PeerDeleted"))
            .map(|_| ())
    })?;
    s.wait_charon_log("redirect", 1, TIMEOUT)?;
    let child = s.charon().wait_established("gw", "gw", TIMEOUT)?;
    ensure!(child.state == "INSTALLED", "{child:?}");
    let driver = s.driver_log();
    eprintln!("{driver}");
    ensure_clean(&driver)?;
    Ok(())
}
