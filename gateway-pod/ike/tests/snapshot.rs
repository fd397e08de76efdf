//! An established IKE SA carried on elsewhere: two endpoints (a gateway that answered, a site
//! that initiated) establish an SA on a virtual clock; at a chosen point both ends are
//! snapshotted, the snapshots encoded and decoded, and restored into fresh endpoints that
//! take over the wire; the pair then carries on: liveness checks, CHILD SA and IKE SA
//! rekeys, retransmissions answered from the cache, DELETE, with Message IDs in step and the
//! keys of every new CHILD SA agreeing on both ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use concentrator_ike::initiator;
use concentrator_ike::payload::Identity;
use concentrator_ike::responder::{self, ChildSa, IdBuf, SystemEntropy, Transmit};
use concentrator_ike::sa::snapshot::{IkeSaSnapshot, InFlight, SnapshotError};
use concentrator_ike::{DeleteReason, Event};

const PSK: &[u8] = b"site-a secret";
const SECOND: Duration = Duration::from_secs(1);
/// IKE SA proposals: an AEAD, and AES-CBC (the only kind the RFC 6311 sync is used with).
const GCM: &str = "aes128gcm16-prfsha256-x25519";
const CBC: &str = "aes256-sha256-x25519";

fn site_addr() -> SocketAddr {
    "192.0.2.1:500".parse().unwrap()
}

fn gw_addr() -> SocketAddr {
    "192.0.2.2:500".parse().unwrap()
}

/// The gateway: liveness checks every 30 s, IKE SA rekeys at 85-95 % of an hour, PFS.
fn gw_config() -> Arc<responder::Config> {
    Arc::new(responder::Config {
        sync_after_restore: true,
        dpd_interval: Some(30 * SECOND),
        ike_lifetime: Some(3600 * SECOND),
        child_lifetime: 3600 * SECOND,
        ..responder::Config::new(
            vec![parse_ike("ike", GCM).unwrap(), parse_ike("ike", CBC).unwrap()],
            vec![parse_esp("esp", "aes128gcm16-x25519").unwrap()],
            "10.2.0.0/24".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
            IdBuf::new(&Identity::Fqdn(b"gw.example")),
        )
    })
}

/// The site: follows the gateway's IKE SA rekeys, CHILD SA rekeys with PFS.
fn site_config() -> Arc<initiator::Config> {
    site_config_with(true, GCM)
}

/// The site's configuration, announcing RFC 6311 or not (strongSwan does only when it
/// initiates), proposing `ike`.
fn site_config_with(message_id_sync: bool, ike: &str) -> Arc<initiator::Config> {
    let mut c = initiator::Config::new(
        vec![parse_ike("ike", ike).unwrap()],
        vec![parse_esp("esp", "aes128gcm16-x25519").unwrap()],
        "10.1.0.0/24".parse().unwrap(),
        "10.2.0.0/24".parse().unwrap(),
        IdBuf::new(&Identity::Fqdn(b"site-a.example")),
    );
    c.accept_ike_rekey = true;
    c.child_lifetime = 7200 * SECOND;
    c.message_id_sync = message_id_sync;
    c.sync_after_restore = true;
    Arc::new(c)
}

/// One end: its endpoint, the id of its SA there, what it reported.
struct End {
    ep: Endpoint,
    id: Option<u64>,
    /// CHILD SAs installed and not deleted, by our SPI.
    children: BTreeMap<u32, ChildSa>,
    deleted: Vec<DeleteReason>,
    /// RFC 6311 syncs reported: (we asked, the counters).
    syncs: Vec<(bool, Option<(u32, u32)>)>,
}

impl End {
    fn new() -> Self {
        Self {
            ep: Endpoint::new(EndpointConfig::default(), gw_config()),
            id: None,
            children: BTreeMap::new(),
            deleted: Vec::new(),
            syncs: Vec::new(),
        }
    }

    fn id(&self) -> u64 {
        self.id.expect("an SA")
    }
}

