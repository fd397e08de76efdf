//! Pure builders for status patches.

use concentrator_crds::ValidationError;
use serde_json::{Value, json};

/// The `status` body for an object whose spec at `generation` validated to `result`.
pub fn ready_status(
    result: &Result<(), ValidationError>,
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Value {
    let (status, reason, message) = match result {
        Ok(()) => ("True", "Valid", "spec is valid".to_owned()),
        Err(e) => ("False", "Invalid", e.to_string()),
    };
    json!({
        "observedGeneration": generation,
        "conditions": [{
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": now_rfc3339,
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_spec_gives_ready_false_with_field() {
        let e = ValidationError::new("spec.localSubnet", "'x' is not a CIDR subnet");
        let s = ready_status(&Err(e), Some(3), "2026-11-22T00:00:00Z");
        let c = &s["conditions"][0];
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Invalid");
        assert!(c["message"].as_str().unwrap().starts_with("spec.localSubnet:"));
        assert_eq!(s["observedGeneration"], 3);
    }

    #[test]
    fn valid_spec_gives_ready_true() {
        let s = ready_status(&Ok(()), Some(1), "2026-11-22T00:00:00Z");
        assert_eq!(s["conditions"][0]["status"], "True");
    }
}
