//! The data plane shared by every tunnel of the gateway: one TUN device on the inner side,
//! the UDP socket of port 4500 on the outer side (ESP in UDP, RFC 3948), shared with IKE,
//! and optionally a raw socket of IP protocol 50 for SAs negotiated without UDP
//! encapsulation (plain ESP, RFC 4303); each SA says which of the two carries it.
//!
//! One worker per core, each with its own TUN queue and UDP socket (SO_REUSEPORT on port
//! 4500), each of two tasks owning its SA table so that the per-packet path takes no global
//! lock: egress reads its TUN queue, seals and sends (outbound table, by destination);
//! ingress receives, opens and writes to the TUN device (inbound table, by SPI) and passes
//! IKE messages (non-ESP marker) to the control plane, whichever socket they reached. The
//! control plane changes the tables through [`DataplaneHandle`], which tells every worker.
//!
//! Both directions move packets in batches, so that the per-packet cost is the cipher and a
//! copy, not a syscall:
//! - egress: with vnet-hdr offloads on the TUN device the kernel hands over TCP and UDP
//!   super-packets of up to 64 KiB, which tun-rs splits into MTU-sized segments; the sealed
//!   ESP packets of one peer form one UDP GSO batch (equal-sized datagrams back to back), and
//!   the batches of up to [`OPEN_BATCHES`] peers go out together in one `sendmmsg`;
//! - ingress: recvmmsg with UDP GRO hands over batches of datagrams; the opened inner
//!   packets of a batch go to the TUN device coalesced (TCP GRO) in as few writes as possible.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use concentrator_esp::encap::{Datagram, classify};
use concentrator_esp::icmp;
use concentrator_esp::ip::{self, next_header_for};
use concentrator_esp::packet::sealed_len;
use concentrator_esp::sa::{Expiry, inbound_allowed};
use concentrator_fleet::MemberId;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use quinn_udp::RecvMeta;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

use crate::cluster::{Link, Links};

mod egress;
mod ingress;

use self::egress::*;
use self::ingress::*;
use super::DataplaneError;
use super::io::{MAX_GSO_BYTES, Outgoing, RECV_BUF_LEN, Udp};
use super::pmtu::{PathMtu, outer_overhead};
use super::table::{InboundSa, InboundTable, OutboundSa, OutboundTable, SharedInbound};

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
    /// Inner packets that may not be fragmented (IPv4 with DF, IPv6) and would not fit the
    /// path toward the peer: dropped, their sender told the MTU that fits (ICMP).
    pub too_big: Counter,
    /// IKE messages on port 4500 dropped because the control plane was not keeping up.
    pub ike_overflow: Counter,
    /// IKE messages on port 4500 a data plane thread read and passed to an IKE worker: next
    /// to none while the port's program steers IKE to the workers' own sockets (only an IKE
    /// message GRO joined behind a site's ESP).
    pub ike_passed_on: Counter,
    /// CHILD SA directions that reached a soft volume limit (a rekey was asked for).
    pub soft_expired: Counter,
    /// CHILD SA directions that reached a hard volume limit and were removed.
    pub hard_expired: Counter,
    /// Inner packets not sent because the SA's sequence ceiling was reached (in a fleet, the
    /// replica has not acknowledged more sequence numbers: a fenced or cut-off owner).
    pub seq_ceiling: Counter,
    /// Packets dropped (either direction) while their SA was being handed over to another
    /// member of the fleet (a drain: at most a few hundred milliseconds per shard).
    pub handover: Counter,
}

/// What a CHILD SA's traffic asks of the control plane: its volume limits (bytes, packets;
/// each direction counted apart) were reached. The SA is named by our inbound SPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaEvent {
    /// A soft limit: rekey the CHILD SA now.
    Rekey { spi_in: u32 },
    /// A hard limit: the data plane removed the half that reached it (its packets are
    /// dropped and counted from now on); the control plane removes the rest.
    Expired { spi_in: u32 },
}

/// Acts on the volume limit a packet crossed; true if the SA must go now.
fn crossed(
    expiry: Expiry,
    spi_in: u32,
    counters: &DataplaneCounters,
    events: &mpsc::UnboundedSender<SaEvent>,
) -> bool {
    match expiry {
        Expiry::Fine => false,
        Expiry::Rekey => {
            counters.soft_expired.inc();
            let _ = events.send(SaEvent::Rekey { spi_in });
            false
        }
        Expiry::Expired => {
            counters.hard_expired.inc();
            let _ = events.send(SaEvent::Expired { spi_in });
            true
        }
    }
}

