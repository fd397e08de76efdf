//! The head-end side of a fleet, for tunnels the pods start themselves (egroups that may
//! initiate):
//!
//! ```text
//!  sites ── WAN ── front/node 192.0.2.2 ── pod0 10.244.0.1  ┐ pod network
//!                        └─ SNAT ───────── egress0 10.244.0.3 ┘ (both on its bridge)
//!                                              gw-0 .10  gw-1 .11  gw-2 .12
//!  head-end LAN bridge ───────────────────────── lan0 .10  lan0 .11  lan0 .12
//!        └─ LAN host .100: its route to the sites via one pod (a LAN router's choice)
//! ```
//!
//! * [`Lan`]: the head-end LAN as a bridge joined to every pod (`lan0`, pod `i` at
//!   `.{10 + i}`, forwarding on) and a LAN host at `.100` whose route toward the sites
//!   names one pod ([`Lan::route_via`]): the LAN's router may send to any pod, and each pod
//!   routes the egroup's remote subnet into its own TUN device.
//! * [`enable_node_egress`] and [`enable_pod_egress`]: a pod that initiates sends from its
//!   pod IP. In Kubernetes the node masquerades pod egress, so the site sees the node's
//!   address and its replies come back by conntrack. The front drops (and counts as stray)
//!   whatever a pod sends toward the WAN on `pod0` outside a flow the front DNAT'd, which
//!   keeps catching a pod that answers a site from its own address. So flows a pod starts
//!   take another way: the pod marks them (conntrack: new, original direction, toward the
//!   WAN) and routes marked packets via [`NODE_EGRESS_ADDR`], the front's second interface
//!   on the pod bridge, where they are SNAT'd to the front address (the node's, here): the
//!   site's own connection (remote address: the front) accepts our initiation as is.
//!   Replies and everything a site sends in those flows return by conntrack.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, ensure};
use ipnet::IpNet;

use super::POD_NET;
use super::front::{Front, WAN_IF};
use crate::netns::{Netns, Wan};
use crate::tools;

/// The front's interface on the pod bridge for flows the pods start.
pub const EGRESS_IF: &str = "egress0";
/// Its address: the pods' next hop for the flows they start toward the WAN.
pub const NODE_EGRESS_ADDR: &str = "10.244.0.3";
/// The pods' interface on the head-end LAN.
pub const LAN_IF: &str = "lan0";

/// The nftables table of the node's SNAT (in the front namespace, beside kube-proxy's).
const NODE_TABLE: &str = "node_egress";
/// The nftables table that marks the flows a pod starts (in each pod namespace).
const POD_TABLE: &str = "pod_egress";
/// The firewall mark and routing table of those flows in a pod.
const EGRESS_MARK: u32 = 0x1;
const EGRESS_TABLE: &str = "100";

/// The `n`th address of `subnet` (IPv4).
fn nth(subnet: IpNet, n: u32) -> Result<IpAddr> {
    let IpAddr::V4(base) = subnet.network() else {
        anyhow::bail!("the head-end LAN {subnet} must be IPv4");
    };
    let a = Ipv4Addr::from(u32::from(base) + n);
    ensure!(
        subnet.contains(&IpAddr::V4(a)),
        "{subnet} has no address number {n}"
    );
    Ok(IpAddr::V4(a))
}

/// Pod `i`'s address on the head-end LAN `subnet`: `.{10 + i}`.
pub fn lan_pod_addr(subnet: IpNet, i: usize) -> Result<IpAddr> {
    nth(subnet, 10 + u32::try_from(i)?)
}

/// Writes `value` to `/proc/sys/{key}` as seen from `ns` (`key`: `net/ipv4/...`).
fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    ensure!(
        key.chars().all(|c| c.is_ascii_alphanumeric() || "/_".contains(c))
            && value.chars().all(|c| c.is_ascii_digit()),
        "sysctl {key:?} = {value:?}"
    );
    // /proc/sys/net shows the network namespace of the process reading it.
    ns.run(
        tools::SH.path(),
        &["-c", &format!("echo {value} > /proc/sys/{key}")],
    )
    .map(drop)
    .with_context(|| format!("sysctl {key} = {value} in {}", ns.name()))
}

/// Loads the nftables `script` into `ns` (`nft -f`).
fn nft(ns: &Netns, script: &str) -> Result<()> {
    let dir = crate::scratch::dir("nft")?;
    let file = crate::scratch::write(dir.path(), "rules.nft", script)?;
    ns.run(tools::NFT.path(), &["-f", &file.to_string_lossy()])
        .with_context(|| format!("nft -f in {} with:\n{script}", ns.name()))
        .map(drop)
}

/// The head-end LAN: a bridge joined to every pod, and one LAN host.
#[derive(Debug)]
pub struct Lan {
    subnet: IpNet,
    host: Netns,
    bridge: Wan,
}

impl Lan {
    /// The LAN `subnet` joined to each pod of `pods` (`lan0` at `.{10 + i}`, IPv4 forwarding
    /// on, so packets from the LAN reach the pod's TUN device and the sites' answers leave
    /// it toward the LAN) and a host at `.100` with no route toward the sites yet.
    pub fn new(subnet: IpNet, pods: &[&Netns]) -> Result<Self> {
        let bridge = Wan::named("lan")?;
        for (i, ns) in pods.iter().enumerate() {
            bridge.attach(
                ns,
                LAN_IF,
                IpNet::new(lan_pod_addr(subnet, i)?, subnet.prefix_len())?,
            )?;
            ns.enable_forwarding()?;
        }
        let host = Netns::new("lanhost")?;
        bridge.attach(&host, "eth0", IpNet::new(nth(subnet, 100)?, subnet.prefix_len())?)?;
        Ok(Self { subnet, host, bridge })
    }

