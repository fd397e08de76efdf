//! One model, two ways in: the configuration the operator renders for its pods is exactly
//! what the standalone gateway loads from a directory.

use concentrator_crds::{Egroup, Eroute};
use concentrator_operator::fleet::build;

#[test]
fn gateway_loads_what_the_operator_renders() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut eroutes: Vec<Eroute> = Vec::new();
    let mut egroups: Vec<Egroup> = Vec::new();
    for f in ["branches.yaml", "static-peer.yaml"] {
        let text = std::fs::read_to_string(examples.join(f)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            match v["kind"].as_str() {
                Some("Eroute") => eroutes.push(serde_yaml::from_value(v).unwrap()),
                Some("Egroup") => egroups.push(serde_yaml::from_value(v).unwrap()),
                other => panic!("unexpected kind {other:?}"),
            }
        }
    }
    let rendered = build::render_config(&eroutes, &egroups).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("concentrator.yaml"), &rendered).unwrap();
    // The operator's <fleet>-config-secrets, mounted whole beside the ConfigMap, puts each
    // referenced key at the top of the directory under the name its builder gives it.
    let fleet: concentrator_crds::GatewayFleet = serde_yaml::from_str(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {name: edge, namespace: vpn}\n\
         spec:\n  etcd: {endpoints: [\"http://etcd:2379\"]}\n  fleetKeySecretRef: {name: f, key: k}\n",
    )
    .unwrap();
    let values = build::referenced_secrets(&eroutes, &egroups)
        .into_iter()
        .map(|r| (r, k8s_openapi::ByteString(b"from-a-secret".to_vec())))
        .collect();
    let carried = build::config_secrets(&fleet, &values).unwrap();
    for (file, value) in carried.data.unwrap() {
        std::fs::write(dir.path().join(file), value.0).unwrap();
    }
    let cfg = concentrator_gateway::config::load_dir(dir.path()).unwrap();
    assert_eq!(cfg.set.eroutes.len(), 2);
    assert_eq!(cfg.set.egroups.len(), 1);
    assert_eq!(cfg.static_psks["hq-backup"].expose(), b"from-a-secret");
}