/// The two ends and the wire between them, on a virtual clock. Datagrams are held on the
/// wire until [`Net::deliver`] (or dropped by [`Net::lose`]).
struct Net {
    now: Instant,
    gw: End,
    site: End,
    /// Datagrams in flight: (to the gateway?, datagram).
    wire: Vec<(bool, Transmit)>,
}

impl Net {
    /// Establishes the SA; both ends announce RFC 6311.
    fn established() -> Self {
        Self::established_with(true, GCM)
    }

    /// Establishes the SA, the site announcing RFC 6311 or not.
    fn established_with(message_id_sync: bool, ike: &str) -> Self {
        let mut net = Self {
            now: Instant::now(),
            gw: End::new(),
            site: End::new(),
            wire: Vec::new(),
        };
        let id = net
            .site
            .ep
            .connect(
                site_config_with(message_id_sync, ike),
                PSK,
                site_addr(),
                gw_addr(),
                net.now,
                &mut SystemEntropy,
            )
            .unwrap();
        net.site.id = Some(id);
        net.run();
        assert!(net.gw.id.is_some(), "the gateway established the SA");
        assert_eq!(net.gw.children.len(), 1);
        net.assert_keys_agree();
        net
    }

    /// Takes what both endpoints send and reports, once.
    fn collect(&mut self) {
        for (to_gw, end) in [(false, &mut self.gw), (true, &mut self.site)] {
            while let Some(t) = end.ep.poll_transmit() {
                self.wire.push((to_gw, t));
            }
        }
        let now = self.now;
        while let Some(e) = self.gw.ep.poll_event() {
            if let EndpointEvent::Sa { id, event, .. } = e {
                match event {
                    Event::PeerIdentified { .. } => {
                        self.gw
                            .ep
                            .provide_psk(id, now, Some(PSK), &mut SystemEntropy)
                            .unwrap();
                    }
                    Event::IkeSaEstablished { .. } => self.gw.id = Some(id),
                    Event::ChildSaInstalled(c) => {
                        self.gw.children.insert(c.spi_in, *c);
                    }
                    Event::ChildSaDeleted { spi_in, .. } => {
                        self.gw.children.remove(&spi_in);
                    }
                    Event::IkeSaDeleted { reason, .. } => self.gw.deleted.push(reason),
                    Event::MessageIdSync { requested, next } => self.gw.syncs.push((requested, next)),
                    Event::Failed(e) => panic!("gateway failed: {e}"),
                    _ => {}
                }
            }
        }
        while let Some(e) = self.site.ep.poll_event() {
            if let EndpointEvent::Sa { event, .. } = e {
                match event {
                    Event::ChildSaInstalled(c) => {
                        self.site.children.insert(c.spi_in, *c);
                    }
                    Event::ChildSaDeleted { spi_in, .. } => {
                        self.site.children.remove(&spi_in);
                    }
                    Event::IkeSaDeleted { reason, .. } => self.site.deleted.push(reason),
                    Event::MessageIdSync { requested, next } => self.site.syncs.push((requested, next)),
                    Event::Failed(e) => panic!("site failed: {e}"),
                    _ => {}
                }
            }
        }
        for (to_gw, end) in [(false, &mut self.gw), (true, &mut self.site)] {
            while let Some(t) = end.ep.poll_transmit() {
                self.wire.push((to_gw, t));
            }
        }
    }

    /// Delivers every datagram on the wire, and what they cause, until the wire is quiet.
    fn run(&mut self) {
        for _ in 0..64 {
            self.collect();
            if self.wire.is_empty() {
                return;
            }
            self.deliver();
        }
        panic!("the exchange never settled");
    }

    /// Delivers what is on the wire now (not what that causes).
    fn deliver(&mut self) {
        for (to_gw, t) in std::mem::take(&mut self.wire) {
            let to = if to_gw { &mut self.gw } else { &mut self.site };
            let _ = to
                .ep
                .handle_datagram(self.now, t.remote, t.local, &t.payload, &mut SystemEntropy);
        }
    }

