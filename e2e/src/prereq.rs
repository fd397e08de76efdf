//! Decide before a test touches anything whether it can run.
//!
//! * Not root: print `SKIP: ...` and return [`Prereq::Skip`]; the test returns and passes.
//! * Root with a tool missing: panic naming the apt packages to install. CI runs as root
//!   with everything installed, so there a missing package must fail, never skip.
//! * Otherwise [`Prereq::Run`].

use crate::tools::Tool;

/// The outcome of [`require`].
#[must_use = "return from the test when this is Skip"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prereq {
    /// Everything is there: run the test.
    Run,
    /// Not root: the test should return without doing anything.
    Skip,
}

impl Prereq {
    /// Whether the test should return at once.
    pub fn is_skip(self) -> bool {
        self == Self::Skip
    }
}

/// The effective uid of this process (from `/proc/self/status`), if readable.
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // "Uid:\treal\teffective\tsaved\tfs"
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// Checks root and every tool in `groups` (usually the `TOOLS` constants of the harness
/// modules the test uses, e.g. `&[netns::TOOLS, strongswan::TOOLS]`).
///
/// # Panics
///
/// When running as root and a tool is missing, with the `apt-get install` line that fixes it.
pub fn require(groups: &[&[Tool]]) -> Prereq {
    let test = std::thread::current().name().unwrap_or("this test").to_owned();
    if !is_root() {
        eprintln!(
            "SKIP: e2e needs root (network namespaces, private daemons); {test} did nothing \
             (uid {})",
            effective_uid().map_or_else(|| "unknown".to_owned(), |u| u.to_string())
        );
        return Prereq::Skip;
    }
    let missing: Vec<Tool> = groups
        .iter()
        .flat_map(|g| g.iter().copied())
        .filter(|t| t.find().is_none())
        .collect();
    if !missing.is_empty() {
        let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        packages.sort_unstable();
        packages.dedup();
        let names: Vec<&str> = missing.iter().map(Tool::name).collect();
        panic!(
            "e2e prerequisites missing for {test}: {}\ninstall them with: apt-get install -y {}",
            names.join(", "),
            packages.join(" ")
        );
    }
    Prereq::Run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_readable() {
        assert!(effective_uid().is_some());
    }

    #[test]
    fn missing_tool_fails_only_as_root() {
        let missing: &[Tool] = &[Tool::search("no-such-tool-e2e", "no-such-package")];
        if is_root() {
            let err = std::panic::catch_unwind(|| require(&[missing])).unwrap_err();
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("apt-get install -y no-such-package"), "{msg}");
        } else {
            assert_eq!(require(&[missing]), Prereq::Skip);
        }
    }
}
