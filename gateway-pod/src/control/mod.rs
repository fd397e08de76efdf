//! The control plane: IKEv2 on UDP 500 and 4500, feeding the sans-IO engine
//! (`concentrator_ike::endpoint`), answering its "PSK needed" step from the configuration, and
//! installing the negotiated CHILD SAs in the shared data plane with routes to the TUN device.
//!
//! One task owns the endpoint and all IKE state, so IKE needs no lock either. Its code lives
//! in rooms, one per responsibility:
//!
//! - `driver`: the task itself: its sockets and the loop that feeds the engine and sends
//!   what it queues.
//! - `events`: our record of each IKE SA, and the engine's events that change it.
//! - `ike_config`: where we listen, who we are per eroute, what we propose and accept.
//! - `policy`: which eroute a tunnel belongs to and when we start one: eroute selection,
//!   site lookups, dynamic ownership, acquires, auto-connect, backoff and redirects.
//! - `install`: CHILD SAs into the data plane and out again.
//! - `routes`: routes to the TUN device, over netlink, on a task of their own.
//! - `status`: the admin API's tunnel table, liveness from ESP, NAT keepalives, idle
//!   tunnels.
//! - `reload`: a new configuration applied as a diff against the running one.
//! - `fleet`, `claims`, `replicas`, `handover`: the driver's side of the fleet
//!   ([`crate::cluster`]): SPI routing of IKE, site claims, SA replication and take-over,
//!   and the hand-over of shards when draining.
//! - `director`: the VIP front's redirects of new sites, while this member directs.

mod claims;
mod director;
mod driver;
mod events;
mod fleet;
mod handover;
mod ike_config;
mod install;
mod policy;
mod reload;
mod replicas;
mod routes;
mod status;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use concentrator_ike::endpoint::{Endpoint, EndpointConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::{Delivery, Fleet};
use crate::dataplane::DataplaneError;
use crate::dataplane::shared;
use crate::egroups::Egroups;
use crate::state::Gateway;
use driver::{Driver, Inputs};
use ike_config::{IkeConfigs, accepting_config};
use policy::{AutoConnects, Owners, PendingAcquires};
pub use reload::Reload;
use routes::Routes;

/// Receive and send buffer asked for on the IKE port 500 socket.
const IKE_SOCKET_BUFFER: usize = 4 << 20;

/// Where the control plane listens and which TUN device it drives.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    pub listen: IpAddr,
    pub ike_port: u16,
    pub nat_t_port: u16,
    pub tun_name: String,
    pub tun_mtu: u16,
    pub retransmit: concentrator_ike::responder::Retransmit,
    /// Cookie threshold and half-open limit.
    pub endpoint: EndpointConfig,
    /// Where to redirect new sites (RFC 5685), if anywhere.
    pub redirect_to: Option<concentrator_ike::redirect::GatewayId>,
    /// Also carry plain ESP (IP protocol 50, a raw socket) for peers that do not float to
    /// UDP. Without it every peer is made to use ESP in UDP.
    pub raw_esp: bool,
    /// `--tcp-mss-clamp`.
    pub tcp_mss_clamp: crate::dataplane::mss::MssClampOption,
}

