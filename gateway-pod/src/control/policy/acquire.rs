//! Acquires: a packet toward a site found no SA. A static eroute of ours toward it is
//! connected; a site of an egroup that may initiate is looked up by subnet and connected
//! to as a dynamic eroute.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::LookupDone;
use super::auto::IKE_PORT;
use crate::control::driver::Driver;
use crate::control::events::IkeSaRecord;
use crate::control::ike_config::id_from_str;
use crate::egroups::Egroups;
use crate::sitedb::{LookupError, Site};

/// How long an acquire for a site's subnet suppresses further ones (the lookup and IKE run
/// meanwhile; packets wait in the data plane's queue).
const ACQUIRE_HOLD: Duration = Duration::from_secs(5);

/// Acquires in progress, by (egroup, site subnet), since when.
#[derive(Default)]
pub(in crate::control) struct PendingAcquires(pub(super) HashMap<(String, IpNet), Instant>);

impl Driver {
    /// A packet toward `dst` found no SA: if `dst` lies in a site subnet of an egroup that
    /// may initiate, look the site up by subnet and connect to it; in a fleet, a site we may
    /// not initiate to is looked for on the other members ([`Self::locate`]).
    pub(in crate::control) fn acquire(&mut self, dst: IpAddr) {
        let now = Instant::now();
        if self.demand(dst, now) {
            return;
        }
        let pending = &mut self.pending_acquires.0;
        pending.retain(|_, t| now < *t + ACQUIRE_HOLD);
        let Some((egroup, base_remote, prefix)) = self
            .egroups
            .initiating(&self.config)
            .into_iter()
            .find(|(_, net, _)| net.contains(&dst))
        else {
            self.locate(dst, now);
            return;
        };
        let Ok(subnet) = IpNet::new(dst, prefix).map(|n| n.trunc()) else {
            return;
        };
        let key = (egroup.clone(), subnet);
        if pending.contains_key(&key) {
            return;
        }
        pending.insert(key, now);
        let Some(base) = self.config.set.egroups.get(&egroup).map(|g| g.eroute.clone()) else {
            return;
        };
        tracing::info!(%dst, %subnet, %egroup, %base_remote, "traffic toward a site without a tunnel");
        let lookup = self.egroups.lookup_by_subnet(&egroup, subnet, now);
        let tx = self.lookups.clone();
        tokio::spawn(async move {
            let result = lookup.await;
            let _ = tx.send(LookupDone {
                id: None,
                egroup,
                base_eroute: base,
                result,
            });
        });
    }

    /// The site of an acquire is known: connect to it with its row (address, then backup
    /// address; PSK; subnet), as a dynamic eroute of the egroup.
    pub(super) fn acquired(&mut self, egroup: &str, base_eroute: &str, result: Result<Site, LookupError>) {
        let config = Arc::clone(&self.config);
        let base = config.set.eroutes.get(base_eroute);
        let result = result.and_then(|site| match base {
            Some(b) => Egroups::check_subnet(&site, b.remote_subnet).map(|()| site),
            None => Err(LookupError::NotFound),
        });
        let site = match result {
            Ok(site) => site,
            Err(e) => {
                self.gateway.metrics.count_lookup_failure(egroup, e.kind());
                tracing::warn!(%egroup, reason = e.kind(), error = %e, "site lookup for traffic failed");
                return;
            }
        };
        if self.egroups.has_dynamic(egroup, &site.peer_id) {
            return;
        }
        let Some(remote) = [&site.peer_address, &site.backup_peer_address]
            .into_iter()
            .flatten()
            .find_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, IKE_PORT))
        else {
            self.gateway.metrics.count_lookup_failure(egroup, "malformed");
            tracing::warn!(peer_id = %site.peer_id, %egroup, "site row has no usable peer address: cannot initiate");
            return;
        };
        if self.claims.is_some() {
            // In a fleet the member that holds the site's claim initiates; it is claimed
            // first (the answer comes back through `claimed_to_initiate`).
            self.claim_to_initiate(egroup, base_eroute, site, remote);
            return;
        }
        self.initiate_to_site(egroup, base_eroute, &site, remote, None);
    }

    /// Connects to the site of an acquire with its row, holding its claim `claim` in a fleet.
    pub(in crate::control) fn initiate_to_site(
        &mut self,
        egroup: &str,
        base_eroute: &str,
        site: &Site,
        remote: SocketAddr,
        claim: Option<crate::cluster::SiteKey>,
    ) {
        let config = Arc::clone(&self.config);
        // A reload may have removed the egroup, or pointed it at another eroute, while the
        // lookup or the claim was under way: nothing to connect, and the claim goes back.
        let current = config
            .set
            .egroups
            .get(egroup)
            .is_some_and(|g| g.eroute == base_eroute);
        let Some(e) = config.set.eroutes.get(base_eroute).filter(|_| current) else {
            if let Some(key) = claim {
                self.release_site(key);
            }
            return;
        };
        if self.egroups.has_dynamic(egroup, &site.peer_id) {
            return;
        }
        let config = self.configs.initiator(
            base_eroute,
            e,
            site.remote_subnet,
            Some(id_from_str(&site.peer_id)),
        );
        let now = Instant::now();
        let local = self.configs.local_addr();
        let psk = zeroize::Zeroizing::new(site.psk.expose().to_vec());
        match self
            .endpoint
            .connect(Arc::new(config), &psk, local, remote, now, &mut self.entropy)
        {
            Ok(id) => {
                tracing::info!(peer_id = %site.peer_id, %egroup, %remote, "initiating to a site");
                let rec = IkeSaRecord {
                    eroute: Some(self.names.get(base_eroute)),
                    egroup: Some(self.names.get(egroup)),
                    remote: Some(remote),
                    site_subnet: Some(site.remote_subnet),
                    site: claim,
                    ..IkeSaRecord::new(site.peer_id.clone(), now)
                };
                self.sas.insert(id, rec);
            }
            Err(err) => {
                tracing::warn!(peer_id = %site.peer_id, error = %err, "cannot initiate to a site");
                if let Some(key) = claim {
                    self.release_site(key);
                }
            }
        }
    }
}
