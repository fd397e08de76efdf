//! The driver's side of SA replication ([`crate::cluster::Replicator`]): every IKE SA the
//! engine touched goes to its shard's replica as a snapshot with the driver's record
//! beside it; when the leader gives this pod the shards of a member that is gone, the copies
//! of their SAs are carried on here (adopted) with no exchange with the sites; and when this
//! pod finds a shard of its own given away (it was fenced: frozen, or cut off from etcd
//! longer than its lease), it gives up that shard's SAs at once, without a DELETE, since
//! another member carries them on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use concentrator_fleet::{MemberId, Shard};
use concentrator_ike::responder::Config as ResponderConfig;
use concentrator_ike::sa::snapshot::IkeSaSnapshot;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::driver::Driver;
use super::events::IkeSaRecord;
use super::ike_config::responder_config;
use crate::cluster::{
    Incarnation, ReplicaCopy, ReplicaStore, ReplicaUpdate, ReplicatedChild, ReplicationMetrics, Replicator,
};
use crate::dataplane::backend::Resume;

/// How long after a take-over the adopted CHILD SAs are rekeyed: long enough for the
/// front to move the sites' flows (so the exchange reaches them), short enough to close the
/// replay exposure soon and put the SAs in this member's shards.
const REKEY_AFTER_ADOPTION: Duration = Duration::from_secs(2);

/// What the driver keeps of replication.
pub(super) struct DriverReplicas {
    /// Copies SAs to their replicas (none with `--fleet-replicas 0`: others' copies are
    /// still adopted, members of one fleet may differ while it is reconfigured) and hands
    /// shards over when draining.
    pub(super) replicator: Option<Replicator>,
    store: ReplicaStore,
    metrics: ReplicationMetrics,
    /// The map version last acted on.
    map_version: u64,
    /// Adopted CHILD SAs to rekey: (when, IKE SA, inbound SPI).
    rekeys: Vec<(Instant, u64, u32)>,
    /// Owner incarnations with copies here that are gone, and since when.
    gone_since: HashMap<Incarnation, Instant>,
    /// How long copies of a gone owner whose shard went to another member are kept: that
    /// member may be dead too without the fleet knowing yet (its lease runs), and then the
    /// shard comes to the next replica, which needs them.
    stale_after: Duration,
    /// Adopted IKE SAs ask their sites for their Message ID counters (RFC 6311).
    sync_after_restore: bool,
}

impl DriverReplicas {
    pub(super) fn new(
        replicator: Option<Replicator>,
        store: ReplicaStore,
        metrics: ReplicationMetrics,
        lease_ttl: Duration,
        sync_after_restore: bool,
    ) -> Self {
        Self {
            replicator,
            store,
            metrics,
            map_version: 0,
            rekeys: Vec::new(),
            gone_since: HashMap::new(),
            stale_after: lease_ttl * 2 + Duration::from_secs(1),
            sync_after_restore,
        }
    }
}

impl DriverReplicas {
    /// Rekeys these CHILD SAs (IKE SA, inbound SPI) at `at`.
    pub(super) fn rekey_at(&mut self, at: Instant, sas: Vec<(u64, u32)>) {
        self.rekeys.extend(sas.into_iter().map(|(id, spi)| (at, id, spi)));
    }
}

/// The driver's record of an IKE SA as it travels beside the snapshot.
#[derive(Serialize, Deserialize)]
struct Context {
    peer_id: String,
    eroute: Option<String>,
    egroup: Option<String>,
    site_subnet: Option<IpNet>,
    site: Option<String>,
    nat: bool,
    /// The member the site's flow enters the fleet through, as the owner knows it (`None`:
    /// the owner itself). Absent from copies of older members.
    #[serde(default)]
    entry: Option<MemberId>,
}

impl Driver {
    /// Sends the SAs the engine touched since the last call to their replicas.
    pub(super) fn replicate_changed(&mut self) {
        let Some(replicator) = self
            .replicas
            .as_ref()
            .and_then(|r| r.replicator.clone())
            .filter(|r| r.copies() > 0)
        else {
            return;
        };
        let now = Instant::now();
        for id in self.endpoint.take_changed() {
            // Frozen for a hand-over: its final state went already.
            if self.handovers.holds(id) {
                continue;
            }
            let Some(rec) = self.sas.get(&id).filter(|r| r.established_at.is_some()) else {
                continue;
            };
            let snapshot = match self.endpoint.snapshot(id, now) {
                Ok(s) => s.encode(),
                Err(e) => {
                    tracing::debug!(peer_id = %rec.peer_id, error = %e, "no snapshot to replicate");
                    continue;
                }
            };
            let Some(context) = self.replication_context(id) else {
                continue;
            };
            let Some(rec) = self.sas.get(&id) else { continue };
            replicator.update(ReplicaUpdate::Sa {
                shard: Shard::of_ike_spi(id),
                id,
                snapshot,
                context,
                children: replicated_children(rec),
            });
        }
    }

