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
    // The Secret volume the StatefulSet mounts puts each referenced key here.
    for (name, key) in build::referenced_secrets(&eroutes, &egroups) {
        let p = dir.path().join("secrets").join(&name).join(&key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "from-a-secret").unwrap();
    }
    let cfg = concentrator_gateway::config::load_dir(dir.path()).unwrap();
    assert_eq!(cfg.set.eroutes.len(), 2);
    assert_eq!(cfg.set.egroups.len(), 1);
    assert_eq!(cfg.static_psks["hq-backup"].expose(), b"from-a-secret");
}
