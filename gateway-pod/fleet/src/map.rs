//! The shard map: for each shard its owner, the epoch of that ownership, and a move in
//! progress; its binary codec; and [`plan`], the elected leader's decision of the next map.
//!
//! Only the leader writes the map (one etcd key, fenced by the leader key); every pod watches
//! it. A shard changes owner in two cases only:
//! - its owner is gone (its lease expired): the shard is given to a live member at once;
//! - a move the leader marked has finished: the leader marks a shard `moving_to` a member
//!   below its share, the owner stops putting new SAs in it, and once the owner reports
//!   (having applied the map with the mark) that it holds no SA there, the shard moves.
//!
//! A shard whose owner is gone goes to its [`replica`] first: the live member, other than the
//! owner, that ranks highest for the shard by rendezvous hashing. The owner replicates the
//! shard's SAs there, so that member can carry them on. Rendezvous hashing keeps the replica
//! of most shards when members come and go, and spreads a dead member's shards over all the
//! others.
//!
//! So a live owner never loses a shard in which it holds an SA: a pod joining a busy fleet
//! gets empty shards first and the others as their tunnels end. A draining member's shards
//! are all marked at once, each to its [`replica`]: the owner hands each over with its SAs
//! (freezes it, sends its final state there, and reports it empty once that member
//! acknowledged), so draining does not wait for tunnels to end. A member that stops
//! draining keeps the shards it has not handed over yet (their marks are taken back).

use std::collections::BTreeMap;

use crate::member::MemberId;
use crate::shard::{SHARDS, Shard, ShardSet};

/// "No member" in the codec.
const NONE: u16 = u16::MAX;
const MAGIC: &[u8; 4] = b"SMAP";
const CODEC_VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 8 + 2;
const ENTRY_LEN: usize = 2 + 4 + 2 + 8;

/// One shard's line of the map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Who owns it (allocates SPIs in it and handles its SAs), if anyone.
    pub owner: Option<MemberId>,
    /// Raised each time the owner changes: a message about the shard that names an older
    /// epoch comes from a pod that has not seen the change.
    pub epoch: u32,
    /// Where the leader is moving it: the owner puts no new SA in it meanwhile.
    pub moving_to: Option<MemberId>,
    /// The map version that set `moving_to`.
    pub marked_at: u64,
}

/// The shard map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    version: u64,
    entries: Vec<Entry>,
}

/// Why bytes from etcd are not a shard map.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Shorter or longer than its header says.
    #[error("shard map: {0} bytes, expected {1}")]
    Length(usize, usize),
    /// Not a shard map.
    #[error("shard map: bad magic")]
    Magic,
    /// Written by a version of the gateway that this one does not read.
    #[error("shard map: codec version {0} (this gateway reads {CODEC_VERSION})")]
    Version(u8),
    /// Written by a fleet with another number of shards.
    #[error("shard map: {0} shards (this gateway has {SHARDS})")]
    Shards(u16),
}

impl Default for ShardMap {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardMap {
    /// A map in which nobody owns anything (version 0).
    pub fn new() -> Self {
        Self {
            version: 0,
            entries: vec![Entry::default(); usize::from(SHARDS)],
        }
    }

    /// Raised by each change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The line of shard `s`.
    pub fn entry(&self, s: Shard) -> &Entry {
        &self.entries[s.index()]
    }

    /// Who owns `s`.
    pub fn owner(&self, s: Shard) -> Option<MemberId> {
        self.entry(s).owner
    }

    /// The shards `m` owns.
    pub fn owned_by(&self, m: MemberId) -> ShardSet {
        Shard::all().filter(|s| self.owner(*s) == Some(m)).collect()
    }

    /// The shards in which `m` may put new SAs: its own, except those being moved away.
    pub fn allocatable(&self, m: MemberId) -> ShardSet {
        Shard::all()
            .filter(|s| {
                let e = self.entry(*s);
                e.owner == Some(m) && e.moving_to.is_none()
            })
            .collect()
    }

    /// The members that own at least one shard in which they may put new SAs.
    pub fn allocating_members(&self) -> Vec<MemberId> {
        let mut members: Vec<MemberId> = self
            .entries
            .iter()
            .filter(|e| e.moving_to.is_none())
            .filter_map(|e| e.owner)
            .collect();
        members.sort_unstable();
        members.dedup();
        members
    }

