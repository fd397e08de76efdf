//! Two pods racing for one site: the site's IKE_SA_INIT reaches both (it retransmits, and
//! the front sent the retransmission elsewhere, or it addresses the pods themselves). The
//! fleet must answer with ONE IKE SA held by ONE pod: the pod that is not the owner
//! forwards, and the owner's answer goes back through it, so both copies get the same
//! responder SPI.
//!
//! For real: from the site's WAN address and port 500, one IKE_SA_INIT (the project's own
//! codec, `concentrator_test_util::ike_sa_init_request`: the default proposal
//! AES-GCM-128/SHA-256/X25519) is sent, byte for byte the same, to pod gw-0's and pod gw-1's
//! own addresses, bypassing the front (a route to the pod network through the front, which
//! lets the pods answer; see `Front::allow_direct_replies`). Then a strongSwan site with the
//! same address connects through the front, and must be held by exactly one pod, which its
//! claim in etcd names. As non-root it prints SKIP and passes.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use concentrator_e2e::fleet::sites::{self, Site};
use concentrator_e2e::fleet::{self, Affinity, Fleet, POD_NET};
use concentrator_e2e::netns::{self, Netns, addr};
use concentrator_e2e::topology::{GW_HOST, site_wan};
use concentrator_e2e::wait::{self, Probe};
use concentrator_e2e::{etcd, ids, prereq, strongswan, tools};
use concentrator_fleet::Shard;
use concentrator_test_util::ike_sa_init_request;

mod common;

const PODS: usize = 2;
/// The site's number (its WAN address, identity, LAN): the racer and the strongSwan site
/// are the same site.
const SITE: usize = 1;
const TIMEOUT: Duration = Duration::from_secs(40);

const INGRESS_SENT: &str = "fleet_forwarded_packets_total{kind=\"ingress\",direction=\"sent\"}";
const INGRESS_RECEIVED: &str = "fleet_forwarded_packets_total{kind=\"ingress\",direction=\"received\"}";
const EGRESS_SENT: &str = "fleet_forwarded_packets_total{kind=\"egress\",direction=\"sent\"}";

/// Sends the datagram (hex, argv 2) from `argv[1]`:500 to port 500 of every further
/// argument, the same bytes to each, as a site does; retransmits to those that did not
/// answer, once a second, five times at most; prints `ADDRESS HEX` for each first answer.
const RACER: &str = r#"
import select, socket, sys, time
src, data, targets = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 500))
got = {}
for attempt in range(5):
    for t in targets:
        if t not in got:
            s.sendto(data, (t, 500))
    end = time.time() + 1
    while len(got) < len(targets) and time.time() < end:
        r, _, _ = select.select([s], [], [], max(0, end - time.time()))
        if r:
            d, a = s.recvfrom(65535)
            got.setdefault(a[0], d.hex())
    if len(got) == len(targets):
        break
for a, h in got.items():
    print(a, h)
"#;

fn skip() -> bool {
    prereq::require(&[
        netns::TOOLS,
        strongswan::TOOLS,
        etcd::TOOLS,
        fleet::TOOLS,
        &[tools::PYTHON3],
    ])
    .is_skip()
}

/// An IKE header's SPIs: initiator's, responder's.
fn spis(datagram: &[u8]) -> Result<(u64, u64)> {
    let word = |at: usize| -> Result<u64> {
        let b = datagram
            .get(at..at + 8)
            .context("a datagram shorter than an IKE header")?;
        Ok(u64::from_be_bytes(b.try_into()?))
    };
    Ok((word(0)?, word(8)?))
}

/// Each pod's value of `metric` (`+ 0.0`: an empty float sum is -0.0).
fn by_pod(fleet: &Fleet, metric: &str) -> Result<Vec<f64>> {
    Ok(fleet
        .metric_by_pod(metric)?
        .into_iter()
        .map(|v| v.unwrap_or(0.0) + 0.0)
        .collect())
}

/// The one pod whose tunnel table lists site `s`.
fn holder(fleet: &Fleet, s: &Site) -> Result<usize> {
    let owners = fleet.owners_of(&s.peer_id())?;
    match owners[..] {
        [one] => Ok(one),
        _ => bail!("site {} is listed by pods {owners:?}, not by exactly one", s.n()),
    }
}

