//! The control plane: IKEv2 on UDP 500 and 4500, feeding the sans-IO engine
//! (`concentrator_ike::endpoint`), answering its "PSK needed" step from the configuration, and
//! installing the negotiated CHILD SAs in the shared data plane with routes to the TUN device.
//!
//! One task owns the endpoint and all IKE state, so IKE needs no lock either; it wakes for
//! a datagram on port 500, an IKE message the data plane passed on from port 4500, or the
//! engine's next timer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use concentrator_crds::eroute::{Role, ValidatedEroute};
use concentrator_crds::proposal::Esn;
use concentrator_esp::sa::Selector;
use concentrator_ike::Event;
use concentrator_ike::endpoint::{Endpoint, EndpointConfig, EndpointError, EndpointEvent};
use concentrator_ike::negotiate::ts_bounds;
use concentrator_ike::payload::{Identity, TrafficSelector};
use concentrator_ike::responder::{
    ChildSa, Config as ResponderConfig, DeleteReason, IdBuf, SystemEntropy, Transmit,
};
use concentrator_proto::admin::{ChildSa as ChildSaInfo, Tunnel};
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::dataplane::DataplaneError;
use crate::dataplane::backend::{ChildSaBackend, ChildSaSpec};
use crate::dataplane::shared::{self, IkeDatagram, SaEvent};
use crate::dataplane::table::SaCounters;
use crate::egroups::Egroups;
use crate::eroute::{Selection, select_responder};
use crate::sitedb::{LookupError, Site};
use crate::state::Gateway;

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
}

/// The running control plane and data plane.
pub struct Control {
    pub ike_addr: SocketAddr,
    pub nat_t_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Stops IKE and the data plane; tunnels end with the process.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The identity we answer with: the eroute's `localId`, else our IKE address.
fn local_id(eroute: &ValidatedEroute, listen: IpAddr) -> IdBuf {
    match eroute.local_id.as_deref() {
        Some(id) => id_from_str(id),
        None => match listen {
            IpAddr::V4(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv4(a)),
            IpAddr::V6(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv6(a)),
            _ => IdBuf::new(&Identity::Fqdn(b"concentrator")),
        },
    }
}

/// The responder configuration when no eroute accepts tunnels: the default proposals, no
/// subnets; the PSK step refuses every identity.
fn refusing_config(
    listen: IpAddr,
    retransmit: concentrator_ike::responder::Retransmit,
) -> Result<ResponderConfig, ControlError> {
    use concentrator_crds::eroute::{DEFAULT_ESP_PROPOSAL, DEFAULT_IKE_PROPOSAL};
    use concentrator_crds::proposal::{parse_esp, parse_ike};
    let ike = parse_ike("ike", DEFAULT_IKE_PROPOSAL).map_err(|_| ControlError::DefaultProposal)?;
    let esp = parse_esp("esp", DEFAULT_ESP_PROPOSAL).map_err(|_| ControlError::DefaultProposal)?;
    let none: IpNet = "0.0.0.0/32".parse().map_err(|_| ControlError::DefaultProposal)?;
    let local_id = match listen {
        IpAddr::V4(a) if !a.is_unspecified() => IdBuf::new(&Identity::Ipv4(a)),
        _ => IdBuf::new(&Identity::Fqdn(b"concentrator")),
    };
    Ok(ResponderConfig {
        retransmit,
        ..ResponderConfig::new(vec![ike], vec![esp], none, none, local_id)
    })
}

/// The responder configuration of a validated eroute (its proposals, subnets, CHILD SA and
/// IKE SA lifetimes, which start our rekeys, and liveness-check interval), answering as
/// `local_id`.
fn responder_config(eroute: &ValidatedEroute, local_id: IdBuf) -> ResponderConfig {
    ResponderConfig {
        child_lifetime: eroute.esp_lifetime,
        // A zero lifetime (rejected by validation) means no rekeys of ours.
        ike_lifetime: Some(eroute.ike_lifetime).filter(|d| !d.is_zero()),
        // Validation rejects a zero interval; should one get here, it means "off" rather
        // than a liveness check after every answer.
        dpd_interval: Some(eroute.dpd_interval).filter(|d| !d.is_zero()),
        ..ResponderConfig::new(
            eroute.ike_proposals.clone(),
            eroute.esp_proposals.clone(),
            eroute.local_subnet,
            eroute.remote_subnet,
            local_id,
        )
    }
}

/// An identity as strongSwan users write it: an address, `user@domain` (RFC822), else FQDN.
fn id_from_str(s: &str) -> IdBuf {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(a) => IdBuf::new(&Identity::Ipv4(a)),
            IpAddr::V6(a) => IdBuf::new(&Identity::Ipv6(a)),
        };
    }
    if s.contains('@') {
        IdBuf::new(&Identity::Rfc822(s.as_bytes()))
    } else {
        IdBuf::new(&Identity::Fqdn(s.as_bytes()))
    }
}

/// Binds the IKE sockets, opens the TUN device and starts the control and data plane tasks.
pub async fn start(
    gateway: Arc<Gateway>,
    egroups: Egroups,
    opts: ControlOptions,
) -> Result<Control, ControlError> {
    // The peer's identity, known only at IKE_AUTH, selects the eroute that authenticates it,
    // so IKE_SA_INIT is answered with any IKE proposal that some eroute accepting tunnels
    // allows (as strongSwan considers every config), chosen in the initiator's order; the
    // selected eroute must then allow it (`use_eroute`). With no such eroute (none yet, or
    // only ones we initiate), IKE_SA_INIT is still answered with the default proposal and
    // every identity is refused at IKE_AUTH: a pod that starts before its eroutes exist must
    // not fail.
    let accepting: Vec<_> = gateway
        .config
        .set
        .eroutes
        .values()
        .filter(|e| e.role != Role::Initiator)
        .collect();
    let responder_config = Arc::new(
        match accepting.first() {
            Some(e) => {
                let mut ike_proposals = Vec::new();
                for p in accepting.iter().flat_map(|e| &e.ike_proposals) {
                    if !ike_proposals.contains(p) {
                        ike_proposals.push(p.clone());
                    }
                }
                ResponderConfig {
                    retransmit: opts.retransmit,
                    ike_proposals,
                    ..responder_config(e, local_id(e, opts.listen))
                }
            }
            None => refusing_config(opts.listen, opts.retransmit)?,
        }
        .forcing_udp_encap(!opts.raw_esp),
    );

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
        },
        ike_tx,
        acquire_tx,
        sa_events_tx,
        gateway.metrics.dataplane.clone(),
    );
    let (stop_tx, stop_rx) = oneshot::channel();
    let (lookups_tx, lookups_rx) = mpsc::unbounded_channel();
    let mut endpoint = Endpoint::new(opts.endpoint.clone(), responder_config);
    endpoint.set_redirect(opts.redirect_to.clone());
    let driver = Driver {
        egroups,
        lookups: lookups_tx,
        dynamic_owner: HashMap::new(),
        local_ids: HashMap::new(),
        listen: opts.listen,
        ike_port: ike_addr.port(),
        retransmit: opts.retransmit,
        auto: gateway
            .config
            .set
            .eroutes
            .iter()
            .filter(|(name, e)| {
                e.role != Role::Responder
                    && e.peer_address.is_some()
                    && gateway.config.static_psks.contains_key(*name)
            })
            .map(|(name, e)| {
                (
                    name.clone(),
                    AutoConnect {
                        id: None,
                        next_attempt: Instant::now(),
                        backoff: RECONNECT_MIN,
                        redirect: None,
                        redirects: 0,
                        on_demand: e.role == Role::Both,
                        demanded: false,
                    },
                )
            })
            .collect(),
        initiated: HashMap::new(),
        pending_acquires: HashMap::new(),
        static_owner: HashMap::new(),
        endpoint,
        gateway,
        backend: Arc::new(dataplane),
        raw_esp: opts.raw_esp,
        udp500,
        udp4500,
        nat_t_port: nat_t_addr.port(),
        tun_name: opts.tun_name.clone(),
        sas: HashMap::new(),
        routes: HashMap::new(),
        entropy: SystemEntropy,
    };
    let task = tokio::spawn(driver.run(
        ike_rx,
        lookups_rx,
        (acquire_rx, sa_events_rx),
        stop_rx,
        dataplane_task,
    ));
    Ok(Control {
        ike_addr,
        nat_t_addr,
        stop: Some(stop_tx),
        task,
    })
}

