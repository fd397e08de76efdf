//! The VIP front's platform part, as Kubernetes gives it in VIP mode: besides the front
//! Service (the VIP, [`super::Front`]), one LoadBalancer Service per pod, whose address the
//! director redirects sites to. Here each pod's address is an address of the front
//! namespace on the sites' WAN, DNAT'd (UDP 500 and 4500) to that pod alone, as kube-proxy
//! does for a Service that selects one pod by `statefulset.kubernetes.io/pod-name`.

use std::net::IpAddr;

use anyhow::{Context, Result};

use super::front::{SERVICE_PORTS, WAN_IF};
use super::{Front, pod_ip, pod_name};
use crate::netns::addr;
use crate::tools;

/// The nftables table of the per-pod Services.
const TABLE: &str = "kube_pod_services";

/// Pod `i`'s own Service address on the WAN, 192.0.2.{200 + i} (above the sites').
pub fn redirect_address(i: usize) -> IpAddr {
    addr(&format!("192.0.2.{}", 200 + i))
}

/// Gives each of `pods` pods its own address on the front ([`redirect_address`]).
pub fn expose_pods(front: &Front, pods: usize) -> Result<()> {
    let ns = front.namespace();
    let ports = SERVICE_PORTS.map(|p| p.to_string()).join(", ");
    // Before kube_front's Service chains (priority dstnat): a flow gets one DNAT.
    let mut script = format!(
        "add table ip {TABLE}; add chain ip {TABLE} prerouting {{ type nat hook prerouting priority -110; policy accept; }}; "
    );
    for i in 0..pods {
        let a = redirect_address(i);
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", WAN_IF])
            .with_context(|| format!("adding {a} to the front"))?;
        script.push_str(&format!(
            "add rule ip {TABLE} prerouting ip daddr {a} udp dport {{ {ports} }} dnat to {}; ",
            pod_ip(i)
        ));
    }
    ns.run(tools::NFT.path(), &[&script])
        .with_context(|| format!("nft {script}"))?;
    Ok(())
}

/// The gateway's `--fleet-redirect-addresses-file` for `pods` pods: `gw-<i> <address>` lines,
/// what the operator's ConfigMap holds.
pub fn addresses_file(pods: usize) -> String {
    (0..pods)
        .map(|i| format!("{} {}\n", pod_name(i), redirect_address(i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_per_pod_and_above_the_sites() {
        assert_eq!(redirect_address(2), addr("192.0.2.202"));
        assert_eq!(addresses_file(2), "gw-0 192.0.2.200\ngw-1 192.0.2.201\n");
    }
}
