//! Prometheus metrics of the gateway. The admin API's `GetCounters` reads the same values.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::dataplane::shared::DataplaneCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgroupReasonLabel {
    pub egroup: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgroupLabel {
    pub egroup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Labels of `ike_failures`: why a negotiation failed or a peer was refused.
pub const IKE_FAILURE_REASONS: &[&str] = &[
    "authentication_failed",
    "unknown_peer",
    "no_psk",
    "draining",
    "site_lookup",
    "fleet_unavailable",
    "no_proposal_chosen",
    "ike_proposal_not_allowed",
    "ts_unacceptable",
    "invalid_ke",
    "malformed",
    "child_sa_unsupported",
    "spi_in_use",
    "dead_peer",
    "timeout",
    "other",
];

/// Labels of `ike_dropped`: why a message was dropped without an answer.
pub const IKE_DROP_REASONS: &[&str] = &[
    "integrity",
    "unexpected",
    "malformed",
    "unknown_spi",
    "cookie_required",
    "half_open_limit",
    "redirected",
    "other",
];

/// Every metric the gateway exports.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub admin_requests: Family<MethodLabel, Counter>,
    pub eroutes: Gauge,
    pub egroups: Gauge,
    pub sites: Gauge,
    pub tunnels: Gauge,
    /// 0 active, 1 draining, 2 drained.
    pub drain_state: Gauge,
    /// CPU use of the process in percent of one core, over the last few seconds.
    pub cpu_percent: Gauge,
    /// IKE SAs between IKE_SA_INIT and the end of IKE_AUTH.
    pub ike_sas_half_open: Gauge,
    pub ike_sas_established: Gauge,
    /// NAT keepalives sent (RFC 3948 §4), directly or through the member a site's flow
    /// enters.
    pub nat_keepalives: Counter,
    /// Negotiations that failed or peers refused, by reason.
    pub ike_failures: Family<ReasonLabel, Counter>,
    /// IKE messages dropped without an answer, by reason.
    pub ike_dropped: Family<ReasonLabel, Counter>,
    /// RFC 6311 Message ID synchronizations: `synced` (ours, after a take-over), `answered`
    /// (the peer's), `unusable` (our request's answer could not be used).
    pub ike_message_id_syncs: Family<ResultLabel, Counter>,
    pub dataplane: DataplaneCounters,
    /// Site lookups that gave no usable site, by egroup and reason (not_found, timeout,
    /// unreachable, malformed).
    pub egroup_lookup_failures: Family<EgroupReasonLabel, Counter>,
    /// Dynamic eroutes this pod holds, by egroup.
    pub dynamic_eroutes: Family<EgroupLabel, Gauge>,
    /// New configurations seen in the config directory (or on SIGHUP), by result:
    /// `applied` or `refused` (invalid: the running one was kept).
    pub config_reloads: Family<ResultLabel, Counter>,
    /// The fleet (with --fleet-etcd).
    pub fleet: crate::cluster::FleetMetrics,
}

