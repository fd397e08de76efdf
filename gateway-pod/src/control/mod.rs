//! The control plane: IKEv2 on UDP 500 and 4500, feeding the sans-IO engine
//! (`concentrator_ike::endpoint`), answering its "PSK needed" step from the configuration, and
//! installing the negotiated CHILD SAs in the shared data plane with routes to the TUN device.
//!
//! IKE runs on N workers (`--ike-workers`, one per core by default; one in a fleet), each a
//! task that owns an endpoint and the IKE SAs whose SPIs lie in its shards, so IKE messages
//! need no lock ([`workers`]); what the workers share sits in [`shared_state`]. A worker's code
//! lives in rooms, one per responsibility:
//!
//! - `driver`: the worker itself: its sockets and the loop that feeds the engine and sends
//!   what it queues.
//! - `workers`: which worker an IKE message goes to; `shared_state`: what they share.
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
mod nat_t;
mod policy;
mod reload;
mod replicas;
mod routes;
mod shared_state;
mod status;
mod steering;
mod transmit;
mod workers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use concentrator_ike::endpoint::{Endpoint, EndpointConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::{Delivery, Fleet};
use crate::dataplane::DataplaneError;
use crate::dataplane::shared::{self as dataplane_shared, SaEvent};
use crate::egroups::Egroups;
use crate::state::Gateway;
use driver::{Driver, Inputs};
use ike_config::{IkeConfigs, accepting_config};
use policy::{AutoConnects, PendingAcquires};
pub use reload::Reload;
use routes::Routes;
use shared_state::{SharedEgroups, SharedRoutes};
use workers::Peers;
pub use workers::{
    IkeRouter, MAX_IKE_WORKERS, default_workers, shard_for_worker, worker_of_esp_spi, worker_of_spi,
};

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
    /// IKE workers (at least one); a fleet runs one.
    pub ike_workers: usize,
    /// `--ike-steering`: IKE read by the workers' own sockets ([`steering`]).
    pub ike_steering: bool,
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
    /// How many IKE workers run.
    pub ike_workers: usize,
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

