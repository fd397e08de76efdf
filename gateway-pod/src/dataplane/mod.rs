//! The userspace data plane: a TUN device on the inner side, a UDP socket (ESP in UDP,
//! RFC 3948) on the outer side. [`shared`] carries every tunnel the IKE control plane
//! negotiates; [`run`] below is one tunnel with a fixed pair of SAs, for
//! `concentrator-gateway esp-static` (keys given by hand, for tests and benchmarks), on the
//! same workers, so that the benchmark measures the product's data plane.

pub mod backend;
pub(crate) mod io;
pub mod mss;
mod pmtu;

pub use io::{bind_raw_esp, bind_udp};
pub mod shared;
pub mod table;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use concentrator_esp::sa::Selector;
use concentrator_esp::{Inbound, Outbound};
use ipnet::IpNet;

use shared::DataplaneCounters;
use table::{InboundSa, OutboundSa, SaCounters};

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
    /// Plain ESP (IP protocol 50, a raw socket) instead of ESP in UDP.
    pub raw_esp: bool,
    /// That many more SA pairs of this cipher, idle, in the tables beside the tunnel's.
    pub background: Option<(concentrator_crds::proposal::Encryption, u32)>,
}

/// `n` idle SA pairs of `cipher` for `esp-static --background-sas`: SA `i` receives on SPI
/// `0x4000_0000 + i` (never `skip`, the tunnel's own) and carries the /28 `10.128.0.0 + 16 i`,
/// toward `peer`; no packet is ever routed to them.
fn install_background(
    handle: &shared::DataplaneHandle,
    cipher: concentrator_crds::proposal::Encryption,
    n: u32,
    local: IpNet,
    peer: SocketAddr,
    skip: u32,
) -> Result<(), DataplaneError> {
    let worker = |e: concentrator_crypto::CryptoError| DataplaneError::Worker(e.to_string());
    let first = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
    for i in 0..n.min(1 << 19) {
        let spi = 0x4000_0000 + i;
        if spi == skip {
            continue;
        }
        let site = IpNet::new(IpAddr::V4((first + (i << 4)).into()), 28)
            .map_err(|e| DataplaneError::Worker(e.to_string()))?;
        // Keys of the cipher's length (plus its 4-byte salt); nothing is ever sealed with them.
        let material = [i as u8; 36];
        let len = cipher.key_bits().map_or(32, |bits| usize::from(bits / 8)) + 4;
        let key = || concentrator_crypto::aead::AeadKey::new(cipher, &material[..len]).map_err(worker);
        let counters = Arc::new(SaCounters::new(Instant::now()));
        handle.install(
            InboundSa {
                sa: Inbound::new(spi, key()?, false, 4096),
                local: vec![selector(local)],
                remote: vec![selector(site)],
                counters: counters.clone(),
                via: Arc::default(),
            },
            OutboundSa {
                id: spi,
                sa: Outbound::new(spi, key()?, false),
                peer,
                udp_encap: true,
                counters,
                via: Arc::default(),
            },
            vec![site],
        );
    }
    Ok(())
}

/// Errors setting the tunnel up or running it (per-packet errors are counted, never
/// returned).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("TUN device {0}: {1}")]
    Tun(String, std::io::Error),
    #[error("UDP {0}: {1}")]
    Udp(SocketAddr, std::io::Error),
    #[error("route {0}: {1}")]
    Route(IpNet, String),
    #[error("data plane worker: {0}")]
    Worker(String),
}

fn selector(net: IpNet) -> Selector {
    Selector {
        start: net.network(),
        end: net.broadcast(),
        protocol: 0,
    }
}

/// Opens the TUN device multi-queue (one queue per worker of [`shared`]) with vnet-hdr
/// offloads (TSO/USO super-packets from the kernel, GRO toward it), which the workers use
/// when the kernel has them. Not registered with a runtime yet: each worker has its own.
pub fn open_tun(builder: tun_rs::DeviceBuilder) -> std::io::Result<tun_rs::SyncDevice> {
    builder.offload(true).multi_queue(true).build_sync()
}

/// Brings the tunnel up and carries packets until the task is dropped or I/O fails.
pub async fn run(t: StaticTunnel, counters: DataplaneCounters) -> Result<(), DataplaneError> {
    let tun_err = |e| DataplaneError::Tun(t.tun_name.clone(), e);
    let IpAddr::V4(addr) = t.tun_address.addr() else {
        return Err(tun_err(std::io::Error::other(
            "IPv6 inner addresses are not supported yet",
        )));
    };
    let dev = open_tun(
        tun_rs::DeviceBuilder::new()
            .name(&t.tun_name)
            .ipv4(addr, t.tun_address.prefix_len(), None)
            .mtu(t.mtu),
    )
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
    let sock = Arc::new(
        if t.raw_esp {
            bind_raw_esp(t.local.ip())
        } else {
            bind_udp(t.local)
        }
        .map_err(|e| DataplaneError::Udp(t.local, e))?,
    );
    let outer = shared::Outer {
        udp: (!t.raw_esp).then(|| sock.clone()),
        raw_esp: t.raw_esp.then_some(sock),
        mss: mss::MssClamp::Off,
    };
    // No control plane: IKE messages on the port are counted as overflow and dropped, and
    // nobody is asked for SAs toward other destinations.
    let (ike, _) = tokio::sync::mpsc::channel(1);
    let (acquire, _) = tokio::sync::mpsc::channel(1);
    // Nobody rekeys either: an SA that reaches a hard limit is simply removed.
    let (sa_events, _) = tokio::sync::mpsc::unbounded_channel();
    let (handle, task) = shared::spawn(
        dev,
        t.tun_name.clone(),
        outer,
        Arc::new(ike),
        acquire,
        sa_events,
        counters,
        None,
    );
    if let Some((cipher, n)) = t.background {
        install_background(&handle, cipher, n, t.local_subnet, t.peer, t.inbound.spi())?;
    }
    let sa_counters = Arc::new(SaCounters::new(Instant::now()));
    let id = t.inbound.spi();
    handle.install(
        InboundSa {
            sa: t.inbound,
            local: vec![selector(t.local_subnet)],
            remote: vec![selector(t.remote_subnet)],
            counters: sa_counters.clone(),
            via: Arc::default(),
        },
        OutboundSa {
            id,
            sa: t.outbound,
            peer: t.peer,
            udp_encap: !t.raw_esp,
            counters: sa_counters,
            via: Arc::default(),
        },
        // Whatever the kernel routes into the TUN device goes through the one SA, as with
        // a kernel policy of this pair of subnets: the peer's selectors decide what it keeps.
        vec![
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ],
    );
    // Aborts the workers when this future is dropped.
    struct AbortOnDrop(tokio::task::JoinHandle<Result<(), DataplaneError>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(task);
    let r = (&mut task.0)
        .await
        .map_err(|e| DataplaneError::Worker(e.to_string()))?;
    drop(handle);
    r
}
