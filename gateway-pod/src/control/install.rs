//! CHILD SAs into the data plane and out again, with routes for their subnets (made by the
//! route installer, [`super::routes`]), and the data plane's volume limits.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use concentrator_crds::eroute::ValidatedEroute;
use concentrator_crds::proposal::Esn;
use concentrator_esp::sa::Selector;
use concentrator_ike::negotiate::ts_bounds;
use concentrator_ike::payload::TrafficSelector;
use concentrator_ike::responder::ChildSa;
use ipnet::IpNet;

use super::driver::Driver;
use super::events::ChildRecord;
use crate::dataplane::backend::BackendError;
use crate::dataplane::backend::{ChildSaSpec, Resume};
use crate::dataplane::shared::SaEvent;

impl Driver {
    pub(super) fn child_installed(&mut self, spi_r: u64, c: ChildSa) {
        self.child_installed_resumed(spi_r, c, None);
    }

    /// A CHILD SA into the data plane; `resume` for one taken over from another member.
    pub(super) fn child_installed_resumed(&mut self, spi_r: u64, c: ChildSa, resume: Option<Resume>) {
        let Some(remote) = self.sas.get(&spi_r).and_then(|r| r.remote) else {
            return;
        };
        let via = self.via_of(remote);
        let Some(rec) = self.sas.get(&spi_r) else {
            return;
        };
        let eroute = rec
            .eroute
            .as_ref()
            .and_then(|n| self.config.set.eroutes.get(&**n));
        let subnets: Vec<IpNet> = c
            .ts_remote
            .iter()
            .filter_map(ts_bounds)
            .flat_map(|(start, end)| range_to_nets(start, end))
            .collect();
        // With plain ESP the port means nothing; in UDP it is the peer's NAT-T port (after
        // a NAT, the one its datagrams come from).
        let peer = SocketAddr::new(
            remote.ip(),
            if c.udp_encap {
                remote.port()
            } else {
                self.configs.nat_t_port
            },
        );
        let (spi_in, spi_out, encryption, udp_encap) = (c.spi_in, c.spi_out, c.encryption, c.udp_encap);
        let mut spec = child_spec(c, eroute, subnets.clone(), peer, via);
        spec.resume = resume;
        let counters = match self.backend.install_child(spec) {
            Ok(counters) => counters,
            Err(e) => {
                let collision = matches!(e, BackendError::SpiInUse(_));
                self.gateway.metrics.count_ike_failure(if collision {
                    "spi_in_use"
                } else {
                    "child_sa_unsupported"
                });
                // An IKE SA whose only CHILD SA cannot be carried would look up to the peer
                // and carry nothing: it is deleted, so that the peer knows (and tries again
                // as it is configured to). Beside a working CHILD SA it stays, unless our
                // SPI collided (the engine would rekey or delete a CHILD SA that is not
                // ours to remove): the peer starts again with new SPIs.
                let deleting = rec.children.is_empty() || collision;
                tracing::warn!(peer_id = %rec.peer_id, error = %e, deleting_ike_sa = deleting, "CHILD SA cannot be installed");
                if deleting {
                    self.endpoint.delete(spi_r, Instant::now());
                }
                return;
            }
        };
        let aggregate = aggregate_route(&subnets, eroute.map(|e| e.remote_subnet))
            .filter(|wide| self.safe_to_route(*wide, remote.ip()));
        for net in routed(&subnets, aggregate) {
            self.routes.hold(net);
        }
        tracing::info!(
            peer_id = %rec.peer_id,
            spi_in = format_args!("{spi_in:08x}"),
            spi_out = format_args!("{spi_out:08x}"),
            encryption = ?encryption,
            remote_subnets = ?subnets,
            %peer,
            udp_encap,
            "CHILD SA installed"
        );
        if let Some(rec) = self.sas.get_mut(&spi_r) {
            // Most tunnels have one CHILD SA: no room for three more in each (a Vec's first
            // push reserves four).
            rec.children.reserve_exact(1);
            rec.children.push(ChildRecord {
                spi_in,
                spi_out,
                encryption,
                subnets: subnets.into(),
                aggregate,
                counters,
            });
        }
        self.publish(spi_r);
    }

