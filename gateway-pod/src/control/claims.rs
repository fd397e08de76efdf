//! Sites held by one pod of the fleet at a time ([`crate::cluster::Claims`]), as the
//! driver uses them:
//!
//! - a site that authenticates to us is claimed before its key is handed to the engine
//!   (the claim waits on etcd on a task of its own and comes back as a [`ClaimEvent`]); with
//!   etcd unreachable it is refused, counted as `fleet_unavailable`;
//! - a site another member holds still authenticates here (it may have restarted and come
//!   back through another pod), and takes the claim over once its IKE SA is established:
//!   taking it before authentication would let anyone who knows a peer ID steal it;
//! - the claim is released with the site's last IKE SA here, and claimed again for every
//!   site we hold when the etcd session begins anew (the old session's claims end with its
//!   lease);
//! - the shards our SAs' SPIs live in are published for the leader, which moves none of
//!   them away from us.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use concentrator_fleet::{Shard, ShardSet};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::driver::Driver;
use crate::cluster::{Claimed, Claims, FleetError, SiteKey};
use crate::sitedb::Site;

/// The refusal of a site while the fleet cannot say who holds it.
pub(super) const FLEET_UNAVAILABLE: &str = "fleet_unavailable";

/// What claim tasks report back to the driver.
pub(super) enum ClaimEvent {
    /// The claim of SA `id`'s site finished.
    Done {
        id: u64,
        site: SiteKey,
        result: Result<Claimed, FleetError>,
    },
    /// The etcd session began anew: claim every held site again.
    NewSession,
    /// The claim of a static eroute we keep up finished.
    ToConnect {
        eroute: String,
        key: SiteKey,
        result: Result<Claimed, FleetError>,
    },
    /// The claim of a site that traffic is waiting for finished.
    ToInitiate {
        egroup: String,
        base_eroute: String,
        site: Box<Site>,
        remote: SocketAddr,
        key: SiteKey,
        result: Result<Claimed, FleetError>,
    },
    /// Where the site of traffic we may not initiate for is held.
    Located(Box<super::policy::Located>),
}

/// The driver's claims: the PSKs waiting on a claim, and where claim tasks report.
pub(super) struct DriverClaims {
    claims: Claims,
    events: mpsc::UnboundedSender<ClaimEvent>,
    /// The key each SA waiting on its claim authenticates with once the claim is decided.
    pending: std::collections::HashMap<u64, Zeroizing<Vec<u8>>>,
    /// Claiming the held sites again after a new session, until all are claimed.
    reclaiming: Option<tokio::task::JoinHandle<()>>,
}

impl DriverClaims {
    /// Claims through `claims`, reporting on `events`; watches the etcd session so that
    /// held sites are claimed again after it begins anew.
    pub(super) fn new(claims: Claims, events: mpsc::UnboundedSender<ClaimEvent>) -> Self {
        let mut sessions = claims.sessions();
        let tx = events.clone();
        tokio::spawn(async move {
            let mut last = sessions.borrow_and_update().as_ref().map(|s| s.lease_id());
            while sessions.changed().await.is_ok() {
                let lease = sessions.borrow_and_update().as_ref().map(|s| s.lease_id());
                let Some(id) = lease else { continue };
                // The first session has nothing to claim again: no site was taken before it.
                if last.is_some_and(|l| l != id) && tx.send(ClaimEvent::NewSession).is_err() {
                    return;
                }
                last = Some(id);
            }
        });
        Self {
            claims,
            events,
            pending: Default::default(),
            reclaiming: None,
        }
    }
}

impl DriverClaims {
    /// The claims, for a task of its own.
    pub(super) fn claims(&self) -> Claims {
        self.claims.clone()
    }

    /// Where such a task reports back.
    pub(super) fn events(&self) -> mpsc::UnboundedSender<ClaimEvent> {
        self.events.clone()
    }
}

/// The first pause before held sites not claimed again are retried (doubling up to
/// [`RECLAIM_RETRY_MAX`]).
const RECLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(250);
const RECLAIM_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an eroute we keep up waits for its claim before it is tried again.
pub(super) const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a member looks again at an eroute another member keeps up (which may go).
pub(super) const HELD_ELSEWHERE_RECHECK: std::time::Duration = std::time::Duration::from_secs(15);

