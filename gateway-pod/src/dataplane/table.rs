//! The SA tables of the shared data plane. Each worker task owns its tables (outbound in the
//! TUN reader, inbound in the UDP reader), so lookups take no lock; the control plane
//! changes every worker's tables through the data plane handle. The SAs themselves are shared
//! by the workers: an outbound SA's sequence number is one atomic counter, an inbound SA's
//! anti-replay window is behind its own mutex (taken by the one worker whose socket the
//! peer's datagrams hash to, so uncontended in practice; never a lock over all SAs).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use concentrator_esp::sa::{Expiry, Lifetime, Selector};
use concentrator_esp::{Inbound, Outbound};
use ipnet::IpNet;

use super::pmtu::PathMtu;
use crate::cluster::Via;

/// Traffic of one CHILD SA, read by the admin API while the data plane counts.
#[derive(Debug)]
pub struct SaCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    /// Milliseconds since `epoch` of the last packet in either direction.
    last_activity_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last authenticated packet from the peer, plus one
    /// (0: none yet).
    last_inbound_ms: AtomicU64,
    epoch: Instant,
    /// Volume limits, checked per direction (time limits are the IKE engine's).
    limits: Lifetime,
    /// Highest sequence number accepted from the peer (replicated in a fleet).
    inbound_top: AtomicU64,
    /// The outbound SA's sequence numbers and ceiling (moved by fleet replication).
    send: Option<Arc<concentrator_esp::SendCounter>>,
    /// Inbound packets are dropped: the SA is being handed to another pod, which starts at
    /// the inbound top read after the freeze.
    frozen: std::sync::atomic::AtomicBool,
}

impl SaCounters {
    pub fn new(now: Instant) -> Self {
        Self::with_limits(now, Lifetime::default())
    }

    /// Counters of an SA with volume limits: [`Self::count_in`] and [`Self::count_out`]
    /// report the packet that crosses one.
    pub fn with_limits(now: Instant, limits: Lifetime) -> Self {
        Self {
            limits,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            packets_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            last_inbound_ms: AtomicU64::new(0),
            epoch: now,
            inbound_top: AtomicU64::new(0),
            send: None,
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same, sharing the outbound SA's sequence numbers.
    #[must_use]
    pub fn sending(mut self, send: Arc<concentrator_esp::SendCounter>) -> Self {
        self.send = Some(send);
        self
    }

    /// Stops (`true`) or resumes (`false`) the SA in both directions: a hand-over to another
    /// member of the fleet.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Release);
        if let Some(s) = &self.send {
            s.freeze(frozen);
        }
    }

    /// Whether inbound packets are dropped ([`Self::freeze`]).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    /// The outbound SA's sequence numbers, if this data plane shares them.
    pub fn send_counter(&self) -> Option<&Arc<concentrator_esp::SendCounter>> {
        self.send.as_ref()
    }

    /// Highest sequence number accepted from the peer so far.
    pub fn inbound_top(&self) -> u64 {
        self.inbound_top.load(Ordering::Relaxed)
    }

    /// Records an authenticated packet's sequence number.
    pub(crate) fn note_inbound_seq(&self, seq: u64) {
        if seq > self.inbound_top.load(Ordering::Relaxed) {
            self.inbound_top.fetch_max(seq, Ordering::Relaxed);
        }
    }

    /// Counts a packet from the peer; says whether it crossed a volume limit of the inbound
    /// SA.
    pub(crate) fn count_in(&self, bytes: usize, now: Instant) -> Expiry {
        let expiry = self.count(&self.bytes_in, &self.packets_in, bytes);
        let ms = self.touch(now);
        self.last_inbound_ms
            .store(ms.saturating_add(1), Ordering::Relaxed);
        expiry
    }

    /// Counts a packet to the peer; says whether it crossed a volume limit of the outbound
    /// SA.
    pub(crate) fn count_out(&self, bytes: usize, now: Instant) -> Expiry {
        let expiry = self.count(&self.bytes_out, &self.packets_out, bytes);
        let _ = self.touch(now);
        expiry
    }

    fn count(&self, bytes: &AtomicU64, packets: &AtomicU64, n: usize) -> Expiry {
        let n = n as u64;
        let b = bytes.fetch_add(n, Ordering::Relaxed);
        let p = packets.fetch_add(1, Ordering::Relaxed);
        if !self.limits.has_volume_limit() {
            return Expiry::Fine;
        }
        self.limits
            .crossed((b, p), (b.saturating_add(n), p.saturating_add(1)))
    }

    fn touch(&self, now: Instant) -> u64 {
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
        ms
    }

    /// When the peer last sent an authenticated packet on this SA, if ever.
    pub fn last_inbound(&self) -> Option<Instant> {
        match self.last_inbound_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + std::time::Duration::from_millis(ms - 1)),
        }
    }

    /// When the SA last carried a packet (its installation if never).
    pub fn last_activity(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }
}