    /// Drops what is on the wire now.
    fn lose(&mut self) -> Vec<(bool, Transmit)> {
        self.collect();
        std::mem::take(&mut self.wire)
    }

    /// Moves the clock to `t` and runs the timers that are due.
    fn advance_to(&mut self, t: Instant) {
        self.now = t;
        self.gw.ep.handle_timeout(t, &mut SystemEntropy);
        self.site.ep.handle_timeout(t, &mut SystemEntropy);
    }

    /// Snapshots both ends (through the encoding), restores them into fresh endpoints and
    /// carries on with those: the old endpoints are gone, as a pod that died.
    fn take_over(&mut self) {
        let now = self.now;
        let gw_snap = self.gw.ep.snapshot(self.gw.id(), now).unwrap();
        let site_snap = self.site.ep.snapshot(self.site.id(), now).unwrap();
        for (end, snap) in [(&mut self.gw, gw_snap), (&mut self.site, site_snap)] {
            let bytes = snap.encode();
            let decoded = IkeSaSnapshot::decode(&bytes).unwrap();
            assert_eq!(decoded.encode(), bytes, "the encoding round-trips");
            // Only keys' lengths appear in the Debug output.
            let shown = format!("{decoded:?}");
            assert!(!shown.contains(&format!("{:?}", decoded.current.keys.sk_d.expose())));
            let mut fresh = End::new();
            let id = fresh
                .ep
                .restore(decoded, gw_config(), site_config(), now)
                .unwrap();
            fresh.id = Some(id);
            // The restored end knows its CHILD SAs from the snapshot, not from events.
            fresh.children = std::mem::take(&mut end.children);
            assert!(fresh.ep.poll_event().is_none(), "a restore reports nothing");
            *end = fresh;
        }
    }

    /// The gateway dies and `copy` (an encoded snapshot of its SA, maybe stale) carries on
    /// in a fresh endpoint.
    fn gateway_from_copy(&mut self, copy: &[u8]) {
        self.gateway_from_copy_with(copy, gw_config());
    }

    /// [`Self::gateway_from_copy`] under `config`.
    fn gateway_from_copy_with(&mut self, copy: &[u8], config: Arc<responder::Config>) {
        let mut fresh = End::new();
        let restored = fresh
            .ep
            .restore(
                IkeSaSnapshot::decode(copy).unwrap(),
                config,
                site_config(),
                self.now,
            )
            .unwrap();
        fresh.id = Some(restored);
        fresh.children = std::mem::take(&mut self.gw.children);
        self.gw = fresh;
    }

    /// The site rekeys its CHILD SA `n` times, each exchange run to its end.
    fn site_rekeys(&mut self, n: usize) {
        for _ in 0..n {
            let spi_in = *self.site.children.keys().next().unwrap();
            let id = self.site.id();
            assert!(self.site.ep.rekey_child(id, spi_in, self.now, &mut SystemEntropy));
            self.run();
        }
    }

    /// Every CHILD SA pair agrees: our outbound keys are the peer's inbound keys.
    fn assert_keys_agree(&self) {
        assert_eq!(
            self.gw.children.len(),
            self.site.children.len(),
            "both ends' CHILD SAs"
        );
        for (spi, c) in &self.gw.children {
            let peer = self
                .site
                .children
                .values()
                .find(|p| p.spi_in == c.spi_out)
                .unwrap_or_else(|| panic!("the site has no CHILD SA for the gateway's {spi:08x}"));
            assert_eq!(peer.spi_out, c.spi_in);
            assert_eq!(peer.inbound.encr.expose(), c.outbound.encr.expose());
            assert_eq!(peer.outbound.encr.expose(), c.inbound.encr.expose());
            assert_eq!(peer.outbound.salt.expose(), c.inbound.salt.expose());
        }
    }

    fn established_counts(&self) -> (usize, usize) {
        (self.gw.ep.counts().established, self.site.ep.counts().established)
    }
}

