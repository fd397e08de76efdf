//! The driver's side of a drain in a fleet: each shard the leader marks away from this
//! draining member is handed over with its SAs. The driver stops handling the shard's IKE
//! SAs (their messages in and out are dropped, their changes not replicated), takes their
//! final snapshots and gives them to the replicator, which freezes their CHILD SAs in the
//! data plane, sends the final state to the new owner and, once acknowledged, has our
//! record say the shard is empty; the leader then moves the shard, the new owner carries
//! the SAs on exactly where they stopped (no rekey, no exchange with the sites), and this
//! member lets them go without a DELETE.
//!
//! Shards are handed over a few at a time, so each one's traffic pauses only for its own
//! round (the final state, one record write, one map write), not for the whole drain.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::driver::Driver;
use crate::cluster::{HandedSa, HandoverState};
use concentrator_fleet::{MemberId, Shard};

/// A shard whose final state is not acknowledged in this time is carried on here again
/// (the new owner is unreachable or slow); the leader's mark stays, so it is tried again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Shards frozen and not yet moved by the map, at most: more at once lengthens every one's
/// pause (they wait for the same map writes).
const IN_FLIGHT_SHARDS: usize = 4;
/// IKE SAs frozen and not yet moved, at most (a shard is never split).
const IN_FLIGHT_SAS: usize = 64;

/// What the driver keeps of its hand-overs.
#[derive(Default)]
pub(super) struct Handovers {
    /// Shards frozen here: to whom, since when, and whether acknowledged there.
    frozen: HashMap<Shard, (MemberId, Instant, std::sync::Arc<HandoverState>)>,
    /// The IKE SAs of frozen shards (and of shards handed over, until they are gone here).
    ids: HashSet<u64>,
    /// Handed over and let go: their removal forgets their copies instead of deleting them.
    released: HashSet<u64>,
    /// Every IKE SPI of ours of the frozen SAs (a rekeyed IKE SA's messages carry another
    /// than its id), by SA.
    spis: HashMap<u64, Vec<u64>>,
    /// Shards whose hand-over was given up: not tried again before this.
    retry_after: HashMap<Shard, Instant>,
}

/// The SPIs of frozen SAs when a batch of the engine's output began: what it queues for
/// them (a DELETE of one that expired meanwhile, a retransmission) is not sent.
pub(super) struct FrozenSpis(HashSet<u64>);

impl FrozenSpis {
    /// Whether an IKE message (its header's SPIs) belongs to a frozen SA.
    pub(super) fn holds_message(&self, datagram: &[u8]) -> bool {
        !self.0.is_empty() && header_spis(datagram).any(|s| self.0.contains(&s))
    }
}

/// The non-zero SPIs of an IKE header.
fn header_spis(datagram: &[u8]) -> impl Iterator<Item = u64> + '_ {
    [0..8, 8..16]
        .into_iter()
        .filter_map(|r| datagram.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok()))
        .map(u64::from_be_bytes)
        .filter(|s| *s != 0)
}

