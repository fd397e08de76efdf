//! The replication stream (DESIGN.md §5, stateful takeover): what a shard's owner tells the
//! shard's replica about the SAs it holds there, so that the replica can carry them on if
//! the owner dies, and the record layer that protects it on the pod network.
//!
//! The stream runs over one TCP connection from the owner (client) to the replica (server).
//! Each side first sends a [`Hello`] in clear (magic, member ID, 16 random bytes); every
//! later record is `length (u32) | AES-256-GCM(body) | tag`, under a key per direction
//! derived with HKDF from the fleet key and both hellos, with a record counter as the nonce.
//! So only a member with the fleet key can read (SA keys are in it) or write the stream,
//! every connection has keys of its own, and a recorded stream cannot be replayed into a
//! later connection (the other side's random bytes differ). The records are ordered by TCP;
//! the replica acknowledges each message it applied ([`Message::Ack`] of the count), and the
//! owner raises a sequence ceiling only once the replica has acknowledged it.
//!
//! Decoding takes input from another pod like any input: bounded lengths, no panic.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::member::MemberId;
use crate::shard::{SHARDS, Shard};
use crate::wire::FleetKey;

const MAGIC: &[u8; 4] = b"CRP1";
/// Length of a [`Hello`] on the wire.
pub const HELLO_LEN: usize = 4 + 2 + 8 + 16;
const TAG_LEN: usize = 16;
/// The longest record body (an IKE SA snapshot with its CHILD SAs is a few KiB).
pub const MAX_RECORD: usize = 1 << 20;
/// The most entries in one ceilings or replay message.
pub const MAX_ENTRIES: usize = 1 << 16;

/// Why bytes on the stream were refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// Not a replication hello (another protocol, or another version).
    #[error("replication: bad hello")]
    Hello,
    /// A record longer than [`MAX_RECORD`] or shorter than its tag.
    #[error("replication: record length {0}")]
    Length(usize),
    /// Sealed with another fleet key, altered, replayed or reordered.
    #[error("replication: authentication failed (another fleet key, or altered)")]
    Authentication,
    /// The body does not decode.
    #[error("replication: malformed message ({0})")]
    Malformed(&'static str),
    /// 2^64 records on one connection.
    #[error("replication: record counter exhausted")]
    Exhausted,
}

/// The clear greeting of each side (authenticated by the keys, which derive from both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Who speaks.
    pub member: MemberId,
    /// Its etcd lease: a stream is the owner's only while this lease is its membership, so
    /// an owner that was fenced (its lease revoked) and comes back cannot have its old
    /// stream acknowledged.
    pub lease: i64,
    /// Drawn at random for this connection.
    pub random: [u8; 16],
}

impl Hello {
    /// The hello as sent.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4..6].copy_from_slice(&self.member.0.to_be_bytes());
        out[6..14].copy_from_slice(&self.lease.to_be_bytes());
        out[14..].copy_from_slice(&self.random);
        out
    }

    /// A hello as received.
    pub fn decode(b: &[u8]) -> Result<Self, ReplicationError> {
        if b.len() != HELLO_LEN || &b[..4] != MAGIC {
            return Err(ReplicationError::Hello);
        }
        let mut lease = [0u8; 8];
        lease.copy_from_slice(&b[6..14]);
        let mut random = [0u8; 16];
        random.copy_from_slice(&b[14..]);
        Ok(Self {
            member: MemberId(u16::from_be_bytes([b[4], b[5]])),
            lease: i64::from_be_bytes(lease),
            random,
        })
    }
}

