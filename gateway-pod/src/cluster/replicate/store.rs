//! The copies a replica keeps of its owners' IKE SAs, by owner incarnation, and the view's
//! count of them per shard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use concentrator_fleet::replication::Message;
use concentrator_fleet::{MemberId, Shard};
use zeroize::Zeroizing;

use crate::cluster::view::SharedView;

/// A copy of an IKE SA that another member owns.
pub struct Copy {
    pub shard: Shard,
    pub id: u64,
    pub snapshot: Zeroizing<Vec<u8>>,
    pub context: Vec<u8>,
    /// By the CHILD SA's inbound SPI: (ceiling, inbound top).
    pub sequences: HashMap<u32, (u64, u64)>,
}

#[derive(Default)]
struct OwnerCopies {
    sas: HashMap<u64, Copy>,
    by_spi: HashMap<u32, u64>,
    /// Shards the owner handed over (froze, their final state sent): carried on by the
    /// member the map gives them to, although the owner lives.
    handed: HashMap<Shard, MemberId>,
}

impl OwnerCopies {
    fn apply(&mut self, m: Message) {
        match m {
            Message::Sa {
                shard,
                id,
                snapshot,
                context,
                children,
            } => {
                if let Some(old) = self.sas.remove(&id) {
                    for spi in old.sequences.keys() {
                        self.by_spi.remove(spi);
                    }
                }
                // The owner sends a shard's SAs again after its marker only when it gave
                // the hand-over up and carries the shard on itself.
                self.handed.remove(&shard);
                let sequences = children
                    .iter()
                    .map(|s| (s.spi_in, (s.ceiling, s.top)))
                    .collect::<HashMap<_, _>>();
                for spi in sequences.keys() {
                    self.by_spi.insert(*spi, id);
                }
                self.sas.insert(
                    id,
                    Copy {
                        shard,
                        id,
                        snapshot,
                        context,
                        sequences,
                    },
                );
            }
            Message::Delete { id } => {
                if let Some(old) = self.sas.remove(&id) {
                    for spi in old.sequences.keys() {
                        self.by_spi.remove(spi);
                    }
                }
            }
            Message::Sequences(seqs) => {
                for s in seqs {
                    let Some(copy) = self.by_spi.get(&s.spi_in).and_then(|id| self.sas.get_mut(id)) else {
                        continue;
                    };
                    if let Some(e) = copy.sequences.get_mut(&s.spi_in) {
                        // Never backwards: a ceiling the owner may have used stays.
                        e.0 = e.0.max(s.ceiling);
                        e.1 = e.1.max(s.top);
                    }
                }
            }
            // A new stream from the owner. What it handed over stays: it is not sent again
            // (the owner lets those SAs go once the map moves the shard), and the member it
            // was handed to carries it on from these copies.
            Message::Reset => {
                let handed = std::mem::take(&mut self.handed);
                let kept: Vec<Copy> = std::mem::take(&mut self.sas)
                    .into_values()
                    .filter(|c| handed.contains_key(&c.shard))
                    .collect();
                *self = Self::default();
                for c in kept {
                    for spi in c.sequences.keys() {
                        self.by_spi.insert(*spi, c.id);
                    }
                    self.sas.insert(c.id, c);
                }
                self.handed = handed;
            }
            Message::Handover { shard, to } => {
                self.handed.insert(shard, to);
            }
            Message::Heartbeat | Message::Ack(_) => {}
        }
    }
}

/// An owner process: its member ID and the etcd lease of its membership. A member that
/// restarts comes back under another lease: the copies its old process sent are the old
/// incarnation's (to adopt once that lease is gone), never wiped by the new one's Reset.
pub type Incarnation = (MemberId, i64);

/// The copies this pod keeps as a replica, by owner incarnation (shared with the driver,
/// which adopts them). The view counts them per shard ([`crate::cluster::View::occupied`]).
#[derive(Clone)]
pub struct ReplicaStore {
    copies: Arc<Mutex<HashMap<Incarnation, OwnerCopies>>>,
    view: SharedView,
}

