//! The front: what a Kubernetes node's kube-proxy (nftables mode) does for a UDP Service of
//! the gateway pods, in a namespace between the sites' WAN and the pod network.
//!
//! * DNAT of the front address, per Service port (UDP 500 and 4500), to one pod: a chain per
//!   Service port (`svc_PORT`) that picks an endpoint chain (`ep_PORT_POD`), which DNATs.
//!   Only a flow's first packet crosses the nat chains; conntrack keeps the rest of the flow
//!   on its pod and un-NATs the replies (their source becomes the front address again).
//! * `sessionAffinity: ClientIP` as kube-proxy writes it: one set per Service port and
//!   endpoint (`aff_PORT_POD`, client IPs with a timeout), checked before the random pick and
//!   refreshed by the endpoint chain. So a site's port-500 flow and its port-4500 flow choose
//!   their pods independently, and may land on different pods.
//! * [`Affinity::None`]: each new flow picks a pod at random (`numgen random mod N`).
//! * Endpoint removal ([`Front::remove_endpoint`]) as kube-proxy does it for UDP: the pod
//!   leaves the Service chains, its affinity entries go, and its conntrack flows are deleted
//!   (`conntrack -D`), so the sites' next packets pick another pod.
//! * [`Front::pin_client`] moves one client's flows to one Service port onto a chosen pod
//!   (its affinity entry, then its conntrack flows), to choose on purpose where a site
//!   enters; [`Front::allow_direct_replies`] lets pods answer a client that addresses them
//!   directly, bypassing the Service.
//! * Nothing is masqueraded: a pod does not own the front address and cannot send with it
//!   as source. What a pod sends to the WAN outside a DNAT'd flow (it would reach the site
//!   from a pod IP the site never talked to) is dropped and counted
//!   ([`Front::stray_packets`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ipnet::IpNet;

use crate::netns::{Netns, Wan};
use crate::process;
use crate::tools;

/// The Service ports: IKE and NAT-T (IKE after NAT detection, and ESP in UDP).
pub const SERVICE_PORTS: [u16; 2] = [500, 4500];

/// The nftables table of the front.
const TABLE: &str = "kube_front";
/// The front's interface on the sites' WAN.
pub const WAN_IF: &str = "wan0";
/// The front's interface on the pod network.
pub const POD_IF: &str = "pod0";

/// How the front keeps a client on a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// `sessionAffinity: ClientIP`: per Service port, a client IP stays on the pod its first
    /// flow went to until `timeout` passes without a new flow from it.
    ClientIp {
        /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
        timeout: Duration,
    },
    /// `sessionAffinity: None`: every new conntrack flow picks a pod at random.
    None,
}

impl Affinity {
    /// Kubernetes' default affinity timeout: three hours.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10800);

