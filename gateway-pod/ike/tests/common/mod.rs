//! A minimal deterministic IKEv2 initiator built from the codec and `concentrator-crypto`
//! (fixed keys, nonces and SPIs, no network), driving a [`Responder`] in process: it
//! establishes an IKE SA with a PSK, then seals requests, opens responses, answers the
//! responder's own requests and follows an IKE SA rekey.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use concentrator_algorithms::{DhGroup, Encryption, parse_esp, parse_ike};
use concentrator_crypto::keymat::rekey_skeyseed;
use concentrator_crypto::{IkeSaKeys, KeyExchange, Prf, PrfAlg, SkCipher};
use concentrator_ike::auth::{psk_auth, signed_octets};
use concentrator_ike::nat::nat_detection_hash;
use concentrator_ike::payload::{self, Auth, Identity, Ke, Nonce, Notify, Sk, TrafficSelector, Ts, TsRange};
use concentrator_ike::responder::{Config, IdBuf};
use concentrator_ike::{
    AuthMethod, DhGroup as WireGroup, Event, ExchangeType, Flags, Header, Message, NotifyType, Payload,
    PayloadType, ProtocolId, Responder,
};
pub(crate) use concentrator_test_util::{Counter, esp_sa, ike_sa};

pub(crate) const SPI_I: u64 = 0x0102_0304_0506_0708;
pub(crate) const NI: [u8; 32] = [0x11; 32];
pub(crate) const PSK: &[u8] = b"site-a secret";
/// The initiator's inbound SPI of the first CHILD SA (the responder's `spi_out`).
pub(crate) const ESP_SPI_I: u32 = 0xc000_0001;

pub(crate) fn addrs() -> (SocketAddr, SocketAddr) {
    ("192.0.2.2:500".parse().unwrap(), "192.0.2.1:500".parse().unwrap())
}

/// The responder configuration of these tests, ESP proposal `esp`.
pub(crate) fn config_with(esp: &str) -> Config {
    Config::new(
        vec![parse_ike("ike", "aes128gcm16-prfsha256-x25519").unwrap()],
        vec![parse_esp("esp", esp).unwrap()],
        "10.2.0.0/24".parse().unwrap(),
        "10.1.0.0/24".parse().unwrap(),
        IdBuf::new(&Identity::Fqdn(b"gw.example")),
    )
}

pub(crate) fn config() -> Arc<Config> {
    Arc::new(config_with("aes128gcm16"))
}

pub(crate) fn v4(a: [u8; 4], b: [u8; 4]) -> TrafficSelector<'static> {
    TrafficSelector::V4(TsRange {
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: Ipv4Addr::from(a),
        end: Ipv4Addr::from(b),
    })
}

/// The site's subnet and the gateway's, as offered.
pub(crate) fn ts_pair() -> (TrafficSelector<'static>, TrafficSelector<'static>) {
    (
        v4([10, 1, 0, 0], [10, 1, 0, 255]),
        v4([10, 2, 0, 0], [10, 2, 0, 255]),
    )
}

pub(crate) fn events(r: &mut Responder) -> Vec<Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

pub(crate) fn prf() -> Prf {
    Prf::new(PrfAlg::HmacSha256)
}

const ENCR: Encryption = Encryption::AesGcm16 { key_bits: 128 };

/// A decrypted message: its header and inner payload bytes.
pub(crate) struct Plain {
    pub(crate) header: Header,
    pub(crate) first: PayloadType,
    pub(crate) bytes: Vec<u8>,
}

impl Plain {
    pub(crate) fn payloads(&self) -> Vec<Payload<'_>> {
        payload::decode_inner_chain(self.first, &self.bytes).unwrap()
    }

    pub(crate) fn notifies(&self) -> Vec<NotifyType> {
        self.payloads()
            .iter()
            .filter_map(|p| match p {
                Payload::Notify(n) => Some(n.notify_type),
                _ => None,
            })
            .collect()
    }
}

/// The keys and counters of one IKE SA, seen from the initiator.
pub(crate) struct IkeSide {
    pub(crate) spi_i: u64,
    pub(crate) spi_r: u64,
    pub(crate) keys: IkeSaKeys,
    /// Message ID of our next request.
    pub(crate) next_id: u32,
}

impl IkeSide {
    fn cipher(key: &[u8]) -> SkCipher {
        SkCipher::new(ENCR, None, key, &[]).unwrap()
    }

