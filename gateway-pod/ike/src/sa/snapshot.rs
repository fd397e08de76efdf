//! An established IKE SA as data: everything another process needs to carry it on in either
//! role ([`IkeSaSnapshot`]), and its binary encoding.
//!
//! A snapshot holds the current IKE SA (SPIs, algorithms, SK_* keys, both Message ID windows
//! with the cached last response and our request in flight), the IKE SA a rekey replaced if
//! the peer has not deleted it yet, the addresses and NAT-T state, both identities, every
//! CHILD SA (SPIs, algorithms, keys, selectors, ESN, encapsulation) and what this side has in
//! flight (a liveness check, a CHILD SA or IKE SA rekey with its nonce and key exchange).
//! Deadlines are durations from the `now` given to `snapshot`, so the snapshot does not depend
//! on the clock of the process that took it.
//!
//! Secrets are [`SecretBytes`]: zeroized on drop and printed as their length only, so the
//! `Debug` output of a snapshot shows no key.
//!
//! # Encoding
//!
//! `"IKSS"`, a version octet (3; versions 1, without the RFC 6311 flag, and 2, with the
//! requests of kept exchanges in full instead of their length and SHA-256, are still read), then the
//! fields in a fixed order: integers big-endian,
//! byte strings and lists behind a 32-bit length that is checked against what is left and
//! against a limit per field. Decoding takes input from another pod like any input: it never
//! panics, never allocates more than the input justifies, and rejects trailing bytes, unknown
//! algorithms and out-of-range values with a [`SnapshotError`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use concentrator_algorithms::{DhGroup, Encryption, Esn, Integrity, Prf as PrfAlg};
use concentrator_crypto::{DirectionKeys, IkeSaKeys, SecretBytes};
use zeroize::Zeroizing;

use super::events::{ChildEvent, Events};
use super::{ChildRef, ChildSa, IdBuf};
use crate::message::codepoints::ExchangeType;
use crate::message::reader::Reader;
use crate::payload::{TrafficSelector, Ts};

/// The first four octets of an encoded snapshot.
pub const MAGIC: [u8; 4] = *b"IKSS";
/// The encoding version this crate writes and reads.
pub const VERSION: u8 = 3;
/// The version before RFC 6311 support: read as "the peer did not announce it", so that a
/// fleet in the middle of an upgrade keeps its copies.
const VERSION_1: u8 = 1;
/// The version that held each kept request in full (version 3 holds its SHA-256): read,
/// digesting the request, so that a fleet in the middle of an upgrade keeps its copies.
const VERSION_2: u8 = 2;
/// The longest byte string a snapshot holds (an IKE datagram, a key, a nonce).
const MAX_BYTES: usize = 65_535;
/// The most CHILD SAs one IKE SA may carry in a snapshot.
const MAX_CHILDREN: usize = 1024;

/// Why bytes are not a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The input ended inside the named field.
    #[error("snapshot truncated in {0}")]
    Truncated(&'static str),
    /// Not a snapshot.
    #[error("not an IKE SA snapshot")]
    BadMagic,
    /// A version this crate does not read.
    #[error("snapshot version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The named field holds a value that cannot be (an unknown algorithm, a bad flag).
    #[error("invalid value in snapshot field {0}")]
    InvalidValue(&'static str),
    /// The named field is longer than any real one.
    #[error("snapshot field {0} is too long")]
    TooLong(&'static str),
    /// Bytes after the last field.
    #[error("trailing bytes after the snapshot")]
    TrailingBytes,
    /// The keys or key exchange in the snapshot do not fit its algorithms.
    #[error("snapshot keys rejected: {0}")]
    Keys(&'static str),
    /// The SA is not established: only established SAs are snapshotted.
    #[error("the IKE SA is not established")]
    NotEstablished,
}

/// Which engine object carried the SA: who started it with IKE_SA_INIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We started it (an [`crate::Initiator`]).
    Initiator,
    /// The peer did (a [`crate::Responder`]).
    Responder,
}

/// A request known by its length and the SHA-256 of its bytes: enough to recognise its
/// retransmission, which RFC 7296 §2.1 makes "bitwise identical to the original request",
/// without keeping the request. (The length first: a datagram of another length is not
/// hashed.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestDigest {
    /// The request's length in bytes.
    pub len: u32,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

impl RequestDigest {
    /// The digest of `request`.
    pub fn of(request: &[u8]) -> Self {
        Self {
            len: u32::try_from(request.len()).unwrap_or(u32::MAX),
            sha256: concentrator_crypto::util::sha256(request),
        }
    }

    /// Whether `datagram` is the request.
    pub fn matches(&self, datagram: &[u8]) -> bool {
        u32::try_from(datagram.len()).is_ok_and(|n| n == self.len) && *self == Self::of(datagram)
    }
}

/// A request and the response to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The request as received, by its digest.
    pub request: RequestDigest,
    /// The response as sent.
    pub response: Vec<u8>,
}

/// Our request in flight on an IKE SA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRequest {
    /// Its Message ID.
    pub message_id: u32,
    /// Its exchange type.
    pub exchange: ExchangeType,
    /// The datagram, retransmitted as is.
    pub datagram: Vec<u8>,
    /// Retransmissions sent so far.
    pub retransmits: u32,
    /// When it is next retransmitted (or given up), from the snapshot's `now`.
    pub due_in: Duration,
}

