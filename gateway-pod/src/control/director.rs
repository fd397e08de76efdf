//! The driver's side of the VIP front's director ([`crate::cluster`]'s election): while this
//! member directs, a new site that supports RFC 5685 gets an IKE_SA_INIT answer with
//! N(REDIRECT) to the member [`Spread`] picks by load, and no state is kept for it here.
//!
//! With `--fleet-rebalance`, any member holding clearly more than its share of tunnels
//! ([`excess`]) also redirects established sites (RFC 5685 §5), a few a second.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_esp::encap::NON_ESP_MARKER;
use concentrator_fleet::MemberId;
use concentrator_fleet::director::{Spread, excess};
use concentrator_fleet::wire::Kind;
use concentrator_ike::Message;
use concentrator_ike::endpoint::init_redirect_response;
use concentrator_ike::redirect::{GatewayId, init_redirect_of};

use super::driver::Driver;
use crate::metrics::ReasonLabel;

/// What the director keeps between redirects.
#[derive(Debug, Default)]
pub(super) struct DriverDirector {
    spread: Spread,
    /// When each site (by peer identity: sites behind one NAT share an address) was last
    /// sent elsewhere by a rebalance.
    moved: HashMap<String, Instant>,
    /// When this member last redirected established sites.
    last_rebalance: Option<Instant>,
    /// New sites (by their IKE_SA_INIT's initiator SPI) served here to be redirected once
    /// authenticated (`--fleet-redirect-in-auth`), and since when.
    after_auth: HashMap<u64, Instant>,
}

/// How long a site marked for a redirect in IKE_AUTH may take to get there (longer than
/// the half-open timeout).
const AFTER_AUTH_HOLD: Duration = Duration::from_secs(60);

/// At most this many sites are marked at once: a flood of IKE_SA_INITs (which the engine's
/// half-open limit refuses anyway) must not grow the director's memory; past it, new sites
/// are served here without a redirect.
const AFTER_AUTH_MAX: usize = 65_536;

/// Sites a member over its share redirects per status tick (a second): the others' reports
/// lag a second behind, so a few at a time keeps the member from overshooting.
const REBALANCE_PER_TICK: u64 = 2;

/// After sites were redirected, the next ones wait this long: the moved sites' old IKE SAs
/// still count here, and the members' reports lag a second, until they are gone.
const REBALANCE_SETTLE: Duration = Duration::from_secs(3);

/// A site is never redirected again by a rebalance within this: strongSwan follows at most 5
/// redirects in 300 s (and then stays), so one per 300 s keeps far from it.
const SITE_COOLDOWN: Duration = Duration::from_secs(300);

impl Driver {
    /// Answers `datagram` (which routing left to us) with a REDIRECT if we direct the VIP
    /// front and it is a new site that can be sent elsewhere: true if it was answered so.
    pub(super) fn direct(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        via: Option<MemberId>,
    ) -> bool {
        let Some(f) = self.fleet.as_mut() else {
            return false;
        };
        if !f.view.vip_front() || f.view.director().is_none_or(|d| Some(d) != f.view.me()) {
            return false;
        }
        let Ok(msg) = Message::decode(datagram) else {
            return false;
        };
        if !init_redirect_of(&msg).is_some_and(|r| r.redirectable()) {
            return false;
        }
        if f.view.redirect_in_auth() {
            // Huawei's second mode (RFC 5685 §6): served here up to its authentication,
            // then sent elsewhere in the IKE_AUTH response.
            let d = &mut f.director;
            if d.after_auth.len() < AFTER_AUTH_MAX {
                d.after_auth.insert(msg.header.spi_i, Instant::now());
            }
            return false;
        }
        let Some(choice) = f.director.spread.choose(&f.view.members()) else {
            // No member to send it to (none has a redirect address, or all drain): served
            // here rather than refused.
            return false;
        };
        let Some(answer) = init_redirect_response(&msg, &GatewayId::Ip(choice.address)) else {
            return false;
        };
        tracing::debug!(%remote, to = %choice.address, member = %choice.member, "new site redirected");
        self.gateway
            .metrics
            .fleet
            .redirects
            .get_or_create(&ReasonLabel {
                reason: "init".into(),
            })
            .inc();
        self.answer_direct(local, remote, via, &answer);
        true
    }

    /// Sends an answer the engine did not make (it keeps no state for a redirected site)
    /// back the way `datagram` came: through the member it entered by, or from our socket.
    fn answer_direct(&mut self, local: SocketAddr, remote: SocketAddr, via: Option<MemberId>, answer: &[u8]) {
        let nat_t = local.port() == self.configs.nat_t_port;
        let mut out = Vec::with_capacity(answer.len() + 4);
        if nat_t {
            // RFC 3948 §2.2: IKE on port 4500 carries the non-ESP marker, on the wire and in
            // a frame alike.
            out.extend_from_slice(&NON_ESP_MARKER);
        }
        out.extend_from_slice(answer);
        if let Some(m) = via {
            let Some(f) = self.fleet.as_mut() else { return };
            match f.view.address(m) {
                Some(to) => {
                    f.link.send(Kind::Egress, to, local, remote, 0, &out);
                }
                None => self.gateway.metrics.fleet.forward.drop("member_gone"),
            }
            return;
        }
        let socket = if nat_t { &self.udp4500 } else { &self.udp500 };
        // UDP does not block for long; a full buffer loses the answer and the site
        // retransmits.
        if let Err(e) = socket.try_send_to(&out, remote) {
            tracing::debug!(%remote, error = %e, "redirect not sent");
        }
    }
}

