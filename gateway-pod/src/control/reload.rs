//! A new configuration applied to the running control plane as a diff (like strongSwan's
//! `swanctl --load-all`): new eroutes and egroups start; changed ones apply to the SAs
//! negotiated from now on while existing SAs run on with what they negotiated; removed ones
//! close their SAs with an IKE DELETE, and with them their routes, dynamic eroutes and, in a
//! fleet, site claims.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Config, ConfigDiff};
use crate::control::driver::Driver;
use crate::egroups::Egroups;
use crate::sitedb::SiteStore;

/// A valid new configuration, with what it changes against the one the IKE task runs.
pub struct Reload {
    pub config: Arc<Config>,
    pub diff: ConfigDiff,
    /// The site stores of added and changed egroups, opened beforehand (opening one may
    /// wait on the network, which the IKE task never does); `None` where the gateway has no
    /// store of its own to give.
    pub stores: BTreeMap<String, Option<SiteStore>>,
}

impl Driver {
    pub(super) fn reload(&mut self, reload: Reload) {
        let Reload { config, diff, stores } = reload;
        let followers = std::mem::take(&mut self.followers);
        let now = Instant::now();
        // The shared parts (egroups and their tables, traps, auto-connects) are the first
        // worker's to change; every worker closes its own SAs and takes the new config.
        let primary = self.primary();
        let traps_before = if primary { self.traps() } else { Vec::new() };

        // The SAs of what went: DELETE to the peer; the events that follow release their
        // CHILD SAs, routes, ownerships, dynamic eroutes and claims.
        let closing: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, r)| diff.closes(r.eroute.as_deref(), r.egroup.as_deref()))
            .map(|(id, _)| *id)
            .collect();
        for id in &closing {
            // Each SA's deletion is logged at info by its event; the count is below.
            if let Some(rec) = self.sas.get(id) {
                tracing::debug!(
                    peer_id = %rec.peer_id,
                    eroute = rec.eroute.as_deref().unwrap_or("-"),
                    egroup = rec.egroup.as_deref().unwrap_or("-"),
                    "its eroute or egroup was removed: IKE SA deleted"
                );
            }
            self.endpoint.delete(*id, now);
        }

        self.config = config;
        for name in diff.eroutes.changed.iter().chain(&diff.eroutes.removed) {
            self.configs.forget(name);
        }
        if primary {
            let evicted = self.egroups.reconfigure(&self.config, &diff, stores);
            self.delete_evicted(evicted, now);
            // As at start: a site table that does not fit its Egroup is said now (where the
            // database answers), not first by the lookup of a site that connects.
            let checks = self
                .egroups
                .check_tables_of(&|g| diff.egroups.added.contains(g) || diff.egroups.changed.contains(g));
            Egroups::spawn_checks(checks);
            self.auto.reconfigure(&self.config);
        }
        match self.configs.accepting(&self.config) {
            Ok(c) => self.endpoint.set_responder_config(Arc::new(c)),
            Err(e) => tracing::error!(error = %e, "IKE_SA_INIT keeps its former proposals"),
        }

        if primary {
            // New traps first, so a subnet trapped before and after keeps its route
            // throughout.
            let traps_after = self.traps();
            for net in &traps_after {
                self.routes.hold(*net);
            }
            for net in traps_before {
                self.routes.release(net);
            }
            for egroup in &diff.egroups.removed {
                let label = crate::metrics::EgroupLabel {
                    egroup: egroup.clone(),
                };
                self.gateway.metrics.dynamic_eroutes.remove(&label);
            }
            self.publish_dynamic_counts();
        }
        // The tunnel table shows each tunnel's eroute as configured now.
        let ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, r)| {
                r.eroute
                    .as_ref()
                    .is_some_and(|e| diff.eroutes.changed.contains(&**e))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.publish(id);
        }
        self.connect_due(now);
        // The shared parts are in their new state: the other workers follow.
        for tx in &followers {
            let _ = tx.send(Reload {
                config: self.config.clone(),
                diff: diff.clone(),
                stores: Default::default(),
            });
        }
        self.followers = followers;
        if primary {
            tracing::info!(%diff, closed = closing.len(), "configuration reloaded");
        } else {
            tracing::debug!(
                worker = self.peers.me(),
                closed = closing.len(),
                "configuration reloaded"
            );
        }
    }
}
