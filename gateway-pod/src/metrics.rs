//! Prometheus metrics of the gateway. The admin API's `GetCounters` reads the same values.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

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
}

impl Metrics {
    /// Registers everything under the `concentrator_gateway` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("concentrator_gateway");
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
            "drain_state",
            "0 active, 1 draining, 2 drained",
            self.drain_state.clone(),
        );
        r.register(
            "cpu_percent",
            "CPU use of the process in percent of one core (5 s samples)",
            self.cpu_percent.clone(),
        );
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
            ("cpu_percent".to_owned(), g(self.cpu_percent.get())),
        ]);
        for method in ["ListTunnels", "GetTunnel", "ListEroutes", "GetCounters", "Drain"] {
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
