use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::TelemetryError;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

/// A running `/metrics` + `/healthz` + `/readyz` server.
pub struct MetricsServer {
    /// Address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Flip `/readyz` to 200 once the process can do its job.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The flag behind `/readyz`, for whoever else changes it (a drain).
    pub fn readiness(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Stops serving.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Serves the registry on `addr`: `/metrics` (OpenMetrics text), `/healthz` (always 200 while
/// the process runs), `/readyz` (200 after [`MetricsServer::set_ready`]).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> Result<MetricsServer, TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let ready = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Shared {
            registry,
            ready: ready.clone(),
        });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(MetricsServer {
        local_addr,
        ready,
        task,
    })
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_registered_counters_and_readiness() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("ike_sa_init_received", "IKE_SA_INIT requests", c.clone());
        c.inc_by(3);
        let srv = serve_metrics("127.0.0.1:0".parse().unwrap(), Arc::new(reg))
            .await
            .unwrap();
        let body = get(srv.local_addr, "/metrics").await;
        assert!(body.contains("ike_sa_init_received_total 3"), "{body}");
        assert!(get(srv.local_addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        srv.set_ready(true);
        assert!(get(srv.local_addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(srv.local_addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        srv.abort();
    }
}