    /// `ClientIP` with Kubernetes' default timeout.
    pub const fn client_ip() -> Self {
        Self::ClientIp {
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// One conntrack flow through the front: a client's flow to a Service port, and the pod it
/// was DNAT'd to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The Service port.
    pub port: u16,
    /// The pod address the flow goes to.
    pub pod: IpAddr,
}

/// The front namespace and its rules.
#[derive(Debug)]
pub struct Front {
    ns: Netns,
    address: IpAddr,
    pods: Vec<IpAddr>,
    affinity: Affinity,
    /// Which pods are endpoints of the Service now.
    endpoints: Mutex<Vec<bool>>,
}

impl Front {
    /// A front namespace on `wan` with the Service address `address` (a /24 on the WAN), and
    /// on the pod network `pod_net` with `pod_side` (the pods' default gateway), its Service
    /// backed by every pod of `pods`.
    pub fn new(
        wan: &Wan,
        pod_net: &Wan,
        address: IpAddr,
        pod_side: IpNet,
        pods: Vec<IpAddr>,
        affinity: Affinity,
    ) -> Result<Self> {
        ensure!(!pods.is_empty(), "a front needs at least one pod");
        let ns = Netns::new("front")?;
        wan.attach(&ns, WAN_IF, IpNet::new(address, 24)?)?;
        pod_net.attach(&ns, POD_IF, pod_side)?;
        ns.enable_forwarding()?;
        let front = Self {
            ns,
            address,
            endpoints: Mutex::new(vec![true; pods.len()]),
            pods,
            affinity,
        };
        let mut script = table(address, &front.pods, affinity);
        script.push_str(&endpoint_rules(
            &front.pods,
            &vec![true; front.pods.len()],
            affinity,
        ));
        front.nft(&script).context("loading the front's rules")?;
        Ok(front)
    }

    /// The front namespace (tcpdump, `conntrack -L`, loss emulation).
    pub fn namespace(&self) -> &Netns {
        &self.ns
    }

    /// The Service address the sites talk to.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The affinity mode.
    pub fn affinity(&self) -> Affinity {
        self.affinity
    }

    /// The pods (by index) that are endpoints now.
    pub fn endpoints(&self) -> Vec<usize> {
        let e = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        (0..e.len()).filter(|&i| e[i]).collect()
    }

    /// Takes pod `pod` out of the Service, as kube-proxy does when its endpoint goes (pod
    /// deleted, not ready, draining): new flows go to the other pods, its affinity entries
    /// are deleted, and so are its conntrack flows, so that flows already pinned to it move
    /// with their next packet.
    pub fn remove_endpoint(&self, pod: usize) -> Result<()> {
        self.set_endpoint(pod, false)?;
        self.flush_conntrack(pod)
    }

    /// Puts pod `pod` back into the Service (new flows may pick it; existing ones stay).
    pub fn restore_endpoint(&self, pod: usize) -> Result<()> {
        self.set_endpoint(pod, true)
    }

    fn set_endpoint(&self, pod: usize, on: bool) -> Result<()> {
        ensure!(pod < self.pods.len(), "no pod {pod} behind the front");
        let mut e = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        e[pod] = on;
        let mut script = endpoint_rules(&self.pods, &e, self.affinity);
        if !on && matches!(self.affinity, Affinity::ClientIp { .. }) {
            for port in SERVICE_PORTS {
                let _ = writeln!(script, "flush set ip {TABLE} {}", set_name(port, pod));
            }
        }
        self.nft(&script)
    }

    /// Sends client `client`'s flows to Service port `port` to pod `pod` from their next
    /// packet on, whatever affinity they had: the client's entry moves to `pod`'s affinity
    /// set of that port (one atomic nft transaction), then its conntrack flows to the port
    /// are deleted, so the next packet crosses the Service chain again and the affinity sends
    /// it to `pod`. The order matters: a flow deleted before the affinity moved could be
    /// re-created on the old pod by a packet in between. Only with [`Affinity::ClientIp`].
    ///
    /// This is what happens to a site when kube-proxy moves it (endpoint removal, affinity
    /// expiry), done on purpose: a benchmark or test chooses which pod a site enters by.
    pub fn pin_client(&self, client: IpAddr, port: u16, pod: usize) -> Result<()> {
        ensure!(pod < self.pods.len(), "no pod {pod} behind the front");
        ensure!(SERVICE_PORTS.contains(&port), "port {port} is not a Service port");
        ensure!(
            matches!(self.affinity, Affinity::ClientIp { .. }),
            "pinning a client needs ClientIP affinity, not {:?}",
            self.affinity
        );
        let mut script = String::new();
        // nft has no "delete if present" before 1.0.8 (`destroy`): delete what is there.
        for other in 0..self.pods.len() {
            if other != pod && self.affinity_clients(port, other)?.contains(&client) {
                let _ = writeln!(
                    script,
                    "delete element ip {TABLE} {} {{ {client} }}",
                    set_name(port, other)
                );
            }
        }
        if !self.affinity_clients(port, pod)?.contains(&client) {
            let _ = writeln!(
                script,
                "add element ip {TABLE} {} {{ {client} }}",
                set_name(port, pod)
            );
        }
        if !script.is_empty() {
            self.nft(&script)?;
        }
        let (front, client, port) = (self.address.to_string(), client.to_string(), port.to_string());
        self.delete_flows(&["-s", &client, "--orig-dst", &front, "--orig-port-dst", &port])
    }

    /// Lets the pods answer client `client` from their own addresses: replies in flows the
    /// client opened to a pod address directly (routed through the front, not DNAT'd), which
    /// the front otherwise drops as stray. What a pod sends to the client outside such a
    /// flow is still dropped and counted. For tests that address the pods one by one,
    /// bypassing the Service (the client needs a route to the pod network via the front).
    pub fn allow_direct_replies(&self, client: IpAddr) -> Result<()> {
        self.nft(&format!(
            "insert rule ip {TABLE} pod_egress iifname \"{POD_IF}\" ip daddr {client} ct direction reply accept\n"
        ))
    }

    /// Deletes the conntrack flows DNAT'd to pod `pod` (`conntrack -D`).
    fn flush_conntrack(&self, pod: usize) -> Result<()> {
        let (front, target) = (self.address.to_string(), self.pods[pod].to_string());
        self.delete_flows(&["--orig-dst", &front, "--dst-nat", &target])
    }

    /// `conntrack -D -p udp` with `filter`; no match is fine.
    fn delete_flows(&self, filter: &[&str]) -> Result<()> {
        let mut args = vec!["-D", "-p", "udp"];
        args.extend_from_slice(filter);
        let out = self.ns.output(tools::CONNTRACK.path(), &args)?;
        // conntrack exits 1 when nothing matched.
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("0 flow entries") {
            process::check("conntrack -D", &out)?;
        }
        Ok(())
    }

    /// The UDP flows to the Service now, from the front's conntrack table.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let front = self.address.to_string();
        let out = self.ns.run(
            tools::CONNTRACK.path(),
            &["-L", "-p", "udp", "--orig-dst", &front],
        )?;
        Ok(out.lines().filter_map(parse_flow).collect())
    }

    /// For each client IP, the pod index its flows to Service port `port` go to now (the
    /// latest flow's, if a client has several).
    pub fn placement(&self, port: u16) -> Result<BTreeMap<IpAddr, usize>> {
        Ok(self
            .flows()?
            .into_iter()
            .filter(|f| f.port == port)
            .filter_map(|f| Some((f.client.ip(), self.pod_index(f.pod)?)))
            .collect())
    }

    /// The index of the pod with address `addr`.
    pub fn pod_index(&self, addr: IpAddr) -> Option<usize> {
        self.pods.iter().position(|p| *p == addr)
    }

    /// The client IPs held in pod `pod`'s affinity set of Service port `port` (empty without
    /// affinity).
    pub fn affinity_clients(&self, port: u16, pod: usize) -> Result<Vec<IpAddr>> {
        if self.affinity == Affinity::None {
            return Ok(Vec::new());
        }
        let out = self.ns.run(
            tools::NFT.path(),
            &["list", "set", "ip", TABLE, &set_name(port, pod)],
        )?;
        Ok(parse_set_elements(&out))
    }

    /// Packets a pod sent toward the WAN outside any DNAT'd flow (dropped: they would reach
    /// the site from a pod address instead of the front address).
    pub fn stray_packets(&self) -> Result<u64> {
        let out = self
            .ns
            .run(tools::NFT.path(), &["list", "counter", "ip", TABLE, "stray"])?;
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no packet count in:\n{out}"))
    }

    /// `nft list table` of the front, for messages.
    pub fn ruleset(&self) -> String {
        self.ns
            .run(tools::NFT.path(), &["list", "table", "ip", TABLE])
            .unwrap_or_else(|e| format!("(cannot list the front's rules: {e:#})"))
    }

    fn nft(&self, script: &str) -> Result<()> {
        let dir = crate::scratch::dir("front")?;
        let file = crate::scratch::write(dir.path(), "rules.nft", script)?;
        let file = file.to_string_lossy().into_owned();
        self.ns
            .run(tools::NFT.path(), &["-f", &file])
            .with_context(|| format!("nft -f with:\n{script}"))?;
        Ok(())
    }
}

fn set_name(port: u16, pod: usize) -> String {
    format!("aff_{port}_{pod}")
}

fn endpoint_chain(port: u16, pod: usize) -> String {
    format!("ep_{port}_{pod}")
}

/// The table: affinity sets, endpoint chains, empty Service chains, the nat hook, and the
/// filter that drops what pods send outside DNAT'd flows.
fn table(address: IpAddr, pods: &[IpAddr], affinity: Affinity) -> String {
    let mut t = format!("table ip {TABLE} {{\n  counter stray {{\n  }}\n");
    for port in SERVICE_PORTS {
        for (i, pod) in pods.iter().enumerate() {
            let mut chain = String::new();
            if let Affinity::ClientIp { timeout } = affinity {
                let _ = writeln!(
                    t,
                    "  set {} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {}s\n  }}",
                    set_name(port, i),
                    timeout.as_secs().max(1)
                );
                let _ = writeln!(chain, "    update @{} {{ ip saddr }}", set_name(port, i));
            }
            let _ = writeln!(chain, "    meta l4proto udp dnat to {pod}:{port}");
            let _ = writeln!(t, "  chain {} {{\n{chain}  }}", endpoint_chain(port, i));
        }
        let _ = writeln!(t, "  chain svc_{port} {{\n  }}");
    }
    t.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for port in SERVICE_PORTS {
        let _ = writeln!(t, "    ip daddr {address} udp dport {port} goto svc_{port}");
    }
    let _ = write!(
        t,
        "  }}\n  chain pod_egress {{\n    type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{POD_IF}\" ct status dnat accept\n\
         \x20   iifname \"{POD_IF}\" ct state related accept\n\
         \x20   iifname \"{POD_IF}\" oifname \"{WAN_IF}\" counter name \"stray\" drop\n  }}\n}}\n"
    );
    t
}

/// The Service chains for the pods marked in `on`: affinity first (kube-proxy checks each
/// endpoint's set), then a random pick among them.
fn endpoint_rules(pods: &[IpAddr], on: &[bool], affinity: Affinity) -> String {
    let active: Vec<usize> = (0..pods.len()).filter(|&i| on[i]).collect();
    let mut s = String::new();
    for port in SERVICE_PORTS {
        let _ = writeln!(s, "flush chain ip {TABLE} svc_{port}");
        if active.is_empty() {
            // No endpoints: kube-proxy rejects; dropping is what a nat chain can do.
            let _ = writeln!(s, "add rule ip {TABLE} svc_{port} drop");
            continue;
        }
        if matches!(affinity, Affinity::ClientIp { .. }) {
            for &i in &active {
                let _ = writeln!(
                    s,
                    "add rule ip {TABLE} svc_{port} ip saddr @{} goto {}",
                    set_name(port, i),
                    endpoint_chain(port, i)
                );
            }
        }
        let picks: Vec<String> = active
            .iter()
            .enumerate()
            .map(|(k, &i)| format!("{k} : goto {}", endpoint_chain(port, i)))
            .collect();
        let _ = writeln!(
            s,
            "add rule ip {TABLE} svc_{port} numgen random mod {} vmap {{ {} }}",
            active.len(),
            picks.join(", ")
        );
    }
    s
}

/// One line of `conntrack -L -p udp`: `udp 17 29 src=C dst=F sport=P dport=500 [UNREPLIED]
/// src=POD dst=C sport=500 dport=P ...`.
fn parse_flow(line: &str) -> Option<Flow> {
    let mut fields: Vec<(&str, &str)> = Vec::new();
    for token in line.split_whitespace() {
        if let Some(kv) = token.split_once('=') {
            fields.push(kv);
        }
    }
    let nth = |key: &str, n: usize| fields.iter().filter(|(k, _)| *k == key).nth(n).map(|(_, v)| *v);
    let client: IpAddr = nth("src", 0)?.parse().ok()?;
    let sport: u16 = nth("sport", 0)?.parse().ok()?;
    let port: u16 = nth("dport", 0)?.parse().ok()?;
    let pod: IpAddr = nth("src", 1)?.parse().ok()?;
    Some(Flow {
        client: SocketAddr::new(client, sport),
        port,
        pod,
    })
}

/// The addresses in `elements = { A expires .., B expires .. }` of `nft list set`.
fn parse_set_elements(text: &str) -> Vec<IpAddr> {
    let Some((_, rest)) = text.split_once("elements = {") else {
        return Vec::new();
    };
    let body = rest.split('}').next().unwrap_or_default();
    body.split(',')
        .filter_map(|e| e.split_whitespace().next()?.parse().ok())
        .collect()
}

/// What the front needs besides `ip`.
pub const TOOLS: &[tools::Tool] = &[tools::NFT, tools::CONNTRACK];

#[cfg(test)]
mod tests {
    use anyhow::bail;

