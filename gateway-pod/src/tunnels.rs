//! The table of tunnels this pod terminates, as the admin API shows them. The IKE driver
//! writes a row when a tunnel changes (established, a CHILD SA in or out, a new peer
//! address) and removes it with the tunnel; the traffic counters are the data plane's own,
//! read when the admin API asks. So nothing is rewritten per tunnel while tunnels sit idle:
//! with 100,000 of them the driver would otherwise rebuild 100,000 rows a second.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use concentrator_crds::proposal::Encryption;
use concentrator_proto::admin::{ChildSa, Tunnel};
use ipnet::IpNet;

use crate::dataplane::table::SaCounters;

/// One tunnel as the driver last wrote it. Names are shared (`Arc<str>`) with the driver's
/// own record and, for eroutes and egroups, with every other tunnel of them.
#[derive(Debug, Clone)]
pub struct TunnelRow {
    pub base_eroute: Option<Arc<str>>,
    pub egroup: Option<Arc<str>>,
    pub peer_id: Arc<str>,
    pub peer_address: Option<SocketAddr>,
    pub local_subnet: Option<IpNet>,
    pub established_at: Option<SystemTime>,
    pub children: Box<[ChildRow]>,
}

/// One CHILD SA of a [`TunnelRow`], with the data plane's live counters.
#[derive(Debug, Clone)]
pub struct ChildRow {
    pub spi_in: u32,
    pub spi_out: u32,
    pub encryption: Encryption,
    pub subnets: Arc<[IpNet]>,
    pub counters: Arc<SaCounters>,
}

impl TunnelRow {
    /// The admin API's message for tunnel `spi_r`, its counters and idle time as of `now`.
    pub fn to_proto(&self, spi_r: u64, now: Instant) -> Tunnel {
        let children: Vec<ChildSa> = self
            .children
            .iter()
            .map(|c| ChildSa {
                spi_in: c.spi_in,
                spi_out: c.spi_out,
                encryption: format!("{:?}", c.encryption),
                bytes_in: c.counters.bytes_in.load(Relaxed),
                bytes_out: c.counters.bytes_out.load(Relaxed),
                packets_in: c.counters.packets_in.load(Relaxed),
                packets_out: c.counters.packets_out.load(Relaxed),
            })
            .collect();
        let idle = self
            .children
            .iter()
            .map(|c| now.saturating_duration_since(c.counters.last_activity()))
            .min()
            .unwrap_or_default();
        let remote_subnets: Vec<String> = self
            .children
            .iter()
            .flat_map(|c| c.subnets.iter().map(ToString::to_string))
            .collect();
        let name = |n: &Option<Arc<str>>| n.as_deref().unwrap_or_default().to_owned();
        Tunnel {
            id: tunnel_id(spi_r),
            base_eroute: name(&self.base_eroute),
            egroup: name(&self.egroup),
            remote_peer_id: self.peer_id.to_string(),
            peer_address: self.peer_address.map(|r| r.to_string()).unwrap_or_default(),
            local_subnet: self.local_subnet.map(|n| n.to_string()).unwrap_or_default(),
            remote_subnet: remote_subnets.join(","),
            dynamic: self.egroup.is_some(),
            bytes_in: children.iter().map(|c| c.bytes_in).sum(),
            bytes_out: children.iter().map(|c| c.bytes_out).sum(),
            child_sas: children,
            idle_seconds: idle.as_secs(),
            established_at: self
                .established_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
            // Named by the fleet-wide list, which knows the member.
            member: String::new(),
        }
    }

    fn matches(&self, peer_id_pattern: &str, eroute: &str) -> bool {
        (peer_id_pattern.is_empty() || concentrator_crds::pattern::matches(peer_id_pattern, &self.peer_id))
            && (eroute.is_empty() || self.base_eroute.as_deref() == Some(eroute))
    }
}

/// The tunnel's name in the admin API: its IKE SA's id in the endpoint.
pub fn tunnel_id(spi_r: u64) -> String {
    format!("{spi_r:016x}")
}

/// Tunnels by their IKE SA's id.
#[derive(Debug, Default)]
pub struct TunnelTable {
    inner: RwLock<BTreeMap<u64, TunnelRow>>,
}

impl TunnelTable {
    pub fn upsert(&self, spi_r: u64, row: TunnelRow) {
        self.write().insert(spi_r, row);
    }

    pub fn remove(&self, spi_r: u64) -> Option<TunnelRow> {
        self.write().remove(&spi_r)
    }

