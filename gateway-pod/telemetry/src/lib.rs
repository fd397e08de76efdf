//! Telemetry shared by both binaries: `tracing` logs (JSON or pretty), OTLP trace export when
//! the standard `OTEL_EXPORTER_OTLP_*` variables ask for it, and a Prometheus `/metrics`
//! endpoint.

mod logs;
mod metrics;

pub use logs::{LogFormat, TelemetryGuard, init};
pub use metrics::{MetricsServer, serve_metrics};

/// Errors setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(String),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    #[error("cannot listen for /metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}
