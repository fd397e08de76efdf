//! Two strongSwan sites joined by a WAN bridge establish an IKEv2 PSK tunnel, and ping
//! between their LANs crosses it through kernel-libipsec.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concentrator_e2e::netns::{self, Netns, Wan, addr, net};
use concentrator_e2e::strongswan::{self, Charon, Connection};
use concentrator_e2e::{prereq, tools};

const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn psk_tunnel_carries_lan_ping() -> Result<()> {
    if prereq::require(&[netns::TOOLS, strongswan::TOOLS]).is_skip() {
        return Ok(());
    }
    let t0 = Instant::now();

    // Locals drop in reverse order: the charons (declared last) die first, then the sites,
    // then the WAN, also when a check below fails or panics.
    let wan = Wan::new()?;
    let site_a = Netns::new("siteA")?;
    let site_b = Netns::new("siteB")?;
    let (wan_a, wan_b) = (addr("192.0.2.1"), addr("192.0.2.2"));
    let (lan_a, lan_b) = (addr("10.1.0.1"), addr("10.2.0.1"));
    wan.attach(&site_a, "wan0", net("192.0.2.1/24"))?;
    wan.attach(&site_b, "wan0", net("192.0.2.2/24"))?;
    site_a.add_lo_addr(net("10.1.0.1/24"))?;
    site_b.add_lo_addr(net("10.2.0.1/24"))?;
    site_a.wait_reachable(None, wan_b, Duration::from_secs(5))?;

    // Without the tunnel there is no route between the LANs: whatever answers later came
    // through ipsec0 (table 220, installed by charon).
    ensure!(
        site_a
            .ip(&["route", "get", "10.2.0.1", "from", "10.1.0.1"])
            .is_err(),
        "site A has a route to LAN B before any tunnel exists"
    );
    let t_net = t0.elapsed();

    let charon_a = Charon::start(&site_a)?;
    let charon_b = Charon::start(&site_b)?;
    let t_charon = t0.elapsed();

    let mut conn_a = Connection::new(
        "site",
        wan_a,
        wan_b,
        &concentrator_e2e::ids::random_hex(32),
        vec![net("10.1.0.0/24")],
        vec![net("10.2.0.0/24")],
    );
    conn_a.local_id = "siteA".to_owned();
    conn_a.remote_id = "siteB".to_owned();
    charon_b.load(&[conn_a.mirrored()])?;
    charon_a.load(&[conn_a])?;

    charon_a.initiate("site").with_context(|| charon_b.log_tail(40))?;
    let child_a = charon_a
        .wait_established("site", "site", ESTABLISH_TIMEOUT)
        .with_context(|| charon_b.log_tail(40))?;
    charon_b
        .wait_established("site", "site", ESTABLISH_TIMEOUT)
        .with_context(|| charon_a.log_tail(40))?;
    ensure!(
        child_a.fields.get("encr-alg").map(String::as_str) == Some("AES_GCM_16")
            && child_a.fields.get("encr-keysize").map(String::as_str) == Some("128"),
        "unexpected ESP algorithm: {:?}",
        child_a.fields
    );
    let t_sa = t0.elapsed();

    let route = site_a.ip(&["route", "show", "table", "220"])?;
    ensure!(
        route.contains("10.2.0.0/24 dev ipsec0"),
        "no table 220 route to LAN B via ipsec0 in site A:\n{route}"
    );

    let out = site_a
        .run(
            tools::PING.path(),
            &[
                "-c",
                "3",
                "-i",
                "0.05",
                "-W",
                "2",
                "-I",
                &lan_a.to_string(),
                &lan_b.to_string(),
            ],
        )
        .with_context(|| format!("{}\n{}", charon_a.log_tail(30), charon_b.log_tail(30)))?;
    ensure!(
        out.contains("3 packets transmitted, 3 received"),
        "ping lost packets:\n{out}"
    );
    let t_ping = t0.elapsed();

    // The ping went through the ESP SAs: libipsec counted it on both sides.
    let a = charon_a
        .child_sa("site", "site")?
        .context("child SA vanished in site A")?;
    let b = charon_b
        .child_sa("site", "site")?
        .context("child SA vanished in site B")?;
    for (side, sa) in [("A", &a), ("B", &b)] {
        ensure!(
            sa.bytes_in > 0 && sa.bytes_out > 0 && sa.packets_in >= 3 && sa.packets_out >= 3,
            "site {side}: ESP counters show no traffic: {sa:?}"
        );
        ensure!(
            sa.fields.get("encap").map(String::as_str) == Some("yes"),
            "site {side}: expected ESP in UDP (libipsec): {sa:?}"
        );
    }
    eprintln!(
        "site A child SA: in {} B / {} pkts, out {} B / {} pkts",
        a.bytes_in, a.packets_in, a.bytes_out, a.packets_out
    );
    eprintln!(
        "timings: namespaces {t_net:.2?}, charons up {t_charon:.2?}, SAs installed {t_sa:.2?}, \
         ping done {t_ping:.2?}"
    );
    Ok(())
}
