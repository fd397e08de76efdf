use std::path::Path;

use concentrator_crds::SecretKeyRef;

use super::ConfigError;
use crate::secret::Secret;

/// The file name of Secret `name`'s `key` at the top of a config directory, the layout of the
/// operator's aggregated Secret mounted whole (`_` never occurs in a Secret's name, and the
/// suffix keeps a key named `*.yaml` from reading as a config file).
pub(super) fn flat_name(name: &str, key: &str) -> String {
    format!("{name}_{key}.secret")
}

/// Reads `dir/secrets/<name>/<key>`, or else `dir/<name>_<key>.secret` ([`flat_name`]). A single
/// trailing newline is dropped: it is almost always an artefact of `echo` or an editor, never
/// part of a key.
pub(super) fn read(
    dir: &Path,
    r: &SecretKeyRef,
    kind: &'static str,
    name: &str,
    field: &str,
) -> Result<Secret, ConfigError> {
    let rel = Path::new("secrets").join(&r.name).join(&r.key);
    let fail = |message: String| ConfigError::Secret {
        kind,
        name: name.to_owned(),
        field: field.to_owned(),
        message,
    };
    let flat = flat_name(&r.name, &r.key);
    let read = std::fs::read(dir.join(&rel)).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => std::fs::read(dir.join(&flat)),
        _ => Err(e),
    });
    let mut bytes = read.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            fail(format!(
                "Secret '{}' key '{}' not found: expected the file {} (or {flat})",
                r.name,
                r.key,
                rel.display()
            ))
        } else {
            fail(format!("cannot read {}: {e}", rel.display()))
        }
    })?;
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    if bytes.is_empty() {
        return Err(fail(format!("Secret '{}' key '{}' is empty", r.name, r.key)));
    }
    Ok(Secret::new(bytes))
}
