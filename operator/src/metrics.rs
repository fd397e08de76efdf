//! The operator's own metrics (`concentrator_operator_*` on its `/metrics`): reconciles per
//! controller, their failures by reason, and how long they take, as kube-rs controller-rs
//! counts them.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: String,
    pub reason: String,
}

/// Reconcile counts, failures and durations per controller (GatewayFleet, Eroute, Egroup).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabel, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
        }
    }
}

impl Metrics {
    /// Registers them under `concentrator_operator`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("concentrator_operator");
        r.register(
            "reconciles",
            "Reconciles run, by controller",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Reconciles that ended in an error, by controller and reason",
            self.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "How long reconciles took, by controller",
            self.duration.clone(),
        );
    }

    /// Starts timing one reconcile of `controller`; [`Measure::done`] records it.
    pub fn measure(&self, controller: &str) -> Measure<'_> {
        self.reconciles
            .get_or_create(&ControllerLabel {
                controller: controller.to_owned(),
            })
            .inc();
        Measure {
            metrics: self,
            controller: controller.to_owned(),
            started: Instant::now(),
        }
    }
}

/// One reconcile being timed.
pub struct Measure<'a> {
    metrics: &'a Metrics,
    controller: String,
    started: Instant,
}

impl Measure<'_> {
    /// Records the reconcile's duration, and its failure `reason` if it failed.
    pub fn done(self, failure: Option<&str>) {
        let label = ControllerLabel {
            controller: self.controller.clone(),
        };
        self.metrics
            .duration
            .get_or_create(&label)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(reason) = failure {
            self.metrics
                .failures
                .get_or_create(&FailureLabels {
                    controller: self.controller,
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_is_counted_timed_and_its_failure_named() {
        let m = Metrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.measure("GatewayFleet").done(None);
        m.measure("GatewayFleet").done(Some("kube"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("concentrator_operator_reconciles_total{controller=\"GatewayFleet\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "concentrator_operator_reconcile_failures_total{controller=\"GatewayFleet\",reason=\"kube\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "concentrator_operator_reconcile_duration_seconds_count{controller=\"GatewayFleet\"} 2"
            ),
            "{text}"
        );
        // What the chart's dashboard shows of the operator is exported.
        let dashboard = include_str!("../../charts/concentrator/dashboards/gateway.json");
        let shown: Vec<&str> = dashboard
            .match_indices("concentrator_operator_")
            .filter_map(|(at, _)| {
                dashboard[at..]
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
            })
            .collect();
        assert!(!shown.is_empty());
        for name in shown {
            assert!(
                text.contains(name),
                "the dashboard shows {name}, not exported:\n{text}"
            );
        }
    }
}
