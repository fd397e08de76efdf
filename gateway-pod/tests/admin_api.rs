//! The gateway started in-process on the example config: the admin API, gRPC health and
//! /metrics answer with what was loaded.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use concentrator_gateway::tunnels::TunnelRow;
use concentrator_gateway::{Options, config, start};
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use concentrator_proto::admin::{
    DrainRequest, GetCountersRequest, GetTunnelRequest, ListEroutesRequest, ListTunnelsRequest, drain_status,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A standalone gateway on the example config, its data in `data`, its admin API and metrics
/// on loopback ports of their own, no TUN device.
async fn start_on_examples(data: &std::path::Path) -> concentrator_gateway::Running {
    let opts = Options::try_parse_from([
        "concentrator-gateway",
        "--config-dir",
        examples().to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--no-tunnels",
    ])
    .unwrap();
    let cfg = config::load_dir(opts.config_dir.as_deref().unwrap()).unwrap();
    start(&opts, cfg).await.unwrap()
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
    let running = start_on_examples(data.path()).await;
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
    running.gateway.tunnels.upsert(
        0x71,
        TunnelRow {
            base_eroute: Some("branches".into()),
            egroup: Some("branches".into()),
            peer_id: "a.sites.example.com".into(),
            peer_address: None,
            local_subnet: None,
            established_at: None,
            children: Box::new([]),
        },
    );
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
    let found = client
        .get_tunnel(GetTunnelRequest {
            id: "0000000000000071".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (found.remote_peer_id.as_str(), found.dynamic),
        ("a.sites.example.com", true)
    );

    // Draining with a tunnel left reports it; once it is gone the pod is drained.
    let d = client.drain(DrainRequest::default()).await.unwrap().into_inner();
    assert_eq!(
        (d.state(), d.remaining_tunnels),
        (drain_status::State::Draining, 1)
    );
    assert!(running.gateway.is_draining());
    running.gateway.tunnels.remove(0x71);
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

#[tokio::test]
async fn sites_are_imported_through_the_admin_api_and_only_there() {
    use concentrator_gateway::sites::{default_table, parse};
    use concentrator_proto::admin::{GetShardsRequest, ImportSitesRequest};
    use concentrator_proto::import::{CHUNK_BYTES, MAX_CSV_BYTES, requests};

    let data = tempfile::tempdir().unwrap();
    let running = start_on_examples(data.path()).await;
    let mut client = GatewayAdminClient::connect(format!("http://{}", running.admin_addr))
        .await
        .unwrap();
    let send =
        |file: &str, csv: &str, prefix| tokio_stream::iter(requests(file, csv.as_bytes(), prefix).unwrap());
    let lookup = |peer: &'static str| {
        let store = running.site_store.clone();
        async move {
            store
                .site_by_peer_id(&default_table(), peer, 24, Duration::from_secs(1))
                .await
        }
    };

    let good = "peer_id,psk,remote_subnet,peer_address\na.sites,k1,10.128.1.0/24,192.0.2.1\nb.sites,k2,10.128.2.0/24,\n";
    let r = client
        .import_sites(send("sites.csv", good, Some(24)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.imported, r.embedded), (2, true));
    let a = lookup("a.sites").await.unwrap();
    assert_eq!(
        (a.psk.expose(), a.peer_address.as_deref()),
        (&b"k1"[..], Some("192.0.2.1"))
    );

    // A bad row: refused with the message the local command gives, and nothing written.
    let bad = "peer_id,psk,remote_subnet\nc.sites,hunter2,10.128.3.0/24\nd.sites,k,10.128.4.0/25\n";
    let e = client
        .import_sites(send("bad.csv", bad, Some(24)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let local = parse(bad.as_bytes(), "bad.csv", Some(24))
        .unwrap_err()
        .to_string();
    assert_eq!(e.message(), local);
    assert!(
        e.message().starts_with("line 3: ") && e.message().contains("column remote_subnet"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains("hunter2"));
    assert!(lookup("c.sites").await.is_err(), "all or nothing");
    assert_eq!(running.site_store.count_sites().await.unwrap(), 2);

    // More than 64 MiB: stopped at the piece that crosses the limit.
    let pieces = (0..=MAX_CSV_BYTES / CHUNK_BYTES).map(|_| ImportSitesRequest {
        csv: vec![b'#'; CHUNK_BYTES],
        file: "huge.csv".into(),
        prefix: None,
    });
    let e = client.import_sites(tokio_stream::iter(pieces)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("huge.csv: more than 64 MiB"),
        "{}",
        e.message()
    );

    // One import at a time: a second one while the first is still being sent is turned away
    // (nothing of it written), and the first goes on.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = {
        let mut c = client.clone();
        tokio::spawn(async move {
            c.import_sites(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    let pieces = requests(
        "slow.csv",
        b"peer_id,psk,remote_subnet\nf.sites,k,10.128.6.0/24\n",
        None,
    )
    .unwrap();
    tx.send(pieces[0].clone()).await.unwrap();
    let imports = |c: &mut GatewayAdminClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.get_counters(GetCountersRequest {})
                .await
                .unwrap()
                .into_inner()
                .values["admin_requests{method=\"ImportSites\"}"]
        }
    };
    while imports(&mut client).await < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let busy = client
        .import_sites(send(
            "other.csv",
            "peer_id,psk,remote_subnet\ng.sites,k,10.128.7.0/24\n",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), tonic::Code::Aborted, "{busy:?}");
    drop(tx);
    assert_eq!(first.await.unwrap().unwrap().into_inner().imported, 1);
    assert!(lookup("g.sites").await.is_err());

    // Counted like the other admin writes; the sites gauge follows the store.
    let counters = client
        .get_counters(GetCountersRequest {})
        .await
        .unwrap()
        .into_inner()
        .values;
    assert_eq!(counters["admin_requests{method=\"ImportSites\"}"], 5);
    assert_eq!(counters["sites"], 3);

    // Standalone: no shard map.
    let shards = client.get_shards(GetShardsRequest {}).await.unwrap().into_inner();
    assert!(!shards.fleet && shards.members.is_empty());

    // The metrics port serves no admin call (it needs no client certificate).
    let on_metrics = async {
        let mut c = GatewayAdminClient::connect(format!("http://{}", running.metrics_addr)).await?;
        c.import_sites(send(
            "sites.csv",
            "peer_id,psk,remote_subnet\ne.sites,k,10.128.5.0/24\n",
            None,
        ))
        .await
        .map_err(anyhow::Error::from)
        .map(drop)
    };
    assert!(on_metrics.await.is_err());
    let post = {
        let mut s = tokio::net::TcpStream::connect(running.metrics_addr)
            .await
            .unwrap();
        s.write_all(
            b"POST /concentrator.admin.v1.GatewayAdmin/ImportSites HTTP/1.1\r\nHost: t\r\n\
              Content-Type: application/grpc\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(post.starts_with("HTTP/1.1 404"), "{post}");
    assert!(lookup("e.sites").await.is_err());

    running.shutdown().await;
}