    /// The tunnel named `id` ([`tunnel_id`]).
    pub fn get(&self, id: &str) -> Option<Tunnel> {
        let spi_r = u64::from_str_radix(id, 16).ok()?;
        self.read().get(&spi_r).map(|r| r.to_proto(spi_r, Instant::now()))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tunnels whose remote peer ID matches `peer_id_pattern` (empty: all) and whose base
    /// eroute is `eroute` (empty: all).
    pub fn list(&self, peer_id_pattern: &str, eroute: &str) -> Vec<Tunnel> {
        // Rows are copied (a few Arcs each) under the lock and shown after it: the driver
        // writes this table from the IKE task, which must not wait for 100,000 messages.
        let rows: Vec<(u64, TunnelRow)> = self
            .read()
            .iter()
            .filter(|(_, r)| r.matches(peer_id_pattern, eroute))
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        let now = Instant::now();
        rows.iter().map(|(id, r)| r.to_proto(*id, now)).collect()
    }

    /// How many tunnels [`Self::list`] would return, without building them.
    pub fn count(&self, peer_id_pattern: &str, eroute: &str, dynamic_only: bool) -> usize {
        self.read()
            .values()
            .filter(|r| r.matches(peer_id_pattern, eroute) && (!dynamic_only || r.egroup.is_some()))
            .count()
    }

    // A poisoned lock only means a writer panicked mid-insert of a plain map; the map itself
    // is still consistent, so keep serving rather than take the admin API down.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, TunnelRow>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, TunnelRow>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, peer: &str, eroute: &str) -> Tunnel {
        Tunnel {
            id: id.into(),
            remote_peer_id: peer.into(),
            base_eroute: eroute.into(),
            ..Default::default()
        }
    }

    fn row(peer: &str, eroute: &str, egroup: Option<&str>) -> TunnelRow {
        TunnelRow {
            base_eroute: Some(eroute.into()),
            egroup: egroup.map(Into::into),
            peer_id: peer.into(),
            peer_address: "192.0.2.7:4500".parse().ok(),
            local_subnet: "10.2.0.0/16".parse().ok(),
            established_at: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000)),
            children: Box::new([ChildRow {
                spi_in: 0xc1,
                spi_out: 0xc2,
                encryption: Encryption::AesGcm16 { key_bits: 128 },
                subnets: Arc::new(["10.128.0.16/28".parse().unwrap()]),
                counters: Arc::new(SaCounters::new(Instant::now())),
            }]),
        }
    }

    #[test]
    fn table_aligns_columns() {
        let mut a = t("1", "a.sites.example.com", "branches");
        a.egroup = "branches".into();
        a.bytes_in = 12345;
        let table = crate::tunnels_table(&[a, t("2", "hq", "static")]);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("PEER ID"));
        let col = |l: &str| l.find("branches").or_else(|| l.find("static"));
        assert_eq!(col(lines[1]), col(lines[2]), "EROUTE column aligned:\n{table}");
        assert!(lines[2].contains("  -  "), "no egroup shown as -:\n{table}");
    }

    #[test]
    fn filters_by_pattern_and_eroute() {
        let tt = TunnelTable::default();
        tt.upsert(1, row("a.sites.example.com", "branches", Some("g")));
        tt.upsert(2, row("b.sites.example.com", "branches", Some("g")));
        tt.upsert(3, row("hq.example.com", "static", None));
        assert_eq!(tt.list("", "").len(), 3);
        assert_eq!(tt.list("*.sites.example.com", "").len(), 2);
        assert_eq!(tt.list("?.sites.*", "branches").len(), 2);
        assert_eq!(tt.count("", "branches", true), 2);
        assert_eq!(tt.count("", "static", true), 0);
        assert_eq!(tt.list("", "static")[0].id, tunnel_id(3));
        assert!(tt.remove(3).is_some());
        assert_eq!(tt.len(), 2);
    }

    #[test]
    fn rows_show_the_live_counters_when_listed() {
        let tt = TunnelTable::default();
        let r = row("a.sites.example.com", "branches", Some("g"));
        let counters = Arc::clone(&r.children[0].counters);
        tt.upsert(0xab, r);
        counters.bytes_in.store(1500, Relaxed);
        counters.packets_in.store(1, Relaxed);
        let t = tt.get(&tunnel_id(0xab)).expect("listed by its id");
        assert_eq!((t.bytes_in, t.child_sas[0].packets_in), (1500, 1));
        assert_eq!(t.id, "00000000000000ab");
        assert_eq!(t.remote_subnet, "10.128.0.16/28");
        assert_eq!(t.peer_address, "192.0.2.7:4500");
        assert_eq!(t.established_at, 1000);
        assert!(t.dynamic);
        assert_eq!(t.child_sas[0].encryption, "AesGcm16 { key_bits: 128 }");
        assert!(tt.get("not-hex").is_none() && tt.get("ff").is_none());
    }
}
