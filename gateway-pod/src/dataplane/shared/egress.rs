//! Egress: TUN reads sealed into ESP, batched per peer (UDP GSO) and sent together.

use concentrator_fleet::wire::Kind;

use crate::dataplane::mss::MssClamp;

use super::*;

/// Segments one TUN read may yield (a 64 KiB super-packet in segments of a small MSS).
pub(super) const TUN_READ_SEGMENTS: usize = 128;

/// ESP packets sealed back to back for one UDP send: all to one peer, all of one length
/// except the last, which may be shorter (the rule of UDP GSO).
pub(super) struct GsoBatch {
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
    pub(super) count: usize,
    pub(super) stride: usize,
    pub(super) peer: SocketAddr,
    /// ESP in UDP, or plain ESP (the raw socket).
    pub(super) udp_encap: bool,
    /// A shorter packet went in last: nothing may follow it.
    pub(super) closed: bool,
}

impl GsoBatch {
    pub(super) fn new() -> Self {
        Self {
            buf: vec![0; MAX_GSO_BYTES.max(sealed_len(65536))],
            len: 0,
            count: 0,
            stride: 0,
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            udp_encap: true,
            closed: false,
        }
    }

    /// Can a packet of `sealed` bytes to `peer` join the batch?
    pub(super) fn accepts(
        &self,
        peer: SocketAddr,
        udp_encap: bool,
        sealed: usize,
        max_segments: usize,
    ) -> bool {
        self.count == 0
            || (self.peer == peer
                && self.udp_encap == udp_encap
                && !self.closed
                && sealed <= self.stride
                && self.count < max_segments
                && self.len + sealed <= MAX_GSO_BYTES)
    }

    /// Where the next packet is sealed.
    pub(super) fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Takes in the packet just sealed into [`Self::slot`].
    pub(super) fn push(&mut self, peer: SocketAddr, udp_encap: bool, sealed: usize) {
        if self.count == 0 {
            self.peer = peer;
            self.udp_encap = udp_encap;
            self.stride = sealed;
        } else if sealed < self.stride {
            self.closed = true;
        }
        self.len += sealed;
        self.count += 1;
    }

    /// The batch as one message of a `sendmmsg`.
    pub(super) fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            to: self.peer,
            contents: &self.buf[..self.len],
            segment: (self.count > 1).then_some(self.stride),
        }
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
        self.closed = false;
    }

    /// Counts (or logs) what the send of this batch did.
    pub(super) fn sent(&self, r: std::io::Result<()>, counters: &DataplaneCounters) {
        match r {
            Ok(()) => {
                counters.packets_out.inc_by(self.count as u64);
            }
            // One unreachable peer must not stop the others' traffic.
            Err(e) => tracing::debug!(peer = %self.peer, error = %e, "ESP send failed"),
        }
    }

    /// Sends this batch alone (its peer's next packet cannot join it).
    pub(super) async fn flush(&mut self, sockets: &Sockets, counters: &DataplaneCounters) {
        if self.count == 0 {
            return;
        }
        // SAs are only installed where their socket exists (DataplaneHandle::carries).
        match sockets.for_sa(self.udp_encap) {
            Some(sock) => {
                sock.send_many(&[self.outgoing()], |_, r| self.sent(r, counters))
                    .await
            }
            None => tracing::debug!(udp_encap = self.udp_encap, "no socket for this kind of ESP"),
        }
        self.clear();
    }
}

/// GSO batches of several peers open at once (one egress read of many tunnels' traffic),
/// at most this many.
pub(super) const OPEN_BATCHES: usize = 16;

/// The open GSO batches of an egress worker, at most one per peer and encapsulation.
#[derive(Default)]
pub(super) struct Batches {
    pub(super) open: Vec<GsoBatch>,
    /// Indices of the batches a flush sends, kept for the capacity.
    pub(super) sent: Vec<usize>,
}