impl Metrics {
    /// Registers everything under the `concentrator_gateway` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("concentrator_gateway");
        self.fleet.register(r);
        r.register(
            "admin_requests",
            "Admin API requests by method",
            self.admin_requests.clone(),
        );
        r.register("eroutes", "Base eroutes loaded", self.eroutes.clone());
        r.register("egroups", "Egroups loaded", self.egroups.clone());
        r.register("sites", "Sites in the embedded site store", self.sites.clone());
        r.register("tunnels", "Tunnels this pod terminates", self.tunnels.clone());
        r.register(
            "ike_message_id_syncs",
            "RFC 6311 Message ID synchronizations by result (synced, answered, unusable)",
            self.ike_message_id_syncs.clone(),
        );
        r.register(
            "nat_keepalives",
            "NAT keepalives sent to sites behind a NAT or across ours",
            self.nat_keepalives.clone(),
        );
        r.register(
            "drain_state",
            "0 active, 1 draining, 2 drained",
            self.drain_state.clone(),
        );
        r.register(
            "cpu_percent",
            "CPU use of the process in percent of one core (5 s samples)",
            self.cpu_percent.clone(),
        );
        r.register(
            "ike_sas_half_open",
            "IKE SAs whose IKE_AUTH has not completed",
            self.ike_sas_half_open.clone(),
        );
        r.register(
            "ike_sas_established",
            "Established IKE SAs",
            self.ike_sas_established.clone(),
        );
        r.register(
            "ike_failures",
            "IKE negotiations that failed or peers refused, by reason",
            self.ike_failures.clone(),
        );
        r.register(
            "ike_dropped",
            "IKE messages dropped without an answer, by reason",
            self.ike_dropped.clone(),
        );
        r.register(
            "egroup_lookup_failures",
            "Site lookups that gave no usable site, by egroup and reason",
            self.egroup_lookup_failures.clone(),
        );
        r.register(
            "dynamic_eroutes",
            "Dynamic eroutes this pod holds, by egroup",
            self.dynamic_eroutes.clone(),
        );
        r.register(
            "config_reloads",
            "New configurations seen in the config directory or on SIGHUP, by result (applied, refused)",
            self.config_reloads.clone(),
        );
        let d = &self.dataplane;
        r.register(
            "esp_packets_in",
            "ESP packets decrypted and delivered",
            d.packets_in.clone(),
        );
        r.register(
            "esp_packets_out",
            "Inner packets encrypted and sent",
            d.packets_out.clone(),
        );
        r.register(
            "esp_dropped_no_sa",
            "Inner packets dropped because no SA covers their destination",
            d.no_sa.clone(),
        );
        r.register(
            "esp_dropped_unknown_spi",
            "ESP packets for an unknown SPI",
            d.unknown_spi.clone(),
        );
        r.register(
            "ike_passed_on_by_dataplane",
            "IKE messages on port 4500 a data plane thread read and passed to an IKE worker (next to none while the port steers IKE to the workers' sockets)",
            d.ike_passed_on.clone(),
        );
        r.register(
            "esp_dropped_invalid",
            "ESP packets dropped: replayed, failed integrity or malformed",
            d.invalid.clone(),
        );
        r.register(
            "esp_dropped_policy",
            "Decrypted packets outside the SA's traffic selectors",
            d.policy.clone(),
        );
        r.register(
            "esp_dropped_too_big",
            "Inner packets with DF (or IPv6) too big for the path to the peer; an ICMP error went back",
            d.too_big.clone(),
        );
        r.register(
            "esp_dropped_seq_ceiling",
            "Inner packets not sent: the SA's sequence ceiling (acknowledged by the fleet replica) was reached",
            d.seq_ceiling.clone(),
        );
        r.register(
            "esp_dropped_handover",
            "Packets dropped while their SA was handed over to another member of the fleet (a drain)",
            d.handover.clone(),
        );
        r.register(
            "esp_sa_soft_expired",
            "CHILD SA directions that reached rekeyBytes/rekeyPackets (a rekey was started)",
            d.soft_expired.clone(),
        );
        r.register(
            "esp_sa_hard_expired",
            "CHILD SA directions that reached lifeBytes/lifePackets and were removed",
            d.hard_expired.clone(),
        );
    }

    pub fn count_ike_failure(&self, reason: &str) {
        self.ike_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_lookup_failure(&self, egroup: &str, reason: &str) {
        self.egroup_lookup_failures
            .get_or_create(&EgroupReasonLabel {
                egroup: egroup.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_ike_drop(&self, reason: &str) {
        self.ike_dropped
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_message_id_sync(&self, result: &str) {
        self.ike_message_id_syncs
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// `result`: `applied` or `refused`.
    pub fn count_config_reload(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn count_admin(&self, method: &str) {
        self.admin_requests
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .inc();
    }

    /// Current values by metric name, for the admin API.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let g = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut m = BTreeMap::from([
            ("eroutes".to_owned(), g(self.eroutes.get())),
            ("egroups".to_owned(), g(self.egroups.get())),
            ("sites".to_owned(), g(self.sites.get())),
            ("tunnels".to_owned(), g(self.tunnels.get())),
            ("drain_state".to_owned(), g(self.drain_state.get())),
            ("fleet_members".to_owned(), g(self.fleet.members.get())),
            ("fleet_leader".to_owned(), g(self.fleet.leader.get())),
            ("cpu_percent".to_owned(), g(self.cpu_percent.get())),
            ("ike_sas_half_open".to_owned(), g(self.ike_sas_half_open.get())),
            (
                "ike_sas_established".to_owned(),
                g(self.ike_sas_established.get()),
            ),
            ("esp_packets_in".to_owned(), self.dataplane.packets_in.get()),
            ("esp_packets_out".to_owned(), self.dataplane.packets_out.get()),
            ("esp_dropped_no_sa".to_owned(), self.dataplane.no_sa.get()),
            (
                "esp_dropped_unknown_spi".to_owned(),
                self.dataplane.unknown_spi.get(),
            ),
            ("esp_dropped_invalid".to_owned(), self.dataplane.invalid.get()),
            (
                "ike_passed_on_by_dataplane".to_owned(),
                self.dataplane.ike_passed_on.get(),
            ),
            ("esp_dropped_policy".to_owned(), self.dataplane.policy.get()),
            ("esp_dropped_too_big".to_owned(), self.dataplane.too_big.get()),
            (
                "esp_dropped_seq_ceiling".to_owned(),
                self.dataplane.seq_ceiling.get(),
            ),
            ("esp_dropped_handover".to_owned(), self.dataplane.handover.get()),
            (
                "esp_sa_soft_expired".to_owned(),
                self.dataplane.soft_expired.get(),
            ),
            (
                "esp_sa_hard_expired".to_owned(),
                self.dataplane.hard_expired.get(),
            ),
        ]);
        for (name, family, reasons) in [
            ("ike_failures", &self.ike_failures, IKE_FAILURE_REASONS),
            ("ike_dropped", &self.ike_dropped, IKE_DROP_REASONS),
        ] {
            for reason in reasons {
                let n = family
                    .get_or_create(&ReasonLabel {
                        reason: (*reason).to_owned(),
                    })
                    .get();
                m.insert(format!("{name}{{reason=\"{reason}\"}}"), n);
            }
        }
        for result in ["applied", "refused"] {
            let n = self
                .config_reloads
                .get_or_create(&ResultLabel {
                    result: result.to_owned(),
                })
                .get();
            m.insert(format!("config_reloads{{result=\"{result}\"}}"), n);
        }
        for method in [
            "ListTunnels",
            "GetTunnel",
            "ListEroutes",
            "GetCounters",
            "Drain",
            "ImportSites",
            "GetShards",
        ] {
            let n = self
                .admin_requests
                .get_or_create(&MethodLabel {
                    method: method.to_owned(),
                })
                .get();
            m.insert(format!("admin_requests{{method=\"{method}\"}}"), n);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names an expression of the chart's dashboard refers to with `prefix`
    /// (regular expressions over names are left out).
    pub(crate) fn dashboard_metrics(prefix: &str) -> Vec<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/concentrator/dashboards/gateway.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut names: Vec<String> = text
            .match_indices(prefix)
            .map(|(at, _)| {
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|n| !text.contains(&format!("{n}.")))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn every_gateway_metric_the_dashboard_shows_is_exported() {
        let m = Metrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        // Families with no sample yet print nothing: give each a sample first.
        m.count_ike_failure("x");
        m.count_ike_drop("x");
        m.count_admin("x");
        m.count_lookup_failure("x", "x");
        m.fleet.forward.drop("x");
        m.fleet
            .forward
            .packets
            .get_or_create(&crate::cluster::ForwardLabel {
                kind: "x".into(),
                direction: "x".into(),
            })
            .inc();
        for family in [
            &m.fleet.replication.bytes_sent,
            &m.fleet.replication.adopt_failed,
            &m.fleet.handover.shards,
        ] {
            crate::cluster::ReplicationMetrics::count(family, "x", 1);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let wanted = dashboard_metrics("concentrator_gateway_");
        assert!(wanted.len() > 10, "{wanted:?}");
        for name in wanted {
            let base = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(&base),
                "the dashboard shows {name}, which the gateway does not export: {exported:?}"
            );
        }
    }
}
