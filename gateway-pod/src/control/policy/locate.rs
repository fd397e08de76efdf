//! Head-end traffic toward a site whose tunnel may be on another member of the fleet, for
//! sites we may not initiate to (an egroup or static eroute whose role is `Responder`): the
//! site is found by address (its row in the egroup's table, or the static eroute), then its
//! claim in etcd names the member that holds its tunnel, and the data plane sends the
//! traffic there in plain frames. Nothing is initiated: toward a site no member holds, the
//! traffic is dropped and counted.
//!
//! So that such traffic reaches the TUN device of every member, not only the holder's, each
//! eroute's remote subnet is routed to it on every member of a fleet.

use std::net::IpAddr;
use std::time::Instant;

use concentrator_fleet::MemberId;
use ipnet::IpNet;

use crate::cluster::{FleetError, SiteKey};
use crate::control::claims::{ClaimEvent, eroute_site};
use crate::control::driver::Driver;
use crate::egroups::Egroups;
use crate::sitedb::LookupError;

/// Where traffic toward a site was found to go, back on the IKE task.
pub(in crate::control) struct Located {
    /// The acquire it answers (see [`super::PendingAcquires`]).
    pending: (String, IpNet),
    /// The egroup whose table had the site (for its lookup failures).
    egroup: Option<String>,
    outcome: Result<(SiteKey, IpNet, Option<MemberId>), LocateError>,
}

#[derive(Debug, thiserror::Error)]
enum LocateError {
    #[error("site lookup: {0}")]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// What traffic toward a destination belongs to: a site of an egroup (its subnet), or the
/// site of a static eroute.
enum Target {
    Egroup { name: String, subnet: IpNet },
    Eroute { key: SiteKey, subnet: IpNet },
}

impl Driver {
    /// The subnets routed to the TUN device on every member of a fleet: each eroute's
    /// remote subnet (the base eroutes of egroups with the static ones), so that head-end
    /// traffic toward any site enters the data plane whichever member the head-end LAN sends
    /// it to, and goes to the member that holds the site. Not a subnet that holds an address
    /// the tunnels or the fleet travel between ([`Driver::safe_to_route`]; the static
    /// eroutes' peers, the peers of the IKE SAs here), whose IKE and ESP would be routed
    /// into the TUN device: those are left out (as route, the second value).
    fn site_routes(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        let set = &self.config.set;
        let statics = set
            .eroutes
            .values()
            .flat_map(|e| [&e.peer_address, &e.backup_peer_address])
            .filter_map(|a| a.as_deref()?.parse::<IpAddr>().ok());
        let statics: Vec<IpAddr> = statics.collect();
        let mut nets: Vec<IpNet> = set.eroutes.values().map(|e| e.remote_subnet).collect();
        nets.sort();
        nets.dedup();
        // Once a second over every IKE SA, for each of a few subnets: no copy of the peers.
        nets.into_iter().partition(|net| {
            self.safe_to_route(*net, IpAddr::from([0, 0, 0, 0]))
                && !statics.iter().any(|p| net.contains(p))
                && !self
                    .sas
                    .values()
                    .any(|r| r.remote.is_some_and(|a| net.contains(&a.ip())))
        })
    }

    /// Keeps the routes of [`Self::site_routes`] up to date (the configuration, the members
    /// and the peers change): in a fleet only.
    pub(in crate::control) fn route_sites(&mut self) {
        if self.fleet.is_none() {
            return;
        }
        let (routed, skipped) = self.site_routes();
        if self.routes.route_sites(routed.clone()) {
            tracing::info!(?routed, not_routed = ?skipped, "eroutes' remote subnets routed to the TUN device on this member (head-end traffic toward sites held by other members)");
        }
    }

