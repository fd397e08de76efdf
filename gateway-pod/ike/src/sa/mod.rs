//! What both roles of an IKE SA share: the IKE SA's keys and message-ID windows
//! (`session`), the established phase once for both roles (`established`, with the peer's
//! INFORMATIONAL requests parsed in `informational`, CREATE_CHILD_SA in `create_child`,
//! rekeys this side starts in `rekey`), its timers (`timers`), what an SA hands out
//! (`events`: datagrams and events), the [`snapshot`], and the types both roles report and
//! take: [`Retransmit`], [`Entropy`], [`Transmit`], [`ChildSa`], [`DeleteReason`],
//! [`IdBuf`].

mod config;
pub(crate) mod create_child;
pub(crate) mod established;
mod event;
pub(crate) mod events;
pub(crate) mod informational;
pub(crate) mod mid_sync;
pub(crate) mod rekey;
pub(crate) mod session;
pub mod snapshot;
pub(crate) mod timers;

pub use self::config::{Config, NatTraversal};
pub use self::event::Event;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use concentrator_algorithms::{DhGroup, Encryption, Esn, Integrity};
use concentrator_crypto::{CryptoError, DirectionKeys, KeyExchange};

use crate::message::codepoints::IdType;
use crate::message::header::Header;
use crate::payload::{Identity, TrafficSelector};

/// Length of our nonces: 32 bytes, at least half the key size of every PRF we negotiate
/// (RFC 7296 §2.10: "Nonces used in IKEv2 MUST be randomly chosen, MUST be at least 128 bits
/// in size, and MUST be at least half the key size of the negotiated pseudorandom function").
pub const NONCE_LEN: usize = 32;

/// Lifetime of a CHILD SA when the configuration names none (an eroute's default).
pub const DEFAULT_CHILD_LIFETIME: Duration = Duration::from_secs(3600);

/// How long an IKE SA replaced by a rekey is kept when the peer does not delete it. RFC 7296
/// §2.8 has the initiator delete it right after the rekey, so this only bounds the state a
/// misbehaving (or crashed) peer leaves behind; it is long enough for the peer's
/// retransmissions of that DELETE.
pub const REKEYED_SA_LINGER: Duration = Duration::from_secs(120);

/// Retransmission of the requests this side sends (RFC 7296 §2.1: "the initiator MUST
/// retransmit a request until it either receives a corresponding response or deems the IKE SA
/// to have failed"). The first retransmission follows `timeout` after the request, each next
/// one waits twice as long as the previous, and after `tries` retransmissions the IKE SA is
/// deemed to have failed once the next (doubled) wait has passed too.
///
/// The default, 2 s and 5 tries, retransmits after 2, 6, 14, 30 and 62 s and gives up at
/// 126 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    /// Wait before the first retransmission.
    pub timeout: Duration,
    /// Retransmissions before giving up.
    pub tries: u32,
}

impl Default for Retransmit {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            tries: 5,
        }
    }
}

impl Retransmit {
    /// The wait after the transmission that followed `retransmits` retransmissions:
    /// `timeout * 2^retransmits`, saturating.
    pub fn wait(&self, retransmits: u32) -> Duration {
        self.timeout
            .saturating_mul(1u32.checked_shl(retransmits).unwrap_or(u32::MAX))
    }

    /// How long after the first transmission an unanswered request makes us give up.
    pub fn give_up_after(&self) -> Duration {
        (0..=self.tries).fold(Duration::ZERO, |sum, n| sum.saturating_add(self.wait(n)))
    }
}

/// `now + d` without panicking on overflow (a far-future deadline instead).
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(now)
}

/// An owned ID payload body (ID Type, three RESERVED octets, identification data): exactly
/// the `IDx'` that RFC 7296 §2.15 signs. A boxed slice: every established SA keeps its
/// peer's, with no spare capacity.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdBuf(Box<[u8]>);

impl IdBuf {
    /// The body of `id`.
    pub fn new(id: &Identity<'_>) -> Self {
        let mut body = Vec::new();
        id.encode(&mut body);
        Self(body.into_boxed_slice())
    }

    /// The ID payload body.
    pub fn body(&self) -> &[u8] {
        &self.0
    }

    /// An ID payload body read back (e.g. from a snapshot): `None` unless it decodes.
    pub fn from_body(body: &[u8]) -> Option<Self> {
        Identity::decode(body).ok().map(|id| Self::new(&id))
    }

    /// The identity (decoding cannot fail: the body was encoded or checked on the way in).
    pub fn identity(&self) -> Identity<'_> {
        Identity::decode(&self.0).unwrap_or(Identity::Other {
            id_type: IdType(0),
            data: &[],
        })
    }
}

impl fmt::Display for IdBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.identity().fmt(f)
    }
}

impl fmt::Debug for IdBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdBuf({self})")
    }
}

/// The randomness and key pairs the engine needs, provided by the caller so that tests are
/// deterministic. [`SystemEntropy`] is the production implementation.
pub trait Entropy {
    /// Fills `buf` with random bytes (nonces, SPIs).
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError>;
    /// A fresh ephemeral key pair for `group`.
    fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError>;

    /// Fills `buf` with one of our SPIs: 8 bytes for an IKE SPI, 4 for an inbound ESP SPI;
    /// `near` is our IKE SPI of the IKE SA the new one belongs to (`None` for a new IKE SA).
    /// Random by default; a fleet of gateways writes the shard of the SPI's owner into its
    /// top bits, so that any member routes the SA's packets from the SPI alone, and keeps
    /// every SPI of one IKE SA in one shard (its CHILD SAs, its rekeys), so that the shard
    /// moves, and is taken over, with everything of the IKE SA in it.
    fn spi(&mut self, buf: &mut [u8], near: Option<u64>) -> Result<(), CryptoError> {
        let _ = near;
        self.fill(buf)
    }
}

