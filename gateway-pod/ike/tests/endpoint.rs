//! The endpoint in front of many responders: routing of IKE_SA_INIT retransmissions and of
//! later messages by SPI, cookies under load (RFC 7296 §2.6), half-open expiry, refusals that
//! keep no state. Full IKE_AUTH exchanges are `responder_pair.rs` and the strongSwan tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointError, EndpointEvent, SaCounts};
use concentrator_ike::payload::{Identity, Notify};
use concentrator_ike::responder::{Config, IdBuf};
use concentrator_ike::{ExchangeType, Flags, Message, NotifyType, Payload};
use concentrator_test_util::{Counter, ike_sa_init_request};

/// An eroute's defaults: its proposals, CHILD SA lifetime 1h, IKE SA lifetime 4h, liveness
/// checks every 30 s.
fn config() -> Arc<Config> {
    Arc::new(Config {
        child_lifetime: Duration::from_secs(3600),
        ike_lifetime: Some(Duration::from_secs(4 * 3600)),
        dpd_interval: Some(Duration::from_secs(30)),
        ..Config::new(
            vec![concentrator_algorithms::parse_ike("ike", "aes128gcm16-prfsha256-x25519").unwrap()],
            vec![concentrator_algorithms::parse_esp("esp", "aes128gcm16").unwrap()],
            "10.2.0.0/24".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
            IdBuf::new(&Identity::Fqdn(b"gw.example")),
        )
    })
}

fn local() -> SocketAddr {
    "192.0.2.2:500".parse().unwrap()
}

fn site(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 500))
}

fn drain(ep: &mut Endpoint) -> (Vec<Message<'static>>, Vec<EndpointEvent>) {
    let mut msgs = Vec::new();
    while let Some(t) = ep.poll_transmit() {
        let bytes: &'static [u8] = Box::leak(t.payload.into_boxed_slice());
        msgs.push(Message::decode(bytes).unwrap());
    }
    (msgs, std::iter::from_fn(|| ep.poll_event()).collect())
}

#[test]
fn routes_a_retransmitted_ike_sa_init_to_the_same_sa() {
    let mut ep = Endpoint::new(EndpointConfig::default(), config());
    let mut entropy = Counter::non_zero(0);
    let now = Instant::now();
    let req = ike_sa_init_request(7, &[1; 32], None);
    ep.handle_datagram(now, local(), site(1), &req, &mut entropy)
        .unwrap();
    let (first, _) = drain(&mut ep);
    ep.handle_datagram(now, local(), site(1), &req, &mut entropy)
        .unwrap();
    let (second, _) = drain(&mut ep);
    assert_eq!(first.len(), 1);
    assert_eq!(second.len(), 1);
    assert_eq!(first[0].header.spi_r, second[0].header.spi_r);
    assert_ne!(first[0].header.spi_r, 0);
    assert_eq!(
        ep.counts(),
        SaCounts {
            half_open: 1,
            ..SaCounts::default()
        }
    );
    // The same SPIi from another address is another initiator: a second SA.
    ep.handle_datagram(now, local(), site(2), &req, &mut entropy)
        .unwrap();
    assert_eq!(ep.counts().half_open, 2);
}

#[test]
fn a_request_for_an_unknown_spi_is_dropped() {
    let mut ep = Endpoint::new(EndpointConfig::default(), config());
    let mut req = ike_sa_init_request(7, &[1; 32], None);
    req[8..16].copy_from_slice(&99u64.to_be_bytes());
    req[18] = ExchangeType::IKE_AUTH.0;
    req[19] = Flags::INITIATOR.bits();
    req[20..24].copy_from_slice(&1u32.to_be_bytes());
    assert_eq!(
        ep.handle_datagram(Instant::now(), local(), site(1), &req, &mut Counter::non_zero(0)),
        Err(EndpointError::UnknownSpi(99))
    );
    assert_eq!(
        ep.handle_datagram(
            Instant::now(),
            local(),
            site(1),
            &[0; 10],
            &mut Counter::non_zero(0)
        ),
        Err(EndpointError::NotIke)
    );
    assert!(ep.poll_transmit().is_none());
    assert_eq!(ep.counts(), SaCounts::default());
}

#[test]
fn under_load_ike_sa_init_must_return_a_cookie_and_then_succeeds() {
    let cfg = EndpointConfig {
        cookie_threshold: 2,
        ..EndpointConfig::default()
    };
    let mut ep = Endpoint::new(cfg, config());
    let mut entropy = Counter::non_zero(0);
    let now = Instant::now();
    for n in 1..=2u8 {
        ep.handle_datagram(
            now,
            local(),
            site(n),
            &ike_sa_init_request(u64::from(n), &[n; 32], None),
            &mut entropy,
        )
        .unwrap();
    }
    drain(&mut ep);
    // The third initiator gets a cookie and no state.
    let nonce = [3u8; 32];
    assert_eq!(
        ep.handle_datagram(
            now,
            local(),
            site(3),
            &ike_sa_init_request(3, &nonce, None),
            &mut entropy
        ),
        Err(EndpointError::CookieRequired)
    );
    let (msgs, _) = drain(&mut ep);
    assert_eq!(ep.counts().half_open, 2);
    let [msg] = msgs.as_slice() else {
        panic!("one response expected, got {}", msgs.len())
    };
    assert_eq!(msg.header.spi_r, 0);
    let Some(Payload::Notify(n)) = msg.payloads.first() else {
        panic!("no notify")
    };
    assert_eq!(n.notify_type, NotifyType::COOKIE);
    let cookie = n.data.to_vec();
    // A forged or replayed-elsewhere cookie is refused again.
    let mut forged = cookie.clone();
    forged[5] ^= 1;
    assert_eq!(
        ep.handle_datagram(
            now,
            local(),
            site(3),
            &ike_sa_init_request(3, &nonce, Some(&forged)),
            &mut entropy
        ),
        Err(EndpointError::CookieRequired)
    );
    assert_eq!(
        ep.handle_datagram(
            now,
            local(),
            site(4),
            &ike_sa_init_request(3, &nonce, Some(&cookie)),
            &mut entropy
        ),
        Err(EndpointError::CookieRequired)
    );
    drain(&mut ep);
    // Echoed from the right address, it opens the SA.
    ep.handle_datagram(
        now + Duration::from_secs(1),
        local(),
        site(3),
        &ike_sa_init_request(3, &nonce, Some(&cookie)),
        &mut entropy,
    )
    .unwrap();
    let (msgs, _) = drain(&mut ep);
    assert_ne!(msgs[0].header.spi_r, 0);
    assert_eq!(ep.counts().half_open, 3);
}

