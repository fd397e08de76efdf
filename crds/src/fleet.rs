//! `GatewayFleet`: the gateway pods behind one address, their scaling bounds, front mode and
//! shared state. The operator reconciles it into the workload and Services.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::pod::{PodOverrides, validate_annotations};
use crate::{SecretKeyRef, ValidationError, duration};

/// A fleet of gateway pods terminating IKE and ESP behind one address.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vpn.concentrator.io",
    version = "v1alpha1",
    kind = "GatewayFleet",
    namespaced,
    status = "GatewayFleetStatus",
    shortname = "gwf",
    category = "concentrator",
    printcolumn = r#"{"name":"Front","type":"string","jsonPath":".spec.front.mode"}"#,
    printcolumn = r#"{"name":"Min","type":"integer","jsonPath":".spec.scaling.minReplicas"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.scaling.maxReplicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Tunnels","type":"integer","jsonPath":".status.tunnels"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GatewayFleetSpec {
    /// Container image of the gateway. Default: the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Replica bounds and autoscaling targets.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// How sites reach the pods.
    #[serde(default)]
    pub front: FrontSpec,
    /// etcd holding membership, leases and dynamic-eroute ownership.
    pub etcd: EtcdSpec,
    /// How the tunnels of a pod that dies live on at others.
    #[serde(default)]
    pub takeover: TakeoverSpec,
    /// Secret key with the fleet key that encrypts replicated SA state.
    pub fleet_key_secret_ref: SecretKeyRef,
    /// Name of a Secret with `tls.crt`, `tls.key` and `ca.crt` (a `kubernetes.io/tls` Secret
    /// as cert-manager writes it) for the pods' admin gRPC API: mutual TLS on the pod network,
    /// reached by the operator (load reports, drain) and by the pods among themselves. The
    /// certificate must carry the DNS name `concentrator-gateway` and serve both as server and
    /// client; `ca.crt` must also sign the operator's client certificate. Unset: the admin API
    /// listens on each pod's loopback only, so the fleet keeps `minReplicas` pods (no
    /// load-based scaling, no drain before scale-in or deletion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_tls_secret_name: Option<String>,
    /// The NetworkPolicy of the gateway pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// Secret key holding the default site database URL (`mysql://...`) of the pods, used by
    /// Egroups that name no database of their own. Unset: each pod's embedded SQLite store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_database_url_secret_ref: Option<SecretKeyRef>,
    /// Settings of the gateway pods: resources, scheduling, pull secrets, metadata and
    /// observability variables. Unset: the pods as the operator builds them.
    #[serde(default, skip_serializing_if = "PodOverrides::is_empty")]
    pub pod: PodOverrides,
}

/// Replica bounds and autoscaling targets. Each field has its own default, so a partial block
/// (`scaling: {maxReplicas: 4}`) is complete: serde fills in the rest, and the CRD carries
/// each field's default (none is `required`), so the API server does the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ScalingSpec {
    /// Never fewer pods than this. Default: 2.
    pub min_replicas: u32,
    /// Never more pods than this. Default: 10.
    pub max_replicas: u32,
    /// Tunnels per pod the autoscaler aims for. Default: 5000.
    pub target_tunnels_per_pod: u32,
    /// CPU use per pod the autoscaler aims for, in percent of one core. Default: 70.
    pub target_cpu_percent: u32,
    /// How long a lower replica count must be wanted before scaling in (`5m`). Default: 5m.
    pub stabilization_window: String,
    /// How long scale-in waits for the leaving pod to hand its tunnels over (`2m`): past it,
    /// the drain is cancelled, a Warning Event and the ScaleIn condition say what is stuck,
    /// and scale-in is tried again after as long. Default: 2m.
    pub drain_timeout: String,
}

impl ScalingSpec {
    /// The drain timeout, parsed (the spec was validated: the default if it does not parse).
    pub fn drain_timeout(&self) -> Duration {
        duration::parse("spec.scaling.drainTimeout", &self.drain_timeout).unwrap_or(Duration::from_secs(120))
    }
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_replicas: 2,
            max_replicas: 10,
            target_tunnels_per_pod: 5000,
            target_cpu_percent: 70,
            stabilization_window: "5m".into(),
            drain_timeout: "2m".into(),
        }
    }
}

