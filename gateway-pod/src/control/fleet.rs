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

use super::claims::FLEET_UNAVAILABLE;
use super::driver::Driver;
use crate::cluster::{IkeRoute, Link, SharedView, Via, route_ike};

/// What the driver keeps of the fleet.
pub(super) struct DriverFleet {
    pub(super) view: SharedView,
    pub(super) link: Link,
    /// The VIP front's director, while this member is it.
    pub(super) director: super::director::DriverDirector,
    /// The member each site's IKE flow enters through (`None`: this one), by our port and
    /// the site's address, as its last IKE message came: a front keeps affinity per Service
    /// port, so a site that sends to both ports from one address (one socket) may enter
    /// through two members.
    vias: HashMap<(u16, SocketAddr), Option<MemberId>>,
    /// The path the site's ESP takes (the data plane learns it from each authenticated
    /// packet): what IKE answers follow when no IKE message came this way yet, as for an
    /// SA taken over from a member that is gone.
    esp_vias: HashMap<SocketAddr, Arc<Via>>,
    ike_port: u16,
    nat_t_port: u16,
    /// Whether the fleet took new sites at the last look (to log the changes).
    was_available: bool,
}

impl DriverFleet {
    pub(super) fn new(view: SharedView, link: Link, (ike_port, nat_t_port): (u16, u16)) -> Self {
        Self {
            view,
            link,
            director: super::director::DriverDirector::default(),
            vias: HashMap::new(),
            esp_vias: HashMap::new(),
            ike_port,
            nat_t_port,
            // A pod starts unavailable (no session yet).
            was_available: false,
        }
    }

    /// The member the site at `remote` enters through on our `port`, if another. On the
    /// NAT-T port IKE and ESP are one flow, and the ESP path is the freshest word on it: each
    /// ESP packet sets it, and so does each IKE message there ([`Self::route_in`]); a flow
    /// the front moved while only ESP came since is followed at once. Else as the site's last
    /// IKE message on `port` came.
    fn entry(&self, port: u16, remote: SocketAddr) -> Option<MemberId> {
        if port == self.nat_t_port
            && let Some(esp) = self.esp_vias.get(&remote)
        {
            return esp.get();
        }
        self.vias.get(&(port, remote)).copied().flatten()
    }