    // A fleet runs one worker: its claims, replication and hand-overs are per pod.
    let n = if fleet.is_some() {
        if opts.ike_workers > 1 {
            tracing::warn!(
                ike_workers = opts.ike_workers,
                "a fleet member runs one IKE worker: --ike-workers is ignored"
            );
        }
        1
    } else {
        opts.ike_workers.clamp(1, MAX_IKE_WORKERS)
    };
    let udp500s = bind_ike_sockets(opts.listen, opts.ike_port, n).await?;
    let udp500 = udp500s[0].clone();
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
    let (mut ike_txs, mut ike_rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(4096)).unzip();
    let router = IkeRouter::new(ike_txs.remove(0), ike_txs);
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
    let (dataplane, dataplane_task) = dataplane_shared::spawn(
        dev,
        opts.tun_name.clone(),
        dataplane_shared::Outer {
            udp: Some(udp4500.clone()),
            raw_esp,
            mss: mss_clamp(opts.tcp_mss_clamp, fleet),
        },
        Arc::new(router.clone()),
        acquire_tx,
        sa_events_tx,
        gateway.metrics.dataplane.clone(),
        fleet.map(|f| f.links.clone()),
    );
    // IKE on 4500 read by the workers themselves, and on 500 by the worker of its SA.
    let nat_t_socks = if opts.ike_steering {
        steer_nat_t(&udp4500, nat_t_addr, dataplane.workers(), n, router.key())
    } else {
        Vec::new()
    };
    if n > 1 && opts.ike_steering {
        steer_ike_port(&udp500s, router.key());
    }
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
                // One worker in a fleet: its queue is where forwarded IKE goes.
                ike: router.first().clone(),
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
    let (claims_tx, claims_rx) = mpsc::unbounded_channel();
    let (reloads_tx, reloads_rx) = mpsc::unbounded_channel();
    let (delete_txs, delete_rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let delete_txs: Arc<[_]> = delete_txs.into();
    let (worker_reloads, worker_reload_rxs): (Vec<_>, Vec<_>) =
        (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let (worker_sa_events, worker_sa_event_rxs): (Vec<_>, Vec<_>) =
        (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let (stop_workers, stop_workers_rx) = watch::channel(None);
    let egroups = SharedEgroups::new(egroups);
    let routes = SharedRoutes::new(Routes::start(opts.tun_name.clone()));
    let mut nat_ts = Vec::with_capacity(n);
    for sock in nat_t_socks {
        match nat_t::NatT::new(sock.clone(), dataplane.clone()) {
            Ok(r) => nat_ts.push((sock, r)),
            Err(e) => {
                tracing::warn!(error = %e, "an IKE worker's port-4500 socket cannot be read: IKE on 4500 goes through the data plane");
                nat_ts.clear();
                break;
            }
        }
    }
    let mut nat_ts = nat_ts.into_iter();
    let backend: Arc<dyn crate::dataplane::backend::ChildSaBackend> = Arc::new(dataplane);
    let (mut acquire_rx, mut claims_rx, mut driver_fleet) = (Some(acquire_rx), Some(claims_rx), driver_fleet);
    let mut workers = Vec::with_capacity(n);
    let (ended_tx, ended) = mpsc::channel(n);
    for (w, ((ike_rx, deletes), (reloads, sa_events))) in ike_rxs
        .drain(..)
        .zip(delete_rxs)
        .zip(worker_reload_rxs.into_iter().zip(worker_sa_event_rxs))
        .enumerate()
    {
        let mut endpoint = Endpoint::new(worker_limits(&opts.endpoint, w, n), responder_config.clone());
        endpoint.set_redirect(opts.redirect_to.clone());
        if fleet.is_some_and(|f| f.replicator.copies() > 0) {
            endpoint.track_changes();
        }
        let (lookups_tx, lookups_rx) = mpsc::unbounded_channel();
        let primary = w == 0;
        let (udp4500, nat_t) = match nat_ts.next() {
            Some((sock, reader)) => (sock, Some(reader)),
            None => (udp4500.clone(), None),
        };
        let driver = Driver {
            endpoint,
            entropy: crate::cluster::GatewayEntropy::new(fleet.map(|f| f.view.clone())).for_worker(w, n),
            egroups: egroups.clone(),
            udp500: udp500s[w].clone(),
            udp4500,
            nat_t,
            configs: IkeConfigs::new(
                opts.listen,
                ike_addr.port(),
                nat_t_addr.port(),
                opts.retransmit,
                opts.raw_esp,
            ),
            sas: HashMap::new(),
            lookups: lookups_tx,
            auto: if primary {
                AutoConnects::new(&config)
            } else {
                AutoConnects::default()
            },
            pending_acquires: PendingAcquires::default(),
            backend: backend.clone(),
            routes: routes.clone(),
            peers: Peers::new(w, delete_txs.clone()),
            router: router.clone(),
            followers: if primary {
                worker_reloads.iter().skip(1).cloned().collect()
            } else {
                Vec::new()
            },
            counted: (0, 0),
            fleet: driver_fleet.take(),
            unrouted: Vec::new(),
            names: driver::Names::default(),
            claims: fleet
                .filter(|_| primary)
                .map(|f| claims::DriverClaims::new(f.claims.clone(), claims_tx.clone())),
            handovers: handover::Handovers::default(),
            replicas: fleet.filter(|_| primary).map(|f| {
                replicas::DriverReplicas::new(
                    Some(f.replicator.clone()),
                    f.replicas.clone(),
                    f.replication_metrics.clone(),
                    f.lease_ttl,
                    f.message_id_sync,
                )
            }),
            gateway: gateway.clone(),
            config: config.clone(),
        };
        let ended = ended_tx.clone();
        let run = driver.run(Inputs {
            ike: ike_rx,
            lookups: lookups_rx,
            claims: if primary { claims_rx.take() } else { None },
            acquires: if primary { acquire_rx.take() } else { None },
            sa_events,
            reloads,
            deletes,
            stop: stop_workers_rx.clone(),
        });
        workers.push(tokio::spawn(async move {
            // Said on the way out, also when the worker panics (the guard is dropped as the
            // task unwinds): the supervisor then stops every worker, as when one fails.
            let _ended = Ended(ended);
            run.await;
        }));
    }
    drop(claims_tx);
    tracing::info!(workers = n, "IKE workers started");
    let task = tokio::spawn(supervise(Supervised {
        workers,
        ended,
        stop: stop_rx,
        stop_workers,
        reloads: reloads_rx,
        worker_reloads,
        sa_events: sa_events_rx,
        worker_sa_events,
        dataplane: dataplane_task,
        routes,
    }));
    Ok(Control {
        ike_addr,
        nat_t_addr,
        stop: Some(stop_tx),
        ike_workers: n,
        reloads: reloads_tx,
        task,
        frames,
        replicas: replicas_task,
    })
}

/// The endpoint limits of worker `w` of `n`: the pod's, shared out so that they add up to
/// the pod's (new sites are spread evenly over the workers). Each worker may keep at least
/// one half-open SA, or a worker whose share is zero would drop every site hashed to it.
fn worker_limits(pod: &EndpointConfig, w: usize, n: usize) -> EndpointConfig {
    if n <= 1 {
        return pod.clone();
    }
    // A worker with a cookie threshold of zero would ask every new site for a cookie:
    // at least one each (the pod's threshold is then a little above what it says).
    let share = |limit: usize| limit / n + usize::from(w < limit % n);
    EndpointConfig {
        cookie_threshold: share(pod.cookie_threshold).max(1),
        max_half_open: share(pod.max_half_open).max(1),
        ..pod.clone()
    }
}

/// Binds the IKE port: one socket, or with several workers one per worker (SO_REUSEPORT: the
/// kernel spreads sites over them by address, and a message read by a worker whose SA it is
/// not is passed on to the right one).
async fn bind_ike_sockets(listen: IpAddr, port: u16, n: usize) -> Result<Vec<Arc<UdpSocket>>, ControlError> {
    let addr = SocketAddr::new(listen, port);
    let error = |addr| move |source| ControlError::Bind { addr, source };
    let sockets = if n <= 1 {
        vec![UdpSocket::bind(addr).await.map_err(error(addr))?]
    } else {
        let first = crate::dataplane::bind_udp(addr).map_err(error(addr))?;
        // The port the first got, when asked for any.
        let bound = first.local_addr().map_err(error(addr))?;
        let mut sockets = vec![first];
        for _ in 1..n {
            sockets.push(crate::dataplane::bind_udp(bound).map_err(error(bound))?);
        }
        sockets
    };
    Ok(sockets
        .into_iter()
        .map(|s| {
            // Thousands of sites may send IKE_SA_INIT at once (a restart, a scale-in): the
            // default ~200 KiB of receive buffer holds only a few hundred small datagrams,
            // and each one lost costs its site a 2 s retransmission. (The 4500 sockets get
            // the data plane's buffers.)
            crate::dataplane::io::grow_buffers(&s, IKE_SOCKET_BUFFER);
            Arc::new(s)
        })
        .collect())
}

/// Binds one socket per IKE worker in the port-4500 group after the data plane's `data`
/// sockets and attaches the program that steers IKE to them ([`steering`]). Without the
/// program (an error, logged) none is kept: IKE on 4500 then goes through the data plane.
fn steer_nat_t(
    first: &UdpSocket,
    addr: SocketAddr,
    data: usize,
    n: usize,
    key: steering::InitKey,
) -> Vec<Arc<UdpSocket>> {
    let group = match (u32::try_from(data), u32::try_from(n)) {
        (Ok(data), Ok(ike)) if data > 0 => steering::Group {
            data,
            ike,
            nat_t: true,
        },
        _ => return Vec::new(),
    };
    let socks: std::io::Result<Vec<_>> = (0..n)
        .map(|_| crate::dataplane::bind_udp(addr).map(Arc::new))
        .collect();
    match socks.and_then(|s| steering::attach(first, &steering::program(group, key)).map(|()| s)) {
        Ok(s) => {
            tracing::debug!(data, workers = n, "IKE on port 4500 steered to the IKE workers");
            s
        }
        Err(e) => {
            tracing::warn!(error = %e, "IKE on port 4500 cannot be steered to the IKE workers: the data plane passes it on");
            Vec::new()
        }
    }
}

/// Attaches the program that gives each IKE message on port 500 to the worker of its SA
/// ([`steering`]); without it (logged), the worker that reads one passes it on.
fn steer_ike_port(socks: &[Arc<UdpSocket>], key: steering::InitKey) {
    let (Some(first), Ok(ike)) = (socks.first(), u32::try_from(socks.len())) else {
        return;
    };
    let group = steering::Group {
        data: 0,
        ike,
        nat_t: false,
    };
    if let Err(e) = steering::attach(&**first, &steering::program(group, key)) {
        tracing::warn!(error = %e, "IKE on port 500 cannot be steered to the IKE workers: they pass it on");
    }
}

/// Tells the supervisor that a worker ended, when dropped.
struct Ended(mpsc::Sender<()>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

/// What the supervisor of the IKE workers holds.
struct Supervised {
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// A worker ended (its socket failed, or it was told to stop).
    ended: mpsc::Receiver<()>,
    stop: oneshot::Receiver<bool>,
    stop_workers: watch::Sender<Option<bool>>,
    reloads: mpsc::UnboundedReceiver<Reload>,
    worker_reloads: Vec<mpsc::UnboundedSender<Reload>>,
    sa_events: mpsc::UnboundedReceiver<SaEvent>,
    worker_sa_events: Vec<mpsc::UnboundedSender<SaEvent>>,
    dataplane: tokio::task::JoinHandle<Result<(), DataplaneError>>,
    routes: SharedRoutes,
}

/// Passes reloads and the data plane's volume events to the workers, and stops them all
/// when told to, when the data plane stops, or when one of them ends; then the routes go.
async fn supervise(mut s: Supervised) {
    let delete = loop {
        tokio::select! {
            r = &mut s.stop => break r.unwrap_or(false),
            r = &mut s.dataplane => {
                match r {
                    Ok(Ok(())) => tracing::error!("data plane stopped"),
                    Ok(Err(e)) => tracing::error!(error = %e, "data plane failed"),
                    Err(e) => tracing::error!(error = %e, "data plane task failed"),
                }
                break false;
            }
            _ = s.ended.recv() => break false,
            Some(r) = s.reloads.recv() => {
                // The shared parts (egroups, traps, auto-connects) change once, on the
                // first worker, which then passes the reload on to the others
                // (`Driver::followers`) for their own SAs.
                if let Some(tx) = s.worker_reloads.first() {
                    let _ = tx.send(r);
                }
            }
            // Named by an inbound ESP SPI, which lies in the shard of its IKE SA: to the
            // worker that holds that.
            Some(e) = s.sa_events.recv() => {
                let (SaEvent::Rekey { spi_in } | SaEvent::Expired { spi_in }) = e;
                let w = worker_of_esp_spi(s.worker_sa_events.len(), spi_in);
                if let Some(tx) = s.worker_sa_events.get(w) {
                    let _ = tx.send(e);
                }
            }
        }
    };
    let _ = s.stop_workers.send(Some(delete));
    for w in s.workers {
        let _ = w.await;
    }
    s.dataplane.abort();
    s.routes.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_limits_add_up_to_the_pods() {
        let pod = EndpointConfig {
            cookie_threshold: 5,
            max_half_open: 20_000,
            ..EndpointConfig::default()
        };
        for n in 1..=5 {
            let shares: Vec<_> = (0..n).map(|w| worker_limits(&pod, w, n)).collect();
            assert_eq!(shares.iter().map(|c| c.cookie_threshold).sum::<usize>(), 5);
            assert_eq!(shares.iter().map(|c| c.max_half_open).sum::<usize>(), 20_000);
        }
        assert_eq!(worker_limits(&pod, 0, 1).cookie_threshold, 5);
        // More workers than the threshold: each asks for cookies only past one half-open SA
        // of its own, never from the first site.
        assert!((0..7).all(|w| worker_limits(&pod, w, 7).cookie_threshold >= 1));
        // One worker: the pod's limits exactly, even a half-open limit of zero.
        let none = EndpointConfig {
            max_half_open: 0,
            ..pod.clone()
        };
        assert_eq!(worker_limits(&none, 0, 1).max_half_open, 0);
        // One half-open SA per worker at least.
        let tiny = EndpointConfig {
            max_half_open: 1,
            ..pod
        };
        assert_eq!(worker_limits(&tiny, 1, 2).max_half_open, 1);
    }
}
