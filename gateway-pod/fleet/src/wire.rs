//! The frames in which pods forward packets to each other (SPI routing, DESIGN.md §5).
//!
//! Three kinds, each at most one hop, which makes a forwarding loop impossible by
//! construction: an [`Kind::Ingress`] frame carries a packet a site sent to the pod that
//! received it, to the shard's owner, which handles it itself or drops it (it never
//! forwards a frame on); an [`Kind::Egress`] frame carries the owner's answer back to that
//! pod, which sends it to the site from the address the site's flow is pinned to (behind a
//! Service, the node's conntrack pinned the flow to that pod) and never forwards it either;
//! a [`Kind::Plain`] frame carries a packet from the head-end's side toward a site whose
//! tunnel another member holds, which seals it into that tunnel or holds it for its own
//! tunnel to come up, and never forwards it on.
//!
//! ```text
//!  0      4    5    6       8             24     28        36              end-60   end-16  end
//!  |CFW1 |kind|0   |sender |incarnation  |lane  |counter  |payload ...     |meta    |tag    |
//!  \_____________ authenticated (AAD) __________________________________/ \_sealed_/
//! ```
//!
//! The packet itself is already IKE- or ESP-protected (or a cleartext IKE_SA_INIT; or, in a
//! plain frame, a head-end packet that crossed the cluster's network in clear to reach the
//! first pod), so it is authenticated, not encrypted again; the metadata (the site's address, our address it
//! wrote to, the shard's epoch) is sealed with AES-256-GCM. The key is derived with HKDF from
//! the fleet key, the sender and its incarnation (random at each start), so no two
//! processes ever share a key and nonce: the nonce is the sender's lane (one per sending
//! thread) and a counter. A pod without the fleet key can neither forge a frame nor read
//! where a site is. A replayed frame replays a packet IKE or ESP already protects against
//! replay, so frames carry no replay window of their own.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Prk, Salt};

use crate::member::MemberId;

const MAGIC: &[u8; 4] = b"CFW1";
/// Magic, kind, reserved, sender, incarnation, lane, counter.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 2 + 16 + 4 + 8;
/// Two addresses (family, 16 address bytes, port) and the epoch.
const ADDR_LEN: usize = 1 + 16 + 2;
const META_LEN: usize = 2 * ADDR_LEN + 4;
const TAG_LEN: usize = 16;
/// What a frame adds to the packet it carries.
pub const OVERHEAD: usize = HEADER_LEN + META_LEN + TAG_LEN;
/// The shortest fleet key accepted (bytes).
pub const MIN_KEY_LEN: usize = 32;
/// Derived keys kept per opener: a fleet has a few dozen pods, each with one incarnation at
/// a time (plus the previous one for a moment after a restart).
const MAX_CACHED_KEYS: usize = 256;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A packet from a site, received by the sender, for the receiver to handle.
    Ingress = 1,
    /// A packet for a site, to be sent by the receiver from `local` to `remote`.
    Egress = 2,
    /// A head-end packet toward a site whose tunnel the receiver holds (addresses unused).
    Plain = 3,
}

/// An opened frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Ingress or egress.
    pub kind: Kind,
    /// The member that sent it.
    pub sender: MemberId,
    /// Our address the site wrote to (ingress), or to send from (egress): the local side of
    /// the site's flow on the pod that received it.
    pub local: SocketAddr,
    /// The site's address.
    pub remote: SocketAddr,
    /// The epoch of the packet's shard as the sender knew it (0 for a new IKE SA, which has
    /// no shard yet).
    pub epoch: u32,
    /// The UDP payload as received or to send (with the non-ESP marker on port 4500).
    pub payload: &'a [u8],
}

/// Why a frame was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a frame.
    #[error("fleet frame: truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a fleet frame (or one of another version).
    #[error("fleet frame: bad magic")]
    Magic,
    /// A kind this gateway does not know.
    #[error("fleet frame: unknown kind {0}")]
    Kind(u8),
    /// Sent with another fleet key, or altered on the way.
    #[error("fleet frame: authentication failed (another fleet key, or altered)")]
    Authentication,
    /// The sealed addresses do not decode.
    #[error("fleet frame: bad address")]
    Address,
    /// Our own member ID as the sender: a frame is never sent to oneself.
    #[error("fleet frame: sent by this member")]
    FromSelf,
    /// The sending lane used up its nonces (2^64 frames).
    #[error("fleet frame: nonces exhausted")]
    Exhausted,
}

/// Why a fleet key was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the fleet key has {0} bytes; at least {MIN_KEY_LEN} are needed")]
pub struct KeyError(pub usize);

/// The fleet key, as the pseudorandom key every frame key is derived from. Zeroized on
/// drop (by aws-lc-rs); never printed.
#[derive(Clone)]
pub struct FleetKey(Prk);