impl ReplicaStore {
    pub fn new(view: SharedView) -> Self {
        Self {
            copies: Arc::default(),
            view,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Incarnation, OwnerCopies>> {
        self.copies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn apply(&self, owner: Incarnation, m: Message) {
        let mut all = self.lock();
        let copies = all.entry(owner).or_default();
        let before: Vec<Shard> = match &m {
            Message::Sa { id, .. } | Message::Delete { id } => {
                copies.sas.get(id).map(|c| c.shard).into_iter().collect()
            }
            Message::Reset => copies.sas.values().map(|c| c.shard).collect(),
            _ => Vec::new(),
        };
        let added = match &m {
            Message::Sa { shard, .. } => Some(*shard),
            _ => None,
        };
        let reset = matches!(m, Message::Reset);
        copies.apply(m);
        for s in before {
            self.view.count_copy(s, false);
        }
        if let Some(s) = added {
            self.view.count_copy(s, true);
        }
        if reset {
            // What a reset kept (shards handed over) is counted again.
            for c in copies.sas.values() {
                self.view.count_copy(c.shard, true);
            }
        }
    }

    /// Takes out the copies `pick(owner, shard)` selects.
    pub fn take(&self, pick: impl Fn(Incarnation, Shard) -> bool) -> Vec<(Incarnation, Copy)> {
        let mut out = Vec::new();
        let mut all = self.lock();
        for (owner, copies) in all.iter_mut() {
            let ids: Vec<u64> = copies
                .sas
                .iter()
                .filter(|(_, c)| pick(*owner, c.shard))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(c) = copies.sas.remove(&id) {
                    for spi in c.sequences.keys() {
                        copies.by_spi.remove(spi);
                    }
                    self.view.count_copy(c.shard, false);
                    out.push((*owner, c));
                }
            }
        }
        all.retain(|_, c| !c.sas.is_empty());
        out
    }

    /// The shards of the copies `pick(owner, shard)` selects.
    pub fn shards(&self, pick: &impl Fn(Incarnation, Shard) -> bool) -> Vec<Shard> {
        let mut out: Vec<Shard> = self
            .lock()
            .iter()
            .flat_map(|(o, c)| c.sas.values().map(move |s| (*o, s.shard)))
            .filter(|(o, s)| pick(*o, *s))
            .map(|(_, s)| s)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The shards each owner handed over, and to whom (with copies here or not).
    pub fn handed(&self) -> HashMap<(Incarnation, Shard), MemberId> {
        self.lock()
            .iter()
            .flat_map(|(o, c)| c.handed.iter().map(move |(s, to)| ((*o, *s), *to)))
            .collect()
    }

    /// The owner incarnations we hold copies for.
    pub fn owners(&self) -> Vec<Incarnation> {
        self.lock().keys().copied().collect()
    }

    /// Forgets `owner`'s copies; returns how many there were.
    pub fn drop_owner(&self, owner: Incarnation) -> usize {
        let Some(c) = self.lock().remove(&owner) else {
            return 0;
        };
        for copy in c.sas.values() {
            self.view.count_copy(copy.shard, false);
        }
        c.sas.len()
    }

    /// Copies held, all owners together.
    pub fn len(&self) -> usize {
        self.lock().values().map(|c| c.sas.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use concentrator_fleet::replication::Sequences;

    use super::*;

    #[test]
    fn copies_follow_the_owner_and_never_move_a_ceiling_back() {
        let view: SharedView = Arc::new(crate::cluster::View::new());
        let store = ReplicaStore::new(view.clone());
        let owner = (MemberId(1), 7);
        let shard = Shard::new(7).unwrap();
        let seq = |ceiling, top| Sequences {
            spi_in: 5,
            ceiling,
            top,
        };
        let sa = |children| Message::Sa {
            shard,
            id: 9,
            snapshot: Zeroizing::new(vec![1]),
            context: vec![],
            children,
        };
        store.apply(owner, sa(vec![seq(100, 3)]));
        store.apply(owner, Message::Sequences(vec![seq(50, 10)]));
        assert!(view.occupied().contains(shard), "a copy makes its shard occupied");
        let taken = store.take(|o, s| o == owner && s == shard);
        assert!(!view.occupied().contains(shard));
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1.sequences[&5], (100, 10));
        assert!(store.is_empty());
        // A reset forgets the owner's copies.
        store.apply(owner, sa(vec![]));
        store.apply(owner, Message::Reset);
        assert!(store.is_empty());
    }

    #[test]
    fn a_handover_marker_names_the_new_owner_until_the_owner_sends_the_shard_again() {
        let view: SharedView = Arc::new(crate::cluster::View::new());
        let store = ReplicaStore::new(view);
        let owner = (MemberId(1), 7);
        let shard = Shard::new(9).unwrap();
        let sa = || Message::Sa {
            shard,
            id: 3,
            snapshot: Zeroizing::new(vec![1]),
            context: vec![],
            children: vec![],
        };
        store.apply(owner, sa());
        store.apply(
            owner,
            Message::Handover {
                shard,
                to: MemberId(2),
            },
        );
        assert_eq!(store.handed().get(&(owner, shard)), Some(&MemberId(2)));
        // The owner gave the hand-over up and carries the shard on: its next copy says so.
        store.apply(owner, sa());
        assert!(store.handed().is_empty());
        // A new stream starts over, but what was handed over stays with its marker: the
        // owner does not send it again.
        store.apply(
            owner,
            Message::Handover {
                shard,
                to: MemberId(2),
            },
        );
        let other = Shard::new(10).unwrap();
        store.apply(
            owner,
            Message::Sa {
                shard: other,
                id: 4,
                snapshot: Zeroizing::new(vec![2]),
                context: vec![],
                children: vec![],
            },
        );
        store.apply(owner, Message::Reset);
        assert_eq!(store.handed().get(&(owner, shard)), Some(&MemberId(2)));
        assert_eq!(store.len(), 1, "the handed shard's copy stays, the other goes");
    }
}