/// [`Entropy`] from AWS-LC's system random generator.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemEntropy;

impl Entropy for SystemEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CryptoError> {
        concentrator_crypto::util::fill_random(buf)
    }

    fn key_exchange(&mut self, group: DhGroup) -> Result<KeyExchange, CryptoError> {
        KeyExchange::generate(group)
    }
}

/// A datagram as it arrived, its header read once on the way in (by the endpoint or the
/// role) and handed down with it.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// When it arrived.
    pub now: Instant,
    /// Our address it arrived on.
    pub local: SocketAddr,
    /// Where it came from.
    pub remote: SocketAddr,
    /// Its IKE header.
    pub header: Header,
    /// The IKE message (without the non-ESP marker of port 4500).
    pub bytes: &'a [u8],
}

impl<'a> Incoming<'a> {
    /// `bytes` with its header read; `None` when they are too short for one.
    pub fn new(now: Instant, local: SocketAddr, remote: SocketAddr, bytes: &'a [u8]) -> Option<Self> {
        let (header, _) = Header::peek(bytes)?;
        Some(Self {
            now,
            local,
            remote,
            header,
            bytes,
        })
    }
}

/// A datagram to send: IKE bytes (without the 4-octet non-ESP marker of port 4500).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Our address the request arrived on: send from here.
    pub local: SocketAddr,
    /// Where the request came from: send there.
    pub remote: SocketAddr,
    /// The IKE message.
    pub payload: Vec<u8>,
}

/// A negotiated CHILD SA (one inbound and one outbound ESP SA), ready for the data plane.
#[derive(Clone, Debug)]
pub struct ChildSa {
    /// Our SPI: ESP packets from the peer carry it.
    pub spi_in: u32,
    /// The peer's SPI: ESP packets we send carry it.
    pub spi_out: u32,
    /// Encryption.
    pub encryption: Encryption,
    /// Integrity (`None` for AEAD).
    pub integrity: Option<Integrity>,
    /// Extended sequence numbers.
    pub esn: Esn,
    /// Keys of the inbound SA (initiator to responder); zeroized on drop.
    pub inbound: DirectionKeys,
    /// Keys of the outbound SA (responder to initiator); zeroized on drop.
    pub outbound: DirectionKeys,
    /// Our traffic selectors (narrowed TSr).
    pub ts_local: Vec<TrafficSelector<'static>>,
    /// The peer's traffic selectors (narrowed TSi).
    pub ts_remote: Vec<TrafficSelector<'static>>,
    /// Lifetime from the eroute.
    pub lifetime: Duration,
    /// When it was installed.
    pub installed_at: Instant,
    /// ESP in UDP (RFC 3948): a NAT was detected or IKE runs on port 4500.
    pub udp_encap: bool,
    /// For a rekey (RFC 7296 §1.3.3), the `spi_in` of the CHILD SA this one replaces. The old
    /// one stays installed until the peer deletes it (reported deleted): the peer
    /// moves its traffic to the new SA first.
    pub replaces: Option<u32>,
}

/// Why an IKE SA is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeleteReason {
    /// The peer deleted it (an INFORMATIONAL request with a Delete payload for the IKE SA).
    PeerDeleted,
    /// We deleted it ([`crate::Responder::delete`]): evicted, drained, or replaced.
    LocalDeleted,
    /// The peer stopped answering our liveness checks (RFC 7296 §2.4).
    DeadPeer,
    /// The peer redirected us to another gateway (RFC 5685 §5); we deleted the IKE SA.
    Redirected,
}

impl fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerDeleted => "deleted by the peer",
            Self::DeadPeer => "peer did not answer liveness checks",
            Self::LocalDeleted => "deleted by this gateway",
            Self::Redirected => "redirected to another gateway",
        })
    }
}

/// A CHILD SA of the IKE SA, by its two SPIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChildRef {
    pub(crate) spi_in: u32,
    pub(crate) spi_out: u32,
    /// When this side rekeys it (its soft lifetime, [`rekey`]); `None`
    /// when the peer rekeyed it already or it is being rekeyed.
    pub(crate) rekey_at: Option<Instant>,
    /// The peer rekeyed it (or it is the redundant one of a simultaneous rekey): it is the
    /// peer's to delete, never ours to rekey.
    pub(crate) replaced: bool,
}

impl ChildRef {
    /// A CHILD SA just installed: this side rekeys it at its soft lifetime.
    pub(crate) fn new(child: &ChildSa, now: Instant, entropy: &mut dyn Entropy) -> Self {
        Self {
            spi_in: child.spi_in,
            spi_out: child.spi_out,
            rekey_at: rekey::soft_deadline(now, child.lifetime, entropy),
            replaced: false,
        }
    }
}

/// A random SPI of at least `min` (`near`: see [`Entropy::spi`]); a generator that keeps
/// producing smaller values is broken.
pub(crate) fn random_spi<const N: usize>(
    entropy: &mut dyn Entropy,
    min: u64,
    near: Option<u64>,
) -> Result<[u8; N], CryptoError> {
    for _ in 0..16 {
        let mut b = [0u8; N];
        entropy.spi(&mut b, near)?;
        let v = b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
        if v >= min {
            return Ok(b);
        }
    }
    Err(CryptoError::Internal)
}
