//! The responder against a minimal deterministic initiator written with the codec and
//! `concentrator-crypto` (fixed keys, nonces and SPIs, no network): the paths strongSwan does
//! not take on its own (retransmissions, tampering, unknown peer, traffic selectors outside
//! the eroute, a wrong KE guess). Interoperability itself is the gateway crate's
//! `tests/responder_strongswan.rs`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_algorithms::{DhGroup, Encryption, parse_esp, parse_ike};
use concentrator_crypto::{ChildSaKeys, IkeSaKeys, KeyExchange, Prf, PrfAlg, SkCipher};
use concentrator_ike::auth::{psk_auth, signed_octets, verify_psk_auth};
use concentrator_ike::nat::nat_detection_hash;
use concentrator_ike::negotiate::NegotiationError;
use concentrator_ike::payload::{
    self, Auth, Identity, Ke, Nonce, Notify, Proposal, Sa, Sk, TrafficSelector, Transform, Ts, TsRange,
};
use concentrator_ike::responder::{Config, Error, IdBuf, Retransmit};
use concentrator_ike::{
    AuthMethod, DhGroup as WireGroup, Event, ExchangeType, Flags, Header, Message, NotifyType, Payload,
    PayloadType, ProtocolId, Responder, TransformId, TransformType,
};
use concentrator_test_util::Counter;

const SPI_I: u64 = 0x0102_0304_0506_0708;
const NI: [u8; 32] = [0x11; 32];
const PSK: &[u8] = b"site-a secret";
const ESP_SPI_I: [u8; 4] = [0xc0, 0, 0, 1];

fn addrs() -> (SocketAddr, SocketAddr) {
    ("192.0.2.2:500".parse().unwrap(), "192.0.2.1:500".parse().unwrap())
}

fn config() -> Arc<Config> {
    Arc::new(Config {
        child_lifetime: Duration::from_secs(3600),
        ike_lifetime: None,
        dpd_interval: None,
        half_open_timeout: Config::DEFAULT_HALF_OPEN_TIMEOUT,
        retransmit: Retransmit::default(),
        force_udp_encap: false,
        message_id_sync: true,
        sync_after_restore: false,
        ..Config::new(
            vec![parse_ike("ike", "aes128gcm16-prfsha256-x25519").unwrap()],
            vec![parse_esp("esp", "aes128gcm16").unwrap()],
            "10.2.0.0/24".parse().unwrap(),
            "10.1.0.0/24".parse().unwrap(),
            IdBuf::new(&Identity::Fqdn(b"gw.example")),
        )
    })
}

fn v4(a: [u8; 4], b: [u8; 4]) -> TrafficSelector<'static> {
    TrafficSelector::V4(TsRange {
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: Ipv4Addr::from(a),
        end: Ipv4Addr::from(b),
    })
}

fn header(exchange: ExchangeType, spi_r: u64, message_id: u32) -> Header {
    Header::new(SPI_I, spi_r, exchange, Flags::INITIATOR, message_id)
}

/// The initiator's view after IKE_SA_INIT.
struct Initiator {
    spi_r: u64,
    request: Vec<u8>,
    response: Vec<u8>,
    nr: Vec<u8>,
    keys: IkeSaKeys,
}

impl Initiator {
    fn prf() -> Prf {
        Prf::new(PrfAlg::HmacSha256)
    }

