//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas never
//! both act. kube 5 has no lease module; this is the small lock the client-go leader elector
//! implements: hold the Lease by renewing it, take it over only once it has expired, and let
//! the API server's optimistic concurrency (resourceVersion) pick one winner of a race.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew before it expires.
    Renew,
    /// Someone else holds it until then.
    Wait { holder: String, until: Timestamp },
}

/// Decides from the Lease alone; `now` is an argument so the rules are testable.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed.and_then(|r| r.checked_add(duration).ok()) {
        Some(until) if until > now => Decision::Wait { holder, until },
        _ => Decision::Acquire,
    }
}

/// A Lease held (or wanted) by this process.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// How often to try: every 2 s (client-go's retry period), or a third of a shorter lease,
    /// so that several tries fit in the leader's renew deadline.
    pub fn renew_interval(&self) -> Duration {
        Duration::from_secs(2).min(self.duration / 3)
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease. `Ok(true)`: we lead until `now + duration`. `Ok(false)`:
    /// someone else leads, or won a race for it.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(current.as_ref(), &self.identity, now);
        let next = match (&decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
            (Decision::Renew, Some(mut l)) => {
                let old = l.spec.take().unwrap_or_default();
                l.spec = Some(self.spec(now, old.acquire_time, old.lease_transitions.unwrap_or(0)));
                l
            }
            (Decision::Acquire, Some(mut l)) => {
                let transitions = l.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                l.spec = Some(self.spec(now, None, transitions.saturating_add(1)));
                l
            }
        };
        // `replace` carries the resourceVersion we read: if anyone wrote in between, the API
        // server answers 409 and we did not get it.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl LeaseLock {
    /// Gives the Lease up on a clean shutdown so a standby takes over at once instead of
    /// waiting for it to expire. Does nothing if someone else holds it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut l) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.identity.as_str()) {
            return Ok(());
        }
        if let Some(s) = l.spec.as_mut() {
            s.holder_identity = None;
            s.renew_time = None;
        }
        match self.api.replace(&self.name, &PostParams::default(), &l).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..LeaseSpec::default()
            }),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn takes_a_missing_or_unheld_lease() {
        assert_eq!(decide(None, "a", now()), Decision::Acquire);
        assert_eq!(decide(Some(&lease("", 0, 15)), "a", now()), Decision::Acquire);
    }

    #[test]
    fn renews_its_own() {
        assert_eq!(decide(Some(&lease("a", 100, 15)), "a", now()), Decision::Renew);
    }

    #[test]
    fn waits_for_a_live_holder_and_takes_over_an_expired_one() {
        assert!(
            matches!(decide(Some(&lease("b", 5, 15)), "a", now()), Decision::Wait { holder, .. } if holder == "b")
        );
        assert_eq!(decide(Some(&lease("b", 16, 15)), "a", now()), Decision::Acquire);
    }
}
