//! Ingress: ESP received in batches (recvmmsg, GRO), opened and written to the TUN device
//! coalesced; IKE messages on port 4500 handed to the control plane.

use concentrator_fleet::Shard;
use concentrator_fleet::wire::Kind;

use super::*;
use crate::cluster::Route;
use crate::dataplane::mss::MssClamp;

/// Datagrams one receive call may return (each buffer one datagram or a GRO batch).
pub(super) const UDP_BATCH: usize = 8;
/// Inner packets written to the TUN device per `send_multiple` (coalesced by TCP GRO).
pub(super) const TUN_BATCH: usize = 128;
/// Where an inner packet starts in its TUN buffer: room for the virtio-net header before it.
/// An AES-GCM or ChaCha20 packet opened in place has its inner packet right there (ESP
/// header and IV are 16 bytes), so it needs no move.
pub(super) const TUN_OFFSET: usize = 16;
const _: () = assert!(TUN_OFFSET >= VIRTIO_NET_HDR_LEN);

#[allow(clippy::too_many_arguments)]
pub(super) async fn ingress(
    dev: Arc<tun_rs::AsyncDevice>,
    tun_name: String,
    udp: Arc<Udp>,
    local: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<IngressCommand>,
    ike: Arc<dyn IkeSink>,
    events: mpsc::UnboundedSender<SaEvent>,
    counters: DataplaneCounters,
    mut fleet: Option<Link>,
    mss: MssClamp,
) -> Result<(), DataplaneError> {
    let mut table = InboundTable::default();
    let mut recv_bufs: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; RECV_BUF_LEN]).collect();
    let mut meta = vec![RecvMeta::default(); UDP_BATCH];
    // GRO appends coalesced segments to the first packet's buffer: room for 64 KiB.
    let mut tun_bufs: Vec<Vec<u8>> = (0..TUN_BATCH)
        .map(|_| Vec::with_capacity(2 * TUN_OFFSET + 65536))
        .collect();
    let mut gro = GROTable::default();
    loop {
        let received = {
            let mut slices: Vec<IoSliceMut<'_>> = recv_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    match cmd {
                        Some(IngressCommand::Install(sa)) => table.install(sa),
                        Some(IngressCommand::Remove(spi)) => table.remove(spi),
                        Some(IngressCommand::Changes(changes)) => {
                            for c in changes.iter() {
                                match c {
                                    SaChange::Install(sa, _, _) => table.install(sa.clone()),
                                    SaChange::Remove(spi) => table.remove(*spi),
                                }
                            }
                        }
                        Some(IngressCommand::Forwarded(batch, _backlog)) => {
                            let now = Instant::now();
                            let mut ready = 0;
                            for (remote, via, datagram) in &batch {
                                // Read by an IKE worker's socket (not forwarded): another
                                // member's SA goes to it, as from our own socket.
                                if via.is_none()
                                    && table.get(spi_of(datagram)).is_none()
                                    && to_owner(&mut fleet, local, *remote, spi_of(datagram), datagram)
                                {
                                    continue;
                                }
                                if ready == tun_bufs.len() {
                                    write_tun(&dev, &tun_name, &mut gro, &mut tun_bufs[..ready], &counters).await;
                                    ready = 0;
                                }
                                match open_into(&table, datagram, *via, now, &mut tun_bufs[ready], &events, &counters, mss) {
                                    Opened::Dropped => continue,
                                    Opened::Last => table.remove(spi_of(datagram)),
                                    Opened::Ready => {}
                                }
                                tracing::trace!(%remote, ?via, "forwarded ESP opened");
                                ready += 1;
                            }
                            if let Some(link) = fleet.as_mut() {
                                link.flush();
                            }
                            write_tun(&dev, &tun_name, &mut gro, &mut tun_bufs[..ready], &counters).await;
                        }
                        None => return Ok(()),
                    }
                    continue;
                }
                r = udp.recv(&mut slices, &mut meta) => match r {
                    Ok(n) => n,
                    // ICMP errors for earlier sends surface here on Linux; they concern one peer.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(DataplaneError::Udp(local, e)),
                },
            }
        };
        let now = Instant::now();
        let mut ready = 0;
        for (buf, m) in recv_bufs.iter().zip(&meta).take(received) {
            let Some(data) = buf.get(..m.len) else {
                continue;
            };
            let stride = if m.stride == 0 { m.len.max(1) } else { m.stride };
            for datagram in data.chunks(stride) {
                let kind = if udp.is_raw() {
                    // Plain ESP: nothing else arrives on protocol 50.
                    match datagram {
                        [a, b, c, d, _, _, _, _, ..] => Datagram::Esp {
                            spi: u32::from_be_bytes([*a, *b, *c, *d]),
                            packet: datagram,
                        },
                        _ => Datagram::Invalid,
                    }
                } else {
                    classify(datagram)
                };
                let spi = match kind {
                    Datagram::Esp { spi, .. } => spi,
                    Datagram::Ike(payload) => {
                        let d = IkeDatagram {
                            local,
                            remote: m.addr,
                            payload: payload.to_vec(),
                            via: None,
                        };
                        counters.ike_passed_on.inc();
                        if ike.try_send(d).is_err() {
                            counters.ike_overflow.inc();
                        }
                        continue;
                    }
                    Datagram::Keepalive | Datagram::Invalid => continue,
                };
                if table.get(spi).is_none() {
                    // Another member's SA (its shard is in the SPI): forwarded, once.
                    if to_owner(&mut fleet, local, m.addr, spi, datagram) {
                        continue;
                    }
                    counters.unknown_spi.inc();
                    continue;
                }
                if ready == tun_bufs.len() {
                    write_tun(&dev, &tun_name, &mut gro, &mut tun_bufs[..ready], &counters).await;
                    ready = 0;
                }
                match open_into(
                    &table,
                    datagram,
                    None,
                    now,
                    &mut tun_bufs[ready],
                    &events,
                    &counters,
                    mss,
                ) {
                    Opened::Dropped => continue,
                    Opened::Last => table.remove(spi),
                    Opened::Ready => {}
                }
                ready += 1;
            }
        }
        // Other members' packets of this batch cross the pod network together.
        if let Some(link) = fleet.as_mut() {
            link.flush();
        }
        write_tun(&dev, &tun_name, &mut gro, &mut tun_bufs[..ready], &counters).await;
    }
}