impl Batches {
    /// The batch that a packet of `sealed` bytes to `peer` goes into, sending what must go
    /// first: that peer's batch if the packet cannot join it (so the peer's packets keep
    /// their order), or every batch when all are taken by other peers.
    pub(super) async fn for_packet(
        &mut self,
        peer: SocketAddr,
        udp_encap: bool,
        sealed: usize,
        max_segments: usize,
        sockets: &Sockets,
        counters: &DataplaneCounters,
    ) -> &mut GsoBatch {
        let same = |b: &GsoBatch| b.count > 0 && b.peer == peer && b.udp_encap == udp_encap;
        let i = if let Some(i) = self.open.iter().position(same) {
            if !self.open[i].accepts(peer, udp_encap, sealed, max_segments) {
                self.open[i].flush(sockets, counters).await;
            }
            i
        } else if let Some(i) = self.open.iter().position(|b| b.count == 0) {
            i
        } else if self.open.len() < OPEN_BATCHES {
            self.open.push(GsoBatch::new());
            self.open.len() - 1
        } else {
            self.flush(sockets, counters).await;
            0
        };
        &mut self.open[i]
    }

    /// Sends every open batch: one `sendmmsg` per socket.
    pub(super) async fn flush(&mut self, sockets: &Sockets, counters: &DataplaneCounters) {
        for udp_encap in [true, false] {
            self.sent.clear();
            self.sent.extend(
                self.open
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.count > 0 && b.udp_encap == udp_encap)
                    .map(|(i, _)| i),
            );
            if self.sent.is_empty() {
                continue;
            }
            match sockets.for_sa(udp_encap) {
                Some(sock) => {
                    let msgs: Vec<Outgoing<'_>> =
                        self.sent.iter().map(|i| self.open[*i].outgoing()).collect();
                    let open = &self.open;
                    let sent = &self.sent;
                    sock.send_many(&msgs, |k, r| open[sent[k]].sent(r, counters))
                        .await;
                }
                // SAs are only installed where their socket exists (DataplaneHandle::carries).
                None => tracing::debug!(udp_encap, "no socket for this kind of ESP"),
            }
            for i in &self.sent {
                self.open[*i].clear();
            }
        }
    }
}

/// Per-packet errors of tun-rs (a malformed GSO packet) carry no OS error code; those of the
/// device itself do.
pub(super) fn device_failed(e: &std::io::Error) -> bool {
    e.raw_os_error().is_some()
}

/// One egress worker's state: its SA table, held packets, GSO batch and buffers.
pub(super) struct Egress {
    pub(super) dev: Arc<tun_rs::AsyncDevice>,
    pub(super) out: Sockets,
    /// Our address on the outer side (unspecified: any), for path MTU queries.
    pub(super) local_ip: IpAddr,
    pub(super) table: OutboundTable,
    pub(super) held: HeldPackets,
    pub(super) batches: Batches,
    /// Where "packet too big" errors are built, after room for a virtio-net header.
    pub(super) icmp: Vec<u8>,
    pub(super) events: mpsc::UnboundedSender<SaEvent>,
    pub(super) counters: DataplaneCounters,
    /// In a fleet: where packets for sites that write to another member go, and the buffer
    /// they are sealed in.
    pub(super) fleet: Option<(Link, Vec<u8>)>,
    /// How the MSS of TCP flows through the tunnels is clamped.
    pub(super) mss: MssClamp,
    /// Site subnets whose tunnel another member holds (`None`: no member), until when (see
    /// [`ELSEWHERE_FOR`], [`NOT_HELD_FOR`]).
    pub(super) elsewhere: Vec<(IpNet, Option<MemberId>, Instant)>,
}

