//! An IKE worker's own socket on port 4500, in the port's SO_REUSEPORT group beside the data
//! plane's: the group's program ([`super::steering`]) gives it the IKE messages of this
//! worker's SAs, read here without waking a data plane thread.
//!
//! Its reads are offloaded like the data plane's (UDP GRO, which the kernel decides per
//! group, not per socket), so a batch may carry ESP behind an IKE message of the same site
//! (ESP no longer than the IKE message, e.g. an ACK after a rekey's CREATE_CHILD_SA): that
//! ESP goes to the data plane worker whose socket gets the site's ESP, as if it had read it,
//! and in a fleet on to the member that owns its SA. (The reverse, a short IKE message at
//! the end of a site's ESP batch, reaches a data plane socket and is passed on as before.)

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;

use concentrator_esp::encap::{Datagram, classify};
use quinn_udp::RecvMeta;
use tokio::net::UdpSocket;

use crate::dataplane::io::{RECV_BUF_LEN, Udp};
use crate::dataplane::shared::DataplaneHandle;

/// Receive buffers per read (each a datagram or a GRO batch).
const BATCH: usize = 8;
/// Reads per wake-up at most: what has arrived meanwhile is handled before the worker sends
/// its answers and sleeps again (as on port 500), so a burst of sites costs fewer wake-ups
/// and sends.
const READS: usize = 8;

/// What one read brought for the worker: IKE messages, without the non-ESP marker.
pub(super) type IkeMessages = Vec<(SocketAddr, Vec<u8>)>;

/// The socket, its buffers, and where stray ESP goes.
pub(super) struct NatT {
    udp: Udp,
    local: SocketAddr,
    dataplane: DataplaneHandle,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl NatT {
    /// Reads `sock` (bound in the port's group) from now on.
    pub(super) fn new(sock: Arc<UdpSocket>, dataplane: DataplaneHandle) -> std::io::Result<Self> {
        let local = sock.local_addr()?;
        Ok(Self {
            udp: Udp::new(sock)?,
            local,
            dataplane,
            bufs: (0..BATCH).map(|_| vec![0u8; RECV_BUF_LEN]).collect(),
            meta: vec![RecvMeta::default(); BATCH],
        })
    }

    /// Our address on the port.
    pub(super) fn local(&self) -> SocketAddr {
        self.local
    }

    /// Waits for datagrams; gives back the IKE messages and hands ESP to the data plane.
    /// Cancel-safe: nothing is taken off the socket unless the read completes.
    pub(super) async fn recv(&mut self) -> std::io::Result<IkeMessages> {
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> = self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            self.udp.recv(&mut slices, &mut self.meta).await?
        };
        let mut ike = Vec::new();
        let mut esp = Vec::new();
        self.take(n, &mut ike, &mut esp);
        for _ in 1..READS {
            let n = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    self.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match self.udp.try_recv(&mut slices, &mut self.meta) {
                    Ok(n) => n,
                    // Nothing more (or an error, which the next wait reports).
                    Err(_) => break,
                }
            };
            self.take(n, &mut ike, &mut esp);
        }
        if !esp.is_empty() {
            let count = esp.len();
            let dropped = self.dataplane.received(esp);
            tracing::trace!(
                count,
                dropped,
                "ESP read on an IKE worker's socket passed to the data plane"
            );
        }
        Ok(ike)
    }

    /// Sorts the `n` buffers just read into IKE messages and ESP.
    fn take(&self, n: usize, ike: &mut IkeMessages, esp: &mut Vec<(SocketAddr, Vec<u8>)>) {
        for (buf, m) in self.bufs.iter().zip(&self.meta).take(n) {
            let Some(data) = buf.get(..m.len) else {
                continue;
            };
            let stride = if m.stride == 0 { m.len.max(1) } else { m.stride };
            for datagram in data.chunks(stride) {
                match classify(datagram) {
                    Datagram::Ike(payload) => ike.push((m.addr, payload.to_vec())),
                    Datagram::Esp { packet, .. } => esp.push((m.addr, packet.to_vec())),
                    // The data plane drops these too.
                    Datagram::Keepalive | Datagram::Invalid => {}
                }
            }
        }
    }
}
