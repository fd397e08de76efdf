use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use concentrator_crds::egroup::DatabaseLocation;
use concentrator_crds::{Egroup, EgroupSpec, Eroute, ErouteSpec, GatewayFleet};
use serde::Deserialize;

use super::{Config, ConfigError, Origin, secrets};

const API_VERSION: &str = "vpn.concentrator.io/v1alpha1";

/// Files a config directory may hold, in the order they are read.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_dir = |source| ConfigError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let is_yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        // Kubernetes volume mounts add dot-entries (`..data`); skip every hidden name.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Loads and validates every `*.yaml`/`*.yml` in `dir` (multi-document files allowed) and
/// the Secrets they reference. Fails on the first problem, naming file, document, object and
/// field.
pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    let mut eroutes: Vec<(String, ErouteSpec)> = Vec::new();
    let mut egroups: Vec<(String, EgroupSpec)> = Vec::new();
    let mut origins: HashMap<(&'static str, String), Origin> = HashMap::new();
    let mut ignored_fleets = Vec::new();

    let files = yaml_files(dir)?;
    if files.is_empty() {
        return Err(ConfigError::Empty { dir: dir.to_owned() });
    }
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::ReadFile {
            file: file.clone(),
            source,
        })?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                document: i + 1,
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(|e| ConfigError::Yaml {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
            if value.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            let doc_err = |message: String| ConfigError::Document {
                origin: origin.clone(),
                message,
            };
            let meta: TypeMeta = serde_yaml::from_value(value.clone())
                .map_err(|e| doc_err(format!("not a Kubernetes object: {e}")))?;
            let kind = meta
                .kind
                .ok_or_else(|| doc_err("has no 'kind' (expected Eroute or Egroup)".into()))?;
            match meta.api_version.as_deref() {
                Some(API_VERSION) => {}
                Some(other) => {
                    return Err(doc_err(format!(
                        "{kind}: apiVersion '{other}' is not supported; use '{API_VERSION}'"
                    )));
                }
                None => return Err(doc_err(format!("{kind}: has no apiVersion; use '{API_VERSION}'"))),
            }
            let parse_err = |m: String| doc_err(format!("{kind}: {m}"));
            match kind.as_str() {
                "Eroute" => {
                    let obj: Eroute = typed(value).map_err(parse_err)?;
                    let name = object_name(obj.metadata.name, &origin)?;
                    origins.insert(("Eroute", name.clone()), origin.clone());
                    eroutes.push((name, obj.spec));
                }
                "Egroup" => {
                    let obj: Egroup = typed(value).map_err(parse_err)?;
                    let name = object_name(obj.metadata.name, &origin)?;
                    origins.insert(("Egroup", name.clone()), origin.clone());
                    egroups.push((name, obj.spec));
                }
                "GatewayFleet" => {
                    // Parsed so a typo is still caught, then set aside: one process has no fleet.
                    let obj: GatewayFleet = typed(value).map_err(parse_err)?;
                    let name = object_name(obj.metadata.name, &origin)?;
                    obj.spec
                        .validate()
                        .map_err(|e| doc_err(format!("GatewayFleet '{name}': {e}")))?;
                    ignored_fleets.push(name);
                }
                other => {
                    return Err(doc_err(format!(
                        "kind '{other}' is not one of Eroute, Egroup, GatewayFleet"
                    )));
                }
            }
        }
    }
    let set = concentrator_crds::set::validate(&eroutes, &egroups).map_err(|error| {
        let origin = origins
            .get(&(error.kind, error.name.clone()))
            .cloned()
            .unwrap_or(Origin {
                file: dir.to_owned(),
                document: 0,
            });
        ConfigError::Invalid { origin, error }
    })?;

    let mut static_psks = BTreeMap::new();
    for (name, e) in &set.eroutes {
        if set.egroup_of(name).is_some() {
            continue;
        }
        if let Some(r) = &e.psk_secret_ref {
            let psk = secrets::read(dir, r, "Eroute", name, "spec.pskSecretRef")?;
            static_psks.insert(name.clone(), psk);
        }
    }
    let mut egroup_db_urls = BTreeMap::new();
    for (name, g) in &set.egroups {
        if let DatabaseLocation::Secret(r) = &g.database {
            let url = secrets::read(dir, r, "Egroup", name, "spec.database.urlSecretRef")?;
            let text = std::str::from_utf8(url.expose()).map_err(|_| ConfigError::Secret {
                kind: "Egroup",
                name: name.clone(),
                field: "spec.database.urlSecretRef".into(),
                message: "the database URL is not UTF-8".into(),
            })?;
            concentrator_crds::egroup::validate_db_url("spec.database.urlSecretRef", text).map_err(|e| {
                ConfigError::Secret {
                    kind: "Egroup",
                    name: name.clone(),
                    field: e.field,
                    message: e.message,
                }
            })?;
            egroup_db_urls.insert(name.clone(), url);
        }
    }
    Ok(Config {
        set,
        static_psks,
        egroup_db_urls,
        ignored_fleets,
    })
}

