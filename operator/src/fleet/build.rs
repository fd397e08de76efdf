//! Pure builders: a validated fleet and the Eroutes/Egroups of its namespace in, the Kubernetes
//! objects that realise it out. No API calls here, so every object is unit-tested from YAML.

use std::collections::BTreeSet;

use concentrator_crds::fleet::{FrontMode, FrontServiceType};
use concentrator_crds::{Egroup, Eroute, GatewayFleet, SecretKeyRef};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

mod overrides;

/// Where the rendered config and Secrets are mounted in a gateway pod: the same directory
/// layout `concentrator-gateway --config-dir` reads standalone.
pub const CONFIG_DIR: &str = "/etc/concentrator";
/// Default gateway image when the fleet names none.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/concentrator/concentrator-gateway:",
    env!("CARGO_PKG_VERSION")
);

/// Errors building objects (a builder bug, caught by the unit tests, never by users).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("building {0}: {1}")]
    Shape(&'static str, serde_json::Error),
    #[error("rendering config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("fleet has no name or namespace")]
    Unnamed,
}

/// Where gateway pods receive each other's forwarded packets (UDP).
pub const FLEET_PORT: u16 = 4510;
/// Where the fleet key and the etcd client TLS files are mounted (apart from the config,
/// readable by the gateway's user only).
const FLEET_KEY_DIR: &str = "/etc/concentrator-fleet";
const ETCD_TLS_DIR: &str = "/etc/concentrator-etcd";
/// Where the admin API's TLS Secret is mounted (`--admin-tls-dir`).
pub const ADMIN_TLS_DIR: &str = "/etc/concentrator-admin";
/// The admin API's port on every pod.
pub const ADMIN_PORT: u16 = 50051;
/// The metrics port on every pod.
pub const METRICS_PORT: u16 = 9090;

/// The admin API's listen address, environment, mounts and volumes: with the fleet's admin
/// TLS Secret, mutual TLS on every address (the operator and the other pods reach it);
/// without, plaintext on the pod's loopback only, which the gateway allows.
fn admin_api(fleet: &GatewayFleet) -> (String, Vec<Value>, Vec<Value>, Vec<Value>) {
    match &fleet.spec.admin_tls_secret_name {
        None => (format!("127.0.0.1:{ADMIN_PORT}"), vec![], vec![], vec![]),
        Some(secret) => (
            format!("0.0.0.0:{ADMIN_PORT}"),
            vec![json!({"name": "CONCENTRATOR_ADMIN_TLS_DIR", "value": ADMIN_TLS_DIR})],
            vec![json!({"name": "admin-tls", "mountPath": ADMIN_TLS_DIR, "readOnly": true})],
            vec![json!({"name": "admin-tls", "secret": {
                "secretName": secret,
                "items": [
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"},
                    {"key": "ca.crt", "path": "ca.crt"},
                ],
                "defaultMode": 0o400,
            }})],
        ),
    }
}

