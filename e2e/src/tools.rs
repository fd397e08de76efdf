//! The external programs (and strongSwan plugin files) the harness uses, where Debian puts
//! them, and which apt package provides each.

use std::path::{Path, PathBuf};

/// Directories searched after `$PATH`, so tools in `sbin` are found even when a non-login
/// shell left them out of `$PATH`.
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Where a [`Tool`] is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A program name looked up in `$PATH` and the usual `bin`/`sbin` directories.
    Search(&'static str),
    /// A fixed absolute path (daemons under `/usr/lib`, plugin files).
    At(&'static str),
}

/// A program or file the harness needs, with the Debian package that installs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tool {
    /// Where it is.
    pub location: Location,
    /// The apt package that provides it.
    pub package: &'static str,
}

impl Tool {
    /// A program looked up by name.
    pub const fn search(name: &'static str, package: &'static str) -> Self {
        Self {
            location: Location::Search(name),
            package,
        }
    }

    /// A file at a fixed path.
    pub const fn at(path: &'static str, package: &'static str) -> Self {
        Self {
            location: Location::At(path),
            package,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self.location {
            Location::Search(name) | Location::At(name) => name,
        }
    }

    /// The absolute path, if the tool is installed.
    pub fn find(&self) -> Option<PathBuf> {
        match self.location {
            Location::At(path) => Path::new(path).is_file().then(|| PathBuf::from(path)),
            Location::Search(name) => {
                let from_env = std::env::var_os("PATH")
                    .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .unwrap_or_default();
                from_env
                    .into_iter()
                    .chain(EXTRA_DIRS.iter().map(PathBuf::from))
                    .map(|dir| dir.join(name))
                    .find(|candidate| is_executable(candidate))
            }
        }
    }

    /// The absolute path, or the bare name (so a missing tool fails with "not found" when
    /// run). Tests call [`crate::prereq::require`] first, which reports missing packages.
    pub fn path(&self) -> PathBuf {
        self.find().unwrap_or_else(|| PathBuf::from(self.name()))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `ip` (namespaces, links, addresses, routes).
pub const IP: Tool = Tool::search("ip", "iproute2");
/// `ping`.
pub const PING: Tool = Tool::search("ping", "iputils-ping");
/// Packet captures (the fleet's sequence-number checks).
pub const TCPDUMP: Tool = Tool::search("tcpdump", "tcpdump");
/// `unshare` (private mount namespace for charon's `/run`).
pub const UNSHARE: Tool = Tool::search("unshare", "util-linux");
/// `mount` (tmpfs on `/run` inside charon's mount namespace).
pub const MOUNT: Tool = Tool::search("mount", "mount");
/// `sh`.
pub const SH: Tool = Tool::search("sh", "dash");
/// HTTP client, for scraping `/metrics` inside a namespace.
pub const CURL: Tool = Tool::search("curl", "curl");
/// Python 3, for TCP transfers with a checksum.
pub const PYTHON3: Tool = Tool::search("python3", "python3");

/// nftables, to count packets by protocol.
pub const NFT: Tool = Tool::search("nft", "nftables");

/// Lists and deletes conntrack flows (the front's endpoint removal).
pub const CONNTRACK: Tool = Tool::search("conntrack", "conntrack");

/// TCP throughput, for benchmarks.
pub const IPERF3: Tool = Tool::search("iperf3", "iperf3");

/// The IKE daemon.
pub const CHARON: Tool = Tool::at("/usr/lib/ipsec/charon", "strongswan-charon");
/// The VICI command line client.
pub const SWANCTL: Tool = Tool::search("swanctl", "strongswan-swanctl");
/// Userspace ESP data plane (the kernel here has no ESP/GCM).
pub const KERNEL_LIBIPSEC: Tool = Tool::at(
    "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
    "libcharon-extra-plugins",
);
/// AES-GCM for IKE and ESP.
pub const GCM_PLUGIN: Tool = Tool::at(
    "/usr/lib/ipsec/plugins/libstrongswan-gcm.so",
    "libstrongswan-standard-plugins",
);
/// OpenSSL crypto, including X25519 (Debian's `curve25519` plugin is in the extra plugins,
/// which the harness does not need).
pub const OPENSSL_PLUGIN: Tool = Tool::at(
    "/usr/lib/ipsec/plugins/libstrongswan-openssl.so",
    "libstrongswan-standard-plugins",
);

/// The MariaDB server.
pub const MARIADBD: Tool = Tool::search("mariadbd", "mariadb-server");
/// Creates a MariaDB data directory.
pub const MARIADB_INSTALL_DB: Tool = Tool::search("mariadb-install-db", "mariadb-server");

/// The etcd server.
pub const ETCD: Tool = Tool::search("etcd", "etcd-server");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(SH.find().is_some());
        assert!(Tool::search("no-such-tool-e2e", "none").find().is_none());
        assert!(Tool::at("/no/such/file", "none").find().is_none());
        assert_eq!(Tool::search("x", "y").path(), PathBuf::from("x"));
    }
}
