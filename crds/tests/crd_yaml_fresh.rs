//! The checked-in CRD YAML (in `crds/` and in the Helm chart) must be exactly what the Rust
//! types generate: regenerate with `cargo run -p concentrator-crds --bin crdgen`.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [root.to_path_buf(), root.join("../charts/concentrator/crds")] {
        for (stem, crd) in concentrator_crds::all_crds() {
            let want = concentrator_crds::crd_yaml(&crd).unwrap();
            let path = dir.join(format!("{stem}.yaml"));
            let have = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `cargo run -p concentrator-crds --bin crdgen`",
                    path.display()
                )
            });
            assert!(
                have == want,
                "{} is stale; run `cargo run -p concentrator-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn crds_have_status_subresource_and_columns() {
    for (stem, crd) in concentrator_crds::all_crds() {
        assert_eq!(crd.spec.group, concentrator_crds::GROUP);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, concentrator_crds::VERSION);
        assert!(
            v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
            "{stem}: status subresource"
        );
        let cols = v.additional_printer_columns.as_ref().map(Vec::len).unwrap_or(0);
        assert!(cols >= 4, "{stem}: printer columns");
        assert_eq!(crd.spec.scope, "Namespaced");
    }
}