/// The sending half of a CHILD SA.
pub struct OutboundSa {
    /// Our inbound SPI of the same CHILD SA: the name the control plane uses.
    pub id: u32,
    pub sa: Outbound,
    /// Where ESP-in-UDP goes (the peer's IKE address after the float to 4500); with plain
    /// ESP only its address counts.
    pub peer: SocketAddr,
    /// ESP in UDP (RFC 3948); else plain ESP (IP protocol 50).
    pub udp_encap: bool,
    pub counters: Arc<SaCounters>,
    /// In a fleet, the member the site's flow enters through (shared with the inbound
    /// half): packets then go back out through it.
    pub via: Arc<Via>,
}

/// The receiving half of a CHILD SA, as the control plane hands it over.
pub struct InboundSa {
    pub sa: Inbound,
    /// Negotiated TSr (our side) and TSi (the peer's): decrypted packets must fit them.
    pub local: Vec<Selector>,
    pub remote: Vec<Selector>,
    pub counters: Arc<SaCounters>,
    pub via: Arc<Via>,
}

/// A change the control plane asks of the data plane.
pub enum SaCommand {
    /// Carry `subnets` through this CHILD SA (the newest SA for a subnet wins, so a rekeyed
    /// SA takes over before the old one is deleted).
    Install {
        inbound: Box<InboundSa>,
        outbound: Box<OutboundSa>,
        subnets: Vec<IpNet>,
    },
    /// Forget the CHILD SA whose inbound SPI is `spi_in`.
    Remove { spi_in: u32 },
}

/// An outbound SA in a worker's table, with what the worker keeps about it.
pub struct OutboundEntry {
    /// Shared with the other workers.
    pub sa: Arc<OutboundSa>,
    /// The path MTU toward the SA's peer.
    pub(crate) path: PathMtu,
    subnets: Vec<IpNet>,
}

/// Outbound SAs by destination: longest prefix first, one hash lookup per distinct prefix
/// length (a handful in practice, however many sites).
///
/// Every change costs the same with 1 SA or 100,000: the SAs a newer one took a subnet from
/// (a rekey's overlap) wait in `shadowed`, so removing the winner hands its subnet back without
/// looking at any other SA.
#[derive(Default)]
pub struct OutboundTable {
    by_len: BTreeMap<std::cmp::Reverse<u8>, HashMap<IpAddr, u32>>,
    sas: HashMap<u32, OutboundEntry>,
    /// Older holders of a subnet, oldest first (the newest SA wins a subnet); only subnets
    /// with more than one holder have an entry.
    shadowed: HashMap<IpNet, Vec<u32>>,
}

impl OutboundTable {
    pub(crate) fn install(&mut self, sa: Arc<OutboundSa>, subnets: Vec<IpNet>, path: PathMtu) {
        if self.sas.contains_key(&sa.id) {
            // The same SA again (a resumed install): its old subnets go first.
            self.remove(sa.id);
        }
        for net in &subnets {
            let winner = self
                .by_len
                .entry(std::cmp::Reverse(net.prefix_len()))
                .or_default()
                .insert(net.network(), sa.id);
            if let Some(older) = winner.filter(|&w| w != sa.id) {
                self.shadowed.entry(*net).or_default().push(older);
            }
        }
        self.sas.insert(sa.id, OutboundEntry { sa, path, subnets });
    }

