//! The userspace data plane: a TUN device on the inner side, a UDP socket (ESP in UDP,
//! RFC 3948) on the outer side. [`shared`] carries every tunnel the IKE control plane
//! negotiates; [`run`] below is one tunnel with a fixed pair of SAs, for
//! `concentrator-gateway esp-static` (keys given by hand, for tests and benchmarks). Each
//! direction is one task that owns its SAs, so the per-packet path takes no lock.

pub mod shared;
pub mod table;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use concentrator_esp::encap::{Datagram, classify};
use concentrator_esp::ip::next_header_for;
use concentrator_esp::packet::sealed_len;
use concentrator_esp::sa::{Selector, inbound_allowed};
use concentrator_esp::{Inbound, Outbound};
use ipnet::IpNet;

/// Counters of one tunnel.
#[derive(Debug, Default)]
pub struct Counters {
    pub packets_out: AtomicU64,
    pub packets_in: AtomicU64,
    /// Replays, ICV failures, malformed ESP: dropped.
    pub dropped_in: AtomicU64,
    /// Decrypted but outside the traffic selectors: dropped.
    pub policy_dropped: AtomicU64,
}

/// One tunnel's configuration.
pub struct StaticTunnel {
    pub tun_name: String,
    /// Address of the TUN device (our inner address) with its prefix.
    pub tun_address: IpNet,
    pub mtu: u16,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub local_subnet: IpNet,
    pub remote_subnet: IpNet,
    pub outbound: Outbound,
    pub inbound: Inbound,
}

/// Errors setting the tunnel up (per-packet errors are counted, never returned).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("TUN device {0}: {1}")]
    Tun(String, std::io::Error),
    #[error("UDP {0}: {1}")]
    Udp(SocketAddr, std::io::Error),
    #[error("route {0}: {1}")]
    Route(IpNet, String),
}

fn selector(net: IpNet) -> Selector {
    Selector {
        start: net.network(),
        end: net.broadcast(),
        protocol: 0,
    }
}

/// Brings the tunnel up and carries packets until the task is dropped or I/O fails.
pub async fn run(t: StaticTunnel, counters: Arc<Counters>) -> Result<(), DataplaneError> {
    let tun_err = |e| DataplaneError::Tun(t.tun_name.clone(), e);
    let IpAddr::V4(addr) = t.tun_address.addr() else {
        return Err(tun_err(std::io::Error::other(
            "IPv6 inner addresses are not supported yet",
        )));
    };
    let dev = tun_rs::DeviceBuilder::new()
        .name(&t.tun_name)
        .ipv4(addr, t.tun_address.prefix_len(), None)
        .mtu(t.mtu)
        .build_async()
        .map_err(tun_err)?;
    let out = std::process::Command::new("ip")
        .args([
            "route",
            "replace",
            &t.remote_subnet.to_string(),
            "dev",
            &t.tun_name,
        ])
        .output()
        .map_err(|e| DataplaneError::Route(t.remote_subnet, e.to_string()))?;
    if !out.status.success() {
        return Err(DataplaneError::Route(
            t.remote_subnet,
            String::from_utf8_lossy(&out.stderr).into(),
        ));
    }
    let udp = tokio::net::UdpSocket::bind(t.local)
        .await
        .map_err(|e| DataplaneError::Udp(t.local, e))?;
    let (dev, udp) = (Arc::new(dev), Arc::new(udp));

    let (local_sel, remote_sel) = ([selector(t.local_subnet)], [selector(t.remote_subnet)]);
    let mut outbound = t.outbound;
    let mut inbound = t.inbound;
    let peer = t.peer;

    let tun_name = t.tun_name.clone();
    let egress = {
        let (dev, udp, counters, tun_name) = (dev.clone(), udp.clone(), counters.clone(), tun_name.clone());
        async move {
            let mut inner = vec![0u8; 65536];
            let mut wire = vec![0u8; sealed_len(65536)];
            loop {
                let n = dev
                    .recv(&mut inner)
                    .await
                    .map_err(|e| DataplaneError::Tun(tun_name.clone(), e))?;
                let Some(nh) = next_header_for(&inner[..n]) else {
                    continue;
                };
                // A packet that the sequence counter can no longer carry is dropped: the SA
                // must be rekeyed (by IKE) before that.
                let Ok(len) = outbound.seal(&inner[..n], nh, &mut wire) else {
                    continue;
                };
                udp.send_to(&wire[..len], peer)
                    .await
                    .map_err(|e| DataplaneError::Udp(peer, e))?;
                counters.packets_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let ingress = async move {
        let mut wire = vec![0u8; 65536];
        loop {
            let (n, _from) = udp
                .recv_from(&mut wire)
                .await
                .map_err(|e| DataplaneError::Udp(t.local, e))?;
            let Datagram::Esp { .. } = classify(&wire[..n]) else {
                continue;
            };
            match inbound.open(&mut wire[..n]) {
                Ok(o) => {
                    let pkt = &wire[o.inner];
                    if !inbound_allowed(pkt, &local_sel, &remote_sel) {
                        counters.policy_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    dev.send(pkt)
                        .await
                        .map_err(|e| DataplaneError::Tun(tun_name.clone(), e))?;
                    counters.packets_in.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.dropped_in.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    tokio::select! {
        r = egress => r,
        r = ingress => r,
    }
}
