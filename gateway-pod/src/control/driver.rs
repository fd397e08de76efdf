//! The driver: the one task that owns the endpoint and all IKE state, its sockets, and the
//! loop that feeds the engine and sends what it queues.
//!
//! It wakes for a datagram on port 500, an IKE message the data plane passed on from port
//! 4500, a finished site lookup, an acquire or volume event of the data plane, the engine's
//! next timer or an eroute's next connection attempt, and the status tick. What it does with
//! each lives in the other rooms of [`super`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concentrator_ike::endpoint::{Endpoint, EndpointError};
use concentrator_ike::responder::Error as ResponderError;
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::events::IkeSaRecord;
use super::ike_config::IkeConfigs;
use super::policy::{AutoConnects, LookupDone, PendingAcquires};
use super::shared_state::{SharedEgroups, SharedRoutes};
use super::workers::{IkeRouter, Peers};
use crate::config::Config;
use crate::dataplane::backend::ChildSaBackend;
use crate::dataplane::shared::{IkeDatagram, SaEvent};
use crate::state::Gateway;

/// IKE datagrams handled per wake-up of the control task (per port) before its responses
/// are sent.
const IKE_BATCH: usize = 64;

/// How often a new shard map is looked for (take-overs) in a fleet.
const FLEET_TICK: Duration = Duration::from_millis(100);

/// How often the tunnel table's traffic counters are refreshed for the admin API.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Resolves when `view` applies a new shard map (never standalone).
async fn next_map(view: Option<crate::cluster::SharedView>) {
    match view {
        Some(v) => v.map_applied().await,
        None => std::future::pending().await,
    }
}

/// The IKE task's state: the engine, the sockets, and each room's own state.
pub(super) struct Driver {
    pub(super) endpoint: Endpoint,
    pub(super) entropy: crate::cluster::GatewayEntropy,
    pub(super) gateway: Arc<Gateway>,
    /// The configuration in force here: a reload replaces it (`reload`).
    pub(super) config: Arc<Config>,
    /// The egroups and who owns each site, shared by the workers.
    pub(super) egroups: SharedEgroups,
    /// This worker's socket on port 500 (one per worker, SO_REUSEPORT, with several).
    pub(super) udp500: Arc<UdpSocket>,
    /// Where this worker sends on port 4500: its own socket when it reads one.
    pub(super) udp4500: Arc<UdpSocket>,
    /// This worker's own socket on port 4500 (`None`: the data plane passes IKE on).
    pub(super) nat_t: Option<super::nat_t::NatT>,
    /// Where we listen, who we are, what we propose.
    pub(super) configs: IkeConfigs,
    /// Our record of each IKE SA, by its id in the endpoint.
    pub(super) sas: HashMap<u64, IkeSaRecord>,
    /// Where site lookups report back to this task.
    pub(super) lookups: mpsc::UnboundedSender<LookupDone>,
    /// Eroutes we keep up or connect on demand (the first worker's: it starts our SAs).
    pub(super) auto: AutoConnects,
    pub(super) pending_acquires: PendingAcquires,
    /// What carries the CHILD SAs (the userspace data plane).
    pub(super) backend: Arc<dyn ChildSaBackend>,
    /// Routes to the TUN device, changed on a task of their own.
    pub(super) routes: SharedRoutes,
    /// The other IKE workers ([`super::workers`]).
    pub(super) peers: Peers,
    /// Where an IKE message read here goes when it is another worker's.
    pub(super) router: IkeRouter,
    /// The first worker's: the other workers, which get each reload once the shared parts
    /// have changed here (a site placed on them meanwhile would meet the old egroups).
    pub(super) followers: Vec<mpsc::UnboundedSender<super::Reload>>,
    /// The engine's SA counts last added to the gauges (the workers' counts add up).
    pub(super) counted: (i64, i64),
    /// The fleet (`None` standalone).
    pub(super) fleet: Option<super::fleet::DriverFleet>,
    /// Sites whose last IKE SA went in this wake-up: how their flows enter the fleet is
    /// forgotten once what was queued for them is sent.
    pub(super) unrouted: Vec<SocketAddr>,
    /// Site claims in the fleet (`None` standalone).
    pub(super) claims: Option<super::claims::DriverClaims>,
    /// SA replication in the fleet (`None` standalone).
    pub(super) replicas: Option<super::replicas::DriverReplicas>,
    /// Shards being handed over (draining in a fleet).
    pub(super) handovers: super::handover::Handovers,
    /// Eroute and egroup names, one copy each, shared by the records of their SAs.
    pub(super) names: Names,
}

