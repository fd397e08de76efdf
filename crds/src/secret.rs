use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A key inside a Kubernetes Secret in the resource's namespace. The standalone gateway reads
/// it from `<config-dir>/secrets/<name>/<key>`, the layout a mounted Secret volume gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret.
    pub key: String,
}

impl SecretKeyRef {
    /// Checks that name and key are usable both as Kubernetes names and as path components.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if !is_dns_subdomain(&self.name) {
            return Err(ValidationError::new(
                format!("{field}.name"),
                format!(
                    "'{}' is not a valid Secret name (lowercase letters, digits, '-' and '.', at most 253 characters)",
                    self.name
                ),
            ));
        }
        if !is_secret_key(&self.key) {
            return Err(ValidationError::new(
                format!("{field}.key"),
                format!(
                    "'{}' is not a valid Secret key (letters, digits, '-', '_' and '.', not '.' or '..')",
                    self.key
                ),
            ));
        }
        Ok(())
    }
}

/// Is `s` a valid name for a Kubernetes object (an RFC 1123 subdomain)?
pub fn is_valid_name(s: &str) -> bool {
    is_dns_subdomain(s)
}

/// RFC 1123 subdomain, as Kubernetes requires for object names.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_secret_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    #[test]
    fn accepts_kubernetes_names() {
        assert!(r("site-psk", "psk").validate("spec.pskSecretRef").is_ok());
        assert!(r("db.creds", "url_v2.txt").validate("x").is_ok());
    }

    #[test]
    fn rejects_path_traversal() {
        let e = r("a", "..").validate("spec.pskSecretRef").unwrap_err();
        assert_eq!(e.field, "spec.pskSecretRef.key");
        let e = r("../etc", "psk").validate("spec.pskSecretRef").unwrap_err();
        assert_eq!(e.field, "spec.pskSecretRef.name");
        assert!(r("a", "x/y").validate("f").is_err());
    }

    #[test]
    fn rejects_uppercase_name() {
        assert!(r("Site", "psk").validate("f").is_err());
    }
}
