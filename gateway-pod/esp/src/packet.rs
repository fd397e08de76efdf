//! Tunnel-mode ESP packets with a combined-mode cipher (AES-GCM, RFC 4106; ChaCha20-Poly1305,
//! RFC 7634), sealed into and opened in the caller's buffers:
//!
//! ```text
//! SPI (4) | Sequence Number (4) | IV (8) | ciphertext(inner | padding | pad length | next header) | ICV (16)
//! ```

use concentrator_crds::proposal::{Encryption, Integrity};
use concentrator_crypto::aead::{AeadKey, IV_LEN, TAG_LEN, esp_aad};
use concentrator_crypto::{CryptoError, DirectionKeys};

use crate::replay::{Refused, ReplayWindow};

/// ESP header (SPI + sequence number) length.
pub const HEADER_LEN: usize = 8;
/// Bytes ESP adds around an inner packet, before padding.
pub const OVERHEAD: usize = HEADER_LEN + IV_LEN + 2 + TAG_LEN;
/// Next-header value of a dummy packet (RFC 4303 §2.6), which receivers drop.
pub const NEXT_HEADER_NONE: u8 = 59;

/// Why a packet was not sealed or opened. Fieldless: cheap to return and to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    /// Packet too short or buffer too small.
    #[error("packet too short or buffer too small")]
    Truncated,
    /// Sequence number already received.
    #[error("sequence number already received")]
    Replayed,
    /// Sequence number left of the replay window.
    #[error("sequence number left of the replay window")]
    TooOld,
    /// Sequence number zero.
    #[error("sequence number zero")]
    ZeroSequence,
    /// Integrity check failed.
    #[error("integrity check failed")]
    IcvMismatch,
    /// Padding malformed.
    #[error("padding malformed")]
    BadPadding,
    /// Dummy packet.
    #[error("dummy packet")]
    Dummy,
    /// Sequence numbers exhausted: the SA must be rekeyed.
    #[error("sequence numbers exhausted: the SA must be rekeyed")]
    SequenceExhausted,
    /// Cipher failure.
    #[error("cipher failure")]
    Cipher,
    /// The packet's SPI is not this SA's.
    #[error("packet for another SA")]
    WrongSpi,
}

impl From<Refused> for EspError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Replayed => Self::Replayed,
            Refused::TooOld => Self::TooOld,
            Refused::Zero => Self::ZeroSequence,
        }
    }
}

/// Padding so that `inner + padding + 2` is a multiple of 4 (RFC 4303 §2.4: the Pad Length
/// and Next Header fields end on a 4-byte boundary; AEAD ciphers have no block size).
pub fn pad_len(inner: usize) -> usize {
    (4 - (inner + 2) % 4) % 4
}

/// Length of the ESP packet that carries `inner` bytes.
pub fn sealed_len(inner: usize) -> usize {
    OVERHEAD + inner + pad_len(inner)
}

/// The AEAD key of one direction; refuses what only CBC+HMAC can carry.
fn aead_key(
    encryption: Encryption,
    integrity: Option<Integrity>,
    keys: &DirectionKeys,
) -> Result<AeadKey, CryptoError> {
    // RFC 4303 §3.2: combined-mode algorithms provide integrity themselves; an integrity
    // transform beside one is a negotiation error, not something to ignore.
    if integrity.is_some() || !keys.integ.is_empty() {
        return Err(CryptoError::Unsupported(
            "integrity transform with an AEAD cipher",
        ));
    }
    AeadKey::from_direction(encryption, keys)
}

/// The sending half of a CHILD SA.
#[derive(Debug)]
pub struct Outbound {
    spi: u32,
    key: AeadKey,
    esn: bool,
    /// Sequence number of the last packet sent.
    seq: u64,
}

impl Outbound {
    /// A fresh SA: the first packet gets sequence number 1.
    pub fn new(spi: u32, key: AeadKey, esn: bool) -> Self {
        Self::resume(spi, key, esn, 0)
    }

    /// An outbound SA from negotiated keys (AEAD when `integrity` is `None`, else CBC+HMAC).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for a transform combination ESP does not support here,
    /// [`CryptoError::KeyLength`] for keys of the wrong length.
    pub fn from_keys(
        spi: u32,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: &DirectionKeys,
        esn: bool,
    ) -> Result<Self, CryptoError> {
        Ok(Self::new(spi, aead_key(encryption, integrity, keys)?, esn))
    }

