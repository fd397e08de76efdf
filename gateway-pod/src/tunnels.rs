//! The table of tunnels this pod terminates, as the admin API shows them. The IKE driver
//! inserts and removes records; readers take a snapshot.

use std::collections::BTreeMap;
use std::sync::RwLock;

use concentrator_proto::admin::Tunnel;

/// Tunnels by id.
#[derive(Debug, Default)]
pub struct TunnelTable {
    inner: RwLock<BTreeMap<String, Tunnel>>,
}

impl TunnelTable {
    pub fn upsert(&self, t: Tunnel) {
        self.write().insert(t.id.clone(), t);
    }

    pub fn remove(&self, id: &str) -> Option<Tunnel> {
        self.write().remove(id)
    }

    pub fn get(&self, id: &str) -> Option<Tunnel> {
        self.read().get(id).cloned()
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
        self.read()
            .values()
            .filter(|t| {
                peer_id_pattern.is_empty()
                    || concentrator_crds::pattern::matches(peer_id_pattern, &t.remote_peer_id)
            })
            .filter(|t| eroute.is_empty() || t.base_eroute == eroute)
            .cloned()
            .collect()
    }

    // A poisoned lock only means a writer panicked mid-insert of a plain map; the map itself
    // is still consistent, so keep serving rather than take the admin API down.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Tunnel>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Tunnel>> {
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
        tt.upsert(t("1", "a.sites.example.com", "branches"));
        tt.upsert(t("2", "b.sites.example.com", "branches"));
        tt.upsert(t("3", "hq.example.com", "static"));
        assert_eq!(tt.list("", "").len(), 3);
        assert_eq!(tt.list("*.sites.example.com", "").len(), 2);
        assert_eq!(tt.list("?.sites.*", "branches").len(), 2);
        assert_eq!(tt.list("", "static")[0].id, "3");
        assert!(tt.remove("3").is_some());
        assert_eq!(tt.len(), 2);
    }
}
