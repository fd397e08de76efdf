use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use concentrator_telemetry::LogFormat;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};

/// Kubernetes operator of the concentrator: validates Eroute and Egroup resources and reports
/// the verdict in their status.
#[derive(Debug, Parser)]
#[command(name = "concentrator-operator", version, about, long_about = None)]
struct Options {
    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "CONCENTRATOR_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default info). OTLP trace export is on
    /// when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CONCENTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Options::parse();
    let _telemetry = match concentrator_telemetry::init("concentrator-operator", opts.log_format) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("concentrator-operator: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let registry = prometheus_client::registry::Registry::default();
    let metrics = concentrator_telemetry::serve_metrics(opts.metrics_listen, Arc::new(registry)).await?;
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}")
    })?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in concentrator_crds::all_crds() {
        let name = crd.metadata.name.unwrap_or_default();
        if crds.get_opt(&name).await?.is_none() {
            anyhow::bail!(
                "CRD {name} is not installed; install the chart (helm install concentrator charts/concentrator) \
                 or run: kubectl apply -f crds/"
            );
        }
    }
    metrics.set_ready(true);
    tracing::info!("CRDs present; reconciling Eroutes and Egroups");
    concentrator_operator::controller::run(client).await;
    Ok(())
}
