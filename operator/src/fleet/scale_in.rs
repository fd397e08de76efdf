//! Scale-in, one pod at a time: the highest ordinal is drained (it hands its tunnels over
//! to the others) and the StatefulSet shrinks only once that pod reports it is drained. The
//! wait is bounded: a drain that does not finish within the fleet's `drainTimeout` is
//! cancelled (the pod takes sites again), an Event and the ScaleIn condition say which pod
//! still held how many tunnels, and scale-in is tried again after as long. A scale-out that
//! comes while a pod drains cancels that drain: the pod stays.

use std::time::{Duration, Instant};

use super::admin::{DrainState, FleetAdmin};
use super::scale::Step;

/// What the operator remembers of one fleet's scale-in between reconciles.
#[derive(Debug, Default, Clone)]
pub struct ScaleIn {
    /// The pod being drained, and since when.
    draining: Option<(u32, Instant)>,
    /// No new drain before this (the last one timed out).
    held_until: Option<Instant>,
}

/// This round's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Set the StatefulSet to this many replicas (`scaled_in`: the leaving pod is drained).
    Replicas { n: u32, scaled_in: bool },
    /// Keep the count: `ordinal` is handing `remaining` tunnels over.
    Draining {
        ordinal: u32,
        remaining: u64,
        since: Duration,
    },
    /// Keep the count: the drain of `ordinal` did not finish in time and was cancelled.
    TimedOut {
        ordinal: u32,
        remaining: Option<u64>,
        why: String,
    },
    /// Keep the count: scale-in waits after a drain that timed out.
    HeldBack { until: Duration },
}

impl ScaleIn {
    /// Whether a pod is being drained.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// The pod being drained.
    pub fn draining_ordinal(&self) -> Option<u32> {
        self.draining.map(|(o, _)| o)
    }

