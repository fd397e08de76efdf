//! GatewayFleet `spec.pod` and the front's Service settings (`spec.front.annotations`,
//! `loadBalancerClass`, `loadBalancerSourceRanges`), put where Kubernetes reads them: the
//! StatefulSet's pod template and the front Services. Each is added only when set, so a
//! fleet that sets none builds exactly what it did before these fields existed (an operator
//! upgrade rolls no pod).

use concentrator_crds::fleet::FrontSpec;
use concentrator_crds::pod::PodOverrides;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;

/// Puts `spec.pod` into the pod template of the fleet's `statefulset`. The annotations are
/// exactly those given (the operator adds none there, so they change only when the fleet's
/// do); the labels join the operator's, which validation keeps out of them; the variables
/// come after the operator's.
pub(super) fn pod(o: &PodOverrides, statefulset: &mut StatefulSet) {
    let Some(template) = statefulset.spec.as_mut().map(|s| &mut s.template) else {
        return;
    };
    let meta = template.metadata.get_or_insert_with(Default::default);
    if !o.annotations.is_empty() {
        meta.annotations = Some(o.annotations.clone());
    }
    if !o.labels.is_empty() {
        let labels = meta.labels.get_or_insert_with(Default::default);
        for (k, v) in &o.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let Some(spec) = template.spec.as_mut() else {
        return;
    };
    if !o.node_selector.is_empty() {
        spec.node_selector = Some(o.node_selector.clone());
    }
    if !o.tolerations.is_empty() {
        spec.tolerations = Some(o.tolerations.clone());
    }
    if let Some(a) = &o.affinity {
        spec.affinity = Some(a.clone());
    }
    if !o.topology_spread_constraints.is_empty() {
        spec.topology_spread_constraints = Some(o.topology_spread_constraints.clone());
    }
    if let Some(p) = &o.priority_class_name {
        spec.priority_class_name = Some(p.clone());
    }
    if !o.image_pull_secrets.is_empty() {
        spec.image_pull_secrets = Some(o.image_pull_secrets.clone());
    }
    if let Some(gateway) = spec.containers.iter_mut().find(|c| c.name == "gateway") {
        if let Some(r) = &o.resources {
            gateway.resources = Some(r.clone());
        }
        if !o.env.is_empty() {
            gateway
                .env
                .get_or_insert_with(Vec::new)
                .extend(o.env.iter().cloned());
        }
    }
}

/// Puts the front's Service settings into a front `service` (the SLB front's, the VIP
/// Service or a per-pod one: sites reach each the same way).
pub(super) fn front(f: &FrontSpec, service: &mut Service) {
    if !f.annotations.is_empty() {
        service.metadata.annotations = Some(f.annotations.clone());
    }
    let Some(spec) = service.spec.as_mut() else {
        return;
    };
    if let Some(class) = &f.load_balancer_class {
        spec.load_balancer_class = Some(class.clone());
    }
    if !f.load_balancer_source_ranges.is_empty() {
        spec.load_balancer_source_ranges = Some(f.load_balancer_source_ranges.clone());
    }
}

#[cfg(test)]
mod tests {
    use concentrator_crds::GatewayFleet;
    use kube::Resource;
    use serde_json::{Value, json};

    use super::super::desired;

    fn fleet(extra: &str) -> GatewayFleet {
        let mut f: GatewayFleet = serde_yaml::from_str(&format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn}}\n\
             spec:\n  etcd: {{endpoints: ['https://etcd:2379'], tlsSecretName: etcd-client}}\n  fleetKeySecretRef: {{name: fleet, key: key}}\n{extra}"
        ))
        .unwrap();
        f.meta_mut().uid = Some("u-1".into());
        f
    }

    /// Every branch of the builders that the fixture below covers: VIP front with a fixed
    /// address, admin TLS, etcd TLS, a site database.
    const FULL: &str = "  front: {mode: Vip, address: 203.0.113.1}\n  adminTlsSecretName: edge-admin\n  \
                        siteDatabaseUrlSecretRef: {name: sitedb, key: url}\n";

    /// The pod template and front Services as built for `FULL`, with the image (the
    /// operator's version) left out.
    fn built(f: &GatewayFleet) -> Value {
        let d = desired(f, &[], &[], 2).unwrap();
        let mut template = serde_json::to_value(&d.statefulset.spec.as_ref().unwrap().template).unwrap();
        template["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("image");
        serde_json::json!({
            "selector": d.statefulset.spec.as_ref().unwrap().selector,
            "template": template,
            "fronts": d.fronts,
        })
    }

    const POD: &str = r#"  pod:
    resources: {requests: {cpu: "2", memory: 1Gi}, limits: {memory: 4Gi}}
    nodeSelector: {kubernetes.io/os: linux}
    tolerations: [{key: dedicated, operator: Equal, value: vpn, effect: NoSchedule}]
    affinity:
      podAntiAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app.kubernetes.io/instance: edge}}}
    topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app.kubernetes.io/instance: edge}}}
    priorityClassName: vpn-critical
    imagePullSecrets: [{name: registry-creds}]
    annotations: {example.com/owner: network-team}
    labels: {team: network}
    env:
      - {name: RUST_LOG, value: debug}
      - {name: OTEL_EXPORTER_OTLP_HEADERS, valueFrom: {secretKeyRef: {name: otel, key: headers}}}