/// The MSS clamp `option` asks for, said in the log once.
fn mss_clamp(
    option: crate::dataplane::mss::MssClampOption,
    fleet: Option<&Fleet>,
) -> crate::dataplane::mss::MssClamp {
    use crate::dataplane::mss::MssClamp;
    let clamp = option.resolve(fleet.map(|f| f.links.max_datagram()));
    match clamp {
        MssClamp::Off => {}
        MssClamp::Fixed(mss) => tracing::info!(mss, "TCP MSS of tunnelled flows clamped"),
        MssClamp::Fit(bytes) => tracing::info!(
            max_esp_datagram = bytes,
            "TCP MSS of tunnelled flows clamped so that forwarded packets fit the pod network's MTU"
        ),
    }
    clamp
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open the raw ESP socket on {addr} (--raw-esp needs CAP_NET_RAW): {source}")]
    RawEsp { addr: IpAddr, source: std::io::Error },
    #[error("cannot listen for IKE on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("the built-in default proposals do not parse")]
    DefaultProposal,
    #[error("cannot listen for the fleet's frames on {addr}: {source}")]
    Fleet {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running control plane and data plane.
pub struct Control {
    pub ike_addr: SocketAddr,
    pub nat_t_addr: SocketAddr,
    stop: Option<oneshot::Sender<bool>>,
    reloads: mpsc::UnboundedSender<Reload>,
    task: tokio::task::JoinHandle<()>,
    /// Receives frames from the other members of the fleet.
    frames: Option<tokio::task::JoinHandle<()>>,
    /// Receives the replication streams of the other members.
    replicas: Option<tokio::task::JoinHandle<()>>,
}

impl Control {
    /// Where new configurations go to be applied by the IKE task.
    pub fn reloads(&self) -> mpsc::UnboundedSender<Reload> {
        self.reloads.clone()
    }

    /// Stops IKE and the data plane; tunnels end with the process. `delete`: each site is
    /// sent an IKE DELETE first (nobody carries its tunnel on: it reconnects at once rather
    /// than when its liveness checks fail).
    pub async fn shutdown(mut self, delete: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(delete);
        }
        let _ = (&mut self.task).await;
        if let Some(frames) = self.frames.take() {
            frames.abort();
        }
        if let Some(replicas) = self.replicas.take() {
            replicas.abort();
        }
    }
}

/// Binds the IKE sockets, opens the TUN device and starts the control and data plane tasks.
pub async fn start(
    gateway: Arc<Gateway>,
    egroups: Egroups,
    opts: ControlOptions,
    fleet: Option<&Fleet>,
) -> Result<Control, ControlError> {
    let config = gateway.config();
    let responder_config = Arc::new(accepting_config(
        &config,
        opts.listen,
        opts.retransmit,
        opts.raw_esp,
    )?);

    let bind = |port| async move {
        let addr = SocketAddr::new(opts.listen, port);
        UdpSocket::bind(addr)
            .await
            .map_err(|source| ControlError::Bind { addr, source })
    };
    let udp500 = Arc::new(bind(opts.ike_port).await?);
    // Thousands of sites may send IKE_SA_INIT at once (a restart, a scale-in): the default
    // ~200 KiB of receive buffer holds only a few hundred small datagrams, and each one lost
    // costs its site a 2 s retransmission. (The 4500 sockets get the data plane's buffers.)
    crate::dataplane::io::grow_buffers(&udp500, IKE_SOCKET_BUFFER);
    // SO_REUSEPORT: each data plane worker binds its own socket on the same port.
    let nat_t = SocketAddr::new(opts.listen, opts.nat_t_port);
    let udp4500 = Arc::new(
        crate::dataplane::bind_udp(nat_t).map_err(|source| ControlError::Bind { addr: nat_t, source })?,
    );
    let local_addr = |s: &UdpSocket, port| {
        s.local_addr().map_err(|source| ControlError::Bind {
            addr: SocketAddr::new(opts.listen, port),
            source,
        })
    };
    let ike_addr = local_addr(&udp500, opts.ike_port)?;
    let nat_t_addr = local_addr(&udp4500, opts.nat_t_port)?;

    let dev = crate::dataplane::open_tun(
        tun_rs::DeviceBuilder::new()
            .name(&opts.tun_name)
            .mtu(opts.tun_mtu),
    )
    .map_err(|e| DataplaneError::Tun(opts.tun_name.clone(), e))?;
    let (ike_tx, ike_rx) = mpsc::channel(4096);
    let (acquire_tx, acquire_rx) = mpsc::channel(1024);
    let (sa_events_tx, sa_events_rx) = mpsc::unbounded_channel();
    let raw_esp = if opts.raw_esp {
        let raw = crate::dataplane::bind_raw_esp(opts.listen).map_err(|source| ControlError::RawEsp {
            addr: opts.listen,
            source,
        })?;
        Some(Arc::new(raw))
    } else {
        None
    };
    let (dataplane, dataplane_task) = shared::spawn(
        dev,
        opts.tun_name.clone(),
        shared::Outer {
            udp: Some(udp4500.clone()),
            raw_esp,
            mss: mss_clamp(opts.tcp_mss_clamp, fleet),
        },
        ike_tx.clone(),
        acquire_tx,
        sa_events_tx,
        gateway.metrics.dataplane.clone(),
        fleet.map(|f| f.links.clone()),
    );
    let fleet_error = |addr, source| ControlError::Fleet { addr, source };
    let (frames, driver_fleet, replicas_task) = match fleet {
        None => (None, None, None),
        Some(f) => {
            let socket = UdpSocket::bind(f.address)
                .await
                .map_err(|e| fleet_error(f.address, e))?;
            // Frames arrive at the rate of every forwarded site's packets together: the
            // kernel's default buffer overflows under one fast tunnel (measured).
            crate::dataplane::io::grow_buffers(&socket, crate::dataplane::io::SOCKET_BUFFER);
            let (handle, plain) = (dataplane.clone(), dataplane.clone());
            let delivery = Delivery {
                ike: ike_tx,
                esp: Box::new(move |batch| handle.forwarded(batch)),
                plain: Box::new(move |packet| plain.plain(packet)),
                udp500: udp500.clone(),
                udp4500: udp4500.clone(),
                ike_port: ike_addr.port(),
                nat_t_port: nat_t_addr.port(),
            };
            let frames = tokio::spawn(crate::cluster::serve(socket, f.links.clone(), delivery));
            // Replication streams come in on TCP at the same address.
            let listener = tokio::net::TcpListener::bind(f.address)
                .await
                .map_err(|e| fleet_error(f.address, e))?;
            let replicas = f.serve_replicas(listener);
            let link = f.links.lane().map_err(|e| fleet_error(f.address, e))?;
            let driver = fleet::DriverFleet::new(f.view.clone(), link, (ike_addr.port(), nat_t_addr.port()));
            (Some(frames), Some(driver), Some(replicas))
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let (lookups_tx, lookups_rx) = mpsc::unbounded_channel();
    let (claims_tx, claims_rx) = mpsc::unbounded_channel();
    let (reloads_tx, reloads_rx) = mpsc::unbounded_channel();
    let mut endpoint = Endpoint::new(opts.endpoint.clone(), responder_config);
    endpoint.set_redirect(opts.redirect_to.clone());
    if fleet.is_some_and(|f| f.replicator.copies() > 0) {
        endpoint.track_changes();
    }
    let driver = Driver {
        endpoint,
        entropy: crate::cluster::GatewayEntropy::new(fleet.map(|f| f.view.clone())),
        egroups,
        udp500,
        udp4500,
        configs: IkeConfigs::new(
            opts.listen,
            ike_addr.port(),
            nat_t_addr.port(),
            opts.retransmit,
            opts.raw_esp,
        ),
        sas: HashMap::new(),
        lookups: lookups_tx,
        auto: AutoConnects::new(&config),
        owners: Owners::default(),
        pending_acquires: PendingAcquires::default(),
        backend: Arc::new(dataplane),
        routes: Routes::start(opts.tun_name.clone()),
        fleet: driver_fleet,
        unrouted: Vec::new(),
        names: driver::Names::default(),
        claims: fleet.map(|f| claims::DriverClaims::new(f.claims.clone(), claims_tx)),
        handovers: handover::Handovers::default(),
        replicas: fleet.map(|f| {
            replicas::DriverReplicas::new(
                Some(f.replicator.clone()),
                f.replicas.clone(),
                f.replication_metrics.clone(),
                f.lease_ttl,
                f.message_id_sync,
            )
        }),
        gateway,
        config,
    };
    let task = tokio::spawn(driver.run(Inputs {
        ike: ike_rx,
        lookups: lookups_rx,
        claims: claims_rx,
        acquires: acquire_rx,
        sa_events: sa_events_rx,
        reloads: reloads_rx,
        stop: stop_rx,
        dataplane: dataplane_task,
    }));
    Ok(Control {
        ike_addr,
        nat_t_addr,
        stop: Some(stop_tx),
        reloads: reloads_tx,
        task,
        frames,
        replicas: replicas_task,
    })
}
