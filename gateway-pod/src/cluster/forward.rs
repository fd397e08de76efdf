//! SPI routing: packets for another member's SA go to it, and its answers come back out
//! through the pod that received the site's flow.
//!
//! Behind a Kubernetes Service, the node's conntrack pins a site's flow (per port) to one
//! pod, and a packet for the site sent by any other pod would leave with the wrong source
//! and be dropped. So the owner of an SA never writes to a site whose packets reach it
//! through another pod: it hands its IKE messages and ESP packets back to that pod in
//! [`Kind::Egress`] frames, and that pod sends them from the socket the site wrote to.
//!
//! One hop at most, by construction: a pod forwards only what a site sent it; what arrives
//! in a frame is handled where it lands or dropped (and counted), never forwarded again.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use concentrator_esp::encap::{Datagram, classify};
use concentrator_fleet::wire::{FleetKey, Frame, Kind, Opener, Sealer};
use concentrator_fleet::{MemberId, Shard};
use concentrator_ike::{Flags, Header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::view::{Route, SharedView};
use crate::dataplane::shared::{ForwardedEsp, IkeDatagram};

const NOBODY: u16 = u16::MAX;
/// The largest frame: a 64 KiB datagram and the frame's overhead.
const MAX_FRAME: usize = 65536 + concentrator_fleet::wire::OVERHEAD;

/// Which pod a site's traffic of one SA enters through, shared by the SA's two halves in the
/// data plane and kept current by its inbound packets: `None` when the site writes to this
/// pod directly.
#[derive(Debug)]
pub struct Via(AtomicU16);

impl Default for Via {
    fn default() -> Self {
        Self(AtomicU16::new(NOBODY))
    }
}

impl Via {
    /// A path through `member` (or direct).
    pub fn new(member: Option<MemberId>) -> Self {
        let v = Self::default();
        v.set(member);
        v
    }

    /// The member the site's flow enters through, if another.
    pub fn get(&self) -> Option<MemberId> {
        match self.0.load(Ordering::Relaxed) {
            NOBODY => None,
            m => Some(MemberId(m)),
        }
    }

    /// The site's latest packet came through `member` (or directly).
    pub fn set(&self, member: Option<MemberId>) {
        self.0.store(member.map_or(NOBODY, |m| m.0), Ordering::Relaxed);
    }
}

/// Where an IKE message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IkeRoute {
    /// Handle it here.
    Local,
    /// Forward it to this member (with the shard's epoch, 0 for a new IKE SA).
    Forward(MemberId, SocketAddr, u32),
    /// Its shard has no owner we know of: drop it.
    Nowhere,
}

/// Where the IKE message `datagram` from `remote` goes: a new IKE SA (responder SPI zero)
/// to the member [`super::View::place`] picks; any other message to the owner of the shard
/// in the SPI we allocated (the responder's if the initiator sent it, else the
/// initiator's).
pub fn route_ike(view: &super::View, remote: SocketAddr, datagram: &[u8]) -> IkeRoute {
    let Some(me) = view.me() else {
        return IkeRoute::Local;
    };
    let Some((h, _)) = Header::peek(datagram) else {
        return IkeRoute::Local;
    };
    let Some(shard) = ike_shard(&h) else {
        if h.flags.contains(Flags::RESPONSE) {
            return IkeRoute::Local;
        }
        if let Some(r) = super::director::route_init(view, me, datagram) {
            return r;
        }
        return match view.place(remote.ip(), h.spi_i) {
            Some(m) if m != me => view
                .address(m)
                .map_or(IkeRoute::Local, |a| IkeRoute::Forward(m, a, 0)),
            // Us, or nobody takes new sites (the fleet is unavailable): answered here, where
            // the refusal is counted.
            _ => IkeRoute::Local,
        };
    };
    match view.route(shard) {
        Route::Local => IkeRoute::Local,
        Route::Member(m, a) => IkeRoute::Forward(m, a, view.epoch(shard)),
        Route::Nowhere => IkeRoute::Nowhere,
    }
}

/// The shard of the IKE SA a message belongs to: that of the SPI we allocated (the
/// responder's if the original initiator sent it, else the initiator's); `None` for an
/// IKE_SA_INIT request, whose SA has no responder SPI yet.
fn ike_shard(h: &Header) -> Option<Shard> {
    if h.spi_r == 0 {
        return None;
    }
    let ours = if h.flags.contains(Flags::INITIATOR) {
        h.spi_r
    } else {
        h.spi_i
    };
    Some(Shard::of_ike_spi(ours))
}

/// Labels of the forwarding counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabel {
    /// `ingress` (a site's packet to its SA's owner) or `egress` (the owner's answer back
    /// to the pod the site writes to).
    pub kind: String,
    /// `sent` or `received`.
    pub direction: String,
}

/// Forwarding metrics.
#[derive(Clone, Debug, Default)]
pub struct ForwardMetrics {
    pub packets: Family<ForwardLabel, Counter>,
    pub bytes: Family<ForwardLabel, Counter>,
    /// Frames refused or packets not forwarded, by reason.
    pub dropped: Family<crate::metrics::ReasonLabel, Counter>,
}