    /// The driver's record of SA `id` as it travels beside its snapshot.
    pub(super) fn replication_context(&self, id: u64) -> Option<Vec<u8>> {
        let rec = self.sas.get(&id)?;
        let context = Context {
            peer_id: rec.peer_id.to_string(),
            eroute: rec.eroute.as_deref().map(str::to_owned),
            egroup: rec.egroup.as_deref().map(str::to_owned),
            site_subnet: rec.site_subnet,
            site: rec.site.as_ref().map(ToString::to_string),
            nat: rec.nat,
            entry: rec
                .remote
                .and_then(|r| self.fleet.as_ref().and_then(|f| f.entry_of_site(r))),
        };
        serde_json::to_vec(&context).ok()
    }

    /// IKE SA `id` is gone here: its copies go too, except the one a member it was handed
    /// over to carries on.
    pub(super) fn replicate_removed(&mut self, id: u64) {
        let handed = self.handovers.take_released(id);
        if let Some(r) = self.replicas.as_ref().and_then(|r| r.replicator.as_ref()) {
            r.update(if handed {
                ReplicaUpdate::Forget { id }
            } else {
                ReplicaUpdate::Delete { id }
            });
        }
    }

    /// Acts on a new shard map: adopts the copies of shards now ours whose owner is gone,
    /// and gives up SAs of shards that are no longer ours. Then rekeys adopted CHILD SAs
    /// whose time has come.
    pub(super) fn replication_tick(&mut self) {
        self.handover_tick();
        let (Some(r), Some(f)) = (self.replicas.as_mut(), self.fleet.as_ref()) else {
            return;
        };
        let now = Instant::now();
        let due: Vec<(u64, u32)> = {
            let (due, later): (Vec<_>, Vec<_>) = r.rekeys.drain(..).partition(|(at, ..)| *at <= now);
            r.rekeys = later;
            due.into_iter().map(|(_, id, spi)| (id, spi)).collect()
        };
        let version = f.view.map_version();
        let changed = version != r.map_version;
        r.map_version = version;
        for (id, spi_in) in due {
            let started = self.endpoint.rekey_child(id, spi_in, now, &mut self.entropy);
            tracing::info!(
                spi_in = format_args!("{spi_in:08x}"),
                started,
                "adopted CHILD SA rekeyed"
            );
        }
        let ripe: Vec<Incarnation> = r
            .gone_since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= r.stale_after)
            .map(|(o, _)| *o)
            .collect();
        if !changed && ripe.is_empty() {
            return;
        }
        let Some(me) = f.view.me() else { return };
        let view = f.view.clone();
        let members = view.members();
        let store: ReplicaStore = r.store.clone();
        // A copy's owner is gone when the lease it replicated under is no longer its
        // membership (it died, or restarted and rejoined under a new lease).
        let gone = |(member, lease): Incarnation| view.lease_of(member) != Some(lease);
        // Shards their owners handed over (drained) to a member: carried on there once the
        // map gives it the shard; the other replicas' copies are stale then.
        let handed = store.handed();
        let handed_to = |owner: Incarnation, shard: Shard| handed.get(&(owner, shard)).copied();
        let adopt = |owner: Incarnation, shard: Shard| {
            view.owner(shard) == Some(me) && (gone(owner) || handed_to(owner, shard) == Some(me))
        };
        // Held before the copies leave the store: the shard must read as occupied all along
        // (a shard that looks empty may be moved away by the leader).
        for shard in store.shards(&adopt) {
            view.hold(shard);
            // Said empty for a hand-over of ours just before: it is not empty any more.
            if view.handed_to(shard).is_some() {
                view.set_handed(shard, None);
            }
        }
        let copies = newest(store.take(adopt));
        let superseded = store.take(|owner, shard| {
            handed_to(owner, shard).is_some_and(|to| to != me && view.owner(shard) == Some(to))
        });
        if !superseded.is_empty() {
            tracing::debug!(
                copies = superseded.len(),
                "copies of shards handed to another member dropped"
            );
        }
        let owners = store.owners();
        r.gone_since.retain(|o, _| owners.contains(o));
        for owner in owners.into_iter().filter(|o| gone(*o)) {
            r.gone_since.entry(owner).or_insert(now);
        }
        // Copies of a member gone for a while whose shard went to another live member: that
        // one carries the SA on (or the site reconnects there); ours are stale.
        let stale = store.take(|owner, shard| {
            ripe.contains(&owner)
                && view
                    .owner(shard)
                    .is_some_and(|o| o != me && members.contains_key(&o))
        });
        if !stale.is_empty() {
            tracing::info!(
                copies = stale.len(),
                "copies of a gone member's SAs dropped: their shards went to another member"
            );
        }
        r.metrics.copies.set(store.len() as i64);
        for (incarnation, copy) in copies {
            let handover = !gone(incarnation);
            self.adopt(incarnation.0, copy, now, handover);
        }
        // Fenced: a shard of ours went to another member while we were away.
        if view.available() {
            let lost: Vec<u64> = self
                .sas
                .keys()
                .copied()
                .filter(|id| view.owner(Shard::of_ike_spi(*id)).is_some_and(|o| o != me))
                .filter(|id| !self.handovers.holds(*id))
                .collect();
            for id in lost {
                if let Some(r) = self.replicas.as_ref() {
                    r.metrics.stepped_down.inc();
                }
                let peer = self.sas.get(&id).map_or("-", |r| &*r.peer_id).to_owned();
                tracing::warn!(%peer, "IKE SA given up: its shard went to another member (this member was fenced)");
                self.endpoint.close(id);
            }
        }
    }

    /// Carries on `copy`, the IKE SA of `owner` (gone, or alive and draining: `handover`,
    /// where the copy is the exact final state, so no rekey or Message ID sync is needed).
    fn adopt(&mut self, owner: MemberId, copy: ReplicaCopy, now: Instant, handover: bool) {
        if self.sas.contains_key(&copy.id) {
            // The final state again (the owner's stream started over before it saw the new
            // map): carried on here already.
            return;
        }
        let fail = |d: &Self, reason: &str| {
            if let Some(r) = d.replicas.as_ref() {
                ReplicationMetrics::count(&r.metrics.adopt_failed, reason, 1);
            }
        };
        let snapshot = match IkeSaSnapshot::decode(&copy.snapshot) {
            Ok(s) => s,
            Err(e) => {
                fail(self, "snapshot");
                tracing::warn!(member = %owner, error = %e, "replicated IKE SA does not decode");
                return;
            }
        };
        let Ok(ctx) = serde_json::from_slice::<Context>(&copy.context) else {
            fail(self, "context");
            return;
        };
        let config = Arc::clone(&self.config);
        // A dynamic eroute's egroup must still be here and still name that eroute (the dead
        // owner may not have taken a reload this member took).
        let egroup_ok = ctx.egroup.as_deref().is_none_or(|g| {
            config
                .set
                .egroups
                .get(g)
                .is_some_and(|g| ctx.eroute.as_deref() == Some(g.eroute.as_str()))
        });
        let eroute = ctx
            .eroute
            .as_deref()
            .filter(|_| egroup_ok)
            .and_then(|n| config.set.eroutes.get(n).map(|e| (n, e)));
        let Some((name, e)) = eroute else {
            fail(self, "eroute");
            tracing::warn!(member = %owner, peer_id = %ctx.peer_id, eroute = ?ctx.eroute, egroup = ?ctx.egroup, "replicated IKE SA of an eroute or egroup this member does not have");
            return;
        };
        let subnet = ctx.site_subnet.unwrap_or(e.remote_subnet);
        let local_id = self.configs.local_id_for(name, e);
        let sync = !handover && self.replicas.as_ref().is_some_and(|r| r.sync_after_restore);
        let mut responder = ResponderConfig {
            ike_lifetime: Some(e.ike_lifetime).filter(|d| !d.is_zero()),
            sync_after_restore: sync,
            ..responder_config(e, local_id)
        };
        responder.remote_subnet = subnet;
        let responder = Arc::new(responder.forcing_udp_encap(!self.configs.raw_esp()));
        let mut initiator = self
            .configs
            .initiator(name, e, subnet, Some(snapshot.peer_id.clone()));
        initiator.sync_after_restore = sync;
        let initiator = Arc::new(initiator);
        let children = snapshot.children.clone();
        let remote = snapshot.remote;
        let role = snapshot.role;
        let id = match self.endpoint.restore(snapshot, responder, initiator, now) {
            Ok(id) => id,
            Err(e) => {
                fail(self, "restore");
                tracing::warn!(member = %owner, peer_id = %ctx.peer_id, error = %e, "replicated IKE SA not restored");
                return;
            }
        };
        let mut rec = IkeSaRecord::new(ctx.peer_id.clone(), now);
        rec.eroute = ctx.eroute.map(|n| self.names.get(&n));
        rec.egroup = ctx.egroup.map(|n| self.names.get(&n));
        rec.remote = Some(remote);
        rec.established_at = Some(SystemTime::now());
        rec.site_subnet = ctx.site_subnet;
        rec.nat = ctx.nat;
        rec.site = ctx.site.map(crate::cluster::SiteKey::from_raw);
        rec.contested = rec.site.as_ref().map(|_| owner);
        self.sas.insert(id, rec);
        // Before the CHILD SAs: their ESP follows the same path.
        self.adopt_entry(remote, ctx.entry.unwrap_or(owner));
        for c in children {
            let spi_in = c.spi_in;
            let (sent_up_to, received_up_to) = copy
                .sequences
                .get(&spi_in)
                .copied()
                .unwrap_or((u64::MAX, u64::MAX));
            if sent_up_to == u64::MAX {
                // No ceiling was ever acknowledged: the old owner's numbers are unknown, and
                // sending on could reuse one. Left out; its rekey below replaces it.
                tracing::warn!(
                    spi_in = format_args!("{spi_in:08x}"),
                    "adopted CHILD SA without a sequence ceiling: not carried until rekeyed"
                );
                continue;
            }
            self.child_installed_resumed(
                id,
                c.child_sa(now),
                Some(Resume {
                    sent_up_to,
                    received_up_to,
                }),
            );
            // Replay exposure after a take-over (the high-water mark is up to a second old):
            // a hand-over's is exact.
            if let Some(r) = self.replicas.as_mut().filter(|_| !handover) {
                r.rekeys.push((now + REKEY_AFTER_ADOPTION, id, spi_in));
            }
        }
        self.dynamic_established(id);
        self.static_established(id);
        self.adopt_claim(id);
        self.publish(id);
        if let Some(r) = self.replicas.as_ref() {
            r.metrics.adopted.inc();
        }
        let peer = self.sas.get(&id).map_or("-", |r| &*r.peer_id);
        if handover {
            tracing::info!(member = %owner, peer_id = %peer, ?role, %remote, "IKE SA handed over by a draining member");
        } else {
            tracing::info!(member = %owner, peer_id = %peer, ?role, %remote, "IKE SA taken over from a member that is gone");
        }
    }
}

