//! Tunnel-mode ESP packets (RFC 4303), sealed into and opened in the caller's buffers, with
//! either a combined-mode cipher (AES-GCM, RFC 4106; ChaCha20-Poly1305, RFC 7634):
//!
//! ```text
//! SPI (4) | Sequence Number (4) | IV (8) | ciphertext(inner | padding | pad length | next header) | ICV (16)
//! ```
//!
//! or AES-CBC (RFC 3602) with a truncated HMAC-SHA2 (RFC 4868), encrypt-then-MAC:
//!
//! ```text
//! SPI (4) | Sequence Number (4) | IV (16) | AES-CBC(inner | padding | pad length | next header) | ICV (16/24/32)
//! ```
//!
//! where the ICV is the HMAC over everything before it, followed (with ESN) by the high 32
//! bits of the sequence number, which are authenticated but not sent.

use concentrator_algorithms::{Encryption, Integrity};
use concentrator_crypto::aead::{AeadKey, IV_LEN, TAG_LEN, esp_aad};
use concentrator_crypto::cbc::{BLOCK_LEN, CbcDecryptingKey, CbcEncryptingKey};
use concentrator_crypto::prf::{IntegKey, integ_icv_len};
use concentrator_crypto::{CryptoError, DirectionKeys};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::replay::{Refused, ReplayWindow};

/// ESP header (SPI + sequence number) length.
pub const HEADER_LEN: usize = 8;
/// Bytes ESP adds around an inner packet with an AEAD transform, before padding.
pub const OVERHEAD: usize = HEADER_LEN + IV_LEN + 2 + TAG_LEN;
/// Longest ICV of the supported integrity transforms (HMAC-SHA-512-256).
const MAX_ICV_LEN: usize = 32;
/// Most bytes any supported transform adds around an inner packet, padding included:
/// AES-CBC with HMAC-SHA-512-256 (16-byte IV, up to 15 bytes of padding, 32-byte ICV).
pub const MAX_OVERHEAD: usize = HEADER_LEN + BLOCK_LEN + (BLOCK_LEN - 1) + 2 + MAX_ICV_LEN;
/// Next-header value of a dummy packet (RFC 4303 §2.6), which receivers drop.
pub const NEXT_HEADER_NONE: u8 = 59;

/// Why a packet was not sealed or opened. Fieldless: cheap to return and to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    /// Packet too short or buffer too small.
    #[error("packet too short or buffer too small")]
    Truncated,
    /// Ciphertext not a whole number of cipher blocks (AES-CBC).
    #[error("ciphertext not a whole number of cipher blocks")]
    Malformed,
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
    /// The sequence numbers this pod may use are used up until its fleet replica
    /// acknowledges more ([`SendCounter::set_ceiling`]).
    #[error("sequence number ceiling reached (the replica has not acknowledged more)")]
    SequenceCeiling,
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
    Framing::AEAD.pad_len(inner)
}

/// An upper bound of the length of the ESP packet that carries `inner` bytes, for every
/// supported transform: size buffers with it. [`Outbound::sealed_len`] is the exact length
/// for one SA.
pub fn sealed_len(inner: usize) -> usize {
    let widest_cbc = Framing {
        iv_len: BLOCK_LEN,
        align: BLOCK_LEN,
        min_encrypted: BLOCK_LEN,
        icv_len: MAX_ICV_LEN,
    };
    Framing::AEAD.sealed_len(inner).max(widest_cbc.sealed_len(inner))
}

/// Where the fields of a packet lie for one transform.
#[derive(Debug, Clone, Copy)]
struct Framing {
    /// Explicit IV after the ESP header.
    iv_len: usize,
    /// What `inner | padding | pad length | next header` is aligned to: 4 (RFC 4303 §2.4)
    /// for the AEADs, the cipher block for CBC.
    align: usize,
    /// The shortest encrypted part a genuine packet can have: the two trailer bytes for the
    /// AEADs, one block for CBC.
    min_encrypted: usize,
    icv_len: usize,
}

impl Framing {
    const AEAD: Self = Self {
        iv_len: IV_LEN,
        align: 4,
        min_encrypted: 2,
        icv_len: TAG_LEN,
    };

    fn cbc(integ: Integrity) -> Self {
        Self {
            iv_len: BLOCK_LEN,
            align: BLOCK_LEN,
            min_encrypted: BLOCK_LEN,
            icv_len: integ_icv_len(integ),
        }
    }

    /// The minimum padding (RFC 4303 §2.4 lets the sender add more, for traffic-flow
    /// confidentiality; we do not).
    fn pad_len(self, inner: usize) -> usize {
        (self.align - (inner + 2) % self.align) % self.align
    }

    fn body_start(self) -> usize {
        HEADER_LEN + self.iv_len
    }

    fn sealed_len(self, inner: usize) -> usize {
        self.body_start() + inner + self.pad_len(inner) + 2 + self.icv_len
    }

    fn min_len(self) -> usize {
        self.body_start() + self.min_encrypted + self.icv_len
    }

    /// Most bytes added to an inner packet.
    fn overhead(self) -> usize {
        self.body_start() + (self.align - 1) + 2 + self.icv_len
    }

    /// The longest inner packet whose ESP packet is at most `max_sealed` bytes long.
    fn max_inner_len(self, max_sealed: usize) -> usize {
        // `overhead` is the most any packet needs, so this one fits; padding may let a few
        // longer ones fit too.
        let mut n = max_sealed.saturating_sub(self.overhead());
        if self.sealed_len(n) > max_sealed {
            return 0;
        }
        while self.sealed_len(n + 1) <= max_sealed {
            n += 1;
        }
        n
    }
}

/// The sending key of an SA. The CBC keys are boxed: AWS-LC's AES key schedules make them
/// about 1.7 KB, which would otherwise be the size of every SA, AEAD ones included, in
/// whatever table holds them.
#[derive(Debug)]
enum SealKey {
    Aead(AeadKey),
    Cbc(Box<CbcHmac<CbcEncryptingKey>>),
}

/// The receiving key of an SA (boxed as [`SealKey`]).
#[derive(Debug)]
enum OpenKey {
    Aead(AeadKey),
    Cbc(Box<CbcHmac<CbcDecryptingKey>>),
}

/// An AES-CBC key (encrypting or decrypting) with its HMAC key.
#[derive(Debug)]
struct CbcHmac<C> {
    cipher: C,
    integ: IntegKey,
}

impl SealKey {
    fn framing(&self) -> Framing {
        match self {
            Self::Aead(_) => Framing::AEAD,
            Self::Cbc(k) => Framing::cbc(k.integ.algorithm()),
        }
    }
}

impl OpenKey {
    fn framing(&self) -> Framing {
        match self {
            Self::Aead(_) => Framing::AEAD,
            Self::Cbc(k) => Framing::cbc(k.integ.algorithm()),
        }
    }
}

