//! GatewayFleet reconcile against kube's mock API server: a scripted API that answers like
//! the real one and records every call, so each scenario asserts what went on the wire.

use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::GatewayFleet;
use concentrator_operator::controller::Context;
use concentrator_operator::fleet::admin::{AdminError, DrainState, FleetAdmin, GrpcFleetAdmin};
use concentrator_operator::fleet::reconcile;
use concentrator_operator::fleet::scale::PodReport;
use concentrator_proto::tls::{AdminTls, ClientTls};
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Mutex;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// What the fake cluster holds.
#[derive(Clone, Default)]
struct World {
    eroutes: Vec<Value>,
    secrets: Vec<(&'static str, &'static str)>,
    services: Vec<&'static str>,
    /// Replicas of the existing StatefulSet; None: not created yet.
    statefulset: Option<u32>,
    /// The fleet's rendered ConfigMap exists (applied by an earlier reconcile).
    config_map: bool,
    /// A Service that exists with this loadBalancerClass (name, class).
    service_class: Option<(&'static str, &'static str)>,
}

/// Scripted gateway pods: tunnels per ordinal (None: pod does not answer) and the drain answer.
struct Pods {
    tunnels: Vec<Option<u64>>,
    drained: bool,
    drain_calls: Mutex<Vec<u32>>,
    cancel_calls: Mutex<Vec<u32>>,
}

impl Pods {
    fn new(tunnels: Vec<Option<u64>>, drained: bool) -> Arc<Self> {
        Arc::new(Self {
            tunnels,
            drained,
            drain_calls: Mutex::default(),
            cancel_calls: Mutex::default(),
        })
    }
}

impl FleetAdmin for Pods {
    fn report<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<PodReport, AdminError>> {
        let r = match self.tunnels.get(ordinal as usize).copied().flatten() {
            Some(tunnels) => Ok(PodReport {
                tunnels,
                dynamic_eroutes: [("hq".to_owned(), tunnels)].into(),
                ..PodReport::default()
            }),
            None => Err(AdminError::Unreachable {
                pod: format!("edge-{ordinal}"),
                message: "connection refused".into(),
            }),
        };
        Box::pin(async move { r })
    }
    fn drain<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        self.drain_calls.lock().unwrap().push(ordinal);
        let s = if self.drained {
            DrainState::Drained
        } else {
            DrainState::Draining {
                remaining: 4,
                nowhere_to_go: false,
            }
        };
        Box::pin(async move { Ok(s) })
    }
    fn cancel_drain<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        ordinal: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        self.cancel_calls.lock().unwrap().push(ordinal);
        Box::pin(async move { Ok(DrainState::Active) })
    }
}

#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