    fn ike_sa_init_request(dh: &[u16], ke_group: DhGroup, kex: &KeyExchange) -> Vec<u8> {
        let mut transforms = vec![
            Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
            Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
        ];
        transforms.extend(
            dh.iter()
                .map(|g| Transform::new(TransformType::DH, TransformId(*g))),
        );
        let public = kex.public_value().unwrap();
        let (local, remote) = addrs();
        let src = nat_detection_hash(SPI_I, 0, remote);
        let dst = nat_detection_hash(SPI_I, 0, local);
        Message {
            header: header(ExchangeType::IKE_SA_INIT, 0, 0),
            payloads: vec![
                Payload::Sa(Sa {
                    proposals: vec![Proposal {
                        number: 1,
                        protocol: ProtocolId::IKE,
                        spi: &[],
                        transforms,
                    }],
                }),
                Payload::Ke(Ke {
                    group: WireGroup(ke_group.number()),
                    data: &public,
                }),
                Payload::Nonce(Nonce { data: &NI }),
                Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_SOURCE_IP, &src)),
                Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_DESTINATION_IP, &dst)),
            ],
        }
        .to_vec()
    }

    /// Runs IKE_SA_INIT against `r`.
    fn start(r: &mut Responder) -> Self {
        let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x33; 32]).unwrap();
        let request = Self::ike_sa_init_request(&[31], DhGroup::Curve25519, &kex);
        let (local, remote) = addrs();
        r.handle_datagram(Instant::now(), local, remote, &request, &mut Counter::new(0))
            .unwrap();
        let response = r.poll_transmit().expect("IKE_SA_INIT response").payload;
        let msg = Message::decode(&response).unwrap();
        assert_eq!(msg.header.flags, Flags::RESPONSE);
        let (mut ke, mut nr) = (None, None);
        for p in &msg.payloads {
            match p {
                Payload::Ke(k) => ke = Some(k.data.to_vec()),
                Payload::Nonce(n) => nr = Some(n.data.to_vec()),
                _ => {}
            }
        }
        let (ke, nr) = (ke.unwrap(), nr.unwrap());
        let g_ir = kex.compute_shared(&ke).unwrap();
        let spi_r = msg.header.spi_r;
        let keys = IkeSaKeys::from_ike_sa_init(
            Self::prf(),
            &NI,
            &nr,
            g_ir.expose(),
            &SPI_I.to_be_bytes(),
            &spi_r.to_be_bytes(),
            Encryption::AesGcm16 { key_bits: 128 },
            None,
        )
        .unwrap();
        Self {
            spi_r,
            request,
            response,
            nr,
            keys,
        }
    }

    /// An IKE_AUTH request authenticated with `psk`, offering `ts_i`/`ts_r`.
    fn ike_auth_request(&self, psk: &[u8], ts_i: TrafficSelector<'_>, ts_r: TrafficSelector<'_>) -> Vec<u8> {
        let id = IdBuf::new(&Identity::Fqdn(b"site-a.example"));
        let octets = signed_octets(
            Self::prf(),
            &self.request,
            &self.nr,
            self.keys.sk_pi.expose(),
            id.body(),
        );
        let auth = psk_auth(Self::prf(), psk, &octets);
        let inner = [
            Payload::IdI(id.identity()),
            Payload::Auth(Auth {
                method: AuthMethod::PSK,
                data: auth.expose(),
            }),
            Payload::Sa(Sa {
                proposals: vec![Proposal {
                    number: 1,
                    protocol: ProtocolId::ESP,
                    spi: &ESP_SPI_I,
                    transforms: vec![
                        Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                        Transform::new(TransformType::ESN, TransformId::ESN_NO),
                    ],
                }],
            }),
            Payload::TsI(Ts {
                selectors: vec![ts_i],
            }),
            Payload::TsR(Ts {
                selectors: vec![ts_r],
            }),
        ];
        let mut tx = SkCipher::new(
            Encryption::AesGcm16 { key_bits: 128 },
            None,
            self.keys.sk_ei.expose(),
            &[],
        )
        .unwrap();
        let mut plain = Vec::new();
        payload::encode_chain(&inner, &mut plain);
        let body_len = tx.body_len(plain.len());
        let room = vec![0; body_len];
        let mut out = Message {
            header: header(ExchangeType::IKE_AUTH, self.spi_r, 1),
            payloads: vec![Payload::Sk(Sk {
                first_inner: PayloadType::IDI,
                body: &room,
            })],
        }
        .to_vec();
        let body_start = out.len() - body_len;
        let range = tx.plaintext_range(body_start, plain.len());
        out[range].copy_from_slice(&plain);
        tx.seal(&mut out, body_start, plain.len()).unwrap();
        out
    }

    fn good_auth_request(&self, psk: &[u8]) -> Vec<u8> {
        self.ike_auth_request(
            psk,
            v4([10, 1, 0, 0], [10, 1, 0, 255]),
            v4([10, 2, 0, 0], [10, 2, 0, 255]),
        )
    }

    /// Decrypts a response of the responder and returns its inner payload bytes.
    fn open(&self, response: &[u8]) -> (PayloadType, Vec<u8>) {
        let msg = Message::decode(response).unwrap();
        assert_eq!(msg.header.flags, Flags::RESPONSE);
        let Some(Payload::Sk(sk)) = msg.payloads.last() else {
            panic!("no SK payload in the response");
        };
        let rx = SkCipher::new(
            Encryption::AesGcm16 { key_bits: 128 },
            None,
            self.keys.sk_er.expose(),
            &[],
        )
        .unwrap();
        let body_start = response.len() - sk.body.len();
        let mut buf = response.to_vec();
        let range = rx.open(&mut buf, body_start).unwrap();
        (sk.first_inner, buf[range].to_vec())
    }
}

