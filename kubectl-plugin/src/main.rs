//! `kubectl concentrator`: a fleet's tunnels, status, drain and site import, through the
//! gateway pods' admin API (the API server's port-forward, mutual TLS with the fleet's
//! certificate).
//! Installed as `kubectl-concentrator` on the PATH (krew's naming), kubectl runs it for
//! `kubectl concentrator ...`.

mod reach;
mod render;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use concentrator_proto::admin::{
    DrainRequest, GetCountersRequest, GetShardsRequest, ListTunnelsRequest, Shards, drain_status,
};
use concentrator_proto::import::{self, MAX_CSV_BYTES, TooLarge};
use concentrator_proto::tls::ClientTls;
use reach::Reach;
use render::{Format, PodStatus};

#[derive(Debug, Parser)]
#[command(name = "kubectl-concentrator", version, about)]
struct Cli {
    /// The fleet's namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The GatewayFleet (default: the only one in the namespace).
    #[arg(long, global = true)]
    fleet: Option<String>,
    /// Directory with the client certificate (tls.crt, tls.key, ca.crt); default: the
    /// fleet's adminTlsSecretName Secret, read through the API server.
    #[arg(long, global = true, env = "CONCENTRATOR_ADMIN_TLS_DIR")]
    admin_tls_dir: Option<PathBuf>,
    /// The DNS name expected in the pods' certificates.
    #[arg(long, global = true)]
    admin_tls_server_name: Option<String>,
    /// Talk to one admin API at HOST:PORT instead of the cluster's pods (from inside the pod
    /// network); needs --admin-tls-dir.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    direct: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

impl From<Output> for Format {
    fn from(o: Output) -> Self {
        match o {
            Output::Table => Self::Table { wide: false },
            Output::Wide => Self::Table { wide: true },
            Output::Json => Self::Json,
            Output::Yaml => Self::Yaml,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every tunnel of the fleet, with the pod that holds it (one pod asks the others).
    Tunnels {
        /// Only peers whose ID matches (`*` and `?` wildcards).
        #[arg(long)]
        peer_id: Option<String>,
        /// Only tunnels of this base eroute.
        #[arg(long)]
        eroute: Option<String>,
    },
    /// Drain a pod: it refuses new sites, reports not ready and hands its tunnels over to
    /// the other pods.
    Drain {
        /// The pod (not with --direct).
        pod: Option<String>,
        /// Wait until it holds no tunnel.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Stop a pod's drain: it takes new sites again.
    Undrain {
        /// The pod (not with --direct).
        pod: Option<String>,
    },
    /// The fleet, each pod (tunnels, drain state, fleet leader) and each member's shards.
    Status,
    /// Site rows of the fleet's site store.
    #[command(subcommand)]
    Sites(SitesCommand),
}

#[derive(Debug, Subcommand)]
enum SitesCommand {
    /// Bulk-load a CSV (header: peer_id,psk,remote_subnet[,peer_address][,backup_peer_address])
    /// into the site store through a pod's admin API, as `concentrator-gateway sites import`
    /// does where the store is reachable: rows with an existing peer_id are replaced, a bad
    /// row names its line and nothing is written. Where each pod has its own embedded store,
    /// every pod gets the file (exit status 3 if one could not be reached). At most 64 MiB.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Refuse subnets whose prefix length differs (the Egroup's remoteSubnetPrefix).
        #[arg(long, value_name = "LEN")]
        prefix: Option<u8>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubectl-concentrator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let reach = match &cli.direct {
        Some(addr) => Reach::Direct(addr.clone()),
        None => Reach::cluster(cli.namespace.as_deref(), cli.fleet.as_deref()).await?,
    };
    let tls = reach
        .tls(cli.admin_tls_dir.as_deref(), cli.admin_tls_server_name.as_deref())
        .await?;
    let format = Format::from(cli.output);
    let pods = reach.pods().await?;
    let pick = |pod: &Option<String>| -> Result<String> {
        match (pod, &reach) {
            (_, Reach::Direct(addr)) => Ok(addr.clone()),
            (Some(p), _) => Ok(p.clone()),
            (None, _) => anyhow::bail!("name the pod (one of: {})", pods.join(", ")),
        }
    };
    match cli.command {
        Command::Tunnels { peer_id, eroute } => {
            // Any pod lists every member's tunnels; the first that answers does.
            let mut last = None;
            for pod in &pods {
                let r = async {
                    let mut admin = reach.admin(pod, &tls).await?;
                    let r = admin
                        .list_tunnels(ListTunnelsRequest {
                            peer_id_pattern: peer_id.clone().unwrap_or_default(),
                            eroute: eroute.clone().unwrap_or_default(),
                            fleet: true,
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                    anyhow::Ok(r.into_inner())
                }
                .await;
                match r {
                    Ok(list) => {
                        print!("{}", render::tunnels(&list.tunnels, format)?);
                        for u in &list.unreachable {
                            eprintln!("kubectl-concentrator: not listed: {u}");
                        }
                        return Ok(if list.unreachable.is_empty() {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(3)
                        });
                    }
                    Err(e) => last = Some(e.context(format!("pod {pod}"))),
                }
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("the fleet has no pod")))
        }
        Command::Drain { pod, wait, timeout } => {
            let pod = pick(&pod)?;
            let mut admin = reach.admin(&pod, &tls).await?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let s = admin
                    .drain(DrainRequest::default())
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                    .into_inner();
                let draining = s.state() == drain_status::State::Draining;
                if !wait || !draining || s.nowhere_to_go || tokio::time::Instant::now() >= deadline {
                    println!("{pod}: {}", render::drain_state(&s));
                    return Ok(if wait && draining && !s.nowhere_to_go {
                        ExitCode::from(4)
                    } else {
                        ExitCode::SUCCESS
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Command::Undrain { pod } => {
            let pod = pick(&pod)?;
            let mut admin = reach.admin(&pod, &tls).await?;
            let s = admin
                .drain(DrainRequest {
                    cancel: true,
                    exit_when_drained: false,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("{pod}: {}", render::drain_state(&s));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let mut rows = Vec::new();
            for pod in &pods {
                let counters = async {
                    let mut admin = reach.admin(pod, &tls).await?;
                    let c = admin
                        .get_counters(GetCountersRequest {})
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                    anyhow::Ok(c.into_inner().values)
                }
                .await;
                rows.push(PodStatus::from_counters(
                    pod,
                    counters.as_ref().ok(),
                    counters.as_ref().err(),
                ));
            }
            let shards = shards(&reach, &tls, &rows).await;
            print!(
                "{}",
                render::status(
                    reach.fleet(),
                    &rows,
                    shards.as_ref().map(|(pod, s)| (pod.as_str(), s)),
                    format
                )
                .context("rendering the status")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Sites(SitesCommand::Import { file, prefix }) => {
            import_sites(&reach, &tls, &pods, &file, prefix).await
        }
    }
}

/// The shard map as the leader sees it (else the first pod that answers): `None` when no
/// pod answers or the gateways are standalone.
async fn shards(reach: &Reach, tls: &ClientTls, rows: &[PodStatus]) -> Option<(String, Shards)> {
    let mut asked: Vec<&PodStatus> = rows.iter().filter(|p| p.reachable).collect();
    asked.sort_by_key(|p| !p.leader);
    for p in asked {
        let answer = async {
            let mut admin = reach.admin(&p.pod, tls).await?;
            let s = admin
                .get_shards(GetShardsRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            anyhow::Ok(s.into_inner())
        }
        .await;
        match answer {
            Ok(s) if s.fleet => return Some((p.pod.clone(), s)),
            Ok(_) => return None,
            Err(_) => {}
        }
    }
    None
}

/// `sites import`: the file to one pod, and on to every other pod while each keeps its sites
/// in an embedded store of its own.
async fn import_sites(
    reach: &Reach,
    tls: &ClientTls,
    pods: &[String],
    file: &Path,
    prefix: Option<u8>,
) -> Result<ExitCode> {
    let shown = file.display().to_string();
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {shown}"))?
        .len();
    if size > MAX_CSV_BYTES as u64 {
        return Err(TooLarge { file: shown, size }.into());
    }
    let csv = zeroize::Zeroizing::new(std::fs::read(file).with_context(|| format!("cannot read {shown}"))?);
    // Checked once up front (size); made again for each pod from the wiped buffer rather
    // than kept as one more whole copy of the file.
    import::requests(&shown, &csv, prefix)?;
    let mut missed = Vec::new();
    let mut imported = false;
    for pod in pods {
        let answer = async {
            let mut admin = reach.admin(pod, tls).await?;
            let pieces = import::requests(&shown, &csv, prefix)?;
            anyhow::Ok(admin.import_sites(tokio_stream::iter(pieces)).await)
        }
        .await;
        let r = match answer {
            Ok(Ok(r)) => r.into_inner(),
            // The file itself is refused: every pod would say the same.
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                ) =>
            {
                anyhow::bail!("{}", s.message())
            }
            Ok(Err(s)) => {
                missed.push(format!("{pod}: {}", s.message()));
                continue;
            }
            Err(e) => {
                missed.push(format!("{pod}: {e:#}"));
                continue;
            }
        };
        imported = true;
        if !r.embedded {
            println!(
                "{pod}: imported {} site(s) from {shown} into the fleet's site database",
                r.imported
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{pod}: imported {} site(s) from {shown} into its embedded store",
            r.imported
        );
    }
    if !imported {
        anyhow::bail!("not imported: {}", missed.join("; "));
    }
    if let Reach::Direct(addr) = reach {
        eprintln!(
            "kubectl-concentrator: {addr} keeps its sites in an embedded store of its own: in a fleet, each pod needs the file"
        );
    }
    for m in &missed {
        eprintln!("kubectl-concentrator: not imported into {m}");
    }
    Ok(if missed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
