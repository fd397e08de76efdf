//! End-to-end test harness for the concentrator.
//!
//! Every piece of the test world is an owned value whose `Drop` tears it down, so a test that
//! fails or panics still leaves nothing behind:
//!
//! * [`netns`]: network namespaces, a WAN bridge joining them with veth pairs, "LAN" addresses
//!   on `lo`, commands and daemons inside a namespace.
//! * [`strongswan`]: one strongSwan `charon` (kernel-libipsec data plane) per namespace,
//!   `swanctl.conf` written from [`strongswan::Connection`], SA state polling.
//! * [`mariadb`]: a private MariaDB server in a temp dir, as a `mysql://` URL.
//! * [`etcd`]: a private single-node etcd, as an `http://` endpoint.
//! * [`gateway`]: our `concentrator-gateway` in a namespace, its metrics.
//! * [`fleet`]: gateway pods of one fleet, each in its own namespace on a pod network,
//!   behind a front namespace that does what kube-proxy does for their Service (DNAT,
//!   per-port client-IP affinity or none, conntrack, endpoint removal), with a private etcd
//!   on the pod network; strongSwan sites that address the front.
//! * [`prereq`]: skip (not root) or fail (root, package missing) before touching anything.
//!
//! Support modules: [`tools`] (the external programs and where Debian puts them), [`wait`]
//! (poll a condition with a timeout), [`process`] (commands with timeouts, daemon guards),
//! [`ports`] (free loopback ports), [`ids`] (unique names, random tokens), [`scratch`] (temp
//! dirs, kept with `E2E_KEEP=1`), [`logs`] (log tails for error messages), [`blast`] (a
//! many-flow TCP load generator and sink, lighter than one iperf3 pair per flow),
//! [`topology`] (the site's and the gateway's addresses and identities most tests use),
//! [`ping`] (a background ping and its loss), [`capture`] (tcpdump, and the ESP sequence
//! numbers a capture saw).
//!
//! All calls are blocking (`std::process`); they are short and fine to call from
//! `#[tokio::test]` bodies.

pub mod blast;
pub mod capture;
pub mod etcd;
pub mod fleet;
pub mod gateway;
pub mod ids;
pub mod logs;
pub mod mariadb;
pub mod netns;
pub mod ping;
pub mod pki;
pub mod ports;
pub mod prereq;
pub mod process;
pub mod scratch;
pub mod strongswan;
pub mod tools;
pub mod topology;
pub mod wait;