fn reply(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn fake_api(mut handle: Handle, world: World) -> Vec<Call> {
    let mut calls = Vec::new();
    // The reconcile is done when no request arrives for a while.
    while let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_millis(500), handle.next_request()).await
    {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        });
        let last = path.rsplit('/').next().unwrap_or_default().to_owned();
        let list = |kind: &str, items: Vec<Value>| json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items});
        let resp = match (method, path.as_str()) {
            (Method::GET, p) if p.ends_with("/eroutes") => {
                reply(StatusCode::OK, &list("ErouteList", world.eroutes.clone()))
            }
            (Method::GET, p) if p.ends_with("/egroups") => reply(StatusCode::OK, &list("EgroupList", vec![])),
            (Method::GET, p) if p.ends_with("/services") => {
                let items = world
                    .services
                    .iter()
                    .map(|n| json!({"metadata": {"name": n, "namespace": "vpn"}}))
                    .collect();
                reply(StatusCode::OK, &list("ServiceList", items))
            }
            (Method::GET, p) if p.contains("/services/") => {
                match world.service_class.filter(|(n, _)| *n == last) {
                    Some((n, class)) => reply(
                        StatusCode::OK,
                        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": n, "namespace": "vpn"},
                                "spec": {"type": "LoadBalancer", "loadBalancerClass": class}}),
                    ),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                }
            }
            (Method::GET, p) if p.ends_with("/statefulsets/edge") => match world.statefulset {
                Some(n) => reply(
                    StatusCode::OK,
                    &json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "edge", "namespace": "vpn"},
                            "spec": {"replicas": n, "serviceName": "edge-pods", "selector": {}, "template": {}}}),
                ),
                None => reply(
                    StatusCode::NOT_FOUND,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            },
            (Method::GET, p) if p.ends_with("/configmaps/edge-config") && world.config_map => reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "edge-config", "namespace": "vpn"},
                        "data": {"concentrator.yaml": "eroutes: []"}}),
            ),
            (Method::GET, p)
                if p.ends_with("/networkpolicies/edge") || p.ends_with("/configmaps/edge-config") =>
            {
                reply(
                    StatusCode::NOT_FOUND,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            }
            (Method::GET, p) if p.contains("/secrets/") => {
                let data: serde_json::Map<String, Value> = world
                    .secrets
                    .iter()
                    .filter(|(n, _)| *n == last)
                    .map(|(_, key)| ((*key).to_owned(), json!("eA==")))
                    .collect();
                match data.is_empty() {
                    false => reply(
                        StatusCode::OK,
                        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": last}, "data": data}),
                    ),
                    true => reply(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                }
            }
            (Method::POST, p) if p.ends_with("/events") => reply(StatusCode::CREATED, &body),
            // The finalizer's JSON patch on the fleet itself.
            (Method::PATCH, p) if p.ends_with("/gatewayfleets/edge") => reply(
                StatusCode::OK,
                &json!({"apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "GatewayFleet",
                        "metadata": {"name": "edge", "namespace": "vpn"},
                        "spec": {"etcd": {"endpoints": []}, "fleetKeySecretRef": {"name": "f", "key": "k"}}}),
            ),
            (Method::PATCH, _) => {
                // Server-side apply echoes the object; add the fields the server owns.
                let mut obj = body.clone();
                obj["metadata"]["name"] = json!(if path.ends_with("/status") {
                    "edge".to_owned()
                } else {
                    last
                });
                obj["metadata"]["namespace"] = json!("vpn");
                if obj["kind"] == "Eroute" {
                    obj["spec"] = json!({"localSubnet": "", "remoteSubnet": ""});
                }
                if obj["kind"] == "GatewayFleet" {
                    obj["spec"] =
                        json!({"etcd": {"endpoints": []}, "fleetKeySecretRef": {"name": "f", "key": "k"}});
                }
                if obj["kind"] == "StatefulSet" {
                    obj["status"] = json!({"replicas": 2, "readyReplicas": 1});
                }
                reply(StatusCode::OK, &obj)
            }
            (Method::DELETE, _) => reply(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            (m, p) => panic!("unexpected call {m} {p}"),
        };
        send.send_response(resp);
    }
    calls
}

fn fleet(spec_extra: &str) -> GatewayFleet {
    serde_yaml::from_str(&format!(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn, uid: u1, generation: 2, finalizers: [vpn.concentrator.io/drain]}}\n\
         spec:\n  etcd: {{endpoints: ['http://etcd:2379']}}\n  fleetKeySecretRef: {{name: fleet, key: key}}\n{spec_extra}"
    ))
    .unwrap()
}

fn static_eroute() -> Value {
    json!({"apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Eroute",
           "metadata": {"name": "hq", "namespace": "vpn"},
           "spec": {"localSubnet": "10.0.0.0/16", "remoteSubnet": "172.16.0.0/24", "peerId": "hq",
                    "pskSecretRef": {"name": "hq", "key": "psk"}}})
}

async fn run(fleet: GatewayFleet, world: World) -> Vec<Call> {
    run_with(fleet, world, Pods::new(vec![], true)).await
}

async fn run_with(fleet: GatewayFleet, world: World, pods: Arc<Pods>) -> Vec<Call> {
    let (calls, result) = try_run(fleet, world, pods).await;
    result.unwrap();
    calls
}

async fn try_run(
    fleet: GatewayFleet,
    world: World,
    pods: Arc<Pods>,
) -> (
    Vec<Call>,
    Result<kube::runtime::controller::Action, concentrator_operator::controller::Error>,
) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = tokio::spawn(fake_api(handle, world));
    let ctx = Arc::new(Context::new(Client::new(svc, "vpn"), pods));
    let result = reconcile(Arc::new(fleet), ctx).await;
    (api.await.unwrap(), result)
}

fn status_patch(calls: &[Call]) -> &Value {
    let c = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/gatewayfleets/edge/status"))
        .expect("a status patch");
    &c.body["status"]
}

fn patched(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method == Method::PATCH && !c.path.ends_with("/status"))
        .map(|c| c.path.clone())
        .collect()
}