/// One IKE SA's keys and Message ID windows.
#[derive(Clone, Debug)]
pub struct SessionSnapshot {
    /// The initiator's SPI.
    pub spi_i: u64,
    /// The responder's SPI.
    pub spi_r: u64,
    /// We are this IKE SA's initiator (we started it, or the rekey that made it).
    pub initiator: bool,
    /// PRF.
    pub prf: PrfAlg,
    /// Encryption of the SK payload.
    pub encryption: Encryption,
    /// Integrity of the SK payload (`None` with an AEAD).
    pub integrity: Option<Integrity>,
    /// SK_d, SK_ai/ar, SK_ei/er, SK_pi/pr (SK_pi and SK_pr empty: an established SA no
    /// longer has them, and never uses them).
    pub keys: IkeSaKeys,
    /// A NAT was detected between the peers.
    pub nat_detected: bool,
    /// The Message ID the peer's next request carries.
    pub rx_next: u64,
    /// The peer's last request and our response, with its Message ID.
    pub last: Option<(u32, Exchange)>,
    /// The Message ID of our next request.
    pub tx_next: u64,
    /// Our request in flight.
    pub pending: Option<PendingRequest>,
    /// How many AEAD nonces our sealing key has used (0 with AES-CBC, whose IVs are random).
    /// The restored SA seals from well above it: a nonce repeated under SK_e is a broken
    /// key (RFC 5282 §3.1: the IV "MUST NOT repeat for a given key").
    pub sealed: u64,
}

/// A CHILD SA of the IKE SA: what [`ChildSa`] reported when it was installed, and this
/// side's rekey state of it.
#[derive(Clone, Debug)]
pub struct ChildSnapshot {
    /// Our SPI.
    pub spi_in: u32,
    /// The peer's SPI.
    pub spi_out: u32,
    /// Encryption.
    pub encryption: Encryption,
    /// Integrity (`None` for AEAD).
    pub integrity: Option<Integrity>,
    /// Extended sequence numbers.
    pub esn: Esn,
    /// Keys of the inbound SA.
    pub inbound: DirectionKeys,
    /// Keys of the outbound SA.
    pub outbound: DirectionKeys,
    /// Our traffic selectors.
    pub ts_local: Vec<TrafficSelector<'static>>,
    /// The peer's traffic selectors.
    pub ts_remote: Vec<TrafficSelector<'static>>,
    /// Lifetime.
    pub lifetime: Duration,
    /// How long before the snapshot it was installed.
    pub installed_ago: Duration,
    /// ESP in UDP.
    pub udp_encap: bool,
    /// The `spi_in` of the CHILD SA it replaced, while that one is not deleted.
    pub replaces: Option<u32>,
    /// When this side rekeys it, from the snapshot's `now` (`None`: the peer's to rekey, or
    /// being rekeyed).
    pub rekey_in: Option<Duration>,
    /// The peer rekeyed it: it is the peer's to delete.
    pub replaced: bool,
}

