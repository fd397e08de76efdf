//! The dynamic eroutes of one egroup on this pod: found by peer ID (a site initiates) or by
//! subnet (traffic toward a site), bounded by `maxDynamicEroutes`, least recently used first
//! out. DESIGN.md: "When fewer than 10% are free, the least recently used dynamic eroutes and
//! their SAs are removed until more than 10% are free."

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use lru::LruCache;

/// Base eroute + one site row, owned by this pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicEroute {
    pub peer_id: String,
    pub egroup: String,
    pub base_eroute: String,
    pub remote_subnet: IpNet,
    pub peer_address: Option<String>,
    pub last_used: Instant,
}

/// Dynamic eroutes of one egroup.
#[derive(Debug)]
pub struct DynamicTable {
    capacity: usize,
    by_peer: LruCache<String, DynamicEroute>,
    by_subnet: HashMap<IpNet, String>,
}

impl DynamicTable {
    /// A table for at most `capacity` (≥ 1) dynamic eroutes.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            capacity: capacity.get(),
            by_peer: LruCache::new(capacity),
            by_subnet: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The dynamic eroute of `peer_id`, marked as used now.
    pub fn get_by_peer(&mut self, peer_id: &str, now: Instant) -> Option<&DynamicEroute> {
        let e = self.by_peer.get_mut(peer_id)?;
        e.last_used = now;
        Some(e)
    }

    /// Whether the table holds a dynamic eroute for `peer_id` (without marking it used).
    pub fn contains_peer(&self, peer_id: &str) -> bool {
        self.by_peer.contains(peer_id)
    }

    /// The dynamic eroute whose subnet holds `subnet` (destination & egroup mask), marked used.
    pub fn get_by_subnet(&mut self, subnet: IpNet, now: Instant) -> Option<&DynamicEroute> {
        let peer = self.by_subnet.get(&subnet.trunc())?.clone();
        self.get_by_peer(&peer, now)
    }

    /// Adds (or replaces) a dynamic eroute. Returns the ones evicted to keep more than 10% of
    /// the table free: the caller deletes their SAs.
    pub fn insert(&mut self, e: DynamicEroute) -> Vec<DynamicEroute> {
        let mut evicted = Vec::new();
        // The same site again (e.g. its row changed) replaces its entry: not an eviction.
        self.remove(&e.peer_id);
        self.by_subnet.insert(e.remote_subnet.trunc(), e.peer_id.clone());
        // `push` cannot evict here: the 10% rule below keeps the table below capacity.
        if let Some((_, pushed_out)) = self.by_peer.push(e.peer_id.clone(), e) {
            self.by_subnet.remove(&pushed_out.remote_subnet.trunc());
            evicted.push(pushed_out);
        }
        if self.free() * 10 < self.capacity {
            // The eroute just inserted is the most recently used and never evicted by its own
            // insertion (in a table of one or two, 10% free is otherwise unreachable).
            while self.free() * 10 <= self.capacity && self.by_peer.len() > 1 {
                let Some((_, lru)) = self.by_peer.pop_lru() else {
                    break;
                };
                self.by_subnet.remove(&lru.remote_subnet.trunc());
                evicted.push(lru);
            }
        }
        evicted
    }

    /// Removes the dynamic eroute of `peer_id` (its last SA is gone).
    pub fn remove(&mut self, peer_id: &str) -> Option<DynamicEroute> {
        let e = self.by_peer.pop(peer_id)?;
        if self
            .by_subnet
            .get(&e.remote_subnet.trunc())
            .is_some_and(|p| p == peer_id)
        {
            self.by_subnet.remove(&e.remote_subnet.trunc());
        }
        Some(e)
    }

