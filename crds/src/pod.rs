//! `GatewayFleet.spec.pod`: what a cluster's operators set on the gateway pods themselves
//! (scheduling, resources, pull secrets, metadata, observability variables). The types are
//! Kubernetes' own (k8s-openapi), so the CRD carries the real schema of each field and the
//! operator copies them into the pod template unchanged.
//!
//! Everything else in the pod template is the operator's: its selector labels, and every
//! `CONCENTRATOR_*` variable (a fleet's etcd, key and admin TLS come from the spec, never from
//! a variable set by hand), so validation refuses what would override them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::secret::is_dns_subdomain;

/// The labels the operator puts on every object and pod of a fleet: the first two are the
/// StatefulSet's selector, and none can be set through `spec.pod.labels`.
pub const OPERATOR_LABELS: [&str; 4] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
];

/// Settings of the gateway pods, copied into the StatefulSet's pod template as given. Every
/// field is optional; unset, the pod template is what the operator builds on its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// CPU and memory requests and limits of the gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a node must have to run a gateway pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the gateway pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the gateway pods. The pods carry the labels
    /// `app.kubernetes.io/name: concentrator-gateway` and `app.kubernetes.io/instance: <fleet>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the gateway pods spread over zones or nodes; select them with the labels named
    /// under `affinity`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling the gateway image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Annotations of the gateway pods (exactly these: a change rolls the pods).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Labels of the gateway pods, besides the operator's own (which cannot be set here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Observability settings of the gateway container: `RUST_LOG` and `OTEL_*` variables
    /// only (value or valueFrom); the `CONCENTRATOR_*` variables are the operator's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

impl PodOverrides {
    /// Nothing is overridden: the pod template is the operator's alone.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Checks what Kubernetes would refuse only when the operator applies the StatefulSet
    /// (label and annotation syntax, quantities, requests above limits), and what this
    /// field must not do (override the operator's labels or variables). `field` is the path
    /// of this block, `spec.pod`.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if let Some(r) = &self.resources {
            validate_resources(&format!("{field}.resources"), r)?;
        }
        validate_labels(&format!("{field}.nodeSelector"), &self.node_selector)?;
        if let Some(p) = &self.priority_class_name
            && !is_dns_subdomain(p)
        {
            return Err(ValidationError::new(
                format!("{field}.priorityClassName"),
                format!("'{p}' is not a PriorityClass name"),
            ));
        }
        for (i, s) in self.image_pull_secrets.iter().enumerate() {
            if !is_dns_subdomain(&s.name) {
                return Err(ValidationError::new(
                    format!("{field}.imagePullSecrets[{i}].name"),
                    format!("'{}' is not a valid Secret name", s.name),
                ));
            }
        }
        validate_annotations(&format!("{field}.annotations"), &self.annotations)?;
        validate_labels(&format!("{field}.labels"), &self.labels)?;
        if let Some(k) = self.labels.keys().find(|k| OPERATOR_LABELS.contains(&k.as_str())) {
            return Err(ValidationError::new(
                format!("{field}.labels"),
                format!(
                    "'{k}' is set by the operator (it selects the fleet's pods) and cannot be overridden"
                ),
            ));
        }
        validate_env(&format!("{field}.env"), &self.env)
    }
}

/// Is `name` a variable `spec.pod.env` may set?
pub fn is_passthrough_env(name: &str) -> bool {
    name == "RUST_LOG"
        || name.strip_prefix("OTEL_").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
}

fn validate_env(field: &str, env: &[EnvVar]) -> Result<(), ValidationError> {
    for (i, e) in env.iter().enumerate() {
        if !is_passthrough_env(&e.name) {
            return Err(ValidationError::new(
                format!("{field}[{i}].name"),
                format!(
                    "'{}' cannot be set here: only RUST_LOG and OTEL_* variables (observability) pass \
                     through; the operator sets the gateway's CONCENTRATOR_* variables from the spec",
                    e.name
                ),
            ));
        }
        if env[..i].iter().any(|p| p.name == e.name) {
            return Err(ValidationError::new(
                format!("{field}[{i}].name"),
                format!("'{}' is set twice", e.name),
            ));
        }
        if e.value.as_deref().is_some_and(|v| !v.is_empty()) && e.value_from.is_some() {
            return Err(ValidationError::new(
                format!("{field}[{i}]"),
                "has both value and valueFrom: set one",
            ));
        }
    }
    Ok(())
}