impl ChildSnapshot {
    /// `sa` as installed, at `now`, with this side's rekey state of it.
    pub(crate) fn new(sa: &ChildSa, now: Instant, rekey_at: Option<Instant>, replaced: bool) -> Self {
        Self {
            spi_in: sa.spi_in,
            spi_out: sa.spi_out,
            encryption: sa.encryption,
            integrity: sa.integrity,
            esn: sa.esn,
            inbound: sa.inbound.clone(),
            outbound: sa.outbound.clone(),
            ts_local: sa.ts_local.clone(),
            ts_remote: sa.ts_remote.clone(),
            lifetime: sa.lifetime,
            installed_ago: now.saturating_duration_since(sa.installed_at),
            udp_encap: sa.udp_encap,
            replaces: sa.replaces,
            rekey_in: rekey_at.map(|t| t.saturating_duration_since(now)),
            replaced,
        }
    }

    /// The CHILD SA as the data plane takes it, on a clock where it is `now`.
    pub fn child_sa(&self, now: Instant) -> ChildSa {
        ChildSa {
            spi_in: self.spi_in,
            spi_out: self.spi_out,
            encryption: self.encryption,
            integrity: self.integrity,
            esn: self.esn,
            inbound: self.inbound.clone(),
            outbound: self.outbound.clone(),
            ts_local: self.ts_local.clone(),
            ts_remote: self.ts_remote.clone(),
            lifetime: self.lifetime,
            installed_at: now.checked_sub(self.installed_ago).unwrap_or(now),
            udp_encap: self.udp_encap,
            replaces: self.replaces,
        }
    }
}

/// What this side has in flight on the current IKE SA.
#[derive(Clone, Debug)]
pub enum InFlight {
    /// Nothing, or a request whose answer only has to verify (a liveness check, a DELETE).
    Plain,
    /// A CHILD SA rekey.
    ChildRekey {
        /// Our inbound SPI of the CHILD SA it replaces.
        old_spi_in: u32,
        /// Our inbound SPI of the new one.
        spi_in: u32,
        /// Our nonce.
        ni: Vec<u8>,
        /// The PFS key exchange: group and private key.
        kex: Option<(DhGroup, SecretBytes)>,
        /// The peer rekeyed the same SA meanwhile: the lowest nonce of its exchange and the
        /// `spi_in` of the SA it created.
        collision: Option<(Vec<u8>, u32)>,
    },
    /// An IKE SA rekey.
    IkeRekey {
        /// Our SPI of the new IKE SA.
        spi_i: u64,
        /// Our nonce.
        ni: Vec<u8>,
        /// The key exchange: group and private key.
        kex: (DhGroup, SecretBytes),
    },
}

/// An established IKE SA (see the module docs).
#[derive(Clone, Debug)]
pub struct IkeSaSnapshot {
    /// Who started the IKE SA.
    pub role: Role,
    /// Our address and port of its messages.
    pub local: SocketAddr,
    /// The peer's.
    pub remote: SocketAddr,
    /// We initiated and moved to the NAT-T port.
    pub floated: bool,
    /// The peer announced RFC 5685 redirects.
    pub redirect_supported: bool,
    /// Both ends announced RFC 6311 Message ID synchronization.
    pub mid_sync_supported: bool,
    /// Our identity.
    pub local_id: IdBuf,
    /// The peer's authenticated identity.
    pub peer_id: IdBuf,
    /// The IKE SA in use.
    pub current: SessionSnapshot,
    /// The IKE SA a rekey replaced and the peer has not deleted yet, and when it goes.
    pub previous: Option<(SessionSnapshot, Duration)>,
    /// The first IKE SA's IKE_SA_INIT exchange, for a late retransmission (responder).
    pub init: Option<Exchange>,
    /// The last request on a retired IKE SA and our response (responder).
    pub retired: Option<Exchange>,
    /// The CHILD SAs.
    pub children: Vec<ChildSnapshot>,
    /// What we have in flight.
    pub in_flight: InFlight,
    /// When we rekey the IKE SA, from `now`.
    pub ike_rekey_in: Option<Duration>,
    /// How long ago the peer was last heard from.
    pub last_heard_ago: Duration,
}