/// The environment, mounts and volumes that make each pod a member of the fleet: etcd (and
/// its client TLS Secret), a key prefix of its own per fleet, the pod's name (its ordinal is
/// its member ID) and IP from the downward API, the fleet key from its Secret.
fn fleet_membership(fleet: &GatewayFleet, name: &str, ns: &str) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let spec = &fleet.spec;
    let key = &spec.fleet_key_secret_ref;
    let mut env = vec![
        json!({"name": "CONCENTRATOR_FLEET_ETCD", "value": spec.etcd.endpoints.join(",")}),
        json!({"name": "CONCENTRATOR_FLEET_PREFIX", "value": format!("/concentrator/{ns}/{name}")}),
        json!({"name": "CONCENTRATOR_FLEET_MEMBER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        // The IP alone (an IPv6 pod IP with a port would need brackets): the gateway's
        // default fleet port is FLEET_PORT.
        json!({"name": "CONCENTRATOR_FLEET_ADDRESS", "value": "$(POD_IP)"}),
        json!({"name": "CONCENTRATOR_FLEET_KEY_FILE", "value": format!("{FLEET_KEY_DIR}/key")}),
        json!({"name": "CONCENTRATOR_FLEET_REPLICAS", "value": spec.takeover.copies.to_string()}),
        json!({"name": "CONCENTRATOR_FLEET_MESSAGE_ID_SYNC", "value": spec.takeover.message_id_sync.to_string()}),
    ];
    let mut mounts = vec![json!({"name": "fleet-key", "mountPath": FLEET_KEY_DIR, "readOnly": true})];
    let mut volumes = vec![json!({"name": "fleet-key", "secret": {
        "secretName": key.name,
        "items": [{"key": key.key, "path": "key"}],
        "defaultMode": 0o400,
    }})];
    if let Some(tls) = &spec.etcd.tls_secret_name {
        for (var, file) in [
            ("CONCENTRATOR_FLEET_ETCD_CA", "ca.crt"),
            ("CONCENTRATOR_FLEET_ETCD_CERT", "tls.crt"),
            ("CONCENTRATOR_FLEET_ETCD_KEY", "tls.key"),
        ] {
            env.push(json!({"name": var, "value": format!("{ETCD_TLS_DIR}/{file}")}));
        }
        mounts.push(json!({"name": "etcd-tls", "mountPath": ETCD_TLS_DIR, "readOnly": true}));
        volumes.push(json!({"name": "etcd-tls", "secret": {"secretName": tls, "defaultMode": 0o400}}));
    }
    (env, mounts, volumes)
}

/// Everything one fleet needs in the cluster.
#[derive(Debug, Clone)]
pub struct Desired {
    pub config: ConfigMap,
    pub statefulset: StatefulSet,
    pub headless: Service,
    /// SLB: the one front Service. VIP: the director's VIP Service plus one per pod.
    pub fronts: Vec<Service>,
    pub pdb: PodDisruptionBudget,
}

pub(crate) fn labels(fleet: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "concentrator-gateway",
        "app.kubernetes.io/instance": fleet,
        "app.kubernetes.io/component": "gateway",
        "app.kubernetes.io/managed-by": "concentrator-operator",
    })
}

pub(crate) fn selector(fleet: &str) -> Value {
    json!({"app.kubernetes.io/name": "concentrator-gateway", "app.kubernetes.io/instance": fleet})
}

pub(crate) fn meta(fleet: &GatewayFleet, name: &str, ns: &str) -> Value {
    let owner = fleet
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    json!({
        "name": name,
        "namespace": ns,
        "labels": labels(&fleet.name_any()),
        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
    })
}

pub(crate) fn typed<T: serde::de::DeserializeOwned>(what: &'static str, v: Value) -> Result<T, BuildError> {
    serde_json::from_value(v).map_err(|e| BuildError::Shape(what, e))
}

/// The Eroutes and Egroups as the gateway reads them: one multi-document YAML file, with
/// only what the gateway needs (no status, no managed fields).
pub fn render_config(eroutes: &[Eroute], egroups: &[Egroup]) -> Result<String, BuildError> {
    let mut out = String::new();
    let mut docs: Vec<(String, Value)> = Vec::new();
    for e in eroutes {
        docs.push((
            format!("Eroute/{}", e.name_any()),
            json!({
                "apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Eroute",
                "metadata": {"name": e.name_any()}, "spec": e.spec,
            }),
        ));
    }
    for g in egroups {
        docs.push((
            format!("Egroup/{}", g.name_any()),
            json!({
                "apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Egroup",
                "metadata": {"name": g.name_any()}, "spec": g.spec,
            }),
        ));
    }
    // Sorted so the same objects always render the same bytes: an unchanged set leaves the
    // ConfigMap, and the gateways, alone.
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, d) in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d)?);
    }
    Ok(out)
}

