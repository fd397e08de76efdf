//! A member of the fleet: its small ID and the record it keeps under its etcd lease.
//!
//! The record is JSON (readable with `etcdctl get`, a few hundred bytes). It is written by
//! another pod, so reading one is input like any other: [`MemberRecord::decode`] checks it
//! and never panics.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::shard::ShardSet;

/// A member's small ID: the StatefulSet ordinal when the pod has one, else claimed in etcd.
/// It is what the shard map and the pod-to-pod frames name a member by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub u16);

impl MemberId {
    /// The largest ID a member may have (`u16::MAX` means "no member" in the map's codec).
    pub const MAX: u16 = u16::MAX - 1;

    /// The ordinal at the end of a StatefulSet pod name (`gw-3` → 3), if it has one.
    pub fn from_ordinal_name(name: &str) -> Option<Self> {
        let (_, ordinal) = name.rsplit_once('-')?;
        if ordinal.is_empty() || ordinal.len() > 5 || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ordinal.parse::<u16>().ok().filter(|n| *n <= Self::MAX).map(Self)
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a member reports about its load (the leader and the director read it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Established IKE SAs.
    pub tunnels: u64,
    /// Half-open IKE SAs.
    pub half_open: u64,
    /// CPU use of the process, in percent of one core.
    pub cpu_percent: u32,
    /// Tunnels the pod is sized for (0: not said).
    pub capacity: u64,
    /// The pod is draining: it takes no new shard and no new site.
    pub draining: bool,
}

/// A member's record, under its lease at `members/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// The pod's name (`--fleet-member`).
    pub name: String,
    /// Where other pods send it frames (`--fleet-address`).
    pub address: SocketAddr,
    /// Its load.
    pub load: Load,
    /// The version of the shard map it has applied: the leader moves a shard it marked only
    /// once the owner has seen the mark and reports the shard empty.
    pub map_version: u64,
    /// The shards in which it holds SAs, as [`ShardSet::to_hex`].
    pub occupied: String,
    /// Where its admin API answers other members (the fleet-wide tunnel list), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// Its own stable address sites may be redirected to (`--fleet-redirect-address`: in
    /// the VIP front, its per-pod Service address), if it has one. Records of members that
    /// predate the VIP front have none and are never a redirect's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<IpAddr>,
}

/// Why a member record was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not the JSON of a member record.
    #[error("member record: {0}")]
    Json(#[from] serde_json::Error),
    /// The occupied shards are not a shard set.
    #[error("member record: `occupied` is not a set of shards")]
    Occupied,
    /// The name is empty or too long.
    #[error("member record: the name is empty or longer than 253 bytes")]
    Name,
}

impl MemberRecord {
    /// The record as JSON.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A record read from etcd.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let r: Self = serde_json::from_slice(bytes)?;
        if r.name.is_empty() || r.name.len() > 253 {
            return Err(RecordError::Name);
        }
        r.occupied_shards()?;
        Ok(r)
    }

    /// The shards in which the member holds SAs.
    pub fn occupied_shards(&self) -> Result<ShardSet, RecordError> {
        ShardSet::from_hex(&self.occupied).ok_or(RecordError::Occupied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Shard;

    #[test]
    fn ordinals_come_from_statefulset_names() {
        assert_eq!(MemberId::from_ordinal_name("gw-0"), Some(MemberId(0)));
        assert_eq!(
            MemberId::from_ordinal_name("my-fleet-gateway-12"),
            Some(MemberId(12))
        );
        assert_eq!(MemberId::from_ordinal_name("gw"), None);
        assert_eq!(MemberId::from_ordinal_name("gw-"), None);
        assert_eq!(MemberId::from_ordinal_name("gw-x1"), None);
        assert_eq!(MemberId::from_ordinal_name("gw-65535"), None);
        assert_eq!(MemberId::from_ordinal_name("gw-123456"), None);
        assert_eq!(MemberId::from_ordinal_name("gw-+1"), None);
    }

    #[test]
    fn records_without_a_redirect_address_still_decode() {
        let old = format!(
            r#"{{"name":"gw-0","address":"10.0.0.1:4510","load":{{"tunnels":1,"half_open":0,"cpu_percent":3,"capacity":0,"draining":false}},"map_version":2,"occupied":"{}"}}"#,
            ShardSet::new().to_hex()
        );
        let r = MemberRecord::decode(old.as_bytes()).unwrap();
        assert_eq!(r.redirect, None);
        assert!(!String::from_utf8(r.encode()).unwrap().contains("redirect"));
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let occupied: ShardSet = [Shard::new(7).unwrap()].into_iter().collect();
        let r = MemberRecord {
            name: "gw-1".into(),
            address: "10.0.0.2:4510".parse().unwrap(),
            load: Load {
                tunnels: 3,
                ..Load::default()
            },
            map_version: 9,
            occupied: occupied.to_hex(),
            admin: Some("10.0.0.2:50051".parse().unwrap()),
            redirect: Some("192.0.2.21".parse().unwrap()),
        };
        let bytes = r.encode();
        let back = MemberRecord::decode(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.occupied_shards().unwrap(), occupied);

        assert!(matches!(MemberRecord::decode(b"{"), Err(RecordError::Json(_))));
        let bad = String::from_utf8(bytes.clone())
            .unwrap()
            .replace(&r.occupied, "00");
        assert!(matches!(
            MemberRecord::decode(bad.as_bytes()),
            Err(RecordError::Occupied)
        ));
        let unnamed = String::from_utf8(bytes).unwrap().replace("gw-1", "");
        assert!(matches!(
            MemberRecord::decode(unnamed.as_bytes()),
            Err(RecordError::Name)
        ));
    }
}