    /// The member the site at `remote` enters through, if another, on either of our ports
    /// (the NAT-T port's first: where a site that floated talks).
    pub(super) fn entry_of_site(&self, remote: SocketAddr) -> Option<MemberId> {
        // "Enters here" and "not known" are both `None` from `entry`: only a path that is
        // not known on the NAT-T port at all falls back to the IKE port's.
        if let Some(esp) = self.esp_vias.get(&remote) {
            return esp.get();
        }
        if let Some(via) = self.vias.get(&(self.nat_t_port, remote)) {
            return *via;
        }
        self.vias.get(&(self.ike_port, remote)).copied().flatten()
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
        // A new site while the fleet cannot say who holds what: not answered at all, so
        // that the site's own retransmissions bring it in once etcd is back (a refusal
        // would make most sites give up).
        if !f.view.available() && is_init_request(datagram) {
            self.gateway.metrics.count_ike_failure(FLEET_UNAVAILABLE);
            tracing::debug!(%remote, "IKE_SA_INIT not answered: the fleet is unavailable");
            return false;
        }
        let route = route_ike(&f.view, remote, datagram);
        // The VIP front's director answers new sites itself (and keeps nothing of them).
        if route == IkeRoute::Local && is_init_request(datagram) && self.direct(local, remote, datagram, via)
        {
            return false;
        }
        let Some(f) = self.fleet.as_mut() else {
            return true;
        };
        match route {
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
        f.vias.insert((local.port(), remote), via);
        // IKE on the NAT-T port and the site's ESP in UDP are one flow: where one enters, so
        // does the other (an idle site's tunnel follows its next liveness check).
        if local.port() == f.nat_t_port
            && let Some(esp) = f.esp_vias.get(&remote)
            && esp.get() != via
        {
            esp.set(via);
        }
        true
    }

    /// Logs when the fleet stops or starts taking new sites; rebalances (VIP front).
    pub(super) fn fleet_health(&mut self) {
        self.director_tick(std::time::Instant::now());
        // Each second: a reload or a new member may change which subnets are safe to route.
        self.route_sites();
        let Some(f) = self.fleet.as_mut() else { return };
        let available = f.view.available();
        if available != f.was_available {
            f.was_available = available;
            if available {
                tracing::info!("fleet available: new sites are taken");
            } else {
                tracing::warn!(
                    "fleet unavailable (no etcd session): established tunnels carry on, new sites are refused until etcd is back"
                );
            }
        }
    }

    /// Sends `t` through the member the site's flow enters through, if another: true if it
    /// went (or was dropped) that way.
    pub(super) fn send_via(&mut self, t: &Transmit) -> bool {
        // Framed (a copy) only for a site that enters through another member.
        let Some(f) = self
            .fleet
            .as_ref()
            .filter(|f| f.entry(t.local.port(), t.remote).is_some())
        else {
            return false;
        };
        let payload = f.framed(t.local, &t.payload).into_owned();
        self.through_entry(t.local, t.remote, &payload)
    }

    /// Sends a NAT keepalive (one 0xFF octet, no non-ESP marker) to the site at `remote`
    /// through the member its flow enters through, if another: true if it went that way.
    pub(super) fn keepalive_via(&mut self, remote: SocketAddr) -> bool {
        // The receiving member sends it from its socket of the same port.
        let local = self.udp4500.local_addr().unwrap_or(remote);
        self.through_entry(local, remote, &[0xff])
    }

    /// Sends `datagram` (as it goes on the wire) to the site at `remote` from the member its
    /// flow enters through, if another: true if it went (or was dropped) that way.
    fn through_entry(&mut self, local: SocketAddr, remote: SocketAddr, datagram: &[u8]) -> bool {
        let Some(f) = self.fleet.as_mut() else {
            return false;
        };
        let Some(m) = f.entry(local.port(), remote) else {
            return false;
        };
        match f.view.address(m) {
            Some(to) => {
                f.link.send(Kind::Egress, to, local, remote, 0, datagram);
            }
            // The member is gone: so is the site's flow through it; the site comes back
            // through another one.
            None => self.gateway.metrics.fleet.forward.drop("member_gone"),
        }
        true
    }

    /// Where a new CHILD SA with the site at `remote` sends its packets: through the
    /// member the site's IKE flow enters through, if another.
    pub(super) fn via_of(&mut self, remote: SocketAddr) -> Arc<Via> {
        let Some(f) = self.fleet.as_mut() else {
            return Arc::default();
        };
        // As its last IKE message came; else as the site's ESP (or an adopted SA's old owner,
        // `adopt_entry`) last said.
        let entry = match f.vias.get(&(f.nat_t_port, remote)) {
            Some(via) => *via,
            None => f.esp_vias.get(&remote).and_then(|v| v.get()),
        };
        let via = Arc::new(Via::new(entry));
        f.esp_vias.insert(remote, via.clone());
        via
    }

    /// An SA adopted (handed over, or taken over) whose site's flow enters through `entry`,
    /// as its old owner knew. Behind a Service the node's conntrack keeps the site's flow on
    /// that member, so what this member starts (its first liveness check, before the site
    /// has sent anything here) must leave through it too: sent from this pod's own address,
    /// it would reach the site from an address it cannot answer, and the site would move its
    /// SA there (RFC 7296 §2.23). It is kept as the ESP path's first value: the site's next
    /// IKE message, or its next ESP packet (through whichever member its flow enters by
    /// then), replaces it. An entry that is this member, or a member gone, leaves the direct
    /// path; so does a path this member already knows.
    pub(super) fn adopt_entry(&mut self, remote: SocketAddr, entry: MemberId) {
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        if f.view.me() == Some(entry)
            || f.view.address(entry).is_none()
            || f.vias.contains_key(&(f.nat_t_port, remote))
            || f.esp_vias.contains_key(&remote)
        {
            return;
        }
        f.esp_vias.insert(remote, Arc::new(Via::new(Some(entry))));
    }

    /// The site at `remote` has no IKE SA here any more.
    pub(super) fn forget_via(&mut self, remote: SocketAddr) {
        // Only a fleet has flows to forget, and only one this flow entered by another member:
        // the look at every other SA (whether one still talks to `remote`) is not paid for
        // each of 100,000 tunnels going standalone. (In a fleet it still is: a count of SAs
        // per remote would make it O(1).)
        let Some(f) = self.fleet.as_ref() else {
            return;
        };
        let known = [f.ike_port, f.nat_t_port]
            .iter()
            .any(|port| f.vias.contains_key(&(*port, remote)))
            || f.esp_vias.contains_key(&remote);
        if !known || self.sas.values().any(|r| r.remote == Some(remote)) {
            return;
        }
        if let Some(f) = self.fleet.as_mut() {
            for port in [f.ike_port, f.nat_t_port] {
                f.vias.remove(&(port, remote));
            }
            f.esp_vias.remove(&remote);
        }
    }
}

/// Whether `datagram` is an IKE_SA_INIT request (a new IKE SA: no responder SPI yet).
fn is_init_request(datagram: &[u8]) -> bool {
    use concentrator_ike::{ExchangeType, Flags, Header};
    Header::peek(datagram).is_some_and(|(h, _)| {
        h.spi_r == 0 && h.exchange == ExchangeType::IKE_SA_INIT && !h.flags.contains(Flags::RESPONSE)
    })
}