fn notifies(inner: &[Payload<'_>]) -> Vec<NotifyType> {
    inner
        .iter()
        .filter_map(|p| match p {
            Payload::Notify(n) => Some(n.notify_type),
            _ => None,
        })
        .collect()
}

fn events(r: &mut Responder) -> Vec<Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

#[test]
fn establishes_and_answers_retransmissions_from_the_cache() {
    let mut r = Responder::new(config());
    let i = Initiator::start(&mut r);
    let (local, remote) = addrs();
    let now = Instant::now();
    // A retransmitted IKE_SA_INIT request: the same response again.
    r.handle_datagram(now, local, remote, &i.request, &mut Counter::new(0))
        .unwrap();
    assert_eq!(r.poll_transmit().unwrap().payload, i.response);

    let auth = i.good_auth_request(PSK);
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    assert!(r.poll_transmit().is_none(), "no answer before the PSK is known");
    let ev = events(&mut r);
    let [Event::PeerIdentified { id }] = &ev[..] else {
        panic!("{ev:?}");
    };
    assert_eq!(id.to_string(), "site-a.example");
    // Retransmitted while the lookup runs: nothing is sent.
    assert!(
        r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
            .is_err()
    );
    assert!(r.poll_transmit().is_none());

    r.provide_psk(now, Some(PSK), &mut Counter::new(100)).unwrap();
    let response = r.poll_transmit().unwrap().payload;
    assert!(r.is_established());
    let (first, plain) = i.open(&response);
    let inner = payload::decode_inner_chain(first, &plain).unwrap();
    let types: Vec<_> = inner.iter().map(Payload::payload_type).collect();
    assert_eq!(
        types,
        [
            PayloadType::IDR,
            PayloadType::AUTH,
            PayloadType::SA,
            PayloadType::TSI,
            PayloadType::TSR
        ]
    );
    // The responder's AUTH verifies on the initiator's side.
    let Payload::Auth(auth_r) = &inner[1] else {
        panic!()
    };
    let Payload::IdR(id_r) = &inner[0] else { panic!() };
    let octets = signed_octets(
        Initiator::prf(),
        &i.response,
        &NI,
        i.keys.sk_pr.expose(),
        IdBuf::new(id_r).body(),
    );
    assert!(verify_psk_auth(Initiator::prf(), PSK, &octets, auth_r.data));
    let Payload::Sa(sa_r) = &inner[2] else { panic!() };
    let spi_r_esp = u32::from_be_bytes(sa_r.proposals[0].spi.try_into().unwrap());

    let ev = events(&mut r);
    let [
        Event::IkeSaEstablished { spi_i, spi_r, .. },
        Event::ChildSaInstalled(child),
    ] = &ev[..]
    else {
        panic!("{ev:?}");
    };
    assert_eq!((*spi_i, *spi_r), (SPI_I, i.spi_r));
    assert_eq!(child.spi_in, spi_r_esp);
    assert_eq!(child.spi_out, u32::from_be_bytes(ESP_SPI_I));
    assert!(child.spi_in >= 256);
    // KEYMAT from the initiator's side: its outbound keys are our inbound ones.
    let keys = ChildSaKeys::derive(
        Initiator::prf(),
        i.keys.sk_d.expose(),
        None,
        &NI,
        &i.nr,
        Encryption::AesGcm16 { key_bits: 128 },
        None,
    )
    .unwrap();
    assert_eq!(child.inbound.encr.expose(), keys.initiator.encr.expose());
    assert_eq!(child.inbound.salt.expose(), keys.initiator.salt.expose());
    assert_eq!(child.outbound.encr.expose(), keys.responder.encr.expose());
    assert_eq!(child.ts_remote, [v4([10, 1, 0, 0], [10, 1, 0, 255])]);
    assert_eq!(child.ts_local, [v4([10, 2, 0, 0], [10, 2, 0, 255])]);

    // A retransmitted IKE_AUTH request gets the cached response, byte for byte.
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    assert_eq!(r.poll_transmit().unwrap().payload, response);
    assert!(events(&mut r).is_empty());
}

fn assert_auth_failed(psk: Option<&[u8]>) {
    let mut r = Responder::new(config());
    let i = Initiator::start(&mut r);
    let (local, remote) = addrs();
    let now = Instant::now();
    let auth = i.good_auth_request(PSK);
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    let _ = events(&mut r);
    assert!(matches!(
        r.provide_psk(now, psk, &mut Counter::new(0)),
        Err(Error::AuthenticationFailed(_))
    ));
    let response = r.poll_transmit().unwrap().payload;
    let (first, plain) = i.open(&response);
    let inner = payload::decode_inner_chain(first, &plain).unwrap();
    assert_eq!(inner.len(), 1);
    assert_eq!(notifies(&inner), [NotifyType::AUTHENTICATION_FAILED]);
    let ev = events(&mut r);
    assert!(
        matches!(&ev[..], [Event::Failed(Error::AuthenticationFailed(_))]),
        "{ev:?}"
    );
    assert!(r.is_closed());
    // The retransmitted request gets the same error again; nothing else happens.
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    assert_eq!(r.poll_transmit().unwrap().payload, response);
    assert!(events(&mut r).is_empty());
}

#[test]
fn rejects_wrong_psk_with_encrypted_authentication_failed() {
    assert_auth_failed(Some(b"not the secret"));
}

#[test]
fn rejects_unknown_peer_with_authentication_failed() {
    assert_auth_failed(None);
}

#[test]
fn drops_tampered_ike_auth_and_accepts_the_genuine_one() {
    let mut r = Responder::new(config());
    let i = Initiator::start(&mut r);
    let (local, remote) = addrs();
    let now = Instant::now();
    let auth = i.good_auth_request(PSK);
    let mut bad = auth.clone();
    let n = bad.len();
    bad[n - 20] ^= 1;
    assert!(
        r.handle_datagram(now, local, remote, &bad, &mut Counter::new(0))
            .is_err()
    );
    assert!(r.poll_transmit().is_none());
    assert!(events(&mut r).is_empty());
    // An unprotected IKE_AUTH with the right SPIs cannot end the negotiation either.
    let plain = Message {
        header: header(ExchangeType::IKE_AUTH, i.spi_r, 1),
        payloads: vec![Payload::Notify(Notify::new(
            NotifyType::AUTHENTICATION_FAILED,
            &[],
        ))],
    }
    .to_vec();
    assert!(matches!(
        r.handle_datagram(now, local, remote, &plain, &mut Counter::new(0)),
        Err(Error::Unexpected(_))
    ));
    assert!(r.poll_transmit().is_none());
    assert!(!r.is_closed());
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    assert!(matches!(&events(&mut r)[..], [Event::PeerIdentified { .. }]));
}

#[test]
fn establishes_ike_sa_without_child_when_ts_are_outside_the_eroute() {
    let mut r = Responder::new(config());
    let i = Initiator::start(&mut r);
    let (local, remote) = addrs();
    let now = Instant::now();
    let auth = i.ike_auth_request(
        PSK,
        v4([10, 9, 0, 0], [10, 9, 0, 255]),
        v4([10, 2, 0, 0], [10, 2, 0, 255]),
    );
    r.handle_datagram(now, local, remote, &auth, &mut Counter::new(0))
        .unwrap();
    let _ = events(&mut r);
    r.provide_psk(now, Some(PSK), &mut Counter::new(0)).unwrap();
    let (first, plain) = i.open(&r.poll_transmit().unwrap().payload);
    let inner = payload::decode_inner_chain(first, &plain).unwrap();
    assert_eq!(notifies(&inner), [NotifyType::TS_UNACCEPTABLE]);
    assert!(inner.iter().all(|p| !matches!(p, Payload::Sa(_))));
    let ev = events(&mut r);
    assert!(matches!(&ev[..], [Event::IkeSaEstablished { .. }]), "{ev:?}");
    assert_eq!(
        Error::Negotiation(NegotiationError::TsUnacceptable).notify(),
        Some(NotifyType::TS_UNACCEPTABLE)
    );
}

#[test]
fn drops_ike_sa_init_without_nonce_silently() {
    let mut r = Responder::new(config());
    let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x33; 32]).unwrap();
    let request = Initiator::ike_sa_init_request(&[31], DhGroup::Curve25519, &kex);
    let mut msg = Message::decode(&request).unwrap();
    msg.payloads.retain(|p| !matches!(p, Payload::Nonce(_)));
    let (local, remote) = addrs();
    assert_eq!(
        r.handle_datagram(Instant::now(), local, remote, &msg.to_vec(), &mut Counter::new(0)),
        Err(Error::MissingPayload("Ni"))
    );
    assert!(r.poll_transmit().is_none());
}

#[test]
fn answers_a_wrong_ke_guess_with_invalid_ke_payload() {
    let mut r = Responder::new(config());
    let kex = KeyExchange::from_private_key(DhGroup::Ecp256, &[0x33; 32]).unwrap();
    let request = Initiator::ike_sa_init_request(&[19, 31], DhGroup::Ecp256, &kex);
    let (local, remote) = addrs();
    assert_eq!(
        r.handle_datagram(Instant::now(), local, remote, &request, &mut Counter::new(0)),
        Err(Error::InvalidKe {
            got: 19,
            selected: 31
        })
    );
    let response = r.poll_transmit().unwrap().payload;
    let msg = Message::decode(&response).unwrap();
    assert_eq!(msg.header.spi_r, 0);
    assert_eq!(
        msg.payloads,
        [Payload::Notify(Notify::new(
            NotifyType::INVALID_KE_PAYLOAD,
            &[0, 31]
        ))]
    );
}