impl IkeSaSnapshot {
    /// The encoding (see the module docs): it holds every key, so it is zeroized on drop,
    /// and sized up front so that growing it leaves no copy behind.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let exchanges = [&self.init, &self.retired]
            .into_iter()
            .flatten()
            .chain(self.current.last.iter().map(|(_, e)| e))
            .map(|e| 4 + e.request.sha256.len() + e.response.len())
            .sum::<usize>();
        let pending = [Some(&self.current), self.previous.as_ref().map(|(s, _)| s)]
            .into_iter()
            .flatten()
            .filter_map(|s| s.pending.as_ref())
            .map(|p| p.datagram.len())
            .sum::<usize>();
        let mut w = Zeroizing::new(Vec::with_capacity(
            2048 + exchanges + pending + 512 * self.children.len(),
        ));
        w.extend_from_slice(&MAGIC);
        w.push(VERSION);
        w.push(match self.role {
            Role::Initiator => 0,
            Role::Responder => 1,
        });
        put_addr(&mut w, self.local);
        put_addr(&mut w, self.remote);
        put_bool(&mut w, self.floated);
        put_bool(&mut w, self.redirect_supported);
        put_bool(&mut w, self.mid_sync_supported);
        put_bytes(&mut w, self.local_id.body());
        put_bytes(&mut w, self.peer_id.body());
        put_session(&mut w, &self.current);
        put_option(&mut w, self.previous.as_ref(), |w, (s, d)| {
            put_session(w, s);
            put_duration(w, *d);
        });
        put_option(&mut w, self.init.as_ref(), put_exchange);
        put_option(&mut w, self.retired.as_ref(), put_exchange);
        put_u32(&mut w, self.children.len());
        for c in &self.children {
            put_child(&mut w, c);
        }
        match &self.in_flight {
            InFlight::Plain => w.push(0),
            InFlight::ChildRekey {
                old_spi_in,
                spi_in,
                ni,
                kex,
                collision,
            } => {
                w.push(1);
                w.extend_from_slice(&old_spi_in.to_be_bytes());
                w.extend_from_slice(&spi_in.to_be_bytes());
                put_bytes(&mut w, ni);
                put_option(&mut w, kex.as_ref(), put_kex);
                put_option(&mut w, collision.as_ref(), |w, (nonce, spi)| {
                    put_bytes(w, nonce);
                    w.extend_from_slice(&spi.to_be_bytes());
                });
            }
            InFlight::IkeRekey { spi_i, ni, kex } => {
                w.push(2);
                w.extend_from_slice(&spi_i.to_be_bytes());
                put_bytes(&mut w, ni);
                put_kex(&mut w, kex);
            }
        }
        put_option(&mut w, self.ike_rekey_in.as_ref(), |w, d| put_duration(w, *d));
        put_duration(&mut w, self.last_heard_ago);
        w
    }

    /// Decodes [`Self::encode`]'s output; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Dec(Reader::new(bytes));
        if r.0.array::<4>() != Some(MAGIC) {
            return Err(SnapshotError::BadMagic);
        }
        let version = r.u8("version")?;
        if ![VERSION, VERSION_2, VERSION_1].contains(&version) {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let role = match r.u8("role")? {
            0 => Role::Initiator,
            1 => Role::Responder,
            _ => return Err(SnapshotError::InvalidValue("role")),
        };
        let local = r.addr("local")?;
        let remote = r.addr("remote")?;
        let floated = r.bool("floated")?;
        let redirect_supported = r.bool("redirect_supported")?;
        let mid_sync_supported = version != VERSION_1 && r.bool("mid_sync_supported")?;
        let local_id = r.id("local_id")?;
        let peer_id = r.id("peer_id")?;
        let current = r.session(version)?;
        let previous = r.option("previous", |r| {
            Ok((r.session(version)?, r.duration("previous expiry")?))
        })?;
        let init = r.option("init", |r| r.exchange(version))?;
        let retired = r.option("retired", |r| r.exchange(version))?;
        let n = r.len("children", MAX_CHILDREN)?;
        let children: Vec<ChildSnapshot> = (0..n).map(|_| r.child()).collect::<Result<_, _>>()?;
        let mut spis: Vec<u32> = children.iter().map(|c| c.spi_in).collect();
        spis.sort_unstable();
        if spis.windows(2).any(|w| w[0] == w[1]) || spis.first() == Some(&0) {
            return Err(SnapshotError::InvalidValue("CHILD SA SPIs"));
        }
        let in_flight = match r.u8("in_flight")? {
            0 => InFlight::Plain,
            1 => InFlight::ChildRekey {
                old_spi_in: r.u32("old_spi_in")?,
                spi_in: r.u32("spi_in")?,
                ni: r.bytes("ni")?.to_vec(),
                kex: r.option("kex", Dec::kex)?,
                collision: r.option("collision", |r| {
                    Ok((r.bytes("collision nonce")?.to_vec(), r.u32("collision spi")?))
                })?,
            },
            2 => InFlight::IkeRekey {
                spi_i: r.u64("rekey spi_i")?,
                ni: r.bytes("ni")?.to_vec(),
                kex: r.kex()?,
            },
            _ => return Err(SnapshotError::InvalidValue("in_flight")),
        };
        let ike_rekey_in = r.option("ike_rekey_in", |r| r.duration("ike_rekey_in"))?;
        let last_heard_ago = r.duration("last_heard_ago")?;
        if !r.0.is_empty() {
            return Err(SnapshotError::TrailingBytes);
        }
        Ok(Self {
            role,
            local,
            remote,
            floated,
            redirect_supported,
            mid_sync_supported,
            local_id,
            peer_id,
            current,
            previous,
            init,
            retired,
            children,
            in_flight,
            ike_rekey_in,
            last_heard_ago,
        })
    }
}