impl Handovers {
    /// Whether the IKE SA with our SPI `id` is frozen (handed over, or being).
    pub(super) fn holds(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// The SPIs of the frozen SAs now.
    pub(super) fn frozen_spis(&self) -> FrozenSpis {
        FrozenSpis(self.spis.values().flatten().copied().collect())
    }

    /// Whether an IKE message (its header's SPIs) belongs to a frozen SA.
    pub(super) fn holds_message(&self, datagram: &[u8]) -> bool {
        !self.spis.is_empty() && header_spis(datagram).any(|s| self.spis.values().any(|v| v.contains(&s)))
    }

    fn forget_shard(&mut self, shard: Shard) {
        self.ids.retain(|id| Shard::of_ike_spi(*id) != shard);
        self.spis.retain(|id, _| Shard::of_ike_spi(*id) != shard);
    }

    /// Whether SA `id` was handed over and let go here (its site's claim is taken over by
    /// its new owner, not released).
    pub(super) fn is_released(&self, id: u64) -> bool {
        self.released.contains(&id)
    }

    /// Whether SA `id`, now gone here, was handed over (its copies are the new owner's).
    pub(super) fn take_released(&mut self, id: u64) -> bool {
        self.ids.remove(&id);
        self.spis.remove(&id);
        self.released.remove(&id)
    }
}

impl Driver {
    /// Acts on the shard map for a draining member: lets go of shards the leader moved,
    /// carries on those whose hand-over failed, and freezes the next ones.
    pub(super) fn handover_tick(&mut self) {
        let draining = self.gateway.is_draining();
        let (Some(f), Some(r)) = (self.fleet.as_ref(), self.replicas.as_ref()) else {
            return;
        };
        let Some(replicator) = r.replicator.clone() else {
            return;
        };
        let view = f.view.clone();
        let Some(me) = view.me() else { return };
        let metrics = self.gateway.metrics.fleet.handover.clone();
        let now = Instant::now();
        // A shard said empty for a hand-over that is not going on (it moved, or this member
        // stopped draining) must read as occupied again whenever it holds SAs.
        for s in Shard::all() {
            if let Some(to) = view.handed_to(s)
                && !self.handovers.frozen.contains_key(&s)
                && (!draining || view.owner(s) != Some(me) || view.moving_to(s) != Some(to))
            {
                view.set_handed(s, None);
            }
        }

        let frozen: Vec<(Shard, MemberId, Instant, std::sync::Arc<HandoverState>)> = self
            .handovers
            .frozen
            .iter()
            .map(|(s, (to, at, state))| (*s, *to, *at, state.clone()))
            .collect();
        for (shard, to, since, state) in frozen {
            let owner = view.owner(shard);
            if owner != Some(me) {
                // Moved (to `to`, or elsewhere if this member was fenced meanwhile): the SAs
                // are carried on there; they go here without a DELETE.
                self.handovers.frozen.remove(&shard);
                view.set_handed(shard, None);
                metrics.pause.observe(now.duration_since(since).as_secs_f64());
                metrics.count("moved");
                let ids: Vec<u64> = self
                    .sas
                    .keys()
                    .copied()
                    .filter(|id| Shard::of_ike_spi(*id) == shard && self.handovers.ids.contains(id))
                    .collect();
                metrics.sas.inc_by(ids.len() as u64);
                for id in ids {
                    self.handovers.released.insert(id);
                    self.endpoint.close(id);
                }
                tracing::info!(
                    shard = %shard,
                    member = ?owner,
                    pause_ms = now.duration_since(since).as_millis() as u64,
                    "shard handed over"
                );
                continue;
            }
            let still_asked = view.moving_to(shard) == Some(to);
            // Acknowledged, the new owner may carry the SAs on as soon as the map says so:
            // they resume here only if the leader took the mark back (then it never moves
            // the shard without a new hand-over).
            let give_up = if state.acknowledged() {
                !still_asked
            } else {
                (!still_asked || !draining || now.duration_since(since) > ACK_TIMEOUT) && state.cancel()
            };
            let acknowledged = state.acknowledged();
            if give_up {
                self.handovers.frozen.remove(&shard);
                self.handovers.forget_shard(shard);
                // Without copies the target is no replica: its final copy may outlive the
                // Delete that tells it to forget, so the replicator caps these CHILD SAs at
                // their final ceilings for good; new ones (new keys) take over soon.
                if replicator.copies() == 0 {
                    self.rekey_shard_soon(shard, now);
                }
                // Not at once again: a target that does not answer would keep it frozen.
                self.handovers.retry_after.insert(shard, now + ACK_TIMEOUT);
                replicator.resume(shard);
                metrics.count("resumed");
                tracing::warn!(shard = %shard, member = %to, acknowledged, "hand-over given up: the shard's SAs go on here");
            }
        }

        if !draining {
            return;
        }
        // Every frozen shard counts until the map moves it: the leader's map writes set the
        // pace, and a shard frozen ahead of them would only pause longer.
        let in_flight: Vec<Shard> = self.handovers.frozen.keys().copied().collect();
        let mut budget_shards = IN_FLIGHT_SHARDS.saturating_sub(in_flight.len());
        let mut budget_sas = IN_FLIGHT_SAS.saturating_sub(
            self.handovers
                .ids
                .iter()
                .filter(|id| in_flight.contains(&Shard::of_ike_spi(**id)))
                .count(),
        );
        if budget_shards == 0 {
            return;
        }
        // The shards of ours marked away, with the SAs in each; a shard with a half-open SA
        // waits for it (its state is not in a snapshot).
        let mut by_shard: HashMap<Shard, (Vec<u64>, bool)> = HashMap::new();
        let mut spis_of: HashMap<u64, Vec<u64>> = HashMap::new();
        for (id, sa) in self.endpoint.sas() {
            let e = by_shard.entry(Shard::of_ike_spi(id)).or_default();
            e.0.push(id);
            let recorded = self.sas.get(&id).is_some_and(|r| r.established_at.is_some());
            e.1 |= !sa.is_established() || !recorded;
            spis_of.insert(id, sa.our_spis());
        }
        self.handovers.retry_after.retain(|_, t| *t > now);
        let mut candidates: Vec<(Shard, MemberId)> = Shard::all()
            .filter(|s| view.owner(*s) == Some(me) && !self.handovers.frozen.contains_key(s))
            .filter(|s| !self.handovers.retry_after.contains_key(s))
            .filter_map(|s| view.moving_to(s).map(|to| (s, to)))
            .filter(|(s, _)| by_shard.get(s).is_none_or(|(_, half_open)| !half_open))
            .collect();
        candidates.sort_unstable();
        for (shard, to) in candidates {
            let ids = by_shard.remove(&shard).map(|(ids, _)| ids).unwrap_or_default();
            if ids.is_empty() {
                // Nothing to send: the leader moves it at our next record.
                if view.handed_to(shard) != Some(to) {
                    view.set_handed(shard, Some(to));
                    metrics.count("empty");
                }
                continue;
            }
            if budget_shards == 0 || (ids.len() > budget_sas && budget_sas < IN_FLIGHT_SAS) {
                break;
            }
            let mut sas = Vec::with_capacity(ids.len());
            for id in &ids {
                let Some(rec) = self.sas.get(id) else { continue };
                let snapshot = match self.endpoint.snapshot(*id, now) {
                    Ok(s) => s.encode(),
                    Err(e) => {
                        tracing::warn!(peer_id = %rec.peer_id, error = %e, "no snapshot of an SA to hand over: shard kept");
                        sas.clear();
                        break;
                    }
                };
                let Some(context) = self.replication_context(*id) else {
                    sas.clear();
                    break;
                };
                sas.push(HandedSa {
                    id: *id,
                    snapshot,
                    context,
                    children: super::replicas::replicated_children(rec),
                });
            }
            if sas.len() != ids.len() {
                continue;
            }
            budget_shards -= 1;
            budget_sas = budget_sas.saturating_sub(ids.len());
            self.handovers.ids.extend(ids.iter().copied());
            for id in &ids {
                let spis = spis_of.remove(id).unwrap_or_else(|| vec![*id]);
                self.handovers.spis.insert(*id, spis);
            }
            let state = std::sync::Arc::new(HandoverState::default());
            self.handovers.frozen.insert(shard, (to, now, state.clone()));
            tracing::debug!(shard = %shard, member = %to, sas = ids.len(), "shard frozen for its hand-over");
            replicator.hand_over(shard, to, sas, state);
        }
    }
}

impl Driver {
    /// Rekeys every CHILD SA of `shard` shortly (the replication tick runs what is due).
    fn rekey_shard_soon(&mut self, shard: Shard, now: Instant) {
        let due: Vec<(u64, u32)> = self
            .sas
            .iter()
            .filter(|(id, _)| Shard::of_ike_spi(**id) == shard)
            .flat_map(|(id, rec)| rec.children.iter().map(move |c| (*id, c.spi_in)))
            .collect();
        if let Some(r) = self.replicas.as_mut() {
            r.rekey_at(now, due);
        }
    }
}
