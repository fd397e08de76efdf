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
use concentrator_fleet::wire::{FleetKey, Frame, Kind, OVERHEAD, Opener, Sealer};
use concentrator_fleet::{MemberId, Shard};
use concentrator_ike::{Flags, Header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::view::{Route, SharedView};
use std::io::IoSliceMut;

use quinn_udp::RecvMeta;

use crate::dataplane::io::{GsoRuns, Outgoing, Udp};
use crate::dataplane::shared::{ForwardedEsp, IkeDatagram};

const NOBODY: u16 = u16::MAX;
/// The largest frame: a 64 KiB datagram and the frame's overhead.
const MAX_FRAME: usize = 65536 + OVERHEAD;

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
    // Only with the responder's SPI set: an answer to our IKE_SA_INIT without it (a cookie,
    // INVALID_KE_PAYLOAD) goes where new sites are placed, not by the SPI of ours.
    if h.spi_r == 0 {
        return None;
    }
    h.our_spi().map(Shard::of_ike_spi)
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
        self.count_many(kind, direction, 1, bytes);
    }

    fn count_many(&self, kind: Kind, direction: &str, packets: usize, bytes: usize) {
        let label = ForwardLabel {
            kind: match kind {
                Kind::Ingress => "ingress",
                Kind::Egress => "egress",
                Kind::Plain => "plain",
            }
            .into(),
            direction: direction.into(),
        };
        self.packets.get_or_create(&label).inc_by(packets as u64);
        self.bytes.get_or_create(&label).inc_by(bytes as u64);
    }

    /// Counts a packet that was not forwarded or a frame that was refused.
    pub fn drop(&self, reason: &str) {
        self.drop_many(reason, 1);
    }

    fn drop_many(&self, reason: &str, n: usize) {
        self.dropped
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(n as u64);
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
/// address to send from, the pod network's MTU.
#[derive(Clone)]
pub struct Links {
    view: SharedView,
    key: FleetKey,
    incarnation: [u8; 16],
    source: IpAddr,
    mtu: usize,
    lanes: Arc<AtomicU32>,
    metrics: ForwardMetrics,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("source", &self.source)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// The pod network's MTU assumed when the interface of our fleet address does not say.
const DEFAULT_POD_MTU: usize = 1500;

impl Links {
    pub(super) fn new(view: SharedView, key: FleetKey, source: IpAddr, metrics: ForwardMetrics) -> Self {
        let mut incarnation = [0u8; 16];
        // A failing system random generator leaves a fixed incarnation: its frames still
        // open, and only a restart of the same member could then repeat nonces.
        if concentrator_crypto::util::fill_random(&mut incarnation).is_err() {
            tracing::error!("no random incarnation for fleet frames");
        }
        let mtu = match crate::dataplane::io::interface_mtu(source) {
            Some(mtu) => mtu as usize,
            None => {
                tracing::warn!(address = %source, mtu = DEFAULT_POD_MTU, "no interface holds the fleet address: its MTU is assumed");
                DEFAULT_POD_MTU
            }
        };
        Self {
            view,
            key,
            incarnation,
            source,
            mtu,
            lanes: Arc::new(AtomicU32::new(0)),
            metrics,
        }
    }

    /// A sending lane for one thread or task: its own socket and nonce sequence.
    pub fn lane(&self) -> std::io::Result<Link> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(self.source, 0))?;
        socket.set_nonblocking(true)?;
        crate::dataplane::io::grow_buffers(&socket, crate::dataplane::io::SOCKET_BUFFER);
        let gso = if crate::dataplane::io::gso_supported(&socket) {
            crate::dataplane::io::MAX_GSO_SEGMENTS
        } else {
            1
        };
        Ok(Link {
            links: self.clone(),
            lane: self.lanes.fetch_add(1, Ordering::Relaxed),
            socket,
            sealer: None,
            // A frame longer than the pod network's MTU cannot be a GSO segment: it goes
            // alone, for the kernel to fragment.
            queued: GsoRuns::new(gso, self.max_frame()),
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

    /// The longest site datagram (an ESP packet in UDP, without its IP and UDP headers)
    /// whose frame crosses the pod network in one IP packet: what the TCP MSS of tunnelled
    /// flows is clamped to fit (`--tcp-mss-clamp auto`).
    pub fn max_datagram(&self) -> usize {
        self.max_frame().saturating_sub(OVERHEAD)
    }

    /// The longest frame that crosses the pod network in one IP packet.
    fn max_frame(&self) -> usize {
        let ip_udp = if self.source.is_ipv4() { 20 + 8 } else { 40 + 8 };
        self.mtu.saturating_sub(ip_udp)
    }
}

/// Bytes of frames a lane queues before it sends them anyway.
const QUEUE_BYTES: usize = 256 << 10;
/// Runs of frames a lane queues before it sends them anyway (one `sendmmsg`).
const QUEUE_RUNS: usize = 32;

/// One sender's lane (see [`Links::lane`]). Frames are queued ([`Link::queue`]) and sent
/// together ([`Link::flush`]): frames to one member back to back, of one length but the
/// last, go as one UDP GSO send, and all runs in one `sendmmsg`, so that a receive batch of
/// a site's ESP crosses the pod network in a few syscalls and skbs rather than one each.
pub struct Link {
    links: Links,
    lane: u32,
    socket: std::net::UdpSocket,
    sealer: Option<(MemberId, Sealer)>,
    /// Frames queued, tagged with their kind.
    queued: GsoRuns<Kind>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("lane", &self.lane)
            .field("queued", &self.queued.runs().len())
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

    /// Sends `payload` to member `to` in a frame of `kind` at once (with whatever was
    /// queued before it); false (counted) if it could not.
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
        // What was queued before goes first, so that the answer is about this frame alone.
        self.flush();
        self.queue(kind, to, local, remote, epoch, payload) && self.flush() == 0
    }

    /// Queues `payload` for member `to` in a frame of `kind`, to go with the next
    /// [`Link::flush`] (or at once when the queue is full); false (counted) if it could not
    /// be sealed.
    #[allow(clippy::too_many_arguments)]
    pub fn queue(
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
        let sealed = self.queued.append(to, kind, |buf| {
            sealer.seal(kind, local, remote, epoch, payload, buf)
        });
        if sealed.is_err() {
            metrics.drop("seal");
            return false;
        }
        if self.queued.runs().len() >= QUEUE_RUNS || self.queued.bytes() >= QUEUE_BYTES {
            self.flush();
        }
        true
    }

    /// Sends every queued frame; how many could not be sent (counted, and logged at debug).
    pub fn flush(&mut self) -> usize {
        if self.queued.runs().is_empty() {
            return 0;
        }
        let msgs = self.queued.messages();
        let (metrics, runs) = (&self.links.metrics, self.queued.runs());
        // Each frame is its payload and the frame's overhead.
        let payload = |frames: usize, bytes: usize| bytes - frames * OVERHEAD;
        let mut refused = Vec::new();
        let mut lost = 0;
        crate::dataplane::io::send_now(&self.socket, &msgs, |i, result| {
            let r = &runs[i];
            match result {
                Ok(()) => metrics.count_many(r.tag, "sent", r.count, payload(r.count, r.len)),
                // The kernel refused the GSO batch (a route whose MTU is below the
                // interface's, no offload): its frames go again one by one.
                Err(e) if r.count > 1 && e.kind() != std::io::ErrorKind::WouldBlock => refused.push(i),
                Err(e) => {
                    tracing::debug!(to = %r.to, frames = r.count, error = %e, "fleet frames not sent");
                    metrics.drop_many("send", r.count);
                    lost += r.count;
                }
            }
        });
        for i in refused {
            let r = &runs[i];
            let one_by_one: Vec<Outgoing<'_>> = msgs[i].datagrams().collect();
            crate::dataplane::io::send_now(&self.socket, &one_by_one, |j, result| match result {
                Ok(()) => {
                    let len = one_by_one[j].contents.len();
                    metrics.count_many(r.tag, "sent", 1, payload(1, len));
                }
                Err(e) => {
                    tracing::debug!(to = %r.to, error = %e, "fleet frame not sent");
                    metrics.drop("send");
                    lost += 1;
                }
            });
        }
        drop(msgs);
        self.queued.clear();
        lost
    }
}

/// Where received frames go.
pub struct Delivery {
    /// IKE messages, to the IKE driver.
    pub ike: mpsc::Sender<IkeDatagram>,
    /// ESP packets, to the data plane: (SPI, the site's address, the member it came
    /// through, the UDP payload); how many it refused (its backlog is full).
    pub esp: Box<dyn Fn(EspBatch) -> usize + Send + Sync>,
    /// Head-end packets toward a site whose tunnel we hold, to the data plane; false if it
    /// refused it (its backlog is full).
    pub plain: Box<dyn Fn(Vec<u8>) -> bool + Send + Sync>,
    /// The sockets a site writes to: answers go out from the one it wrote to.
    pub udp500: Arc<UdpSocket>,
    pub udp4500: Arc<UdpSocket>,
    pub ike_port: u16,
    pub nat_t_port: u16,
}

/// ESP packets for the data plane, each with its SPI.
pub type EspBatch = Vec<(u32, ForwardedEsp)>;

/// Buffers one receive call on the fleet socket fills (each one frame or a GRO batch).
const RECV_BATCH: usize = 8;

/// Receives frames on `socket` until it fails. Each receive call takes what has arrived
/// (recvmmsg, and GRO batches of frames from one member); the ESP among it goes to the data
/// plane in one hand-off, the answers to sites in one `sendmmsg` with a GSO batch per site.
pub async fn serve(socket: UdpSocket, links: Links, delivery: Delivery) {
    let metrics = links.metrics.clone();
    let view = links.view.clone();
    let (udp, out) = match (Udp::new(Arc::new(socket)), Udp::new(delivery.udp4500.clone())) {
        (Ok(udp), Ok(out)) => (udp, out),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "the fleet socket cannot be set up: no forwarded packets");
            return;
        }
    };
    let mut opener: Option<(MemberId, Opener)> = None;
    let mut bufs: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; MAX_FRAME]).collect();
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let mut esp = Vec::new();
    // An answer longer than the path toward the site allows cannot be a GSO segment.
    let max_answer = crate::dataplane::io::interface_mtu(out.local_ip())
        .map_or(DEFAULT_POD_MTU, |m| m as usize)
        .saturating_sub(if out.local_ip().is_ipv4() { 28 } else { 48 });
    let mut answers = Answers::new(out.max_gso_segments(), max_answer);
    let mut overflows = Overflows::new();
    loop {
        overflows.count(&udp, &metrics);
        let received = {
            let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match udp.recv(&mut slices, &mut meta).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    tracing::error!(error = %e, "the fleet socket failed: no more forwarded packets");
                    return;
                }
            }
        };
        let Some(me) = view.me() else {
            let frames = meta
                .iter()
                .take(received)
                .map(|m| {
                    m.len
                        .div_ceil(if m.stride == 0 { m.len.max(1) } else { m.stride })
                })
                .sum();
            metrics.drop_many("no_member_id", frames);
            continue;
        };
        if opener.as_ref().is_none_or(|(m, _)| *m != me) {
            opener = Some((me, Opener::new(links.key.clone(), me)));
        }
        let Some((_, o)) = opener.as_mut() else { continue };
        for (buf, m) in bufs.iter_mut().zip(&meta).take(received) {
            let Some(data) = buf.get_mut(..m.len) else {
                continue;
            };
            let stride = if m.stride == 0 { m.len.max(1) } else { m.stride };
            for chunk in data.chunks_mut(stride) {
                let frame = match o.open(chunk) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(from = %m.addr, error = %e, "fleet frame refused");
                        metrics.drop(wire_reason(&e));
                        continue;
                    }
                };
                metrics.count(frame.kind, "received", frame.payload.len());
                match frame.kind {
                    Kind::Egress if frame.local.port() == delivery.ike_port => {
                        // IKE on port 500 (IKE_SA_INIT answers): few, sent as they come.
                        if let Err(e) = delivery.udp500.try_send_to(frame.payload, frame.remote) {
                            tracing::debug!(remote = %frame.remote, error = %e, "forwarded answer not sent");
                        }
                    }
                    Kind::Egress => answers.push(frame.remote, frame.payload),
                    Kind::Ingress => deliver(&view, &delivery, &frame, &metrics, &mut esp),
                    Kind::Plain => {
                        if !(delivery.plain)(frame.payload.to_vec()) {
                            metrics.drop("backlog");
                        }
                    }
                }
            }
        }
        if !esp.is_empty() {
            let refused = (delivery.esp)(std::mem::take(&mut esp));
            metrics.drop_many("backlog", refused);
        }
        answers.send(&out).await;
    }
}