    /// Removes the SA; a subnet another SA has taken over since stays with that one.
    pub fn remove(&mut self, id: u32) {
        let Some(OutboundEntry { subnets, .. }) = self.sas.remove(&id) else {
            return;
        };
        for net in subnets {
            let key = std::cmp::Reverse(net.prefix_len());
            let Some(m) = self.by_len.get_mut(&key) else {
                continue;
            };
            let Entry::Occupied(mut older) = self.shadowed.entry(net) else {
                // The only holder.
                if m.get(&net.network()) == Some(&id) {
                    m.remove(&net.network());
                }
                if m.is_empty() {
                    self.by_len.remove(&key);
                }
                continue;
            };
            if m.get(&net.network()) == Some(&id) {
                // The winner goes: the newest older holder takes the subnet back.
                if let Some(next) = older.get_mut().pop() {
                    m.insert(net.network(), next);
                }
            } else {
                older.get_mut().retain(|&o| o != id);
            }
            if older.get().is_empty() {
                older.remove();
            }
        }
    }

    pub fn lookup(&mut self, dst: IpAddr) -> Option<&mut OutboundEntry> {
        let id = self.by_len.iter().find_map(|(len, m)| {
            let net = IpNet::new(dst, len.0).ok()?.trunc();
            m.get(&net.network()).copied()
        })?;
        self.sas.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.sas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sas.is_empty()
    }
}

/// The receiving half of a CHILD SA as the workers share it.
pub(crate) struct SharedInbound {
    pub(crate) spi: u32,
    /// The keys, and the anti-replay window behind its own short lock.
    pub(crate) sa: concentrator_esp::SharedInbound,
    pub(crate) local: Vec<Selector>,
    pub(crate) remote: Vec<Selector>,
    pub(crate) counters: Arc<SaCounters>,
    pub(crate) via: Arc<Via>,
}

impl From<InboundSa> for SharedInbound {
    fn from(i: InboundSa) -> Self {
        Self {
            spi: i.sa.spi(),
            sa: i.sa.into_shared(),
            local: i.local,
            remote: i.remote,
            counters: i.counters,
            via: i.via,
        }
    }
}

impl SharedInbound {
    /// Decrypts and checks `packet` in place (see [`concentrator_esp::SharedInbound::open`]:
    /// no lock is held across the cryptography).
    pub(crate) fn open(
        &self,
        packet: &mut [u8],
    ) -> Result<concentrator_esp::Opened, concentrator_esp::EspError> {
        self.sa.open(packet)
    }
}

/// Inbound SAs by SPI.
#[derive(Default)]
pub(crate) struct InboundTable {
    sas: HashMap<u32, Arc<SharedInbound>>,
}

impl InboundTable {
    pub(crate) fn install(&mut self, sa: Arc<SharedInbound>) {
        self.sas.insert(sa.spi, sa);
    }

    pub(crate) fn remove(&mut self, spi: u32) {
        self.sas.remove(&spi);
    }