fn put_bool(w: &mut Vec<u8>, b: bool) {
    w.push(u8::from(b));
}

/// A length or count: every one the encoder writes is far below `u32::MAX`.
fn put_u32(w: &mut Vec<u8>, n: usize) {
    w.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len());
    w.extend_from_slice(b);
}

fn put_option<T>(w: &mut Vec<u8>, v: Option<&T>, put: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put(w, v);
        }
    }
}

fn put_duration(w: &mut Vec<u8>, d: Duration) {
    w.extend_from_slice(&u64::try_from(d.as_micros()).unwrap_or(u64::MAX).to_be_bytes());
}

fn put_addr(w: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            w.push(4);
            w.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            w.push(6);
            w.extend_from_slice(&ip.octets());
        }
    }
    w.extend_from_slice(&a.port().to_be_bytes());
}

fn put_exchange(w: &mut Vec<u8>, e: &Exchange) {
    w.extend_from_slice(&e.request.len.to_be_bytes());
    w.extend_from_slice(&e.request.sha256);
    put_bytes(w, &e.response);
}

fn put_encryption(w: &mut Vec<u8>, e: Encryption) {
    w.extend_from_slice(&e.transform_id().to_be_bytes());
    w.extend_from_slice(&e.key_bits().unwrap_or(0).to_be_bytes());
}

fn put_integrity(w: &mut Vec<u8>, i: Option<Integrity>) {
    w.extend_from_slice(&i.map_or(0, Integrity::transform_id).to_be_bytes());
}

fn put_kex(w: &mut Vec<u8>, (group, private): &(DhGroup, SecretBytes)) {
    w.extend_from_slice(&group.number().to_be_bytes());
    put_bytes(w, private.expose());
}