/// What the control plane keeps per IKE SA, beyond the engine's state.
struct IkeSaRecord {
    peer_id: String,
    eroute: Option<String>,
    egroup: Option<String>,
    remote: Option<SocketAddr>,
    established_at: Option<SystemTime>,
    children: Vec<ChildRecord>,
    /// Why we refused the peer at the PSK step (counted under this instead of the generic
    /// AUTHENTICATION_FAILED that follows).
    refusal: Option<&'static str>,
    /// For a site from an egroup: its row's subnet, once looked up.
    site_subnet: Option<IpNet>,
    /// Traffic seen at the last status pass (to notice use and idleness).
    last_bytes: u64,
    last_traffic: Instant,
    /// A NAT lies between us and the peer: keep its mapping alive (RFC 3948 §4).
    nat: bool,
    last_keepalive: Instant,
}

impl IkeSaRecord {
    fn new(peer_id: String, now: Instant) -> Self {
        Self {
            peer_id,
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
        }
    }
}

/// A finished site lookup, back on the IKE task: for a site that authenticates to us (`id`
/// is its SA), or for traffic toward a site (`id` is `None`, the initiator path).
struct LookupDone {
    id: Option<u64>,
    egroup: String,
    base_eroute: String,
    result: Result<Site, LookupError>,
}

/// How long an acquire for a site's subnet suppresses further ones (the lookup and IKE run
/// meanwhile; packets wait in the data plane's queue).
const ACQUIRE_HOLD: Duration = Duration::from_secs(5);

struct ChildRecord {
    spi_in: u32,
    spi_out: u32,
    encryption: String,
    subnets: Vec<IpNet>,
    counters: Arc<SaCounters>,
}

struct Driver {
    endpoint: Endpoint,
    gateway: Arc<Gateway>,
    /// What carries the CHILD SAs (the userspace data plane).
    backend: Arc<dyn ChildSaBackend>,
    /// Plain ESP is carried too: peers we initiate to need not float to UDP.
    raw_esp: bool,
    udp500: Arc<UdpSocket>,
    udp4500: Arc<UdpSocket>,
    nat_t_port: u16,
    tun_name: String,
    sas: HashMap<u64, IkeSaRecord>,
    /// CHILD SAs per routed subnet: the route goes when the last one does.
    routes: HashMap<IpNet, usize>,
    entropy: SystemEntropy,
    egroups: Egroups,
    lookups: mpsc::UnboundedSender<LookupDone>,
    /// The IKE SA holding each dynamic eroute, by (egroup, peer ID).
    dynamic_owner: HashMap<(String, String), u64>,
    /// Our identity per eroute (built once).
    local_ids: HashMap<String, IdBuf>,
    listen: IpAddr,
    ike_port: u16,
    retransmit: concentrator_ike::responder::Retransmit,
    /// Eroutes we keep up, and the SA ids we started, to their eroute.
    auto: HashMap<String, AutoConnect>,
    /// The IKE SA of each peer of a static eroute, by (eroute, peer ID).
    static_owner: HashMap<(String, String), u64>,
    /// Acquires in progress, by (egroup, site subnet), since when.
    pending_acquires: HashMap<(String, IpNet), Instant>,
    initiated: HashMap<u64, String>,
}

/// Receive and send buffer asked for on the IKE port 500 socket.
const IKE_SOCKET_BUFFER: usize = 4 << 20;

/// First and longest wait before reconnecting an eroute we keep up.
const RECONNECT_MIN: Duration = Duration::from_secs(2);
const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// The IKE port of peers we initiate to.
const IKE_PORT: u16 = 500;

/// An eroute this gateway keeps up by initiating (role `Initiator`).
struct AutoConnect {
    /// The SA in progress or up.
    id: Option<u64>,
    next_attempt: Instant,
    backoff: Duration,
    /// Where the next attempt goes instead of `peerAddress`: a gateway that redirected us.
    redirect: Option<Redirect>,
    /// Redirects followed since the last SA of this eroute was established.
    redirects: u32,
    /// Role `Both`: connect when traffic needs the tunnel (an acquire), like strongSwan's
    /// `start_action = trap`, rather than keeping it up.
    on_demand: bool,
    /// Traffic is waiting for the tunnel of an on-demand eroute.
    demanded: bool,
}

impl AutoConnect {
    /// When this eroute should connect next, if it should.
    fn due_at(&self) -> Option<Instant> {
        (self.id.is_none() && (!self.on_demand || self.demanded)).then_some(self.next_attempt)
    }
}

/// A REDIRECT (RFC 5685) to follow on the next attempt.
struct Redirect {
    to: IpAddr,
    /// The gateway that sent it: named in N(REDIRECTED_FROM) (§4.1).
    from: concentrator_ike::redirect::GatewayId,
}

/// Redirects followed in a row without an SA coming up: beyond, the eroute goes back to
/// `peerAddress` with its backoff (RFC 5685 §9: a client must guard against redirect loops).
const MAX_REDIRECTS: u32 = 5;

/// IKE datagrams handled per wake-up of the control task (per port) before its responses
/// are sent.
const IKE_BATCH: usize = 64;

/// How often the tunnel table's traffic counters are refreshed for the admin API.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

