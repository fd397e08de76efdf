//! Log file tails for error messages.

use std::path::Path;

/// The last `lines` lines of the file at `path`, or a note saying why there are none.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            if all.is_empty() {
                return format!("({} is empty)", path.display());
            }
            let start = all.len().saturating_sub(lines);
            let mut out = format!(
                "--- last {} of {} lines of {} ---\n",
                all.len() - start,
                all.len(),
                path.display()
            );
            for line in &all[start..] {
                out.push_str(line);
                out.push('\n');
            }
            out.push_str("--- end ---");
            out
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether the file at `path` contains `needle` (ASCII case-insensitive).
pub fn contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path).is_ok_and(|bytes| {
        String::from_utf8_lossy(&bytes)
            .to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        let t = tail(&path, 2);
        assert!(t.contains("c\nd\n"), "{t}");
        assert!(!t.contains("\nb\n"), "{t}");
        assert!(contains(&path, "C"));
        assert!(tail(&dir.path().join("missing"), 3).contains("cannot read"));
    }
}