/// How the tunnels of a pod that dies live on at others (docs/fleet.md, "When a member
/// dies"). Each field has its own default, so a partial block is complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TakeoverSpec {
    /// On how many other pods each tunnel's state is copied: any `copies` pods lost at once
    /// lose no tunnel. 0 turns replication off (a dead pod's sites reconnect). 0 to 4.
    /// Default: 1.
    #[schemars(range(max = 4))]
    pub copies: u8,
    /// After a take-over, synchronize IKE Message IDs with sites that announced RFC 6311
    /// (AES-CBC IKE SAs only). Default: false (see docs/fleet.md).
    pub message_id_sync: bool,
}

impl Default for TakeoverSpec {
    fn default() -> Self {
        Self {
            copies: 1,
            message_id_sync: false,
        }
    }
}

/// The most copies of each tunnel's state a fleet keeps.
pub const MAX_TAKEOVER_COPIES: u8 = 4;

/// How sites reach the pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontSpec {
    /// Slb: one Service with ClientIP affinity. Vip: a director redirects to per-pod addresses.
    #[serde(default)]
    pub mode: FrontMode,
    /// Type of the front Service. Default: LoadBalancer.
    #[serde(default)]
    pub service_type: FrontServiceType,
    /// Fixed address for the front (the VIP sites connect to), when the platform allows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Vip only: the director redirects a new site in its IKE_AUTH response, once it has
    /// authenticated (RFC 5685 §6), rather than in IKE_SA_INIT. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_in_auth: bool,
    /// Vip only: a pod holding more than its share of tunnels redirects established sites
    /// that support it to the least-loaded pod (each renegotiates; never one site twice in
    /// 300 s). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebalance: bool,
    /// Annotations of the front Service and, in the Vip front, of each per-pod Service (a
    /// cloud load balancer's settings, e.g.).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// LoadBalancer only: the load balancer implementation of the front Services
    /// (`spec.loadBalancerClass`). Kubernetes keeps it as the Services were created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    /// LoadBalancer only: the source CIDRs the platform's load balancer admits
    /// (`spec.loadBalancerSourceRanges`). Empty: every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
}

impl FrontSpec {
    /// Checks the front's address and its Service overrides.
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(a) = &self.address
            && a.parse::<std::net::IpAddr>().is_err()
        {
            return Err(ValidationError::new(
                "spec.front.address",
                format!("'{a}' is not an IP address"),
            ));
        }
        validate_annotations("spec.front.annotations", &self.annotations)?;
        let load_balancer = self.service_type == FrontServiceType::LoadBalancer;
        if let Some(class) = &self.load_balancer_class {
            if !crate::pod::is_qualified_name(class) {
                return Err(ValidationError::new(
                    "spec.front.loadBalancerClass",
                    format!(
                        "'{class}' is not a load balancer class (a label-style name, e.g. 'example.com/internal-vip')"
                    ),
                ));
            }
            if !load_balancer {
                return Err(ValidationError::new(
                    "spec.front.loadBalancerClass",
                    "needs serviceType LoadBalancer",
                ));
            }
        }
        for (i, r) in self.load_balancer_source_ranges.iter().enumerate() {
            let field = || format!("spec.front.loadBalancerSourceRanges[{i}]");
            if r.parse::<ipnet::IpNet>().is_err() {
                return Err(ValidationError::new(
                    field(),
                    format!("'{r}' is not a CIDR (e.g. 198.51.100.0/24 or 2001:db8::/32)"),
                ));
            }
            if !load_balancer {
                return Err(ValidationError::new(field(), "needs serviceType LoadBalancer"));
            }
        }
        Ok(())
    }
}

/// How sites reach the pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FrontMode {
    /// A Service on UDP 500/4500 with `sessionAffinity: ClientIP`; SPI routing fixes the rest.
    #[default]
    Slb,
    /// An elected director on the VIP sends IKEv2 REDIRECT to the least-loaded pod.
    Vip,
}

