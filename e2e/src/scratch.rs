//! Temporary working directories for daemons (configs, data, logs, sockets).
//!
//! They are deleted on drop unless `E2E_KEEP=1` is set, in which case the path is printed
//! when the owner is dropped, for post-mortem reading of logs.

use std::path::Path;

use anyhow::{Context, Result};
use tempfile::TempDir;

/// Whether `E2E_KEEP` asks to keep work directories.
pub fn keep_requested() -> bool {
    std::env::var_os("E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A fresh directory under the system temp dir, named `e2e-{what}-XXXXXX`. Kept short:
/// unix socket paths inside it must stay under 108 bytes.
pub fn dir(what: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("e2e-{what}-"))
        .tempdir()
        .with_context(|| format!("creating a temp dir for {what}"))
}

/// Call from the owner's `Drop`: with `E2E_KEEP` set, keeps the directory and says where.
pub fn release(dir: TempDir) {
    if keep_requested() {
        let path = dir.keep();
        eprintln!("E2E_KEEP: kept {}", path.display());
    }
}

/// Writes `contents` to `dir/name`, with the path in the error.
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