    /// A message of this SA with `flags`, holding raw inner payload bytes.
    pub(crate) fn seal_raw(
        &self,
        exchange: ExchangeType,
        message_id: u32,
        flags: Flags,
        first: PayloadType,
        plain: &[u8],
    ) -> Vec<u8> {
        let mut tx = Self::cipher(self.keys.sk_ei.expose());
        let body_len = tx.body_len(plain.len());
        let room = vec![0; body_len];
        let mut out = Message {
            header: Header::new(self.spi_i, self.spi_r, exchange, flags, message_id),
            payloads: vec![Payload::Sk(Sk {
                first_inner: first,
                body: &room,
            })],
        }
        .to_vec();
        let body_start = out.len() - body_len;
        let range = tx.plaintext_range(body_start, plain.len());
        out[range].copy_from_slice(plain);
        tx.seal(&mut out, body_start, plain.len()).unwrap();
        out
    }

    pub(crate) fn seal(
        &self,
        exchange: ExchangeType,
        message_id: u32,
        flags: Flags,
        inner: &[Payload<'_>],
    ) -> Vec<u8> {
        let mut plain = Vec::new();
        payload::encode_chain(inner, &mut plain);
        let first = inner.first().map_or(PayloadType::NONE, Payload::payload_type);
        self.seal_raw(exchange, message_id, flags, first, &plain)
    }

    /// Opens a message of the responder (sealed with SK_er).
    pub(crate) fn open(&self, msg: &[u8]) -> Plain {
        let m = Message::decode(msg).unwrap();
        assert_eq!((m.header.spi_i, m.header.spi_r), (self.spi_i, self.spi_r));
        let Some(Payload::Sk(sk)) = m.payloads.last() else {
            panic!("no SK payload");
        };
        let body_start = msg.len() - sk.body.len();
        let mut buf = msg.to_vec();
        let range = Self::cipher(self.keys.sk_er.expose())
            .open(&mut buf, body_start)
            .unwrap();
        Plain {
            header: m.header,
            first: sk.first_inner,
            bytes: buf[range].to_vec(),
        }
    }
}

/// The initiator after IKE_AUTH.
pub(crate) struct Peer {
    /// The IKE SA in use.
    pub(crate) ike: IkeSide,
    /// The first CHILD SA's responder SPI.
    pub(crate) child_spi_r: u32,
    pub(crate) init_request: Vec<u8>,
    pub(crate) init_response: Vec<u8>,
    pub(crate) auth_request: Vec<u8>,
    pub(crate) auth_response: Vec<u8>,
}

impl Peer {
    /// IKE_SA_INIT + IKE_AUTH against `r` at `now`; drains the events.
    pub(crate) fn establish(r: &mut Responder, now: Instant) -> Self {
        let mut peer = Self::until_psk(r, now);
        r.provide_psk(now, Some(PSK), &mut Counter::new(100)).unwrap();
        peer.auth_response = r.poll_transmit().expect("IKE_AUTH response").payload;
        let ev = events(r);
        let [Event::IkeSaEstablished { .. }, Event::ChildSaInstalled(child)] = &ev[..] else {
            panic!("{ev:?}");
        };
        assert!(r.is_established());
        peer.child_spi_r = child.spi_in;
        peer
    }