/// Frames the kernel dropped on the fleet socket (its buffer full, mostly; also checksum
/// errors), counted as `fleet_forward_dropped_total{reason="receive_buffer"}` about once a
/// second.
struct Overflows {
    seen: u32,
    next: std::time::Instant,
}

impl Overflows {
    fn new() -> Self {
        Self {
            seen: 0,
            next: std::time::Instant::now(),
        }
    }

    fn count(&mut self, udp: &Udp, metrics: &ForwardMetrics) {
        let now = std::time::Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + std::time::Duration::from_secs(1);
        if let Some(drops) = udp.drops() {
            metrics.drop_many("receive_buffer", drops.wrapping_sub(self.seen) as usize);
            self.seen = drops;
        }
    }
}

/// Owners' answers to sites, to go out of our port-4500 socket: back to back per site, of
/// one length but the last (one GSO send each).
struct Answers(GsoRuns<()>);

impl Answers {
    /// `max_segment`: the longest answer that may be a GSO segment (the MTU of our outer
    /// interface, less the IP and UDP headers; a route with a smaller one makes the kernel
    /// refuse the batch, whose answers then go one by one).
    fn new(gso: usize, max_segment: usize) -> Self {
        Self(GsoRuns::new(gso, max_segment))
    }

    fn push(&mut self, to: SocketAddr, payload: &[u8]) {
        let _ = self.0.append(to, (), |buf| {
            buf.extend_from_slice(payload);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    async fn send(&mut self, out: &Udp) {
        if self.0.runs().is_empty() {
            return;
        }
        let msgs = self.0.messages();
        let mut refused = Vec::new();
        out.send_many(&msgs, |i, r| match r {
            Ok(()) => {}
            // The kernel refused the GSO batch: its answers go again one by one.
            Err(_) if msgs[i].segment.is_some() => refused.push(i),
            Err(e) => tracing::debug!(remote = %msgs[i].to, error = %e, "forwarded answer not sent"),
        })
        .await;
        for i in refused {
            let one_by_one: Vec<Outgoing<'_>> = msgs[i].datagrams().collect();
            out.send_many(&one_by_one, |j, r| {
                if let Err(e) = r {
                    tracing::debug!(remote = %one_by_one[j].to, error = %e, "forwarded answer not sent");
                }
            })
            .await;
        }
        drop(msgs);
        self.0.clear();
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
                    esp.push((spi, (f.remote, Some(f.sender), packet.to_vec())));
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