    /// The map as stored in etcd: `SMAP`, codec version, map version, shard count, then per
    /// shard owner, epoch, moving-to and marked-at, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.entries.len());
        out.extend_from_slice(MAGIC);
        out.push(CODEC_VERSION);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&SHARDS.to_be_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.owner.map_or(NONE, |m| m.0).to_be_bytes());
            out.extend_from_slice(&e.epoch.to_be_bytes());
            out.extend_from_slice(&e.moving_to.map_or(NONE, |m| m.0).to_be_bytes());
            out.extend_from_slice(&e.marked_at.to_be_bytes());
        }
        out
    }

    /// A map read from etcd.
    pub fn decode(bytes: &[u8]) -> Result<Self, MapError> {
        let expected = HEADER_LEN + ENTRY_LEN * usize::from(SHARDS);
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or(MapError::Length(bytes.len(), expected))?;
        if &header[..4] != MAGIC {
            return Err(MapError::Magic);
        }
        if header[4] != CODEC_VERSION {
            return Err(MapError::Version(header[4]));
        }
        let version = u64::from_be_bytes(array(&header[5..13]));
        let shards = u16::from_be_bytes(array(&header[13..15]));
        if shards != SHARDS {
            return Err(MapError::Shards(shards));
        }
        if bytes.len() != expected {
            return Err(MapError::Length(bytes.len(), expected));
        }
        // Every other value is a valid ID (`MemberId::MAX` is `NONE - 1`).
        let member = |raw: u16| (raw != NONE).then_some(MemberId(raw));
        let entries = bytes[HEADER_LEN..]
            .chunks_exact(ENTRY_LEN)
            .map(|c| Entry {
                owner: member(u16::from_be_bytes(array(&c[0..2]))),
                epoch: u32::from_be_bytes(array(&c[2..6])),
                moving_to: member(u16::from_be_bytes(array(&c[6..8]))),
                marked_at: u64::from_be_bytes(array(&c[8..16])),
            })
            .collect();
        Ok(Self { version, entries })
    }
}

/// A fixed-size array from a slice whose length the caller checked.
fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// What the leader knows of a live member (from its record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The map version it has applied.
    pub map_version: u64,
    /// The shards in which it holds SAs (half-open ones included).
    pub occupied: ShardSet,
    /// It is draining: its shards go elsewhere and it gets none.
    pub draining: bool,
}

/// The leader's decision: the next map for these live members, or `None` when the map
/// stays as it is. Deterministic: every leader decides the same from the same inputs.
///
/// Shards of members that are gone are given to the members furthest below their share;
/// each accepting member's share is `SHARDS / n` (the first `SHARDS % n` members by ID one
/// more), a draining member's is zero; shards above a member's share are marked to move to
/// members below theirs (empty ones first), and a marked shard moves once its owner has
/// reported it empty after seeing the mark.
pub fn plan(map: &ShardMap, members: &BTreeMap<MemberId, Report>) -> Option<ShardMap> {
    let version = map.version.wrapping_add(1);
    let mut next = map.clone();
    next.version = version;
    let live = |m: &Option<MemberId>| m.is_some_and(|m| members.contains_key(&m));
    let accepting = |m: MemberId| members.get(&m).is_some_and(|r| !r.draining);

    let candidates: Vec<MemberId> = members.keys().copied().filter(|m| accepting(*m)).collect();
    for (shard, e) in Shard::all().zip(next.entries.iter_mut()) {
        if let Some(gone) = e.owner.filter(|_| !live(&e.owner)) {
            // The replica holds the shard's SAs: it carries them on.
            e.owner = replica(shard, gone, &candidates);
            e.moving_to = None;
            e.epoch = e.epoch.wrapping_add(1);
        }
        if e.moving_to.is_some_and(|b| !accepting(b)) {
            e.moving_to = None;
        }
        if let (Some(o), Some(b)) = (e.owner, e.moving_to) {
            let report = &members[&o];
            if report.map_version >= e.marked_at && !report.occupied.contains(shard) {
                e.owner = Some(b);
                e.moving_to = None;
                e.epoch = e.epoch.wrapping_add(1);
            }
        }
    }

    let targets = shares(members);
    let mut owned: BTreeMap<MemberId, i64> = members.keys().map(|m| (*m, 0)).collect();
    let mut incoming = owned.clone();
    let mut outgoing = owned.clone();
    for e in &next.entries {
        if let Some(o) = e.owner {
            *owned.entry(o).or_default() += 1;
        }
        if let (Some(o), Some(b)) = (e.owner, e.moving_to) {
            *incoming.entry(b).or_default() += 1;
            *outgoing.entry(o).or_default() += 1;
        }
    }
    let deficit = |m: &MemberId, owned: &BTreeMap<MemberId, i64>, incoming: &BTreeMap<MemberId, i64>| {
        targets[m] - owned[m] - incoming[m]
    };
    // The member furthest below its share (lowest ID on a tie), if any is below.
    let neediest = |owned: &BTreeMap<MemberId, i64>, incoming: &BTreeMap<MemberId, i64>| {
        members
            .keys()
            .filter(|m| accepting(**m))
            .map(|m| (deficit(m, owned, incoming), *m))
            .filter(|(d, _)| *d > 0)
            .max_by_key(|(d, m)| (*d, std::cmp::Reverse(*m)))
            .map(|(_, m)| m)
    };

    for e in next.entries.iter_mut().filter(|e| e.owner.is_none()) {
        // Unowned shards go to a member even above its share (all of them are, after a
        // rounding): a shard nobody owns is a shard nobody can serve.
        let m = neediest(&owned, &incoming).or_else(|| {
            members
                .keys()
                .filter(|m| accepting(**m))
                .min_by_key(|m| (owned[*m], **m))
                .copied()
        });
        let Some(m) = m else { break };
        e.owner = Some(m);
        e.epoch = e.epoch.wrapping_add(1);
        if let Some(n) = owned.get_mut(&m) {
            *n += 1;
        }
    }

    for (o, report) in members {
        let mut excess = owned[o] - outgoing[o] - targets[o];
        if report.draining {
            // Handed over with their SAs (the owner freezes each one, sends its final state
            // and reports it empty once acknowledged): each to the member that holds its
            // copies already, so the hand-over sends only what changed since.
            for (shard, e) in Shard::all().zip(next.entries.iter_mut()) {
                if e.owner != Some(*o) || e.moving_to.is_some() {
                    continue;
                }
                if let Some(b) = replica(shard, *o, &candidates) {
                    e.moving_to = Some(b);
                    e.marked_at = version;
                    if let Some(n) = incoming.get_mut(&b) {
                        *n += 1;
                    }
                }
            }
            continue;
        }
        if excess < 0 {
            // Below its share with shards marked away (it stopped draining): it keeps them.
            for e in next.entries.iter_mut() {
                if excess >= 0 {
                    break;
                }
                if e.owner == Some(*o)
                    && let Some(b) = e.moving_to.take()
                {
                    if let Some(n) = incoming.get_mut(&b) {
                        *n -= 1;
                    }
                    excess += 1;
                }
            }
            continue;
        }
        if excess == 0 {
            continue;
        }
        // Empty shards first: they move at the owner's next report.
        let mut candidates: Vec<(bool, usize)> = Shard::all()
            .zip(&next.entries)
            .filter(|(_, e)| e.owner == Some(*o) && e.moving_to.is_none())
            .map(|(s, _)| (report.occupied.contains(s), s.index()))
            .collect();
        candidates.sort_unstable();
        for (_, i) in candidates {
            if excess <= 0 {
                break;
            }
            let Some(b) = neediest(&owned, &incoming) else {
                break;
            };
            let e = &mut next.entries[i];
            e.moving_to = Some(b);
            e.marked_at = version;
            if let Some(n) = incoming.get_mut(&b) {
                *n += 1;
            }
            excess -= 1;
        }
    }

    (next.entries != map.entries).then_some(next)
}