    /// IKE_SA_INIT and the IKE_AUTH request: `r` waits for the PSK.
    pub(crate) fn until_psk(r: &mut Responder, now: Instant) -> Self {
        let (local, remote) = addrs();
        let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x33; 32]).unwrap();
        let public = kex.public_value().unwrap();
        let header =
            |exchange, spi_r, message_id| Header::new(SPI_I, spi_r, exchange, Flags::INITIATOR, message_id);
        let src = nat_detection_hash(SPI_I, 0, remote);
        let dst = nat_detection_hash(SPI_I, 0, local);
        let init_request = Message {
            header: header(ExchangeType::IKE_SA_INIT, 0, 0),
            payloads: vec![
                Payload::Sa(ike_sa(&[])),
                Payload::Ke(Ke {
                    group: WireGroup(31),
                    data: &public,
                }),
                Payload::Nonce(Nonce { data: &NI }),
                Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_SOURCE_IP, &src)),
                Payload::Notify(Notify::new(NotifyType::NAT_DETECTION_DESTINATION_IP, &dst)),
            ],
        }
        .to_vec();
        r.handle_datagram(now, local, remote, &init_request, &mut Counter::new(0))
            .unwrap();
        let init_response = r.poll_transmit().expect("IKE_SA_INIT response").payload;
        let msg = Message::decode(&init_response).unwrap();
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
            prf(),
            &NI,
            &nr,
            g_ir.expose(),
            &SPI_I.to_be_bytes(),
            &spi_r.to_be_bytes(),
            ENCR,
            None,
        )
        .unwrap();
        let ike = IkeSide {
            spi_i: SPI_I,
            spi_r,
            keys,
            next_id: 2,
        };

        let id = IdBuf::new(&Identity::Fqdn(b"site-a.example"));
        let octets = signed_octets(prf(), &init_request, &nr, ike.keys.sk_pi.expose(), id.body());
        let auth = psk_auth(prf(), PSK, &octets);
        let (ts_i, ts_r) = ts_pair();
        let esp_spi = ESP_SPI_I.to_be_bytes();
        let auth_request = ike.seal(
            ExchangeType::IKE_AUTH,
            1,
            Flags::INITIATOR,
            &[
                Payload::IdI(id.identity()),
                Payload::Auth(Auth {
                    method: AuthMethod::PSK,
                    data: auth.expose(),
                }),
                Payload::Sa(esp_sa(&esp_spi, &[])),
                Payload::TsI(Ts {
                    selectors: vec![ts_i],
                }),
                Payload::TsR(Ts {
                    selectors: vec![ts_r],
                }),
            ],
        );
        r.handle_datagram(now, local, remote, &auth_request, &mut Counter::new(0))
            .unwrap();
        assert!(matches!(&events(r)[..], [Event::PeerIdentified { .. }]));
        Self {
            child_spi_r: 0,
            ike,
            init_request,
            init_response,
            auth_request,
            auth_response: Vec::new(),
        }
    }

    /// Our next request on the current IKE SA (its Message ID is used up).
    pub(crate) fn request(&mut self, exchange: ExchangeType, inner: &[Payload<'_>]) -> Vec<u8> {
        let id = self.ike.next_id;
        self.ike.next_id += 1;
        self.ike.seal(exchange, id, Flags::INITIATOR, inner)
    }

    /// Sends `request` to `r` at `now` and opens the one response.
    pub(crate) fn send(&self, r: &mut Responder, now: Instant, request: &[u8]) -> (Vec<u8>, Plain) {
        self.send_on(&self.ike, r, now, request)
    }

    /// As [`Self::send`], the response opened with the keys of `ike`.
    pub(crate) fn send_on(
        &self,
        ike: &IkeSide,
        r: &mut Responder,
        now: Instant,
        request: &[u8],
    ) -> (Vec<u8>, Plain) {
        let (local, remote) = addrs();
        r.handle_datagram(now, local, remote, request, &mut Counter::new(50))
            .unwrap();
        let t = r.poll_transmit().expect("a response");
        assert_eq!((t.local, t.remote), (local, remote));
        assert!(r.poll_transmit().is_none(), "one response per request");
        let plain = ike.open(&t.payload);
        assert_eq!(plain.header.flags, Flags::RESPONSE);
        (t.payload, plain)
    }

    /// An exchange on the current IKE SA: our request and the responder's opened response.
    pub(crate) fn exchange(
        &mut self,
        r: &mut Responder,
        now: Instant,
        exchange: ExchangeType,
        inner: &[Payload<'_>],
    ) -> (Vec<u8>, Plain) {
        let request = self.request(exchange, inner);
        let (_, plain) = self.send(r, now, &request);
        assert_eq!(plain.header.exchange, exchange);
        (request, plain)
    }

    /// Rekeys the IKE SA (RFC 7296 §1.3.2) to the new initiator SPI `spi_i`; returns the old
    /// SA's side, the request and the response. `self.ike` is the new SA afterwards.
    pub(crate) fn rekey_ike(
        &mut self,
        r: &mut Responder,
        now: Instant,
        spi_i: u64,
    ) -> (IkeSide, Vec<u8>, Plain) {
        let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x44; 32]).unwrap();
        let public = kex.public_value().unwrap();
        let ni = [0x55u8; 32];
        let spi = spi_i.to_be_bytes();
        let (request, plain) = self.exchange(
            r,
            now,
            ExchangeType::CREATE_CHILD_SA,
            &[
                Payload::Sa(ike_sa(&spi)),
                Payload::Nonce(Nonce { data: &ni }),
                Payload::Ke(Ke {
                    group: WireGroup(31),
                    data: &public,
                }),
            ],
        );
        let inner = plain.payloads();
        let [Payload::Sa(sa), Payload::Nonce(nr), Payload::Ke(ke)] = &inner[..] else {
            panic!("IKE rekey response {inner:?}");
        };
        assert_eq!(sa.proposals.len(), 1);
        assert_eq!(sa.proposals[0].protocol, ProtocolId::IKE);
        let spi_r = u64::from_be_bytes(sa.proposals[0].spi.try_into().unwrap());
        assert_eq!(ke.group, WireGroup(31));
        let g_ir = kex.compute_shared(ke.data).unwrap();
        let seed = rekey_skeyseed(prf(), self.ike.keys.sk_d.expose(), g_ir.expose(), &ni, nr.data);
        let keys = IkeSaKeys::derive(
            prf(),
            seed.expose(),
            &ni,
            nr.data,
            &spi_i.to_be_bytes(),
            &spi_r.to_be_bytes(),
            ENCR,
            None,
        )
        .unwrap();
        let new = IkeSide {
            spi_i,
            spi_r,
            keys,
            next_id: 0,
        };
        let old = std::mem::replace(&mut self.ike, new);
        (old, request, plain)
    }
}