/// Checks the negotiated transforms and the key lengths of one direction; for CBC returns
/// the integrity transform and key, for an AEAD `None`.
fn checked_integrity(
    encryption: Encryption,
    integrity: Option<Integrity>,
    keys: &DirectionKeys,
) -> Result<Option<IntegKey>, CryptoError> {
    match (encryption, integrity) {
        (Encryption::AesCbc { .. }, Some(integ)) => {
            // CBC keys carry no salt (RFC 3602 takes the whole key material as the key).
            if !keys.salt.is_empty() {
                return Err(CryptoError::KeyLength {
                    what: "AES-CBC salt",
                    expected: 0,
                    got: keys.salt.len(),
                });
            }
            IntegKey::new(integ, keys.integ.expose()).map(Some)
        }
        // Encryption-only ESP: our receive path always runs anti-replay, which RFC 4303
        // §3.4.3 forbids without integrity ("This service MUST NOT be enabled unless the ESP
        // integrity service also is enabled for the SA"); and unauthenticated CBC is malleable.
        (Encryption::AesCbc { .. }, None) => {
            Err(CryptoError::Unsupported("AES-CBC without integrity transform"))
        }
        // RFC 4303 §3.2: combined-mode algorithms provide integrity themselves; an integrity
        // transform beside one is a negotiation error, not something to ignore.
        (_, Some(_)) => Err(CryptoError::Unsupported(
            "integrity transform with an AEAD cipher",
        )),
        (_, None) => {
            if !keys.integ.is_empty() {
                return Err(CryptoError::KeyLength {
                    what: "integrity key (AEAD)",
                    expected: 0,
                    got: keys.integ.len(),
                });
            }
            Ok(None)
        }
    }
}

/// What the ICV covers after the packet bytes (CBC+HMAC): with ESN, the high 32 bits of the
/// sequence number. RFC 4303 §3.3.2.1: "If the ESN option is enabled for the SA, the
/// high-order 32 bits of the sequence number are appended after the Next Header field for
/// purposes of this computation, but are not transmitted." HMAC needs no implicit padding.
fn esn_trailer(seq: u64, esn: bool, hi: &mut [u8; 4]) -> &[u8] {
    if esn {
        *hi = ((seq >> 32) as u32).to_be_bytes();
        hi
    } else {
        &[]
    }
}

/// The sequence numbers of an outbound SA: the last one taken, and the highest one this
/// process may take. Shared (an `Arc`) between the SA and whoever moves the ceiling: in a
/// fleet, the ceiling is what the shard's replica has acknowledged, and a pod that takes the
/// SA over starts above it, so no sequence number (with AES-GCM, no nonce) is used twice
/// under one key even if this process is only frozen and wakes up later.
#[derive(Debug)]
pub struct SendCounter {
    last: AtomicU64,
    ceiling: AtomicU64,
    /// Sends nothing whatever the ceiling (its SA is being handed to another pod), without
    /// losing the ceiling, which replication may still raise meanwhile.
    frozen: std::sync::atomic::AtomicBool,
}

impl SendCounter {
    /// A counter whose last number taken is `last`, with no ceiling.
    pub fn new(last: u64) -> Self {
        Self {
            last: AtomicU64::new(last),
            ceiling: AtomicU64::new(u64::MAX),
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Stops (`true`) or resumes (`false`) sending. A packet that had passed the check when
    /// the freeze came may still take its number: the ceiling, not this, is what bounds the
    /// numbers another pod must skip.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
    }

    /// Whether sending is stopped by [`Self::freeze`].
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Sequence number of the last packet sent.
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// The highest sequence number that may be sent (`u64::MAX`: no ceiling).
    pub fn ceiling(&self) -> u64 {
        self.ceiling.load(Ordering::Acquire)
    }

    /// Sets the highest sequence number that may be sent. Lowering it below [`Self::last`]
    /// stops the SA sending at once.
    pub fn set_ceiling(&self, ceiling: u64) {
        self.ceiling.store(ceiling, Ordering::Release);
    }

    /// Takes the next sequence number, never past `limit` (the SA's sequence space) nor the
    /// ceiling: a compare-and-swap rather than an add, so the counter never moves past either
    /// and cannot wrap around to reuse a number.
    fn take(&self, limit: u64) -> Result<u64, EspError> {
        if self.frozen.load(Ordering::Relaxed) {
            return Err(EspError::SequenceCeiling);
        }
        let ceiling = self.ceiling();
        self.last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < limit && s < ceiling).then_some(s + 1)
            })
            .map(|s| s + 1)
            .map_err(|s| {
                if s >= limit {
                    EspError::SequenceExhausted
                } else {
                    EspError::SequenceCeiling
                }
            })
    }
}

/// The sending half of a CHILD SA. Sealing takes `&self`: several data plane workers may
/// send on one SA at once, each packet taking the next sequence number (and so a distinct
/// IV) from one atomic counter.
#[derive(Debug)]
pub struct Outbound {
    spi: u32,
    key: SealKey,
    esn: bool,
    /// Sequence numbers taken and allowed.
    seq: Arc<SendCounter>,
}

impl Outbound {
    /// A fresh SA: the first packet gets sequence number 1.
    pub fn new(spi: u32, key: AeadKey, esn: bool) -> Self {
        Self::resume(spi, key, esn, 0)
    }

    /// An outbound SA from negotiated keys (AEAD when `integrity` is `None`, else CBC+HMAC).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for a transform combination ESP does not support here
    /// (AES-CBC without integrity, an AEAD with integrity), [`CryptoError::KeyLength`] for
    /// keys of the wrong length.
    pub fn from_keys(
        spi: u32,
        encryption: Encryption,
        integrity: Option<Integrity>,
        keys: &DirectionKeys,
        esn: bool,
    ) -> Result<Self, CryptoError> {
        let key = match checked_integrity(encryption, integrity, keys)? {
            Some(integ) => SealKey::Cbc(Box::new(CbcHmac {
                cipher: CbcEncryptingKey::new(encryption, keys.encr.expose())?,
                integ,
            })),
            None => SealKey::Aead(AeadKey::from_direction(encryption, keys)?),
        };
        Ok(Self {
            spi,
            key,
            esn,
            seq: Arc::new(SendCounter::new(0)),
        })
    }

    /// An SA taken over from another pod: continues after `last_seq` (which the caller has
    /// already moved ahead by a safe margin).
    pub fn resume(spi: u32, key: AeadKey, esn: bool, last_seq: u64) -> Self {
        Self {
            spi,
            key: SealKey::Aead(key),
            esn,
            seq: Arc::new(SendCounter::new(last_seq)),
        }
    }

    /// Moves the sequence counter on to continue after `last_seq`, for an SA built with
    /// [`Self::from_keys`] and taken over from another pod (as [`Self::resume`]). Never moves
    /// it back: a sequence number, and so an IV, is never used twice under a key.
    #[must_use]
    pub fn resume_after(self, last_seq: u64) -> Self {
        self.seq.last.fetch_max(last_seq, Ordering::Relaxed);
        self
    }

