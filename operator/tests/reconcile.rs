//! Eroute and Egroup reconciles against kube's mock API server (tower-test pair): the status
//! patch that goes on the wire for a valid spec, an invalid one, and references (Secrets, the
//! base Eroute) that are missing; the Events that go with a new problem.

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
use serde_json::{Value, json};

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

/// A request the reconcile sent.
#[derive(Debug)]
struct Call {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// What the fake namespace holds: Secrets (name, key) and Eroutes.
#[derive(Default)]
struct World {
    secrets: Vec<(&'static str, &'static str)>,
    eroutes: Vec<Value>,
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// Answers like the API server until the reconcile goes quiet; returns what it was sent.
async fn fake_api(mut handle: Handle, world: World) -> Vec<Call> {
    let mut calls = Vec::new();
    while let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
    {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let last = path.rsplit('/').next().unwrap_or_default().to_owned();
        let (status, reply) = match (&method, path.as_str()) {
            (&Method::GET, p) if p.contains("/secrets/") => {
                let data: serde_json::Map<String, Value> = world
                    .secrets
                    .iter()
                    .filter(|(n, _)| *n == last)
                    .map(|(_, k)| ((*k).to_owned(), json!("eA==")))
                    .collect();
                if world.secrets.iter().any(|(n, _)| *n == last) {
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": last}, "data": data}),
                    )
                } else {
                    (404, not_found())
                }
            }
            (&Method::GET, p) if p.contains("/eroutes/") => {
                match world
                    .eroutes
                    .iter()
                    .find(|e| e["metadata"]["name"] == last.as_str())
                {
                    Some(e) => (200, e.clone()),
                    None => (404, not_found()),
                }
            }
            (&Method::POST, p) if p.ends_with("/events") => (201, body.clone()),
            // The API server echoes the object; an empty spec is enough for the client to decode.
            (&Method::PATCH, p) if p.ends_with("/status") => (
                200,
                json!({
                    "apiVersion": body["apiVersion"], "kind": body["kind"],
                    "metadata": {"name": "x", "namespace": "default"},
                    "spec": {"localSubnet": "", "remoteSubnet": "", "eroute": "", "remoteSubnetPrefix": 0},
                }),
            ),
            (m, p) => panic!("unexpected call {m} {p}"),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        calls.push(Call {
            method,
            path,
            query,
            body,
        });
    }
    calls
}

/// Reconciles `obj` against `world`; the status patch sent (checked to be a forced
/// server-side apply by the operator) and the reasons of the Warning Events posted.
async fn reconcile_in<K: concentrator_operator::controller::Validated>(
    obj: K,
    world: World,
) -> (Value, Vec<String>) {
    let (client, handle) = client();
    let server = tokio::spawn(fake_api(handle, world));
    reconcile(Arc::new(obj), Arc::new(Context::new(client, Arc::new(NoPods))))
        .await
        .unwrap();
    let calls = server.await.unwrap();
    let patches: Vec<&Call> = calls.iter().filter(|c| c.method == Method::PATCH).collect();
    assert_eq!(patches.len(), 1, "one status patch: {calls:?}");
    let patch = patches[0];
    assert!(patch.path.ends_with("/x/status"), "{}", patch.path);
    assert!(
        patch.query.contains("fieldManager=concentrator-operator"),
        "{}",
        patch.query
    );
    assert!(patch.query.contains("force=true"), "{}", patch.query);
    let warnings = calls
        .iter()
        .filter(|c| c.method == Method::POST && c.body["type"] == "Warning")
        .map(|c| c.body["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    (patch.body.clone(), warnings)
}

fn eroute(yaml_spec: &str) -> Eroute {
    serde_yaml::from_str(&format!(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Eroute\nmetadata: {{name: x, namespace: default, generation: 4}}\nspec:\n{yaml_spec}"
    ))
    .unwrap()
}

fn egroup(base: &str) -> Egroup {
    serde_yaml::from_str(&format!(
        "apiVersion: vpn.concentrator.io/v1alpha1\nkind: Egroup\nmetadata: {{name: x, namespace: default}}\nspec: {{eroute: {base}, remoteSubnetPrefix: 24}}\n"
    ))
    .unwrap()
}

/// A dynamic Eroute an Egroup can be built on.
fn branches() -> Value {
    json!({"apiVersion": "vpn.concentrator.io/v1alpha1", "kind": "Eroute",
           "metadata": {"name": "branches", "namespace": "default"},
           "spec": {"localSubnet": "10.0.0.0/16", "remoteSubnet": "10.128.0.0/9", "peerId": "*.sites.example.com"}})
}

fn ready(body: &Value) -> (&str, &str, &str) {
    let c = &body["status"]["conditions"][0];
    assert_eq!(c["type"], "Ready");
    (
        c["status"].as_str().unwrap(),
        c["reason"].as_str().unwrap(),
        c["message"].as_str().unwrap(),
    )
}

#[tokio::test]
async fn invalid_eroute_gets_ready_false_with_the_field() {
    let obj = eroute("  localSubnet: 10.0.0.0/33\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n");
    let (body, warnings) = reconcile_in(obj, World::default()).await;
    let (status, reason, message) = ready(&body);
    assert_eq!((status, reason), ("False", "Invalid"));
    assert!(message.starts_with("spec.localSubnet:"), "{message}");
    assert_eq!(body["status"]["observedGeneration"], 4);
    assert_eq!(warnings, ["Invalid"], "the new problem is an Event too");
}

#[tokio::test]
async fn an_eroute_whose_psk_secret_is_missing_is_not_ready() {
    let spec = "  localSubnet: 10.0.0.0/16\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n  pskSecretRef: {name: psk, key: hq}\n";
    let (body, warnings) = reconcile_in(eroute(spec), World::default()).await;
    assert_eq!(
        ready(&body),
        (
            "False",
            "SecretMissing",
            "spec.pskSecretRef: Secret 'psk' not found"
        )
    );
    assert_eq!(warnings, ["SecretMissing"]);
    let world = World {
        secrets: vec![("psk", "other")],
        ..World::default()
    };
    let (body, _) = reconcile_in(eroute(spec), world).await;
    assert_eq!(
        ready(&body),
        (
            "False",
            "SecretMissing",
            "spec.pskSecretRef: Secret 'psk' has no key 'hq'"
        )
    );
    let world = World {
        secrets: vec![("psk", "hq")],
        ..World::default()
    };
    let (body, warnings) = reconcile_in(eroute(spec), world).await;
    assert_eq!(ready(&body).0, "True");
    assert!(warnings.is_empty());
}

#[tokio::test]
async fn valid_egroup_gets_ready_true() {
    let world = World {
        eroutes: vec![branches()],
        ..World::default()
    };
    let (body, warnings) = reconcile_in(egroup("branches"), world).await;
    assert_eq!(body["kind"], "Egroup");
    assert_eq!(ready(&body).0, "True");
    assert!(warnings.is_empty());
}

#[tokio::test]
async fn an_egroup_is_ready_only_on_an_eroute_that_exists_and_fits() {
    let (body, _) = reconcile_in(egroup("branches"), World::default()).await;
    assert_eq!(
        ready(&body),
        (
            "False",
            "ErouteMissing",
            "spec.eroute: Eroute 'branches' does not exist"
        )
    );
    let mut bad = branches();
    bad["spec"]["localSubnet"] = json!("10.0.0.0/33");
    let (body, _) = reconcile_in(
        egroup("branches"),
        World {
            eroutes: vec![bad],
            ..World::default()
        },
    )
    .await;
    let (status, reason, message) = ready(&body);
    assert_eq!((status, reason), ("False", "ErouteInvalid"));
    assert!(
        message.starts_with("spec.eroute: Eroute 'branches' is invalid: spec.localSubnet"),
        "{message}"
    );
}

#[tokio::test]
async fn revalidated_eroute_keeps_its_last_transition_time() {
    let mut obj = eroute("  localSubnet: 10.0.0.0/16\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n");
    obj.status = Some(
        serde_json::from_value(json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "Valid", "message": "spec is valid",
            "observedGeneration": 4, "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}))
        .unwrap(),
    );
    let (body, _) = reconcile_in(obj, World::default()).await;
    let cond = &body["status"]["conditions"][0];
    assert_eq!(cond["status"], "True");
    assert_eq!(cond["lastTransitionTime"], "2026-01-01T00:00:00Z", "{cond}");
}

#[tokio::test]
async fn a_problem_already_reported_posts_no_event_again() {
    let mut obj = eroute("  localSubnet: 10.0.0.0/33\n  remoteSubnet: 10.1.0.0/16\n  peerId: a\n");
    let (first, _) = reconcile_in(obj.clone(), World::default()).await;
    obj.status = Some(serde_json::from_value(first["status"].clone()).unwrap());
    let (_, warnings) = reconcile_in(obj, World::default()).await;
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Events with one reason but different notes are different Events (as client-go keys them),
/// and the same note again joins its own series: kube's Recorder alone folds by reason and
/// keeps the first note, so a later scale-in showed as the earlier scale-out, counted twice.
#[tokio::test]
async fn events_with_new_notes_are_new_events() {
    let (client, mut handle) = client();
    let server = tokio::spawn(async move {
        let mut calls = Vec::new();
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
        {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let mut reply = body.clone();
            if method == Method::POST {
                reply["metadata"]["name"] = json!(format!("ev{}", calls.len()));
            }
            send.send_response(
                Response::builder()
                    .status(if method == Method::POST { 201 } else { 200 })
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
            calls.push((method, path, body));
        }
        calls
    });
    let ctx = Context::new(client, Arc::new(NoPods));
    let obj = egroup("branches");
    for note in ["2 -> 3 pods", "3 -> 2 pods", "2 -> 3 pods"] {
        ctx.event(&obj, false, "Scaled", note.to_owned()).await;
    }
    let calls = server.await.unwrap();
    let created: Vec<&str> = calls
        .iter()
        .filter(|(m, p, _)| *m == Method::POST && p.ends_with("/events"))
        .map(|(_, _, b)| b["note"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(created, ["2 -> 3 pods", "3 -> 2 pods"], "{calls:?}");
    // The third joins the first one's series.
    let patched = calls
        .iter()
        .filter(|(m, p, _)| *m == Method::PATCH && p.contains("/events/"))
        .count();
    assert_eq!(patched, 1, "{calls:?}");
    assert_eq!(ctx.recorders.len(), 2);
}
