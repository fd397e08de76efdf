//! `concentrator-operator render`: what the operator would apply for a GatewayFleet file and
//! a directory of Eroute/Egroup YAML, without a cluster. For review before `kubectl apply`, and
//! for schema checks of the built objects in CI.

use std::path::Path;

use concentrator_crds::{Egroup, Eroute, GatewayFleet};
use kube::Resource;
use serde::Deserialize;

use super::build;

/// Errors rendering from files.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Yaml(String, serde_yaml::Error),
    #[error("{0}: no GatewayFleet document")]
    NoFleet(String),
    #[error("GatewayFleet: {0}")]
    Invalid(concentrator_crds::ValidationError),
    #[error(transparent)]
    Set(concentrator_crds::set::ObjectError),
    #[error(transparent)]
    Build(#[from] build::BuildError),
}

fn docs(path: &Path) -> Result<Vec<serde_yaml::Value>, RenderError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RenderError::Read(shown.clone(), e))?;
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(d).map_err(|e| RenderError::Yaml(shown.clone(), e))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Renders the objects for the fleet in `fleet_file` with the Eroutes/Egroups found in the
/// top-level `*.yaml`/`*.yml` files of `config_dir`, as multi-document YAML.
pub fn render(fleet_file: &Path, config_dir: &Path) -> Result<String, RenderError> {
    let shown = fleet_file.display().to_string();
    let fleet_doc = docs(fleet_file)?
        .into_iter()
        .find(|d| d["kind"] == "GatewayFleet")
        .ok_or_else(|| RenderError::NoFleet(shown.clone()))?;
    let mut fleet: GatewayFleet =
        serde_yaml::from_value(fleet_doc).map_err(|e| RenderError::Yaml(shown, e))?;
    fleet.spec.validate().map_err(RenderError::Invalid)?;
    let ns = fleet
        .meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    fleet.meta_mut().namespace = Some(ns.clone());
    // A placeholder until the API server assigns the real one.
    fleet
        .meta_mut()
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_owned());

    let (mut eroutes, mut egroups) = (Vec::<Eroute>::new(), Vec::<Egroup>::new());
    let mut files: Vec<_> = std::fs::read_dir(config_dir)
        .map_err(|e| RenderError::Read(config_dir.display().to_string(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    for f in files {
        let shown = f.display().to_string();
        for d in docs(&f)? {
            match d["kind"].as_str() {
                Some("Eroute") => {
                    eroutes.push(serde_yaml::from_value(d).map_err(|e| RenderError::Yaml(shown.clone(), e))?)
                }
                Some("Egroup") => {
                    egroups.push(serde_yaml::from_value(d).map_err(|e| RenderError::Yaml(shown.clone(), e))?)
                }
                _ => {}
            }
        }
    }
    let named_e: Vec<_> = eroutes
        .iter()
        .map(|e| (e.meta().name.clone().unwrap_or_default(), e.spec.clone()))
        .collect();
    let named_g: Vec<_> = egroups
        .iter()
        .map(|g| (g.meta().name.clone().unwrap_or_default(), g.spec.clone()))
        .collect();
    concentrator_crds::set::validate(&named_e, &named_g).map_err(RenderError::Set)?;

    let d = build::desired(&fleet, &eroutes, &egroups, fleet.spec.scaling.min_replicas)?;
    let mut out = String::new();
    let mut push = |obj: &dyn erased::ToJson| -> Result<(), RenderError> {
        let v = obj.to_json().map_err(|e| build::BuildError::Shape("render", e))?;
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).map_err(build::BuildError::Yaml)?);
        Ok(())
    };
    push(&d.config)?;
    // The Secret that carries the config's keys, with each key and no value: a preview never
    // prints a PSK (the operator copies the values from the Secrets the config names).
    let values = build::referenced_secrets(&eroutes, &egroups)
        .into_iter()
        .map(|r| (r, k8s_openapi::ByteString(Vec::new())))
        .collect();
    push(&build::config_secrets(&fleet, &values)?)?;
    push(&d.statefulset)?;
    push(&d.headless)?;
    for s in &d.fronts {
        push(s)?;
    }
    push(&d.pdb)?;
    // The operator's namespace as the operator itself would take it.
    let operator_ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
    if let Some(p) = super::netpol::network_policy(&fleet, &operator_ns)? {
        push(&p)?;
    }
    Ok(out)
}

mod erased {
    /// Object-safe serialisation, so one closure can render objects of every kind.
    pub(super) trait ToJson {
        fn to_json(&self) -> serde_json::Result<serde_json::Value>;
    }

    impl<T: serde::Serialize> ToJson for T {
        fn to_json(&self) -> serde_json::Result<serde_json::Value> {
            serde_json::to_value(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_example_fleet() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = render(
            &root.join("examples/kubernetes/fleet.yaml"),
            &root.join("examples"),
        )
        .unwrap();
        for kind in [
            "ConfigMap",
            "StatefulSet",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Secret",
        ] {
            assert!(out.contains(&format!("kind: {kind}\n")), "{kind} missing:\n{out}");
        }
        assert!(
            out.contains("hq-backup_psk.secret: ''"),
            "the key, no value:\n{out}"
        );
        assert!(out.contains("namespace: concentrator"));
    }
}