    /// The SA's sequence numbers, to read how far it got and to move its ceiling.
    pub fn counter(&self) -> Arc<SendCounter> {
        self.seq.clone()
    }

    /// The SPI the peer expects in our packets.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Sequence number of the last packet sent.
    pub fn last_seq(&self) -> u64 {
        self.seq.last()
    }

    /// Most bytes this SA adds around an inner packet (header, IV, padding, trailer, ICV):
    /// an inner MTU of `path MTU - overhead()` always fits.
    pub fn overhead(&self) -> usize {
        self.key.framing().overhead()
    }

    /// Exact length of the ESP packet that [`Self::seal`] makes of `inner` bytes (at most
    /// the free [`sealed_len`]).
    pub fn sealed_len(&self, inner: usize) -> usize {
        self.key.framing().sealed_len(inner)
    }

    /// The longest inner packet whose ESP packet is at most `max_sealed` bytes long (0 if
    /// none fits): what an inner sender is told when its packet does not fit the path.
    pub fn max_inner_len(&self, max_sealed: usize) -> usize {
        self.key.framing().max_inner_len(max_sealed)
    }

    /// Seals `inner` (an IP packet whose protocol is `next_header`: 4 for IPv4, 41 for IPv6)
    /// into `out`, returning the ESP packet's length.
    pub fn seal(&self, inner: &[u8], next_header: u8, out: &mut [u8]) -> Result<usize, EspError> {
        let f = self.key.framing();
        let len = f.sealed_len(inner.len());
        let out = out.get_mut(..len).ok_or(EspError::Truncated)?;
        // RFC 4303 §3.3.3: "the sender's counter and the receiver's counter MUST NOT be
        // allowed to cycle"; the SA has to be rekeyed before that.
        let limit = if self.esn { u64::MAX } else { u64::from(u32::MAX) };
        // Each caller gets its own number.
        let seq = self.seq.take(limit)?;
        // From here on every index lies within `out`, which is exactly `f.sealed_len` long.
        out[..4].copy_from_slice(&self.spi.to_be_bytes());
        out[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        let body_start = f.body_start();
        let icv_start = len - f.icv_len;
        let pad = f.pad_len(inner.len());
        let trailer = body_start + inner.len();
        out[body_start..trailer].copy_from_slice(inner);
        // RFC 4303 §2.4: default padding is the monotonic series 1, 2, 3, ...
        for (i, b) in out[trailer..trailer + pad].iter_mut().enumerate() {
            *b = (i + 1) as u8;
        }
        out[trailer + pad] = pad as u8;
        out[trailer + pad + 1] = next_header;
        match &self.key {
            SealKey::Aead(key) => {
                // The sequence number is unique per packet under this key: it is the IV, as
                // RFC 4106 §3.1 allows ("incrementing a counter for each packet").
                let iv = seq.to_be_bytes();
                out[HEADER_LEN..body_start].copy_from_slice(&iv);
                let (aad, aad_len) = esp_aad(self.spi, seq, self.esn);
                key.seal_in_place(&iv, &aad[..aad_len], &mut out[body_start..])
                    .map_err(|_| EspError::Cipher)?;
            }
            SealKey::Cbc(k) => {
                let CbcHmac { cipher, integ } = &**k;
                // RFC 3602 §3: "The IV MUST be chosen at random, and MUST be unpredictable."
                // It is E_K(sequence number): indistinguishable from random and unpredictable
                // for anyone without the key, and never repeated because the sequence number
                // is not (see `encrypt_with_nonce_iv`). It lands in the IV field.
                cipher
                    .encrypt_with_nonce_iv(seq, &mut out[HEADER_LEN..icv_start])
                    .map_err(|_| EspError::Cipher)?;
                // Encrypt, then the ICV over SPI | Seq | IV | ciphertext (RFC 4303 §3.3.2.1
                // steps 3 and 4).
                let mut hi = [0; 4];
                let (signed, icv) = out.split_at_mut(icv_start);
                integ
                    .sign_parts_into(&[signed, esn_trailer(seq, self.esn, &mut hi)], icv)
                    .map_err(|_| EspError::Cipher)?;
            }
        }
        Ok(len)
    }
}

/// The receiving half of a CHILD SA.
#[derive(Debug)]
pub struct Inbound {
    spi: u32,
    key: OpenKey,
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
            key: OpenKey::Aead(key),
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
        let key = match checked_integrity(encryption, integrity, keys)? {
            Some(integ) => OpenKey::Cbc(Box::new(CbcHmac {
                cipher: CbcDecryptingKey::new(encryption, keys.encr.expose())?,
                integ,
            })),
            None => OpenKey::Aead(AeadKey::from_direction(encryption, keys)?),
        };
        Ok(Self {
            spi,
            key,
            esn,
            replay: ReplayWindow::new(replay_window, esn),
        })
    }

    /// Our SPI, which the peer puts in its packets.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Carries on an SA taken over from another process, which accepted sequence numbers up
    /// to `top` ([`ReplayWindow::resume_at`]).
    #[must_use]
    pub fn resume_at(mut self, top: u64) -> Self {
        self.replay.resume_at(top);
        self
    }

    /// The replay window's state (highest sequence number seen).
    pub fn replay(&self) -> &ReplayWindow {
        &self.replay
    }

    /// Verifies and decrypts `packet` (from the SPI on) in place. Replays are refused before
    /// any cryptography; nothing is decrypted before the ICV verified; the window moves only
    /// after the ICV and the padding checked out.
    pub fn open(&mut self, packet: &mut [u8]) -> Result<Opened, EspError> {
        let Self {
            spi,
            key,
            esn,
            replay,
        } = self;
        open_with(*spi, key, *esn, replay, packet)
    }

    /// Shares the SA among workers: see [`SharedInbound`].
    pub fn into_shared(self) -> SharedInbound {
        SharedInbound {
            spi: self.spi,
            key: self.key,
            esn: self.esn,
            replay: std::sync::Mutex::new(self.replay),
        }
    }
}

/// The receiving half of a CHILD SA that several workers open packets of at once. The keys are
/// read by all of them with no lock; only the anti-replay window is behind one, taken twice
/// per packet for a few instructions (the check before the cryptography, the update after),
/// never across the cryptography: a lock held for a whole AEAD open serialises the workers on
/// one busy SA. Two workers opening the same sequence number both pass the first check, and
/// the second update refuses one of them as a replay, as one worker would.
#[derive(Debug)]
pub struct SharedInbound {
    spi: u32,
    key: OpenKey,
    esn: bool,
    replay: std::sync::Mutex<ReplayWindow>,
}

impl SharedInbound {
    /// Our SPI, which the peer puts in its packets.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The longest inner packet the peer can send in an ESP packet of at most `max_sealed`
    /// bytes (both directions of an SA use one transform).
    pub fn max_inner_len(&self, max_sealed: usize) -> usize {
        self.key.framing().max_inner_len(max_sealed)
    }