impl ForwardMetrics {
    fn count(&self, kind: Kind, direction: &str, bytes: usize) {
        let label = ForwardLabel {
            kind: match kind {
                Kind::Ingress => "ingress",
                Kind::Egress => "egress",
                Kind::Plain => "plain",
            }
            .into(),
            direction: direction.into(),
        };
        self.packets.get_or_create(&label).inc();
        self.bytes.get_or_create(&label).inc_by(bytes as u64);
    }

    /// Counts a packet that was not forwarded or a frame that was refused.
    pub fn drop(&self, reason: &str) {
        self.dropped
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "fleet_forwarded_packets",
            "Packets forwarded between pods, by kind and direction",
            self.packets.clone(),
        );
        r.register(
            "fleet_forwarded_bytes",
            "Bytes of packets forwarded between pods, by kind and direction",
            self.bytes.clone(),
        );
        r.register(
            "fleet_forward_dropped",
            "Packets not forwarded and frames refused, by reason",
            self.dropped.clone(),
        );
    }
}

/// What every sender of frames shares: the fleet key, this process's incarnation, the
/// address to send from.
#[derive(Clone)]
pub struct Links {
    view: SharedView,
    key: FleetKey,
    incarnation: [u8; 16],
    source: IpAddr,
    lanes: Arc<AtomicU32>,
    metrics: ForwardMetrics,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Links {
    pub(super) fn new(view: SharedView, key: FleetKey, source: IpAddr, metrics: ForwardMetrics) -> Self {
        let mut incarnation = [0u8; 16];
        // A failing system random generator leaves a fixed incarnation: its frames still
        // open, and only a restart of the same member could then repeat nonces.
        if concentrator_crypto::util::fill_random(&mut incarnation).is_err() {
            tracing::error!("no random incarnation for fleet frames");
        }
        Self {
            view,
            key,
            incarnation,
            source,
            lanes: Arc::new(AtomicU32::new(0)),
            metrics,
        }
    }

    /// A sending lane for one thread or task: its own socket and nonce sequence.
    pub fn lane(&self) -> std::io::Result<Link> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(self.source, 0))?;
        socket.set_nonblocking(true)?;
        crate::dataplane::io::grow_buffers(&socket, crate::dataplane::io::SOCKET_BUFFER);
        Ok(Link {
            links: self.clone(),
            lane: self.lanes.fetch_add(1, Ordering::Relaxed),
            socket,
            sealer: None,
            buf: Vec::with_capacity(2048),
        })
    }

    /// The view of the fleet.
    pub fn view(&self) -> &SharedView {
        &self.view
    }

    /// The forwarding metrics.
    pub fn metrics(&self) -> &ForwardMetrics {
        &self.metrics
    }
}

/// One sender's lane (see [`Links::lane`]).
pub struct Link {
    links: Links,
    lane: u32,
    socket: std::net::UdpSocket,
    sealer: Option<(MemberId, Sealer)>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The view of the fleet.
    pub fn view(&self) -> &SharedView {
        &self.links.view
    }

    /// The forwarding metrics.
    pub fn metrics(&self) -> &ForwardMetrics {
        &self.links.metrics
    }

    /// Sends `payload` to member `to` in a frame of `kind`; false (counted) if it could not.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        kind: Kind,
        to: SocketAddr,
        local: SocketAddr,
        remote: SocketAddr,
        epoch: u32,
        payload: &[u8],
    ) -> bool {
        let metrics = &self.links.metrics;
        let Some(me) = self.links.view.me() else {
            metrics.drop("no_member_id");
            return false;
        };
        if self.sealer.as_ref().is_none_or(|(m, _)| *m != me) {
            match Sealer::new(&self.links.key, me, self.links.incarnation, self.lane) {
                Ok(s) => self.sealer = Some((me, s)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot seal fleet frames");
                    metrics.drop("seal");
                    return false;
                }
            }
        }
        let Some((_, sealer)) = self.sealer.as_mut() else {
            return false;
        };
        self.buf.clear();
        if sealer
            .seal(kind, local, remote, epoch, payload, &mut self.buf)
            .is_err()
        {
            metrics.drop("seal");
            return false;
        }
        match self.socket.send_to(&self.buf, to) {
            Ok(_) => {
                metrics.count(kind, "sent", payload.len());
                true
            }
            Err(e) => {
                tracing::debug!(%to, error = %e, "fleet frame not sent");
                metrics.drop("send");
                false
            }
        }
    }
}

/// Where received frames go.
pub struct Delivery {
    /// IKE messages, to the IKE driver.
    pub ike: mpsc::Sender<IkeDatagram>,
    /// ESP packets, to the data plane: (SPI, the site's address, the member it came
    /// through, the UDP payload).
    pub esp: Box<dyn Fn(EspBatch) + Send + Sync>,
    /// Head-end packets toward a site whose tunnel we hold, to the data plane.
    pub plain: Box<dyn Fn(Vec<u8>) + Send + Sync>,
    /// The sockets a site writes to: answers go out from the one it wrote to.
    pub udp500: Arc<UdpSocket>,
    pub udp4500: Arc<UdpSocket>,
    pub ike_port: u16,
    pub nat_t_port: u16,
}