    use super::*;

    /// Fails unless `ruleset` holds every line of `want`.
    fn assert_lines(ruleset: &str, want: &[&str]) -> Result<()> {
        for w in want {
            if !ruleset.lines().any(|l| l.trim() == *w) {
                bail!("missing {w:?} in:\n{ruleset}");
            }
        }
        Ok(())
    }

    fn pods() -> Vec<IpAddr> {
        vec!["10.244.0.10".parse().unwrap(), "10.244.0.11".parse().unwrap()]
    }

    #[test]
    fn affinity_table_has_per_port_sets_and_endpoint_chains() -> Result<()> {
        let t = table("192.0.2.2".parse()?, &pods(), Affinity::client_ip());
        assert_lines(
            &t,
            &[
                "set aff_500_0 {",
                "set aff_4500_1 {",
                "timeout 10800s",
                "update @aff_4500_1 { ip saddr }",
                "meta l4proto udp dnat to 10.244.0.11:4500",
                "ip daddr 192.0.2.2 udp dport 500 goto svc_500",
                "iifname \"pod0\" oifname \"wan0\" counter name \"stray\" drop",
            ],
        )?;
        assert_eq!(t.matches('{').count(), t.matches('}').count());
        let none = table("192.0.2.2".parse()?, &pods(), Affinity::None);
        ensure!(!none.contains("set aff_") && !none.contains("update @"), "{none}");
        Ok(())
    }