#[tokio::test]
async fn create_applies_every_object_and_reports_ready() {
    let world = World {
        eroutes: vec![static_eroute()],
        secrets: vec![("fleet", "key"), ("hq", "psk")],
        services: vec!["edge", "edge-pods", "edge-7"],
        statefulset: None,
        config_map: false,
        service_class: None,
    };
    let calls = run(fleet(""), world).await;
    let p = "/api/v1/namespaces/vpn";
    assert_eq!(
        patched(&calls),
        [
            format!("{p}/configmaps/edge-config"),
            format!("{p}/secrets/edge-config-secrets"),
            format!("{p}/services/edge-pods"),
            format!("{p}/services/edge"),
            "/apis/apps/v1/namespaces/vpn/statefulsets/edge".to_owned(),
            "/apis/policy/v1/namespaces/vpn/poddisruptionbudgets/edge".to_owned(),
            "/apis/networking.k8s.io/v1/namespaces/vpn/networkpolicies/edge".to_owned(),
        ]
    );
    assert_eq!(sts_replicas(&calls), 2, "a new fleet starts at minReplicas");
    // The config's keys travel in the operator's Secret; the fleet key does not.
    let carried = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/secrets/edge-config-secrets"))
        .unwrap();
    let keys: Vec<&String> = carried.body["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["hq_psk.secret"]);
    // The stale per-pod Service left from an earlier VIP mode is deleted.
    let deleted: Vec<_> = calls
        .iter()
        .filter(|c| c.method == Method::DELETE)
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(deleted, [format!("{p}/services/edge-7").as_str()]);
    let st = status_patch(&calls);
    assert_eq!(st["conditions"][0]["status"], "True");
    assert_eq!(
        (st["replicas"].as_i64(), st["readyReplicas"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(st["observedGeneration"], 2);
}

/// The fleet as last reconciled: Ready=True since `since`.
fn ready_since(since: &str) -> GatewayFleet {
    let mut f = fleet("");
    f.status = Some(
        serde_json::from_value(json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "Applied",
            "message": "gateway objects applied", "observedGeneration": 2,
            "lastTransitionTime": since,
        }]}))
        .unwrap(),
    );
    f
}

#[tokio::test]
async fn same_verdict_keeps_last_transition_time() {
    let world = World {
        eroutes: vec![static_eroute()],
        secrets: vec![("fleet", "key"), ("hq", "psk")],
        services: vec!["edge", "edge-pods"],
        statefulset: None,
        config_map: false,
        service_class: None,
    };
    let calls = run(ready_since("2026-01-01T00:00:00Z"), world).await;
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["status"], "True");
    assert_eq!(
        c["lastTransitionTime"], "2026-01-01T00:00:00Z",
        "a reconcile with the same verdict must not move lastTransitionTime (each write re-triggers a reconcile)"
    );
}

#[tokio::test]
async fn a_new_verdict_moves_last_transition_time() {
    let world = World {
        eroutes: vec![static_eroute()],
        secrets: vec![("fleet", "key")],
        services: vec![],
        statefulset: None,
        config_map: false,
        service_class: None,
    };
    let calls = run(ready_since("2026-01-01T00:00:00Z"), world).await;
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["status"], "False");
    let t = c["lastTransitionTime"].as_str().unwrap();
    assert!(
        t > "2026-01-01T00:00:00Z",
        "Ready True -> False must move lastTransitionTime, got {t}"
    );
}

