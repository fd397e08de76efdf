//! Sites that authenticate to us: the eroute a peer's identity selects (static, egroup or
//! dynamic), whether it allows the IKE proposal chosen in IKE_SA_INIT, and the key that
//! answers the engine's "PSK needed" step.

use std::sync::Arc;
use std::time::Instant;

use concentrator_ike::responder::{Config as ResponderConfig, IdBuf};
use ipnet::IpNet;

use super::LookupDone;
use crate::control::driver::Driver;
use crate::control::events::PROPOSAL_NOT_ALLOWED;
use crate::egroups::Egroups;
use crate::eroute::{Selection, select_responder};
use crate::sitedb::LookupError;

impl Driver {
    /// The "PSK needed" step: the eroute the identity selects, and its key: a static
    /// eroute's Secret at once, or an egroup's site row after a lookup that runs as its own
    /// task (the answer comes back through [`Self::lookup_done`]).
    pub(in crate::control) fn peer_identified(&mut self, spi_r: u64, id: &IdBuf) {
        let peer_id = id.to_string();
        let set = &self.config.set;
        let egroups = &self.egroups;
        let selection = select_responder(set, &peer_id, |g, p| egroups.has_dynamic(g, p));
        let (psk, eroute, reason) = if self.gateway.is_draining() {
            (None, None, Some("draining"))
        } else {
            match &selection {
                Selection::Static { eroute } => match self.config.static_psks.get(eroute) {
                    Some(psk) => (Some(psk.expose().to_vec()), Some(eroute.clone()), None),
                    None => (None, Some(eroute.clone()), Some("no_psk")),
                },
                Selection::Egroup { egroup, .. } | Selection::Dynamic { egroup } => {
                    let Some(base) = set.egroups.get(egroup).map(|g| g.eroute.clone()) else {
                        return;
                    };
                    // Refused before the lookup: no row can make the proposal right.
                    if !self.allows_proposal(spi_r, &base) {
                        self.refuse(spi_r, id, Some(base), PROPOSAL_NOT_ALLOWED);
                        return;
                    }
                    let names = (self.names.get(&base), self.names.get(egroup));
                    let rec = self.record(spi_r, id);
                    (rec.eroute, rec.egroup) = (Some(names.0), Some(names.1));
                    let lookup = self.egroups.lookup_by_peer(egroup, &peer_id, Instant::now());
                    let (tx, egroup) = (self.lookups.clone(), egroup.clone());
                    tokio::spawn(async move {
                        let result = lookup.await;
                        let _ = tx.send(LookupDone {
                            id: Some(spi_r),
                            egroup,
                            base_eroute: base,
                            result,
                        });
                    });
                    return;
                }
                Selection::None => (None, None, Some("unknown_peer")),
            }
        };
        let reason = match &eroute {
            Some(name) if reason.is_none() && !self.use_eroute(spi_r, name, None) => {
                Some(PROPOSAL_NOT_ALLOWED)
            }
            _ => reason,
        };
        if let Some(reason) = reason {
            self.refuse(spi_r, id, eroute, reason);
            return;
        }
        let eroute = eroute.map(|e| self.names.get(&e));
        self.record(spi_r, id).eroute = eroute;
        self.authenticate(spi_r, psk.map(zeroize::Zeroizing::new));
    }

    /// Whether `eroute` allows the IKE proposal SA `id` negotiated in IKE_SA_INIT, where
    /// every eroute's proposals were on offer (true if either is gone: nothing to refuse).
    fn allows_proposal(&mut self, id: u64, eroute: &str) -> bool {
        let config = Arc::clone(&self.config);
        let choice = self.endpoint.responder_mut(id).and_then(|r| r.ike_choice());
        match (choice, config.set.eroutes.get(eroute)) {
            (Some(c), Some(e)) => c.allowed_by(&e.ike_proposals),
            _ => true,
        }
    }

    /// Refuses the peer of SA `id` (AUTHENTICATION_FAILED), counted under `reason` when the
    /// negotiation fails.
    fn refuse(&mut self, id: u64, peer: &IdBuf, eroute: Option<String>, reason: &'static str) {
        let eroute = eroute.map(|e| self.names.get(&e));
        self.record(id, peer).eroute = eroute;
        self.refuse_recorded(id, reason);
    }

    /// [`Self::refuse`] for an SA whose record exists (a site lookup answered).
    pub(in crate::control) fn refuse_recorded(&mut self, id: u64, reason: &'static str) {
        let Some(rec) = self.sas.get_mut(&id) else {
            return;
        };
        rec.refusal = Some(reason);
        tracing::info!(peer_id = %rec.peer_id, reason, "peer refused");
        self.provide_psk(id, None);
    }

    /// Makes the SA negotiate its CHILD SA by `eroute` (with the site's subnet for a dynamic
    /// one) instead of the eroute that answered IKE_SA_INIT; false if that eroute does not
    /// allow the IKE SA's proposal (the peer must be refused).
    fn use_eroute(&mut self, id: u64, eroute: &str, site_subnet: Option<IpNet>) -> bool {
        let config = Arc::clone(&self.config);
        let Some(e) = config.set.eroutes.get(eroute) else {
            return true;
        };
        let Some(responder) = self.endpoint.responder_mut(id) else {
            return true;
        };
        let mut config = self.configs.responder_for(eroute, e, responder.config());
        if let Some(subnet) = site_subnet {
            // A site of an egroup: its own row's subnet, so its own copy.
            config = Arc::new(ResponderConfig {
                remote_subnet: subnet,
                ..(*config).clone()
            });
        }
        !matches!(
            responder.set_config(config),
            Err(concentrator_ike::responder::Error::ProposalNotAllowed)
        )
    }

    /// A site lookup finished: authenticate with the row's PSK, or refuse with the reason
    /// counted per egroup. The SA may have gone meanwhile.
    pub(in crate::control) fn lookup_done(&mut self, done: LookupDone) {
        let LookupDone {
            id,
            egroup,
            base_eroute,
            result,
        } = done;
        let Some(id) = id else {
            self.acquired(&egroup, &base_eroute, result);
            return;
        };
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        let peer_id = rec.peer_id.clone();
        let base_remote = self.config.set.eroutes.get(&base_eroute).map(|e| e.remote_subnet);
        let result = result.and_then(|site| match base_remote {
            Some(net) => Egroups::check_subnet(&site, net).map(|()| site),
            None => Err(LookupError::NotFound),
        });
        let site = match result {
            Ok(site) => site,
            Err(e) => {
                self.gateway.metrics.count_lookup_failure(&egroup, e.kind());
                tracing::warn!(%peer_id, %egroup, reason = e.kind(), error = %e, "site lookup failed");
                self.refuse_recorded(id, "site_lookup");
                return;
            }
        };
        let allowed = self.use_eroute(id, &base_eroute, Some(site.remote_subnet));
        if let Some(rec) = self.sas.get_mut(&id) {
            rec.site_subnet = Some(site.remote_subnet);
        }
        if !allowed {
            self.refuse_recorded(id, PROPOSAL_NOT_ALLOWED);
            return;
        }
        self.authenticate(id, Some(zeroize::Zeroizing::new(site.psk.expose().to_vec())));
    }
}