/// The claim of static eroute `eroute` toward `peer_id`: the same whichever side starts.
pub(super) fn eroute_site(eroute: &str, peer_id: &str) -> SiteKey {
    SiteKey::new(&format!("eroute/{eroute}"), peer_id)
}

/// The peer a static eroute we keep up is claimed under: its peer ID, else its address.
pub(super) fn claimed_peer(e: &concentrator_crds::eroute::ValidatedEroute) -> String {
    e.peer_id
        .clone()
        .or_else(|| e.peer_address.clone())
        .unwrap_or_default()
}

/// The site of an IKE SA for its claim: its peer ID within the egroup or static eroute that
/// authenticates it.
pub(super) fn site_key(egroup: Option<&str>, eroute: Option<&str>, peer_id: &str) -> Option<SiteKey> {
    match (egroup, eroute) {
        (Some(g), _) => Some(SiteKey::new(&format!("egroup/{g}"), peer_id)),
        (None, Some(e)) => Some(eroute_site(e, peer_id)),
        (None, None) => None,
    }
}

impl Driver {
    /// Hands SA `id` the key its peer authenticates with, once its site is ours to hold
    /// (at once standalone, or for a refusal).
    pub(super) fn authenticate(&mut self, id: u64, psk: Option<Zeroizing<Vec<u8>>>) {
        let site = self
            .sas
            .get(&id)
            .and_then(|r| site_key(r.egroup.as_deref(), r.eroute.as_deref(), &r.peer_id));
        // A site the director sends elsewhere after authentication is not held here.
        let site = site.filter(|_| !self.redirects_after_auth(id));
        let (Some(claims), Some(psk), Some(site)) = (self.claims.as_mut(), psk.as_ref(), site) else {
            self.provide_psk(id, psk.as_ref().map(|p| p.as_slice()));
            return;
        };
        claims.pending.insert(id, psk.clone());
        let (c, tx) = (claims.claims.clone(), claims.events.clone());
        tokio::spawn(async move {
            let result = c.claim(&site).await;
            let _ = tx.send(ClaimEvent::Done { id, site, result });
        });
    }

    pub(super) fn provide_psk(&mut self, id: u64, psk: Option<&[u8]>) {
        if psk.is_some() {
            self.redirect_after_auth(id);
        }
        if let Err(e) = self
            .endpoint
            .provide_psk(id, Instant::now(), psk, &mut self.entropy)
        {
            let peer = self.sas.get(&id).map_or("-", |r| &*r.peer_id);
            tracing::debug!(peer_id = %peer, error = %e, "PSK step ended the negotiation");
        }
    }

    pub(super) fn claim_event(&mut self, event: ClaimEvent) {
        match event {
            ClaimEvent::Done { id, site, result } => self.claim_done(id, site, result),
            ClaimEvent::NewSession => self.claim_again(),
            ClaimEvent::Located(l) => self.located(*l),
            ClaimEvent::ToConnect { eroute, key, result } => {
                // The eroute went in a reload while its claim was on its way: no SA of
                // ours will hold the claim, so it goes back at once.
                if !self.auto.keeps(&eroute) {
                    if matches!(result, Ok(Claimed::Won | Claimed::Mine)) {
                        self.release_site(key);
                    }
                    return;
                }
                let ours = match result {
                    Ok(Claimed::HeldBy(m)) => {
                        tracing::debug!(%eroute, member = %m, "eroute kept up by another member");
                        // Its traffic goes there (until the next look, 15 s on).
                        if let Some(e) = self.config.set.eroutes.get(&eroute) {
                            self.backend.elsewhere(e.remote_subnet, m);
                        }
                        false
                    }
                    Ok(_) => true,
                    Err(e) => {
                        self.gateway.metrics.count_ike_failure(FLEET_UNAVAILABLE);
                        tracing::warn!(%eroute, error = %e, "not initiating: the fleet cannot tell who holds the eroute (etcd unreachable)");
                        false
                    }
                };
                self.claimed_to_connect(&eroute, ours);
            }
            ClaimEvent::ToInitiate {
                egroup,
                base_eroute,
                site,
                remote,
                key,
                result,
            } => match result {
                Ok(Claimed::HeldBy(m)) => {
                    // The site's tunnel is up on another member: the traffic goes there.
                    tracing::debug!(peer_id = %site.peer_id, member = %m, "traffic toward a site another member holds: forwarded there");
                    self.backend.elsewhere(site.remote_subnet, m);
                }
                Ok(_) => self.initiate_to_site(&egroup, &base_eroute, &site, remote, Some(key)),
                Err(e) => {
                    self.gateway.metrics.count_ike_failure(FLEET_UNAVAILABLE);
                    tracing::warn!(peer_id = %site.peer_id, error = %e, "not initiating to a site: the fleet cannot tell who holds it (etcd unreachable)");
                }
            },
        }
    }