/// Deserializes one document, naming the path of a field that has the wrong type and
/// refusing fields the type does not know: a misspelt `peerID` must not be silently dropped.
fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(value, &mut note);
    let obj: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })?;
    // Type fields were checked already, and Kubernetes adds fields to metadata that the
    // standalone gateway has no use for; those are not typos in the spec.
    let known = |p: &str| p == "apiVersion" || p == "kind" || p.starts_with("metadata.");
    match unknown.into_iter().find(|p| !known(p)) {
        Some(p) => Err(format!(
            "{p}: unknown field (check the spelling against the CRD in crds/)"
        )),
        None => Ok(obj),
    }
}

fn object_name(name: Option<String>, origin: &Origin) -> Result<String, ConfigError> {
    match name {
        Some(n) if concentrator_crds::secret::is_valid_name(&n) => Ok(n),
        Some(n) => Err(ConfigError::Document {
            origin: origin.clone(),
            message: format!("metadata.name: '{n}' is not a valid Kubernetes name"),
        }),
        None => Err(ConfigError::Document {
            origin: origin.clone(),
            message: "metadata.name: is required".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
apiVersion: vpn.concentrator.io/v1alpha1
kind: Eroute
metadata: {name: branches}
spec:
  localSubnet: 10.0.0.0/16
  remoteSubnet: 10.128.0.0/9
  peerId: "*.sites.example.com"
---
apiVersion: vpn.concentrator.io/v1alpha1
kind: Egroup
metadata: {name: branches}
spec:
  eroute: branches
  remoteSubnetPrefix: 24
"#;

    const STATIC: &str = r#"
apiVersion: vpn.concentrator.io/v1alpha1
kind: Eroute
metadata: {name: hq-backup}
spec:
  localSubnet: 10.0.0.0/16
  remoteSubnet: 172.16.0.0/24
  peerId: backup.example.com
  peerAddress: 192.0.2.10
  pskSecretRef: {name: hq-backup, key: psk}
"#;

    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        d
    }

    #[test]
    fn loads_multi_document_files_and_secrets() {
        let d = dir(&[
            ("base.yaml", BASE),
            ("static.yml", STATIC),
            ("secrets/hq-backup/psk", "s3cret\n"),
            ("notes.txt", "ignored"),
        ]);
        let c = load_dir(d.path()).unwrap();
        assert_eq!(c.set.eroutes.len(), 2);
        assert_eq!(c.set.egroups.len(), 1);
        assert_eq!(c.static_psks["hq-backup"].expose(), b"s3cret");
    }

    #[test]
    fn reads_a_secret_from_the_operators_flat_layout_too() {
        let d = dir(&[("static.yaml", STATIC), ("hq-backup_psk.secret", "fl4t\n")]);
        let c = load_dir(d.path()).unwrap();
        assert_eq!(c.static_psks["hq-backup"].expose(), b"fl4t");
        // The directory layout wins where both are there.
        let d = dir(&[
            ("static.yaml", STATIC),
            ("secrets/hq-backup/psk", "dir"),
            ("hq-backup_psk.secret", "flat"),
        ]);
        assert_eq!(
            load_dir(d.path()).unwrap().static_psks["hq-backup"].expose(),
            b"dir"
        );
    }

    #[test]
    fn rejects_unknown_secret_naming_the_file() {
        let d = dir(&[("static.yaml", STATIC)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("Eroute 'hq-backup'"), "{e}");
        assert!(e.contains("spec.pskSecretRef"), "{e}");
        assert!(e.contains("secrets/hq-backup/psk"), "{e}");
    }

    #[test]
    fn rejects_empty_secret() {
        let d = dir(&[("static.yaml", STATIC), ("secrets/hq-backup/psk", "\n")]);
        assert!(load_dir(d.path()).unwrap_err().to_string().contains("is empty"));
    }

    #[test]
    fn rejects_bad_cidr_with_file_and_document() {
        let bad = BASE.replace("10.128.0.0/9", "10.128.0.0/99");
        let d = dir(&[("base.yaml", &bad)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("base.yaml (document 1)"), "{e}");
        assert!(e.contains("Eroute 'branches': spec.remoteSubnet"), "{e}");
    }

    #[test]
    fn rejects_unknown_proposal() {
        let bad = BASE.replace("peerId:", "ike: {proposals: [aes128-md6-x25519]}\n  peerId:");
        let d = dir(&[("base.yaml", &bad)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("spec.ike.proposals[0]") && e.contains("'md6'"), "{e}");
    }

    #[test]
    fn rejects_empty_peer_id_on_responder() {
        let bad = BASE.replace(
            "  peerId: \"*.sites.example.com\"",
            "  role: Responder\n  peerId: \"\"",
        );
        let d = dir(&[("base.yaml", &bad)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("spec.peerId"), "{e}");
    }

    #[test]
    fn rejects_unknown_kind_and_wrong_api_version_and_bad_yaml() {
        let d = dir(&[("a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")]);
        assert!(
            load_dir(d.path())
                .unwrap_err()
                .to_string()
                .contains("apiVersion 'v1'")
        );
        let d = dir(&[(
            "a.yaml",
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Tunnel\n",
        )]);
        assert!(
            load_dir(d.path())
                .unwrap_err()
                .to_string()
                .contains("kind 'Tunnel'")
        );
        let d = dir(&[("a.yaml", "kind: [unclosed\n")]);
        assert!(matches!(
            load_dir(d.path()).unwrap_err(),
            ConfigError::Yaml { .. }
        ));
    }

    #[test]
    fn rejects_unknown_field_type_and_missing_name() {
        let bad = BASE.replace("remoteSubnetPrefix: 24", "remoteSubnetPrefix: twenty");
        let d = dir(&[("base.yaml", &bad)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("document 2") && e.contains("spec.remoteSubnetPrefix: invalid type"),
            "{e}"
        );
        let typo = BASE.replace("  peerId:", "  peerID:");
        let d = dir(&[("base.yaml", &typo)]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("spec.peerID: unknown field"), "{e}");
        let bad = BASE.replacen("metadata: {name: branches}", "metadata: {}", 1);
        let d = dir(&[("base.yaml", &bad)]);
        assert!(
            load_dir(d.path())
                .unwrap_err()
                .to_string()
                .contains("metadata.name")
        );
    }

    #[test]
    fn empty_directory_is_an_error() {
        let d = dir(&[]);
        assert!(matches!(
            load_dir(d.path()).unwrap_err(),
            ConfigError::Empty { .. }
        ));
    }

    #[test]
    fn egroup_url_from_secret_is_checked_but_not_echoed() {
        let with_ref = BASE.replace(
            "  remoteSubnetPrefix: 24",
            "  remoteSubnetPrefix: 24\n  database: {urlSecretRef: {name: sitedb, key: url}}",
        );
        let d = dir(&[
            ("base.yaml", &with_ref),
            ("secrets/sitedb/url", "postgres://u:hunter2@db/x"),
        ]);
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("urlSecretRef") && !e.contains("hunter2"), "{e}");
        let d = dir(&[
            ("base.yaml", &with_ref),
            ("secrets/sitedb/url", "mysql://u:hunter2@db/x"),
        ]);
        let c = load_dir(d.path()).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