/// One direction of a connection's record layer.
pub struct Records {
    key: LessSafeKey,
    counter: u64,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

/// The two directions of a connection: `(sending, receiving)` for the side that sent
/// `mine` and received `theirs`; `client` says which side opened the connection.
pub fn records(
    key: &FleetKey,
    client: bool,
    mine: &Hello,
    theirs: &Hello,
) -> Result<(Records, Records), ReplicationError> {
    let (c, s) = if client { (mine, theirs) } else { (theirs, mine) };
    let derive = |direction: &[u8]| -> Result<Records, ReplicationError> {
        let (ci, si) = (c.encode(), s.encode());
        let info: [&[u8]; 4] = [b"replication", &ci, &si, direction];
        let okm = key
            .prk()
            .expand(&info, &AES_256_GCM)
            .map_err(|_| ReplicationError::Authentication)?;
        Ok(Records {
            key: LessSafeKey::new(UnboundKey::from(okm)),
            counter: 0,
        })
    };
    let (to_server, to_client) = (derive(b"c2s")?, derive(b"s2c")?);
    Ok(if client {
        (to_server, to_client)
    } else {
        (to_client, to_server)
    })
}

impl Records {
    fn nonce(&mut self) -> Result<Nonce, ReplicationError> {
        let counter = self.counter;
        self.counter = counter.checked_add(1).ok_or(ReplicationError::Exhausted)?;
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Appends the record carrying `body` (length prefix included) to `out`.
    pub fn seal(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), ReplicationError> {
        if body.len() > MAX_RECORD {
            return Err(ReplicationError::Length(body.len()));
        }
        let nonce = self.nonce()?;
        out.extend_from_slice(&((body.len() + TAG_LEN) as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(body);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut out[start..])
            .map_err(|_| ReplicationError::Authentication)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// The length of the record whose 4-byte prefix is `prefix`, checked.
    pub fn record_len(prefix: [u8; 4]) -> Result<usize, ReplicationError> {
        let n = u32::from_be_bytes(prefix) as usize;
        if !(TAG_LEN..=MAX_RECORD + TAG_LEN).contains(&n) {
            return Err(ReplicationError::Length(n));
        }
        Ok(n)
    }

    /// Opens a record (without its length prefix) in place; returns its body.
    pub fn open<'a>(&mut self, record: &'a mut [u8]) -> Result<&'a [u8], ReplicationError> {
        if record.len() < TAG_LEN || record.len() > MAX_RECORD + TAG_LEN {
            return Err(ReplicationError::Length(record.len()));
        }
        let nonce = self.nonce()?;
        let body = self
            .key
            .open_in_place(nonce, Aad::empty(), record)
            .map_err(|_| ReplicationError::Authentication)?;
        Ok(body)
    }
}

/// One CHILD SA's sequence state beside a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequences {
    /// Our inbound SPI of the CHILD SA (the name both pods use for it).
    pub spi_in: u32,
    /// The highest outbound sequence number the owner may use: a pod that takes over
    /// starts above it.
    pub ceiling: u64,
    /// The highest inbound sequence number the owner had accepted.
    pub top: u64,
}

/// What the owner tells the replica, and the replica's acknowledgement.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// An IKE SA (new, or changed: its message IDs, a rekey, a CHILD SA) of `shard`: its
    /// encoded snapshot and the sequence state of its CHILD SAs.
    Sa {
        /// The shard its SPI carries.
        shard: Shard,
        /// Its id in the owner's endpoint (our IKE SPI).
        id: u64,
        /// The encoded `IkeSaSnapshot` (secret: zeroized on drop, never printed).
        snapshot: Zeroizing<Vec<u8>>,
        /// What the owner's driver keeps beside the engine (eroute, site), opaque here.
        context: Vec<u8>,
        /// Each CHILD SA's sequence state.
        children: Vec<Sequences>,
    },
    /// The IKE SA `id` is gone.
    Delete {
        /// Its id.
        id: u64,
    },
    /// New sequence state of CHILD SAs (ceilings raised, inbound tops moved on).
    Sequences(Vec<Sequences>),
    /// Forget every SA this owner sent before (sent first on each connection).
    Reset,
    /// Nothing new: the owner is alive.
    Heartbeat,
    /// From the replica: the first `n` messages of this connection are applied.
    Ack(u64),
    /// The owner froze `shard` (it is draining) and the copies of its SAs sent before this
    /// are final: the member the shard map gives the shard to carries them on, although the
    /// owner lives; any other replica drops them then.
    Handover {
        /// The shard handed over.
        shard: Shard,
        /// The member it is handed to.
        to: MemberId,
    },
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sa {
                shard, id, children, ..
            } => f
                .debug_struct("Sa")
                .field("shard", shard)
                .field("id", &format_args!("{id:016x}"))
                .field("children", &children.len())
                .finish_non_exhaustive(),
            Self::Delete { id } => write!(f, "Delete({id:016x})"),
            Self::Sequences(s) => write!(f, "Sequences({})", s.len()),
            Self::Reset => f.write_str("Reset"),
            Self::Heartbeat => f.write_str("Heartbeat"),
            Self::Ack(n) => write!(f, "Ack({n})"),
            Self::Handover { shard, to } => write!(f, "Handover({shard} to {to})"),
        }
    }
}