/// Type of the front Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FrontServiceType {
    #[default]
    LoadBalancer,
    NodePort,
}

/// The NetworkPolicy the operator applies to a fleet's pods. It admits only: IKE and ESP in
/// UDP (500, 4500) from anywhere, the fleet port (4510 UDP and TCP) from the fleet's own pods,
/// the admin API from the operator's pods and the fleet's own, and metrics from the namespaces
/// named here. Egress is not restricted (etcd, site databases and sites can be anywhere).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkPolicySpec {
    /// Apply the NetworkPolicy. Default: true.
    pub enabled: bool,
    /// Namespaces (by name) whose pods may scrape the metrics port (9090), e.g. where
    /// Prometheus runs. Empty: every namespace. Default: empty.
    pub metrics_namespaces: Vec<String>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            metrics_namespaces: Vec::new(),
        }
    }
}

/// etcd endpoints and credentials.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSpec {
    /// Client URLs (`https://etcd-0.etcd:2379`).
    pub endpoints: Vec<String>,
    /// Name of a Secret with `ca.crt`, `tls.crt`, `tls.key` for etcd client TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
}

/// What the operator observed of the fleet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayFleetStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods that exist.
    #[serde(default)]
    pub replicas: u32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Established tunnels across the fleet.
    #[serde(default)]
    pub tunnels: u64,
}

