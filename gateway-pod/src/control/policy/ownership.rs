//! Which IKE SA holds each peer: one per peer of a static eroute, one per dynamic eroute of
//! an egroup (whose table keeps them, least recently used first out). A newer SA of the same
//! peer replaces the older one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::control::driver::Driver;
use crate::control::events::IkeSaRecord;
use crate::eroute::lru::DynamicEroute;

/// The IKE SA that holds each static peer and dynamic eroute.
#[derive(Default)]
pub(in crate::control) struct Owners {
    /// The IKE SA holding each dynamic eroute, by (egroup, peer ID).
    dynamic: HashMap<(Arc<str>, Arc<str>), u64>,
    /// The IKE SA of each peer of a static eroute, by (eroute, peer ID).
    statics: HashMap<(Arc<str>, Arc<str>), u64>,
}

impl Owners {
    /// The owners of dynamic eroutes just evicted from their egroup's table, removed under
    /// the same lock as the eviction: an evicted site may reconnect on another worker at
    /// once, and the owner it takes then must not be removed by this eviction.
    pub(in crate::control) fn take_evicted(
        &mut self,
        evicted: Vec<DynamicEroute>,
    ) -> Vec<(DynamicEroute, u64)> {
        evicted
            .into_iter()
            .filter_map(|e| {
                let key = (Arc::from(e.egroup.as_str()), Arc::from(e.peer_id.as_str()));
                self.dynamic.remove(&key).map(|owner| (e, owner))
            })
            .collect()
    }
}

impl Driver {
    /// An egroup site is authenticated: its dynamic eroute is this SA's. An older SA of the
    /// same site is replaced (as INITIAL_CONTACT would ask), and the least recently used
    /// sites beyond the 10% free rule are deleted.
    pub(in crate::control) fn dynamic_established(&mut self, id: u64) {
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        let (Some(egroup), Some(base), Some(subnet)) =
            (rec.egroup.clone(), rec.eroute.clone(), rec.site_subnet)
        else {
            return;
        };
        let peer_id = rec.peer_id.clone();
        let now = Instant::now();
        let address = rec.remote.map(|r| r.ip().to_string());
        // One lock for both: the site's older SA (on any worker) must not release the
        // dynamic eroute this one just took over.
        let (old, evicted) = {
            let mut shared = self.egroups.lock();
            let old = shared
                .owners
                .dynamic
                .insert((egroup.clone(), peer_id.clone()), id);
            let evicted = shared
                .egroups
                .insert(&egroup, &base, &peer_id, subnet, address, now);
            let evicted = shared.owners.take_evicted(evicted);
            (old, evicted)
        };
        if let Some(old) = old
            && old != id
        {
            tracing::info!(%peer_id, %egroup, "site reconnected: its older IKE SA is deleted");
            self.delete_sa(old, now);
        }
        self.delete_evicted(evicted, now);
        self.publish_dynamic_counts();
    }

    /// The IKE SAs of dynamic eroutes evicted from their egroup's table are deleted (their
    /// owners were taken under the lock of the eviction: [`Owners::take_evicted`]).
    pub(in crate::control) fn delete_evicted(&mut self, evicted: Vec<(DynamicEroute, u64)>, now: Instant) {
        for (evicted, owner) in evicted {
            tracing::info!(peer_id = %evicted.peer_id, egroup = %evicted.egroup, "least recently used site evicted");
            self.delete_sa(owner, now);
        }
    }

    /// One IKE SA per peer of a static eroute: a peer that authenticates again (it restarted
    /// and sent INITIAL_CONTACT, or simply reconnected) replaces its older SA, as strongSwan's
    /// default `uniqueids = yes` does, so stale SAs and their routes do not pile up.
    pub(in crate::control) fn static_established(&mut self, id: u64) {
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        if rec.egroup.is_some() {
            return;
        }
        let Some(eroute) = rec.eroute.clone() else {
            return;
        };
        let key = (eroute, rec.peer_id.clone());
        let old = self.egroups.lock().owners.statics.insert(key, id);
        // Another worker's SA is not known here: it is asked, and ignores an SA it no
        // longer has.
        if let Some(old) = old
            && old != id
            && (self.sas.contains_key(&old) || !self.peers.holds(old))
        {
            tracing::info!(peer_id = %rec.peer_id, "peer authenticated again: its older IKE SA is deleted");
            self.delete_sa(old, Instant::now());
        }
    }

    /// SA `spi_r` (whose record was `rec`) is gone: what it held is free, and a dynamic
    /// eroute it held leaves its egroup's table.
    pub(in crate::control) fn release_ownership(&mut self, spi_r: u64, rec: &IkeSaRecord) {
        let mut shared = self.egroups.lock();
        if let Some(eroute) = &rec.eroute {
            let key = (eroute.clone(), rec.peer_id.clone());
            if shared.owners.statics.get(&key) == Some(&spi_r) {
                shared.owners.statics.remove(&key);
            }
        }
        let mut released = false;
        if let Some(egroup) = &rec.egroup {
            let key = (egroup.clone(), rec.peer_id.clone());
            if shared.owners.dynamic.get(&key) == Some(&spi_r) {
                shared.owners.dynamic.remove(&key);
                shared.egroups.remove(egroup, &rec.peer_id);
                released = true;
            }
        }
        drop(shared);
        if released {
            self.publish_dynamic_counts();
        }
    }

    pub(in crate::control) fn publish_dynamic_counts(&self) {
        let gauges = &self.gateway.metrics.dynamic_eroutes;
        self.egroups.with_counts(|egroup, n| {
            let label = crate::metrics::EgroupLabel {
                egroup: egroup.to_owned(),
            };
            gauges.get_or_create(&label).set(n as i64);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicted(peer_id: &str) -> DynamicEroute {
        DynamicEroute {
            peer_id: peer_id.into(),
            egroup: "branches".into(),
            base_eroute: "base".into(),
            remote_subnet: "10.1.0.0/24".parse().unwrap(),
            peer_address: None,
            last_used: Instant::now(),
        }
    }

    #[test]
    fn an_eviction_takes_the_owners_of_the_evicted_sites_only() {
        let mut owners = Owners::default();
        let key = |p: &str| (Arc::from("branches"), Arc::from(p));
        owners.dynamic.insert(key("a"), 7);
        owners.dynamic.insert(key("b"), 8);
        // "c" was evicted but has no owner (its SA is already gone): nothing to delete.
        let taken = owners.take_evicted(vec![evicted("a"), evicted("c")]);
        assert_eq!(
            taken
                .iter()
                .map(|(e, o)| (e.peer_id.as_str(), *o))
                .collect::<Vec<_>>(),
            [("a", 7)]
        );
        assert_eq!(owners.dynamic.get(&key("b")), Some(&8));
        assert!(!owners.dynamic.contains_key(&key("a")));
    }
}