    /// Traffic toward `dst` found no tunnel here, and no site we may initiate to holds it:
    /// in a fleet, where is its site held? (The answer comes back as [`Located`].)
    pub(in crate::control) fn locate(&mut self, dst: IpAddr, now: Instant) {
        let Some(claims) = self.claims.as_ref() else {
            return;
        };
        let Some(target) = self.target(dst) else {
            return;
        };
        let pending = match &target {
            Target::Egroup { name, subnet } => (format!("egroup/{name}"), *subnet),
            Target::Eroute { key, subnet } => (key.to_string(), *subnet),
        };
        if self.pending_acquires.0.contains_key(&pending) {
            return;
        }
        self.pending_acquires.0.insert(pending.clone(), now);
        let (c, tx) = (claims.claims(), claims.events());
        match target {
            Target::Egroup { name, subnet } => {
                let Some(base) = self
                    .config
                    .set
                    .egroups
                    .get(&name)
                    .and_then(|g| self.config.set.eroutes.get(&g.eroute))
                    .map(|e| e.remote_subnet)
                else {
                    return;
                };
                let lookup = self.egroups.lookup_by_subnet(&name, subnet, now);
                tokio::spawn(async move {
                    let outcome = async {
                        let site = lookup.await?;
                        Egroups::check_subnet(&site, base)?;
                        let key = SiteKey::new(&format!("egroup/{name}"), &site.peer_id);
                        let holder = c.holder(&key).await?;
                        Ok::<_, LocateError>((key, site.remote_subnet, holder))
                    }
                    .await;
                    let _ = tx.send(ClaimEvent::Located(Box::new(Located {
                        pending,
                        egroup: Some(name),
                        outcome,
                    })));
                });
            }
            Target::Eroute { key, subnet } => {
                tokio::spawn(async move {
                    let outcome = c
                        .holder(&key)
                        .await
                        .map(|holder| (key, subnet, holder))
                        .map_err(LocateError::from);
                    let _ = tx.send(ClaimEvent::Located(Box::new(Located {
                        pending,
                        egroup: None,
                        outcome,
                    })));
                });
            }
        }
    }

    fn target(&self, dst: IpAddr) -> Option<Target> {
        let set = &self.config.set;
        // The most specific eroute toward `dst`: a static eroute's site inside an egroup's
        // subnet is its own, not a row of the egroup.
        let (name, e) = set
            .eroutes
            .iter()
            .filter(|(_, e)| e.remote_subnet.contains(&dst))
            .max_by_key(|(_, e)| e.remote_subnet.prefix_len())?;
        if let Some((egroup, g)) = set.egroup_of(name) {
            return Some(Target::Egroup {
                name: egroup.to_owned(),
                subnet: IpNet::new(dst, g.remote_subnet_prefix).ok()?.trunc(),
            });
        }
        // A static eroute's claim names the peer ID its site authenticates with: one with a
        // pattern (or none) has no one claim to look at.
        let peer = e.peer_id.as_deref().filter(|p| !p.contains(['*', '?']))?;
        Some(Target::Eroute {
            key: eroute_site(name, peer),
            subnet: e.remote_subnet,
        })
    }

    /// Where traffic toward a site goes, now that its claim was read: to the member that
    /// holds its tunnel, or nowhere (dropped and counted in the data plane, for a moment).
    pub(in crate::control) fn located(&mut self, l: Located) {
        self.pending_acquires.0.remove(&l.pending);
        let me = self.fleet.as_ref().and_then(|f| f.view.me());
        match l.outcome {
            Ok((key, subnet, Some(m))) if Some(m) != me => {
                tracing::debug!(site = %key, %subnet, member = %m, "traffic toward a site another member holds: forwarded there");
                self.backend.elsewhere(subnet, m);
            }
            // Ours: its CHILD SA is on its way (the packets wait for it).
            Ok((_, _, Some(_))) => {}
            Ok((key, subnet, None)) => {
                // Asked again every few seconds while the traffic goes on: counted, not logged.
                tracing::debug!(site = %key, %subnet, "traffic toward a site no member holds a tunnel to: dropped (we do not initiate to it)");
                self.backend.not_held(subnet);
            }
            Err(LocateError::Lookup(e)) => {
                let egroup = l.egroup.as_deref().unwrap_or("-");
                self.gateway.metrics.count_lookup_failure(egroup, e.kind());
                tracing::debug!(%egroup, subnet = %l.pending.1, reason = e.kind(), error = %e, "traffic toward no known site: dropped");
                self.backend.not_held(l.pending.1);
            }
            Err(LocateError::Fleet(e)) => {
                tracing::warn!(subnet = %l.pending.1, error = %e, "traffic toward a site: the fleet cannot tell who holds it (etcd unreachable)");
            }
        }
    }
}