    /// An SA taken over from another pod: continues after `last_seq` (which the caller has
    /// already moved ahead by a safe margin).
    pub fn resume(spi: u32, key: AeadKey, esn: bool, last_seq: u64) -> Self {
        Self {
            spi,
            key,
            esn,
            seq: last_seq,
        }
    }

    /// The SPI the peer expects in our packets.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Sequence number of the last packet sent.
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Seals `inner` (an IP packet whose protocol is `next_header`: 4 for IPv4, 41 for IPv6)
    /// into `out`, returning the ESP packet's length.
    pub fn seal(&mut self, inner: &[u8], next_header: u8, out: &mut [u8]) -> Result<usize, EspError> {
        let len = sealed_len(inner.len());
        let out = out.get_mut(..len).ok_or(EspError::Truncated)?;
        // RFC 4303 §3.3.3: "the sender's counter and the receiver's counter MUST NOT be
        // allowed to cycle"; the SA has to be rekeyed before that.
        let limit = if self.esn { u64::MAX } else { u64::from(u32::MAX) };
        if self.seq >= limit {
            return Err(EspError::SequenceExhausted);
        }
        self.seq += 1;
        let seq = self.seq;
        out[..4].copy_from_slice(&self.spi.to_be_bytes());
        out[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        // The sequence number is unique per packet under this key: it is the IV, as RFC 4106
        // §3.1 allows ("incrementing a counter for each packet").
        let iv = seq.to_be_bytes();
        out[HEADER_LEN..HEADER_LEN + IV_LEN].copy_from_slice(&iv);
        let body = &mut out[HEADER_LEN + IV_LEN..];
        body[..inner.len()].copy_from_slice(inner);
        let pad = pad_len(inner.len());
        // RFC 4303 §2.4: default padding is the monotonic series 1, 2, 3, ...
        for (i, b) in body[inner.len()..inner.len() + pad].iter_mut().enumerate() {
            *b = (i + 1) as u8;
        }
        body[inner.len() + pad] = pad as u8;
        body[inner.len() + pad + 1] = next_header;
        let (aad, aad_len) = esp_aad(self.spi, seq, self.esn);
        self.key
            .seal_in_place(&iv, &aad[..aad_len], body)
            .map_err(|_| EspError::Cipher)?;
        Ok(len)
    }
}

/// The receiving half of a CHILD SA.
#[derive(Debug)]
pub struct Inbound {
    spi: u32,
    key: AeadKey,
    esn: bool,
    replay: ReplayWindow,
}

/// A packet that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Where the inner IP packet lies in the buffer given to [`Inbound::open`].
    pub inner: std::ops::Range<usize>,
    /// 4 (IPv4) or 41 (IPv6) in tunnel mode.
    pub next_header: u8,
    /// The full (ESN-inferred) sequence number.
    pub seq: u64,
}

impl Inbound {
    /// The receiving half with an anti-replay window of `replay_window` packets.
    pub fn new(spi: u32, key: AeadKey, esn: bool, replay_window: u32) -> Self {
        Self {
            spi,
            key,
            esn,
            replay: ReplayWindow::new(replay_window, esn),
        }
    }

    /// An inbound SA from negotiated keys (AEAD when `integrity` is `None`, else CBC+HMAC).
    ///
    /// # Errors
    /// As [`Outbound::from_keys`].
    pub fn from_keys(
        spi: u32,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: &DirectionKeys,
        esn: bool,
        replay_window: u32,
    ) -> Result<Self, CryptoError> {
        Ok(Self::new(
            spi,
            aead_key(encryption, integrity, keys)?,
            esn,
            replay_window,
        ))
    }

    /// Our SPI, which the peer puts in its packets.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The replay window's state (highest sequence number seen).
    pub fn replay(&self) -> &ReplayWindow {
        &self.replay
    }

