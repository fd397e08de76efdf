//! The gateway pod: reads eroutes and egroups, opens the site store and serves the admin API
//! and metrics. The IKEv2 engine and ESP data plane plug into [`state::Gateway`].

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod cpu;
pub mod dataplane;
pub mod egroups;
pub mod eroute;
pub mod metrics;
pub mod reload;
pub mod secret;
pub mod sitedb;
pub mod sites;
pub mod state;
pub mod tunnels;

use std::net::SocketAddr;
use std::sync::Arc;

use concentrator_proto::admin::gateway_admin_server::GatewayAdminServer;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

pub use cli::Options;

use crate::config::Config;
use crate::sitedb::SiteStore;
use crate::state::Gateway;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    SiteDb(#[from] sitedb::SiteDbError),
    #[error(transparent)]
    Telemetry(#[from] concentrator_telemetry::TelemetryError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Fleet(#[from] cluster::FleetConfigError),
    #[error("egroup site store: {0}")]
    EgroupStore(sitedb::SiteDbError),
    #[error(transparent)]
    AdminTls(#[from] admin::AdminTlsError),
    #[error("cannot listen for the admin API on {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started gateway.
pub struct Running {
    pub gateway: Arc<Gateway>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub site_store: SiteStore,
    shutdown: Option<oneshot::Sender<()>>,
    admin_task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: concentrator_telemetry::MetricsServer,
    cpu_sampler: tokio::task::JoinHandle<()>,
    /// Counts the sites in the store every minute (the `sites` gauge).
    site_counter: tokio::task::JoinHandle<()>,
    /// Reloads the config directory on changes and SIGHUP.
    reloader: Option<tokio::task::JoinHandle<()>>,
    /// IKE and the data plane; `None` with `--no-tunnels`.
    pub control: Option<control::Control>,
    /// Fleet membership; `None` standalone.
    pub fleet: Option<cluster::Fleet>,
}

impl Running {
    /// Stops as on SIGTERM: in a fleet with other members to carry its tunnels on, first
    /// hands them over (a drain, for `drain_timeout` at most); then sends an IKE DELETE for
    /// what is left only if nobody carries it on (standalone, no other member, or no copy of
    /// it elsewhere), and stops.
    pub async fn stop(self, drain_timeout: std::time::Duration) {
        let others = self.fleet.as_ref().is_some_and(|f| {
            let me = f.view.me();
            f.view
                .members()
                .iter()
                .any(|(m, r)| Some(*m) != me && !r.load.draining)
        });
        if others && self.control.is_some() && !self.gateway.tunnels.is_empty() {
            self.gateway.stop_draining_for_good();
            let left = self.gateway.drain_progress();
            if let Some(f) = &self.fleet {
                f.view.request_report();
            }
            tracing::info!(tunnels = left, timeout = ?drain_timeout, "stopping: handing the tunnels over to the other members first");
            let deadline = tokio::time::Instant::now() + drain_timeout;
            while !self.gateway.is_drained() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let left = self.gateway.drain_progress();
            if left > 0 {
                tracing::warn!(
                    tunnels = left,
                    "stopping with tunnels not handed over: their copies, if any, are taken over"
                );
            }
        }
        let copied = self.fleet.as_ref().is_some_and(|f| f.replicator.copies() > 0);
        let delete = !(others && copied);
        self.shutdown_with(delete).await;
    }

    /// Stops serving and waits for in-flight admin calls to finish (no IKE DELETE: the
    /// tunnels end with the process).
    pub async fn shutdown(self) {
        self.shutdown_with(false).await;
    }

    async fn shutdown_with(mut self, delete: bool) {
        self.metrics.set_ready(false);
        if let Some(reloader) = self.reloader.take() {
            reloader.abort();
        }
        if let Some(control) = self.control.take() {
            control.shutdown(delete).await;
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.shutdown().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.admin_task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "admin server task failed"),
        }
        self.metrics.abort();
        self.cpu_sampler.abort();
        self.site_counter.abort();
        self.site_store.close().await;
    }
}

/// The site store the options name: `--site-db`, or the embedded one in `--data-dir`.
pub async fn open_site_store(opts: &Options) -> Result<SiteStore, sitedb::SiteDbError> {
    match &opts.site_db {
        Some(url) => SiteStore::open_url(url, std::time::Duration::from_secs(5)).await,
        None => SiteStore::open_embedded(&opts.data_dir).await,
    }
}

/// Opens the site store and starts the admin API and metrics for an already loaded config.
pub async fn start(opts: &Options, config: Config) -> Result<Running, StartError> {
    // First: an admin API that may not be served stops the start before anything else does.
    // Built now, not when the API starts: a key that does not match its certificate must stop
    // the start before this pod joins the fleet.
    let admin_tls = admin::server_tls(opts)?
        .map(|tls| {
            let dir = tls.dir().to_owned();
            admin::incoming::ReloadingTls::new(tls).map(|t| (dir, Arc::new(t)))
        })
        .transpose()
        .map_err(admin::AdminTlsError::from)?;
    let admin_client_tls = admin::client_tls(opts).map_err(admin::AdminTlsError::from)?;
    let site_store = open_site_store(opts).await?;
    // The embedded store is ours to shape. An external database belongs to its operators:
    // migrate it with the migrations in gateway-pod/migrations, not behind their back.
    if matches!(site_store, SiteStore::Sqlite(_)) {
        site_store.migrate().await?;
    }

    let metrics = metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let gateway = Arc::new(Gateway::new(config, metrics));
    match site_store.count_sites().await {
        Ok(n) => {
            gateway.metrics.sites.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::warn!(error = %e, "cannot count sites; the site store may be unreachable"),
    }

    let m = &gateway.metrics;
    let (tunnels, half_open, cpu, drain) = (
        m.tunnels.clone(),
        m.ike_sas_half_open.clone(),
        m.cpu_percent.clone(),
        m.drain_state.clone(),
    );
    let load = Arc::new(move || concentrator_fleet::member::Load {
        tunnels: u64::try_from(tunnels.get()).unwrap_or(0),
        half_open: u64::try_from(half_open.get()).unwrap_or(0),
        cpu_percent: u32::try_from(cpu.get()).unwrap_or(0),
        capacity: 0,
        draining: drain.get() != 0,
    });
    let fleet = cluster::FleetOptions::from_cli(opts, load)?
        .map(|f| cluster::Fleet::start(f, gateway.metrics.fleet.clone()));

    let control = if opts.no_tunnels {
        None
    } else {
        let egroups = egroups::Egroups::open(&gateway.config(), &site_store)
            .await
            .map_err(StartError::EgroupStore)?;
        // A site table that does not fit its Egroup is said at start (where the database
        // answers), not first by the lookup of a site that connects.
        egroups::Egroups::spawn_checks(egroups.check_tables());
        Some(
            control::start(
                gateway.clone(),
                egroups,
                control::ControlOptions {
                    listen: opts.ike_listen,
                    ike_port: opts.ike_port,
                    nat_t_port: opts.nat_t_port,
                    tun_name: opts.tun_name.clone(),
                    tun_mtu: opts.tun_mtu,
                    retransmit: concentrator_ike::responder::Retransmit {
                        timeout: opts.ike_retransmit_timeout,
                        tries: opts.ike_retransmit_tries,
                    },
                    endpoint: concentrator_ike::endpoint::EndpointConfig {
                        cookie_threshold: opts.ike_cookie_threshold,
                        max_half_open: opts.ike_max_half_open,
                        ..Default::default()
                    },
                    redirect_to: opts.redirect_to.as_deref().map(|g| match g.parse() {
                        Ok(ip) => concentrator_ike::redirect::GatewayId::Ip(ip),
                        Err(_) => concentrator_ike::redirect::GatewayId::Fqdn(g.to_owned()),
                    }),
                    raw_esp: opts.raw_esp,
                    tcp_mss_clamp: opts.tcp_mss_clamp,
                    ike_workers: opts.ike_workers,
                    ike_steering: opts.ike_steering,
                },
                fleet.as_ref(),
            )
            .await?,
        )
    };

    let metrics_srv = concentrator_telemetry::serve_metrics(opts.metrics_listen, Arc::new(registry)).await?;

    let listener = tokio::net::TcpListener::bind(opts.admin_listen)
        .await
        .map_err(|source| StartError::AdminBind {
            addr: opts.admin_listen,
            source,
        })?;
    let admin_addr = listener.local_addr().map_err(|source| StartError::AdminBind {
        addr: opts.admin_listen,
        source,
    })?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GatewayAdminServer<admin::AdminService>>()
        .await;
    let (tx, rx) = oneshot::channel::<()>();
    let admin = GatewayAdminServer::new(
        admin::AdminService::new(gateway.clone(), site_store.clone())
            .in_fleet(
                fleet.as_ref().map(|f| f.view.clone()),
                fleet.as_ref().map_or(0, |f| f.replicator.copies()),
            )
            .with_client_tls(admin_client_tls),
    );
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(admin);
    let stop = async {
        let _ = rx.await;
    };
    let admin_task = match admin_tls {
        Some((dir, tls)) => {
            tracing::info!(dir = %dir.display(), "admin API requires mutual TLS");
            let incoming =
                tokio_stream::wrappers::ReceiverStream::new(admin::incoming::incoming(listener, tls));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
        }
        None => tokio::spawn(
            router
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop),
        ),
    };
    // Sites come and go in the store (`sites import`, the operators' own tools): counted again
    // every minute, so the gauge never tells of the store as it was at start.
    let site_counter = {
        let (store, sites) = (site_store.clone(), gateway.metrics.sites.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                match store.count_sites().await {
                    Ok(n) => {
                        sites.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot count sites"),
                }
            }
        })
    };
    let cpu_sampler = cpu::spawn_sampler(
        gateway.metrics.cpu_percent.clone(),
        std::time::Duration::from_secs(5),
    );
    let reloader = opts.config_dir.clone().map(|dir| {
        reload::Reloader {
            dir,
            gateway: gateway.clone(),
            default_store: site_store.clone(),
            control: control.as_ref().map(control::Control::reloads),
        }
        .spawn()
    });
    gateway.set_readiness(metrics_srv.readiness());
    metrics_srv.set_ready(!gateway.is_draining());
    Ok(Running {
        gateway,
        admin_addr,
        metrics_addr: metrics_srv.local_addr,
        site_store,
        shutdown: Some(tx),
        admin_task,
        metrics: metrics_srv,
        cpu_sampler,
        site_counter,
        reloader,
        control,
        fleet,
    })
}

/// One line per object, for `--check` and the start-up log.
pub fn summary(config: &Config) -> Vec<String> {
    let set = &config.set;
    let mut lines = Vec::new();
    for (name, e) in &set.eroutes {
        let binding = match set.egroup_of(name) {
            Some((g, eg)) => format!(
                "egroup {g} (sites /{}, max {})",
                eg.remote_subnet_prefix, eg.max_dynamic_eroutes
            ),
            None => format!(
                "static peer {}",
                e.peer_address.as_deref().unwrap_or("(any address)")
            ),
        };
        lines.push(format!(
            "eroute {name}: {} <-> {} peer-id {} role {:?}, {binding}",
            e.local_subnet,
            e.remote_subnet,
            e.peer_id.as_deref().unwrap_or("(any)"),
            e.role
        ));
    }
    for f in &config.ignored_fleets {
        lines.push(format!("gatewayfleet {f}: ignored by a standalone gateway"));
    }
    lines
}

/// Builds the tunnel of `esp-static` from its arguments.
pub fn static_tunnel(a: &cli::EspStaticArgs) -> Result<dataplane::StaticTunnel, String> {
    let esp = concentrator_crds::proposal::parse_esp("--cipher", &a.cipher).map_err(|e| e.to_string())?;
    let enc = match (esp.encryption.as_slice(), esp.integrity.is_empty()) {
        ([e], true) => *e,
        _ => return Err("--cipher: name exactly one AEAD cipher".into()),
    };
    let spi = |what: &str, s: &str| {
        u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("--{what}: {e}"))
    };
    let key = |what: &str, s: &str| -> Result<concentrator_crypto::aead::AeadKey, String> {
        let bytes = zeroize::Zeroizing::new(hex::decode(s).map_err(|e| format!("--{what}: {e}"))?);
        concentrator_crypto::aead::AeadKey::new(enc, &bytes).map_err(|e| format!("--{what}: {e}"))
    };
    Ok(dataplane::StaticTunnel {
        tun_name: a.tun_name.clone(),
        tun_address: a.tun_address,
        mtu: a.mtu,
        local: a.local,
        peer: a.peer,
        local_subnet: a.local_subnet,
        remote_subnet: a.remote_subnet,
        outbound: concentrator_esp::Outbound::new(
            spi("spi-out", &a.spi_out)?,
            key("key-out", &a.key_out)?,
            false,
        ),
        inbound: concentrator_esp::Inbound::new(
            spi("spi-in", &a.spi_in)?,
            key("key-in", &a.key_in)?,
            false,
            a.replay_window,
        ),
        raw_esp: a.raw_esp,
        background: (a.background_sas > 0).then_some((enc, a.background_sas)),
    })
}

/// The `tunnels` command's table: one line per tunnel, every column.
pub fn tunnels_table(tunnels: &[concentrator_proto::admin::Tunnel]) -> String {
    concentrator_proto::view::tunnels_table(tunnels, true)
}