/// Secret keys the gateways must see under `secrets/<name>/<key>`.
pub fn referenced_secrets(eroutes: &[Eroute], egroups: &[Egroup]) -> BTreeSet<(String, String)> {
    let mut refs = BTreeSet::new();
    let mut add = |r: &SecretKeyRef| {
        refs.insert((r.name.clone(), r.key.clone()));
    };
    eroutes
        .iter()
        .filter_map(|e| e.spec.psk_secret_ref.as_ref())
        .for_each(&mut add);
    egroups
        .iter()
        .filter_map(|g| g.spec.database.url_secret_ref.as_ref())
        .for_each(&mut add);
    refs
}

/// The name of the fleet's Secret that carries the keys its config refers to.
pub fn config_secrets_name(fleet: &str) -> String {
    format!("{fleet}-config-secrets")
}

/// The fleet's Secret carrying the keys its Eroutes and Egroups refer to (`values`, by
/// Secret name and key), each under the name the gateway reads at the top of its config
/// directory (`<name>_<key>.secret`).
pub fn config_secrets(
    fleet: &GatewayFleet,
    values: &std::collections::BTreeMap<(String, String), k8s_openapi::ByteString>,
) -> Result<Secret, BuildError> {
    let name = fleet.meta().name.clone().ok_or(BuildError::Unnamed)?;
    let ns = fleet.meta().namespace.clone().ok_or(BuildError::Unnamed)?;
    let data: serde_json::Map<String, Value> = values
        .iter()
        .map(|((secret, key), v)| {
            (
                format!("{secret}_{key}.secret"),
                serde_json::to_value(v).unwrap_or(Value::Null),
            )
        })
        .collect();
    typed(
        "Secret",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": meta(fleet, &config_secrets_name(&name), &ns),
            "type": "Opaque",
            "data": data,
        }),
    )
}