    pub(crate) fn get(&self, spi: u32) -> Option<&SharedInbound> {
        self.sas.get(&spi).map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use concentrator_crds::proposal::Encryption;
    use concentrator_crypto::aead::AeadKey;

    use super::*;

    fn out(id: u32) -> Arc<OutboundSa> {
        let key = AeadKey::new(Encryption::AesGcm16 { key_bits: 128 }, &[1; 20]).unwrap();
        Arc::new(OutboundSa {
            id,
            sa: Outbound::new(id + 1000, key, false),
            peer: "192.0.2.1:4500".parse().unwrap(),
            udp_encap: true,
            counters: Arc::new(SaCounters::new(Instant::now())),
            via: Arc::default(),
        })
    }

    fn path() -> PathMtu {
        PathMtu::probe(
            "127.0.0.1".parse().unwrap(),
            "127.0.0.1:4500".parse().unwrap(),
            Instant::now(),
        )
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counters_report_the_packets_that_cross_volume_limits() {
        let c = SaCounters::with_limits(
            Instant::now(),
            Lifetime {
                soft_bytes: Some(3000),
                hard_bytes: Some(6000),
                ..Lifetime::default()
            },
        );
        let now = Instant::now();
        assert_eq!(c.count_in(1400, now), Expiry::Fine);
        assert_eq!(c.count_in(1400, now), Expiry::Fine);
        assert_eq!(c.count_in(1400, now), Expiry::Rekey);
        // Directions are counted apart, as with kernel SAs (one per direction).
        assert_eq!(c.count_out(3500, now), Expiry::Rekey);
        assert_eq!(c.count_in(1400, now), Expiry::Fine);
        assert_eq!(c.count_in(1400, now), Expiry::Expired);
        assert_eq!(c.count_in(1400, now), Expiry::Fine);
        assert_eq!(SaCounters::new(now).count_out(usize::MAX, now), Expiry::Fine);
    }

    #[test]
    fn longest_prefix_wins_and_unknown_destinations_miss() {
        let mut t = OutboundTable::default();
        t.install(out(1), nets(&["10.0.0.0/8"]), path());
        t.install(out(2), nets(&["10.1.2.0/24", "10.1.3.0/24"]), path());
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(2));
        assert_eq!(t.lookup(ip("10.1.3.9")).map(|e| e.sa.id), Some(2));
        assert_eq!(t.lookup(ip("10.1.4.9")).map(|e| e.sa.id), Some(1));
        assert!(t.lookup(ip("192.168.0.1")).is_none());
        t.remove(2);
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(1));
        t.remove(1);
        assert!(t.lookup(ip("10.1.2.9")).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn a_rekeyed_sa_takes_over_and_removing_the_old_one_keeps_it() {
        let mut t = OutboundTable::default();
        t.install(out(1), nets(&["10.1.2.0/24"]), path());
        t.install(out(2), nets(&["10.1.2.0/24"]), path());
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(2));
        t.remove(1);
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(2));
        // And the other order: the new one removed first falls back to the old.
        t.install(out(3), nets(&["10.1.2.0/24"]), path());
        t.remove(3);
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(2));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn three_holders_of_a_subnet_hand_it_back_newest_first() {
        let mut t = OutboundTable::default();
        for id in 1..=3 {
            t.install(out(id), nets(&["10.1.2.0/24"]), path());
        }
        t.remove(2);
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(3));
        t.remove(3);
        assert_eq!(t.lookup(ip("10.1.2.9")).map(|e| e.sa.id), Some(1));
        t.remove(1);
        assert!(t.lookup(ip("10.1.2.9")).is_none());
        assert!(t.is_empty());
        assert!(t.shadowed.is_empty() && t.by_len.is_empty());
    }

    #[test]
    fn many_sites_come_and_go_and_leave_nothing_behind() {
        let mut t = OutboundTable::default();
        let site =
            |i: u32| IpNet::new(IpAddr::from(std::net::Ipv4Addr::from(0x0a80_0000 + (i << 4))), 28).unwrap();
        for i in 0..10_000 {
            t.install(out(i), vec![site(i)], path());
        }
        // A rekey of every tenth site: the new SA takes over, the old one goes.
        for i in (0..10_000).step_by(10) {
            t.install(out(100_000 + i), vec![site(i)], path());
            t.remove(i);
        }
        assert_eq!(t.lookup(ip("10.128.0.1")).map(|e| e.sa.id), Some(100_000));
        assert_eq!(t.lookup(ip("10.128.0.17")).map(|e| e.sa.id), Some(1));
        for id in (0..10_000).chain((0..10_000).step_by(10).map(|i| 100_000 + i)) {
            t.remove(id);
        }
        assert!(t.is_empty() && t.shadowed.is_empty() && t.by_len.is_empty());
    }
}
