//! Autoscaling decisions, pure: pod reports and a recommendation history in, replica count
//! out. Scale-out is immediate; scale-in waits out the stabilisation window and then removes
//! one pod at a time, and only after that pod reports it is drained.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use concentrator_crds::fleet::ScalingSpec;

/// What one gateway pod said about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodReport {
    pub tunnels: u64,
    /// CPU utilisation in percent of the pod's request, when known.
    pub cpu_percent: Option<u32>,
    /// Dynamic eroutes per base eroute name.
    pub dynamic_eroutes: std::collections::BTreeMap<String, u64>,
    /// The pod is draining (or drained).
    pub draining: bool,
}

/// The replica count the load asks for, within the spec's bounds. Like the HPA: each metric
/// gives `ceil(total / target per pod)`, the larger wins.
pub fn recommend(spec: &ScalingSpec, reports: &[PodReport]) -> u32 {
    let tunnels: u64 = reports.iter().map(|r| r.tunnels).sum();
    let by_tunnels = tunnels.div_ceil(u64::from(spec.target_tunnels_per_pod.max(1)));
    let cpu: u64 = reports.iter().filter_map(|r| r.cpu_percent).map(u64::from).sum();
    let by_cpu = cpu.div_ceil(u64::from(spec.target_cpu_percent.max(1)));
    let want = u32::try_from(by_tunnels.max(by_cpu)).unwrap_or(u32::MAX);
    want.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas))
}

/// Recommendations of the last stabilisation window, per fleet.
#[derive(Debug, Default, Clone)]
pub struct History {
    seen: VecDeque<(Instant, u32)>,
}

impl History {
    /// Records `recommendation` and returns the count to aim for: the highest recommendation
    /// within `window`, so a dip shorter than the window never removes a pod.
    pub fn stabilize(&mut self, now: Instant, window: Duration, recommendation: u32) -> u32 {
        self.seen.push_back((now, recommendation));
        while let Some(&(t, _)) = self.seen.front() {
            if now.duration_since(t) > window {
                self.seen.pop_front();
            } else {
                break;
            }
        }
        self.seen.iter().map(|&(_, r)| r).max().unwrap_or(recommendation)
    }
}

/// What to do with the StatefulSet this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Set this many replicas now (scale-out, or nothing to change).
    Set(u32),
    /// Drain this pod ordinal first; keep the current count until it is drained.
    Drain(u32),
    /// Keep this count, and a drain under way (a pod's report is missing: scale-in cannot
    /// start, nor is it called off).
    Hold(u32),
}

/// One step from `current` toward `target`. Scale-in needs every pod's report (a silent pod
/// may be carrying tunnels) and removes only the highest ordinal, as the StatefulSet does.
pub fn step(current: u32, target: u32, all_reported: bool) -> Step {
    if target >= current {
        Step::Set(target)
    } else if !all_reported {
        Step::Hold(current)
    } else {
        // current > target, so current >= 1.
        Step::Drain(current - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalingSpec {
        ScalingSpec {
            min_replicas: 2,
            max_replicas: 6,
            target_tunnels_per_pod: 100,
            target_cpu_percent: 50,
            stabilization_window: "5m".into(),
            drain_timeout: "2m".into(),
        }
    }

    fn r(tunnels: u64, cpu: Option<u32>) -> PodReport {
        PodReport {
            tunnels,
            cpu_percent: cpu,
            ..PodReport::default()
        }
    }

    #[test]
    fn recommends_from_the_busier_metric_within_bounds() {
        assert_eq!(recommend(&spec(), &[r(150, None), r(140, None)]), 3);
        assert_eq!(recommend(&spec(), &[r(10, Some(90)), r(10, Some(80))]), 4);
        assert_eq!(recommend(&spec(), &[r(0, Some(1))]), 2, "never below min");
        assert_eq!(recommend(&spec(), &[r(10_000, None)]), 6, "never above max");
        assert_eq!(recommend(&spec(), &[]), 2);
    }

    #[test]
    fn a_dip_shorter_than_the_window_keeps_the_pods() {
        let mut h = History::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(300);
        assert_eq!(h.stabilize(t0, w, 5), 5);
        assert_eq!(h.stabilize(t0 + Duration::from_secs(60), w, 2), 5);
        assert_eq!(h.stabilize(t0 + Duration::from_secs(299), w, 2), 5);
        assert_eq!(h.stabilize(t0 + Duration::from_secs(301), w, 2), 2);
        // Scale-out is never held back.
        assert_eq!(h.stabilize(t0 + Duration::from_secs(302), w, 6), 6);
    }

    #[test]
    fn scale_in_drains_the_highest_ordinal_first_and_needs_every_report() {
        assert_eq!(step(4, 6, true), Step::Set(6));
        assert_eq!(step(4, 4, true), Step::Set(4));
        assert_eq!(step(4, 2, true), Step::Drain(3));
        assert_eq!(step(4, 2, false), Step::Hold(4), "a silent pod blocks scale-in");
        assert_eq!(step(0, 2, true), Step::Set(2));
    }
}
