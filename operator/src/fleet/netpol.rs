//! The NetworkPolicy of a fleet's pods (pure, like `build`): what may reach a gateway pod.

use concentrator_crds::GatewayFleet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::build::{ADMIN_PORT, BuildError, FLEET_PORT, METRICS_PORT, meta, selector, typed};

/// The label of pods allowed to call a fleet's admin API from the operator's namespace. The
/// chart puts it on the operator's pods.
pub const ADMIN_CLIENT_LABEL: &str = "vpn.concentrator.io/admin-client";

/// Ingress only: IKE and ESP in UDP from anywhere (sites are anywhere); the fleet port (UDP:
/// forwarded packets, TCP: SA replication) from the fleet's own pods; the admin API from the
/// fleet's own pods (the fleet-wide tunnel list) and from the operator's pods in
/// `operator_namespace`; metrics from the fleet's `metricsNamespaces` (every namespace when
/// empty). Egress stays open: etcd, the site databases and initiated sites can be anywhere, and
/// a policy that guessed them would break fleets rather than protect them. `None` when the
/// fleet turns the policy off.
pub fn network_policy(
    fleet: &GatewayFleet,
    operator_namespace: &str,
) -> Result<Option<NetworkPolicy>, BuildError> {
    let spec = &fleet.spec.network_policy;
    if !spec.enabled {
        return Ok(None);
    }
    let name = fleet.metadata.name.clone().ok_or(BuildError::Unnamed)?;
    let ns = fleet.metadata.namespace.clone().ok_or(BuildError::Unnamed)?;
    let own_pods = json!({"podSelector": {"matchLabels": selector(&name)}});
    let operator = json!({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}},
        "podSelector": {"matchLabels": {ADMIN_CLIENT_LABEL: "true"}},
    });
    let metrics_from: Vec<Value> = if spec.metrics_namespaces.is_empty() {
        vec![json!({"namespaceSelector": {}})]
    } else {
        spec.metrics_namespaces
            .iter()
            .map(|n| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": n}}}))
            .collect()
    };
    let policy = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": meta(fleet, &name, &ns),
        "spec": {
            "podSelector": {"matchLabels": selector(&name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [
                    {"port": 500, "protocol": "UDP"},
                    {"port": 4500, "protocol": "UDP"},
                ]},
                {"from": [own_pods.clone()], "ports": [
                    {"port": FLEET_PORT, "protocol": "UDP"},
                    {"port": FLEET_PORT, "protocol": "TCP"},
                ]},
                {"from": [own_pods, operator], "ports": [{"port": ADMIN_PORT, "protocol": "TCP"}]},
                {"from": metrics_from, "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]},
            ],
        },
    });
    typed("NetworkPolicy", policy).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(extra: &str) -> GatewayFleet {
        serde_yaml::from_str(&format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn, uid: u-1}}\n\
             spec:\n  etcd: {{endpoints: ['http://etcd:2379']}}\n  fleetKeySecretRef: {{name: fleet, key: key}}\n{extra}"
        ))
        .unwrap()
    }

    /// (from, ports) of each rule, as `ns/labels` strings and `port/protocol`.
    fn rules(p: &NetworkPolicy) -> Vec<(Vec<String>, Vec<String>)> {
        let v = serde_json::to_value(p).unwrap();
        v["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let from = r["from"]
                    .as_array()
                    .map(|f| f.iter().map(|peer| peer.to_string()).collect())
                    .unwrap_or_default();
                let ports = r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap()))
                    .collect();
                (from, ports)
            })
            .collect()
    }

    #[test]
    fn admits_only_the_front_the_fleet_the_operator_and_metrics() {
        let p = network_policy(&fleet(""), "concentrator-system")
            .unwrap()
            .unwrap();
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
        assert_eq!(
            spec.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/instance"],
            "edge"
        );
        let r = rules(&p);
        assert_eq!(r.len(), 4);
        assert!(r[0].0.is_empty(), "IKE from anywhere");
        assert_eq!(r[0].1, ["500/UDP", "4500/UDP"]);
        assert_eq!(r[1].1, ["4510/UDP", "4510/TCP"]);
        assert_eq!(r[1].0.len(), 1);
        assert!(
            r[1].0[0].contains("\"app.kubernetes.io/instance\":\"edge\""),
            "{:?}",
            r[1].0
        );
        assert!(!r[1].0[0].contains("namespaceSelector"), "own namespace only");
        assert_eq!(r[2].1, ["50051/TCP"]);
        assert!(
            r[2].0[1].contains("\"kubernetes.io/metadata.name\":\"concentrator-system\"")
                && r[2].0[1].contains(ADMIN_CLIENT_LABEL),
            "{:?}",
            r[2].0
        );
        assert_eq!(r[3].1, ["9090/TCP"]);
        assert_eq!(r[3].0, [r#"{"namespaceSelector":{}}"#]);
        assert_eq!(
            p.metadata.owner_references.as_ref().unwrap()[0].kind,
            "GatewayFleet"
        );
    }

    #[test]
    fn metrics_from_named_namespaces_and_off_when_disabled() {
        let p = network_policy(
            &fleet("  networkPolicy: {metricsNamespaces: [monitoring]}\n"),
            "ops",
        )
        .unwrap()
        .unwrap();
        assert!(rules(&p)[3].0[0].contains("\"kubernetes.io/metadata.name\":\"monitoring\""));
        assert!(
            network_policy(&fleet("  networkPolicy: {enabled: false}\n"), "ops")
                .unwrap()
                .is_none()
        );
    }
}