fn put_session(w: &mut Vec<u8>, s: &SessionSnapshot) {
    w.extend_from_slice(&s.spi_i.to_be_bytes());
    w.extend_from_slice(&s.spi_r.to_be_bytes());
    put_bool(w, s.initiator);
    w.extend_from_slice(&s.prf.transform_id().to_be_bytes());
    put_encryption(w, s.encryption);
    put_integrity(w, s.integrity);
    let k = &s.keys;
    for key in [
        &k.sk_d, &k.sk_ai, &k.sk_ar, &k.sk_ei, &k.sk_er, &k.sk_pi, &k.sk_pr,
    ] {
        put_bytes(w, key.expose());
    }
    put_bool(w, s.nat_detected);
    w.extend_from_slice(&s.rx_next.to_be_bytes());
    put_option(w, s.last.as_ref(), |w, (id, e)| {
        w.extend_from_slice(&id.to_be_bytes());
        put_exchange(w, e);
    });
    w.extend_from_slice(&s.tx_next.to_be_bytes());
    put_option(w, s.pending.as_ref(), |w, p| {
        w.extend_from_slice(&p.message_id.to_be_bytes());
        w.push(p.exchange.0);
        put_bytes(w, &p.datagram);
        w.extend_from_slice(&p.retransmits.to_be_bytes());
        put_duration(w, p.due_in);
    });
    w.extend_from_slice(&s.sealed.to_be_bytes());
}

fn put_direction(w: &mut Vec<u8>, k: &DirectionKeys) {
    put_bytes(w, k.encr.expose());
    put_bytes(w, k.salt.expose());
    put_bytes(w, k.integ.expose());
}

fn put_selectors(w: &mut Vec<u8>, ts: &[TrafficSelector<'static>]) {
    let mut body = Vec::new();
    Ts {
        selectors: ts.to_vec(),
    }
    .encode(&mut body);
    put_bytes(w, &body);
}

fn put_child(w: &mut Vec<u8>, sa: &ChildSnapshot) {
    w.extend_from_slice(&sa.spi_in.to_be_bytes());
    w.extend_from_slice(&sa.spi_out.to_be_bytes());
    put_encryption(w, sa.encryption);
    put_integrity(w, sa.integrity);
    put_bool(w, sa.esn == Esn::Yes);
    put_direction(w, &sa.inbound);
    put_direction(w, &sa.outbound);
    put_selectors(w, &sa.ts_local);
    put_selectors(w, &sa.ts_remote);
    put_duration(w, sa.lifetime);
    put_duration(w, sa.installed_ago);
    put_bool(w, sa.udp_encap);
    put_option(w, sa.replaces.as_ref(), |w, spi| {
        w.extend_from_slice(&spi.to_be_bytes())
    });
    put_option(w, sa.rekey_in.as_ref(), |w, d| put_duration(w, *d));
    put_bool(w, sa.replaced);
}

/// Each CHILD SA of `children` with what it was installed with (kept in `events`).
pub(crate) fn snapshot_children<E: ChildEvent>(
    children: &[ChildRef],
    events: &Events<E>,
    now: Instant,
) -> Result<Vec<ChildSnapshot>, SnapshotError> {
    if children.len() > MAX_CHILDREN {
        return Err(SnapshotError::TooLong("children"));
    }
    children
        .iter()
        .map(|c| {
            events
                .child(c.spi_in)
                .map(|sa| ChildSnapshot::new(&sa, now, c.rekey_at, c.replaced))
                .ok_or(SnapshotError::InvalidValue("CHILD SA without its parameters"))
        })
        .collect()
}

/// The CHILD SA references and installed parameters of restored `children`.
pub(crate) fn restore_children(children: &[ChildSnapshot], now: Instant) -> (Vec<ChildRef>, Vec<ChildSa>) {
    children
        .iter()
        .map(|c| {
            (
                ChildRef {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                    rekey_at: c.rekey_in.map(|d| super::deadline(now, d)),
                    replaced: c.replaced,
                },
                c.child_sa(now),
            )
        })
        .unzip()
}

/// The decoder: every read checked, every length bounded.
struct Dec<'a>(Reader<'a>);