/// ESP packets for the data plane, each with its SPI.
pub type EspBatch = Vec<(u32, ForwardedEsp)>;

/// Frames handled per wake-up of the fleet socket before the ESP among them is handed to
/// the data plane: one hand-off (and one TUN write) per batch rather than per packet.
const FRAME_BATCH: usize = 64;

/// Receives frames on `socket` until it fails.
pub async fn serve(socket: UdpSocket, links: Links, delivery: Delivery) {
    let metrics = links.metrics.clone();
    let view = links.view.clone();
    let mut opener: Option<(MemberId, Opener)> = None;
    let mut buf = vec![0u8; MAX_FRAME];
    let mut esp = Vec::with_capacity(FRAME_BATCH);
    let mut handled = 0;
    loop {
        // What has already arrived joins the batch; once the socket is empty (or the batch
        // full), the batch goes and this task waits again.
        if handled >= FRAME_BATCH && !esp.is_empty() {
            (delivery.esp)(std::mem::replace(&mut esp, Vec::with_capacity(FRAME_BATCH)));
            handled = 0;
        }
        let received = match socket.try_recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !esp.is_empty() {
                    (delivery.esp)(std::mem::replace(&mut esp, Vec::with_capacity(FRAME_BATCH)));
                }
                handled = 0;
                socket.recv_from(&mut buf).await
            }
            r => r,
        };
        handled += 1;
        let (n, from) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::error!(error = %e, "the fleet socket failed: no more forwarded packets");
                return;
            }
        };
        let Some(me) = view.me() else {
            metrics.drop("no_member_id");
            continue;
        };
        if opener.as_ref().is_none_or(|(m, _)| *m != me) {
            opener = Some((me, Opener::new(links.key.clone(), me)));
        }
        let Some((_, o)) = opener.as_mut() else { continue };
        let frame = match o.open(&mut buf[..n]) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%from, error = %e, "fleet frame refused");
                metrics.drop(wire_reason(&e));
                continue;
            }
        };
        metrics.count(frame.kind, "received", frame.payload.len());
        match frame.kind {
            Kind::Egress => send_out(&delivery, &frame).await,
            Kind::Ingress => deliver(&view, &delivery, &frame, &metrics, &mut esp),
            Kind::Plain => (delivery.plain)(frame.payload.to_vec()),
        }
    }
}

fn wire_reason(e: &concentrator_fleet::wire::WireError) -> &'static str {
    use concentrator_fleet::wire::WireError;
    match e {
        WireError::Authentication => "authentication",
        WireError::FromSelf => "from_self",
        WireError::Truncated(_) | WireError::Magic | WireError::Kind(_) | WireError::Address => "malformed",
        WireError::Exhausted => "exhausted",
    }
}

/// An owner's answer: out to the site from the socket it writes to.
async fn send_out(d: &Delivery, f: &Frame<'_>) {
    let socket = if f.local.port() == d.ike_port {
        &d.udp500
    } else {
        &d.udp4500
    };
    if let Err(e) = socket.send_to(f.payload, f.remote).await {
        tracing::debug!(remote = %f.remote, error = %e, "forwarded answer not sent");
    }
}

/// A site's packet another pod received for us: handled here or dropped, never forwarded.
fn deliver(view: &super::View, d: &Delivery, f: &Frame<'_>, metrics: &ForwardMetrics, esp: &mut EspBatch) {
    // The sender found the owner with its view of the map: one older than ours names an
    // owner that may have changed since.
    let current = |shard: Shard| {
        let stale = f.epoch != 0 && f.epoch < view.epoch(shard);
        if stale {
            metrics.drop("stale_epoch");
        }
        !stale
    };
    let ike = if f.local.port() == d.ike_port {
        f.payload
    } else {
        match classify(f.payload) {
            Datagram::Ike(ike) => ike,
            Datagram::Esp { spi, packet } => {
                let shard = Shard::of_esp_spi(spi);
                if view.route(shard) != Route::Local {
                    metrics.drop("not_owner");
                } else if current(shard) {
                    esp.push((spi, (f.remote, f.sender, packet.to_vec())));
                }
                return;
            }
            Datagram::Keepalive | Datagram::Invalid => return,
        }
    };
    if route_ike(view, f.remote, ike) != IkeRoute::Local {
        // The sender placed it or found its owner with another view of the fleet: ours
        // catches up within a watch, and the site retransmits.
        metrics.drop("not_owner");
        return;
    }
    if let Some((h, _)) = Header::peek(ike)
        && let Some(shard) = ike_shard(&h)
        && !current(shard)
    {
        return;
    }
    let datagram = IkeDatagram {
        local: f.local,
        remote: f.remote,
        payload: ike.to_vec(),
        via: Some(f.sender),
    };
    if d.ike.try_send(datagram).is_err() {
        metrics.drop("ike_overflow");
    }
}