    /// One round toward `step` for the fleet `ns/name` whose StatefulSet has `current`
    /// replicas.
    pub async fn round(
        &mut self,
        admin: &dyn FleetAdmin,
        (ns, name): (&str, &str),
        current: u32,
        step: Step,
        timeout: Duration,
        now: Instant,
    ) -> Outcome {
        let step = match (step, self.draining) {
            (Step::Hold(_), Some((ordinal, _))) => Step::Drain(ordinal),
            (Step::Hold(n), None) => Step::Set(n),
            (s, _) => s,
        };
        match step {
            Step::Set(n) | Step::Hold(n) => {
                // More pods wanted again: a pod that was leaving stays, and takes sites.
                if let Some((ordinal, _)) = self.draining.take().filter(|(o, _)| *o < n) {
                    if let Err(e) = admin.cancel_drain(ns, name, ordinal).await {
                        tracing::warn!(pod = ordinal, error = %e, "could not cancel a drain");
                    }
                    tracing::info!(
                        pod = ordinal,
                        "scale-in abandoned: the pod stays and takes sites again"
                    );
                }
                Outcome::Replicas { n, scaled_in: false }
            }
            Step::Drain(ordinal) => {
                if let Some(until) = self.held_until.filter(|u| *u > now) {
                    return Outcome::HeldBack {
                        until: until.duration_since(now),
                    };
                }
                self.held_until = None;
                if let Some((other, _)) = self.draining.filter(|(o, _)| *o != ordinal) {
                    // The StatefulSet changed under us: that pod is not the one leaving.
                    let _ = admin.cancel_drain(ns, name, other).await;
                    self.draining = None;
                }
                let since = self.draining.get_or_insert((ordinal, now)).1;
                let waited = now.duration_since(since);
                let (remaining, why) = match admin.drain(ns, name, ordinal).await {
                    Ok(DrainState::Drained) => {
                        self.draining = None;
                        return Outcome::Replicas {
                            n: current.saturating_sub(1),
                            scaled_in: true,
                        };
                    }
                    Ok(DrainState::Draining {
                        remaining,
                        nowhere_to_go: false,
                    }) if waited < timeout => {
                        return Outcome::Draining {
                            ordinal,
                            remaining,
                            since: waited,
                        };
                    }
                    Ok(DrainState::Draining {
                        remaining,
                        nowhere_to_go,
                    }) => (
                        Some(remaining),
                        if nowhere_to_go {
                            "no other pod takes tunnels (all draining?)".to_owned()
                        } else {
                            format!("not drained after {waited:?}: hand-overs failing (see the pod's log)")
                        },
                    ),
                    Ok(DrainState::Active) if waited < timeout => {
                        // Someone cancelled it: ask again.
                        return Outcome::Draining {
                            ordinal,
                            remaining: 0,
                            since: waited,
                        };
                    }
                    Ok(DrainState::Active) => {
                        (None, format!("the pod kept cancelling its drain for {waited:?}"))
                    }
                    Err(e) if waited < timeout => {
                        tracing::warn!(pod = ordinal, error = %e, "cannot reach the leaving pod; retrying");
                        return Outcome::Draining {
                            ordinal,
                            remaining: 0,
                            since: waited,
                        };
                    }
                    Err(e) => (None, format!("unreachable for {waited:?}: {e}")),
                };
                // Given up: the pod serves again, and scale-in waits as long before the next try.
                if let Err(e) = admin.cancel_drain(ns, name, ordinal).await {
                    tracing::warn!(pod = ordinal, error = %e, "could not cancel the timed-out drain");
                }
                self.draining = None;
                self.held_until = Some(now + timeout);
                Outcome::TimedOut {
                    ordinal,
                    remaining,
                    why,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use super::*;
    use crate::fleet::admin::AdminError;
    use crate::fleet::scale::PodReport;

    /// A pod whose drain answers are scripted; records the calls.
    #[derive(Default)]
    struct Script {
        answers: Mutex<Vec<DrainState>>,
        calls: Mutex<Vec<(&'static str, u32)>>,
    }

    impl FleetAdmin for Script {
        fn report<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: u32,
        ) -> BoxFuture<'a, Result<PodReport, AdminError>> {
            Box::pin(async { Ok(PodReport::default()) })
        }
        fn drain<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            o: u32,
        ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
            self.calls.lock().unwrap().push(("drain", o));
            let mut a = self.answers.lock().unwrap();
            let s = if a.len() > 1 { a.remove(0) } else { a[0] };
            Box::pin(async move { Ok(s) })
        }
        fn cancel_drain<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            o: u32,
        ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
            self.calls.lock().unwrap().push(("cancel", o));
            Box::pin(async { Ok(DrainState::Active) })
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(120);
    const FLEET: (&str, &str) = ("vpn", "edge");

    fn draining(remaining: u64) -> DrainState {
        DrainState::Draining {
            remaining,
            nowhere_to_go: false,
        }
    }

    #[tokio::test]
    async fn the_leaving_pod_is_waited_for_then_removed() {
        let pods = Script {
            answers: Mutex::new(vec![draining(5), DrainState::Drained]),
            ..Script::default()
        };
        let mut s = ScaleIn::default();
        let t0 = Instant::now();
        let first = s.round(&pods, FLEET, 3, Step::Drain(2), TIMEOUT, t0).await;
        assert!(matches!(
            first,
            Outcome::Draining {
                ordinal: 2,
                remaining: 5,
                ..
            }
        ));
        assert!(s.is_draining());
        let second = s
            .round(
                &pods,
                FLEET,
                3,
                Step::Drain(2),
                TIMEOUT,
                t0 + Duration::from_secs(3),
            )
            .await;
        assert_eq!(
            second,
            Outcome::Replicas {
                n: 2,
                scaled_in: true
            }
        );
        assert!(!s.is_draining());
    }

    #[tokio::test]
    async fn a_drain_past_its_timeout_is_cancelled_and_scale_in_waits() {
        let pods = Script {
            answers: Mutex::new(vec![draining(7)]),
            ..Script::default()
        };
        let mut s = ScaleIn::default();
        let t0 = Instant::now();
        s.round(&pods, FLEET, 3, Step::Drain(2), TIMEOUT, t0).await;
        let late = s
            .round(&pods, FLEET, 3, Step::Drain(2), TIMEOUT, t0 + TIMEOUT)
            .await;
        assert!(
            matches!(
                late,
                Outcome::TimedOut {
                    ordinal: 2,
                    remaining: Some(7),
                    ..
                }
            ),
            "{late:?}"
        );
        assert_eq!(pods.calls.lock().unwrap().last(), Some(&("cancel", 2)));
        // Held back for as long: no new drain meanwhile.
        let held = s
            .round(
                &pods,
                FLEET,
                3,
                Step::Drain(2),
                TIMEOUT,
                t0 + TIMEOUT + Duration::from_secs(1),
            )
            .await;
        assert!(matches!(held, Outcome::HeldBack { .. }), "{held:?}");
        let calls = pods.calls.lock().unwrap().len();
        let again = s
            .round(
                &pods,
                FLEET,
                3,
                Step::Drain(2),
                TIMEOUT,
                t0 + 2 * TIMEOUT + Duration::from_secs(1),
            )
            .await;
        assert!(matches!(again, Outcome::Draining { .. }), "{again:?}");
        assert_eq!(pods.calls.lock().unwrap().len(), calls + 1, "drained again");
    }

    #[tokio::test]
    async fn a_pod_with_nowhere_to_hand_over_to_is_not_waited_for() {
        let pods = Script {
            answers: Mutex::new(vec![DrainState::Draining {
                remaining: 3,
                nowhere_to_go: true,
            }]),
            ..Script::default()
        };
        let mut s = ScaleIn::default();
        let out = s
            .round(&pods, FLEET, 2, Step::Drain(1), TIMEOUT, Instant::now())
            .await;
        assert!(matches!(out, Outcome::TimedOut { ordinal: 1, .. }), "{out:?}");
    }

    #[tokio::test]
    async fn a_missing_report_mid_drain_neither_cancels_it_nor_starts_another() {
        let pods = Script {
            answers: Mutex::new(vec![draining(4)]),
            ..Script::default()
        };
        let mut s = ScaleIn::default();
        let t0 = Instant::now();
        s.round(&pods, FLEET, 3, Step::Drain(2), TIMEOUT, t0).await;
        let out = s.round(&pods, FLEET, 3, Step::Hold(3), TIMEOUT, t0).await;
        assert!(matches!(out, Outcome::Draining { ordinal: 2, .. }), "{out:?}");
        assert!(!pods.calls.lock().unwrap().iter().any(|(c, _)| *c == "cancel"));
        let idle = ScaleIn::default()
            .round(&pods, FLEET, 3, Step::Hold(3), TIMEOUT, t0)
            .await;
        assert_eq!(
            idle,
            Outcome::Replicas {
                n: 3,
                scaled_in: false
            }
        );
    }

    #[tokio::test]
    async fn scaling_out_mid_drain_keeps_the_pod() {
        let pods = Script {
            answers: Mutex::new(vec![draining(4)]),
            ..Script::default()
        };
        let mut s = ScaleIn::default();
        let t0 = Instant::now();
        s.round(&pods, FLEET, 3, Step::Drain(2), TIMEOUT, t0).await;
        let out = s.round(&pods, FLEET, 3, Step::Set(4), TIMEOUT, t0).await;
        assert_eq!(
            out,
            Outcome::Replicas {
                n: 4,
                scaled_in: false
            }
        );
        assert_eq!(
            *pods.calls.lock().unwrap(),
            [("drain", 2), ("cancel", 2)],
            "the leaving pod was un-drained"
        );
    }
}