    /// A CHILD SA reached a volume limit in the data plane (`esp.rekeyBytes`, ...): the soft
    /// one rekeys it now, as its soft lifetime would; at the hard one the data plane has
    /// dropped it, and so does the tunnel (its subnets fall back to an older SA or none).
    pub(super) fn sa_volume(&mut self, e: SaEvent) {
        let (SaEvent::Rekey { spi_in } | SaEvent::Expired { spi_in }) = e;
        let Some((&id, rec)) = self
            .sas
            .iter()
            .find(|(_, r)| r.children.iter().any(|c| c.spi_in == spi_in))
        else {
            return;
        };
        let spi = format!("{spi_in:08x}");
        match e {
            SaEvent::Rekey { .. } => {
                let started = self
                    .endpoint
                    .rekey_child(id, spi_in, Instant::now(), &mut self.entropy);
                tracing::info!(peer_id = %rec.peer_id, spi_in = %spi, started, "CHILD SA reached its volume soft limit: rekeying");
            }
            SaEvent::Expired { .. } => {
                tracing::warn!(peer_id = %rec.peer_id, spi_in = %spi, "CHILD SA reached its volume hard limit: removed");
                // Its record goes with it: a later rekey or deletion of the engine's CHILD
                // SA (or the other half's expiry) must not remove its SPI again, by then
                // perhaps another SA's.
                let spi_out = rec
                    .children
                    .iter()
                    .find(|c| c.spi_in == spi_in)
                    .map_or(0, |c| c.spi_out);
                self.child_deleted(id, spi_in, spi_out);
            }
        }
    }

    pub(super) fn child_deleted(&mut self, spi_r: u64, spi_in: u32, spi_out: u32) {
        // Only a CHILD SA the data plane carries for this IKE SA: one refused at install
        // (its SPI another SA's) must not take the other's away.
        let Some(rec) = self.sas.get_mut(&spi_r) else {
            return;
        };
        let Some(pos) = rec.children.iter().position(|c| c.spi_in == spi_in) else {
            return;
        };
        self.backend.remove_child(spi_in);
        let child = rec.children.remove(pos);
        tracing::info!(
            peer_id = %rec.peer_id,
            spi_in = format_args!("{spi_in:08x}"),
            spi_out = format_args!("{spi_out:08x}"),
            "CHILD SA deleted"
        );
        self.unroute(&child);
        self.publish(spi_r);
    }

    /// Whether all of `wide` may be routed into the TUN device: not a default route, and
    /// holding none of the addresses the tunnels themselves travel between (the peer's outer
    /// address, ours, the fleet's members), whose IKE and ESP would otherwise be routed into
    /// the device that carries them and black-holed. A catch-all eroute (`0.0.0.0/0`, or
    /// `10.0.0.0/8` over a WAN in 10.x) so keeps one route per site.
    pub(super) fn safe_to_route(&self, wide: IpNet, peer: IpAddr) -> bool {
        // Once per CHILD SA: the members are looked at in place, not copied.
        let ours = self.configs.local_addr().ip();
        let outer = [peer, ours].into_iter().filter(|a| !a.is_unspecified());
        safe_aggregate(wide, outer)
            && !self
                .fleet
                .as_ref()
                .is_some_and(|f| f.view.any_member_address(|a| wide.contains(&a)))
    }

    /// CHILD SA `child` is gone: each of its routes goes with the last CHILD SA holding it.
    pub(super) fn unroute(&mut self, child: &ChildRecord) {
        for net in routed(&child.subnets, child.aggregate) {
            self.routes.release(net);
        }
    }
}

/// The one route that carries every subnet of a CHILD SA whose eroute has `eroute_remote`:
/// that remote subnet when it covers them all, which it does for every site of an egroup (a
/// row's subnet must lie inside its base eroute's) and for narrowed selectors. So an eroute
/// costs the kernel one route however many sites it has (100,000 tunnels are not 100,000
/// routes), and the data plane's own table picks the site's SA. Traffic toward a part of that
/// subnet with no tunnel then reaches the TUN device too, where it is held for an acquire or
/// dropped, never sent in clear. `None`: each subnet has its own route (no eroute, or a
/// subnet outside it).
fn aggregate_route(subnets: &[IpNet], eroute_remote: Option<IpNet>) -> Option<IpNet> {
    let wide = eroute_remote?;
    (!subnets.is_empty() && subnets.iter().all(|n| wide.contains(n))).then_some(wide)
}

/// [`Driver::safe_to_route`]: `wide` is no default route and holds none of `outer`.
fn safe_aggregate(wide: IpNet, mut outer: impl Iterator<Item = IpAddr>) -> bool {
    wide.prefix_len() > 0 && !outer.any(|a| wide.contains(&a))
}

/// The routes a CHILD SA holds: its eroute's aggregate, or else its own subnets.
fn routed(subnets: &[IpNet], aggregate: Option<IpNet>) -> impl Iterator<Item = IpNet> + '_ {
    let own = if aggregate.is_some() { &[][..] } else { subnets };
    own.iter().copied().chain(aggregate)
}