// The task's whole wiring, handed over once at spawn: a struct would only be unpacked here.
#[allow(clippy::too_many_arguments)]
pub(super) async fn egress(
    dev: Arc<tun_rs::AsyncDevice>,
    tun_name: String,
    out: Sockets,
    mut commands: mpsc::UnboundedReceiver<EgressCommand>,
    acquire: mpsc::Sender<IpAddr>,
    events: mpsc::UnboundedSender<SaEvent>,
    counters: DataplaneCounters,
    fleet: Option<Link>,
    mss: MssClamp,
) -> Result<(), DataplaneError> {
    let tun_err = |e| DataplaneError::Tun(tun_name.clone(), e);
    let local_ip = out.local_ip();
    let mut w = Egress {
        dev: dev.clone(),
        out,
        local_ip,
        table: OutboundTable::default(),
        held: HeldPackets::default(),
        batches: Batches::default(),
        icmp: vec![0u8; VIRTIO_NET_HDR_LEN + icmp::MAX_ERROR_LEN],
        events,
        counters,
        fleet: fleet.map(|l| (l, vec![0u8; 65536 + 64])),
        mss,
        elsewhere: Vec::new(),
    };
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    // Pages of these buffers are only committed once a packet of that size lands in them.
    let mut segs: Vec<Vec<u8>> = (0..2 * TUN_READ_SEGMENTS).map(|_| vec![0u8; 65535]).collect();
    let mut sizes = vec![0usize; segs.len()];
    loop {
        let mut n = tokio::select! {
            biased;
            cmd = commands.recv() => {
                match cmd {
                    Some(EgressCommand::Install(sa, subnets)) => w.install(sa, subnets).await,
                    Some(EgressCommand::Remove(id)) => w.table.remove(id),
                    Some(EgressCommand::Changes(changes)) => {
                        for c in changes.iter() {
                            match c {
                                SaChange::Install(_, sa, subnets) => w.install(sa.clone(), subnets.clone()).await,
                                SaChange::Remove(id) => w.table.remove(*id),
                            }
                        }
                    }
                    Some(EgressCommand::Elsewhere(subnet, member)) => {
                        let now = Instant::now();
                        w.elsewhere.retain(|(n, _, until)| *n != subnet && *until > now);
                        let hold = if member.is_some() { ELSEWHERE_FOR } else { NOT_HELD_FOR };
                        w.elsewhere.push((subnet, member, now + hold));
                        w.forward_held(subnet, now);
                    }
                    Some(EgressCommand::Plain(mut packet, _backlog)) => {
                        let now = Instant::now();
                        // Sealed here or held for our tunnel: never forwarded again (one
                        // hop, so no loop between members that disagree).
                        if let Some(dst) = w.seal(&mut packet, now).await {
                            w.hold_relayed_and_ask(dst, &packet, now, &acquire);
                        }
                        w.flush().await;
                    }
                    None => return Ok(()),
                }
                continue;
            }
            r = dev.recv_multiple(&mut original, &mut segs[..TUN_READ_SEGMENTS], &mut sizes[..TUN_READ_SEGMENTS], 0) => match r {
                Ok(n) => n,
                Err(e) if device_failed(&e) => return Err(tun_err(e)),
                Err(e) => {
                    tracing::debug!(tun = %tun_name, error = %e, "malformed packet from the TUN device");
                    continue;
                }
            },
        };
        // Whatever else is already queued joins the batch (small packets such as TCP ACKs
        // then share a GSO send too).
        while n <= segs.len() - TUN_READ_SEGMENTS {
            let end = n + TUN_READ_SEGMENTS;
            match dev.try_recv_multiple(&mut original, &mut segs[n..end], &mut sizes[n..end], 0) {
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if device_failed(&e) => return Err(tun_err(e)),
                Err(e) => {
                    tracing::debug!(tun = %tun_name, error = %e, "malformed packet from the TUN device");
                }
            }
        }
        let now = Instant::now();
        for (seg, &size) in segs.iter_mut().zip(&sizes).take(n) {
            let packet = &mut seg[..size];
            if let Some(dst) = w.seal(packet, now).await {
                // The kernel's own link traffic on the TUN device (router solicitations, MLD)
                // that no SA covers: not a tunnel's packet, nothing to ask for or count.
                if ip::link_scoped(dst) {
                    continue;
                }
                // Another member holds the site's tunnel: the packet goes there.
                if w.forward_plain(packet, Some(dst), now) {
                    continue;
                }
                w.hold_and_ask(dst, packet, now, &acquire);
            }
        }
        w.flush().await;
    }
}