/// The member that holds a copy of `shard`'s SAs while `owner` owns it: of `members` (the
/// live members that accept shards), the one other than `owner` with the highest rendezvous
/// score for the shard. `None` when the owner is alone.
pub fn replica(shard: Shard, owner: MemberId, members: &[MemberId]) -> Option<MemberId> {
    members
        .iter()
        .copied()
        .filter(|m| *m != owner)
        .max_by_key(|m| (rendezvous(shard, *m), std::cmp::Reverse(*m)))
}

/// The `n` members that hold copies of `shard`'s SAs while `owner` owns it: of `members`,
/// the `n` others with the highest rendezvous scores, best first (fewer when there are not
/// so many). The first is [`replica`]: when the owner dies the leader gives the shard to the
/// best live one, which is the next in this order when the first died too.
pub fn replicas(shard: Shard, owner: MemberId, members: &[MemberId], n: usize) -> Vec<MemberId> {
    let mut ranked: Vec<MemberId> = members.iter().copied().filter(|m| *m != owner).collect();
    ranked.sort_unstable_by_key(|m| std::cmp::Reverse((rendezvous(shard, *m), std::cmp::Reverse(*m))));
    ranked.dedup();
    ranked.truncate(n);
    ranked
}

/// A well-mixed score of (shard, member) (SplitMix64's finaliser).
fn rendezvous(shard: Shard, m: MemberId) -> u64 {
    let mut z = (u64::from(shard.get()) << 16 | u64::from(m.0)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Each member's share of the shards.
fn shares(members: &BTreeMap<MemberId, Report>) -> BTreeMap<MemberId, i64> {
    let accepting = members.values().filter(|r| !r.draining).count() as i64;
    let total = i64::from(SHARDS);
    let mut rank = 0;
    members
        .iter()
        .map(|(m, r)| {
            let share = if r.draining || accepting == 0 {
                0
            } else {
                let extra = i64::from(rank < total % accepting);
                rank += 1;
                total / accepting + extra
            };
            (*m, share)
        })
        .collect()
}

#[cfg(test)]
mod tests;