/// The pair carries on after a take-over: a liveness check, a CHILD SA rekey by each side, an
/// IKE SA rekey by the gateway, then DELETE by the site.
fn carries_on(net: &mut Net) {
    // A liveness check from the gateway after its interval, answered.
    let check = net.now + 31 * SECOND;
    net.advance_to(check);
    net.run();
    assert_eq!(
        net.established_counts(),
        (1, 1),
        "the liveness check was answered"
    );
    // A CHILD SA rekey by each side.
    for site_starts in [true, false] {
        let before: Vec<u32> = net.site.children.keys().copied().collect();
        let end = if site_starts { &mut net.site } else { &mut net.gw };
        let spi_in = *end.children.keys().next().unwrap();
        let id = end.id();
        assert!(end.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
        net.run();
        net.assert_keys_agree();
        let after: Vec<u32> = net.site.children.keys().copied().collect();
        assert_ne!(before, after, "the CHILD SA was replaced");
        assert_eq!(after.len(), 1, "the old CHILD SA was deleted");
    }
    // The gateway rekeys the IKE SA at its soft lifetime; the pair goes on on the new one.
    let spis = |net: &Net| {
        let s = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().current;
        (s.spi_i, s.spi_r)
    };
    let old = spis(net);
    net.advance_to(net.now + 3500 * SECOND);
    net.run();
    assert_eq!(net.established_counts(), (1, 1));
    assert_ne!(spis(net), old, "the IKE SA was rekeyed");
    let check = net.now + 31 * SECOND;
    net.advance_to(check);
    net.run();
    assert_eq!(net.established_counts(), (1, 1), "liveness on the new IKE SA");
    // The site deletes the SA; the gateway learns it.
    let id = net.site.id();
    net.site.ep.delete(id, net.now);
    net.run();
    assert_eq!(net.gw.deleted, vec![DeleteReason::PeerDeleted]);
    assert!(net.gw.children.is_empty());
}

#[test]
fn an_established_sa_keeps_no_copy_of_its_ike_sa_init_exchange() {
    // The endpoint routes an established SA by our SPI only: a retransmitted IKE_SA_INIT
    // (which has none) can never reach it, so the copy kept to answer one is dropped (a few
    // hundred bytes per tunnel, and in every snapshot).
    let net = Net::established();
    let snap = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap();
    assert!(snap.init.is_none(), "the responder kept its IKE_SA_INIT exchange");
    let snap = net.site.ep.snapshot(net.site.id(), net.now).unwrap();
    assert!(snap.init.is_none(), "the initiator kept its IKE_SA_INIT exchange");
}

#[test]
fn both_ends_restored_between_requests_carry_on() {
    let mut net = Net::established();
    net.advance_to(net.now + 5 * SECOND);
    net.take_over();
    net.assert_keys_agree();
    carries_on(&mut net);
}

#[test]
fn a_request_in_flight_is_retransmitted_by_the_restored_end() {
    let mut net = Net::established();
    // The gateway's liveness check is sent and lost; the snapshot holds it in flight.
    net.advance_to(net.now + 31 * SECOND);
    assert_eq!(net.lose().len(), 1);
    net.take_over();
    let snap = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap();
    assert!(
        snap.current.pending.is_some(),
        "the request in flight is in the snapshot"
    );
    // Its retransmission is due 2 s after it was sent, on the restored end's clock.
    net.advance_to(net.now + 2 * SECOND);
    net.run();
    assert_eq!(net.established_counts(), (1, 1));
    carries_on(&mut net);
}

#[test]
fn a_copy_a_request_behind_takes_the_peers_next_request() {
    // A site without RFC 6311 (strongSwan as responder): the catch-up window.
    let mut net = Net::established_with(false, GCM);
    // The copy is taken; then the site rekeys its CHILD SA with the gateway, which answers:
    // the copy never hears of that exchange (its owner died before replicating it).
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    net.run();
    net.gateway_from_copy(&stale);
    // The site's next request carries a Message ID one above what the copy expects: it is
    // taken (once it authenticates), not dropped as beyond the window.
    let id = net.site.id();
    net.site.ep.delete(id, net.now);
    net.run();
    assert_eq!(net.gw.deleted, vec![DeleteReason::PeerDeleted]);
}

#[test]
fn a_restored_sa_still_drops_a_request_far_beyond_its_window() {
    let mut net = Net::established_with(false, GCM);
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    // Twenty exchanges the copy never hears of: more than a copy can lag behind.
    net.site_rekeys(20);
    net.gateway_from_copy(&stale);
    let id = net.site.id();
    net.site.ep.delete(id, net.now);
    net.run();
    assert!(net.gw.deleted.is_empty(), "a request 20 IDs ahead is not taken");
}

/// The site's next request Message ID and the one it expects from the gateway.
fn site_counters(net: &Net) -> (u64, u64) {
    let s = net.site.ep.snapshot(net.site.id(), net.now).unwrap().current;
    (s.tx_next, s.rx_next)
}

#[test]
fn a_copy_far_behind_synchronizes_message_ids_with_the_peer() {
    let mut net = Net::established_with(true, CBC);
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    assert!(IkeSaSnapshot::decode(&stale).unwrap().mid_sync_supported);
    // Twenty exchanges of the site that the copy never hears of: beyond any catch-up window.
    // (Our own requests are replicated before they are sent: a copy is not behind in those.)
    net.site_rekeys(20);
    let (site_next, site_expects) = site_counters(&net);
    net.gateway_from_copy(&stale);
    // The restored gateway asks at once (RFC 6311 §4.2) and takes the site's counters.
    net.advance_to(net.now);
    net.run();
    let [(true, Some((ours, theirs)))] = net.gw.syncs[..] else {
        panic!("one sync of the gateway: {:?}", net.gw.syncs);
    };
    assert_eq!(u64::from(theirs), site_next, "the site's next request");
    assert_eq!(u64::from(ours), site_expects, "what the site expects of us");
    assert_eq!(
        site_counters(&net),
        (site_next, site_expects),
        "the site's counters stay"
    );
    assert_eq!(net.site.syncs.len(), 1, "the site answered: {:?}", net.site.syncs);
    assert!(!net.site.syncs[0].0);
    // Both directions carry on: the gateway's liveness check is answered by the site, the
    // site's DELETE is taken by the gateway. (The copy's CHILD SA is twenty rekeys old, so
    // only the IKE SA is exercised.)
    net.advance_to(net.now + 31 * SECOND);
    net.run();
    let pending = |net: &Net| net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().current.pending;
    assert!(pending(&net).is_none(), "the liveness check was answered");
    let id = net.site.id();
    net.site.ep.delete(id, net.now);
    net.run();
    assert_eq!(net.gw.deleted, vec![DeleteReason::PeerDeleted]);
}

#[test]
fn a_restored_sa_never_repeats_an_aead_nonce_of_its_owner() {
    let mut net = Net::established();
    let sealed = |net: &Net| net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().current.sealed;
    let before = sealed(&net);
    assert!(before >= 1, "the IKE_AUTH response used a nonce");
    net.take_over();
    // The owner may have sealed more after the copy; the restored end starts far above.
    assert!(
        sealed(&net) >= before + (1 << 34),
        "{} after {before}",
        sealed(&net)
    );
    carries_on(&mut net);
}

#[test]
fn a_restored_aead_ike_sa_takes_the_catch_up_window_instead_of_a_sync() {
    let mut net = Net::established();
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    net.run();
    net.gateway_from_copy(&stale);
    net.advance_to(net.now);
    net.collect();
    assert!(net.wire.is_empty(), "no sync request with AES-GCM");
    let id = net.site.id();
    net.site.ep.delete(id, net.now);
    net.run();
    assert!(net.gw.syncs.is_empty());
    assert_eq!(net.gw.deleted, vec![DeleteReason::PeerDeleted]);
}

#[test]
fn a_restored_sa_asks_only_when_configured_to() {
    let mut net = Net::established_with(true, CBC);
    let copy = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    let config = Arc::new(responder::Config {
        sync_after_restore: false,
        ..(*gw_config()).clone()
    });
    net.gateway_from_copy_with(&copy, config);
    net.advance_to(net.now);
    net.collect();
    assert!(net.wire.is_empty(), "no sync request");
    carries_on(&mut net);
}

#[test]
fn a_sync_answer_without_our_nonce_is_not_used() {
    let mut net = Net::established_with(true, CBC);
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    net.gateway_from_copy(&stale);
    net.advance_to(net.now);
    net.collect();
    assert_eq!(net.wire.len(), 1, "the sync request");
    net.deliver();
    net.collect();
    // The site's answer, replayed to a second copy that sent a sync request of its own (a
    // different nonce): not taken.
    let answer = net.wire.clone();
    net.wire.clear();
    net.gateway_from_copy(&stale);
    net.advance_to(net.now);
    net.lose();
    for (_, t) in answer {
        let _ = net
            .gw
            .ep
            .handle_datagram(net.now, t.remote, t.local, &t.payload, &mut SystemEntropy);
    }
    net.collect();
    assert_eq!(net.gw.syncs, vec![(true, None)]);
}

#[test]
fn a_sync_request_cannot_take_back_a_message_id() {
    let mut net = Net::established_with(true, CBC);
    // The gateway restores a copy taken before a liveness check of its own (as if its owner
    // had sent one while its replica was unreachable): its sync request would take back a
    // Message ID the site has processed. The site does not answer it; the gateway gives the
    // sync up after a few tries and keeps the SA.
    let stale = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    net.advance_to(net.now + 31 * SECOND);
    net.run();
    net.gateway_from_copy(&stale);
    net.advance_to(net.now);
    net.collect();
    assert_eq!(net.wire.len(), 1, "the gateway's sync request");
    net.deliver();
    net.collect();
    assert!(net.wire.is_empty(), "the site does not answer");
    assert!(net.site.syncs.is_empty());
    for _ in 0..90 {
        net.advance_to(net.now + SECOND);
        net.run();
    }
    assert_eq!(net.gw.syncs, vec![(true, None)], "given up");
    assert_eq!(net.established_counts(), (1, 1), "the SA stays");
}

#[test]
fn a_retransmitted_request_is_answered_from_the_restored_cache() {
    let mut net = Net::established();
    // The site's CHILD SA rekey reaches the gateway; the answer is lost.
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    net.collect();
    net.deliver();
    let lost = net.lose();
    assert_eq!(lost.len(), 1, "the gateway answered");
    let answer = lost[0].1.payload.clone();
    net.take_over();
    // The site retransmits; the restored gateway answers from its cache with the same bytes.
    // (Its RFC 6311 sync request goes out at the same time, to the site.)
    net.advance_to(net.now + 2 * SECOND);
    net.collect();
    let to_gw = |net: &Net| net.wire.iter().filter(|(to_gw, _)| *to_gw).count();
    assert_eq!(to_gw(&net), 1, "the site retransmitted");
    net.wire.retain(|(to_gw, _)| *to_gw);
    net.deliver();
    net.collect();
    assert_eq!(net.wire.len(), 1);
    assert_eq!(net.wire[0].1.payload, answer, "answered from the cache");
    net.run();
    net.assert_keys_agree();
    carries_on(&mut net);
}

#[test]
fn a_rekey_in_flight_completes_after_the_take_over() {
    let mut net = Net::established();
    // The site's CHILD SA rekey (with PFS) is sent and lost: its nonce and key exchange are
    // in the snapshot.
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    assert_eq!(net.lose().len(), 1);
    let snap = net.site.ep.snapshot(id, net.now).unwrap();
    assert!(
        matches!(snap.in_flight, InFlight::ChildRekey { kex: Some(_), .. }),
        "{:?}",
        snap.in_flight
    );
    net.take_over();
    net.advance_to(net.now + 2 * SECOND);
    net.run();
    net.assert_keys_agree();
    assert_ne!(
        net.site.children.keys().next(),
        Some(&spi_in),
        "the rekey completed"
    );
    carries_on(&mut net);
}

#[test]
fn an_sa_that_is_not_established_has_no_snapshot() {
    let mut ep = Endpoint::new(EndpointConfig::default(), gw_config());
    let id = ep
        .connect(
            site_config(),
            PSK,
            site_addr(),
            gw_addr(),
            Instant::now(),
            &mut SystemEntropy,
        )
        .unwrap();
    assert!(matches!(
        ep.snapshot(id, Instant::now()),
        Err(concentrator_ike::endpoint::EndpointError::Snapshot(
            SnapshotError::NotEstablished
        ))
    ));
}

#[test]
fn a_restored_sa_whose_spi_is_in_use_is_refused() {
    let net = Net::established();
    let snap = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap();
    let mut ep = Endpoint::new(EndpointConfig::default(), gw_config());
    ep.restore(snap.clone(), gw_config(), site_config(), net.now)
        .unwrap();
    assert!(matches!(
        ep.restore(snap, gw_config(), site_config(), net.now),
        Err(concentrator_ike::endpoint::EndpointError::SpiInUse(_))
    ));
}

#[test]
fn malformed_snapshots_are_refused_without_panicking() {
    let net = Net::established();
    let bytes = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap().encode();
    for n in 0..bytes.len() {
        assert!(IkeSaSnapshot::decode(&bytes[..n]).is_err(), "truncated at {n}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        IkeSaSnapshot::decode(&trailing).unwrap_err(),
        SnapshotError::TrailingBytes
    );
    let mut version = bytes.clone();
    version[4] = 9;
    assert_eq!(
        IkeSaSnapshot::decode(&version).unwrap_err(),
        SnapshotError::UnsupportedVersion(9)
    );
    assert_eq!(
        IkeSaSnapshot::decode(b"nope").unwrap_err(),
        SnapshotError::BadMagic
    );
}

#[test]
fn snapshots_with_zero_or_repeated_spis_are_refused() {
    let net = Net::established();
    let snap = net.gw.ep.snapshot(net.gw.id(), net.now).unwrap();
    let mut zero = snap.clone();
    zero.current.spi_i = 0;
    assert_eq!(
        IkeSaSnapshot::decode(&zero.encode()).unwrap_err(),
        SnapshotError::InvalidValue("IKE SPIs")
    );
    let mut twice = snap.clone();
    twice.children.push(twice.children[0].clone());
    assert_eq!(
        IkeSaSnapshot::decode(&twice.encode()).unwrap_err(),
        SnapshotError::InvalidValue("CHILD SA SPIs")
    );
    // The SPI of an IKE SA rekey in flight is taken here: refused before anything changes.
    let mut ep = Endpoint::new(EndpointConfig::default(), gw_config());
    let taken = ep
        .restore(snap.clone(), gw_config(), site_config(), net.now)
        .unwrap();
    let mut rekeying = net.site.ep.snapshot(net.site.id(), net.now).unwrap();
    rekeying.in_flight = InFlight::IkeRekey {
        spi_i: taken,
        ni: vec![7; 32],
        kex: match &snap.in_flight {
            InFlight::IkeRekey { kex, .. } => kex.clone(),
            _ => (
                concentrator_algorithms::DhGroup::Curve25519,
                concentrator_crypto::KeyExchange::generate(concentrator_algorithms::DhGroup::Curve25519)
                    .unwrap()
                    .private_key()
                    .unwrap(),
            ),
        },
    };
    assert!(matches!(
        ep.restore(rekeying, gw_config(), site_config(), net.now),
        Err(concentrator_ike::endpoint::EndpointError::SpiInUse(s)) if s == taken
    ));
}

#[test]
fn a_rekey_of_a_child_sa_the_peer_deleted_meanwhile_still_restores() {
    let mut net = Net::established();
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    net.lose();
    let mut snap = net.site.ep.snapshot(id, net.now).unwrap();
    // As after a rekey collision in which the peer deleted the old CHILD SA first.
    snap.children.clear();
    let mut ep = Endpoint::new(EndpointConfig::default(), gw_config());
    ep.restore(snap, gw_config(), site_config(), net.now).unwrap();
}

/// Snapshots of the previous encoding (version 2: kept requests in full, SK_pi and SK_pr),
/// as a pod of the release before hands them over in the middle of an upgrade: they decode
/// and restore, and a request kept in full is recognised by its digest after the restore.
/// (`tests/data/snapshot-v2/` holds the fuzz seeds that version wrote.)
#[test]
fn version_2_snapshots_still_restore() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/snapshot-v2");
    let now = Instant::now();
    for name in ["responder", "initiator", "initiator-rekeying"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(bytes[4], 2, "{name}: a version 2 snapshot");
        let snap = IkeSaSnapshot::decode(&bytes).unwrap();
        let again = IkeSaSnapshot::decode(&snap.encode()).unwrap();
        assert_eq!(
            again.encode(),
            snap.encode(),
            "{name}: the same state in version 3"
        );
        let mut ep = Endpoint::new(EndpointConfig::default(), gw_config());
        let id = ep.restore(snap.clone(), gw_config(), site_config(), now).unwrap();
        if name != "responder" {
            continue;
        }
        // The IKE_AUTH request the old encoding kept in full, found in its bytes (SPIi,
        // SPIr, then SK as the first payload, version 2.0, IKE_AUTH, the Initiator flag):
        // its retransmission is answered with the kept response.
        let (last_id, kept) = snap.current.last.clone().expect("the IKE_AUTH exchange is kept");
        let mut head = Vec::new();
        head.extend_from_slice(&snap.current.spi_i.to_be_bytes());
        head.extend_from_slice(&snap.current.spi_r.to_be_bytes());
        head.extend_from_slice(&[46, 0x20, 35, 0x08]);
        head.extend_from_slice(&last_id.to_be_bytes());
        let at = bytes
            .windows(head.len())
            .position(|w| w == head)
            .expect("the request");
        let len = u32::from_be_bytes(bytes[at + 24..at + 28].try_into().unwrap()) as usize;
        let request = &bytes[at..at + len];
        ep.handle_datagram(now, snap.local, snap.remote, request, &mut SystemEntropy)
            .unwrap();
        let answer = ep.poll_transmit().expect("answered");
        assert_eq!(answer.payload, kept.response, "the kept response, as sent");
        let mut altered = request.to_vec();
        *altered.last_mut().unwrap() ^= 1;
        assert!(
            ep.handle_datagram(now, snap.local, snap.remote, &altered, &mut SystemEntropy)
                .is_err(),
            "a request that differs in one bit is not a retransmission"
        );
        assert!(ep.poll_transmit().is_none());
        assert!(ep.snapshot(id, now).is_ok());
    }
}

/// Writes the fuzz target's seeds (`cargo test -p concentrator-ike --test snapshot -- --ignored`):
/// snapshots of both roles, one with a CHILD SA rekey in flight.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let mut net = Net::established();
    let write = |name: &str, s: IkeSaSnapshot| std::fs::write(dir.join(name), s.encode()).unwrap();
    write("responder", net.gw.ep.snapshot(net.gw.id(), net.now).unwrap());
    write("initiator", net.site.ep.snapshot(net.site.id(), net.now).unwrap());
    let spi_in = *net.site.children.keys().next().unwrap();
    let id = net.site.id();
    assert!(net.site.ep.rekey_child(id, spi_in, net.now, &mut SystemEntropy));
    net.lose();
    write("initiator-rekeying", net.site.ep.snapshot(id, net.now).unwrap());
}
