//! The initiator against our own responder, in process on a virtual clock: a [`Pair`] moves
//! datagrams between an [`Initiator`] and a [`Responder`] (or an [`Endpoint`] in front of
//! responders, with cookies forced), answering the responder's PSK lookup, optionally through
//! a NAT that rewrites the initiator's address, and collects both sides' events.
//!
//! Both sides must derive the same CHILD SA keys for each proposal of the interop matrix;
//! COOKIE and INVALID_KE_PAYLOAD retries, refusals (wrong PSK, proposals, traffic
//! selectors), the NAT-T float, lost messages and the INFORMATIONAL exchanges after
//! establishment are each driven through both state machines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::{parse_esp, parse_ike};
use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointEvent};
use concentrator_ike::initiator::{self, Initiator, NatTraversal};
use concentrator_ike::payload::{Identity, TrafficSelector};
use concentrator_ike::redirect::GatewayId;
use concentrator_ike::responder::{self, ChildSa, DeleteReason, IdBuf, Responder, SystemEntropy, Transmit};
use concentrator_ike::{ExchangeType, NotifyType};

const PSK: &[u8] = b"site-a secret";
const SITE: &str = "192.0.2.1:500";
const GW: &str = "192.0.2.2:500";
/// The initiator's address as the responder sees it behind the emulated NAT.
const NAT_PUBLIC: &str = "198.51.100.7";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn initiator_config(ike: &str, esp: &str) -> initiator::Config {
    let mut c = initiator::Config::new(
        vec![parse_ike("ike", ike).unwrap()],
        vec![parse_esp("esp", esp).unwrap()],
        "10.1.0.0/24".parse().unwrap(),
        "10.2.0.0/24".parse().unwrap(),
        IdBuf::new(&Identity::Fqdn(b"site-a.example")),
    );
    c.remote_id = Some(IdBuf::new(&Identity::Fqdn(b"gw.example")));
    c
}

fn responder_config(ike: &str, esp: &str) -> responder::Config {
    responder::Config::new(
        vec![parse_ike("ike", ike).unwrap()],
        vec![parse_esp("esp", esp).unwrap()],
        "10.2.0.0/24".parse().unwrap(),
        "10.1.0.0/24".parse().unwrap(),
        IdBuf::new(&Identity::Fqdn(b"gw.example")),
    )
}

/// The responder side: one responder, or an endpoint in front of many.
enum Side {
    One(Box<Responder>),
    Many(Box<Endpoint>),
}

/// An initiator and a responder joined by a virtual wire.
struct Pair {
    now: Instant,
    i: Initiator,
    r: Side,
    /// The PSK the responder's lookup answers with.
    psk_r: Vec<u8>,
    i_events: Vec<initiator::Event>,
    r_events: Vec<responder::Event>,
    /// Emulate a NAT in front of the initiator: its source port plus 10000, from
    /// [`NAT_PUBLIC`].
    nat: bool,
    /// Indices (counting from 0) of the datagrams to the initiator that are lost.
    lose_to_i: Vec<usize>,
    to_i: usize,
    /// How many datagrams to the responder are lost next.
    drop_to_r: usize,
    /// Indices (counting from 0) of the datagrams to the responder that are lost.
    lose_to_r: Vec<usize>,
    to_r: usize,
    /// Every datagram delivered to the responder, as (local, remote).
    seen_by_r: Vec<(SocketAddr, SocketAddr)>,
    /// How many IKE_SA_INIT requests the responder got.
    init_requests: usize,
    /// The responder redirects the peer in IKE_AUTH, once authenticated (RFC 5685 §6).
    auth_redirect: Option<GatewayId>,
    /// The responder refused [`Self::auth_redirect`].
    auth_redirect_refused: bool,
}

impl Pair {
    fn new(i: initiator::Config, r: responder::Config) -> Self {
        Self::with_side(i, Side::One(Box::new(Responder::new(Arc::new(r)))))
    }

    fn endpoint(i: initiator::Config, r: responder::Config, ep: EndpointConfig) -> Self {
        Self::with_side(i, Side::Many(Box::new(Endpoint::new(ep, Arc::new(r)))))
    }

    fn with_side(i: initiator::Config, r: Side) -> Self {
        let now = Instant::now();
        let i = Initiator::connect(Arc::new(i), PSK, addr(SITE), addr(GW), now, &mut SystemEntropy).unwrap();
        Self {
            now,
            i,
            r,
            psk_r: PSK.to_vec(),
            i_events: Vec::new(),
            r_events: Vec::new(),
            nat: false,
            lose_to_i: Vec::new(),
            to_i: 0,
            drop_to_r: 0,
            lose_to_r: Vec::new(),
            to_r: 0,
            seen_by_r: Vec::new(),
            init_requests: 0,
            auth_redirect: None,
            auth_redirect_refused: false,
        }
    }

    /// The initiator's address as the responder sees it.
    fn outside(&self, a: SocketAddr) -> SocketAddr {
        if self.nat {
            SocketAddr::new(NAT_PUBLIC.parse().unwrap(), a.port() + 10000)
        } else {
            a
        }
    }

    /// The initiator's real address for one the responder answers to.
    fn inside(&self, a: SocketAddr) -> SocketAddr {
        if self.nat {
            SocketAddr::new(addr(SITE).ip(), a.port() - 10000)
        } else {
            a
        }
    }

    fn deliver_to_responder(&mut self, t: Transmit) {
        if self.drop_to_r > 0 {
            self.drop_to_r -= 1;
            return;
        }
        self.to_r += 1;
        if self.lose_to_r.contains(&(self.to_r - 1)) {
            return;
        }
        let (local, remote) = (t.remote, self.outside(t.local));
        self.seen_by_r.push((local, remote));
        // Version 2.0, IKE_SA_INIT, flags I.
        if t.payload.get(17..20) == Some(&[0x20, 34, 0x08]) {
            self.init_requests += 1;
        }
        let now = self.now;
        let mut e = SystemEntropy;
        // Dropped datagrams and refusals show in the events.
        let _ = match &mut self.r {
            Side::One(r) => r
                .handle_datagram(now, local, remote, &t.payload, &mut e)
                .map_err(|e| e.to_string()),
            Side::Many(ep) => ep
                .handle_datagram(now, local, remote, &t.payload, &mut e)
                .map_err(|e| e.to_string()),
        };
    }