    /// Claims static eroute `name` that we keep up; the answer comes back as
    /// [`ClaimEvent::ToConnect`].
    pub(super) fn claim_to_connect(&mut self, name: &str) {
        let (Some(claims), Some(e)) = (self.claims.as_ref(), self.config.set.eroutes.get(name)) else {
            return;
        };
        let key = eroute_site(name, &claimed_peer(e));
        let (c, tx, eroute) = (claims.claims.clone(), claims.events.clone(), name.to_owned());
        tokio::spawn(async move {
            let result = c.claim(&key).await;
            let _ = tx.send(ClaimEvent::ToConnect { eroute, key, result });
        });
    }

    /// Claims the site of an acquire; the answer comes back as [`ClaimEvent::ToInitiate`].
    pub(super) fn claim_to_initiate(
        &mut self,
        egroup: &str,
        base_eroute: &str,
        site: Site,
        remote: SocketAddr,
    ) {
        let Some(claims) = self.claims.as_ref() else {
            return;
        };
        let key = SiteKey::new(&format!("egroup/{egroup}"), &site.peer_id);
        let (c, tx) = (claims.claims.clone(), claims.events.clone());
        let (egroup, base_eroute) = (egroup.to_owned(), base_eroute.to_owned());
        tokio::spawn(async move {
            let result = c.claim(&key).await;
            let _ = tx.send(ClaimEvent::ToInitiate {
                egroup,
                base_eroute,
                site: Box::new(site),
                remote,
                key,
                result,
            });
        });
    }

    fn claim_done(&mut self, id: u64, site: SiteKey, result: Result<Claimed, FleetError>) {
        let psk = self.claims.as_mut().and_then(|c| c.pending.remove(&id));
        let (Some(psk), Some(rec)) = (psk, self.sas.get_mut(&id)) else {
            // The SA went meanwhile: a claim won for it is given back (unless another SA
            // of ours holds the site).
            if matches!(result, Ok(Claimed::Won)) {
                self.release_site(site);
            }
            return;
        };
        match result {
            Ok(held) => {
                rec.site = Some(site);
                if let Claimed::HeldBy(m) = held {
                    tracing::info!(peer_id = %rec.peer_id, member = %m, "site held by another member: it takes the site over if it authenticates");
                    rec.contested = Some(m);
                }
                self.provide_psk(id, Some(psk.as_slice()));
            }
            Err(e) => {
                tracing::warn!(peer_id = %rec.peer_id, error = %e, "site refused: the fleet cannot tell who holds it (etcd unreachable)");
                self.refuse_recorded(id, FLEET_UNAVAILABLE);
            }
        }
    }

    /// SA `id` is established: if another member held its site, the site is ours now.
    pub(super) fn claim_established(&mut self, id: u64) {
        let Some((c, site, from, peer_id)) = self.contested_site(id) else {
            return;
        };
        tokio::spawn(async move {
            match c.take_over(&site, from).await {
                Ok(true) => tracing::info!(%peer_id, member = %from, "site taken over from another member"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%peer_id, error = %e, "could not take the site over"),
            }
        });
    }