/// Builds every object of the fleet.
pub fn desired(
    fleet: &GatewayFleet,
    eroutes: &[Eroute],
    egroups: &[Egroup],
    replicas: u32,
) -> Result<Desired, BuildError> {
    let name = fleet.meta().name.clone().ok_or(BuildError::Unnamed)?;
    let ns = fleet.meta().namespace.clone().ok_or(BuildError::Unnamed)?;
    let spec = &fleet.spec;
    let rendered = render_config(eroutes, egroups)?;
    let config_name = format!("{name}-config");
    let headless_name = format!("{name}-pods");

    let config = typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(fleet, &config_name, &ns),
            "data": {"concentrator.yaml": rendered},
        }),
    )?;

    // The Secrets the config refers to come through one Secret of the operator's, whole:
    // which Eroutes and Secrets exist never shows in the pod template, so no edit rolls the
    // pods (kubelet updates the volume and the gateway reloads).
    let sources = vec![
        json!({"configMap": {"name": config_name}}),
        json!({"secret": {"name": config_secrets_name(&name)}}),
    ];

    let image = spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
    // From the Secret straight into the environment: the URL holds a password and never
    // appears in the pod spec or the rendered config.
    let mut env: Vec<Value> = spec
        .site_database_url_secret_ref
        .iter()
        .map(|r| json!({"name": "CONCENTRATOR_SITE_DB", "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}}}))
        .collect();
    let (fleet_env, fleet_mounts, fleet_volumes) = fleet_membership(fleet, &name, &ns);
    env.extend(fleet_env);
    let (admin_listen, admin_env, admin_mounts, admin_volumes) = admin_api(fleet);
    env.extend(admin_env);
    let (vip_env, vip_mounts, vip_volumes) = super::vip::gateway_env(fleet, &name);
    env.extend(vip_env);
    let mut mounts = vec![
        json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}),
        json!({"name": "data", "mountPath": "/var/lib/concentrator"}),
        json!({"name": "tun", "mountPath": "/dev/net/tun"}),
    ];
    mounts.extend(fleet_mounts);
    mounts.extend(admin_mounts);
    mounts.extend(vip_mounts);
    let mut volumes = vec![
        // Secrets (PSKs, database URLs) are among the sources: readable by the gateway's
        // user only.
        json!({"name": "config", "projected": {"sources": sources, "defaultMode": 0o400}}),
        json!({"name": "data", "emptyDir": {}}),
        json!({"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}}),
    ];
    volumes.extend(fleet_volumes);
    volumes.extend(admin_volumes);
    volumes.extend(vip_volumes);
    let mut statefulset = typed(
        "StatefulSet",
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": meta(fleet, &name, &ns),
            "spec": {
                "replicas": replicas,
                "serviceName": headless_name,
                // Pods start and stop in parallel: ordering buys nothing, member identity comes
                // from the stable ordinal, which is why this is a StatefulSet.
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": selector(&name)},
                "template": {
                    // No digest of the rendered config here: Eroutes and Egroups reach the pods
                    // through the ConfigMap, which kubelet updates in place and the gateways
                    // reload, so an edit must not roll the pods (and drop their tunnels). The
                    // template holds only what needs a restart: the fleet's args and env, and
                    // the volumes' sources.
                    "metadata": {"labels": labels(&name)},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 100,
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "gateway",
                            "image": image,
                            "args": [
                                "--config-dir", CONFIG_DIR,
                                "--data-dir", "/var/lib/concentrator",
                                "--admin-listen", admin_listen,
                                "--metrics-listen", format!("0.0.0.0:{METRICS_PORT}"),
                                "--log-format", "json",
                            ],
                            "ports": [
                                {"name": "ike", "containerPort": 500, "protocol": "UDP"},
                                {"name": "ike-natt", "containerPort": 4500, "protocol": "UDP"},
                                {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                                {"name": "fleet", "containerPort": FLEET_PORT, "protocol": "UDP"},
                                // SA replication between members (take-over).
                                {"name": "fleet-sync", "containerPort": FLEET_PORT, "protocol": "TCP"},
                            ],
                            "env": env,
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}},
                            // A pod removed by hand, by a rollout or by a node drain hands its
                            // tunnels over first (it answers not ready meanwhile); the grace
                            // period above leaves the SIGTERM path time to finish.
                            "lifecycle": {"preStop": {"exec": {"command": [
                                "/usr/local/bin/concentrator-gateway", "drain", "--wait", "--timeout", "45s",
                            ]}}},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                            // NET_ADMIN for the TUN device and its routes, NET_BIND_SERVICE for
                            // UDP 500: nothing more.
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]},
                            },
                            "volumeMounts": mounts,
                        }],
                        "volumes": volumes,
                    },
                },
            },
        }),
    )?;
    overrides::pod(&spec.pod, &mut statefulset);

    let headless = typed(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(fleet, &headless_name, &ns),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": true,
                "selector": selector(&name),
                "ports": [{"name": "admin", "port": ADMIN_PORT, "protocol": "TCP"}],
            },
        }),
    )?;

    let service_type = match spec.front.service_type {
        FrontServiceType::LoadBalancer => "LoadBalancer",
        FrontServiceType::NodePort => "NodePort",
    };
    let udp_ports = json!([
        {"name": "ike", "port": 500, "targetPort": 500, "protocol": "UDP"},
        {"name": "ike-natt", "port": 4500, "targetPort": 4500, "protocol": "UDP"},
    ]);
    let front = |svc_name: &str, sel: Value| -> Result<Service, BuildError> {
        let mut s = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(fleet, svc_name, &ns),
            "spec": {
                "type": service_type,
                // Source addresses must survive to the pod: IKE NAT detection and per-site
                // affinity depend on them.
                "externalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
                "selector": sel,
                "ports": udp_ports,
            },
        });
        if let Some(addr) = &spec.front.address {
            s["spec"]["loadBalancerIP"] = json!(addr);
        }
        let mut s = typed("Service", s)?;
        overrides::front(&spec.front, &mut s);
        Ok(s)
    };
    let mut fronts = vec![front(&name, selector(&name))?];
    if spec.front.mode == FrontMode::Vip {
        // Redirect targets: one externally reachable address per pod.
        for i in 0..replicas {
            let pod = format!("{name}-{i}");
            let mut sel = selector(&name);
            sel["statefulset.kubernetes.io/pod-name"] = json!(pod);
            let mut svc = front(&pod, sel)?;
            if let Some(s) = svc.spec.as_mut() {
                s.load_balancer_ip = None;
                s.session_affinity = None;
                s.session_affinity_config = None;
                // A draining pod answers not ready, yet the sites redirected to it still
                // come here until it exits: it forwards their packets to the members its
                // tunnels were handed to.
                s.publish_not_ready_addresses = Some(true);
            }
            fronts.push(svc);
        }
    }

    let pdb = typed(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(fleet, &name, &ns),
            // One pod at a time: its tunnels must be handed over before the next goes.
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(&name)}},
        }),
    )?;

    Ok(Desired {
        config,
        statefulset,
        headless,
        fronts,
        pdb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(extra: &str) -> GatewayFleet {
        let mut f: GatewayFleet = serde_yaml::from_str(&format!(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn, uid: u-1}}\n\
             spec:\n  etcd: {{endpoints: ['http://etcd:2379']}}\n  fleetKeySecretRef: {{name: fleet, key: key}}\n{extra}"
        ))
        .unwrap();
        f.meta_mut().uid = Some("u-1".into());
        f
    }

    fn pod_spec(d: &Desired) -> &k8s_openapi::api::core::v1::PodSpec {
        d.statefulset
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    fn eroute() -> Eroute {
        serde_yaml::from_str(
            "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata: {name: hq, namespace: vpn}\n\
             spec: {localSubnet: 10.0.0.0/16, remoteSubnet: 172.16.0.0/24, peerId: hq, pskSecretRef: {name: hq, key: psk}}\n",
        )
        .unwrap()
    }

    #[test]
    fn slb_front_has_affinity_local_policy_and_udp_ports() {
        let d = desired(&fleet(""), &[eroute()], &[], 2).unwrap();
        assert_eq!(d.fronts.len(), 1);
        let s = d.fronts[0].spec.as_ref().unwrap();
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(s.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(s.external_traffic_policy.as_deref(), Some("Local"));
        let ports: Vec<_> = s
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.port, p.protocol.clone().unwrap()))
            .collect();
        assert_eq!(ports, [(500, "UDP".to_owned()), (4500, "UDP".to_owned())]);
    }

    #[test]
    fn vip_mode_adds_one_service_per_pod() {
        let d = desired(
            &fleet("  front: {mode: Vip, serviceType: NodePort}\n"),
            &[],
            &[],
            3,
        )
        .unwrap();
        assert_eq!(d.fronts.len(), 4);
        let last = d.fronts[3].spec.as_ref().unwrap();
        assert_eq!(
            last.selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"],
            "edge-2"
        );
        assert_eq!(last.type_.as_deref(), Some("NodePort"));
        assert_eq!(
            last.publish_not_ready_addresses,
            Some(true),
            "a draining pod still gets the flows of the sites redirected to it"
        );
        assert_eq!(
            d.fronts[0].spec.as_ref().unwrap().publish_not_ready_addresses,
            None
        );
    }

    #[test]
    fn pods_get_net_admin_and_tun_and_nothing_more() {
        let d = desired(&fleet(""), &[eroute()], &[], 2).unwrap();
        let pod = pod_spec(&d);
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_ADMIN".to_owned(), "NET_BIND_SERVICE".to_owned()][..])
        );
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let tun = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tun")
            .unwrap();
        assert_eq!(
            tun.host_path.as_ref().unwrap().type_.as_deref(),
            Some("CharDevice")
        );
    }

    #[test]
    fn site_database_url_comes_from_its_secret() {
        let d = desired(
            &fleet("  siteDatabaseUrlSecretRef: {name: sitedb, key: url}\n"),
            &[],
            &[],
            1,
        )
        .unwrap();
        let c = &pod_spec(&d).containers[0];
        let env = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CONCENTRATOR_SITE_DB")
            .unwrap();
        assert_eq!(env.value, None);
        let r = env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("sitedb", "url"));
        let none = desired(&fleet(""), &[], &[], 1).unwrap();
        let c = &pod_spec(&none).containers[0];
        assert!(
            !c.env
                .as_ref()
                .unwrap()
                .iter()
                .any(|e| e.name == "CONCENTRATOR_SITE_DB")
        );
    }

    #[test]
    fn pods_join_the_fleet_with_their_name_ip_and_the_key_secret() {
        let mut f = fleet("");
        f.spec.etcd.endpoints = vec!["https://etcd-0:2379".into(), "https://etcd-1:2379".into()];
        f.spec.etcd.tls_secret_name = Some("etcd-client".into());
        let d = desired(&f, &[], &[], 2).unwrap();
        let pod = pod_spec(&d);
        let c = &pod.containers[0];
        let env = |n: &str| {
            c.env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == n)
                .cloned()
                .unwrap()
        };
        assert_eq!(env("CONCENTRATOR_FLEET_REPLICAS").value.as_deref(), Some("1"));
        assert_eq!(
            env("CONCENTRATOR_FLEET_MESSAGE_ID_SYNC").value.as_deref(),
            Some("false")
        );
        assert_eq!(
            env("CONCENTRATOR_FLEET_ETCD").value.as_deref(),
            Some("https://etcd-0:2379,https://etcd-1:2379")
        );
        assert_eq!(
            env("CONCENTRATOR_FLEET_PREFIX").value.as_deref(),
            Some("/concentrator/vpn/edge")
        );
        let member = env("CONCENTRATOR_FLEET_MEMBER")
            .value_from
            .unwrap()
            .field_ref
            .unwrap();
        assert_eq!(member.field_path, "metadata.name");
        // POD_IP is defined before the variable that refers to it, as Kubernetes requires.
        let names: Vec<_> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
        let at = |n| names.iter().position(|x| *x == n).unwrap();
        assert!(at("POD_IP") < at("CONCENTRATOR_FLEET_ADDRESS"));
        assert_eq!(
            env("CONCENTRATOR_FLEET_ADDRESS").value.as_deref(),
            Some("$(POD_IP)")
        );
        assert_eq!(
            env("CONCENTRATOR_FLEET_ETCD_CA").value.as_deref(),
            Some("/etc/concentrator-etcd/ca.crt")
        );
        let key = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "fleet-key")
            .unwrap();
        let secret = key.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("fleet"));
        assert_eq!(secret.default_mode, Some(0o400));
        assert_eq!(secret.items.as_ref().unwrap()[0].key, "key");
        assert!(
            c.ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.container_port == 4510 && p.protocol.as_deref() == Some("UDP"))
        );
        assert!(
            c.ports
                .as_ref()
                .unwrap()
                .iter()
                .any(|p| p.container_port == 4510 && p.protocol.as_deref() == Some("TCP")),
            "replication streams are TCP on the fleet port"
        );
    }

    #[test]
    fn admin_api_is_mutual_tls_with_the_secret_else_loopback_only() {
        let arg_after = |d: &Desired, flag: &str| {
            let args = pod_spec(d).containers[0].args.clone().unwrap();
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        let plain = desired(&fleet(""), &[], &[], 1).unwrap();
        assert_eq!(arg_after(&plain, "--admin-listen"), "127.0.0.1:50051");
        assert!(
            !pod_spec(&plain)
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .any(|v| v.name == "admin-tls")
        );

        let d = desired(&fleet("  adminTlsSecretName: edge-admin\n"), &[], &[], 1).unwrap();
        assert_eq!(arg_after(&d, "--admin-listen"), "0.0.0.0:50051");
        let pod = pod_spec(&d);
        let c = &pod.containers[0];
        let env = c.env.as_ref().unwrap();
        let dir = env
            .iter()
            .find(|e| e.name == "CONCENTRATOR_ADMIN_TLS_DIR")
            .unwrap();
        assert_eq!(dir.value.as_deref(), Some(ADMIN_TLS_DIR));
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "admin-tls")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (ADMIN_TLS_DIR, Some(true))
        );
        let v = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "admin-tls")
            .unwrap();
        let secret = v.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("edge-admin"));
        assert_eq!(secret.default_mode, Some(0o400));
        let keys: Vec<_> = secret
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|i| i.key.as_str())
            .collect();
        assert_eq!(keys, ["tls.crt", "tls.key", "ca.crt"]);
    }

    #[test]
    fn secret_files_are_readable_by_the_owner_only() {
        let d = desired(&fleet(""), &[eroute()], &[], 1).unwrap();
        let config = pod_spec(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "config")
            .unwrap();
        assert_eq!(config.projected.as_ref().unwrap().default_mode, Some(0o400));
    }

    #[test]
    fn owner_reference_points_at_the_fleet() {
        let d = desired(&fleet(""), &[], &[], 1).unwrap();
        for m in [
            &d.statefulset.metadata,
            &d.config.metadata,
            &d.headless.metadata,
            &d.pdb.metadata,
        ] {
            let o = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (o.kind.as_str(), o.name.as_str(), o.controller),
                ("GatewayFleet", "edge", Some(true))
            );
            assert_eq!(m.labels.as_ref().unwrap()["app.kubernetes.io/instance"], "edge");
        }
    }

    #[test]
    fn config_is_rendered_for_the_gateway_with_secrets_mounted_in_its_layout() {
        let d = desired(&fleet(""), &[eroute()], &[], 1).unwrap();
        let yaml = &d.config.data.as_ref().unwrap()["concentrator.yaml"];
        assert!(
            yaml.contains("kind: Eroute") && yaml.contains("name: hq"),
            "{yaml}"
        );
        assert!(!yaml.contains("status"), "{yaml}");
        let pod = pod_spec(&d);
        let cfg = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "config")
            .unwrap();
        let sources = cfg.projected.as_ref().unwrap().sources.as_ref().unwrap();
        let secret = sources.iter().find_map(|s| s.secret.as_ref()).unwrap();
        assert_eq!(secret.name, "edge-config-secrets");
        assert!(secret.items.is_none(), "the whole Secret: no key in the template");
        let values = [(
            ("hq".to_owned(), "psk".to_owned()),
            k8s_openapi::ByteString(b"k".to_vec()),
        )]
        .into();
        let s = config_secrets(&fleet(""), &values).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("edge-config-secrets"));
        assert_eq!(s.data.unwrap()["hq_psk.secret"].0, b"k");
    }

    #[test]
    fn a_new_eroute_with_its_own_secret_leaves_the_pod_template_alone() {
        let a = desired(&fleet(""), &[eroute()], &[], 1).unwrap();
        let mut lab = eroute();
        lab.metadata.name = Some("lab".into());
        lab.spec.psk_secret_ref = Some(SecretKeyRef {
            name: "lab".into(),
            key: "psk".into(),
        });
        let b = desired(&fleet(""), &[eroute(), lab], &[], 1).unwrap();
        assert_eq!(
            serde_json::to_value(&a.statefulset.spec.as_ref().unwrap().template).unwrap(),
            serde_json::to_value(&b.statefulset.spec.as_ref().unwrap().template).unwrap()
        );
    }

    #[test]
    fn config_change_leaves_the_pod_template_alone() {
        let a = desired(&fleet(""), &[eroute()], &[], 1).unwrap();
        let mut e = eroute();
        e.spec.peer_id = Some("other".into());
        e.spec.ike.lifetime = Some("2h".into());
        let b = desired(&fleet(""), &[e], &[], 1).unwrap();
        let template =
            |d: &Desired| serde_json::to_value(&d.statefulset.spec.as_ref().unwrap().template).unwrap();
        assert_eq!(
            template(&a),
            template(&b),
            "an Eroute edit must not roll the pods"
        );
        assert_ne!(a.config, b.config, "it reaches them through the ConfigMap");
        // What the pods read only at start still changes the template (and rolls them).
        let c = desired(&fleet("  image: gw:2\n"), &[eroute()], &[], 1).unwrap();
        assert_ne!(template(&a), template(&c));
    }
}