#[test]
fn two_pods_racing_for_one_site_make_one_owner_and_one_forwarder() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let psks = common::fleet::psks(SITE);
    let (_config, fleet) = common::fleet::start(PODS, Affinity::client_ip(), &psks)?;
    let front = fleet.front().address();
    let wan_addr = site_wan(SITE);
    let pods: Vec<String> = fleet.pods().iter().map(|p| p.ip().to_string()).collect();

    // The racer: the site's address on the WAN, a route to the pods through the front.
    let (spi_r, owner) = {
        let racer: Netns = fleet.wan().host("racer", &wan_addr, None)?;
        racer.ip(&["route", "add", POD_NET, "via", &front.to_string()])?;
        fleet.front().allow_direct_replies(addr(&wan_addr))?;
        let spi_i = ids::random_u64() | 1;
        let nonce: Vec<u8> = (0..4).flat_map(|_| ids::random_u64().to_le_bytes()).collect();
        let datagram = ike_sa_init_request(spi_i, &nonce, None);
        let hex: String = datagram.iter().map(|b| format!("{b:02x}")).collect();
        let mut args = vec!["-c", RACER, &wan_addr, &hex];
        args.extend(pods.iter().map(String::as_str));
        let out = racer
            .run(tools::PYTHON3.path(), &args)
            .with_context(|| fleet.log_tails(20))?;

        let mut replies = Vec::new();
        for line in out.lines() {
            let (from, hex) = line.split_once(' ').context("a racer line")?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()?;
            replies.push((from.to_owned(), spis(&bytes)?));
        }
        replies.sort();
        eprintln!(
            "IKE_SA_INIT SPIi {spi_i:016x} sent to {pods:?}; replies (from, (SPIi, SPIr)): {replies:x?}"
        );
        ensure!(
            replies.iter().map(|(from, _)| from).eq(pods.iter()),
            "expected an answer from each pod address {pods:?}, got {replies:x?}\n{}",
            fleet.log_tails(20)
        );
        let spi_r = replies[0].1.1;
        ensure!(
            replies.iter().all(|(_, s)| *s == (spi_i, spi_r)) && spi_r != 0,
            "the two pods answered the same IKE_SA_INIT with different IKE SAs: {replies:x?}"
        );

        // The responder SPI carries the owner's shard.
        let map = fleet.shard_map()?.context("no shard map")?;
        let member = map
            .owner(Shard::of_ike_spi(spi_r))
            .context("SPIr in a shard without owner")?;
        let owner = usize::from(member.0);
        ensure!(owner < PODS, "SPIr {spi_r:016x} names member {member:?}");
        (spi_r, owner)
    };
    let other = 1 - owner;

    // One half-open SA in the fleet, on the owner; the other pod forwarded (at least the
    // copy addressed to it) and the owner answered back through it.
    let half_open = by_pod(&fleet, "ike_sas_half_open")?;
    let (sent, received, egress) = (
        by_pod(&fleet, INGRESS_SENT)?,
        by_pod(&fleet, INGRESS_RECEIVED)?,
        by_pod(&fleet, EGRESS_SENT)?,
    );
    eprintln!(
        "owner gw-{owner} (from SPIr {spi_r:016x}); by pod: half-open SAs {half_open:?}, \
         ingress frames sent {sent:?}, received {received:?}, egress frames sent {egress:?}"
    );
    ensure!(
        half_open[owner] == 1.0 && half_open[other] == 0.0,
        "expected the one half-open SA on gw-{owner} only: {half_open:?}"
    );
    ensure!(
        sent[other] >= 1.0 && sent[owner] == 0.0,
        "gw-{other} (not the owner) should have forwarded the IKE_SA_INIT, and gw-{owner} \
         nothing: ingress frames sent by pod {sent:?}"
    );
    ensure!(
        received[owner] >= sent[other] && egress[owner] >= 1.0,
        "gw-{owner} should have received the forwarded copy and answered through gw-{other}: \
         ingress received {received:?}, egress sent {egress:?}"
    );

    // The racer is gone; the real site, with the same address, connects through the front.
    let site = sites::start_all(fleet.wan(), front, &psks, 1)?
        .pop()
        .context("one site")?;
    site.initiate().with_context(|| fleet.log_tails(30))?;
    site.wait_ping(addr(GW_HOST), TIMEOUT)
        .with_context(|| format!("{}\n{}", site.log_tail(30), fleet.log_tails(30)))?;
    let held_by = holder(&fleet, &site)?;
    wait::until("the site's claim to name the pod holding it", TIMEOUT, || {
        let claims: Vec<Option<usize>> = fleet
            .claims()?
            .into_iter()
            .filter(|c| c.peer_id == site.peer_id())
            .map(|c| c.member)
            .collect();
        Ok(if claims == [Some(held_by)] {
            Probe::Ready(())
        } else {
            Probe::pending(format!("held by gw-{held_by}, claims {claims:?}"))
        })
    })
    .with_context(|| fleet.log_tails(20))?;
    eprintln!("the strongSwan site is held by gw-{held_by}, and its claim names it");
    Ok(())
}