/// Where the data plane sends the IKE messages it reads on port 4500 (the control plane's
/// IKE workers, when the port does not steer IKE to them itself).
pub trait IkeSink: Send + Sync {
    /// Queues `d`; gives it back when it cannot be taken now (counted as an overflow).
    fn try_send(&self, d: IkeDatagram) -> Result<(), IkeDatagram>;
}

impl IkeSink for mpsc::Sender<IkeDatagram> {
    fn try_send(&self, d: IkeDatagram) -> Result<(), IkeDatagram> {
        Self::try_send(self, d).map_err(mpsc::error::TrySendError::into_inner)
    }
}

/// An IKE message for the control plane: arrived on port 4500, or forwarded by the member
/// of the fleet that received it.
#[derive(Debug)]
pub struct IkeDatagram {
    /// Our address the site wrote to (on the member that received it, if forwarded).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Without the non-ESP marker.
    pub payload: Vec<u8>,
    /// The member that received it and forwarded it here; answers go back through it.
    pub via: Option<MemberId>,
}

enum EgressCommand {
    Install(Arc<OutboundSa>, Vec<IpNet>),
    Remove(u32),
    /// The SA changes the control plane made in one wake-up ([`DataplaneHandle::flush`]).
    Changes(Arc<[SaChange]>),
    /// Packets toward `subnet` go to `member`, which holds the site's tunnel, for a while;
    /// `None`: no member holds it, they are dropped meanwhile.
    Elsewhere(IpNet, Option<MemberId>),
    /// A head-end packet another member forwarded here for a site whose tunnel we hold.
    Plain(Vec<u8>, Backlog),
}

/// An ESP packet read elsewhere than on a data plane socket: the site's address, the member
/// it entered through (`None`: this pod's own socket, an IKE worker's), the UDP payload.
pub type ForwardedEsp = (SocketAddr, Option<MemberId>, Vec<u8>);

/// A CHILD SA in or out, for every worker: each takes its half.
enum SaChange {
    Install(Arc<SharedInbound>, Arc<OutboundSa>, Vec<IpNet>),
    Remove(u32),
}

enum IngressCommand {
    Install(Arc<SharedInbound>),
    Remove(u32),
    /// The SA changes the control plane made in one wake-up ([`DataplaneHandle::flush`]).
    Changes(Arc<[SaChange]>),
    /// ESP packets of ours that other members of the fleet received from the sites, as
    /// (the site's address, the member it came through, the UDP payload): a batch per
    /// wake-up of the fleet socket, opened and written to the TUN device together. Also
    /// ESP an IKE worker's port-4500 socket read ([`DataplaneHandle::received`]).
    Forwarded(Vec<ForwardedEsp>, Backlog),
}

/// Bytes of packets from other members (forwarded ESP, plain frames) waiting in this pod's
/// workers' queues at most: a member that sends faster than the workers can open and seal
/// fills them up to here, and its further packets are dropped (and counted by the caller)
/// rather than queued without bound.
const BACKLOG_LIMIT: usize = 64 << 20;

/// A share of the backlog of packets from other members (in bytes), given back once the
/// worker has handled them (when the command that carries it is dropped).
#[derive(Debug)]
pub(crate) struct Backlog {
    queued: Arc<AtomicUsize>,
    n: usize,
}