/// Kubernetes' qualified name (label and annotation keys, resource names): an optional DNS
/// subdomain prefix and `/`, then at most 63 letters, digits, `-`, `_`, `.`, starting and
/// ending alphanumeric.
pub fn is_qualified_name(s: &str) -> bool {
    let name = match s.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return false;
            }
            name
        }
        None => s,
    };
    !name.is_empty() && is_label_value(name)
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`, starting and ending
/// alphanumeric.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    s.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

/// Label keys and values (labels, node selectors).
pub(crate) fn validate_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    for (k, v) in labels {
        if !is_qualified_name(k) {
            return Err(ValidationError::new(
                field,
                format!(
                    "'{k}' is not a label key (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_', '.')"
                ),
            ));
        }
        if !is_label_value(v) {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                format!(
                    "'{v}' is not a label value (at most 63 letters, digits, '-', '_', '.', alphanumeric at both ends)"
                ),
            ));
        }
    }
    Ok(())
}

/// The most bytes of annotations (keys and values) Kubernetes accepts on one object.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// Annotation keys, and their total size.
pub(crate) fn validate_annotations(
    field: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    if let Some(k) = annotations.keys().find(|k| !is_qualified_name(k)) {
        return Err(ValidationError::new(
            field,
            format!(
                "'{k}' is not an annotation key (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_', '.')"
            ),
        ));
    }
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > ANNOTATIONS_MAX_BYTES {
        return Err(ValidationError::new(
            field,
            format!("{size} bytes, more than Kubernetes' {ANNOTATIONS_MAX_BYTES}"),
        ));
    }
    Ok(())
}

fn validate_resources<'a>(field: &str, r: &'a ResourceRequirements) -> Result<(), ValidationError> {
    // (value, as written) of each request and limit
    let parse = |which: &str, map: &'a Option<BTreeMap<String, Quantity>>| {
        let mut out = BTreeMap::new();
        for (name, q) in map.iter().flatten() {
            if !is_qualified_name(name) {
                return Err(ValidationError::new(
                    format!("{field}.{which}"),
                    format!("'{name}' is not a resource name"),
                ));
            }
            let v = parse_quantity(&q.0).filter(|v| *v >= 0.0).ok_or_else(|| {
                ValidationError::new(
                    format!("{field}.{which}.{name}"),
                    format!("'{}' is not a quantity (e.g. 500m, 2, 256Mi, 1Gi)", q.0),
                )
            })?;
            out.insert(name.as_str(), (v, q.0.as_str()));
        }
        Ok::<_, ValidationError>(out)
    };
    let requests = parse("requests", &r.requests)?;
    let limits = parse("limits", &r.limits)?;
    for (name, (req, req_text)) in &requests {
        if let Some((lim, lim_text)) = limits.get(name)
            && req > lim
        {
            return Err(ValidationError::new(
                format!("{field}.requests.{name}"),
                format!("'{req_text}' is above its limit '{lim_text}'"),
            ));
        }
    }
    Ok(())
}

/// A Kubernetes quantity (`<signed number><suffix>`, the suffix one of `Ki Mi Gi Ti Pi Ei`,
/// `m k M G T P E` or an exponent `e<n>`/`E<n>`), as a float: precise enough to compare a
/// request with its limit.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1.0, &s[1..]),
        b'-' => (-1.0, &s[1..]),
        _ => (1.0, s),
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(exp.parse().ok()?)
        }
    };
    Some(sign * n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> PodOverrides {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn refused(yaml: &str) -> ValidationError {
        pod(yaml).validate("spec.pod").unwrap_err()
    }

    #[test]
    fn accepts_every_field_as_kubernetes_writes_it() {
        let p = pod(r#"
resources: {requests: {cpu: 500m, memory: 256Mi}, limits: {memory: 1Gi}}
nodeSelector: {kubernetes.io/os: linux, node-role/vpn: ""}
tolerations: [{key: dedicated, operator: Equal, value: vpn, effect: NoSchedule}]
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector: {matchLabels: {app.kubernetes.io/instance: edge}}
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway,
     labelSelector: {matchLabels: {app.kubernetes.io/instance: edge}}}
priorityClassName: vpn-critical
imagePullSecrets: [{name: registry-creds}]
annotations: {prometheus.io/scrape: "true"}
labels: {team: network}
env:
  - {name: RUST_LOG, value: "info,concentrator_gateway=debug"}
  - {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: "http://otel-collector:4317"}
  - {name: OTEL_EXPORTER_OTLP_HEADERS, valueFrom: {secretKeyRef: {name: otel, key: headers}}}
"#);
        p.validate("spec.pod").unwrap();
        assert!(!p.is_empty());
        assert!(PodOverrides::default().is_empty());
        assert!(pod("{}").is_empty());
    }

    #[test]
    fn rejects_operator_variables_naming_the_entry() {
        let e = refused(
            "env: [{name: RUST_LOG, value: info}, {name: OTEL_SERVICE_NAME, value: gw}, {name: CONCENTRATOR_FLEET_ETCD, value: x}]",
        );
        assert_eq!(e.field, "spec.pod.env[2].name", "{e}");
        assert!(e.message.contains("CONCENTRATOR_FLEET_ETCD"), "{e}");
        for bad in ["PATH", "OTEL_", "otel_service_name", "RUST_BACKTRACE", "POD_IP"] {
            assert!(!is_passthrough_env(bad), "{bad}");
        }
        let e = refused("env: [{name: RUST_LOG, value: info}, {name: RUST_LOG, value: debug}]");
        assert_eq!(e.field, "spec.pod.env[1].name", "{e}");
        let e =
            refused("env: [{name: RUST_LOG, value: info, valueFrom: {configMapKeyRef: {name: a, key: b}}}]");
        assert_eq!(e.field, "spec.pod.env[0]", "{e}");
    }

    #[test]
    fn rejects_the_operators_labels() {
        for key in OPERATOR_LABELS {
            let e = refused(&format!("labels: {{{key}: x}}"));
            assert_eq!(e.field, "spec.pod.labels", "{e}");
            assert!(e.message.contains(key), "{e}");
        }
    }

    #[test]
    fn rejects_bad_label_and_annotation_syntax() {
        assert_eq!(refused("labels: {'bad key': x}").field, "spec.pod.labels");
        assert_eq!(refused("labels: {team: 'a b'}").field, "spec.pod.labels.team");
        assert_eq!(refused("nodeSelector: {'-x': y}").field, "spec.pod.nodeSelector");
        assert_eq!(
            refused("annotations: {'Bad_Prefix/x': y}").field,
            "spec.pod.annotations"
        );
        assert_eq!(
            refused("priorityClassName: Critical").field,
            "spec.pod.priorityClassName"
        );
        assert_eq!(
            refused("imagePullSecrets: [{name: ok}, {name: 'Not_OK'}]").field,
            "spec.pod.imagePullSecrets[1].name"
        );
        let big = "x".repeat(ANNOTATIONS_MAX_BYTES);
        assert_eq!(
            refused(&format!("annotations: {{a: {big}}}")).field,
            "spec.pod.annotations"
        );
        assert!(is_qualified_name("example.com/a.b_c-d"));
        assert!(!is_qualified_name("example.com/"));
        assert!(!is_qualified_name(&"a".repeat(64)));
    }

    #[test]
    fn rejects_bad_quantities_and_requests_above_limits() {
        assert_eq!(
            refused("resources: {requests: {cpu: lots}}").field,
            "spec.pod.resources.requests.cpu"
        );
        assert_eq!(
            refused("resources: {limits: {memory: -1Gi}}").field,
            "spec.pod.resources.limits.memory"
        );
        let e = refused("resources: {requests: {memory: 2Gi}, limits: {memory: 1500Mi}}");
        assert_eq!(e.field, "spec.pod.resources.requests.memory", "{e}");
        assert!(e.message.contains("'2Gi' is above its limit '1500Mi'"), "{e}");
        pod("resources: {requests: {cpu: '1', memory: 1Gi}, limits: {cpu: 1000m, memory: 1024Mi}}")
            .validate("spec.pod")
            .unwrap();
    }

    #[test]
    fn parses_quantities_as_kubernetes_does() {
        for (q, v) in [
            ("1", 1.0),
            ("500m", 0.5),
            ("1.5", 1.5),
            (".5", 0.5),
            ("2k", 2000.0),
            ("1Ki", 1024.0),
            ("256Mi", 268_435_456.0),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("+2", 2.0),
            ("-1", -1.0),
        ] {
            assert_eq!(parse_quantity(q), Some(v), "{q}");
        }
        for bad in ["", "m", "1.2.3", "1KB", "1e", "1e+", "Gi", ".", "1 Gi"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