impl Egress {
    /// Carries packets toward `subnets` through `sa` from now on, those held for it first.
    async fn install(&mut self, sa: Arc<OutboundSa>, subnets: Vec<IpNet>) {
        let waiting = self.held.take_covered(&subnets);
        let now = Instant::now();
        self.table.install(sa, subnets, PathMtu::unprobed());
        if waiting.is_empty() {
            return;
        }
        for mut packet in waiting {
            if self.seal(&mut packet, now).await.is_some() {
                self.counters.no_sa.inc();
            }
        }
        self.flush().await;
    }

    /// Sends what this worker has sealed: its GSO batches to sites, and its frames to other
    /// members.
    async fn flush(&mut self) {
        self.batches.flush(&self.out, &self.counters).await;
        if let Some((link, _)) = self.fleet.as_mut() {
            link.flush();
        }
    }

    /// No SA for a packet toward `dst`: never sent in clear. The control plane is asked for
    /// one (the initiator path) and the packet waits in a small bounded queue meanwhile.
    fn hold_and_ask(&mut self, dst: IpAddr, packet: &[u8], now: Instant, acquire: &mpsc::Sender<IpAddr>) {
        self.counters.no_sa.inc();
        if self.held.hold(dst, packet, now) {
            let _ = acquire.try_send(dst);
        }
    }

    /// [`Self::hold_and_ask`] for a packet another member forwarded here: should the site
    /// turn out to be held by a third member, it is dropped rather than forwarded on (one
    /// hop, so no loop between members whose views differ).
    fn hold_relayed_and_ask(
        &mut self,
        dst: IpAddr,
        packet: &[u8],
        now: Instant,
        acquire: &mpsc::Sender<IpAddr>,
    ) {
        self.counters.no_sa.inc();
        if self.held.hold_relayed(dst, packet, now, true) {
            let _ = acquire.try_send(dst);
        }
    }

    /// The packets waiting for a tunnel toward `subnet`, now known to be held elsewhere
    /// or nowhere: forwarded, or dropped (those another member forwarded here, and those
    /// of a site no member holds).
    fn forward_held(&mut self, subnet: IpNet, now: Instant) {
        for (packet, relayed) in self.held.take_covered_relayed(&[subnet]) {
            if relayed {
                if let Some((link, _)) = self.fleet.as_ref() {
                    link.metrics().drop(RELAYED);
                }
                continue;
            }
            self.forward_plain(&packet, h_dst(&packet), now);
        }
    }

    /// Sends `packet` (toward `dst`) to the member that holds its site's tunnel, if another
    /// member does as far as we know: true if it went (or was dropped) that way. A site no
    /// member holds (and that we may not connect to) has its packets dropped and counted.
    fn forward_plain(&mut self, packet: &[u8], dst: Option<IpAddr>, now: Instant) -> bool {
        let Some(dst) = dst else { return false };
        let Some((_, member, until)) = self.elsewhere.iter().find(|(n, _, _)| n.contains(&dst)) else {
            return false;
        };
        if *until <= now {
            // Asked again (the acquire path): the site may have moved since.
            self.elsewhere.retain(|(_, _, until)| *until > now);
            return false;
        }
        let member = *member;
        let Some((link, _)) = self.fleet.as_mut() else {
            return false;
        };
        let Some(member) = member else {
            link.metrics().drop(NOT_HELD);
            return true;
        };
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        match link.view().address(member) {
            Some(to) => {
                link.send(Kind::Plain, to, unspecified, unspecified, 0, packet);
            }
            None => {
                link.metrics().drop("member_gone");
                // The next packet asks again: the site's tunnel may go on at another member
                // already (a take-over), rather than in 30 s.
                self.elsewhere.retain(|(_, m, _)| *m != Some(member));
            }
        }
        true
    }