impl<'a> Dec<'a> {
    fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        self.0.u8().ok_or(SnapshotError::Truncated(what))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SnapshotError> {
        self.0.u16().ok_or(SnapshotError::Truncated(what))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        self.0.u32().ok_or(SnapshotError::Truncated(what))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        self.0.u64().ok_or(SnapshotError::Truncated(what))
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SnapshotError::InvalidValue(what)),
        }
    }

    /// A length of at most `max` that the input can still hold (each element takes at least
    /// one octet), so no allocation exceeds the input.
    fn len(&mut self, what: &'static str, max: usize) -> Result<usize, SnapshotError> {
        let n = usize::try_from(self.u32(what)?).map_err(|_| SnapshotError::TooLong(what))?;
        if n > max {
            return Err(SnapshotError::TooLong(what));
        }
        if n > self.0.left() {
            return Err(SnapshotError::Truncated(what));
        }
        Ok(n)
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        let n = self.len(what, MAX_BYTES)?;
        self.0.take(n).ok_or(SnapshotError::Truncated(what))
    }

    fn secret(&mut self, what: &'static str) -> Result<SecretBytes, SnapshotError> {
        self.bytes(what).map(SecretBytes::from_slice)
    }

    fn option<T>(
        &mut self,
        what: &'static str,
        get: impl FnOnce(&mut Self) -> Result<T, SnapshotError>,
    ) -> Result<Option<T>, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => get(self).map(Some),
            _ => Err(SnapshotError::InvalidValue(what)),
        }
    }

    fn duration(&mut self, what: &'static str) -> Result<Duration, SnapshotError> {
        self.u64(what).map(Duration::from_micros)
    }

    fn addr(&mut self, what: &'static str) -> Result<SocketAddr, SnapshotError> {
        let ip = match self.u8(what)? {
            4 => IpAddr::V4(Ipv4Addr::from(
                self.0.array::<4>().ok_or(SnapshotError::Truncated(what))?,
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                self.0.array::<16>().ok_or(SnapshotError::Truncated(what))?,
            )),
            _ => return Err(SnapshotError::InvalidValue(what)),
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    fn id(&mut self, what: &'static str) -> Result<IdBuf, SnapshotError> {
        let body = self.bytes(what)?;
        IdBuf::from_body(body).ok_or(SnapshotError::InvalidValue(what))
    }

    fn exchange(&mut self, version: u8) -> Result<Exchange, SnapshotError> {
        let request = if version < VERSION {
            RequestDigest::of(self.bytes("request")?)
        } else {
            RequestDigest {
                len: self.u32("request length")?,
                sha256: self.0.array().ok_or(SnapshotError::Truncated("request digest"))?,
            }
        };
        Ok(Exchange {
            request,
            response: self.bytes("response")?.to_vec(),
        })
    }

    fn encryption(&mut self) -> Result<Encryption, SnapshotError> {
        let id = self.u16("encryption")?;
        let bits = self.u16("key length")?;
        [
            Encryption::AesCbc { key_bits: 128 },
            Encryption::AesCbc { key_bits: 256 },
            Encryption::AesGcm16 { key_bits: 128 },
            Encryption::AesGcm16 { key_bits: 256 },
            Encryption::ChaCha20Poly1305,
        ]
        .into_iter()
        .find(|e| e.transform_id() == id && e.key_bits().unwrap_or(0) == bits)
        .ok_or(SnapshotError::InvalidValue("encryption"))
    }

    fn integrity(&mut self) -> Result<Option<Integrity>, SnapshotError> {
        match self.u16("integrity")? {
            0 => Ok(None),
            id => [
                Integrity::HmacSha256_128,
                Integrity::HmacSha384_192,
                Integrity::HmacSha512_256,
            ]
            .into_iter()
            .find(|i| i.transform_id() == id)
            .map(Some)
            .ok_or(SnapshotError::InvalidValue("integrity")),
        }
    }

    fn prf(&mut self) -> Result<PrfAlg, SnapshotError> {
        let id = self.u16("prf")?;
        [PrfAlg::HmacSha256, PrfAlg::HmacSha384, PrfAlg::HmacSha512]
            .into_iter()
            .find(|p| p.transform_id() == id)
            .ok_or(SnapshotError::InvalidValue("prf"))
    }

    fn kex(&mut self) -> Result<(DhGroup, SecretBytes), SnapshotError> {
        let group = crate::negotiate::dh_group(self.u16("kex group")?)
            .ok_or(SnapshotError::InvalidValue("kex group"))?;
        Ok((group, self.secret("kex private key")?))
    }

    fn session(&mut self, version: u8) -> Result<SessionSnapshot, SnapshotError> {
        let spi_i = self.u64("spi_i")?;
        let spi_r = self.u64("spi_r")?;
        // RFC 7296 §3.1: neither SPI of an established IKE SA is zero.
        if spi_i == 0 || spi_r == 0 {
            return Err(SnapshotError::InvalidValue("IKE SPIs"));
        }
        let initiator = self.bool("initiator")?;
        let prf = self.prf()?;
        let encryption = self.encryption()?;
        let integrity = self.integrity()?;
        let keys = IkeSaKeys {
            sk_d: self.secret("sk_d")?,
            sk_ai: self.secret("sk_ai")?,
            sk_ar: self.secret("sk_ar")?,
            sk_ei: self.secret("sk_ei")?,
            sk_er: self.secret("sk_er")?,
            sk_pi: self.secret("sk_pi")?,
            sk_pr: self.secret("sk_pr")?,
        };
        let nat_detected = self.bool("nat_detected")?;
        let rx_next = self.u64("rx_next")?;
        let last = self.option("last", |r| Ok((r.u32("last message id")?, r.exchange(version)?)))?;
        let tx_next = self.u64("tx_next")?;
        let pending = self.option("pending", |r| {
            Ok(PendingRequest {
                message_id: r.u32("pending message id")?,
                exchange: ExchangeType(r.u8("pending exchange")?),
                datagram: r.bytes("pending datagram")?.to_vec(),
                retransmits: r.u32("retransmits")?,
                due_in: r.duration("pending due")?,
            })
        })?;
        // Version 1 did not say; the restore's margin covers any SA's whole life.
        let sealed = if version == VERSION_1 {
            0
        } else {
            self.u64("sealed")?
        };
        Ok(SessionSnapshot {
            spi_i,
            spi_r,
            initiator,
            prf,
            encryption,
            integrity,
            keys,
            nat_detected,
            rx_next,
            last,
            tx_next,
            pending,
            sealed,
        })
    }

    fn direction(&mut self) -> Result<DirectionKeys, SnapshotError> {
        Ok(DirectionKeys {
            encr: self.secret("child encryption key")?,
            salt: self.secret("child salt")?,
            integ: self.secret("child integrity key")?,
        })
    }

    fn selectors(&mut self) -> Result<Vec<TrafficSelector<'static>>, SnapshotError> {
        let body = self.bytes("selectors")?;
        let ts = Ts::decode(body).map_err(|_| SnapshotError::InvalidValue("selectors"))?;
        ts.selectors
            .into_iter()
            .map(|s| match s {
                TrafficSelector::V4(r) => Ok(TrafficSelector::V4(r)),
                TrafficSelector::V6(r) => Ok(TrafficSelector::V6(r)),
                TrafficSelector::Other { .. } => Err(SnapshotError::InvalidValue("selectors")),
            })
            .collect()
    }

    fn child(&mut self) -> Result<ChildSnapshot, SnapshotError> {
        let spi_in = self.u32("child spi_in")?;
        let spi_out = self.u32("child spi_out")?;
        let encryption = self.encryption()?;
        let integrity = self.integrity()?;
        let esn = if self.bool("esn")? { Esn::Yes } else { Esn::No };
        let inbound = self.direction()?;
        let outbound = self.direction()?;
        let ts_local = self.selectors()?;
        let ts_remote = self.selectors()?;
        let lifetime = self.duration("child lifetime")?;
        let installed_ago = self.duration("installed_ago")?;
        let udp_encap = self.bool("udp_encap")?;
        let replaces = self.option("replaces", |r| r.u32("replaces"))?;
        let rekey_in = self.option("rekey_in", |r| r.duration("rekey_in"))?;
        let replaced = self.bool("replaced")?;
        Ok(ChildSnapshot {
            spi_in,
            spi_out,
            encryption,
            integrity,
            esn,
            inbound,
            outbound,
            ts_local,
            ts_remote,
            lifetime,
            installed_ago,
            udp_encap,
            replaces,
            rekey_in,
            replaced,
        })
    }
}
