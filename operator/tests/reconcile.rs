//! Reconcile against kube's mock API server (tower-test pair): the status patch that goes on
//! the wire for a valid and an invalid spec.

use std::sync::Arc;
use std::time::Duration;

use concentrator_crds::{Egroup, Eroute};
use concentrator_operator::controller::{Context, reconcile};
use concentrator_operator::fleet::admin::{AdminError, DrainState, FleetAdmin};
use concentrator_operator::fleet::scale::PodReport;
use futures::future::BoxFuture;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;

/// No gateway pod answers (Eroute/Egroup reconciles never ask).
struct NoPods;
impl FleetAdmin for NoPods {
    fn report<'a>(&'a self, _: &'a str, _: &'a str, _: u32) -> BoxFuture<'a, Result<PodReport, AdminError>> {
        unreachable!("Eroute/Egroup reconcile asked a pod for a report")
    }
    fn drain<'a>(&'a self, _: &'a str, _: &'a str, _: u32) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        unreachable!("Eroute/Egroup reconcile drained a pod")
    }
    fn cancel_drain<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: u32,
    ) -> BoxFuture<'a, Result<DrainState, AdminError>> {
        unreachable!("Eroute/Egroup reconcile un-drained a pod")
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Answers exactly one status patch and returns its JSON body.
async fn expect_status_patch(mut handle: Handle, path: &str) -> serde_json::Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("reconcile sends a request within 1s")
        .expect("a request");
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(req.uri().path(), path);
    let query = req.uri().query().unwrap_or_default().to_owned();
    assert!(query.contains("fieldManager=concentrator-operator"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    // The API server echoes the object; an empty spec is enough for the client to decode.
    let reply = serde_json::json!({
        "apiVersion": body["apiVersion"], "kind": body["kind"],
        "metadata": {"name": "x", "namespace": "default"},
        "spec": {"localSubnet": "", "remoteSubnet": "", "eroute": "", "remoteSubnetPrefix": 0},
    });
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

fn eroute(yaml_spec: &str) -> Eroute {
    serde_yaml::from_str(&format!(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata: {{name: x, namespace: default, generation: 4}}\nspec:\n{yaml_spec}"
    ))
    .unwrap()
}

#[tokio::test]
async fn invalid_eroute_gets_ready_false_with_the_field() {
    let (client, handle) = client();
    let obj = eroute("  localSubnet: 10.0.0.0/33\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n");
    let server = tokio::spawn(expect_status_patch(
        handle,
        "/apis/vpn.concentrator.io/v1alpha1/namespaces/default/eroutes/x/status",
    ));
    reconcile(Arc::new(obj), Arc::new(Context::new(client, Arc::new(NoPods))))
        .await
        .unwrap();
    let body = server.await.unwrap();
    let cond = &body["status"]["conditions"][0];
    assert_eq!(cond["type"], "Ready");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Invalid");
    assert!(
        cond["message"].as_str().unwrap().starts_with("spec.localSubnet:"),
        "{cond}"
    );
    assert_eq!(body["status"]["observedGeneration"], 4);
}

#[tokio::test]
async fn valid_egroup_gets_ready_true() {
    let (client, handle) = client();
    let obj: Egroup = serde_yaml::from_str(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata: {name: x, namespace: default}\nspec: {eroute: branches, remoteSubnetPrefix: 24}\n",
    )
    .unwrap();
    let server = tokio::spawn(expect_status_patch(
        handle,
        "/apis/vpn.concentrator.io/v1alpha1/namespaces/default/egroups/x/status",
    ));
    reconcile(Arc::new(obj), Arc::new(Context::new(client, Arc::new(NoPods))))
        .await
        .unwrap();
    let body = server.await.unwrap();
    assert_eq!(body["kind"], "Egroup");
    assert_eq!(body["status"]["conditions"][0]["status"], "True");
}

#[tokio::test]
async fn revalidated_eroute_keeps_its_last_transition_time() {
    let (client, handle) = client();
    let mut obj = eroute("  localSubnet: 10.0.0.0/16\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n");
    obj.status = Some(
        serde_json::from_value(serde_json::json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "Valid", "message": "spec is valid",
            "observedGeneration": 4, "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}))
        .unwrap(),
    );
    let server = tokio::spawn(expect_status_patch(
        handle,
        "/apis/vpn.concentrator.io/v1alpha1/namespaces/default/eroutes/x/status",
    ));
    reconcile(Arc::new(obj), Arc::new(Context::new(client, Arc::new(NoPods))))
        .await
        .unwrap();
    let cond = &server.await.unwrap()["status"]["conditions"][0];
    assert_eq!(cond["status"], "True");
    assert_eq!(cond["lastTransitionTime"], "2026-01-01T00:00:00Z", "{cond}");
}