impl FleetKey {
    /// The key from the bytes of the fleet key file (at least [`MIN_KEY_LEN`] random bytes).
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyError(secret.len()));
        }
        Ok(Self(
            Salt::new(HKDF_SHA256, b"concentrator fleet v1").extract(secret),
        ))
    }

    /// The pseudorandom key other derivations (the replication stream's) expand from.
    pub(crate) fn prk(&self) -> &Prk {
        &self.0
    }

    fn frame_key(&self, sender: MemberId, incarnation: &[u8; 16]) -> Result<LessSafeKey, WireError> {
        let sender = sender.0.to_be_bytes();
        let info: [&[u8]; 3] = [b"frames", &sender, incarnation];
        let okm = self
            .0
            .expand(&info, &AES_256_GCM)
            .map_err(|_| WireError::Authentication)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

/// Seals frames for one sending lane (one per thread of the sender: lanes of one
/// incarnation must differ, or nonces repeat).
pub struct Sealer {
    key: LessSafeKey,
    sender: MemberId,
    incarnation: [u8; 16],
    lane: u32,
    counter: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("sender", &self.sender)
            .field("lane", &self.lane)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `lane` of this process (`incarnation`: 16 random bytes drawn at start).
    pub fn new(
        key: &FleetKey,
        sender: MemberId,
        incarnation: [u8; 16],
        lane: u32,
    ) -> Result<Self, WireError> {
        Ok(Self {
            key: key.frame_key(sender, &incarnation)?,
            sender,
            incarnation,
            lane,
            counter: 0,
        })
    }

    /// Appends to `out` a frame carrying `payload`.
    pub fn seal(
        &mut self,
        kind: Kind,
        local: SocketAddr,
        remote: SocketAddr,
        epoch: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let counter = self.counter;
        self.counter = counter.checked_add(1).ok_or(WireError::Exhausted)?;
        let start = out.len();
        out.reserve(OVERHEAD + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(kind as u8);
        out.push(0);
        out.extend_from_slice(&self.sender.0.to_be_bytes());
        out.extend_from_slice(&self.incarnation);
        out.extend_from_slice(&self.lane.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(payload);
        let meta_at = out.len();
        put_addr(out, local);
        put_addr(out, remote);
        out.extend_from_slice(&epoch.to_be_bytes());
        let (aad, meta) = out[start..].split_at_mut(meta_at - start);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.lane, counter), Aad::from(&*aad), meta)
            .map_err(|_| WireError::Authentication)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens frames sent to `me` by any member with the fleet key.
pub struct Opener {
    fleet: FleetKey,
    me: MemberId,
    keys: HashMap<(MemberId, [u8; 16]), LessSafeKey>,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("me", &self.me)
            .field("senders", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for member `me`.
    pub fn new(fleet: FleetKey, me: MemberId) -> Self {
        Self {
            fleet,
            me,
            keys: HashMap::new(),
        }
    }

    /// Checks and opens a frame in place.
    pub fn open<'a>(&mut self, frame: &'a mut [u8]) -> Result<Frame<'a>, WireError> {
        let len = frame.len();
        if len < OVERHEAD {
            return Err(WireError::Truncated(len));
        }
        if &frame[..4] != MAGIC {
            return Err(WireError::Magic);
        }
        let kind = match frame[4] {
            1 => Kind::Ingress,
            2 => Kind::Egress,
            3 => Kind::Plain,
            k => return Err(WireError::Kind(k)),
        };
        let sender = MemberId(u16::from_be_bytes([frame[6], frame[7]]));
        if sender == self.me {
            return Err(WireError::FromSelf);
        }
        let mut incarnation = [0u8; 16];
        incarnation.copy_from_slice(&frame[8..24]);
        let lane = u32::from_be_bytes([frame[24], frame[25], frame[26], frame[27]]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&frame[28..36]);
        let counter = u64::from_be_bytes(counter);

        let meta_at = len - META_LEN - TAG_LEN;
        let (aad, sealed) = frame.split_at_mut(meta_at);
        let id = (sender, incarnation);
        // Only keys that opened a frame are kept: a forged sender costs a derivation, never
        // memory.
        let fresh = match self.keys.contains_key(&id) {
            true => None,
            false => Some(self.fleet.frame_key(sender, &incarnation)?),
        };
        let key = match &fresh {
            Some(k) => k,
            None => self.keys.get(&id).ok_or(WireError::Authentication)?,
        };
        let meta = key
            .open_in_place(nonce(lane, counter), Aad::from(&*aad), sealed)
            .map_err(|_| WireError::Authentication)?;
        let local = get_addr(&meta[..ADDR_LEN])?;
        let remote = get_addr(&meta[ADDR_LEN..2 * ADDR_LEN])?;
        let mut epoch = [0u8; 4];
        epoch.copy_from_slice(&meta[2 * ADDR_LEN..META_LEN]);
        let epoch = u32::from_be_bytes(epoch);
        if let Some(key) = fresh {
            if self.keys.len() >= MAX_CACHED_KEYS {
                self.keys.clear();
            }
            self.keys.insert(id, key);
        }
        Ok(Frame {
            kind,
            sender,
            local,
            remote,
            epoch,
            payload: &aad[HEADER_LEN..],
        })
    }
}

fn nonce(lane: u32, counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&lane.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&[0; 12]);
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Result<SocketAddr, WireError> {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[1..17]);
    let port = u16::from_be_bytes([b[17], b[18]]);
    let ip = match b[0] {
        4 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        _ => return Err(WireError::Address),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests;