/// What the data plane needs to carry CHILD SA `c` of `eroute` to `peer`, routed to
/// `subnets`.
fn child_spec(
    c: ChildSa,
    eroute: Option<&ValidatedEroute>,
    subnets: Vec<IpNet>,
    peer: SocketAddr,
    via: std::sync::Arc<crate::cluster::Via>,
) -> ChildSaSpec {
    let replay_window = eroute.map_or(concentrator_crds::eroute::DEFAULT_REPLAY_WINDOW, |e| {
        e.replay_window
    });
    let volume = eroute.map(|e| e.esp_volume).unwrap_or_default();
    ChildSaSpec {
        spi_in: c.spi_in,
        spi_out: c.spi_out,
        encryption: c.encryption,
        integrity: c.integrity,
        keys_in: c.inbound,
        keys_out: c.outbound,
        esn: c.esn == Esn::Yes,
        replay_window,
        local: selectors(&c.ts_local),
        remote: selectors(&c.ts_remote),
        subnets,
        peer,
        udp_encap: c.udp_encap,
        via,
        resume: None,
        volume: concentrator_esp::sa::Lifetime {
            soft_bytes: volume.rekey_bytes,
            hard_bytes: volume.life_bytes,
            soft_packets: volume.rekey_packets,
            hard_packets: volume.life_packets,
            ..Default::default()
        },
    }
}

/// The data plane's selectors (any protocol) for traffic selectors.
fn selectors(ts: &[TrafficSelector<'_>]) -> Vec<Selector> {
    let mut selectors: Vec<Selector> = ts
        .iter()
        .filter_map(ts_bounds)
        .map(|(start, end)| Selector {
            start,
            end,
            protocol: 0,
        })
        .collect();
    // Kept for the CHILD SA's life: not with room for four (a filtered collect's first
    // allocation), usually one.
    selectors.shrink_to_fit();
    selectors
}

/// The smallest set of prefixes covering `start..=end` (a traffic selector is a range; a
/// route is a prefix).
fn range_to_nets(start: IpAddr, end: IpAddr) -> Vec<IpNet> {
    match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => ipnet::Ipv4Subnets::new(s, e, 0).map(IpNet::V4).collect(),
        (IpAddr::V6(s), IpAddr::V6(e)) => ipnet::Ipv6Subnets::new(s, e, 0).map(IpNet::V6).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net_list(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn sites_inside_their_eroute_share_its_one_route() {
        let wide = "10.128.0.0/9".parse().ok();
        let site = net_list(&["10.128.4.16/28"]);
        assert_eq!(aggregate_route(&site, wide), wide);
        assert_eq!(
            routed(&site, wide).collect::<Vec<_>>(),
            net_list(&["10.128.0.0/9"])
        );
        // A selector outside the eroute (or no eroute, or none at all): routes of their own.
        let outside = net_list(&["10.128.4.16/28", "192.168.1.0/24"]);
        assert_eq!(aggregate_route(&outside, wide), None);
        assert_eq!(routed(&outside, None).collect::<Vec<_>>(), outside);
        assert_eq!(aggregate_route(&site, None), None);
        assert_eq!(aggregate_route(&[], wide), None);
    }

    #[test]
    fn an_aggregate_never_covers_the_tunnels_own_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let outer = || [ip("192.0.2.7"), ip("192.0.2.1")].into_iter();
        assert!(safe_aggregate(net("10.128.0.0/9"), outer()));
        assert!(!safe_aggregate(net("0.0.0.0/0"), outer()));
        assert!(!safe_aggregate(net("192.0.2.0/24"), outer()));
        // A fleet member's address inside the subnet (a WAN in 10.x, pods in 10.244.x).
        assert!(!safe_aggregate(
            net("10.0.0.0/8"),
            outer().chain([ip("10.244.1.5")])
        ));
    }

    #[test]
    fn ranges_become_covering_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<IpNet>>();
        assert_eq!(
            range_to_nets(ip("10.1.0.0"), ip("10.1.0.255")),
            nets(&["10.1.0.0/24"])
        );
        assert_eq!(
            range_to_nets(ip("10.1.0.0"), ip("10.1.2.255")),
            nets(&["10.1.0.0/23", "10.1.2.0/24"])
        );
        assert_eq!(
            range_to_nets(ip("0.0.0.0"), ip("255.255.255.255")),
            nets(&["0.0.0.0/0"])
        );
        assert!(range_to_nets(ip("10.1.0.0"), ip("::1")).is_empty());
    }
}
