//! With OTEL_EXPORTER_OTLP_ENDPOINT set, the real binary exports its spans over OTLP/gRPC to a
//! collector (here a minimal one served by this test).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concentrator_e2e::ports::free_tcp_port;
use concentrator_proto::admin::ListTunnelsRequest;
use concentrator_proto::admin::gateway_admin_client::GatewayAdminClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::sync::mpsc;

struct Collector(mpsc::UnboundedSender<(String, String)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let _ = self.0.send((service.clone(), span.name));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn spans_reach_the_otlp_collector() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let data = tempfile::tempdir().unwrap();
    let admin = free_tcp_port().unwrap();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let _child = Child(
        Command::new(env!("CARGO_BIN_EXE_concentrator-gateway"))
            .arg("--config-dir")
            .arg(&examples)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--no-tunnels")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_addr}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_SERVICE_NAME", "gw-under-test")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match GatewayAdminClient::connect(format!("http://127.0.0.1:{admin}")).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "admin API never came up: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    client
        .list_tunnels(ListTunnelsRequest {
            peer_id_pattern: "*.sites.example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let got = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some((service, name)) = rx.recv().await {
            if name == "list_tunnels" {
                return service;
            }
        }
        panic!("collector channel closed");
    })
    .await
    .expect("the list_tunnels span is exported within 15s");
    assert!(got.contains("gw-under-test"), "service.name was {got}");
}