    /// Removes those unused for `timeout` (the eroute's inactivityTimeout).
    pub fn expire_idle(&mut self, now: Instant, timeout: Duration) -> Vec<DynamicEroute> {
        let idle: Vec<String> = self
            .by_peer
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_used) >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        idle.iter().filter_map(|p| self.remove(p)).collect()
    }

    /// Every dynamic eroute, most recently used first (for the status view).
    pub fn iter(&self) -> impl Iterator<Item = &DynamicEroute> {
        self.by_peer.iter().map(|(_, e)| e)
    }

    fn free(&self) -> usize {
        self.capacity - self.by_peer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(i: u32, now: Instant) -> DynamicEroute {
        DynamicEroute {
            peer_id: format!("s{i}.sites"),
            egroup: "g".into(),
            base_eroute: "b".into(),
            remote_subnet: format!("10.128.{i}.0/24").parse().unwrap(),
            peer_address: None,
            last_used: now,
        }
    }

    #[test]
    fn forty_sites_in_a_table_of_twenty_never_exceed_it_and_evict_lru() {
        let t0 = Instant::now();
        let mut t = DynamicTable::new(NonZeroUsize::new(20).unwrap());
        let mut evicted = Vec::new();
        for i in 0..40 {
            // Site 0 stays busy: it must survive.
            t.get_by_peer("s0.sites", t0 + Duration::from_secs(i.into()));
            evicted.extend(t.insert(site(i, t0 + Duration::from_secs(i.into()))));
            assert!(t.len() <= 20, "at {i}: {}", t.len());
            assert!(
                (20 - t.len()) * 10 >= 20,
                "at {i}: fewer than 10% free ({})",
                t.len()
            );
        }
        assert!(
            t.get_by_peer("s0.sites", t0).is_some(),
            "the recently used site stays"
        );
        assert!(
            t.get_by_peer("s1.sites", t0).is_none(),
            "the least recently used went first"
        );
        assert!(!evicted.iter().any(|e| e.peer_id == "s0.sites"));
        assert!(t.get_by_peer("s39.sites", t0).is_some());
        // After every insert at least 10% is free: eviction starts below 10% and goes past it.
        assert!((20 - t.len()) * 10 >= 20, "{}", t.len());
    }

    #[test]
    fn subnet_lookup_follows_the_table() {
        let t0 = Instant::now();
        let mut t = DynamicTable::new(NonZeroUsize::new(100).unwrap());
        t.insert(site(7, t0));
        let hit = t.get_by_subnet("10.128.7.0/24".parse().unwrap(), t0).unwrap();
        assert_eq!(hit.peer_id, "s7.sites");
        t.remove("s7.sites");
        assert!(t.get_by_subnet("10.128.7.0/24".parse().unwrap(), t0).is_none());
        // A site whose row changed subnet is found under the new one only.
        t.insert(site(8, t0));
        let mut moved = site(8, t0);
        moved.remote_subnet = "10.128.99.0/24".parse().unwrap();
        assert!(t.insert(moved).is_empty());
        assert!(t.get_by_subnet("10.128.8.0/24".parse().unwrap(), t0).is_none());
        assert!(t.get_by_subnet("10.128.99.0/24".parse().unwrap(), t0).is_some());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn idle_eroutes_expire() {
        let t0 = Instant::now();
        let mut t = DynamicTable::new(NonZeroUsize::new(10).unwrap());
        t.insert(site(1, t0));
        t.insert(site(2, t0));
        t.get_by_peer("s2.sites", t0 + Duration::from_secs(50));
        let gone = t.expire_idle(t0 + Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(
            gone.iter().map(|e| e.peer_id.as_str()).collect::<Vec<_>>(),
            ["s1.sites"]
        );
        assert_eq!(t.len(), 1);
        assert!(t.get_by_subnet("10.128.1.0/24".parse().unwrap(), t0).is_none());
    }

    #[test]
    fn a_table_of_one_still_works() {
        let t0 = Instant::now();
        let mut t = DynamicTable::new(NonZeroUsize::new(1).unwrap());
        assert!(t.insert(site(1, t0)).is_empty());
        let evicted = t.insert(site(2, t0));
        assert_eq!(
            evicted.iter().map(|e| e.peer_id.as_str()).collect::<Vec<_>>(),
            ["s1.sites"]
        );
        assert!(t.get_by_peer("s2.sites", t0).is_some(), "the new one is kept");
    }
}