impl Message {
    /// The message as a record body.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        match self {
            Self::Sa {
                shard,
                id,
                snapshot,
                context,
                children,
            } => {
                out.push(1);
                out.extend_from_slice(&shard.get().to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(snapshot.len() as u32).to_be_bytes());
                out.extend_from_slice(snapshot);
                out.extend_from_slice(&(context.len() as u32).to_be_bytes());
                out.extend_from_slice(context);
                put_sequences(&mut out, children);
            }
            Self::Delete { id } => {
                out.push(2);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Self::Sequences(s) => {
                out.push(3);
                put_sequences(&mut out, s);
            }
            Self::Reset => out.push(4),
            Self::Heartbeat => out.push(5),
            Self::Ack(n) => {
                out.push(6);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Self::Handover { shard, to } => {
                out.push(7);
                out.extend_from_slice(&shard.get().to_be_bytes());
                out.extend_from_slice(&to.0.to_be_bytes());
            }
        }
        out
    }

    /// A record body as a message.
    pub fn decode(b: &[u8]) -> Result<Self, ReplicationError> {
        let mut r = Reader(b);
        let m = match r.u8()? {
            1 => {
                let shard = r.u16()?;
                if shard >= SHARDS {
                    return Err(ReplicationError::Malformed("shard"));
                }
                let id = r.u64()?;
                let n = r.u32()? as usize;
                let snapshot = Zeroizing::new(r.take(n)?.to_vec());
                let n = r.u32()? as usize;
                let context = r.take(n)?.to_vec();
                Self::Sa {
                    shard: Shard::new(shard).ok_or(ReplicationError::Malformed("shard"))?,
                    id,
                    snapshot,
                    context,
                    children: r.sequences()?,
                }
            }
            2 => Self::Delete { id: r.u64()? },
            3 => Self::Sequences(r.sequences()?),
            4 => Self::Reset,
            5 => Self::Heartbeat,
            6 => Self::Ack(r.u64()?),
            7 => Self::Handover {
                shard: Shard::new(r.u16()?).ok_or(ReplicationError::Malformed("shard"))?,
                to: MemberId(r.u16()?),
            },
            _ => return Err(ReplicationError::Malformed("kind")),
        };
        if !r.0.is_empty() {
            return Err(ReplicationError::Malformed("trailing bytes"));
        }
        Ok(m)
    }
}

