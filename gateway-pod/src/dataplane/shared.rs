//! The data plane shared by every tunnel of the gateway: one TUN device on the inner side,
//! the UDP socket of port 4500 on the outer side (ESP in UDP, RFC 3948), shared with IKE.
//!
//! Two tasks, each owning its SA table so that the per-packet path takes no lock: the TUN
//! reader seals and sends (outbound table, by destination), the UDP reader opens and writes
//! to the TUN device (inbound table, by SPI) and passes IKE messages (non-ESP marker) to the
//! control plane. The control plane changes the tables through [`DataplaneHandle`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use concentrator_esp::encap::{Datagram, classify};
use concentrator_esp::ip::{self, next_header_for};
use concentrator_esp::packet::sealed_len;
use concentrator_esp::sa::inbound_allowed;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::DataplaneError;
use super::table::{InboundSa, InboundTable, OutboundSa, OutboundTable};

/// Packet counters of the whole data plane (the per-SA ones are in [`super::table::SaCounters`]).
#[derive(Clone, Debug, Default)]
pub struct DataplaneCounters {
    pub packets_in: Counter,
    pub packets_out: Counter,
    /// Inner packets toward a destination no SA covers: dropped, never sent in clear.
    pub no_sa: Counter,
    /// ESP for an SPI we do not know.
    pub unknown_spi: Counter,
    /// Replayed, too old, failed integrity, malformed: dropped.
    pub invalid: Counter,
    /// Decrypted but outside the SA's traffic selectors: dropped.
    pub policy: Counter,
    /// IKE messages on port 4500 dropped because the control plane was not keeping up.
    pub ike_overflow: Counter,
}

/// An IKE message that arrived on port 4500, for the control plane.
#[derive(Debug)]
pub struct IkeDatagram {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Without the non-ESP marker.
    pub payload: Vec<u8>,
}

enum EgressCommand {
    Install(Box<OutboundSa>, Vec<IpNet>),
    Remove(u32),
}

enum IngressCommand {
    Install(Box<InboundSa>),
    Remove(u32),
}

/// The control plane's side of the data plane.
#[derive(Clone)]
pub struct DataplaneHandle {
    egress: mpsc::UnboundedSender<EgressCommand>,
    ingress: mpsc::UnboundedSender<IngressCommand>,
}

impl DataplaneHandle {
    /// Carries `subnets` through a new CHILD SA. The inbound half goes first, so that the
    /// peer's first packets on the new SA are not dropped while our outbound half catches up.
    pub fn install(&self, inbound: InboundSa, outbound: OutboundSa, subnets: Vec<IpNet>) {
        let _ = self.ingress.send(IngressCommand::Install(Box::new(inbound)));
        let _ = self
            .egress
            .send(EgressCommand::Install(Box::new(outbound), subnets));
    }

    /// Forgets the CHILD SA whose inbound SPI is `spi_in`.
    pub fn remove(&self, spi_in: u32) {
        let _ = self.egress.send(EgressCommand::Remove(spi_in));
        let _ = self.ingress.send(IngressCommand::Remove(spi_in));
    }
}

/// Starts the two data plane tasks on an open TUN device and the port-4500 socket. IKE
/// messages arriving on that socket go to `ike`. The tasks end when the handle is dropped
/// or I/O fails; the error is returned by the join handle.
pub fn spawn(
    dev: Arc<tun_rs::AsyncDevice>,
    tun_name: String,
    udp: Arc<UdpSocket>,
    ike: mpsc::Sender<IkeDatagram>,
    acquire: mpsc::Sender<IpAddr>,
    counters: DataplaneCounters,
) -> (
    DataplaneHandle,
    tokio::task::JoinHandle<Result<(), DataplaneError>>,
) {
    let (egress_tx, egress_rx) = mpsc::unbounded_channel();
    let (ingress_tx, ingress_rx) = mpsc::unbounded_channel();
    let egress = egress(
        dev.clone(),
        tun_name.clone(),
        udp.clone(),
        egress_rx,
        acquire,
        counters.clone(),
    );
    let ingress = ingress(dev, tun_name, udp, ingress_rx, ike, counters);
    let task = tokio::spawn(async move {
        tokio::select! {
            r = egress => r,
            r = ingress => r,
        }
    });
    (
        DataplaneHandle {
            egress: egress_tx,
            ingress: ingress_tx,
        },
        task,
    )
}

