//! What the plugin prints: tables like kubectl's, or JSON / YAML of the same fields.

use std::collections::HashMap;

use anyhow::Result;
use concentrator_crds::GatewayFleet;
use concentrator_proto::admin::{DrainStatus, Shards, Tunnel, drain_status};
use concentrator_proto::view::{table, tunnels_table};
use kube::ResourceExt;
use serde::Serialize;

/// An output format (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Table { wide: bool },
    Json,
    Yaml,
}

/// A tunnel as JSON / YAML show it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TunnelOut<'a> {
    peer_id: &'a str,
    base_eroute: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    egroup: &'a str,
    pod: &'a str,
    peer_address: &'a str,
    remote_subnet: &'a str,
    child_sas: usize,
    bytes_in: u64,
    bytes_out: u64,
    idle_seconds: u64,
}

/// The tunnels in `format`.
pub(crate) fn tunnels(list: &[Tunnel], format: Format) -> Result<String> {
    let out: Vec<TunnelOut<'_>> = list
        .iter()
        .map(|t| TunnelOut {
            peer_id: &t.remote_peer_id,
            base_eroute: &t.base_eroute,
            egroup: &t.egroup,
            pod: &t.member,
            peer_address: &t.peer_address,
            remote_subnet: &t.remote_subnet,
            child_sas: t.child_sas.len(),
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            idle_seconds: t.idle_seconds,
        })
        .collect();
    Ok(match format {
        Format::Table { wide } => tunnels_table(list, wide),
        Format::Json => serde_json::to_string_pretty(&out)? + "\n",
        Format::Yaml => serde_yaml::to_string(&out)?,
    })
}

/// A drain's answer, in a few words.
pub(crate) fn drain_state(s: &DrainStatus) -> String {
    match s.state() {
        drain_status::State::Draining if s.nowhere_to_go => format!(
            "draining, {} tunnels left: no other pod takes them (they end with the pod)",
            s.remaining_tunnels
        ),
        drain_status::State::Draining => format!("draining, {} tunnels left", s.remaining_tunnels),
        drain_status::State::Drained => "drained".into(),
        drain_status::State::Active => "active (taking new sites)".into(),
        drain_status::State::Unspecified => "unknown".into(),
    }
}

/// One pod as `status` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodStatus {
    pub(crate) pod: String,
    pub(crate) reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) tunnels: u64,
    pub(crate) drain: &'static str,
    pub(crate) leader: bool,
    pub(crate) members: u64,
}

impl PodStatus {
    /// From the pod's counters (GetCounters), or the error reaching it.
    pub(crate) fn from_counters(
        pod: &str,
        counters: Option<&HashMap<String, u64>>,
        error: Option<&anyhow::Error>,
    ) -> Self {
        let get = |k: &str| counters.and_then(|c| c.get(k)).copied().unwrap_or(0);
        Self {
            pod: pod.to_owned(),
            reachable: counters.is_some(),
            error: error.map(|e| format!("{e:#}")),
            tunnels: get("tunnels"),
            drain: match get("drain_state") {
                0 => "active",
                1 => "draining",
                _ => "drained",
            },
            leader: get("fleet_leader") == 1,
            members: get("fleet_members"),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetOut>,
    pods: &'a [PodStatus],
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<ShardsOut<'a>>,
}

/// The shard map as one pod applied it, per member.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShardsOut<'a> {
    /// The pod whose view this is.
    asked_of: &'a str,
    map_version: u64,
    total: u32,
    unowned: u32,
    /// Copies of each shard's SAs on other members.
    replicas: u32,
    members: Vec<MemberShardsOut<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemberShardsOut<'a> {
    member: &'a str,
    id: u32,
    owned: u32,
    replica: u32,
    handing_over: u32,
    taking_over: u32,
    draining: bool,
    map_version: u64,
}

impl<'a> ShardsOut<'a> {
    fn new(asked_of: &'a str, s: &'a Shards) -> Self {
        Self {
            asked_of,
            map_version: s.map_version,
            total: s.total,
            unowned: s.unowned,
            replicas: s.replicas,
            members: s
                .members
                .iter()
                .map(|m| MemberShardsOut {
                    member: &m.name,
                    id: m.id,
                    owned: m.owned,
                    replica: m.replica,
                    handing_over: m.handing_over,
                    taking_over: m.taking_over,
                    draining: m.draining,
                    map_version: m.map_version,
                })
                .collect(),
        }
    }