/// The CHILD SAs of `rec` as the replicator follows them.
pub(super) fn replicated_children(rec: &IkeSaRecord) -> Vec<ReplicatedChild> {
    rec.children
        .iter()
        .map(|c| ReplicatedChild {
            spi_in: c.spi_in,
            counters: c.counters.clone(),
        })
        .collect()
}

/// One copy per IKE SA: with several replicas (or copies of a dead owner kept while its
/// successor replicated the SAs it adopted), an SA may have copies from more than one owner
/// incarnation. The newest has the highest sequence ceilings (each owner starts above the
/// ceilings of the copy it adopted), and only it may be carried on: an older one would send
/// with sequence numbers its successor used.
fn newest(copies: Vec<(Incarnation, ReplicaCopy)>) -> Vec<(Incarnation, ReplicaCopy)> {
    let mut by_id: HashMap<u64, (Incarnation, ReplicaCopy)> = HashMap::new();
    let top = |c: &ReplicaCopy| {
        c.sequences
            .values()
            .map(|(ceiling, _)| *ceiling)
            .max()
            .unwrap_or(0)
    };
    for (owner, copy) in copies {
        match by_id.get(&copy.id) {
            Some((_, kept)) if top(kept) >= top(&copy) => {}
            _ => {
                by_id.insert(copy.id, (owner, copy));
            }
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use concentrator_fleet::{MemberId, Shard};
    use zeroize::Zeroizing;

    use super::{ReplicaCopy, newest};

    fn copy(id: u64, ceiling: u64, tag: u8) -> ReplicaCopy {
        ReplicaCopy {
            shard: Shard::of_ike_spi(id),
            id,
            snapshot: Zeroizing::new(vec![tag]),
            context: Vec::new(),
            sequences: HashMap::from([(7, (ceiling, 0))]),
        }
    }

    #[test]
    fn of_several_copies_of_an_sa_the_one_with_the_highest_ceilings_is_carried_on() {
        let (a, b) = ((MemberId(1), 10), (MemberId(2), 20));
        let kept = newest(vec![
            (a, copy(5, 100, 1)),
            (b, copy(5, 300, 2)),
            (a, copy(6, 100, 3)),
        ]);
        let mut kept: Vec<(u64, u8)> = kept.iter().map(|(_, c)| (c.id, c.snapshot[0])).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![(5, 2), (6, 3)]);
    }
}