async fn egress(
    dev: Arc<tun_rs::AsyncDevice>,
    tun_name: String,
    udp: Arc<UdpSocket>,
    mut commands: mpsc::UnboundedReceiver<EgressCommand>,
    acquire: mpsc::Sender<IpAddr>,
    counters: DataplaneCounters,
) -> Result<(), DataplaneError> {
    let mut table = OutboundTable::default();
    let mut held = HeldPackets::default();
    let mut inner = vec![0u8; 65536];
    let mut wire = vec![0u8; sealed_len(65536)];
    loop {
        let n = tokio::select! {
            biased;
            cmd = commands.recv() => {
                match cmd {
                    Some(EgressCommand::Install(sa, subnets)) => {
                        let waiting = held.take_covered(&subnets);
                        table.install(*sa, subnets);
                        for packet in waiting {
                            send_out(&mut table, &udp, &counters, &packet, &mut wire).await;
                        }
                    }
                    Some(EgressCommand::Remove(id)) => table.remove(id),
                    None => return Ok(()),
                }
                continue;
            }
            r = dev.recv(&mut inner) => r.map_err(|e| DataplaneError::Tun(tun_name.clone(), e))?,
        };
        let packet = &inner[..n];
        let Some(h) = ip::parse(packet) else {
            continue;
        };
        if table.lookup(h.dst).is_none() {
            // No SA for it: never sent in clear. The control plane is asked for one (the
            // initiator path) and the packet waits in a small bounded queue meanwhile.
            counters.no_sa.inc();
            if held.hold(h.dst, packet) {
                let _ = acquire.try_send(h.dst);
            }
            continue;
        }
        send_out(&mut table, &udp, &counters, packet, &mut wire).await;
    }
}

/// Packets waiting for an SA, per destination: a few each, for a bounded number of
/// destinations (the oldest destination goes first when full).
#[derive(Default)]
struct HeldPackets {
    by_dst: std::collections::HashMap<IpAddr, (u64, Vec<Vec<u8>>)>,
    order: u64,
}

/// Packets held per destination and destinations held at once.
const HELD_PER_DST: usize = 4;
const HELD_DSTS: usize = 256;

impl HeldPackets {
    /// Holds a packet; true if its destination was not waiting yet (ask for an SA).
    fn hold(&mut self, dst: IpAddr, packet: &[u8]) -> bool {
        if let Some((_, q)) = self.by_dst.get_mut(&dst) {
            if q.len() < HELD_PER_DST {
                q.push(packet.to_vec());
            }
            return false;
        }
        if self.by_dst.len() >= HELD_DSTS
            && let Some(oldest) = self.by_dst.iter().min_by_key(|(_, (o, _))| *o).map(|(d, _)| *d)
        {
            self.by_dst.remove(&oldest);
        }
        self.order += 1;
        self.by_dst.insert(dst, (self.order, vec![packet.to_vec()]));
        true
    }

    /// The held packets an SA for `subnets` now carries.
    fn take_covered(&mut self, subnets: &[IpNet]) -> Vec<Vec<u8>> {
        let dsts: Vec<IpAddr> = self
            .by_dst
            .keys()
            .filter(|d| subnets.iter().any(|n| n.contains(*d)))
            .copied()
            .collect();
        dsts.into_iter()
            .filter_map(|d| self.by_dst.remove(&d))
            .flat_map(|(_, q)| q)
            .collect()
    }
}

