//! IKE on every core (issue 21): the IKE SAs are shared out over N control workers, each a
//! [`super::driver::Driver`] with an `Endpoint` of its own, by the IKE SPI we allocate.
//!
//! Every IKE SPI a worker allocates carries its shard ([`Shard::of_ike_spi`], the bits the
//! fleet routes by), and worker `w` of `n` allocates only in the shards `s` with
//! `s % n == w`. So any thread finds the worker of a message from its header alone, with no
//! table and no lock: a new IKE_SA_INIT (responder SPI zero) goes to a worker by a keyed hash
//! of its initiator SPI ([`super::steering::InitKey`]), every other message to the worker whose shards hold
//! the SPI we allocated. An IKE SA stays in its worker for its whole life (rekeyed IKE SAs
//! draw their SPIs in the shard of the first). The kernel makes the same choice for the
//! workers' own sockets ([`super::steering`]), so a message read by a thread normally is
//! that thread's already.
//!
//! What the workers share (egroups, ownership, routes) lives in [`super::shared_state`], locked
//! once per SA established or removed, never per message.

use std::sync::Arc;

use concentrator_fleet::{SHARDS, Shard};
use concentrator_ike::Header;
use tokio::sync::mpsc;

use super::steering::InitKey;
use crate::dataplane::shared::IkeDatagram;

/// The most IKE workers: each needs shards of its own to allocate SPIs in.
pub const MAX_IKE_WORKERS: usize = 64;

const _: () = assert!(MAX_IKE_WORKERS <= SHARDS as usize);

/// IKE workers by default: one, as before workers existed. On the 2-core machine of
/// BENCHMARKS.md two workers gave no more establishments than one (0.92-0.96x per core,
/// the load generator sharing the cores), so more are asked for with `--ike-workers` /
/// `CONCENTRATOR_IKE_WORKERS` until a machine with cores to spare shows the gain.
pub fn default_workers() -> usize {
    1
}

/// Where an IKE message goes: the worker that holds its SA, or picks up a new one. Cheap to
/// clone; each data plane thread and each port 500 reader holds one.
#[derive(Clone, Debug)]
pub struct IkeRouter {
    /// The first worker's queue, also in `workers`.
    first: mpsc::Sender<IkeDatagram>,
    workers: Arc<[mpsc::Sender<IkeDatagram>]>,
    /// Keyed, so that a flood of IKE_SA_INITs cannot be aimed at one worker.
    key: InitKey,
}

impl From<mpsc::Sender<IkeDatagram>> for IkeRouter {
    /// One worker: every message goes to it.
    fn from(tx: mpsc::Sender<IkeDatagram>) -> Self {
        Self::new(tx, Vec::new())
    }
}

impl IkeRouter {
    /// A router to `first` and `others`, in worker order.
    pub(super) fn new(first: mpsc::Sender<IkeDatagram>, others: Vec<mpsc::Sender<IkeDatagram>>) -> Self {
        let workers: Vec<_> = std::iter::once(first.clone()).chain(others).collect();
        Self {
            first,
            workers: workers.into(),
            key: InitKey::random(),
        }
    }

    /// A router over `n` workers whose queues go nowhere, choosing as `key` does.
    #[cfg(test)]
    pub(super) fn for_test(n: usize, key: InitKey) -> Self {
        let (first, _) = mpsc::channel(1);
        let others = (1..n).map(|_| mpsc::channel(1).0).collect();
        Self {
            key,
            ..Self::new(first, others)
        }
    }

    /// The key new IKE SAs are shared out with (the kernel's program uses it too).
    pub(super) fn key(&self) -> InitKey {
        self.key
    }

    /// The first worker's queue (a fleet runs that one only).
    pub(super) fn first(&self) -> &mpsc::Sender<IkeDatagram> {
        &self.first
    }

    /// How many workers there are.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Queues `d` for its worker; `Err` (the datagram back) if that worker's queue is full
    /// or gone, as [`mpsc::Sender::try_send`] would fail.
    pub fn try_send(&self, d: IkeDatagram) -> Result<(), IkeDatagram> {
        let w = self.worker_of(&d.payload);
        match self.workers.get(w) {
            Some(tx) => tx.try_send(d).map_err(|e| e.into_inner()),
            None => Err(d),
        }
    }

    /// The worker of the IKE message `datagram` (without the non-ESP marker).
    pub fn worker_of(&self, datagram: &[u8]) -> usize {
        let n = self.workers.len();
        if n <= 1 {
            return 0;
        }
        // Too short for a header: the engine drops it (and counts it) wherever it goes.
        let Some((h, _)) = Header::peek(datagram) else {
            return 0;
        };
        match h.our_spi() {
            Some(spi) => worker_of_spi(n, spi),
            // The site's address is not in it: the kernel's program (which must agree) sees
            // the payload only.
            None => self.key.worker(n, h.spi_i),
        }
    }
}

impl crate::dataplane::shared::IkeSink for IkeRouter {
    fn try_send(&self, d: IkeDatagram) -> Result<(), IkeDatagram> {
        Self::try_send(self, d)
    }
}

/// The worker, of `n`, whose IKE SA has the inbound ESP SPI `spi` (drawn in its shard:
/// `cluster::GatewayEntropy`).
pub fn worker_of_esp_spi(n: usize, spi: u32) -> usize {
    Shard::of_esp_spi(spi).index() % n.max(1)
}

/// The worker, of `n`, whose shards hold the IKE SPI `spi`.
pub fn worker_of_spi(n: usize, spi: u64) -> usize {
    Shard::of_ike_spi(spi).index() % n.max(1)
}

