//! Leader election hand-over against kube's mock API server.

use std::time::Duration;

use concentrator_operator::lease::LeaseLock;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn reply(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn lease(holder: &str, renew: &str, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "concentrator-operator", "namespace": "ops", "resourceVersion": "41"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renew,
                    "acquireTime": renew, "leaseTransitions": transitions}})
}

/// Serves GET with `current`, answers PUT with `put_status`, returns the PUT body if any.
async fn api(mut handle: Handle, current: Value, put_status: StatusCode) -> Option<Value> {
    let mut put = None;
    while let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await
    {
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases/concentrator-operator"
        );
        match *req.method() {
            Method::GET => send.send_response(reply(StatusCode::OK, &current)),
            Method::PUT => {
                let body: Value =
                    serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
                let resp = if put_status == StatusCode::OK {
                    reply(StatusCode::OK, &body)
                } else {
                    reply(
                        put_status,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                              "reason": "Conflict", "code": put_status.as_u16(), "message": "conflict"}),
                    )
                };
                send.send_response(resp);
                put = Some(body);
            }
            ref m => panic!("unexpected {m}"),
        }
    }
    put
}

async fn attempt(current: Value, put_status: StatusCode, now: &str) -> (bool, Option<Value>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(api(handle, current, put_status));
    let lock = LeaseLock::new(
        Api::namespaced(Client::new(svc, "ops"), "ops"),
        "concentrator-operator",
        "me",
        Duration::from_secs(15),
    );
    let led = lock
        .try_acquire_or_renew(now.parse::<Timestamp>().unwrap())
        .await
        .unwrap();
    (led, server.await.unwrap())
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_optimistic_concurrency() {
    let (led, put) = attempt(
        lease("old", "2026-11-22T10:00:00Z", 3),
        StatusCode::OK,
        "2026-11-22T10:00:16Z",
    )
    .await;
    assert!(led);
    let put = put.expect("a PUT");
    assert_eq!(put["spec"]["holderIdentity"], "me");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert_eq!(
        put["metadata"]["resourceVersion"], "41",
        "the write is conditional on what was read"
    );
}

#[tokio::test]
async fn leaves_a_live_lease_alone() {
    let (led, put) = attempt(
        lease("old", "2026-11-22T10:00:00Z", 3),
        StatusCode::OK,
        "2026-11-22T10:00:05Z",
    )
    .await;
    assert!(!led);
    assert!(put.is_none(), "no write while another replica leads");
}

#[tokio::test]
async fn losing_the_race_is_not_leading() {
    let (led, put) = attempt(
        lease("old", "2026-11-22T10:00:00Z", 3),
        StatusCode::CONFLICT,
        "2026-11-22T10:01:00Z",
    )
    .await;
    assert!(put.is_some());
    assert!(!led, "a 409 means another replica won");
}

#[tokio::test]
async fn renews_its_own_lease_keeping_acquire_time() {
    let (led, put) = attempt(
        lease("me", "2026-11-22T10:00:00Z", 7),
        StatusCode::OK,
        "2026-11-22T10:00:05Z",
    )
    .await;
    assert!(led);
    let put = put.unwrap();
    assert_eq!(put["spec"]["leaseTransitions"], 7);
    assert_eq!(put["spec"]["acquireTime"], "2026-11-22T10:00:00.000000Z");
    assert_eq!(put["spec"]["renewTime"], "2026-11-22T10:00:05.000000Z");
}