/// Whom the Warning Events posted were about (`regarding.kind/name`), in order.
fn warnings(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method == Method::POST && c.path.ends_with("/events") && c.body["type"] == "Warning")
        .map(|c| {
            format!(
                "{}/{}",
                c.body["regarding"]["kind"].as_str().unwrap_or("?"),
                c.body["regarding"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[tokio::test]
async fn a_missing_secret_of_one_eroute_holds_back_the_config_only_and_the_fleet_scales() {
    // 3 pods at 900 tunnels each, 100 per pod wanted: scale out to the maximum, 6.
    let pods = Pods::new(vec![Some(900), Some(900), Some(900)], false);
    let mut world = ready_world(3);
    world.eroutes = vec![static_eroute()]; // its PSK Secret 'hq' does not exist
    let calls = run_with(scaling_fleet(), world, pods).await;
    let p = "/api/v1/namespaces/vpn";
    let applied = patched(&calls);
    assert!(
        !applied.contains(&format!("{p}/configmaps/edge-config"))
            && !applied.contains(&format!("{p}/secrets/edge-config-secrets")),
        "the pods keep the last valid config: {applied:?}"
    );
    assert_eq!(sts_replicas(&calls), 6, "the fleet goes on scaling");
    let st = status_patch(&calls);
    let c = &st["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("SecretMissing"))
    );
    assert_eq!(
        c["message"],
        "Eroute 'hq' spec.pskSecretRef: Secret 'hq' not found; the pods keep the last valid configuration"
    );
    assert_eq!(st["tunnels"], 2700, "the status still counts what runs");
    assert_eq!(st["readyReplicas"], 1);
    assert_eq!(warnings(&calls), ["GatewayFleet/edge"]);
}

#[tokio::test]
async fn a_problem_already_reported_posts_no_event_again() {
    let mut world = ready_world(2);
    world.eroutes = vec![static_eroute()];
    let mut f = scaling_fleet();
    f.status = Some(
        serde_json::from_value(json!({"conditions": [{
            "type": "Ready", "status": "False", "reason": "SecretMissing",
            "message": "Eroute 'hq' spec.pskSecretRef: Secret 'hq' not found; the pods keep the last valid configuration",
            "observedGeneration": 2, "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}))
        .unwrap(),
    );
    let calls = run_with(f, world, Pods::new(vec![Some(1), Some(1)], false)).await;
    assert!(warnings(&calls).is_empty(), "{:?}", warnings(&calls));
    assert_eq!(
        status_patch(&calls)["conditions"][0]["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
}

#[tokio::test]
async fn a_new_fleet_with_a_bad_config_gets_an_empty_one_so_its_pods_can_start() {
    let world = World {
        eroutes: vec![static_eroute()],
        secrets: vec![("fleet", "key")],
        services: vec![],
        statefulset: None,
        config_map: false,
        service_class: None,
    };
    let calls = run(fleet(""), world).await;
    let cm = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/configmaps/edge-config"))
        .expect("a ConfigMap for the pods to mount");
    let rendered = cm.body["data"]["concentrator.yaml"].as_str().unwrap();
    assert!(!rendered.contains("hq"), "{rendered}");
    let carried = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/secrets/edge-config-secrets"))
        .expect("the config's Secret exists too");
    assert!(carried.body["data"].as_object().is_none_or(|d| d.is_empty()));
    assert_eq!(sts_replicas(&calls), 2);
    assert_eq!(status_patch(&calls)["conditions"][0]["reason"], "SecretMissing");
}

#[tokio::test]
async fn invalid_spec_is_reported_without_touching_anything_else() {
    let calls = run(fleet("  scaling: {minReplicas: 3, maxReplicas: 2, targetTunnelsPerPod: 10, targetCpuPercent: 50, stabilizationWindow: 1m}\n"), World::default()).await;
    // Only a Warning Event, the StatefulSet read (the status still counts its pods) and the
    // status: nothing listed or applied.
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].body["type"].as_str()),
        ("POST", Some("Warning"))
    );
    assert_eq!(
        (calls[1].method.as_str(), calls[1].path.as_str()),
        ("GET", "/apis/apps/v1/namespaces/vpn/statefulsets/edge")
    );
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["reason"], "Invalid");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.scaling.maxReplicas:"),
        "{c}"
    );
}

#[tokio::test]
async fn invalid_eroute_set_keeps_the_last_good_config() {
    let mut bad = static_eroute();
    bad["spec"]["pskSecretRef"] = Value::Null; // a static eroute without a secret
    let mut world = ready_world(2);
    world.eroutes = vec![bad];
    let calls = run(fleet(""), world).await;
    let applied = patched(&calls);
    assert!(
        !applied.iter().any(|p| p.ends_with("/configmaps/edge-config")),
        "{applied:?}"
    );
    assert!(
        applied.iter().any(|p| p.ends_with("/statefulsets/edge")),
        "the rest of the fleet is still applied: {applied:?}"
    );
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["reason"], "InvalidConfig");
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("spec.pskSecretRef")
            && message.ends_with("the pods keep the last valid configuration"),
        "{c}"
    );
    assert_eq!(
        warnings(&calls),
        ["GatewayFleet/edge", "Eroute/hq"],
        "the Event names the object at fault too"
    );
}

fn sts_replicas(calls: &[Call]) -> i64 {
    let c = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/statefulsets/edge"))
        .expect("the StatefulSet is applied");
    c.body["spec"]["replicas"].as_i64().unwrap()
}

/// The pods' admin API is reachable (mutual TLS) only with this.
const ADMIN_TLS: &str = "  adminTlsSecretName: admin-tls\n";

fn scaling_fleet() -> GatewayFleet {
    fleet(&format!(
        "  scaling: {{minReplicas: 2, maxReplicas: 6, targetTunnelsPerPod: 100, targetCpuPercent: 70, stabilizationWindow: 5m}}\n{ADMIN_TLS}",
    ))
}

fn ready_world(replicas: u32) -> World {
    World {
        eroutes: vec![],
        secrets: vec![
            ("fleet", "key"),
            ("admin-tls", "tls.crt"),
            ("admin-tls", "tls.key"),
            ("admin-tls", "ca.crt"),
            // Applied by an earlier reconcile, with the ConfigMap.
            ("edge-config-secrets", "x"),
        ],
        services: vec![],
        statefulset: Some(replicas),
        config_map: true,
        service_class: None,
    }
}

#[tokio::test]
async fn without_admin_tls_no_pod_is_asked_and_the_fleet_stays() {
    let pods = Pods::new(vec![Some(900), Some(900)], false);
    let f = fleet(
        "  scaling: {minReplicas: 2, maxReplicas: 6, targetTunnelsPerPod: 100, targetCpuPercent: 70, stabilizationWindow: 5m}\n",
    );
    let calls = run_with(f, ready_world(2), pods.clone()).await;
    assert_eq!(sts_replicas(&calls), 2, "no reports: no load-based scaling");
    assert!(pods.drain_calls.lock().unwrap().is_empty());
    let sts = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/statefulsets/edge"))
        .unwrap();
    let args = sts.body["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("127.0.0.1:50051"), "admin API on loopback: {args}");
    let said = status_patch(&calls)["conditions"][0]["message"].to_string();
    assert!(
        said.contains("no adminTlsSecretName"),
        "the status says why: {said}"
    );
    let (_, result) = try_run(deleted(fleet("")), ready_world(2), pods.clone()).await;
    assert!(result.is_ok(), "deletion does not wait for pods it cannot ask");
    assert!(pods.drain_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn admin_tls_secret_is_required_with_every_key() {
    let mut world = ready_world(2);
    world
        .secrets
        .retain(|(n, k)| !(*n == "admin-tls" && *k == "ca.crt"));
    let calls = run(scaling_fleet(), world).await;
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["reason"], "SecretMissing");
    assert_eq!(
        c["message"],
        "Secret 'admin-tls' has no key 'ca.crt' (named by the GatewayFleet)"
    );
}

#[tokio::test]
async fn a_fleet_without_network_policy_has_its_old_one_removed() {
    let calls = run(fleet("  networkPolicy: {enabled: false}\n"), ready_world(2)).await;
    assert!(
        !patched(&calls).iter().any(|p| p.contains("networkpolicies")),
        "not applied"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.method == Method::GET && c.path.ends_with("/networkpolicies/edge")),
        "looked up to remove it"
    );
}

#[tokio::test]
async fn scales_out_on_reported_tunnels() {
    let pods = Pods::new(vec![Some(250), Some(240)], true);
    let calls = run_with(scaling_fleet(), ready_world(2), pods.clone()).await;
    assert_eq!(sts_replicas(&calls), 5, "490 tunnels at 100 per pod");
    assert_eq!(status_patch(&calls)["tunnels"], 490);
    assert!(pods.drain_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn scale_in_waits_until_the_leaving_pod_is_drained() {
    let draining = Pods::new(vec![Some(10), Some(10), Some(4)], false);
    let calls = run_with(scaling_fleet(), ready_world(3), draining.clone()).await;
    assert_eq!(
        sts_replicas(&calls),
        3,
        "no pod removed while it still holds tunnels"
    );
    assert_eq!(
        *draining.drain_calls.lock().unwrap(),
        [2],
        "the highest ordinal is drained"
    );

    let drained = Pods::new(vec![Some(10), Some(10), Some(0)], true);
    let calls = run_with(scaling_fleet(), ready_world(3), drained.clone()).await;
    assert_eq!(sts_replicas(&calls), 2);
    assert_eq!(*drained.drain_calls.lock().unwrap(), [2]);
}

#[tokio::test]
async fn a_silent_pod_blocks_scale_in() {
    let pods = Pods::new(vec![Some(0), None, Some(0)], true);
    let calls = run_with(scaling_fleet(), ready_world(3), pods.clone()).await;
    assert_eq!(sts_replicas(&calls), 3);
    assert!(pods.drain_calls.lock().unwrap().is_empty());
}

/// `f`, deleted just now.
fn deleted(f: GatewayFleet) -> GatewayFleet {
    deleted_at(f, std::time::SystemTime::now())
}

fn deleted_at(f: GatewayFleet, at: std::time::SystemTime) -> GatewayFleet {
    let mut f = f;
    f.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        at.try_into().unwrap(),
    ));
    f
}

fn finalizer_removed(calls: &[Call]) -> bool {
    calls.iter().any(|c| {
        c.method == Method::PATCH
            && c.path.ends_with("/gatewayfleets/edge")
            && c.body.to_string().contains("/metadata/finalizers")
    })
}

#[tokio::test]
async fn new_fleet_gets_the_drain_finalizer_first() {
    let mut f = fleet("");
    f.metadata.finalizers = None;
    let calls = run(f, World::default()).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].method, Method::PATCH);
    assert!(
        calls[0].body.to_string().contains("vpn.concentrator.io/drain"),
        "{:?}",
        calls[0].body
    );
}

#[tokio::test]
async fn deletion_waits_for_tunnels_to_leave() {
    let pods = Pods::new(vec![Some(3), Some(0)], false);
    let (calls, result) = try_run(deleted(fleet(ADMIN_TLS)), ready_world(2), pods.clone()).await;
    assert!(result.is_err(), "the finalizer stays while tunnels remain");
    assert!(!finalizer_removed(&calls));
    assert_eq!(*pods.drain_calls.lock().unwrap(), [0, 1], "every pod is drained");
    assert!(
        calls
            .iter()
            .any(|c| c.method == Method::POST && c.body["reason"] == "Draining"),
        "an Event says why"
    );
}

#[tokio::test]
async fn deletion_waits_for_tunnels_no_longer_than_its_bound() {
    let pods = Pods::new(vec![Some(3), Some(0)], false);
    let long_ago = std::time::SystemTime::now()
        - concentrator_operator::fleet::DELETION_DRAIN_BOUND
        - Duration::from_secs(1);
    let (calls, result) = try_run(
        deleted_at(fleet(ADMIN_TLS), long_ago),
        ready_world(2),
        pods.clone(),
    )
    .await;
    result.unwrap();
    assert!(finalizer_removed(&calls), "the deletion goes on: {calls:?}");
    assert!(
        calls.iter().any(|c| c.method == Method::POST
            && c.body["reason"] == "Drained"
            && c.body["type"] == "Warning"),
        "a Warning Event says tunnels were left: {calls:?}"
    );
}

#[tokio::test]
async fn deletion_completes_once_drained() {
    let pods = Pods::new(vec![Some(0), Some(0)], true);
    let calls = run_with(deleted(fleet(ADMIN_TLS)), ready_world(2), pods.clone()).await;
    assert!(finalizer_removed(&calls), "{calls:?}");
    assert!(
        patched(&calls).iter().all(|p| p.ends_with("/gatewayfleets/edge")),
        "nothing re-applied while deleting"
    );
}

#[tokio::test]
async fn scaling_is_recorded_as_an_event() {
    let pods = Pods::new(vec![Some(250), Some(240)], true);
    let calls = run_with(scaling_fleet(), ready_world(2), pods).await;
    let ev = calls
        .iter()
        .find(|c| c.method == Method::POST && c.path.ends_with("/events"))
        .expect("an Event");
    assert_eq!(ev.body["reason"], "Scaled");
    assert_eq!(ev.body["note"], "2 -> 5 pods for 490 tunnels");
}

#[tokio::test]
async fn live_counts_from_the_pods_reach_the_eroute_status() {
    let mut world = ready_world(2);
    world.eroutes = vec![static_eroute()];
    world.secrets.push(("hq", "psk"));
    let calls = run_with(scaling_fleet(), world, Pods::new(vec![Some(3), Some(4)], true)).await;
    let c = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/eroutes/hq/status"))
        .expect("the Eroute status gets the counts");
    assert_eq!(c.body["status"]["dynamicEroutes"], 7);
    assert!(
        c.body["status"].get("conditions").is_none(),
        "counts never overwrite the validity condition"
    );
}

#[tokio::test]
async fn update_of_an_eroute_reaches_the_pods_without_rolling_them() {
    let body_of = |calls: &[Call], suffix: &str| {
        calls
            .iter()
            .find(|c| c.method == Method::PATCH && c.path.ends_with(suffix))
            .map(|c| c.body.clone())
            .unwrap()
    };
    let mut world = ready_world(2);
    world.eroutes = vec![static_eroute()];
    world.secrets.push(("hq", "psk"));
    let before = run_with(fleet(""), world.clone(), Pods::new(vec![Some(0), Some(0)], true)).await;
    world.eroutes[0]["spec"]["peerId"] = json!("hq-renamed.example.com");
    let after = run_with(fleet(""), world, Pods::new(vec![Some(0), Some(0)], true)).await;

    let cm = body_of(&after, "/configmaps/edge-config");
    assert!(
        cm["data"]["concentrator.yaml"]
            .as_str()
            .unwrap()
            .contains("hq-renamed.example.com")
    );
    // The gateways reload the ConfigMap kubelet updates: the pods stay, with their tunnels.
    let template = |calls: &[Call]| body_of(calls, "/statefulsets/edge")["spec"]["template"].clone();
    assert_eq!(
        template(&before),
        template(&after),
        "a config change leaves the pod template alone"
    );
    assert_eq!(sts_replicas(&after), 2, "an update keeps the replica count");
}

/// A real gateway (admin API only) over mutual TLS, with its own test CA.
struct TlsGateway {
    running: concentrator_gateway::Running,
    ca: concentrator_e2e::pki::TestCa,
    dir: tempfile::TempDir,
    _data: tempfile::TempDir,
}

async fn tls_gateway() -> TlsGateway {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let ca = concentrator_e2e::pki::TestCa::new("fleet admin CA").unwrap();
    let server = ca
        .issue(
            &dir.path().join("gateway"),
            &[concentrator_proto::tls::DEFAULT_SERVER_NAME],
        )
        .unwrap();
    let config = format!("{}/../examples", env!("CARGO_MANIFEST_DIR"));
    let opts = concentrator_gateway::Options::try_parse_from([
        "concentrator-gateway",
        "--config-dir",
        &config,
        "--data-dir",
        data.path().to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--admin-tls-dir",
        server.to_str().unwrap(),
        "--no-tunnels",
    ])
    .unwrap();
    let cfg = concentrator_gateway::config::load_dir(std::path::Path::new(&config)).unwrap();
    let running = concentrator_gateway::start(&opts, cfg).await.unwrap();
    TlsGateway {
        running,
        ca,
        dir,
        _data: data,
    }
}

/// The operator's admin client with the certificate in `dir`, reaching every pod at `addr`.
fn operator_admin(dir: &std::path::Path, addr: std::net::SocketAddr) -> Arc<GrpcFleetAdmin> {
    let tls = ClientTls {
        files: AdminTls::load(dir).unwrap(),
        server_name: concentrator_proto::tls::DEFAULT_SERVER_NAME.into(),
    };
    Arc::new(GrpcFleetAdmin::new(Some(tls)).locating(move |_, _, _| addr.to_string()))
}

async fn try_run_admin(
    fleet: GatewayFleet,
    world: World,
    admin: Arc<GrpcFleetAdmin>,
) -> (
    Vec<Call>,
    Result<kube::runtime::controller::Action, concentrator_operator::controller::Error>,
) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = tokio::spawn(fake_api(handle, world));
    let ctx = Arc::new(Context::new(Client::new(svc, "vpn"), admin));
    let result = reconcile(Arc::new(fleet), ctx).await;
    (api.await.unwrap(), result)
}

#[tokio::test]
async fn the_operator_reaches_a_real_gateway_with_its_certificate() {
    let gw = tls_gateway().await;
    let client = gw
        .ca
        .issue(&gw.dir.path().join("operator"), &["concentrator-operator"])
        .unwrap();
    let admin = operator_admin(&client, gw.running.admin_addr);
    let mut world = ready_world(1);
    world.eroutes = vec![static_eroute()];
    world.secrets.push(("hq", "psk"));
    let (calls, result) = try_run_admin(scaling_fleet(), world, admin.clone()).await;
    result.unwrap();
    // Counts reach the Eroute status only from pods that reported.
    assert!(
        calls
            .iter()
            .any(|c| c.method == Method::PATCH && c.path.ends_with("/eroutes/hq/status")),
        "the pod's load report was read over mutual TLS"
    );
    // Deleting the fleet drains the pod through its admin API.
    let (_, result) = try_run_admin(deleted(scaling_fleet()), ready_world(1), admin).await;
    result.unwrap();
    assert_ne!(
        gw.running.gateway.metrics.drain_state.get(),
        0,
        "the pod was asked to drain"
    );
    gw.running.shutdown().await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_reaches_no_gateway() {
    let gw = tls_gateway().await;
    let other = concentrator_e2e::pki::TestCa::new("another CA").unwrap();
    let client = other
        .issue_trusting(&gw.dir.path().join("stranger"), &["intruder"], &gw.ca.pem())
        .unwrap();
    let admin = operator_admin(&client, gw.running.admin_addr);
    let mut world = ready_world(1);
    world.eroutes = vec![static_eroute()];
    world.secrets.push(("hq", "psk"));
    let (calls, result) = try_run_admin(scaling_fleet(), world, admin.clone()).await;
    result.unwrap();
    assert!(
        !calls
            .iter()
            .any(|c| c.method == Method::PATCH && c.path.ends_with("/eroutes/hq/status")),
        "no report from a pod that refused the client"
    );
    let e = admin.report("vpn", "edge", 0).await.unwrap_err().to_string();
    assert!(e.contains("edge-0"), "{e}");
    let _ = admin.drain("vpn", "edge", 0).await;
    assert_eq!(gw.running.gateway.metrics.drain_state.get(), 0, "not drained");
    gw.running.shutdown().await;
}

#[tokio::test]
async fn a_renewed_client_certificate_is_used_without_a_restart() {
    let gw = tls_gateway().await;
    let other = concentrator_e2e::pki::TestCa::new("another CA").unwrap();
    let client = other
        .issue_trusting(&gw.dir.path().join("operator"), &["operator"], &gw.ca.pem())
        .unwrap();
    let admin = operator_admin(&client, gw.running.admin_addr);
    assert!(
        admin.report("vpn", "edge", 0).await.is_err(),
        "another CA's certificate"
    );
    // The Secret is updated with a certificate of the right CA (kubelet swaps the files).
    let renewed = gw
        .ca
        .issue(&gw.dir.path().join("renewed"), &["operator"])
        .unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::rename(renewed.join(f), client.join(f)).unwrap();
    }
    let report = admin.report("vpn", "edge", 0).await;
    assert!(report.is_ok(), "{report:?}");
    gw.running.shutdown().await;
}

#[tokio::test]
async fn a_held_back_config_still_recreates_a_missing_config_secret() {
    let mut world = ready_world(2);
    world.eroutes = vec![static_eroute()]; // its PSK Secret 'hq' does not exist
    world.secrets.retain(|(n, _)| *n != "edge-config-secrets");
    let calls = run(fleet(""), world).await;
    let applied = patched(&calls);
    assert!(
        !applied.iter().any(|p| p.ends_with("/configmaps/edge-config")),
        "the last valid config stays: {applied:?}"
    );
    let carried = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/secrets/edge-config-secrets"))
        .expect("the pods' projected volume needs the Secret: recreated");
    assert!(carried.body["data"].as_object().is_none_or(|d| d.is_empty()));
}

#[tokio::test]
async fn a_changed_load_balancer_class_is_kept_and_said_without_stopping_the_fleet() {
    let mut world = ready_world(2);
    world.service_class = Some(("edge", "metallb"));
    let calls = run(fleet("  front: {loadBalancerClass: cilium}\n"), world).await;
    let front = calls
        .iter()
        .find(|c| c.method == Method::PATCH && c.path.ends_with("/services/edge"))
        .expect("the front Service is applied");
    assert_eq!(front.body["spec"]["loadBalancerClass"], "metallb");
    assert!(
        patched(&calls).iter().any(|p| p.ends_with("/statefulsets/edge")),
        "the rest of the fleet is applied"
    );
    let kept: Vec<_> = calls
        .iter()
        .filter(|c| c.method == Method::POST && c.body["reason"] == "LoadBalancerClassKept")
        .collect();
    assert_eq!(kept.len(), 1, "{calls:?}");
    assert_eq!(status_patch(&calls)["conditions"][0]["status"], "True");
}
