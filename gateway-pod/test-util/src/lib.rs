//! Test support shared across the workspace, so that each helper exists once.
//!
//! * [`Counter`]: deterministic [`Entropy`] for the IKE state machines (no network, no
//!   randomness), used by `concentrator-ike`'s integration tests and its fuzz targets.
//! * [`ike_sa`], [`esp_sa`], [`ike_sa_init_request`]: the proposals and the IKE_SA_INIT
//!   request the tests offer, as the codec encodes them.
//! * [`round_trip!`]: the payload codec's fuzz check, decode, encode, decode again.
//! * [`interop`] (feature `interop`): our initiator and responder against a real strongSwan,
//!   each in a network namespace; the driver process that runs our state machine on UDP 500
//!   and 4500, and what the tests read from it. Only the e2e layer (the gateway's integration
//!   tests) enables it: the sans-IO crate's tests open no sockets.
//!
//! A dev-dependency only. It depends on `concentrator-ike`, so it serves that crate's
//! integration tests (`tests/*.rs`), not its unit tests.

use concentrator_algorithms::DhGroup;
use concentrator_crypto::{CryptoError, KeyExchange};
use concentrator_ike::payload::{Ke, Nonce, Notify, Proposal, Sa, Transform};
use concentrator_ike::responder::Entropy;
use concentrator_ike::{
    DhGroup as WireGroup, ExchangeType, Flags, Header, Message, NotifyType, Payload, ProtocolId, TransformId,
    TransformType,
};

#[cfg(feature = "interop")]
pub mod interop;

/// Deterministic entropy: bytes from a counter (so that SPIs and nonces differ from one draw
/// to the next), and the same fixed private key for every key exchange.
///
/// Each constructor fixes how a count becomes a byte, so that a test keeps the exact bytes,
/// SPIs and keys it was written against.
#[derive(Clone, Copy, Debug)]
pub struct Counter {
    count: u64,
    byte: fn(u64) -> u8,
}

impl Counter {
    /// Bytes `seed + 1`, `seed + 2`, ... modulo 256 (zero included).
    pub fn new(seed: u8) -> Self {
        Self {
            count: u64::from(seed),
            // Truncation is the point: the count modulo 256.
            byte: |n| n as u8,
        }
    }

    /// Bytes 1 to 251 and over again, starting after `seed`: never zero, and a long run of
    /// them (SPIs, many nonces) does not repeat every 256 bytes.
    pub fn non_zero(seed: u64) -> Self {
        Self {
            count: seed,
            byte: |n| (n % 251) as u8 + 1,
        }
    }

    /// As [`Self::new`] with the lowest bit set: odd bytes, never zero.
    pub fn odd(seed: u8) -> Self {
        Self {
            count: u64::from(seed),
            byte: |n| n as u8 | 1,
        }
    }
}

impl Entropy for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        for b in buf {
            self.count = self.count.wrapping_add(1);
            *b = (self.byte)(self.count);
        }
        Ok(())
    }

    fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError> {
        KeyExchange::from_private_key(group, &[0x22; 32])
    }
}

/// Decodes `$data` as the body of one payload of type `$payload`; whatever decodes must
/// survive an encode/decode round trip unchanged, and encoding must be canonical. Returns
/// early (nothing to check) when `$data` does not decode.
#[macro_export]
macro_rules! round_trip {
    ($payload:ty, $data:expr) => {{
        if let Ok(decoded) = <$payload>::decode($data) {
            let mut bytes = Vec::new();
            decoded.encode(&mut bytes);
            let again = <$payload>::decode(&bytes).expect("a re-encoded body decodes");
            assert_eq!(again, decoded);
            let mut twice = Vec::new();
            again.encode(&mut twice);
            assert_eq!(twice, bytes, "encoding is canonical");
        }
    }};
}