impl Driver {
    async fn run(
        mut self,
        mut ike_rx: mpsc::Receiver<IkeDatagram>,
        mut lookups_rx: mpsc::UnboundedReceiver<LookupDone>,
        (mut acquire_rx, mut sa_events_rx): (mpsc::Receiver<IpAddr>, mpsc::UnboundedReceiver<SaEvent>),
        mut stop: oneshot::Receiver<()>,
        mut dataplane_task: tokio::task::JoinHandle<Result<(), DataplaneError>>,
    ) {
        let mut buf = vec![0u8; 65536];
        let mut status = tokio::time::interval(STATUS_INTERVAL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Traffic toward any site of an egroup that may initiate reaches the TUN device, so a
        // site without a tunnel raises an acquire (the initiator path).
        // So does traffic toward the remote subnet of a static eroute we initiate while its
        // tunnel is down: held and connected for (never sent in clear).
        let trapped = self
            .auto
            .keys()
            .filter_map(|name| self.gateway.config.set.eroutes.get(name))
            .map(|e| e.remote_subnet)
            .collect::<Vec<_>>();
        let initiating = self.egroups.initiating(&self.gateway.config);
        for net in initiating.into_iter().map(|(_, net, _)| net).chain(trapped) {
            *self.routes.entry(net).or_insert(0) += 1;
            self.route("replace", net);
        }
        self.connect_due(Instant::now());
        self.flush().await;
        loop {
            let next_connect = self.auto.values().filter_map(AutoConnect::due_at).min();
            let deadline = self
                .endpoint
                .poll_timeout()
                .into_iter()
                .chain(next_connect)
                .min()
                .map_or_else(
                    || tokio::time::Instant::now() + STATUS_INTERVAL,
                    tokio::time::Instant::from_std,
                );
            tokio::select! {
                _ = &mut stop => break,
                r = &mut dataplane_task => {
                    match r {
                        Ok(Ok(())) => tracing::error!("data plane stopped"),
                        Ok(Err(e)) => tracing::error!(error = %e, "data plane failed"),
                        Err(e) => tracing::error!(error = %e, "data plane task failed"),
                    }
                    break;
                }
                r = self.udp500.recv_from(&mut buf) => match r {
                    Ok((n, remote)) => {
                        let local = self.udp500.local_addr().unwrap_or(remote);
                        let datagram = buf[..n].to_vec();
                        self.datagram(local, remote, &datagram);
                        // Whatever else has arrived is handled before the responses go out
                        // and before this task sleeps again: under a flood of new sites, one
                        // wake-up per datagram would cost more than the exchange itself.
                        for _ in 1..IKE_BATCH {
                            match self.udp500.try_recv_from(&mut buf) {
                                Ok((n, remote)) => {
                                    let datagram = buf[..n].to_vec();
                                    self.datagram(local, remote, &datagram);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        tracing::error!(error = %e, "IKE socket failed");
                        break;
                    }
                },
                Some(d) = ike_rx.recv() => {
                    self.datagram(d.local, d.remote, &d.payload);
                    // The same for port 4500, whose datagrams the data plane's threads pass on.
                    for _ in 1..IKE_BATCH {
                        match ike_rx.try_recv() {
                            Ok(d) => self.datagram(d.local, d.remote, &d.payload),
                            Err(_) => break,
                        }
                    }
                }
                Some(done) = lookups_rx.recv() => self.lookup_done(done),
                Some(dst) = acquire_rx.recv() => self.acquire(dst),
                Some(e) = sa_events_rx.recv() => self.sa_volume(e),
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    self.endpoint.handle_timeout(now, &mut self.entropy);
                    self.connect_due(now);
                }
                _ = status.tick() => self.refresh_status(),
            }
            self.flush().await;
        }
        dataplane_task.abort();
        for (net, _) in std::mem::take(&mut self.routes) {
            self.route("del", net);
        }
    }

    fn datagram(&mut self, local: SocketAddr, remote: SocketAddr, datagram: &[u8]) {
        tracing::trace!(%local, %remote, len = datagram.len(), "IKE message in");
        let r = self
            .endpoint
            .handle_datagram(Instant::now(), local, remote, datagram, &mut self.entropy);
        if let Err(e) = r {
            self.dropped(remote, &e);
        }
    }

    fn dropped(&self, remote: SocketAddr, e: &EndpointError) {
        let reason = match e {
            EndpointError::Responder(concentrator_ike::responder::Error::Packet(_)) => "integrity",
            EndpointError::Responder(concentrator_ike::responder::Error::Unexpected(_)) => "unexpected",
            EndpointError::Responder(concentrator_ike::responder::Error::Malformed(_)) => "malformed",
            EndpointError::Responder(_) => return, // failures are reported by their event
            EndpointError::NotIke => "malformed",
            EndpointError::UnknownSpi(_) => "unknown_spi",
            EndpointError::UnexpectedResponse => "unexpected",
            EndpointError::CookieRequired => "cookie_required",
            EndpointError::HalfOpenLimit => "half_open_limit",
            EndpointError::Redirected(_) => "redirected",
            _ => "other",
        };
        self.gateway.metrics.count_ike_drop(reason);
        tracing::debug!(%remote, error = %e, "IKE message dropped");
    }

    /// Sends what the engine queued and acts on its events.
    async fn flush(&mut self) {
        loop {
            while let Some(t) = self.endpoint.poll_transmit() {
                self.send(t).await;
            }
            let Some(event) = self.endpoint.poll_event() else {
                break;
            };
            self.event(event);
        }
        let counts = self.endpoint.counts();
        let m = &self.gateway.metrics;
        m.ike_sas_half_open.set(counts.half_open as i64);
        m.ike_sas_established.set(counts.established as i64);
    }

    async fn send(&self, t: Transmit) {
        tracing::trace!(local = %t.local, remote = %t.remote, len = t.payload.len(), "IKE message out");
        let r = if t.local.port() == self.nat_t_port {
            // RFC 3948 §2.2: IKE on port 4500 carries the non-ESP marker.
            let mut out = Vec::with_capacity(t.payload.len() + 4);
            out.extend_from_slice(&concentrator_esp::encap::NON_ESP_MARKER);
            out.extend_from_slice(&t.payload);
            self.udp4500.send_to(&out, t.remote).await
        } else {
            self.udp500.send_to(&t.payload, t.remote).await
        };
        if let Err(e) = r {
            tracing::debug!(remote = %t.remote, error = %e, "IKE send failed");
        }
    }

    fn event(&mut self, event: EndpointEvent) {
        match event {
            EndpointEvent::Removed { id, established } => {
                self.removed(id, established);
                self.schedule_reconnect(id);
            }
            EndpointEvent::Sa { id, event } => self.sa_event(id, event),
            EndpointEvent::Initiated { id, event } => self.initiated_event(id, event),
        }
    }

    /// Events of the SAs we started: the same handling as the ones peers start, plus
    /// reconnecting the eroutes that are ours to keep up.
    fn initiated_event(&mut self, id: u64, event: concentrator_ike::initiator::Event) {
        use concentrator_ike::initiator::Event as I;
        let as_responder = match event {
            I::IkeSaEstablished {
                spi_i,
                spi_r,
                peer_id,
                remote,
                nat_detected,
            } => {
                if let Some(name) = self.initiated.get(&id)
                    && let Some(a) = self.auto.get_mut(name)
                {
                    a.backoff = RECONNECT_MIN;
                    a.redirects = 0;
                    a.demanded = false;
                }
                Event::IkeSaEstablished {
                    spi_i,
                    spi_r,
                    peer_id,
                    remote,
                    nat_detected,
                }
            }
            I::ChildSaInstalled(c) => Event::ChildSaInstalled(c),
            I::ChildSaDeleted { spi_in, spi_out } => Event::ChildSaDeleted { spi_in, spi_out },
            I::IkeSaDeleted { spi_i, reason } => {
                if reason == DeleteReason::Redirected {
                    self.follow_redirect(id);
                }
                self.initiated_closed(id);
                Event::IkeSaDeleted { spi_r: spi_i, reason }
            }
            I::RequestDeclined { exchange, notify } => {
                tracing::info!(?exchange, ?notify, "declined a request of the peer");
                return;
            }
            I::PeerError { notify_type } => {
                tracing::warn!(?notify_type, "peer reported an error");
                return;
            }
            I::Failed(e) => {
                if e == concentrator_ike::initiator::Error::Redirected {
                    self.follow_redirect(id);
                }
                self.initiated_closed(id);
                let eroute = self.initiated.get(&id).cloned().unwrap_or_default();
                let reason = initiator_failure_reason(&e);
                self.gateway.metrics.count_ike_failure(reason);
                tracing::warn!(%eroute, reason, error = %e, "IKE negotiation we started failed");
                return;
            }
        };
        self.sa_event(id, as_responder);
    }

    /// SA `id` of an eroute we keep up was redirected (RFC 5685: in IKE_SA_INIT, IKE_AUTH
    /// or an INFORMATIONAL of the established SA): the next attempt goes to the gateway
    /// named, at once. Only that attempt: when the SA there goes, the eroute returns to its
    /// `peerAddress` (in a fleet the virtual address, where a director picks a gateway
    /// again; the one we were sent to may be gone by then).
    fn follow_redirect(&mut self, id: u64) {
        use concentrator_ike::redirect::GatewayId;
        let Some(initiator) = self.endpoint.initiator(id) else {
            return;
        };
        let (Some(to), from) = (initiator.redirected_to().cloned(), initiator.path().1.ip()) else {
            return;
        };
        let Some(name) = self.initiated.get(&id).cloned() else {
            return;
        };
        let Some(a) = self.auto.get_mut(&name) else {
            return;
        };
        let to = match to {
            GatewayId::Ip(ip) if a.redirects < MAX_REDIRECTS => ip,
            GatewayId::Ip(ip) => {
                tracing::warn!(eroute = %name, to = %ip, redirects = a.redirects, "too many redirects in a row: back to peerAddress");
                self.gateway.metrics.count_ike_failure("redirect_loop");
                a.redirects = 0;
                return;
            }
            GatewayId::Fqdn(n) => {
                // Resolving would block the control loop; a fleet redirects to pod addresses.
                tracing::warn!(eroute = %name, to = %n, "redirected to a name: not followed, back to peerAddress");
                self.gateway.metrics.count_ike_failure("redirect_to_name");
                return;
            }
        };
        tracing::info!(eroute = %name, %from, %to, "redirected: connecting to the gateway named");
        a.redirects += 1;
        a.redirect = Some(Redirect {
            to,
            from: GatewayId::Ip(from),
        });
        // The old SA lingers in the endpoint (answering retransmissions); the eroute need
        // not wait for it.
        if a.id == Some(id) {
            a.id = None;
        }
        a.next_attempt = Instant::now();
        a.backoff = RECONNECT_MIN;
        a.demanded = true;
    }

    /// Connects every eroute whose turn has come (at start, and again after its SA is gone).
    fn connect_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .auto
            .iter()
            .filter(|(_, a)| a.due_at().is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.connect(&name, now);
        }
    }

    fn connect(&mut self, name: &str, now: Instant) {
        // The configuration outlives this call; holding it apart from `self` lets the
        // helpers below take `&mut self`.
        let gateway = Arc::clone(&self.gateway);
        let Some(e) = gateway.config.set.eroutes.get(name) else {
            return;
        };
        let Some(psk) = gateway.config.static_psks.get(name) else {
            return;
        };
        let redirect = self.auto.get_mut(name).and_then(|a| a.redirect.take());
        let Some(remote) = redirect
            .as_ref()
            .map(|r| r.to)
            .or_else(|| e.peer_address.as_deref().and_then(|a| a.parse::<IpAddr>().ok()))
            .map(|ip| SocketAddr::new(ip, IKE_PORT))
        else {
            tracing::warn!(eroute = %name, "peerAddress is not an IP address: cannot initiate");
            self.auto.remove(name);
            return;
        };
        // A concrete peer ID is required of the responder; a pattern accepts any.
        let remote_id = e
            .peer_id
            .as_deref()
            .filter(|p| !p.contains(['*', '?']))
            .map(id_from_str);
        let mut config = self.initiator_config(name, e, e.remote_subnet, remote_id);
        config.redirected_from = redirect.map(|r| r.from);
        let local = SocketAddr::new(self.listen, self.ike_port);
        match self.endpoint.connect(
            Arc::new(config),
            psk.expose(),
            local,
            remote,
            now,
            &mut self.entropy,
        ) {
            Ok(id) => {
                tracing::info!(eroute = %name, %remote, "initiating");
                self.initiated.insert(id, name.to_owned());
                let peer_id = e.peer_id.clone().unwrap_or_else(|| remote.ip().to_string());
                let rec = IkeSaRecord {
                    eroute: Some(name.to_owned()),
                    remote: Some(remote),
                    ..IkeSaRecord::new(peer_id, now)
                };
                self.sas.insert(id, rec);
                if let Some(a) = self.auto.get_mut(name) {
                    a.id = Some(id);
                }
            }
            Err(err) => {
                tracing::warn!(eroute = %name, error = %err, "cannot initiate");
                if let Some(a) = self.auto.get_mut(name) {
                    a.next_attempt = now + a.backoff;
                    a.backoff = (a.backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Our identity on `eroute` (built once per eroute).
    fn local_id_for(&mut self, name: &str, e: &ValidatedEroute) -> IdBuf {
        let listen = self.listen;
        self.local_ids
            .entry(name.to_owned())
            .or_insert_with(|| local_id(e, listen))
            .clone()
    }

    /// What we propose and expect when we initiate on eroute `name` toward `remote_subnet`.
    fn initiator_config(
        &mut self,
        name: &str,
        e: &ValidatedEroute,
        remote_subnet: IpNet,
        remote_id: Option<IdBuf>,
    ) -> concentrator_ike::initiator::Config {
        let mut config = concentrator_ike::initiator::Config::new(
            e.ike_proposals.clone(),
            e.esp_proposals.clone(),
            e.local_subnet,
            remote_subnet,
            self.local_id_for(name, e),
        );
        config.remote_id = remote_id;
        config.child_lifetime = e.esp_lifetime;
        // The endpoint routes by every SPI of ours, so IKE SA rekeys from either side work.
        config.ike_lifetime = Some(e.ike_lifetime).filter(|d| !d.is_zero());
        config.accept_ike_rekey = true;
        config.dpd_interval = Some(e.dpd_interval).filter(|d| !d.is_zero());
        config.retransmit = self.retransmit;
        config.nat_t.local_port = self.nat_t_port;
        // Without a raw ESP socket our data plane carries ESP in UDP only: float to 4500 even
        // without a NAT (RFC 7296 §2.23 allows it), so that the peer expects ESP in UDP.
        config.nat_t.force = !self.raw_esp;
        config
    }

    /// The endpoint forgot SA `id` (it lingers a while after closing).
    fn schedule_reconnect(&mut self, id: u64) {
        self.initiated_closed(id);
        self.initiated.remove(&id);
    }

    /// SA `id` of an eroute of ours closed (deleted, dead, failed): the eroute may connect
    /// again after its backoff, at once if kept up, on its next traffic if on demand.
    fn initiated_closed(&mut self, id: u64) {
        let Some(name) = self.initiated.get(&id) else {
            return;
        };
        if let Some(a) = self.auto.get_mut(name)
            && a.id == Some(id)
        {
            a.id = None;
            a.demanded = false;
            a.next_attempt = Instant::now() + a.backoff;
            if a.on_demand {
                tracing::info!(eroute = %name, "tunnel is gone: connecting again when traffic needs it");
            } else {
                tracing::info!(eroute = %name, retry_in = ?a.backoff, "tunnel we keep up is gone");
            }
            a.backoff = (a.backoff * 2).min(RECONNECT_MAX);
        }
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
                self.publish(spi_r);
            }
            Event::ChildSaInstalled(child) => self.child_installed(spi_r, *child),
            Event::ChildSaDeleted { spi_in, spi_out } => self.child_deleted(spi_r, spi_in, spi_out),
            Event::IkeSaRekeyed {
                old_spi_r, new_spi_r, ..
            } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| r.peer_id.as_str());
                tracing::info!(
                    peer_id = %peer,
                    old_spi_r = format_args!("{old_spi_r:016x}"),
                    new_spi_r = format_args!("{new_spi_r:016x}"),
                    "IKE SA rekeyed"
                );
            }
            Event::IkeSaRetired { .. } => {}
            Event::IkeSaDeleted { reason, .. } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| r.peer_id.as_str());
                tracing::info!(peer_id = %peer, %reason, "IKE SA deleted");
                if matches!(reason, DeleteReason::DeadPeer) {
                    self.gateway.metrics.count_ike_failure("dead_peer");
                }
                // The CHILD SAs went with their own events; the record goes now, not when
                // the endpoint stops answering retransmissions.
                self.removed(spi_r, true);
            }
            Event::RequestRefused { exchange, error } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| r.peer_id.as_str());
                self.gateway.metrics.count_ike_failure(failure_reason(&error));
                tracing::warn!(peer_id = %peer, ?exchange, %error, "request refused");
            }
            Event::PeerError { notify_type } => {
                let peer = self.sas.get(&spi_r).map_or("-", |r| r.peer_id.as_str());
                tracing::warn!(peer_id = %peer, ?notify_type, "peer reported an error");
            }
            Event::Failed(e) => {
                let rec = self.sas.get(&spi_r);
                let peer = rec.map_or("-", |r| r.peer_id.as_str()).to_owned();
                let reason = rec.and_then(|r| r.refusal).unwrap_or_else(|| failure_reason(&e));
                self.gateway.metrics.count_ike_failure(reason);
                tracing::warn!(peer_id = %peer, reason, error = %e, "IKE negotiation failed");
            }
        }
    }

    fn record(&mut self, spi_r: u64, peer_id: &IdBuf) -> &mut IkeSaRecord {
        self.sas
            .entry(spi_r)
            .or_insert_with(|| IkeSaRecord::new(peer_id.to_string(), Instant::now()))
    }

    /// The "PSK needed" step: the eroute the identity selects, and its key: a static
    /// eroute's Secret at once, or an egroup's site row after a lookup that runs as its own
    /// task (the answer comes back through [`Self::lookup_done`]).
    fn peer_identified(&mut self, spi_r: u64, id: &IdBuf) {
        let peer_id = id.to_string();
        let set = &self.gateway.config.set;
        let egroups = &self.egroups;
        let selection = select_responder(set, &peer_id, |g, p| egroups.has_dynamic(g, p));
        let (psk, eroute, reason) = if self.gateway.is_draining() {
            (None, None, Some("draining"))
        } else {
            match &selection {
                Selection::Static { eroute } => match self.gateway.config.static_psks.get(eroute) {
                    Some(psk) => (Some(psk.expose().to_vec()), Some(eroute.clone()), None),
                    None => (None, Some(eroute.clone()), Some("no_psk")),
                },
                Selection::Egroup { egroup, .. } | Selection::Dynamic { egroup } => {
                    let Some(base) = set.egroups.get(egroup).map(|g| g.eroute.clone()) else {
                        return;
                    };
                    // Refused before the lookup: no row can make the proposal right.
                    if !self.allows_proposal(spi_r, &base) {
                        self.refuse(spi_r, id, Some(base), PROPOSAL_NOT_ALLOWED);
                        return;
                    }
                    let rec = self.record(spi_r, id);
                    rec.eroute = Some(base.clone());
                    rec.egroup = Some(egroup.clone());
                    let lookup = self.egroups.lookup_by_peer(egroup, &peer_id, Instant::now());
                    let (tx, egroup) = (self.lookups.clone(), egroup.clone());
                    tokio::spawn(async move {
                        let result = lookup.await;
                        let _ = tx.send(LookupDone {
                            id: Some(spi_r),
                            egroup,
                            base_eroute: base,
                            result,
                        });
                    });
                    return;
                }
                Selection::None => (None, None, Some("unknown_peer")),
            }
        };
        let reason = match &eroute {
            Some(name) if reason.is_none() && !self.use_eroute(spi_r, name, None) => {
                Some(PROPOSAL_NOT_ALLOWED)
            }
            _ => reason,
        };
        let psk = if reason.is_some() { None } else { psk };
        let rec = self.record(spi_r, id);
        rec.eroute = eroute;
        rec.refusal = reason;
        if let Some(reason) = reason {
            tracing::info!(%peer_id, reason, "peer refused");
        }
        let psk = zeroize::Zeroizing::new(psk);
        if let Err(e) = self
            .endpoint
            .provide_psk(spi_r, Instant::now(), psk.as_deref(), &mut self.entropy)
        {
            tracing::debug!(%peer_id, error = %e, "PSK step ended the negotiation");
        }
    }

    /// Whether `eroute` allows the IKE proposal SA `id` negotiated in IKE_SA_INIT, where
    /// every eroute's proposals were on offer (true if either is gone: nothing to refuse).
    fn allows_proposal(&mut self, id: u64, eroute: &str) -> bool {
        let gateway = Arc::clone(&self.gateway);
        let choice = self.endpoint.responder_mut(id).and_then(|r| r.ike_choice());
        match (choice, gateway.config.set.eroutes.get(eroute)) {
            (Some(c), Some(e)) => c.allowed_by(&e.ike_proposals),
            _ => true,
        }
    }

    /// Refuses the peer of SA `id` before any key is looked up: AUTHENTICATION_FAILED,
    /// counted under `reason` when the negotiation fails.
    fn refuse(&mut self, id: u64, peer: &IdBuf, eroute: Option<String>, reason: &'static str) {
        let rec = self.record(id, peer);
        rec.eroute = eroute;
        rec.refusal = Some(reason);
        tracing::info!(peer_id = %peer, reason, "peer refused");
        if let Err(e) = self
            .endpoint
            .provide_psk(id, Instant::now(), None, &mut self.entropy)
        {
            tracing::debug!(peer_id = %peer, error = %e, "PSK step ended the negotiation");
        }
    }

    /// Makes the SA negotiate its CHILD SA by `eroute` (with the site's subnet for a dynamic
    /// one) instead of the eroute that answered IKE_SA_INIT; false if that eroute does not
    /// allow the IKE SA's proposal (the peer must be refused).
    fn use_eroute(&mut self, id: u64, eroute: &str, site_subnet: Option<IpNet>) -> bool {
        let gateway = Arc::clone(&self.gateway);
        let Some(e) = gateway.config.set.eroutes.get(eroute) else {
            return true;
        };
        let local_id = self.local_id_for(eroute, e);
        let Some(responder) = self.endpoint.responder_mut(id) else {
            return true;
        };
        // The endpoint routes by our SPI in either position, so this side may rekey the IKE
        // SA at its lifetime (RFC 7296 §2.18) as well as the CHILD SAs.
        let mut config = ResponderConfig {
            retransmit: responder.config().retransmit,
            half_open_timeout: responder.config().half_open_timeout,
            ike_lifetime: Some(e.ike_lifetime).filter(|d| !d.is_zero()),
            ..responder_config(e, local_id)
        };
        if let Some(subnet) = site_subnet {
            config.remote_subnet = subnet;
        }
        !matches!(
            responder.set_config(Arc::new(config)),
            Err(concentrator_ike::responder::Error::ProposalNotAllowed)
        )
    }

    /// A site lookup finished: authenticate with the row's PSK, or refuse with the reason
    /// counted per egroup. The SA may have gone meanwhile.
    fn lookup_done(&mut self, done: LookupDone) {
        let LookupDone {
            id,
            egroup,
            base_eroute,
            result,
        } = done;
        let Some(id) = id else {
            self.acquired(&egroup, &base_eroute, result);
            return;
        };
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        let peer_id = rec.peer_id.clone();
        let base_remote = self
            .gateway
            .config
            .set
            .eroutes
            .get(&base_eroute)
            .map(|e| e.remote_subnet);
        let result = result.and_then(|site| match base_remote {
            Some(net) => Egroups::check_subnet(&site, net).map(|()| site),
            None => Err(LookupError::NotFound),
        });
        let psk = match result {
            Ok(site) => {
                let allowed = self.use_eroute(id, &base_eroute, Some(site.remote_subnet));
                if let Some(rec) = self.sas.get_mut(&id) {
                    rec.site_subnet = Some(site.remote_subnet);
                    if !allowed {
                        rec.refusal = Some(PROPOSAL_NOT_ALLOWED);
                    }
                }
                allowed.then(|| zeroize::Zeroizing::new(site.psk.expose().to_vec()))
            }
            Err(e) => {
                self.gateway.metrics.count_lookup_failure(&egroup, e.kind());
                tracing::warn!(%peer_id, %egroup, reason = e.kind(), error = %e, "site lookup failed");
                if let Some(rec) = self.sas.get_mut(&id) {
                    rec.refusal = Some("site_lookup");
                }
                None
            }
        };
        if let Err(e) = self.endpoint.provide_psk(
            id,
            Instant::now(),
            psk.as_ref().map(|p| p.as_slice()),
            &mut self.entropy,
        ) {
            tracing::debug!(%peer_id, error = %e, "PSK step ended the negotiation");
        }
    }

    /// A packet toward `dst` found no SA: if `dst` lies in a site subnet of an egroup that
    /// may initiate, look the site up by subnet and connect to it.
    fn acquire(&mut self, dst: IpAddr) {
        let now = Instant::now();
        // A static eroute of ours toward the destination, down: connect it (at once, or
        // when its backoff after a failure ends).
        let gateway = Arc::clone(&self.gateway);
        let ours = self.auto.iter_mut().find(|(name, a)| {
            a.id.is_none()
                && gateway
                    .config
                    .set
                    .eroutes
                    .get(*name)
                    .is_some_and(|e| e.remote_subnet.contains(&dst))
        });
        if let Some((name, a)) = ours {
            if !a.demanded {
                tracing::info!(eroute = %name, %dst, "traffic for a tunnel that is down: connecting");
            }
            a.demanded = true;
            if a.next_attempt <= now {
                let name = name.clone();
                self.connect(&name, now);
            }
            return;
        }
        self.pending_acquires.retain(|_, t| now < *t + ACQUIRE_HOLD);
        let Some((egroup, base_remote, prefix)) = self
            .egroups
            .initiating(&self.gateway.config)
            .into_iter()
            .find(|(_, net, _)| net.contains(&dst))
        else {
            return;
        };
        let Ok(subnet) = IpNet::new(dst, prefix).map(|n| n.trunc()) else {
            return;
        };
        let key = (egroup.clone(), subnet);
        if self.pending_acquires.contains_key(&key) {
            return;
        }
        self.pending_acquires.insert(key, now);
        let Some(base) = self
            .gateway
            .config
            .set
            .egroups
            .get(&egroup)
            .map(|g| g.eroute.clone())
        else {
            return;
        };
        tracing::info!(%dst, %subnet, %egroup, %base_remote, "traffic toward a site without a tunnel");
        let lookup = self.egroups.lookup_by_subnet(&egroup, subnet, now);
        let tx = self.lookups.clone();
        tokio::spawn(async move {
            let result = lookup.await;
            let _ = tx.send(LookupDone {
                id: None,
                egroup,
                base_eroute: base,
                result,
            });
        });
    }

    /// The site of an acquire is known: connect to it with its row (address, then backup
    /// address; PSK; subnet), as a dynamic eroute of the egroup.
    fn acquired(&mut self, egroup: &str, base_eroute: &str, result: Result<Site, LookupError>) {
        let gateway = Arc::clone(&self.gateway);
        let base = gateway.config.set.eroutes.get(base_eroute);
        let result = result.and_then(|site| match base {
            Some(b) => Egroups::check_subnet(&site, b.remote_subnet).map(|()| site),
            None => Err(LookupError::NotFound),
        });
        let site = match result {
            Ok(site) => site,
            Err(e) => {
                self.gateway.metrics.count_lookup_failure(egroup, e.kind());
                tracing::warn!(%egroup, reason = e.kind(), error = %e, "site lookup for traffic failed");
                return;
            }
        };
        let Some(e) = base else {
            return;
        };
        if self.egroups.has_dynamic(egroup, &site.peer_id) {
            return;
        }
        let Some(remote) = [&site.peer_address, &site.backup_peer_address]
            .into_iter()
            .flatten()
            .find_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, IKE_PORT))
        else {
            self.gateway.metrics.count_lookup_failure(egroup, "malformed");
            tracing::warn!(peer_id = %site.peer_id, %egroup, "site row has no usable peer address: cannot initiate");
            return;
        };
        let config = self.initiator_config(
            base_eroute,
            e,
            site.remote_subnet,
            Some(id_from_str(&site.peer_id)),
        );
        let now = Instant::now();
        let local = SocketAddr::new(self.listen, self.ike_port);
        let psk = zeroize::Zeroizing::new(site.psk.expose().to_vec());
        match self
            .endpoint
            .connect(Arc::new(config), &psk, local, remote, now, &mut self.entropy)
        {
            Ok(id) => {
                tracing::info!(peer_id = %site.peer_id, %egroup, %remote, "initiating to a site");
                let rec = IkeSaRecord {
                    eroute: Some(base_eroute.to_owned()),
                    egroup: Some(egroup.to_owned()),
                    remote: Some(remote),
                    site_subnet: Some(site.remote_subnet),
                    ..IkeSaRecord::new(site.peer_id.clone(), now)
                };
                self.sas.insert(id, rec);
            }
            Err(err) => tracing::warn!(peer_id = %site.peer_id, error = %err, "cannot initiate to a site"),
        }
    }

    /// An egroup site is authenticated: its dynamic eroute is this SA's. An older SA of the
    /// same site is replaced (as INITIAL_CONTACT would ask), and the least recently used
    /// sites beyond the 10% free rule are deleted.
    fn dynamic_established(&mut self, id: u64) {
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        let (Some(egroup), Some(base), Some(subnet)) =
            (rec.egroup.clone(), rec.eroute.clone(), rec.site_subnet)
        else {
            return;
        };
        let peer_id = rec.peer_id.clone();
        let now = Instant::now();
        if let Some(old) = self.dynamic_owner.insert((egroup.clone(), peer_id.clone()), id)
            && old != id
        {
            tracing::info!(%peer_id, %egroup, "site reconnected: its older IKE SA is deleted");
            self.endpoint.delete(old, now);
        }
        let address = rec.remote.map(|r| r.ip().to_string());
        for evicted in self
            .egroups
            .insert(&egroup, &base, &peer_id, subnet, address, now)
        {
            if let Some(owner) = self
                .dynamic_owner
                .remove(&(egroup.clone(), evicted.peer_id.clone()))
            {
                tracing::info!(peer_id = %evicted.peer_id, %egroup, "least recently used site evicted");
                self.endpoint.delete(owner, now);
            }
        }
        self.publish_dynamic_counts();
    }

    /// One IKE SA per peer of a static eroute: a peer that authenticates again (it restarted
    /// and sent INITIAL_CONTACT, or simply reconnected) replaces its older SA, as strongSwan's
    /// default `uniqueids = yes` does, so stale SAs and their routes do not pile up.
    fn static_established(&mut self, id: u64) {
        let Some(rec) = self.sas.get(&id) else {
            return;
        };
        if rec.egroup.is_some() {
            return;
        }
        let Some(eroute) = rec.eroute.clone() else {
            return;
        };
        let key = (eroute, rec.peer_id.clone());
        if let Some(old) = self.static_owner.insert(key, id)
            && old != id
            && self.sas.contains_key(&old)
        {
            tracing::info!(peer_id = %rec.peer_id, "peer authenticated again: its older IKE SA is deleted");
            self.endpoint.delete(old, Instant::now());
        }
    }

    fn publish_dynamic_counts(&self) {
        for (egroup, n) in self.egroups.counts() {
            self.gateway
                .metrics
                .dynamic_eroutes
                .get_or_create(&crate::metrics::EgroupLabel {
                    egroup: egroup.to_owned(),
                })
                .set(n as i64);
        }
    }

    fn child_installed(&mut self, spi_r: u64, c: ChildSa) {
        let Some(rec) = self.sas.get(&spi_r) else {
            return;
        };
        let Some(remote) = rec.remote else {
            return;
        };
        let eroute = rec
            .eroute
            .as_ref()
            .and_then(|n| self.gateway.config.set.eroutes.get(n));
        let replay_window = eroute.map_or(concentrator_crds::eroute::DEFAULT_REPLAY_WINDOW, |e| {
            e.replay_window
        });
        let selectors = |ts: &[TrafficSelector<'_>]| -> Vec<Selector> {
            ts.iter()
                .filter_map(ts_bounds)
                .map(|(start, end)| Selector {
                    start,
                    end,
                    protocol: 0,
                })
                .collect()
        };
        let subnets: Vec<IpNet> = c
            .ts_remote
            .iter()
            .filter_map(ts_bounds)
            .flat_map(|(start, end)| range_to_nets(start, end))
            .collect();
        let volume = eroute.map(|e| e.esp_volume).unwrap_or_default();
        // With plain ESP the port means nothing; in UDP it is the peer's NAT-T port (after
        // a NAT, the one its datagrams come from).
        let peer = SocketAddr::new(
            remote.ip(),
            if c.udp_encap {
                remote.port()
            } else {
                self.nat_t_port
            },
        );
        let spec = ChildSaSpec {
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
            subnets: subnets.clone(),
            peer,
            udp_encap: c.udp_encap,
            volume: concentrator_esp::sa::Lifetime {
                soft_bytes: volume.rekey_bytes,
                hard_bytes: volume.life_bytes,
                soft_packets: volume.rekey_packets,
                hard_packets: volume.life_packets,
                ..Default::default()
            },
        };
        let counters = match self.backend.install_child(spec) {
            Ok(counters) => counters,
            Err(e) => {
                self.gateway.metrics.count_ike_failure("child_sa_unsupported");
                // An IKE SA whose only CHILD SA cannot be carried would look up to the peer
                // and carry nothing: it is deleted, so that the peer knows (and tries again
                // as it is configured to). Beside a working CHILD SA it stays.
                let deleting = rec.children.is_empty();
                tracing::warn!(peer_id = %rec.peer_id, error = %e, deleting_ike_sa = deleting, "CHILD SA cannot be installed");
                if deleting {
                    self.endpoint.delete(spi_r, Instant::now());
                }
                return;
            }
        };
        for net in &subnets {
            let n = self.routes.entry(*net).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.route("replace", *net);
            }
        }
        tracing::info!(
            peer_id = %rec.peer_id,
            spi_in = format_args!("{:08x}", c.spi_in),
            spi_out = format_args!("{:08x}", c.spi_out),
            encryption = ?c.encryption,
            remote_subnets = ?subnets,
            %peer,
            udp_encap = c.udp_encap,
            "CHILD SA installed"
        );
        if let Some(rec) = self.sas.get_mut(&spi_r) {
            rec.children.push(ChildRecord {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
                encryption: format!("{:?}", c.encryption),
                subnets,
                counters,
            });
        }
        self.publish(spi_r);
    }

    /// A CHILD SA reached a volume limit in the data plane (`esp.rekeyBytes`, ...): the soft
    /// one rekeys it now, as its soft lifetime would; at the hard one the data plane has
    /// dropped it, and so does the tunnel (its subnets fall back to an older SA or none).
    fn sa_volume(&mut self, e: SaEvent) {
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
                self.backend.remove_child(spi_in);
            }
        }
    }

    fn child_deleted(&mut self, spi_r: u64, spi_in: u32, spi_out: u32) {
        self.backend.remove_child(spi_in);
        let Some(rec) = self.sas.get_mut(&spi_r) else {
            return;
        };
        let Some(pos) = rec.children.iter().position(|c| c.spi_in == spi_in) else {
            return;
        };
        let child = rec.children.remove(pos);
        tracing::info!(
            peer_id = %rec.peer_id,
            spi_in = format_args!("{spi_in:08x}"),
            spi_out = format_args!("{spi_out:08x}"),
            "CHILD SA deleted"
        );
        self.unroute(&child.subnets);
        self.publish(spi_r);
    }

    fn removed(&mut self, spi_r: u64, established: bool) {
        let Some(rec) = self.sas.remove(&spi_r) else {
            return;
        };
        if let Some(eroute) = &rec.eroute {
            let key = (eroute.clone(), rec.peer_id.clone());
            if self.static_owner.get(&key) == Some(&spi_r) {
                self.static_owner.remove(&key);
            }
        }
        if let Some(egroup) = &rec.egroup {
            let key = (egroup.clone(), rec.peer_id.clone());
            if self.dynamic_owner.get(&key) == Some(&spi_r) {
                self.dynamic_owner.remove(&key);
                self.egroups.remove(egroup, &rec.peer_id);
                self.publish_dynamic_counts();
            }
        }
        for child in &rec.children {
            self.backend.remove_child(child.spi_in);
            self.unroute(&child.subnets);
        }
        self.gateway.tunnels.remove(&tunnel_id(spi_r));
        self.gateway
            .metrics
            .tunnels
            .set(self.gateway.tunnels.len() as i64);
        if established {
            tracing::info!(peer_id = %rec.peer_id, "IKE SA removed");
        }
    }

    fn unroute(&mut self, subnets: &[IpNet]) {
        for net in subnets {
            if let Some(n) = self.routes.get_mut(net) {
                *n -= 1;
                if *n == 0 {
                    self.routes.remove(net);
                    self.route("del", *net);
                }
            }
        }
    }

    /// `ip route <verb> <net> dev <tun>`: the kernel sends the site's traffic to our TUN.
    fn route(&self, verb: &str, net: IpNet) {
        let out = std::process::Command::new("ip")
            .args(["route", verb, &net.to_string(), "dev", &self.tun_name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                %net,
                verb,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "route change failed"
            ),
            Err(e) => tracing::warn!(%net, verb, error = %e, "cannot run ip"),
        }
    }

    /// Writes the tunnel of `spi_r` to the admin API's table.
    fn publish(&self, spi_r: u64) {
        let Some(rec) = self.sas.get(&spi_r) else {
            return;
        };
        let eroute = rec
            .eroute
            .as_ref()
            .and_then(|n| self.gateway.config.set.eroutes.get(n));
        let now = Instant::now();
        let children: Vec<ChildSaInfo> = rec
            .children
            .iter()
            .map(|c| {
                use std::sync::atomic::Ordering::Relaxed;
                ChildSaInfo {
                    spi_in: c.spi_in,
                    spi_out: c.spi_out,
                    encryption: c.encryption.clone(),
                    bytes_in: c.counters.bytes_in.load(Relaxed),
                    bytes_out: c.counters.bytes_out.load(Relaxed),
                    packets_in: c.counters.packets_in.load(Relaxed),
                    packets_out: c.counters.packets_out.load(Relaxed),
                }
            })
            .collect();
        let idle = rec
            .children
            .iter()
            .map(|c| now.saturating_duration_since(c.counters.last_activity()))
            .min()
            .unwrap_or_default();
        let remote_subnets: Vec<String> = rec
            .children
            .iter()
            .flat_map(|c| c.subnets.iter().map(ToString::to_string))
            .collect();
        self.gateway.tunnels.upsert(Tunnel {
            id: tunnel_id(spi_r),
            base_eroute: rec.eroute.clone().unwrap_or_default(),
            egroup: rec.egroup.clone().unwrap_or_default(),
            remote_peer_id: rec.peer_id.clone(),
            peer_address: rec.remote.map(|r| r.to_string()).unwrap_or_default(),
            local_subnet: eroute.map(|e| e.local_subnet.to_string()).unwrap_or_default(),
            remote_subnet: remote_subnets.join(","),
            dynamic: rec.egroup.is_some(),
            bytes_in: children.iter().map(|c| c.bytes_in).sum(),
            bytes_out: children.iter().map(|c| c.bytes_out).sum(),
            child_sas: children,
            idle_seconds: idle.as_secs(),
            established_at: rec
                .established_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
        });
        self.gateway
            .metrics
            .tunnels
            .set(self.gateway.tunnels.len() as i64);
    }

    /// Publishes traffic counters, and tells the engine which peers proved alive by
    /// sending ESP (so that it does not send them liveness checks).
    fn refresh_status(&mut self) {
        let ids: Vec<u64> = self.sas.keys().copied().collect();
        let now = Instant::now();
        for id in &ids {
            self.track_use(*id, now);
        }
        for id in ids {
            if let Some(last) = self.sas.get(&id).and_then(|r| {
                r.children
                    .iter()
                    .map(|c| c.counters.last_inbound())
                    .max()
                    .flatten()
            }) {
                self.endpoint.handle_child_traffic(id, last);
            }
            self.keepalive(id, now);
            self.publish(id);
        }
    }

    /// RFC 3948 §4: "NAT-keepalive packets are sent ... if no other packet has been sent in
    /// a specified time period" — one 0xFF octet to the peer's NAT-T port, so that a NAT in
    /// front of us (or of the peer) keeps the mapping while the tunnel is idle.
    fn keepalive(&mut self, id: u64, now: Instant) {
        let Some(rec) = self.sas.get_mut(&id) else {
            return;
        };
        let Some(remote) = rec.remote else {
            return;
        };
        let last_sent = rec
            .children
            .iter()
            .map(|c| c.counters.last_activity())
            .chain([rec.last_keepalive])
            .max()
            .unwrap_or(now);
        if rec.nat && rec.established_at.is_some() && keepalive_due(last_sent, now) {
            rec.last_keepalive = now;
            if let Err(e) = self.udp4500.try_send_to(&[0xff], remote) {
                tracing::debug!(%remote, error = %e, "NAT keepalive not sent");
            }
        }
    }
}

