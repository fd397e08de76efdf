//! What the driver keeps per IKE SA beside the engine's state, and the engine's events that
//! change it: each goes to the room that handles it (policy, install, status), and the
//! failures are counted under their reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use concentrator_ike::Event;
use concentrator_ike::endpoint::EndpointEvent;
use concentrator_ike::responder::{DeleteReason, IdBuf};
use concentrator_ike::sa::snapshot::Role;
use ipnet::IpNet;

use super::driver::Driver;
use crate::dataplane::table::SaCounters;

/// The refusal of a peer whose eroute does not allow the IKE proposal it negotiated.
pub(super) const PROPOSAL_NOT_ALLOWED: &str = "ike_proposal_not_allowed";

/// What the control plane keeps per IKE SA, beyond the engine's state.
pub(super) struct IkeSaRecord {
    /// Shared with the admin API's row of the tunnel.
    pub(super) peer_id: Arc<str>,
    /// Names shared by every SA of the eroute or egroup ([`super::driver::Names`]).
    pub(super) eroute: Option<Arc<str>>,
    pub(super) egroup: Option<Arc<str>>,
    pub(super) remote: Option<SocketAddr>,
    pub(super) established_at: Option<SystemTime>,
    pub(super) children: Vec<ChildRecord>,
    /// Why we refused the peer at the PSK step (counted under this instead of the generic
    /// AUTHENTICATION_FAILED that follows).
    pub(super) refusal: Option<&'static str>,
    /// For a site from an egroup: its row's subnet, once looked up.
    pub(super) site_subnet: Option<IpNet>,
    /// Traffic seen at the last status pass (to notice use and idleness).
    pub(super) last_bytes: u64,
    pub(super) last_traffic: Instant,
    /// A NAT lies between us and the peer: keep its mapping alive (RFC 3948 §4).
    pub(super) nat: bool,
    pub(super) last_keepalive: Instant,
    /// In a fleet: the site this SA holds the claim of.
    pub(super) site: Option<crate::cluster::SiteKey>,
    /// The member that held the site when we claimed it: taken over once established.
    pub(super) contested: Option<concentrator_fleet::MemberId>,
}

impl IkeSaRecord {
    pub(super) fn new(peer_id: impl Into<Arc<str>>, now: Instant) -> Self {
        Self {
            peer_id: peer_id.into(),
            eroute: None,
            egroup: None,
            remote: None,
            established_at: None,
            children: Vec::new(),
            refusal: None,
            site_subnet: None,
            last_bytes: 0,
            last_traffic: now,
            nat: false,
            last_keepalive: now,
            site: None,
            contested: None,
        }
    }
}

/// A CHILD SA of an IKE SA, as installed in the data plane.
pub(super) struct ChildRecord {
    pub(super) spi_in: u32,
    pub(super) spi_out: u32,
    pub(super) encryption: concentrator_crds::proposal::Encryption,
    /// Its negotiated remote subnets (shared with the admin API's row).
    pub(super) subnets: Arc<[IpNet]>,
    /// The one route that carries them all (its eroute's remote subnet), if there is one;
    /// else each has its own.
    pub(super) aggregate: Option<IpNet>,
    pub(super) counters: Arc<SaCounters>,
}

impl Driver {
    pub(super) fn event(&mut self, event: EndpointEvent) {
        match event {
            EndpointEvent::Removed { id, established } => {
                self.removed(id, established);
                self.auto.forget(id);
            }
            EndpointEvent::Sa {
                id,
                role: Role::Initiator,
                event,
            } => self.initiated_event(id, event),
            EndpointEvent::Sa { id, event, .. } => self.sa_event(id, event),
        }
    }