    /// Verifies and decrypts `packet` (from the SPI on) in place. Replays are refused before
    /// any decryption; the window moves only after the ICV verified.
    pub fn open(&mut self, packet: &mut [u8]) -> Result<Opened, EspError> {
        if packet.len() < OVERHEAD {
            return Err(EspError::Truncated);
        }
        if packet[..4] != self.spi.to_be_bytes() {
            return Err(EspError::WrongSpi);
        }
        let low = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        let seq = self.replay.infer(low);
        self.replay.check(seq)?;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&packet[HEADER_LEN..HEADER_LEN + IV_LEN]);
        let (aad, aad_len) = esp_aad(self.spi, seq, self.esn);
        let body = &mut packet[HEADER_LEN + IV_LEN..];
        let plain = self
            .key
            .open_in_place(&iv, &aad[..aad_len], body)
            .map_err(|_| EspError::IcvMismatch)?;
        let n = plain.len();
        let (pad, next_header) = (usize::from(plain[n - 2]), plain[n - 1]);
        let inner_len = n.checked_sub(2 + pad).ok_or(EspError::BadPadding)?;
        // RFC 4303 §2.4: with the default padding the receiver checks the series.
        if plain[inner_len..n - 2]
            .iter()
            .enumerate()
            .any(|(i, &b)| b != (i + 1) as u8)
        {
            return Err(EspError::BadPadding);
        }
        self.replay.accept(seq)?;
        if next_header == NEXT_HEADER_NONE {
            return Err(EspError::Dummy);
        }
        let start = HEADER_LEN + IV_LEN;
        Ok(Opened {
            inner: start..start + inner_len,
            next_header,
            seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYMAT_128: [u8; 20] = [7; 20];

    fn pair(enc: Encryption, keymat: &[u8], esn: bool) -> (Outbound, Inbound) {
        let out = Outbound::new(0x1234_5678, AeadKey::new(enc, keymat).unwrap(), esn);
        let inb = Inbound::new(0x1234_5678, AeadKey::new(enc, keymat).unwrap(), esn, 4096);
        (out, inb)
    }

    fn ipv4(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7) as u8).collect()
    }

    #[test]
    fn round_trips_every_length_and_cipher() {
        for (enc, keymat) in [
            (Encryption::AesGcm16 { key_bits: 128 }, vec![1u8; 20]),
            (Encryption::AesGcm16 { key_bits: 256 }, vec![2u8; 36]),
            (Encryption::ChaCha20Poly1305, vec![3u8; 36]),
        ] {
            for esn in [false, true] {
                let (mut tx, mut rx) = pair(enc, &keymat, esn);
                for len in [0, 1, 2, 3, 4, 5, 20, 1399, 1400, 9000] {
                    let inner = ipv4(len);
                    let mut buf = vec![0u8; sealed_len(len) + 7];
                    let n = tx.seal(&inner, 4, &mut buf).unwrap();
                    assert_eq!(n % 4, 0, "ESP packets are 4-byte aligned");
                    let o = rx.open(&mut buf[..n]).unwrap();
                    assert_eq!(&buf[o.inner.clone()], &inner[..], "{enc:?} esn={esn} len={len}");
                    assert_eq!(o.next_header, 4);
                    assert_eq!(o.seq, tx.last_seq());
                }
            }
        }
    }

    #[test]
    fn from_keys_round_trips_derived_child_sa_keys() {
        use concentrator_crypto::{ChildSaKeys, Prf, PrfAlg};
        for enc in [
            Encryption::AesGcm16 { key_bits: 128 },
            Encryption::AesGcm16 { key_bits: 256 },
            Encryption::ChaCha20Poly1305,
        ] {
            let keys = ChildSaKeys::derive(
                Prf::new(PrfAlg::HmacSha256),
                &[1; 32],
                None,
                &[2; 32],
                &[3; 32],
                enc,
                None,
            )
            .unwrap();
            let mut tx = Outbound::from_keys(9, enc, None, &keys.initiator, true).unwrap();
            let mut rx = Inbound::from_keys(9, enc, None, &keys.initiator, true, 64).unwrap();
            let mut buf = vec![0u8; sealed_len(50)];
            let n = tx.seal(&ipv4(50), 4, &mut buf).unwrap();
            let o = rx.open(&mut buf[..n]).unwrap();
            assert_eq!(&buf[o.inner], &ipv4(50)[..], "{enc:?}");
            // The other direction's keys do not open it.
            let mut rx = Inbound::from_keys(9, enc, None, &keys.responder, true, 64).unwrap();
            let n = tx.seal(&ipv4(50), 4, &mut buf).unwrap();
            assert_eq!(rx.open(&mut buf[..n]), Err(EspError::IcvMismatch));
        }
    }

