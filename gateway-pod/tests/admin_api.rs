//! The gateway started in-process on the example config: the admin API, gRPC health and
//! /metrics answer with what was loaded.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use concentrator_gateway::{Options, config, start};
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use concentrator_proto::admin::{
    DrainRequest, GetCountersRequest, GetTunnelRequest, ListEroutesRequest, ListTunnelsRequest, Tunnel,
    drain_status,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn admin_api_serves_the_loaded_config() {
    let data = tempfile::tempdir().unwrap();
    let opts = Options::try_parse_from([
        "concentrator-gateway",
        "--config-dir",
        examples().to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-tunnels",
    ])
    .unwrap();
    let cfg = config::load_dir(opts.config_dir.as_deref().unwrap()).unwrap();
    let running = start(&opts, cfg).await.unwrap();
    assert!(
        data.path().join("sites.db").exists(),
        "embedded site store created"
    );

    let url = format!("http://{}", running.admin_addr);
    let mut client = tokio::time::timeout(Duration::from_secs(5), GatewayAdminClient::connect(url.clone()))
        .await
        .expect("admin API answers within 5s")
        .unwrap();

    let eroutes = client
        .list_eroutes(ListEroutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .eroutes;
    let names: Vec<_> = eroutes.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["branches", "hq-backup"]);
    assert_eq!(eroutes[0].egroup, "branches");
    assert_eq!(eroutes[0].max_dynamic_eroutes, 10_000);
    assert_eq!(
        eroutes[0].ike_proposals,
        ["aes128gcm16-prfsha256-x25519", "aes256-sha256-prfsha256-modp2048"]
    );
    assert_eq!(
        eroutes[0].esp_proposals,
        ["aes128gcm16-noesn", "aes256-sha256-noesn"]
    );
    assert_eq!(eroutes[1].egroup, "");
    assert_eq!(eroutes[1].remote_subnet, "172.16.0.0/24");

    // A tunnel the engine registered shows up, filtered by peer-ID pattern.
    running.gateway.tunnels.upsert(Tunnel {
        id: "t1".into(),
        base_eroute: "branches".into(),
        egroup: "branches".into(),
        remote_peer_id: "a.sites.example.com".into(),
        dynamic: true,
        ..Default::default()
    });
    let list = |p: &str| ListTunnelsRequest {
        peer_id_pattern: p.into(),
        ..Default::default()
    };
    assert_eq!(
        client
            .list_tunnels(list("*.sites.example.com"))
            .await
            .unwrap()
            .into_inner()
            .tunnels
            .len(),
        1
    );
    assert!(
        client
            .list_tunnels(list("*.other"))
            .await
            .unwrap()
            .into_inner()
            .tunnels
            .is_empty()
    );
    let bad = client.list_tunnels(list("a b")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let missing = client
        .get_tunnel(GetTunnelRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Draining with a tunnel left reports it; once it is gone the pod is drained.
    let d = client.drain(DrainRequest::default()).await.unwrap().into_inner();
    assert_eq!(
        (d.state(), d.remaining_tunnels),
        (drain_status::State::Draining, 1)
    );
    assert!(running.gateway.is_draining());
    running.gateway.tunnels.remove("t1");
    let d = client.drain(DrainRequest::default()).await.unwrap().into_inner();
    assert_eq!(d.state(), drain_status::State::Drained);

    let counters = client
        .get_counters(GetCountersRequest {})
        .await
        .unwrap()
        .into_inner()
        .values;
    assert_eq!(counters["eroutes"], 2);
    assert_eq!(counters["egroups"], 1);
    assert_eq!(counters["drain_state"], 2);
    assert_eq!(counters["admin_requests{method=\"Drain\"}"], 2);

    // gRPC health says SERVING for the admin service.
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "concentrator.admin.v1.GatewayAdmin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let metrics = http_get(running.metrics_addr, "/metrics").await;
    assert!(metrics.contains("concentrator_gateway_eroutes 2"), "{metrics}");
    assert!(
        metrics.contains("concentrator_gateway_admin_requests_total{method=\"ListEroutes\"} 1"),
        "{metrics}"
    );
    // Draining, the pod is not ready (the front sends it no new flow) ...
    assert!(
        http_get(running.metrics_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 503")
    );
    // ... until the drain is cancelled: new sites are taken again.
    let d = client
        .drain(DrainRequest {
            cancel: true,
            ..DrainRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state(), drain_status::State::Active);
    assert!(!running.gateway.is_draining());
    assert!(
        http_get(running.metrics_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );

    running.shutdown().await;
}
