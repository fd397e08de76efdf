//! The driver's side of the fleet ([`crate::cluster`]): IKE messages for another member's
//! SAs go to it (and new IKE SAs to the member placement picks), and answers to a site whose
//! flow enters through another member go back out through it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use concentrator_esp::encap::NON_ESP_MARKER;
use concentrator_fleet::MemberId;
use concentrator_fleet::wire::Kind;
use concentrator_ike::responder::Transmit;

use super::driver::Driver;
use crate::cluster::{Claims, IkeRoute, Link, SharedView, Via, route_ike};

/// What the driver keeps of the fleet.
pub(super) struct DriverFleet {
    pub(super) view: SharedView,
    pub(super) claims: Claims,
    link: Link,
    /// The member each site's IKE flow enters through, when not this one.
    vias: HashMap<SocketAddr, MemberId>,
    nat_t_port: u16,
}

impl DriverFleet {
    pub(super) fn new(view: SharedView, claims: Claims, link: Link, nat_t_port: u16) -> Self {
        Self {
            view,
            claims,
            link,
            vias: HashMap::new(),
            nat_t_port,
        }
    }

    /// The datagram as it travels in a frame: IKE on the NAT-T port keeps its non-ESP
    /// marker (RFC 3948 §2.2), so the other side tells it from ESP as a socket would.
    fn framed<'a>(&self, local: SocketAddr, payload: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if local.port() == self.nat_t_port {
            let mut v = Vec::with_capacity(payload.len() + 4);
            v.extend_from_slice(&NON_ESP_MARKER);
            v.extend_from_slice(payload);
            v.into()
        } else {
            payload.into()
        }
    }
}

impl Driver {
    /// Routes an IKE message that arrived here (`via`: the member that forwarded it): true
    /// if it is ours to handle; otherwise it went to its owner, or was dropped (counted).
    pub(super) fn route_in(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        via: Option<MemberId>,
    ) -> bool {
        let Some(f) = self.fleet.as_mut() else {
            return true;
        };
        match route_ike(&f.view, remote, datagram) {
            IkeRoute::Local => {}
            // What another member forwarded is never forwarded again: that member has
            // another view of the fleet, which catches up within a watch.
            IkeRoute::Forward(..) if via.is_some() => {
                self.gateway.metrics.fleet.forward.drop("not_owner");
                return false;
            }
            IkeRoute::Forward(_, to, epoch) => {
                let payload = f.framed(local, datagram);
                f.link.send(Kind::Ingress, to, local, remote, epoch, &payload);
                return false;
            }
            IkeRoute::Nowhere => {
                self.gateway.metrics.fleet.forward.drop("no_owner");
                return false;
            }
        }
        match via {
            Some(m) => f.vias.insert(remote, m),
            None => f.vias.remove(&remote),
        };
        true
    }

    /// Sends `t` through the member the site's flow enters through, if another: true if it
    /// went (or was dropped) that way.
    pub(super) fn send_via(&mut self, t: &Transmit) -> bool {
        let Some(f) = self.fleet.as_mut() else {
            return false;
        };
        let Some(m) = f.vias.get(&t.remote).copied() else {
            return false;
        };
        match f.view.address(m) {
            Some(to) => {
                let payload = f.framed(t.local, &t.payload);
                f.link.send(Kind::Egress, to, t.local, t.remote, 0, &payload);
            }
            // The member is gone: so is the site's flow through it; the site comes back
            // through another one.
            None => self.gateway.metrics.fleet.forward.drop("member_gone"),
        }
        true
    }

    /// Where a new CHILD SA with the site at `remote` sends its packets: through the
    /// member the site's IKE flow enters through, if another.
    pub(super) fn via_of(&self, remote: SocketAddr) -> Arc<Via> {
        let member = self.fleet.as_ref().and_then(|f| f.vias.get(&remote).copied());
        Arc::new(Via::new(member))
    }

    /// The site at `remote` has no IKE SA here any more.
    pub(super) fn forget_via(&mut self, remote: SocketAddr) {
        if let Some(f) = self.fleet.as_mut() {
            f.vias.remove(&remote);
        }
    }
}