impl Driver {
    /// Each status tick (a second): forgets what has aged (sites moved 300 s ago, marks of
    /// sites that never authenticated: once a tick, not per new site), then rebalances.
    pub(super) fn director_tick(&mut self, now: Instant) {
        if let Some(f) = self.fleet.as_mut() {
            let d = &mut f.director;
            d.moved
                .retain(|_, at| now.saturating_duration_since(*at) < SITE_COOLDOWN);
            d.after_auth
                .retain(|_, at| now.saturating_duration_since(*at) < AFTER_AUTH_HOLD);
        }
        self.rebalance(now);
    }

    /// With `--fleet-rebalance`: while this member holds more than its share of tunnels,
    /// sends up to [`REBALANCE_PER_TICK`] of the sites that connected to it, and were not
    /// moved lately, to the least-loaded member (a REDIRECT on their IKE SA; each comes back
    /// there with a new IKE SA). Sites that did not announce REDIRECT_SUPPORTED, and IKE SAs
    /// we initiated, stay.
    fn rebalance(&mut self, now: Instant) {
        let Some(f) = self.fleet.as_ref() else { return };
        if !f.view.rebalance() || !f.view.available() {
            return;
        }
        let Some(me) = f.view.me() else { return };
        let members = f.view.members();
        let over = excess(me, &members);
        let candidates: Vec<(u64, Arc<str>)> = self
            .sas
            .iter()
            .filter(|(_, r)| r.established_at.is_some() && r.remote.is_some())
            .map(|(id, r)| (*id, r.peer_id.clone()))
            .collect();
        let Some(f) = self.fleet.as_mut() else { return };
        let d = &mut f.director;
        if over == 0
            || d.last_rebalance
                .is_some_and(|at| now.saturating_duration_since(at) < REBALANCE_SETTLE)
        {
            return;
        }
        let others: BTreeMap<_, _> = members.into_iter().filter(|(m, _)| *m != me).collect();
        let mut sent = 0;
        for (id, site) in candidates {
            if sent >= over.min(REBALANCE_PER_TICK) {
                break;
            }
            if d.moved.contains_key(&*site) {
                continue;
            }
            let Some(to) = d.spread.peek(&others) else { break };
            // Refused for a site that cannot be redirected, or an SA of ours: try another.
            if self
                .endpoint
                .redirect(id, now, &GatewayId::Ip(to.address))
                .is_err()
            {
                continue;
            }
            d.spread.count(to.member);
            d.moved.insert(site.to_string(), now);
            d.last_rebalance = Some(now);
            sent += 1;
            tracing::info!(site = %site, to = %to.address, member = %to.member, excess = over, "site redirected to rebalance the fleet");
            self.gateway
                .metrics
                .fleet
                .redirects
                .get_or_create(&ReasonLabel {
                    reason: "rebalance".into(),
                })
                .inc();
        }
    }
}

impl Driver {
    /// Whether SA `id` is a new site this director redirects once it has authenticated.
    pub(super) fn redirects_after_auth(&self, id: u64) -> bool {
        let (Some(f), Some(spi_i)) = (
            self.fleet.as_ref(),
            self.endpoint.sa(id).and_then(|sa| match sa {
                concentrator_ike::endpoint::Sa::Responder(r) => r.spi_i(),
                concentrator_ike::endpoint::Sa::Initiator(_) => None,
            }),
        ) else {
            return false;
        };
        f.director.after_auth.contains_key(&spi_i)
    }

    /// Before SA `id` gets its PSK: if it is a new site marked for a redirect in IKE_AUTH,
    /// the engine answers its authentication with N(REDIRECT) to the member [`Spread`]
    /// picks (and closes the SA) instead of making its CHILD SA.
    pub(super) fn redirect_after_auth(&mut self, id: u64) {
        if !self.redirects_after_auth(id) {
            return;
        }
        let Some(f) = self.fleet.as_mut() else { return };
        let Some(spi_i) = self.endpoint.responder_mut(id).and_then(|r| r.spi_i()) else {
            return;
        };
        f.director.after_auth.remove(&spi_i);
        let Some(to) = f.director.spread.peek(&f.view.members()) else {
            return;
        };
        let Some(r) = self.endpoint.responder_mut(id) else {
            return;
        };
        if r.redirect_after_auth(GatewayId::Ip(to.address)).is_err() {
            return;
        }
        f.director.spread.count(to.member);
        tracing::debug!(to = %to.address, member = %to.member, "authenticated site redirected");
        self.gateway
            .metrics
            .fleet
            .redirects
            .get_or_create(&ReasonLabel {
                reason: "auth".into(),
            })
            .inc();
    }
}