/// Interned names: every SA of an eroute points at one copy of its name, not a `String` of
/// its own (tens of bytes per name and SA, at 100,000 SAs).
#[derive(Default)]
pub(super) struct Names(std::collections::HashSet<Arc<str>>);

impl Names {
    pub(super) fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = name.into();
        self.0.insert(Arc::clone(&n));
        n
    }
}

/// What the other tasks send the driver. Only the first worker gets acquires (it starts
/// our SAs) and claim events (the fleet runs one worker).
pub(super) struct Inputs {
    pub(super) ike: mpsc::Receiver<IkeDatagram>,
    pub(super) lookups: mpsc::UnboundedReceiver<LookupDone>,
    pub(super) claims: Option<mpsc::UnboundedReceiver<super::claims::ClaimEvent>>,
    pub(super) acquires: Option<mpsc::Receiver<IpAddr>>,
    pub(super) sa_events: mpsc::UnboundedReceiver<SaEvent>,
    pub(super) reloads: mpsc::UnboundedReceiver<super::Reload>,
    /// SAs of this worker another one wants deleted.
    pub(super) deletes: mpsc::UnboundedReceiver<u64>,
    /// Stop once it holds a value; `true`: with an IKE DELETE for every SA first (no member
    /// carries them on).
    pub(super) stop: watch::Receiver<Option<bool>>,
}

/// The next message of `rx`, or never if there is none.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next IKE messages on this worker's port-4500 socket; never, without one.
async fn recv_nat_t(
    n: &mut Option<super::nat_t::NatT>,
) -> Option<std::io::Result<super::nat_t::IkeMessages>> {
    match n {
        Some(n) => Some(n.recv().await),
        None => std::future::pending().await,
    }
}

