//! Noticing that the config directory changed: a digest of what `load_dir` would read,
//! compared every second.
//!
//! A poll, not inotify: kubelet updates a projected volume by swapping the `..data` symlink
//! to a new hidden directory, so the files a watch was put on never change (their links
//! point elsewhere) and a watch must follow the swap; editors replace files by rename; a
//! user may add a file or a Secret directory. Reading a few small files once a second sees
//! all of these the same way, follows symlinks like `load_dir` does, and costs nothing.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use zeroize::Zeroizing;

/// Directory levels followed below the config directory: `secrets/<name>/<key>` is three.
const MAX_DEPTH: usize = 3;

/// A digest of what `load_dir` reads in `dir`: the `*.yaml`/`*.yml` and `*.secret` files and
/// every visible file under `secrets/` (names and contents, symlinks followed, hidden names such as
/// kubelet's `..data` skipped: what they hold is seen through the visible links).
/// Unreadable entries count by their name and error kind, so a file that becomes readable
/// changes the digest.
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    walk(dir, Path::new(""), 0, &mut h);
    h.finish()
}

fn walk(dir: &Path, rel: &Path, depth: usize, h: &mut DefaultHasher) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            h.write(rel.as_os_str().as_encoded_bytes());
            e.kind().hash(h);
            return;
        }
    };
    let mut names: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| {
            let n = n.to_string_lossy();
            // At the top, only what `load_dir` reads: other files (notes, backups) cost
            // nothing to change.
            !n.starts_with('.')
                && (depth > 0
                    || n == "secrets"
                    || n.ends_with(".yaml")
                    || n.ends_with(".yml")
                    || n.ends_with(".secret"))
        })
        .collect();
    names.sort();
    for name in names {
        let (path, rel) = (dir.join(&name), rel.join(&name));
        h.write(rel.as_os_str().as_encoded_bytes());
        h.write_u8(0);
        // `metadata` follows symlinks, as reading the file does.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                if depth < MAX_DEPTH {
                    walk(&path, &rel, depth + 1, h);
                }
            }
            Ok(_) => match std::fs::read(&path) {
                // Secrets pass through here: wiped once hashed.
                Ok(bytes) => {
                    let bytes = Zeroizing::new(bytes);
                    h.write_usize(bytes.len());
                    h.write(&bytes);
                }
                Err(e) => e.kind().hash(h),
            },
            Err(e) => e.kind().hash(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_additions_removals_and_secrets_change_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.yaml"), "one").unwrap();
        let first = fingerprint(d);
        assert_eq!(first, fingerprint(d), "stable while nothing changes");
        std::fs::write(d.join("notes.txt"), "not configuration").unwrap();
        assert_eq!(first, fingerprint(d), "files load_dir skips are skipped");
        std::fs::write(d.join("a.yaml"), "two").unwrap();
        let edited = fingerprint(d);
        assert_ne!(first, edited);
        std::fs::create_dir_all(d.join("secrets/hq")).unwrap();
        std::fs::write(d.join("secrets/hq/psk"), "k1").unwrap();
        let with_secret = fingerprint(d);
        assert_ne!(edited, with_secret);
        std::fs::write(d.join("secrets/hq/psk"), "k2").unwrap();
        assert_ne!(with_secret, fingerprint(d), "a rotated key");
        let before_flat = fingerprint(d);
        std::fs::write(d.join("lab_psk.secret"), "k3").unwrap();
        assert_ne!(before_flat, fingerprint(d), "a key in the operator's flat layout");
        std::fs::remove_dir_all(d.join("secrets")).unwrap();
        std::fs::remove_file(d.join("lab_psk.secret")).unwrap();
        assert_eq!(edited, fingerprint(d), "removed again");
    }

    /// kubelet's layout: visible names are links into `..data`, itself a link to a hidden
    /// timestamped directory that is swapped atomically.
    #[test]
    fn a_kubelet_style_symlink_swap_changes_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (ts, text) in [("..2026_01", "old"), ("..2026_02", "new")] {
            std::fs::create_dir_all(d.join(ts).join("secrets/hq")).unwrap();
            std::fs::write(d.join(ts).join("concentrator.yaml"), text).unwrap();
            std::fs::write(d.join(ts).join("secrets/hq/psk"), text).unwrap();
        }
        std::os::unix::fs::symlink("..2026_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/concentrator.yaml", d.join("concentrator.yaml")).unwrap();
        std::os::unix::fs::symlink("..data/secrets", d.join("secrets")).unwrap();
        let before = fingerprint(d);
        std::os::unix::fs::symlink("..2026_02", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert_ne!(before, fingerprint(d));
    }
}