    /// Seals `packet` with the SA of its destination into the batch, sending the batch first
    /// if the packet cannot join it. Returns the destination when no SA covers it (nothing is
    /// counted then: the caller decides between holding and dropping).
    ///
    /// A packet whose ESP-in-UDP datagram would be longer than the path MTU toward the peer
    /// is sent alone, for the kernel to fragment (UDP GSO segments may not exceed the MTU),
    /// unless it may not be fragmented (IPv4 with DF, IPv6 above 1280 bytes): then it is
    /// dropped and its sender gets "fragmentation needed" / "packet too big" with the longest
    /// inner packet that fits, so that path MTU discovery works through the tunnel. TSO
    /// super-packets are split to their MSS before they get here, so only segments that are
    /// too long themselves are refused.
    pub(super) async fn seal(&mut self, packet: &mut [u8], now: Instant) -> Option<IpAddr> {
        let (Some(nh), Some(h)) = (next_header_for(packet), ip::parse(packet)) else {
            return None;
        };
        let Some(entry) = self.table.lookup(h.dst) else {
            return Some(h.dst);
        };
        let sa = &entry.sa;
        self.mss.apply(packet, |room| sa.sa.max_inner_len(room));
        let packet = &*packet;
        let sealed = sa.sa.sealed_len(packet.len());
        let room = entry
            .path
            .get(self.local_ip, sa.peer, now)
            .saturating_sub(outer_overhead(sa.peer, !sa.udp_encap));
        let alone = sealed > room;
        if alone && icmp::must_not_fragment(packet) {
            self.counters.too_big.inc();
            let mtu = sa.sa.max_inner_len(room);
            let off = if self.dev.tcp_gso() { VIRTIO_NET_HDR_LEN } else { 0 };
            // A zeroed virtio-net header: no offload asked for this packet.
            self.icmp[..off].fill(0);
            if let Some(n) = icmp::too_big(packet, mtu, &mut self.icmp[off..])
                && let Err(e) = self.dev.send(&self.icmp[..off + n]).await
            {
                tracing::debug!(error = %e, "ICMP error to the TUN device failed");
            }
            return None;
        }
        if let Some(member) = sa.via.get() {
            // The site writes to another member of the fleet: out through it.
            let sent = match (&mut self.fleet, sa.udp_encap) {
                (Some((link, buf)), true) => match (link.view().address(member), sa.sa.seal(packet, nh, buf))
                {
                    (Some(to), Ok(len)) => {
                        let local = self.out.udp.as_ref().map_or(sa.peer, |u| u.local_addr());
                        link.queue(Kind::Egress, to, local, sa.peer, 0, &buf[..len])
                    }
                    _ => false,
                },
                // Plain ESP is not forwarded (a fleet's front carries UDP only).
                _ => false,
            };
            let expiry = if sent {
                sa.counters.count_out(packet.len(), now)
            } else {
                self.counters.invalid.inc();
                Expiry::Fine
            };
            let id = sa.id;
            if crossed(expiry, id, &self.counters, &self.events) {
                self.table.remove(id);
            }
            return None;
        }
        // A packet that goes alone gets a batch of its own (a single datagram, no GSO).
        let max_segments = if alone {
            1
        } else {
            self.out.for_sa(sa.udp_encap).map_or(1, Udp::max_gso_segments)
        };
        let batch = self
            .batches
            .for_packet(
                sa.peer,
                sa.udp_encap,
                sealed,
                max_segments,
                &self.out,
                &self.counters,
            )
            .await;
        // A packet that the sequence counter can no longer carry is dropped: the SA must be
        // rekeyed (by IKE) before that.
        let expiry = match sa.sa.seal(packet, nh, batch.slot()) {
            Ok(len) => {
                batch.push(sa.peer, sa.udp_encap, len);
                if alone {
                    batch.closed = true;
                }
                sa.counters.count_out(packet.len(), now)
            }
            Err(concentrator_esp::EspError::SequenceCeiling) => {
                if sa.counters.is_frozen() {
                    self.counters.handover.inc();
                } else {
                    self.counters.seq_ceiling.inc();
                }
                Expiry::Fine
            }
            Err(_) => {
                self.counters.invalid.inc();
                Expiry::Fine
            }
        };
        let id = sa.id;
        if crossed(expiry, id, &self.counters, &self.events) {
            self.table.remove(id);
        }
        None
    }
}