    #[test]
    fn from_keys_rejects_an_integrity_transform_beside_an_aead() {
        use concentrator_crypto::{ChildSaKeys, Prf, PrfAlg};
        let enc = Encryption::AesGcm16 { key_bits: 128 };
        let keys = ChildSaKeys::derive(
            Prf::new(PrfAlg::HmacSha256),
            &[1; 32],
            None,
            &[2; 32],
            &[3; 32],
            enc,
            None,
        )
        .unwrap();
        assert!(matches!(
            Outbound::from_keys(9, enc, Some(Integrity::HmacSha256_128), &keys.initiator, false),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn refuses_a_replayed_packet() {
        let (mut tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut buf = vec![0u8; 200];
        let n = tx.seal(&ipv4(100), 4, &mut buf).unwrap();
        let copy = buf[..n].to_vec();
        rx.open(&mut buf[..n]).unwrap();
        let mut again = copy.clone();
        assert_eq!(rx.open(&mut again), Err(EspError::Replayed));
    }

    #[test]
    fn refuses_every_single_bit_flip() {
        let (mut tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut buf = vec![0u8; 200];
        let n = tx.seal(&ipv4(60), 4, &mut buf).unwrap();
        for byte in 0..n {
            for bit in 0..8 {
                let mut p = buf[..n].to_vec();
                p[byte] ^= 1 << bit;
                let r = rx.open(&mut p);
                assert!(r.is_err(), "flip at byte {byte} bit {bit} accepted");
            }
        }
        // The untouched packet still opens: failed attempts did not move the window.
        assert!(rx.open(&mut buf[..n]).is_ok());
    }

    #[test]
    fn a_tampered_packet_does_not_poison_the_window() {
        let (mut tx, mut rx) = pair(Encryption::ChaCha20Poly1305, &[9u8; 36], false);
        let mut buf = vec![0u8; 200];
        let n = tx.seal(&ipv4(40), 4, &mut buf).unwrap();
        let mut forged = buf[..n].to_vec();
        forged[n - 1] ^= 1;
        assert_eq!(rx.open(&mut forged), Err(EspError::IcvMismatch));
        assert!(
            rx.open(&mut buf[..n]).is_ok(),
            "the genuine packet with the same number is accepted"
        );
    }

    #[test]
    fn drops_dummy_packets_and_short_input() {
        let (mut tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut buf = vec![0u8; 100];
        let n = tx.seal(&[], NEXT_HEADER_NONE, &mut buf).unwrap();
        assert_eq!(rx.open(&mut buf[..n]), Err(EspError::Dummy));
        assert_eq!(rx.open(&mut [0u8; OVERHEAD - 1]), Err(EspError::Truncated));
        assert_eq!(tx.seal(&ipv4(100), 4, &mut [0u8; 50]), Err(EspError::Truncated));
    }

    #[test]
    fn refuses_to_cycle_the_sequence_number() {
        let key = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128).unwrap();
        let mut tx = Outbound::resume(1, key, false, u64::from(u32::MAX) - 1);
        let mut buf = vec![0u8; 100];
        assert!(tx.seal(&ipv4(10), 4, &mut buf).is_ok());
        assert_eq!(tx.seal(&ipv4(10), 4, &mut buf), Err(EspError::SequenceExhausted));
    }

    #[test]
    fn esn_packets_open_across_the_32_bit_wrap() {
        let enc = Encryption::AesGcm16 { key_bits: 128 };
        let mut tx = Outbound::resume(5, AeadKey::new(enc, &KEYMAT_128).unwrap(), true, 0xffff_fffd);
        let mut rx = Inbound::new(5, AeadKey::new(enc, &KEYMAT_128).unwrap(), true, 64);
        let mut buf = vec![0u8; 200];
        for _ in 0..6 {
            let n = tx.seal(&ipv4(30), 4, &mut buf).unwrap();
            let o = rx.open(&mut buf[..n]).unwrap();
            assert_eq!(o.seq, tx.last_seq());
        }
        assert!(tx.last_seq() > u64::from(u32::MAX));
    }
}
