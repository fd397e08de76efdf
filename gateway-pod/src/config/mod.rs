//! The standalone gateway's configuration: the same `Eroute`/`Egroup` YAML that `kubectl apply`
//! takes, read from a directory, with Secrets read from `secrets/<name>/<key>` (the layout of a
//! mounted Secret volume).

pub mod diff;
mod load;
mod secrets;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;

use concentrator_crds::set::ValidatedSet;

pub use diff::ConfigDiff;
pub use load::load_dir;

use crate::secret::Secret;

/// Where a document came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

/// Everything the gateway needs from its config directory, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub set: ValidatedSet,
    /// Pre-shared keys of static eroutes, by eroute name.
    pub static_psks: BTreeMap<String, Secret>,
    /// Database URLs of egroups that take theirs from a Secret, by egroup name.
    pub egroup_db_urls: BTreeMap<String, Secret>,
    /// GatewayFleet documents seen; a standalone gateway has no fleet and ignores them.
    pub ignored_fleets: Vec<String>,
}

/// Why a config directory was refused. Each variant names the file or object to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot read {file}: {source}")]
    ReadFile { file: PathBuf, source: std::io::Error },
    #[error("{origin}: not valid YAML: {message}")]
    Yaml { origin: Origin, message: String },
    #[error("{origin}: {message}")]
    Document { origin: Origin, message: String },
    #[error("{origin}: {error}")]
    Invalid {
        origin: Origin,
        error: concentrator_crds::set::ObjectError,
    },
    #[error("{kind} '{name}': {field}: {message}")]
    Secret {
        kind: &'static str,
        name: String,
        field: String,
        message: String,
    },
    #[error("no *.yaml or *.yml file in {dir}: is this the right directory?")]
    Empty { dir: PathBuf },
}

/// Configurations built from YAML snippets, for the unit tests of what consumes them.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use super::Config;
    use crate::secret::Secret;

    /// Eroutes and Egroups as `(name, spec YAML)`, static PSKs as `(eroute, key)`.
    pub(crate) fn config(
        eroutes: &[(&str, &str)],
        egroups: &[(&str, &str)],
        psks: &[(&str, &str)],
    ) -> Config {
        let eroutes: Vec<_> = eroutes
            .iter()
            .map(|(n, y)| ((*n).to_owned(), serde_yaml::from_str(y).unwrap()))
            .collect();
        let egroups: Vec<_> = egroups
            .iter()
            .map(|(n, y)| ((*n).to_owned(), serde_yaml::from_str(y).unwrap()))
            .collect();
        Config {
            set: concentrator_crds::set::validate(&eroutes, &egroups).unwrap(),
            static_psks: psks
                .iter()
                .map(|(n, k)| ((*n).to_owned(), Secret::new(k.as_bytes().to_vec())))
                .collect(),
            egroup_db_urls: BTreeMap::new(),
            ignored_fleets: Vec::new(),
        }
    }
}
