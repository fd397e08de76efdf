//! The VIP front's wiring (docs/fleet.md, "The VIP front"): the director in the gateways
//! redirects new sites to each pod's own per-pod Service address, which is only known once
//! the platform has given that Service one. The operator writes what it finds into a
//! ConfigMap of its own, `<fleet>-front`, mounted in every pod (optional, so pods start before
//! it exists); each gateway reads its line (`<pod> <IP>`) at each load report and publishes
//! it in its member record. A pod whose Service has no address yet is never a redirect
//! target; kubelet updates the file in place, so nothing rolls the pods.

use concentrator_crds::GatewayFleet;
use concentrator_crds::fleet::FrontMode;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::build::{BuildError, meta, typed};

/// Where the `<fleet>-front` ConfigMap is mounted in a gateway pod.
pub const FRONT_DIR: &str = "/etc/concentrator-front";
/// Its key with the per-pod addresses (`--fleet-redirect-addresses-file`).
pub const ADDRESSES_KEY: &str = "redirect-addresses";

/// The name of the fleet's front ConfigMap.
pub fn config_map_name(fleet: &str) -> String {
    format!("{fleet}-front")
}

/// The gateway's environment, mounts and volumes for the VIP front (none in the SLB front):
/// the director on (`CONCENTRATOR_FLEET_VIP`, the front's fixed address, or `0.0.0.0` when
/// the platform picks it) and the addresses file.
pub(crate) fn gateway_env(fleet: &GatewayFleet, name: &str) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    if fleet.spec.front.mode != FrontMode::Vip {
        return (vec![], vec![], vec![]);
    }
    let vip = fleet
        .spec
        .front
        .address
        .as_deref()
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .unwrap_or("0.0.0.0");
    let mut env = vec![
        json!({"name": "CONCENTRATOR_FLEET_VIP", "value": vip}),
        json!({"name": "CONCENTRATOR_FLEET_REDIRECT_ADDRESSES_FILE", "value": format!("{FRONT_DIR}/{ADDRESSES_KEY}")}),
    ];
    if fleet.spec.front.redirect_in_auth {
        env.push(json!({"name": "CONCENTRATOR_FLEET_REDIRECT_IN_AUTH", "value": "true"}));
    }
    if fleet.spec.front.rebalance {
        env.push(json!({"name": "CONCENTRATOR_FLEET_REBALANCE", "value": "true"}));
    }
    (
        env,
        vec![json!({"name": "front", "mountPath": FRONT_DIR, "readOnly": true})],
        vec![json!({"name": "front", "configMap": {"name": config_map_name(name), "optional": true}})],
    )
}

/// The per-pod addresses the platform gave the per-pod Services of `fleet` (named
/// `<fleet>-<ordinal>`, as their pods): `<pod> <IP>` lines in ordinal order. A Service with no
/// load-balancer IP yet has no line; a hostname is not used (sites follow a redirect to an
/// address).
pub fn addresses(fleet: &str, services: &[Service]) -> String {
    let mut lines: Vec<(u32, String)> = services
        .iter()
        .filter_map(|s| {
            let name = s.name_any();
            let ordinal: u32 = name.strip_prefix(fleet)?.strip_prefix('-')?.parse().ok()?;
            let ip = s
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .iter()
                .find_map(|i| {
                    i.ip.as_deref()
                        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
                })?;
            Some((ordinal, format!("{name} {ip}\n")))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, l)| l).collect()
}

/// The `<fleet>-front` ConfigMap from the applied front Services (`None` in the SLB front).
pub fn config_map(fleet: &GatewayFleet, services: &[Service]) -> Result<Option<ConfigMap>, BuildError> {
    if fleet.spec.front.mode != FrontMode::Vip {
        return Ok(None);
    }
    let name = fleet.meta().name.clone().ok_or(BuildError::Unnamed)?;
    let ns = fleet.meta().namespace.clone().ok_or(BuildError::Unnamed)?;
    let cm = typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(fleet, &config_map_name(&name), &ns),
            "data": {ADDRESSES_KEY: addresses(&name, services)},
        }),
    )?;
    Ok(Some(cm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(front: &str) -> GatewayFleet {
        let mut f: GatewayFleet = serde_yaml::from_str(&format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn, uid: u-1}}\n\
             spec:\n  etcd: {{endpoints: ['http://etcd:2379']}}\n  fleetKeySecretRef: {{name: fleet, key: key}}\n{front}"
        ))
        .unwrap();
        f.meta_mut().uid = Some("u-1".into());
        f
    }

    fn service(name: &str, ingress: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}}}\nstatus: {{loadBalancer: {{ingress: {ingress}}}}}"
        ))
        .unwrap()
    }

    #[test]
    fn lists_the_per_pod_addresses_the_platform_gave() {
        let services = [
            service("edge", "[{ip: 203.0.113.1}]"),
            service("edge-10", "[{ip: 203.0.113.20}]"),
            service("edge-2", "[{hostname: lb.example.com}, {ip: 203.0.113.12}]"),
            service("edge-0", "[{ip: 203.0.113.10}]"),
            service("edge-1", "[]"),
            service("edge-3", "[{hostname: lb.example.com}]"),
            service("edgeway-4", "[{ip: 203.0.113.14}]"),
            service("edge-x", "[{ip: 203.0.113.15}]"),
        ];
        assert_eq!(
            addresses("edge", &services),
            "edge-0 203.0.113.10\nedge-2 203.0.113.12\nedge-10 203.0.113.20\n"
        );
    }

    #[test]
    fn only_the_vip_front_gets_the_director() {
        let slb = fleet("");
        assert!(gateway_env(&slb, "edge").0.is_empty());
        assert!(config_map(&slb, &[]).unwrap().is_none());

        let vip = fleet("  front: {mode: Vip, address: 203.0.113.1}\n");
        let (env, mounts, volumes) = gateway_env(&vip, "edge");
        assert_eq!(env[0]["value"], "203.0.113.1");
        assert_eq!(env[1]["value"], "/etc/concentrator-front/redirect-addresses");
        assert_eq!(mounts[0]["mountPath"], FRONT_DIR);
        assert_eq!(volumes[0]["configMap"]["name"], "edge-front");
        assert_eq!(volumes[0]["configMap"]["optional"], true);
        let cm = config_map(&vip, &[service("edge-0", "[{ip: 203.0.113.10}]")])
            .unwrap()
            .unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("edge-front"));
        assert_eq!(cm.data.unwrap()[ADDRESSES_KEY], "edge-0 203.0.113.10\n");

        let picked = fleet("  front: {mode: Vip}\n");
        assert_eq!(gateway_env(&picked, "edge").0[0]["value"], "0.0.0.0");
        assert_eq!(gateway_env(&picked, "edge").0.len(), 2);
        let both = fleet("  front: {mode: Vip, redirectInAuth: true, rebalance: true}\n");
        let names: Vec<Value> = gateway_env(&both, "edge")
            .0
            .iter()
            .map(|e| e["name"].clone())
            .collect();
        assert!(names.contains(&json!("CONCENTRATOR_FLEET_REDIRECT_IN_AUTH")));
        assert!(names.contains(&json!("CONCENTRATOR_FLEET_REBALANCE")));
    }
}