/// The IKE proposal the tests offer: AES-128-GCM, PRF-HMAC-SHA2-256, X25519, with the new
/// initiator SPI `spi` (empty in IKE_SA_INIT, 8 bytes in an IKE SA rekey).
pub fn ike_sa(spi: &[u8]) -> Sa<'_> {
    Sa {
        proposals: vec![Proposal {
            number: 1,
            protocol: ProtocolId::IKE,
            spi,
            transforms: vec![
                Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
                Transform::new(TransformType::PRF, TransformId::PRF_HMAC_SHA2_256),
                Transform::new(TransformType::DH, TransformId(31)),
            ],
        }],
    }
}

/// The ESP proposal the tests offer: AES-128-GCM without ESN, with our SPI `spi` and DH
/// groups `groups` for PFS (none in IKE_AUTH).
pub fn esp_sa<'a>(spi: &'a [u8; 4], groups: &[u16]) -> Sa<'a> {
    let mut transforms = vec![
        Transform::with_key_length(TransformType::ENCR, TransformId::ENCR_AES_GCM_16, 128),
        Transform::new(TransformType::ESN, TransformId::ESN_NO),
    ];
    transforms.extend(
        groups
            .iter()
            .map(|g| Transform::new(TransformType::DH, TransformId(*g))),
    );
    Sa {
        proposals: vec![Proposal {
            number: 1,
            protocol: ProtocolId::ESP,
            spi,
            transforms,
        }],
    }
}

/// An IKE_SA_INIT request with SPIi `spi_i`: [`ike_sa`], an X25519 KE payload (a fixed private
/// key) and `nonce`, with a COOKIE notify first if `cookie` is given (RFC 7296 §2.6).
pub fn ike_sa_init_request(spi_i: u64, nonce: &[u8], cookie: Option<&[u8]>) -> Vec<u8> {
    let kex = KeyExchange::from_private_key(DhGroup::Curve25519, &[0x33; 32]).expect("X25519 key");
    let public = kex.public_value().expect("X25519 public value");
    let cookie = cookie.map(|c| Payload::Notify(Notify::new(NotifyType::COOKIE, c)));
    let payloads = cookie
        .into_iter()
        .chain([
            Payload::Sa(ike_sa(&[])),
            Payload::Ke(Ke {
                group: WireGroup(31),
                data: &public,
            }),
            Payload::Nonce(Nonce { data: nonce }),
        ])
        .collect();
    Message {
        header: Header::new(spi_i, 0, ExchangeType::IKE_SA_INIT, Flags::INITIATOR, 0),
        payloads,
    }
    .to_vec()
}

#[cfg(test)]
mod tests {
    use concentrator_ike::PayloadType;

    use super::*;

    fn draw(mut c: Counter, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        c.fill(&mut buf).unwrap();
        buf
    }

    #[test]
    fn each_counter_keeps_its_byte_sequence() {
        assert_eq!(draw(Counter::new(0), 3), [1, 2, 3]);
        assert_eq!(draw(Counter::new(254), 3), [255, 0, 1]);
        assert_eq!(draw(Counter::non_zero(0), 3), [2, 3, 4]);
        assert_eq!(draw(Counter::non_zero(249), 3), [251, 1, 2]);
        assert_eq!(draw(Counter::odd(0), 4), [1, 3, 3, 5]);
        assert_eq!(draw(Counter::odd(254), 3), [255, 1, 1]);
    }

    #[test]
    fn round_trip_accepts_a_payload_body_and_ignores_garbage() {
        use concentrator_ike::payload::Identity;
        let mut body = Vec::new();
        Identity::Fqdn(b"gw.example").encode(&mut body);
        round_trip!(Identity<'_>, &body);
        round_trip!(Identity<'_>, &[]);
    }

    #[test]
    fn the_ike_sa_init_request_decodes_with_the_cookie_first() {
        let bytes = ike_sa_init_request(7, &[0x5a; 32], Some(b"cookie"));
        let msg = Message::decode(&bytes).unwrap();
        assert_eq!(
            (msg.header.spi_i, msg.header.exchange),
            (7, ExchangeType::IKE_SA_INIT)
        );
        let types: Vec<_> = msg.payloads.iter().map(Payload::payload_type).collect();
        assert_eq!(
            types,
            [
                PayloadType::NOTIFY,
                PayloadType::SA,
                PayloadType::KE,
                PayloadType::NONCE
            ]
        );
    }
}