    #[test]
    fn service_chains_check_affinity_then_pick_among_endpoints() -> Result<()> {
        let r = endpoint_rules(&pods(), &[true, true], Affinity::client_ip());
        assert_lines(
            &r,
            &[
                "flush chain ip kube_front svc_4500",
                "add rule ip kube_front svc_500 ip saddr @aff_500_1 goto ep_500_1",
                "add rule ip kube_front svc_4500 numgen random mod 2 vmap { 0 : goto ep_4500_0, 1 : goto ep_4500_1 }",
            ],
        )?;
        let one = endpoint_rules(&pods(), &[false, true], Affinity::None);
        assert_lines(
            &one,
            &["add rule ip kube_front svc_500 numgen random mod 1 vmap { 0 : goto ep_500_1 }"],
        )?;
        ensure!(!one.contains("ep_500_0") && !one.contains("@aff"), "{one}");
        let none = endpoint_rules(&pods(), &[false, false], Affinity::None);
        assert_lines(&none, &["add rule ip kube_front svc_500 drop"])
    }

    #[test]
    fn parses_conntrack_lines_and_set_elements() {
        let line = "udp      17 29 src=192.0.2.11 dst=192.0.2.2 sport=4500 dport=4500 [UNREPLIED] \
                    src=10.244.0.11 dst=192.0.2.11 sport=4500 dport=4500 mark=0 use=1";
        let f = parse_flow(line).unwrap();
        assert_eq!(f.client, "192.0.2.11:4500".parse().unwrap());
        assert_eq!((f.port, f.pod), (4500, "10.244.0.11".parse().unwrap()));
        assert!(parse_flow("conntrack v1.4.7 (conntrack-tools): 5 flow entries").is_none());
        let set = "table ip kube_front {\n\tset aff_500_1 {\n\t\ttype ipv4_addr\n\t\t\
                   elements = { 192.0.2.11 expires 2h59m59s948ms, 192.0.2.12 expires 2h59m58s }\n\t}\n}\n";
        let got = parse_set_elements(set);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], "192.0.2.12".parse::<IpAddr>().unwrap());
        assert!(parse_set_elements("set aff_500_0 {\n}").is_empty());
    }
}