    /// The responder's queued datagrams, answering its PSK lookups on the way.
    fn take_from_responder(&mut self) -> Vec<Transmit> {
        let now = self.now;
        let mut e = SystemEntropy;
        let mut out = Vec::new();
        match &mut self.r {
            Side::One(r) => loop {
                out.extend(std::iter::from_fn(|| r.poll_transmit()));
                let Some(ev) = r.poll_event() else { break };
                if let responder::Event::PeerIdentified { .. } = ev {
                    if let Some(gw) = self.auth_redirect.clone() {
                        self.auth_redirect_refused |= r.redirect_after_auth(gw).is_err();
                    }
                    let _ = r.provide_psk(now, Some(&self.psk_r), &mut e);
                }
                self.r_events.push(ev);
            },
            Side::Many(ep) => loop {
                out.extend(std::iter::from_fn(|| ep.poll_transmit()));
                let Some(ev) = ep.poll_event() else { break };
                if let EndpointEvent::Sa { id, event, .. } = ev {
                    if let responder::Event::PeerIdentified { .. } = event {
                        let _ = ep.provide_psk(id, now, Some(&self.psk_r), &mut e);
                    }
                    self.r_events.push(event);
                }
            },
        }
        out
    }

    /// Moves datagrams both ways until neither side has anything to send.
    fn drive(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some(t) = self.i.poll_transmit() {
                moved = true;
                self.deliver_to_responder(t);
            }
            for t in self.take_from_responder() {
                moved = true;
                self.to_i += 1;
                if self.lose_to_i.contains(&(self.to_i - 1)) {
                    continue;
                }
                let (local, remote) = (self.inside(t.remote), t.local);
                let _ = self
                    .i
                    .handle_datagram(self.now, local, remote, &t.payload, &mut SystemEntropy);
            }
            self.i_events.extend(std::iter::from_fn(|| self.i.poll_event()));
            if !moved {
                return;
            }
        }
        panic!("the pair never went idle");
    }

    /// Jumps the clock to the earliest timer of either side, runs it and drives.
    fn advance(&mut self) {
        let r_timer = match &self.r {
            Side::One(r) => r.poll_timeout(),
            Side::Many(ep) => ep.poll_timeout(),
        };
        let next = [self.i.poll_timeout(), r_timer]
            .into_iter()
            .flatten()
            .min()
            .expect("a timer");
        self.now = self.now.max(next);
        self.i.handle_timeout(self.now, &mut SystemEntropy);
        match &mut self.r {
            Side::One(r) => r.handle_timeout(self.now, &mut SystemEntropy),
            Side::Many(ep) => ep.handle_timeout(self.now, &mut SystemEntropy),
        }
        self.drive();
    }

    fn initiator_child(&self) -> &ChildSa {
        self.i_events
            .iter()
            .find_map(|e| match e {
                initiator::Event::ChildSaInstalled(c) => Some(&**c),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no CHILD SA on the initiator: {:?}", self.i_events))
    }

    /// Whether the initiator's IKE SA was established with a NAT detected.
    fn initiator_saw_nat(&self) -> bool {
        match self.i_events.first() {
            Some(initiator::Event::IkeSaEstablished { nat_detected, .. }) => *nat_detected,
            other => panic!("the initiator's first event is not its IKE SA: {other:?}"),
        }
    }

    fn responder_child(&self) -> &ChildSa {
        self.r_events
            .iter()
            .find_map(|e| match e {
                responder::Event::ChildSaInstalled(c) => Some(&**c),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no CHILD SA on the responder: {:?}", self.r_events))
    }

    fn initiator_failure(&self) -> initiator::Error {
        self.i_events
            .iter()
            .find_map(|e| match e {
                initiator::Event::Failed(e) => Some(*e),
                _ => None,
            })
            .unwrap_or_else(|| panic!("the initiator did not fail: {:?}", self.i_events))
    }
}

fn ts(v: &[TrafficSelector<'_>]) -> Vec<String> {
    v.iter()
        .filter_map(concentrator_ike::negotiate::ts_bounds)
        .map(|(a, b)| format!("{a}-{b}"))
        .collect()
}

/// Both ends hold the two halves of one CHILD SA: our outbound is their inbound, keys and
/// SPIs included, and the selectors mirror each other.
fn assert_same_child(i: &ChildSa, r: &ChildSa) {
    assert_eq!((i.spi_out, i.spi_in), (r.spi_in, r.spi_out), "SPIs");
    assert_eq!(
        (i.encryption, i.integrity, i.esn),
        (r.encryption, r.integrity, r.esn)
    );
    for (what, a, b) in [
        ("initiator to responder", &i.outbound, &r.inbound),
        ("responder to initiator", &i.inbound, &r.outbound),
    ] {
        assert_eq!(a.encr.expose(), b.encr.expose(), "{what} key");
        assert_eq!(a.salt.expose(), b.salt.expose(), "{what} salt");
        assert_eq!(a.integ.expose(), b.integ.expose(), "{what} integrity key");
        assert!(!a.encr.is_empty());
    }
    assert_ne!(
        i.outbound.encr.expose(),
        i.inbound.encr.expose(),
        "one key per direction"
    );
    assert_eq!(ts(&i.ts_local), ts(&r.ts_remote));
    assert_eq!(ts(&i.ts_remote), ts(&r.ts_local));
    assert_eq!(ts(&i.ts_local), ["10.1.0.0-10.1.0.255"]);
    assert_eq!(i.udp_encap, r.udp_encap);
}

const MATRIX: [(&str, &str); 5] = [
    ("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
    ("aes256gcm16-prfsha384-ecp384", "aes256gcm16"),
    ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
    ("aes256-sha256-modp2048", "aes256-sha256"),
    ("aes128-sha256-ecp256", "aes128-sha256"),
];

fn assert_established(p: &Pair) {
    assert!(p.i.is_established(), "initiator: {:?}", p.i_events);
    assert!(
        matches!(&p.i_events[..], [initiator::Event::IkeSaEstablished { peer_id, .. }, initiator::Event::ChildSaInstalled(_)] if peer_id.to_string() == "gw.example"),
        "{:?}",
        p.i_events
    );
    assert_same_child(p.initiator_child(), p.responder_child());
}

#[test]
fn establishes_with_our_responder_for_each_proposal() {
    for (ike, esp) in MATRIX {
        let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
        p.drive();
        assert_established(&p);
        let established = p.r_events.iter().find_map(|e| match e {
            responder::Event::IkeSaEstablished { spi_i, peer_id, .. } => Some((*spi_i, peer_id.to_string())),
            _ => None,
        });
        assert_eq!(
            established,
            Some((p.i.spi_i(), "site-a.example".to_owned())),
            "{ike}"
        );
        assert!(!p.initiator_child().udp_encap, "no NAT, no float: plain ESP");
        assert_eq!(p.init_requests, 1, "{ike}: one IKE_SA_INIT");
    }
}

#[test]
fn establishes_through_the_endpoints_cookie_for_each_proposal() {
    let forced = EndpointConfig {
        cookie_threshold: 0,
        ..EndpointConfig::default()
    };
    for (ike, esp) in MATRIX {
        let mut p = Pair::endpoint(
            initiator_config(ike, esp),
            responder_config(ike, esp),
            forced.clone(),
        );
        p.drive();
        assert_established(&p);
        // RFC 7296 §2.6: the first request got N(COOKIE), the second echoed it.
        assert_eq!(p.init_requests, 2, "{ike}");
    }
}

#[test]
fn retries_with_the_responders_group_after_invalid_ke_payload() {
    // We guess X25519 first; the responder only takes P-256, which we offer second.
    let i = initiator_config("aes128gcm16-prfsha256-x25519-ecp256", "aes128gcm16");
    let r = responder_config("aes128gcm16-prfsha256-ecp256", "aes128gcm16");
    // A refusal in IKE_SA_INIT keeps no state (RFC 7296 §2.6): the retry is a new
    // negotiation for the endpoint, which makes a new responder for it.
    let mut p = Pair::endpoint(i.clone(), r.clone(), EndpointConfig::default());
    p.drive();
    assert_eq!(p.init_requests, 2);
    assert_established(&p);

    // Behind the endpoint with cookies: COOKIE, then INVALID_KE_PAYLOAD with the cookie
    // still echoed (RFC 7296 §2.6.1), then the answer.
    let forced = EndpointConfig {
        cookie_threshold: 0,
        ..EndpointConfig::default()
    };
    let mut p = Pair::endpoint(i, r, forced);
    p.drive();
    assert_eq!(p.init_requests, 3);
    assert_established(&p);
}

#[test]
fn wrong_psk_fails_with_authentication_failed() {
    let (ike, esp) = MATRIX[0];
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    p.psk_r = b"another secret".to_vec();
    p.drive();
    assert_eq!(
        p.initiator_failure(),
        initiator::Error::Refused {
            exchange: ExchangeType::IKE_AUTH,
            notify: NotifyType::AUTHENTICATION_FAILED
        }
    );
    assert_eq!(
        p.initiator_failure().notify(),
        Some(NotifyType::AUTHENTICATION_FAILED)
    );
    assert!(p.i.is_closed());
    assert!(p.r_events.iter().any(|e| matches!(
        e,
        responder::Event::Failed(responder::Error::AuthenticationFailed(_))
    )));
    assert!(
        !p.i_events
            .iter()
            .any(|e| matches!(e, initiator::Event::IkeSaEstablished { .. }))
    );
}

#[test]
fn unexpected_responder_identity_fails_and_is_reported_to_it() {
    let (ike, esp) = MATRIX[0];
    let mut i = initiator_config(ike, esp);
    i.remote_id = Some(IdBuf::new(&Identity::Fqdn(b"other-gw.example")));
    let mut p = Pair::new(i, responder_config(ike, esp));
    p.drive();
    assert!(matches!(
        p.initiator_failure(),
        initiator::Error::AuthenticationFailed(_)
    ));
    // The responder established (it authenticated us) and then heard of our refusal in an
    // INFORMATIONAL AUTHENTICATION_FAILED (RFC 7296 §2.21.2).
    assert!(p.r_events.iter().any(|e| matches!(e, responder::Event::PeerError { notify_type } if *notify_type == NotifyType::AUTHENTICATION_FAILED)), "{:?}", p.r_events);
}

#[test]
fn no_common_proposal_fails_in_ike_sa_init() {
    let mut p = Pair::new(
        initiator_config("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
        responder_config("aes256-sha512-modp3072", "aes128gcm16"),
    );
    p.drive();
    assert_eq!(
        p.initiator_failure(),
        initiator::Error::Refused {
            exchange: ExchangeType::IKE_SA_INIT,
            notify: NotifyType::NO_PROPOSAL_CHOSEN
        }
    );
}

#[test]
fn refused_child_sa_fails_and_deletes_the_ike_sa() {
    let (ike, _) = MATRIX[0];
    // ESP: nothing in common.
    let mut p = Pair::new(
        initiator_config(ike, "aes128gcm16"),
        responder_config(ike, "aes256-sha256"),
    );
    p.drive();
    assert_eq!(
        p.initiator_failure().notify(),
        Some(NotifyType::NO_PROPOSAL_CHOSEN)
    );
    // Traffic selectors outside the responder's subnets.
    let mut i = initiator_config(ike, "aes128gcm16");
    i.local_subnet = "10.9.0.0/24".parse().unwrap();
    let mut p = Pair::new(i, responder_config(ike, "aes128gcm16"));
    p.drive();
    assert_eq!(p.initiator_failure().notify(), Some(NotifyType::TS_UNACCEPTABLE));
    // The responder kept the IKE SA without a CHILD SA (RFC 7296 §2.21.2) until our DELETE.
    assert!(
        p.r_events.iter().any(|e| matches!(
            e,
            responder::Event::IkeSaDeleted {
                reason: DeleteReason::PeerDeleted,
                ..
            }
        )),
        "{:?}",
        p.r_events
    );
}

#[test]
fn floats_to_4500_behind_a_nat_and_when_forced() {
    let (ike, esp) = MATRIX[0];
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    p.nat = true;
    p.drive();
    assert_established(&p);
    assert!(p.initiator_saw_nat());
    assert!(p.initiator_child().udp_encap);
    // IKE_SA_INIT on 500, IKE_AUTH from the NAT-T port to the responder's 4500.
    let ports: Vec<(u16, u16)> = p.seen_by_r.iter().map(|(l, r)| (l.port(), r.port())).collect();
    assert_eq!(ports, [(500, 10500), (4500, 14500)]);
    assert_eq!(p.i.path().1, addr("192.0.2.2:4500"));

    let mut i = initiator_config(ike, esp);
    i.nat_t = NatTraversal {
        force: true,
        local_port: 4501,
        remote_port: 4500,
    };
    let mut p = Pair::new(i, responder_config(ike, esp));
    p.drive();
    assert_established(&p);
    assert!(!p.initiator_saw_nat());
    assert!(p.initiator_child().udp_encap, "forced float: UDP encapsulation");
    assert_eq!(p.seen_by_r[1].1.port(), 4501);
}

#[test]
fn a_responder_that_forces_udp_encapsulation_makes_the_initiator_float_without_a_nat() {
    let (ike, esp) = MATRIX[0];
    // Without a NAT and without forcing, both stay on 500 and negotiate plain ESP.
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    p.drive();
    assert_established(&p);
    assert!(!p.initiator_child().udp_encap);
    assert!(p.seen_by_r.iter().all(|(l, _)| l.port() == 500));

    let mut r = responder_config(ike, esp);
    r.force_udp_encap = true;
    let mut p = Pair::new(initiator_config(ike, esp), r);
    p.drive();
    assert_established(&p);
    // The initiator believes the responder is behind a NAT: it floats, and both sides
    // agree on ESP in UDP.
    assert!(p.initiator_saw_nat());
    assert!(p.initiator_child().udp_encap);
    assert!(p.responder_child().udp_encap);
    assert_eq!(p.seen_by_r[1].0.port(), 4500, "IKE_AUTH reached port 4500");
}

#[test]
fn lost_messages_are_retransmitted_and_answered_from_the_cache() {
    let (ike, esp) = MATRIX[0];
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    // The IKE_SA_INIT response is lost, then the IKE_AUTH response.
    p.lose_to_i = vec![0, 2];
    p.drive();
    assert!(p.i.spi_r().is_none());
    // IKE_SA_INIT retransmitted and answered from the responder's cache; IKE_AUTH lost.
    p.advance();
    assert!(p.i.spi_r().is_some() && !p.i.is_established());
    p.advance();
    assert_established(&p);
    assert_eq!(p.init_requests, 2);
    // The responder made one SA and one CHILD SA of it all.
    let children = p
        .r_events
        .iter()
        .filter(|e| matches!(e, responder::Event::ChildSaInstalled(_)))
        .count();
    assert_eq!(children, 1);
}

#[test]
fn silent_responder_times_out() {
    let (ike, esp) = MATRIX[0];
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    p.drop_to_r = usize::MAX;
    let start = p.now;
    while !p.i.is_closed() {
        p.advance();
    }
    assert!(matches!(p.initiator_failure(), initiator::Error::Timeout(_)));
    assert_eq!(p.now - start, responder::Retransmit::default().give_up_after());
}

#[test]
fn answers_liveness_checks_and_the_responders_delete() {
    let (ike, esp) = MATRIX[0];
    let mut r = responder_config(ike, esp);
    r.dpd_interval = Some(Duration::from_secs(10));
    let mut i = initiator_config(ike, esp);
    i.dpd_interval = Some(Duration::from_secs(15));
    let mut p = Pair::new(i, r);
    p.drive();
    assert_established(&p);
    // A minute of liveness checks both ways: every one answered, nobody declared dead.
    let start = p.now;
    while p.now < start + Duration::from_secs(60) {
        p.advance();
    }
    assert!(p.i.is_established());
    assert!(
        !p.r_events
            .iter()
            .any(|e| matches!(e, responder::Event::IkeSaDeleted { .. }))
    );
    // The responder deletes the IKE SA; the initiator reports the CHILD SA and the IKE SA gone.
    let spi_r = p.i.spi_r().unwrap();
    match &mut p.r {
        Side::One(r) => r.delete(p.now),
        Side::Many(_) => unreachable!(),
    }
    p.drive();
    assert!(p.i.is_closed());
    let tail: Vec<String> = p
        .i_events
        .iter()
        .rev()
        .take(2)
        .map(|e| format!("{e:?}"))
        .collect();
    assert!(
        tail[0].contains("IkeSaDeleted") && tail[0].contains("PeerDeleted"),
        "{tail:?} ({spi_r:x})"
    );
    assert!(tail[1].contains("ChildSaDeleted"), "{tail:?}");
}

#[test]
fn finds_a_dead_responder_and_deletes_from_our_side() {
    let (ike, esp) = MATRIX[0];
    let mut i = initiator_config(ike, esp);
    i.dpd_interval = Some(Duration::from_secs(5));
    let mut p = Pair::new(i.clone(), responder_config(ike, esp));
    p.drive();
    assert_established(&p);
    p.drop_to_r = usize::MAX;
    while !p.i.is_closed() {
        p.advance();
    }
    assert!(
        p.i_events.iter().any(|e| matches!(
            e,
            initiator::Event::IkeSaDeleted {
                reason: DeleteReason::DeadPeer,
                ..
            }
        )),
        "{:?}",
        p.i_events
    );

    let mut p = Pair::new(i, responder_config(ike, esp));
    p.drive();
    p.i.delete(p.now);
    p.drive();
    assert!(p.i.is_closed());
    assert!(
        p.r_events.iter().any(|e| matches!(
            e,
            responder::Event::IkeSaDeleted {
                reason: DeleteReason::PeerDeleted,
                ..
            }
        )),
        "{:?}",
        p.r_events
    );
}

/// Every truncation and single-bit flip of every message the responder sends, fed to an
/// initiator in the state that expects it: dropped or failed, never a panic.
#[test]
fn survives_truncated_and_corrupted_responses() {
    // AES-CBC with HMAC (ICV over the whole message) and a cheap key exchange: one new
    // initiator per corrupted IKE_SA_INIT response.
    let (ike, esp) = MATRIX[4];
    let mut p = Pair::new(initiator_config(ike, esp), responder_config(ike, esp));
    let init_request = p.i.poll_transmit().unwrap();
    p.deliver_to_responder(init_request.clone());
    let init_response = p.take_from_responder().remove(0).payload;
    let mut variants: Vec<Vec<u8>> = (0..init_response.len())
        .map(|n| init_response[..n].to_vec())
        .collect();
    for bit in 0..init_response.len() * 8 {
        let mut v = init_response.clone();
        v[bit / 8] ^= 1 << (bit % 8);
        variants.push(v);
    }
    let (local, remote) = (addr(SITE), addr(GW));
    for v in &variants {
        let cfg = Arc::new(initiator_config(ike, esp));
        let mut i = Initiator::connect(cfg, PSK, local, remote, p.now, &mut SystemEntropy).unwrap();
        let _ = i.handle_datagram(p.now, local, remote, v, &mut SystemEntropy);
    }
    // The IKE_AUTH response, corrupted, to the initiator that sent the request.
    p.i.handle_datagram(p.now, local, remote, &init_response, &mut SystemEntropy)
        .unwrap();
    let auth_request = p.i.poll_transmit().unwrap();
    p.deliver_to_responder(auth_request);
    let auth_response = p.take_from_responder().remove(0).payload;
    for n in 0..auth_response.len() {
        assert!(
            p.i.handle_datagram(p.now, local, remote, &auth_response[..n], &mut SystemEntropy)
                .is_err()
        );
    }
    for bit in 0..auth_response.len() * 8 {
        let mut v = auth_response.clone();
        v[bit / 8] ^= 1 << (bit % 8);
        let _ = p.i.handle_datagram(p.now, local, remote, &v, &mut SystemEntropy);
    }
    // Flips that the ICV catches leave the request in flight; the genuine one still works.
    if !p.i.is_closed() {
        p.i.handle_datagram(p.now, local, remote, &auth_response, &mut SystemEntropy)
            .unwrap();
        assert!(p.i.is_established());
    }
}

/// CHILD SAs as the initiator's `(spi_in, spi_out)`.
type Spis = Vec<(u32, u32)>;

/// The CHILD SAs each side holds now.
fn current_children(p: &Pair) -> (Spis, Spis) {
    let r = match &p.r {
        Side::One(r) => r.child_spis().into_iter().map(|(a, b)| (b, a)).collect(),
        Side::Many(_) => Vec::new(),
    };
    (p.i.child_spis(), r)
}

/// Runs `rounds` CHILD SA rekeys started by the side whose lifetime is short, checking each:
/// it comes between 85 % and 95 % of the lifetime, both sides install the same new SA (keys
/// agree) naming the one it replaces, and both delete the old one.
fn rekeys_child_sa(esp: &str, initiator_rekeys: bool, rounds: usize) {
    let short = Duration::from_secs(20);
    let long = Duration::from_secs(3600);
    let mut ic = initiator_config(MATRIX[0].0, esp);
    let mut rc = responder_config(MATRIX[0].0, esp);
    (ic.child_lifetime, rc.child_lifetime) = if initiator_rekeys {
        (short, long)
    } else {
        (long, short)
    };
    let mut p = Pair::new(ic, rc);
    p.drive();
    assert_established(&p);
    let mut old = (p.initiator_child().spi_in, p.initiator_child().spi_out);
    for round in 0..rounds {
        p.i_events.clear();
        p.r_events.clear();
        let before = p.now;
        p.advance();
        let waited = p.now - before;
        assert!(
            (Duration::from_secs(17)..=Duration::from_secs(19)).contains(&waited),
            "round {round}: rekeyed after {waited:?}"
        );
        let (i_new, r_new) = (p.initiator_child(), p.responder_child());
        assert_same_child(i_new, r_new);
        assert_eq!(i_new.replaces, Some(old.0), "round {round}");
        assert_eq!(r_new.replaces, Some(old.1), "round {round}");
        assert!(
            p.i_events.iter().any(|e| matches!(e, initiator::Event::ChildSaDeleted { spi_in, spi_out } if (*spi_in, *spi_out) == old)),
            "{:?}",
            p.i_events
        );
        assert!(
            p.r_events.iter().any(|e| matches!(e, responder::Event::ChildSaDeleted { spi_in, spi_out } if (*spi_out, *spi_in) == old)),
            "{:?}",
            p.r_events
        );
        let new = (i_new.spi_in, i_new.spi_out);
        assert_ne!(new, old);
        assert_eq!(current_children(&p), (vec![new], vec![new]));
        assert!(p.i.is_established());
        old = new;
    }
}

#[test]
fn initiator_rekeys_its_child_sa_at_the_soft_lifetime() {
    rekeys_child_sa("aes128gcm16", true, 3);
}

#[test]
fn initiator_rekeys_its_child_sa_with_pfs() {
    rekeys_child_sa("aes128gcm16-x25519", true, 2);
}

#[test]
fn responder_rekeys_the_child_sa_at_the_soft_lifetime() {
    rekeys_child_sa("aes128gcm16", false, 3);
}

#[test]
fn responder_rekeys_the_child_sa_with_pfs() {
    rekeys_child_sa("aes256-sha256-modp2048", false, 2);
}

/// `rekey_child` (a volume limit reached in the data plane) rekeys the CHILD SA at once, with
/// the lifetimes far away, from either side, through the endpoint for the responder side;
/// the new SA replaces the old one on both sides, which both delete. Asking again for the
/// old SA, or for an SPI nobody has, does nothing.
fn rekey_child_now(esp: &str, initiator_rekeys: bool) {
    let mut p = Pair::endpoint(
        initiator_config(MATRIX[0].0, esp),
        responder_config(MATRIX[0].0, esp),
        EndpointConfig::default(),
    );
    p.drive();
    assert_established(&p);
    let old = (p.initiator_child().spi_in, p.initiator_child().spi_out);
    // The endpoint names the SA by its responder SPI.
    let id = p.i.spi_r().expect("established");
    for round in 0..2 {
        p.i_events.clear();
        p.r_events.clear();
        let now = p.now;
        let started = if initiator_rekeys {
            p.i.rekey_child(old.0, now, &mut SystemEntropy)
        } else {
            let Side::Many(ep) = &mut p.r else { unreachable!() };
            ep.rekey_child(id, old.1, now, &mut SystemEntropy)
        };
        if round == 1 {
            assert!(!started, "the old SA is gone: nothing to rekey");
            p.drive();
            assert!(p.i_events.is_empty() && p.r_events.is_empty());
            break;
        }
        assert!(started);
        p.drive();
        assert_eq!(p.now, now, "no time passed");
        let (i_new, r_new) = (p.initiator_child(), p.responder_child());
        assert_same_child(i_new, r_new);
        assert_eq!(i_new.replaces, Some(old.0));
        assert_eq!(r_new.replaces, Some(old.1));
        assert!(
            p.i_events
                .iter()
                .any(|e| matches!(e, initiator::Event::ChildSaDeleted { spi_in, .. } if *spi_in == old.0)),
            "{:?}",
            p.i_events
        );
        assert!(
            p.r_events
                .iter()
                .any(|e| matches!(e, responder::Event::ChildSaDeleted { spi_in, .. } if *spi_in == old.1)),
            "{:?}",
            p.r_events
        );
        assert_eq!(p.i.child_spis(), vec![(i_new.spi_in, i_new.spi_out)]);
    }
    assert!(!p.i.rekey_child(0x1234_5678, p.now, &mut SystemEntropy));
    let Side::Many(ep) = &mut p.r else { unreachable!() };
    assert!(!ep.rekey_child(id, 0x1234_5678, p.now, &mut SystemEntropy));
    assert!(p.i.is_established());
}

#[test]
fn initiator_rekeys_a_child_sa_when_asked() {
    rekey_child_now("aes128gcm16", true);
}

#[test]
fn responder_rekeys_a_child_sa_when_asked() {
    rekey_child_now("aes128gcm16-x25519", false);
}

/// IKE SA rekeys started by one side (20 s IKE lifetime: at 17 to 19 s, twice), then a CHILD
/// SA rekey on the twice-rekeyed IKE SA (50 s CHILD lifetime): both ends carry on as the same
/// new IKE SA each time, the old one is deleted by the side that rekeyed and retired, the
/// CHILD SA moves along, and the CHILD SA keys derived from the new SK_d agree.
fn rekeys_ike_sa(initiator_rekeys: bool) {
    let mut ic = initiator_config(MATRIX[0].0, "aes128gcm16");
    let mut rc = responder_config(MATRIX[0].0, "aes128gcm16");
    let (ike, child) = (Some(Duration::from_secs(20)), Duration::from_secs(50));
    ic.child_lifetime = Duration::from_secs(3600);
    rc.child_lifetime = Duration::from_secs(3600);
    ic.accept_ike_rekey = true;
    if initiator_rekeys {
        (ic.ike_lifetime, ic.child_lifetime) = (ike, child);
    } else {
        (rc.ike_lifetime, rc.child_lifetime) = (ike, child);
    }
    let mut p = Pair::new(ic, rc);
    p.drive();
    assert_established(&p);
    let first_child = (p.initiator_child().spi_in, p.initiator_child().spi_out);
    let start = p.now;
    let spis = |p: &Pair| match &p.r {
        Side::One(r) => (p.i.ike_spis(), r.ike_spis()),
        Side::Many(_) => unreachable!(),
    };
    let mut seen = vec![spis(&p).0.unwrap()];
    p.i_events.clear();
    p.r_events.clear();
    // IKE SA rekeys at about 18 s and 36 s, the CHILD SA rekey at about 45 s.
    while !p
        .i_events
        .iter()
        .any(|e| matches!(e, initiator::Event::ChildSaInstalled(_)))
    {
        assert!(p.now - start < Duration::from_secs(60), "no CHILD SA rekey");
        p.advance();
        let (i, r) = spis(&p);
        assert_eq!(i, r, "both ends on the same IKE SA");
        let i = i.unwrap();
        // Our SPI of the IKE SA in use is the rekeying side's SPIi.
        let i_spi = if initiator_rekeys || i == seen[0] {
            i.0
        } else {
            i.1
        };
        assert_eq!(p.i.our_spis().first(), Some(&i_spi));
        if seen.last() != Some(&i) {
            assert!(!seen.iter().any(|s| s.0 == i.0 || s.1 == i.1), "fresh SPIs");
            seen.push(i);
        }
        assert!(p.i.is_established(), "{:?}", p.i_events);
    }
    assert_eq!(seen.len(), 3, "two IKE SA rekeys: {seen:x?}");
    let rekeyed = p
        .r_events
        .iter()
        .filter(|e| matches!(e, responder::Event::IkeSaRekeyed { .. }))
        .count();
    let retired = p
        .r_events
        .iter()
        .filter(|e| matches!(e, responder::Event::IkeSaRetired { .. }))
        .count();
    assert_eq!((rekeyed, retired), (2, 2), "{:?}", p.r_events);
    // The CHILD SA rekey on the newest IKE SA: keys from its SK_d agree on both ends.
    let (i_new, r_new) = (p.initiator_child(), p.responder_child());
    assert_same_child(i_new, r_new);
    assert_eq!(i_new.replaces, Some(first_child.0));
    assert_eq!(current_children(&p).0, vec![(i_new.spi_in, i_new.spi_out)]);
    assert_eq!(current_children(&p).1, current_children(&p).0);
    assert!(
        !p.i_events.iter().any(|e| matches!(
            e,
            initiator::Event::Failed(_)
                | initiator::Event::RequestRefused { .. }
                | initiator::Event::IkeSaDeleted { .. }
        )),
        "{:?}",
        p.i_events
    );
    assert!(
        !p.r_events.iter().any(|e| matches!(
            e,
            responder::Event::RequestRefused { .. } | responder::Event::IkeSaDeleted { .. }
        )),
        "{:?}",
        p.r_events
    );
    // The newest IKE SA works for the side that did not rekey too: it deletes it.
    if initiator_rekeys {
        p.i.delete(p.now);
    } else if let Side::One(r) = &mut p.r {
        r.delete(p.now);
    }
    p.drive();
    assert!(p.i.is_closed());
    assert!(matches!(&p.r, Side::One(r) if r.is_closed()));
}

/// The DELETE of the IKE SA a rekey replaced is lost once (RFC 7296 §2.8: "the initiator
/// deletes the old IKE SA"): the side that rekeyed retransmits it like any request, so both
/// ends retire the old SA within the retransmission schedule instead of keeping it for
/// minutes (or, on the side that did not rekey, for as long as no other rekey comes).
fn lost_delete_of_the_rekeyed_ike_sa(initiator_rekeys: bool) {
    let mut ic = initiator_config(MATRIX[0].0, "aes128gcm16");
    let mut rc = responder_config(MATRIX[0].0, "aes128gcm16");
    ic.child_lifetime = Duration::from_secs(3600);
    rc.child_lifetime = Duration::from_secs(3600);
    ic.accept_ike_rekey = true;
    if initiator_rekeys {
        ic.ike_lifetime = Some(Duration::from_secs(60));
    } else {
        rc.ike_lifetime = Some(Duration::from_secs(60));
    }
    let mut p = Pair::new(ic, rc);
    p.drive();
    assert_established(&p);
    // After the rekey timer: the rekey request (0), its answer, then the DELETE (1) goes the
    // same way as the request.
    if initiator_rekeys {
        p.lose_to_r = vec![p.to_r + 1];
    } else {
        p.lose_to_i = vec![p.to_i + 1];
    }
    let spis_r = |p: &Pair| match &p.r {
        Side::One(r) => r.spis_r(),
        Side::Many(_) => unreachable!(),
    };
    let start = p.now;
    while spis_r(&p).len() < 2 && p.i.our_spis().len() < 2 {
        assert!(p.now - start < Duration::from_secs(60), "no IKE SA rekey");
        p.advance();
    }
    let rekeyed = p.now;
    // Both ends hold the old SA: its DELETE was lost.
    assert_eq!((spis_r(&p).len(), p.i.our_spis().len()), (2, 2));
    while spis_r(&p).len() > 1 || p.i.our_spis().len() > 1 {
        p.advance();
        // The first retransmission is due 2 s after the DELETE; the next IKE SA rekey is
        // 50 s or more away.
        assert!(
            p.now - rekeyed < Duration::from_secs(10),
            "the old IKE SA was still there {:?} after the rekey",
            p.now - rekeyed
        );
    }
    assert!(p.i.is_established());
    assert!(
        p.r_events
            .iter()
            .any(|e| matches!(e, responder::Event::IkeSaRetired { .. })),
        "{:?}",
        p.r_events
    );
    assert!(
        !p.i_events.iter().any(|e| matches!(
            e,
            initiator::Event::IkeSaDeleted { .. } | initiator::Event::Failed(_)
        )),
        "{:?}",
        p.i_events
    );
}

#[test]
fn initiator_retransmits_a_lost_delete_of_the_ike_sa_its_rekey_replaced() {
    lost_delete_of_the_rekeyed_ike_sa(true);
}

#[test]
fn responder_retransmits_a_lost_delete_of_the_ike_sa_its_rekey_replaced() {
    lost_delete_of_the_rekeyed_ike_sa(false);
}

#[test]
fn initiator_rekeys_the_ike_sa_and_the_child_sa_moves_along() {
    rekeys_ike_sa(true);
}

#[test]
fn responder_rekeys_the_ike_sa_and_the_child_sa_moves_along() {
    rekeys_ike_sa(false);
}

/// Both ends rekey the same CHILD SA at once (RFC 7296 §2.8.1): both exchanges complete, the
/// SA from the exchange with the lowest nonce is deleted by the end that created it, the
/// old one goes too, and both ends are left with the same single CHILD SA, keys agreeing.
#[test]
fn simultaneous_child_sa_rekeys_leave_one_sa_by_the_nonce_rule() {
    for _ in 0..8 {
        let mut ic = initiator_config(MATRIX[0].0, "aes128gcm16");
        let mut rc = responder_config(MATRIX[0].0, "aes128gcm16");
        ic.child_lifetime = Duration::from_secs(20);
        rc.child_lifetime = Duration::from_secs(20);
        let mut p = Pair::new(ic, rc);
        p.drive();
        assert_established(&p);
        let old = (p.initiator_child().spi_in, p.initiator_child().spi_out);
        p.i_events.clear();
        p.r_events.clear();
        // Both soft lifetimes are over: each side sends its rekey before seeing the other's.
        p.now += Duration::from_secs(20);
        p.i.handle_timeout(p.now, &mut SystemEntropy);
        if let Side::One(r) = &mut p.r {
            r.handle_timeout(p.now, &mut SystemEntropy);
        }
        p.drive();
        let (i, r) = current_children(&p);
        assert_eq!(i.len(), 1, "{:?}\n{:?}", p.i_events, p.r_events);
        assert_eq!(i, r);
        assert_ne!(i[0], old);
        let installed = |spi_in: u32| {
            p.i_events
                .iter()
                .find_map(|e| match e {
                    initiator::Event::ChildSaInstalled(c) if c.spi_in == spi_in => Some(&**c),
                    _ => None,
                })
                .unwrap()
        };
        let r_installed = p
            .r_events
            .iter()
            .find_map(|e| match e {
                responder::Event::ChildSaInstalled(c) if c.spi_out == i[0].0 => Some(&**c),
                _ => None,
            })
            .unwrap();
        assert_same_child(installed(i[0].0), r_installed);
        // Every SA installed on a side and not kept was deleted there.
        let i_installed = p
            .i_events
            .iter()
            .filter(|e| matches!(e, initiator::Event::ChildSaInstalled(_)))
            .count();
        let i_deleted = p
            .i_events
            .iter()
            .filter(|e| matches!(e, initiator::Event::ChildSaDeleted { .. }))
            .count();
        assert_eq!((i_installed, i_deleted), (2, 2), "{:?}", p.i_events);
        assert!(
            !p.r_events
                .iter()
                .any(|e| matches!(e, responder::Event::RequestRefused { .. })),
            "{:?}",
            p.r_events
        );
    }
}

/// RFC 5685 §5: our responder redirects an established SA with an INFORMATIONAL N(REDIRECT);
/// the initiator answers, deletes the IKE SA, closes with [`DeleteReason::Redirected`] and
/// names the new gateway.
#[test]
fn follows_the_responders_redirect_of_an_established_sa() {
    let mut p = Pair::new(
        initiator_config(MATRIX[0].0, MATRIX[0].1),
        responder_config(MATRIX[0].0, MATRIX[0].1),
    );
    p.drive();
    assert_established(&p);
    let gw = GatewayId::Fqdn("gw2.example".into());
    let now = p.now;
    let Side::One(r) = &mut p.r else { unreachable!() };
    r.redirect(now, &gw).unwrap();
    p.drive();
    assert!(p.i.is_closed());
    assert_eq!(p.i.redirected_to(), Some(&gw));
    assert!(
        p.i_events.iter().any(|e| matches!(
            e,
            initiator::Event::IkeSaDeleted {
                reason: DeleteReason::Redirected,
                ..
            }
        )),
        "{:?}",
        p.i_events
    );
    // The initiator's DELETE ends the SA on our responder.
    assert!(
        p.r_events.iter().any(|e| matches!(
            e,
            responder::Event::IkeSaDeleted {
                reason: DeleteReason::PeerDeleted,
                ..
            }
        )),
        "{:?}",
        p.r_events
    );
}

/// RFC 5685 §6: our responder redirects in the IKE_AUTH response once the peer has
/// authenticated (AUTH and N(REDIRECT), no CHILD SA) and closes; the initiator verifies our
/// AUTH, fails with [`initiator::Error::Redirected`] and names the new gateway.
#[test]
fn follows_the_responders_redirect_in_ike_auth() {
    let mut p = Pair::new(
        initiator_config(MATRIX[0].0, MATRIX[0].1),
        responder_config(MATRIX[0].0, MATRIX[0].1),
    );
    let gw = GatewayId::Ip("192.0.2.21".parse().unwrap());
    p.auth_redirect = Some(gw.clone());
    p.drive();
    assert!(p.i.is_closed());
    assert_eq!(p.i.redirected_to(), Some(&gw));
    assert!(
        p.i_events
            .iter()
            .any(|e| matches!(e, initiator::Event::Failed(initiator::Error::Redirected))),
        "{:?}",
        p.i_events
    );
    let Side::One(r) = &p.r else { unreachable!() };
    assert!(r.is_closed());
    for e in &p.r_events {
        assert!(
            !matches!(
                e,
                responder::Event::IkeSaEstablished { .. } | responder::Event::ChildSaInstalled(_)
            ),
            "{e:?}"
        );
    }
    assert!(
        p.r_events
            .iter()
            .any(|e| matches!(e, responder::Event::Failed(responder::Error::Redirected))),
        "{:?}",
        p.r_events
    );
}

/// A redirect in IKE_AUTH is refused for a peer without redirect support, and a wrong PSK
/// still fails as AUTHENTICATION_FAILED before anything is said about another gateway.
#[test]
fn redirects_in_ike_auth_only_authenticated_peers_that_support_it() {
    let mut ic = initiator_config(MATRIX[0].0, MATRIX[0].1);
    ic.redirect_supported = false;
    let mut p = Pair::new(ic, responder_config(MATRIX[0].0, MATRIX[0].1));
    p.auth_redirect = Some(GatewayId::Ip("192.0.2.21".parse().unwrap()));
    p.drive();
    assert!(
        p.auth_redirect_refused,
        "redirect_after_auth accepted a peer without redirect support"
    );
    // Served as usual instead.
    assert_established(&p);

    let mut p = Pair::new(
        initiator_config(MATRIX[0].0, MATRIX[0].1),
        responder_config(MATRIX[0].0, MATRIX[0].1),
    );
    p.psk_r = b"not the psk".to_vec();
    p.auth_redirect = Some(GatewayId::Ip("192.0.2.21".parse().unwrap()));
    p.drive();
    assert!(p.i.is_closed());
    assert_eq!(p.i.redirected_to(), None);
}

/// RFC 5685 §3: a peer that did not announce REDIRECT_SUPPORTED is not redirected.
#[test]
fn does_not_redirect_a_peer_without_redirect_support() {
    let mut ic = initiator_config(MATRIX[0].0, MATRIX[0].1);
    ic.redirect_supported = false;
    let mut p = Pair::new(ic, responder_config(MATRIX[0].0, MATRIX[0].1));
    p.drive();
    assert_established(&p);
    let now = p.now;
    let Side::One(r) = &mut p.r else { unreachable!() };
    assert!(matches!(
        r.redirect(now, &GatewayId::Fqdn("gw2.example".into())),
        Err(responder::Error::WrongState(_))
    ));
    assert!(r.poll_transmit().is_none());
}

/// RFC 5685 §4.1: the endpoint redirects in IKE_SA_INIT (echoing Ni); the initiator fails
/// with [`initiator::Error::Redirected`] and names the new gateway.
#[test]
fn follows_the_endpoints_redirect_in_ike_sa_init() {
    let mut p = Pair::endpoint(
        initiator_config(MATRIX[0].0, MATRIX[0].1),
        responder_config(MATRIX[0].0, MATRIX[0].1),
        EndpointConfig::default(),
    );
    let gw = GatewayId::Ip("192.0.2.77".parse().unwrap());
    let Side::Many(ep) = &mut p.r else { unreachable!() };
    ep.set_redirect(Some(gw.clone()));
    p.drive();
    assert_eq!(p.initiator_failure(), initiator::Error::Redirected);
    assert_eq!(p.i.redirected_to(), Some(&gw));
}

/// Both ends rekey the IKE SA at once (RFC 7296 §2.8.2): each answers the other's request
/// with TEMPORARY_FAILURE (§2.25) while its own is in flight, both try again after a random
/// wait, and the first retry wins: both ends end up on the same new IKE SA.
#[test]
fn simultaneous_ike_sa_rekeys_settle_on_one_new_ike_sa() {
    let mut ic = initiator_config(MATRIX[0].0, MATRIX[0].1);
    let mut rc = responder_config(MATRIX[0].0, MATRIX[0].1);
    ic.ike_lifetime = Some(Duration::from_secs(20));
    ic.accept_ike_rekey = true;
    rc.ike_lifetime = Some(Duration::from_secs(20));
    let mut p = Pair::new(ic, rc);
    p.drive();
    assert_established(&p);
    let first = p.i.ike_spis().unwrap();
    p.now += Duration::from_secs(20);
    p.i.handle_timeout(p.now, &mut SystemEntropy);
    if let Side::One(r) = &mut p.r {
        r.handle_timeout(p.now, &mut SystemEntropy);
    }
    p.drive();
    let r_spis = |p: &Pair| match &p.r {
        Side::One(r) => r.ike_spis(),
        Side::Many(_) => unreachable!(),
    };
    assert_eq!(p.i.ike_spis(), Some(first), "both rekeys refused");
    assert_eq!(r_spis(&p), Some(first));
    // The retries (15 to 45 s later) do not collide: one of them rekeys.
    while p.i.ike_spis() == Some(first) {
        assert!(p.i.is_established(), "{:?}", p.i_events);
        p.advance();
    }
    assert_eq!(p.i.ike_spis(), r_spis(&p));
    assert!(p.i.is_established());
    assert!(
        p.r_events
            .iter()
            .any(|e| matches!(e, responder::Event::IkeSaRekeyed { .. }))
    );
    assert_eq!(current_children(&p).0, current_children(&p).1);
}