impl Backlog {
    /// Room for `n` more bytes, if the backlog has it.
    fn take(queued: &Arc<AtomicUsize>, n: usize) -> Option<Self> {
        let before = queued.fetch_add(n, Ordering::Relaxed);
        if before + n > BACKLOG_LIMIT {
            queued.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        Some(Self {
            queued: queued.clone(),
            n,
        })
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// The control plane's side of the data plane: every change goes to every worker.
#[derive(Clone)]
pub struct DataplaneHandle {
    egress: Vec<mpsc::UnboundedSender<EgressCommand>>,
    ingress: Vec<mpsc::UnboundedSender<IngressCommand>>,
    /// Packets from other members queued in the workers ([`Backlog`]).
    backlog: Arc<AtomicUsize>,
    /// Which kinds of SA the data plane has a socket for.
    udp: bool,
    raw_esp: bool,
    /// SA changes of the control plane not sent yet ([`Self::defer_install`]), and the
    /// inbound SPIs installed through them.
    pending: Arc<std::sync::Mutex<Pending>>,
    /// Each worker's ingress task of its UDP socket, in worker order (= the socket's place
    /// in the port's SO_REUSEPORT group; `ingress` also holds the raw socket's task).
    site_ingress: Vec<mpsc::UnboundedSender<IngressCommand>>,
}

/// What [`DataplaneHandle`]'s deferred installs hold.
#[derive(Default)]
struct Pending {
    changes: Vec<SaChange>,
    /// Inbound SPIs of the CHILD SAs installed (and not removed) by the control plane. SPIs
    /// are random: at 100,000 tunnels about one pair of CHILD SAs with the same 32 bits is
    /// to be expected (N^2 / 2 pairs among 2^32 values), and the second would silently
    /// replace the first.
    inbound: std::collections::HashSet<u32>,
}

/// Spreads ESP over the data plane's UDP sockets by site (the port's steering program
/// computes the same in the kernel: `control::steering`).
pub(crate) const SITE_MIX: u32 = 0x9e37_79b1;

/// The worker, of `n`, whose UDP socket gets the ESP of the site at `site` when the port
/// steers it (one site, one thread).
pub(crate) fn site_worker(n: u32, site: SocketAddr) -> u32 {
    let word = match site.ip() {
        IpAddr::V4(a) => u32::from(a),
        // The address's last word: what the program reads of an IPv6 header.
        IpAddr::V6(a) => u128::from(a) as u32,
    };
    ((word ^ u32::from(site.port())).wrapping_mul(SITE_MIX) >> 16) % n.max(1)
}

/// The outer sockets of a data plane: at least one of the two.
pub struct Outer {
    /// The port-4500 socket (bound with [`super::bind_udp`]) for ESP in UDP and IKE.
    pub udp: Option<Arc<UdpSocket>>,
    /// A raw socket of IP protocol 50 ([`super::bind_raw_esp`]) for plain ESP.
    pub raw_esp: Option<Arc<UdpSocket>>,
    /// How the MSS of TCP flows through the tunnels is clamped.
    pub mss: super::mss::MssClamp,
}

impl DataplaneHandle {
    /// Carries `subnets` through a new CHILD SA. The inbound half goes first, so that the
    /// peer's first packets on the new SA are not dropped while our outbound half catches up.
    pub fn install(&self, inbound: InboundSa, outbound: OutboundSa, subnets: Vec<IpNet>) {
        let inbound = Arc::new(SharedInbound::from(inbound));
        for tx in &self.ingress {
            let _ = tx.send(IngressCommand::Install(inbound.clone()));
        }
        let outbound = Arc::new(outbound);
        for tx in &self.egress {
            let _ = tx.send(EgressCommand::Install(outbound.clone(), subnets.clone()));
        }
    }

    /// [`Self::install`] with the next [`Self::flush`]: the changes of one wake-up of the
    /// control plane reach each worker as one command, so a burst of new sites wakes each
    /// data plane thread once, not once per SA and direction (measured: those wake-ups cost
    /// the data plane threads a fifth of the gateway's CPU under a load of new sites).
    /// `false` (nothing installed) when another CHILD SA installed this way has the same
    /// inbound SPI (a taken-over SA too: its adoption never installs an SA held here).
    pub fn defer_install(&self, inbound: InboundSa, outbound: OutboundSa, subnets: Vec<IpNet>) -> bool {
        let mut p = self.pending();
        if !p.inbound.insert(inbound.sa.spi()) {
            return false;
        }
        let change = SaChange::Install(
            Arc::new(SharedInbound::from(inbound)),
            Arc::new(outbound),
            subnets,
        );
        p.changes.push(change);
        true
    }

    /// [`Self::remove`] with the next [`Self::flush`].
    pub fn defer_remove(&self, spi_in: u32) {
        let mut p = self.pending();
        p.inbound.remove(&spi_in);
        p.changes.push(SaChange::Remove(spi_in));
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means a panic elsewhere while pushing: the list is whole.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the deferred changes to every worker, in the order they were made.
    pub fn flush(&self) {
        // Sent under the lock: with several IKE workers, one that took the list and sent
        // it later could be overtaken by another's next list (an SA's Remove before its
        // Install), or let the other send an IKE_AUTH answer before its SA was queued.
        let mut p = self.pending();
        if p.changes.is_empty() {
            return;
        }
        let changes: Arc<[SaChange]> = std::mem::take(&mut p.changes).into();
        for tx in &self.ingress {
            let _ = tx.send(IngressCommand::Changes(changes.clone()));
        }
        for tx in &self.egress {
            let _ = tx.send(EgressCommand::Changes(changes.clone()));
        }
    }

    /// Forgets the CHILD SA whose inbound SPI is `spi_in`.
    pub fn remove(&self, spi_in: u32) {
        for tx in &self.egress {
            let _ = tx.send(EgressCommand::Remove(spi_in));
        }
        for tx in &self.ingress {
            let _ = tx.send(IngressCommand::Remove(spi_in));
        }
    }

    /// Opens ESP packets that other members received from the sites and forwarded here,
    /// each `(spi, packet)`: one hand-off per worker for the whole batch, each SA's packets
    /// to one worker (so that they stay in order).
    pub fn forwarded(&self, batch: Vec<(u32, ForwardedEsp)>) -> usize {
        let n = self.ingress.len().max(1);
        let mut per_worker: Vec<Vec<ForwardedEsp>> = (0..n).map(|_| Vec::new()).collect();
        for (spi, packet) in batch {
            per_worker[spi as usize % n].push(packet);
        }
        self.queue(&self.ingress, per_worker)
    }

    /// Queues each worker's packets (`per_worker`, in the order of `to`) within the backlog;
    /// how many were dropped.
    fn queue(
        &self,
        to: &[mpsc::UnboundedSender<IngressCommand>],
        per_worker: Vec<Vec<ForwardedEsp>>,
    ) -> usize {
        let mut dropped = 0;
        for (tx, packets) in to.iter().zip(per_worker) {
            if packets.is_empty() {
                continue;
            }
            let bytes = packets.iter().map(|(_, _, p)| p.len()).sum();
            match Backlog::take(&self.backlog, bytes) {
                Some(b) => {
                    let _ = tx.send(IngressCommand::Forwarded(packets, b));
                }
                None => dropped += packets.len(),
            }
        }
        dropped
    }

    /// ESP that an IKE worker's port-4500 socket read (in a GRO batch led by an IKE message
    /// of the same site, the only way it lands there): opened by the workers as if their
    /// own sockets had read it. How many were dropped (the backlog is full).
    pub fn received(&self, batch: Vec<(SocketAddr, Vec<u8>)>) -> usize {
        // To the worker whose socket the port's program gives this site's ESP, so that its
        // packets stay on one thread, in order.
        let n = self.site_ingress.len();
        if n == 0 {
            return batch.len();
        }
        let mut per_worker: Vec<Vec<ForwardedEsp>> = (0..n).map(|_| Vec::new()).collect();
        for (remote, packet) in batch {
            let w = site_worker(n as u32, remote) as usize;
            if let Some(q) = per_worker.get_mut(w) {
                q.push((remote, None, packet));
            }
        }
        self.queue(&self.site_ingress, per_worker)
    }

    /// Sends packets toward `subnet` to `member` (which holds the site's tunnel) for a
    /// while, those waiting for a tunnel first.
    pub fn elsewhere(&self, subnet: IpNet, member: MemberId) {
        // After the SA changes made before it, as if they had been sent at once.
        self.flush();
        for tx in &self.egress {
            let _ = tx.send(EgressCommand::Elsewhere(subnet, Some(member)));
        }
    }

    /// Drops packets toward `subnet` for a moment, those waiting for a tunnel first: no
    /// member holds the site's tunnel, and we may not start one.
    pub fn not_held(&self, subnet: IpNet) {
        self.flush();
        for tx in &self.egress {
            let _ = tx.send(EgressCommand::Elsewhere(subnet, None));
        }
    }

    /// Seals a head-end packet that another member forwarded here (one worker per
    /// destination, so that a flow's packets stay in order).
    /// False (for the caller to count) when the workers' backlog is full.
    pub fn plain(&self, packet: Vec<u8>) -> bool {
        let Some(h) = ip::parse(&packet) else {
            return true;
        };
        let n = self.egress.len().max(1);
        let slot = match h.dst {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => u128::from(a) as usize,
        };
        let Some(backlog) = Backlog::take(&self.backlog, packet.len()) else {
            return false;
        };
        if let Some(tx) = self.egress.get(slot % n) {
            let _ = tx.send(EgressCommand::Plain(packet, backlog));
        }
        true
    }

    /// How many workers (each a TUN queue and a UDP socket) carry packets.
    pub fn workers(&self) -> usize {
        self.egress.len()
    }

    /// Can SAs of this kind be carried: ESP in UDP (`udp_encap`) or plain ESP?
    pub fn carries(&self, udp_encap: bool) -> bool {
        if udp_encap { self.udp } else { self.raw_esp }
    }

    /// A handle of one worker that is not running: its commands wait in the returned queue.
    #[cfg(test)]
    pub(crate) fn detached() -> (Self, DetachedWorker) {
        let (etx, erx) = mpsc::unbounded_channel();
        let (itx, _) = mpsc::unbounded_channel();
        (
            Self {
                egress: vec![etx],
                ingress: vec![itx],
                backlog: Arc::default(),
                udp: true,
                raw_esp: false,
                pending: Arc::default(),
                site_ingress: Vec::new(),
            },
            DetachedWorker(erx),
        )
    }
}

/// The command queue of a [`DataplaneHandle::detached`] worker.
#[cfg(test)]
pub(crate) struct DetachedWorker(mpsc::UnboundedReceiver<EgressCommand>);

#[cfg(test)]
impl DetachedWorker {
    /// How many installs are waiting (taking them).
    pub(crate) fn installs(&mut self) -> usize {
        std::iter::from_fn(|| self.0.try_recv().ok())
            .map(|c| match c {
                EgressCommand::Install(..) => 1,
                EgressCommand::Changes(c) => c.iter().filter(|c| matches!(c, SaChange::Install(..))).count(),
                _ => 0,
            })
            .sum()
    }
}

fn joined(r: Result<Result<(), DataplaneError>, tokio::task::JoinError>) -> Result<(), DataplaneError> {
    r.map_err(|e| DataplaneError::Worker(e.to_string()))?
}

/// Data plane workers by default: one per core. `CONCENTRATOR_DATAPLANE_WORKERS` overrides.
fn worker_count() -> usize {
    std::env::var("CONCENTRATOR_DATAPLANE_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// Starts the data plane workers on an open TUN device (with or without vnet-hdr offloads)
/// and the outer sockets. IKE messages arriving on the UDP port go to `ike`. The workers end
/// when the handle is dropped or I/O fails; the error is returned by the join handle, and
/// aborting the join handle stops them.
///
/// One worker per core, each a thread of its own with its own TUN queue (the device must be
/// multi-queue: [`super::open_tun`]) and its own UDP socket on the same port (SO_REUSEPORT):
/// the kernel spreads inner flows over the queues and peers over the sockets, and each
/// worker runs an egress task (its queue to its socket) and an ingress task (its socket to
/// its queue) on a single-threaded runtime, so that the two directions of a flow never wake
/// each other across threads (a shared multi-threaded runtime cost one flow ~8%). With a
/// single-queue device or a socket bound without SO_REUSEPORT there is one worker. Every raw
/// socket of a protocol gets a copy of each packet, so plain ESP has one socket (each worker
/// sends on its own descriptor of it) and one ingress task, on the first worker.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    dev: tun_rs::SyncDevice,
    tun_name: String,
    outer: Outer,
    ike: Arc<dyn IkeSink>,
    acquire: mpsc::Sender<IpAddr>,
    sa_events: mpsc::UnboundedSender<SaEvent>,
    counters: DataplaneCounters,
    fleet: Option<Links>,
) -> (
    DataplaneHandle,
    tokio::task::JoinHandle<Result<(), DataplaneError>>,
) {
    let mut handle = DataplaneHandle {
        egress: Vec::new(),
        ingress: Vec::new(),
        backlog: Arc::default(),
        udp: outer.udp.is_some(),
        raw_esp: outer.raw_esp.is_some(),
        pending: Arc::default(),
        site_ingress: Vec::new(),
    };
    let workers = match worker_sockets(dev, &outer) {
        Ok(w) => w,
        Err(e) => return (handle, tokio::spawn(async move { Err(e) })),
    };
    tracing::info!(workers = workers.len(), tun = %tun_name, raw_esp = outer.raw_esp.is_some(), "data plane started");
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut stops = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let (etx, erx) = mpsc::unbounded_channel();
        let (itx, irx) = mpsc::unbounded_channel();
        handle.egress.push(etx);
        if w.udp.is_some() {
            handle.site_ingress.push(itx.clone());
        }
        handle.ingress.push(itx);
        // With both kinds of socket, plain ESP gets an ingress task of its own, on the first
        // worker.
        let raw_ingress = (i == 0 && w.udp.is_some() && w.raw.is_some()).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            handle.ingress.push(tx);
            rx
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        // Two lanes per worker (its ingress and egress tasks each send frames); a lane that
        // cannot be had leaves that direction without forwarding (logged).
        let lane = || {
            fleet.as_ref().and_then(|l| {
                l.lane()
                    .map_err(|e| tracing::error!(error = %e, "no fleet socket for a data plane worker"))
                    .ok()
            })
        };
        let tasks = WorkerTasks {
            mss: outer.mss,
            ingress_link: lane(),
            egress_link: lane(),
            tun_name: tun_name.clone(),
            egress: erx,
            ingress: irx,
            raw_ingress,
            ike: ike.clone(),
            acquire: acquire.clone(),
            sa_events: sa_events.clone(),
            counters: counters.clone(),
        };
        let done = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("dataplane-{i}"))
            .spawn(move || {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| DataplaneError::Worker(e.to_string()))
                    .and_then(|rt| {
                        rt.block_on(async move {
                            tokio::select! {
                                r = run_worker(w, tasks) => r,
                                // The supervising task ended or was aborted.
                                _ = stop_rx => Ok(()),
                            }
                        })
                    });
                let _ = done.send(r);
            });
        if let Err(e) = spawned {
            let _ = done_tx.send(Err(DataplaneError::Worker(e.to_string())));
        }
    }
    drop(done_tx);
    let task = tokio::spawn(async move {
        // Dropping these (this task ending or being aborted) stops every worker.
        let _stops = stops;
        done_rx.recv().await.unwrap_or(Ok(()))
    });
    (handle, task)
}

/// What one worker thread carries packets with.
struct WorkerSockets {
    dev: tun_rs::SyncDevice,
    udp: Option<std::net::UdpSocket>,
    raw: Option<std::net::UdpSocket>,
}

/// The channels of one worker's tasks.
struct WorkerTasks {
    mss: super::mss::MssClamp,
    /// In a fleet: where the ingress task forwards ESP for other members' SAs.
    ingress_link: Option<Link>,
    /// In a fleet: where the egress task sends ESP for sites that write to another member.
    egress_link: Option<Link>,
    tun_name: String,
    egress: mpsc::UnboundedReceiver<EgressCommand>,
    ingress: mpsc::UnboundedReceiver<IngressCommand>,
    raw_ingress: Option<mpsc::UnboundedReceiver<IngressCommand>>,
    ike: Arc<dyn IkeSink>,
    acquire: mpsc::Sender<IpAddr>,
    sa_events: mpsc::UnboundedSender<SaEvent>,
    counters: DataplaneCounters,
}

/// A descriptor of `sock` of its own, for another thread's runtime to register.
fn dup(sock: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd;
    Ok(std::net::UdpSocket::from(sock.as_fd().try_clone_to_owned()?))
}

/// A TUN queue and sockets per worker: the given ones for the first, new queues and new
/// SO_REUSEPORT sockets on the same port for the others, as many as [`worker_count`] asks
/// and the device allows.
fn worker_sockets(dev: tun_rs::SyncDevice, outer: &Outer) -> Result<Vec<WorkerSockets>, DataplaneError> {
    let udp_err = |sock: Option<&Arc<UdpSocket>>| {
        let addr = sock
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        move |e| DataplaneError::Udp(addr, e)
    };
    let raw = || {
        outer
            .raw_esp
            .as_deref()
            .map(dup)
            .transpose()
            .map_err(udp_err(outer.raw_esp.as_ref()))
    };
    let udp = outer
        .udp
        .as_deref()
        .map(dup)
        .transpose()
        .map_err(udp_err(outer.udp.as_ref()))?;
    let want = if outer.udp.is_some() { worker_count() } else { 1 };
    let mut workers = vec![WorkerSockets {
        dev,
        udp,
        raw: raw()?,
    }];
    let Some(local) = outer.udp.as_ref().and_then(|u| u.local_addr().ok()) else {
        return Ok(workers);
    };
    while workers.len() < want {
        let extra = workers[0].dev.try_clone().and_then(|dev| {
            Ok(WorkerSockets {
                dev,
                udp: Some(super::io::bind_udp_std(local)?),
                raw: None,
            })
        });
        match extra {
            Ok(mut w) => {
                w.raw = raw()?;
                workers.push(w);
            }
            Err(e) => {
                tracing::info!(workers = workers.len(), wanted = want, error = %e, "fewer data plane workers than asked for");
                break;
            }
        }
    }
    Ok(workers)
}

/// One worker's tasks, on the current thread's runtime: until one ends.
async fn run_worker(w: WorkerSockets, t: WorkerTasks) -> Result<(), DataplaneError> {
    let tun_err = |e| DataplaneError::Tun(t.tun_name.clone(), e);
    let dev = Arc::new(tun_rs::AsyncDevice::new(w.dev).map_err(tun_err)?);
    let wrap = |sock: std::net::UdpSocket| -> Result<(Arc<Udp>, SocketAddr), DataplaneError> {
        let local = sock
            .local_addr()
            .map_err(|e| DataplaneError::Udp(SocketAddr::from(([0, 0, 0, 0], 0)), e))?;
        let sock = UdpSocket::from_std(sock).map_err(|e| DataplaneError::Udp(local, e))?;
        let udp = Udp::new(Arc::new(sock)).map_err(|e| DataplaneError::Udp(local, e))?;
        Ok((Arc::new(udp), local))
    };
    let udp = w.udp.map(wrap).transpose()?;
    let raw = w.raw.map(wrap).transpose()?;
    let mut set = tokio::task::JoinSet::new();
    if let (Some(rx), Some((raw, local))) = (t.raw_ingress, &raw) {
        set.spawn(ingress(
            dev.clone(),
            t.tun_name.clone(),
            raw.clone(),
            *local,
            rx,
            t.ike.clone(),
            t.sa_events.clone(),
            t.counters.clone(),
            // Plain ESP is not forwarded: a fleet's front carries UDP only.
            None,
            t.mss,
        ));
    }
    let sockets = Sockets {
        udp: udp.as_ref().map(|(u, _)| u.clone()),
        raw: raw.as_ref().map(|(r, _)| r.clone()),
    };
    set.spawn(egress(
        dev.clone(),
        t.tun_name.clone(),
        sockets,
        t.egress,
        t.acquire,
        t.sa_events.clone(),
        t.counters.clone(),
        t.egress_link,
        t.mss,
    ));
    // Without UDP, the raw socket is this (only) worker's.
    if let Some((sock, local)) = udp.or(raw) {
        set.spawn(ingress(
            dev,
            t.tun_name,
            sock,
            local,
            t.ingress,
            t.ike,
            t.sa_events,
            t.counters,
            t.ingress_link,
            t.mss,
        ));
    }
    match set.join_next().await {
        Some(r) => joined(r),
        None => Ok(()),
    }
}

/// The sockets an egress worker sends on: its own UDP socket, the shared raw one.
struct Sockets {
    udp: Option<Arc<Udp>>,
    raw: Option<Arc<Udp>>,
}

impl Sockets {
    fn for_sa(&self, udp_encap: bool) -> Option<&Udp> {
        if udp_encap {
            self.udp.as_deref()
        } else {
            self.raw.as_deref()
        }
    }

    /// Our address on the outer side (unspecified when bound to any).
    fn local_ip(&self) -> IpAddr {
        self.udp
            .as_ref()
            .or(self.raw.as_ref())
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |u| u.local_ip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_are_bounded_and_released_to_the_sa_that_covers_them() {
        let mut held = HeldPackets::default();
        let now = Instant::now();
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        let b: IpAddr = "10.1.2.1".parse().unwrap();
        // The first packet to a destination asks for an SA; later ones wait quietly.
        assert!(held.hold(a, &[1], now));
        for i in 0..10u8 {
            assert!(!held.hold(a, &[i], now));
        }
        assert!(held.hold(b, &[2], now));
        let net: IpNet = "10.1.1.0/24".parse().unwrap();
        let released = held.take_covered(&[net]);
        assert_eq!(released.len(), HELD_PER_DST);
        assert!(held.take_covered(&[net]).is_empty());
        // Too many destinations: the oldest is dropped.
        for i in 0..HELD_DSTS as u32 {
            held.hold(IpAddr::from(std::net::Ipv4Addr::from(0x0a02_0000 + i)), &[0], now);
        }
        assert_eq!(held.by_dst.len(), HELD_DSTS);
        assert!(held.take_covered(&["10.1.2.0/24".parse().unwrap()]).is_empty());
    }

    #[test]
    fn held_packets_tell_which_another_member_forwarded() {
        let mut held = HeldPackets::default();
        let now = Instant::now();
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        assert!(held.hold(a, &[1], now));
        assert!(!held.hold_relayed(a, &[2], now, true));
        let released = held.take_covered_relayed(&["10.1.1.0/24".parse().unwrap()]);
        // Only the LAN's own packet may go on to another member (one hop).
        assert_eq!(released, vec![(vec![1], false), (vec![2], true)]);
    }

    #[test]
    fn traffic_still_waiting_after_a_while_asks_for_an_sa_again() {
        let mut held = HeldPackets::default();
        let now = Instant::now();
        let a: IpAddr = "10.1.1.1".parse().unwrap();
        assert!(held.hold(a, &[1], now));
        assert!(!held.hold(a, &[2], now + HELD_FOR / 2));
        // The attempt that first packet started is over by now (failed, or the SA went):
        // the stale packets go, the new one waits and asks again.
        assert!(held.hold(a, &[3], now + HELD_FOR));
        assert!(!held.hold(a, &[4], now + HELD_FOR));
        let released = held.take_covered(&["10.1.1.0/24".parse().unwrap()]);
        assert_eq!(released, vec![vec![3], vec![4]]);
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_gso_batch_takes_equal_packets_of_one_peer_and_one_shorter_last() {
        let mut b = GsoBatch::new();
        assert!(
            b.accepts(peer(1), true, 1500, 64),
            "an empty batch takes anything"
        );
        b.push(peer(1), true, 1500);
        assert!(b.accepts(peer(1), true, 1500, 64));
        assert!(!b.accepts(peer(2), true, 1500, 64), "another peer");
        assert!(!b.accepts(peer(1), false, 1500, 64), "plain ESP: another socket");
        assert!(
            !b.accepts(peer(1), true, 1501, 64),
            "longer than the segment size"
        );
        assert!(
            !b.accepts(peer(1), true, 1500, 1),
            "no GSO: one datagram per send"
        );
        b.push(peer(1), true, 700);
        assert!(
            !b.accepts(peer(1), true, 700, 64),
            "nothing after a shorter packet"
        );
        assert_eq!((b.count, b.len, b.stride), (2, 2200, 1500));
    }

    /// Seals (well, writes) a packet of `len` bytes of `fill` to `to` through `batches`.
    async fn queue(batches: &mut Batches, out: &Sockets, to: SocketAddr, fill: u8, len: usize) {
        let counters = DataplaneCounters::default();
        let b = batches.for_packet(to, true, len, 64, out, &counters).await;
        b.slot()[..len].fill(fill);
        b.push(to, true, len);
    }

    #[tokio::test]
    async fn batches_of_interleaved_peers_go_out_together_each_in_order() {
        let peers: Vec<std::net::UdpSocket> = (0..=OPEN_BATCHES)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for p in &peers {
            p.set_nonblocking(true).unwrap();
        }
        let to = |i: usize| peers[i].local_addr().unwrap();
        let sock = super::super::io::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let out = Sockets {
            udp: Some(Arc::new(Udp::new(Arc::new(sock)).unwrap())),
            raw: None,
        };
        let got = |i: usize| -> Vec<(u8, usize)> {
            let mut buf = [0u8; 2048];
            std::iter::from_fn(|| peers[i].recv(&mut buf).ok().map(|n| (buf[0], n))).collect()
        };
        let mut batches = Batches::default();
        // Two peers' packets interleaved, as one TUN read of two tunnels hands them over.
        for k in 0..3u8 {
            queue(&mut batches, &out, to(0), 10 + k, 100).await;
            queue(&mut batches, &out, to(1), 20 + k, 100).await;
        }
        assert_eq!(batches.open.len(), 2, "one batch per peer");
        // Nothing left before the flush; after it (loopback delivers at once) each peer has
        // its packets in order.
        assert!(got(0).is_empty() && got(1).is_empty());
        batches.flush(&out, &DataplaneCounters::default()).await;
        let wait = |i: usize, want: Vec<(u8, usize)>| {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(2);
            while seen.len() < want.len() && Instant::now() < deadline {
                seen.extend(got(i));
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(seen, want, "peer {i}");
        };
        wait(0, vec![(10, 100), (11, 100), (12, 100)]);
        wait(1, vec![(20, 100), (21, 100), (22, 100)]);
        // More peers than open batches: the first ones are sent to make room.
        for i in 0..=OPEN_BATCHES {
            queue(&mut batches, &out, to(i), 1, 50).await;
        }
        assert_eq!(batches.open.len(), OPEN_BATCHES);
        wait(0, vec![(1, 50)]);
        batches.flush(&out, &DataplaneCounters::default()).await;
        wait(OPEN_BATCHES, vec![(1, 50)]);
    }

    #[test]
    fn a_gso_batch_stays_under_the_datagram_limit() {
        let mut b = GsoBatch::new();
        let mut n = 0;
        while b.accepts(peer(1), true, 1470, 64) {
            b.push(peer(1), true, 1470);
            n += 1;
        }
        assert_eq!(n, MAX_GSO_BYTES / 1470);
        assert!(b.len <= MAX_GSO_BYTES);
        // A packet too long to share a send still goes out, alone.
        let mut big = GsoBatch::new();
        assert!(big.accepts(peer(1), true, sealed_len(65535), 64));
        assert!(big.slot().len() >= sealed_len(65535));
    }

    #[test]
    fn the_backlog_of_other_members_packets_is_bounded_and_given_back() {
        let queued = Arc::new(AtomicUsize::new(0));
        let most = Backlog::take(&queued, BACKLOG_LIMIT - 1).expect("room");
        let one = Backlog::take(&queued, 1).expect("the last place");
        assert!(Backlog::take(&queued, 1).is_none(), "past the limit");
        assert_eq!(queued.load(Ordering::Relaxed), BACKLOG_LIMIT);
        drop(one);
        assert!(Backlog::take(&queued, 2).is_none(), "two do not fit in one place");
        let again = Backlog::take(&queued, 1).expect("a place given back");
        drop((most, again));
        assert_eq!(queued.load(Ordering::Relaxed), 0);
    }
}