/// Seals `packet` with the SA of its destination and sends it.
async fn send_out(
    table: &mut OutboundTable,
    udp: &UdpSocket,
    counters: &DataplaneCounters,
    packet: &[u8],
    wire: &mut [u8],
) {
    let (Some(nh), Some(h)) = (next_header_for(packet), ip::parse(packet)) else {
        return;
    };
    let Some(sa) = table.lookup(h.dst) else {
        counters.no_sa.inc();
        return;
    };
    let n = packet.len();
    // A packet that the sequence counter can no longer carry is dropped: the SA must be
    // rekeyed (by IKE) before that.
    let Ok(len) = sa.sa.seal(packet, nh, wire) else {
        counters.invalid.inc();
        return;
    };
    let Some(datagram) = wire.get(..len) else {
        return;
    };
    match udp.send_to(datagram, sa.peer).await {
        Ok(_) => {
            sa.counters.count_out(n, Instant::now());
            counters.packets_out.inc();
        }
        // One unreachable peer must not stop the others' traffic.
        Err(e) => tracing::debug!(peer = %sa.peer, error = %e, "ESP send failed"),
    }
}

async fn ingress(
    dev: Arc<tun_rs::AsyncDevice>,
    tun_name: String,
    udp: Arc<UdpSocket>,
    mut commands: mpsc::UnboundedReceiver<IngressCommand>,
    ike: mpsc::Sender<IkeDatagram>,
    counters: DataplaneCounters,
) -> Result<(), DataplaneError> {
    let local = udp
        .local_addr()
        .map_err(|e| DataplaneError::Udp(SocketAddr::from(([0, 0, 0, 0], 0)), e))?;
    let mut table = InboundTable::default();
    let mut wire = vec![0u8; 65536];
    loop {
        let (n, from) = tokio::select! {
            biased;
            cmd = commands.recv() => {
                match cmd {
                    Some(IngressCommand::Install(sa)) => table.install(*sa),
                    Some(IngressCommand::Remove(spi)) => table.remove(spi),
                    None => return Ok(()),
                }
                continue;
            }
            r = udp.recv_from(&mut wire) => match r {
                Ok(v) => v,
                // ICMP errors for earlier sends surface here on Linux; they concern one peer.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(DataplaneError::Udp(local, e)),
            },
        };
        let spi = match classify(&wire[..n]) {
            Datagram::Esp { spi, .. } => spi,
            Datagram::Ike(payload) => {
                let d = IkeDatagram {
                    local,
                    remote: from,
                    payload: payload.to_vec(),
                };
                if ike.try_send(d).is_err() {
                    counters.ike_overflow.inc();
                }
                continue;
            }
            Datagram::Keepalive | Datagram::Invalid => continue,
        };
        let Some(sa) = table.get_mut(spi) else {
            counters.unknown_spi.inc();
            continue;
        };
        let Ok(opened) = sa.sa.open(&mut wire[..n]) else {
            counters.invalid.inc();
            continue;
        };
        let Some(packet) = wire.get(opened.inner) else {
            counters.invalid.inc();
            continue;
        };
        if !inbound_allowed(packet, &sa.local, &sa.remote) {
            counters.policy.inc();
            continue;
        }
        sa.counters.count_in(packet.len(), Instant::now());
        match dev.send(packet).await {
            Ok(_) => {
                counters.packets_in.inc();
            }
            // The kernel refusing one packet (a bad inner header that passed the selectors)
            // must not stop the data plane.
            Err(e) => tracing::debug!(tun = %tun_name, error = %e, "TUN write failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_are_bounded_and_released_to_the_sa_that_covers_them() {
        let mut held = HeldPackets::default();
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        let b: IpAddr = "10.1.2.1".parse().unwrap();
        // The first packet to a destination asks for an SA; later ones wait quietly.
        assert!(held.hold(a, &[1]));
        for i in 0..10u8 {
            assert!(!held.hold(a, &[i]));
        }
        assert!(held.hold(b, &[2]));
        let net: IpNet = "10.1.1.0/24".parse().unwrap();
        let released = held.take_covered(&[net]);
        assert_eq!(released.len(), HELD_PER_DST);
        assert!(held.take_covered(&[net]).is_empty());
        // Too many destinations: the oldest is dropped.
        for i in 0..HELD_DSTS as u32 {
            held.hold(IpAddr::from(std::net::Ipv4Addr::from(0x0a02_0000 + i)), &[0]);
        }
        assert_eq!(held.by_dst.len(), HELD_DSTS);
        assert!(held.take_covered(&["10.1.2.0/24".parse().unwrap()]).is_empty());
    }
}