/// Packets waiting for an SA, per destination: a few each, for a bounded number of
/// destinations (the oldest destination goes first when full).
#[derive(Default)]
pub(super) struct HeldPackets {
    /// Order, since when, and the packets, each with whether another member forwarded it.
    pub(super) by_dst: std::collections::HashMap<IpAddr, (u64, Instant, Vec<HeldPacket>)>,
    pub(super) order: u64,
}

/// A packet waiting for an SA, and whether another member forwarded it here.
type HeldPacket = (Vec<u8>, bool);

/// Packets held per destination and destinations held at once.
pub(super) const HELD_PER_DST: usize = 4;
pub(super) const HELD_DSTS: usize = 256;
/// How long packets toward a site go to the member that holds its tunnel before the next
/// one asks again (through an acquire: the site may have moved or gone meanwhile).
const ELSEWHERE_FOR: Duration = Duration::from_secs(30);
/// How long packets toward a site no member holds are dropped before the next one asks
/// again: short, as the site may connect (to any member) at any moment.
const NOT_HELD_FOR: Duration = HELD_FOR;

/// `fleet_forward_dropped_total` reasons: toward a site no member holds; forwarded here
/// for a site a third member holds (never forwarded on).
const NOT_HELD: &str = "not_held";
const RELAYED: &str = "relayed";

/// How long packets wait for an SA. After that a new packet asks again: the control plane's
/// attempt may have failed (site lookup refused, peer unreachable) and traffic that is still
/// flowing deserves another one.
pub(super) const HELD_FOR: Duration = Duration::from_secs(3);

impl HeldPackets {
    /// Holds a packet; true if its destination was not waiting yet, or waited too long
    /// (ask for an SA).
    pub(super) fn hold(&mut self, dst: IpAddr, packet: &[u8], now: Instant) -> bool {
        self.hold_relayed(dst, packet, now, false)
    }

    /// [`Self::hold`], `relayed`: another member forwarded the packet here.
    pub(super) fn hold_relayed(&mut self, dst: IpAddr, packet: &[u8], now: Instant, relayed: bool) -> bool {
        if let Some((_, since, q)) = self.by_dst.get_mut(&dst) {
            if now.saturating_duration_since(*since) < HELD_FOR {
                if q.len() < HELD_PER_DST {
                    q.push((packet.to_vec(), relayed));
                }
                return false;
            }
            self.by_dst.remove(&dst);
        }
        if self.by_dst.len() >= HELD_DSTS
            && let Some(oldest) = self
                .by_dst
                .iter()
                .min_by_key(|(_, (o, _, _))| *o)
                .map(|(d, _)| *d)
        {
            self.by_dst.remove(&oldest);
        }
        self.order += 1;
        self.by_dst
            .insert(dst, (self.order, now, vec![(packet.to_vec(), relayed)]));
        true
    }

    /// The held packets an SA for `subnets` now carries.
    pub(super) fn take_covered(&mut self, subnets: &[IpNet]) -> Vec<Vec<u8>> {
        self.take_covered_relayed(subnets)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// The held packets toward `subnets`, each with whether another member forwarded it.
    pub(super) fn take_covered_relayed(&mut self, subnets: &[IpNet]) -> Vec<(Vec<u8>, bool)> {
        let dsts: Vec<IpAddr> = self
            .by_dst
            .keys()
            .filter(|d| subnets.iter().any(|n| n.contains(*d)))
            .copied()
            .collect();
        dsts.into_iter()
            .filter_map(|d| self.by_dst.remove(&d))
            .flat_map(|(_, _, q)| q)
            .collect()
    }
}

/// The destination of an IP packet, if it parses.
fn h_dst(packet: &[u8]) -> Option<IpAddr> {
    ip::parse(packet).map(|h| h.dst)
}