/// Interval of NAT keepalives (RFC 3948 §4 suggests 20 s).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

fn keepalive_due(last_sent: Instant, now: Instant) -> bool {
    now.saturating_duration_since(last_sent) >= KEEPALIVE_INTERVAL
}

impl Driver {
    /// Marks a dynamic eroute used when its tunnel carried traffic since the last pass, and
    /// deletes a tunnel idle for longer than its eroute's `inactivityTimeout`.
    fn track_use(&mut self, id: u64, now: Instant) {
        let Some(rec) = self.sas.get_mut(&id) else {
            return;
        };
        if rec.established_at.is_none() {
            return;
        }
        let bytes: u64 = rec
            .children
            .iter()
            .map(|c| {
                use std::sync::atomic::Ordering::Relaxed;
                c.counters.bytes_in.load(Relaxed) + c.counters.bytes_out.load(Relaxed)
            })
            .sum();
        if bytes != rec.last_bytes {
            rec.last_bytes = bytes;
            rec.last_traffic = now;
            if let Some(egroup) = &rec.egroup {
                self.egroups.touch(egroup, &rec.peer_id, now);
            }
            return;
        }
        let timeout = rec
            .eroute
            .as_ref()
            .and_then(|n| self.gateway.config.set.eroutes.get(n))
            .and_then(|e| e.inactivity_timeout);
        if let Some(timeout) = timeout
            && now.saturating_duration_since(rec.last_traffic) >= timeout
        {
            tracing::info!(peer_id = %rec.peer_id, ?timeout, "tunnel idle: deleted");
            self.endpoint.delete(id, now);
        }
    }
}