/// A shard for worker `w` of `n` to allocate a new IKE SA's SPIs in, from `random`; `None`
/// for one worker (any SPI will do).
pub fn shard_for_worker(w: usize, n: usize, random: u64) -> Option<Shard> {
    if n <= 1 {
        return None;
    }
    // Shards w, w + n, w + 2n, ... below SHARDS.
    let count = (usize::from(SHARDS) - w).div_ceil(n) as u64;
    let k = (random % count.max(1)) as usize;
    Shard::new(u16::try_from(w + k * n).ok()?)
}

/// Commands for a worker from the others: the SA-level acts that cross workers (an SA that
/// replaces an older one of the same site held by another worker, an eviction).
#[derive(Clone, Debug)]
pub(super) struct Peers {
    me: usize,
    deletes: Arc<[mpsc::UnboundedSender<u64>]>,
}

impl Peers {
    pub(super) fn new(me: usize, deletes: Arc<[mpsc::UnboundedSender<u64>]>) -> Self {
        Self { me, deletes }
    }

    /// This worker's index.
    pub(super) fn me(&self) -> usize {
        self.me
    }

    /// How many workers there are.
    pub(super) fn count(&self) -> usize {
        self.deletes.len().max(1)
    }

    /// Whether the IKE SA `id` (our first SPI) is this worker's.
    pub(super) fn holds(&self, id: u64) -> bool {
        worker_of_spi(self.count(), id) == self.me
    }

    /// Asks the worker of SA `id` to delete it (IKE DELETE to its peer).
    pub(super) fn delete(&self, id: u64) {
        let w = worker_of_spi(self.count(), id);
        if let Some(tx) = self.deletes.get(w)
            && tx.send(id).is_err()
        {
            tracing::debug!(id, worker = w, "IKE worker gone: SA not deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use concentrator_ike::Flags;

    use super::*;

    fn header(spi_i: u64, spi_r: u64, flags: Flags) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&spi_i.to_be_bytes());
        v.extend_from_slice(&spi_r.to_be_bytes());
        v.extend_from_slice(&[33, 0x20, 35 /* IKE_AUTH */, flags.bits()]);
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&28u32.to_be_bytes());
        v
    }

    fn router(n: usize) -> (IkeRouter, Vec<mpsc::Receiver<IkeDatagram>>) {
        let (mut txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(16)).unzip();
        let first = txs.remove(0);
        (IkeRouter::new(first, txs), rxs)
    }

    #[test]
    fn spis_of_a_worker_route_back_to_it() {
        for n in [1, 2, 3, 7, MAX_IKE_WORKERS] {
            let (r, _rx) = router(n);
            for w in 0..n {
                for random in [0, 1, 12345, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
                    let spi = match shard_for_worker(w, n, random) {
                        Some(s) => s.ike_spi(random | (1 << 20)).unwrap(),
                        None => random | 1,
                    };
                    assert_eq!(worker_of_spi(n, spi), w, "n {n} w {w}");
                    // A request of the initiator: our SPI is the responder's.
                    let m = header(7, spi, Flags::INITIATOR);
                    assert_eq!(r.worker_of(&m), w);
                    // A response to (or a request toward) an SA we started: ours is SPIi.
                    let m = header(spi, 0, Flags::RESPONSE);
                    assert_eq!(r.worker_of(&m), w);
                    let m = header(spi, 9, Flags::NONE);
                    assert_eq!(r.worker_of(&m), w);
                }
            }
        }
    }

    #[test]
    fn new_sites_spread_over_workers_and_keep_theirs() {
        let (r, _rx) = router(2);
        let mut seen = [0usize; 2];
        for spi_i in 1..200u64 {
            let m = header(spi_i, 0, Flags::INITIATOR);
            let w = r.worker_of(&m);
            // A retransmission (or the request again with a cookie) goes to the same one.
            assert_eq!(r.worker_of(&m), w);
            seen[w] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn a_delete_reaches_the_worker_that_holds_the_sa() {
        let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::unbounded_channel()).unzip();
        let txs: Arc<[_]> = txs.into();
        let peers: Vec<_> = (0..3).map(|w| Peers::new(w, txs.clone())).collect();
        for w in 0..3 {
            let spi = shard_for_worker(w, 3, 99)
                .and_then(|s| s.ike_spi(7 << 20))
                .unwrap();
            assert!(peers[w].holds(spi));
            // Asked by another worker: only the holder's queue has it.
            peers[(w + 1) % 3].delete(spi);
            for (v, rx) in rxs.iter_mut().enumerate() {
                assert_eq!(rx.try_recv().ok(), (v == w).then_some(spi));
            }
        }
    }

    #[test]
    fn rejects_nothing_it_cannot_read() {
        let (r, _rx) = router(3);
        for len in 0..28 {
            assert_eq!(r.worker_of(&vec![0xff; len]), 0);
        }
    }

    #[test]
    fn full_queues_give_the_datagram_back() {
        let (tx, _rx) = mpsc::channel(1);
        let r = IkeRouter::from(tx);
        let d = |n: u8| IkeDatagram {
            local: SocketAddr::from(([192, 0, 2, 2], 4500)),
            remote: SocketAddr::from(([192, 0, 2, 1], 4500)),
            payload: vec![n; 40],
            via: None,
        };
        assert!(r.try_send(d(1)).is_ok());
        assert_eq!(r.try_send(d(2)).map_err(|d| d.payload[0]), Err(2));
    }
}