    /// The LAN's prefix.
    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    /// The LAN host's namespace.
    pub fn host(&self) -> &Netns {
        &self.host
    }

    /// The LAN host's address (`.100`).
    pub fn host_addr(&self) -> IpAddr {
        nth(self.subnet, 100).expect("checked in new")
    }

    /// Pod `i`'s address on the LAN.
    pub fn pod_addr(&self, i: usize) -> Result<IpAddr> {
        lan_pod_addr(self.subnet, i)
    }

    /// The bridge's namespace (tcpdump on `br0`).
    pub fn bridge(&self) -> &Wan {
        &self.bridge
    }

    /// Points the LAN host's route to `dest` at pod `pod` (`ip route replace`), as a LAN
    /// router that may send to any pod.
    pub fn route_via(&self, dest: IpNet, pod: usize) -> Result<()> {
        let via = self.pod_addr(pod)?.to_string();
        self.host
            .ip(&["route", "replace", &dest.to_string(), "via", &via, "dev", "eth0"])
            .map(drop)
    }

    /// The pod (by index) the LAN host's route to `to` goes through now, if any.
    pub fn route_to(&self, to: IpAddr) -> Result<Option<usize>> {
        let out = self.host.ip(&["route", "get", &to.to_string()])?;
        let via = out.split_whitespace().skip_while(|w| *w != "via").nth(1);
        Ok(via.and_then(|v| {
            let v: IpAddr = v.parse().ok()?;
            (0..=200).find(|&i| self.pod_addr(i).ok() == Some(v))
        }))
    }
}

/// The node's side of pod egress, in the front namespace `front`: [`EGRESS_IF`] on the pod
/// bridge `pod_net`, and SNAT of what enters there toward the WAN to the front address.
pub fn enable_node_egress(front: &Front, pod_net: &Wan) -> Result<()> {
    let ns = front.namespace();
    pod_net.attach(ns, EGRESS_IF, format!("{NODE_EGRESS_ADDR}/24").parse()?)?;
    // Two interfaces on one bridge: each answers ARP only for its own address (else a pod
    // may learn pod0's MAC for the egress address, and its flows would enter on pod0 and be
    // dropped as stray), and packets from the pods enter on the interface their reverse
    // route does not name.
    for (key, value) in [
        ("net/ipv4/conf/all/arp_ignore", "1"),
        ("net/ipv4/conf/all/arp_announce", "2"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        (&format!("net/ipv4/conf/{EGRESS_IF}/rp_filter") as &str, "0"),
    ] {
        sysctl(ns, key, value)?;
    }
    let front_addr = front.address();
    nft(
        ns,
        &format!(
            "table ip {NODE_TABLE} {{\n  counter flows {{\n  }}\n\
             \x20 chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   iifname \"{EGRESS_IF}\" oifname \"{WAN_IF}\" counter name \"flows\" snat to {front_addr}\n  }}\n}}\n"
        ),
    )
}

/// The pod's side of pod egress, in pod namespace `ns`: flows it starts toward the WAN
/// (conntrack: new, original direction; not to the pod network) are marked and routed via
/// [`NODE_EGRESS_ADDR`]; replies in flows the front DNAT'd to it keep the default route
/// through `pod0`.
pub fn enable_pod_egress(ns: &Netns) -> Result<()> {
    nft(
        ns,
        &format!(
            "table ip {POD_TABLE} {{\n  chain output {{\n    type route hook output priority mangle; policy accept;\n\
             \x20   oifname \"eth0\" ip daddr != {POD_NET} ct direction original ct state new ct mark set {EGRESS_MARK:#x}\n\
             \x20   ct direction original ct mark {EGRESS_MARK:#x} meta mark set {EGRESS_MARK:#x}\n  }}\n}}\n"
        ),
    )?;
    let mark = format!("{EGRESS_MARK:#x}");
    ns.ip(&[
        "rule",
        "add",
        "fwmark",
        &mark,
        "lookup",
        EGRESS_TABLE,
        "priority",
        "100",
    ])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        NODE_EGRESS_ADDR,
        "dev",
        "eth0",
        "table",
        EGRESS_TABLE,
    ])?;
    Ok(())
}

/// Flows the pods started toward the WAN that the node SNAT'd (each flow's first packet
/// crosses the nat chain; 0 until [`enable_node_egress`]).
pub fn egress_flows(front: &Front) -> Result<u64> {
    let out = front
        .namespace()
        .run(tools::NFT.path(), &["list", "counter", "ip", NODE_TABLE, "flows"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in:\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_addresses() -> Result<()> {
        let lan: IpNet = "10.2.0.0/24".parse()?;
        assert_eq!(lan_pod_addr(lan, 2)?, "10.2.0.12".parse::<IpAddr>()?);
        assert_eq!(nth(lan, 100)?, "10.2.0.100".parse::<IpAddr>()?);
        assert!(nth(lan, 256).is_err());
        assert!(nth("2001:db8::/64".parse()?, 1).is_err());
        Ok(())
    }
}