/// [`recv_some`] for an unbounded channel.
async fn recv_some_unbounded<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    pub(super) async fn run(mut self, inputs: Inputs) {
        let Inputs {
            ike: mut ike_rx,
            lookups: mut lookups_rx,
            claims: mut claims_rx,
            acquires: mut acquire_rx,
            sa_events: mut sa_events_rx,
            reloads: mut reloads_rx,
            deletes: mut deletes_rx,
            mut stop,
        } = inputs;
        let mut buf = vec![0u8; 65536];
        let mut nat_t = self.nat_t.take();
        let nat_t_local = nat_t.as_ref().map(super::nat_t::NatT::local);
        let mut status = tokio::time::interval(STATUS_INTERVAL);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fleet_tick = tokio::time::interval(FLEET_TICK);
        fleet_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A new shard map is acted on at once (a hand-over's pause lasts until the new
        // owner carries the shard on), the tick catches the rest.
        let view = self.fleet.as_ref().map(|f| f.view.clone());
        let mut map_applied = std::pin::pin!(next_map(view.clone()));
        if self.primary() {
            for net in self.traps() {
                self.routes.hold(net);
            }
        }
        self.connect_due(Instant::now());
        self.flush().await;
        loop {
            let deadline = self
                .endpoint
                .poll_timeout()
                .into_iter()
                .chain(self.auto.next_due())
                .min()
                .map_or_else(
                    || tokio::time::Instant::now() + STATUS_INTERVAL,
                    tokio::time::Instant::from_std,
                );
            tokio::select! {
                delete = async { stop.wait_for(Option::is_some).await.is_ok_and(|v| *v == Some(true)) } => {
                    if delete {
                        self.delete_all().await;
                    }
                    break;
                }
                r = self.udp500.recv_from(&mut buf) => match r {
                    Ok((n, remote)) => {
                        let local = self.udp500.local_addr().unwrap_or(remote);
                        let datagram = buf[..n].to_vec();
                        self.datagram_read(local, remote, datagram);
                        // Whatever else has arrived is handled before the responses go out
                        // and before this task sleeps again: under a flood of new sites, one
                        // wake-up per datagram would cost more than the exchange itself.
                        for _ in 1..IKE_BATCH {
                            match self.udp500.try_recv_from(&mut buf) {
                                Ok((n, remote)) => {
                                    let datagram = buf[..n].to_vec();
                                    self.datagram_read(local, remote, datagram);
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
                Some(r) = recv_nat_t(&mut nat_t) => match r {
                    Ok(messages) => {
                        for (remote, payload) in messages {
                            if let Some(local) = nat_t_local {
                                self.datagram_read(local, remote, payload);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        tracing::error!(error = %e, "IKE socket on port 4500 failed");
                        break;
                    }
                },
                Some(d) = ike_rx.recv() => {
                    self.datagram(d.local, d.remote, &d.payload, d.via);
                    // The same for port 4500, whose datagrams the data plane's threads pass on.
                    for _ in 1..IKE_BATCH {
                        match ike_rx.try_recv() {
                            Ok(d) => self.datagram(d.local, d.remote, &d.payload, d.via),
                            Err(_) => break,
                        }
                    }
                }
                Some(done) = lookups_rx.recv() => self.lookup_done(done),
                Some(c) = recv_some_unbounded(&mut claims_rx) => self.claim_event(c),
                Some(dst) = recv_some(&mut acquire_rx) => self.acquire(dst),
                Some(e) = sa_events_rx.recv() => self.sa_volume(e),
                Some(r) = reloads_rx.recv() => self.reload(r),
                Some(id) = deletes_rx.recv() => self.endpoint.delete(id, Instant::now()),
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    self.endpoint.handle_timeout(now, &mut self.entropy);
                    self.connect_due(now);
                }
                _ = fleet_tick.tick(), if self.replicas.is_some() => self.replication_tick(),
                () = &mut map_applied => {
                    map_applied.set(next_map(view.clone()));
                    self.replication_tick();
                }
                _ = status.tick() => {
                    self.refresh_status();
                    if self.primary() {
                        self.gateway.drain_progress();
                        self.publish_occupancy();
                        self.fleet_health();
                    }
                }
            }
            self.flush().await;
        }
        // The SAs this worker held are gone with it.
        let (half_open, established) = self.counted;
        let m = &self.gateway.metrics;
        m.ike_sas_half_open.dec_by(half_open);
        m.ike_sas_established.dec_by(established);
    }

    /// The first worker: it starts our SAs, holds the traps and does the pod-wide chores.
    pub(super) fn primary(&self) -> bool {
        self.peers.me() == 0
    }

    /// Deletes SA `id` (IKE DELETE to its peer), here or by the worker that holds it.
    pub(super) fn delete_sa(&mut self, id: u64, now: Instant) {
        if self.peers.holds(id) {
            self.endpoint.delete(id, now);
        } else {
            self.peers.delete(id);
        }
    }

    /// An IKE message read on one of this worker's sockets: handled here, or passed to the
    /// worker it belongs to (the kernel's steering normally spares that).
    fn datagram_read(&mut self, local: SocketAddr, remote: SocketAddr, payload: Vec<u8>) {
        if self.router.workers() > 1 && self.router.worker_of(&payload) != self.peers.me() {
            let d = IkeDatagram {
                local,
                remote,
                payload,
                via: None,
            };
            if self.router.try_send(d).is_err() {
                self.gateway.metrics.count_ike_drop("worker_queue_full");
            }
            return;
        }
        self.datagram(local, remote, &payload, None);
    }

    /// The subnets routed into the TUN device whether or not a tunnel is up. Traffic toward
    /// any site of an egroup that may initiate reaches the TUN device, so a site without a
    /// tunnel raises an acquire (the initiator path). So does traffic toward the remote
    /// subnet of a static eroute we initiate while its tunnel is down: held and connected
    /// for (never sent in clear).
    pub(super) fn traps(&self) -> Vec<IpNet> {
        let trapped = self
            .auto
            .eroutes()
            .filter_map(|name| self.config.set.eroutes.get(name))
            .map(|e| e.remote_subnet);
        let initiating = self.egroups.initiating(&self.config);
        initiating
            .into_iter()
            .map(|(_, net, _)| net)
            .chain(trapped)
            .collect()
    }

    fn datagram(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        via: Option<concentrator_fleet::MemberId>,
    ) {
        tracing::trace!(%local, %remote, len = datagram.len(), ?via, "IKE message in");
        if self.handovers.holds_message(datagram) {
            // Its SA is frozen for a hand-over: the new owner answers the retransmission.
            self.gateway.metrics.count_ike_drop("handover");
            return;
        }
        if !self.route_in(local, remote, datagram, via) {
            return;
        }
        let r = self
            .endpoint
            .handle_datagram(Instant::now(), local, remote, datagram, &mut self.entropy);
        if let Err(e) = r {
            self.dropped(remote, &e);
        }
    }

    /// Tells every site we stop (IKE DELETE), and sends it before returning.
    async fn delete_all(&mut self) {
        // Frozen ones are another member's now, or about to be.
        let ids: Vec<u64> = self
            .sas
            .keys()
            .copied()
            .filter(|id| !self.handovers.holds(*id))
            .collect();
        if ids.is_empty() {
            return;
        }
        tracing::info!(sas = ids.len(), "stopping: IKE DELETE sent to every site");
        let now = Instant::now();
        for id in ids {
            self.endpoint.delete(id, now);
        }
        self.flush().await;
    }

    fn dropped(&self, remote: SocketAddr, e: &EndpointError) {
        let reason = match e {
            EndpointError::Responder(ResponderError::Packet(_)) => "integrity",
            EndpointError::Responder(ResponderError::Unexpected(_)) => "unexpected",
            EndpointError::Responder(ResponderError::Malformed(_)) => "malformed",
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

    /// Acts on the engine's events and sends what it queued. In a fleet, the SAs the
    /// engine touched go to their replicas first: the copy that could carry an SA on knows
    /// of a request (its Message ID) before the peer can answer it.
    async fn flush(&mut self) {
        // Taken before the events: an SA frozen for a hand-over that goes now (expired) must
        // not send its DELETE either.
        let frozen = self.handovers.frozen_spis();
        let mut out = Vec::new();
        loop {
            while let Some(t) = self.endpoint.poll_transmit() {
                out.push(t);
            }
            let Some(event) = self.endpoint.poll_event() else {
                break;
            };
            self.event(event);
        }
        self.replicate_changed();
        // The CHILD SAs installed by this wake-up's events reach the data plane before the
        // IKE messages that complete them reach the sites.
        self.backend.flush();
        let (mut on_ike_port, mut on_nat_t_port) = (Vec::new(), Vec::new());
        for t in out {
            // A frozen SA's timers may still fire: what they queue is not sent (the new
            // owner goes on from the final state).
            if frozen.holds_message(&t.payload) {
                continue;
            }
            tracing::trace!(local = %t.local, remote = %t.remote, len = t.payload.len(), "IKE message out");
            if self.send_via(&t) {
                continue;
            }
            if t.local.port() == self.configs.nat_t_port {
                // RFC 3948 §2.2: IKE on port 4500 carries the non-ESP marker.
                let mut out = Vec::with_capacity(t.payload.len() + 4);
                out.extend_from_slice(&concentrator_esp::encap::NON_ESP_MARKER);
                out.extend_from_slice(&t.payload);
                on_nat_t_port.push((t.remote, out));
            } else {
                on_ike_port.push((t.remote, t.payload));
            }
        }
        let failed = |remote: SocketAddr, e: std::io::Error| {
            tracing::debug!(%remote, error = %e, "IKE send failed");
        };
        super::transmit::send_batch(&self.udp500, &on_ike_port, failed).await;
        super::transmit::send_batch(&self.udp4500, &on_nat_t_port, failed).await;
        for remote in std::mem::take(&mut self.unrouted) {
            self.forget_via(remote);
        }
        // Each worker adds what changed in its own counts: together they are the pod's.
        let counts = self.endpoint.counts();
        let now = (counts.half_open as i64, counts.established as i64);
        let m = &self.gateway.metrics;
        m.ike_sas_half_open.inc_by(now.0 - self.counted.0);
        m.ike_sas_established.inc_by(now.1 - self.counted.1);
        self.counted = now;
    }
}