"#;

    fn json(v: &impl serde::Serialize) -> Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn every_pod_setting_lands_where_kubernetes_reads_it() {
        let f = fleet(POD);
        f.spec.validate().unwrap();
        let d = desired(&f, &[], &[], 2).unwrap();
        let sts = json(&d.statefulset);
        let at = |p: &str| {
            sts.pointer(p)
                .unwrap_or_else(|| panic!("{p} not set: {sts}"))
                .clone()
        };
        let pod = "/spec/template/spec";
        let gateway = "/spec/template/spec/containers/0";
        assert_eq!(at(&format!("{gateway}/name")), "gateway");
        assert_eq!(
            at(&format!("{gateway}/resources")),
            json!({"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "4Gi"}})
        );
        assert_eq!(
            at(&format!("{pod}/nodeSelector")),
            json!({"kubernetes.io/os": "linux"})
        );
        assert_eq!(at(&format!("{pod}/tolerations/0/effect")), "NoSchedule");
        assert_eq!(
            at(&format!(
                "{pod}/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution/0/topologyKey"
            )),
            "kubernetes.io/hostname"
        );
        assert_eq!(at(&format!("{pod}/topologySpreadConstraints/0/maxSkew")), 1);
        assert_eq!(at(&format!("{pod}/priorityClassName")), "vpn-critical");
        assert_eq!(
            at(&format!("{pod}/imagePullSecrets")),
            json!([{"name": "registry-creds"}])
        );
        // Exactly the annotations given, nothing of the operator's beside them.
        assert_eq!(
            at("/spec/template/metadata/annotations"),
            json!({"example.com/owner": "network-team"})
        );
        let labels = at("/spec/template/metadata/labels");
        assert_eq!(labels["team"], "network");
        assert_eq!(labels["app.kubernetes.io/instance"], "edge");
        // The selector, and the StatefulSet's own metadata, are the operator's alone.
        assert_eq!(
            at("/spec/selector"),
            json!({"matchLabels": super::super::selector("edge")})
        );
        assert_eq!(at("/metadata/labels"), super::super::labels("edge"));
        assert!(sts.pointer("/metadata/annotations").is_none());
        // The variables come after the operator's, valueFrom as given.
        let env = at(&format!("{gateway}/env"));
        let env = env.as_array().unwrap();
        let n = env.len();
        assert!(n > 2 && env[..n - 2].iter().all(|e| e["name"] != "RUST_LOG"));
        assert_eq!(env[n - 2], json!({"name": "RUST_LOG", "value": "debug"}));
        assert_eq!(
            env[n - 1]["valueFrom"]["secretKeyRef"],
            json!({"name": "otel", "key": "headers"})
        );
    }

    #[test]
    fn front_settings_land_on_every_front_service() {
        let f = fleet(
            "  front:\n    mode: Vip\n    annotations: {service.beta.kubernetes.io/aws-load-balancer-type: external}\n    \
             loadBalancerClass: service.k8s.aws/nlb\n    loadBalancerSourceRanges: [198.51.100.0/24]\n",
        );
        f.spec.validate().unwrap();
        let d = desired(&f, &[], &[], 2).unwrap();
        assert_eq!(d.fronts.len(), 3, "the VIP Service and one per pod");
        for s in &d.fronts {
            let s = json(s);
            assert_eq!(
                s["metadata"]["annotations"],
                json!({"service.beta.kubernetes.io/aws-load-balancer-type": "external"}),
                "{s}"
            );
            assert_eq!(s["spec"]["loadBalancerClass"], "service.k8s.aws/nlb", "{s}");
            assert_eq!(
                s["spec"]["loadBalancerSourceRanges"],
                json!(["198.51.100.0/24"]),
                "{s}"
            );
        }
        // Not the headless Service: sites never reach it.
        let headless = json(&d.headless);
        assert!(headless["metadata"].get("annotations").is_none());
        assert!(headless["spec"].get("loadBalancerSourceRanges").is_none());
        // Pods and Services are otherwise as without the settings.
        assert_eq!(
            json(&d.statefulset),
            json(
                &desired(&fleet("  front: {mode: Vip}\n"), &[], &[], 2)
                    .unwrap()
                    .statefulset
            )
        );
    }

    #[test]
    fn empty_settings_are_no_settings() {
        let empty = fleet(&format!(
            "{FULL}  pod: {{resources: null, nodeSelector: {{}}, tolerations: [], env: [], labels: {{}}, annotations: {{}}}}\n"
        ));
        assert!(empty.spec.pod.is_empty());
        let mut empty = empty;
        empty.spec.front.annotations.clear();
        empty.spec.front.load_balancer_source_ranges.clear();
        assert_eq!(built(&empty), built(&fleet(FULL)));
    }

    #[test]
    fn the_labels_validation_refuses_are_the_operators() {
        let ours = super::super::labels("edge");
        let ours: Vec<&str> = ours.as_object().unwrap().keys().map(String::as_str).collect();
        let mut refused = concentrator_crds::pod::OPERATOR_LABELS.to_vec();
        refused.sort_unstable();
        assert_eq!(ours, refused);
    }

    /// What an operator from before `spec.pod` and the front's Service settings built: a fleet
    /// that sets none must get the very same pod template (else an upgrade rolls its pods)
    /// and Services. Regenerate only for a deliberate change:
    /// `UPDATE_FIXTURES=1 cargo test -p concentrator-operator no_overrides`.
    #[test]
    fn no_overrides_builds_what_it_built_before() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/fleet/build/testdata/no-overrides.json"
        );
        let have = built(&fleet(FULL));
        if std::env::var_os("UPDATE_FIXTURES").is_some() {
            std::fs::write(path, serde_json::to_string_pretty(&have).unwrap() + "\n").unwrap();
        }
        let want: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            have, want,
            "the pod template or a front Service changed: pods would roll"
        );
    }
}