    /// A line on the map, then one row per member.
    fn table(&self, wide: bool) -> String {
        let mut out = format!(
            "\nshard map version {} (as {} applied it): {} shards, {} unowned, {} replica(s) each\n",
            self.map_version, self.asked_of, self.total, self.unowned, self.replicas
        );
        let mut header = vec!["MEMBER", "ID", "SHARDS", "REPLICA", "HANDING OVER", "TAKING OVER"];
        if wide {
            header.extend(["DRAINING", "MAP VERSION"]);
        }
        let rows: Vec<Vec<String>> = self
            .members
            .iter()
            .map(|m| {
                let name = if m.member.is_empty() {
                    "(gone)".to_owned()
                } else {
                    m.member.to_owned()
                };
                let mut r = vec![
                    name,
                    m.id.to_string(),
                    m.owned.to_string(),
                    m.replica.to_string(),
                    m.handing_over.to_string(),
                    m.taking_over.to_string(),
                ];
                if wide {
                    r.push(if m.draining { "yes".into() } else { "-".into() });
                    r.push(m.map_version.to_string());
                }
                r
            })
            .collect();
        out.push_str(&table(&header, &rows));
        out
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FleetOut {
    name: String,
    replicas: u32,
    ready_replicas: u32,
    tunnels: u64,
    conditions: Vec<String>,
}

/// The fleet (on a cluster), its pods and (in a fleet) the shard map as the pod `shards`
/// names applied it, in `format`.
pub(crate) fn status(
    fleet: Option<&GatewayFleet>,
    pods: &[PodStatus],
    shards: Option<(&str, &Shards)>,
    format: Format,
) -> Result<String> {
    let shards = shards.map(|(pod, s)| ShardsOut::new(pod, s));
    let fleet = fleet.map(|f| {
        let st = f.status.clone().unwrap_or_default();
        FleetOut {
            name: f.name_any(),
            replicas: st.replicas,
            ready_replicas: st.ready_replicas,
            tunnels: st.tunnels,
            conditions: st
                .conditions
                .iter()
                .map(|c| format!("{}={} ({}): {}", c.type_, c.status, c.reason, c.message))
                .collect(),
        }
    });
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&StatusOut { fleet, pods, shards })? + "\n",
        Format::Yaml => serde_yaml::to_string(&StatusOut { fleet, pods, shards })?,
        Format::Table { wide } => {
            let mut out = String::new();
            if let Some(f) = &fleet {
                out.push_str(&format!(
                    "fleet {}: {}/{} pods ready, {} tunnels\n",
                    f.name, f.ready_replicas, f.replicas, f.tunnels
                ));
                for c in &f.conditions {
                    out.push_str(&format!("  {c}\n"));
                }
            }
            let mut header = vec!["POD", "TUNNELS", "DRAIN", "LEADER", "MEMBERS"];
            if wide {
                header.push("ERROR");
            }
            let rows: Vec<Vec<String>> = pods
                .iter()
                .map(|p| {
                    let mut r = if p.reachable {
                        vec![
                            p.pod.clone(),
                            p.tunnels.to_string(),
                            p.drain.to_owned(),
                            if p.leader { "yes".into() } else { "-".into() },
                            p.members.to_string(),
                        ]
                    } else {
                        vec![
                            p.pod.clone(),
                            "?".into(),
                            "unreachable".into(),
                            "?".into(),
                            "?".into(),
                        ]
                    };
                    if wide {
                        r.push(p.error.clone().unwrap_or_else(|| "-".into()));
                    }
                    r
                })
                .collect();
            out.push_str(&table(&header, &rows));
            if let Some(s) = &shards {
                out.push_str(&s.table(wide));
            }
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(peer: &str, pod: &str) -> Tunnel {
        Tunnel {
            remote_peer_id: peer.into(),
            base_eroute: "branches".into(),
            egroup: "branches".into(),
            member: pod.into(),
            bytes_in: 5,
            ..Tunnel::default()
        }
    }

    #[test]
    fn tunnels_render_as_table_json_and_yaml_with_their_pod() {
        let list = [tunnel("a.example", "edge-0"), tunnel("b.example", "edge-1")];
        let t = tunnels(&list, Format::Table { wide: false }).unwrap();
        assert!(t.lines().nth(2).unwrap().ends_with("edge-1"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&tunnels(&list, Format::Json).unwrap()).unwrap();
        assert_eq!(j[1]["peerId"], "b.example");
        assert_eq!(j[1]["pod"], "edge-1");
        let y: serde_json::Value = serde_yaml::from_str(&tunnels(&list, Format::Yaml).unwrap()).unwrap();
        assert_eq!(y[0]["bytesIn"], 5);
    }

    #[test]
    fn status_shows_each_pod_and_which_could_not_be_asked() {
        let counters: HashMap<String, u64> = [
            ("tunnels".to_owned(), 12),
            ("drain_state".to_owned(), 1),
            ("fleet_leader".to_owned(), 1),
            ("fleet_members".to_owned(), 3),
        ]
        .into_iter()
        .collect();
        let err = anyhow::anyhow!("connection refused");
        let pods = [
            PodStatus::from_counters("edge-0", Some(&counters), None),
            PodStatus::from_counters("edge-1", None, Some(&err)),
        ];
        let t = status(None, &pods, None, Format::Table { wide: true }).unwrap();
        assert!(t.contains("edge-0  12       draining     yes     3"), "{t}");
        assert!(t.contains("edge-1  ?        unreachable"), "{t}");
        assert!(t.contains("connection refused"), "{t}");
        assert!(!t.contains("shard"), "standalone: no shards\n{t}");
        let j: serde_json::Value =
            serde_json::from_str(&status(None, &pods, None, Format::Json).unwrap()).unwrap();
        assert!(j.get("shards").is_none(), "{j}");
    }

    #[test]
    fn status_shows_each_members_shards() {
        use concentrator_proto::admin::MemberShards;
        let member = |name: &str, id, owned, replica, handing_over, taking_over| MemberShards {
            name: name.into(),
            id,
            owned,
            replica,
            handing_over,
            taking_over,
            draining: handing_over > 0,
            map_version: 7,
        };
        let shards = Shards {
            fleet: true,
            map_version: 7,
            total: 1024,
            unowned: 0,
            replicas: 1,
            me: "edge-0".into(),
            members: vec![
                member("edge-0", 0, 512, 300, 0, 212),
                member("edge-1", 1, 300, 512, 0, 0),
                member("edge-2", 2, 212, 212, 212, 0),
                member("", 3, 0, 0, 0, 0),
            ],
        };
        let pods = [PodStatus::from_counters("edge-0", Some(&HashMap::new()), None)];
        let t = status(
            None,
            &pods,
            Some(("edge-0", &shards)),
            Format::Table { wide: false },
        )
        .unwrap();
        assert!(
            t.contains(
                "shard map version 7 (as edge-0 applied it): 1024 shards, 0 unowned, 1 replica(s) each\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("MEMBER  ID  SHARDS  REPLICA  HANDING OVER  TAKING OVER\n"),
            "{t}"
        );
        assert!(
            t.contains("edge-2  2   212     212      212           0\n"),
            "{t}"
        );
        assert!(t.contains("(gone)  3   0"), "{t}");
        let wide = status(
            None,
            &pods,
            Some(("edge-0", &shards)),
            Format::Table { wide: true },
        )
        .unwrap();
        assert!(wide.contains("DRAINING  MAP VERSION"), "{wide}");
        let y: serde_json::Value =
            serde_yaml::from_str(&status(None, &pods, Some(("edge-0", &shards)), Format::Yaml).unwrap())
                .unwrap();
        assert_eq!(y["shards"]["askedOf"], "edge-0");
        assert_eq!(y["shards"]["members"][2]["handingOver"], 212);
        let owned: u64 = y["shards"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["owned"].as_u64().unwrap())
            .sum();
        assert_eq!(owned, 1024);
    }
}