fn tunnel_id(spi_r: u64) -> String {
    format!("{spi_r:016x}")
}

/// The label a failed negotiation is counted under.
/// The refusal of a peer whose eroute does not allow the IKE proposal it negotiated.
const PROPOSAL_NOT_ALLOWED: &str = "ike_proposal_not_allowed";

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

    #[test]
    fn keepalives_follow_twenty_idle_seconds() {
        let t = Instant::now();
        assert!(!keepalive_due(t, t + Duration::from_secs(19)));
        assert!(keepalive_due(t, t + Duration::from_secs(20)));
        // A clock that went backwards never triggers a burst.
        assert!(!keepalive_due(t + Duration::from_secs(5), t));
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

    #[test]
    fn identities_parse_as_strongswan_users_write_them() {
        assert_eq!(
            id_from_str("192.0.2.1").to_string(),
            IdBuf::new(&Identity::Ipv4("192.0.2.1".parse().unwrap())).to_string()
        );
        assert_eq!(id_from_str("gw.example").body()[0], 2); // ID_FQDN
        assert_eq!(id_from_str("ops@example.com").body()[0], 3); // ID_RFC822_ADDR
        assert_eq!(id_from_str("2001:db8::1").body()[0], 5); // ID_IPV6_ADDR
    }
}