    /// As [`Inbound::open`].
    pub fn open(&self, packet: &mut [u8]) -> Result<Opened, EspError> {
        open_with(self.spi, &self.key, self.esn, &mut &self.replay, packet)
    }
}

/// Where [`open_with`] finds the window: owned, or behind a lock (a worker that panicked
/// while holding it left a consistent window behind: a check only reads it, and an update
/// is one call).
trait Window {
    /// The full sequence number of `low`, checked (not yet accepted).
    fn infer_and_check(&mut self, low: u32) -> Result<u64, Refused>;
    fn accept(&mut self, seq: u64) -> Result<(), Refused>;
}

impl Window for ReplayWindow {
    fn infer_and_check(&mut self, low: u32) -> Result<u64, Refused> {
        let seq = self.infer(low);
        self.check(seq).map(|()| seq)
    }
    fn accept(&mut self, seq: u64) -> Result<(), Refused> {
        Self::accept(self, seq)
    }
}

impl Window for &std::sync::Mutex<ReplayWindow> {
    fn infer_and_check(&mut self, low: u32) -> Result<u64, Refused> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .infer_and_check(low)
    }
    fn accept(&mut self, seq: u64) -> Result<(), Refused> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .accept(seq)
    }
}

fn open_with(
    spi: u32,
    key: &OpenKey,
    esn: bool,
    window: &mut impl Window,
    packet: &mut [u8],
) -> Result<Opened, EspError> {
    let f = key.framing();
    if packet.len() < f.min_len() {
        return Err(EspError::Truncated);
    }
    let Some((&[s0, s1, s2, s3, q0, q1, q2, q3], _)) = packet.split_first_chunk::<HEADER_LEN>() else {
        return Err(EspError::Truncated);
    };
    if u32::from_be_bytes([s0, s1, s2, s3]) != spi {
        return Err(EspError::WrongSpi);
    }
    // RFC 4303 §3.4.3: the duplicate check "SHOULD be the first ESP check applied to a
    // packet after it has been matched to an SA, to speed rejection of duplicate
    // packets". It only reads the window: "The receive window is updated only if the
    // integrity verification succeeds."
    let seq = window.infer_and_check(u32::from_be_bytes([q0, q1, q2, q3]))?;
    let body_start = f.body_start();
    // `min_len` covers header, IV and ICV, so neither subtraction nor split can fail;
    // they still answer with an error rather than a panic.
    let icv_start = packet.len().checked_sub(f.icv_len).ok_or(EspError::Truncated)?;
    let body_end = match key {
        OpenKey::Aead(key) => {
            let iv: [u8; IV_LEN] = packet
                .get(HEADER_LEN..body_start)
                .and_then(|b| b.try_into().ok())
                .ok_or(EspError::Truncated)?;
            let (aad, aad_len) = esp_aad(spi, seq, esn);
            let body = packet.get_mut(body_start..).ok_or(EspError::Truncated)?;
            let plain = key
                .open_in_place(&iv, &aad[..aad_len], body)
                .map_err(|_| EspError::IcvMismatch)?;
            body_start + plain.len()
        }
        OpenKey::Cbc(k) => {
            let CbcHmac { cipher, integ } = &**k;
            let encrypted = icv_start.checked_sub(body_start).ok_or(EspError::Truncated)?;
            if !encrypted.is_multiple_of(BLOCK_LEN) {
                return Err(EspError::Malformed);
            }
            let (signed, icv) = packet.split_at_checked(icv_start).ok_or(EspError::Truncated)?;
            let mut hi = [0; 4];
            // Integrity before decryption (RFC 4303 §3.4.4.1 step 1, then step 2): nothing
            // unauthenticated reaches the cipher or the padding check, so neither can
            // become an oracle. The comparison is constant-time.
            integ
                .verify_parts(&[signed, esn_trailer(seq, esn, &mut hi)], icv)
                .map_err(|_| EspError::IcvMismatch)?;
            let iv: [u8; BLOCK_LEN] = packet
                .get(HEADER_LEN..body_start)
                .and_then(|b| b.try_into().ok())
                .ok_or(EspError::Truncated)?;
            let body = packet.get_mut(body_start..icv_start).ok_or(EspError::Truncated)?;
            cipher.decrypt_in_place(&iv, body).map_err(|_| EspError::Cipher)?;
            icv_start
        }
    };
    let plain = packet.get(body_start..body_end).ok_or(EspError::Truncated)?;
    let (inner_len, next_header) = strip_trailer(plain)?;
    window.accept(seq)?;
    if next_header == NEXT_HEADER_NONE {
        return Err(EspError::Dummy);
    }
    Ok(Opened {
        inner: body_start..body_start + inner_len,
        next_header,
        seq,
    })
}