/// Queues the ESP `datagram` for the member whose shard holds `spi`, if another member's;
/// `false` when it is not forwarded (standalone, or the SA is ours).
fn to_owner(
    fleet: &mut Option<Link>,
    local: SocketAddr,
    remote: SocketAddr,
    spi: u32,
    datagram: &[u8],
) -> bool {
    let Some(link) = fleet.as_mut() else {
        return false;
    };
    let shard = Shard::of_esp_spi(spi);
    let Route::Member(_, to) = link.view().route(shard) else {
        return false;
    };
    let epoch = link.view().epoch(shard);
    link.queue(Kind::Ingress, to, local, remote, epoch, datagram);
    true
}

/// What became of a datagram.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// Dropped (and counted).
    Dropped,
    /// Opened into the buffer.
    Ready,
    /// Opened, and it was the SA's last packet (a hard volume limit): remove the SA.
    Last,
}

fn spi_of(datagram: &[u8]) -> u32 {
    match datagram {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// Opens the ESP `datagram` with its SA into `out` (the inner packet at [`TUN_OFFSET`]),
/// checking the SA's selectors and counting it. `via`: the member of the fleet that
/// forwarded it (`None`: the site sent it to us), which is where our packets to the site go
/// from now on.
// The per-packet path's whole context, passed as is: a struct would be rebuilt per packet.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_into(
    table: &InboundTable,
    datagram: &[u8],
    via: Option<MemberId>,
    now: Instant,
    out: &mut Vec<u8>,
    events: &mpsc::UnboundedSender<SaEvent>,
    counters: &DataplaneCounters,
    mss: MssClamp,
) -> Opened {
    let spi = spi_of(datagram);
    let Some(sa) = table.get(spi) else {
        counters.unknown_spi.inc();
        return Opened::Dropped;
    };
    if sa.counters.is_frozen() {
        counters.handover.inc();
        return Opened::Dropped;
    }
    out.clear();
    out.extend_from_slice(datagram);
    let Ok(opened) = sa.open(out) else {
        counters.invalid.inc();
        return Opened::Dropped;
    };
    sa.counters.note_inbound_seq(opened.seq);
    let inner = opened.inner;
    let Some(packet) = out.get(inner.clone()) else {
        counters.invalid.inc();
        return Opened::Dropped;
    };
    if !inbound_allowed(packet, &sa.local, &sa.remote) {
        counters.policy.inc();
        return Opened::Dropped;
    }
    // Authenticated: the site's flow comes this way now.
    if sa.via.get() != via {
        sa.via.set(via);
    }
    // The packet that reaches the hard limit is the SA's last.
    let last = crossed(sa.counters.count_in(packet.len(), now), spi, counters, events);
    let len = inner.len();
    if inner.start != TUN_OFFSET {
        if out.len() < TUN_OFFSET + len {
            out.resize(TUN_OFFSET + len, 0);
        }
        out.copy_within(inner, TUN_OFFSET);
    }
    out.truncate(TUN_OFFSET + len);
    if let Some(packet) = out.get_mut(TUN_OFFSET..) {
        mss.apply(packet, |room| sa.sa.max_inner_len(room));
    }
    if last { Opened::Last } else { Opened::Ready }
}

/// Writes opened packets (each at [`TUN_OFFSET`] in its buffer) to the TUN device, TCP
/// segments of one flow coalesced into one write when the device takes vnet headers.
pub(super) async fn write_tun(
    dev: &tun_rs::AsyncDevice,
    tun_name: &str,
    gro: &mut GROTable,
    bufs: &mut [Vec<u8>],
    counters: &DataplaneCounters,
) {
    if bufs.is_empty() {
        return;
    }
    match dev.send_multiple(gro, bufs, TUN_OFFSET).await {
        Ok(_) => {
            counters.packets_in.inc_by(bufs.len() as u64);
        }
        // The kernel refusing a packet (a bad inner header that passed the selectors) must
        // not stop the data plane.
        Err(e) => tracing::debug!(tun = %tun_name, error = %e, "TUN write failed"),
    }
}