    /// Events of the SAs we started: the same handling as the ones peers start, plus
    /// reconnecting the eroutes that are ours to keep up.
    fn initiated_event(&mut self, id: u64, event: Event) {
        match &event {
            Event::IkeSaEstablished { .. } => self.auto.established(id),
            Event::IkeSaDeleted { reason, .. } => {
                if *reason == DeleteReason::Redirected {
                    self.follow_redirect(id);
                }
                self.auto.closed(id);
            }
            Event::RequestRefused { exchange, error } => {
                tracing::info!(?exchange, %error, "declined a request of the peer");
                return;
            }
            Event::PeerError { notify_type } => {
                tracing::warn!(?notify_type, "peer reported an error");
                return;
            }
            Event::Failed(e) => {
                if *e == concentrator_ike::Error::Redirected {
                    self.follow_redirect(id);
                }
                self.auto.closed(id);
                let eroute = self.auto.eroute_of(id).unwrap_or_default();
                let reason = initiator_failure_reason(e);
                self.gateway.metrics.count_ike_failure(reason);
                tracing::warn!(%eroute, reason, error = %e, "IKE negotiation we started failed");
                return;
            }
            _ => {}
        }
        self.sa_event(id, event);
    }

    /// `spi_r` is the SA's id in the endpoint (our first SPI): it names the tunnel for its
    /// whole life, across IKE SA rekeys.
    fn sa_event(&mut self, spi_r: u64, event: Event) {
        match event {
            Event::PeerIdentified { id } => self.peer_identified(spi_r, &id),
            Event::IkeSaEstablished {
                spi_i,
                spi_r: sa_spi_r,
                peer_id,
                remote,
                nat_detected,
            } => {
                let rec = self.record(spi_r, &peer_id);
                rec.remote = Some(remote);
                rec.established_at = Some(SystemTime::now());
                rec.nat = nat_detected;
                tracing::info!(
                    peer_id = %peer_id,
                    %remote,
                    nat_detected,
                    eroute = rec.eroute.as_deref().unwrap_or("-"),
                    spi_i = format_args!("{spi_i:016x}"),
                    spi_r = format_args!("{sa_spi_r:016x}"),
                    "IKE SA established"
                );
                self.dynamic_established(spi_r);
                self.static_established(spi_r);
                self.claim_established(spi_r);
                self.publish(spi_r);
            }
            Event::ChildSaInstalled(child) => self.child_installed(spi_r, *child),
            Event::ChildSaDeleted { spi_in, spi_out } => self.child_deleted(spi_r, spi_in, spi_out),
            Event::IkeSaRekeyed {
                old_spi_r, new_spi_r, ..
            } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| &*r.peer_id);
                tracing::info!(
                    peer_id = %peer,
                    old_spi_r = format_args!("{old_spi_r:016x}"),
                    new_spi_r = format_args!("{new_spi_r:016x}"),
                    "IKE SA rekeyed"
                );
            }
            Event::IkeSaRetired { .. } => {}
            Event::IkeSaDeleted { reason, .. } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| &*r.peer_id);
                tracing::info!(peer_id = %peer, %reason, "IKE SA deleted");
                if matches!(reason, DeleteReason::DeadPeer) {
                    self.gateway.metrics.count_ike_failure("dead_peer");
                }
                // The CHILD SAs went with their own events; the record goes now, not when
                // the endpoint stops answering retransmissions.
                self.removed(spi_r, true);
            }
            Event::RequestRefused { exchange, error } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| &*r.peer_id);
                self.gateway.metrics.count_ike_failure(failure_reason(&error));
                tracing::warn!(peer_id = %peer, ?exchange, %error, "request refused");
            }
            Event::PeerError { notify_type } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| &*r.peer_id);
                tracing::warn!(peer_id = %peer, ?notify_type, "peer reported an error");
            }
            Event::MessageIdSync { requested, next } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| &*r.peer_id);
                let result = match (requested, next) {
                    (_, None) => "unusable",
                    (true, Some(_)) => "synced",
                    (false, Some(_)) => "answered",
                };
                self.gateway.metrics.count_message_id_sync(result);
                match next {
                    Some((ours, theirs)) => tracing::info!(
                        peer_id = %peer,
                        requested,
                        our_next = ours,
                        peer_next = theirs,
                        "IKE Message IDs synchronized (RFC 6311)"
                    ),
                    None => tracing::warn!(
                        peer_id = %peer,
                        "IKE Message ID sync answer unusable; taking the peer's next request within the catch-up window"
                    ),
                }
            }
            // The director sent the site elsewhere after authentication (RFC 5685 §6):
            // counted as a redirect, not a failure.
            Event::Failed(concentrator_ike::Error::Redirected) => {
                tracing::debug!(spi_r, "IKE SA closed after a redirect in IKE_AUTH");
            }
            Event::Failed(e) => {
                let rec = self.sas.get(&spi_r);
                let peer = rec.map_or("-", |r| &*r.peer_id).to_owned();
                let reason = rec.and_then(|r| r.refusal).unwrap_or_else(|| failure_reason(&e));
                self.gateway.metrics.count_ike_failure(reason);
                tracing::warn!(peer_id = %peer, reason, error = %e, "IKE negotiation failed");
            }
        }
    }

    /// The record of SA `spi_r`, made on first sight of its peer.
    pub(super) fn record(&mut self, spi_r: u64, peer_id: &IdBuf) -> &mut IkeSaRecord {
        self.sas
            .entry(spi_r)
            .or_insert_with(|| IkeSaRecord::new(peer_id.to_string(), Instant::now()))
    }

    /// SA `spi_r` is gone: its ownerships, CHILD SAs, routes and tunnel row go with it.
    fn removed(&mut self, spi_r: u64, established: bool) {
        let Some(rec) = self.sas.remove(&spi_r) else {
            return;
        };
        let handed = self.handovers.is_released(spi_r);
        self.replicate_removed(spi_r);
        self.release_ownership(spi_r, &rec);
        for child in &rec.children {
            self.backend.remove_child(child.spi_in);
            self.unroute(child);
        }
        self.gateway.tunnels.remove(spi_r);
        // After this wake-up's messages went out: the DELETE we may just have queued for
        // this SA must still leave through the member the site's flow enters by.
        if let Some(remote) = rec.remote {
            self.unrouted.push(remote);
        }
        // Handed over: the new owner takes the claim over.
        if let Some(site) = rec.site.filter(|_| !handed) {
            self.release_site(site);
        }
        self.gateway
            .metrics
            .tunnels
            .set(self.gateway.tunnels.len() as i64);
        if established {
            tracing::info!(peer_id = %rec.peer_id, "IKE SA removed");
        }
    }
}