/// Splits decrypted `inner | padding | pad length | next header`: the inner length and the
/// next header, after checking the padding.
fn strip_trailer(plain: &[u8]) -> Result<(usize, u8), EspError> {
    let [rest @ .., pad, next_header] = plain else {
        return Err(EspError::Truncated);
    };
    let inner_len = rest
        .len()
        .checked_sub(usize::from(*pad))
        .ok_or(EspError::BadPadding)?;
    let padding = rest.get(inner_len..).ok_or(EspError::BadPadding)?;
    // RFC 4303 §3.4.4.1: "If the default padding scheme (see Section 2.4) has been employed,
    // the receiver SHOULD inspect the Padding field before removing the padding". None of
    // our ciphers' RFCs specifies padding contents, so the default scheme is in use.
    if padding.iter().enumerate().any(|(i, &b)| b != (i + 1) as u8) {
        return Err(EspError::BadPadding);
    }
    Ok((inner_len, *next_header))
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
    use aws_lc_rs::hmac;
    use concentrator_crypto::prf::integ_key_len;
    use concentrator_crypto::{ChildSaKeys, Prf, PrfAlg, SecretBytes};

    use super::*;

    const KEYMAT_128: [u8; 20] = [7; 20];
    const SPI: u32 = 0x1234_5678;
    const CBC_128: Encryption = Encryption::AesCbc { key_bits: 128 };
    const CBC_256: Encryption = Encryption::AesCbc { key_bits: 256 };
    const INTEGS: [Integrity; 3] = [
        Integrity::HmacSha256_128,
        Integrity::HmacSha384_192,
        Integrity::HmacSha512_256,
    ];

    fn pair(enc: Encryption, keymat: &[u8], esn: bool) -> (Outbound, Inbound) {
        let out = Outbound::new(SPI, AeadKey::new(enc, keymat).unwrap(), esn);
        let inb = Inbound::new(SPI, AeadKey::new(enc, keymat).unwrap(), esn, 4096);
        (out, inb)
    }

    fn ipv4(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7) as u8).collect()
    }

    /// Fixed keys of one direction: cipher key 0x11.., salt 0x33.. (AEAD) or integrity key
    /// 0x22.. (CBC).
    fn direction_keys(enc: Encryption, integ: Option<Integrity>) -> DirectionKeys {
        let k = enc.key_bits().map_or(32, |b| usize::from(b) / 8);
        DirectionKeys {
            encr: SecretBytes::from_slice(&vec![0x11; k]),
            salt: SecretBytes::from_slice(if enc.is_aead() { &[0x33; 4] } else { &[] }),
            integ: SecretBytes::from_slice(&vec![0x22; integ.map_or(0, integ_key_len)]),
        }
    }

    /// Every supported transform: the three AEADs and AES-CBC-128/256 with each HMAC.
    fn every_transform() -> Vec<(Encryption, Option<Integrity>)> {
        let mut v = vec![
            (Encryption::AesGcm16 { key_bits: 128 }, None),
            (Encryption::AesGcm16 { key_bits: 256 }, None),
            (Encryption::ChaCha20Poly1305, None),
        ];
        for enc in [CBC_128, CBC_256] {
            v.extend(INTEGS.map(|i| (enc, Some(i))));
        }
        v
    }

    fn keyed_pair(enc: Encryption, integ: Option<Integrity>, esn: bool, window: u32) -> (Outbound, Inbound) {
        let keys = direction_keys(enc, integ);
        (
            Outbound::from_keys(SPI, enc, integ, &keys, esn).unwrap(),
            Inbound::from_keys(SPI, enc, integ, &keys, esn, window).unwrap(),
        )
    }

    fn sealed(tx: &Outbound, inner: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; sealed_len(inner.len())];
        let n = tx.seal(inner, 4, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_shared_sa_opens_each_packet_exactly_once_whatever_the_workers() {
        for (enc, integ) in every_transform() {
            let (tx, rx) = keyed_pair(enc, integ, true, 4096);
            let rx = rx.into_shared();
            let inner = ipv4(100);
            let packets: Vec<Vec<u8>> = (0..1000)
                .map(|_| {
                    let mut buf = vec![0u8; inner.len() + 256];
                    let n = tx.seal(&inner, 4, &mut buf).unwrap();
                    buf.truncate(n);
                    buf
                })
                .collect();
            // Each packet reaches two of four workers at once: one opens it, the other is
            // refused as a replay.
            let (opened, replayed) = (AtomicU64::new(0), AtomicU64::new(0));
            std::thread::scope(|s| {
                for t in 0..4 {
                    let (rx, packets, inner) = (&rx, &packets, &inner);
                    let (opened, replayed) = (&opened, &replayed);
                    s.spawn(move || {
                        for p in packets.iter().skip(t % 2).step_by(2) {
                            let mut b = p.clone();
                            match rx.open(&mut b) {
                                Ok(o) => {
                                    assert_eq!(&b[o.inner], &inner[..]);
                                    opened.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(EspError::Replayed) => {
                                    replayed.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => panic!("{enc:?}/{integ:?}: {e:?}"),
                            }
                        }
                    });
                }
            });
            assert_eq!(
                (opened.into_inner(), replayed.into_inner()),
                (1000, 1000),
                "{enc:?}/{integ:?}"
            );
        }
    }

    /// An ESP packet built from the RFCs with aws-lc-rs alone, sharing no code with
    /// `Outbound::seal`: IV = AES-ECB(seq || 0^64), AES-CBC of `plain` (caller-padded),
    /// ICV = HMAC-SHA2(SPI | seq | IV | ciphertext [| seq_hi]) truncated to half.
    fn independent_cbc_packet(
        enc: Encryption,
        integ: Integrity,
        keys: &DirectionKeys,
        seq: u64,
        esn: bool,
        plain: &[u8],
    ) -> Vec<u8> {
        let alg = if enc == CBC_128 { &AES_128 } else { &AES_256 };
        let ecb = EncryptingKey::ecb(UnboundCipherKey::new(alg, keys.encr.expose()).unwrap()).unwrap();
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&seq.to_be_bytes());
        ecb.encrypt(&mut iv).unwrap();
        let cbc = EncryptingKey::cbc(UnboundCipherKey::new(alg, keys.encr.expose()).unwrap()).unwrap();
        let mut ct = plain.to_vec();
        cbc.less_safe_encrypt(&mut ct, EncryptionContext::Iv128(iv.into()))
            .unwrap();
        let mut p = [&SPI.to_be_bytes()[..], &(seq as u32).to_be_bytes(), &iv, &ct].concat();
        let h = match integ {
            Integrity::HmacSha256_128 => hmac::HMAC_SHA256,
            Integrity::HmacSha384_192 => hmac::HMAC_SHA384,
            Integrity::HmacSha512_256 => hmac::HMAC_SHA512,
        };
        let mut signed = p.clone();
        if esn {
            signed.extend_from_slice(&((seq >> 32) as u32).to_be_bytes());
        }
        let tag = hmac::sign(&hmac::Key::new(h, keys.integ.expose()), &signed);
        p.extend_from_slice(&tag.as_ref()[..tag.as_ref().len() / 2]);
        p
    }

    #[test]
    fn round_trips_every_length_and_cipher() {
        for (enc, keymat) in [
            (Encryption::AesGcm16 { key_bits: 128 }, vec![1u8; 20]),
            (Encryption::AesGcm16 { key_bits: 256 }, vec![2u8; 36]),
            (Encryption::ChaCha20Poly1305, vec![3u8; 36]),
        ] {
            for esn in [false, true] {
                let (tx, mut rx) = pair(enc, &keymat, esn);
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
    fn the_ceiling_stops_sending_until_raised_and_a_taker_resumes_above_it() {
        let (tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let counter = tx.counter();
        counter.set_ceiling(3);
        for _ in 0..3 {
            let mut p = sealed(&tx, &ipv4(10));
            rx.open(&mut p).unwrap();
        }
        let mut buf = vec![0u8; sealed_len(10)];
        assert_eq!(tx.seal(&ipv4(10), 4, &mut buf), Err(EspError::SequenceCeiling));
        assert_eq!(counter.last(), 3, "a refused packet takes no number");
        counter.set_ceiling(10);
        assert_eq!(
            u32::from_be_bytes(sealed(&tx, &ipv4(10))[4..8].try_into().unwrap()),
            4
        );
        // The pod that takes the SA over starts above the ceiling, and its receiving half
        // refuses what the old owner's peer had already sent.
        let (taken, _) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let taken = taken.resume_after(counter.ceiling());
        let mut p = sealed(&taken, &ipv4(10));
        assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 11);
        let (_, rx2) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut rx2 = rx2.resume_at(11);
        assert_eq!(rx2.open(&mut p), Err(EspError::Replayed));
    }

    #[test]
    fn workers_sealing_on_one_sa_never_share_a_sequence_number() {
        let (tx, _) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let per_thread = 2000;
        let packets: Vec<Vec<u8>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..per_thread)
                            .map(|_| sealed(&tx, &ipv4(100)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        let mut seqs: Vec<u32> = packets
            .iter()
            .map(|p| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 4 * per_thread, "every packet its own sequence number");
        assert_eq!(tx.last_seq(), 4 * per_thread as u64);
        // In any order within the window, the receiver takes every one.
        let mut rx_big = Inbound::new(
            SPI,
            AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128).unwrap(),
            false,
            65536,
        );
        for mut p in packets {
            rx_big.open(&mut p).unwrap();
        }
    }

    #[test]
    fn max_inner_len_is_the_longest_packet_that_fits() {
        for (enc, integ) in every_transform() {
            let (tx, _) = keyed_pair(enc, integ, false, 64);
            for budget in [100, 1171, 1172, 1173, 1174, 1175, 1400, 1472] {
                let n = tx.max_inner_len(budget);
                assert!(tx.sealed_len(n) <= budget, "{enc:?}/{integ:?} {budget}");
                assert!(tx.sealed_len(n + 1) > budget, "{enc:?}/{integ:?} {budget}");
            }
            assert_eq!(tx.max_inner_len(10), 0, "nothing fits");
        }
        // AES-GCM over a 1200-byte IPv4 path: 1172 bytes of ESP carry 1138 (the e2e test's
        // expectation).
        let (tx, _) = keyed_pair(Encryption::AesGcm16 { key_bits: 128 }, None, false, 64);
        assert_eq!(tx.max_inner_len(1200 - 28), 1138);
    }

    #[test]
    fn round_trips_every_transform_with_from_keys() {
        for (enc, integ) in every_transform() {
            for esn in [false, true] {
                let (tx, mut rx) = keyed_pair(enc, integ, esn, 64);
                assert!(tx.overhead() <= MAX_OVERHEAD);
                for len in (0..=33).chain([1399, 1400, 9000]) {
                    let inner = ipv4(len);
                    let n = tx.sealed_len(len);
                    assert!(
                        n <= sealed_len(len),
                        "the free sealed_len bounds {enc:?}/{integ:?}"
                    );
                    assert!(n <= len + tx.overhead());
                    let mut buf = vec![0u8; n];
                    assert_eq!(tx.seal(&inner, 41, &mut buf), Ok(n));
                    assert_eq!(n % 4, 0, "ESP packets are 4-byte aligned");
                    if let Some(i) = integ {
                        let encrypted = n - HEADER_LEN - BLOCK_LEN - integ_icv_len(i);
                        assert_eq!(encrypted % BLOCK_LEN, 0, "CBC encrypts whole blocks");
                        assert!(encrypted - (len + 2) < BLOCK_LEN, "minimum padding");
                    }
                    let o = rx.open(&mut buf).unwrap();
                    assert_eq!(
                        &buf[o.inner.clone()],
                        &inner[..],
                        "{enc:?}/{integ:?} esn={esn} len={len}"
                    );
                    assert_eq!(o.next_header, 41);
                    assert_eq!(o.seq, tx.last_seq());
                }
            }
        }
    }

    #[test]
    fn cbc_packets_match_an_independent_construction() {
        for enc in [CBC_128, CBC_256] {
            for integ in INTEGS {
                for (esn, last) in [(false, 0), (false, 41), (true, 0), (true, 0x1_0000_0004)] {
                    let keys = direction_keys(enc, Some(integ));
                    let tx = Outbound::from_keys(SPI, enc, Some(integ), &keys, esn)
                        .unwrap()
                        .resume_after(last);
                    let inner = ipv4(37);
                    let got = sealed(&tx, &inner);
                    // 37 + 9 padding + 2 = 48: three blocks.
                    let plain = [&inner[..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 4]].concat();
                    let want = independent_cbc_packet(enc, integ, &keys, last + 1, esn, &plain);
                    assert_eq!(got, want, "{enc:?} {integ:?} esn={esn} seq={}", last + 1);
                }
            }
        }
    }

    #[test]
    fn cbc_ivs_are_fresh_per_packet() {
        let (tx, _) = keyed_pair(CBC_128, Some(Integrity::HmacSha256_128), false, 64);
        let a = sealed(&tx, &ipv4(64));
        let b = sealed(&tx, &ipv4(64));
        let iv = |p: &[u8]| p[HEADER_LEN..HEADER_LEN + BLOCK_LEN].to_vec();
        assert_ne!(iv(&a), iv(&b));
        assert_ne!(
            &iv(&a)[..8],
            &1u64.to_be_bytes(),
            "the IV is not the bare counter"
        );
        assert_ne!(a[HEADER_LEN + BLOCK_LEN..], b[HEADER_LEN + BLOCK_LEN..]);
    }

    #[test]
    fn cbc_tampering_with_any_field_is_refused_without_moving_the_window() {
        for enc in [CBC_128, CBC_256] {
            for integ in INTEGS {
                let (tx, mut rx) = keyed_pair(enc, Some(integ), true, 64);
                let p = sealed(&tx, &ipv4(50));
                let icv = p.len() - integ_icv_len(integ);
                let body = HEADER_LEN + BLOCK_LEN;
                for (at, field, want) in [
                    (0, "SPI", EspError::WrongSpi),
                    // Seq 1 becomes 3: inside the window, so the ICV is what refuses it.
                    (7, "seq", EspError::IcvMismatch),
                    (HEADER_LEN + 3, "IV", EspError::IcvMismatch),
                    (body + 5, "ciphertext", EspError::IcvMismatch),
                    (icv - 1, "last ciphertext byte", EspError::IcvMismatch),
                    (icv, "ICV", EspError::IcvMismatch),
                    (p.len() - 1, "ICV end", EspError::IcvMismatch),
                ] {
                    let mut forged = p.clone();
                    forged[at] ^= 2;
                    assert_eq!(rx.open(&mut forged), Err(want), "{integ:?}: {field}");
                    assert_eq!(rx.replay().top(), 0, "{field}: window untouched");
                }
                let mut genuine = p.clone();
                assert_eq!(rx.open(&mut genuine).map(|o| o.seq), Ok(1));
            }
        }
    }

    #[test]
    fn refuses_every_single_bit_flip() {
        for (enc, integ) in every_transform() {
            let (tx, mut rx) = keyed_pair(enc, integ, false, 64);
            let p = sealed(&tx, &ipv4(60));
            for byte in 0..p.len() {
                for bit in 0..8 {
                    let mut f = p.clone();
                    f[byte] ^= 1 << bit;
                    let r = rx.open(&mut f);
                    assert!(
                        r.is_err(),
                        "{enc:?}/{integ:?}: flip at byte {byte} bit {bit} accepted"
                    );
                }
            }
            // The untouched packet still opens: failed attempts did not move the window.
            assert_eq!(rx.replay().top(), 0);
            assert!(rx.open(&mut p.clone()).is_ok());
        }
    }

    #[test]
    fn cbc_refuses_replayed_and_old_packets() {
        let (tx, mut rx) = keyed_pair(CBC_256, Some(Integrity::HmacSha384_192), false, 64);
        let first = sealed(&tx, &ipv4(100));
        assert!(rx.open(&mut first.clone()).is_ok());
        assert_eq!(rx.open(&mut first.clone()), Err(EspError::Replayed));
        let mut last = Vec::new();
        for _ in 0..200 {
            last = sealed(&tx, &ipv4(10));
        }
        assert!(rx.open(&mut last).is_ok());
        assert_eq!(rx.open(&mut first.clone()), Err(EspError::TooOld));
    }

    #[test]
    fn cbc_esn_packets_open_across_the_32_bit_wrap() {
        for integ in INTEGS {
            let keys = direction_keys(CBC_128, Some(integ));
            let tx = Outbound::from_keys(5, CBC_128, Some(integ), &keys, true)
                .unwrap()
                .resume_after(0xffff_fffd);
            let mut rx = Inbound::from_keys(5, CBC_128, Some(integ), &keys, true, 64).unwrap();
            for _ in 0..6 {
                let mut p = sealed(&tx, &ipv4(30));
                assert_eq!(rx.open(&mut p).map(|o| o.seq), Ok(tx.last_seq()));
            }
            assert!(tx.last_seq() > u64::from(u32::MAX));
        }
    }

    #[test]
    fn esn_high_bits_are_authenticated_though_not_sent() {
        let integ = Some(Integrity::HmacSha256_128);
        let keys = direction_keys(CBC_128, integ);
        // Sent as low half 5 in subspace 1; a fresh receiver infers subspace 0.
        let tx = Outbound::from_keys(SPI, CBC_128, integ, &keys, true)
            .unwrap()
            .resume_after(0x1_0000_0004);
        let mut rx = Inbound::from_keys(SPI, CBC_128, integ, &keys, true, 64).unwrap();
        assert_eq!(rx.open(&mut sealed(&tx, &ipv4(30))), Err(EspError::IcvMismatch));
        // ESN on one side only: four zero bytes are still part of the ICV input.
        let (tx, _) = keyed_pair(CBC_128, integ, true, 64);
        let mut rx = Inbound::from_keys(SPI, CBC_128, integ, &keys, false, 64).unwrap();
        assert_eq!(rx.open(&mut sealed(&tx, &ipv4(30))), Err(EspError::IcvMismatch));
        assert_eq!(rx.replay().top(), 0);
    }

    #[test]
    fn cbc_refuses_bad_padding_under_a_valid_icv() {
        let integ = Integrity::HmacSha512_256;
        let keys = direction_keys(CBC_256, Some(integ));
        // 21 + 9 padding + pad length + next header = 32: two blocks.
        let inner = ipv4(21);
        let good = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        for (padding, pad_len, what) in [
            ([1, 2, 3, 4, 5, 6, 7, 9, 9], 9, "a wrong padding byte"),
            ([0; 9], 9, "zero padding"),
            (good, 200, "a pad length past the start"),
            (good, 30, "a pad length into the inner packet"),
        ] {
            let plain = [&inner[..], &padding, &[pad_len, 4]].concat();
            let mut p = independent_cbc_packet(CBC_256, integ, &keys, 1, false, &plain);
            let mut rx = Inbound::from_keys(SPI, CBC_256, Some(integ), &keys, false, 64).unwrap();
            assert_eq!(rx.open(&mut p), Err(EspError::BadPadding), "{what}");
            assert_eq!(rx.replay().top(), 0, "{what}: window untouched");
        }
        // The same construction with the default padding opens: the builder is sound.
        let plain = [&inner[..], &good, &[9, 4]].concat();
        let mut p = independent_cbc_packet(CBC_256, integ, &keys, 1, false, &plain);
        let mut rx = Inbound::from_keys(SPI, CBC_256, Some(integ), &keys, false, 64).unwrap();
        let o = rx.open(&mut p).unwrap();
        assert_eq!(&p[o.inner], &inner[..]);
        // More padding than needed (RFC 4303 §2.4 allows up to 255 bytes), in the same series.
        let plain = [&inner[..], &(1..=25).collect::<Vec<u8>>(), &[25, 4]].concat();
        let mut p = independent_cbc_packet(CBC_256, integ, &keys, 2, false, &plain);
        let o = rx.open(&mut p).unwrap();
        assert_eq!(&p[o.inner], &inner[..]);
    }

    #[test]
    fn cbc_refuses_short_and_misaligned_packets() {
        let integ = Integrity::HmacSha256_128;
        let (tx, mut rx) = keyed_pair(CBC_128, Some(integ), false, 64);
        let min = HEADER_LEN + BLOCK_LEN + BLOCK_LEN + integ_icv_len(integ);
        let mut p = sealed(&tx, &[]);
        assert_eq!(p.len(), min, "an empty inner packet fills one block");
        assert_eq!(rx.open(&mut p[..min - 1].to_vec()), Err(EspError::Truncated));
        let mut spi_only = SPI.to_be_bytes();
        assert_eq!(rx.open(&mut spi_only), Err(EspError::Truncated));
        // One byte more than a whole number of blocks, with the ICV at the end.
        let mut long = sealed(&tx, &ipv4(40));
        long.insert(HEADER_LEN + BLOCK_LEN, 0);
        assert_eq!(rx.open(&mut long), Err(EspError::Malformed));
        assert_eq!(tx.seal(&ipv4(100), 4, &mut [0u8; 100]), Err(EspError::Truncated));
        // A dummy packet passes the ICV, moves the window, and is dropped.
        let mut dummy = vec![0u8; tx.sealed_len(0)];
        let n = tx.seal(&[], NEXT_HEADER_NONE, &mut dummy).unwrap();
        assert_eq!(rx.open(&mut dummy[..n]), Err(EspError::Dummy));
        assert_eq!(
            rx.open(&mut p),
            Ok(Opened {
                inner: 24..24,
                next_header: 4,
                seq: 1
            })
        );
    }

    #[test]
    fn from_keys_round_trips_derived_child_sa_keys() {
        for (enc, integ) in every_transform() {
            let prf = Prf::new(PrfAlg::HmacSha256);
            let keys = ChildSaKeys::derive(prf, &[1; 32], None, &[2; 32], &[3; 32], enc, integ).unwrap();
            let tx = Outbound::from_keys(9, enc, integ, &keys.initiator, true).unwrap();
            let mut rx = Inbound::from_keys(9, enc, integ, &keys.initiator, true, 64).unwrap();
            let mut p = sealed(&tx, &ipv4(50));
            let o = rx.open(&mut p).unwrap();
            assert_eq!(&p[o.inner], &ipv4(50)[..], "{enc:?}");
            // The other direction's keys do not open it.
            let mut rx = Inbound::from_keys(9, enc, integ, &keys.responder, true, 64).unwrap();
            let mut p = sealed(&tx, &ipv4(50));
            assert_eq!(rx.open(&mut p), Err(EspError::IcvMismatch));
        }
    }

    #[test]
    fn from_keys_rejects_mismatched_transforms_and_keys() {
        let gcm = Encryption::AesGcm16 { key_bits: 128 };
        let sha = Some(Integrity::HmacSha256_128);
        let unsupported = |r: Result<Outbound, CryptoError>| matches!(r, Err(CryptoError::Unsupported(_)));
        let wrong_len = |r: Result<Inbound, CryptoError>| matches!(r, Err(CryptoError::KeyLength { .. }));
        let cbc_keys = direction_keys(CBC_128, sha);
        assert!(unsupported(Outbound::from_keys(
            1, CBC_128, None, &cbc_keys, false
        )));
        assert!(unsupported(Outbound::from_keys(
            1,
            gcm,
            sha,
            &direction_keys(gcm, None),
            false
        )));
        assert!(unsupported(Outbound::from_keys(
            1,
            Encryption::AesCbc { key_bits: 192 },
            sha,
            &cbc_keys,
            false
        )));
        let mut k = direction_keys(CBC_128, sha);
        k.salt = SecretBytes::from_slice(&[0; 4]);
        assert!(wrong_len(Inbound::from_keys(1, CBC_128, sha, &k, false, 64)));
        assert!(wrong_len(Inbound::from_keys(
            1, CBC_256, sha, &cbc_keys, false, 64
        )));
        assert!(wrong_len(Inbound::from_keys(
            1,
            CBC_128,
            Some(Integrity::HmacSha512_256),
            &cbc_keys,
            false,
            64
        )));
        let mut k = direction_keys(gcm, None);
        k.integ = SecretBytes::from_slice(&[0; 32]);
        assert!(wrong_len(Inbound::from_keys(1, gcm, None, &k, false, 64)));
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        for (enc, integ) in every_transform() {
            let mut keys = direction_keys(enc, integ);
            keys.encr = SecretBytes::from_slice(&vec![0xab; keys.encr.len()]);
            keys.integ = SecretBytes::from_slice(&vec![0xab; keys.integ.len()]);
            let tx = Outbound::from_keys(1, enc, integ, &keys, false).unwrap();
            let rx = Inbound::from_keys(1, enc, integ, &keys, false, 64).unwrap();
            let dbg = format!("{tx:?} {rx:?} {tx:#?}");
            assert!(
                !dbg.contains("171") && !dbg.to_lowercase().contains("ab, "),
                "{dbg}"
            );
        }
    }

    #[test]
    fn arbitrary_input_is_refused_without_panicking() {
        // A cheap stand-in for the fuzz target (which covers the AEAD path): every transform,
        // every length up to a few blocks past the minimum, pseudo-random bytes with our SPI
        // and a sequence number inside the window, plus every truncation of a genuine packet.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for (enc, integ) in every_transform() {
            for esn in [false, true] {
                let (tx, mut rx) = keyed_pair(enc, integ, esn, 64);
                for len in 0..120 {
                    let mut p: Vec<u8> = (0..len).map(|_| next()).collect();
                    if len >= HEADER_LEN {
                        p[..4].copy_from_slice(&SPI.to_be_bytes());
                        p[4..8].copy_from_slice(&[0, 0, 0, 1 + next() % 60]);
                    }
                    let r = rx.open(&mut p);
                    assert!(r.is_err(), "{enc:?}/{integ:?}: random {len} bytes accepted");
                }
                let genuine = sealed(&tx, &ipv4(45));
                for cut in 0..genuine.len() {
                    assert!(rx.open(&mut genuine[..cut].to_vec()).is_err());
                }
                assert_eq!(rx.replay().top(), 0);
                assert!(rx.open(&mut genuine.clone()).is_ok());
            }
        }
    }

    #[test]
    fn security_associations_can_move_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Outbound>();
        shareable::<Inbound>();
    }

    #[test]
    fn resume_after_never_moves_the_counter_back() {
        let (tx, _) = keyed_pair(CBC_128, Some(Integrity::HmacSha256_128), false, 64);
        let tx = tx.resume_after(100).resume_after(50);
        assert_eq!(tx.last_seq(), 100);
    }

    #[test]
    fn refuses_a_replayed_packet() {
        let (tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut buf = vec![0u8; 200];
        let n = tx.seal(&ipv4(100), 4, &mut buf).unwrap();
        let copy = buf[..n].to_vec();
        rx.open(&mut buf[..n]).unwrap();
        let mut again = copy.clone();
        assert_eq!(rx.open(&mut again), Err(EspError::Replayed));
    }

    #[test]
    fn a_tampered_packet_does_not_poison_the_window() {
        let (tx, mut rx) = pair(Encryption::ChaCha20Poly1305, &[9u8; 36], false);
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
        let (tx, mut rx) = pair(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128, false);
        let mut buf = vec![0u8; 100];
        let n = tx.seal(&[], NEXT_HEADER_NONE, &mut buf).unwrap();
        assert_eq!(rx.open(&mut buf[..n]), Err(EspError::Dummy));
        assert_eq!(rx.open(&mut [0u8; OVERHEAD - 1]), Err(EspError::Truncated));
        assert_eq!(tx.seal(&ipv4(100), 4, &mut [0u8; 50]), Err(EspError::Truncated));
    }

    #[test]
    fn refuses_to_cycle_the_sequence_number() {
        let key = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &KEYMAT_128).unwrap();
        let tx = Outbound::resume(1, key, false, u64::from(u32::MAX) - 1);
        let mut buf = vec![0u8; 100];
        assert!(tx.seal(&ipv4(10), 4, &mut buf).is_ok());
        assert_eq!(tx.seal(&ipv4(10), 4, &mut buf), Err(EspError::SequenceExhausted));
        let (tx, _) = keyed_pair(CBC_128, Some(Integrity::HmacSha256_128), false, 64);
        let tx = tx.resume_after(u64::from(u32::MAX));
        assert_eq!(tx.seal(&ipv4(10), 4, &mut buf), Err(EspError::SequenceExhausted));
    }

    #[test]
    fn esn_packets_open_across_the_32_bit_wrap() {
        let enc = Encryption::AesGcm16 { key_bits: 128 };
        let tx = Outbound::resume(5, AeadKey::new(enc, &KEYMAT_128).unwrap(), true, 0xffff_fffd);
        let mut rx = Inbound::new(5, AeadKey::new(enc, &KEYMAT_128).unwrap(), true, 64);
        let mut buf = vec![0u8; 200];
        for _ in 0..6 {
            let n = tx.seal(&ipv4(30), 4, &mut buf).unwrap();
            let o = rx.open(&mut buf[..n]).unwrap();
            assert_eq!(o.seq, tx.last_seq());
        }
        assert!(tx.last_seq() > u64::from(u32::MAX));
    }

    #[test]
    fn max_icv_len_covers_every_integrity_transform() {
        assert!(INTEGS.iter().all(|&i| integ_icv_len(i) <= MAX_ICV_LEN));
    }
}