impl GatewayFleetSpec {
    /// Validates the spec; returns the parsed stabilisation window.
    pub fn validate(&self) -> Result<Duration, ValidationError> {
        let s = &self.scaling;
        if s.min_replicas == 0 {
            return Err(ValidationError::new(
                "spec.scaling.minReplicas",
                "must be at least 1",
            ));
        }
        if s.max_replicas < s.min_replicas {
            return Err(ValidationError::new(
                "spec.scaling.maxReplicas",
                format!("{} is below minReplicas {}", s.max_replicas, s.min_replicas),
            ));
        }
        if s.target_tunnels_per_pod == 0 {
            return Err(ValidationError::new(
                "spec.scaling.targetTunnelsPerPod",
                "must be at least 1",
            ));
        }
        if !(1..=100).contains(&s.target_cpu_percent) {
            return Err(ValidationError::new(
                "spec.scaling.targetCpuPercent",
                format!("{} is not a percentage between 1 and 100", s.target_cpu_percent),
            ));
        }
        let window = duration::parse("spec.scaling.stabilizationWindow", &s.stabilization_window)?;
        if duration::parse("spec.scaling.drainTimeout", &s.drain_timeout)?.is_zero() {
            return Err(ValidationError::new(
                "spec.scaling.drainTimeout",
                "must be longer than 0s (a drain needs time to hand the tunnels over)",
            ));
        }
        if self.takeover.copies > MAX_TAKEOVER_COPIES {
            return Err(ValidationError::new(
                "spec.takeover.copies",
                format!(
                    "{} is more than {MAX_TAKEOVER_COPIES} copies of each tunnel",
                    self.takeover.copies
                ),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(ValidationError::new(
                "spec.etcd.endpoints",
                "needs at least one etcd client URL (e.g. http://etcd:2379)",
            ));
        }
        for (i, e) in self.etcd.endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() <= "https://".len() {
                return Err(ValidationError::new(
                    format!("spec.etcd.endpoints[{i}]"),
                    format!("'{e}' is not an etcd client URL; write e.g. 'http://etcd:2379'"),
                ));
            }
        }
        self.fleet_key_secret_ref.validate("spec.fleetKeySecretRef")?;
        if let Some(r) = &self.site_database_url_secret_ref {
            r.validate("spec.siteDatabaseUrlSecretRef")?;
        }
        if let Some(name) = &self.admin_tls_secret_name
            && !crate::secret::is_valid_name(name)
        {
            return Err(ValidationError::new(
                "spec.adminTlsSecretName",
                format!("'{name}' is not a valid Secret name"),
            ));
        }
        for (i, ns) in self.network_policy.metrics_namespaces.iter().enumerate() {
            if !crate::secret::is_valid_name(ns) || ns.contains('.') || ns.len() > 63 {
                return Err(ValidationError::new(
                    format!("spec.networkPolicy.metricsNamespaces[{i}]"),
                    format!("'{ns}' is not a namespace name"),
                ));
            }
        }
        self.front.validate()?;
        self.pod.validate("spec.pod")?;
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GatewayFleetSpec {
        serde_yaml::from_str(
            "etcd:\n  endpoints: [\"http://etcd:2379\"]\nfleetKeySecretRef: {name: fleet, key: key}\n",
        )
        .unwrap()
    }

    #[test]
    fn defaults_validate() {
        let s = spec();
        assert_eq!(s.front.mode, FrontMode::Slb);
        assert_eq!(s.validate().unwrap(), Duration::from_secs(300));
    }

    #[test]
    fn network_policy_is_on_by_default_and_names_are_checked() {
        let s = spec();
        assert!(s.network_policy.enabled);
        assert!(s.network_policy.metrics_namespaces.is_empty());
        let mut s = spec();
        s.admin_tls_secret_name = Some("Admin_TLS".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.adminTlsSecretName");
        let mut s = spec();
        s.network_policy.metrics_namespaces = vec!["monitoring".into(), "bad.name".into()];
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.networkPolicy.metricsNamespaces[1]"
        );
        let mut s = spec();
        s.admin_tls_secret_name = Some("edge-admin-tls".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn partial_scaling_block_takes_each_default() {
        let s: GatewayFleetSpec = serde_yaml::from_str(
            "scaling: {maxReplicas: 4}\netcd:\n  endpoints: [\"http://etcd:2379\"]\nfleetKeySecretRef: {name: fleet, key: key}\n",
        )
        .unwrap();
        assert_eq!(
            s.scaling,
            ScalingSpec {
                max_replicas: 4,
                ..ScalingSpec::default()
            }
        );
    }

    #[test]
    fn crd_requires_no_scaling_field_and_defaults_each() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(GatewayFleet::crd()).unwrap();
        let scaling = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["scaling"];
        assert!(
            scaling.get("required").is_none(),
            "scaling must not require fields that have defaults: {}",
            scaling["required"]
        );
        let d = ScalingSpec::default();
        let props = &scaling["properties"];
        assert_eq!(props["minReplicas"]["default"], d.min_replicas);
        assert_eq!(props["maxReplicas"]["default"], d.max_replicas);
        assert_eq!(props["targetTunnelsPerPod"]["default"], d.target_tunnels_per_pod);
        assert_eq!(props["targetCpuPercent"]["default"], d.target_cpu_percent);
        assert_eq!(props["stabilizationWindow"]["default"], d.stabilization_window);
    }

    #[test]
    fn crd_schema_of_the_pod_settings_is_kubernetes_own() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(GatewayFleet::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let pod = &spec["properties"]["pod"];
        // No default: the API server adds nothing to fleets that set none.
        assert!(pod.get("default").is_none(), "{pod}");
        assert!(!spec["required"].as_array().unwrap().contains(&"pod".into()));
        let p = &pod["properties"];
        // Typed all the way down (no preserve-unknown-fields): a misspelt field is refused by
        // kubectl's strict field validation, or pruned, never stored.
        assert_eq!(
            p["affinity"]["properties"]["podAntiAffinity"]["properties"]["preferredDuringSchedulingIgnoredDuringExecution"]
                ["items"]["properties"]["weight"]["type"],
            "integer"
        );
        assert_eq!(p["env"]["items"]["required"], serde_json::json!(["name"]));
        assert_eq!(
            p["resources"]["properties"]["limits"]["additionalProperties"]["x-kubernetes-int-or-string"],
            true
        );
        assert_eq!(
            p["topologySpreadConstraints"]["items"]["required"],
            serde_json::json!(["maxSkew", "topologyKey", "whenUnsatisfiable"])
        );
        assert!(
            !serde_json::to_string(&crd)
                .unwrap()
                .contains("x-kubernetes-preserve-unknown-fields")
        );
        let front = &spec["properties"]["front"];
        assert_eq!(
            front["default"],
            serde_json::json!({"mode": "Slb", "serviceType": "LoadBalancer"})
        );
        assert_eq!(
            front["properties"]["loadBalancerSourceRanges"]["items"]["type"],
            "string"
        );
    }

    #[test]
    fn takeover_keeps_one_copy_by_default_and_at_most_four() {
        let mut s = spec();
        assert_eq!(s.takeover, TakeoverSpec::default());
        assert_eq!(s.takeover.copies, 1);
        let partial: GatewayFleetSpec = serde_yaml::from_str(
            "takeover: {messageIdSync: true}\netcd:\n  endpoints: [\"http://etcd:2379\"]\nfleetKeySecretRef: {name: fleet, key: key}\n",
        )
        .unwrap();
        assert_eq!(partial.takeover.copies, 1);
        assert!(partial.takeover.message_id_sync);
        s.takeover.copies = 5;
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "spec.takeover.copies", "{e}");
        s.takeover.copies = 0;
        s.validate().unwrap();
    }

    #[test]
    fn front_service_overrides_are_checked() {
        let ok: GatewayFleetSpec = serde_yaml::from_str(
            "front:\n  annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}\n  loadBalancerClass: example.com/internal-vip\n  loadBalancerSourceRanges: [198.51.100.0/24, '2001:db8::/32']\netcd:\n  endpoints: [\"http://etcd:2379\"]\nfleetKeySecretRef: {name: fleet, key: key}\n",
        )
        .unwrap();
        ok.validate().unwrap();
        let mut s = ok.clone();
        s.front.load_balancer_source_ranges.push("198.51.100.7".into());
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.front.loadBalancerSourceRanges[2]"
        );
        let mut s = ok.clone();
        s.front.load_balancer_class = Some("Not A Class".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.front.loadBalancerClass");
        let mut s = ok.clone();
        s.front.annotations.insert("bad key".into(), String::new());
        assert_eq!(s.validate().unwrap_err().field, "spec.front.annotations");
        // Kubernetes refuses both on a NodePort Service.
        let mut s = ok.clone();
        s.front.service_type = FrontServiceType::NodePort;
        assert_eq!(s.validate().unwrap_err().field, "spec.front.loadBalancerClass");
        s.front.load_balancer_class = None;
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.front.loadBalancerSourceRanges[0]"
        );
    }

    #[test]
    fn pod_overrides_are_validated_with_the_spec() {
        let s: GatewayFleetSpec = serde_yaml::from_str(
            "pod:\n  env: [{name: OTEL_SERVICE_NAME, value: gw}, {name: RUST_LOG, value: info}, {name: CONCENTRATOR_FLEET_KEY_FILE, value: /tmp/k}]\netcd:\n  endpoints: [\"http://etcd:2379\"]\nfleetKeySecretRef: {name: fleet, key: key}\n",
        )
        .unwrap();
        assert_eq!(s.validate().unwrap_err().field, "spec.pod.env[2].name");
        assert!(spec().pod.is_empty());
    }

    #[test]
    fn unset_overrides_serialize_as_before() {
        let v = serde_json::to_value(spec()).unwrap();
        assert!(v.get("pod").is_none(), "{v}");
        assert_eq!(
            v["front"],
            serde_json::json!({"mode": "Slb", "serviceType": "LoadBalancer"})
        );
    }

    #[test]
    fn rejects_inverted_bounds_and_bad_endpoints() {
        let mut s = spec();
        s.scaling.max_replicas = 1;
        assert_eq!(s.validate().unwrap_err().field, "spec.scaling.maxReplicas");
        let mut s = spec();
        s.etcd.endpoints = vec!["etcd:2379".into()];
        assert_eq!(s.validate().unwrap_err().field, "spec.etcd.endpoints[0]");
        let mut s = spec();
        s.etcd.endpoints.clear();
        assert_eq!(s.validate().unwrap_err().field, "spec.etcd.endpoints");
        let mut s = spec();
        s.scaling.target_cpu_percent = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.scaling.targetCpuPercent");
    }
}