fn put_sequences(out: &mut Vec<u8>, s: &[Sequences]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    for e in s {
        out.extend_from_slice(&e.spi_in.to_be_bytes());
        out.extend_from_slice(&e.ceiling.to_be_bytes());
        out.extend_from_slice(&e.top.to_be_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReplicationError> {
        if n > self.0.len() {
            return Err(ReplicationError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ReplicationError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ReplicationError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ReplicationError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ReplicationError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    fn sequences(&mut self) -> Result<Vec<Sequences>, ReplicationError> {
        let n = self.u32()? as usize;
        // Each entry takes 20 bytes: a count the input cannot back is refused before any
        // allocation.
        if n > MAX_ENTRIES || n.saturating_mul(20) > self.0.len() {
            return Err(ReplicationError::Malformed("entry count"));
        }
        (0..n)
            .map(|_| {
                Ok(Sequences {
                    spi_in: self.u32()?,
                    ceiling: self.u64()?,
                    top: self.u64()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> FleetKey {
        FleetKey::new(&[b; 32]).unwrap()
    }

    fn hello(m: u16, r: u8) -> Hello {
        Hello {
            member: MemberId(m),
            lease: 7,
            random: [r; 16],
        }
    }

    #[test]
    fn hello_round_trips_and_refuses_other_protocols() {
        let h = hello(7, 9);
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert_eq!(Hello::decode(&bad), Err(ReplicationError::Hello));
        assert_eq!(Hello::decode(&bad[..5]), Err(ReplicationError::Hello));
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::Sa {
                shard: Shard::new(1023).unwrap(),
                id: 0x1122_3344_5566_7788,
                snapshot: Zeroizing::new(vec![1, 2, 3]),
                context: b"{}".to_vec(),
                children: vec![Sequences {
                    spi_in: 5,
                    ceiling: 65536,
                    top: 17,
                }],
            },
            Message::Delete { id: 42 },
            Message::Sequences(vec![]),
            Message::Reset,
            Message::Heartbeat,
            Message::Ack(9),
            Message::Handover {
                shard: Shard::new(12).unwrap(),
                to: MemberId(3),
            },
        ]
    }

    #[test]
    fn messages_round_trip_through_both_directions() {
        let (a, b) = (hello(1, 1), hello(2, 2));
        let (mut c_tx, mut c_rx) = records(&key(3), true, &a, &b).unwrap();
        let (mut s_tx, mut s_rx) = records(&key(3), false, &b, &a).unwrap();
        for m in messages() {
            let mut wire = Vec::new();
            c_tx.seal(&m.encode(), &mut wire).unwrap();
            let n = Records::record_len(wire[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, wire.len() - 4);
            let body = s_rx.open(&mut wire[4..]).unwrap();
            assert_eq!(Message::decode(body).unwrap(), m);
            let mut back = Vec::new();
            s_tx.seal(&Message::Ack(1).encode(), &mut back).unwrap();
            assert_eq!(
                Message::decode(c_rx.open(&mut back[4..]).unwrap()),
                Ok(Message::Ack(1))
            );
        }
    }

    #[test]
    fn another_key_a_replayed_record_or_an_altered_one_is_refused() {
        let (a, b) = (hello(1, 1), hello(2, 2));
        let (mut tx, _) = records(&key(3), true, &a, &b).unwrap();
        let (_, mut wrong) = records(&key(4), false, &b, &a).unwrap();
        let mut wire = Vec::new();
        tx.seal(&Message::Heartbeat.encode(), &mut wire).unwrap();
        assert_eq!(
            wrong.open(&mut wire.clone()[4..]),
            Err(ReplicationError::Authentication)
        );
        // The same key with the other side's random bytes changed: another connection.
        let (_, mut later) = records(&key(3), false, &hello(2, 5), &a).unwrap();
        assert_eq!(
            later.open(&mut wire.clone()[4..]),
            Err(ReplicationError::Authentication)
        );
        // A hello altered on the way (another lease): other keys.
        let relabelled = Hello { lease: 8, ..a };
        let (_, mut other) = records(&key(3), false, &b, &relabelled).unwrap();
        assert_eq!(
            other.open(&mut wire.clone()[4..]),
            Err(ReplicationError::Authentication)
        );
        let (_, mut rx) = records(&key(3), false, &b, &a).unwrap();
        let mut altered = wire.clone();
        altered[5] ^= 1;
        assert_eq!(rx.open(&mut altered[4..]), Err(ReplicationError::Authentication));
        // The failed attempt used up record 0; a fresh receiver opens the genuine one once.
        let (_, mut rx) = records(&key(3), false, &b, &a).unwrap();
        assert!(rx.open(&mut wire.clone()[4..]).is_ok());
        assert_eq!(rx.open(&mut wire[4..]), Err(ReplicationError::Authentication));
    }

    #[test]
    fn malformed_bodies_are_refused_without_panic() {
        for m in messages() {
            let e = m.encode();
            for cut in 0..e.len() {
                assert!(Message::decode(&e[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut long = e.to_vec();
            long.push(0);
            assert!(Message::decode(&long).is_err());
        }
        // A count no input backs.
        assert_eq!(
            Message::decode(&[3, 0xff, 0xff, 0xff, 0xff]),
            Err(ReplicationError::Malformed("entry count"))
        );
        assert_eq!(
            Message::decode(&[1, 0x04, 0x00]),
            Err(ReplicationError::Malformed("shard"))
        );
        assert!(Records::record_len([0xff; 4]).is_err());
        assert!(Records::record_len([0; 4]).is_err());
    }

    #[test]
    fn debug_output_shows_no_snapshot_bytes() {
        let m = Message::Sa {
            shard: Shard::new(3).unwrap(),
            id: 1,
            snapshot: Zeroizing::new(vec![0xAB; 8]),
            context: vec![],
            children: vec![],
        };
        let s = format!("{m:?}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab, "), "{s}");
    }
}
