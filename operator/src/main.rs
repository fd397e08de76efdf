use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use concentrator_crds::{Egroup, Eroute, GatewayFleet};
use concentrator_operator::lease::LeaseLock;
use concentrator_telemetry::LogFormat;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client};

/// Kubernetes operator of the concentrator: reconciles GatewayFleets into gateway pods and
/// Services, and reports the validity of Eroutes and Egroups in their status.
#[derive(Debug, Parser)]
#[command(name = "concentrator-operator", version, about, long_about = None)]
struct Options {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "CONCENTRATOR_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Log format; the level comes from RUST_LOG (default info). OTLP trace export is on
    /// when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "CONCENTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// Directory with the operator's client certificate for the gateways' admin API: tls.crt,
    /// tls.key and ca.crt (the CA that signed the gateways' certificates), as a
    /// kubernetes.io/tls Secret with ca.crt holds them. Unset: fleets with adminTlsSecretName
    /// cannot be asked for load reports or drained.
    #[arg(long, env = "CONCENTRATOR_ADMIN_TLS_DIR", value_name = "DIR")]
    admin_tls_dir: Option<std::path::PathBuf>,
    /// DNS name the gateways' admin certificates carry.
    #[arg(
        long,
        env = "CONCENTRATOR_ADMIN_TLS_SERVER_NAME",
        value_name = "NAME",
        default_value = concentrator_proto::tls::DEFAULT_SERVER_NAME
    )]
    admin_tls_server_name: String,
    /// Namespaces to watch, comma-separated (the chart's `watchNamespaces`, installed with
    /// Roles only). Unset or empty: the whole cluster.
    #[arg(long, env = "WATCH_NAMESPACES", value_name = "NS[,NS...]")]
    watch_namespaces: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the objects the operator would apply for a GatewayFleet, without a cluster.
    Render {
        /// YAML file with a GatewayFleet document.
        #[arg(long)]
        fleet: std::path::PathBuf,
        /// Directory whose *.yaml files hold the namespace's Eroutes and Egroups.
        #[arg(long)]
        config_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Options::parse();
    if let Some(Command::Render { fleet, config_dir }) = &opts.command {
        return match concentrator_operator::fleet::render::render(fleet, config_dir) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("concentrator-operator render: {e}");
                ExitCode::from(2)
            }
        };
    }
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
    let admin_tls = match &opts.admin_tls_dir {
        Some(dir) => {
            let files = concentrator_proto::tls::AdminTls::load(dir)?;
            tracing::info!(dir = %dir.display(), "gateway admin API client certificate loaded");
            Some(concentrator_proto::tls::ClientTls {
                files,
                server_name: opts.admin_tls_server_name.clone(),
            })
        }
        None => {
            tracing::warn!(
                "no --admin-tls-dir: fleets with adminTlsSecretName cannot be asked for load or drained"
            );
            None
        }
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let controller_metrics = concentrator_operator::metrics::Metrics::default();
    controller_metrics.register(&mut registry);
    let metrics = concentrator_telemetry::serve_metrics(opts.metrics_listen, Arc::new(registry)).await?;
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}")
    })?;
    let scopes = concentrator_operator::triggers::scopes(opts.watch_namespaces.as_deref());
    // By listing each kind where it will be watched, not by reading the CRDs: a namespaced
    // install has no right to read cluster-scoped objects.
    for scope in &scopes {
        let missing = |e: kube::Error, kind: &str| match e {
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "the {kind} CRD is not installed; install the chart (helm install concentrator \
                 charts/concentrator) or run: kubectl apply -f crds/"
            ),
            e => anyhow::anyhow!(
                "cannot list {kind}s{}: {e}",
                scope
                    .as_deref()
                    .map(|n| format!(" in namespace {n}"))
                    .unwrap_or_default()
            ),
        };
        let one = ListParams::default().limit(1);
        concentrator_operator::triggers::api::<Eroute>(&client, scope)
            .list(&one)
            .await
            .map_err(|e| missing(e, "Eroute"))?;
        concentrator_operator::triggers::api::<Egroup>(&client, scope)
            .list(&one)
            .await
            .map_err(|e| missing(e, "Egroup"))?;
        concentrator_operator::triggers::api::<GatewayFleet>(&client, scope)
            .list(&one)
            .await
            .map_err(|e| missing(e, "GatewayFleet"))?;
    }
    tracing::info!(namespaces = ?scopes, "CRDs present");

    // Only the Lease holder acts; standbys wait (and report ready: they are healthy).
    let identity =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("concentrator-operator-{}", std::process::id()));
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
    let lock = LeaseLock::new(
        Api::namespaced(client.clone(), &namespace),
        LEASE_NAME,
        &identity,
        LEASE_DURATION,
    );
    metrics.set_ready(true);
    tracing::info!(%identity, %namespace, lease = LEASE_NAME, "waiting to lead");
    loop {
        tokio::select! {
            r = lock.try_acquire_or_renew(Timestamp::now()) => match r {
                Ok(true) => break,
                Ok(false) => {}
                // A standby waits through API errors (an API server restarting, a network
                // blip): it has nothing to stop.
                Err(e) => tracing::warn!(error = %e, "cannot read the leader Lease; retrying"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        tokio::time::sleep(lock.renew_interval()).await;
    }
    tracing::info!(%identity, "leading; reconciling GatewayFleets, Eroutes and Egroups");
    let renew = async {
        let mut last_renewed = std::time::Instant::now();
        loop {
            tokio::time::sleep(lock.renew_interval()).await;
            match lock.try_acquire_or_renew(Timestamp::now()).await {
                Ok(true) => last_renewed = std::time::Instant::now(),
                Ok(false) => return anyhow::anyhow!("lost the leader Lease to another replica"),
                // Stop acting before the Lease can expire and a standby take over (client-go:
                // renew deadline 10 s of a 15 s lease).
                Err(e) if last_renewed.elapsed() >= RENEW_DEADLINE => {
                    return anyhow::anyhow!("could not renew the leader Lease for {RENEW_DEADLINE:?}: {e}");
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease failed; retrying"),
            }
        }
    };
    tokio::select! {
        () = concentrator_operator::controller::run(
            client,
            concentrator_operator::fleet::admin::GrpcFleetAdmin::new(admin_tls),
            controller_metrics,
            scopes,
        ) => {
            // Controllers end on SIGTERM/Ctrl-C: hand the Lease over at once.
            if let Err(e) = lock.release().await {
                tracing::warn!(error = %e, "could not release the leader Lease; it will expire");
            }
            Ok(())
        }
        // Acting without the Lease could fight the new leader: stop, and let Kubernetes
        // restart this replica as a standby.
        e = renew => Err(e),
    }
}

const LEASE_NAME: &str = "concentrator-operator";
const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);
/// How long the leader goes on without renewing before it stops: less than the lease, so it
/// has stopped before anyone else may take the Lease.
const RENEW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