#[test]
fn half_open_sas_expire_and_are_reported_removed() {
    let cfg = EndpointConfig {
        half_open_timeout: Duration::from_secs(5),
        ..EndpointConfig::default()
    };
    let mut ep = Endpoint::new(cfg, config());
    let now = Instant::now();
    ep.handle_datagram(
        now,
        local(),
        site(1),
        &ike_sa_init_request(1, &[1; 32], None),
        &mut Counter::non_zero(0),
    )
    .unwrap();
    let (msgs, _) = drain(&mut ep);
    let spi_r = msgs[0].header.spi_r;
    assert_eq!(ep.poll_timeout(), Some(now + Duration::from_secs(5)));
    ep.handle_timeout(now + Duration::from_secs(4), &mut Counter::non_zero(0));
    assert_eq!(ep.counts().half_open, 1);
    ep.handle_timeout(now + Duration::from_secs(5), &mut Counter::non_zero(0));
    assert_eq!(ep.counts(), SaCounts::default());
    let (_, events) = drain(&mut ep);
    assert!(matches!(
        events.as_slice(),
        [EndpointEvent::Removed { id, established: false }] if *id == spi_r
    ));
    assert_eq!(ep.poll_timeout(), None);
}

#[test]
fn a_refused_ike_sa_init_keeps_no_state() {
    let mut ep = Endpoint::new(EndpointConfig::default(), config());
    // Offer only a group the eroute does not accept.
    let mut req = ike_sa_init_request(1, &[1; 32], None);
    let msg = Message::decode(&req).unwrap();
    let Some(Payload::Sa(_)) = msg.payloads.first() else {
        panic!("SA first")
    };
    // DH transform id 31 -> 1 (modp768, never accepted): find it after the SA header.
    let pos = req
        .windows(8)
        .position(|w| w == [0, 0, 0, 8, 4, 0, 0, 31])
        .expect("DH transform");
    req[pos + 7] = 1;
    let r = ep.handle_datagram(Instant::now(), local(), site(1), &req, &mut Counter::non_zero(0));
    assert!(r.is_err(), "{r:?}");
    let (msgs, events) = drain(&mut ep);
    assert_eq!(msgs.len(), 1, "an error response is sent");
    assert!(matches!(events.as_slice(), [EndpointEvent::Sa { id: 0, .. }]));
    assert_eq!(ep.counts(), SaCounts::default());
}

#[test]
fn redirects_initiators_that_support_it_and_serves_the_others() {
    use concentrator_ike::redirect::{GatewayId, decode_redirect};
    let mut ep = Endpoint::new(EndpointConfig::default(), config());
    let mut entropy = Counter::non_zero(0);
    let gw = GatewayId::Ip("192.0.2.99".parse().unwrap());
    ep.set_redirect(Some(gw.clone()));
    let nonce = [5u8; 32];
    // With N(REDIRECT_SUPPORTED): sent on, nonce echoed, no state.
    let mut req = ike_sa_init_request(1, &nonce, None);
    let supported = Message {
        payloads: {
            let mut p = Message::decode(&req).unwrap().payloads;
            p.push(Payload::Notify(Notify::new(NotifyType::REDIRECT_SUPPORTED, &[])));
            p
        },
        ..Message::decode(&req).unwrap()
    }
    .to_vec();
    assert_eq!(
        ep.handle_datagram(Instant::now(), local(), site(1), &supported, &mut entropy),
        Err(EndpointError::Redirected(gw.clone()))
    );
    let (msgs, _) = drain(&mut ep);
    let [msg] = msgs.as_slice() else {
        panic!("one response expected")
    };
    let Some(Payload::Notify(n)) = msg.payloads.first() else {
        panic!("no notify")
    };
    assert_eq!(n.notify_type, NotifyType::REDIRECT);
    assert_eq!(decode_redirect(n.data).unwrap(), (gw, &nonce[..]));
    assert_eq!(ep.counts(), SaCounts::default());
    // Without it: served here.
    req = ike_sa_init_request(2, &nonce, None);
    ep.handle_datagram(Instant::now(), local(), site(2), &req, &mut entropy)
        .unwrap();
    assert_eq!(ep.counts().half_open, 1);
    // Redirects off again: everyone is served.
    ep.set_redirect(None);
    ep.handle_datagram(Instant::now(), local(), site(1), &supported, &mut entropy)
        .unwrap();
    assert_eq!(ep.counts().half_open, 2);
}
