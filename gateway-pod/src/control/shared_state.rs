//! What the IKE workers ([`super::workers`]) share: the egroups with their tables of dynamic
//! eroutes and the ownership of sites and static peers, and the routes to the TUN device.
//!
//! Behind one lock each rather than on a task of their own: they are touched once per SA
//! (a site identified, an SA established or removed, a CHILD SA installed or deleted) and
//! once per second per tunnel that carried traffic, never per IKE message, and each use is
//! a few map operations, so a short lock costs less than a request to another task and its
//! answer. Egroups and owners share one lock because "this SA holds the site" and "the site
//! has a dynamic eroute" change together (a site that reconnects on another worker while
//! its older SA goes must not lose the dynamic eroute to the older SA's removal).
//! With one worker nothing contends: the locks are only taken, never waited for.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ipnet::IpNet;

use super::policy::Owners;
use super::routes::Routes;
use crate::config::Config;
use crate::egroups::Egroups;
use crate::eroute::lru::DynamicEroute;
use crate::sitedb::{LookupError, Site};

/// The egroups and the owners of their sites (and of static peers).
pub(super) struct Policy {
    pub(super) egroups: Egroups,
    pub(super) owners: Owners,
}

/// A handle on the [`Policy`] of every worker, with the [`Egroups`] calls the rooms of the
/// driver make (each takes the lock for its own duration).
#[derive(Clone)]
pub(super) struct SharedEgroups(Arc<Mutex<Policy>>);

impl SharedEgroups {
    pub(super) fn new(egroups: Egroups) -> Self {
        Self(Arc::new(Mutex::new(Policy {
            egroups,
            owners: Owners::default(),
        })))
    }

    /// The lock, for what must change egroups and owners together. A worker that panicked
    /// while holding it left the maps as they were between two operations: still usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, Policy> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn initiating(&self, config: &Config) -> Vec<(String, IpNet, u8)> {
        self.lock().egroups.initiating(config)
    }

    pub(super) fn has_dynamic(&self, egroup: &str, peer_id: &str) -> bool {
        self.lock().egroups.has_dynamic(egroup, peer_id)
    }

    pub(super) fn lookup_by_peer(
        &self,
        egroup: &str,
        peer_id: &str,
        now: Instant,
    ) -> impl Future<Output = Result<Site, LookupError>> + Send + 'static + use<> {
        self.lock().egroups.lookup_by_peer(egroup, peer_id, now)
    }

    pub(super) fn lookup_by_subnet(
        &self,
        egroup: &str,
        subnet: IpNet,
        now: Instant,
    ) -> impl Future<Output = Result<Site, LookupError>> + Send + 'static + use<> {
        self.lock().egroups.lookup_by_subnet(egroup, subnet, now)
    }

    pub(super) fn touch(&self, egroup: &str, peer_id: &str, now: Instant) {
        self.lock().egroups.touch(egroup, peer_id, now);
    }

    /// Calls `f` with the dynamic eroutes of each egroup, under the lock: two workers that
    /// publish the counts one after the other publish them in that order (read outside the
    /// lock, the later count could be overwritten by the earlier).
    pub(super) fn with_counts(&self, mut f: impl FnMut(&str, usize)) {
        for (n, c) in self.lock().egroups.counts() {
            f(n, c);
        }
    }

    pub(super) fn reconfigure(
        &self,
        config: &Config,
        diff: &crate::config::ConfigDiff,
        stores: std::collections::BTreeMap<String, Option<crate::sitedb::SiteStore>>,
    ) -> Vec<(DynamicEroute, u64)> {
        let mut shared = self.lock();
        let evicted = shared.egroups.reconfigure(config, diff, stores);
        shared.owners.take_evicted(evicted)
    }

    pub(super) fn check_tables_of(
        &self,
        which: &dyn Fn(&str) -> bool,
    ) -> impl Future<Output = Vec<(String, Result<(), LookupError>)>> + Send + 'static + use<> {
        self.lock().egroups.check_tables_of(which)
    }
}

/// The routes to the TUN device, counted per subnet across every worker (two workers may
/// hold one subnet for a while: a site's new SA and its older one).
#[derive(Clone)]
pub(super) struct SharedRoutes(Arc<Mutex<Option<Routes>>>);

impl SharedRoutes {
    pub(super) fn new(routes: Routes) -> Self {
        Self(Arc::new(Mutex::new(Some(routes))))
    }

    fn with(&self, f: impl FnOnce(&mut Routes)) {
        let mut routes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // After the shutdown nothing is routed any more.
        if let Some(r) = routes.as_mut() {
            f(r);
        }
    }

    pub(super) fn hold(&self, net: IpNet) {
        self.with(|r| r.hold(net));
    }

    pub(super) fn release(&self, net: IpNet) {
        self.with(|r| r.release(net));
    }

    /// [`Routes::route_sites`] (a fleet member runs one worker).
    pub(super) fn route_sites(&self, nets: Vec<IpNet>) -> bool {
        let mut changed = false;
        self.with(|r| changed = r.route_sites(nets));
        changed
    }

    /// Removes every route still held (once every worker stopped).
    pub(super) async fn shutdown(&self) {
        let routes = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(r) = routes {
            r.shutdown().await;
        }
    }
}