    /// SA `id` was adopted from `rec.contested`, a member that is gone: its site is ours
    /// now (its claim ended with that member's lease, or is taken over if it has not yet).
    pub(super) fn adopt_claim(&mut self, id: u64) {
        let Some((c, site, from, peer_id)) = self.contested_site(id) else {
            return;
        };
        tokio::spawn(async move {
            let r = match c.claim(&site).await {
                Ok(Claimed::HeldBy(m)) if m == from => c.take_over(&site, from).await,
                Ok(Claimed::HeldBy(m)) => {
                    tracing::warn!(%peer_id, member = %m, "adopted site is held by another member");
                    Ok(false)
                }
                Ok(_) => Ok(true),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(%peer_id, error = %e, "could not claim an adopted site");
            }
        });
    }

    /// The claims, site, previous holder and peer ID of SA `id` if another member held its
    /// site (taken: asked once).
    fn contested_site(&mut self, id: u64) -> Option<(Claims, SiteKey, concentrator_fleet::MemberId, String)> {
        let claims = self.claims.as_ref()?.claims.clone();
        let rec = self.sas.get_mut(&id)?;
        let (Some(from), Some(site)) = (rec.contested.take(), rec.site.clone()) else {
            return None;
        };
        Some((claims, site, from, rec.peer_id.to_string()))
    }

    /// The last IKE SA of `site` here is gone (no other record holds it): released.
    pub(super) fn release_site(&mut self, site: SiteKey) {
        if self.sas.values().any(|r| r.site.as_ref() == Some(&site)) {
            return;
        }
        let Some(claims) = self.claims.as_ref() else {
            return;
        };
        let c = claims.claims.clone();
        tokio::spawn(async move {
            // Unreleased (etcd unreachable), the claim ends with our lease at the latest.
            if let Err(e) = c.release(&site).await {
                tracing::debug!(%site, error = %e, "site claim not released");
            }
        });
    }

    /// Claims every site we hold again, under the new session's lease.
    fn claim_again(&mut self) {
        let Some(claims) = self.claims.as_ref() else {
            return;
        };
        let sites: HashSet<SiteKey> = self.sas.values().filter_map(|r| r.site.clone()).collect();
        tracing::info!(
            sites = sites.len(),
            "new fleet session: claiming the sites held again"
        );
        let c = claims.claims.clone();
        let task = tokio::spawn(async move {
            // The session exists before the fleet takes sites again (its map is applied a
            // moment later): a claim refused meanwhile, or lost to a slow etcd, is tried
            // again until every site is claimed (or a newer session starts over).
            let mut left: Vec<SiteKey> = sites.into_iter().collect();
            let mut wait = RECLAIM_RETRY;
            while !left.is_empty() {
                let mut again = Vec::new();
                for site in left {
                    match c.claim(&site).await {
                        Ok(Claimed::HeldBy(m)) => {
                            tracing::warn!(%site, member = %m, "a site held here was claimed by another member meanwhile");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(%site, error = %e, "site not claimed again yet");
                            again.push(site);
                        }
                    }
                }
                if !again.is_empty() {
                    tracing::info!(sites = again.len(), "held sites not claimed again yet: retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RECLAIM_RETRY_MAX);
                }
                left = again;
            }
            tracing::info!("the sites held here are claimed again");
        });
        if let Some(previous) = self.claims.as_mut().and_then(|c| c.reclaiming.replace(task)) {
            previous.abort();
        }
    }

    /// Publishes the shards our SAs' SPIs live in (IKE SPIs of ours, half-open included,
    /// and inbound ESP SPIs): the leader moves none of them away from us.
    pub(super) fn publish_occupancy(&self) {
        let Some(f) = self.fleet.as_ref() else { return };
        let mut live = ShardSet::new();
        for (_, sa) in self.endpoint.sas() {
            for spi in sa.our_spis() {
                live.insert(Shard::of_ike_spi(spi));
            }
            for (spi_in, _) in sa.child_spis() {
                live.insert(Shard::of_esp_spi(spi_in));
            }
        }
        f.view.set_live(&live);
    }
}
