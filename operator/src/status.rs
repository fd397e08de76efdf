//! Pure builders for status patches.

use concentrator_crds::ValidationError;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::{Value, json};

/// The `Ready` condition of a status patch. Its `lastTransitionTime` is "the last time the
/// condition transitioned from one status to another" (the `Condition` API): it is carried
/// over from `previous` when the status stays the same, and is `now` only on a transition.
/// Rewriting it on every reconcile would make each status write a change, and each change a
/// watch event that triggers the next reconcile: a loop.
pub fn ready_condition(
    previous: &[Condition],
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Value {
    condition(
        previous,
        "Ready",
        status,
        (reason, message),
        generation,
        now_rfc3339,
    )
}

/// A condition of type `type_`, its `lastTransitionTime` kept from `previous` unless its
/// status changed.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    (reason, message): (&str, &str),
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Value {
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| serde_json::to_value(&c.last_transition_time).ok())
        .filter(|t| t.is_string())
        .unwrap_or_else(|| json!(now_rfc3339));
    json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// Why an object is not Ready: the condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl From<ValidationError> for Problem {
    fn from(e: ValidationError) -> Self {
        Self {
            reason: "Invalid",
            message: e.to_string(),
        }
    }
}

/// Whether `previous` holds a `Ready` condition with exactly this status, reason and message:
/// an Event is published only on a change, not on every reconcile.
pub fn ready_unchanged(previous: &[Condition], status: &str, reason: &str, message: &str) -> bool {
    previous
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == status && c.reason == reason && c.message == message)
}

/// The `status` body for an object whose spec at `generation` (and what it refers to) was
/// found to be `result`, given the conditions it has now.
pub fn ready_status(
    result: &Result<(), Problem>,
    generation: Option<i64>,
    previous: &[Condition],
    now_rfc3339: &str,
) -> Value {
    let (status, reason, message) = match result {
        Ok(()) => ("True", "Valid", "spec is valid".to_owned()),
        Err(p) => ("False", p.reason, p.message.clone()),
    };
    json!({
        "observedGeneration": generation,
        "conditions": [ready_condition(previous, status, reason, &message, generation, now_rfc3339)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(status: &str, at: &str) -> Vec<Condition> {
        serde_json::from_value(json!([{
            "type": "Ready", "status": status, "reason": "Valid", "message": "spec is valid",
            "observedGeneration": 1, "lastTransitionTime": at,
        }]))
        .unwrap()
    }

    #[test]
    fn invalid_spec_gives_ready_false_with_field() {
        let e = ValidationError::new("spec.localSubnet", "'x' is not a CIDR subnet");
        let s = ready_status(&Err(e.into()), Some(3), &[], "2026-11-22T00:00:00Z");
        let c = &s["conditions"][0];
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Invalid");
        assert!(c["message"].as_str().unwrap().starts_with("spec.localSubnet:"));
        assert_eq!(s["observedGeneration"], 3);
    }

    #[test]
    fn valid_spec_gives_ready_true() {
        let s = ready_status(&Ok(()), Some(1), &[], "2026-11-22T00:00:00Z");
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][0]["lastTransitionTime"], "2026-11-22T00:00:00Z");
    }

    #[test]
    fn same_status_keeps_last_transition_time() {
        let before = observed("True", "2026-11-22T00:00:00Z");
        let s = ready_status(&Ok(()), Some(2), &before, "2026-11-22T01:00:00Z");
        assert_eq!(s["conditions"][0]["lastTransitionTime"], "2026-11-22T00:00:00Z");
        assert_eq!(s["conditions"][0]["observedGeneration"], 2);
    }

    #[test]
    fn status_change_moves_last_transition_time() {
        let before = observed("True", "2026-11-22T00:00:00Z");
        let e = ValidationError::new("spec.localSubnet", "'x' is not a CIDR subnet");
        let s = ready_status(&Err(e.into()), Some(2), &before, "2026-11-22T01:00:00Z");
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(s["conditions"][0]["lastTransitionTime"], "2026-11-22T01:00:00Z");
    }

    #[test]
    fn same_status_and_reason_keeps_time_across_message_changes() {
        let before = observed("False", "2026-11-22T00:00:00Z");
        let c = ready_condition(
            &before,
            "False",
            "SecretMissing",
            "Secret 'x' not found",
            Some(1),
            "2026-11-22T02:00:00Z",
        );
        assert_eq!(c["lastTransitionTime"], "2026-11-22T00:00:00Z");
    }
}
