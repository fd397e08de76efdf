//! GatewayFleet reconcile against kube's mock API server: a scripted API that answers like
//! the real one and records every call, so each scenario asserts what went on the wire.

use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::GatewayFleet;
use concentrator_operator::controller::Context;
use concentrator_operator::fleet::reconcile;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// What the fake cluster holds.
#[derive(Clone, Default)]
struct World {
    eroutes: Vec<Value>,
    secrets: Vec<(&'static str, &'static str)>,
    services: Vec<&'static str>,
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
            (Method::GET, p) if p.contains("/secrets/") => {
                match world.secrets.iter().find(|(n, _)| *n == last) {
                    Some((n, key)) => reply(
                        StatusCode::OK,
                        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n}, "data": {*key: "eA=="}}),
                    ),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                }
            }
            (Method::PATCH, _) => {
                // Server-side apply echoes the object; add the fields the server owns.
                let mut obj = body.clone();
                obj["metadata"]["name"] = json!(if path.ends_with("/status") {
                    "edge".to_owned()
                } else {
                    last
                });
                obj["metadata"]["namespace"] = json!("vpn");
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
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: GatewayFleet\nmetadata: {{name: edge, namespace: vpn, uid: u1, generation: 2}}\n\
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
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = tokio::spawn(fake_api(handle, world));
    let ctx = Arc::new(Context {
        client: Client::new(svc, "vpn"),
    });
    reconcile(Arc::new(fleet), ctx).await.unwrap();
    api.await.unwrap()
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
    };
    let calls = run(fleet(""), world).await;
    let p = "/api/v1/namespaces/vpn";
    assert_eq!(
        patched(&calls),
        [
            format!("{p}/configmaps/edge-config"),
            format!("{p}/services/edge-pods"),
            format!("{p}/services/edge"),
            "/apis/apps/v1/namespaces/vpn/statefulsets/edge".to_owned(),
            "/apis/policy/v1/namespaces/vpn/poddisruptionbudgets/edge".to_owned(),
        ]
    );
    let sts = &calls
        .iter()
        .find(|c| c.path.ends_with("/statefulsets/edge"))
        .unwrap()
        .body;
    assert_eq!(sts["spec"]["replicas"], 2, "minReplicas");
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

#[tokio::test]
async fn missing_secret_blocks_the_rollout_with_a_reason() {
    let world = World {
        eroutes: vec![static_eroute()],
        secrets: vec![("fleet", "key")],
        services: vec![],
    };
    let calls = run(fleet(""), world).await;
    assert!(
        patched(&calls).is_empty(),
        "nothing applied: {:?}",
        patched(&calls)
    );
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("SecretMissing"))
    );
    assert_eq!(c["message"], "Secret 'hq' not found");
}

#[tokio::test]
async fn invalid_spec_is_reported_without_touching_anything_else() {
    let calls = run(fleet("  scaling: {minReplicas: 3, maxReplicas: 2, targetTunnelsPerPod: 10, targetCpuPercent: 50, stabilizationWindow: 1m}\n"), World::default()).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
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
    let world = World {
        eroutes: vec![bad],
        secrets: vec![("fleet", "key")],
        services: vec![],
    };
    let calls = run(fleet(""), world).await;
    assert!(patched(&calls).is_empty());
    let c = &status_patch(&calls)["conditions"][0];
    assert_eq!(c["reason"], "InvalidConfig");
    assert!(
        c["message"].as_str().unwrap().contains("spec.pskSecretRef"),
        "{c}"
    );
}