/// The label a failed negotiation is counted under.
fn failure_reason(e: &concentrator_ike::responder::Error) -> &'static str {
    use concentrator_ike::negotiate::NegotiationError;
    use concentrator_ike::responder::Error;
    match e {
        Error::AuthenticationFailed(_) => "authentication_failed",
        Error::ProposalNotAllowed => PROPOSAL_NOT_ALLOWED,
        Error::Negotiation(NegotiationError::NoProposalChosen) => "no_proposal_chosen",
        Error::Negotiation(NegotiationError::TsUnacceptable) => "ts_unacceptable",
        Error::InvalidKe { .. } => "invalid_ke",
        Error::Malformed(_) | Error::MalformedInner(_) | Error::MissingPayload(_) => "malformed",
        _ => "other",
    }
}

/// The label a failed negotiation we started is counted under.
fn initiator_failure_reason(e: &concentrator_ike::initiator::Error) -> &'static str {
    use concentrator_ike::NotifyType;
    use concentrator_ike::initiator::Error;
    match e {
        Error::Refused { notify, .. } if *notify == NotifyType::AUTHENTICATION_FAILED => {
            "authentication_failed"
        }
        Error::Refused { notify, .. } if *notify == NotifyType::NO_PROPOSAL_CHOSEN => "no_proposal_chosen",
        Error::Refused { notify, .. } if *notify == NotifyType::TS_UNACCEPTABLE => "ts_unacceptable",
        Error::AuthenticationFailed(_) => "authentication_failed",
        Error::Timeout(_) => "timeout",
        Error::Malformed(_) | Error::MalformedInner(_) | Error::MissingPayload(_) => "malformed",
        _ => "other",
    }
}
