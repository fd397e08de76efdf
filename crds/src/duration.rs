//! Durations as users write them in strongSwan and Kubernetes: `30s`, `10m`, `4h`, `1h30m`.

use std::time::Duration;

use crate::ValidationError;

/// Parses a human duration (`30s`, `4h`, `1h30m`) that must be longer than zero.
pub fn parse(field: &str, value: &str) -> Result<Duration, ValidationError> {
    let d = humantime::parse_duration(value.trim()).map_err(|e| {
        ValidationError::new(
            field,
            format!("'{value}' is not a duration ({e}); write e.g. '30s', '10m', '4h' or '1h30m'"),
        )
    })?;
    if d.is_zero() {
        return Err(ValidationError::new(field, "must be longer than zero"));
    }
    Ok(d)
}

/// Parses an optional duration, falling back to `default`.
pub fn parse_or(field: &str, value: Option<&str>, default: Duration) -> Result<Duration, ValidationError> {
    value.map_or(Ok(default), |v| parse(field, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strongswan_style() {
        assert_eq!(parse("f", "4h").unwrap(), Duration::from_secs(4 * 3600));
        assert_eq!(parse("f", "1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("f", "30s").unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn rejects_garbage_and_zero() {
        let e = parse("spec.ike.lifetime", "soon").unwrap_err();
        assert_eq!(e.field, "spec.ike.lifetime");
        assert!(e.message.contains("'soon'"));
        assert!(parse("f", "0s").is_err());
        assert!(parse("f", "").is_err());
    }
}
